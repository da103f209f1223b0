//! Body types of the proxy. Requests go upstream as [`ReqBody`] (the client's streaming body,
//! or nothing); responses go to clients as [`RespBody`] (the backend's streaming body, or a
//! short error text). Both stream frame by frame; nothing is buffered whole.
//!
//! [`UpstreamBody`] also owns the request's in-flight guard and its upstream connection: when
//! the backend's body ends, the connection returns to the idle queue and in-flight drops.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::BackendState;
use crate::pool::conn::Upstream;

/// A request body sent upstream.
pub enum ReqBody {
    Empty,
    Incoming(Incoming),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Incoming(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Incoming(b) => b.size_hint(),
        }
    }
}

/// Counts one request in flight to a backend for as long as it lives.
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn new(backend: &Arc<BackendState>) -> Self {
        backend.in_flight.fetch_add(1, Relaxed);
        InFlight(backend.clone())
    }

    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A backend's response body on its way to the client.
pub struct UpstreamBody {
    inner: Incoming,
    /// The connection (returned to the idle queue at the end) and the in-flight guard.
    lease: Option<(Upstream, InFlight)>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, conn: Upstream, in_flight: InFlight) -> Self {
        let mut body = UpstreamBody { inner, lease: Some((conn, in_flight)) };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// The body ended cleanly: the connection may serve another request.
    fn release(&mut self) {
        if let Some((conn, guard)) = self.lease.take() {
            guard.backend().idle.put(conn);
        }
    }
}

/// A response body sent to the client.
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl RespBody {
    pub fn text(s: &'static str) -> Self {
        RespBody::Full(Some(Bytes::from_static(s.as_bytes())))
    }

    pub fn empty() -> Self {
        RespBody::Full(None)
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Upstream(u) => {
                let polled = Pin::new(&mut u.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => u.release(),
                    Poll::Ready(Some(Ok(_))) if u.inner.is_end_stream() => u.release(),
                    Poll::Ready(Some(Err(_))) => drop(u.lease.take()),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Upstream(u) => u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream(u) => u.inner.size_hint(),
        }
    }
}
