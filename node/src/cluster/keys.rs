//! Gossip key names and their typed values. Nothing else in the code formats a key by hand.
//!
//! | key | value | written |
//! |---|---|---|
//! | `state` | `alive` / `draining` / `left` | on change |
//! | `addr.proxy`, `addr.control`, `addr.admin` | `IP:PORT` | at start |
//! | `rps` | requests per second (1 decimal) | each publish tick, when changed |
//! | `load:<backend>` | this node's in-flight requests to the backend | each tick, when changed |
//! | `lat:<backend>` | this node's response-time estimate, microseconds, on a ~19% scale | once a second, when its step changes |
//! | `down:<backend>` | `1` while this node's own verdict is down (absent = up) | on change |
//! | `claim:<backend>` | `slots|wants (0/1)`: this node's claim on `max_conns` (limited backends only) | each tick, when changed |
//! | `reg:<backend>` | registry entry (see [`RegEntry`]) | when the merged registry changes |
//! | `cert:<name>` | cluster certificate entry (see [`CertEntry`]), sealed | when it changes |
//! | `route:<host><path>` | route entry (see [`RouteEntry`]) | when it changes |
//!
//! `<backend>` is `IP:PORT` for the default pool and `POOL/IP:PORT` for the others (pool names
//! have no `/`), so a backend in two pools has two sets of keys.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;

use super::registry::{CertEntry, CertOp, RegEntry, RegOp, RouteEntry};
use crate::config::DEFAULT_POOL;
use crate::pool::claim::Claim;

pub const STATE: &str = "state";
pub const ADDR_PROXY: &str = "addr.proxy";
pub const ADDR_CONTROL: &str = "addr.control";
pub const ADDR_ADMIN: &str = "addr.admin";
pub const RPS: &str = "rps";
pub const LOAD_PREFIX: &str = "load:";
pub const LAT_PREFIX: &str = "lat:";
pub const DOWN_PREFIX: &str = "down:";
pub const CLAIM_PREFIX: &str = "claim:";
/// The keys this node writes per backend of its pools (removed when the backend leaves).
pub const PER_BACKEND_PREFIXES: [&str; 4] = [LOAD_PREFIX, LAT_PREFIX, DOWN_PREFIX, CLAIM_PREFIX];
pub const REG_PREFIX: &str = "reg:";
pub const CERT_PREFIX: &str = "cert:";
pub const ROUTE_PREFIX: &str = "route:";

/// `route:<host><path>`: the host text has no `/` or `=`, the path text starts with one.
pub fn route_key(host: &str, path: &str) -> String {
    format!("{ROUTE_PREFIX}{host}{path}")
}

/// `hlc|op|upstream|strip (0/1)|redirect|origin`.
pub fn format_route(e: &RouteEntry) -> String {
    format!("{}|{}|{}|{}|{}|{}", e.hlc, e.op.name(), e.upstream, u8::from(e.strip_prefix), e.redirect, e.origin)
}

pub fn parse_route(key: &str, value: &str) -> Option<RouteEntry> {
    let rest = key.strip_prefix(ROUTE_PREFIX)?;
    let at = rest.find(['/', '='])?;
    let (host, path) = rest.split_at(at);
    let mut it = value.splitn(6, '|');
    let hlc = it.next()?.parse().ok()?;
    let op = CertOp::parse(it.next()?)?;
    let upstream = it.next()?.to_string();
    let strip_prefix = it.next()? == "1";
    let redirect = it.next()?.to_string();
    let origin = it.next()?.to_string();
    Some(RouteEntry { host: host.into(), path: path.into(), hlc, op, upstream, strip_prefix, redirect, origin })
}

/// The largest sealed certificate entry published: the CLI's limit plus the seal's overhead.
pub const MAX_SEALED_CERT: usize = shoal_proto::MAX_CERT_BYTES + 64;

pub fn cert_key(name: &str) -> String {
    format!("{CERT_PREFIX}{name}")
}

/// `hlc|op|sealed (base64)|origin`.
pub fn format_cert(e: &CertEntry) -> String {
    format!("{}|{}|{}|{}", e.hlc, e.op.name(), BASE64.encode(&e.sealed), e.origin)
}

pub fn parse_cert(key: &str, value: &str) -> Option<CertEntry> {
    let name = key.strip_prefix(CERT_PREFIX)?.to_string();
    let mut it = value.splitn(4, '|');
    let hlc = it.next()?.parse().ok()?;
    let op = CertOp::parse(it.next()?)?;
    let sealed = BASE64.decode(it.next()?).ok()?;
    let origin = it.next()?.to_string();
    Some(CertEntry { name, hlc, op, origin, sealed })
}

/// A backend of a pool, as gossip keys name it.
pub type BackendKey = (String, SocketAddr);

fn backend_text(prefix: &str, pool: &str, backend: SocketAddr) -> String {
    if pool == DEFAULT_POOL { format!("{prefix}{backend}") } else { format!("{prefix}{pool}/{backend}") }
}

pub fn load_key(pool: &str, backend: SocketAddr) -> String {
    backend_text(LOAD_PREFIX, pool, backend)
}

pub fn lat_key(pool: &str, backend: SocketAddr) -> String {
    backend_text(LAT_PREFIX, pool, backend)
}

pub fn down_key(pool: &str, backend: SocketAddr) -> String {
    backend_text(DOWN_PREFIX, pool, backend)
}

pub fn claim_key(pool: &str, backend: SocketAddr) -> String {
    backend_text(CLAIM_PREFIX, pool, backend)
}

/// `slots|wants`, e.g. `5|1`.
pub fn format_claim(c: Claim) -> String {
    format!("{}|{}", c.slots, u8::from(c.wants))
}

pub fn parse_claim(value: &str) -> Option<Claim> {
    let (slots, wants) = value.split_once('|')?;
    let wants = match wants {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    Some(Claim { slots: slots.parse().ok()?, wants })
}

pub fn reg_key(pool: &str, backend: SocketAddr) -> String {
    backend_text(REG_PREFIX, pool, backend)
}

/// Parses the pool and backend address out of a key with `prefix` (`load:10.0.0.1:80` ->
/// (default, 10.0.0.1:80); `load:api/10.0.0.1:80` -> (api, 10.0.0.1:80)).
pub fn backend_of(key: &str, prefix: &str) -> Option<BackendKey> {
    let rest = key.strip_prefix(prefix)?;
    match rest.split_once('/') {
        Some((pool, addr)) if !pool.is_empty() => Some((pool.to_string(), addr.parse().ok()?)),
        Some(_) => None,
        None => Some((DEFAULT_POOL.to_string(), rest.parse().ok()?)),
    }
}

pub fn parse_load(value: &str) -> Option<u32> {
    value.parse().ok()
}

/// A response-time estimate in microseconds (non-zero).
pub fn parse_lat(value: &str) -> Option<u64> {
    value.parse().ok().filter(|&us| us > 0)
}

/// `hlc|op|weight|max_conns|backup|origin`, e.g. `1732470000000123|add|3|0|0|lb-1`.
pub fn format_reg(e: &RegEntry) -> String {
    format!("{}|{}|{}|{}|{}|{}", e.hlc, e.op.name(), e.weight, e.max_conns, u8::from(e.backup), e.origin)
}

pub fn parse_reg((pool, addr): BackendKey, value: &str) -> Option<RegEntry> {
    let mut it = value.splitn(6, '|');
    let hlc = it.next()?.parse().ok()?;
    let op = RegOp::parse(it.next()?)?;
    let weight: u32 = it.next()?.parse().ok()?;
    let max_conns = it.next()?.parse().ok()?;
    let backup = it.next()? == "1";
    let origin = it.next()?.to_string();
    if !(1..=1000).contains(&weight) {
        return None;
    }
    Some(RegEntry { pool, addr, hlc, op, weight, max_conns, backup, origin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_round_trip_and_garbage() {
        let c = Claim { slots: 7, wants: true };
        assert_eq!(parse_claim(&format_claim(c)), Some(c));
        assert_eq!(parse_claim("0|0"), Some(Claim { slots: 0, wants: false }));
        for bad in ["", "7", "7|", "|1", "7|2", "-1|0", "x|1", "7|1|0"] {
            assert_eq!(parse_claim(bad), None, "{bad}");
        }
    }

    #[test]
    fn reg_round_trip_and_garbage() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let e = RegEntry {
            pool: "api".into(),
            addr,
            hlc: 42,
            op: RegOp::Drain,
            weight: 3,
            max_conns: 7,
            backup: true,
            origin: "lb|1".into(),
        };
        let key = ("api".to_string(), addr);
        assert_eq!(parse_reg(key.clone(), &format_reg(&e)), Some(e));
        for bad in ["", "x|add|1|0|0|a", "1|explode|1|0|0|a", "1|add|0|0|0|a", "1|add|1|0|0"] {
            assert_eq!(parse_reg(key.clone(), bad), None, "{bad:?}");
        }
        assert_eq!(backend_of("load:10.0.0.1:80", LOAD_PREFIX), Some(("default".into(), addr)));
        assert_eq!(backend_of(&load_key("api", addr), LOAD_PREFIX), Some(key));
        assert_eq!(load_key("default", addr), "load:10.0.0.1:80");
        assert_eq!(backend_of("load:nonsense", LOAD_PREFIX), None);
        assert_eq!(backend_of("load:/10.0.0.1:80", LOAD_PREFIX), None);
    }

    #[test]
    fn route_round_trip_and_garbage() {
        let e = RouteEntry {
            host: "*.example.com".into(),
            path: "=/v1/x".into(),
            hlc: 9,
            op: CertOp::Add,
            upstream: "api".into(),
            strip_prefix: true,
            redirect: String::new(),
            origin: "lb-1".into(),
        };
        assert_eq!(parse_route(&route_key(&e.host, &e.path), &format_route(&e)), Some(e.clone()));
        let any = RouteEntry { host: String::new(), path: "/static/".into(), ..e };
        assert_eq!(parse_route(&route_key("", "/static/"), &format_route(&any)), Some(any));
        for bad in ["", "9|add|api|1|", "x|add|api|1||lb", "9|maybe|api|1||lb"] {
            assert_eq!(parse_route("route:/a/", bad), None, "{bad:?}");
        }
        assert_eq!(parse_route("route:nopath", "9|add|api|1||lb"), None);
    }

    #[test]
    fn cert_round_trip_and_garbage() {
        let e = CertEntry {
            name: "www.example".into(),
            hlc: 7,
            op: CertOp::Add,
            origin: "lb|2".into(),
            sealed: vec![0, 255, 9],
        };
        assert_eq!(parse_cert(&cert_key("www.example"), &format_cert(&e)), Some(e));
        for bad in ["", "7|add|AP8J", "x|add|AP8J|a", "7|keep|AP8J|a", "7|add|not base64!|a"] {
            assert_eq!(parse_cert("cert:www.example", bad), None, "{bad:?}");
        }
        assert_eq!(parse_cert("reg:www.example", "7|add|AP8J|a"), None);
    }
}
