//! Session tickets every node can open. The ticket key of each period is derived from the
//! cluster secret and the period's number (Unix time / `PERIOD`), so every node of a cluster
//! has the same keys at the same time with nothing to distribute: a client that DNS sends to
//! another node resumes without a full handshake. A ticket names its period; the current, the
//! previous and (for clocks a little ahead) the next period's keys open it, so keys rotate on
//! a schedule every node shares and an old key is forgotten after two periods (forward
//! secrecy of resumed sessions is bounded by that). Without a cluster secret the node makes a
//! random secret of its own at start: tickets resume on this node only.
//!
//! Ticket layout: period (8, little endian) | nonce (24) | XChaCha20-Poly1305(session state),
//! with the period as associated data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// How long one ticket key is used to make tickets. Tickets stay valid up to twice this.
pub const PERIOD_SECS: u64 = 6 * 3600;
const NONCE_LEN: usize = 24;
const HEAD: usize = 8 + NONCE_LEN;

/// The cluster's ticket keys.
pub struct ClusterTickets {
    /// The root all period keys derive from (never used as a key itself).
    root: [u8; 32],
    /// Cluster-wide (derived from the shared secret) or this node's own.
    pub shared: bool,
}

impl std::fmt::Debug for ClusterTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTickets").field("shared", &self.shared).finish_non_exhaustive()
    }
}

impl ClusterTickets {
    /// Keys from the cluster secret, or from a random secret of this node's without one.
    pub fn new(secret: Option<&[u8]>) -> Self {
        let mut h = Sha256::new();
        h.update(b"shoal/tls-tickets/");
        match secret {
            Some(s) => h.update(s),
            None => h.update(random::<32>()),
        }
        ClusterTickets { root: h.finalize().into(), shared: secret.is_some() }
    }

    fn cipher(&self, period: u64) -> XChaCha20Poly1305 {
        let mut h = Sha256::new();
        h.update(self.root);
        h.update(period.to_le_bytes());
        let key: [u8; 32] = h.finalize().into();
        XChaCha20Poly1305::new((&key).into())
    }

    fn period_now() -> u64 {
        super::certs::unix_now().max(0) as u64 / PERIOD_SECS
    }

    /// Seals `plain` with the key of `period`.
    pub fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let nonce = random::<NONCE_LEN>();
        let aad = period.to_le_bytes();
        let sealed = self.cipher(period).encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &aad }).ok()?;
        let mut out = Vec::with_capacity(HEAD + sealed.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// Opens a ticket sealed in a period within one of `now`.
    pub fn open(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < HEAD + 16 {
            return None;
        }
        let aad: [u8; 8] = ticket[..8].try_into().ok()?;
        let period = u64::from_le_bytes(aad);
        if period.abs_diff(now) > 1 {
            return None;
        }
        let nonce = XNonce::from_slice(&ticket[8..HEAD]);
        self.cipher(period).decrypt(nonce, Payload { msg: &ticket[HEAD..], aad: &aad }).ok()
    }
}

impl rustls::server::ProducesTickets for ClusterTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        PERIOD_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(Self::period_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(Self::period_now(), cipher)
    }
}

/// `N` bytes from the crypto provider's secure random source.
fn random<const N: usize>() -> [u8; N] {
    static RNG: std::sync::OnceLock<&'static dyn rustls::crypto::SecureRandom> = std::sync::OnceLock::new();
    let rng = RNG.get_or_init(|| rustls::crypto::aws_lc_rs::default_provider().secure_random);
    let mut out = [0u8; N];
    if rng.fill(&mut out).is_err() {
        // The OS random source failing is not recoverable in any useful way; fall back to a
        // seeded generator rather than a constant.
        out.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_secret_opens_anywhere_and_rotation_is_bounded() {
        let a = ClusterTickets::new(Some(b"a-cluster-secret-of-16+"));
        let b = ClusterTickets::new(Some(b"a-cluster-secret-of-16+"));
        let t = a.seal(100, b"session").unwrap();
        // another node with the same secret opens it, in this period, the next, and the one
        // after a clock that runs a period ahead
        assert_eq!(b.open(100, &t).unwrap(), b"session");
        assert_eq!(b.open(101, &t).unwrap(), b"session");
        assert_eq!(b.open(99, &t).unwrap(), b"session");
        // two periods later the key is gone
        assert!(b.open(102, &t).is_none());
        // another secret, a node without one, or a changed byte: refused
        assert!(ClusterTickets::new(Some(b"another-secret-of-16+")).open(100, &t).is_none());
        assert!(ClusterTickets::new(None).open(100, &t).is_none());
        let mut bad = t.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(b.open(100, &bad).is_none());
        // a ticket claiming another period fails authentication
        let mut moved = t.clone();
        moved[..8].copy_from_slice(&101u64.to_le_bytes());
        assert!(b.open(100, &moved).is_none());
        assert!(b.open(100, &[]).is_none());
        assert!(b.open(100, &t[..HEAD + 15]).is_none());
    }

    #[test]
    fn without_a_secret_each_node_has_its_own_keys() {
        let (a, b) = (ClusterTickets::new(None), ClusterTickets::new(None));
        let t = a.seal(7, b"s").unwrap();
        assert_eq!(a.open(7, &t).unwrap(), b"s");
        assert!(b.open(7, &t).is_none());
        assert!(!a.shared);
    }
}
