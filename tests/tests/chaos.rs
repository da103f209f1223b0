//! The chaos suite: a 3-node cluster under load from DNS round-robin clients while nodes are
//! killed, leave, restart, get partitioned, backends die or flap, and strangers send forged
//! gossip and unauthenticated calls. Every scenario asserts figures against the product's
//! targets, each the documented figure with stated headroom (dead on every peer < 2 s, out of
//! every DNS answer < 2 s, shared ejection < 600 ms, convergence after a partition or a
//! restart < 2 s, zero failed requests where the contract says zero) and
//! prints them as one `CHAOS scenario=<name> key=value ...` line (`docs/CHAOS.md`).
//!
//! Clients are [`DnsLoad`]s: they resolve `lb.test.internal` through the nodes' own responders
//! (or use a fixed record list, as a plain zone would) and behave like browsers: the next
//! address on a refused connection, a retry on a new connection when a reused keep-alive one
//! was closed before any response byte; a failure after sending on a fresh connection counts as
//! failed. "Strict" loads open a new connection per request, so only connect failures are
//! retried. Each node has its own loopback address (127.77.<scenario>.<node>) and the same
//! proxy port; the partition scenario runs each node in its own network namespace (root and
//! iproute2 needed; it fails, never skips, without them).
//!
//! The scenarios take a lock and run one at a time (about 45 s in all on 2 cores).
//! Run: `cargo test -p shoal-tests --test chaos -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_tests::chaos::{Figures, dns_addrs, serial, wait_dns};
use shoal_tests::cluster::{backend_entry, find_backend, member_states, wait_backend};
use shoal_tests::http::{RawResponse, raw_exchange};
use shoal_tests::state::RegOp;
use shoal_tests::{
    Backend, Cluster, ClusterBuilder, DnsLoad, Load, NetLab, Node, Records, Relay, Shoal, Signal, TempDir, free_port,
    wait_until,
};

type R = anyhow::Result<()>;

const NAME: &str = "lb.test.internal";
/// The default gossip interval the nodes run with.
const GOSSIP_INTERVAL_MS: u64 = 150;
/// Product targets, each the documented figure with stated headroom.
/// README/OPERATIONS: a killed node is `dead` on its peers "within ~1 s" (0.95 s measured);
/// 2x that, the scenarios run under load on 2 cores.
const DEAD_TARGET: Duration = Duration::from_secs(2);
/// The responders answer with alive members only, so a dead node leaves DNS when it turns
/// dead: the same bound (measured: 1 ms after `dead`).
const DNS_TARGET: Duration = DEAD_TARGET;
/// OPERATIONS: "out of rotation on all nodes within one gossip round" (150 ms): the round plus
/// the publish tick before it and the view tick after it, plus polling slack.
const SHARED_EJECTION_TARGET: Duration = Duration::from_millis(3 * GOSSIP_INTERVAL_MS + 150);
/// OPERATIONS: a restarted node "is `alive` on them within about a second"; a healed
/// partition is the same rejoin. 2x, as for `dead`.
const CONVERGE_TARGET: Duration = Duration::from_secs(2);
/// How often the clients re-resolve (the responders' TTL is 1 s too).
const REFRESH: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The clients retry a request on a new connection when a reused keep-alive one closes before
/// any response byte (the keep-alive race, as browsers do). Each such retry needs a kept-alive
/// connection that a node closed or lost, so a scenario bounds them: `bound` = keep-alive
/// clients x the node connections that went away (0 when no node closes or loses any). More
/// would be the proxy dropping requests on open connections, hidden by the clients. Adds the
/// counts to the figures.
fn bound_keepalive_retries(l: &shoal_tests::ChaosSummary, bound: usize, f: &mut Figures) {
    let (all, sent) = l.keepalive_retries();
    f.add(&format!("{}_keepalive_retries", l.label), all).add(&format!("{}_keepalive_retries_sent", l.label), sent);
    assert!(
        all <= bound,
        "[{}] {all} keep-alive races retried ({sent} after the request was sent), bound {bound}: {l}",
        l.label
    );
}

/// A cluster whose node `i` binds everything on 127.77.<net>.<i>, with one proxy port for all
/// and a DNS responder (TTL 1 s) on each node's address. `leave_grace` is 1.5 s: the TTL, plus
/// the gossip round that takes a draining node out of the answers and a resolver's refresh
/// period, must fit in it for the responders' clients to have moved away when a node stops
/// accepting.
struct DnsCluster {
    c: Cluster,
    port: u16,
    dns_port: u16,
    ips: Vec<IpAddr>,
}

/// The config file of a node whose responder listens on `dns`.
fn node_toml(dns: SocketAddr, node_extra: &str, extra: &str) -> String {
    format!(
        "[node]\nleave_grace = \"1500ms\"\ndrain_timeout = \"10s\"\n{node_extra}\n[dns]\nlisten = \"{dns}\"\nname = \"{NAME}\"\nttl = \"1s\"\n{extra}\n"
    )
}

impl DnsCluster {
    /// `tweak` adds flags (backends, data dirs) to the builder.
    async fn start(
        prefix: &str,
        net: u8,
        n: usize,
        extra: &str,
        tweak: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
    ) -> anyhow::Result<DnsCluster> {
        let ips: Vec<IpAddr> = (1..=n).map(|i| IpAddr::V4(Ipv4Addr::new(127, 77, net, i as u8))).collect();
        let (port, dns_port) = (free_port(), free_port());
        let mut b = Cluster::builder(prefix, n).hosts(&ips).proxy_port(port);
        for (i, ip) in ips.iter().enumerate() {
            b = b.node_config(i + 1, &node_toml(SocketAddr::new(*ip, dns_port), "", extra));
        }
        let c = tweak(b).start().await?;
        let dc = DnsCluster { c, port, dns_port, ips };
        dc.c.wait_converged(Duration::from_secs(10)).await?;
        wait_dns(&dc.responders(), NAME, &dc.all(), Duration::from_secs(5)).await?;
        Ok(dc)
    }

    fn responder(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ips[i], self.dns_port)
    }

    fn responders(&self) -> Vec<SocketAddr> {
        (0..self.ips.len()).map(|i| self.responder(i)).collect()
    }

    fn all(&self) -> BTreeSet<IpAddr> {
        self.ips.iter().copied().collect()
    }

    /// Records resolved through every responder, node 1's first.
    fn records(&self) -> Records {
        Records::Responders { servers: self.responders(), name: NAME.into(), refresh: REFRESH }
    }
}

/// `GET path` on an admin address, as JSON.
async fn admin_json(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let raw = raw_exchange(admin, req.as_bytes(), Duration::from_secs(3)).await?;
    let r = RawResponse::parse(&raw)?;
    Ok(serde_json::from_slice(&r.body)?)
}

fn secret32(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let s = format!("{tag}-{nanos:x}-{:x}-0123456789abcdefghijklmnopqrstuvwxyz", std::process::id());
    s[..32].to_string()
}

fn max_of(v: &BTreeMap<String, Duration>) -> Duration {
    v.values().copied().max().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 a node under DNS load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_node_under_dns_load() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    for b in &bs {
        b.set_delay(Duration::from_millis(20));
    }
    let mut dc = DnsCluster::start("k9n", 1, 3, "", |b| b.backend(&bs[0]).backend(&bs[1]).backend(&bs[2])).await?;
    const STRICT: usize = 6;
    const ZONE: usize = 4;
    // Clients of the responders (node 1's asked first), one connection per request; and
    // clients of a plain zone listing all three nodes forever, with keep-alive.
    let strict = DnsLoad::new("strict", dc.records(), dc.port).no_keep_alive().concurrency(STRICT).start().await?;
    let zone = DnsLoad::new("zone", Records::Fixed(dc.ips.clone()), dc.port).concurrency(ZONE).start().await?;
    strict.wait_more(100, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Node 1: its responder is also the one clients ask first.
    let (victim, victim_ip) = (dc.c[0].id.clone(), dc.ips[0]);
    let killed = Instant::now();
    dc.c[0].kill9();
    // The node is gone once kill9 has reaped it: a request that started before then may have
    // been in flight on it (the signal takes a moment to land), one after may not fail.
    let (kill_strict, kill_zone) = (strict.elapsed(), zone.elapsed());
    let mut dead: BTreeMap<String, Duration> = BTreeMap::new();
    let mut dns_gone: BTreeMap<String, Duration> = BTreeMap::new();
    while (dead.len() < 2 || dns_gone.len() < 2) && killed.elapsed() < Duration::from_secs(10) {
        for i in 1..3 {
            let n = &dc.c[i];
            if !dead.contains_key(&n.id)
                && member_states(n).await.unwrap_or_default().get(&victim).is_some_and(|s| s == "dead")
            {
                dead.insert(n.id.clone(), killed.elapsed());
            }
            if !dns_gone.contains_key(&n.id)
                && dns_addrs(dc.responder(i), NAME).await.is_ok_and(|s| !s.contains(&victim_ip) && s.len() == 2)
            {
                dns_gone.insert(n.id.clone(), killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone_at = kill_strict + max_of(&dns_gone);
    // Load goes on a while: the responders no longer name the dead node.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (s, z) = (strict.stop().await, zone.stop().await);
    println!("{s}\n{z}");

    let mut f = Figures::new("kill9-node");
    f.add("sent", s.sent + z.sent)
        .add("failed", s.failed() + z.failed())
        .add("failed_bound", STRICT + ZONE)
        .add("strict_failed", s.failed())
        .add("zone_failed", z.failed())
        .add("zone_retried_to_dead", z.retried_away_from(victim_ip))
        .add_ms("dead_ms", max_of(&dead))
        .add_ms("dns_removed_ms", max_of(&dns_gone));
    // Strict clients never reuse a connection; each keep-alive zone client had one connection
    // to the killed node.
    bound_keepalive_retries(&s, 0, &mut f);
    bound_keepalive_retries(&z, ZONE, &mut f);
    f.print();
    let races: Vec<_> = z.records.iter().flat_map(|r| &r.retried).filter(|a| a.reused && a.addr != victim_ip).collect();
    assert!(races.is_empty(), "keep-alive races on surviving nodes: {races:?}");
    assert_eq!(dead.len(), 2, "{victim} not dead on both survivors within 10 s: {dead:?}");
    assert_eq!(dns_gone.len(), 2, "{victim_ip} still in a survivor's DNS answer after 10 s: {dns_gone:?}");
    for (id, d) in dead.iter().chain(dns_gone.iter()) {
        assert!(*d <= DEAD_TARGET.max(DNS_TARGET), "{id}: {d:?}");
    }
    assert!(max_of(&dead) <= DEAD_TARGET, "dead after {dead:?}");
    assert!(max_of(&dns_gone) <= DNS_TARGET, "out of the DNS answers after {dns_gone:?}");
    assert!(s.per_node.get(&victim_ip).copied().unwrap_or(0) > 20, "the victim served before the kill: {s}");
    // Only requests in flight on the killed node may fail: none on the survivors, none started
    // after the kill, at most one per client.
    for (load, kill_at) in [(&s, kill_strict), (&z, kill_zone)] {
        for r in load.failures() {
            assert_eq!(r.addr, Some(victim_ip), "a request failed on a surviving node: {r:?}");
            assert!(r.at < kill_at, "a request started {:?} after the kill failed: {r:?}", r.at - kill_at);
        }
    }
    assert!(s.failed() <= STRICT && z.failed() <= ZONE, "more failures than requests in flight: {s} / {z}");
    assert!(s.sent >= 300 && z.sent >= 200, "too little traffic to judge: {s} / {z}");
    // The responders stopped naming it; the plain zone still does and costs a connect attempt.
    let stale: Vec<_> = s.resolutions.iter().filter(|r| r.at > gone_at && r.addrs.contains(&victim_ip)).collect();
    assert!(stale.is_empty(), "resolutions after every survivor dropped {victim_ip}: {stale:?}");
    assert!(z.retried_away_from(victim_ip) > 0, "zone clients kept trying the dead address: {z}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 a backend under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_backend_under_load() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    for b in &bs {
        b.set_delay(Duration::from_millis(10));
    }
    let dc = DnsCluster::start("k9b", 2, 3, "", |b| b.backend(&bs[0]).backend(&bs[1]).backend(&bs[2])).await?;
    let load = DnsLoad::new("keepalive", dc.records(), dc.port).concurrency(8).start().await?;
    load.wait_more(200, Duration::from_secs(10)).await?;
    let victim = bs[1].addr;
    let before = bs[1].requests();
    assert!(before > 20, "the backend had traffic before: {before}");

    // The listener and every open connection closed at once, in-flight requests cut off: what
    // the kernel does to a killed process's sockets.
    let killed = Instant::now();
    bs[1].stop().await;
    let mut down: BTreeMap<String, Duration> = BTreeMap::new();
    while down.len() < 3 && killed.elapsed() < Duration::from_secs(5) {
        for n in &dc.c.nodes {
            if !down.contains_key(&n.id) && n.backend_state(victim).await == "down" {
                down.insert(n.id.clone(), killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = load.stop().await;
    println!("{s}");
    let first = down.values().copied().min().unwrap_or_default();
    let last = max_of(&down);
    let mut f = Figures::new("kill9-backend");
    f.add("sent", s.sent)
        .add("failed", s.failed())
        .add_ms("first_eject_ms", first)
        .add_ms("all_down_ms", last)
        .add_ms("spread_ms", last - first);
    // Every node stays up: no client connection to a node is closed under it.
    bound_keepalive_retries(&s, 0, &mut f);
    f.print();
    assert_eq!(down.len(), 3, "not down on every node within 5 s: {down:?}");
    assert_eq!(s.failed(), 0, "idempotent GETs are retried on another backend: {s}");
    assert!(
        last - first <= SHARED_EJECTION_TARGET,
        "down on the last node {:?} after the first ejected it: {down:?}",
        last - first
    );
    assert!(s.from("a") > 0 && s.from("c") > 0, "{s}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Graceful leave (`shoal leave`) and SIGTERM under DNS load
// ---------------------------------------------------------------------------------------------

/// Polls `responders` until none names `ip`; returns the time it took from `since`.
async fn wait_out_of_dns(responders: &[SocketAddr], ip: IpAddr, since: Instant) -> anyhow::Result<Duration> {
    loop {
        let mut out = true;
        for r in responders {
            out &= dns_addrs(*r, NAME).await.is_ok_and(|s| !s.contains(&ip) && !s.is_empty());
        }
        if out {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("{ip} still in the answers of {responders:?} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_and_sigterm_under_dns_load() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["a", "b"]).await?;
    for b in &bs {
        b.set_delay(Duration::from_millis(20));
    }
    let mut dc = DnsCluster::start("lv", 3, 3, "", |b| b.backend(&bs[0]).backend(&bs[1])).await?;
    let strict = DnsLoad::new("strict", dc.records(), dc.port).no_keep_alive().concurrency(4).start().await?;
    let browser = DnsLoad::new("keepalive", dc.records(), dc.port).concurrency(4).start().await?;
    // Plain-zone clients never stop using the leaving node: they meet its listener closing
    // (their failures are a figure here; `plain_dns_clients_lose_no_request_when_a_node_leaves`
    // asserts them).
    let zone =
        DnsLoad::new("zone", Records::Fixed(dc.ips.clone()), dc.port).no_keep_alive().concurrency(6).start().await?;
    // One request that is still running on the leaving node when it stops accepting.
    let held = |i: usize| {
        let addr = SocketAddr::new(dc.ips[i], dc.port);
        tokio::spawn(async move { shoal_tests::http::get(addr, "/?delay=2500").await })
    };
    strict.wait_more(100, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Node 3 leaves with `shoal leave`.
    let t0 = Instant::now();
    let leave_at = strict.elapsed();
    let held3 = held(2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut child = dc.c.shoal(2).spawn(&["leave", "--drain-timeout", "10s"])?;
    let gone3 = wait_out_of_dns(&[dc.responder(0), dc.responder(1)], dc.ips[2], t0).await?;
    let cli = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    let exit3 = dc.c[2].wait_exit(Duration::from_secs(20)).await?;
    let left3 = t0.elapsed();
    assert!(cli.success() && exit3.success(), "shoal leave {cli}, node 3 {exit3}");

    // Node 2 gets SIGTERM.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held2 = held(1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t1 = Instant::now();
    dc.c[1].signal(Signal::Term)?;
    let gone2 = wait_out_of_dns(&[dc.responder(0)], dc.ips[1], t1).await?;
    let exit2 = dc.c[1].wait_exit(Duration::from_secs(20)).await?;
    let left2 = t1.elapsed();
    assert!(exit2.success(), "node 2 after SIGTERM: {exit2}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (s, k, z) = (strict.stop().await, browser.stop().await, zone.stop().await);
    println!("{s}\n{k}\n{z}");
    let served_by = |l: &shoal_tests::ChaosSummary, ip: IpAddr, from: Duration| {
        l.records.iter().filter(|r| r.is_ok() && r.addr == Some(ip) && r.at >= from).count()
    };
    let mut f = Figures::new("leave-and-sigterm");
    f.add("sent", s.sent + k.sent)
        .add("failed", s.failed() + k.failed())
        .add("retried", s.retried_requests + k.retried_requests)
        .add("zone_failed", z.failed())
        .add("zone_retried", z.retried_requests)
        .add_ms("leave_dns_removed_ms", gone3)
        .add_ms("leave_exit_ms", left3)
        .add("served_while_leaving", served_by(&s, dc.ips[2], leave_at) + served_by(&k, dc.ips[2], leave_at))
        .add_ms("sigterm_dns_removed_ms", gone2)
        .add_ms("sigterm_exit_ms", left2);
    // Two nodes leave; each keep-alive client may hold one connection to each.
    bound_keepalive_retries(&s, 0, &mut f);
    bound_keepalive_retries(&k, 4 * 2, &mut f);
    bound_keepalive_retries(&z, 0, &mut f);
    f.print();
    assert!(gone3 <= Duration::from_secs(1) && gone2 <= Duration::from_secs(1), "draining leaves DNS at once");
    assert!(left3 <= Duration::from_secs(6) && left2 <= Duration::from_secs(6), "{left3:?} {left2:?}");
    assert!(s.sent >= 200 && k.sent >= 200, "too little traffic to judge: {s} / {k}");
    assert_eq!(s.failed(), 0, "one connection per request: {s}");
    assert_eq!(k.failed(), 0, "keep-alive clients: {k}");
    for (i, h) in [(3, held3), (2, held2)] {
        let r =
            h.await?.map_err(|e| anyhow::anyhow!("the request in flight on node {i} when it left failed: {e:#}"))?;
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 1), "node {i}: {r:?}");
    }
    assert!(z.retried_requests > 0, "plain-zone clients met the stopped listeners: {z}");
    assert!(served_by(&s, dc.ips[2], leave_at) + served_by(&k, dc.ips[2], leave_at) > 0, "node 3 served while leaving");
    Ok(())
}

/// Clients of plain DNS records (no responder) keep connecting to a leaving node until it stops
/// accepting; each must then get either a refused connection (and move on) or an answer. A
/// connection the node accepted must not be dropped without a response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_dns_clients_lose_no_request_when_a_node_leaves() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["a", "b"]).await?;
    for b in &bs {
        b.set_delay(Duration::from_millis(20));
    }
    let mut dc = DnsCluster::start("zl", 4, 2, "", |b| b.backend(&bs[0]).backend(&bs[1])).await?;
    const ROUNDS: usize = 10;
    let mut failed = Vec::new();
    let (mut sent, mut refused) = (0, 0);
    for _ in 0..ROUNDS {
        let zone = DnsLoad::new("zone", Records::Fixed(dc.ips.clone()), dc.port)
            .no_keep_alive()
            .concurrency(16)
            .start()
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let term_at = zone.elapsed();
        dc.c[0].signal(Signal::Term)?;
        let status = dc.c[0].wait_exit(Duration::from_secs(20)).await?;
        assert!(status.success(), "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let z = zone.stop().await;
        sent += z.sent;
        refused += z.retried_requests;
        failed.extend(z.failures().map(|r| format!("term+{:?}: {:?}", r.at.saturating_sub(term_at), r.outcome)));
        dc.c.restart_node(1).await?;
        dc.c.wait_converged(Duration::from_secs(10)).await?;
    }
    let mut f = Figures::new("plain-dns-leave");
    f.add("leaves", ROUNDS).add("sent", sent).add("failed", failed.len()).add("retried", refused);
    f.print();
    assert!(failed.is_empty(), "{} requests lost in {ROUNDS} leaves: {failed:#?}", failed.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Partition one node from the other two (network namespaces)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_one_node_from_the_other_two() -> R {
    let _serial = serial().await;
    let mut lab = NetLab::new(3, 3)?;
    let tag = lab.tag().to_string();
    let result = partition_scenario(&mut lab).await;
    drop(lab);
    let left = NetLab::leftovers(&tag);
    assert!(left.is_empty(), "the test left network namespaces or links behind: {left:?}");
    result
}

async fn partition_scenario(lab: &mut NetLab) -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let mut relays = Vec::new();
    for (k, b) in bs.iter().enumerate() {
        relays.push(Relay::start(lab.host_ip(k), b.addr).await?);
    }
    let ips: Vec<IpAddr> = (1..=3).map(|i| lab.node_ip(i)).collect();
    let (port, dns_port) = (free_port(), free_port());
    let health = "[upstream]\nconnect_timeout = \"1s\"\n[health]\ninterval = \"200ms\"\nrise = 2\nfall = 2\ntimeout = \"500ms\"\ntype = \"http\"\npath = \"/health\"\n";
    let mut builder = Cluster::builder("part", 3).hosts(&ips).proxy_port(port).secret(&secret32("partition"));
    for (i, ip) in ips.iter().enumerate() {
        builder = builder
            .node_wrapper(i + 1, &lab.wrapper(i + 1))
            .node_config(i + 1, &node_toml(SocketAddr::new(*ip, dns_port), "", health));
    }
    for r in &relays {
        builder = builder.arg("--backend").arg(&format!("{},fail_timeout=2s", r.addr));
    }
    let c = builder.start().await?;
    c.wait_converged(Duration::from_secs(10)).await?;
    let responders: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, dns_port)).collect();
    let all: BTreeSet<IpAddr> = ips.iter().copied().collect();
    wait_dns(&responders, NAME, &all, Duration::from_secs(5)).await?;
    let relay_c = relays[2].addr;

    // Clients keep using each side directly: node 1 alone, and nodes 2 and 3.
    let side1 = DnsLoad::new("side-1", Records::Fixed(vec![ips[0]]), port).concurrency(3).start().await?;
    let side23 = DnsLoad::new("side-2-3", Records::Fixed(vec![ips[1], ips[2]]), port).concurrency(3).start().await?;
    side1.wait_more(50, Duration::from_secs(10)).await?;

    // Cut node 1 off; it also loses its route to backend c.
    let cut = Instant::now();
    lab.partition(&[1], &[2, 3])?;
    lab.block(1, relay_c.ip())?;
    let mut seen_dead: BTreeMap<String, Duration> = BTreeMap::new();
    let want = |n: usize| -> Vec<(String, &str)> {
        (1..=3)
            .filter(|&j| j != n)
            .map(|j| (format!("part-{j}"), if n == 1 || j == 1 { "dead" } else { "alive" }))
            .collect()
    };
    while seen_dead.len() < 3 && cut.elapsed() < Duration::from_secs(10) {
        for (i, n) in c.nodes.iter().enumerate() {
            if seen_dead.contains_key(&n.id) {
                continue;
            }
            let m = member_states(n).await.unwrap_or_default();
            if want(i + 1).iter().all(|(id, st)| m.get(id).map(String::as_str) == Some(*st)) {
                seen_dead.insert(n.id.clone(), cut.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detect = max_of(&seen_dead);
    assert_eq!(seen_dead.len(), 3, "each side sees the other dead within 10 s: {seen_dead:?}");
    // Each side's responder names its own side only.
    let dns_split = wait_dns(&responders[..1], NAME, &BTreeSet::from([ips[0]]), Duration::from_secs(3)).await?;
    wait_dns(&responders[1..], NAME, &BTreeSet::from([ips[1], ips[2]]), Duration::from_secs(3)).await?;
    // Node 1 takes backend c out; nodes 2 and 3 never hear of it and keep it.
    wait_backend(&[&c[0]], relay_c, "is down on node 1", Duration::from_secs(5), |e| e["own_verdict"] == "down")
        .await?;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_millis(1500) {
        for n in [&c[1], &c[2]] {
            let e = backend_entry(n, relay_c).await;
            assert_eq!(e["state"], "up", "{}: a partitioned peer's verdict must not reach it: {e}", n.id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = (side1.completed(), side23.completed());

    // Heal.
    lab.heal()?;
    let healed = Instant::now();
    let converged = c.wait_converged(Duration::from_secs(15)).await?;
    let dns_converged = wait_dns(&responders, NAME, &all, Duration::from_secs(10)).await?;
    let observers: Vec<&Node> = c.nodes.iter().collect();
    for r in &relays {
        wait_backend(&observers, r.addr, "is up on every node", Duration::from_secs(15), |e| e["state"] == "up")
            .await?;
    }
    let backends_up = healed.elapsed();
    // ...and they stay up.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_millis(1000) {
        for n in &c.nodes {
            for r in &relays {
                let e = backend_entry(n, r.addr).await;
                assert_eq!(e["state"], "up", "{} after the heal: {e}", n.id);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s1, s23) = (side1.stop().await, side23.stop().await);
    println!("{s1}\n{s23}");
    let mut f = Figures::new("partition");
    f.add("sent", s1.sent + s23.sent)
        .add("failed", s1.failed() + s23.failed())
        .add("served_during_partition", during.0 + during.1)
        .add_ms("detect_ms", detect)
        .add_ms("dns_split_ms", detect + dns_split)
        .add_ms("converge_after_heal_ms", converged)
        .add_ms("dns_converge_after_heal_ms", converged + dns_converged)
        .add_ms("backends_up_after_heal_ms", backends_up);
    // The cut is between the nodes (and node 1 and backend c), never the clients' links.
    bound_keepalive_retries(&s1, 0, &mut f);
    bound_keepalive_retries(&s23, 0, &mut f);
    f.print();
    assert!(detect <= DEAD_TARGET, "each side saw the other dead after {seen_dead:?}");
    assert!(converged <= CONVERGE_TARGET, "views converged {converged:?} after the heal");
    // Node 1's ejection of c lasts fail_timeout (2 s); nothing may stay out longer than that
    // plus convergence.
    assert!(
        backends_up <= Duration::from_secs(2) + CONVERGE_TARGET,
        "every backend up on every node only {backends_up:?} after the heal"
    );
    assert_eq!(s1.failed(), 0, "node 1 kept serving: {s1}");
    assert_eq!(s23.failed(), 0, "nodes 2 and 3 kept serving: {s23}");
    assert!(s1.sent >= 100 && s23.sent >= 100, "{s1} / {s23}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Rolling restart under DNS load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_dns_load() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["a", "b", "runtime"]).await?;
    for b in &bs {
        b.set_delay(Duration::from_millis(10));
    }
    let mut dc = DnsCluster::start("roll", 5, 3, "", |b| b.backend(&bs[0]).backend(&bs[1]).data_dirs()).await?;
    let added = bs[2].addr;
    dc.c.shoal(0).json(&["backend", "add", &added.to_string(), "--weight", "2"]).await?;
    let all: Vec<&Node> = dc.c.nodes.iter().collect();
    wait_backend(&all, added, "is on every node", Duration::from_secs(3), |e| e["weight"] == 2).await?;

    let strict = DnsLoad::new("strict", dc.records(), dc.port).no_keep_alive().concurrency(4).start().await?;
    let browser = DnsLoad::new("keepalive", dc.records(), dc.port).concurrency(4).start().await?;
    strict.wait_more(100, Duration::from_secs(10)).await?;
    let mut figures = Vec::new();
    let mut restarted_at = Vec::new();
    for i in 1..=3 {
        let t = Instant::now();
        dc.c[i - 1].signal(Signal::Term)?;
        let status = dc.c[i - 1].wait_exit(Duration::from_secs(20)).await?;
        assert!(status.success(), "node {i} after SIGTERM: {status}");
        let node = dc.c.restart_node(i).await?;
        // From its own disk, before it heard anyone.
        let e = backend_entry(node, added).await;
        assert_eq!((e["weight"].clone(), e["state"].clone()), (2.into(), "up".into()), "node {i}: {e}");
        restarted_at.push((dc.ips[i - 1], strict.elapsed(), browser.elapsed()));
        let converged = dc.c.wait_converged(Duration::from_secs(10)).await?;
        let in_dns = wait_dns(&dc.responders(), NAME, &dc.all(), Duration::from_secs(5)).await?;
        figures.push((t.elapsed(), converged, in_dns));
        assert!(converged <= CONVERGE_TARGET, "node {i} alive everywhere after {converged:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, k) = (strict.stop().await, browser.stop().await);
    println!("{s}\n{k}");
    let mut f = Figures::new("rolling-restart");
    f.add("sent", s.sent + k.sent)
        .add("failed", s.failed() + k.failed())
        .add("retried", s.retried_requests + k.retried_requests)
        .add_ms("cycle_max_ms", figures.iter().map(|x| x.0).max().unwrap_or_default())
        .add_ms("rejoin_max_ms", figures.iter().map(|x| x.1).max().unwrap_or_default())
        .add_ms("back_in_dns_max_ms", figures.iter().map(|x| x.1 + x.2).max().unwrap_or_default());
    // Three restarts; each keep-alive client may hold one connection to each restarted node.
    bound_keepalive_retries(&s, 0, &mut f);
    bound_keepalive_retries(&k, 4 * 3, &mut f);
    f.print();
    assert!(s.sent >= 200 && k.sent >= 200, "too little traffic to judge: {s} / {k}");
    assert_eq!(s.failed(), 0, "one connection per request: {s}");
    assert_eq!(k.failed(), 0, "keep-alive clients: {k}");
    // Every restarted node served again, and the run-time backend is everywhere, in use.
    for (ip, at_s, at_k) in &restarted_at {
        let n = s.records.iter().filter(|r| r.is_ok() && r.addr == Some(*ip) && r.at > *at_s).count()
            + k.records.iter().filter(|r| r.is_ok() && r.addr == Some(*ip) && r.at > *at_k).count();
        assert!(n > 0, "{ip} served nothing after its restart");
    }
    for n in &dc.c.nodes {
        let e = backend_entry(n, added).await;
        assert_eq!((e["weight"].clone(), e["state"].clone()), (2.into(), "up".into()), "{}: {e}", n.id);
    }
    assert!(s.from("runtime") > 0 && k.from("runtime") > 0, "the run-time backend took traffic: {s}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. A flapping backend
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_backend_does_not_thrash_the_cluster() -> R {
    let _serial = serial().await;
    // `flap` goes away and comes back (listener and connections); `sick` keeps serving but its
    // health check fails and recovers, on the same rhythm.
    let bs = Backend::start_many(&["a", "b", "flap", "sick"]).await?;
    let checks = "[health]\ninterval = \"200ms\"\nrise = 2\nfall = 3\ntimeout = \"300ms\"\ntype = \"http\"\npath = \"/health\"\n";
    let dc = DnsCluster::start("flap", 6, 3, checks, |mut b| {
        for x in &bs {
            b = b.backend(x);
        }
        b
    })
    .await?;
    let (flap, sick) = (bs[2].addr, bs[3].addr);
    let all: Vec<&Node> = dc.c.nodes.iter().collect();
    for addr in [flap, sick] {
        wait_backend(&all, addr, "is checked and up", Duration::from_secs(3), |e| e["state"] == "up").await?;
    }

    // Every node's view of both, every 50 ms.
    let admins: Vec<(String, SocketAddr)> = dc.c.nodes.iter().map(|n| (n.id.clone(), n.admin)).collect();
    let watching = Arc::new(AtomicBool::new(true));
    let w = watching.clone();
    let watcher = tokio::spawn(async move {
        let mut seen: BTreeMap<(SocketAddr, String), Vec<String>> = BTreeMap::new();
        while w.load(SeqCst) {
            for (id, admin) in &admins {
                let Ok(s) = admin_json(*admin, "/status").await else { continue };
                for addr in [flap, sick] {
                    let st = find_backend(&s["backends"], addr).map(|e| e["state"].to_string()).unwrap_or_default();
                    let v = seen.entry((addr, id.clone())).or_default();
                    if v.last() != Some(&st) {
                        v.push(st);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    });
    let load = DnsLoad::new("keepalive", dc.records(), dc.port).concurrency(6).start().await?;
    load.wait_more(100, Duration::from_secs(10)).await?;
    let base: Vec<u64> = bs.iter().map(Backend::requests).collect();
    let checks0 = bs[2].health_checks();
    // Down and up every 300 ms, 20 times (the last flap brings them back).
    const FLAPS: usize = 20;
    for k in 0..FLAPS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if k % 2 == 0 {
            bs[2].stop().await;
            bs[3].set_health_status(500);
        } else {
            bs[2].restart().await?;
            bs[3].set_health_status(200);
        }
    }
    let got: Vec<u64> = bs.iter().zip(&base).map(|(b, n)| b.requests() - n).collect();
    let checks = bs[2].health_checks() - checks0;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = load.stop().await;
    watching.store(false, SeqCst);
    let seen = watcher.await?;
    println!("{s}\nstates seen on each node: {seen:?}");
    let transitions = |addr: SocketAddr| -> Vec<usize> {
        seen.iter().filter(|((a, _), _)| *a == addr).map(|(_, v)| v.len().saturating_sub(1)).collect()
    };
    let (tf, ts) = (transitions(flap), transitions(sick));
    let others = (got[0] + got[1]) as f64 / 2.0;
    let mut f = Figures::new("flapping-backend");
    f.add("sent", s.sent)
        .add("failed", s.failed())
        .add("flaps", FLAPS)
        .add("transitions_max_per_node", tf.iter().max().copied().unwrap_or(0))
        .add("transitions_total", tf.iter().sum::<usize>())
        .add("health_flapper_transitions_total", ts.iter().sum::<usize>())
        .add("flapper_requests", got[2])
        .add("other_backend_requests_avg", others as u64)
        .add("flapper_health_checks", checks);
    // Backends flap, nodes do not: no client connection to a node is closed under it.
    bound_keepalive_retries(&s, 0, &mut f);
    f.print();
    assert_eq!(s.failed(), 0, "{s}");
    assert_eq!((tf.len(), ts.len()), (3, 3), "{seen:?}");
    for t in tf.iter().chain(&ts) {
        assert!(*t <= FLAPS / 5, "a node changed a flapping backend's state {t} times for {FLAPS} flaps: {seen:?}");
    }
    assert!(
        (got[2] as f64) <= others / 4.0,
        "the flapper got {} requests while the others got {:?} each: a storm at a flapping backend",
        got[2],
        &got[..2]
    );

    // The bound above also holds with active checks off, so: `sick` failing its check for good
    // must be marked down on every node (fall 3 x 200 ms, plus one interval and slack), get no
    // more requests, and come back after rise 2 good checks. Its checkers (`checkers`, default
    // 2 of the 3 nodes) find it down themselves; the other node takes their verdict.
    const CHECK_VERDICT_WITHIN: Duration = Duration::from_millis(3 * 200 + 200 + 600);
    bs[3].set_health_status(500);
    let down_after =
        wait_backend(&all, sick, "is down on every node by its checkers' verdict", CHECK_VERDICT_WITHIN, |e| {
            let checker = e["checked_here"] == true;
            e["state"] == "down" && (e["own_verdict"] == "down") == checker
        })
        .await?;
    let before = bs[3].requests();
    for n in &dc.c.nodes {
        let s = Load::new(n.proxy).concurrency(2).count(20).run().await;
        assert_eq!(s.ok, 20, "{}: {s}", n.id);
    }
    assert_eq!(bs[3].requests(), before, "no node sends requests to a backend its checks found down");
    bs[3].set_health_status(200);
    let up_after =
        wait_backend(&all, sick, "is up again on every node", CHECK_VERDICT_WITHIN, |e| e["state"] == "up").await?;
    println!("sick failing for good: down everywhere after {down_after:?}; good again: up after {up_after:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Full cluster restart (a crash of every node) with data dirs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_a_crash_of_the_whole_cluster() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["config", "added", "removed"]).await?;
    let (a, b, gone) = (bs[0].addr, bs[1].addr, bs[2].addr);
    let mut c = Cluster::builder("crash", 3).backend(&bs[0]).data_dirs().start().await?;
    c.wait_converged(Duration::from_secs(10)).await?;
    c.shoal(0).json(&["backend", "add", &b.to_string(), "--weight", "4"]).await?;
    c.shoal(1).json(&["backend", "add", &gone.to_string()]).await?;
    let all: Vec<&Node> = c.nodes.iter().collect();
    wait_backend(&all, gone, "is added everywhere", Duration::from_secs(3), |e| e["state"] == "up").await?;
    c.shoal(2).json(&["backend", "remove", &gone.to_string()]).await?;
    c.shoal(1).json(&["backend", "drain", &a.to_string()]).await?;
    wait_backend(&all, b, "is added everywhere", Duration::from_secs(3), |e| e["weight"] == 4).await?;
    wait_backend(&all, gone, "is removed everywhere", Duration::from_secs(3), Value::is_null).await?;
    wait_backend(&all, a, "is draining everywhere", Duration::from_secs(3), |e| e["state"] == "draining").await?;
    // Every node has persisted what it merged from gossip (read back from its data dir).
    let dirs: Vec<std::path::PathBuf> = c.nodes.iter().map(|n| c.dir().join(format!("data-{}", n.id))).collect();
    wait_until(Duration::from_secs(3), "every node persisted the add, the remove and the drain", async || {
        dirs.iter().all(|d| {
            let op = |addr| shoal_tests::state::entry(d, addr).map(|e| (e.op, e.weight));
            op(b) == Some((RegOp::Add, 4))
                && op(gone).map(|o| o.0) == Some(RegOp::Remove)
                && op(a).map(|o| o.0) == Some(RegOp::Drain)
        })
    })
    .await?;

    // Power loss: every node at once, no leave.
    for n in &mut c.nodes {
        n.kill9();
    }
    let t = Instant::now();
    let mut restored = 0;
    for i in [3, 2, 1] {
        let n = c.restart_node(i).await?;
        let (eb, eg, ea) = (backend_entry(n, b).await, backend_entry(n, gone).await, backend_entry(n, a).await);
        assert_eq!((eb["weight"].clone(), eb["state"].clone()), (4.into(), "up".into()), "{}: {eb}", n.id);
        assert!(eg.is_null(), "{}: a removed backend came back: {eg}", n.id);
        assert_eq!(ea["state"], "draining", "{}: {ea}", n.id);
        restored += 3;
    }
    let started = t.elapsed();
    let converged = c.wait_converged(Duration::from_secs(10)).await?;
    let before = bs[0].requests();
    let mut sent = 0;
    for n in &c.nodes {
        let s = Load::new(n.proxy).concurrency(1).count(10).run().await;
        sent += s.sent;
        assert_eq!((s.ok, s.from("added")), (10, 10), "{}: {s}", n.id);
    }
    assert_eq!(bs[0].requests(), before, "the drained backend stays drained");
    let mut f = Figures::new("crash-restart");
    f.add("sent", sent)
        .add("failed", 0)
        .add("registry_checks_restored", restored)
        .add_ms("restart_all_ms", started)
        .add_ms("converge_ms", converged);
    f.print();
    assert!(converged <= CONVERGE_TARGET, "{converged:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Forged gossip and unauthenticated control calls
// ---------------------------------------------------------------------------------------------

/// The first gossip datagram a node started with `args` sends to a seed we listen on.
async fn capture_datagram(id: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let tap = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut nb = Node::builder(id).arg("--seed").arg(&tap.local_addr()?.to_string());
    for a in args {
        nb = nb.arg(a);
    }
    let node = nb.start().await?;
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), tap.recv_from(&mut buf)).await??;
    drop(node);
    Ok(buf[..n].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_and_calls_without_the_secret_are_refused() -> R {
    let _serial = serial().await;
    let bs = Backend::start_many(&["a", "x"]).await?;
    let c = Cluster::builder("sec", 3).secret(&secret32("right")).gossip_debug().backend(&bs[0]).start().await?;
    c.wait_converged(Duration::from_secs(10)).await?;
    let dir = TempDir::new("chaos-sec")?;
    let wrong = dir.write("wrong", &secret32("wrong"))?;
    let wrong_text = wrong.display().to_string();

    // Real datagrams of the same cluster id: sealed with another secret, and not sealed at all.
    let cid = c.cluster_id().to_string();
    let sealed_wrong = capture_datagram("sec-intruder", &["--cluster-id", &cid, "--secret-file", &wrong_text]).await?;
    let plain = capture_datagram("sec-plain", &["--cluster-id", &cid]).await?;
    let mut forged: Vec<Vec<u8>> = vec![sealed_wrong, plain];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut junk = |n: usize, prefix: &[u8]| {
        let mut d = prefix.to_vec();
        d.extend((0..n).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        }));
        d
    };
    forged.push(junk(200, b""));
    forged.push(junk(150, b"SHL1"));
    forged.push(junk(10, b"SHL1"));
    // Anything in flight handled before counting.
    let mut base = Vec::new();
    for n in &c.nodes {
        base.push(n.settled_rejected_datagrams(Duration::from_secs(5)).await?);
    }
    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for n in &c.nodes {
        for d in &forged {
            sender.send_to(d, n.gossip).await?;
        }
    }
    let t = Instant::now();
    let want: Vec<f64> = base.iter().map(|b| b + forged.len() as f64).collect();
    let mut got = Vec::new();
    while t.elapsed() < Duration::from_secs(3) {
        got.clear();
        for n in &c.nodes {
            got.push(n.metric("shoal_gossip_rejected_datagrams", &[]).await.unwrap_or(-1.0));
        }
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settling sends one more junk datagram after the forged ones and waits for it: every
    // forged one has been handled by then, so a double count would show.
    let mut after = Vec::new();
    for n in &c.nodes {
        after.push(n.settled_rejected_datagrams(Duration::from_secs(5)).await? - 1.0);
    }
    assert_eq!(after, want, "each forged datagram rejected and counted once on each node (base {base:?})");

    // Control calls without the secret, or with another one.
    let calls0 = c[0].metric("shoal_control_rejected_calls", &[]).await.expect("the metric exists");
    let x = bs[1].addr.to_string();
    let a = bs[0].addr.to_string();
    let attempts: Vec<(Shoal, Vec<&str>)> = vec![
        (Shoal::at(c[0].control), vec!["backend", "add", &x]),
        (Shoal::at(c[0].control).secret_file(&wrong), vec!["backend", "add", &x]),
        (Shoal::at(c[0].control), vec!["backend", "drain", &a]),
        (Shoal::at(c[0].control), vec!["leave"]),
    ];
    for (sh, args) in &attempts {
        let out = sh.run(args).await?;
        assert_eq!(out.code, 1, "{args:?} without the secret: {out:?}");
        assert!(out.stderr.contains("secret"), "{out:?}");
    }
    let calls = c[0].metric("shoal_control_rejected_calls", &[]).await.unwrap_or(-1.0) - calls0;
    assert_eq!(calls, attempts.len() as f64, "every refused call counted");
    // Several gossip rounds later: nothing was applied anywhere.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for n in &c.nodes {
        let m = member_states(n).await?;
        assert_eq!(m.keys().cloned().collect::<Vec<_>>(), c.ids(), "{}: {m:?}", n.id);
        assert!(m.values().all(|s| s == "alive"), "{}: {m:?}", n.id);
        assert_eq!(n.backend_addrs().await?, vec![a.clone()], "{}", n.id);
        assert_eq!(n.backend_state(bs[0].addr).await, "up", "{}", n.id);
    }
    assert_eq!(c[0].ready_status().await, 200, "the refused leave changed nothing");
    let mut f = Figures::new("forged-gossip-and-rpc");
    f.add("forged_datagrams_sent", forged.len() * c.nodes.len())
        .add("rejected_counted", after.iter().zip(&base).map(|(a, b)| a - b).sum::<f64>())
        .add("rpcs_without_secret", attempts.len())
        .add("rpcs_refused_counted", calls)
        .add("applied", 0);
    f.print();
    Ok(())
}
