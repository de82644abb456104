//! The outbox's group fsync: one thread that `fdatasync`s `outbox.log`
//! for every report written since its last one, and wakes their callers.
//!
//! Why a thread of its own: a burst of reports (fail2ban banning 200
//! addresses at once) used to run one `spawn_blocking` per report, each
//! taking a pool thread, queueing on a mutex for its turn to sync, and
//! waking the runtime back: ~5 futex calls and context switches per
//! report, and as many fsyncs as the reports trickled in (56-83 for 200,
//! docs/perf/ingress-report.txt). Now a report is written inline and its
//! caller waits here; the thread syncs whatever was written while its
//! previous fsync ran, so a burst costs a few fsyncs in all, whatever the
//! number of reports.
//!
//! Contract: [`Syncer::wait`] (or [`Syncer::wait_blocking`]) returns `Ok`
//! for a mark only after an `fdatasync` that began after the write up to
//! that mark returned. A failed fsync fails every mark it covered, for
//! good (after a failed fsync Linux may have dropped those pages: a later
//! successful one proves nothing about them); later marks are synced again.
//!
//! Marks are `(truncations, bytes written)`, compared in that order: the
//! log is truncated only once everything in it is acknowledged by the hub,
//! and with a `sync_all`, so a mark of an earlier truncation is covered.
use std::{
    fs::File,
    sync::{Arc, Condvar, Mutex},
};

use tokio::sync::Notify;

/// How far the log is written or known durable: (truncations, bytes).
pub type Mark = (u64, u64);

#[derive(Default)]
struct State {
    /// The highest mark written and not yet known durable.
    requested: Mark,
    /// Everything up to here is on disk.
    durable: Mark,
    /// Every mark up to here was covered by a failed fsync.
    failed: Option<(Mark, String)>,
    /// The outbox is gone: the thread ends.
    stop: bool,
    /// The thread sleeps on `work` (a writer then wakes it; while it
    /// syncs, it looks at `requested` again before sleeping: no wake-up
    /// call per report in a burst).
    idle: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the thread: there is something to sync, or stop.
    work: Condvar,
    /// Wakes blocking waiters after each fsync.
    done: Condvar,
    /// Wakes async waiters after each fsync.
    synced: Notify,
    /// The outbox's `appended`: the publisher hears of new reports once
    /// they are durable, from here, even if their callers went away.
    appended: Arc<Notify>,
}

/// The sync thread's handle; stops the thread when dropped.
pub struct Syncer {
    shared: Arc<Shared>,
}

impl Syncer {
    /// Starts the thread syncing `file` (a handle on the log), which is
    /// known durable up to `durable`; `appended` is woken after each
    /// successful fsync.
    pub fn start(file: File, durable: Mark, appended: Arc<Notify>) -> std::io::Result<Syncer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requested: durable,
                durable,
                ..State::default()
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            synced: Notify::new(),
            appended,
        });
        let thread = shared.clone();
        // Its lines name the node (the caller's span), like the node's tasks.
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("outbox-sync".into())
            .spawn(move || span.in_scope(|| run(&thread, &file)))?;
        Ok(Syncer { shared })
    }

    /// Asks for everything up to `mark` to be made durable.
    pub fn request(&self, mark: Mark) {
        let mut s = self.shared.state.lock().unwrap();
        if mark > s.requested {
            s.requested = mark;
            if s.idle {
                self.shared.work.notify_one();
            }
        }
    }

    /// Waits until `mark` is durable (or its fsync failed).
    pub async fn wait(&self, mark: Mark) -> Result<(), String> {
        loop {
            let synced = self.shared.synced.notified();
            tokio::pin!(synced);
            synced.as_mut().enable();
            if let Some(r) = outcome(&self.shared.state.lock().unwrap(), mark) {
                return r;
            }
            synced.await;
        }
    }

    /// [`Syncer::wait`] for a blocking caller.
    pub fn wait_blocking(&self, mark: Mark) -> Result<(), String> {
        let mut s = self.shared.state.lock().unwrap();
        loop {
            if let Some(r) = outcome(&s, mark) {
                return r;
            }
            s = self.shared.done.wait(s).unwrap();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        self.shared.work.notify_one();
    }
}

/// `mark`'s fate, once known.
fn outcome(s: &State, mark: Mark) -> Option<Result<(), String>> {
    match &s.failed {
        Some((upto, e)) if mark <= *upto => Some(Err(e.clone())),
        _ if mark <= s.durable => Some(Ok(())),
        _ => None,
    }
}

/// The thread: sync whatever was requested, publish it, sleep until more.
fn run(shared: &Shared, file: &File) {
    let mut s = shared.state.lock().unwrap();
    loop {
        while s.requested <= s.durable && !s.stop {
            s.idle = true;
            s = shared.work.wait(s).unwrap();
            s.idle = false;
        }
        if s.stop {
            return;
        }
        // Every write up to `target` has returned (a writer requests its
        // mark only after its write), so this fsync covers them all.
        let target = s.requested;
        drop(s);
        let result = file.sync_data();
        s = shared.state.lock().unwrap();
        match result {
            Ok(()) => {
                s.durable = s.durable.max(target);
                shared.appended.notify_waiters();
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox fsync failed; the reports it covered are refused");
                s.failed = Some((target, e.to_string()));
                // Later marks get a fsync of their own.
                s.durable = s.durable.max(target);
            }
        }
        shared.done.notify_all();
        shared.synced.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fsync_fails_what_it_covered_for_good() {
        let mut s = State {
            durable: (0, 100),
            ..State::default()
        };
        assert_eq!(outcome(&s, (0, 100)), Some(Ok(())));
        assert_eq!(outcome(&s, (0, 101)), None, "not yet synced");
        s.failed = Some(((0, 200), "EIO".into()));
        s.durable = (0, 300);
        assert_eq!(outcome(&s, (0, 150)), Some(Err("EIO".into())));
        assert_eq!(
            outcome(&s, (0, 100)),
            Some(Err("EIO".into())),
            "a later success proves nothing about marks the failure covered"
        );
        assert_eq!(outcome(&s, (0, 250)), Some(Ok(())));
        assert_eq!(outcome(&s, (1, 10)), None, "after a truncation");
    }

    #[test]
    fn one_thread_answers_async_and_blocking_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("log")).unwrap();
        let syncer = Arc::new(Syncer::start(file, (0, 0), Arc::default()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let waits: Vec<_> = (1..=50)
                .map(|i| {
                    let s = syncer.clone();
                    tokio::spawn(async move {
                        s.request((0, i));
                        s.wait((0, i)).await
                    })
                })
                .collect();
            for w in waits {
                assert_eq!(w.await.unwrap(), Ok(()));
            }
        });
        syncer.request((1, 5));
        assert_eq!(syncer.wait_blocking((1, 5)), Ok(()));
    }
}
