//! Token buckets ([`Rate`], [`Bucket`]), and one per source address for
//! the one call anyone may make (`Enroll`): [`ENROL_BURST`] attempts at
//! once, refilled at that many a minute. The hub's per-host report limit
//! (`super::rate_limit`) keeps its buckets the same way.
//!
//! IPv6 sources are counted per /64 (one host usually holds a whole /64)
//! and IPv4-mapped ones as IPv4. The table holds at most [`MAX_SOURCES`]
//! addresses: when full, buckets that have refilled are dropped (they
//! carry no state), and if none has, a new source is refused until one
//! does, so memory stays bounded whatever the number of addresses.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Enrolment attempts one source may make at once.
pub const ENROL_BURST: u32 = 10;
/// How long a source takes to earn back a full burst.
pub const ENROL_REFILL: Duration = Duration::from_secs(60);
/// Most sources tracked at once (about 40 bytes each).
pub const MAX_SOURCES: usize = 100_000;

/// A token bucket's shape: how many at once, how fast they come back.
/// Kept apart from [`Bucket`] so a table of many buckets stores only
/// their levels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    burst: f64,
    per_second: f64,
}

impl Rate {
    /// `burst` at once (at least 1), earned back at `per_second`.
    pub fn new(burst: u32, per_second: f64) -> Self {
        Rate {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(1e-9),
        }
    }

    /// The burst, in tokens.
    pub fn burst(&self) -> u32 {
        self.burst as u32
    }

    /// Tokens earned back a second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

/// One token bucket's level. Time is passed in, never read here, so the
/// arithmetic is tested without sleeping.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(rate: &Rate, now: Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    /// Tokens held at `now` (fractions count towards the next one).
    pub fn level(&self, rate: &Rate, now: Instant) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate.per_second)
            .min(rate.burst)
    }

    /// Takes one token; false (and nothing taken) when there is none.
    pub fn take(&mut self, rate: &Rate, now: Instant) -> bool {
        let level = self.level(rate, now);
        let ok = level >= 1.0;
        *self = Bucket {
            tokens: if ok { level - 1.0 } else { level },
            at: now,
        };
        ok
    }

    /// Takes `n` tokens at once (a batch), when the bucket holds them or,
    /// for a batch larger than the burst, when it is full: the level then
    /// goes below zero, a debt earned back before the next batch. False
    /// (and nothing taken) otherwise.
    pub fn take_n(&mut self, rate: &Rate, n: f64, now: Instant) -> bool {
        let level = self.level(rate, now);
        let ok = level >= n.min(rate.burst);
        *self = Bucket {
            tokens: if ok { level - n } else { level },
            at: now,
        };
        ok
    }

    /// How long from `now` until the bucket holds `tokens` (at most the
    /// burst); zero if it already does.
    pub fn time_until(&self, rate: &Rate, tokens: f64, now: Instant) -> Duration {
        let missing = tokens.min(rate.burst) - self.level(rate, now);
        Duration::from_secs_f64((missing / rate.per_second).max(0.0))
    }
}

/// Per-source token buckets; see the module doc.
#[derive(Debug)]
pub struct Throttle {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    rate: Rate,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(ENROL_BURST, ENROL_REFILL)
    }
}

impl Throttle {
    /// `burst` attempts at once, earned back evenly over `refill`.
    pub fn new(burst: u32, refill: Duration) -> Self {
        Throttle {
            buckets: Mutex::new(HashMap::new()),
            rate: Rate::new(burst, f64::from(burst) / refill.as_secs_f64().max(1e-3)),
        }
    }

    /// Takes one attempt from `source`'s bucket; false when it is empty.
    /// A call without a known source shares one bucket with all such.
    pub fn allow(&self, source: Option<IpAddr>) -> bool {
        let key = source.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), key);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&key) {
            buckets.retain(|_, b| b.level(&self.rate, now) < self.rate.burst);
            if buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        buckets
            .entry(key)
            .or_insert(Bucket::full(&self.rate, now))
            .take(&self.rate, now)
    }
}

/// The address a bucket is kept for, and the unit one source is counted by: an IPv4 address, or an IPv6 /64
/// (what one host or one customer usually holds), IPv4-mapped as IPv4.
pub(crate) fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refused_per_source() {
        let t = Throttle::new(10, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        for _ in 0..10 {
            assert!(t.allow(Some(a)));
        }
        assert!(!t.allow(Some(a)));
        assert!(!t.allow(Some(a)));
        assert!(t.allow(Some(b)), "another source has its own bucket");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_as_ipv4() {
        assert_eq!(
            key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            key("2001:db8:1:2:bbbb::9".parse().unwrap())
        );
        assert_ne!(
            key("2001:db8:1:2::1".parse().unwrap()),
            key("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_bucket_refills_at_its_rate_and_says_when() {
        let rate = Rate::new(40, 20.0);
        let t0 = Instant::now();
        let mut b = Bucket::full(&rate, t0);
        assert!((0..40).all(|_| b.take(&rate, t0)));
        assert!(!b.take(&rate, t0), "empty after the burst");
        let one = b.time_until(&rate, 1.0, t0);
        assert!((one.as_secs_f64() - 0.05).abs() < 1e-6, "{one:?}");
        let t1 = t0 + Duration::from_millis(50);
        assert!(b.take(&rate, t1) && !b.take(&rate, t1));
        // Never above the burst, however long it rests.
        let later = t1 + Duration::from_secs(3600);
        assert_eq!(b.level(&rate, later), 40.0);
        assert_eq!(b.time_until(&rate, 1000.0, later), Duration::ZERO);
        // A clock read earlier than the last take counts as no time.
        assert!(b.level(&rate, t0) < 1.0);
    }

    #[test]
    fn refills_over_time() {
        let t = Throttle::new(2, Duration::from_millis(100));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(t.allow(Some(a)) && t.allow(Some(a)));
        assert!(!t.allow(Some(a)));
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.allow(Some(a)));
    }
}
