//! The group commit in one round trip, for the common batch: every report
//! new, none re-sent.
//!
//! The stepwise commit (`commit.rs`) paid a round trip per statement:
//! `START TRANSACTION`, the counter bump, the `INSERT`, `COMMIT` (4 of the
//! 5 per batch, the ladder read being the fifth; docs/perf/commit-rt.py
//! counts them). Here the four go as one multi-statement text query
//! (mysql_async asks for `CLIENT_MULTI_STATEMENTS` on every connection):
//!
//! ```sql
//! START TRANSACTION;
//! INSERT INTO banmesh_meta .. ON DUPLICATE KEY UPDATE v = LAST_INSERT_ID(..);
//! SET @banmesh_first = LAST_INSERT_ID() - n;
//! INSERT INTO events (.., id) VALUES (.., @banmesh_first + 0), ..;
//! COMMIT
//! ```
//!
//! The server runs them in order and stops at the first that fails, so
//! `COMMIT` runs only after every statement before it succeeded, and a
//! report is answered only after its result came back OK.
//!
//! What keeps the ordering proof of `sql::sequence` whole:
//! - The counter is written by the same statement kind on every path (a
//!   write of the `next_event_id` row), first in the transaction, so the
//!   proof's steps 1-4 hold unchanged: the row lock serialises writers on
//!   one server, certification (error 1213, retried whole) under Galera.
//! - The ids are computed by the server from the value that write left
//!   (`LAST_INSERT_ID(expr)`, which the statement always sets: the upsert
//!   evaluates it whether it inserts the row or updates it). A plain
//!   `UPDATE` would not do here: matching no row (the counter row deleted
//!   by hand) it leaves `LAST_INSERT_ID()` at an older value, and the
//!   client, which reads the answers only after `COMMIT`, could not stop
//!   the rows going in with stale ids.
//! - The client learns the first id from the upsert's OK packet, which
//!   carries the same value, and checks that every row went in.
//!
//! Re-sends: the `INSERT` has no `IGNORE`, so a report already stored
//! fails it with a duplicate key (1062) and nothing after it runs. The
//! transaction (still open: the counter written) is then rolled back on
//! the same connection and the batch goes the stepwise way, which answers
//! re-sends with their first outcome. Any other server error is handled
//! the same way, so that the stepwise path stays the one that decides what
//! a batch it could not commit here becomes; a lost conflict (1213) goes
//! to the caller, which retries the whole transaction.
//!
//! No transaction is ever left open on a connection that is kept: after a
//! server error the `ROLLBACK` is sent before anything else; if it fails,
//! or the exchange was cut off (the connection is then marked
//! disconnected, `dedicated`), the error goes up and the connection is not
//! kept (a disconnected one is closed, never pooled; the server rolls
//! back a closed session's transaction).
use std::fmt::Write as _;

use mysql_async::{Conn, prelude::*};

use super::{MysqlStore, literal, q};
use crate::hub::store::{Committed, Fresh, LadderFacts, NewReport, Plan, StoreError, Stored, sql};

/// MySQL's duplicate-key error: a re-sent report hit the `report` key.
const DUPLICATE_KEY: u16 = 1062;

/// The session variable holding the batch's first id, between the
/// statements of one multi-statement query.
const FIRST: &str = "@banmesh_first";

/// Where each report of `batch` goes in the statement: the reports that
/// are not coalesced into another of the batch first, then those that are
/// (their `extends` names a row of the first group), in batch order; the
/// same order and so the same ids as the stepwise commit's two phases.
/// `None` when the batch is not for this path: a report key twice (a
/// re-send within the batch), or a report coalesced into one that is not a
/// new ban.
fn layout(batch: &[NewReport], keys: &[(u64, u64)]) -> Option<Vec<usize>> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    if !keys.iter().all(|k| seen.insert(*k)) {
        return None;
    }
    let (second, first): (Vec<usize>, Vec<usize>) =
        (0..batch.len()).partition(|&i| matches!(batch[i].plan, Plan::CoalesceWith(_)));
    let mut pos = vec![0; batch.len()];
    for (p, &i) in first.iter().chain(&second).enumerate() {
        pos[i] = p;
    }
    let coalesced_into_new = second.iter().all(|&i| match batch[i].plan {
        Plan::CoalesceWith(j) => batch.get(j).is_some_and(|b| matches!(b.plan, Plan::New(_))),
        _ => false,
    });
    coalesced_into_new.then_some(pos)
}

/// The statement text (module doc) for `batch` laid out as `pos` says.
fn statement(
    batch: &[NewReport],
    keys: &[(u64, u64)],
    pos: &[usize],
    now: i64,
    no_backslash_escapes: bool,
) -> String {
    let n = batch.len();
    let mut order = vec![0; n];
    for (i, &p) in pos.iter().enumerate() {
        order[p] = i;
    }
    let mut sql = String::with_capacity(512 + n * 160);
    let _ = write!(
        sql,
        "START TRANSACTION;{};SET {FIRST} = LAST_INSERT_ID() - {n};\
         INSERT INTO events ({}) VALUES ",
        sql::sequence::mysql_reserve_upsert(n as u64),
        super::commit::REPORT_COLUMNS,
    );
    for (p, &i) in order.iter().enumerate() {
        let r = &batch[i];
        // A report coalesced into another of the batch: its row's
        // `extends` is that report's id, known to the server only. Any
        // non-zero stand-in makes `Stored::of` give the coalesced row.
        let into = match r.plan {
            Plan::CoalesceWith(j) => Some(pos[j]),
            _ => None,
        };
        let row = Stored::of(&r.plan, |_| Some(1));
        let cells = super::commit::values(&row, keys[i].0, Some(keys[i].1), r, now, 0);
        sql.push_str(if p == 0 { "(" } else { ",(" });
        for (k, v) in cells[..super::commit::ID_COLUMN].iter().enumerate() {
            if k > 0 {
                sql.push_str(", ");
            }
            match into {
                Some(at) if k == super::commit::EXTENDS_COLUMN => {
                    let _ = write!(sql, "{FIRST} + {at}");
                }
                _ => sql.push_str(&v.as_sql(no_backslash_escapes)),
            }
        }
        let _ = write!(sql, ", {FIRST} + {p})");
    }
    sql.push_str(";COMMIT");
    sql
}

/// What the server answered to the statements, in order.
#[derive(Default)]
struct Answers {
    /// The rows of the first statement, when it is a read.
    rows: Vec<mysql_async::Row>,
    /// The counter upsert: (rows affected, `LAST_INSERT_ID`).
    reserve: (u64, Option<u64>),
    /// Rows the `INSERT` stored.
    inserted: u64,
    /// How many statements answered OK.
    count: usize,
}

/// Sends `sql`, `statements` statements of which the transaction
/// ([`statement`]) starts at index `start`, and reads every answer. The
/// server runs nothing after a failed statement: its index and error come
/// back beside what answered before it.
async fn send(
    conn: &mut Conn,
    sql: String,
    statements: usize,
    start: usize,
) -> (Answers, Option<(usize, mysql_async::Error)>) {
    let mut answers = Answers::default();
    let mut result = match conn.query_iter(sql).await {
        Ok(r) => r,
        Err(e) => return (answers, Some((0, e))),
    };
    for k in 0..statements {
        // The answer of statement k is the connection's latest (OK
        // packets of the statements before it were read already).
        if k == start + 1 {
            answers.reserve = (result.affected_rows(), result.last_insert_id());
        } else if k == start + 3 {
            answers.inserted = result.affected_rows();
        }
        // Reads statement k's rows (none but a read's) and the next
        // answer; a failed statement's error comes out here, at its k.
        match result.collect::<mysql_async::Row>().await {
            Ok(rows) if k == 0 => answers.rows = rows,
            Ok(_) => {}
            Err(e) => return (answers, Some((k, e))),
        }
        answers.count += 1;
    }
    (answers, None)
}

/// How many statements [`statement`] makes.
const TRANSACTION: usize = 5;

/// Whether a failed statement left the connection clean enough to keep:
/// the transaction, if it may be open (the failure at or after `start`),
/// is rolled back first. `Err` when the connection must not be kept (cut
/// off, broken, or the rollback failed); else the server's error code.
async fn recover(
    conn: &mut Conn,
    at: usize,
    start: usize,
    e: mysql_async::Error,
) -> Result<(u16, StoreError), StoreError> {
    let code = match &e {
        mysql_async::Error::Server(s) if !conn.is_disconnected() => s.code,
        // Cut off or broken: the connection is not kept.
        _ => return Err(q(e)),
    };
    if at >= start {
        // The counter may be written: never leave the transaction open.
        conn.query_drop("ROLLBACK").await.map_err(q)?;
    }
    Ok((code, q(e)))
}

/// The outcomes once the server answered every statement, or an error
/// when an answer is not what the statements must give: committed
/// already, so an unknown outcome for the committer (its events are read
/// back and published later).
fn outcomes(
    answers: &Answers,
    statements: usize,
    batch: &[NewReport],
    pos: &[usize],
    now: i64,
) -> Result<Vec<Committed>, StoreError> {
    let n = batch.len() as u64;
    let first = match *answers {
        Answers {
            reserve: (1 | 2, Some(next)),
            inserted,
            count,
            ..
        } if inserted == n && next >= n && count == statements => next - n,
        Answers {
            reserve, inserted, ..
        } => {
            return Err(StoreError::query(format!(
                "the one-trip commit answered {reserve:?} for the counter and {inserted} rows of {n}"
            )));
        }
    };
    let id = |i: usize| first + pos[i] as u64;
    Ok(batch
        .iter()
        .enumerate()
        .map(|(i, r)| Stored::of(&r.plan, |j| Some(id(j))).committed(id(i), r, now))
        .collect())
}

/// Commits `batch` in one round trip when it can (module doc): `Ok(None)`
/// when the batch is not for this path or the server refused it (then
/// rolled back: nothing of it stored, the connection clean).
pub(super) async fn commit(
    conn: &mut Conn,
    batch: &[NewReport],
    keys: &[(u64, u64)],
    now: i64,
) -> Result<Option<Vec<Committed>>, StoreError> {
    let Some(pos) = layout(batch, keys) else {
        return Ok(None);
    };
    // The quoting mode, as the session's last answer stated it; none yet
    // on a fresh connection: the stepwise path asks first.
    let Some(no_backslash_escapes) = literal::no_backslash_escapes(conn) else {
        return Ok(None);
    };
    let sql = statement(batch, keys, &pos, now, no_backslash_escapes);
    match send(conn, sql, TRANSACTION, 0).await {
        (answers, None) => outcomes(&answers, TRANSACTION, batch, &pos, now).map(Some),
        (_, Some((at, e))) => {
            let (code, e) = recover(conn, at, 0, e).await?;
            if e.is_conflict() {
                return Err(e);
            }
            if code != DUPLICATE_KEY {
                tracing::debug!(error = %e, "one-trip commit refused; committing stepwise");
            }
            Ok(None)
        }
    }
}

/// Most reports [`MysqlStore::fresh_commit`] takes: it is for the
/// latency of a quiet hub's single reports; a big batch pays the ladder's
/// read apart, where a batch with one repeat offender would otherwise
/// have sent its whole text for nothing.
pub(super) const FRESH_MAX: usize = 16;

/// MySQL's "subquery returns more than one row": the guard's refusal.
const GUARD_REFUSED: u16 = 1242;

impl MysqlStore {
    /// `Store::commit_fresh`: the ladder's read, a guard, and the
    /// transaction of [`commit`], in one multi-statement query:
    ///
    /// ```sql
    /// SELECT <each address's latest ban>;
    /// SET @banmesh_guard = (SELECT 1 FROM (SELECT 1 UNION ALL SELECT 2) g
    ///     WHERE EXISTS (SELECT 1 FROM events WHERE kind = 1 AND ip IN (..)));
    /// START TRANSACTION; .. ; COMMIT
    /// ```
    ///
    /// The guard's subquery has two rows exactly when an address has a
    /// ban (what the read finds), and then fails (1242): the server runs
    /// nothing after it, no transaction was started, and the read's rows
    /// are the ladder's facts. Else the batch, planned by the caller as
    /// for addresses without history, commits. The read and the guard
    /// run before the transaction, as the ladder's separate read did
    /// before the stepwise commit: a ban another hub commits meanwhile is
    /// the same race as before (`hub::committer`).
    pub(super) async fn fresh_commit(
        &self,
        batch: &[NewReport],
        now: i64,
    ) -> Result<Fresh, StoreError> {
        let mut ips = std::collections::HashSet::new();
        if batch.is_empty()
            || batch.len() > FRESH_MAX
            || !batch.iter().all(|r| ips.insert(r.ban.ip.as_str()))
        {
            return Ok(Fresh::NotTried);
        }
        let mut keys = Vec::with_capacity(batch.len());
        for r in batch {
            keys.push((sql::host_id(self, &r.host).await?, r.seq));
        }
        let Some(pos) = layout(batch, &keys) else {
            return Ok(Fresh::NotTried);
        };
        let mut lease = self.lease().await?;
        let conn = lease.conn();
        let Some(no_backslash_escapes) = literal::no_backslash_escapes(conn) else {
            lease.keep();
            return Ok(Fresh::NotTried);
        };
        let list: Vec<String> = ips
            .iter()
            .map(|ip| mysql_async::Value::from(*ip).as_sql(no_backslash_escapes))
            .collect();
        let list = list.join(",");
        let sql = format!(
            "{};SET @banmesh_guard = (SELECT 1 FROM (SELECT 1 UNION ALL SELECT 2) g \
             WHERE EXISTS (SELECT 1 FROM events WHERE kind = 1 AND ip IN ({list})));{}",
            sql::events::latest_bans_sql(&list),
            statement(batch, &keys, &pos, now, no_backslash_escapes),
        );
        let fresh = match send(conn, sql, 2 + TRANSACTION, 2).await {
            (answers, None) => {
                Fresh::Committed(outcomes(&answers, 2 + TRANSACTION, batch, &pos, now)?)
            }
            (answers, Some((at, e))) => {
                let (code, e) = recover(conn, at, 2, e).await?;
                if at == 1 && code == GUARD_REFUSED {
                    let mut facts = LadderFacts::default();
                    for row in answers.rows {
                        let (ip, latest) = sql::events::latest_ban(&super::to_row(row))?;
                        facts.latest.insert(ip, latest);
                    }
                    Fresh::History(facts)
                } else {
                    if code != DUPLICATE_KEY && !e.is_conflict() {
                        tracing::debug!(error = %e, "one-trip commit refused; committing stepwise");
                    }
                    Fresh::NotTried
                }
            }
        };
        lease.keep();
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use mysql_async::prelude::Queryable;

    use super::*;
    use crate::{
        ban::{Ban, BanTerm},
        hub::store::{Store, mysql::MysqlStore},
    };

    fn server() -> String {
        std::env::var("BANMESH_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
    }

    fn report(host: &str, seq: u64, ip: &str, plan: Plan) -> NewReport {
        NewReport {
            host: host.into(),
            seq,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            plan,
        }
    }

    fn ban(rung: u32, reason: &str) -> Plan {
        Plan::New(BanTerm {
            ends_ms: 5_000,
            rung,
            extends: 0,
            reason: reason.into(),
        })
    }

    /// `(id, kind, extends, rung, reason)` of every row, in id order.
    async fn rows(c: &mut Conn) -> Vec<(u64, i64, Option<u64>, Option<i64>, Option<String>)> {
        c.query("SELECT id, kind, extends, rung, reason FROM events ORDER BY id")
            .await
            .unwrap()
    }

    /// A batch with a ban coalesced into another of the batch goes in one
    /// round trip with the ids and `extends` the stepwise commit gives;
    /// a re-send is refused there, rolled back, and answered stepwise with
    /// its first outcome; with the counter row deleted, ids still start
    /// above every stored row.
    #[tokio::test]
    async fn one_trip_commits_what_stepwise_would_and_leaves_resends_to_it() {
        let name = format!("banmesh_u{}_onetrip", std::process::id());
        let store = MysqlStore::open(&format!("{}/{name}", server()))
            .await
            .expect("open the test database");
        let mut c = store.conn().await.unwrap();
        // A row stored before: the counter steps over it.
        store
            .commit_at(&[report("web-0", 1, "192.0.2.100", ban(1, ""))], 1)
            .await
            .unwrap();
        let batch = vec![
            report("web-1", 1, "192.0.2.1", ban(1, "it's 'quoted' \\ and \n")),
            report("web-2", 1, "192.0.2.1", Plan::CoalesceWith(0)),
            report("web-1", 2, "192.0.2.2", ban(2, "")),
            report("web-3", 7, "192.0.2.1", Plan::CoalesceWith(0)),
        ];
        let mut keys = Vec::new();
        for r in &batch {
            keys.push((sql::host_id(&store, &r.host).await.unwrap(), r.seq));
        }
        // The kept connection's quoting mode is known after one answer.
        c.query_drop("DO 1").await.unwrap();
        let out = commit(&mut c, &batch, &keys, 2)
            .await
            .unwrap()
            .expect("a batch without re-sends goes in one trip");
        let first = match &out[0] {
            Committed::New(e) => e.id,
            other => panic!("{other:?}"),
        };
        assert_eq!(first, 2, "above the row stored before");
        assert!(
            matches!(&out[2], Committed::New(e) if e.id == 3 && e.term.rung == 2),
            "{:?}",
            out[2]
        );
        let coalesced = |row| Committed::Coalesced { event_id: 2, row };
        assert_eq!((&out[1], &out[3]), (&coalesced(4), &coalesced(5)));
        let in_tx: i64 = c
            .query_first("SELECT @@in_transaction")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(in_tx, 0, "committed");
        assert_eq!(
            rows(&mut c).await[1..],
            [
                (2, 1, None, Some(1), Some("it's 'quoted' \\ and \n".into())),
                (3, 1, None, Some(2), None),
                (4, 5, Some(2), None, None),
                (5, 5, Some(2), None, None),
            ]
        );

        // A re-send among new reports: refused, rolled back, nothing stored.
        let again = vec![
            report("web-1", 3, "192.0.2.3", ban(1, "")),
            batch[2].clone(),
        ];
        let again_keys = [(keys[0].0, 3), keys[2]];
        assert_eq!(commit(&mut c, &again, &again_keys, 3).await.unwrap(), None);
        let in_tx: i64 = c
            .query_first("SELECT @@in_transaction")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(in_tx, 0, "no transaction left open");
        assert_eq!(rows(&mut c).await.len(), 5, "nothing of it stored");
        let v: i64 = c
            .query_first("SELECT v FROM banmesh_meta WHERE k = 'next_event_id'")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v, 6, "the counter rolled back too");
        // A key twice in one batch never tries the one trip.
        assert_eq!(
            commit(
                &mut c,
                &[again[0].clone(), again[0].clone()],
                &[again_keys[0]; 2],
                3
            )
            .await
            .unwrap(),
            None
        );

        // The counter row gone (deleted by hand): the upsert makes it anew
        // above every stored id.
        c.query_drop("DELETE FROM banmesh_meta WHERE k = 'next_event_id'")
            .await
            .unwrap();
        let out = commit(&mut c, &again[..1], &again_keys[..1], 4)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out[0].event_id(), 6);
        drop(c);

        // Through the store: the re-send answered with its first id.
        let stored = store.commit_at(&again, 5).await.unwrap();
        assert_eq!(
            stored,
            [Committed::Duplicate(6), Committed::Duplicate(3)],
            "{stored:?}"
        );
        let mut c = store.conn().await.unwrap();
        c.query_drop(format!("DROP DATABASE {name}")).await.unwrap();
    }

    /// The fresh commit stores a batch of addresses without history in
    /// one trip; with a past ban it stores nothing and hands back what the
    /// ladder's own read gives; a re-send it stores nothing either.
    #[tokio::test]
    async fn fresh_commit_stores_only_when_no_address_has_history() {
        let name = format!("banmesh_u{}_fresh", std::process::id());
        let store = MysqlStore::open(&format!("{}/{name}", server()))
            .await
            .expect("open the test database");
        // Warms the kept connection (its quoting mode known), and stores
        // a report coalesced into a ban that is not there: a key of an
        // address with no ban.
        store
            .commit_at(&[report("web-1", 1, "192.0.2.9", Plan::Coalesce(999))], 1)
            .await
            .unwrap();
        let a = report("web-1", 2, "192.0.2.1", ban(1, ""));
        let b = report("web-2", 1, "192.0.2.2", ban(1, "why"));
        let Fresh::Committed(out) = store.fresh_commit(&[a.clone(), b], 2).await.unwrap() else {
            panic!("no address has history");
        };
        assert_eq!(
            out.iter().map(Committed::event_id).collect::<Vec<_>>(),
            [2, 3]
        );

        let again = report("web-3", 1, "192.0.2.1", ban(1, ""));
        let fresh = store
            .fresh_commit(std::slice::from_ref(&again), 3)
            .await
            .unwrap();
        let Fresh::History(facts) = fresh else {
            panic!("192.0.2.1 has a ban: {fresh:?}");
        };
        let read = store.ladder_facts(&[again]).await.unwrap();
        assert_eq!(facts.latest, read.latest);
        assert_eq!(facts.latest["192.0.2.1"].0, 2);

        let resent = report("web-1", 1, "192.0.2.9", ban(1, ""));
        let fresh = store.fresh_commit(&[resent], 4).await.unwrap();
        assert!(matches!(fresh, Fresh::NotTried), "{fresh:?}");
        let mut c = store.conn().await.unwrap();
        assert_eq!(rows(&mut c).await.len(), 3, "nothing more stored");
        assert!(
            store.dedicated.0.lock().unwrap().is_some(),
            "the connection is kept: clean"
        );
        c.query_drop(format!("DROP DATABASE {name}")).await.unwrap();
    }
}
