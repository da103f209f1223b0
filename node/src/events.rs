//! The node's recent events for the dashboard: members changing state, backends going down or
//! coming back, configuration reloads. A bounded in-memory log (the newest [`KEEP`]), never on
//! the request path; the log lines stay the record of everything.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Events kept.
pub const KEEP: usize = 200;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Member,
    Backend,
    Reload,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Member, Kind::Backend, Kind::Reload];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Member => "member",
            Kind::Backend => "backend",
            Kind::Reload => "reload",
        }
    }
}

/// How an event reads: `Bad` (dead, down, a refused reload), `Good` (back up, joined), `Info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Bad,
    Good,
    Info,
}

impl Tone {
    pub const ALL: [Tone; 3] = [Tone::Bad, Tone::Good, Tone::Info];

    pub fn name(self) -> &'static str {
        match self {
            Tone::Bad => "bad",
            Tone::Good => "good",
            Tone::Info => "info",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Numbered from 1 in the order recorded, so a reader can ask for what is new.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub kind: Kind,
    pub tone: Tone,
    /// What it is about: a node id, `pool/addr`, or the config path.
    pub subject: String,
    pub text: String,
}

#[derive(Debug, Default)]
pub struct Events {
    inner: Mutex<(u64, VecDeque<Event>)>,
    /// Events ever recorded, by kind and tone (`shoal_events_total`).
    counts: [[AtomicU64; 3]; 3],
}

impl Events {
    pub fn push(&self, kind: Kind, tone: Tone, subject: impl Into<String>, text: impl Into<String>) {
        self.counts[kind as usize][tone as usize].fetch_add(1, Relaxed);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let event = Event { seq: g.0, at_ms: unix_ms(), kind, tone, subject: subject.into(), text: text.into() };
        if g.1.len() == KEEP {
            g.1.pop_front();
        }
        g.1.push_back(event);
    }

    /// How many events of `kind` and `tone` were ever recorded.
    pub fn count(&self, kind: Kind, tone: Tone) -> u64 {
        self.counts[kind as usize][tone as usize].load(Relaxed)
    }

    /// Events recorded at or after `since_ms` (unix ms), oldest first.
    pub fn since(&self, since_ms: u64) -> Vec<Event> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.iter().filter(|e| e.at_ms >= since_ms).cloned().collect()
    }
}

/// Unix time in milliseconds (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_numbers_them() {
        let e = Events::default();
        for i in 0..KEEP + 5 {
            e.push(Kind::Backend, Tone::Bad, format!("b{i}"), "down");
        }
        let all = e.since(0);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].subject, "b5");
        assert_eq!(all.last().unwrap().seq, (KEEP + 5) as u64);
        assert!(e.since(u64::MAX).is_empty());
        assert_eq!(e.count(Kind::Backend, Tone::Bad), (KEEP + 5) as u64);
        assert_eq!(e.count(Kind::Reload, Tone::Bad), 0);
    }
}
