//! Upstream HTTP/1.1 connections: connecting with a timeout, and the per-backend queue of idle
//! keep-alive connections (`keepalive` in the config). The queue is a lock-free `ArrayQueue`;
//! a connection goes back only after its response body was read to the end. The HTTP/1.1
//! exchange on a connection is `proxy::upstream`'s.

use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use tokio::net::TcpStream;

/// Read buffer size of an upstream connection (grown when a response head needs more).
pub const READ_BUF: usize = 16 * 1024;

/// An HTTP/1.1 connection to a backend, ready to send one request.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes read from the backend and not yet consumed.
    pub read_buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    pub write_buf: Vec<u8>,
    /// Whether the connection came from the idle queue (it may have been closed meanwhile).
    pub reused: bool,
}

impl Upstream {
    fn new(stream: TcpStream) -> Self {
        Upstream {
            stream,
            read_buf: BytesMut::with_capacity(READ_BUF),
            write_buf: Vec::with_capacity(512),
            reused: false,
        }
    }

    /// Whether an idle connection can carry a request: the backend has neither closed it nor
    /// sent anything unasked. Costs no syscall unless the socket was signalled readable since
    /// its last read (reads that drain the socket clear the readiness).
    fn still_open(&self) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
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

fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// Idle keep-alive connections of one backend, one lock-free queue per proxy worker (like
/// nginx's per-worker `keepalive`): a connection is registered with its worker's runtime, so
/// reusing it from the same worker keeps each request on one thread.
#[derive(Debug)]
pub struct IdleConns {
    capacity: usize,
    queues: Vec<std::sync::OnceLock<ArrayQueue<Upstream>>>,
}

impl IdleConns {
    /// `capacity` (per worker) = 0 turns keep-alive off (every request gets a new connection).
    pub fn new(capacity: usize) -> Self {
        IdleConns { capacity, queues: (0..MAX_WORKER_QUEUES).map(|_| std::sync::OnceLock::new()).collect() }
    }

    fn queue(&self) -> Option<&ArrayQueue<Upstream>> {
        (self.capacity > 0).then(|| self.queues[worker_index()].get_or_init(|| ArrayQueue::new(self.capacity)))
    }

    /// Returns a connection for reuse; drops it (closing it) if the queue is full.
    pub fn put(&self, mut conn: Upstream) {
        if let Some(q) = self.queue() {
            conn.reused = true;
            let _ = q.push(conn);
        }
    }

    /// Takes an idle connection that is still open, closing the ones the backend closed.
    pub fn take(&self) -> Option<Upstream> {
        let q = self.queue()?;
        while let Some(conn) = q.pop() {
            if conn.still_open() {
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

/// Opens a new connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Upstream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(addr)),
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(Upstream::new(stream))
}
