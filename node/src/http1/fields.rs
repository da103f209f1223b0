//! Rules about single header fields that both directions and both client protocols share: the
//! one hop-by-hop list (RFC 9110 §7.6.1), `Connection` tokens, the strict `Content-Length`
//! reader, names a proxy never passes on, and the cookie parser.

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// non-standard `Keep-Alive` and `Proxy-Connection`). `Connection` and `Upgrade` are kept only
/// for an upgrade handshake.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Fields the proxy sets itself: what the client sent under these names never passes.
pub const FORWARDING: [&str; 3] = ["x-forwarded-for", "x-real-ip", "x-forwarded-proto"];

/// Whether `name` is hop-by-hop; `upgrade` keeps `Connection` and `Upgrade` (a 101 handshake).
pub fn is_hop_by_hop(name: &str, upgrade: bool) -> bool {
    if upgrade && (name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("upgrade")) {
        return false;
    }
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Fields that `Connection` cannot make hop-by-hop: dropping them would change how the
/// receiver frames the message or which site it serves.
pub fn is_pinned(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("host")
}

/// The comma-separated elements of a list field (RFC 9110 §5.6.1), optional whitespace
/// trimmed, empty elements skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> + Clone {
    value.split(|&b| b == b',').map(trim_ows).filter(|t| !t.is_empty())
}

/// Whether a list field holds `token` (case-insensitively).
pub fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether `v` is a token (RFC 9110 §5.6.2): what names a transfer coding or an option.
pub fn is_token(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Trims optional whitespace: SP and HTAB only (RFC 9110 §5.6.3). Never Unicode spaces: a
/// reader that trimmed `C2 A0` would see a different value than the backend.
pub fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Longest Content-Length accepted: 18 digits cannot overflow a u64.
const MAX_LENGTH_DIGITS: usize = 18;

/// Reads one Content-Length field (1*DIGIT, RFC 9110 §8.6) given the value of an earlier one,
/// if any: fields that disagree make the message's framing ambiguous. Anything but ASCII digits
/// around optional SP/HTAB is refused, so what is read is what the canonical line forwards.
pub fn content_length(earlier: Option<u64>, value: &[u8]) -> Result<u64, &'static str> {
    let digits = trim_ows(value);
    if digits.is_empty() || digits.len() > MAX_LENGTH_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return Err("invalid Content-Length");
    }
    let n = digits.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    match earlier {
        Some(l) if l != n => Err("conflicting Content-Length headers"),
        _ => Ok(n),
    }
}

/// The value of cookie `name` in one `Cookie` field value.
pub fn cookie_in_line<'a>(line: &'a [u8], name: &str) -> Option<&'a [u8]> {
    line.split(|&b| b == b';').find_map(|pair| {
        let pair = trim_ows(pair);
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (k, v) = (trim_ows(&pair[..eq]), trim_ows(&pair[eq + 1..]));
        (k == name.as_bytes()).then(|| v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v))
    })
}

/// Whether a field name may be forwarded at all: names with `_` are dropped (nginx's
/// `underscores_in_headers off`): `X_Real_IP` would reach CGI-style backends as
/// `HTTP_X_REAL_IP`, next to or instead of the proxy's own `X-Real-IP`.
pub fn is_forwardable_name(name: &str) -> bool {
    !name.contains('_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(None, b"5"), Ok(5));
        assert_eq!(content_length(None, b" \t5 "), Ok(5));
        assert_eq!(content_length(Some(5), b"5"), Ok(5));
        assert_eq!(content_length(Some(4), b"5"), Err("conflicting Content-Length headers"));
        for bad in [&b""[..], b"+5", b"-1", b"5 5", b"0x5", b"5\xc2\xa0", b"\xc2\x855", b"5,5", b"1234567890123456789"]
        {
            assert!(content_length(None, bad).is_err(), "{bad:?}");
        }
        assert_eq!(content_length(None, b"999999999999999999"), Ok(999_999_999_999_999_999));
    }

    #[test]
    fn lists_and_cookies() {
        assert_eq!(tokens(b" a , ,b\t,").collect::<Vec<_>>(), [&b"a"[..], b"b"]);
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(!has_token(b"keep-alive, Upgrade\xc2\xa0", "upgrade"));
        assert_eq!(cookie_in_line(b"a=1; srv=\"abc\"; b=2", "srv"), Some(&b"abc"[..]));
        assert_eq!(cookie_in_line(b"a=1", "srv"), None);
        assert!(is_hop_by_hop("Transfer-Encoding", false) && !is_hop_by_hop("Upgrade", true));
    }
}
