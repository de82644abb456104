//! The addresses whose `shared.log` line this node wrote lately, and when:
//! a repeat of one within [`RECENT`] is status 2 (fail2ban may not have
//! read the line yet), and an unban of one is lifted again for a while.
//!
//! Held small (issue 19: node RSS <= 15 MiB idle with 100,000 bans; a
//! catch-up fills this map with every ban for [`RECENT`]): an
//! [`AddrMap`] (an IPv4 address in 4 bytes) of `u32` times, 9 bytes a
//! slot instead of the 25 of a `HashMap<AddrKey, u64>` (3.3 MB -> 1.2 MB
//! with 100,000 addresses).
//!
//! Why a `u32` of milliseconds is enough: it wraps every ~49.7 days, and
//! times are compared by their difference as a signed 32-bit count
//! (right within ~24.8 days either way), while no entry lives longer than
//! [`RECENT`] + [`RECENT_SWEEP`]: [`Recent::sweep`] runs at least once a
//! second from the apply task's ticks and drops the older ones.
use std::time::{Duration, Instant};

use crate::node::lifts::{AddrKey, AddrMap};

/// How long an IP we wrote counts as "just added" for a repeat.
pub const RECENT: Duration = Duration::from_secs(120);
/// How often addresses written longer than [`RECENT`] ago are dropped
/// from memory (a lookup checks the time itself, so this is only memory:
/// not a scan of every recent address per batch).
const RECENT_SWEEP: Duration = Duration::from_secs(30);

/// Addresses written lately, and when.
pub struct Recent {
    /// When each was written, in ms after `epoch`, wrapping.
    lines: AddrMap<u32>,
    /// When `lines` was last swept of old addresses.
    swept: Instant,
    /// What the times count from.
    epoch: Instant,
}

impl Recent {
    /// None written yet.
    pub fn new() -> Self {
        let now = Instant::now();
        Recent {
            lines: AddrMap::new(),
            swept: now,
            epoch: now,
        }
    }

    /// `at` in the map's count (ms after its epoch, wrapping).
    fn ms(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// The lines of `ips` were written at `at`.
    pub fn wrote(&mut self, ips: impl IntoIterator<Item = AddrKey>, at: Instant) {
        let at = self.ms(at);
        self.lines.extend(ips.into_iter().map(|ip| (ip, at)));
    }

    /// Whether `ip`'s line was written less than [`RECENT`] before `now`.
    pub fn holds(&self, ip: AddrKey, now: Instant) -> bool {
        let now = self.ms(now);
        self.lines.get(&ip).is_some_and(|&t| within(t, now))
    }

    /// Forgets `ip`'s line; whether it was written less than [`RECENT`]
    /// before `now`.
    pub fn forget(&mut self, ip: AddrKey, now: Instant) -> bool {
        let now = self.ms(now);
        self.lines.remove(&ip).is_some_and(|t| within(t, now))
    }

    /// Drops the addresses written [`RECENT`] or longer before `now`, at
    /// most once per [`RECENT_SWEEP`], and gives back the slots of a
    /// catch-up's thousands once they are gone.
    pub fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.swept) < RECENT_SWEEP {
            return;
        }
        self.swept = now;
        let now = self.ms(now);
        self.lines.retain(|&t| within(t, now));
        self.lines.shrink_if_sparse();
    }
}

/// Whether a line written at `written` is less than [`RECENT`] before
/// `now` (both in the map's wrapping count; a `written` after `now` is).
fn within(written: u32, now: u32) -> bool {
    (now.wrapping_sub(written) as i32) < RECENT.as_millis() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_holds_across_the_counts_wrap() {
        let recent = RECENT.as_millis() as u32;
        for written in [0, 5, u32::MAX - 10, u32::MAX] {
            assert!(within(written, written));
            assert!(within(written, written.wrapping_add(recent - 1)));
            assert!(!within(written, written.wrapping_add(recent)));
            assert!(
                within(written, written.wrapping_sub(3)),
                "written after now"
            );
        }
    }

    #[test]
    fn lines_are_held_for_the_window_then_swept() {
        let k = |ip| AddrKey::parse(ip).unwrap();
        let mut r = Recent::new();
        let t0 = r.epoch;
        r.wrote([k("192.0.2.1"), k("2001:db8::1")], t0);
        assert!(r.holds(k("192.0.2.1"), t0 + RECENT - Duration::from_millis(1)));
        assert!(!r.holds(k("192.0.2.1"), t0 + RECENT));
        assert!(!r.holds(k("192.0.2.2"), t0));
        assert!(r.forget(k("2001:db8::1"), t0 + Duration::from_secs(1)));
        assert!(!r.forget(k("2001:db8::1"), t0 + Duration::from_secs(1)));
        r.sweep(t0 + RECENT_SWEEP - Duration::from_millis(1));
        assert_eq!(r.lines.len(), 1, "not yet time to sweep");
        r.sweep(t0 + RECENT);
        assert!(r.lines.is_empty());
    }
}
