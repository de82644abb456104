//! The database health watch: a hub whose database is lost or cut off
//! stops serving cleanly, and moves to another `--db` address if one is
//! healthy.
//!
//! Why: on a Galera node that is killed or partitioned away (non-primary),
//! every statement fails, yet the hub's Subscribe streams would stay open
//! (their nodes would sit on a hub that cannot deliver other hubs' commits)
//! and reports would be answered with errors one by one. Instead:
//! - every [`CHECK_EVERY`] a cheap check runs on the address in use, on a
//!   connection of its own, bounded by [`CHECK_TIMEOUT`] (a blackholed
//!   server is noticed within about a second, not after TCP's timeouts):
//!   it answers, and a Galera node is in the primary component and ready
//!   (`store::mysql::health`);
//! - when it fails, the other `--db` addresses are checked in order and the
//!   store moves its pool to the first healthy one (`MysqlStore::move_to`);
//!   the hub keeps serving;
//! - when none is healthy the hub stops serving: every Subscribe and
//!   Publish stream ends with UNAVAILABLE naming the reason (so nodes move
//!   to another hub), new calls are refused the same way, the committer
//!   stops polling for other hubs' commits and abandons store calls in
//!   flight ([`DbGate::bounded`]), the gRPC health service says
//!   NOT_SERVING, `banmesh_hub_database_up` is 0 and systemd's STATUS says
//!   why. Each transition is logged once. The checks go on; once an
//!   address is healthy again the hub serves again by itself, on a fresh
//!   pool.
//!
//! Nothing accepted is lost: an ack means the report's transaction
//! committed (`committer`), and a commit that failed with the database
//! acknowledges nothing, so those reports stay in their nodes' outboxes
//! and are sent again, to this hub or another; `(host, seq)` makes that
//! idempotent. Event ids come from the counter row in the database
//! (`store::sql::sequence`), replicated like any row, so a move needs no
//! sequence state in the hub; the committer publishes other hubs' commits
//! from its last published id, which every node of the cluster agrees on
//! (Galera applies write-sets in one total order, so a node that is behind
//! holds a prefix, and reading `id > last` on it skips nothing).
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use mysql_async::Conn;
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, error, info, warn};

use super::store::{StoreError, mysql::MysqlStore};
use crate::shutdown::Shutdown;

/// How often the database in use is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long one check may take before the database counts as lost.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(750);
/// Failed checks in a row before a serving hub acts (moves or stops): one
/// slow answer on a loaded machine must not end every stream of the hub.
/// Costs one more [`CHECK_EVERY`] when the database is really gone.
pub const FAILURES_TO_ACT: u32 = 2;

/// What the watch tells the hub.
#[derive(Clone, Default)]
struct State {
    /// `None` while serving; why not otherwise.
    down: Option<Arc<str>>,
    /// Bumped on every change (lost, moved, back): a store call that
    /// began before it may hang on a dead server (`DbGate::bounded`).
    epoch: u64,
}

/// Whether the hub may serve: shared by the service, the streams and the
/// committer. Cheap to clone.
#[derive(Clone)]
pub struct DbGate {
    rx: watch::Receiver<State>,
}

impl DbGate {
    /// A gate that is always open (the embedded store: it cannot be cut
    /// off from the hub).
    pub fn open() -> DbGate {
        DbGate {
            rx: watch::channel(State::default()).1,
        }
    }

    /// True while the database is healthy.
    pub fn serving(&self) -> bool {
        self.rx.borrow().down.is_none()
    }

    /// `Ok` while serving; otherwise the UNAVAILABLE a call is refused with.
    pub fn check(&self) -> Result<(), Status> {
        match &self.rx.borrow().down {
            None => Ok(()),
            Some(reason) => Err(refusal(reason)),
        }
    }

    /// Why the hub does not serve, as a store error (for the committer's
    /// answers); `None` while serving.
    pub fn down(&self) -> Option<StoreError> {
        let reason = self.rx.borrow().down.clone()?;
        Some(StoreError::query(format!(
            "the hub's database is down: {reason}"
        )))
    }

    /// Resolves, with the status to end a stream with, once the hub stops
    /// serving (at once if it is not serving now); never for a gate that
    /// cannot close.
    pub async fn lost(&self) -> Status {
        let mut rx = self.rx.clone();
        // The `Ref` must not live across an await (it holds a lock).
        let reason = rx
            .wait_for(|s| s.down.is_some())
            .await
            .map(|s| s.down.clone());
        match reason {
            Ok(reason) => refusal(reason.as_deref().unwrap_or_default()),
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits for the next change of state; `false` once nothing can change
    /// it any more.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Runs the store call `f` unless the database is lost or the store
    /// moves to another address first: then `f` is dropped and the call
    /// fails. A statement on a hung or blackholed server would otherwise
    /// hold its caller (the committer: every report behind it) until TCP
    /// gives up, minutes later, even after the store moved. An abandoned
    /// commit has an unknown outcome, which the committer already handles:
    /// nothing is acked, re-sends are recognised, and what did commit is
    /// published late, in order.
    pub fn bounded<T, F: Future<Output = Result<T, StoreError>>>(
        &self,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + use<T, F> {
        // The state as the call begins (now, not at its first poll).
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        async move {
            let changed = async move {
                if rx.changed().await.is_err() {
                    // Nothing can change it any more: never.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                biased;
                r = f => r,
                _ = changed => Err(StoreError::query(
                    "the hub's database was lost or replaced during the call; not done",
                )),
            }
        }
    }
}

/// What a call or stream is refused / ended with while the database is down.
fn refusal(reason: &str) -> Status {
    Status::unavailable(format!(
        "this hub cannot serve now: {reason}; connect to another hub"
    ))
}

/// Starts the watch on `store`'s addresses; it stops with the hub.
pub fn watch(store: Arc<MysqlStore>, shutdown: Shutdown) -> DbGate {
    let (tx, rx) = watch::channel(State::default());
    crate::metrics::hub::get().database_up.set(1);
    tokio::spawn(run(store, tx, shutdown));
    DbGate { rx }
}

/// One check of address `index`, bounded by [`CHECK_TIMEOUT`].
async fn check(store: &MysqlStore, index: usize, conn: &mut Option<Conn>) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, store.probe(index, conn)).await {
        Ok(r) => r,
        Err(_) => {
            // Mid-statement: the connection is of no further use.
            *conn = None;
            Err(format!(
                "the database at {} did not answer a health check within {} ms",
                store.addresses()[index],
                CHECK_TIMEOUT.as_millis()
            ))
        }
    }
}

/// Tells the hub: serving (`None`) or why not; a new epoch either way.
fn tell(tx: &watch::Sender<State>, down: Option<Arc<str>>) {
    tx.send_modify(|s| {
        s.down = down;
        s.epoch += 1;
    });
}

async fn run(store: Arc<MysqlStore>, tx: watch::Sender<State>, mut shutdown: Shutdown) {
    let addresses = store.addresses();
    let mut conns: Vec<Option<Conn>> = addresses.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = crate::metrics::hub::get();
    // When the hub stopped serving, for the log line when it serves again.
    let mut down_since: Option<Instant> = None;
    // Failed checks in a row of the address in use, while serving.
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        let current = store.current();
        let reason = match check(&store, current, &mut conns[current]).await {
            Ok(()) => {
                failures = 0;
                if let Some(since) = down_since.take() {
                    // Its pooled connections may have died with it.
                    store.move_to(current);
                    serving(&tx, &addresses[current], since);
                }
                continue;
            }
            Err(reason) => reason,
        };
        failures += 1;
        if down_since.is_none() && failures < FAILURES_TO_ACT {
            debug!(%reason, "a database health check failed; acting on the next one failing too");
            continue;
        }
        let mut moved = false;
        for other in (0..addresses.len()).filter(|&i| i != current) {
            if check(&store, other, &mut conns[other]).await.is_ok() {
                let started = Instant::now();
                store.move_to(other);
                failures = 0;
                metrics.database_moves.inc();
                warn!(from = %addresses[current], to = %addresses[other], %reason,
                    took_ms = started.elapsed().as_millis() as u64,
                    "moved to another database address");
                if let Some(since) = down_since.take() {
                    serving(&tx, &addresses[other], since);
                } else {
                    // Calls in flight on the old address are abandoned.
                    tell(&tx, None);
                    crate::systemd::status(&format!("hub serving on {}", addresses[other]));
                }
                moved = true;
                break;
            }
        }
        if !moved && down_since.is_none() {
            down_since = Some(Instant::now());
            error!(%reason, "database lost: this hub stops serving (streams end with UNAVAILABLE) until a --db address is healthy");
            metrics.database_up.set(0);
            crate::systemd::status(&format!("not serving: {reason}"));
            tell(&tx, Some(reason.into()));
        }
    }
}

/// The hub serves again, on `at`, after being down since `since`.
fn serving(tx: &watch::Sender<State>, at: &str, since: Instant) {
    info!(
        at,
        down_ms = since.elapsed().as_millis() as u64,
        "database healthy again: this hub serves again"
    );
    crate::metrics::hub::get().database_up.set(1);
    crate::systemd::status(&format!("hub serving on {at}"));
    tell(tx, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_gate_refuses_with_the_reason_and_ends_what_waits_on_it() {
        let (tx, rx) = watch::channel(State::default());
        let gate = DbGate { rx };
        let hung = tokio::spawn(gate.bounded(std::future::pending::<Result<(), _>>()));
        assert!(gate.serving() && gate.check().is_ok());
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.lost().await }
        });
        tell(&tx, Some("the database at db1:3306 is gone".into()));
        let e = hung.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("lost or replaced during the call"), "{e}");
        let ended = waiting.await.unwrap();
        assert_eq!(ended.code(), tonic::Code::Unavailable);
        assert!(ended.message().contains("db1:3306 is gone"), "{ended:?}");
        let refused = gate.check().unwrap_err();
        assert_eq!(refused.message(), ended.message());
        // Serving again: calls pass; a stream started now waits.
        tell(&tx, None);
        assert_eq!(gate.bounded(async { Ok(7) }).await.unwrap(), 7);
        assert!(gate.check().is_ok());
        let lost = tokio::time::timeout(Duration::from_millis(50), gate.lost());
        assert!(lost.await.is_err(), "an open gate ends nothing");
    }

    #[tokio::test]
    async fn the_embedded_stores_gate_never_closes() {
        let mut gate = DbGate::open();
        assert!(gate.check().is_ok());
        assert!(!gate.changed().await, "nothing can close it");
        assert_eq!(gate.bounded(async { Ok(7) }).await.unwrap(), 7);
        let lost = tokio::time::timeout(Duration::from_millis(50), gate.lost());
        assert!(lost.await.is_err());
    }
}
