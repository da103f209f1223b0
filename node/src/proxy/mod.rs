//! The data plane: accept client connections and tell HTTP/1.1 from HTTP/2 (`listener`), serve
//! HTTP/1.1 clients (`client_h1`) and HTTP/2 clients through hyper (`client_h2`), turn each
//! request into picks and attempts (`forward`), exchange it with a backend over HTTP/1.1
//! (`upstream`), map failures to statuses (`error`) and log (`access_log`). Client connections
//! take their buffers from a per-worker free list while bytes move and give them back when
//! idle (`crate::buffers`); kept-alive connections wait for their next request in a per-worker
//! registry with one coarse timer (`idle`). The HTTP/1.1 rules are the pure `crate::http1`'s.
//! Imports run one way: `listener -> client_h1 | client_h2 -> forward -> upstream -> http1`;
//! `error`, `access_log`, `idle` and `stream` (plain or TLS client streams) are leaves.

pub mod access_log;
pub mod client_h1;
pub mod client_h2;
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
use crate::config::{Config, StickySettings, UpstreamSettings};
use crate::limit::Limiter;
use crate::pool::Pool;
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

/// The reloadable part of the proxy: built from a `Config`, swapped whole on SIGHUP.
pub struct Runtime {
    pub upstream: UpstreamSettings,
    pub picker: Box<dyn Picker>,
    pub limiter: Option<Limiter>,
    pub sticky: Option<StickySettings>,
    /// TLS to the backends (`[upstream] tls = true`).
    pub upstream_tls: Option<Arc<UpstreamTls>>,
}

impl Runtime {
    /// Builds the runtime; fails only on TLS to backends (an unreadable `ca_file`, say).
    pub fn from_config(config: &Config) -> Result<Self, String> {
        Ok(Runtime {
            upstream: config.upstream.clone(),
            picker: picker_for(config.upstream.algorithm),
            limiter: config.rate_limit.clone().map(Limiter::new),
            sticky: config.sticky.clone(),
            upstream_tls: config.upstream.tls.as_ref().map(UpstreamTls::new).transpose()?.map(Arc::new),
        })
    }
}

/// Everything the request path shares.
pub struct Proxy {
    /// This node's id, as sent in `x-shoal-node`.
    pub node_id: HeaderValue,
    pub pool: Arc<Pool>,
    pub runtime: ArcSwap<Runtime>,
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
    pub fn new(config: &Config, pool: Arc<Pool>, tls: Option<Arc<Tls>>) -> std::io::Result<Self> {
        let log = match &config.access_log {
            Some(p) => Some(access_log::AccessLog::open(p)?),
            None => None,
        };
        Ok(Proxy {
            node_id: HeaderValue::from_str(&config.node.id).unwrap_or(HeaderValue::from_static("shoal")),
            pool,
            runtime: ArcSwap::from_pointee(Runtime::from_config(config).map_err(std::io::Error::other)?),
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
