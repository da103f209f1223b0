//! Configuration: file (`file.rs`, serde with `deny_unknown_fields`) -> flags override
//! (`flags.rs`) -> `validate` -> the immutable [`Config`] every other module reads.
//! Nothing here binds a port, so `shoald check` and a SIGHUP reload run it safely.

pub mod file;
pub mod flags;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::route::{HostPattern, PathPattern, RouteAction, RouteSpec};
use file::FileConfig;
pub use file::{Algorithm, AllDown, CheckKind, LimitScope, StatusClass, TlsVersion};

/// What went wrong while loading a config, with the file and line when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{where_}: {message}")]
    Invalid { where_: String, message: String },
}

/// One backend as configured (file, flag or the run-time registry).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// Relative share of traffic (1..=1000).
    pub weight: u32,
    /// Failures within `fail_timeout` that eject the backend (0 = never eject passively).
    pub max_fails: u32,
    /// Window for counting failures, and how long a passive ejection lasts.
    pub fail_timeout: Duration,
    /// Cluster-wide cap on in-flight requests (0 = unlimited).
    pub max_conns: u32,
    /// Used only when no primary backend is usable.
    pub backup: bool,
}

impl BackendSpec {
    pub fn new(addr: SocketAddr) -> Self {
        BackendSpec {
            addr,
            weight: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            max_conns: 0,
            backup: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub id: String,
    pub listen: SocketAddr,
    pub control: SocketAddr,
    pub gossip: SocketAddr,
    pub admin: SocketAddr,
    /// Address peers and DNS use for this node.
    pub advertise: IpAddr,
    pub data_dir: Option<PathBuf>,
    pub workers: usize,
    pub drain_timeout: Duration,
    pub leave_grace: Duration,
    pub client_header_timeout: Duration,
    pub max_header_bytes: usize,
    pub keepalive_timeout: Duration,
    pub client_body_timeout: Duration,
    pub send_timeout: Duration,
    pub tunnel_timeout: Duration,
    pub request_buffer_bytes: usize,
}

impl NodeSettings {
    /// Proxy worker threads: `workers`, or one per CPU.
    pub fn proxy_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub id: String,
    pub seeds: Vec<String>,
    /// The shared secret (file contents, trimmed); `None` = unauthenticated, loopback only.
    pub secret: Option<Vec<u8>>,
    pub gossip_interval: Duration,
    /// Bytes per second a member's gossip aims to stay under (0 = no limit); see `cluster::pace`.
    pub gossip_budget: u64,
}

/// The default `cluster.gossip_budget`, bytes per second: a cluster of a few nodes stays well
/// under it and gossips every round; at 50 members exchanges are opened about a third as often.
pub const DEFAULT_GOSSIP_BUDGET: u64 = 8192;

/// One pool: its backends and every setting that applies to them.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `default` for `[upstream]`, else the `NAME` of `[upstreams.NAME]`.
    pub name: String,
    pub algorithm: Algorithm,
    pub keepalive: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub retry_on: Vec<u16>,
    pub retry_budget: f64,
    pub when_all_down: AllDown,
    /// TLS to the backends, when `tls = true`.
    pub tls: Option<UpstreamTlsSettings>,
    pub backends: Vec<BackendSpec>,
    pub health: Option<HealthSettings>,
    pub sticky: Option<StickySettings>,
    pub rate_limit: Option<RateLimitSettings>,
}

/// How to speak TLS to a pool's backends.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTlsSettings {
    /// SNI and the name verified (default: the backend's IP address).
    pub sni: Option<String>,
    /// CA certificates (PEM); `None`: the system's trust store.
    pub ca_file: Option<PathBuf>,
    pub verify: bool,
}

#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub timeout: Duration,
    pub kind: CheckKind,
    pub path: String,
    pub expect: Vec<StatusClass>,
    /// How many live nodes probe each backend, chosen by rendezvous hashing; the others take
    /// the checkers' verdicts from gossip. 0: every node probes every backend.
    pub checkers: u32,
}

#[derive(Debug, Clone)]
pub struct StickySettings {
    pub cookie: String,
    pub expires: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub per_second: f64,
    pub burst: u32,
    pub nodelay: bool,
    pub scope: LimitScope,
}

#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub listen: SocketAddr,
    pub name: String,
    pub ttl: Duration,
}

/// One certificate chain and its key, as files, and where the config names them.
#[derive(Debug, Clone, PartialEq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// "FILE: line N" of the config entry, or "--tls-cert" for flags (for error messages).
    pub named_at: String,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    /// Served in this order of preference when no name matches (the first is the default).
    pub certificates: Vec<CertPaths>,
    pub redirect_http: bool,
    pub min_version: TlsVersion,
    pub handshake_timeout: Duration,
    /// The control port speaks TLS with these certificates.
    pub control: bool,
}

/// The validated configuration of one node. Immutable; a reload builds a new one.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: NodeSettings,
    pub cluster: ClusterSettings,
    /// The default pool (`[upstream]`).
    pub upstream: UpstreamSettings,
    /// The other pools (`[upstreams.NAME]`), by name.
    pub upstreams: Vec<UpstreamSettings>,
    /// `[[route]]`s, in file order.
    pub routes: Vec<RouteSpec>,
    pub dns: Option<DnsSettings>,
    pub access_log: Option<PathBuf>,
    pub tls: Option<TlsSettings>,
    /// The file this came from (reloaded on SIGHUP).
    pub path: Option<PathBuf>,
}

impl Config {
    /// Every pool, the default one first.
    pub fn pools(&self) -> impl Iterator<Item = &UpstreamSettings> {
        std::iter::once(&self.upstream).chain(&self.upstreams)
    }
}

/// The name of the pool `[upstream]` defines.
pub const DEFAULT_POOL: &str = "default";

/// Default ports (PRODUCT.md §2).
pub const DEFAULT_LISTEN: u16 = 8080;
pub const DEFAULT_CONTROL: u16 = 7400;
pub const DEFAULT_GOSSIP: u16 = 7946;
pub const DEFAULT_ADMIN: u16 = 9901;
pub const DEFAULT_TLS_LISTEN: u16 = 8443;

/// 1-based line of byte offset `at` in `src`.
fn line_of(src: &str, at: usize) -> usize {
    src[..at.min(src.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Reads and parses a config file (no validation yet).
pub fn read_file(path: &Path) -> Result<(FileConfig, String), ConfigError> {
    let shown = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    let file = parse_str(&src).map_err(|message| ConfigError::Parse { path: shown, message })?;
    Ok((file, src))
}

/// Parses config text; the error names the line, column and key.
pub fn parse_str(src: &str) -> Result<FileConfig, String> {
    toml::from_str::<FileConfig>(src).map_err(|e| {
        let at = e.span().map(|s| format!("line {}: ", line_of(src, s.start))).unwrap_or_default();
        format!("{at}{}", e.message())
    })
}

/// Loads the file (if any), applies flags over it and validates the result.
pub fn load(path: Option<&Path>, flags: &flags::RunFlags) -> Result<Config, ConfigError> {
    let (file, src) = match path {
        Some(p) => read_file(p)?,
        None => (FileConfig::default(), String::new()),
    };
    let shown = path.map(|p| p.display().to_string()).unwrap_or_else(|| "flags".to_string());
    let mut config = validate(file, &src, &shown, flags)?;
    config.path = path.map(Path::to_path_buf);
    Ok(config)
}

fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "shoal".to_string())
}

/// Merges flags over the file and checks what serde alone cannot (duplicates, cross-field rules).
pub fn validate(file: FileConfig, src: &str, shown: &str, flags: &flags::RunFlags) -> Result<Config, ConfigError> {
    let invalid = |line: Option<usize>, message: String| ConfigError::Invalid {
        where_: match line {
            Some(l) => format!("{shown}: line {l}"),
            None => shown.to_string(),
        },
        message,
    };
    let any = Ipv4Addr::UNSPECIFIED;
    let n = file.node;
    let node_id = flags.node_id.clone().or(n.id).unwrap_or_else(default_node_id);
    if node_id.is_empty()
        || node_id.len() > 64
        || !node_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(None, format!("node id {node_id:?} must be 1-64 characters of [A-Za-z0-9-_.]")));
    }
    let c = file.cluster;
    let secret = match flags.secret_file.clone().or(c.secret_file) {
        Some(p) => {
            let raw = std::fs::read(&p).map_err(|e| invalid(None, format!("secret_file {}: {e}", p.display())))?;
            let trimmed = raw.trim_ascii().to_vec();
            if trimmed.len() < 16 {
                return Err(invalid(
                    None,
                    format!("secret_file {}: the secret must be at least 16 bytes", p.display()),
                ));
            }
            Some(trimmed)
        }
        None => None,
    };
    // Without a secret nobody outside this host may reach gossip or control (PRODUCT.md §5.4).
    let private_default = if secret.is_some() { IpAddr::V4(any) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
    let listen = flags.listen.or(n.listen).unwrap_or(SocketAddr::new(IpAddr::V4(any), DEFAULT_LISTEN));
    let control = flags.control.or(n.control).unwrap_or(SocketAddr::new(private_default, DEFAULT_CONTROL));
    let gossip = flags.gossip.or(n.gossip).unwrap_or(SocketAddr::new(private_default, DEFAULT_GOSSIP));
    let admin = flags.admin.or(n.admin).unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_ADMIN));
    let advertise = match flags.advertise.or(n.advertise) {
        Some(a) => a,
        None if !gossip.ip().is_unspecified() => gossip.ip(),
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let node = NodeSettings {
        id: node_id,
        listen,
        control,
        gossip,
        admin,
        advertise,
        data_dir: flags.data_dir.clone().or(n.data_dir),
        workers: n.workers.unwrap_or(0),
        drain_timeout: n.drain_timeout.map_or(Duration::from_secs(30), |d| d.0),
        leave_grace: n.leave_grace.map_or(Duration::from_secs(1), |d| d.0),
        client_header_timeout: n.client_header_timeout.map_or(Duration::from_secs(10), |d| d.0),
        max_header_bytes: n.max_header_bytes.unwrap_or(16 * 1024),
        // nginx's defaults: keepalive_timeout 75s, client_body_timeout and send_timeout 60s.
        keepalive_timeout: n.keepalive_timeout.map_or(Duration::from_secs(75), |d| d.0),
        client_body_timeout: n.client_body_timeout.map_or(Duration::from_secs(60), |d| d.0),
        send_timeout: n.send_timeout.map_or(Duration::from_secs(60), |d| d.0),
        // HAProxy's documented example value for `timeout tunnel` (WebSocket idles are long).
        tunnel_timeout: n.tunnel_timeout.map_or(Duration::from_secs(3600), |d| d.0),
        // Enough for the forms and JSON bodies most requests carry, like nginx's buffering.
        request_buffer_bytes: n.request_buffer_bytes.unwrap_or(64 * 1024),
    };
    for (key, d) in [
        ("client_header_timeout", node.client_header_timeout),
        ("keepalive_timeout", node.keepalive_timeout),
        ("client_body_timeout", node.client_body_timeout),
        ("send_timeout", node.send_timeout),
        ("tunnel_timeout", node.tunnel_timeout),
    ] {
        if d.is_zero() {
            return Err(invalid(None, format!("node.{key} must be greater than zero")));
        }
    }
    if node.max_header_bytes < 1024 {
        return Err(invalid(None, "node.max_header_bytes must be at least 1024".into()));
    }
    let gossip_interval = c.gossip_interval.map_or(Duration::from_millis(150), |d| d.0);
    if gossip_interval < Duration::from_millis(20) || gossip_interval > Duration::from_secs(5) {
        return Err(invalid(None, "cluster.gossip_interval must be between 20ms and 5s".into()));
    }
    let gossip_budget = c.gossip_budget.unwrap_or(DEFAULT_GOSSIP_BUDGET);
    if gossip_budget != 0 && gossip_budget < 1024 {
        return Err(invalid(
            None,
            "cluster.gossip_budget must be 0 (no limit) or at least 1024 bytes per second".into(),
        ));
    }
    let mut seeds = c.seeds;
    seeds.extend(flags.seeds.iter().cloned());
    let cluster = ClusterSettings {
        id: flags.cluster_id.clone().or(c.id).unwrap_or_else(|| "shoal".to_string()),
        seeds,
        secret,
        gossip_interval,
        gossip_budget,
    };

    let mut u = file.upstream;
    for (table, given) in [
        ("health", u.health.is_some() && file.health.is_some()),
        ("sticky", u.sticky.is_some() && file.sticky.is_some()),
        ("rate_limit", u.rate_limit.is_some() && file.rate_limit.is_some()),
    ] {
        if given {
            return Err(invalid(None, format!("[{table}] and [upstream.{table}] both given: keep one")));
        }
    }
    u.health = u.health.or(file.health);
    u.sticky = u.sticky.or(file.sticky);
    u.rate_limit = u.rate_limit.or(file.rate_limit);
    let mut upstream = pool_settings(DEFAULT_POOL, u, src, &invalid, Some(flags))?;
    let mut upstreams = Vec::new();
    for (name, spanned) in file.upstreams {
        let line = Some(line_of(src, spanned.span().start));
        if let Err(why) = check_pool_name(&name) {
            return Err(invalid(line, why));
        }
        upstreams.push(pool_settings(&name, spanned.into_inner(), src, &invalid, None)?);
    }
    let mut routes: Vec<RouteSpec> = Vec::new();
    for spanned in &file.route {
        let line = Some(line_of(src, spanned.span().start));
        let spec = route_spec(spanned.get_ref()).map_err(|why| invalid(line, why))?;
        if let RouteAction::Pool { upstream: name, .. } = &spec.action {
            let pool = std::iter::once(&upstream).chain(&upstreams).find(|p| p.name == *name);
            match pool {
                None => {
                    return Err(invalid(
                        line,
                        format!(
                            "route {} names pool {name:?}, which is not defined (add [upstreams.{name}])",
                            spec.describe()
                        ),
                    ));
                }
                Some(p) if p.backends.is_empty() => {
                    return Err(invalid(
                        line,
                        format!("route {} names pool {name:?}, which has no backends", spec.describe()),
                    ));
                }
                Some(_) => {}
            }
        }
        if routes.iter().any(|r| r.host == spec.host && r.path == spec.path) {
            return Err(invalid(line, format!("route {} is given twice (same host and path)", spec.describe())));
        }
        routes.push(spec);
    }
    // The default pool's sticky cookie comes from `--algorithm cookie` too.
    if upstream.sticky.is_none() && upstream.algorithm == Algorithm::Cookie {
        upstream.sticky = Some(StickySettings { cookie: "shoal_backend".into(), expires: None });
    }
    // Each DNS flag overrides its own key; `--dns-listen` alone turns the responder on.
    let dns = match (file.dns, flags.dns_listen) {
        (None, None) => None,
        (file_dns, flag_listen) => {
            let (file_listen, file_name, file_ttl) = match file_dns {
                Some(d) => (Some(d.listen), Some(d.name), d.ttl.map(|t| t.0)),
                None => (None, None, None),
            };
            let listen = flag_listen.or(file_listen).ok_or_else(|| invalid(None, "[dns] needs listen".into()))?;
            let name = flags.dns_name.clone().or(file_name).unwrap_or_else(|| "lb.shoal.internal".into());
            Some(DnsSettings { listen, name, ttl: file_ttl.unwrap_or(Duration::from_secs(5)) })
        }
    };
    let tls = tls_settings(file.tls, src, shown, flags, listen.ip())?;
    Ok(Config {
        node,
        cluster,
        upstream,
        upstreams,
        routes,
        dns,
        access_log: file.access_log.map(|a| a.path),
        tls,
        path: None,
    })
}

/// One pool's settings from its table (`[upstream]` with the top-level `[health]`, `[sticky]`
/// and `[rate_limit]` merged in, or `[upstreams.NAME]`). `flags` only for the default pool:
/// `--backend` and `--algorithm` apply to it.
fn pool_settings(
    name: &str,
    u: file::UpstreamFile,
    src: &str,
    invalid: &dyn Fn(Option<usize>, String) -> ConfigError,
    flags: Option<&flags::RunFlags>,
) -> Result<UpstreamSettings, ConfigError> {
    let table = if name == DEFAULT_POOL { "upstream".to_string() } else { format!("upstreams.{name}") };
    let mut backends = Vec::new();
    match flags.filter(|f| !f.backends.is_empty()) {
        None => {
            for spanned in &u.backend {
                let line = Some(line_of(src, spanned.span().start));
                let b = spanned.get_ref();
                let spec = BackendSpec {
                    addr: b.addr,
                    weight: b.weight.map_or(1, |w| w.0),
                    max_fails: b.max_fails.unwrap_or(1),
                    fail_timeout: b.fail_timeout.map_or(Duration::from_secs(10), |d| d.0),
                    max_conns: b.max_conns.unwrap_or(0),
                    backup: b.backup,
                };
                if backends.iter().any(|o: &BackendSpec| o.addr == spec.addr) {
                    return Err(invalid(line, format!("backend {} is listed twice", spec.addr)));
                }
                backends.push(spec);
            }
        }
        Some(flags) => {
            for spec in &flags.backends {
                if backends.iter().any(|o: &BackendSpec| o.addr == spec.addr) {
                    return Err(invalid(None, format!("--backend {} is given twice", spec.addr)));
                }
                backends.push(spec.clone());
            }
        }
    }
    let algorithm = flags.and_then(|f| f.algorithm).or(u.algorithm).unwrap_or_default();
    let retry_budget = u.retry_budget.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&retry_budget) {
        return Err(invalid(None, format!("{table}.retry_budget {retry_budget} must be between 0 and 1")));
    }
    if !u.tls && (u.sni.is_some() || u.ca_file.is_some() || u.verify.is_some()) {
        return Err(invalid(None, format!("{table}.sni, ca_file and verify need {table}.tls = true")));
    }
    let health = u.health.map(|h| HealthSettings {
        interval: h.interval.map_or(Duration::from_secs(3), |d| d.0),
        rise: h.rise.map_or(2, |c| c.0),
        fall: h.fall.map_or(3, |c| c.0),
        timeout: h.timeout.map_or(Duration::from_secs(1), |d| d.0),
        kind: h.kind.unwrap_or_default(),
        path: h.path.map_or_else(|| "/".to_string(), |p| p.0),
        expect: h.expect.unwrap_or_else(|| vec![StatusClass::Class(2), StatusClass::Class(3)]),
        checkers: h.checkers.unwrap_or(2),
    });
    let health_table = if name == DEFAULT_POOL { "health".to_string() } else { format!("{table}.health") };
    if let Some(h) = &health {
        if h.interval < Duration::from_millis(50) {
            return Err(invalid(None, format!("{health_table}.interval must be at least 50ms")));
        }
        if h.timeout.is_zero() {
            return Err(invalid(None, format!("{health_table}.timeout must be greater than zero")));
        }
    }
    let sticky = match (u.sticky, algorithm) {
        (Some(s), _) => Some(StickySettings { cookie: s.cookie.0, expires: s.expires.map(|d| d.0) }),
        (None, Algorithm::Cookie) => Some(StickySettings { cookie: "shoal_backend".into(), expires: None }),
        (None, _) => None,
    };
    let rate_limit = u.rate_limit.map(|r| RateLimitSettings {
        per_second: r.rate.per_second,
        burst: r.burst.unwrap_or(0),
        nodelay: r.nodelay,
        scope: r.scope.unwrap_or_default(),
    });
    let settings = UpstreamSettings {
        name: name.to_string(),
        algorithm,
        keepalive: u.keepalive.unwrap_or(32),
        connect_timeout: u.connect_timeout.map_or(Duration::from_secs(5), |d| d.0),
        read_timeout: u.read_timeout.map_or(Duration::from_secs(60), |d| d.0),
        retries: u.retries.unwrap_or(2),
        retry_on: u.retry_on.unwrap_or_default().into_iter().map(|r| r.0).collect(),
        retry_budget,
        when_all_down: u.when_all_down.unwrap_or_default(),
        tls: u.tls.then(|| UpstreamTlsSettings {
            sni: u.sni.clone(),
            ca_file: u.ca_file.clone(),
            verify: u.verify.unwrap_or(true),
        }),
        backends,
        health,
        sticky,
        rate_limit,
    };
    if settings.connect_timeout.is_zero() || settings.read_timeout.is_zero() {
        return Err(invalid(None, format!("{table} timeouts must be greater than zero")));
    }
    Ok(settings)
}

/// The settings of a pool no config table defines (one that only the registry or a route
/// names): every key at its default, no backends of its own.
pub fn pool_defaults(name: &str) -> UpstreamSettings {
    let no_error = |_: Option<usize>, message: String| ConfigError::Invalid { where_: String::new(), message };
    match pool_settings(name, file::UpstreamFile::default(), "", &no_error, None) {
        Ok(s) => s,
        // Unreachable: the defaults are valid; a pool with them is still better than none.
        Err(_) => unreachable!("the default pool settings are valid"),
    }
}

/// Pool names: what `[upstreams.NAME]`, routes, gossip keys and metric labels carry.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    if name == DEFAULT_POOL {
        return Err("[upstreams.default] is [upstream]: the pool named \"default\" is written as [upstream]".into());
    }
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!("pool name {name:?} must be 1-64 characters of [A-Za-z0-9-_]"));
    }
    Ok(())
}

/// A route as the file writes it -> a checked [`RouteSpec`] (the pool it names is checked by
/// the caller).
pub fn route_spec(r: &file::RouteFile) -> Result<RouteSpec, String> {
    let host = HostPattern::parse(r.host.as_deref())?;
    let path = PathPattern::parse(r.path.as_deref())?;
    let action = match (&r.upstream, &r.redirect) {
        (Some(_), Some(_)) => return Err("a route takes upstream or redirect, not both".into()),
        (None, None) => return Err("a route needs upstream = \"POOL\" or redirect = \"ORIGIN\"".into()),
        (Some(name), None) => {
            if name != DEFAULT_POOL {
                check_pool_name(name)?;
            }
            RouteAction::Pool { upstream: name.clone(), strip_prefix: r.strip_prefix }
        }
        (None, Some(origin)) => {
            if r.strip_prefix {
                return Err("strip_prefix applies to a route to a pool, not to a redirect".into());
            }
            RouteAction::Redirect { origin: crate::route::parse_origin(origin)? }
        }
    };
    Ok(RouteSpec { host, path, action })
}

/// `[tls]` with the `--tls-*` flags over it: `--tls-listen` alone (with certificate flags)
/// turns TLS on; certificate flags replace the file's list. The files themselves are read by
/// `crate::tls` (`shoald check` and start fail there, naming the file).
fn tls_settings(
    file: Option<file::TlsFile>,
    src: &str,
    shown: &str,
    flags: &flags::RunFlags,
    listen_ip: IpAddr,
) -> Result<Option<TlsSettings>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { where_: shown.to_string(), message };
    if flags.tls_certs.len() != flags.tls_keys.len() {
        return Err(invalid(format!(
            "--tls-cert and --tls-key come in pairs: {} certificates, {} keys",
            flags.tls_certs.len(),
            flags.tls_keys.len()
        )));
    }
    if file.is_none() && flags.tls_listen.is_none() && flags.tls_certs.is_empty() {
        return Ok(None);
    }
    let file = file.unwrap_or(file::TlsFile {
        listen: None,
        certificates: Vec::new(),
        redirect_http: false,
        min_version: None,
        handshake_timeout: None,
        control: false,
    });
    let certificates: Vec<CertPaths> = if flags.tls_certs.is_empty() {
        file.certificates
            .iter()
            .map(|c| CertPaths {
                cert: c.get_ref().cert.clone(),
                key: c.get_ref().key.clone(),
                named_at: format!("{shown}: line {}", line_of(src, c.span().start)),
            })
            .collect()
    } else {
        flags
            .tls_certs
            .iter()
            .zip(&flags.tls_keys)
            .map(|(cert, key)| CertPaths { cert: cert.clone(), key: key.clone(), named_at: "--tls-cert".into() })
            .collect()
    };
    if file.control && certificates.is_empty() {
        return Err(invalid("tls.control needs a certificate file to serve on the control port".into()));
    }
    let handshake_timeout = file.handshake_timeout.map_or(Duration::from_secs(10), |d| d.0);
    if handshake_timeout.is_zero() {
        return Err(invalid("tls.handshake_timeout must be greater than zero".into()));
    }
    Ok(Some(TlsSettings {
        listen: flags.tls_listen.or(file.listen).unwrap_or(SocketAddr::new(listen_ip, DEFAULT_TLS_LISTEN)),
        certificates,
        redirect_http: file.redirect_http,
        min_version: file.min_version.unwrap_or_default(),
        handshake_timeout,
        control: file.control,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str) -> Result<Config, String> {
        let file = parse_str(src)?;
        validate(file, src, "t.toml", &flags::RunFlags::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn full_example_parses() {
        let c = check(
            r#"
[node]
id = "lb-1"
listen = "0.0.0.0:8080"
[cluster]
id = "prod"
seeds = ["10.0.0.2:7946"]
[upstream]
algorithm = "round-robin"
keepalive = 16
connect_timeout = "2s"
retries = 1
retry_on = ["502", "503"]
[[upstream.backend]]
addr = "10.132.2.31:8000"
weight = 3
max_fails = 3
fail_timeout = "30s"
max_conns = 1000
[[upstream.backend]]
addr = "10.132.6.88:8000"
backup = true
[health]
interval = "3s"
rise = 2
fall = 3
type = "http"
path = "/health"
expect = ["2xx", "302"]
[rate_limit]
rate = "10r/s"
burst = 20
nodelay = true
"#,
        )
        .unwrap();
        assert_eq!(c.node.id, "lb-1");
        assert_eq!(c.upstream.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.upstream.backends.len(), 2);
        assert_eq!(c.upstream.backends[0].weight, 3);
        assert!(c.upstream.backends[1].backup);
        assert_eq!(c.upstream.retry_on, vec![502, 503]);
        assert_eq!(c.upstream.rate_limit.clone().unwrap().per_second, 10.0);
        // no secret: control and gossip default to loopback
        assert!(c.node.control.ip().is_loopback());
    }

    #[test]
    fn gossip_budget() {
        let budget = |toml: &str| check(&format!("[cluster]\n{toml}\n")).map(|c| c.cluster.gossip_budget);
        assert_eq!(budget(""), Ok(DEFAULT_GOSSIP_BUDGET));
        assert_eq!(budget("gossip_budget = 0"), Ok(0));
        assert_eq!(budget("gossip_budget = 65536"), Ok(65536));
        let e = budget("gossip_budget = 100").unwrap_err();
        assert!(e.contains("cluster.gossip_budget must be 0 (no limit) or at least 1024"), "{e}");
        assert!(budget("gossip_budget = -1").is_err());
    }

    #[test]
    fn pools_and_routes() {
        let c = check(
            r#"
[upstream]
[[upstream.backend]]
addr = "10.0.0.1:80"
[sticky]
cookie = "srv"
[upstreams.api]
algorithm = "round-robin"
retries = 0
[[upstreams.api.backend]]
addr = "10.0.0.7:9000"
[[upstreams.api.backend]]
addr = "10.0.0.1:80"
[upstreams.api.health]
path = "/healthz"
[upstreams.api.rate_limit]
rate = "5r/s"
[[route]]
host = "API.example.com"
path = "/v1/"
upstream = "api"
strip_prefix = true
[[route]]
host = "old.example.com"
redirect = "https://www.example.com/"
[[route]]
path = "=/healthz"
upstream = "default"
"#,
        )
        .unwrap();
        let names: Vec<&str> = c.pools().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default", "api"]);
        assert_eq!(c.upstream.sticky.as_ref().unwrap().cookie, "srv");
        let api = &c.upstreams[0];
        assert_eq!((api.algorithm, api.retries, api.backends.len()), (Algorithm::RoundRobin, 0, 2));
        assert_eq!(api.health.as_ref().unwrap().path, "/healthz");
        assert!(api.sticky.is_none() && api.rate_limit.is_some() && c.upstream.health.is_none());
        assert_eq!(c.routes.len(), 3);
        assert_eq!(c.routes[0].host, HostPattern::Exact("api.example.com".into()));
        assert_eq!(c.routes[0].action, RouteAction::Pool { upstream: "api".into(), strip_prefix: true });
        assert_eq!(c.routes[1].action, RouteAction::Redirect { origin: "https://www.example.com".into() });
        assert_eq!(c.routes[2].path, PathPattern::Exact("/healthz".into()));
        // `[upstream.health]` is the default pool's `[health]` too, but not both
        let c = check("[upstream.health]\npath = \"/up\"\n").unwrap();
        assert_eq!(c.upstream.health.unwrap().path, "/up");
        assert!(check("[health]\n[upstream.health]\n").unwrap_err().contains("keep one"));
    }

    #[test]
    fn bad_pools_and_routes_name_the_line() {
        let pool = "[upstreams.api]\n[[upstreams.api.backend]]\naddr = \"10.0.0.7:9000\"\n";
        let cases = [
            (
                format!("{pool}[[route]]\npath = \"/x/\"\nupstream = \"nope\"\n"),
                "line 4: route */x/ names pool \"nope\", which is not defined",
            ),
            (
                "[upstreams.api]\n[[route]]\nupstream = \"api\"\n".to_string(),
                "line 2: route */ names pool \"api\", which has no backends",
            ),
            (
                format!(
                    "{pool}[[route]]\nhost = \"a.example\"\nupstream = \"api\"\n[[route]]\nhost = \"A.example\"\nupstream = \"api\"\n"
                ),
                "line 7: route a.example/ is given twice",
            ),
            (format!("{pool}[[route]]\nhost = \"a b\"\nupstream = \"api\"\n"), "line 4:"),
            (format!("{pool}[[route]]\nupstream = \"api\"\nredirect = \"https://x.example\"\n"), "not both"),
            ("[[route]]\npath = \"/x/\"\n".to_string(), "needs upstream"),
            ("[[route]]\nredirect = \"ftp://x.example\"\n".to_string(), "line 1:"),
            ("[[route]]\nredirect = \"https://x.example\"\nstrip_prefix = true\n".to_string(), "not to a redirect"),
            ("[upstreams.default]\n".to_string(), "is [upstream]"),
            ("[upstreams.\"a/b\"]\n".to_string(), "line 1: pool name \"a/b\""),
            ("[upstreams.api]\nalgorithm = \"fastest\"\n".to_string(), "line 2"),
            ("[upstreams.api]\nretry_budget = 2.0\n".to_string(), "upstreams.api.retry_budget"),
            ("[upstreams.api.health]\ninterval = \"1ms\"\n".to_string(), "upstreams.api.health.interval"),
            (
                "[[upstreams.api.backend]]\naddr = \"10.0.0.1:1\"\n[[upstreams.api.backend]]\naddr = \"10.0.0.1:1\"\n"
                    .to_string(),
                "line 3: backend 10.0.0.1:1 is listed twice",
            ),
        ];
        for (src, want) in cases {
            let err = check(&src).expect_err(&src);
            assert!(err.contains(want), "config {src:?}: error {err:?} should contain {want:?}");
        }
    }

    #[test]
    fn dns_flags_override_single_keys() {
        let src = "[dns]\nlisten = \"127.0.0.1:5353\"\nname = \"lb.file.internal\"\nttl = \"1s\"\n";
        let flags = flags::RunFlags { dns_listen: Some("127.0.0.1:5354".parse().unwrap()), ..Default::default() };
        let c = validate(parse_str(src).unwrap(), src, "t.toml", &flags).unwrap();
        let d = c.dns.unwrap();
        assert_eq!(d.listen.port(), 5354);
        assert_eq!(d.name, "lb.file.internal");
        assert_eq!(d.ttl, Duration::from_secs(1));
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let cases = [
            ("[upstream]\nalgorithm = \"fastest\"\n", "line 2"),
            ("[node]\nlisten = \"nowhere\"\n", "line 2"),
            ("[upstream]\nconnect_timeout = \"5 parsecs\"\n", "bad duration"),
            ("[[upstream.backend]]\naddr = \"127.0.0.1:1\"\nweight = 0\n", "weight 0 out of range"),
            ("[upstream]\nkeeplive = 3\n", "unknown field `keeplive`"),
            ("[health]\nrise = 0\n", "line 2"),
            ("[rate_limit]\nrate = \"10 per second\"\n", "bad rate"),
            (
                "[[upstream.backend]]\naddr = \"127.0.0.1:1\"\n[[upstream.backend]]\naddr = \"127.0.0.1:1\"\n",
                "line 3: backend 127.0.0.1:1 is listed twice",
            ),
            ("[health]\nexpect = [\"7xx\"]\n", "bad status"),
            ("[upstream]\nretry_on = [\"404\"]\n", "retry_on takes"),
            ("[node\n", "line 1"),
        ];
        for (src, want) in cases {
            let err = check(src).expect_err(src);
            assert!(err.contains(want), "config {src:?}: error {err:?} should contain {want:?}");
        }
    }
}
