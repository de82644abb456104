//! This host's statuses -> hub: sends what the status journal holds in
//! batches, and acknowledges each batch in the journal once the hub has
//! stored it.
//!
//! Contract: a status reaches the hub at least once (the journal keeps it
//! across crashes until acknowledged, and the hub's upsert makes a re-send
//! harmless); bursts gather for [`STATUS_LINGER`] into one call, and
//! while statuses keep coming calls start at most every [`STATUS_INTERVAL`]
//! (the hub only stores them for `banmesh list` and the `ip_table` view:
//! nothing waits on a status, and each call costs the node a request over
//! TLS, a journal read and a mark written, issue 19); a call
//! that failed (hub unreachable, store down) is retried, at once on the
//! next hub when the one in use is gone, with backoff once every hub
//! failed, the statuses waiting in the journal; a batch the hub refuses as invalid
//! (INVALID_ARGUMENT: it will never take it) is logged and dropped, so it
//! cannot hold up every later status.
use std::{sync::Arc, time::Duration};

use tracing::warn;

use super::{
    link::{Backoff, Link, Retry},
    status_journal::StatusJournal,
};
use crate::{
    proto::{self, hub_client::HubClient},
    shutdown::Shutdown,
};

/// How long statuses gather before one `ReportStatus` call.
const STATUS_LINGER: Duration = Duration::from_millis(25);
/// Least time from one call's start to the next while statuses keep
/// coming: a node applying a ban every 10 ms made ~40 calls a second with
/// [`STATUS_LINGER`] alone (0.4 a ban); with this, 4. A status reaches
/// the hub at most this much later than with the linger alone.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// How long the reporter sleeps with nothing to send before looking again.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Sends journaled statuses to the hub in batches, acknowledging each
/// batch in the journal once the hub has stored it.
pub async fn run(link: Link, journal: Arc<StatusJournal>, mut shutdown: Shutdown) {
    let mut backoff = Backoff::default();
    // When the last call started, and whether it left statuses behind.
    let mut last_call: Option<tokio::time::Instant> = None;
    let mut draining = false;
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
                _ = tokio::time::sleep(IDLE_CHECK) => continue,
                _ = shutdown.recv() => return,
            }
        }
        // Statuses that came soon after the last call wait for the
        // interval, and the ones that come meanwhile join them. A backlog
        // (a catch-up's statuses, more than one call holds) goes call
        // after call: the interval spaces out a trickle, it does not slow
        // a drain (100,000 statuses would take 25 calls x 250 ms).
        if !draining
            && let Some(next) = last_call.map(|at| at + STATUS_INTERVAL)
            && tokio::time::Instant::now() < next
        {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => continue,
                _ = shutdown.recv() => return,
            }
        }
        last_call = Some(tokio::time::Instant::now());
        draining = journal.written_past(end);
        let updates = batch
            .iter()
            .map(|(id, s)| proto::StatusUpdate {
                event_id: *id,
                status: *s as i32,
            })
            .collect();
        let route = link.current();
        let mut client = HubClient::new(route.channel.clone());
        let sent = tokio::select! {
            r = client.report_status(proto::StatusBatch { updates }) => r,
            _ = shutdown.recv() => return,
        };
        match sent {
            Ok(_) => {
                if let Err(e) = journal.ack(end) {
                    warn!(error = %e, "cannot save the status journal's mark");
                }
                link.succeeded(&route);
                backoff.reset();
            }
            // The hub refuses a batch it can never take (a status for an
            // event it does not hold, after its store was restored from a
            // backup, say, or a status code an older hub does not know):
            // sending it again would block every later status for good, so
            // it is logged and dropped.
            Err(e) if e.code() == tonic::Code::InvalidArgument => {
                warn!(
                    error = %e,
                    count = batch.len(),
                    first = batch.first().map(|s| s.0),
                    last = batch.last().map(|s| s.0),
                    "the hub refused this batch of statuses; dropping it"
                );
                if let Err(e) = journal.ack(end) {
                    warn!(error = %e, "cannot save the status journal's mark");
                }
                backoff.reset();
            }
            Err(e) => {
                // The next hub at once when this one is gone.
                let delay = match link.failed(&route, &e) {
                    Retry::Now => Duration::ZERO,
                    Retry::Backoff => backoff.next_delay().max(Duration::from_millis(200)),
                };
                warn!(error = %e, waiting_bytes = journal.backlog(), "cannot report statuses; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
    }
}
