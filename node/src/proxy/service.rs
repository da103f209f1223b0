//! One request's path, whichever protocol it came on: size and rate checks -> pick
//! (cluster-wide load) -> exchange over a pooled upstream connection -> retry on the next
//! backend when allowed -> a [`Forwarded`] response (or a [`ProxyError`]) for the client side
//! to write. `h1` feeds it HTTP/1.1 requests; [`handle`] feeds it hyper's (HTTP/2) ones.
//!
//! Retries (nginx `proxy_next_upstream`): a connect error or connect timeout always moves to
//! the next backend, since nothing was sent. After sending, only a request without a body can
//! be replayed: on a broken connection, a read timeout, or a status listed in `retry_on` when
//! the method is idempotent. Every retry of a request that reached a backend spends from the
//! [`RetryBudget`](super::RetryBudget); one after a failure that sent nothing is free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::{Body as _, Incoming};

use super::body::{InFlight, RespBody};
use super::error::ProxyError;
use super::headers::{self, ClientHeaders};
use super::upstream::{self, ExchangeError, RequestBody, ResponseHead, UpstreamBody};
use super::{Proxy, Runtime};
use crate::balance::PickRequest;
use crate::config::AllDown;
use crate::health::{Failure, record_failure};
use crate::limit::Verdict;
use crate::pool::conn;
use crate::pool::{Backend, PoolSnapshot, now_ms};

/// What is known about the client connection a request came on.
pub struct ClientConn {
    pub addr: SocketAddr,
    pub headers: ClientHeaders,
}

impl ClientConn {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = addr.ip().to_canonical();
        let real_ip = HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ClientConn { addr: SocketAddr::new(ip, addr.port()), headers: ClientHeaders { real_ip } }
    }
}

/// A request on its way upstream: its head, serialised once and written again on every
/// attempt, and its body, which can be sent once.
pub struct Outgoing<'a> {
    pub method: Method,
    /// Size of the head as the client sent it (for `max_header_bytes`).
    pub client_head_size: usize,
    /// The sticky cookie's value, if the client sent one.
    pub sticky_cookie: Option<&'a str>,
    /// The client asked for a protocol upgrade (WebSocket).
    pub upgrade: bool,
    /// The upstream request head (see `upstream::write_head`).
    pub head: &'a [u8],
    pub body: Option<RequestBody<'a>>,
    /// The body has no length: it goes upstream chunk-encoded.
    pub chunked: bool,
}

impl Outgoing<'_> {
    /// Whether another attempt can send the whole request.
    fn available(&self, has_body: bool) -> bool {
        !has_body || self.body.is_some()
    }
}

/// A backend's answer, ready for the client side.
pub struct Forwarded {
    pub head: ResponseHead,
    /// The body (for a `101`, the connection to tunnel).
    pub body: UpstreamBody,
    /// The backend that answered, for the access log.
    pub backend: Arc<str>,
    /// A sticky cookie to set.
    pub set_cookie: Option<String>,
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// A small set of tried backend indexes (the first 128; beyond that none are excluded).
#[derive(Default, Clone, Copy)]
struct Tried(u128);

impl Tried {
    fn add(&mut self, i: usize) {
        if i < 128 {
            self.0 |= 1 << i;
        }
    }
    fn has(&self, i: usize) -> bool {
        i < 128 && self.0 & (1 << i) != 0
    }
}

impl Proxy {
    /// Counts an answer the proxy gives itself, by cause.
    pub fn count_error(&self, e: ProxyError) {
        let stat = match e {
            ProxyError::NoBackend | ProxyError::AllBusy => &self.stats.no_backend,
            ProxyError::BadGateway => &self.stats.bad_gateway,
            ProxyError::Timeout => &self.stats.timeouts,
            ProxyError::RateLimited => &self.stats.rate_limited,
            ProxyError::HeadersTooLarge
            | ProxyError::BadRequest(_)
            | ProxyError::HeaderTimeout
            | ProxyError::NotImplemented(_) => &self.stats.bad_requests,
        };
        stat.fetch_add(1, Relaxed);
    }
}

/// Forwards one request: checks, picks, exchanges, retries. The error is counted already.
pub async fn forward(
    proxy: &Proxy,
    runtime: &Runtime,
    client: &ClientConn,
    mut outgoing: Outgoing<'_>,
) -> Result<Forwarded, ProxyError> {
    let result = attempts(proxy, runtime, client, &mut outgoing).await;
    if let Err(e) = result {
        proxy.count_error(e);
    }
    result
}

async fn attempts(
    proxy: &Proxy,
    runtime: &Runtime,
    client: &ClientConn,
    outgoing: &mut Outgoing<'_>,
) -> Result<Forwarded, ProxyError> {
    if outgoing.client_head_size > proxy.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    if let Some(limiter) = &runtime.limiter {
        match limiter.check(client.addr.ip()) {
            Verdict::Pass => {}
            Verdict::Delay(d) => tokio::time::sleep(d).await,
            Verdict::Reject => return Err(ProxyError::RateLimited),
        }
    }
    let idempotent = is_idempotent(&outgoing.method);
    let has_body = outgoing.body.is_some();
    let settings = &runtime.upstream;
    proxy.retry_budget.deposit(settings.retry_budget);
    let pool = proxy.pool.snapshot();
    let serving_nodes = proxy.pool.serving_nodes();
    let pick_req = PickRequest { client_ip: client.addr.ip(), sticky: outgoing.sticky_cookie };
    let mut tried = Tried::default();
    let mut last_error = ProxyError::NoBackend;
    let mut attempt = 0;
    // The next retry is already accounted for: a status-based retry pays its budget token
    // before the response is dropped, and a retry after a failure that sent nothing (connect
    // error, a head that could not be written, a kept-alive connection the backend had closed)
    // costs the backends nothing, so it spends none (a pool with a dead member then fails no
    // request, even with max_fails=0).
    let mut retry_paid = false;
    // A backend to send to again on a new connection (its kept-alive one was stale), once.
    let mut fresh_on: Option<usize> = None;
    let mut fresh_retried = false;
    loop {
        // The same backend again on a new connection: not a new attempt.
        let again = fresh_on.take();
        fresh_retried |= again.is_some();
        let index = match again {
            Some(index) => index,
            None => {
                if attempt > 0 {
                    if attempt > settings.retries || !outgoing.available(has_body) {
                        break;
                    }
                    if !std::mem::take(&mut retry_paid) && !proxy.retry_budget.try_withdraw() {
                        proxy.stats.retries_refused.fetch_add(1, Relaxed);
                        break;
                    }
                    proxy.stats.retries.fetch_add(1, Relaxed);
                }
                attempt += 1;
                let Some(index) = pick(&pool, serving_nodes, &tried, &pick_req, runtime, settings.when_all_down) else {
                    if attempt == 1 {
                        last_error = if pool.backends.iter().any(|b| b.state.is_healthy(now_ms())) {
                            ProxyError::AllBusy
                        } else {
                            ProxyError::NoBackend
                        };
                    }
                    break;
                };
                tried.add(index);
                if attempt > 1 {
                    pool.backends[index].state.retries.fetch_add(1, Relaxed);
                }
                pool.backends[index].state.requests.fetch_add(1, Relaxed);
                index
            }
        };
        let backend = &pool.backends[index];
        let state = &backend.state;
        let in_flight = InFlight::new(state);

        let idle = if again.is_some() { None } else { state.idle.take() };
        let mut conn = match idle {
            Some(c) => c,
            None => match conn::connect(state.addr, settings.connect_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(backend = %state.addr, error = %e, "connect failed");
                    let kind = if matches!(e, conn::ConnectError::Io(..)) { Failure::Connect } else { Failure::Other };
                    record_failure(&backend.spec, state, kind);
                    retry_paid = true;
                    last_error = if matches!(e, conn::ConnectError::Timeout(_)) {
                        ProxyError::Timeout
                    } else {
                        ProxyError::BadGateway
                    };
                    continue;
                }
            },
        };
        let mut body = outgoing.body.take();
        let sent_at = Instant::now();
        let exchange = upstream::exchange(
            &mut conn,
            outgoing.head,
            body.as_mut(),
            outgoing.chunked,
            &outgoing.method,
            settings.read_timeout,
        );
        let head = match exchange.await {
            Ok(head) => head,
            Err(e) => {
                tracing::debug!(backend = %state.addr, reused = conn.reused, error = %e, "upstream request failed");
                last_error = ProxyError::BadGateway;
                match e {
                    // A kept-alive connection the backend had closed (keep-alive race): the
                    // backend is fine; send again to it on a new connection, once, for free.
                    // After a Stale read that is safe only for idempotent requests without a
                    // body (the backend may have seen it); after an Unsent write always.
                    ExchangeError::Unsent(_) if conn.reused && !fresh_retried => {
                        outgoing.body = body;
                        fresh_on = Some(index);
                    }
                    ExchangeError::Stale if idempotent && !has_body && !fresh_retried => fresh_on = Some(index),
                    ExchangeError::Stale => break,
                    // Nothing was sent on a new connection: the next backend, free.
                    ExchangeError::Unsent(_) => {
                        outgoing.body = body;
                        retry_paid = true;
                        record_failure(&backend.spec, state, Failure::Other);
                    }
                    // The client's body broke off, stalled or was malformed: not the backend's
                    // fault, and nothing to resend.
                    ExchangeError::ClientBody(_) => {
                        return Err(ProxyError::BadRequest("invalid or incomplete request body"));
                    }
                    // The request reached the backend: only an idempotent one is sent again
                    // (nginx's default; a POST is never replayed).
                    e => {
                        record_failure(&backend.spec, state, Failure::Other);
                        if matches!(e, ExchangeError::Timeout) {
                            last_error = ProxyError::Timeout;
                        }
                        if !idempotent {
                            break;
                        }
                    }
                }
                continue;
            }
        };
        let status = head.status;
        state.latency.record(sent_at.elapsed());
        if status.is_server_error()
            && settings.retry_on.contains(&status.as_u16())
            && idempotent
            && attempt <= settings.retries
            && outgoing.available(has_body)
        {
            record_failure(&backend.spec, state, Failure::Other);
            // Retry only if the budget allows; otherwise the backend's own answer goes back.
            if proxy.retry_budget.try_withdraw() {
                retry_paid = true;
                last_error = ProxyError::BadGateway;
                continue;
            }
            proxy.stats.retries_refused.fetch_add(1, Relaxed);
        }
        state.responses[(status.as_u16() / 100).clamp(1, 5) as usize - 1].fetch_add(1, Relaxed);
        if status == StatusCode::SWITCHING_PROTOCOLS && !outgoing.upgrade {
            return Err(ProxyError::BadGateway);
        }
        let set_cookie = runtime
            .sticky
            .as_ref()
            .filter(|_| outgoing.sticky_cookie != Some(&*backend.sticky_id))
            .map(|s| sticky_cookie(s, backend));
        let body = UpstreamBody::new(&head, conn, in_flight, settings.read_timeout);
        return Ok(Forwarded { head, body, backend: state.addr_text.clone(), set_cookie });
    }
    Err(last_error)
}

/// Handles one request that came through hyper (HTTP/2 clients). Never fails: errors become
/// responses.
pub async fn handle(
    proxy: Arc<Proxy>,
    client: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, std::convert::Infallible> {
    let started = Instant::now();
    proxy.stats.requests.fetch_add(1, Relaxed);
    let runtime = proxy.runtime.load();
    let log_line = proxy.access_log.load().as_ref().as_ref().map(|_| super::access_log::RequestLine::of(&req, &client));
    let sticky =
        runtime.sticky.as_ref().and_then(|s| headers::cookie_value(req.headers(), &s.cookie).map(str::to_owned));
    let client_head_size = headers::head_size(req.method(), req.uri(), req.headers());
    let (mut parts, body) = req.into_parts();
    // HTTP/2 clients send :authority instead of Host; HTTP/1 backends need a Host header.
    if !parts.headers.contains_key(header::HOST)
        && let Some(auth) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, auth);
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::add_forwarding(&mut parts.headers, &client.headers);
    let has_body = !body.is_end_stream();
    let mut head = Vec::with_capacity(512);
    upstream::write_head(&mut head, &parts, has_body);
    let outgoing = Outgoing {
        client_head_size,
        sticky_cookie: sticky.as_deref(),
        upgrade: false,
        head: &head,
        chunked: has_body && !parts.headers.contains_key(header::CONTENT_LENGTH),
        body: has_body.then_some(RequestBody::Hyper(body)),
        method: parts.method,
    };
    let (resp, backend) = match forward(&proxy, &runtime, &client, outgoing).await {
        Err(e) => (e.response(&proxy.node_id), None),
        // HTTP/2 has no transfer codings: a gzip-coded stream cannot be passed on as such.
        Ok(f) if f.head.codings().is_some() && f.head.has_body() => {
            proxy.count_error(ProxyError::BadGateway);
            (ProxyError::BadGateway.response(&proxy.node_id), Some(f.backend))
        }
        Ok(f) => {
            let mut headers = f.head.header_map();
            if let Some(cookie) = f.set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
                headers.append(header::SET_COOKIE, cookie);
            }
            let mut body = f.body;
            let body = match body.take_buffered() {
                Some(whole) => RespBody::Full(Some(whole)),
                None => RespBody::Upstream(body),
            };
            let mut resp = Response::new(body);
            *resp.status_mut() = f.head.status;
            *resp.version_mut() = parts.version;
            *resp.headers_mut() = headers;
            (resp, Some(f.backend))
        }
    };
    if let (Some(line), Some(log)) = (log_line, proxy.access_log.load().as_ref()) {
        let bytes = resp.body().size_hint().exact();
        log.write(&line, resp.status(), bytes, backend.as_deref(), started.elapsed(), &proxy.node_id);
    }
    Ok(resp)
}

/// Picks among primaries, then backups; with `when_all_down = "open"`, then any untried one.
fn pick(
    snapshot: &PoolSnapshot,
    nodes: u32,
    tried: &Tried,
    req: &PickRequest,
    runtime: &Runtime,
    all_down: AllDown,
) -> Option<usize> {
    let now = now_ms();
    let backends = &snapshot.backends;
    let usable = |i: usize, backup: bool| {
        let b = &backends[i];
        b.spec.backup == backup && !tried.has(i) && b.accepts(now, nodes)
    };
    runtime
        .picker
        .pick(snapshot, &|i| usable(i, false), req)
        .or_else(|| runtime.picker.pick(snapshot, &|i| usable(i, true), req))
        .or_else(|| {
            (all_down == AllDown::Open && !backends.iter().any(|b| b.accepts(now, nodes)))
                .then(|| {
                    runtime.picker.pick(
                        snapshot,
                        &|i| !tried.has(i) && !backends[i].state.health.draining.load(Relaxed),
                        req,
                    )
                })
                .flatten()
        })
}

/// The `Set-Cookie` value that pins a client to `backend`.
fn sticky_cookie(sticky: &crate::config::StickySettings, backend: &Backend) -> String {
    let mut cookie = format!("{}={}; Path=/; HttpOnly", sticky.cookie, backend.sticky_id);
    if let Some(exp) = sticky.expires {
        cookie.push_str(&format!("; Max-Age={}", exp.as_secs()));
    }
    cookie
}
