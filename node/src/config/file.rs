//! The TOML config file as written by people: serde structs with `deny_unknown_fields`, and
//! value types (durations, rates, status classes) that reject bad values while parsing, so the
//! toml error carries the line and column of the offending key.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};

/// The whole file. Every table is optional; defaults mirror nginx where nginx has one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub node: NodeFile,
    #[serde(default)]
    pub cluster: ClusterFile,
    #[serde(default)]
    pub upstream: UpstreamFile,
    /// More pools (`[upstreams.NAME]`), each with every key of `[upstream]`.
    #[serde(default)]
    pub upstreams: std::collections::BTreeMap<String, toml::Spanned<UpstreamFile>>,
    /// `[[route]]`: host and path to a pool, or a redirect.
    #[serde(default)]
    pub route: Vec<toml::Spanned<RouteFile>>,
    pub health: Option<HealthFile>,
    pub sticky: Option<StickyFile>,
    pub rate_limit: Option<RateLimitFile>,
    pub dns: Option<DnsFile>,
    pub access_log: Option<AccessLogFile>,
    pub tls: Option<TlsFile>,
}

/// `[node]`: this node's identity, listeners and shutdown timing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub id: Option<String>,
    pub listen: Option<SocketAddr>,
    pub control: Option<SocketAddr>,
    pub gossip: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub advertise: Option<std::net::IpAddr>,
    pub data_dir: Option<PathBuf>,
    /// Proxy worker threads (0 = one per CPU); gossip, control and admin share one more.
    pub workers: Option<usize>,
    /// How long a leaving node waits for in-flight requests.
    pub drain_timeout: Option<Dur>,
    /// How long a leaving node keeps accepting after it announced `draining`.
    pub leave_grace: Option<Dur>,
    /// A client must send its request headers within this time.
    pub client_header_timeout: Option<Dur>,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: Option<usize>,
    /// How long a kept-alive client connection (HTTP/1.1, or HTTP/2 with no open stream) may
    /// sit idle (nginx's `keepalive_timeout`).
    pub keepalive_timeout: Option<Dur>,
    /// How long a client may send nothing while its request body is expected (nginx's
    /// `client_body_timeout`).
    pub client_body_timeout: Option<Dur>,
    /// How long a write to a client may wait for it to read (nginx's `send_timeout`).
    pub send_timeout: Option<Dur>,
    /// How long an upgraded connection (WebSocket) may carry nothing either way (HAProxy's
    /// `timeout tunnel`).
    pub tunnel_timeout: Option<Dur>,
    /// Request bodies up to this many bytes are read whole before a backend is picked (nginx's
    /// `proxy_request_buffering`); larger ones stream. 0 = always stream.
    pub request_buffer_bytes: Option<usize>,
}

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub id: Option<String>,
    #[serde(default)]
    pub seeds: Vec<String>,
    pub secret_file: Option<PathBuf>,
    /// Gossip round period; failure detection scales with it.
    pub gossip_interval: Option<Dur>,
    /// Bytes per second a member's gossip aims to stay under; 0 = no limit.
    pub gossip_budget: Option<u64>,
}

/// `[upstream]` and its `[[upstream.backend]]` entries.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub algorithm: Option<Algorithm>,
    /// Idle upstream connections kept per backend per proxy worker, on average: a worker keeps
    /// `keepalive` x backends, shared (like nginx's per-worker `keepalive`); a burst's extra
    /// connections stay until they went unused for a second (`pool::conn`).
    pub keepalive: Option<usize>,
    pub connect_timeout: Option<Dur>,
    pub read_timeout: Option<Dur>,
    pub retries: Option<u32>,
    /// Response statuses that make an idempotent request try the next backend.
    pub retry_on: Option<Vec<RetryStatus>>,
    /// Retries allowed as a fraction of requests (a budget, so a dying pool is not hammered).
    pub retry_budget: Option<f64>,
    /// When no backend is usable at all: "503" (default) or "open" (try every backend anyway).
    pub when_all_down: Option<AllDown>,
    /// Speak TLS to the backends (HTTP/1.1 over TLS; verified by default).
    #[serde(default)]
    pub tls: bool,
    /// The name sent in SNI and verified in the backends' certificates (default: their IP).
    pub sni: Option<String>,
    /// PEM file of the CAs that sign the backends' certificates (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Verify the backends' certificates (default true; false trusts any certificate).
    pub verify: Option<bool>,
    #[serde(default)]
    pub backend: Vec<toml::Spanned<BackendFile>>,
    /// The pool's active checks (`[upstreams.NAME.health]`; `[health]` for the default pool).
    pub health: Option<HealthFile>,
    /// The pool's sticky cookie (`[upstreams.NAME.sticky]`; `[sticky]` for the default pool).
    pub sticky: Option<StickyFile>,
    /// The pool's rate limit (`[upstreams.NAME.rate_limit]`; `[rate_limit]` for the default).
    pub rate_limit: Option<RateLimitFile>,
}

/// One `[[route]]`: which requests (host, path) go to which pool, or are redirected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// An exact host name or `*.suffix`; absent: any host.
    pub host: Option<String>,
    /// `=/exact` or a prefix; absent: `/`.
    pub path: Option<String>,
    /// The pool that serves the matching requests.
    pub upstream: Option<String>,
    /// The backend sees the path without the route's prefix.
    #[serde(default)]
    pub strip_prefix: bool,
    /// 308 to this origin plus the request's path and query.
    pub redirect: Option<String>,
}

/// One `[[upstream.backend]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub addr: SocketAddr,
    pub weight: Option<Weight>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<Dur>,
    pub max_conns: Option<u32>,
    #[serde(default)]
    pub backup: bool,
}

/// `[health]`: active checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub interval: Option<Dur>,
    pub rise: Option<Count>,
    pub fall: Option<Count>,
    pub timeout: Option<Dur>,
    #[serde(rename = "type")]
    pub kind: Option<CheckKind>,
    pub path: Option<HttpPath>,
    pub expect: Option<Vec<StatusClass>>,
    /// How many nodes check each backend (0 = every node).
    pub checkers: Option<u32>,
}

/// `[sticky]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyFile {
    pub cookie: CookieName,
    pub expires: Option<Dur>,
}

/// `[rate_limit]`, like nginx `limit_req`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub rate: Rate,
    pub burst: Option<u32>,
    #[serde(default)]
    pub nodelay: bool,
    pub key: Option<LimitKey>,
    pub scope: Option<LimitScope>,
}

/// `[dns]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    pub listen: SocketAddr,
    pub name: String,
    pub ttl: Option<Dur>,
}

/// `[tls]`: the HTTPS listener (PRODUCT.md §9).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub certificates: Vec<toml::Spanned<CertFile>>,
    /// The plain listener answers 308 to the same host and path over https.
    #[serde(default)]
    pub redirect_http: bool,
    pub min_version: Option<TlsVersion>,
    /// A client must finish its TLS handshake within this time.
    pub handshake_timeout: Option<Dur>,
    /// The control port speaks TLS too, with these certificates (set it on every node).
    #[serde(default)]
    pub control: bool,
}

/// One certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The lowest TLS version accepted: "1.2" (default) or "1.3".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, |s| match s {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            _ => Err(format!("min_version takes \"1.2\" or \"1.3\", got {s:?} (older versions are not offered)")),
        })
    }
}

/// `[access_log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    pub path: PathBuf,
}

/// Balancing algorithm names, as in the config and `--algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    LeastConn,
    RoundRobin,
    RandomTwo,
    IpHash,
    Cookie,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::LeastConn => "least-conn",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::RandomTwo => "random-two",
            Algorithm::IpHash => "ip-hash",
            Algorithm::Cookie => "cookie",
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::deserialize(de::value::StrDeserializer::<de::value::Error>::new(s)).map_err(|_| {
            format!("unknown algorithm {s:?} (expected least-conn, round-robin, random-two, ip-hash or cookie)")
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    #[default]
    Node,
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    #[default]
    ClientIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllDown {
    #[default]
    Unavailable,
    Open,
}

impl<'de> Deserialize<'de> for AllDown {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, |s| match s {
            "503" => Ok(AllDown::Unavailable),
            "open" => Ok(AllDown::Open),
            _ => Err(format!("expected \"503\" or \"open\", got {s:?}")),
        })
    }
}

/// Deserializes a string with `parse`, turning its error into a serde error (with position).
fn parse_str<'de, D, T>(d: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    parse(&s).map_err(de::Error::custom)
}

/// A duration written like nginx or humantime: "500ms", "5s", "1m", "1h30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("bad duration {s:?}: {e} (write e.g. \"500ms\", \"5s\", \"1m\")"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, str::parse)
    }
}

/// A rate like nginx's: "10r/s" or "600r/m".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad rate {s:?} (write e.g. \"10r/s\" or \"600r/m\")");
        let (num, unit) = s.trim().split_once("r/").ok_or_else(bad)?;
        let n: f64 = num.parse().map_err(|_| bad())?;
        if !(n > 0.0 && n.is_finite()) {
            return Err(format!("rate {s:?} must be positive"));
        }
        let per_second = match unit {
            "s" => n,
            "m" => n / 60.0,
            _ => return Err(bad()),
        };
        Ok(Rate { per_second })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, str::parse)
    }
}

/// A backend weight, 1..=1000 like nginx (0 would silently disable a backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = u32::deserialize(d)?;
        if !(1..=1000).contains(&w) {
            return Err(de::Error::custom(format!("weight {w} out of range 1..=1000")));
        }
        Ok(Weight(w))
    }
}

/// A rise/fall count, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub u32);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if n == 0 {
            return Err(de::Error::custom("must be at least 1"));
        }
        Ok(Count(n))
    }
}

/// An HTTP status class ("2xx") or exact status ("204") a health check accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Class(u16),
    Exact(u16),
}

impl StatusClass {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusClass::Class(c) => status / 100 == c,
            StatusClass::Exact(s) => status == s,
        }
    }
}

impl FromStr for StatusClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad status {s:?} (write \"2xx\" or \"204\")");
        if let Some(c) = s.strip_suffix("xx") {
            let c: u16 = c.parse().map_err(|_| bad())?;
            return if (1..=5).contains(&c) { Ok(StatusClass::Class(c)) } else { Err(bad()) };
        }
        let n: u16 = s.parse().map_err(|_| bad())?;
        if (100..=599).contains(&n) { Ok(StatusClass::Exact(n)) } else { Err(bad()) }
    }
}

impl<'de> Deserialize<'de> for StatusClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, str::parse)
    }
}

/// A status that triggers a retry of idempotent requests: 502, 503 or 504.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryStatus(pub u16);

impl<'de> Deserialize<'de> for RetryStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, |s| match s.parse::<u16>() {
            Ok(n @ (500 | 502 | 503 | 504)) => Ok(RetryStatus(n)),
            _ => Err(format!("retry_on takes \"500\", \"502\", \"503\" or \"504\", got {s:?}")),
        })
    }
}

/// An absolute request path for health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPath(pub String);

impl<'de> Deserialize<'de> for HttpPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, |s| {
            if s.starts_with('/') && s.bytes().all(|b| b.is_ascii_graphic()) {
                Ok(HttpPath(s.to_string()))
            } else {
                Err(format!("path {s:?} must start with '/' and contain no spaces or control characters"))
            }
        })
    }
}

/// A cookie name (RFC 6265 token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(pub String);

impl<'de> Deserialize<'de> for CookieName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, |s| {
            let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if ok { Ok(CookieName(s.to_string())) } else { Err(format!("cookie name {s:?} is not a valid token")) }
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
