//! The rules for a request's fields that both client protocols share, and the one writer of
//! the head that goes upstream. [`inspect`] reads the fields once (framing, `Connection`
//! tokens, `Host`, `Expect`, `Upgrade`, the sticky cookie) and refuses what is ambiguous;
//! [`write_head`] then writes the request line and the fields that pass, plus the forwarding
//! fields; [`finish_head`] appends the one canonical framing field and the blank line.
//!
//! What goes upstream: no hop-by-hop field (nor one `Connection` names, unless pinned), no
//! name with `_`, no client copy of the forwarding fields, no `Expect` (the proxy answers it),
//! `Host` from the authority when there is one, one `Cookie` line, and the framing written by
//! the proxy itself: one `content-length: N` or `transfer-encoding: chunked`, never both.

use super::fields::{self, FORWARDING};

/// Why a request head is refused before anything is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Larger than the head limit, or too many header lines: 431.
    TooLarge,
    /// Malformed or ambiguous: 400, with what is wrong.
    Bad(&'static str),
    /// Something the proxy cannot pass on faithfully: 501, with what.
    Unsupported(&'static str),
    /// A host the connection is not for (its TLS certificate does not cover it): 421.
    Misdirected,
}

/// A request's fields as (name, value) pairs, in order; iterated more than once.
pub trait Fields<'f>: Iterator<Item = (&'f str, &'f [u8])> + Clone {}
impl<'f, I: Iterator<Item = (&'f str, &'f [u8])> + Clone> Fields<'f> for I {}

/// What [`inspect`] found in a request's fields.
#[derive(Debug, Default, Clone)]
pub struct Inspection {
    pub hosts: usize,
    /// The first Host value (validated).
    pub host_valid: bool,
    pub length: Option<u64>,
    /// Transfer-Encoding fields seen, and whether their codings are exactly `chunked`.
    pub te_fields: usize,
    pub te_is_chunked: bool,
    /// A coding besides chunked was named (not passed on: 501).
    pub te_other: bool,
    pub close: bool,
    pub upgrade_token: bool,
    /// `Connection` named fields besides its own options: they are hop-by-hop too.
    pub named_in_connection: bool,
    pub expect_continue: bool,
    /// An `Upgrade` field came.
    pub upgrade_field: bool,
    /// Some `Upgrade` field names `h2c`: an upgrade of this hop only (RFC 9113 §3.2 removed
    /// it; RFC 7540 never let proxies pass it): tunnelling it would carry requests past limits
    /// and logs, so no upgrade passes then.
    pub h2c: bool,
    pub cookies: usize,
    pub sticky: Option<String>,
}

impl Inspection {
    /// Whether this is an upgrade handshake to pass on.
    pub fn upgrade(&self) -> bool {
        self.upgrade_token && self.upgrade_field && !self.h2c
    }
}

/// Reads a request's fields once; refuses conflicting lengths and malformed values.
pub fn inspect<'f>(fields: impl Fields<'f>, sticky_cookie: Option<&str>) -> Result<Inspection, Refusal> {
    let mut i = Inspection { host_valid: true, ..Inspection::default() };
    for (name, value) in fields {
        if name.eq_ignore_ascii_case("host") {
            i.hosts += 1;
            i.host_valid &= is_authority(value);
        } else if name.eq_ignore_ascii_case("content-length") {
            i.length = Some(fields::content_length(i.length, value).map_err(Refusal::Bad)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            i.te_fields += 1;
            let mut codings = fields::tokens(value);
            if !codings.clone().all(fields::is_token) {
                return Err(Refusal::Bad("transfer coding is not a token"));
            }
            i.te_is_chunked =
                codings.clone().count() == 1 && codings.clone().all(|c| c.eq_ignore_ascii_case(b"chunked"));
            let last_chunked = codings.clone().last().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            if !last_chunked {
                return Err(Refusal::Bad("Transfer-Encoding does not end in chunked"));
            }
            i.te_other |= codings.any(|c| !c.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in fields::tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    i.close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    i.upgrade_token = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    i.named_in_connection = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            i.expect_continue = fields::trim_ows(value).eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("upgrade") {
            i.upgrade_field = true;
            i.h2c |= fields::has_token(value, "h2c");
        } else if name.eq_ignore_ascii_case("cookie") {
            i.cookies += 1;
            if let Some(cookie) = sticky_cookie
                && i.sticky.is_none()
            {
                i.sticky = fields::cookie_in_line(value, cookie).map(|v| String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    if i.hosts > 1 {
        return Err(Refusal::Bad("more than one Host header"));
    }
    if !i.host_valid {
        return Err(Refusal::Bad("invalid Host header"));
    }
    if i.te_fields > 1 {
        return Err(Refusal::Bad("more than one Transfer-Encoding header"));
    }
    if i.te_fields == 1 && i.length.is_some() {
        return Err(Refusal::Bad("both Content-Length and Transfer-Encoding"));
    }
    Ok(i)
}

/// Whether `v` can stand as a URI authority (`host[:port]`, RFC 3986 §3.2): what a backend
/// reads as the site is then exactly what the proxy read.
pub fn is_authority(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b))
        && !v.contains(&b'@')
}

/// The client address and scheme the forwarding fields carry.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The client's address as text.
    pub client_ip: &'a [u8],
    /// `http` or `https`.
    pub proto: &'a str,
}

/// The start of the head for the backend.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub method: &'a str,
    /// Path and query (origin-form).
    pub path: &'a str,
    /// An authority that replaces `Host` (absolute-form, HTTP/2 `:authority`).
    pub authority: Option<&'a str>,
}

/// How the request body is framed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body and no framing field.
    None,
    /// `content-length: N` (also 0, so a backend that needs a length has one).
    Length(u64),
    Chunked,
}

/// Writes the request line and the fields that go upstream into `out` (cleared first), without
/// the framing field and the blank line (see [`finish_head`]).
pub fn write_head<'f>(
    out: &mut Vec<u8>,
    target: Target<'_>,
    fields: impl Fields<'f>,
    i: &Inspection,
    fwd: Forwarding<'_>,
) {
    let upgrade = i.upgrade();
    out.clear();
    out.extend_from_slice(target.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Option<Vec<u8>> = None;
    let mut cookie: Option<Vec<u8>> = None;
    for (name, value) in fields.clone() {
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            let v = xff.get_or_insert_with(Vec::new);
            v.extend_from_slice(value);
            v.extend_from_slice(b", ");
            continue;
        }
        if name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("expect")
            // The settings of an h2c upgrade, which is never passed on.
            || name.eq_ignore_ascii_case("http2-settings")
            || fields::is_hop_by_hop(name, upgrade)
            || !fields::is_forwardable_name(name)
            || FORWARDING.iter().any(|f| name.eq_ignore_ascii_case(f))
            || (i.named_in_connection && !fields::is_pinned(name) && named_in(fields.clone(), name))
            || (target.authority.is_some() && name.eq_ignore_ascii_case("host"))
        {
            continue;
        }
        if i.cookies > 1 && name.eq_ignore_ascii_case("cookie") {
            // One Cookie line (RFC 9113 §8.2.3 for HTTP/2 crumbs; RFC 6265 §5.4 for HTTP/1.1).
            let v = cookie.get_or_insert_with(Vec::new);
            if !v.is_empty() {
                v.extend_from_slice(b"; ");
            }
            v.extend_from_slice(value);
            continue;
        }
        push_field(out, name.as_bytes(), value);
    }
    if let Some(auth) = target.authority {
        push_field(out, b"host", auth.as_bytes());
    }
    if let Some(c) = &cookie {
        push_field(out, b"cookie", c);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = &xff {
        out.extend_from_slice(prev);
    }
    out.extend_from_slice(fwd.client_ip);
    out.extend_from_slice(b"\r\nx-real-ip: ");
    out.extend_from_slice(fwd.client_ip);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
}

/// Ends a head from [`write_head`]: the framing field, then the blank line.
pub fn finish_head(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value\r\n`.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal ASCII digits.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Whether a `Connection` field names `name`.
fn named_in<'f>(fields: impl Fields<'f>, name: &str) -> bool {
    fields.filter(|(n, _)| n.eq_ignore_ascii_case("connection")).any(|(_, v)| fields::has_token(v, name))
}
