//! The backend pool: each backend's static spec, its live counters (in-flight, requests,
//! failures, latency), its health flags and its idle upstream connections.
//!
//! The request path reads a [`PoolSnapshot`] from an `ArcSwap` (never a lock); a change to the
//! backend set (config reload, run-time registry) builds a new snapshot that reuses the
//! [`BackendState`] of every backend it keeps, so counters and warm connections survive.

pub mod claim;
pub mod conn;
pub mod speed;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::BackendSpec;
pub use conn::{IdleBudget, IdleConns, TRIM_EVERY};

/// Milliseconds since this process started: a cheap monotonic clock for atomics.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since this process started.
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A lock-free latency histogram (buckets are cumulative only when encoded).
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts) for Prometheus: the encoder makes the buckets
    /// cumulative itself, so the last one (`+Inf`) equals the count.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let out: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), b.load(Relaxed)))
            .collect();
        let count = out.iter().map(|(_, n)| n).sum();
        (self.sum_us.load(Relaxed) as f64 / 1e6, count, out)
    }
}

/// Health flags of one backend; the rules that set them live in `crate::health`.
///
/// A backend is usable when: not draining, its own active check says up, no passive ejection is
/// running, and no peer has reported it down since this node's own checks last confirmed it.
#[derive(Debug)]
pub struct Health {
    /// Own active-check verdict (true when active checks are off).
    pub active_up: AtomicBool,
    /// Passive ejection deadline, in [`now_ms`] (0 = not ejected).
    pub ejected_until_ms: AtomicU64,
    /// Failures counted in the current `fail_timeout` window.
    pub fail_count: AtomicU32,
    /// Start of the current failure window, in [`now_ms`].
    pub fail_window_start_ms: AtomicU64,
    /// Some peer reported this backend down; cleared by this node's own `rise` good checks.
    pub cluster_down: AtomicBool,
    /// Drained through the registry: no new requests.
    pub draining: AtomicBool,
    /// The current passive ejection was caused by connect failures (shared in gossip).
    pub refused: AtomicBool,
    /// Consecutive good / bad active checks (owned by the checker task).
    pub streak_ok: AtomicU32,
    pub streak_bad: AtomicU32,
    /// Active probes this node sent (it may check only some backends: `checkers`).
    pub probes: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            active_up: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            fail_count: AtomicU32::new(0),
            fail_window_start_ms: AtomicU64::new(0),
            cluster_down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            streak_ok: AtomicU32::new(0),
            streak_bad: AtomicU32::new(0),
            probes: AtomicU64::new(0),
        }
    }
}

/// Counts one request in flight to a backend for as long as it lives.
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn new(backend: &Arc<BackendState>) -> Self {
        backend.in_flight.fetch_add(1, Relaxed);
        InFlight(backend.clone())
    }

    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Live state of one backend, shared by every snapshot that contains it.
#[derive(Debug)]
pub struct BackendState {
    /// The pool the backend is in (for logs).
    pub pool: Arc<str>,
    pub addr: SocketAddr,
    /// `addr` as text, for logs and metric labels.
    pub addr_text: Arc<str>,
    /// Requests this node has in flight to the backend (exact).
    pub in_flight: AtomicU32,
    /// Sum of the latest in-flight reports of the other live nodes (written by the view task).
    pub remote_in_flight: AtomicU32,
    /// This node's claim on `max_conns` (see [`claim`]; written by the view task), or
    /// [`CLAIM_UNSET`]: read and written through [`Self::claimed`] and [`Self::set_claim`].
    claim: AtomicU32,
    /// A request found this node at its claim since the view task last looked.
    pub at_claim: AtomicBool,
    /// The view task's last verdict that this node wants more of the claim (gossiped).
    pub wants_more: AtomicBool,
    pub requests: AtomicU64,
    /// Connect errors, timeouts and retryable statuses.
    pub failures: AtomicU64,
    /// Responses by class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    pub retries: AtomicU64,
    pub latency: Latency,
    /// Response-time estimate (own, decaying, and the peers') for the least-conn picker.
    pub speed: speed::Speed,
    pub health: Health,
    /// Idle keep-alive connections to the backend.
    pub idle: IdleConns,
}

impl BackendState {
    /// This node's claim on `max_conns`: `None` for an unlimited backend and before the view
    /// task's first round.
    #[inline]
    pub fn claimed(&self) -> Option<u32> {
        match self.claim.load(Relaxed) {
            CLAIM_UNSET => None,
            claim => Some(claim),
        }
    }

    /// The view task's verdict: the claim (`None`: unlimited) and whether this node wants more.
    pub fn set_claim(&self, claim: Option<u32>, wants_more: bool) {
        self.claim.store(claim.unwrap_or(CLAIM_UNSET), Relaxed);
        self.wants_more.store(wants_more, Relaxed);
    }

    pub fn new(pool: Arc<str>, addr: SocketAddr, keepalive: usize, idle_budget: Arc<IdleBudget>) -> Self {
        BackendState {
            pool,
            addr,
            addr_text: addr.to_string().into(),
            in_flight: AtomicU32::new(0),
            remote_in_flight: AtomicU32::new(0),
            claim: AtomicU32::new(CLAIM_UNSET),
            at_claim: AtomicBool::new(false),
            wants_more: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            responses: Default::default(),
            retries: AtomicU64::new(0),
            latency: Latency::default(),
            speed: speed::Speed::default(),
            health: Health::default(),
            idle: IdleConns::new(keepalive, idle_budget),
        }
    }

    /// The cluster-wide load estimate: exact local in-flight plus the peers' latest reports.
    #[inline]
    pub fn load(&self) -> u32 {
        self.in_flight.load(Relaxed).saturating_add(self.remote_in_flight.load(Relaxed))
    }

    /// Whether health allows new requests (ignores `max_conns`).
    #[inline]
    pub fn is_healthy(&self, now: u64) -> bool {
        let h = &self.health;
        !h.draining.load(Relaxed)
            && h.active_up.load(Relaxed)
            && !h.cluster_down.load(Relaxed)
            && h.ejected_until_ms.load(Relaxed) <= now
    }

    /// This node's own verdict (what it gossips): down when its active check failed or it
    /// ejected the backend for refusing connections.
    pub fn own_verdict_down(&self, now: u64) -> bool {
        let h = &self.health;
        !h.active_up.load(Relaxed) || (h.ejected_until_ms.load(Relaxed) > now && h.refused.load(Relaxed))
    }

    pub fn state_name(&self, now: u64) -> &'static str {
        if self.health.draining.load(Relaxed) {
            "draining"
        } else if self.is_healthy(now) {
            "up"
        } else {
            "down"
        }
    }
}

/// One backend in a snapshot: spec plus shared state.
#[derive(Debug, Clone)]
pub struct Backend {
    pub spec: BackendSpec,
    pub state: Arc<BackendState>,
    /// Sticky-cookie value of this backend (keyed hash of its address).
    pub sticky_id: Arc<str>,
}

impl Backend {
    /// Whether a new request may go here: healthy and under its cluster-wide `max_conns`.
    ///
    /// `max_conns` holds for the cluster without per-request coordination: this node admits
    /// at most its claim (see [`claim`]: the claims of all nodes add up to `max_conns`, and a
    /// busy node borrows what idle ones lend); before its first round, `ceil(max_conns /
    /// nodes)`. The cluster-wide estimate (local + peers' reports) must also be under
    /// `max_conns`. Peers' reports alone are 150-450 ms old, which let every node take all
    /// slots at once under a spike (measured: peak 8 for max_conns 4 on 2 nodes); the claims
    /// are what bound it.
    #[inline]
    pub fn accepts(&self, now: u64, nodes: u32) -> bool {
        self.admission(now, nodes) == Admission::Yes
    }

    /// [`Self::accepts`] for a request being placed: a request turned away by this node's
    /// claim is recorded, so the view task asks the cluster for more (`pool::claim`). Status
    /// pages and metrics use [`Self::accepts`], which records nothing.
    #[inline]
    pub fn admits(&self, now: u64, nodes: u32) -> bool {
        match self.admission(now, nodes) {
            Admission::Yes => true,
            Admission::No => false,
            Admission::AtClaim => {
                if !self.state.at_claim.load(Relaxed) {
                    self.state.at_claim.store(true, Relaxed);
                }
                false
            }
        }
    }

    #[inline]
    fn admission(&self, now: u64, nodes: u32) -> Admission {
        if !self.state.is_healthy(now) {
            return Admission::No;
        }
        let max = self.spec.max_conns;
        if max == 0 {
            return Admission::Yes;
        }
        let claim = self.state.claimed().unwrap_or_else(|| max.div_ceil(nodes.max(1)));
        if self.state.in_flight.load(Relaxed) >= claim {
            return Admission::AtClaim;
        }
        if self.state.load() < max { Admission::Yes } else { Admission::No }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Yes,
    No,
    /// Healthy, but this node has its whole claim on `max_conns` in flight.
    AtClaim,
}

/// [`BackendState::claimed`] is `None`.
const CLAIM_UNSET: u32 = u32::MAX;

/// An immutable view of the backend set, as the request path sees it.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    pub backends: Vec<Backend>,
    /// Smooth weighted round-robin order (indexes into `backends`), like nginx's.
    pub rr_schedule: Vec<u32>,
}

impl PoolSnapshot {
    pub fn find(&self, addr: SocketAddr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.spec.addr == addr)
    }
}

/// Builds nginx's smooth weighted round-robin sequence for one cycle: each step adds every
/// weight to its current value, picks the largest and subtracts the total from it.
pub fn smooth_wrr_schedule(weights: &[u32]) -> Vec<u32> {
    // Divide by the gcd so the cycle is as short as the weights allow.
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| (x / g) as i64).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

/// The backend set of this node. Writers (reload, registry) are rare and serialized by a mutex
/// that the request path never touches.
pub struct Pool {
    /// `default`, or the `NAME` of `[upstreams.NAME]`.
    pub name: Arc<str>,
    current: ArcSwap<PoolSnapshot>,
    states: Mutex<HashMap<SocketAddr, Arc<BackendState>>>,
    keepalive: std::sync::atomic::AtomicUsize,
    /// Idle connections per worker over all backends (`keepalive` x backends).
    idle_budget: Arc<IdleBudget>,
    sticky_key: [u8; 16],
}

impl Pool {
    pub fn new(name: &str, keepalive: usize, sticky_key: [u8; 16]) -> Self {
        Pool {
            name: name.into(),
            current: ArcSwap::from_pointee(PoolSnapshot::default()),
            states: Mutex::new(HashMap::new()),
            keepalive: keepalive.into(),
            idle_budget: Arc::default(),
            sticky_key,
        }
    }

    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.current.load()
    }

    pub fn full(&self) -> Arc<PoolSnapshot> {
        self.current.load_full()
    }

    pub fn set_keepalive(&self, keepalive: usize) {
        self.keepalive.store(keepalive, Relaxed);
    }

    /// Closes the idle connections this proxy worker holds over the pool's idle budget that no
    /// request needed since the last call (the worker calls it every [`TRIM_EVERY`]), from the
    /// backends with the most idle connections first.
    pub fn trim_idle(&self) {
        let worker = conn::worker_index();
        if !self.idle_budget.trim_due(worker, now_ms()) {
            return;
        }
        let surplus = self.idle_budget.unused_surplus(worker);
        if surplus > 0 {
            let snapshot = self.snapshot();
            let mut idle: Vec<usize> = snapshot.backends.iter().map(|b| b.state.idle.len_here()).collect();
            for _ in 0..surplus {
                let Some(i) = (0..idle.len()).max_by_key(|&i| idle[i]).filter(|&i| idle[i] > 0) else { break };
                idle[i] -= 1;
                if !snapshot.backends[i].state.idle.close_oldest() {
                    idle[i] = 0;
                }
            }
        }
        self.idle_budget.restart(worker);
    }

    /// Replaces the backend set, keeping the live state of backends that stay.
    /// `draining` lists backends that take no new requests.
    pub fn replace(&self, specs: &[BackendSpec], draining: &[SocketAddr]) -> Arc<PoolSnapshot> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let keepalive = self.keepalive.load(Relaxed);
        let backends: Vec<Backend> = specs
            .iter()
            .map(|spec| {
                let state = states
                    .entry(spec.addr)
                    .or_insert_with(|| {
                        Arc::new(BackendState::new(self.name.clone(), spec.addr, keepalive, self.idle_budget.clone()))
                    })
                    .clone();
                state.health.draining.store(draining.contains(&spec.addr), Relaxed);
                Backend { spec: spec.clone(), state, sticky_id: sticky_id(&self.sticky_key, spec.addr).into() }
            })
            .collect();
        // Forget removed backends: their idle connections close when the last snapshot goes.
        states.retain(|addr, _| specs.iter().any(|s| s.addr == *addr));
        self.idle_budget.set_limit(keepalive * specs.len());
        let weights: Vec<u32> = backends.iter().map(|b| b.spec.weight).collect();
        let snapshot = Arc::new(PoolSnapshot { rr_schedule: smooth_wrr_schedule(&weights), backends });
        self.current.store(snapshot.clone());
        snapshot
    }
}

/// The sticky-cookie value for a backend: SipHash-1-3 keyed with the cluster secret, so every
/// node with the same secret and backend derives the same value, and a client cannot forge one
/// that names an arbitrary address.
pub fn sticky_id(key: &[u8; 16], addr: SocketAddr) -> String {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_key(key);
    h.write(addr.to_string().as_bytes());
    format!("{:016x}", h.finish())
}

/// Derives the 16-byte hashing key from the cluster secret (or a fixed key without one).
pub fn derive_key(secret: Option<&[u8]>, purpose: &str) -> [u8; 16] {
    use std::hash::Hasher;
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0x73686f616c, i as u64);
        h.write(purpose.as_bytes());
        h.write(secret.unwrap_or(b"shoal-no-secret"));
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_encodes_with_inf_equal_to_count() {
        use prometheus_client::encoding::DescriptorEncoder;
        use prometheus_client::metrics::MetricType;
        struct One(Latency);
        impl std::fmt::Debug for One {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("One")
            }
        }
        impl prometheus_client::collector::Collector for One {
            fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
                let (sum, count, buckets) = self.0.snapshot();
                let mut m = enc.encode_descriptor("lat", "latency", None, MetricType::Histogram)?;
                m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
            }
        }
        let lat = Latency::default();
        for ms in [0, 2, 2, 30, 700, 20_000] {
            lat.record(Duration::from_millis(ms));
        }
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(One(lat)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let value = |prefix: &str| -> u64 {
            let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} in {text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(value("lat_count"), 6);
        assert_eq!(value("lat_bucket{le=\"+Inf\"}"), 6, "{text}");
        assert_eq!(value("lat_bucket{le=\"0.001\"}"), 1, "{text}");
        assert_eq!(value("lat_bucket{le=\"0.0025\"}"), 3, "{text}");
        assert_eq!(value("lat_bucket{le=\"10.0\"}"), 5, "{text}");
    }

    #[test]
    fn smooth_wrr_matches_nginx() {
        // nginx's documented example: weights 5,1,1 -> a a b a c a a
        assert_eq!(smooth_wrr_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr_schedule(&[2, 2]), vec![0, 1]);
        assert_eq!(smooth_wrr_schedule(&[3, 2]).len(), 5);
    }

    #[test]
    fn replace_keeps_state() {
        let pool = Pool::new("default", 4, [0; 16]);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let s1 = pool.replace(&[BackendSpec::new(a), BackendSpec::new(b)], &[]);
        s1.backends[0].state.requests.store(7, Relaxed);
        let s2 = pool.replace(&[BackendSpec::new(a)], &[]);
        assert_eq!(s2.backends[0].state.requests.load(Relaxed), 7);
        let s3 = pool.replace(&[BackendSpec::new(a), BackendSpec::new(b)], &[b]);
        assert!(s3.backends[1].state.health.draining.load(Relaxed));
        assert_eq!(s3.backends[1].state.requests.load(Relaxed), 0);
    }

    #[test]
    fn sticky_ids_depend_on_key_and_addr() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let k1 = derive_key(Some(b"secret-one-secret-one"), "sticky");
        let k2 = derive_key(Some(b"secret-two-secret-two"), "sticky");
        assert_eq!(sticky_id(&k1, a), sticky_id(&k1, a));
        assert_ne!(sticky_id(&k1, a), sticky_id(&k1, b));
        assert_ne!(sticky_id(&k1, a), sticky_id(&k2, a));
    }
}
