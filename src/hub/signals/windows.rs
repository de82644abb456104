//! The signal windows: per address, the failures and closed-port probes
//! the fleet's hosts observed, in sliding windows, and the thresholds that
//! turn them into a [`FleetVerdict`]. Pure: time is passed in (seconds on
//! the windows' clock, see [`Windows::new`]), nothing here reads a clock,
//! spawns or logs, so every rule is unit-tested below.
//!
//! Contract:
//! - Failures are summed over hosts: `fleet_maxretry` of them with
//!   `at` within the last `fleet_findtime` ban the address, but only when
//!   at least `fleet_min_hosts` distinct hosts saw them (one host's own
//!   jail already covers the single-host case).
//! - Probes count distinct closed ports (protocol and port) within the
//!   last `probe_findtime`, on one host or across hosts: `probe_ports` of
//!   them ban the address.
//! - A threshold crossing yields one verdict. The address's marks are then
//!   cleared and it is quiet (signals ignored) for the longest findtime:
//!   the ban is in flight or in force, a second verdict would only repeat
//!   it.
//! - Memory is bounded: at most `max_addresses` addresses, each holding at
//!   most `fleet_maxretry + probe_ports` marks of 12 bytes. When full, the
//!   address least recently signalled is dropped first, and counted.
//!   Addresses whose marks have all left their windows are removed as
//!   time passes (expired, not counted as dropped).
//!
//! Layout: a hash map from address to a slot in one vector of slots, and
//! the slots linked in signal order (newest at the head), so both the
//! lookup and the oldest-first drop are O(1) with no per-signal
//! allocation. A slot is 56 bytes plus its marks.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

/// The fleet jail of a ban for failures summed over hosts.
pub const FLEET_JAIL: &str = "banmesh-fleet";
/// The fleet jail of a ban for probes of closed ports.
pub const PORTSCAN_JAIL: &str = "banmesh-portscan";

/// Default `--fleet-maxretry`: what a typical jail allows one host
/// (fail2ban's own default is 5), doubled for the whole fleet.
pub const DEFAULT_FLEET_MAXRETRY: u32 = 10;
/// Default `--fleet-findtime`: fail2ban's own default findtime.
pub const DEFAULT_FLEET_FINDTIME: Duration = Duration::from_secs(600);
/// Default `--fleet-min-hosts`: the smallest number that is a fleet.
pub const DEFAULT_FLEET_MIN_HOSTS: u32 = 2;
/// Default `--probe-ports`: a client that mistyped a port tries one or
/// two; a scanner tries many.
pub const DEFAULT_PROBE_PORTS: u32 = 5;
/// Default `--probe-findtime`: scanners are fast; a slow scan of one
/// port a minute slips under, by choice (see the README).
pub const DEFAULT_PROBE_FINDTIME: Duration = Duration::from_secs(60);
/// Default `--signal-max-addresses`.
pub const DEFAULT_MAX_ADDRESSES: usize = 1_000_000;
/// How far in the future a signal's time may be (clock skew), seconds.
pub const FUTURE_SLACK_S: u32 = 60;

/// The thresholds that turn signals into fleet bans (`hub policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures over all hosts that ban an address; 0 turns failures off.
    pub fleet_maxretry: u32,
    /// The failures' window.
    pub fleet_findtime: Duration,
    /// Distinct hosts that must have seen the failures.
    pub fleet_min_hosts: u32,
    /// Distinct closed ports probed that ban an address; 0 turns probes off.
    pub probe_ports: u32,
    /// The probes' window.
    pub probe_findtime: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            fleet_maxretry: DEFAULT_FLEET_MAXRETRY,
            fleet_findtime: DEFAULT_FLEET_FINDTIME,
            fleet_min_hosts: DEFAULT_FLEET_MIN_HOSTS,
            probe_ports: DEFAULT_PROBE_PORTS,
            probe_findtime: DEFAULT_PROBE_FINDTIME,
        }
    }
}

impl Thresholds {
    fn fleet_s(&self) -> u32 {
        self.fleet_findtime.as_secs().min(u32::MAX as u64 / 4) as u32
    }

    fn probe_s(&self) -> u32 {
        self.probe_findtime.as_secs().min(u32::MAX as u64 / 4) as u32
    }

    /// The longest window: how long a signal can matter, and how long an
    /// address stays quiet after a verdict.
    pub fn longest(&self) -> Duration {
        self.fleet_findtime.max(self.probe_findtime)
    }
}

/// What a host observed of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// fail2ban's filter matched a failure.
    Failure,
    /// A connection attempt to a closed port.
    Probe {
        /// UDP rather than TCP.
        udp: bool,
        /// The closed port.
        port: u16,
    },
}

/// One signal, checked and converted at the edge (see `ingest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal {
    /// The address, canonical (`::ffff:a.b.c.d` is `a.b.c.d`).
    pub ip: IpAddr,
    /// The observing host (an id from [`Windows::host_id`]).
    pub host: u32,
    /// When it was observed, seconds on the windows' clock.
    pub at: u32,
    /// What was observed.
    pub what: Observed,
}

/// A threshold crossing: the address the fleet should ban, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetVerdict {
    /// The address, canonical.
    pub ip: IpAddr,
    /// [`FLEET_JAIL`] or [`PORTSCAN_JAIL`].
    pub jail: &'static str,
    /// In words, for the event and the log: "10 failures on 5 hosts in 4m".
    pub reason: String,
}

/// One observation as an address keeps it: 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    at: u32,
    host: u32,
    /// 0 for a failure; otherwise `PROBE | udp << 16 | port`.
    what: u32,
}

const PROBE: u32 = 1 << 31;

impl Mark {
    fn is_probe(&self) -> bool {
        self.what & PROBE != 0
    }
}

const NIL: u32 = u32::MAX;

/// One address's state, linked in signal order.
#[derive(Debug)]
struct Slot {
    key: (u64, u64),
    prev: u32,
    next: u32,
    /// When it was last signalled (arrival, on the windows' clock).
    touched: u32,
    /// Signals are ignored until then (a verdict was just given).
    quiet_until: u32,
    marks: Vec<Mark>,
}

/// Counters for `hub policy` and the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Addresses in the windows now.
    pub tracked: u64,
    /// Addresses dropped (oldest first) to stay within the bound, ever.
    pub dropped: u64,
    /// Addresses whose marks all left their windows, ever.
    pub expired: u64,
    /// Verdicts given, ever.
    pub verdicts: u64,
    /// Signals ignored: older than their window, or for a quiet address.
    pub ignored: u64,
}

/// Every address's windows; see the module doc.
#[derive(Debug)]
pub struct Windows {
    thresholds: Thresholds,
    max: usize,
    index: HashMap<(u64, u64), u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Newest and oldest signalled.
    head: u32,
    tail: u32,
    hosts: HashMap<String, u32>,
    stats: WindowStats,
}

fn key(ip: IpAddr) -> (u64, u64) {
    let v6: Ipv6Addr = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let n = u128::from(v6);
    ((n >> 64) as u64, n as u64)
}

fn ip_of(key: (u64, u64)) -> IpAddr {
    let v6 = Ipv6Addr::from((u128::from(key.0) << 64) | u128::from(key.1));
    crate::ban::canonical_ip(IpAddr::V6(v6))
}

/// "4m 10s", "40s": a span in seconds as an operator reads it.
fn span(secs: u32) -> String {
    humantime::format_duration(Duration::from_secs(u64::from(secs))).to_string()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Windows {
    /// Empty windows applying `thresholds`, holding at most `max_addresses`
    /// addresses (at least one).
    pub fn new(thresholds: Thresholds, max_addresses: usize) -> Self {
        Windows {
            thresholds,
            max: max_addresses.max(1),
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            hosts: HashMap::new(),
            stats: WindowStats::default(),
        }
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// The bound on addresses.
    pub fn max_addresses(&self) -> usize {
        self.max
    }

    /// The counters.
    pub fn stats(&self) -> WindowStats {
        WindowStats {
            tracked: self.index.len() as u64,
            ..self.stats
        }
    }

    /// The id of a host name (hosts are the fleet's enrolled names: this
    /// table is as big as the fleet). Names compare case-insensitively.
    pub fn host_id(&mut self, name: &str) -> u32 {
        let next = self.hosts.len() as u32;
        *self.hosts.entry(name.to_ascii_lowercase()).or_insert(next)
    }

    /// Takes one signal at `now` (arrival, windows' clock); a verdict when
    /// it makes its address cross a threshold.
    pub fn observe(&mut self, s: Signal, now: u32) -> Option<FleetVerdict> {
        let t = self.thresholds;
        let window = match s.what {
            Observed::Failure if t.fleet_maxretry == 0 => return None,
            Observed::Probe { .. } if t.probe_ports == 0 => return None,
            Observed::Failure => t.fleet_s(),
            Observed::Probe { .. } => t.probe_s(),
        };
        if s.at.saturating_add(window) <= now {
            self.stats.ignored += 1;
            return None;
        }
        self.expire(now);
        let slot = self.slot(key(s.ip), now);
        let sl = &mut self.slots[slot as usize];
        if sl.quiet_until > now {
            self.stats.ignored += 1;
            return None;
        }
        let (fleet_s, probe_s) = (t.fleet_s(), t.probe_s());
        sl.marks.retain(|m| {
            let w = if m.is_probe() { probe_s } else { fleet_s };
            m.at.saturating_add(w) > now
        });
        let verdict = match s.what {
            Observed::Failure => {
                add_failure(&mut sl.marks, s, t.fleet_maxretry as usize);
                failures_verdict(&sl.marks, &t, s.ip)
            }
            Observed::Probe { udp, port } => {
                let what = PROBE | u32::from(udp) << 16 | u32::from(port);
                add_probe(&mut sl.marks, s, what, t.probe_ports as usize);
                probes_verdict(&sl.marks, &t, s.ip)
            }
        };
        if verdict.is_some() {
            sl.marks = Vec::new();
            sl.quiet_until = now.saturating_add(t.longest().as_secs().min(u32::MAX as u64) as u32);
            self.stats.verdicts += 1;
        }
        verdict
    }

    /// Removes the oldest addresses whose signals can no longer matter:
    /// last signalled longer ago than the longest window (plus the slack a
    /// future-dated signal may have) and not quiet.
    pub fn expire(&mut self, now: u32) {
        let horizon = (self.thresholds.longest().as_secs().min(u32::MAX as u64 / 4) as u32)
            .saturating_add(FUTURE_SLACK_S);
        while self.tail != NIL {
            let sl = &self.slots[self.tail as usize];
            if sl.touched.saturating_add(horizon) >= now || sl.quiet_until > now {
                break;
            }
            self.remove(self.tail);
            self.stats.expired += 1;
        }
    }

    /// The slot of `key`, moved to the head (made newest); a new one,
    /// dropping the oldest address when full.
    fn slot(&mut self, key: (u64, u64), now: u32) -> u32 {
        if let Some(&i) = self.index.get(&key) {
            self.unlink(i);
            self.push_head(i);
            self.slots[i as usize].touched = now;
            return i;
        }
        if self.index.len() >= self.max {
            self.remove(self.tail);
            self.stats.dropped += 1;
        }
        let fresh = Slot {
            key,
            prev: NIL,
            next: NIL,
            touched: now,
            quiet_until: 0,
            marks: Vec::new(),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = fresh;
                i
            }
            None => {
                self.slots.push(fresh);
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
        self.push_head(i);
        i
    }

    fn remove(&mut self, i: u32) {
        self.unlink(i);
        let sl = &mut self.slots[i as usize];
        sl.marks = Vec::new();
        self.index.remove(&sl.key);
        self.free.push(i);
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_head(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }

    /// Addresses from the oldest signalled to the newest (tests, debugging).
    pub fn oldest_first(&self) -> Vec<IpAddr> {
        let mut out = Vec::with_capacity(self.index.len());
        let mut i = self.tail;
        while i != NIL {
            let s = &self.slots[i as usize];
            out.push(ip_of(s.key));
            i = s.prev;
        }
        out
    }
}

/// Grows `marks` by exactly one (a full address holds at most
/// `maxretry + probe_ports` marks, so the exact size is worth the copy).
fn push(marks: &mut Vec<Mark>, m: Mark) {
    marks.reserve_exact(1);
    marks.push(m);
}

/// Adds a failure, keeping at most `cap` of them: past it, the oldest
/// failure of a host that has a newer one goes first, so the marks keep
/// the hosts that saw the address as long as any of their failures could.
fn add_failure(marks: &mut Vec<Mark>, s: Signal, cap: usize) {
    let failures = marks.iter().filter(|m| !m.is_probe()).count();
    if failures >= cap.max(1) {
        // A host with a newer failure (the incoming one counts) loses its
        // oldest first; only when every host has one failure left does the
        // oldest failure overall go.
        let repeated = |i: usize| {
            let m = marks[i];
            m.host == s.host
                || marks
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && !o.is_probe() && o.host == m.host && o.at >= m.at)
        };
        let failures = || (0..marks.len()).filter(|&i| !marks[i].is_probe());
        let victim = failures()
            .filter(|&i| repeated(i))
            .min_by_key(|&i| marks[i].at)
            .or_else(|| failures().min_by_key(|&i| marks[i].at));
        if let Some(i) = victim {
            marks.swap_remove(i);
        }
    }
    push(
        marks,
        Mark {
            at: s.at,
            host: s.host,
            what: 0,
        },
    );
}

/// Adds a probe: one mark per distinct port, the latest; at most `cap`
/// ports, the one probed longest ago replaced first.
fn add_probe(marks: &mut Vec<Mark>, s: Signal, what: u32, cap: usize) {
    if let Some(m) = marks.iter_mut().find(|m| m.what == what) {
        if s.at >= m.at {
            (m.at, m.host) = (s.at, s.host);
        }
        return;
    }
    let m = Mark {
        at: s.at,
        host: s.host,
        what,
    };
    if marks.iter().filter(|m| m.is_probe()).count() >= cap.max(1) {
        let oldest = marks
            .iter_mut()
            .filter(|m| m.is_probe())
            .min_by_key(|m| m.at);
        if let Some(o) = oldest {
            *o = m;
        }
        return;
    }
    push(marks, m);
}

fn distinct_hosts<'a>(marks: impl Iterator<Item = &'a Mark>) -> usize {
    let mut hosts: Vec<u32> = marks.map(|m| m.host).collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts.len()
}

fn time_span<'a>(marks: impl Iterator<Item = &'a Mark> + Clone) -> u32 {
    let lo = marks.clone().map(|m| m.at).min().unwrap_or(0);
    let hi = marks.map(|m| m.at).max().unwrap_or(0);
    hi - lo
}

fn failures_verdict(marks: &[Mark], t: &Thresholds, ip: IpAddr) -> Option<FleetVerdict> {
    let failures = || marks.iter().filter(|m| !m.is_probe());
    let n = failures().count();
    if n < t.fleet_maxretry as usize {
        return None;
    }
    let hosts = distinct_hosts(failures());
    if hosts < t.fleet_min_hosts as usize {
        return None;
    }
    Some(FleetVerdict {
        ip,
        jail: FLEET_JAIL,
        reason: format!(
            "{} on {} in {}",
            plural(n, "failure", "failures"),
            plural(hosts, "host", "hosts"),
            span(time_span(failures()))
        ),
    })
}

fn probes_verdict(marks: &[Mark], t: &Thresholds, ip: IpAddr) -> Option<FleetVerdict> {
    let probes = || marks.iter().filter(|m| m.is_probe());
    let n = probes().count();
    if n < t.probe_ports as usize {
        return None;
    }
    Some(FleetVerdict {
        ip,
        jail: PORTSCAN_JAIL,
        reason: format!(
            "{} probed on {} in {}",
            plural(n, "closed port", "closed ports"),
            plural(distinct_hosts(probes()), "host", "hosts"),
            span(time_span(probes()))
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn thresholds() -> Thresholds {
        Thresholds::default()
    }

    fn failure(w: &mut Windows, addr: &str, host: &str, at: u32) -> Option<FleetVerdict> {
        let host = w.host_id(host);
        w.observe(
            Signal {
                ip: ip(addr),
                host,
                at,
                what: Observed::Failure,
            },
            at,
        )
    }

    fn probe(w: &mut Windows, addr: &str, host: &str, port: u16, at: u32) -> Option<FleetVerdict> {
        let host = w.host_id(host);
        w.observe(
            Signal {
                ip: ip(addr),
                host,
                at,
                what: Observed::Probe { udp: false, port },
            },
            at,
        )
    }

    #[test]
    fn failures_are_summed_over_hosts() {
        let mut w = Windows::new(thresholds(), 100);
        for i in 0..9 {
            let host = ["a", "b", "c", "d", "e"][i % 5];
            assert_eq!(
                failure(&mut w, "192.0.2.1", host, 1000 + i as u32 * 20),
                None
            );
        }
        let v = failure(&mut w, "192.0.2.1", "e", 1240).expect("the tenth failure bans");
        assert_eq!(v.ip, ip("192.0.2.1"));
        assert_eq!(v.jail, FLEET_JAIL);
        assert_eq!(v.reason, "10 failures on 5 hosts in 4m");
    }

    #[test]
    fn one_host_alone_never_makes_a_fleet_ban() {
        let mut w = Windows::new(thresholds(), 100);
        for i in 0..50 {
            assert_eq!(failure(&mut w, "192.0.2.1", "a", 1000 + i), None);
        }
        // A second host's one failure brings the hosts to two.
        let v = failure(&mut w, "192.0.2.1", "b", 1050).expect("two hosts ban");
        assert_eq!(v.reason, "10 failures on 2 hosts in 9s");
    }

    #[test]
    fn the_second_host_is_kept_while_one_host_floods() {
        let three = Thresholds {
            fleet_min_hosts: 3,
            ..thresholds()
        };
        let mut w = Windows::new(three, 100);
        failure(&mut w, "192.0.2.1", "b", 1000);
        for i in 0..30 {
            assert_eq!(failure(&mut w, "192.0.2.1", "a", 1001 + i), None);
        }
        // Still within b's window: b's failure was kept through a's flood.
        let v = failure(&mut w, "192.0.2.1", "c", 1040).expect("a, b and c");
        assert_eq!(v.reason, "10 failures on 3 hosts in 40s");
    }

    #[test]
    fn failures_outside_findtime_do_not_count() {
        let mut w = Windows::new(thresholds(), 100);
        // 9 failures at t=1000..1008, then the 10th exactly findtime after the first.
        for i in 0..9 {
            failure(&mut w, "192.0.2.1", ["a", "b"][i % 2], 1000 + i as u32);
        }
        assert_eq!(
            failure(&mut w, "192.0.2.1", "a", 1600),
            None,
            "the first left the window"
        );
        // One more at the same second: the other eight and these two.
        assert!(failure(&mut w, "192.0.2.1", "b", 1600).is_some());
    }

    #[test]
    fn a_signal_older_than_its_window_is_ignored() {
        let mut w = Windows::new(thresholds(), 100);
        let host = w.host_id("a");
        let old = Signal {
            ip: ip("192.0.2.1"),
            host,
            at: 1000,
            what: Observed::Failure,
        };
        assert_eq!(w.observe(old, 1600), None);
        assert_eq!(w.stats().ignored, 1);
        assert_eq!(w.stats().tracked, 0);
    }

    #[test]
    fn distinct_closed_ports_ban_on_one_host_or_across_hosts() {
        let mut w = Windows::new(thresholds(), 100);
        // The same port again and again is one port.
        for i in 0..10 {
            assert_eq!(probe(&mut w, "198.51.100.7", "a", 22, 1000 + i), None);
        }
        for (i, port) in [23, 25, 80].into_iter().enumerate() {
            assert_eq!(
                probe(&mut w, "198.51.100.7", "a", port, 1010 + i as u32),
                None
            );
        }
        let v = probe(&mut w, "198.51.100.7", "b", 443, 1020).expect("five ports");
        assert_eq!(v.jail, PORTSCAN_JAIL);
        assert_eq!(v.reason, "5 closed ports probed on 2 hosts in 11s");

        // One host alone is enough for probes.
        for (i, port) in [1, 2, 3, 4].into_iter().enumerate() {
            assert_eq!(
                probe(&mut w, "198.51.100.8", "a", port, 2000 + i as u32),
                None
            );
        }
        assert!(probe(&mut w, "198.51.100.8", "a", 5, 2004).is_some());
    }

    #[test]
    fn probes_outside_probe_findtime_do_not_count() {
        let mut w = Windows::new(thresholds(), 100);
        for (i, port) in [1, 2, 3, 4].into_iter().enumerate() {
            probe(&mut w, "198.51.100.7", "a", port, 1000 + i as u32);
        }
        // Port 1 was probed 60 s ago: out of the window.
        assert_eq!(probe(&mut w, "198.51.100.7", "a", 5, 1060), None);
        assert!(probe(&mut w, "198.51.100.7", "a", 6, 1060).is_some());
    }

    #[test]
    fn tcp_and_udp_of_one_port_are_two_ports() {
        let mut w = Windows::new(thresholds(), 100);
        let host = w.host_id("a");
        let mut verdicts = 0;
        for (udp, port) in [(false, 53), (true, 53), (false, 1), (true, 1), (false, 2)] {
            let s = Signal {
                ip: ip("2001:db8::1"),
                host,
                at: 100,
                what: Observed::Probe { udp, port },
            };
            verdicts += w.observe(s, 100).is_some() as u32;
        }
        assert_eq!(verdicts, 1);
    }

    #[test]
    fn one_verdict_per_address_while_its_ban_is_in_flight() {
        let mut w = Windows::new(thresholds(), 100);
        let mut verdicts = 0;
        for i in 0..100 {
            verdicts +=
                failure(&mut w, "192.0.2.1", ["a", "b"][i % 2], 1000 + i as u32).is_some() as u32;
        }
        assert_eq!(verdicts, 1);
        assert_eq!(w.stats().verdicts, 1);
        // After the quiet time, a new wave is a new verdict.
        for i in 0..10 {
            verdicts +=
                failure(&mut w, "192.0.2.1", ["a", "b"][i % 2], 1700 + i as u32).is_some() as u32;
        }
        assert_eq!(verdicts, 2);
    }

    #[test]
    fn the_oldest_address_is_dropped_first_and_counted() {
        let mut w = Windows::new(thresholds(), 3);
        failure(&mut w, "192.0.2.1", "a", 100);
        failure(&mut w, "192.0.2.2", "a", 101);
        failure(&mut w, "192.0.2.3", "a", 102);
        // .1 signalled again: .2 is now the oldest.
        failure(&mut w, "192.0.2.1", "a", 103);
        failure(&mut w, "192.0.2.4", "a", 104);
        assert_eq!(
            w.oldest_first(),
            [ip("192.0.2.3"), ip("192.0.2.1"), ip("192.0.2.4")]
        );
        let s = w.stats();
        assert_eq!((s.tracked, s.dropped), (3, 1));
    }

    #[test]
    fn addresses_past_every_window_expire_without_counting_as_dropped() {
        let mut w = Windows::new(thresholds(), 10);
        failure(&mut w, "192.0.2.1", "a", 100);
        failure(&mut w, "192.0.2.2", "a", 500);
        w.expire(100 + 600 + FUTURE_SLACK_S + 1);
        assert_eq!(w.oldest_first(), [ip("192.0.2.2")]);
        let s = w.stats();
        assert_eq!((s.tracked, s.dropped, s.expired), (1, 0, 1));
    }

    #[test]
    fn an_address_costs_what_the_budget_says() {
        // The README's per-address figure rests on these.
        assert_eq!(std::mem::size_of::<Mark>(), 12);
        assert_eq!(std::mem::size_of::<Slot>(), 56);
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        let mut w = Windows::new(thresholds(), 10);
        failure(&mut w, "::ffff:192.0.2.1", "a", 100);
        failure(&mut w, "192.0.2.1", "b", 100);
        assert_eq!(w.oldest_first(), [ip("192.0.2.1")]);
    }

    #[test]
    fn a_threshold_of_zero_turns_its_kind_off() {
        let mut w = Windows::new(
            Thresholds {
                fleet_maxretry: 0,
                probe_ports: 0,
                ..thresholds()
            },
            10,
        );
        for i in 0..50 {
            assert_eq!(failure(&mut w, "192.0.2.1", ["a", "b"][i % 2], 100), None);
            assert_eq!(probe(&mut w, "192.0.2.1", "a", i as u16, 100), None);
        }
        assert_eq!(w.stats().tracked, 0);
    }
}
