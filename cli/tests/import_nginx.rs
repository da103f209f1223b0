//! `shoal import-nginx` on the nginx configs users arrive with (the seed chapter's examples,
//! copied into `fixtures/`), run as a user would: the binary, a file, stdout and stderr.

use std::process::Command;

fn import(name: &str) -> (String, String, bool) {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["import-nginx", &path]).output().expect("run shoal");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn least_conn_example() {
    let (toml, _, ok) = import("01-least-conn.conf");
    assert!(ok);
    assert!(toml.contains("algorithm = \"least-conn\""));
    assert!(toml.contains("addr = \"10.132.2.31:80\""));
    assert!(toml.contains("addr = \"10.132.4.55:80\""));
}

#[test]
fn health_check_example() {
    let (toml, _, ok) = import("02-health-check.conf");
    assert!(ok);
    assert!(toml.contains("max_fails = 3\nfail_timeout = \"30s\""));
    assert!(toml.contains("backup = true"));
    assert!(toml.contains("[health]\ninterval = \"3000ms\"\nrise = 2\nfall = 3\ntimeout = \"1000ms\"\ntype = \"http\"\npath = \"/health\"\nexpect = [\"2xx\", \"3xx\"]"));
}

#[test]
fn ip_hash_and_sticky_example_warns_about_the_second_upstream() {
    let (toml, warnings, ok) = import("03-ip-hash-and-sticky.conf");
    assert!(ok);
    assert!(toml.contains("algorithm = \"ip-hash\""));
    assert!(warnings.contains("one backend pool"), "{warnings}");
}

#[test]
fn production_example() {
    let (toml, warnings, ok) = import("04-production.conf");
    assert!(ok);
    for want in [
        "listen = \"0.0.0.0:80\"",
        "keepalive = 32",
        "connect_timeout = \"5s\"",
        "weight = 3\nmax_fails = 3\nfail_timeout = \"30s\"\nmax_conns = 1000",
        "rate = \"10r/s\"\nburst = 20\nnodelay = true",
        "path = \"/var/log/nginx/xiaodiantong_access.log\"",
    ] {
        assert!(toml.contains(want), "missing {want:?} in\n{toml}");
    }
    assert!(warnings.contains("proxy_buffering"), "{warnings}");
}

#[test]
fn not_an_upstream_file_fails_with_a_reason() {
    let path = std::env::temp_dir().join(format!("shoal-import-{}.conf", std::process::id()));
    std::fs::write(&path, "server { listen 80; }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal")).args(["import-nginx"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `upstream"));
    let _ = std::fs::remove_file(path);
}
