//! The one chunked decoder and the one encoder (RFC 9112 §7.1). The decoder is a state machine
//! over a read buffer: each [`decode`] step consumes what it can and says what it produced.
//! Extensions and trailers are read and dropped (nginx does the same); what is forwarded is
//! re-encoded canonically, so no oddity of the sender's framing reaches the receiver.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line (with extensions) or trailer line.
pub const MAX_LINE: usize = 4096;
/// Most trailer bytes after the last chunk (the size of a large request head).
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Longest chunk size in hex digits: 15 cannot overflow a u64.
const MAX_SIZE_DIGITS: usize = 15;

/// The terminating chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Where the decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data: expecting CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; trailer bytes so far.
    Trailers(usize),
}

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// Progress without data (a size line, a CRLF, a trailer line).
    Advanced,
    /// The body ended; the buffer now starts after it.
    End,
    /// The buffer holds no complete next element.
    NeedMore,
}

/// Chunked framing that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked encoding: {0}")]
pub struct ChunkError(pub &'static str);

/// One decoding step over `buf`.
pub fn decode(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, ChunkError> {
    match *state {
        Chunk::Size => {
            let Some(eol) = find_crlf(buf, MAX_LINE)? else { return Ok(Step::NeedMore) };
            let size = chunk_size(&buf[..eol])?;
            buf.advance(eol + 2);
            *state = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
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
                return Err(ChunkError("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            *state = Chunk::Size;
            Ok(Step::Advanced)
        }
        Chunk::Trailers(seen) => {
            let Some(eol) = find_crlf(buf, MAX_LINE)? else { return Ok(Step::NeedMore) };
            if seen + eol > MAX_TRAILERS {
                return Err(ChunkError("trailers too large"));
            }
            if buf[..eol].iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(ChunkError("bare CR, LF or NUL in a trailer line"));
            }
            buf.advance(eol + 2);
            *state = Chunk::Trailers(seen + eol + 2);
            Ok(if eol == 0 { Step::End } else { Step::Advanced })
        }
    }
}

/// The size of a chunk-size line: 1*HEXDIG right at its start, then only whitespace before an
/// extension (`;...`, whose bytes may not be CR, LF or NUL) or the line's end.
fn chunk_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkError("chunk size is not hexadecimal"));
    }
    if digits > MAX_SIZE_DIGITS {
        return Err(ChunkError("chunk size too large"));
    }
    let rest = &line[digits..];
    let after_ws = rest.iter().position(|&b| b != b' ' && b != b'\t').map_or(&[][..], |i| &rest[i..]);
    match after_ws.first() {
        None if rest.is_empty() => {}
        // Whitespace may only come before an extension (BWS ";").
        None => return Err(ChunkError("whitespace after the chunk size")),
        Some(b';') if !after_ws.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) => {}
        Some(_) => return Err(ChunkError("junk after the chunk size")),
    }
    Ok(line[..digits].iter().fold(0u64, |n, &b| n * 16 + u64::from((b as char).to_digit(16).unwrap_or(0))))
}

/// Position of the first CRLF, if within `max` bytes; a bare LF before it is refused.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, ChunkError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(0) => Err(ChunkError("bare LF")),
        Some(lf) if buf[lf - 1] != b'\r' => Err(ChunkError("bare LF")),
        Some(lf) if lf - 1 > max => Err(ChunkError("line too long")),
        Some(lf) => Ok(Some(lf - 1)),
        None if buf.len() > max => Err(ChunkError("line too long")),
        None => Ok(None),
    }
}

/// Appends the size line of a chunk of `len` bytes (`len > 0`).
pub fn encode_size(len: usize, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// What follows a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// Appends one whole chunk (size line, data, CRLF); nothing for empty data, which would end
/// the body.
pub fn encode(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    encode_size(data.len(), out);
    out.extend_from_slice(data);
    out.extend_from_slice(CHUNK_END);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body and what is left after it.
    type Decoded = (Vec<u8>, Vec<u8>);

    /// Decodes all of `raw`.
    fn decode_all(raw: &[u8]) -> Result<Option<Decoded>, ChunkError> {
        let mut buf = BytesMut::from(raw);
        let mut state = Chunk::Size;
        let mut body = Vec::new();
        loop {
            match decode(&mut state, &mut buf)? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::Advanced => {}
                Step::End => return Ok(Some((body, buf.to_vec()))),
                Step::NeedMore => return Ok(None),
            }
        }
    }

    #[test]
    fn decodes_and_drops_extensions_and_trailers() {
        let (body, rest) =
            decode_all(b"5;ext=1\r\nhello\r\n6 ; e\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT").unwrap().unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn refuses_loose_framing() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"5x\r\n",
            b"5\nhello\r\n",
            b"ffffffffffffffffff\r\n",
            b"5;a\rb\r\nhello\r\n",
            b"0\r\nx: 1\nx\r\n\r\n",
        ] {
            assert!(decode_all(bad).is_err(), "{bad:?} must be refused");
        }
        let long_trailers = [b"0\r\n".to_vec(), b"x: 1\r\n".repeat(4000)].concat();
        assert!(decode_all(&long_trailers).is_err());
    }

    #[test]
    fn encodes_canonically() {
        let mut out = Vec::new();
        encode(b"hello", &mut out);
        encode(b"", &mut out);
        encode(&[b'x'; 300], &mut out);
        assert!(out.starts_with(b"5\r\nhello\r\n12c\r\nxxx"));
        let mut out = Vec::new();
        encode_size(0x1000, &mut out);
        assert_eq!(out, b"1000\r\n");
    }
}
