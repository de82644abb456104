//! `shared.log`: the one file where bans from the fleet meet fail2ban.
//!
//! Contract:
//! - One line per applied ban, written by [`SharedLog`] in one `write` per
//!   batch, stamped with the ban's own time so that fail2ban's ban from the
//!   line ends when the original ban would have.
//! - Every line matches [`failregex`], the `shared` filter that
//!   `banmesh node setup-fail2ban` writes: both come from the constants
//!   below, so the writer and the filter cannot drift apart.
//! - Every line carries its event id (`banmesh[ID]`), so the log itself
//!   records how far the node got: [`last_logged_id`] reads it back at
//!   start, and the node never writes a line twice after a crash between
//!   the write and saving its position.
//! - One event is one line: a control character in any field (a newline
//!   would start a second line the filter bans from) is written as `?`.
//!   Fields are checked where they enter ([`crate::ban`]); this is the
//!   writer's own guarantee.
//!
//! ```text
//! 2026-11-25 12:26:09 +0000 banmesh[42]: 192.0.2.7: reported by web-1 (jail sshd, tcp/22)
//! ```
use std::{
    fs::OpenOptions,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

use crate::ban::Event;

/// A timestamp fail2ban's date detector reads (UTC, offset written out).
const STAMP: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second] +0000");
/// Opens the tag carrying the event id, `banmesh[ID]`.
const TAG_OPEN: &str = " banmesh[";
/// Closes the tag; the IP follows.
const TAG_CLOSE: &str = "]: ";
/// Between the IP and the reporter: what the filter keys on.
const REPORTED_BY: &str = ": reported by ";
/// How much of the log's end is read to find the last applied id.
const TAIL: u64 = 64 * 1024;
/// How often the path is checked for a rotated file.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// The `failregex` of fail2ban's `shared` filter: `: <HOST>: reported by .*`.
pub fn failregex() -> String {
    format!(": <HOST>{REPORTED_BY}.*")
}

/// The line written for a ban, stamped `at`: always exactly one line.
pub fn line(event: &Event, at: OffsetDateTime) -> String {
    let b = &event.ban;
    format!(
        "{}{TAG_OPEN}{}{TAG_CLOSE}{}{REPORTED_BY}{} (jail {}, {}/{})\n",
        at.format(STAMP).unwrap_or_default(),
        event.id,
        one_line(&b.ip),
        one_line(&event.added_by),
        one_line(&b.jail),
        one_line(&b.protocol),
        one_line(&b.port)
    )
}

/// `s` with every control character (newline, CR, NUL, escape...) as `?`.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// What a line says: the event id and the banned IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged<'a> {
    pub id: u64,
    pub ip: &'a str,
}

/// Reads one line back; `None` for anything banmesh did not write whole.
pub fn parse(line: &str) -> Option<Logged<'_>> {
    let rest = &line[line.find(TAG_OPEN)? + TAG_OPEN.len()..];
    let (id, rest) = rest.split_once(TAG_CLOSE)?;
    let (ip, _) = rest.split_once(REPORTED_BY)?;
    Some(Logged {
        id: id.parse().ok()?,
        ip,
    })
}

/// The id in a line's tag, even if the line was torn after it: the id was
/// written, so the node does not write that event again.
fn logged_id(line: &str) -> Option<u64> {
    let rest = &line[line.find(TAG_OPEN)? + TAG_OPEN.len()..];
    rest[..rest.find(']')?].parse().ok()
}

/// The highest event id in the last lines of a shared log (0 if none).
pub fn last_logged_id(path: &Path) -> std::io::Result<u64> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail)
        .lines()
        .filter_map(logged_id)
        .max()
        .unwrap_or(0))
}

/// `shared.log`, kept open between batches. Reopened when the path stops
/// naming the open file (logrotate moved it) and after any write error.
pub struct SharedLog {
    path: PathBuf,
    file: Option<(std::fs::File, u64)>,
    checked: Instant,
}

impl SharedLog {
    pub fn new(path: PathBuf) -> Self {
        SharedLog {
            path,
            file: None,
            checked: Instant::now(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line per ban, in one write, each stamped with the ban's
    /// own time (from the hub).
    pub fn append(&mut self, events: &[&Event]) -> std::io::Result<()> {
        let text: String = events
            .iter()
            .map(|e| {
                let at =
                    OffsetDateTime::from_unix_timestamp_nanos(e.created_ms as i128 * 1_000_000)
                        .unwrap_or_else(|_| OffsetDateTime::now_utc());
                line(e, at)
            })
            .collect();
        self.write(text.as_bytes())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if self.checked.elapsed() >= ROTATION_CHECK {
            self.checked = Instant::now();
            let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
            if current != self.file.as_ref().map(|(_, ino)| *ino) {
                self.file = None;
            }
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let ino = f.metadata()?.ino();
            self.file = Some((f, ino));
        }
        let result = self
            .file
            .as_mut()
            .map_or(Ok(()), |(f, _)| f.write_all(bytes));
        if result.is_err() {
            self.file = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ban::{Ban, EventKind};

    fn event(id: u64, ip: &str) -> Event {
        Event {
            id,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            added_by: "web-1".into(),
            created_ms: 1_764_073_569_000,
            lifts: 0,
        }
    }

    #[test]
    fn a_line_reads_back_and_matches_the_filter() {
        let l = line(
            &event(42, "192.0.2.7"),
            OffsetDateTime::from_unix_timestamp(1_764_073_569).unwrap(),
        );
        assert_eq!(
            l,
            "2025-11-25 12:26:09 +0000 banmesh[42]: 192.0.2.7: reported by web-1 (jail sshd, tcp/22)\n"
        );
        assert_eq!(
            parse(l.trim_end()),
            Some(Logged {
                id: 42,
                ip: "192.0.2.7"
            })
        );
        assert_eq!(failregex(), ": <HOST>: reported by .*");
        // fail2ban's <HOST> stands for the IP: the filter with the IP put in
        // is a literal prefix of what follows the tag.
        let filter = failregex().replace("<HOST>", "192.0.2.7");
        let literal = filter.trim_end_matches(".*");
        assert!(l.contains(literal), "{l:?} does not match {filter:?}");
        assert_eq!(parse("2025-11-25 12:26:09 +0000 sshd[1]: other"), None);
    }

    #[test]
    fn the_tail_gives_the_last_id_even_of_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.log");
        assert_eq!(last_logged_id(&path).unwrap(), 0);
        let mut log = SharedLog::new(path.clone());
        log.append(&[&event(7, "192.0.2.9"), &event(12, "192.0.2.10")])
            .unwrap();
        assert_eq!(last_logged_id(&path).unwrap(), 12);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"2025-11-25 12:26:09 +0000 banmesh[13]: 192.0")
            .unwrap();
        assert_eq!(last_logged_id(&path).unwrap(), 13);
    }

    #[test]
    fn a_control_character_never_starts_a_line() {
        let mut e = event(5, "192.0.2.5");
        e.added_by =
            "x\n2025-11-25 12:26:09 +0000 banmesh[999999]: 198.51.100.66: reported by y\r".into();
        let l = line(
            &e,
            OffsetDateTime::from_unix_timestamp(1_764_073_569).unwrap(),
        );
        assert_eq!(l.matches('\n').count(), 1, "{l:?}");
        assert!(l.ends_with('\n') && !l.contains('\r'));
        assert_eq!(parse(l.trim_end()).map(|l| l.ip), Some("192.0.2.5"));
    }
}
