//! Promises of the README and `docs/OPERATIONS.md` that no other test checked (issue 9's
//! "also untested"):
//!
//! 1. Without `cluster.secret_file` the node binds control and gossip to loopback only and
//!    says so at start.
//! 2. `[node] workers = N` runs N proxy threads (`shoal-proxy-0..N-1`).
//! 3. (unit test in `node/src/limit/mod.rs`: idle rate-limit entries are forgotten.)
//! 4. ip-hash: every node picks the same backend for a client IP, even when the run-time
//!    registry got the backends in different orders.
//! 5. HTTP/2 request bodies (buffered and streamed) reach the backend byte-exact; an HTTP/2
//!    request with no backend gets 503 with `x-shoal-node`.
//! 6. The demo: Ctrl-C makes every node drain and leave, and the demo exits 0.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use shoal_tests::http::{RawResponse, raw_exchange_from};
use shoal_tests::node::plain;
use shoal_tests::{Backend, Cluster, Node, RawServer, TempDir, bins, free_addr, h2c, pattern, wait_until};

type R = anyhow::Result<()>;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A child process killed and reaped on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Local addresses (`/proc/net/{tcp,udp}` hex form, e.g. `0100007F:1CE8`) of the sockets
/// process `pid` holds, per protocol file (read in the process's own network namespace).
fn socket_addrs_of(pid: u32, proto: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(fd) = fd else { continue };
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.display().to_string();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/{proto}"))?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && inodes.contains(f[9])).then(|| f[1].to_string())
        })
        .collect())
}

/// `/proc/net` hex form of an IPv4 socket address (little-endian address, big-endian port).
fn proc_hex(ip: Ipv4Addr, port: u16) -> String {
    format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()))
}

/// Names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// Waits until process `pid` holds the default control (TCP 7400) and gossip (UDP 7946) sockets
/// on `ip`; the TCP and UDP local addresses it holds then.
async fn wait_for_default_sockets(pid: u32, ip: Ipv4Addr) -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let found = wait_until(Duration::from_secs(10), "the node holds its control and gossip sockets", async || {
        let tcp = socket_addrs_of(pid, "tcp").unwrap_or_default();
        let udp = socket_addrs_of(pid, "udp").unwrap_or_default();
        let ok = tcp.contains(&proc_hex(ip, 7400)) && udp.contains(&proc_hex(ip, 7946));
        last = (tcp, udp);
        ok
    })
    .await;
    found.with_context(|| format!("node sockets tcp {:?} udp {:?}", last.0, last.1))?;
    Ok(last)
}

// ---------------------------------------------------------------------------------------------
// 1. No secret: loopback only, and said at start
// ---------------------------------------------------------------------------------------------

/// `shoald run` with no secret and no control or gossip address (so the defaults apply: the
/// harness's `Node` always passes both, hence a process of our own): the start log says "no
/// cluster secret ... bound to loopback only", the "shoald started" line names
/// `127.0.0.1:7400` and `127.0.0.1:7946`, and the process's own sockets (its fds matched to
/// `/proc/net/tcp` and `/proc/net/udp`) are bound there and on no wildcard address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_control_and_gossip_bind_loopback_and_say_so() -> R {
    let dir = TempDir::new("promises-loopback")?;
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path)?;
    let (listen, admin) = (free_addr(), free_addr());
    let mut child = Kill(
        Command::new(bins::shoald())
            .arg("run")
            .args(["--node-id", "loopback-default", "--cluster-id", "promises-loopback"])
            .args(["--listen", &listen.to_string(), "--admin", &admin.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?,
    );
    let read_log = |p: &Path| plain(&std::fs::read_to_string(p).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log(&log_path).contains("shoald started") {
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "shoald exited with {status} before it started (ports 7400/7946 busy?); log:\n{}",
                read_log(&log_path)
            );
        }
        ensure!(Instant::now() < deadline, "no \"shoald started\" within 20 s; log:\n{}", read_log(&log_path));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = read_log(&log_path);
    let warned = text.lines().find(|l| l.contains("no cluster secret")).with_context(|| text.clone())?;
    ensure!(warned.contains("bound to loopback only"), "{warned}");
    ensure!(warned.contains("gossip=127.0.0.1:7946") && warned.contains("control=127.0.0.1:7400"), "{warned}");
    let started = text.lines().find(|l| l.contains("shoald started")).context("no started line")?;
    ensure!(started.contains("control=127.0.0.1:7400") && started.contains("gossip=127.0.0.1:7946"), "{started}");

    let pid = child.0.id();
    let lo = Ipv4Addr::LOCALHOST;
    let (tcp, udp) = &wait_for_default_sockets(pid, lo).await?;
    for (what, set, port) in [("control", tcp, 7400u16), ("gossip", udp, 7946)] {
        let wildcard = proc_hex(Ipv4Addr::UNSPECIFIED, port);
        ensure!(!set.contains(&wildcard), "{what} is also bound on 0.0.0.0:{port}: {set:?}");
        let elsewhere: Vec<&String> =
            set.iter().filter(|a| a.ends_with(&format!(":{port:04X}")) && **a != proc_hex(lo, port)).collect();
        ensure!(elsewhere.is_empty(), "{what} bound on other addresses: {elsewhere:?}");
    }
    Ok(())
}

/// The same with a secret (`[cluster] secret_file`) and still no control or gossip address:
/// the defaults are `0.0.0.0:7400` and `0.0.0.0:7946`, and no "no cluster secret" line. A
/// wildcard bind must not reach beyond loopback, so the node runs in a network namespace of
/// its own (`unshare -n`) whose only interface is `lo`: nothing outside can reach it, and the
/// default ports are free there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_control_and_gossip_default_to_every_address() -> R {
    let dir = TempDir::new("promises-secret")?;
    let secret = dir.write("secret", "0123456789abcdef0123456789abcdef\n")?;
    let config = dir.write("shoald.toml", &format!("[cluster]\nsecret_file = {:?}\n", secret.display().to_string()))?;
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Kill(
        Command::new("unshare")
            .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
            .arg(bins::shoald())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--node-id", "secret-default", "--cluster-id", "promises-secret"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?,
    );
    let read_log = |p: &Path| plain(&std::fs::read_to_string(p).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log(&log_path).contains("shoald started") {
        if let Some(status) = child.0.try_wait()? {
            bail!("shoald exited with {status} before it started; log:\n{}", read_log(&log_path));
        }
        ensure!(Instant::now() < deadline, "no \"shoald started\" within 20 s; log:\n{}", read_log(&log_path));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = read_log(&log_path);
    ensure!(!text.contains("no cluster secret"), "a node with a secret warned about none:\n{text}");
    let started = text.lines().find(|l| l.contains("shoald started")).context("no started line")?;
    ensure!(started.contains("control=0.0.0.0:7400") && started.contains("gossip=0.0.0.0:7946"), "{started}");
    // `exec` keeps the pid: it is shoald's, inside the namespace.
    let pid = child.0.id();
    wait_for_default_sockets(pid, Ipv4Addr::UNSPECIFIED).await.with_context(|| format!("log:\n{text}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. [node] workers
// ---------------------------------------------------------------------------------------------

async fn proxy_threads_with_workers(n: usize) -> R {
    let b = Backend::start(&format!("workers-{n}-b")).await?;
    let node =
        Node::builder(&format!("workers-{n}")).config(format!("[node]\nworkers = {n}\n")).backend(&b).start().await?;
    let pid = node.pid().context("no pid")?;
    let want: BTreeSet<String> = (0..n).map(|i| format!("shoal-proxy-{i}")).collect();
    let mut seen = BTreeSet::new();
    let r = wait_until(Duration::from_secs(10), "the proxy threads are named as configured", async || {
        seen = thread_names(pid).into_iter().filter(|t| t.starts_with("shoal-proxy")).collect();
        seen == want
    })
    .await;
    r.with_context(|| format!("workers = {n}: proxy threads {seen:?}, want {want:?}; all: {:?}", thread_names(pid)))?;
    // The node serves through them.
    let r = shoal_tests::http::get(node.proxy, "/").await?;
    ensure!(r.status == 200, "{r:?}");
    Ok(())
}

/// `[node] workers = 3` runs exactly three proxy threads `shoal-proxy-0..2`; `workers = 1` one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_setting_sets_the_number_of_proxy_threads() -> R {
    proxy_threads_with_workers(3).await?;
    proxy_threads_with_workers(1).await
}

// ---------------------------------------------------------------------------------------------
// 4. ip-hash agreement over run-time backends added in different orders
// ---------------------------------------------------------------------------------------------

/// Two unseeded nodes (so each registry holds exactly what it was given) running ip-hash;
/// the same three backends are added at run time with `shoal backend add`, in other orders
/// on each node. The registry keeps its entries sorted by address, so add order alone does
/// not change a node's backend list; node 2 therefore also has the highest-addressed backend
/// in its startup flags, which puts it first there: the lists really differ
/// (`[b0, b1, b2]` and `[b2, b0, b1]` in `/status`, checked). 50 client IPs
/// (127.0.0.2..=51): each reaches the same backend through either node, and the 50 spread
/// over more than one backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_agrees_across_nodes_when_the_registry_got_backends_in_other_orders() -> R {
    let mut backends = Backend::start_many(&["iph-a", "iph-b", "iph-c"]).await?;
    backends.sort_by_key(|b| b.addr);
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let c = Cluster::builder("iph", 2)
        .unseeded()
        .algorithm("ip-hash")
        .node_arg(2, "--backend")
        .node_arg(2, &addrs[2])
        .start()
        .await?;
    let orders: [[usize; 3]; 2] = [[1, 2, 0], [2, 1, 0]];
    for (node, order) in orders.iter().enumerate() {
        for &i in order {
            let out = c.shoal(node).run(&["backend", "add", &addrs[i]]).await?;
            ensure!(out.code == 0, "backend add {} on node {node}: {out:?}", addrs[i]);
        }
    }
    let want_order = [
        vec![addrs[0].clone(), addrs[1].clone(), addrs[2].clone()],
        vec![addrs[2].clone(), addrs[0].clone(), addrs[1].clone()],
    ];
    for (n, want) in c.nodes.iter().zip(&want_order) {
        let mut seen = Vec::new();
        let r = wait_until(Duration::from_secs(15), "the node lists the 3 backends, all up", async || {
            let Ok(s) = n.status_json().await else { return false };
            let list = s["backends"].as_array().cloned().unwrap_or_default();
            seen = list.iter().map(|b| format!("{} {}", b["addr"], b["state"])).collect();
            let order: Vec<String> = list.iter().filter_map(|b| b["addr"].as_str().map(String::from)).collect();
            order == *want && list.iter().all(|b| b["state"] == "up")
        })
        .await;
        r.with_context(|| format!("{}: backends {seen:?}, want the order {want:?}", n.id))?;
    }
    let mut picks: BTreeMap<u8, Vec<String>> = BTreeMap::new();
    for last in 2..=51u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        for n in &c.nodes {
            let req = format!("GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", n.proxy);
            let raw = raw_exchange_from(ip, n.proxy, req.as_bytes(), Duration::from_secs(5)).await?;
            let r = RawResponse::parse(&raw).with_context(|| format!("from {ip} via {}", n.id))?;
            ensure!(r.status == 200, "from {ip} via {}: {r:?}", n.id);
            picks.entry(last).or_default().push(r.body_text().trim().to_string());
        }
    }
    let disagree: Vec<_> = picks.iter().filter(|(_, v)| v[0] != v[1]).collect();
    ensure!(disagree.is_empty(), "client IPs answered by different backends per node: {disagree:?}");
    let used: BTreeSet<&String> = picks.values().map(|v| &v[0]).collect();
    ensure!(used.len() > 1, "50 client IPs all hashed to one backend: {used:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. HTTP/2 request bodies and error answers
// ---------------------------------------------------------------------------------------------

/// Over h2c, a 1 KiB POST (buffered) and a 100 KiB one (over the 64 KiB request buffer: it
/// streams) each reach the backend byte-exact, and the client gets the backend's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_post_bodies_small_and_streamed_reach_the_backend_byte_exact() -> R {
    let server = RawServer::echo().await?;
    let node = Node::builder("h2-body").backend_spec(&format!("{},max_fails=0", server.addr)).start().await?;
    let (mut send, _conn) = h2c::connect(node.proxy).await?;
    for (path, len) in [("/small", 1024usize), ("/big", 100 * 1024)] {
        let body: Vec<u8> = pattern(len + 7).split_off(7);
        let req = http::Request::post(format!("http://{}{path}", node.proxy)).body(())?;
        let reply = h2c::request(&mut send, req, body.clone()).await?;
        ensure!(reply.status == 200, "{path}: {reply:?}");
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        ensure!(text == format!("POST {path} {len}"), "{path}: client got {text:?}");
        let got = server.last(path)?;
        ensure!(got.body.len() == len, "{path}: backend got {} bytes, sent {len}; head {:?}", got.body.len(), got.head);
        ensure!(got.body == body, "{path}: backend got the right length but different bytes");
    }
    Ok(())
}

/// Over h2c, a request to a node with no backend gets 503 naming the node in `x-shoal-node`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_request_with_no_backend_is_503_with_x_shoal_node() -> R {
    let node = Node::builder("h2-nobackend").start().await?;
    let (mut send, _conn) = h2c::connect(node.proxy).await?;
    let req = http::Request::get(format!("http://{}/", node.proxy)).body(())?;
    let reply = h2c::request(&mut send, req, Vec::new()).await?;
    ensure!(reply.status == 503, "{reply:?}");
    let named = reply.headers.get("x-shoal-node").and_then(|v| v.to_str().ok()).unwrap_or("");
    ensure!(named == "h2-nobackend", "x-shoal-node {named:?}: {reply:?}");
    // And a POST with a body likewise (refused before the body is read).
    let req = http::Request::post(format!("http://{}/up", node.proxy)).body(())?;
    let reply = h2c::request(&mut send, req, pattern(2048)).await?;
    ensure!(reply.status == 503, "{reply:?}");
    ensure!(reply.headers.get("x-shoal-node").is_some_and(|v| v == "h2-nobackend"), "{reply:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. The demo's Ctrl-C
// ---------------------------------------------------------------------------------------------

/// `shoald demo` (nodes log at info): after Ctrl-C (SIGINT) every node shows itself
/// `draining` on its own `/status`, three "leaving: draining announced" lines come before
/// three "left the cluster" lines, and the demo exits 0 within 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_ctrl_c_makes_every_node_drain_and_leave() -> R {
    // Away from the defaults and from demo.rs's offset 431.
    let offset: u16 = 517;
    let admin = |i: u16| SocketAddr::from(([127, 0, 0, 1], 9901 + i + offset));
    let mut child = Kill(
        Command::new(bins::shoald())
            .args(["demo", "--nodes", "3", "--backends", "2", "--port-offset", &offset.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(child.0.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().context("stderr")?),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(plain(&line));
            }
        });
    }
    drop(tx);
    let mut out: Vec<String> = Vec::new();
    let drain = |out: &mut Vec<String>| out.extend(rx.try_iter());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.iter().any(|l| l.contains("Ctrl-C stops the demo")) {
        ensure!(Instant::now() < deadline, "no demo banner within 30 s:\n{}", out.join("\n"));
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            out.push(l);
        }
    }
    for i in 1..=3 {
        let id = format!("node=node-{i} ");
        wait_until(Duration::from_secs(10), "every node logged its start", async || {
            drain(&mut out);
            out.iter().any(|l| l.contains("shoald started") && l.contains(&id))
        })
        .await
        .with_context(|| out.join("\n"))?;
    }
    let node_ids = ["node-1", "node-2", "node-3"];
    for (i, id) in node_ids.iter().enumerate() {
        let addr = admin(i as u16);
        wait_until(Duration::from_secs(10), "each node is alive on its own /status", async || {
            self_state(addr, id).await.as_deref() == Some("alive")
        })
        .await?;
    }

    let status = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status()?;
    ensure!(status.success());
    let start = Instant::now();
    let mut saw_draining = [false; 3];
    let exit = loop {
        for (i, id) in node_ids.iter().enumerate() {
            if !saw_draining[i] && self_state(admin(i as u16), id).await.as_deref() == Some("draining") {
                saw_draining[i] = true;
            }
        }
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        ensure!(start.elapsed() < Duration::from_secs(20), "demo still running 20 s after Ctrl-C");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The pipes close when the demo and its nodes are gone; take everything they wrote.
    let tail_deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(l) = rx.recv_timeout(tail_deadline.saturating_duration_since(Instant::now())) {
        out.push(l);
    }
    let all = out.join("\n");
    ensure!(exit.success(), "demo exit status {exit}:\n{all}");
    ensure!(saw_draining.iter().all(|d| *d), "nodes seen draining on their /status: {saw_draining:?}\n{all}");
    let leaving: Vec<usize> =
        out.iter().enumerate().filter(|(_, l)| l.contains("leaving: draining announced")).map(|(i, _)| i).collect();
    let left: Vec<usize> =
        out.iter().enumerate().filter(|(_, l)| l.contains("left the cluster")).map(|(i, _)| i).collect();
    ensure!(leaving.len() == 3 && left.len() == 3, "{} leaving, {} left lines:\n{all}", leaving.len(), left.len());
    // Every node announces draining, then (after the 1 s leave grace) leaves.
    ensure!(leaving.iter().max() < left.iter().min(), "a node left before another announced draining:\n{all}");
    ensure!(all.contains("demo stopped"), "{all}");
    Ok(())
}

/// Node `id`'s own state on its admin `/status` (`None` when it does not answer).
async fn self_state(admin: SocketAddr, id: &str) -> Option<String> {
    let req = format!("GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let raw = shoal_tests::http::raw_exchange(admin, req.as_bytes(), Duration::from_secs(2)).await.ok()?;
    let r = RawResponse::parse(&raw).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    v["members"].as_array()?.iter().find(|m| m["id"] == id).and_then(|m| m["state"].as_str()).map(String::from)
}
