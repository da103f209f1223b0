//! Membership changes as events, computed by a pure function from the previous and the new
//! member list (no network, unit-tested).

use super::Member;
use crate::lifecycle::MemberState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A node id seen for the first time.
    Joined { node_id: String, state: MemberState },
    /// A known node came back with a new generation (it restarted).
    Restarted { node_id: String, generation: u64 },
    /// A node's state changed (alive -> draining -> left, alive -> dead, dead -> alive).
    StateChanged { node_id: String, from: MemberState, to: MemberState },
    /// A node is no longer listed at all (its state was garbage-collected).
    Removed { node_id: String },
}

/// Events that turn `old` into `new`. Members are keyed by node id.
pub fn diff(old: &[Member], new: &[Member]) -> Vec<MemberEvent> {
    let mut events = Vec::new();
    for n in new {
        match old.iter().find(|o| o.node_id == n.node_id) {
            None => events.push(MemberEvent::Joined { node_id: n.node_id.clone(), state: n.state }),
            Some(o) => {
                if o.generation != n.generation {
                    events.push(MemberEvent::Restarted { node_id: n.node_id.clone(), generation: n.generation });
                }
                if o.state != n.state {
                    events.push(MemberEvent::StateChanged { node_id: n.node_id.clone(), from: o.state, to: n.state });
                }
            }
        }
    }
    for o in old {
        if !new.iter().any(|n| n.node_id == o.node_id) {
            events.push(MemberEvent::Removed { node_id: o.node_id.clone() });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, generation: u64, state: MemberState) -> Member {
        Member { node_id: id.into(), generation, state, ..Member::default() }
    }

    #[test]
    fn join_leave_die_restart() {
        use MemberState::*;
        let a = [m("a", 1, Alive), m("b", 1, Alive), m("c", 1, Alive)];
        let b = [m("a", 1, Alive), m("b", 1, Draining), m("c", 1, Dead), m("d", 1, Alive)];
        assert_eq!(
            diff(&a, &b),
            vec![
                MemberEvent::StateChanged { node_id: "b".into(), from: Alive, to: Draining },
                MemberEvent::StateChanged { node_id: "c".into(), from: Alive, to: Dead },
                MemberEvent::Joined { node_id: "d".into(), state: Alive },
            ]
        );
        let c = [m("a", 1, Alive), m("c", 2, Alive), m("d", 1, Alive)];
        assert_eq!(
            diff(&b, &c),
            vec![
                MemberEvent::Restarted { node_id: "c".into(), generation: 2 },
                MemberEvent::StateChanged { node_id: "c".into(), from: Dead, to: Alive },
                MemberEvent::Removed { node_id: "b".into() },
            ]
        );
        assert!(diff(&c, &c).is_empty());
    }
}
