//! Rate limiting per client IP, like nginx `limit_req` (`rate`, `burst`, `nodelay`), as a
//! leaky bucket per key counted in requests: one level and one timestamp per key, no timers.
//!
//! The level drains at the node's rate; a request is admitted when the level is at most
//! `burst`, and adds one. With `nodelay` an admitted request goes through at once; without it,
//! it waits until the requests before it have drained (nginx's delaying of excess requests).
//! Keys live in 64 shards behind short, non-async mutexes. The level is kept in requests, not
//! as a time ahead (GCRA's TAT): when the cluster share changes, only the drain speed does, so
//! a request admitted while the share was briefly tiny (a node that has not yet published its
//! rate) costs one request, not one slow interval of many seconds.
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
    /// Per key: (level in requests, when it was last updated in µs).
    shards: Vec<Mutex<HashMap<IpAddr, (f64, u64)>>>,
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

    fn shard(&self, key: &IpAddr) -> &Mutex<HashMap<IpAddr, (f64, u64)>> {
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
        /// Levels below this are empty (float residue of draining).
        const EMPTY: f64 = 1e-9;
        let rate = self.settings.per_second * self.share();
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        let (level, at) = shard.get(&key).copied().unwrap_or((0.0, now_us));
        let drained = now_us.saturating_sub(at) as f64 / 1e6 * rate;
        let level = (level - drained).max(0.0);
        if level > self.settings.burst as f64 + EMPTY {
            shard.insert(key, (level, now_us));
            drop(shard);
            self.rejected.fetch_add(1, Relaxed);
            return Verdict::Reject;
        }
        shard.insert(key, (level + 1.0, now_us));
        if shard.len() > 4096 {
            shard.retain(|_, (_, t)| *t + IDLE_FORGET_MS * 1000 > now_us);
        }
        if self.settings.nodelay || level <= EMPTY {
            Verdict::Pass
        } else {
            Verdict::Delay(Duration::from_secs_f64(level / rate))
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

    #[test]
    fn a_brief_tiny_share_does_not_block_a_client_for_long() {
        // A node that has not published its rate yet gets the floor share for a moment.
        let l = limiter(10.0, 0, true);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        l.set_share(0.01);
        assert_eq!(l.check_at(ip, 0), Verdict::Pass);
        l.set_share(1.0);
        // One request of debt drains in one interval of the real rate (100 ms), not in the
        // 10 s interval of the floor share.
        assert_eq!(l.check_at(ip, 50_000), Verdict::Reject);
        assert_eq!(l.check_at(ip, 100_000), Verdict::Pass);
    }

    /// Keys that land in the same shard as `first` (10.x.y.z), `first` excluded.
    fn same_shard_keys(l: &Limiter, first: IpAddr) -> impl Iterator<Item = IpAddr> + '_ {
        let target = l.shard(&first) as *const _;
        (0..u32::MAX)
            .map(|n| IpAddr::from((10u32 << 24 | (n & 0x00ff_ffff)).to_be_bytes()))
            .take(1 << 22)
            .filter(move |k| *k != first && std::ptr::eq(l.shard(k), target))
    }

    #[test]
    fn keys_idle_over_60_s_are_forgotten_once_a_shard_grows_past_4096() {
        // OPERATIONS.md: "one rate-limit entry per active client IP (forgotten after 60 s idle)".
        // The code prunes a shard when it grows past 4096 keys; this fills one shard past that
        // with keys seen at t = 61 s and checks that a key idle for 61 s is gone, one idle for
        // 59 s is kept, and nothing was pruned before the shard outgrew 4096.
        let l = limiter(1.0, 0, true);
        let old: IpAddr = "10.200.0.1".parse().unwrap();
        let t_old = 5_000_000;
        let now = t_old + 61_000_000;
        assert_eq!(l.check_at(old, t_old), Verdict::Pass);
        // The old key is rejected right after (burst 0, 1 req/s): it has state.
        assert_eq!(l.check_at(old, t_old + 1), Verdict::Reject);
        let mut keys = same_shard_keys(&l, old);
        let recent = keys.next().unwrap();
        assert_eq!(l.check_at(recent, now - 59_000_000), Verdict::Pass);
        let shard_len = || l.shard(&old).lock().unwrap().len();
        let has = |k: &IpAddr| l.shard(&old).lock().unwrap().contains_key(k);
        // old + recent + 4094 fresh = 4096 keys: no pruning yet.
        let fresh: Vec<IpAddr> = keys.by_ref().take(4095).collect();
        assert_eq!(fresh.len(), 4095, "not enough keys for one shard");
        for k in &fresh[..4094] {
            assert_eq!(l.check_at(*k, now), Verdict::Pass);
        }
        assert_eq!(shard_len(), 4096);
        assert!(has(&old), "pruned before the shard grew past 4096");
        // The 4097th key: the shard is pruned of keys idle for 60 s or more.
        assert_eq!(l.check_at(fresh[4094], now), Verdict::Pass);
        assert!(!has(&old), "a key idle for 61 s was kept");
        assert!(has(&recent), "a key idle for 59 s was forgotten");
        assert_eq!(shard_len(), 4096);
        for k in &fresh {
            assert!(has(k), "a fresh key was forgotten");
        }
        // Forgotten is as if new: the old key passes at once.
        assert_eq!(l.check_at(old, now), Verdict::Pass);
    }
}
