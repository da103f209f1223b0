//! `shoal`: the command-line client of a Shoal cluster. Talks to one node's control plane
//! (`--node`, `$SHOAL_NODE`); human tables by default, `--json` for scripts. Exit codes:
//! 0 success, 1 refused or failed, 2 node unreachable, 3 unknown backend.

mod import_nginx;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use shoal_proto as pb;
use tonic::{Code, Status};

#[derive(Parser)]
#[command(name = "shoal", version, about = "Control a Shoal cluster through any of its nodes")]
struct Cli {
    /// Control address of the node to talk to.
    #[arg(long, env = "SHOAL_NODE", default_value = "127.0.0.1:7400", global = true)]
    node: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// File with the cluster secret (needed when the cluster has one).
    #[arg(long, env = "SHOAL_SECRET_FILE", global = true)]
    secret_file: Option<PathBuf>,
    /// Speak TLS to the control port (`[tls] control = true`), verifying its certificate
    /// against the CA certificates in this PEM file.
    #[arg(long, env = "SHOAL_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// The name the control port's certificate must carry (default: the host of --node).
    #[arg(long, global = true)]
    tls_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Members and backends, one screen.
    Status,
    /// Members: id, address, state, age, in-flight, req/s.
    Members {
        /// Redraw every second, printing changes of state.
        #[arg(long)]
        watch: bool,
    },
    /// Make the node at --node join the cluster that SEED (a member's control address) is in.
    Join { seed: String },
    /// Drain the node at --node and make it leave the cluster.
    Leave {
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        drain_timeout: Duration,
    },
    /// Backends of the cluster, by pool.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Routes: host and path to a pool, or a redirect.
    #[command(subcommand)]
    Route(RouteCmd),
    /// Pools (`[upstream]` and `[upstreams.NAME]`): settings and backends in one line each.
    #[command(subcommand)]
    Upstream(UpstreamCmd),
    /// Cluster certificates (HTTPS): stored sealed with the cluster secret, served by every node.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Print the Shoal config equivalent to an nginx config (upstreams, servers, locations).
    ImportNginx { file: PathBuf },
    /// A live terminal view: members, pools and backends with req/s, in-flight, p99, failures
    /// (`q` or Ctrl-C quits). Not on a terminal, or with --once: one frame, then exit.
    Top {
        /// Print one frame (two samples one interval apart, for the rates) and exit.
        #[arg(long)]
        once: bool,
        /// Time between refreshes.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    List,
    Add {
        addr: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[arg(long, default_value_t = 0)]
        max_conns: u32,
        #[arg(long)]
        backup: bool,
        /// The pool (default: the default pool, `[upstream]`).
        #[arg(long)]
        upstream: Option<String>,
    },
    Remove {
        addr: String,
        /// The pool (needed only when the address is in several).
        #[arg(long)]
        upstream: Option<String>,
    },
    /// No new requests; in-flight ones finish.
    Drain {
        addr: String,
        /// The pool (needed only when the address is in several).
        #[arg(long)]
        upstream: Option<String>,
    },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Every route, from the config and from the registry.
    List,
    /// Set the route for a host and path (replacing one with the same host and path), on every
    /// node. Precedence: exact host > `*.suffix` > any host; `=/exact` path > longest prefix.
    Add {
        /// An exact host name or `*.suffix` (default: any host).
        #[arg(long)]
        host: Option<String>,
        /// `=/exact` or a prefix (default: `/`).
        #[arg(long)]
        path: Option<String>,
        /// The pool that serves these requests.
        #[arg(long, conflicts_with = "redirect", required_unless_present = "redirect")]
        upstream: Option<String>,
        /// The backend sees the path without the route's prefix.
        #[arg(long, requires = "upstream")]
        strip_prefix: bool,
        /// 308 to this origin (`https://www.example.com`) plus the path and query.
        #[arg(long)]
        redirect: Option<String>,
    },
    /// Remove the route for a host and path (from the config or the registry), on every node.
    Remove {
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        path: Option<String>,
    },
}

#[derive(Subcommand)]
enum UpstreamCmd {
    /// Every pool this node runs.
    List,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Certificates the node serves (files and cluster), with days to expiry.
    List,
    /// Store a certificate chain and key in the cluster (needs --secret-file: they are sealed
    /// with the cluster secret before they leave this machine).
    Add {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Remove a cluster certificate by its NAME (as `cert list` shows it).
    Remove { name: String },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

type Client = pb::control_client::ControlClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, pb::Signer>,
>;

/// A failure with its exit code.
struct Failure(u8, String);

fn from_status(node: &str, s: Status) -> Failure {
    match s.code() {
        Code::Unavailable => Failure(2, format!("node {node} unreachable: {}", s.message())),
        Code::NotFound => Failure(3, s.message().to_string()),
        Code::Unauthenticated => Failure(1, format!("refused by {node}: {} ", s.message())),
        // Plain HTTP/2 against a TLS port fails as one or the other, depending on which bytes
        // arrive first.
        _ if s.message().contains("transport error") || s.message().contains("protocol error") => {
            Failure(2, format!("{node}: {} (if its control port speaks TLS, pass --ca-file)", s.message()))
        }
        _ => Failure(1, format!("{node}: {}", s.message())),
    }
}

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    // Every call is signed with a token for that call alone (method, time, nonce).
    let secret = match &cli.secret_file {
        Some(p) => Some(std::sync::Arc::from(pb::read_secret(p).map_err(|e| Failure(1, e))?)),
        None => None,
    };
    let tls = match &cli.ca_file {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| Failure(1, format!("{}: {e}", ca.display())))?;
            let host = cli.node.rsplit_once(':').map_or(cli.node.as_str(), |(h, _)| h);
            let name = cli.tls_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
            Some(pb::ControlTls::verified_by(&pem, &name).map_err(|e| Failure(1, format!("{}: {e}", ca.display())))?)
        }
        None => None,
    };
    let channel = pb::control_channel(&cli.node, tls, Duration::from_secs(3), None)
        .await
        .map_err(|e| Failure(2, format!("node {} unreachable: {e}", cli.node)))?;
    Ok(pb::control_client::ControlClient::with_interceptor(channel, pb::Signer(secret)))
}

fn member_json(m: &pb::Member) -> Value {
    json!({"id": m.node_id, "generation": m.generation, "state": m.state, "gossip": m.gossip_addr,
           "proxy": m.proxy_addr, "control": m.control_addr, "admin": m.admin_addr,
           "in_flight": m.in_flight, "rps": m.req_per_sec, "age_secs": m.age_secs, "self": m.is_self})
}

fn backend_json(b: &pb::Backend) -> Value {
    json!({"pool": b.pool, "addr": b.addr, "weight": b.weight, "max_conns": b.max_conns, "backup": b.backup, "state": b.state,
           "in_flight": b.local_in_flight, "cluster_in_flight": b.cluster_in_flight, "requests": b.requests,
           "failures": b.failures, "source": b.source, "down_on": b.down_on})
}

fn route_json(r: &pb::Route) -> Value {
    json!({"name": r.name, "host": r.host, "path": r.path, "upstream": r.upstream, "strip_prefix": r.strip_prefix,
           "redirect": r.redirect, "source": r.source})
}

fn upstream_json(u: &pb::Upstream) -> Value {
    json!({"name": u.name, "algorithm": u.algorithm, "backends": u.backends, "up": u.up,
           "in_flight": u.local_in_flight, "cluster_in_flight": u.cluster_in_flight, "requests": u.requests,
           "health_checks": u.health_checks, "sticky_cookie": u.sticky_cookie, "rate_limit": u.rate_limit,
           "source": u.source, "routes": u.routes, "tls": u.tls})
}

fn routes_table(routes: &[pb::Route]) {
    table(
        &["HOST", "PATH", "TO", "SOURCE"],
        routes
            .iter()
            .map(|r| {
                let to = if !r.redirect.is_empty() {
                    format!("redirect {}", r.redirect)
                } else if r.strip_prefix {
                    format!("{} (strip prefix)", r.upstream)
                } else {
                    r.upstream.clone()
                };
                let host = if r.host.is_empty() { "*".to_string() } else { r.host.clone() };
                vec![host, r.path.clone(), to, r.source.clone()]
            })
            .collect(),
    );
}

fn upstreams_table(upstreams: &[pb::Upstream]) {
    table(
        &[
            "POOL",
            "ALGORITHM",
            "UP",
            "IN-FLIGHT",
            "CLUSTER",
            "REQUESTS",
            "ROUTES",
            "CHECKS",
            "STICKY",
            "RATE LIMIT",
            "SOURCE",
        ],
        upstreams
            .iter()
            .map(|u| {
                let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
                vec![
                    format!("{}{}", u.name, if u.tls { " (tls)" } else { "" }),
                    u.algorithm.clone(),
                    format!("{}/{}", u.up, u.backends),
                    u.local_in_flight.to_string(),
                    u.cluster_in_flight.to_string(),
                    u.requests.to_string(),
                    u.routes.to_string(),
                    if u.health_checks { "on" } else { "-" }.into(),
                    or_dash(&u.sticky_cookie),
                    or_dash(&u.rate_limit),
                    u.source.clone(),
                ]
            })
            .collect(),
    );
}

fn cert_json(c: &pb::Cert) -> Value {
    json!({"name": c.name, "names": c.names, "issuer": c.issuer, "not_after": c.not_after,
           "days_left": c.days_left, "source": c.source, "error": c.error})
}

fn certs_table(certs: &[pb::Cert]) {
    table(
        &["NAME", "NAMES", "DAYS LEFT", "NOT AFTER (UTC)", "SOURCE", "ISSUER"],
        certs
            .iter()
            .map(|c| {
                let (days, until) = if c.error.is_empty() {
                    (c.days_left.to_string(), c.not_after_utc.clone())
                } else {
                    ("-".into(), format!("not served: {}", c.error))
                };
                vec![c.name.clone(), c.names.join(","), days, until, c.source.clone(), c.issuer.clone()]
            })
            .collect(),
    );
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// Prints rows as a left-aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn members_table(members: &[pb::Member]) {
    table(
        &["NODE", "STATE", "PROXY", "CONTROL", "AGE", "IN-FLIGHT", "REQ/S"],
        members
            .iter()
            .map(|m| {
                vec![
                    format!("{}{}", m.node_id, if m.is_self { " *" } else { "" }),
                    m.state.clone(),
                    m.proxy_addr.clone(),
                    m.control_addr.clone(),
                    age(m.age_secs),
                    m.in_flight.to_string(),
                    format!("{:.1}", m.req_per_sec),
                ]
            })
            .collect(),
    );
}

fn backends_table(backends: &[pb::Backend]) {
    table(
        &[
            "POOL",
            "BACKEND",
            "STATE",
            "WEIGHT",
            "MAX",
            "IN-FLIGHT",
            "CLUSTER",
            "REQUESTS",
            "FAILURES",
            "SOURCE",
            "DOWN ON",
        ],
        backends
            .iter()
            .map(|b| {
                vec![
                    b.pool.clone(),
                    format!("{}{}", b.addr, if b.backup { " (backup)" } else { "" }),
                    b.state.clone(),
                    b.weight.to_string(),
                    if b.max_conns == 0 { "-".into() } else { b.max_conns.to_string() },
                    b.local_in_flight.to_string(),
                    b.cluster_in_flight.to_string(),
                    b.requests.to_string(),
                    b.failures.to_string(),
                    b.source.clone(),
                    b.down_on.join(","),
                ]
            })
            .collect(),
    );
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::ImportNginx { file } = &cli.command {
        let text = std::fs::read_to_string(file).map_err(|e| Failure(1, format!("{}: {e}", file.display())))?;
        let out = import_nginx::convert(&text).map_err(|e| Failure(1, format!("{}: {e}", file.display())))?;
        for w in &out.warnings {
            eprintln!("warning: {w}");
        }
        print!("{}", out.toml);
        return Ok(());
    }
    let node = cli.node.clone();
    let status = |s| from_status(&node, s);
    let mut client = connect(&cli).await?;
    match &cli.command {
        Command::Status => {
            let s = client.status(pb::StatusRequest {}).await.map_err(status)?.into_inner();
            if cli.json {
                let v = json!({"node": s.node_id, "cluster": s.cluster_id, "state": s.state, "algorithm": s.algorithm,
                    "members": s.members.iter().map(member_json).collect::<Vec<_>>(),
                    "pools": s.upstreams.iter().map(upstream_json).collect::<Vec<_>>(),
                    "backends": s.backends.iter().map(backend_json).collect::<Vec<_>>()});
                println!("{v:#}");
            } else {
                let alive = s.members.iter().filter(|m| m.state == "alive").count();
                println!(
                    "cluster {}  node {} ({})  algorithm {}  members {}/{} alive",
                    s.cluster_id,
                    s.node_id,
                    s.state,
                    s.algorithm,
                    alive,
                    s.members.len()
                );
                println!();
                members_table(&s.members);
                if s.upstreams.len() > 1 {
                    println!();
                    upstreams_table(&s.upstreams);
                }
                // Backends grouped by pool (the node lists them pool by pool).
                println!();
                backends_table(&s.backends);
            }
        }
        Command::Members { watch } => {
            let mut previous: Vec<pb::Member> = Vec::new();
            loop {
                let m = client.members(pb::MembersRequest {}).await.map_err(status)?.into_inner().members;
                if cli.json {
                    println!("{}", Value::Array(m.iter().map(member_json).collect()));
                } else if *watch {
                    print!("\x1b[2J\x1b[H");
                    members_table(&m);
                    for now in &m {
                        if let Some(before) = previous.iter().find(|p| p.node_id == now.node_id && p.state != now.state)
                        {
                            eprintln!("{} {}: {} -> {}", chrono_now(), now.node_id, before.state, now.state);
                        }
                    }
                } else {
                    members_table(&m);
                }
                if !*watch {
                    break;
                }
                previous = m;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Command::Join { seed } => {
            let r = client.join(pb::JoinRequest { seed: seed.clone() }).await.map_err(status)?.into_inner();
            if cli.json {
                println!("{}", json!({"cluster": r.cluster_id, "members": r.members}));
            } else {
                println!("{node} joined cluster {} ({} members alive)", r.cluster_id, r.members);
            }
        }
        Command::Leave { drain_timeout } => {
            let mut stream = client
                .leave(pb::LeaveRequest { drain_timeout_ms: drain_timeout.as_millis() as u64 })
                .await
                .map_err(status)?
                .into_inner();
            let mut last = String::new();
            // The node closes the stream (or the connection) once it has left.
            while let Ok(Some(p)) = stream.message().await {
                if cli.json {
                    println!("{}", json!({"phase": p.phase, "in_flight": p.in_flight}));
                } else {
                    eprint!("\r{node}: {:<9} in-flight {:<6}", p.phase, p.in_flight);
                }
                last = p.phase;
            }
            if !cli.json {
                eprintln!();
                println!(
                    "{node} {}",
                    if last == "left" { "left the cluster" } else { "is leaving (connection closed)" }
                );
            }
        }
        Command::Backend(cmd) => {
            let backends = match cmd {
                BackendCmd::List => {
                    client.backend_list(pb::BackendListRequest {}).await.map_err(status)?.into_inner().backends
                }
                BackendCmd::Add { addr, weight, max_conns, backup, upstream } => {
                    let r = client
                        .backend_add(pb::BackendAddRequest {
                            addr: addr.clone(),
                            weight: *weight,
                            max_conns: *max_conns,
                            backup: *backup,
                            upstream: upstream.clone().unwrap_or_default(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    if !cli.json {
                        println!("{}", r.message);
                    }
                    r.backends
                }
                BackendCmd::Remove { addr, upstream } | BackendCmd::Drain { addr, upstream } => {
                    let req =
                        pb::BackendAddrRequest { addr: addr.clone(), upstream: upstream.clone().unwrap_or_default() };
                    let r = if matches!(cmd, BackendCmd::Remove { .. }) {
                        client.backend_remove(req).await
                    } else {
                        client.backend_drain(req).await
                    };
                    let r = r.map_err(status)?.into_inner();
                    if !cli.json {
                        println!("{}", r.message);
                    }
                    r.backends
                }
            };
            if cli.json {
                println!("{}", Value::Array(backends.iter().map(backend_json).collect()));
            } else if matches!(cmd, BackendCmd::List) {
                backends_table(&backends);
            }
        }
        Command::Route(cmd) => {
            let reply = match cmd {
                RouteCmd::List => client.route_list(pb::RouteListRequest {}).await,
                RouteCmd::Add { host, path, upstream, strip_prefix, redirect } => {
                    client
                        .route_add(pb::RouteAddRequest {
                            host: host.clone().unwrap_or_default(),
                            path: path.clone().unwrap_or_default(),
                            upstream: upstream.clone().unwrap_or_default(),
                            strip_prefix: *strip_prefix,
                            redirect: redirect.clone().unwrap_or_default(),
                        })
                        .await
                }
                RouteCmd::Remove { host, path } => {
                    client
                        .route_remove(pb::RouteRemoveRequest {
                            host: host.clone().unwrap_or_default(),
                            path: path.clone().unwrap_or_default(),
                        })
                        .await
                }
            }
            .map_err(status)?
            .into_inner();
            if cli.json {
                let routes: Vec<Value> = reply.routes.iter().map(route_json).collect();
                println!("{}", json!({"message": reply.message, "routes": routes}));
            } else {
                if !reply.message.is_empty() {
                    println!("{}", reply.message);
                }
                if matches!(cmd, RouteCmd::List) {
                    routes_table(&reply.routes);
                }
            }
        }
        Command::Upstream(UpstreamCmd::List) => {
            let list = client.upstream_list(pb::UpstreamListRequest {}).await.map_err(status)?.into_inner().upstreams;
            if cli.json {
                println!("{}", Value::Array(list.iter().map(upstream_json).collect()));
            } else {
                upstreams_table(&list);
            }
        }
        Command::Cert(cmd) => {
            let reply = match cmd {
                CertCmd::List => client.cert_list(pb::CertListRequest {}).await.map_err(status)?.into_inner(),
                CertCmd::Add { cert, key } => {
                    let Some(secret_file) = &cli.secret_file else {
                        return Err(Failure(
                            1,
                            "cert add needs --secret-file: the key is sealed with the cluster secret".into(),
                        ));
                    };
                    let secret = pb::read_secret(secret_file).map_err(|e| Failure(1, e))?;
                    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| Failure(1, format!("{}: {e}", p.display())));
                    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
                    if cert_pem.len() + key_pem.len() > pb::MAX_CERT_BYTES {
                        return Err(Failure(
                            1,
                            format!(
                                "{}: too large for a cluster certificate: the chain and key take {} bytes, at most {} \
                                 (the chain needs the leaf and its intermediates only, not a CA bundle)",
                                cert.display(),
                                cert_pem.len() + key_pem.len(),
                                pb::MAX_CERT_BYTES
                            ),
                        ));
                    }
                    let sealed = pb::seal_cert(&secret, &cert_pem, &key_pem);
                    let request = pb::CertAddRequest {
                        sealed,
                        cert_file: cert.display().to_string(),
                        key_file: key.display().to_string(),
                    };
                    client.cert_add(request).await.map_err(status)?.into_inner()
                }
                CertCmd::Remove { name } => {
                    client.cert_remove(pb::CertRemoveRequest { name: name.clone() }).await.map_err(status)?.into_inner()
                }
            };
            if cli.json {
                println!(
                    "{}",
                    json!({"message": reply.message, "certs": reply.certs.iter().map(cert_json).collect::<Vec<_>>()})
                );
            } else {
                if !reply.message.is_empty() {
                    println!("{}", reply.message);
                }
                if matches!(cmd, CertCmd::List) {
                    certs_table(&reply.certs);
                }
            }
        }
        Command::Top { once, interval } => top::run(&mut client, &node, *once, *interval).await?,
        Command::ImportNginx { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("shoal: {msg}");
            ExitCode::from(code)
        }
    }
}
