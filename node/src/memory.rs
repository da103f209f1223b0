//! Giving memory back to the system after a burst of connections ends. The allocator keeps
//! freed pages for reuse and returns them only when a thread that allocates asks it to, and a
//! proxy worker whose clients have left allocates nothing more: without a nudge, RSS would
//! stay at the burst's peak. The binary knows its allocator and registers how to release
//! (`set_release`); each proxy worker calls it for a few seconds after connections close or a
//! run of requests ends.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Returns the calling thread's free memory to the system.
pub type Release = fn();

static RELEASE: OnceLock<Release> = OnceLock::new();

/// Registers how to release memory (once; later calls are ignored).
pub fn set_release(release: Release) {
    let _ = RELEASE.set(release);
}

/// How often a worker looks at the connection and request counts.
const TICK: Duration = Duration::from_secs(1);
/// After a fall or a quiet tick, how many ticks release: the allocator hands pages back only once
/// they have been free for a while (mimalloc's `purge_delay`, 1 s), so one call is too early.
const RELEASE_TICKS: u32 = 3;

/// Runs on one proxy worker for its life: whenever `open` (the connections open on the node)
/// fell since the last tick, or `requests` (served on the node) stopped moving after it moved,
/// releases this thread's free memory on the next few ticks. A worker that keeps serving
/// steadily releases once a second at most.
pub async fn release_after_bursts(open: &AtomicU64, requests: &AtomicU64) {
    let Some(release) = RELEASE.get().copied() else { return };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_open, mut last_requests) = (open.load(Relaxed), requests.load(Relaxed));
    let (mut was_busy, mut left) = (false, 0);
    loop {
        tick.tick().await;
        let (now_open, now_requests) = (open.load(Relaxed), requests.load(Relaxed));
        let busy = now_requests != last_requests;
        if now_open < last_open || (was_busy && !busy) {
            left = RELEASE_TICKS;
        }
        (last_open, last_requests, was_busy) = (now_open, now_requests, busy);
        if left > 0 {
            left -= 1;
            release();
        }
    }
}
