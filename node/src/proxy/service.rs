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
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use super::Proxy;
use super::body::{InFlight, ReqBody, RespBody, UpstreamBody};
use super::error::ProxyError;
use super::headers::{self, ClientHeaders};
use crate::balance::PickRequest;
use crate::config::AllDown;
use crate::health::{Failure, record_failure};
use crate::limit::Verdict;
use crate::pool::{Backend, PoolSnapshot, conn, now_ms};

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

/// The request as it will be sent upstream, kept replayable when it has no body.
enum Outgoing {
    /// No body: rebuilt for every attempt.
    Replayable(Parts),
    /// Has a body: can be sent once; returned by hyper if it was never written.
    Once(Option<Request<ReqBody>>),
}

impl Outgoing {
    fn take(&mut self) -> Option<Request<ReqBody>> {
        match self {
            Outgoing::Replayable(parts) => {
                let mut req = Request::new(ReqBody::Empty);
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.headers_mut() = parts.headers.clone();
                Some(req)
            }
            Outgoing::Once(r) => r.take(),
        }
    }

    fn give_back(&mut self, req: Request<ReqBody>) {
        if let Outgoing::Once(slot) = self {
            *slot = Some(req);
        }
    }

    fn available(&self) -> bool {
        match self {
            Outgoing::Replayable(_) => true,
            Outgoing::Once(r) => r.is_some(),
        }
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
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    headers::add_forwarding(&mut parts.headers, &client.headers);
    let idempotent = is_idempotent(&parts.method);
    let mut outgoing = if body.is_end_stream() && !upgrade {
        Outgoing::Replayable(parts)
    } else {
        Outgoing::Once(Some(Request::from_parts(parts, ReqBody::Incoming(body))))
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
    // error, connection closed before the request was written) costs the backends nothing, so
    // it spends none (a pool with a dead member then fails no request, even with max_fails=0).
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

        let mut upstream = match state.idle.take().await {
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
        let Some(request) = outgoing.take() else { break };
        let sent_at = Instant::now();
        let result = tokio::time::timeout(settings.read_timeout, upstream.try_send_request(request)).await;
        let mut resp = match result {
            Err(_) => {
                tracing::debug!(backend = %state.addr, "read timeout");
                record_failure(&backend.spec, state, Failure::Other);
                last_error = ProxyError::Timeout;
                continue;
            }
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    outgoing.give_back(req);
                    retry_paid = true;
                }
                tracing::debug!(backend = %state.addr, error = %e.error(), "upstream request failed");
                record_failure(&backend.spec, state, Failure::Other);
                last_error = ProxyError::BadGateway;
                continue;
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
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
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade, in_flight));
            let (parts, _) = resp.into_parts();
            return (Response::from_parts(parts, RespBody::empty()), Some(state.addr_text.clone()));
        }

        let (mut parts, body) = resp.into_parts();
        parts.version = client_version;
        headers::strip_hop_by_hop(&mut parts.headers, false);
        if let Some(sticky) = &runtime.sticky
            && sticky_cookie.as_deref() != Some(&*backend.sticky_id)
        {
            set_sticky_cookie(&mut parts.headers, sticky, backend);
        }
        let body = RespBody::Upstream(UpstreamBody::new(body, upstream, in_flight));
        return (Response::from_parts(parts, body), Some(state.addr_text.clone()));
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
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, in_flight: InFlight) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(backend = %in_flight.backend().addr, error = %e, "tunnel ended with an error");
    }
    drop(in_flight);
}
