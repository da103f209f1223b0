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

    /// Reads what is there now; `WouldBlock` when nothing is. On a plain socket a read that
    /// leaves room in `buf` took all there was, and the socket's readiness is cleared, so the
    /// next wait goes to the poller instead of costing a read that finds nothing (as tokio's
    /// own `poll_read` does); TLS reads through tokio's `poll_read` already.
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

/// One read from a plain socket. On epoll (Shoal runs on Linux; tokio makes the same
/// inference there and on kqueue) a read that does not fill the room it was given has drained
/// the socket, so it clears the readiness (closed states stay: a FIN read along with
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    fn read_ready(tcp: &TcpStream) -> bool {
        tcp.poll_read_ready(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_draining_read_clears_the_readiness_but_not_the_end_of_stream() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, (server, _)) =
            tokio::try_join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept()).unwrap();
        let mut buf = bytes::BytesMut::with_capacity(64);

        // A short read took everything: the next wait goes to the poller, and new bytes wake it.
        client.write_all(b"hello").await.unwrap();
        server.readable().await.unwrap();
        assert_eq!(read_draining(&server, &mut buf).unwrap(), 5);
        assert!(!read_ready(&server), "a read that left room clears the readiness");
        client.write_all(b" world").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.readable())
            .await
            .expect("new bytes wake the wait")
            .unwrap();
        assert_eq!(read_draining(&server, &mut buf).unwrap(), 6);
        assert_eq!(&buf[..], b"hello world");

        // A read that fills its room may have left more: the readiness stays.
        client.write_all(&[b'x'; 100]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut small = Vec::with_capacity(10);
        let room = small.chunk_mut().len();
        assert_eq!(read_draining(&server, &mut small).unwrap(), room);
        assert!(read_ready(&server), "a full read does not clear the readiness");
        let mut rest = bytes::BytesMut::with_capacity(256);
        assert_eq!(read_draining(&server, &mut rest).unwrap(), 100 - room);

        // Bytes and the end of stream seen together: the short read keeps the end of stream,
        // so the next wait ends at once and the next read says 0.
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.readable().await.unwrap();
        assert_eq!(read_draining(&server, &mut buf).unwrap(), 3);
        assert!(read_ready(&server), "the end of stream outlives the clear");
        assert_eq!(read_draining(&server, &mut buf).unwrap(), 0);
    }
}
