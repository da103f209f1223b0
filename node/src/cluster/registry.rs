//! The registry: backends added, removed or drained at run time (`shoal backend ...`, per
//! pool), routes added or removed (`shoal route ...`), both on top of the config file's, and
//! the cluster's certificates (`shoal cert ...`, sealed with the
//! cluster secret). Entries merge by last writer wins on a hybrid logical clock
//! (ties broken by origin node id); a removal is a tombstone entry, so it cannot be undone by a
//! stale add. Every node re-publishes the merged registry, so a change survives the node that
//! made it, and persists it in `data_dir`, so it survives a full-cluster restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::BackendSpec;
use crate::route::{HostPattern, PathPattern, RouteAction, RouteSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegOp {
    Add,
    Remove,
    Drain,
}

impl RegOp {
    pub fn name(self) -> &'static str {
        match self {
            RegOp::Add => "add",
            RegOp::Remove => "remove",
            RegOp::Drain => "drain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "add" => RegOp::Add,
            "remove" => RegOp::Remove,
            "drain" => RegOp::Drain,
            _ => return None,
        })
    }
}

/// One registry change for one backend address of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegEntry {
    /// The pool (`default` for `[upstream]`).
    pub pool: String,
    pub addr: SocketAddr,
    /// Hybrid logical clock: wall-clock milliseconds << 16 | logical counter.
    pub hlc: u64,
    pub op: RegOp,
    pub weight: u32,
    pub max_conns: u32,
    pub backup: bool,
    /// The node that made the change.
    pub origin: String,
}

/// A cluster certificate change: `Add` carries the chain and key sealed with the cluster
/// secret (`shoal_proto::seal_cert`); `Remove` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertEntry {
    /// The certificate's short name (`certs::CertInfo::name`): what `shoal cert remove` takes.
    pub name: String,
    pub hlc: u64,
    pub op: CertOp,
    pub origin: String,
    pub sealed: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertOp {
    Add,
    Remove,
}

impl CertOp {
    pub fn name(self) -> &'static str {
        match self {
            CertOp::Add => "add",
            CertOp::Remove => "remove",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "add" => Some(CertOp::Add),
            "remove" => Some(CertOp::Remove),
            _ => None,
        }
    }
}

/// A route added or removed at run time (`shoal route add|remove`), by its host and path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// The host pattern's text (`HostPattern::text`: empty for any host).
    pub host: String,
    /// The path pattern's text (`PathPattern::text`).
    pub path: String,
    pub hlc: u64,
    /// `Add` sets the route (replacing one with the same host and path), `Remove` deletes it.
    pub op: CertOp,
    /// The pool, for a route to a pool (else empty).
    pub upstream: String,
    pub strip_prefix: bool,
    /// The origin, for a redirect (else empty).
    pub redirect: String,
    pub origin: String,
}

impl RouteEntry {
    /// The route this entry sets, or why it cannot be one (an entry from a newer or broken peer).
    pub fn spec(&self) -> Result<RouteSpec, String> {
        let host = HostPattern::parse(Some(&self.host))?;
        let path = PathPattern::parse(Some(&self.path))?;
        let action = match (self.upstream.is_empty(), self.redirect.is_empty()) {
            (false, true) => RouteAction::Pool { upstream: self.upstream.clone(), strip_prefix: self.strip_prefix },
            (true, false) => RouteAction::Redirect { origin: crate::route::parse_origin(&self.redirect)? },
            _ => return Err("a route entry needs a pool or a redirect".into()),
        };
        Ok(RouteSpec { host, path, action })
    }
}

impl Stamped for RouteEntry {
    type Key = (String, String);
    fn key(&self) -> (String, String) {
        (self.host.clone(), self.path.clone())
    }
    fn stamp(&self) -> (u64, &str) {
        (self.hlc, &self.origin)
    }
}

/// An entry merged last-writer-wins by key.
trait Stamped {
    type Key: Ord + Clone;
    fn key(&self) -> Self::Key;
    fn stamp(&self) -> (u64, &str);
}

impl Stamped for RegEntry {
    type Key = (String, SocketAddr);
    fn key(&self) -> (String, SocketAddr) {
        (self.pool.clone(), self.addr)
    }
    fn stamp(&self) -> (u64, &str) {
        (self.hlc, &self.origin)
    }
}

impl Stamped for CertEntry {
    type Key = String;
    fn key(&self) -> String {
        self.name.clone()
    }
    fn stamp(&self) -> (u64, &str) {
        (self.hlc, &self.origin)
    }
}

/// Merges `incoming` into `map` (newer stamp wins); the clock moves past every stamp seen.
fn merge_into<E: Stamped>(map: &mut BTreeMap<E::Key, E>, clock: &Hlc, incoming: impl IntoIterator<Item = E>) -> bool {
    let mut changed = false;
    for e in incoming {
        clock.observe(e.stamp().0);
        match map.get(&e.key()) {
            Some(cur) if e.stamp() <= cur.stamp() => {}
            _ => {
                map.insert(e.key(), e);
                changed = true;
            }
        }
    }
    changed
}

/// A hybrid logical clock: never goes backwards, and moves past every clock it has seen.
#[derive(Debug, Default)]
pub struct Hlc(AtomicU64);

impl Hlc {
    pub fn now(&self) -> u64 {
        let wall = (SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)) << 16;
        let mut cur = self.0.load(SeqCst);
        loop {
            let next = wall.max(cur + 1);
            match self.0.compare_exchange(cur, next, SeqCst, SeqCst) {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn observe(&self, seen: u64) {
        self.0.fetch_max(seen, SeqCst);
    }
}

/// The merged registry of this node.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<(String, SocketAddr), RegEntry>>,
    certs: Mutex<BTreeMap<String, CertEntry>>,
    routes: Mutex<BTreeMap<(String, String), RouteEntry>>,
    pub clock: Hlc,
}

impl Registry {
    pub fn from_entries(entries: Vec<RegEntry>, certs: Vec<CertEntry>, routes: Vec<RouteEntry>) -> Self {
        let r = Registry::default();
        r.merge(entries);
        r.merge_certs(certs);
        r.merge_routes(routes);
        r
    }

    pub fn routes(&self) -> Vec<RouteEntry> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Merges route entries seen elsewhere. Returns true if anything changed.
    pub fn merge_routes(&self, incoming: impl IntoIterator<Item = RouteEntry>) -> bool {
        merge_into(&mut self.routes.lock().unwrap_or_else(|e| e.into_inner()), &self.clock, incoming)
    }

    /// Records a local route change with a fresh clock value: `Some(spec)` sets the route,
    /// `None` removes the route with this host and path.
    pub fn record_route(
        &self,
        host: &HostPattern,
        path: &PathPattern,
        set: Option<&RouteSpec>,
        origin: &str,
    ) -> RouteEntry {
        let (upstream, strip_prefix, redirect) = match set.map(|s| &s.action) {
            Some(RouteAction::Pool { upstream, strip_prefix }) => (upstream.clone(), *strip_prefix, String::new()),
            Some(RouteAction::Redirect { origin }) => (String::new(), false, origin.clone()),
            None => (String::new(), false, String::new()),
        };
        let e = RouteEntry {
            host: host.text(),
            path: path.text(),
            hlc: self.clock.now(),
            op: if set.is_some() { CertOp::Add } else { CertOp::Remove },
            upstream,
            strip_prefix,
            redirect,
            origin: origin.to_string(),
        };
        self.merge_routes([e.clone()]);
        e
    }

    /// The routes: the config's, overridden by registry entries (an add replaces or adds the
    /// route with its host and path, a remove deletes it). An entry that is not a valid route
    /// is skipped and logged.
    pub fn effective_routes(&self, config: &[RouteSpec]) -> Vec<RouteSpec> {
        let entries = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut routes: Vec<RouteSpec> = config.to_vec();
        for e in entries.values() {
            let pos = routes.iter().position(|r| r.host.text() == e.host && r.path.text() == e.path);
            match (e.op, e.spec()) {
                (CertOp::Remove, _) => {
                    if let Some(i) = pos {
                        routes.remove(i);
                    }
                }
                (CertOp::Add, Ok(spec)) => match pos {
                    Some(i) => routes[i] = spec,
                    None => routes.push(spec),
                },
                (CertOp::Add, Err(why)) => {
                    tracing::warn!(host = %e.host, path = %e.path, error = %why, "route entry skipped")
                }
            }
        }
        routes
    }

    /// Pools that registry entries give a backend (they exist even when no config defines
    /// them); a pool whose entries all remove backends is not one.
    pub fn pools(&self) -> Vec<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> =
            entries.values().filter(|e| e.op != RegOp::Remove).map(|e| e.pool.clone()).collect();
        names.dedup();
        names
    }

    pub fn entries(&self) -> Vec<RegEntry> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Merges entries seen elsewhere. Returns true if anything changed.
    pub fn merge(&self, incoming: impl IntoIterator<Item = RegEntry>) -> bool {
        merge_into(&mut self.entries.lock().unwrap_or_else(|e| e.into_inner()), &self.clock, incoming)
    }

    pub fn certs(&self) -> Vec<CertEntry> {
        self.certs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Merges certificate entries seen elsewhere. Returns true if anything changed.
    pub fn merge_certs(&self, incoming: impl IntoIterator<Item = CertEntry>) -> bool {
        merge_into(&mut self.certs.lock().unwrap_or_else(|e| e.into_inner()), &self.clock, incoming)
    }

    /// Records a local certificate change with a fresh clock value.
    pub fn record_cert(&self, name: &str, op: CertOp, sealed: Vec<u8>, origin: &str) -> CertEntry {
        let e = CertEntry { name: name.to_string(), hlc: self.clock.now(), op, origin: origin.to_string(), sealed };
        self.merge_certs([e.clone()]);
        e
    }

    /// Records a local change with a fresh clock value.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        pool: &str,
        addr: SocketAddr,
        op: RegOp,
        weight: u32,
        max_conns: u32,
        backup: bool,
        origin: &str,
    ) -> RegEntry {
        let e = RegEntry {
            pool: pool.to_string(),
            addr,
            hlc: self.clock.now(),
            op,
            weight,
            max_conns,
            backup,
            origin: origin.to_string(),
        };
        self.merge([e.clone()]);
        e
    }

    pub fn get(&self, pool: &str, addr: SocketAddr) -> Option<RegEntry> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(&(pool.to_string(), addr)).cloned()
    }

    /// The backend set of `pool`: config backends, overridden by registry entries (add replaces the
    /// spec, remove deletes, drain keeps it but takes no new requests). Returns
    /// (specs, draining addresses).
    pub fn effective(&self, pool: &str, config: &[BackendSpec]) -> (Vec<BackendSpec>, Vec<SocketAddr>) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut specs: Vec<BackendSpec> = config.to_vec();
        let mut draining = Vec::new();
        for e in entries.values().filter(|e| e.pool == pool) {
            let pos = specs.iter().position(|s| s.addr == e.addr);
            match e.op {
                RegOp::Remove => {
                    if let Some(i) = pos {
                        specs.remove(i);
                    }
                }
                RegOp::Add | RegOp::Drain => {
                    let mut spec = pos.map(|i| specs[i].clone()).unwrap_or_else(|| BackendSpec::new(e.addr));
                    if e.op == RegOp::Add || pos.is_none() {
                        spec.weight = e.weight;
                        spec.max_conns = e.max_conns;
                        spec.backup = e.backup;
                    }
                    match pos {
                        Some(i) => specs[i] = spec,
                        None => specs.push(spec),
                    }
                    if e.op == RegOp::Drain {
                        draining.push(e.addr);
                    }
                }
            }
        }
        (specs, draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: &str, hlc: u64, op: RegOp, origin: &str) -> RegEntry {
        RegEntry {
            pool: "default".into(),
            addr: addr.parse().unwrap(),
            hlc,
            op,
            weight: 1,
            max_conns: 0,
            backup: false,
            origin: origin.into(),
        }
    }

    #[test]
    fn last_writer_wins_and_tombstones_hold() {
        let r = Registry::default();
        assert!(r.merge([entry("10.0.0.1:80", 10, RegOp::Add, "a")]));
        assert!(r.merge([entry("10.0.0.1:80", 20, RegOp::Remove, "b")]));
        // a stale add (delivered late) does not resurrect it
        assert!(!r.merge([entry("10.0.0.1:80", 15, RegOp::Add, "c")]));
        assert_eq!(r.get("default", "10.0.0.1:80".parse().unwrap()).unwrap().op, RegOp::Remove);
        // same clock: origin breaks the tie the same way on every node
        let r2 = Registry::default();
        r2.merge([entry("10.0.0.2:80", 5, RegOp::Drain, "b"), entry("10.0.0.2:80", 5, RegOp::Add, "a")]);
        let r3 = Registry::default();
        r3.merge([entry("10.0.0.2:80", 5, RegOp::Add, "a"), entry("10.0.0.2:80", 5, RegOp::Drain, "b")]);
        assert_eq!(r2.entries(), r3.entries());
        // local writes move past everything seen
        assert!(r.record("default", "10.0.0.3:80".parse().unwrap(), RegOp::Add, 1, 0, false, "me").hlc > 20);
    }

    #[test]
    fn certificates_merge_by_name_last_writer_wins() {
        let cert = |hlc, op, origin: &str| CertEntry {
            name: "www.example".into(),
            hlc,
            op,
            origin: origin.into(),
            sealed: vec![hlc as u8],
        };
        let r = Registry::default();
        assert!(r.merge_certs([cert(10, CertOp::Add, "a")]));
        assert!(r.merge_certs([cert(20, CertOp::Remove, "b")]));
        assert!(!r.merge_certs([cert(15, CertOp::Add, "c")]));
        assert!(!r.merge_certs([cert(20, CertOp::Remove, "b")]));
        assert_eq!(r.certs(), vec![cert(20, CertOp::Remove, "b")]);
        assert!(r.record_cert("www.example", CertOp::Add, vec![1], "me").hlc > 20);
        assert_eq!(r.certs()[0].op, CertOp::Add);
    }

    #[test]
    fn routes_overlay_config_by_host_and_path() {
        let spec = |host: Option<&str>, path: Option<&str>, pool: &str| RouteSpec {
            host: HostPattern::parse(host).unwrap(),
            path: PathPattern::parse(path).unwrap(),
            action: RouteAction::Pool { upstream: pool.into(), strip_prefix: false },
        };
        let config = vec![spec(Some("api.example"), None, "api"), spec(None, Some("/static/"), "static")];
        let r = Registry::default();
        // replace the config's api route, remove the static one, add a new one
        r.record_route(&config[0].host, &config[0].path, Some(&spec(Some("api.example"), None, "api2")), "a");
        r.record_route(&config[1].host, &config[1].path, None, "a");
        let new = spec(None, Some("=/healthz"), "api");
        r.record_route(&new.host, &new.path, Some(&new), "b");
        let routes = r.effective_routes(&config);
        assert_eq!(routes, vec![spec(Some("api.example"), None, "api2"), new.clone()]);
        // a stale add does not undo the removal; the same entries merge to the same result anywhere
        let mut stale = r.routes().into_iter().find(|e| e.path == "/static/").unwrap();
        stale.hlc -= 1;
        stale.op = CertOp::Add;
        stale.upstream = "static".into();
        assert!(!r.merge_routes([stale]));
        let copy = Registry::default();
        copy.merge_routes(r.routes());
        assert_eq!(copy.effective_routes(&config), routes);
        // an entry that is no route (from a broken peer) is skipped
        let mut broken = r.routes()[0].clone();
        broken.host = "a b".into();
        broken.hlc += 100;
        copy.merge_routes([broken]);
        assert_eq!(copy.effective_routes(&config), routes);
    }

    #[test]
    fn effective_overlays_config() {
        let r = Registry::default();
        let cfg =
            vec![BackendSpec::new("10.0.0.1:80".parse().unwrap()), BackendSpec::new("10.0.0.2:80".parse().unwrap())];
        r.merge([
            entry("10.0.0.1:80", 1, RegOp::Remove, "a"),
            entry("10.0.0.2:80", 1, RegOp::Drain, "a"),
            entry("10.0.0.3:80", 1, RegOp::Add, "a"),
        ]);
        let (specs, draining) = r.effective("default", &cfg);
        let addrs: Vec<String> = specs.iter().map(|s| s.addr.to_string()).collect();
        assert_eq!(addrs, vec!["10.0.0.2:80", "10.0.0.3:80"]);
        assert_eq!(draining, vec!["10.0.0.2:80".parse::<SocketAddr>().unwrap()]);
    }
}
