//! The per-host report limit (`--report-rate`, `--report-burst`): a token
//! bucket per host name, so one misbehaving host can neither push
//! thousands of bans to every server at once nor hold up the committer
//! that every other host's bans go through.
//!
//! Contract:
//! - Every report a `Publish` stream reads takes a token from its host's
//!   bucket (all streams of one host share it) before it goes anywhere
//!   else. A report that finds the bucket empty is not taken: the stream
//!   acks every report before it, in order, then ends with
//!   RESOURCE_EXHAUSTED, the time to wait in the [`RETRY_AFTER_HEADER`]
//!   trailer and in words in the message (see `publish`).
//! - Nothing accepted is lost and nothing is stored twice: a report either
//!   got its token and follows the usual ack contract, or it was never
//!   taken and is still in the node's outbox, with everything sent after
//!   it; the node sends them again on a new stream after the wait, and
//!   `(host, seq)` recognises a re-send as ever.
//! - The wait is what the bucket needs to hold a second's worth of reports
//!   (at least one, at most the burst): a throttled host comes back about
//!   once a second with a batch, not once per token.
//! - Refused reports never reach the committer, and each host's bucket is
//!   its own, so other hosts' bans keep their latency.
//! - The hub logs a throttled host when it starts and then at most once a
//!   [`LOG_EVERY`] while it lasts (with counts), never once per report.
//!   `hub hosts` shows it throttled until [`GRACE`] after the wait its last
//!   refusal asked for, with its backlog: the outbox depth the node gave in
//!   [`BACKLOG_HEADER`] when its stream opened, less the reports taken since.
//!
//! Buckets live in the hub's memory, one entry per host that has published
//! (about 100 bytes; hosts are enrolled names, so the table is as big as
//! the fleet). A restarted hub gives every host a full burst again.
use std::{
    collections::HashMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tonic::Status;
use tracing::{info, warn};

use super::throttle::{Bucket, Rate};
pub use crate::proto::{BACKLOG_HEADER, RETRY_AFTER_HEADER};

/// Default `--report-rate`: a real attack wave fits, a runaway host does not.
pub const DEFAULT_RATE: &str = "600/min";
/// Default `--report-burst`.
pub const DEFAULT_BURST: u32 = 2000;
/// How often a host that stays throttled is logged again.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// How long past its wait a host still counts as throttled: it comes back
/// at about the wait, and is refused again if it still sends too much.
pub const GRACE: Duration = Duration::from_secs(5);
/// The shortest wait asked for (a very low rate could ask for less).
const MIN_RETRY: Duration = Duration::from_millis(100);

/// Reports a second a host earns back, as `--report-rate` takes it:
/// `N/s`, `N/min` or `N/h`; `off` for no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportRate(Option<f64>);

impl ReportRate {
    /// Reports a second; `None` when there is no limit.
    pub fn per_second(&self) -> Option<f64> {
        self.0
    }
}

impl FromStr for ReportRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a rate: use N/s, N/min or N/h (e.g. 600/min), or off");
        if s.eq_ignore_ascii_case("off") {
            return Ok(ReportRate(None));
        }
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let secs = match per.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if !n.is_finite() || n <= 0.0 {
            return Err(format!("{s:?}: the rate must be above 0 (or off)"));
        }
        // Below one an hour the wait for a token overflows a timestamp;
        // no operator means that.
        if n / secs < 1.0 / 3600.0 {
            return Err(format!("{s:?}: the rate must be at least 1/h (or off)"));
        }
        Ok(ReportRate(Some(n / secs)))
    }
}

impl fmt::Display for ReportRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "off"),
            Some(r) => write!(f, "{}/s", (r * 1000.0).round() / 1000.0),
        }
    }
}

/// The limit every host gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportLimit {
    /// How fast a host earns reports back.
    pub rate: ReportRate,
    /// How many reports a host may send at once.
    pub burst: u32,
}

impl Default for ReportLimit {
    fn default() -> Self {
        ReportLimit {
            rate: DEFAULT_RATE.parse().expect("the default rate parses"),
            burst: DEFAULT_BURST,
        }
    }
}

/// What `Hosts` shows of one host's limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLimitState {
    /// Reports were refused within their wait plus [`GRACE`].
    pub throttled: bool,
    /// When this stretch of throttling began (unix ms; 0 when not throttled).
    pub throttled_since_ms: i64,
    /// The host's outbox depth as it last said, less the reports taken since.
    pub backlog: u64,
}

/// One stretch of refusals, with counts for the next log line.
#[derive(Debug)]
struct Throttling {
    since: Instant,
    since_ms: i64,
    /// The end of the wait the latest refusal asked for.
    until: Instant,
    logged: Instant,
    /// Streams ended, and reports taken, since the last log line.
    refused: u64,
    taken: u64,
}

impl Throttling {
    fn over(&self, now: Instant) -> bool {
        now >= self.until + GRACE
    }
}

#[derive(Debug, Default)]
struct HostState {
    /// Made full at the host's first report.
    bucket: Option<Bucket>,
    backlog: u64,
    throttling: Option<Throttling>,
}

/// Every host's bucket; shared by the `Publish` streams and `Hosts`.
#[derive(Debug)]
pub struct ReportLimits {
    rate: Option<Rate>,
    hosts: Mutex<HashMap<String, Arc<Mutex<HostState>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Host names are one case-insensitive namespace: one bucket per name.
fn key(host: &str) -> String {
    host.to_ascii_lowercase()
}

impl ReportLimits {
    /// Buckets of `limit` (none at all when its rate is off).
    pub fn new(limit: ReportLimit) -> Self {
        ReportLimits {
            rate: limit.rate.per_second().map(|r| Rate::new(limit.burst, r)),
            hosts: Mutex::default(),
        }
    }

    /// The gate of one `Publish` stream from `host`, whose outbox held
    /// `backlog` reports when it opened (if it said).
    pub fn gate(&self, host: &str, backlog: Option<u64>) -> HostGate {
        let state = lock(&self.hosts).entry(key(host)).or_default().clone();
        if let Some(b) = backlog {
            lock(&state).backlog = b;
        }
        HostGate {
            host: host.to_string(),
            rate: self.rate,
            state,
        }
    }

    /// What `Hosts` shows for `host`.
    pub fn status(&self, host: &str) -> HostLimitState {
        let Some(state) = lock(&self.hosts).get(&key(host)).cloned() else {
            return HostLimitState::default();
        };
        let s = lock(&state);
        let now = Instant::now();
        match &s.throttling {
            Some(t) if !t.over(now) => HostLimitState {
                throttled: true,
                throttled_since_ms: t.since_ms,
                backlog: s.backlog,
            },
            _ => HostLimitState {
                backlog: s.backlog,
                ..Default::default()
            },
        }
    }
}

/// Admits the reports of one `Publish` stream.
#[derive(Debug)]
pub struct HostGate {
    host: String,
    rate: Option<Rate>,
    state: Arc<Mutex<HostState>>,
}

impl HostGate {
    /// Takes a token for one report read from the stream; `Err` with the
    /// wait to ask for when there is none (the report is then not taken).
    pub fn admit(&self) -> Result<(), Duration> {
        self.admit_at(Instant::now(), crate::clock::now_ms())
    }

    fn admit_at(&self, now: Instant, now_ms: i64) -> Result<(), Duration> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        let mut s = lock(&self.state);
        let bucket = s.bucket.get_or_insert_with(|| Bucket::full(rate, now));
        if bucket.take(rate, now) {
            s.backlog = s.backlog.saturating_sub(1);
            match &mut s.throttling {
                Some(t) if t.over(now) => {
                    info!(host = %self.host, throttled_for_s = now.duration_since(t.since).as_secs(),
                        "host no longer throttled");
                    s.throttling = None;
                }
                Some(t) => t.taken += 1,
                None => {}
            }
            return Ok(());
        }
        // A second's worth of reports, so a throttled host comes back
        // about once a second with a batch rather than once per token.
        let batch = rate.per_second().clamp(1.0, f64::from(rate.burst()));
        let wait = bucket.time_until(rate, batch, now).max(MIN_RETRY);
        let backlog = s.backlog;
        match &mut s.throttling {
            Some(t) if !t.over(now) => {
                t.until = now + wait;
                t.refused += 1;
                if now.duration_since(t.logged) >= LOG_EVERY {
                    warn!(host = %self.host, limit = %self.limit(), backlog,
                        throttled_for_s = now.duration_since(t.since).as_secs(),
                        refused_streams = t.refused, taken = t.taken,
                        "host still throttled by its report rate limit");
                    (t.logged, t.refused, t.taken) = (now, 0, 0);
                }
            }
            _ => {
                warn!(host = %self.host, limit = %self.limit(), backlog, retry_ms = wait.as_millis() as u64,
                    "host throttled by its report rate limit; its reports wait in its outbox");
                s.throttling = Some(Throttling {
                    since: now,
                    since_ms: now_ms,
                    until: now + wait,
                    logged: now,
                    refused: 1,
                    taken: 0,
                });
            }
        }
        Err(wait)
    }

    fn limit(&self) -> String {
        self.rate.map_or_else(
            || "off".into(),
            |r| format!("{} burst {}", ReportRate(Some(r.per_second())), r.burst()),
        )
    }

    /// The status that ends the stream when [`admit`](Self::admit) refused
    /// a report: RESOURCE_EXHAUSTED, with the wait in the trailer.
    pub fn exhausted(&self, wait: Duration) -> Status {
        let ms = wait.as_millis().max(1) as u64;
        let mut status = Status::resource_exhausted(format!(
            "{} sent more reports than its limit ({}); they stay in its outbox: send again in {ms} ms",
            self.host,
            self.limit()
        ));
        status.metadata_mut().insert(RETRY_AFTER_HEADER, ms.into());
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: &str, burst: u32) -> ReportLimits {
        ReportLimits::new(ReportLimit {
            rate: rate.parse().unwrap(),
            burst,
        })
    }

    #[test]
    fn rates_parse_in_an_operators_units() {
        let per = |s: &str| s.parse::<ReportRate>().unwrap().per_second();
        assert_eq!(per("600/min"), Some(10.0));
        assert_eq!(per("20/s"), Some(20.0));
        assert_eq!(per("7200/h"), Some(2.0));
        assert_eq!(per("off"), None);
        for bad in [
            "600", "0/s", "-1/s", "ten/s", "5/day", "NaN/s", "1e-20/h", "0.5/h",
        ] {
            assert!(bad.parse::<ReportRate>().is_err(), "{bad}");
        }
        assert_eq!(ReportRate(Some(10.0)).to_string(), "10/s");
    }

    #[test]
    fn a_burst_then_a_second_of_reports_a_second() {
        let l = limits("20/s", 40);
        let gate = l.gate("Flood", Some(100));
        let t0 = Instant::now();
        for _ in 0..40 {
            assert!(gate.admit_at(t0, 0).is_ok());
        }
        // Empty: the wait is for a second's worth (20), not one token.
        let wait = gate.admit_at(t0, 0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.01, "{wait:?}");
        let s = l.status("flood");
        assert!(s.throttled, "one namespace, whatever the case");
        assert_eq!(s.backlog, 60);
        // Back after the wait: twenty taken, the twenty-first refused.
        let t1 = t0 + wait;
        for _ in 0..20 {
            assert!(gate.admit_at(t1, 0).is_ok());
        }
        assert!(gate.admit_at(t1, 0).is_err());
        // Another host has its own bucket.
        assert!(l.gate("normal", None).admit_at(t1, 0).is_ok());
        assert!(!l.status("normal").throttled);
    }

    #[test]
    fn throttling_ends_after_its_wait_and_grace() {
        let l = limits("20/s", 2);
        let gate = l.gate("flood", None);
        let t0 = Instant::now();
        assert!(gate.admit_at(t0, 0).is_ok() && gate.admit_at(t0, 0).is_ok());
        let wait = gate.admit_at(t0, 42).unwrap_err();
        let s = l.status("flood");
        assert!(s.throttled && s.throttled_since_ms == 42);
        // A report after the grace is taken and ends the stretch.
        let later = t0 + wait + GRACE;
        assert!(gate.admit_at(later, 0).is_ok());
        assert!(lock(&gate.state).throttling.is_none());
    }

    #[test]
    fn a_long_stretch_is_logged_once_a_minute() {
        let l = limits("1/s", 1);
        let gate = l.gate("flood", None);
        let t0 = Instant::now();
        assert!(gate.admit_at(t0, 0).is_ok());
        let logged = |g: &HostGate| lock(&g.state).throttling.as_ref().unwrap().logged;
        let mut t = t0;
        // Refused, then back each second with one token's worth: one
        // stretch, logged at its start and again only once a minute passed.
        for _ in 0..90 {
            let _ = gate.admit_at(t, 0);
            t += Duration::from_secs(1);
            assert!(gate.admit_at(t, 0).is_ok());
        }
        let last = logged(&gate);
        assert!(last > t0 && last <= t0 + LOG_EVERY + Duration::from_secs(2));
        let since = lock(&gate.state).throttling.as_ref().unwrap().since;
        assert_eq!(since, t0, "one stretch");
    }

    #[test]
    fn off_admits_everything() {
        let l = limits("off", 1);
        let gate = l.gate("flood", Some(5));
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| gate.admit_at(t0, 0).is_ok()));
        assert!(!l.status("flood").throttled);
    }

    #[test]
    fn the_status_carries_the_wait() {
        let gate = limits("20/s", 40).gate("flood", None);
        let s = gate.exhausted(Duration::from_millis(950));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_AFTER_HEADER).unwrap(), "950");
        assert!(s.message().contains("20/s burst 40"), "{}", s.message());
    }
}
