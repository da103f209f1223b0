//! # shoal-node: one Shoal node, both an HTTP load balancer and a cluster member
//!
//! ## Layout
//! - [`config`]: file -> flags -> validated, immutable [`config::Config`].
//! - [`http1`]: the pure HTTP/1.1 codec (parse, validate, rewrite heads, chunked), no I/O.
//! - [`proxy`]: the data plane (listener, HTTP/1.1 and HTTP/2 client sides, forward, upstream
//!   exchange, errors, access log).
//! - [`route`]: the route table: host and path to a named pool, or a redirect (pure).
//! - [`balance`]: the [`balance::Picker`] trait and one type per algorithm.
//! - [`pool`]: one pool's backends, their live counters, health flags and idle upstream
//!   connections.
//! - [`health`]: passive ejection and active checks.
//! - [`limit`]: per-client rate limiting (node or cluster scope).
//! - [`cluster`]: chitchat membership, gossip keys, the cluster view, the backend registry.
//! - [`control`]: the gRPC control plane `shoal` and joining nodes call.
//! - [`admin`]: `/live`, `/ready`, `/metrics`, `/status` and the dashboard.
//! - [`dns`]: the health-aware DNS responder (alive members only).
//! - [`tls`]: HTTPS termination: certificates (files and the cluster's), SNI, session tickets.
//! - [`lifecycle`]: this node's member state and the leave sequence.
//! - [`events`]: recent events (members, backends, reloads) for the dashboard.
//!
//! ## Data paths
//! - request: listener -> client_h1 | client_h2 (through http1, which asks the route table for
//!   the pool) -> forward -> picker (pool snapshot + local and remote in-flight) -> upstream
//!   exchange over a pooled upstream connection -> response body streamed back (in-flight
//!   ends with the body);
//! - gossip: chitchat -> view task -> new view snapshot and per-backend remote load;
//! - local load: in-flight counters -> publish tick -> gossip keys -> peers' views;
//! - control: gRPC or config file -> registry -> gossip, and `Node::apply` -> a new
//!   `proxy::Runtime` (pools + routes).

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod buffers;
pub mod civil;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod dns;
pub mod events;
pub mod health;
pub mod http1;
pub mod lifecycle;
pub mod limit;
pub mod memory;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod store;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Config, UpstreamSettings, flags::RunFlags};
use lifecycle::{Lifecycle, MemberState};
use pool::Pool;
use proxy::{Proxy, RouteInfo, Runtime, Upstream};
use route::{Entry, RouteAction, RouteTable};

/// The listeners a node serves on, bound before `run` so a bad address fails before anything
/// starts, and so tests can bind port 0.
pub struct Listeners {
    /// One proxy socket per worker thread, all bound to the same address with SO_REUSEPORT,
    /// so the kernel spreads connections across workers with no shared accept queue.
    pub proxy: Vec<std::net::TcpListener>,
    /// One TLS listener per worker (SO_REUSEPORT too), when `[tls]` is configured.
    pub tls: Vec<std::net::TcpListener>,
    pub admin: TcpListener,
    pub control: TcpListener,
    /// The DNS responder's socket, when `[dns]` is configured.
    pub dns: Option<tokio::net::UdpSocket>,
}

impl Listeners {
    /// Binds every TCP listener of `config` (gossip is bound by chitchat itself).
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let workers = config.node.proxy_workers();
        let proxy = bind_workers(config.node.listen, workers).context("cannot bind the proxy listener")?;
        let tls = match &config.tls {
            Some(t) => bind_workers(t.listen, workers).context("cannot bind the TLS listener")?,
            None => Vec::new(),
        };
        let bind = |addr, what: &'static str| async move {
            TcpListener::bind(addr).await.with_context(|| format!("cannot bind the {what} listener on {addr}"))
        };
        Ok(Listeners {
            proxy,
            tls,
            admin: bind(config.node.admin, "admin").await?,
            control: bind(config.node.control, "control").await?,
            dns: match &config.dns {
                Some(d) => Some(
                    tokio::net::UdpSocket::bind(d.listen)
                        .await
                        .with_context(|| format!("cannot bind the DNS responder on {}/udp", d.listen))?,
                ),
                None => None,
            },
        })
    }
}

/// `n` sockets bound to `addr` with SO_REUSEPORT (port 0: the others join the port the first
/// one got), so the kernel spreads connections across workers with no shared accept queue.
fn bind_workers(mut addr: std::net::SocketAddr, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use anyhow::Context;
    let mut out = Vec::new();
    for _ in 0..n {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr).with_context(|| format!("on {addr}"))?;
        let listener = socket.listen(4096)?;
        addr = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// Everything one node shares between its tasks.
pub struct Node {
    pub config: ArcSwap<Config>,
    /// The flags `shoald run` got, re-applied over the file on every reload.
    pub flags: RunFlags,
    pub proxy: Arc<Proxy>,
    pub lifecycle: Lifecycle,
    pub started: Instant,
    /// Fired to start the leave sequence (signal or `shoal leave`).
    pub leave: CancellationToken,
    pub cluster: OnceLock<Arc<cluster::Cluster>>,
    /// Admits control-plane calls (per-call tokens, replay check) and counts refusals.
    pub control_gate: Arc<control::auth::Gate>,
    /// Recent events for the dashboard (the admin sampler and reloads write them).
    pub events: events::Events,
    /// Which members actively check which backends (written by the view task).
    pub roster: Arc<health::Roster>,
    /// Every pool by name, kept across rebuilds of the runtime so counters and warm
    /// connections survive; the lock also serializes [`Node::apply`].
    pools: Mutex<BTreeMap<String, Arc<Pool>>>,
    /// Bumped by every reload: pools are then rebuilt with new pickers and limiters.
    config_generation: AtomicU64,
    /// The active-check task of each pool that has one, with the config generation it runs.
    health: Mutex<HashMap<String, (u64, CancellationToken)>>,
    sticky_key: [u8; 16],
}

impl Node {
    pub fn new(config: Config, flags: RunFlags) -> anyhow::Result<Arc<Self>> {
        let sticky_key = pool::derive_key(config.cluster.secret.as_deref(), "sticky");
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(tls::Tls::new(t, config.cluster.secret.as_deref()).map_err(anyhow::Error::msg)?)),
            None => None,
        };
        // A first runtime with the default pool only; `apply` builds the whole one below.
        let default_pool = Arc::new(Pool::new(config::DEFAULT_POOL, config.upstream.keepalive, sticky_key));
        let first = Runtime {
            upstreams: vec![Arc::new(
                Upstream::new(config.upstream.clone(), default_pool).map_err(anyhow::Error::msg)?,
            )],
            route_list: Vec::new(),
            routes: RouteTable::default(),
            generation: u64::MAX,
        };
        let proxy = Arc::new(Proxy::new(&config, first, tls)?);
        let control_gate = Arc::new(control::auth::Gate::new(config.cluster.secret.as_deref()));
        let node = Arc::new(Node {
            config: ArcSwap::from_pointee(config),
            flags,
            proxy,
            lifecycle: Lifecycle::default(),
            started: Instant::now(),
            leave: CancellationToken::new(),
            cluster: OnceLock::new(),
            control_gate,
            events: events::Events::default(),
            roster: Arc::default(),
            pools: Mutex::new(BTreeMap::new()),
            config_generation: AtomicU64::new(0),
            health: Mutex::new(HashMap::new()),
            sticky_key,
        });
        node.apply().map_err(anyhow::Error::msg)?;
        Ok(node)
    }

    pub fn id(&self) -> String {
        self.config.load().node.id.clone()
    }

    /// The running pools and routes.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.proxy.runtime.load_full()
    }

    /// Builds the runtime from the config and the registry and swaps it in: the config's
    /// pools, then pools only the registry or a route names (built-in settings); each pool's
    /// backends are the config's with the registry's changes over them; the routes likewise.
    /// Pools keep their live state; pickers and limiters are kept until a reload. Fails only
    /// when TLS to a pool's backends cannot be set up (an unreadable `ca_file`).
    pub fn apply(&self) -> Result<(), String> {
        let config = self.config.load_full();
        let generation = self.config_generation.load(Relaxed);
        let registry = self.cluster.get().map(|c| &c.registry);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.proxy.runtime.load_full();
        let routes = match registry {
            Some(r) => r.effective_routes(&config.routes),
            None => config.routes.clone(),
        };
        let mut settings: Vec<UpstreamSettings> = config.pools().cloned().collect();
        let named = registry.map(|r| r.pools()).unwrap_or_default().into_iter().chain(routes.iter().filter_map(|r| {
            match &r.action {
                RouteAction::Pool { upstream, .. } => Some(upstream.clone()),
                RouteAction::Redirect { .. } => None,
            }
        }));
        for name in named {
            if !settings.iter().any(|s| s.name == name) {
                settings.push(config::pool_defaults(&name));
            }
        }
        let mut upstreams: Vec<Arc<Upstream>> = Vec::with_capacity(settings.len());
        for s in settings {
            let pool = pools
                .entry(s.name.clone())
                .or_insert_with(|| Arc::new(Pool::new(&s.name, s.keepalive, self.sticky_key)))
                .clone();
            pool.set_keepalive(s.keepalive);
            let (specs, draining) = match registry {
                Some(r) => r.effective(&s.name, &s.backends),
                None => (s.backends.clone(), Vec::new()),
            };
            pool.replace(&specs, &draining);
            let kept = (current.generation == generation)
                .then(|| current.find(&s.name))
                .flatten()
                .filter(|u| Arc::ptr_eq(&u.pool, &pool));
            upstreams.push(match kept {
                Some(u) => u.clone(),
                None => {
                    let name = s.name.clone();
                    Arc::new(Upstream::new(s, pool).map_err(|e| format!("pool {name}: {e}"))?)
                }
            });
        }
        pools.retain(|name, _| upstreams.iter().any(|u| u.name() == name));
        let mut route_list = Vec::with_capacity(routes.len());
        let mut table = Vec::with_capacity(routes.len());
        for spec in routes {
            let target = match &spec.action {
                RouteAction::Pool { upstream, .. } => upstreams.iter().position(|u| u.name() == upstream).unwrap_or(0),
                RouteAction::Redirect { .. } => 0,
            };
            table.push((spec.clone(), route_list.len() as u32));
            route_list.push(RouteInfo { name: spec.describe().into(), entry: Entry { spec, target: target as u32 } });
        }
        let runtime = Runtime { upstreams, route_list, routes: RouteTable::new(table), generation };
        self.proxy.runtime.store(Arc::new(runtime));
        drop(pools);
        self.sync_health_checks();
        Ok(())
    }

    /// Serves the cluster's certificates (registry entries, opened with the cluster secret).
    /// One that does not open or load is left out, and the log says why.
    pub fn apply_certs(&self) {
        let (Some(tls), Some(cluster)) = (&self.proxy.tls, self.cluster.get()) else { return };
        let config = self.config.load();
        let Some(secret) = config.cluster.secret.as_deref() else { return };
        let mut served = Vec::new();
        for e in cluster.registry.certs() {
            if e.op != cluster::registry::CertOp::Add {
                continue;
            }
            match tls::certs::open_sealed(secret, &e.sealed, "certificate", "key") {
                Ok(l) => served.push(l),
                Err(why) => tracing::error!(name = %e.name, error = %why, "cluster certificate not served"),
            }
        }
        tracing::info!(certificates = served.len(), "cluster certificates applied");
        tls.set_cluster_certs(served);
    }

    /// Starts the active checks of pools that have them (again after a reload), and stops
    /// those of pools that no longer do.
    fn sync_health_checks(&self) {
        let runtime = self.proxy.runtime.load_full();
        let mut running = self.health.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|name, (generation, token)| {
            let keep =
                runtime.find(name).is_some_and(|u| u.settings.health.is_some()) && *generation == runtime.generation;
            if !keep {
                token.cancel();
            }
            keep
        });
        for u in &runtime.upstreams {
            let Some(h) = u.settings.health.clone() else { continue };
            if running.contains_key(u.name()) {
                continue;
            }
            let token = CancellationToken::new();
            running.insert(u.name().to_string(), (runtime.generation, token.clone()));
            tokio::spawn(health::run_checks(u.pool.clone(), h, u.tls.clone(), self.roster.clone(), token));
        }
    }

    /// Re-reads the config file (SIGHUP). A bad file keeps the running config. Either way the
    /// outcome is an event on the dashboard.
    pub fn reload(&self) -> Result<(), config::ConfigError> {
        use events::{Kind, Tone};
        let path = self.config.load().path.as_ref().map_or_else(String::new, |p| p.display().to_string());
        let r = self.reload_file();
        match &r {
            Ok(()) if path.is_empty() => {}
            Ok(()) => self.events.push(Kind::Reload, Tone::Info, path, "configuration reloaded"),
            Err(e) => self.events.push(Kind::Reload, Tone::Bad, path, format!("reload refused: {e}")),
        }
        r
    }

    fn reload_file(&self) -> Result<(), config::ConfigError> {
        let current = self.config.load_full();
        let Some(path) = current.path.clone() else {
            tracing::info!("reload requested but the node runs without a config file; nothing to do");
            return Ok(());
        };
        let new = config::load(Some(&path), &self.flags)?;
        for (what, old, new) in [
            ("listen", current.node.listen, new.node.listen),
            ("admin", current.node.admin, new.node.admin),
            ("control", current.node.control, new.node.control),
            ("gossip", current.node.gossip, new.node.gossip),
        ] {
            if old != new {
                tracing::warn!(key = what, old = %old, new = %new, "listener addresses change only on restart; keeping the old one");
            }
        }
        match (&self.proxy.tls, &new.tls) {
            (Some(tls), Some(settings)) => tls.apply_settings(settings),
            (None, Some(_)) | (Some(_), None) => {
                tracing::warn!("[tls] is turned on or off only on restart; keeping the running listeners")
            }
            (None, None) => {}
        }
        self.proxy.set_drain_timeout(new.node.drain_timeout);
        let log = match &new.access_log {
            Some(p) => Some(
                proxy::access_log::AccessLog::open(p)
                    .map_err(|source| config::ConfigError::Read { path: p.display().to_string(), source })?,
            ),
            None => None,
        };
        self.config.store(Arc::new(new));
        self.config_generation.fetch_add(1, Relaxed);
        if let Err(message) = self.apply() {
            // TLS to a pool's backends cannot be set up: keep running as before.
            self.config.store(current);
            self.config_generation.fetch_add(1, Relaxed);
            let _ = self.apply();
            return Err(config::ConfigError::Invalid { where_: path.display().to_string(), message });
        }
        self.proxy.access_log.store(Arc::new(log));
        let runtime = self.runtime();
        tracing::info!(path = %path.display(), pools = runtime.upstreams.len(), routes = runtime.route_list.len(),
            backends = runtime.upstreams.iter().map(|u| u.pool.snapshot().backends.len()).sum::<usize>(), "config reloaded");
        Ok(())
    }

    /// Sum of this node's in-flight requests over all backends of all pools.
    pub fn in_flight(&self) -> u64 {
        let runtime = self.proxy.runtime.load();
        let pool_sum = |u: &Arc<Upstream>| -> u64 {
            u.pool.snapshot().backends.iter().map(|b| b.state.in_flight.load(Relaxed) as u64).sum()
        };
        runtime.upstreams.iter().map(pool_sum).sum()
    }
}

/// Runs a node on bound listeners until it has left (after `node.leave` fires).
pub async fn run(node: Arc<Node>, listeners: Listeners) -> anyhow::Result<()> {
    let config = node.config.load_full();
    let cluster = cluster::Cluster::start(node.clone()).await?;
    let _ = node.cluster.set(cluster.clone());
    if let Err(e) = node.apply() {
        tracing::error!(error = %e, "cannot apply the registry");
    }
    node.apply_certs();

    let stop_accepting = CancellationToken::new();
    let listener_settings = proxy::Limits {
        header_timeout: config.node.client_header_timeout,
        max_header_bytes: config.node.max_header_bytes,
        keepalive_timeout: config.node.keepalive_timeout,
        body_timeout: config.node.client_body_timeout,
        send_timeout: config.node.send_timeout,
        tunnel_timeout: config.node.tunnel_timeout,
        request_buffer_bytes: config.node.request_buffer_bytes,
    };
    node.proxy.set_drain_timeout(config.node.drain_timeout);
    // Proxy workers: one thread with a current-thread runtime per socket. The request path
    // never leaves its thread (no work stealing, no cross-thread wakeups for a request).
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let workers = listeners.proxy.len();
    let mut tls_listeners = listeners.tls.into_iter();
    for (i, std_listener) in listeners.proxy.into_iter().enumerate() {
        let (proxy, settings, stop, done) =
            (node.proxy.clone(), listener_settings.clone(), stop_accepting.clone(), done_tx.clone());
        let tls_listener = tls_listeners.next();
        std::thread::Builder::new().name(format!("shoal-proxy-{i}")).spawn(move || {
            pool::conn::set_worker_index(i);
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a proxy worker");
                    let _ = done.send(0);
                    return;
                }
            };
            let left = rt.block_on(async move {
                let releaser = proxy.clone();
                tokio::spawn(async move {
                    memory::release_after_bursts(&releaser.stats.active, &releaser.stats.requests).await
                });
                let tls = tls_listener.map(TcpListener::from_std).transpose();
                match (TcpListener::from_std(std_listener), tls) {
                    (Ok(l), Ok(tls)) => proxy::listener::serve(l, tls, proxy, settings, stop).await,
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::error!(error = %e, "cannot register a proxy listener");
                        0
                    }
                }
            });
            let _ = done.send(left);
        })?;
    }
    drop(done_tx);
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(listeners.admin, node.clone(), admin_stop.clone()));
    let control_task = tokio::spawn(control::serve(listeners.control, node.clone(), admin_stop.clone()));
    if let (Some(socket), Some(settings)) = (listeners.dns, config.dns.clone()) {
        tokio::spawn(dns::serve(socket, node.clone(), settings, admin_stop.clone()));
    }
    if let Some(tls) = &node.proxy.tls {
        tokio::spawn(tls::watch(tls.clone(), admin_stop.clone()));
        if tls.certificates().is_empty() {
            tracing::warn!("[tls] has no certificate yet: handshakes fail until one is added (shoal cert add)");
        }
    }
    let budget_proxy = node.proxy.clone();
    let budget_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            budget_proxy.retry_budget.refill_floor();
        }
    });
    tracing::info!(
        node = %config.node.id, proxy = %config.node.listen,
        tls = %config.tls.as_ref().map_or("off".to_string(), |t| t.listen.to_string()), admin = %config.node.admin,
        control = %config.node.control, gossip = %config.node.gossip,
        pools = node.runtime().upstreams.len(), routes = node.runtime().route_list.len(),
        backends = node.runtime().upstreams.iter().map(|u| u.pool.snapshot().backends.len()).sum::<usize>(),
        algorithm = %config.upstream.algorithm,
        "shoald started"
    );

    tokio::select! {
        _ = node.leave.cancelled() => {}
        _ = done_rx.recv() => { anyhow::bail!("a proxy worker stopped unexpectedly") }
    }
    // The leave sequence (PRODUCT.md §5.3).
    let config = node.config.load_full();
    node.lifecycle.set(MemberState::Draining);
    cluster.publish_state(MemberState::Draining).await;
    tracing::info!(grace = ?config.node.leave_grace, "leaving: draining announced, still accepting during the grace period");
    tokio::time::sleep(config.node.leave_grace).await;
    stop_accepting.cancel();
    let mut leftover = 0;
    for _ in 0..workers {
        leftover += done_rx.recv().await.unwrap_or(0);
    }
    node.lifecycle.set(MemberState::Left);
    cluster.leave().await;
    admin_stop.cancel();
    budget_task.abort();
    let _ = admin_task.await;
    let _ = control_task.await;
    tracing::info!(unfinished_connections = leftover, "left the cluster");
    Ok(())
}
