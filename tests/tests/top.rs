//! `shoal top` through a real pseudo-terminal: a two-node cluster with two pools (the default
//! one and `api`, routed by `path = "/api/"`) under a bounded load through node 1, and
//! `shoal --node <node 1> top` running in a detached tmux session (its own server socket,
//! 160x50). The test reads the pane with `tmux capture-pane` until it shows both members alive,
//! both pools and each backend with a non-zero request rate; kills node 2 with SIGKILL and
//! waits for the pane to show it `dead` (or `left`); then types `q` and requires the session
//! to end, `shoal top` to have exited 0, and the terminal's settings (`stty -g`) afterwards to
//! equal those before it started. `--once` (stdout a pipe) prints one plain frame with the
//! pools, backends and rates. tmux is required (scripts/test.sh installs it); the session's
//! tmux server is killed when the test ends, whatever happens.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_tests::{Backend, Cluster, Load, Shoal, TempDir, bins};

type R = anyhow::Result<()>;

/// A tmux server of the test's own (`tmux -S <socket>`, in the test's directory), killed on
/// drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("run tmux (install it: apt-get install tmux)")
    }

    fn capture(&self, session: &str) -> anyhow::Result<String> {
        let out = self.cmd(&["capture-pane", "-p", "-t", session])?;
        if !out.status.success() {
            bail!("tmux capture-pane failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn has_session(&self, session: &str) -> bool {
        self.cmd(&["has-session", "-t", session]).map(|o| o.status.success()).unwrap_or(false)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The whitespace-separated fields of the first line whose first field is `first`.
fn row<'a>(text: &'a str, first: &str) -> Option<Vec<&'a str>> {
    text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|f| f.first() == Some(&first))
}

/// A backend's row shows it `up` with a non-zero request rate (`ADDR STATE REQ/S ...`).
fn backend_busy(text: &str, addr: SocketAddr) -> bool {
    row(text, &addr.to_string()).is_some_and(|f| {
        f.get(1) == Some(&"up") && f.get(2).and_then(|r| r.parse::<f64>().ok()).is_some_and(|r| r > 0.0)
    })
}

/// A member's row shows `state` (`NODE STATE ...`).
fn member_is(text: &str, id: &str, state: &str) -> bool {
    row(text, id).is_some_and(|f| f.get(1) == Some(&state))
}

fn pools_shown(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("POOL default")) && text.lines().any(|l| l.starts_with("POOL api"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_members_pools_and_rates_in_a_terminal_and_quits_on_q() -> R {
    let web = Backend::start("web").await?;
    let api = Backend::start_many(&["api-1", "api-2"]).await?;
    let config = format!(
        r#"[upstream]
algorithm = "round-robin"
[[upstream.backend]]
addr = "{web}"

[upstreams.api]
algorithm = "round-robin"
[[upstreams.api.backend]]
addr = "{a1}"
[[upstreams.api.backend]]
addr = "{a2}"

[[route]]
path = "/api/"
upstream = "api"
"#,
        web = web.addr,
        a1 = api[0].addr,
        a2 = api[1].addr
    );
    let mut c = Cluster::builder("top", 2).config(&config).start().await?;
    c.wait_converged(Duration::from_secs(10)).await?;
    let backends = [web.addr, api[0].addr, api[1].addr];

    // Bounded load through node 1 on both pools (stopped at the end, or by its own bound).
    let load_web = Load::new(c[0].proxy).concurrency(1).duration(Duration::from_secs(90)).spawn();
    let load_api = Load::new(c[0].proxy).path("/api/x").concurrency(1).duration(Duration::from_secs(90)).spawn();

    // --once with stdout a pipe: one plain frame, no escapes.
    let once = Shoal::at(c[0].control).human().run(&["top", "--once"]).await?;
    assert_eq!(once.code, 0, "{once:?}");
    println!("shoal top --once:\n{}", once.stdout);
    assert!(!once.stdout.contains('\x1b'), "escape sequences in a non-terminal frame:\n{}", once.stdout);
    assert!(pools_shown(&once.stdout), "{}", once.stdout);
    assert!(member_is(&once.stdout, "top-1", "alive") && member_is(&once.stdout, "top-2", "alive"), "{}", once.stdout);
    for b in backends {
        assert!(backend_busy(&once.stdout, b), "{b} has no rate in:\n{}", once.stdout);
    }

    // The live view in a pseudo-terminal.
    let dir = TempDir::new("top-tty")?;
    let tmux = Tmux { socket: dir.path().join("tmux.sock") };
    let session = "top";
    let d = dir.path().display();
    // `trap` keeps the shell alive through the Ctrl-C of the second run (its child gets the
    // default disposition back).
    let control = c[0].control;
    let script = |run: &str| {
        format!(
            "trap : INT; stty -g > {d}/before-{run}; '{shoal}' --node {node} top; echo $? > {d}/code-{run}; \
             stty -g > {d}/after-{run}",
            shoal = bins::shoal().display(),
            node = control
        )
    };
    let started = tmux.cmd(&["new-session", "-d", "-s", session, "-x", "160", "-y", "50", "sh", "-c", &script("q")])?;
    assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));

    let wait_pane = async |what: &str, timeout: Duration, cond: &dyn Fn(&str) -> bool| -> anyhow::Result<String> {
        let t0 = Instant::now();
        loop {
            let pane = tmux.capture(session)?;
            if cond(&pane) {
                println!("pane shows {what} after {:?}", t0.elapsed());
                return Ok(pane);
            }
            if t0.elapsed() > timeout {
                bail!("pane never showed {what} within {timeout:?}; last capture:\n{pane}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let pane = wait_pane("both members alive, both pools, every backend busy", Duration::from_secs(20), &|p| {
        member_is(p, "top-1", "alive")
            && member_is(p, "top-2", "alive")
            && pools_shown(p)
            && backends.iter().all(|b| backend_busy(p, *b))
            && p.contains("members 2/2 alive")
    })
    .await?;
    println!("frame:\n{}", pane.trim_end());

    c[1].kill9();
    let pane = wait_pane("top-2 dead or left", Duration::from_secs(10), &|p| {
        member_is(p, "top-2", "dead") || member_is(p, "top-2", "left")
    })
    .await?;
    println!("frame after killing top-2:\n{}", pane.trim_end());
    assert!(member_is(&pane, "top-1", "alive") && pane.contains("members 1/2 alive"), "{pane}");
    assert!(!pane.to_lowercase().contains("error"), "{pane}");

    // `q` quits; so does Ctrl-C (in a second session, on a node that is still up).
    let quit = async |session: &str, key: &str, run: &str| -> R {
        let sent = tmux.cmd(&["send-keys", "-t", session, key])?;
        assert!(sent.status.success(), "tmux send-keys: {}", String::from_utf8_lossy(&sent.stderr));
        let t0 = Instant::now();
        while tmux.has_session(session) {
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("shoal top still running 5 s after {key}:\n{}", tmux.capture(session).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("session ended {:?} after {key}", t0.elapsed());
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).with_context(|| format!("{d}/{name}"));
        assert_eq!(read(&format!("code-{run}"))?.trim(), "0", "shoal top's exit code after {key}");
        let (before, after) = (read(&format!("before-{run}"))?, read(&format!("after-{run}"))?);
        assert!(!before.trim().is_empty(), "stty -g printed nothing");
        assert_eq!(before, after, "terminal settings not restored after {key}");
        Ok(())
    };
    quit(session, "q", "q").await?;

    let started =
        tmux.cmd(&["new-session", "-d", "-s", "top-c", "-x", "160", "-y", "50", "sh", "-c", &script("ctrl-c")])?;
    assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));
    let t0 = Instant::now();
    while !tmux.capture("top-c").is_ok_and(|p| pools_shown(&p)) {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("second shoal top never drew:\n{}", tmux.capture("top-c").unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    quit("top-c", "C-c", "ctrl-c").await?;

    let (w, a) = (load_web.stop().await, load_api.stop().await);
    println!("load: {} + {} requests sent", w.sent, a.sent);
    Ok(())
}
