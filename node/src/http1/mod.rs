//! # HTTP/1.1, pure
//!
//! Every HTTP/1.1 rule the proxy applies, in one place and with no I/O: no tokio, no sockets,
//! no `crate::` imports, so it can be tested exhaustively (the property tests below).
//!
//! - [`request`]: parse and validate a client's request head -> [`request::Request`] or a
//!   [`request::Refusal`] (400, 431, 501).
//! - [`rewrite`]: the field rules both client protocols share ([`rewrite::inspect`]) and the
//!   one writer of the head that goes upstream ([`rewrite::write_head`],
//!   [`rewrite::finish_head`]). The HTTP/2 side feeds its fields through the same two.
//! - [`response`]: a backend's response head, its framing, and the head that goes on to the
//!   client.
//! - [`chunked`]: the one chunked decoder and the one encoder.
//! - [`fields`]: the one hop-by-hop list, `Connection` tokens, `Content-Length`, cookies.
//!
//! What goes upstream and back is canonical: one `content-length: N` in ASCII digits or one
//! `transfer-encoding: chunked` (chunked once and last towards clients), never both; bodies are
//! re-framed by the proxy, so no oddity of one side's framing reaches the other.

pub mod chunked;
pub mod fields;
pub mod request;
pub mod response;
pub mod rewrite;

#[cfg(test)]
mod properties;
