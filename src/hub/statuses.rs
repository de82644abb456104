//! Hosts' statuses, written in groups: every node answers every ban, so a
//! fleet of hundreds sends hundreds of `ReportStatus` calls per ban. One
//! task takes whatever calls have queued up and writes them as one
//! statement, so the database sees one commit where it would see hundreds.
//! A call is answered once its statuses are stored.
//!
//! A status answers an event that exists: a call naming an id above the
//! last event (or 0) is refused whole before anything is queued, so no one
//! can pre-set statuses for bans not yet made. An id this hub has
//! published is stored (the committer publishes only after the commit), so
//! the store is read only for an id above both the last published one and
//! the last id read: a host answering an event it had from another hub
//! before this hub's peer poll did (one query per new ban was 166 per bench
//! run, 0.6 ms each, on pool connections).
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::{mpsc, oneshot};

use super::store::{Store, StoreError};
use crate::ban::Status;

/// Most statuses in one write.
const MAX_ROWS: usize = 20_000;

type Job = (
    Vec<(String, u64, Status)>,
    oneshot::Sender<Result<usize, Arc<StoreError>>>,
);

/// Why statuses were not stored.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The call named an event that does not exist; nothing was stored.
    #[error(
        "no event has id {id} (the last is {last}): a status answers an event that exists; nothing was stored"
    )]
    NoSuchEvent {
        /// The first id in the call that has no event.
        id: u64,
        /// The highest event id the store holds.
        last: u64,
    },
    /// The store failed (or the hub is stopping).
    #[error(transparent)]
    Store(Arc<StoreError>),
}

/// A handle on the status writer task.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::Sender<Job>,
    store: Arc<dyn Store>,
    /// The highest event id known to exist.
    last: Arc<AtomicU64>,
    /// The highest event id published live by this hub (the fan-out's head).
    published: Published,
}

/// Reads the last event id the hub has published.
pub type Published = Arc<dyn Fn() -> u64 + Send + Sync>;

impl StatusWriter {
    /// Starts the writer; it stops when every handle is dropped.
    pub fn spawn(store: Arc<dyn Store>, published: Published) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(store.clone(), rx));
        StatusWriter {
            tx,
            store,
            last: Arc::default(),
            published,
        }
    }

    /// Refuses ids of events that do not exist (see the module doc).
    async fn check_ids(&self, updates: &[(String, u64, Status)]) -> Result<(), WriteError> {
        if updates.iter().any(|u| u.1 == 0) {
            let last = self.last.load(Ordering::Relaxed);
            return Err(WriteError::NoSuchEvent { id: 0, last });
        }
        let Some(id) = updates.iter().map(|u| u.1).max() else {
            return Ok(());
        };
        if id <= self.last.load(Ordering::Relaxed).max((self.published)()) {
            return Ok(());
        }
        let last = self
            .store
            .last_event_id()
            .await
            .map_err(|e| WriteError::Store(Arc::new(e)))?;
        self.last.fetch_max(last, Ordering::Relaxed);
        if id > last {
            return Err(WriteError::NoSuchEvent { id, last });
        }
        Ok(())
    }

    /// Stores statuses; resolves once they are written.
    pub async fn write(&self, updates: Vec<(String, u64, Status)>) -> Result<usize, WriteError> {
        self.check_ids(&updates).await?;
        let (reply, rx) = oneshot::channel();
        let stopped = || WriteError::Store(Arc::new(StoreError::Stopped));
        self.tx
            .send((updates, reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(WriteError::Store)
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut rows = jobs[0].0.len();
        while rows < MAX_ROWS {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job.0.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let all: Vec<(String, u64, Status)> =
            jobs.iter().flat_map(|(u, _)| u.iter().cloned()).collect();
        let result = store.set_statuses(&all).await.map_err(Arc::new);
        for (updates, reply) in jobs {
            let _ = reply.send(result.clone().map(|_| updates.len()));
        }
    }
}
