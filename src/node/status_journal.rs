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
//!
//! The acked mark is an append-only file of fixed-size records
//! ([`acked_mark`]): an acknowledgement is one 16-byte write
//! to a file held open, not a new file renamed over the old one (that
//! create + rename was 17% of a node's CPU per applied ban, issue 19). The
//! last whole, valid record wins at open; a torn or damaged one counts for
//! nothing, so the mark read can only be an earlier one (more re-sent),
//! never a later one. The file is rewritten whole only when it holds
//! [`acked_mark::REWRITE_AT`] records, or the journal is truncated.
use super::acked_mark;

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::Mutex,
};

use self::acked_mark::AckedMark;

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
    /// `statuses.log`, open to append and to read at an offset.
    file: File,
    len: u64,
    acked: u64,
    mark: AckedMark,
}

/// The journal of statuses not yet stored by the hub (`DIR/statuses.log` and its acked offset).
pub struct StatusJournal {
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
        let (mut mark, mut acked) = AckedMark::open(acked_path)?;
        if acked > len {
            // A mark past the end is from before the journal was emptied
            // (an earlier version emptied it first): all of it is unsent.
            mark.set(0, true)?;
            acked = 0;
        }
        Ok(StatusJournal {
            inner: Mutex::new(Inner {
                file,
                len,
                acked,
                mark,
            }),
            appended: Notify::new(),
        })
    }

    /// Journals statuses (one write).
    pub fn append(&self, items: &[(u64, Status)]) -> std::io::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(items.len() * 12);
        for (id, s) in items {
            let _ = writeln!(text, "{id} {}", *s as u8);
        }
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
            // Read at the offset on the handle already open (no open per batch).
            let mut buf = vec![0; want];
            inner.file.read_exact_at(&mut buf, start)?;
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
        let inner = &mut *inner;
        if offset <= inner.acked {
            return Ok(());
        }
        inner.acked = offset;
        if inner.acked == inner.len && inner.len >= COMPACT_AT {
            // The mark goes back to 0 before the journal is emptied: a
            // crash between the two re-sends the whole journal (harmless),
            // never skips new statuses.
            inner.mark.set(0, true)?;
            inner.file.set_len(0)?;
            inner.len = 0;
            inner.acked = 0;
            return Ok(());
        }
        inner.mark.set(inner.acked, false)
    }

    /// Whether statuses were written past `offset` (the end of a batch
    /// just read: more than one call holds are waiting).
    pub fn written_past(&self, offset: u64) -> bool {
        self.inner.lock().unwrap().len > offset
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
        // The reporter sends the rest at once rather than after its interval.
        assert!(j.written_past(end));
        j.ack(end).unwrap();
        let (rest, end) = j.unsent().unwrap();
        assert_eq!(rest.len(), 10);
        assert!(!j.written_past(end));
        drop(j);

        // A chunk of lines that do not parse is passed over, not resent forever.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("statuses.log"), "x y\n7 9\n").unwrap();
        let j = StatusJournal::open(dir.path()).unwrap();
        assert_eq!(j.unsent().unwrap().0, vec![]);
        assert_eq!(j.backlog(), 0);
    }

    #[test]
    fn a_mark_past_the_journals_end_resends_it_all() {
        // An earlier version emptied the journal before it wrote the mark:
        // a crash between the two left a mark past the end.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("statuses.log"), "5 1\n6 2\n").unwrap();
        std::fs::write(dir.path().join("statuses.acked"), "1048576").unwrap();
        let j = StatusJournal::open(dir.path()).unwrap();
        assert_eq!(
            j.unsent().unwrap().0,
            vec![(5, Status::Added), (6, Status::AlreadyBanned)]
        );
        drop(j);
        assert_eq!(StatusJournal::open(dir.path()).unwrap().backlog(), 8);
    }
}
