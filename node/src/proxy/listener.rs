//! The client-facing listeners: accept connections; on the plain listener, tell HTTP/2 (prior
//! knowledge, the connection preface) from HTTP/1.1; on the TLS listener, finish the handshake
//! (within `handshake_timeout`) and follow ALPN; hand HTTP/2 to `client_h2` and HTTP/1.1 to
//! `client_h1`; and
//! drains on shutdown: stop accepting, serve what the kernel already accepted, let in-flight
//! requests finish within the drain timeout, close idle keep-alives. A connection holds no
//! buffer until its first bytes arrive. Each worker also trims its idle upstream connections
//! over the pools' idle budgets once a second (`pool::Pool::trim_idle`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::client_h2;
use super::forward::ClientConn;
use super::{Limits, Open, Proxy, Worker};
use super::{client_h1, idle};
use crate::tls::Tls;
use crate::{buffers, pool};

/// After accepting stops, how long just-accepted connections get to send their first request
/// before idle connections are closed.
const LAST_REQUESTS_WINDOW: Duration = Duration::from_millis(250);
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Every [`pool::TRIM_EVERY`] until the node drains: each pool closes the idle upstream
/// connections this worker holds over its idle budget that no request needed meanwhile.
async fn trim_idle_upstreams(proxy: Arc<Proxy>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(pool::TRIM_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                for upstream in &proxy.runtime.load().upstreams {
                    upstream.pool.trim_idle();
                }
            }
            _ = stop.cancelled() => break,
        }
    }
}

/// Serves `listener` (and the TLS listener `tls`, when the node terminates HTTPS) until
/// `stop_accepting` fires, then drains. Returns the number of connections that were still
/// open when the drain timeout ran out.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TcpListener>,
    proxy: Arc<Proxy>,
    limits: Limits,
    stop_accepting: CancellationToken,
) -> usize {
    // Cancelled once the last-requests window after stop_accepting has passed: idle
    // connections close, busy ones close after their response.
    let close_idle = CancellationToken::new();
    tokio::spawn(idle::sweep(limits.keepalive_timeout, close_idle.clone()));
    tokio::spawn(trim_idle_upstreams(proxy.clone(), close_idle.clone()));
    let worker = Arc::new(Worker { proxy: proxy.clone(), limits, close_idle: close_idle.clone() });
    let serve_one = |stream: TcpStream, addr: std::net::SocketAddr, secure: bool| {
        proxy.stats.accepts.fetch_add(1, Relaxed);
        proxy.stats.handled.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let open = Open::new(worker.clone());
        match (secure, &proxy.tls) {
            (true, Some(tls)) => drop(tokio::spawn(tls_connection(open, stream, addr, tls.clone()))),
            _ => drop(tokio::spawn(connection(open, stream, addr))),
        }
    };
    loop {
        let (stream, addr, secure) = tokio::select! {
            biased;
            _ = stop_accepting.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => (stream, addr, false),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            accepted = async { tls.as_ref()?.accept().await.ok() }, if tls.is_some() => match accepted {
                Some((stream, addr)) => (stream, addr, true),
                None => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        serve_one(stream, addr, secure);
    }
    // Connections already in the kernel's accept queue were accepted by the kernel: serve
    // them too (dropping the listener with them queued would reset them). Plain accept(2)
    // until it would block, so no readiness event can be missed.
    for (l, secure) in std::iter::once((listener, false)).chain(tls.map(|t| (t, true))) {
        match l.into_std() {
            Ok(std_listener) => {
                while let Ok((stream, addr)) = std_listener.accept() {
                    let stream = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
                    if let Ok(stream) = stream {
                        serve_one(stream, addr, secure);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot drain the accept queue"),
        }
    }
    let open = proxy.stats.active.load(Relaxed);
    tracing::info!(open_connections = open, "stopped accepting; draining");
    // The last connections accepted may still have their first request on the wire.
    tokio::time::sleep(LAST_REQUESTS_WINDOW.min(proxy.drain_timeout())).await;
    close_idle.cancel();
    let drained = async {
        while proxy.stats.active.load(Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    match tokio::time::timeout(proxy.drain_timeout(), drained).await {
        Ok(()) => 0,
        Err(_) => {
            let left = proxy.stats.active.load(Relaxed) as usize;
            tracing::warn!(connections = left, "drain timeout: closing connections that are still busy");
            left
        }
    }
}

/// One HTTPS client connection: the TLS handshake within `handshake_timeout`, then HTTP/2 or
/// HTTP/1.1 as ALPN chose (HTTP/1.1 without ALPN). A failed or stalled handshake is counted
/// and closed; it costs the node nothing else.
#[expect(clippy::manual_async_fn, reason = "an async fn keeps a second copy of its arguments in its future")]
fn tls_connection(open: Open, stream: TcpStream, addr: SocketAddr, tls: Arc<Tls>) -> impl Future<Output = ()> {
    async move {
        let timeout = tls.settings.load().handshake_timeout;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let accepted = tokio::select! {
            r = tokio::time::timeout(timeout, acceptor.accept(stream)) => r,
            _ = open.close_idle.cancelled() => return,
        };
        let stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // Closed before finishing (a port check, a client that gave up): not a failure.
                tls.stats.closed.fetch_add(1, Relaxed);
                tracing::debug!(client = %addr, "client closed during the TLS handshake");
                return;
            }
            Ok(Err(e)) => {
                tls.stats.failed.fetch_add(1, Relaxed);
                tracing::debug!(client = %addr, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tls.stats.timed_out.fetch_add(1, Relaxed);
                tracing::debug!(client = %addr, "no TLS handshake within the handshake timeout");
                return;
            }
        };
        let session = stream.get_ref().1;
        tls.stats.handshakes.fetch_add(1, Relaxed);
        if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            tls.stats.resumed.fetch_add(1, Relaxed);
        }
        if session.alpn_protocol() == Some(b"h2") {
            let sni = session.server_name().map(Box::from);
            return serve_h2(&open, addr, "https", sni, stream).await;
        }
        // The first request's head is due `client_header_timeout` after the handshake.
        let deadline = tokio::time::Instant::now() + open.limits.header_timeout;
        let first = Box::new(client_h1::First { buf: BytesMut::new(), deadline });
        tokio::spawn(client_h1::serve(open, addr, stream, first));
    }
}

/// Serves an HTTP/2 connection (h2c or over TLS) on this task: boxed, so the connection's
/// future does not carry hyper's connection state (or a second copy of the stream) otherwise.
fn serve_h2<'a, IO>(
    open: &'a Open,
    addr: SocketAddr,
    scheme: &'static str,
    sni: Option<Box<str>>,
    io: IO,
) -> Pin<Box<impl Future<Output = ()> + 'a>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = ClientConn::new(addr);
    let conn = client_h2::Conn { client, scheme, sni };
    Box::pin(client_h2::serve(open.proxy.clone(), conn, io, &open.limits, open.close_idle.clone()))
}

/// One client connection, until its protocol is known: waits for its first bytes (holding no
/// buffer), reads until it can tell HTTP/2's preface from an HTTP/1.1 request line, then
/// serves HTTP/2 here or hands HTTP/1.1 to a task of its own (whose future then holds only what
/// an idle HTTP/1.1 connection needs).
#[expect(clippy::manual_async_fn, reason = "an async fn keeps a second copy of its arguments in its future")]
fn connection(open: Open, mut stream: TcpStream, addr: SocketAddr) -> impl Future<Output = ()> {
    async move {
        // One client_header_timeout from accept covers the sniff and the whole first head.
        let deadline = tokio::time::Instant::now() + open.limits.header_timeout;
        let sniffed = tokio::select! {
            r = tokio::time::timeout_at(deadline, sniff(&mut stream)) => r,
            _ = open.close_idle.cancelled() => return,
        };
        match sniffed {
            Ok(Ok((buf, true))) => serve_h2(&open, addr, "http", None, Prefixed { prefix: buf, inner: stream }).await,
            Ok(Ok((buf, false))) if buf.is_empty() => buffers::give_read(buf),
            Ok(Ok((buf, false))) => {
                let first = Box::new(client_h1::First { buf, deadline });
                tokio::spawn(client_h1::serve(open, addr, stream, first));
            }
            Ok(Err(e)) => tracing::trace!(client = %addr, error = %e, "client connection failed"),
            Err(_) => tracing::debug!(client = %addr, "no request within the header timeout"),
        }
    }
}

/// Reads enough bytes to tell the HTTP/2 preface from an HTTP/1.1 request line (usually the
/// first read). The buffer is taken once the socket is readable: a client that connects and
/// says nothing costs no buffer. `true`: HTTP/2.
async fn sniff(stream: &mut TcpStream) -> std::io::Result<(BytesMut, bool)> {
    stream.readable().await?;
    let mut buf = buffers::take_read();
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
            let h2 = n == H2_PREFACE.len() && buf[..n] == *H2_PREFACE;
            return Ok((buf, h2));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok((buf, false));
        }
    }
}

/// A stream whose first bytes were already read (the sniffed preface): they are read again.
struct Prefixed {
    prefix: BytesMut,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                buffers::give_read(std::mem::take(&mut this.prefix));
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
