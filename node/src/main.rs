//! `shoald`: parse args, load and validate the config (before binding anything), start
//! tracing, bind, run. Signals: SIGTERM/SIGINT leave gracefully (a second SIGINT exits at
//! once), SIGHUP reloads the config file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: the request path allocates small, short-lived buffers on every request (header
/// maps, hyper's dispatch messages); glibc malloc showed up at ~6% of CPU under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the calling thread's free pages to the system (`shoal_node::memory`). Forced: a
/// plain collect left most of an HTTP/2 burst's memory held (3,000 idle HTTP/2 clients: RSS
/// 16.6 -> 115 MB, 50 MB after they left; forced, 17.4 MB). Called a few times after a burst,
/// at most once a second per worker.
fn release_memory() {
    // SAFETY: `mi_collect` has no preconditions; it only walks the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
use shoal_node::config::{self, flags::RunFlags};
use shoal_node::{Listeners, Node};

#[derive(Parser)]
#[command(name = "shoald", version, about = "Shoal node: HTTP load balancer and cluster member")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Run {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: Box<RunFlags>,
    },
    /// Validate a config file and exit 0, or print what is wrong (file:line) and exit 1.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a local demo cluster (nodes and backends on 127.0.0.1) until Ctrl-C.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// Added to every demo port (proxy 8080+, control 7400+, gossip 7946+, admin 9901+).
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Raises the open-files soft limit to the hard one: every client and backend connection is a
/// file, and the usual soft default (1024) would refuse clients long before memory or CPU run
/// out (HAProxy raises its limit the same way; nginx needs `worker_rlimit_nofile`).
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else { return };
    let files = if soft < hard {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    if files < 4096 {
        tracing::warn!(
            open_files = files,
            "low open-files limit: each connection needs one (two when proxied); raise `ulimit -Hn`"
        );
    } else {
        tracing::debug!(open_files = files, "open-files limit");
    }
}

fn main() -> ExitCode {
    shoal_node::memory::set_release(release_memory);
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(Some(&config), &RunFlags::default()).and_then(check_tls) {
            Ok(c) => {
                let sites = if c.upstreams.is_empty() && c.routes.is_empty() {
                    String::new()
                } else {
                    let pools: Vec<String> = c
                        .pools()
                        .map(|p| format!("{} ({} backends, {})", p.name, p.backends.len(), p.algorithm))
                        .collect();
                    format!("; pools: {}; {} routes", pools.join(", "), c.routes.len())
                };
                println!(
                    "{}: ok ({} backends, algorithm {}, node {}, cluster {}{sites})",
                    config.display(),
                    c.upstream.backends.len(),
                    c.upstream.algorithm,
                    c.node.id,
                    c.cluster.id
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shoald check: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, flags } => {
            let cfg = match config::load(config.as_deref(), &flags).and_then(check_tls) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shoald: {e}");
                    return ExitCode::FAILURE;
                }
            };
            init_tracing(cli.log_format);
            raise_open_files_limit();
            // The proxy runs on its own worker threads (see `shoal_node::run`); this runtime
            // carries gossip, the control plane, admin and health checks.
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("shoald: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                let listeners = match Listeners::bind(&cfg).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("shoald: {e:#}");
                        return ExitCode::FAILURE;
                    }
                };
                let node = match Node::new(cfg, *flags) {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("shoald: {e:#}");
                        return ExitCode::FAILURE;
                    }
                };
                tokio::spawn(handle_signals(node.clone()));
                match shoal_node::run(node, listeners).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("shoald: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Demo { nodes, backends, port_offset } => {
            init_tracing(cli.log_format);
            raise_open_files_limit();
            match shoal_node::demo::run(nodes, backends, port_offset) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("shoald demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Reads every certificate file `[tls]` names and the CA file of TLS to backends, so a bad one
/// fails `check` and `run` before any port is bound.
fn check_tls(c: config::Config) -> Result<config::Config, config::ConfigError> {
    for pool in c.pools() {
        if let Some(u) = &pool.tls {
            let table = if pool.name == config::DEFAULT_POOL {
                "[upstream]".into()
            } else {
                format!("[upstreams.{}]", pool.name)
            };
            shoal_node::tls::upstream::UpstreamTls::new(u)
                .map_err(|message| config::ConfigError::Invalid { where_: format!("{table} tls"), message })?;
        }
    }
    if let Some(t) = &c.tls {
        // The same loading `run` does (files only: no secret needed to check them).
        let tls = shoal_node::tls::Tls::new(t, None)
            .map_err(|message| config::ConfigError::Invalid { where_: "[tls] certificates".into(), message })?;
        // A route's host that no certificate file names is served the first certificate over
        // HTTPS, unless a cluster certificate (`shoal cert add`) names it: worth a warning, not
        // a refusal.
        if !tls.certificates().is_empty() {
            for route in &c.routes {
                let host = route.host.text();
                let name = host.strip_prefix('*').map_or(host.clone(), |suffix| format!("x{suffix}"));
                if !host.is_empty() && !tls.covers(&name) {
                    eprintln!(
                        "warning: route {}: no certificate file names {host}: HTTPS clients asking for it get a \
                         certificate they will not accept, unless a cluster certificate (shoal cert add) names it",
                        route.describe()
                    );
                }
            }
        }
    }
    Ok(c)
}

async fn handle_signals(node: Arc<Node>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: leaving the cluster");
                node.leave.cancel();
            }
            _ = int.recv() => {
                if node.leave.is_cancelled() {
                    tracing::warn!("second SIGINT: exiting now");
                    std::process::exit(130);
                }
                tracing::info!("SIGINT: leaving the cluster (Ctrl-C again to exit at once)");
                node.leave.cancel();
            }
            _ = hup.recv() => {
                if let Err(e) = node.reload() {
                    tracing::error!(error = %e, "reload failed; keeping the running config");
                }
            }
        }
    }
}
