//! Clusters of `shoald` processes, and the `shoal` CLI.
//!
//! [`Cluster::builder`] describes N nodes that share flags, a config, backends, optionally a
//! cluster secret and data dirs; [`ClusterBuilder::start`] picks every node's gossip address
//! first, gives *every* node the same `--seed` list (all gossip addresses, its own included,
//! as an operator would), starts them concurrently and returns once each answers `/live`.
//! Nodes are named `<prefix>-1`, `<prefix>-2`, ... By default every node binds on 127.0.0.1;
//! [`ClusterBuilder::hosts`] gives each node its own address (another loopback address, or one
//! inside a network namespace with [`ClusterBuilder::node_wrapper`]) and
//! [`ClusterBuilder::proxy_port`] one proxy port for all, as DNS round-robin needs.
//!
//! Member states are read from the nodes' admin `/status` (cheap enough to poll every 20 ms):
//! [`member_states`], [`Cluster::wait_member`] (a member reaches a state on every given
//! observer; returns how long it took) and [`Cluster::wait_converged`].
//!
//! [`Shoal`] runs `target/debug/shoal` against one node's control address, with `--json` by
//! default, and returns a [`CliOutput`] (exit code, stdout, stderr); [`Shoal::json`] also
//! requires exit 0 and parses stdout. [`Shoal::spawn`] starts a long-running command (e.g.
//! `leave`, which streams its phases) with stdout piped.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Index, IndexMut};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::backend::Backend;
use crate::node::{Node, NodeBuilder, Signal};
use crate::{TempDir, bins, free_port};

/// How to start a cluster (cloneable, so the same cluster can be started again).
#[derive(Clone)]
pub struct ClusterBuilder {
    prefix: String,
    size: usize,
    cluster_id: String,
    config: Option<String>,
    args: Vec<String>,
    secret: Option<String>,
    data_dirs: bool,
    seeded: bool,
    per_node: Vec<(usize, Vec<String>)>,
    per_node_config: Vec<(usize, String)>,
    hosts: Vec<IpAddr>,
    proxy_port: Option<u16>,
    wrappers: Vec<(usize, Vec<String>)>,
    gossip_debug: bool,
}

impl ClusterBuilder {
    /// Node `i` binds every listener on `ips[i - 1]` (default 127.0.0.1), e.g. one loopback
    /// address per node for DNS round-robin, or the nodes' addresses in a [`crate::chaos::NetLab`].
    pub fn hosts(mut self, ips: &[IpAddr]) -> Self {
        self.hosts = ips.to_vec();
        self
    }

    /// Every node's proxy listens on `port` (on its own host address).
    pub fn proxy_port(mut self, port: u16) -> Self {
        self.proxy_port = Some(port);
        self
    }

    /// Node `i` (1-based) runs through a command prefix (see [`NodeBuilder::wrapper`]).
    pub fn node_wrapper(mut self, i: usize, prefix: &[String]) -> Self {
        self.wrappers.push((i, prefix.to_vec()));
        self
    }

    /// The address node `i` (1-based) binds on.
    pub fn host(&self, i: usize) -> IpAddr {
        self.hosts.get(i - 1).copied().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// `--cluster-id` (default `<prefix>-cluster`).
    pub fn cluster_id(mut self, id: &str) -> Self {
        self.cluster_id = id.into();
        self
    }

    /// The config file of every node (a node-specific one from [`Self::node_config`] wins).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// The config file of node `i` (1-based).
    pub fn node_config(mut self, i: usize, toml: &str) -> Self {
        self.per_node_config.push((i, toml.into()));
        self
    }

    /// A flag for every node.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// A flag for node `i` only (1-based).
    pub fn node_arg(mut self, i: usize, a: &str) -> Self {
        match self.per_node.iter_mut().find(|(n, _)| *n == i) {
            Some((_, v)) => v.push(a.into()),
            None => self.per_node.push((i, vec![a.into()])),
        }
        self
    }

    /// `--backend ADDR` on every node.
    pub fn backend(self, b: &Backend) -> Self {
        self.arg("--backend").arg(&b.addr.to_string())
    }

    /// `--backend ADDR,<opts>` on every node.
    pub fn backend_with(self, b: &Backend, opts: &str) -> Self {
        self.arg("--backend").arg(&format!("{},{opts}", b.addr))
    }

    /// `--algorithm NAME` on every node.
    pub fn algorithm(self, name: &str) -> Self {
        self.arg("--algorithm").arg(name)
    }

    /// A shared cluster secret (written once, passed to every node with `--secret-file`).
    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Every node logs each gossip datagram it rejects (see [`NodeBuilder::gossip_debug`]).
    pub fn gossip_debug(mut self) -> Self {
        self.gossip_debug = true;
        self
    }

    /// Gives every node `--data-dir <cluster dir>/data-<id>` (kept across [`Cluster::restart`]).
    pub fn data_dirs(mut self) -> Self {
        self.data_dirs = true;
        self
    }

    /// Starts the nodes with no `--seed` at all (each is a cluster of one until joined).
    pub fn unseeded(mut self) -> Self {
        self.seeded = false;
        self
    }

    /// Node `i`'s id (1-based).
    pub fn id(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// The builder of node `i` (1-based), gossiping on `gossip` and seeded with `seeds`.
    fn node_builder(&self, i: usize, gossip: SocketAddr, seeds: &[SocketAddr], dir: &Path) -> NodeBuilder {
        let mut b =
            Node::builder(&self.id(i)).host(self.host(i)).gossip_addr(gossip).arg("--cluster-id").arg(&self.cluster_id);
        if let Some(p) = self.proxy_port {
            b = b.proxy_port(p);
        }
        if self.gossip_debug {
            b = b.gossip_debug();
        }
        if let Some((_, w)) = self.wrappers.iter().find(|(n, _)| *n == i) {
            b = b.wrapper(w);
        }
        let config = self.per_node_config.iter().find(|(n, _)| *n == i).map(|(_, c)| c).or(self.config.as_ref());
        if let Some(c) = config {
            b = b.config(c.clone());
        }
        if self.seeded {
            for s in seeds {
                b = b.arg("--seed").arg(&s.to_string());
            }
        }
        if self.secret.is_some() {
            b = b.arg("--secret-file").arg(&dir.join("secret").display().to_string());
        }
        if self.data_dirs {
            b = b.arg("--data-dir").arg(&dir.join(format!("data-{}", self.id(i))).display().to_string());
        }
        for a in &self.args {
            b = b.arg(a);
        }
        for a in self.per_node.iter().filter(|(n, _)| *n == i).flat_map(|(_, v)| v) {
            b = b.arg(a);
        }
        b
    }

    /// Starts every node (concurrently) and waits until each answers `/live`. Does not wait
    /// for gossip to converge: see [`Cluster::wait_converged`].
    pub async fn start(self) -> anyhow::Result<Cluster> {
        let dir = TempDir::new(&format!("{}-cluster", self.prefix))?;
        if let Some(s) = &self.secret {
            dir.write("secret", s)?;
        }
        let mut cluster = Cluster { nodes: Vec::new(), spec: self, dir };
        cluster.nodes = cluster.start_nodes().await?;
        Ok(cluster)
    }
}

/// N running nodes (dropping the cluster kills them all).
pub struct Cluster {
    /// The nodes, in order (`c[0]` is `<prefix>-1`).
    pub nodes: Vec<Node>,
    spec: ClusterBuilder,
    dir: TempDir,
}

impl Index<usize> for Cluster {
    type Output = Node;
    fn index(&self, i: usize) -> &Node {
        &self.nodes[i]
    }
}

impl IndexMut<usize> for Cluster {
    fn index_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }
}

impl Cluster {
    /// `size` nodes named `<prefix>-1..=size`, seeded to each other, cluster id `<prefix>-cluster`.
    pub fn builder(prefix: &str, size: usize) -> ClusterBuilder {
        ClusterBuilder {
            prefix: prefix.into(),
            size,
            cluster_id: format!("{prefix}-cluster"),
            config: None,
            args: Vec::new(),
            secret: None,
            data_dirs: false,
            seeded: true,
            per_node: Vec::new(),
            per_node_config: Vec::new(),
            hosts: Vec::new(),
            proxy_port: None,
            wrappers: Vec::new(),
            gossip_debug: false,
        }
    }

    async fn start_nodes(&self) -> anyhow::Result<Vec<Node>> {
        let gossip: Vec<SocketAddr> =
            (1..=self.spec.size).map(|i| SocketAddr::new(self.spec.host(i), free_port())).collect();
        let mut set = tokio::task::JoinSet::new();
        for (i, g) in gossip.iter().enumerate() {
            let b = self.spec.node_builder(i + 1, *g, &gossip, self.dir.path());
            set.spawn(async move { (i, b.start().await) });
        }
        let mut nodes: Vec<Option<Node>> = (0..self.spec.size).map(|_| None).collect();
        let mut first_error = None;
        while let Some(r) = set.join_next().await {
            let (i, r) = r.context("node start task panicked")?;
            match r {
                Ok(n) => nodes[i] = Some(n),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(nodes.into_iter().map(|n| n.expect("every node started")).collect())
    }

    /// The cluster id the nodes run with.
    pub fn cluster_id(&self) -> &str {
        &self.spec.cluster_id
    }

    /// The secret file, when the cluster has a secret.
    pub fn secret_file(&self) -> Option<PathBuf> {
        self.spec.secret.as_ref().map(|_| self.dir.path().join("secret"))
    }

    /// The cluster's own temp dir (secret, data dirs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node ids, in order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.id.clone()).collect()
    }

    /// Gossip addresses of the nodes (usable as `--seed`).
    pub fn gossip_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.gossip).collect()
    }

    /// A builder for an extra node of this cluster: same cluster id, config, flags, secret
    /// and (if any) data dir scheme, seeded with the current nodes' gossip addresses.
    pub fn extra_node(&self, i: usize) -> NodeBuilder {
        self.spec.node_builder(
            i,
            SocketAddr::new(self.spec.host(i), free_port()),
            &self.gossip_addrs(),
            self.dir.path(),
        )
    }

    /// `shoal` pointed at node `i` (0-based), with the cluster's secret file if it has one.
    pub fn shoal(&self, i: usize) -> Shoal {
        let s = Shoal::at(self.nodes[i].control);
        match self.secret_file() {
            Some(p) => s.secret_file(&p),
            None => s,
        }
    }

    /// Waits until every node sees every node `alive`; returns how long that took.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let observers: Vec<&Node> = self.nodes.iter().collect();
        let ids = self.ids();
        wait_members(&observers, &ids.iter().map(|i| (i.as_str(), "alive")).collect::<Vec<_>>(), timeout).await
    }

    /// Waits until member `id` is in `state` on every node of `observers`; returns how long
    /// that took (an error after `timeout`, naming what each observer saw).
    pub async fn wait_member(
        &self,
        observers: &[&Node],
        id: &str,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        wait_members(observers, &[(id, state)], timeout).await
    }

    /// Stops every node with SIGTERM at once; each must leave and exit 0 within 20 s. Start
    /// them again with [`Cluster::restart_node`].
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        for n in &self.nodes {
            n.signal(Signal::Term)?;
        }
        for n in &mut self.nodes {
            let status = n.wait_exit(Duration::from_secs(20)).await?;
            if !status.success() {
                bail!("node {} exited with {status} after SIGTERM; log:\n{}", n.id, n.log());
            }
        }
        Ok(())
    }

    /// Starts node `i` (1-based) again after [`Cluster::stop_all`] (or a kill), seeded with
    /// the gossip addresses of the nodes that run now, on a fresh gossip port. Replaces
    /// `self.nodes[i - 1]` and returns it.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<&Node> {
        let running: Vec<SocketAddr> = self
            .nodes
            .iter_mut()
            .enumerate()
            .filter(|(k, _)| *k != i - 1)
            .filter_map(|(_, n)| n.exited().is_none().then_some(n.gossip))
            .collect();
        let g = SocketAddr::new(self.spec.host(i), free_port());
        let mut seeds = running;
        seeds.push(g);
        let node = self.spec.node_builder(i, g, &seeds, self.dir.path()).start().await?;
        self.nodes[i - 1] = node;
        Ok(&self.nodes[i - 1])
    }
}

/// Member id -> state, as `node`'s admin `/status` shows them.
pub async fn member_states(node: &Node) -> anyhow::Result<BTreeMap<String, String>> {
    let s = node.status_json().await?;
    Ok(s["members"]
        .as_array()
        .context("/status has no members array")?
        .iter()
        .filter_map(|m| Some((m["id"].as_str()?.to_string(), m["state"].as_str()?.to_string())))
        .collect())
}

/// Waits until every observer shows every `(id, state)`; returns the time it took.
pub async fn wait_members(observers: &[&Node], want: &[(&str, &str)], timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    loop {
        let mut ok = true;
        last.clear();
        for o in observers {
            let states = member_states(o).await.unwrap_or_default();
            if !want.iter().all(|(id, st)| states.get(*id).map(String::as_str) == Some(*st)) {
                ok = false;
            }
            last.push((o.id.clone(), states));
            if !ok {
                break;
            }
        }
        if ok {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for members {want:?}; last seen: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one `shoal` run produced.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// stdout parsed as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("shoal stdout is not JSON: {self:?}"))
    }
}

/// `target/debug/shoal --node ADDR [--json] [--secret-file F] ...`.
#[derive(Debug, Clone)]
pub struct Shoal {
    node: String,
    json: bool,
    secret_file: Option<PathBuf>,
    timeout: Duration,
}

impl Shoal {
    /// Against the control address `node`, with `--json`, no secret, a 20 s timeout.
    pub fn at(node: SocketAddr) -> Shoal {
        Shoal { node: node.to_string(), json: true, secret_file: None, timeout: Duration::from_secs(20) }
    }

    /// `--secret-file PATH`.
    pub fn secret_file(mut self, p: &Path) -> Self {
        self.secret_file = Some(p.to_path_buf());
        self
    }

    /// No `--secret-file`.
    pub fn no_secret(mut self) -> Self {
        self.secret_file = None;
        self
    }

    /// Human output (no `--json`).
    pub fn human(mut self) -> Self {
        self.json = false;
        self
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bins::shoal());
        cmd.arg("--node").arg(&self.node);
        if self.json {
            cmd.arg("--json");
        }
        if let Some(p) = &self.secret_file {
            cmd.arg("--secret-file").arg(p);
        }
        cmd.args(args).env_remove("SHOAL_NODE").env_remove("SHOAL_SECRET_FILE").stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Runs `shoal <args>` to completion (killed and an error after the timeout).
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().with_context(|| format!("spawn {}", bins::shoal().display()))?;
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .with_context(|| format!("shoal --node {} {args:?} still running after {:?}", self.node, self.timeout))??;
        Ok(CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `shoal <args>`, requires exit 0, and parses stdout as JSON.
    pub async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.run(args).await?;
        if out.code != 0 {
            bail!("shoal --node {} {args:?} exited {}: {}{}", self.node, out.code, out.stdout, out.stderr);
        }
        out.json()
    }

    /// Starts `shoal <args>` with stdout piped and stderr inherited (killed when dropped).
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<tokio::process::Child> {
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        cmd.spawn().with_context(|| format!("spawn {}", bins::shoal().display()))
    }
}

/// The entry of backend `addr` in a JSON array of backends (CLI) or `/status`'s `backends`.
pub fn find_backend(backends: &Value, addr: SocketAddr) -> Option<&Value> {
    let want = addr.to_string();
    backends.as_array()?.iter().find(|b| b["addr"].as_str() == Some(want.as_str()))
}

/// The `/status` entry of backend `addr` on `node` (`Null` when absent or unreadable).
pub async fn backend_entry(node: &Node, addr: SocketAddr) -> Value {
    match node.status_json().await {
        Ok(s) => find_backend(&s["backends"], addr).cloned().unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Waits until `pred` holds for backend `addr`'s `/status` entry on every observer; returns
/// the time it took.
pub async fn wait_backend(
    observers: &[&Node],
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        seen.clear();
        for o in observers {
            seen.push((o.id.clone(), backend_entry(o, addr).await));
        }
        if seen.iter().all(|(_, e)| pred(e)) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("timed out after {timeout:?} waiting until backend {addr} {what}; last seen: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
