//! How far this node has applied the hub's events: the last applied event
//! id, kept in `DATA_DIR/applied`.
//!
//! Contract: at start the position is the larger of the file and the
//! highest id in `shared.log`'s tail ([`super::shared_log::last_logged_id`]),
//! so a crash between writing a line and saving the position never writes
//! the line twice. The file is saved at most every [`POSITION_SAVE`] (and
//! at shutdown): the lines in `shared.log` are the authority for bans, so a
//! position a moment stale only re-applies a few unbans or already-held
//! bans, which is harmless.
use std::{
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How often the position file is rewritten while events flow.
const POSITION_SAVE: Duration = Duration::from_millis(500);

/// The last applied event id; shared by the subscriber (where to resume),
/// the apply task (what to skip) and the node's status.
pub struct Position {
    path: PathBuf,
    id: AtomicU64,
    /// The id last written to the file, and when.
    saved: Mutex<(u64, Instant)>,
}

impl Position {
    /// Reads the saved position; `logged` is the highest id in `shared.log`.
    pub fn load(path: PathBuf, logged: u64) -> Self {
        let saved: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let id = saved.max(logged);
        Position {
            path,
            id: AtomicU64::new(id),
            saved: Mutex::new((id, Instant::now())),
        }
    }

    /// The last applied event id.
    pub fn get(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    /// Moves the position; saves it if the last save is old enough.
    pub fn set(&self, id: u64) -> std::io::Result<()> {
        self.id.store(id, Ordering::Relaxed);
        let due = self.saved.lock().unwrap().1.elapsed() >= POSITION_SAVE;
        if due { self.flush() } else { Ok(()) }
    }

    /// Writes the position now, if it moved since the last save.
    pub fn flush(&self) -> std::io::Result<()> {
        let id = self.get();
        let mut saved = self.saved.lock().unwrap();
        if saved.0 == id {
            saved.1 = Instant::now();
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, id.to_string())?;
        std::fs::rename(&tmp, &self.path)?;
        *saved = (id, Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_wins_over_a_stale_file_and_a_flush_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied");
        std::fs::write(&path, "5").unwrap();
        let p = Position::load(path.clone(), 9);
        assert_eq!(p.get(), 9);
        p.set(11).unwrap();
        p.flush().unwrap();
        assert_eq!(Position::load(path, 0).get(), 11);
    }
}
