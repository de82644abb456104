//! The lift schedule: when this host lifts each fleet ban it holds in the
//! `shared` jail, because fail2ban cannot be told a ban's own end.
//!
//! Why the node lifts bans itself (fail2ban 1.0.2, read in its source):
//! `set <jail> banip IP...` makes a `BanTicket(ip, now)` with no ban time
//! of its own (`server/actions.py`, `addBannedIP`), so the jail's
//! `bantime` applies; a `failregex` line carries a time and an address
//! (and `F-ID`/`F-PORT`-style tags) but no ban time (`server/failregex.py`);
//! a ticket gets a time of its own only from `bantime.increment`, computed
//! from fail2ban's own history of the address (`server/observer.py`),
//! which banmesh cannot steer per ban. So the `shared` jail's `bantime` is
//! set to the ladder's top (`setup-fail2ban --bantime`), fail2ban never
//! lifts a fleet ban early, and this schedule lifts it at the fleet's end
//! with `set shared unbanip`.
//!
//! Contract:
//! - One entry per address: the latest fleet end this host holds it to,
//!   and the event that set it. A later end replaces an earlier one, never
//!   the other way round, so a lift never ends a ban a later fleet event
//!   still holds. An unban (or a ban without a fleet end) removes the
//!   entry.
//! - Saved in `DIR/lifts` (an append-only log of tab-separated records,
//!   compacted by atomic replace; through [`super::state_file`]: 0600, no
//!   symbolic links) before the ban it ends is banned or written to
//!   `shared.log`: after a crash or
//!   restart the node still lifts it, at once if its end passed meanwhile.
//!   It is fsynced ([`Lifts::sync`]) once the batch is banned and written,
//!   not before: an fsync costs ~8 ms on the test machine (median, p90 14
//!   ms), more than half the fast path's ~14 ms, so only a power loss in
//!   those milliseconds could lose a lift (and the ban then lasts the
//!   `shared` jail's bantime). The file stays open between batches (an
//!   append and its fsync are a `write` and an `fsync`, no open or close),
//!   and the directory is fsynced only when the file is new to it (created,
//!   or renamed over by a rewrite) since it was last.
//! - An entry stays until fail2ban confirms the address is out of the
//!   `shared` jail, and for [`LINGER`] after its end: fail2ban reads
//!   `shared.log` late (up to ~1 s) and a line read after the lift would
//!   ban the address again for the ladder's top. Only the `shared` jail is
//!   lifted: the host's own jails keep their own bans.
//! - Held in memory in an [`AddrMap`] (an IPv4 address in 4 bytes, no heap
//!   per address) of [`Lift`]s packed to 4-byte alignment: with 100,000
//!   active IPv4 bans a slot is 21 bytes and the schedule ~2.7 MB (a
//!   `HashMap<AddrKey, Lift>` took 33 and ~4.3 MB; keyed by `String`, ~9). Asking when the
//!   next end comes ([`Lifts::next_end`], every turn of the apply task's
//!   loop) and which ends came ([`Lifts::due`], every tick) does not scan
//!   every entry each time: a lower bound of the ends kept up on every
//!   change says when a scan can find something.
pub mod addr_key;
pub mod addr_map;

use std::{cell::Cell, path::PathBuf, time::Duration};

pub use self::{addr_key::AddrKey, addr_map::AddrMap};

/// How long after a ban's end the node keeps checking that the `shared`
/// jail does not hold it again (from a line fail2ban read late). fail2ban
/// reads a line within ~1 s (FAIL2BAN.md); 30 s covers a burst it works
/// through at ~5 ms a ban, as [`super::apply::RELIFT_FOR`] does.
pub const LINGER: Duration = Duration::from_secs(30);

/// One address's scheduled lift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lift {
    /// The fleet's end for the address, Unix ms.
    pub ends_ms: i64,
    /// The event that set this end (a ban, or an update extending one).
    pub event: u64,
}

/// A [`Lift`] as it is held: four `u32`s, so that beside a 4-byte IPv4 key
/// a slot is 20 bytes, not the 24 an 8-byte alignment rounds it up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed([u32; 4]);

impl From<Lift> for Packed {
    fn from(l: Lift) -> Self {
        let (e, v) = (l.ends_ms as u64, l.event);
        Packed([e as u32, (e >> 32) as u32, v as u32, (v >> 32) as u32])
    }
}

impl From<Packed> for Lift {
    fn from(Packed(p): Packed) -> Self {
        let wide = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        Lift {
            ends_ms: wide(p[0], p[1]) as i64,
            event: wide(p[2], p[3]),
        }
    }
}

/// The schedule, mirrored to `DIR/lifts`: an append-only log of changes
/// (`IP\tENDS_MS\tEVENT` sets an entry, `IP\t-` removes it; the last
/// record of an address wins), rewritten whole when it holds many more
/// records than entries. Appending keeps a batch's cost to its own lines
/// however many bans are active (tens of thousands at the ladder's top).
pub struct Lifts {
    path: PathBuf,
    items: AddrMap<Packed>,
    /// Records in the file (sets and removals), for compaction.
    records: usize,
    /// The file, open to append since its last rewrite (`None`: reopened
    /// at the next append).
    file: Option<std::fs::File>,
    /// Whether the directory may not yet durably name the file (it was
    /// opened anew, perhaps created, or renamed over since the last sync).
    dir_unsynced: bool,
    /// Whether records were appended since the last sync: a batch that
    /// changed nothing (every lift already held as late) costs no fsync.
    unsynced: bool,
    /// At most the earliest end of all entries (`i64::MAX`: none): no
    /// entry is due before it. Lowered on every set, made exact by a scan.
    earliest: Cell<i64>,
    /// At most the earliest end after the last scan's time, which it
    /// exceeds (`i64::MAX`: none then); lowered on every set. Removals
    /// only leave it early: the task wakes once for nothing and scans.
    next: Cell<i64>,
}

/// The file is rewritten once it holds this many more records than twice
/// its entries.
const COMPACT_SLACK: usize = 1024;

/// One record: a set (`Some`) or a removal (`None`) of an address's entry.
fn parse(line: &str) -> Option<(AddrKey, Option<Lift>)> {
    let mut f = line.split('\t');
    let ip = AddrKey::parse(f.next()?)?;
    let record = match (f.next()?, f.next(), f.next()) {
        ("-", None, None) => None,
        (ends, Some(event), None) => Some(Lift {
            ends_ms: ends.parse().ok()?,
            event: event.parse().ok()?,
        }),
        _ => return None,
    };
    Some((ip, record))
}

fn record(text: &mut String, ip: AddrKey, lift: Option<&Lift>) {
    use std::fmt::Write;
    let _ = match lift {
        Some(l) => writeln!(text, "{ip}\t{}\t{}", l.ends_ms, l.event),
        None => writeln!(text, "{ip}\t-"),
    };
}

impl Lifts {
    /// Reads the file at `path`; a missing file or an unreadable line is no
    /// entry (logged). A file with an unreadable or torn line is rewritten
    /// whole, so later appends start on a line of their own.
    pub fn load(path: PathBuf) -> Self {
        let bytes = super::state_file::read(&path).unwrap_or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "cannot read the lift schedule");
            None
        });
        let bytes = bytes.unwrap_or_default();
        let mut items = AddrMap::new();
        let mut records = 0;
        let mut damaged = !bytes.is_empty() && !bytes.ends_with(b"\n");
        for line in String::from_utf8_lossy(&bytes).lines() {
            match parse(line) {
                Some((ip, Some(lift))) => {
                    items.insert(ip, lift.into());
                }
                Some((ip, None)) => {
                    items.remove(&ip);
                }
                None => {
                    damaged = true;
                    tracing::warn!(path = %path.display(), line, "unreadable lift record skipped");
                    continue;
                }
            }
            records += 1;
        }
        items.shrink_to_fit();
        let mut lifts = Lifts {
            path,
            items,
            records,
            file: None,
            dir_unsynced: true,
            unsynced: false,
            earliest: Cell::new(i64::MIN),
            next: Cell::new(i64::MIN),
        };
        if damaged {
            lifts.rewrite();
        }
        lifts
    }

    /// How many addresses are scheduled (or lingering after their lift).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The scheduled lift of `ip`, if any.
    pub fn get(&self, ip: AddrKey) -> Option<Lift> {
        self.items.get(&ip).map(|p| Lift::from(*p))
    }

    /// Sets `ip`'s entry in memory, keeping the bounds below every end.
    fn set(&mut self, ip: AddrKey, lift: Lift) {
        self.items.insert(ip, lift.into());
        self.earliest.set(self.earliest.get().min(lift.ends_ms));
        self.next.set(self.next.get().min(lift.ends_ms));
    }

    /// Schedules lifts (ip, end, event); an entry with a later end than
    /// the one given is kept. Saves (not yet fsynced: [`Lifts::sync`]) if
    /// anything changed; returns whether the schedule is saved.
    pub fn schedule(&mut self, lifts: &[(AddrKey, i64, u64)]) -> bool {
        let mut text = String::new();
        for &(ip, ends_ms, event) in lifts {
            let new = Lift { ends_ms, event };
            match self.get(ip) {
                Some(old) if old.ends_ms >= ends_ms => continue,
                _ => {
                    self.set(ip, new);
                    record(&mut text, ip, Some(&new));
                }
            }
        }
        text.is_empty() || self.append(&text)
    }

    /// Makes the saved schedule durable: fsyncs the file, and its directory
    /// if the file is new to it since the last sync (created, or a rewrite
    /// renamed it). Nothing to do if neither was written since.
    pub fn sync(&mut self) {
        if !self.unsynced && !self.dir_unsynced {
            return;
        }
        let dir = self.path.parent().unwrap_or(std::path::Path::new("."));
        let file = match &self.file {
            Some(f) => f.sync_all(),
            None => std::fs::File::open(&self.path).and_then(|f| f.sync_all()),
        };
        let synced = file.and_then(|()| {
            self.unsynced = false;
            if self.dir_unsynced {
                std::fs::File::open(dir)?.sync_all()?;
                self.dir_unsynced = false;
            }
            Ok(())
        });
        if let Err(e) = synced {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot fsync the lift schedule; a power loss now could lose lifts");
        }
    }

    /// Forgets `ip`'s lift (an unban lifted it, or a ban without a fleet
    /// end holds it now).
    pub fn cancel(&mut self, ip: AddrKey) {
        if self.items.remove(&ip).is_some() {
            let mut text = String::new();
            record(&mut text, ip, None);
            self.append(&text);
        }
    }

    /// Addresses whose end has come at `now_ms`: to check, and lift if the
    /// `shared` jail holds them.
    pub fn due(&self, now_ms: i64) -> Vec<(AddrKey, Lift)> {
        if now_ms < self.earliest.get() {
            return vec![];
        }
        let mut earliest = i64::MAX;
        let mut due: Vec<(AddrKey, Lift)> = Vec::new();
        for (ip, l) in self.items.iter() {
            let l = Lift::from(*l);
            earliest = earliest.min(l.ends_ms);
            if l.ends_ms <= now_ms {
                due.push((ip, l));
            }
        }
        self.earliest.set(earliest);
        due.sort_by_key(|(_, l)| l.ends_ms);
        due
    }

    /// The earliest end still in the future at `now_ms` (when the apply
    /// task should wake next to lift on time), or an earlier time if an
    /// entry was removed since it was last looked for.
    pub fn next_end(&self, now_ms: i64) -> Option<i64> {
        let mut next = self.next.get();
        if next <= now_ms {
            next = self
                .items
                .values()
                .map(|l| Lift::from(*l).ends_ms)
                .filter(|e| *e > now_ms)
                .min()
                .unwrap_or(i64::MAX);
            self.next.set(next);
        }
        (next != i64::MAX).then_some(next)
    }

    /// Forgets the entries fail2ban confirmed free of the `shared` jail
    /// whose [`LINGER`] is over at `now_ms`, unless a later end replaced
    /// them meanwhile.
    pub fn confirmed(&mut self, free: &[(AddrKey, Lift)], now_ms: i64) {
        let linger = LINGER.as_millis() as i64;
        let mut text = String::new();
        for (ip, lift) in free {
            if lift.ends_ms + linger <= now_ms && self.get(*ip) == Some(*lift) {
                self.items.remove(ip);
                record(&mut text, *ip, None);
            }
        }
        self.items.shrink_if_sparse();
        if !text.is_empty() {
            self.append(&text);
        }
    }

    /// Appends records in one write (rewriting the file whole instead when
    /// it has grown well past its entries); returns whether it is saved.
    fn append(&mut self, text: &str) -> bool {
        self.records += text.lines().count();
        if self.records > 2 * self.items.len() + COMPACT_SLACK {
            return self.rewrite();
        }
        if self.file.is_none() {
            match super::state_file::open(
                &self.path,
                std::fs::OpenOptions::new().append(true).create(true),
            ) {
                Ok(f) => {
                    self.file = Some(f);
                    self.dir_unsynced = true;
                }
                Err(e) => return self.failed(&e),
            }
        }
        let written = match &mut self.file {
            Some(f) => std::io::Write::write_all(f, text.as_bytes()),
            None => Ok(()),
        };
        match written {
            Ok(()) => {
                self.unsynced = true;
                true
            }
            Err(e) => self.failed(&e),
        }
    }

    /// A save failed: logged; the next save rewrites the file whole, on a
    /// handle opened anew.
    fn failed(&mut self, e: &std::io::Error) -> bool {
        tracing::error!(path = %self.path.display(), error = %e, "cannot save the lift schedule; bans may outlast their fleet end");
        self.records = usize::MAX / 2;
        self.file = None;
        false
    }

    /// Replaces the file with one record per entry.
    fn rewrite(&mut self) -> bool {
        let mut text = String::with_capacity(self.items.len() * 40);
        for (ip, l) in self.items.iter() {
            record(&mut text, ip, Some(&Lift::from(*l)));
        }
        // Durable: a rewrite renames a new file over the old one, and a power
        // loss before its data reached the disk would leave it empty: every
        // lift lost, their bans held for the jail's (ladder top) bantime.
        // The handle held is the old file's: the next append opens the new one.
        self.file = None;
        match super::state_file::replace(&self.path, text.as_bytes(), true) {
            Ok(()) => {
                self.records = self.items.len();
                // The new file is fsynced: only its name is not yet.
                self.unsynced = false;
                self.dir_unsynced = true;
                true
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot save the lift schedule; bans may outlast their fleet end");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(ip: &str) -> AddrKey {
        AddrKey::parse(ip).unwrap()
    }

    #[test]
    fn a_lift_is_held_packed_and_whole() {
        for (ends_ms, event) in [(0, 0), (-1, u64::MAX), (1_790_000_000_123, 1 << 40)] {
            let l = Lift { ends_ms, event };
            assert_eq!(Lift::from(Packed::from(l)), l);
        }
        assert_eq!(std::mem::size_of::<(u32, Packed)>(), 20);
    }

    #[test]
    fn later_ends_replace_earlier_ones_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifts");
        let mut l = Lifts::load(path.clone());
        assert!(l.schedule(&[(k("192.0.2.1"), 2_000, 1), (k("192.0.2.2"), 5_000, 2)]));
        assert!(l.schedule(&[(k("192.0.2.1"), 4_000, 3)]), "a later end");
        assert!(l.schedule(&[(k("192.0.2.1"), 3_000, 4)]), "an earlier one");
        let l = Lifts::load(path.clone());
        assert_eq!(
            l.get(k("192.0.2.1")),
            Some(Lift {
                ends_ms: 4_000,
                event: 3
            })
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l.next_end(0), Some(4_000));
        assert_eq!(l.next_end(4_000), Some(5_000));
        assert_eq!(l.due(4_500).len(), 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_log_is_compacted_once_it_outgrows_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifts");
        let mut l = Lifts::load(path.clone());
        for i in 0..3_000i64 {
            l.schedule(&[(k("192.0.2.1"), i + 1, i as u64)]);
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(
            lines <= 2 + COMPACT_SLACK + 1,
            "{lines} records for one entry"
        );
        assert_eq!(
            Lifts::load(path).get(k("192.0.2.1")),
            Some(Lift {
                ends_ms: 3_000,
                event: 2_999
            })
        );
    }

    #[test]
    fn an_entry_lingers_after_its_end_until_confirmed_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Lifts::load(dir.path().join("lifts"));
        l.schedule(&[(k("192.0.2.1"), 1_000, 1)]);
        let due = l.due(1_000);
        assert_eq!(due.len(), 1);
        l.confirmed(&due, 1_000);
        assert_eq!(l.len(), 1, "kept while fail2ban may still read a line late");
        // A later ban of it meanwhile is not forgotten with the old entry.
        l.schedule(&[(k("192.0.2.1"), 90_000, 2)]);
        l.confirmed(&due, 1_000 + LINGER.as_millis() as i64);
        assert_eq!(l.get(k("192.0.2.1")).map(|x| x.event), Some(2));
        let due = l.due(90_000);
        l.confirmed(&due, 90_000 + LINGER.as_millis() as i64);
        assert!(l.is_empty());
        assert!(Lifts::load(dir.path().join("lifts")).is_empty());
    }

    #[test]
    fn unbans_cancel_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifts");
        std::fs::write(
            &path,
            "192.0.2.1\t1000\t1\nnot-an-ip\t1\t1\n192.0.2.2\tx\t2\n2001:db8::1\t7\t3\textra\n2001:db8::2\t8\t4\n192.0.2.9\t9\t9\n192.0.2.9\t-\n192.0.2.7\t12",
        )
        .unwrap();
        let mut l = Lifts::load(path.clone());
        assert_eq!(
            l.len(),
            2,
            "the removal and the torn last line count for nothing"
        );
        // Rewritten whole: an append starts on a line of its own.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        l.cancel(k("192.0.2.1"));
        l.schedule(&[(k("192.0.2.7"), 50, 5)]);
        let l = Lifts::load(path);
        assert_eq!(l.len(), 2);
        assert_eq!(l.get(k("192.0.2.7")).map(|x| x.ends_ms), Some(50));
        assert_eq!(l.get(k("192.0.2.1")), None);
    }

    #[test]
    fn the_next_end_and_due_entries_are_never_missed() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Lifts::load(dir.path().join("lifts"));
        assert_eq!(l.next_end(0), None);
        assert!(l.due(i64::MAX).is_empty());
        l.schedule(&[(k("192.0.2.1"), 5_000, 1), (k("2001:db8::1"), 9_000, 2)]);
        assert_eq!(l.next_end(0), Some(5_000));
        assert!(l.due(4_999).is_empty());
        // An earlier end set later is seen at once.
        l.schedule(&[(k("192.0.2.3"), 2_000, 3)]);
        assert_eq!(l.next_end(0), Some(2_000));
        assert_eq!(l.due(2_000).len(), 1);
        // A removed entry may wake the task early, never late.
        l.cancel(k("192.0.2.3"));
        assert!(l.next_end(0).is_some_and(|e| e <= 5_000));
        assert_eq!(l.next_end(2_000), Some(5_000));
        assert_eq!(l.next_end(5_000), Some(9_000));
        assert_eq!(l.next_end(9_000), None);
        let due = l.due(9_000);
        assert_eq!(
            due.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>(),
            ["192.0.2.1", "2001:db8::1"]
        );
        l.confirmed(&due, 9_000 + LINGER.as_millis() as i64);
        assert!(l.is_empty());
        assert_eq!(l.next_end(0), None);
        // After a restart the bounds start unknown: the first look scans.
        l.schedule(&[(k("192.0.2.4"), 7_000, 4)]);
        let l = Lifts::load(dir.path().join("lifts"));
        assert_eq!(l.next_end(0), Some(7_000));
        assert_eq!(l.due(7_000).len(), 1);
    }
}
