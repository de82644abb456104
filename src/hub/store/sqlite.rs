//! Embedded backend: SQLite through `rusqlite` with its bundled library.
//!
//! Chosen because it is one file, needs no server, is the most deployed
//! embedded SQL engine, and speaks enough SQL (views, upserts, row values)
//! to keep the same schema and semantics as MySQL. WAL with
//! `synchronous=FULL`: an acknowledged batch survives a SIGKILL and a power
//! cut. One connection: the hub has one writer anyway.
//!
//! Sessions take turns (an async mutex held for a session's life), so a
//! transaction of the shared SQL layer (`sql/`), which spans several
//! statements, never interleaves with another's; each statement runs on a
//! blocking thread, never on the async workers (a commit waits for fsync).
//! The group commit and the status writes are tuned here: prepared
//! statements row by row, which SQLite runs faster than one long statement.
use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use rusqlite::{
    Connection, OptionalExtension, ToSql, params, params_from_iter,
    types::{ToSqlOutput, ValueRef},
};

use super::{
    COALESCED_KIND, Committed, NewReport, StoreError, Stored,
    executor::{self, Backend, Done, Executor, HostIds, Row},
    schema::{self, Dialect},
    sql,
};
use crate::ban::Status;

fn q(e: rusqlite::Error) -> StoreError {
    StoreError::Query(Box::new(e))
}

/// The one connection, and which session may use it.
struct Shared {
    conn: Connection,
    /// The session whose statements may run. A statement of a session that
    /// was dropped (its future cancelled) may still be queued on a blocking
    /// thread; it finds another number here and does nothing, so it can
    /// neither run outside the transaction it belonged to nor inside the
    /// next session's.
    session: u64,
}

/// The SQLite store: one connection, taken in turns.
pub struct SqliteStore {
    shared: Arc<Mutex<Shared>>,
    /// Held by a session (or a tuned write) for its whole life.
    turn: tokio::sync::Mutex<()>,
    host_ids: HostIds,
}

impl SqliteStore {
    /// Opens (or creates) the file and brings the schema to this build's
    /// version.
    pub async fn open(path: &str) -> Result<Self, StoreError> {
        let path = path.to_string();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            let unreachable =
                |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Unreachable {
                    at: path.clone(),
                    source: e,
                };
            if let Some(dir) = Path::new(&path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| unreachable(Box::new(e)))?;
            }
            let conn = Connection::open(&path).map_err(|e| unreachable(Box::new(e)))?;
            conn.execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
            )
            .map_err(q)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Query(Box::new(e)))??;
        let store = SqliteStore {
            shared: Arc::new(Mutex::new(Shared { conn, session: 0 })),
            turn: tokio::sync::Mutex::new(()),
            host_ids: HostIds::default(),
        };
        let mut ex = store.session().await?;
        schema::migrate(&mut *ex, Dialect::Sqlite).await?;
        sql::refresh_hosts(&store, &mut *ex).await?;
        drop(ex);
        Ok(store)
    }

    /// Runs `f` on the connection off the async threads, in its turn.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _turn = self.turn.lock().await;
        // One closure is one whole transaction: cancelling it splits nothing.
        run(&self.shared, None, f).await
    }
}

/// Runs `f` on the connection on a blocking thread, if `session` (when
/// given) still holds it.
async fn run<T: Send + 'static>(
    shared: &Arc<Mutex<Shared>>,
    session: Option<u64>,
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = shared.lock().unwrap();
        if session.is_some_and(|id| id != s.session) {
            return Err(StoreError::query("statement of an ended session"));
        }
        f(&mut s.conn)
    })
    .await
    .map_err(|e| StoreError::Query(Box::new(e)))?
}

impl ToSql for executor::Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            executor::Value::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
            executor::Value::Int(i) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*i)),
            executor::Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

fn value(v: ValueRef<'_>) -> executor::Value {
    match v {
        ValueRef::Null => executor::Value::Null,
        ValueRef::Integer(i) => executor::Value::Int(i),
        ValueRef::Real(f) => executor::Value::Text(f.to_string()),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            executor::Value::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

/// The connection, in this session's turn.
struct SqliteSession<'a> {
    store: &'a SqliteStore,
    /// This session's number (see `Shared::session`).
    id: u64,
    _turn: tokio::sync::MutexGuard<'a, ()>,
    /// A transaction is open: dropping the session rolls it back.
    in_tx: bool,
}

impl Drop for SqliteSession<'_> {
    fn drop(&mut self) {
        // Still our turn (the guard drops after this): nothing else ran.
        // Blocks for at most the statement in flight, if any.
        let mut s = self.store.shared.lock().unwrap();
        if self.in_tx {
            let _ = s.conn.execute_batch("ROLLBACK");
        }
        s.session += 1;
    }
}

#[async_trait]
impl Executor for SqliteSession<'_> {
    async fn exec(&mut self, sql: &str, params: Vec<executor::Value>) -> Result<Done, StoreError> {
        let sql = sql.to_string();
        run(&self.store.shared, Some(self.id), move |c| {
            let affected = if params.is_empty() {
                c.prepare(&sql).and_then(|mut st| st.execute([]))
            } else {
                c.prepare_cached(&sql)
                    .and_then(|mut st| st.execute(params_from_iter(&params)))
            }
            .map_err(q)?;
            Ok(Done {
                affected: affected as u64,
                last_id: c.last_insert_rowid() as u64,
            })
        })
        .await
    }

    async fn query(
        &mut self,
        sql: &str,
        params: Vec<executor::Value>,
    ) -> Result<Vec<Row>, StoreError> {
        let sql = sql.to_string();
        run(&self.store.shared, Some(self.id), move |c| {
            let mut st = c.prepare_cached(&sql).map_err(q)?;
            let n = st.column_count();
            let mut rows = st.query(params_from_iter(&params)).map_err(q)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(q)? {
                let row = (0..n)
                    .map(|i| r.get_ref(i).map(value))
                    .collect::<Result<_, _>>()
                    .map_err(q)?;
                out.push(Row(row));
            }
            Ok(out)
        })
        .await
    }

    async fn begin(&mut self) -> Result<(), StoreError> {
        self.exec("BEGIN", vec![]).await?;
        self.in_tx = true;
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        if self.in_tx {
            self.exec("COMMIT", vec![]).await?;
            self.in_tx = false;
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for SqliteStore {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn host_ids(&self) -> &HostIds {
        &self.host_ids
    }

    async fn session(&self) -> Result<Box<dyn Executor + '_>, StoreError> {
        let turn = self.turn.lock().await;
        let id = self.shared.lock().unwrap().session;
        Ok(Box::new(SqliteSession {
            store: self,
            id,
            _turn: turn,
            in_tx: false,
        }))
    }

    async fn commit_batch(
        &self,
        batch: &[NewReport],
        now: i64,
    ) -> Result<Vec<Committed>, StoreError> {
        let mut ids = Vec::with_capacity(batch.len());
        for r in batch {
            ids.push(sql::host_id(self, &r.host).await?);
        }
        let batch = batch.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(q)?;
            tx.execute(sql::sequence::create_sql(Dialect::Sqlite), [])
                .map_err(q)?;
            let mut out: Vec<Committed> = Vec::with_capacity(batch.len());
            {
                let mut find = tx
                    .prepare_cached(
                        "SELECT id, kind, extends, ip, jailname, protocol, port FROM events \
                         WHERE reporter_id = ?1 AND node_seq = ?2",
                    )
                    .map_err(q)?;
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, \
                         jailname, protocol, port, ip, ends_ms, rung, extends, reason, id) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                    )
                    .map_err(q)?;
                for (r, hid) in batch.iter().zip(&ids) {
                    let hid = *hid as i64;
                    let seq = r.seq as i64;
                    type Row = (i64, i64, Option<i64>, String, String, String, String);
                    let existing: Option<Row> = find
                        .query_row(params![hid, seq], |r| {
                            Ok((
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                            ))
                        })
                        .optional()
                        .map_err(q)?;
                    let b = &r.ban;
                    let mut key = Some(seq);
                    if let Some((id, kind, extends, ip, jail, protocol, port)) = existing {
                        if (ip, jail, protocol, port) == (b.ip.clone(), b.jail.clone(), b.protocol.clone(), b.port.clone()) {
                            let id = if kind == COALESCED_KIND { extends.unwrap_or(0) } else { id };
                            out.push(Committed::Duplicate(id as u64));
                            continue;
                        }
                        // The same (host, seq) for another ban: the node's
                        // sequence was reset. Not a re-send: store it, keyless.
                        tracing::warn!(host = %r.host, seq, ip = %b.ip, "sequence reused for a different ban; stored as a new report");
                        key = None;
                    }
                    let row = Stored::of(&r.plan, |i| out.get(i).map(Committed::event_id));
                    // Ids from the counter, as every writer (`sql::sequence`).
                    let next: i64 = tx
                        .query_row(sql::sequence::SQLITE_RESERVE, params![1], |r| r.get(0))
                        .map_err(q)?;
                    let id = next - 1;
                    insert
                        .execute(params![
                            row.kind,
                            hid,
                            key,
                            r.host,
                            now,
                            r.ban.jail,
                            r.ban.protocol,
                            r.ban.port,
                            r.ban.ip,
                            row.ends_ms,
                            row.rung,
                            row.extends.map(|e| e as i64),
                            row.reason,
                            id,
                        ])
                        .map_err(q)?;
                    out.push(row.committed(id as u64, r, now));
                }
            }
            tx.commit().map_err(q)?;
            Ok(out)
        })
        .await
    }

    async fn write_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError> {
        let mut ids = Vec::with_capacity(updates.len());
        for (h, _, _) in updates {
            ids.push(sql::host_id(self, h).await? as i64);
        }
        let updates = updates.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(q)?;
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO statuses (event_id, host_id, status) VALUES (?1, ?2, ?3)
                         ON CONFLICT(event_id, host_id) DO UPDATE SET status = excluded.status",
                    )
                    .map_err(q)?;
                for ((_, id, s), hid) in updates.iter().zip(&ids) {
                    st.execute(params![*id as i64, hid, *s as u8]).map_err(q)?;
                }
            }
            tx.commit().map_err(q)?;
            Ok(updates.len())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn tokens(store: &SqliteStore) -> i64 {
        let mut ex = store.session().await.unwrap();
        let rows = ex
            .query("SELECT COUNT(*) FROM enrol_tokens", vec![])
            .await
            .unwrap();
        rows[0].i64(0).unwrap()
    }

    /// An early return (or a cancelled future) inside a transaction leaves
    /// nothing behind, and a statement of a dropped session cannot run.
    #[tokio::test]
    async fn a_dropped_session_rolls_back_and_its_statements_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        let insert = "INSERT INTO enrol_tokens (hash, name, created_ms, expires_ms, used_ms, \
                      cert_ttl_s) VALUES ('h', NULL, 0, 0, NULL, 0)";
        let mut ex = store.session().await.unwrap();
        ex.begin().await.unwrap();
        ex.exec(insert, vec![]).await.unwrap();
        drop(ex);
        assert_eq!(tokens(&store).await, 0, "rolled back");

        let stale = {
            let _ex = store.session().await.unwrap();
            store.shared.lock().unwrap().session
        };
        let late = run(&store.shared, Some(stale), move |c| {
            c.execute(insert, []).map_err(q)
        })
        .await;
        assert!(late.is_err(), "a dropped session's statement ran");
        assert_eq!(tokens(&store).await, 0);
    }
}
