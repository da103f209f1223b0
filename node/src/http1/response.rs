//! A backend's response head: [`parse`] reads it (httparse) and describes how its body is
//! framed (RFC 9112 §6.3), refusing framing that a client could read differently; the head then
//! goes on to the client as its own header lines minus the hop-by-hop ones, with one canonical
//! framing field written by the proxy ([`ResponseHead::write_h1`], [`ResponseHead::header_map`]).

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::fields;
use super::rewrite::{push_decimal, push_field};

/// Largest response head accepted from a backend.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a response head.
pub const MAX_HEADERS: usize = 100;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// How a response body goes on to an HTTP/1.x client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// No body, or one whose length the head announced: bytes as they are.
    AsIs,
    /// Chunk-encoded by the proxy (the backend chunked it, or gave no length).
    Chunk,
    /// Until the proxy closes the connection (HTTP/1.0 client, no length).
    Close,
}

/// A response head that cannot be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid response head: {0}")]
pub struct Invalid(pub &'static str);

/// A parsed response head, ready to go to the client.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    /// The head as the backend sent it (status line and header lines).
    raw: Bytes,
    pub framing: Framing,
    /// Whether the connection may carry another request once the body is read.
    pub keep_alive: bool,
    /// The Content-Length the backend sent, when it frames the body or describes what GET
    /// would send (HEAD, 304).
    length: Option<u64>,
    /// Connection named other fields, which are hop-by-hop too.
    named_in_connection: bool,
    /// Transfer codings other than chunked (e.g. `gzip`), to pass on in order; only an
    /// HTTP/1.1 client can receive them.
    codings: Option<Vec<u8>>,
}

/// Reads a response head at the start of `buf` and takes it off: `Ok(None)` when it is not
/// complete yet. `head_request`: the response to a HEAD has no body whatever it says.
pub fn parse(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, Invalid> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(Invalid("response head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Invalid("too many headers")),
        Err(_) => return Err(Invalid("malformed status line or header")),
    };
    let mut head = describe(&resp, head_request)?;
    head.raw = buf.split_to(len).freeze();
    Ok(Some(head))
}

/// Reads status and body framing from a parsed head (RFC 9112 §6.3); the caller sets `raw`.
fn describe(resp: &httparse::Response<'_, '_>, head_request: bool) -> Result<ResponseHead, Invalid> {
    let code = resp.code.ok_or(Invalid("no status code"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Invalid("status code out of range"))?;
    let http11 = resp.version == Some(1);

    let mut keep_alive = http11;
    let mut close = false;
    let mut chunked = false;
    let mut te = false;
    let mut length: Option<u64> = None;
    let mut named_in_connection = false;
    let mut codings: Option<Vec<u8>> = None;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in fields::tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !token.eq_ignore_ascii_case(b"upgrade") {
                    named_in_connection = true;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for coding in fields::tokens(h.value) {
                te = true;
                if !fields::is_token(coding) {
                    return Err(Invalid("transfer coding is not a token"));
                }
                // Chunked must be applied once and last (RFC 9112 §6.1, §7): anything else
                // would reach the client chunked twice or framed differently.
                if chunked {
                    return Err(Invalid("chunked is not the last transfer coding, or appears twice"));
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    let list = codings.get_or_insert_with(Vec::new);
                    if !list.is_empty() {
                        list.extend_from_slice(b", ");
                    }
                    list.extend_from_slice(coding);
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(fields::content_length(length, h.value).map_err(Invalid)?);
        }
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
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
    // With Transfer-Encoding the length is not the body's (dropped); 1xx and 204 have none.
    let length = length.filter(|_| !te && !status.is_informational() && status != StatusCode::NO_CONTENT);
    Ok(ResponseHead { status, raw: Bytes::new(), framing, keep_alive, length, named_in_connection, codings })
}

impl ResponseHead {
    pub fn is_upgrade(&self) -> bool {
        self.status == StatusCode::SWITCHING_PROTOCOLS
    }

    /// Calls `f` with every field that goes on to the client: all but the hop-by-hop ones, and
    /// but Content-Length (written canonically by the proxy). For a 101, `Upgrade` and
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
                && !fields::is_pinned(name)
                && resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                    .any(|h| fields::has_token(h.value, name))
        };
        for h in resp.headers.iter() {
            if fields::is_hop_by_hop(h.name, upgrade) || h.name.eq_ignore_ascii_case("content-length") || named(h.name)
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

    /// The client-bound fields as a map (for the HTTP/2 side), with the length if known.
    pub fn header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.for_each_field(|name, value| {
            if let (Ok(n), Ok(v)) =
                (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_maybe_shared(self.raw.slice_ref(value)))
            {
                headers.append(n, v);
            }
        });
        if let Some(n) = self.length {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        headers
    }

    /// Writes the head for an HTTP/1.x client into `out` (cleared first) and says how the body
    /// follows it. `close`: the proxy closes the connection after this response.
    pub fn write_h1(
        &self,
        out: &mut Vec<u8>,
        set_cookie: Option<&[u8]>,
        http11_client: bool,
        head_request: bool,
        close: bool,
    ) -> ClientFraming {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.reason());
        out.extend_from_slice(b"\r\n");
        self.for_each_field(|name, value| push_field(out, name.as_bytes(), value));
        if let Some(cookie) = set_cookie {
            push_field(out, b"set-cookie", cookie);
        }
        if self.is_upgrade() {
            out.extend_from_slice(b"\r\n");
            return ClientFraming::AsIs;
        }
        if let Some(n) = self.length {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        let unframed = !head_request && matches!(self.framing, Framing::Chunked | Framing::UntilClose);
        let framing = match (unframed, http11_client) {
            (false, _) => ClientFraming::AsIs,
            (true, true) => {
                out.extend_from_slice(b"transfer-encoding: ");
                if let Some(codings) = &self.codings {
                    out.extend_from_slice(codings);
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(b"chunked\r\n");
                ClientFraming::Chunk
            }
            (true, false) => ClientFraming::Close,
        };
        if close || framing == ClientFraming::Close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        framing
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8], head_request: bool) -> Result<ResponseHead, Invalid> {
        let mut buf = BytesMut::from(raw);
        parse(&mut buf, head_request).map(|h| h.expect("complete"))
    }

    fn for_client(raw: &[u8]) -> String {
        let mut out = Vec::new();
        head(raw, false).unwrap().write_h1(&mut out, None, true, false, false);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.header_map().contains_key(http::header::CONTENT_LENGTH), "TE wins and CL is dropped");
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.header_map()[http::header::CONTENT_LENGTH], "5", "HEAD keeps the length GET would send");
        assert_eq!(head(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap().framing, Framing::Empty);
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        assert!(!head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false).unwrap().keep_alive);
        assert!(
            !head(b"HTTP/1.1 200 OK\r\nConnection: close, keep-alive\r\ncontent-length: 1\r\n\r\n", false)
                .unwrap()
                .keep_alive
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\xc2\xa0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        ] {
            assert!(head(bad, false).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.codings()), (Framing::Chunked, Some(&b"gzip"[..])));
        let h = head(b"HTTP/1.1 200 OK\nContent-Length: 5\n\n", false).unwrap();
        assert_eq!(h.reason(), b"OK", "a bare-LF head's reason stops at the line's end");
    }

    #[test]
    fn what_goes_to_the_client_is_canonical() {
        assert_eq!(
            for_client(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nx-hop: 1\r\nx-end: 2\r\nContent-Length:  2 \r\n\r\n"
            ),
            "HTTP/1.1 200 OK\r\nx-end: 2\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(
            for_client(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        );
        assert_eq!(
            for_client(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\ncontent-length: 1\r\n\r\n"),
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n",
            "Connection cannot drop the length"
        );
        let up = for_client(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(up, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    }
}
