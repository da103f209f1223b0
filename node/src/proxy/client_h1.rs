//! The client-facing HTTP/1.1 side, run on the connection's own task: read request heads and
//! hand them to `http1::request` (which refuses what is malformed or ambiguous: 400, 431, 501,
//! each with `x-shoal-node`; a slow head gets 408), read a small body whole before a backend
//! is picked (nginx's `proxy_request_buffering`) or stream a large one, and write the backend's
//! response back. Keep-alive, pipelined requests, `Expect: 100-continue`, upgrades (a byte
//! tunnel after the 101) and draining live here. Every wait has a limit: the head
//! (`client_header_timeout`), the idle keep-alive (`keepalive_timeout`), each body read
//! (`client_body_timeout`), each write to the client (`send_timeout`), an idle tunnel
//! (`tunnel_timeout`).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Method;
use http_body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::access_log::RequestLine;
use super::error::ProxyError;
use super::forward::{self, ClientConn, Forwarded, Outgoing, forward};
use super::upstream::{BodySource, RequestBody};
use super::{Limits, Proxy};
use crate::http1::chunked::{self, Chunk, Step};
use crate::http1::request::{self, BodyFraming, Refusal, Request};
use crate::http1::response::ClientFraming;
use crate::http1::rewrite::{self, Forwarding, Framing};

/// Read buffer of a client connection (grown for large heads, up to `max_header_bytes`).
const READ_BUF: usize = 4096;

/// A client connection: the socket, bytes read and not yet consumed, the response buffer, and
/// how much of the current request's body is still unread.
pub struct ClientIo {
    pub stream: TcpStream,
    pub buf: BytesMut,
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

impl ClientIo {
    pub fn new(stream: TcpStream, buf: BytesMut, limits: &Limits) -> Self {
        ClientIo {
            stream,
            buf,
            out: Vec::with_capacity(1024),
            body: BodyLeft::None,
            send_timeout: limits.send_timeout,
            body_timeout: limits.body_timeout,
        }
    }

    /// Reads more from the client; `Ok(0)` is end of stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_BUF);
        }
        self.stream.read_buf(&mut self.buf).await
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
        self.out.clear();
        chunked::encode_size(data.len(), &mut self.out);
        let mut chunk = bytes::Buf::chain(bytes::Buf::chain(&self.out[..], data), chunked::CHUNK_END);
        tokio::time::timeout(self.send_timeout, self.stream.write_all_buf(&mut chunk))
            .await
            .unwrap_or_else(|_| Err(send_timed_out()))
    }
}

async fn send_within(stream: &mut TcpStream, data: &[u8], limit: Duration) -> std::io::Result<()> {
    tokio::time::timeout(limit, stream.write_all(data)).await.unwrap_or_else(|_| Err(send_timed_out()))
}

fn send_timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "client read nothing within send_timeout")
}

/// The body of an HTTP/1.1 client's request, sent upstream as it is read; `prefix` is what was
/// read while trying to buffer it.
pub struct ClientBody<'a> {
    io: &'a mut ClientIo,
    prefix: Option<Bytes>,
    expect_continue: bool,
}

impl BodySource for ClientBody<'_> {
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
async fn buffer_body(io: &mut ClientIo, req: &Request, limit: usize) -> Result<Buffered, String> {
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
    let idle = tokio::time::sleep(limits.keepalive_timeout);
    tokio::pin!(idle);
    // The head for the backend, rewritten in place for every request.
    let mut upstream_head = Vec::with_capacity(1024);
    loop {
        // Held across the keep-alive wait: an owned Arc, not an arc-swap guard.
        let runtime = proxy.runtime.load_full();
        let opts = request::Options {
            max_header_bytes: limits.max_header_bytes,
            sticky_cookie: runtime.sticky.as_ref().map(|s| s.cookie.as_str()),
            log: proxy.access_log.load().is_some(),
            forwarding: Forwarding { client_ip: client.real_ip.as_bytes(), proto: "http" },
        };
        let next = next_request(&opts, &mut io, &limits, &stop, first, idle.as_mut(), &mut upstream_head);
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
                let e = ProxyError::from(r);
                proxy.count_error(e);
                tracing::debug!(client = %client.addr, error = %e.body(), "request refused");
                if write_error(&mut io, e, &proxy, true, false).await.is_ok() {
                    linger(&mut io).await;
                }
                return;
            }
        };
        first = None;
        match exchange(&proxy, &client, &mut io, parsed, &mut upstream_head, &limits, &stop).await {
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
    opts: &request::Options<'_>,
    io: &mut ClientIo,
    limits: &Limits,
    stop: &CancellationToken,
    first: Option<tokio::time::Instant>,
    mut idle: Pin<&mut tokio::time::Sleep>,
    upstream_head: &mut Vec<u8>,
) -> Result<Request, NoRequest> {
    // The first head (from accept) and any head once its first byte came must be complete
    // within header_timeout; an idle kept-alive connection waits up to keepalive_timeout.
    let mut head_deadline = first;
    loop {
        if !io.buf.is_empty() {
            match request::parse(&io.buf, opts, upstream_head) {
                Ok(Some(parsed)) => {
                    let _ = io.buf.split_to(parsed.head_size);
                    return Ok(parsed);
                }
                Ok(None) => {}
                Err(r) => return Err(NoRequest::Refused(r)),
            }
            head_deadline.get_or_insert_with(|| tokio::time::Instant::now() + limits.header_timeout);
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
                // Re-arm the idle timer only when an eighth of it has passed (a reset per
                // request would cost a timer-wheel update per request).
                let now = tokio::time::Instant::now();
                let t = limits.keepalive_timeout;
                if idle.deadline() < now + t - t / 8 {
                    idle.as_mut().reset(now + t);
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
    mut parsed: Request,
    upstream_head: &mut Vec<u8>,
    limits: &Limits,
    stop: &CancellationToken,
) -> std::io::Result<bool> {
    // Only the access log needs the request's duration.
    let started = parsed.log.is_some().then(Instant::now);
    let log_line = parsed.log.take().map(|l| RequestLine::new(client.addr.ip(), l.request, l.referer, l.user_agent));
    proxy.stats.requests.fetch_add(1, Relaxed);
    let runtime = proxy.runtime.load();
    let head_request = parsed.method == Method::HEAD;
    io.body = BodyLeft::of(parsed.body);
    if let Err(e) = forward::admit(proxy, &runtime, client, io.body != BodyLeft::None).await {
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
    let result = forward(proxy, &runtime, client, outgoing).await;
    // A body left unread (the request was answered without it) makes the connection unusable.
    let mut keep_alive = parsed.keep_alive && io.body == BodyLeft::None && !stop.is_cancelled();
    let (status, sent, backend) = match result {
        Err(e) => {
            keep_alive &= !matches!(e, ProxyError::HeadersTooLarge);
            write_error(io, e, proxy, !keep_alive, head_request).await?;
            (e.status().as_u16(), Some(e.body().len() as u64), None)
        }
        Ok(f) if f.head.is_upgrade() => {
            let backend = f.backend.clone();
            log(proxy, log_line, 101, None, Some(&backend), started);
            tunnel(io, f, limits.tunnel_timeout).await;
            return Ok(false);
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
    Ok(keep_alive)
}

/// Answers with one of the proxy's own errors (counted already) before anything was forwarded;
/// `keep`: the connection stays open (no body was left unread).
async fn answer(
    proxy: &Proxy,
    io: &mut ClientIo,
    e: ProxyError,
    head_request: bool,
    log_line: Option<RequestLine>,
    started: Option<Instant>,
    keep: bool,
) -> std::io::Result<bool> {
    write_error(io, e, proxy, !keep, head_request).await?;
    log(proxy, log_line, e.status().as_u16(), Some(e.body().len() as u64), None, started);
    Ok(keep)
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
async fn write_error(
    io: &mut ClientIo,
    e: ProxyError,
    proxy: &Proxy,
    close: bool,
    head_request: bool,
) -> std::io::Result<()> {
    io.out.clear();
    e.write_h1(&mut io.out, &proxy.node_id, close, head_request);
    io.send_out().await
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
    let close = !keep_alive || !http11;
    let framing = head.write_h1(&mut io.out, set_cookie.as_deref().map(str::as_bytes), http11, head_request, close);
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

/// After a 101: writes the handshake answer, then copies bytes both ways until either side
/// closes or nothing moves for `idle` (HAProxy's `timeout tunnel`). Bytes already read on
/// either side go first.
async fn tunnel(io: &mut ClientIo, f: Forwarded, idle: Duration) {
    let Forwarded { head, body, .. } = f;
    head.write_h1(&mut io.out, None, true, false, false);
    let Some((mut upstream, from_backend, in_flight)) = body.into_tunnel() else { return };
    let result = async {
        io.send_out().await?;
        io.send(&from_backend).await?;
        tokio::time::timeout(idle, upstream.write_all(&io.buf)).await??;
        io.buf.clear();
        copy_both_ways(&mut io.stream, &mut upstream, idle).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(backend = %in_flight.backend().addr, error = %e, "tunnel ended with an error");
    }
    drop(in_flight);
}

/// Copies bytes both ways until both sides have closed, or nothing moved for `idle`.
async fn copy_both_ways(a: &mut TcpStream, b: &mut TcpStream, idle: Duration) -> std::io::Result<()> {
    const TUNNEL_BUF: usize = 8192;
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let (mut from_a, mut from_b) = (vec![0u8; TUNNEL_BUF], vec![0u8; TUNNEL_BUF]);
    let (mut a_open, mut b_open) = (true, true);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel idle");
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut from_a), if a_open => match r? {
                0 => {
                    a_open = false;
                    let _ = bw.shutdown().await;
                }
                n => tokio::time::timeout(idle, bw.write_all(&from_a[..n])).await.map_err(|_| timed_out())??,
            },
            r = br.read(&mut from_b), if b_open => match r? {
                0 => {
                    b_open = false;
                    let _ = aw.shutdown().await;
                }
                n => tokio::time::timeout(idle, aw.write_all(&from_b[..n])).await.map_err(|_| timed_out())??,
            },
            _ = tokio::time::sleep(idle) => return Err(timed_out()),
        }
    }
    Ok(())
}
