//! Flags of `shoald run`: each one overrides the config key of the same name.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::BackendSpec;
use super::file::{Algorithm, Dur};

#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunFlags {
    /// Node id (default: hostname).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Proxy listener address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Control-plane (gRPC) address.
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// Gossip (UDP) address.
    #[arg(long)]
    pub gossip: Option<SocketAddr>,
    /// Admin (HTTP) address: /live /ready /metrics /status and the dashboard.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Address peers and DNS use for this node.
    #[arg(long)]
    pub advertise: Option<IpAddr>,
    /// Gossip address of a member to join through (repeatable).
    #[arg(long = "seed", value_name = "HOST:PORT")]
    pub seeds: Vec<String>,
    /// Cluster id; nodes of another cluster are never merged.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// ADDR[,weight=N][,max_conns=N][,max_fails=N][,fail_timeout=DUR][,backup] (repeatable;
    /// replaces the file's backends).
    #[arg(long = "backend", value_name = "SPEC", value_parser = parse_backend_flag)]
    pub backends: Vec<BackendSpec>,
    /// least-conn | round-robin | random-two | ip-hash | cookie
    #[arg(long)]
    pub algorithm: Option<Algorithm>,
    /// Directory for persisted cluster state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// File holding the cluster secret.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Address of the health-aware DNS responder.
    #[arg(long)]
    pub dns_listen: Option<SocketAddr>,
    /// Name the DNS responder answers for.
    #[arg(long)]
    pub dns_name: Option<String>,
    /// HTTPS listener address (turns TLS on; needs --tls-cert and --tls-key).
    #[arg(long)]
    pub tls_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) to serve; pairs with the --tls-key at the same position
    /// (repeatable; replaces the file's certificates).
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub tls_certs: Vec<PathBuf>,
    /// Private key (PEM) of the --tls-cert at the same position (repeatable).
    #[arg(long = "tls-key", value_name = "FILE")]
    pub tls_keys: Vec<PathBuf>,
}

/// Parses `--backend ADDR[,weight=N][,max_conns=N][,max_fails=N][,fail_timeout=DUR][,backup]`.
pub fn parse_backend_flag(s: &str) -> Result<BackendSpec, String> {
    let mut parts = s.split(',');
    let addr_text = parts.next().unwrap_or_default();
    let addr: SocketAddr = addr_text.parse().map_err(|_| format!("{addr_text:?} is not an IP:PORT address"))?;
    let mut spec = BackendSpec::new(addr);
    for part in parts {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let num = |v: &str| v.parse::<u32>().map_err(|_| format!("{key}={v:?} is not a number"));
        match key {
            "weight" => {
                spec.weight = num(value)?;
                if !(1..=1000).contains(&spec.weight) {
                    return Err(format!("weight {} out of range 1..=1000", spec.weight));
                }
            }
            "max_conns" => spec.max_conns = num(value)?,
            "max_fails" => spec.max_fails = num(value)?,
            "fail_timeout" => spec.fail_timeout = value.parse::<Dur>()?.0,
            "backup" if value.is_empty() => spec.backup = true,
            _ => {
                return Err(format!(
                    "unknown backend option {part:?} (weight, max_conns, max_fails, fail_timeout, backup)"
                ));
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn backend_flag() {
        let b = parse_backend_flag("127.0.0.1:9000,weight=3,max_conns=10,fail_timeout=2s,backup").unwrap();
        assert_eq!(b.weight, 3);
        assert_eq!(b.max_conns, 10);
        assert_eq!(b.fail_timeout, Duration::from_secs(2));
        assert!(b.backup);
        assert!(parse_backend_flag("localhost").is_err());
        assert!(parse_backend_flag("127.0.0.1:1,wieght=2").unwrap_err().contains("unknown backend option"));
    }
}
