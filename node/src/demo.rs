//! `shoald demo`: a local cluster on 127.0.0.1 — demo backends that answer with their own
//! name (in this process), and N `shoald run` child processes seeded to each other — until
//! Ctrl-C, when every node leaves gracefully and the backends stop.
//!
//! Ports (plus `--port-offset`): node i proxies on 8080+i, control 7400+i, gossip 7946+i,
//! admin 9901+i; demo backend j on 18001+j.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// Ports of node `i` with `offset`.
pub fn node_ports(i: usize, offset: u16) -> [u16; 4] {
    let i = i as u16 + offset;
    [8080 + i, 7400 + i, 7946 + i, 9901 + i]
}

pub fn backend_port(j: usize, offset: u16) -> u16 {
    18001 + j as u16 + offset
}

async fn demo_backend(listener: TcpListener, name: String, delay: Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let name = name.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    let via =
                        req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    let body = format!("{name} (path {}, x-forwarded-for {via})\n", req.uri().path());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn stop_children(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
}

pub fn run(nodes: usize, backends: usize, offset: u16) -> anyhow::Result<()> {
    anyhow::ensure!((1..=20).contains(&nodes), "--nodes must be 1..=20");
    anyhow::ensure!((1..=20).contains(&backends), "--backends must be 1..=20");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut backend_addrs = Vec::new();
        for j in 0..backends {
            let addr = SocketAddr::from(([127, 0, 0, 1], backend_port(j, offset)));
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("demo backend port {addr} is busy (try --port-offset)"))?;
            // The last backend answers 20 ms slower, so least-conn has something to show.
            let delay = if j + 1 == backends && backends > 1 { Duration::from_millis(20) } else { Duration::ZERO };
            tokio::spawn(demo_backend(listener, format!("backend-{}", j + 1), delay));
            backend_addrs.push(addr);
        }
        let exe = std::env::current_exe().context("cannot find the shoald executable")?;
        let seeds: Vec<String> = (0..nodes.min(3)).map(|i| format!("127.0.0.1:{}", node_ports(i, offset)[2])).collect();
        let mut children = Vec::new();
        for i in 0..nodes {
            let [listen, control, gossip, admin] = node_ports(i, offset);
            let mut cmd = Command::new(&exe);
            cmd.arg("run")
                .args(["--node-id", &format!("node-{}", i + 1)])
                .args(["--listen", &format!("127.0.0.1:{listen}")])
                .args(["--control", &format!("127.0.0.1:{control}")])
                .args(["--gossip", &format!("127.0.0.1:{gossip}")])
                .args(["--admin", &format!("127.0.0.1:{admin}")])
                .args(["--cluster-id", "demo"]);
            for s in &seeds {
                cmd.args(["--seed", s]);
            }
            for b in &backend_addrs {
                cmd.args(["--backend", &b.to_string()]);
            }
            // The children get their own process group, so the terminal's Ctrl-C reaches only
            // this process, which then makes every node leave in order.
            cmd.process_group(0)
                .stdin(Stdio::null())
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()));
            children.push(cmd.spawn().context("cannot start a demo node")?);
        }
        // Wait until every node's admin answers /ready.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for i in 0..nodes {
            let admin = SocketAddr::from(([127, 0, 0, 1], node_ports(i, offset)[3]));
            loop {
                if tokio::net::TcpStream::connect(admin).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    stop_children(&mut children).await;
                    anyhow::bail!(
                        "demo node {} did not start (is port {} free? try --port-offset)",
                        i + 1,
                        admin.port()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let [p0, c0, _, a0] = node_ports(0, offset);
        println!(
            "Shoal demo: {nodes} nodes, {backends} backends on 127.0.0.1 (backend-{backends} answers 20 ms slower)\n"
        );
        for i in 0..nodes {
            let [p, c, _, a] = node_ports(i, offset);
            println!(
                "  node-{}  proxy http://127.0.0.1:{p}/   dashboard http://127.0.0.1:{a}/   control 127.0.0.1:{c}",
                i + 1
            );
        }
        println!("\nTry:");
        println!("  curl http://127.0.0.1:{p0}/");
        println!("  shoal --node 127.0.0.1:{c0} status");
        println!("  shoal --node 127.0.0.1:{c0} backend drain {}", backend_addrs[0]);
        if nodes > 1 {
            println!(
                "  shoal --node 127.0.0.1:{} leave        # node-2 drains and leaves; watch the dashboard",
                node_ports(1, offset)[1]
            );
        }
        println!("  open http://127.0.0.1:{a0}/ in a browser\n");
        println!("Ctrl-C stops the demo.");
        let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        println!("\nstopping: every node leaves the cluster...");
        stop_children(&mut children).await;
        println!("demo stopped");
        Ok(())
    })
}
