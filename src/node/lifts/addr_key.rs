//! An address as a fixed 16-byte key: what the node's per-address maps
//! (the lift schedule, recent bans, re-lifts) hold instead of a `String`.
//!
//! Why: with 100,000 active bans a `HashMap<String, _>` costs a 24-byte
//! `String` in every slot plus a heap allocation per address (~32 bytes
//! with malloc's header); this key is 16 bytes in the slot and nothing on
//! the heap (issue 19: node RSS <= 15 MiB idle with 100,000 bans).
//!
//! Contract: a ban's address is canonical ([`crate::ban::parse_ip`]: an
//! IPv4-mapped IPv6 address is stored as its IPv4 address), so an IPv4
//! address is keyed as its mapped form `::ffff:a.b.c.d` without meeting a
//! distinct IPv6 address of that form, and [`AddrKey::ip`] gives back the
//! canonical address (its text is the ban's `ip`). Byte-aligned, so a slot
//! of key and `u64` is 24 bytes, not the 32 a `u128` key would take.
use std::net::{IpAddr, Ipv6Addr};

/// An IP address as 16 bytes (IPv4 as `::ffff:a.b.c.d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey([u8; 16]);

impl AddrKey {
    /// The key of a parsed address.
    pub fn of(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        AddrKey(v6.octets())
    }

    /// The key of an address's text; `None` if it is not an address.
    pub fn parse(ip: &str) -> Option<Self> {
        Some(Self::of(crate::ban::parse_ip(ip)?))
    }

    /// The IPv4 address it keys (in its mapped form), as a `u32`.
    pub fn v4(self) -> Option<u32> {
        let (prefix, v4) = self.0.split_at(12);
        (prefix == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
            .then(|| u32::from_be_bytes([v4[0], v4[1], v4[2], v4[3]]))
    }

    /// The key of an IPv4 address given as a `u32` ([`AddrKey::v4`]).
    pub fn from_v4(v4: u32) -> Self {
        Self::of(IpAddr::V4(v4.into()))
    }

    /// The canonical address (IPv4 for the mapped range).
    pub fn ip(self) -> IpAddr {
        crate::ban::canonical_ip(IpAddr::V6(Ipv6Addr::from(self.0)))
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.ip().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_give_back_the_bans_text() {
        for ip in ["192.0.2.1", "2001:db8::1", "::1", "0.0.0.0", "::"] {
            let k = AddrKey::parse(ip).unwrap();
            assert_eq!(k.to_string(), ip);
        }
        assert_eq!(
            AddrKey::parse("::ffff:192.0.2.1"),
            AddrKey::parse("192.0.2.1"),
            "the same canonical address"
        );
        assert_eq!(AddrKey::parse("nope"), None);
        let v4 = AddrKey::parse("192.0.2.1").unwrap();
        assert_eq!(v4.v4(), Some(0xc000_0201));
        assert_eq!(AddrKey::from_v4(0xc000_0201), v4);
        assert_eq!(AddrKey::parse("2001:db8::1").unwrap().v4(), None);
        assert_eq!(AddrKey::parse("::").unwrap().v4(), None);
        assert_eq!(std::mem::size_of::<(AddrKey, u64)>(), 24);
    }
}
