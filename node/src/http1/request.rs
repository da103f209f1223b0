//! Parsing and validating an HTTP/1.1 request head: [`parse`] reads the head at the start of a
//! buffer (httparse), refuses what is malformed or ambiguous ([`Refusal`]), and writes the head
//! that goes upstream (through [`rewrite`](super::rewrite)) in the same pass.

use http::Method;

use super::rewrite::{self, Forwarding, Framing, Inspection, Target};

/// Most header lines in a request head (hyper's default too); more is a 431.
pub const MAX_HEADERS: usize = 100;

/// Why a request head is refused before anything is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Larger than the head limit, or too many header lines: 431.
    TooLarge,
    /// Malformed or ambiguous: 400, with what is wrong.
    Bad(&'static str),
    /// Something the proxy cannot pass on faithfully: 501, with what.
    Unsupported(&'static str),
}

/// How the request body arrives from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// What the parser needs besides the bytes.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    pub max_header_bytes: usize,
    /// The sticky cookie's name, when sticky sessions are on.
    pub sticky_cookie: Option<&'a str>,
    /// Capture the request line, Referer and User-Agent for the access log.
    pub log: bool,
    pub forwarding: Forwarding<'a>,
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
    let i = rewrite::inspect(fields.clone(), opts.sticky_cookie)?;
    if http11 && i.hosts == 0 && authority.is_none() {
        return Err(Refusal::Bad("HTTP/1.1 request without Host"));
    }
    let body = body_framing(&i, http11)?;
    let upgrade = i.upgrade();
    let path_and_query;
    let path = match path {
        Path::Whole(p) => p,
        Path::RootWithQuery(q) => {
            path_and_query = format!("/{q}");
            &path_and_query
        }
    };
    rewrite::write_head(out, Target { method: method.as_str(), path, authority }, fields, &i, opts.forwarding);

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
    }))
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
