//! Hub -> this host: subscribes from the last applied event and hands the
//! events, in id order and in batches, to the apply task.
//!
//! Contract: every event after the [`Position`] reaches the apply task once
//! per subscription, in id order. After a lost stream the subscriber
//! resubscribes (with backoff) from the last event it received; batches
//! still queued are applied first, and the apply task skips anything at or
//! below its position, so a resubscription never applies an event twice.
//! A full apply queue makes the subscriber wait; the hub then moves it back
//! to replay from the store instead of buffering.
//!
//! When the link moves to another hub (the one in use failed, or a
//! preferred one serves again) the stream ends and the subscriber
//! resubscribes there from the same point: event ids are the same on
//! every hub, so a move applies nothing twice and skips nothing.
use std::{sync::Arc, time::Duration};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::{
    link::{Backoff, Link},
    position::Position,
};
use crate::{
    ban::Event,
    proto::{self, hub_client::HubClient},
    shutdown::Shutdown,
};

/// Most events applied in one write.
const APPLY_BATCH: usize = 4096;
/// How long a subscription must have lasted to count as a success.
const SETTLED: Duration = Duration::from_secs(1);

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
        let route = link.current();
        let mut client = HubClient::new(route.channel.clone());
        let result = tokio::select! {
            r = client.subscribe(proto::SubscribeRequest { after_event_id: after }) => r,
            _ = shutdown.recv() => break,
        };
        let error = match result {
            Ok(stream) => {
                info!(after, hub = %link.hubs()[route.hub], "subscribed to hub");
                crate::metrics::node::get().hub_connected.set(1);
                crate::metrics::node::get().hub_connects.inc();
                // A stream a hub takes and ends at once (its store down,
                // say) is not a success: hubs that all do that are
                // retried with backoff, not in a tight loop.
                let settled = || {
                    link.succeeded(&route);
                    backoff.reset();
                };
                follow(
                    stream.into_inner(),
                    &mut received,
                    &position,
                    &batches,
                    (&mut shutdown, link.moved(&route), settled),
                )
                .await
            }
            Err(e) => Some(e),
        };
        if shutdown.is_shutdown() {
            break;
        }
        crate::metrics::node::get().hub_connected.set(0);
        let Some(error) = error else {
            debug!("the link moved to another hub; resubscribing there");
            continue;
        };
        let delay = backoff.after(link.failed(&route, &error));
        warn!(error = %error, hub = %link.hubs()[route.hub], retry_in = ?delay, "subscription to hub lost");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.recv() => {}
        }
    }
    debug!("subscriber stopped");
}

/// Reads events until the stream ends (its error) or the link moves to
/// another hub (`None`). Both are noticed only between batches, never
/// while a batch is handed on: an event counted as received is always
/// queued for the apply task. `settled` is called once the stream has
/// lasted [`SETTLED`].
async fn follow(
    mut stream: tonic::Streaming<proto::Event>,
    received: &mut u64,
    position: &Position,
    batches: &mpsc::Sender<Vec<Event>>,
    (shutdown, moved, settled): (
        &mut Shutdown,
        impl std::future::Future<Output = ()>,
        impl FnOnce(),
    ),
) -> Option<tonic::Status> {
    tokio::pin!(moved);
    let settle = tokio::time::sleep(SETTLED);
    tokio::pin!(settle);
    let mut settled = Some(settled);
    loop {
        let first = tokio::select! {
            m = stream.next() => m,
            _ = shutdown.recv() => return Some(tonic::Status::cancelled("shutting down")),
            // Batches already handed on stay queued; the next stream
            // starts after the last event received.
            _ = &mut moved => return None,
            _ = &mut settle, if settled.is_some() => {
                if let Some(f) = settled.take() {
                    f();
                }
                continue;
            }
        };
        let mut batch = Vec::new();
        let mut next = first;
        let ended = loop {
            match next {
                Some(Ok(e)) => match Event::from_proto(&e) {
                    Ok(ev) if ev.id > *received => {
                        *received = ev.id;
                        position.note_received(ev.id);
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
            return Some(tonic::Status::cancelled("apply task stopped"));
        }
        if let Some(status) = ended {
            return Some(status);
        }
    }
}
