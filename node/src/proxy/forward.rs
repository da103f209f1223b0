//! One request's path, whichever protocol it came on: size and rate checks -> pick
//! (cluster-wide load) -> exchange over a pooled upstream connection -> retry on the next
//! backend when allowed -> a [`Forwarded`] response (or a [`ProxyError`]) for the client side
//! to write. `client_h1` and `client_h2` feed it requests whose upstream head is written.
//!
//! Retries (nginx `proxy_next_upstream`): a connect error or connect timeout always moves to
//! the next backend, since nothing was sent. After sending, only a request without a body or
//! with a buffered one can be replayed: on a broken connection, a read timeout, or a status listed in `retry_on` when
//! the method is idempotent. Every retry of a request that reached a backend spends from the
//! [`RetryBudget`](super::RetryBudget); one after a failure that sent nothing is free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use http::{Method, StatusCode};

use super::error::ProxyError;
use super::upstream::{self, BodySource, ExchangeError, RequestBody, UpstreamBody};
use super::{Proxy, Upstream};
use crate::balance::PickRequest;
use crate::config::AllDown;
use crate::health::{Failure, record_failure};
use crate::http1::response::ResponseHead;
use crate::limit::Verdict;
use crate::pool::conn;
use crate::pool::{Backend, InFlight, PoolSnapshot, now_ms};

/// What is known about the client connection a request came on.
pub struct ClientConn {
    pub addr: SocketAddr,
    /// The client's address as the forwarding fields carry it (`real_ip()`), written out once
    /// per connection (HTTP/2) or run of requests (HTTP/1.1), with no allocation.
    ip_text: [u8; IP_TEXT],
    ip_len: u8,
}

/// The longest IP address text: a full IPv6 address (IPv4-mapped ones are written as IPv4).
const IP_TEXT: usize = 39;

impl ClientConn {
    pub fn new(addr: SocketAddr) -> Self {
        use std::io::Write;
        let ip = addr.ip().to_canonical();
        let mut ip_text = [0u8; IP_TEXT];
        let ip_len = match ip {
            // The common case without the formatting machinery (this runs per run of requests).
            std::net::IpAddr::V4(v4) => {
                let mut n = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        ip_text[n] = b'.';
                        n += 1;
                    }
                    let (h, t, u) = (octet / 100, octet / 10 % 10, octet % 10);
                    if h > 0 {
                        ip_text[n] = b'0' + h;
                        n += 1;
                    }
                    if h > 0 || t > 0 {
                        ip_text[n] = b'0' + t;
                        n += 1;
                    }
                    ip_text[n] = b'0' + u;
                    n += 1;
                }
                n as u8
            }
            std::net::IpAddr::V6(_) => {
                let mut out = &mut ip_text[..];
                match write!(out, "{ip}") {
                    Ok(()) => (IP_TEXT - out.len()) as u8,
                    Err(_) => 0,
                }
            }
        };
        ClientConn { addr: SocketAddr::new(ip, addr.port()), ip_text, ip_len }
    }

    /// The client's IP address as text (`X-Forwarded-For`, `X-Real-IP`).
    pub fn real_ip(&self) -> &[u8] {
        &self.ip_text[..self.ip_len as usize]
    }
}

/// A request on its way upstream: its head, serialised once and written again on every
/// attempt, and its body, which can be sent once.
pub struct Outgoing<'a, S> {
    pub method: Method,
    /// The sticky cookie's value, if the client sent one.
    pub sticky_cookie: Option<&'a str>,
    /// The client asked for a protocol upgrade (WebSocket).
    pub upgrade: bool,
    /// The upstream request head (`http1::rewrite::write_head` + `finish_head`).
    pub head: &'a [u8],
    /// `None` once a streamed body was sent (it cannot be sent again).
    pub body: Option<RequestBody<S>>,
    /// A streamed body has no length: it goes upstream chunk-encoded.
    pub chunked: bool,
}

impl<S> Outgoing<'_, S> {
    /// Whether another attempt can send the whole request.
    fn available(&self) -> bool {
        self.body.is_some()
    }
}

/// A backend's answer, ready for the client side.
pub struct Forwarded {
    pub head: ResponseHead,
    /// The body (for a `101`, the connection to tunnel).
    pub body: UpstreamBody,
    /// The backend that answered, for the access log.
    pub backend: Arc<str>,
    /// Its pool, for the access log.
    pub pool: Arc<str>,
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
            ProxyError::HeadersTooLarge => &self.stats.headers_too_large,
            ProxyError::BadRequest(_) | ProxyError::Misdirected => &self.stats.bad_requests,
            ProxyError::HeaderTimeout => &self.stats.header_timeouts,
            ProxyError::NotImplemented(_) => &self.stats.not_implemented,
        };
        stat.fetch_add(1, Relaxed);
    }
}

/// Admits a request before its body is read: the rate limiter passes, delays or rejects it,
/// and with `body` a request finds no usable backend at all is answered now, so neither a
/// limited client's body nor one nobody can take is read. The error is counted already.
pub async fn admit(proxy: &Proxy, upstream: &Upstream, client: &ClientConn, body: bool) -> Result<(), ProxyError> {
    let verdict = upstream.limiter.as_ref().map_or(Verdict::Pass, |l| l.check(client.addr.ip()));
    let result = match verdict {
        Verdict::Pass => Ok(()),
        Verdict::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Verdict::Reject => Err(ProxyError::RateLimited),
    }
    .and_then(|()| if body { usable_now(proxy, upstream) } else { Ok(()) });
    if let Err(e) = result {
        proxy.count_error(e);
    }
    result
}

/// Whether some backend could take a request now (no side effects on the pickers).
fn usable_now(proxy: &Proxy, upstream: &Upstream) -> Result<(), ProxyError> {
    let pool = upstream.pool.snapshot();
    let (now, nodes) = (now_ms(), proxy.serving_nodes());
    if pool.backends.iter().any(|b| b.accepts(now, nodes)) {
        return Ok(());
    }
    let open = upstream.settings.when_all_down == AllDown::Open;
    if open && pool.backends.iter().any(|b| !b.state.health.draining.load(Relaxed)) {
        return Ok(());
    }
    Err(none_usable(&pool, now))
}

/// Why no backend of `pool` could be picked: every healthy one is at `max_conns` (all busy),
/// or none is healthy.
fn none_usable(pool: &PoolSnapshot, now: u64) -> ProxyError {
    if pool.backends.iter().any(|b| b.state.is_healthy(now)) { ProxyError::AllBusy } else { ProxyError::NoBackend }
}

/// Forwards one request (admitted already): picks, exchanges, retries. The error is counted
/// already.
pub async fn forward<S: BodySource>(
    proxy: &Proxy,
    upstream: &Upstream,
    client: &ClientConn,
    mut outgoing: Outgoing<'_, S>,
) -> Result<Forwarded, ProxyError> {
    let result = attempts(proxy, upstream, client, &mut outgoing).await;
    if let Err(e) = result {
        proxy.count_error(e);
    }
    result
}

async fn attempts<S: BodySource>(
    proxy: &Proxy,
    upstream: &Upstream,
    client: &ClientConn,
    outgoing: &mut Outgoing<'_, S>,
) -> Result<Forwarded, ProxyError> {
    let idempotent = is_idempotent(&outgoing.method);
    let settings = &upstream.settings;
    proxy.retry_budget.deposit(settings.retry_budget);
    let pool = upstream.pool.snapshot();
    let serving_nodes = proxy.serving_nodes();
    // `now_ms` is read once per attempt, for both eligibility and the picker.
    let mut pick_req = PickRequest { client_ip: client.addr.ip(), sticky: outgoing.sticky_cookie, now_ms: 0 };
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
                pick_req.now_ms = now_ms();
                let Some(index) = pick(&pool, serving_nodes, &tried, &pick_req, upstream) else {
                    if attempt == 1 {
                        last_error = none_usable(&pool, pick_req.now_ms);
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
            None => match conn::connect(state.addr, settings.connect_timeout, upstream.tls.as_deref()).await {
                Ok(c) => c,
                Err(e) => {
                    if matches!(e, conn::ConnectError::Tls(..)) {
                        // A certificate that does not verify is the operator's to fix: say why.
                        tracing::warn!(pool = %state.pool, backend = %state.addr, error = %e, "TLS to the backend failed");
                    } else {
                        tracing::debug!(backend = %state.addr, error = %e, "connect failed");
                    }
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
        let Some(mut body) = outgoing.body.take() else { break };
        let sent_at = Instant::now();
        let exchange = upstream::exchange(
            &mut conn,
            outgoing.head,
            &mut body,
            outgoing.chunked,
            outgoing.method == Method::HEAD,
            settings.read_timeout,
        );
        // A body that can be sent again goes back for the next attempt.
        let keep_body = |body: RequestBody<S>| match body {
            RequestBody::Stream(_) => None,
            whole => Some(whole),
        };
        let result = exchange.await;
        // Sent at least in part: a streamed body cannot go again, except after Unsent.
        let resend = if matches!(result, Err(ExchangeError::Unsent(_))) { Some(body) } else { keep_body(body) };
        let head = match result {
            Ok(head) => {
                outgoing.body = resend;
                head
            }
            Err(e) => {
                tracing::debug!(backend = %state.addr, reused = conn.reused, error = %e, "upstream request failed");
                last_error = ProxyError::BadGateway;
                match e {
                    // A kept-alive connection the backend had closed (keep-alive race): the
                    // backend is fine; send again to it on a new connection, once, for free.
                    // After a Stale read that is safe only for idempotent requests whose body,
                    // if any, was buffered (the backend may have seen it); after an Unsent
                    // write always.
                    ExchangeError::Unsent(_) if conn.reused && !fresh_retried => {
                        outgoing.body = resend;
                        fresh_on = Some(index);
                    }
                    ExchangeError::Stale if idempotent && resend.is_some() && !fresh_retried => {
                        outgoing.body = resend;
                        fresh_on = Some(index);
                    }
                    ExchangeError::Stale => break,
                    // Nothing was sent on a new connection: the next backend, free.
                    ExchangeError::Unsent(_) => {
                        outgoing.body = resend;
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
                        outgoing.body = resend;
                    }
                }
                continue;
            }
        };
        let status = head.status;
        let took = sent_at.elapsed();
        state.latency.record(took);
        state.speed.observe(took, now_ms());
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
        if status == StatusCode::SWITCHING_PROTOCOLS && !outgoing.upgrade {
            return Err(ProxyError::BadGateway);
        }
        let set_cookie = settings
            .sticky
            .as_ref()
            .filter(|_| outgoing.sticky_cookie != Some(&*backend.sticky_id))
            .map(|s| sticky_cookie(s, backend));
        let body = UpstreamBody::new(&head, conn, in_flight, settings.read_timeout);
        return Ok(Forwarded {
            head,
            body,
            backend: state.addr_text.clone(),
            set_cookie,
            pool: upstream.pool.name.clone(),
        });
    }
    Err(last_error)
}

/// Picks among primaries, then backups; with `when_all_down = "open"`, then any untried one
/// (health and `max_conns` as of `req.now_ms`).
fn pick(snapshot: &PoolSnapshot, nodes: u32, tried: &Tried, req: &PickRequest, upstream: &Upstream) -> Option<usize> {
    let all_down = upstream.settings.when_all_down;
    let now = req.now_ms;
    let backends = &snapshot.backends;
    let usable = |i: usize, backup: bool| {
        let b = &backends[i];
        b.spec.backup == backup && !tried.has(i) && b.admits(now, nodes)
    };
    let picker = &upstream.picker;
    picker
        .pick(snapshot, &|i| usable(i, false), req)
        .or_else(|| picker.pick(snapshot, &|i| usable(i, true), req))
        .or_else(|| {
            (all_down == AllDown::Open && !backends.iter().any(|b| b.accepts(now, nodes)))
                .then(|| {
                    picker.pick(snapshot, &|i| !tried.has(i) && !backends[i].state.health.draining.load(Relaxed), req)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_text_is_canonical_and_fits_any_address() {
        let text = |a: &str| String::from_utf8(ClientConn::new(a.parse().unwrap()).real_ip().to_vec()).unwrap();
        assert_eq!(text("10.1.2.3:80"), "10.1.2.3");
        assert_eq!(text("0.0.0.0:80"), "0.0.0.0");
        assert_eq!(text("255.100.9.10:80"), "255.100.9.10");
        assert_eq!(text("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(text("[::ffff:192.0.2.7]:80"), "192.0.2.7");
        assert_eq!(text("[2001:db8::1]:443"), "2001:db8::1");
        let longest = "1111:2222:3333:4444:5555:6666:7777:8888";
        assert_eq!(text(&format!("[{longest}]:1")), longest);
    }
}
