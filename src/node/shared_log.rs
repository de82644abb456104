//! `shared.log`: the one file where bans from the fleet meet fail2ban.
//!
//! Contract:
//! - One line per applied ban, written by [`SharedLog`] in one `write` per
//!   batch, stamped with the ban's own time so that fail2ban's ban from the
//!   line ends when the original ban would have.
//! - Every line matches [`failregex`], the `shared` filter that
//!   `banmesh node setup-fail2ban` writes: both come from the constants
//!   below, so the writer and the filter cannot drift apart.
//! - Every line carries its event id (`banmesh[ID]`): [`written_tail`]
//!   reads the ids and IPs back at start, so the node never writes a line
//!   twice after a crash between the write and saving its position (see
//!   [`super::position`] for why a tag is never taken as the position).
//! - One event is one line: a control character in any field (a newline
//!   would start a second line the filter bans from) is written as `?`.
//!   Fields are checked where they enter ([`crate::ban`]); this is the
//!   writer's own guarantee.
//! - The file is opened without following a symbolic link, and created
//!   readable by root only ([`super::state_file`]).
//!
//! ```text
//! 2026-11-25 12:26:09 +0000 banmesh[42]: 192.0.2.7: reported by web-1 (jail sshd, tcp/22)
//! ```
use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

use super::state_file;
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
/// How much of the log's end is read first to find the lines written
/// after the saved position; doubled until it reaches a line at or below
/// it, up to [`MAX_TAIL`].
const TAIL: u64 = 64 * 1024;
/// Most of the log read back at start (~180,000 lines: far more than the
/// events applied between two saves of the position).
const MAX_TAIL: u64 = 16 * 1024 * 1024;
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
    /// The hub's event id the line was written for.
    pub id: u64,
    /// The banned address, as written.
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

/// The event id and IP of every whole line with an id above `after` at
/// the end of a shared log (empty if there is none; a symbolic link is an
/// error). The end read grows from [`TAIL`] until it holds a line at or
/// below `after` (or the whole file, or [`MAX_TAIL`]). A line torn before
/// its IP ended names no IP and is written again: torn, it banned nothing.
pub fn written_tail(path: &Path, after: u64) -> std::io::Result<HashMap<u64, String>> {
    let mut f = match state_file::open_shared(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut size = TAIL;
    loop {
        let start = len.saturating_sub(size);
        f.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail);
        let lines: Vec<Logged> = text.lines().filter_map(parse).collect();
        let reached = lines.iter().any(|l| l.id <= after);
        if reached || start == 0 || size >= MAX_TAIL {
            return Ok(lines
                .into_iter()
                .filter(|l| l.id > after)
                .map(|l| (l.id, l.ip.to_string()))
                .collect());
        }
        size *= 2;
    }
}

/// `shared.log`, kept open between batches. Reopened when the path stops
/// naming the open file (logrotate moved it) and after any write error.
pub struct SharedLog {
    path: PathBuf,
    file: Option<(std::fs::File, u64)>,
    checked: Instant,
}

impl SharedLog {
    /// The log at `path`; it is opened (and created) on the first write.
    pub fn new(path: PathBuf) -> Self {
        SharedLog {
            path,
            file: None,
            checked: Instant::now(),
        }
    }

    /// The log's path, as configured.
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
            let current = std::fs::symlink_metadata(&self.path).map(|m| m.ino()).ok();
            if current != self.file.as_ref().map(|(_, ino)| *ino) {
                self.file = None;
            }
        }
        if self.file.is_none() {
            let f =
                state_file::open_shared(&self.path, OpenOptions::new().create(true).append(true))?;
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
            term: Default::default(),
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
    fn the_tail_gives_ids_and_ips_of_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.log");
        assert!(written_tail(&path, 0).unwrap().is_empty());
        let mut log = SharedLog::new(path.clone());
        log.append(&[&event(7, "192.0.2.9"), &event(12, "192.0.2.10")])
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"2025-11-25 12:26:09 +0000 banmesh[13]: 192.0")
            .unwrap();
        assert_eq!(
            written_tail(&path, 0).unwrap(),
            HashMap::from([(7, "192.0.2.9".into()), (12, "192.0.2.10".into())])
        );
        assert_eq!(
            written_tail(&path, 7).unwrap(),
            HashMap::from([(12, "192.0.2.10".into())])
        );
    }

    #[test]
    fn the_tail_reaches_back_to_the_saved_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.log");
        let mut log = SharedLog::new(path.clone());
        let events: Vec<Event> = (1..=3000).map(|id| event(id, "192.0.2.1")).collect();
        log.append(&events.iter().collect::<Vec<_>>()).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 2 * TAIL);
        let after = written_tail(&path, 10).unwrap();
        assert_eq!(after.len(), 2990);
        assert_eq!(written_tail(&path, 0).unwrap().len(), 3000);
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

    #[test]
    fn a_link_at_the_path_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("passwd");
        std::fs::write(&target, "root:x:0:0\n").unwrap();
        let path = dir.path().join("shared.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = SharedLog::new(path.clone())
            .append(&[&event(1, "192.0.2.1")])
            .unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert!(written_tail(&path, 0).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "root:x:0:0\n");
    }
}
