//! `/metrics`: a prometheus-client collector that reads the node's atomics at scrape time, so
//! the request path only ever increments counters (no metric-family lookups per request).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::Node;
use crate::lifecycle::MemberState;
use crate::pool::now_ms;

pub fn registry(node: Arc<Node>) -> Registry {
    let mut r = Registry::with_prefix("shoal");
    r.register_collector(Box::new(NodeCollector(node)));
    r
}

#[derive(Debug)]
struct NodeCollector(Arc<Node>);

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id()).finish()
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = &self.0;
        let s = &node.proxy.stats;
        {
            let config = node.config.load();
            let mut m = enc.encode_descriptor(
                "build_info",
                "1, labelled with this node's version, id and cluster",
                None,
                MetricType::Gauge,
            )?;
            let labels = [
                ("version", env!("CARGO_PKG_VERSION")),
                ("node", config.node.id.as_str()),
                ("cluster", config.cluster.id.as_str()),
            ];
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        {
            use crate::events::{Kind, Tone};
            let mut m = enc.encode_descriptor(
                "events",
                "Dashboard events by kind (member, backend, reload) and tone (bad: dead, down, refused reload)",
                None,
                MetricType::Counter,
            )?;
            for kind in Kind::ALL {
                for tone in Tone::ALL {
                    let labels = [("kind", kind.name()), ("tone", tone.name())];
                    ConstCounter::new(node.events.count(kind, tone)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        // nginx stub_status totals.
        gauge(&mut enc, "connections_active", "Client connections open now", s.active.load(Relaxed) as i64)?;
        counter(&mut enc, "connections_accepted", "Client connections accepted", s.accepts.load(Relaxed))?;
        counter(&mut enc, "connections_handled", "Client connections handled", s.handled.load(Relaxed))?;
        counter(&mut enc, "requests", "Client requests", s.requests.load(Relaxed))?;
        counter(&mut enc, "retries", "Requests retried on another backend", s.retries.load(Relaxed))?;
        counter(&mut enc, "retries_refused", "Retries refused by the retry budget", s.retries_refused.load(Relaxed))?;
        {
            let mut m = enc.encode_descriptor(
                "proxy_errors",
                "Requests answered by the proxy itself, by cause",
                None,
                MetricType::Counter,
            )?;
            for (cause, v) in [
                ("no_backend", &s.no_backend),
                ("bad_gateway", &s.bad_gateway),
                ("timeout", &s.timeouts),
                ("rate_limited", &s.rate_limited),
                ("headers_too_large", &s.headers_too_large),
                ("bad_request", &s.bad_requests),
                ("header_timeout", &s.header_timeouts),
                ("not_implemented", &s.not_implemented),
            ] {
                ConstCounter::new(v.load(Relaxed)).encode(m.encode_family(&[("cause", cause)])?)?;
            }
        }

        if let Some(tls) = &node.proxy.tls {
            let st = &tls.stats;
            counter(&mut enc, "tls_handshakes", "TLS handshakes completed", st.handshakes.load(Relaxed))?;
            counter(
                &mut enc,
                "tls_resumed_handshakes",
                "TLS handshakes that resumed a session",
                st.resumed.load(Relaxed),
            )?;
            {
                let mut m = enc.encode_descriptor(
                    "tls_handshake_failures",
                    "TLS handshakes that failed (bad hello, no shared version or cipher), timed out, or the client closed",
                    None,
                    MetricType::Counter,
                )?;
                for (cause, v) in [("failed", &st.failed), ("timeout", &st.timed_out), ("closed", &st.closed)] {
                    ConstCounter::new(v.load(Relaxed)).encode(m.encode_family(&[("cause", cause)])?)?;
                }
            }
            let now = crate::tls::certs::unix_now();
            let mut m = enc.encode_descriptor(
                "tls_certificate_expiry_days",
                "Whole days until a served certificate expires (negative: expired)",
                None,
                MetricType::Gauge,
            )?;
            for c in tls.certificates() {
                let labels = [("name", c.name.as_str()), ("source", c.source.as_str())];
                ConstGauge::new(c.days_left(now)).encode(m.encode_family(&labels)?)?;
            }
        }
        let runtime = node.runtime();
        let pairs = runtime.backends();
        let pool_nodes = node.proxy.serving_nodes();
        let now = now_ms();
        macro_rules! per_backend {
            ($name:expr, $help:expr, $ty:expr, $value:expr) => {{
                let mut m = enc.encode_descriptor($name, $help, None, $ty)?;
                for (pool, b) in &pairs {
                    let labels = [("pool", *pool), ("backend", &*b.state.addr_text)];
                    let v = $value(b);
                    if $ty == MetricType::Counter {
                        ConstCounter::new(v as u64).encode(m.encode_family(&labels)?)?;
                    } else {
                        ConstGauge::new(v as i64).encode(m.encode_family(&labels)?)?;
                    }
                }
            }};
        }
        per_backend!(
            "backend_requests",
            "Requests sent to the backend",
            MetricType::Counter,
            |b: &crate::pool::Backend| b.state.requests.load(Relaxed)
        );
        per_backend!(
            "backend_failures",
            "Connect errors, timeouts and retryable statuses",
            MetricType::Counter,
            |b: &crate::pool::Backend| b.state.failures.load(Relaxed)
        );
        per_backend!(
            "backend_retries",
            "Retries that went to the backend",
            MetricType::Counter,
            |b: &crate::pool::Backend| b.state.retries.load(Relaxed)
        );
        per_backend!(
            "backend_in_flight",
            "Requests in flight from this node",
            MetricType::Gauge,
            |b: &crate::pool::Backend| b.state.in_flight.load(Relaxed)
        );
        per_backend!(
            "backend_cluster_in_flight",
            "Requests in flight from all live nodes (local exact + peers' reports)",
            MetricType::Gauge,
            |b: &crate::pool::Backend| b.state.load()
        );
        per_backend!(
            "backend_health_probes",
            "Active checks this node sent to the backend (only its checkers send them)",
            MetricType::Counter,
            |b: &crate::pool::Backend| b.state.health.probes.load(Relaxed)
        );
        {
            let mut m = enc.encode_descriptor(
                "backend_latency_estimate_seconds",
                "The least-conn picker's response-time estimate (0: none yet)",
                None,
                MetricType::Gauge,
            )?;
            for (pool, b) in &pairs {
                let labels = [("pool", *pool), ("backend", &*b.state.addr_text)];
                ConstGauge::new(b.state.speed.estimate(now) as f64 / 1e6).encode(m.encode_family(&labels)?)?;
            }
        }
        per_backend!(
            "backend_up",
            "1 when the backend takes new requests",
            MetricType::Gauge,
            |b: &crate::pool::Backend| b.accepts(now, pool_nodes) as u8
        );
        {
            let mut m =
                enc.encode_descriptor("backend_responses", "Responses by status class", None, MetricType::Counter)?;
            for (pool, b) in &pairs {
                for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                    let labels = [("pool", *pool), ("backend", &*b.state.addr_text), ("class", class)];
                    ConstCounter::new(b.state.responses[i].load(Relaxed)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "backend_response_seconds",
                "Time to the backend's response headers",
                None,
                MetricType::Histogram,
            )?;
            for (pool, b) in &pairs {
                let (sum, count, buckets) = b.state.latency.snapshot();
                let labels = [("pool", *pool), ("backend", &*b.state.addr_text)];
                m.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
            }
        }

        if let Some(c) = node.cluster.get() {
            let view = c.view.load();
            {
                let mut m = enc.encode_descriptor(
                    "members",
                    "Members by state, as this node sees them",
                    None,
                    MetricType::Gauge,
                )?;
                for state in [MemberState::Alive, MemberState::Draining, MemberState::Left, MemberState::Dead] {
                    let n = view.members.iter().filter(|x| x.state == state).count();
                    ConstGauge::new(n as i64).encode(m.encode_family(&[("state", state.name())])?)?;
                }
            }
            let g = &c.counters;
            counter(
                &mut enc,
                "gossip_rounds",
                "Cluster view rebuilds (one per gossip interval)",
                c.rounds.load(Relaxed),
            )?;
            counter(&mut enc, "gossip_sent_bytes", "Gossip bytes sent", g.sent_bytes.load(Relaxed))?;
            counter(&mut enc, "gossip_received_bytes", "Gossip bytes received", g.received_bytes.load(Relaxed))?;
            counter(
                &mut enc,
                "gossip_rejected_datagrams",
                "Gossip datagrams dropped: wrong key, forged or stale",
                g.rejected.load(Relaxed),
            )?;
            counter(
                &mut enc,
                "gossip_paced_syns",
                "Gossip exchanges not opened to stay under cluster.gossip_budget",
                c.pace.held_back.load(Relaxed),
            )?;
        }
        counter(
            &mut enc,
            "control_rejected_calls",
            "Control-plane calls refused: no token, a wrong one (secret, method), stale or replayed",
            node.control_gate.rejected.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "control_replayed_calls",
            "Control-plane calls refused because their token was stale or used before",
            node.control_gate.replayed.load(Relaxed),
        )?;
        let limited: Vec<_> = runtime.upstreams.iter().filter_map(|u| Some((u.name(), u.limiter.as_ref()?))).collect();
        if !limited.is_empty() {
            let mut m = enc.encode_descriptor(
                "rate_limit_share_permille",
                "This node's share of the pool's cluster-wide rate limit",
                None,
                MetricType::Gauge,
            )?;
            for (pool, l) in limited {
                ConstGauge::new((l.share() * 1000.0) as i64).encode(m.encode_family(&[("pool", pool)])?)?;
            }
        }
        gauge(&mut enc, "routes", "Routes in the running table", runtime.route_list.len() as i64)?;
        Ok(())
    }
}
