//! The byte streams the proxy reads on readiness: a client's or a backend's, a plain TCP
//! socket or TLS over one. HTTP/1.1 connections wait for their next request on the socket's
//! readiness while holding no buffer (`idle`), and tunnels copy on readiness; both need the TCP
//! socket under the stream and a read that does not wait. TLS may hold decrypted bytes that the
//! socket's readiness no longer announces, so a TLS stream is read once more before waiting
//! (`holds_plaintext`).

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;

use crate::pool::conn::UpstreamStream;

/// A client's or a backend's stream.
pub trait ProxyStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Decrypted bytes may wait inside the stream after a read: try a read before waiting for
    /// the socket to be readable.
    fn holds_plaintext(&self) -> bool;

    /// `https` or `http` (for a client's `X-Forwarded-Proto`).
    fn scheme(&self) -> &'static str {
        if self.holds_plaintext() { "https" } else { "http" }
    }

    /// The TCP socket underneath (readiness, addresses).
    fn tcp(&self) -> &TcpStream;

    /// Reads what is there now; `WouldBlock` when nothing is. A read that leaves room in `buf`
    /// took all there was: the socket's readiness is cleared, so the next wait goes to the
    /// poller instead of costing a read that finds nothing (as tokio's own `poll_read` does).
    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize>;

    /// The name the client asked for in its TLS handshake (SNI), if any.
    fn server_name(&self) -> Option<&str> {
        None
    }
}

/// A copy of a connection's SNI name on the stack (a DNS name is at most 253 bytes), so a
/// request can check its host against it while the stream is borrowed, with no allocation.
pub struct SniName {
    bytes: [u8; 253],
    len: u8,
}

impl SniName {
    pub fn of(name: Option<&str>) -> Option<Self> {
        let name = name?;
        let mut bytes = [0u8; 253];
        bytes.get_mut(..name.len())?.copy_from_slice(name.as_bytes());
        Some(SniName { bytes, len: name.len() as u8 })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl ProxyStream for TcpStream {
    fn holds_plaintext(&self) -> bool {
        false
    }

    fn tcp(&self) -> &TcpStream {
        self
    }

    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize> {
        read_draining(self, buf)
    }
}

impl ProxyStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn holds_plaintext(&self) -> bool {
        true
    }

    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn server_name(&self) -> Option<&str> {
        self.get_ref().1.server_name()
    }

    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize> {
        poll_once(self, buf)
    }
}

impl ProxyStream for UpstreamStream {
    fn holds_plaintext(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        UpstreamStream::tcp(self)
    }

    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> std::io::Result<usize> {
        match self {
            UpstreamStream::Plain(s) => read_draining(s, buf),
            UpstreamStream::Tls(_) => poll_once(self, buf),
        }
    }
}

/// One read from a plain socket. On epoll a read that does not fill the room it was given has
/// drained the socket, so it clears the readiness (closed states stay: a FIN read along with
/// the data is still seen); any bytes arriving later raise it again. Without this, the wait
/// for a kept-alive client's next request began with a read that found nothing, once per
/// request.
fn read_draining<B: BufMut>(tcp: &TcpStream, buf: &mut B) -> std::io::Result<usize> {
    // The room the read is given (`remaining_mut` of a growable buffer is unbounded).
    let room = buf.chunk_mut().len();
    let mut short = 0;
    // `try_io` clears the readiness when its closure says `WouldBlock`: say it after a short
    // read, and hand the bytes back here.
    let read = tcp.try_io(Interest::READABLE, || match tcp.try_read_buf(buf)? {
        n if n > 0 && n < room => {
            short = n;
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        n => Ok(n),
    });
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && short > 0 => Ok(short),
        read => read,
    }
}

/// One read without a task to wake: the caller waits on the socket's readiness itself.
fn poll_once<S: AsyncRead + Unpin, B: BufMut>(s: &mut S, buf: &mut B) -> std::io::Result<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    match tokio_util::io::poll_read_buf(Pin::new(s), &mut cx, buf) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
    }
}
