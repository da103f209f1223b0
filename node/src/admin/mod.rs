//! The admin listener: `/live` (process up), `/ready` (alive and accepting: fails at once when
//! the node starts to leave), `/metrics` (Prometheus text), `/status` (JSON view of this node,
//! its members and backends), `/history` (this node's last 15 minutes, one sample a second),
//! `/cluster` (every member's history, fetched from their admin ports) and the dashboard at `/`.

mod dashboard;
mod history;
mod metrics;
mod peers;

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Node;
use crate::lifecycle::MemberState;
use crate::pool::now_ms;

/// Serves the admin endpoints until `stop` fires.
pub async fn serve(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let registry = Arc::new(metrics::registry(node.clone()));
    let history = Arc::new(Mutex::new(history::History::default()));
    tokio::spawn(history::run(node.clone(), history.clone(), stop.clone()));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (node, registry, history) = (node.clone(), registry.clone(), history.clone());
        // A request head (and an idle keep-alive) gets client_header_timeout, as on the proxy
        // port: a half-sent request must not hold a connection forever.
        let header_timeout = node.config.load().node.client_header_timeout;
        tokio::spawn(async move {
            let svc = service_fn(move |req| route(node.clone(), registry.clone(), history.clone(), req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

async fn route(
    node: Arc<Node>,
    registry: Arc<prometheus_client::registry::Registry>,
    history: Arc<Mutex<history::History>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    // `?last=N`: how many of the newest one-second samples (all 15 minutes by default).
    let last = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("last=")))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(history::KEEP)
        .min(history::KEEP);
    Ok(match req.uri().path() {
        "/live" => reply(StatusCode::OK, TEXT, "live\n"),
        "/ready" => match node.lifecycle.get() {
            MemberState::Alive => reply(StatusCode::OK, TEXT, "ready\n"),
            s => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready: {}\n", s.name())),
        },
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &registry) {
                Ok(()) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", out),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "metrics encoding failed\n"),
            }
        }
        "/status" => reply(StatusCode::OK, JSON, status_json(&node).to_string()),
        "/history" => {
            let body = history.lock().unwrap_or_else(|e| e.into_inner()).to_json(&node, last).to_string();
            reply(StatusCode::OK, JSON, body)
        }
        "/cluster" => reply(StatusCode::OK, JSON, peers::cluster_json(&node, &history, last).await.to_string()),
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", dashboard::PAGE),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /, /status, /history, /cluster, /metrics, /live, /ready\n",
        ),
    })
}

/// This node's view as JSON: stub_status totals, members and backends.
pub fn status_json(node: &Node) -> serde_json::Value {
    use serde_json::json;
    let config = node.config.load();
    let s = &node.proxy.stats;
    let now = now_ms();
    let view = node.cluster.get().map(|c| c.view.load_full());
    let runtime = node.runtime();
    let nodes = node.proxy.serving_nodes();
    let pools: Vec<_> = runtime
        .summaries(now, nodes)
        .into_iter()
        .map(|p| {
            let (u, s) = (p.upstream, &p.upstream.settings);
            json!({
                "name": u.name(),
                "algorithm": s.algorithm.name(),
                "backends": p.backends,
                "up": p.up,
                "in_flight": p.in_flight,
                "cluster_in_flight": p.cluster_in_flight,
                "requests": p.requests,
                "health_checks": s.health.is_some(),
                "sticky_cookie": s.sticky.as_ref().map(|c| c.cookie.clone()),
                "tls": u.tls.is_some(),
                "routes": p.routes,
            })
        })
        .collect();
    let routes: Vec<_> = runtime
        .route_list
        .iter()
        .map(|r| {
            let spec = &r.entry.spec;
            let (upstream, strip, redirect) = match &spec.action {
                crate::route::RouteAction::Pool { upstream, strip_prefix } => {
                    (Some(upstream.as_str()), *strip_prefix, None)
                }
                crate::route::RouteAction::Redirect { origin } => (None, false, Some(origin.as_str())),
            };
            json!({ "name": r.name.as_ref(), "host": spec.host.text(), "path": spec.path.text(),
                "upstream": upstream, "strip_prefix": strip, "redirect": redirect })
        })
        .collect();
    let backends: Vec<_> = runtime
        .backends()
        .iter()
        .map(|(pool, b)| {
            let st = &b.state;
            let key = (pool.to_string(), b.spec.addr);
            json!({
                "pool": pool,
                "addr": st.addr_text.as_ref(),
                "weight": b.spec.weight,
                "max_conns": b.spec.max_conns,
                // This node's claim on max_conns (null when unlimited or before its first round).
                "claim": st.claimed(),
                "backup": b.spec.backup,
                "state": st.state_name(now),
                "own_verdict": if st.own_verdict_down(now) { "down" } else { "up" },
                "down_on": view.as_ref().and_then(|v| v.down_on.get(&key).cloned()).unwrap_or_default(),
                "in_flight": st.in_flight.load(Relaxed),
                "cluster_in_flight": st.load(),
                // The least-conn picker's response-time estimate, and the peers' mean report.
                "latency_estimate_ms": st.speed.estimate(now) as f64 / 1000.0,
                "peers_latency_ms": st.speed.remote() as f64 / 1000.0,
                "requests": st.requests.load(Relaxed),
                "failures": st.failures.load(Relaxed),
                "retries": st.retries.load(Relaxed),
                "responses": {
                    "1xx": st.responses[0].load(Relaxed), "2xx": st.responses[1].load(Relaxed),
                    "3xx": st.responses[2].load(Relaxed), "4xx": st.responses[3].load(Relaxed),
                    "5xx": st.responses[4].load(Relaxed),
                },
                "idle_connections": st.idle.len(),
                // Whether this node probes the backend itself (active checks, `checkers`).
                "checked_here": runtime.find(pool).and_then(|u| u.settings.health.as_ref())
                    .map(|h| node.roster.checks_here(pool, b.spec.addr, h.checkers)),
                "probes": st.health.probes.load(Relaxed),
            })
        })
        .collect();
    let members: Vec<_> = view
        .as_ref()
        .map(|v| {
            v.members
                .iter()
                .map(|m| {
                    json!({
                        "id": m.node_id,
                        "generation": m.generation,
                        "state": if m.is_self { node.lifecycle.get().name() } else { m.state.name() },
                        "gossip": m.gossip_addr.to_string(),
                        "proxy": m.proxy_addr.map(|a| a.to_string()),
                        "admin": m.admin_addr.map(|a| a.to_string()),
                        "control": m.control_addr.map(|a| a.to_string()),
                        "in_flight": if m.is_self { node.in_flight() } else { m.in_flight },
                        "rps": m.rps,
                        "self": m.is_self,
                        "age_secs": v.first_seen.get(&m.node_id).map_or(0, |t| t.elapsed().as_secs()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "node": config.node.id,
        "cluster": config.cluster.id,
        "state": node.lifecycle.get().name(),
        "algorithm": config.upstream.algorithm.name(),
        "uptime_secs": node.started.elapsed().as_secs(),
        "connections": {
            "active": s.active.load(Relaxed),
            "accepts": s.accepts.load(Relaxed),
            "handled": s.handled.load(Relaxed),
            "requests": s.requests.load(Relaxed),
        },
        "errors": {
            "no_backend": s.no_backend.load(Relaxed),
            "bad_gateway": s.bad_gateway.load(Relaxed),
            "timeout": s.timeouts.load(Relaxed),
            "rate_limited": s.rate_limited.load(Relaxed),
            "bad_request": s.bad_requests.load(Relaxed),
            "headers_too_large": s.headers_too_large.load(Relaxed),
        },
        "retries": s.retries.load(Relaxed),
        "tls": node.proxy.tls.as_ref().map(|t| {
            let now = crate::tls::certs::unix_now();
            let st = &t.stats;
            json!({
                "listen": t.settings.load().listen.to_string(),
                "shared_tickets": t.shared_tickets,
                "handshakes": st.handshakes.load(Relaxed),
                "resumed": st.resumed.load(Relaxed),
                "failed": st.failed.load(Relaxed),
                "timed_out": st.timed_out.load(Relaxed),
                "closed": st.closed.load(Relaxed),
                "certificates": t.certificates().iter().map(|c| json!({
                    "name": c.name,
                    "names": c.names,
                    "issuer": c.issuer,
                    "not_after": c.not_after,
                    "days_left": c.days_left(now),
                    "source": c.source,
                })).collect::<Vec<_>>(),
            })
        }),
        "members": members,
        "pools": pools,
        "routes": routes,
        "backends": backends,
    })
}
