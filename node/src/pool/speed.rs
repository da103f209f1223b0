//! A backend's response-time estimate, for the least-conn picker: how long its response heads
//! take, as this node measures them and as the peers report them.
//!
//! - **Own**: a peak-sensitive, decaying average of this node's own times (after Finagle's and
//!   linkerd's peak-EWMA): slower responses raise it quickly, with the time constant
//!   [`RISE_MS`], and faster ones bring it down slowly, with [`DECAY_MS`]. Finagle's estimate
//!   jumps to any slower sample at once; under load that made one response delayed by
//!   scheduling (a few milliseconds, on any backend) cut that backend's share for seconds, and
//!   equal backends took turns at being avoided. A backend that stays slow for [`RISE_MS`] is
//!   still marked slow within that time, and a sample after a quiet spell of 60 ms or more
//!   (light load) counts almost in full, as before. The weights follow the time between
//!   samples, so under load the estimate moves with time, not with the number of answers (a
//!   sample in the same millisecond as the one before counts for nothing).
//! - **Forgetting**: while a backend gets no requests its estimate fades toward zero with
//!   [`FORGET_MS`], so a backend avoided for being slow is tried again now and then (about every
//!   `FRESH_MS + FORGET_MS * ln(slow / (1.5 x fast))`, when it fades into the picker's band of
//!   equals), and one that recovered wins its traffic back. A trial
//!   that finds it still slow raises the estimate again at once.
//! - **Shared**: each node gossips its own estimate (quantised, see [`quantise`]); a node that
//!   has not sampled a backend for [`FRESH_MS`] uses the larger of its own faded estimate and the
//!   peers' mean, so one node's lesson spares the others the same slow requests.
//!
//! Lock-free: two atomics written by the responses, one by the view task; races between
//! concurrent responses lose a sample at worst.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Time constant of the average while the backend answers faster than its estimate.
pub const DECAY_MS: f64 = 2_000.0;
/// Time constant of the average while it answers slower.
pub const RISE_MS: f64 = 20.0;
/// Time constant of the fading while it gets no requests.
pub const FORGET_MS: f64 = 5_000.0;
/// Own samples younger than this make the peers' reports unnecessary.
pub const FRESH_MS: u64 = 1_000;
/// A failure counts as at least twice this.
pub const FAILURE_FLOOR_US: u64 = 5_000;
/// Failures raise an estimate to this at most (a minute).
pub const FAILURE_CAP_US: u64 = 60_000_000;

#[derive(Debug, Default)]
pub struct Speed {
    /// Own estimate in microseconds as of `own_at_ms` (0 = never sampled).
    own_us: AtomicU64,
    /// When the last own sample arrived, in [`crate::pool::now_ms`].
    own_at_ms: AtomicU64,
    /// The mean of the live peers' reports, microseconds (0 = none).
    remote_us: AtomicU64,
}

fn faded(us: u64, age_ms: u64) -> u64 {
    if us == 0 || age_ms == 0 {
        return us;
    }
    (us as f64 * (-(age_ms as f64) / FORGET_MS).exp()) as u64
}

impl Speed {
    /// One response head after `took`, at `now_ms`.
    pub fn observe(&self, took: Duration, now_ms: u64) {
        let sample = (took.as_micros() as u64).max(1);
        let (old, at) = (self.own_us.load(Relaxed), self.own_at_ms.load(Relaxed));
        let age = now_ms.saturating_sub(at);
        let new = if old == 0 {
            sample
        } else {
            let tau = if sample >= old { RISE_MS } else { DECAY_MS };
            let w = (-(age as f64) / tau).exp();
            ((old as f64) * w + (sample as f64) * (1.0 - w)).max(1.0) as u64
        };
        self.own_us.store(new, Relaxed);
        self.own_at_ms.store(now_ms, Relaxed);
    }

    /// A failure (refused, timed out, a retryable status): the estimate doubles (from at
    /// least [`FAILURE_FLOOR_US`]), so repeated failures push the backend away quickly and an
    /// occasional one is forgotten within a few seconds of good answers.
    pub fn penalise(&self, now_ms: u64) {
        let base = self.estimate(now_ms).max(FAILURE_FLOOR_US);
        self.own_us.store(base.saturating_mul(2).min(FAILURE_CAP_US), Relaxed);
        self.own_at_ms.store(now_ms, Relaxed);
    }

    /// This node's own estimate, faded by the time since its last sample (what it gossips).
    pub fn own(&self, now_ms: u64) -> u64 {
        let age = now_ms.saturating_sub(self.own_at_ms.load(Relaxed));
        faded(self.own_us.load(Relaxed), age.saturating_sub(FRESH_MS))
    }

    /// The estimate the picker uses, microseconds (0 = nothing known).
    #[inline]
    pub fn estimate(&self, now_ms: u64) -> u64 {
        let own = self.own_us.load(Relaxed);
        let age = now_ms.saturating_sub(self.own_at_ms.load(Relaxed));
        if own != 0 && age < FRESH_MS {
            return own;
        }
        faded(own, age.saturating_sub(FRESH_MS)).max(self.remote_us.load(Relaxed))
    }

    /// The peers' mean report (written by the view task).
    pub fn set_remote(&self, us: u64) {
        self.remote_us.store(us, Relaxed);
    }

    pub fn remote(&self) -> u64 {
        self.remote_us.load(Relaxed)
    }
}

/// Rounds `us` to a step of a geometric scale (about 19% apart), so the gossiped value changes
/// only when the estimate really moves, not with every sample.
pub fn quantise(us: u64) -> u64 {
    if us == 0 {
        return 0;
    }
    const STEP: f64 = 1.189_207_115_002_721; // 2^(1/4)
    let k = ((us as f64).ln() / STEP.ln()).round();
    STEP.powf(k).round().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_quickly_and_decays_slowly() {
        let s = Speed::default();
        s.observe(Duration::from_millis(1), 0);
        assert_eq!(s.estimate(0), 1_000);
        // Under load (a sample every millisecond), one response delayed by scheduling nudges
        // the estimate; it does not make the backend look slow.
        s.observe(Duration::from_millis(5), 1);
        let e = s.estimate(1);
        assert!((1_000..1_250).contains(&e), "{e}");
        // A backend that turns slow and stays slow is marked slow within RISE_MS or so.
        for t in 2..=30 {
            s.observe(Duration::from_millis(20), t);
        }
        let e = s.estimate(30);
        assert!(e > 12_000, "{e}");
        // Fast answers for a while bring it back near 1 ms.
        for t in 1..=100 {
            s.observe(Duration::from_millis(1), 60 + t * 100);
        }
        let e = s.estimate(10_060);
        assert!(e < 1_500, "{e}");
        // At light load (one answer after a quiet spell) a slow answer counts almost in full.
        s.observe(Duration::from_millis(20), 12_000);
        let e = s.estimate(12_000);
        assert!(e > 19_000, "{e}");
    }

    #[test]
    fn an_unsampled_backend_fades_and_peers_reports_count() {
        let s = Speed::default();
        s.observe(Duration::from_millis(25), 0);
        assert_eq!(s.estimate(500), 25_000);
        // Unsampled: fades after FRESH_MS, so it is tried again eventually.
        let later = s.estimate(1_000 + 15_000);
        assert!(later < 2_000, "{later}");
        // A peer that found it slow keeps it slow here too.
        s.set_remote(24_000);
        assert_eq!(s.estimate(16_000), 24_000);
        // Fresh own samples win over the peers' reports.
        s.observe(Duration::from_millis(2), 16_000);
        let e = s.estimate(16_100);
        assert!((2_000..2_100).contains(&e), "{e}");
    }

    #[test]
    fn failures_double_the_estimate_and_good_answers_bring_it_back() {
        let s = Speed::default();
        s.observe(Duration::from_millis(1), 0);
        s.penalise(10);
        assert_eq!(s.estimate(10), 2 * FAILURE_FLOOR_US);
        s.penalise(20);
        assert_eq!(s.estimate(20), 4 * FAILURE_FLOOR_US);
        for t in 1..=50 {
            s.observe(Duration::from_millis(1), 20 + t * 200);
        }
        assert!(s.estimate(10_020) < 1_500, "{}", s.estimate(10_020));
    }

    #[test]
    fn quantised_values_are_stable_steps() {
        assert_eq!(quantise(0), 0);
        for us in [1u64, 7, 900, 1_000, 1_050, 25_000, 3_000_000] {
            let q = quantise(us);
            assert!((q as f64 / us as f64 - 1.0).abs() < 0.1, "{us} -> {q}");
            assert_eq!(quantise(q), q, "a step maps to itself");
        }
        assert_eq!(quantise(1_000), quantise(1_040));
    }
}
