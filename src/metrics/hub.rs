//! The hub's metrics. Call sites: `publish` (reports and their outcome),
//! `subscription` (deliveries), and a refresh at scrape time reading the
//! fan-out (subscribers, per-host lag).
use std::sync::OnceLock;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::hub::fanout::Fanout;

/// A label set of bounded values.
type Labels = Vec<(&'static str, &'static str)>;
/// The `host` label: a fleet member's name (bounded by the fleet), never an IP.
type HostLabel = Vec<(&'static str, String)>;

/// Everything the hub counts.
#[derive(Default)]
pub struct HubMetrics {
    /// Reports received on Publish streams, before any check.
    pub reports: Counter,
    /// Reports by outcome: `accepted` (a new event), `duplicate`, or
    /// `refused` with a `reason`: `invalid`, `rate_limited`, `allow_list`.
    pub outcomes: Family<Labels, Counter>,
    /// Events sent to subscribers (one per event per subscriber).
    pub deliveries: Counter,
    /// Subscribed hosts now.
    pub subscribers: Gauge,
    /// Per host: committed events its subscription has not passed yet.
    pub lag: Family<HostLabel, Gauge>,
    /// 1 while the hub's database is healthy and the hub serves, 0 while
    /// it refuses calls for want of one (`hub::db_health`).
    pub database_up: Gauge,
    /// Moves of the hub's pool to another `--db` address.
    pub database_moves: Counter,
}

/// The process's hub metrics.
pub fn get() -> &'static HubMetrics {
    static METRICS: OnceLock<HubMetrics> = OnceLock::new();
    METRICS.get_or_init(HubMetrics::default)
}

/// Counts a report's outcome (`accepted`, `duplicate`).
pub fn outcome(outcome: &'static str) {
    get()
        .outcomes
        .get_or_create(&vec![("outcome", outcome), ("reason", "")])
        .inc();
}

/// Counts a refused report.
pub fn refused(reason: &'static str) {
    get()
        .outcomes
        .get_or_create(&vec![("outcome", "refused"), ("reason", reason)])
        .inc();
}

static FANOUT: std::sync::Mutex<Option<Fanout>> = std::sync::Mutex::new(None);

/// Called by the hub once its fan-out exists: the scrape reads
/// subscribers and their lag from it.
pub fn attach(fanout: Fanout) {
    if let Ok(mut f) = FANOUT.lock() {
        *f = Some(fanout);
    }
}

/// The hub's exposition; subscribers and lag read from what [`attach`] was given.
pub fn exposition() -> super::Exposition {
    let m = get();
    let mut registry = Registry::default();
    registry.register(
        "banmesh_hub_reports_received",
        "Reports received from nodes, before any check",
        m.reports.clone(),
    );
    registry.register(
        "banmesh_hub_reports",
        "Reports by outcome: accepted (new event), duplicate, refused (with reason)",
        m.outcomes.clone(),
    );
    registry.register(
        "banmesh_hub_deliveries",
        "Events sent to subscribed nodes",
        m.deliveries.clone(),
    );
    registry.register(
        "banmesh_hub_subscribers",
        "Hosts subscribed now",
        m.subscribers.clone(),
    );
    registry.register(
        "banmesh_hub_host_lag_events",
        "Committed events a subscribed host has not received yet",
        m.lag.clone(),
    );
    registry.register(
        "banmesh_hub_database_up",
        "1 while the hub's database is healthy and the hub serves; 0 while it refuses calls",
        m.database_up.clone(),
    );
    registry.register(
        "banmesh_hub_database_moves",
        "Moves of the hub to another --db address after the one in use failed",
        m.database_moves.clone(),
    );
    super::Exposition {
        registry,
        refresh: Box::new(|| {
            let m = get();
            let Some(fanout) = FANOUT.lock().ok().and_then(|f| f.clone()) else {
                return;
            };
            let positions = fanout.positions();
            m.subscribers.set(positions.len() as i64);
            m.lag.clear();
            let head = fanout.head();
            for (host, position) in positions {
                m.lag
                    .get_or_create(&vec![("host", host)])
                    .set(head.saturating_sub(position) as i64);
            }
        }),
    }
}

/// Counts a committed report: `accepted` when it made a new event,
/// `duplicate` when the hub already had it (a refusal is counted where
/// its ack is made).
pub fn committed(c: &crate::hub::store::Committed) {
    use crate::hub::store::Committed;
    match c {
        Committed::Duplicate(_) => outcome("duplicate"),
        Committed::Refused { .. } => {}
        _ => outcome("accepted"),
    }
}
