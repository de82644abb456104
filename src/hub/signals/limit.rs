//! The per-host signal limit (`--signal-rate`, `--signal-burst`): a token
//! bucket per host name, one token per signal, a batch taken whole or not
//! at all. Past it `SendSignals` answers RESOURCE_EXHAUSTED with the wait
//! in the `banmesh-retry-after-ms` trailer, like a throttled `Publish`.
//! Signals are hints, so the node drops what it cannot send; its bans go
//! through `Publish`, whose limit is separate, so a host flooding signals
//! loses no ban and delays nobody else's.
//!
//! One entry per host that has sent signals (hosts are enrolled names: the
//! table is as big as the fleet).
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tonic::Status;
use tracing::warn;

use crate::hub::{
    rate_limit::{RETRY_AFTER_HEADER, ReportRate},
    throttle::{Bucket, Rate},
};

/// Default `--signal-rate`: a busy host under attack sends a few thousand
/// a second; a runaway one is held there.
pub const DEFAULT_RATE: &str = "5000/s";
/// Default `--signal-burst`: a few full batches at once.
pub const DEFAULT_BURST: u32 = 50_000;
/// How often a host that stays throttled is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The shortest wait asked for.
const MIN_RETRY: Duration = Duration::from_millis(100);

/// The limit every host gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalLimit {
    /// How fast a host earns signals back.
    pub rate: ReportRate,
    /// How many signals a host may send at once.
    pub burst: u32,
}

impl Default for SignalLimit {
    fn default() -> Self {
        SignalLimit {
            rate: DEFAULT_RATE.parse().expect("the default rate parses"),
            burst: DEFAULT_BURST,
        }
    }
}

#[derive(Debug)]
struct HostBucket {
    bucket: Bucket,
    /// When the host was last logged as throttled, and refusals since.
    logged: Option<Instant>,
    refused: u64,
}

/// Every host's signal bucket.
#[derive(Debug)]
pub struct SignalLimits {
    limit: SignalLimit,
    rate: Option<Rate>,
    hosts: Mutex<HashMap<String, HostBucket>>,
}

impl SignalLimits {
    /// Buckets of `limit` (none when its rate is off).
    pub fn new(limit: SignalLimit) -> Self {
        SignalLimits {
            limit,
            rate: limit.rate.per_second().map(|r| Rate::new(limit.burst, r)),
            hosts: Mutex::default(),
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> SignalLimit {
        self.limit
    }

    /// Takes `n` tokens from `host`'s bucket; the RESOURCE_EXHAUSTED
    /// status to answer when it cannot.
    pub fn admit(&self, host: &str, n: usize) -> Result<(), Status> {
        self.admit_at(host, n, Instant::now())
            .map_err(|wait| self.exhausted(host, wait))
    }

    fn admit_at(&self, host: &str, n: usize, now: Instant) -> Result<(), Duration> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts
            .entry(host.to_ascii_lowercase())
            .or_insert_with(|| HostBucket {
                bucket: Bucket::full(rate, now),
                logged: None,
                refused: 0,
            });
        if h.bucket.take_n(rate, n as f64, now) {
            return Ok(());
        }
        let wanted = (n as f64).min(f64::from(rate.burst()));
        let wait = h.bucket.time_until(rate, wanted, now).max(MIN_RETRY);
        h.refused += 1;
        if h.logged
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            warn!(host, rate = %self.limit.rate, burst = self.limit.burst, refused_batches = h.refused,
                retry_ms = wait.as_millis() as u64,
                "host throttled by its signal rate limit; it drops the signals it cannot send");
            (h.logged, h.refused) = (Some(now), 0);
        }
        Err(wait)
    }

    fn exhausted(&self, host: &str, wait: Duration) -> Status {
        let ms = wait.as_millis().max(1) as u64;
        let mut status = Status::resource_exhausted(format!(
            "{host} sent more signals than its limit ({} burst {}): send again in {ms} ms",
            self.limit.rate, self.limit.burst
        ));
        status.metadata_mut().insert(RETRY_AFTER_HEADER, ms.into());
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: &str, burst: u32) -> SignalLimits {
        SignalLimits::new(SignalLimit {
            rate: rate.parse().unwrap(),
            burst,
        })
    }

    #[test]
    fn a_batch_is_taken_whole_or_refused_with_a_wait() {
        let l = limits("100/s", 1000);
        let t0 = Instant::now();
        assert!(l.admit_at("a", 600, t0).is_ok());
        let wait = l.admit_at("a", 600, t0).unwrap_err();
        // 200 missing at 100/s.
        assert_eq!(wait, Duration::from_secs(2));
        assert!(l.admit_at("b", 600, t0).is_ok(), "each host has its own");
        assert!(
            l.admit_at("A", 400, t0).is_ok(),
            "names are case-insensitive"
        );
        assert!(l.admit_at("a", 1, t0).is_err());
    }

    #[test]
    fn a_batch_above_the_burst_passes_on_a_full_bucket_and_owes_the_rest() {
        let l = limits("1000/s", 100);
        let t0 = Instant::now();
        assert!(l.admit_at("a", 500, t0).is_ok());
        assert!(l.admit_at("a", 1, t0 + Duration::from_millis(300)).is_err());
        assert!(l.admit_at("a", 1, t0 + Duration::from_millis(401)).is_ok());
    }

    #[test]
    fn off_admits_everything() {
        let l = limits("off", 1);
        assert!(l.admit_at("a", 1_000_000, Instant::now()).is_ok());
    }

    #[test]
    fn the_refusal_carries_the_wait() {
        let l = limits("10/s", 10);
        let s = l.exhausted("a", Duration::from_millis(950));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_AFTER_HEADER).unwrap(), "950");
    }
}
