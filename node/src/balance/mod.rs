//! Pickers: which backend gets the next request. One trait, one named type per algorithm.
//!
//! Every picker reads load through [`BackendState::load`](crate::pool::BackendState::load):
//! this node's exact in-flight count plus the latest reports of the other live nodes, so the
//! same code balances on the cluster-wide view (PRODUCT.md §5.2). Eligibility (health, tier,
//! `max_conns`, already-tried backends) is decided by the caller and passed in as a predicate.

use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[cfg(test)]
mod simulation;

use crate::config::Algorithm;
use crate::pool::{Backend, PoolSnapshot};

/// What a picker may look at besides the pool.
pub struct PickRequest<'a> {
    pub client_ip: IpAddr,
    /// The sticky cookie's value, when the request carried one.
    pub sticky: Option<&'a str>,
    /// [`crate::pool::now_ms`] when the request arrived (the age of response-time estimates).
    pub now_ms: u64,
}

/// A balancing policy.
pub trait Picker: Send + Sync {
    /// Index into `pool.backends` of the backend for this request, among those `eligible`.
    fn pick(&self, pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, req: &PickRequest) -> Option<usize>;
}

/// Builds the picker for an algorithm.
pub fn picker_for(algorithm: Algorithm) -> Box<dyn Picker> {
    match algorithm {
        Algorithm::LeastConn => Box::new(LeastConn),
        Algorithm::RoundRobin => Box::new(RoundRobin::default()),
        Algorithm::RandomTwo => Box::new(RandomTwo),
        Algorithm::IpHash => Box::new(IpHash),
        Algorithm::Cookie => Box::new(Cookie),
    }
}

/// `a` is less loaded than `b` relative to weight: load_a / w_a < load_b / w_b.
#[inline]
fn lighter(a: &Backend, b: &Backend) -> bool {
    (a.state.load() as u64) * (b.spec.weight as u64) < (b.state.load() as u64) * (a.spec.weight as u64)
}

/// Weighted least-connections over the cluster-wide load, scaled by how fast each backend
/// answers: the pick minimises `(load + 1) x response time / weight`, the expected wait of one
/// more request (peak-EWMA x load, as Finagle and linkerd do, but on the cluster's counts and
/// the cluster's estimates, see [`crate::pool::speed`]). Under load it is least-connections
/// with a slow backend's share cut by its slowness; at light load, where every count is 0, it
/// sends requests to the fast backends instead of spreading them evenly. A backend with no
/// estimate yet is taken to be as fast as the fastest known one. Ties are broken from a random
/// start so equal backends share evenly.
pub struct LeastConn;

impl Picker for LeastConn {
    fn pick(&self, pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, req: &PickRequest) -> Option<usize> {
        let n = pool.backends.len();
        if n == 0 {
            return None;
        }
        let now = req.now_ms;
        // Each backend's estimate once (microseconds; 0 = unknown), then the fastest known.
        const STACK: usize = 16;
        let mut on_stack = [0u64; STACK];
        let mut on_heap = Vec::new();
        let est: &mut [u64] = if n <= STACK {
            &mut on_stack[..n]
        } else {
            on_heap.resize(n, 0);
            &mut on_heap
        };
        let mut fastest = u64::MAX;
        for (i, b) in pool.backends.iter().enumerate() {
            let e = b.state.speed.estimate(now);
            est[i] = e;
            if e > 0 && e < fastest && eligible(i) {
                fastest = e;
            }
        }
        // The floor is the fastest estimate, or a millisecond if that is less. Estimates up to
        // 1.5x the floor count as the floor (equally fast backends differ by that much with
        // scheduling alone); above, an estimate counts less half the floor, so the cost rises
        // steadily from the band's edge, with no step or dip there. Equal backends then
        // share load as plain least-connections shares it, each keeping the same number of
        // upstream connections busy (measured: before the band, a 64-connection benchmark on
        // four equal backends opened ~1,000 upstream connections in 5 s where nginx keeps 16
        // per backend), and only a backend that is really slower has its share cut. Unknown
        // counts as the fastest known.
        let floor = if fastest == u64::MAX { EQUAL_BELOW_US } else { fastest.max(EQUAL_BELOW_US) };
        let band = floor.saturating_add(floor / 2);
        for e in est.iter_mut() {
            *e = if *e <= band { floor } else { *e - floor / 2 };
        }
        // cost_a < cost_b  <=>  (load_a + 1) * t_a * w_b < (load_b + 1) * t_b * w_a
        let cost = |i: usize, other_weight: u32| {
            (pool.backends[i].state.load() as u128 + 1) * est[i] as u128 * other_weight.max(1) as u128
        };
        let start = fastrand::usize(..n);
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !eligible(i) {
                continue;
            }
            match best {
                Some(b) => {
                    if cost(i, pool.backends[b].spec.weight) < cost(b, pool.backends[i].spec.weight) {
                        best = Some(i);
                    }
                }
                None => best = Some(i),
            }
        }
        best
    }
}

/// Response-time estimates below this count as equal (microseconds).
const EQUAL_BELOW_US: u64 = 1_000;

/// Smooth weighted round-robin (nginx's), lock-free: a shared counter walks the precomputed
/// schedule. An ineligible slot (down, backup, tried) consumes its turn and the picker draws
/// the next one, so every eligible slot is still used once per cycle and the shares among the
/// eligible backends follow their weights.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Picker for RoundRobin {
    fn pick(&self, pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, _req: &PickRequest) -> Option<usize> {
        let schedule = &pool.rr_schedule;
        if schedule.is_empty() {
            return None;
        }
        for _ in 0..schedule.len() {
            let i = schedule[self.next.fetch_add(1, Relaxed) % schedule.len()] as usize;
            if eligible(i) {
                return Some(i);
            }
        }
        // Other workers' picks interleave with the draws above, so they may all have landed on
        // ineligible slots while an eligible one exists: scan the whole schedule once.
        let start = self.next.load(Relaxed);
        (0..schedule.len()).map(|k| schedule[(start + k) % schedule.len()] as usize).find(|&i| eligible(i))
    }
}

/// Power of two choices: two random eligible backends, the lighter one wins.
pub struct RandomTwo;

impl Picker for RandomTwo {
    fn pick(&self, pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, _req: &PickRequest) -> Option<usize> {
        let n = pool.backends.len();
        if n == 0 {
            return None;
        }
        // Random starting points, scanning forward to the next eligible one.
        let first_eligible = |start: usize, skip: Option<usize>| {
            (0..n).map(|k| (start + k) % n).find(|&i| Some(i) != skip && eligible(i))
        };
        let a = first_eligible(fastrand::usize(..n), None)?;
        let Some(b) = first_eligible(fastrand::usize(..n), Some(a)) else { return Some(a) };
        Some(if lighter(&pool.backends[b], &pool.backends[a]) { b } else { a })
    }
}

/// Weighted rendezvous (highest random weight) score of `key` on `backend`: every node with the
/// same backend set ranks backends identically, and removing one moves only its own keys.
fn rendezvous_score(key: &[u8], backend: &Backend) -> f64 {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x0053_484f_414c, 0x7268_7768);
    h.write(key);
    h.write(backend.state.addr_text.as_bytes());
    // Uniform in (0, 1); score = -w / ln(u) gives each backend a share proportional to w.
    let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(backend.spec.weight as f64) / u.ln()
}

fn rendezvous(pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, key: &[u8]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, b) in pool.backends.iter().enumerate() {
        if !eligible(i) {
            continue;
        }
        let s = rendezvous_score(key, b);
        if best.is_none_or(|(_, bs)| s > bs) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// Client-IP affinity by rendezvous hashing (like nginx `ip_hash`, but over the full address
/// and stable across nodes and backend changes).
pub struct IpHash;

impl Picker for IpHash {
    fn pick(&self, pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, req: &PickRequest) -> Option<usize> {
        match req.client_ip {
            IpAddr::V4(v4) => rendezvous(pool, eligible, &v4.octets()),
            IpAddr::V6(v6) => rendezvous(pool, eligible, &v6.octets()),
        }
    }
}

/// Sticky cookie: the backend whose keyed id matches the cookie, else least-conn (the caller
/// then sets the cookie).
pub struct Cookie;

impl Picker for Cookie {
    fn pick(&self, pool: &PoolSnapshot, eligible: &dyn Fn(usize) -> bool, req: &PickRequest) -> Option<usize> {
        if let Some(value) = req.sticky
            && let Some(i) = pool.backends.iter().position(|b| &*b.sticky_id == value)
            && eligible(i)
        {
            return Some(i);
        }
        LeastConn.pick(pool, eligible, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;
    use crate::pool::Pool;
    use std::collections::HashMap;
    use std::net::SocketAddr;

    fn pool(weights: &[u32]) -> std::sync::Arc<PoolSnapshot> {
        let specs: Vec<BackendSpec> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let mut s = BackendSpec::new(SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)));
                s.weight = w;
                s
            })
            .collect();
        Pool::new("default", 1, [1; 16]).replace(&specs, &[])
    }

    fn req(ip: [u8; 4]) -> PickRequest<'static> {
        PickRequest { client_ip: IpAddr::from(ip), sticky: None, now_ms: 0 }
    }

    #[test]
    fn least_conn_prefers_lighter_relative_to_weight() {
        let p = pool(&[1, 1, 2]);
        p.backends[0].state.in_flight.store(3, Relaxed);
        p.backends[1].state.in_flight.store(1, Relaxed);
        p.backends[2].state.in_flight.store(4, Relaxed); // (4 + 1) / 2 = 2.5 > (1 + 1) / 1
        assert_eq!(LeastConn.pick(&p, &|_| true, &req([1, 1, 1, 1])), Some(1));
        // remote reports count too
        p.backends[1].state.remote_in_flight.store(10, Relaxed);
        assert_eq!(LeastConn.pick(&p, &|_| true, &req([1, 1, 1, 1])), Some(2));
        assert_eq!(LeastConn.pick(&p, &|i| i == 0, &req([1, 1, 1, 1])), Some(0));
        assert_eq!(LeastConn.pick(&p, &|_| false, &req([1, 1, 1, 1])), None);
    }

    #[test]
    fn least_conn_scales_load_by_response_time() {
        let p = pool(&[1, 1]);
        p.backends[0].state.speed.observe(std::time::Duration::from_millis(25), 0);
        p.backends[1].state.speed.observe(std::time::Duration::from_millis(1), 0);
        let r = PickRequest { now_ms: 10, ..req([1, 1, 1, 1]) };
        for _ in 0..20 {
            assert_eq!(LeastConn.pick(&p, &|_| true, &r), Some(1), "equal load: the fast one");
        }
        // 30 in flight on the fast one cost more than one on a 25x slower one.
        p.backends[1].state.in_flight.store(30, Relaxed);
        assert_eq!(LeastConn.pick(&p, &|_| true, &r), Some(0));
        // A backend with no estimate yet counts as fast as the fastest known (and not as 0,
        // which would send it everything until its first answer).
        let q = pool(&[1, 1, 1]);
        q.backends[0].state.speed.observe(std::time::Duration::from_millis(25), 0);
        q.backends[1].state.speed.observe(std::time::Duration::from_millis(1), 0);
        q.backends[1].state.in_flight.store(3, Relaxed);
        for _ in 0..20 {
            assert_eq!(LeastConn.pick(&q, &|_| true, &r), Some(2));
        }
        q.backends[2].state.in_flight.store(3, Relaxed);
        let picks: std::collections::BTreeSet<_> = (0..50).filter_map(|_| LeastConn.pick(&q, &|_| true, &r)).collect();
        assert_eq!(picks, [1, 2].into(), "equal load and equal (assumed) speed share");
    }

    #[test]
    fn least_conn_treats_nearly_equal_estimates_as_equal() {
        // 1.2 ms and 1.7 ms: within 1.5x, so counts alone decide.
        let p = pool(&[1, 1]);
        p.backends[0].state.speed.observe(std::time::Duration::from_micros(1_200), 0);
        p.backends[1].state.speed.observe(std::time::Duration::from_micros(1_700), 0);
        let r = PickRequest { now_ms: 10, ..req([1, 1, 1, 1]) };
        let picks: std::collections::BTreeSet<_> = (0..50).filter_map(|_| LeastConn.pick(&p, &|_| true, &r)).collect();
        assert_eq!(picks, [0, 1].into(), "equal counts: both");
        p.backends[0].state.in_flight.store(17, Relaxed);
        p.backends[1].state.in_flight.store(15, Relaxed);
        assert_eq!(LeastConn.pick(&p, &|_| true, &r), Some(1), "the lighter one, though a little slower");
    }

    #[test]
    fn least_conn_never_prefers_the_slower_of_two_and_cuts_a_really_slow_share() {
        // Backend 0 answers in 1.2 ms; backend 1 in anything from 1.2 to 6 ms. At equal counts
        // the slower one may tie but never win alone (no dip in cost past the band's edge), and
        // from 1.6x as slow it loses every pick.
        let p = pool(&[1, 1]);
        for (k, us) in (1_200u64..6_000).step_by(10).enumerate() {
            let now = (k as u64 + 1) * 1_000_000; // far apart: each sample counts in full
            p.backends[0].state.speed.observe(std::time::Duration::from_micros(1_200), now);
            p.backends[1].state.speed.observe(std::time::Duration::from_micros(us), now);
            let r = PickRequest { now_ms: now, ..req([1, 1, 1, 1]) };
            let picks: std::collections::BTreeSet<_> =
                (0..30).filter_map(|_| LeastConn.pick(&p, &|_| true, &r)).collect();
            assert!(picks.contains(&0), "{us} us against 1200 us: only the slower one was picked");
            if us >= 1_900 {
                assert_eq!(picks, [0].into(), "{us} us against 1200 us at equal counts");
            }
        }
        // Under load a 2.5 ms backend still takes part, with a smaller share: costs 16 x 1.2 on
        // the fast one against 14 x (2.5 - 0.6) on the slow one.
        let r = PickRequest { now_ms: 10_000_000_000, ..req([1, 1, 1, 1]) };
        p.backends[0].state.speed.observe(std::time::Duration::from_micros(1_200), r.now_ms);
        p.backends[1].state.speed.observe(std::time::Duration::from_micros(2_500), r.now_ms);
        p.backends[0].state.in_flight.store(15, Relaxed);
        p.backends[1].state.in_flight.store(13, Relaxed);
        assert_eq!(LeastConn.pick(&p, &|_| true, &r), Some(0));
        p.backends[0].state.in_flight.store(22, Relaxed);
        assert_eq!(LeastConn.pick(&p, &|_| true, &r), Some(1));
    }

    #[test]
    fn round_robin_follows_weights() {
        let p = pool(&[3, 1]);
        let rr = RoundRobin::default();
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[rr.pick(&p, &|_| true, &req([1, 1, 1, 1])).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
        // an ineligible backend is skipped, not stalled on
        for _ in 0..10 {
            assert_eq!(rr.pick(&p, &|i| i == 1, &req([1, 1, 1, 1])), Some(1));
        }
        // with one of three equal backends ineligible, the other two still split evenly
        let p = pool(&[1, 1, 1]);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[rr.pick(&p, &|i| i != 1, &req([1, 1, 1, 1])).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 0, 300]);
    }

    #[test]
    fn round_robin_finds_the_only_eligible_backend_while_other_workers_pick() {
        // Two workers share the counter; one picks freely, the other may only take backend 2
        // (the backup when both primaries are down). Interleaved draws must never make the
        // second one miss it.
        let p = pool(&[1, 1, 1]);
        let rr = std::sync::Arc::new(RoundRobin::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = {
            let (rr, p, stop) = (rr.clone(), p.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let _ = rr.pick(&p, &|_| true, &req([1, 1, 1, 1]));
                }
            })
        };
        for _ in 0..200_000 {
            assert_eq!(rr.pick(&p, &|i| i == 2, &req([1, 1, 1, 1])), Some(2));
        }
        stop.store(true, Relaxed);
        other.join().unwrap();
    }

    #[test]
    fn random_two_never_picks_the_heaviest_of_three() {
        let p = pool(&[1, 1, 1]);
        p.backends[2].state.in_flight.store(50, Relaxed);
        for _ in 0..200 {
            assert_ne!(RandomTwo.pick(&p, &|_| true, &req([1, 1, 1, 1])), Some(2));
        }
    }

    #[test]
    fn ip_hash_is_stable_and_spreads_by_weight() {
        let p = pool(&[1, 1, 2]);
        let mut counts: HashMap<usize, u32> = HashMap::new();
        for a in 0..=255u8 {
            for b in 0..40u8 {
                let r = req([10, 0, b, a]);
                let i = IpHash.pick(&p, &|_| true, &r).unwrap();
                assert_eq!(IpHash.pick(&p, &|_| true, &r), Some(i));
                *counts.entry(i).or_default() += 1;
            }
        }
        let total = 256.0 * 40.0;
        let share2 = counts[&2] as f64 / total;
        assert!((share2 - 0.5).abs() < 0.03, "weight-2 backend share {share2}");
        // removing a backend only moves its own clients
        let moved = (0..=255u8)
            .filter(|&a| {
                let r = req([10, 9, 9, a]);
                let before = IpHash.pick(&p, &|_| true, &r).unwrap();
                let after = IpHash.pick(&p, &|i| i != 0, &r).unwrap();
                before != 0 && before != after
            })
            .count();
        assert_eq!(moved, 0);
    }

    #[test]
    fn cookie_honours_known_value_and_falls_back() {
        let p = pool(&[1, 1, 1]);
        let id = p.backends[2].sticky_id.clone();
        let r = PickRequest { client_ip: IpAddr::from([1, 2, 3, 4]), sticky: Some(&id), now_ms: 0 };
        for _ in 0..20 {
            assert_eq!(Cookie.pick(&p, &|_| true, &r), Some(2));
        }
        // its backend is not eligible: another one
        assert_ne!(Cookie.pick(&p, &|i| i != 2, &r), Some(2));
        let forged = PickRequest { client_ip: IpAddr::from([1, 2, 3, 4]), sticky: Some("deadbeef"), now_ms: 0 };
        assert!(Cookie.pick(&p, &|_| true, &forged).is_some());
    }
}
