//! A deterministic simulation (no network, no clock) of several balancers sharing backends,
//! driven through the production pickers. It shows why Shoal adds the exact local in-flight
//! count to the gossiped remote counts: picking on a stale snapshot alone herds every balancer
//! onto the same backend (Mitzenmacher 2000), while the local part removes most of it.
//!
//! It also shows what the response-time estimates add: with some backends slower than the
//! others, least-conn on counts alone spreads light load evenly (every count is 0 when a pick
//! is made), while scaling by the estimates sends it to the fast ones; with equal backends under
//! heavy load the estimates change little and herding stays away.
//!
//! Model: `BACKENDS` single-server FIFO backends with exponential service times (mean 1, or
//! `slow_factor` for the first `slow` of them), Poisson arrivals at `utilisation` of the
//! capacity, each arrival sent to a uniformly random balancer (DNS round-robin), gossip every
//! `period` time units (one mean service time = 1 = 10 ms of the estimates' clock). With
//! `latency`, each balancer measures its own response times and hears the others' estimates
//! with the gossip, as nodes do.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::{LeastConn, PickRequest, Picker, RandomTwo};
use crate::config::BackendSpec;
use crate::pool::{Pool, PoolSnapshot};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Uniformly random backend.
    Random,
    /// Least-conn on this balancer's own counts only (independent nginx instances today).
    LocalOnly,
    /// Least-conn on the last gossiped totals alone (the herding trap).
    StaleSnapshot,
    /// Least-conn on exact local + gossiped remote counts (Shoal).
    LocalPlusRemote,
    /// Power of two choices on exact local + gossiped remote counts.
    P2cLocalPlusRemote,
}

const BACKENDS: usize = 10;

struct Backend {
    /// (balancer, arrival time) of queued requests; the head is in service.
    queue: VecDeque<(usize, f64)>,
    done_at: f64,
}

/// The simulated cluster.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub balancers: usize,
    /// Gossip period, in mean service times.
    pub period: f64,
    /// Offered load as a share of the backends' capacity.
    pub utilisation: f64,
    /// How many backends are slow, and by what factor.
    pub slow: usize,
    pub slow_factor: f64,
    /// Whether balancers measure response times (the estimates the least-conn picker scales by).
    pub latency: bool,
}

/// Mean time in system for `requests` requests under `policy`.
pub fn simulate(policy: Policy, balancers: usize, period: f64, requests: usize, seed: u64) -> f64 {
    let setup = Setup { balancers, period, utilisation: 0.9, slow: 0, slow_factor: 1.0, latency: false };
    simulate_with(policy, setup, requests, seed).0
}

/// Mean time in system, and the share of requests the slow backends got.
pub fn simulate_with(policy: Policy, setup: Setup, requests: usize, seed: u64) -> (f64, f64) {
    let Setup { balancers, period, .. } = setup;
    let mean_service = |b: usize| if b < setup.slow { setup.slow_factor } else { 1.0 };
    let capacity: f64 = (0..BACKENDS).map(|b| 1.0 / mean_service(b)).sum();
    let to_ms = |t: f64| (t * 10.0) as u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    fastrand::seed(seed); // the pickers' tie-breaking randomness
    let exp = |rng: &mut fastrand::Rng, mean: f64| -mean * (1.0 - rng.f64()).ln();
    let pools: Vec<Arc<PoolSnapshot>> = (0..balancers)
        .map(|_| {
            let specs: Vec<BackendSpec> =
                (0..BACKENDS).map(|i| BackendSpec::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i as u16)))).collect();
            Pool::new("default", 1, [0; 16]).replace(&specs, &[])
        })
        .collect();
    // counts[m][b]: requests from balancer m at backend b (exact); views[v][m][b]: balancer m's
    // count as balancer v last heard it. Each balancer hears gossip at its own phase.
    let mut counts = vec![vec![0u32; BACKENDS]; balancers];
    let mut views = vec![counts.clone(); balancers];
    let mut next_view = 0usize;
    let mut backends: Vec<Backend> =
        (0..BACKENDS).map(|_| Backend { queue: VecDeque::new(), done_at: f64::INFINITY }).collect();
    let arrival_rate = setup.utilisation * capacity;
    let mut to_slow = 0usize;
    let mut now;
    let mut next_arrival = exp(&mut rng, 1.0 / arrival_rate);
    let mut next_gossip = period / balancers as f64;
    let (mut arrived, mut finished, mut total_time) = (0usize, 0usize, 0.0f64);
    let mut req = PickRequest { client_ip: IpAddr::from([127, 0, 0, 1]), sticky: None, now_ms: 0 };
    while finished < requests {
        let (bi, next_done) = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (i, b.done_at))
            .fold((0, f64::INFINITY), |a, x| if x.1 < a.1 { x } else { a });
        if next_gossip <= next_arrival && next_gossip <= next_done {
            views[next_view].clone_from(&counts);
            if setup.latency {
                // Balancer `next_view` hears the others' estimates (their means, as the view task).
                let at = to_ms(next_gossip);
                for b in 0..BACKENDS {
                    let reports: Vec<u64> = (0..balancers)
                        .filter(|&o| o != next_view)
                        .map(|o| crate::pool::speed::quantise(pools[o].backends[b].state.speed.own(at)))
                        .filter(|&us| us > 0)
                        .collect();
                    let mean = if reports.is_empty() { 0 } else { reports.iter().sum::<u64>() / reports.len() as u64 };
                    pools[next_view].backends[b].state.speed.set_remote(mean);
                }
            }
            next_view = (next_view + 1) % balancers;
            next_gossip += period / balancers as f64;
        } else if next_arrival <= next_done && arrived < requests {
            now = next_arrival;
            next_arrival = now + exp(&mut rng, 1.0 / arrival_rate);
            arrived += 1;
            let m = rng.usize(..balancers);
            let pool = &pools[m];
            let snapshot = &views[m];
            for (b, backend) in pool.backends.iter().enumerate() {
                let own = counts[m][b];
                let others: u32 = (0..balancers).filter(|&o| o != m).map(|o| snapshot[o][b]).sum();
                let (local, remote) = match policy {
                    Policy::Random => (0, 0),
                    Policy::LocalOnly => (own, 0),
                    Policy::StaleSnapshot => (0, others + snapshot[m][b]),
                    Policy::LocalPlusRemote | Policy::P2cLocalPlusRemote => (own, others),
                };
                backend.state.in_flight.store(local, Relaxed);
                backend.state.remote_in_flight.store(remote, Relaxed);
            }
            req.now_ms = to_ms(now);
            let b = match policy {
                Policy::Random => rng.usize(..BACKENDS),
                Policy::P2cLocalPlusRemote => RandomTwo.pick(pool, &|_| true, &req).unwrap_or(0),
                _ => LeastConn.pick(pool, &|_| true, &req).unwrap_or(0),
            };
            counts[m][b] += 1;
            to_slow += usize::from(b < setup.slow);
            let backend = &mut backends[b];
            backend.queue.push_back((m, now));
            if backend.queue.len() == 1 {
                backend.done_at = now + exp(&mut rng, mean_service(b));
            }
        } else if next_done.is_finite() {
            now = next_done;
            let backend = &mut backends[bi];
            let (m, arrived_at) = backend.queue.pop_front().unwrap_or((0, now));
            counts[m][bi] -= 1;
            total_time += now - arrived_at;
            finished += 1;
            if setup.latency {
                let took = std::time::Duration::from_micros(((now - arrived_at) * 10_000.0) as u64);
                pools[m].backends[bi].state.speed.observe(took, to_ms(now));
            }
            backend.done_at =
                if backend.queue.is_empty() { f64::INFINITY } else { now + exp(&mut rng, mean_service(bi)) };
        } else {
            // No request anywhere and no more arrivals: only gossip is left.
            break;
        }
    }
    (total_time / finished.max(1) as f64, to_slow as f64 / arrived.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_part_removes_herding() {
        let n = 60_000;
        for (balancers, period) in [(4, 0.5), (4, 2.0), (4, 10.0), (8, 2.0), (8, 10.0)] {
            let run = |p| simulate(p, balancers, period, n, 7);
            let random = run(Policy::Random);
            let local_only = run(Policy::LocalOnly);
            let stale = run(Policy::StaleSnapshot);
            let shoal = run(Policy::LocalPlusRemote);
            let p2c = run(Policy::P2cLocalPlusRemote);
            println!(
                "balancers={balancers} gossip={period}: random {random:.2}  local-only {local_only:.2}  stale-snapshot {stale:.2}  local+remote {shoal:.2}  p2c local+remote {p2c:.2}"
            );
            // Picking the minimum of a stale snapshot herds; adding the exact local part avoids it.
            assert!(stale > shoal, "stale {stale} vs local+remote {shoal}");
            if period >= 2.0 {
                assert!(stale > 1.25 * shoal, "stale {stale} vs local+remote {shoal}");
            }
            if period >= 10.0 {
                assert!(stale > 1.9 * shoal, "stale {stale} vs local+remote {shoal}");
            }
            // The cluster-wide view is never worse than each balancer's own counts (nginx today)
            // beyond noise, and better while gossip is fresh relative to request times.
            assert!(shoal < 1.05 * local_only, "local+remote {shoal} vs local-only {local_only}");
            if period <= 2.0 {
                assert!(shoal < local_only, "local+remote {shoal} vs local-only {local_only}");
            }
            assert!(shoal < random / 2.0);
            // Least-conn on local+remote measured better than P2C on it, so it is the default.
            assert!(shoal < p2c);

            // The same with response-time estimates (the default picker): equal backends, so
            // they change little; still no herding, and no worse than counts alone.
            let setup = Setup { balancers, period, utilisation: 0.9, slow: 0, slow_factor: 1.0, latency: true };
            let timed = simulate_with(Policy::LocalPlusRemote, setup, n, 7).0;
            println!("  with response-time estimates: local+remote {timed:.2}");
            assert!(stale > timed, "stale {stale} vs local+remote with estimates {timed}");
            assert!(timed < 1.1 * shoal, "with estimates {timed} vs counts alone {shoal}");
            assert!(timed < 1.05 * local_only.max(shoal), "with estimates {timed} vs local-only {local_only}");
        }
    }

    #[test]
    fn estimates_keep_light_load_off_slow_backends() {
        let n = 40_000;
        // 2 of 10 backends 5x slower; 3 balancers gossiping every 15 ms (1.5 service times).
        for utilisation in [0.1, 0.3, 0.6, 0.9] {
            let setup = |latency| Setup { balancers: 3, period: 1.5, utilisation, slow: 2, slow_factor: 5.0, latency };
            let (plain, plain_slow) = simulate_with(Policy::LocalPlusRemote, setup(false), n, 11);
            let (timed, timed_slow) = simulate_with(Policy::LocalPlusRemote, setup(true), n, 11);
            println!(
                "utilisation {utilisation}: counts alone {plain:.2} ({:.1}% to slow), with estimates {timed:.2} ({:.1}% to slow)",
                plain_slow * 100.0,
                timed_slow * 100.0
            );
            // Counts alone spread light load nearly evenly: the slow fifth gets 10-16%.
            if utilisation <= 0.3 {
                assert!(plain_slow > 0.08, "{plain_slow}");
                assert!(timed_slow < 0.05, "slow backends got {timed_slow} of the requests");
                assert!(timed < 0.75 * plain, "with estimates {timed} vs counts alone {plain}");
            }
            // And they never make it worse.
            assert!(timed < 1.02 * plain, "utilisation {utilisation}: with estimates {timed} vs counts alone {plain}");
        }
    }
}
