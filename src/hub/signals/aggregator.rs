//! The aggregator: the one task that owns the signal [`Windows`]. Handlers
//! hand it checked batches over a bounded channel and never wait for it
//! (a full channel drops the batch, counted); it turns threshold crossings
//! into fleet bans through the committer, like any report, or only logs
//! them in dry-run mode. It never waits for a commit either: each verdict's
//! commit is followed by its own small task, so a slow store delays no
//! signal and a flood of signals delays no ban.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    batch::Incoming,
    windows::{FleetVerdict, Signal, Windows},
};
use crate::{
    ban::{Ban, BanTerm},
    hub::{
        committer::Committer,
        store::{Committed, NewReport, Plan},
    },
    shutdown::Shutdown,
};

/// How often the windows' counters are logged while addresses are being
/// dropped to stay within the bound.
const LOG_DROPS_EVERY: Duration = Duration::from_secs(60);
/// How often addresses past every window are removed when no signal comes.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// Attempts to commit one fleet ban before giving it up.
const COMMIT_ATTEMPTS: u32 = 5;

/// One host's checked signals.
#[derive(Debug)]
pub struct Batch {
    /// The observing host, from its certificate.
    pub host: String,
    /// The signals that passed the edge's checks.
    pub signals: Vec<Incoming>,
}

/// Counters shared with the handlers (`Policy`) and the bench.
#[derive(Debug, Default)]
pub struct Counters {
    /// Addresses in the windows.
    pub tracked: AtomicU64,
    /// Addresses dropped to stay within the bound, ever.
    pub dropped: AtomicU64,
    /// Verdicts given (in dry-run mode too), ever.
    pub verdicts: AtomicU64,
    /// Signals the aggregator has taken, ever.
    pub aggregated: AtomicU64,
}

/// What becomes of a verdict.
#[derive(Clone)]
pub enum Outcome {
    /// Logged, not banned (`--signals-dry-run`).
    DryRun,
    /// A report by the reserved reporter [`crate::hostname::FLEET`],
    /// through the committer.
    Ban(Committer),
}

/// The windows' clock: seconds since `epoch_ms`, an hour before the hub
/// started so that a signal up to an hour older than the start still has
/// a time on it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch_ms: i64,
}

impl Clock {
    /// A clock whose epoch is an hour before `now_ms`.
    pub fn starting(now_ms: i64) -> Self {
        Clock {
            epoch_ms: now_ms - 3_600_000,
        }
    }

    /// `at_ms` on this clock (0 for anything before its epoch).
    pub fn secs(&self, at_ms: i64) -> u32 {
        ((at_ms - self.epoch_ms).max(0) / 1000).min(i64::from(u32::MAX)) as u32
    }
}

/// The sequence numbers of fleet reports: unique per commit key
/// (reporter `fleet`, seq) across restarts, as long as the clock does not
/// go back more than the hub was down (microseconds since 1970, counted
/// up from the start; a collision is stored all the same, as a new ban).
#[derive(Debug)]
pub struct FleetSeq(AtomicU64);

impl FleetSeq {
    /// Starting at the current time in microseconds.
    pub fn starting_now() -> Self {
        FleetSeq(AtomicU64::new(crate::clock::now_ms() as u64 * 1000))
    }

    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The aggregator task's state.
pub struct Aggregator {
    /// The windows it owns.
    pub windows: Windows,
    /// What becomes of verdicts.
    pub outcome: Outcome,
    /// Shared counters.
    pub counters: Arc<Counters>,
    /// The windows' clock.
    pub clock: Clock,
    /// Sequence numbers of fleet reports.
    pub seq: Arc<FleetSeq>,
}

impl Aggregator {
    /// Takes one batch at `now_ms`; the verdicts it gave.
    pub fn take(&mut self, batch: Batch, now_ms: i64) -> Vec<FleetVerdict> {
        let host = self.windows.host_id(&batch.host);
        let now = self.clock.secs(now_ms);
        let mut verdicts = Vec::new();
        let n = batch.signals.len() as u64;
        for s in batch.signals {
            let signal = Signal {
                ip: s.ip,
                host,
                at: self.clock.secs(s.at_ms),
                what: s.what,
            };
            if let Some(v) = self.windows.observe(signal, now) {
                verdicts.push(v);
            }
        }
        let stats = self.windows.stats();
        self.counters
            .tracked
            .store(stats.tracked, Ordering::Relaxed);
        self.counters
            .dropped
            .store(stats.dropped, Ordering::Relaxed);
        self.counters.aggregated.fetch_add(n, Ordering::Relaxed);
        self.counters
            .verdicts
            .fetch_add(verdicts.len() as u64, Ordering::Relaxed);
        verdicts
    }

    /// Acts on one verdict: logs it (dry run) or submits the fleet ban.
    pub fn act(&self, v: FleetVerdict) {
        let committer = match &self.outcome {
            Outcome::DryRun => {
                info!(ip = %v.ip, jail = v.jail, reason = %v.reason,
                    "fleet policy would ban (dry run: nothing banned)");
                return;
            }
            Outcome::Ban(c) => c.clone(),
        };
        let ban = match Ban::new(v.jail, "all", "all", &v.ip.to_string()) {
            Ok(b) => b,
            Err(e) => {
                warn!(ip = %v.ip, error = %e, "cannot make a fleet ban of this verdict");
                return;
            }
        };
        let report = NewReport {
            host: crate::hostname::FLEET.to_string(),
            seq: self.seq.next(),
            ban,
            // The ladder decides the term; the reason is the fleet's.
            plan: Plan::New(BanTerm {
                reason: v.reason.clone(),
                ..Default::default()
            }),
        };
        tokio::spawn(commit(committer, report));
    }

    /// Runs until `shutdown` or until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Batch>, mut shutdown: Shutdown) {
        let mut logged = (Instant::now(), 0u64);
        // Addresses leave their windows with time, not only when signals
        // arrive: a quiet hub gives their memory back too.
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        loop {
            let batch = tokio::select! {
                b = rx.recv() => b,
                _ = tick.tick() => {
                    let now = self.clock.secs(crate::clock::now_ms());
                    self.windows.expire(now);
                    let tracked = self.windows.stats().tracked;
                    self.counters.tracked.store(tracked, Ordering::Relaxed);
                    continue;
                }
                _ = shutdown.recv() => None,
            };
            let Some(batch) = batch else { break };
            for v in self.take(batch, crate::clock::now_ms()) {
                self.act(v);
            }
            let stats = self.windows.stats();
            if stats.dropped > logged.1 && logged.0.elapsed() >= LOG_DROPS_EVERY {
                warn!(
                    dropped = stats.dropped - logged.1,
                    tracked = stats.tracked,
                    max = self.windows.max_addresses(),
                    "signal windows full: dropped the addresses signalled longest ago \
                     (raise --signal-max-addresses if memory allows)"
                );
                logged = (Instant::now(), stats.dropped);
            }
        }
        tracing::debug!("signal aggregator stopped");
    }
}

/// Commits one fleet ban, retrying with the same (reporter, seq) while the
/// store fails: a commit that landed after all comes back a duplicate.
async fn commit(committer: Committer, report: NewReport) {
    let mut wait = Duration::from_millis(500);
    for attempt in 1..=COMMIT_ATTEMPTS {
        match committer.report(report.clone()).await.await {
            Ok(Ok(Committed::New(e))) => {
                info!(ip = %report.ban.ip, jail = %report.ban.jail, reason = %e.term.reason,
                    event = e.id, rung = e.term.rung, "fleet ban");
                return;
            }
            Ok(Ok(Committed::Coalesced { event_id, .. })) => {
                info!(ip = %report.ban.ip, event = event_id,
                    "fleet verdict recorded against the address's active ban");
                return;
            }
            Ok(Ok(Committed::Duplicate(id))) => {
                info!(ip = %report.ban.ip, event = id, "fleet ban (committed before)");
                return;
            }
            Ok(Ok(Committed::Refused { entry, .. })) => {
                info!(ip = %report.ban.ip, allowed_by = %entry,
                    "fleet ban refused: the address is on the allow-list");
                return;
            }
            Ok(Err(e)) => {
                if matches!(*e, crate::hub::store::StoreError::Stopped) {
                    return;
                }
                warn!(ip = %report.ban.ip, attempt, error = %e, "cannot commit a fleet ban yet");
            }
            Err(_) => return,
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    warn!(ip = %report.ban.ip,
        "fleet ban given up: the store kept failing (the address is banned again if its signals go on)");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::signals::windows::{Observed, Thresholds};

    #[test]
    fn a_batch_is_counted_and_its_crossing_is_one_verdict() {
        let now = 1_700_000_000_000;
        let mut agg = Aggregator {
            windows: Windows::new(Thresholds::default(), 100),
            outcome: Outcome::DryRun,
            counters: Arc::new(Counters::default()),
            clock: Clock::starting(now),
            seq: Arc::new(FleetSeq::starting_now()),
        };
        let failures = |n| Batch {
            host: String::new(),
            signals: vec![
                Incoming {
                    ip: "203.0.113.5".parse().unwrap(),
                    at_ms: now - 5_000,
                    what: Observed::Failure,
                };
                n
            ],
        };
        let a = Batch {
            host: "a".into(),
            ..failures(6)
        };
        assert!(agg.take(a, now).is_empty());
        let b = Batch {
            host: "B".into(),
            ..failures(6)
        };
        let verdicts = agg.take(b, now);
        assert_eq!(verdicts.len(), 1);
        assert_eq!(verdicts[0].reason, "10 failures on 2 hosts in 0s");
        let c = &agg.counters;
        assert_eq!(c.aggregated.load(Ordering::Relaxed), 12);
        assert_eq!(c.verdicts.load(Ordering::Relaxed), 1);
        assert_eq!(c.tracked.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_clock_counts_seconds_from_an_hour_before_the_start() {
        let c = Clock::starting(10_000_000);
        assert_eq!(c.secs(10_000_000), 3600);
        assert_eq!(c.secs(10_001_999), 3601);
        assert_eq!(c.secs(0), 0);
    }
}
