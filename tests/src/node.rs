//! `shoald` processes.
//!
//! [`Node::builder`] collects flags and an optional TOML config; [`NodeBuilder::start`] picks
//! four free ports (proxy, admin, control, gossip), writes the config into the node's temp
//! dir, spawns `shoald run` with stdout and stderr appended to `<dir>/node.log`, and waits
//! (up to 20 s) until `/live` answers. [`NodeBuilder::host`], [`NodeBuilder::proxy_port`] and
//! [`NodeBuilder::wrapper`] put a node on another IP, a fixed proxy port, or in a network
//! namespace (for the chaos tests). If the process exits first because a port was taken in
//! the meantime, it retries on fresh ports; any other early exit is an error carrying the log.
//!
//! Dropping a [`Node`] kills the process (SIGKILL) and reaps it, so a failing test never leaks
//! one; when the test is failing, the last lines of the log are printed first.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::backend::Backend;
use crate::http::{RawResponse, raw_exchange};
use crate::{TempDir, bins, free_port};

/// The `RUST_LOG` directive that makes the sealed gossip transport log each rejection
/// (`dropped a gossip datagram ... from=ADDR bytes=N`).
pub const GOSSIP_DEBUG: &str = "shoal_node::cluster::transport=debug";

/// Signals a test sends to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Hup,
    Int,
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Hup => "HUP",
            Signal::Int => "INT",
            Signal::Kill => "KILL",
        }
    }
}

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    id: String,
    config: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    files: Vec<(String, String)>,
    gossip: Option<SocketAddr>,
    host: Option<IpAddr>,
    proxy_port: Option<u16>,
    wrapper: Vec<String>,
}

impl NodeBuilder {
    /// Gossip on `addr` instead of a port picked at start, so peers can be given it as a seed
    /// before the node runs (see [`crate::cluster`]). A retry after a port clash keeps it.
    pub fn gossip_addr(mut self, addr: SocketAddr) -> Self {
        self.gossip = Some(addr);
        self
    }

    /// Binds every listener (proxy, admin, control, gossip when not given) on `ip` instead of
    /// 127.0.0.1: another loopback address (127.0.0.0/8), or an address inside a network
    /// namespace (see [`crate::chaos::NetLab`]).
    pub fn host(mut self, ip: IpAddr) -> Self {
        self.host = Some(ip);
        self
    }

    /// The proxy listens on this port instead of a free one (DNS round-robin needs every node
    /// on the same port).
    pub fn proxy_port(mut self, port: u16) -> Self {
        self.proxy_port = Some(port);
        self
    }

    /// Runs `shoald` through this command prefix, e.g. `["ip", "netns", "exec", "NS"]` (which
    /// execs in place, so the pid and the signals are still shoald's).
    pub fn wrapper(mut self, prefix: &[String]) -> Self {
        self.wrapper = prefix.to_vec();
        self
    }

    /// The config file's TOML. Listener addresses are passed as flags and override it.
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// A file written into the node's dir before it starts; `{dir}` in the config and in
    /// arguments is replaced by that dir's path.
    pub fn file(mut self, name: &str, contents: &str) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// `--backend ADDR`.
    pub fn backend(self, b: &Backend) -> Self {
        self.backend_spec(&b.addr.to_string())
    }

    /// `--backend ADDR,<opts>` (e.g. `"weight=3,max_fails=0"`).
    pub fn backend_with(self, b: &Backend, opts: &str) -> Self {
        self.backend_spec(&format!("{},{opts}", b.addr))
    }

    /// `--backend SPEC`.
    pub fn backend_spec(self, spec: &str) -> Self {
        self.arg("--backend").arg(spec)
    }

    /// `--algorithm NAME`.
    pub fn algorithm(self, name: &str) -> Self {
        self.arg("--algorithm").arg(name)
    }

    /// Any other flag of `shoald run`.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// Logs every gossip datagram the node rejects (debug level for the sealed transport, on
    /// top of `SHOAL_TEST_LOG`), which [`Node::settled_rejected_datagrams`] needs.
    pub fn gossip_debug(self) -> Self {
        let level = std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into());
        self.env("RUST_LOG", &format!("{level},{GOSSIP_DEBUG}"))
    }

    /// An environment variable for the process (e.g. `RUST_LOG`).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Starts the node and waits until `/live` answers.
    pub async fn start(self) -> anyhow::Result<Node> {
        let shoald = bins::shoald().clone();
        let mut dir = TempDir::new(&self.id)?;
        let dir_text = dir.path().display().to_string();
        for (name, contents) in &self.files {
            dir.write(name, &contents.replace("{dir}", &dir_text))?;
        }
        let config_path = match &self.config {
            Some(toml) => Some(dir.write("shoald.toml", &toml.replace("{dir}", &dir_text))?),
            None => None,
        };
        let log_path = dir.path().join("node.log");
        let mut last_log = String::new();
        for attempt in 0..4 {
            let ip = self.host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let at = |port| SocketAddr::new(ip, port);
            let proxy = at(self.proxy_port.unwrap_or_else(free_port));
            let (admin, control) = (at(free_port()), at(free_port()));
            let gossip = self.gossip.unwrap_or_else(|| at(free_port()));
            let mut cmd = match self.wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(&shoald);
                    c
                }
                None => Command::new(&shoald),
            };
            cmd.arg("run");
            if let Some(p) = &config_path {
                cmd.arg("--config").arg(p);
            }
            cmd.args(["--node-id", &self.id])
                .args(["--listen", &proxy.to_string()])
                .args(["--admin", &admin.to_string()])
                .args(["--control", &control.to_string()])
                .args(["--gossip", &gossip.to_string()])
                .args(self.args.iter().map(|a| a.replace("{dir}", &dir_text)));
            let log = OpenOptions::new().create(true).append(true).open(&log_path)?;
            let log_err = log.try_clone()?;
            cmd.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log_err));
            let level = std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into());
            cmd.env("RUST_LOG", level);
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            let child = cmd.spawn().with_context(|| format!("spawn {}", shoald.display()))?;
            let mut node = Node {
                id: self.id.clone(),
                proxy,
                admin,
                control,
                gossip,
                child: Some(child),
                config_path: config_path.clone(),
                log_path: log_path.clone(),
                exit: None,
                dir,
            };
            match node.wait_live(Duration::from_secs(20)).await {
                Ok(()) => return Ok(node),
                Err(e) => {
                    last_log = node.log();
                    let port_taken = last_log.contains("Address already in use") || last_log.contains("cannot bind");
                    if node.exit.is_some() && port_taken && attempt < 3 {
                        // A port we picked was taken before shoald bound it: new ports.
                        dir = node.take_dir();
                        std::fs::write(&log_path, "")?;
                        continue;
                    }
                    return Err(e.context(format!("node {} did not start; log:\n{last_log}", self.id)));
                }
            }
        }
        bail!("node {} could not find free ports; log:\n{last_log}", self.id)
    }
}

/// One running `shoald run`.
pub struct Node {
    pub id: String,
    /// The proxy listener (`--listen`).
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub control: SocketAddr,
    pub gossip: SocketAddr,
    child: Option<Child>,
    config_path: Option<PathBuf>,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
    dir: TempDir,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({} proxy {} admin {})", self.id, self.proxy, self.admin)
    }
}

impl Node {
    /// A builder for node `id`.
    pub fn builder(id: &str) -> NodeBuilder {
        NodeBuilder {
            id: id.into(),
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            files: Vec::new(),
            gossip: None,
            host: None,
            proxy_port: None,
            wrapper: Vec::new(),
        }
    }

    fn take_dir(&mut self) -> TempDir {
        // Swap in a throwaway so Drop of the failed attempt keeps the real dir.
        let placeholder = TempDir::new("discard").expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// The node's temp dir (config, log, any files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Path of the config file, when the node has one.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Replaces the config file (then send [`Signal::Hup`] to reload it).
    pub fn write_config(&self, toml: &str) -> anyhow::Result<()> {
        let p = self.config_path.as_ref().context("this node runs without a config file")?;
        let dir_text = self.dir.path().display().to_string();
        std::fs::write(p, toml.replace("{dir}", &dir_text))?;
        Ok(())
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit = Some(status);
        }
        self.exit
    }

    async fn wait_live(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                bail!("shoald exited with {status} before /live answered");
            }
            if let Ok(r) = self.admin_get("/live").await
                && r.status == 200
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("/live did not answer within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET <path>` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<RawResponse> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.admin);
        let raw = raw_exchange(self.admin, req.as_bytes(), Duration::from_secs(3)).await?;
        RawResponse::parse(&raw)
    }

    /// `/status` as JSON.
    pub async fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        let r = self.admin_get("/status").await?;
        if r.status != 200 {
            bail!("/status answered {}", r.status);
        }
        serde_json::from_slice(&r.body).context("/status is not JSON")
    }

    /// The `/status` entry of backend `addr`.
    pub async fn backend_status(&self, addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
        let s = self.status_json().await?;
        let want = addr.to_string();
        s["backends"]
            .as_array()
            .and_then(|bs| bs.iter().find(|b| b["addr"].as_str() == Some(want.as_str())))
            .cloned()
            .with_context(|| format!("backend {want} not in /status: {s}"))
    }

    /// `up`, `down` or `draining` for backend `addr` ("" when /status fails).
    pub async fn backend_state(&self, addr: SocketAddr) -> String {
        match self.backend_status(addr).await {
            Ok(b) => b["state"].as_str().unwrap_or("").to_string(),
            Err(_) => String::new(),
        }
    }

    /// Addresses of the backends in `/status`, sorted.
    pub async fn backend_addrs(&self) -> anyhow::Result<Vec<String>> {
        let s = self.status_json().await?;
        let mut v: Vec<String> = s["backends"]
            .as_array()
            .map(|bs| bs.iter().filter_map(|b| b["addr"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        v.sort();
        Ok(v)
    }

    /// `/metrics` as text.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let r = self.admin_get("/metrics").await?;
        if r.status != 200 {
            bail!("/metrics answered {}", r.status);
        }
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// The value of metric `name` (or `name_total`, as OpenMetrics names counters) whose
    /// labels include every `labels` pair; `None` when there is no such sample.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.metrics_text().await.ok()?;
        metric_value(&text, name, labels)
    }

    /// The log with terminal colour codes removed (tracing colours field names).
    pub fn log_plain(&self) -> String {
        plain(&self.log())
    }

    /// Log lines of gossip datagrams this node rejected that came from `from` (needs
    /// [`NodeBuilder::gossip_debug`]).
    pub fn rejections_logged_from(&self, from: SocketAddr) -> usize {
        let want = format!("from={from} ");
        self.log_plain().lines().filter(|l| l.contains("dropped a gossip datagram") && l.contains(&want)).count()
    }

    /// `shoal_gossip_rejected_datagrams` once every datagram sent to the node so far has been
    /// handled: sends one junk datagram from a fresh socket and waits until the node logs its
    /// rejection. The node handles its gossip socket's datagrams in arrival order, and counts a
    /// rejection before logging it, so the value read then includes everything sent before
    /// (and this junk datagram). Needs [`NodeBuilder::gossip_debug`].
    pub async fn settled_rejected_datagrams(&self, timeout: Duration) -> anyhow::Result<f64> {
        let start = Instant::now();
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let me = udp.local_addr()?;
        udp.send_to(b"settle: not a gossip datagram", self.gossip).await?;
        while self.rejections_logged_from(me) == 0 {
            if start.elapsed() > timeout {
                bail!(
                    "{}: the settling datagram from {me} was not logged as rejected within {timeout:?} (is the node started with gossip_debug()?)",
                    self.id
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.metric("shoal_gossip_rejected_datagrams", &[]).await.context("no shoal_gossip_rejected_datagrams")
    }

    /// The status code of `/ready` (0 when the admin listener does not answer).
    pub async fn ready_status(&self) -> u16 {
        self.admin_get("/ready").await.map_or(0, |r| r.status)
    }

    /// Sends a signal with `kill -s <SIG> <pid>`.
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("no process")?;
        let status = Command::new("kill").args(["-s", sig.name(), &pid.to_string()]).status().context("run kill")?;
        if !status.success() {
            bail!("kill -s {} {pid} failed: {status}", sig.name());
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        if let Some(child) = &mut self.child
            && self.exit.is_none()
        {
            let _ = child.kill();
            self.exit = child.wait().ok();
        }
        self.exit
    }

    /// Waits for the process to exit; fails after `timeout` (the process keeps running).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                bail!("node {} still running {timeout:?} after being asked to exit", self.id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let running = self.exited().is_none() && self.child.is_some();
        if running {
            self.kill9();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "----- node {} (proxy {}, admin {}) log, last {} lines ({}) -----\n{}\n-----",
                self.id,
                self.proxy,
                self.admin,
                tail.len(),
                self.log_path.display(),
                tail.join("\n")
            );
        }
    }
}

/// Runs `shoald check --config <file with toml>`; returns the output (and the file's path).
pub fn shoald_check(dir: &TempDir, name: &str, toml: &str) -> anyhow::Result<(Output, PathBuf)> {
    let path = dir.write(name, toml)?;
    let out = Command::new(bins::shoald()).arg("check").arg("--config").arg(&path).output()?;
    Ok((out, path))
}

/// Runs `shoald <args>` to completion, killing it after `timeout` (an error then).
pub async fn shoald_run_to_exit(args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
    let mut child = Command::new(bins::shoald())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!("shoald {args:?} still running after {timeout:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finds the sample of `name` (or `name_total`) whose labels include every `labels` pair in
/// Prometheus/OpenMetrics text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (head, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match head.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        if metric != name && metric.strip_suffix("_total") != Some(name) {
            return None;
        }
        let all = labels.iter().all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all { value.parse().ok() } else { None }
    })
}

/// `text` with terminal colour codes removed (tracing colours field names).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}
