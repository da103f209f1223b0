//! Certificates as files or registry entries: PEM text -> a rustls [`CertifiedKey`] plus what
//! people and the SNI table need to know of it (names, issuer, not-after). Every refusal says
//! which file and why: no certificate, no key, a key of another certificate, expired.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A certificate ready to serve.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// What a certificate says about itself, for SNI, `/status`, metrics and `shoal cert list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// A short name: its first DNS name, else the subject's common name.
    pub name: String,
    /// DNS names it is valid for (subjectAltName, else the common name), lower case.
    pub names: Vec<String>,
    pub issuer: String,
    /// Not-after, seconds since the Unix epoch.
    pub not_after: i64,
    /// Where it came from: the certificate file's path, or `cluster` (the registry).
    pub source: String,
}

impl CertInfo {
    /// Whole days until it expires (negative once expired).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Reads a certificate chain and its key from PEM files. The error names the file.
pub fn load_files(cert: &Path, key: &Path) -> Result<Loaded, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()));
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    parse_pem(&cert_pem, &key_pem, &cert.display().to_string(), &key.display().to_string())
}

/// Parses a PEM certificate chain and key; `cert_name` and `key_name` name them in errors.
/// Expired certificates are refused: no client would accept one.
pub fn parse_pem(cert_pem: &[u8], key_pem: &[u8], cert_name: &str, key_name: &str) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_name}: not a PEM certificate file: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{cert_name}: no certificate in the file (expected a PEM \"BEGIN CERTIFICATE\" block)"));
    };
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        format!("{key_name}: no private key in the file (expected PEM \"BEGIN PRIVATE KEY\", RSA or EC): {e}")
    })?;
    let mut info = describe(leaf.as_ref()).map_err(|e| format!("{cert_name}: {e}"))?;
    info.source = cert_name.to_string();
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("{key_name}: unusable private key: {e}"))?;
    let key = CertifiedKey::new(chain, signing);
    match key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(format!("{key_name}: this key does not belong to the certificate in {cert_name}")),
    }
    if info.not_after < unix_now() {
        return Err(format!("{cert_name}: the certificate expired on {}", date(info.not_after)));
    }
    Ok(Loaded { key: Arc::new(key), info })
}

/// Opens a cluster certificate (sealed with the cluster secret by `shoal cert add`); errors
/// call the chain and key `cert_name` and `key_name`.
pub fn open_sealed(secret: &[u8], sealed: &[u8], cert_name: &str, key_name: &str) -> Result<Loaded, String> {
    let (cert, key) = shoal_proto::open_cert(secret, sealed)
        .ok_or("cannot open the sealed certificate: not sealed with this cluster's secret, or changed")?;
    if cert.len() + key.len() > shoal_proto::MAX_CERT_BYTES {
        return Err(format!(
            "{cert_name}: too large for a cluster certificate: the chain and key take {} bytes, at most {} (a \
             bundle of CA certificates appended to the chain? the chain needs the leaf and its intermediates only)",
            cert.len() + key.len(),
            shoal_proto::MAX_CERT_BYTES
        ));
    }
    let mut loaded = parse_pem(&cert, &key, cert_name, key_name)?;
    loaded.info.source = CLUSTER_SOURCE.into();
    Ok(loaded)
}

/// The `source` of certificates from the cluster's registry.
pub const CLUSTER_SOURCE: &str = "cluster";

/// Names, issuer and expiry of a DER certificate.
pub fn describe(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("malformed certificate: {e}"))?;
    let common_name =
        cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(|s| s.to_ascii_lowercase());
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty()
        && let Some(cn) = &common_name
    {
        names.push(cn.clone());
    }
    let name = names.first().cloned().or(common_name).unwrap_or_else(|| "(unnamed)".into());
    Ok(CertInfo {
        name,
        names,
        issuer: cert.issuer().to_string(),
        not_after: cert.validity().not_after.timestamp(),
        source: String::new(),
    })
}

/// `YYYY-MM-DD` of a Unix time (UTC), for messages.
pub fn date(unix: i64) -> String {
    let (y, m, d) = crate::civil::ymd(unix);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A self-signed certificate for `names` (PEM cert, PEM key), ECDSA P-256.
    pub fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn names_and_expiry_are_read() {
        let (cert, key) = self_signed(&["a.example", "*.b.example"]);
        let l = parse_pem(cert.as_bytes(), key.as_bytes(), "c.pem", "k.pem").unwrap();
        assert_eq!(l.info.names, vec!["a.example", "*.b.example"]);
        assert!(l.info.days_left(unix_now()) > 300);
        assert_eq!(l.info.source, "c.pem");
    }

    #[test]
    fn refusals_name_the_file() {
        let (cert, key) = self_signed(&["a.example"]);
        let (_, other_key) = self_signed(&["a.example"]);
        let cases: [(&str, &str, &str); 4] = [
            ("", &key, "c.pem: no certificate"),
            (&cert, "", "k.pem: no private key"),
            (&cert, &other_key, "k.pem: this key does not belong to the certificate in c.pem"),
            ("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", &key, "c.pem:"),
        ];
        for (c, k, want) in cases {
            let err = parse_pem(c.as_bytes(), k.as_bytes(), "c.pem", "k.pem").unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn sealed_certificates_open_with_the_secret_and_within_the_size_limit() {
        let (cert, key) = self_signed(&["a.example"]);
        let secret = b"a-cluster-secret-of-16+";
        let sealed = shoal_proto::seal_cert(secret, cert.as_bytes(), key.as_bytes());
        let l = open_sealed(secret, &sealed, "c.pem", "k.pem").unwrap();
        assert_eq!((l.info.name.as_str(), l.info.source.as_str()), ("a.example", CLUSTER_SOURCE));
        let err = open_sealed(b"another-secret-of-16+", &sealed, "c.pem", "k.pem").unwrap_err();
        assert!(err.contains("not sealed with this cluster's secret"), "{err}");
        // a CA bundle appended to the chain: refused by size, naming the file
        let bundle = format!("{cert}{}", cert.repeat(shoal_proto::MAX_CERT_BYTES / cert.len() + 1));
        let sealed = shoal_proto::seal_cert(secret, bundle.as_bytes(), key.as_bytes());
        let err = open_sealed(secret, &sealed, "c.pem", "k.pem").unwrap_err();
        assert!(err.starts_with("c.pem: too large for a cluster certificate"), "{err}");
    }

    #[test]
    fn expired_certificates_are_refused() {
        let mut params = rcgen::CertificateParams::new(vec!["old.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let err = parse_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), "c.pem", "k.pem").unwrap_err();
        assert!(err.contains("expired on 2021-01-01"), "{err}");
    }
}
