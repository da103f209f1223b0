//! `shoal import-nginx`: reads an nginx config with an `upstream { ... }` block and prints the
//! equivalent Shoal config (TOML), with a warning for every directive it cannot map.
//!
//! Mapped: `least_conn`, `ip_hash`, `random two`, `server ADDR weight= max_fails=
//! fail_timeout= max_conns= backup`, `keepalive`, nginx_upstream_check_module's `check`,
//! `check_http_send`, `check_http_expect_alive`, `sticky cookie NAME expires=`,
//! `limit_req_zone ... rate=` + `limit_req burst= nodelay`, `proxy_connect_timeout`,
//! `proxy_read_timeout`, `listen`, `access_log`.

use std::fmt::Write as _;

#[derive(Debug)]
pub struct Converted {
    pub toml: String,
    pub warnings: Vec<String>,
}

/// One directive: its words, line, and the directives of its block (if it opens one).
#[derive(Debug)]
struct Directive {
    words: Vec<String>,
    line: usize,
    block: Vec<Directive>,
}

fn tokenize(text: &str) -> Result<Vec<(String, usize)>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '{' | '}' | ';' => {
                tokens.push((c.to_string(), line));
                chars.next();
            }
            '"' | '\'' => {
                let quote = c;
                chars.next();
                let start = line;
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(format!("line {start}: unterminated string")),
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                s.push('\\');
                                s.push(n);
                            }
                        }
                        Some(c) if c == quote => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            s.push(c);
                        }
                    }
                }
                tokens.push((s, start));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "{};#".contains(c) {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                tokens.push((s, line));
            }
        }
    }
    Ok(tokens)
}

fn parse_block(tokens: &[(String, usize)], pos: &mut usize, nested: bool) -> Result<Vec<Directive>, String> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut line = 0;
    while *pos < tokens.len() {
        let (t, l) = &tokens[*pos];
        *pos += 1;
        match t.as_str() {
            ";" => {
                if !words.is_empty() {
                    out.push(Directive { words: std::mem::take(&mut words), line, block: Vec::new() });
                }
            }
            "{" => {
                let block = parse_block(tokens, pos, true)?;
                out.push(Directive {
                    words: std::mem::take(&mut words),
                    line: if line == 0 { *l } else { line },
                    block,
                });
            }
            "}" => {
                if !nested {
                    return Err(format!("line {l}: unexpected '}}'"));
                }
                if !words.is_empty() {
                    return Err(format!("line {line}: directive {:?} is missing its ';'", words[0]));
                }
                return Ok(out);
            }
            _ => {
                if words.is_empty() {
                    line = *l;
                }
                words.push(t.clone());
            }
        }
    }
    if nested {
        return Err("unexpected end of file: a '{' block is not closed".into());
    }
    if !words.is_empty() {
        return Err(format!("line {line}: directive {:?} is missing its ';'", words[0]));
    }
    Ok(out)
}

/// nginx time ("30s", "1m", "3000" = ms for `check`, seconds elsewhere) to a Shoal duration.
fn duration(v: &str, bare_unit: &str) -> String {
    if v.chars().all(|c| c.is_ascii_digit()) { format!("{v}{bare_unit}") } else { v.to_string() }
}

fn kv(word: &str) -> Option<(&str, &str)> {
    word.split_once('=')
}

#[derive(Default)]
struct Out {
    algorithm: Option<&'static str>,
    keepalive: Option<String>,
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
    backends: Vec<String>,
    health: Vec<String>,
    sticky: Vec<String>,
    rate: Option<String>,
    burst: Option<String>,
    nodelay: bool,
    listen: Option<String>,
    access_log: Option<String>,
    warnings: Vec<String>,
    upstreams: usize,
}

fn walk(ds: &[Directive], out: &mut Out) {
    for d in ds {
        let name = d.words[0].as_str();
        let args = &d.words[1..];
        let warn =
            |out: &mut Out, why: &str| out.warnings.push(format!("line {}: {} {}", d.line, d.words.join(" "), why));
        match name {
            "upstream" => {
                out.upstreams += 1;
                if out.upstreams > 1 {
                    warn(out, "— ignored: a Shoal cluster has one backend pool (only the first upstream is converted)");
                    continue;
                }
                upstream(&d.block, out);
            }
            "limit_req_zone" => {
                for a in args {
                    if let Some(("rate", r)) = kv(a) {
                        out.rate = Some(r.to_string());
                    }
                }
                if !args.iter().any(|a| a.contains("binary_remote_addr") || a.contains("remote_addr")) {
                    warn(out, "— Shoal limits per client IP only");
                }
            }
            "limit_req" => {
                for a in args {
                    match kv(a) {
                        Some(("burst", b)) => out.burst = Some(b.to_string()),
                        Some(("zone", _)) => {}
                        _ if a == "nodelay" => out.nodelay = true,
                        _ => warn(out, &format!("— option {a:?} has no Shoal equivalent")),
                    }
                }
            }
            "proxy_connect_timeout" => out.connect_timeout = args.first().map(|v| duration(v, "s")),
            "proxy_read_timeout" => out.read_timeout = args.first().map(|v| duration(v, "s")),
            "listen" => {
                if let Some(a) = args.first() {
                    out.listen =
                        Some(if a.chars().all(|c| c.is_ascii_digit()) { format!("0.0.0.0:{a}") } else { a.clone() });
                }
            }
            "access_log" => {
                if let Some(p) = args.first().filter(|p| *p != "off") {
                    out.access_log = Some(p.clone());
                }
            }
            "proxy_buffering" | "proxy_buffer_size" | "proxy_buffers" | "proxy_busy_buffers_size" => {
                warn(out, "— not needed: Shoal streams bodies both ways without buffering them whole")
            }
            "proxy_set_header" | "proxy_http_version" | "proxy_pass" => {
                // Shoal sets Host, X-Real-IP, X-Forwarded-*, Upgrade handling and HTTP/1.1 itself.
            }
            _ => walk(&d.block, out),
        }
    }
}

fn upstream(ds: &[Directive], out: &mut Out) {
    for d in ds {
        let args = &d.words[1..];
        let warn =
            |out: &mut Out, why: &str| out.warnings.push(format!("line {}: {} {}", d.line, d.words.join(" "), why));
        match d.words[0].as_str() {
            "least_conn" => out.algorithm = Some("least-conn"),
            "ip_hash" => out.algorithm = Some("ip-hash"),
            "random" => {
                out.algorithm = Some("random-two");
                if !args.iter().any(|a| a == "two") {
                    warn(out, "— mapped to random-two (power of two choices)");
                }
            }
            "hash" => {
                out.algorithm = Some("ip-hash");
                warn(out, "— Shoal hashes only on the client IP (ip-hash)");
            }
            "keepalive" => out.keepalive = args.first().cloned(),
            "keepalive_timeout" | "keepalive_requests" | "zone" | "keepalive_time" => {
                warn(out, "— not needed in Shoal (ignored)")
            }
            "server" => server(d, out),
            "check" => {
                for a in args {
                    match kv(a) {
                        Some(("interval", v)) => out.health.push(format!("interval = \"{}\"", duration(v, "ms"))),
                        Some(("timeout", v)) => out.health.push(format!("timeout = \"{}\"", duration(v, "ms"))),
                        Some(("rise", v)) => out.health.push(format!("rise = {v}")),
                        Some(("fall", v)) => out.health.push(format!("fall = {v}")),
                        Some(("type", v)) if v == "http" || v == "tcp" => out.health.push(format!("type = \"{v}\"")),
                        _ => warn(out, &format!("— check option {a:?} has no Shoal equivalent")),
                    }
                }
            }
            "check_http_send" => {
                let path = args.first().and_then(|r| r.split_whitespace().nth(1)).unwrap_or("/");
                out.health.push(format!("path = \"{path}\""));
            }
            "check_http_expect_alive" => {
                let classes: Vec<String> =
                    args.iter().filter_map(|a| a.strip_prefix("http_")).map(|c| format!("\"{c}\"")).collect();
                out.health.push(format!("expect = [{}]", classes.join(", ")));
            }
            "sticky" => {
                if args.first().map(String::as_str) != Some("cookie") || args.len() < 2 {
                    warn(out, "— only `sticky cookie NAME` maps to Shoal");
                    continue;
                }
                out.algorithm = Some("cookie");
                out.sticky.push(format!("cookie = \"{}\"", args[1]));
                for a in &args[2..] {
                    match kv(a) {
                        Some(("expires", v)) => out.sticky.push(format!("expires = \"{v}\"")),
                        _ => {
                            warn(out, &format!("— sticky option {a:?} is not supported (Shoal sets Path=/, HttpOnly)"))
                        }
                    }
                }
            }
            _ => warn(out, "— no Shoal equivalent (ignored)"),
        }
    }
}

fn server(d: &Directive, out: &mut Out) {
    let Some(addr) = d.words.get(1) else {
        out.warnings.push(format!("line {}: server without an address", d.line));
        return;
    };
    let addr = if addr.parse::<std::net::SocketAddr>().is_ok() {
        addr.clone()
    } else if addr.parse::<std::net::IpAddr>().is_ok() {
        format!("{addr}:80")
    } else {
        out.warnings
            .push(format!("line {}: server {addr} — Shoal needs IP:PORT; resolve the name and edit the entry", d.line));
        addr.to_string()
    };
    let mut entry = format!("\n[[upstream.backend]]\naddr = \"{addr}\"\n");
    for a in &d.words[2..] {
        match kv(a) {
            Some(("weight", v)) => writeln!(entry, "weight = {v}").unwrap_or(()),
            Some(("max_fails", v)) => writeln!(entry, "max_fails = {v}").unwrap_or(()),
            Some(("fail_timeout", v)) => writeln!(entry, "fail_timeout = \"{}\"", duration(v, "s")).unwrap_or(()),
            Some(("max_conns", v)) => {
                writeln!(entry, "max_conns = {v}").unwrap_or(());
                out.warnings.push(format!(
                    "line {}: max_conns={v} — in Shoal this cap holds for the whole cluster, not per node",
                    d.line
                ));
            }
            _ if a == "backup" => entry.push_str("backup = true\n"),
            _ if a == "down" => {
                out.warnings.push(format!(
                    "line {}: server {addr} down — left out; add it later with `shoal backend add`",
                    d.line
                ));
                return;
            }
            _ => out.warnings.push(format!("line {}: server option {a:?} has no Shoal equivalent (ignored)", d.line)),
        }
    }
    out.backends.push(entry);
}

pub fn convert(text: &str) -> Result<Converted, String> {
    let tokens = tokenize(text)?;
    let mut pos = 0;
    let tree = parse_block(&tokens, &mut pos, false)?;
    let mut out = Out::default();
    walk(&tree, &mut out);
    if out.upstreams == 0 {
        return Err("no `upstream { ... }` block found".into());
    }
    let mut t =
        String::from("# Converted from nginx by `shoal import-nginx`. Check it with `shoald check --config FILE`.\n");
    if let Some(l) = &out.listen {
        writeln!(t, "\n[node]\nlisten = \"{l}\"").unwrap_or(());
    }
    t.push_str("\n[upstream]\n");
    match out.algorithm {
        Some(a) => writeln!(t, "algorithm = \"{a}\""),
        // nginx's default is weighted round-robin.
        None => writeln!(t, "algorithm = \"round-robin\""),
    }
    .unwrap_or(());
    for (k, v) in [
        ("keepalive", out.keepalive.as_ref().map(|v| v.to_string())),
        ("connect_timeout", out.connect_timeout.as_ref().map(|v| format!("\"{v}\""))),
        ("read_timeout", out.read_timeout.as_ref().map(|v| format!("\"{v}\""))),
    ] {
        if let Some(v) = v {
            writeln!(t, "{k} = {v}").unwrap_or(());
        }
    }
    for b in &out.backends {
        t.push_str(b);
    }
    if !out.health.is_empty() {
        t.push_str("\n[health]\n");
        for h in &out.health {
            writeln!(t, "{h}").unwrap_or(());
        }
    }
    if !out.sticky.is_empty() {
        t.push_str("\n[sticky]\n");
        for s in &out.sticky {
            writeln!(t, "{s}").unwrap_or(());
        }
    }
    if let Some(rate) = &out.rate {
        writeln!(t, "\n[rate_limit]\nrate = \"{rate}\"").unwrap_or(());
        if let Some(b) = &out.burst {
            writeln!(t, "burst = {b}").unwrap_or(());
        }
        if out.nodelay {
            t.push_str("nodelay = true\n");
        }
    }
    if let Some(p) = &out.access_log {
        writeln!(t, "\n[access_log]\npath = \"{p}\"").unwrap_or(());
    }
    Ok(Converted { toml: t, warnings: out.warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_example() {
        let src = r#"
upstream app_servers {
  least_conn;
  server 10.132.2.31:8000
    weight=3              # comment
    max_fails=3
    fail_timeout=30s
    max_conns=1000;
  server 10.132.4.55:8000 weight=2;
  server 10.132.6.88:8000 backup;
  keepalive 32;
}
server {
  listen 80;
  access_log /var/log/nginx/a.log combined;
  limit_req_zone $binary_remote_addr zone=one:10m rate=10r/s;
  limit_req zone=one burst=20 nodelay;
  proxy_connect_timeout 5s;
  proxy_read_timeout 60s;
  location / { proxy_pass http://app_servers; proxy_buffering on; }
}"#;
        let c = convert(src).unwrap();
        assert!(c.toml.contains("algorithm = \"least-conn\""));
        assert!(c.toml.contains(
            "addr = \"10.132.2.31:8000\"\nweight = 3\nmax_fails = 3\nfail_timeout = \"30s\"\nmax_conns = 1000"
        ));
        assert!(c.toml.contains("backup = true"));
        assert!(c.toml.contains("rate = \"10r/s\"\nburst = 20\nnodelay = true"));
        assert!(c.toml.contains("keepalive = 32"));
        assert!(c.warnings.iter().any(|w| w.contains("proxy_buffering")));
        assert!(c.warnings.iter().any(|w| w.contains("max_conns")));
    }

    #[test]
    fn health_and_sticky() {
        let src = "upstream a {\n server 10.0.0.1;\n check interval=3000 rise=2 fall=3 timeout=1000 type=http;\n check_http_send \"GET /health HTTP/1.0\\r\\n\\r\\n\";\n check_http_expect_alive http_2xx http_3xx;\n}\nupstream b { server 10.0.0.2; sticky cookie srv_id expires=1h domain=.x.com path=/; }";
        let c = convert(src).unwrap();
        assert!(c.toml.contains("addr = \"10.0.0.1:80\""));
        assert!(c.toml.contains("interval = \"3000ms\""));
        assert!(c.toml.contains("path = \"/health\""));
        assert!(c.toml.contains("expect = [\"2xx\", \"3xx\"]"));
        assert!(c.warnings.iter().any(|w| w.contains("one backend pool")));
    }

    #[test]
    fn errors() {
        assert!(convert("server { listen 80; }").unwrap_err().contains("no `upstream"));
        assert!(convert("upstream a { server 10.0.0.1 }").unwrap_err().contains("missing its ';'"));
        assert!(convert("upstream a { server 10.0.0.1;").unwrap_err().contains("not closed"));
    }
}
