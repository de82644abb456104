//! The escalation ladder: how long the fleet bans an address, from its
//! fleet history. Pure policy, no I/O: the committer asks it about every
//! report, with what the store knows of the address (its latest ban).
//!
//! Rules (README "Repeat offenders" tells them with a timeline):
//! - An address with no ban in its history gets the first rung.
//! - A new ban of an address whose latest earlier ban ended within the
//!   window before now (or has not ended) gets that ban's rung plus one;
//!   the top rung holds. Older history is forgotten by time alone.
//! - A ban stored before the ladder existed (no rung, no end) counts as
//!   rung 1 ending at its creation plus the first rung.
//! - An admin's `unban --forget` marks the address's bans forgotten: they
//!   count for nothing, and the next ban starts again on the first rung.
//!   A plain `unban` lifts the ban but keeps its place in the history.
//! - One fleet ban per address at a time: a report of an address whose
//!   latest ban is active (not lifted, not ended) is recorded against that
//!   ban ([`Decision::Coalesce`]); only when that ban is more than half over
//!   does the report move it to the next rung, counted from now
//!   ([`Decision::Extend`]): the address keeps attacking the fleet while
//!   banned, and a short ban about to end would let it straight back.
use std::time::Duration;

use thiserror::Error;

/// The default ladder: start low (a legitimate user who mistyped a
/// password loses a quarter of an hour, not days), reach 25 days for an
/// address that keeps coming back.
pub const DEFAULT_LADDER: &str = "15m,1h,6h,1d,5d,25d";
/// The default memory: a ban that ended more than 30 days ago no longer
/// moves an address up the ladder.
pub const DEFAULT_WINDOW: &str = "30d";
/// Most rungs a ladder may have (the store keeps a rung in a small integer).
pub const MAX_RUNGS: usize = 100;

/// Why a `--ladder` or `--ladder-window` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LadderError {
    /// No rung given.
    #[error(
        "the ladder is empty: give ban durations, shortest first, e.g. --ladder {DEFAULT_LADDER}"
    )]
    Empty,
    /// A rung (or the window) that is not a number followed by s, m, h or d.
    #[error(
        "{0:?} is not a duration: write a whole number followed by s, m, h or d (e.g. 15m, 6h, 25d)"
    )]
    Unparsable(String),
    /// A zero duration: a ban that ends as it starts.
    #[error("{0:?} is zero: every ban duration and the window must be longer than nothing")]
    Zero(String),
    /// A rung shorter than the one before it.
    #[error(
        "rung {rung} ({given}) is shorter than the one before it: a repeat offence must never be banned for less"
    )]
    Shorter {
        /// 1-based rung number.
        rung: usize,
        /// The duration as given.
        given: String,
    },
    /// More rungs than the store can number.
    #[error("the ladder has {0} rungs; at most {MAX_RUNGS} are allowed")]
    TooLong(usize),
}

/// Parses one duration: a whole number and a unit, `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, LadderError> {
    let t = s.trim();
    let bad = || LadderError::Unparsable(s.to_string());
    let unit = t.chars().last().ok_or_else(bad)?;
    let secs_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(LadderError::Zero(s.to_string()));
    }
    let secs = n.checked_mul(secs_per).ok_or_else(bad)?;
    // Milliseconds must fit an i64 with room for a timestamp added.
    if secs > 100 * 365 * 86_400 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

/// `d` as the shortest text [`parse_duration`] reads back.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, per) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= per && s.is_multiple_of(per) {
            return format!("{}{unit}", s / per);
        }
    }
    format!("{s}s")
}

/// The ladder in force at the hub (`--ladder`, `--ladder-window`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    rungs: Vec<Duration>,
    window: Duration,
}

impl Default for Ladder {
    fn default() -> Self {
        Ladder::parse(DEFAULT_LADDER, DEFAULT_WINDOW).expect("the default ladder parses")
    }
}

impl std::fmt::Display for Ladder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rungs: Vec<String> = self.rungs.iter().map(|d| format_duration(*d)).collect();
        write!(
            f,
            "{} (window {})",
            rungs.join(","),
            format_duration(self.window)
        )
    }
}

/// A ban in an address's history, as the ladder needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PastBan {
    /// When the hub committed it, Unix ms.
    pub created_ms: i64,
    /// Its fleet end, Unix ms; 0 for a ban stored before the ladder.
    pub ends_ms: i64,
    /// Its rung; 0 for a ban stored before the ladder.
    pub rung: u32,
    /// An unban lifted it.
    pub lifted: bool,
    /// An admin's `unban --forget` cleared it from the history.
    pub forgotten: bool,
}

/// What the fleet does with one report of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A new fleet ban on this rung, ending then (Unix ms).
    New {
        /// 1 for a first offence.
        rung: u32,
        /// When the fleet lifts it.
        ends_ms: i64,
    },
    /// The latest ban is active: record the report against it, fan nothing out.
    Coalesce,
    /// The latest ban is active but more than half over: one update event
    /// moves it to this rung and end.
    Extend {
        /// The new rung.
        rung: u32,
        /// The new end, later than the active ban's.
        ends_ms: i64,
    },
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl Ladder {
    /// A ladder from its rungs, shortest first, and its window.
    pub fn new(rungs: Vec<Duration>, window: Duration) -> Result<Self, LadderError> {
        if rungs.is_empty() {
            return Err(LadderError::Empty);
        }
        if rungs.len() > MAX_RUNGS {
            return Err(LadderError::TooLong(rungs.len()));
        }
        for (i, d) in rungs.iter().enumerate() {
            if d.is_zero() {
                return Err(LadderError::Zero(format_duration(*d)));
            }
            if i > 0 && *d < rungs[i - 1] {
                return Err(LadderError::Shorter {
                    rung: i + 1,
                    given: format_duration(*d),
                });
            }
        }
        if window.is_zero() {
            return Err(LadderError::Zero("window".into()));
        }
        Ok(Ladder { rungs, window })
    }

    /// Parses `--ladder` (`15m,1h,6h`) and `--ladder-window` (`30d`).
    pub fn parse(rungs: &str, window: &str) -> Result<Self, LadderError> {
        let rungs: Vec<Duration> = rungs
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(parse_duration)
            .collect::<Result<_, _>>()?;
        Ladder::new(rungs, parse_duration(window)?)
    }

    /// The ban durations, first offence first.
    pub fn rungs(&self) -> &[Duration] {
        &self.rungs
    }

    /// How long a ban's end stays in an address's history.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The highest rung (the number of rungs).
    pub fn top(&self) -> u32 {
        self.rungs.len() as u32
    }

    /// How long a ban on `rung` lasts (1-based; past the top, the top's).
    pub fn duration(&self, rung: u32) -> Duration {
        let i = (rung.max(1) as usize).min(self.rungs.len()) - 1;
        self.rungs[i]
    }

    /// A past ban's (rung, end), with a ban from before the ladder read as
    /// rung 1 ending one first rung after it was created.
    pub fn term_of(&self, b: &PastBan) -> (u32, i64) {
        let ends = if b.ends_ms > 0 {
            b.ends_ms
        } else {
            b.created_ms.saturating_add(ms(self.rungs[0]))
        };
        (b.rung.max(1), ends)
    }

    /// The rung a new ban gets after `latest`, the address's latest ban.
    pub fn next_rung(&self, latest: Option<&PastBan>, now_ms: i64) -> u32 {
        match latest.filter(|b| !b.forgotten) {
            Some(b) => {
                let (rung, ends) = self.term_of(b);
                if ends >= now_ms.saturating_sub(ms(self.window)) {
                    (rung + 1).min(self.top())
                } else {
                    1
                }
            }
            None => 1,
        }
    }

    /// What a report of an address does, given its latest ban.
    pub fn decide(&self, latest: Option<&PastBan>, now_ms: i64) -> Decision {
        if let Some(b) = latest.filter(|b| !b.forgotten && !b.lifted) {
            let (rung, ends) = self.term_of(b);
            if ends > now_ms {
                let half_over = (now_ms - b.created_ms).saturating_mul(2) > ends - b.created_ms;
                let next = (rung + 1).min(self.top());
                let ends_next = now_ms.saturating_add(ms(self.duration(next)));
                return if half_over && ends_next > ends {
                    Decision::Extend {
                        rung: next,
                        ends_ms: ends_next,
                    }
                } else {
                    Decision::Coalesce
                };
            }
        }
        let rung = self.next_rung(latest, now_ms);
        Decision::New {
            rung,
            ends_ms: now_ms.saturating_add(ms(self.duration(rung))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;

    fn ban(created_ms: i64, ends_ms: i64, rung: u32) -> PastBan {
        PastBan {
            created_ms,
            ends_ms,
            rung,
            lifted: false,
            forgotten: false,
        }
    }

    #[test]
    fn parses_the_default_and_refuses_bad_ladders_clearly() {
        let l = Ladder::default();
        assert_eq!(l.top(), 6);
        assert_eq!(l.duration(1), Duration::from_secs(15 * 60));
        assert_eq!(l.duration(6), Duration::from_secs(25 * 86_400));
        assert_eq!(l.window(), Duration::from_secs(30 * 86_400));
        assert_eq!(l.to_string(), "15m,1h,6h,1d,5d,25d (window 30d)");
        assert_eq!(Ladder::parse("", "1d"), Err(LadderError::Empty));
        assert_eq!(
            Ladder::parse("15m,0h", "1d"),
            Err(LadderError::Zero("0h".into()))
        );
        assert_eq!(
            Ladder::parse("15m,1w", "1d"),
            Err(LadderError::Unparsable("1w".into()))
        );
        assert_eq!(
            Ladder::parse("1h,15m", "1d"),
            Err(LadderError::Shorter {
                rung: 2,
                given: "15m".into()
            })
        );
        assert!(matches!(
            Ladder::parse("1h", "0d"),
            Err(LadderError::Zero(_))
        ));
        assert!(matches!(
            Ladder::parse("h", "1d"),
            Err(LadderError::Unparsable(_))
        ));
        assert!(Ladder::parse("-1h", "1d").is_err());
        let msg = Ladder::parse("1h,x", "1d").unwrap_err().to_string();
        assert!(msg.contains("s, m, h or d"), "{msg}");
        assert_eq!(Ladder::parse("2s, 4s,8s", "1m").unwrap().top(), 3);
    }

    #[test]
    fn a_first_offence_gets_the_first_rung() {
        let l = Ladder::default();
        let now = 1_000 * DAY;
        assert_eq!(
            l.decide(None, now),
            Decision::New {
                rung: 1,
                ends_ms: now + 15 * MIN
            }
        );
    }

    #[test]
    fn a_repeat_within_the_window_climbs_and_the_top_rung_holds() {
        let l = Ladder::default();
        let now = 1_000 * DAY;
        for (rung, next, dur) in [
            (1, 2, HOUR),
            (2, 3, 6 * HOUR),
            (5, 6, 25 * DAY),
            (6, 6, 25 * DAY),
        ] {
            let past = ban(now - 2 * DAY, now - DAY, rung);
            assert_eq!(
                l.decide(Some(&past), now),
                Decision::New {
                    rung: next,
                    ends_ms: now + dur
                },
                "after rung {rung}"
            );
        }
    }

    #[test]
    fn the_window_counts_from_the_end_of_the_latest_ban_inclusive() {
        let l = Ladder::default();
        let now = 1_000 * DAY;
        let ended_at_edge = ban(now - 31 * DAY, now - 30 * DAY, 3);
        assert_eq!(l.next_rung(Some(&ended_at_edge), now), 4);
        let ended_before = ban(now - 31 * DAY, now - 30 * DAY - 1, 3);
        assert_eq!(l.next_rung(Some(&ended_before), now), 1);
    }

    #[test]
    fn a_ban_from_before_the_ladder_counts_as_rung_one() {
        let l = Ladder::default();
        let now = 1_000 * DAY;
        let old = ban(now - DAY, 0, 0);
        assert_eq!(l.term_of(&old), (1, now - DAY + 15 * MIN));
        assert_eq!(l.next_rung(Some(&old), now), 2);
        // Created 31 days ago: its implied end left the window.
        let older = ban(now - 31 * DAY, 0, 0);
        assert_eq!(l.next_rung(Some(&older), now), 1);
        // Still running by its implied end: coalesced.
        let fresh = ban(now - MIN, 0, 0);
        assert_eq!(l.decide(Some(&fresh), now), Decision::Coalesce);
    }

    #[test]
    fn forget_resets_and_a_plain_unban_keeps_the_history() {
        let l = Ladder::default();
        let now = 1_000 * DAY;
        let mut past = ban(now - 10 * MIN, now + 50 * MIN, 2);
        past.lifted = true;
        assert_eq!(
            l.decide(Some(&past), now),
            Decision::New {
                rung: 3,
                ends_ms: now + 6 * HOUR
            },
            "lifted, not forgotten: the next rung"
        );
        past.forgotten = true;
        assert_eq!(
            l.decide(Some(&past), now),
            Decision::New {
                rung: 1,
                ends_ms: now + 15 * MIN
            }
        );
    }

    #[test]
    fn an_active_ban_coalesces_until_half_over_then_extends() {
        let l = Ladder::default();
        let t0 = 1_000 * DAY;
        let active = ban(t0, t0 + HOUR, 2);
        assert_eq!(l.decide(Some(&active), t0), Decision::Coalesce);
        assert_eq!(
            l.decide(Some(&active), t0 + 30 * MIN),
            Decision::Coalesce,
            "exactly half"
        );
        assert_eq!(
            l.decide(Some(&active), t0 + 30 * MIN + 1),
            Decision::Extend {
                rung: 3,
                ends_ms: t0 + 30 * MIN + 1 + 6 * HOUR
            }
        );
        // Ended: a new ban on the next rung.
        assert_eq!(
            l.decide(Some(&active), t0 + HOUR),
            Decision::New {
                rung: 3,
                ends_ms: t0 + HOUR + 6 * HOUR
            }
        );
        // At the top, an extension still pushes the end out.
        let top = ban(t0, t0 + 25 * DAY, 6);
        assert_eq!(
            l.decide(Some(&top), t0 + 20 * DAY),
            Decision::Extend {
                rung: 6,
                ends_ms: t0 + 45 * DAY
            }
        );
    }
}
