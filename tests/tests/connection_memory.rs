//! What an idle client connection costs a real `shoald` (issue 11), measured from outside as
//! the growth of its resident memory (`/proc/PID/status` VmRSS):
//!
//! 1. A few thousand HTTP/1.1 clients that each sent one request and stay open (kept alive,
//!    waiting for their next request) cost at most a small bound each, and when they leave
//!    the node gives the memory back.
//! 2. Four thousand upgraded connections (WebSocket tunnels) idle between messages cost at most
//!    a small bound each, and still carry bytes afterwards.
//!
//! 3. A thousand idle HTTP/2 connections (large while open: hyper's codec) are given back
//!    when they close: the burst large enough to tell whether the node returns memory.
//!
//! The bounds have generous headroom over what the debug build measures (printed with
//! `--nocapture`); what they catch is a buffer or a large future held per idle connection
//! again (the old HTTP/1.1 path held about 17 KiB each). The release build's figures, side
//! by side with nginx and HAProxy, are `bench/idle.sh`'s (docs/BENCHMARKS.md).

use std::time::Duration;

use anyhow::{Context, ensure};
use shoal_tests::{Backend, Node, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

/// Idle keep-alive clients opened by test 1: enough that their cost stands out of what the
/// allocator keeps for reuse.
const KEEP_ALIVE_CLIENTS: usize = 5000;
/// Bound per idle keep-alive connection (the debug build measures 0.3 to 0.7 KiB; the old path
/// held about 17 KiB).
const KEEP_ALIVE_BOUND: u64 = 3 * 1024;
/// Idle tunnels opened by test 2.
const TUNNELS: usize = 4000;
/// Bound per idle tunnel: the client connection and the backend connection it holds (the
/// debug build measures 0.8 to 1.7 KiB; the old path held about 49 KiB in a release build).
const TUNNEL_BOUND: u64 = 8 * 1024;
/// Clients connecting at once.
const AT_ONCE: usize = 100;
/// Warm-up clients: few, so the memory they leave for reuse is small next to what is measured.
const WARM_UP: usize = 20;

/// Files this process needs: each keep-alive client, or for each tunnel its client and the
/// backend's side (the backends run in this process too). The tests run one at a time
/// (`ONE_AT_A_TIME`), so the larger of the two.
const FILES: u64 = (if KEEP_ALIVE_CLIENTS > 2 * TUNNELS { KEEP_ALIVE_CLIENTS } else { 2 * TUNNELS } + 1024) as u64;

/// Held by each test for its whole run: one at a time, so their files do not add up (and
/// neither measurement sees the other's load).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Raises this process's open-files limit to the hard limit; fails if that is too low for
/// the clients the tests open.
fn raise_open_files(need: u64) -> R {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if limit.current.is_some_and(|soft| soft < hard) {
        setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: limit.maximum })?;
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    ensure!(soft >= need, "this test opens {need} files; the open-files hard limit is {hard} (raise `ulimit -Hn`)");
    Ok(())
}

/// Resident anonymous memory of process `pid` (the heap, stacks: what connections cost; the
/// binary's pages, which grow as code first runs, are left out), in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no RssAnon line")?
        .parse::<u64>()?;
    Ok(kb * 1024)
}

/// RSS once it has stopped moving: after 4 s (the node gives memory back within a few seconds
/// of a burst), seven readings 500 ms apart within 64 KiB of each other.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut readings = vec![rss(pid)?];
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        readings.push(rss(pid)?);
        let last = &readings[readings.len().saturating_sub(7)..];
        let (lo, hi) = (last.iter().min().copied().unwrap_or(0), last.iter().max().copied().unwrap_or(0));
        if last.len() == 7 && hi - lo < 64 * 1024 {
            return Ok(*last.last().unwrap_or(&hi));
        }
    }
    Ok(*readings.last().unwrap_or(&0))
}

async fn active_connections(node: &Node) -> u64 {
    node.status_json().await.ok().and_then(|s| s["connections"]["active"].as_u64()).unwrap_or(u64::MAX)
}

/// Reads one response to a GET (head and `content-length` body) off `s`.
async fn read_response(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        ensure!(n > 0, "closed mid-response: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(Ok(0), |v| v.trim().parse::<usize>())?;
            if got.len() >= end + 4 + len {
                return Ok(got);
            }
        }
    }
}

/// Opens `n` connections to `addr`, `AT_ONCE` at a time, each made ready by `start`.
async fn open_many<F, Fut>(n: usize, addr: std::net::SocketAddr, start: F) -> anyhow::Result<Vec<TcpStream>>
where
    F: Fn(TcpStream) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<TcpStream>> + Send,
{
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let batch = AT_ONCE.min(n - open.len());
        let tasks: Vec<_> =
            (0..batch).map(|_| tokio::spawn(async move { start(TcpStream::connect(addr).await?).await })).collect();
        for t in tasks {
            open.push(t.await??);
        }
    }
    Ok(open)
}

/// What one measurement found: RSS at rest (after a small warm-up of the same kind), RSS with
/// `n` connections idle, the growth per connection, and the connections (still open).
struct Measured {
    before: u64,
    during: u64,
    per_conn: u64,
    conns: Vec<TcpStream>,
}

/// Warms `node` (process `pid`) up with `WARM_UP` connections made ready by `start`, waits until
/// they are gone and RSS is at rest, then opens `n` and measures again; prints the figures.
async fn measure<F, Fut>(what: &str, n: usize, node: &Node, pid: u32, start: F) -> anyhow::Result<Measured>
where
    F: Fn(TcpStream) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<TcpStream>> + Send,
{
    // Warm up: lazily built state (the pool's connections, timer wheel levels) is not per client.
    drop(open_many(WARM_UP, node.proxy, start).await?);
    wait_until(Duration::from_secs(10), "the warm-up connections are gone", async || {
        active_connections(node).await == 0
    })
    .await?;
    let before = settled_rss(pid).await?;
    let conns = open_many(n, node.proxy, start).await?;
    let during = settled_rss(pid).await?;
    let per_conn = during.saturating_sub(before) / n as u64;
    println!(
        "{n} {what}: RSS {:.1} -> {:.1} MiB, {per_conn} bytes each",
        before as f64 / 1048576.0,
        during as f64 / 1048576.0
    );
    Ok(Measured { before, during, per_conn, conns })
}

/// Waits (10 s at most) until process `pid`'s RSS is at or under `limit` after the clients
/// left; prints where it ended.
async fn given_back(pid: u32, before: u64, during: u64, limit: u64) -> R {
    let mut after = rss(pid)?;
    let given_back = wait_until(Duration::from_secs(10), "RSS is given back", async || {
        after = rss(pid).unwrap_or(u64::MAX);
        after <= limit
    })
    .await;
    println!(
        "after they closed: RSS {:.1} MiB ({:+.1} MiB against before)",
        after as f64 / 1048576.0,
        (after as f64 - before as f64) / 1048576.0
    );
    given_back.with_context(|| format!("RSS before {before}, with the clients {during}, after they left {after}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_cost_little_and_are_given_back() -> R {
    let _alone = ONE_AT_A_TIME.lock().await;
    raise_open_files(FILES)?;
    let b = Backend::start("idle").await?;
    let node = Node::builder("idle").backend(&b).start().await?;
    let pid = node.pid().context("node pid")?;
    let get = |mut s: TcpStream| async move {
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: idle.test\r\n\r\n").await?;
        let resp = read_response(&mut s).await?;
        ensure!(resp.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&resp));
        Ok(s)
    };
    let Measured { before, during, per_conn, conns: mut clients } =
        measure("idle keep-alive clients", KEEP_ALIVE_CLIENTS, &node, pid, get).await?;
    let active = active_connections(&node).await;
    ensure!(active == KEEP_ALIVE_CLIENTS as u64, "the node holds {active} of {KEEP_ALIVE_CLIENTS} connections");
    ensure!(
        per_conn <= KEEP_ALIVE_BOUND,
        "an idle keep-alive connection costs {per_conn} bytes (bound {KEEP_ALIVE_BOUND})"
    );

    // They still work: a second request on a few of them.
    for s in clients.iter_mut().take(20) {
        s.write_all(b"GET /again HTTP/1.1\r\nHost: idle.test\r\n\r\n").await?;
        let resp = read_response(s).await?;
        ensure!(resp.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&resp));
    }

    drop(clients);
    wait_until(Duration::from_secs(10), "the clients' connections are closed", async || {
        active_connections(&node).await == 0
    })
    .await?;
    // Given back: RSS returns to within a quarter of the growth, or 3 MiB over RSS before,
    // whichever is more (the benchmark's target is 10% of RSS before). The 3 MiB: thread
    // stacks keep the pages a debug build's deep futures touched during the burst, and RSS
    // "before" itself wanders with what the warm-up left (seen: before 11.0-14.6 MiB, after
    // the clients left 12.6-13.4 MiB in every run, so a 2 MiB floor failed when "before" came
    // out low). A node that gave nothing back keeps all the growth (85 MiB on the build before
    // the idle-connection work); the HTTP/2 burst test below holds the give-back to a 28 MiB
    // burst, which this scale cannot.
    let limit = before + (during.saturating_sub(before) / 4).max(3 << 20);
    given_back(pid, before, during, limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_cost_little_and_still_carry_bytes() -> R {
    let _alone = ONE_AT_A_TIME.lock().await;
    raise_open_files(FILES)?;
    let b = Backend::start("ws").await?;
    let node = Node::builder("tunnels").backend(&b).start().await?;
    let pid = node.pid().context("node pid")?;
    let upgrade = |mut s: TcpStream| async move {
        s.write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
        let resp = read_response(&mut s).await?;
        ensure!(resp.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&resp));
        // One message each way, then idle.
        s.write_all(b"hello").await?;
        let mut back = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await??;
        ensure!(&back == b"hello", "echoed {back:?}");
        Ok(s)
    };
    let Measured { per_conn: per_tunnel, conns: mut tunnels, .. } =
        measure("idle tunnels", TUNNELS, &node, pid, upgrade).await?;
    ensure!(per_tunnel <= TUNNEL_BOUND, "an idle tunnel costs {per_tunnel} bytes (bound {TUNNEL_BOUND})");
    for (i, s) in tunnels.iter_mut().enumerate().step_by(50) {
        let msg = format!("message {i} after idling");
        s.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await??;
        ensure!(back == msg.as_bytes(), "tunnel {i} echoed {:?}", String::from_utf8_lossy(&back));
    }
    Ok(())
}

/// HTTP/2 clients opened by test 3: each costs tens of KiB while open (hyper's HTTP/2 codec),
/// so their burst is large enough to show whether the node gives memory back.
const H2_CLIENTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_http2_connections_is_given_back() -> R {
    let _alone = ONE_AT_A_TIME.lock().await;
    raise_open_files(FILES)?;
    let b = Backend::start("h2").await?;
    let node = Node::builder("h2burst").backend(&b).start().await?;
    let pid = node.pid().context("node pid")?;
    // The connection preface and an empty SETTINGS frame; the node's SETTINGS come back, and
    // are acknowledged; then the connection idles with no stream open.
    let open_h2 = |mut s: TcpStream| async move {
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await?;
        let mut frame_head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut frame_head)).await??;
        ensure!(frame_head[3] == 4, "the node's first frame is not SETTINGS: {frame_head:?}");
        s.write_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00").await?;
        Ok(s)
    };
    let Measured { before, during, conns, .. } =
        measure("idle HTTP/2 clients", H2_CLIENTS, &node, pid, open_h2).await?;
    ensure!(during - before > 8 << 20, "the burst grew RSS by only {} bytes: too little to judge", during - before);
    drop(conns);
    wait_until(Duration::from_secs(10), "the HTTP/2 connections are closed", async || {
        active_connections(&node).await == 0
    })
    .await?;
    // Given back: within a quarter of the growth (a node that does not ask its allocator to
    // return pages keeps all of it, as the old build did; a plain, unforced collect kept
    // about a third in a release build).
    let limit = before + (during - before) / 4;
    given_back(pid, before, during, limit).await
}
