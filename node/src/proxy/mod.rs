//! The data plane: accept client connections and tell HTTP/1.1 from HTTP/2 (`listener`), serve
//! HTTP/1.1 clients (`client_h1`) and HTTP/2 clients through hyper (`client_h2`), turn each
//! request into picks and attempts (`forward`), exchange it with a backend over HTTP/1.1
//! (`upstream`), map failures to statuses (`error`) and log (`access_log`). Client connections
//! take their buffers from a per-worker free list while bytes move and give them back when
//! idle (`crate::buffers`); kept-alive connections wait for their next request in a per-worker
//! registry with one coarse timer (`idle`). The HTTP/1.1 rules are the pure `crate::http1`'s.
//! Here: the [`Runtime`] every request reads once (its pools as [`Upstream`]s and the route
//! table that picks one by host and path), built by `Node::apply`. Imports run one way:
//! `listener -> client_h1 | client_h2 -> forward -> upstream -> http1`; `error`,
//! `access_log`, `idle`, `stream` (the plain or TLS streams of clients and backends) and
//! `deadline` (timeouts that start only when the work waits) are leaves.

pub mod access_log;
pub mod client_h1;
pub mod client_h2;
pub mod deadline;
pub mod error;
pub mod forward;
pub mod idle;
pub mod listener;
pub mod stream;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio_util::sync::CancellationToken;

use crate::balance::{Picker, picker_for};
use crate::config::{Config, UpstreamSettings};
use crate::http1::request::{Routed, Router};
use crate::limit::Limiter;
use crate::pool::Pool;
use crate::route::{Entry, RouteAction, RouteTable};
use crate::tls::Tls;
use crate::tls::upstream::UpstreamTls;

/// Limits applied to every client connection (`[node]` keys).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long a kept-alive connection may sit idle between requests.
    pub keepalive_timeout: Duration,
    /// How long a client may send nothing while its request body is expected.
    pub body_timeout: Duration,
    /// How long a write to a client may wait for it to read.
    pub send_timeout: Duration,
    /// How long an upgraded connection may carry nothing either way.
    pub tunnel_timeout: Duration,
    /// Bodies up to this size are read whole before a backend is picked (0: never).
    pub request_buffer_bytes: usize,
}

/// What the client connections of one proxy worker share.
pub struct Worker {
    pub proxy: Arc<Proxy>,
    pub limits: Limits,
    /// Fires when the node drains: connections that are not busy close.
    pub close_idle: CancellationToken,
}

/// One open client connection of a worker, counted in `Stats::active` while it lives (one
/// word in the connection's task).
pub struct Open(Arc<Worker>);

impl Open {
    pub fn new(worker: Arc<Worker>) -> Self {
        worker.proxy.stats.active.fetch_add(1, Relaxed);
        Open(worker)
    }
}

impl std::ops::Deref for Open {
    type Target = Worker;

    fn deref(&self) -> &Worker {
        &self.0
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.proxy.stats.active.fetch_sub(1, Relaxed);
    }
}

/// nginx `stub_status`-style totals of this node.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepts: AtomicU64,
    pub handled: AtomicU64,
    pub active: AtomicU64,
    pub requests: AtomicU64,
    /// Requests answered by the proxy itself, by cause.
    pub no_backend: AtomicU64,
    pub bad_gateway: AtomicU64,
    pub timeouts: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Requests refused before forwarding: malformed (400), oversized head (431), head too
    /// slow (408), not passable (501).
    pub bad_requests: AtomicU64,
    pub headers_too_large: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub not_implemented: AtomicU64,
    pub retries: AtomicU64,
    pub retries_refused: AtomicU64,
}

/// A retry budget (like Envoy's / Finagle's): every request deposits `ratio` tokens, every
/// retry spends one, so retries stay a bounded fraction of traffic when a pool is dying.
/// A floor of `MIN_TOKENS` lets a quiet node still retry.
#[derive(Debug)]
pub struct RetryBudget {
    /// Tokens in thousandths.
    milli_tokens: AtomicI64,
}

const MIN_TOKENS: i64 = 10;
const MAX_TOKENS: i64 = 1000;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { milli_tokens: AtomicI64::new(MIN_TOKENS * 1000) }
    }
}

impl RetryBudget {
    pub fn deposit(&self, ratio: f64) {
        let add = (ratio * 1000.0) as i64;
        let prev = self.milli_tokens.fetch_add(add, Relaxed);
        if prev + add > MAX_TOKENS * 1000 {
            self.milli_tokens.fetch_sub(add, Relaxed);
        }
    }

    pub fn try_withdraw(&self) -> bool {
        let prev = self.milli_tokens.fetch_sub(1000, Relaxed);
        if prev >= 1000 {
            return true;
        }
        self.milli_tokens.fetch_add(1000, Relaxed);
        false
    }

    /// Refills up to the floor (called once a second).
    pub fn refill_floor(&self) {
        let _ =
            self.milli_tokens.fetch_update(Relaxed, Relaxed, |t| (t < MIN_TOKENS * 1000).then_some(MIN_TOKENS * 1000));
    }
}

/// One pool as the request path uses it: its backends and the policy built from its settings
/// (picker, rate limiter, TLS to its backends). Rebuilt on reload; kept while only the
/// registry changes, so round-robin positions and rate-limit buckets carry on.
pub struct Upstream {
    pub settings: UpstreamSettings,
    pub pool: Arc<Pool>,
    pub picker: Box<dyn Picker>,
    pub limiter: Option<Limiter>,
    /// TLS to the backends (`tls = true`).
    pub tls: Option<Arc<UpstreamTls>>,
}

impl Upstream {
    /// Fails only on TLS to backends (an unreadable `ca_file`, say).
    pub fn new(settings: UpstreamSettings, pool: Arc<Pool>) -> Result<Self, String> {
        Ok(Upstream {
            picker: picker_for(settings.algorithm),
            limiter: settings.rate_limit.clone().map(Limiter::new),
            tls: settings.tls.as_ref().map(UpstreamTls::new).transpose()?.map(Arc::new),
            settings,
            pool,
        })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }
}

/// `Request::route` of a request no route matched: it goes to the default pool.
pub const NO_ROUTE: u32 = u32::MAX;

/// One route of the running table.
pub struct RouteInfo {
    /// The route; `target` is the index of its pool in [`Runtime::upstreams`] (unused for a
    /// redirect).
    pub entry: Entry<u32>,
    /// `host/path` as logs and metrics show it.
    pub name: Arc<str>,
}

/// The reloadable part of the proxy: the pools and the route table, built from the config and
/// the registry and swapped whole when either changes. The request path reads it with one
/// atomic load per request.
pub struct Runtime {
    /// Every pool; the default one first.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The routes; [`Runtime::routes`] holds indexes into this.
    pub route_list: Vec<RouteInfo>,
    pub routes: RouteTable<u32>,
    /// Bumped on every reload: pools built under another generation are rebuilt.
    pub generation: u64,
}

impl Runtime {
    /// The pool a request routed to `route` goes to ([`NO_ROUTE`]: the default pool).
    #[inline]
    pub fn upstream(&self, route: u32) -> &Arc<Upstream> {
        let i = self.route_list.get(route as usize).map_or(0, |r| r.entry.target as usize);
        self.upstreams.get(i).unwrap_or(&self.upstreams[0])
    }

    /// The route's name for logs (`None` without a route).
    pub fn route_name(&self, route: u32) -> Option<&Arc<str>> {
        self.route_list.get(route as usize).map(|r| &r.name)
    }

    pub fn find(&self, pool: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == pool)
    }

    /// Every backend of every pool, pool by pool, with its pool's name (for status, metrics and
    /// the view task; not for the request path).
    pub fn backends(&self) -> Vec<(&str, crate::pool::Backend)> {
        self.upstreams
            .iter()
            .flat_map(|u| u.pool.snapshot().backends.iter().map(|b| (u.name(), b.clone())).collect::<Vec<_>>())
            .collect()
    }

    /// One line per pool, as `/status`, `shoal upstream list` and the dashboard show them;
    /// `nodes`: the serving members (a backend at its share of `max_conns` is not up).
    pub fn summaries(&self, now_ms: u64, nodes: u32) -> Vec<PoolSummary<'_>> {
        self.upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let pool = u.pool.snapshot();
                let sum = |f: &dyn Fn(&crate::pool::Backend) -> u64| pool.backends.iter().map(f).sum();
                PoolSummary {
                    upstream: u,
                    backends: pool.backends.len(),
                    up: pool.backends.iter().filter(|b| b.accepts(now_ms, nodes)).count(),
                    in_flight: sum(&|b| b.state.in_flight.load(Relaxed) as u64),
                    cluster_in_flight: sum(&|b| b.state.load() as u64),
                    requests: sum(&|b| b.state.requests.load(Relaxed)),
                    routes: self
                        .route_list
                        .iter()
                        .filter(|r| {
                            r.entry.target as usize == i && matches!(r.entry.spec.action, RouteAction::Pool { .. })
                        })
                        .count(),
                }
            })
            .collect()
    }
}

/// A pool's counts at one moment ([`Runtime::summaries`]).
pub struct PoolSummary<'a> {
    pub upstream: &'a Upstream,
    pub backends: usize,
    /// Backends that take new requests now.
    pub up: usize,
    pub in_flight: u64,
    pub cluster_in_flight: u64,
    pub requests: u64,
    /// Routes that lead to the pool.
    pub routes: usize,
}

impl Router for Runtime {
    #[inline]
    fn route(&self, host: &[u8], target: &str) -> Routed<'_> {
        // One pool and no routes (most sites): nothing to look up.
        let found = if self.route_list.is_empty() { None } else { self.routes.find(host, target) };
        let (route, upstream) = match found {
            Some(e) => (e.target, self.upstream(e.target)),
            None => (NO_ROUTE, &self.upstreams[0]),
        };
        let redirect = match self.route_list.get(route as usize).map(|r| &r.entry.spec.action) {
            Some(RouteAction::Redirect { origin }) => Some(origin.as_str()),
            _ => None,
        };
        Routed { route, sticky_cookie: upstream.settings.sticky.as_ref().map(|s| s.cookie.as_str()), redirect }
    }

    fn upstream_target<'t>(&self, route: u32, target: &'t str) -> std::borrow::Cow<'t, str> {
        match self.route_list.get(route as usize) {
            Some(r) => r.entry.upstream_path(target),
            None => std::borrow::Cow::Borrowed(target),
        }
    }
}

/// Everything the request path shares.
pub struct Proxy {
    /// This node's id, as sent in `x-shoal-node`.
    pub node_id: HeaderValue,
    /// Built by `Node::apply` (the node owns the pools and the registry).
    pub runtime: ArcSwap<Runtime>,
    /// Members serving traffic (alive or draining, this node included), from the cluster view;
    /// splits `max_conns` between nodes.
    serving_nodes: std::sync::atomic::AtomicU32,
    pub stats: Stats,
    pub retry_budget: RetryBudget,
    pub access_log: ArcSwap<Option<access_log::AccessLog>>,
    /// Largest request head accepted (431 above it).
    pub max_header_bytes: usize,
    /// How long a drain waits for in-flight requests (config, or `shoal leave --drain-timeout`).
    drain_timeout_ms: AtomicU64,
    /// HTTPS termination, when `[tls]` is configured.
    pub tls: Option<Arc<Tls>>,
}

impl Proxy {
    pub fn new(config: &Config, runtime: Runtime, tls: Option<Arc<Tls>>) -> std::io::Result<Self> {
        let log = match &config.access_log {
            Some(p) => Some(access_log::AccessLog::open(p)?),
            None => None,
        };
        Ok(Proxy {
            node_id: HeaderValue::from_str(&config.node.id).unwrap_or(HeaderValue::from_static("shoal")),
            runtime: ArcSwap::from_pointee(runtime),
            serving_nodes: 1.into(),
            stats: Stats::default(),
            retry_budget: RetryBudget::default(),
            access_log: ArcSwap::from_pointee(log),
            max_header_bytes: config.node.max_header_bytes,
            drain_timeout_ms: AtomicU64::new(config.node.drain_timeout.as_millis() as u64),
            tls,
        })
    }

    /// The HTTPS port plain HTTP/1.1 requests are redirected to (`[tls] redirect_http`).
    pub fn redirect_https(&self) -> Option<u16> {
        let settings = self.tls.as_ref()?.settings.load();
        settings.redirect_http.then_some(settings.listen.port())
    }

    pub fn serving_nodes(&self) -> u32 {
        self.serving_nodes.load(Relaxed)
    }

    pub fn set_serving_nodes(&self, n: u32) {
        self.serving_nodes.store(n.max(1), Relaxed);
    }

    pub fn set_drain_timeout(&self, d: std::time::Duration) {
        self.drain_timeout_ms.store(d.as_millis() as u64, Relaxed);
    }

    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_timeout_ms.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_bounds_retries() {
        let b = RetryBudget::default();
        // the floor allows MIN_TOKENS retries with no traffic
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), MIN_TOKENS as usize);
        // 100 requests at 20% buy 20 retries
        for _ in 0..100 {
            b.deposit(0.2);
        }
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), 20);
        b.refill_floor();
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), MIN_TOKENS as usize);
    }
}
