//! The HTTP/1.1 client side of the proxy, run on the request's own task: write the request
//! head (and stream its body), read and parse the response head (httparse), and decode the
//! response body (`Content-Length`, chunked, or until close) straight from the connection's
//! read buffer. No connection task and no channels sit between a request and its backend;
//! a connection whose response ended cleanly goes back to its backend's idle queue.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::body::InFlight;
use crate::pool::conn::{READ_BUF, Upstream};

/// Largest response head accepted from a backend.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a response head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Nothing reached the backend: writing the head failed. Safe to send elsewhere.
    #[error("request not sent: {0}")]
    Unsent(io::Error),
    /// A reused keep-alive connection closed before any byte of a response: the backend most
    /// likely closed it while idle, but it may have seen the request.
    #[error("kept-alive connection closed before a response")]
    Stale,
    #[error("connection closed before a complete response head")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid response head: {0}")]
    Invalid(&'static str),
    #[error("reading the request body: {0}")]
    ClientBody(String),
    #[error("backend did not answer or read within the timeout")]
    Timeout,
}

/// Writes the request head for `parts` into `out`: request line, the headers as they are after
/// rewriting (minus `Expect`, which the client side answers), and chunked framing when the
/// body has no length.
pub fn write_head(out: &mut Vec<u8>, parts: &Parts, has_body: bool) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    for (name, value) in &parts.headers {
        if name == header::EXPECT {
            continue;
        }
        has_length |= name == header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if has_body && !has_length {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head, ready to go to the client.
pub struct ResponseHead {
    pub status: StatusCode,
    /// The head as the backend sent it (status line and header lines).
    raw: Bytes,
    framing: Framing,
    /// Whether the connection may carry another request once the body is read.
    keep_alive: bool,
    /// The body is framed by Transfer-Encoding (so Content-Length is not forwarded).
    te: bool,
    /// Connection named other headers, which are hop-by-hop too.
    named_in_connection: bool,
    /// Transfer codings other than chunked (e.g. `gzip`), to pass on in order; only an
    /// HTTP/1.1 client can receive them.
    codings: Option<Vec<u8>>,
}

/// The request body to send upstream, from whichever client side the request came.
pub enum RequestBody<'a> {
    /// An HTTP/2 client's body, through hyper.
    Hyper(Incoming),
    /// An HTTP/1.1 client's body, read from its connection.
    H1(super::h1::ClientBody<'a>),
}

impl RequestBody<'_> {
    async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        up: &mut W,
        chunked: bool,
        timeout: Duration,
    ) -> Result<(), ExchangeError> {
        match self {
            RequestBody::Hyper(body) => send_body(up, body, chunked, timeout).await,
            RequestBody::H1(body) => body.send(up, chunked, timeout).await,
        }
    }
}

/// Writes `data` to the backend within `timeout` (nginx's `proxy_send_timeout`).
pub async fn write_upstream<W: AsyncWrite + Unpin>(
    up: &mut W,
    data: &[u8],
    timeout: Duration,
) -> Result<(), ExchangeError> {
    match tokio::time::timeout(timeout, up.write_all(data)).await {
        Ok(r) => r.map_err(ExchangeError::Io),
        Err(_) => Err(ExchangeError::Timeout),
    }
}

/// Writes one chunk of a chunk-encoded body (small ones in one write).
pub async fn write_chunk<W: AsyncWrite + Unpin>(
    up: &mut W,
    data: &[u8],
    timeout: Duration,
) -> Result<(), ExchangeError> {
    if data.is_empty() {
        return Ok(());
    }
    let mut framed = Vec::with_capacity(data.len().min(16 * 1024) + 24);
    framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    if data.len() <= 16 * 1024 {
        framed.extend_from_slice(data);
        framed.extend_from_slice(b"\r\n");
        return write_upstream(up, &framed, timeout).await;
    }
    write_upstream(up, &framed, timeout).await?;
    write_upstream(up, data, timeout).await?;
    write_upstream(up, b"\r\n", timeout).await
}

/// Sends the request (`head`, then `body` if any) and reads the response head, skipping
/// interim 1xx responses other than 101. The body is sent while watching for an early answer
/// (a 413 or 401 before the body is read): that answer is returned, the rest of the body is
/// not sent, and the connection is not reused. Writes and the wait for the head after the
/// request was sent are each bounded by `timeout`.
pub async fn exchange(
    conn: &mut Upstream,
    head: &[u8],
    body: Option<&mut RequestBody<'_>>,
    chunked: bool,
    method: &Method,
    timeout: Duration,
) -> Result<ResponseHead, ExchangeError> {
    // A head fits the socket buffer of an idle connection: no timer needed.
    conn.stream.write_all(head).await.map_err(ExchangeError::Unsent)?;
    let may_be_stale = conn.reused;
    if let Some(body) = body {
        let Upstream { stream, read_buf, .. } = conn;
        let (mut rd, mut wr) = stream.split();
        let send = body.send(&mut wr, chunked, timeout);
        tokio::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => match sent {
                    Ok(()) => break,
                    // The backend may have answered and closed: its answer is what counts.
                    Err(ExchangeError::Io(e)) => {
                        let read = read_head(&mut rd, read_buf, method, may_be_stale);
                        return match tokio::time::timeout(timeout, read).await {
                            Ok(Ok(mut head)) if !head.status.is_informational() => {
                                head.keep_alive = false;
                                Ok(head)
                            }
                            // A reused connection that broke before any response byte: the
                            // backend had closed it while idle.
                            Ok(Err(ExchangeError::Stale)) => Err(ExchangeError::Stale),
                            _ if may_be_stale && read_buf.is_empty() => Err(ExchangeError::Stale),
                            _ => Err(ExchangeError::Io(e)),
                        };
                    }
                    Err(e) => return Err(e),
                },
                early = read_head(&mut rd, read_buf, method, may_be_stale) => {
                    let mut head = early?;
                    if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                        continue;
                    }
                    head.keep_alive = false;
                    return Ok(head);
                }
            }
        }
    }
    let mut first = true;
    loop {
        let read = read_head(&mut conn.stream, &mut conn.read_buf, method, may_be_stale && first);
        let head = match tokio::time::timeout(timeout, read).await {
            Ok(head) => head?,
            Err(_) => return Err(ExchangeError::Timeout),
        };
        first = false;
        if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        return Ok(head);
    }
}

/// Streams an HTTP/2 client's request body to the backend, chunk-encoded when it has no length.
async fn send_body<W: AsyncWrite + Unpin>(
    up: &mut W,
    body: &mut Incoming,
    chunked: bool,
    timeout: Duration,
) -> Result<(), ExchangeError> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ExchangeError::ClientBody(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        if chunked {
            write_chunk(up, &data, timeout).await?;
        } else if !data.is_empty() {
            write_upstream(up, &data, timeout).await?;
        }
    }
    if chunked {
        write_upstream(up, b"0\r\n\r\n", timeout).await?;
    }
    Ok(())
}

/// Reads into `buf`; `Ok(0)` is end of stream.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_BUF);
    }
    reader.read_buf(buf).await
}

/// Reads a response head into `buf` and takes it off. Cancel-safe: bytes read stay in `buf`.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    method: &Method,
    may_be_stale: bool,
) -> Result<ResponseHead, ExchangeError> {
    loop {
        if !buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let mut head = describe(&resp, method)?;
                    head.raw = buf.split_to(len).freeze();
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                    return Err(ExchangeError::Invalid("response head too large"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => return Err(ExchangeError::Invalid("too many headers")),
                Err(_) => return Err(ExchangeError::Invalid("malformed status line or header")),
            }
        }
        let empty_before = buf.is_empty();
        match fill(reader, buf).await {
            Ok(0) if empty_before && may_be_stale => return Err(ExchangeError::Stale),
            Ok(0) => return Err(ExchangeError::Closed),
            Ok(_) => {}
            Err(e) if empty_before && may_be_stale && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ExchangeError::Stale);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Parses a complete head held in `raw`.
#[cfg(test)]
fn build_head(raw: Bytes, method: &Method) -> Result<ResponseHead, ExchangeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let _ = resp.parse(&raw).map_err(|_| ExchangeError::Invalid("malformed head"))?;
    let mut head = describe(&resp, method)?;
    head.raw = raw;
    Ok(head)
}

/// Reads status and body framing from a parsed head (RFC 9112 §6.3); the caller sets `raw`.
fn describe(resp: &httparse::Response<'_, '_>, method: &Method) -> Result<ResponseHead, ExchangeError> {
    let code = resp.code.ok_or(ExchangeError::Invalid("no status code"))?;
    let status = StatusCode::from_u16(code).map_err(|_| ExchangeError::Invalid("status code out of range"))?;
    let http11 = resp.version == Some(1);

    let mut keep_alive = http11;
    let mut close = false;
    let mut chunked = false;
    let mut other_coding = false;
    let mut length: Option<u64> = None;
    let mut named_in_connection = false;
    let mut codings: Option<Vec<u8>> = None;
    for h in resp.headers.iter() {
        // httparse accepted the name as a token, which every HeaderName is.
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !token.eq_ignore_ascii_case(b"upgrade") && !token.is_empty() {
                    named_in_connection = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|c| !c.is_empty()) {
                // chunked must be the last coding; anything after it is read until close, and
                // a chunked that is not last stays in the list passed on
                if chunked {
                    push_coding(&mut codings, b"chunked");
                }
                chunked = coding.eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    other_coding = true;
                    push_coding(&mut codings, coding);
                }
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            length = Some(super::headers::content_length(length, h.value).map_err(ExchangeError::Invalid)?);
        }
    }
    let te = chunked || other_coding;
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if te {
        if chunked { Framing::Chunked } else { Framing::UntilClose }
    } else if let Some(n) = length {
        if n == 0 { Framing::Empty } else { Framing::Length(n) }
    } else {
        Framing::UntilClose
    };
    // Framing the connection cannot be trusted after (RFC 9112 §6.1, §6.3): close it.
    if framing == Framing::UntilClose || close || (te && (length.is_some() || !http11)) {
        keep_alive = false;
    }
    Ok(ResponseHead { status, raw: Bytes::new(), framing, keep_alive, te, named_in_connection, codings })
}

impl ResponseHead {
    fn is_upgrade(&self) -> bool {
        self.status == StatusCode::SWITCHING_PROTOCOLS
    }

    /// Calls `f` with every header that goes on to the client: all but the hop-by-hop ones (and
    /// Content-Length when Transfer-Encoding framed the body). For a 101, `Upgrade` and
    /// `Connection` stay.
    fn for_each_field(&self, mut f: impl FnMut(&str, &[u8])) {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        // Parsed when it was read: cannot fail now.
        if resp.parse(&self.raw).is_err() {
            return;
        }
        let upgrade = self.is_upgrade();
        let named = |name: &str| {
            self.named_in_connection
                && resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")).any(|h| {
                    h.value
                        .split(|&b| b == b',')
                        .map(<[u8]>::trim_ascii)
                        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
                })
        };
        for h in resp.headers.iter() {
            let content_length = h.name.eq_ignore_ascii_case("content-length");
            if super::headers::is_hop_by_hop(h.name, upgrade)
                || (self.te && content_length)
                // Connection cannot make the body's length hop-by-hop.
                || (self.named_in_connection && !content_length && named(h.name))
            {
                continue;
            }
            f(h.name, h.value);
        }
    }

    /// The reason phrase the backend sent (may be empty).
    pub fn reason(&self) -> &[u8] {
        // "HTTP/1.1 200 OK\r\n" (or a bare LF, which httparse accepts): the reason starts after
        // the second space and ends at the line's end. It never contains CR or LF.
        let line = self.raw.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let reason = line.splitn(3, |&b| b == b' ').nth(2).unwrap_or_default();
        if reason.iter().any(|&b| b == b'\r' || b == b'\n') { b"" } else { reason }
    }

    /// The client-bound headers as a map (for hyper's HTTP/2 side).
    pub fn header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.for_each_field(|name, value| {
            if let (Ok(n), Ok(v)) =
                (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_maybe_shared(self.raw.slice_ref(value)))
            {
                headers.append(n, v);
            }
        });
        if self.is_upgrade() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        headers
    }

    /// Writes the client-bound header lines (HTTP/1.1 side).
    pub fn write_fields(&self, out: &mut Vec<u8>) {
        self.for_each_field(|name, value| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        });
    }

    /// Whether the body is framed by chunked encoding (passed on as such to HTTP/1.1 clients).
    pub fn is_chunked(&self) -> bool {
        self.framing == Framing::Chunked
    }

    /// Whether the body ends only when the backend closes the connection.
    pub fn until_close(&self) -> bool {
        self.framing == Framing::UntilClose
    }

    /// Transfer codings besides chunked the body carries (`gzip, ...`), if any.
    pub fn codings(&self) -> Option<&[u8]> {
        self.codings.as_deref()
    }

    /// Whether the response has a body at all.
    pub fn has_body(&self) -> bool {
        self.framing != Framing::Empty
    }
}

fn push_coding(list: &mut Option<Vec<u8>>, coding: &[u8]) {
    let list = list.get_or_insert_with(Vec::new);
    if !list.is_empty() {
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(coding);
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data: expecting CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

#[derive(Debug, Clone, Copy)]
enum Decode {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// A backend's response body, decoded from the connection as the client side polls it. Owns
/// the connection and the request's in-flight guard until the body ends.
pub struct UpstreamBody {
    conn: Option<Upstream>,
    in_flight: Option<InFlight>,
    decode: Decode,
    keep_alive: bool,
    /// Longest wait for the next bytes of the body (`read_timeout`, like nginx's
    /// `proxy_read_timeout` between two reads).
    timeout: Duration,
    /// The timer for that wait, made on the first wait and re-armed after each read.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

/// A body that broke off or was framed wrongly.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("backend closed the connection in the middle of the body")]
    Truncated,
    #[error("invalid chunked encoding from the backend")]
    BadChunk,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl UpstreamBody {
    pub fn new(head: &ResponseHead, conn: Upstream, in_flight: InFlight, timeout: Duration) -> Self {
        let decode = match head.framing {
            Framing::Empty => Decode::Done,
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => Decode::Chunked(Chunk::Size),
            Framing::UntilClose => Decode::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            in_flight: Some(in_flight),
            decode,
            keep_alive: head.keep_alive,
            timeout,
            waiting: None,
            armed: false,
        };
        // After a 101 the connection belongs to the tunnel (see `into_tunnel`).
        if matches!(body.decode, Decode::Done) && !head.is_upgrade() {
            body.finish();
        }
        body
    }

    /// Reads the whole body now if it is already buffered (the common small response), so the
    /// connection goes back to the idle queue before the client is even answered.
    pub fn take_buffered(&mut self) -> Option<Bytes> {
        let Decode::Length(n) = self.decode else { return None };
        let conn = self.conn.as_mut()?;
        if (conn.read_buf.len() as u64) < n {
            return None;
        }
        let data = conn.read_buf.split_to(n as usize).freeze();
        self.decode = Decode::Done;
        self.finish();
        Some(data)
    }

    /// The body ended: the connection may carry another request unless the backend said
    /// otherwise or sent more than it announced.
    fn finish(&mut self) {
        self.decode = Decode::Done;
        let conn = self.conn.take();
        if let (Some(conn), Some(guard)) = (conn, self.in_flight.take())
            && self.keep_alive
            && conn.read_buf.is_empty()
        {
            guard.backend().idle.put(conn);
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.decode = Decode::Done;
        self.conn = None;
        self.in_flight = None;
        Poll::Ready(Some(Err(e)))
    }

    /// Polls one read into the buffer; `Ready(Ok(0))` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let UpstreamBody { conn, timeout, waiting, armed, .. } = self;
        let conn = conn.as_mut().expect("a body that is not done owns its connection");
        if conn.read_buf.capacity() - conn.read_buf.len() < 1024 {
            conn.read_buf.reserve(READ_BUF);
        }
        let mut buf = ReadBuf::uninit(conn.read_buf.spare_capacity_mut());
        match Pin::new(&mut conn.stream).poll_read(cx, &mut buf) {
            Poll::Ready(result) => {
                result?;
                let n = buf.filled().len();
                // SAFETY: poll_read initialised the first `n` bytes of the spare capacity.
                unsafe { conn.read_buf.set_len(conn.read_buf.len() + n) };
                *armed = false;
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                let sleep = waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(*timeout)));
                if !*armed {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *timeout);
                    *armed = true;
                }
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "backend sent nothing within read_timeout")))
            }
        }
    }
}

/// One step of chunked decoding over `buf`: what it produced, or that it needs more bytes.
pub enum Step {
    Data(Bytes),
    /// Progress without data (a size line, a CRLF, a trailer line).
    Advanced,
    End,
    NeedMore,
}

pub fn chunk_step(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, BodyError> {
    match *state {
        Chunk::Size => {
            let Some(eol) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE { Err(BodyError::BadChunk) } else { Ok(Step::NeedMore) };
            };
            let line = &buf[..eol];
            let hex = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
            if hex.is_empty() || hex.len() > 15 {
                return Err(BodyError::BadChunk);
            }
            let mut size: u64 = 0;
            for &b in hex {
                let d = (b as char).to_digit(16).ok_or(BodyError::BadChunk)?;
                size = size * 16 + d as u64;
            }
            buf.advance(eol + 2);
            *state = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            Ok(Step::Advanced)
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(n).freeze();
            *state = if left == n as u64 { Chunk::DataEnd } else { Chunk::Data(left - n as u64) };
            Ok(Step::Data(data))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(BodyError::BadChunk);
            }
            buf.advance(2);
            *state = Chunk::Size;
            Ok(Step::Advanced)
        }
        Chunk::Trailers => {
            // Trailer fields are dropped (nginx does the same by default).
            let Some(eol) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE { Err(BodyError::BadChunk) } else { Ok(Step::NeedMore) };
            };
            buf.advance(eol + 2);
            Ok(if eol == 0 { Step::End } else { Step::Advanced })
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match this.decode {
                Decode::Done => return Poll::Ready(None),
                Decode::Length(left) => {
                    let buffered = this.conn.as_ref().map_or(0, |c| c.read_buf.len());
                    if buffered > 0 {
                        let conn = this.conn.as_mut().expect("checked above");
                        let n = (buffered as u64).min(left) as usize;
                        let data = conn.read_buf.split_to(n).freeze();
                        if left == n as u64 {
                            this.finish();
                        } else {
                            this.decode = Decode::Length(left - n as u64);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decode::UntilClose => {
                    let conn = this.conn.as_mut().expect("a body that is not done owns its connection");
                    if !conn.read_buf.is_empty() {
                        let data = conn.read_buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decode::Chunked(mut state) => {
                    let conn = this.conn.as_mut().expect("a body that is not done owns its connection");
                    let step = chunk_step(&mut state, &mut conn.read_buf);
                    this.decode = Decode::Chunked(state);
                    match step {
                        Err(e) => return this.fail(e),
                        Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Step::Advanced) => continue,
                        Ok(Step::End) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(Step::NeedMore) => {}
                    }
                }
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) if matches!(this.decode, Decode::UntilClose) => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(BodyError::Truncated),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decode, Decode::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Done => SizeHint::with_exact(0),
            Decode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl UpstreamBody {
    /// The connection after a `101 Switching Protocols`: the stream, the bytes already read past
    /// the head (they belong to the new protocol) and the request's in-flight guard.
    pub fn into_tunnel(mut self) -> Option<(tokio::net::TcpStream, Bytes, InFlight)> {
        let conn = self.conn.take()?;
        let in_flight = self.in_flight.take()?;
        Some((conn.stream, conn.read_buf.freeze(), in_flight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], method: Method) -> Result<ResponseHead, ExchangeError> {
        build_head(Bytes::copy_from_slice(raw), &method)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::GET).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h =
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", Method::GET).unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.header_map().contains_key(header::CONTENT_LENGTH), "TE wins and CL is dropped");
        let h = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD).unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.header_map()[header::CONTENT_LENGTH], "5", "HEAD keeps the length of what GET would send");
        let h = parse(b"HTTP/1.1 204 No Content\r\n\r\n", Method::GET).unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let h = parse(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Method::GET).unwrap();
        assert!(!h.keep_alive);
        let h = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 1\r\n\r\n", Method::GET).unwrap();
        assert!(!h.keep_alive);
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", Method::GET).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", Method::GET).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n", Method::GET).is_err());
        let h = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Method::GET).unwrap();
        assert_eq!((h.framing, h.codings()), (Framing::Chunked, Some(&b"gzip"[..])));
        let h = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", Method::GET).unwrap();
        assert_eq!((h.framing, h.codings()), (Framing::UntilClose, Some(&b"chunked, gzip"[..])));
        let h = parse(b"HTTP/1.1 200 OK\r\nConnection: close, keep-alive\r\ncontent-length: 1\r\n\r\n", Method::GET)
            .unwrap();
        assert!(!h.keep_alive, "close wins");
        let h = parse(b"HTTP/1.1 200 OK\nContent-Length: 5\n\n", Method::GET).unwrap();
        assert_eq!(h.reason(), b"OK", "a bare-LF head's reason stops at the line's end");
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let h = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nx-hop: 1\r\nx-end: 2\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap();
        let map = h.header_map();
        assert_eq!(map.len(), 2, "{map:?}");
        assert_eq!(map["x-end"], "2");
        let mut lines = Vec::new();
        h.write_fields(&mut lines);
        assert_eq!(lines, b"x-end: 2\r\ncontent-length: 0\r\n");
        assert_eq!(h.reason(), b"OK");
        let h = parse(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            Method::GET,
        )
        .unwrap();
        let map = h.header_map();
        assert_eq!(map[header::UPGRADE], "websocket");
        assert_eq!(map[header::CONNECTION], "upgrade");
    }

    #[test]
    fn chunked_decoding() {
        let mut buf = BytesMut::from(&b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT"[..]);
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        loop {
            match chunk_step(&mut state, &mut buf).unwrap() {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Advanced => {}
                Step::End => break,
                Step::NeedMore => panic!("all input was there"),
            }
        }
        assert_eq!(out, b"hello world");
        assert_eq!(&buf[..], b"NEXT");
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"\r\n", b"ffffffffffffffffff\r\n"] {
            let mut buf = BytesMut::from(bad);
            let mut state = Chunk::Size;
            let r = (0..4).try_for_each(|_| chunk_step(&mut state, &mut buf).map(|_| ()));
            assert!(r.is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn request_head() {
        let req = http::Request::builder()
            .method("POST")
            .uri("/a?b=1")
            .header("host", "x")
            .header("expect", "100-continue")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        write_head(&mut out, &parts, true);
        assert_eq!(out, b"POST /a?b=1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
    }
}
