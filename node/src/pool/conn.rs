//! Upstream HTTP/1.1 connections: connecting with a timeout, and the per-backend queue of idle
//! keep-alive connections (`keepalive` in the config). The queue is a lock-free `ArrayQueue`;
//! a connection goes back only after its response body was read to the end.

use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::body::ReqBody;

/// An HTTP/1.1 connection to a backend, ready to send one request.
pub type Upstream = SendRequest<ReqBody>;

/// Why a new upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
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
/// nginx's per-worker `keepalive`): a connection is driven by its worker's runtime, so reusing
/// it from the same worker keeps each request on one thread.
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

    /// Returns a connection for reuse; drops it (closing it) if the queue is full or it closed.
    pub fn put(&self, conn: Upstream) {
        if let Some(q) = self.queue()
            && !conn.is_closed()
        {
            let _ = q.push(conn);
        }
    }

    /// Takes an idle connection that is ready for a request, discarding closed ones.
    pub async fn take(&self) -> Option<Upstream> {
        let q = self.queue()?;
        while let Some(mut conn) = q.pop() {
            if conn.is_closed() {
                continue;
            }
            if conn.ready().await.is_ok() {
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

/// Opens a new HTTP/1.1 connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Upstream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout(addr)),
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| ConnectError::Handshake(addr, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
