//! A bounded load generator: `concurrency` clients, each with its own keep-alive connection,
//! sending `GET` requests until a request count, a duration, or [`LoadHandle::stop`] —
//! and never for longer than [`HARD_CAP`]. Every outcome is recorded.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::task::JoinSet;

use crate::http::{client, send};

/// No load runs longer than this, whatever it was asked.
pub const HARD_CAP: Duration = Duration::from_secs(120);

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was sent, from the start of the load.
    pub at: Duration,
    pub latency: Duration,
    /// Status and body, or the client error.
    pub outcome: Result<(u16, String), String>,
}

/// A load to run against one address.
#[derive(Debug, Clone)]
pub struct Load {
    target: SocketAddr,
    concurrency: usize,
    count: Option<usize>,
    duration: Option<Duration>,
    path: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
    keep_alive: bool,
}

impl Load {
    /// 4 clients, 100 requests of `GET /`, 10 s per-request timeout, keep-alive.
    pub fn new(target: SocketAddr) -> Self {
        Load {
            target,
            concurrency: 4,
            count: Some(100),
            duration: None,
            path: "/".into(),
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            keep_alive: true,
        }
    }

    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Stop after `n` requests in total (the default bound).
    pub fn count(mut self, n: usize) -> Self {
        self.count = Some(n);
        self.duration = None;
        self
    }

    /// Stop after `d` (no request count).
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self.count = None;
        self
    }

    /// Run until [`LoadHandle::stop`] (or [`HARD_CAP`]).
    pub fn until_stopped(mut self) -> Self {
        self.duration = None;
        self.count = None;
        self
    }

    pub fn path(mut self, p: &str) -> Self {
        self.path = p.into();
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// A new connection for every request (`Connection: close`).
    pub fn no_keep_alive(mut self) -> Self {
        self.keep_alive = false;
        self
    }

    /// Starts the clients in the background.
    pub fn spawn(self) -> LoadHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let deadline = start + self.duration.unwrap_or(HARD_CAP).min(HARD_CAP);
        let mut workers = JoinSet::new();
        let load = Arc::new(self);
        for _ in 0..load.concurrency {
            let (load, stop, issued, done) = (load.clone(), stop.clone(), issued.clone(), done.clone());
            workers.spawn(async move {
                let client = client(if load.keep_alive { 1 } else { 0 });
                let mut records = Vec::new();
                loop {
                    if stop.load(SeqCst) || Instant::now() >= deadline {
                        break;
                    }
                    if let Some(n) = load.count
                        && issued.fetch_add(1, SeqCst) >= n
                    {
                        break;
                    }
                    let mut b = Request::get(format!("http://{}{}", load.target, load.path));
                    for (k, v) in &load.headers {
                        b = b.header(k.as_str(), v.as_str());
                    }
                    if !load.keep_alive {
                        b = b.header("connection", "close");
                    }
                    let req = b.body(Full::new(Bytes::new())).expect("request");
                    let sent = Instant::now();
                    let outcome = send(&client, req, load.timeout)
                        .await
                        .map(|r| (r.status.as_u16(), r.body))
                        .map_err(|e| format!("{e:#}"));
                    records.push(Record { at: sent - start, latency: sent.elapsed(), outcome });
                    done.fetch_add(1, SeqCst);
                }
                records
            });
        }
        LoadHandle { stop, done, start, workers }
    }

    /// Runs to its bound and returns the summary.
    pub async fn run(self) -> LoadSummary {
        self.spawn().finish().await
    }
}

/// A load running in the background.
pub struct LoadHandle {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    start: Instant,
    workers: JoinSet<Vec<Record>>,
}

impl LoadHandle {
    /// Requests completed so far.
    pub fn completed(&self) -> usize {
        self.done.load(SeqCst)
    }

    /// Asks the clients to stop after their current request and returns the summary.
    pub async fn stop(self) -> LoadSummary {
        self.stop.store(true, SeqCst);
        self.finish().await
    }

    /// Waits for the load to reach its own bound and returns the summary.
    pub async fn finish(mut self) -> LoadSummary {
        let mut records = Vec::new();
        while let Some(r) = self.workers.join_next().await {
            records.extend(r.expect("load worker panicked"));
        }
        records.sort_by_key(|r| r.at);
        LoadSummary::from_records(records, self.start.elapsed())
    }
}

/// What a load saw.
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    pub sent: usize,
    /// 2xx answers.
    pub ok: usize,
    /// Answers by status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no answer (connect errors, resets, timeouts).
    pub errors: usize,
    /// Up to 10 error messages and non-2xx bodies, for assertion messages.
    pub samples: Vec<String>,
    /// 2xx answers by backend (the response body, which the test backends set to their name).
    pub per_backend: BTreeMap<String, usize>,
    /// Latencies of all requests, sorted.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
    /// Every request, in the order sent.
    pub records: Vec<Record>,
}

impl LoadSummary {
    pub fn from_records(records: Vec<Record>, elapsed: Duration) -> Self {
        let mut s = LoadSummary { sent: records.len(), elapsed, ..Default::default() };
        for r in &records {
            match &r.outcome {
                Ok((status, body)) => {
                    *s.statuses.entry(*status).or_default() += 1;
                    if (200..300).contains(status) {
                        s.ok += 1;
                        if body.len() <= 64 {
                            *s.per_backend.entry(body.trim().to_string()).or_default() += 1;
                        }
                    } else if s.samples.len() < 10 {
                        s.samples.push(format!("{status}: {}", body.trim()));
                    }
                }
                Err(e) => {
                    s.errors += 1;
                    if s.samples.len() < 10 {
                        s.samples.push(e.clone());
                    }
                }
            }
            s.latencies.push(r.latency);
        }
        s.latencies.sort();
        s.records = records;
        s
    }

    /// Requests that did not get a 2xx.
    pub fn failed(&self) -> usize {
        self.sent - self.ok
    }

    /// 2xx answers from backend `name`.
    pub fn from(&self, name: &str) -> usize {
        self.per_backend.get(name).copied().unwrap_or(0)
    }

    /// Answers with `status`.
    pub fn status(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// The `p`-th latency percentile (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)]
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} ok={} statuses={:?} errors={} per_backend={:?} p50={:?} p99={:?} max={:?} in {:?}; samples={:?}",
            self.sent,
            self.ok,
            self.statuses,
            self.errors,
            self.per_backend,
            self.percentile(50.0),
            self.percentile(99.0),
            self.latencies.last().copied().unwrap_or_default(),
            self.elapsed,
            self.samples
        )
    }
}
