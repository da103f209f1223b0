//! SIGHUP reload, held to OPERATIONS.md ("Configuration changes"): "SIGHUP reloads backends,
//! algorithm, timeouts, health, rate limits and the access log with no failed request", and
//! README: "a bad file keeps the old config".
//!
//! Each test starts one node whose backends and algorithm come from its config file (flags
//! would override the file on every reload), rewrites the file, sends SIGHUP, waits for the
//! node to log the outcome, and then observes the new behaviour from outside only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_tests::http::get;
use shoal_tests::{Backend, Load, Node, Signal, wait_until};

type R = anyhow::Result<()>;

/// How long a reload may take to be applied after SIGHUP (it re-reads one small file).
const RELOAD_TARGET: Duration = Duration::from_secs(3);

/// A config file: `[upstream]` keys, the backends, then any other tables.
fn config(upstream: &str, backends: &[SocketAddr], rest: &str) -> String {
    let mut s = format!("[upstream]\n{upstream}\n");
    for b in backends {
        s.push_str(&format!("[[upstream.backend]]\naddr = \"{b}\"\n"));
    }
    s.push_str(rest);
    s
}

fn addrs(bs: &[&Backend]) -> Vec<SocketAddr> {
    bs.iter().map(|b| b.addr).collect()
}

/// Rewrites the node's config, sends SIGHUP and waits until the node logs `marker` once more
/// than before (`config reloaded` or `reload failed`).
async fn reload(node: &Node, toml: &str, marker: &str) -> anyhow::Result<()> {
    let before = node.log().matches(marker).count();
    node.write_config(toml)?;
    node.signal(Signal::Hup)?;
    wait_until(RELOAD_TARGET, &format!("node logs {marker:?} after SIGHUP"), async || {
        node.log().matches(marker).count() > before
    })
    .await
}

/// `n` sequential requests on fresh connections; the answering backends, in order.
async fn answers(proxy: SocketAddr, n: usize) -> anyhow::Result<Vec<String>> {
    let mut v = Vec::new();
    for _ in 0..n {
        let r = get(proxy, "/").await?;
        anyhow::ensure!(r.status == 200, "status {} body {:?}", r.status, r.body);
        v.push(r.body);
    }
    Ok(v)
}

fn distinct(v: &[String]) -> std::collections::BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_switches_round_robin_to_ip_hash() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let all = addrs(&bs.iter().collect::<Vec<_>>());
    let node = Node::builder("reload-algo").config(config("algorithm = \"round-robin\"", &all, "")).start().await?;
    let before = answers(node.proxy, 30).await?;
    assert_eq!(distinct(&before).len(), 3, "round-robin spreads one client over all: {before:?}");
    for name in ["a", "b", "c"] {
        let n = before.iter().filter(|b| *b == name).count();
        assert!((8..=12).contains(&n), "round-robin gave {name} {n} of 30: {before:?}");
    }
    reload(&node, &config("algorithm = \"ip-hash\"", &all, ""), "config reloaded").await?;
    let after = answers(node.proxy, 30).await?;
    assert_eq!(distinct(&after).len(), 1, "ip-hash: one client (127.0.0.1) always lands on one backend: {after:?}");
    let s = node.status_json().await?;
    println!("RELOAD algorithm: before {:?}, after {:?}", distinct(&before), distinct(&after));
    assert!(s.to_string().contains("ip-hash"), "/status names the new algorithm: {s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_the_backends() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let node = Node::builder("reload-backends")
        .config(config("algorithm = \"round-robin\"", &addrs(&[&bs[0], &bs[1]]), ""))
        .start()
        .await?;
    assert_eq!(distinct(&answers(node.proxy, 10).await?), ["a", "b"].into());
    reload(&node, &config("algorithm = \"round-robin\"", &addrs(&[&bs[1], &bs[2]]), ""), "config reloaded").await?;
    let mut want = vec![bs[1].addr.to_string(), bs[2].addr.to_string()];
    want.sort();
    assert_eq!(node.backend_addrs().await?, want, "/status lists the new backends");
    let a0 = bs[0].requests();
    let after = answers(node.proxy, 20).await?;
    assert_eq!(distinct(&after), ["b", "c"].into(), "traffic goes to the new set only: {after:?}");
    assert_eq!(bs[0].requests(), a0, "the removed backend gets nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_shortens_read_timeout() -> R {
    const SLOW: Duration = Duration::from_secs(3);
    let b = Backend::start("slow").await?;
    b.set_delay(SLOW);
    let up = |t: &str| format!("read_timeout = \"{t}\"\nretries = 0");
    let node = Node::builder("reload-timeout").config(config(&up("5s"), &[b.addr], "")).start().await?;
    let t = Instant::now();
    let r = get(node.proxy, "/").await?;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "slow"), "a 3 s answer is within read_timeout 5s");
    assert!(t.elapsed() >= SLOW, "the backend really was slow: {:?}", t.elapsed());
    reload(&node, &config(&up("1s"), &[b.addr], ""), "config reloaded").await?;
    let t = Instant::now();
    let r = get(node.proxy, "/").await?;
    let took = t.elapsed();
    println!("RELOAD read_timeout: 5s -> 1s, then {} after {took:?}", r.status);
    assert_eq!(r.status.as_u16(), 504, "read_timeout 1s: a 3 s backend gives 504 ({:?})", r.body);
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(2000),
        "the 504 came after {took:?}, want ~1 s"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_health_check_path() -> R {
    // The backend fails `/health*` but answers 200 on any other path.
    let b = Backend::start("a").await?;
    b.set_health_status(503);
    let health = |path: &str| format!("[health]\ninterval = \"100ms\"\nrise = 1\nfall = 1\npath = \"{path}\"\n");
    let node = Node::builder("reload-health").config(config("", &[b.addr], &health("/health"))).start().await?;
    wait_until(Duration::from_secs(3), "the backend is down on /health checks", async || {
        node.backend_state(b.addr).await == "down"
    })
    .await?;
    assert_eq!(get(node.proxy, "/").await?.status.as_u16(), 503, "no usable backend while it is down");
    let checks = b.health_checks();
    reload(&node, &config("", &[b.addr], &health("/ok")), "config reloaded").await?;
    let t = Instant::now();
    wait_until(Duration::from_secs(3), "the backend is up on /ok checks", async || {
        node.backend_state(b.addr).await == "up"
    })
    .await?;
    println!("RELOAD health path: up {:?} after the reload", t.elapsed());
    assert_eq!(get(node.proxy, "/").await?.status.as_u16(), 200);
    // The old path is no longer checked (at most one check that was in flight at the reload).
    let settled = b.health_checks();
    wait_until(Duration::from_secs(2), "some /ok checks happened", async || b.requests() >= 3).await?;
    assert!(settled <= checks + 1, "/health checked {} times after the switch", settled - checks);
    assert_eq!(b.health_checks(), settled, "no /health checks after the switch to /ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_rate_limit() -> R {
    let b = Backend::start("a").await?;
    let node = Node::builder("reload-rate").config(config("", &[b.addr], "")).start().await?;
    let s = Load::new(node.proxy).concurrency(1).count(30).run().await;
    assert_eq!(s.ok, 30, "no limit yet: {s}");
    let limit = "[rate_limit]\nrate = \"2r/s\"\nburst = 0\nnodelay = true\n";
    reload(&node, &config("", &[b.addr], limit), "config reloaded").await?;
    let s = Load::new(node.proxy).concurrency(1).count(30).run().await;
    println!("RELOAD rate limit: {s}");
    assert!(s.ok <= 3, "2 r/s, burst 0: at most a couple of 30 back-to-back requests pass: {s}");
    assert_eq!(s.status(429) + s.ok, 30, "the rest are 429: {s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_the_access_log() -> R {
    let b = Backend::start("a").await?;
    let log = |f: &str| format!("[access_log]\npath = \"{{dir}}/{f}\"\n");
    let node = Node::builder("reload-log").config(config("", &[b.addr], &log("one.log"))).start().await?;
    let (one, two) = (node.dir().join("one.log"), node.dir().join("two.log"));
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert_eq!(get(node.proxy, "/before-reload").await?.status.as_u16(), 200);
    wait_until(Duration::from_secs(3), "the first request is in one.log", async || {
        read(&one).contains("GET /before-reload ")
    })
    .await?;
    reload(&node, &config("", &[b.addr], &log("two.log")), "config reloaded").await?;
    for i in 0..5 {
        assert_eq!(get(node.proxy, &format!("/after-reload-{i}")).await?.status.as_u16(), 200);
    }
    wait_until(Duration::from_secs(3), "the later requests are in two.log", async || {
        (0..5).all(|i| read(&two).contains(&format!("GET /after-reload-{i} ")))
    })
    .await?;
    let first = read(&one);
    assert!(!first.contains("/after-reload"), "one.log got lines after the switch:\n{first}");
    assert!(!read(&two).contains("/before-reload"), "two.log has only the new lines");
    Ok(())
}

/// A broken file (syntax error) sent while under load: the old config stays, no request fails,
/// and the node says why (file and line). A good file after it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_old_config_under_load() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    // A few ms per answer, so requests are in flight on the backends at each reload.
    for b in &bs {
        b.set_delay(Duration::from_millis(5));
    }
    let good = config("algorithm = \"round-robin\"", &addrs(&[&bs[0], &bs[1]]), "");
    let node = Node::builder("reload-broken").config(good.clone()).start().await?;
    let load = Load::new(node.proxy).concurrency(4).duration(Duration::from_secs(20)).spawn();
    wait_until(Duration::from_secs(5), "load is flowing", async || load.completed() >= 50).await?;
    // Line 3 is broken: an unterminated table header.
    let broken = format!("[upstream]\nalgorithm = \"ip-hash\"\n[[upstream.backend\naddr = \"{}\"\n", bs[2].addr);
    reload(&node, &broken, "reload failed").await?;
    let n = load.completed();
    wait_until(Duration::from_secs(5), "load keeps flowing after the failed reload", async || {
        load.completed() >= n + 300
    })
    .await?;
    let failed_line = node.log_plain().lines().rfind(|l| l.contains("reload failed")).unwrap_or_default().to_string();
    assert!(
        failed_line.contains("shoald.toml") && failed_line.contains("line 3"),
        "the log names the file and the line: {failed_line}"
    );
    let mut want = vec![bs[0].addr.to_string(), bs[1].addr.to_string()];
    want.sort();
    assert_eq!(node.backend_addrs().await?, want, "the old backends stay");
    let c0 = bs[2].requests();
    // A good file under the same load applies, also with no failed request.
    reload(&node, &config("algorithm = \"round-robin\"", &addrs(&[&bs[1], &bs[2]]), ""), "config reloaded").await?;
    wait_until(Duration::from_secs(5), "traffic reaches the backend the good file added", async || {
        bs[2].requests() >= c0 + 150
    })
    .await?;
    let s = load.stop().await;
    println!("RELOAD broken then good, under load: {s}; log: {failed_line}");
    assert_eq!(s.failed(), 0, "no failed request across both reloads: {s}");
    assert!(s.from("a") > 0 && s.from("b") > 0 && s.from("c") > 0, "{s}");
    Ok(())
}

/// `keepalive = 0` set by a reload turns keep-alive to the backends off at once, for backends
/// that stay (their idle queues were made under the old config): every request after it opens
/// a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_to_keepalive_zero_keeps_no_upstream_connection() -> R {
    let b = Backend::start("b").await?;
    let toml = |keepalive: usize| config(&format!("keepalive = {keepalive}"), &[b.addr], "[node]\nworkers = 1\n");
    let node = Node::builder("ka-zero").config(toml(4)).start().await?;
    answers(node.proxy, 5).await?;
    let kept = b.connections();
    assert_eq!(kept, 1, "5 sequential requests with keepalive = 4 share one backend connection");
    reload(&node, &toml(0), "config reloaded").await?;
    answers(node.proxy, 5).await?;
    // The kept connection may carry the first request after the reload; none is kept after it.
    let opened = b.connections() - kept;
    assert!(opened >= 4, "keepalive = 0: each request gets a new connection, {opened} opened for 5");
    Ok(())
}
