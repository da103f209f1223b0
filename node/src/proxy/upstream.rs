//! The exchange with a backend over one HTTP/1.1 connection, on the request's own task: write
//! the request head and its body (whole, or streamed and chunk-encoded), read the response head
//! (within one deadline, however many `1xx` come first), and decode the response body straight
//! from the connection's read buffer. No connection task and no channels sit between a request
//! and its backend; a connection whose response ended cleanly goes back to its backend's idle
//! queue. The HTTP/1.1 rules themselves are `http1`'s.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::deadline::within;
use crate::buffers::UPSTREAM_SIZE;
use crate::http1::chunked::{self, Chunk, ChunkError, Step};
use crate::http1::response::{self, Framing, Invalid, ResponseHead};
use crate::pool::InFlight;
use crate::pool::conn::{Upstream, UpstreamStream};

/// Why an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// No complete request reached the backend: writing the head failed (part of it may
    /// have gone, which no backend acts on). Safe to send elsewhere.
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
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("reading the request body: {0}")]
    ClientBody(String),
    #[error("backend did not answer or read within the timeout")]
    Timeout,
}

/// A request body that arrives while it is sent (a client's body too large to buffer).
pub trait BodySource {
    /// The next piece of the body, `None` at its end; an error is the client's fault.
    fn next(&mut self) -> impl Future<Output = Option<Result<Bytes, String>>> + Send;
}

/// The body of a request on its way upstream.
pub enum RequestBody<S> {
    None,
    /// Read whole from the client before the backend was picked: it can be sent again.
    Buffered(Bytes),
    /// Sent as it arrives (chunk-encoded when `chunked`); it can be sent once.
    Stream(S),
}

/// Writes `data` to the backend within `timeout` (nginx's `proxy_send_timeout`).
async fn write_upstream<W: AsyncWrite + Unpin>(
    up: &mut W,
    data: &[u8],
    timeout: Duration,
) -> Result<(), ExchangeError> {
    // Flushed: TLS keeps records it could not send yet (a plain socket's flush does nothing).
    let write = async {
        up.write_all(data).await?;
        up.flush().await
    };
    match within(timeout, write).await {
        Ok(r) => r.map_err(ExchangeError::Io),
        Err(_) => Err(ExchangeError::Timeout),
    }
}

/// Streams a body to the backend, chunk-encoded when `chunked`.
async fn send_stream<W: AsyncWrite + Unpin, S: BodySource>(
    up: &mut W,
    body: &mut S,
    chunked: bool,
    timeout: Duration,
) -> Result<(), ExchangeError> {
    let mut framed = Vec::new();
    while let Some(piece) = body.next().await {
        let data = piece.map_err(ExchangeError::ClientBody)?;
        if data.is_empty() {
            continue;
        }
        if !chunked {
            write_upstream(up, &data, timeout).await?;
            continue;
        }
        framed.clear();
        chunked::encode_size(data.len(), &mut framed);
        // Size line, data and CRLF in one vectored write, without copying the data.
        let mut chunk = bytes::Buf::chain(bytes::Buf::chain(&framed[..], &data[..]), chunked::CHUNK_END);
        match within(timeout, up.write_all_buf(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Err(ExchangeError::Timeout),
        }
    }
    if chunked {
        write_upstream(up, chunked::LAST_CHUNK, timeout).await?;
    }
    Ok(())
}

/// Sends the request (`head`, then the body) and reads the response head, skipping interim
/// 1xx responses other than 101. A streamed body is sent while watching for an early answer
/// (a 413 or 401 before the body is read): that answer is returned, the rest of the body is
/// not sent, and the connection is not reused. Each write is bounded by `timeout`, and so is
/// the whole wait for the final head once the request is sent (1xx responses do not re-arm it).
pub async fn exchange<S: BodySource>(
    conn: &mut Upstream,
    head: &[u8],
    body: &mut RequestBody<S>,
    chunked: bool,
    head_request: bool,
    timeout: Duration,
) -> Result<ResponseHead, ExchangeError> {
    let may_be_stale = conn.reused;
    match body {
        RequestBody::None => send_head(&mut conn.stream, head, timeout).await?,
        RequestBody::Buffered(data) => {
            // Head and body in one vectored write; nothing written counts as unsent.
            let mut out = bytes::Buf::chain(head, &data[..]);
            let total = head.len() + data.len();
            let stream = &mut conn.stream;
            let write = within(timeout, async {
                stream.write_all_buf(&mut out).await?;
                stream.flush().await
            });
            let e = match write.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) if bytes::Buf::remaining(&out) == total => return Err(ExchangeError::Unsent(e)),
                Ok(Err(e)) => Some(e),
                Err(_) => return Err(ExchangeError::Timeout),
            };
            if let Some(e) = e {
                let Upstream { stream, read_buf, .. } = conn;
                return answer_after_write_error(stream, read_buf, head_request, may_be_stale, timeout, e).await;
            }
        }
        RequestBody::Stream(source) => {
            send_head(&mut conn.stream, head, timeout).await?;
            let Upstream { stream, read_buf, .. } = conn;
            let (mut rd, mut wr) = tokio::io::split(stream);
            let send = send_stream(&mut wr, source, chunked, timeout);
            tokio::pin!(send);
            loop {
                tokio::select! {
                    sent = &mut send => match sent {
                        Ok(()) => break,
                        Err(ExchangeError::Io(e)) => {
                            return answer_after_write_error(&mut rd, read_buf, head_request, may_be_stale, timeout, e)
                                .await;
                        }
                        Err(e) => return Err(e),
                    },
                    early = read_head(&mut rd, read_buf, head_request, may_be_stale) => {
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
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = true;
    loop {
        let read = read_head(&mut conn.stream, &mut conn.read_buf, head_request, may_be_stale && first);
        let head = match tokio::time::timeout_at(deadline, read).await {
            Ok(head) => head?,
            Err(_) => return Err(ExchangeError::Timeout),
        };
        first = false;
        if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        if conn.read_buf.is_empty() && !matches!(head.framing, Framing::Empty) {
            ack_now(conn.stream.tcp());
        }
        return Ok(head);
    }
}

/// The head came alone and the body is still to come: acknowledge now rather than after the
/// kernel's delayed-ACK timer (up to 40 ms). A backend that writes the head and the body
/// separately with Nagle on (Python's http.server and many others) holds the body back until
/// its head is acknowledged, and this socket, which just sent a request, delays that ACK: the
/// pair costs tens of milliseconds a response. TCP_QUICKACK sends the pending ACK at once and
/// keeps acknowledging promptly until this socket sends again. A backend that writes head and
/// body together leaves body bytes in the buffer and never costs the extra system call.
fn ack_now(tcp: &tokio::net::TcpStream) {
    let _ = rustix::net::sockopt::set_tcp_quickack(tcp, true);
}

/// Writes a request head alone (flushed) within `timeout`; a failed write counts as unsent
/// (no complete request reached the backend).
async fn send_head(stream: &mut UpstreamStream, head: &[u8], timeout: Duration) -> Result<(), ExchangeError> {
    let write = async {
        stream.write_all(head).await.map_err(ExchangeError::Unsent)?;
        stream.flush().await.map_err(ExchangeError::Io)
    };
    within(timeout, write).await.unwrap_or(Err(ExchangeError::Timeout))
}

/// After writing the body failed: the backend may have answered and closed (a 413 or 401
/// before it read the body), and its answer is what counts; a reused connection that broke
/// before any response byte had been closed by the backend while idle. The connection is not
/// reused after this.
async fn answer_after_write_error<R: AsyncRead + Unpin>(
    reader: &mut R,
    read_buf: &mut BytesMut,
    head_request: bool,
    may_be_stale: bool,
    timeout: Duration,
    e: io::Error,
) -> Result<ResponseHead, ExchangeError> {
    let read = read_head(reader, read_buf, head_request, may_be_stale);
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(mut head)) if !head.status.is_informational() => {
            head.keep_alive = false;
            Ok(head)
        }
        Ok(Err(ExchangeError::Stale)) => Err(ExchangeError::Stale),
        _ if may_be_stale && read_buf.is_empty() => Err(ExchangeError::Stale),
        _ => Err(ExchangeError::Io(e)),
    }
}

/// Reads into `buf`; `Ok(0)` is end of stream.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(UPSTREAM_SIZE);
    }
    reader.read_buf(buf).await
}

/// Reads a response head into `buf` and takes it off. Cancel-safe: bytes read stay in `buf`.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
    may_be_stale: bool,
) -> Result<ResponseHead, ExchangeError> {
    loop {
        if !buf.is_empty()
            && let Some(head) = response::parse(buf, head_request)?
        {
            return Ok(head);
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
    #[error(transparent)]
    BadChunk(#[from] ChunkError),
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
            conn.read_buf.reserve(UPSTREAM_SIZE);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.read_buf) {
            Poll::Ready(result) => {
                *armed = false;
                Poll::Ready(result)
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

    /// The connection after a `101 Switching Protocols`: the stream, the bytes already read past
    /// the head (they belong to the new protocol) and the request's in-flight guard.
    pub fn into_tunnel(mut self) -> Option<(UpstreamStream, Bytes, InFlight)> {
        let conn = self.conn.take()?;
        let in_flight = self.in_flight.take()?;
        Some((conn.stream, conn.read_buf.freeze(), in_flight))
    }
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
                    let conn = this.conn.as_mut().expect("a body that is not done owns its connection");
                    if !conn.read_buf.is_empty() {
                        let n = (conn.read_buf.len() as u64).min(left) as usize;
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
                    let step = chunked::decode(&mut state, &mut conn.read_buf);
                    this.decode = Decode::Chunked(state);
                    match step {
                        Err(e) => return this.fail(e.into()),
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
