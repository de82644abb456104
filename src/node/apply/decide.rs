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
//!    ([`crate::node::ignore`]): refused, status 4, nothing applied (for
//!    this host's own report: status 1, its own jail banned it).
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
//!
//! A ban with a fleet end `F` (`term.ends_ms` > 0, from the hub's ladder)
//! lasts until `F` on every host, not for the shared jail's bantime; the
//! node lifts it at `F` itself ([`crate::node::lifts`]). Rules 1-5 above
//! hold only for bans without one (stored before the ladder), exactly as
//! before. After rule 0:
//! 6. `F` has passed: expired (rule 4; status 1 if this host reported it).
//! 7. The shared jail holds the IP (a scheduled lift still ahead, or
//!    fail2ban lists it there): an update (`term.extends`), or a ban that
//!    ends later than that hold, only moves the scheduled lift (status 1);
//!    otherwise status 2 (1 for this host's own report).
//! 8. This host reported it ([`Reporter::Own`]): its own jail banned it,
//!    and fail2ban lists that ban's end (`get JAIL banip --with-time`, read
//!    for rule 2 anyway). If a jail of this host holds it to `F`, status 1
//!    and nothing more; if not (its own ban ends sooner, or is over), it is
//!    also held in the shared jail until `F` (rule 11), status 1 all the
//!    same. The exact end, not the event's time plus the jail's bantime:
//!    fail2ban's ban starts at its log line's time, 0.3-1 s before the
//!    hub's commit. Without a control socket the own jail alone holds it
//!    (nothing could lift a hold at `F`).
//! 9. The node wrote a line for it moments ago: status 2 (rule 1).
//! 10. Another jail of this host bans it: status 2 if that ban lasts to
//!    `F` (the fleet's ban is covered whatever share of time is left, so
//!    the 40 % ratio is not needed), else deferred to one second after
//!    that ban ends (rule 3), so the host still holds it until `F`.
//! 11. Otherwise added (rule 5), through the socket too when younger than
//!    [`FRESH`] of its own duration (`F` - its time).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{ban::Event, fail2ban::BanTime, node::ignore::Verdict};

/// Default share of a ban's time left above which a new ban is status 2.
pub const DEFAULT_RECENT_RATIO: f64 = 0.4;
/// A ban younger than this share of its duration (its own, or the shared
/// jail's bantime for a ban without a fleet end) also goes through the
/// socket (the fast path).
pub const FRESH: f64 = 0.1;
/// How long after the existing ban's end a deferred ban is applied.
const AFTER_END: Duration = Duration::from_secs(1);

/// One jail's ban of the IP, as fail2ban lists it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Held {
    /// The ban is the `shared` jail's (the fleet's, on this host).
    pub shared: bool,
    /// Its times, or `None` when fail2ban listed none.
    pub time: Option<BanTime>,
}

/// Who reported the event, as far as applying it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// Another host: the ban is applied here through the `shared` jail.
    Other,
    /// This host: its own jail (sshd, say) banned the address before
    /// reporting it, and [`Facts::held`] says until when.
    Own {
        /// The node can hold it in the `shared` jail and lift it at the
        /// fleet's end (it has fail2ban's control socket); without, the own
        /// jail alone holds it.
        can_hold: bool,
    },
}

/// What this host knows about an event's IP when the event arrives.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// What the shared jail's ignore list says of the IP.
    pub ignore: Verdict<'a>,
    /// One entry per jail in which fail2ban bans the IP. Empty: not banned
    /// here.
    pub held: &'a [Held],
    /// The node wrote a line for this IP moments ago.
    pub just_added: bool,
    /// The shared jail's bantime in seconds, if fail2ban told us (0 or
    /// negative: no limit).
    pub bantime: Option<i64>,
    /// The end of this host's scheduled lift of the IP (Unix ms), if any
    /// ([`crate::node::lifts`]): the fleet end the `shared` jail holds it to.
    pub scheduled: Option<i64>,
    /// Whether this host reported the ban itself.
    pub reporter: Reporter,
}

/// What to do with one incoming ban.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Write its line; with `fast_path`, ban it through the socket too.
    /// With a fleet end, its lift is scheduled first.
    Add {
        /// Young enough (for its duration) to ban at once through the
        /// socket, ahead of fail2ban's log polling.
        fast_path: bool,
    },
    /// Status 1: the `shared` jail holds the IP already; only its
    /// scheduled lift moves to the event's end (kept if it is later).
    Extend,
    /// Status 1, nothing applied: this host's own report, which its own
    /// jail bans at least until the fleet's end (or which has none).
    Own,
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

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Applies the seed's rules (see the module doc) to one ban event.
pub fn decide(event: &Event, facts: &Facts<'_>, now: SystemTime, ratio: f64) -> Decision {
    if let Verdict::Ignored(_) = facts.ignore {
        // This host's own jail banned it whatever the shared jail ignores:
        // not refused (4), just not held in the shared jail.
        return match facts.reporter {
            Reporter::Own { .. } => Decision::Own,
            Reporter::Other => Decision::Ignored,
        };
    }
    if event.term.ends_ms > 0 {
        return decide_fleet_end(event, facts, now);
    }
    if let Reporter::Own { .. } = facts.reporter {
        return Decision::Own;
    }
    if facts.just_added {
        return Decision::AlreadyBanned;
    }
    // The jail whose ban has the most time left speaks for fail2ban.
    let mut best: Option<(f64, SystemTime)> = None;
    for held in facts.held {
        let (fraction, end) = held
            .time
            .map_or((1.0, now), |t| (t.fraction_left(now), t.end));
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
    let age = (ms(now) - event.created_ms).max(0) as f64 / 1000.0;
    let vouched = facts.ignore == Verdict::NotIgnored;
    match facts.bantime.filter(|b| *b > 0) {
        Some(b) if age >= b as f64 => Decision::Expired,
        Some(b) => Decision::Add {
            fast_path: vouched && age < FRESH * b as f64,
        },
        None => Decision::Add { fast_path: vouched },
    }
}

/// The rules for a ban with a fleet end `F` (`term.ends_ms`): see the
/// module doc, rules 6 to 11.
fn decide_fleet_end(event: &Event, facts: &Facts<'_>, now: SystemTime) -> Decision {
    let fleet_end = event.term.ends_ms;
    let now_ms = ms(now);
    let own = match facts.reporter {
        Reporter::Own { can_hold } => Some(can_hold),
        Reporter::Other => None,
    };
    if fleet_end <= now_ms {
        return if own.is_some() {
            Decision::Own
        } else {
            Decision::Expired
        };
    }
    // Until when the shared jail holds it: our scheduled lift while it is
    // ahead (the line may not be read yet: `just_added`), else fail2ban's
    // own end for it (a ban from before the ladder; no times: for ever).
    // A scheduled lift already due means that hold is over (the lift may
    // not have run yet): neither it nor its line counts.
    let in_shared = facts.held.iter().find(|h| h.shared);
    let shared_until = match facts.scheduled {
        Some(s) if s > now_ms && (in_shared.is_some() || facts.just_added) => Some(s),
        Some(_) => None,
        None => in_shared.map(|h| h.time.map_or(i64::MAX, |t| ms(t.end))),
    };
    if let Some(until) = shared_until {
        return if until < fleet_end || event.term.extends != 0 {
            Decision::Extend
        } else if own.is_some() {
            Decision::Own
        } else {
            Decision::AlreadyBanned
        };
    }
    let vouched = facts.ignore == Verdict::NotIgnored;
    let age = (now_ms - event.created_ms).max(0) as f64;
    let duration = (fleet_end - event.created_ms).max(1) as f64;
    let add = Decision::Add {
        fast_path: vouched && age < FRESH * duration,
    };
    if facts.just_added && facts.scheduled.is_none() && own.is_none() {
        return Decision::AlreadyBanned;
    }
    // Another jail of this host (sshd, say) bans it: status 2 if that ban
    // lasts to the fleet's end, else the fleet's ban follows it.
    let other_end = facts
        .held
        .iter()
        .filter(|h| !h.shared)
        .map(|h| h.time.map_or(i64::MAX, |t| ms(t.end)))
        .max();
    if let Some(can_hold) = own {
        let covered = other_end.is_some_and(|end| end >= fleet_end);
        return if covered || !can_hold {
            Decision::Own
        } else {
            add
        };
    }
    match other_end {
        Some(end) if end >= fleet_end => Decision::AlreadyBanned,
        Some(end) => Decision::Defer {
            at: UNIX_EPOCH + Duration::from_millis(end.max(0) as u64) + AFTER_END,
        },
        None => add,
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

    /// A day-long ban held by another jail with `left` seconds to run.
    fn held(left: i64) -> Held {
        Held {
            shared: false,
            time: Some(BanTime {
                bantime: DAY,
                end: now() + Duration::from_secs(left as u64),
            }),
        }
    }

    const UNTIMED: Held = Held {
        shared: false,
        time: None,
    };

    fn facts(held: &[Held]) -> Facts<'_> {
        Facts {
            ignore: Verdict::NotIgnored,
            held,
            just_added: false,
            bantime: Some(DAY),
            scheduled: None,
            reporter: Reporter::Other,
        }
    }

    fn decide_with(held: &[Held], bantime: Option<i64>, age: i64) -> Decision {
        let facts = Facts {
            bantime,
            ..facts(held)
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
        assert_eq!(decide_with(&[UNTIMED], None, 0), Decision::AlreadyBanned);
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
            just_added: true,
            ..facts(&[])
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
                just_added,
                ..facts(held)
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
                bantime,
                ..facts(&[])
            };
            assert_eq!(
                decide(&event(0), &facts, now(), DEFAULT_RECENT_RATIO),
                Decision::Add { fast_path: false }
            );
        }
    }

    /// A ban reported `age_ms` before [`now`] that the fleet holds `dur_ms`.
    fn ladder(age_ms: i64, dur_ms: i64) -> Event {
        let mut e = event(0);
        e.created_ms -= age_ms;
        e.term.ends_ms = e.created_ms + dur_ms;
        e.term.rung = 1;
        e
    }

    fn shared(left_ms: i64) -> Held {
        Held {
            shared: true,
            time: Some(BanTime {
                bantime: 25 * DAY,
                end: now() + Duration::from_millis(left_ms as u64),
            }),
        }
    }

    fn at(event: &Event, facts: &Facts<'_>) -> Decision {
        decide(event, facts, now(), DEFAULT_RECENT_RATIO)
    }

    #[test]
    fn a_fleet_end_replaces_the_shared_jail_s_bantime() {
        // Older than the shared jail's bantime, but the fleet holds it longer.
        assert_eq!(
            at(&ladder(2 * DAY * 1000, 3 * DAY * 1000), &facts(&[])),
            Decision::Add { fast_path: false }
        );
        // Its end passed: expired, whatever the bantime.
        assert_eq!(at(&ladder(2_000, 2_000), &facts(&[])), Decision::Expired);
        assert_eq!(at(&ladder(2_001, 2_000), &facts(&[])), Decision::Expired);
        // Fresh relative to its own duration: a tenth of 2 s.
        assert_eq!(
            at(&ladder(199, 2_000), &facts(&[])),
            Decision::Add { fast_path: true }
        );
        assert_eq!(
            at(&ladder(200, 2_000), &facts(&[])),
            Decision::Add { fast_path: false }
        );
    }

    #[test]
    fn a_held_shared_ban_only_moves_its_lift() {
        let end = |e: &Event| e.term.ends_ms;
        let e = ladder(0, 8_000);
        let held = [shared(25 * DAY * 1000)];
        // Our lift is due before the new end: moved (status 1).
        let f = Facts {
            scheduled: Some(end(&e) - 4_000),
            ..facts(&held)
        };
        assert_eq!(at(&e, &f), Decision::Extend);
        // Due at or after it: already banned.
        let f = Facts {
            scheduled: Some(end(&e)),
            ..facts(&held)
        };
        assert_eq!(at(&e, &f), Decision::AlreadyBanned);
        // An update is status 1 either way.
        let mut update = e.clone();
        update.term.extends = 1;
        assert_eq!(at(&update, &f), Decision::Extend);
        // A line just written counts as held while fail2ban reads it.
        let f = Facts {
            scheduled: Some(end(&e) - 4_000),
            just_added: true,
            ..facts(&[])
        };
        assert_eq!(at(&e, &f), Decision::Extend);
        // A schedule with nothing held (fail2ban lost it) is no hold: added again.
        let f = Facts {
            scheduled: Some(end(&e) - 4_000),
            ..facts(&[])
        };
        assert_eq!(at(&update, &f), Decision::Add { fast_path: true });
        // A lift already due (it may not have run yet) holds nothing, nor
        // does the line written for that ban: the next rung is added.
        let f = Facts {
            scheduled: Some(ms(now())),
            just_added: true,
            ..facts(&held)
        };
        assert_eq!(at(&e, &f), Decision::Add { fast_path: true });
        // A shared ban without a scheduled lift (from before the ladder)
        // holds it until fail2ban's own end.
        assert_eq!(at(&e, &facts(&[shared(4_000)])), Decision::Extend);
        assert_eq!(at(&e, &facts(&[shared(9_000)])), Decision::AlreadyBanned);
    }

    #[test]
    fn another_jail_covers_a_fleet_ban_only_to_its_end() {
        // sshd holds it 60 s more (a small share of its day): covers 8 s.
        assert_eq!(
            at(&ladder(0, 8_000), &facts(&[held(60)])),
            Decision::AlreadyBanned
        );
        assert_eq!(
            at(&ladder(0, 8_000), &facts(&[UNTIMED])),
            Decision::AlreadyBanned
        );
        // It ends before the fleet's end: the fleet's ban follows it.
        assert_eq!(
            at(&ladder(0, 120_000), &facts(&[held(60)])),
            Decision::Defer {
                at: now() + Duration::from_secs(61)
            }
        );
    }

    #[test]
    fn own_reports_are_held_in_the_shared_jail_past_the_own_ban() {
        let own = |held| Facts {
            reporter: Reporter::Own { can_hold: true },
            ..facts(held)
        };
        let hour = [held(3_600)];
        // The own jail's hour covers a 2 s fleet ban, and one listed
        // without times counts as for ever.
        assert_eq!(at(&ladder(0, 2_000), &own(&hour)), Decision::Own);
        assert_eq!(
            at(&ladder(0, 2_000 * DAY * 1000), &own(&[UNTIMED])),
            Decision::Own
        );
        // A fleet end past it, or the own ban already over: held in the
        // shared jail too.
        assert_eq!(
            at(&ladder(0, 7_200_000), &own(&hour)),
            Decision::Add { fast_path: true }
        );
        assert_eq!(
            at(&ladder(0, 2_000), &own(&[])),
            Decision::Add { fast_path: true }
        );
        // Never status 2 (a line of ours just written, a lift behind);
        // nothing for one without a fleet end or already over.
        let just = Facts {
            just_added: true,
            scheduled: Some(1),
            ..own(&hour)
        };
        assert_eq!(at(&ladder(0, 2_000), &just), Decision::Own);
        assert_eq!(at(&event(0), &own(&[])), Decision::Own);
        assert_eq!(at(&ladder(5_000, 2_000), &own(&[])), Decision::Own);
        let in_shared = [shared(60_000)];
        assert_eq!(at(&ladder(0, 8_000), &own(&in_shared)), Decision::Own);
        // Without a control socket the own jail alone holds it.
        let no_socket = Facts {
            reporter: Reporter::Own { can_hold: false },
            ..facts(&[])
        };
        assert_eq!(at(&ladder(0, 2_000), &no_socket), Decision::Own);
        // The shared jail's ignore list does not refuse what the own jail banned.
        let ignored = Facts {
            ignore: Verdict::Ignored("ignoreip 192.0.2.1"),
            ..own(&[])
        };
        assert_eq!(at(&ladder(0, 2_000), &ignored), Decision::Own);
    }
}
