//! One subscriber's stream: replay from the store, then live, no gap and no
//! duplicate at the switch.
//!
//! Why it holds: the live receiver is taken *before* the store is read. An
//! event committed before that moment is in the store read; one committed
//! after is in the receiver (and maybe in the store read too). The stream
//! skips every event at or below the last id it sent, so each event goes
//! out once, in id order. When the receiver lags (the subscriber is slower
//! than the ring), the subscription starts over from the store at its last
//! sent id: the hub never buffers for a slow subscriber.
use std::sync::Arc;

use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{Instrument, debug, info, info_span};

use super::{
    access::Access,
    fanout::{Fanout, SubscriberGuard},
    store::Store,
};
use crate::{
    ban::{Event, EventKind},
    proto,
    shutdown::Shutdown,
};

/// Events read from the store per replay query.
pub const REPLAY_PAGE: usize = 5000;
/// Events buffered per subscriber between the replay/live task and gRPC.
pub const SUBSCRIBER_QUEUE: usize = 256;

/// The events `host` receives after event `after`. The stream is
/// registered with the fan-out before this returns, so a stream the caller
/// holds is already counted (by `Hosts` and `Revoke`); its task runs in a
/// `subscribe` span inside the current one (the request's).
pub fn start(
    store: Arc<dyn Store>,
    fanout: Fanout,
    access: Access,
    host: String,
    after: u64,
    shutdown: Shutdown,
) -> ReceiverStream<Result<proto::Event, Status>> {
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let span = info_span!("subscribe", after);
    info!(parent: &span, "subscribed");
    let guard = fanout.register(&host);
    tokio::spawn(run(store, fanout, guard, access, host, after, tx, shutdown).instrument(span));
    ReceiverStream::new(rx)
}

/// Whether `subscriber` receives this event: everything but its own bans
/// (unbans, and allow-list changes, which every node must hold before the
/// bans after them; `events_after` has the same rule for replay).
fn visible(event: &Event, subscriber: &str) -> bool {
    event.kind != EventKind::Ban || event.added_by != subscriber
}

/// Feeds `tx` until the subscriber goes away, the store fails or the hub
/// shuts down; `guard` unregisters the stream when it returns.
#[allow(clippy::too_many_arguments)]
async fn run(
    store: Arc<dyn Store>,
    fanout: Fanout,
    guard: SubscriberGuard,
    access: Access,
    host: String,
    last: u64,
    tx: mpsc::Sender<Result<proto::Event, Status>>,
    shutdown: Shutdown,
) {
    let revoked = access.revoked(&host);
    tokio::select! {
        _ = stream(store, fanout, guard, host, last, tx.clone(), shutdown) => {}
        _ = revoked => {
            info!("host revoked; ending its subscription");
            let denied = tx.send(Err(Status::permission_denied("this host has been revoked")));
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), denied).await;
        }
    }
}

/// Sends one item unless the hub is shutting down first (a stalled
/// subscriber must not hold shutdown up); false when the stream is over.
async fn send(
    tx: &mpsc::Sender<Result<proto::Event, Status>>,
    item: Result<proto::Event, Status>,
    shutdown: &mut Shutdown,
) -> bool {
    if shutdown.is_shutdown() {
        return false;
    }
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        _ = shutdown.recv() => false,
    }
}

async fn stream(
    store: Arc<dyn Store>,
    fanout: Fanout,
    guard: SubscriberGuard,
    host: String,
    mut last: u64,
    tx: mpsc::Sender<Result<proto::Event, Status>>,
    mut shutdown: Shutdown,
) {
    guard.passed(last);
    'replay: loop {
        let mut live = fanout.receiver();
        loop {
            let page = match store.events_after(last, &host, REPLAY_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    send(&tx, Err(Status::unavailable(e.to_string())), &mut shutdown).await;
                    return;
                }
            };
            for event in &page {
                if !send(&tx, Ok(event.to_proto()), &mut shutdown).await {
                    return;
                }
                last = event.id;
                guard.passed(last);
            }
            if page.len() < REPLAY_PAGE {
                break;
            }
            debug!(last, "replay page sent");
        }
        loop {
            let received = tokio::select! {
                r = live.recv() => r,
                _ = tx.closed() => return,
                _ = shutdown.recv() => return,
            };
            match received {
                Ok(event) if event.id <= last => {}
                Ok(event) => {
                    if visible(&event, &host)
                        && !send(&tx, Ok(event.to_proto()), &mut shutdown).await
                    {
                        return;
                    }
                    last = event.id;
                    guard.passed(last);
                }
                Err(RecvError::Lagged(missed)) => {
                    info!(
                        missed,
                        last, "subscriber fell behind; replaying from the store"
                    );
                    continue 'replay;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}
