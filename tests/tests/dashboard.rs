//! The live dashboard in a real browser: headless Chromium, driven over the Chrome DevTools
//! Protocol (a websocket; no WebDriver), loads node 1's admin root of a 3-node cluster, sees
//! every member `alive` and every backend `up`, then sees node 3 turn `dead` after `kill -9`,
//! and leaves a screenshot in `target/dashboard.png`.
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
use shoal_tests::{Backend, Node, TempDir, bins, wait_until};
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

/// What the page shows: members and backends (id -> state cell class and text), the error line.
const READ_PAGE: &str = r##"(() => {
  const rows = sel => [...document.querySelectorAll(sel)];
  return {
    members: rows("#members tbody tr[data-node]").map(r => ({
      id: r.dataset.node, cls: r.cells[1]?.className ?? "", text: r.cells[1]?.textContent ?? "",
      self: (r.cells[0]?.textContent ?? "").includes("(this node)") })),
    backends: rows("#backends tbody tr[data-backend]").map(r => ({
      addr: r.dataset.backend, pool: r.dataset.pool, cls: r.cells[2]?.className ?? "", text: r.cells[2]?.textContent ?? "" })),
    err: document.getElementById("err")?.textContent ?? "",
    header: document.getElementById("node")?.textContent ?? "",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_members_backends_and_a_killed_node_turning_dead() -> R {
    let bs = Backend::start_many(&["b1", "b2"]).await?;
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

    // The cluster converges (checked on /status first, so a slow join is not blamed on the page).
    wait_until(Duration::from_secs(20), "node 1 sees 3 alive members", async || {
        let Ok(s) = n1.status_json().await else { return false };
        let members = s["members"].as_array().cloned().unwrap_or_default();
        members.len() == 3 && members.iter().all(|m| m["state"] == "alive")
    })
    .await?;

    let chromium = Chromium::start()?;
    let mut cdp = chromium.page().await?;
    cdp.call("Page.enable", json!({}))?;
    cdp.call("Runtime.enable", json!({}))?;
    let url = format!("http://{}/", n1.admin);
    let nav = cdp.call("Page.navigate", json!({"url": url}))?;
    ensure!(nav["errorText"].is_null(), "navigating to {url}: {nav}");

    let shown = wait_page(&mut cdp, Duration::from_secs(15), "3 alive members and 2 up backends", |p| {
        p["members"].as_array().is_some_and(|m| m.len() == 3)
            && ids.iter().all(|id| state_of(p, "members", "id", id) == Some("alive"))
            && p["backends"].as_array().is_some_and(|b| b.len() == 2)
            && addrs.iter().all(|a| state_of(p, "backends", "addr", a) == Some("up"))
    })?;
    ensure!(cdp.eval("location.href")? == json!(url), "the page moved away from {url}");
    ensure!(shown["err"] == "", "the page shows an error: {shown}");
    ensure!(shown["header"].as_str().unwrap_or_default().contains("dash-1"), "header: {shown}");
    let selves: Vec<&Value> = shown["members"].as_array().unwrap().iter().filter(|m| m["self"] == true).collect();
    ensure!(selves.len() == 1 && selves[0]["id"] == "dash-1", "exactly node 1 is `(this node)`: {shown}");
    for m in shown["members"].as_array().unwrap() {
        ensure!(m["cls"] == m["text"], "state cell class and text differ: {m}");
    }
    // Everything the page loaded came from the node itself.
    let origin = format!("http://{}", n1.admin);
    let resources = cdp.eval("performance.getEntriesByType('resource').map(e => e.name)")?;
    for r in resources.as_array().cloned().unwrap_or_default() {
        ensure!(r.as_str().unwrap_or_default().starts_with(&origin), "the page loaded {r} from elsewhere");
    }

    // kill -9 node 3: its row turns `dead` on node 1's page within 10 s, the others stay alive.
    let killed = Instant::now();
    n3.kill9();
    let shown = wait_page(&mut cdp, Duration::from_secs(10), "dash-3 dead", |p| {
        state_of(p, "members", "id", "dash-3") == Some("dead")
    })?;
    eprintln!("dashboard shows dash-3 dead {:?} after kill -9", killed.elapsed());
    for id in ["dash-1", "dash-2"] {
        ensure!(state_of(&shown, "members", "id", id) == Some("alive"), "{id} is not alive any more: {shown}");
    }
    for a in &addrs {
        ensure!(state_of(&shown, "backends", "addr", a) == Some("up"), "backend {a} is not up any more: {shown}");
    }

    // A screenshot of the final state.
    let shot = cdp.call_within("Page.captureScreenshot", json!({"format": "png"}), Duration::from_secs(20))?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().context("no screenshot data")?)
        .context("screenshot is not base64")?;
    ensure!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG ({} bytes)", png.len());
    let path = target_dir().join("dashboard.png");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, &png).with_context(|| format!("write {}", path.display()))?;
    ensure!(std::fs::metadata(&path)?.len() == png.len() as u64, "{} is incomplete", path.display());
    eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());

    drop(cdp);
    drop(chromium);
    drop((n1, n2));
    Ok(())
}
