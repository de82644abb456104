//! Hub -> this host: subscribes from the last applied event, hands each
//! batch to the apply task, and reports statuses back to the hub.
//!
//! The position (last applied id) is the larger of the `applied` file and
//! the highest id in `shared.log`'s tail (see `apply`), so a crash between
//! writing a line and saving the position never writes the line twice.
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::{
    link::{Backoff, Link},
    statuses::StatusJournal,
};
use crate::{
    ban::Event,
    proto::{self, hub_client::HubClient},
    shutdown::Shutdown,
};

/// How long statuses gather before one `ReportStatus` call.
const STATUS_LINGER: Duration = Duration::from_millis(25);
/// Most events applied in one write.
const APPLY_BATCH: usize = 4096;

/// The last applied event id, kept in `DIR/applied`.
///
/// Saved at most every [`POSITION_SAVE`] (and at shutdown): the lines in
/// `shared.log` carry their ids and are the authority for bans, so a
/// position a moment stale only re-applies a few unbans or already-held
/// bans, which is harmless.
pub struct Position {
    path: PathBuf,
    id: AtomicU64,
    saved: std::sync::Mutex<(u64, std::time::Instant)>,
}

/// How often the position file is rewritten while events flow.
const POSITION_SAVE: Duration = Duration::from_millis(500);

impl Position {
    pub fn load(path: PathBuf, logged: u64) -> Self {
        let saved: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let id = saved.max(logged);
        Position {
            path,
            id: AtomicU64::new(id),
            saved: std::sync::Mutex::new((id, std::time::Instant::now())),
        }
    }

    pub fn get(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    pub fn set(&self, id: u64) -> std::io::Result<()> {
        self.id.store(id, Ordering::Relaxed);
        let due = self.saved.lock().unwrap().1.elapsed() >= POSITION_SAVE;
        if due { self.flush() } else { Ok(()) }
    }

    /// Writes the position now, if it moved since the last save.
    pub fn flush(&self) -> std::io::Result<()> {
        let id = self.get();
        let mut saved = self.saved.lock().unwrap();
        if saved.0 == id {
            saved.1 = std::time::Instant::now();
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, id.to_string())?;
        std::fs::rename(&tmp, &self.path)?;
        *saved = (id, std::time::Instant::now());
        Ok(())
    }
}

/// Follows the hub, handing batches to the apply task. Resubscribes from
/// the last event received (queued batches are applied before the
/// position is read again by a later process, and the apply task skips
/// anything at or below its position).
pub async fn run(
    link: Link,
    position: Arc<Position>,
    batches: mpsc::Sender<Vec<Event>>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::default();
    let mut received = position.get();
    while !shutdown.is_shutdown() {
        let after = received.max(position.get());
        let mut client = HubClient::new(link.current());
        let result = tokio::select! {
            r = client.subscribe(proto::SubscribeRequest { after_event_id: after }) => r,
            _ = shutdown.recv() => break,
        };
        let error = match result {
            Ok(stream) => {
                info!(after, "subscribed to hub");
                backoff.reset();
                follow(stream.into_inner(), &mut received, &batches, &mut shutdown).await
            }
            Err(e) => e,
        };
        if shutdown.is_shutdown() {
            break;
        }
        let delay = backoff.next_delay();
        warn!(error = %error, retry_in = ?delay, "subscription to hub lost");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.recv() => {}
        }
    }
    debug!("subscriber stopped");
}

/// Reads events until the stream ends; returns why it ended.
async fn follow(
    mut stream: tonic::Streaming<proto::Event>,
    received: &mut u64,
    batches: &mpsc::Sender<Vec<Event>>,
    shutdown: &mut Shutdown,
) -> tonic::Status {
    loop {
        let first = tokio::select! {
            m = stream.next() => m,
            _ = shutdown.recv() => return tonic::Status::cancelled("shutting down"),
        };
        let mut batch = Vec::new();
        let mut next = first;
        let ended = loop {
            match next {
                Some(Ok(e)) => match Event::from_proto(&e) {
                    Ok(ev) if ev.id > *received => {
                        *received = ev.id;
                        batch.push(ev);
                    }
                    Ok(_) => {}
                    Err(err) => {
                        warn!(id = e.id, error = %err, "hub sent a malformed event; skipped")
                    }
                },
                Some(Err(status)) => break Some(status),
                None => break Some(tonic::Status::unavailable("hub ended the subscription")),
            }
            if batch.len() >= APPLY_BATCH {
                break None;
            }
            match stream.next().now_or_never() {
                Some(m) => next = m,
                None => break None,
            }
        };
        if !batch.is_empty() && batches.send(batch).await.is_err() {
            return tonic::Status::cancelled("apply task stopped");
        }
        if let Some(status) = ended {
            return status;
        }
    }
}

/// Sends journaled statuses to the hub in batches, acknowledging each
/// batch in the journal once the hub has stored it.
pub async fn report_statuses(link: Link, journal: Arc<StatusJournal>, mut shutdown: Shutdown) {
    let mut backoff = Backoff::default();
    loop {
        let appended = journal.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        let (batch, end) = match journal.unsent() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot read the status journal");
                (vec![], 0)
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = &mut appended => {
                    // Let a burst of statuses gather into one call; they
                    // are durable in the journal meanwhile.
                    tokio::time::sleep(STATUS_LINGER).await;
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                _ = shutdown.recv() => return,
            }
        }
        let updates = batch
            .iter()
            .map(|(id, s)| proto::StatusUpdate {
                event_id: *id,
                status: *s as i32,
            })
            .collect();
        let mut client = HubClient::new(link.current());
        let sent = tokio::select! {
            r = client.report_status(proto::StatusBatch { updates }) => r,
            _ = shutdown.recv() => return,
        };
        match sent {
            Ok(_) => {
                if let Err(e) = journal.ack(end) {
                    warn!(error = %e, "cannot save the status journal's mark");
                }
                backoff.reset();
            }
            Err(e) => {
                let delay = backoff.next_delay().max(Duration::from_millis(200));
                warn!(error = %e, waiting_bytes = journal.backlog(), "cannot report statuses; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
    }
}
