//! Rate limiting per client IP, like nginx `limit_req` (`rate`, `burst`, `nodelay`), with the
//! generic cell rate algorithm (GCRA): one timestamp per key, no timers.
//!
//! A request is admitted when the key's theoretical arrival time (TAT) is no more than
//! `burst` emission intervals ahead of now; admitting it moves the TAT one interval on. With
//! `nodelay` an admitted request goes through at once; without it, it waits until its TAT
//! (nginx's delaying of excess requests). Keys live in 64 shards behind short, non-async mutexes.
//!
//! The per-node rate is `rate * share`: `scope = "cluster"` sets `share` from the gossiped
//! request rates of the nodes (`crate::view`), so the limit holds across the cluster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::RateLimitSettings;

const SHARDS: usize = 64;
/// Keys idle this long are forgotten (their TAT is in the past: they would be admitted anyway).
const IDLE_FORGET_MS: u64 = 60_000;

/// The verdict for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Admitted after waiting this long (no `nodelay`).
    Delay(Duration),
    Reject,
}

pub struct Limiter {
    settings: RateLimitSettings,
    /// Fraction of the configured rate this node admits, as f64 bits (1.0 = all of it).
    share: AtomicU64,
    shards: Vec<Mutex<HashMap<IpAddr, u64>>>,
    /// Requests rejected since start.
    pub rejected: AtomicU64,
}

impl Limiter {
    pub fn new(settings: RateLimitSettings) -> Self {
        Limiter {
            settings,
            share: AtomicU64::new(1.0f64.to_bits()),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// Sets this node's share of the cluster-wide rate (clamped to 0.01..=1).
    pub fn set_share(&self, share: f64) {
        self.share.store(share.clamp(0.01, 1.0).to_bits(), Relaxed);
    }

    pub fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Relaxed))
    }

    fn shard(&self, key: &IpAddr) -> &Mutex<HashMap<IpAddr, u64>> {
        use std::hash::Hasher;
        let mut fixed = siphasher::sip::SipHasher13::new_with_keys(1, 2);
        match key {
            IpAddr::V4(a) => fixed.write(&a.octets()),
            IpAddr::V6(a) => fixed.write(&a.octets()),
        }
        &self.shards[(fixed.finish() as usize) % SHARDS]
    }

    /// Decides on one request from `key` at `now_us` (microseconds, monotonic).
    pub fn check_at(&self, key: IpAddr, now_us: u64) -> Verdict {
        let rate = self.settings.per_second * self.share();
        let interval_us = (1e6 / rate) as u64;
        let tolerance_us = interval_us.saturating_mul(self.settings.burst as u64);
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        let tat = shard.get(&key).copied().unwrap_or(now_us).max(now_us);
        if tat - now_us > tolerance_us {
            drop(shard);
            self.rejected.fetch_add(1, Relaxed);
            return Verdict::Reject;
        }
        shard.insert(key, tat + interval_us);
        if shard.len() > 4096 {
            shard.retain(|_, t| *t + IDLE_FORGET_MS * 1000 > now_us);
        }
        if self.settings.nodelay || tat == now_us {
            Verdict::Pass
        } else {
            Verdict::Delay(Duration::from_micros(tat - now_us))
        }
    }

    pub fn check(&self, key: IpAddr) -> Verdict {
        self.check_at(key, crate::pool::now_us())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitScope;

    fn limiter(rate: f64, burst: u32, nodelay: bool) -> Limiter {
        Limiter::new(RateLimitSettings { per_second: rate, burst, nodelay, scope: LimitScope::Node })
    }

    #[test]
    fn burst_then_rate() {
        let l = limiter(10.0, 5, true);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = 1_000_000;
        // burst 5 plus the one that is on time
        let passed = (0..20).filter(|_| l.check_at(ip, t0) == Verdict::Pass).count();
        assert_eq!(passed, 6);
        // 100 ms later exactly one more token
        assert_eq!(l.check_at(ip, t0 + 100_000), Verdict::Pass);
        assert_eq!(l.check_at(ip, t0 + 100_000), Verdict::Reject);
        // other clients are not affected
        assert_eq!(l.check_at("10.0.0.2".parse().unwrap(), t0), Verdict::Pass);
    }

    #[test]
    fn without_nodelay_excess_waits() {
        let l = limiter(10.0, 2, false);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(l.check_at(ip, 0), Verdict::Pass);
        assert_eq!(l.check_at(ip, 0), Verdict::Delay(Duration::from_millis(100)));
        assert_eq!(l.check_at(ip, 0), Verdict::Delay(Duration::from_millis(200)));
        assert_eq!(l.check_at(ip, 0), Verdict::Reject);
    }

    #[test]
    fn share_scales_the_rate() {
        let l = limiter(10.0, 0, true);
        l.set_share(0.5);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(l.check_at(ip, 0), Verdict::Pass);
        assert_eq!(l.check_at(ip, 150_000), Verdict::Reject); // interval is now 200 ms
        assert_eq!(l.check_at(ip, 200_000), Verdict::Pass);
    }
}
