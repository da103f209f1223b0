//! The kept-alive HTTP/1.1 connections of one proxy worker that wait for their next request.
//! One sweeper per worker keeps their `keepalive_timeout` on a coarse clock and closes them all
//! when the node drains, so a waiting connection holds neither a timer nor a cancellation
//! future of its own: only a slot here (a waker and a deadline) and its socket's readiness.
//! Every proxy worker is one thread whose connections never move, so the registry is a
//! thread-local: no lock, no atomic.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a wait for the next request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The client sent something (or closed: a read tells).
    Readable,
    /// `keepalive_timeout` passed.
    TimedOut,
    /// The node drains: idle connections close.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Waiting,
    Woken(Woke),
}

struct Slot {
    /// Milliseconds since the registry's epoch.
    until: u64,
    waker: Option<Waker>,
    state: State,
}

#[derive(Default)]
struct Registry {
    epoch: Option<Instant>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    waiting: usize,
    closing: bool,
}

thread_local! {
    static IDLE: RefCell<Registry> = RefCell::new(Registry::default());
}

impl Registry {
    fn millis(&mut self, at: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(at);
        at.saturating_duration_since(epoch).as_millis() as u64
    }

    fn register(&mut self, timeout_ms: u64, waker: &Waker) -> u32 {
        let until = self.millis(Instant::now()).saturating_add(timeout_ms);
        let slot = Slot { until, waker: Some(waker.clone()), state: State::Waiting };
        self.waiting += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn release(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        if slot.state == State::Waiting {
            self.waiting -= 1;
        }
        *slot = Slot { until: 0, waker: None, state: State::Free };
        self.free.push(i);
        // After a burst: give the memory back once nobody waits.
        if self.free.len() == self.slots.len() && self.slots.capacity() > 1024 {
            self.slots = Vec::new();
            self.free = Vec::new();
        }
    }

    /// Wakes the waiting slots whose deadline has passed (all of them when closing).
    fn sweep(&mut self, now: Instant) {
        if self.waiting == 0 {
            return;
        }
        let now = self.millis(now);
        let closing = self.closing;
        for slot in &mut self.slots {
            if slot.state == State::Waiting && (closing || slot.until <= now) {
                slot.state = State::Woken(if closing { Woke::Closing } else { Woke::TimedOut });
                self.waiting -= 1;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

/// Waits until `stream` is readable, `timeout` has passed (to within one sweep tick, never
/// earlier), or the worker closes its idle connections. The future is three words: it is
/// what a kept-alive connection's task holds while it waits.
pub fn wait(stream: &TcpStream, timeout: Duration) -> Wait<'_> {
    Wait { stream, timeout_ms: timeout.as_millis() as u64, slot: None }
}

/// The future of [`wait`]; its slot in the registry is freed when it ends or is dropped.
pub struct Wait<'a> {
    stream: &'a TcpStream,
    timeout_ms: u64,
    slot: Option<u32>,
}

impl Future for Wait<'_> {
    type Output = std::io::Result<Woke>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(r) = this.stream.poll_read_ready(cx) {
            return Poll::Ready(r.map(|()| Woke::Readable));
        }
        IDLE.with_borrow_mut(|idle| {
            if idle.closing {
                return Poll::Ready(Ok(Woke::Closing));
            }
            let Some(i) = this.slot else {
                this.slot = Some(idle.register(this.timeout_ms, cx.waker()));
                return Poll::Pending;
            };
            let s = &mut idle.slots[i as usize];
            match s.state {
                State::Woken(why) => Poll::Ready(Ok(why)),
                _ => {
                    if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        s.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // At thread exit the registry may be gone before the last connections.
            let _ = IDLE.try_with(|idle| idle.borrow_mut().release(i));
        }
    }
}

/// Runs for the worker's life: every `tick` times out the connections whose
/// `keepalive_timeout` has passed; once `close_idle` fires, closes every idle connection
/// (and any that turns idle later).
pub async fn sweep(keepalive_timeout: Duration, close_idle: CancellationToken) {
    let tick = (keepalive_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            now = ticks.tick() => IDLE.with_borrow_mut(|idle| idle.sweep(now)),
            _ = close_idle.cancelled() => break,
        }
    }
    IDLE.with_borrow_mut(|idle| {
        idle.closing = true;
        idle.sweep(Instant::now());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn waits_end_on_bytes_on_timeout_and_on_closing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut client, (server, _)) = tokio::try_join!(TcpStream::connect(addr), listener.accept()).unwrap();
        let close = CancellationToken::new();
        let timeout = Duration::from_millis(400);
        let sweeper = tokio::spawn(sweep(timeout, close.clone()));

        // As the connection does: a readiness that finds nothing to read is waited again.
        let mut buf = [0u8; 8];
        let mut wait_for = async |timeout: Duration| loop {
            match wait(&server, timeout).await.unwrap() {
                Woke::Readable => match server.try_read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    read => break Ok::<_, std::io::Error>(Some(read.unwrap())),
                },
                why => {
                    break Ok(match why {
                        Woke::TimedOut => None,
                        _ => Some(usize::MAX),
                    });
                }
            }
        };

        // Nothing sent: times out after 400 ms (a 50 ms tick late, or a busy machine's more),
        // never before.
        let started = Instant::now();
        assert_eq!(wait_for(timeout).await.unwrap(), None);
        let waited = started.elapsed();
        assert!(waited >= timeout && waited <= Duration::from_secs(3), "{waited:?}");

        // Bytes arrive: readable.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET").await.unwrap();
        assert_eq!(wait_for(Duration::from_secs(60)).await.unwrap(), Some(3));

        // Closing wakes a waiting connection, and any later wait ends at once.
        let closer = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            close.cancel();
        };
        let (woke, ()) = tokio::join!(wait_for(Duration::from_secs(60)), closer);
        assert_eq!(woke.unwrap(), Some(usize::MAX), "closing");
        assert_eq!(wait_for(Duration::from_secs(60)).await.unwrap(), Some(usize::MAX), "closing, later");
        sweeper.await.unwrap();
        IDLE.with_borrow(|idle| assert_eq!((idle.waiting, idle.free.len()), (0, idle.slots.len())));
    }
}
