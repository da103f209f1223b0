//! `shoal import-nginx` on the nginx configs users arrive with (the seed chapter's examples,
//! copied into `fixtures/`), run as a user would: the binary, a file, stdout and stderr.
//!
//! The output is parsed as TOML and compared value by value with what each nginx file means,
//! and then given to `shoald check` (README: "like nginx -t"), which must accept it: the
//! importer's output is a config `shoald` runs, not just text that looks like one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

// ---------------------------------------------------------------------------------------------
// Parsed output, and `shoald check` on it
// ---------------------------------------------------------------------------------------------

/// `shoald`, built once per test process next to `shoal` (same target dir and profile).
fn shoald() -> &'static Path {
    static SHOALD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = SHOALD.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(&cargo)
            .args(["build", "-p", "shoal-node", "--bin", "shoald"])
            .current_dir(&root)
            .output()
            .map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!("building shoald failed:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
        let dir = Path::new(env!("CARGO_BIN_EXE_shoal")).parent().map(Path::to_path_buf).unwrap_or_default();
        let p = dir.join("shoald");
        if p.is_file() { Ok(p) } else { Err(format!("{} does not exist after the build", p.display())) }
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Imports fixture `name`, parses stdout as TOML, and checks it with `shoald check`; returns
/// the parsed table and what `shoald check` printed.
fn import_parse_check(name: &str) -> (toml::Table, String) {
    let (text, warnings, ok) = import(name);
    assert!(ok, "import-nginx {name} failed: {warnings}");
    let table: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: output is not TOML ({e}):\n{text}"));
    let path = std::env::temp_dir().join(format!("shoal-import-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(shoald()).args(["check", "--config"]).arg(&path).output().expect("run shoald check");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "shoald check refused the output of import-nginx {name} ({}):\n{}\n--- the file ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (table, stdout)
}

fn expected(toml_text: &str) -> toml::Table {
    toml::from_str(toml_text).expect("expected TOML")
}

#[test]
fn least_conn_example_parses_to_its_values_and_passes_shoald_check() {
    let (got, check) = import_parse_check("01-least-conn.conf");
    let want = expected(
        r#"
[node]
listen = "0.0.0.0:80"
[upstream]
algorithm = "least-conn"
[[upstream.backend]]
addr = "10.132.2.31:80"
[[upstream.backend]]
addr = "10.132.4.55:80"
"#,
    );
    assert_eq!(got, want);
    assert!(check.contains("ok (2 backends, algorithm least-conn"), "{check}");
}

#[test]
fn health_check_example_parses_to_its_values_and_passes_shoald_check() {
    let (got, check) = import_parse_check("02-health-check.conf");
    let want = expected(
        r#"
[upstream]
algorithm = "least-conn"
[[upstream.backend]]
addr = "10.132.2.31:80"
max_fails = 3
fail_timeout = "30s"
[[upstream.backend]]
addr = "10.132.4.55:80"
max_fails = 3
fail_timeout = "30s"
[[upstream.backend]]
addr = "10.132.6.88:80"
backup = true
[health]
interval = "3000ms"
rise = 2
fall = 3
timeout = "1000ms"
type = "http"
path = "/health"
expect = ["2xx", "3xx"]
"#,
    );
    assert_eq!(got, want);
    assert!(check.contains("ok (3 backends, algorithm least-conn"), "{check}");
}

#[test]
fn ip_hash_example_parses_to_its_values_and_passes_shoald_check() {
    let (got, check) = import_parse_check("03-ip-hash-and-sticky.conf");
    // Only the first upstream is converted (warned about); its ip_hash and two servers.
    let want = expected(
        r#"
[upstream]
algorithm = "ip-hash"
[[upstream.backend]]
addr = "10.132.2.31:80"
[[upstream.backend]]
addr = "10.132.4.55:80"
"#,
    );
    assert_eq!(got, want);
    assert!(check.contains("ok (2 backends, algorithm ip-hash"), "{check}");
}

#[test]
fn production_example_parses_to_its_values_and_passes_shoald_check() {
    let (got, check) = import_parse_check("04-production.conf");
    let want = expected(
        r#"
[node]
listen = "0.0.0.0:80"
[upstream]
algorithm = "least-conn"
keepalive = 32
connect_timeout = "5s"
read_timeout = "60s"
[[upstream.backend]]
addr = "10.132.2.31:8000"
weight = 3
max_fails = 3
fail_timeout = "30s"
max_conns = 1000
[[upstream.backend]]
addr = "10.132.4.55:8000"
weight = 2
[[upstream.backend]]
addr = "10.132.6.88:8000"
backup = true
[rate_limit]
rate = "10r/s"
burst = 20
nodelay = true
[access_log]
path = "/var/log/nginx/xiaodiantong_access.log"
"#,
    );
    assert_eq!(got, want);
    assert!(check.contains("ok (3 backends, algorithm least-conn"), "{check}");
}
