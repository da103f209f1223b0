//! The client's byte stream: a plain TCP socket, or TLS over one. HTTP/1.1 connections wait
//! for their next request on the socket's readiness while holding no buffer (`idle`), and
//! tunnels copy on readiness; both need the TCP socket under the stream and a read that does
//! not wait. TLS may hold decrypted bytes that the socket's readiness no longer announces, so
//! a TLS stream is read once more before waiting (`HOLDS_PLAINTEXT`).

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A client connection's stream.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Decrypted bytes may wait inside the stream after a read: try a read before waiting for
    /// the socket to be readable.
    const HOLDS_PLAINTEXT: bool;
    /// `https` or `http`, for `X-Forwarded-Proto`.
    const SCHEME: &'static str;

    /// The TCP socket underneath (readiness, addresses).
    fn tcp(&self) -> &TcpStream;

    /// Reads what is there now; `WouldBlock` when nothing is.
    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize>;
}

impl ClientStream for TcpStream {
    const HOLDS_PLAINTEXT: bool = false;
    const SCHEME: &'static str = "http";

    fn tcp(&self) -> &TcpStream {
        self
    }

    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    const HOLDS_PLAINTEXT: bool = true;
    const SCHEME: &'static str = "https";

    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize> {
        // One poll without a task to wake: the caller waits on the socket's readiness itself.
        let mut cx = Context::from_waker(Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(self), &mut cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}
