//! Fleet signals: what hosts observe without banning (fail2ban's filter
//! matches, probes of closed ports), aggregated at the hub into fleet bans.
//!
//! Contract:
//! - Signals are hints, never reports: lossy by design. A batch past its
//!   host's signal rate is refused whole (RESOURCE_EXHAUSTED with a wait,
//!   see [`limit`]); a batch that finds the aggregator's queue full is
//!   dropped and counted. Neither ever waits, so a flood of signals cannot
//!   delay a ban: bans go through `Publish` and the committer, which signals
//!   only reach as one report per verdict.
//! - The observing host is the name in its certificate, nothing else.
//! - Each signal is checked at the edge ([`batch`]); the ones that are
//!   malformed, out of their window or on the allow-list are ignored and
//!   counted in the answer.
//! - One task owns the windows ([`aggregator`], [`windows`]): per address,
//!   failures summed over hosts (counted only when enough hosts saw them)
//!   and distinct closed ports probed. A crossing is one fleet ban, a
//!   report by the reserved reporter `fleet` in jail `banmesh-fleet` or
//!   `banmesh-portscan` with the reason in words, committed like any other
//!   (the allow-list applies) and banned by every host. In dry-run mode it
//!   is logged and counted instead.
//! - Memory is bounded by `--signal-max-addresses` (oldest address dropped
//!   first, counted and logged); nothing about signals is stored.
//!
//! # Layout
//! - [`windows`]: the pure sliding-window aggregator and its thresholds.
//! - [`batch`]: checking one signal at the edge.
//! - [`limit`]: the per-host signal rate limit.
//! - [`aggregator`]: the task that owns the windows and acts on verdicts.
//! - here: [`Signals`], the handle the `SendSignals` and `Policy` handlers use.
pub mod aggregator;
pub mod batch;
pub mod limit;
pub mod windows;

use std::{
    net::IpAddr,
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use tokio::sync::mpsc;
use tonic::Status;
use tracing::{info, warn};

use self::{
    aggregator::{Aggregator, Batch, Clock, Counters, FleetSeq, Outcome},
    limit::{SignalLimit, SignalLimits},
    windows::{Thresholds, Windows},
};
use super::{committer::Committer, fleet::FleetAddrs, store::Store};
use crate::{allow::AllowList, proto, shutdown::Shutdown};

/// Most signals in one `SendSignals` call.
pub const MAX_BATCH: usize = 10_000;
/// Batches that may wait for the aggregator (at most [`MAX_BATCH`]
/// signals each, 32 bytes a signal: at most ~80 MB, and in practice a
/// node's batches are far smaller).
const QUEUE: usize = 256;
/// How often the edge's copy of the allow-list is read again from the
/// store (the committer checks every fleet ban against the live list;
/// this copy only saves the aggregator work).
const ALLOW_REFRESH: Duration = Duration::from_secs(5);

/// The hub's signal settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalConfig {
    /// The thresholds.
    pub thresholds: Thresholds,
    /// Most addresses in the windows (`--signal-max-addresses`).
    pub max_addresses: usize,
    /// Log verdicts, ban nothing (`--signals-dry-run`).
    pub dry_run: bool,
    /// The per-host signal rate limit.
    pub limit: SignalLimit,
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            thresholds: Thresholds::default(),
            max_addresses: windows::DEFAULT_MAX_ADDRESSES,
            dry_run: false,
            limit: SignalLimit::default(),
        }
    }
}

/// The handle `SendSignals` and `Policy` use; see the module doc.
pub struct Signals {
    config: SignalConfig,
    tx: mpsc::Sender<Batch>,
    counters: Arc<Counters>,
    limits: SignalLimits,
    allow: Arc<RwLock<AllowList>>,
    fleet: FleetAddrs,
    /// Batches dropped because the aggregator's queue was full.
    queue_full: std::sync::atomic::AtomicU64,
}

impl Signals {
    /// Starts the aggregator (and the allow-list refresher); both stop
    /// with `shutdown`.
    pub fn spawn(
        config: SignalConfig,
        store: Arc<dyn Store>,
        committer: Committer,
        fleet: FleetAddrs,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let aggregator = Aggregator {
            windows: Windows::new(config.thresholds, config.max_addresses),
            outcome: if config.dry_run {
                Outcome::DryRun
            } else {
                Outcome::Ban(committer)
            },
            counters: counters.clone(),
            clock: Clock::starting(crate::clock::now_ms()),
            seq: Arc::new(FleetSeq::starting_now()),
        };
        tokio::spawn(aggregator.run(rx, shutdown.clone()));
        let allow = Arc::new(RwLock::new(AllowList::default()));
        tokio::spawn(refresh_allow_list(store, allow.clone(), shutdown));
        let t = config.thresholds;
        info!(fleet_maxretry = t.fleet_maxretry,
            fleet_findtime = %humantime::format_duration(t.fleet_findtime),
            fleet_min_hosts = t.fleet_min_hosts, probe_ports = t.probe_ports,
            probe_findtime = %humantime::format_duration(t.probe_findtime),
            max_addresses = config.max_addresses, dry_run = config.dry_run,
            signal_rate = %config.limit.rate, signal_burst = config.limit.burst,
            "fleet signal policy");
        Arc::new(Signals {
            config,
            tx,
            counters,
            limits: SignalLimits::new(config.limit),
            allow,
            fleet,
            queue_full: Default::default(),
        })
    }

    /// Takes one host's batch: its rate limit, the edge's checks, then the
    /// aggregator's queue. Never waits.
    pub fn take(
        &self,
        host: &str,
        signals: &[proto::Signal],
    ) -> Result<proto::SignalBatchAck, Status> {
        if signals.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} signals per call"
            )));
        }
        self.limits.admit(host, signals.len())?;
        let now = crate::clock::now_ms();
        let allowed = |ip: IpAddr| {
            self.allow.read().is_ok_and(|l| l.check(ip).is_some()) || self.fleet.owner(ip).is_some()
        };
        let checked: Vec<_> = signals
            .iter()
            .filter_map(|s| batch::check(s, &self.config.thresholds, now, allowed))
            .collect();
        let ignored = (signals.len() - checked.len()) as u32;
        let accepted = checked.len() as u32;
        if checked.is_empty() {
            return Ok(proto::SignalBatchAck { accepted, ignored });
        }
        let batch = Batch {
            host: host.to_string(),
            signals: checked,
        };
        match self.tx.try_send(batch) {
            Ok(()) => Ok(proto::SignalBatchAck { accepted, ignored }),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let n = self.queue_full.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(
                        host,
                        dropped_batches = n,
                        "signal aggregator behind: batch dropped (signals are hints; bans are not affected)"
                    );
                }
                Ok(proto::SignalBatchAck {
                    accepted: 0,
                    ignored: ignored + accepted,
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Status::unavailable("the hub is shutting down"))
            }
        }
    }

    /// The signal half of `Policy` (the ladder's fields are left default).
    pub fn policy(&self) -> proto::PolicyResponse {
        let t = &self.config.thresholds;
        proto::PolicyResponse {
            fleet_maxretry: t.fleet_maxretry,
            fleet_findtime_s: t.fleet_findtime.as_secs(),
            fleet_min_hosts: t.fleet_min_hosts,
            probe_ports: t.probe_ports,
            probe_findtime_s: t.probe_findtime.as_secs(),
            dry_run: self.config.dry_run,
            tracked_addresses: self.counters.tracked.load(Ordering::Relaxed),
            max_tracked_addresses: self.config.max_addresses as u64,
            dropped_addresses: self.counters.dropped.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    /// The shared counters (the bench reads them).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Keeps the edge's copy of the allow-list current (see [`ALLOW_REFRESH`]).
async fn refresh_allow_list(
    store: Arc<dyn Store>,
    allow: Arc<RwLock<AllowList>>,
    mut shutdown: Shutdown,
) {
    loop {
        match store.allow_entries().await {
            Ok(rows) => {
                let list = AllowList::new(rows.into_iter().map(|r| r.network));
                if let Ok(mut l) = allow.write() {
                    *l = list;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the allow-list for signals; keeping the last copy")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ALLOW_REFRESH) => {}
            _ = shutdown.recv() => return,
        }
    }
}
