//! Data-plane tests: real `shoald` processes in front of in-process backends, each asserting
//! figures (exact shares, counts of failures, states in `/status`, exit codes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use shoal_tests::http::{RawResponse, get, get_with, raw_exchange, raw_exchange_from};
use shoal_tests::{Backend, Load, LoadSummary, Node, Signal, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

/// `n` sequential requests on one keep-alive connection.
async fn sample(proxy: SocketAddr, n: usize) -> LoadSummary {
    Load::new(proxy).concurrency(1).count(n).run().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_weights_give_exact_shares() -> R {
    let bs = Backend::start_many(&["a", "b"]).await?;
    let node =
        Node::builder("rr").algorithm("round-robin").backend_with(&bs[0], "weight=3").backend(&bs[1]).start().await?;
    let s = Load::new(node.proxy).concurrency(4).count(400).run().await;
    assert_eq!(s.ok, 400, "{s}");
    assert_eq!((s.from("a"), s.from("b")), (300, 100), "weights 3:1 over 400 requests: {s}");
    assert_eq!((bs[0].requests(), bs[1].requests()), (300, 100));
    let st = node.status_json().await?;
    assert_eq!(st["algorithm"], "round-robin");
    assert_eq!(st["connections"]["requests"], 400, "{st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_a_slow_backend() -> R {
    let bs = Backend::start_many(&["slow", "fast1", "fast2"]).await?;
    bs[0].set_delay(Duration::from_millis(200));
    let node =
        Node::builder("lc").algorithm("least-conn").backend(&bs[0]).backend(&bs[1]).backend(&bs[2]).start().await?;
    let s = Load::new(node.proxy).concurrency(8).duration(Duration::from_secs(2)).run().await;
    assert_eq!(s.failed(), 0, "{s}");
    assert!(s.ok >= 200, "too little traffic to judge: {s}");
    let slow = s.from("slow");
    eprintln!("least-conn with one 200 ms backend: {s}");
    // Round-robin would give it a third; least-conn keeps it near its own throughput
    // (a handful of requests at a time, 200 ms each).
    assert!(slow >= 1, "the slow backend is still usable: {s}");
    assert!(slow * 10 <= s.ok, "slow backend got {slow} of {} requests (> 10%): {s}", s.ok);
    assert!(s.from("fast1") > 5 * slow && s.from("fast2") > 5 * slow, "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_and_return() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let opts = "max_fails=1,fail_timeout=2s";
    let node = Node::builder("passive")
        .algorithm("round-robin")
        .backend_with(&bs[0], opts)
        .backend_with(&bs[1], opts)
        .backend_with(&bs[2], opts)
        .start()
        .await?;
    let s = Load::new(node.proxy).concurrency(3).count(30).run().await;
    assert_eq!((s.ok, s.from("a"), s.from("b"), s.from("c")), (30, 10, 10, 10), "{s}");

    bs[0].stop().await;
    let s = Load::new(node.proxy).concurrency(4).count(60).run().await;
    assert_eq!(s.failed(), 0, "requests keep succeeding with a backend stopped: {s}");
    assert_eq!(s.from("a"), 0, "{s}");
    let st = node.backend_status(bs[0].addr).await?;
    assert_eq!(st["state"], "down", "stopped backend is ejected: {st}");
    assert!(st["failures"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert_eq!(node.backend_state(bs[1].addr).await, "up");

    bs[0].restart().await?;
    let restarted = Instant::now();
    let before = bs[0].requests();
    let mut failed = 0;
    wait_until(Duration::from_secs(10), "the restarted backend gets traffic again", async || {
        let s = sample(node.proxy, 6).await;
        failed += s.failed();
        bs[0].requests() > before
    })
    .await?;
    assert_eq!(failed, 0, "no failures while the backend returns");
    assert_eq!(node.backend_state(bs[0].addr).await, "up");
    // Ejection lasts fail_timeout (2 s) from the last failure, which was before the restart.
    assert!(restarted.elapsed() < Duration::from_secs(5), "returned {:?} after restart", restarted.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_eject_and_return() -> R {
    let bs = Backend::start_many(&["a", "b"]).await?;
    let node = Node::builder("active")
        .config(
            r#"
[upstream]
algorithm = "round-robin"
[health]
interval = "100ms"
rise = 2
fall = 3
timeout = "500ms"
type = "http"
path = "/health"
expect = ["2xx"]
"#,
        )
        .backend(&bs[0])
        .backend(&bs[1])
        .start()
        .await?;
    wait_until(Duration::from_secs(5), "both backends are health-checked", async || {
        bs[0].health_checks() >= 2 && bs[1].health_checks() >= 2
    })
    .await?;
    assert_eq!(node.backend_state(bs[0].addr).await, "up");

    bs[0].set_health_status(500);
    let checks_at_switch = bs[0].health_checks();
    wait_until(Duration::from_secs(5), "a is down", async || node.backend_state(bs[0].addr).await == "down").await?;
    let bad_checks = bs[0].health_checks() - checks_at_switch;
    assert!(bad_checks >= 3, "down after {bad_checks} bad checks, fall is 3");
    let before = bs[0].requests();
    let s = Load::new(node.proxy).concurrency(2).count(40).run().await;
    assert_eq!((s.ok, s.from("b")), (40, 40), "all traffic to the healthy backend: {s}");
    assert_eq!(bs[0].requests(), before, "no request reached the unhealthy backend");
    assert_eq!(node.backend_status(bs[0].addr).await?["own_verdict"], "down");

    bs[0].set_health_status(200);
    let checks_at_switch = bs[0].health_checks();
    wait_until(Duration::from_secs(5), "a is up again", async || node.backend_state(bs[0].addr).await == "up").await?;
    let good_checks = bs[0].health_checks() - checks_at_switch;
    assert!(good_checks >= 2, "up after {good_checks} good checks, rise is 2");
    let s = Load::new(node.proxy).concurrency(2).count(40).run().await;
    assert_eq!((s.ok, s.from("a"), s.from("b")), (40, 20, 20), "back in the round-robin: {s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_only_when_all_primaries_are_down() -> R {
    let bs = Backend::start_many(&["p1", "p2", "backup"]).await?;
    let opts = "max_fails=1,fail_timeout=1s";
    let node = Node::builder("backup")
        .algorithm("round-robin")
        .backend_with(&bs[0], opts)
        .backend_with(&bs[1], opts)
        .backend_with(&bs[2], &format!("{opts},backup"))
        .start()
        .await?;
    let s = Load::new(node.proxy).concurrency(2).count(40).run().await;
    assert_eq!((s.ok, s.from("p1") + s.from("p2"), s.from("backup")), (40, 40, 0), "{s}");
    assert!(s.from("p1") > 0 && s.from("p2") > 0, "{s}");

    bs[0].stop().await;
    let s = Load::new(node.proxy).concurrency(2).count(20).run().await;
    assert_eq!((s.ok, s.from("p2"), s.from("backup")), (20, 20, 0), "one primary left: no backup yet: {s}");

    bs[1].stop().await;
    let s = Load::new(node.proxy).concurrency(2).count(40).run().await;
    assert_eq!((s.ok, s.from("backup")), (40, 40), "all primaries down: the backup serves: {s}");
    let st = node.status_json().await?;
    assert_eq!(st["backends"][2]["backup"], true, "{st}");

    bs[0].restart().await?;
    bs[1].restart().await?;
    wait_until(Duration::from_secs(6), "both primaries are up", async || {
        node.backend_state(bs[0].addr).await == "up" && node.backend_state(bs[1].addr).await == "up"
    })
    .await?;
    let backup_before = bs[2].requests();
    let s = Load::new(node.proxy).concurrency(2).count(40).run().await;
    assert_eq!((s.ok, s.from("backup")), (40, 0), "primaries back: backup idle again: {s}");
    assert_eq!(bs[2].requests(), backup_before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_backup_does_not_skew_primaries() -> R {
    let bs = Backend::start_many(&["p1", "p2", "backup"]).await?;
    let node = Node::builder("rrbackup")
        .algorithm("round-robin")
        .backend(&bs[0])
        .backend(&bs[1])
        .backend_with(&bs[2], "backup")
        .start()
        .await?;
    let s = Load::new(node.proxy).concurrency(1).count(60).run().await;
    assert_eq!((s.ok, s.from("backup")), (60, 0), "{s}");
    assert!(s.from("p1").abs_diff(s.from("p2")) <= 6, "primaries of equal weight, with a backup configured: {s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_down_backend_does_not_skew_the_rest() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let node = Node::builder("rrdown")
        .config("[health]\ninterval = \"100ms\"\nrise = 1\nfall = 1\npath = \"/health\"\n")
        .algorithm("round-robin")
        .backend(&bs[0])
        .backend(&bs[1])
        .backend(&bs[2])
        .start()
        .await?;
    bs[1].set_health_status(500);
    wait_until(Duration::from_secs(5), "b is down", async || node.backend_state(bs[1].addr).await == "down").await?;
    let s = Load::new(node.proxy).concurrency(1).count(60).run().await;
    assert_eq!((s.ok, s.from("b")), (60, 0), "{s}");
    assert!(s.from("a").abs_diff(s.from("c")) <= 6, "a and c of equal weight while b is down: {s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_answers_503_with_node_header() -> R {
    let b = Backend::start("only").await?;
    let node = Node::builder("maxconns").backend_with(&b, "max_conns=2").start().await?;

    // Two slow requests take both slots.
    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(get(node.proxy, "/?delay=1500"))).collect();
    wait_until(Duration::from_secs(5), "two requests in flight at the backend", async || b.in_flight() == 2).await?;
    for _ in 0..3 {
        let r = get(node.proxy, "/").await?;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header("x-shoal-node"), "maxconns", "{r:?}");
        assert!(r.body.contains("max_conns"), "{r:?}");
    }
    for t in slow {
        let r = t.await??;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "only"));
    }
    let st = node.status_json().await?;
    assert_eq!(st["errors"]["no_backend"], 3, "{st}");
    assert_eq!(b.requests(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_holds_under_a_simultaneous_burst() -> R {
    let b = Backend::start("only").await?;
    let node = Node::builder("maxburst").backend_with(&b, "max_conns=2").start().await?;
    get(node.proxy, "/").await?; // warm
    b.reset_max_in_flight();
    let s = Load::new(node.proxy).concurrency(12).count(12).path("/?delay=2000").run().await;
    assert_eq!(s.errors, 0, "{s}");
    assert!(b.max_in_flight() <= 2, "backend saw {} concurrent requests with max_conns=2: {s}", b.max_in_flight());
    assert_eq!((s.status(200), s.status(503)), (2, 10), "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_backend_stopped_under_load() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let node = Node::builder("retry").backend(&bs[0]).backend(&bs[1]).backend(&bs[2]).start().await?;
    let load = Load::new(node.proxy).concurrency(8).duration(Duration::from_secs(3)).spawn();
    wait_until(Duration::from_secs(5), "load is flowing", async || load.completed() >= 200).await?;
    bs[1].stop().await;
    let at_stop = load.completed();
    let s = load.finish().await;
    eprintln!("backend b stopped after {at_stop} requests: {s}");
    assert_eq!(s.failed(), 0, "no GET fails while one of 3 backends is stopped: {s}");
    assert!(s.sent >= at_stop + 200, "load went on after the stop: {s}");
    assert!(s.from("a") > 0 && s.from("c") > 0, "{s}");
    let st = node.status_json().await?;
    assert_eq!(st["errors"]["bad_gateway"], 0, "{st}");
    assert!(st["retries"].as_u64().unwrap_or(0) >= 1, "the stopped backend was retried around: {st}");
    assert_eq!(node.backend_state(bs[1].addr).await, "down");
    Ok(())
}

/// With passive ejection off (`max_fails=0`) a refusing backend keeps 0 in flight, so
/// least-conn tries it first on every request; the retry after a refused connect sent nothing
/// and spends no retry budget, so no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_without_ejection_fails_no_request() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    bs[1].stop().await;
    let node = Node::builder("noeject")
        .backend_with(&bs[0], "max_fails=0")
        .backend_with(&bs[1], "max_fails=0")
        .backend_with(&bs[2], "max_fails=0")
        .start()
        .await?;
    let s = Load::new(node.proxy).concurrency(4).count(600).spawn().finish().await;
    assert_eq!(s.failed(), 0, "{s}");
    assert_eq!(s.from("a") + s.from("c"), s.sent, "{s}");
    let st = node.status_json().await?;
    assert_eq!(st["errors"]["bad_gateway"], 0, "{st}");
    assert_eq!(node.backend_state(bs[1].addr).await, "up", "max_fails=0 never ejects");
    Ok(())
}

/// The `shoal_backend=<value>` pair of a response's Set-Cookie, if any.
fn sticky_cookie(set_cookie: &str) -> Option<String> {
    set_cookie.split(';').next().filter(|kv| kv.starts_with("shoal_backend=")).map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_is_stable_and_shared_by_nodes_with_the_same_secret() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let secret = "0123456789abcdef-test-cluster-secret\n";
    let config = "[cluster]\nsecret_file = \"{dir}/secret\"\n";
    let build = |id: &str, secret: &str| {
        Node::builder(id)
            .config(config)
            .file("secret", secret)
            .algorithm("cookie")
            .backend(&bs[0])
            .backend(&bs[1])
            .backend(&bs[2])
    };
    let n1 = build("sticky1", secret).start().await?;
    let n2 = build("sticky2", secret).start().await?;
    let other = build("sticky3", "another-secret-of-enough-length").start().await?;

    // Cookies for every backend, as n1 hands them out.
    let mut cookies: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..60 {
        let r = get(n1.proxy, "/").await?;
        assert_eq!(r.status, 200);
        let c = sticky_cookie(r.header("set-cookie")).unwrap_or_else(|| panic!("no sticky Set-Cookie: {r:?}"));
        assert!(r.header("set-cookie").contains("Path=/"), "{r:?}");
        if let Some(prev) = cookies.insert(r.body.clone(), c.clone()) {
            assert_eq!(prev, c, "one backend, one cookie value");
        }
        if cookies.len() == 3 {
            break;
        }
    }
    assert_eq!(cookies.len(), 3, "cookies seen: {cookies:?}");

    for (backend, cookie) in &cookies {
        for node in [&n1, &n2] {
            for _ in 0..20 {
                let r = get_with(node.proxy, "/", &[("cookie", &format!("theme=dark; {cookie}"))]).await?;
                assert_eq!((r.status.as_u16(), r.body.as_str()), (200, backend.as_str()), "{} with {cookie}", node.id);
                assert_eq!(r.header("set-cookie"), "", "a valid cookie is not set again ({})", node.id);
            }
        }
        // A node with another secret does not know the value: it picks anew and sets a cookie.
        let r = get_with(other.proxy, "/", &[("cookie", cookie)]).await?;
        let fresh = sticky_cookie(r.header("set-cookie")).unwrap_or_default();
        assert!(!fresh.is_empty() && &fresh != cookie, "other secret gave {r:?}");
    }
    Ok(())
}

/// The body of one `GET /` sent from `from`.
async fn get_from(from: IpAddr, proxy: SocketAddr, path: &str) -> anyhow::Result<RawResponse> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n");
    RawResponse::parse(&raw_exchange_from(from, proxy, req.as_bytes(), Duration::from_secs(5)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_is_stable_per_client_and_across_nodes() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let build = |id: &str| Node::builder(id).algorithm("ip-hash").backend(&bs[0]).backend(&bs[1]).backend(&bs[2]);
    let n1 = build("iphash1").start().await?;
    let n2 = build("iphash2").start().await?;

    let mut mapping: BTreeMap<IpAddr, String> = BTreeMap::new();
    for k in 2..=25u8 {
        let ip = IpAddr::from([127, 0, 0, k]);
        let mut seen = BTreeSet::new();
        for node in [&n1, &n2] {
            for _ in 0..5 {
                let r = get_from(ip, node.proxy, "/").await?;
                assert_eq!(r.status, 200, "{r:?}");
                seen.insert(r.body_text());
            }
        }
        assert_eq!(seen.len(), 1, "client {ip} went to {seen:?}");
        mapping.insert(ip, seen.into_iter().next().unwrap_or_default());
    }
    let used: BTreeSet<&String> = mapping.values().collect();
    assert!(used.len() >= 2, "24 client IPs all hashed to one backend: {mapping:?}");

    // One client, keep-alive, concurrent: always one backend.
    let s = Load::new(n1.proxy).concurrency(4).count(50).run().await;
    assert_eq!((s.ok, s.per_backend.len()), (50, 1), "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_nodelay_answers_429_over_the_burst() -> R {
    let b = Backend::start("a").await?;
    let node = Node::builder("ratelimit")
        .config("[rate_limit]\nrate = \"5r/s\"\nburst = 5\nnodelay = true\n")
        .backend(&b)
        .start()
        .await?;
    let burst_start = Instant::now();
    let burst: Vec<_> = (0..30).map(|_| tokio::spawn(get(node.proxy, "/"))).collect();
    let mut ok = 0;
    let mut limited = Vec::new();
    for t in burst {
        let r = t.await??;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => limited.push(r),
            s => panic!("unexpected status {s}: {r:?}"),
        }
    }
    // burst 5 plus the one on time; a burst that takes long earns 5 more per second.
    let earned = (burst_start.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(ok >= 6 && ok <= 6 + earned, "{ok} of 30 passed with rate 5r/s burst 5 in {:?}", burst_start.elapsed());
    assert_eq!(ok + limited.len(), 30);
    for r in &limited {
        assert_eq!(r.header("x-shoal-node"), "ratelimit", "{r:?}");
        assert_eq!(r.header("retry-after"), "1", "{r:?}");
    }
    assert_eq!(b.requests(), ok as u64, "429s never reach the backend");
    // Other clients have their own budget.
    let r = get_from(IpAddr::from([127, 0, 0, 9]), node.proxy, "/").await?;
    assert_eq!(r.status, 200, "{r:?}");
    // And the limited one recovers once the rate allows.
    wait_until(Duration::from_secs(3), "the limited client passes again", async || {
        get(node.proxy, "/").await.is_ok_and(|r| r.status == 200)
    })
    .await?;
    let st = node.status_json().await?;
    assert!(st["errors"]["rate_limited"].as_u64().unwrap_or(0) >= limited.len() as u64, "{st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled_both_ways() -> R {
    let b = Backend::start("ws").await?;
    let node = Node::builder("upgrade").backend(&b).start().await?;
    let mut s = TcpStream::connect(node.proxy).await?;
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await??;
        assert!(n == 1, "connection closed during the handshake: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let resp = RawResponse::parse(&head)?;
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("upgrade"), Some("websocket"), "{resp:?}");
    assert!(resp.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")), "{resp:?}");
    for i in 0..20 {
        let msg = format!("message {i} through the tunnel");
        s.write_all(msg.as_bytes()).await?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
        assert_eq!(buf, msg.as_bytes());
    }
    let big = vec![b'x'; 256 * 1024];
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move { wr.write_all(&big).await.map(|_| wr) });
    let mut back = vec![0u8; 256 * 1024];
    tokio::time::timeout(Duration::from_secs(10), rd.read_exact(&mut back)).await??;
    assert!(back.iter().all(|&c| c == b'x'));
    let _wr = writer.await??;
    assert_eq!(b.upgrades(), 1);
    let st = node.backend_status(b.addr).await?;
    assert_eq!(st["in_flight"], 1, "an open tunnel counts as in flight: {st}");
    Ok(())
}

fn backends_toml(algorithm: &str, addrs: &[SocketAddr]) -> String {
    let mut t = format!("[node]\nleave_grace = \"200ms\"\n[upstream]\nalgorithm = \"{algorithm}\"\n");
    for a in addrs {
        t.push_str(&format!("[[upstream.backend]]\naddr = \"{a}\"\n"));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_switches_backends_without_failures() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let node = Node::builder("reload").config(backends_toml("round-robin", &[bs[0].addr, bs[1].addr])).start().await?;
    let load = Load::new(node.proxy).concurrency(6).until_stopped().spawn();
    wait_until(Duration::from_secs(5), "load is flowing", async || load.completed() >= 100).await?;

    node.write_config(&backends_toml("round-robin", &[bs[1].addr, bs[2].addr]))?;
    node.signal(Signal::Hup)?;
    let mut want = vec![bs[1].addr.to_string(), bs[2].addr.to_string()];
    want.sort();
    wait_until(Duration::from_secs(5), "the new backend set is in /status", async || {
        node.backend_addrs().await.is_ok_and(|v| v == want)
    })
    .await?;
    let at_reload = load.completed();
    wait_until(Duration::from_secs(5), "load goes on after the reload", async || load.completed() >= at_reload + 200)
        .await?;
    let s = load.stop().await;
    assert_eq!(s.failed(), 0, "no request fails across a reload: {s}");
    assert!(s.from("c") > 0, "{s}");

    let a_before = bs[0].requests();
    let s = Load::new(node.proxy).concurrency(2).count(60).run().await;
    assert_eq!((s.ok, s.from("a"), s.from("b"), s.from("c")), (60, 0, 30, 30), "new set only: {s}");
    assert_eq!(bs[0].requests(), a_before);

    // A bad file is refused and the running config stays.
    node.write_config("[upstream]\nalgorithm = \"fastest\"\n")?;
    node.signal(Signal::Hup)?;
    wait_until(Duration::from_secs(5), "the failed reload is logged", async || node.log().contains("reload failed"))
        .await?;
    let s = Load::new(node.proxy).concurrency(2).count(20).run().await;
    assert_eq!((s.ok, s.from("b"), s.from("c")), (20, 10, 10), "old config kept: {s}");
    assert_eq!(node.backend_addrs().await?, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_failures_and_exits_zero() -> R {
    let b = Backend::start("a").await?;
    let mut node = Node::builder("drain")
        .config("[node]\nleave_grace = \"2s\"\ndrain_timeout = \"10s\"\n")
        .backend(&b)
        .start()
        .await?;
    assert_eq!(node.ready_status().await, 200);
    let proxy = node.proxy;
    let slow: Vec<_> = (0..4).map(|_| tokio::spawn(get(proxy, "/?delay=4000"))).collect();
    let load = Load::new(proxy).concurrency(4).until_stopped().spawn();
    wait_until(Duration::from_secs(5), "slow requests are in flight", async || b.in_flight() >= 4).await?;

    node.signal(Signal::Term)?;
    let term = Instant::now();
    wait_until(Duration::from_secs(2), "/ready fails", async || node.ready_status().await == 503).await?;
    // Still accepting during leave_grace: new connections are served.
    for _ in 0..5 {
        let r = get(proxy, "/").await?;
        assert_eq!(r.status, 200, "during leave_grace: {r:?}");
    }
    assert!(term.elapsed() < Duration::from_millis(1800), "grace checks took {:?}", term.elapsed());
    let s = load.stop().await;
    assert_eq!(s.failed(), 0, "{s}");

    // After the grace period the listener closes while the slow requests are still running.
    wait_until(Duration::from_secs(4), "the proxy stops accepting", async || TcpStream::connect(proxy).await.is_err())
        .await?;
    assert!(node.exited().is_none(), "still draining in-flight requests");
    assert!(b.in_flight() >= 4, "slow requests are still in flight");

    let status = node.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status}; log:\n{}", node.log());
    for t in slow {
        let r = t.await??;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"), "in-flight request finished");
    }
    assert!(term.elapsed() >= Duration::from_millis(2000), "exited before in-flight requests ended");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_hop_by_hop() -> R {
    let b = Backend::start("echo").await?;
    let node = Node::builder("headers").backend(&b).start().await?;
    let req = "GET /echo?hop=1 HTTP/1.1\r\n\
               Host: app.example:8443\r\n\
               X-Forwarded-For: 203.0.113.7\r\n\
               Connection: close, X-Secret-Hop\r\n\
               X-Secret-Hop: 1\r\n\
               Keep-Alive: timeout=5\r\n\
               TE: trailers\r\n\
               Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
               Proxy-Connection: keep-alive\r\n\
               X-Custom: kept\r\n\r\n";
    let r = RawResponse::parse(&raw_exchange(node.proxy, req.as_bytes(), Duration::from_secs(5)).await?)?;
    assert_eq!(r.status, 200, "{r:?}");
    let echo: serde_json::Value = serde_json::from_slice(&r.body)?;
    let h = &echo["headers"];
    let one = |name: &str| h[name].as_array().map(|v| v.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>());
    assert_eq!(one("host"), Some(vec!["app.example:8443"]), "Host preserved: {echo}");
    assert_eq!(one("x-forwarded-for"), Some(vec!["203.0.113.7, 127.0.0.1"]), "XFF appended: {echo}");
    assert_eq!(one("x-real-ip"), Some(vec!["127.0.0.1"]), "{echo}");
    assert_eq!(one("x-forwarded-proto"), Some(vec!["http"]), "{echo}");
    assert_eq!(one("x-custom"), Some(vec!["kept"]), "{echo}");
    for gone in ["x-secret-hop", "keep-alive", "te", "proxy-authorization", "proxy-connection", "upgrade"] {
        assert!(h.get(gone).is_none(), "hop-by-hop {gone} reached the backend: {echo}");
    }
    if let Some(conn) = one("connection") {
        assert!(conn.iter().all(|c| !c.to_ascii_lowercase().contains("secret")), "{echo}");
    }
    assert_eq!(echo["uri"], "/echo?hop=1");
    // Response side: the backend's hop-by-hop headers are removed too.
    assert_eq!(r.header("x-backend-kept"), Some("1"), "{r:?}");
    for gone in ["x-backend-hop", "keep-alive", "proxy-authenticate"] {
        assert!(r.header(gone).is_none(), "hop-by-hop {gone} reached the client: {r:?}");
    }
    assert!(!r.headers_named("connection").iter().any(|c| c.contains("x-backend-hop")), "{r:?}");

    // The same client with its own X-Real-IP cannot spoof it.
    let r = get_with(node.proxy, "/echo", &[("x-real-ip", "6.6.6.6")]).await?;
    let echo = r.json()?;
    assert_eq!(echo["headers"]["x-real-ip"], serde_json::json!(["127.0.0.1"]), "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-for"], serde_json::json!(["127.0.0.1"]), "{echo}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_errors_have_status_and_node_header() -> R {
    let b = Backend::start("a").await?;
    let node = Node::builder("errors")
        .config("[upstream]\nread_timeout = \"300ms\"\nconnect_timeout = \"1s\"\n")
        .backend_with(&b, "max_fails=0")
        .start()
        .await?;
    let r = get(node.proxy, "/?delay=1500").await?;
    assert_eq!((r.status.as_u16(), r.header("x-shoal-node")), (504, "errors"), "slow backend: {r:?}");
    b.stop().await;
    let r = get(node.proxy, "/").await?;
    assert_eq!((r.status.as_u16(), r.header("x-shoal-node")), (502, "errors"), "backend gone: {r:?}");
    let st = node.status_json().await?;
    assert_eq!((st["errors"]["timeout"].as_u64(), st["errors"]["bad_gateway"].as_u64()), (Some(1), Some(1)), "{st}");

    let empty = Node::builder("nobackends").start().await?;
    let r = get(empty.proxy, "/").await?;
    assert_eq!((r.status.as_u16(), r.header("x-shoal-node")), (503, "nobackends"), "no backends: {r:?}");
    assert!(r.body.contains("no usable backend"), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_down_open_still_tries_ejected_backends() -> R {
    let b = Backend::start("a").await?;
    let opts = "max_fails=1,fail_timeout=30s";
    let strict = Node::builder("alldown503").backend_with(&b, opts).start().await?;
    let open = Node::builder("alldownopen")
        .config("[upstream]\nwhen_all_down = \"open\"\n")
        .backend_with(&b, opts)
        .start()
        .await?;
    // One garbage answer ejects the only backend on both nodes for 30 s.
    b.set_garbage(true);
    for node in [&strict, &open] {
        assert_eq!(get(node.proxy, "/").await?.status, 502);
        assert_eq!(node.backend_state(b.addr).await, "down");
    }
    b.set_garbage(false);
    let r = get(strict.proxy, "/").await?;
    assert_eq!(
        (r.status.as_u16(), r.header("x-shoal-node")),
        (503, "alldown503"),
        "default: 503 when all are down: {r:?}"
    );
    let r = get(open.proxy, "/").await?;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"), "when_all_down = open: tried anyway: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_status_replays_only_idempotent_requests() -> R {
    let bs = Backend::start_many(&["a", "b"]).await?;
    bs[0].set_status(503);
    let node = Node::builder("retryon")
        .config("[upstream]\nretry_on = [\"503\"]\nretries = 1\nretry_budget = 1.0\n")
        .algorithm("round-robin")
        .backend_with(&bs[0], "max_fails=0")
        .backend_with(&bs[1], "max_fails=0")
        .start()
        .await?;
    let s = Load::new(node.proxy).concurrency(1).count(20).run().await;
    assert_eq!((s.ok, s.from("b")), (20, 20), "GETs answered 503 by a are retried on b: {s}");
    assert!(bs[0].requests() >= 1, "a was tried");

    let before = bs[0].requests() + bs[1].requests();
    let mut statuses = BTreeMap::new();
    for _ in 0..6 {
        let req = http::Request::post(format!("http://{}/", node.proxy))
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        let r = shoal_tests::http::request(req).await?;
        *statuses.entry((r.status.as_u16(), r.body.clone())).or_insert(0) += 1;
    }
    assert_eq!(bs[0].requests() + bs[1].requests() - before, 6, "POSTs are never replayed: {statuses:?}");
    assert!(
        statuses.keys().all(|(st, body)| (*st, body.as_str()) == (503, "a") || (*st, body.as_str()) == (200, "b")),
        "{statuses:?}"
    );
    assert!(statuses.contains_key(&(503, "a".to_string())), "a's 503 to a POST reaches the client: {statuses:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_proxied_to_http1_backends() -> R {
    let b = Backend::start("h1").await?;
    let node = Node::builder("h2c").backend(&b).start().await?;
    let client: shoal_tests::http::Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    for i in 0..10 {
        let req = http::Request::get(format!("http://{}/echo?i={i}", node.proxy))
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        let r = shoal_tests::http::send(&client, req, Duration::from_secs(10)).await?;
        assert_eq!(r.status, 200, "{r:?}");
        let echo = r.json()?;
        assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
        assert_eq!(
            echo["headers"]["host"],
            serde_json::json!([node.proxy.to_string()]),
            "Host from :authority: {echo}"
        );
        assert_eq!(echo["uri"], format!("/echo?i={i}"), "{echo}");
    }
    let st = node.status_json().await?;
    assert_eq!(st["connections"]["accepts"], 1, "one h2 connection carried every request: {st}");
    Ok(())
}

/// The value of the first `/metrics` sample whose line starts with a name containing `name`.
async fn metric(node: &Node, name: &str) -> anyhow::Result<f64> {
    let m = node.admin_get("/metrics").await?.body_text();
    m.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next().is_some_and(|n| n.contains(name)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no metric {name} in /metrics:\n{m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_exhausted_passes_the_backend_answer_through() -> R {
    let bs = Backend::start_many(&["a", "b"]).await?;
    bs[0].set_status(503);
    let node = Node::builder("budget")
        .config("[upstream]\nretry_on = [\"503\"]\nretries = 1\nretry_budget = 0.0\n")
        .algorithm("round-robin")
        .backend_with(&bs[0], "max_fails=0")
        .backend_with(&bs[1], "max_fails=0")
        .start()
        .await?;
    let s = Load::new(node.proxy).concurrency(1).count(40).run().await;
    let refused = metric(&node, "retries_refused").await?;
    assert!(refused >= 1.0, "the budget (floor of 10 retries) ran out: {s}");
    // A refused retry is no reason to hide what the backend said: its 503, not a 502.
    assert_eq!(s.status(502), 0, "{refused} refused retries: {s}");
    assert_eq!(s.ok + s.status(503), 40, "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_keeps_every_client_supplied_hop() -> R {
    let b = Backend::start("echo").await?;
    let node = Node::builder("xff").backend(&b).start().await?;
    let req = "GET /echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 198.51.100.2\r\nConnection: close\r\n\r\n";
    let r = RawResponse::parse(&raw_exchange(node.proxy, req.as_bytes(), Duration::from_secs(5)).await?)?;
    let echo: serde_json::Value = serde_json::from_slice(&r.body)?;
    let xff: Vec<String> = echo["headers"]["x-forwarded-for"]
        .as_array()
        .map(|v| v.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    assert_eq!(xff.join(", "), "192.0.2.1, 198.51.100.2, 127.0.0.1", "{echo}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_through_both_framings() -> R {
    let b = Backend::start("echo").await?;
    let node = Node::builder("bodies").backend(&b).start().await?;
    // Content-Length, 1 MiB.
    let body = vec![b'z'; 1 << 20];
    let req = http::Request::post(format!("http://{}/echo", node.proxy))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let r = shoal_tests::http::request(req).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()?["body_len"], 1 << 20);
    // Chunked, three chunks.
    let raw = b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                5\r\nhello\r\n6\r\n shoal\r\n1\r\n!\r\n0\r\n\r\n";
    let r = RawResponse::parse(&raw_exchange(node.proxy, raw, Duration::from_secs(5)).await?)?;
    assert_eq!(r.status, 200, "{r:?}");
    let echo: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!((echo["method"].as_str(), echo["body_len"].as_u64()), (Some("PUT"), Some(12)), "{echo}");
    Ok(())
}

/// A backend that writes the head and the body separately with Nagle on (as Python's
/// http.server does): the body waits for the ACK of the head, which a socket that has just
/// sent a request delays by up to 40 ms. Shoal acknowledges a head that came alone at once, so
/// 20 requests one after the other take a few milliseconds each, not 40.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_writing_head_and_body_apart_is_not_delayed_by_acks() -> R {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Nagle stays on (tokio's default): the second write waits for the first's ACK.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n";
                    if s.write_all(head).await.is_err() || s.write_all(b"two-write").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let node = Node::builder("acks").backend_spec(&addr.to_string()).start().await?;
    sample(node.proxy, 3).await; // a warm upstream connection
    let s = sample(node.proxy, 20).await;
    server.abort();
    assert_eq!(s.ok, 20, "{s}");
    // With delayed ACKs each request takes ~40 ms (p50 >= 38 ms); prompt ones take ~1 ms.
    let p50 = s.percentile(50.0);
    assert!(p50 < Duration::from_millis(15), "p50 {p50:?} through Shoal: the body waited for a delayed ACK ({s})");
    Ok(())
}

/// `n` requests at once, each on a client connection of its own; every answer must be 200.
async fn burst(proxy: SocketAddr, n: usize) -> R {
    let s = Load::new(proxy).concurrency(n).count(n).run().await;
    anyhow::ensure!(s.status(200) == n, "{s}");
    Ok(())
}

/// docs/OPERATIONS.md: a burst's extra upstream connections are kept while requests use them
/// and closed once they went unused for a second or two; `keepalive` of them stay. Witness: a
/// raw backend that records each connection and when the proxy closed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursts_extra_upstream_connections_are_reused_then_closed_when_unused() -> R {
    use shoal_tests::raw::{RawConn, RawServer, default_answer};
    // 600 ms per answer: 8 requests at once need 8 connections.
    let server = RawServer::start(|mut c: RawConn| async move {
        while let Some(req) = c.read_request(Duration::from_secs(30)).await? {
            tokio::time::sleep(Duration::from_millis(600)).await;
            c.write(&default_answer(&req)).await?;
        }
        Ok(())
    })
    .await?;
    // One worker: idle connections are per worker, and the bursts must meet the same ones.
    let node = Node::builder("burst-pool")
        .config("[node]\nworkers = 1\n[upstream]\nkeepalive = 2\n")
        .backend_spec(&format!("{},max_fails=0", server.addr))
        .start()
        .await?;
    let closed = || server.conns().iter().filter(|c| c.closed_at().is_some()).count();
    for _ in 0..3 {
        burst(node.proxy, 8).await?;
    }
    assert_eq!(
        (server.connections(), closed()),
        (8, 0),
        "three bursts of 8, one after another, carried by the first burst's 8 connections"
    );
    // Unused from now on: the 6 over `keepalive` close within two trims (1 s each).
    let quiet = Instant::now();
    wait_until(Duration::from_secs(8), "the 6 connections over keepalive = 2 close", async || closed() >= 6).await?;
    eprintln!("the surplus closed {:?} after the last burst", quiet.elapsed());
    assert!(quiet.elapsed() >= Duration::from_millis(900), "closed before a whole trim period: {:?}", quiet.elapsed());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!((server.connections(), closed()), (8, 6), "keepalive = 2 idle connections stay");
    // The two kept carry the next requests.
    burst(node.proxy, 2).await?;
    assert_eq!((server.connections(), closed()), (8, 6), "the kept connections were reused");
    Ok(())
}
