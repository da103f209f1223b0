//! Helpers of the chaos suite (`tests/tests/chaos.rs`): a DNS client for Shoal's responder, a
//! DNS round-robin HTTP load generator that behaves like a browser, network namespaces to cut
//! a node off from its peers, and a TCP relay that makes in-process backends reachable from
//! inside those namespaces.
//!
//! - [`dns_a`] / [`dns_addrs`] / [`wait_dns`]: A queries over UDP (hickory-proto), from a
//!   connected socket, so a responder that is gone fails at once (ICMP port unreachable).
//! - [`DnsLoad`]: N clients resolving a name the way a stub resolver with a cache does
//!   ([`Records::Responders`]: ask the responders in order, the first answer wins, again
//!   every `refresh` or TTL, whichever is shorter; keep the last answer when none answers), or
//!   from a fixed record list ([`Records::Fixed`], a plain zone file whose records never
//!   change). Each request goes to the next address of the current list (rotation). Like a
//!   browser, a client moves on to the next address when it cannot connect (refused, reset
//!   during the handshake, timeout), and retries once on a new connection when a *reused*
//!   keep-alive connection turns out to be closed before any response byte arrived (the
//!   keep-alive race every HTTP client handles). A failure on a fresh connection after the
//!   request was sent is a failed request: the request may have been processed. With
//!   [`DnsLoad::no_keep_alive`] every request opens a new connection, so only connect
//!   failures are retried: the strictest client. Every request's outcome is recorded with
//!   the address that answered and the attempts that were retried ([`ChaosRecord`]).
//! - [`NetLab`]: a "switch" namespace routing between one namespace per node and a veth leg
//!   in the test's own namespace (where the backends, relays and clients live). Nodes run
//!   inside with `ip netns exec` ([`NetLab::wrapper`]). [`NetLab::partition`] drops every
//!   packet between two groups of nodes at the switch (policy rules of type `blackhole`: no
//!   answer, no refusal, as a cut link); [`NetLab::heal`] removes the rules;
//!   [`NetLab::block`] makes one host unreachable from one node (`prohibit`: connects fail at
//!   once). Everything is deleted on drop, also when the test fails; stale namespaces of
//!   dead test processes are removed first. Needs root and iproute2: [`NetLab::require`]
//!   fails (never skips) with a message saying so.
//! - [`Relay`]: a TCP relay from an address of the test's namespace to a backend on
//!   127.0.0.1.
//! - [`serial`]: the chaos scenarios take this lock, so they run one at a time (timings on a
//!   small machine stay meaningful); [`Figures`] prints the `CHAOS scenario=... key=value`
//!   lines `docs/CHAOS.md` is filled from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

use crate::load::HARD_CAP;

// ---------------------------------------------------------------------------------------------
// Running scenarios one at a time, and printing their figures
// ---------------------------------------------------------------------------------------------

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held by each chaos scenario for its whole run: scenarios start clusters of several nodes
/// and measure detection times, so they do not share the machine with each other.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Milliseconds, for figures.
pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// One `CHAOS scenario=<name> key=value ...` line.
#[derive(Debug, Clone)]
pub struct Figures {
    scenario: String,
    pairs: Vec<(String, String)>,
}

impl Figures {
    pub fn new(scenario: &str) -> Self {
        Figures { scenario: scenario.into(), pairs: Vec::new() }
    }

    /// Adds `key=value` (spaces in the value become `_`).
    pub fn add(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.pairs.push((key.into(), value.to_string().replace(' ', "_")));
        self
    }

    /// Adds `key=<milliseconds>`.
    pub fn add_ms(&mut self, key: &str, d: Duration) -> &mut Self {
        self.add(key, ms(d))
    }

    /// Prints the line (and returns it).
    pub fn print(&self) -> String {
        let line = self.to_string();
        println!("{line}");
        line
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CHAOS scenario={}", self.scenario)?;
        for (k, v) in &self.pairs {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// DNS client
// ---------------------------------------------------------------------------------------------

/// A responder's answer to an A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    /// `NoError`, `Refused`, ...
    pub code: String,
    pub authoritative: bool,
    /// The A records, in the order answered.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the answers.
    pub ttl: Option<u32>,
}

impl DnsReply {
    pub fn is_ok(&self) -> bool {
        self.code == format!("{:?}", ResponseCode::NoError)
    }

    /// The addresses as a set.
    pub fn set(&self) -> BTreeSet<IpAddr> {
        self.addrs.iter().copied().collect()
    }
}

/// Sends one A query for `name` to `server` over UDP and waits up to `timeout` for the reply
/// with the same id.
pub async fn dns_a(server: SocketAddr, name: &str, timeout: Duration) -> anyhow::Result<DnsReply> {
    static ID: AtomicU16 = AtomicU16::new(0x5a17);
    let id = ID.fetch_add(1, SeqCst);
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).with_context(|| format!("bad name {name:?}"))?, RecordType::A));
    let bytes = q.to_vec().context("encode the DNS query")?;
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let socket = UdpSocket::bind(bind).await?;
    // Connected: a closed port answers with ICMP, which fails recv at once.
    socket.connect(server).await.with_context(|| format!("connect {server}/udp"))?;
    socket.send(&bytes).await.with_context(|| format!("send to {server}/udp"))?;
    let mut buf = vec![0u8; 4096];
    let reply = tokio::time::timeout(timeout, async {
        loop {
            let n = socket.recv(&mut buf).await.with_context(|| format!("receive from {server}/udp"))?;
            if let Ok(m) = Message::from_vec(&buf[..n])
                && m.metadata.id == id
                && m.metadata.message_type == MessageType::Response
            {
                return anyhow::Ok(m);
            }
        }
    })
    .await
    .with_context(|| format!("no DNS answer from {server} within {timeout:?}"))??;
    let addrs: Vec<IpAddr> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    Ok(DnsReply {
        code: format!("{:?}", reply.metadata.response_code),
        authoritative: reply.metadata.authoritative,
        ttl: reply.answers.iter().map(|r| r.ttl).min(),
        addrs,
    })
}

/// The A records `server` answers for `name` (an error unless the answer is NOERROR).
pub async fn dns_addrs(server: SocketAddr, name: &str) -> anyhow::Result<BTreeSet<IpAddr>> {
    let r = dns_a(server, name, Duration::from_millis(500)).await?;
    if !r.is_ok() {
        bail!("{server} answered {} for {name}", r.code);
    }
    Ok(r.set())
}

/// Waits until every responder answers exactly `want` for `name`; returns the time it took.
pub async fn wait_dns(
    responders: &[SocketAddr],
    name: &str,
    want: &BTreeSet<IpAddr>,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last: Vec<(SocketAddr, String)> = Vec::new();
    loop {
        last.clear();
        let mut all = true;
        for r in responders {
            let got = dns_addrs(*r, name).await;
            all &= got.as_ref().is_ok_and(|s| s == want);
            last.push((*r, format!("{got:?}")));
        }
        if all {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!(
                "timed out after {timeout:?} waiting until every responder answers {want:?} for {name}; last: {last:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// DNS round-robin load
// ---------------------------------------------------------------------------------------------

/// Where the clients get their addresses.
#[derive(Debug, Clone)]
pub enum Records {
    /// A fixed record list, as in a plain zone file: a dead node's record stays.
    Fixed(Vec<IpAddr>),
    /// Asked from Shoal's responders, in order (the first answer wins), again every `refresh`
    /// or TTL, whichever is shorter; the last answer is kept while no responder answers.
    Responders { servers: Vec<SocketAddr>, name: String, refresh: Duration },
}

/// One resolution made by the clients' shared resolver.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// From the start of the load.
    pub at: Duration,
    /// The responder that answered (`None`: none did, the old answer was kept).
    pub server: Option<SocketAddr>,
    pub addrs: Vec<IpAddr>,
    /// Responders that failed before one answered.
    pub errors: Vec<String>,
}

/// An attempt a client gave up on and retried elsewhere.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub addr: IpAddr,
    /// On a reused keep-alive connection (else: while connecting).
    pub reused: bool,
    /// On a reused connection: the request had been handed to the connection (it may have
    /// reached the node) before it closed; `false`: the connection was closed before the
    /// request went out (the plain keep-alive race).
    pub sent: bool,
    pub error: String,
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct ChaosRecord {
    /// When it started, from the start of the load.
    pub at: Duration,
    pub latency: Duration,
    /// The node address that answered (or, on failure, the last one tried).
    pub addr: Option<IpAddr>,
    /// Status and body, or the client error.
    pub outcome: Result<(u16, String), String>,
    /// `x-shoal-node` of the response (the proxy sets it on its own error answers).
    pub shoal_node: Option<String>,
    /// Attempts retried before the final one.
    pub retried: Vec<Attempt>,
}

impl ChaosRecord {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Ok((s, _)) if (200..300).contains(&s))
    }
}

/// A load of GET requests through DNS round-robin (see the module docs).
#[derive(Debug, Clone)]
pub struct DnsLoad {
    label: String,
    records: Records,
    port: u16,
    concurrency: usize,
    count: Option<usize>,
    duration: Option<Duration>,
    path: String,
    host: String,
    keep_alive: bool,
    timeout: Duration,
    connect_timeout: Duration,
}

/// A client connection: the request handle, and what ended the connection (when it ended
/// with an error: a reset tells apart from a close).
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    ended: Arc<Mutex<Option<String>>>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// " (connection: <error>)" once the connection task ended with an error.
    fn why(&self) -> String {
        self.ended.lock().unwrap().as_ref().map(|e| format!(" (connection: {e})")).unwrap_or_default()
    }
}

/// Why an exchange failed.
enum ExchangeError {
    /// No response head arrived (the connection was closed, reset, or not usable); `true`
    /// when the request had been handed to the connection first.
    BeforeResponse(String, bool),
    /// The response head arrived but the body broke.
    Body(String),
}

#[derive(Default)]
struct ResolverState {
    list: Mutex<Arc<Vec<IpAddr>>>,
    resolutions: Mutex<Vec<Resolution>>,
}

impl DnsLoad {
    /// 4 clients with keep-alive, `GET /` to `port` on the addresses of `records`, until
    /// stopped (at most [`HARD_CAP`]), 10 s per request, 2 s to connect.
    pub fn new(label: &str, records: Records, port: u16) -> Self {
        let host = match &records {
            Records::Responders { name, .. } => name.clone(),
            Records::Fixed(_) => "lb.test.internal".into(),
        };
        DnsLoad {
            label: label.into(),
            records,
            port,
            concurrency: 4,
            count: None,
            duration: None,
            path: "/".into(),
            host,
            keep_alive: true,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    }

    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Stop after `n` requests in total.
    pub fn count(mut self, n: usize) -> Self {
        self.count = Some(n);
        self
    }

    /// Stop after `d`.
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }

    pub fn path(mut self, p: &str) -> Self {
        self.path = p.into();
        self
    }

    /// A new connection for every request (`Connection: close`): only connect failures are
    /// retried.
    pub fn no_keep_alive(mut self) -> Self {
        self.keep_alive = false;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Resolves once (an error when no responder answers with at least one address), then
    /// starts the clients and the resolver in the background.
    pub async fn start(self) -> anyhow::Result<DnsLoadHandle> {
        let start = Instant::now();
        let state = Arc::new(ResolverState::default());
        let mut resolver = None;
        match &self.records {
            Records::Fixed(list) => *state.list.lock().unwrap() = Arc::new(list.clone()),
            Records::Responders { servers, name, refresh } => {
                let (r, ttl) = resolve(servers, name, start).await;
                if r.server.is_none() || r.addrs.is_empty() {
                    bail!("{}: the first resolution of {name} failed: {r:?}", self.label);
                }
                *state.list.lock().unwrap() = Arc::new(r.addrs.clone());
                state.resolutions.lock().unwrap().push(r);
                let (servers, name, refresh, st) = (servers.clone(), name.clone(), *refresh, state.clone());
                resolver = Some(tokio::spawn(async move {
                    let mut wait = refresh.min(ttl.map_or(refresh, |t| Duration::from_secs(t.into())));
                    loop {
                        tokio::time::sleep(wait.max(Duration::from_millis(20))).await;
                        let (r, ttl) = resolve(&servers, &name, start).await;
                        if r.server.is_some() {
                            *st.list.lock().unwrap() = Arc::new(r.addrs.clone());
                            wait = refresh.min(ttl.map_or(refresh, |t| Duration::from_secs(t.into())));
                        }
                        st.resolutions.lock().unwrap().push(r);
                    }
                }));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let deadline = start + self.duration.unwrap_or(HARD_CAP).min(HARD_CAP);
        let load = Arc::new(self);
        let mut workers = JoinSet::new();
        for w in 0..load.concurrency {
            let (load, stop, issued, done, state) =
                (load.clone(), stop.clone(), issued.clone(), done.clone(), state.clone());
            workers.spawn(async move { load.client(w, start, deadline, &stop, &issued, &done, &state).await });
        }
        Ok(DnsLoadHandle { label: load.label.clone(), stop, done, start, workers, resolver, state })
    }

    #[allow(clippy::too_many_arguments)]
    async fn client(
        &self,
        w: usize,
        start: Instant,
        deadline: Instant,
        stop: &AtomicBool,
        issued: &AtomicUsize,
        done: &AtomicUsize,
        state: &ResolverState,
    ) -> Vec<ChaosRecord> {
        let mut records = Vec::new();
        let mut pool: BTreeMap<IpAddr, Conn> = BTreeMap::new();
        let mut next = w;
        loop {
            if stop.load(SeqCst) || Instant::now() >= deadline {
                break;
            }
            if let Some(n) = self.count
                && issued.fetch_add(1, SeqCst) >= n
            {
                break;
            }
            let list = state.list.lock().unwrap().clone();
            let sent = Instant::now();
            let mut retried = Vec::new();
            let mut trying = None;
            let first = next;
            next = next.wrapping_add(1);
            let attempt = self.request(&list, first, &mut pool, &mut retried, &mut trying);
            let (addr, outcome, shoal_node) = match tokio::time::timeout(self.timeout, attempt).await {
                Ok(r) => r,
                Err(_) => (trying, Err(format!("no complete response within {:?}", self.timeout)), None),
            };
            let outcome = outcome.map_err(|e| format!("{}: {e}", self.label));
            if outcome.is_err() && list.is_empty() {
                // Nothing to try: do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            records.push(ChaosRecord { at: sent - start, latency: sent.elapsed(), addr, outcome, shoal_node, retried });
            done.fetch_add(1, SeqCst);
        }
        records
    }

    fn build(&self) -> Request<Full<Bytes>> {
        let mut b = Request::get(self.path.as_str()).header(header::HOST, self.host.as_str());
        if !self.keep_alive {
            b = b.header(header::CONNECTION, "close");
        }
        b.body(Full::new(Bytes::new())).expect("request")
    }

    /// One request: the addresses of `list` from `first` on, as described in the module docs.
    async fn request(
        &self,
        list: &[IpAddr],
        first: usize,
        pool: &mut BTreeMap<IpAddr, Conn>,
        retried: &mut Vec<Attempt>,
        trying: &mut Option<IpAddr>,
    ) -> (Option<IpAddr>, Result<(u16, String), String>, Option<String>) {
        if list.is_empty() {
            return (None, Err("no address to try (empty answer)".into()), None);
        }
        let n = list.len();
        let mut last = None;
        for k in 0..n {
            let ip = list[(first + k) % n];
            last = Some(ip);
            *trying = Some(ip);
            if let Some(mut s) = pool.remove(&ip) {
                match exchange(&mut s, self.build()).await {
                    Ok(r) => {
                        if !s.is_closed() {
                            pool.insert(ip, s);
                        }
                        return (Some(ip), Ok((r.0, r.1)), r.2);
                    }
                    Err(ExchangeError::BeforeResponse(e, sent)) => {
                        // The keep-alive race: retried on a new connection, once per address,
                        // as browsers do; counted (`ChaosSummary::keepalive_retries`), and each
                        // scenario bounds them by the connections its nodes could have closed.
                        retried.push(Attempt { addr: ip, reused: true, sent, error: e });
                    }
                    Err(ExchangeError::Body(e)) => return (Some(ip), Err(format!("{ip}: {e}")), None),
                }
            }
            let mut s = match connect(SocketAddr::new(ip, self.port), self.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    retried.push(Attempt { addr: ip, reused: false, sent: false, error: e });
                    continue;
                }
            };
            return match exchange(&mut s, self.build()).await {
                Ok(r) => {
                    if self.keep_alive && !s.is_closed() {
                        pool.insert(ip, s);
                    }
                    (Some(ip), Ok((r.0, r.1)), r.2)
                }
                Err(ExchangeError::BeforeResponse(e, _)) => {
                    (Some(ip), Err(format!("{ip}: fresh connection failed before the response: {e}")), None)
                }
                Err(ExchangeError::Body(e)) => (Some(ip), Err(format!("{ip}: {e}")), None),
            };
        }
        let why: Vec<String> = retried.iter().rev().take(n).map(|a| format!("{}: {}", a.addr, a.error)).collect();
        (last, Err(format!("no address could be reached: {why:?}")), None)
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, String> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err(format!("connect: no answer within {timeout:?}")),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    let ended = Arc::new(Mutex::new(None));
    let e = ended.clone();
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            *e.lock().unwrap() = Some(chain(&err));
        }
    });
    Ok(Conn { sender, ended })
}

async fn exchange(c: &mut Conn, req: Request<Full<Bytes>>) -> Result<(u16, String, Option<String>), ExchangeError> {
    if let Err(e) = c.sender.ready().await {
        tokio::task::yield_now().await;
        return Err(ExchangeError::BeforeResponse(
            format!("closed before the request was sent: {}{}", chain(&e), c.why()),
            false,
        ));
    }
    let resp = match c.sender.try_send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            tokio::task::yield_now().await;
            let text = format!("{}{}", chain(e.error()), c.why());
            // hyper hands the request back when it never started writing it.
            let sent = e.message().is_none();
            return Err(ExchangeError::BeforeResponse(text, sent));
        }
    };
    let (parts, body) = resp.into_parts();
    let node = parts.headers.get("x-shoal-node").and_then(|v| v.to_str().ok()).map(String::from);
    let body = body
        .collect()
        .await
        .map_err(|e| ExchangeError::Body(format!("body broke: {}{}", chain(&e), c.why())))?
        .to_bytes();
    Ok((parts.status.as_u16(), String::from_utf8_lossy(&body).into_owned(), node))
}

/// An error and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&format!(": {s}"));
        cur = s.source();
    }
    out
}

/// Asks `servers` in order; returns the resolution and the answer's TTL.
async fn resolve(servers: &[SocketAddr], name: &str, start: Instant) -> (Resolution, Option<u32>) {
    let at = start.elapsed();
    let mut errors = Vec::new();
    for s in servers {
        match dns_a(*s, name, Duration::from_millis(300)).await {
            Ok(r) if r.is_ok() => {
                return (Resolution { at, server: Some(*s), addrs: r.addrs, errors }, r.ttl);
            }
            Ok(r) => errors.push(format!("{s}: {}", r.code)),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (Resolution { at, server: None, addrs: Vec::new(), errors }, None)
}

/// A [`DnsLoad`] running in the background.
pub struct DnsLoadHandle {
    label: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    start: Instant,
    workers: JoinSet<Vec<ChaosRecord>>,
    resolver: Option<JoinHandle<()>>,
    state: Arc<ResolverState>,
}

impl DnsLoadHandle {
    /// Time since the load started (the clock of [`ChaosRecord::at`]).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Requests completed so far.
    pub fn completed(&self) -> usize {
        self.done.load(SeqCst)
    }

    /// The addresses the clients use right now.
    pub fn current(&self) -> Vec<IpAddr> {
        self.state.list.lock().unwrap().to_vec()
    }

    /// Waits until `n` more requests completed (at most `timeout`).
    pub async fn wait_more(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let want = self.completed() + n;
        let start = Instant::now();
        while self.completed() < want {
            if start.elapsed() > timeout {
                bail!("{}: only {} of {want} requests completed within {timeout:?}", self.label, self.completed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Asks the clients to stop after their current request and returns the summary.
    pub async fn stop(self) -> ChaosSummary {
        self.stop.store(true, SeqCst);
        self.finish().await
    }

    /// Waits for the load to reach its own bound and returns the summary.
    pub async fn finish(mut self) -> ChaosSummary {
        let mut records = Vec::new();
        while let Some(r) = self.workers.join_next().await {
            records.extend(r.expect("chaos load client panicked"));
        }
        if let Some(r) = self.resolver.take() {
            r.abort();
        }
        records.sort_by_key(|r| r.at);
        let resolutions = self.state.resolutions.lock().unwrap().clone();
        ChaosSummary::new(&self.label, records, resolutions, self.start.elapsed())
    }
}

impl Drop for DnsLoadHandle {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(r) = self.resolver.take() {
            r.abort();
        }
    }
}

/// What a [`DnsLoad`] saw.
#[derive(Debug, Clone, Default)]
pub struct ChaosSummary {
    pub label: String,
    pub sent: usize,
    /// 2xx answers.
    pub ok: usize,
    pub statuses: BTreeMap<u16, usize>,
    /// Requests without an answer (every address failed, reset, timeout).
    pub errors: usize,
    /// 2xx answers by backend (the body).
    pub per_backend: BTreeMap<String, usize>,
    /// 2xx answers by the node address that served them.
    pub per_node: BTreeMap<IpAddr, usize>,
    /// Requests that needed more than one attempt (and the attempts retried in total).
    pub retried_requests: usize,
    pub retried_attempts: usize,
    /// Up to 10 failures, for messages.
    pub samples: Vec<String>,
    pub resolutions: Vec<Resolution>,
    pub elapsed: Duration,
    pub records: Vec<ChaosRecord>,
}

impl ChaosSummary {
    fn new(label: &str, records: Vec<ChaosRecord>, resolutions: Vec<Resolution>, elapsed: Duration) -> Self {
        let mut s =
            ChaosSummary { label: label.into(), sent: records.len(), elapsed, resolutions, ..Default::default() };
        for r in &records {
            if !r.retried.is_empty() {
                s.retried_requests += 1;
                s.retried_attempts += r.retried.len();
            }
            match &r.outcome {
                Ok((status, body)) => {
                    *s.statuses.entry(*status).or_default() += 1;
                    if (200..300).contains(status) {
                        s.ok += 1;
                        if body.len() <= 64 {
                            *s.per_backend.entry(body.trim().to_string()).or_default() += 1;
                        }
                        if let Some(a) = r.addr {
                            *s.per_node.entry(a).or_default() += 1;
                        }
                    } else if s.samples.len() < 10 {
                        s.samples.push(format!(
                            "at {:?} via {:?}: {status} from {:?}: {}",
                            r.at,
                            r.addr,
                            r.shoal_node,
                            body.trim()
                        ));
                    }
                }
                Err(e) => {
                    s.errors += 1;
                    if s.samples.len() < 10 {
                        s.samples.push(format!("at {:?} via {:?}: {e}", r.at, r.addr));
                    }
                }
            }
        }
        s.records = records;
        s
    }

    /// Requests without a 2xx.
    pub fn failed(&self) -> usize {
        self.sent - self.ok
    }

    /// The failed requests.
    pub fn failures(&self) -> impl Iterator<Item = &ChaosRecord> {
        self.records.iter().filter(|r| !r.is_ok())
    }

    /// 2xx answers from backend `name`.
    pub fn from(&self, name: &str) -> usize {
        self.per_backend.get(name).copied().unwrap_or(0)
    }

    /// (sent, ok) of the requests started in `[from, to)`.
    pub fn window(&self, from: Duration, to: Duration) -> (usize, usize) {
        let w: Vec<&ChaosRecord> = self.records.iter().filter(|r| r.at >= from && r.at < to).collect();
        (w.len(), w.iter().filter(|r| r.is_ok()).count())
    }

    /// Attempts on a reused keep-alive connection that was closed before any response byte,
    /// each retried on a new connection (the keep-alive race), and how many of them had handed
    /// the request to the connection first.
    pub fn keepalive_retries(&self) -> (usize, usize) {
        let reused = self.records.iter().flat_map(|r| &r.retried).filter(|a| a.reused);
        let (mut all, mut sent) = (0, 0);
        for a in reused {
            all += 1;
            sent += usize::from(a.sent);
        }
        (all, sent)
    }

    /// Requests that tried `ip` and moved on (connect failures and keep-alive races there).
    pub fn retried_away_from(&self, ip: IpAddr) -> usize {
        self.records.iter().filter(|r| r.retried.iter().any(|a| a.addr == ip)).count()
    }

    /// Resolutions whose answer contained `ip`, started at or after `t`.
    pub fn resolved_to_after(&self, ip: IpAddr, t: Duration) -> usize {
        self.resolutions.iter().filter(|r| r.at >= t && r.server.is_some() && r.addrs.contains(&ip)).count()
    }
}

impl fmt::Display for ChaosSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lat: Vec<Duration> = self.records.iter().map(|r| r.latency).collect();
        lat.sort();
        let p = |q: f64| lat.get(((lat.len().saturating_sub(1)) as f64 * q) as usize).copied().unwrap_or_default();
        write!(
            f,
            "[{}] sent={} ok={} failed={} statuses={:?} errors={} retried={} (attempts {}) keepalive_retries={:?} per_node={:?} per_backend={:?} p50={:?} p99={:?} max={:?} resolutions={} in {:?}; samples={:?}",
            self.label,
            self.sent,
            self.ok,
            self.failed(),
            self.statuses,
            self.errors,
            self.retried_requests,
            self.retried_attempts,
            self.keepalive_retries(),
            self.per_node,
            self.per_backend,
            p(0.5),
            p(0.99),
            lat.last().copied().unwrap_or_default(),
            self.resolutions.len(),
            self.elapsed,
            self.samples
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

const NS_PREFIX: &str = "shoal-chaos-";

fn run_ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("cannot run `ip {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!("`ip {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small routed network of namespaces (see the module docs):
///
/// ```text
///   test process (root ns)  10.S.0.2 (+ 10.S.0.10.. for relays) --- sw-host 10.S.0.1 \
///   node i ns: eth0 10.S.i.2, default via 10.S.i.1             --- sw-n<i>  10.S.i.1 -- switch ns (forwarding)
/// ```
pub struct NetLab {
    tag: String,
    octet: u8,
    switch: String,
    nodes: Vec<String>,
    host_if: String,
    host_addrs: usize,
    rules: Vec<u32>,
    next_rule: u32,
}

impl NetLab {
    /// Checks that this process can create network namespaces; the error says what is needed.
    pub fn require() -> anyhow::Result<()> {
        let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let list = Command::new("ip").args(["netns", "list"]).output();
        let why = match (&uid, &list) {
            (_, Err(e)) => Some(format!("`ip` (iproute2) cannot run: {e}")),
            (_, Ok(o)) if !o.status.success() => {
                Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&o.stderr).trim()))
            }
            (Ok(u), _) if u != "0" => Some(format!("running as uid {u}, not root")),
            _ => None,
        };
        match why {
            None => Ok(()),
            Some(w) => bail!(
                "this chaos scenario needs network namespaces: run the tests as root with iproute2 installed (CI does: .ci/run); {w}"
            ),
        }
    }

    /// Creates the switch, `nodes` node namespaces and the test's leg with `host_addrs`
    /// extra addresses (for relays).
    pub fn new(nodes: usize, host_addrs: usize) -> anyhow::Result<NetLab> {
        Self::require()?;
        Self::remove_stale();
        let pid = std::process::id();
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, SeqCst);
        let tag = format!("{NS_PREFIX}{pid}-{n}");
        // A 10.S.0.0/16 no route of this host covers yet.
        let routes = run_ip(&["-4", "route", "show", "table", "all"])? + &run_ip(&["-4", "addr"])?;
        let octet = (0..50u8)
            .map(|k| 200 + ((pid as u8).wrapping_add(k).wrapping_add(n as u8 * 7)) % 50)
            .find(|o| !routes.contains(&format!("10.{o}.")))
            .context("no free 10.x.0.0/16 for the chaos network")?;
        let mut lab = NetLab {
            tag: tag.clone(),
            octet,
            switch: format!("{tag}-sw"),
            nodes: (1..=nodes).map(|i| format!("{tag}-n{i}")).collect(),
            host_if: format!("shc{pid}{}", if n > 0 { format!("x{n}") } else { String::new() }),
            host_addrs,
            rules: Vec::new(),
            next_rule: 100,
        };
        lab.host_if.truncate(15);
        // On error, Drop deletes what was created so far.
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let s = self.octet;
        let sw = self.switch.clone();
        run_ip(&["netns", "add", &sw])?;
        run_ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        let out = Command::new("ip").args(["netns", "exec", &sw, "sysctl", "-qw", "net.ipv4.ip_forward=1"]).output()?;
        if !out.status.success() {
            bail!("cannot enable forwarding in {sw}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The test's leg.
        run_ip(&["link", "add", &self.host_if, "type", "veth", "peer", "name", "sw-host", "netns", &sw])?;
        run_ip(&["-n", &sw, "addr", "add", &format!("10.{s}.0.1/24"), "dev", "sw-host"])?;
        run_ip(&["-n", &sw, "link", "set", "sw-host", "up"])?;
        run_ip(&["addr", "add", &format!("10.{s}.0.2/24"), "dev", &self.host_if])?;
        for k in 0..self.host_addrs {
            run_ip(&["addr", "add", &format!("10.{s}.0.{}/24", 10 + k), "dev", &self.host_if])?;
        }
        run_ip(&["link", "set", &self.host_if, "up"])?;
        run_ip(&["route", "add", &format!("10.{s}.0.0/16"), "via", &format!("10.{s}.0.1"), "dev", &self.host_if])?;
        // One namespace per node.
        for (i, ns) in self.nodes.clone().iter().enumerate() {
            let i = i + 1;
            let peer = format!("sw-n{i}");
            run_ip(&["netns", "add", ns])?;
            run_ip(&["-n", ns, "link", "set", "lo", "up"])?;
            run_ip(&["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &peer, "netns", &sw])?;
            run_ip(&["-n", &sw, "addr", "add", &format!("10.{s}.{i}.1/24"), "dev", &peer])?;
            run_ip(&["-n", &sw, "link", "set", &peer, "up"])?;
            run_ip(&["-n", ns, "addr", "add", &format!("10.{s}.{i}.2/24"), "dev", "eth0"])?;
            run_ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            run_ip(&["-n", ns, "route", "add", "default", "via", &format!("10.{s}.{i}.1")])?;
        }
        Ok(())
    }

    /// Deletes namespaces and links left by test processes that no longer run.
    fn remove_stale() {
        let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
        if let Ok(list) = run_ip(&["netns", "list"]) {
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if let Some(rest) = name.strip_prefix(NS_PREFIX) {
                    let pid = rest.split('-').next().unwrap_or("");
                    if !pid.is_empty() && !alive(pid) {
                        let _ = run_ip(&["netns", "del", name]);
                    }
                }
            }
        }
        if let Ok(links) = run_ip(&["-o", "link", "show", "type", "veth"]) {
            for l in links.lines() {
                let Some(name) = l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
                if let Some(rest) = name.strip_prefix("shc") {
                    let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    if !pid.is_empty() && !alive(&pid) {
                        let _ = run_ip(&["link", "del", name]);
                    }
                }
            }
        }
    }

    /// The namespaces and links of this lab that exist now (empty after drop).
    pub fn leftovers(tag: &str) -> Vec<String> {
        let mut out: Vec<String> = run_ip(&["netns", "list"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(tag))
            .map(String::from)
            .collect();
        let host_if = format!("shc{}", std::process::id());
        if let Ok(links) = run_ip(&["-o", "link", "show"])
            && links.contains(&format!(": {host_if}"))
        {
            out.push(host_if);
        }
        out
    }

    /// This lab's name prefix (for [`NetLab::leftovers`]).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Node `i`'s (1-based) address.
    pub fn node_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, self.octet, i as u8, 2))
    }

    /// The test's extra address `k` (0-based), for a [`Relay`].
    pub fn host_ip(&self, k: usize) -> IpAddr {
        assert!(k < self.host_addrs, "only {} host addresses", self.host_addrs);
        IpAddr::V4(Ipv4Addr::new(10, self.octet, 0, 10 + k as u8))
    }

    fn node_net(&self, i: usize) -> String {
        format!("10.{}.{i}.0/24", self.octet)
    }

    /// The command prefix that runs a program in node `i`'s namespace.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.nodes[i - 1].clone()]
    }

    fn add_rule(&mut self, from: &str, to: &str, kind: &str) -> anyhow::Result<()> {
        let prio = self.next_rule;
        self.next_rule += 1;
        run_ip(&["-n", &self.switch, "rule", "add", "priority", &prio.to_string(), "from", from, "to", to, kind])?;
        self.rules.push(prio);
        Ok(())
    }

    /// Drops every packet between the nodes of `a` and those of `b` (1-based), both ways.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        for &i in a {
            for &j in b {
                let (x, y) = (self.node_net(i), self.node_net(j));
                self.add_rule(&x, &y, "blackhole")?;
                self.add_rule(&y, &x, "blackhole")?;
            }
        }
        Ok(())
    }

    /// Node `i` gets "administratively prohibited" for everything it sends to `dst`.
    pub fn block(&mut self, i: usize, dst: IpAddr) -> anyhow::Result<()> {
        let from = self.node_net(i);
        self.add_rule(&from, &dst.to_string(), "prohibit")
    }

    /// Silently drops every packet to `dst` that crosses the switch (a `blackhole` rule), e.g.
    /// a node namespace with nothing listening: connects to it time out instead of being
    /// refused (SYNs dropped).
    pub fn blackhole_to(&mut self, dst: IpAddr) -> anyhow::Result<()> {
        self.add_rule("all", &dst.to_string(), "blackhole")
    }

    /// Removes every partition and block.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for prio in std::mem::take(&mut self.rules) {
            run_ip(&["-n", &self.switch, "rule", "del", "priority", &prio.to_string()])?;
        }
        Ok(())
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its ends of the veth pairs, and with them the peers.
        for ns in &self.nodes {
            let _ = run_ip(&["netns", "del", ns]);
        }
        let _ = run_ip(&["netns", "del", &self.switch]);
        let _ = run_ip(&["link", "del", &self.host_if]);
    }
}

// ---------------------------------------------------------------------------------------------
// TCP relay
// ---------------------------------------------------------------------------------------------

/// Relays TCP connections from `addr` to a target (a backend on 127.0.0.1, which nodes in a
/// namespace cannot reach). A connection to the relay whose target refuses is closed at once.
pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on `ip:<any port>`.
    pub async fn start(ip: IpAddr, target: SocketAddr) -> anyhow::Result<Relay> {
        let listener =
            TcpListener::bind(SocketAddr::new(ip, 0)).await.with_context(|| format!("bind relay on {ip}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        conns.spawn(async move {
                            let _ = inbound.set_nodelay(true);
                            if let Ok(mut outbound) = TcpStream::connect(target).await {
                                let _ = outbound.set_nodelay(true);
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Relay { addr, task })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
