//! TLS to backends (`[upstream] tls = true`): the client config a pool's connections use. The
//! backends' certificates are verified against `ca_file`, or the system's trust store, for
//! the name in `sni` (default: the backend's IP address, which its certificate must then
//! carry); `verify = false` trusts any certificate (signatures still checked). rustls keeps
//! sessions per server name, so new connections to a backend resume; kept-alive connections
//! are reused by the pool like plain ones. Also the client side of calls to peers' control
//! ports over TLS (`pinned_to`).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use arc_swap::ArcSwap;

use super::sni::SniTable;
use crate::config::UpstreamTlsSettings;

/// A pool's TLS client side.
pub struct UpstreamTls {
    connector: TlsConnector,
    sni: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("sni", &self.sni).finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Builds the client config; errors name the CA file or say what is missing.
    pub fn new(settings: &UpstreamTlsSettings) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("upstream tls: {e}"))?;
        let mut config = if settings.verify {
            builder.with_root_certificates(roots(settings)?).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Trust { provider, pinned: None }))
                .with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let sni = match &settings.sni {
            Some(name) => Some(
                ServerName::try_from(name.clone()).map_err(|_| format!("upstream.sni {name:?} is not a valid name"))?,
            ),
            None => None,
        };
        Ok(UpstreamTls { connector: TlsConnector::from(Arc::new(config)), sni })
    }

    /// The TLS handshake on a connected socket to `addr`.
    pub async fn connect(&self, tcp: TcpStream, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self.sni.clone().unwrap_or(ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, tcp).await
    }
}

/// The CAs backends are verified against.
fn roots(settings: &UpstreamTlsSettings) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            let shown = path.display();
            let pem = std::fs::read(path).map_err(|e| format!("upstream.ca_file {shown}: cannot read: {e}"))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("upstream.ca_file {shown}: not a PEM certificate file: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("upstream.ca_file {shown}: no usable CA certificate in the file"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("upstream.tls: the system has no trusted CA certificates (install ca-certificates, or set upstream.ca_file)".into());
            }
        }
    }
    Ok(roots)
}

/// A client config for a peer's control port (`[tls] control = true`): the peer must present
/// one of the certificates this node serves itself (the cluster shares its certificate set),
/// whatever its name or issuer.
pub fn pinned_to(table: Arc<ArcSwap<SniTable>>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let trust = Arc::new(Trust { provider: provider.clone(), pinned: Some(table) });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("control tls: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(trust)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A verifier that takes any certificate (`verify = false`: the connection is at least
/// encrypted to whoever holds that certificate's key) or only the pinned ones; the handshake's
/// signatures are checked either way.
struct Trust {
    provider: Arc<CryptoProvider>,
    pinned: Option<Arc<ArcSwap<SniTable>>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("pinned", &self.pinned.is_some()).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(table) = &self.pinned else { return Ok(ServerCertVerified::assertion()) };
        if table.load().certs().iter().any(|c| c.key.cert.first() == Some(end_entity)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not one of this cluster's certificates".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
