//! Fan-out of committed events to live subscribers, and who is subscribed.
//!
//! One bounded broadcast ring holds the latest events, each an `Arc` shared
//! by every subscriber, with its wire encoding made once when it is
//! published (every subscriber sends the same bytes); the hub's memory does
//! not grow with subscribers or with a slow one. A subscriber that falls more than [`RING`] events behind
//! loses its place in the ring and goes back to replay from the store (see
//! `subscription`), so nothing is dropped, only re-read.
//!
//! A host holds at most [`MAX_STREAMS_PER_HOST`] streams: a new one past
//! the cap closes that host's oldest. The oldest goes, not the newest,
//! because a node that reconnects after a network fault opens its new
//! stream while the hub still holds the old one (until keepalive finds it
//! dead): refusing the newest would lock a healthy node out for that long.
//! Closing the oldest gives a certificate's holder power over its own
//! streams only, which it has anyway.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{Notify, broadcast};

use crate::{ban::Event, proto::wire::EncodedEvent};

/// Events kept for live subscribers.
pub const RING: usize = 8192;

/// Most Subscribe streams one host (or admin) holds at once. A node holds
/// one; the rest leaves room for an operator's `grpcurl` and for a stream
/// the hub has not yet seen die. 2,000 stalled streams from one
/// certificate took a hub from 0.35 GB to 1.87 GB before this cap.
pub const MAX_STREAMS_PER_HOST: usize = 4;

/// Per subscribed host: open streams, oldest first (each with the signal
/// that closes it), and the furthest event id any of them has passed (for
/// the subscription lag in `Hosts`).
#[derive(Default)]
struct Subscribed {
    streams: VecDeque<(u64, Arc<Notify>)>,
    position: Arc<AtomicU64>,
}

type Registry = Arc<Mutex<HashMap<String, Subscribed>>>;

/// One published event, as the ring holds it: the event (a subscriber
/// filters on it) and its encoding (what a subscriber sends).
#[derive(Debug)]
pub struct Live {
    /// The committed event.
    pub event: Arc<Event>,
    /// Its `proto::Event` encoding, encoded once for every subscriber.
    pub wire: EncodedEvent,
}

/// The live ring and the registry of subscribed hosts; clones share both.
#[derive(Clone)]
pub struct Fanout {
    tx: broadcast::Sender<Arc<Live>>,
    subscribed: Registry,
    /// Numbers streams, so that a guard finds its own entry.
    next_stream: Arc<AtomicU64>,
    /// The last event id published (the metrics' lag is this less a position).
    head: Arc<AtomicU64>,
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout {
            tx: broadcast::channel(RING).0,
            subscribed: Arc::default(),
            next_stream: Arc::default(),
            head: Arc::default(),
        }
    }
}

impl Fanout {
    /// Hands a committed event to every live subscriber. Called by the
    /// committer only, in id order.
    pub fn publish(&self, event: Arc<Event>) {
        tracing::debug!(target: crate::hops::TARGET, hop = "commit", hop_id = event.id, hop_ip = %event.ban.ip, hop_us = crate::hops::now_us());
        self.head.fetch_max(event.id, Ordering::Relaxed);
        let wire = EncodedEvent::of(&event);
        let _ = self.tx.send(Arc::new(Live { event, wire }));
    }

    /// The last event id published live.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Relaxed)
    }

    /// Every subscribed host and the furthest event id it has passed.
    pub fn positions(&self) -> Vec<(String, u64)> {
        let map = self.subscribed.lock().unwrap();
        map.iter()
            .map(|(host, s)| (host.clone(), s.position.load(Ordering::Relaxed)))
            .collect()
    }

    /// A receiver that sees every event published from now on.
    pub fn receiver(&self) -> broadcast::Receiver<Arc<Live>> {
        self.tx.subscribe()
    }

    /// Registers a stream of `host` until the guard is dropped. When the
    /// host already holds [`MAX_STREAMS_PER_HOST`], its oldest stream is
    /// told to close ([`SubscriberGuard::evicted`]) and stops counting at
    /// once.
    pub fn register(&self, host: &str) -> SubscriberGuard {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        let mut map = self.subscribed.lock().unwrap();
        let entry = map.entry(host.to_string()).or_default();
        while entry.streams.len() >= MAX_STREAMS_PER_HOST {
            if let Some((_, oldest)) = entry.streams.pop_front() {
                // A stored permit: the stream sees it even if it is not
                // waiting yet.
                oldest.notify_one();
            }
        }
        entry.streams.push_back((id, evict.clone()));
        SubscriberGuard {
            host: host.to_string(),
            id,
            evict,
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
        map.get(host).map_or(0, |s| s.streams.len())
    }

    /// Open subscription streams, all hosts together.
    pub fn subscriber_count(&self) -> usize {
        self.subscribed
            .lock()
            .unwrap()
            .values()
            .map(|s| s.streams.len())
            .sum()
    }
}

/// Unregisters a subscriber when its stream ends, however it ends.
pub struct SubscriberGuard {
    host: String,
    id: u64,
    evict: Arc<Notify>,
    position: Arc<AtomicU64>,
    subscribed: Registry,
}

impl SubscriberGuard {
    /// Records that the stream passed event `id`.
    pub fn passed(&self, id: u64) {
        self.position.fetch_max(id, Ordering::Relaxed);
    }

    /// Completes when a newer stream of the same host pushed this one past
    /// [`MAX_STREAMS_PER_HOST`]: the stream must end.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let mut map = self.subscribed.lock().unwrap();
        if let Some(s) = map.get_mut(&self.host) {
            // Absent when evicted: it stopped counting then.
            s.streams.retain(|(id, _)| *id != self.id);
            if s.streams.is_empty() {
                map.remove(&self.host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_past_the_cap_closes_the_oldest() {
        let fanout = Fanout::default();
        let guards: Vec<_> = (0..=MAX_STREAMS_PER_HOST)
            .map(|_| fanout.register("web-1"))
            .collect();
        let other = fanout.register("web-2");
        assert_eq!(fanout.streams("web-1"), MAX_STREAMS_PER_HOST);
        assert_eq!(fanout.subscriber_count(), MAX_STREAMS_PER_HOST + 1);
        let now = std::time::Duration::from_millis(50);
        tokio::time::timeout(now, guards[0].evicted())
            .await
            .expect("the oldest is told to close");
        for g in guards[1..].iter().chain([&other]) {
            assert!(tokio::time::timeout(now, g.evicted()).await.is_err());
        }
        // The evicted guard no longer counts; dropping it changes nothing.
        let mut guards = guards.into_iter();
        drop(guards.next());
        assert_eq!(fanout.streams("web-1"), MAX_STREAMS_PER_HOST);
        drop(guards);
        assert_eq!(fanout.streams("web-1"), 0);
        assert_eq!(fanout.subscriber_count(), 1);
    }
}
