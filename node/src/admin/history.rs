//! The dashboard's memory: one sample a second of what this node sees, kept in memory for the
//! last 15 minutes ([`KEEP`] samples; no database), and the member and backend events found by
//! comparing each sample with the one before. Every node keeps its own; the dashboard draws
//! the cluster from all of them (fetched through `/cluster`).
//!
//! A sample, as `/history` writes it (arrays, to keep 15 minutes of a node small):
//! `{"seq", "t": unix ms, "rps": this node's requests/s,
//!   "m": [[member id, state, gossiped requests/s]...],
//!   "b": [["pool/addr", state, requests/s from this node, in-flight summed over the cluster,
//!          failures/s, [requests per latency bucket this second] or 0]...],
//!   "e": [backend 5xx, bad gateway, timeout, no backend, rate limited, bad request] per second}`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Node;
use crate::events::{Kind, Tone, unix_ms};
use crate::lifecycle::MemberState;
use crate::pool::{LATENCY_BUCKETS, now_ms};

/// Samples kept: 15 minutes at one a second.
pub const KEEP: usize = 900;

/// The error classes of a sample's `e`, in order.
pub const ERROR_CLASSES: [&str; 6] =
    ["backend_5xx", "bad_gateway", "timeout", "no_backend", "rate_limited", "bad_request"];

const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

#[derive(Debug, Clone)]
struct MemberSample {
    id: Arc<str>,
    state: &'static str,
    rps: f32,
}

#[derive(Debug, Clone)]
struct BackendSample {
    key: Arc<str>,
    state: &'static str,
    rps: f32,
    cluster_in_flight: u32,
    failures: f32,
    /// Responses per latency bucket during the second (None when there were none).
    latency: Option<Box<[u32; BUCKETS]>>,
}

#[derive(Debug, Clone)]
struct Sample {
    seq: u64,
    at_ms: u64,
    rps: f32,
    members: Vec<MemberSample>,
    backends: Vec<BackendSample>,
    errors: [f32; ERROR_CLASSES.len()],
}

/// Counter readings of the previous sample, to turn totals into rates.
#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    requests: u64,
    errors: [u64; ERROR_CLASSES.len()],
    /// Per backend key (`pool/addr`, shared by every sample that names it).
    backends: HashMap<Arc<str>, BackendReading>,
    member_states: HashMap<Arc<str>, &'static str>,
}

/// One backend's totals and state at the previous sample.
#[derive(Clone, Copy)]
struct BackendReading {
    requests: u64,
    failures: u64,
    buckets: [u64; BUCKETS],
    state: &'static str,
}

/// The samples of the last 15 minutes.
#[derive(Default)]
pub struct History {
    samples: VecDeque<Sample>,
    next_seq: u64,
    previous: Previous,
}

impl History {
    /// The last `last` samples and the events of their time span, as JSON.
    pub fn to_json(&self, node: &Node, last: usize) -> Value {
        let skip = self.samples.len().saturating_sub(last);
        let samples: Vec<Value> = self.samples.iter().skip(skip).map(sample_json).collect();
        let since = self.samples.get(skip).map_or(0, |s| s.at_ms.saturating_sub(1000));
        let events: Vec<Value> = node
            .events
            .since(since)
            .into_iter()
            .map(|e| json!({"seq": e.seq, "t": e.at_ms, "kind": e.kind.name(), "tone": e.tone.name(), "subject": e.subject, "text": e.text}))
            .collect();
        json!({
            "node": node.id(),
            "now": unix_ms(),
            "interval_ms": 1000,
            "error_classes": ERROR_CLASSES,
            "latency_buckets": LATENCY_BUCKETS,
            "samples": samples,
            "events": events,
        })
    }

    /// Takes one sample of `node` and records the events since the previous one.
    fn sample(&mut self, node: &Node) {
        let now = now_ms();
        let at = Instant::now();
        let secs = self.previous.at.map_or(0.0, |p| at.duration_since(p).as_secs_f64());
        let first = self.previous.at.is_none();
        let rate = |now: u64, before: u64| if secs > 0.0 { now.saturating_sub(before) as f64 / secs } else { 0.0 };
        let s = &node.proxy.stats;

        let requests = s.requests.load(Relaxed);
        let rps = rate(requests, self.previous.requests) as f32;
        self.previous.requests = requests;

        // Members, from the gossip view (or this node alone when it runs without one).
        let view = node.cluster.get().map(|c| c.view.load_full());
        let members: Vec<MemberSample> = match &view {
            Some(v) if !v.members.is_empty() => v
                .members
                .iter()
                .map(|m| MemberSample {
                    id: m.node_id.as_str().into(),
                    state: if m.is_self { node.lifecycle.get().name() } else { m.state.name() },
                    // A dead or departed member's last gossiped rate is stale: it serves nothing.
                    rps: match m.state {
                        _ if m.is_self => rps,
                        MemberState::Dead | MemberState::Left => 0.0,
                        _ => m.rps as f32,
                    },
                })
                .collect(),
            _ => vec![MemberSample { id: node.id().into(), state: node.lifecycle.get().name(), rps }],
        };
        let mut states = HashMap::new();
        for m in &members {
            match self.previous.member_states.get(&m.id) {
                None if !first => node.events.push(Kind::Member, Tone::Good, &*m.id, format!("joined ({})", m.state)),
                Some(old) if *old != m.state => {
                    let tone = match m.state {
                        "dead" => Tone::Bad,
                        "alive" => Tone::Good,
                        _ => Tone::Info,
                    };
                    node.events.push(Kind::Member, tone, &*m.id, format!("{old} -> {}", m.state));
                }
                _ => {}
            }
            states.insert(m.id.clone(), m.state);
        }
        self.previous.member_states = states;

        // Backends of every pool.
        let runtime = node.runtime();
        let mut backends = Vec::new();
        let mut readings = HashMap::new();
        let mut backend_5xx = 0u64;
        for (pool, b) in runtime.backends() {
            let st = &b.state;
            let name = format!("{pool}/{}", st.addr_text);
            // The key allocated when the backend first appeared, so samples share it.
            let (key, before) = match self.previous.backends.get_key_value(name.as_str()) {
                Some((k, r)) => (k.clone(), Some(*r)),
                None => (Arc::<str>::from(name), None),
            };
            let mut buckets = [0u64; BUCKETS];
            for (slot, (_, n)) in buckets.iter_mut().zip(st.latency.snapshot().2) {
                *slot = n;
            }
            let now_reading = BackendReading {
                requests: st.requests.load(Relaxed),
                failures: st.failures.load(Relaxed),
                buckets,
                state: st.state_name(now),
            };
            let prev = before.unwrap_or(now_reading);
            let mut latency = [0u32; BUCKETS];
            for (i, slot) in latency.iter_mut().enumerate() {
                *slot = buckets[i].saturating_sub(prev.buckets[i]).min(u32::MAX as u64) as u32;
            }
            backend_5xx += st.responses[4].load(Relaxed);
            let state = now_reading.state;
            match before {
                None if !first => node.events.push(Kind::Backend, Tone::Info, &*key, format!("added ({state})")),
                Some(old) if old.state != state => {
                    let tone = match state {
                        "down" => Tone::Bad,
                        "up" => Tone::Good,
                        _ => Tone::Info,
                    };
                    node.events.push(Kind::Backend, tone, &*key, format!("{} -> {state}", old.state));
                }
                _ => {}
            }
            backends.push(BackendSample {
                key: key.clone(),
                state,
                rps: rate(now_reading.requests, prev.requests) as f32,
                cluster_in_flight: st.load(),
                failures: rate(now_reading.failures, prev.failures) as f32,
                latency: latency.iter().any(|&n| n > 0).then(|| Box::new(latency)),
            });
            readings.insert(key, now_reading);
        }
        if !first {
            for key in self.previous.backends.keys().filter(|k| !readings.contains_key(*k)) {
                node.events.push(Kind::Backend, Tone::Info, &**key, "removed");
            }
        }
        self.previous.backends = readings;

        let totals = [
            backend_5xx,
            s.bad_gateway.load(Relaxed),
            s.timeouts.load(Relaxed),
            s.no_backend.load(Relaxed),
            s.rate_limited.load(Relaxed),
            s.bad_requests.load(Relaxed)
                + s.headers_too_large.load(Relaxed)
                + s.header_timeouts.load(Relaxed)
                + s.not_implemented.load(Relaxed),
        ];
        let mut errors = [0f32; ERROR_CLASSES.len()];
        for (i, e) in errors.iter_mut().enumerate() {
            *e = if first { 0.0 } else { rate(totals[i], self.previous.errors[i]) as f32 };
        }
        self.previous.errors = totals;
        self.previous.at = Some(at);

        self.next_seq += 1;
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { seq: self.next_seq, at_ms: unix_ms(), rps, members, backends, errors });
    }
}

/// One decimal is all a chart needs.
fn round1(v: f32) -> f64 {
    (v as f64 * 10.0).round() / 10.0
}

fn sample_json(s: &Sample) -> Value {
    json!({
        "seq": s.seq,
        "t": s.at_ms,
        "rps": round1(s.rps),
        "m": s.members.iter().map(|m| json!([&*m.id, m.state, round1(m.rps)])).collect::<Vec<_>>(),
        "b": s.backends.iter().map(|b| json!([&*b.key, b.state, round1(b.rps), b.cluster_in_flight, round1(b.failures),
            b.latency.as_ref().map_or(json!(0), |l| json!(&l[..]))])).collect::<Vec<_>>(),
        "e": s.errors.iter().map(|&e| round1(e)).collect::<Vec<_>>(),
    })
}

/// Samples `node` once a second until `stop` fires.
pub async fn run(node: Arc<Node>, history: Arc<Mutex<History>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        history.lock().unwrap_or_else(|e| e.into_inner()).sample(&node);
    }
}
