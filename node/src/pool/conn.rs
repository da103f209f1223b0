//! Upstream HTTP/1.1 connections: connecting with a timeout, and the per-backend queue of idle
//! keep-alive connections (`keepalive` in the config). The queue is a lock-free `ArrayQueue`;
//! a connection goes back only after its response body was read to the end. The HTTP/1.1
//! exchange on a connection is `proxy::upstream`'s.
//!
//! How many stay: each proxy worker keeps `keepalive` x backends idle connections for good
//! (the pool's idle budget). A burst that needed more leaves its extra connections idle too
//! (up to [`MAX_SHARE`] x `keepalive` per backend), and the worker closes them once they went
//! unused for a whole [`TRIM_EVERY`] ([`IdleBudget::unused_surplus`], the fewest idle
//! connections the worker held since its last trim, less the budget). Closing a burst's
//! connections at once, as nginx does, only to open them again at the next burst, cost a
//! connect, an accept and a close for every third request at 256 clients over 64 idle slots
//! (docs/BENCHMARKS.md); keeping them a second longer does not raise the most connections a
//! backend sees, which is what the burst itself opened.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::buffers;
use crate::tls::upstream::UpstreamTls;

/// The byte stream to a backend: plain TCP, or TLS over it (`[upstream] tls = true`).
#[derive(Debug)]
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            UpstreamStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// An HTTP/1.1 connection to a backend, ready to send one request.
#[derive(Debug)]
pub struct Upstream {
    pub stream: UpstreamStream,
    /// Bytes read from the backend and not yet consumed (`buffers::UPSTREAM_SIZE`, grown when a
    /// response head needs more). An idle connection in the queue holds none.
    pub read_buf: BytesMut,
    /// Whether the connection came from the idle queue (it may have been closed meanwhile).
    pub reused: bool,
}

impl Upstream {
    fn new(stream: UpstreamStream) -> Self {
        Upstream { stream, read_buf: buffers::take_upstream(), reused: false }
    }

    /// Whether an idle connection can carry a request: the backend has neither closed it nor
    /// sent anything unasked. Costs no syscall unless the socket was signalled readable since
    /// its last read (reads that drain the socket clear the readiness).
    fn still_open(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if let UpstreamStream::Tls(tls) = &mut self.stream {
            // TLS: records may have come that carry no data (a TLS 1.3 session ticket); one
            // read takes them. Still open: nothing to read yet.
            let mut probe = [0u8; 1];
            let mut buf = ReadBuf::new(&mut probe);
            return Pin::new(&mut **tls).poll_read(&mut cx, &mut buf).is_pending();
        }
        let tcp = self.stream.tcp();
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Why a new upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
}

/// Most proxy worker threads with their own idle queues; workers beyond share the last one.
const MAX_WORKER_QUEUES: usize = 16;

thread_local! {
    /// The proxy worker this thread is (0 for every other thread).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as proxy worker `index`, so it uses its own idle queues.
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index.min(MAX_WORKER_QUEUES - 1)));
}

/// The proxy worker this thread is (0 for every other thread).
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// How often each proxy worker closes the idle connections it holds over its budget that no
/// request needed since the last time (a burst's extra connections live 1-2 of these).
pub const TRIM_EVERY: Duration = Duration::from_secs(1);

/// One worker's idle counts, on a cache line of their own: its requests write them.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WorkerIdle {
    /// Idle connections the worker holds.
    used: AtomicUsize,
    /// The fewest it held since its last trim.
    low: AtomicUsize,
    /// When it last trimmed (ms on the caller's clock): workers past the 16th share the last
    /// slot, and only one of them trims it per period.
    trimmed_ms: AtomicU64,
}

/// How many idle connections each proxy worker keeps for good over all backends of the pool:
/// `keepalive` per backend on average, so a backend that is momentarily busier than the others
/// keeps more instead of closing connections it will open again a moment later (nginx's
/// `keepalive` is likewise one cache per worker for the whole upstream). A worker may hold
/// more for a while: [`IdleBudget::unused_surplus`] says how many of them to close.
#[derive(Debug, Default)]
pub struct IdleBudget {
    limit: AtomicUsize,
    workers: [WorkerIdle; MAX_WORKER_QUEUES],
}

impl IdleBudget {
    /// Sets the per-worker limit (`keepalive` times the number of backends).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    fn add(&self, worker: usize) {
        self.workers[worker].used.fetch_add(1, Relaxed);
    }

    fn release(&self, worker: usize, n: usize) {
        let w = &self.workers[worker];
        let left = w.used.fetch_sub(n, Relaxed).saturating_sub(n);
        if left < w.low.load(Relaxed) {
            w.low.fetch_min(left, Relaxed);
        }
    }

    /// Whether `worker`'s trim is due at `now_ms`: claims the period, so of several workers
    /// sharing a slot only one trims it.
    pub fn trim_due(&self, worker: usize, now_ms: u64) -> bool {
        let at = &self.workers[worker].trimmed_ms;
        let last = at.load(Relaxed);
        let period = TRIM_EVERY.as_millis() as u64;
        now_ms >= last + period * 9 / 10 && at.compare_exchange(last, now_ms, Relaxed, Relaxed).is_ok()
    }

    /// How many of `worker`'s idle connections over the limit stayed idle all along since its
    /// last trim: no request needed them, so they can close.
    pub fn unused_surplus(&self, worker: usize) -> usize {
        let w = &self.workers[worker];
        let low = w.low.load(Relaxed).min(w.used.load(Relaxed));
        low.saturating_sub(self.limit.load(Relaxed))
    }

    /// Starts `worker`'s next trim period from the connections it holds now.
    pub fn restart(&self, worker: usize) {
        let w = &self.workers[worker];
        w.low.store(w.used.load(Relaxed), Relaxed);
    }

    fn keeps_none(&self) -> bool {
        self.limit.load(Relaxed) == 0
    }
}

/// One proxy worker keeps at most this many times `keepalive` idle connections to one backend
/// (the budget's surplus included).
pub const MAX_SHARE: usize = 4;

/// Idle keep-alive connections of one backend, one lock-free queue per proxy worker (like
/// nginx's per-worker `keepalive`): a connection is registered with its worker's runtime, so
/// reusing it from the same worker keeps each request on one thread.
#[derive(Debug)]
pub struct IdleConns {
    capacity: usize,
    budget: Arc<IdleBudget>,
    queues: Vec<std::sync::OnceLock<ArrayQueue<Upstream>>>,
}

impl IdleConns {
    /// `keepalive` (per worker, on average) = 0 turns keep-alive off (every request gets a new
    /// connection). `budget` is shared by the backends of one pool.
    pub fn new(keepalive: usize, budget: Arc<IdleBudget>) -> Self {
        IdleConns {
            capacity: keepalive * MAX_SHARE,
            budget,
            queues: (0..MAX_WORKER_QUEUES).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    fn queue(&self) -> Option<&ArrayQueue<Upstream>> {
        (self.capacity > 0).then(|| self.queues[worker_index()].get_or_init(|| ArrayQueue::new(self.capacity)))
    }

    /// Returns a connection for reuse; drops it (closing it) if this backend's queue is full.
    /// Over the pool's budget it is kept too, until a trim finds it unused
    /// ([`IdleConns::close_oldest`]).
    pub fn put(&self, mut conn: Upstream) {
        let Some(q) = self.queue() else { return };
        let worker = worker_index();
        // `keepalive = 0` set by a reload: the queue was made before, the budget tells.
        if !conn.read_buf.is_empty() || q.is_full() || self.budget.keeps_none() {
            return;
        }
        conn.reused = true;
        buffers::give_upstream(std::mem::take(&mut conn.read_buf));
        self.budget.add(worker);
        if q.push(conn).is_err() {
            self.budget.release(worker, 1);
        }
    }

    /// Closes this worker's longest-idle connection to the backend, if it has one.
    pub fn close_oldest(&self) -> bool {
        let worker = worker_index();
        let Some(q) = self.queues[worker].get() else { return false };
        match q.pop() {
            Some(conn) => {
                self.budget.release(worker, 1);
                drop(conn);
                true
            }
            None => false,
        }
    }

    /// This worker's idle connections to the backend.
    pub fn len_here(&self) -> usize {
        self.queues[worker_index()].get().map_or(0, ArrayQueue::len)
    }

    /// Takes an idle connection that is still open, closing the ones the backend closed.
    pub fn take(&self) -> Option<Upstream> {
        let q = self.queue()?;
        let worker = worker_index();
        while let Some(mut conn) = q.pop() {
            self.budget.release(worker, 1);
            if conn.still_open() {
                conn.read_buf = buffers::take_upstream();
                return Some(conn);
            }
        }
        None
    }

    /// Idle connections over all workers.
    pub fn len(&self) -> usize {
        self.queues.iter().filter_map(|q| q.get()).map(ArrayQueue::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for IdleConns {
    /// A removed backend's idle connections close; they no longer count against the budget.
    fn drop(&mut self) {
        for (worker, q) in self.queues.iter().enumerate() {
            if let Some(q) = q.get() {
                self.budget.release(worker, q.len());
            }
        }
    }
}

/// Opens a new connection to `addr` (and its TLS handshake, with `tls`) within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration, tls: Option<&UpstreamTls>) -> Result<Upstream, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(addr)),
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let stream = match tls {
        None => UpstreamStream::Plain(stream),
        Some(tls) => match tokio::time::timeout_at(deadline, tls.connect(stream, addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(e)) => return Err(ConnectError::Tls(addr, e)),
            Ok(Ok(s)) => UpstreamStream::Tls(Box::new(s)),
        },
    };
    Ok(Upstream::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_surplus_that_stayed_idle_since_the_last_trim_closes() {
        let budget = IdleBudget::default();
        budget.set_limit(2);
        for _ in 0..5 {
            budget.add(0);
        }
        assert_eq!(budget.unused_surplus(0), 0, "before the first trim nothing counts as unused");
        budget.restart(0);
        assert_eq!(budget.unused_surplus(0), 3, "5 idle all along over a budget of 2");
        // A request takes one and gives it back: one of the surplus was needed.
        budget.release(0, 1);
        budget.add(0);
        assert_eq!(budget.unused_surplus(0), 2);
        // A burst takes every one: none was surplus all along.
        budget.restart(0);
        budget.release(0, 5);
        for _ in 0..5 {
            budget.add(0);
        }
        assert_eq!(budget.unused_surplus(0), 0);
        budget.restart(0);
        assert_eq!((budget.unused_surplus(0), budget.unused_surplus(1)), (3, 0), "each worker has its own");
        budget.set_limit(8);
        assert_eq!(budget.unused_surplus(0), 0, "under the budget nothing is surplus");
    }

    #[test]
    fn one_trim_per_period_for_workers_sharing_a_slot() {
        let budget = IdleBudget::default();
        assert!(budget.trim_due(15, 5_000), "the first trim is due at once");
        assert!(!budget.trim_due(15, 5_300), "another worker on the slot skips this period");
        assert!(budget.trim_due(15, 6_000) && !budget.trim_due(15, 6_010));
        assert!(budget.trim_due(3, 6_010), "each slot has its own period");
    }
}
