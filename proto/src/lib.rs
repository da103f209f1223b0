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
