//! HTTPS termination (PRODUCT.md §9), held to its promises from outside, with clients nobody on
//! the team wrote: curl, `openssl s_client`, h2load, and rustls where a test must choose which
//! TLS records carry which bytes. Certificates come from a test CA (rcgen), so curl and openssl
//! verify the chain and the name: a wrong certificate fails the request, not just a string
//! comparison.
//!
//! 1. SNI: an RSA certificate for `b.test` (listed first) and an ECDSA one for `a.test` +
//!    `*.wild.test`; each name gets its own (exact, wildcard of one label), a client hello
//!    without SNI or with an unknown name gets the first; requests reach the backend.
//! 2. ALPN: HTTP/2 and HTTP/1.1 (curl, h2load); keep-alive (three URLs, one connection);
//!    pipelined requests in one TLS record (including one that leaves a whole request waiting
//!    decrypted inside the TLS session) and in many records of one TCP segment; request bodies
//!    byte-exact (1 MiB from curl with a length, chunked and over HTTP/2; a head, its body and
//!    the next request in one record); a WebSocket upgrade echoing both ways (small messages,
//!    many records at once, 256 KiB each way).
//! 3. `X-Forwarded-Proto`: `https` over TLS (HTTP/1.1 and HTTP/2), `http` in the clear; what
//!    the client sent in that field is replaced, not passed on.
//! 4. `redirect_http`: 308 to `https://host:TLS_PORT/path?query` with `x-shoal-node`; curl
//!    following it lands on the backend over TLS (a POST stays a POST with its body). The
//!    plain listener redirects HTTP/2 (h2c) requests too, and a request without Host gets no
//!    `location` without a host.
//! 5. Resumption on another node: a session from node 1 resumes on node 2 with the same
//!    cluster secret (TLS 1.3 and 1.2), and not on a node with another secret or none.
//! 6. Certificate files replaced on disk (written aside, renamed over, as certbot and
//!    cert-manager do) under a handshake load: new handshakes get the new certificate within
//!    seconds and no handshake or request fails; a broken file (and SIGHUP with it) keeps the
//!    last good certificate and the log names the file; a good file after it is taken.
//! 7. Bad input: `shoald check` and `shoald run` refuse missing, malformed, mismatched and
//!    expired certificates naming the file (run: before binding anything); junk on the TLS
//!    port is closed at once; silence and half a client hello are closed at
//!    `handshake_timeout`; TLS 1.0/1.1 clients are refused, and TLS 1.2 ones with
//!    `min_version = "1.3"`; the node serves on afterwards.
//! 8. Closing: where the node closes a TLS connection (after `Connection: close`, after a body
//!    delimited by the close, at the keep-alive timeout) it sends close_notify first.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use shoal_tests::http::RawResponse;
use shoal_tests::raw::{RawConn, default_answer};
use shoal_tests::tls::{
    ALL_VERSIONS, KeyKind, Leaf, TestCa, alpn, client_config, client_hello, connect, connect_over, curl, get_request,
    peer_leaf, read_response, run, s_client, s_client_subject,
};
use shoal_tests::{
    Backend, Node, NodeBuilder, RawServer, Signal, TempDir, free_port, pattern, shoald_check, shoald_run_to_exit,
    wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

/// How long after a certificate file changes on disk new handshakes must get it: the node
/// checks every 2 s; the rest is slack for a loaded test machine.
const CERT_SWAP_TARGET: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A node terminating TLS on `tls`, with the test CA's certificate at `ca`.
struct TlsNode {
    node: Node,
    tls: SocketAddr,
    ca: PathBuf,
}

impl TlsNode {
    fn port(&self) -> u16 {
        self.tls.port()
    }

    fn ca(&self) -> &str {
        self.ca.to_str().unwrap_or_default()
    }

    /// `https://NAME:TLS_PORT/PATH` and the `--resolve` that sends NAME to 127.0.0.1.
    fn url(&self, name: &str, path: &str) -> (String, String) {
        (format!("https://{name}:{}{path}", self.port()), resolve(name, self.port()))
    }
}

fn resolve(name: &str, port: u16) -> String {
    format!("{name}:{port}:127.0.0.1")
}

/// The `[tls]` table: listen on `port`, serve `NAME.pem` + `NAME.key` from the node's dir for
/// each of `names` (in that order), then `extra` lines.
fn tls_table(port: u16, names: &[&str], extra: &str) -> String {
    let certs: Vec<String> =
        names.iter().map(|n| format!("{{ cert = \"{{dir}}/{n}.pem\", key = \"{{dir}}/{n}.key\" }}")).collect();
    format!("[tls]\nlisten = \"127.0.0.1:{port}\"\ncertificates = [{}]\n{extra}", certs.join(", "))
}

/// Writes each leaf as `NAME.pem` / `NAME.key` and the CA as `ca.pem` into the node's dir.
fn with_certs(mut b: NodeBuilder, ca: &TestCa, certs: &[(&str, &Leaf)]) -> NodeBuilder {
    for (name, leaf) in certs {
        b = b.file(&format!("{name}.pem"), &leaf.cert_pem).file(&format!("{name}.key"), &leaf.key_pem);
    }
    b.file("ca.pem", &ca.pem)
}

/// Starts node `id` serving `certs` over TLS (in that order) in front of `backend` (an
/// `ADDR` spec), with `tls_extra` lines in `[tls]` and `other` TOML tables before it.
async fn tls_node(
    id: &str,
    ca: &TestCa,
    certs: &[(&str, &Leaf)],
    backend: &str,
    tls_extra: &str,
    other: &str,
) -> anyhow::Result<TlsNode> {
    let port = free_port();
    let names: Vec<&str> = certs.iter().map(|(n, _)| *n).collect();
    let node = with_certs(Node::builder(id), ca, certs)
        .config(format!("{other}\n{}", tls_table(port, &names, tls_extra)))
        .backend_spec(backend)
        .start()
        .await?;
    let ca = node.dir().join("ca.pem");
    Ok(TlsNode { node, tls: SocketAddr::from(([127, 0, 0, 1], port)), ca })
}

/// Writes `contents` to `path` the way certbot and cert-manager replace a file: into a
/// temporary name beside it, then renamed over it (readers see the old file or the new one).
fn replace_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Replaces a node's `NAME.pem` and `NAME.key` with `leaf` (certificate first, then key).
fn replace_pair(dir: &Path, name: &str, leaf: &Leaf) -> anyhow::Result<()> {
    replace_file(&dir.join(format!("{name}.pem")), &leaf.cert_pem)?;
    replace_file(&dir.join(format!("{name}.key")), &leaf.key_pem)
}

/// `GET path` for `host` (keep-alive) padded with an `X-Pad` field to exactly `size` bytes
/// (no padding when `size` is smaller than the request).
fn padded_request(host: &str, path: &str, size: usize) -> String {
    let bare = get_request(host, path, false);
    let field = "X-Pad: \r\n".len();
    if size < bare.len() + field {
        return bare;
    }
    let pad = "p".repeat(size - bare.len() - field);
    let req = bare.replacen("\r\n\r\n", &format!("\r\nX-Pad: {pad}\r\n\r\n"), 1);
    debug_assert_eq!(req.len(), size);
    req
}

/// `openssl s_client`'s session line: `New` or `Reused`.
fn session_kind(out: &str) -> &'static str {
    if out.lines().any(|l| l.starts_with("Reused,")) {
        "Reused"
    } else if out.lines().any(|l| l.starts_with("New,")) {
        "New"
    } else {
        "none"
    }
}

/// N of openssl s_client's `SSL handshake has read R bytes and written N bytes` (0 if absent).
fn handshake_bytes_written(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("SSL handshake has read "))
        .and_then(|l| l.split(" and written ").nth(1))
        .and_then(|w| w.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reads until the peer closes (EOF or reset), at most `max`; how long that took (None: still
/// open at `max`) and what arrived.
async fn until_closed(s: &mut TcpStream, max: Duration) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(start + max), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(start.elapsed()), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (None, got),
        }
    }
}

/// The node still answers over TLS (curl, verified) and in the clear, and has not panicked.
async fn still_serves(t: &TlsNode, name: &str, body: &str) -> R {
    let (url, res) = t.url(name, "/");
    let out = curl(&["--cacert", t.ca(), "--resolve", &res, &url]).await?;
    ensure!(out.status.success() && out.stdout == body, "HTTPS after the test: {out:?}");
    let plain = format!("http://{}/", t.node.proxy);
    let out = curl(&[&plain]).await?;
    ensure!(out.status.success() && out.stdout == body, "plain HTTP after the test: {out:?}");
    let log = t.node.log_plain();
    ensure!(!log.contains("panicked"), "the node panicked:\n{log}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. SNI
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_serves_the_certificate_of_the_name_asked_for() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let a = ca.leaf("a.test", &["a.test", "*.wild.test"], KeyKind::EcdsaP256).await?;
    let b = ca.leaf("b.test", &["b.test"], KeyKind::Rsa2048).await?;
    let backend = Backend::start("sni").await?;
    // b.test is listed first: it is what a client hello without a name that matches gets, so
    // x.wild.test can only get a.test's certificate by its wildcard.
    let t = tls_node("tls-sni", &ca, &[("b", &b), ("a", &a)], &backend.addr.to_string(), "", "").await?;

    // curl checks the chain and the name against the test CA: a request only succeeds when the
    // certificate served covers the name asked for.
    for (name, cn) in [("a.test", "a.test"), ("b.test", "b.test"), ("x.wild.test", "a.test")] {
        let (url, res) = t.url(name, "/");
        let out = curl(&["-v", "--cacert", t.ca(), "--resolve", &res, &url]).await?;
        assert!(out.status.success(), "curl {name}: {out:?}");
        assert_eq!(out.stdout, "sni", "curl {name}: the backend answers: {out:?}");
        assert!(out.stderr.contains(&format!("subject: CN={cn}\n")), "curl {name} gets CN={cn}: {out:?}");
    }

    // openssl, with the key type too: ECDSA P-256 (256 bit) for a.test, RSA 2048 for b.test.
    for (name, cn, bits) in [("a.test", "a.test", 256), ("b.test", "b.test", 2048), ("x.wild.test", "a.test", 256)] {
        let args = ["-servername", name, "-CAfile", t.ca(), "-verify_hostname", name, "-verify_return_error"];
        let out = s_client(t.tls, &args, get_request(name, "/", true).as_bytes()).await?;
        let text = out.both();
        assert_eq!(s_client_subject(&text).as_deref(), Some(format!("CN = {cn}").as_str()), "{name}: {out:?}");
        assert!(text.contains(&format!("Server public key is {bits} bit")), "{name}: {bits}-bit key: {out:?}");
        assert!(text.contains("Verify return code: 0 (ok)"), "{name}: verified: {out:?}");
        assert!(out.stdout.contains("HTTP/1.1 200 OK") && out.stdout.contains("\r\n\r\nsni"), "{name}: {out:?}");
    }

    // No SNI (openssl told not to send it; curl never sends it for an IP address), and a name
    // no certificate has: the first certificate.
    let out = s_client(t.tls, &["-noservername", "-CAfile", t.ca()], get_request("x", "/", true).as_bytes()).await?;
    let text = out.both();
    assert_eq!(s_client_subject(&text).as_deref(), Some("CN = b.test"), "no SNI gets the first: {out:?}");
    assert!(text.contains("Server public key is 2048 bit"), "no SNI: the RSA certificate: {out:?}");
    assert!(out.stdout.contains("HTTP/1.1 200 OK"), "no SNI: still served: {out:?}");
    let url = format!("https://127.0.0.1:{}/", t.port());
    let out = curl(&["-v", "-k", &url]).await?;
    assert!(out.status.success() && out.stdout == "sni", "curl by IP: {out:?}");
    assert!(out.stderr.contains("subject: CN=b.test\n"), "curl by IP (no SNI) gets the first: {out:?}");
    let args = ["-servername", "c.test", "-CAfile", t.ca()];
    let out = s_client(t.tls, &args, get_request("c.test", "/", true).as_bytes()).await?;
    assert_eq!(
        s_client_subject(&out.both()).as_deref(),
        Some("CN = b.test"),
        "an unknown name gets the first: {out:?}"
    );

    // A wildcard covers one label only: a.b.wild.test is not covered, so it gets the first
    // certificate (b.test's) too, and a verifying client refuses it.
    let (url, res) = t.url("a.b.wild.test", "/");
    let out = curl(&["--cacert", t.ca(), "--resolve", &res, &url]).await?;
    assert_eq!(out.status.code(), Some(60), "a.b.wild.test is not covered by *.wild.test: {out:?}");

    assert!(backend.requests() >= 9, "every request reached the backend: {}", backend.requests());
    still_serves(&t, "a.test", "sni").await
}

/// The certificate is chosen by SNI, the pool by Host: they must agree on the name. A request
/// whose Host the connection's certificate does not name gets 421 (the client retries on a
/// connection of its own), and no backend sees it; a name the same certificate covers may share
/// the connection (what HTTP/2 clients do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_the_connections_certificate_does_not_name_gets_421() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let a = ca.leaf("a.test", &["a.test", "*.wild.test"], KeyKind::EcdsaP256).await?;
    let b = ca.leaf("b.test", &["b.test"], KeyKind::EcdsaP256).await?;
    let web = Backend::start("web").await?;
    let bsite = Backend::start("b-site").await?;
    let pools = format!(
        "[upstreams.bsite]\n[[upstreams.bsite.backend]]\naddr = \"{}\"\n[[route]]\nhost = \"b.test\"\nupstream = \"bsite\"\n",
        bsite.addr
    );
    let t = tls_node("tls-421", &ca, &[("a", &a), ("b", &b)], &web.addr.to_string(), "", &pools).await?;
    for flag in ["--http1.1", "--http2"] {
        // each name on its own connection: its own pool
        for (name, body) in [("a.test", "web"), ("b.test", "b-site"), ("x.wild.test", "web")] {
            let (url, res) = t.url(name, "/");
            let out = curl(&[flag, "--cacert", t.ca(), "--resolve", &res, &url]).await?;
            assert!(out.status.success() && out.stdout == body, "{flag} {name}: {out:?}");
        }
        // a connection for a.test asking for b.test: 421, and the b site never sees it
        let (url, res) = t.url("a.test", "/");
        let before = bsite.requests();
        let args = [flag, "--cacert", t.ca(), "--resolve", &res, "-H", "Host: b.test", "-w", "|%{http_code}", &url];
        let out = curl(&args).await?;
        assert!(out.stdout.ends_with("|421") && out.stdout.contains("misdirected"), "{flag}: {out:?}");
        assert_eq!(bsite.requests(), before, "{flag}: a misdirected request reached a backend");
        // a name the same certificate covers may share the connection
        let args = [flag, "--cacert", t.ca(), "--resolve", &res, "-H", "Host: y.wild.test:443", &url];
        let out = curl(&args).await?;
        assert!(out.status.success() && out.stdout == "web", "{flag} y.wild.test on a.test's connection: {out:?}");
    }
    still_serves(&t, "a.test", "web").await
}

// ---------------------------------------------------------------------------------------------
// 2. ALPN, keep-alive, pipelining, WebSocket
// ---------------------------------------------------------------------------------------------

/// The node is started with the `--tls-*` flags here (the other tests use `[tls]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_serves_http2_and_http11_with_keep_alive() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("h.test", &["h.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("alpn").await?;
    let port = free_port();
    let tls_addr = format!("127.0.0.1:{port}");
    let node = with_certs(Node::builder("tls-alpn"), &ca, &[("h", &leaf)])
        .arg("--tls-listen")
        .arg(&tls_addr)
        .arg("--tls-cert")
        .arg("{dir}/h.pem")
        .arg("--tls-key")
        .arg("{dir}/h.key")
        .backend(&backend)
        .start()
        .await?;
    let t = TlsNode { tls: tls_addr.parse()?, ca: node.dir().join("ca.pem"), node };
    let (url, res) = t.url("h.test", "/");

    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl(&[flag, "--cacert", t.ca(), "--resolve", &res, "-w", "\n%{http_version}", &url]).await?;
        assert!(out.status.success(), "{flag}: {out:?}");
        assert_eq!(out.stdout, format!("alpn\n{version}"), "{flag}: HTTP/{version} by ALPN: {out:?}");
    }

    // h2load: 200 requests on 4 HTTP/2 connections, every one 200.
    let before = backend.requests();
    let h2 = format!("https://127.0.0.1:{port}/");
    let out = run("h2load", &["-n", "200", "-c", "4", &h2], None, Duration::from_secs(60)).await?;
    println!("TLS h2load:\n{}", out.stdout);
    assert!(out.status.success(), "h2load: {out:?}");
    assert!(out.stdout.contains("Application protocol: h2"), "h2load negotiated h2: {out:?}");
    assert!(
        out.stdout
            .contains("requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout"),
        "h2load: every request succeeded: {out:?}"
    );
    assert!(out.stdout.contains("status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx"), "h2load: all 200: {out:?}");
    assert_eq!(backend.requests() - before, 200, "the backend answered each of h2load's requests");

    // Keep-alive: three URLs in one curl command share one connection (HTTP/1.1, and HTTP/2).
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let urls: Vec<String> = (1..=3).map(|i| format!("https://h.test:{port}/?n={i}")).collect();
        let mut args = vec![
            flag,
            "-v",
            "--cacert",
            t.ca(),
            "--resolve",
            &res,
            "-w",
            "%{http_code} %{http_version} %{num_connects}\n",
        ];
        for u in &urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        let out = curl(&args).await?;
        assert!(out.status.success(), "{flag} keep-alive: {out:?}");
        let want = format!("200 {version} 1\n200 {version} 0\n200 {version} 0\n");
        assert_eq!(out.stdout, want, "{flag}: one connect, then two requests on it: {out:?}");
        assert_eq!(out.stderr.matches("Re-using existing connection").count(), 2, "{flag}: {out:?}");
    }
    still_serves(&t, "h.test", "alpn").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_over_tls_are_all_answered_in_order() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("p.test", &["p.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("pipe").await?;
    let t = tls_node("tls-pipe", &ca, &[("p", &leaf)], &backend.addr.to_string(), "", "").await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let uri_of = |r: &RawResponse| -> anyhow::Result<String> {
        ensure!(r.status == 200, "status {}: {r:?}", r.status);
        let v: serde_json::Value = serde_json::from_slice(&r.body).context("echo JSON")?;
        Ok(v["uri"].as_str().unwrap_or_default().to_string())
    };

    // Three requests in one write: one TLS record. The node reads its client in 4 KiB bites:
    // the rest of the record waits decrypted inside the TLS session, where the socket's
    // readiness does not show it. Three layouts: small requests (all in the first bite); 2 KiB
    // requests (the first bite ends exactly between the second and the third, so the node
    // goes idle with the third one inside the session); 3 KiB requests (a head split across
    // bites).
    for size in [0, 2048, 3000] {
        let mut s = connect(t.tls, "p.test", &cfg).await?;
        assert_eq!(alpn(&s).as_deref(), Some("http/1.1"));
        let three: String =
            (1..=3).map(|i| padded_request("p.test", &format!("/echo?n={i}&size={size}"), size)).collect();
        s.write_all(three.as_bytes()).await?;
        s.flush().await?;
        let mut pending = Vec::new();
        for i in 1..=3 {
            let r = read_response(&mut s, &mut pending, Duration::from_secs(5))
                .await
                .with_context(|| format!("pipelined response {i} of 3 ({size}-byte requests in one TLS record)"))?;
            assert_eq!(uri_of(&r)?, format!("/echo?n={i}&size={size}"), "answers come in request order");
        }
        // The connection goes on after the pipelined batch.
        s.write_all(get_request("p.test", "/echo?n=4", false).as_bytes()).await?;
        s.flush().await?;
        let r =
            read_response(&mut s, &mut pending, Duration::from_secs(5)).await.context("the request after the batch")?;
        assert_eq!(uri_of(&r)?, "/echo?n=4");
    }

    // Sixteen requests, each in its own TLS record, all in one TCP write (the records gather
    // in a BufWriter under the TLS stream until the flush).
    let tcp = TcpStream::connect(t.tls).await?;
    tcp.set_nodelay(true)?;
    let mut s = connect_over(BufWriter::with_capacity(64 * 1024, tcp), "p.test", &cfg).await?;
    for i in 1..=16 {
        s.write_all(get_request("p.test", &format!("/echo?m={i}"), i == 16).as_bytes()).await?;
    }
    s.flush().await?;
    let mut pending = Vec::new();
    for i in 1..=16 {
        let r = read_response(&mut s, &mut pending, Duration::from_secs(5))
            .await
            .with_context(|| format!("pipelined response {i} of 16 (sixteen records, one segment)"))?;
        assert_eq!(uri_of(&r)?, format!("/echo?m={i}"), "answers come in request order");
    }
    assert_eq!(backend.requests(), 3 * 4 + 16);
    still_serves(&t, "p.test", "pipe").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_over_tls_echoes_both_ways() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("ws.test", &["ws.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("ws").await?;
    let t = tls_node("tls-ws", &ca, &[("ws", &leaf)], &backend.addr.to_string(), "", "").await?;
    // WebSocket over HTTP/2 would need RFC 8441: offer HTTP/1.1 only, as browsers do for ws.
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let tcp = TcpStream::connect(t.tls).await?;
    tcp.set_nodelay(true)?;
    let mut s = connect_over(BufWriter::with_capacity(64 * 1024, tcp), "ws.test", &cfg).await?;
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    s.flush().await?;
    let mut pending = Vec::new();
    let head = read_response(&mut s, &mut pending, Duration::from_secs(5)).await.context("the 101")?;
    assert_eq!(head.status, 101, "{head:?}");
    assert_eq!(head.header("upgrade"), Some("websocket"), "{head:?}");
    assert!(pending.is_empty(), "nothing after the 101 yet: {pending:?}");
    assert_eq!(backend.upgrades(), 1);

    let read_exact = async |s: &mut tokio_rustls::client::TlsStream<BufWriter<TcpStream>>, n: usize| {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.context("echo: timed out")??;
        anyhow::Ok(buf)
    };
    // Message by message.
    for i in 0..10 {
        let msg = format!("message {i} through the TLS tunnel");
        s.write_all(msg.as_bytes()).await?;
        s.flush().await?;
        assert_eq!(read_exact(&mut s, msg.len()).await?, msg.as_bytes(), "message {i}");
    }
    // Forty small TLS records in one TCP segment: the node decrypts them together, and the
    // bytes after the first read wait inside its TLS session.
    let mut sent = Vec::new();
    for i in 0..40 {
        let msg = format!("record {i:02} of forty|");
        s.write_all(msg.as_bytes()).await?;
        sent.extend_from_slice(msg.as_bytes());
    }
    s.flush().await?;
    assert_eq!(read_exact(&mut s, sent.len()).await?, sent, "forty records in one segment, echoed");

    // 256 KiB each way at once.
    let big = pattern(256 * 1024);
    let (mut rd, mut wr) = tokio::io::split(s);
    let out = big.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&out).await?;
        wr.flush().await?;
        anyhow::Ok(wr)
    });
    let mut back = vec![0u8; big.len()];
    tokio::time::timeout(Duration::from_secs(10), rd.read_exact(&mut back))
        .await
        .context("256 KiB echo: timed out")??;
    assert!(back == big, "256 KiB came back byte-exact");
    let _wr = writer.await??;
    still_serves(&t, "ws.test", "ws").await
}

/// Request bodies over TLS reach the backend byte-exact: 1 MiB from curl over HTTP/1.1 (with a
/// length, and chunked) and HTTP/2, and a head, its body and the next request in one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_tls_arrive_byte_exact() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("u.test", &["u.test"], KeyKind::EcdsaP256).await?;
    let raw = RawServer::echo().await?;
    let t = tls_node("tls-body", &ca, &[("u", &leaf)], &raw.addr.to_string(), "", "").await?;
    let body = pattern(1 << 20);
    let file = t.node.dir().join("body.bin");
    std::fs::write(&file, &body)?;
    let data = format!("@{}", file.display());
    let cases = [
        ("/up-h1", "--http1.1", "Content-Type: application/octet-stream"),
        ("/up-h1-chunked", "--http1.1", "Transfer-Encoding: chunked"),
        ("/up-h2", "--http2", "Content-Type: application/octet-stream"),
    ];
    for (path, flag, header) in cases {
        let (url, res) = t.url("u.test", path);
        let out =
            curl(&[flag, "--cacert", t.ca(), "--resolve", &res, "-H", header, "--data-binary", &data, &url]).await?;
        assert!(out.status.success(), "{path}: {out:?}");
        assert_eq!(out.stdout, format!("POST {path} {}", body.len()), "{path}: {out:?}");
        assert!(raw.last(path)?.body == body, "{path}: the backend got the 1 MiB byte-exact");
    }

    // A head, its 5000-byte body and the next request, all in one TLS record.
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let mut s = connect(t.tls, "u.test", &cfg).await?;
    let small = pattern(5000);
    let mut record = b"POST /one-record HTTP/1.1\r\nHost: u.test\r\nContent-Length: 5000\r\n\r\n".to_vec();
    record.extend_from_slice(&small);
    record.extend_from_slice(get_request("u.test", "/after", true).as_bytes());
    s.write_all(&record).await?;
    s.flush().await?;
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending, Duration::from_secs(5)).await.context("the POST's answer")?;
    assert_eq!(r.body_text(), "POST /one-record 5000");
    let r = read_response(&mut s, &mut pending, Duration::from_secs(5)).await.context("the GET's answer")?;
    assert_eq!(r.body_text(), "GET /after 0");
    assert!(raw.last("/one-record")?.body == small, "the body in the head's record arrived byte-exact");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. X-Forwarded-Proto
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_proto_is_https_over_tls_and_http_in_the_clear() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("f.test", &["f.test"], KeyKind::EcdsaP256).await?;
    let raw = RawServer::echo().await?;
    let t = tls_node("tls-xfp", &ca, &[("f", &leaf)], &raw.addr.to_string(), "", "").await?;
    let res = resolve("f.test", t.port());
    // Every client also sends the opposite value: the node must replace it, not pass it on.
    let cases: [(&str, &str, &str, &str); 4] = [
        ("/tls-h1", "--http1.1", "1.1", "https"),
        ("/tls-h2", "--http2", "2", "https"),
        ("/plain-h1", "--http1.1", "1.1", "http"),
        ("/plain-h2c", "--http2-prior-knowledge", "2", "http"),
    ];
    for (path, flag, version, want) in cases {
        let url = if want == "https" {
            format!("https://f.test:{}{path}", t.port())
        } else {
            format!("http://{}{path}", t.node.proxy)
        };
        let spoof = format!("X-Forwarded-Proto: {}", if want == "https" { "http" } else { "https" });
        let args = [flag, "--cacert", t.ca(), "--resolve", &res, "-H", &spoof, "-w", "\n%{http_version}", &url];
        let out = curl(&args).await?;
        assert!(out.status.success(), "{path}: {out:?}");
        assert!(out.stdout.ends_with(&format!("\n{version}")), "{path}: HTTP/{version}: {out:?}");
        let req = raw.last(path)?;
        assert_eq!(
            req.head.all("x-forwarded-proto"),
            vec![want],
            "{path}: the backend sees one value, {want}: {:?}",
            req.head
        );
    }
    still_serves(&t, "f.test", "GET / 0").await
}

// ---------------------------------------------------------------------------------------------
// 4. redirect_http
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_sends_plain_requests_to_the_https_port() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("shop.test", &["shop.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("redir").await?;
    let t = tls_node("tls-redirect", &ca, &[("shop", &leaf)], &backend.addr.to_string(), "redirect_http = true\n", "")
        .await?;
    let plain = t.node.proxy.port();
    let res_plain = resolve("shop.test", plain);
    let res_tls = resolve("shop.test", t.port());

    let out = curl(&["-i", "--resolve", &res_plain, &format!("http://shop.test:{plain}/p?q=1")]).await?;
    assert!(out.status.success(), "{out:?}");
    let r = RawResponse::parse(out.stdout.as_bytes())?;
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.header("location"), Some(format!("https://shop.test:{}/p?q=1", t.port()).as_str()), "{r:?}");
    assert_eq!(r.header("x-shoal-node"), Some("tls-redirect"), "{r:?}");
    assert_eq!(backend.requests(), 0, "a redirected request does not reach the backend");

    // curl follows it to the backend, over TLS (verified against the test CA).
    let url = format!("http://shop.test:{plain}/echo?q=1");
    let args =
        ["-L", "--cacert", t.ca(), "--resolve", &res_plain, "--resolve", &res_tls, "-w", "\n%{url_effective}", &url];
    let out = curl(&args).await?;
    assert!(out.status.success(), "{out:?}");
    let (body, effective) = out.stdout.rsplit_once('\n').context("no -w line")?;
    assert_eq!(effective, format!("https://shop.test:{}/echo?q=1", t.port()), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(body)?;
    assert_eq!((v["method"].as_str(), v["uri"].as_str()), (Some("GET"), Some("/echo?q=1")), "{v}");
    assert_eq!(v["headers"]["x-forwarded-proto"], serde_json::json!(["https"]), "{v}");

    // A 308 keeps the method and the body: a POST arrives as a POST, body and all.
    let args = ["-L", "--cacert", t.ca(), "--resolve", &res_plain, "--resolve", &res_tls, "--data", "hello", &url];
    let out = curl(&args).await?;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).with_context(|| format!("{out:?}"))?;
    assert_eq!((v["method"].as_str(), v["body_len"].as_u64()), (Some("POST"), Some(5)), "{v}");
    assert_eq!(backend.requests(), 2, "only the requests over TLS reached the backend");

    // The TLS listener serves directly.
    let (url, res) = t.url("shop.test", "/");
    let out = curl(&["--cacert", t.ca(), "--resolve", &res, &url]).await?;
    assert!(out.status.success() && out.stdout == "redir", "{out:?}");
    Ok(())
}

/// `redirect_http` promises that the plain listener answers 308 (PRODUCT.md §9): an HTTP/2
/// client with prior knowledge (h2c) on it must not be served in the clear either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_redirects_h2c_requests_too() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("shop.test", &["shop.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("redir").await?;
    let t =
        tls_node("tls-redirect-h2c", &ca, &[("shop", &leaf)], &backend.addr.to_string(), "redirect_http = true\n", "")
            .await?;
    let plain = t.node.proxy.port();
    let url = format!("http://shop.test:{plain}/p?q=1");
    let args = ["-i", "--http2-prior-knowledge", "--resolve", &resolve("shop.test", plain), &url];
    let out = curl(&args).await?;
    assert!(out.status.success(), "{out:?}");
    let head = out.stdout.to_ascii_lowercase();
    assert!(head.starts_with("http/2 308"), "h2c on the plain listener gets 308 as well: {out:?}");
    assert!(head.contains(&format!("location: https://shop.test:{}/p?q=1", t.port())), "{out:?}");
    assert_eq!(backend.requests(), 0, "nothing is served in the clear");
    Ok(())
}

/// An HTTP/1.0 request without Host on the plain listener with `redirect_http`: the answer
/// must not be a `location` without a host (`https://:PORT/p` is not a URL a client can
/// follow); a 400, or a location naming the node, would do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_without_a_host_sends_no_hostless_location() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("shop.test", &["shop.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("redir").await?;
    let t = tls_node(
        "tls-redirect-nohost",
        &ca,
        &[("shop", &leaf)],
        &backend.addr.to_string(),
        "redirect_http = true\n",
        "",
    )
    .await?;
    let raw = shoal_tests::http::raw_exchange(t.node.proxy, b"GET /p HTTP/1.0\r\n\r\n", Duration::from_secs(3)).await?;
    let r = RawResponse::parse(&raw)?;
    println!("TLS redirect without Host: {r:?}");
    if r.status == 308 {
        let location = r.header("location").unwrap_or_default();
        let host = location.strip_prefix("https://").and_then(|l| l.split(['/', ':']).next()).unwrap_or_default();
        assert!(!host.is_empty(), "a 308 without a host in its location: {location:?}");
    } else {
        assert_eq!(r.status, 400, "{r:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Resumption on another node
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_on_another_node_with_the_same_secret() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("r.test", &["r.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("resume").await?;
    let b = backend.addr.to_string();
    // Secret files in a directory of the test's: node 1 and node 2 share one, the third node
    // has another, the fourth none (it makes a random key of its own).
    let dir = TempDir::new("tls-sessions")?;
    let shared = dir.write("shared-secret", "a-cluster-secret-shared-by-nodes-1-and-2\n")?;
    let another = dir.write("another-secret", "another-cluster-secret-of-enough-bytes\n")?;
    let cluster = |p: &Path| format!("[cluster]\nsecret_file = \"{}\"\n", p.display());
    let certs = [("r", &leaf)];
    let one = tls_node("tls-resume-1", &ca, &certs, &b, "", &cluster(&shared)).await?;
    let two = tls_node("tls-resume-2", &ca, &certs, &b, "", &cluster(&shared)).await?;
    let other = tls_node("tls-resume-other", &ca, &certs, &b, "", &cluster(&another)).await?;
    let none = tls_node("tls-resume-none", &ca, &certs, &b, "", "").await?;
    let request = get_request("r.test", "/", true);

    for version in ["-tls1_3", "-tls1_2"] {
        let sess = dir.path().join(format!("session{version}.pem"));
        let sess = sess.to_str().unwrap_or_default();
        let base = [version, "-servername", "r.test", "-CAfile", one.ca(), "-verify_return_error"];
        let out = s_client(one.tls, &[&base[..], &["-sess_out", sess]].concat(), request.as_bytes()).await?;
        assert_eq!(session_kind(&out.stdout), "New", "{version}: first handshake on node 1: {out:?}");
        assert!(out.stdout.contains("HTTP/1.1 200 OK"), "{version}: {out:?}");
        let mut seen = Vec::new();
        for (who, t, want) in [
            ("node 1 again", &one, "Reused"),
            ("node 2, same secret", &two, "Reused"),
            ("a node with another secret", &other, "New"),
            ("a node without a secret", &none, "New"),
        ] {
            let out = s_client(t.tls, &[&base[..], &["-sess_in", sess]].concat(), request.as_bytes()).await?;
            assert!(out.stdout.contains("HTTP/1.1 200 OK"), "{version} on {who}: served: {out:?}");
            seen.push(format!("{who}: {}", session_kind(&out.stdout)));
            assert_eq!(session_kind(&out.stdout), want, "{version}: the session from node 1 on {who}: {out:?}");
        }
        println!("TLS resumption {version}: {seen:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Certificate files replaced on disk
// ---------------------------------------------------------------------------------------------

/// One handshake and request of [`HandshakeLoad`].
#[derive(Debug, Clone)]
struct Shake {
    started: Instant,
    /// When the handshake was done (`started` when it failed).
    handshaken: Instant,
    /// The certificate served (DER).
    cert: Vec<u8>,
    error: Option<String>,
}

/// How often each client of [`HandshakeLoad`] starts a round, at most.
const PACE: Duration = Duration::from_millis(10);

/// A few clients that each loop, one round every `PACE` at most: a full TLS handshake (no
/// resumption), note the certificate, `GET /` with `Connection: close`, read the 200.
/// Bounded: at most `per_client` rounds each and 40 s.
struct HandshakeLoad {
    log: Arc<Mutex<Vec<Shake>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HandshakeLoad {
    fn start(addr: SocketAddr, name: &str, ca_pem: &str, clients: usize, per_client: usize) -> anyhow::Result<Self> {
        let cfg = client_config(ca_pem, &["http/1.1"], ALL_VERSIONS)?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(40);
        let tasks = (0..clients)
            .map(|_| {
                let (cfg, log, stop, name) = (cfg.clone(), log.clone(), stop.clone(), name.to_string());
                tokio::spawn(async move {
                    // Paced, so a fast machine does not run out of rounds before the swap.
                    let mut tick = tokio::time::interval(PACE);
                    for _ in 0..per_client {
                        tick.tick().await;
                        if stop.load(SeqCst) || Instant::now() > deadline {
                            break;
                        }
                        let started = Instant::now();
                        let once = async {
                            let mut s = connect(addr, &name, &cfg).await?;
                            let handshaken = Instant::now();
                            let cert = peer_leaf(&s).context("no peer certificate")?;
                            s.write_all(get_request(&name, "/", true).as_bytes()).await?;
                            s.flush().await?;
                            let r = read_response(&mut s, &mut Vec::new(), Duration::from_secs(5)).await?;
                            ensure!(r.status == 200, "status {}: {r:?}", r.status);
                            anyhow::Ok((cert, handshaken))
                        };
                        let shake = match once.await {
                            Ok((cert, handshaken)) => Shake { started, handshaken, cert, error: None },
                            Err(e) => {
                                Shake { started, handshaken: started, cert: Vec::new(), error: Some(format!("{e:#}")) }
                            }
                        };
                        log.lock().unwrap_or_else(|e| e.into_inner()).push(shake);
                    }
                })
            })
            .collect();
        Ok(HandshakeLoad { log, stop, tasks })
    }

    fn shakes(&self) -> Vec<Shake> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn stop(self) -> Vec<Shake> {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.clone()
    }
}

/// The certificate `n` fresh handshakes get (all must agree).
async fn served(addr: SocketAddr, name: &str, ca_pem: &str, n: usize) -> anyhow::Result<Vec<u8>> {
    let cfg = client_config(ca_pem, &["http/1.1"], ALL_VERSIONS)?;
    let mut seen: Option<Vec<u8>> = None;
    for i in 0..n {
        let s = connect(addr, name, &cfg).await?;
        let cert = peer_leaf(&s).context("no peer certificate")?;
        if let Some(first) = &seen {
            ensure!(*first == cert, "handshake {i} got another certificate than the ones before it");
        }
        seen = Some(cert);
    }
    seen.context("no handshake")
}

/// Lines of the node's log saying a certificate file did not load and naming `file`.
fn not_loaded_lines(node: &Node, file: &Path) -> Vec<String> {
    let file = file.display().to_string();
    node.log_plain()
        .lines()
        .filter(|l| l.contains("certificate file not loaded") && l.contains(&file))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_are_served_without_a_failed_handshake() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let name = "live.test";
    let issue = |n: u32| {
        let ca = &ca;
        async move { ca.leaf(&format!("live.test gen {n}"), &[name], KeyKind::EcdsaP256).await }
    };
    let (v1, v2, v3) = (issue(1).await?, issue(2).await?, issue(3).await?);
    let backend = Backend::start("live").await?;
    let t = tls_node("tls-live", &ca, &[("live", &v1)], &backend.addr.to_string(), "", "").await?;
    let dir = t.node.dir().to_path_buf();
    let cert_file = dir.join("live.pem");
    assert!(served(t.tls, name, &ca.pem, 3).await? == v1.der, "gen 1 is served at start");

    // Four clients, up to 4000 handshakes each (40 s at most), while the files are replaced.
    let load = HandshakeLoad::start(t.tls, name, &ca.pem, 4, 4000)?;
    wait_until(Duration::from_secs(10), "the handshake load is flowing", async || load.shakes().len() >= 40).await?;
    replace_pair(&dir, "live", &v2)?;
    let replaced = Instant::now();
    wait_until(CERT_SWAP_TARGET, "new handshakes get gen 2", async || load.shakes().iter().any(|s| s.cert == v2.der))
        .await?;
    let took = replaced.elapsed();
    let first_v2 = load.shakes().iter().filter(|s| s.cert == v2.der).map(|s| s.handshaken).min();
    let first_v2 = first_v2.context("no gen 2 handshake")?;
    let n = load.shakes().len();
    wait_until(Duration::from_secs(10), "40 more handshakes", async || load.shakes().len() >= n + 40).await?;
    let shakes = load.stop().await;
    let failed: Vec<&Shake> = shakes.iter().filter(|s| s.error.is_some()).collect();
    let (old, new) =
        (shakes.iter().filter(|s| s.cert == v1.der).count(), shakes.iter().filter(|s| s.cert == v2.der).count());
    println!(
        "TLS certificate swap: gen 2 served {took:?} after the rename; {} handshakes ({old} gen 1, {new} gen 2), {} failed",
        shakes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "no handshake or request fails while the files are replaced: {failed:?}");
    assert_eq!(old + new, shakes.len(), "every handshake got gen 1 or gen 2");
    // A handshake that started after one that got gen 2 was done (the swap came before that
    // one's client hello was answered) gets gen 2: no going back to the old certificate.
    let late_old: Vec<&Shake> = shakes.iter().filter(|s| s.started > first_v2 && s.cert == v1.der).collect();
    assert!(late_old.is_empty(), "{} handshakes started after gen 2 was served still got gen 1", late_old.len());

    // A broken certificate file (written in place): gen 2 stays, the log names the file.
    let before = not_loaded_lines(&t.node, &cert_file).len();
    std::fs::write(&cert_file, "this is not a certificate\n")?;
    wait_until(CERT_SWAP_TARGET, "the node logs that the broken file did not load", async || {
        not_loaded_lines(&t.node, &cert_file).len() > before
    })
    .await?;
    println!("TLS broken file: {:?}", not_loaded_lines(&t.node, &cert_file).last());
    assert!(served(t.tls, name, &ca.pem, 10).await? == v2.der, "the last good certificate is still served");
    let (url, res) = t.url(name, "/");
    let out = curl(&["-v", "--cacert", t.ca(), "--resolve", &res, &url]).await?;
    assert!(out.status.success() && out.stderr.contains("subject: CN=live.test gen 2\n"), "{out:?}");

    // SIGHUP with the broken file on disk: still gen 2, and the log says why again.
    let reloads = t.node.log().matches("config reloaded").count();
    let before = not_loaded_lines(&t.node, &cert_file).len();
    t.node.signal(Signal::Hup)?;
    wait_until(Duration::from_secs(3), "the node logs the reload", async || {
        t.node.log().matches("config reloaded").count() > reloads
    })
    .await?;
    assert!(
        not_loaded_lines(&t.node, &cert_file).len() > before,
        "SIGHUP re-reads the file and logs why it is refused"
    );
    assert!(
        served(t.tls, name, &ca.pem, 10).await? == v2.der,
        "after SIGHUP the last good certificate is still served"
    );

    // A good pair again: taken within seconds.
    replace_pair(&dir, "live", &v3)?;
    wait_until(CERT_SWAP_TARGET, "gen 3 is served", async || {
        served(t.tls, name, &ca.pem, 1).await.is_ok_and(|c| c == v3.der)
    })
    .await?;
    still_serves(&t, name, "live").await
}

// ---------------------------------------------------------------------------------------------
// 7. Bad input
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_refuse_bad_certificate_files_naming_them() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let good = ca.leaf("good.test", &["good.test"], KeyKind::EcdsaP256).await?;
    let other = ca.leaf("other.test", &["other.test"], KeyKind::EcdsaP256).await?;
    let expired = ca.expired_leaf("old.test", &["old.test"]).await?;
    let dir = TempDir::new("tls-check")?;
    let path = |name: &str| dir.path().join(name).display().to_string();
    dir.write("good.pem", &good.cert_pem)?;
    dir.write("good.key", &good.key_pem)?;
    dir.write("other.key", &other.key_pem)?;
    dir.write("expired.pem", &expired.cert_pem)?;
    dir.write("expired.key", &expired.key_pem)?;
    dir.write("malformed.pem", "-----BEGIN CERTIFICATE-----\nthis is not base64!\n-----END CERTIFICATE-----\n")?;
    dir.write("junk.pem", "just some text, no PEM at all\n")?;
    dir.write("junk.key", "just some text, no PEM at all\n")?;
    // Hold the ports `run` would bind: if it bound anything before reading the certificates, it
    // would fail on those instead, and say so.
    let held: Vec<TcpListener> = (0..5).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let addrs: Vec<String> = held.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
    let (listen, admin, control, gossip, tls) = (&addrs[0], &addrs[1], &addrs[2], &addrs[3], &addrs[4]);
    let toml = |cert: &str, key: &str| {
        format!(
            "[tls]\nlisten = \"{tls}\"\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            path(cert),
            path(key)
        )
    };

    let (out, _) = shoald_check(&dir, "good.toml", &toml("good.pem", "good.key"))?;
    assert!(out.status.success(), "a good pair passes: {}", String::from_utf8_lossy(&out.stderr));
    let run_args = |config: &str| -> Vec<String> {
        let mut v: Vec<String> = ["run", "--config", config, "--node-id", "bad-cert"].map(String::from).to_vec();
        for (flag, addr) in [("--listen", listen), ("--admin", admin), ("--control", control), ("--gossip", gossip)] {
            v.extend([flag.to_string(), addr.clone()]);
        }
        v
    };
    // The held ports are in the way of a good config: `run` says it cannot bind.
    let good = dir.path().join("good.toml").display().to_string();
    let args = run_args(&good);
    let out = shoald_run_to_exit(&args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(10)).await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("bind"), "the held ports stop a good config: {err}");

    // (what, cert, key, the file the message must name, another word it must say)
    let cases = [
        ("a missing certificate", "missing.pem", "good.key", "missing.pem", ""),
        ("a missing key", "good.pem", "missing.key", "missing.key", ""),
        ("a malformed certificate", "malformed.pem", "good.key", "malformed.pem", ""),
        ("a file with no certificate", "junk.pem", "good.key", "junk.pem", ""),
        ("a file with no key", "good.pem", "junk.key", "junk.key", ""),
        ("the key of another certificate", "good.pem", "other.key", "other.key", "does not belong"),
        ("an expired certificate", "expired.pem", "expired.key", "expired.pem", "expired"),
    ];
    for (i, (what, cert, key, named, word)) in cases.into_iter().enumerate() {
        let file = format!("case{i}.toml");
        let (out, _) = shoald_check(&dir, &file, &toml(cert, key))?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        println!("TLS check, {what}: {}", err.trim());
        assert_eq!(out.status.code(), Some(1), "check refuses {what}: {err}");
        assert!(err.contains(&path(named)), "check names {named} for {what}: {err}");
        assert!(err.contains(word), "check says {word:?} for {what}: {err}");

        let config = dir.path().join(&file).display().to_string();
        let args = run_args(&config);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = shoald_run_to_exit(&args, Duration::from_secs(10)).await?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "run refuses {what}: {err}");
        assert!(err.contains(&path(named)), "run names {named} for {what}: {err}");
        assert!(!err.contains("bind") && !err.contains("in use"), "run refuses {what} before binding anything: {err}");
    }

    // The flags name their files too.
    let (cert, key) = (path("expired.pem"), path("expired.key"));
    let args = [
        "run",
        "--node-id",
        "bad-flag",
        "--listen",
        listen,
        "--admin",
        admin,
        "--control",
        control,
        "--gossip",
        gossip,
        "--tls-listen",
        tls,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let out = shoald_run_to_exit(&args, Duration::from_secs(10)).await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains(&cert) && err.contains("expired"), "run --tls-cert EXPIRED: {err}");
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_silence_and_old_versions_are_refused_and_the_node_serves_on() -> R {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("j.test", &["j.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("junk").await?;
    let t = tls_node("tls-junk", &ca, &[("j", &leaf)], &backend.addr.to_string(), "handshake_timeout = \"2s\"\n", "")
        .await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let hello = client_hello("j.test", &cfg)?;
    assert!(hello.len() > 100 && hello[0] == 0x16, "a TLS handshake record: {} bytes", hello.len());

    // Stalled handshakes, all at once: closed at the handshake timeout, not before.
    let stalls = [
        ("a silent client", Vec::new()),
        ("half a client hello", hello[..hello.len() / 2].to_vec()),
        ("a client hello, then nothing", hello.clone()),
    ];
    let mut tasks = Vec::new();
    for (what, bytes) in stalls {
        let addr = t.tls;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(&bytes).await?;
            let (closed, got) = until_closed(&mut s, HANDSHAKE_TIMEOUT + Duration::from_secs(5)).await;
            anyhow::Ok((what, closed, got.len()))
        }));
    }
    // Junk meanwhile: a plain HTTP request and binary noise, closed at once.
    for (what, bytes) in
        [("plain HTTP", get_request("j.test", "/", false).into_bytes()), ("binary noise", pattern(64 * 1024))]
    {
        let mut s = TcpStream::connect(t.tls).await?;
        let _ = s.write_all(&bytes).await;
        let (closed, got) = until_closed(&mut s, Duration::from_secs(5)).await;
        println!(
            "TLS junk, {what}: closed after {closed:?}, {} bytes back: {:?}",
            got.len(),
            String::from_utf8_lossy(&got)
        );
        let closed = closed.with_context(|| format!("{what}: still open after 5 s"))?;
        assert!(closed < Duration::from_secs(1), "{what} is closed at once, not at the timeout: {closed:?}");
        assert!(
            !got.starts_with(b"HTTP/"),
            "{what}: no HTTP answer on the TLS port: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    for task in tasks {
        let (what, closed, got) = task.await??;
        println!("TLS stall, {what}: closed after {closed:?} ({got} bytes from the node)");
        let closed = closed.with_context(|| {
            format!("{what}: still open {:?} after connecting", HANDSHAKE_TIMEOUT + Duration::from_secs(5))
        })?;
        assert!(
            closed >= HANDSHAKE_TIMEOUT - Duration::from_millis(200)
                && closed <= HANDSHAKE_TIMEOUT + Duration::from_millis(1500),
            "{what}: closed after {closed:?}, want about the 2 s handshake timeout"
        );
    }

    // TLS 1.0 and 1.1 only: the client sends its hello (it is not refused by the client's
    // own settings) and the node answers with a fatal alert. (rustls answers handshake_failure,
    // not protocol_version: such hellos carry no signature_algorithms extension, which it
    // checks first.)
    for flag in ["-tls1", "-tls1_1"] {
        let args = [flag, "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "j.test"];
        let out = s_client(t.tls, &args, get_request("j.test", "/", true).as_bytes()).await?;
        let text = out.both();
        println!("TLS {flag} client: {}", out.stderr.lines().find(|l| l.contains("alert")).unwrap_or("(no alert)"));
        assert!(!out.status.success(), "{flag}: refused: {out:?}");
        assert!(handshake_bytes_written(&text) > 50, "{flag}: the client did send a hello: {out:?}");
        assert!(text.contains("SSL alert number"), "{flag}: the node answers with a fatal alert: {out:?}");
        assert!(text.contains("Cipher is (NONE)") && !text.contains("HTTP/1.1 200"), "{flag}: {out:?}");
    }
    // TLS 1.2 and 1.3 pass (min_version defaults to 1.2).
    for (flag, proto) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let args = [flag, "-servername", "j.test", "-CAfile", t.ca(), "-verify_return_error"];
        let out = s_client(t.tls, &args, get_request("j.test", "/", true).as_bytes()).await?;
        assert!(out.stdout.contains(&format!("Protocol  : {proto}")), "{flag}: {out:?}");
        assert!(out.stdout.contains("HTTP/1.1 200 OK"), "{flag}: served: {out:?}");
    }
    assert!(t.node.ready_status().await == 200, "the node is still ready");
    still_serves(&t, "j.test", "junk").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_1_3_refuses_tls_1_2_clients() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("m.test", &["m.test"], KeyKind::EcdsaP256).await?;
    let backend = Backend::start("v13").await?;
    let t =
        tls_node("tls-min13", &ca, &[("m", &leaf)], &backend.addr.to_string(), "min_version = \"1.3\"\n", "").await?;
    let request = get_request("m.test", "/", true);
    let (url, res) = t.url("m.test", "/");

    let out = s_client(t.tls, &["-tls1_2", "-servername", "m.test", "-CAfile", t.ca()], request.as_bytes()).await?;
    assert!(!out.status.success() && !out.stdout.contains("HTTP/1.1 200"), "openssl -tls1_2 is refused: {out:?}");
    assert!(out.both().contains("alert protocol version"), "refused with a protocol_version alert: {out:?}");
    let out = curl(&["--cacert", t.ca(), "--resolve", &res, "--tlsv1.2", "--tls-max", "1.2", &url]).await?;
    assert_eq!(out.status.code(), Some(35), "curl --tls-max 1.2 fails its handshake: {out:?}");
    let tls12 = client_config(&ca.pem, &["http/1.1"], &[&rustls::version::TLS12])?;
    let refused = connect(t.tls, "m.test", &tls12).await;
    assert!(refused.is_err(), "a TLS 1.2-only rustls client is refused");
    println!("TLS min 1.3, rustls TLS 1.2 client: {:#}", refused.err().map(|e| format!("{e:#}")).unwrap_or_default());

    let out = s_client(t.tls, &["-tls1_3", "-servername", "m.test", "-CAfile", t.ca()], request.as_bytes()).await?;
    assert!(
        out.stdout.contains("Protocol  : TLSv1.3") && out.stdout.contains("HTTP/1.1 200 OK"),
        "TLS 1.3 passes: {out:?}"
    );
    let out = curl(&["-v", "--cacert", t.ca(), "--resolve", &res, &url]).await?;
    assert!(out.status.success() && out.stdout == "v13" && out.stderr.contains("TLSv1.3"), "{out:?}");
    still_serves(&t, "m.test", "v13").await
}

// ---------------------------------------------------------------------------------------------
// 8. Closing a TLS connection: close_notify
// ---------------------------------------------------------------------------------------------

/// Reads to the end of a TLS stream: `Ok(bytes)` when the node ended it with close_notify,
/// an error naming what happened otherwise (rustls reports a close without close_notify as
/// `UnexpectedEof`).
async fn read_to_clean_end<S: tokio::io::AsyncRead + Unpin>(s: &mut S, max: Duration) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + max;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => anyhow::bail!("still open after {max:?}"),
            Ok(Ok(0)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                anyhow::bail!("{e} ({:?}) after {:?}", e.kind(), String::from_utf8_lossy(&got))
            }
        }
    }
}

/// RFC 8446 §6.1: "Each party MUST send a close_notify alert before closing its write side of
/// the connection, unless it has already sent some error alert." Without it a client cannot
/// tell a response that ends where the connection does (an HTTP/1.0 client's body of unknown
/// length) from a truncated one, and rustls and OpenSSL clients report the close as an error.
/// Checked where the node closes: after `Connection: close`, after a body delimited by the
/// close, and at the keep-alive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_ends_tls_connections_with_close_notify() -> R {
    let ca = TestCa::new("shoal test CA")?;
    let leaf = ca.leaf("c.test", &["c.test"], KeyKind::EcdsaP256).await?;
    // `/until-close` is answered without a length (the body ends at the close); the rest
    // with `<method> <target> <body length>`, kept alive.
    let raw = RawServer::start(|mut c: RawConn| async move {
        while let Some(req) = c.read_request(Duration::from_secs(30)).await? {
            if req.head.target().starts_with("/until-close") {
                c.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nthe body ends where the connection does\n",
                )
                .await?;
                let _ = c.stream.shutdown().await;
                return Ok(());
            }
            c.write(&default_answer(&req)).await?;
        }
        Ok(())
    })
    .await?;
    let node_toml = "[node]\nkeepalive_timeout = \"1s\"\n";
    let t = tls_node("tls-close", &ca, &[("c", &leaf)], &raw.addr.to_string(), "", node_toml).await?;
    let cfg = client_config(&ca.pem, &["http/1.1"], ALL_VERSIONS)?;
    let mut failures = Vec::new();

    // openssl: a `Connection: close` answer, then the close.
    let args = ["-servername", "c.test", "-CAfile", t.ca()];
    let out = s_client(t.tls, &args, get_request("c.test", "/s_client", true).as_bytes()).await?;
    assert!(out.stdout.contains("HTTP/1.1 200 OK"), "{out:?}");
    if out.stderr.contains("unexpected eof") {
        failures.push(format!("openssl s_client, Connection: close: {}", out.stderr.trim()));
    }

    // rustls: a `Connection: close` answer, then the close.
    let mut s = connect(t.tls, "c.test", &cfg).await?;
    s.write_all(get_request("c.test", "/close", true).as_bytes()).await?;
    s.flush().await?;
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending, Duration::from_secs(5)).await?;
    assert_eq!((r.status, r.body_text()), (200, "GET /close 0".to_string()));
    if let Err(e) = read_to_clean_end(&mut s, Duration::from_secs(5)).await {
        failures.push(format!("rustls, Connection: close: {e:#}"));
    }

    // rustls, HTTP/1.0: the body's end is the connection's end.
    let mut s = connect(t.tls, "c.test", &cfg).await?;
    s.write_all(b"GET /until-close HTTP/1.0\r\nHost: c.test\r\n\r\n").await?;
    s.flush().await?;
    match read_to_clean_end(&mut s, Duration::from_secs(5)).await {
        Ok(all) => {
            let r = RawResponse::parse(&all)?;
            assert_eq!(r.body_text(), "the body ends where the connection does\n", "{r:?}");
        }
        Err(e) => failures.push(format!("rustls, HTTP/1.0 body delimited by the close: {e:#}")),
    }

    // rustls: an idle keep-alive connection closed at keepalive_timeout (1 s).
    let mut s = connect(t.tls, "c.test", &cfg).await?;
    s.write_all(get_request("c.test", "/idle", false).as_bytes()).await?;
    s.flush().await?;
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending, Duration::from_secs(5)).await?;
    assert_eq!(r.status, 200, "{r:?}");
    if let Err(e) = read_to_clean_end(&mut s, Duration::from_secs(5)).await {
        failures.push(format!("rustls, keep-alive timeout: {e:#}"));
    }

    assert!(failures.is_empty(), "the node closed TLS connections without close_notify:\n{}", failures.join("\n"));
    Ok(())
}
