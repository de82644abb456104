//! Fan-out of committed events to live subscribers, and who is subscribed.
//!
//! One bounded broadcast ring holds the latest events, each an `Arc` shared
//! by every subscriber; the hub's memory does not grow with subscribers or
//! with a slow one. A subscriber that falls more than [`RING`] events behind
//! loses its place in the ring and goes back to replay from the store (see
//! `subscription`), so nothing is dropped, only re-read.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use crate::ban::Event;

/// Events kept for live subscribers.
pub const RING: usize = 8192;

#[derive(Clone)]
pub struct Fanout {
    tx: broadcast::Sender<Arc<Event>>,
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
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
        *self
            .subscribed
            .lock()
            .unwrap()
            .entry(host.to_string())
            .or_default() += 1;
        SubscriberGuard {
            host: host.to_string(),
            subscribed: self.subscribed.clone(),
        }
    }

    pub fn is_subscribed(&self, host: &str) -> bool {
        self.subscribed.lock().unwrap().contains_key(host)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribed.lock().unwrap().values().sum()
    }
}

/// Unregisters a subscriber when its stream ends, however it ends.
pub struct SubscriberGuard {
    host: String,
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let mut map = self.subscribed.lock().unwrap();
        if let Some(n) = map.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.host);
            }
        }
    }
}
