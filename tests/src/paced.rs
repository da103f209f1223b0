//! Open-loop, paced load: request `i` is sent at `start + i / rate`, whatever the answers
//! before it took (each request on its own task, over one shared keep-alive client), to
//! `targets[pick(i)]`. For rate limits: the offered rate is known exactly, and a delayed
//! answer does not slow the requests behind it. Bounded by `count` and by [`PACED_CAP`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::http::{client, send};

/// No paced load runs longer than this (plus one request timeout).
pub const PACED_CAP: Duration = Duration::from_secs(60);
/// A request with no answer by then is an error.
pub const PACED_TIMEOUT: Duration = Duration::from_secs(5);

/// One request of a paced load.
#[derive(Debug, Clone)]
pub struct Shot {
    /// When it was sent, from the start of the load.
    pub at: Duration,
    /// When its answer was complete, from the start of the load.
    pub done: Duration,
    /// The index into `targets` it went to.
    pub target: usize,
    /// The status, or the client error.
    pub outcome: Result<u16, String>,
}

/// Which target request `i` goes to.
#[derive(Debug, Clone, Copy)]
pub enum Spread {
    /// Always `targets[k]`.
    Pinned(usize),
    /// `targets[i % len]`.
    RoundRobin,
}

/// Sends `count` `GET path` requests at `rate` per second; returns them in the order sent.
pub async fn paced(targets: &[SocketAddr], spread: Spread, rate: f64, count: usize, path: &str) -> Vec<Shot> {
    assert!(rate > 0.0 && !targets.is_empty());
    let c = client(64);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if due - start > PACED_CAP {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let target = match spread {
            Spread::Pinned(k) => k,
            Spread::RoundRobin => i % targets.len(),
        };
        let req =
            Request::get(format!("http://{}{path}", targets[target])).body(Full::new(Bytes::new())).expect("request");
        let c = c.clone();
        tasks.spawn(async move {
            let at = start.elapsed();
            let outcome = send(&c, req, PACED_TIMEOUT).await.map(|r| r.status.as_u16()).map_err(|e| format!("{e:#}"));
            (i, Shot { at, done: start.elapsed(), target, outcome })
        });
    }
    let mut shots: Vec<(usize, Shot)> = Vec::with_capacity(count);
    while let Some(r) = tasks.join_next().await {
        shots.push(r.expect("paced request task panicked"));
    }
    shots.sort_by_key(|(i, _)| *i);
    shots.into_iter().map(|(_, s)| s).collect()
}

/// Answers with `status` among `shots` sent in `[from, to)`.
pub fn count_status(shots: &[Shot], status: u16, from: Duration, to: Duration) -> usize {
    shots.iter().filter(|s| s.at >= from && s.at < to && s.outcome.as_ref().ok() == Some(&status)).count()
}

/// A one-line summary: sent, by status, errors (with a sample).
pub fn summary(shots: &[Shot]) -> String {
    let mut by: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut sample = None;
    for s in shots {
        let k = match &s.outcome {
            Ok(st) => st.to_string(),
            Err(e) => {
                sample.get_or_insert_with(|| e.clone());
                "error".to_string()
            }
        };
        *by.entry(k).or_default() += 1;
    }
    format!("sent={} {by:?} first_error={sample:?}", shots.len())
}
