//! Raw-TCP pieces for byte-exact tests, with every read and wait bounded.
//!
//! - [`RawServer`]: a backend on `127.0.0.1:0` that records every byte each connection
//!   received ([`ConnLog`]), when the peer closed it, and every complete request it parsed;
//!   how it answers is a script the test passes ([`RawServer::start`]); a script that ends
//!   with [`finish`] shuts its side down and keeps reading (up to 30 s) to record when the
//!   proxy closed the connection.
//! - [`RawConn`]: one accepted connection as the script sees it: read a request strictly
//!   (Content-Length or chunked), write bytes, wait for the peer's close.
//! - [`RawClient`]: a client socket that reads responses strictly ([`RawReply`]) and can tell
//!   when the server closed the connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Longest wait for any single read of a request or response (tests pass shorter ones).
pub const RAW_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message either side reads (every load is bounded).
const MAX_MESSAGE: usize = 64 << 20;
/// How long a finished script's connection is kept to see the peer close it.
const LINGER_FOR_CLOSE: Duration = Duration::from_secs(30);

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A message head split into lines, as received.
#[derive(Clone)]
pub struct RawHead {
    /// The head's bytes up to and including the empty line.
    pub raw: Vec<u8>,
    /// The start line.
    pub start: String,
    /// Every header line as sent (without CRLF), `String::from_utf8_lossy` of the bytes.
    pub lines: Vec<String>,
}

impl std::fmt::Debug for RawHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", lossy(&self.raw))
    }
}

impl RawHead {
    /// Splits a head (the bytes up to and including the empty line).
    pub fn parse(raw: Vec<u8>) -> RawHead {
        let text = lossy(&raw);
        let mut it = text.trim_end_matches("\r\n").split("\r\n");
        let start = it.next().unwrap_or_default().to_string();
        let lines = it.map(str::to_string).collect();
        RawHead { raw, start, lines }
    }

    /// `(name, value)` of every header line: the name as sent, the value with SP/HTAB trimmed.
    pub fn headers(&self) -> Vec<(&str, &str)> {
        self.lines.iter().filter_map(|l| l.split_once(':')).map(|(k, v)| (k, v.trim_matches([' ', '\t']))).collect()
    }

    /// Every header line whose name is `name` (case-insensitive), whole and as sent.
    pub fn lines_named(&self, name: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.split_once(':').is_some_and(|(k, _)| k.eq_ignore_ascii_case(name)))
            .map(String::as_str)
            .collect()
    }

    /// Every value of header `name` (SP/HTAB trimmed).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers().into_iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    /// The request target (second word of the start line).
    pub fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or_default()
    }

    /// The method (first word of the start line).
    pub fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or_default()
    }

    /// A response's status code (0 when the start line is not a status line).
    pub fn status(&self) -> u16 {
        if !self.start.starts_with("HTTP/1.") {
            return 0;
        }
        self.start.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Every coding of every Transfer-Encoding line, lower-cased, in order.
    pub fn codings(&self) -> Vec<String> {
        self.all("transfer-encoding")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect()
    }
}

/// A complete request a [`RawServer`] read.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub head: RawHead,
    /// The body, decoded when it came chunked.
    pub body: Vec<u8>,
}

/// What one accepted connection of a [`RawServer`] saw.
#[derive(Clone, Default)]
pub struct ConnLog {
    bytes: Arc<Mutex<Vec<u8>>>,
    closed: Arc<Mutex<Option<Instant>>>,
    requests: Arc<Mutex<Vec<RawRequest>>>,
}

impl ConnLog {
    /// Every byte received on the connection so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When the peer closed the connection (end of stream, a reset, or a failed write).
    pub fn closed_at(&self) -> Option<Instant> {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_closed(&self) {
        self.closed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
    }

    /// The complete requests read on this connection.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One accepted connection, handed to the script.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub log: ConnLog,
}

impl RawConn {
    /// Reads more (recording it): `Ok(0)` at end of stream; an error after `timeout`.
    pub async fn fill(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        ensure!(self.buf.len() <= MAX_MESSAGE, "raw backend: more than {MAX_MESSAGE} bytes unconsumed");
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(timeout, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) => {
                if n == 0 {
                    self.log.mark_closed();
                }
                self.log.bytes.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => {
                self.log.mark_closed();
                Err(e).context("raw backend: read")
            }
            Err(_) => bail!("raw backend: nothing read within {timeout:?}"),
        }
    }

    /// Reads a head; `None` when the peer closed before its first byte.
    pub async fn read_head(&mut self, timeout: Duration) -> anyhow::Result<Option<RawHead>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Ok(Some(RawHead::parse(raw)));
            }
            ensure!(self.buf.len() < 256 * 1024, "raw backend: head over 256 KiB");
            if self.fill(timeout).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("raw backend: closed in the middle of a head: {}", lossy(&self.buf));
            }
        }
    }

    async fn read_exact(&mut self, n: usize, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        ensure!(n <= MAX_MESSAGE, "raw backend: refusing to read {n} bytes");
        while self.buf.len() < n {
            if self.fill(timeout).await? == 0 {
                bail!("raw backend: closed after {} of {n} bytes", self.buf.len());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_line(&mut self, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(eol) = find(&self.buf, b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..eol + 2).collect();
                line.truncate(eol);
                return Ok(line);
            }
            ensure!(self.buf.len() < 8192, "raw backend: line over 8 KiB");
            if self.fill(timeout).await? == 0 {
                bail!("raw backend: closed in the middle of a line: {}", lossy(&self.buf));
            }
        }
    }

    /// Reads one whole request (strict framing: one Content-Length, or chunked) and records
    /// it; `None` when the peer closed first.
    pub async fn read_request(&mut self, timeout: Duration) -> anyhow::Result<Option<RawRequest>> {
        let Some(head) = self.read_head(timeout).await? else { return Ok(None) };
        let codings = head.codings();
        let lengths = head.all("content-length");
        ensure!(codings.is_empty() || lengths.is_empty(), "raw backend: request with both CL and TE: {head:?}");
        let body = if !codings.is_empty() {
            ensure!(codings == ["chunked"], "raw backend: request transfer-encoding {codings:?}: {head:?}");
            let mut body = Vec::new();
            loop {
                let line = lossy(&self.read_line(timeout).await?);
                let hex = line.split(';').next().unwrap_or_default().trim();
                let size =
                    usize::from_str_radix(hex, 16).with_context(|| format!("raw backend: chunk size {line:?}"))?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&self.read_exact(size, timeout).await?);
                let crlf = self.read_exact(2, timeout).await?;
                ensure!(crlf == b"\r\n", "raw backend: chunk data not followed by CRLF");
            }
            for _ in 0..100 {
                if self.read_line(timeout).await?.is_empty() {
                    break;
                }
            }
            body
        } else if let Some(len) = lengths.first() {
            ensure!(lengths.len() == 1, "raw backend: {} Content-Length lines: {head:?}", lengths.len());
            let n: usize = len.parse().with_context(|| format!("raw backend: content-length {len:?}: {head:?}"))?;
            self.read_exact(n, timeout).await?
        } else {
            Vec::new()
        };
        let req = RawRequest { head, body };
        self.log.requests.lock().unwrap_or_else(|e| e.into_inner()).push(req.clone());
        Ok(Some(req))
    }

    /// Writes `bytes`; a failed write counts as the peer's close.
    pub async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let r = tokio::time::timeout(RAW_IO_TIMEOUT, self.stream.write_all(bytes)).await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.log.mark_closed();
                Err(e).context("raw backend: write")
            }
            Err(_) => bail!("raw backend: a write of {} bytes blocked for {RAW_IO_TIMEOUT:?}", bytes.len()),
        }
    }

    /// Writes back every byte that arrives (the bytes already buffered first) until the peer
    /// closes; whether it did within `max`.
    pub async fn echo_until_closed(&mut self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            if !self.buf.is_empty() {
                let bytes = std::mem::take(&mut self.buf);
                if self.write(&bytes).await.is_err() {
                    return true;
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.fill(left).await {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return self.log.closed_at().is_some(),
            }
        }
    }

    /// Reads (recording) until the peer closes; whether it did within `max`.
    pub async fn wait_closed(&mut self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.fill(left).await {
                Ok(0) => return true,
                Ok(_) => self.buf.clear(),
                Err(_) => return self.log.closed_at().is_some(),
            }
        }
    }
}

type Script = Arc<dyn Fn(RawConn) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send + Sync>;

/// A scripted raw HTTP/1.1 backend. Dropping it closes the listener and every connection.
pub struct RawServer {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<ConnLog>>>,
    task: JoinHandle<()>,
}

impl RawServer {
    /// Listens on a free port of 127.0.0.1 and runs `script` for every connection.
    pub async fn start<F, Fut>(script: F) -> anyhow::Result<RawServer>
    where
        F: Fn(RawConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind raw server")?;
        let addr = listener.local_addr()?;
        let conns = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(move |c| Box::pin(script(c)));
        let task = tokio::spawn(accept(listener, conns.clone(), script));
        Ok(RawServer { addr, conns, task })
    }

    /// A server that answers every request `200` with body `<method> <target> <body length>`
    /// (keep-alive), as long as the peer sends requests.
    pub async fn echo() -> anyhow::Result<RawServer> {
        RawServer::start(|mut c: RawConn| async move {
            for _ in 0..10_000 {
                let Some(req) = c.read_request(Duration::from_secs(60)).await? else { return Ok(()) };
                c.write(&default_answer(&req)).await?;
            }
            Ok(())
        })
        .await
    }

    /// Every connection accepted so far, in order.
    pub fn conns(&self) -> Vec<ConnLog> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        self.conns().len()
    }

    /// Every byte every connection received, connection after connection.
    pub fn received(&self) -> Vec<u8> {
        self.conns().iter().flat_map(|c| c.bytes()).collect()
    }

    /// Every complete request read, connection after connection.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.conns().iter().flat_map(|c| c.requests()).collect()
    }

    /// The last complete request whose target starts with `prefix`.
    pub fn last(&self, prefix: &str) -> anyhow::Result<RawRequest> {
        let all = self.requests();
        all.iter().rev().find(|r| r.head.target().starts_with(prefix)).cloned().with_context(|| {
            let seen: Vec<&str> = all.iter().map(|r| r.head.start.as_str()).collect();
            format!("the raw backend never got a complete request for {prefix}; it got {seen:?}")
        })
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `200` with body `<method> <target> <body length>`, kept alive.
pub fn default_answer(req: &RawRequest) -> Vec<u8> {
    let body = format!("{} {} {}", req.head.method(), req.head.target(), req.body.len());
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

async fn accept(listener: TcpListener, conns: Arc<Mutex<Vec<ConnLog>>>, script: Script) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let log = ConnLog::default();
                conns.lock().unwrap_or_else(|e| e.into_inner()).push(log.clone());
                let script = script.clone();
                tasks.spawn(async move {
                    let conn = RawConn { stream, buf: Vec::new(), log };
                    if let Err(e) = script(conn).await {
                        eprintln!("[raw server] script: {e:#}");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Ends a script: shuts the connection's write side and reads until the peer closes (up to
/// 30 s), so [`ConnLog::closed_at`] says when the proxy let go of it.
pub async fn finish(mut conn: RawConn) -> anyhow::Result<()> {
    let _ = conn.stream.shutdown().await;
    conn.wait_closed(LINGER_FOR_CLOSE).await;
    Ok(())
}

/// A response a [`RawClient`] read.
#[derive(Clone)]
pub struct RawReply {
    pub head: RawHead,
    pub status: u16,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for RawReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawReply")
            .field("head", &self.head)
            .field("body", &lossy(&self.body[..self.body.len().min(300)]))
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn text(&self) -> String {
        lossy(&self.body)
    }
}

/// How a wait for the server's close ended.
#[derive(Debug, Clone)]
pub struct Closed {
    /// When the close came (end of stream or reset), from the start of the wait; `None` when
    /// the connection was still open at the deadline.
    pub after: Option<Duration>,
    /// Bytes that arrived before it.
    pub bytes: Vec<u8>,
}

/// A client connection to a proxy.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Longest wait for any single read.
    pub timeout: Duration,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<RawClient> {
        let stream = tokio::time::timeout(RAW_IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connect {addr}: timed out"))?
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream, buf: Vec::new(), timeout: RAW_IO_TIMEOUT })
    }

    /// Connects with a receive buffer of about `bytes` (caps TCP autotuning, so a client that
    /// reads nothing makes the sender block soon).
    pub async fn connect_small_window(addr: SocketAddr, bytes: u32) -> anyhow::Result<RawClient> {
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(bytes)?;
        let stream = tokio::time::timeout(RAW_IO_TIMEOUT, socket.connect(addr))
            .await
            .with_context(|| format!("connect {addr}: timed out"))?
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream, buf: Vec::new(), timeout: RAW_IO_TIMEOUT })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match tokio::time::timeout(self.timeout, self.stream.write_all(bytes)).await {
            Ok(r) => r.with_context(|| format!("client: write of {} bytes", bytes.len())),
            Err(_) => bail!("client: write of {} bytes blocked for {:?}", bytes.len(), self.timeout),
        }
    }

    async fn fill(&mut self) -> anyhow::Result<usize> {
        ensure!(self.buf.len() <= MAX_MESSAGE, "client: more than {MAX_MESSAGE} bytes unconsumed");
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(self.timeout, self.stream.read(&mut chunk)).await {
            Ok(r) => {
                let n = r.context("client: read")?;
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(_) => bail!("client: nothing read within {:?} ({} bytes unconsumed)", self.timeout, self.buf.len()),
        }
    }

    async fn read_exact(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        ensure!(n <= MAX_MESSAGE, "client: refusing to read {n} bytes");
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                bail!("client: closed after {} of {n} bytes", self.buf.len());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_line(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(eol) = find(&self.buf, b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..eol + 2).collect();
                line.truncate(eol);
                return Ok(line);
            }
            ensure!(self.buf.len() < 8192, "client: line over 8 KiB");
            if self.fill().await? == 0 {
                bail!("client: closed in the middle of a line: {}", lossy(&self.buf));
            }
        }
    }

    /// Reads one head; `None` when the server closed before its first byte.
    pub async fn read_head(&mut self) -> anyhow::Result<Option<RawHead>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Ok(Some(RawHead::parse(raw)));
            }
            ensure!(self.buf.len() < 256 * 1024, "client: head over 256 KiB");
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("client: closed in the middle of a head: {}", lossy(&self.buf));
            }
        }
    }

    /// Reads one response to a `method` request (a 1xx is returned as it is), strictly: a
    /// Transfer-Encoding must end in chunked and come without Content-Length.
    pub async fn read_response(&mut self, method: &str) -> anyhow::Result<RawReply> {
        let head = self.read_head().await?.context("client: closed before a response")?;
        let status = head.status();
        ensure!(status >= 100, "client: not a status line: {head:?}");
        let body = if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            Vec::new()
        } else if !head.codings().is_empty() {
            ensure!(head.codings().last().map(String::as_str) == Some("chunked"), "client: TE in {head:?}");
            ensure!(head.header("content-length").is_none(), "client: both CL and TE: {head:?}");
            let mut body = Vec::new();
            loop {
                let line = lossy(&self.read_line().await?);
                let hex = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(hex, 16).with_context(|| format!("client: chunk size {line:?}"))?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&self.read_exact(size).await?);
                ensure!(self.read_exact(2).await? == b"\r\n", "client: chunk data not followed by CRLF");
            }
            for _ in 0..100 {
                if self.read_line().await?.is_empty() {
                    break;
                }
            }
            body
        } else if let Some(len) = head.header("content-length") {
            let n: usize = len.parse().with_context(|| format!("client: content-length in {head:?}"))?;
            self.read_exact(n).await?
        } else {
            while self.fill().await? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(RawReply { head, status, body })
    }

    /// Reads responses until a final one (>= 200, or 101).
    pub async fn read_final(&mut self, method: &str) -> anyhow::Result<RawReply> {
        for _ in 0..1000 {
            let r = self.read_response(method).await?;
            if r.status >= 200 || r.status == 101 {
                return Ok(r);
            }
        }
        bail!("client: over 1000 interim responses")
    }

    /// Bytes read but not consumed by a response.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Reads whatever comes until the server closes (end of stream or reset) or `max` passes.
    pub async fn wait_closed(&mut self, max: Duration) -> Closed {
        let start = Instant::now();
        let mut bytes = std::mem::take(&mut self.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let left = max.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Closed { after: None, bytes };
            }
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Closed { after: Some(start.elapsed()), bytes },
                Ok(Ok(n)) => {
                    if bytes.len() < MAX_MESSAGE {
                        bytes.extend_from_slice(&chunk[..n]);
                    }
                }
                Err(_) => return Closed { after: None, bytes },
            }
        }
    }
}
