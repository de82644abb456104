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
//!
//! What a stalled subscriber (one that never reads) costs the hub is
//! bounded: its queue of [`SUBSCRIBER_QUEUE`] events, and nothing more.
//! Replay reads a large page ([`REPLAY_PAGE`]) only for a subscriber that
//! keeps up (it emptied its queue while the store was read), and drops
//! what is left of it when the subscriber stops reading for
//! [`REPLAY_STALL`]; otherwise it reads a small page ([`SMALL_PAGE`]) and
//! only once the queue has room for all of it. So a stalled subscriber
//! holds a page for a moment at most, never while it stalls; and a stream
//! that ends while the subscriber stalls (revoked, or closed for a newer
//! stream of its host, see `fanout`) empties its queue at once, without
//! waiting for the subscriber to read it, and leaves only the status that
//! says why. Before these bounds 50 stalled streams over 20,000 bans grew a
//! hub by 87 MB, each holding a 5,000-event page.
use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::sync::{
    broadcast::error::{RecvError, TryRecvError},
    mpsc,
};
use tokio_stream::Stream;
use tonic::Status;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    access::Access,
    db_health::DbGate,
    fanout::{Fanout, MAX_STREAMS_PER_HOST, SubscriberGuard},
    store::Store,
};
use crate::{
    ban::{Event, EventKind},
    proto::wire::EncodedEvent,
    shutdown::Shutdown,
};

/// Events read from the store per replay query by a subscriber that keeps
/// up. Catch-up speed rests on it: with every page 256 events, a node took
/// 2.5 times as long to catch up on 100,000 events as with 5,000.
pub const REPLAY_PAGE: usize = 5000;
/// Events per replay query for a new subscriber, and for one that lags:
/// the query runs only once the queue has room for all of them, so such a
/// subscriber never makes the hub hold a page.
pub const SMALL_PAGE: usize = SUBSCRIBER_QUEUE / 2;
/// How long a subscriber has to take a large replay page before the hub
/// drops the rest of it (read again later, in small pages). A node that
/// keeps up takes 5,000 events in ~20 ms.
pub const REPLAY_STALL: Duration = Duration::from_secs(1);
/// Events buffered per subscriber between the replay/live task and gRPC:
/// all that a stalled subscriber holds in the hub (~35 kB: 256 encoded
/// events, live ones shared with every other subscriber).
pub const SUBSCRIBER_QUEUE: usize = 256;

/// An event as encoded for the wire: a queue slot is 40 bytes (a decoded
/// `proto::Event` took 200), and a live event's bytes are shared.
type Item = Result<EncodedEvent, Status>;

/// The receiving end of a subscription's queue, and the waker of whoever
/// last polled it (so that [`close`] can swap the queue and wake them).
struct Queue {
    rx: mpsc::Receiver<Item>,
    waker: Option<Waker>,
}

/// The response stream of one subscription: its queue, shared with the
/// task that feeds it so that the task can end it at once (see `close`).
/// The task holds it weakly: when gRPC drops the stream (the subscriber
/// went away), the queue goes with it and the task sees its sender closed.
pub struct Events(Arc<Mutex<Queue>>);

impl Stream for Events {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let mut queue = self.0.lock().unwrap();
        let polled = queue.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            crate::metrics::hub::get().deliveries.inc();
        }
        if polled.is_pending() {
            match &mut queue.waker {
                Some(w) => w.clone_from(cx.waker()),
                None => queue.waker = Some(cx.waker().clone()),
            }
        }
        polled
    }
}

/// Ends a stream now, whatever its subscriber has not read: the queue, its
/// events and the memory it grew to are dropped for one that holds only
/// `status`. The subscriber may not read for a long time (gRPC does not
/// even poll a stream whose HTTP/2 window is shut); the hub must not keep
/// its events meanwhile.
fn close(queue: &Weak<Mutex<Queue>>, status: Status) {
    let Some(queue) = queue.upgrade() else { return };
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Err(status));
    let mut queue = queue.lock().unwrap();
    queue.rx = rx;
    if let Some(w) = queue.waker.take() {
        w.wake();
    }
}

/// The events `host` receives after event `after`. The stream is
/// registered with the fan-out before this returns, so a stream the caller
/// holds is already counted (by `Hosts` and `Revoke`); its task runs in a
/// `subscribe` span inside the current one (the request's). `via` is this
/// hub's name, recorded in the store as the hub the host is on while the
/// stream lasts (`None` for an admin following the stream: not a host).
pub fn start(
    store: Arc<dyn Store>,
    fanout: Fanout,
    (access, db): (Access, DbGate),
    (host, via): (String, Option<Arc<str>>),
    after: u64,
    shutdown: Shutdown,
) -> Events {
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let queue = Arc::new(Mutex::new(Queue { rx, waker: None }));
    let span = info_span!("subscribe", after);
    info!(parent: &span, "subscribed");
    let guard = fanout.register(&host);
    let task = run(
        store.clone(),
        fanout.clone(),
        guard,
        (access, db),
        host.clone(),
        after,
        (Arc::downgrade(&queue), tx),
        shutdown,
    );
    tokio::spawn(on_hub(store, fanout, host, via, task).instrument(span));
    Events(queue)
}

/// Whether `subscriber` receives this event: everything but its own bans
/// without a fleet end (unbans, and allow-list changes, which every node
/// must hold before the bans after them; a ban with a fleet end goes to its
/// reporter too, which learns the fleet's end from it; `events_after` has
/// the same rule for replay).
fn visible(event: &Event, subscriber: &str) -> bool {
    event.kind != EventKind::Ban || event.term.ends_ms > 0 || event.added_by != subscriber
}

/// Runs `task` (the stream's) between recording in the store that `host`
/// is on hub `via` and clearing that claim: one write each when the stream
/// opens and ends, none per event. A claim is cleared only when no other
/// stream of the host remains on this hub and no newer claim (this hub's
/// or another's) replaced it; a hub killed with -9 clears nothing, and
/// its next start clears its claims (`Store::release_hub`). Store errors
/// here are logged only: the listing is informational, the stream is not.
async fn on_hub(
    store: Arc<dyn Store>,
    fanout: Fanout,
    host: String,
    via: Option<Arc<str>>,
    task: impl std::future::Future<Output = ()>,
) {
    let Some(hub) = via else { return task.await };
    let since = crate::clock::now_ms();
    // Beside the stream, not before it: replay does not wait for the write.
    let (claimed, ()) = tokio::join!(store.subscribed_via(&host, &hub, since), task);
    if let Err(e) = claimed {
        warn!(error = %e, "cannot record which hub the host is on");
    }
    if fanout.streams(&host) == 0
        && let Err(e) = store.unsubscribed_via(&host, &hub, since).await
    {
        warn!(error = %e, "cannot clear which hub the host is on");
    }
}

/// Feeds the queue until the subscriber goes away, the store fails, the
/// host is revoked or has opened too many streams, the hub's database is
/// lost (`db_health`: UNAVAILABLE, so that the node moves to another hub
/// and resumes there from its last applied id), or the hub shuts down;
/// `guard` unregisters the stream when it returns.
#[allow(clippy::too_many_arguments)]
async fn run(
    store: Arc<dyn Store>,
    fanout: Fanout,
    guard: SubscriberGuard,
    (access, db): (Access, DbGate),
    host: String,
    last: u64,
    (queue, tx): (Weak<Mutex<Queue>>, mpsc::Sender<Item>),
    shutdown: Shutdown,
) {
    let revoked = access.revoked(&host);
    let ended = tokio::select! {
        _ = stream(store, fanout, &guard, host.clone(), last, tx, shutdown) => return,
        _ = revoked => {
            info!("host revoked; ending its subscription");
            Status::permission_denied("this host has been revoked")
        }
        status = db.lost() => {
            info!("database lost; ending the subscription");
            status
        }
        _ = guard.evicted() => {
            info!(
                max = MAX_STREAMS_PER_HOST,
                "closing the host's oldest subscription for a newer one"
            );
            Status::resource_exhausted(format!(
                "{host} opened more than {MAX_STREAMS_PER_HOST} Subscribe streams; \
                 this one, the oldest, was closed for the newest"
            ))
        }
    };
    close(&queue, ended);
}

/// Sends one item unless the hub is shutting down first (a stalled
/// subscriber must not hold shutdown up); false when the stream is over.
async fn send(tx: &mpsc::Sender<Item>, item: Item, shutdown: &mut Shutdown) -> bool {
    if shutdown.is_shutdown() {
        return false;
    }
    // Room in the queue, the usual case: sent without building the wait
    // below (each of its futures registers a waiter; per delivery, that
    // was a third of the hub's CPU in the fan-out).
    let item = match tx.try_send(item) {
        Ok(()) => return true,
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
        Err(mpsc::error::TrySendError::Full(item)) => item,
    };
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        _ = shutdown.recv() => false,
    }
}

async fn stream(
    store: Arc<dyn Store>,
    fanout: Fanout,
    guard: &SubscriberGuard,
    host: String,
    mut last: u64,
    tx: mpsc::Sender<Item>,
    mut shutdown: Shutdown,
) {
    guard.passed(last);
    'replay: loop {
        let mut live = fanout.receiver();
        // Whether the subscriber keeps up: it took events while the store
        // was read, or took a large page in time. Only then is a large page
        // read.
        let mut fast = false;
        // Events in the queue, not counting room reserved and not used.
        let queued = |room: usize| tx.max_capacity().saturating_sub(tx.capacity() + room);
        loop {
            let size = if fast { REPLAY_PAGE } else { SMALL_PAGE };
            // Room for a small page first, then the query: a subscriber
            // that does not read holds up the query, not a page.
            let room = tokio::select! {
                room = tx.reserve_many(SMALL_PAGE) => room,
                _ = shutdown.recv() => return,
            };
            let Ok(room) = room else { return };
            let before = queued(room.len());
            let page = match store.events_after(last, &host, size).await {
                Ok(page) => page,
                Err(e) => {
                    drop(room);
                    send(&tx, Err(Status::unavailable(e.to_string())), &mut shutdown).await;
                    return;
                }
            };
            fast |= queued(room.len()) < before;
            let mut events = page.iter();
            // `room` first: zip must not take an event it has no slot for.
            for (slot, event) in room.zip(events.by_ref()) {
                slot.send(Ok(EncodedEvent::of(event)));
                last = event.id;
            }
            let deadline = tokio::time::Instant::now() + REPLAY_STALL;
            let mut stalled = false;
            for event in events {
                let item = Ok(EncodedEvent::of(event));
                let sent = tokio::time::timeout_at(deadline, send(&tx, item, &mut shutdown));
                match sent.await {
                    Ok(true) => last = event.id,
                    Ok(false) => return,
                    Err(_) => {
                        (fast, stalled) = (false, true);
                        break;
                    }
                }
            }
            guard.passed(last);
            if stalled {
                // The rest of the page was dropped, to be read again.
                debug!(last, "subscriber slow; replaying in small pages");
            } else if page.len() < size {
                break;
            }
        }
        loop {
            // An event already in the ring is taken without a wait (see
            // `send`); a subscriber gone or a shutdown is then seen by
            // `send`, at the next event it sends.
            let received = match live.try_recv() {
                Ok(event) => Ok(event),
                Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
                Err(TryRecvError::Empty) => tokio::select! {
                    r = live.recv() => r,
                    _ = tx.closed() => return,
                    _ = shutdown.recv() => return,
                },
            };
            match received {
                Ok(live) if live.event.id <= last => {}
                Ok(live) => {
                    let event = &live.event;
                    if visible(event, &host) {
                        if !send(&tx, Ok(live.wire.clone()), &mut shutdown).await {
                            return;
                        }
                        tracing::debug!(target: crate::hops::TARGET, hop = "sent", hop_id = event.id, hop_host = %host, hop_us = crate::hops::now_us());
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
