//! The client-facing listener: accepts connections, serves HTTP/1.1 and h2c on each (with
//! upgrades), enforces the header timeout and size limit, and drains on shutdown: stop
//! accepting, let in-flight requests finish within the drain timeout, close idle keep-alives.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Proxy;
use super::service::{ClientConn, handle};

/// After accepting stops, how long just-accepted connections get to send their first request
/// before idle connections are closed.
const LAST_REQUESTS_WINDOW: Duration = Duration::from_millis(250);

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Decrements the active-connection gauge when a connection ends.
struct Active(Arc<Proxy>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Relaxed);
    }
}

/// Serves `listener` until `stop_accepting` fires, then drains. Returns the number of
/// connections that were still open when the drain timeout ran out.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ListenerSettings,
    stop_accepting: CancellationToken,
) -> usize {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        // hyper's own limit is a backstop above ours: the service answers 431 (with
        // x-shoal-node) for heads over max_header_bytes; hyper's bare 431 only beyond twice that.
        .max_buf_size((settings.max_header_bytes * 2).max(8192))
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    let serve_one = |stream: tokio::net::TcpStream, addr: std::net::SocketAddr| {
        proxy.stats.accepts.fetch_add(1, Relaxed);
        proxy.stats.handled.fetch_add(1, Relaxed);
        proxy.stats.active.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let client = Arc::new(ClientConn::new(addr));
        let active = Active(proxy.clone());
        let svc_proxy = proxy.clone();
        let service = service_fn(move |req| handle(svc_proxy.clone(), client.clone(), req));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(client = %addr, error = %e, "client connection ended with an error");
            }
            drop(active);
        });
    };
    loop {
        let (stream, addr) = tokio::select! {
            biased;
            _ = stop_accepting.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        serve_one(stream, addr);
    }
    // Connections already in the kernel's accept queue were accepted by the kernel: serve
    // them too (dropping the listener with them queued would reset them). Plain accept(2)
    // until it would block, so no readiness event can be missed.
    match listener.into_std() {
        Ok(std_listener) => {
            while let Ok((stream, addr)) = std_listener.accept() {
                let stream = stream.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(stream));
                if let Ok(stream) = stream {
                    serve_one(stream, addr);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot drain the accept queue"),
    }
    let open = proxy.stats.active.load(Relaxed);
    tracing::info!(open_connections = open, "stopped accepting; draining");
    // The graceful shutdown closes connections that have not sent a request yet; the last
    // ones accepted may still have theirs on the wire. Give them a moment to arrive.
    tokio::time::sleep(LAST_REQUESTS_WINDOW.min(proxy.drain_timeout())).await;
    match tokio::time::timeout(proxy.drain_timeout(), graceful.shutdown()).await {
        Ok(()) => 0,
        Err(_) => {
            let left = proxy.stats.active.load(Relaxed) as usize;
            tracing::warn!(connections = left, "drain timeout: closing connections that are still busy");
            left
        }
    }
}
