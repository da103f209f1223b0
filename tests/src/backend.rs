//! In-process HTTP backends for the tests.
//!
//! A [`Backend`] is a hyper 1.x HTTP/1.1 server on `127.0.0.1:<port>` that:
//! - answers `200` with its name as the body (and `x-backend: <name>`);
//! - at `/echo...` answers JSON `{"name","method","uri","version","headers":{name:[values]},
//!   "body_len"}`; with `?hop=1` it also sends hop-by-hop response headers
//!   (`Connection: x-backend-hop`, `X-Backend-Hop`, `Keep-Alive`, `Proxy-Authenticate`) next
//!   to `X-Backend-Kept`, to check the proxy strips them;
//! - waits [`Backend::set_delay`] (or `?delay=<ms>`) before answering, and answers with
//!   [`Backend::set_status`] (or `?status=<code>`);
//! - answers `/health*` with [`Backend::set_health_status`] (counted apart, in
//!   [`Backend::health_checks`]);
//! - on `Connection: upgrade` + `Upgrade: <p>` answers `101` and echoes every byte back;
//! - in garbage mode ([`Backend::set_garbage`]) reads the request and writes non-HTTP bytes;
//! - counts requests ([`Backend::requests`]), requests in progress ([`Backend::in_flight`])
//!   and their peak ([`Backend::max_in_flight`]);
//! - can be [`stop`](Backend::stop)ped (listener and every open connection closed) and
//!   [`restart`](Backend::restart)ed on the same port, keeping its counters.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// State shared by the accept loop, the connections and the test.
#[derive(Debug)]
struct Shared {
    name: String,
    delay_ms: AtomicU64,
    status: AtomicU16,
    health_status: AtomicU16,
    garbage: AtomicBool,
    requests: AtomicU64,
    health_checks: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    upgrades: AtomicU64,
    connections: AtomicU64,
}

/// Counts one request in progress while it lives.
struct InFlightGuard(Arc<Shared>);

impl InFlightGuard {
    fn new(s: &Arc<Shared>) -> Self {
        let now = s.in_flight.fetch_add(1, SeqCst) + 1;
        s.max_in_flight.fetch_max(now, SeqCst);
        InFlightGuard(s.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// One test backend. Dropping it stops it.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({} at {})", self.name, self.addr)
    }
}

impl Backend {
    /// Starts a backend named `name` on a free port of 127.0.0.1.
    pub async fn start(name: &str) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind backend")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            delay_ms: AtomicU64::new(0),
            status: AtomicU16::new(200),
            health_status: AtomicU16::new(200),
            garbage: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let b = Backend { name: name.to_string(), addr, shared, running: Mutex::new(None) };
        b.run(listener);
        Ok(b)
    }

    /// Starts one backend per name.
    pub async fn start_many(names: &[&str]) -> anyhow::Result<Vec<Backend>> {
        let mut out = Vec::new();
        for n in names {
            out.push(Backend::start(n).await?);
        }
        Ok(out)
    }

    fn run(&self, listener: TcpListener) {
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, self.shared.clone(), stop_rx));
        *self.running.lock().unwrap() = Some(Running { stop, task });
    }

    /// Stops listening and closes every open connection (in-flight requests are cut off).
    pub async fn stop(&self) {
        let running = self.running.lock().unwrap().take();
        if let Some(r) = running {
            let _ = r.stop.send(());
            let _ = r.task.await;
        }
    }

    /// Starts again on the same port (retrying for up to 5 s while the port is busy).
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("rebind backend {} on {}", self.name, self.addr)),
            }
        };
        self.run(listener);
        Ok(())
    }

    /// Whether the backend is listening.
    pub fn is_running(&self) -> bool {
        self.running.lock().unwrap().is_some()
    }

    /// Delay before every answer (a `?delay=<ms>` query parameter overrides it).
    pub fn set_delay(&self, d: Duration) {
        self.shared.delay_ms.store(d.as_millis() as u64, SeqCst);
    }

    /// Status of every normal answer (a `?status=<code>` query parameter overrides it).
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, SeqCst);
    }

    /// Status of `/health*` answers.
    pub fn set_health_status(&self, status: u16) {
        self.shared.health_status.store(status, SeqCst);
    }

    /// Garbage mode: new connections get non-HTTP bytes instead of a response.
    pub fn set_garbage(&self, on: bool) {
        self.shared.garbage.store(on, SeqCst);
    }

    /// Requests seen, health checks excluded.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(SeqCst)
    }

    /// `/health*` requests seen.
    pub fn health_checks(&self) -> u64 {
        self.shared.health_checks.load(SeqCst)
    }

    /// Requests in progress right now.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(SeqCst)
    }

    /// The most requests that were ever in progress at once (see [`Backend::reset_max_in_flight`]).
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(SeqCst)
    }

    pub fn reset_max_in_flight(&self) {
        self.shared.max_in_flight.store(self.shared.in_flight.load(SeqCst), SeqCst);
    }

    /// Upgrades accepted.
    pub fn upgrades(&self) -> u64 {
        self.shared.upgrades.load(SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = r.stop.send(());
            r.task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.connections.fetch_add(1, SeqCst);
                let _ = stream.set_nodelay(true);
                let s = shared.clone();
                if shared.garbage.load(SeqCst) {
                    conns.spawn(garbage(stream));
                } else {
                    conns.spawn(async move {
                        let svc = service_fn(move |req| handle(s.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades()
                            .await;
                    });
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Reads what the client sent, answers with bytes that are not HTTP, closes.
async fn garbage(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
    let _ = stream.write_all(b"\x00\x01garbage \xff\xfe not http at all\r\n\r\n").await;
    let _ = stream.shutdown().await;
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn reply(status: u16, name: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(name) {
        r.headers_mut().insert("x-backend", v);
    }
    r
}

async fn handle(s: Arc<Shared>, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path.starts_with("/health") {
        s.health_checks.fetch_add(1, SeqCst);
        let status = s.health_status.load(SeqCst);
        return Ok(reply(status, &s.name, format!("health {status}\n")));
    }
    s.requests.fetch_add(1, SeqCst);
    let _guard = InFlightGuard::new(&s);
    let q = query(&req);

    let wants_upgrade = req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("upgrade")));
    if wants_upgrade {
        s.upgrades.fetch_add(1, SeqCst);
        let protocol = req.headers()[header::UPGRADE].clone();
        echo_after_upgrade(hyper::upgrade::on(&mut req));
        let mut r = reply(101, &s.name, Bytes::new());
        r.headers_mut().insert(header::UPGRADE, protocol);
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(r);
    }

    let delay = q.get("delay").and_then(|d| d.parse().ok()).unwrap_or_else(|| s.delay_ms.load(SeqCst));
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = q.get("status").and_then(|d| d.parse().ok()).unwrap_or_else(|| s.status.load(SeqCst));

    let (parts, body) = req.into_parts();
    let body_len = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => usize::MAX,
    };
    if path.starts_with("/echo") {
        let mut headers: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
        for name in parts.headers.keys() {
            let values: Vec<serde_json::Value> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            headers.insert(name.as_str().to_string(), serde_json::Value::Array(values));
        }
        let json = serde_json::json!({
            "name": s.name,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": body_len,
        });
        let mut r = reply(status, &s.name, json.to_string());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if q.get("hop").is_some_and(|v| v == "1") {
            let h = r.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("x-backend-hop"));
            h.insert("x-backend-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"x\""));
            h.insert("x-backend-kept", HeaderValue::from_static("1"));
        }
        return Ok(r);
    }
    Ok(reply(status, &s.name, s.name.clone()))
}

/// Echoes every byte back on a connection once it is upgraded (after the 101), until either
/// side closes: the backends' WebSocket stand-in.
pub fn echo_after_upgrade(on_upgrade: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
}
