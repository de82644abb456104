//! Hosts' statuses, written in groups: every node answers every ban, so a
//! fleet of hundreds sends hundreds of `ReportStatus` calls per ban. One
//! task takes whatever calls have queued up and writes them as one
//! statement, so the database sees one commit where it would see hundreds.
//! A call is answered once its statuses are stored.
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::store::{Store, StoreError};
use crate::ban::Status;

/// Most statuses in one write.
const MAX_ROWS: usize = 20_000;

type Job = (
    Vec<(String, u64, Status)>,
    oneshot::Sender<Result<usize, Arc<StoreError>>>,
);

/// A handle to the status writer task; cloned into every `ReportStatus` handler.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::Sender<Job>,
}

impl StatusWriter {
    /// Starts the writer; it stops when every handle is dropped.
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(store, rx));
        StatusWriter { tx }
    }

    /// Stores statuses; resolves once they are written.
    pub async fn write(
        &self,
        updates: Vec<(String, u64, Status)>,
    ) -> Result<usize, Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        let stopped = || Arc::new(StoreError::Stopped);
        self.tx
            .send((updates, reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
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
