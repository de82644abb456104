//! Group commit: the one task that writes events to the store.
//!
//! Handlers send commands over a channel; the committer takes whatever has
//! queued up while the previous transaction ran (up to [`MAX_BATCH`]) and
//! commits it as one transaction, then hands the new events to the fan-out
//! in id order and answers each sender. Being the only writer keeps event
//! ids in commit order, which the subscribers' gap-free switch from replay
//! to live relies on. Nothing is acknowledged before its commit returns.
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
//! A commit whose outcome is unknown (the database went away during it)
//! may still have landed. Its events are then published late, in order:
//! after every successful commit, anything in the store between the last
//! published id and the highest id this commit returned (a re-sent report
//! comes back as such a duplicate) is read back and published first.
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{
    allow::{Guard, refuse},
    fanout::Fanout,
    fleet::FleetAddrs,
    store::{AllowAdded, AllowRow, Committed, NewReport, Store, StoreError},
};
use crate::{
    allow::{AllowList, Network},
    ban::Event,
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
        shutdown: Shutdown,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, fanout, fleet, rx, shutdown));
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

    /// Lifts every active ban of `ip`, in order with the reports around it.
    pub async fn unban(
        &self,
        ip: String,
        by: String,
    ) -> Result<Option<(Event, u32)>, Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Unban { ip, by, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(
    store: Arc<dyn Store>,
    fanout: Fanout,
    fleet: FleetAddrs,
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
                published.publish(&*store, &fanout, owed, &[]).await;
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
                Command::Unban { ip, by, reply } => {
                    let result = store.unban(&ip, &by).await.map_err(Arc::new);
                    if let Ok(Some((event, _))) = &result {
                        published
                            .publish(&*store, &fanout, event.id, std::slice::from_ref(event))
                            .await;
                    }
                    let _ = reply.send(result);
                }
                Command::AllowAdd(entry, reply) => {
                    let result = store.allow_add(&entry).await.map_err(Arc::new);
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
                        published.publish(&*store, &fanout, highest, &fresh).await;
                    }
                    let _ = reply.send(result);
                }
                Command::AllowRemove { network, by, reply } => {
                    let result = store.allow_remove(&network, &by).await.map_err(Arc::new);
                    if result.is_err() {
                        match load_allow_list(&*store, &mut shutdown).await {
                            Some(list) => guard.list = list,
                            None => return,
                        }
                    }
                    if let Ok(Some(event)) = &result {
                        guard.list.remove(&network);
                        published
                            .publish(&*store, &fanout, event.id, std::slice::from_ref(event))
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

impl Published {
    /// Publishes `fresh` (events just committed, in id order), first
    /// filling any gap up to `highest` from the store.
    async fn publish(&mut self, store: &dyn Store, fanout: &Fanout, highest: u64, fresh: &[Event]) {
        self.owed = self.owed.max(highest);
        let highest = self.owed;
        let contiguous = fresh
            .iter()
            .enumerate()
            .all(|(i, e)| e.id == self.last + 1 + i as u64)
            && fresh.last().map_or(self.last, |e| e.id) == highest;
        if contiguous || highest <= self.last {
            for e in fresh {
                if e.id > self.last {
                    fanout.publish(Arc::new(e.clone()));
                    self.last = e.id;
                }
            }
            return;
        }
        // Something committed that was never published (an unknown
        // outcome, or ids skipped): read the range back, in order.
        let span = (highest - self.last) as usize;
        match store.events_after(self.last, "", span).await {
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

async fn commit_reports(
    store: &dyn Store,
    fanout: &Fanout,
    guard: &Guard,
    published: &mut Published,
    batch: &mut Vec<NewReport>,
    replies: &mut Vec<Reply<Committed>>,
) {
    refuse(store, guard, batch, replies).await;
    if batch.is_empty() {
        return;
    }
    match store.commit(batch).await {
        Ok(results) => {
            debug!(batch = batch.len(), "committed");
            let highest = results.iter().map(Committed::event_id).max().unwrap_or(0);
            let mut fresh: Vec<Event> = results
                .iter()
                .filter_map(|r| match r {
                    Committed::New(e) => Some(e.clone()),
                    Committed::Duplicate(_) | Committed::Refused { .. } => None,
                })
                .collect();
            fresh.sort_by_key(|e| e.id);
            published.publish(store, fanout, highest, &fresh).await;
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
