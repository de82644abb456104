//! The domain types of a ban, and the one place where wire input is checked.
//!
//! Everything that arrives from outside (a `report` command line, a proto
//! message from a node) becomes a [`Ban`] through [`Ban::new`]; the rest of
//! the code never sees an unchecked string. A refused field names itself and
//! the rule it broke, and nothing is stored.
use std::net::{IpAddr, Ipv6Addr};

use thiserror::Error;

use crate::proto;

/// Longest jail name accepted (fail2ban's own names are short words).
pub const MAX_JAIL_LEN: usize = 64;
/// The seed's `protocol varchar(16)`.
pub const MAX_PROTOCOL_LEN: usize = 16;
/// The seed's `port varchar(32)`.
pub const MAX_PORT_LEN: usize = 32;

/// Why a ban was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidBan {
    /// The address does not parse as IPv4 or IPv6.
    #[error("ip {0:?} is not an IPv4 or IPv6 address")]
    Ip(String),
    /// The jail name is empty, too long, or has characters fail2ban names do not use.
    #[error(
        "jail {0:?} must be 1-{MAX_JAIL_LEN} characters of letters, digits, '_', '-', '.', '@'"
    )]
    Jail(String),
    /// The protocol is empty, too long, or not letters, digits and commas.
    #[error("protocol {0:?} must be 1-{MAX_PROTOCOL_LEN} characters of letters, digits, ','")]
    Protocol(String),
    /// The port is not a number, range, service name or comma list of these, or is too long.
    #[error(
        "port {0:?} is not a port: use a number 0-65535, a range like 1000:2000, a service name like ssh, or a comma list of these (at most {MAX_PORT_LEN} characters)"
    )]
    Port(String),
}

/// A checked ban: what fail2ban banned, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The fail2ban jail that banned the address (fail2ban's `<name>`).
    pub jail: String,
    /// The jail's protocol (fail2ban's `<protocol>`), lowercased.
    pub protocol: String,
    /// The jail's port or ports (fail2ban's `<port>`), lowercased, as fail2ban wrote them.
    pub port: String,
    /// Canonical text form of the address ([`parse_ip`]: `::ffff:1.2.3.4`
    /// is `1.2.3.4`, as fail2ban bans it).
    pub ip: String,
}

impl Ban {
    /// Checks every field; the IP is normalised to its canonical form so the
    /// same address always compares equal.
    pub fn new(jail: &str, protocol: &str, port: &str, ip: &str) -> Result<Self, InvalidBan> {
        let addr = parse_ip(ip).ok_or_else(|| InvalidBan::Ip(ip.to_string()))?;
        if !valid_jail(jail) {
            return Err(InvalidBan::Jail(jail.to_string()));
        }
        if !valid_protocol(protocol) {
            return Err(InvalidBan::Protocol(protocol.to_string()));
        }
        if !valid_port(port) {
            return Err(InvalidBan::Port(port.to_string()));
        }
        Ok(Ban {
            jail: jail.to_string(),
            protocol: protocol.to_ascii_lowercase(),
            port: port.to_ascii_lowercase(),
            ip: addr.to_string(),
        })
    }

    /// Converts a proto at the edge of a service.
    pub fn from_proto(ban: Option<&proto::Ban>) -> Result<Self, InvalidBan> {
        let b = ban.cloned().unwrap_or_default();
        Ban::new(&b.jail, &b.protocol, &b.port, &b.ip)
    }

    /// The wire form, as sent by `report`, the node and the hub.
    pub fn to_proto(&self) -> proto::Ban {
        proto::Ban {
            jail: self.jail.clone(),
            protocol: self.protocol.clone(),
            port: self.port.clone(),
            ip: self.ip.clone(),
        }
    }
}

/// Parses an address as the fleet names it: an IPv4 address carried in
/// IPv6 (mapped `::ffff:a.b.c.d` or the old compatible `::a.b.c.d`) is the
/// IPv4 address, because fail2ban and the kernel set ban it as IPv4; the
/// same address in two spellings would otherwise be two bans, and an unban
/// of either spelling would lift nothing on the hosts. `::` and `::1` stay
/// IPv6 (they are not IPv4 addresses).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    Some(canonical_ip(s.trim().parse().ok()?))
}

/// [`parse_ip`] for an address already parsed.
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if is_ipv4_compatible(&v6) => {
                let [.., a, b] = v6.segments();
                IpAddr::V4(std::net::Ipv4Addr::from(
                    (u32::from(a) << 16) | u32::from(b),
                ))
            }
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// `::a.b.c.d`: the first 96 bits zero, and not `::` or `::1`.
fn is_ipv4_compatible(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1)
}

fn valid_jail(s: &str) -> bool {
    (1..=MAX_JAIL_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b))
}

fn valid_protocol(s: &str) -> bool {
    (1..=MAX_PROTOCOL_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b',')
}

/// fail2ban's `<port>` is the jail's `port` option verbatim: `22`, `ssh`,
/// `http,https`, `1000:2000` (iptables range syntax) or `1000-2000`.
fn valid_port(s: &str) -> bool {
    fn number(p: &str) -> Option<u16> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    }
    fn item(p: &str) -> bool {
        if let Some((a, b)) = p
            .split_once([':', '-'])
            .filter(|(a, _)| number(a).is_some())
        {
            return matches!((number(a), number(b)), (Some(a), Some(b)) if a <= b);
        }
        number(p).is_some()
            || (p.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    }
    (1..=MAX_PORT_LEN).contains(&s.len()) && s.split(',').all(item)
}

/// What an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Ban the address on every other host.
    Ban,
    /// Lift every active ban of the address, everywhere (an admin's `banmesh unban`).
    Unban,
    /// An admin added a network to the fleet allow-list (`banmesh allow
    /// add`): [`Event::network`] is that network. Ban events after it that
    /// fall inside are refused by every node; the bans it lifts follow it
    /// as unban events.
    AllowAdd,
    /// An admin removed a network from the fleet allow-list.
    AllowRemove,
}

impl EventKind {
    /// The `kind` column's code: 1 ban, 2 unban, 3 allow-add, 4 allow-remove.
    pub fn code(self) -> i64 {
        match self {
            EventKind::Ban => 1,
            EventKind::Unban => 2,
            EventKind::AllowAdd => 3,
            EventKind::AllowRemove => 4,
        }
    }

    /// The kind for a stored code.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => EventKind::Ban,
            2 => EventKind::Unban,
            3 => EventKind::AllowAdd,
            4 => EventKind::AllowRemove,
            _ => return None,
        })
    }

    /// An allow-list change rather than a ban or unban.
    pub fn is_allow(self) -> bool {
        matches!(self, EventKind::AllowAdd | EventKind::AllowRemove)
    }
}

/// The jail an allow-list event carries in its `ban` (never a fail2ban
/// jail: allow-list events are never written to `shared.log`).
pub const ALLOW_JAIL: &str = "banmesh-allow";

impl Ban {
    /// The `ban` of an allow-list event: the network (canonical CIDR) in
    /// `ip`, [`ALLOW_JAIL`], protocol `all`, port `0`. Events keep one shape
    /// (and one table row shape) whatever their kind.
    pub fn allow_entry(network: &crate::allow::Network) -> Self {
        Ban {
            jail: ALLOW_JAIL.into(),
            protocol: "all".into(),
            port: "0".into(),
            ip: network.to_string(),
        }
    }
}

/// A committed event: a ban, or the lifting of one, with its store id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The hub's store id: the fleet-wide order, and the position a node
    /// resumes its subscription after.
    pub id: u64,
    /// Whether it bans or lifts.
    pub kind: EventKind,
    /// The address and where it was banned (for an unban, copied from the latest ban it lifts).
    pub ban: Ban,
    /// The reporter's host name, from its certificate.
    pub added_by: String,
    /// When the hub committed it, Unix ms.
    pub created_ms: i64,
    /// For an unban, the ban event it lifts (0 for all bans of the IP).
    pub lifts: u64,
    /// For a ban: how long the fleet holds it, and why.
    pub term: BanTerm,
}

/// How long the fleet holds a ban and why: decided by the hub (its
/// escalation ladder, its signal policy), carried by the event so that
/// every host enforces the same end. All zero/empty for bans stored before
/// the ladder, for unbans and for allow-list events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BanTerm {
    /// When the fleet lifts the ban, Unix ms; 0: no fleet end time (the
    /// `shared` jail's bantime applies, from `created_ms`).
    pub ends_ms: i64,
    /// The ladder's rung, 1 for a first offence; 0 when none was given.
    pub rung: u32,
    /// For an update of an active ban: the ban event it extends to
    /// `ends_ms` (0 for a new ban).
    pub extends: u64,
    /// Why the hub banned it (a fleet policy ban); empty for a host's report.
    pub reason: String,
}

/// Why an event from the hub was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidEvent {
    /// Unspecified (0) or a kind this build does not know: guessing "ban"
    /// could ban an address the fleet meant to release.
    #[error("event kind {0} is not one this build knows (is this node older than the hub?)")]
    Kind(i32),
    /// The ban inside the event failed the same checks as a report.
    #[error(transparent)]
    Ban(#[from] InvalidBan),
    /// An allow-list event whose network is not one.
    #[error(transparent)]
    Network(#[from] crate::allow::InvalidNetwork),
    /// The reporter's name reaches `shared.log` and the host table: a name
    /// outside [`valid_host_name`] (a newline could forge a line) is refused.
    #[error("added_by {0:?} is not a host name (letters, digits, '-', '.', '_')")]
    AddedBy(String),
}

impl Event {
    /// Converts an event from the hub, checking it like any other input.
    pub fn from_proto(e: &proto::Event) -> Result<Self, InvalidEvent> {
        let kind = match proto::EventKind::try_from(e.kind) {
            Ok(proto::EventKind::Ban) => EventKind::Ban,
            Ok(proto::EventKind::Unban) => EventKind::Unban,
            Ok(proto::EventKind::AllowAdd) => EventKind::AllowAdd,
            Ok(proto::EventKind::AllowRemove) => EventKind::AllowRemove,
            Ok(proto::EventKind::Unspecified) | Err(_) => return Err(InvalidEvent::Kind(e.kind)),
        };
        if !valid_host_name(&e.added_by) {
            return Err(InvalidEvent::AddedBy(e.added_by.clone()));
        }
        let ban = if kind.is_allow() {
            let ip = e.ban.as_ref().map_or("", |b| b.ip.as_str());
            Ban::allow_entry(&ip.parse()?)
        } else {
            Ban::from_proto(e.ban.as_ref())?
        };
        Ok(Event {
            id: e.id,
            kind,
            ban,
            added_by: e.added_by.clone(),
            created_ms: e.created_ms,
            lifts: e.lifts_event_id,
            term: BanTerm {
                ends_ms: e.ends_ms,
                rung: e.rung,
                extends: e.extends_event_id,
                reason: e.reason.clone(),
            },
        })
    }

    /// The network of an allow-list event (`None` for a ban or unban).
    pub fn network(&self) -> Option<crate::allow::Network> {
        self.kind
            .is_allow()
            .then(|| self.ban.ip.parse().ok())
            .flatten()
    }

    /// The wire form the hub streams to subscribers.
    pub fn to_proto(&self) -> proto::Event {
        proto::Event {
            id: self.id,
            kind: match self.kind {
                EventKind::Ban => proto::EventKind::Ban,
                EventKind::Unban => proto::EventKind::Unban,
                EventKind::AllowAdd => proto::EventKind::AllowAdd,
                EventKind::AllowRemove => proto::EventKind::AllowRemove,
            } as i32,
            ban: Some(self.ban.to_proto()),
            added_by: self.added_by.clone(),
            created_ms: self.created_ms,
            lifts_event_id: self.lifts,
            ends_ms: self.term.ends_ms,
            rung: self.term.rung,
            extends_event_id: self.term.extends,
            reason: self.term.reason.clone(),
        }
    }
}

/// Per-host status of a ban, with the seed's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Status {
    /// 0: not yet added on that host.
    NotAdded = 0,
    /// 1: added (or reported by that host).
    Added = 1,
    /// 2: that host already banned the IP recently.
    AlreadyBanned = 2,
    /// 3: adding it failed on that host.
    Error = 3,
    /// 4: that host refused it: the address is on its allow-list
    /// (fail2ban's `ignoreip` for the `shared` jail, or the fleet
    /// allow-list). Nothing was banned there and no line written. Beside
    /// the seed's 0-3, which keep their meanings.
    Refused = 4,
}

impl Status {
    /// The status for a stored code; `None` for a code outside 0-4.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Status::NotAdded,
            1 => Status::Added,
            2 => Status::AlreadyBanned,
            3 => Status::Error,
            4 => Status::Refused,
            _ => return None,
        })
    }
}

/// The seed's column name for a host: `host_` plus the name without dots
/// and hyphens.
pub fn seed_column(host: &str) -> String {
    let cleaned: String = host
        .chars()
        .filter(|c| *c != '.' && *c != '-')
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("host_{cleaned}")
}

/// Host names come from certificates; they also become SQL column names in
/// the `ip_table` view, so they are held to DNS-label characters.
pub fn valid_host_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_fail2ban_passes() {
        for port in [
            "22",
            "ssh",
            "http,https",
            "1000:2000",
            "0:65535",
            "smtp,465,submission",
        ] {
            assert!(Ban::new("sshd", "tcp", port, "192.0.2.1").is_ok(), "{port}");
        }
        let b = Ban::new("sshd", "TCP", "22", " 2001:DB8::1 ").unwrap();
        assert_eq!(b.ip, "2001:db8::1");
        assert_eq!(b.protocol, "tcp");
    }

    #[test]
    fn refuses_malformed_fields() {
        assert_eq!(
            Ban::new("sshd", "tcp", "22", "300.1.1.1"),
            Err(InvalidBan::Ip("300.1.1.1".into()))
        );
        assert!(matches!(
            Ban::new("", "tcp", "22", "192.0.2.1"),
            Err(InvalidBan::Jail(_))
        ));
        assert!(matches!(
            Ban::new("a b", "tcp", "22", "192.0.2.1"),
            Err(InvalidBan::Jail(_))
        ));
        for port in ["", "65536", "2000:1000", "22;rm", "-5", ":", "1,,2"] {
            assert!(
                matches!(
                    Ban::new("j", "tcp", port, "192.0.2.1"),
                    Err(InvalidBan::Port(_))
                ),
                "{port}"
            );
        }
        let long = "x".repeat(MAX_PROTOCOL_LEN + 1);
        assert!(matches!(
            Ban::new("j", &long, "22", "192.0.2.1"),
            Err(InvalidBan::Protocol(_))
        ));
    }

    #[test]
    fn an_event_of_unknown_kind_is_refused_not_taken_as_a_ban() {
        let ban = Ban::new("sshd", "tcp", "22", "192.0.2.1").unwrap();
        let event = |kind: EventKind| Event {
            id: 3,
            kind,
            ban: ban.clone(),
            added_by: "web-1".into(),
            created_ms: 1,
            lifts: 0,
            term: Default::default(),
        };
        for kind in [EventKind::Ban, EventKind::Unban] {
            assert_eq!(Event::from_proto(&event(kind).to_proto()), Ok(event(kind)));
        }
        for code in [proto::EventKind::Unspecified as i32, 7, -1] {
            let mut wire = event(EventKind::Ban).to_proto();
            wire.kind = code;
            assert_eq!(Event::from_proto(&wire), Err(InvalidEvent::Kind(code)));
        }
        let mut wire = event(EventKind::Ban).to_proto();
        wire.ban.as_mut().unwrap().ip = "not an ip".into();
        assert!(matches!(
            Event::from_proto(&wire),
            Err(InvalidEvent::Ban(InvalidBan::Ip(_)))
        ));
    }

    #[test]
    fn ipv4_in_ipv6_is_ipv4() {
        for (given, canonical) in [
            ("::ffff:203.0.113.9", "203.0.113.9"),
            ("::FFFF:cb00:7109", "203.0.113.9"),
            (" ::203.0.113.9 ", "203.0.113.9"),
            ("::0.0.0.2", "0.0.0.2"),
            ("::", "::"),
            ("::1", "::1"),
            ("::ffff:0:1.2.3.4", "::ffff:0:102:304"),
            ("2001:db8::1", "2001:db8::1"),
            ("64:ff9b::1.2.3.4", "64:ff9b::102:304"),
        ] {
            assert_eq!(parse_ip(given).unwrap().to_string(), canonical, "{given}");
        }
        let b = Ban::new("sshd", "tcp", "22", "::ffff:203.0.113.9").unwrap();
        assert_eq!(b.ip, "203.0.113.9");
        assert_eq!(
            Ban::new("sshd", "tcp", "22", "::203.0.113.9").unwrap(),
            Ban::new("sshd", "tcp", "22", "203.0.113.9").unwrap()
        );
        assert_eq!(parse_ip("1.2.3"), None);
    }

    #[test]
    fn an_event_whose_reporter_is_not_a_host_name_is_refused() {
        let ban = Ban::new("sshd", "tcp", "22", "192.0.2.1").unwrap();
        let mut wire = Event {
            id: 3,
            kind: EventKind::Ban,
            ban,
            added_by: "web-1".into(),
            created_ms: 1,
            term: Default::default(),
            lifts: 0,
        }
        .to_proto();
        for forged in [
            "x\n2026-11-25 12:26:09 +0000 banmesh[999999]: 198.51.100.66: reported by y",
            "a\rb",
            "web 1",
            "",
        ] {
            wire.added_by = forged.into();
            assert_eq!(
                Event::from_proto(&wire),
                Err(InvalidEvent::AddedBy(forged.into()))
            );
        }
    }

    #[test]
    fn seed_column_drops_dots_and_hyphens() {
        assert_eq!(seed_column("web-1.example.com"), "host_web1examplecom");
    }
}
