//! Hot changes spread at once: a registry, route or certificate entry, a member's state and a
//! backend's `down` verdict do not wait for gossip rounds.
//!
//! Rounds spread everything within a few intervals, and a paced member of a large cluster
//! opens fewer exchanges (`pace`). Changes an operator waits for, or that take a backend out of
//! rotation, should not wait for that: a member that sees one (written here or received) opens
//! exchanges with [`FANOUT`] live peers at once (the next member in id order and random
//! others), with urgent SYNs. chitchat reports a key to a member only when its version is new
//! there, and a registry entry every member re-publishes is recognised by its value, so each
//! member passes a change on once: a change costs the cluster `members x FANOUT` exchanges and
//! reaches every member in a few hops (rumour mongering on top of chitchat's anti-entropy, as
//! in Demers et al., 1987). Random picks alone would miss about one member in twenty at a
//! fan-out of 3 (it would then wait for a round, slow in a paced large cluster); the ring
//! successor closes those gaps a hop later. Changes arriving together are passed on together
//! (one burst per [`SPACING`]).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{Chitchat, ChitchatId, ListenerHandle};
use tokio::sync::{Mutex, Notify};

use super::keys;
use super::pace::Pace;

/// Key prefixes whose changes are hot.
pub const HOT_PREFIXES: [&str; 5] =
    [keys::REG_PREFIX, keys::ROUTE_PREFIX, keys::CERT_PREFIX, keys::DOWN_PREFIX, keys::STATE];
/// Of those, the entries every member re-publishes in its own state once it has merged them
/// (so a change outlives its author): one change arrives once per member that holds it.
const REPUBLISHED: [&str; 3] = [keys::REG_PREFIX, keys::ROUTE_PREFIX, keys::CERT_PREFIX];
/// Peers a member passes a hot change on to.
pub const FANOUT: usize = 3;
/// At most one burst of exchanges this often.
pub const SPACING: Duration = Duration::from_millis(20);
/// Re-published entries remembered to pass each on once (forgotten all at once beyond this:
/// at worst one more burst).
const REMEMBERED: usize = 4096;

/// Wakes every `notify` when a hot key of any member (this one included) changes; a
/// re-published entry (same key and value, its clock included) wakes them the first time
/// only. The callbacks run under chitchat's lock, so they only hash and wake; keep the handles
/// (dropping one unsubscribes).
pub async fn watch(chitchat: &Mutex<Chitchat>, notify: &[Arc<Notify>]) -> Vec<ListenerHandle> {
    let seen = Arc::new(std::sync::Mutex::new(HashSet::<u64>::new()));
    let cc = chitchat.lock().await;
    HOT_PREFIXES
        .iter()
        .map(|&prefix| {
            let notify = notify.to_vec();
            let seen = REPUBLISHED.contains(&prefix).then(|| seen.clone());
            cc.subscribe_event(prefix, move |event| {
                if let Some(seen) = &seen {
                    let mut h = std::hash::DefaultHasher::new();
                    (prefix, event.key, event.value).hash(&mut h);
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if seen.len() >= REMEMBERED {
                        seen.clear();
                    }
                    if !seen.insert(h.finish()) {
                        return;
                    }
                }
                notify.iter().for_each(|n| n.notify_one());
            })
        })
        .collect()
}

/// Passes hot changes on: on every wake-up, `gossip` with [`FANOUT`] live peers
/// ([`pick_peers`]), their SYNs marked urgent in `pace`. Runs until aborted.
pub async fn spread_loop(
    chitchat: Arc<Mutex<Chitchat>>,
    pace: Arc<Pace>,
    hot: Arc<Notify>,
    gossip: impl Fn(SocketAddr) + Send + 'static,
) {
    loop {
        hot.notified().await;
        let peers = {
            let cc = chitchat.lock().await;
            let mut live: Vec<&ChitchatId> = cc.live_nodes().collect();
            live.sort();
            pick_peers(&live, cc.self_chitchat_id())
        };
        for peer in peers {
            pace.mark_urgent(peer);
            gossip(peer);
        }
        tokio::time::sleep(SPACING).await;
    }
}

/// The peers to pass a change on to: the next live member after this one in id order (so the
/// change goes round the ring even where random picks miss a member) and `FANOUT - 1` others
/// at random. `live` is sorted and may include this member.
fn pick_peers(live: &[&ChitchatId], me: &ChitchatId) -> Vec<SocketAddr> {
    let others: Vec<&ChitchatId> = live.iter().copied().filter(|id| *id != me).collect();
    let Some(next) = others.iter().find(|id| **id > me).or(others.first()).copied() else {
        return Vec::new();
    };
    let rest = others.into_iter().filter(|id| *id != next);
    std::iter::once(next)
        .chain(fastrand::choose_multiple(rest, FANOUT - 1))
        .map(|id| id.gossip_advertise_addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> ChitchatId {
        ChitchatId::new(format!("n{n:02}"), 1, SocketAddr::from(([127, 0, 0, 1], 7000 + n)))
    }

    #[test]
    fn the_ring_successor_and_random_others() {
        let ids: Vec<ChitchatId> = (0..10).map(id).collect();
        let live: Vec<&ChitchatId> = ids.iter().collect();
        for _ in 0..20 {
            let peers = pick_peers(&live, &ids[4]);
            assert_eq!(peers.len(), FANOUT);
            assert_eq!(peers[0], ids[5].gossip_advertise_addr);
            assert!(!peers.contains(&ids[4].gossip_advertise_addr));
            let mut unique = peers.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), FANOUT);
        }
        // The last member's successor is the first.
        assert_eq!(pick_peers(&live, &ids[9])[0], ids[0].gossip_advertise_addr);
        // Fewer members than the fan-out; alone.
        assert_eq!(pick_peers(&live[..2], &ids[0]), vec![ids[1].gossip_advertise_addr]);
        assert!(pick_peers(&live[..1], &ids[0]).is_empty());
    }
}
