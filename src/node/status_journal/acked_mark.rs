//! The status journal's acked mark on disk: an append-only file of
//! fixed-size records, each the offset the hub has stored up to.
//!
//! Contract:
//! - [`AckedMark::set`] is one 16-byte `write` to a file held open
//!   (`O_APPEND`), no create, no rename: the cost of an acknowledgement no
//!   longer depends on the file system's create/rename path.
//! - A record is the offset (u64, little-endian) and its complement with
//!   [`CHECK`]: a torn record (fewer than 16 bytes at the end) or a damaged
//!   one (a power loss can leave zeros) is not taken. Marks only grow, so
//!   the last valid record is the highest one written and whole; passing
//!   over a damaged one yields an earlier mark: more statuses re-sent, the
//!   hub's upsert makes that harmless. Never a later mark than written.
//! - The file is rewritten whole (through [`crate::node::state_file::replace`]:
//!   a fresh temporary file and a rename, no symbolic links followed) at
//!   open when it is not exactly one valid record, when the journal is
//!   truncated (the mark goes back to 0), and once it holds [`REWRITE_AT`]
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

impl AckedMark {
    /// Opens (or creates) the mark at `path`; returns it and the mark read.
    pub fn open(path: PathBuf) -> std::io::Result<(Self, u64)> {
        let bytes = crate::node::state_file::read(&path)?.unwrap_or_default();
        let (offset, clean) = parse(&bytes);
        if !clean {
            crate::node::state_file::replace(&path, &record(offset), false)?;
        }
        let file = Self::append_handle(&path)?;
        Ok((
            AckedMark {
                path,
                file,
                records: 1,
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
            crate::node::state_file::replace(&self.path, &record(offset), false)?;
            // The rename put a new file at the path: append to that one.
            self.file = Self::append_handle(&self.path)?;
            self.records = 1;
            return Ok(());
        }
        self.file.write_all(&record(offset))?;
        self.records += 1;
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
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * RECORD as u64);
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
