//! HTTPS termination: the certificates a node serves and the rustls server config its TLS
//! listener uses (PRODUCT.md §9).
//!
//! - `certs`: PEM files or registry entries -> a servable certificate and what it says of itself;
//! - `sni`: the immutable name -> certificate table the handshake reads (exact, wildcard, first);
//! - `tickets`: session-ticket keys derived from the cluster secret, so any node resumes a
//!   session another node started;
//! - `upstream`: TLS to backends (`[upstream] tls = true`).
//!
//! Certificates come from two places: the files `[tls] certificates` (or `--tls-cert/--tls-key`)
//! names, re-read when they change on disk (checked every `WATCH_EVERY`) and on SIGHUP; and the
//! cluster's registry (`shoal cert add`), pushed here by the cluster task. Every change builds a
//! new [`sni::SniTable`] and swaps it in; a handshake in progress keeps the table it started
//! with, so no handshake fails during a change. A file that does not load (malformed, a key of
//! another certificate, expired, half-written) keeps the certificate loaded before it, and the
//! log says why. HTTP/2 and HTTP/1.1 are offered by ALPN; TLS 1.2 and 1.3 only, with rustls's
//! default cipher suites (AEAD only, forward secret only).

pub mod certs;
pub mod sni;
pub mod tickets;
pub mod upstream;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::config::{CertPaths, TlsSettings, TlsVersion};
use certs::{CertInfo, Loaded};
use sni::{Resolver, SniTable};

/// How often certificate files are checked for changes.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Certificates closer than this to expiry are warned about in the log (like most ACME
/// clients' renewal window).
pub const WARN_DAYS: i64 = 14;

/// A file's identity for change detection: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(p: &std::path::Path) -> Stamp {
    std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// One configured certificate file pair and what was last loaded from it.
struct FileCert {
    paths: CertPaths,
    stamps: (Stamp, Stamp),
    loaded: Option<Loaded>,
}

/// Counters of the TLS listener.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes: AtomicU64,
    pub resumed: AtomicU64,
    /// Handshakes that failed (bad client hello, no shared version or cipher, garbage).
    pub failed: AtomicU64,
    /// Handshakes not finished within `handshake_timeout`.
    pub timed_out: AtomicU64,
    /// Connections the client closed before the handshake ended (port checks, given up).
    pub closed: AtomicU64,
}

/// A node's TLS state: the certificates and the server config.
pub struct Tls {
    table: Arc<ArcSwap<SniTable>>,
    server: Arc<ServerConfig>,
    /// The control port's config (`[tls] control = true`): the same certificates, ALPN h2.
    control: Arc<ServerConfig>,
    files: Mutex<Vec<FileCert>>,
    cluster: Mutex<Vec<Loaded>>,
    pub settings: ArcSwap<TlsSettings>,
    pub stats: TlsStats,
    /// Whether ticket keys are shared by the cluster (derived from its secret).
    pub shared_tickets: bool,
}

impl Tls {
    /// Loads every configured certificate (any failure is an error naming the file and the
    /// config line) and builds the server config.
    pub fn new(settings: &TlsSettings, secret: Option<&[u8]>) -> Result<Tls, String> {
        let mut files = Vec::new();
        for paths in &settings.certificates {
            let loaded = certs::load_files(&paths.cert, &paths.key).map_err(|e| format!("{}: {e}", paths.named_at))?;
            let stamps = (stamp(&paths.cert), stamp(&paths.key));
            files.push(FileCert { paths: paths.clone(), stamps, loaded: Some(loaded) });
        }
        let table = Arc::new(ArcSwap::from_pointee(SniTable::default()));
        let tickets = Arc::new(tickets::ClusterTickets::new(secret));
        let shared_tickets = tickets.shared;
        let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(table.clone())));
        server.ticketer = tickets;
        // A few tickets per handshake let a browser open parallel connections that all resume.
        server.send_tls13_tickets = 2;
        let mut control = server.clone();
        control.alpn_protocols = vec![b"h2".to_vec()];
        // http/1.0 last: a client that offers only it (curl --http1.0) is served, not refused
        // with no_application_protocol (nginx serves it too).
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        let tls = Tls {
            table,
            server: Arc::new(server),
            control: Arc::new(control),
            files: Mutex::new(files),
            cluster: Mutex::new(Vec::new()),
            settings: ArcSwap::from_pointee(settings.clone()),
            stats: TlsStats::default(),
            shared_tickets,
        };
        tls.publish();
        Ok(tls)
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The control port's server config (ALPN h2 only).
    pub fn control_server_config(&self) -> Arc<ServerConfig> {
        self.control.clone()
    }

    /// How this node calls a peer's control port: TLS, trusting the certificates this node
    /// serves itself (peers of one cluster serve the same set).
    pub fn control_client(&self) -> Result<shoal_proto::ControlTls, String> {
        let config = upstream::pinned_to(self.table.clone())?;
        let name = rustls::pki_types::ServerName::try_from("shoal-control").map_err(|e| e.to_string())?;
        Ok(shoal_proto::ControlTls { config: Arc::new(config), server_name: name })
    }

    /// Whether a connection whose client sent SNI `sni` may carry requests for `host`.
    pub fn serves(&self, sni: &str, host: &[u8]) -> bool {
        self.table.load().serves(sni, host)
    }

    /// Whether some certificate served now has a name that covers `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.table.load().covers(name)
    }

    /// Every certificate served now, files first.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.table.load().certs().iter().map(|c| c.info.clone()).collect()
    }

    fn publish(&self) {
        let mut all: Vec<Loaded> = lock(&self.files).iter().filter_map(|f| f.loaded.clone()).collect();
        all.extend(lock(&self.cluster).iter().cloned());
        self.table.store(Arc::new(SniTable::new(all)));
    }

    /// Re-reads certificate files that changed on disk (all of them when `force`, as on
    /// SIGHUP). A file that does not load keeps the certificate loaded before; the log says
    /// why. Returns how many certificates were replaced.
    pub fn reload_files(&self, force: bool) -> usize {
        let mut replaced = 0;
        {
            let mut files = lock(&self.files);
            for f in files.iter_mut() {
                let stamps = (stamp(&f.paths.cert), stamp(&f.paths.key));
                if !force && stamps == f.stamps {
                    continue;
                }
                f.stamps = stamps;
                match certs::load_files(&f.paths.cert, &f.paths.key) {
                    Ok(l) if f.loaded.as_ref().is_some_and(|old| same_cert(old, &l)) => {}
                    Ok(l) => {
                        tracing::info!(cert = %f.paths.cert.display(), name = %l.info.name, not_after = %certs::date(l.info.not_after), "certificate loaded");
                        f.loaded = Some(l);
                        replaced += 1;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "certificate file not loaded; still serving the one loaded before");
                    }
                }
            }
        }
        if replaced > 0 {
            self.publish();
        }
        replaced
    }

    /// Takes a reloaded config's `[tls]`: new or removed certificate pairs, and the settings a
    /// reload can change (`redirect_http`, `handshake_timeout`). The listener address and
    /// `min_version` change on restart only.
    pub fn apply_settings(&self, new: &TlsSettings) {
        let old = self.settings.load_full();
        if old.listen != new.listen || old.min_version != new.min_version || old.control != new.control {
            tracing::warn!("tls.listen, min_version and control change only on restart; keeping the old ones");
        }
        {
            let mut files = lock(&self.files);
            let mut next = Vec::new();
            for paths in &new.certificates {
                let pos = files.iter().position(|f| f.paths.cert == paths.cert && f.paths.key == paths.key);
                match pos {
                    Some(i) => {
                        let mut f = files.swap_remove(i);
                        f.paths = paths.clone();
                        next.push(f);
                    }
                    None => next.push(FileCert { paths: paths.clone(), stamps: (None, None), loaded: None }),
                }
            }
            *files = next;
        }
        let mut settings = new.clone();
        settings.listen = old.listen;
        settings.min_version = old.min_version;
        settings.control = old.control;
        self.settings.store(Arc::new(settings));
        // Re-reading publishes what it replaced; a pair that only went away needs a publish.
        if self.reload_files(true) == 0 {
            self.publish();
        }
    }

    /// Replaces the certificates that came from the cluster's registry.
    pub fn set_cluster_certs(&self, certs: Vec<Loaded>) {
        *lock(&self.cluster) = certs;
        self.publish();
    }

    /// Logs a warning for every certificate that expires within `WARN_DAYS`.
    pub fn warn_expiring(&self) {
        let now = certs::unix_now();
        for c in self.certificates() {
            let days = c.days_left(now);
            if days < WARN_DAYS {
                tracing::warn!(name = %c.name, source = %c.source, days_left = days, not_after = %certs::date(c.not_after), "certificate expires soon");
            }
        }
    }
}

/// Watches the certificate files (every `WATCH_EVERY`) and warns of expiry (hourly) until
/// `stop` fires.
pub async fn watch(tls: Arc<Tls>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    let mut last_warned: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let tls2 = tls.clone();
        // File reads off the runtime's thread.
        let _ = tokio::task::spawn_blocking(move || tls2.reload_files(false)).await;
        if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            tls.warn_expiring();
            last_warned = Some(tokio::time::Instant::now());
        }
    }
}

fn same_cert(a: &Loaded, b: &Loaded) -> bool {
    a.key.cert == b.key.cert
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
