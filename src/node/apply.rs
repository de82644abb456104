//! Applying the hub's events on this host: what `readdb.py` did, with its
//! rules, through fail2ban's control socket instead of subprocesses.
//!
//! For each incoming ban (the seed's rules):
//! - fail2ban already bans the IP (in any jail) with more than
//!   `recent_ratio` (default 40%) of that ban's time left: status 2, no line;
//! - it bans it with less left: no status (0), and the ban is applied again
//!   when the existing one ends ([`super::deferred`]);
//! - otherwise one line is appended to `shared.log`: status 1; a failure to
//!   write is status 3.
//!
//! The same IP arriving again while fail2ban has not yet read our line
//! (two hosts reported it) is status 2 too: it was just added.
//!
//! For an unban, the IP is lifted in every jail through the socket: status
//! 1 if a ban was lifted, 2 if none was held here, 3 on failure.
//!
//! Without a reachable control socket the node still writes lines (the log
//! path alone works) and says so in its log; unbans then fail with 3.
//!
//! Lines look like this (the `banmesh[ID]` tag carries the event id, so the
//! log records how far the node got; see [`last_logged_id`]):
//!
//! ```text
//! 2026-11-25 12:26:09 +0000 banmesh[42]: 192.0.2.7: reported by web-1 (jail sshd, tcp/22)
//! ```
use std::{
    collections::{HashMap, HashSet},
    fs::OpenOptions,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{deferred::Deferred, statuses::StatusJournal, subscriber::Position};
use crate::{
    ban::{Event, EventKind, Status},
    fail2ban::{BanTime, Fail2ban, Fail2banError},
    shutdown::Shutdown,
};

const STAMP: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second] +0000");
/// How much of the log's end is read to find the last applied id.
const TAIL: u64 = 64 * 1024;
/// How long an IP we wrote counts as "just added" for a repeat.
const RECENT: Duration = Duration::from_secs(120);
/// Default share of a ban's time left above which a new ban is status 2.
pub const DEFAULT_RECENT_RATIO: f64 = 0.4;
/// How often deferred bans are checked.
const DEFERRED_TICK: Duration = Duration::from_secs(1);

/// The line written for a ban.
pub fn line(event: &Event, now: OffsetDateTime) -> String {
    let b = &event.ban;
    format!(
        "{} banmesh[{}]: {}: reported by {} (jail {}, {}/{})\n",
        now.format(STAMP).unwrap_or_default(),
        event.id,
        b.ip,
        event.added_by,
        b.jail,
        b.protocol,
        b.port
    )
}

/// The highest event id in the last lines of a shared log (0 if none).
pub fn last_logged_id(path: &Path) -> std::io::Result<u64> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail)
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(" banmesh[")? + 9..];
            rest[..rest.find(']')?].parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0))
}

/// How this host applies events.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub shared_log: PathBuf,
    /// fail2ban's control socket; `None` for the log path only.
    pub fail2ban_socket: Option<PathBuf>,
    pub recent_ratio: f64,
    pub data_dir: PathBuf,
    /// Also ban fresh bans at once through the socket (the fast path).
    pub fast_path: bool,
}

/// The jail banmesh bans into.
pub const SHARED_JAIL: &str = "shared";
/// A ban younger than this share of the jail's bantime goes through the
/// socket too; an older one (replayed after an outage) only through the
/// log, whose line carries the ban's own time so that fail2ban ends it
/// when it would have ended anyway.
const FRESH: f64 = 0.1;
/// IPs per `banip` request. fail2ban 1.0.2 runs one `ipset add` process
/// per IP (~5 ms each, measured: 2,000 IPs in 10 s whatever the chunk), so
/// bigger chunks save nothing; at 20 per request other clients of the
/// socket wait ~60 ms (median) instead of ~400 ms at 100.
const BANIP_CHUNK: usize = 20;
/// How long the shared jail's bantime is trusted before asking again.
const BANTIME_TTL: Duration = Duration::from_secs(60);

/// What fail2ban says about an IP.
enum Held {
    No,
    /// Banned, with this much of its time left; ends at `end`.
    Yes {
        fraction_left: f64,
        end: SystemTime,
    },
}

/// Owns everything about applying: the log, the fail2ban connection, the
/// deferred bans. One task owns it ([`run`]).
pub struct Applier {
    config: ApplyConfig,
    log: SharedLog,
    /// Whether the last ban through the socket worked (the node's status).
    pub fast_path_up: Arc<std::sync::atomic::AtomicBool>,
    bantime: Option<(i64, Instant)>,
    journal: Arc<StatusJournal>,
    fail2ban: Option<Fail2ban>,
    fail2ban_up: Option<bool>,
    recent: HashMap<String, Instant>,
    deferred: Deferred,
}

impl Applier {
    pub fn new(config: ApplyConfig, journal: Arc<StatusJournal>) -> Self {
        Applier {
            log: SharedLog::new(config.shared_log.clone()),
            fast_path_up: Arc::default(),
            bantime: None,
            journal,
            fail2ban: config.fail2ban_socket.as_deref().map(Fail2ban::new),
            fail2ban_up: None,
            recent: HashMap::new(),
            deferred: Deferred::load(config.data_dir.join("deferred")),
            config,
        }
    }

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
            let run = events[i..]
                .iter()
                .take_while(|e| e.kind == EventKind::Ban)
                .count();
            out.extend(self.bans(&events[i..i + run]).await);
            i += run;
        }
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

    async fn bans(&mut self, events: &[Event]) -> Vec<(u64, Status)> {
        let now = Instant::now();
        self.recent.retain(|_, t| now.duration_since(*t) < RECENT);
        let held = self.held(events).await;
        let mut statuses = Vec::with_capacity(events.len());
        let mut write: Vec<&Event> = Vec::new();
        let mut written_now = HashSet::new();
        for e in events {
            let ip = e.ban.ip.as_str();
            if self.recent.contains_key(ip) || written_now.contains(ip) {
                statuses.push((e.id, Status::AlreadyBanned));
                continue;
            }
            match held.get(ip) {
                Some(Held::Yes { fraction_left, .. })
                    if *fraction_left > self.config.recent_ratio =>
                {
                    statuses.push((e.id, Status::AlreadyBanned));
                }
                Some(Held::Yes { end, .. }) => {
                    info!(
                        id = e.id,
                        ip, "ban held with little time left; applying it when that ban ends"
                    );
                    self.deferred.push(e.clone(), *end + Duration::from_secs(1));
                }
                _ => {
                    written_now.insert(ip);
                    write.push(e);
                }
            }
        }
        // A ban whose time is over by now is not applied at all.
        let bantime = self.shared_bantime().await;
        let age = |e: &Event| (crate::clock::now_ms() - e.created_ms).max(0) as f64 / 1000.0;
        if let Some(b) = bantime.filter(|b| *b > 0) {
            write.retain(|e| {
                let live = age(e) < b as f64;
                if !live {
                    info!(id = e.id, ip = %e.ban.ip, "ban already over by its own bantime; not applied");
                }
                live
            });
        }
        if !write.is_empty() {
            let fresh: Vec<&str> = write
                .iter()
                .filter(|e| bantime.is_none_or(|b| b <= 0 || age(e) < FRESH * b as f64))
                .map(|e| e.ban.ip.as_str())
                .collect();
            let confirmed = self.ban_now(&fresh).await;
            // Journaled before the write: a crash between the two re-applies
            // the events (the position has not moved) and journals again.
            let added: Vec<(u64, Status)> = write.iter().map(|e| (e.id, Status::Added)).collect();
            self.journal(&statuses);
            self.journal(&added);
            match self.append(&write) {
                Ok(()) => {
                    for e in &write {
                        self.recent.insert(e.ban.ip.clone(), now);
                    }
                    statuses.extend(added);
                }
                Err(err) => {
                    tracing::error!(path = %self.config.shared_log.display(), error = %err, "cannot write shared.log");
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
        }
        statuses.sort_by_key(|(id, _)| *id);
        statuses
    }

    /// The shared jail's bantime in seconds, asked of fail2ban now and then.
    async fn shared_bantime(&mut self) -> Option<i64> {
        if let Some((b, at)) = self.bantime
            && at.elapsed() < BANTIME_TTL
        {
            return Some(b);
        }
        let b = self.fail2ban.as_mut()?.bantime(SHARED_JAIL).await.ok()?;
        self.bantime = Some((b, Instant::now()));
        Some(b)
    }

    /// The fast path: bans IPs in the shared jail through the socket, a
    /// chunk per request; returns those fail2ban confirmed.
    async fn ban_now<'a>(&mut self, ips: &[&'a str]) -> HashSet<&'a str> {
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
        if self
            .fast_path_up
            .swap(up, std::sync::atomic::Ordering::Relaxed)
            != up
            || !up
        {
            match &result {
                Ok(()) => {
                    info!("fast path up: bans go to fail2ban's socket at once, and to shared.log")
                }
                Err(e) => warn!(error = %e, "fast path down: bans go through shared.log only"),
            }
        }
        confirmed
    }

    fn journal(&self, statuses: &[(u64, Status)]) {
        if let Err(e) = self.journal.append(statuses) {
            tracing::error!(error = %e, "cannot journal statuses; the hub will show them as 0");
        }
    }

    /// Asks fail2ban which of these IPs it bans, and for how long yet.
    async fn held(&mut self, events: &[Event]) -> HashMap<String, Held> {
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
        let now = SystemTime::now();
        for (ip, jails) in ips.iter().zip(jails) {
            let mut best: Option<(f64, SystemTime)> = None;
            for jail in jails {
                if !times.contains_key(&jail) {
                    let t = f2b.jail_bans(&jail).await.unwrap_or_default();
                    times.insert(jail.clone(), t);
                }
                // Banned but with no time listed: treat as fully fresh.
                let (fraction, end) = times[&jail]
                    .get(*ip)
                    .map_or((1.0, now), |t| (t.fraction_left(now), t.end));
                if best.is_none_or(|(f, _)| fraction > f) {
                    best = Some((fraction, end));
                }
            }
            held.insert(
                ip.to_string(),
                best.map_or(Held::No, |(fraction_left, end)| Held::Yes {
                    fraction_left,
                    end,
                }),
            );
        }
        self.note_fail2ban(Ok(()));
        held
    }

    async fn unban(&mut self, event: &Event) -> (u64, Status) {
        let ip = event.ban.ip.as_str();
        self.deferred.cancel(ip);
        self.recent.remove(ip);
        let Some(f2b) = self.fail2ban.as_mut() else {
            warn!(ip, "unban received but no fail2ban socket is configured");
            self.journal(&[(event.id, Status::Error)]);
            return (event.id, Status::Error);
        };
        let result = f2b.unban(ip).await;
        let status = match &result {
            Ok(0) => Status::AlreadyBanned,
            Ok(_) => Status::Added,
            Err(e) => {
                warn!(ip, error = %e, "cannot lift ban");
                Status::Error
            }
        };
        info!(ip, id = event.id, ?status, "unban applied");
        let r = result.as_ref().map(|_| ());
        self.note_fail2ban(r);
        self.journal(&[(event.id, status)]);
        (event.id, status)
    }

    /// Lines carry the ban's own time (from the hub), so fail2ban's ban
    /// from the line ends when the original ban would have.
    fn append(&mut self, events: &[&Event]) -> std::io::Result<()> {
        let text: String = events
            .iter()
            .map(|e| {
                let at =
                    OffsetDateTime::from_unix_timestamp_nanos(e.created_ms as i128 * 1_000_000)
                        .unwrap_or_else(|_| OffsetDateTime::now_utc());
                line(e, at)
            })
            .collect();
        self.log.append(text.as_bytes())
    }
}

/// `shared.log`, kept open between batches. Reopened when the path stops
/// naming the open file (logrotate moved it) and after any write error.
struct SharedLog {
    path: PathBuf,
    file: Option<(std::fs::File, u64)>,
    checked: Instant,
}

impl SharedLog {
    fn new(path: PathBuf) -> Self {
        SharedLog {
            path,
            file: None,
            checked: Instant::now(),
        }
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = Instant::now();
            let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
            if current != self.file.as_ref().map(|(_, ino)| *ino) {
                self.file = None;
            }
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let ino = f.metadata()?.ino();
            self.file = Some((f, ino));
        }
        let result = self
            .file
            .as_mut()
            .map_or(Ok(()), |(f, _)| f.write_all(bytes));
        if result.is_err() {
            self.file = None;
        }
        result
    }
}

/// Told the IPs of every batch of bans applied, and when: how the demo
/// and the benchmark see a ban arrive without polling files.
pub type Observer = mpsc::UnboundedSender<(Vec<String>, Instant)>;

/// The apply task: takes batches from the subscriber, applies them in
/// order (journaling their statuses) and moves the position.
pub async fn run(
    mut applier: Applier,
    mut batches: mpsc::Receiver<Vec<Event>>,
    position: Arc<Position>,
    observer: Option<Observer>,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(DEFERRED_TICK);
    let mut save = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            batch = batches.recv() => {
                let Some(batch) = batch else { break };
                let batch: Vec<Event> = batch.into_iter().filter(|e| e.id > position.get()).collect();
                let Some(last) = batch.last().map(|e| e.id) else { continue };
                applier.apply(&batch).await;
                if let Err(e) = position.set(last) {
                    warn!(error = %e, "cannot save the applied position");
                }
                if let Some(o) = &observer {
                    let ips = batch.iter().filter(|e| e.kind == EventKind::Ban).map(|e| e.ban.ip.clone()).collect();
                    let _ = o.send((ips, Instant::now()));
                }
            }
            _ = tick.tick(), if !applier.deferred.is_empty() => {
                applier.apply_due().await;
            }
            // A quiet spell must not leave the position file behind.
            _ = save.tick() => {
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
    use crate::ban::Ban;

    #[tokio::test]
    async fn lines_carry_ids_and_resume_finds_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("shared.log");
        assert_eq!(last_logged_id(&log).unwrap(), 0);
        let journal = Arc::new(StatusJournal::open(dir.path()).unwrap());
        let mut a = Applier::new(
            ApplyConfig {
                shared_log: log.clone(),
                fail2ban_socket: None,
                recent_ratio: DEFAULT_RECENT_RATIO,
                data_dir: dir.path().to_path_buf(),
                fast_path: true,
            },
            journal.clone(),
        );
        let ev = |id, ip: &str| Event {
            id,
            kind: EventKind::Ban,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            added_by: "web-1".into(),
            created_ms: crate::clock::now_ms(),
            lifts: 0,
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
        assert_eq!(last_logged_id(&log).unwrap(), 12);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("banmesh[7]: 192.0.2.9: reported by web-1 (jail sshd, tcp/22)\n"));
        assert_eq!(text.lines().count(), 2);
    }
}
