//! A control call cannot be replayed (PRODUCT.md §9, OPERATIONS "Security"): the bytes of a
//! real `shoal backend remove` call, recorded on the wire by a relay between the CLI and the
//! node, are sent again on a new connection after the operator has added the backend back.
//! The node must refuse the copy (its token was used before), count it, and keep the backend.
//! Against the old static token (the same for every call) the copy would remove it again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_tests::{Backend, Cluster, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type R = anyhow::Result<()>;

/// A TCP relay to `target` for one connection at a time that records what clients send.
async fn recording_relay(target: SocketAddr) -> anyhow::Result<(SocketAddr, Arc<Mutex<Vec<u8>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let record = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = TcpStream::connect(target).await else { return };
            let record = record.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                let _ = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(up, down) }).await;
            });
        }
    });
    Ok((addr, sent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_control_call_replayed_is_refused_and_counted() -> R {
    let keep = Backend::start("keep").await?;
    let victim = Backend::start("victim").await?;
    let c = Cluster::builder("replay-call", 1)
        .secret("a-cluster-secret-of-32-bytes-xyz")
        .backend(&keep)
        .backend(&victim)
        .start()
        .await?;
    let (relay, recorded) = recording_relay(c[0].control).await?;
    let victim_addr = victim.addr.to_string();

    // The operator removes the backend through the relay (the attacker records the bytes)...
    let out = shoal_tests::Shoal::at(relay)
        .secret_file(&c.secret_file().expect("the cluster has a secret"))
        .run(&["backend", "remove", &victim_addr])
        .await?;
    assert_eq!(out.code, 0, "{out:?}");
    let call = recorded.lock().unwrap().clone();
    assert!(call.len() > 24 && call.starts_with(b"PRI * HTTP/2.0"), "an HTTP/2 call was recorded");
    // ... and adds it back.
    c.shoal(0).json(&["backend", "add", &victim_addr]).await?;
    assert!(c[0].backend_addrs().await?.contains(&victim_addr));
    let refused0 = c[0].metric("shoal_control_replayed_calls", &[]).await.expect("the metric exists");

    // The attacker sends the recorded call again, byte for byte, on a new connection.
    let mut replay = TcpStream::connect(c[0].control).await?;
    replay.write_all(&call).await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), replay.read_to_end(&mut answer)).await;
    assert!(!answer.is_empty(), "the node answered the replayed call");

    wait_until(Duration::from_secs(3), "the replayed call is counted", async || {
        c[0].metric("shoal_control_replayed_calls", &[]).await == Some(refused0 + 1.0)
    })
    .await?;
    // Give a wrongly accepted removal time to show before looking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c[0].backend_addrs().await?.contains(&victim_addr),
        "the replayed removal changed nothing: {:?}",
        c[0].backend_addrs().await?
    );
    assert!(c[0].log_plain().contains("token used before"), "the log says why");
    Ok(())
}
