//! Telling systemd how the daemon is (`Type=notify`, `WatchdogSec=`),
//! through the `sd-notify` crate. Without `NOTIFY_SOCKET` (not under
//! systemd: a shell, the demo, the tests that do not ask) all of it is a
//! no-op.
//!
//! - [`ready`]: sent once the daemon really serves: the hub with its store
//!   open and its listener bound, the node with its report socket bound
//!   and its outbox loaded. systemd holds back units ordered after it
//!   until then.
//! - [`beat`]: the daemon's main loop (the hub's committer, the node's
//!   apply loop) calls it at least every [`BEAT`]; [`spawn_watchdog`]
//!   pings `WATCHDOG=1` only while those beats are recent, so a stuck main
//!   loop, or a runtime whose workers are all blocked, stops the pings and
//!   systemd restarts the daemon.
use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// How often a main loop beats, at least (well under any sane `WatchdogSec`).
pub const BEAT: Duration = Duration::from_secs(1);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`] of the last beat.
static LAST_BEAT_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// The main loop is alive: called by the hub's committer and the node's
/// apply loop on every pass and every [`BEAT`] when idle.
pub fn beat() {
    LAST_BEAT_MS.store(now_ms(), Ordering::Relaxed);
}

/// How long since the main loop last beat.
pub fn since_beat() -> Duration {
    Duration::from_millis(now_ms().saturating_sub(LAST_BEAT_MS.load(Ordering::Relaxed)))
}

fn send(state: &[NotifyState], what: &str) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "cannot tell systemd {what}");
    }
}

/// `READY=1`: the daemon serves now.
pub fn ready(status: &str) {
    beat();
    send(
        &[NotifyState::Ready, NotifyState::Status(status)],
        "READY=1",
    );
}

/// `STATUS=`: what `systemctl status` shows, e.g. why the hub does not
/// serve now.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)], "STATUS=");
}

/// `STOPPING=1`: a stop was asked for; the daemon is finishing its work.
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

/// Pings `WATCHDOG=1` every half of `WATCHDOG_USEC` while the main loop
/// beats; nothing when systemd did not ask for a watchdog.
pub fn spawn_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    beat();
    let every = timeout / 2;
    debug!(?every, "watchdog pings on");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut withheld = false;
        loop {
            tick.tick().await;
            let quiet = since_beat();
            if quiet < timeout.saturating_sub(every / 2).max(BEAT * 2) {
                withheld = false;
                send(&[NotifyState::Watchdog], "WATCHDOG=1");
            } else if !withheld {
                withheld = true;
                warn!(
                    quiet_ms = quiet.as_millis() as u64,
                    "the main loop has not run lately: no watchdog ping, so systemd restarts the daemon"
                );
            }
        }
    });
}
