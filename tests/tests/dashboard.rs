//! The live dashboard in a real browser: headless Chromium, driven over the Chrome DevTools
//! Protocol (a websocket; no WebDriver), loads node 1's admin root of a 3-node cluster under a
//! bounded load through all three nodes. It checks the tables (every member `alive`, every
//! backend `up`), the cluster picture (three members, two backends, a line from every member to
//! every backend with a non-zero rate) and the charts (a series per node and per backend with a
//! non-zero newest value, latencies), all read from the page's DOM; then `kill -9`s node 3 and
//! sees it `dead` in the table and the picture, in the events and as a mark on the charts'
//! time axis. It leaves screenshots, wide (1280 px) and narrow (420 px, no sideways scrolling),
//! in `target/dashboard-wide.png` and `target/dashboard-narrow.png` for a person to look at.
//!
//! Needs Chromium (`apt-get install -y chromium`; `$CHROMIUM` names another binary).

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use serde_json::{Value, json};
use shoal_tests::http::RawResponse;
use shoal_tests::{Backend, Load, Node, TempDir, bins, wait_until};
use tungstenite::{Message, WebSocket};

type R = anyhow::Result<()>;

// ---------------------------------------------------------------------------------------------
// Chromium over the DevTools protocol

fn chromium_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    for p in
        ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome", "/usr/bin/google-chrome-stable"]
    {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("no Chromium found: install it (`apt-get install -y chromium`) or set $CHROMIUM")
}

/// A headless Chromium in its own process group; the whole group is SIGKILLed on drop, so a
/// failing test leaves no browser (or renderer) behind.
struct Chromium {
    child: Child,
    log: PathBuf,
    devtools: SocketAddr,
    _dir: TempDir,
}

impl Chromium {
    fn start() -> anyhow::Result<Chromium> {
        let bin = chromium_binary()?;
        let dir = TempDir::new("chromium")?;
        let profile = dir.path().join("profile");
        std::fs::create_dir_all(&profile)?;
        let log = dir.path().join("chromium.log");
        let out = File::create(&log)?;
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut chromium = Chromium { child, log, devtools: SocketAddr::from(([127, 0, 0, 1], 0)), _dir: dir };
        // Chromium writes the port it bound (and the browser target's path) once listening.
        let port_file = profile.join("DevToolsActivePort");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = chromium.child.try_wait() {
                bail!("chromium exited with {status} before listening; log:\n{}", chromium.log_tail());
            }
            let text = std::fs::read_to_string(&port_file).unwrap_or_default();
            if text.lines().count() >= 2
                && let Ok(port) = text.lines().next().unwrap_or_default().trim().parse::<u16>()
            {
                chromium.devtools.set_port(port);
                return Ok(chromium);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("no DevToolsActivePort after 30 s; log:\n{}", chromium.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("dbus")).collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `GET path` on the DevTools HTTP endpoint, as JSON.
    async fn devtools_json(&self, path: &str) -> anyhow::Result<Value> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.devtools);
        let raw = shoal_tests::http::raw_exchange(self.devtools, req.as_bytes(), Duration::from_secs(5)).await?;
        let r = RawResponse::parse(&raw)?;
        ensure!(r.status == 200, "DevTools {path}: {}", r.status);
        serde_json::from_slice(&r.body).with_context(|| format!("DevTools {path} is not JSON"))
    }

    /// A DevTools session on the first page target.
    async fn page(&self) -> anyhow::Result<Cdp> {
        let start = Instant::now();
        let ws_url = loop {
            let list = self.devtools_json("/json/list").await.unwrap_or(Value::Null);
            let url = list.as_array().and_then(|ts| {
                ts.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(u) = url {
                break u;
            }
            if start.elapsed() > Duration::from_secs(15) {
                bail!("no page target in /json/list: {list}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Cdp::connect(self.devtools, &ws_url)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- chromium log ({}) -----\n{}\n-----", self.log.display(), self.log_tail());
        }
        // The process group holds the browser, its zygotes and renderers.
        let pgid = self.child.id();
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One DevTools websocket session: numbered calls, events skipped, every read bounded.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    fn connect(devtools: SocketAddr, ws_url: &str) -> anyhow::Result<Cdp> {
        let stream = TcpStream::connect_timeout(&devtools, Duration::from_secs(5)).context("connect DevTools")?;
        stream.set_read_timeout(Some(Duration::from_millis(250)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let (ws, _) = tungstenite::client::client(ws_url, stream)
            .map_err(|e| anyhow::anyhow!("websocket handshake with {ws_url}: {e}"))?;
        Ok(Cdp { ws, next_id: 1 })
    }

    /// Sends `method` and waits (up to `timeout`) for its result.
    fn call_within(&mut self, method: &str, params: Value, timeout: Duration) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).with_context(|| format!("send {method}"))?;
        let start = Instant::now();
        loop {
            if start.elapsed() > timeout {
                bail!("no answer to {method} within {timeout:?}");
            }
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue;
                }
                Err(e) => bail!("DevTools websocket: {e}"),
            };
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str()).context("DevTools message is not JSON")?;
            if v["id"].as_u64() != Some(id) {
                continue; // an event, or an answer to an earlier call
            }
            if !v["error"].is_null() {
                bail!("{method} failed: {}", v["error"]);
            }
            return Ok(v["result"].clone());
        }
    }

    fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.call_within(method, params, Duration::from_secs(10))
    }

    /// Evaluates `expr` in the page and returns its value (JSON-serialisable results only).
    fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r =
            self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}))?;
        if !r["exceptionDetails"].is_null() {
            bail!("exception evaluating {expr:?}: {}", r["exceptionDetails"]);
        }
        Ok(r["result"]["value"].clone())
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard

/// What the page shows: members and backends (id -> state cell class and text), the error
/// line; the picture's members, backends and lines; each chart's series (name, label, newest
/// value) and marks; the events.
const READ_PAGE: &str = r##"(() => {
  const rows = sel => [...document.querySelectorAll(sel)];
  const chart = id => ({
    series: rows(`#${id} path[data-name]`).map(p => ({ name: p.dataset.name, label: p.dataset.label ?? "",
      last: Number(p.dataset.last) })),
    marks: rows(`#${id} line[data-mark]`).map(l => l.dataset.mark) });
  return {
    members: rows("#members tbody tr[data-node]").map(r => ({
      id: r.dataset.node, cls: r.cells[1]?.className ?? "", text: r.cells[1]?.textContent ?? "",
      self: (r.cells[0]?.textContent ?? "").includes("(this node)") })),
    backends: rows("#backends tbody tr[data-backend]").map(r => ({
      addr: r.dataset.backend, pool: r.dataset.pool, cls: r.cells[2]?.className ?? "", text: r.cells[2]?.textContent ?? "" })),
    err: document.getElementById("err")?.textContent ?? "",
    header: document.getElementById("node")?.textContent ?? "",
    picture: {
      nodes: rows("#picture g[data-node]").map(g => ({ id: g.dataset.node, state: g.dataset.state, text: g.textContent })),
      backends: rows("#picture g[data-backend]").map(g => ({ addr: g.dataset.backend, pool: g.dataset.pool,
        state: g.dataset.state, rps: Number(g.dataset.rps), text: g.textContent })),
      lines: rows("#picture path[data-line]").map(p => ({ from: p.dataset.from, to: p.dataset.to,
        rps: Number(p.dataset.rps), width: Number(p.getAttribute("stroke-width")) })),
    },
    charts: Object.fromEntries(["chart-node-rps", "chart-backend-rps", "chart-latency", "chart-in-flight", "chart-errors"]
      .map(id => [id, chart(id)])),
    events: rows("#events tbody tr[data-event]").map(r => ({ kind: r.dataset.event, subject: r.dataset.subject,
      text: r.textContent })),
  };
})()"##;

fn state_of<'a>(page: &'a Value, list: &str, key: &str, id: &str) -> Option<&'a str> {
    page[list].as_array()?.iter().find(|r| r[key] == id).and_then(|r| r["cls"].as_str())
}

/// Polls the page until `cond` holds on what it shows; fails after `timeout` with the last view.
fn wait_page(cdp: &mut Cdp, timeout: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let start = Instant::now();
    let mut last = Value::Null;
    loop {
        if let Ok(v) = cdp.eval(READ_PAGE) {
            if cond(&v) {
                return Ok(v);
            }
            last = v;
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting until the dashboard shows {what}; it shows {last:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// URLs in `src=`, `href=`, `url(...)`, `@import` and `fetch(...)` of an HTML text.
fn referenced_urls(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = html.to_ascii_lowercase();
    for marker in ["src=", "href=", "url(", "@import", "fetch(", "action="] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(marker) {
            let start = from + i + marker.len();
            let rest = html[start..].trim_start_matches([' ', '"', '\'', '(', '`']);
            let end = rest.find(['"', '\'', ')', '`', ' ', '>', ',']).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
            from = start;
        }
    }
    out
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => bins::workspace_root().join(d),
        None => bins::workspace_root().join("target"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_serves_one_self_contained_page() -> R {
    let b = Backend::start("b").await?;
    let node = Node::builder("dash-html").backend(&b).start().await?;
    let r = node.admin_get("/").await?;
    ensure!(r.status == 200, "/ answered {}", r.status);
    ensure!(r.header("content-type").unwrap_or_default().starts_with("text/html"), "{:?}", r.header("content-type"));
    let html = r.body_text();
    ensure!(html.contains("id=\"members\"") && html.contains("id=\"backends\""), "not the dashboard:\n{html}");
    let urls = referenced_urls(&html);
    ensure!(urls.iter().any(|u| u == "/status"), "the page does not poll /status: {urls:?}");
    for u in &urls {
        let l = u.to_ascii_lowercase();
        ensure!(
            !(l.starts_with("http:") || l.starts_with("https:") || l.starts_with("//") || l.starts_with("ws")),
            "external asset URL {u:?} in the dashboard"
        );
    }
    ensure!(!html.contains("<link"), "the dashboard links an external resource");
    ensure!(!html.contains("<script src"), "the dashboard loads an external script");
    Ok(())
}

/// Saves a PNG of the whole page at `width` CSS pixels (the page's full height) as `name`
/// under the target directory; returns the path.
fn screenshot(cdp: &mut Cdp, width: u32, name: &str) -> anyhow::Result<PathBuf> {
    let metrics = |height: u32| json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false});
    cdp.call("Emulation.setDeviceMetricsOverride", metrics(900))?;
    // The page redraws the picture and the charts for the new width on its next tick.
    std::thread::sleep(Duration::from_millis(1500));
    let height = cdp.eval("document.documentElement.scrollHeight")?.as_u64().unwrap_or(900).clamp(300, 6000) as u32;
    cdp.call("Emulation.setDeviceMetricsOverride", metrics(height))?;
    std::thread::sleep(Duration::from_millis(300));
    let shot = cdp.call_within("Page.captureScreenshot", json!({"format": "png"}), Duration::from_secs(20))?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().context("no screenshot data")?)
        .context("screenshot is not base64")?;
    ensure!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG ({} bytes)", png.len());
    let path = target_dir().join(name);
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, &png).with_context(|| format!("write {}", path.display()))?;
    ensure!(std::fs::metadata(&path)?.len() == png.len() as u64, "{} is incomplete", path.display());
    eprintln!("screenshot: {} ({width} px wide, {} bytes)", path.display(), png.len());
    Ok(path)
}

fn series<'a>(page: &'a Value, chart: &str) -> Vec<&'a Value> {
    page["charts"][chart]["series"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// The newest value of the chart's series `name` (the first with that name: p99 on latency).
fn newest(page: &Value, chart: &str, name: &str) -> f64 {
    series(page, chart).iter().find(|s| s["name"] == name).and_then(|s| s["last"].as_f64()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_members_backends_and_a_killed_node_turning_dead() -> R {
    let bs = Backend::start_many(&["b1", "b2"]).await?;
    // Slow enough that the bounded load below stays light, different so the charts differ.
    bs[0].set_delay(Duration::from_millis(5));
    bs[1].set_delay(Duration::from_millis(15));
    // Gossip ports are picked when a node starts, so each node seeds with the ones before it;
    // gossip spreads the rest.
    let with_backends = |id: &str| Node::builder(id).backend(&bs[0]).backend(&bs[1]);
    let n1 = with_backends("dash-1").start().await?;
    let n2 = with_backends("dash-2").arg("--seed").arg(&n1.gossip.to_string()).start().await?;
    let mut n3 = with_backends("dash-3")
        .arg("--seed")
        .arg(&n1.gossip.to_string())
        .arg("--seed")
        .arg(&n2.gossip.to_string())
        .start()
        .await?;
    let ids = ["dash-1", "dash-2", "dash-3"];
    let addrs = [bs[0].addr.to_string(), bs[1].addr.to_string()];
    let keys = addrs.each_ref().map(|a| format!("default/{a}"));

    // The cluster converges (checked on /status first, so a slow join is not blamed on the page).
    wait_until(Duration::from_secs(20), "node 1 sees 3 alive members", async || {
        let Ok(s) = n1.status_json().await else { return false };
        let members = s["members"].as_array().cloned().unwrap_or_default();
        members.len() == 3 && members.iter().all(|m| m["state"] == "alive")
    })
    .await?;
    // Two clients through each node, stopped below (and bounded by the load's own cap).
    let loads: Vec<_> = [&n1, &n2, &n3]
        .iter()
        .map(|n| Load::new(n.proxy).concurrency(2).duration(Duration::from_secs(90)).spawn())
        .collect();

    // /cluster: node 1 answers with its own history and its peers', fetched from them.
    wait_until(Duration::from_secs(15), "/cluster on node 1 has every node's samples with traffic", async || {
        let Ok(r) = n1.admin_get("/cluster?last=5").await else { return false };
        let Ok(c) = serde_json::from_slice::<Value>(&r.body) else { return false };
        let nodes = c["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 3
            && nodes.iter().all(|n| {
                n["ok"] == true
                    && n["history"]["samples"]
                        .as_array()
                        .and_then(|s| s.last())
                        .is_some_and(|s| s["rps"].as_f64().unwrap_or(0.0) > 0.0)
            })
    })
    .await?;

    let chromium = Chromium::start()?;
    let mut cdp = chromium.page().await?;
    cdp.call("Page.enable", json!({}))?;
    cdp.call("Runtime.enable", json!({}))?;
    let url = format!("http://{}/", n1.admin);
    let nav = cdp.call("Page.navigate", json!({"url": url}))?;
    ensure!(nav["errorText"].is_null(), "navigating to {url}: {nav}");

    let shown = wait_page(&mut cdp, Duration::from_secs(20), "3 alive members, 2 up backends and traffic", |p| {
        let lines = p["picture"]["lines"].as_array().cloned().unwrap_or_default();
        p["members"].as_array().is_some_and(|m| m.len() == 3)
            && ids.iter().all(|id| state_of(p, "members", "id", id) == Some("alive"))
            && p["backends"].as_array().is_some_and(|b| b.len() == 2)
            && addrs.iter().all(|a| state_of(p, "backends", "addr", a) == Some("up"))
            // The picture: every member sends to every backend, at a rate the line shows.
            && p["picture"]["nodes"].as_array().is_some_and(|n| n.len() == 3)
            && p["picture"]["backends"].as_array().is_some_and(|b| b.len() == 2)
            && ids.iter().all(|id| keys.iter().all(|k| lines.iter().any(|l| l["from"] == *id && l["to"] == *k
                && l["rps"].as_f64().unwrap_or(0.0) > 0.0)))
            // The charts: every node and backend has a series whose newest value is not zero.
            && ids.iter().all(|id| newest(p, "chart-node-rps", id) > 0.0)
            && keys.iter().all(|k| newest(p, "chart-backend-rps", k) > 0.0)
            && keys.iter().all(|k| newest(p, "chart-latency", k) > 0.0)
            && keys.iter().all(|k| series(p, "chart-in-flight").iter().any(|s| s["name"] == *k))
    })?;
    ensure!(cdp.eval("location.href")? == json!(url), "the page moved away from {url}");
    ensure!(shown["err"] == "", "the page shows an error: {shown}");
    ensure!(shown["header"].as_str().unwrap_or_default().contains("dash-1"), "header: {shown}");
    let selves: Vec<&Value> = shown["members"].as_array().unwrap().iter().filter(|m| m["self"] == true).collect();
    ensure!(selves.len() == 1 && selves[0]["id"] == "dash-1", "exactly node 1 is `(this node)`: {shown}");
    for m in shown["members"].as_array().unwrap() {
        ensure!(m["cls"] == m["text"], "state cell class and text differ: {m}");
    }
    // The state is written, not only coloured, in the picture too.
    for n in shown["picture"]["nodes"].as_array().unwrap() {
        ensure!(n["state"] == "alive" && n["text"].as_str().unwrap_or_default().contains("alive"), "picture node: {n}");
    }
    for b in shown["picture"]["backends"].as_array().unwrap() {
        ensure!(b["state"] == "up" && b["text"].as_str().unwrap_or_default().contains("up"), "picture backend: {b}");
        ensure!(b["rps"].as_f64().unwrap_or(0.0) > 0.0, "picture backend without traffic: {b}");
    }
    // p99 is at least the backend's delay (5 and 15 ms) and the slower backend's is larger.
    let (p99_fast, p99_slow) = (newest(&shown, "chart-latency", &keys[0]), newest(&shown, "chart-latency", &keys[1]));
    ensure!(p99_fast >= 5.0 && p99_slow >= 15.0 && p99_slow > p99_fast, "p99 {p99_fast} / {p99_slow} ms: {shown:#}");
    // Everything the page loaded came from the node itself.
    let origin = format!("http://{}", n1.admin);
    let resources = cdp.eval("performance.getEntriesByType('resource').map(e => e.name)")?;
    for r in resources.as_array().cloned().unwrap_or_default() {
        ensure!(r.as_str().unwrap_or_default().starts_with(&origin), "the page loaded {r} from elsewhere");
    }

    // kill -9 node 3: it turns `dead` on node 1's page within 10 s (table, picture, events and a
    // mark on the charts' time axis); the others stay alive and keep their lines.
    let killed = Instant::now();
    n3.kill9();
    let shown = wait_page(&mut cdp, Duration::from_secs(10), "dash-3 dead", |p| {
        state_of(p, "members", "id", "dash-3") == Some("dead")
            && p["picture"]["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["id"] == "dash-3" && n["state"] == "dead"))
            && p["events"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["kind"] == "member"
                        && e["subject"] == "dash-3"
                        && e["text"].as_str().unwrap_or_default().contains("dead")
                })
            })
            && p["charts"]["chart-node-rps"]["marks"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m.as_str().unwrap_or_default().contains("dash-3")))
    })?;
    eprintln!("dashboard shows dash-3 dead {:?} after kill -9", killed.elapsed());
    for id in ["dash-1", "dash-2"] {
        ensure!(state_of(&shown, "members", "id", id) == Some("alive"), "{id} is not alive any more: {shown}");
    }
    for a in &addrs {
        ensure!(state_of(&shown, "backends", "addr", a) == Some("up"), "backend {a} is not up any more: {shown}");
    }
    let lines = shown["picture"]["lines"].as_array().cloned().unwrap_or_default();
    ensure!(!lines.iter().any(|l| l["from"] == "dash-3"), "a dead node still has lines: {lines:?}");
    ensure!(
        shown["picture"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "dash-3" && n["text"].as_str().unwrap_or_default().contains("dead")),
        "the picture does not write `dead` for dash-3: {shown}"
    );

    // Screenshots for a person: wide, then narrow (which must not scroll sideways).
    screenshot(&mut cdp, 1280, "dashboard-wide.png")?;
    screenshot(&mut cdp, 420, "dashboard-narrow.png")?;
    let overflow = cdp.eval("document.documentElement.scrollWidth - window.innerWidth")?.as_i64().unwrap_or(0);
    ensure!(overflow <= 1, "at 420 px the page scrolls sideways by {overflow} px");
    let wide = cdp.eval("(() => { const r = [...document.querySelectorAll('#picture g[data-node] rect')].map(e => e.getBoundingClientRect()); return r.length ? Math.max(...r.map(b => b.right)) : 0; })()")?;
    ensure!(wide.as_f64().unwrap_or(0.0) <= 421.0, "the picture is wider than a 420 px window: {wide}");

    for l in loads {
        let summary = l.stop().await;
        eprintln!("load: {summary}");
    }
    drop(cdp);
    drop(chromium);
    drop((n1, n2));
    Ok(())
}

/// `/history`: one sample a second with the node's own rates and latency counts, `?last=N`
/// bounds it; reloads (taken and refused) and backends leaving are events, with times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_rates_latencies_and_events() -> R {
    let bs = Backend::start_many(&["h1", "h2"]).await?;
    let config = |addrs: &[SocketAddr]| {
        addrs.iter().map(|a| format!("[[upstream.backend]]\naddr = \"{a}\"\n")).collect::<String>()
    };
    let node = Node::builder("hist").config(config(&[bs[0].addr, bs[1].addr])).start().await?;
    let load = Load::new(node.proxy).concurrency(2).duration(Duration::from_secs(30)).spawn();
    let history = async |last: usize| -> anyhow::Result<Value> {
        let r = node.admin_get(&format!("/history?last={last}")).await?;
        ensure!(r.status == 200, "/history answered {}", r.status);
        Ok(serde_json::from_slice(&r.body)?)
    };
    wait_until(Duration::from_secs(10), "a sample with traffic to both backends and latencies", async || {
        let Ok(h) = history(2).await else { return false };
        h["samples"].as_array().and_then(|s| s.last()).is_some_and(|s| {
            let b = s["b"].as_array().cloned().unwrap_or_default();
            s["rps"].as_f64().unwrap_or(0.0) > 0.0
                && b.len() == 2
                && b.iter()
                    .all(|b| b[2].as_f64().unwrap_or(0.0) > 0.0 && b[5].as_array().is_some_and(|l| l.len() == 13))
        })
    })
    .await?;
    let h = history(3).await?;
    let samples = h["samples"].as_array().context("no samples")?;
    ensure!(samples.len() <= 3, "?last=3 gave {} samples", samples.len());
    ensure!(h["node"] == "hist" && h["error_classes"].as_array().is_some_and(|e| e.len() == 6), "{h}");
    let seqs: Vec<u64> = samples.iter().filter_map(|s| s["seq"].as_u64()).collect();
    ensure!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "samples out of order: {seqs:?}");

    // A refused reload, then one that takes h2 out.
    node.write_config("[upstream\n")?;
    node.signal(shoal_tests::Signal::Hup)?;
    wait_until(Duration::from_secs(5), "a `reload refused` event", async || {
        history(900).await.is_ok_and(|h| {
            h["events"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["kind"] == "reload"
                        && e["tone"] == "bad"
                        && e["text"].as_str().unwrap_or_default().contains("reload refused")
                })
            })
        })
    })
    .await?;
    // The same counted in /metrics, beside the node's identity.
    let refused = node.metric("shoal_events_total", &[("kind", "reload"), ("tone", "bad")]).await;
    ensure!(refused == Some(1.0), "shoal_events_total for the refused reload: {refused:?}");
    let info = node.metric("shoal_build_info", &[("node", "hist")]).await;
    ensure!(info == Some(1.0), "shoal_build_info{{node=\"hist\"}}: {info:?}");
    node.write_config(&config(&[bs[0].addr]))?;
    node.signal(shoal_tests::Signal::Hup)?;
    let removed = format!("default/{}", bs[1].addr);
    wait_until(Duration::from_secs(5), "`configuration reloaded` and `removed` events", async || {
        history(900).await.is_ok_and(|h| {
            let events = h["events"].as_array().cloned().unwrap_or_default();
            events.iter().any(|e| e["kind"] == "reload" && e["text"] == "configuration reloaded")
                && events
                    .iter()
                    .any(|e| e["kind"] == "backend" && e["subject"] == removed.as_str() && e["text"] == "removed")
                && events.iter().all(|e| e["t"].as_u64().is_some_and(|t| t > 1_700_000_000_000))
        })
    })
    .await?;
    load.stop().await;
    Ok(())
}
