//! Parsing and validating an HTTP/1.1 request head: [`parse`] reads the head at the start of a
//! buffer (httparse), refuses what is malformed or ambiguous ([`Refusal`]), and writes the head
//! that goes upstream (through [`rewrite`](super::rewrite)) in the same pass.

use http::Method;

pub use super::rewrite::Refusal;
use super::rewrite::{self, Forwarding, Framing, Inspection, Target};

/// Most header lines in a request head (hyper's default too); more is a 431.
pub const MAX_HEADERS: usize = 100;

/// How the request body arrives from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// Says whether a host (as sent) may be asked for on this connection.
pub type HostCheck<'a> = &'a (dyn Fn(&[u8]) -> bool + Sync);

/// What the parser needs besides the bytes.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    pub max_header_bytes: usize,
    /// Chooses where the request goes (by host and path), and so the sticky cookie's name, the
    /// target the backend gets, and a redirect.
    pub router: &'a (dyn Router + Sync),
    /// Capture the request line, Referer and User-Agent for the access log.
    pub log: bool,
    pub forwarding: Forwarding<'a>,
    /// Answer every request with a redirect to https on this port (`[tls] redirect_http`).
    pub redirect_https: Option<u16>,
    /// Whether the connection may carry requests for a host (`Host` or authority, as sent):
    /// on TLS, the certificate the client's SNI chose must cover it (else 421).
    pub serves_host: Option<HostCheck<'a>>,
}

/// Routing as the codec sees it: it knows no pools, only what a route changes in the request.
pub trait Router {
    /// Routes a request by its host (the `Host` field or the target's authority, as sent;
    /// empty without one) and its target (path and query, origin-form).
    fn route(&self, host: &[u8], target: &str) -> Routed<'_>;
    /// The target the backend gets for a request routed by `route` (a stripped prefix).
    fn upstream_target<'t>(&self, route: u32, target: &'t str) -> std::borrow::Cow<'t, str>;
}

/// What a [`Router`] said about one request.
#[derive(Debug, Clone, Copy)]
pub struct Routed<'a> {
    /// The router's own number for the route (returned in [`Request::route`]).
    pub route: u32,
    /// The name of the sticky cookie of the pool the route leads to.
    pub sticky_cookie: Option<&'a str>,
    /// Redirect to this origin (plus the request's target) instead of forwarding.
    pub redirect: Option<&'a str>,
}

/// No routes: one pool, with this sticky cookie.
pub struct OnePool<'a>(pub Option<&'a str>);

impl Router for OnePool<'_> {
    fn route(&self, _host: &[u8], _target: &str) -> Routed<'_> {
        Routed { route: 0, sticky_cookie: self.0, redirect: None }
    }
    fn upstream_target<'t>(&self, _route: u32, target: &'t str) -> std::borrow::Cow<'t, str> {
        std::borrow::Cow::Borrowed(target)
    }
}

/// The request line and fields an access log line shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFields {
    pub request: String,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub http11: bool,
    /// The client wants the connection kept open after this request.
    pub keep_alive: bool,
    pub body: BodyFraming,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    pub upgrade: bool,
    /// Value of the sticky cookie, when sticky sessions are on and the client sent it.
    pub sticky: Option<String>,
    /// Bytes of the head, to take off the buffer.
    pub head_size: usize,
    pub log: Option<LogFields>,
    /// With `Options::redirect_https` or a redirect route: where the client is sent.
    pub location: Option<String>,
    /// The route the router chose ([`Routed::route`]).
    pub route: u32,
}

impl BodyFraming {
    /// Whether there are body bytes to read (`Content-Length: 0` has none).
    pub fn has_body(self) -> bool {
        !matches!(self, BodyFraming::None | BodyFraming::Length(0))
    }

    /// The framing field of the upstream head for a body sent as it arrives (a length of 0
    /// stays, so a backend that needs a length on a POST has one).
    pub fn upstream(self) -> Framing {
        match self {
            BodyFraming::None => Framing::None,
            BodyFraming::Length(n) => Framing::Length(n),
            BodyFraming::Chunked => Framing::Chunked,
        }
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` when it is not complete yet. For a
/// complete one, the upstream head is written to `out` without its framing field and blank
/// line (see [`rewrite::finish_head`]).
pub fn parse(buf: &[u8], opts: &Options<'_>, out: &mut Vec<u8>) -> Result<Option<Request>, Refusal> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_size = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > opts.max_header_bytes => return Err(Refusal::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(httparse::Error::Version) => return Err(Refusal::Bad("malformed request line (HTTP version)")),
        Err(httparse::Error::Token) => return Err(Refusal::Bad("malformed request line (method)")),
        Err(httparse::Error::HeaderName) => return Err(Refusal::Bad("malformed header name")),
        Err(httparse::Error::HeaderValue) => return Err(Refusal::Bad("malformed header value")),
        Err(_) => return Err(Refusal::Bad("malformed request head")),
    };
    if head_size > opts.max_header_bytes {
        return Err(Refusal::TooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Bad("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Bad("invalid method"))?;
    if method == Method::CONNECT {
        return Err(Refusal::Unsupported("CONNECT is not supported"));
    }
    let http11 = minor == 1;
    let (path, authority) = split_target(target)?;
    let fields = req.headers.iter().map(|h| (h.name, h.value));
    let path_and_query;
    let path = match path {
        Path::Whole(p) => p,
        Path::RootWithQuery(q) => {
            path_and_query = format!("/?{q}");
            &path_and_query
        }
    };
    let host = authority
        .map(str::as_bytes)
        .or_else(|| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value.trim_ascii()));
    if let (Some(serves), Some(host)) = (opts.serves_host, host)
        && !serves(host)
    {
        return Err(Refusal::Misdirected);
    }
    let routed = opts.router.route(host.unwrap_or_default(), path);
    let i = rewrite::inspect(fields.clone(), routed.sticky_cookie)?;
    if http11 && i.hosts == 0 && authority.is_none() {
        return Err(Refusal::Bad("HTTP/1.1 request without Host"));
    }
    let body = body_framing(&i, http11)?;
    let upgrade = i.upgrade();
    let upstream_path = opts.router.upstream_target(routed.route, path);
    let head_target = Target { method: method.as_str(), path: &upstream_path, authority };
    rewrite::write_head(out, head_target, fields, &i, opts.forwarding);

    let log = opts.log.then(|| {
        let field = |n: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(n))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        LogFields {
            request: format!("{method} {target} HTTP/1.{minor}"),
            referer: field("referer"),
            user_agent: field("user-agent"),
        }
    });
    let location = match opts.redirect_https {
        None => routed.redirect.map(|origin| format!("{origin}{}", if path == "*" { "/" } else { path })),
        Some(port) => match host {
            Some(host) if !host.is_empty() => Some(https_location(host, port, if path == "*" { "/" } else { path })),
            _ => return Err(Refusal::Bad("no Host to redirect to https")),
        },
    };
    let Inspection { close, expect_continue, sticky, .. } = i;
    Ok(Some(Request {
        http11,
        keep_alive: http11 && !close,
        body,
        // HTTP/1.0 clients never get a 1xx (RFC 9110 §15.2).
        expect_continue: expect_continue && http11 && body.has_body(),
        upgrade,
        sticky,
        head_size,
        log,
        method,
        location,
        route: routed.route,
    }))
}

/// `https://host[:port]path` for a validated Host (`host[:port]`, IPv6 in brackets): the
/// port is dropped for 443, replaced by `port` otherwise.
pub fn https_location(host: &[u8], port: u16, path: &str) -> String {
    let host = String::from_utf8_lossy(host);
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => &host[..],
    };
    if port == 443 { format!("https://{name}{path}") } else { format!("https://{name}:{port}{path}") }
}

/// How the body is framed (RFC 9112 §6.1, §6.3), or why that is ambiguous.
fn body_framing(i: &Inspection, http11: bool) -> Result<BodyFraming, Refusal> {
    if i.te_fields > 0 {
        if !http11 {
            return Err(Refusal::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if i.te_other {
            // RFC 9112 §6.1: a coding the proxy cannot pass on faithfully gets 501.
            return Err(Refusal::Unsupported("transfer codings other than chunked"));
        }
        if !i.te_is_chunked {
            return Err(Refusal::Bad("chunked applied more than once"));
        }
        return Ok(BodyFraming::Chunked);
    }
    Ok(i.length.map_or(BodyFraming::None, BodyFraming::Length))
}

/// The target's path as it goes upstream.
enum Path<'a> {
    Whole(&'a str),
    /// `http://host?q`: the path is `/` and the query follows.
    RootWithQuery(&'a str),
}

/// Origin-form as is; absolute-form reduced to its path, its authority standing in for Host
/// (RFC 9112 §3.2.2); `*` for OPTIONS.
fn split_target(target: &str) -> Result<(Path<'_>, Option<&str>), Refusal> {
    if target.starts_with('/') || target == "*" {
        return Ok((Path::Whole(target), None));
    }
    let Some(rest) = strip_scheme(target) else {
        return Err(Refusal::Bad("invalid request target"));
    };
    let (auth, path) = rest.find(['/', '?']).map_or((rest, ""), |i| rest.split_at(i));
    if auth.is_empty() || auth.contains('@') || !rewrite::is_authority(auth.as_bytes()) {
        return Err(Refusal::Bad("absolute-form target without a host, or with userinfo"));
    }
    let path = match path.strip_prefix('?') {
        Some(q) => Path::RootWithQuery(q),
        None if path.is_empty() => Path::Whole("/"),
        None => Path::Whole(path),
    };
    Ok((path, Some(auth)))
}

/// The rest of an absolute-form target after `http://` or `https://` (any case).
fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        target.get(..scheme.len()).filter(|p| p.eq_ignore_ascii_case(scheme)).map(|_| &target[scheme.len()..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options<'static> {
        Options {
            max_header_bytes: 16 * 1024,
            router: &OnePool(Some("srv")),
            log: false,
            forwarding: Forwarding { client_ip: b"10.0.0.9", proto: "http" },
            redirect_https: None,
            serves_host: None,
        }
    }

    fn parse_raw(raw: &[u8]) -> Result<Option<Request>, Refusal> {
        parse(raw, &opts(), &mut Vec::new())
    }

    fn upstream_head(raw: &[u8]) -> String {
        let mut out = b"left from an earlier request".to_vec();
        let req = parse(raw, &opts(), &mut out).unwrap().unwrap();
        rewrite::finish_head(&mut out, req.body.upstream());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn redirect_to_https_keeps_host_and_path() {
        let o = Options { redirect_https: Some(443), ..opts() };
        let at = |raw: &[u8], o: &Options<'_>| parse(raw, o, &mut Vec::new()).unwrap().unwrap().location.unwrap();
        assert_eq!(at(b"GET /a?b=1 HTTP/1.1\r\nHost: shop.example:80\r\n\r\n", &o), "https://shop.example/a?b=1");
        assert_eq!(at(b"GET http://abs.example/x HTTP/1.1\r\nHost: h\r\n\r\n", &o), "https://abs.example/x");
        assert_eq!(at(b"OPTIONS * HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", &o), "https://[::1]/");
        let o = Options { redirect_https: Some(8443), ..opts() };
        assert_eq!(at(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", &o), "https://[::1]:8443/");
        assert!(parse_raw(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap().location.is_none());
        // nowhere to send a request without Host
        assert!(matches!(parse(b"GET / HTTP/1.0\r\n\r\n", &o, &mut Vec::new()), Err(Refusal::Bad(_))));
    }

    #[test]
    fn rewrites_the_head_for_the_backend() {
        let head = upstream_head(
            b"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Forwarded-For: 1.1.1.1\r\nX-Real-IP: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nCookie: a=1; srv=abc\r\n\r\n",
        );
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nHost: x\r\nCookie: a=1; srv=abc\r\nx-forwarded-for: 1.1.1.1, 10.0.0.9\r\nx-real-ip: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let p = parse_raw(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; srv=abc\r\n\r\n").unwrap().unwrap();
        assert_eq!(p.sticky.as_deref(), Some("abc"));
        assert!(p.keep_alive);
        let head = upstream_head(b"GET http://example.com:8080/p?q=1 HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: example.com:8080\r\n"), "{head}");
        let head = upstream_head(b"GET http://example.com?q=1 HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("GET /?q=1 HTTP/1.1\r\nhost: example.com\r\n"), "{head}");
        let head = upstream_head(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(head.contains("Upgrade: websocket\r\n") && head.contains("connection: upgrade\r\n"), "{head}");
        let head =
            upstream_head(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n");
        assert!(!head.to_ascii_lowercase().contains("upgrade"), "h2c is not passed on: {head}");
        let head = upstream_head(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        );
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("upgrade") && !lower.contains("http2-settings"), "h2c next to another: {head}");
        let head =
            upstream_head(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n");
        assert!(head.ends_with("transfer-encoding: chunked\r\n\r\n") && !head.contains("Expect"), "{head}");
        let head = upstream_head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:  \t7 \r\n\r\n");
        assert!(head.ends_with("\r\ncontent-length: 7\r\n\r\n") && !head.contains("Content-Length"), "{head}");
        let head = upstream_head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert!(head.ends_with("\r\ncontent-length: 0\r\n\r\n"), "a zero length stays: {head}");
        let head = upstream_head(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n");
        assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "one Cookie line: {head}");
        let head =
            upstream_head(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: cookie\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n");
        assert!(!head.to_ascii_lowercase().contains("cookie"), "Connection names Cookie: {head}");
    }

    #[test]
    fn refuses_ambiguous_and_malformed_heads() {
        for (raw, why) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "both"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "conflicting"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n", "invalid Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\xc2\xa0\r\n\r\n", "invalid Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\xc2\x85\r\n\r\n", "invalid Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "chunked"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "more than once"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xc2\xa0chunked\r\n\r\n", "token"),
            (b"GET / HTTP/1.1\r\n\r\n", "Host"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "Host"),
            (b"GET http://u@a/ HTTP/1.1\r\n\r\n", "userinfo"),
            (b"GET http:///x HTTP/1.1\r\n\r\n", "without a host"),
            (b"HELLO WORLD\r\n\r\n", "malformed"),
        ] {
            match parse_raw(raw) {
                Err(Refusal::Bad(msg)) => assert!(msg.contains(why), "{raw:?}: {msg}"),
                other => panic!("{raw:?} must be refused, got {other:?}"),
            }
        }
        assert_eq!(
            parse_raw(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap_err(),
            Refusal::Unsupported("CONNECT is not supported")
        );
        assert_eq!(
            parse_raw(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap_err(),
            Refusal::Unsupported("transfer codings other than chunked")
        );
        assert!(matches!(parse_raw(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)), "incomplete");
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
        assert_eq!(parse_raw(big.as_bytes()).unwrap_err(), Refusal::TooLarge);
        let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-A: 1\r\n".repeat(MAX_HEADERS));
        assert_eq!(parse_raw(many.as_bytes()).unwrap_err(), Refusal::TooLarge);
    }

    #[test]
    fn connection_cannot_drop_framing_or_host_and_authority_wins() {
        let head = upstream_head(
            b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Content-Length, Host, X-Hop\r\nX-Hop: 1\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(head.contains("Host: x\r\n") && head.contains("content-length: 3\r\n"), "{head}");
        assert!(!head.contains("X-Hop"), "{head}");
        let head = upstream_head(b"GET HTTP://example.test/p HTTP/1.1\r\nHost: other.test\r\n\r\n");
        assert!(head.starts_with("GET /p HTTP/1.1\r\n") && head.contains("host: example.test\r\n"), "{head}");
        assert!(!head.contains("other.test"), "absolute-form authority replaces Host: {head}");
        let p = parse_raw(b"POST / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert!(!p.expect_continue, "no 1xx for HTTP/1.0 clients");
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let ka = |raw: &[u8]| parse_raw(raw).unwrap().unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), "HTTP/1.0 clients are closed after");
    }
}
