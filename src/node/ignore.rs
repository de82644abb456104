//! fail2ban's ignore list for the `shared` jail, checked by the node before
//! it applies a ban: fail2ban 1.0.2's `set JAIL banip` bans without looking
//! at the list (`setBanIP` -> `addBannedIP`; only its filter and its ban
//! restore call `inIgnoreIPList`), so the fast path alone would ban an
//! address the operator told fail2ban never to ban.
//!
//! Contract:
//! - An address the list covers is refused on this host: status 4
//!   ([`Status::Refused`](crate::ban::Status::Refused)), no `shared.log`
//!   line, nothing sent to fail2ban's socket.
//! - The list is matched as fail2ban's `inIgnoreIPList` matches it: an
//!   address entry by equality, a network (`198.51.100.0/24`,
//!   `2001:db8::/48`, masks already turned into prefix lengths by fail2ban)
//!   by prefix, a DNS name by the addresses it resolves to, and with
//!   `ignoreself` (fail2ban's default) this host's own addresses. banmesh's
//!   own addresses are a superset of fail2ban's: the addresses of every
//!   interface (`getifaddrs`) besides those `localhost` and the host name
//!   resolve to.
//! - The list is what fail2ban holds now: [`refresh`] reads it over the
//!   control socket every [`refresh::REFRESH`] (an `addignoreip` or a reload
//!   is honoured within that), resolves names and reads interfaces, and
//!   publishes an immutable [`IgnoreList`]. The hot path only looks an
//!   address up in it.
//! - When banmesh cannot be sure an address is not ignored (the list was
//!   never read, the last good read is older than [`refresh::STALE`], or
//!   the jail has an `ignorecommand`, which banmesh does not run), the
//!   answer is [`Verdict::Unknown`]: the ban goes through `shared.log` only,
//!   where fail2ban's filter checks the whole list itself. An address the
//!   last read listed is still refused.
//!
//! Cost, measured (issue 14): a lookup is one hash probe per distinct
//! prefix length in the list, ~0.1 µs per address in an optimised build
//! with 50 addresses, 12 networks and ignoreself (~30 ns of it parsing the
//! address), ~1.7 µs in a debug build (the ignored `lookup_cost` test below); the
//! applier takes the snapshot (an `Arc` clone) once per batch. A refresh
//! is three requests on fail2ban 1.0.2's socket, 0.2-0.4 ms together on a
//! quiet machine and up to ~3 ms with its cores busy
//! (`tests/fail2ban_ignore.rs` prints it), every 2 s, in its own task: it
//! never delays a ban.
pub mod own_addresses;
pub mod refresh;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::ban::{canonical_ip, parse_ip};

/// One entry of `ignoreip`, as banmesh reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An address (prefix length 32 or 128) or a network, host bits cleared.
    Net(IpAddr, u8),
    /// Anything that is not an address: a DNS name fail2ban resolves.
    Name(String),
}

/// Reads one entry as fail2ban's `IPAddr` does: brackets around an IPv6
/// address dropped, `/PLEN` or `/MASK` after it, host bits cleared, an
/// IPv4-mapped IPv6 address taken as IPv4 (as banmesh takes every address).
/// `None` for an empty entry or an impossible prefix.
pub fn parse_entry(text: &str) -> Option<Entry> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let unbracketed = |s: &'_ str| {
        s.strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .map_or(s.to_string(), str::to_string)
    };
    let (addr, plen) = match text.split_once('/') {
        None => (unbracketed(text), None),
        Some((a, p)) => (unbracketed(a), Some(p)),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        // fail2ban keeps the part before `/` as the name.
        return Some(Entry::Name(addr));
    };
    let plen = match plen {
        None => return Some(net(canonical_ip(ip), None)),
        Some(p) if p.contains(['.', ':']) => mask_len(p.parse().ok()?)?,
        Some(p) => p.parse::<u8>().ok()?,
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (plen <= max).then(|| net(ip, Some(plen)))
}

/// A network entry with its host bits cleared.
fn net(ip: IpAddr, plen: Option<u8>) -> Entry {
    match ip {
        IpAddr::V4(a) => {
            let plen = plen.unwrap_or(32);
            Entry::Net(IpAddr::V4(mask4(u32::from(a), plen).into()), plen)
        }
        IpAddr::V6(a) => {
            let plen = plen.unwrap_or(128);
            Entry::Net(IpAddr::V6(mask6(u128::from(a), plen).into()), plen)
        }
    }
}

/// The prefix length of a contiguous mask (`255.255.255.0` -> 24).
fn mask_len(mask: IpAddr) -> Option<u8> {
    let (bits, width) = match mask {
        IpAddr::V4(m) => (u128::from(u32::from(m)) << 96, 32),
        IpAddr::V6(m) => (u128::from(m), 128),
    };
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0 && ones <= width).then_some(ones as u8)
}

fn mask4(addr: u32, plen: u8) -> u32 {
    addr & u32::MAX.checked_shl(32 - u32::from(plen)).unwrap_or(0)
}

fn mask6(addr: u128, plen: u8) -> u128 {
    addr & u128::MAX.checked_shl(128 - u32::from(plen)).unwrap_or(0)
}

/// What an [`IgnoreList`] is built from: fail2ban's answers, and what the
/// refresher found out about them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    /// `get shared ignoreip`, entry by entry.
    pub entries: Vec<String>,
    /// The addresses each DNS name among the entries resolved to. A name
    /// missing here matches nothing, as in fail2ban when it cannot resolve.
    pub resolved: HashMap<String, Vec<IpAddr>>,
    /// `get shared ignoreself`.
    pub ignore_self: bool,
    /// This host's own addresses ([`own_addresses`]).
    pub own: Vec<IpAddr>,
    /// The jail has an `ignorecommand`: fail2ban may ignore more than the
    /// list says, and only fail2ban can run it.
    pub command: bool,
}

/// What the ignore list says of one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Covered: never banned here. Says by what (`ignoreip 198.51.100.0/24`,
    /// `ignoreip office.example`, `ignoreself`).
    Ignored(&'a str),
    /// Not covered, and the list is complete and current.
    NotIgnored,
    /// Not covered by what banmesh knows, but it cannot be sure (see the
    /// module doc): only fail2ban's own filter should decide.
    Unknown,
}

/// A lookup table for one version of the ignore list: per address family,
/// one hash set of networks per prefix length present, longest first, so a
/// lookup costs one probe per distinct prefix length (a list of addresses
/// and a few networks: two or three probes), never a scan of the entries.
#[derive(Debug, Default)]
pub struct IgnoreList {
    v4: Vec<(u8, HashMap<u32, usize>)>,
    v6: Vec<(u8, HashMap<u128, usize>)>,
    /// Why an address matched, by the index the tables hold.
    why: Vec<String>,
    complete: bool,
}

impl IgnoreList {
    /// Builds the table; an entry that does not parse matches nothing.
    pub fn build(s: &Sources) -> IgnoreList {
        let mut list = IgnoreList {
            complete: !s.command,
            ..IgnoreList::default()
        };
        for text in &s.entries {
            match parse_entry(text) {
                Some(Entry::Net(ip, plen)) => {
                    let why = list.reason(format!("ignoreip {text}"));
                    list.insert(ip, plen, why);
                }
                Some(Entry::Name(name)) => {
                    let why = list.reason(format!("ignoreip {name}"));
                    for ip in s.resolved.get(&name).into_iter().flatten() {
                        list.insert_addr(*ip, why);
                    }
                }
                None => {}
            }
        }
        if s.ignore_self {
            let why = list.reason("ignoreself".to_string());
            for ip in &s.own {
                list.insert_addr(*ip, why);
            }
        }
        list.v4.sort_by_key(|t| std::cmp::Reverse(t.0));
        list.v6.sort_by_key(|t| std::cmp::Reverse(t.0));
        list
    }

    fn reason(&mut self, why: String) -> usize {
        self.why.push(why);
        self.why.len() - 1
    }

    fn insert_addr(&mut self, ip: IpAddr, why: usize) {
        let ip = canonical_ip(ip);
        let plen = if ip.is_ipv4() { 32 } else { 128 };
        self.insert(ip, plen, why);
    }

    /// First entry wins: an address listed twice says the first reason.
    fn insert(&mut self, ip: IpAddr, plen: u8, why: usize) {
        match ip {
            IpAddr::V4(a) => table(&mut self.v4, plen)
                .entry(mask4(a.into(), plen))
                .or_insert(why),
            IpAddr::V6(a) => table(&mut self.v6, plen)
                .entry(mask6(a.into(), plen))
                .or_insert(why),
        };
    }

    /// Whether the list covers `ip`.
    pub fn check(&self, ip: IpAddr) -> Verdict<'_> {
        let hit = match canonical_ip(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(plen, nets)| nets.get(&mask4(a, *plen)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(plen, nets)| nets.get(&mask6(a, *plen)))
            }
        };
        match hit {
            Some(i) => Verdict::Ignored(&self.why[*i]),
            None if self.complete => Verdict::NotIgnored,
            None => Verdict::Unknown,
        }
    }

    /// How many distinct networks and addresses the table holds.
    pub fn len(&self) -> usize {
        let n4: usize = self.v4.iter().map(|(_, t)| t.len()).sum();
        let n6: usize = self.v6.iter().map(|(_, t)| t.len()).sum();
        n4 + n6
    }

    /// Whether it holds nothing (and so ignores nothing).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn table<K>(tables: &mut Vec<(u8, HashMap<K, usize>)>, plen: u8) -> &mut HashMap<K, usize> {
    let i = match tables.iter().position(|(p, _)| *p == plen) {
        Some(i) => i,
        None => {
            tables.push((plen, HashMap::new()));
            tables.len() - 1
        }
    };
    &mut tables[i].1
}

/// One published read of the list.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The table.
    pub list: Arc<IgnoreList>,
    /// When fail2ban answered the read it was built from.
    pub read_at: Instant,
}

/// The applier's view of the list, fed by [`refresh::run`].
#[derive(Debug, Clone)]
pub struct IgnoreWatch(watch::Receiver<Option<Snapshot>>);

/// A connected publisher (for [`refresh::run`]) and view. A view whose
/// publisher is gone, or never ran, answers [`Verdict::Unknown`].
pub fn channel() -> (watch::Sender<Option<Snapshot>>, IgnoreWatch) {
    let (tx, rx) = watch::channel(None);
    (tx, IgnoreWatch(rx))
}

impl IgnoreWatch {
    /// The list as it stands, for a batch of lookups (an `Arc` clone).
    pub fn current(&self) -> Current {
        match &*self.0.borrow() {
            Some(s) => Current {
                list: Some(s.list.clone()),
                fresh: s.read_at.elapsed() <= refresh::STALE,
            },
            None => Current {
                list: None,
                fresh: false,
            },
        }
    }

    /// Waits, at most `within`, until the refresher has tried its first
    /// read: when it worked, the node's first bans can take the fast path;
    /// when fail2ban is down, the node does not wait for it.
    pub async fn first_read(&mut self, within: Duration) {
        if self.0.borrow_and_update().is_some() {
            return;
        }
        let _ = tokio::time::timeout(within, self.0.changed()).await;
    }
}

/// The list as the applier saw it at the start of a batch.
#[derive(Debug)]
pub struct Current {
    list: Option<Arc<IgnoreList>>,
    fresh: bool,
}

impl Current {
    /// Whether fail2ban's ignore list covers `ip` (a ban's address).
    pub fn check(&self, ip: &str) -> Verdict<'_> {
        let (Some(list), Some(ip)) = (&self.list, parse_ip(ip)) else {
            return Verdict::Unknown;
        };
        match list.check(ip) {
            Verdict::NotIgnored if !self.fresh => Verdict::Unknown,
            v => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list(entries: &[&str]) -> IgnoreList {
        IgnoreList::build(&Sources {
            entries: entries.iter().map(|s| s.to_string()).collect(),
            ..Sources::default()
        })
    }

    #[test]
    fn entries_read_as_fail2ban_reads_them() {
        let n = |s: &str, p| Some(Entry::Net(ip(s), p));
        assert_eq!(parse_entry("203.0.113.9"), n("203.0.113.9", 32));
        assert_eq!(parse_entry("198.51.100.7/24"), n("198.51.100.0", 24));
        assert_eq!(parse_entry("10.1.2.3/255.255.0.0"), n("10.1.0.0", 16));
        assert_eq!(parse_entry("[2001:db8::7]"), n("2001:db8::7", 128));
        assert_eq!(parse_entry("2001:db8:1:2::/48"), n("2001:db8:1::", 48));
        assert_eq!(parse_entry("::ffff:192.0.2.1"), n("192.0.2.1", 32));
        assert_eq!(parse_entry("0.0.0.0/0"), n("0.0.0.0", 0));
        assert_eq!(
            parse_entry("office.example"),
            Some(Entry::Name("office.example".into()))
        );
        assert_eq!(parse_entry(" "), None);
        assert_eq!(parse_entry("192.0.2.1/33"), None);
        assert_eq!(parse_entry("192.0.2.1/255.0.255.0"), None);
        assert_eq!(parse_entry("192.0.2.1/x"), None);
    }

    #[test]
    fn addresses_networks_and_both_families() {
        let l = list(&["203.0.113.220", "198.51.100.0/24", "2001:db8:1::/48"]);
        assert_eq!(
            l.check(ip("203.0.113.220")),
            Verdict::Ignored("ignoreip 203.0.113.220")
        );
        assert_eq!(l.check(ip("203.0.113.221")), Verdict::NotIgnored);
        assert_eq!(
            l.check(ip("198.51.100.255")),
            Verdict::Ignored("ignoreip 198.51.100.0/24")
        );
        assert_eq!(l.check(ip("198.51.101.0")), Verdict::NotIgnored);
        assert_eq!(
            l.check(ip("2001:db8:1:ffff::1")),
            Verdict::Ignored("ignoreip 2001:db8:1::/48")
        );
        assert_eq!(l.check(ip("2001:db8:2::1")), Verdict::NotIgnored);
        // The mapped form of a listed IPv4 address is that address.
        assert_eq!(
            l.check(ip("::ffff:203.0.113.220")),
            Verdict::Ignored("ignoreip 203.0.113.220")
        );
        // A family never matches the other's networks.
        assert_eq!(list(&["::/0"]).check(ip("192.0.2.1")), Verdict::NotIgnored);
        assert!(matches!(
            list(&["0.0.0.0/0"]).check(ip("192.0.2.1")),
            Verdict::Ignored(_)
        ));
        assert!(list(&[]).is_empty());
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn names_match_what_they_resolved_to_and_self_only_with_ignoreself() {
        let mut s = Sources {
            entries: vec!["office.example".into(), "gone.example".into()],
            resolved: HashMap::from([(
                "office.example".to_string(),
                vec![ip("192.0.2.50"), ip("2001:db8::50")],
            )]),
            ignore_self: false,
            own: vec![ip("10.9.8.7"), ip("fe80::1")],
            command: false,
        };
        let l = IgnoreList::build(&s);
        assert_eq!(
            l.check(ip("2001:db8::50")),
            Verdict::Ignored("ignoreip office.example")
        );
        assert_eq!(l.check(ip("192.0.2.51")), Verdict::NotIgnored);
        assert_eq!(l.check(ip("10.9.8.7")), Verdict::NotIgnored);
        s.ignore_self = true;
        let l = IgnoreList::build(&s);
        assert_eq!(l.check(ip("10.9.8.7")), Verdict::Ignored("ignoreself"));
        assert_eq!(l.check(ip("fe80::1")), Verdict::Ignored("ignoreself"));
        // An ignorecommand only fail2ban can run: unlisted means unknown.
        s.command = true;
        let l = IgnoreList::build(&s);
        assert_eq!(l.check(ip("192.0.2.51")), Verdict::Unknown);
        assert_eq!(l.check(ip("10.9.8.7")), Verdict::Ignored("ignoreself"));
    }

    #[test]
    fn a_list_never_read_or_stale_is_unknown_but_still_refuses() {
        let (tx, view) = channel();
        assert_eq!(view.current().check("192.0.2.1"), Verdict::Unknown);
        let l = Arc::new(list(&["192.0.2.1"]));
        tx.send_replace(Some(Snapshot {
            list: l.clone(),
            read_at: Instant::now(),
        }));
        assert_eq!(view.current().check("192.0.2.2"), Verdict::NotIgnored);
        let old = Instant::now()
            .checked_sub(refresh::STALE + Duration::from_secs(1))
            .unwrap();
        tx.send_replace(Some(Snapshot {
            list: l,
            read_at: old,
        }));
        let cur = view.current();
        assert_eq!(cur.check("192.0.2.2"), Verdict::Unknown);
        assert_eq!(
            cur.check("192.0.2.1"),
            Verdict::Ignored("ignoreip 192.0.2.1")
        );
    }

    #[tokio::test]
    async fn the_first_read_is_awaited_only_until_it_was_tried() {
        let quick = Duration::from_secs(1);
        // A failed first read (nothing published) ends the wait.
        let (tx, mut view) = channel();
        let t = Instant::now();
        let waiter = tokio::spawn(async move {
            view.first_read(Duration::from_secs(30)).await;
            view
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_replace(None);
        let view = waiter.await.unwrap();
        assert!(t.elapsed() < quick);
        assert_eq!(view.current().check("192.0.2.1"), Verdict::Unknown);
        // No refresher at all (no control socket): no wait.
        let (tx, mut view) = channel();
        drop(tx);
        let t = Instant::now();
        view.first_read(Duration::from_secs(30)).await;
        assert!(t.elapsed() < quick);
    }

    /// The cost of a lookup, printed: `cargo test --release lookup_cost --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lookup_cost() {
        let mut entries: Vec<String> = (0..50).map(|i| format!("192.0.2.{i}")).collect();
        entries.extend((0..10).map(|i| format!("10.{i}.0.0/16")));
        entries.extend(["198.51.100.0/24".into(), "2001:db8::/48".into()]);
        let l = IgnoreList::build(&Sources {
            entries,
            ignore_self: true,
            own: vec![ip("127.0.0.1"), ip("::1"), ip("10.0.0.5")],
            ..Sources::default()
        });
        let (tx, view) = channel();
        tx.send_replace(Some(Snapshot {
            list: Arc::new(l),
            read_at: Instant::now(),
        }));
        let ips: Vec<String> = (0..1000)
            .map(|i| format!("203.0.{}.{}", i / 250, i % 250))
            .collect();
        let n = 1000;
        let t = Instant::now();
        let mut hits = 0;
        for _ in 0..n {
            let cur = view.current();
            for a in &ips {
                hits += matches!(cur.check(a), Verdict::Ignored(_)) as usize;
            }
        }
        let per = t.elapsed() / (n * ips.len() as u32);
        println!("lookup: {per:?} per address (snapshot taken per 1000), {hits} hits");
    }
}
