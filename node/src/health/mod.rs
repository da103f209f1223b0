//! Backend health: passive (request failures, like nginx `max_fails`/`fail_timeout`) and
//! active checks (`[health]`, like nginx_upstream_check_module / HAProxy `check`).
//!
//! States of a backend's own verdict, with the transitions:
//! ```text
//!   up --(max_fails failures within fail_timeout)--> ejected --(fail_timeout passes)--> up
//!   up --(fall bad checks in a row)--> down --(rise good checks in a row)--> up
//! ```
//! A peer's "down" report (shared health, `crate::view`) sets `cluster_down`; only this node's
//! own `rise` good checks, or the peers taking their report back, clear it.

use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendSpec, CheckKind, HealthSettings};
use crate::pool::conn::UpstreamStream;
use crate::pool::{BackendState, Pool, now_ms};
use crate::tls::upstream::UpstreamTls;

/// What kind of failure a request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend refused or could not be reached: shared with the cluster when it ejects.
    Connect,
    /// A timeout, a broken response or a retryable status: ejects on this node only.
    Other,
}

/// Counts a failed request. Ejects the backend for `fail_timeout` once `max_fails` failures
/// fall within one `fail_timeout` window. An ejection caused by a connect failure becomes this
/// node's "down" verdict in gossip (one node finding a backend refusing connections takes it
/// out everywhere); one caused by slowness stays local, so a single timeout does not eject a
/// backend cluster-wide.
pub fn record_failure(spec: &BackendSpec, state: &BackendState, kind: Failure) {
    state.failures.fetch_add(1, Relaxed);
    let now = now_ms();
    // A failure is a slow answer to the least-conn picker: one that fails fast (refuses, or
    // answers 502 at once) must not draw traffic for looking quick.
    state.speed.penalise(now);
    if spec.max_fails == 0 {
        return;
    }
    let window = spec.fail_timeout.as_millis() as u64;
    let h = &state.health;
    let start = h.fail_window_start_ms.load(Relaxed);
    let count = if now.saturating_sub(start) > window || start == 0 {
        h.fail_window_start_ms.store(now.max(1), Relaxed);
        h.fail_count.store(1, Relaxed);
        1
    } else {
        h.fail_count.fetch_add(1, Relaxed) + 1
    };
    if count >= spec.max_fails {
        let until = now + window;
        h.refused.store(kind == Failure::Connect, Relaxed);
        if h.ejected_until_ms.swap(until, Relaxed) <= now {
            tracing::warn!(pool = %state.pool, backend = %state.addr, failures = count, for_ms = window, cause = ?kind, "backend ejected after failures");
        }
        h.fail_count.store(0, Relaxed);
    }
}

/// Outcome of one active probe.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    Good,
    Bad(String),
}

/// Probes one backend once (an HTTP check over TLS when the pool speaks TLS to its backends).
pub async fn probe(state: &BackendState, settings: &HealthSettings, tls: Option<&UpstreamTls>) -> Probe {
    let attempt = async {
        let tcp = TcpStream::connect(state.addr).await.map_err(|e| format!("connect: {e}"))?;
        if settings.kind == CheckKind::Tcp {
            return Ok(());
        }
        let mut stream = match tls {
            None => UpstreamStream::Plain(tcp),
            Some(tls) => UpstreamStream::Tls(Box::new(
                tls.connect(tcp, state.addr).await.map_err(|e| format!("TLS handshake: {e}"))?,
            )),
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: shoal-health\r\nConnection: close\r\n\r\n",
            settings.path, state.addr
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        stream.flush().await.map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        let mut len = 0;
        while len < 12 {
            let n = stream.read(&mut buf[len..]).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before a status line".to_string());
            }
            len += n;
        }
        let line = std::str::from_utf8(&buf[..len]).unwrap_or("");
        let status: u16 = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP status line: {:?}", &line[..line.len().min(20)]))?;
        if settings.expect.iter().any(|c| c.matches(status)) { Ok(()) } else { Err(format!("status {status}")) }
    };
    match tokio::time::timeout(settings.timeout, attempt).await {
        Ok(Ok(())) => Probe::Good,
        Ok(Err(e)) => Probe::Bad(e),
        Err(_) => Probe::Bad(format!("no answer within {:?}", settings.timeout)),
    }
}

/// Applies one probe result to the rise/fall streaks. Returns the new `active_up`.
pub fn apply_probe(state: &BackendState, settings: &HealthSettings, result: &Probe) -> bool {
    let h = &state.health;
    let was_up = h.active_up.load(Relaxed);
    match result {
        Probe::Good => {
            h.streak_bad.store(0, Relaxed);
            let ok = h.streak_ok.fetch_add(1, Relaxed) + 1;
            if ok >= settings.rise {
                if !was_up {
                    tracing::info!(pool = %state.pool, backend = %state.addr, good_checks = ok, "backend up again");
                    h.active_up.store(true, Relaxed);
                    // A passive ejection ends too: the backend just proved itself `rise` times.
                    h.ejected_until_ms.store(0, Relaxed);
                }
                if h.cluster_down.swap(false, Relaxed) {
                    tracing::warn!(pool = %state.pool, backend = %state.addr, good_checks = ok,
                        "own checks disagree with the cluster: backend is up here, peers reported it down");
                }
            }
        }
        Probe::Bad(reason) => {
            h.streak_ok.store(0, Relaxed);
            let bad = h.streak_bad.fetch_add(1, Relaxed) + 1;
            if bad >= settings.fall && was_up {
                tracing::warn!(pool = %state.pool, backend = %state.addr, bad_checks = bad, reason = %reason, "backend down");
                h.active_up.store(false, Relaxed);
            }
        }
    }
    h.active_up.load(Relaxed)
}

/// Which live members probe which backends: the `k` members with the highest rendezvous
/// score for a backend check it, the others take their verdicts from gossip (`down:` keys).
/// When a checker dies or leaves, the next member by score is a checker from the view that
/// no longer lists it (within one check interval of the view changing). Written by the view
/// task; read once per check interval by each backend's check task.
#[derive(Debug, Default)]
pub struct Roster {
    /// This node's id and the alive members' ids (this node included); None before the
    /// first view, when every node checks.
    members: arc_swap::ArcSwapOption<(String, Vec<String>)>,
}

impl Roster {
    pub fn set(&self, self_id: &str, alive: Vec<String>) {
        self.members.store(Some(Arc::new((self_id.to_string(), alive))));
    }

    /// Whether this node is one of the `k` checkers of `pool`'s backend `addr` (k = 0: every
    /// node is). A node the view does not list as alive (not seen yet, or draining) checks
    /// everything: the alive members do not count on it, so its probes are extra, never
    /// missing.
    pub fn checks_here(&self, pool: &str, addr: SocketAddr, k: u32) -> bool {
        let guard = self.members.load();
        let Some(m) = guard.as_deref() else { return true };
        let (me, alive) = (&m.0, &m.1);
        if k == 0 || alive.len() <= k as usize || !alive.contains(me) {
            return true;
        }
        let addr = addr.to_string();
        let score = |id: &str| {
            let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6368_6563_6b73, 0x0073_686f_616c);
            h.write(id.as_bytes());
            h.write_u8(0);
            h.write(pool.as_bytes());
            h.write_u8(0);
            h.write(addr.as_bytes());
            h.finish()
        };
        let mine = (score(me), me.as_str());
        alive.iter().filter(|id| (score(id), id.as_str()) > mine).count() < k as usize
    }
}

/// Runs active checks for every backend of the pool until `stop` fires. Checks start at a
/// random offset within the interval, so N backends are not probed in one burst. With
/// `checkers` set, only the backends this node is a checker of are probed (see [`Roster`]).
pub async fn run_checks(
    pool: Arc<Pool>,
    settings: HealthSettings,
    tls: Option<Arc<UpstreamTls>>,
    roster: Arc<Roster>,
    stop: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut watched: Vec<Arc<BackendState>> = Vec::new();
    let mut rescan = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = rescan.tick() => {}
        }
        let snapshot = pool.full();
        for b in &snapshot.backends {
            if watched.iter().any(|w| Arc::ptr_eq(w, &b.state)) {
                continue;
            }
            watched.push(b.state.clone());
            let (state, settings, stop, tls) = (b.state.clone(), settings.clone(), stop.child_token(), tls.clone());
            let (pool_ref, roster, pool_name) = (Arc::downgrade(&pool), roster.clone(), pool.name.to_string());
            tasks.spawn(async move {
                let jitter = Duration::from_millis(fastrand::u64(..settings.interval.as_millis() as u64 + 1));
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(jitter) => {} }
                let mut tick = tokio::time::interval(settings.interval);
                let mut checking = true;
                loop {
                    tokio::select! { _ = stop.cancelled() => return, _ = tick.tick() => {} }
                    // Stop once the backend left the pool.
                    let Some(pool) = pool_ref.upgrade() else { return };
                    if pool.snapshot().find(state.addr).is_none_or(|b| !Arc::ptr_eq(&b.state, &state)) {
                        return;
                    }
                    let h = &state.health;
                    if !roster.checks_here(&pool_name, state.addr, settings.checkers) {
                        if checking {
                            // Hand over: this node's verdict is no longer a checker's, so it
                            // stops reporting one; the checkers' reports decide here.
                            tracing::debug!(pool = %pool_name, backend = %state.addr, "checked by other nodes now");
                            h.active_up.store(true, Relaxed);
                            h.streak_ok.store(0, Relaxed);
                            h.streak_bad.store(0, Relaxed);
                            checking = false;
                        }
                        continue;
                    }
                    if !checking {
                        // Take over from the cluster's verdict, then `rise`/`fall` as usual.
                        let down = h.cluster_down.load(Relaxed);
                        tracing::info!(pool = %pool_name, backend = %state.addr, down, "checking this backend for the cluster now");
                        h.active_up.store(!down, Relaxed);
                        checking = true;
                    }
                    h.probes.fetch_add(1, Relaxed);
                    let result = probe(&state, &settings, tls.as_deref()).await;
                    apply_probe(&state, &settings, &result);
                }
            });
        }
        watched.retain(|w| snapshot.backends.iter().any(|b| Arc::ptr_eq(&b.state, w)));
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkers(alive: &[&str], pool: &str, addr: SocketAddr, k: u32) -> Vec<String> {
        let ids: Vec<String> = alive.iter().map(|s| s.to_string()).collect();
        ids.iter()
            .filter(|me| {
                let r = Roster::default();
                r.set(me, ids.clone());
                r.checks_here(pool, addr, k)
            })
            .cloned()
            .collect()
    }

    #[test]
    fn rendezvous_picks_k_checkers_and_moves_only_a_dead_ones_share() {
        let nodes = ["n1", "n2", "n3", "n4", "n5"];
        let mut per_node = std::collections::BTreeMap::<String, usize>::new();
        for port in 0..200u16 {
            let addr = SocketAddr::from(([10, 0, 0, 1], 8000 + port));
            let two = checkers(&nodes, "default", addr, 2);
            assert_eq!(two.len(), 2, "{addr}: {two:?}");
            for n in &two {
                *per_node.entry(n.clone()).or_default() += 1;
            }
            // A checker dies: the other one stays a checker, one more takes its place.
            let dead = &two[0];
            let rest: Vec<&str> = nodes.iter().copied().filter(|n| n != dead).collect();
            let after = checkers(&rest, "default", addr, 2);
            assert_eq!(after.len(), 2);
            assert!(after.contains(&two[1]), "{addr}: {two:?} -> {after:?}");
            // k = 0, or no more members than k: everyone checks.
            assert_eq!(checkers(&nodes, "default", addr, 0).len(), 5);
            assert_eq!(checkers(&nodes[..2], "default", addr, 2).len(), 2);
        }
        // Spread evenly: 400 checks over 5 nodes, 80 each on average.
        assert!(per_node.values().all(|&n| (50..=110).contains(&n)), "{per_node:?}");
        // Before any view, and for a node the view does not list (yet), this node checks.
        let r = Roster::default();
        assert!(r.checks_here("default", SocketAddr::from(([10, 0, 0, 1], 80)), 1));
        r.set("n9", nodes.iter().map(|s| s.to_string()).collect());
        assert!(r.checks_here("default", SocketAddr::from(([10, 0, 0, 1], 80)), 1));
    }
    use crate::config::StatusClass;

    fn settings() -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            timeout: Duration::from_secs(1),
            kind: CheckKind::Http,
            path: "/".into(),
            expect: vec![StatusClass::Class(2)],
            checkers: 0,
        }
    }

    #[test]
    fn rise_and_fall_need_streaks() {
        let s = BackendState::new("default".into(), "127.0.0.1:1".parse().unwrap(), 1, Default::default());
        let cfg = settings();
        let bad = Probe::Bad("x".into());
        assert!(apply_probe(&s, &cfg, &bad));
        assert!(apply_probe(&s, &cfg, &bad));
        assert!(apply_probe(&s, &cfg, &Probe::Good)); // streak broken
        assert!(apply_probe(&s, &cfg, &bad));
        assert!(apply_probe(&s, &cfg, &bad));
        assert!(!apply_probe(&s, &cfg, &bad)); // third in a row
        assert!(!apply_probe(&s, &cfg, &Probe::Good));
        assert!(apply_probe(&s, &cfg, &Probe::Good)); // rise = 2
    }

    #[test]
    fn own_good_checks_clear_a_cluster_report() {
        let s = BackendState::new("default".into(), "127.0.0.1:1".parse().unwrap(), 1, Default::default());
        s.health.cluster_down.store(true, Relaxed);
        let cfg = settings();
        apply_probe(&s, &cfg, &Probe::Good);
        assert!(s.health.cluster_down.load(Relaxed));
        apply_probe(&s, &cfg, &Probe::Good);
        assert!(!s.health.cluster_down.load(Relaxed));
    }

    #[test]
    fn passive_ejection_after_max_fails() {
        let s = BackendState::new("default".into(), "127.0.0.1:1".parse().unwrap(), 1, Default::default());
        let mut spec = BackendSpec::new(s.addr);
        spec.max_fails = 2;
        spec.fail_timeout = Duration::from_secs(5);
        let now = now_ms().max(1);
        record_failure(&spec, &s, Failure::Other);
        assert!(s.is_healthy(now));
        record_failure(&spec, &s, Failure::Other);
        assert!(!s.is_healthy(now_ms()));
        // ejected for slowness: not shared with the cluster
        assert!(!s.own_verdict_down(now_ms()));
        record_failure(&spec, &s, Failure::Connect);
        record_failure(&spec, &s, Failure::Connect);
        assert!(s.own_verdict_down(now_ms()));
    }
}
