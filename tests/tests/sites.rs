//! Sites (PRODUCT.md §8): named pools (`[upstreams.NAME]`) and `[[route]]`s, held to the
//! contract from outside, as a user runs Shoal: real `shoald` processes, real clients (`curl`
//! over HTTP/1.1 and HTTP/2 with prior knowledge, and the harness's client), the `shoal` CLI
//! (`--json`) and `shoald check`.
//!
//! What this file proves:
//! - requests go to the pool of the route that matches: exact host > longest `*.suffix` >
//!   any host, then `=/exact` path > longest prefix, else the default pool; the host is
//!   matched without case and without port, the path without its query and after
//!   percent-decoding; `strip_prefix` hands the backend exactly the rest of the target (the
//!   answering backend names itself and the target it received);
//! - a redirect route answers 308 with the origin plus the path and query, over both protocols;
//! - `shoal route add/remove` and `shoal backend add --upstream` on one node reach every node
//!   through the registry (the time it takes is printed), and a node restarted from its data dir
//!   routes by what it persisted before any gossip;
//! - `shoald check` refuses each kind of bad route or pool with the file, the line and a message
//!   naming the problem, and prints the pools of a good config;
//! - `/metrics`, `/status`, `shoal upstream list` and the access log count and name requests
//!   per pool and route;
//! - the CLI refuses a pool that does not exist, naming it and the pools there are.
//!
//! Every wait has a deadline; nothing sleeps for a condition.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;
use shoal_tests::cluster::find_backend;
use shoal_tests::http::get_with;
use shoal_tests::raw::{RawConn, RawServer};
use shoal_tests::tls::curl;
use shoal_tests::{Cluster, Node, Shoal, TempDir, shoald_check, wait_until};

type R = anyhow::Result<()>;

/// How long a registry change (route or backend) may take to reach another node: a few gossip
/// rounds of 150 ms, with room for a shared 2-core machine.
const PROPAGATION_DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A backend that answers every request `200` with the body `<name> <target it received>`
/// (and `x-backend: <name>`), so a test reads both which pool answered and what path the
/// backend saw.
async fn site_backend(name: &str) -> anyhow::Result<RawServer> {
    let name: Arc<str> = name.into();
    RawServer::start(move |mut c: RawConn| {
        let name = name.clone();
        async move {
            for _ in 0..10_000 {
                let Some(req) = c.read_request(Duration::from_secs(60)).await? else { return Ok(()) };
                let body = format!("{name} {}", req.head.target());
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n", body.len());
                c.write(format!("{head}{body}").as_bytes()).await?;
            }
            Ok(())
        }
    })
    .await
}

/// `(backend name, target it received)` from a [`site_backend`] answer.
fn answered(body: &str) -> (&str, &str) {
    body.split_once(' ').unwrap_or((body, ""))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    const BOTH: [Proto; 2] = [Proto::H1, Proto::H2];

    fn flag(self) -> &'static str {
        match self {
            Proto::H1 => "--http1.1",
            Proto::H2 => "--http2-prior-knowledge",
        }
    }
}

/// A response as `curl -i` printed it.
#[derive(Debug)]
struct Got {
    /// `HTTP/1.1` or `HTTP/2`.
    version: String,
    status: u16,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `curl -i` GET `http://<proxy><target>` with `Host: <host>` (over HTTP/2, curl sends it as
/// `:authority`), the target sent as is.
async fn curl_get(proxy: SocketAddr, host: &str, target: &str, proto: Proto) -> anyhow::Result<Got> {
    let url = format!("http://{proxy}{target}");
    let host_field = format!("Host: {host}");
    let out = curl(&["-i", "--path-as-is", proto.flag(), "-H", &host_field, &url]).await?;
    if !out.status.success() {
        bail!("curl {proto:?} {host} {target}: {out:?}");
    }
    let (head, body) = out.stdout.split_once("\r\n\r\n").with_context(|| format!("no head in {out:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default().to_string();
    let status = parts.next().and_then(|s| s.parse().ok()).with_context(|| format!("status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Got { version, status, headers, body: body.to_string() })
}

/// `GET <target>` with `Host: <host>` through `proxy` (harness client): `(status, body)`.
async fn get_host(proxy: SocketAddr, host: &str, target: &str) -> anyhow::Result<(u16, String)> {
    let r = get_with(proxy, target, &[("host", host)]).await?;
    Ok((r.status.as_u16(), r.body))
}

/// Polls `GET <target>` through `proxy` until a [`site_backend`] named `backend` answers it
/// having received `seen` (any target when `None`); returns how long that took.
async fn wait_routed(
    proxy: SocketAddr,
    target: &str,
    backend: &str,
    seen: Option<&str>,
    what: &str,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last = String::new();
    let result =
        wait_until(PROPAGATION_DEADLINE, what, async || match get_host(proxy, "www.example.com", target).await {
            Ok((200, body)) => {
                let (name, got) = answered(&body);
                let ok = name == backend && seen.is_none_or(|s| s == got);
                last = body;
                ok
            }
            Ok((status, body)) => {
                last = format!("{status} {body}");
                false
            }
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        })
        .await;
    result.with_context(|| format!("GET {target} via {proxy}: last answer {last:?}"))?;
    Ok(start.elapsed())
}

/// The entry of pool `name` in a JSON array of pools (`/status` `pools`, `shoal upstream list`).
fn pool<'a>(pools: &'a Value, name: &str) -> Option<&'a Value> {
    pools.as_array()?.iter().find(|p| p["name"] == name)
}

/// The route with `path` (and any host) in a JSON array of routes.
fn route_at<'a>(routes: &'a Value, host: &str, path: &str) -> Option<&'a Value> {
    routes.as_array()?.iter().find(|r| r["host"] == host && r["path"] == path)
}

/// 32 bytes of cluster secret, unique to this run (no whitespace: shoald trims the file).
fn secret32(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let s = format!("{tag}-{nanos:x}-{:x}-0123456789abcdefghijklmnopqrstuvwxyz", std::process::id());
    s[..32].to_string()
}

/// What a node persisted in `data_dir/shoal-state.bin`, routes included (state format 3:
/// `format, generation, registry, certs, routes`), read with mirror types of that layout so the
/// restart test knows the route is on disk before it kills the node.
mod persisted {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    pub enum Op {
        Add,
        Remove,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // read only to reach `routes`
    struct Cert {
        name: String,
        hlc: u64,
        op: Op,
        origin: String,
        sealed: Vec<u8>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[allow(dead_code)] // the layout's every field, not all compared
    pub struct Route {
        pub host: String,
        pub path: String,
        pub hlc: u64,
        pub op: Op,
        pub upstream: String,
        pub strip_prefix: bool,
        pub redirect: String,
        pub origin: String,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // read only to reach `routes`
    struct State {
        format: u32,
        generation: u64,
        registry: Vec<shoal_tests::state::RegEntry>,
        certs: Vec<Cert>,
        routes: Vec<Route>,
    }

    /// The persisted route entry for `host` + `path`, if any.
    pub fn route(data_dir: &Path, host: &str, path: &str) -> Option<Route> {
        let bytes = std::fs::read(data_dir.join("shoal-state.bin")).ok()?;
        let (state, _): (State, usize) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).ok()?;
        state.routes.into_iter().find(|r| r.host == host && r.path == path)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Routing by host and path
// ---------------------------------------------------------------------------------------------

fn three_pools_config(web: &RawServer, api: &RawServer, stat: &RawServer) -> String {
    format!(
        r#"[upstream]
algorithm = "round-robin"
[[upstream.backend]]
addr = "{web}"

[upstreams.api]
algorithm = "round-robin"
[[upstreams.api.backend]]
addr = "{api}"

[upstreams.static]
[[upstreams.static.backend]]
addr = "{stat}"

[[route]]
host = "api.example.com"
upstream = "api"

[[route]]
path = "/static/"
upstream = "static"

[[route]]
host = "*.cdn.example.com"
upstream = "static"

[[route]]
path = "=/healthz"
upstream = "api"

[[route]]
host = "api.example.com"
path = "/v1/"
upstream = "api"
strip_prefix = true
"#,
        web = web.addr,
        api = api.addr,
        stat = stat.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_to_three_pools() -> R {
    let (web, api, stat) = (site_backend("web").await?, site_backend("api").await?, site_backend("static").await?);
    let node = Node::builder("sites-routes").config(three_pools_config(&web, &api, &stat)).start().await?;

    // (what, Host, target, backend that must answer, target it must receive (None: not checked))
    let cases: [(&str, &str, &str, &str, Option<&str>); 15] = [
        ("no route matches: the default pool", "www.example.com", "/", "web", Some("/")),
        ("exact host, any case, with a port", "API.Example.COM:8080", "/x", "api", Some("/x")),
        ("exact host, lower case", "api.example.com", "/other?a=b", "api", Some("/other?a=b")),
        ("*.suffix, two labels deep", "x.y.cdn.example.com", "/img.png", "static", Some("/img.png")),
        ("*.suffix does not match the bare domain", "cdn.example.com", "/img.png", "web", Some("/img.png")),
        ("*.suffix is a label boundary", "evilcdn.example.com", "/img.png", "web", Some("/img.png")),
        ("any-host prefix", "www.example.com", "/static/a.css", "static", Some("/static/a.css")),
        ("any-host prefix, another host", "shop.test", "/static/a.css", "static", Some("/static/a.css")),
        ("an exact host beats an any-host path", "api.example.com", "/static/a.css", "api", Some("/static/a.css")),
        ("exact path", "www.example.com", "/healthz", "api", Some("/healthz")),
        ("exact path, the query aside", "www.example.com", "/healthz?full=1", "api", Some("/healthz?full=1")),
        ("exact path is not a prefix", "www.example.com", "/healthz/x", "web", Some("/healthz/x")),
        ("strip_prefix keeps the rest and the query", "api.example.com", "/v1/users?q=1", "api", Some("/users?q=1")),
        ("strip_prefix of the whole prefix is /", "api.example.com", "/v1/", "api", Some("/")),
        ("percent-encoded path is matched decoded", "www.example.com", "/%73tatic/x", "static", None),
    ];
    let mut problems = Vec::new();
    for proto in Proto::BOTH {
        for (what, host, target, want, seen) in cases {
            let got = curl_get(node.proxy, host, target, proto).await?;
            let want_version = if proto == Proto::H2 { "HTTP/2" } else { "HTTP/1.1" };
            let (name, got_target) = answered(&got.body);
            let ok = got.status == 200
                && got.version == want_version
                && name == want
                && seen.is_none_or(|s| s == got_target);
            println!("{proto:?} Host {host} {target} -> {} {:?} ({what})", got.status, got.body);
            if !ok {
                problems.push(format!(
                    "{proto:?} {what}: Host {host:?} GET {target:?}: want 200 {want_version} from {want:?}{}, got {} {} {:?}",
                    seen.map(|s| format!(" receiving {s:?}")).unwrap_or_default(),
                    got.version,
                    got.status,
                    got.body
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} requests went wrong:\n{}",
        problems.len(),
        2 * cases.len(),
        problems.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Redirect routes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_route() -> R {
    let web = site_backend("web").await?;
    let config = format!(
        "[upstream]\n[[upstream.backend]]\naddr = \"{}\"\n\n[[route]]\nhost = \"old.example.com\"\nredirect = \"https://www.example.com\"\n",
        web.addr
    );
    let node = Node::builder("sites-redirect").config(config).start().await?;
    for proto in Proto::BOTH {
        for host in ["old.example.com", "OLD.Example.com:8080"] {
            let got = curl_get(node.proxy, host, "/a/b?c=1", proto).await?;
            assert_eq!(got.status, 308, "{proto:?} Host {host}: {got:?}");
            assert_eq!(
                got.header("location"),
                Some("https://www.example.com/a/b?c=1"),
                "{proto:?} Host {host}: {got:?}"
            );
            assert_eq!(got.header("x-shoal-node"), Some("sites-redirect"), "{proto:?} Host {host}: {got:?}");
        }
        // Another host is served by the default pool.
        let got = curl_get(node.proxy, "www.example.com", "/a/b?c=1", proto).await?;
        assert_eq!((got.status, got.body.as_str()), (200, "web /a/b?c=1"), "{proto:?}: {got:?}");
    }
    assert_eq!(web.requests().len(), 2, "only the two requests for www reached the backend");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Run-time routes and pool backends across a cluster, and across a restart
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_added_on_one_node_applies_on_another_and_survives_restart() -> R {
    let (web, api1, api2) = (site_backend("web").await?, site_backend("api-1").await?, site_backend("api-2").await?);
    let config = format!(
        "[upstream]\n[[upstream.backend]]\naddr = \"{}\"\n\n[upstreams.api]\nalgorithm = \"round-robin\"\n[[upstreams.api.backend]]\naddr = \"{}\"\n",
        web.addr, api1.addr
    );
    let mut c =
        Cluster::builder("sites-rt", 3).config(&config).secret(&secret32("sites-rt")).data_dirs().start().await?;
    c.wait_converged(Duration::from_secs(10)).await?;
    // Before: /new/ is nobody's, the default pool serves it unchanged.
    let before = get_host(c[2].proxy, "www.example.com", "/new/x").await?;
    assert_eq!(before, (200, "web /new/x".into()), "before the route exists");

    // A route added on node 1 ...
    let t0 = Instant::now();
    let added = c.shoal(0).json(&["route", "add", "--path", "/new/", "--upstream", "api", "--strip-prefix"]).await?;
    let cli_took = t0.elapsed();
    let r = route_at(&added["routes"], "", "/new/").with_context(|| format!("route add answered {added}"))?;
    assert_eq!((r["upstream"].clone(), r["strip_prefix"].clone()), ("api".into(), true.into()), "{added}");
    // ... routes on node 3.
    let took = wait_routed(c[2].proxy, "/new/x", "api-1", Some("/x"), "node 3 routes /new/ to api, stripped").await?;
    println!("route added on node 1 routes on node 3 {took:?} after `shoal route add` returned ({cli_took:?})");
    // `shoal route list` on node 2 shows it, from the registry.
    let mut listed = Value::Null;
    wait_until(PROPAGATION_DEADLINE, "node 2 lists the route", async || {
        listed = c.shoal(1).json(&["route", "list"]).await.unwrap_or_default();
        route_at(&listed["routes"], "", "/new/").is_some()
    })
    .await
    .with_context(|| format!("last list: {listed}"))?;
    let r = route_at(&listed["routes"], "", "/new/").cloned().unwrap_or_default();
    assert_eq!(r["source"], "runtime", "{listed}");
    assert_eq!(r["upstream"], "api", "{listed}");
    assert_eq!(r["strip_prefix"], true, "{listed}");
    assert_eq!(r["name"], "*/new/", "{listed}");
    assert!(r["redirect"].as_str().is_none_or(str::is_empty), "{listed}");

    // A backend added to pool api on node 2 takes api's requests through node 3.
    let t0 = Instant::now();
    let added = c.shoal(1).json(&["backend", "add", &api2.addr.to_string(), "--upstream", "api"]).await?;
    let entry = find_backend(&added, api2.addr).with_context(|| format!("backend add answered {added}"))?;
    assert_eq!(entry["pool"], "api", "{added}");
    let took = wait_routed(c[2].proxy, "/new/y", "api-2", Some("/y"), "node 3 sends api requests to api-2").await?;
    println!(
        "backend added to pool api on node 2 served through node 3 after {took:?} ({:?} since the CLI call)",
        t0.elapsed()
    );
    // Round-robin over api-1 and api-2; the default pool did not get api-2.
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = get_host(c[2].proxy, "www.example.com", "/new/z").await?;
        assert_eq!(status, 200, "{body}");
        seen.push(answered(&body).0.to_string());
        let (status, body) = get_host(c[2].proxy, "www.example.com", "/").await?;
        assert_eq!((status, body.as_str()), (200, "web /"), "the default pool keeps its one backend");
    }
    assert!(seen.iter().any(|s| s == "api-1") && seen.iter().any(|s| s == "api-2"), "api answers: {seen:?}");
    assert!(seen.iter().all(|s| s.starts_with("api-")), "api answers: {seen:?}");
    let s3 = c[2].status_json().await?;
    let e = find_backend(&s3["backends"], api2.addr).with_context(|| format!("node 3 /status: {s3}"))?;
    assert_eq!(e["pool"], "api", "{e}");

    // Node 3 has both on disk; killed and started again, it routes by what it persisted.
    let data3 = c.dir().join(format!("data-{}", c[2].id));
    wait_until(Duration::from_secs(3), "node 3 persisted the route and the backend", async || {
        let route = persisted::route(&data3, "", "/new/");
        let backend = shoal_tests::state::entry_in(&data3, "api", api2.addr);
        route.is_some_and(|r| r.op == persisted::Op::Add && r.upstream == "api" && r.strip_prefix)
            && backend.is_some_and(|b| b.op == shoal_tests::state::RegOp::Add)
    })
    .await?;
    c[2].kill9();
    let t0 = Instant::now();
    c.restart_node(3).await?;
    let up = t0.elapsed();
    let first = get_host(c[2].proxy, "www.example.com", "/new/x").await?;
    let log = c[2].log_plain();
    assert_eq!(first.0, 200, "restarted node 3: {first:?}");
    assert!(
        ["api-1 /x", "api-2 /x"].contains(&first.1.as_str()),
        "restarted node 3 ({up:?} to /live) routes /new/x to api, stripped, right away: got {first:?}"
    );
    let gossiped: Vec<&str> =
        log.lines().filter(|l| l.contains("registry changed through gossip") && l.contains("routes=true")).collect();
    assert!(gossiped.is_empty(), "node 3 had to learn the routes from gossip, not from its disk: {gossiped:?}");
    let s3 = c[2].status_json().await?;
    let e = find_backend(&s3["backends"], api2.addr).with_context(|| format!("restarted node 3 /status: {s3}"))?;
    assert_eq!(e["pool"], "api", "{e}");
    println!("node 3 restarted from its data dir in {up:?}; its first /new/x went to {:?}", first.1);

    // Removed on the restarted node, the route stops applying on node 1: back to the default pool.
    c.wait_converged(Duration::from_secs(10)).await?;
    let t0 = Instant::now();
    let removed = c.shoal(2).json(&["route", "remove", "--path", "/new/"]).await?;
    assert!(route_at(&removed["routes"], "", "/new/").is_none(), "route remove answered {removed}");
    let took =
        wait_routed(c[0].proxy, "/new/x", "web", Some("/new/x"), "node 1 sends /new/ to the default pool").await?;
    println!(
        "route removed on node 3 stopped routing on node 1 after {took:?} ({:?} since the CLI call)",
        t0.elapsed()
    );
    let mut listed = Value::Null;
    wait_until(PROPAGATION_DEADLINE, "node 2 no longer lists the route", async || {
        listed = c.shoal(1).json(&["route", "list"]).await.unwrap_or_default();
        listed["routes"].is_array() && route_at(&listed["routes"], "", "/new/").is_none()
    })
    .await
    .with_context(|| format!("last list: {listed}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. shoald check
// ---------------------------------------------------------------------------------------------

/// Lines 1-9: a default pool, pool `api`, one route to it. Cases append from line 10.
const CHECK_BASE: &str = r#"[upstream]
[[upstream.backend]]
addr = "127.0.0.1:9001"
[upstreams.api]
[[upstreams.api.backend]]
addr = "127.0.0.1:9002"
[[route]]
host = "api.example.com"
upstream = "api"
"#;

/// (case, what is appended to [`CHECK_BASE`] from line 10, the line of the bad table's header,
/// every string the message must contain besides the file and the line).
fn bad_route_configs() -> Vec<(&'static str, &'static str, usize, Vec<&'static str>)> {
    vec![
        (
            "route to an undefined pool",
            "[[route]]\npath = \"/x/\"\nupstream = \"nope\"\n",
            10,
            vec!["\"nope\"", "not defined"],
        ),
        (
            "route to a pool without backends",
            "[upstreams.empty]\nalgorithm = \"round-robin\"\n[[route]]\npath = \"/e/\"\nupstream = \"empty\"\n",
            12,
            vec!["\"empty\"", "no backends"],
        ),
        (
            "the same host and path twice",
            "[[route]]\nhost = \"api.example.com\"\nupstream = \"default\"\n",
            10,
            vec!["api.example.com", "twice"],
        ),
        ("a host with a space", "[[route]]\nhost = \"a b\"\nupstream = \"api\"\n", 10, vec!["a b"]),
        (
            "a host with a port",
            "[[route]]\nhost = \"api.example.com:80\"\nupstream = \"api\"\n",
            10,
            vec!["api.example.com:80"],
        ),
        (
            "upstream and redirect",
            "[[route]]\npath = \"/both/\"\nupstream = \"api\"\nredirect = \"https://www.example.com\"\n",
            10,
            vec!["upstream", "redirect", "both"],
        ),
        (
            "a redirect with a path",
            "[[route]]\nhost = \"old.example.com\"\nredirect = \"https://x.example.com/p\"\n",
            10,
            vec!["https://x.example.com/p"],
        ),
        (
            "[upstreams.default]",
            "[upstreams.default]\n[[upstreams.default.backend]]\naddr = \"127.0.0.1:9003\"\n",
            10,
            vec!["default", "[upstream]"],
        ),
    ]
}

#[test]
fn check_refuses_bad_routes() -> R {
    let dir = TempDir::new("sites-check")?;
    let mut problems = Vec::new();
    for (i, (case, tail, line, want)) in bad_route_configs().into_iter().enumerate() {
        let toml = format!("{CHECK_BASE}{tail}");
        let (out, path) = shoald_check(&dir, &format!("bad{i}.toml"), &toml)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{case}: exit {:?}: {}", out.status.code(), stderr.trim());
        if out.status.code() != Some(1) {
            problems.push(format!(
                "{case}: exit {:?}, want 1; stdout {:?} stderr {stderr:?}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            ));
            continue;
        }
        if !stderr.contains(&path.display().to_string()) {
            problems.push(format!("{case}: message {stderr:?} does not name the file"));
        }
        if !stderr.contains(&format!("line {line}:")) {
            problems.push(format!("{case}: message {stderr:?} does not name line {line}"));
        }
        for w in want {
            if !stderr.contains(w) {
                problems.push(format!("{case}: message {stderr:?} does not contain {w:?}"));
            }
        }
    }

    let good = r#"[upstream]
algorithm = "round-robin"
[[upstream.backend]]
addr = "127.0.0.1:9001"

[upstreams.api]
algorithm = "least-conn"
[upstreams.api.health]
path = "/healthz"
[[upstreams.api.backend]]
addr = "127.0.0.1:9002"
[[upstreams.api.backend]]
addr = "127.0.0.1:9003"

[[route]]
host = "api.example.com"
upstream = "api"

[[route]]
host = "www.example.com"
path = "/api/"
upstream = "api"
strip_prefix = true

[[route]]
host = "old.example.com"
redirect = "https://www.example.com"
"#;
    let (out, _) = shoald_check(&dir, "good.toml", good)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("good: exit {:?}: {}", out.status.code(), stdout.trim());
    if !out.status.success() {
        problems.push(format!(
            "a good two-site config: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    for w in [
        "ok (1 backends, algorithm round-robin",
        "default (1 backends, round-robin)",
        "api (2 backends, least-conn)",
        "3 routes",
    ] {
        if !stdout.contains(w) {
            problems.push(format!("good config: {stdout:?} does not contain {w:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Metrics, /status, shoal upstream list and the access log, per pool
// ---------------------------------------------------------------------------------------------

/// `key=value` of an access log line's trailing fields.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let want = format!("{key}=");
    line.split(' ').find_map(|part| part.strip_prefix(want.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pool_observability() -> R {
    let (web, api) = (site_backend("web").await?, site_backend("api").await?);
    let config = format!(
        "[upstream]\n[[upstream.backend]]\naddr = \"{}\"\n\n[upstreams.api]\n[[upstreams.api.backend]]\naddr = \"{}\"\n\n\
         [[route]]\nhost = \"api.example.com\"\nupstream = \"api\"\n\n[access_log]\npath = \"{{dir}}/access.log\"\n",
        web.addr, api.addr
    );
    let node = Node::builder("sites-obs").config(config).start().await?;
    // 5 to api over HTTP/1.1 and 1 over HTTP/2; 3 to the default pool.
    for i in 0..5 {
        assert_eq!(get_host(node.proxy, "api.example.com", &format!("/o/api/{i}")).await?.0, 200);
    }
    let got = curl_get(node.proxy, "api.example.com", "/o/api/h2", Proto::H2).await?;
    assert_eq!((got.status, got.body.as_str()), (200, "api /o/api/h2"), "{got:?}");
    for i in 0..3 {
        assert_eq!(get_host(node.proxy, "www.example.com", &format!("/o/web/{i}")).await?.0, 200);
    }
    assert_eq!((api.requests().len(), web.requests().len()), (6, 3), "what the backends received");
    let (api_addr, web_addr) = (api.addr.to_string(), web.addr.to_string());

    // /metrics: the pool label on every backend metric.
    let text = node.metrics_text().await?;
    let m = |pool: &str, backend: &str| {
        shoal_tests::node::metric_value(&text, "shoal_backend_requests", &[("pool", pool), ("backend", backend)])
    };
    assert_eq!(m("api", &api_addr), Some(6.0), "api backend in pool api:\n{text}");
    assert_eq!(m("default", &web_addr), Some(3.0), "web backend in pool default:\n{text}");
    assert_eq!(
        (m("default", &api_addr), m("api", &web_addr)),
        (None, None),
        "no backend under the other pool:\n{text}"
    );
    let up = shoal_tests::node::metric_value(&text, "shoal_backend_up", &[("pool", "api"), ("backend", &api_addr)]);
    assert_eq!(up, Some(1.0), "shoal_backend_up carries the pool too:\n{text}");

    // /status: pools with their counts, backends with their pool, the route.
    let s = node.status_json().await?;
    for (name, requests, addr) in [("api", 6, &api_addr), ("default", 3, &web_addr)] {
        let p = pool(&s["pools"], name).with_context(|| format!("/status pools has no {name}: {s}"))?;
        assert_eq!(
            (p["requests"].as_u64(), p["backends"].as_u64(), p["up"].as_u64()),
            (Some(requests), Some(1), Some(1)),
            "{p}"
        );
        let b = s["backends"].as_array().and_then(|bs| bs.iter().find(|b| b["addr"] == addr.as_str())).cloned();
        assert_eq!(b.as_ref().map(|b| b["pool"].clone()), Some(name.into()), "/status backend {addr}: {b:?}");
    }
    let r =
        route_at(&s["routes"], "api.example.com", "/").with_context(|| format!("/status routes: {}", s["routes"]))?;
    assert_eq!((r["name"].clone(), r["upstream"].clone()), ("api.example.com/".into(), "api".into()), "{r}");

    // shoal upstream list / backend list.
    let shoal = Shoal::at(node.control);
    let list = shoal.json(&["upstream", "list"]).await?;
    for (name, requests) in [("api", 6), ("default", 3)] {
        let p = pool(&list, name).with_context(|| format!("shoal upstream list has no {name}: {list}"))?;
        assert_eq!(
            (p["requests"].as_u64(), p["backends"].as_u64(), p["up"].as_u64()),
            (Some(requests), Some(1), Some(1)),
            "{p}"
        );
        assert_eq!(p["source"], "config", "{p}");
    }
    assert_eq!(pool(&list, "api").map(|p| p["routes"].clone()), Some(1.into()), "{list}");
    let backends = shoal.json(&["backend", "list"]).await?;
    assert_eq!(find_backend(&backends, api.addr).map(|b| b["pool"].clone()), Some("api".into()), "{backends}");
    assert_eq!(find_backend(&backends, web.addr).map(|b| b["pool"].clone()), Some("default".into()), "{backends}");

    // The access log: pool and route on every line.
    let path = node.dir().join("access.log");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    wait_until(Duration::from_secs(3), "9 lines in the access log", async || read().lines().count() >= 9).await?;
    let text = read();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 9, "one line per request:\n{text}");
    for line in &lines {
        let fields = (log_field(line, "backend"), log_field(line, "pool"), log_field(line, "route"));
        // The request line shows the path, as nginx logs it, over HTTP/2 too.
        assert!(!line.contains("\"GET http"), "an absolute-form request line: {line}");
        if line.contains("/o/api/") {
            assert_eq!(fields, (Some(api_addr.as_str()), Some("api"), Some("api.example.com/")), "{line}");
        } else {
            assert!(line.contains("/o/web/"), "{line}");
            assert_eq!(fields, (Some(web_addr.as_str()), Some("default"), Some("-")), "{line}");
        }
    }
    assert_eq!(lines.iter().filter(|l| l.contains("pool=api ")).count(), 6, "{text}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. The CLI and unknown pools
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_unknown_pool() -> R {
    let (web, api) = (site_backend("web").await?, site_backend("api").await?);
    let config = format!(
        "[upstream]\n[[upstream.backend]]\naddr = \"{}\"\n\n[upstreams.api]\n[[upstreams.api.backend]]\naddr = \"{}\"\n",
        web.addr, api.addr
    );
    let node = Node::builder("sites-cli").config(config).start().await?;
    let shoal = Shoal::at(node.control);
    for args in [
        &["route", "add", "--path", "/x/", "--upstream", "nope"][..],
        &["backend", "add", "127.0.0.1:1", "--upstream", "nope"][..],
    ] {
        let out = shoal.run(args).await?;
        println!("shoal {}: exit {} {}", args.join(" "), out.code, out.stderr.trim());
        assert_ne!(out.code, 0, "shoal {args:?} must fail: {out:?}");
        for w in ["\"nope\"", "default", "api"] {
            assert!(out.stderr.contains(w), "shoal {args:?}: the message names {w}: {out:?}");
        }
        let human = shoal.clone().human().run(args).await?;
        assert_ne!(human.code, 0, "without --json too: {human:?}");
        assert!(human.stderr.contains("\"nope\""), "{human:?}");
    }
    // Nothing changed: no route, no pool "nope", no backend 127.0.0.1:1.
    let routes = shoal.json(&["route", "list"]).await?;
    assert!(route_at(&routes["routes"], "", "/x/").is_none(), "{routes}");
    let pools = shoal.json(&["upstream", "list"]).await?;
    let names: Vec<&str> = pools.as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["default", "api"], "{pools}");
    let backends = shoal.json(&["backend", "list"]).await?;
    assert!(find_backend(&backends, "127.0.0.1:1".parse()?).is_none(), "{backends}");
    // And the node still routes as before.
    assert_eq!(get_host(node.proxy, "www.example.com", "/x/1").await?, (200, "web /x/1".into()));
    Ok(())
}
