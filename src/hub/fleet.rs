//! The fleet's own addresses, which no ban may cover: the source address
//! of every enrolled host's connection to the hub (`Publish`, `Subscribe`),
//! and the hub's own addresses as its hosts reach it (the local end of
//! those same connections, plus its listen address when that is not a
//! wildcard).
//!
//! Contract: an address is added before the handler of the request that
//! revealed it does anything else, so a host's reports are checked with
//! its own connection's address already known. The set only grows while
//! the hub runs (a host that moved keeps its old address allowed until the
//! hub restarts: a stale allowance is harmless, a missing one locks a
//! member out). It is kept in the store as well (`fleet_addresses`) and
//! read back at start, before the committer takes a report: otherwise,
//! after a restart, another host's report of a member's address could be
//! committed in the moments before that member reconnects.
//! An address new to the set has any active ban of it lifted (an unban by
//! [`LIFTER`] through the committer): a host banned by the fleet before it
//! joined, or before it moved to that address, is let back in.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

/// The name an unban of a fleet address is recorded under.
pub const LIFTER: &str = "banmesh-hub";

/// Shared by the service handlers (which add) and the committer (which checks).
#[derive(Debug, Clone, Default)]
pub struct FleetAddrs(Arc<RwLock<BTreeMap<IpAddr, String>>>);

impl FleetAddrs {
    /// Records `ip` as `who`'s (a host name, or "hub"); the first name
    /// stays. True when the address is new.
    pub fn note(&self, ip: IpAddr, who: &str) -> bool {
        let ip = crate::ban::canonical_ip(ip);
        if self.0.read().unwrap().contains_key(&ip) {
            return false;
        }
        let mut all = self.0.write().unwrap();
        if all.contains_key(&ip) {
            return false;
        }
        tracing::info!(%ip, who, "fleet address: never banned by the fleet");
        all.insert(ip, who.to_string());
        true
    }

    /// Whose address `ip` is, if it is the fleet's.
    pub fn owner(&self, ip: IpAddr) -> Option<String> {
        self.0
            .read()
            .unwrap()
            .get(&crate::ban::canonical_ip(ip))
            .cloned()
    }

    /// Forgets an address, so that the next connection from it notes it
    /// again (and retries lifting its bans, which failed this time).
    pub fn forget(&self, ip: IpAddr) {
        self.0
            .write()
            .unwrap()
            .remove(&crate::ban::canonical_ip(ip));
    }

    /// The set as recorded in the store (rows that do not parse as an
    /// address are skipped: the column is written by [`FleetAddrs::note`]'s
    /// callers only).
    pub fn from_rows(rows: impl IntoIterator<Item = (String, String)>) -> FleetAddrs {
        let all = rows
            .into_iter()
            .filter_map(|(ip, who)| Some((crate::ban::canonical_ip(ip.parse().ok()?), who)))
            .collect();
        FleetAddrs(Arc::new(RwLock::new(all)))
    }

    /// Every fleet address and whose it is.
    pub fn all(&self) -> Vec<(IpAddr, String)> {
        self.0
            .read()
            .unwrap()
            .iter()
            .map(|(a, w)| (*a, w.clone()))
            .collect()
    }
}
