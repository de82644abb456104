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
use tonic::Status;
use tracing::{debug, info};

use super::{access::Access, fanout::Fanout, store::Store};
use crate::{
    ban::{Event, EventKind},
    proto,
    shutdown::Shutdown,
};

/// Events read from the store per replay query.
pub const REPLAY_PAGE: usize = 5000;

/// Whether `subscriber` receives this event: not its own bans.
fn visible(event: &Event, subscriber: &str) -> bool {
    event.kind == EventKind::Unban || event.added_by != subscriber
}

/// Feeds `tx` until the subscriber goes away, the store fails or the hub
/// shuts down.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: Arc<dyn Store>,
    fanout: Fanout,
    access: Access,
    host: String,
    last: u64,
    tx: mpsc::Sender<Result<proto::Event, Status>>,
    shutdown: Shutdown,
) {
    let revoked = access.revoked(&host);
    tokio::select! {
        _ = stream(store, fanout, host, last, tx.clone(), shutdown) => {}
        _ = revoked => {
            info!("host revoked; ending its subscription");
            let _ = tx.send(Err(Status::permission_denied("this host has been revoked"))).await;
        }
    }
}

async fn stream(
    store: Arc<dyn Store>,
    fanout: Fanout,
    host: String,
    mut last: u64,
    tx: mpsc::Sender<Result<proto::Event, Status>>,
    mut shutdown: Shutdown,
) {
    let guard = fanout.register(&host);
    guard.passed(last);
    'replay: loop {
        let mut live = fanout.receiver();
        loop {
            let page = match store.events_after(last, &host, REPLAY_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                    return;
                }
            };
            for event in &page {
                if tx.send(Ok(event.to_proto())).await.is_err() {
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
                    if visible(&event, &host) && tx.send(Ok(event.to_proto())).await.is_err() {
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
