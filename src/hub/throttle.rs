//! A token bucket per source address, for the one call anyone may make
//! (`Enroll`): [`ENROL_BURST`] attempts at once, refilled at that many a
//! minute.
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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-source token buckets; see the module doc.
#[derive(Debug)]
pub struct Throttle {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    burst: f64,
    per_second: f64,
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
            burst: f64::from(burst),
            per_second: f64::from(burst) / refill.as_secs_f64().max(1e-3),
        }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_second).min(self.burst)
    }

    /// Takes one attempt from `source`'s bucket; false when it is empty.
    /// A call without a known source shares one bucket with all such.
    pub fn allow(&self, source: Option<IpAddr>) -> bool {
        let key = source.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), key);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&key) {
            buckets.retain(|_, b| self.level(b, now) < self.burst);
            if buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let level = self.level(bucket, now);
        *bucket = Bucket {
            tokens: if level >= 1.0 { level - 1.0 } else { level },
            at: now,
        };
        level >= 1.0
    }
}

/// The address a bucket is kept for.
fn key(ip: IpAddr) -> IpAddr {
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
    fn refills_over_time() {
        let t = Throttle::new(2, Duration::from_millis(100));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(t.allow(Some(a)) && t.allow(Some(a)));
        assert!(!t.allow(Some(a)));
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.allow(Some(a)));
    }
}
