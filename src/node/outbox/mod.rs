//! The node's durable outbox: every accepted report, on disk before
//! `banmesh report` returns, until the hub acknowledges its commit.
//!
//! Layout under the node's data dir:
//! - `outbox.log`: records in the format of [`record`] (`magic | len |
//!   crc32 | protobuf Report`). Appended and fsynced per report (one fsync
//!   shared by the reports that arrive during another's).
//! - `outbox.acked`: the highest acknowledged sequence number, an
//!   append-only [`AckedMark`] (one 16-byte write per save, no create or
//!   rename: the rename per ack batch was 7.4% of a node's CPU, issue 19).
//!   Written lazily and not fsynced: if it lags after a crash (the last
//!   saves lost, or a torn record passed over for the one before), the
//!   node re-sends a few reports and the hub, which knows (host, seq),
//!   acknowledges them as duplicates. It is never read as higher than
//!   written. It is made durable (fsync) before the log is truncated.
//!
//! On open, every intact record is kept; a torn or corrupted stretch is
//! skipped (the reader resynchronises on the next magic) and named in the
//! returned [`Recovery`], and the file is rewritten with only the intact
//! pending records. Once everything is acknowledged and the file has grown,
//! it is truncated, after the acked mark is durable.
//!
//! # Locks and the group fsync
//! An append writes its record under `inner` (the queue and the file's
//! end), releases it, and only then asks the [`sync`] thread for an fsync
//! up to its record and waits for it; the thread takes only its own lock,
//! never `inner`, so no order of locks can deadlock. No lock is held
//! across an `.await`: the write is one short `write` to the page cache,
//! made inline (from the local socket's handler too); only the wait for
//! the fsync is async ([`Outbox::append_async`]) or blocking
//! ([`Outbox::append`], for the spool and tests).
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use thiserror::Error;
use tokio::sync::Notify;

pub use self::record::{decode_records, encode};
use super::{acked_mark::AckedMark, state_file};
use crate::{ban::Ban, proto};

pub mod record;
pub mod sync;

/// Truncate the log once it is all acknowledged and at least this big.
const COMPACT_AT: u64 = 1 << 20;

/// Why the outbox refused a report or could not be opened.
#[derive(Debug, Error)]
pub enum OutboxError {
    /// Reading or writing the outbox's log failed: the report is not durable and was not accepted.
    #[error("outbox {path}: {source}")]
    Io {
        /// The outbox file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// As many reports as `--outbox-limit` wait for the hub (unreachable
    /// for long); new reports are refused until it acknowledges some.
    #[error(
        "outbox is full ({pending} reports waiting for the hub, limit {limit}); is the hub reachable?"
    )]
    Full {
        /// Reports waiting for the hub's acknowledgement.
        pending: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// What opening the outbox found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Intact records still waiting for the hub.
    pub pending: usize,
    /// Bytes skipped as torn or corrupted.
    pub skipped_bytes: usize,
}

struct Inner {
    /// Times the log was truncated: offsets are only comparable within one.
    truncations: u64,
    /// Spool files already taken into the outbox (see `super::spool`).
    spooled: std::collections::HashSet<String>,
    file: File,
    written: u64,
    pending: VecDeque<proto::Report>,
    next_seq: u64,
    acked: u64,
    acked_saved: u64,
    /// `outbox.acked`, open for appends.
    mark: AckedMark,
}

/// The outbox; cheap to share behind an `Arc`.
pub struct Outbox {
    dir: PathBuf,
    limit: usize,
    inner: Mutex<Inner>,
    /// Group fsync: one thread syncing a handle on the log; one fsync
    /// covers every report written before it (see [`sync`]).
    syncer: sync::Syncer,
    /// Woken once new reports are durable (by the sync thread), for the
    /// publisher.
    pub appended: std::sync::Arc<Notify>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ms() -> i64 {
    crate::clock::now_ms()
}

impl Outbox {
    fn log_path(&self) -> PathBuf {
        self.dir.join("outbox.log")
    }
    fn acked_path(&self) -> PathBuf {
        self.dir.join("outbox.acked")
    }

    /// Opens (or creates) the outbox in `dir`, holding at most `limit`
    /// unacknowledged reports.
    pub fn open(dir: &Path, limit: usize) -> Result<(Self, Recovery), OutboxError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let log = dir.join("outbox.log");
        let acked_file = dir.join("outbox.acked");
        // Reads a mark written by an earlier version (decimal text) too.
        let (mark, acked) = AckedMark::open(acked_file.clone()).map_err(io(&acked_file))?;
        let bytes = state_file::read(&log)
            .map_err(io(&log))?
            .unwrap_or_default();
        let (records, skipped) = decode_records(&bytes);
        let next_seq = records.iter().map(|r| r.seq).max().unwrap_or(0).max(acked) + 1;
        let spooled = records
            .iter()
            .filter(|r| !r.spool.is_empty())
            .map(|r| r.spool.clone())
            .collect();
        let pending: VecDeque<_> = records.into_iter().filter(|r| r.seq > acked).collect();
        if skipped > 0 {
            // Rewrite with only intact records, so the damage is gone for good.
            let tmp = dir.join("outbox.log.tmp");
            let mut f = state_file::create_tmp(&tmp).map_err(io(&tmp))?;
            for r in &pending {
                f.write_all(&encode(r)).map_err(io(&tmp))?;
            }
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &log).map_err(io(&log))?;
        }
        let file = state_file::open(&log, OpenOptions::new().create(true).append(true))
            .map_err(io(&log))?;
        let written = file.metadata().map_err(io(&log))?.len();
        let recovery = Recovery {
            pending: pending.len(),
            skipped_bytes: skipped,
        };
        let sync_handle = file.try_clone().map_err(io(&log))?;
        let appended = std::sync::Arc::new(Notify::new());
        let syncer =
            sync::Syncer::start(sync_handle, (0, written), appended.clone()).map_err(io(&log))?;
        let outbox = Outbox {
            dir: dir.to_path_buf(),
            limit,
            syncer,
            inner: Mutex::new(Inner {
                truncations: 0,
                spooled,
                file,
                written,
                pending,
                next_seq,
                acked,
                acked_saved: acked,
                mark,
            }),
            appended,
        };
        Ok((outbox, recovery))
    }

    /// Appends a report and fsyncs it; returns its sequence number.
    /// Blocking: the local socket uses [`Outbox::append_async`].
    pub fn append(&self, ban: &Ban) -> Result<u64, OutboxError> {
        self.append_from(ban, String::new())
    }

    /// Appends a report and waits for the group fsync that covers it;
    /// returns its sequence number. The write is made inline (one short
    /// `write` to the page cache, no thread hand-off); only the fsync is
    /// waited for.
    pub async fn append_async(&self, ban: &Ban) -> Result<u64, OutboxError> {
        let (seq, mark) = self.write(ban, String::new())?;
        self.syncer.request(mark);
        let synced = self.syncer.wait(mark).await;
        self.synced(seq, synced)
    }

    /// Appends a report `banmesh report` left in spool file `name` (see
    /// [`super::spool`]); the name is kept with the record, so the file is
    /// known as taken even after a crash before its removal. Blocking.
    pub fn append_spooled(&self, ban: &Ban, name: &str) -> Result<u64, OutboxError> {
        self.append_from(ban, name.to_string())
    }

    /// Whether the reports of spool file `name` are already in the outbox.
    pub fn has_spooled(&self, name: &str) -> bool {
        self.inner.lock().unwrap().spooled.contains(name)
    }

    fn append_from(&self, ban: &Ban, spool: String) -> Result<u64, OutboxError> {
        let (seq, mark) = self.write(ban, spool)?;
        self.syncer.request(mark);
        let synced = self.syncer.wait_blocking(mark);
        self.synced(seq, synced)
    }

    /// Writes a report's record (not yet synced) and queues it for the
    /// publisher; returns its sequence number and how far the log then
    /// reaches, for the fsync.
    fn write(&self, ban: &Ban, spool: String) -> Result<(u64, sync::Mark), OutboxError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.pending.len() >= self.limit {
            return Err(OutboxError::Full {
                pending: inner.pending.len(),
                limit: self.limit,
            });
        }
        let report = proto::Report {
            seq: inner.next_seq,
            ban: Some(ban.to_proto()),
            reported_at_ms: now_ms(),
            spool: spool.clone(),
        };
        let rec = encode(&report);
        let path = self.log_path();
        inner.file.write_all(&rec).map_err(io(&path))?;
        inner.written += rec.len() as u64;
        inner.next_seq += 1;
        if !spool.is_empty() {
            inner.spooled.insert(spool);
        }
        // Queued in order now; the caller hears back only once it is
        // durable (a report sent before its fsync is simply stored early).
        let seq = report.seq;
        inner.pending.push_back(report);
        Ok((seq, (inner.truncations, inner.written)))
    }

    /// The answer to a report once its fsync is done (the sync thread has
    /// woken the publisher by then).
    fn synced(&self, seq: u64, synced: Result<(), String>) -> Result<u64, OutboxError> {
        synced.map_err(|e| OutboxError::Io {
            path: self.log_path(),
            source: std::io::Error::other(e),
        })?;
        Ok(seq)
    }

    /// Appends many reports with one fsync (loading a benchmark's outboxes;
    /// a burst of reports could use it too). Blocking.
    pub fn append_batch(&self, bans: &[Ban]) -> Result<(), OutboxError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.pending.len() + bans.len() > self.limit {
            return Err(OutboxError::Full {
                pending: inner.pending.len(),
                limit: self.limit,
            });
        }
        let mut bytes = Vec::with_capacity(bans.len() * 64);
        for ban in bans {
            let report = proto::Report {
                seq: inner.next_seq,
                ban: Some(ban.to_proto()),
                reported_at_ms: now_ms(),
                spool: String::new(),
            };
            inner.next_seq += 1;
            bytes.extend_from_slice(&encode(&report));
            inner.pending.push_back(report);
        }
        let path = self.log_path();
        inner.file.write_all(&bytes).map_err(io(&path))?;
        inner.file.sync_data().map_err(io(&path))?;
        inner.written += bytes.len() as u64;
        drop(inner);
        self.appended.notify_waiters();
        Ok(())
    }

    /// Makes the next report's sequence at least `min`.
    pub fn raise_next_seq(&self, min: u64) {
        let mut inner = self.inner.lock().unwrap();
        if inner.next_seq < min {
            tracing::warn!(
                from = inner.next_seq,
                to = min,
                "the hub holds later reports from this node; numbering on from there"
            );
            inner.next_seq = min;
        }
    }

    /// Pending reports with a sequence above `after`, oldest first.
    pub fn pending_after(&self, after: u64, max: usize) -> Vec<proto::Report> {
        let inner = self.inner.lock().unwrap();
        inner
            .pending
            .iter()
            .filter(|r| r.seq > after)
            .take(max)
            .cloned()
            .collect()
    }

    /// Number of reports waiting for the hub.
    pub fn pending(&self) -> usize {
        self.inner.lock().unwrap().pending.len()
    }

    /// The limit given at open.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Drops every report up to `seq`: the hub has them durably.
    pub fn ack(&self, seq: u64) -> Result<(), OutboxError> {
        let mut inner = self.inner.lock().unwrap();
        inner.acked = inner.acked.max(seq);
        while inner.pending.front().is_some_and(|r| r.seq <= inner.acked) {
            inner.pending.pop_front();
        }
        if inner.pending.is_empty() && inner.written >= COMPACT_AT {
            self.save_acked(&mut inner, true)?;
            let path = self.log_path();
            inner.file.set_len(0).map_err(io(&path))?;
            inner.file.sync_all().map_err(io(&path))?;
            inner.written = 0;
            inner.truncations += 1;
        }
        Ok(())
    }

    /// Persists the acked mark (lazily: one append, no fsync).
    pub fn flush_acked(&self) -> Result<(), OutboxError> {
        let mut inner = self.inner.lock().unwrap();
        self.save_acked(&mut inner, false)
    }

    /// Appends the mark if it moved; `durable` then fsyncs it (before the
    /// log is truncated: the records it drops must never come back as
    /// unacknowledged, nor their sequence numbers be handed out again).
    fn save_acked(&self, inner: &mut Inner, durable: bool) -> Result<(), OutboxError> {
        let path = self.acked_path();
        if inner.acked != inner.acked_saved {
            // The acked sequence only grows: never a rewrite for going back.
            let acked = inner.acked;
            inner.mark.set(acked, false).map_err(io(&path))?;
            inner.acked_saved = acked;
        }
        if durable {
            inner.mark.sync().map_err(io(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{
        record::{HEADER, MAGIC},
        *,
    };

    fn ban(ip: &str) -> Ban {
        Ban::new("sshd", "tcp", "22", ip).unwrap()
    }

    #[test]
    fn survives_reopen_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(ob.append(&ban("192.0.2.1")).unwrap(), 1);
        assert_eq!(ob.append(&ban("192.0.2.2")).unwrap(), 2);
        ob.ack(1).unwrap();
        ob.flush_acked().unwrap();
        drop(ob);
        let (ob, rec) = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(
            rec,
            Recovery {
                pending: 1,
                skipped_bytes: 0
            }
        );
        let p = ob.pending_after(0, 10);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].ban.as_ref().unwrap().ip, "192.0.2.2");
        assert_eq!(ob.append(&ban("192.0.2.3")).unwrap(), 3);
    }

    #[test]
    fn skips_corruption_and_keeps_intact_records() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 100).unwrap();
        for i in 1..=3 {
            ob.append(&ban(&format!("192.0.2.{i}"))).unwrap();
        }
        drop(ob);
        let log = dir.path().join("outbox.log");
        let mut bytes = std::fs::read(&log).unwrap();
        let rec_len = bytes.len() / 3;
        bytes[rec_len + HEADER + 2] ^= 0xff; // corrupt the second payload
        bytes.extend_from_slice(&MAGIC[..]); // and a torn tail
        bytes.extend_from_slice(&[7, 0]);
        std::fs::write(&log, &bytes).unwrap();
        let (ob, rec) = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(rec.pending, 2);
        assert_eq!(rec.skipped_bytes, rec_len + 6);
        let ips: Vec<_> = ob
            .pending_after(0, 10)
            .into_iter()
            .map(|r| r.ban.unwrap().ip)
            .collect();
        assert_eq!(ips, ["192.0.2.1", "192.0.2.3"]);
        // A later append gets a fresh sequence number.
        assert_eq!(ob.append(&ban("192.0.2.4")).unwrap(), 4);
    }

    #[test]
    fn concurrent_reports_are_all_durable_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 10_000).unwrap();
        let ob = std::sync::Arc::new(ob);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ob = ob.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        ob.append(&ban(&format!("10.{t}.0.{i}"))).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seqs: Vec<u64> = ob.pending_after(0, 1000).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
        drop(ob);
        let (_, rec) = Outbox::open(dir.path(), 10_000).unwrap();
        assert_eq!(
            rec,
            Recovery {
                pending: 400,
                skipped_bytes: 0
            }
        );
    }

    #[test]
    fn concurrent_async_reports_share_fsyncs_and_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 10_000).unwrap();
        let ob = std::sync::Arc::new(ob);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let mut seqs: Vec<u64> = rt.block_on(async {
            let calls: Vec<_> = (0..200)
                .map(|i| {
                    let ob = ob.clone();
                    tokio::spawn(async move {
                        ob.append_async(&ban(&format!("10.1.{}.{}", i / 100, i % 100)))
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut seqs = Vec::new();
            for c in calls {
                seqs.push(c.await.unwrap());
            }
            seqs
        });
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        drop(ob);
        let (ob, rec) = Outbox::open(dir.path(), 10_000).unwrap();
        assert_eq!(rec.pending, 200);
        let logged: Vec<u64> = ob.pending_after(0, 1000).iter().map(|r| r.seq).collect();
        assert_eq!(logged, (1..=200).collect::<Vec<_>>(), "in sequence order");
    }

    #[test]
    fn appends_acks_and_batches_together_never_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 100_000).unwrap();
        let ob = std::sync::Arc::new(ob);
        let (done, finished) = std::sync::mpsc::channel();
        for t in 0..6 {
            let (ob, done) = (ob.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..40 {
                    let ip = format!("10.{t}.1.{i}");
                    match t % 3 {
                        0 => drop(ob.append(&ban(&ip)).unwrap()),
                        1 => ob.append_batch(&[ban(&ip), ban(&ip)]).unwrap(),
                        _ => {
                            let seq = ob.append_spooled(&ban(&ip), &format!("{t}-{i}.ban"));
                            ob.ack(seq.unwrap().saturating_sub(5)).unwrap();
                            ob.flush_acked().unwrap();
                        }
                    }
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..6 {
            finished
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("an outbox call deadlocked");
        }
    }

    #[test]
    fn the_acked_mark_is_appended_and_reads_an_earlier_versions_text() {
        let dir = tempfile::tempdir().unwrap();
        let acked = dir.path().join("outbox.acked");
        std::fs::write(&acked, "2").unwrap();
        let (ob, _) = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(
            ob.append(&ban("192.0.2.3")).unwrap(),
            3,
            "numbering goes on after 2"
        );
        ob.append(&ban("192.0.2.4")).unwrap();
        let len = || std::fs::metadata(&acked).unwrap().len();
        let before = len();
        ob.ack(3).unwrap();
        ob.flush_acked().unwrap();
        ob.ack(4).unwrap();
        ob.flush_acked().unwrap();
        assert_eq!(len(), before + 32, "one record appended per save");
        drop(ob);
        // A torn record (a crash mid-write) is passed over: an earlier mark, more re-sent.
        let mut f = OpenOptions::new().append(true).open(&acked).unwrap();
        f.write_all(&[9; 5]).unwrap();
        drop(f);
        let (ob, rec) = Outbox::open(dir.path(), 100).unwrap();
        assert_eq!(rec.pending, 0);
        assert_eq!(ob.append(&ban("192.0.2.5")).unwrap(), 5);
    }

    #[test]
    fn refuses_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), 1).unwrap();
        ob.append(&ban("192.0.2.1")).unwrap();
        assert!(matches!(
            ob.append(&ban("192.0.2.2")),
            Err(OutboxError::Full { .. })
        ));
    }
}
