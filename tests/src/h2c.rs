//! An HTTP/2 client with prior knowledge (h2c), on the `h2` crate: it sends what hyper's client
//! would not (CONNECT, names with `_`, `host` next to `:authority`) and reads whole answers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use tokio::task::JoinHandle;

/// The handle to send requests on, and the task driving the connection (it ends when the
/// server closes it).
pub type Connection = (h2::client::SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>);

/// An HTTP/2 connection (prior knowledge) to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Connection> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect: timed out")??;
    tcp.set_nodelay(true)?;
    let (send, conn) = tokio::time::timeout(Duration::from_secs(5), h2::client::handshake(tcp))
        .await
        .context("h2 handshake: timed out")??;
    Ok((send, tokio::spawn(conn)))
}

/// An HTTP/2 response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

/// Sends `req` with `body` (none when empty) on `send` and reads the whole response, within 20 s.
pub async fn request(
    send: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Vec<u8>,
) -> anyhow::Result<Reply> {
    let what = format!("{} {}", req.method(), req.uri());
    let fut = async {
        let mut ready = send.clone().ready().await.context("connection not ready")?;
        let (resp, mut stream) = ready.send_request(req, body.is_empty()).context("send_request")?;
        if !body.is_empty() {
            // h2 buffers what the peer's window does not take yet and sends it as it opens.
            stream.send_data(Bytes::from(body), true).context("send_data")?;
        }
        let resp = resp.await.context("response")?;
        let (parts, mut body) = resp.into_parts();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.context("body")?;
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
            ensure!(out.len() < 16 << 20, "body over 16 MiB");
        }
        Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body: out })
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .with_context(|| format!("{what}: no response within 20 s"))?
        .with_context(|| what)
}
