//! Which hubs sharing the store are alive, so that a hub listing hosts can
//! tell another hub's claim on a host (`hosts.hub`, written when the
//! host's stream opened there) from one a dead hub left behind.
//!
//! Each hub writes its name and the time into the store's `hubs` table
//! every [`HEARTBEAT`]: one small write per hub per period, never on the
//! ban path. A claim whose hub has not written for [`SILENT`] is stale: a
//! live hub misses three beats only when its database is away, and then
//! its streams end too. A hub's own claims are checked against its live
//! streams instead (see `service::hosts`).
use std::{sync::Arc, time::Duration};

use tracing::warn;

use super::store::Store;
use crate::shutdown::Shutdown;

/// How often a hub records that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A hub silent this long is taken for dead: its claims are stale.
pub const SILENT: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());

/// Whether a claim of a hub last heard from at `seen_ms` (`None`: never)
/// is stale at `now_ms`.
pub fn silent(seen_ms: Option<i64>, now_ms: i64) -> bool {
    seen_ms.is_none_or(|seen| now_ms - seen > SILENT.as_millis() as i64)
}

/// Records that hub `name` is alive every [`HEARTBEAT`] until shutdown. A
/// failed write is logged once per stretch of failures and retried at the
/// next beat.
pub async fn run(store: Arc<dyn Store>, name: Arc<str>, mut shutdown: Shutdown) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = shutdown.recv() => return,
        }
        match store.hub_seen(&name, crate::clock::now_ms()).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "cannot record that this hub is alive; other hubs will show its hosts' claims as stale");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_is_silent_after_three_missed_beats() {
        assert!(silent(None, 10_000));
        assert!(!silent(Some(10_000), 10_000 + 6_000));
        assert!(silent(Some(10_000), 10_000 + 6_001));
    }
}
