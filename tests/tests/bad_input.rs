//! Bad input: invalid configs (`shoald check`, `shoald run`), malformed and hostile requests,
//! slow clients, and a backend that does not speak HTTP.

use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use shoal_tests::http::{RawResponse, get, raw_exchange};
use shoal_tests::{Backend, Node, TempDir, free_addr, shoald_check, shoald_run_to_exit};
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
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "unexpected answer {text:?}");
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
