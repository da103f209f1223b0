//! `shoal import-nginx` on the nginx configs users arrive with (the seed chapter's examples,
//! copied into `fixtures/`), run as a user would: the binary, a file, stdout and stderr.
//!
//! The output is parsed as TOML and compared value by value with what each nginx file means,
//! and then given to `shoald check` (README: "like nginx -t"), which must accept it: the
//! importer's output is a config `shoald` runs, not just text that looks like one. `shoald
//! check` runs in `fixtures/`, so relative certificate paths find the test certificates there
//! (`www.example.com.pem`, `api.example.com.pem`: self-signed, P-256, valid 2020-2120), as nginx
//! finds them in its prefix directory.

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
fn ip_hash_and_sticky_example_makes_the_second_upstream_a_second_pool() {
    let (toml, warnings, ok) = import("03-ip-hash-and-sticky.conf");
    assert!(ok);
    assert!(toml.contains("[upstream]\nalgorithm = \"ip-hash\""), "{toml}");
    // nginx itself refuses two upstreams of one name; the second is its own pool.
    assert!(toml.contains("[upstreams.app_servers-2]\nalgorithm = \"cookie\""), "{toml}");
    assert!(toml.contains("[upstreams.app_servers-2.sticky]\ncookie = \"srv_id\"\nexpires = \"1h\""), "{toml}");
    assert!(!warnings.contains("one backend pool"), "{warnings}");
    assert!(warnings.contains("line 9: upstream app_servers — nginx refuses a second upstream"), "{warnings}");
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

/// Imports fixture `name` and parses stdout as TOML; returns the table, the text and stderr.
fn import_parse(name: &str) -> (toml::Table, String, String) {
    let (text, warnings, ok) = import(name);
    assert!(ok, "import-nginx {name} failed: {warnings}");
    let table: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: output is not TOML ({e}):\n{text}"));
    (table, text, warnings)
}

/// Imports fixture `name`, parses stdout as TOML, and checks it with `shoald check`; returns
/// the parsed table and what `shoald check` printed.
fn import_parse_check(name: &str) -> (toml::Table, String) {
    let (table, text, _) = import_parse(name);
    (table, shoald_check(name, &text))
}

/// `shoald check --config` on `text` (the output of importing fixture `name`), run in
/// `fixtures/` like nginx in its prefix; it must pass. Returns what it printed.
fn shoald_check(name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("shoal-import-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = Command::new(shoald())
        .args(["check", "--config"])
        .arg(&path)
        .current_dir(fixtures)
        .output()
        .expect("run shoald check");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "shoald check refused the output of import-nginx {name} ({}):\n{}\n--- the file ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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
    // The first upstream (no server uses either) is the default pool; the second, of the same
    // name (which nginx refuses: the example shows two alternatives), is a pool of its own.
    let want = expected(
        r#"
[upstream]
algorithm = "ip-hash"
[[upstream.backend]]
addr = "10.132.2.31:80"
[[upstream.backend]]
addr = "10.132.4.55:80"
[upstreams.app_servers-2]
algorithm = "cookie"
[[upstreams.app_servers-2.backend]]
addr = "10.132.2.31:80"
[[upstreams.app_servers-2.backend]]
addr = "10.132.4.55:80"
[upstreams.app_servers-2.sticky]
cookie = "srv_id"
expires = "1h"
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

// ---------------------------------------------------------------------------------------------
// Whole sites: several pools, routes by host and path, redirects, TLS
// ---------------------------------------------------------------------------------------------

/// Asserts that stderr holds exactly the warnings `want`: each (line, fragment) matches one
/// `warning: line N: ...` whose text contains the fragment, and there are no others.
fn assert_warnings(stderr: &str, want: &[(usize, &str)]) {
    let mut got: Vec<(usize, &str)> = stderr
        .lines()
        .map(|l| {
            let rest = l.strip_prefix("warning: line ").unwrap_or_else(|| panic!("not a warning: {l:?}"));
            let (n, text) = rest.split_once(": ").unwrap_or_else(|| panic!("no line number: {l:?}"));
            (n.parse().unwrap_or_else(|_| panic!("no line number: {l:?}")), text)
        })
        .collect();
    for (line, fragment) in want {
        let Some(i) = got.iter().position(|(n, text)| n == line && text.contains(fragment)) else {
            panic!("no warning for line {line} with {fragment:?} in\n{stderr}");
        };
        got.remove(i);
    }
    assert!(got.is_empty(), "warnings not expected: {got:#?}\nall:\n{stderr}");
}

/// The two-site example: www and api host names, `*.example.com`, a redirect server, TLS.
const TWO_SITES: &str = "05-two-sites-tls.conf";

#[test]
fn two_sites_example_parses_to_its_pools_and_routes() {
    let (got, text, _) = import_parse(TWO_SITES);
    let want = expected(
        r#"
[node]
listen = "0.0.0.0:80"              # the plain server; it only redirects to https
keepalive_timeout = "65s"

[tls]
listen = "0.0.0.0:443"
# Four TLS servers, two certificate pairs: each pair once.
certificates = [
  { cert = "www.example.com.pem", key = "www.example.com.key" },
  { cert = "api.example.com.pem", key = "api.example.com.key" },
]
min_version = "1.2"
redirect_http = true               # listen 80 ... return 301 https://$host$request_uri

# The catch-all site (default_server on 443) proxies `location /` to "web": the default pool.
[upstream]
algorithm = "least-conn"
keepalive = 16
connect_timeout = "3s"             # proxy_*_timeout from http { }, inherited by the locations
read_timeout = "30s"
[[upstream.backend]]
addr = "10.0.1.10:8080"
weight = 2
[[upstream.backend]]
addr = "10.0.1.11:8080"

[upstreams.api]
algorithm = "round-robin"
connect_timeout = "3s"
read_timeout = "30s"               # the first location's; api.example.com's 120s is warned
[[upstreams.api.backend]]
addr = "10.0.2.10:9000"
max_fails = 2
fail_timeout = "10s"
[[upstreams.api.backend]]
addr = "10.0.2.11:9000"
max_fails = 2
fail_timeout = "10s"
[upstreams.api.health]
interval = "2000ms"
rise = 2
fall = 2
timeout = "500ms"
type = "http"
path = "/healthz"
[upstreams.api.rate_limit]         # limit_req in the locations that proxy to api
rate = "50r/s"
burst = 100
nodelay = true

[upstreams.shop-backend]           # upstream shop.backend
algorithm = "ip-hash"
connect_timeout = "3s"
read_timeout = "30s"
[[upstreams.shop-backend.backend]]
addr = "10.0.3.10:8000"
[[upstreams.shop-backend.backend]]
addr = "10.0.3.11:8000"

[upstreams.addr-10-0-1-10-8080]    # proxy_pass http://10.0.1.10:8080 (= /healthz)
algorithm = "round-robin"
connect_timeout = "3s"
read_timeout = "30s"
[[upstreams.addr-10-0-1-10-8080.backend]]
addr = "10.0.1.10:8080"

[upstreams.addr-10-0-4-20-8080]    # proxy_pass http://10.0.4.20:8080/assets/ (warned)
algorithm = "round-robin"
connect_timeout = "3s"
read_timeout = "30s"
[[upstreams.addr-10-0-4-20-8080.backend]]
addr = "10.0.4.20:8080"

# The redirect server: one route per name.
[[route]]
host = "old.example.com"
redirect = "https://www.example.com"
[[route]]
host = "example.net"
redirect = "https://www.example.com"

# The catch-all site, for any host (its `location /` is the default: not written)...
[[route]]
path = "/api/"
upstream = "api"
strip_prefix = true                # proxy_pass http://api/;
[[route]]
path = "=/healthz"
upstream = "addr-10-0-1-10-8080"
# ...and for www.example.com, which *.example.com would take in Shoal (not in nginx, where
# an exact name wins); example.com is not under *.example.com.
[[route]]
host = "www.example.com"
upstream = "default"
[[route]]
host = "www.example.com"
path = "/api/"
upstream = "api"
strip_prefix = true
[[route]]
host = "www.example.com"
path = "=/healthz"
upstream = "addr-10-0-1-10-8080"

[[route]]
host = "api.example.com"
upstream = "api"
[[route]]
host = "api.example.com"
path = "/v1/"                      # location ^~ /v1/ { proxy_pass http://api/v1/; }: same path
upstream = "api"

[[route]]
host = "*.example.com"
upstream = "shop-backend"
[[route]]
host = "*.example.com"
path = "/static/"
upstream = "addr-10-0-4-20-8080"

[access_log]
path = "/var/log/nginx/access.log"
"#,
    );
    assert_eq!(got, want, "output:\n{text}");
    // Pools first (the default, then file order), then routes in file order.
    let pools = ["[upstream]", "[upstreams.api]", "[upstreams.shop-backend]", "[upstreams.addr-10-0-1-10-8080]"];
    let at: Vec<usize> = pools.iter().map(|p| text.find(&format!("\n{p}\n")).expect(p)).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert!(text.rfind("\n[upstreams.").unwrap() < text.find("\n[[route]]").unwrap(), "{text}");
}

#[test]
fn two_sites_example_warns_for_what_does_not_map() {
    let (_, _, warnings) = import_parse(TWO_SITES);
    // No warning for proxy_set_header Host/X-Forwarded-*/Upgrade/Connection, proxy_http_version,
    // `listen ... http2`, worker_processes auto or the duplicate certificate pairs.
    assert_warnings(
        &warnings,
        &[
            (4, "user nginx — not needed"),
            (7, "events — not needed"),
            (12, "include mime.types — not followed"),
            (35, "upstream shop.backend — converted as pool \"shop-backend\""),
            (45, "return 301 https://$host$request_uri — mapped to [tls] redirect_http = true (Shoal answers 308"),
            (52, "www.example.com.pem — a relative path"),
            (52, "www.example.com.key — a relative path"),
            (
                54,
                "return 301 https://www.example.com$request_uri — mapped to redirect = \"https://www.example.com\": Shoal answers 308 (nginx: 301)",
            ),
            (64, "ssl_session_cache shared:SSL:10m — not needed"),
            (83, "access_log off — Shoal writes every request to its one access log"),
            (86, "location ~* \\.(png|jpg|css|js)$ — regex locations are not mapped (skipped with everything inside)"),
            (96, "api.example.com.pem — a relative path"),
            (96, "api.example.com.key — a relative path"),
            (99, "location / — read_timeout = \"120s\" here, \"30s\" in the location at line 76"),
            (105, "location ^~ /v1/ — mapped as prefix /v1/: ^~"),
            (105, "location ^~ /v1/ — no limit_req here, but pool \"api\" has the one of line 77"),
            (122, "proxy_pass http://10.0.4.20:8080/assets/ — the URI /assets/ is not mapped"),
        ],
    );
}

#[test]
fn two_sites_example_passes_shoald_check() {
    let (_, text, _) = import_parse(TWO_SITES);
    // [tls] certificates are read: shoald check runs in fixtures/, next to them.
    let check = shoald_check(TWO_SITES, &text);
    assert!(check.contains("ok ("), "{check}");
}

/// A conf.d file: no upstream blocks (pools made from proxy_pass addresses), no TLS.
const PLAIN_SITES: &str = "06-plain-sites.conf";

#[test]
fn plain_sites_example_parses_to_its_values_and_warns() {
    let (got, text, warnings) = import_parse(PLAIN_SITES);
    let want = expected(
        r#"
[node]
listen = "0.0.0.0:8080"            # the second address (8081) is warned

# The first server is the catch-all site: its `location /` pool is the default.
[upstream]
algorithm = "round-robin"
[[upstream.backend]]
addr = "10.0.5.10:3000"

[upstreams.addr-10-0-5-20-3000]
algorithm = "round-robin"
[[upstreams.addr-10-0-5-20-3000.backend]]
addr = "10.0.5.20:3000"

# The pool of the server with only a regex name: kept, with no route to it.
[upstreams.addr-10-0-5-30-3000]
algorithm = "round-robin"
[[upstreams.addr-10-0-5-30-3000.backend]]
addr = "10.0.5.30:3000"

[[route]]
path = "/admin/"
upstream = "addr-10-0-5-20-3000"
strip_prefix = true

[[route]]
path = "/old/"
redirect = "https://archive.example.org"
"#,
    );
    assert_eq!(got, want, "output:\n{text}");
    assert_warnings(
        &warnings,
        &[
            (12, "location /admin/debug/ — nested locations are not mapped"),
            (
                18,
                "return 302 https://archive.example.org — mapped to redirect = \"https://archive.example.org\": Shoal answers 308 (nginx: 302, permanent where nginx's was temporary); nginx sent every request to that one URL, Shoal keeps the request's path and query",
            ),
            (22, "server — none of its server_name values can be mapped"),
            (24, "regex name ~^(?<user>.+)\\.users\\.example\\.org$ is not mapped"),
            (32, "listen 8081 — Shoal has one plain HTTP listener (0.0.0.0:8080, from line 3)"),
            (
                34,
                "return 301 https://$host$request_uri — Shoal redirects to https with [tls] redirect_http, which needs a TLS server",
            ),
        ],
    );
}

#[test]
fn plain_sites_example_passes_shoald_check() {
    let (_, text, _) = import_parse(PLAIN_SITES);
    let check = shoald_check(PLAIN_SITES, &text);
    assert!(check.contains("ok ("), "{check}");
}
