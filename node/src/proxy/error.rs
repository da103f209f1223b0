//! Errors a client can see, each mapped to one status and a short body in one place
//! (PRODUCT.md §5.5). Every error response names the node in `x-shoal-node`.

use std::borrow::Cow;

use http::{HeaderValue, StatusCode};

use crate::http1::request::Refusal;

/// Why the proxy answered instead of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// No backend is usable (all down, draining, or none configured).
    NoBackend,
    /// Every usable backend is at its `max_conns`.
    AllBusy,
    /// Backends were tried and none answered (connect errors, broken responses).
    BadGateway,
    /// The backend did not answer within `read_timeout` / `connect_timeout`.
    Timeout,
    /// Over the `[rate_limit]`.
    RateLimited,
    /// The request head is larger than `max_header_bytes`.
    HeadersTooLarge,
    /// The request head is malformed or ambiguous (what is wrong).
    BadRequest(&'static str),
    /// The request head did not arrive within `client_header_timeout`.
    HeaderTimeout,
    /// The request uses something the proxy cannot pass on faithfully (what).
    NotImplemented(&'static str),
    /// The request names a host the connection's TLS certificate does not cover (421: the
    /// client should ask on a connection to that name).
    Misdirected,
}

impl From<Refusal> for ProxyError {
    /// The codec's refusal of a request head, as the client sees it.
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::TooLarge => ProxyError::HeadersTooLarge,
            Refusal::Bad(why) => ProxyError::BadRequest(why),
            Refusal::Unsupported(what) => ProxyError::NotImplemented(what),
            Refusal::Misdirected => ProxyError::Misdirected,
        }
    }
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoBackend | ProxyError::AllBusy => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadGateway => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::Misdirected => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    pub fn body(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            ProxyError::NoBackend => "503 no usable backend\n",
            ProxyError::AllBusy => "503 all backends at max_conns\n",
            ProxyError::BadGateway => "502 no backend answered\n",
            ProxyError::Timeout => "504 backend timed out\n",
            ProxyError::RateLimited => "429 too many requests\n",
            ProxyError::HeadersTooLarge => "431 request header fields too large\n",
            ProxyError::HeaderTimeout => "408 request head not received in time\n",
            ProxyError::Misdirected => {
                "421 misdirected request: this connection's certificate does not cover the host\n"
            }
            ProxyError::BadRequest(why) => return Cow::Owned(format!("400 bad request: {why}\n")),
            ProxyError::NotImplemented(what) => return Cow::Owned(format!("501 not implemented: {what}\n")),
        })
    }

    /// The response as HTTP/1.1 bytes (the HTTP/1.1 client side writes it itself).
    /// `head_request`: the head only (a HEAD response has no body).
    pub fn write_h1(self, out: &mut Vec<u8>, node: &HeaderValue, close: bool, head_request: bool) {
        use std::io::Write;
        let body = self.body();
        let _ = write!(
            out,
            "HTTP/1.1 {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
            self.status(),
            body.len()
        );
        out.extend_from_slice(b"x-shoal-node: ");
        out.extend_from_slice(node.as_bytes());
        out.extend_from_slice(b"\r\n");
        if self == ProxyError::RateLimited {
            out.extend_from_slice(b"retry-after: 1\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_request {
            out.extend_from_slice(body.as_bytes());
        }
    }
}
