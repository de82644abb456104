//! A mark that only grows, on disk as an append-only file of fixed-size
//! records: the status journal's acked offset (`statuses.acked`), the
//! outbox's acked sequence number (`outbox.acked`) and the applied event id
//! (`applied`). Each was a new file renamed over the old one per save; that
//! create + rename was 17% (status journal), 7.4% (outbox) and 1.7-2.5%
//! (position) of a node's CPU per applied ban (issue 19).
//!
//! Contract ("offset" below is whichever value the mark holds):
//! - [`AckedMark::set`] is one 16-byte `write` to a file held open
//!   (`O_APPEND`), no create, no rename: the cost of an acknowledgement no
//!   longer depends on the file system's create/rename path.
//! - A record is the offset (u64, little-endian) and its complement with
//!   [`CHECK`]: a torn record (fewer than 16 bytes at the end) or a damaged
//!   one (a power loss can leave zeros) is not taken. Marks only grow, so
//!   the last valid record is the highest one written and whole; passing
//!   over a damaged one yields an earlier mark (more statuses or reports
//!   re-sent, more events re-applied: each user says why that is
//!   harmless), never a later mark than written. A user whose value goes
//!   back must say so (`rewrite` in [`AckedMark::set`]), or a torn record
//!   after it could bring back the higher one.
//! - Appends are not fsynced; [`AckedMark::sync`] makes the mark durable
//!   when a user needs it (the outbox, before it truncates its log).
//! - The file is rewritten whole (through [`crate::node::state_file::replace`]:
//!   a fresh temporary file and a rename, no symbolic links followed) at
//!   open when it is neither empty nor exactly one valid record, when the mark goes back
//!   (the journal truncated), and once it holds [`REWRITE_AT`]
//!   records (64 KiB), so it stays small and later appends stay aligned.
//! - A file written by an earlier version (the offset as decimal text) is
//!   read as such and rewritten in records.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
};

/// Bytes per record.
const RECORD: usize = 16;
/// XORed into the second half of a record: a record of zeros is invalid.
const CHECK: u64 = 0x6261_6e6d_6573_6861; // "banmesha"
/// Records after which the file is rewritten with one.
pub const REWRITE_AT: usize = 4096;

/// The acked mark's file, open for appends.
pub struct AckedMark {
    path: PathBuf,
    file: File,
    /// Records in the file.
    records: usize,
    /// Whether the file was replaced (renamed) since the last [`AckedMark::sync`].
    renamed: bool,
}

fn record(offset: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&offset.to_le_bytes());
    r[8..].copy_from_slice(&(offset ^ CHECK).to_le_bytes());
    r
}

/// The mark a file's bytes hold: the last valid whole record, else the
/// decimal text an earlier version wrote, else 0; and whether the file is
/// exactly one valid record (nothing to rewrite).
fn parse(bytes: &[u8]) -> (u64, bool) {
    let last_valid = bytes.chunks_exact(RECORD).rev().find_map(|r| {
        let offset = u64::from_le_bytes(r[..8].try_into().ok()?);
        let check = u64::from_le_bytes(r[8..].try_into().ok()?);
        (check == offset ^ CHECK).then_some(offset)
    });
    if let Some(offset) = last_valid {
        return (offset, bytes.len() == RECORD);
    }
    let legacy = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    (legacy.unwrap_or(0), false)
}

/// The mark stored at `path` (0 if there is none), read without opening
/// it for appends or rewriting it (a link at `path` is an error).
pub fn read(path: &std::path::Path) -> std::io::Result<u64> {
    Ok(parse(&crate::node::state_file::read(path)?.unwrap_or_default()).0)
}

impl AckedMark {
    /// Opens (or creates) the mark at `path`; returns it and the mark read.
    pub fn open(path: PathBuf) -> std::io::Result<(Self, u64)> {
        let bytes = crate::node::state_file::read(&path)?.unwrap_or_default();
        let (offset, clean) = parse(&bytes);
        // No file (or an empty one) reads as 0 already: nothing to write,
        // so a fresh node's first start renames nothing.
        let empty = bytes.is_empty();
        if !clean && !empty {
            crate::node::state_file::replace(&path, &record(offset), false)?;
        }
        let file = Self::append_handle(&path)?;
        Ok((
            AckedMark {
                path,
                file,
                records: usize::from(!empty),
                renamed: !clean && !empty,
            },
            offset,
        ))
    }

    fn append_handle(path: &std::path::Path) -> std::io::Result<File> {
        crate::node::state_file::open(path, OpenOptions::new().append(true).create(true))
    }

    /// Records `offset` as the mark: one append, or a rewrite of the whole
    /// file when `rewrite` is asked (the mark went back) or it is full.
    pub fn set(&mut self, offset: u64, rewrite: bool) -> std::io::Result<()> {
        if rewrite || self.records >= REWRITE_AT {
            // The new file's record is synced before the rename (once per
            // REWRITE_AT saves): a power loss then leaves the old file or
            // this one, never an empty one read as 0 (a full resend).
            crate::node::state_file::replace(&self.path, &record(offset), true)?;
            // The rename put a new file at the path: append to that one.
            self.file = Self::append_handle(&self.path)?;
            self.records = 1;
            self.renamed = true;
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&record(offset)) {
            // Part of a record may be in the file, and every record after
            // it would be read off its 16-byte grid: the next save
            // rewrites the file whole.
            self.records = REWRITE_AT;
            return Err(e);
        }
        self.records += 1;
        Ok(())
    }

    /// Makes the mark written last durable: `fdatasync` of the file, and of
    /// its directory when the file was replaced since (the rename).
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        if self.renamed {
            let dir = match self.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            File::open(dir)?.sync_all()?;
            self.renamed = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_whole_valid_record_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("statuses.acked");
        let (mut m, at) = AckedMark::open(path.clone()).unwrap();
        assert_eq!(at, 0);
        m.set(10, false).unwrap();
        m.set(25, false).unwrap();
        drop(m);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 * RECORD as u64,
            "a fresh mark starts empty (0) and takes appends"
        );
        // A torn record at the end, then zeros (a power loss): both passed over.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0; RECORD]).unwrap();
        f.write_all(&record(99)[..7]).unwrap();
        drop(f);
        let (mut m, at) = AckedMark::open(path.clone()).unwrap();
        assert_eq!(at, 25);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            RECORD as u64,
            "rewritten as one record, so appends stay aligned"
        );
        m.set(30, false).unwrap();
        assert_eq!(AckedMark::open(path.clone()).unwrap().1, 30);
    }

    #[test]
    fn an_earlier_versions_text_is_read_and_the_file_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("statuses.acked");
        std::fs::write(&path, "1234").unwrap();
        let (mut m, at) = AckedMark::open(path.clone()).unwrap();
        assert_eq!(at, 1234);
        for i in 0..(REWRITE_AT as u64 + 10) {
            m.set(2000 + i, false).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= (REWRITE_AT * RECORD) as u64);
        assert_eq!(
            AckedMark::open(path.clone()).unwrap().1,
            2000 + REWRITE_AT as u64 + 9
        );
        // Going back (the journal truncated) rewrites it.
        let (mut m, _) = AckedMark::open(path.clone()).unwrap();
        m.set(0, true).unwrap();
        assert_eq!(AckedMark::open(path).unwrap().1, 0);
    }
}
