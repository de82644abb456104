//! Failures, from fail2ban's own log.
//!
//! fail2ban's filters and its `ignoreip` stay the single source of truth:
//! for each failure a filter matches, fail2ban 1.0.2 logs (at its default
//! level, `server/filter.py` `processLineAndAdd`)
//!
//! ```text
//! 2026-11-26 09:31:41,661 fail2ban.filter         [18707]: INFO    [login] Found 192.0.2.7 - 2026-11-26 09:31:41
//! ```
//!
//! and for an address in the jail's ignore list `[login] Ignore IP by ip`
//! instead (checked before `Found` is logged), so ignored addresses never
//! become signals. The node asks fail2ban where it logs (`get logtarget`),
//! follows that file from its end (history is never replayed: those
//! failures were counted, or not, when they happened), across rotation
//! (a new inode at the path: the old file is read to its end first) and
//! truncation (`copytruncate`: a file shorter than what was read), and
//! turns each `Found` into a [`Signal::Failure`].
//!
//! The parser is strict on purpose: a `WARNING` line can quote a log line
//! an attacker wrote (`Found a match but no valid date/time found for
//! '...'`), so only a line whose header is fail2ban's filter logger at
//! `INFO` and whose message is exactly `[JAIL] Found IP - DATE` counts.
use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use tracing::{debug, info, warn};

use super::{Signal, Signals};
use crate::{ban::parse_ip, fail2ban::Fail2ban, shutdown::Shutdown};

/// How often the log is read for new lines.
pub const POLL: Duration = Duration::from_millis(50);
/// Jails whose failures are not this host's own observations: `shared`
/// holds bans from the rest of the fleet, and `banmesh-*` names the hub's
/// own fleet jails (`banmesh-fleet`, `banmesh-portscan`). `recidive`
/// matches fail2ban's own `Ban` lines, the `shared` jail's among them: each
/// fleet ban would come back as one failure per host.
pub fn own_jail(jail: &str) -> bool {
    jail == "shared" || jail == "recidive" || jail.starts_with("banmesh-")
}
/// A line longer than this is not one of fail2ban's `Found` lines; it is
/// skipped rather than buffered.
const MAX_LINE: usize = 16 * 1024;
/// How long to wait before asking fail2ban again for its log target.
const RETRY: Duration = Duration::from_secs(5);

/// The jail and address of a `[JAIL] Found IP - DATE` line of fail2ban's
/// filter at `INFO`; `None` for any other line (never panics on bytes).
pub fn parse_found(line: &[u8]) -> Option<(&str, IpAddr)> {
    let line = std::str::from_utf8(line)
        .ok()?
        .trim_end_matches(['\r', '\n']);
    // The header: `DATE TIME fail2ban.filter <pad>[PID]: ` comes before any
    // text a log line could carry.
    let (header, message) = line.split_once("]: ")?;
    if !header.contains(" fail2ban.filter ") {
        return None;
    }
    let message = message.strip_prefix("INFO")?.trim_start_matches(' ');
    let rest = message.strip_prefix('[')?;
    let (jail, rest) = rest.split_once("] Found ")?;
    if jail.is_empty() || jail.contains([' ', '[', ']']) {
        return None;
    }
    let (ip, when) = rest.split_once(" - ")?;
    // `Found IP - 2026-11-26 09:31:41`; anything else (the observer's
    // `Found IP, bad - ...`) is not a filter match.
    let date_shaped = when.len() == 19
        && when
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b':' | b' '));
    if !date_shaped {
        return None;
    }
    Some((jail, parse_ip(ip).filter(|_| !ip.contains(' '))?))
}

/// Reads a file's new lines as it grows, across rotation and truncation.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    file: Option<(File, u64)>,
    offset: u64,
    partial: Vec<u8>,
    skipping: bool,
}

impl Follower {
    /// Follows `path` from its current end (or from its start once it
    /// appears, if it does not exist yet).
    pub fn at_end(path: &Path) -> Follower {
        let mut f = Follower {
            path: path.to_path_buf(),
            file: None,
            offset: 0,
            partial: Vec::new(),
            skipping: false,
        };
        if let Ok(file) = File::open(path)
            && let Ok(meta) = file.metadata()
        {
            f.offset = meta.len();
            f.file = Some((file, meta.ino()));
        }
        f
    }

    /// The file followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The complete lines written since the last call (without their `\n`).
    pub fn poll(&mut self) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        if let Some((file, ino)) = &mut self.file {
            let ino = *ino;
            // Truncated in place: start again from its beginning.
            if file.metadata().is_ok_and(|m| m.len() < self.offset) {
                debug!(path = %self.path.display(), "log truncated; reading from its start");
                self.offset = 0;
                self.partial.clear();
            }
            self.read_from_current(&mut lines);
            // Rotated: the path now names another file (or none yet). The
            // old file was read to its end above; the new one is read whole.
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != ino => {
                    debug!(path = %self.path.display(), "log rotated; following the new file");
                    self.file = None;
                    self.partial.clear();
                }
                _ => {}
            }
        }
        if self.file.is_none()
            && let Ok(file) = File::open(&self.path)
            && let Ok(meta) = file.metadata()
        {
            self.file = Some((file, meta.ino()));
            self.offset = 0;
            self.read_from_current(&mut lines);
        }
        lines
    }

    fn read_from_current(&mut self, lines: &mut Vec<Vec<u8>>) {
        let Some((file, _)) = &mut self.file else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let n = match file.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.offset += n as u64;
            for piece in chunk[..n].split_inclusive(|&b| b == b'\n') {
                let complete = piece.ends_with(b"\n");
                if !self.skipping {
                    self.partial.extend_from_slice(piece);
                }
                if self.partial.len() > MAX_LINE {
                    self.partial.clear();
                    self.skipping = true;
                }
                if complete {
                    if !self.skipping {
                        self.partial.pop();
                        lines.push(std::mem::take(&mut self.partial));
                    }
                    self.skipping = false;
                }
            }
        }
    }
}

/// Where fail2ban logs, if it logs to a file (`get logtarget`); `None`
/// for `SYSLOG`, `STDOUT`, `SYSTEMD-JOURNAL` and the like.
pub async fn log_file(
    fail2ban: &mut Fail2ban,
) -> Result<Option<PathBuf>, crate::fail2ban::Fail2banError> {
    let target = fail2ban.log_target().await?;
    Ok(target.starts_with('/').then(|| PathBuf::from(target)))
}

/// Follows fail2ban's log and offers a failure signal per `Found` line
/// until `shutdown`. Asks fail2ban for the log's path (again after a
/// failure, every [`RETRY`]); a log target that is not a file turns
/// failure signals off with one warning.
pub async fn run(socket: PathBuf, signals: Signals, mut shutdown: Shutdown) {
    let mut fail2ban = Fail2ban::new(&socket);
    let mut warned = false;
    let path = loop {
        match log_file(&mut fail2ban).await {
            Ok(Some(path)) => break path,
            Ok(None) => {
                warn!(
                    "fail2ban does not log to a file (its logtarget); failure signals are off: set logtarget to a file in fail2ban.local"
                );
                return;
            }
            Err(e) => {
                if !warned {
                    warn!(error = %e, "cannot ask fail2ban where it logs; failure signals wait for it");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
    };
    fail2ban.close().await;
    // Reading and parsing run on a blocking thread of their own: a flood of
    // log lines costs CPU, never a turn of the runtime the ban path's
    // tasks (publisher, subscriber, apply) run on.
    let span = tracing::Span::current();
    let follow =
        tokio::task::spawn_blocking(move || span.in_scope(|| follow(&path, &signals, &shutdown)));
    if let Err(e) = follow.await {
        warn!(error = %e, "fail2ban log follower failed; failure signals are off");
    }
}

/// The follower's loop: every [`POLL`], the new lines, until `shutdown`.
fn follow(path: &Path, signals: &Signals, shutdown: &Shutdown) {
    info!(log = %path.display(), "following fail2ban's log for failures");
    let mut follower = Follower::at_end(path);
    while !shutdown.is_shutdown() {
        for line in follower.poll() {
            if let Some((jail, ip)) = parse_found(&line)
                && !own_jail(jail)
            {
                signals.offer(&Signal::Failure {
                    ip,
                    jail: jail.to_string(),
                    at_ms: crate::clock::now_ms(),
                });
            }
        }
        std::thread::sleep(POLL);
    }
    debug!("fail2ban log follower stopped");
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    // Lines as fail2ban 1.0.2 wrote them on this machine.
    const FOUND4: &str = "2026-11-26 09:31:41,661 fail2ban.filter         [18707]: INFO    [login] Found 192.0.2.7 - 2026-11-26 09:31:41";
    const FOUND6: &str = "2026-11-26 09:31:41,662 fail2ban.filter         [18707]: INFO    [login] Found 2001:db8::7 - 2026-11-26 09:31:41";
    const IGNORED: &str = "2026-11-26 09:31:41,662 fail2ban.filter         [18707]: INFO    [login] Ignore 198.51.100.9 by ip";
    const OTHER: &str = "2026-11-26 09:31:39,563 fail2ban.filter         [18707]: INFO    Added logfile: '/tmp/f2bsample/auth.log' (pos = 0, hash = )";

    #[test]
    fn reads_found_lines() {
        assert_eq!(
            parse_found(FOUND4.as_bytes()),
            Some(("login", "192.0.2.7".parse().unwrap()))
        );
        assert_eq!(
            parse_found(format!("{FOUND6}\r\n").as_bytes()),
            Some(("login", "2001:db8::7".parse().unwrap()))
        );
        // A v4-mapped address counts as the v4 address it is.
        let mapped = FOUND4.replace("192.0.2.7", "::ffff:192.0.2.7");
        assert_eq!(
            parse_found(mapped.as_bytes()).map(|f| f.1),
            Some("192.0.2.7".parse().unwrap())
        );
    }

    #[test]
    fn ignores_everything_else() {
        for line in [
            IGNORED,
            OTHER,
            "",
            "]: ",
            // The observer's line (bantime.increment): not a filter match.
            "2026-11-26 09:31:41,700 fail2ban.observer       [18707]: INFO    [login] Found 192.0.2.7, bad - 2026-11-26 09:31:41, 1 # -> 2026-11-26 10:31:41",
            // A warning quoting a line an attacker wrote.
            "2026-11-26 09:31:41,700 fail2ban.filter         [18707]: WARNING Found a match but no valid date/time found for 'x [sshd] Found 203.0.113.1 - 2026-11-26 09:31:41'",
            "2026-11-26 09:31:41,700 fail2ban.filter         [18707]: INFO    [login] Found not-an-ip - 2026-11-26 09:31:41",
            "2026-11-26 09:31:41,700 fail2ban.filter         [18707]: INFO    [login] Found 192.0.2.7 - 2026-11-26 09:31:41 and more",
            "2026-11-26 09:31:41,700 fail2ban.actions        [18707]: NOTICE  [login] Ban 192.0.2.7",
        ] {
            assert_eq!(parse_found(line.as_bytes()), None, "{line}");
        }
        assert_eq!(parse_found(b"\xff\xfe]: INFO [a] Found 1.2.3.4 - x"), None);
        for cut in 0..FOUND4.len() {
            let _ = parse_found(&FOUND4.as_bytes()[..cut]);
        }
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn follows_from_the_end_across_rotation_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("f2b.log");
        append(&log, "old line\n");
        let mut f = Follower::at_end(&log);
        assert!(f.poll().is_empty(), "history is not replayed");
        append(&log, "one\ntw");
        assert_eq!(f.poll(), vec![b"one".to_vec()]);
        append(&log, "o\n");
        assert_eq!(f.poll(), vec![b"two".to_vec()]);
        // logrotate's create mode: rename, then a new file.
        append(&log, "last of old\n");
        std::fs::rename(&log, dir.path().join("f2b.log.1")).unwrap();
        assert_eq!(f.poll(), vec![b"last of old".to_vec()]);
        append(&log, "first of new\n");
        assert_eq!(f.poll(), vec![b"first of new".to_vec()]);
        // copytruncate.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&log, "after\n");
        assert_eq!(f.poll(), vec![b"after".to_vec()]);
    }

    #[test]
    fn a_missing_log_is_read_from_its_start_when_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("f2b.log");
        let mut f = Follower::at_end(&log);
        assert!(f.poll().is_empty());
        append(&log, "hello\n");
        assert_eq!(f.poll(), vec![b"hello".to_vec()]);
    }

    #[test]
    fn an_endless_line_is_skipped_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("f2b.log");
        append(&log, "");
        let mut f = Follower::at_end(&log);
        append(&log, &"x".repeat(MAX_LINE * 3));
        assert!(f.poll().is_empty());
        append(&log, "\nnext\n");
        assert_eq!(f.poll(), vec![b"next".to_vec()]);
    }
}
