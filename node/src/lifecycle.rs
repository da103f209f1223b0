//! The node's own lifecycle state and the leave sequence.
//!
//! ```text
//!   alive --(SIGTERM, SIGINT, `shoal leave`)--> draining --(grace, stop accepting,
//!   in-flight finished or drain timeout)--> left --> process exits 0
//! ```
//! `draining` is announced in gossip and fails `/ready` at once, while the node still accepts
//! for `leave_grace`, so DNS and peers move clients away before anything is refused.

use std::sync::atomic::{AtomicU8, Ordering::SeqCst};

/// Member states (memberlist/Serf vocabulary). `Dead` is only ever assigned by peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MemberState {
    Alive = 0,
    Draining = 1,
    Left = 2,
    Dead = 3,
}

impl MemberState {
    /// Alive or draining: takes requests, counts in the cluster's load and `max_conns` shares.
    pub fn serves(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Draining)
    }

    pub fn name(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Draining => "draining",
            MemberState::Left => "left",
            MemberState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "alive" => MemberState::Alive,
            "draining" => MemberState::Draining,
            "left" => MemberState::Left,
            "dead" => MemberState::Dead,
            _ => return None,
        })
    }
}

/// This node's state, readable from anywhere without locks.
#[derive(Debug)]
pub struct Lifecycle(AtomicU8);

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle(AtomicU8::new(MemberState::Alive as u8))
    }
}

impl Lifecycle {
    pub fn get(&self) -> MemberState {
        match self.0.load(SeqCst) {
            0 => MemberState::Alive,
            1 => MemberState::Draining,
            2 => MemberState::Left,
            _ => MemberState::Dead,
        }
    }

    pub fn set(&self, s: MemberState) {
        self.0.store(s as u8, SeqCst);
    }
}
