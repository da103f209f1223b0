//! The control-plane contract of Shoal: the `Control` gRPC service (`proto/shoal.proto`) that
//! `shoal` and joining nodes call on a node's control port, and how calls authenticate.
#![allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}
pub use v1::*;

/// Metadata key carrying the control-plane token ([`call_token`]).
pub const AUTH_HEADER: &str = "x-shoal-auth";

/// How far a call's timestamp may be from the receiver's clock. Tokens older than this are
/// refused, so a receiver needs to remember used nonces only this long.
pub const TOKEN_MAX_AGE_MS: u64 = 30_000;

/// The token a caller presents for one call: `v2.<unix ms>.<nonce>.<mac>`, the MAC being
/// HMAC-SHA256 under a key derived from the cluster secret over the call's path (e.g.
/// `/shoal.v1.Control/BackendAdd`), the time and the nonce. The secret never crosses the wire;
/// a token is good for one call of that method, within `TOKEN_MAX_AGE_MS`, once.
pub fn call_token(secret: &[u8], path: &str, now_ms: u64, nonce: u128) -> String {
    format!("v2.{now_ms}.{nonce:032x}.{}", hex(&call_mac(secret, path, now_ms, nonce)))
}

/// A fresh random nonce for [`call_token`].
pub fn new_nonce() -> u128 {
    use chacha20poly1305::aead::rand_core::RngCore;
    let mut b = [0u8; 16];
    chacha20poly1305::aead::OsRng.fill_bytes(&mut b);
    u128::from_le_bytes(b)
}

/// Why a call's token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    /// Not a v2 token, or a MAC that does not match (wrong secret, another method, changed).
    Wrong,
    /// Its time is more than `TOKEN_MAX_AGE_MS` from ours.
    Stale,
}

/// Checks a call's token; on success returns `(time, nonce)` for the receiver's replay check.
pub fn check_call_token(
    secret: &[u8],
    path: &str,
    token: Option<&str>,
    now_ms: u64,
) -> Result<(u64, u128), TokenError> {
    let token = token.ok_or(TokenError::Missing)?;
    let mut it = token.split('.');
    let (Some("v2"), Some(t), Some(n), Some(mac), None) = (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return Err(TokenError::Wrong);
    };
    let t: u64 = t.parse().map_err(|_| TokenError::Wrong)?;
    let nonce = u128::from_str_radix(n, 16).map_err(|_| TokenError::Wrong)?;
    if n.len() != 32 {
        return Err(TokenError::Wrong);
    }
    let expected = hex(&call_mac(secret, path, t, nonce));
    // Constant time over the hex text.
    let same =
        mac.len() == expected.len() && mac.bytes().zip(expected.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if !same {
        return Err(TokenError::Wrong);
    }
    if now_ms.abs_diff(t) > TOKEN_MAX_AGE_MS {
        return Err(TokenError::Stale);
    }
    Ok((t, nonce))
}

fn call_mac(secret: &[u8], path: &str, at_ms: u64, nonce: u128) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let key: [u8; 32] = Sha256::new().chain_update(b"shoal/control/v2/").chain_update(secret).finalize().into();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(path.as_bytes());
    mac.update(b"\n");
    mac.update(&at_ms.to_le_bytes());
    mac.update(&nonce.to_le_bytes());
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The call path of a request as the generated client tags it (`/package.Service/Method`).
pub fn call_path<T>(req: &tonic::Request<T>) -> Option<String> {
    req.extensions().get::<tonic::GrpcMethod>().map(|m| format!("/{}/{}", m.service(), m.method()))
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A client interceptor that signs every call with [`call_token`] (no secret: no token).
#[derive(Clone)]
pub struct Signer(pub Option<std::sync::Arc<[u8]>>);

impl tonic::service::Interceptor for Signer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(secret) = &self.0 else { return Ok(req) };
        let path = call_path(&req).ok_or_else(|| tonic::Status::internal("call without a method name"))?;
        let token = call_token(secret, &path, unix_ms(), new_nonce());
        let value = token.parse().map_err(|_| tonic::Status::internal("token is not ASCII"))?;
        req.metadata_mut().insert(AUTH_HEADER, value);
        Ok(req)
    }
}

/// How a caller reaches a control port: plain HTTP/2, or TLS with this client config and
/// server name (`[tls] control = true` on the node).
#[derive(Clone)]
pub struct ControlTls {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl ControlTls {
    /// TLS to a control port whose certificate `ca_pem` (PEM CA certificates) signs for `name`
    /// (a DNS name or an IP address).
    pub fn verified_by(ca_pem: &[u8], name: &str) -> Result<ControlTls, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("not a PEM certificate file: {e}"))?;
            roots.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no CA certificate in the file".into());
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|_| format!("{name:?} is not a valid server name"))?;
        Ok(ControlTls { config: std::sync::Arc::new(config), server_name })
    }
}

/// A channel to the control port at `addr` (`HOST:PORT`), over TLS when `tls` is given.
pub async fn control_channel(
    addr: &str,
    tls: Option<ControlTls>,
    connect_timeout: std::time::Duration,
    call_timeout: Option<std::time::Duration>,
) -> Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(connect_timeout);
    if let Some(t) = call_timeout {
        endpoint = endpoint.timeout(t);
    }
    let connected = match tls {
        None => endpoint.connect().await,
        Some(tls) => endpoint.connect_with_connector(TlsConnect { addr: addr.to_string(), tls }).await,
    };
    connected.map_err(|e| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        msg
    })
}

/// Connects TCP then TLS (ALPN h2) for tonic.
#[derive(Clone)]
struct TlsConnect {
    addr: String,
    tls: ControlTls,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, tls) = (self.addr.clone(), self.tls.clone());
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(tls.config).connect(tls.server_name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
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

/// The largest certificate chain plus key (PEM bytes) the cluster stores. Each cluster
/// certificate travels as one gossip value, which must fit one datagram with room to spare
/// (chitchat sends a node's changes in order and never splits a value: one that cannot fit
/// would hold back everything the node publishes after it). A leaf, two intermediates and a
/// 4096-bit RSA key take about 9 KiB.
pub const MAX_CERT_BYTES: usize = 24 * 1024;

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

    #[test]
    fn call_tokens_cover_the_method_the_time_and_the_secret() {
        let (secret, path, now) = (b"0123456789abcdef", "/shoal.v1.Control/BackendAdd", 1_000_000_000u64);
        let t = call_token(secret, path, now, 7);
        assert_eq!(check_call_token(secret, path, Some(&t), now + 1_000), Ok((now, 7)));
        assert_eq!(check_call_token(secret, path, None, now), Err(TokenError::Missing));
        assert_eq!(check_call_token(b"another-secret!!", path, Some(&t), now), Err(TokenError::Wrong));
        assert_eq!(check_call_token(secret, "/shoal.v1.Control/Leave", Some(&t), now), Err(TokenError::Wrong));
        assert_eq!(check_call_token(secret, path, Some(&t), now + TOKEN_MAX_AGE_MS + 1), Err(TokenError::Stale));
        // another time or nonce in the text does not match the MAC
        let moved = t.replacen(&now.to_string(), &(now + 5).to_string(), 1);
        assert_eq!(check_call_token(secret, path, Some(&moved), now), Err(TokenError::Wrong));
        for bad in ["", "v2", "v1.1.2.3", "v2.x.00.00", &format!("{t}.extra")] {
            assert_eq!(check_call_token(secret, path, Some(bad), now), Err(TokenError::Wrong), "{bad:?}");
        }
        assert_ne!(new_nonce(), new_nonce());
    }
}
