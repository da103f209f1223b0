//! The control port over TLS (`[tls] control = true`, PRODUCT.md §9): the `shoal` CLI verifies
//! the node's certificate against `--ca-file` for the `--tls-name` (or `--node` host); a plain
//! client, a client trusting another CA, or one expecting another name gets nothing; nodes
//! calling each other (`shoal join`) pin the cluster's own certificates, so a node serving a
//! certificate the cluster does not share cannot join through it.

use std::time::Duration;

use shoal_tests::cluster::wait_members;
use shoal_tests::tls::{KeyKind, TestCa};
use shoal_tests::{Cluster, TempDir, free_port, shoald_check};

type R = anyhow::Result<()>;

fn tls_table(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "[tls]\nlisten = \"127.0.0.1:{}\"\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\ncontrol = true\n",
        free_port(),
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_port_speaks_tls_and_peers_pin_the_cluster_certificate() -> R {
    let dir = TempDir::new("tls-control")?;
    let ca = TestCa::new("control CA")?;
    let leaf = ca.leaf("control.test", &["control.test"], KeyKind::EcdsaP256).await?;
    let stranger = ca.leaf("control.test", &["control.test"], KeyKind::EcdsaP256).await?;
    let (cert, key) = (dir.write("control.pem", &leaf.cert_pem)?, dir.write("control.key", &leaf.key_pem)?);
    let (cert3, key3) = (dir.write("stranger.pem", &stranger.cert_pem)?, dir.write("stranger.key", &stranger.key_pem)?);
    let ca_file = dir.write("ca.pem", &ca.pem)?;
    let other_ca = dir.write("other-ca.pem", &TestCa::new("another CA")?.pem)?;
    let ca_arg = ca_file.display().to_string();

    // Three nodes, each on its own; 1 and 2 serve the cluster's certificate, 3 another one.
    let c = Cluster::builder("tlsctl", 3)
        .secret("a-cluster-secret-of-32-bytes-xyz")
        .unseeded()
        .node_config(1, &tls_table(&cert, &key))
        .node_config(2, &tls_table(&cert, &key))
        .node_config(3, &tls_table(&cert3, &key3))
        .start()
        .await?;

    // The CLI over TLS, verified.
    let out = c.shoal(0).run(&["--ca-file", &ca_arg, "--tls-name", "control.test", "status"]).await?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()?["node"], c.ids()[0]);

    // Plain HTTP/2 to a TLS control port: refused, and the message says what to do.
    let out = c.shoal(0).run(&["status"]).await?;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("--ca-file"), "{out:?}");
    // Another CA, or another name: the certificate does not verify.
    let other = other_ca.display().to_string();
    let out = c.shoal(0).run(&["--ca-file", &other, "--tls-name", "control.test", "status"]).await?;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("UnknownIssuer"), "{out:?}");
    let out = c.shoal(0).run(&["--ca-file", &ca_arg, "--tls-name", "elsewhere.test", "status"]).await?;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.to_lowercase().contains("name"), "{out:?}");

    // Node 2 joins through node 1's control port over TLS (node to node, pinned).
    let seed = c[0].control.to_string();
    let out = c.shoal(1).run(&["--ca-file", &ca_arg, "--tls-name", "control.test", "join", &seed]).await?;
    assert_eq!(out.code, 0, "{out:?}");
    let ids = c.ids();
    let want = [(ids[0].as_str(), "alive"), (ids[1].as_str(), "alive")];
    wait_members(&[&c[0], &c[1]], &want, Duration::from_secs(5)).await?;

    // Node 3 serves a certificate the cluster does not: its join through node 1 is refused,
    // because node 1's certificate is not one of node 3's own.
    let out = c.shoal(2).run(&["--ca-file", &ca_arg, "--tls-name", "control.test", "join", &seed]).await?;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("not one of this cluster's certificates"), "{out:?}");
    Ok(())
}

#[test]
fn control_tls_needs_a_certificate_file() -> R {
    let dir = TempDir::new("tls-control-check")?;
    let (out, _) = shoald_check(&dir, "shoal.toml", "[tls]\nlisten = \"127.0.0.1:8443\"\ncontrol = true\n")?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls.control needs a certificate file"), "{stderr}");
    Ok(())
}
