//! Who may call the control plane: with a cluster secret, every call carries a token for that
//! one call (`shoal_proto::call_token`: the method, a timestamp and a nonce under an HMAC keyed
//! by the secret). A call without one, with a wrong one, one older than
//! `shoal_proto::TOKEN_MAX_AGE_MS`, or one whose nonce was seen before (a replay) is refused
//! with `Unauthenticated` before it reaches the service, and counted. Used nonces are kept
//! until their tokens are too old to pass anyway.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use shoal_proto::TokenError;
use tonic::Status;
use tonic::codegen::Service;
use tonic::server::NamedService;

/// The control plane's gatekeeper state.
#[derive(Debug, Default)]
pub struct Gate {
    secret: Option<Arc<[u8]>>,
    /// Nonce -> the token's time (ms), for tokens still young enough to pass.
    seen: Mutex<HashMap<u128, u64>>,
    /// Calls refused for any reason (`shoal_control_rejected_calls`).
    pub rejected: AtomicU64,
    /// Of those, stale or replayed tokens (`shoal_control_replayed_calls`).
    pub replayed: AtomicU64,
}

impl Gate {
    pub fn new(secret: Option<&[u8]>) -> Self {
        Gate { secret: secret.map(Arc::from), ..Default::default() }
    }

    /// Admits a call to `path` carrying `token`, or says why not.
    pub fn admit(&self, path: &str, token: Option<&str>, now_ms: u64) -> Result<(), Status> {
        let Some(secret) = &self.secret else { return Ok(()) };
        let refuse = |why: &'static str, replay: bool| {
            self.rejected.fetch_add(1, Relaxed);
            if replay {
                self.replayed.fetch_add(1, Relaxed);
            }
            tracing::warn!(call = path, why, "refused a control-plane call");
            Status::unauthenticated(format!("{why} (this cluster needs the cluster secret: shoal --secret-file FILE)"))
        };
        let (at, nonce) = match shoal_proto::check_call_token(secret, path, token, now_ms) {
            Ok(v) => v,
            Err(TokenError::Missing) => return Err(refuse("no token", false)),
            Err(TokenError::Wrong) => return Err(refuse("wrong token", false)),
            Err(TokenError::Stale) => return Err(refuse("stale token (check the clocks)", true)),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 1024 {
            seen.retain(|_, t| now_ms.abs_diff(*t) <= shoal_proto::TOKEN_MAX_AGE_MS);
        }
        if seen.insert(nonce, at).is_some() {
            drop(seen);
            return Err(refuse("token used before (a replayed call)", true));
        }
        Ok(())
    }
}

/// The control service behind the gate: every call is admitted (or answered with the refusal)
/// on its path and metadata before the service sees it.
#[derive(Clone)]
pub struct Gated<S> {
    pub inner: S,
    pub gate: Arc<Gate>,
}

impl<S: NamedService> NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Gated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let token = req.headers().get(shoal_proto::AUTH_HEADER).and_then(|v| v.to_str().ok());
        match self.gate.admit(req.uri().path(), token, shoal_proto::unix_ms()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_passes_once_for_its_method() {
        let secret = b"0123456789abcdef";
        let gate = Gate::new(Some(secret));
        let (path, now) = ("/shoal.v1.Control/BackendAdd", 5_000_000u64);
        let t = shoal_proto::call_token(secret, path, now, 42);
        assert!(gate.admit(path, Some(&t), now).is_ok());
        // replayed: refused and counted as a replay
        assert!(gate.admit(path, Some(&t), now + 10).is_err());
        assert_eq!((gate.rejected.load(Relaxed), gate.replayed.load(Relaxed)), (1, 1));
        // the same token on another method, none, or a stale one
        let t2 = shoal_proto::call_token(secret, path, now, 43);
        assert!(gate.admit("/shoal.v1.Control/Leave", Some(&t2), now).is_err());
        assert!(gate.admit(path, None, now).is_err());
        assert!(gate.admit(path, Some(&t2), now + 60_000).is_err());
        assert_eq!((gate.rejected.load(Relaxed), gate.replayed.load(Relaxed)), (4, 2));
        // no secret: open (the node binds control to loopback then)
        assert!(Gate::new(None).admit(path, None, now).is_ok());
    }
}
