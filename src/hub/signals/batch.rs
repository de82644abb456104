//! One `SendSignals` batch, checked at the edge: each signal is converted
//! to an [`Incoming`] or ignored (and counted), so the aggregator only
//! ever sees addresses, kinds and times it can use.
//!
//! A signal is ignored, never an error for the whole batch, when: its
//! kind is unknown or turned off, its address is not one, its jail or
//! protocol is malformed (a probe is "tcp" or "udp" and ports 1-65535),
//! its time is more than [`FUTURE_SLACK_S`] ahead of the hub's clock or
//! older than its window, or its address is on the fleet allow-list or is
//! a fleet member's (those are never banned; skipping them early saves
//! the aggregator's work).
use std::net::IpAddr;

use super::windows::{FUTURE_SLACK_S, Observed, Thresholds};
use crate::{ban, proto};

/// A signal that passed the edge's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// The address, canonical.
    pub ip: IpAddr,
    /// When the node observed it, Unix ms.
    pub at_ms: i64,
    /// What it observed.
    pub what: Observed,
}

/// Converts one signal; `None` when it is ignored (see the module doc).
/// `allowed` says whether an address is on the allow-list or the fleet's.
pub fn check(
    s: &proto::Signal,
    t: &Thresholds,
    now_ms: i64,
    allowed: impl Fn(IpAddr) -> bool,
) -> Option<Incoming> {
    let (what, window) = match proto::SignalKind::try_from(s.kind).ok()? {
        proto::SignalKind::Failure => {
            let jail_ok = (1..=ban::MAX_JAIL_LEN).contains(&s.jail.len())
                && s.jail
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b));
            if t.fleet_maxretry == 0 || !jail_ok {
                return None;
            }
            (Observed::Failure, t.fleet_findtime)
        }
        proto::SignalKind::Probe => {
            let udp = match s.protocol.to_ascii_lowercase().as_str() {
                "tcp" => false,
                "udp" => true,
                _ => return None,
            };
            let port = u16::try_from(s.port).ok().filter(|p| *p > 0)?;
            if t.probe_ports == 0 {
                return None;
            }
            (Observed::Probe { udp, port }, t.probe_findtime)
        }
        proto::SignalKind::Unspecified => return None,
    };
    let ip = ban::parse_ip(&s.ip)?;
    let future = s.at_ms > now_ms + i64::from(FUTURE_SLACK_S) * 1000;
    let stale = s.at_ms <= now_ms - window.as_millis() as i64;
    if future || stale || allowed(ip) {
        return None;
    }
    Some(Incoming {
        ip,
        at_ms: s.at_ms,
        what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn failure(ip: &str, at_ms: i64) -> proto::Signal {
        proto::Signal {
            kind: proto::SignalKind::Failure as i32,
            ip: ip.into(),
            jail: "sshd".into(),
            at_ms,
            ..Default::default()
        }
    }

    fn probe(protocol: &str, port: u32) -> proto::Signal {
        proto::Signal {
            kind: proto::SignalKind::Probe as i32,
            ip: "192.0.2.9".into(),
            protocol: protocol.into(),
            port,
            at_ms: NOW,
            ..Default::default()
        }
    }

    fn ok(s: &proto::Signal) -> Option<Incoming> {
        check(s, &Thresholds::default(), NOW, |_| false)
    }

    #[test]
    fn a_good_failure_is_canonical() {
        let i = ok(&failure("::ffff:192.0.2.1", NOW)).unwrap();
        assert_eq!(i.ip, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(i.what, Observed::Failure);
    }

    #[test]
    fn bad_signals_are_ignored() {
        assert_eq!(ok(&failure("not-an-ip", NOW)), None);
        assert_eq!(ok(&failure("192.0.2.1", NOW + 61_000)), None, "future");
        assert!(ok(&failure("192.0.2.1", NOW + 59_000)).is_some(), "skew");
        assert_eq!(ok(&failure("192.0.2.1", NOW - 600_000)), None, "stale");
        assert!(ok(&failure("192.0.2.1", NOW - 599_000)).is_some());
        let mut bad_jail = failure("192.0.2.1", NOW);
        bad_jail.jail = "a\nb".into();
        assert_eq!(ok(&bad_jail), None);
        bad_jail.jail = "x".repeat(65);
        assert_eq!(ok(&bad_jail), None);
        let mut unknown = failure("192.0.2.1", NOW);
        unknown.kind = 0;
        assert_eq!(ok(&unknown), None);
        unknown.kind = 99;
        assert_eq!(ok(&unknown), None);
    }

    #[test]
    fn probes_name_tcp_or_udp_and_a_real_port() {
        assert_eq!(
            ok(&probe("UDP", 53)).unwrap().what,
            Observed::Probe {
                udp: true,
                port: 53
            }
        );
        assert_eq!(ok(&probe("sctp", 53)), None);
        assert_eq!(ok(&probe("tcp", 0)), None);
        assert_eq!(ok(&probe("tcp", 65_536)), None);
        // A probe is stale after probe_findtime (1 min), not fleet_findtime.
        let mut old = probe("tcp", 22);
        old.at_ms = NOW - 60_000;
        assert_eq!(ok(&old), None);
    }

    #[test]
    fn allow_listed_addresses_are_ignored() {
        let s = failure("192.0.2.1", NOW);
        let listed = "192.0.2.1".parse::<IpAddr>().unwrap();
        assert_eq!(
            check(&s, &Thresholds::default(), NOW, |ip| ip == listed),
            None
        );
    }
}
