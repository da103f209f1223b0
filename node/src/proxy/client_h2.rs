//! The client-facing HTTP/2 side (prior knowledge, h2c) through hyper's server: each request's
//! fields go through the same rules as HTTP/1.1 (`http1::rewrite`: the same dropped fields,
//! `:authority` over `Host`, one canonical framing field), a small body is read whole before
//! a backend is picked, and the response body goes back frame by frame ([`RespBody`]). A
//! connection with no open stream for `keepalive_timeout` is closed (GOAWAY); one whose client
//! takes nothing for `send_timeout` while responses wait is closed; each read of a request body
//! waits at most `client_body_timeout`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::access_log::RequestLine;
use super::error::ProxyError;
use super::forward::{self, ClientConn, Outgoing, forward};
use super::upstream::{BodySource, RequestBody, UpstreamBody};
use super::{Limits, Proxy};
use crate::http1::request::{Routed, Router};
use crate::http1::rewrite::{self, Forwarding, Framing, Target};

/// Serves an HTTP/2 connection until it ends, the node drains (`stop`), it has had no open
/// stream for `keepalive_timeout` (GOAWAY), or a response has waited for the client to take
/// it for `send_timeout` with nothing taken meanwhile (closed: the client stopped reading).
/// Each read of a request body is bounded by `client_body_timeout`.
pub async fn serve<IO>(proxy: Arc<Proxy>, conn: Conn, io: IO, limits: &Limits, stop: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (idle, send_timeout) = (limits.keepalive_timeout, limits.send_timeout);
    let streams = Arc::new(Streams::new());
    let shared = Arc::new(Shared {
        proxy,
        client: conn.client,
        scheme: conn.scheme,
        sni: conn.sni,
        streams: streams.clone(),
        request_buffer_bytes: limits.request_buffer_bytes,
        body_timeout: limits.body_timeout,
    });
    let service = service_fn(move |req| handle(shared.clone(), req));
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = loop {
        // Wake when the connection would have idled out, and at least every half send_timeout
        // (streams open and close without waking this loop), to see whether the client
        // stopped reading.
        let wait = match streams.quiet_for() {
            Some(quiet) => idle.saturating_sub(quiet),
            None => idle,
        }
        .min(send_timeout / 2);
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = tokio::time::sleep(wait) => {
                if streams.quiet_for().is_some_and(|q| q >= idle) {
                    conn.as_mut().graceful_shutdown();
                    break conn.await;
                }
                if streams.stalled_for().is_some_and(|s| s >= send_timeout) {
                    tracing::debug!("HTTP/2 client read nothing within send_timeout: closing");
                    break Ok(());
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::trace!(error = %e, "HTTP/2 client connection ended with an error");
    }
}

/// The open streams of one connection: since when none has been open, and whether responses
/// wait for the client to take them.
struct Streams {
    open: AtomicUsize,
    /// Milliseconds since `BASE` when the last stream ended (or the connection began).
    quiet_since_ms: AtomicU64,
    /// Response bodies that handed a frame to hyper and were not asked for the next one yet
    /// (waiting on the client's flow-control window, not on a backend).
    waiting_on_client: AtomicUsize,
    /// Milliseconds since `BASE` when hyper last asked any response body for a frame.
    last_taken_ms: AtomicU64,
}

static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Milliseconds since `BASE` (monotonic).
fn now_ms() -> u64 {
    BASE.elapsed().as_millis() as u64
}

impl Streams {
    /// A new connection: quiet since now.
    fn new() -> Self {
        let now = now_ms();
        Streams {
            open: AtomicUsize::new(0),
            quiet_since_ms: now.into(),
            waiting_on_client: AtomicUsize::new(0),
            last_taken_ms: now.into(),
        }
    }

    /// How long responses have waited for the client with nothing taken (`None`: none waits).
    fn stalled_for(&self) -> Option<Duration> {
        if self.waiting_on_client.load(Relaxed) == 0 {
            return None;
        }
        Some(Duration::from_millis(now_ms().saturating_sub(self.last_taken_ms.load(Relaxed))))
    }

    /// How long no stream has been open (`None` while one is).
    fn quiet_for(&self) -> Option<Duration> {
        if self.open.load(Relaxed) > 0 {
            return None;
        }
        Some(Duration::from_millis(now_ms().saturating_sub(self.quiet_since_ms.load(Relaxed))))
    }
}

/// Counts one open stream until its response body is done.
struct StreamGuard(Arc<Streams>);

impl StreamGuard {
    fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Relaxed);
        StreamGuard(streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.quiet_since_ms.store(now_ms(), Relaxed);
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// What is known of an HTTP/2 client connection when it starts.
pub struct Conn {
    pub client: ClientConn,
    /// `http` (h2c) or `https`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The name the client asked for in its TLS handshake: every request's host must be one
    /// its certificate covers (else 421).
    pub sni: Option<Box<str>>,
}

/// What every request of one connection shares.
struct Shared {
    proxy: Arc<Proxy>,
    client: ClientConn,
    /// `http` (h2c) or `https`, for `X-Forwarded-Proto`.
    scheme: &'static str,
    sni: Option<Box<str>>,
    streams: Arc<Streams>,
    request_buffer_bytes: usize,
    body_timeout: Duration,
}

/// A response body sent to the client; holds its stream's guard.
pub struct RespBody {
    inner: Inner,
    stream: StreamGuard,
    /// A frame was handed over and the next not asked for yet (counted in the connection's
    /// `waiting_on_client`).
    waiting: bool,
}

impl Drop for RespBody {
    fn drop(&mut self) {
        if self.waiting {
            self.stream.0.waiting_on_client.fetch_sub(1, Relaxed);
        }
    }
}

enum Inner {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl RespBody {
    fn new(inner: Inner, stream: StreamGuard) -> Self {
        RespBody { inner, stream, waiting: false }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let streams = &this.stream.0;
        streams.last_taken_ms.store(now_ms(), Relaxed);
        if std::mem::take(&mut this.waiting) {
            streams.waiting_on_client.fetch_sub(1, Relaxed);
        }
        let polled = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Inner::Upstream(u) => Pin::new(u).poll_frame(cx).map_err(Into::into),
        };
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !this.is_end_stream() {
            this.waiting = true;
            streams.waiting_on_client.fetch_add(1, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(u) => u.size_hint(),
        }
    }
}

/// An HTTP/2 client's request body, streamed upstream; `prefix` is what was read while trying
/// to buffer it. Each read waits at most `timeout` (`client_body_timeout`).
struct H2Body {
    body: Incoming,
    prefix: Option<Bytes>,
    timeout: Duration,
}

impl BodySource for H2Body {
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        if let Some(p) = self.prefix.take() {
            return Some(Ok(p));
        }
        loop {
            let Ok(frame) = tokio::time::timeout(self.timeout, self.body.frame()).await else {
                return Some(Err(format!("no request body data within {:?}", self.timeout)));
            };
            match frame? {
                Err(e) => return Some(Err(e.to_string())),
                Ok(frame) => match frame.into_data() {
                    Ok(data) => return Some(Ok(data)),
                    Err(_) => continue,
                },
            }
        }
    }
}

/// The proxy's own answer.
fn error_response(e: ProxyError, node: &HeaderValue, guard: StreamGuard) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::new(Inner::Full(Some(Bytes::from(e.body().into_owned()))), guard));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert("x-shoal-node", node.clone());
    if e == ProxyError::RateLimited {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// `[tls] redirect_http` on h2c: 308 to the same authority and path over https (400 without a
/// usable authority).
fn redirect_response(req: &Request<Incoming>, port: u16, node: &HeaderValue, guard: StreamGuard) -> Response<RespBody> {
    let host =
        req.uri().authority().map(|a| a.as_str().as_bytes()).or_else(|| {
            req.headers().get(header::HOST).map(HeaderValue::as_bytes).filter(|h| rewrite::is_authority(h))
        });
    let location = host.and_then(|h| {
        let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        HeaderValue::from_str(&crate::http1::request::https_location(h, port, path)).ok()
    });
    let Some(location) = location else {
        return error_response(ProxyError::BadRequest("no Host to redirect to https"), node, guard);
    };
    redirect_to(location, node, guard)
}

/// A 308 to `location`.
fn redirect_to(location: HeaderValue, node: &HeaderValue, guard: StreamGuard) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::new(Inner::Full(None), guard));
    *resp.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(header::LOCATION, location);
    resp.headers_mut().insert("x-shoal-node", node.clone());
    resp
}

/// Handles one request. Never fails: errors become responses.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<RespBody>, std::convert::Infallible> {
    let guard = StreamGuard::new(&shared.streams);
    let proxy = &shared.proxy;
    let client = &shared.client;
    let started = Instant::now();
    proxy.stats.requests.fetch_add(1, Relaxed);
    if shared.scheme == "http"
        && let Some(port) = proxy.redirect_https()
    {
        return Ok(redirect_response(&req, port, &proxy.node_id, guard));
    }
    let runtime = proxy.runtime.load();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| req.headers().get(header::HOST).map(HeaderValue::as_bytes));
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if let (Some(sni), Some(tls), Some(host)) = (&shared.sni, &proxy.tls, host)
        && !tls.serves(sni, host)
    {
        proxy.count_error(ProxyError::Misdirected);
        return Ok(error_response(ProxyError::Misdirected, &proxy.node_id, guard));
    }
    let routed = runtime.route(host.unwrap_or_default(), target);
    if let Some(origin) = routed.redirect {
        return Ok(match HeaderValue::from_str(&format!("{origin}{target}")) {
            Ok(location) => redirect_to(location, &proxy.node_id, guard),
            Err(_) => error_response(ProxyError::BadRequest("invalid request target"), &proxy.node_id, guard),
        });
    }
    let upstream = runtime.upstream(routed.route);
    let log_line = proxy.access_log.load().as_ref().as_ref().map(|_| {
        let h = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_owned);
        RequestLine::new(
            client.addr.ip(),
            // The request line as nginx logs it: the path and query, not the :authority.
            format!("{} {target} {:?}", req.method(), req.version()),
            h(header::REFERER),
            h(header::USER_AGENT),
        )
        .routed(&upstream.pool.name, runtime.route_name(routed.route))
    });
    let (resp, backend) = match forward_h2(&shared, &runtime, routed, upstream, req).await {
        Err(e) => (error_response(e, &proxy.node_id, guard), None),
        Ok((resp, backend)) => {
            let (parts, body) = resp.into_parts();
            (Response::from_parts(parts, RespBody::new(body, guard)), Some(backend))
        }
    };
    if let (Some(line), Some(log)) = (log_line, proxy.access_log.load().as_ref()) {
        let bytes = resp.body().size_hint().exact();
        log.write(&line, resp.status(), bytes, backend.as_deref(), started.elapsed(), &proxy.node_id);
    }
    Ok(resp)
}

/// A request that passed the checks, with its upstream head written (framing field to come).
struct Checked {
    head: Vec<u8>,
    length: Option<u64>,
    sticky: Option<String>,
}

/// The same field rules as HTTP/1.1 (`http1::rewrite`), plus HTTP/2's own: no CONNECT, no
/// Transfer-Encoding, `:authority` over `Host`.
fn check_h2(
    shared: &Shared,
    runtime: &super::Runtime,
    routed: Routed<'_>,
    parts: &http::request::Parts,
) -> Result<Checked, ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::NotImplemented("CONNECT is not supported"));
    }
    if head_size(parts) > shared.proxy.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    let fields: Vec<(&str, &[u8])> = parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
    let fields = fields.iter().copied();
    let inspection = rewrite::inspect(fields.clone(), routed.sticky_cookie)?;
    if inspection.te_fields > 0 {
        return Err(ProxyError::BadRequest("Transfer-Encoding in an HTTP/2 request"));
    }
    // :authority wins over Host, as the absolute-form authority does over HTTP/1.1.
    let authority = parts.uri.authority().map(|a| a.as_str());
    if authority.is_some_and(|a| !rewrite::is_authority(a.as_bytes())) {
        return Err(ProxyError::BadRequest("invalid :authority"));
    }
    if authority.is_none() && inspection.hosts == 0 {
        return Err(ProxyError::BadRequest("HTTP/2 request without :authority or Host"));
    }
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path = runtime.upstream_target(routed.route, path);
    let target = Target { method: parts.method.as_str(), path: &path, authority };
    let mut head = Vec::with_capacity(512);
    let forwarding = Forwarding { client_ip: shared.client.real_ip(), proto: shared.scheme };
    rewrite::write_head(&mut head, target, fields, &inspection, forwarding);
    Ok(Checked { head, length: inspection.length, sticky: inspection.sticky })
}

/// Checks and rewrites the request, reads a small body whole, forwards it; the response body
/// is not wrapped yet. Errors returned are counted.
async fn forward_h2(
    shared: &Shared,
    runtime: &super::Runtime,
    routed: Routed<'_>,
    upstream: &super::Upstream,
    req: Request<Incoming>,
) -> Result<(Response<Inner>, Arc<str>), ProxyError> {
    let proxy = &shared.proxy;
    let (parts, body) = req.into_parts();
    let Checked { mut head, length, sticky } = check_h2(shared, runtime, routed, &parts).inspect_err(|&e| {
        proxy.count_error(e);
    })?;
    forward::admit(proxy, upstream, &shared.client, !body.is_end_stream()).await?;
    let mut source = H2Body { body, prefix: None, timeout: shared.body_timeout };
    let (body, framing) = if source.body.is_end_stream() {
        (RequestBody::None, length.map_or(Framing::None, Framing::Length))
    } else {
        match buffer_h2(&mut source, length, shared.request_buffer_bytes).await {
            Ok(Some(data)) => {
                let n = data.len() as u64;
                (RequestBody::Buffered(data), Framing::Length(n))
            }
            Ok(None) => (RequestBody::Stream(source), length.map_or(Framing::Chunked, Framing::Length)),
            Err(e) => {
                proxy.count_error(e);
                return Err(e);
            }
        }
    };
    rewrite::finish_head(&mut head, framing);
    let outgoing = Outgoing {
        sticky_cookie: sticky.as_deref(),
        upgrade: false,
        head: &head,
        chunked: framing == Framing::Chunked,
        body: Some(body),
        method: parts.method,
    };
    let f = forward(proxy, upstream, &shared.client, outgoing).await?;
    // HTTP/2 has no transfer codings: a gzip-coded stream cannot be passed on as such.
    if f.head.codings().is_some() && f.head.has_body() {
        proxy.count_error(ProxyError::BadGateway);
        return Err(ProxyError::BadGateway);
    }
    let mut headers = f.head.header_map();
    if let Some(cookie) = f.set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.append(header::SET_COOKIE, cookie);
    }
    let mut body = f.body;
    let body = match body.take_buffered() {
        Some(whole) => Inner::Full(Some(whole)),
        None => Inner::Upstream(body),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = f.head.status;
    *resp.version_mut() = parts.version;
    *resp.headers_mut() = headers;
    Ok((resp, f.backend))
}

/// Reads a body whole if it fits `limit` (nginx's `proxy_request_buffering`): `Ok(None)` when
/// it does not, and it streams (what was read goes first, as the source's prefix).
async fn buffer_h2(source: &mut H2Body, length: Option<u64>, limit: usize) -> Result<Option<Bytes>, ProxyError> {
    if limit == 0 || length.is_some_and(|n| n as usize > limit) {
        return Ok(None);
    }
    let mut whole = BytesMut::new();
    while let Some(piece) = source.next().await {
        let piece = piece.map_err(|_| ProxyError::BadRequest("invalid or incomplete request body"))?;
        whole.extend_from_slice(&piece);
        if whole.len() > limit {
            source.prefix = Some(whole.freeze());
            return Ok(None);
        }
    }
    Ok(Some(whole.freeze()))
}

/// Size of a request head as received (pseudo-fields and fields), to enforce
/// `max_header_bytes` with Shoal's own 431.
fn head_size(parts: &http::request::Parts) -> usize {
    let line = parts.method.as_str().len() + parts.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    line + parts.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 2
}
