//! Applying the hub's events on this host: what `readdb.py` did.
//!
//! A ban becomes one line in `shared.log`, the log of fail2ban's `shared`
//! jail, in a form its filter (`failregex = : <HOST>: reported by .*`)
//! matches, after a timestamp fail2ban's date detector reads:
//!
//! ```text
//! 2026-11-25 12:26:09 +0000 banmesh[42]: 192.0.2.7: reported by web-1 (jail sshd, tcp/22)
//! ```
//!
//! The `banmesh[ID]` tag carries the event id, so the log itself records
//! how far this node got: after a crash the node resumes from the highest id
//! in the log's tail and never writes a line twice. A batch of events is
//! one `write` call, so a line is never half-written by us.
use std::{
    fs::OpenOptions,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

use crate::ban::{Event, EventKind, Status};

const STAMP: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second] +0000");
/// How much of the log's end is read to find the last applied id.
const TAIL: u64 = 64 * 1024;

/// The line written for a ban.
pub fn line(event: &Event, now: OffsetDateTime) -> String {
    let b = &event.ban;
    format!(
        "{} banmesh[{}]: {}: reported by {} (jail {}, {}/{})\n",
        now.format(STAMP).unwrap_or_default(),
        event.id,
        b.ip,
        event.added_by,
        b.jail,
        b.protocol,
        b.port
    )
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
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok();
    Ok(tail
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(" banmesh[")? + 9..];
            rest[..rest.find(']')?].parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0))
}

/// Writes bans into `shared.log` and says what each event's status is.
pub struct Applier {
    shared_log: PathBuf,
}

impl Applier {
    pub fn new(shared_log: PathBuf) -> Self {
        Applier { shared_log }
    }

    pub fn shared_log(&self) -> &Path {
        &self.shared_log
    }

    /// Applies a batch in order; one status per ban event. Blocking.
    pub fn apply(&self, events: &[Event]) -> Vec<(u64, Status)> {
        let now = OffsetDateTime::now_utc();
        let bans: Vec<&Event> = events.iter().filter(|e| e.kind == EventKind::Ban).collect();
        if bans.is_empty() {
            return vec![];
        }
        let text: String = bans.iter().map(|e| line(e, now)).collect();
        let status = match self.append(text.as_bytes()) {
            Ok(()) => Status::Added,
            Err(e) => {
                tracing::error!(path = %self.shared_log.display(), error = %e, "cannot write shared log");
                Status::Error
            }
        };
        bans.iter().map(|e| (e.id, status)).collect()
    }

    fn append(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.shared_log)?;
        f.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ban::Ban;

    #[test]
    fn lines_carry_ids_and_resume_finds_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("shared.log");
        assert_eq!(last_logged_id(&log).unwrap(), 0);
        let a = Applier::new(log.clone());
        let ev = |id| Event {
            id,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", "192.0.2.9").unwrap(),
            added_by: "web-1".into(),
            created_ms: 0,
            lifts: 0,
        };
        let st = a.apply(&[ev(7), ev(12)]);
        assert_eq!(st, vec![(7, Status::Added), (12, Status::Added)]);
        assert_eq!(last_logged_id(&log).unwrap(), 12);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("banmesh[7]: 192.0.2.9: reported by web-1 (jail sshd, tcp/22)\n"));
    }
}
