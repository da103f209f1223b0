//! tls-load: TLS handshake load client for bench/tls.sh (one thread: a tokio current-thread
//! runtime; rustls with the ring provider).
//!
//! Keeps CONNS connections in flight for SECS seconds. Every connection is a new TCP
//! connection + a TLS 1.3 handshake + one HTTP/1.1 request (`GET PATH`, `Connection: close`),
//! read until the server closes it; then the slot opens its next connection.
//!
//!   --mode new      no session is ever offered: every handshake is a full one (X25519 key
//!                   share, certificate, CertificateVerify).
//!   --mode resume   each slot has its own session store and offers a ticket it received on
//!                   its earlier connections (a PSK resumption with (EC)DHE, as browsers do).
//!                   Tickets are used once (rustls' client store pops them), so a server must
//!                   issue a new one on every connection for every handshake to resume; the
//!                   first connection of every slot is a full one. NewSessionTicket arrives
//!                   before the response, so reading to the server's close collects it.
//!
//! The certificate chain is not verified (the bench certificate is self-signed); the
//! CertificateVerify signature of every full handshake is (as OpenSSL clients always do).
//! SNI is sent (--sni, default "localhost"). No ALPN (HTTP/1.1).
//!
//! Prints one line:
//!   RESULT mode=.. conns=.. secs=<elapsed> ok=<ok connections> rate=<ok/s> reused=<n> full=<n>
//!          err=<n> non200=<n> timeout=<n> p50_ms=.. p99_ms=.. cpu_pct=<this process, % of one
//!          core> version=.. cipher=.. group=..
//! reused / full count the ok connections by rustls' handshake_kind().

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Accepts any certificate, checks the handshake signature made with its key.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Default)]
struct Stats {
    ok: u64,
    reused: u64,
    err: u64,
    non200: u64,
    timeout: u64,
    lat_ms: Vec<f64>,
    last_done: Option<Instant>,
    negotiated: Option<String>,
    errors_shown: u32,
}

enum Outcome {
    Ok { reused: bool, negotiated: String },
    Non200,
}

async fn one(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
    req: &[u8],
) -> std::io::Result<Outcome> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name.clone(), tcp).await?;
    tls.write_all(req).await?;
    let mut head = Vec::with_capacity(16);
    let mut buf = [0u8; 16384];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if head.len() < 16 {
                    let k = n.min(16 - head.len());
                    head.extend_from_slice(&buf[..k]);
                }
            }
            // a close without close_notify after the response: the response is complete
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !head.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Ok(Outcome::Non200);
    }
    let conn = tls.get_ref().1;
    let reused = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let negotiated = format!(
        "version={:?} cipher={:?} group={:?}",
        conn.protocol_version().unwrap(),
        conn.negotiated_cipher_suite().unwrap().suite(),
        conn.negotiated_key_exchange_group().map(|g| g.name())
    )
    .replace("Some(", "")
    .replace(')', "")
    .replace("TLSv1_3", "TLSv1.3");
    Ok(Outcome::Ok { reused, negotiated })
}

fn cpu_secs() -> f64 {
    // utime + stime of this process (/proc/self/stat fields 14 and 15, in clock ticks of 1/100 s)
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn usage() -> ! {
    eprintln!("usage: tls-load --port P [--host 127.0.0.1] [--mode new|resume] [--conns 32] [--secs 5] [--sni localhost] [--path /]");
    std::process::exit(2)
}

fn main() {
    let (mut host, mut port, mut resume, mut conns, mut secs) = ("127.0.0.1".to_string(), 0u16, false, 32usize, 5f64);
    let (mut sni, mut path) = ("localhost".to_string(), "/".to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--host" => host = v,
            "--port" => port = v.parse().unwrap_or_else(|_| usage()),
            "--mode" => match v.as_str() {
                "new" => resume = false,
                "resume" => resume = true,
                _ => usage(),
            },
            "--conns" => conns = v.parse().unwrap_or_else(|_| usage()),
            "--secs" => secs = v.parse().unwrap_or_else(|_| usage()),
            "--sni" => sni = v,
            "--path" => path = v,
            _ => usage(),
        }
    }
    if port == 0 || conns == 0 || secs <= 0.0 {
        usage();
    }
    let addr: SocketAddr = format!("{host}:{port}").parse().unwrap_or_else(|_| usage());
    let name = ServerName::try_from(sni.clone()).unwrap_or_else(|_| usage());
    let req = format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").into_bytes();
    // ring on purpose (deprecated only for lacking post-quantum groups), with X25519 first (its
    // key share is the one sent), as OpenSSL clients and browsers do: ring's own default order
    // starts with P-384, which an OpenSSL 3.0 server then accepts at ~1 ms per handshake.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    use rustls::crypto::ring::kx_group;
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    let provider = Arc::new(provider);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    let stats = Rc::new(RefCell::new(Stats::default()));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let cpu0 = cpu_secs();
    for _ in 0..conns {
        // one config (and so one session store) per slot
        let mut cfg = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider.clone())))
            .with_no_client_auth();
        cfg.resumption = if resume { Resumption::in_memory_sessions(16) } else { Resumption::disabled() };
        let connector = TlsConnector::from(Arc::new(cfg));
        let (stats, name, req) = (stats.clone(), name.clone(), req.clone());
        local.spawn_local(async move {
            while Instant::now() < end {
                let start = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(5), one(&connector, addr, &name, &req)).await;
                let mut s = stats.borrow_mut();
                s.last_done = Some(Instant::now());
                match r {
                    Ok(Ok(Outcome::Ok { reused, negotiated })) => {
                        s.ok += 1;
                        s.reused += reused as u64;
                        s.lat_ms.push(start.elapsed().as_secs_f64() * 1e3);
                        if s.negotiated.is_none() {
                            s.negotiated = Some(negotiated);
                        }
                    }
                    Ok(Ok(Outcome::Non200)) => s.non200 += 1,
                    Ok(Err(e)) => {
                        s.err += 1;
                        if s.errors_shown < 3 {
                            s.errors_shown += 1;
                            eprintln!("tls-load: {e}");
                        }
                        if s.ok == 0 && s.err > 100_000 {
                            eprintln!("tls-load: only errors");
                            std::process::exit(1);
                        }
                    }
                    Err(_) => s.timeout += 1,
                }
            }
        });
    }
    rt.block_on(local);
    let s = stats.borrow();
    let elapsed = s.last_done.unwrap_or(t0).duration_since(t0).as_secs_f64().max(1e-9);
    let cpu = cpu_secs() - cpu0;
    let mut lat = s.lat_ms.clone();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| if lat.is_empty() { 0.0 } else { lat[(p * (lat.len() - 1) as f64) as usize] };
    println!(
        "RESULT mode={} conns={} secs={:.3} ok={} rate={:.1} reused={} full={} err={} non200={} timeout={} p50_ms={:.3} p99_ms={:.3} cpu_pct={:.0} {}",
        if resume { "resume" } else { "new" },
        conns,
        elapsed,
        s.ok,
        s.ok as f64 / elapsed,
        s.reused,
        s.ok - s.reused,
        s.err,
        s.non200,
        s.timeout,
        pct(0.50),
        pct(0.99),
        100.0 * cpu / elapsed,
        s.negotiated.clone().unwrap_or_else(|| "version=- cipher=- group=-".into())
    );
}
