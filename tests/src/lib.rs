//! # shoal-tests: the multi-process test harness
//!
//! Integration tests in `tests/tests/*.rs` start real `shoald` processes (built once per test
//! process with `cargo build -p shoal-node -p shoal-cli --bins`) in front of real HTTP backends
//! that run inside the test process, send real traffic, and assert on figures: statuses,
//! per-backend shares, `/status` fields, exit codes, log lines.
//!
//! ## Pieces
//! - [`bins`]: builds and locates `target/debug/shoald` and `target/debug/shoal`
//!   (`SHOAL_TESTS_NO_BUILD=1` skips the build and uses what is there).
//! - [`node`]: [`Node`], one `shoald run` process with its own ports, temp dir, config file
//!   and log; it waits for `/live`, reads `/status`, sends signals, and is killed on drop.
//!   [`shoald_check`] and [`shoald_run_to_exit`] cover the commands that should fail fast.
//! - [`backend`]: [`Backend`], an in-process hyper 1.x server on `127.0.0.1:0` that answers
//!   with its name, echoes what it saw at `/echo`, can be slowed, made to fail, made to speak
//!   garbage, fail its health checks, accept upgrades (echoing bytes), and be stopped and
//!   restarted on the same port. It counts requests and the peak of concurrent requests.
//! - [`load`]: [`Load`], a bounded load generator (N keep-alive clients, a request count or a
//!   duration, hard-capped at two minutes) returning a [`LoadSummary`] with statuses, errors,
//!   latencies and per-backend counts taken from the response bodies.
//! - [`http`]: a small HTTP client ([`http::get`]) and raw-TCP helpers
//!   ([`http::raw_exchange`], [`http::RawResponse`]) for malformed-input tests.
//! - [`chaos`]: what the chaos suite adds: a DNS client for Shoal's responder, a DNS
//!   round-robin load generator that retries the next address like a browser ([`DnsLoad`]),
//!   network namespaces to partition nodes ([`NetLab`]) and a TCP [`Relay`] into them.
//! - [`raw`]: [`RawServer`], a scripted raw-TCP backend recording every byte it receives, and
//!   [`RawClient`], a strict raw-TCP client (byte-exact codec tests).
//! - [`paced`]: open-loop load at a fixed request rate (each request on its own task), for
//!   rate limits: the offered rate is exact and delayed answers do not slow the rest.
//! - [`state`]: reads a node's persisted `data_dir/shoal-state.bin` (the registry), so a test
//!   waits until a node has written what it merged.
//! - [`gossip`]: opens and seals gossip datagrams with a cluster secret, per the documented
//!   wire format (e.g. a genuine payload with a timestamp outside the replay window).
//! - [`h2c`]: an HTTP/2 (prior knowledge) client that sends what hyper's would not.
//! - [`tls`]: HTTPS: a test CA issuing ECDSA and RSA certificates (rcgen), real TLS clients
//!   run as subprocesses with a deadline (curl, openssl, h2load), and a rustls client that
//!   chooses which TLS records carry which bytes.
//! - [`wait_until`]: polls a condition until a deadline; tests never sleep for a condition.
//!
//! ## Rules the tests follow
//! - Every port is chosen by [`free_port`] (TCP and UDP free on 127.0.0.1, never handed out
//!   twice in one process), so tests run in parallel; a node whose port was taken meanwhile
//!   is restarted on fresh ports.
//! - Nothing outside 127.0.0.0/8 is ever contacted; every load is bounded.
//! - A failing test prints the tail of each of its nodes' logs (and keeps the temp dir);
//!   `SHOAL_TEST_LOG` sets `RUST_LOG` for the nodes (default `info`).

pub mod backend;
pub mod bins;
pub mod chaos;
pub mod cluster;
pub mod gossip;
pub mod h2c;
pub mod http;
pub mod load;
pub mod node;
pub mod paced;
pub mod raw;
pub mod state;
pub mod tls;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use backend::Backend;
pub use chaos::{ChaosSummary, DnsLoad, DnsLoadHandle, Figures, NetLab, Records, Relay};
pub use cluster::{CliOutput, Cluster, ClusterBuilder, Shoal};
pub use load::{Load, LoadHandle, LoadSummary};
pub use node::{Node, NodeBuilder, Signal, shoald_check, shoald_run_to_exit};
pub use raw::{RawClient, RawServer};

/// Polls `cond` every 20 ms until it returns true; fails after `timeout` naming `what`.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that is free on 127.0.0.1 for both TCP and UDP right now and was never returned
/// before by this process (found by binding port 0 and releasing it).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let Ok(tcp) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(port) = tcp.local_addr().map(|a| a.port()) else { continue };
        if UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut set = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if set.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("could not find a free port on 127.0.0.1");
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A directory under the system temp dir, removed on drop unless the thread is panicking
/// (a failed test keeps its logs) or `SHOAL_TEST_KEEP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> std::io::Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let clean: String =
            label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = std::env::temp_dir().join(format!("shoal-tests-{}-{n}-{clean}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> std::io::Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::write(&p, contents)?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SHOAL_TEST_KEEP").is_some() {
            eprintln!("[shoal-tests] kept {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `n` deterministic pseudo-random bytes (xorshift): any lost, duplicated or reordered byte
/// shows.
pub fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}
