//! The gRPC control plane (tonic): what `shoal` and joining nodes call. Every mutation goes
//! through the registry, the same path gossip uses. With a cluster secret, every call must
//! carry a token for that one call (`auth`); others are refused (`Unauthenticated`) and counted.

pub mod auth;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shoal_proto as pb;
use shoal_proto::control_server::{Control, ControlServer};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::Node;
use crate::cluster::registry::{CertEntry, CertOp, RegOp, RouteEntry};
use crate::lifecycle::MemberState;
use crate::pool::now_ms;
use crate::route::{HostPattern, PathPattern, RouteAction, RouteSpec};

/// Serves the control plane on `listener` until `stop` fires: plain HTTP/2, or TLS with the
/// node's certificates when `[tls] control = true`.
pub async fn serve(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let gate = node.control_gate.clone();
    let tls = node.proxy.tls.clone().filter(|t| t.settings.load().control);
    let service = auth::Gated { inner: ControlServer::new(ControlService { node }), gate };
    let server = tonic::transport::Server::builder().add_service(service);
    let served = match tls {
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            server.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await
        }
        Some(tls) => {
            let incoming = tls_incoming(listener, tls, stop.clone());
            server.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "control plane stopped");
    }
}

/// Accepted control connections after their TLS handshake (each within the handshake timeout,
/// on a task of its own so a slow client does not hold the others up).
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<crate::tls::Tls>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsControlIo, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "control accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.control_server_config());
            let (tx, timeout) = (tx.clone(), tls.settings.load().handshake_timeout);
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsControlIo(stream))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(client = %addr, error = %e, "control TLS handshake failed"),
                    Err(_) => tracing::debug!(client = %addr, "no control TLS handshake within the timeout"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A control connection over TLS, as tonic's server takes it.
struct TlsControlIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsControlIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsControlIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsControlIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

struct ControlService {
    node: Arc<Node>,
}

/// Connects to another node's control plane (used by `Join`), over TLS when `tls` is given.
pub async fn connect(
    addr: &str,
    secret: Option<&[u8]>,
    tls: Option<shoal_proto::ControlTls>,
) -> Result<
    pb::control_client::ControlClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, shoal_proto::Signer>,
    >,
    Status,
> {
    let channel = shoal_proto::control_channel(addr, tls, Duration::from_secs(3), Some(Duration::from_secs(10)))
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
    Ok(pb::control_client::ControlClient::with_interceptor(channel, shoal_proto::Signer(secret.map(Arc::from))))
}

impl ControlService {
    fn cluster(&self) -> Result<&Arc<crate::cluster::Cluster>, Status> {
        self.node.cluster.get().ok_or_else(|| Status::unavailable("the node is still starting"))
    }

    fn members(&self) -> Vec<pb::Member> {
        let Some(cluster) = self.node.cluster.get() else { return Vec::new() };
        let view = cluster.view.load();
        view.members
            .iter()
            .map(|m| pb::Member {
                node_id: m.node_id.clone(),
                generation: m.generation,
                state: if m.is_self { self.node.lifecycle.get().name().into() } else { m.state.name().into() },
                gossip_addr: m.gossip_addr.to_string(),
                proxy_addr: m.proxy_addr.map(|a| a.to_string()).unwrap_or_default(),
                control_addr: m.control_addr.map(|a| a.to_string()).unwrap_or_default(),
                admin_addr: m.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
                in_flight: if m.is_self { self.node.in_flight() } else { m.in_flight },
                req_per_sec: m.rps,
                age_secs: view.first_seen.get(&m.node_id).map_or(0, |t| t.elapsed().as_secs()),
                is_self: m.is_self,
            })
            .collect()
    }

    /// Every backend of every pool, pool by pool.
    fn backends(&self) -> Vec<pb::Backend> {
        let runtime = self.node.runtime();
        let now = now_ms();
        let config = self.node.config.load();
        let (view, registry) = match self.node.cluster.get() {
            Some(c) => (Some(c.view.load_full()), c.registry.entries()),
            None => (None, Vec::new()),
        };
        let mut out = Vec::new();
        for u in &runtime.upstreams {
            let configured = config.pools().find(|p| p.name == u.name()).map_or(&[][..], |p| &p.backends[..]);
            for b in &u.pool.snapshot().backends {
                let s = &b.state;
                let from_runtime = registry.iter().any(|e| e.pool == u.name() && e.addr == b.spec.addr)
                    || !configured.iter().any(|c| c.addr == b.spec.addr);
                let key = (u.name().to_string(), b.spec.addr);
                out.push(pb::Backend {
                    addr: b.spec.addr.to_string(),
                    weight: b.spec.weight,
                    max_conns: b.spec.max_conns,
                    backup: b.spec.backup,
                    state: s.state_name(now).into(),
                    local_in_flight: s.in_flight.load(Relaxed) as u64,
                    cluster_in_flight: s.load() as u64,
                    requests: s.requests.load(Relaxed),
                    failures: s.failures.load(Relaxed),
                    source: if from_runtime { "runtime" } else { "config" }.into(),
                    down_on: view.as_ref().and_then(|v| v.down_on.get(&key).cloned()).unwrap_or_default(),
                    pool: u.name().to_string(),
                });
            }
        }
        out
    }

    /// Every pool with its settings and a summary of its backends.
    fn upstreams(&self) -> Vec<pb::Upstream> {
        let runtime = self.node.runtime();
        let config = self.node.config.load();
        let now = now_ms();
        let nodes = self.node.proxy.serving_nodes();
        runtime
            .summaries(now, nodes)
            .into_iter()
            .map(|p| {
                let (u, s) = (p.upstream, &p.upstream.settings);
                pb::Upstream {
                    name: u.name().to_string(),
                    algorithm: s.algorithm.name().into(),
                    backends: p.backends as u32,
                    up: p.up as u32,
                    local_in_flight: p.in_flight,
                    cluster_in_flight: p.cluster_in_flight,
                    requests: p.requests,
                    health_checks: s.health.is_some(),
                    sticky_cookie: s.sticky.as_ref().map(|c| c.cookie.clone()).unwrap_or_default(),
                    rate_limit: s
                        .rate_limit
                        .as_ref()
                        .map(|r| format!("{}r/s burst {}", r.per_second, r.burst))
                        .unwrap_or_default(),
                    source: if config.pools().any(|c| c.name == u.name()) { "config" } else { "runtime" }.into(),
                    routes: p.routes as u32,
                    tls: u.tls.is_some(),
                }
            })
            .collect()
    }

    /// Every route, in the order the table was built (the config's, then the registry's).
    fn routes(&self) -> Vec<pb::Route> {
        let runtime = self.node.runtime();
        let config = self.node.config.load();
        let registry = self.node.cluster.get().map(|c| c.registry.routes()).unwrap_or_default();
        runtime
            .route_list
            .iter()
            .map(|r| {
                let spec = &r.entry.spec;
                let (host, path) = (spec.host.text(), spec.path.text());
                let (upstream, strip_prefix, redirect) = match &spec.action {
                    RouteAction::Pool { upstream, strip_prefix } => (upstream.clone(), *strip_prefix, String::new()),
                    RouteAction::Redirect { origin } => (String::new(), false, origin.clone()),
                };
                let from_runtime = registry.iter().any(|e| e.host == host && e.path == path)
                    || !config.routes.iter().any(|c| c == spec);
                pb::Route {
                    host,
                    path,
                    upstream,
                    strip_prefix,
                    redirect,
                    source: if from_runtime { "runtime" } else { "config" }.into(),
                    name: r.name.to_string(),
                }
            })
            .collect()
    }

    fn registry_change(
        &self,
        pool: &str,
        addr: &str,
        op: RegOp,
        weight: u32,
        max_conns: u32,
        backup: bool,
    ) -> Result<Response<pb::BackendReply>, Status> {
        let addr: SocketAddr =
            addr.parse().map_err(|_| Status::invalid_argument(format!("{addr:?} is not an IP:PORT address")))?;
        let cluster = self.cluster()?;
        let runtime = self.node.runtime();
        let upstream = match (pool, op) {
            ("", RegOp::Add) => runtime.upstreams[0].clone(),
            ("", _) => {
                let holding: Vec<_> =
                    runtime.upstreams.iter().filter(|u| u.pool.snapshot().find(addr).is_some()).collect();
                match holding.as_slice() {
                    [] => return Err(Status::not_found(format!("unknown backend {addr}"))),
                    [one] => (*one).clone(),
                    many => {
                        let names: Vec<&str> = many.iter().map(|u| u.name()).collect();
                        return Err(Status::invalid_argument(format!(
                            "backend {addr} is in pools {}: name one with --upstream",
                            names.join(", ")
                        )));
                    }
                }
            }
            (name, _) => runtime.find(name).cloned().ok_or_else(|| {
                let names: Vec<&str> = runtime.upstreams.iter().map(|u| u.name()).collect();
                Status::not_found(format!(
                    "unknown pool {name:?} (pools here: {}; a pool is defined in the config as [upstreams.{name}])",
                    names.join(", ")
                ))
            })?,
        };
        let snapshot = upstream.pool.snapshot();
        let existing = snapshot.find(addr);
        if op != RegOp::Add && existing.is_none() {
            return Err(Status::not_found(format!("unknown backend {addr} in pool {}", upstream.name())));
        }
        if op == RegOp::Add && !(1..=1000).contains(&weight) {
            return Err(Status::invalid_argument(format!("weight {weight} out of range 1..=1000")));
        }
        let (weight, max_conns, backup) = match (op, existing) {
            (RegOp::Add, _) | (_, None) => (weight, max_conns, backup),
            (_, Some(b)) => (b.spec.weight, b.spec.max_conns, b.spec.backup),
        };
        let origin = self.node.id();
        let name = upstream.name().to_string();
        let entry = cluster.change_registry(|r| r.record(&name, addr, op, weight, max_conns, backup, &origin));
        tracing::info!(pool = %name, backend = %addr, op = op.name(), hlc = entry.hlc, "backend registry changed here");
        Ok(Response::new(pb::BackendReply {
            message: format!("backend {addr} ({name}): {}", op.name()),
            backends: self.backends(),
        }))
    }
}

/// One certificate as `shoal cert list` shows it.
fn cert_row(info: &crate::tls::certs::CertInfo, now: i64) -> pb::Cert {
    pb::Cert {
        name: info.name.clone(),
        names: info.names.clone(),
        issuer: info.issuer.clone(),
        not_after: info.not_after,
        not_after_utc: crate::civil::date_time(info.not_after),
        days_left: info.days_left(now),
        source: info.source.clone(),
        error: String::new(),
    }
}

impl ControlService {
    /// The certificates this node serves (files and cluster), then cluster entries it does
    /// not serve, with the reason (no `[tls]` here, cannot be opened, expired).
    fn certs(&self) -> Vec<pb::Cert> {
        use crate::tls::certs::{CLUSTER_SOURCE, open_sealed, unix_now};
        let now = unix_now();
        let mut rows: Vec<pb::Cert> = match &self.node.proxy.tls {
            Some(tls) => tls.certificates().iter().map(|c| cert_row(c, now)).collect(),
            None => Vec::new(),
        };
        let Some(cluster) = self.node.cluster.get() else { return rows };
        let config = self.node.config.load();
        for e in cluster.registry.certs().into_iter().filter(|e| e.op == CertOp::Add) {
            if rows.iter().any(|r| r.source == CLUSTER_SOURCE && r.name == e.name) {
                continue;
            }
            let opened = config.cluster.secret.as_deref().ok_or("no cluster secret".to_string());
            let mut row = match opened.and_then(|secret| open_sealed(secret, &e.sealed, "certificate", "key")) {
                Ok(l) => cert_row(&l.info, now),
                Err(why) => pb::Cert { name: e.name.clone(), error: why, ..Default::default() },
            };
            row.source = CLUSTER_SOURCE.into();
            if row.error.is_empty() && self.node.proxy.tls.is_none() {
                row.error = "not served here: this node has no [tls] listener".into();
            }
            rows.push(row);
        }
        rows
    }
}

type LeaveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaveProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let config = self.node.config.load();
        Ok(Response::new(pb::StatusReply {
            node_id: config.node.id.clone(),
            cluster_id: config.cluster.id.clone(),
            state: self.node.lifecycle.get().name().into(),
            members: self.members(),
            backends: self.backends(),
            algorithm: config.upstream.algorithm.name().into(),
            upstreams: self.upstreams(),
        }))
    }

    async fn members(&self, _: Request<pb::MembersRequest>) -> Result<Response<pb::MembersReply>, Status> {
        Ok(Response::new(pb::MembersReply { members: self.members() }))
    }

    async fn hello(&self, req: Request<pb::HelloRequest>) -> Result<Response<pb::HelloReply>, Status> {
        let req = req.into_inner();
        let cluster = self.cluster()?;
        if !req.cluster_id.is_empty() && req.cluster_id != cluster.cluster_id {
            return Err(Status::failed_precondition(format!(
                "wrong cluster: this node is in cluster {:?}, the joiner is in {:?}",
                cluster.cluster_id, req.cluster_id
            )));
        }
        let mut seeds: Vec<String> =
            cluster.members().iter().filter(|m| m.state.serves()).map(|m| m.gossip_addr.to_string()).collect();
        seeds.sort();
        seeds.dedup();
        let registry = cluster
            .registry
            .entries()
            .into_iter()
            .map(|e| pb::RegistryEntry {
                pool: e.pool,
                addr: e.addr.to_string(),
                weight: e.weight,
                max_conns: e.max_conns,
                backup: e.backup,
                op: e.op.name().into(),
                hlc: e.hlc,
                origin: e.origin,
            })
            .collect();
        let certs = cluster
            .registry
            .certs()
            .into_iter()
            .map(|e| pb::CertEntry {
                name: e.name,
                hlc: e.hlc,
                op: e.op.name().into(),
                origin: e.origin,
                sealed: e.sealed,
            })
            .collect();
        let routes = cluster
            .registry
            .routes()
            .into_iter()
            .map(|e| pb::RouteEntry {
                host: e.host,
                path: e.path,
                hlc: e.hlc,
                op: e.op.name().into(),
                upstream: e.upstream,
                strip_prefix: e.strip_prefix,
                redirect: e.redirect,
                origin: e.origin,
            })
            .collect();
        Ok(Response::new(pb::HelloReply {
            cluster_id: cluster.cluster_id.clone(),
            gossip_seeds: seeds,
            registry,
            certs,
            routes,
        }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let seed = req.into_inner().seed;
        let cluster = self.cluster()?.clone();
        let config = self.node.config.load_full();
        let tls = match self.node.proxy.tls.as_ref().filter(|t| t.settings.load().control) {
            Some(t) => Some(t.control_client().map_err(Status::internal)?),
            None => None,
        };
        let mut client = connect(&seed, config.cluster.secret.as_deref(), tls).await?;
        let hello = client
            .hello(pb::HelloRequest { node_id: config.node.id.clone(), cluster_id: cluster.cluster_id.clone() })
            .await
            .map_err(|s| Status::new(s.code(), format!("seed {seed}: {}", s.message())))?
            .into_inner();
        let entries = hello.registry.into_iter().filter_map(|e| {
            Some(crate::cluster::registry::RegEntry {
                pool: if e.pool.is_empty() { crate::config::DEFAULT_POOL.to_string() } else { e.pool },
                addr: e.addr.parse().ok()?,
                hlc: e.hlc,
                op: RegOp::parse(&e.op)?,
                weight: e.weight.clamp(1, 1000),
                max_conns: e.max_conns,
                backup: e.backup,
                origin: e.origin,
            })
        });
        let routes = hello.routes.into_iter().filter_map(|e| {
            Some(RouteEntry {
                host: e.host,
                path: e.path,
                hlc: e.hlc,
                op: CertOp::parse(&e.op)?,
                upstream: e.upstream,
                strip_prefix: e.strip_prefix,
                redirect: e.redirect,
                origin: e.origin,
            })
        });
        let backends_changed = cluster.registry.merge(entries);
        if cluster.registry.merge_routes(routes) || backends_changed {
            self.node.apply().map_err(Status::internal)?;
        }
        let certs = hello.certs.into_iter().filter_map(|e| {
            Some(CertEntry { name: e.name, hlc: e.hlc, op: CertOp::parse(&e.op)?, origin: e.origin, sealed: e.sealed })
        });
        if cluster.registry.merge_certs(certs) {
            self.node.apply_certs();
        }
        let seeds: Vec<SocketAddr> = hello.gossip_seeds.iter().filter_map(|s| s.parse().ok()).collect();
        if seeds.is_empty() {
            return Err(Status::failed_precondition(format!("seed {seed} reported no live members")));
        }
        // Gossip with the seeds until they show up as live here (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            for s in &seeds {
                cluster.gossip_with(*s).await;
            }
            let live = cluster.members().iter().filter(|m| !m.is_self && m.state == MemberState::Alive).count();
            if live > 0 || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let members = cluster.members().iter().filter(|m| m.state == MemberState::Alive).count() as u32;
        if members < 2 {
            return Err(Status::deadline_exceeded(format!(
                "gossip with {seed}'s members did not converge within 5s (is UDP to {:?} open?)",
                hello.gossip_seeds
            )));
        }
        tracing::info!(seed = %seed, members, "joined the cluster");
        Ok(Response::new(pb::JoinReply { cluster_id: hello.cluster_id, members }))
    }

    type LeaveStream = LeaveStream;

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<LeaveStream>, Status> {
        let timeout_ms = req.into_inner().drain_timeout_ms;
        if timeout_ms > 0 {
            self.node.proxy.set_drain_timeout(Duration::from_millis(timeout_ms));
        }
        tracing::info!(drain_timeout_ms = timeout_ms, "leave requested over the control plane");
        // Draining from the first progress message on (run() announces it in gossip next).
        self.node.lifecycle.set(MemberState::Draining);
        self.node.leave.cancel();
        let node = self.node.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let state = node.lifecycle.get();
                let progress = pb::LeaveProgress {
                    phase: state.name().into(),
                    in_flight: node.in_flight(),
                    message: String::new(),
                };
                if tx.send(Ok(progress)).await.is_err() || state == MemberState::Left {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn backend_list(&self, _: Request<pb::BackendListRequest>) -> Result<Response<pb::BackendListReply>, Status> {
        Ok(Response::new(pb::BackendListReply { backends: self.backends() }))
    }

    async fn backend_add(&self, req: Request<pb::BackendAddRequest>) -> Result<Response<pb::BackendReply>, Status> {
        let r = req.into_inner();
        let weight = if r.weight == 0 { 1 } else { r.weight };
        self.registry_change(&r.upstream, &r.addr, RegOp::Add, weight, r.max_conns, r.backup)
    }

    async fn backend_remove(&self, req: Request<pb::BackendAddrRequest>) -> Result<Response<pb::BackendReply>, Status> {
        let r = req.into_inner();
        self.registry_change(&r.upstream, &r.addr, RegOp::Remove, 1, 0, false)
    }

    async fn backend_drain(&self, req: Request<pb::BackendAddrRequest>) -> Result<Response<pb::BackendReply>, Status> {
        let r = req.into_inner();
        self.registry_change(&r.upstream, &r.addr, RegOp::Drain, 1, 0, false)
    }

    async fn route_list(&self, _: Request<pb::RouteListRequest>) -> Result<Response<pb::RouteReply>, Status> {
        Ok(Response::new(pb::RouteReply { message: String::new(), routes: self.routes() }))
    }

    async fn route_add(&self, req: Request<pb::RouteAddRequest>) -> Result<Response<pb::RouteReply>, Status> {
        let r = req.into_inner();
        let cluster = self.cluster()?;
        let file = crate::config::file::RouteFile {
            host: Some(r.host).filter(|h| !h.is_empty()),
            path: Some(r.path).filter(|p| !p.is_empty()),
            upstream: Some(r.upstream).filter(|u| !u.is_empty()),
            strip_prefix: r.strip_prefix,
            redirect: Some(r.redirect).filter(|o| !o.is_empty()),
        };
        let spec: RouteSpec = crate::config::route_spec(&file).map_err(Status::invalid_argument)?;
        if let RouteAction::Pool { upstream, .. } = &spec.action {
            let runtime = self.node.runtime();
            let Some(u) = runtime.find(upstream) else {
                let names: Vec<&str> = runtime.upstreams.iter().map(|u| u.name()).collect();
                return Err(Status::not_found(format!("unknown pool {upstream:?} (pools here: {})", names.join(", "))));
            };
            if u.pool.snapshot().backends.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "pool {upstream:?} has no backends: add one first (shoal backend add ADDR --upstream {upstream})"
                )));
            }
        }
        let origin = self.node.id();
        let entry = cluster.change_registry(|reg| reg.record_route(&spec.host, &spec.path, Some(&spec), &origin));
        tracing::info!(route = %spec.describe(), hlc = entry.hlc, "route set here");
        Ok(Response::new(pb::RouteReply { message: format!("route {} set", spec.describe()), routes: self.routes() }))
    }

    async fn route_remove(&self, req: Request<pb::RouteRemoveRequest>) -> Result<Response<pb::RouteReply>, Status> {
        let r = req.into_inner();
        let cluster = self.cluster()?;
        let host = HostPattern::parse(Some(&r.host)).map_err(Status::invalid_argument)?;
        let path = PathPattern::parse(Some(&r.path).filter(|p| !p.is_empty()).map(String::as_str))
            .map_err(Status::invalid_argument)?;
        let runtime = self.node.runtime();
        let Some(route) = runtime.route_list.iter().find(|x| x.entry.spec.host == host && x.entry.spec.path == path)
        else {
            return Err(Status::not_found(format!("no route for host {:?} and path {:?}", host.text(), path.text())));
        };
        let name = route.name.clone();
        let origin = self.node.id();
        let entry = cluster.change_registry(|reg| reg.record_route(&host, &path, None, &origin));
        tracing::info!(route = %name, hlc = entry.hlc, "route removed here");
        Ok(Response::new(pb::RouteReply { message: format!("route {name} removed"), routes: self.routes() }))
    }

    async fn upstream_list(
        &self,
        _: Request<pb::UpstreamListRequest>,
    ) -> Result<Response<pb::UpstreamListReply>, Status> {
        Ok(Response::new(pb::UpstreamListReply { upstreams: self.upstreams() }))
    }

    async fn cert_add(&self, req: Request<pb::CertAddRequest>) -> Result<Response<pb::CertReply>, Status> {
        let pb::CertAddRequest { sealed, cert_file, key_file } = req.into_inner();
        let cluster = self.cluster()?;
        let config = self.node.config.load();
        let Some(secret) = config.cluster.secret.as_deref() else {
            return Err(Status::failed_precondition(
                "cluster certificates need a cluster secret: they travel and are stored sealed with it",
            ));
        };
        let name_of = |f: String, default: &str| if f.is_empty() { default.to_string() } else { f };
        let (cert_file, key_file) = (name_of(cert_file, "certificate"), name_of(key_file, "key"));
        let loaded =
            crate::tls::certs::open_sealed(secret, &sealed, &cert_file, &key_file).map_err(Status::invalid_argument)?;
        let name = loaded.info.name.clone();
        let origin = self.node.id();
        let entry = cluster.change_certs(|r| r.record_cert(&name, CertOp::Add, sealed, &origin));
        tracing::info!(name = %name, names = ?loaded.info.names, hlc = entry.hlc, "cluster certificate added here");
        Ok(Response::new(pb::CertReply {
            message: format!(
                "certificate {name} ({}) added; every node with [tls] serves it within seconds",
                loaded.info.names.join(", ")
            ),
            certs: self.certs(),
        }))
    }

    async fn cert_list(&self, _: Request<pb::CertListRequest>) -> Result<Response<pb::CertReply>, Status> {
        Ok(Response::new(pb::CertReply { message: String::new(), certs: self.certs() }))
    }

    async fn cert_remove(&self, req: Request<pb::CertRemoveRequest>) -> Result<Response<pb::CertReply>, Status> {
        let name = req.into_inner().name;
        let cluster = self.cluster()?;
        let known = cluster.registry.certs().iter().any(|e| e.name == name && e.op == CertOp::Add);
        if !known {
            return Err(Status::not_found(format!(
                "no cluster certificate {name:?} (certificates from files are removed from the config file)"
            )));
        }
        let origin = self.node.id();
        cluster.change_certs(|r| r.record_cert(&name, CertOp::Remove, Vec::new(), &origin));
        tracing::info!(name = %name, "cluster certificate removed here");
        Ok(Response::new(pb::CertReply {
            message: format!("certificate {name} removed from the cluster"),
            certs: self.certs(),
        }))
    }
}
