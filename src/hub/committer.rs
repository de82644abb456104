//! Group commit: the one task that writes events to the store.
//!
//! Handlers send commands over a channel; the committer takes whatever has
//! queued up while the previous transaction ran (up to [`MAX_BATCH`]) and
//! commits it as one transaction, then hands the new events to the fan-out
//! in id order and answers each sender. Event ids follow commit order (a
//! counter row in each transaction), which the subscribers' gap-free
//! switch from replay to live relies on. Nothing is acknowledged before its commit returns.
//!
//! The committer also owns the fleet allow-list as the hub enforces it,
//! and that is why no ban inside an entry can slip past it: each report is
//! checked against the list as it stands at the report's place in the
//! committer's one queue, right before its commit. Adding an entry first
//! commits every report queued before it, then writes the entry, its
//! allow-add event and the unbans of every active ban inside it in one
//! transaction, and only then changes the list the next reports are checked
//! against. So a ban inside the entry is either committed before the entry
//! (and lifted by an unban with a higher id) or refused; never committed
//! after it while it stands. A refused report is stored in
//! `refused_reports` and answered [`Committed::Refused`]: no event, no
//! fan-out.
//!
//! The committer also decides every ban's term with the escalation ladder
//! ([`super::ladder`]), for the same reason: being the only writer, it
//! knows each address's latest ban exactly as the next commit will find
//! it. Before a batch commits it reads, in one store call, which of its
//! reports are stored already (re-sends) and each address's latest ban;
//! then it plans each report in order, carrying what the batch itself
//! changes: the first report of an address with no active ban becomes a
//! new ban on its rung, the reports after it are coalesced into that ban
//! ([`Committed::Coalesced`]: recorded, acked with the ban's id, nothing
//! fanned out). Twenty hosts reporting one scanner in one batch make one
//! event.
//!
//! A commit whose outcome is unknown (the database went away during it)
//! may still have landed. Its events are then published late, in order:
//! after every successful commit, anything in the store between the last
//! published id and the highest id this commit returned (a re-sent report
//! comes back as such a duplicate) is read back and published first.
//!
//! Other hubs sharing the store (MySQL, MariaDB Galera) commit events this
//! committer never wrote. Their ids are commit-ordered with ours (the
//! counter row, `store::sql::sequence`), so the same read-back covers
//! them when we commit next, and while idle the committer reads what lies
//! above its last published id every `--peer-poll` and publishes it in
//! order: one ordered publisher per hub, whoever committed. While the
//! hub's database is down (`db_health`) the poll pauses; after a move to
//! another `--db` address it resumes from the last published id, which
//! every node of a Galera cluster agrees on (see `db_health`).
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{
    allow::{Guard, refuse},
    db_health::DbGate,
    fanout::Fanout,
    fleet::FleetAddrs,
    ladder::{Decision, Ladder, PastBan},
    store::{AllowAdded, AllowRow, Committed, NewReport, Plan, Store, StoreError, now_ms},
};
use crate::{
    allow::{AllowList, Network},
    ban::{BanTerm, Event, EventKind},
    shutdown::Shutdown,
};

/// Most reports in one transaction (one multi-row INSERT).
pub const MAX_BATCH: usize = 1000;
/// Commands that may wait for the committer before senders feel backpressure.
const QUEUE: usize = 16 * MAX_BATCH;

/// Where the committer answers one command.
pub(super) type Reply<T> = oneshot::Sender<Result<T, Arc<StoreError>>>;

enum Command {
    Report(NewReport, Reply<Committed>),
    Unban {
        ip: String,
        by: String,
        forget: bool,
        reply: Reply<Option<(Event, u32)>>,
    },
    AllowAdd(AllowRow, Reply<Option<AllowAdded>>),
    AllowRemove {
        network: Network,
        by: String,
        reply: Reply<Option<Event>>,
    },
}

/// A handle to the committer task.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Command>,
}

/// The committer is gone: the hub is shutting down.
fn stopped() -> Arc<StoreError> {
    Arc::new(StoreError::Stopped)
}

impl Committer {
    /// Starts the committer task; it stops once `shutdown` fires and every
    /// command already queued is committed and answered.
    pub fn spawn(
        store: Arc<dyn Store>,
        fanout: Fanout,
        fleet: FleetAddrs,
        ladder: Option<Ladder>,
        peer_poll: Option<std::time::Duration>,
        db: DbGate,
        shutdown: Shutdown,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let peers = Peers {
            poll: peer_poll,
            db,
        };
        tokio::spawn(run(store, fanout, fleet, ladder, peers, rx, shutdown));
        Committer { tx }
    }

    async fn ask<T>(&self, cmd: impl FnOnce(Reply<T>) -> Command) -> Result<T, Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(cmd(reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Adds an allow-list entry and lifts every active ban inside it, in
    /// order with the reports around it; `None` when already listed.
    pub async fn allow_add(&self, entry: AllowRow) -> Result<Option<AllowAdded>, Arc<StoreError>> {
        self.ask(|reply| Command::AllowAdd(entry, reply)).await
    }

    /// Removes an allow-list entry; `None` when it was not listed.
    pub async fn allow_remove(
        &self,
        network: Network,
        by: String,
    ) -> Result<Option<Event>, Arc<StoreError>> {
        self.ask(|reply| Command::AllowRemove { network, by, reply })
            .await
    }

    /// Queues a report; the receiver resolves once it is durable.
    pub async fn report(
        &self,
        report: NewReport,
    ) -> oneshot::Receiver<Result<Committed, Arc<StoreError>>> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Command::Report(_, reply))) =
            self.tx.send(Command::Report(report, reply)).await
        {
            let _ = reply.send(Err(stopped()));
        }
        rx
    }

    /// Lifts every active ban of `ip`, in order with the reports around
    /// it; with `forget`, also clears its ladder history.
    pub async fn unban(
        &self,
        ip: String,
        by: String,
        forget: bool,
    ) -> Result<Option<(Event, u32)>, Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Unban {
                ip,
                by,
                forget,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// When to read other hubs' commits: every `poll`, while `db` serves.
struct Peers {
    poll: Option<std::time::Duration>,
    db: DbGate,
}

async fn run(
    store: Arc<dyn Store>,
    fanout: Fanout,
    fleet: FleetAddrs,
    ladder: Option<Ladder>,
    Peers {
        poll: peer_poll,
        db,
    }: Peers,
    mut rx: mpsc::Receiver<Command>,
    mut shutdown: Shutdown,
) {
    // The list every report is checked against; nothing is committed
    // before it is loaded (a report must never pass an unloaded list).
    let Some(list) = load_allow_list(&*store, &mut shutdown).await else {
        return;
    };
    let mut guard = Guard { list, fleet };
    let mut batch: Vec<NewReport> = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<Reply<Committed>> = Vec::with_capacity(MAX_BATCH);
    // Where publishing starts: the store's last id. Without it the first
    // commit would read the whole table back, so wait for the store.
    let last = loop {
        match store.last_event_id().await {
            Ok(id) => break id,
            Err(e) => {
                warn!(error = %e, "cannot read the last event id; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
    };
    let mut published = Published { last, owed: last };
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut beat = tokio::time::interval(crate::systemd::BEAT);
    let mut peers =
        tokio::time::interval(peer_poll.unwrap_or(std::time::Duration::from_secs(3600)));
    peers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        crate::systemd::beat();
        let first = tokio::select! {
            cmd = rx.recv() => cmd,
            // The watchdog's sign of life while idle.
            _ = beat.tick() => continue,
            _ = shutdown.recv(), if !shutdown.is_shutdown() => {
                // Stop taking new commands; those already queued still commit.
                rx.close();
                continue;
            }
            // Events known to be stored but not yet published (a read-back
            // failed): try again without waiting for the next commit.
            _ = retry.tick(), if published.owed > published.last => {
                let owed = published.owed;
                let _ = db
                    .bounded(async {
                        published.publish(&*store, &fanout, owed, &[], &[]).await;
                        Ok(())
                    })
                    .await;
                continue;
            }
            // Other hubs' commits (`--peer-poll`), published here in id
            // order like our own (see the module doc).
            // Not while the database is down: each read would fail.
            _ = peers.tick(), if peer_poll.is_some() && db.serving() => {
                let polled = db.bounded(async { Ok(published.poll_peers(&*store, &fanout).await) });
                if polled.await.unwrap_or(false) {
                    // Another hub changed the allow-list: check the next
                    // reports against the store's list.
                    match load_allow_list(&*store, &mut shutdown).await {
                        Some(list) => guard.list = list,
                        None => return,
                    }
                }
                continue;
            }
        };
        let Some(mut cmd) = first else { break };
        loop {
            // Reports queued before an unban or an allow-list change commit
            // before it (and are checked against the list without it).
            if !matches!(cmd, Command::Report(..)) {
                commit_reports(
                    &*store,
                    &fanout,
                    &guard,
                    ladder.as_ref(),
                    &db,
                    &mut published,
                    &mut batch,
                    &mut replies,
                )
                .await;
            }
            match cmd {
                Command::Report(r, reply) => {
                    batch.push(r);
                    replies.push(reply);
                }
                Command::Unban {
                    ip,
                    by,
                    forget,
                    reply,
                } => {
                    let result = db
                        .bounded(store.unban(&ip, &by, forget))
                        .await
                        .map_err(Arc::new);
                    if let Ok(Some((event, _))) = &result {
                        published
                            .publish(&*store, &fanout, event.id, std::slice::from_ref(event), &[])
                            .await;
                    }
                    let _ = reply.send(result);
                }
                Command::AllowAdd(entry, reply) => {
                    let result = db.bounded(store.allow_add(&entry)).await.map_err(Arc::new);
                    if result.is_err() {
                        // The change may have landed all the same (the store
                        // went away during COMMIT): the list is read back so
                        // the copy reports are checked against is the store's.
                        match load_allow_list(&*store, &mut shutdown).await {
                            Some(list) => guard.list = list,
                            None => return,
                        }
                    }
                    if let Ok(Some(added)) = &result {
                        guard.list.insert(added.entry.network);
                        let mut fresh = vec![added.event.clone()];
                        fresh.extend(added.unbans.iter().cloned());
                        let highest = fresh.last().map_or(0, |e| e.id);
                        published
                            .publish(&*store, &fanout, highest, &fresh, &[])
                            .await;
                    }
                    let _ = reply.send(result);
                }
                Command::AllowRemove { network, by, reply } => {
                    let result = db
                        .bounded(store.allow_remove(&network, &by))
                        .await
                        .map_err(Arc::new);
                    if result.is_err() {
                        match load_allow_list(&*store, &mut shutdown).await {
                            Some(list) => guard.list = list,
                            None => return,
                        }
                    }
                    if let Ok(Some(event)) = &result {
                        guard.list.remove(&network);
                        published
                            .publish(&*store, &fanout, event.id, std::slice::from_ref(event), &[])
                            .await;
                    }
                    let _ = reply.send(result);
                }
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(next) => cmd = next,
                Err(_) => break,
            }
        }
        commit_reports(
            &*store,
            &fanout,
            &guard,
            ladder.as_ref(),
            &db,
            &mut published,
            &mut batch,
            &mut replies,
        )
        .await;
    }
    debug!("committer stopped");
}

/// The highest event id handed to the fan-out, and the highest known to
/// be stored (more when a read-back failed: those are owed, in order).
struct Published {
    last: u64,
    owed: u64,
}

/// Most events one peer poll reads; more wait for the next tick.
const PEER_POLL_LIMIT: usize = 1000;

impl Published {
    /// Publishes what other hubs committed since the last published id.
    /// Event ids are commit-ordered across hubs (`store::sql::sequence`):
    /// what a read finds above `last` is every event up to its highest id,
    /// so publishing all of it in order and moving `last` to the highest
    /// skips nothing that could still commit. True when one of them
    /// changed the allow-list.
    async fn poll_peers(&mut self, store: &dyn Store, fanout: &Fanout) -> bool {
        if self.owed > self.last {
            // Our own read-back is due first; it covers the peers' too.
            return false;
        }
        let mut allow_changed = false;
        match store.committed_after(self.last, PEER_POLL_LIMIT).await {
            Ok(events) => {
                for e in events {
                    if e.id > self.last {
                        self.last = e.id;
                        self.owed = e.id;
                        allow_changed |=
                            matches!(e.kind, EventKind::AllowAdd | EventKind::AllowRemove);
                        fanout.publish(Arc::new(e));
                    }
                }
            }
            Err(e) => debug!(error = %e, "cannot read other hubs' events; next poll retries"),
        }
        allow_changed
    }

    /// Publishes `fresh` (events just committed, in id order), first
    /// filling any gap up to `highest` from the store. `rows` are ids the
    /// same commit gave rows that are no events (coalesced reports): no
    /// gap, nothing to publish.
    async fn publish(
        &mut self,
        store: &dyn Store,
        fanout: &Fanout,
        highest: u64,
        fresh: &[Event],
        rows: &[u64],
    ) {
        self.owed = self.owed.max(highest);
        let highest = self.owed;
        let mut ids: Vec<u64> = fresh
            .iter()
            .map(|e| e.id)
            .chain(rows.iter().copied())
            .collect();
        ids.sort_unstable();
        let contiguous = ids
            .iter()
            .enumerate()
            .all(|(i, id)| *id == self.last + 1 + i as u64)
            && ids.last().copied().unwrap_or(self.last) == highest;
        if contiguous || highest <= self.last {
            for e in fresh {
                if e.id > self.last {
                    fanout.publish(Arc::new(e.clone()));
                }
            }
            self.last = self.last.max(highest);
            return;
        }
        // Something committed that was never published (an unknown
        // outcome, or ids skipped): read the range back, in order.
        let span = (highest - self.last) as usize;
        match store.committed_after(self.last, span).await {
            Ok(events) => {
                let late = events.len().saturating_sub(fresh.len());
                if late > 0 {
                    tracing::info!(
                        late,
                        from = self.last,
                        "publishing events committed without being published"
                    );
                }
                for e in events.into_iter().filter(|e| e.id <= highest) {
                    fanout.publish(Arc::new(e));
                }
                self.last = highest;
            }
            Err(e) => {
                // Publish nothing out of order: subscribers skip ids below
                // the last they saw. All of it is retried, from the store.
                warn!(error = %e, owed = self.owed - self.last, "cannot read back unpublished events; retrying");
            }
        }
    }
}

/// Commits the queued reports and answers each. While the database is
/// down nothing is tried (the hub refuses new reports meanwhile; these
/// are answered with the reason, unacked); a call on a database lost or
/// replaced while it runs is abandoned (`DbGate::bounded`).
#[allow(clippy::too_many_arguments)]
async fn commit_reports(
    store: &dyn Store,
    fanout: &Fanout,
    guard: &Guard,
    ladder: Option<&Ladder>,
    db: &DbGate,
    published: &mut Published,
    batch: &mut Vec<NewReport>,
    replies: &mut Vec<Reply<Committed>>,
) {
    if batch.is_empty() {
        return;
    }
    let planned = match db.down() {
        Some(e) => Err(e),
        None => {
            db.bounded(async {
                refuse(store, guard, batch, replies).await;
                if batch.is_empty() {
                    return Ok(None);
                }
                // With the ladder off, every report keeps its default plan:
                // a ban with no fleet term, as before the ladder.
                let facts = match ladder {
                    Some(l) => Some((l, store.ladder_facts(batch).await?)),
                    None => None,
                };
                // One clock reading for the terms and the events' creation:
                // a fleet end is exactly its rung's duration after the
                // ban's `created_ms`.
                let now = now_ms();
                if let Some((ladder, facts)) = facts {
                    plan(ladder, &facts, batch, now);
                }
                store.commit_at(batch, now).await.map(Some)
            })
            .await
        }
    };
    match planned {
        Ok(None) => {}
        Ok(Some(results)) => {
            debug!(batch = batch.len(), "committed");
            let highest = results
                .iter()
                .map(|r| match r {
                    Committed::Coalesced { row, .. } => *row,
                    r => r.event_id(),
                })
                .max()
                .unwrap_or(0);
            let mut fresh: Vec<Event> = Vec::new();
            let mut rows: Vec<u64> = Vec::new();
            for r in &results {
                match r {
                    Committed::New(e) => fresh.push(e.clone()),
                    Committed::Coalesced { row, .. } => rows.push(*row),
                    Committed::Duplicate(_) | Committed::Refused { .. } => {}
                }
            }
            fresh.sort_by_key(|e| e.id);
            // Abandoned mid read-back, what is owed is published later.
            let _ = db
                .bounded(async {
                    published
                        .publish(store, fanout, highest, &fresh, &rows)
                        .await;
                    Ok(())
                })
                .await;
            for (reply, r) in replies.drain(..).zip(results) {
                let _ = reply.send(Ok(r));
            }
        }
        Err(e) => {
            warn!(error = %e, batch = batch.len(), "commit failed; reports stay in the nodes' outboxes");
            let e = Arc::new(e);
            for reply in replies.drain(..) {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
    batch.clear();
}

/// Where an address's latest ban is, as a batch is planned: stored, or
/// the report at this index of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Latest {
    Stored(u64),
    InBatch(usize),
}

/// Sets every report's [`Plan`] from the ladder, in batch order, carrying
/// each address's latest ban through the batch. A re-send (its key stored
/// already, or earlier in the batch) changes nothing: the store answers it
/// with its first outcome whatever its plan. A ban the hub's own policy
/// decided keeps its reason.
fn plan(
    ladder: &Ladder,
    facts: &crate::hub::store::LadderFacts,
    batch: &mut [NewReport],
    now: i64,
) {
    let mut latest: std::collections::HashMap<String, (Latest, PastBan)> = facts
        .latest
        .iter()
        .map(|(ip, (id, b))| (ip.clone(), (Latest::Stored(*id), *b)))
        .collect();
    let mut keys = std::collections::HashSet::new();
    for (i, r) in batch.iter_mut().enumerate() {
        let key = (r.host.clone(), r.seq);
        let resend = facts.known.get(&key).is_some_and(|(_, b)| *b == r.ban);
        let resend = !keys.insert(key) || resend;
        let reason = match &r.plan {
            Plan::New(t) => t.reason.clone(),
            _ => String::new(),
        };
        let now_latest = latest.get(&r.ban.ip).copied();
        let decision = ladder.decide(now_latest.as_ref().map(|l| &l.1), now);
        // The ladder coalesces and extends only when there is a latest
        // ban, so `at` is known in those arms.
        let at = now_latest.map(|l| l.0);
        let (plan, becomes) = match (decision, at) {
            (Decision::Coalesce, Some(Latest::Stored(id))) => (Plan::Coalesce(id), None),
            // A ban of this batch is never half over: coalesced too.
            (Decision::Coalesce | Decision::Extend { .. }, Some(Latest::InBatch(j))) => {
                (Plan::CoalesceWith(j), None)
            }
            (Decision::Extend { rung, ends_ms }, Some(Latest::Stored(id))) => {
                let term = BanTerm {
                    ends_ms,
                    rung,
                    extends: id,
                    reason,
                };
                (Plan::New(term), Some((rung, ends_ms)))
            }
            (Decision::New { rung, ends_ms }, _) | (Decision::Extend { rung, ends_ms }, None) => {
                let term = BanTerm {
                    ends_ms,
                    rung,
                    extends: 0,
                    reason,
                };
                (Plan::New(term), Some((rung, ends_ms)))
            }
            (Decision::Coalesce, None) => {
                let rung = ladder.next_rung(None, now);
                let ends_ms = now + ladder.duration(rung).as_millis() as i64;
                let term = BanTerm {
                    ends_ms,
                    rung,
                    extends: 0,
                    reason,
                };
                (Plan::New(term), Some((rung, ends_ms)))
            }
        };
        r.plan = plan;
        if let (false, Some((rung, ends_ms))) = (resend, becomes) {
            let ban = PastBan {
                created_ms: now,
                ends_ms,
                rung,
                lifted: false,
                forgotten: false,
            };
            latest.insert(r.ban.ip.clone(), (Latest::InBatch(i), ban));
        }
    }
}

/// The allow-list as the store holds it, retried every second until the
/// store answers; `None` when the hub stops first.
async fn load_allow_list(store: &dyn Store, shutdown: &mut Shutdown) -> Option<AllowList> {
    loop {
        match store.allow_entries().await {
            Ok(rows) => return Some(AllowList::new(rows.into_iter().map(|r| r.network))),
            Err(e) => {
                warn!(error = %e, "cannot read the allow-list; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.recv() => return None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ban::Ban, hub::store::LadderFacts};

    const NOW: i64 = 1_000_000_000_000;
    const MIN: i64 = 60_000;

    fn report(host: &str, seq: u64, ip: &str) -> NewReport {
        NewReport {
            host: host.into(),
            seq,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            plan: Plan::default(),
        }
    }

    fn past(created_ms: i64, ends_ms: i64, rung: u32) -> PastBan {
        PastBan {
            created_ms,
            ends_ms,
            rung,
            lifted: false,
            forgotten: false,
        }
    }

    fn term(rung: u32, minutes: i64, extends: u64) -> Plan {
        Plan::New(BanTerm {
            ends_ms: NOW + minutes * MIN,
            rung,
            extends,
            reason: String::new(),
        })
    }

    #[test]
    fn a_batch_makes_one_ban_per_address_and_extends_a_ban_half_over() {
        let ladder = Ladder::default();
        let mut facts = LadderFacts::default();
        // Y: active, just started. Z: active, 50 of 60 minutes gone.
        facts
            .latest
            .insert("192.0.2.2".into(), (10, past(NOW - MIN, NOW + 59 * MIN, 2)));
        facts.latest.insert(
            "192.0.2.3".into(),
            (20, past(NOW - 50 * MIN, NOW + 10 * MIN, 2)),
        );
        let mut batch = vec![
            report("a", 1, "192.0.2.1"),
            report("b", 1, "192.0.2.1"),
            report("c", 1, "192.0.2.2"),
            report("d", 1, "192.0.2.3"),
            report("a", 1, "192.0.2.1"),
            report("e", 1, "192.0.2.3"),
        ];
        plan(&ladder, &facts, &mut batch, NOW);
        let plans: Vec<Plan> = batch.iter().map(|r| r.plan.clone()).collect();
        assert_eq!(
            plans,
            [
                term(1, 15, 0),
                Plan::CoalesceWith(0),
                Plan::Coalesce(10),
                term(3, 6 * 60, 20),
                Plan::CoalesceWith(0),
                Plan::CoalesceWith(3),
            ]
        );
    }

    #[test]
    fn a_resend_changes_nothing_for_the_reports_after_it() {
        let ladder = Ladder::default();
        let mut facts = LadderFacts::default();
        let w = "198.51.100.4";
        // W's last ban (rung 1) ended ten minutes ago; host e's report of
        // it is re-sent in the same batch as a fresh report from f.
        facts
            .latest
            .insert(w.into(), (30, past(NOW - 25 * MIN, NOW - 10 * MIN, 1)));
        let resent = report("e", 1, w);
        facts
            .known
            .insert(("e".into(), 1), (30, resent.ban.clone()));
        let mut batch = vec![resent, report("f", 1, w)];
        plan(&ladder, &facts, &mut batch, NOW);
        // The re-send is answered with its first outcome by the store;
        // f's report is a new ban of its own, not coalesced into nothing.
        assert_eq!(batch[1].plan, term(2, 60, 0));
    }

    #[test]
    fn a_fleet_policy_ban_keeps_its_reason() {
        let ladder = Ladder::default();
        let mut r = report("fleet", 1, "192.0.2.9");
        r.plan = Plan::New(BanTerm {
            reason: "10 failures on 5 hosts".into(),
            ..Default::default()
        });
        let mut batch = vec![r];
        plan(&ladder, &LadderFacts::default(), &mut batch, NOW);
        let Plan::New(t) = &batch[0].plan else {
            panic!("{:?}", batch[0].plan)
        };
        assert_eq!((t.rung, t.reason.as_str()), (1, "10 failures on 5 hosts"));
    }
}
