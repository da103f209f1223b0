//! Route lookup cost: a 1,000-route table (500 exact hosts, 300 `*.suffix` wildcards, 100
//! path prefixes under one host and 100 under any host; no catch-all) and a 1-route table,
//! each timed over N lookups of a mix of requests: hits at every host level, a fall-through
//! from a host to the any-host routes, misses, and a few paths that need normalizing. Prints
//! ns per lookup for each table, then for the 1,000-route table per kind of request.
//!
//!     cargo run --release -p shoal-node --example route_match -- [--lookups N=2000000]

use std::hint::black_box;
use std::time::Instant;

use shoal_node::route::{HostPattern, PathPattern, RouteAction, RouteSpec, RouteTable};

fn spec(host: &str, path: &str) -> RouteSpec {
    RouteSpec {
        host: HostPattern::parse(Some(host)).expect("host"),
        path: PathPattern::parse(Some(path)).expect("path"),
        action: RouteAction::Pool { upstream: "p".into(), strip_prefix: false },
    }
}

/// The 1,000 routes.
fn routes() -> Vec<(RouteSpec, u32)> {
    let mut specs = Vec::new();
    for i in 0..500 {
        specs.push(spec(&format!("site{i}.example.net"), "/"));
    }
    for i in 0..300 {
        specs.push(spec(&format!("*.tenant{i}.example.org"), "/"));
    }
    // Under one host: version roots, services under them, and a few exact paths.
    specs.push(spec("api.example.com", "/v3/"));
    specs.push(spec("api.example.com", "/v1/"));
    specs.push(spec("api.example.com", "/v2/"));
    specs.push(spec("api.example.com", "=/health"));
    for i in 0..96 {
        specs.push(spec("api.example.com", &format!("/v{}/svc{i}/", 1 + i % 2)));
    }
    // Any host.
    specs.push(spec("*", "/static/"));
    specs.push(spec("*", "/assets/"));
    specs.push(spec("*", "=/favicon.ico"));
    for i in 0..97 {
        specs.push(spec("*", &format!("/static/app{i}/")));
    }
    assert_eq!(specs.len(), 1000);
    specs.into_iter().enumerate().map(|(i, s)| (s, i as u32)).collect()
}

/// Requests by kind: (kind, host, target).
fn requests() -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    for i in 0..64usize {
        let k = i * 7;
        out.push(("exact host", format!("site{}.example.net", k % 500), format!("/products/{k}?ref=home")));
        out.push(("exact host", format!("Site{}.Example.NET:8080", (k * 3) % 500), "/".into()));
        out.push(("wildcard", format!("app.tenant{}.example.org", k % 300), "/dashboard".into()));
        out.push(("wildcard", format!("a.b.tenant{}.example.org:443", (k * 5) % 300), "/x/y".into()));
        out.push(("host+prefix", "api.example.com".into(), format!("/v{}/svc{}/users/{k}?page=2", 1 + k % 2, k % 96)));
        out.push(("host+prefix", "api.example.com".into(), "/health".into()));
        out.push(("any host", "www.unknown.test".into(), format!("/static/app{}/main.{k}.js", k % 97)));
        out.push(("any host", "203.0.113.9".into(), "/favicon.ico".into()));
        out.push(("miss host", format!("nobody{k}.example"), "/index.html".into()));
        out.push(("miss host", format!("deep.sub{k}.nowhere.example.com"), "/a/b/c".into()));
        out.push(("miss path", "api.example.com".into(), format!("/v9/svc{k}")));
        out.push(("fall through", "api.example.com".into(), format!("/static/app{}/x.css", k % 97)));
        if i % 4 == 0 {
            out.push(("normalize", "api.example.com".into(), format!("/v1//svc{}/./x/%41?q", k % 96)));
        }
    }
    // Interleave the kinds.
    let n = out.len();
    (0..n).map(|i| out[(i * 37) % n].clone()).collect()
}

/// One timing: wall ns per lookup, CPU ns per lookup (this thread's run time from
/// /proc/thread-self/schedstat, so time spent descheduled on a busy machine is left out; the
/// wall figure when that file is missing), and the hit rate.
struct Timing {
    ns: f64,
    cpu_ns: f64,
    hit_rate: f64,
}

/// This thread's CPU time so far, in ns (Linux).
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

fn time(table: &RouteTable<u32>, reqs: &[(&[u8], &str)], lookups: usize) -> Timing {
    let mut hits = 0usize;
    let mut next = 0;
    let cpu_start = cpu_ns();
    let started = Instant::now();
    for _ in 0..lookups {
        let (host, target) = reqs[next];
        next = if next + 1 == reqs.len() { 0 } else { next + 1 };
        if black_box(table.find(black_box(host), black_box(target))).is_some() {
            hits += 1;
        }
    }
    let wall = started.elapsed().as_nanos() as f64;
    let cpu = match (cpu_start, cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64,
        _ => wall,
    };
    let n = lookups as f64;
    Timing { ns: wall / n, cpu_ns: cpu / n, hit_rate: hits as f64 / n }
}

fn main() {
    let mut lookups = 2_000_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--lookups" => lookups = args.next().and_then(|n| n.parse().ok()).expect("--lookups N"),
            _ => panic!("usage: route_match [--lookups N]"),
        }
    }
    let big = RouteTable::new(routes());
    let one = RouteTable::new(vec![(spec("api.example.com", "/v1/"), 0)]);
    let reqs = requests();
    let all: Vec<(&[u8], &str)> = reqs.iter().map(|(_, h, t)| (h.as_bytes(), t.as_str())).collect();
    // Warm up, then time.
    time(&big, &all, lookups / 10);
    for (name, table) in [("1000", &big), ("1", &one)] {
        let t = time(table, &all, lookups);
        println!(
            "routes={name} lookups={lookups} ns_per_lookup={:.1} cpu_ns_per_lookup={:.1} hit_rate={:.2}",
            t.ns, t.cpu_ns, t.hit_rate
        );
    }
    let mut kinds: Vec<&str> = reqs.iter().map(|r| r.0).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let some: Vec<(&[u8], &str)> =
            reqs.iter().filter(|r| r.0 == kind).map(|(_, h, t)| (h.as_bytes(), t.as_str())).collect();
        let t = time(&big, &some, lookups / 4);
        println!(
            "  routes=1000 kind={kind:?} lookups={} ns_per_lookup={:.1} cpu_ns_per_lookup={:.1} hit_rate={:.2}",
            lookups / 4,
            t.ns,
            t.cpu_ns,
            t.hit_rate
        );
    }
}
