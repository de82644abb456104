//! This host's copy of the fleet allow-list, kept in its data dir
//! (`allow-list`, one canonical CIDR a line, 0600, replaced atomically and
//! fsynced), so that the node refuses bans inside it without asking the
//! hub: after a restart with the hub down, for a ban replayed from the
//! store, and for one received while the list changes.
//!
//! How the list arrives: allow-list changes are events (kinds allow-add
//! and allow-remove) in the same id-ordered stream as bans, sent to every
//! node (never filtered as "its own"). The applier handles them in that
//! order ([`super::apply`]): before any ban after them is decided.
//!
//! Why no ban inside an entry slips through here while the list changes:
//! - A ban with a higher id than the entry's allow-add is decided after
//!   the entry is in this list (events are applied in id order), so it is
//!   refused: status 4, no line, no fast path.
//! - A ban with a lower id was legitimate when it was committed; the hub
//!   wrote an unban for it with an id above the allow-add, in the same
//!   transaction as the entry, so it is lifted here right after.
//! - The file is written ([`LocalAllowList::save`]) at the end of every
//!   batch the applier takes that changed it, before the position (the
//!   last applied id) moves past the batch, so a crash can only replay an
//!   allow event (applying one twice changes nothing), never skip it. One
//!   write per batch, not per event: a node replaying 10,000 entries
//!   writes the file a few times, not 10,000.
//! - A file that cannot be read keeps the node from starting (it does not
//!   start with an empty list); one that cannot be written is logged as an
//!   error and the entry still holds in memory until the node restarts.
//!
//! The node checks bans from other hosts only: its own fail2ban's bans
//! are its own business (the hub refuses to fan them out).
use std::{collections::BTreeSet, path::PathBuf};

use tracing::{error, info};

use super::state_file;
use crate::{
    allow::{AllowList, Allowed, Network},
    ban::{Event, EventKind},
};

/// The file's name in the data dir.
pub const FILE: &str = "allow-list";

/// The list, in memory and on disk.
#[derive(Debug)]
pub struct LocalAllowList {
    path: PathBuf,
    entries: BTreeSet<Network>,
    list: AllowList,
    /// Changed since the last save.
    dirty: bool,
}

/// The saved list cannot be read: the node does not start without it.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the saved allow-list {path}: {reason}")]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl LocalAllowList {
    /// Loads the list saved in `data_dir` (empty when there is none yet).
    pub fn load(data_dir: &std::path::Path) -> Result<Self, LoadError> {
        let path = data_dir.join(FILE);
        let fail = |reason: String| LoadError {
            path: path.clone(),
            reason,
        };
        let bytes = state_file::read(&path).map_err(|e| fail(e.to_string()))?;
        let text =
            String::from_utf8(bytes.unwrap_or_default()).map_err(|_| fail("not UTF-8".into()))?;
        let entries = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.parse::<Network>().map_err(|e| fail(e.to_string())))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if !entries.is_empty() {
            info!(entries = entries.len(), path = %path.display(), "allow-list loaded");
        }
        Ok(LocalAllowList {
            list: AllowList::new(entries.iter().copied()),
            entries,
            path,
            dirty: false,
        })
    }

    /// An empty list saved (on its first change) in `data_dir`.
    pub fn empty(data_dir: &std::path::Path) -> Self {
        LocalAllowList {
            path: data_dir.join(FILE),
            entries: BTreeSet::new(),
            list: AllowList::default(),
            dirty: false,
        }
    }

    /// Applies an allow-list event (others are ignored) in memory; call
    /// [`LocalAllowList::save`] before the position moves past it.
    pub fn apply(&mut self, event: &Event) {
        let Some(network) = event.network() else {
            return;
        };
        let changed = match event.kind {
            EventKind::AllowAdd => self.entries.insert(network),
            EventKind::AllowRemove => self.entries.remove(&network),
            _ => false,
        };
        if !changed {
            return;
        }
        match event.kind {
            EventKind::AllowAdd => self.list.insert(network),
            _ => {
                self.list.remove(&network);
            }
        }
        self.dirty = true;
        info!(id = event.id, %network, kind = ?event.kind, by = %event.added_by, "allow-list changed");
    }

    /// Writes the list (atomically, fsynced) if it changed since the last save.
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let text: String = self.entries.iter().map(|n| format!("{n}\n")).collect();
        match state_file::replace(&self.path, text.as_bytes(), true) {
            Ok(()) => self.dirty = false,
            Err(e) => error!(path = %self.path.display(), error = %e,
                "cannot save the allow-list; it holds in memory until the node restarts"),
        }
    }

    /// Whether every change is on disk: until it is, the node must not move
    /// its position past the change (a restart would forget it for good).
    pub fn is_saved(&self) -> bool {
        !self.dirty
    }

    /// Why a ban of `ip` is refused here, if it is.
    pub fn refuses(&self, ip: &str) -> Option<Allowed> {
        self.list.check_str(ip)
    }

    /// Entries held (not counting the built-ins).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held (the built-ins still apply).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ban::Ban;

    fn event(id: u64, kind: EventKind, net: &str) -> Event {
        Event {
            id,
            kind,
            ban: Ban::allow_entry(&net.parse().unwrap()),
            added_by: "admin".into(),
            created_ms: 0,
            lifts: 0,
            term: Default::default(),
        }
    }

    #[test]
    fn survives_a_restart_and_refuses_inside_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = LocalAllowList::load(dir.path()).unwrap();
        assert!(l.refuses("198.51.100.7").is_none());
        l.apply(&event(5, EventKind::AllowAdd, "198.51.100.0/24"));
        l.apply(&event(6, EventKind::AllowAdd, "2001:db8::/48"));
        l.apply(&event(7, EventKind::AllowRemove, "2001:db8::/48"));
        assert!(
            !dir.path().join(FILE).exists(),
            "saved per batch, not per event"
        );
        l.save();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let l = LocalAllowList::load(dir.path()).unwrap();
        assert_eq!(l.len(), 1);
        assert!(l.refuses("198.51.100.7").is_some());
        assert!(l.refuses("::ffff:198.51.100.7").is_some());
        assert!(l.refuses("2001:db8::1").is_none());
        assert!(l.refuses("127.0.0.1").is_some(), "built-ins always hold");
        std::fs::write(dir.path().join(FILE), "not a network\n").unwrap();
        assert!(LocalAllowList::load(dir.path()).is_err());
    }
}
