//! Applying the hub's events on this host: what `readdb.py` did, with its
//! rules, through fail2ban's control socket instead of subprocesses.
//!
//! Contract:
//! - One task owns the [`Applier`] ([`run`]) and applies batches in id
//!   order; the position moves only after a batch is applied, and a
//!   status is journaled before the line it describes is written.
//! - For each ban, [`decide`] says what the seed's rules want (status 2,
//!   deferred, expired, or added through the log and perhaps the fast
//!   path), after fail2ban's ignore list for the shared jail
//!   ([`super::ignore`], looked up in memory): an address it covers is
//!   status 4 with no line and no `banip`. The applier carries it out. An
//!   added ban is status 1 once its line is in `shared.log`
//!   ([`super::shared_log`]); a failed write is 3, unless the fast path
//!   banned the IP all the same.
//! - For an unban, the IP is lifted in every jail through the socket:
//!   status 1 if a ban was lifted, 2 if none was held here, 3 on failure.
//!   If the node wrote a line for it lately, it is lifted again in the
//!   `shared` jail each second for [`RELIFT_FOR`] (fail2ban may read that
//!   line after the unban and ban it anew), until a new fleet ban of it
//!   arrives.
//! - A ban with a fleet end (`term.ends_ms`) is held until that end: its
//!   lift is scheduled ([`super::lifts`], saved before the ban reaches
//!   fail2ban) and the task wakes at the end to lift it from the `shared`
//!   jail. An update of a ban held here only moves the lift (status 1).
//!   This host's own reports come back too: status 1, and held in the
//!   `shared` jail only when no jail of this host holds them to the end.
//! - A ban whose address is on the fleet allow-list (this host's saved
//!   copy, [`super::allow_list`], or a built-in) is refused: status 4, no
//!   line, no fast path. Allow-list events update that copy in their
//!   place in the id order, before any later ban is decided.
//! - Without a reachable control socket the node still writes lines (the
//!   log path alone works) and says so in its log; unbans then fail with 3.
//!
//! # Layout
//! - [`decide`]: the seed's rules as a pure function.
//! - `socket`: what the applier asks and tells fail2ban (bans held, the
//!   shared jail's bantime, the fast path, unbans, lifts at fleet ends).
//! - `recent`: the addresses whose line this node wrote lately, held small.
pub mod decide;
mod recent;
mod socket;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

pub use self::decide::{DEFAULT_RECENT_RATIO, Decision, Facts, Held, Reporter, decide};
use super::{
    allow_list::LocalAllowList,
    deferred::Deferred,
    ignore::{IgnoreWatch, Verdict},
    lifts::{AddrKey, Lifts},
    position::Position,
    shared_log::SharedLog,
    status_journal::StatusJournal,
};
use crate::{
    ban::{Event, EventKind, Status},
    fail2ban::Fail2ban,
    shutdown::Shutdown,
};

/// How often deferred bans are checked.
const DEFERRED_TICK: Duration = Duration::from_secs(1);
/// How long after an unban the node lifts the address again if fail2ban
/// re-banned it from a line of ours it read late (it polls shared.log about
/// once a second; a ban lifted right after it arrived would otherwise come
/// back: an allow-list entry added just after a burst of bans, say). 30 s
/// covers a burst fail2ban works through at ~5 ms a ban (thousands of
/// lines); a re-lift is one socket call a second per address.
pub const RELIFT_FOR: Duration = Duration::from_secs(30);
/// How often the position is saved while no events come.
const POSITION_TICK: Duration = Duration::from_secs(1);
/// How long the apply task waits at start for the ignore list's first read
/// (~1 ms when fail2ban is up), so the first bans can take the fast path.
const FIRST_IGNORE_READ: Duration = Duration::from_secs(2);

/// How this host applies events.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// Log file of fail2ban's `shared` jail that ban lines are appended to.
    pub shared_log: PathBuf,
    /// fail2ban's control socket; `None` for the log path only.
    pub fail2ban_socket: Option<PathBuf>,
    /// Share of an existing ban's time left above which an incoming ban is
    /// status 2 (already banned recently).
    pub recent_ratio: f64,
    /// State directory: the position, deferred bans and status journal live here.
    pub data_dir: PathBuf,
    /// Also ban fresh bans at once through the socket (the fast path).
    pub fast_path: bool,
    /// This host's name (from its certificate): events it reported come
    /// back from the hub with the fleet's end, and are applied as its own.
    pub own_name: String,
}

/// The jail banmesh bans into.
pub const SHARED_JAIL: &str = "shared";

/// Owns everything about applying: the log, the fail2ban connection, the
/// deferred bans. One task owns it ([`run`]).
pub struct Applier {
    config: ApplyConfig,
    log: SharedLog,
    /// Whether the last ban through the socket worked (the node's status).
    pub fast_path_up: Arc<std::sync::atomic::AtomicBool>,
    /// The fast path's state last logged (`None` before its first try).
    fast_path_said: Option<bool>,
    bantime: Option<(i64, Instant)>,
    journal: Arc<StatusJournal>,
    fail2ban: Option<Fail2ban>,
    fail2ban_up: Option<bool>,
    /// Addresses whose line the node wrote lately, and when.
    recent: recent::Recent,
    deferred: Deferred,
    ignore: IgnoreWatch,
    allow: LocalAllowList,
    /// Recently unbanned IPs whose line fail2ban may read late, until when.
    relift: HashMap<AddrKey, Instant>,
    /// When each fleet ban held in the shared jail is lifted.
    lifts: Lifts,
    /// When the last run of bans passed each step (the benchmark's hops).
    stamps: Stamps,
}

/// When the last run of bans passed each step of applying: the
/// benchmark's per-hop times (three clock readings a batch, not a ban).
#[derive(Debug, Clone, Copy)]
pub struct Stamps {
    /// Decided, lifts scheduled and fail2ban's socket answered.
    pub socket: Instant,
    /// Statuses journaled (fsynced).
    pub journaled: Instant,
    /// Lines written to `shared.log`.
    pub written: Instant,
}

impl Stamps {
    fn at(now: Instant) -> Stamps {
        Stamps {
            socket: now,
            journaled: now,
            written: now,
        }
    }
}

/// What the observer is told about a batch applied: its ban IPs and when
/// it passed each step on this node.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The IPs of the batch's bans.
    pub ips: Vec<String>,
    /// The apply task took the batch from the subscriber.
    pub received: Instant,
    /// Its steps (the last run of bans in it).
    pub stamps: Stamps,
    /// Done: the position moved past it.
    pub at: Instant,
}

impl Applier {
    /// An applier with `config`, journaling every status it decides in
    /// `journal`, checking bans against the shared jail's ignore list as
    /// `ignore` sees it.
    pub fn new(config: ApplyConfig, journal: Arc<StatusJournal>, ignore: IgnoreWatch) -> Self {
        Applier {
            log: SharedLog::new(config.shared_log.clone()),
            fast_path_up: Arc::default(),
            fast_path_said: None,
            bantime: None,
            journal,
            fail2ban: config.fail2ban_socket.as_deref().map(Fail2ban::new),
            fail2ban_up: None,
            recent: recent::Recent::new(),
            deferred: Deferred::load(config.data_dir.join("deferred")),
            ignore,
            allow: LocalAllowList::load(&config.data_dir).unwrap_or_else(|e| {
                // `node::run` refuses to start on this; other callers
                // (tests, bench) get the built-ins alone.
                tracing::error!(error = %e, "allow-list not loaded");
                LocalAllowList::empty(&config.data_dir)
            }),
            relift: HashMap::new(),
            lifts: Lifts::load(config.data_dir.join("lifts")),
            stamps: Stamps::at(Instant::now()),
            config,
        }
    }

    /// Applies events in order; returns the statuses to report.
    pub async fn apply(&mut self, events: &[Event]) -> Vec<(u64, Status)> {
        let mut out = Vec::with_capacity(events.len());
        let mut i = 0;
        while i < events.len() {
            if events[i].kind == EventKind::Unban {
                out.push(self.unban(&events[i]).await);
                i += 1;
                continue;
            }
            if events[i].kind.is_allow() {
                self.allow.apply(&events[i]);
                i += 1;
                continue;
            }
            let run = events[i..]
                .iter()
                .take_while(|e| e.kind == EventKind::Ban)
                .count();
            out.extend(self.bans(&events[i..i + run]).await);
            i += run;
        }
        // Before the caller moves the position past these events.
        self.allow.save();
        out
    }

    /// Deferred bans whose older ban has ended, applied now.
    pub async fn apply_due(&mut self) -> Vec<(u64, Status)> {
        let now = SystemTime::now();
        let due = self.deferred.due(now);
        if due.is_empty() {
            return vec![];
        }
        info!(count = due.len(), "applying deferred bans");
        let statuses = self.bans(&due).await;
        // Off the file only now that they are journaled and written (or
        // deferred again with a later time, which `done` keeps).
        self.deferred.done(&due, now);
        statuses
    }

    /// Applies a run of bans: decides each ([`decide`]), schedules the
    /// lifts of those with a fleet end, then bans the fresh ones through
    /// the socket, journals, and writes the lines.
    async fn bans(&mut self, events: &[Event]) -> Vec<(u64, Status)> {
        let now = Instant::now();
        self.recent.sweep(now);
        let held = self.held(events).await;
        let bantime = self.shared_bantime().await;
        let wall = SystemTime::now();
        let ignore = self.ignore.current();
        let mut statuses = Vec::with_capacity(events.len());
        let mut write: Vec<&Event> = Vec::new();
        let mut write_keys: Vec<AddrKey> = Vec::new();
        let mut fresh: Vec<&str> = Vec::new();
        let mut written_now = HashSet::new();
        // Lifts to schedule, and those scheduled earlier in this batch.
        let mut lifts: Vec<(AddrKey, i64, u64)> = Vec::new();
        let mut scheduled_now: HashMap<&str, i64> = HashMap::new();
        let mut extended: Vec<(u64, Status)> = Vec::new();
        for e in events {
            let ip = e.ban.ip.as_str();
            let Some(key) = AddrKey::parse(ip) else {
                // Never from the hub (it checks every address it takes).
                warn!(
                    id = e.id,
                    ip, "ban of something that is not an address; not applied"
                );
                statuses.push((e.id, Status::Error));
                continue;
            };
            if let Some(why) = self.allow.refuses(ip) {
                info!(id = e.id, ip, allowed_by = %why, "ban refused: the address is on the allow-list");
                statuses.push((e.id, Status::Refused));
                continue;
            }
            let verdict = ignore.check(ip);
            let reporter = if e.added_by == self.config.own_name {
                Reporter::Own {
                    can_hold: self.fail2ban.is_some(),
                }
            } else {
                Reporter::Other
            };
            let scheduled = scheduled_now
                .get(ip)
                .copied()
                .into_iter()
                .chain(self.lifts.get(key).map(|l| l.ends_ms))
                .max();
            let facts = Facts {
                ignore: verdict,
                held: held.get(ip).map_or(&[], Vec::as_slice),
                just_added: self.recent.holds(key, now) || written_now.contains(ip),
                bantime,
                scheduled,
                reporter,
            };
            let fleet_end = e.term.ends_ms;
            match decide(e, &facts, wall, self.config.recent_ratio) {
                Decision::Ignored => {
                    let by = match verdict {
                        Verdict::Ignored(by) => by,
                        _ => "",
                    };
                    info!(
                        id = e.id,
                        ip, by, "ban refused: the shared jail's ignore list covers it (status 4)"
                    );
                    statuses.push((e.id, Status::Refused));
                }
                Decision::AlreadyBanned => {
                    // A new fleet ban of it: the address is banned again
                    // on the fleet's account, so it is no longer lifted.
                    self.relift.remove(&key);
                    statuses.push((e.id, Status::AlreadyBanned));
                }
                Decision::Own => {
                    info!(
                        id = e.id,
                        ip, "own report: left to this host's own jail (status 1)"
                    );
                    statuses.push((e.id, Status::Added));
                }
                Decision::Extend => {
                    self.relift.remove(&key);
                    info!(
                        id = e.id,
                        ip,
                        ends_ms = fleet_end,
                        "held here already: its lift moves to the fleet's new end"
                    );
                    // Held by fail2ban's own end alone (no lift of ours
                    // ahead: a ban from before the ladder): banned again
                    // through the socket, which moves fail2ban's end to
                    // now + the jail's bantime (it prolongs a held ban).
                    let wall_ms = crate::clock::now_ms();
                    if scheduled.is_none_or(|s| s <= wall_ms) {
                        fresh.push(ip);
                    }
                    lifts.push((key, fleet_end, e.id));
                    let at = scheduled_now.entry(ip).or_default();
                    *at = (*at).max(fleet_end);
                    extended.push((e.id, Status::Added));
                }
                Decision::Defer { at } => {
                    self.relift.remove(&key);
                    info!(
                        id = e.id,
                        ip, "ban held with little time left; applying it when that ban ends"
                    );
                    self.deferred.push(e.clone(), at);
                }
                Decision::Expired => {
                    // A later ban of this IP in the same batch then counts
                    // as just added (status 2), as it always has; deciding
                    // it on its own would apply a live ban that follows an
                    // expired one.
                    written_now.insert(ip);
                    info!(
                        id = e.id,
                        ip, "ban already over by its own time; not applied"
                    );
                }
                Decision::Add { fast_path } => {
                    // A new ban of it: no longer lifted again.
                    self.relift.remove(&key);
                    written_now.insert(ip);
                    if fleet_end > 0 {
                        lifts.push((key, fleet_end, e.id));
                        let at = scheduled_now.entry(ip).or_default();
                        *at = (*at).max(fleet_end);
                    } else {
                        // Held for the shared jail's bantime now, as before the ladder.
                        self.lifts.cancel(key);
                    }
                    if fast_path {
                        fresh.push(ip);
                    }
                    write.push(e);
                    write_keys.push(key);
                }
            }
        }
        // Saved before fail2ban bans anything it must lift: a crash after
        // the ban still lifts it on time (fsynced once the batch is done).
        // Without a control socket nothing could be lifted: fail2ban's
        // bantime ends these bans, and no schedule is kept.
        let schedule = !lifts.is_empty() && self.fail2ban.is_some();
        if schedule && !self.lifts.schedule(&lifts) {
            warn!(
                count = lifts.len(),
                "lift schedule not saved; these bans are lifted on time unless the node restarts first"
            );
        }
        statuses.extend(extended);
        let confirmed = self.ban_now(&fresh).await;
        self.stamps = Stamps::at(Instant::now());
        if !write.is_empty() {
            // Journaled before the write: a crash between the two re-applies
            // the events (the position has not moved) and journals again.
            let added: Vec<(u64, Status)> = write.iter().map(|e| (e.id, Status::Added)).collect();
            // One write for both (the order kept: a later line wins).
            self.journal(&[statuses.as_slice(), &added].concat());
            self.stamps.journaled = Instant::now();
            match self.log.append(&write) {
                Ok(()) => {
                    self.recent.wrote(write_keys.iter().copied(), now);
                    statuses.extend(added);
                }
                Err(err) => {
                    tracing::error!(path = %self.log.path().display(), error = %err, "cannot write shared.log");
                    crate::metrics::node::get().shared_log_errors.inc();
                    // Banned through the socket, the IP is banned all the same.
                    let st = |e: &&Event| {
                        if confirmed.contains(e.ban.ip.as_str()) {
                            Status::Added
                        } else {
                            Status::Error
                        }
                    };
                    let after: Vec<(u64, Status)> = write.iter().map(|e| (e.id, st(e))).collect();
                    self.journal(&after);
                    statuses.extend(after);
                }
            }
        } else {
            self.journal(&statuses);
            self.stamps.journaled = Instant::now();
        }
        self.stamps.written = Instant::now();
        if schedule {
            self.lifts.sync();
        }
        statuses.sort_by_key(|(id, _)| *id);
        statuses
    }

    fn journal(&self, statuses: &[(u64, Status)]) {
        if let Err(e) = self.journal.append(statuses) {
            tracing::error!(error = %e, "cannot journal statuses; the hub will show them as 0");
        }
    }
}

/// Told the IPs of every batch of bans applied, and when it passed each
/// step: how the benchmark sees a ban arrive without polling files.
pub type Observer = mpsc::UnboundedSender<Observed>;

/// The apply task: takes batches from the subscriber, applies them in
/// order (journaling their statuses) and moves the position.
pub async fn run(
    mut applier: Applier,
    mut batches: mpsc::Receiver<Vec<Event>>,
    position: Arc<Position>,
    observer: Option<Observer>,
    mut shutdown: Shutdown,
) {
    applier.ignore.first_read(FIRST_IGNORE_READ).await;
    let mut tick = tokio::time::interval(DEFERRED_TICK);
    let mut save = tokio::time::interval(POSITION_TICK);
    loop {
        // Woken at the next fleet end, to lift it on time (the tick below
        // retries and watches ended ones for a second).
        let next_lift = applier.lifts.next_end(crate::clock::now_ms()).map(|end| {
            let wait = (end - crate::clock::now_ms()).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        tokio::select! {
            _ = tokio::time::sleep_until(next_lift.unwrap_or_else(tokio::time::Instant::now)), if next_lift.is_some() => {
                applier.lift_due().await;
            }
            batch = batches.recv() => {
                let Some(batch) = batch else { break };
                let received = Instant::now();
                let batch: Vec<Event> = batch.into_iter().filter(|e| e.id > position.get()).collect();
                let Some(last) = batch.last().map(|e| e.id) else { continue };
                // Bans whose lines a crash left ahead of the position file.
                let batch: Vec<Event> = batch.into_iter().filter(|e| !position.written(e)).collect();
                if !batch.is_empty() {
                    let statuses = applier.apply(&batch).await;
                    crate::metrics::node::applied_batch(&batch, &statuses);
                }
                // An allow-list change not yet on disk keeps the position
                // before it, so a restart replays it (save is retried with
                // every batch); lines already written are recognised then.
                if !applier.allow.is_saved() {
                    warn!(last, "the allow-list is not saved; the position stays put until it is");
                } else if let Err(e) = position.set(last) {
                    warn!(error = %e, "cannot save the applied position");
                }
                if let Some(o) = &observer {
                    let ips = batch.iter().filter(|e| e.kind == EventKind::Ban).map(|e| e.ban.ip.clone()).collect();
                    let _ = o.send(Observed { ips, received, stamps: applier.stamps, at: Instant::now() });
                }
            }
            _ = tick.tick(), if !applier.deferred.is_empty() || !applier.relift.is_empty() || !applier.lifts.is_empty() => {
                applier.apply_due().await;
                applier.relift_due().await;
                applier.lift_due().await;
            }
            // A quiet spell must not leave the position file behind.
            _ = save.tick() => {
                crate::systemd::beat();
                applier.recent.sweep(Instant::now());
                if let Err(e) = position.flush() {
                    warn!(error = %e, "cannot save the applied position");
                }
            }
            _ = shutdown.recv() => break,
        }
    }
    if let Err(e) = position.flush() {
        warn!(error = %e, "cannot save the applied position");
    }
    if let Some(f2b) = applier.fail2ban.as_mut() {
        f2b.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ban::Ban, node::shared_log::written_tail};

    #[tokio::test]
    async fn lines_carry_ids_and_resume_finds_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("shared.log");
        assert!(written_tail(&log, 0).unwrap().is_empty());
        let journal = Arc::new(StatusJournal::open(dir.path()).unwrap());
        let mut a = Applier::new(
            ApplyConfig {
                shared_log: log.clone(),
                fail2ban_socket: None,
                recent_ratio: DEFAULT_RECENT_RATIO,
                data_dir: dir.path().to_path_buf(),
                fast_path: true,
                own_name: "db-1".into(),
            },
            journal.clone(),
            crate::node::ignore::channel().1,
        );
        let ev = |id, ip: &str| Event {
            id,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            added_by: "web-1".into(),
            created_ms: crate::clock::now_ms(),
            lifts: 0,
            term: Default::default(),
        };
        let st = a
            .apply(&[
                ev(7, "192.0.2.9"),
                ev(12, "192.0.2.10"),
                ev(13, "192.0.2.9"),
            ])
            .await;
        assert_eq!(
            st,
            vec![
                (7, Status::Added),
                (12, Status::Added),
                (13, Status::AlreadyBanned)
            ]
        );
        assert_eq!(
            journal.unsent().unwrap().0.len(),
            3,
            "every status journaled"
        );
        assert_eq!(
            written_tail(&log, 0).unwrap(),
            HashMap::from([(7, "192.0.2.9".into()), (12, "192.0.2.10".into())])
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("banmesh[7]: 192.0.2.9: reported by web-1 (jail sshd, tcp/22)\n"));
        assert_eq!(text.lines().count(), 2);
    }

    #[tokio::test]
    async fn fleet_ends_without_a_socket_use_the_log_and_leave_own_bans_alone() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("shared.log");
        let journal = Arc::new(StatusJournal::open(dir.path()).unwrap());
        let mut a = Applier::new(
            ApplyConfig {
                shared_log: log.clone(),
                fail2ban_socket: None,
                recent_ratio: DEFAULT_RECENT_RATIO,
                data_dir: dir.path().to_path_buf(),
                fast_path: true,
                own_name: "db-1".into(),
            },
            journal,
            crate::node::ignore::channel().1,
        );
        let now = crate::clock::now_ms();
        let ev = |id, ip: &str, by: &str, ends_ms| Event {
            id,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            added_by: by.into(),
            created_ms: now - 1_000,
            lifts: 0,
            term: crate::ban::BanTerm {
                ends_ms,
                rung: 1,
                ..Default::default()
            },
        };
        let st = a
            .apply(&[
                ev(1, "192.0.2.1", "web-1", now + 60_000),
                ev(2, "192.0.2.2", "db-1", now + 60_000),
                ev(3, "192.0.2.3", "web-1", now - 1),
            ])
            .await;
        // Another host's ban: a line; this host's own: status 1, no line
        // (its own jail holds it: no lift could end a hold here); over: nothing.
        assert_eq!(st, vec![(1, Status::Added), (2, Status::Added)]);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("banmesh[1]: 192.0.2.1"));
        assert!(a.lifts.is_empty(), "nothing to lift without a socket");
    }
}
