//! Gossip datagrams as the wire format in `docs/ARCHITECTURE.md` / OPERATIONS "Security"
//! describes them, written independently of the node's code: `SHL1 | nonce (24) |
//! XChaCha20-Poly1305(timestamp_ms (8, LE) | chitchat payload)`, keyed with
//! SHA-256(`shoal/gossip/` + secret). With the cluster secret a test can open a captured
//! datagram and seal its payload again with any timestamp, e.g. one older than the 60 s replay
//! window, without waiting a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"SHL1";
const NONCE_LEN: usize = 24;
/// OPERATIONS: "timestamps bound replays to 60 s".
pub const REPLAY_WINDOW_MS: u64 = 60_000;

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Opens and seals datagrams of one cluster secret (the file's contents, trimmed as shoald does).
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    pub fn new(secret: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"shoal/gossip/");
        h.update(secret.trim_ascii());
        let key: [u8; 32] = h.finalize().into();
        Sealer { cipher: XChaCha20Poly1305::new((&key).into()) }
    }

    /// (timestamp in ms, chitchat payload) of a sealed datagram; `None` if it does not open.
    pub fn open(&self, datagram: &[u8]) -> Option<(u64, Vec<u8>)> {
        if datagram.len() < 4 + NONCE_LEN + 16 + 8 || &datagram[..4] != MAGIC {
            return None;
        }
        let nonce = XNonce::from_slice(&datagram[4..4 + NONCE_LEN]);
        let plain = self.cipher.decrypt(nonce, &datagram[4 + NONCE_LEN..]).ok()?;
        let ts = u64::from_le_bytes(plain[..8].try_into().ok()?);
        Some((ts, plain[8..].to_vec()))
    }

    /// Seals `payload` with timestamp `ts_ms` and a fresh nonce.
    pub fn seal(&self, ts_ms: u64, payload: &[u8]) -> Vec<u8> {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        nonce[8..16].copy_from_slice(&now_ms().to_le_bytes());
        nonce[16..20].copy_from_slice(&std::process::id().to_le_bytes());
        let mut plain = ts_ms.to_le_bytes().to_vec();
        plain.extend_from_slice(payload);
        let sealed = self.cipher.encrypt(XNonce::from_slice(&nonce), plain.as_slice()).expect("seal");
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }
}
