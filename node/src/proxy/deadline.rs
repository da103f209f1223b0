//! Timeouts that cost nothing when the work is done at once. Most writes on the request path
//! (a head to a backend, a small response to a client) finish at their first poll: the socket
//! has room. `tokio::time::timeout` reads the clock and takes a handle on the runtime's timer
//! as it is made, whether or not it is ever needed; [`within`] polls the work once first and
//! starts the clock only when the work has to wait.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// The work ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `work` for at most `limit` from its first wait: `Err(Elapsed)` when it is not done by
/// then. Work done at its first poll reads no clock and arms no timer.
pub async fn within<F: Future>(limit: Duration, work: F) -> Result<F::Output, Elapsed> {
    let mut work = pin!(work);
    if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await {
        return Ok(out);
    }
    tokio::time::timeout(limit, work).await.map_err(|_| Elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_done_at_once_or_in_time_is_returned_and_late_work_is_cut_off() {
        assert_eq!(within(Duration::ZERO, async { 7 }).await, Ok(7), "done at once");
        let in_time = within(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            8
        });
        assert_eq!(in_time.await, Ok(8));
        let started = std::time::Instant::now();
        let late = within(Duration::from_millis(200), async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            9
        });
        assert_eq!(late.await, Err(Elapsed));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(5), "cut off at the limit: {took:?}");
    }
}
