//! The seed's rules for one incoming ban (`readdb.py`'s), as a pure
//! function: no fail2ban, no files, no clock of its own. [`decide`] takes
//! the event, what this host already knows about its IP ([`Facts`]: what
//! the shared jail's ignore list says of it; the bans fail2ban holds on it,
//! with their times; whether the node itself just wrote it; the shared
//! jail's bantime), the time, and the ratio, and
//! returns a [`Decision`] that the applier ([`super::Applier`]) carries out.
//!
//! The rules, in the order they apply:
//! 0. fail2ban's ignore list for the shared jail covers the IP
//!    ([`crate::node::ignore`]): refused, status 4, nothing applied.
//!    fail2ban's `banip` would ban it all the same, and its filter would
//!    drop the line, so the refusal is banmesh's to make and to report.
//! 1. The node wrote a line for this IP moments ago (two hosts reported
//!    it, and fail2ban may not have read the line yet): status 2.
//! 2. fail2ban bans the IP (in any jail) with more than `ratio` (default
//!    40%) of that ban's time left: status 2. A ban listed without times
//!    counts as fully fresh. At exactly `ratio`, rule 3 applies.
//! 3. It bans it with `ratio` or less left: no status yet (0), and the ban
//!    is applied again one second after the existing ban ends.
//! 4. The ban is over by its own time (older than the shared jail's
//!    bantime): not applied, no status.
//! 5. Otherwise it is added (status 1 once its line is written, 3 if that
//!    fails), and also banned through fail2ban's socket at once when it is
//!    young (less than [`FRESH`] of the bantime old) and the ignore list
//!    is known not to cover it; an older one, replayed after an outage,
//!    goes through the log only, whose line carries the ban's own time so
//!    that fail2ban ends it when it would have ended anyway. So does one
//!    the ignore list cannot vouch for ([`Verdict::Unknown`]): fail2ban's
//!    filter checks the line against its whole list.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{ban::Event, fail2ban::BanTime, node::ignore::Verdict};

/// Default share of a ban's time left above which a new ban is status 2.
pub const DEFAULT_RECENT_RATIO: f64 = 0.4;
/// A ban younger than this share of the shared jail's bantime also goes
/// through the socket (the fast path).
pub const FRESH: f64 = 0.1;
/// How long after the existing ban's end a deferred ban is applied.
const AFTER_END: Duration = Duration::from_secs(1);

/// What this host knows about an event's IP when the event arrives.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// What the shared jail's ignore list says of the IP.
    pub ignore: Verdict<'a>,
    /// One entry per jail in which fail2ban bans the IP: that ban's times,
    /// or `None` when fail2ban listed none. Empty: not banned here.
    pub held: &'a [Option<BanTime>],
    /// The node wrote a line for this IP moments ago.
    pub just_added: bool,
    /// The shared jail's bantime in seconds, if fail2ban told us (0 or
    /// negative: no limit).
    pub bantime: Option<i64>,
}

/// What to do with one incoming ban.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Write its line; with `fast_path`, ban it through the socket too.
    Add {
        /// Young enough (for its bantime) to ban at once through the socket,
        /// ahead of fail2ban's log polling.
        fast_path: bool,
    },
    /// Status 2: already banned here recently enough.
    AlreadyBanned,
    /// Status stays 0; apply it again at `at`, when the existing ban is over.
    Defer {
        /// Shortly after the existing ban ends.
        at: SystemTime,
    },
    /// Over by its own time: not applied, no status.
    Expired,
    /// Status 4: the shared jail's ignore list covers it; not applied.
    Ignored,
}

/// Applies the seed's rules (see the module doc) to one ban event.
pub fn decide(event: &Event, facts: &Facts<'_>, now: SystemTime, ratio: f64) -> Decision {
    if let Verdict::Ignored(_) = facts.ignore {
        return Decision::Ignored;
    }
    if facts.just_added {
        return Decision::AlreadyBanned;
    }
    // The jail whose ban has the most time left speaks for fail2ban.
    let mut best: Option<(f64, SystemTime)> = None;
    for held in facts.held {
        let (fraction, end) = held.map_or((1.0, now), |t| (t.fraction_left(now), t.end));
        if best.is_none_or(|(f, _)| fraction > f) {
            best = Some((fraction, end));
        }
    }
    match best {
        Some((fraction, _)) if fraction > ratio => return Decision::AlreadyBanned,
        Some((_, end)) => {
            return Decision::Defer {
                at: end + AFTER_END,
            };
        }
        None => {}
    }
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let age = (now_ms - event.created_ms).max(0) as f64 / 1000.0;
    let vouched = facts.ignore == Verdict::NotIgnored;
    match facts.bantime.filter(|b| *b > 0) {
        Some(b) if age >= b as f64 => Decision::Expired,
        Some(b) => Decision::Add {
            fast_path: vouched && age < FRESH * b as f64,
        },
        None => Decision::Add { fast_path: vouched },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ban::{Ban, EventKind};

    const DAY: i64 = 86_400;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_764_000_000)
    }

    /// A ban reported `age` seconds before [`now`].
    fn event(age: i64) -> Event {
        Event {
            id: 1,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", "192.0.2.1").unwrap(),
            added_by: "web-1".into(),
            created_ms: (1_764_000_000 - age) * 1000,
            lifts: 0,
            term: Default::default(),
        }
    }

    /// A day-long ban held by fail2ban with `left` seconds to run.
    fn held(left: i64) -> Option<BanTime> {
        Some(BanTime {
            bantime: DAY,
            end: now() + Duration::from_secs(left as u64),
        })
    }

    fn decide_with(held: &[Option<BanTime>], bantime: Option<i64>, age: i64) -> Decision {
        let facts = Facts {
            ignore: Verdict::NotIgnored,
            held,
            just_added: false,
            bantime,
        };
        decide(&event(age), &facts, now(), DEFAULT_RECENT_RATIO)
    }

    #[test]
    fn no_existing_ban_adds_through_the_fast_path() {
        assert_eq!(decide_with(&[], None, 0), Decision::Add { fast_path: true });
        assert_eq!(
            decide_with(&[], Some(DAY), 0),
            Decision::Add { fast_path: true }
        );
    }

    #[test]
    fn more_than_the_ratio_left_is_already_banned() {
        assert_eq!(
            decide_with(&[held(DAY / 2)], Some(DAY), 0),
            Decision::AlreadyBanned
        );
        // Listed without times: counts as fully fresh.
        assert_eq!(decide_with(&[None], None, 0), Decision::AlreadyBanned);
    }

    #[test]
    fn exactly_the_ratio_left_is_deferred_to_the_end_of_the_old_ban() {
        let left = (DAY as f64 * DEFAULT_RECENT_RATIO) as i64;
        let end = now() + Duration::from_secs(left as u64);
        assert_eq!(
            decide_with(&[held(left)], Some(DAY), 0),
            Decision::Defer {
                at: end + Duration::from_secs(1)
            }
        );
        // One second more and it is status 2.
        assert_eq!(
            decide_with(&[held(left + 1)], Some(DAY), 0),
            Decision::AlreadyBanned
        );
    }

    #[test]
    fn the_jail_with_most_time_left_decides() {
        assert_eq!(
            decide_with(&[held(60), held(DAY - 60)], None, 0),
            Decision::AlreadyBanned
        );
        let d = decide_with(&[held(60), held(120)], None, 0);
        assert_eq!(
            d,
            Decision::Defer {
                at: now() + Duration::from_secs(121)
            }
        );
    }

    #[test]
    fn just_added_is_already_banned_whatever_fail2ban_says() {
        let facts = Facts {
            ignore: Verdict::NotIgnored,
            held: &[],
            just_added: true,
            bantime: Some(DAY),
        };
        assert_eq!(
            decide(&event(0), &facts, now(), DEFAULT_RECENT_RATIO),
            Decision::AlreadyBanned
        );
    }

    #[test]
    fn the_window_edges_of_age() {
        // An expired ban is skipped; the edge itself is expired.
        assert_eq!(decide_with(&[], Some(DAY), DAY), Decision::Expired);
        assert_eq!(
            decide_with(&[], Some(DAY), DAY - 1),
            Decision::Add { fast_path: false }
        );
        // Fresh below a tenth of the bantime, log only from it on.
        let tenth = DAY / 10;
        assert_eq!(
            decide_with(&[], Some(DAY), tenth - 1),
            Decision::Add { fast_path: true }
        );
        assert_eq!(
            decide_with(&[], Some(DAY), tenth),
            Decision::Add { fast_path: false }
        );
        // A permanent or unknown bantime never expires a ban.
        assert_eq!(
            decide_with(&[], Some(-1), 10 * DAY),
            Decision::Add { fast_path: true }
        );
        assert_eq!(
            decide_with(&[], None, 10 * DAY),
            Decision::Add { fast_path: true }
        );
        // A ban from the future (clock skew) counts as new.
        assert_eq!(
            decide_with(&[], Some(DAY), -60),
            Decision::Add { fast_path: true }
        );
    }

    #[test]
    fn an_ignored_ip_is_refused_before_any_other_rule() {
        for (held, just_added) in [(&[][..], false), (&[held(DAY)][..], true)] {
            let facts = Facts {
                ignore: Verdict::Ignored("ignoreip 192.0.2.0/24"),
                held,
                just_added,
                bantime: Some(DAY),
            };
            assert_eq!(
                decide(&event(0), &facts, now(), DEFAULT_RECENT_RATIO),
                Decision::Ignored
            );
        }
    }

    #[test]
    fn an_unknown_ignore_list_leaves_the_ban_to_fail2ban_s_filter() {
        for bantime in [Some(DAY), None] {
            let facts = Facts {
                ignore: Verdict::Unknown,
                held: &[],
                just_added: false,
                bantime,
            };
            assert_eq!(
                decide(&event(0), &facts, now(), DEFAULT_RECENT_RATIO),
                Decision::Add { fast_path: false }
            );
        }
    }
}
