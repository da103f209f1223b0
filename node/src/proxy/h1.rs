//! The client-facing HTTP/1.1 side, run on the connection's own task: read and parse request
//! heads (httparse), refuse what is malformed or ambiguous (400, 431, 408, each with
//! `x-shoal-node`), rewrite the head for the backend in one pass over the raw header lines,
//! stream the request body upstream, and write the backend's response back (its header lines
//! as they came, minus hop-by-hop ones). Keep-alive, pipelined requests, `Expect:
//! 100-continue`, WebSocket upgrades (a byte tunnel after the 101) and draining live here.
//! HTTP/2 connections go to hyper (see `listener`).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Method;
use http_body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::access_log::RequestLine;
use super::error::ProxyError;
use super::service::{ClientConn, Forwarded, Outgoing, forward};
use super::upstream::{Chunk, ExchangeError, RequestBody, Step, chunk_step, write_chunk, write_upstream};
use super::{Proxy, headers};

/// Most header lines in a request head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// How long a kept-alive connection may sit idle between requests (nginx's default).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a client may send nothing while its request body is expected (nginx's
/// `client_body_timeout`).
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write to a client may wait for it to read (nginx's `send_timeout`).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Read buffer of a client connection (grown for large heads, up to `max_header_bytes`).
const READ_BUF: usize = 4096;

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

/// A client connection: the socket, bytes read and not yet consumed, the response buffer, and
/// how much of the current request's body is still unread.
pub struct ClientIo {
    pub stream: TcpStream,
    pub buf: BytesMut,
    out: Vec<u8>,
    body: BodyLeft,
}

/// What remains of the current request body on the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLeft {
    None,
    Length(u64),
    Chunked(Chunk),
}

impl ClientIo {
    pub fn new(stream: TcpStream, buf: BytesMut) -> Self {
        ClientIo { stream, buf, out: Vec::with_capacity(1024), body: BodyLeft::None }
    }

    /// Reads more from the client; `Ok(0)` is end of stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_BUF);
        }
        self.stream.read_buf(&mut self.buf).await
    }
}

/// The body of an HTTP/1.1 client's request, sent upstream as it is read.
pub struct ClientBody<'a> {
    io: &'a mut ClientIo,
    expect_continue: bool,
}

impl ClientBody<'_> {
    /// Streams the rest of the body to `upstream` (chunk-encoded when `chunked`). A client that
    /// sends nothing for `CLIENT_BODY_TIMEOUT` fails the request as its own fault; a backend
    /// that takes nothing for `timeout` fails it as the backend's.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        upstream: &mut W,
        chunked: bool,
        timeout: Duration,
    ) -> Result<(), ExchangeError> {
        let client_err = |e: &dyn std::fmt::Display| ExchangeError::ClientBody(e.to_string());
        if std::mem::take(&mut self.expect_continue) {
            self.io.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.map_err(|e| client_err(&e))?;
        }
        loop {
            let io = &mut *self.io;
            match io.body {
                BodyLeft::None => return Ok(()),
                BodyLeft::Length(left) if !io.buf.is_empty() => {
                    let n = (io.buf.len() as u64).min(left) as usize;
                    let data = io.buf.split_to(n);
                    io.body = if left == n as u64 { BodyLeft::None } else { BodyLeft::Length(left - n as u64) };
                    if chunked {
                        write_chunk(upstream, &data, timeout).await?;
                    } else {
                        write_upstream(upstream, &data, timeout).await?;
                    }
                    continue;
                }
                BodyLeft::Length(_) => {}
                BodyLeft::Chunked(mut state) => {
                    let step = chunk_step(&mut state, &mut io.buf).map_err(|e| client_err(&e))?;
                    io.body = BodyLeft::Chunked(state);
                    match step {
                        Step::Data(data) => {
                            if chunked {
                                write_chunk(upstream, &data, timeout).await?;
                            } else {
                                write_upstream(upstream, &data, timeout).await?;
                            }
                            continue;
                        }
                        Step::Advanced => continue,
                        Step::End => {
                            io.body = BodyLeft::None;
                            if chunked {
                                write_upstream(upstream, b"0\r\n\r\n", timeout).await?;
                            }
                            return Ok(());
                        }
                        Step::NeedMore => {}
                    }
                }
            }
            match tokio::time::timeout(CLIENT_BODY_TIMEOUT, io.fill()).await {
                Err(_) => return Err(client_err(&"no request body data within 60s")),
                Ok(Ok(0)) => return Err(client_err(&"client closed before the end of its body")),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(client_err(&e)),
            }
        }
    }
}

/// A parsed request head, with the head for the backend already written.
#[derive(Debug)]
struct Parsed {
    method: Method,
    http11: bool,
    /// The client wants the connection kept open after this request.
    keep_alive: bool,
    body: BodyLeft,
    expect_continue: bool,
    upgrade: bool,
    /// Value of the sticky cookie, when sticky sessions are on and the client sent it.
    sticky: Option<String>,
    head_size: usize,
    /// Request line, Referer and User-Agent, when an access log is on.
    log: Option<RequestLine>,
}

/// Why a request head is refused before anything is forwarded.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    TooLarge,
    Bad(&'static str),
    Unsupported(&'static str),
}

/// What the head parser needs to know besides the bytes.
struct ParseContext<'a> {
    client: &'a ClientConn,
    sticky_cookie: Option<&'a str>,
    log: bool,
    max_header_bytes: usize,
}

/// Parses a request head at the start of `buf`: `Ok(None)` when it is not complete yet. A
/// complete one's head for the backend is written to `out` (cleared first; the connection
/// reuses it from request to request).
fn parse_request(buf: &[u8], cx: &ParseContext<'_>, out: &mut Vec<u8>) -> Result<Option<Parsed>, Refusal> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_size = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > cx.max_header_bytes => return Err(Refusal::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(httparse::Error::Version) => return Err(Refusal::Bad("malformed request line (HTTP version)")),
        Err(httparse::Error::Token) => return Err(Refusal::Bad("malformed request line (method)")),
        Err(httparse::Error::HeaderName) => return Err(Refusal::Bad("malformed header name")),
        Err(httparse::Error::HeaderValue) => return Err(Refusal::Bad("malformed header value")),
        Err(_) => return Err(Refusal::Bad("malformed request head")),
    };
    if head_size > cx.max_header_bytes {
        return Err(Refusal::TooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Bad("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Bad("invalid method"))?;
    if method == Method::CONNECT {
        return Err(Refusal::Bad("CONNECT is not supported"));
    }
    let http11 = minor == 1;
    // origin-form as is; absolute-form reduced to its path (its authority stands in for Host).
    let (path, authority) = if target.starts_with('/') || target == "*" {
        (target, None)
    } else if let Some(rest) = strip_scheme(target) {
        let (auth, path) = rest.find(['/', '?']).map_or((rest, "/"), |i| rest.split_at(i));
        if auth.is_empty() || auth.contains('@') {
            return Err(Refusal::Bad("absolute-form target without a host, or with userinfo"));
        }
        (if path.starts_with('?') { "/" } else { path }, Some(auth))
    } else {
        return Err(Refusal::Bad("invalid request target"));
    };
    let query_after_auth = authority.is_some() && target.contains('?') && path == "/";

    let mut keep_alive = http11;
    let mut upgrade_token = false;
    let mut named_in_connection = false;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut expect_continue = false;
    let mut has_upgrade = false;
    let mut sticky = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(headers::content_length(length, h.value).map_err(Refusal::Bad)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err(Refusal::Bad("more than one Transfer-Encoding header"));
            }
            te = Some(h.value);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    // the HTTP/1.1 default; HTTP/1.0 clients are closed after their request
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    upgrade_token = true;
                } else {
                    named_in_connection = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("upgrade") {
            // h2c is an upgrade of this hop only (RFC 9113 §3.2 removed it; RFC 7540 never let
            // proxies pass it): tunnelling it would carry requests past limits and logs.
            has_upgrade = !h.value.split(|&b| b == b',').any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"));
        } else if let Some(cookie) = cx.sticky_cookie
            && name.eq_ignore_ascii_case("cookie")
            && sticky.is_none()
        {
            sticky = std::str::from_utf8(h.value)
                .ok()
                .and_then(|line| headers::cookie_in_line(line, cookie))
                .map(str::to_owned);
        }
    }
    if http11 && hosts == 0 && authority.is_none() {
        return Err(Refusal::Bad("HTTP/1.1 request without Host"));
    }
    if hosts > 1 {
        return Err(Refusal::Bad("more than one Host header"));
    }
    let body = match (te, length) {
        (Some(_), Some(_)) => return Err(Refusal::Bad("both Content-Length and Transfer-Encoding")),
        (Some(_), None) if !http11 => return Err(Refusal::Bad("Transfer-Encoding in an HTTP/1.0 request")),
        (Some(codings), None) => {
            let mut codings = codings.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|c| !c.is_empty());
            let last = codings.next_back().unwrap_or_default();
            if !last.eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::Bad("Transfer-Encoding does not end in chunked"));
            }
            if codings.next().is_some() {
                // RFC 9112 §6.1: a coding the proxy cannot pass on faithfully gets 501.
                return Err(Refusal::Unsupported("transfer codings other than chunked"));
            }
            BodyLeft::Chunked(Chunk::Size)
        }
        (None, Some(0) | None) => BodyLeft::None,
        (None, Some(n)) => BodyLeft::Length(n),
    };
    let upgrade = upgrade_token && has_upgrade;

    // The head for the backend: request line, the client's header lines minus hop-by-hop and
    // forwarding ones, then ours.
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    if query_after_auth && let Some(q) = target.find('?') {
        out.extend_from_slice(&target.as_bytes()[q..]);
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Option<Vec<u8>> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            let v = xff.get_or_insert_with(Vec::new);
            v.extend_from_slice(h.value);
            v.extend_from_slice(b", ");
            continue;
        }
        // The client's Connection never passes (ours is added for an upgrade).
        if name.eq_ignore_ascii_case("connection")
            || headers::is_hop_by_hop(name, upgrade)
            // nginx's `underscores_in_headers off`: X_Real_IP would reach CGI-style backends
            // as HTTP_X_REAL_IP, next to (or instead of) the proxy's own X-Real-IP.
            || name.contains('_')
            || name.eq_ignore_ascii_case("x-real-ip")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("expect")
            || (named_in_connection && !pinned(name) && named_in(&req.headers[..], name))
            // absolute-form: the target's authority replaces Host (RFC 9112 §3.2.2)
            || (authority.is_some() && name.eq_ignore_ascii_case("host"))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(auth) = authority {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(auth.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let ip = cx.client.headers.real_ip.as_bytes();
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = &xff {
        out.extend_from_slice(prev);
    }
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\nx-real-ip: ");
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if matches!(body, BodyLeft::Chunked(_)) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let log = cx.log.then(|| {
        let header = |n: &str| {
            req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n)).map(|h| String::from_utf8_lossy(h.value))
        };
        RequestLine::new(
            cx.client.addr.ip(),
            format!("{} {} HTTP/1.{}", method, target, minor),
            header("referer").as_deref(),
            header("user-agent").as_deref(),
        )
    });
    Ok(Some(Parsed {
        method,
        http11,
        keep_alive,
        body,
        // HTTP/1.0 clients never get a 1xx (RFC 9110 §15.2).
        expect_continue: expect_continue && http11 && body != BodyLeft::None,
        upgrade,
        sticky,
        head_size,
        log,
    }))
}

/// The rest of an absolute-form target after `http://` or `https://` (any case).
fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        target.get(..scheme.len()).filter(|p| p.eq_ignore_ascii_case(scheme)).map(|_| &target[scheme.len()..])
    })
}

/// Headers that `Connection` cannot make hop-by-hop: dropping them would change how the
/// backend frames the message or which site it serves.
fn pinned(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("host")
}

/// Whether a `Connection` header names `name`.
fn named_in(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

/// How waiting for a request head ended, when no request came.
enum NoRequest {
    /// The client closed, idled out, or the node is draining: close quietly.
    Gone,
    /// The head did not arrive within `header_timeout`: 408.
    Timeout,
    Refused(Refusal),
}

/// Serves HTTP/1.1 requests on one client connection until it closes, errs, or the node drains
/// (`stop`). `io.buf` may already hold the start of the first request.
/// The first head must be complete by `first_deadline` (accept + `client_header_timeout`).
pub async fn serve(
    proxy: Arc<Proxy>,
    client: ClientConn,
    mut io: ClientIo,
    limits: Limits,
    stop: CancellationToken,
    first_deadline: tokio::time::Instant,
) {
    let mut first = Some(first_deadline);
    let idle = tokio::time::sleep(KEEPALIVE_TIMEOUT);
    tokio::pin!(idle);
    // The head for the backend, rewritten in place for every request.
    let mut upstream_head = Vec::with_capacity(1024);
    loop {
        // Held across the keep-alive wait: an owned Arc, not an arc-swap guard.
        let runtime = proxy.runtime.load_full();
        let cx = ParseContext {
            client: &client,
            sticky_cookie: runtime.sticky.as_ref().map(|s| s.cookie.as_str()),
            log: proxy.access_log.load().is_some(),
            max_header_bytes: limits.max_header_bytes,
        };
        let next = next_request(&cx, &mut io, limits.header_timeout, &stop, first, idle.as_mut(), &mut upstream_head);
        let parsed = match next.await {
            Ok(p) => p,
            Err(NoRequest::Gone) => return,
            Err(NoRequest::Timeout) => {
                proxy.count_error(ProxyError::HeaderTimeout);
                if write_error(&mut io, ProxyError::HeaderTimeout, &proxy, true, false).await.is_ok() {
                    linger(&mut io).await;
                }
                return;
            }
            Err(NoRequest::Refused(r)) => {
                let e = match r {
                    Refusal::TooLarge => ProxyError::HeadersTooLarge,
                    Refusal::Bad(why) => ProxyError::BadRequest(why),
                    Refusal::Unsupported(what) => ProxyError::NotImplemented(what),
                };
                proxy.count_error(e);
                tracing::debug!(client = %client.addr, error = %e.body(), "request refused");
                if write_error(&mut io, e, &proxy, true, false).await.is_ok() {
                    linger(&mut io).await;
                }
                return;
            }
        };
        first = None;
        match exchange(&proxy, &client, &mut io, parsed, &upstream_head, &stop).await {
            Ok(true) => {}
            // Answered without reading the whole body, or closing with pipelined requests
            // unanswered, or draining while the client may be sending: let it see the answer.
            Ok(false) if io.body != BodyLeft::None || !io.buf.is_empty() || stop.is_cancelled() => {
                return linger(&mut io).await;
            }
            Ok(false) | Err(_) => return,
        }
    }
}

/// Closes after an answer while the client may still be sending (nginx's lingering close):
/// closing with unread input would reset the connection, and the client could lose the answer.
/// Sends FIN, then reads and discards for a short while.
async fn linger(io: &mut ClientIo) {
    const LINGER: Duration = Duration::from_secs(1);
    const MAX_DISCARD: usize = 1 << 20;
    let _ = io.stream.shutdown().await;
    let discard = async {
        let mut scratch = [0u8; 8192];
        let mut total = 0;
        while let Ok(n) = io.stream.read(&mut scratch).await
            && n > 0
            && total < MAX_DISCARD
        {
            total += n;
        }
    };
    let _ = tokio::time::timeout(LINGER, discard).await;
}

/// Waits for the next complete request head and takes it off the buffer.
async fn next_request(
    cx: &ParseContext<'_>,
    io: &mut ClientIo,
    header_timeout: Duration,
    stop: &CancellationToken,
    first: Option<tokio::time::Instant>,
    mut idle: Pin<&mut tokio::time::Sleep>,
    upstream_head: &mut Vec<u8>,
) -> Result<Parsed, NoRequest> {
    // The first head (from accept) and any head once its first byte came must be complete
    // within header_timeout; an idle kept-alive connection waits up to KEEPALIVE_TIMEOUT.
    let mut head_deadline = first;
    loop {
        if !io.buf.is_empty() {
            match parse_request(&io.buf, cx, upstream_head) {
                Ok(Some(parsed)) => {
                    let _ = io.buf.split_to(parsed.head_size);
                    return Ok(parsed);
                }
                Ok(None) => {}
                Err(r) => return Err(NoRequest::Refused(r)),
            }
            head_deadline.get_or_insert_with(|| tokio::time::Instant::now() + header_timeout);
        }
        let read = match head_deadline {
            Some(deadline) => {
                // Draining: a connection that has not started a request is closed.
                let idle_since_accept = io.buf.is_empty();
                tokio::select! {
                    biased;
                    r = io.fill() => r,
                    _ = tokio::time::sleep_until(deadline) => return Err(NoRequest::Timeout),
                    _ = stop.cancelled(), if idle_since_accept => return Err(NoRequest::Gone),
                }
            }
            None => {
                // Re-arm the idle timer only when it is well past its start (a reset per
                // request would cost a timer-wheel update per request).
                let now = tokio::time::Instant::now();
                if idle.deadline() < now + KEEPALIVE_TIMEOUT - Duration::from_secs(10) {
                    idle.as_mut().reset(now + KEEPALIVE_TIMEOUT);
                }
                tokio::select! {
                    biased;
                    r = io.fill() => r,
                    _ = stop.cancelled() => return Err(NoRequest::Gone),
                    _ = idle.as_mut() => return Err(NoRequest::Gone),
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return Err(NoRequest::Gone),
            Ok(_) => {}
        }
    }
}

/// Forwards one request and writes its response. `Ok(true)`: the connection can carry another.
async fn exchange(
    proxy: &Proxy,
    client: &ClientConn,
    io: &mut ClientIo,
    parsed: Parsed,
    upstream_head: &[u8],
    stop: &CancellationToken,
) -> std::io::Result<bool> {
    // Only the access log needs the request's duration.
    let started = parsed.log.is_some().then(Instant::now);
    proxy.stats.requests.fetch_add(1, Relaxed);
    let runtime = proxy.runtime.load();
    io.body = parsed.body;
    let has_body = parsed.body != BodyLeft::None;
    let outgoing = Outgoing {
        method: parsed.method.clone(),
        client_head_size: parsed.head_size,
        sticky_cookie: parsed.sticky.as_deref(),
        upgrade: parsed.upgrade,
        head: upstream_head,
        chunked: matches!(parsed.body, BodyLeft::Chunked(_)),
        body: has_body.then(|| RequestBody::H1(ClientBody { io: &mut *io, expect_continue: parsed.expect_continue })),
    };
    let result = forward(proxy, &runtime, client, outgoing).await;
    // A body left unread (the request was answered without it) makes the connection unusable.
    let mut keep_alive = parsed.keep_alive && io.body == BodyLeft::None && !stop.is_cancelled();
    let (status, sent, backend) = match result {
        Err(e) => {
            keep_alive &= !matches!(e, ProxyError::HeadersTooLarge);
            write_error(io, e, proxy, !keep_alive, parsed.method == Method::HEAD).await?;
            (e.status().as_u16(), Some(e.body().len() as u64), None)
        }
        Ok(f) if f.head.status == http::StatusCode::SWITCHING_PROTOCOLS => {
            let backend = f.backend.clone();
            log(proxy, parsed.log, 101, None, Some(&backend), started);
            tunnel(io, f).await;
            return Ok(false);
        }
        // Transfer codings other than chunked cannot be expressed to an HTTP/1.0 client.
        Ok(f) if f.head.codings().is_some() && !parsed.http11 && f.head.has_body() => {
            tracing::debug!(backend = %f.backend, "transfer-coded response for an HTTP/1.0 client");
            let e = ProxyError::BadGateway;
            proxy.count_error(e);
            write_error(io, e, proxy, true, parsed.method == Method::HEAD).await?;
            keep_alive = false;
            (e.status().as_u16(), Some(e.body().len() as u64), Some(f.backend))
        }
        Ok(f) => {
            let status = f.head.status.as_u16();
            let backend = f.backend.clone();
            let (sent, reusable) =
                write_response(io, f, parsed.http11, parsed.method == Method::HEAD, keep_alive).await?;
            keep_alive &= reusable;
            (status, sent, Some(backend))
        }
    };
    log(proxy, parsed.log, status, sent, backend.as_deref(), started);
    Ok(keep_alive)
}

fn log(
    proxy: &Proxy,
    line: Option<RequestLine>,
    status: u16,
    bytes: Option<u64>,
    backend: Option<&str>,
    started: Option<Instant>,
) {
    if let (Some(line), Some(t), Some(log)) = (line, started, proxy.access_log.load().as_ref()) {
        let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        log.write(&line, status, bytes, backend, t.elapsed(), &proxy.node_id);
    }
}

/// Writes to the client within `SEND_TIMEOUT` (a client that stops reading must not hold a
/// backend connection and its in-flight count forever).
async fn send_to_client(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(SEND_TIMEOUT, stream.write_all(data)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client read nothing within 60s")),
    }
}

/// Writes one of the proxy's own answers.
async fn write_error(
    io: &mut ClientIo,
    e: ProxyError,
    proxy: &Proxy,
    close: bool,
    head_request: bool,
) -> std::io::Result<()> {
    let out = &mut io.out;
    out.clear();
    e.write_h1(out, &proxy.node_id, close, head_request);
    send_to_client(&mut io.stream, out).await
}

/// Writes the backend's response: head, then the body as it arrives (passed through for a
/// known length; chunk-encoded for HTTP/1.1 clients otherwise; until close for HTTP/1.0).
/// Returns the body bytes sent (`None` when unknown) and whether the connection stays usable.
async fn write_response(
    io: &mut ClientIo,
    f: Forwarded,
    http11: bool,
    head_request: bool,
    keep_alive: bool,
) -> std::io::Result<(Option<u64>, bool)> {
    let Forwarded { head, mut body, set_cookie, .. } = f;
    let framed_by_close = head.has_body() && !head_request && (head.is_chunked() || head.until_close());
    let chunk_to_client = framed_by_close && http11;
    let close = !keep_alive || !http11;
    let out = &mut io.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.reason());
    out.extend_from_slice(b"\r\n");
    head.write_fields(out);
    if let Some(cookie) = &set_cookie {
        out.extend_from_slice(b"set-cookie: ");
        out.extend_from_slice(cookie.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunk_to_client {
        out.extend_from_slice(b"transfer-encoding: ");
        if let Some(codings) = head.codings() {
            out.extend_from_slice(codings);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // The common small response is whole already: head and body in one write.
    if let Some(whole) = body.take_buffered() {
        out.extend_from_slice(&whole);
        send_to_client(&mut io.stream, out).await?;
        return Ok((Some(whole.len() as u64), !close));
    }
    send_to_client(&mut io.stream, out).await?;
    let mut sent = 0u64;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let data: Bytes = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Err(e) => {
                tracing::debug!(error = %e, "backend body broke off");
                // The client sees a truncated body: close (no terminating chunk is sent).
                return Ok((Some(sent), false));
            }
        };
        sent += data.len() as u64;
        if chunk_to_client {
            if data.is_empty() {
                continue;
            }
            let out = &mut io.out;
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            if data.len() <= 8192 {
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
                send_to_client(&mut io.stream, out).await?;
            } else {
                send_to_client(&mut io.stream, out).await?;
                send_to_client(&mut io.stream, &data).await?;
                send_to_client(&mut io.stream, b"\r\n").await?;
            }
        } else {
            send_to_client(&mut io.stream, &data).await?;
        }
    }
    if chunk_to_client {
        send_to_client(&mut io.stream, b"0\r\n\r\n").await?;
    }
    Ok((Some(sent), !close))
}

/// After a 101: writes the handshake answer, then copies bytes both ways until either side
/// closes. Bytes already read on either side go first.
async fn tunnel(io: &mut ClientIo, f: Forwarded) {
    let Forwarded { head, body, .. } = f;
    let out = &mut io.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 101 ");
    out.extend_from_slice(head.reason());
    out.extend_from_slice(b"\r\n");
    head.write_fields(out);
    out.extend_from_slice(b"\r\n");
    let Some((mut upstream, from_backend, in_flight)) = body.into_tunnel() else { return };
    let result = async {
        io.stream.write_all(&io.out).await?;
        io.stream.write_all(&from_backend).await?;
        upstream.write_all(&io.buf).await?;
        io.buf.clear();
        tokio::io::copy_bidirectional(&mut io.stream, &mut upstream).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(backend = %in_flight.backend().addr, error = %e, "tunnel ended with an error");
    }
    drop(in_flight);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(client: &ClientConn) -> ParseContext<'_> {
        ParseContext { client, sticky_cookie: Some("srv"), log: false, max_header_bytes: 16 * 1024 }
    }

    fn parse_into(raw: &[u8], out: &mut Vec<u8>) -> Result<Option<Parsed>, Refusal> {
        let client = ClientConn::new("10.0.0.9:5000".parse().unwrap());
        parse_request(raw, &cx(&client), out)
    }

    fn parse(raw: &[u8]) -> Result<Option<Parsed>, Refusal> {
        parse_into(raw, &mut Vec::new())
    }

    fn upstream_head(raw: &[u8]) -> String {
        let mut out = b"left from an earlier request".to_vec();
        parse_into(raw, &mut out).unwrap().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rewrites_the_head_for_the_backend() {
        let head = upstream_head(
            b"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Forwarded-For: 1.1.1.1\r\nX-Real-IP: 6.6.6.6\r\nCookie: a=1; srv=abc\r\n\r\n",
        );
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nHost: x\r\nCookie: a=1; srv=abc\r\nx-forwarded-for: 1.1.1.1, 10.0.0.9\r\nx-real-ip: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
        );
        let p = parse(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; srv=abc\r\n\r\n").unwrap().unwrap();
        assert_eq!(p.sticky.as_deref(), Some("abc"));
        assert!(p.keep_alive);
        let head = upstream_head(b"GET http://example.com:8080/p?q=1 HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: example.com:8080\r\n"), "{head}");
        let head = upstream_head(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(head.contains("Upgrade: websocket\r\n") && head.contains("connection: upgrade\r\n"), "{head}");
        let head =
            upstream_head(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n");
        assert!(!head.to_ascii_lowercase().contains("upgrade"), "h2c is not passed on: {head}");
        let head =
            upstream_head(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n");
        assert!(head.ends_with("transfer-encoding: chunked\r\n\r\n") && !head.contains("Expect"), "{head}");
    }

    #[test]
    fn refuses_ambiguous_and_malformed_heads() {
        for (raw, why) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "both"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "conflicting"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n", "invalid Content-Length"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "chunked"),
            (b"GET / HTTP/1.1\r\n\r\n", "Host"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "CONNECT"),
            (b"HELLO WORLD\r\n\r\n", "malformed"),
        ] {
            match parse(raw) {
                Err(Refusal::Bad(msg)) => assert!(msg.contains(why), "{raw:?}: {msg}"),
                other => panic!("{raw:?} must be refused, got {other:?}"),
            }
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)), "incomplete");
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
        assert_eq!(parse(big.as_bytes()).unwrap_err(), Refusal::TooLarge);
    }

    #[test]
    fn connection_cannot_drop_framing_or_host_and_authority_wins() {
        let head = upstream_head(
            b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Content-Length, Host, X-Hop\r\nX-Hop: 1\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(head.contains("Host: x\r\n") && head.contains("Content-Length: 3\r\n"), "{head}");
        assert!(!head.contains("X-Hop"), "{head}");
        let head = upstream_head(b"GET HTTP://example.test/p HTTP/1.1\r\nHost: other.test\r\n\r\n");
        assert!(head.starts_with("GET /p HTTP/1.1\r\n") && head.contains("host: example.test\r\n"), "{head}");
        assert!(!head.contains("other.test"), "absolute-form authority replaces Host: {head}");
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap_err(),
            Refusal::Unsupported("transfer codings other than chunked")
        );
        let p = parse(b"POST / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert!(!p.expect_continue, "no 1xx for HTTP/1.0 clients");
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let ka = |raw: &[u8]| parse(raw).unwrap().unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), "HTTP/1.0 clients are closed after");
    }
}
