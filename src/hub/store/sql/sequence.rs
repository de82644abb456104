//! Event ids in commit order: the counter row every writer of `events`
//! takes its ids from, so that several hubs on one Galera cluster (or one
//! MySQL) can each tail the store by `id > last` without a gap.
//!
//! Why `AUTO_INCREMENT` cannot serve: under Galera each node hands out ids
//! from its own offset (`auto_increment_increment` = cluster size), and a
//! transaction that drew a low id may commit after one that drew a higher
//! id on another node. A reader that has seen id 12 and tails `id > 12`
//! then never sees 10 when it commits late: a gap.
//!
//! The scheme: every transaction that inserts events first runs
//! `UPDATE banmesh_meta SET v = v + n WHERE k = 'next_event_id'` (MySQL
//! returns the new value through `LAST_INSERT_ID(expr)` in the same round
//! trip) and inserts its rows with the explicit ids `v .. v + n`.
//!
//! Proof that ids follow commit order, densely (up to holes that never
//! fill), on every node:
//! 1. Every event-writing transaction writes the counter row, so any two of
//!    them conflict on that row's key.
//! 2. On one server, the row lock serialises them: the second reads the
//!    counter only after the first committed (or rolled back: then the
//!    counter is back too, and its ids were never used).
//! 3. Under Galera, two such transactions on different nodes both reach
//!    certification; the one later in the cluster's total order finds a
//!    write-set to the counter key it had not seen and is aborted (error
//!    1213). A local one is aborted by the applier of a remote one as
//!    well (brute-force abort, same error). The hub retries the whole
//!    transaction ([`StoreError::is_conflict`]). So the transaction that
//!    commits read the counter as left by every write-set before it in
//!    total order: its ids are above every earlier event id.
//! 4. Galera applies write-sets on every node in that same total order, so
//!    at any moment each node's committed events are a prefix of the id
//!    order (plus holes): a reader tailing `id > last` on any node never
//!    skips an id that commits later.
//!
//! Holes: a batch whose `INSERT IGNORE` skips a re-send leaves its reserved
//! id unused; the counter is past it, so no later row takes it and a
//! reader loses nothing. Rows written without the counter (a hub of an
//! earlier build, a restored backup, a test) are stepped over: the counter
//! is raised to `MAX(id) + 1` first (an index-end lookup).
//!
//! Cost on one hub: one more statement (one round trip on MySQL) per
//! batch; the row lock serialises writers, which one committer per hub
//! already does.
use super::{Executor, StoreError};
use crate::hub::store::schema::Dialect;

/// How often a transaction that lost a commit conflict is retried before
/// its error goes to the caller (the committer fails the batch's reports:
/// nodes re-send them).
pub const MAX_CONFLICT_RETRIES: u32 = 20;

/// The pause before retry `attempt` (1, 2, .. ms): conflicting hubs
/// drift apart instead of colliding again.
pub async fn back_off(attempt: u32) {
    tokio::time::sleep(std::time::Duration::from_millis(u64::from(attempt))).await;
}

/// Runs the transaction `f` makes until it does not lose a conflict
/// ([`StoreError::is_conflict`]), at most [`MAX_CONFLICT_RETRIES`] more
/// times. `f` must start its transaction afresh each call.
pub async fn retrying<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if e.is_conflict() && attempt < MAX_CONFLICT_RETRIES => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "transaction lost a commit conflict; retrying");
                back_off(attempt).await;
            }
            r => return r,
        }
    }
}

/// The `banmesh_meta` key of the next event id to hand out.
pub const NEXT_EVENT_ID: &str = "next_event_id";

/// MySQL: raises the counter by `?` (past any row written without it) and
/// returns its new value as the statement's `LAST_INSERT_ID`.
pub const MYSQL_RESERVE: &str = "UPDATE banmesh_meta SET v = LAST_INSERT_ID(GREATEST(v, \
     (SELECT COALESCE(MAX(id), 0) + 1 FROM events)) + ?) WHERE k = 'next_event_id'";

/// SQLite: raises the counter by `?1`, returning its new value.
pub const SQLITE_RESERVE: &str = "UPDATE banmesh_meta SET v = MAX(v, \
     (SELECT COALESCE(MAX(id), 0) + 1 FROM events)) + ?1 WHERE k = 'next_event_id' RETURNING v";

/// Creates the counter row when missing (a store of an earlier build, a
/// fresh one); ignored when a concurrent hub created it first.
pub fn create_sql(d: Dialect) -> &'static str {
    match d {
        Dialect::MySql => "INSERT IGNORE INTO banmesh_meta (k, v) VALUES ('next_event_id', 1)",
        Dialect::Sqlite => "INSERT OR IGNORE INTO banmesh_meta (k, v) VALUES ('next_event_id', 1)",
    }
}

/// Reserves `n` event ids inside the caller's open transaction: the first
/// of `n` consecutive ids no other transaction can get (module doc).
pub async fn reserve(ex: &mut dyn Executor, d: Dialect, n: u64) -> Result<u64, StoreError> {
    for _ in 0..2 {
        let next = match d {
            Dialect::MySql => {
                let done = ex.exec(MYSQL_RESERVE, vec![n.into()]).await?;
                (done.affected > 0).then_some(done.last_id)
            }
            Dialect::Sqlite => {
                let rows = ex.query(SQLITE_RESERVE, vec![n.into()]).await?;
                rows.first().map(|r| r.u64(0)).transpose()?
            }
        };
        if let Some(next) = next {
            return Ok(next - n);
        }
        ex.exec(create_sql(d), vec![]).await?;
    }
    Err(StoreError::query(format!(
        "banmesh_meta has no {NEXT_EVENT_ID} row after creating it"
    )))
}
