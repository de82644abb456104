//! The task that keeps the node's copy of the `shared` jail's ignore list
//! current: fail2ban says nothing when `addignoreip` runs or its
//! configuration is reloaded, so the node asks again every [`REFRESH`].
//!
//! Each round: three requests on fail2ban's control socket (`get shared
//! ignoreip`, `ignoreself`, `ignorecommand`; 0.2-0.4 ms together on a
//! quiet machine, measured on fail2ban 1.0.2), the DNS names among the entries resolved (each kept
//! [`DNS_TTL`], fail2ban's own cache time; a name that stops resolving
//! keeps its last addresses), the interfaces read, and a new
//! [`IgnoreList`] published. A failed read publishes nothing: the last list
//! keeps refusing what it lists, and after [`STALE`] the applier stops
//! trusting it to be complete (see the module doc of [`super`]).
//! Failures are logged once per change of state, not once per round.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Entry, IgnoreList, Snapshot, Sources, own_addresses, parse_entry};
use crate::{
    fail2ban::{Fail2ban, Fail2banError},
    node::apply::SHARED_JAIL,
    shutdown::Shutdown,
};

/// How often the list is read again: an address added at runtime is
/// honoured within this (plus one round's time).
pub const REFRESH: Duration = Duration::from_secs(2);
/// After this long without a good read, an address the list does not
/// cover is no longer known to be bannable: the ban goes through
/// `shared.log` only, where fail2ban checks it.
pub const STALE: Duration = Duration::from_secs(10);
/// How long a name's addresses are used before it is resolved again
/// (fail2ban's `DNSUtils` cache keeps them 5 minutes too).
pub const DNS_TTL: Duration = Duration::from_secs(300);
/// How soon a name that did not resolve is tried again.
const DNS_RETRY: Duration = Duration::from_secs(30);
/// Longest wait for one name.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the list now and every [`REFRESH`] until `shutdown`, publishing
/// each good read into `tx`.
pub async fn run(socket: PathBuf, tx: watch::Sender<Option<Snapshot>>, mut shutdown: Shutdown) {
    let mut r = Refresher {
        f2b: Fail2ban::new(&socket),
        names: HashMap::new(),
        up: None,
        last: None,
    };
    loop {
        r.round(&tx).await;
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = shutdown.recv() => break,
        }
    }
    r.f2b.close().await;
}

/// A name's addresses and when to resolve it again.
struct Resolved {
    addrs: Vec<IpAddr>,
    next: Instant,
    /// The last attempt failed (logged once, not every retry).
    failing: bool,
}

struct Refresher {
    f2b: Fail2ban,
    names: HashMap<String, Resolved>,
    /// Whether the last read worked (`None` before the first).
    up: Option<bool>,
    last: Option<Sources>,
}

impl Refresher {
    async fn round(&mut self, tx: &watch::Sender<Option<Snapshot>>) {
        let started = Instant::now();
        let read = self.read().await;
        let took = started.elapsed();
        let (entries, ignore_self, command) = match read {
            Ok(r) => r,
            Err(e) => {
                if self.up != Some(false) {
                    warn!(error = %e, "cannot read the shared jail's ignore list (ignoreip); bans not on the last list read go through shared.log only, where fail2ban checks them");
                }
                if self.up.is_none() {
                    // Nothing to publish, but the first attempt is over:
                    // the applier stops waiting for it.
                    tx.send_replace(None);
                }
                self.up = Some(false);
                return;
            }
        };
        if self.up != Some(true) {
            info!(
                took_us = took.as_micros() as u64,
                "shared jail's ignore list read from fail2ban; re-read every 2s"
            );
        }
        self.up = Some(true);
        debug!(
            took_us = took.as_micros() as u64,
            "ignore list read from fail2ban"
        );

        let mut names: Vec<String> = entries
            .iter()
            .filter_map(|e| match parse_entry(e) {
                Some(Entry::Name(n)) => Some(n),
                _ => None,
            })
            .collect();
        let own_names = if ignore_self {
            own_addresses::names()
        } else {
            vec![]
        };
        names.extend(own_names.iter().cloned());
        self.resolve(&names).await;

        let mut own = if ignore_self {
            own_addresses::interfaces().unwrap_or_else(|e| {
                warn!(error = %e, "cannot list this host's interfaces for ignoreself");
                vec![]
            })
        } else {
            vec![]
        };
        for n in &own_names {
            own.extend(self.addrs(n));
        }
        own.sort();
        own.dedup();
        let resolved = names.iter().map(|n| (n.clone(), self.addrs(n))).collect();
        let sources = Sources {
            entries,
            resolved,
            ignore_self,
            own,
            command: !command.is_empty(),
        };
        // Rebuilt only when something changed; the snapshot is renewed
        // either way, since its time says the list is current.
        let unchanged = self.last.as_ref() == Some(&sources);
        let kept = if unchanged {
            tx.borrow().as_ref().map(|s| s.list.clone())
        } else {
            None
        };
        let list = kept.unwrap_or_else(|| {
            info!(
                entries = ?sources.entries,
                ignoreself = sources.ignore_self,
                own = ?sources.own,
                "shared jail's ignore list: these are never banned here"
            );
            if sources.command {
                warn!(%command, "the shared jail has an ignorecommand, which banmesh does not run: bans it does not list go through shared.log only, where fail2ban runs the command");
            }
            Arc::new(IgnoreList::build(&sources))
        });
        self.last = Some(sources);
        tx.send_replace(Some(Snapshot {
            list,
            read_at: started,
        }));
    }

    /// `ignoreip`, `ignoreself` and `ignorecommand` of the shared jail.
    async fn read(&mut self) -> Result<(Vec<String>, bool, String), Fail2banError> {
        let entries = self.f2b.ignore_ip(SHARED_JAIL).await?;
        let ignore_self = self.f2b.ignore_self(SHARED_JAIL).await?;
        let command = self.f2b.ignore_command(SHARED_JAIL).await?;
        Ok((entries, ignore_self, command))
    }

    fn addrs(&self, name: &str) -> Vec<IpAddr> {
        self.names
            .get(name)
            .map_or_else(Vec::new, |r| r.addrs.clone())
    }

    /// Resolves the names not resolved yet or due again, all at once; a
    /// name no longer in use is forgotten.
    async fn resolve(&mut self, names: &[String]) {
        let wanted: HashSet<&String> = names.iter().collect();
        self.names.retain(|n, _| wanted.contains(n));
        let now = Instant::now();
        let due: Vec<&String> = wanted
            .into_iter()
            .filter(|n| self.names.get(*n).is_none_or(|r| r.next <= now))
            .collect();
        if due.is_empty() {
            return;
        }
        let answers = join_all(due.iter().map(|n| lookup(n))).await;
        for (name, answer) in due.into_iter().zip(answers) {
            let entry = self.names.entry(name.clone()).or_insert(Resolved {
                addrs: vec![],
                next: now,
                failing: false,
            });
            match answer.and_then(|a| {
                if a.is_empty() {
                    Err("no address".into())
                } else {
                    Ok(a)
                }
            }) {
                Ok(addrs) => {
                    entry.addrs = addrs;
                    entry.next = now + DNS_TTL;
                    entry.failing = false;
                }
                Err(reason) => {
                    // Its last addresses stay: a DNS outage must not start
                    // banning the office.
                    if !entry.failing {
                        warn!(name = %name, kept = ?entry.addrs, %reason, "an ignoreip name does not resolve; tried again every 30s");
                    }
                    entry.next = now + DNS_RETRY;
                    entry.failing = true;
                }
            }
        }
    }
}

/// The IPv4 and IPv6 addresses of a name, as fail2ban's `dnsToIp` asks
/// for them (getaddrinfo).
async fn lookup(name: &str) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => {
            let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            v.sort();
            v.dedup();
            Ok(v)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {DNS_TIMEOUT:?}")),
    }
}
