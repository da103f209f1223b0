//! HTTP helpers: a keep-alive client ([`Client`], [`get`], [`request`]) built on
//! `hyper_util::client::legacy`, and raw-TCP exchanges for bytes no client library would send
//! ([`raw_exchange`], [`raw_exchange_from`], [`RawResponse`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The client type used everywhere: HTTP/1.1 over plain TCP with connection reuse.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A new client that keeps at most `idle` idle connections per host.
pub fn client(idle: usize) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_max_idle_per_host(idle).build(connector)
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    /// A header's value as text ("" when absent or not UTF-8).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The body parsed as JSON (for `/echo` and `/status`).
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {:?}", self.body))
    }
}

/// Sends `req` with `client`, reading the whole body, within `timeout`.
pub async fn send(client: &Client, req: Request<Full<Bytes>>, timeout: Duration) -> anyhow::Result<Resp> {
    let what = format!("{} {}", req.method(), req.uri());
    let fut = async {
        let resp = client.request(req).await.with_context(|| format!("{what}: request failed"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.with_context(|| format!("{what}: body failed"))?.to_bytes();
        Ok(Resp { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: no complete response within {timeout:?}"),
    }
}

/// `GET http://addr{path}` with extra headers, on a fresh client (10 s timeout).
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(0), b.body(Full::new(Bytes::new()))?, Duration::from_secs(10)).await
}

/// `GET http://addr{path}` on a fresh client (10 s timeout).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Resp> {
    get_with(addr, path, &[]).await
}

/// Sends a request built by the caller on a fresh client (10 s timeout).
pub async fn request(req: Request<Full<Bytes>>) -> anyhow::Result<Resp> {
    send(&client(0), req, Duration::from_secs(10)).await
}

/// Writes `bytes` to `addr` and reads until the peer closes, a reset, or `timeout` (then
/// returns whatever arrived). Send `Connection: close` to get a prompt end.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect {addr}: timed out"))?
        .with_context(|| format!("connect {addr}"))?;
    exchange(stream, bytes, timeout).await
}

/// Like [`raw_exchange`] but from the local address `from` (any 127.0.0.0/8 address works on
/// Linux), so a test can play many client IPs.
pub async fn raw_exchange_from(
    from: IpAddr,
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let socket = if from.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0)).with_context(|| format!("bind {from}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .with_context(|| format!("connect {addr} from {from}: timed out"))?
        .with_context(|| format!("connect {addr} from {from}"))?;
    exchange(stream, bytes, timeout).await
}

async fn exchange(mut stream: TcpStream, bytes: &[u8], timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let _ = stream.set_nodelay(true);
    stream.write_all(bytes).await.context("write")?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    Ok(out)
}

/// A response parsed from raw bytes.
#[derive(Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Parses the first response in `raw` (content-length, chunked, or to the end).
    pub fn parse(raw: &[u8]) -> anyhow::Result<Self> {
        let text_head = |n: usize| String::from_utf8_lossy(&raw[..raw.len().min(n)]).into_owned();
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            bail!("no complete response head in {:?}", text_head(300));
        };
        let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &raw[end + 4..];
        let mut r = RawResponse { status, headers, body: Vec::new() };
        if r.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            r.body = decode_chunked(rest);
        } else if let Some(len) = r.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            r.body = rest[..len.min(rest.len())].to_vec();
        } else {
            r.body = rest.to_vec();
        }
        Ok(r)
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body[..self.body.len().min(2000)]))
            .finish()
    }
}

fn decode_chunked(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else { break };
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            out.extend_from_slice(&rest[..size.min(rest.len())]);
            break;
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
    out
}
