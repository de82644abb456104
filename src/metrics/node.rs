//! A node's metrics. Call sites: the apply path (statuses, latencies,
//! `shared.log` errors), the fail2ban client (round trips), the
//! subscriber (connection state, reconnects), the link (the hub in use,
//! moves between hubs); the outbox depth and the fast path are read at
//! scrape time.
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::node::outbox::Outbox;

type Labels = Vec<(&'static str, &'static str)>;
/// Labels with a value known only at run time (a hub address).
type HubLabels = Vec<(&'static str, String)>;

/// Everything a node counts.
pub struct NodeMetrics {
    /// Events applied, by the status decided (`added`, `already_banned`,
    /// `not_added`, `error`, `refused`).
    pub applied: Family<Labels, Counter>,
    /// From a ban's commit at the hub to its application here, seconds.
    pub apply_latency: Histogram,
    /// One request to fail2ban's control socket, seconds.
    pub fail2ban_roundtrip: Histogram,
    /// Subscription to the hub up (1) or not (0).
    pub hub_connected: Gauge,
    /// Subscriptions to the hub (re)opened.
    pub hub_connects: Counter,
    /// By hub address: 1 for the hub in use, 0 for a hub left.
    pub hub_in_use: Family<HubLabels, Gauge>,
    /// Moves from one hub to another, by why (`failure`, `preferred`).
    pub hub_moves: Family<Labels, Counter>,
    /// Failed writes to `shared.log`.
    pub shared_log_errors: Counter,
    /// Reports in the outbox (set at scrape time).
    pub outbox_depth: Gauge,
    /// The fast path (fail2ban's socket) works: 1, or not: 0.
    pub fast_path: Gauge,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            applied: Family::default(),
            // 1 ms .. ~33 s.
            apply_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            // 0.1 ms .. ~3 s.
            fail2ban_roundtrip: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            hub_connected: Gauge::default(),
            hub_connects: Counter::default(),
            hub_in_use: Family::default(),
            hub_moves: Family::default(),
            shared_log_errors: Counter::default(),
            outbox_depth: Gauge::default(),
            fast_path: Gauge::default(),
        }
    }
}

/// The process's node metrics.
pub fn get() -> &'static NodeMetrics {
    static METRICS: OnceLock<NodeMetrics> = OnceLock::new();
    METRICS.get_or_init(NodeMetrics::default)
}

/// Counts an applied event by its status name.
pub fn applied(status: &'static str) {
    get().applied.get_or_create(&vec![("status", status)]).inc();
}

/// The link now uses hub `to` (having left `from`, if any).
pub fn hub_in_use(from: Option<&str>, to: &str) {
    let m = get();
    if let Some(from) = from {
        m.hub_in_use
            .get_or_create(&vec![("hub", from.to_string())])
            .set(0);
    }
    m.hub_in_use
        .get_or_create(&vec![("hub", to.to_string())])
        .set(1);
}

/// The link moved from hub `from` to `to`, for `why`.
pub fn hub_moved(from: &str, to: &str, why: &'static str) {
    hub_in_use(Some(from), to);
    get().hub_moves.get_or_create(&vec![("why", why)]).inc();
}

/// Counts a batch's statuses, and for each ban applied here, the time
/// from its commit at the hub to now.
pub fn applied_batch(events: &[crate::ban::Event], statuses: &[(u64, crate::ban::Status)]) {
    use crate::ban::Status;
    let now = crate::clock::now_ms();
    let m = get();
    for (id, status) in statuses {
        applied(match status {
            Status::NotAdded => "not_added",
            Status::Added => "added",
            Status::AlreadyBanned => "already_banned",
            Status::Error => "error",
            Status::Refused => "refused",
        });
        if *status == Status::Added
            && let Some(e) = events.iter().find(|e| e.id == *id)
        {
            m.apply_latency
                .observe((now - e.created_ms).max(0) as f64 / 1000.0);
        }
    }
}

/// What the scrape reads from the running node.
struct Sources {
    outbox: Arc<Outbox>,
    fast_path: Arc<AtomicBool>,
}

static SOURCES: std::sync::Mutex<Option<Sources>> = std::sync::Mutex::new(None);

/// Called by the node once its outbox is open: the scrape reads the
/// outbox depth and the fast path from these.
pub fn attach(outbox: Arc<Outbox>, fast_path: Arc<AtomicBool>) {
    if let Ok(mut s) = SOURCES.lock() {
        *s = Some(Sources { outbox, fast_path });
    }
}

/// The node's exposition; values read from what [`attach`] was given.
pub fn exposition() -> super::Exposition {
    let m = get();
    let mut registry = Registry::default();
    registry.register(
        "banmesh_node_applied",
        "Events from the hub applied here, by status",
        m.applied.clone(),
    );
    registry.register_with_unit(
        "banmesh_node_apply_latency",
        "From a ban's commit at the hub to its application here",
        Unit::Seconds,
        m.apply_latency.clone(),
    );
    registry.register_with_unit(
        "banmesh_node_fail2ban_roundtrip",
        "One request to fail2ban's control socket",
        Unit::Seconds,
        m.fail2ban_roundtrip.clone(),
    );
    registry.register(
        "banmesh_node_hub_connected",
        "Subscription to the hub up (1) or down (0)",
        m.hub_connected.clone(),
    );
    registry.register(
        "banmesh_node_hub_connects",
        "Subscriptions to the hub opened (a reconnect is one more)",
        m.hub_connects.clone(),
    );
    registry.register(
        "banmesh_node_hub_in_use",
        "The hub this node uses (1) or has left (0), by address",
        m.hub_in_use.clone(),
    );
    registry.register(
        "banmesh_node_hub_moves",
        "Moves to another hub, by why: failure of the one in use, or a preferred one serving again",
        m.hub_moves.clone(),
    );
    registry.register(
        "banmesh_node_shared_log_write_errors",
        "Failed writes to shared.log",
        m.shared_log_errors.clone(),
    );
    registry.register(
        "banmesh_node_outbox_depth",
        "Reports waiting in the outbox for the hub",
        m.outbox_depth.clone(),
    );
    registry.register(
        "banmesh_node_fast_path",
        "Bans go to fail2ban's socket at once (1) or through shared.log only (0)",
        m.fast_path.clone(),
    );
    super::Exposition {
        registry,
        refresh: Box::new(|| {
            let m = get();
            if let Ok(guard) = SOURCES.lock()
                && let Some(s) = guard.as_ref()
            {
                m.outbox_depth.set(s.outbox.pending() as i64);
                m.fast_path
                    .set(i64::from(s.fast_path.load(Ordering::Relaxed)));
            }
        }),
    }
}

/// Times one fail2ban request: observed when dropped, however it ended.
pub struct RoundTrip(std::time::Instant);

impl RoundTrip {
    /// Starts the clock.
    pub fn start() -> Self {
        RoundTrip(std::time::Instant::now())
    }
}

impl Drop for RoundTrip {
    fn drop(&mut self) {
        get()
            .fail2ban_roundtrip
            .observe(self.0.elapsed().as_secs_f64());
    }
}
