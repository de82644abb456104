//! The spool: where `banmesh report` leaves a ban when the node is down,
//! and how the node takes it into its outbox.
//!
//! Contract:
//! - [`write`] returns only once the ban is durable: one file per ban in
//!   `DATA_DIR/spool`, written to a temp name, fsynced, renamed to
//!   `NANOS-PID.ban`, and the directory fsynced. fail2ban's action then
//!   exits 0: the ban is not lost although the node is not running.
//! - [`ingest`] takes spool files into the outbox oldest first and removes
//!   a file only once its report is durable there. The file's name goes
//!   into the outbox record, so a file seen again after a crash between
//!   the two steps is just removed, never queued twice.
//! - The name is this node's business only: [`strip`] clears it before a
//!   report goes on the wire.
//! - The node ingests at start, once its socket takes new reports, and
//!   then every [`TICK`] ([`run`]) for files spooled in between.
//!
//! A spool file holds records in the outbox's format
//! ([`super::outbox::encode`]).
use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};

use super::outbox::{Outbox, OutboxError, decode_records, encode};
use crate::{ban::Ban, proto, shutdown::Shutdown};

/// How often the node looks for newly spooled bans.
const TICK: Duration = Duration::from_secs(2);
/// Ending of a complete spool file (a temp file has `.ban.tmp`).
const SUFFIX: &str = ".ban";

/// `DATA_DIR/spool`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

/// Writes a ban into the node's spool, durably (fsync of file and dir).
pub fn write(data_dir: &Path, ban: &Ban) -> std::io::Result<PathBuf> {
    let dir = dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!("{:020}-{}{SUFFIX}", now.as_nanos(), std::process::id());
    let record = encode(&proto::Report {
        ban: Some(ban.to_proto()),
        reported_at_ms: now.as_millis() as i64,
        ..Default::default()
    });
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = super::state_file::create_tmp(&tmp)?;
    f.write_all(&record)?;
    f.sync_all()?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(path)
}

/// Takes spooled reports into the outbox, oldest first, and removes their
/// files; returns how many were taken. Blocking.
pub fn ingest(outbox: &Outbox, spool: &Path) -> Result<usize, OutboxError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OutboxError::Io { path, source }
    };
    let mut names: Vec<String> = match std::fs::read_dir(spool) {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(SUFFIX))
            .collect(),
        Err(_) => return Ok(0),
    };
    names.sort();
    let mut taken = 0;
    for name in names {
        let path = spool.join(&name);
        if !outbox.has_spooled(&name) {
            let bytes = match super::state_file::read(&path) {
                Ok(bytes) => bytes.unwrap_or_default(),
                // A link (or anything else unreadable) in the spool is not a
                // report `banmesh report` wrote: dropped, never followed.
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable spool entry removed");
                    std::fs::remove_file(&path).map_err(io(&path))?;
                    continue;
                }
            };
            let (records, skipped) = decode_records(&bytes);
            if skipped > 0 {
                warn!(file = %path.display(), skipped, "damaged spool file; kept what was intact");
            }
            for r in records {
                match Ban::from_proto(r.ban.as_ref()) {
                    Ok(ban) => {
                        outbox.append_spooled(&ban, &name)?;
                        taken += 1;
                    }
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "invalid spooled ban skipped")
                    }
                }
            }
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(taken)
}

/// Clears the spool file name from a report about to leave the node.
pub fn strip(report: &mut proto::Report) {
    report.spool.clear();
}

/// Logs what an ingest did. Not fatal: a full outbox must not keep the node
/// from starting and draining it; the next tick tries again.
pub fn log(result: Result<usize, OutboxError>) {
    match result {
        Ok(0) => {}
        Ok(taken) => info!(taken, "took spooled reports into the outbox"),
        Err(e) => warn!(error = %e, "cannot take spooled reports yet; trying again"),
    }
}

/// Ingests the spool every [`TICK`] until shutdown.
pub async fn run(outbox: Arc<Outbox>, spool: PathBuf, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.recv() => return,
        }
        let (o, s, span) = (outbox.clone(), spool.clone(), tracing::Span::current());
        match tokio::task::spawn_blocking(move || span.in_scope(|| ingest(&o, &s))).await {
            Ok(result) => log(result),
            Err(e) => warn!(error = %e, "spool ingest panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spooled_ban_is_taken_once_even_if_its_file_comes_back() {
        let tmp = tempfile::tempdir().unwrap();
        let ban = Ban::new("sshd", "tcp", "22", "192.0.2.8").unwrap();
        let file = write(tmp.path(), &ban).unwrap();
        let copy = std::fs::read(&file).unwrap();
        let (outbox, _) = Outbox::open(&tmp.path().join("node"), 10).unwrap();
        assert_eq!(ingest(&outbox, &dir(tmp.path())).unwrap(), 1);
        assert!(!file.exists());
        // As if the node crashed before removing the file.
        std::fs::write(&file, copy).unwrap();
        assert_eq!(ingest(&outbox, &dir(tmp.path())).unwrap(), 0);
        assert!(!file.exists());
        let mut pending = outbox.pending_after(0, 10);
        assert_eq!(pending.len(), 1);
        assert!(!pending[0].spool.is_empty());
        strip(&mut pending[0]);
        assert!(pending[0].spool.is_empty());
    }
}
