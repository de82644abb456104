//! Outbox -> hub: streams pending reports over `Publish` and drops each from
//! the outbox once the hub acknowledges its durable commit.
//!
//! After any failure the stream is opened again (with backoff) and every
//! unacknowledged report is sent again; the hub recognises re-sends by
//! (host, seq). In flight per stream is bounded, so neither side's queues
//! can fill while the other waits.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::link::Link;
use tracing::{debug, info, warn};

use super::{link::Backoff, outbox::Outbox};
use crate::{proto::hub_client::HubClient, shutdown::Shutdown};

/// Reports sent but not yet acknowledged, per stream.
const MAX_IN_FLIGHT: u64 = 1000;
/// How often the acked mark is written while acks flow.
const ACKED_FLUSH: Duration = Duration::from_millis(200);
/// How long shutdown waits for acks of reports already sent.
const DRAIN: Duration = Duration::from_secs(3);

/// Streams the outbox to the hub until `shutdown`, reconnecting with backoff;
/// `connected` tells whether a stream is up.
pub async fn run(
    outbox: Arc<Outbox>,
    link: Link,
    connected: Arc<AtomicBool>,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::default();
    while !shutdown.is_shutdown() {
        match stream_once(
            &outbox,
            link.current(),
            &connected,
            &mut backoff,
            &mut shutdown,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => {
                connected.store(false, Ordering::Relaxed);
                let delay = backoff.next_delay();
                warn!(error = %e, pending = outbox.pending(), retry_in = ?delay, "publish to hub failed; reports stay queued in the outbox");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.recv() => {}
                }
            }
        }
    }
    connected.store(false, Ordering::Relaxed);
    if let Err(e) = outbox.flush_acked() {
        warn!(error = %e, "cannot save the outbox's acked mark");
    }
    debug!("publisher stopped");
}

/// One `Publish` stream; `Ok` only when shutting down.
async fn stream_once(
    outbox: &Outbox,
    channel: Channel,
    connected: &AtomicBool,
    backoff: &mut Backoff,
    shutdown: &mut Shutdown,
) -> Result<(), tonic::Status> {
    let mut client = HubClient::new(channel);
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT as usize);
    let response = tokio::select! {
        r = client.publish(ReceiverStream::new(rx)) => r?,
        _ = shutdown.recv() => return Ok(()),
    };
    // Number new reports above anything the hub holds from us (our
    // outbox may have been reset, from a backup say).
    if let Some(last) = response
        .metadata()
        .get(crate::proto::LAST_SEQ_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        outbox.raise_next_seq(last + 1);
    }
    let mut acks = response.into_inner();
    connected.store(true, Ordering::Relaxed);
    info!(pending = outbox.pending(), "publishing to hub");
    // Highest seq sent on this stream, and how many await their ack (the
    // hub answers every report, in order).
    let (mut sent, mut in_flight) = (0u64, 0u64);
    let mut last_flush = Instant::now();
    loop {
        let appended = outbox.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        if in_flight < MAX_IN_FLIGHT {
            for mut report in outbox.pending_after(sent, (MAX_IN_FLIGHT - in_flight) as usize) {
                sent = report.seq;
                super::spool::strip(&mut report);
                in_flight += 1;
                tx.send(report)
                    .await
                    .map_err(|_| tonic::Status::unavailable("stream closed"))?;
            }
        }
        tokio::select! {
            _ = &mut appended => {}
            ack = acks.message() => {
                let Some(ack) = ack? else {
                    return Err(tonic::Status::unavailable("hub ended the publish stream"));
                };
                backoff.reset();
                if !ack.allowed_by.is_empty() {
                    // This host's fail2ban keeps its own ban; the fleet does not follow.
                    warn!(seq = ack.seq, allowed_by = %ack.allowed_by, reason = %ack.rejected,
                        "hub refused a report: the address is on the fleet allow-list; this host keeps its own ban, no other host bans it");
                } else if !ack.rejected.is_empty() {
                    warn!(seq = ack.seq, reason = %ack.rejected, "hub refused a report; dropping it");
                }
                in_flight = in_flight.saturating_sub(u64::from(ack.count.max(1)));
                outbox.ack(ack.seq).map_err(|e| tonic::Status::internal(e.to_string()))?;
                if last_flush.elapsed() >= ACKED_FLUSH {
                    outbox.flush_acked().map_err(|e| tonic::Status::internal(e.to_string()))?;
                    last_flush = Instant::now();
                }
            }
            _ = shutdown.recv() => {
                // Stop sending; take the acks of what is already in flight.
                drop(tx);
                let _ = tokio::time::timeout(DRAIN, async {
                    while let Ok(Some(ack)) = acks.message().await {
                        let _ = outbox.ack(ack.seq);
                    }
                })
                .await;
                return Ok(());
            }
        }
    }
}
