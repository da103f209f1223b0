//! `shoal import-nginx`: reads an nginx config (a whole `nginx.conf` with `http { ... }`, or the
//! `upstream` and `server` blocks of a `conf.d` file) and prints the equivalent Shoal config
//! (TOML), with a warning on stderr, naming the line, for every directive it cannot map.
//!
//! # What maps
//! - **Pools.** Every `upstream NAME { ... }` is a pool: `least_conn`, `ip_hash`, `random two`,
//!   `hash` (as ip-hash, warned), `server ADDR weight= max_fails= fail_timeout= max_conns=
//!   backup` (`down`: left out, warned), `keepalive`, nginx_upstream_check_module's `check`,
//!   `check_http_send`, `check_http_expect_alive` (the pool's health table), `sticky cookie NAME
//!   expires=` (its sticky table). The pool the catch-all site's `location /` proxies to is
//!   `[upstream]` (the pool named "default"); the catch-all site is the first proxying `server`
//!   with `default_server`, else the first with `server_name _` (or `""`, or none), else the
//!   first. With no such location, the first upstream is the default. Every other pool is
//!   `[upstreams.NAME]`; names with characters Shoal does not take are sanitized (warned).
//!   `proxy_pass http://10.0.0.1:8080` with no upstream of that name makes a pool of that one
//!   backend, `addr-10-0-0-1-8080`; `https://` sets the pool's `tls = true`.
//! - **Per location, onto its pool**: `proxy_connect_timeout`, `proxy_read_timeout`,
//!   `proxy_next_upstream` (statuses -> `retry_on`, `off` -> `retries = 0`),
//!   `proxy_next_upstream_tries`, `proxy_ssl_name`/`_trusted_certificate`/`_verify`, and
//!   `limit_req` with its `limit_req_zone ... rate=` (the pool's rate_limit table). These are
//!   inherited http -> server -> location as nginx does; a pool reached from two locations with
//!   different values keeps the first (warned).
//! - **Routes.** Each `server_name` x `location` whose location proxies to a pool is a
//!   `[[route]]`: `a.example.com` exact, `*.example.com`, `.example.com` (both `example.com` and
//!   `*.example.com`); `_`, `""` or no server_name: any host. The catch-all site's routes have no
//!   host (plus its names that another server's wildcard would otherwise take). `location /p/`
//!   -> `path = "/p/"`, `location = /x` -> `"=/x"`, `location ^~ /p/` -> `"/p/"` (warned);
//!   `proxy_pass http://pool/;` -> `strip_prefix = true`. A route that only repeats the default
//!   (any host, `/`, pool default) is not written; of two routes with the same host and path the
//!   catch-all site's, else the first, is kept (warned).
//! - **Redirects.** `return 301|302|303|307|308 https://www.example.com$request_uri;` (or
//!   `rewrite ^ ... permanent`) in a server or location -> `redirect = "https://www.example.com"`
//!   (warned when the code is not 308: Shoal answers 308). A redirect that only switches to https
//!   (`https://$host$request_uri`, also inside `if ($scheme = http)`) -> `[tls] redirect_http`.
//! - **Listeners and TLS.** `listen 80` -> `[node] listen`; `listen 443 ssl` -> `[tls] listen`,
//!   with every TLS server's `ssl_certificate`/`ssl_certificate_key` pairs in
//!   `[tls] certificates` (once each); `ssl_protocols` -> `min_version`. One plain and one TLS
//!   address; other listen addresses are warned.
//! - **Node-wide**: `keepalive_timeout`, `client_header_timeout`, `client_body_timeout`,
//!   `send_timeout`, `worker_processes N` -> `[node]` (`auto` is Shoal's default);
//!   `access_log PATH [combined]` -> `[access_log]` (one file).
//! - **Not needed, no warning** (Shoal does them itself): `proxy_set_header` of `Host $host`,
//!   `X-Real-IP`, `X-Forwarded-For`, `X-Forwarded-Proto`, `Upgrade`, `Connection`;
//!   `proxy_http_version`; `http2`; `proxy_ssl_server_name`.
//!
//! A file with one upstream and one site gives `[upstream]` and no routes, as before pools
//! and routes existed.
//!
//! # What warns
//! Everything else, by line (warnings are sorted by line): regex and named locations (skipped
//! with their contents), nested locations, `if` blocks other than the https switch, regex or
//! `www.*` server names, URIs in `proxy_pass` other than none, `/` or the location's own path,
//! variables, `return` with a fixed status (`403`, `444`), redirects that change the path,
//! `include` (not followed), files, compression, response headers, custom request headers,
//! access rules, buffering, caching, cipher and session settings, `error_log`, `log_format`.
//! And where Shoal behaves differently from the nginx file: a redirect answered with 308, a
//! second upstream of the same name, a location without `limit_req` to a rate-limited pool,
//! two locations setting one pool differently, a server without `location /` (nginx: 404),
//! `default_server` on a server other than the catch-all, `redirect_http` while a server
//! proxies plain HTTP, a second listen address, relative certificate paths, `access_log off`,
//! and TLS to backends (nginx does not verify their certificates by default, Shoal does).

use std::collections::HashMap;
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
                if words.is_empty() {
                    return Err(format!("line {l}: a '{{' block without a directive name"));
                }
                let block = parse_block(tokens, pos, true)?;
                out.push(Directive { words: std::mem::take(&mut words), line, block });
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

/// `v` if it is a non-negative integer (TOML writes it bare).
fn int(v: &str) -> Option<&str> {
    (!v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit())).then_some(v)
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if c.is_control() => write!(o, "\\u{:04X}", c as u32).unwrap_or(()),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The `key = value` lines of one TOML table in the order first set (values are TOML
/// already); setting a key again replaces its value in place.
#[derive(Debug, Default, Clone, PartialEq)]
struct Keys(Vec<(&'static str, String)>);

impl Keys {
    fn set(&mut self, key: &'static str, value: String) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = value,
            None => self.0.push((key, value)),
        }
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn write(&self, t: &mut String) {
        for (k, v) in &self.0 {
            writeln!(t, "{k} = {v}").unwrap_or(());
        }
    }
}

/// A `limit_req` in effect in a location.
#[derive(Debug, Clone)]
struct Limit {
    zone: String,
    burst: Option<String>,
    nodelay: bool,
    line: usize,
}

impl Limit {
    fn same(&self, o: &Limit) -> bool {
        self.zone == o.zone && self.burst == o.burst && self.nodelay == o.nodelay
    }
}

/// What a block passes down to the blocks inside it. As in nginx, a block's own setting
/// replaces its parent's, and a block with any `limit_req` (or `ssl_certificate`) replaces all
/// of its parent's.
#[derive(Debug, Clone, Default)]
struct Scope {
    /// Pool keys from `proxy_*` directives: (key, TOML value, line).
    pool: Vec<(&'static str, String, usize)>,
    limit: Option<Limit>,
    certs: Vec<(String, usize)>,
    cert_keys: Vec<(String, usize)>,
}

impl Scope {
    fn set_pool(&mut self, key: &'static str, value: String, line: usize) {
        self.pool.retain(|(k, _, _)| *k != key);
        self.pool.push((key, value, line));
    }
}

/// Directives `Conv::scope` reads (the content walks skip them).
fn is_scope(name: &str) -> bool {
    matches!(
        name,
        "proxy_connect_timeout"
            | "proxy_read_timeout"
            | "proxy_next_upstream"
            | "proxy_next_upstream_tries"
            | "proxy_ssl_verify"
            | "proxy_ssl_name"
            | "proxy_ssl_trusted_certificate"
            | "proxy_ssl_server_name"
            | "limit_req"
            | "ssl_certificate"
            | "ssl_certificate_key"
    )
}

/// One backend pool.
#[derive(Debug)]
struct Pool {
    /// What nginx calls it: the upstream's name, or the `proxy_pass` address.
    nginx: String,
    /// Shoal's name (valid and unique; the default pool is written as `[upstream]`).
    name: String,
    line: usize,
    /// From an `upstream` block (else made for a `proxy_pass` address).
    block: bool,
    keys: Keys,
    backends: Vec<Keys>,
    health: Keys,
    sticky: Keys,
    rate_limit: Keys,
    /// Keys taken from the locations that proxy here: key -> (value, line of the location).
    from_locations: HashMap<&'static str, (String, usize)>,
    /// Each location that proxies here: its line, its words and the `limit_req` in effect there.
    limits: Vec<(usize, String, Option<Limit>)>,
    /// Warned that nginx does not verify backend certificates by default.
    verify_warned: bool,
}

impl Pool {
    fn new(nginx: &str, name: String, line: usize, block: bool) -> Self {
        let mut keys = Keys::default();
        // nginx's default is weighted round-robin.
        keys.set("algorithm", q("round-robin"));
        Pool {
            nginx: nginx.to_string(),
            name,
            line,
            block,
            keys,
            backends: Vec::new(),
            health: Keys::default(),
            sticky: Keys::default(),
            rate_limit: Keys::default(),
            from_locations: HashMap::new(),
            limits: Vec::new(),
            verify_warned: false,
        }
    }
}

/// A `server_name` entry Shoal can match.
#[derive(Debug, Clone, PartialEq)]
enum Name {
    Any,
    Exact(String),
    /// `*.example.com`.
    Wild(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Pool(usize),
    /// 308 to this origin.
    Redirect(String),
}

/// A location that maps to a route.
#[derive(Debug)]
struct Loc {
    /// `/prefix` or `=/exact`.
    path: String,
    line: usize,
    target: Target,
    strip: bool,
}

/// One `server { ... }` block.
#[derive(Debug, Default)]
struct Site {
    line: usize,
    names: Vec<Name>,
    /// Line of its `listen ... default_server`.
    default_server: Option<usize>,
    plain: bool,
    tls: bool,
    locations: Vec<Loc>,
    /// A server-level `return` to an origin, and its line.
    redirect: Option<(String, usize)>,
    /// Line of a redirect to https on the same host (server level, `if`, or location).
    https_switch: Option<usize>,
}

enum Redirect {
    Origin(String),
    /// To https, same host, path and query.
    Https,
}

/// One route, before it is written.
struct Route {
    host: Option<String>,
    path: String,
    target: Target,
    strip: bool,
    line: usize,
    catch_all: bool,
}

#[derive(Default)]
struct Conv {
    warnings: Vec<String>,
    pools: Vec<Pool>,
    /// `limit_req_zone`: zone name -> rate.
    zones: HashMap<String, String>,
    sites: Vec<Site>,
    node: Keys,
    node_lines: HashMap<&'static str, usize>,
    plain_listen: Option<(String, usize)>,
    tls_listen: Option<(String, usize)>,
    certificates: Vec<(String, String)>,
    tls: Keys,
    /// Redirects to https on the same host: (line, the directive's words).
    https_switches: Vec<(usize, String)>,
    access_log: Option<(String, usize)>,
    /// Lines of `access_log off`.
    access_log_off: Vec<usize>,
    relative_warned: Vec<String>,
}

/// Why a directive Shoal has nothing for is ignored.
fn why_unmapped(name: &str) -> &'static str {
    match name {
        "proxy_buffering"
        | "proxy_buffer_size"
        | "proxy_buffers"
        | "proxy_busy_buffers_size"
        | "proxy_request_buffering"
        | "proxy_max_temp_file_size"
        | "proxy_temp_file_write_size"
        | "client_body_buffer_size" => "— not needed: Shoal streams bodies both ways without buffering them whole",
        "root" | "alias" | "index" | "try_files" | "autoindex" | "expires" | "sendfile" | "tcp_nopush"
        | "default_type" | "types" | "charset" | "open_file_cache" | "etag" | "aio" | "directio" => {
            "— Shoal serves no files (ignored)"
        }
        "add_header" | "more_set_headers" | "proxy_hide_header" => "— Shoal adds no response headers (ignored)",
        "allow" | "deny" | "auth_basic" | "auth_basic_user_file" | "auth_request" | "satisfy" => {
            "— Shoal has no access rules per route (ignored)"
        }
        "stub_status" => "— Shoal's admin port serves these totals in /metrics (ignored)",
        "error_log" => "— Shoal logs to stderr (the journal), `--log-format json` for JSON (ignored)",
        "log_format" => "— Shoal writes nginx's combined format plus the backend and the node (ignored)",
        "include" => "— not followed: convert the included file too, or paste it in here",
        "ssl_ciphers" | "ssl_prefer_server_ciphers" | "ssl_ecdh_curve" | "ssl_dhparam" | "ssl_conf_command" => {
            "— Shoal uses rustls's cipher suites and curves (ignored)"
        }
        "ssl_session_cache" | "ssl_session_timeout" | "ssl_session_tickets" | "ssl_session_ticket_key" => {
            "— not needed: Shoal resumes sessions with tickets derived from the cluster secret, on every node"
        }
        "ssl_stapling" | "ssl_stapling_verify" | "ssl_trusted_certificate" | "resolver" | "resolver_timeout" => {
            "— Shoal does no OCSP stapling and resolves no names (ignored)"
        }
        "ssl_client_certificate" | "ssl_verify_client" | "ssl_verify_depth" => {
            "— Shoal does not ask clients for certificates (ignored)"
        }
        "limit_conn" | "limit_conn_zone" => {
            "— Shoal caps connections per backend (max_conns), not per client (ignored)"
        }
        "user"
        | "pid"
        | "worker_rlimit_nofile"
        | "worker_cpu_affinity"
        | "events"
        | "daemon"
        | "master_process"
        | "load_module"
        | "worker_connections" => "— not needed: systemd or the container runs shoald (ignored)",
        "proxy_redirect" | "proxy_cookie_domain" | "proxy_cookie_path" => {
            "— Shoal does not rewrite response headers (ignored)"
        }
        "proxy_cache" | "proxy_cache_path" | "proxy_cache_valid" | "proxy_cache_key" | "proxy_cache_bypass"
        | "proxy_no_cache" => "— Shoal does not cache responses (ignored)",
        n if n.starts_with("gzip") => "— Shoal does not compress responses (ignored)",
        _ => "— no Shoal equivalent (ignored)",
    }
}

impl Conv {
    fn warn(&mut self, d: &Directive, why: &str) {
        self.warnings.push(format!("line {}: {} {why}", d.line, d.words.join(" ")));
    }

    /// A valid Shoal pool name for `want` that no pool has yet.
    fn pool_name(&self, want: &str) -> String {
        let mut base: String =
            want.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
        if base.is_empty() {
            base = "pool".into();
        }
        base.truncate(64);
        let taken = |n: &str| self.pools.iter().any(|p| p.name == n);
        if !taken(&base) {
            return base;
        }
        let mut i = 2;
        loop {
            let suffix = format!("-{i}");
            let mut n = base.clone();
            n.truncate(64 - suffix.len());
            n.push_str(&suffix);
            if !taken(&n) {
                return n;
            }
            i += 1;
        }
    }

    // ----- pass 1: upstream blocks and limit_req zones (a location may name them before they appear)

    fn collect(&mut self, ds: &[Directive]) {
        for d in ds {
            match d.words[0].as_str() {
                "upstream" => self.upstream_block(d),
                // http-only in nginx; read wherever it stands (users put it in server blocks).
                "limit_req_zone" => self.zone(d),
                _ => self.collect(&d.block),
            }
        }
    }

    fn zone(&mut self, d: &Directive) {
        let args = &d.words[1..];
        let name = args.iter().find_map(|a| a.strip_prefix("zone=")).map(|z| z.split(':').next().unwrap_or(z));
        let rate = args.iter().find_map(|a| a.strip_prefix("rate="));
        match (name, rate) {
            (Some(n), Some(r)) => {
                self.zones.insert(n.to_string(), r.to_string());
            }
            _ => self.warn(d, "— needs zone=NAME:SIZE and rate= (ignored)"),
        }
        if !args.iter().any(|a| a.contains("binary_remote_addr") || a.contains("remote_addr")) {
            self.warn(d, "— Shoal limits per client IP only");
        }
    }

    fn upstream_block(&mut self, d: &Directive) {
        let Some(nginx) = d.words.get(1) else {
            self.warn(d, "— an upstream without a name (skipped)");
            return;
        };
        let name = self.pool_name(nginx);
        if self.pools.iter().any(|p| p.block && p.nginx == *nginx) {
            self.warn(
                d,
                &format!("— nginx refuses a second upstream of the same name; converted as its own pool {name:?}"),
            );
        } else if name != *nginx {
            self.warn(d, &format!("— converted as pool {name:?} (Shoal pool names are 1-64 of A-Z a-z 0-9 '-' '_')"));
        }
        let mut pool = Pool::new(nginx, name, d.line, true);
        for x in &d.block {
            self.upstream_directive(x, &mut pool);
        }
        self.pools.push(pool);
    }

    fn upstream_directive(&mut self, d: &Directive, pool: &mut Pool) {
        let args = &d.words[1..];
        match d.words[0].as_str() {
            "least_conn" => pool.keys.set("algorithm", q("least-conn")),
            "least_time" => {
                pool.keys.set("algorithm", q("least-conn"));
                self.warn(d, "— mapped to least-conn (Shoal does not measure response times to pick)");
            }
            "ip_hash" => pool.keys.set("algorithm", q("ip-hash")),
            "random" => {
                pool.keys.set("algorithm", q("random-two"));
                if !args.iter().any(|a| a == "two") {
                    self.warn(d, "— mapped to random-two (power of two choices)");
                }
            }
            "hash" => {
                pool.keys.set("algorithm", q("ip-hash"));
                self.warn(d, "— Shoal hashes only on the client IP (ip-hash)");
            }
            "keepalive" => match args.first().and_then(|v| int(v)) {
                Some(v) => pool.keys.set("keepalive", v.to_string()),
                None => self.warn(d, "— needs a number (ignored)"),
            },
            "keepalive_timeout" | "keepalive_requests" | "zone" | "keepalive_time" => {
                self.warn(d, "— not needed in Shoal (ignored)")
            }
            "server" => self.backend(d, pool),
            "check" => {
                for a in args {
                    let set = match kv(a) {
                        Some(("interval", v)) => Some(("interval", q(&duration(v, "ms")))),
                        Some(("timeout", v)) => Some(("timeout", q(&duration(v, "ms")))),
                        Some(("rise", v)) => int(v).map(|v| ("rise", v.to_string())),
                        Some(("fall", v)) => int(v).map(|v| ("fall", v.to_string())),
                        Some(("type", v)) if v == "http" || v == "tcp" => Some(("type", q(v))),
                        _ => None,
                    };
                    match set {
                        Some((k, v)) => pool.health.set(k, v),
                        None => self.warn(d, &format!("— check option {a:?} has no Shoal equivalent")),
                    }
                }
            }
            "check_http_send" => {
                let path = args.first().and_then(|r| r.split_whitespace().nth(1)).unwrap_or("/");
                pool.health.set("path", q(path));
            }
            "check_http_expect_alive" => {
                let classes: Vec<String> = args.iter().filter_map(|a| a.strip_prefix("http_")).map(q).collect();
                pool.health.set("expect", format!("[{}]", classes.join(", ")));
            }
            "sticky" => {
                if args.first().map(String::as_str) != Some("cookie") || args.len() < 2 {
                    self.warn(d, "— only `sticky cookie NAME` maps to Shoal");
                    return;
                }
                pool.keys.set("algorithm", q("cookie"));
                pool.sticky.set("cookie", q(&args[1]));
                for a in &args[2..] {
                    match kv(a) {
                        Some(("expires", v)) if v != "max" => pool.sticky.set("expires", q(&duration(v, "s"))),
                        _ => self
                            .warn(d, &format!("— sticky option {a:?} is not supported (Shoal sets Path=/, HttpOnly)")),
                    }
                }
            }
            _ => self.warn(d, "— no Shoal equivalent (ignored)"),
        }
    }

    /// `server ADDR [options];` inside an upstream.
    fn backend(&mut self, d: &Directive, pool: &mut Pool) {
        let Some(addr) = d.words.get(1) else {
            self.warnings.push(format!("line {}: server without an address", d.line));
            return;
        };
        let addr = if addr.parse::<std::net::SocketAddr>().is_ok() {
            addr.clone()
        } else if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
            std::net::SocketAddr::new(ip, 80).to_string()
        } else {
            self.warnings.push(format!(
                "line {}: server {addr} — Shoal needs IP:PORT; resolve the name and edit the entry",
                d.line
            ));
            addr.to_string()
        };
        if pool.backends.iter().any(|b| b.get("addr") == Some(q(&addr).as_str())) {
            self.warnings.push(format!("line {}: server {addr} — listed twice in the upstream (left out)", d.line));
            return;
        }
        let mut entry = Keys::default();
        entry.set("addr", q(&addr));
        for a in &d.words[2..] {
            match kv(a) {
                Some(("weight", v)) if int(v).is_some() => entry.set("weight", v.to_string()),
                Some(("max_fails", v)) if int(v).is_some() => entry.set("max_fails", v.to_string()),
                Some(("fail_timeout", v)) => entry.set("fail_timeout", q(&duration(v, "s"))),
                Some(("max_conns", v)) if int(v).is_some() => {
                    entry.set("max_conns", v.to_string());
                    self.warnings.push(format!(
                        "line {}: max_conns={v} — in Shoal this cap holds for the whole cluster, not per node",
                        d.line
                    ));
                }
                _ if a == "backup" => entry.set("backup", "true".into()),
                _ if a == "down" => {
                    self.warnings.push(format!(
                        "line {}: server {addr} down — left out; add it later with `shoal backend add`",
                        d.line
                    ));
                    return;
                }
                _ => self
                    .warnings
                    .push(format!("line {}: server option {a:?} has no Shoal equivalent (ignored)", d.line)),
            }
        }
        pool.backends.push(entry);
    }

    // ----- pass 2: http, server and location blocks

    /// What `ds` (a block's directives) passes down: `parent` with this block's settings.
    fn scope(&mut self, ds: &[Directive], parent: &Scope) -> Scope {
        let mut s = parent.clone();
        let (mut limit_here, mut certs_here, mut keys_here) = (false, false, false);
        for d in ds {
            let args = &d.words[1..];
            let first = args.first().map(String::as_str).unwrap_or("");
            match d.words[0].as_str() {
                "proxy_connect_timeout" => s.set_pool("connect_timeout", q(&duration(first, "s")), d.line),
                "proxy_read_timeout" => s.set_pool("read_timeout", q(&duration(first, "s")), d.line),
                "proxy_next_upstream" => {
                    let mut statuses = Vec::new();
                    for a in args {
                        match a.as_str() {
                            "error" | "timeout" => {}
                            "off" => s.set_pool("retries", "0".into(), d.line),
                            "http_500" | "http_502" | "http_503" | "http_504" => statuses.push(q(&a[5..])),
                            _ => self.warn(
                                d,
                                &format!("— {a}: Shoal retries on connect errors, timeouts and 500/502/503/504 only"),
                            ),
                        }
                    }
                    if !args.iter().any(|a| a == "off") {
                        s.set_pool("retry_on", format!("[{}]", statuses.join(", ")), d.line);
                    }
                }
                "proxy_next_upstream_tries" => match first.parse::<u32>() {
                    // nginx counts the first try; 0 is "no limit", Shoal's default then.
                    Ok(0) => {}
                    Ok(n) => s.set_pool("retries", (n - 1).to_string(), d.line),
                    Err(_) => self.warn(d, "— needs a number (ignored)"),
                },
                "proxy_ssl_verify" => s.set_pool("verify", (first == "on").to_string(), d.line),
                "proxy_ssl_name" if !first.contains('$') => s.set_pool("sni", q(first), d.line),
                "proxy_ssl_name" => self.warn(d, "— variables are not mapped (ignored)"),
                "proxy_ssl_trusted_certificate" => s.set_pool("ca_file", q(first), d.line),
                "limit_req" => {
                    if limit_here {
                        self.warn(d, "— Shoal applies one rate limit per pool (only the first limit_req is converted)");
                        continue;
                    }
                    limit_here = true;
                    let mut limit = Limit { zone: String::new(), burst: None, nodelay: false, line: d.line };
                    for a in args {
                        match kv(a) {
                            Some(("zone", z)) => limit.zone = z.to_string(),
                            Some(("burst", b)) if int(b).is_some() => limit.burst = Some(b.to_string()),
                            _ if a == "nodelay" => limit.nodelay = true,
                            _ => self.warn(d, &format!("— option {a:?} has no Shoal equivalent")),
                        }
                    }
                    s.limit = Some(limit);
                }
                "ssl_certificate" => {
                    if !certs_here {
                        s.certs.clear();
                        certs_here = true;
                    }
                    s.certs.push((first.to_string(), d.line));
                }
                "ssl_certificate_key" => {
                    if !keys_here {
                        s.cert_keys.clear();
                        keys_here = true;
                    }
                    s.cert_keys.push((first.to_string(), d.line));
                }
                _ => {}
            }
        }
        s
    }

    /// Directives that may stand at any level (http, server, location). False: not one of them.
    fn common(&mut self, d: &Directive) -> bool {
        let args = &d.words[1..];
        let first = args.first().map(String::as_str).unwrap_or("");
        match d.words[0].as_str() {
            "proxy_set_header" => {
                let value = args.get(1).map(String::as_str).unwrap_or("");
                match first.to_ascii_lowercase().as_str() {
                    // Shoal passes the client's Host and sets the forwarding headers itself;
                    // Upgrade and Connection: it relays WebSocket upgrades on its own.
                    "host" if value == "$host" || value == "$http_host" => {}
                    "host" => self.warn(d, "— Shoal passes the client's Host header to the backend (ignored)"),
                    "x-real-ip" | "x-forwarded-for" | "x-forwarded-proto" | "upgrade" | "connection" => {}
                    _ => self.warn(d, "— Shoal sets no custom request headers (ignored)"),
                }
            }
            // Shoal speaks HTTP/1.1 with keep-alive to backends, and HTTP/2 to clients by ALPN.
            "proxy_http_version" | "http2" => {}
            "access_log" => self.access_log(d),
            "keepalive_timeout" => {
                self.node_key("keepalive_timeout", q(&duration(first, "s")), d);
                if args.len() > 1 {
                    self.warn(d, "— the Keep-Alive header timeout (second value) is not sent by Shoal");
                }
            }
            "client_header_timeout" => self.node_key("client_header_timeout", q(&duration(first, "s")), d),
            "client_body_timeout" => self.node_key("client_body_timeout", q(&duration(first, "s")), d),
            "send_timeout" => self.node_key("send_timeout", q(&duration(first, "s")), d),
            "ssl_protocols" => {
                let min = if args.iter().any(|a| a == "TLSv1.2") {
                    Some("1.2")
                } else if args.iter().any(|a| a == "TLSv1.3") {
                    Some("1.3")
                } else {
                    None
                };
                if args.iter().any(|a| a == "TLSv1" || a == "TLSv1.1" || a == "SSLv3") {
                    self.warn(d, "— Shoal offers TLS 1.2 and 1.3 only");
                }
                self.tls.set("min_version", q(min.unwrap_or("1.2")));
            }
            _ => return false,
        }
        true
    }

    fn node_key(&mut self, key: &'static str, value: String, d: &Directive) {
        match (self.node.get(key), self.node_lines.get(key)) {
            (Some(old), Some(line)) if old != value => {
                let why = format!("— Shoal has one [node] {key} ({old}, from line {line}) (ignored)");
                self.warn(d, &why);
            }
            (Some(_), _) => {}
            (None, _) => {
                self.node.set(key, value);
                self.node_lines.insert(key, d.line);
            }
        }
    }

    fn access_log(&mut self, d: &Directive) {
        let Some(path) = d.words.get(1) else { return };
        if path == "off" {
            self.access_log_off.push(d.line);
            return;
        }
        if path.starts_with("syslog:") || path.contains('$') {
            self.warn(d, "— Shoal writes its access log to a file (ignored)");
            return;
        }
        if d.words[2..].iter().any(|a| a != "combined") {
            self.warn(d, "— Shoal writes nginx's combined format plus the backend and the node (options ignored)");
        }
        match &self.access_log {
            None => self.access_log = Some((path.clone(), d.line)),
            Some((p, _)) if p == path => {}
            Some((p, l)) => {
                let why = format!("— Shoal writes one access log ({p}, from line {l}) (ignored)");
                self.warn(d, &why);
            }
        }
    }

    /// The main context and `http { ... }`.
    fn http(&mut self, ds: &[Directive], parent: &Scope) {
        let scope = self.scope(ds, parent);
        for d in ds {
            let name = d.words[0].as_str();
            match name {
                "http" => self.http(&d.block, &scope),
                "upstream" | "limit_req_zone" => {}
                "server" if d.words.len() == 1 => self.site(d, &scope),
                "worker_processes" => match d.words.get(1).map(String::as_str) {
                    // Shoal's default, like nginx's `auto`: one proxy worker per CPU.
                    Some("auto") => {}
                    Some(n) if int(n).is_some() => self.node_key("workers", n.to_string(), d),
                    _ => self.warn(d, "— needs a number or auto (ignored)"),
                },
                _ if is_scope(name) => {}
                _ if self.common(d) => {}
                _ => self.warn(d, why_unmapped(name)),
            }
        }
    }

    /// `server { ... }`.
    fn site(&mut self, d: &Directive, parent: &Scope) {
        let scope = self.scope(&d.block, parent);
        let mut s = Site { line: d.line, ..Site::default() };
        let ssl_on = d.block.iter().any(|x| x.words[0] == "ssl" && x.words.get(1).is_some_and(|v| v == "on"));
        let (mut listened, mut named) = (false, false);
        for x in &d.block {
            let name = x.words[0].as_str();
            match name {
                "listen" => {
                    listened = true;
                    self.listen(x, &mut s, ssl_on);
                }
                "server_name" => {
                    named = true;
                    self.server_names(x, &mut s);
                }
                "location" => self.location(x, &scope, &mut s),
                "return" | "rewrite" => match Self::redirect_of(x) {
                    Ok((Redirect::Origin(o), note)) => {
                        if let Some(note) = note {
                            self.warn(x, &note);
                        }
                        if s.redirect.is_none() {
                            s.redirect = Some((o, x.line));
                        }
                    }
                    Ok((Redirect::Https, _)) => self.https_switch(x, &mut s),
                    Err(why) => self.warn(x, &why),
                },
                "if" => self.if_block(x, &mut s),
                // `ssl on` (old style): read with `listen`.
                "ssl" | "limit_req_zone" => {}
                _ if is_scope(name) => {}
                _ if self.common(x) => {}
                _ => self.warn(x, why_unmapped(name)),
            }
        }
        if !listened {
            // nginx's default: listen *:80.
            s.plain = true;
        }
        if !named {
            s.names.push(Name::Any);
        }
        if s.tls {
            self.certificates(d, &scope);
        }
        if let Some((_, line)) = &s.redirect
            && !s.locations.is_empty()
        {
            let why = format!(
                "— the server's return (line {line}) answers before any location: its locations are not mapped"
            );
            self.warn(d, &why);
            s.locations.clear();
        }
        self.sites.push(s);
    }

    fn listen(&mut self, d: &Directive, s: &mut Site, ssl_on: bool) {
        let Some(a) = d.words.get(1) else {
            self.warn(d, "— needs an address (ignored)");
            return;
        };
        let mut tls = ssl_on;
        for o in &d.words[2..] {
            match o.as_str() {
                "ssl" => tls = true,
                "default_server" | "default" => s.default_server = Some(d.line),
                "http2" => {}
                _ => self.warn(d, &format!("— listen option {o} is not configurable in Shoal (ignored)")),
            }
        }
        let port = a.strip_prefix("*:").unwrap_or(a);
        let addr = if int(port).is_some() {
            format!("0.0.0.0:{port}")
        } else if a.parse::<std::net::SocketAddr>().is_ok() {
            a.clone()
        } else if let Ok(ip) = a.parse::<std::net::IpAddr>() {
            std::net::SocketAddr::new(ip, 80).to_string()
        } else {
            self.warn(d, "— Shoal listens on IP:PORT (ignored)");
            return;
        };
        let (slot, kind) = if tls {
            s.tls = true;
            (&mut self.tls_listen, "TLS")
        } else {
            s.plain = true;
            (&mut self.plain_listen, "plain HTTP")
        };
        let why = match slot {
            None => {
                *slot = Some((addr, d.line));
                return;
            }
            Some((first, _)) if *first == addr => return,
            Some((first, line)) => format!(
                "— Shoal has one {kind} listener ({first}, from line {line}); this server's routes are served there"
            ),
        };
        self.warn(d, &why);
    }

    fn server_names(&mut self, d: &Directive, s: &mut Site) {
        for n in &d.words[1..] {
            let n = n.to_ascii_lowercase();
            let n = n.trim_end_matches('.');
            if n == "_" || n.is_empty() {
                s.names.push(Name::Any);
            } else if n.starts_with('~') {
                self.warn(d, &format!("— regex name {n} is not mapped (Shoal matches exact names and *.suffix)"));
            } else if n.contains('$') || n.contains(':') {
                self.warn(d, &format!("— name {n} is not mapped"));
            } else if let Some(rest) = n.strip_prefix("*.")
                && !rest.contains('*')
            {
                s.names.push(Name::Wild(n.to_string()));
            } else if let Some(rest) = n.strip_prefix('.')
                && !rest.contains('*')
            {
                s.names.push(Name::Exact(rest.to_string()));
                s.names.push(Name::Wild(format!("*.{rest}")));
            } else if n.contains('*') {
                self.warn(d, &format!("— name {n} is not mapped (Shoal matches exact names and *.suffix)"));
            } else {
                s.names.push(Name::Exact(n.to_string()));
            }
        }
    }

    /// The TLS server `d`'s certificate and key pairs, into `[tls] certificates`.
    fn certificates(&mut self, d: &Directive, scope: &Scope) {
        if scope.certs.is_empty() {
            self.warn(d, "— a TLS server without ssl_certificate: add its files to [tls] certificates");
            return;
        }
        if scope.certs.len() != scope.cert_keys.len() {
            let why = format!(
                "— {} ssl_certificate and {} ssl_certificate_key: pairs taken in order",
                scope.certs.len(),
                scope.cert_keys.len()
            );
            self.warn(d, &why);
        }
        for ((cert, line), (key, _)) in scope.certs.iter().zip(&scope.cert_keys) {
            if [cert, key].iter().any(|p| p.contains('$') || p.starts_with("data:") || p.starts_with("engine:")) {
                self.warnings.push(format!(
                    "line {line}: ssl_certificate {cert} — variables, data: and engine: are not mapped (skipped)"
                ));
                continue;
            }
            for p in [cert, key] {
                if !p.starts_with('/') && !self.relative_warned.contains(p) {
                    self.relative_warned.push(p.clone());
                    self.warnings.push(format!(
                        "line {line}: {p} — a relative path: nginx reads it from its prefix (/etc/nginx/), \
                         Shoal from its working directory; write the full path"
                    ));
                }
            }
            if !self.certificates.iter().any(|(c, k)| c == cert && k == key) {
                self.certificates.push((cert.clone(), key.clone()));
            }
        }
    }

    /// `if (...) { ... }` in a server: only the switch to https is mapped.
    fn if_block(&mut self, d: &Directive, s: &mut Site) {
        let cond = d.words[1..].join(" ").replace(['(', ')'], " ");
        let cond = cond.split_whitespace().collect::<Vec<_>>().join(" ");
        let plain = matches!(
            cond.as_str(),
            "$scheme = http"
                | "$scheme != https"
                | "$https != on"
                | "$http_x_forwarded_proto = http"
                | "$http_x_forwarded_proto != https"
        );
        if plain
            && let [only] = d.block.as_slice()
            && matches!(only.words[0].as_str(), "return" | "rewrite")
            && let Ok((Redirect::Https, _)) = Self::redirect_of(only)
        {
            self.https_switch(only, s);
            return;
        }
        self.warn(d, "— `if` blocks are not mapped (skipped with everything inside)");
    }

    fn https_switch(&mut self, d: &Directive, s: &mut Site) {
        s.https_switch.get_or_insert(d.line);
        self.https_switches.push((d.line, d.words.join(" ")));
    }

    /// A `return` or `rewrite` that redirects, as Shoal can write it with a note to warn when
    /// Shoal's redirect differs, or why it cannot.
    fn redirect_of(d: &Directive) -> Result<(Redirect, Option<String>), String> {
        let args = &d.words[1..];
        let (code, url): (u16, String) = if d.words[0] == "rewrite" {
            let unmapped = || "— rewrites are not mapped (Shoal passes the path on unchanged)".to_string();
            let (Some(re), Some(to)) = (args.first(), args.get(1)) else { return Err(unmapped()) };
            let code = match args.get(2).map(String::as_str) {
                Some("permanent") => 301,
                Some("redirect") => 302,
                None if to.starts_with("http://") || to.starts_with("https://") => 302,
                _ => return Err(unmapped()),
            };
            let to = to.strip_suffix('?').unwrap_or(to);
            let url = match re.as_str() {
                "^" => to.to_string(),
                "^(.*)$" | "^(.*)" | "(.*)" => to.replace("$1", "$request_uri"),
                "^/(.*)$" | "^/(.*)" => to.replace("/$1", "$request_uri"),
                _ => return Err(unmapped()),
            };
            (code, url)
        } else {
            let fixed = "— Shoal routes answer with a pool or a redirect, not a fixed response (ignored)";
            match args {
                [c, u] => (c.parse().map_err(|_| fixed.to_string())?, u.clone()),
                [u] if u.starts_with("http://") || u.starts_with("https://") || u.starts_with("$scheme") => {
                    (302, u.clone())
                }
                _ => return Err(fixed.into()),
            }
        };
        if !matches!(code, 301 | 302 | 303 | 307 | 308) {
            return Err(format!(
                "— Shoal routes answer with a pool or a redirect, not status {code} (ignored; \
                 these requests go where Shoal's other routes send them)"
            ));
        }
        let (base, keeps, query_note) = if let Some(b) = url.strip_suffix("$request_uri") {
            (b, true, false)
        } else if let Some(b) = url.strip_suffix("$uri$is_args$args") {
            (b, true, false)
        } else if let Some(b) = url.strip_suffix("$uri") {
            (b, true, true)
        } else {
            (url.as_str(), false, false)
        };
        let Some((scheme, rest)) = base.split_once("://") else {
            return Err("— a redirect to a path is not mapped (Shoal redirects to an origin)".into());
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if !path.is_empty() {
            return Err("— a redirect that changes the path is not mapped (Shoal keeps the request's path)".into());
        }
        if matches!(authority, "$host" | "$http_host" | "$server_name") {
            if scheme == "https" && keeps {
                return Ok((Redirect::Https, None));
            }
            return Err("— a redirect to the same host is mapped only as the switch to https".into());
        }
        if scheme.contains('$') || authority.contains('$') {
            return Err("— variables other than $request_uri are not mapped (ignored)".into());
        }
        if scheme != "http" && scheme != "https" || authority.is_empty() {
            return Err("— not an http(s) URL (ignored)".into());
        }
        let origin = format!("{scheme}://{}", authority.to_ascii_lowercase());
        let mut note = format!("— mapped to redirect = {}", q(&origin));
        if code != 308 {
            let kind = if matches!(code, 301) { "" } else { ", permanent where nginx's was temporary" };
            write!(note, ": Shoal answers 308 (nginx: {code}{kind})").unwrap_or(());
        }
        if !keeps {
            note.push_str("; nginx sent every request to that one URL, Shoal keeps the request's path and query");
        }
        if query_note {
            note.push_str("; nginx dropped the query ($uri), Shoal keeps it");
        }
        Ok((Redirect::Origin(origin), (code != 308 || !keeps || query_note).then_some(note)))
    }

    /// `location [=|^~] PATH { ... }` in a server.
    fn location(&mut self, d: &Directive, parent: &Scope, s: &mut Site) {
        let w = &d.words;
        let (modifier, path) = match w.len() {
            2 if w[1].len() > 1 && w[1].starts_with('=') => ("=", &w[1][1..]),
            2 => ("", w[1].as_str()),
            3 => (w[1].as_str(), w[2].as_str()),
            _ => {
                self.warn(d, "— not understood (skipped)");
                return;
            }
        };
        match modifier {
            "~" | "~*" => {
                self.warn(d, "— regex locations are not mapped (skipped with everything inside)");
                return;
            }
            "" if path.starts_with('@') => {
                self.warn(d, "— named locations are not mapped (skipped with everything inside)");
                return;
            }
            "" | "=" | "^~" if path.starts_with('/') => {}
            _ => {
                self.warn(d, "— not understood (skipped with everything inside)");
                return;
            }
        }
        if modifier == "^~" {
            self.warn(
                d,
                &format!(
                    "— mapped as prefix {path}: ^~ (no regex check after it) has no meaning in Shoal, \
                     which has no regex locations"
                ),
            );
        }
        let route_path = if modifier == "=" { format!("={path}") } else { path.to_string() };
        let scope = self.scope(&d.block, parent);
        let (mut proxy, mut ret) = (None, None);
        for x in &d.block {
            let name = x.words[0].as_str();
            match name {
                "proxy_pass" => proxy = Some(x),
                "return" | "rewrite" if ret.is_none() => ret = Some(x),
                "return" | "rewrite" => self.warn(x, "— not reached: an earlier return or rewrite answers first"),
                "location" => self.warn(x, "— nested locations are not mapped (skipped with everything inside)"),
                "if" => self.warn(x, "— `if` blocks are not mapped (skipped with everything inside)"),
                _ if is_scope(name) => {}
                _ if self.common(x) => {}
                _ => self.warn(x, why_unmapped(name)),
            }
        }
        if let Some(r) = ret {
            match Self::redirect_of(r) {
                Ok((Redirect::Origin(o), note)) => {
                    if let Some(note) = note {
                        self.warn(r, &note);
                    }
                    if let Some(p) = proxy {
                        self.warn(p, "— not reached: the location's redirect answers first");
                    }
                    s.locations.push(Loc { path: route_path, line: d.line, target: Target::Redirect(o), strip: false });
                    return;
                }
                Ok((Redirect::Https, _)) => {
                    self.https_switch(r, s);
                    return;
                }
                Err(why) => {
                    self.warn(r, &why);
                    if proxy.is_none() {
                        return;
                    }
                }
            }
        }
        let Some(p) = proxy else {
            self.warn(d, "— no proxy_pass: not mapped (Shoal sends these requests where its other routes say)");
            return;
        };
        let Some((pool, strip, tls)) = self.proxy_pass(p, path, modifier == "=") else { return };
        self.apply(pool, &scope, tls, d);
        s.locations.push(Loc { path: route_path, line: d.line, target: Target::Pool(pool), strip });
    }

    /// `proxy_pass URL` in the location of `path`: its pool, whether the backend sees the path
    /// without the location's prefix, and whether it speaks TLS.
    fn proxy_pass(&mut self, d: &Directive, path: &str, exact: bool) -> Option<(usize, bool, bool)> {
        let url = d.words.get(1)?;
        if url.contains('$') {
            self.warn(d, "— variables in proxy_pass are not mapped (location skipped)");
            return None;
        }
        let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => {
                self.warn(d, "— only http:// and https:// are mapped (location skipped)");
                return None;
            }
        };
        let (authority, uri) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        if authority.starts_with("unix:") {
            self.warn(d, "— Shoal proxies to IP:PORT only (location skipped)");
            return None;
        }
        let pool = match self.pools.iter().position(|p| p.block && p.nginx == authority) {
            Some(i) => i,
            None => self.address_pool(authority, tls, d),
        };
        let strip = match uri {
            None => false,
            Some(u) if u == path => false,
            // The backend sees the rest of the path: "/" in place of the location's prefix.
            Some("/") => path != "/" || exact,
            Some(u) => {
                self.warn(
                    d,
                    &format!(
                        "— the URI {u} is not mapped: Shoal passes the path on unchanged, or without the \
                         location's prefix for \"/\""
                    ),
                );
                false
            }
        };
        Some((pool, strip, tls))
    }

    /// The pool of the one backend at `authority` (made on first use).
    fn address_pool(&mut self, authority: &str, tls: bool, d: &Directive) -> usize {
        let port = if tls { 443 } else { 80 };
        let addr = if authority.parse::<std::net::SocketAddr>().is_ok() {
            authority.to_string()
        } else if let Ok(ip) = authority.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
            std::net::SocketAddr::new(ip, port).to_string()
        } else {
            let addr = if authority.contains(':') { authority.to_string() } else { format!("{authority}:{port}") };
            let why = format!("— {addr} is a name: Shoal needs IP:PORT; resolve it and edit the backend's addr");
            self.warn(d, &why);
            addr
        };
        if let Some(i) = self.pools.iter().position(|p| !p.block && p.nginx == addr) {
            return i;
        }
        let mut base = String::from("addr-");
        for c in addr.chars() {
            if c.is_ascii_alphanumeric() {
                base.push(c);
            } else if !base.ends_with('-') {
                base.push('-');
            }
        }
        let name = self.pool_name(base.trim_end_matches('-'));
        let mut pool = Pool::new(&addr, name, d.line, false);
        let mut b = Keys::default();
        b.set("addr", q(&addr));
        pool.backends.push(b);
        self.pools.push(pool);
        self.pools.len() - 1
    }

    /// What the location `d` (proxying to pool `i`) sets on that pool.
    fn apply(&mut self, i: usize, scope: &Scope, tls: bool, d: &Directive) {
        let mut conflicts = Vec::new();
        let pool = &mut self.pools[i];
        // The scheme first: proxy_ssl_* apply only to a pool that speaks TLS.
        let mut sets: Vec<(&'static str, String)> = vec![("tls", tls.to_string())];
        let pool_tls = pool.from_locations.get("tls").map_or(tls, |(v, _)| v == "true");
        sets.extend(
            scope
                .pool
                .iter()
                .filter(|(k, ..)| pool_tls && tls || !matches!(*k, "sni" | "ca_file" | "verify"))
                .map(|(k, v, _)| (*k, v.clone())),
        );
        for (k, v) in sets {
            match pool.from_locations.get(k) {
                Some((old, line)) if *old != v => conflicts.push(format!(
                    "— {k} = {v} here, {old} in the location at line {line}: Shoal sets it per pool ({:?}), kept {old}",
                    pool.name
                )),
                Some(_) => {}
                None => {
                    pool.from_locations.insert(k, (v.clone(), d.line));
                    if k != "tls" || tls {
                        pool.keys.set(k, v);
                    }
                }
            }
        }
        pool.limits.push((d.line, d.words.join(" "), scope.limit.clone()));
        let verify_note =
            tls && !pool.verify_warned && !scope.pool.iter().any(|(k, ..)| *k == "verify" || *k == "ca_file");
        if verify_note {
            pool.verify_warned = true;
            conflicts.push(
                "— nginx does not verify the backends' certificates by default (proxy_ssl_verify off); \
                 Shoal does: set ca_file, or verify = false"
                    .to_string(),
            );
        }
        for c in conflicts {
            self.warn(d, &c);
        }
    }

    // ----- the result

    fn finish(mut self) -> Result<Converted, String> {
        if self.pools.is_empty() {
            return Err("no `upstream { ... }` block and no `proxy_pass` found".into());
        }
        let proxying = |s: &Site| s.locations.iter().any(|l| matches!(l.target, Target::Pool(_)));
        let catch_all = self
            .sites
            .iter()
            .position(|s| proxying(s) && s.default_server.is_some())
            .or_else(|| self.sites.iter().position(|s| proxying(s) && s.names.contains(&Name::Any)))
            .or_else(|| self.sites.iter().position(proxying));
        let root_pool = |s: &Site| {
            s.locations.iter().find_map(|l| match l.target {
                Target::Pool(i) if l.path == "/" => Some(i),
                _ => None,
            })
        };
        let default = catch_all
            .and_then(|c| root_pool(&self.sites[c]))
            .or_else(|| self.pools.iter().position(|p| p.block))
            .unwrap_or(0);
        // "default" names [upstream]; another pool nginx called so takes a free name.
        for i in 0..self.pools.len() {
            if i != default && self.pools[i].name == "default" {
                let name = self.pool_name("default");
                self.warnings.push(format!(
                    "line {}: upstream default — \"default\" is Shoal's name for [upstream]: converted as pool {name:?}",
                    self.pools[i].line
                ));
                self.pools[i].name = name;
            }
        }
        self.rate_limits();
        let routes = self.routes(catch_all);
        // Redirects to https on the same host.
        let has_tls = self.tls_listen.is_some();
        for (line, words) in std::mem::take(&mut self.https_switches) {
            let why = if has_tls {
                "— mapped to [tls] redirect_http = true (Shoal answers 308 to https, same host, path and query)"
            } else {
                "— Shoal redirects to https with [tls] redirect_http, which needs a TLS server: \
                 this file has no `listen ... ssl` (not mapped)"
            };
            self.warnings.push(format!("line {line}: {words} {why}"));
        }
        let redirect_http = has_tls && self.sites.iter().any(|s| s.https_switch.is_some());
        if redirect_http {
            self.tls.set("redirect_http", "true".into());
            for s in self.sites.iter().filter(|s| s.plain && s.https_switch.is_none() && !s.locations.is_empty()) {
                self.warnings.push(format!(
                    "line {}: server — listens on plain HTTP, but [tls] redirect_http sends every plain request to https",
                    s.line
                ));
            }
        }
        for (i, s) in self.sites.iter().enumerate() {
            if s.redirect.is_none() && !s.locations.is_empty() && !s.locations.iter().any(|l| l.path == "/") {
                let goes = if Some(i) == catch_all {
                    "the default pool".to_string()
                } else {
                    "the routes for any host (or the default pool)".to_string()
                };
                self.warnings.push(format!(
                    "line {}: server — no `location /`: its requests that no location matches go to {goes} (nginx answered 404)",
                    s.line
                ));
            }
            if let Some(l) = s.default_server
                && Some(i) != catch_all
                && proxying(s)
            {
                let c = catch_all.map_or(0, |c| self.sites[c].line);
                self.warnings.push(format!(
                    "line {l}: default_server — Shoal has one catch-all site (the server at line {c}); \
                     this one answers only for its server_name"
                ));
            }
        }
        if let Some((p, l)) = &self.access_log {
            for off in &self.access_log_off {
                self.warnings.push(format!(
                    "line {off}: access_log off — Shoal writes every request to its one access log ({p}, line {l})"
                ));
            }
        }
        let toml = self.render(default, &routes);
        // File order.
        let line_of = |w: &String| -> usize {
            w.strip_prefix("line ").and_then(|r| r.split(':').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
        };
        self.warnings.sort_by_key(line_of);
        Ok(Converted { toml, warnings: self.warnings })
    }

    /// Each pool's `limit_req` from the locations that proxy to it.
    fn rate_limits(&mut self) {
        let mut warnings = Vec::new();
        for pool in &mut self.pools {
            let Some(first) = pool.limits.iter().find_map(|(_, _, l)| l.clone()) else { continue };
            let Some(rate) = self.zones.get(&first.zone) else {
                warnings.push(format!(
                    "line {}: limit_req zone={} — no limit_req_zone defines this zone (ignored)",
                    first.line, first.zone
                ));
                continue;
            };
            pool.rate_limit.set("rate", q(rate));
            if let Some(b) = &first.burst {
                pool.rate_limit.set("burst", b.clone());
            }
            if first.nodelay {
                pool.rate_limit.set("nodelay", "true".into());
            }
            for (line, words, l) in &pool.limits {
                match l {
                    Some(l) if !l.same(&first) => warnings.push(format!(
                        "line {}: limit_req zone={} — pool {:?} already has the limit of line {}: Shoal applies one rate limit per pool (ignored)",
                        l.line, l.zone, pool.name, first.line
                    )),
                    Some(_) => {}
                    None => warnings.push(format!(
                        "line {line}: {words} — no limit_req here, but pool {:?} has the one of line {}: in Shoal it holds for every route to the pool",
                        pool.name, first.line
                    )),
                }
            }
        }
        self.warnings.extend(warnings);
    }

    /// Every site's routes, in file order; of two with the same host and path, the catch-all
    /// site's (else the first) is kept.
    fn routes(&mut self, catch_all: Option<usize>) -> Vec<Route> {
        let mut routes: Vec<Route> = Vec::new();
        // Suffixes (".example.com") of the other sites' wildcards: they would take the
        // catch-all site's names from it in Shoal (a wildcard beats "any host"), not in nginx.
        let wilds: Vec<String> = self
            .sites
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != catch_all)
            .flat_map(|(_, s)| s.names.iter())
            .filter_map(|n| match n {
                Name::Wild(w) => Some(w[1..].to_string()),
                _ => None,
            })
            .collect();
        let shadowed = |h: &str| {
            let h = h.strip_prefix('*').unwrap_or(h);
            wilds.iter().any(|w| h.ends_with(w.as_str()))
        };
        let mut warnings = Vec::new();
        for (si, s) in self.sites.iter().enumerate() {
            let is_catch = Some(si) == catch_all;
            let mut hosts: Vec<Option<String>> = Vec::new();
            for n in &s.names {
                let h = match n {
                    Name::Any if is_catch => continue,
                    Name::Any => None,
                    Name::Exact(h) | Name::Wild(h) if is_catch && !shadowed(h) => continue,
                    Name::Exact(h) | Name::Wild(h) => Some(h.clone()),
                };
                if !hosts.contains(&h) {
                    hosts.push(h);
                }
            }
            if is_catch {
                hosts.insert(0, None);
            }
            let locs: Vec<(String, Target, bool, usize)> = match &s.redirect {
                Some((o, line)) => vec![("/".into(), Target::Redirect(o.clone()), false, *line)],
                None => s.locations.iter().map(|l| (l.path.clone(), l.target.clone(), l.strip, l.line)).collect(),
            };
            if hosts.is_empty() {
                if !locs.is_empty() {
                    warnings.push(format!(
                        "line {}: server — none of its server_name values can be mapped: its locations are skipped",
                        s.line
                    ));
                }
                continue;
            }
            for h in &hosts {
                for (path, target, strip, line) in &locs {
                    let new = Route {
                        host: h.clone(),
                        path: path.clone(),
                        target: target.clone(),
                        strip: *strip,
                        line: *line,
                        catch_all: is_catch,
                    };
                    let Some(old) = routes.iter_mut().find(|r| r.host == new.host && r.path == new.path) else {
                        routes.push(new);
                        continue;
                    };
                    if old.target == new.target && old.strip == new.strip {
                        continue;
                    }
                    let what = format!("{}{}", new.host.as_deref().unwrap_or("(any host)"), new.path);
                    let (kept, dropped) =
                        if new.catch_all && !old.catch_all { (new.line, old.line) } else { (old.line, new.line) };
                    warnings.push(format!(
                        "line {dropped}: route {what} — also given at line {kept}: Shoal takes one route per host and path, kept line {kept}'s"
                    ));
                    if new.catch_all && !old.catch_all {
                        *old = new;
                    }
                }
            }
        }
        self.warnings.extend(warnings);
        routes
    }

    fn render(&self, default: usize, routes: &[Route]) -> String {
        let mut t = String::from(
            "# Converted from nginx by `shoal import-nginx`. Check it with `shoald check --config FILE`.\n",
        );
        let mut node = Keys::default();
        if let Some((l, _)) = &self.plain_listen {
            node.set("listen", q(l));
        }
        for (k, v) in &self.node.0 {
            node.set(k, v.clone());
        }
        if !node.is_empty() {
            t.push_str("\n[node]\n");
            node.write(&mut t);
        }
        if let Some((l, _)) = &self.tls_listen {
            writeln!(t, "\n[tls]\nlisten = {}", q(l)).unwrap_or(());
            t.push_str("certificates = [\n");
            for (c, k) in &self.certificates {
                writeln!(t, "  {{ cert = {}, key = {} }},", q(c), q(k)).unwrap_or(());
            }
            t.push_str("]\n");
            self.tls.write(&mut t);
        }
        let name = |i: usize| if i == default { "default".to_string() } else { self.pools[i].name.clone() };
        let order = std::iter::once(default).chain((0..self.pools.len()).filter(|&i| i != default));
        for i in order {
            let p = &self.pools[i];
            let (table, sub) = if i == default {
                ("upstream".to_string(), String::new())
            } else {
                (format!("upstreams.{}", p.name), format!("upstreams.{}.", p.name))
            };
            writeln!(t, "\n[{table}]").unwrap_or(());
            p.keys.write(&mut t);
            for b in &p.backends {
                writeln!(t, "\n[[{table}.backend]]").unwrap_or(());
                b.write(&mut t);
            }
            for (keys, what) in [(&p.health, "health"), (&p.sticky, "sticky"), (&p.rate_limit, "rate_limit")] {
                if !keys.is_empty() {
                    writeln!(t, "\n[{sub}{what}]").unwrap_or(());
                    keys.write(&mut t);
                }
            }
        }
        for r in routes {
            if r.host.is_none() && r.path == "/" && r.target == Target::Pool(default) && !r.strip {
                continue;
            }
            t.push_str("\n[[route]]\n");
            if let Some(h) = &r.host {
                writeln!(t, "host = {}", q(h)).unwrap_or(());
            }
            if r.path != "/" {
                writeln!(t, "path = {}", q(&r.path)).unwrap_or(());
            }
            match &r.target {
                Target::Pool(i) => writeln!(t, "upstream = {}", q(&name(*i))).unwrap_or(()),
                Target::Redirect(o) => writeln!(t, "redirect = {}", q(o)).unwrap_or(()),
            }
            if r.strip {
                t.push_str("strip_prefix = true\n");
            }
        }
        if let Some((p, _)) = &self.access_log {
            writeln!(t, "\n[access_log]\npath = {}", q(p)).unwrap_or(());
        }
        t
    }
}

pub fn convert(text: &str) -> Result<Converted, String> {
    let tokens = tokenize(text)?;
    let mut pos = 0;
    let tree = parse_block(&tokens, &mut pos, false)?;
    let mut c = Conv::default();
    c.collect(&tree);
    c.http(&tree, &Scope::default());
    c.finish()
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
        assert!(!c.toml.contains("[[route]]"), "{}", c.toml);
        assert!(c.warnings.iter().any(|w| w.contains("proxy_buffering")));
        assert!(c.warnings.iter().any(|w| w.contains("max_conns")));
    }

    #[test]
    fn a_second_upstream_is_a_second_pool() {
        let src = "upstream a {\n server 10.0.0.1;\n check interval=3000 rise=2 fall=3 timeout=1000 type=http;\n check_http_send \"GET /health HTTP/1.0\\r\\n\\r\\n\";\n check_http_expect_alive http_2xx http_3xx;\n}\nupstream b { server 10.0.0.2; sticky cookie srv_id expires=1h domain=.x.com path=/; }";
        let c = convert(src).unwrap();
        assert!(c.toml.contains("addr = \"10.0.0.1:80\""));
        assert!(c.toml.contains("[health]\ninterval = \"3000ms\""));
        assert!(c.toml.contains("path = \"/health\""));
        assert!(c.toml.contains("expect = [\"2xx\", \"3xx\"]"));
        assert!(c.toml.contains("[upstreams.b]\nalgorithm = \"cookie\""), "{}", c.toml);
        assert!(c.toml.contains("[upstreams.b.sticky]\ncookie = \"srv_id\"\nexpires = \"1h\""), "{}", c.toml);
        assert!(!c.warnings.iter().any(|w| w.contains("one backend pool")));
    }

    #[test]
    fn routes_hosts_and_paths() {
        let src = r#"
upstream web { server 10.0.0.1:80; }
upstream api { server 10.0.0.2:80; }
server {
  listen 80;
  server_name www.example.com;
  location / { proxy_pass http://web; }
  location /api/ { proxy_pass http://api/; }
  location = /ping { proxy_pass http://10.0.0.3:8080; }
}
server {
  listen 80;
  server_name .example.org;
  location / { proxy_pass http://api; }
}"#;
        let c = convert(src).unwrap();
        let t: toml::Table = toml::from_str(&c.toml).unwrap();
        let routes = t["route"].as_array().unwrap();
        let r = |i: usize, k: &str| routes[i].get(k).map(|v| v.to_string());
        assert_eq!(routes.len(), 4, "{}", c.toml);
        assert_eq!(
            (r(0, "host"), r(0, "path"), r(0, "upstream")),
            (None, Some("\"/api/\"".into()), Some("\"api\"".into()))
        );
        assert_eq!(r(0, "strip_prefix"), Some("true".into()));
        assert_eq!(r(1, "path"), Some("\"=/ping\"".into()));
        assert_eq!(r(1, "upstream"), Some("\"addr-10-0-0-3-8080\"".into()));
        assert_eq!((r(2, "host"), r(2, "upstream")), (Some("\"example.org\"".into()), Some("\"api\"".into())));
        assert_eq!(r(3, "host"), Some("\"*.example.org\"".into()));
        assert_eq!(t["upstreams"]["addr-10-0-0-3-8080"]["backend"][0]["addr"].as_str(), Some("10.0.0.3:8080"));
    }

    #[test]
    fn quoting_and_names() {
        let src = "upstream \"my app\" { server 10.0.0.1; }\nupstream default { server 10.0.0.2; }\nserver { access_log \"/var/log/a \\\"b\\\".log\"; location / { proxy_pass http://default; } }";
        let c = convert(src).unwrap();
        let t: toml::Table = toml::from_str(&c.toml).unwrap_or_else(|e| panic!("{e}\n{}", c.toml));
        // nginx's "default" is the default pool; "my app" is sanitized.
        assert_eq!(t["upstream"]["backend"][0]["addr"].as_str(), Some("10.0.0.2:80"));
        assert_eq!(t["upstreams"]["my-app"]["backend"][0]["addr"].as_str(), Some("10.0.0.1:80"));
        assert_eq!(t["access_log"]["path"].as_str(), Some("/var/log/a \\\"b\\\".log"));
        assert!(c.warnings.iter().any(|w| w.contains("converted as pool \"my-app\"")), "{:?}", c.warnings);
    }

    #[test]
    fn errors() {
        assert!(convert("server { listen 80; }").unwrap_err().contains("no `upstream"));
        assert!(convert("upstream a { server 10.0.0.1 }").unwrap_err().contains("missing its ';'"));
        assert!(convert("upstream a { server 10.0.0.1;").unwrap_err().contains("not closed"));
        assert!(convert("{ }").unwrap_err().contains("without a directive name"));
    }
}
