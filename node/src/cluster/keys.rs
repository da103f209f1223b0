//! Gossip key names and their typed values. Nothing else in the code formats a key by hand.
//!
//! | key | value | written |
//! |---|---|---|
//! | `state` | `alive` / `draining` / `left` | on change |
//! | `addr.proxy`, `addr.control`, `addr.admin` | `IP:PORT` | at start |
//! | `rps` | requests per second (1 decimal) | each publish tick, when changed |
//! | `load:<backend>` | this node's in-flight requests to the backend | each tick, when changed |
//! | `down:<backend>` | `1` while this node's own verdict is down (absent = up) | on change |
//! | `reg:<backend>` | registry entry (see [`RegEntry`]) | when the merged registry changes |
//! | `cert:<name>` | cluster certificate entry (see [`CertEntry`]), sealed | when it changes |

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;

use super::registry::{CertEntry, CertOp, RegEntry, RegOp};

pub const STATE: &str = "state";
pub const ADDR_PROXY: &str = "addr.proxy";
pub const ADDR_CONTROL: &str = "addr.control";
pub const ADDR_ADMIN: &str = "addr.admin";
pub const RPS: &str = "rps";
pub const LOAD_PREFIX: &str = "load:";
pub const DOWN_PREFIX: &str = "down:";
pub const REG_PREFIX: &str = "reg:";
pub const CERT_PREFIX: &str = "cert:";

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

pub fn load_key(backend: SocketAddr) -> String {
    format!("{LOAD_PREFIX}{backend}")
}

pub fn down_key(backend: SocketAddr) -> String {
    format!("{DOWN_PREFIX}{backend}")
}

pub fn reg_key(backend: SocketAddr) -> String {
    format!("{REG_PREFIX}{backend}")
}

/// Parses the backend address out of a key with `prefix` (`load:10.0.0.1:80` -> 10.0.0.1:80).
pub fn backend_of(key: &str, prefix: &str) -> Option<SocketAddr> {
    key.strip_prefix(prefix)?.parse().ok()
}

pub fn parse_load(value: &str) -> Option<u32> {
    value.parse().ok()
}

/// `hlc|op|weight|max_conns|backup|origin`, e.g. `1732470000000123|add|3|0|0|lb-1`.
pub fn format_reg(e: &RegEntry) -> String {
    format!("{}|{}|{}|{}|{}|{}", e.hlc, e.op.name(), e.weight, e.max_conns, u8::from(e.backup), e.origin)
}

pub fn parse_reg(addr: SocketAddr, value: &str) -> Option<RegEntry> {
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
    Some(RegEntry { addr, hlc, op, weight, max_conns, backup, origin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_round_trip_and_garbage() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let e =
            RegEntry { addr, hlc: 42, op: RegOp::Drain, weight: 3, max_conns: 7, backup: true, origin: "lb|1".into() };
        assert_eq!(parse_reg(addr, &format_reg(&e)), Some(e));
        for bad in ["", "x|add|1|0|0|a", "1|explode|1|0|0|a", "1|add|0|0|0|a", "1|add|1|0|0"] {
            assert_eq!(parse_reg(addr, bad), None, "{bad:?}");
        }
        assert_eq!(backend_of("load:10.0.0.1:80", LOAD_PREFIX), Some(addr));
        assert_eq!(backend_of("load:nonsense", LOAD_PREFIX), None);
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
