//! The cluster: chitchat membership, what this node publishes, and the view it builds of the
//! others.
//!
//! - `keys`: gossip key names and typed values;
//! - `change`: membership events from a pure diff;
//! - `registry`: the run-time registry of backends, routes and certificates (LWW on a hybrid
//!   logical clock, persisted);
//! - `transport`: the authenticated, encrypted gossip transport;
//! - `pace`: keeps the bytes a member sends near `cluster.gossip_budget`;
//! - `rumor`: passes hot changes (registry, routes, certificates, member state, `down`
//!   verdicts) on at once instead of waiting for rounds.
//!
//! Three tasks run per node. The *publish* task writes this node's per-backend in-flight
//! counts, own health verdicts, request rate and registry into its gossip state every gossip
//! interval (chitchat sends only what changed), and at once after a local registry change. The
//! *view* task reads every member's state once per interval, and at once after a hot change,
//! outside the request path, and turns it into: the [`ClusterView`] snapshot (`ArcSwap`, for
//! status, DNS and the control plane), each backend's `remote_in_flight` (atomic, read by the
//! pickers) and `cluster_down` flag (shared health), and registry merges. The *spread* task
//! passes hot changes on (`rumor`).

pub mod change;
pub mod keys;
pub mod pace;
pub mod registry;
pub mod rumor;
pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, ProtocolVersion, spawn_chitchat,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::Node;
use crate::lifecycle::MemberState;
use crate::pool::claim::{self, Claim};
use crate::pool::now_ms;
use keys::BackendKey;
use pace::Pace;
use registry::{CertEntry, RegEntry, Registry, RouteEntry};
use transport::{GossipCounters, SealedTransport};

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub node_id: String,
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub state: MemberState,
    pub proxy_addr: Option<SocketAddr>,
    pub control_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// Sum of the member's reported in-flight requests.
    pub in_flight: u64,
    pub rps: f64,
    pub is_self: bool,
    /// Backends (pool, address) this member's own verdict says are down.
    pub down: Vec<BackendKey>,
}

impl Default for Member {
    fn default() -> Self {
        Member {
            node_id: String::new(),
            generation: 0,
            gossip_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            state: MemberState::Alive,
            proxy_addr: None,
            control_addr: None,
            admin_addr: None,
            in_flight: 0,
            rps: 0.0,
            is_self: false,
            down: Vec::new(),
        }
    }
}

/// The immutable cluster view published by the view task.
#[derive(Debug, Default)]
pub struct ClusterView {
    pub members: Vec<Member>,
    /// First time each node id was seen by this node (for ages).
    pub first_seen: HashMap<String, Instant>,
    /// Per backend of a pool: the members whose own verdict is down.
    pub down_on: HashMap<BackendKey, Vec<String>>,
    /// Per backend of a pool: the sum of other live members' in-flight reports.
    pub remote_in_flight: HashMap<BackendKey, u32>,
}

/// This node's cluster membership.
pub struct Cluster {
    pub handle: tokio::sync::Mutex<Option<ChitchatHandle>>,
    pub chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    pub self_id: ChitchatId,
    pub cluster_id: String,
    pub view: ArcSwap<ClusterView>,
    pub registry: Registry,
    pub counters: Arc<GossipCounters>,
    pub pace: Arc<Pace>,
    /// Gossip rounds observed (view task ticks) — for `/metrics`.
    pub rounds: std::sync::atomic::AtomicU64,
    node: Weak<Node>,
    tasks: std::sync::Mutex<JoinSet<()>>,
    interval: Duration,
    /// Wakes the publish task (a local registry change).
    publish_now: Notify,
    /// Wakes the view task (a hot change, here or from a peer).
    view_now: Arc<Notify>,
    /// Keeps the hot-key subscriptions (dropping them unsubscribes).
    _hot_keys: Vec<chitchat::ListenerHandle>,
}

fn generation_now() -> u64 {
    // A new generation on every start: peers must treat a restarted node as a fresh one.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

impl Cluster {
    /// Starts gossip, the publish task and the view task.
    pub async fn start(node: Arc<Node>) -> anyhow::Result<Arc<Cluster>> {
        let config = node.config.load_full();
        let persisted = match &config.node.data_dir {
            Some(dir) => crate::store::load(dir)?,
            None => crate::store::Persisted::default(),
        };
        let registry =
            Registry::from_entries(persisted.registry.clone(), persisted.certs.clone(), persisted.routes.clone());
        let generation = generation_now().max(persisted.generation + 1);
        if let Some(dir) = &config.node.data_dir {
            let mut p = persisted.clone();
            p.generation = generation;
            crate::store::save(dir, &p)?;
        }
        let advertise_gossip = SocketAddr::new(config.node.advertise, config.node.gossip.port());
        let self_id = ChitchatId::new(config.node.id.clone(), generation, advertise_gossip);
        let seeds: Vec<String> = config
            .cluster
            .seeds
            .iter()
            .filter(|s| s.parse::<SocketAddr>().map_or(true, |a| a != advertise_gossip && a != config.node.gossip))
            .cloned()
            .collect();
        let interval = config.cluster.gossip_interval;
        let chitchat_config = chitchat_config(self_id.clone(), &config.cluster.id, interval, config.node.gossip, seeds);
        let initial = vec![
            (keys::STATE.to_string(), MemberState::Alive.name().to_string()),
            (keys::ADDR_PROXY.to_string(), advertised(config.node.listen, config.node.advertise).to_string()),
            (keys::ADDR_CONTROL.to_string(), advertised(config.node.control, config.node.advertise).to_string()),
            (keys::ADDR_ADMIN.to_string(), advertised(config.node.admin, config.node.advertise).to_string()),
        ];
        let counters = Arc::new(GossipCounters::default());
        let pace = Arc::new(Pace::new(config.cluster.gossip_budget));
        let handle = match &config.cluster.secret {
            Some(secret) => {
                let transport = SealedTransport::new(secret, counters.clone(), pace.clone());
                spawn_chitchat(chitchat_config, initial, &transport).await?
            }
            None => {
                let exposed = !config.node.gossip.ip().is_loopback() || !config.node.control.ip().is_loopback();
                if exposed {
                    tracing::warn!(gossip = %config.node.gossip, control = %config.node.control,
                        "no cluster secret: gossip and control plane are unauthenticated and reachable from other hosts; set cluster.secret_file");
                } else {
                    tracing::info!(gossip = %config.node.gossip, control = %config.node.control,
                        "no cluster secret: gossip and control plane are unauthenticated, bound to loopback only");
                }
                spawn_chitchat(chitchat_config, initial, &SealedTransport::plain(counters.clone(), pace.clone()))
                    .await?
            }
        };
        let chitchat = handle.chitchat();
        let termination = handle.termination_watcher();
        let (hot, view_now) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let hot_keys = rumor::watch(&chitchat, &[hot.clone(), view_now.clone()]).await;
        let cluster = Arc::new(Cluster {
            handle: tokio::sync::Mutex::new(Some(handle)),
            chitchat,
            self_id,
            cluster_id: config.cluster.id.clone(),
            view: ArcSwap::from_pointee(ClusterView::default()),
            registry,
            counters,
            pace: pace.clone(),
            rounds: 0.into(),
            node: Arc::downgrade(&node),
            tasks: std::sync::Mutex::new(JoinSet::new()),
            interval,
            publish_now: Notify::new(),
            view_now,
            _hot_keys: hot_keys,
        });
        {
            let mut tasks = cluster.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.spawn(publish_loop(cluster.clone()));
            tasks.spawn(view_loop(cluster.clone()));
            let weak = Arc::downgrade(&cluster);
            let gossip = move |peer| {
                // `leave` holds the handle while it stops gossip: then there is nothing to spread.
                if let Some(cluster) = weak.upgrade()
                    && let Ok(handle) = cluster.handle.try_lock()
                    && let Some(handle) = handle.as_ref()
                {
                    let _ = handle.gossip(peer);
                }
            };
            tasks.spawn(rumor::spread_loop(cluster.chitchat.clone(), pace, hot, gossip));
            let leave = node.leave.clone();
            tasks.spawn(async move {
                if let Err(e) = termination.await {
                    tracing::error!(error = %e, "gossip stopped unexpectedly; leaving");
                    leave.cancel();
                }
            });
        }
        // The first view (with this node in it) is built at once; wait for it (bounded) so
        // /status and the control plane never show an empty member list.
        for _ in 0..50 {
            if !cluster.view.load().members.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(cluster)
    }

    /// Announces a state change at once (does not wait for the publish tick).
    pub async fn publish_state(&self, state: MemberState) {
        self.chitchat.lock().await.self_node_state().set(keys::STATE, state.name());
    }

    /// Announces `left`, waits for a few gossip rounds so peers hear it, then stops gossip.
    pub async fn leave(&self) {
        {
            let mut cc = self.chitchat.lock().await;
            let me = cc.self_node_state();
            me.set(keys::STATE, MemberState::Left.name());
            // Our in-flight reports no longer mean anything.
            let loads: Vec<String> = me.iter_prefix(keys::LOAD_PREFIX).map(|(k, _)| k.to_string()).collect();
            for k in loads {
                me.set(&k, "0");
            }
        }
        tokio::time::sleep(self.interval * 4).await;
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
        if let Some(h) = self.handle.lock().await.take() {
            let _ = h.shutdown().await;
        }
    }

    /// Gossips with `addr` now (used by `Join` to reach a seed without waiting for a round).
    pub async fn gossip_with(&self, addr: SocketAddr) {
        if let Some(h) = self.handle.lock().await.as_ref() {
            let _ = h.gossip(addr);
        }
    }

    /// Records a registry change made on this node (a backend or a route), applies it and
    /// persists it.
    pub fn change_registry<E>(&self, entry_fn: impl FnOnce(&Registry) -> E) -> E {
        let entry = entry_fn(&self.registry);
        if let Some(node) = self.node.upgrade() {
            if let Err(e) = node.apply() {
                tracing::error!(error = %e, "cannot apply the registry");
            }
            self.persist(&node);
        }
        self.publish_now.notify_one();
        entry
    }

    /// Records a cluster certificate change made on this node, serves it and persists it.
    pub fn change_certs(&self, entry_fn: impl FnOnce(&Registry) -> CertEntry) -> CertEntry {
        let entry = entry_fn(&self.registry);
        if let Some(node) = self.node.upgrade() {
            node.apply_certs();
            self.persist(&node);
        }
        self.publish_now.notify_one();
        entry
    }

    fn persist(&self, node: &Node) {
        let config = node.config.load();
        if let Some(dir) = &config.node.data_dir {
            let state = crate::store::Persisted {
                format: 0,
                generation: self.self_id.generation_id,
                registry: self.registry.entries(),
                certs: self.registry.certs(),
                routes: self.registry.routes(),
            };
            if let Err(e) = crate::store::save(dir, &state) {
                tracing::error!(error = %e, "cannot persist the registry");
            }
        }
    }

    /// Members in the current view.
    pub fn members(&self) -> Vec<Member> {
        self.view.load().members.clone()
    }
}

/// Shoal's chitchat settings (also used by the gossip-scale benchmark).
pub fn chitchat_config(
    self_id: ChitchatId,
    cluster_id: &str,
    interval: Duration,
    listen: SocketAddr,
    seeds: Vec<String>,
) -> ChitchatConfig {
    ChitchatConfig {
        chitchat_id: self_id,
        cluster_id: cluster_id.to_string(),
        gossip_interval: interval,
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            // phi 8 with a prior equal to the gossip interval: a killed node is dead on peers
            // after about 1 s at 150 ms gossip (chitchat's 5 s default prior would make it 20 s).
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: interval,
            // Long enough to show `dead`/`left` members, short enough that restarts do not
            // pile up incarnations in every digest.
            dead_node_grace_period: Duration::from_secs(15 * 60),
        },
        marked_for_deletion_grace_period: Duration::from_secs(15 * 60),
        catchup_callback: None,
        extra_liveness_predicate: None,
        // Compressed digests (a third of the bytes at 50 members). Every Shoal release has run
        // chitchat 0.13, which reads both formats and answers in the one it was sent.
        protocol_version: ProtocolVersion::V1,
    }
}

/// The address others should use for a listener bound on `bound` (the advertise IP when the
/// listener is bound on 0.0.0.0).
fn advertised(bound: SocketAddr, advertise: std::net::IpAddr) -> SocketAddr {
    if bound.ip().is_unspecified() { SocketAddr::new(advertise, bound.port()) } else { bound }
}

/// Writes this node's load, verdicts, rate and registry into its gossip state.
async fn publish_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.interval);
    let mut last_requests = 0u64;
    let mut last_at = Instant::now();
    let mut rps = 0.0f64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cluster.publish_now.notified() => {}
        }
        let Some(node) = cluster.node.upgrade() else { return };
        let runtime = node.runtime();
        let now = now_ms();
        let requests = node.proxy.stats.requests.load(Relaxed);
        let elapsed = last_at.elapsed().as_secs_f64();
        // Once a second: the request rate, and the response-time estimates (they move slowly
        // and matter only to a node that has not sampled a backend itself for a second, so
        // they are not worth a delta every round).
        let each_second = elapsed >= 1.0;
        if each_second {
            rps = (requests - last_requests) as f64 / elapsed;
            last_requests = requests;
            last_at = Instant::now();
        }
        let registry = cluster.registry.entries();
        let certs = cluster.registry.certs();
        let routes = cluster.registry.routes();
        let pools: Vec<_> = runtime.upstreams.iter().map(|u| u.pool.full()).collect();
        let mut cc = cluster.chitchat.lock().await;
        let me = cc.self_node_state();
        for (u, pool) in runtime.upstreams.iter().zip(&pools) {
            for b in &pool.backends {
                me.set(keys::load_key(u.name(), b.spec.addr), b.state.in_flight.load(Relaxed).to_string());
                if each_second {
                    let lat = crate::pool::speed::quantise(b.state.speed.own(now));
                    set_or_clear(me, keys::lat_key(u.name(), b.spec.addr), (lat > 0).then_some(lat));
                }
                // The slots held: requests above a claim that shrank hold theirs until they end.
                let claim = b.state.claimed().map(|claim| {
                    keys::format_claim(Claim {
                        slots: claim.max(b.state.in_flight.load(Relaxed)),
                        wants: b.state.wants_more.load(Relaxed),
                    })
                });
                set_or_clear(me, keys::claim_key(u.name(), b.spec.addr), claim);
                set_or_clear(me, keys::down_key(u.name(), b.spec.addr), b.state.own_verdict_down(now).then_some("1"));
            }
        }
        // Keys of backends that left their pool.
        let known = |(pool, addr): &BackendKey| {
            runtime.upstreams.iter().zip(&pools).any(|(u, p)| u.name() == pool && p.find(*addr).is_some())
        };
        let stale: Vec<String> = keys::PER_BACKEND_PREFIXES
            .iter()
            .flat_map(|&prefix| {
                me.iter_prefix(prefix)
                    .filter(move |(k, _)| keys::backend_of(k, prefix).is_none_or(|key| !known(&key)))
                    .map(|(k, _)| k.to_string())
            })
            .collect();
        for k in stale {
            me.delete(&k);
        }
        me.set(keys::RPS, format!("{rps:.1}"));
        for e in &registry {
            me.set(keys::reg_key(&e.pool, e.addr), keys::format_reg(e));
        }
        for e in &routes {
            me.set(keys::route_key(&e.host, &e.path), keys::format_route(e));
        }
        // A value too large for a datagram would hold back everything published after it;
        // `shoal cert add` refuses such certificates, so only an old or forged entry is skipped.
        for e in certs.iter().filter(|e| e.sealed.len() <= keys::MAX_SEALED_CERT) {
            me.set(keys::cert_key(&e.name), keys::format_cert(e));
        }
    }
}

/// Sets `key` to `value`, or deletes it when `value` is `None` (only if it is there: a
/// deletion of an absent key would still be gossiped).
fn set_or_clear(me: &mut NodeState, key: String, value: Option<impl ToString>) {
    match value {
        Some(v) => me.set(key, v),
        None if me.get(&key).is_some() => me.delete(&key),
        None => {}
    }
}

/// One member's reports per backend of a pool.
#[derive(Debug, Default)]
struct Reports {
    /// In-flight requests.
    loads: Vec<(BackendKey, u32)>,
    /// Response-time estimates, microseconds.
    latencies: Vec<(BackendKey, u64)>,
    /// Claims on `max_conns` (limited backends only).
    claims: Vec<(BackendKey, Claim)>,
}

/// What the view task reads from one member's gossip state.
struct MemberReading {
    member: Member,
    reports: Reports,
    registry: Vec<RegEntry>,
    certs: Vec<CertEntry>,
    routes: Vec<RouteEntry>,
}

fn read_member(id: &ChitchatId, state: &NodeState, live: bool, is_self: bool) -> MemberReading {
    let announced = state.get(keys::STATE).and_then(MemberState::parse).unwrap_or(MemberState::Alive);
    let member_state = match (live, announced) {
        (_, MemberState::Left) => MemberState::Left,
        (true, s) => s,
        (false, _) => MemberState::Dead,
    };
    let addr = |k| state.get(k).and_then(|v| v.parse().ok());
    let loads: Vec<(BackendKey, u32)> = state
        .iter_prefix(keys::LOAD_PREFIX)
        .filter_map(|(k, v)| Some((keys::backend_of(k, keys::LOAD_PREFIX)?, keys::parse_load(&v.value)?)))
        .collect();
    let latencies = state
        .iter_prefix(keys::LAT_PREFIX)
        .filter_map(|(k, v)| Some((keys::backend_of(k, keys::LAT_PREFIX)?, keys::parse_lat(&v.value)?)))
        .collect();
    let claims = state
        .iter_prefix(keys::CLAIM_PREFIX)
        .filter_map(|(k, v)| Some((keys::backend_of(k, keys::CLAIM_PREFIX)?, keys::parse_claim(&v.value)?)))
        .collect();
    let down =
        state.iter_prefix(keys::DOWN_PREFIX).filter_map(|(k, _)| keys::backend_of(k, keys::DOWN_PREFIX)).collect();
    let registry = state
        .iter_prefix(keys::REG_PREFIX)
        .filter_map(|(k, v)| keys::parse_reg(keys::backend_of(k, keys::REG_PREFIX)?, &v.value))
        .collect();
    let certs = state.iter_prefix(keys::CERT_PREFIX).filter_map(|(k, v)| keys::parse_cert(k, &v.value)).collect();
    let routes = state.iter_prefix(keys::ROUTE_PREFIX).filter_map(|(k, v)| keys::parse_route(k, &v.value)).collect();
    let member = Member {
        node_id: id.node_id.to_string(),
        generation: id.generation_id,
        gossip_addr: id.gossip_advertise_addr,
        state: member_state,
        proxy_addr: addr(keys::ADDR_PROXY),
        control_addr: addr(keys::ADDR_CONTROL),
        admin_addr: addr(keys::ADDR_ADMIN),
        in_flight: loads.iter().map(|(_, n)| *n as u64).sum(),
        rps: state.get(keys::RPS).and_then(|v| v.parse().ok()).unwrap_or(0.0),
        is_self,
        down,
    };
    MemberReading { member, reports: Reports { loads, latencies, claims }, registry, certs, routes }
}

/// This node's next claim on a limited backend's `max_conns` (`pool::claim`), from the
/// serving members' gossiped claims; a member that has reported none counts its fair share.
fn update_claim(
    b: &crate::pool::Backend,
    key: &BackendKey,
    serving: &[&Member],
    my_rank: Option<usize>,
    reports: &HashMap<String, Reports>,
    last_grew: &mut HashMap<BackendKey, u64>,
    grow_every_ms: u64,
) {
    let max = b.spec.max_conns;
    if max == 0 {
        b.state.set_claim(None, false);
        return;
    }
    // Not serving (left): no slots, so the others may share them.
    let Some(rank) = my_rank else {
        b.state.set_claim(Some(0), false);
        return;
    };
    let n = serving.len() as u32;
    let others: Vec<Claim> = serving
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.is_self)
        .map(|(r, m)| {
            let reported = reports.get(&m.node_id).and_then(|r| r.claims.iter().find(|(k, _)| k == key));
            reported.map_or(Claim { slots: claim::fair(max, n, r as u32), wants: false }, |(_, c)| *c)
        })
        .collect();
    let mine = b.state.claimed().unwrap_or_else(|| claim::fair(max, n, rank as u32));
    let now = now_ms();
    let wants = b.state.at_claim.swap(false, Relaxed);
    let next = claim::next(&claim::Round {
        max,
        members: n,
        rank: rank as u32,
        mine,
        in_flight: b.state.in_flight.load(Relaxed),
        wants,
        others: &others,
        may_grow: last_grew.get(key).is_none_or(|&t| now.saturating_sub(t) >= grow_every_ms),
        turn: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64) / grow_every_ms,
    });
    if next > mine {
        last_grew.insert(key.clone(), now);
    }
    b.state.set_claim(Some(next), wants);
}

/// Builds the cluster view from gossip, once per interval.
async fn view_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.interval);
    let mut peers_said_down: HashMap<BackendKey, bool> = HashMap::new();
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut built = Instant::now();
    // When this node last grew its claim on each limited backend (`pool::claim`).
    let mut last_grew: HashMap<BackendKey, u64> = HashMap::new();
    let grow_every_ms = claim::grow_every_ms(cluster.interval.as_millis() as u64);
    loop {
        // Claims move on ticks only: their rules count in rounds, not in hot changes.
        let ticked = tokio::select! {
            _ = tick.tick() => {
                cluster.rounds.fetch_add(1, Relaxed);
                true
            }
            _ = cluster.view_now.notified() => {
                // A burst of hot changes builds a view per `SPACING`, not one per change.
                tokio::time::sleep(rumor::SPACING.saturating_sub(built.elapsed())).await;
                false
            }
        };
        built = Instant::now();
        let Some(node) = cluster.node.upgrade() else { return };
        // Read everything under the lock, process after releasing it.
        let raw: Vec<MemberReading> = {
            let cc = cluster.chitchat.lock().await;
            let live: Vec<ChitchatId> = cc.live_nodes().cloned().collect();
            let dead: Vec<ChitchatId> = cc.dead_nodes().cloned().collect();
            live.iter()
                .map(|id| (id, true))
                .chain(dead.iter().map(|id| (id, false)))
                .filter_map(|(id, is_live)| {
                    cc.node_state(id).map(|s| read_member(id, s, is_live, *id == cluster.self_id))
                })
                .collect()
        };
        // One entry per node id: a live incarnation wins, then the newest generation.
        let mut members: Vec<Member> = Vec::new();
        let mut reports_by_node: HashMap<String, Reports> = HashMap::new();
        let mut seen_registry = Vec::new();
        let mut seen_certs = Vec::new();
        let mut seen_routes = Vec::new();
        for MemberReading { member: m, reports, registry, certs, routes } in raw {
            seen_registry.extend(registry);
            seen_certs.extend(certs);
            seen_routes.extend(routes);
            let rank = |x: &Member| (x.state != MemberState::Dead && x.state != MemberState::Left, x.generation);
            match members.iter_mut().find(|o| o.node_id == m.node_id) {
                Some(o) if rank(o) >= rank(&m) => {}
                Some(o) => {
                    reports_by_node.insert(m.node_id.clone(), reports);
                    *o = m;
                }
                None => {
                    reports_by_node.insert(m.node_id.clone(), reports);
                    members.push(m);
                }
            }
        }
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));

        // Remote load: only live peers count; a dead or left node's reports stop at once.
        let serving: Vec<&Member> = members.iter().filter(|m| m.state.serves()).collect();
        let mut remote: HashMap<BackendKey, u32> = HashMap::new();
        let mut remote_lat: HashMap<BackendKey, (u64, u64)> = HashMap::new();
        let mut down_on: HashMap<BackendKey, Vec<String>> = HashMap::new();
        for m in serving.iter().filter(|m| !m.is_self) {
            let Some(reports) = reports_by_node.get(&m.node_id) else { continue };
            for (key, n) in &reports.loads {
                *remote.entry(key.clone()).or_default() += n;
            }
            for (key, us) in &reports.latencies {
                let e = remote_lat.entry(key.clone()).or_default();
                *e = (e.0 + us, e.1 + 1);
            }
            for key in &m.down {
                down_on.entry(key.clone()).or_default().push(m.node_id.clone());
            }
        }
        let my_rank = serving.iter().position(|m| m.is_self);
        cluster.pace.set_live(serving.iter().filter(|m| !m.is_self).map(|m| m.gossip_addr).collect());
        // Active checks go to alive members only: a draining node is about to leave.
        let alive: Vec<String> = members
            .iter()
            .filter(
                |m| if m.is_self { node.lifecycle.get() == MemberState::Alive } else { m.state == MemberState::Alive },
            )
            .map(|m| m.node_id.clone())
            .collect();
        node.roster.set(&cluster.self_id.node_id, alive);
        node.proxy.set_serving_nodes(serving.len() as u32);
        let runtime = node.runtime();
        let mut present: std::collections::HashSet<BackendKey> = std::collections::HashSet::new();
        for (pool, b) in runtime.backends() {
            let key: BackendKey = (pool.to_string(), b.spec.addr);
            b.state.remote_in_flight.store(remote.get(&key).copied().unwrap_or(0), Relaxed);
            b.state.speed.set_remote(remote_lat.get(&key).map_or(0, |(sum, n)| sum / n));
            if ticked {
                update_claim(&b, &key, &serving, my_rank, &reports_by_node, &mut last_grew, grow_every_ms);
            }
            // Shared health: a new "down" report from any peer takes the backend out here too;
            // it stays out until the peers take it back or our own checks see `rise` good ones.
            let now_down = down_on.contains_key(&key);
            let before = peers_said_down.insert(key.clone(), now_down).unwrap_or(false);
            if now_down && !before {
                b.state.health.cluster_down.store(true, Relaxed);
                if !b.state.own_verdict_down(now_ms()) {
                    tracing::warn!(pool, backend = %key.1, reported_by = ?down_on[&key], "peer reports backend down; out of rotation here too");
                }
            } else if !now_down && before {
                b.state.health.cluster_down.store(false, Relaxed);
                tracing::info!(pool, backend = %key.1, "no peer reports backend down any more");
            }
            present.insert(key);
        }
        peers_said_down.retain(|k, _| present.contains(k));
        last_grew.retain(|k, _| present.contains(k));

        let backends_changed = cluster.registry.merge(seen_registry);
        let routes_changed = cluster.registry.merge_routes(seen_routes);
        if backends_changed || routes_changed {
            tracing::info!(backends = backends_changed, routes = routes_changed, "registry changed through gossip");
            if let Err(e) = node.apply() {
                tracing::error!(error = %e, "cannot apply the registry");
            }
            cluster.persist(&node);
        }
        if cluster.registry.merge_certs(seen_certs) {
            tracing::info!("cluster certificates changed through gossip");
            node.apply_certs();
            cluster.persist(&node);
        }

        // Cluster-scope rate limits: this node's share of the cluster's request rate.
        let total: f64 = members.iter().filter(|m| m.state == MemberState::Alive || m.is_self).map(|m| m.rps).sum();
        let own = members.iter().find(|m| m.is_self).map_or(0.0, |m| m.rps);
        let alive = members.iter().filter(|m| m.state == MemberState::Alive).count().max(1) as f64;
        let share = if total > 1.0 { own / total } else { 1.0 / alive };
        for limiter in runtime.upstreams.iter().filter_map(|u| u.limiter.as_ref()) {
            if limiter.settings().scope == crate::config::LimitScope::Cluster {
                limiter.set_share(share);
            }
        }

        let old = cluster.view.load();
        for e in change::diff(&old.members, &members) {
            tracing::info!(event = ?e, "membership");
        }
        for m in &members {
            first_seen.entry(m.node_id.clone()).or_insert_with(Instant::now);
        }
        cluster.view.store(Arc::new(ClusterView {
            members,
            first_seen: first_seen.clone(),
            down_on,
            remote_in_flight: remote,
        }));
    }
}
