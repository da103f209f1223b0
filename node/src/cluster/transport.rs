//! Authenticated, encrypted gossip transport (PRODUCT.md §5.4), like Serf's keyring.
//!
//! Each datagram on the wire is `SHL1 | nonce (24) | XChaCha20-Poly1305(timestamp_ms (8) |
//! chitchat payload)`, keyed with SHA-256 of the cluster secret. A datagram that does not open
//! with the key, or whose timestamp is more than [`MAX_SKEW_MS`] away, is dropped and counted.
//! Without a secret (loopback only) datagrams are `SHL0 | chitchat payload`: still not
//! authenticated, but stray bytes (a port scan, another protocol) are dropped and counted
//! before they reach chitchat. Dropped datagrams log one warning per [`WARN_EVERY_MS`].
//!
//! chitchat keeps its wire codec private, so the payload is produced and consumed by a real
//! chitchat `UdpSocket` bound on loopback: to send, chitchat encodes into a loopback "capture"
//! socket and the sealed bytes go out on the public socket; to receive, the opened bytes are
//! handed to the codec socket over loopback. Only datagrams between the two private loopback
//! sockets are accepted there. The cost is two loopback syscalls per gossip message (tens per
//! second), which is negligible.
//!
//! SYNs, which open exchanges, go only when the member's [`Pace`] allows (replies always go);
//! everything sent counts against it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as CodecSocket};
use chitchat::{ChitchatEnvelope, ChitchatMessage};
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;

use super::pace::Pace;

const MAGIC: &[u8; 4] = b"SHL1";
/// The unauthenticated framing (no secret configured).
const MAGIC_PLAIN: &[u8; 4] = b"SHL0";
/// At most one warning about dropped datagrams this often (a flood must not flood the log).
pub const WARN_EVERY_MS: u64 = 10_000;
const NONCE_LEN: usize = 24;
/// Datagrams older or newer than this are refused (bounds replays; clocks must roughly agree).
pub const MAX_SKEW_MS: u64 = 60_000;
const MAX_DATAGRAM: usize = 65_507;

/// Gossip traffic counters, shown in `/metrics`.
#[derive(Debug, Default)]
pub struct GossipCounters {
    pub sent_datagrams: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub received_datagrams: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Datagrams dropped: wrong key, forged, truncated, or too old.
    pub rejected: AtomicU64,
    /// When a drop was last logged as a warning (ms since the epoch), and the count then.
    warned_at_ms: AtomicU64,
    warned_count: AtomicU64,
}

impl GossipCounters {
    /// Counts a dropped datagram; warns at most once per [`WARN_EVERY_MS`] with the number
    /// dropped since the last warning.
    pub fn reject(&self, from: SocketAddr, why: &'static str) {
        let total = self.rejected.fetch_add(1, Relaxed) + 1;
        tracing::debug!(from = %from, why, "dropped a gossip datagram");
        let now = now_ms();
        let last = self.warned_at_ms.load(Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self.warned_at_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            let since = total - self.warned_count.swap(total, Relaxed);
            tracing::warn!(last_from = %from, why, dropped = since, "dropped gossip datagrams");
        }
    }
}

/// Derives a 32-byte key for `purpose` from the cluster secret.
pub fn derive_key32(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"shoal/");
    h.update(purpose.as_bytes());
    h.update(b"/");
    h.update(secret);
    h.finalize().into()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Seals a chitchat payload for the wire.
pub fn seal(cipher: &XChaCha20Poly1305, payload: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    nonce.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let mut plain = Vec::with_capacity(8 + payload.len());
    plain.extend_from_slice(&now_ms().to_le_bytes());
    plain.extend_from_slice(payload);
    let sealed = cipher.encrypt(XNonce::from_slice(&nonce), plain.as_slice()).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + NONCE_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens a sealed datagram; `None` if it is not authentic or not fresh.
pub fn open(cipher: &XChaCha20Poly1305, datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.len() < 4 + NONCE_LEN + 16 + 8 || &datagram[..4] != MAGIC {
        return None;
    }
    let nonce = XNonce::from_slice(&datagram[4..4 + NONCE_LEN]);
    let mut plain = cipher.decrypt(nonce, &datagram[4 + NONCE_LEN..]).ok()?;
    let sent = u64::from_le_bytes(plain[..8].try_into().ok()?);
    if now_ms().abs_diff(sent) > MAX_SKEW_MS {
        return None;
    }
    plain.drain(..8);
    Some(plain)
}

/// Frames a payload without a secret.
fn frame_plain(payload: &[u8]) -> Vec<u8> {
    [&MAGIC_PLAIN[..], payload].concat()
}

/// The payload of an unauthenticated datagram; `None` for stray bytes.
fn unframe_plain(datagram: &[u8]) -> Option<Vec<u8>> {
    datagram.strip_prefix(&MAGIC_PLAIN[..]).filter(|p| !p.is_empty()).map(<[u8]>::to_vec)
}

/// The gossip transport; `open` binds the public socket on the gossip address. With a cipher
/// datagrams are sealed; without one only framed.
pub struct SealedTransport {
    pub cipher: Option<XChaCha20Poly1305>,
    pub counters: Arc<GossipCounters>,
    pub pace: Arc<Pace>,
}

impl SealedTransport {
    pub fn new(secret: &[u8], counters: Arc<GossipCounters>, pace: Arc<Pace>) -> Self {
        let key = derive_key32(secret, "gossip");
        SealedTransport { cipher: Some(XChaCha20Poly1305::new((&key).into())), counters, pace }
    }

    /// Without a secret: framed, not sealed.
    pub fn plain(counters: Arc<GossipCounters>, pace: Arc<Pace>) -> Self {
        SealedTransport { cipher: None, counters, pace }
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        use anyhow::Context;
        let public =
            UdpSocket::bind(listen_addr).await.with_context(|| format!("cannot bind gossip on {listen_addr}/udp"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let codec = CodecSocket::open(loopback).await?;
        let capture = UdpSocket::bind(loopback).await?;
        let codec_addr = codec.local_addr()?;
        let capture_addr = capture.local_addr()?;
        Ok(Box::new(SealedSocket {
            public,
            codec,
            codec_addr,
            capture,
            capture_addr,
            cipher: self.cipher.clone(),
            counters: self.counters.clone(),
            pace: self.pace.clone(),
            buf: vec![0u8; MAX_DATAGRAM],
        }))
    }
}

struct SealedSocket {
    public: UdpSocket,
    codec: CodecSocket,
    codec_addr: SocketAddr,
    capture: UdpSocket,
    capture_addr: SocketAddr,
    cipher: Option<XChaCha20Poly1305>,
    counters: Arc<GossipCounters>,
    pace: Arc<Pace>,
    buf: Vec<u8>,
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.public.local_addr()?)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        if matches!(envelope.message, ChitchatMessage::Syn { .. }) && !self.pace.may_open(to) {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        // Encode through the codec socket into the capture socket.
        self.codec.send(self.capture_addr, envelope).await?;
        let payload = loop {
            let (n, from) = self.capture.recv_from(&mut self.buf).await?;
            if from == self.codec_addr {
                break &self.buf[..n];
            }
        };
        let sealed = match &self.cipher {
            Some(cipher) => seal(cipher, payload),
            None => frame_plain(payload),
        };
        match self.public.send_to(&sealed, to).await {
            Ok(n) => {
                self.pace.spent(n);
                self.counters.sent_datagrams.fetch_add(1, Relaxed);
                self.counters.sent_bytes.fetch_add(n as u64, Relaxed);
                Ok(SendOutcome { num_bytes_sent: n })
            }
            // A peer that is gone is not a broken transport.
            Err(e) => {
                tracing::debug!(peer = %to, error = %e, "gossip send failed");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (n, from) = match self.public.recv_from(&mut self.buf).await {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.counters.received_datagrams.fetch_add(1, Relaxed);
            self.counters.received_bytes.fetch_add(n as u64, Relaxed);
            let opened = match &self.cipher {
                Some(cipher) => open(cipher, &self.buf[..n]),
                None => unframe_plain(&self.buf[..n]),
            };
            let Some(plain) = opened else {
                self.counters.reject(from, "not a gossip datagram of this cluster's key");
                continue;
            };
            self.capture.send_to(&plain, self.codec_addr).await?;
            // Authentic but undecodable bytes would make the codec wait forever: bound it.
            let Ok(outcome) = tokio::time::timeout(std::time::Duration::from_millis(200), self.codec.recv()).await
            else {
                self.counters.reject(from, "undecodable gossip payload");
                continue;
            };
            let outcome = outcome?;
            if outcome.from_addr != self.capture_addr {
                continue;
            }
            return Ok(RecvOutcome { from_addr: from, envelope: outcome.envelope, num_bytes_received: n });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_forgery() {
        let c1 = XChaCha20Poly1305::new((&derive_key32(b"one-secret-of-16+", "gossip")).into());
        let c2 = XChaCha20Poly1305::new((&derive_key32(b"two-secret-of-16+", "gossip")).into());
        let sealed = seal(&c1, b"hello");
        assert_eq!(open(&c1, &sealed).as_deref(), Some(&b"hello"[..]));
        assert_eq!(open(&c2, &sealed), None);
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(open(&c1, &flipped), None);
        assert_eq!(open(&c1, b"SHL1short"), None);
        assert_eq!(open(&c1, &[]), None);
    }
}
