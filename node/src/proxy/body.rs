//! Body types of the HTTP/2 side: responses go to hyper as [`RespBody`] (the backend's streaming
//! body, or a whole small one, or a short error text), frame by frame; nothing is buffered
//! whole. [`InFlight`] counts a request against its backend for as long as it lives (both sides).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::upstream::UpstreamBody;
use crate::pool::BackendState;

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

/// A response body sent to the client.
pub enum RespBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

/// Error of a response body on its way to the client.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

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
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            RespBody::Upstream(u) => Pin::new(u).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Upstream(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream(u) => u.size_hint(),
        }
    }
}
