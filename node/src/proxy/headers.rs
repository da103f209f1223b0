//! Header rewriting for requests that come through hyper (HTTP/2 clients), on `HeaderMap`s:
//! hop-by-hop headers removed (RFC 9110 §7.6.1), `X-Real-IP`, `X-Forwarded-For` (appended),
//! `X-Forwarded-Proto` added, `Host` kept. `h1` does the same for HTTP/1.1 in one pass over the
//! raw header lines.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers listed in Connection are hop-by-hop too; the common case has none.
    if let Some(conn) = headers.get(header::CONNECTION)
        && let Ok(list) = conn.to_str()
    {
        let named: Vec<HeaderName> =
            list.split(',').filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok()).collect();
        for n in named {
            headers.remove(n);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
}

/// Per-connection forwarding headers, built once per client connection.
#[derive(Debug, Clone)]
pub struct ClientHeaders {
    pub real_ip: HeaderValue,
}

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Adds `X-Real-IP`, `X-Forwarded-For` (appended to the client's own list) and
/// `X-Forwarded-Proto`, like nginx's `$proxy_add_x_forwarded_for`.
pub fn add_forwarding(headers: &mut HeaderMap, client: &ClientHeaders) {
    // Every X-Forwarded-For line the client sent, in order, then the client's address.
    let mut prev = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    let xff = if prev.peek().is_none() {
        client.real_ip.clone()
    } else {
        let mut v = Vec::with_capacity(64);
        for line in prev {
            v.extend_from_slice(line.as_bytes());
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(client.real_ip.as_bytes());
        HeaderValue::from_bytes(&v).unwrap_or_else(|_| client.real_ip.clone())
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_REAL_IP.clone(), client.real_ip.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
}

/// Size of a request head as received (request line and header lines), to enforce
/// `max_header_bytes` with Shoal's own 431.
pub fn head_size(method: &http::Method, uri: &http::Uri, headers: &HeaderMap) -> usize {
    let line = method.as_str().len() + uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    line + headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 2
}

/// Finds the value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| cookie_in_line(line, name))
}

/// The value of cookie `name` in one `Cookie` header line.
pub fn cookie_in_line<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v.trim_matches('"'))
    })
}

/// Reads one Content-Length line (digits only, RFC 9110 §8.6) given the value of an earlier
/// one, if any: lines that disagree make the message's framing ambiguous.
pub fn content_length(earlier: Option<u64>, value: &[u8]) -> Result<u64, &'static str> {
    let n = std::str::from_utf8(value)
        .ok()
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("invalid Content-Length")?;
    match earlier {
        Some(l) if l != n => Err("conflicting Content-Length headers"),
        _ => Ok(n),
    }
}

/// Whether a header (by name) is hop-by-hop (RFC 9110 §7.6.1) for the HTTP/1.1 codecs;
/// `upgrade` keeps `Connection` and `Upgrade` for an upgrade handshake.
pub fn is_hop_by_hop(name: &str, upgrade: bool) -> bool {
    const ALWAYS: [&str; 7] = [
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
    ];
    if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("upgrade") {
        return !upgrade;
    }
    ALWAYS.iter().any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::HOST, "example.com".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.1.1.1".parse().unwrap());
        add_forwarding(&mut h, &ClientHeaders { real_ip: "10.0.0.9".parse().unwrap() });
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.1.1.1, 10.0.0.9");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2, 3.3.3.3".parse().unwrap());
        add_forwarding(&mut h, &ClientHeaders { real_ip: "10.0.0.9".parse().unwrap() });
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9");
        assert_eq!(h.get("x-real-ip").unwrap(), "10.0.0.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn cookie_lookup() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; srv=abc; b=2".parse().unwrap());
        assert_eq!(cookie_value(&h, "srv"), Some("abc"));
        assert_eq!(cookie_value(&h, "nope"), None);
    }
}
