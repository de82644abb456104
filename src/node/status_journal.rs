//! The node's status journal: every status it decides, on disk before the
//! line it describes is written, until the hub has stored it.
//!
//! `DIR/statuses.log` holds lines `EVENT_ID STATUS`; `DIR/statuses.acked`
//! the byte offset up to which the hub has them. A node killed at any point
//! re-sends from that offset (the hub's upsert makes that harmless), so a
//! status is never lost to a crash of the process (lines are written, not
//! fsynced: a power loss can take the last ones, and the hub then shows
//! those bans as 0 until they are next applied; an fsync per status would
//! cost more than the ban's whole path). A later line for the same event wins
//! (a failed write is journaled as 3 after the 1 journaled before it).
//! [`super::status_reporter`] sends it to the hub.
use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use tokio::sync::Notify;

use crate::ban::Status;

/// Truncate the journal once everything is acknowledged and it is this big.
const COMPACT_AT: u64 = 1 << 20;
/// Most bytes read per batch (about 4,000 statuses).
const READ_CHUNK: usize = 64 * 1024;
/// Most statuses per batch: below the hub's 10,000 per call, whatever the
/// line length (short ids make 4-byte lines, 16,000 to a chunk).
pub const MAX_BATCH: usize = 4_000;

struct Inner {
    file: File,
    len: u64,
    acked: u64,
}

/// The journal of statuses not yet stored by the hub (`DIR/statuses.log` and its acked offset).
pub struct StatusJournal {
    path: PathBuf,
    acked_path: PathBuf,
    inner: Mutex<Inner>,
    /// Woken on every append, for the reporter.
    pub appended: Notify,
}

impl StatusJournal {
    /// Opens (or creates) the journal in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("statuses.log");
        let acked_path = dir.join("statuses.acked");
        let mut file = super::state_file::open(
            &path,
            OpenOptions::new().create(true).read(true).append(true),
        )?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        // A torn last line (killed mid-write) is dropped.
        let len = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) as u64;
        if len != text.len() as u64 {
            file.set_len(len)?;
        }
        let acked: u64 = super::state_file::read(&acked_path)?
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
            .unwrap_or(0)
            .min(len);
        Ok(StatusJournal {
            path,
            acked_path,
            inner: Mutex::new(Inner { file, len, acked }),
            appended: Notify::new(),
        })
    }

    /// Journals statuses (one write).
    pub fn append(&self, items: &[(u64, Status)]) -> std::io::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let text: String = items
            .iter()
            .map(|(id, s)| format!("{id} {}\n", *s as u8))
            .collect();
        let mut inner = self.inner.lock().unwrap();
        inner.file.write_all(text.as_bytes())?;
        inner.len += text.len() as u64;
        drop(inner);
        self.appended.notify_waiters();
        Ok(())
    }

    /// Statuses not yet acknowledged (at most [`MAX_BATCH`] of them, from
    /// up to a chunk of the file), and the offset to acknowledge once the
    /// hub has them. Lines that do not parse (a torn write) are passed over
    /// and count as read, so they can never hold the reporter up.
    pub fn unsent(&self) -> std::io::Result<(Vec<(u64, Status)>, u64)> {
        let (items, start, end) = {
            let inner = self.inner.lock().unwrap();
            let start = inner.acked;
            let want = ((inner.len - start) as usize).min(READ_CHUNK);
            if want == 0 {
                return Ok((vec![], start));
            }
            let mut f = super::state_file::open(&self.path, OpenOptions::new().read(true))?;
            f.seek(SeekFrom::Start(start))?;
            let mut buf = vec![0; want];
            f.read_exact(&mut buf)?;
            let mut items = Vec::new();
            let mut end = start;
            for line in buf.split_inclusive(|b| *b == b'\n') {
                if !line.ends_with(b"\n") || items.len() == MAX_BATCH {
                    break;
                }
                end += line.len() as u64;
                let parsed = std::str::from_utf8(line).ok().and_then(|l| {
                    let (id, st) = l.trim_end().split_once(' ')?;
                    Some((id.parse().ok()?, Status::from_code(st.parse().ok()?)?))
                });
                items.extend(parsed);
            }
            (items, start, end)
        };
        if items.is_empty() && end > start {
            self.ack(end)?;
        }
        Ok((items, end))
    }

    /// The hub stored everything before `offset`.
    pub fn ack(&self, offset: u64) -> std::io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        inner.acked = inner.acked.max(offset);
        if inner.acked == inner.len && inner.len >= COMPACT_AT {
            inner.file.set_len(0)?;
            inner.len = 0;
            inner.acked = 0;
        }
        super::state_file::replace(&self.acked_path, inner.acked.to_string().as_bytes(), false)
    }

    /// Statuses waiting for the hub, in bytes of journal.
    pub fn backlog(&self) -> u64 {
        let inner = self.inner.lock().unwrap();
        inner.len - inner.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_from_the_last_ack_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let j = StatusJournal::open(dir.path()).unwrap();
        j.append(&[(1, Status::Added), (2, Status::AlreadyBanned)])
            .unwrap();
        let (items, end) = j.unsent().unwrap();
        assert_eq!(items, vec![(1, Status::Added), (2, Status::AlreadyBanned)]);
        j.ack(end).unwrap();
        j.append(&[(3, Status::Error)]).unwrap();
        drop(j);
        // A torn line at the end is dropped on open.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("statuses.log"))
            .unwrap();
        f.write_all(b"4 ").unwrap();
        let j = StatusJournal::open(dir.path()).unwrap();
        assert_eq!(j.unsent().unwrap().0, vec![(3, Status::Error)]);
    }

    #[test]
    fn batches_stay_under_the_hubs_limit_and_skip_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let j = StatusJournal::open(dir.path()).unwrap();
        let many: Vec<_> = (1..=MAX_BATCH as u64 + 10)
            .map(|id| (id, Status::Added))
            .collect();
        j.append(&many).unwrap();
        let (items, end) = j.unsent().unwrap();
        assert_eq!(items.len(), MAX_BATCH);
        j.ack(end).unwrap();
        assert_eq!(j.unsent().unwrap().0.len(), 10);
        drop(j);

        // A chunk of lines that do not parse is passed over, not resent forever.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("statuses.log"), "x y\n7 9\n").unwrap();
        let j = StatusJournal::open(dir.path()).unwrap();
        assert_eq!(j.unsent().unwrap().0, vec![]);
        assert_eq!(j.backlog(), 0);
    }
}
