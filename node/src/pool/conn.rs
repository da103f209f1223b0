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

/// Idle keep-alive connections of one backend.
#[derive(Debug)]
pub struct IdleConns {
    queue: Option<ArrayQueue<Upstream>>,
}

impl IdleConns {
    /// `capacity` = 0 turns keep-alive off (every request gets a new connection).
    pub fn new(capacity: usize) -> Self {
        IdleConns { queue: (capacity > 0).then(|| ArrayQueue::new(capacity)) }
    }

    /// Returns a connection for reuse; drops it (closing it) if the queue is full or it closed.
    pub fn put(&self, conn: Upstream) {
        if let Some(q) = &self.queue
            && !conn.is_closed()
        {
            let _ = q.push(conn);
        }
    }

    /// Takes an idle connection that is ready for a request, discarding closed ones.
    pub async fn take(&self) -> Option<Upstream> {
        let q = self.queue.as_ref()?;
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

    pub fn len(&self) -> usize {
        self.queue.as_ref().map_or(0, ArrayQueue::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every idle connection (the backend left the pool or is draining).
    pub fn clear(&self) {
        if let Some(q) = &self.queue {
            while q.pop().is_some() {}
        }
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
