//! Retries and picks, held to README ("Retries go to the next backend on connect errors and
//! timeouts"), OPERATIONS.md ("a POST is never replayed") and ARCHITECTURE.md step 6, and the
//! `random-two` row of README's algorithm table ("power of two choices over the cluster-wide
//! load").
//!
//! The connect-timeout test needs an address that drops SYNs: a node namespace of a
//! [`NetLab`] with nothing in it, behind a `blackhole` rule at the lab's switch (root and
//! iproute2, like the chaos suite; it fails, never skips, without them).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use shoal_tests::http::{get, request};
use shoal_tests::{Backend, Load, NetLab, Node};

type R = anyhow::Result<()>;

/// `read_timeout` of these tests.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stalled backend holds a request (well past `READ_TIMEOUT`).
const STALL: Duration = Duration::from_secs(4);
/// Slack on top of a timeout for the retry on the next backend and a busy machine.
const HEADROOM: Duration = Duration::from_millis(1000);

/// A node over `backends` (given `max_fails=0`, so a failing one stays in rotation and
/// round-robin keeps alternating) with this `[upstream]` config.
async fn node(id: &str, upstream: &str, backends: &[SocketAddr]) -> anyhow::Result<Node> {
    let mut b = Node::builder(id).config(format!("[upstream]\n{upstream}\n"));
    for a in backends {
        b = b.backend_spec(&format!("{a},max_fails=0"));
    }
    b.start().await
}

/// Four GETs, each answered by the backend `fine` within `timeout` + headroom; the times of
/// those that waited out `timeout` first (they met the failing backend and were retried).
async fn gets_answered_by_fine(node: &Node, timeout: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut slow = Vec::new();
    for i in 0..4 {
        let t = Instant::now();
        let r = get(node.proxy, "/").await?;
        let took = t.elapsed();
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "fine"), "GET #{i} after {took:?}");
        assert!(took < timeout + HEADROOM, "GET #{i} took {took:?} (timeout {timeout:?})");
        if took >= timeout {
            slow.push(took);
        }
    }
    Ok(slow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_get_is_retried_on_the_next_backend() -> R {
    let (stalls, fine) = (Backend::start("stalls").await?, Backend::start("fine").await?);
    stalls.set_delay(STALL);
    let node =
        node("retry-get", "algorithm = \"round-robin\"\nread_timeout = \"1s\"\nretries = 1", &[stalls.addr, fine.addr])
            .await?;
    let slow = gets_answered_by_fine(&node, READ_TIMEOUT).await?;
    let retries = node.metric("shoal_retries", &[]).await.unwrap_or(-1.0);
    println!("RETRY get: stalled backend saw {}, retried answers took {slow:?}, retries {retries}", stalls.requests());
    // (The retry takes the next round-robin turn, so the next GET meets the stall again.)
    let met = stalls.requests() as usize;
    assert!(met >= 2, "round-robin sent GETs to the stalled backend first: {met}");
    assert_eq!(slow.len(), met, "each GET that met the stall waited one read_timeout, then the next backend answered");
    assert_eq!(retries, met as f64, "shoal_retries counts each of them");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_post_is_not_replayed() -> R {
    let (stalls, fine) = (Backend::start("stalls").await?, Backend::start("fine").await?);
    stalls.set_delay(STALL);
    let node = node(
        "retry-post",
        "algorithm = \"round-robin\"\nread_timeout = \"1s\"\nretries = 2\nretry_on = [\"502\", \"503\", \"504\"]",
        &[stalls.addr, fine.addr],
    )
    .await?;
    // With a body and without one: neither may reach a second backend once sent.
    // Round-robin alternates (no retry takes a turn), so with this order one POST with a body
    // and one without meet the stalled backend, whichever backend goes first.
    let mut timed_out = Vec::new();
    for (i, body) in ["a=1&b=2", "a=3", "", ""].iter().enumerate() {
        let (s0, f0) = (stalls.requests(), fine.requests());
        let req = Request::post(format!("http://{}/echo", node.proxy))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let t = Instant::now();
        let r = request(req).await?;
        let took = t.elapsed();
        let (ds, df) = (stalls.requests() - s0, fine.requests() - f0);
        if ds == 1 {
            timed_out.push(*body);
            assert_eq!(r.status.as_u16(), 504, "POST #{i} ({body:?}) to the stalled backend: {:?}", r.body);
            assert_eq!(df, 0, "POST #{i} ({body:?}) was replayed on the next backend after a timeout");
            assert!(
                took >= READ_TIMEOUT && took < READ_TIMEOUT + HEADROOM,
                "POST #{i}: 504 after {took:?}, want ~{READ_TIMEOUT:?}"
            );
        } else {
            assert_eq!((ds, df, r.status.as_u16()), (0, 1, 200), "POST #{i} went to the fine backend: {:?}", r.body);
        }
    }
    println!("RETRY post: POSTs {timed_out:?} met the stalled backend, each 504, none replayed");
    assert_eq!(timed_out.len(), 2, "round-robin sent two of the four POSTs to the stalled backend");
    assert!(
        timed_out.iter().any(|b| b.is_empty()) && timed_out.iter().any(|b| !b.is_empty()),
        "one with a body and one without met the stall: {timed_out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_moves_the_pick_to_the_next_backend() -> R {
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    let mut lab = NetLab::new(1, 0)?;
    // Nothing listens in the namespace: without the rule a connect is refused at once.
    let silent = SocketAddr::new(lab.node_ip(1), 8080);
    lab.blackhole_to(silent.ip())?;
    let probe = tokio::time::timeout(Duration::from_millis(700), tokio::net::TcpStream::connect(silent)).await;
    assert!(
        probe.is_err(),
        "the blackholed address must swallow SYNs (a connect neither succeeds nor fails): {probe:?}"
    );
    let fine = Backend::start("fine").await?;
    let node = node(
        "retry-connect",
        "algorithm = \"round-robin\"\nconnect_timeout = \"500ms\"\nretries = 1",
        &[silent, fine.addr],
    )
    .await?;
    let slow = gets_answered_by_fine(&node, CONNECT_TIMEOUT).await?;
    println!("RETRY connect: answers that met the silent address took {slow:?}");
    // (The retry takes the next round-robin turn, so the next GET meets the silent one again.)
    assert!(slow.len() >= 2, "GETs met the silent address, waited connect_timeout, moved on: {slow:?}");
    let failures = node.metric("shoal_backend_failures", &[("backend", &silent.to_string())]).await;
    assert_eq!(failures, Some(slow.len() as f64), "each connect timeout counts as a failure of that backend");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_spreads_and_avoids_a_backend_with_many_in_flight() -> R {
    let bs = Backend::start_many(&["a", "b", "c"]).await?;
    let node = node("r2", "algorithm = \"random-two\"", &bs.iter().map(|b| b.addr).collect::<Vec<_>>()).await?;
    let even = Load::new(node.proxy).concurrency(4).count(600).run().await;
    assert_eq!(even.ok, 600, "{even}");
    for name in ["a", "b", "c"] {
        let n = even.from(name);
        assert!((120..=280).contains(&n), "equal backends, {name} got {n} of 600: {even}");
    }
    // c becomes slow, so requests pile up on it (many in flight): two random choices almost
    // never both land on c, and the other one always has fewer in flight.
    bs[2].set_delay(Duration::from_millis(300));
    let skew = Load::new(node.proxy).concurrency(8).duration(Duration::from_secs(3)).run().await;
    println!(
        "RANDOM-TWO even {:?}; with c slow {:?} (c peak in flight {})",
        even.per_backend,
        skew.per_backend,
        bs[2].max_in_flight()
    );
    assert_eq!(skew.failed(), 0, "{skew}");
    let c = skew.from("c");
    assert!(c * 20 <= skew.ok, "the loaded backend c got {c} of {} (want <= 5%): {skew}", skew.ok);
    assert!(skew.from("a") > 100 && skew.from("b") > 100, "the others share the rest: {skew}");
    Ok(())
}

/// README: random-two is "power of two choices over the cluster-wide load". Node 1 keeps
/// requests piled on a slow backend; node 2, with nothing in flight itself, sees them through
/// gossip and keeps its own requests off that backend. On local load only, node 2 would send
/// it about a third of them (it is in 2 of the 3 possible pairs and ties half the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_uses_the_cluster_wide_load() -> R {
    let bs = Backend::start_many(&["slow", "f1", "f2"]).await?;
    bs[0].set_delay(Duration::from_millis(400));
    let slow = bs[0].addr;
    let c = shoal_tests::Cluster::builder("r2c", 2)
        .algorithm("random-two")
        .backend(&bs[0])
        .backend(&bs[1])
        .backend(&bs[2])
        .start()
        .await?;
    c.wait_converged(Duration::from_secs(10)).await?;
    let load = Load::new(c[0].proxy).concurrency(24).until_stopped().spawn();
    shoal_tests::cluster::wait_backend(
        &[&c[1]],
        slow,
        "carries node 1's load in node 2's view",
        Duration::from_secs(3),
        |e| e["in_flight"] == 0 && e["cluster_in_flight"].as_u64() >= Some(3),
    )
    .await?;
    // One request at a time through node 2, over ~10 gossip rounds.
    let mut probes = Vec::new();
    for _ in 0..30 {
        let e = shoal_tests::cluster::backend_entry(&c[1], slow).await;
        let r = get(c[1].proxy, "/").await?;
        assert_eq!(r.status.as_u16(), 200, "{r:?}");
        probes.push((e["cluster_in_flight"].as_u64().unwrap_or(0), r.body));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let s = load.stop().await;
    assert_eq!(s.failed(), 0, "{s}");
    let to_slow = probes.iter().filter(|p| p.1 == "slow").count();
    let loaded = probes.iter().filter(|p| p.0 >= 2).count();
    println!(
        "RANDOM-TWO cluster: node 2 sent {to_slow} of 30 to slow; (slow's cluster in-flight it saw, answer): {probes:?}"
    );
    assert!(loaded >= 25, "node 2 saw node 1's load on slow in only {loaded} of 30 probes: {probes:?}");
    // P(<= 3 of 30) with a one-in-three chance each is 0.3 %.
    assert!(to_slow <= 3, "{to_slow} of 30 requests through node 2 went to the backend node 1 loaded: {probes:?}");
    Ok(())
}
