//! Outbox -> hub: streams pending reports over `Publish` and drops each from
//! the outbox once the hub acknowledges its durable commit.
//!
//! After any failure the stream is opened again (on the next hub when the
//! one in use is gone, with backoff once every hub failed) and every
//! unacknowledged report is sent again; the hub recognises re-sends by
//! (host, seq), in the store all hubs share, so a re-send through another
//! hub is recognised too. When the link moves to another hub, the stream
//! stops sending, takes the acks of what is in flight, and the next stream
//! opens on the new hub. In flight per stream is bounded, so neither side's queues
//! can fill while the other waits.
//!
//! The hub's per-host rate limit ends a stream with RESOURCE_EXHAUSTED
//! and a wait (`banmesh-retry-after-ms`) after acking what it took. The
//! publisher then keeps every unacked report in the outbox, waits exactly
//! that long (no backoff, no busy retry: the hub is up, it asked for time),
//! and opens a new stream that starts with a small window
//! ([`THROTTLED_WINDOW`], doubling with each ack), so it does not push a
//! thousand reports the hub will not read. It logs being throttled once,
//! and once more when the held-back reports have all gone out. Each stream
//! tells the hub the outbox's depth (`banmesh-backlog`) for `hub hosts`.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use super::{
    link::{Backoff, Link, Route},
    outbox::Outbox,
};
use crate::{
    proto::{BACKLOG_HEADER, RETRY_AFTER_HEADER, hub_client::HubClient},
    shutdown::Shutdown,
};

/// Reports sent but not yet acknowledged, per stream.
const MAX_IN_FLIGHT: u64 = 1000;
/// Reports in flight when a stream opens after the hub throttled us.
const THROTTLED_WINDOW: u64 = 8;
/// The longest wait a hub may ask for; a longer one is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
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
    let mut throttled = Throttled::default();
    while !shutdown.is_shutdown() {
        let route = link.current();
        match stream_once(
            &outbox,
            (&link, &route),
            &connected,
            (&mut backoff, &mut throttled),
            &mut shutdown,
        )
        .await
        {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::Moved) => {
                debug!(
                    pending = outbox.pending(),
                    "the link moved to another hub; publishing there"
                );
            }
            Err(e) => {
                let delay = match retry_after(&e) {
                    // Throttled: still connected, and the wait is the hub's.
                    Some(wait) => {
                        throttled.refused(&e, wait, outbox.pending());
                        wait
                    }
                    None => {
                        connected.store(false, Ordering::Relaxed);
                        let delay = backoff.after(link.failed(&route, &e));
                        warn!(error = %e, hub = %link.hubs()[route.hub], pending = outbox.pending(), retry_in = ?delay, "publish to hub failed; reports stay queued in the outbox");
                        delay
                    }
                };
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

/// How a stream ended without an error.
enum Ended {
    /// The node is shutting down.
    Shutdown,
    /// The link moved to another hub: open the next stream there.
    Moved,
}

/// The wait a RESOURCE_EXHAUSTED from the hub's rate limit asks for.
fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

/// Whether the hub is holding our reports back, for logging it once (not
/// per report or per stream) and for the window of the next stream.
#[derive(Debug, Default)]
struct Throttled {
    since: Option<Instant>,
}

impl Throttled {
    /// The hub refused a report and asked us to wait `wait`.
    fn refused(&mut self, status: &Status, wait: Duration, pending: usize) {
        if self.since.is_some() {
            debug!(pending, retry_in = ?wait, "still throttled by the hub");
            return;
        }
        self.since = Some(Instant::now());
        warn!(pending, retry_in = ?wait, hub = %status.message(),
            "the hub is throttling this host (its per-host report rate limit): reports stay in the outbox and go out as the limit allows");
    }

    /// The outbox is empty: whatever was held back has gone out.
    fn drained(&mut self) {
        if let Some(since) = self.since.take() {
            info!(throttled_for = ?since.elapsed(), "the reports the hub held back have all been sent");
        }
    }

    /// Reports in flight when a stream opens.
    fn window(&self) -> u64 {
        if self.since.is_some() {
            THROTTLED_WINDOW
        } else {
            MAX_IN_FLIGHT
        }
    }
}

/// One `Publish` stream on `route`; `Ok` when shutting down or when the
/// link moved to another hub.
async fn stream_once(
    outbox: &Outbox,
    (link, route): (&Link, &Route),
    connected: &AtomicBool,
    (backoff, throttled): (&mut Backoff, &mut Throttled),
    shutdown: &mut Shutdown,
) -> Result<Ended, tonic::Status> {
    let mut client = HubClient::new(route.channel.clone());
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT as usize);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Ok(v) = outbox.pending().to_string().parse() {
        request.metadata_mut().insert(BACKLOG_HEADER, v);
    }
    let response = tokio::select! {
        r = client.publish(request) => r?,
        _ = shutdown.recv() => return Ok(Ended::Shutdown),
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
    info!(pending = outbox.pending(), hub = %link.hubs()[route.hub], "publishing to hub");
    let moved = link.moved(route);
    tokio::pin!(moved);
    let mut acked = false;
    // Highest seq sent on this stream, and how many await their ack (the
    // hub answers every report, in order), of at most `window`.
    let (mut sent, mut in_flight) = (0u64, 0u64);
    let mut window = throttled.window();
    // The hub stopped reading (it ends the stream, maybe throttled): send
    // nothing more, and read on for the acks and the status that says why.
    let mut closed = false;
    let mut last_flush = Instant::now();
    loop {
        let appended = outbox.appended.notified();
        tokio::pin!(appended);
        appended.as_mut().enable();
        if in_flight < window && !closed {
            for mut report in outbox.pending_after(sent, (window - in_flight) as usize) {
                sent = report.seq;
                super::spool::strip(&mut report);
                in_flight += 1;
                if tx.send(report).await.is_err() {
                    closed = true;
                    break;
                }
            }
        }
        tokio::select! {
            _ = &mut appended => {}
            ack = acks.message() => {
                let Some(ack) = ack? else {
                    return Err(tonic::Status::unavailable("hub ended the publish stream"));
                };
                backoff.reset();
                if !acked {
                    acked = true;
                    link.succeeded(route);
                }
                if !ack.allowed_by.is_empty() {
                    // This host's fail2ban keeps its own ban; the fleet does not follow.
                    warn!(seq = ack.seq, allowed_by = %ack.allowed_by, reason = %ack.rejected,
                        "hub refused a report: the address is on the fleet allow-list; this host keeps its own ban, no other host bans it");
                } else if !ack.rejected.is_empty() {
                    warn!(seq = ack.seq, reason = %ack.rejected, "hub refused a report; dropping it");
                }
                in_flight = in_flight.saturating_sub(u64::from(ack.count.max(1)));
                window = (window * 2).min(MAX_IN_FLIGHT);
                outbox.ack(ack.seq).map_err(|e| tonic::Status::internal(e.to_string()))?;
                if throttled.since.is_some() && outbox.pending() == 0 {
                    throttled.drained();
                }
                if last_flush.elapsed() >= ACKED_FLUSH {
                    outbox.flush_acked().map_err(|e| tonic::Status::internal(e.to_string()))?;
                    last_flush = Instant::now();
                }
            }
            _ = shutdown.recv() => {
                drain(outbox, tx, &mut acks).await;
                return Ok(Ended::Shutdown);
            }
            // Let this hub commit what it has before the next one gets
            // the rest, so the two never race on one report.
            _ = &mut moved => {
                drain(outbox, tx, &mut acks).await;
                return Ok(Ended::Moved);
            }
        }
    }
}

/// Stops sending on a stream and takes the acks of what is already in
/// flight, for at most [`DRAIN`]; what is not acked stays in the outbox.
async fn drain(
    outbox: &Outbox,
    tx: mpsc::Sender<crate::proto::Report>,
    acks: &mut tonic::Streaming<crate::proto::Ack>,
) {
    drop(tx);
    let _ = tokio::time::timeout(DRAIN, async {
        while let Ok(Some(ack)) = acks.message().await {
            let _ = outbox.ack(ack.seq);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exhausted(ms: &str) -> Status {
        let mut s = Status::resource_exhausted("past the limit");
        s.metadata_mut()
            .insert(RETRY_AFTER_HEADER, ms.parse().unwrap());
        s
    }

    #[test]
    fn only_the_rate_limits_answer_is_a_wait() {
        assert_eq!(
            retry_after(&exhausted("950")),
            Some(Duration::from_millis(950))
        );
        assert_eq!(retry_after(&exhausted("99999999")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&exhausted("soon")), None);
        // Without the trailer (a message too big, say) it is a failure.
        assert_eq!(retry_after(&Status::resource_exhausted("big")), None);
        assert_eq!(retry_after(&Status::unavailable("down")), None);
    }

    #[test]
    fn a_throttled_stream_starts_small() {
        let mut t = Throttled::default();
        assert_eq!(t.window(), MAX_IN_FLIGHT);
        t.refused(&exhausted("950"), Duration::from_millis(950), 10);
        t.refused(&exhausted("950"), Duration::from_millis(950), 10);
        assert_eq!(t.window(), THROTTLED_WINDOW);
        t.drained();
        assert_eq!(t.window(), MAX_IN_FLIGHT);
    }
}
