//! The client-facing HTTP/1.1 side, run on the connection's own task: read request heads and
//! hand them to `http1::request` (which refuses what is malformed or ambiguous: 400, 431, 501,
//! each with `x-shoal-node`; a slow head gets 408), read a small body whole before a backend
//! is picked (nginx's `proxy_request_buffering`) or stream a large one, and write the backend's
//! response back. Keep-alive, pipelined requests, `Expect: 100-continue`, upgrades (a byte
//! tunnel after the 101) and draining live here. Every wait has a limit: the head
//! (`client_header_timeout`), the idle keep-alive (`keepalive_timeout`), each body read
//! (`client_body_timeout`), each write to the client (`send_timeout`), an idle tunnel
//! (`tunnel_timeout`).
//!
//! Memory: between requests a connection holds its socket, the client's address and a slot in
//! the worker's `idle` registry: no buffer (they go back to `crate::buffers` when it goes idle
//! and are taken again when bytes arrive), no timer; each run of requests is a future of its
//! own, allocated while it runs, so the connection's task stays small. An upgraded tunnel
//! likewise holds no buffer between messages.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Method;
use http_body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::access_log::RequestLine;
use super::deadline::within;
use super::error::ProxyError;
use super::forward::{self, ClientConn, Forwarded, Outgoing, forward};
use super::idle::{self, Woke};
use super::stream::{ProxyStream, SniName};
use super::upstream::{BodySource, RequestBody};
use super::{Limits, Open, Proxy, Upstream};
use crate::buffers;
use crate::http1::chunked::{self, Chunk, Step};
use crate::http1::request::{self, BodyFraming, Refusal, Request};
use crate::http1::response::ClientFraming;
use crate::http1::rewrite::{self, Forwarding, Framing};
use crate::pool::InFlight;
use crate::pool::conn::UpstreamStream;

/// A client connection: the socket, bytes read and not yet consumed (the read buffer, grown
/// for large heads up to `max_header_bytes`), the response buffer, and how much of the current
/// request's body is still unread. Both buffers are empty and unallocated while idle.
struct ClientIo<S> {
    stream: S,
    buf: BytesMut,
    out: Vec<u8>,
    body: BodyLeft,
    send_timeout: Duration,
    body_timeout: Duration,
}

/// What remains of the current request body on the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLeft {
    None,
    Length(u64),
    Chunked(Chunk),
}

impl BodyLeft {
    fn of(framing: BodyFraming) -> Self {
        match framing {
            BodyFraming::None | BodyFraming::Length(0) => BodyLeft::None,
            BodyFraming::Length(n) => BodyLeft::Length(n),
            BodyFraming::Chunked => BodyLeft::Chunked(Chunk::Size),
        }
    }
}

impl<S: ProxyStream> ClientIo<S> {
    fn new(stream: S, buf: BytesMut, limits: &Limits) -> Self {
        ClientIo {
            stream,
            buf,
            out: Vec::new(),
            body: BodyLeft::None,
            send_timeout: limits.send_timeout,
            body_timeout: limits.body_timeout,
        }
    }

    /// Makes room to read into: a buffer from the worker's pool, or more room in this one.
    fn room(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = buffers::take_read();
        } else if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(buffers::SIZE);
        }
    }

    /// Reads more from the client; `Ok(0)` is end of stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.room();
        self.stream.read_buf(&mut self.buf).await
    }

    /// The response buffer, taken from the worker's pool if the connection holds none.
    fn out(&mut self) -> &mut Vec<u8> {
        if self.out.capacity() == 0 {
            self.out = buffers::take_write();
        }
        &mut self.out
    }

    /// Gives both buffers back to the worker's pool (the read buffer only if nothing in it is
    /// unread): the connection is about to wait.
    fn release(&mut self) {
        if self.buf.is_empty() {
            buffers::give_read(std::mem::take(&mut self.buf));
        }
        buffers::give_write(std::mem::take(&mut self.out));
    }

    /// The next piece of the current request body, reading within `body_timeout`.
    async fn next_body_piece(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            match self.body {
                BodyLeft::None => return None,
                BodyLeft::Length(left) if !self.buf.is_empty() => {
                    let n = (self.buf.len() as u64).min(left) as usize;
                    let data = self.buf.split_to(n).freeze();
                    self.body = if left == n as u64 { BodyLeft::None } else { BodyLeft::Length(left - n as u64) };
                    return Some(Ok(data));
                }
                BodyLeft::Length(_) => {}
                BodyLeft::Chunked(mut state) => {
                    let step = chunked::decode(&mut state, &mut self.buf);
                    self.body = BodyLeft::Chunked(state);
                    match step {
                        Err(e) => return Some(Err(e.to_string())),
                        Ok(Step::Data(data)) => return Some(Ok(data)),
                        Ok(Step::Advanced) => continue,
                        Ok(Step::End) => {
                            self.body = BodyLeft::None;
                            return None;
                        }
                        Ok(Step::NeedMore) => {}
                    }
                }
            }
            match tokio::time::timeout(self.body_timeout, self.fill()).await {
                Err(_) => return Some(Err(format!("no request body data within {:?}", self.body_timeout))),
                Ok(Ok(0)) => return Some(Err("client closed before the end of its body".into())),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Some(Err(e.to_string())),
            }
        }
    }

    /// Writes to the client within `send_timeout` (a client that stops reading must not hold
    /// a backend connection and its in-flight count forever).
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        send_within(&mut self.stream, data, self.send_timeout).await
    }

    /// Writes `self.out`.
    async fn send_out(&mut self) -> std::io::Result<()> {
        send_within(&mut self.stream, &self.out, self.send_timeout).await
    }

    /// Writes one chunk of a chunk-encoded body: size line, data and CRLF in one vectored
    /// write, without copying the data (`self.out` holds the size line).
    async fn send_chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        let out = self.out();
        out.clear();
        chunked::encode_size(data.len(), out);
        let mut chunk = bytes::Buf::chain(bytes::Buf::chain(&self.out[..], data), chunked::CHUNK_END);
        let write = async {
            self.stream.write_all_buf(&mut chunk).await?;
            self.stream.flush().await
        };
        within(self.send_timeout, write).await.unwrap_or_else(|_| Err(send_timed_out()))
    }
}

/// Writes and flushes (TLS keeps records it could not send yet; a plain socket's flush does
/// nothing).
async fn send_within<S: ProxyStream>(stream: &mut S, data: &[u8], limit: Duration) -> std::io::Result<()> {
    let write = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    within(limit, write).await.unwrap_or_else(|_| Err(send_timed_out()))
}

fn send_timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "client read nothing within send_timeout")
}

/// The body of an HTTP/1.1 client's request, sent upstream as it is read; `prefix` is what was
/// read while trying to buffer it.
pub struct ClientBody<'a, S> {
    io: &'a mut ClientIo<S>,
    prefix: Option<Bytes>,
    expect_continue: bool,
}

impl<S: ProxyStream> BodySource for ClientBody<'_, S> {
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        if std::mem::take(&mut self.expect_continue)
            && let Err(e) = self.io.send(CONTINUE).await
        {
            return Some(Err(e.to_string()));
        }
        if let Some(p) = self.prefix.take() {
            return Some(Ok(p));
        }
        self.io.next_body_piece().await
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How a request body is read before the backend is picked.
enum Buffered {
    /// The whole body.
    Whole(Bytes),
    /// The start of a body larger than the buffer; the rest streams.
    Start(Option<Bytes>),
}

/// Reads the request body whole if it fits `limit` (nginx's `proxy_request_buffering`), so a
/// slow client never holds a backend connection and an in-flight slot.
async fn buffer_body<S: ProxyStream>(io: &mut ClientIo<S>, req: &Request, limit: usize) -> Result<Buffered, String> {
    let fits = match req.body {
        BodyFraming::Length(n) => n as usize <= limit,
        BodyFraming::Chunked => limit > 0,
        BodyFraming::None => return Ok(Buffered::Whole(Bytes::new())),
    };
    if !fits {
        return Ok(Buffered::Start(None));
    }
    if req.expect_continue {
        io.send(CONTINUE).await.map_err(|e| e.to_string())?;
    }
    let mut whole = BytesMut::new();
    while let Some(piece) = io.next_body_piece().await {
        let piece = piece?;
        if whole.is_empty() && io.body == BodyLeft::None {
            // The common case: the whole body in one piece, no copy.
            return Ok(Buffered::Whole(piece));
        }
        whole.extend_from_slice(&piece);
        if whole.len() > limit {
            return Ok(Buffered::Start(Some(whole.freeze())));
        }
    }
    Ok(Buffered::Whole(whole.freeze()))
}

/// How waiting for a request head ended, when no request came.
enum NoRequest {
    /// The client closed, idled out, or the node is draining: close quietly.
    Gone,
    /// The head did not arrive within `header_timeout`: 408.
    Timeout,
    Refused(Refusal),
}

/// What a connection does after one request.
enum Next {
    /// Wait for the next request.
    KeepAlive,
    Close,
    /// The backend switched protocols: copy bytes both ways.
    Tunnel(Box<Tunnel>),
}

/// What the listener read before it knew the protocol: the start of the first request, which
/// must be complete by `deadline` (accept + `client_header_timeout`).
pub struct First {
    pub buf: BytesMut,
    pub deadline: tokio::time::Instant,
}

/// Serves HTTP/1.1 requests on one client connection (its own task) until it closes, errs, or
/// the node drains.
///
/// Between requests the task holds the socket, the client's address and a word or two: no
/// buffer, no timer (the worker's `idle` registry keeps `keepalive_timeout`), no cancellation
/// future. Each run of requests (one, or several pipelined) is a future of its own (`burst`,
/// boxed), allocated while it runs, which takes the socket and gives it back. Written as a
/// function returning an `async move` block: an `async fn` would keep a second copy of its
/// arguments in its future.
pub fn serve<S: ProxyStream>(
    open: Open,
    addr: SocketAddr,
    mut stream: S,
    first: Box<First>,
) -> impl Future<Output = ()> {
    let mut first = Some(first);
    async move {
        'conn: loop {
            let next;
            (stream, next) = {
                let mut waited = false;
                let (buf, deadline) = match first.take() {
                    // The first run of requests: its bytes are read already, its deadline
                    // runs from accept.
                    Some(f) => (f.buf, Some(f.deadline)),
                    // Idle, holding no buffer, until the client sends the start of its next
                    // request (a buffer from the worker's pool holds it); it may idle
                    // `keepalive_timeout`. Written out here, not as an `async fn`, so the
                    // wait is all this state holds.
                    // TLS may hold the next request decrypted already: read before waiting.
                    None => loop {
                        if !stream.holds_plaintext() || waited {
                            match idle::wait(stream.tcp(), open.limits.keepalive_timeout).await {
                                Ok(Woke::Readable) => {}
                                Ok(Woke::TimedOut | Woke::Closing) | Err(_) => break 'conn,
                            }
                        }
                        waited = true;
                        let mut buf = buffers::take_read();
                        match stream.try_read_buf(&mut buf) {
                            Ok(0) => break 'conn,
                            Ok(_) => break (buf, None),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buffers::give_read(buf),
                            Err(_) => break 'conn,
                        }
                    },
                };
                Box::pin(burst(&open, addr, stream, buf, deadline))
            }
            .await;
            match next {
                Next::KeepAlive => {}
                Next::Close => break 'conn,
                Next::Tunnel(t) => {
                    // Boxed: the tunnel's copying state is not part of every connection's task.
                    let tunnel = Box::pin(t.run(stream, open.limits.tunnel_timeout));
                    return tunnel.await;
                }
            }
        }
        // TLS: say so before closing (close_notify, RFC 8446 §6.1), so the client can tell the
        // end of the connection from a cut. Boxed: the idle task does not carry its state.
        if stream.holds_plaintext() {
            Box::pin(close_notify(stream)).await;
        }
    }
}

/// Sends TLS's close_notify (a plain socket's shutdown sends FIN), waiting at most a second.
async fn close_notify<S: ProxyStream>(mut stream: S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// Serves requests while the client has sent more (pipelined): from the first bytes in `buf`
/// until the connection goes idle, closes or is upgraded. Gives the socket back, and the
/// buffers back to the worker's pool.
async fn burst<S: ProxyStream>(
    open: &Open,
    addr: SocketAddr,
    stream: S,
    buf: BytesMut,
    mut head_deadline: Option<tokio::time::Instant>,
) -> (S, Next) {
    let client = ClientConn::new(addr);
    let mut io = ClientIo::new(stream, buf, &open.limits);
    let mut upstream_head = buffers::take_write();
    let next = loop {
        let next =
            request(&open.proxy, &client, &mut io, &open.limits, &open.close_idle, head_deadline, &mut upstream_head)
                .await;
        match next {
            Next::KeepAlive if !io.buf.is_empty() => head_deadline = None,
            next => break next,
        }
    };
    io.release();
    buffers::give_write(upstream_head);
    (io.stream, next)
}

/// One request, from its first bytes (already in `io.buf`) to the end of its response: the
/// head must be complete by `head_deadline` (the first request's, from accept), or within
/// `client_header_timeout` of its first bytes.
async fn request<S: ProxyStream>(
    proxy: &Proxy,
    client: &ClientConn,
    io: &mut ClientIo<S>,
    limits: &Limits,
    stop: &CancellationToken,
    head_deadline: Option<tokio::time::Instant>,
    upstream_head: &mut Vec<u8>,
) -> Next {
    // Held while the head arrives: an owned Arc, not an arc-swap guard.
    let runtime = proxy.runtime.load_full();
    // On TLS: the certificate the client's SNI chose must cover each request's host.
    let sni = SniName::of(io.stream.server_name());
    let serves = |host: &[u8]| match (&proxy.tls, &sni) {
        (Some(tls), Some(sni)) => tls.serves(sni.as_str(), host),
        _ => true,
    };
    let opts = request::Options {
        serves_host: sni.is_some().then_some(&serves as request::HostCheck<'_>),
        max_header_bytes: limits.max_header_bytes,
        router: &*runtime,
        log: proxy.access_log.load().is_some(),
        forwarding: Forwarding { client_ip: client.real_ip(), proto: io.stream.scheme() },
        redirect_https: if io.stream.holds_plaintext() { None } else { proxy.redirect_https() },
    };
    let mut parsed = match next_request(&opts, io, head_deadline, limits.header_timeout, upstream_head).await {
        Ok(p) => p,
        Err(NoRequest::Gone) => return Next::Close,
        Err(NoRequest::Timeout) => {
            proxy.count_error(ProxyError::HeaderTimeout);
            if write_error(io, ProxyError::HeaderTimeout, proxy, true, false).await.is_ok() {
                linger(io).await;
            }
            return Next::Close;
        }
        Err(NoRequest::Refused(r)) => {
            let e = ProxyError::from(r);
            proxy.count_error(e);
            tracing::debug!(client = %client.addr, error = %e.body(), "request refused");
            if write_error(io, e, proxy, true, false).await.is_ok() {
                linger(io).await;
            }
            return Next::Close;
        }
    };
    if let Some(location) = parsed.location.take() {
        return redirect(proxy, io, &parsed, &location, stop).await;
    }
    let upstream = runtime.upstream(parsed.route);
    let route = runtime.route_name(parsed.route);
    match exchange(proxy, upstream, route, client, io, parsed, upstream_head, limits, stop).await {
        Ok(Next::Close) if io.body != BodyLeft::None || !io.buf.is_empty() || stop.is_cancelled() => {
            // Answered without reading the whole body, or closing with pipelined requests
            // unanswered, or draining while the client may be sending: let it see the answer.
            linger(io).await;
            Next::Close
        }
        Ok(next) => next,
        Err(_) => Next::Close,
    }
}

/// Answers `[tls] redirect_http`: 308 to the same host and path over https (a 308 keeps the
/// method and body, unlike 301). A request body is not read: the connection closes after it.
async fn redirect<S: ProxyStream>(
    proxy: &Proxy,
    io: &mut ClientIo<S>,
    parsed: &Request,
    location: &str,
    stop: &CancellationToken,
) -> Next {
    use std::io::Write;
    proxy.stats.requests.fetch_add(1, Relaxed);
    let keep = parsed.keep_alive && !parsed.body.has_body() && !stop.is_cancelled();
    let node = proxy.node_id.as_bytes();
    let out = io.out();
    out.clear();
    let _ = write!(out, "HTTP/1.1 308 Permanent Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\n");
    out.extend_from_slice(b"x-shoal-node: ");
    out.extend_from_slice(node);
    out.extend_from_slice(if keep { b"\r\n\r\n" } else { b"\r\nconnection: close\r\n\r\n" });
    if io.send_out().await.is_err() {
        return Next::Close;
    }
    if keep {
        return Next::KeepAlive;
    }
    linger(io).await;
    Next::Close
}

/// Closes after an answer while the client may still be sending (nginx's lingering close):
/// closing with unread input would reset the connection, and the client could lose the answer.
/// Sends FIN, then reads and discards for a short while.
async fn linger<S: ProxyStream>(io: &mut ClientIo<S>) {
    const LINGER: Duration = Duration::from_secs(1);
    const MAX_DISCARD: usize = 1 << 20;
    let _ = io.stream.shutdown().await;
    let discard = async {
        let mut total = 0;
        loop {
            io.buf.clear();
            match io.fill().await {
                Ok(n) if n > 0 && total < MAX_DISCARD => total += n,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, discard).await;
}

/// Reads until the request head in `io.buf` is complete (by `deadline`, or `header_timeout`
/// after it was first found incomplete) and takes it off the buffer.
async fn next_request<S: ProxyStream>(
    opts: &request::Options<'_>,
    io: &mut ClientIo<S>,
    mut deadline: Option<tokio::time::Instant>,
    header_timeout: Duration,
    upstream_head: &mut Vec<u8>,
) -> Result<Request, NoRequest> {
    loop {
        if !io.buf.is_empty() {
            match request::parse(&io.buf, opts, upstream_head) {
                Ok(Some(parsed)) => {
                    bytes::Buf::advance(&mut io.buf, parsed.head_size);
                    return Ok(parsed);
                }
                Ok(None) => {}
                Err(r) => return Err(NoRequest::Refused(r)),
            }
        }
        // The clock starts when a head is found incomplete (a complete one, the usual case,
        // costs no clock read), unless it runs from accept already.
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + header_timeout);
        match tokio::time::timeout_at(deadline, io.fill()).await {
            Err(_) => return Err(NoRequest::Timeout),
            Ok(Ok(0) | Err(_)) => return Err(NoRequest::Gone),
            Ok(Ok(_)) => {}
        }
    }
}

/// Forwards one request and writes its response, and says what the connection does next.
#[allow(clippy::too_many_arguments)]
async fn exchange<S: ProxyStream>(
    proxy: &Proxy,
    upstream: &Upstream,
    route: Option<&Arc<str>>,
    client: &ClientConn,
    io: &mut ClientIo<S>,
    mut parsed: Request,
    upstream_head: &mut Vec<u8>,
    limits: &Limits,
    stop: &CancellationToken,
) -> std::io::Result<Next> {
    // Only the access log needs the request's duration.
    let started = parsed.log.is_some().then(Instant::now);
    let log_line = parsed.log.take().map(|l| {
        RequestLine::new(client.addr.ip(), l.request, l.referer, l.user_agent).routed(&upstream.pool.name, route)
    });
    proxy.stats.requests.fetch_add(1, Relaxed);
    let head_request = parsed.method == Method::HEAD;
    io.body = BodyLeft::of(parsed.body);
    if let Err(e) = forward::admit(proxy, upstream, client, io.body != BodyLeft::None).await {
        // Without a body to skip, the connection can carry the next request (a limited client
        // need not reconnect).
        let keep = parsed.keep_alive && io.body == BodyLeft::None && !stop.is_cancelled();
        return answer(proxy, io, e, head_request, log_line, started, keep).await;
    }
    let buffered = if io.body == BodyLeft::None {
        Ok(Buffered::Whole(Bytes::new()))
    } else {
        buffer_body(io, &parsed, limits.request_buffer_bytes).await
    };
    let (body, framing) = match buffered {
        Ok(Buffered::Whole(_)) if !parsed.body.has_body() => (RequestBody::None, parsed.body.upstream()),
        Ok(Buffered::Whole(data)) => {
            let n = data.len() as u64;
            (RequestBody::Buffered(data), Framing::Length(n))
        }
        Ok(Buffered::Start(prefix)) => {
            let framing = parsed.body.upstream();
            let expect_continue = parsed.expect_continue && prefix.is_none();
            (RequestBody::Stream(ClientBody { io: &mut *io, prefix, expect_continue }), framing)
        }
        Err(why) => {
            tracing::debug!(client = %client.addr, error = %why, "request body refused");
            let e = ProxyError::BadRequest("invalid or incomplete request body");
            proxy.count_error(e);
            return answer(proxy, io, e, head_request, log_line, started, false).await;
        }
    };
    rewrite::finish_head(upstream_head, framing);
    let outgoing = Outgoing {
        method: parsed.method.clone(),
        sticky_cookie: parsed.sticky.as_deref(),
        upgrade: parsed.upgrade,
        head: upstream_head,
        chunked: framing == Framing::Chunked,
        body: Some(body),
    };
    let result = forward(proxy, upstream, client, outgoing).await;
    // A body left unread (the request was answered without it) makes the connection unusable.
    let mut keep_alive = parsed.keep_alive && io.body == BodyLeft::None && !stop.is_cancelled();
    let (status, sent, backend) = match result {
        Err(e) => {
            keep_alive &= !matches!(e, ProxyError::HeadersTooLarge);
            write_error(io, e, proxy, !keep_alive, head_request).await?;
            (e.status().as_u16(), Some(e.body().len() as u64), None)
        }
        Ok(f) if f.head.is_upgrade() => {
            log(proxy, log_line, 101, None, Some(&f.backend), started);
            return Ok(match open_tunnel(io, f, limits.tunnel_timeout).await {
                Some(t) => Next::Tunnel(Box::new(t)),
                None => Next::Close,
            });
        }
        // Transfer codings other than chunked cannot be expressed to an HTTP/1.0 client.
        Ok(f) if f.head.codings().is_some() && !parsed.http11 && f.head.has_body() => {
            tracing::debug!(backend = %f.backend, "transfer-coded response for an HTTP/1.0 client");
            let e = ProxyError::BadGateway;
            proxy.count_error(e);
            write_error(io, e, proxy, true, head_request).await?;
            keep_alive = false;
            (e.status().as_u16(), Some(e.body().len() as u64), Some(f.backend))
        }
        Ok(f) => {
            let status = f.head.status.as_u16();
            let backend = f.backend.clone();
            let (sent, reusable) = write_response(io, f, parsed.http11, head_request, keep_alive).await?;
            keep_alive &= reusable;
            (status, sent, Some(backend))
        }
    };
    log(proxy, log_line, status, sent, backend.as_deref(), started);
    Ok(if keep_alive { Next::KeepAlive } else { Next::Close })
}

/// Answers with one of the proxy's own errors (counted already) before anything was forwarded;
/// `keep`: the connection stays open (no body was left unread).
async fn answer<S: ProxyStream>(
    proxy: &Proxy,
    io: &mut ClientIo<S>,
    e: ProxyError,
    head_request: bool,
    log_line: Option<RequestLine>,
    started: Option<Instant>,
    keep: bool,
) -> std::io::Result<Next> {
    write_error(io, e, proxy, !keep, head_request).await?;
    log(proxy, log_line, e.status().as_u16(), Some(e.body().len() as u64), None, started);
    Ok(if keep { Next::KeepAlive } else { Next::Close })
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

/// Writes one of the proxy's own answers.
async fn write_error<S: ProxyStream>(
    io: &mut ClientIo<S>,
    e: ProxyError,
    proxy: &Proxy,
    close: bool,
    head_request: bool,
) -> std::io::Result<()> {
    let out = io.out();
    out.clear();
    e.write_h1(out, &proxy.node_id, close, head_request);
    io.send_out().await
}

/// Writes the backend's response: head, then the body as it arrives (passed through for a
/// known length; chunk-encoded for HTTP/1.1 clients otherwise; until close for HTTP/1.0).
/// Returns the body bytes sent (`None` when unknown) and whether the connection stays usable.
async fn write_response<S: ProxyStream>(
    io: &mut ClientIo<S>,
    f: Forwarded,
    http11: bool,
    head_request: bool,
    keep_alive: bool,
) -> std::io::Result<(Option<u64>, bool)> {
    let Forwarded { head, mut body, set_cookie, .. } = f;
    let close = !keep_alive || !http11;
    let framing = head.write_h1(io.out(), set_cookie.as_deref().map(str::as_bytes), http11, head_request, close);
    let close = close || framing == ClientFraming::Close;
    // The common small response is whole already: head and body in one write.
    if let Some(whole) = body.take_buffered() {
        io.out.extend_from_slice(&whole);
        io.send_out().await?;
        return Ok((Some(whole.len() as u64), !close));
    }
    io.send_out().await?;
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
        if framing != ClientFraming::Chunk {
            io.send(&data).await?;
        } else if !data.is_empty() {
            io.send_chunk(&data).await?;
        }
    }
    if framing == ClientFraming::Chunk {
        io.send(chunked::LAST_CHUNK).await?;
    }
    Ok((Some(sent), !close))
}

/// An upgraded connection's other side: the backend's stream and the request's in-flight
/// guard, held until the tunnel closes.
struct Tunnel {
    upstream: UpstreamStream,
    in_flight: InFlight,
}

/// After a 101: writes the handshake answer and passes on the bytes already read on either
/// side (they belong to the new protocol). `None`: either side is gone already.
async fn open_tunnel<S: ProxyStream>(io: &mut ClientIo<S>, f: Forwarded, idle: Duration) -> Option<Tunnel> {
    let Forwarded { head, body, .. } = f;
    head.write_h1(io.out(), None, true, false, false);
    let (mut upstream, from_backend, in_flight) = body.into_tunnel()?;
    let result = async {
        io.send_out().await?;
        io.send(&from_backend).await?;
        tokio::time::timeout(idle, upstream.write_all(&io.buf)).await??;
        io.buf.clear();
        Ok::<_, std::io::Error>(())
    }
    .await;
    match result {
        Ok(()) => Some(Tunnel { upstream, in_flight }),
        Err(e) => {
            tracing::debug!(backend = %in_flight.backend().addr, error = %e, "tunnel ended with an error");
            None
        }
    }
}

impl Tunnel {
    /// Copies bytes both ways until either side closes or nothing moves for `idle`
    /// (HAProxy's `timeout tunnel`).
    async fn run<S: ProxyStream>(mut self: Box<Self>, mut client: S, idle: Duration) {
        if let Err(e) = copy_both_ways(&mut client, &mut self.upstream, idle).await {
            tracing::debug!(backend = %self.in_flight.backend().addr, error = %e, "tunnel ended with an error");
        }
    }
}

/// Copies bytes both ways until both sides have closed, or nothing moved for `idle`. Between
/// messages nothing is held but the two sockets and a timer: a buffer is taken from the
/// worker's pool only once a side is readable, and given back once its bytes are written.
async fn copy_both_ways<A: ProxyStream, B: ProxyStream>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<()> {
    let (mut a_open, mut b_open) = (true, true);
    // TLS: after a read, more may wait decrypted inside the stream; read again before waiting.
    let (mut a_again, mut b_again) = (false, false);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    while a_open || b_open {
        let from_a = if a_again && a_open {
            true
        } else if b_again && b_open {
            false
        } else {
            tokio::select! {
                r = a.tcp().readable(), if a_open => r.map(|()| true)?,
                r = b.tcp().readable(), if b_open => r.map(|()| false)?,
                _ = timer.as_mut() => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel idle")),
            }
        };
        let moved = if from_a { pass(a, b, &mut a_open, idle).await? } else { pass(b, a, &mut b_open, idle).await? };
        a_again = a.holds_plaintext() && from_a && moved;
        b_again = b.holds_plaintext() && !from_a && moved;
        // Re-arm the idle timer only when an eighth of it has passed.
        let now = tokio::time::Instant::now();
        if moved && timer.deadline() < now + idle - idle / 8 {
            timer.as_mut().reset(now + idle);
        }
    }
    Ok(())
}

/// Moves what `from` holds now to `to` (or passes on its end of stream: `open` turns false).
/// `Ok(false)`: nothing was there after all.
async fn pass<F: ProxyStream, T: ProxyStream>(
    from: &mut F,
    to: &mut T,
    open: &mut bool,
    idle: Duration,
) -> std::io::Result<bool> {
    let mut buf = buffers::take_write();
    let read = from.try_read_buf(&mut buf);
    let result = match read {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
        Ok(0) => {
            *open = false;
            let _ = to.shutdown().await;
            Ok(true)
        }
        Ok(n) => match within(idle, send_all(to, &buf[..n])).await {
            Ok(written) => written.map(|()| true),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel peer read nothing")),
        },
    };
    buffers::give_write(buf);
    result
}

async fn send_all<S: ProxyStream>(to: &mut S, data: &[u8]) -> std::io::Result<()> {
    to.write_all(data).await?;
    to.flush().await
}
