//! Bad input: invalid configs (`shoald check`, `shoald run`), malformed and hostile requests,
//! slow clients, and a backend that does not speak HTTP.

use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_tests::http::{RawResponse, get, raw_exchange};
use shoal_tests::raw::{RawConn, RawHead, RawServer, finish};
use shoal_tests::{Backend, Node, RawClient, TempDir, free_addr, shoald_check, shoald_run_to_exit, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

/// (case, config text, every string the error must contain).
fn invalid_configs() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        (
            "unknown key",
            "# test config\n[node]\nid = \"n1\"\n[upstream]\nalgorithm = \"round-robin\"\nkeeplive = 3\n",
            vec!["line 6", "keeplive"],
        ),
        ("bad address", "[node]\nid = \"n1\"\nlisten = \"nowhere:80\"\n", vec!["line 3"]),
        (
            "bad duration",
            "[node]\nid = \"n1\"\n[upstream]\nconnect_timeout = \"5 parsecs\"\n",
            vec!["line 4", "duration"],
        ),
        (
            "duplicate backend",
            "[upstream]\nalgorithm = \"least-conn\"\n[[upstream.backend]]\naddr = \"127.0.0.1:9001\"\n\
             [[upstream.backend]]\naddr = \"127.0.0.1:9002\"\n[[upstream.backend]]\naddr = \"127.0.0.1:9001\"\n",
            vec!["line 7", "127.0.0.1:9001", "twice"],
        ),
        (
            "weight 0",
            "[[upstream.backend]]\naddr = \"127.0.0.1:9001\"\n[[upstream.backend]]\naddr = \"127.0.0.1:9002\"\nweight = 0\n",
            vec!["line 5", "weight"],
        ),
    ]
}

#[test]
fn check_rejects_invalid_configs_naming_file_and_line() -> R {
    let dir = TempDir::new("check")?;
    let mut problems = Vec::new();
    for (i, (case, toml, want)) in invalid_configs().into_iter().enumerate() {
        let (out, path) = shoald_check(&dir, &format!("bad{i}.toml"), toml)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(1) {
            problems.push(format!("{case}: exit {:?}, want 1; stderr {stderr:?}", out.status.code()));
        }
        let mut want = want;
        let shown = path.display().to_string();
        want.push(&shown);
        for w in want {
            if !stderr.contains(w) {
                problems.push(format!("{case}: message {stderr:?} does not contain {w:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let (out, _) = shoald_check(
        &dir,
        "good.toml",
        "[node]\nid = \"n1\"\n[upstream]\nalgorithm = \"round-robin\"\n[[upstream.backend]]\naddr = \"127.0.0.1:9001\"\nweight = 3\n",
    )?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 backends, algorithm round-robin"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_bad_config_exits_before_binding() -> R {
    let dir = TempDir::new("badrun")?;
    for (i, (case, toml, want)) in invalid_configs().into_iter().enumerate() {
        let (listen, admin, control, gossip) = (free_addr(), free_addr(), free_addr(), free_addr());
        let path = dir.write(&format!("bad{i}.toml"), toml)?;
        let path_text = path.display().to_string();
        let start = Instant::now();
        let out = shoald_run_to_exit(
            &[
                "run",
                "--config",
                &path_text,
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
                "--control",
                &control.to_string(),
                "--gossip",
                &gossip.to_string(),
            ],
            Duration::from_secs(10),
        )
        .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: shoald run accepted a bad config");
        assert!(start.elapsed() < Duration::from_secs(5), "{case}: took {:?}", start.elapsed());
        assert!(
            stderr.contains(&path_text) && stderr.contains(want[0]),
            "{case}: {stderr:?} should name the file and {}",
            want[0]
        );
        // Nothing was bound: every port is still free.
        for a in [listen, admin, control] {
            TcpListener::bind(a).unwrap_or_else(|e| panic!("{case}: {a} not free after a failed start: {e}"));
        }
        UdpSocket::bind(gossip).unwrap_or_else(|e| panic!("{case}: gossip {gossip} not free: {e}"));
    }

    // A port that is taken: a clear error, non-zero exit.
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?.to_string();
    let (admin, control, gossip) = (free_addr().to_string(), free_addr().to_string(), free_addr().to_string());
    let out = shoald_run_to_exit(
        &["run", "--listen", &taken_addr, "--admin", &admin, "--control", &control, "--gossip", &gossip],
        Duration::from_secs(10),
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&taken_addr) && stderr.contains("proxy"), "{stderr:?}");
    drop(taken);

    // A bad --backend flag is refused too.
    let out = shoald_run_to_exit(&["run", "--backend", "127.0.0.1:9001,weight=0"], Duration::from_secs(10)).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight 0 out of range"));
    Ok(())
}

async fn node_with_backend(id: &str, config: &str) -> anyhow::Result<(Node, Backend)> {
    let b = Backend::start("b").await?;
    let node = Node::builder(id).config(config).backend(&b).start().await?;
    // Sanity: a good request passes.
    let r = get(node.proxy, "/").await?;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "b"));
    Ok((node, b))
}

async fn exchange(node: &Node, bytes: &[u8]) -> anyhow::Result<RawResponse> {
    let raw = raw_exchange(node.proxy, bytes, Duration::from_secs(5)).await?;
    RawResponse::parse(&raw)
}

const MALFORMED: [(&str, &[u8]); 6] = [
    ("no version", b"HELLO WORLD\r\n\r\n"),
    ("bad header line", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n"),
    ("control byte in target", b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bad content-length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n"),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n"),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_reach_the_backend() -> R {
    let (node, b) = node_with_backend("malformed", "").await?;
    let before = b.requests();
    for (case, bytes) in MALFORMED {
        let r = exchange(&node, bytes).await?;
        assert_eq!(r.status, 400, "{case}: {r:?}");
        assert_eq!(r.header("x-shoal-node"), Some("malformed"), "{case}: {r:?}");
        assert!(r.body_text().starts_with("400 bad request: "), "{case}: the body says what was wrong: {r:?}");
    }
    assert_eq!(b.requests(), before, "a malformed request reached the backend");
    Ok(())
}

/// Heads over `max_header_bytes` (default 16 KiB) get a 431 with the node header and a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_431_names_the_node() -> R {
    let (node, b) = node_with_backend("rejects", "").await?;
    let before = b.requests();
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let r = exchange(&node, big.as_bytes()).await?;
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(r.header("x-shoal-node"), Some("rejects"), "{r:?}");
    assert!(!r.body.is_empty(), "error responses have a short body: {r:?}");
    assert_eq!(b.requests(), before, "an oversized request reached the backend");
    Ok(())
}

/// Content-Length together with Transfer-Encoding (the request-smuggling shape) is refused
/// with 400 and never forwarded, like every other ambiguous framing (RFC 9112 §6.1 allows a
/// server to reject it; a proxy that forwards it lets front and back frame it differently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused() -> R {
    let (node, b) = node_with_backend("smuggle", "").await?;
    let before = b.requests();
    for (case, bytes) in [
        (
            "CL + TE",
            &b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        ),
        (
            "TE + CL",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        ),
        ("two lengths", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc"),
        ("TE not ending in chunked", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    ] {
        let r = exchange(&node, bytes).await?;
        assert_eq!(r.status, 400, "{case}: {r:?}");
        assert_eq!(r.header("x-shoal-node"), Some("smuggle"), "{case}: {r:?}");
        assert!(r.body_text().starts_with("400 bad request: "), "{case}: the body says what was wrong: {r:?}");
    }
    assert_eq!(b.requests(), before, "an ambiguous request reached the backend");
    // Transfer-Encoding alone is fine and arrives whole.
    let r = exchange(
        &node,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    let seen: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(seen["body_len"], 3, "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() -> R {
    let (node, b) = node_with_backend("oversized", "").await?;
    let before = b.requests();
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(20_000));
    let r = exchange(&node, big.as_bytes()).await?;
    assert_eq!(r.status, 431, "20 kB head with the 16 KiB default: {r:?}");
    assert_eq!(b.requests(), before);
    // Under the limit passes.
    let ok = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(8_000));
    let r = exchange(&node, ok.as_bytes()).await?;
    assert_eq!((r.status, r.body_text().as_str()), (200, "b"), "8 kB head: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_bytes_below_8k_is_enforced() -> R {
    let (node, b) = node_with_backend("smallheads", "[node]\nmax_header_bytes = 4096\n").await?;
    let before = b.requests();
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(6_000));
    let r = exchange(&node, req.as_bytes()).await?;
    assert_eq!(r.status, 431, "6 kB head with max_header_bytes = 4096: {r:?}");
    assert_eq!(b.requests(), before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_client_is_disconnected() -> R {
    let (node, b) = node_with_backend("slowloris", "[node]\nclient_header_timeout = \"1s\"\n").await?;
    let before = b.requests();
    let mut s = TcpStream::connect(node.proxy).await?;
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(8), rd.read_to_end(&mut buf)).await;
        (start.elapsed(), buf)
    });
    for i in 0..40 {
        if reader.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if wr.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
            break;
        }
    }
    let (after, buf) = reader.await?;
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the 1s timeout");
    assert!(after < Duration::from_secs(4), "slow client still connected after {after:?}");
    let text = String::from_utf8_lossy(&buf);
    // docs/OPERATIONS.md: "408: a head not complete within client_header_timeout", with
    // x-shoal-node like every refusal; a silent close is not what is promised.
    assert!(text.starts_with("HTTP/1.1 408"), "want a 408 before the close, got {text:?}");
    let r = RawResponse::parse(&buf)?;
    assert_eq!(r.header("x-shoal-node"), Some("slowloris"), "{r:?}");
    assert_eq!(b.requests(), before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_backend_is_a_502() -> R {
    let b = Backend::start("garbage").await?;
    b.set_garbage(true);
    let node = Node::builder("garbage").backend_with(&b, "max_fails=0").start().await?;
    for _ in 0..2 {
        let r = get(node.proxy, "/").await?;
        assert_eq!((r.status.as_u16(), r.header("x-shoal-node")), (502, "garbage"), "{r:?}");
        assert!(r.body.contains("502"), "{r:?}");
    }
    let st = node.status_json().await?;
    assert_eq!(st["errors"]["bad_gateway"], 2, "{st}");
    assert!(b.connections() >= 2);
    // The same backend speaking HTTP again is served normally.
    b.set_garbage(false);
    let r = get(node.proxy, "/").await?;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "garbage"), "{r:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP hardening the docs promise (docs/OPERATIONS.md, "What clients and backends get")
// ---------------------------------------------------------------------------------------------

/// Slack on top of a configured timeout before a close counts as missed: a timer firing and
/// the close reaching us, on a debug build sharing 2 cores with other test processes.
const CLOSE_HEADROOM: Duration = Duration::from_secs(3);
/// The configured timeout in every timeout test below.
const ONE_SECOND: Duration = Duration::from_secs(1);

/// A node in front of a raw backend recording every byte ([`RawServer::echo`]).
async fn node_with_raw_backend(id: &str, config: &str) -> anyhow::Result<(Node, RawServer)> {
    let server = RawServer::echo().await?;
    let node = Node::builder(id).config(config).backend_spec(&format!("{},max_fails=0", server.addr)).start().await?;
    Ok((node, server))
}

/// Sends `request` on a new connection and reads until the node closes it (at most 6 s): the
/// response head, if a complete one came, and every byte.
async fn send_to_close(node: &Node, request: &[u8]) -> anyhow::Result<(Option<RawHead>, Vec<u8>)> {
    let mut c = RawClient::connect(node.proxy).await?;
    c.send(request).await?;
    let got = c.wait_closed(Duration::from_secs(6)).await;
    let head =
        got.bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|end| RawHead::parse(got.bytes[..end + 4].to_vec()));
    Ok((head, got.bytes))
}

/// nginx's `underscores_in_headers off`: `X_Real_IP` never reaches the backend, whose
/// X-Real-IP is the client's real address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_header_names_are_dropped_on_http11() -> R {
    let (node, _b) = node_with_backend("underscore", "").await?;
    let r = exchange(
        &node,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    let echo: serde_json::Value = serde_json::from_slice(&r.body)?;
    let headers = echo["headers"].as_object().cloned().unwrap_or_default();
    let underscored: Vec<&String> = headers.keys().filter(|k| k.contains('_')).collect();
    assert!(underscored.is_empty(), "underscore header names reached the backend: {underscored:?} in {echo}");
    assert_eq!(echo["headers"]["x-real-ip"], serde_json::json!(["127.0.0.1"]), "{echo}");
    Ok(())
}

/// 100 header lines pass; 101 get a 431 with the node's header, and nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_header_lines_get_431() -> R {
    let (node, server) = node_with_raw_backend("manyheaders", "").await?;
    let head = |lines: usize| {
        // Host and Connection count: `lines` in all.
        let mut h = String::from("GET /many HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 0..lines - 2 {
            h.push_str(&format!("X-H-{i}: v\r\n"));
        }
        h + "\r\n"
    };
    let (r, bytes) = send_to_close(&node, head(101).as_bytes()).await?;
    let r = r.with_context(|| format!("101 header lines: no response head: {:?}", String::from_utf8_lossy(&bytes)))?;
    assert_eq!((r.status(), r.header("x-shoal-node")), (431, Some("manyheaders")), "101 header lines: {r:?}");
    let received = server.received();
    assert!(received.is_empty(), "101 header lines reached the backend: {}", String::from_utf8_lossy(&received));
    let (r, _) = send_to_close(&node, head(100).as_bytes()).await?;
    let r = r.context("100 header lines: no response head")?;
    assert_eq!(r.status(), 200, "100 header lines: {r:?}");
    Ok(())
}

/// An absolute-form target with userinfo, or with no host, is a 400 and reaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_with_userinfo_or_without_host_is_400() -> R {
    let (node, server) = node_with_raw_backend("absbad", "").await?;
    for (case, req) in [
        ("userinfo", &b"GET http://user@host/ HTTP/1.1\r\nHost: host\r\nConnection: close\r\n\r\n"[..]),
        ("no host", b"GET http:///x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ] {
        let (r, bytes) = send_to_close(&node, req).await?;
        let r = r.with_context(|| format!("{case}: no response head: {:?}", String::from_utf8_lossy(&bytes)))?;
        assert_eq!((r.status(), r.header("x-shoal-node")), (400, Some("absbad")), "{case}: {r:?}");
    }
    let received = server.received();
    assert!(received.is_empty(), "the backend received {}", String::from_utf8_lossy(&received));
    Ok(())
}

/// A malformed chunked request body is a 400, and the backend never gets a complete request
/// (it may have seen the head and the body up to the error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_request_body_is_400_and_never_completes_upstream() -> R {
    let (node, server) = node_with_raw_backend("badchunk", "").await?;
    let mut problems = Vec::new();
    for (case, path, body) in [
        ("bad hex size", "/bad-hex", &b"zz\r\nhello\r\n0\r\n\r\n"[..]),
        ("no CRLF after the data", "/no-crlf", b"5\r\nhelloXX0\r\n\r\n"),
    ] {
        let mut req =
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                .into_bytes();
        req.extend_from_slice(body);
        let (r, bytes) = send_to_close(&node, &req).await?;
        match r {
            Some(r) if r.status() == 400 && r.header("x-shoal-node") == Some("badchunk") => {}
            Some(r) => problems.push(format!("{case}: want Shoal's 400, got {r:?}")),
            None => problems.push(format!("{case}: no response head: {:?}", String::from_utf8_lossy(&bytes))),
        }
        if let Ok(seen) = server.last(path) {
            problems.push(format!("{case}: the backend got a complete request: {seen:?}"));
        }
    }
    assert!(problems.is_empty(), "malformed chunked bodies:\n{}", problems.join("\n"));
    Ok(())
}

/// NEW `[node] client_body_timeout`: a body that stops is answered 400 or 408 and the
/// connection closed after the timeout (nginx's `client_body_timeout`; 60 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_is_cut_after_client_body_timeout() -> R {
    let (node, server) = node_with_raw_backend("bodystall", "[node]\nclient_body_timeout = \"1s\"\n").await?;
    let mut c = RawClient::connect(node.proxy).await?;
    c.send(b"POST /stalled-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").await?;
    let closed = c.wait_closed(ONE_SECOND + CLOSE_HEADROOM + Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&closed.bytes);
    let after = closed.after.with_context(|| format!("still connected with a stalled body; got {text:?}"))?;
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the 1 s client_body_timeout");
    assert!(after <= ONE_SECOND + CLOSE_HEADROOM, "closed only after {after:?}");
    assert!(text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.1 408"), "want a 400 or 408: {text:?}");
    assert!(server.last("/stalled-body").is_err(), "the backend got a complete request from a stalled body");
    Ok(())
}

/// NEW `[node] keepalive_timeout`: an idle kept-alive connection is closed after it (75 s
/// by default, as documented).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_after_keepalive_timeout() -> R {
    let (node, _server) = node_with_raw_backend("kaidle", "[node]\nkeepalive_timeout = \"1s\"\n").await?;
    let mut c = RawClient::connect(node.proxy).await?;
    c.send(b"GET /once HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let r = c.read_final("GET").await?;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /once 0"), "{r:?}");
    let closed = c.wait_closed(ONE_SECOND + CLOSE_HEADROOM + Duration::from_secs(2)).await;
    let after = closed.after.context("the idle kept-alive connection is still open")?;
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before the 1 s keepalive_timeout");
    assert!(after <= ONE_SECOND + CLOSE_HEADROOM, "closed only after {after:?}");
    assert!(closed.bytes.is_empty(), "bytes on an idle connection: {:?}", String::from_utf8_lossy(&closed.bytes));
    Ok(())
}

/// Size of the response the client below never reads: far more than the socket buffers on
/// both sides of the node can hold (the client's receive window is kept small).
const HUGE: usize = 16 << 20;

/// Answers with a [`HUGE`] body in 64 KiB writes until the node stops taking them.
async fn huge_script(mut c: RawConn) -> anyhow::Result<()> {
    let Some(_req) = c.read_request(Duration::from_secs(20)).await? else { return Ok(()) };
    c.write(format!("HTTP/1.1 200 OK\r\ncontent-length: {HUGE}\r\n\r\n").as_bytes()).await?;
    let piece = vec![b'x'; 64 * 1024];
    for _ in 0..HUGE / piece.len() {
        c.write(&piece).await?;
    }
    finish(c).await
}

/// NEW `[node] send_timeout`: a client that reads nothing of a large response is
/// disconnected after it (nginx's `send_timeout`; 60 s by default), and the backend's
/// connection is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_reads_nothing_is_cut_after_send_timeout() -> R {
    let server = RawServer::start(huge_script).await?;
    let node = Node::builder("sendto")
        .config("[node]\nsend_timeout = \"1s\"\n")
        .backend_spec(&format!("{},max_fails=0", server.addr))
        .start()
        .await?;
    let mut c = RawClient::connect_small_window(node.proxy, 4096).await?;
    c.send(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let start = Instant::now();
    let backend_released = wait_until(ONE_SECOND + CLOSE_HEADROOM, "the backend connection is let go", async || {
        server.conns().first().is_some_and(|c| c.closed_at().is_some())
    })
    .await;
    let released_after = start.elapsed();
    // Now read: what was buffered, then the close, long before all of HUGE.
    let closed = c.wait_closed(Duration::from_secs(3)).await;
    assert!(
        closed.after.is_some() && closed.bytes.len() < HUGE,
        "the client that read nothing was not disconnected: it could still read {} bytes ({:?} after the request)",
        closed.bytes.len(),
        start.elapsed()
    );
    backend_released.with_context(|| format!("after {released_after:?}"))?;
    Ok(())
}
