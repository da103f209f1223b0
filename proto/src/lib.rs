//! The control-plane contract of Shoal: the `Control` gRPC service (`proto/shoal.proto`) that
//! `shoal` and joining nodes call on a node's control port, and how calls authenticate.
#![allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}
pub use v1::*;

/// Metadata key carrying the control-plane token.
pub const AUTH_HEADER: &str = "x-shoal-auth";

/// The token a caller presents: hex SHA-256 of a purpose label and the cluster secret. The
/// secret itself never crosses the wire (though without TLS the token can be replayed by
/// someone who can read the traffic; see docs/OPERATIONS.md).
pub fn control_token(secret: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"shoal/control/");
    h.update(secret);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a secret file the way `shoald` does (trimmed; at least 16 bytes).
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
    let s = raw.trim_ascii().to_vec();
    if s.len() < 16 {
        return Err(format!("secret file {}: the secret must be at least 16 bytes", path.display()));
    }
    Ok(s)
}

/// Seals a certificate chain and its key (PEM) with the cluster secret for `CertAdd` and the
/// registry: XChaCha20-Poly1305 under a key derived from the secret; `nonce (24) | sealed`.
pub fn seal_cert(secret: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::{Aead, AeadCore, OsRng};
    let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut plain = Vec::with_capacity(4 + cert_pem.len() + key_pem.len());
    plain.extend_from_slice(&(cert_pem.len() as u32).to_le_bytes());
    plain.extend_from_slice(cert_pem);
    plain.extend_from_slice(key_pem);
    let sealed = cert_cipher(secret).encrypt(&nonce, plain.as_slice()).unwrap_or_default();
    [nonce.as_slice(), &sealed].concat()
}

/// Opens what [`seal_cert`] sealed: `(cert_pem, key_pem)`, or `None` if it was not sealed
/// with this secret or was changed.
pub fn open_cert(secret: &[u8], sealed: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use chacha20poly1305::aead::Aead;
    if sealed.len() < 24 + 16 + 4 {
        return None;
    }
    let nonce = chacha20poly1305::XNonce::from_slice(&sealed[..24]);
    let plain = cert_cipher(secret).decrypt(nonce, &sealed[24..]).ok()?;
    let n = u32::from_le_bytes(plain.get(..4)?.try_into().ok()?) as usize;
    let cert = plain.get(4..4 + n)?.to_vec();
    let key = plain.get(4 + n..)?.to_vec();
    Some((cert, key))
}

fn cert_cipher(secret: &[u8]) -> chacha20poly1305::XChaCha20Poly1305 {
    use chacha20poly1305::KeyInit;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"shoal/certs/");
    h.update(secret);
    let key: [u8; 32] = h.finalize().into();
    chacha20poly1305::XChaCha20Poly1305::new((&key).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_certificates_open_only_with_the_secret() {
        let sealed = seal_cert(b"0123456789abcdef", b"CERT", b"KEY");
        assert_eq!(open_cert(b"0123456789abcdef", &sealed), Some((b"CERT".to_vec(), b"KEY".to_vec())));
        assert_eq!(open_cert(b"0123456789abcdeX", &sealed), None);
        let mut changed = sealed.clone();
        changed[30] ^= 1;
        assert_eq!(open_cert(b"0123456789abcdef", &changed), None);
        assert_eq!(open_cert(b"0123456789abcdef", &[]), None);
    }
}
