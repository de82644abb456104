//! What the applier asks and tells fail2ban over its control socket: which
//! IPs it already bans and for how long yet, the shared jail's bantime, the
//! fast path (`banip` at once), unbans, and lifts at fleet ends
//! (`set shared unbanip`, only for addresses the shared jail holds).
//!
//! Contract: a socket failure never stops a ban (it goes through the log
//! alone) and is logged once per change of state, not once per batch.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{Applier, Held, SHARED_JAIL};
use crate::{
    ban::{Event, Status},
    fail2ban::{BanTime, Fail2banError},
};

/// IPs per `banip` request. fail2ban 1.0.2 runs one `ipset add` process
/// per IP (~5 ms each, measured: 2,000 IPs in 10 s whatever the chunk), so
/// bigger chunks save nothing; at 20 per request other clients of the
/// socket wait ~60 ms (median) instead of ~400 ms at 100.
const BANIP_CHUNK: usize = 20;
/// How long the shared jail's bantime is trusted before asking again.
const BANTIME_TTL: Duration = Duration::from_secs(60);

impl Applier {
    /// Logs fail2ban going away or coming back, once per change.
    fn note_fail2ban(&mut self, result: Result<(), &Fail2banError>) {
        let up = result.is_ok();
        if self.fail2ban_up != Some(up) {
            match result {
                Ok(()) => {
                    info!(socket = ?self.config.fail2ban_socket, "fail2ban control socket reachable")
                }
                Err(e) => {
                    warn!(error = %e, "fail2ban control socket unavailable; applying bans through shared.log without the already-banned check")
                }
            }
            self.fail2ban_up = Some(up);
        }
    }

    /// The shared jail's bantime in seconds, asked of fail2ban now and then.
    pub(super) async fn shared_bantime(&mut self) -> Option<i64> {
        if let Some((b, at)) = self.bantime
            && at.elapsed() < BANTIME_TTL
        {
            return Some(b);
        }
        let b = self.fail2ban.as_mut()?.bantime(SHARED_JAIL).await.ok()?;
        self.bantime = Some((b, Instant::now()));
        Some(b)
    }

    /// Lifts the fleet bans whose end has come from the `shared` jail (and
    /// lifts again those a late line banned anew), then forgets those
    /// fail2ban confirms free once their linger is over
    /// ([`crate::node::lifts`]). One `banned` request per chunk asks which
    /// the shared jail holds; only those are lifted, never in other jails.
    pub(super) async fn lift_due(&mut self) {
        let now_ms = crate::clock::now_ms();
        let due = self.lifts.due(now_ms);
        if due.is_empty() {
            return;
        }
        let Some(f2b) = self.fail2ban.as_mut() else {
            return;
        };
        let mut free = Vec::new();
        let mut result = Ok(());
        for chunk in due.chunks(BANIP_CHUNK) {
            let texts: Vec<String> = chunk.iter().map(|(ip, _)| ip.to_string()).collect();
            let ips: Vec<&str> = texts.iter().map(String::as_str).collect();
            let jails = match f2b.banned(&ips).await {
                Ok(j) => j,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            for (((key, lift), ip), jails) in chunk.iter().zip(&ips).zip(jails) {
                let ip = *ip;
                // Its line is no longer "just added": the ban it wrote is over.
                self.recent.forget(*key, Instant::now());
                if !jails.iter().any(|j| j == SHARED_JAIL) {
                    free.push((*key, *lift));
                    continue;
                }
                match f2b.unban_in(SHARED_JAIL, ip).await {
                    Ok(_) => {
                        let late_ms = now_ms - lift.ends_ms;
                        info!(
                            ip,
                            id = lift.event,
                            late_ms,
                            "fleet ban ended; lifted from the shared jail"
                        );
                        free.push((*key, *lift));
                    }
                    Err(e) => {
                        warn!(ip, error = %e, "cannot lift an ended fleet ban; trying again");
                    }
                }
            }
        }
        self.note_fail2ban(result.as_ref().map(|_| ()));
        self.lifts.confirmed(&free, now_ms);
    }

    /// The fast path: bans IPs in the shared jail through the socket, a
    /// chunk per request; returns those fail2ban confirmed.
    pub(super) async fn ban_now<'a>(&mut self, ips: &[&'a str]) -> HashSet<&'a str> {
        let mut confirmed = HashSet::new();
        if !self.config.fast_path || ips.is_empty() {
            return confirmed;
        }
        let Some(f2b) = self.fail2ban.as_mut() else {
            return confirmed;
        };
        let mut result = Ok(());
        for chunk in ips.chunks(BANIP_CHUNK) {
            match f2b.ban(SHARED_JAIL, chunk).await {
                Ok(_) => confirmed.extend(chunk.iter().copied()),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let up = result.is_ok();
        // Once per change of state (the first try counts as one): while
        // fail2ban is down every batch would otherwise write this line.
        self.fast_path_up
            .store(up, std::sync::atomic::Ordering::Relaxed);
        if self.fast_path_said.replace(up) != Some(up) {
            match &result {
                Ok(()) => {
                    info!("fast path up: bans go to fail2ban's socket at once, and to shared.log")
                }
                Err(e) => warn!(error = %e, "fast path down: bans go through shared.log only"),
            }
        }
        confirmed
    }

    /// Asks fail2ban which of these IPs it bans, and for how long yet: per
    /// IP, one entry per jail that bans it (`None` if it listed no times).
    /// IPs it does not ban are left out.
    pub(super) async fn held(&mut self, events: &[Event]) -> HashMap<String, Vec<Held>> {
        let Some(f2b) = self.fail2ban.as_mut() else {
            return HashMap::new();
        };
        let ips: Vec<&str> = {
            let mut seen = HashSet::new();
            events
                .iter()
                .map(|e| e.ban.ip.as_str())
                .filter(|ip| seen.insert(*ip))
                .collect()
        };
        let jails = match f2b.banned(&ips).await {
            Ok(j) => j,
            Err(e) => {
                self.note_fail2ban(Err(&e));
                return HashMap::new();
            }
        };
        let mut times: HashMap<String, HashMap<String, BanTime>> = HashMap::new();
        let mut held = HashMap::new();
        for (ip, jails) in ips.iter().zip(jails) {
            let mut bans = Vec::with_capacity(jails.len());
            for jail in jails {
                if !times.contains_key(&jail) {
                    let t = f2b.jail_bans(&jail).await.unwrap_or_default();
                    times.insert(jail.clone(), t);
                }
                bans.push(Held {
                    shared: jail == SHARED_JAIL,
                    time: times[&jail].get(*ip).copied(),
                });
            }
            if !bans.is_empty() {
                held.insert(ip.to_string(), bans);
            }
        }
        self.note_fail2ban(Ok(()));
        held
    }

    /// Lifts again the recently unbanned IPs fail2ban banned anew from a
    /// line it read after the unban; forgets them after [`super::RELIFT_FOR`].
    pub(super) async fn relift_due(&mut self) {
        let now = Instant::now();
        self.relift.retain(|_, until| *until > now);
        let Some(f2b) = self.fail2ban.as_mut() else {
            self.relift.clear();
            return;
        };
        // One `banned` request (in chunks) asks which of them the `shared`
        // jail holds again; only those are lifted, so a tick costs one
        // round trip per chunk however many addresses are watched. Only
        // the `shared` jail: that is what our late line bans; the host's
        // own jails (sshd, say) may ban the address again on their own
        // account, which is not ours to undo.
        let texts: Vec<String> = self.relift.keys().map(ToString::to_string).collect();
        let watched: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut again = Vec::new();
        for chunk in watched.chunks(BANIP_CHUNK) {
            if let Ok(jails) = f2b.banned(chunk).await {
                again.extend(
                    chunk
                        .iter()
                        .zip(jails)
                        .filter(|(_, j)| j.iter().any(|j| j == SHARED_JAIL))
                        .map(|(ip, _)| ip.to_string()),
                );
            }
        }
        for ip in &again {
            if let Ok(n) = f2b.unban_in(SHARED_JAIL, ip).await
                && n > 0
            {
                info!(
                    ip,
                    "fail2ban banned an unbanned address again from its shared.log line; lifted again"
                );
            }
        }
    }

    /// Lifts an IP in every jail; see the module doc of `apply` for its status.
    pub(super) async fn unban(&mut self, event: &Event) -> (u64, Status) {
        let ip = event.ban.ip.as_str();
        let key = crate::node::lifts::AddrKey::parse(ip);
        self.deferred.cancel(ip);
        // fail2ban may not have read our line yet (it polls shared.log);
        // read after this unban, it would ban the address again.
        if let Some(key) = key
            && self.recent.forget(key, Instant::now())
        {
            self.relift.insert(key, Instant::now() + super::RELIFT_FOR);
        }
        let Some(f2b) = self.fail2ban.as_mut() else {
            warn!(ip, "unban received but no fail2ban socket is configured");
            self.journal(&[(event.id, Status::Error)]);
            return (event.id, Status::Error);
        };
        let result = f2b.unban(ip).await;
        // The lift schedule keeps the address until fail2ban confirms it
        // is out: after a failed unban (fail2ban restarting, say) its entry
        // is made due now, so the lift task retries the shared jail instead
        // of leaving the address to the jail's bantime (the ladder's top).
        if let Some(key) = key {
            self.lifts.cancel(key);
        }
        let status = match &result {
            Ok(0) => Status::AlreadyBanned,
            Ok(_) => Status::Added,
            Err(e) => {
                warn!(ip, error = %e, "cannot lift ban; the shared jail's lift is retried");
                if let Some(key) = key {
                    self.lifts
                        .schedule(&[(key, crate::clock::now_ms(), event.id)]);
                    self.lifts.sync();
                }
                Status::Error
            }
        };
        info!(ip, id = event.id, ?status, "unban applied");
        let r = result.as_ref().map(|_| ());
        self.note_fail2ban(r);
        self.journal(&[(event.id, status)]);
        (event.id, status)
    }
}
