//! `shoal top`: a terminal view of the cluster, refreshed every `--interval` (1 s).
//!
//! Each refresh asks the node's control plane for its status (members, pools, backends) and
//! reads the node's admin `/metrics` (plain HTTP, at the `admin_addr` the node gives for
//! itself) for the backends' response-time histograms. Request rates are the difference of the
//! `requests` counters between two refreshes, and p99 comes from the difference of the
//! histogram buckets over the same interval (as Prometheus' `histogram_quantile` would
//! estimate it), so both describe the last interval on the node asked; members' req/s is each
//! node's own figure, from gossip. When `/metrics` cannot be read the p99 column shows `-`.
//!
//! On a terminal it draws on the alternate screen with the terminal in non-canonical, no-echo
//! mode (`stty`, on `/dev/tty`), so `q` quits at once; `q`, Ctrl-C, SIGTERM and SIGHUP restore
//! the terminal's settings and screen. Not on a terminal, or with `--once`, it takes two samples
//! one interval apart and prints one plain frame (no colours, no escapes).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use shoal_proto as pb;

use super::{Client, Failure, from_status};

/// Latency histograms: (pool, backend) -> cumulative buckets (upper bound, count), by bound.
type Histograms = HashMap<(String, String), Vec<(f64, f64)>>;

/// One sample: the node's status, its latency histograms and when it was taken.
struct Sample {
    at: Instant,
    status: pb::StatusReply,
    latency: Option<Histograms>,
}

pub async fn run(client: &mut Client, node: &str, once: bool, interval: Duration) -> Result<(), Failure> {
    let interval = interval.max(Duration::from_millis(100));
    let live = !once && std::io::stdout().is_terminal();
    if !live {
        let first = sample(client, node).await?;
        tokio::time::sleep(interval).await;
        let second = sample(client, node).await?;
        print!("{}", render(&frame(Some(&first), &second), None, false));
        return Ok(());
    }

    let _terminal = Terminal::enter();
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<u8>();
    if let Ok(mut tty) = std::fs::File::open("/dev/tty") {
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while let Ok(1) = tty.read(&mut b) {
                if keys_tx.send(b[0]).is_err() {
                    break;
                }
            }
        });
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Failure(1, format!("signal: {e}")))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Failure(1, format!("signal: {e}")))?;

    let mut previous: Option<Sample> = None;
    loop {
        let text = match sample(client, node).await {
            Ok(s) => {
                let f = frame(previous.as_ref(), &s);
                previous = Some(s);
                f
            }
            Err(Failure(_, e)) => {
                previous = None;
                vec![
                    Line::plain(format!("shoal top  node {node}  {}  (q quits)", clock())),
                    Line::plain(String::new()),
                    Line::plain(format!("error: {e}")),
                    Line::plain("retrying...".into()),
                ]
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(render(&text, terminal_size(), true).as_bytes());
        let _ = out.flush();
        drop(out);
        let wake = tokio::time::sleep(interval);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                k = keys.recv() => match k {
                    Some(b'q' | b'Q' | 3) => return Ok(()),
                    Some(_) => {}
                    // No more keys (the tty closed): wait for the refresh alone.
                    None => { (&mut wake).await; break }
                },
                _ = &mut ctrl_c => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = hup.recv() => return Ok(()),
            }
        }
    }
}

async fn sample(client: &mut Client, node: &str) -> Result<Sample, Failure> {
    let status = tokio::time::timeout(Duration::from_secs(3), client.status(pb::StatusRequest {}))
        .await
        .map_err(|_| Failure(2, format!("node {node}: no status reply within 3 s")))?
        .map_err(|s| from_status(node, s))?
        .into_inner();
    let at = Instant::now();
    let latency = match status.members.iter().find(|m| m.is_self).map(|m| admin_target(&m.admin_addr, node)) {
        Some(Some(addr)) => {
            tokio::task::spawn_blocking(move || fetch_metrics(&addr).map(|t| parse_latency(&t))).await.ok().flatten()
        }
        _ => None,
    };
    Ok(Sample { at, status, latency })
}

/// The admin address to dial: the member's, with an unspecified host replaced by --node's.
fn admin_target(admin: &str, node: &str) -> Option<String> {
    let (host, port) = admin.rsplit_once(':')?;
    let host = match host {
        "0.0.0.0" | "[::]" | "" => node.rsplit_once(':').map_or(node, |(h, _)| h),
        h => h,
    };
    Some(format!("{host}:{port}"))
}

/// `GET /metrics` over plain HTTP/1.0 with short timeouts; None on any failure.
fn fetch_metrics(addr: &str) -> Option<String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let sa = addr.to_socket_addrs().ok()?.next()?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut body = Vec::new();
    s.take(32 << 20).read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let (head, rest) = text.split_once("\r\n\r\n")?;
    head.split(' ').nth(1).filter(|c| *c == "200")?;
    Some(rest.to_string())
}

/// `shoal_backend_response_seconds_bucket{pool,backend,le}` lines, by (pool, backend).
fn parse_latency(text: &str) -> Histograms {
    let mut out = Histograms::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("shoal_backend_response_seconds_bucket{") else { continue };
        let Some((labels, value)) = rest.split_once('}') else { continue };
        let Some(count) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let (mut pool, mut backend, mut le) = (None, None, None);
        for pair in labels.split("\",") {
            let Some((k, v)) = pair.split_once("=\"") else { continue };
            let v = v.trim_end_matches('"').to_string();
            match k.trim_start_matches(',') {
                "pool" => pool = Some(v),
                "backend" => backend = Some(v),
                "le" => le = if v == "+Inf" { Some(f64::INFINITY) } else { v.parse().ok() },
                _ => {}
            }
        }
        if let (Some(p), Some(b), Some(le)) = (pool, backend, le) {
            out.entry((p, b)).or_default().push((le, count));
        }
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The q-quantile of cumulative buckets (linear within a bucket, as `histogram_quantile`);
/// None without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_n) = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let width = n - prev_n;
            return Some(if width > 0.0 { prev_le + (le - prev_le) * (rank - prev_n) / width } else { le });
        }
        (prev_le, prev_n) = (le, n);
    }
    None
}

fn p99(prev: Option<&Sample>, now: &Sample, key: &(String, String)) -> String {
    let Some(cur) = now.latency.as_ref().and_then(|l| l.get(key)) else { return "-".into() };
    let window: Vec<(f64, f64)> = match prev.and_then(|p| p.latency.as_ref()).and_then(|l| l.get(key)) {
        Some(before) if before.len() == cur.len() => {
            cur.iter().zip(before).map(|(c, b)| (c.0, (c.1 - b.1).max(0.0))).collect()
        }
        _ => return "-".into(),
    };
    match quantile(0.99, &window) {
        Some(s) if s < 0.001 => format!("{:.2}ms", s * 1000.0),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
        None => "-".into(),
    }
}

/// A line of the frame and the colour of some of its character ranges.
struct Line {
    text: String,
    colours: Vec<(usize, usize, &'static str)>,
}

impl Line {
    fn plain(text: String) -> Line {
        Line { text, colours: Vec::new() }
    }
}

const BOLD: &str = "\x1b[1m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[1;31m";
const DIM: &str = "\x1b[2m";

fn state_colour(state: &str) -> &'static str {
    match state {
        "alive" | "up" => GREEN,
        "draining" | "leaving" => YELLOW,
        "dead" | "down" => RED,
        _ => DIM,
    }
}

/// Rows padded into columns two spaces apart; the cells of `coloured` columns take the colour
/// `colour(cell)` gives.
fn table(
    indent: &str,
    header: &[&str],
    rows: &[Vec<String>],
    coloured: usize,
    colour: fn(&str) -> &'static str,
) -> Vec<Line> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String], colourise: bool| {
        let mut text = indent.to_string();
        let mut colours = Vec::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let start = text.chars().count();
            let _ = write!(text, "{c:<w$}", w = widths[i]);
            if colourise && i == coloured {
                colours.push((start, start + c.chars().count(), colour(c)));
            }
        }
        Line { text: text.trim_end().to_string(), colours }
    };
    let mut out = vec![line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>(), false)];
    let n = out[0].text.chars().count();
    out[0].colours.push((0, n, BOLD));
    out.extend(rows.iter().map(|r| line(r, true)));
    out
}

fn frame(prev: Option<&Sample>, now: &Sample) -> Vec<Line> {
    let s = &now.status;
    let secs = prev.map(|p| now.at.duration_since(p.at).as_secs_f64()).filter(|d| *d > 0.0);
    let alive = s.members.iter().filter(|m| m.state == "alive").count();
    let total_rps: f64 = s.members.iter().filter(|m| m.state == "alive").map(|m| m.req_per_sec).sum();
    let mut out = Vec::new();
    let header = format!(
        "shoal top  cluster {}  node {} ({})  members {}/{} alive  {:.1} req/s  {}  (q quits)",
        s.cluster_id,
        s.node_id,
        s.state,
        alive,
        s.members.len(),
        total_rps,
        clock()
    );
    let n = header.chars().count();
    out.push(Line { text: header, colours: vec![(0, n, BOLD)] });
    out.push(Line::plain(String::new()));
    out.push(Line::plain("MEMBERS".into()));
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.node_id.clone(),
                m.state.clone(),
                if m.is_self { "*".into() } else { String::new() },
                m.proxy_addr.clone(),
                m.in_flight.to_string(),
                format!("{:.1}", m.req_per_sec),
            ]
        })
        .collect();
    out.extend(table("  ", &["NODE", "STATE", "", "PROXY", "IN-FLIGHT", "REQ/S"], &rows, 1, state_colour));

    // Pools in the node's order (its backends come pool by pool), then any pool only backends name.
    let mut pools: Vec<String> = s.upstreams.iter().map(|u| u.name.clone()).collect();
    for b in &s.backends {
        if !pools.contains(&b.pool) {
            pools.push(b.pool.clone());
        }
    }
    for pool in &pools {
        let backends: Vec<&pb::Backend> = s.backends.iter().filter(|b| &b.pool == pool).collect();
        let mut pool_rate = Some(0.0);
        let rows: Vec<Vec<String>> = backends
            .iter()
            .map(|b| {
                let before = prev.and_then(|p| p.status.backends.iter().find(|x| x.pool == b.pool && x.addr == b.addr));
                let rate = match (before, secs) {
                    (Some(x), Some(d)) => Some(b.requests.saturating_sub(x.requests) as f64 / d),
                    _ => None,
                };
                let fails = match before {
                    Some(x) if b.failures > x.failures => format!("{} (+{})", b.failures, b.failures - x.failures),
                    _ => b.failures.to_string(),
                };
                pool_rate = pool_rate.zip(rate).map(|(a, r)| a + r);
                vec![
                    format!("{}{}", b.addr, if b.backup { " (backup)" } else { "" }),
                    b.state.clone(),
                    rate.map_or("-".into(), |r| format!("{r:.1}")),
                    format!("{}/{}", b.local_in_flight, b.cluster_in_flight),
                    p99(prev, now, &(b.pool.clone(), b.addr.clone())),
                    fails,
                    b.requests.to_string(),
                    if b.down_on.is_empty() { "-".into() } else { b.down_on.join(",") },
                ]
            })
            .collect();
        out.push(Line::plain(String::new()));
        let summary = match s.upstreams.iter().find(|u| &u.name == pool) {
            Some(u) => format!("{}, {}/{} up", u.algorithm, u.up, u.backends),
            None => format!("{} backends", backends.len()),
        };
        let rate = pool_rate.map_or("-".into(), |r| format!("{r:.1}"));
        let title = format!("POOL {pool}  ({summary}, {rate} req/s through {})", s.node_id);
        let n = title.chars().count();
        out.push(Line { text: title, colours: vec![(0, n, BOLD)] });
        if rows.is_empty() {
            out.push(Line::plain("  (no backends)".into()));
            continue;
        }
        out.extend(table(
            "  ",
            &["BACKEND", "STATE", "REQ/S", "IN-FLIGHT(LOCAL/CLUSTER)", "P99", "FAILURES", "REQUESTS", "DOWN ON"],
            &rows,
            1,
            state_colour,
        ));
    }
    out
}

/// The frame as text: on a terminal from the top-left corner, each line clearing its rest and
/// cut to the terminal's size, with colours; otherwise plain lines.
fn render(lines: &[Line], size: Option<(usize, usize)>, terminal: bool) -> String {
    let mut out = String::new();
    if !terminal {
        for l in lines {
            out.push_str(&l.text);
            out.push('\n');
        }
        return out;
    }
    let (rows, cols) = size.unwrap_or((usize::MAX, usize::MAX));
    out.push_str("\x1b[H");
    let shown = if lines.len() > rows { rows.saturating_sub(1) } else { lines.len() };
    for l in &lines[..shown] {
        let chars: Vec<char> = l.text.chars().take(cols).collect();
        let mut pos = 0;
        for &(start, end, colour) in &l.colours {
            let (start, end) = (start.min(chars.len()), end.min(chars.len()));
            if start < pos || start >= end {
                continue;
            }
            out.extend(&chars[pos..start]);
            out.push_str(colour);
            out.extend(&chars[start..end]);
            out.push_str("\x1b[0m");
            pos = end;
        }
        out.extend(&chars[pos..]);
        out.push_str("\x1b[K\r\n");
    }
    if shown < lines.len() {
        let _ = write!(out, "... {} more lines (enlarge the window)\x1b[K", lines.len() - shown);
    }
    out.push_str("\x1b[J");
    out
}

/// Rows and columns of the controlling terminal (`stty size`).
fn terminal_size() -> Option<(usize, usize)> {
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = Proc::new("stty").arg("size").stdin(tty).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|n| n.parse::<usize>().ok());
    match (it.next()??, it.next()??) {
        (0, _) | (_, 0) => None,
        size => Some(size),
    }
}

fn stty(args: &[&str]) -> Option<String> {
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = Proc::new("stty").args(args).stdin(tty).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The terminal in top's mode while it lives: settings saved (`stty -g`), then no echo and
/// keys delivered one at a time (signals still on, so Ctrl-C is SIGINT), the alternate screen,
/// the cursor hidden. Dropping it (on any return, error or panic) restores all of it.
struct Terminal {
    saved: Option<String>,
}

impl Terminal {
    fn enter() -> Terminal {
        let saved = stty(&["-g"]);
        if saved.is_some() {
            let _ = stty(&["-icanon", "-echo", "min", "1", "time", "0"]);
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J");
        let _ = out.flush();
        Terminal { saved }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"\x1b[0m\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
        if let Some(s) = &self.saved {
            let _ = stty(&[s]);
        }
    }
}

fn clock() -> String {
    super::chrono_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_of_buckets_interpolates_and_stops_at_the_last_bound() {
        let b = [(0.001, 0.0), (0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        let q = quantile(0.99, &b).unwrap();
        assert!((q - 0.0982).abs() < 1e-9, "{q}");
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 10.0)]), Some(0.1));
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn parses_the_histogram_lines() {
        let text = "# TYPE shoal_backend_response_seconds histogram\n\
            shoal_backend_response_seconds_bucket{pool=\"api\",backend=\"127.0.0.1:9\",le=\"0.005\"} 3\n\
            shoal_backend_response_seconds_bucket{pool=\"api\",backend=\"127.0.0.1:9\",le=\"+Inf\"} 4\n\
            shoal_backend_response_seconds_count{pool=\"api\",backend=\"127.0.0.1:9\"} 4\n";
        let m = parse_latency(text);
        assert_eq!(m[&("api".to_string(), "127.0.0.1:9".to_string())], vec![(0.005, 3.0), (f64::INFINITY, 4.0)]);
    }
}
