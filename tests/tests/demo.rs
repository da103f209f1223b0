//! `shoald demo` as a newcomer runs it: it starts, prints the URLs, balances a request across
//! the demo backends, shows up in `shoal status`, and stops everything on Ctrl-C (SIGINT).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_tests::{bins, http, wait_until};

/// Ports of demo node i with `offset` (mirrors node/src/demo.rs).
fn node_ports(i: u16, offset: u16) -> (u16, u16, u16) {
    (8080 + i + offset, 7400 + i + offset, 9901 + i + offset)
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_balances_and_stops_cleanly_on_ctrl_c() -> anyhow::Result<()> {
    // An offset away from the defaults, so a demo someone left running does not collide.
    let offset = 431;
    let mut child = Kill(
        Command::new(bins::shoald())
            .args(["demo", "--nodes", "3", "--backends", "3", "--port-offset", &offset.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The banner lists every node's proxy and dashboard URL and the commands to try.
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !banner.contains("Ctrl-C stops the demo") {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "no demo banner within 30 s; got:\n{banner}");
        if let Ok(line) = rx.recv_timeout(left.min(Duration::from_millis(200))) {
            banner.push_str(&line);
            banner.push('\n');
        }
    }
    for i in 0..3u16 {
        let (proxy, control, admin) = node_ports(i, offset);
        assert!(banner.contains(&format!("http://127.0.0.1:{proxy}/")), "{banner}");
        assert!(banner.contains(&format!("http://127.0.0.1:{admin}/")), "{banner}");
        assert!(banner.contains(&format!("control 127.0.0.1:{control}")), "{banner}");
    }
    assert!(banner.contains("shoal --node"), "{banner}");

    // Requests through node 1 are answered by demo backends, which name themselves.
    let proxy: SocketAddr = format!("127.0.0.1:{}", node_ports(0, offset).0).parse()?;
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let r = http::get(proxy, "/").await?;
        assert_eq!(r.status, 200);
        names.insert(r.body.split_whitespace().next().unwrap_or_default().to_string());
    }
    assert!(names.len() >= 2 && names.iter().all(|n| n.starts_with("backend-")), "{names:?}");

    // The three nodes found each other.
    let control = format!("127.0.0.1:{}", node_ports(0, offset).1);
    wait_until(Duration::from_secs(10), "3 alive members in shoal status", async || {
        let out = Command::new(bins::shoal()).args(["--node", &control, "--json", "status"]).output();
        out.ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["members"].as_array().map(|m| m.iter().filter(|m| m["state"] == "alive").count()))
            == Some(3)
    })
    .await?;

    // Ctrl-C: every node leaves, the demo exits 0 and nothing keeps listening.
    let status = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status()?;
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "demo did not stop within 20 s of Ctrl-C");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "demo exit status {exit}");
    for i in 0..3u16 {
        let (p, c, a) = node_ports(i, offset);
        for port in [p, c, a] {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "port {port} still open after the demo stopped"
            );
        }
    }
    Ok(())
}
