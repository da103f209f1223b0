//! One request's path: rate limit -> headers -> pick (cluster-wide load) -> forward over a
//! pooled upstream connection -> retry on the next backend when allowed -> response.
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

use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::Proxy;
use super::body::{InFlight, RespBody};
use super::error::ProxyError;
use super::headers::{self, ClientHeaders};
use super::upstream::{self, ExchangeError, UpstreamBody};
use crate::balance::PickRequest;
use crate::config::AllDown;
use crate::health::{Failure, record_failure};
use crate::limit::Verdict;
use crate::pool::conn::{self, Upstream};
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

/// The request as it will be sent upstream: the head is rewritten once and serialised again
/// for every attempt; a body can be sent once.
struct Outgoing {
    parts: Parts,
    body: Option<Incoming>,
    /// The request has a body (sent at most once).
    has_body: bool,
    /// The body has no length: send it chunk-encoded.
    chunked: bool,
}

impl Outgoing {
    /// Whether another attempt can send the whole request.
    fn available(&self) -> bool {
        !self.has_body || self.body.is_some()
    }
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

/// Handles one client request. Never fails: errors become responses.
pub async fn handle(
    proxy: Arc<Proxy>,
    client: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, std::convert::Infallible> {
    let started = Instant::now();
    proxy.stats.requests.fetch_add(1, Relaxed);
    let log_line = proxy.access_log.load().as_ref().as_ref().map(|_| super::access_log::RequestLine::of(&req, &client));
    let (resp, backend) = forward(&proxy, &client, req).await;
    if let (Some(line), Some(log)) = (log_line, proxy.access_log.load().as_ref()) {
        log.write(&line, resp.status(), &resp, backend.as_deref(), started.elapsed(), &proxy.node_id);
    }
    Ok(resp)
}

async fn forward(
    proxy: &Proxy,
    client: &ClientConn,
    mut req: Request<Incoming>,
) -> (Response<RespBody>, Option<Arc<str>>) {
    let runtime = proxy.runtime.load();
    let error = |e: ProxyError| {
        let stat = match e {
            ProxyError::NoBackend | ProxyError::AllBusy => &proxy.stats.no_backend,
            ProxyError::BadGateway => &proxy.stats.bad_gateway,
            ProxyError::Timeout => &proxy.stats.timeouts,
            ProxyError::RateLimited => &proxy.stats.rate_limited,
            ProxyError::HeadersTooLarge => &proxy.stats.bad_requests,
        };
        stat.fetch_add(1, Relaxed);
        e.response(&proxy.node_id)
    };

    if headers::head_size(req.method(), req.uri(), req.headers()) > proxy.max_header_bytes {
        return (error(ProxyError::HeadersTooLarge), None);
    }
    if let Some(limiter) = &runtime.limiter {
        match limiter.check(client.addr.ip()) {
            Verdict::Pass => {}
            Verdict::Delay(d) => tokio::time::sleep(d).await,
            Verdict::Reject => return (error(ProxyError::RateLimited), None),
        }
    }

    let upgrade = headers::wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let sticky_cookie =
        runtime.sticky.as_ref().and_then(|s| headers::cookie_value(req.headers(), &s.cookie).map(str::to_owned));

    let (mut parts, body) = req.into_parts();
    let client_version = parts.version;
    // Host: HTTP/2 clients send :authority instead; HTTP/1 backends need a Host header.
    if !parts.headers.contains_key(header::HOST)
        && let Some(auth) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, auth);
    }
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarding(&mut parts.headers, &client.headers);
    let idempotent = is_idempotent(&parts.method);
    let has_body = !body.is_end_stream();
    let mut outgoing = Outgoing {
        chunked: has_body && !parts.headers.contains_key(header::CONTENT_LENGTH),
        parts,
        body: has_body.then_some(body),
        has_body,
    };

    let settings = &runtime.upstream;
    proxy.retry_budget.deposit(settings.retry_budget);
    let pool = proxy.pool.snapshot();
    let serving_nodes = proxy.pool.serving_nodes();
    let pick_req = PickRequest { client_ip: client.addr.ip(), sticky: sticky_cookie.as_deref() };
    let mut tried = Tried::default();
    let mut last_error = ProxyError::NoBackend;
    let mut attempt = 0;
    // The next retry is already accounted for: a status-based retry pays its budget token
    // before the response is dropped, and a retry after a failure that sent nothing (connect
    // error, a head that could not be written, a kept-alive connection the backend had closed)
    // costs the backends nothing, so it spends none (a pool with a dead member then fails no
    // request, even with max_fails=0).
    let mut retry_paid = false;
    loop {
        if attempt > 0 {
            if attempt > settings.retries || !outgoing.available() {
                break;
            }
            if !std::mem::take(&mut retry_paid) && !proxy.retry_budget.try_withdraw() {
                proxy.stats.retries_refused.fetch_add(1, Relaxed);
                break;
            }
            proxy.stats.retries.fetch_add(1, Relaxed);
        }
        attempt += 1;

        let Some(index) = pick(&pool, serving_nodes, &tried, &pick_req, &runtime, settings.when_all_down) else {
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
        let backend = &pool.backends[index];
        let state = &backend.state;
        if attempt > 1 {
            state.retries.fetch_add(1, Relaxed);
        }
        state.requests.fetch_add(1, Relaxed);
        let in_flight = InFlight::new(state);

        let mut conn = match state.idle.take() {
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
        upstream::write_head(&mut conn.write_buf, &outgoing.parts, outgoing.has_body);
        let mut body = outgoing.body.take();
        let sent_at = Instant::now();
        let exchange = upstream::exchange(&mut conn, body.as_mut(), outgoing.chunked, &outgoing.parts.method);
        let head = match tokio::time::timeout(settings.read_timeout, exchange).await {
            Ok(Ok(head)) => head,
            Err(_) => {
                tracing::debug!(backend = %state.addr, "read timeout");
                record_failure(&backend.spec, state, Failure::Other);
                last_error = ProxyError::Timeout;
                continue;
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = %state.addr, reused = conn.reused, error = %e, "upstream request failed");
                last_error = ProxyError::BadGateway;
                match e {
                    // Nothing was sent: the body (if any) is still whole.
                    ExchangeError::Unsent(_) => {
                        outgoing.body = body;
                        retry_paid = true;
                        if !conn.reused {
                            record_failure(&backend.spec, state, Failure::Other);
                        }
                    }
                    // The backend closed an idle connection as it was reused (keep-alive
                    // race): like nginx, send an idempotent request again.
                    ExchangeError::Stale if idempotent && !outgoing.has_body => retry_paid = true,
                    // The client's body broke off: not the backend's fault, and nothing to resend.
                    ExchangeError::ClientBody(_) => {}
                    _ => record_failure(&backend.spec, state, Failure::Other),
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
            && outgoing.available()
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

        if status == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_upgrade), true) = (client_upgrade, upgrade) else {
                return (error(ProxyError::BadGateway), Some(state.addr_text.clone()));
            };
            tokio::spawn(tunnel(client_upgrade, conn, in_flight));
            let mut resp = Response::new(RespBody::empty());
            *resp.status_mut() = status;
            *resp.headers_mut() = head.headers;
            return (resp, Some(state.addr_text.clone()));
        }

        let mut body = UpstreamBody::new(&head, conn, in_flight);
        let body = match body.take_buffered() {
            Some(whole) => RespBody::Full(Some(whole)),
            None => RespBody::Upstream(body),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.version_mut() = client_version;
        *resp.headers_mut() = head.headers;
        if let Some(sticky) = &runtime.sticky
            && sticky_cookie.as_deref() != Some(&*backend.sticky_id)
        {
            set_sticky_cookie(resp.headers_mut(), sticky, backend);
        }
        return (resp, Some(state.addr_text.clone()));
    }
    (error(last_error), None)
}

/// Picks among primaries, then backups; with `when_all_down = "open"`, then any untried one.
fn pick(
    snapshot: &PoolSnapshot,
    nodes: u32,
    tried: &Tried,
    req: &PickRequest,
    runtime: &super::Runtime,
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

fn set_sticky_cookie(headers: &mut http::HeaderMap, sticky: &crate::config::StickySettings, backend: &Backend) {
    let mut cookie = format!("{}={}; Path=/; HttpOnly", sticky.cookie, backend.sticky_id);
    if let Some(exp) = sticky.expires {
        cookie.push_str(&format!("; Max-Age={}", exp.as_secs()));
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Copies bytes both ways between an upgraded client and backend (WebSocket and friends).
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: Upstream, in_flight: InFlight) {
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let Upstream { mut stream, read_buf, .. } = upstream;
    // Bytes the backend sent right after its 101 belong to the new protocol.
    let result = match client.write_all(&read_buf).await {
        Ok(()) => tokio::io::copy_bidirectional(&mut client, &mut stream).await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(backend = %in_flight.backend().addr, error = %e, "tunnel ended with an error");
    }
    drop(in_flight);
}
