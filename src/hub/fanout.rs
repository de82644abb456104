//! Fan-out of committed events to live subscribers, and who is subscribed.
//!
//! One bounded broadcast ring holds the latest events, each an `Arc` shared
//! by every subscriber; the hub's memory does not grow with subscribers or
//! with a slow one. A subscriber that falls more than [`RING`] events behind
//! loses its place in the ring and goes back to replay from the store (see
//! `subscription`), so nothing is dropped, only re-read.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::broadcast;

use crate::ban::Event;

/// Events kept for live subscribers.
pub const RING: usize = 8192;

/// Per subscribed host: open streams, and the furthest event id any of
/// them has passed (for the subscription lag in `Hosts`).
#[derive(Default)]
struct Subscribed {
    streams: usize,
    position: Arc<AtomicU64>,
}

type Registry = Arc<Mutex<HashMap<String, Subscribed>>>;

/// The broadcast ring of committed events and the registry of subscribed hosts; cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    tx: broadcast::Sender<Arc<Event>>,
    subscribed: Registry,
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout {
            tx: broadcast::channel(RING).0,
            subscribed: Arc::default(),
        }
    }
}

impl Fanout {
    /// Hands a committed event to every live subscriber. Called by the
    /// committer only, in id order.
    pub fn publish(&self, event: Arc<Event>) {
        let _ = self.tx.send(event);
    }

    /// A receiver that sees every event published from now on.
    pub fn receiver(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Registers a subscribed host until the guard is dropped.
    pub fn register(&self, host: &str) -> SubscriberGuard {
        let mut map = self.subscribed.lock().unwrap();
        let entry = map.entry(host.to_string()).or_default();
        entry.streams += 1;
        SubscriberGuard {
            host: host.to_string(),
            position: entry.position.clone(),
            subscribed: self.subscribed.clone(),
        }
    }

    /// The furthest event a host's subscription has passed, if subscribed.
    pub fn position(&self, host: &str) -> Option<u64> {
        let map = self.subscribed.lock().unwrap();
        map.get(host).map(|s| s.position.load(Ordering::Relaxed))
    }

    /// Open subscription streams of one host.
    pub fn streams(&self, host: &str) -> usize {
        let map = self.subscribed.lock().unwrap();
        map.get(host).map_or(0, |s| s.streams)
    }

    /// Open subscription streams, all hosts together.
    pub fn subscriber_count(&self) -> usize {
        self.subscribed
            .lock()
            .unwrap()
            .values()
            .map(|s| s.streams)
            .sum()
    }
}

/// Unregisters a subscriber when its stream ends, however it ends.
pub struct SubscriberGuard {
    host: String,
    position: Arc<AtomicU64>,
    subscribed: Registry,
}

impl SubscriberGuard {
    /// Records that the stream passed event `id`.
    pub fn passed(&self, id: u64) {
        self.position.fetch_max(id, Ordering::Relaxed);
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let mut map = self.subscribed.lock().unwrap();
        if let Some(s) = map.get_mut(&self.host) {
            s.streams -= 1;
            if s.streams == 0 {
                map.remove(&self.host);
            }
        }
    }
}
