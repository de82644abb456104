//! Group commit: the one task that writes events to the store.
//!
//! Handlers send commands over a channel; the committer takes whatever has
//! queued up while the previous transaction ran (up to [`MAX_BATCH`]) and
//! commits it as one transaction, then hands the new events to the fan-out
//! in id order and answers each sender. Being the only writer keeps event
//! ids in commit order, which the subscribers' gap-free switch from replay
//! to live relies on. Nothing is acknowledged before its commit returns.
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{
    fanout::Fanout,
    store::{Committed, NewReport, Store, StoreError},
};
use crate::{ban::Event, shutdown::Shutdown};

/// Most reports in one transaction (one multi-row INSERT).
pub const MAX_BATCH: usize = 1000;
/// Commands that may wait for the committer before senders feel backpressure.
const QUEUE: usize = 16 * MAX_BATCH;

type Reply<T> = oneshot::Sender<Result<T, Arc<StoreError>>>;

enum Command {
    Report(NewReport, Reply<Committed>),
    Unban {
        ip: String,
        by: String,
        reply: Reply<Option<(Event, u32)>>,
    },
}

/// A handle to the committer task.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Command>,
}

/// The committer is gone: the hub is shutting down.
fn stopped() -> Arc<StoreError> {
    Arc::new(StoreError::Query("the hub is shutting down".into()))
}

impl Committer {
    /// Starts the committer task; it stops once `shutdown` fires and every
    /// command already queued is committed and answered.
    pub fn spawn(store: Arc<dyn Store>, fanout: Fanout, shutdown: Shutdown) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, fanout, rx, shutdown));
        Committer { tx }
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
    mut rx: mpsc::Receiver<Command>,
    mut shutdown: Shutdown,
) {
    let mut batch: Vec<NewReport> = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<Reply<Committed>> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            cmd = rx.recv() => cmd,
            _ = shutdown.recv(), if !shutdown.is_shutdown() => {
                // Stop taking new commands; those already queued still commit.
                rx.close();
                continue;
            }
        };
        let Some(mut cmd) = first else { break };
        loop {
            match cmd {
                Command::Report(r, reply) => {
                    batch.push(r);
                    replies.push(reply);
                }
                Command::Unban { ip, by, reply } => {
                    // Reports queued before the unban commit before it.
                    commit_reports(&*store, &fanout, &mut batch, &mut replies).await;
                    let result = store.unban(&ip, &by).await.map_err(Arc::new);
                    if let Ok(Some((event, _))) = &result {
                        fanout.publish(Arc::new(event.clone()));
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
        commit_reports(&*store, &fanout, &mut batch, &mut replies).await;
    }
    debug!("committer stopped");
}

async fn commit_reports(
    store: &dyn Store,
    fanout: &Fanout,
    batch: &mut Vec<NewReport>,
    replies: &mut Vec<Reply<Committed>>,
) {
    if batch.is_empty() {
        return;
    }
    match store.commit(batch).await {
        Ok(results) => {
            debug!(batch = batch.len(), "committed");
            for r in &results {
                if let Committed::New(event) = r {
                    fanout.publish(Arc::new(event.clone()));
                }
            }
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
