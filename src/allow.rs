//! The fleet allow-list: networks no ban may cover, checked by the hub
//! before a report is fanned out and again by every node before a ban is
//! applied.
//!
//! Contract:
//! - A [`Network`] is an address and a prefix length in canonical form:
//!   host bits must be zero (`192.0.2.5/24` is refused, not rounded: a
//!   typo in the prefix would otherwise silently allow a network 256 times
//!   larger or smaller than meant), `/0` is refused (it would switch the
//!   fleet off), and an IPv4 network written inside IPv6 (`::ffff:a.b.c.d/n`
//!   with n >= 96) is the IPv4 network, as [`crate::ban::parse_ip`] makes
//!   every banned address IPv4. A bare address is its own /32 or /128.
//! - [`Table::lookup`] is a longest-prefix match costing one hash lookup per
//!   prefix length in use (at most 33 for IPv4, 129 for IPv6): with 10,000
//!   networks it stays well under a microsecond (`lookup_cost` below prints
//!   the figure), never a scan of the entries.
//! - [`builtin`] is always on, with no configuration and no way to remove
//!   it: loopback, unspecified, link-local, multicast and the limited
//!   broadcast address. None of them is ever the source of an attack worth
//!   a fleet-wide ban, and banning one breaks the host itself (loopback) or
//!   its network (link-local neighbours, multicast routing).
//! - Overlapping entries are kept, each as given (a /16 and a /24 inside
//!   it): removing one leaves the other in force, which is what an operator
//!   who added both expects. Only the exact same network twice is refused.
use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use thiserror::Error;

use crate::ban::canonical_ip;

/// Why a string is not an allow-list network.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidNetwork {
    /// Neither an address nor `address/prefix`.
    #[error(
        "{0:?} is not a network: use an address (192.0.2.7, 2001:db8::7) or CIDR (192.0.2.0/24, 2001:db8::/48)"
    )]
    Syntax(String),
    /// The prefix is longer than the address family allows.
    #[error("{0:?}: the prefix length must be 1-32 for IPv4, 1-128 for IPv6")]
    Prefix(String),
    /// `/0` covers every address: it would stop every ban in the fleet.
    #[error(
        "{0:?} covers every address; the allow-list refuses /0 (stop the fleet's bans another way if that is really meant)"
    )]
    Everything(String),
    /// Bits below the prefix are set; the canonical network is suggested.
    #[error("{given:?} has host bits set: did you mean {canonical}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it lies in.
        canonical: Network,
    },
}

/// A network in canonical form (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

fn mask4(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask6(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl Network {
    /// The network of `addr` with `prefix` bits, host bits cleared. For
    /// the built-ins and the table's own keys; admin input goes through
    /// [`FromStr`], which refuses host bits instead.
    fn covering(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask4(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask6(prefix))),
        };
        Network { addr, prefix }
    }

    /// The single address `addr` (/32 or /128), canonical.
    pub fn host(addr: IpAddr) -> Self {
        let addr = canonical_ip(addr);
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Network { addr, prefix }
    }

    /// The network's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (canonical, as bans carry it) lies inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && Network::covering(ip, self.prefix) == *self
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Network {
    type Err = InvalidNetwork;

    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let s = given.trim();
        let syntax = || InvalidNetwork::Syntax(given.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let a: IpAddr = a.parse().map_err(|_| syntax())?;
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                (a, p.parse::<u8>().map_err(|_| syntax())?)
            }
            None => {
                let a: IpAddr = s.parse().map_err(|_| syntax())?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(InvalidNetwork::Prefix(given.to_string()));
        }
        // `::ffff:192.0.2.0/120` is 192.0.2.0/24, as bans are IPv4.
        let (addr, prefix) = match (canonical_ip(addr), addr) {
            (IpAddr::V4(v4), IpAddr::V6(_)) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
            _ => (addr, prefix),
        };
        if prefix == 0 {
            return Err(InvalidNetwork::Everything(given.to_string()));
        }
        let canonical = Network::covering(addr, prefix);
        if canonical.addr != addr {
            return Err(InvalidNetwork::HostBits {
                given: given.to_string(),
                canonical,
            });
        }
        Ok(canonical)
    }
}

/// The always-on entries, with why each is there (shown by `allow list`).
pub fn builtin() -> Vec<(Network, &'static str)> {
    let n = |s: &str| {
        let (a, p) = s.split_once('/').expect("a CIDR");
        Network::covering(a.parse().expect("an address"), p.parse().expect("a prefix"))
    };
    vec![
        (n("127.0.0.0/8"), "loopback"),
        (n("0.0.0.0/8"), "unspecified (this network)"),
        (n("169.254.0.0/16"), "link-local"),
        (n("224.0.0.0/4"), "multicast"),
        (n("255.255.255.255/32"), "limited broadcast"),
        (n("::1/128"), "loopback"),
        (n("::/128"), "unspecified"),
        (n("fe80::/10"), "link-local"),
        (n("ff00::/8"), "multicast"),
    ]
}

/// Hashes a network address (u32 or u128) with one multiply per word.
/// SipHash, the standard default, costs most of a lookup here and guards
/// against collisions chosen by whoever picks the *stored* keys; those are
/// the admins' networks, and probes never insert, so a fast mix is safe.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetHasher(u64);

impl std::hash::Hasher for NetHasher {
    /// The product's high bits are the mixed ones; hashbrown picks
    /// buckets by the low bits, and a /16's address has 16 zero low bits:
    /// rotate the high bits down (as rustc-hash does).
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

type NetSet<T> = HashSet<T, std::hash::BuildHasherDefault<NetHasher>>;

/// Networks for longest-prefix lookup: per prefix length in use, longest
/// first, a hash set of network addresses (see the module doc for the cost).
#[derive(Debug, Clone, Default)]
pub struct Table {
    v4: Vec<(u8, NetSet<u32>)>,
    v6: Vec<(u8, NetSet<u128>)>,
}

/// The set for `prefix` in a longest-first list, made when missing.
fn level<T>(levels: &mut Vec<(u8, NetSet<T>)>, prefix: u8) -> &mut NetSet<T> {
    let at = match levels.binary_search_by(|(p, _)| prefix.cmp(p)) {
        Ok(at) => at,
        Err(at) => {
            levels.insert(at, (prefix, NetSet::default()));
            at
        }
    };
    &mut levels[at].1
}

impl Table {
    /// A table holding `networks`.
    pub fn new(networks: impl IntoIterator<Item = Network>) -> Self {
        let mut t = Table::default();
        for n in networks {
            t.insert(n);
        }
        t
    }

    /// Adds a network (again is a no-op).
    pub fn insert(&mut self, n: Network) {
        match n.addr {
            IpAddr::V4(a) => {
                level(&mut self.v4, n.prefix).insert(u32::from(a));
            }
            IpAddr::V6(a) => {
                level(&mut self.v6, n.prefix).insert(u128::from(a));
            }
        }
    }

    /// Removes a network; true if it was there.
    pub fn remove(&mut self, n: &Network) -> bool {
        let removed = match n.addr {
            IpAddr::V4(a) => level(&mut self.v4, n.prefix).remove(&u32::from(a)),
            IpAddr::V6(a) => level(&mut self.v6, n.prefix).remove(&u128::from(a)),
        };
        self.v4.retain(|(_, s)| !s.is_empty());
        self.v6.retain(|(_, s)| !s.is_empty());
        removed
    }

    /// The longest network holding `ip`, if any.
    pub fn lookup(&self, ip: IpAddr) -> Option<Network> {
        match canonical_ip(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(p, set)| {
                    let net = a & mask4(*p);
                    set.contains(&net).then(|| Network {
                        addr: IpAddr::V4(net.into()),
                        prefix: *p,
                    })
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(p, set)| {
                    let net = a & mask6(*p);
                    set.contains(&net).then(|| Network {
                        addr: IpAddr::V6(net.into()),
                        prefix: *p,
                    })
                })
            }
        }
    }

    /// How many networks the table holds.
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, s)| s.len()).sum::<usize>()
            + self.v6.iter().map(|(_, s)| s.len()).sum::<usize>()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Why an address may not be banned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// A built-in network ([`builtin`]), with its reason.
    Builtin(Network, &'static str),
    /// An entry an admin added (`banmesh allow add`).
    Entry(Network),
    /// The address of a fleet member (a host's connection to the hub, or
    /// the hub itself).
    Fleet(IpAddr),
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Builtin(n, why) => write!(f, "{n} (built-in: {why})"),
            Allowed::Entry(n) => write!(f, "{n}"),
            Allowed::Fleet(ip) => write!(f, "{ip} (fleet address)"),
        }
    }
}

/// The allow-list as both hub and node check it: the built-ins, then the
/// admins' entries (longest prefix wins).
#[derive(Debug, Clone)]
pub struct AllowList {
    builtin: Vec<(Network, &'static str)>,
    entries: Table,
}

impl Default for AllowList {
    fn default() -> Self {
        AllowList::new(std::iter::empty())
    }
}

impl AllowList {
    /// The built-ins plus `entries`.
    pub fn new(entries: impl IntoIterator<Item = Network>) -> Self {
        AllowList {
            builtin: builtin(),
            entries: Table::new(entries),
        }
    }

    /// The admins' entries.
    pub fn entries(&self) -> &Table {
        &self.entries
    }

    /// Adds an entry.
    pub fn insert(&mut self, n: Network) {
        self.entries.insert(n);
    }

    /// Removes an entry; true if it was there.
    pub fn remove(&mut self, n: &Network) -> bool {
        self.entries.remove(n)
    }

    /// Why `ip` may not be banned, or `None` when it may.
    pub fn check(&self, ip: IpAddr) -> Option<Allowed> {
        let ip = canonical_ip(ip);
        if let Some((n, why)) = self.builtin.iter().find(|(n, _)| n.contains(ip)) {
            return Some(Allowed::Builtin(*n, why));
        }
        self.entries.lookup(ip).map(Allowed::Entry)
    }

    /// [`AllowList::check`] for a ban's address text; an address that does
    /// not parse is never allowed (bans are validated before this).
    pub fn check_str(&self, ip: &str) -> Option<Allowed> {
        crate::ban::parse_ip(ip).and_then(|ip| self.check(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_canonical_networks_and_refuses_the_rest() {
        assert_eq!(net("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(net(" 192.0.2.7 ").to_string(), "192.0.2.7/32");
        assert_eq!(net("2001:DB8::/48").to_string(), "2001:db8::/48");
        assert_eq!(net("::ffff:192.0.2.0/120").to_string(), "192.0.2.0/24");
        assert_eq!(net("::ffff:192.0.2.9").to_string(), "192.0.2.9/32");
        for bad in [
            "",
            "x",
            "192.0.2.0/",
            "192.0.2.0/+8",
            "192.0.2.0/24/1",
            "1.2.3/8",
        ] {
            assert_eq!(net_err(bad), InvalidNetwork::Syntax(bad.into()), "{bad:?}");
        }
        assert_eq!(
            net_err("1.0.0.0/33"),
            InvalidNetwork::Prefix("1.0.0.0/33".into())
        );
        assert_eq!(net_err("::/129"), InvalidNetwork::Prefix("::/129".into()));
        for all in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            assert_eq!(net_err(all), InvalidNetwork::Everything(all.into()));
        }
        assert_eq!(
            net_err("192.0.2.5/24"),
            InvalidNetwork::HostBits {
                given: "192.0.2.5/24".into(),
                canonical: net("192.0.2.0/24")
            }
        );
        assert!(
            net_err("2001:db8::1/48")
                .to_string()
                .contains("did you mean 2001:db8::/48?")
        );
    }

    fn net_err(s: &str) -> InvalidNetwork {
        s.parse::<Network>().unwrap_err()
    }

    #[test]
    fn longest_prefix_wins_and_families_stay_apart() {
        let t = Table::new([net("10.0.0.0/8"), net("10.1.0.0/16"), net("2001:db8::/32")]);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(net("10.1.0.0/16")));
        assert_eq!(t.lookup(ip("10.2.2.3")), Some(net("10.0.0.0/8")));
        assert_eq!(t.lookup(ip("::ffff:10.2.2.3")), Some(net("10.0.0.0/8")));
        assert_eq!(t.lookup(ip("11.0.0.1")), None);
        assert_eq!(t.lookup(ip("2001:db8:5::1")), Some(net("2001:db8::/32")));
        assert_eq!(t.lookup(ip("2001:db9::1")), None);
        // ::a00:1 is not 10.0.0.1's network in IPv6 terms: it canonicalises
        // to 10.0.0.1 (IPv4-compatible), which the /8 holds.
        assert_eq!(t.lookup(ip("::10.0.0.1")), Some(net("10.0.0.0/8")));
        let mut t = t;
        assert!(t.remove(&net("10.1.0.0/16")));
        assert!(!t.remove(&net("10.1.0.0/16")));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(net("10.0.0.0/8")));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn builtins_cover_what_must_never_be_banned() {
        let list = AllowList::default();
        for s in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "169.254.1.1",
            "fe80::1",
            "224.0.0.251",
            "ff02::1",
            "255.255.255.255",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                matches!(list.check(ip(s)), Some(Allowed::Builtin(..))),
                "{s}"
            );
        }
        for s in ["192.0.2.1", "2001:db8::1", "255.255.255.254", "8.8.8.8"] {
            assert_eq!(list.check(ip(s)), None, "{s}");
        }
    }

    /// Not a timed assertion: prints the cost of a lookup in a table of
    /// 10,000 networks of mixed lengths (the figure in the README).
    #[test]
    fn lookup_cost() {
        let mut t = Table::default();
        let mut x: u32 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for i in 0..10_000u32 {
            let r = next();
            if i % 4 == 0 {
                let p = 32 + (r % 97) as u8;
                let a = (u128::from(r) << 96) | u128::from(next());
                t.insert(Network::covering(IpAddr::V6(a.into()), p));
            } else {
                let p = 8 + (r % 25) as u8;
                t.insert(Network::covering(IpAddr::V4(next().into()), p));
            }
        }
        let probes: Vec<IpAddr> = (0..100_000)
            .map(|i| {
                if i % 4 == 0 {
                    IpAddr::V6((u128::from(next()) << 96 | u128::from(next())).into())
                } else {
                    IpAddr::V4(next().into())
                }
            })
            .collect();
        let start = std::time::Instant::now();
        let hits = probes.iter().filter(|p| t.lookup(**p).is_some()).count();
        let ns = start.elapsed().as_nanos() / probes.len() as u128;
        println!(
            "allow-list lookup: {ns} ns per lookup, {} networks, {hits} hits",
            t.len()
        );
    }
}
