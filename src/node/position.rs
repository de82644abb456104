//! How far this node has applied the hub's events: the last applied event
//! id, kept in `DATA_DIR/applied`.
//!
//! Contract: at start the position is the file's, and nothing else. The
//! file is saved at most every [`POSITION_SAVE`] (and at shutdown), so
//! after a crash it may be a moment behind `shared.log`: the bans written
//! in that moment are recognised by their lines ([`Position::written`]:
//! the same event id *and* the same IP in `shared.log`'s tail,
//! [`super::shared_log::written_tail`]) and are not written twice; the
//! other events of that moment (unbans, already-held bans) are applied
//! again, which is harmless.
//!
//! The file is an append-only [`AckedMark`]: a save is one 16-byte write,
//! not a new file renamed over the old one (that rename, every 500 ms while
//! bans flow, was 1.7-2.5% of a node's CPU, issue 19). Its contract fits
//! the one above: a torn or damaged last record is passed over for the one
//! before, an earlier position, which is exactly the lag a crash already
//! leaves (the tail is read back until it reaches the position); it is
//! never read as later than written. A position that goes back rewrites
//! the file, so an older, higher record cannot come back. A file written
//! by an earlier version (the id as decimal text) is read as such.
//!
//! Why the log's tags are not a position: `shared.log` is a text file other
//! writers reach (a forged line once came in through a reporter's name),
//! and a tag such as `banmesh[999999]` taken as the position made the node
//! subscribe after every event the hub would ever have, skipping them all.
//! Bounding that tag by the hub's last event id would need the hub to say
//! it, and would still skip the events below a forged tag. Matching id and
//! IP instead trusts a line only for the one event it names: a forged line
//! can at worst stand in for the line it forges, which bans the same IP.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::acked_mark::{self, AckedMark};
use crate::ban::{Event, EventKind};

/// How often the position file is rewritten while events flow.
const POSITION_SAVE: Duration = Duration::from_millis(500);

/// The last applied event id; shared by the subscriber (where to resume),
/// the apply task (what to skip) and the node's status.
pub struct Position {
    path: PathBuf,
    id: AtomicU64,
    /// The highest id received from the hub (applied or not): the
    /// status's lag is this less [`Position::get`].
    received: AtomicU64,
    /// What was last saved, and the file.
    saved: Mutex<Saved>,
    /// Lines of `shared.log` after the saved position: event id -> IP.
    logged: Mutex<HashMap<u64, String>>,
}

/// The last save.
struct Saved {
    /// The id last saved (or loaded), and when.
    id: u64,
    at: Instant,
    /// The file, opened at the first save, and the id it holds.
    mark: Option<(AckedMark, u64)>,
}

impl Position {
    /// The saved position (0 if none; a link at `path` is an error).
    pub fn saved(path: &std::path::Path) -> std::io::Result<u64> {
        acked_mark::read(path)
    }

    /// The position `saved` in `path`; `logged` is what `shared.log` holds
    /// after it ([`super::shared_log::written_tail`]), event id -> IP.
    pub fn load(path: PathBuf, saved: u64, mut logged: HashMap<u64, String>) -> Self {
        logged.retain(|logged_id, _| *logged_id > saved);
        let position = Position::at(path, saved);
        *position.logged.lock().unwrap() = logged;
        position
    }

    /// A position at `id`, saved to `path` when it moves (the benchmark's
    /// subscribe-only nodes start at 0 and never save).
    pub fn at(path: PathBuf, id: u64) -> Self {
        Position {
            path,
            id: AtomicU64::new(id),
            received: AtomicU64::new(id),
            saved: Mutex::new(Saved {
                id,
                at: Instant::now(),
                mark: None,
            }),
            logged: Mutex::default(),
        }
    }

    /// The last applied event id.
    pub fn get(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    /// Notes an event id received from the hub (the subscriber).
    pub fn note_received(&self, id: u64) {
        self.received.fetch_max(id, Ordering::Relaxed);
    }

    /// The highest event id received from the hub, at least the applied one.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed).max(self.get())
    }

    /// Whether `shared.log` already holds this ban's line (written before
    /// a crash that left the position file behind). Each line answers once.
    pub fn written(&self, event: &Event) -> bool {
        let mut logged = self.logged.lock().unwrap();
        if logged.is_empty() || event.kind != EventKind::Ban {
            return false;
        }
        logged
            .remove(&event.id)
            .is_some_and(|ip| ip == event.ban.ip)
    }

    /// Moves the position; saves it if the last save is old enough.
    pub fn set(&self, id: u64) -> std::io::Result<()> {
        self.id.store(id, Ordering::Relaxed);
        let due = self.saved.lock().unwrap().at.elapsed() >= POSITION_SAVE;
        if due { self.flush() } else { Ok(()) }
    }

    /// Writes the position now, if it moved since the last save.
    pub fn flush(&self) -> std::io::Result<()> {
        let id = self.get();
        let mut saved = self.saved.lock().unwrap();
        if saved.id == id {
            saved.at = Instant::now();
            return Ok(());
        }
        if saved.mark.is_none() {
            saved.mark = Some(AckedMark::open(self.path.clone())?);
        }
        if let Some((mark, on_disk)) = saved.mark.as_mut() {
            // Going back (never expected) rewrites: see the module docs.
            mark.set(id, id < *on_disk)?;
            *on_disk = id;
        }
        saved.id = id;
        saved.at = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ban::Ban;

    fn ban(id: u64, ip: &str) -> Event {
        Event {
            id,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            added_by: "web-1".into(),
            created_ms: 1,
            lifts: 0,
            term: Default::default(),
        }
    }

    #[test]
    fn the_file_is_the_position_and_a_flush_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied");
        std::fs::write(&path, "5").unwrap();
        let p = Position::load(
            path.clone(),
            Position::saved(&path).unwrap(),
            HashMap::new(),
        );
        assert_eq!(p.get(), 5);
        p.set(11).unwrap();
        p.flush().unwrap();
        assert_eq!(Position::saved(&path).unwrap(), 11);
        // Later saves append, and the last whole record is the position.
        p.set(12).unwrap();
        p.flush().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            48,
            "5 (rewritten), 11, 12"
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, &[1, 2, 3]).unwrap();
        assert_eq!(
            Position::saved(&path).unwrap(),
            12,
            "a torn record is passed over"
        );
    }

    #[test]
    fn a_position_that_goes_back_is_not_undone_by_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied");
        let p = Position::at(path.clone(), 0);
        p.set(20).unwrap();
        p.flush().unwrap();
        p.set(3).unwrap();
        p.flush().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, &[0; 16]).unwrap();
        assert_eq!(Position::saved(&path).unwrap(), 3);
    }

    #[test]
    fn a_logged_line_stands_only_for_its_own_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied");
        std::fs::write(&path, "5").unwrap();
        let logged = HashMap::from([
            (4, "192.0.2.4".to_string()),
            (7, "192.0.2.7".to_string()),
            (999_999, "198.51.100.66".to_string()),
        ]);
        let p = Position::load(path.clone(), Position::saved(&path).unwrap(), logged);
        // A forged high tag moves nothing.
        assert_eq!(p.get(), 5);
        assert!(p.written(&ban(7, "192.0.2.7")));
        assert!(!p.written(&ban(7, "192.0.2.7")), "each line answers once");
        assert!(!p.written(&ban(999_999, "192.0.2.8")), "another IP");
        assert!(!p.written(&ban(8, "192.0.2.8")));
    }
}
