//! Gossip pacing: keeps the bytes a member sends near its budget (`cluster.gossip_budget`),
//! whatever the cluster's size or load, by holding back some of the SYNs that open gossip
//! exchanges.
//!
//! chitchat opens an exchange with three random peers every `gossip_interval`, and every SYN
//! and SYN-ACK carries a digest naming every member, so what a member sends grows with the
//! cluster (34 KB/s at 50 members with compressed digests, `BENCHMARKS.md`). The transport asks
//! [`Pace::may_open`] before it sends a SYN; replies (SYN-ACK, ACK) always go, because a peer is
//! waiting for them, and count against the budget like everything sent. Since every member
//! paces its SYNs, the replies it owes are paced by its peers. A token bucket holding half a
//! second of budget decides:
//! - a SYN goes when the bucket is not in debt;
//! - an *urgent* SYN (passing a hot change on, see `rumor`) goes whatever the debt, within an
//!   allowance of its own ([`URGENT_PER_SECOND`], a burst as large): a few changes a second
//!   spread at once, a script making thousands is not a flood;
//! - at least one SYN goes per second whatever the bucket says, so a member is never silent
//!   (its peers would take it for dead);
//! - a SYN to an address that is not a live member (chitchat's probes of dead members and
//!   seeds, which come last in its rounds and would otherwise lose to live peers every time)
//!   goes at least once per second too, so two halves of a healed partition find each other;
//! - the debt is bounded ([`MAX_DEBT_SECONDS`] of budget): a burst of replies (a joiner's full
//!   state) slows the member's own rounds for seconds, not minutes.
//!
//! A small cluster stays under its budget and gossips every round, as before; a large one
//! opens fewer exchanges, each carrying the newest heartbeats and loads of every member it
//! knows, so failure detection and load reports slow down gently instead of the bytes growing.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// The bucket holds this much of a second's budget (a round's burst of SYNs fits in it).
const BURST: f64 = 0.5;
/// A member opens at least one exchange this often, budget or not.
pub const FLOOR_MS: u64 = 1000;
/// The bucket's debt is bounded at this many seconds of budget.
pub const MAX_DEBT_SECONDS: f64 = 5.0;
/// An urgent mark is used by a SYN sent within this time, or forgotten.
const URGENT_MS: u64 = 500;
/// Urgent SYNs allowed per second (and in a burst): three changes passed on to three peers.
pub const URGENT_PER_SECOND: f64 = 9.0;

/// The token bucket, on a millisecond clock the caller gives (pure, so it can be tested).
#[derive(Debug)]
struct Bucket {
    /// Bytes per second; 0 = no limit.
    budget: f64,
    tokens: f64,
    /// Urgent SYNs allowed now.
    urgent_tokens: f64,
    at_ms: u64,
    /// When the last SYN went (`None` before the first).
    opened_ms: Option<u64>,
    /// Peers whose next SYN is urgent, with when they were marked.
    urgent: Vec<(SocketAddr, u64)>,
    /// The live members' gossip addresses (`None` until told: every address counts as live).
    live: Option<HashSet<SocketAddr>>,
    /// When the last SYN to an address outside `live` went.
    probed_ms: Option<u64>,
}

impl Bucket {
    fn new(budget: u64) -> Bucket {
        let budget = budget as f64;
        Bucket {
            budget,
            tokens: budget * BURST,
            urgent_tokens: URGENT_PER_SECOND,
            at_ms: 0,
            opened_ms: None,
            urgent: Vec::new(),
            live: None,
            probed_ms: None,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + self.budget * elapsed).min(self.budget * BURST);
        self.urgent_tokens = (self.urgent_tokens + URGENT_PER_SECOND * elapsed).min(URGENT_PER_SECOND);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn may_open(&mut self, to: SocketAddr, now_ms: u64) -> bool {
        if self.budget == 0.0 {
            return true;
        }
        self.refill(now_ms);
        self.urgent.retain(|&(_, at)| now_ms.saturating_sub(at) < URGENT_MS);
        let urgent = match self.urgent.iter().position(|&(addr, _)| addr == to) {
            Some(i) => {
                self.urgent.swap_remove(i);
                true
            }
            None => false,
        };
        let overdue = self.opened_ms.is_none_or(|at| now_ms.saturating_sub(at) >= FLOOR_MS);
        let probe = self.live.as_ref().is_some_and(|live| !live.contains(&to));
        let probe_due = probe && self.probed_ms.is_none_or(|at| now_ms.saturating_sub(at) >= FLOOR_MS);
        let open = if urgent && self.urgent_tokens >= 1.0 {
            self.urgent_tokens -= 1.0;
            true
        } else {
            self.tokens >= 0.0 || overdue || probe_due
        };
        if open {
            self.opened_ms = Some(now_ms);
            if probe {
                self.probed_ms = Some(now_ms);
            }
        }
        open
    }

    fn spent(&mut self, bytes: usize, now_ms: u64) {
        if self.budget > 0.0 {
            self.refill(now_ms);
            self.tokens = (self.tokens - bytes as f64).max(-self.budget * MAX_DEBT_SECONDS);
        }
    }

    fn mark_urgent(&mut self, to: SocketAddr, now_ms: u64) {
        if self.budget > 0.0 && !self.urgent.iter().any(|&(addr, _)| addr == to) {
            self.urgent.push((to, now_ms));
        }
    }
}

/// One member's gossip pace, shared by its transport (which asks and reports) and the task
/// spreading hot changes (which marks its SYNs urgent). Touched a few dozen times a second,
/// never on the request path.
#[derive(Debug)]
pub struct Pace {
    bucket: Mutex<Bucket>,
    epoch: Instant,
    /// SYNs held back by the budget (`shoal_gossip_paced_syns_total`).
    pub held_back: AtomicU64,
}

impl Pace {
    /// A pace of `budget` bytes per second; 0 sends every SYN.
    pub fn new(budget: u64) -> Pace {
        Pace { bucket: Mutex::new(Bucket::new(budget)), epoch: Instant::now(), held_back: AtomicU64::new(0) }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a SYN to `to` may go now (and, if so, that it went).
    pub fn may_open(&self, to: SocketAddr) -> bool {
        let now = self.now_ms();
        let open = self.bucket().may_open(to, now);
        if !open {
            self.held_back.fetch_add(1, Relaxed);
        }
        open
    }

    /// Counts `bytes` sent.
    pub fn spent(&self, bytes: usize) {
        let now = self.now_ms();
        self.bucket().spent(bytes, now);
    }

    /// The live members' gossip addresses (from the view task); a SYN to any other address is
    /// a probe of a dead member or a seed.
    pub fn set_live(&self, live: HashSet<SocketAddr>) {
        self.bucket().live = Some(live);
    }

    /// The next SYN to `to` (within half a second) passes a hot change on: it goes whatever the
    /// debt, within the urgent allowance.
    pub fn mark_urgent(&self, to: SocketAddr) {
        let now = self.now_ms();
        self.bucket().mark_urgent(to, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 7946))
    }

    /// Three SYNs every 150 ms, each exchange costing `cost` bytes sent; returns the bytes
    /// sent per second over `secs` and the SYNs that went.
    fn run(bucket: &mut Bucket, cost: usize, secs: u64) -> (f64, u64) {
        let (mut sent, mut opened) = (0usize, 0u64);
        for round in 0..secs * 1000 / 150 {
            for p in 1..=3 {
                if bucket.may_open(peer(p), round * 150) {
                    bucket.spent(cost, round * 150);
                    sent += cost;
                    opened += 1;
                }
            }
        }
        (sent as f64 / secs as f64, opened)
    }

    #[test]
    fn under_budget_every_syn_goes() {
        let mut b = Bucket::new(8192);
        let (rate, opened) = run(&mut b, 300, 60);
        assert_eq!(opened, 3 * (60_000 / 150));
        assert!(rate < 8192.0);
    }

    #[test]
    fn over_budget_the_rate_settles_at_the_budget() {
        let mut b = Bucket::new(8192);
        // A round would cost 3 x 2,000 bytes: 40 KB/s unpaced.
        let (rate, opened) = run(&mut b, 2000, 120);
        assert!((rate - 8192.0).abs() < 8192.0 * 0.05, "{rate}");
        assert!(opened < 3 * (120_000 / 150) / 4, "{opened}");
    }

    #[test]
    fn a_member_is_never_silent() {
        // Each exchange costs more than the budget allows in ten seconds.
        let mut b = Bucket::new(1000);
        let (_, opened) = run(&mut b, 10_000, 60);
        assert!((58..=62).contains(&opened), "{opened}");
    }

    #[test]
    fn urgent_syns_go_in_debt_within_their_own_allowance() {
        let mut b = Bucket::new(1000);
        assert!(b.may_open(peer(1), 0));
        b.spent(50_000, 0); // 50 s of debt
        assert!(!b.may_open(peer(2), 10));
        b.mark_urgent(peer(2), 10);
        assert!(!b.may_open(peer(3), 10), "the mark is for one peer");
        assert!(b.may_open(peer(2), 10));
        assert!(!b.may_open(peer(2), 10), "the mark is for one SYN");
        // The allowance: URGENT_PER_SECOND in a burst (one used above), then that rate.
        let mut opened = 1;
        for t in 0..2000u64 {
            b.mark_urgent(peer(2), 10 + t);
            opened += u32::from(b.may_open(peer(2), 10 + t));
        }
        let want = (URGENT_PER_SECOND * 3.0) as u32;
        assert!((want - 1..=want + 1).contains(&opened), "{opened} urgent SYNs in 2 s");
    }

    #[test]
    fn urgent_marks_expire() {
        let mut b = Bucket::new(1000);
        assert!(b.may_open(peer(1), 0));
        b.spent(1400, 0); // 500 - 1400 = -900
        b.mark_urgent(peer(2), 0);
        // At 600 ms the bucket is still in debt (-300) and the member spoke 600 ms ago.
        assert!(!b.may_open(peer(2), URGENT_MS + 100));
    }

    #[test]
    fn probes_of_dead_members_and_seeds_go_once_a_second() {
        let mut b = Bucket::new(1000);
        b.live = Some([peer(1)].into());
        assert!(b.may_open(peer(1), 0));
        b.spent(20_000, 0);
        // A live peer waits for the floor; a probe (peer 9 is not live) goes once a second.
        assert!(!b.may_open(peer(1), 100));
        assert!(b.may_open(peer(9), 100));
        assert!(!b.may_open(peer(9), 600));
        assert!(b.may_open(peer(9), 1100));
    }

    #[test]
    fn debt_is_bounded() {
        let mut b = Bucket::new(1000);
        b.spent(1_000_000, 0);
        assert_eq!(b.tokens, -1000.0 * MAX_DEBT_SECONDS);
        // Five and a half seconds later the bucket is out of debt (the floor kept away).
        b.opened_ms = Some(5_400);
        assert!(b.may_open(peer(1), 5_500) && b.tokens >= 0.0);
    }

    #[test]
    fn no_budget_sends_everything() {
        let mut b = Bucket::new(0);
        let (_, opened) = run(&mut b, 1_000_000, 10);
        assert_eq!(opened, 3 * (10_000 / 150));
    }
}
