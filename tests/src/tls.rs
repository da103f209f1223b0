//! HTTPS pieces for the TLS tests (`tests/tls.rs`).
//!
//! - [`TestCa`]: a test certificate authority made with rcgen, issuing server certificates
//!   ([`Leaf`]) with an ECDSA P-256 or an RSA 2048 key (rcgen with ring cannot make RSA keys:
//!   `openssl genpkey` makes them), and expired ones. A leaf's certificate file holds the leaf
//!   and the CA (a "fullchain"), so clients given the CA verify the chain and the name.
//! - [`run`]: a real client (`curl`, `openssl s_client`, `h2load`) as a subprocess with a
//!   deadline (killed when it passes); a missing program is an error that says to install it
//!   (scripts/test.sh does), never a skipped test. [`curl`] and [`s_client`] add the usual
//!   arguments.
//! - A rustls client ([`client_config`], [`connect`], [`connect_over`]) for what those tools
//!   cannot do: choose exactly which TLS records carry which bytes (pipelining in one record,
//!   many records in one TCP segment), a half client hello ([`client_hello`]), and thousands of
//!   cheap handshakes that each report the certificate served ([`peer_leaf`]).
//! - [`read_response`]: reads one HTTP/1.1 response (by `Content-Length`) from any stream,
//!   keeping what follows for the next one.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::http::RawResponse;

/// The key of a test certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

/// A test certificate authority.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate (PEM): what clients are told to trust.
    pub pem: String,
}

/// A server certificate issued by a [`TestCa`].
#[derive(Clone)]
pub struct Leaf {
    /// The subject's common name.
    pub cn: String,
    /// The leaf then the CA certificate (PEM).
    pub cert_pem: String,
    /// The leaf's private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The leaf certificate (DER): what a client sees as the peer's first certificate.
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leaf(CN={})", self.cn)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl TestCa {
    /// A new CA named `cn` (ECDSA P-256).
    pub fn new(cn: &str) -> anyhow::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa { params, key, pem })
    }

    /// A server certificate for `names` (DNS names, `*.` wildcards allowed) with subject
    /// `CN=cn`, valid from 1975 to 4096 (rcgen's defaults).
    pub async fn leaf(&self, cn: &str, names: &[&str], kind: KeyKind) -> anyhow::Result<Leaf> {
        self.issue(cn, names, kind, false).await
    }

    /// Like [`TestCa::leaf`] but it expired on 2021-01-01 (valid from 2020-01-01).
    pub async fn expired_leaf(&self, cn: &str, names: &[&str]) -> anyhow::Result<Leaf> {
        self.issue(cn, names, KeyKind::EcdsaP256, true).await
    }

    async fn issue(&self, cn: &str, names: &[&str], kind: KeyKind, expired: bool) -> anyhow::Result<Leaf> {
        let key = match kind {
            KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyKind::Rsa2048 => KeyPair::from_pem(&rsa_key_pem().await?).context("load the RSA key openssl made")?,
        };
        self.sign(cn, names, key, |params| {
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
        })
    }

    /// A server certificate for `names` with subject `CN=cn` and `key`, signed by this CA;
    /// `validity` may change its dates (rcgen's default: 1975 to 4096).
    fn sign(
        &self,
        cn: &str,
        names: &[&str],
        key: KeyPair,
        validity: impl FnOnce(&mut CertificateParams),
    ) -> anyhow::Result<Leaf> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            cn: cn.to_string(),
            cert_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}

/// A new RSA 2048 private key, PKCS#8 PEM, made by `openssl genpkey`.
async fn rsa_key_pem() -> anyhow::Result<String> {
    let out = run(
        "openssl",
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        None,
        Duration::from_secs(30),
    )
    .await?;
    ensure!(out.status.success() && out.stdout.contains("BEGIN PRIVATE KEY"), "openssl genpkey failed: {out:?}");
    Ok(out.stdout)
}

/// What a subprocess did.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// stdout then stderr.
    pub fn both(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |s: &str| s.chars().take(6000).collect::<String>();
        write!(f, "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, cut(&self.stdout), cut(&self.stderr))
    }
}

/// Runs `program args`, feeding `stdin` (then closing it; no stdin: /dev/null), and waits
/// for it to exit within `timeout`; past that it is killed and this is an error.
pub async fn run(program: &str, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Ran> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{program} is not installed: the TLS tests need curl, openssl and h2load (scripts/test.sh installs them)"
            )
        }
        Err(e) => return Err(e).with_context(|| format!("spawn {program}")),
    };
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
            let _ = pipe.shutdown().await;
        });
    }
    let shown = format!("{program} {}", args.join(" "));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.with_context(|| format!("wait for {shown}"))?;
            Ok(Ran {
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
        // Dropping the future drops the child, which kills it (kill_on_drop).
        Err(_) => bail!("`{shown}` did not finish within {timeout:?} (killed)"),
    }
}

/// `curl -sS --connect-timeout 5 --max-time 15 ARGS` (killed after 20 s).
pub async fn curl(args: &[&str]) -> anyhow::Result<Ran> {
    let mut all = vec!["-sS", "--connect-timeout", "5", "--max-time", "15"];
    all.extend_from_slice(args);
    run("curl", &all, None, Duration::from_secs(20)).await
}

/// `openssl s_client -connect ADDR -ign_eof ARGS` with `stdin` as what it sends after the
/// handshake (killed after 15 s). `-ign_eof` keeps it reading until the server closes, so end
/// `stdin` with a request carrying `Connection: close`.
pub async fn s_client(addr: SocketAddr, args: &[&str], stdin: &[u8]) -> anyhow::Result<Ran> {
    let connect = addr.to_string();
    let mut all = vec!["s_client", "-connect", connect.as_str(), "-ign_eof"];
    all.extend_from_slice(args);
    run("openssl", &all, Some(stdin), Duration::from_secs(15)).await
}

/// `GET path` for `host`, HTTP/1.1, with `Connection: close` when `close`.
pub fn get_request(host: &str, path: &str, close: bool) -> String {
    let conn = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shoal-tests\r\n{conn}\r\n")
}

/// The `subject=` line `openssl s_client` printed (e.g. `CN = a.test`), if any.
pub fn s_client_subject(out: &str) -> Option<String> {
    out.lines().find_map(|l| l.strip_prefix("subject=")).map(|s| s.trim().to_string())
}

/// A rustls client config trusting `ca_pem`, offering `alpn` and `versions`, with resumption
/// off (every handshake is a full one and shows the certificate).
pub fn client_config(
    ca_pem: &str,
    alpn: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("CA PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// TLS 1.2 and 1.3.
pub const ALL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Connects to `addr` and handshakes as a client of `name` (SNI), within 5 s.
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect {addr}: timed out"))?
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    connect_over(tcp, name, cfg).await
}

/// Handshakes over `io` as a client of `name`, within 5 s.
pub async fn connect_over<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<IO>> {
    let server_name = ServerName::try_from(name.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, io))
        .await
        .with_context(|| format!("TLS handshake with {name}: timed out"))?
        .with_context(|| format!("TLS handshake with {name}"))
}

/// The certificate the server presented (DER of the first of its chain).
pub fn peer_leaf<IO>(s: &TlsStream<IO>) -> Option<Vec<u8>> {
    s.get_ref().1.peer_certificates()?.first().map(|c| c.to_vec())
}

/// The ALPN protocol agreed on, as text.
pub fn alpn<IO>(s: &TlsStream<IO>) -> Option<String> {
    s.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())
}

/// The bytes of a real TLS client hello for `name` (what rustls sends first).
pub fn client_hello(name: &str, cfg: &Arc<rustls::ClientConfig>) -> anyhow::Result<Vec<u8>> {
    let mut conn = rustls::ClientConnection::new(cfg.clone(), ServerName::try_from(name.to_string())?)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 response from `r` within `timeout`: its head and `Content-Length` body
/// (none for 1xx, 204 and 304). `pending` holds bytes read before and keeps those read past
/// this response.
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<RawResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(end) = find(pending, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            ensure!(!head.contains("transfer-encoding:"), "read_response reads Content-Length bodies only: {head:?}");
            let len = if (100..200).contains(&status) || status == 204 || status == 304 {
                0
            } else {
                head.lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse::<usize>())
                    .transpose()?
                    .with_context(|| format!("no Content-Length in {head:?}"))?
            };
            let total = end + 4 + len;
            if pending.len() >= total {
                let resp = RawResponse::parse(&pending[..total])?;
                pending.drain(..total);
                return Ok(resp);
            }
        }
        let mut buf = [0u8; 16384];
        let n = match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Ok(r) => r.context("read a response")?,
            Err(_) => bail!(
                "no complete response within {timeout:?}; have {:?}",
                String::from_utf8_lossy(&pending[..pending.len().min(500)])
            ),
        };
        if n == 0 {
            bail!("connection closed before a complete response; have {:?}", String::from_utf8_lossy(pending));
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates with a chosen expiry, and a TLS backend (`tests/tls_cluster.rs`)
// ---------------------------------------------------------------------------------------------

impl TestCa {
    /// Like [`TestCa::leaf`] (ECDSA P-256) but valid until `not_after` (seconds since the Unix
    /// epoch), from a day ago.
    pub fn leaf_until(&self, cn: &str, names: &[&str], not_after: i64) -> anyhow::Result<Leaf> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        self.sign(cn, names, key, |params| {
            let epoch = rcgen::date_time_ymd(1970, 1, 1);
            params.not_before = epoch + Duration::from_secs((unix_now() - 86_400).max(0) as u64);
            params.not_after = epoch + Duration::from_secs(not_after.max(0) as u64);
        })
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// One request a [`TlsBackend`] answered.
#[derive(Debug, Clone)]
pub struct TlsSeen {
    /// The connection it came on: 1 for the first TCP connection the backend accepted.
    pub conn: u64,
    pub method: String,
    pub target: String,
    /// Header fields, names in lower case, in order.
    pub headers: Vec<(String, String)>,
}

impl TlsSeen {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct TlsBackendShared {
    connections: std::sync::atomic::AtomicU64,
    handshakes: std::sync::atomic::AtomicU64,
    /// Why handshakes failed, in order.
    failed: std::sync::Mutex<Vec<String>>,
    /// The SNI of each completed handshake.
    sni: std::sync::Mutex<Vec<Option<String>>>,
    requests: std::sync::Mutex<Vec<TlsSeen>>,
    upgrades: std::sync::atomic::AtomicU64,
}

/// An HTTPS backend (hyper HTTP/1.1 over tokio-rustls, ALPN `http/1.1`) serving one [`Leaf`]
/// on `127.0.0.1:<free port>`. It answers every request `200` with the body
/// `<name> conn=<N>` and `x-conn: <N>` (N: which TCP connection, from 1), keeps connections
/// alive, and records every connection, handshake (with its SNI), failed handshake and request.
/// `Connection: upgrade` + `Upgrade: <p>` gets `101` and every byte echoed back. Dropping it
/// stops it and closes its connections.
pub struct TlsBackend {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<TlsBackendShared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TlsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsBackend({} at {})", self.name, self.addr)
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    /// Starts a backend named `name` serving `leaf`.
    pub async fn start(name: &str, leaf: &Leaf) -> anyhow::Result<TlsBackend> {
        use rustls::pki_types::PrivateKeyDer;
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("the leaf's PEM chain")?;
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).context("the leaf's PEM key")?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(ALL_VERSIONS)?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("bind the TLS backend")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(TlsBackendShared::default());
        let (s, n) = (shared.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let _ = tcp.set_nodelay(true);
                        let conn = s.connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        conns.spawn(tls_backend_conn(acceptor.clone(), tcp, conn, s.clone(), n.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(TlsBackend { name: name.to_string(), addr, shared, task })
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Why each failed handshake failed.
    pub fn failed_handshakes(&self) -> Vec<String> {
        self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The SNI of each completed handshake, in order.
    pub fn sni(&self) -> Vec<Option<String>> {
        self.shared.sni.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every request answered, in order.
    pub fn requests(&self) -> Vec<TlsSeen> {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Upgrades accepted.
    pub fn upgrades(&self) -> u64 {
        self.shared.upgrades.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn tls_backend_conn(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    conn: u64,
    s: Arc<TlsBackendShared>,
    name: String,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            s.failed.lock().unwrap_or_else(|e| e.into_inner()).push(e.to_string());
            return;
        }
        Err(_) => {
            s.failed.lock().unwrap_or_else(|e| e.into_inner()).push("handshake timed out".into());
            return;
        }
    };
    s.handshakes.fetch_add(1, SeqCst);
    let sni = tls.get_ref().1.server_name().map(str::to_string);
    s.sni.lock().unwrap_or_else(|e| e.into_inner()).push(sni);
    let svc = hyper::service::service_fn(move |req| tls_backend_answer(s.clone(), name.clone(), conn, req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
        .with_upgrades()
        .await;
}

async fn tls_backend_answer(
    s: Arc<TlsBackendShared>,
    name: String,
    conn: u64,
    mut req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering::SeqCst;
    let seen = TlsSeen {
        conn,
        method: req.method().to_string(),
        target: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
    };
    let wants_upgrade = seen.header("upgrade").is_some()
        && seen.header("connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
    s.requests.lock().unwrap_or_else(|e| e.into_inner()).push(seen);
    let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
    resp.headers_mut().insert("x-conn", conn.into());
    if wants_upgrade {
        s.upgrades.fetch_add(1, SeqCst);
        let protocol = req.headers()[http::header::UPGRADE].clone();
        crate::backend::echo_after_upgrade(hyper::upgrade::on(&mut req));
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(http::header::UPGRADE, protocol);
        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        return Ok(resp);
    }
    let _ = req.into_body().collect().await;
    *resp.body_mut() = http_body_util::Full::new(bytes::Bytes::from(format!("{name} conn={conn}")));
    Ok(resp)
}
