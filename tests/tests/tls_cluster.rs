//! HTTPS across a cluster and TLS to backends, held to their promises with real `shoald` and
//! `shoal` processes, real clients (curl, `openssl s_client`, rustls) and certificates from a
//! test CA (so a wrong certificate fails a verifying client, not just a string comparison).
//!
//! 1. Cluster certificates: `shoal cert add` on one node of three (none has a certificate file)
//!    is served by every node within seconds (curl verifies chain and name through each);
//!    `cert list --json`, `/status` `tls.certificates` and `shoal_tls_certificate_expiry_days`
//!    show it (`source = cluster`, days left); a certificate of the same name added later on
//!    another node replaces it everywhere (one entry, the new expiry); the node that merged it
//!    by gossip persisted it and, restarted alone (nobody left to gossip with), serves it from
//!    its first handshake; `shoal cert remove` on the third node stops every node serving it,
//!    and the removal survives a restart. A node without `[tls]` lists them as not served
//!    there; a node joining later with an empty data dir serves them.
//! 2. Refusals: `cert add` without a cluster secret (CLI without `--secret-file`, node without
//!    one); a key of another certificate, an expired certificate, files that are no
//!    certificate or no key, a missing file, another secret: non-zero exit naming the problem
//!    and nothing added; `cert remove` of an unknown name exits 3.
//! 3. TLS to backends (`[upstream] tls`): plain and HTTPS clients are answered by a TLS backend
//!    (SNI `backend.internal`, verified against `ca_file`) over one kept-alive TLS connection;
//!    WebSocket upgrades through it echo; an `sni` the certificate does not carry, or a
//!    certificate of another CA, gets 502 and a warning naming TLS and the reason;
//!    `verify = false` takes the other CA's certificate; without `sni` the backend's IP is
//!    verified; `shoald check` names a missing or junk `ca_file`.
//! 4. TLS metrics: full and resumed handshakes and a failed one are counted exactly
//!    (`shoal_tls_handshakes_total`, `shoal_tls_resumed_handshakes_total`,
//!    `shoal_tls_handshake_failures_total{cause}`), and `/status` `tls` agrees.
//! 5. A chain with a CA bundle appended (about 60 KB) is refused or spreads, and either way
//!    does not stop the node's later gossip. FAILS on the current node: `cert add` takes it,
//!    its gossip value is larger than a gossip datagram, so it never leaves node 1, and every
//!    key node 1 publishes after it (certificates, registry entries) is stuck behind it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use serde_json::Value;
use shoal_tests::tls::{
    ALL_VERSIONS, KeyKind, Leaf, Ran, TestCa, TlsBackend, client_config, connect, curl, get_request, peer_leaf,
    read_response, s_client, s_client_subject, unix_now,
};
use shoal_tests::{Backend, Cluster, Node, Shoal, TempDir, free_port, shoald_check, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

const SECRET: &str = "tls-cluster-secret-of-32-bytes!!";
const OTHER_SECRET: &str = "another-secret-nobody-here-uses!";
const DAY: i64 = 86_400;
/// How long every node may take to serve (or stop serving) a cluster certificate after the
/// `shoal` call returned: a few gossip rounds (150 ms each) plus slack for a loaded machine.
const SPREAD: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The certificate a verifying rustls client (no resumption) gets for `name` at `addr`; an
/// error when the handshake fails (no certificate, or one that does not verify).
async fn served(addr: SocketAddr, name: &str, cfg: &Arc<rustls::ClientConfig>) -> anyhow::Result<Vec<u8>> {
    let s = connect(addr, name, cfg).await?;
    peer_leaf(&s).context("the server presented no certificate")
}

/// Waits until a handshake for `name` gets `want` (`Some(DER)`), or fails (`None`), on every
/// one of `addrs`; returns how long each took.
async fn wait_served(
    addrs: &[SocketAddr],
    name: &str,
    cfg: &Arc<rustls::ClientConfig>,
    want: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let start = Instant::now();
    let mut took = vec![None; addrs.len()];
    loop {
        let mut last = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            if took[i].is_some() {
                continue;
            }
            let got = served(*addr, name, cfg).await;
            let ok = match (&got, want) {
                (Ok(der), Some(w)) => der.as_slice() == w,
                (Err(_), None) => true,
                _ => false,
            };
            if ok {
                took[i] = Some(start.elapsed());
            } else {
                last.push(format!(
                    "{addr}: {}",
                    got.map_or_else(|e| format!("{e:#}"), |_| "another certificate".into())
                ));
            }
        }
        if took.iter().all(Option::is_some) {
            return Ok(took.into_iter().flatten().collect());
        }
        if start.elapsed() > timeout {
            let what = if want.is_some() { "serve the certificate" } else { "refuse the handshake" };
            bail!("not every node did {what} for {name} within {timeout:?}: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `curl -v --cacert CA --resolve NAME:PORT:127.0.0.1 https://NAME:PORT/`.
async fn curl_name(port: u16, name: &str, ca: &Path) -> anyhow::Result<Ran> {
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("https://{name}:{port}/");
    curl(&["-v", "--cacert", path_str(ca), "--resolve", &resolve, &url]).await
}

/// The rows of a `shoal cert ... --json` answer.
fn cert_rows(v: &Value) -> Vec<Value> {
    v["certs"].as_array().cloned().unwrap_or_default()
}

/// The rows named `name`.
fn rows_named(rows: &[Value], name: &str) -> Vec<Value> {
    rows.iter().filter(|r| r["name"] == name).cloned().collect()
}

/// `/status` `tls.certificates` of a node.
async fn status_certs(node: &Node) -> anyhow::Result<Vec<Value>> {
    let s = node.status_json().await?;
    ensure!(s["tls"].is_object(), "/status has no tls section: {s}");
    Ok(s["tls"]["certificates"].as_array().cloned().unwrap_or_default())
}

/// The cluster certificates a node persisted in `data_dir/shoal-state.bin` (format 3:
/// `format, generation, registry, certs, routes`), read with mirror types so the test waits until a
/// node has written what it merged instead of sleeping.
#[derive(Debug, Deserialize)]
struct PersistedState {
    format: u32,
    _generation: u64,
    _registry: Vec<shoal_tests::state::RegEntry>,
    certs: Vec<PersistedCert>,
}

#[derive(Debug, Clone, Deserialize)]
struct PersistedCert {
    name: String,
    _hlc: u64,
    op: PersistedOp,
    origin: String,
    _sealed: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum PersistedOp {
    Add,
    Remove,
}

fn persisted_cert(data_dir: &Path, name: &str) -> Option<PersistedCert> {
    let bytes = std::fs::read(data_dir.join("shoal-state.bin")).ok()?;
    let (state, _): (PersistedState, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).ok()?;
    if state.format != 3 {
        return None;
    }
    state.certs.into_iter().find(|c| c.name == name)
}

/// A TOML `[tls]` table listening on `port` with no certificate files.
fn tls_listen(port: u16) -> String {
    format!("[tls]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// Writes `leaf` as `NAME.pem` and `NAME.key` in `dir`; returns both paths.
fn write_pair(dir: &TempDir, name: &str, leaf: &Leaf) -> anyhow::Result<(PathBuf, PathBuf)> {
    Ok((dir.write(&format!("{name}.pem"), &leaf.cert_pem)?, dir.write(&format!("{name}.key"), &leaf.key_pem)?))
}

// ---------------------------------------------------------------------------------------------
// 1. Cluster certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_certificates_spread_persist_replace_and_go_away() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let now = unix_now();
    // An hour past whole days, so `days_left` is exactly 90 (then 200) for the test's length.
    let first_until = now + 90 * DAY + 3600;
    let second_until = now + 200 * DAY + 3600;
    let first = ca.leaf_until("shop.test", &["shop.test", "www.shop.test"], first_until)?;
    let second = ca.leaf_until("shop.test", &["shop.test", "www.shop.test"], second_until)?;
    let files = TempDir::new("tlsc-files")?;
    let ca_file = files.write("ca.pem", &ca.pem)?;
    let (cert1, key1) = write_pair(&files, "first", &first)?;
    let (cert2, key2) = write_pair(&files, "second", &second)?;

    let backend = Backend::start("shop").await?;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut builder = Cluster::builder("tlsc", 3).secret(SECRET).data_dirs().backend(&backend);
    for (i, p) in ports.iter().enumerate() {
        builder = builder.node_config(i + 1, &tls_listen(*p));
    }
    let mut c = builder.start().await?;
    c.wait_converged(Duration::from_secs(15)).await?;
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| local(*p)).collect();
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;

    // No node has a certificate yet: a handshake for shop.test fails everywhere.
    for (i, a) in addrs.iter().enumerate() {
        let r = served(*a, "shop.test", &cfg).await;
        assert!(r.is_err(), "node {} serves something before any certificate was added", i + 1);
        assert!(status_certs(&c[i]).await?.is_empty(), "node {}: no certificate in /status yet", i + 1);
    }

    // Added on node 1: every node serves it within seconds.
    let added = c.shoal(0).json(&["cert", "add", "--cert", path_str(&cert1), "--key", path_str(&key1)]).await?;
    println!("cert add: {added}");
    assert!(added["message"].as_str().unwrap_or_default().contains("shop.test"), "{added}");
    let took = wait_served(&addrs, "shop.test", &cfg, Some(&first.der), SPREAD).await?;
    println!("cluster certificate served by nodes 1..3 after {took:?}");
    for (i, p) in ports.iter().enumerate() {
        for name in ["shop.test", "www.shop.test"] {
            let out = curl_name(*p, name, &ca_file).await?;
            assert!(out.status.success() && out.stdout == "shop", "node {}: curl {name}: {out:?}", i + 1);
            assert!(out.stderr.contains("subject: CN=shop.test\n"), "node {}: CN=shop.test: {out:?}", i + 1);
        }
    }

    // What node 3 (which only heard of it by gossip) says of it.
    let list = c.shoal(2).json(&["cert", "list"]).await?;
    let rows = rows_named(&cert_rows(&list), "shop.test");
    assert_eq!(rows.len(), 1, "node 3 lists shop.test once: {list}");
    let row = &rows[0];
    assert_eq!(row["source"], "cluster", "{row}");
    assert_eq!(row["days_left"], 90, "{row}");
    assert_eq!(row["not_after"], first_until, "{row}");
    assert_eq!(row["names"], serde_json::json!(["shop.test", "www.shop.test"]), "{row}");
    assert_eq!(row["error"], "", "{row}");
    assert!(row["issuer"].as_str().unwrap_or_default().contains("shoal test CA"), "{row}");
    for (i, node) in c.nodes.iter().enumerate() {
        let certs = status_certs(node).await?;
        let shop = rows_named(&certs, "shop.test");
        assert!(
            shop.len() == 1 && shop[0]["source"] == "cluster" && shop[0]["days_left"] == 90,
            "node {}: /status tls.certificates: {certs:?}",
            i + 1
        );
        let days =
            node.metric("shoal_tls_certificate_expiry_days", &[("name", "shop.test"), ("source", "cluster")]).await;
        assert_eq!(days, Some(90.0), "node {}: shoal_tls_certificate_expiry_days", i + 1);
    }

    // A certificate of the same name with a later expiry, added on node 3, replaces it.
    let replaced = c.shoal(2).json(&["cert", "add", "--cert", path_str(&cert2), "--key", path_str(&key2)]).await?;
    println!("cert add (renewed): {}", replaced["message"]);
    let took = wait_served(&addrs, "shop.test", &cfg, Some(&second.der), SPREAD).await?;
    println!("renewed certificate served by nodes 1..3 after {took:?}");
    for (i, node) in c.nodes.iter().enumerate() {
        let list = c.shoal(i).json(&["cert", "list"]).await?;
        let rows = rows_named(&cert_rows(&list), "shop.test");
        assert!(
            rows.len() == 1 && rows[0]["days_left"] == 200 && rows[0]["not_after"] == second_until,
            "node {}: one shop.test, the renewed one: {list}",
            i + 1
        );
        let days =
            node.metric("shoal_tls_certificate_expiry_days", &[("name", "shop.test"), ("source", "cluster")]).await;
        assert_eq!(days, Some(200.0), "node {}: expiry metric of the renewed certificate", i + 1);
    }

    // Node 2 merged the renewal by gossip and wrote it to its data dir.
    let data2 = c.dir().join(format!("data-{}", c[1].id));
    let origin3 = c[2].id.clone();
    wait_until(SPREAD, "node 2 persisted the renewed certificate", async || {
        persisted_cert(&data2, "shop.test").is_some_and(|e| e.op == PersistedOp::Add && e.origin == origin3)
    })
    .await?;

    // Every node stops; node 2 starts again alone (its only seed is itself): its very first
    // handshake gets the certificate, which only its data dir can have given it.
    for i in [0, 2, 1] {
        c[i].kill9();
    }
    let started = Instant::now();
    c.restart_node(2).await?;
    let first_handshake = served(addrs[1], "shop.test", &cfg).await;
    println!("node 2 restarted alone: first handshake {:?} after start", started.elapsed());
    assert_eq!(
        first_handshake.context("node 2's first handshake after a restart")?,
        second.der,
        "node 2 serves the persisted certificate right after start"
    );
    let members = shoal_tests::cluster::member_states(&c[1]).await?;
    assert!(
        members.iter().all(|(id, state)| id == &c[1].id || state != "alive"),
        "node 2 restarted alone: {members:?}"
    );
    let out = curl_name(ports[1], "shop.test", &ca_file).await?;
    assert!(out.status.success() && out.stdout == "shop", "node 2 alone: {out:?}");

    // The others come back; the removal is made on node 3 and every node stops serving it.
    c.restart_node(1).await?;
    c.restart_node(3).await?;
    c.wait_converged(Duration::from_secs(15)).await?;
    wait_served(&addrs, "shop.test", &cfg, Some(&second.der), SPREAD).await?;
    let removed = c.shoal(2).json(&["cert", "remove", "shop.test"]).await?;
    println!("cert remove: {}", removed["message"]);
    let took = wait_served(&addrs, "shop.test", &cfg, None, SPREAD).await?;
    println!("removed certificate no longer served by nodes 1..3 after {took:?}");
    let request = get_request("shop.test", "/", true);
    for (i, a) in addrs.iter().enumerate() {
        let out = s_client(*a, &["-servername", "shop.test"], request.as_bytes()).await?;
        assert!(
            out.both().contains("no peer certificate available") && !out.stdout.contains("HTTP/1.1 200"),
            "node {}: no certificate after the removal: {out:?}",
            i + 1
        );
        let out = curl_name(ports[i], "shop.test", &ca_file).await?;
        assert!(!out.status.success() && out.stdout.is_empty(), "node {}: curl fails: {out:?}", i + 1);
        let list = c.shoal(i).json(&["cert", "list"]).await?;
        assert!(rows_named(&cert_rows(&list), "shop.test").is_empty(), "node {}: listed after removal: {list}", i + 1);
        assert!(status_certs(&c[i]).await?.is_empty(), "node {}: /status after removal", i + 1);
        let days = c[i].metric("shoal_tls_certificate_expiry_days", &[("name", "shop.test")]).await;
        assert_eq!(days, None, "node {}: no expiry metric after removal", i + 1);
    }

    // The removal is persisted too: node 2 restarted alone again does not serve it.
    let origin3 = c[2].id.clone();
    wait_until(SPREAD, "node 2 persisted the removal", async || {
        persisted_cert(&data2, "shop.test").is_some_and(|e| e.op == PersistedOp::Remove && e.origin == origin3)
    })
    .await?;
    for i in [0, 2, 1] {
        c[i].kill9();
    }
    c.restart_node(2).await?;
    let r = served(addrs[1], "shop.test", &cfg).await;
    assert!(r.is_err(), "node 2 restarted alone after the removal serves nothing for shop.test");
    let list = c.shoal(1).json(&["cert", "list"]).await?;
    assert!(cert_rows(&list).is_empty(), "node 2 lists nothing: {list}");
    Ok(())
}

/// A node without `[tls]` keeps the cluster's certificates (and says it does not serve them);
/// a node that joins later, with an empty data dir, gets them from the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_tls_lists_them_unserved_and_a_joiner_gets_them() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("join.test", &["join.test"], KeyKind::EcdsaP256).await?;
    let files = TempDir::new("tlsc-join")?;
    let (cert, key) = write_pair(&files, "join", &leaf)?;
    let port1 = free_port();
    let c = Cluster::builder("tlsc-join", 2).secret(SECRET).node_config(1, &tls_listen(port1)).start().await?;
    c.wait_converged(Duration::from_secs(15)).await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    c.shoal(0).json(&["cert", "add", "--cert", path_str(&cert), "--key", path_str(&key)]).await?;
    wait_served(&[local(port1)], "join.test", &cfg, Some(&leaf.der), SPREAD).await?;

    // Node 2 has no [tls]: it lists the certificate as the cluster's, not served here.
    let mut last = Value::Null;
    let listed = wait_until(SPREAD, "node 2 lists join.test", async || {
        last = c.shoal(1).json(&["cert", "list"]).await.unwrap_or_default();
        !rows_named(&cert_rows(&last), "join.test").is_empty()
    })
    .await;
    listed.with_context(|| format!("node 2's list: {last}"))?;
    let row = &rows_named(&cert_rows(&last), "join.test")[0];
    println!("node 2 (no [tls]) lists: {row}");
    assert_eq!(row["source"], "cluster", "{row}");
    assert!(row["error"].as_str().unwrap_or_default().contains("no [tls]"), "says why it is not served: {row}");
    let s = c[1].status_json().await?;
    assert!(s["tls"].is_null(), "no tls section without [tls]: {}", s["tls"]);

    // A third node joins later with [tls] and nothing on disk: it serves the certificate.
    let port3 = free_port();
    let joiner = c.extra_node(3).config(tls_listen(port3)).start().await?;
    let took = wait_served(&[local(port3)], "join.test", &cfg, Some(&leaf.der), SPREAD).await?;
    println!("a joiner serves the cluster certificate {:?} after it started", took[0]);
    let out = curl_name(port3, "join.test", &files.write("ca.pem", &ca.pem)?).await?;
    assert!(out.stderr.contains("subject: CN=join.test\n"), "{out:?}");
    drop(joiner);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Refusals
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_add_without_a_cluster_secret_is_refused() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("nosecret.test", &["nosecret.test"], KeyKind::EcdsaP256).await?;
    let files = TempDir::new("tlsc-nosecret")?;
    let (cert, key) = write_pair(&files, "leaf", &leaf)?;
    let some_secret = files.write("secret", SECRET)?;
    let port = free_port();
    let c = Cluster::builder("tlsc-nosecret", 2).config(&tls_listen(port)).start().await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let add = ["cert", "add", "--cert", path_str(&cert), "--key", path_str(&key)];

    // The CLI without --secret-file cannot seal it.
    let out = c.shoal(0).run(&add).await?;
    println!("cert add, no --secret-file: {}", out.stderr.trim());
    assert!(out.code != 0 && out.stderr.contains("secret"), "{out:?}");
    // With one, the node (which has no secret) refuses: it could not open or store it.
    let out = c.shoal(0).secret_file(&some_secret).run(&add).await?;
    println!("cert add, node without a secret: {}", out.stderr.trim());
    assert!(out.code != 0 && out.stderr.contains("need a cluster secret"), "{out:?}");

    for i in 0..2 {
        let list = c.shoal(i).json(&["cert", "list"]).await?;
        assert!(cert_rows(&list).is_empty(), "node {}: nothing added: {list}", i + 1);
    }
    assert!(served(local(port), "nosecret.test", &cfg).await.is_err(), "nothing served");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_and_wrong_secrets_are_refused_and_nothing_is_added() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let good = ca.leaf("good.test", &["good.test"], KeyKind::EcdsaP256).await?;
    let other = ca.leaf("good.test", &["good.test"], KeyKind::EcdsaP256).await?;
    let expired = ca.expired_leaf("old.test", &["old.test"]).await?;
    let files = TempDir::new("tlsc-refusals")?;
    let (good_cert, good_key) = write_pair(&files, "good", &good)?;
    let (_, other_key) = write_pair(&files, "other", &other)?;
    let (old_cert, old_key) = write_pair(&files, "old", &expired)?;
    let junk = files.write("junk.txt", "this is neither a certificate nor a key\n")?;
    let missing = files.path().join("missing.pem");
    let other_secret = files.write("other-secret", OTHER_SECRET)?;
    let port = free_port();
    let c = Cluster::builder("tlsc-refuse", 1).secret(SECRET).config(&tls_listen(port)).start().await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;

    let p = path_str;
    // (what, shoal, cert, key, what stderr must say)
    let cases: Vec<(&str, Shoal, &Path, &Path, &str)> = vec![
        ("the key of another certificate", c.shoal(0), &good_cert, &other_key, "does not belong"),
        ("an expired certificate", c.shoal(0), &old_cert, &old_key, "expired on 2021-01-01"),
        ("a certificate file with no certificate", c.shoal(0), &junk, &good_key, "no certificate"),
        ("a key file with no key", c.shoal(0), &good_cert, &junk, "no private key"),
        ("the certificate as the key", c.shoal(0), &good_cert, &good_cert, "no private key"),
        ("a missing certificate file", c.shoal(0), &missing, &good_key, p(&missing)),
        ("a missing key file", c.shoal(0), &good_cert, &missing, p(&missing)),
        ("another secret", c.shoal(0).secret_file(&other_secret), &good_cert, &good_key, "wrong token"),
        ("no secret", c.shoal(0).no_secret(), &good_cert, &good_key, "secret"),
    ];
    for (what, shoal, cert, key, says) in cases {
        let out = shoal.run(&["cert", "add", "--cert", p(cert), "--key", p(key)]).await?;
        println!("cert add, {what}: exit {}: {}", out.code, out.stderr.trim());
        assert!(out.code != 0, "{what}: refused: {out:?}");
        assert!(out.stderr.contains(says), "{what}: says {says:?}: {out:?}");
        let list = c.shoal(0).json(&["cert", "list"]).await?;
        assert!(cert_rows(&list).is_empty(), "{what}: nothing added: {list}");
    }
    assert!(served(local(port), "good.test", &cfg).await.is_err(), "nothing is served");

    // The same node and CLI take a good pair (so the refusals above were about the files).
    c.shoal(0).json(&["cert", "add", "--cert", p(&good_cert), "--key", p(&good_key)]).await?;
    wait_served(&[local(port)], "good.test", &cfg, Some(&good.der), SPREAD).await?;

    // Removing a name the cluster does not have: exit 3 (not found), nothing changes.
    let out = c.shoal(0).run(&["cert", "remove", "nope"]).await?;
    println!("cert remove nope: exit {}: {}", out.code, out.stderr.trim());
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("nope"), "{out:?}");
    let list = c.shoal(0).json(&["cert", "list"]).await?;
    assert_eq!(rows_named(&cert_rows(&list), "good.test").len(), 1, "{list}");
    assert_eq!(served(local(port), "good.test", &cfg).await?, good.der);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. TLS to backends
// ---------------------------------------------------------------------------------------------

/// A node in front of `backend` with `[upstream]` lines `upstream` (`{dir}/ca.pem` is the test
/// CA), one proxy worker (so one idle pool), and HTTPS for `front.test` on a free port.
async fn upstream_tls_node(
    id: &str,
    ca: &TestCa,
    front: &Leaf,
    backend: SocketAddr,
    upstream: &str,
) -> anyhow::Result<(Node, u16)> {
    let port = free_port();
    let config = format!(
        "[node]\nworkers = 1\n[upstream]\n{upstream}\n[[upstream.backend]]\naddr = \"{backend}\"\n\
         [tls]\nlisten = \"127.0.0.1:{port}\"\n\
         certificates = [{{ cert = \"{{dir}}/front.pem\", key = \"{{dir}}/front.key\" }}]\n"
    );
    let node = Node::builder(id)
        .file("ca.pem", &ca.pem)
        .file("front.pem", &front.cert_pem)
        .file("front.key", &front.key_pem)
        .config(config)
        .start()
        .await?;
    Ok((node, port))
}

const VERIFIED: &str = "tls = true\nsni = \"backend.internal\"\nca_file = \"{dir}/ca.pem\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_a_tls_backend_over_one_kept_alive_connection() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let front = ca.leaf("front.test", &["front.test"], KeyKind::EcdsaP256).await?;
    let bleaf = ca.leaf("backend.internal", &["backend.internal"], KeyKind::EcdsaP256).await?;
    let b = TlsBackend::start("tls-backend", &bleaf).await?;
    let (node, port) = upstream_tls_node("up-tls", &ca, &front, b.addr, VERIFIED).await?;
    let ca_file = node.dir().join("ca.pem");

    // Plain HTTP: three requests on one client connection, then two more on new ones.
    let urls: Vec<String> = (1..=3).map(|i| format!("http://{}/plain?n={i}", node.proxy)).collect();
    let mut args = vec!["-w", "|%{http_code}\n"];
    args.extend(urls.iter().map(String::as_str));
    let out = curl(&args).await?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "tls-backend conn=1|200\n".repeat(3), "answered by the TLS backend: {out:?}");
    for i in 4..=5 {
        let out = curl(&[&format!("http://{}/plain?n={i}", node.proxy)]).await?;
        assert!(out.status.success() && out.stdout == "tls-backend conn=1", "plain request {i}: {out:?}");
    }
    // HTTPS clients (HTTP/1.1 and HTTP/2): the same backend connection.
    let resolve = format!("front.test:{port}:127.0.0.1");
    for flag in ["--http1.1", "--http2"] {
        let url = format!("https://front.test:{port}/secure{flag}");
        let out = curl(&[flag, "--cacert", path_str(&ca_file), "--resolve", &resolve, &url]).await?;
        assert!(out.status.success() && out.stdout == "tls-backend conn=1", "HTTPS {flag}: {out:?}");
    }

    let seen = b.requests();
    println!(
        "TLS backend: {} requests on {} connections, {} handshakes, SNI {:?}",
        seen.len(),
        b.connections(),
        b.handshakes(),
        b.sni()
    );
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert_eq!((b.connections(), b.handshakes()), (1, 1), "one kept-alive TLS connection for every request");
    assert!(seen.iter().all(|r| r.conn == 1), "{seen:?}");
    assert_eq!(b.sni(), vec![Some("backend.internal".to_string())], "the node sends the configured SNI");
    let proto: Vec<Option<&str>> = seen.iter().map(|r| r.header("x-forwarded-proto")).collect();
    assert_eq!(proto, [[Some("http"); 5].as_slice(), &[Some("https"); 2]].concat(), "{seen:?}");
    assert!(b.failed_handshakes().is_empty(), "{:?}", b.failed_handshakes());

    // A WebSocket through the TLS backend, from a plain client and from an HTTPS one.
    // (Over TLS the Host is a name of the certificate the SNI chose: another gets 421.)
    let upgrade = |host: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let mut tcp = TcpStream::connect(node.proxy).await?;
    ws_echo(&mut tcp, &upgrade("ws.test"), "plain client").await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let mut tls = connect(local(port), "front.test", &cfg).await?;
    ws_echo(&mut tls, &upgrade("front.test"), "HTTPS client").await?;
    assert_eq!(b.upgrades(), 2);
    let log = node.log_plain();
    assert!(!log.contains("panicked") && !log.contains("TLS to the backend failed"), "{log}");
    Ok(())
}

/// Sends `upgrade` on `s`, expects 101, then sends a few messages and reads each echoed back.
async fn ws_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, upgrade: &str, who: &str) -> R {
    s.write_all(upgrade.as_bytes()).await?;
    s.flush().await?;
    let mut pending = Vec::new();
    let head = read_response(s, &mut pending, Duration::from_secs(5)).await.with_context(|| format!("{who}: 101"))?;
    ensure!(head.status == 101, "{who}: {head:?}");
    ensure!(pending.is_empty(), "{who}: nothing after the 101 yet: {pending:?}");
    for i in 0..5 {
        let msg = format!("{who}: message {i} through a TLS backend");
        s.write_all(msg.as_bytes()).await?;
        s.flush().await?;
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .with_context(|| format!("{who}: echo {i} timed out"))??;
        ensure!(back == msg.as_bytes(), "{who}: echo {i}: {:?}", String::from_utf8_lossy(&back));
    }
    Ok(())
}

/// `GET /` in the clear through `node`: the status and the body.
async fn get_status(node: &Node) -> anyhow::Result<(u16, String)> {
    let out = curl(&["-w", "|%{http_code}", &format!("http://{}/", node.proxy)]).await?;
    ensure!(out.status.success(), "curl: {out:?}");
    let (body, code) = out.stdout.rsplit_once('|').context("no status")?;
    Ok((code.parse()?, body.to_string()))
}

/// The node's WARN lines about TLS to a backend.
fn tls_warnings(node: &Node) -> Vec<String> {
    node.log_plain()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("TLS to the backend failed"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_that_does_not_verify_gets_502_and_a_warning_saying_why() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let stranger = TestCa::new("some other CA")?;
    let front = ca.leaf("front.test", &["front.test"], KeyKind::EcdsaP256).await?;
    let ours =
        TlsBackend::start("ours", &ca.leaf("backend.internal", &["backend.internal"], KeyKind::EcdsaP256).await?)
            .await?;
    let theirs = TlsBackend::start(
        "theirs",
        &stranger.leaf("backend.internal", &["backend.internal"], KeyKind::EcdsaP256).await?,
    )
    .await?;

    // (what, backend, [upstream] lines, the reason the warning must give)
    let wrong_name = "tls = true\nsni = \"api.internal\"\nca_file = \"{dir}/ca.pem\"";
    let cases = [
        ("an SNI name the certificate does not carry", &ours, wrong_name, "not valid for name"),
        ("a certificate of another CA", &theirs, VERIFIED, "UnknownIssuer"),
    ];
    for (i, (what, b, upstream, reason)) in cases.into_iter().enumerate() {
        let (node, _) = upstream_tls_node(&format!("up-bad-{i}"), &ca, &front, b.addr, upstream).await?;
        let (status, body) = get_status(&node).await?;
        println!("TLS backend, {what}: {status}");
        assert_eq!(status, 502, "{what}: {body}");
        wait_until(Duration::from_secs(5), "the warning is logged", async || !tls_warnings(&node).is_empty()).await?;
        let warnings = tls_warnings(&node);
        println!("  {}", warnings[0]);
        assert!(warnings[0].contains(&b.addr.to_string()), "{what}: names the backend: {warnings:?}");
        assert!(warnings[0].contains(reason), "{what}: says {reason:?}: {warnings:?}");
        assert!(b.requests().is_empty(), "{what}: no request reached the backend: {:?}", b.requests());
        // The backend records the aborted handshake when it reads the node's alert, which may
        // come after the node has logged its warning.
        wait_until(Duration::from_secs(5), &format!("{what}: the node aborted the handshake"), async || {
            !b.failed_handshakes().is_empty()
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_false_takes_any_certificate_and_the_default_name_is_the_backend_ip() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let stranger = TestCa::new("some other CA")?;
    let front = ca.leaf("front.test", &["front.test"], KeyKind::EcdsaP256).await?;
    let theirs =
        TlsBackend::start("theirs", &stranger.leaf("x.invalid", &["x.invalid"], KeyKind::Rsa2048).await?).await?;
    let by_ip = TlsBackend::start("by-ip", &ca.leaf("127.0.0.1", &["127.0.0.1"], KeyKind::EcdsaP256).await?).await?;

    // verify = false: a certificate of another CA, for another name, is taken.
    let (node, _) = upstream_tls_node("up-noverify", &ca, &front, theirs.addr, "tls = true\nverify = false").await?;
    assert_eq!(get_status(&node).await?, (200, "theirs conn=1".to_string()));
    assert_eq!(get_status(&node).await?, (200, "theirs conn=1".to_string()), "kept alive");
    assert!(tls_warnings(&node).is_empty());

    // No sni: the backend's IP address is what is verified (and no SNI is sent for an IP).
    let (node, _) =
        upstream_tls_node("up-ip", &ca, &front, by_ip.addr, "tls = true\nca_file = \"{dir}/ca.pem\"").await?;
    assert_eq!(get_status(&node).await?, (200, "by-ip conn=1".to_string()));
    assert_eq!(by_ip.sni(), vec![None], "no SNI for an IP address");
    // ...so a certificate without that IP is refused.
    let (node, _) =
        upstream_tls_node("up-ip-other", &ca, &front, theirs.addr, "tls = true\nca_file = \"{dir}/ca.pem\"").await?;
    assert_eq!(get_status(&node).await?.0, 502);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoald_check_names_a_missing_or_junk_ca_file() -> R {
    let dir = TempDir::new("tlsc-check-ca")?;
    let missing = dir.path().join("no-such-ca.pem");
    let junk = dir.write("junk-ca.pem", "not a certificate at all\n")?;
    let good = dir.write("ca.pem", &TestCa::new("shoal test CA")?.pem)?;
    let toml = |ca: &Path| {
        format!(
            "[upstream]\ntls = true\nca_file = \"{}\"\n[[upstream.backend]]\naddr = \"127.0.0.1:9\"\n",
            ca.display()
        )
    };
    for (what, ca, word) in [("a missing CA file", &missing, "cannot read"), ("a junk CA file", &junk, "no usable CA")]
    {
        let (out, _) = shoald_check(&dir, "shoald.toml", &toml(ca))?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        println!("shoald check, {what}: {}", err.trim());
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(path_str(ca)) && err.contains(word), "{what}: names {}: {err}", ca.display());
    }
    let (out, _) = shoald_check(&dir, "shoald.toml", &toml(&good))?;
    assert!(out.status.success(), "a good CA file passes: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. TLS metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_resumptions_and_failures_are_counted() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("m.test", &["m.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("metrics").await?;
    let port = free_port();
    let node = Node::builder("tls-metrics")
        .file("m.pem", &leaf.cert_pem)
        .file("m.key", &leaf.key_pem)
        .file("ca.pem", &ca.pem)
        .config(format!(
            "[tls]\nlisten = \"127.0.0.1:{port}\"\ncertificates = [{{ cert = \"{{dir}}/m.pem\", key = \"{{dir}}/m.key\" }}]\n"
        ))
        .backend(&backend)
        .start()
        .await?;
    let addr = local(port);
    let counters = async || -> anyhow::Result<[f64; 4]> {
        let text = node.metrics_text().await?;
        let get = |name: &str, labels: &[(&str, &str)]| {
            shoal_tests::node::metric_value(&text, name, labels).with_context(|| format!("no {name} {labels:?}"))
        };
        Ok([
            get("shoal_tls_handshakes_total", &[])?,
            get("shoal_tls_resumed_handshakes_total", &[])?,
            get("shoal_tls_handshake_failures_total", &[("cause", "failed")])?,
            get("shoal_tls_handshake_failures_total", &[("cause", "timeout")])?,
        ])
    };
    assert_eq!(counters().await?, [0.0; 4], "nothing counted before any client");

    // Three full handshakes (rustls, no resumption), each with a request answered.
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    for i in 0..3 {
        let mut s = connect(addr, "m.test", &cfg).await?;
        s.write_all(get_request("m.test", &format!("/full/{i}"), true).as_bytes()).await?;
        s.flush().await?;
        let r = read_response(&mut s, &mut Vec::new(), Duration::from_secs(5)).await?;
        assert_eq!(r.status, 200);
    }
    // A fourth full one that keeps its session, then one that resumes it.
    let dir = TempDir::new("tlsc-metrics-sess")?;
    let sess = dir.path().join("session.pem");
    let ca_file = node.dir().join("ca.pem");
    let base = ["-servername", "m.test", "-CAfile", path_str(&ca_file), "-verify_return_error"];
    let request = get_request("m.test", "/", true);
    let out = s_client(addr, &[&base[..], &["-sess_out", path_str(&sess)]].concat(), request.as_bytes()).await?;
    assert!(out.stdout.contains("HTTP/1.1 200 OK") && out.stdout.contains("\nNew,"), "{out:?}");
    assert_eq!(s_client_subject(&out.both()).as_deref(), Some("CN = m.test"));
    let out = s_client(addr, &[&base[..], &["-sess_in", path_str(&sess)]].concat(), request.as_bytes()).await?;
    assert!(out.stdout.contains("HTTP/1.1 200 OK") && out.stdout.contains("\nReused,"), "resumed: {out:?}");
    let want = [5.0, 1.0, 0.0, 0.0];
    if let Err(e) = wait_until(Duration::from_secs(5), "5 handshakes, 1 resumed", async || {
        counters().await.is_ok_and(|c| c == want)
    })
    .await
    {
        bail!("{e:#}: [handshakes, resumed, failed, timed out] = {:?}", counters().await?);
    }

    // Garbage on the TLS port: one failed handshake, nothing else.
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: m.test\r\n\r\n").await?;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the node closes a connection that sent garbage");
    let want = [5.0, 1.0, 1.0, 0.0];
    if let Err(e) =
        wait_until(Duration::from_secs(5), "one failed handshake", async || counters().await.is_ok_and(|c| c == want))
            .await
    {
        bail!("{e:#}: [handshakes, resumed, failed, timed out] = {:?}", counters().await?);
    }
    let s = node.status_json().await?;
    let tls = &s["tls"];
    assert_eq!(
        (&tls["handshakes"], &tls["resumed"], &tls["failed"], &tls["timed_out"]),
        (&Value::from(5), &Value::from(1), &Value::from(1), &Value::from(0)),
        "/status tls agrees: {tls}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. A certificate chain too large for one gossip datagram
// ---------------------------------------------------------------------------------------------

/// `n` distinct self-signed CA certificates (PEM), like a CA bundle appended to a chain.
fn ca_bundle(n: usize) -> anyhow::Result<String> {
    let mut out = String::new();
    for i in 0..n {
        let c = TestCa::new(&format!("bundled root CA number {i}"))?;
        out.push_str(&c.pem);
    }
    Ok(out)
}

/// A cluster of `n` nodes with the secret and `[tls]` (no certificate files) on free ports.
async fn tls_cluster(prefix: &str, n: usize) -> anyhow::Result<(Cluster, Vec<SocketAddr>)> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut builder = Cluster::builder(prefix, n).secret(SECRET);
    for (i, p) in ports.iter().enumerate() {
        builder = builder.node_config(i + 1, &tls_listen(*p));
    }
    let c = builder.start().await?;
    c.wait_converged(Duration::from_secs(15)).await?;
    Ok((c, ports.into_iter().map(local).collect()))
}

/// A chain file with a CA bundle appended (a common mistake: `cat fullchain.pem bundle.pem`)
/// is about 60 KB: sealed and base64-encoded it is larger than a gossip datagram can carry.
/// The node may refuse it (saying why) or spread it; what it must not do is accept it and then
/// stop gossiping: a certificate added after it on the same node must still reach every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_certificate_chain_does_not_wedge_gossip() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let big = ca.leaf("big.test", &["big.test"], KeyKind::EcdsaP256).await?;
    let small = ca.leaf("small.test", &["small.test"], KeyKind::EcdsaP256).await?;
    let files = TempDir::new("tlsc-big")?;
    let mut big_file = big.clone();
    big_file.cert_pem.push_str(&ca_bundle(100)?);
    let (big_cert, big_key) = write_pair(&files, "big", &big_file)?;
    let (small_cert, small_key) = write_pair(&files, "small", &small)?;
    println!("chain file: {} bytes", big_file.cert_pem.len());
    let (c, addrs) = tls_cluster("tlsc-big", 3).await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;

    let out = c.shoal(0).run(&["cert", "add", "--cert", path_str(&big_cert), "--key", path_str(&big_key)]).await?;
    println!("cert add (60 KB chain): exit {}: {}", out.code, out.stderr.trim());
    let accepted = out.code == 0;
    let big_spread = if accepted {
        Some(wait_served(&addrs, "big.test", &cfg, Some(&big.der), SPREAD).await)
    } else {
        assert!(out.stderr.contains("large") || out.stderr.contains("size"), "refused, saying why: {out:?}");
        None
    };
    // Then (at least a gossip round later) a small certificate and a backend, both on node 1:
    // its gossip must go on.
    c.shoal(0).json(&["cert", "add", "--cert", path_str(&small_cert), "--key", path_str(&small_key)]).await?;
    let b = Backend::start("after-big").await?;
    let b_addr = b.addr.to_string();
    c.shoal(0).json(&["backend", "add", &b_addr]).await?;
    let (small_spread, backend_spread) = tokio::join!(
        wait_served(&addrs, "small.test", &cfg, Some(&small.der), SPREAD),
        wait_until(SPREAD, "every node has the backend added on node 1", async || {
            for n in &c.nodes {
                if !n.backend_addrs().await.unwrap_or_default().contains(&b_addr) {
                    return false;
                }
            }
            true
        }),
    );
    println!("60 KB chain on every node: {big_spread:?}");
    println!("a small certificate added after it: {small_spread:?}");
    println!("a backend added on node 1 after it: {backend_spread:?}");
    let mut failures = Vec::new();
    if let Some(Err(e)) = big_spread {
        failures.push(format!("node 1 accepted the 60 KB chain, but it never reaches nodes 2 and 3: {e:#}"));
    }
    if let Err(e) = small_spread {
        failures.push(format!("a small certificate added on node 1 afterwards does not spread either: {e:#}"));
    }
    if let Err(e) = backend_spread {
        failures.push(format!("a backend added on node 1 afterwards does not spread either: {e:#}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
