//! Bans put off until an existing, older ban ends (the seed's rule: status
//! stays 0, and the node applies the ban when the existing one ends).
//!
//! Kept in `DIR/deferred`, one tab-separated line per ban, rewritten on
//! every change: the node's position has already moved past these events,
//! so this file is their only record on this host. A ban's fleet term
//! (end, rung, the ban it extends) follows its eight original fields; a
//! line without them (written before the ladder) reads as no fleet end.
use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::ban::{Ban, BanTerm, Event, EventKind};

/// The deferred bans and their due times, mirrored to `DIR/deferred` on every change.
pub struct Deferred {
    path: PathBuf,
    items: Vec<(Event, SystemTime)>,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn parse(line: &str) -> Option<(Event, SystemTime)> {
    let f: Vec<&str> = line.split('\t').collect();
    let (head, term) = match f.len() {
        8 => (&f[..], None),
        11 => (&f[..8], Some(&f[8..])),
        _ => return None,
    };
    let [id, due, ip, jail, protocol, port, added_by, created] = head[..] else {
        return None;
    };
    let term = match term {
        Some([ends, rung, extends]) => BanTerm {
            ends_ms: ends.parse().ok()?,
            rung: rung.parse().ok()?,
            extends: extends.parse().ok()?,
            reason: String::new(),
        },
        _ => BanTerm::default(),
    };
    let event = Event {
        id: id.parse().ok()?,
        kind: EventKind::Ban,
        ban: Ban::new(jail, protocol, port, ip).ok()?,
        added_by: added_by.to_string(),
        created_ms: created.parse().ok()?,
        lifts: 0,
        term,
    };
    Some((event, UNIX_EPOCH + Duration::from_millis(due.parse().ok()?)))
}

impl Deferred {
    /// Reads the file at `path`; a missing file or an unreadable line is no deferred ban.
    pub fn load(path: PathBuf) -> Self {
        let bytes = super::state_file::read(&path).unwrap_or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "cannot read deferred bans");
            None
        });
        let items = String::from_utf8_lossy(&bytes.unwrap_or_default())
            .lines()
            .filter_map(parse)
            .collect();
        Deferred { path, items }
    }

    /// How many bans are deferred.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no ban is deferred.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Defers `event` until `due` (replacing an earlier deferral of the same event) and saves.
    pub fn push(&mut self, event: Event, due: SystemTime) {
        self.items.retain(|(e, _)| e.id != event.id);
        self.items.push((event, due));
        self.save();
    }

    /// Forgets every deferred ban of an IP (it was lifted).
    pub fn cancel(&mut self, ip: &str) {
        let before = self.items.len();
        self.items.retain(|(e, _)| e.ban.ip != ip);
        if self.items.len() != before {
            self.save();
        }
    }

    /// The bans whose time has come; they stay on file until [`done`](Self::done).
    pub fn due(&self, now: SystemTime) -> Vec<Event> {
        self.items
            .iter()
            .filter(|(_, t)| *t <= now)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Forgets bans once they were applied (or put off again, which
    /// re-adds them with a new time).
    pub fn done(&mut self, applied: &[Event], before: SystemTime) {
        let n = self.items.len();
        self.items
            .retain(|(e, t)| !(*t <= before && applied.iter().any(|a| a.id == e.id)));
        if self.items.len() != n {
            self.save();
        }
    }

    fn save(&self) {
        let text: String = self
            .items
            .iter()
            .map(|(e, due)| {
                let b = &e.ban;
                format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                    e.id,
                    ms(*due),
                    b.ip,
                    b.jail,
                    b.protocol,
                    b.port,
                    e.added_by,
                    e.created_ms,
                    e.term.ends_ms,
                    e.term.rung,
                    e.term.extends
                )
            })
            .collect();
        if let Err(e) = super::state_file::replace(&self.path, text.as_bytes(), false) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save deferred bans");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_releases_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deferred");
        let mut d = Deferred::load(path.clone());
        let ev = Event {
            id: 9,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", "192.0.2.4").unwrap(),
            added_by: "web-1".into(),
            created_ms: 5,
            term: BanTerm {
                ends_ms: 4_005,
                rung: 2,
                extends: 3,
                reason: String::new(),
            },
            lifts: 0,
        };
        let now = SystemTime::now();
        d.push(ev.clone(), now + Duration::from_secs(60));
        let mut d = Deferred::load(path);
        assert_eq!(d.len(), 1);
        assert!(d.due(now).is_empty());
        let later = now + Duration::from_secs(61);
        let due = d.due(later);
        assert_eq!(due, vec![ev]);
        // Still on file until applied: a crash before that keeps it.
        assert_eq!(Deferred::load(dir.path().join("deferred")).len(), 1);
        d.done(&due, later);
        assert!(d.is_empty());
    }

    #[test]
    fn lines_from_before_the_ladder_read_as_no_fleet_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deferred");
        std::fs::write(&path, "9\t1000\t192.0.2.4\tsshd\ttcp\t22\tweb-1\t5\n").unwrap();
        let d = Deferred::load(path);
        let due = d.due(UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].term, BanTerm::default());
    }
}
