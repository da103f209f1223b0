//! HTTP/1.1 protocol behaviour of shoald's client-facing side (`node/src/proxy/client_h1.rs`,
//! on the codec in `node/src/http1/`) and its upstream side (`node/src/proxy/upstream.rs`),
//! end to end: raw bytes written to a node's
//! proxy port, every byte of the answer checked. Pipelining, keep-alive and HTTP/1.0, response
//! framing (chunked, close-delimited, large lengths) for both client versions, HEAD/204/304,
//! `Expect: 100-continue`, absolute-form targets, hop-by-hop headers both ways, chunked request
//! bodies with extensions and trailers, and answers given before a large body was read; then
//! the upstream exchange: the proxy's own errors answering HEAD, bare-LF response heads, a
//! backend answering before it read the body, `read_timeout` against slow client bodies and
//! stalled response bodies, and kept-alive upstream connections the backend closed.
//!
//! Besides the harness's hyper backend, the tests use [`RawBackend`], a small HTTP/1.1 server
//! on raw TCP defined here: it records every request exactly as it arrived (head and decoded
//! body) and answers with framings hyper would not produce on demand (a chunked body with
//! extensions and trailers, a close-delimited body, a 204/304 without length, hop-by-hop
//! response headers) or misbehaves on demand (bare-LF heads, early answers, stalls, closed
//! keep-alive connections).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use shoal_tests::{Backend, Node, free_addr, pattern};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

type R = anyhow::Result<()>;

/// Longest wait for any single read or write of a test client.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the raw backend keeps an idle connection (longer than any test).
const BACKEND_IDLE: Duration = Duration::from_secs(120);
/// Largest message any reader here accepts (every load is bounded).
const MAX_MESSAGE: usize = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Reading and writing HTTP/1.x messages on raw sockets
// ---------------------------------------------------------------------------------------------

/// A parsed message head: the start line's three parts and the header lines.
#[derive(Clone)]
struct Head {
    /// Request: method, target, version. Response: version, status code, reason.
    line: [String; 3],
    /// Header names lower-cased, values trimmed, in order.
    headers: Vec<(String, String)>,
    /// The head as received (for messages).
    raw: String,
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.raw)
    }
}

impl Head {
    fn parse(raw: &[u8]) -> anyhow::Result<Head> {
        let text = std::str::from_utf8(raw).with_context(|| format!("head is not UTF-8: {}", lossy(raw)))?;
        let mut lines = text.trim_end_matches("\r\n").split("\r\n");
        let start = lines.next().unwrap_or_default();
        let mut parts = start.splitn(3, ' ');
        let line = [(); 3].map(|_| parts.next().unwrap_or_default().to_string());
        ensure!(!line[0].is_empty() && !line[1].is_empty(), "bad start line {start:?} in {text:?}");
        let mut headers = Vec::new();
        for l in lines {
            let (k, v) = l.split_once(':').with_context(|| format!("bad header line {l:?} in {text:?}"))?;
            ensure!(!k.is_empty() && !k.contains(' '), "bad header name in {l:?} in {text:?}");
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        Ok(Head { line, headers, raw: text.to_string() })
    }

    /// The first value of header `name`.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// Every comma-separated token of every `Connection` header, lower-cased.
    fn connection_tokens(&self) -> Vec<String> {
        self.all("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// A response's status code.
    fn status(&self) -> anyhow::Result<u16> {
        ensure!(self.line[0].starts_with("HTTP/1."), "not a response: {:?}", self.raw);
        self.line[1].parse().with_context(|| format!("bad status in {:?}", self.raw))
    }
}

/// How a response body was delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body by definition (HEAD, 1xx, 204, 304).
    Empty,
    Length(usize),
    /// Chunked, with this many data chunks.
    Chunked(usize),
    /// Neither length nor chunked: read until the peer closed.
    Close,
}

/// A response read whole.
struct Response {
    head: Head,
    status: u16,
    body: Vec<u8>,
    framing: Framing,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("head", &self.head)
            .field("framing", &self.framing)
            .field("body", &lossy(&self.body[..self.body.len().min(300)]))
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    fn text(&self) -> String {
        lossy(&self.body)
    }

    fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("body is not JSON: {self:?}"))
    }

    /// Whether the response announces that the connection closes after it.
    fn says_close(&self) -> bool {
        self.head.connection_tokens().iter().any(|t| t == "close")
    }
}

/// A decoded chunked body.
struct Chunked {
    body: Vec<u8>,
    chunks: usize,
    trailers: Vec<String>,
}

/// One side of an HTTP/1.x connection: the stream and the bytes read but not consumed yet.
struct Wire<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
    timeout: Duration,
    /// What this is, for messages ("client of node x", "raw backend").
    label: String,
}

impl Wire<TcpStream> {
    async fn connect(addr: SocketAddr, label: &str) -> anyhow::Result<Wire> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connect {addr}: timed out"))?
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Wire::new(stream, label))
    }
}

impl<S> Wire<S> {
    fn new(stream: S, label: &str) -> Self {
        Wire { stream, buf: Vec::new(), timeout: IO_TIMEOUT, label: label.to_string() }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match tokio::time::timeout(self.timeout, self.stream.write_all(bytes)).await {
            Ok(r) => r.with_context(|| format!("{}: write of {} bytes", self.label, bytes.len())),
            Err(_) => bail!("{}: write of {} bytes blocked for {:?}", self.label, bytes.len(), self.timeout),
        }
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    /// Reads more into the buffer: `Ok(0)` at end of stream; an error after `timeout`.
    async fn fill_io(&mut self) -> std::io::Result<usize> {
        if self.buf.len() > MAX_MESSAGE {
            return Err(std::io::Error::other(format!("more than {MAX_MESSAGE} bytes unconsumed")));
        }
        self.buf.reserve(64 * 1024);
        match tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no bytes within the timeout")),
        }
    }

    async fn fill(&mut self) -> anyhow::Result<usize> {
        let have = self.buf.len();
        self.fill_io().await.with_context(|| {
            format!("{}: read ({have} bytes unconsumed: {})", self.label, lossy(&self.buf[..have.min(300)]))
        })
    }

    /// Reads a head up to its empty line and takes it off the buffer; `None` when the peer
    /// closed before its first byte.
    async fn read_head(&mut self) -> anyhow::Result<Option<Head>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Head::parse(&raw).map(Some);
            }
            ensure!(self.buf.len() < 64 * 1024, "{}: head over 64 KiB: {}", self.label, lossy(&self.buf[..300]));
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("{}: closed in the middle of a head: {}", self.label, lossy(&self.buf));
            }
        }
    }

    async fn read_exact(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        ensure!(n <= MAX_MESSAGE, "{}: refusing to read {n} bytes", self.label);
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                bail!("{}: closed after {} of {n} bytes", self.label, self.buf.len());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One line, without its CRLF.
    async fn read_line(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(eol) = find(&self.buf, b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..eol + 2).collect();
                line.truncate(eol);
                return Ok(line);
            }
            ensure!(self.buf.len() < 8192, "{}: line over 8 KiB: {}", self.label, lossy(&self.buf[..300]));
            if self.fill().await? == 0 {
                bail!("{}: closed in the middle of a line: {}", self.label, lossy(&self.buf));
            }
        }
    }

    /// Decodes a chunked body (sizes, extensions, data, CRLFs, trailers), strictly.
    async fn read_chunked(&mut self) -> anyhow::Result<Chunked> {
        let mut out = Chunked { body: Vec::new(), chunks: 0, trailers: Vec::new() };
        loop {
            let line = lossy(&self.read_line().await?);
            let hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(hex, 16).with_context(|| {
                format!("{}: bad chunk-size line {line:?} after {} bytes", self.label, out.body.len())
            })?;
            if size == 0 {
                break;
            }
            out.chunks += 1;
            out.body.extend_from_slice(&self.read_exact(size).await?);
            let crlf = self.read_exact(2).await?;
            ensure!(crlf == b"\r\n", "{}: chunk data not followed by CRLF but {}", self.label, lossy(&crlf));
            ensure!(out.body.len() <= MAX_MESSAGE, "{}: chunked body over {MAX_MESSAGE} bytes", self.label);
        }
        for _ in 0..100 {
            let line = self.read_line().await?;
            if line.is_empty() {
                return Ok(out);
            }
            out.trailers.push(lossy(&line));
        }
        bail!("{}: over 100 trailer lines", self.label)
    }

    /// Everything until the peer closes.
    async fn read_to_end(&mut self) -> anyhow::Result<Vec<u8>> {
        while self.fill().await? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Reads one response to a request with `method` (an interim 1xx response is returned as
    /// it is; read again for the final one).
    async fn read_response(&mut self, method: &str) -> anyhow::Result<Response> {
        let head = self.read_head().await?.with_context(|| format!("{}: closed before a response", self.label))?;
        let status = head.status()?;
        let (framing, body) = if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            (Framing::Empty, Vec::new())
        } else if let Some(te) = head.header("transfer-encoding") {
            ensure!(ends_in_chunked(te), "{}: transfer-encoding {te:?}: {head:?}", self.label);
            ensure!(
                head.header("content-length").is_none(),
                "{}: both content-length and transfer-encoding: {head:?}",
                self.label
            );
            let c = self.read_chunked().await.with_context(|| format!("chunked body of {head:?}"))?;
            (Framing::Chunked(c.chunks), c.body)
        } else if let Some(len) = head.header("content-length") {
            let n: usize = len.parse().with_context(|| format!("{}: content-length in {head:?}", self.label))?;
            let body = self.read_exact(n).await.with_context(|| format!("body of {head:?}"))?;
            (Framing::Length(n), body)
        } else {
            let body = self.read_to_end().await.with_context(|| format!("close-delimited body of {head:?}"))?;
            (Framing::Close, body)
        };
        Ok(Response { head, status, body, framing })
    }

    /// Reads a final response, failing on any interim one.
    async fn read_final(&mut self, method: &str) -> anyhow::Result<Response> {
        let r = self.read_response(method).await?;
        ensure!(r.status >= 200, "{}: unexpected interim response {r:?}", self.label);
        Ok(r)
    }

    /// Waits until the peer closes (end of stream or a reset) with nothing more sent.
    async fn expect_closed(&mut self, what: &str) -> anyhow::Result<()> {
        ensure!(
            self.buf.is_empty(),
            "{}: {what}: unexpected bytes after the response: {}",
            self.label,
            lossy(&self.buf)
        );
        match self.fill_io().await {
            Ok(0) => Ok(()),
            Ok(n) => bail!("{}: {what}: expected a close, got {n} more bytes: {}", self.label, lossy(&self.buf)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e).with_context(|| format!("{}: {what}: waiting for the connection to close", self.label)),
        }
    }

    /// Waits for an orderly close (FIN) right after the response, as a lingering close gives:
    /// `shutdown` first, so the client reads the answer and then end of stream, even while its
    /// body is still arriving. Closing with the body unread sends a reset instead.
    async fn expect_fin(&mut self, what: &str) -> anyhow::Result<()> {
        ensure!(
            self.buf.is_empty(),
            "{}: {what}: unexpected bytes after the response: {}",
            self.label,
            lossy(&self.buf)
        );
        match self.fill_io().await {
            Ok(0) => Ok(()),
            Ok(n) => bail!("{}: {what}: expected a close, got {n} more bytes: {}", self.label, lossy(&self.buf)),
            Err(e) => Err(e).with_context(|| {
                format!("{}: {what}: expected an orderly close (FIN) after the answer (lingering close)", self.label)
            }),
        }
    }

    /// Reads the body of a request whose head was read (as the raw backend does), decoded.
    async fn read_request_body(&mut self, head: Head) -> anyhow::Result<Seen> {
        let (body, chunked, trailers) = if let Some(te) = head.header("transfer-encoding") {
            ensure!(ends_in_chunked(te), "request transfer-encoding {te:?}: {head:?}");
            ensure!(head.header("content-length").is_none(), "request with both CL and TE: {head:?}");
            let c = self.read_chunked().await?;
            (c.body, true, c.trailers)
        } else if let Some(len) = head.header("content-length") {
            let n: usize = len.parse().with_context(|| format!("request content-length in {head:?}"))?;
            (self.read_exact(n).await?, false, Vec::new())
        } else {
            (Vec::new(), false, Vec::new())
        };
        Ok(Seen { head, body, chunked, trailers })
    }
}

/// Whether a Transfer-Encoding value's last coding is chunked (the body is framed by it).
fn ends_in_chunked(te: &str) -> bool {
    te.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails naming the first differing byte.
fn same_bytes(got: &[u8], want: &[u8], what: &str) -> anyhow::Result<()> {
    if got == want {
        return Ok(());
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    bail!("{what}: got {} bytes, want {}; first difference at byte {first}", got.len(), want.len())
}

/// The value of query parameter `key` in `target`.
fn query_param<'a>(target: &'a str, key: &str) -> Option<&'a str> {
    let (_, q) = target.split_once('?')?;
    q.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
}

// ---------------------------------------------------------------------------------------------
// The raw backend
// ---------------------------------------------------------------------------------------------

/// A request as the raw backend received it.
#[derive(Debug, Clone)]
struct Seen {
    head: Head,
    /// The body, decoded.
    body: Vec<u8>,
    /// It came chunk-encoded.
    chunked: bool,
    trailers: Vec<String>,
}

impl Seen {
    fn method(&self) -> &str {
        &self.head.line[0]
    }

    fn target(&self) -> &str {
        &self.head.line[1]
    }
}

/// An HTTP/1.1 backend on raw TCP (127.0.0.1, port 0). It records every request and answers
/// by path:
/// - `/chunked?n=N`: N pattern bytes chunk-encoded (chunks of varying sizes, an extension on
///   the first, a trailer at the end);
/// - `/close?n=N`: N pattern bytes with neither Content-Length nor Transfer-Encoding, then
///   closes the connection;
/// - `/big?n=N`: N pattern bytes with Content-Length, written in 64 KiB pieces;
/// - `/head`: `content-length: 1234` (and those bytes, unless HEAD);
/// - `/nocontent`: 204, `/notmodified`: 304, both without a length;
/// - `/conn-cl`: `Connection: content-length` next to `content-length: 2`;
/// - `/gzip-chunked`: `Transfer-Encoding: gzip, chunked`;
/// - `/truncated?n=N[&te=1]`: announces N bytes (length or chunked), sends half, closes;
/// - `/interim`: a 100 and a 103 before the final 200;
/// - `/hop`: hop-by-hop response headers (named in `Connection`, `Keep-Alive`,
///   `Proxy-Authenticate`) next to `X-Backend-Kept`;
/// - `/bare-lf`: `HTTP/1.1 200 OK\nContent-Length: 5\n\nhello` (bare LF line ends, which
///   RFC 9112 §2.2 lets a recipient accept);
/// - `/early-413[?hold_ms=N]`: reads the head only, answers `413` with `Connection: close`
///   and closes its side at once; the socket is then closed at once (a reset if body bytes
///   arrive), or after N ms (at most 3 s) of reading nothing;
/// - `/stall`: announces `content-length: 10`, sends 5 bytes, then sends nothing for 20 s
///   without closing;
/// - `/ka-close`: the default answer, kept-alive by its head, but the connection is closed
///   right after it (a backend with a very short keep-alive timeout);
/// - `/ka-stale`: the default answer, kept-alive; the next request on that connection is met
///   with a close as its first bytes arrive (the keep-alive race, made certain: the backend
///   closed the idle connection just as the proxy reused it). Counted in `hangups`;
/// - anything else: 200 with body `<method> <target> <body length>`.
///
/// `ms=<n>` in any query delays the answer by n ms (at most 2 s).
///
/// A HEAD request gets the head a GET would get, without the body. Dropping it stops the
/// listener and every connection.
struct RawBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Requests met with a close after `/ka-stale`.
    hangups: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawBackend {
    async fn start() -> anyhow::Result<RawBackend> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind raw backend")?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let hangups = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(raw_accept(listener, seen.clone(), connections.clone(), hangups.clone()));
        Ok(RawBackend { addr, seen, connections, hangups, task })
    }

    /// Every request received so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last request whose target starts with `prefix`.
    fn last(&self, prefix: &str) -> anyhow::Result<Seen> {
        let seen = self.seen();
        seen.iter().rev().find(|s| s.target().starts_with(prefix)).cloned().with_context(|| {
            let targets: Vec<_> = seen.iter().map(|s| format!("{} {}", s.method(), s.target())).collect();
            format!("the backend never saw a request for {prefix}; it saw {targets:?}")
        })
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_accept(
    listener: TcpListener,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    hangups: Arc<AtomicUsize>,
) {
    // Dropped with the task on abort: every connection task is aborted with it.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.fetch_add(1, SeqCst);
                let _ = stream.set_nodelay(true);
                let mut wire = Wire::new(stream, "raw backend");
                wire.timeout = BACKEND_IDLE;
                conns.spawn(raw_serve(wire, seen.clone(), hangups.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn raw_serve(mut wire: Wire, seen: Arc<Mutex<Vec<Seen>>>, hangups: Arc<AtomicUsize>) {
    let record = |req: &Seen| seen.lock().unwrap_or_else(|e| e.into_inner()).push(req.clone());
    // Set after answering `/ka-stale`.
    let mut hang_up_next = false;
    for _ in 0..10_000 {
        if hang_up_next {
            // The first bytes of the next request: close without answering (dropping `wire`).
            if matches!(wire.fill_io().await, Ok(n) if n > 0) {
                hangups.fetch_add(1, SeqCst);
            }
            return;
        }
        let head = match wire.read_head().await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                eprintln!("[raw backend] bad request head: {e:#}");
                return;
            }
        };
        let path = head.line[1].split('?').next().unwrap_or_default().to_string();
        if path == "/early-413" {
            // Answered from the head alone: the body is never read.
            let req = Seen { head, body: Vec::new(), chunked: false, trailers: Vec::new() };
            record(&req);
            if let Err(e) = raw_answer_early(&mut wire, &req).await {
                eprintln!("[raw backend] answering {}: {e:#}", req.target());
            }
            return;
        }
        let req = match wire.read_request_body(head).await {
            Ok(req) => req,
            Err(e) => {
                eprintln!("[raw backend] bad request body: {e:#}");
                return;
            }
        };
        record(&req);
        hang_up_next = path == "/ka-stale";
        match raw_respond(&mut wire, &req).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = wire.stream.shutdown().await;
                return;
            }
            Err(e) => {
                eprintln!("[raw backend] answering {} {}: {e:#}", req.method(), req.target());
                return;
            }
        }
    }
}

/// `/early-413`: a 413 as soon as the head arrived, `Connection: close`, FIN; then the socket
/// is closed at once, or after `hold_ms` of reading nothing.
async fn raw_answer_early(wire: &mut Wire, req: &Seen) -> anyhow::Result<()> {
    let body = "413 request body too large\n";
    let answer = format!(
        "HTTP/1.1 413 Payload Too Large\r\nx-kind: early\r\nConnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    wire.send(answer.as_bytes()).await?;
    wire.stream.shutdown().await?;
    if let Some(ms) = query_param(req.target(), "hold_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(3000))).await;
    }
    Ok(())
}

/// Answers one request; `Ok(false)` when the connection is to be closed.
async fn raw_respond(wire: &mut Wire, req: &Seen) -> anyhow::Result<bool> {
    let head_only = req.method() == "HEAD";
    let target = req.target();
    let path = target.split('?').next().unwrap_or_default();
    let n = query_param(target, "n").and_then(|v| v.parse::<usize>().ok()).unwrap_or(1000);
    if let Some(ms) = query_param(target, "ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(2000))).await;
    }
    match path {
        "/chunked" => {
            wire.send(b"HTTP/1.1 200 OK\r\nx-kind: chunked\r\nTransfer-Encoding: chunked\r\n\r\n").await?;
            if head_only {
                return Ok(true);
            }
            let body = pattern(n);
            let sizes = [1usize, 10, 4096, 100_000, 7, 65_536, 333];
            let (mut at, mut i) = (0, 0);
            while at < body.len() {
                let size = sizes[i % sizes.len()].min(body.len() - at);
                let ext = if i == 0 { ";ext=first;q=\"x\"" } else { "" };
                let mut out = format!("{size:X}{ext}\r\n").into_bytes();
                out.extend_from_slice(&body[at..at + size]);
                out.extend_from_slice(b"\r\n");
                wire.send(&out).await?;
                at += size;
                i += 1;
            }
            wire.send(b"0\r\nx-trailer: done\r\n\r\n").await?;
            Ok(true)
        }
        "/close" => {
            wire.send(b"HTTP/1.1 200 OK\r\nx-kind: close\r\n\r\n").await?;
            if head_only {
                return Ok(true);
            }
            for piece in pattern(n).chunks(50_000) {
                wire.send(piece).await?;
            }
            Ok(false)
        }
        "/big" => {
            wire.send(format!("HTTP/1.1 200 OK\r\nx-kind: big\r\ncontent-length: {n}\r\n\r\n").as_bytes()).await?;
            if !head_only {
                for piece in pattern(n).chunks(64 * 1024) {
                    wire.send(piece).await?;
                }
            }
            Ok(true)
        }
        "/head" => {
            wire.send(b"HTTP/1.1 200 OK\r\nx-kind: head\r\ncontent-length: 1234\r\n\r\n").await?;
            if !head_only {
                wire.send(&pattern(1234)).await?;
            }
            Ok(true)
        }
        "/nocontent" => {
            wire.send(b"HTTP/1.1 204 No Content\r\nx-kind: nocontent\r\n\r\n").await?;
            Ok(true)
        }
        "/notmodified" => {
            wire.send(b"HTTP/1.1 304 Not Modified\r\nx-kind: notmodified\r\netag: \"v1\"\r\n\r\n").await?;
            Ok(true)
        }
        "/conn-cl" => {
            // Names its own framing header in Connection.
            wire.send(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\ncontent-length: 2\r\n\r\n").await?;
            if !head_only {
                wire.send(b"ok").await?;
            }
            Ok(true)
        }
        "/gzip-chunked" => {
            // A transfer coding besides chunked (the bytes are not really gzip: no one decodes them).
            wire.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").await?;
            if !head_only {
                wire.send(b"5\r\nGZIP!\r\n0\r\n\r\n").await?;
            }
            Ok(true)
        }
        "/truncated" => {
            // Announces n bytes (by length, or chunked with `te=1`), sends half, closes.
            let body = pattern(n);
            if query_param(target, "te") == Some("1") {
                wire.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await?;
                wire.send(format!("{:x}\r\n", n).as_bytes()).await?;
            } else {
                wire.send(format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").as_bytes()).await?;
            }
            wire.send(&body[..n / 2]).await?;
            Ok(false)
        }
        "/interim" => {
            // Two interim responses before the final one.
            wire.send(
                b"HTTP/1.1 100 Continue\r\n\r\n\
                  HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 200 OK\r\nx-kind: interim\r\ncontent-length: 5\r\n\r\nfinal",
            )
            .await?;
            Ok(true)
        }
        "/hop" => {
            wire.send(
                b"HTTP/1.1 200 OK\r\n\
                  Connection: keep-alive, X-Backend-Hop\r\n\
                  Keep-Alive: timeout=5, max=100\r\n\
                  X-Backend-Hop: secret\r\n\
                  Proxy-Authenticate: Basic realm=\"x\"\r\n\
                  X-Backend-Kept: yes\r\n\
                  content-length: 2\r\n\r\n",
            )
            .await?;
            if !head_only {
                wire.send(b"ok").await?;
            }
            Ok(true)
        }
        "/bare-lf" => {
            wire.send(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello").await?;
            Ok(true)
        }
        "/stall" => {
            wire.send(b"HTTP/1.1 200 OK\r\nx-kind: stall\r\ncontent-length: 10\r\n\r\n01234").await?;
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok(false)
        }
        _ => {
            let body = format!("{} {} {}", req.method(), target, req.body.len());
            let mut out = format!("HTTP/1.1 200 OK\r\nx-kind: default\r\ncontent-length: {}\r\n\r\n", body.len());
            if !head_only {
                out.push_str(&body);
            }
            wire.send(out.as_bytes()).await?;
            // `/ka-close`: nothing in the answer says so, but the connection closes now.
            Ok(path != "/ka-close")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A node in front of the raw backend (and the backend).
async fn raw_setup(id: &str) -> anyhow::Result<(Node, RawBackend)> {
    let b = RawBackend::start().await?;
    let node = Node::builder(id).backend_spec(&b.addr.to_string()).start().await?;
    Ok((node, b))
}

/// A node in front of a harness (hyper) backend.
async fn echo_setup(id: &str) -> anyhow::Result<(Node, Backend)> {
    let b = Backend::start("echo").await?;
    let node = Node::builder(id).backend(&b).start().await?;
    Ok((node, b))
}

/// Values of header `name` in an `/echo` answer of the hyper backend.
fn echoed<'a>(echo: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    echo["headers"][name].as_array().map(|v| v.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default()
}

/// Sends a GET for `target` on `c` and expects a 200 from the raw backend's default route.
async fn get_default(c: &mut Wire, target: &str, what: &str) -> anyhow::Result<Response> {
    c.send(format!("GET {target} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
    let r = c.read_final("GET").await.with_context(|| format!("{what}: GET {target}"))?;
    ensure!(
        r.status == 200 && r.text() == format!("GET {target} 0"),
        "{what}: GET {target} on the same connection: {r:?}"
    );
    ensure!(!r.says_close(), "{what}: the connection should stay open: {r:?}");
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// 1. Pipelining
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_then_closed() -> R {
    let (node, b) = echo_setup("pipeline").await?;
    let mut c = Wire::connect(node.proxy, "pipelining client").await?;
    // Three requests in one write: GET, POST with a body, GET with Connection: close.
    c.send(
        b"GET /echo?n=1 HTTP/1.1\r\nHost: pipe\r\n\r\n\
          POST /echo?n=2 HTTP/1.1\r\nHost: pipe\r\nContent-Length: 11\r\n\r\nhello world\
          GET /echo?n=3 HTTP/1.1\r\nHost: pipe\r\nConnection: close\r\n\r\n",
    )
    .await?;
    for (i, (method, body_len)) in [("GET", 0), ("POST", 11), ("GET", 0)].into_iter().enumerate() {
        let n = i + 1;
        let r = c.read_final(method).await.with_context(|| format!("pipelined response {n}"))?;
        assert_eq!(r.status, 200, "pipelined response {n}: {r:?}");
        let echo = r.json()?;
        assert_eq!(echo["uri"], format!("/echo?n={n}"), "response {n} answers request {n} (in order): {echo}");
        assert_eq!(echo["method"], method, "response {n}: {echo}");
        assert_eq!(echo["body_len"], body_len, "request {n}'s body reached the backend whole: {echo}");
        assert_eq!(r.says_close(), n == 3, "only the last response announces the close: {r:?}");
    }
    c.expect_closed("after the response to the Connection: close request").await?;
    assert_eq!(b.requests(), 3, "the backend got each pipelined request once");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Keep-alive and HTTP/1.0
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_requests_on_one_keep_alive_connection() -> R {
    let (node, b) = echo_setup("keepalive").await?;
    let mut c = Wire::connect(node.proxy, "keep-alive client").await?;
    let started = Instant::now();
    for i in 0..50 {
        // Alternate GETs and POSTs with bodies of varying length.
        let (method, body) = if i % 2 == 0 { ("GET", Vec::new()) } else { ("POST", pattern(i * 37)) };
        let mut req = format!("{method} /echo?i={i} HTTP/1.1\r\nHost: ka\r\n").into_bytes();
        if method == "POST" {
            req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(&body);
        c.send(&req).await?;
        let r = c.read_final(method).await.with_context(|| format!("request {i} of 50"))?;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert!(!r.says_close(), "request {i}: a kept-alive connection is not closed: {r:?}");
        let echo = r.json()?;
        assert_eq!(
            (echo["uri"].as_str(), echo["body_len"].as_u64()),
            (Some(&*format!("/echo?i={i}")), Some(body.len() as u64)),
            "request {i}: {echo}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "50 requests took over 30 s (at {i})");
    }
    assert_eq!(b.requests(), 50);
    let st = node.status_json().await?;
    assert_eq!(st["connections"]["accepts"], 1, "one client connection carried all 50 requests: {st}");
    // Still open: one more, with Connection: close, then the node closes.
    c.send(b"GET /echo?last HTTP/1.1\r\nHost: ka\r\nConnection: close\r\n\r\n").await?;
    let r = c.read_final("GET").await?;
    assert!(r.status == 200 && r.says_close(), "{r:?}");
    c.expect_closed("after Connection: close").await?;
    Ok(())
}

/// An idle kept-alive connection reads the start of the next request and waits for the rest
/// on the socket's readiness (a read that drained the socket clears it): a head sent in two
/// pieces a while apart is still read whole, and a request sent together with the client's
/// FIN is answered, then the connection closes at once: the end of stream read along with the
/// request is not lost while the connection waits for another (that would take
/// `keepalive_timeout`, 75 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_reads_split_heads_and_sees_a_fin_sent_with_a_request() -> R {
    let (node, b) = echo_setup("idle-reads").await?;
    let mut c = Wire::connect(node.proxy, "keep-alive client").await?;
    c.send(b"GET /echo?n=1 HTTP/1.1\r\nHost: idle\r\n\r\n").await?;
    let r = c.read_final("GET").await.context("request 1")?;
    ensure!(r.status == 200 && !r.says_close(), "request 1: {r:?}");
    // Idle, then a head in two pieces.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(b"GET /echo?n=2 HTTP/1.1\r\nHo").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(b"st: idle\r\n\r\n").await?;
    let r = c.read_final("GET").await.context("request 2, sent in two pieces")?;
    ensure!(r.status == 200 && r.json()?["uri"] == "/echo?n=2", "request 2: {r:?}");
    // Idle again, then a request and the client's FIN right behind it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.stream.write_all(b"GET /echo?n=3 HTTP/1.1\r\nHost: idle\r\n\r\n").await?;
    c.stream.shutdown().await?;
    let sent = Instant::now();
    let r = c.read_final("GET").await.context("request 3, sent with the client's FIN")?;
    ensure!(r.status == 200 && r.json()?["uri"] == "/echo?n=3", "request 3: {r:?}");
    c.expect_closed("after answering the request that came with the client's FIN").await?;
    ensure!(sent.elapsed() < Duration::from_secs(3), "closed {:?} after the client's FIN", sent.elapsed());
    assert_eq!(b.requests(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_requests_get_connection_close_and_are_closed() -> R {
    let (node, b) = echo_setup("http10").await?;
    for (case, req) in [
        ("HTTP/1.0", &b"GET /echo?v=10 HTTP/1.0\r\nHost: old\r\n\r\n"[..]),
        ("HTTP/1.0 without Host", b"GET /echo?v=10 HTTP/1.0\r\n\r\n"),
        ("HTTP/1.0 asking for keep-alive", b"GET /echo?v=10 HTTP/1.0\r\nHost: old\r\nConnection: keep-alive\r\n\r\n"),
        ("HTTP/1.0 POST", b"POST /echo?v=10 HTTP/1.0\r\nHost: old\r\nContent-Length: 5\r\n\r\nhello"),
    ] {
        let mut c = Wire::connect(node.proxy, case).await?;
        c.send(req).await?;
        let method = if case.contains("POST") { "POST" } else { "GET" };
        let r = c.read_final(method).await.with_context(|| case.to_string())?;
        assert_eq!(r.status, 200, "{case}: {r:?}");
        assert!(r.says_close(), "{case}: the response carries connection: close: {r:?}");
        assert!(
            matches!(r.framing, Framing::Length(_) | Framing::Close),
            "{case}: an HTTP/1.0 client cannot decode chunked: {r:?}"
        );
        let echo = r.json()?;
        assert_eq!(echo["uri"], "/echo?v=10", "{case}: {echo}");
        assert_eq!(echo["body_len"], if method == "POST" { 5 } else { 0 }, "{case}: {echo}");
        c.expect_closed(case).await?;
    }
    assert_eq!(b.requests(), 4);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Response framing
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_reaches_http11_client_chunked_and_whole() -> R {
    let (node, b) = raw_setup("chunked11").await?;
    let mut c = Wire::connect(node.proxy, "HTTP/1.1 client").await?;
    for n in [300_000usize, 1, 5000] {
        c.send(format!("GET /chunked?n={n} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("GET").await.with_context(|| format!("chunked response of {n} bytes"))?;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(matches!(r.framing, Framing::Chunked(_)), "passed on chunked: {r:?}");
        assert!(r.header("content-length").is_none(), "{r:?}");
        assert_eq!(r.header("x-kind"), Some("chunked"), "{r:?}");
        assert!(!r.says_close(), "{r:?}");
        same_bytes(&r.body, &pattern(n), &format!("chunked body of {n} bytes"))?;
    }
    // The connection still carries requests.
    get_default(&mut c, "/after-chunked", "after three chunked responses").await?;
    assert_eq!(b.seen().len(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_reaches_http10_client_unchunked_until_close() -> R {
    let (node, _b) = raw_setup("chunked10").await?;
    let n = 300_000;
    let mut c = Wire::connect(node.proxy, "HTTP/1.0 client").await?;
    c.send(format!("GET /chunked?n={n} HTTP/1.0\r\nHost: raw\r\n\r\n").as_bytes()).await?;
    let r = c.read_final("GET").await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.framing, Framing::Close, "no chunked encoding and no length for HTTP/1.0: {r:?}");
    assert!(r.says_close(), "{r:?}");
    assert!(r.header("transfer-encoding").is_none() && r.header("content-length").is_none(), "{r:?}");
    same_bytes(&r.body, &pattern(n), "close-delimited body for the HTTP/1.0 client")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_response_is_chunked_for_http11_and_connection_stays_usable() -> R {
    let (node, b) = raw_setup("untilclose").await?;
    let mut c = Wire::connect(node.proxy, "HTTP/1.1 client").await?;
    for n in [200_000usize, 10] {
        c.send(format!("GET /close?n={n} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("GET").await.with_context(|| format!("close-delimited response of {n} bytes"))?;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(matches!(r.framing, Framing::Chunked(_)), "a body without length goes chunk-encoded: {r:?}");
        assert!(!r.says_close(), "the client connection outlives the backend's: {r:?}");
        same_bytes(&r.body, &pattern(n), &format!("close-delimited body of {n} bytes"))?;
    }
    get_default(&mut c, "/after-close", "after close-delimited responses").await?;
    assert!(b.connections.load(SeqCst) >= 2, "the backend closed after each close-delimited body");

    // An HTTP/1.0 client gets it close-delimited too.
    let n = 70_000;
    let mut c = Wire::connect(node.proxy, "HTTP/1.0 client").await?;
    c.send(format!("GET /close?n={n} HTTP/1.0\r\n\r\n").as_bytes()).await?;
    let r = c.read_final("GET").await?;
    assert_eq!((r.status, r.framing), (200, Framing::Close), "{r:?}");
    same_bytes(&r.body, &pattern(n), "close-delimited body for HTTP/1.0")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_content_length_response_arrives_byte_exact() -> R {
    let (node, _b) = raw_setup("bigbody").await?;
    let mut c = Wire::connect(node.proxy, "HTTP/1.1 client").await?;
    let want = pattern(6 << 20);
    for n in [5 << 20, (6 << 20) - 1] {
        c.send(format!("GET /big?n={n} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("GET").await.with_context(|| format!("{n}-byte response"))?;
        assert_eq!((r.status, r.framing), (200, Framing::Length(n)), "the length is passed on: {r:?}");
        same_bytes(&r.body, &want[..n], &format!("{n}-byte body"))?;
    }
    get_default(&mut c, "/after-big", "after two large bodies").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_backend_bodies_stay_detectable() -> R {
    let (node, _b) = raw_setup("truncated").await?;
    for (target, what) in [
        ("/truncated?n=100000", "Content-Length body cut in half"),
        ("/truncated?n=100000&te=1", "chunked body cut off"),
    ] {
        let mut c = Wire::connect(node.proxy, what).await?;
        c.send(format!("GET {target} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
        match c.read_response("GET").await {
            Ok(r) => panic!("{what}: the client got a complete-looking response from a cut-off body: {r:?}"),
            Err(e) => {
                let e = format!("{e:#}");
                assert!(e.contains("closed"), "{what}: the client sees the connection close mid-body: {e}");
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_from_the_backend_do_not_disturb_the_final_one() -> R {
    let (node, _b) = raw_setup("interim").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.send(b"GET /interim HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
    // Interim responses may be passed on or dropped; the final one must come whole.
    let mut r = c.read_response("GET").await?;
    for _ in 0..2 {
        if r.status >= 200 {
            break;
        }
        assert!(matches!(r.status, 100 | 103), "{r:?}");
        r = c.read_response("GET").await?;
    }
    assert_eq!((r.status, r.text().as_str(), r.header("x-kind")), (200, "final", Some("interim")), "{r:?}");
    get_default(&mut c, "/after-interim", "after interim responses").await?;
    Ok(())
}

/// Transfer-Encoding is hop-by-hop, but a proxy that only removes the chunked framing must
/// keep the other codings listed (RFC 9112 §6.1): otherwise the receiver gets gzip-coded
/// bytes that claim to be plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_besides_chunked_are_not_lost() -> R {
    let (node, b) = raw_setup("tecodings").await?;
    let mut problems = Vec::new();

    let mut c = Wire::connect(node.proxy, "client").await?;
    c.send(b"GET /gzip-chunked HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
    let r = c.read_final("GET").await?;
    assert_eq!(r.status, 200, "{r:?}");
    if !r.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("gzip")) {
        problems.push(format!(
            "response: the backend sent `Transfer-Encoding: gzip, chunked`, the client got {:?} \
             (body {:?}, still gzip-coded)",
            r.header("transfer-encoding"),
            r.text()
        ));
    }

    // A request with codings besides chunked is refused with 501 (RFC 9112 §6.1 lets a server
    // refuse codings it does not pass on) and never reaches the backend.
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.send(
        b"POST /upload-gzip HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nGZIP!\r\n0\r\n\r\n",
    )
    .await?;
    let r = c.read_final("POST").await?;
    assert_eq!((r.status, r.header("x-shoal-node")), (501, Some("tecodings")), "{r:?}");
    assert!(b.last("/upload-gzip").is_err(), "a refused request reached the backend");
    assert!(problems.is_empty(), "transfer codings lost:\n{}", problems.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. HEAD, 204, 304
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_have_no_body_and_keep_the_connection() -> R {
    let (node, b) = raw_setup("nobody").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;

    c.send(b"HEAD /head HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
    let r = c.read_final("HEAD").await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), Some("1234"), "HEAD keeps the backend's content-length: {r:?}");
    assert!(r.header("transfer-encoding").is_none(), "{r:?}");
    get_default(&mut c, "/after-head", "after HEAD").await?;
    assert_eq!(b.last("/head")?.method(), "HEAD", "HEAD reached the backend as HEAD");

    // HEAD of a resource the backend would send chunked, and of one it would close-delimit.
    for path in ["/chunked?n=100", "/close?n=100"] {
        c.send(format!("HEAD {path} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("HEAD").await?;
        assert_eq!(r.status, 200, "HEAD {path}: {r:?}");
        assert!(!r.says_close(), "HEAD {path}: {r:?}");
        get_default(&mut c, &format!("/after-head-{}", &path[1..6]), &format!("after HEAD {path}")).await?;
    }

    for (path, status) in [("/nocontent", 204), ("/notmodified", 304)] {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("GET").await?;
        assert_eq!(r.status, status, "{r:?}");
        assert!(r.header("transfer-encoding").is_none(), "a {status} has no body, so no chunked framing either: {r:?}");
        assert!(r.header("content-length").is_none_or(|v| v == "0"), "{r:?}");
        get_default(&mut c, &format!("/after-{status}"), &format!("after a {status}")).await?;
    }

    // The same, pipelined in one write: any stray body byte would corrupt the next response.
    c.send(
        b"HEAD /head HTTP/1.1\r\nHost: raw\r\n\r\n\
          GET /nocontent HTTP/1.1\r\nHost: raw\r\n\r\n\
          HEAD /big?n=5000 HTTP/1.1\r\nHost: raw\r\n\r\n\
          GET /notmodified HTTP/1.1\r\nHost: raw\r\n\r\n\
          GET /pipelined-last HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n",
    )
    .await?;
    for (method, status, what) in
        [("HEAD", 200, "HEAD /head"), ("GET", 204, "204"), ("HEAD", 200, "HEAD /big"), ("GET", 304, "304")]
    {
        let r = c.read_final(method).await.with_context(|| format!("pipelined {what}"))?;
        assert_eq!(r.status, status, "pipelined {what}: {r:?}");
    }
    let r = c.read_final("GET").await.context("pipelined last GET")?;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /pipelined-last 0"), "{r:?}");
    c.expect_closed("after the pipelined Connection: close").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() -> R {
    let (node, b) = raw_setup("expect").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;

    // Content-Length body.
    let body = pattern(100_000);
    c.send(
        format!(
            "POST /upload?cl HTTP/1.1\r\nHost: raw\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let interim = c.read_response("POST").await.context("waiting for 100 Continue before sending the body")?;
    assert_eq!(interim.status, 100, "the first answer is 100 Continue: {interim:?}");
    assert!(interim.head.raw.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    assert!(b.seen().is_empty(), "nothing complete reached the backend before the body was sent");
    c.send(&body).await?;
    let r = c.read_final("POST").await.context("final response after 100 Continue")?;
    assert_eq!((r.status, r.text()), (200, format!("POST /upload?cl {}", body.len())), "{r:?}");
    let seen = b.last("/upload?cl")?;
    same_bytes(&seen.body, &body, "body the backend saw")?;
    assert!(seen.head.header("expect").is_none(), "Expect is answered by the node, not forwarded: {seen:?}");
    assert_eq!(seen.head.header("content-length"), Some("100000"), "{seen:?}");

    // Chunked body, same connection.
    c.send(b"POST /upload?te HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .await?;
    let interim = c.read_response("POST").await.context("100 Continue for a chunked body")?;
    assert_eq!(interim.status, 100, "{interim:?}");
    c.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await?;
    let r = c.read_final("POST").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "POST /upload?te 11"), "{r:?}");
    let seen = b.last("/upload?te")?;
    assert_eq!(seen.body, b"hello world", "{seen:?}");
    assert!(seen.head.header("expect").is_none(), "{seen:?}");

    // A body-less request with Expect gets no 100, just the answer.
    c.send(b"GET /no-body HTTP/1.1\r\nHost: raw\r\nExpect: 100-continue\r\n\r\n").await?;
    let r = c.read_response("GET").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /no-body 0"), "no 100 without a body: {r:?}");
    Ok(())
}

/// RFC 9110 §10.1.1 and §15.2: an expectation in an HTTP/1.0 request is ignored, and an
/// HTTP/1.0 client is never sent a 1xx response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_100_continue_for_an_http10_client() -> R {
    let (node, b) = raw_setup("expect10").await?;
    let mut c = Wire::connect(node.proxy, "HTTP/1.0 client").await?;
    c.send(b"POST /upload10 HTTP/1.0\r\nHost: raw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello").await?;
    let r = c.read_response("POST").await?;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "POST /upload10 5"),
        "the first response an HTTP/1.0 client gets is the final one: {r:?}"
    );
    assert_eq!(b.last("/upload10")?.body, b"hello");
    c.expect_closed("HTTP/1.0").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Absolute-form targets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_becomes_path_and_host() -> R {
    let (node, b) = raw_setup("absolute").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    for (target, path, host) in [
        ("http://example.test/path?q=1", "/path?q=1", "example.test"),
        ("http://example.test:8080?q=2", "/?q=2", "example.test:8080"),
        ("http://example.test", "/", "example.test"),
    ] {
        c.send(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("GET").await.with_context(|| format!("GET {target}"))?;
        assert_eq!((r.status, r.text()), (200, format!("GET {path} 0")), "GET {target}: {r:?}");
        let seen = b.last(path)?;
        assert_eq!(seen.target(), path, "origin-form for the backend: {seen:?}");
        assert_eq!(seen.head.all("host"), vec![host], "Host from the target's authority: {seen:?}");
    }
    Ok(())
}

/// RFC 9112 §3.2.2: a server receiving an absolute-form target ignores any Host header and
/// uses the target's authority; a proxy forwarding it generates Host from that authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_authority_overrides_a_conflicting_host() -> R {
    let (node, b) = raw_setup("absolutehost").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.send(b"GET http://example.test/with-host HTTP/1.1\r\nHost: other.test\r\n\r\n").await?;
    let r = c.read_final("GET").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /with-host 0"), "{r:?}");
    let seen = b.last("/with-host")?;
    assert_eq!(
        seen.head.all("host"),
        vec!["example.test"],
        "the target's authority, not the client's Host header, names the host: {seen:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Hop-by-hop headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stay_on_their_hop() -> R {
    let (node, b) = raw_setup("hop").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.send(
        b"GET /hop HTTP/1.1\r\n\
          Host: hop\r\n\
          Connection: keep-alive, X-Client-Hop\r\n\
          Connection: x-other-hop\r\n\
          X-Client-Hop: 1\r\n\
          X-Other-Hop: 2\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-Client-Kept: 3\r\n\r\n",
    )
    .await?;
    let r = c.read_final("GET").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");

    // Request side.
    let seen = b.last("/hop")?;
    assert_eq!(seen.head.header("x-client-kept"), Some("3"), "end-to-end header forwarded: {seen:?}");
    for gone in ["x-client-hop", "x-other-hop", "keep-alive", "te", "proxy-connection"] {
        assert!(seen.head.header(gone).is_none(), "hop-by-hop {gone} reached the backend: {seen:?}");
    }
    let tokens = seen.head.connection_tokens();
    assert!(!tokens.iter().any(|t| t.contains("hop")), "the client's Connection tokens reached the backend: {seen:?}");

    // Response side.
    assert_eq!(r.header("x-backend-kept"), Some("yes"), "{r:?}");
    for gone in ["x-backend-hop", "keep-alive", "proxy-authenticate"] {
        assert!(r.header(gone).is_none(), "hop-by-hop {gone} reached the client: {r:?}");
    }
    assert!(
        !r.head.connection_tokens().iter().any(|t| t.contains("hop") || t == "keep-alive"),
        "the backend's Connection header reached the client: {r:?}"
    );
    get_default(&mut c, "/after-hop", "after the hop-by-hop exchange").await?;
    Ok(())
}

/// A client must not be able to strip the headers that frame or route its request by naming
/// them in `Connection`: without its Content-Length, the body would reach the backend as the
/// next request (request smuggling), and a pooled upstream connection would then carry a
/// response nobody asked for to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_content_length_or_host() -> R {
    let b = RawBackend::start().await?;
    // One proxy worker: every client shares one idle queue of upstream connections.
    let node =
        Node::builder("nominate").config("[node]\nworkers = 1\n").backend_spec(&b.addr.to_string()).start().await?;
    let mut problems = Vec::new();

    // The body is a complete request, answered after 500 ms.
    let smuggled = "GET /smuggled?ms=500 HTTP/1.1\r\nHost: raw\r\n\r\n";
    let mut c = Wire::connect(node.proxy, "client A").await?;
    let req = format!(
        "POST /first HTTP/1.1\r\nHost: raw\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    c.send(req.as_bytes()).await?;
    let r = c.read_final("POST").await?;
    match r.status {
        400 => {}
        200 => {
            let want = format!("POST /first {}", smuggled.len());
            if r.text() != want {
                problems.push(format!("client A: POST /first was answered {:?}, want {want:?}", r.text()));
            }
            // Another client, right after.
            let mut victim = Wire::connect(node.proxy, "client B").await?;
            victim.send(b"GET /victim HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
            let r = victim.read_final("GET").await?;
            if r.text() != "GET /victim 0" {
                problems.push(format!("client B: GET /victim was answered {:?}", r.text()));
            }
            let first = b.last("/first")?;
            if first.body != smuggled.as_bytes() {
                problems.push(format!("the backend got POST /first with body {:?}: {first:?}", lossy(&first.body)));
            }
            if let Ok(s) = b.last("/smuggled") {
                problems.push(format!("client A's body reached the backend as a request of its own: {s:?}"));
            }
        }
        _ => problems.push(format!("Connection: Content-Length answered {r:?}")),
    }

    let mut c = Wire::connect(node.proxy, "client C").await?;
    c.send(b"GET /named-host HTTP/1.1\r\nHost: raw.example\r\nConnection: host\r\n\r\n").await?;
    let r = c.read_final("GET").await?;
    if r.status != 400 {
        let seen = b.last("/named-host")?;
        if seen.head.all("host") != ["raw.example"] {
            problems.push(format!("Connection: host: the backend got a request without a Host header: {seen:?}"));
        }
    }
    assert!(problems.is_empty(), "headers named in Connection:\n{}", problems.join("\n"));
    Ok(())
}

/// The same on the response side: a backend's `Connection: content-length` must not leave
/// the client with a kept-alive response it cannot frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connection_header_cannot_strip_the_response_length() -> R {
    let (node, _b) = raw_setup("nominateresp").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.send(b"GET /conn-cl HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
    let head = c.read_head().await?.context("no response")?;
    assert_eq!(head.status()?, 200, "{head:?}");
    let framed = head.header("content-length").is_some() || head.header("transfer-encoding").is_some();
    let closes = head.connection_tokens().iter().any(|t| t == "close");
    assert!(
        framed || closes,
        "a kept-alive response without content-length or transfer-encoding: the client cannot tell where \
         the body ends: {head:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Chunked request bodies
// ---------------------------------------------------------------------------------------------

/// `body` chunk-encoded with extensions on some chunks and two trailer fields.
fn chunk_encode(body: &[u8]) -> Vec<u8> {
    let sizes = [3usize, 1, 4096, 17, 40_000, 9, 12_345];
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < body.len() {
        let size = sizes[i % sizes.len()].min(body.len() - at);
        let ext = match i % 3 {
            0 => ";name=value",
            1 => "",
            _ => ";a=b;quoted=\"x;y\"",
        };
        out.extend_from_slice(format!("{size:x}{ext}\r\n").as_bytes());
        out.extend_from_slice(&body[at..at + size]);
        out.extend_from_slice(b"\r\n");
        at += size;
        i += 1;
    }
    out.extend_from_slice(b"0;last=1\r\nX-Checksum: abc\r\nX-Trailer-Two: 2\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_with_extensions_and_trailers_arrives_whole() -> R {
    let (node, b) = raw_setup("chunkedreq").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    let body = pattern(150_000);
    let encoded = chunk_encode(&body);
    c.send(b"POST /upload HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n").await?;
    // In odd pieces, splitting size lines, data and the trailers across writes.
    for piece in encoded.chunks(7_777) {
        c.send(piece).await?;
        tokio::task::yield_now().await;
    }
    let r = c.read_final("POST").await?;
    assert_eq!((r.status, r.text()), (200, format!("POST /upload {}", body.len())), "{r:?}");
    let seen = b.last("/upload")?;
    same_bytes(&seen.body, &body, "chunked request body at the backend")?;
    assert!(seen.chunked, "a body without length is forwarded chunked: {seen:?}");
    assert!(seen.head.header("content-length").is_none(), "{seen:?}");
    // Trailers may be dropped (as nginx does); any passed on must be the client's.
    for t in &seen.trailers {
        assert!(["X-Checksum: abc", "X-Trailer-Two: 2"].contains(&t.as_str()), "unexpected trailer {t:?}: {seen:?}");
    }

    // Trailers were consumed: the connection carries another request, chunked again.
    c.send(b"POST /small HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n").await?;
    c.send(&chunk_encode(b"hello world")).await?;
    let r = c.read_final("POST").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "POST /small 11"), "{r:?}");
    get_default(&mut c, "/after-chunked-bodies", "after two chunked request bodies").await?;

    // A hyper backend (strict about chunked framing) sees the right body length too.
    let (node, _echo) = echo_setup("chunkedreqecho").await?;
    let mut c = Wire::connect(node.proxy, "client of the echo node").await?;
    let mut req = b"PUT /echo HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend_from_slice(&chunk_encode(&body));
    c.send(&req).await?;
    let r = c.read_final("PUT").await?;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json()?;
    assert_eq!(echo["body_len"], body.len(), "{echo}");
    assert!(echoed(&echo, "x-checksum").is_empty(), "trailers are not turned into headers: {echo}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 9. Answers given before the request body was read (lingering close)
// ---------------------------------------------------------------------------------------------

/// Sends `head` and then `body_len` bytes of body from a separate task while this one reads
/// the response, as a client that does not wait before sending its body does. Returns the
/// response, and checks the connection then ends.
async fn answer_while_sending(addr: SocketAddr, head: &str, body_len: usize, what: &str) -> anyhow::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let head = head.as_bytes().to_vec();
    let writer = tokio::spawn(async move {
        let piece = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        let result = tokio::time::timeout(Duration::from_secs(15), async {
            wr.write_all(&head).await?;
            while sent < body_len {
                let n = piece.len().min(body_len - sent);
                wr.write_all(&piece[..n]).await?;
                sent += n;
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        (sent, result)
    });
    let mut c = Wire::new(rd, what);
    let r = c.read_final("POST").await.with_context(|| format!("{what}: the answer"))?;
    c.expect_fin(what).await?;
    let (sent, result) = writer.await?;
    eprintln!("{what}: the client got to send {sent} of {body_len} body bytes ({result:?})");
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_before_the_body_was_read_reaches_the_client_intact() -> R {
    let node = Node::builder("nobackends").start().await?;
    let big = 8 << 20;
    let want_body = "503 no usable backend\n";
    let check = |r: &Response, what: &str| {
        assert_eq!(r.status, 503, "{what}: {r:?}");
        assert_eq!(r.header("x-shoal-node"), Some("nobackends"), "{what}: {r:?}");
        assert_eq!(r.text(), want_body, "{what}: the body arrived whole: {r:?}");
        assert_eq!(r.framing, Framing::Length(want_body.len()), "{what}: {r:?}");
        assert!(r.says_close(), "{what}: the connection cannot carry another request: {r:?}");
    };

    // A client that keeps sending an 8 MiB body while the 503 comes back.
    let started = Instant::now();
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n");
    let r = answer_while_sending(node.proxy, &head, big, "8 MiB body, sent without waiting").await?;
    check(&r, "8 MiB Content-Length body");
    assert!(started.elapsed() < Duration::from_secs(8), "answered and closed in {:?}", started.elapsed());

    // Same with a chunked body of unknown length (the body here is not valid chunked data,
    // which must not matter: it is never read as a body).
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let r = answer_while_sending(node.proxy, head, big, "chunked body, sent without waiting").await?;
    check(&r, "chunked body");

    // A client that writes its whole (512 KiB) body before it reads anything.
    let mut c = Wire::connect(node.proxy, "write-then-read client").await?;
    let mut req = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", 512 << 10).into_bytes();
    req.extend_from_slice(&pattern(512 << 10));
    c.send(&req).await?;
    let r = c.read_final("POST").await.context("write-then-read client")?;
    check(&r, "write-then-read client");
    c.expect_fin("write-then-read client").await?;

    // Expect: 100-continue: the 503 comes instead of a 100, and the client need not send.
    let mut c = Wire::connect(node.proxy, "expecting client").await?;
    c.send(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\nExpect: 100-continue\r\n\r\n").as_bytes(),
    )
    .await?;
    let r = c.read_response("POST").await.context("expecting client")?;
    check(&r, "Expect: 100-continue without a backend");
    c.expect_fin("expecting client").await?;

    // A refused connect (the only backend is gone) is answered before the body too: 502.
    let addr = free_addr();
    let node = Node::builder("refused").backend_spec(&format!("{addr},max_fails=0")).start().await?;
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n");
    let r = answer_while_sending(node.proxy, &head, big, "8 MiB body to a node whose backend refuses").await?;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-shoal-node"), Some("refused"), "{r:?}");
    assert_eq!(r.text(), "502 no backend answered\n", "the body arrived whole: {r:?}");
    assert!(r.says_close(), "{r:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 10. The proxy's own answers to HEAD
// ---------------------------------------------------------------------------------------------

/// Checks that nothing more arrives on `c` within `quiet` (a body after a HEAD response would),
/// and that the connection stays open.
async fn expect_nothing_more(c: &mut Wire, quiet: Duration, what: &str) -> anyhow::Result<()> {
    ensure!(c.buf.is_empty(), "{}: {what}: bytes after the head: {:?}", c.label, lossy(&c.buf));
    let timeout = std::mem::replace(&mut c.timeout, quiet);
    let read = c.fill_io().await;
    c.timeout = timeout;
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        Ok(0) => bail!("{}: {what}: the connection closed", c.label),
        Ok(n) => bail!("{}: {what}: {n} bytes after the head: {:?}", c.label, lossy(&c.buf)),
        Err(e) => Err(e).with_context(|| format!("{}: {what}", c.label)),
    }
}

/// Checks the proxy's answer `r` to a HEAD: the status and headers a GET gets (the length of
/// the body it would have, `body`), and no body.
fn check_head_error(r: &Response, status: u16, body: &str, node: &str, what: &str) -> anyhow::Result<()> {
    ensure!(r.status == status, "{what}: want {status}: {r:?}");
    ensure!(r.header("x-shoal-node") == Some(node), "{what}: x-shoal-node: {r:?}");
    ensure!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{what}: content-type: {r:?}");
    let len = body.len().to_string();
    ensure!(r.header("content-length") == Some(len.as_str()), "{what}: the GET's content-length ({len}): {r:?}");
    ensure!(r.body.is_empty(), "{what}: {r:?}");
    Ok(())
}

/// RFC 9110 §9.3.2: a response to HEAD has no body, also when the proxy answers itself. A body
/// there is read by the client as the start of its next response (desync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_answering_head_have_no_body_and_the_next_response_is_its_own() -> R {
    let quiet = Duration::from_millis(300);

    // 503: a node without backends. Sequential requests, then pipelined ones.
    let node = Node::builder("headnone").start().await?;
    let want = "503 no usable backend\n";
    let mut c = Wire::connect(node.proxy, "client of a node without backends").await?;
    for i in 0..2 {
        c.send(format!("HEAD /none?i={i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("HEAD").await.context("HEAD answered 503")?;
        check_head_error(&r, 503, want, "headnone", "HEAD without backends")?;
        assert!(!r.says_close(), "{r:?}");
        expect_nothing_more(&mut c, quiet, "after the 503 to HEAD").await?;
        c.send(format!("GET /none?i={i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
        let r = c.read_final("GET").await.context("GET after a HEAD answered 503")?;
        assert_eq!((r.status, r.text().as_str()), (503, want), "the GET gets its own response, whole: {r:?}");
        assert!(!r.says_close(), "{r:?}");
    }
    c.send(
        b"HEAD /p1 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /p2 HTTP/1.1\r\nHost: x\r\n\r\n\
          HEAD /p3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let r = c.read_final("HEAD").await.context("pipelined HEAD 1")?;
    check_head_error(&r, 503, want, "headnone", "pipelined HEAD 1")?;
    let r = c.read_final("GET").await.context("pipelined GET after HEAD")?;
    assert_eq!((r.status, r.text().as_str()), (503, want), "pipelined GET: {r:?}");
    let r = c.read_final("HEAD").await.context("pipelined HEAD with Connection: close")?;
    check_head_error(&r, 503, want, "headnone", "HEAD with Connection: close")?;
    assert!(r.says_close(), "{r:?}");
    c.expect_closed("after the 503 to HEAD with Connection: close").await?;

    // 502: the only backend refuses connections.
    let addr = free_addr();
    let node = Node::builder("headrefused").backend_spec(&format!("{addr},max_fails=0")).start().await?;
    let want = "502 no backend answered\n";
    let mut c = Wire::connect(node.proxy, "client of a node whose backend refuses").await?;
    c.send(b"HEAD /refused HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let r = c.read_final("HEAD").await.context("HEAD answered 502")?;
    check_head_error(&r, 502, want, "headrefused", "HEAD to a refusing backend")?;
    expect_nothing_more(&mut c, quiet, "after the 502 to HEAD").await?;
    c.send(b"GET /refused HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let r = c.read_final("GET").await.context("GET after a HEAD answered 502")?;
    assert_eq!((r.status, r.text().as_str()), (502, want), "the GET gets its own response, whole: {r:?}");

    // 504, then a backend's own answer on the same connection.
    let b = RawBackend::start().await?;
    let node = Node::builder("headtimeout")
        .config("[upstream]\nread_timeout = \"1s\"\n")
        .backend_spec(&format!("{},max_fails=0", b.addr))
        .start()
        .await?;
    let mut c = Wire::connect(node.proxy, "client of a node whose backend is slow").await?;
    c.send(b"HEAD /head?ms=1800 HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
    let r = c.read_final("HEAD").await.context("HEAD answered 504")?;
    check_head_error(&r, 504, "504 backend timed out\n", "headtimeout", "HEAD to a slow backend")?;
    expect_nothing_more(&mut c, quiet, "after the 504 to HEAD").await?;
    get_default(&mut c, "/after-504", "after a 504 to HEAD").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 11. Response heads with bare LF line ends
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_response_head_reaches_the_client_well_formed() -> R {
    let (node, b) = raw_setup("barelf").await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.timeout = Duration::from_secs(4);
    for i in 0..2 {
        c.send(b"GET /bare-lf HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
        let r = c.read_final("GET").await.with_context(|| format!("bare-LF response {i}"))?;
        let raw = &r.head.raw;
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "the status line ends with CRLF right after the reason: {r:?}");
        assert_eq!(r.head.line, ["HTTP/1.1", "200", "OK"], "{r:?}");
        let bare = raw.bytes().enumerate().find(|&(i, ch)| ch == b'\n' && (i == 0 || raw.as_bytes()[i - 1] != b'\r'));
        assert!(bare.is_none(), "every line of the head ends with CRLF: {r:?}");
        assert_eq!(r.head.all("content-length"), vec!["5"], "{r:?}");
        assert_eq!((r.framing, r.text().as_str()), (Framing::Length(5), "hello"), "{r:?}");
        assert!(!r.says_close(), "{r:?}");
    }
    get_default(&mut c, "/after-bare-lf", "after two bare-LF responses").await?;
    assert_eq!(b.seen().len(), 3);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 12. The upstream exchange: early answers, timeouts, stale keep-alives
// ---------------------------------------------------------------------------------------------

/// The backend's entry in `/status`: its state, failure count and requests in flight.
async fn backend_health(node: &Node, addr: SocketAddr) -> anyhow::Result<(String, u64, u64)> {
    let b = node.backend_status(addr).await?;
    let num = |k: &str| b[k].as_u64().with_context(|| format!("no {k} in {b}"));
    Ok((b["state"].as_str().unwrap_or_default().to_string(), num("failures")?, num("in_flight")?))
}

/// Checks that backend `addr` is up and has no failure recorded.
async fn expect_not_blamed(node: &Node, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let (state, failures, _) = backend_health(node, addr).await?;
    ensure!(
        (state.as_str(), failures) == ("up", 0),
        "{what}: the backend was blamed: state {state}, failures {failures}: {}",
        node.backend_status(addr).await?
    );
    Ok(())
}

/// A backend that accepts but never reads, with a small receive window: a request head larger
/// than what the sockets between can hold cannot be written whole. `read_timeout` (nginx's
/// `proxy_send_timeout` as well) bounds that write: the client gets a 504 in about a second,
/// not a wait without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_the_backend_does_not_read_times_out() -> R {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(16)?;
    let addr = listener.local_addr()?;
    // Accepts and holds every connection, reading nothing.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    // Over what the kernel can buffer on the way: the node's send buffer grows up to
    // tcp_wmem's maximum (4 MiB on a stock kernel), the backend's window stays small.
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    let size = wmem_max + (1 << 20);
    let node = Node::builder("head-unread")
        .config(format!("[node]\nmax_header_bytes = {}\n\n[upstream]\nread_timeout = \"1s\"\n", size + 4096))
        .backend_spec(&format!("{addr},max_fails=0"))
        .start()
        .await?;
    let mut c = Wire::connect(node.proxy, "client with a large head").await?;
    let big = "v".repeat(size);
    c.send(format!("GET /big-head HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes()).await?;
    let sent = Instant::now();
    let r = c.read_final("GET").await.context("an answer to a head the backend never reads")?;
    let took = sent.elapsed();
    holder.abort();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}, read_timeout is 1 s");
    Ok(())
}

/// A backend that answers 413 from the request head and stops reading (or closes) while the
/// client is still uploading: the client gets that answer, and the backend is not blamed (the
/// failed write of the rest of the body is no backend failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_while_the_body_is_sent_reaches_the_client_and_ejects_nothing() -> R {
    let (node, b) = raw_setup("early413").await?;
    early_413_cases(&node, &b, false).await
}

/// The same with a body the node buffers whole first (`request_buffer_bytes` above its size):
/// the body goes upstream in one write that the backend cuts short; its answer still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_to_a_buffered_body_reaches_the_client_and_ejects_nothing() -> R {
    let b = RawBackend::start().await?;
    let node = Node::builder("early413buf")
        .config("[node]\nrequest_buffer_bytes = 8388608\n")
        .backend_spec(&b.addr.to_string())
        .start()
        .await?;
    early_413_cases(&node, &b, true).await
}

/// `buffered`: the node read the whole body before the backend answered, so the client's
/// connection can carry another request; otherwise it must close (the body is left unread).
async fn early_413_cases(node: &Node, b: &RawBackend, buffered: bool) -> R {
    let big = 6 << 20;
    for (target, what) in [
        ("/early-413?hold_ms=2500", "backend answers 413 and stops reading"),
        ("/early-413", "backend answers 413 and closes at once"),
    ] {
        let started = Instant::now();
        let head = format!("POST {target} HTTP/1.1\r\nHost: raw\r\nContent-Length: {big}\r\n\r\n");
        let r = answer_while_sending(node.proxy, &head, big, what).await?;
        assert_eq!(
            (r.status, r.head.line[2].as_str(), r.text().as_str()),
            (413, "Payload Too Large", "413 request body too large\n"),
            "{what}: the backend's answer, not the proxy's: {r:?}"
        );
        assert_eq!(r.header("x-kind"), Some("early"), "{what}: {r:?}");
        assert_eq!(r.says_close(), !buffered, "{what}: {r:?}");
        assert!(started.elapsed() < Duration::from_secs(6), "{what}: answered and closed in {:?}", started.elapsed());
        let seen = b.last(target)?;
        assert_eq!(seen.head.header("content-length"), Some(&*big.to_string()), "{what}: {seen:?}");
        expect_not_blamed(node, b.addr, what).await?;
        let mut c = Wire::connect(node.proxy, "next client").await?;
        get_default(&mut c, "/after-413", &format!("{what}: a new connection")).await?;
    }
    Ok(())
}

/// `read_timeout` bounds the backend, not the client: a client that pauses longer than it in
/// the middle of its body gets the answer, and the backend is not blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_body_is_not_a_backend_timeout() -> R {
    let b = RawBackend::start().await?;
    let node = Node::builder("slowbody")
        .config("[upstream]\nread_timeout = \"1s\"\n")
        .backend_spec(&b.addr.to_string())
        .start()
        .await?;
    let body = pattern(100);
    let mut c = Wire::connect(node.proxy, "slow client").await?;
    let started = Instant::now();
    c.send(b"POST /slow-body HTTP/1.1\r\nHost: raw\r\nContent-Length: 100\r\n\r\n").await?;
    c.send(&body[..10]).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.send(&body[10..]).await?;
    let r = c.read_final("POST").await.context("answer to the slow body")?;
    assert_eq!((r.status, r.text().as_str()), (200, "POST /slow-body 100"), "{r:?}");
    assert!(!r.says_close(), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "answered in {:?}", started.elapsed());
    same_bytes(&b.last("/slow-body")?.body, &body, "the body the backend saw")?;
    expect_not_blamed(&node, b.addr, "after a slow client body").await?;
    get_default(&mut c, "/after-slow-body", "after a slow client body").await?;
    let mut c = Wire::connect(node.proxy, "next client").await?;
    get_default(&mut c, "/after-slow-body-2", "a new connection after a slow client body").await?;
    Ok(())
}

/// A single backend that closes kept-alive connections: a request that finds its pooled
/// connection closed goes to the same backend on a new one; it is never a 502, and never
/// blames the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keep_alive_connections_to_a_single_backend() -> R {
    let (node, b) = raw_setup("stale").await?;

    // Closed right after each answer: five requests on one client connection, five on new ones.
    let mut c = Wire::connect(node.proxy, "client").await?;
    for i in 0..5 {
        get_default(&mut c, &format!("/ka-close?i={i}"), "backend closing after each answer").await?;
    }
    for i in 5..10 {
        let mut c = Wire::connect(node.proxy, &format!("client {i}")).await?;
        get_default(&mut c, &format!("/ka-close?i={i}"), "backend closing after each answer").await?;
    }
    expect_not_blamed(&node, b.addr, "after 10 answers on connections closed at once").await?;

    // Closed as the next request arrives (the keep-alive race, every time).
    let mut c = Wire::connect(node.proxy, "client").await?;
    for i in 0..10 {
        get_default(&mut c, &format!("/ka-stale?i={i}"), "backend closing as the next request comes").await?;
    }
    let hangups = b.hangups.load(SeqCst);
    eprintln!("the backend hung up on {hangups} requests");
    assert_eq!(hangups, 9, "requests 2 to 10 each find their pooled connection closed");
    expect_not_blamed(&node, b.addr, "after 10 requests on stale connections").await?;

    // A bodyless POST on a stale connection: not replayed, so 200 or 502, but no blame.
    get_default(&mut c, "/ka-stale?before-post", "before the POST").await?;
    let before = b.hangups.load(SeqCst);
    c.send(b"POST /post-stale HTTP/1.1\r\nHost: raw\r\nContent-Length: 0\r\n\r\n").await?;
    let r = c.read_final("POST").await.context("bodyless POST on a stale connection")?;
    eprintln!("bodyless POST on a stale connection: {} (hang-ups {before} -> {})", r.status, b.hangups.load(SeqCst));
    assert!(matches!(r.status, 200 | 502), "{r:?}");
    assert_eq!(b.hangups.load(SeqCst), before + 1, "the POST found its pooled connection closed");
    expect_not_blamed(&node, b.addr, "after a bodyless POST on a stale connection").await?;
    for i in 0..3 {
        let mut c = Wire::connect(node.proxy, "client after the POST").await?;
        get_default(&mut c, &format!("/ka-stale?after-post={i}"), "after a POST on a stale connection").await?;
    }
    expect_not_blamed(&node, b.addr, "at the end").await?;
    Ok(())
}

/// The same with a POST that has a body: the backend closed the kept-alive connection as the
/// request came, so the body cannot be written (or its end of stream comes first). Not
/// replayed, but no more the backend's fault than for a bodyless POST: the single backend
/// must not be ejected. Two clients: one that writes head and body at once, one that writes
/// its body 300 ms after the head (the proxy then sees the close while it waits for the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keep_alive_post_with_a_body_ejects_nothing() -> R {
    let mut problems = Vec::new();
    for (i, pause) in [Duration::ZERO, Duration::from_millis(300)].into_iter().enumerate() {
        let what = format!("POST with a 256 KiB body {pause:?} after its head, on a stale connection");
        let (node, b) = raw_setup(&format!("stalebody{i}")).await?;
        let body = pattern(256 << 10);
        let mut c = Wire::connect(node.proxy, "client").await?;
        get_default(&mut c, "/ka-stale?before-post", "before the POST").await?;
        let head = format!("POST /post-body-stale HTTP/1.1\r\nHost: raw\r\nContent-Length: {}\r\n\r\n", body.len());
        if pause.is_zero() {
            c.send(&[head.as_bytes(), &body].concat()).await?;
        } else {
            c.send(head.as_bytes()).await?;
            tokio::time::sleep(pause).await;
            // The proxy may have answered and closed already.
            let _ = c.send(&body).await;
        }
        let r = c.read_final("POST").await.with_context(|| format!("{what}: the answer"))?;
        eprintln!("{what}: {} (hang-ups {})", r.status, b.hangups.load(SeqCst));
        assert!(matches!(r.status, 200 | 502), "{what}: {r:?}");
        assert_eq!(b.hangups.load(SeqCst), 1, "{what}: the POST found its pooled connection closed");
        let (state, failures, _) = backend_health(&node, b.addr).await?;
        let mut c = Wire::connect(node.proxy, "client after the POST").await?;
        let after = get_default(&mut c, "/after-post", "a GET on a new connection").await;
        if !(after.is_ok() && (state.as_str(), failures) == ("up", 0)) {
            problems.push(format!(
                "{what}: answered {}, and the backend was blamed: state {state}, failures {failures}; the next \
                 GET: {after:?}",
                r.status
            ));
        }
    }
    assert!(problems.is_empty(), "a stale kept-alive connection blamed the backend:\n{}", problems.join("\n"));
    Ok(())
}

/// `read_timeout` also bounds the wait between two reads of a response body: a backend that
/// stops in the middle of one has the client's connection closed (the body visibly cut), and
/// the request no longer counts in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_response_body_is_cut_off_after_read_timeout() -> R {
    let b = RawBackend::start().await?;
    let node = Node::builder("stall")
        .config("[upstream]\nread_timeout = \"1s\"\n")
        .backend_spec(&b.addr.to_string())
        .start()
        .await?;
    let mut c = Wire::connect(node.proxy, "client").await?;
    c.timeout = Duration::from_secs(6);
    let started = Instant::now();
    c.send(b"GET /stall HTTP/1.1\r\nHost: raw\r\n\r\n").await?;
    let head = c.read_head().await?.context("no response head")?;
    assert_eq!((head.status()?, head.header("content-length")), (200, Some("10")), "{head:?}");
    while c.buf.len() < 5 {
        ensure!(c.fill().await? > 0, "closed before the first 5 body bytes");
    }
    let (_, _, in_flight) = backend_health(&node, b.addr).await?;
    assert_eq!(in_flight, 1, "the stalled request is in flight");

    let cut = c.read_exact(10).await;
    let elapsed = started.elapsed();
    let got = lossy(&c.buf);
    match cut {
        Ok(body) => panic!("the client got 10 body bytes from a backend that sent 5: {:?}", lossy(&body)),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(!e.contains("no bytes within the timeout"), "the connection was not closed after {elapsed:?}: {e}");
            assert_eq!(got, "01234", "the 5 bytes sent, then the close: {e}");
        }
    }
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_secs(5),
        "closed {elapsed:?} after the request (read_timeout 1 s)"
    );
    let mut in_flight = u64::MAX;
    for _ in 0..40 {
        in_flight = backend_health(&node, b.addr).await?.2;
        if in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_flight, 0, "the cut-off request still counts in flight: {}", node.backend_status(b.addr).await?);
    Ok(())
}
