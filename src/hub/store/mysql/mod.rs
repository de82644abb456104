//! MySQL / MariaDB backend through `mysql_async`: the production store.
//!
//! InnoDB tables, one transaction per batch; the hub's committer is the only
//! writer of events, so ids are assigned in commit order. Everything but the
//! group commit and the grouped status writes is the shared SQL layer
//! (`sql/`) running on `MysqlSession`; those two are tuned in `commit.rs`
//! for MySQL's multi-row statements and `INSERT IGNORE`.
use async_trait::async_trait;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, Transaction, TxOpts, Value, prelude::*};

use super::{
    Committed, NewReport, StoreError,
    executor::{self, Backend, Done, Executor, HostIds, Row},
    redact,
    schema::{self, Dialect},
    sql,
};
use crate::ban::Status;

mod commit;

/// The MySQL store: a connection pool and what it learnt at open.
pub struct MysqlStore {
    pool: Pool,
    /// `host:port` of the server, for messages (the URL may hold a password).
    at: String,
    host_ids: HostIds,
}

fn q(e: mysql_async::Error) -> StoreError {
    StoreError::Query(Box::new(e))
}

/// The server's address as error messages show it: `host:port`, never the
/// URL, whose password must not reach a log line.
fn unreachable(at: &str, e: mysql_async::Error) -> StoreError {
    StoreError::Unreachable {
        at: at.to_string(),
        source: Box::new(e),
    }
}

impl MysqlStore {
    /// Connects, creates the database named in the URL if missing, and
    /// brings the schema to this build's version.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let opts = Opts::from_url(url).map_err(|_| StoreError::BadUrl(redact(url)))?;
        let at = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        let db = opts.db_name().unwrap_or("banmesh").to_string();
        if !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StoreError::BadUrl(redact(url)));
        }
        let mut admin = Conn::new(OptsBuilder::from_opts(opts.clone()).db_name(None::<String>))
            .await
            .map_err(|e| unreachable(&at, e))?;
        // Looked up before it is created: `CREATE DATABASE IF NOT EXISTS`
        // is DDL even when the database exists, and under Galera DDL runs
        // in the cluster's total order (see `schema::migrate`).
        let exists: Option<String> = admin
            .exec_first(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
                (db.as_str(),),
            )
            .await
            .map_err(q)?;
        if exists.is_none() {
            admin
                .query_drop(format!("CREATE DATABASE IF NOT EXISTS `{db}`"))
                .await
                .map_err(q)?;
        }
        admin.disconnect().await.map_err(q)?;

        let pool = Pool::new(OptsBuilder::from_opts(opts).db_name(Some(db)));
        let store = MysqlStore {
            pool,
            at,
            host_ids: HostIds::default(),
        };
        let mut ex = store.session().await?;
        schema::migrate(&mut *ex, Dialect::MySql).await?;
        sql::refresh_hosts(&store, &mut *ex).await?;
        drop(ex);
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.pool
            .get_conn()
            .await
            .map_err(|e| unreachable(&self.at, e))
    }
}

impl From<executor::Value> for Value {
    fn from(v: executor::Value) -> Self {
        match v {
            executor::Value::Null => Value::NULL,
            executor::Value::Int(i) => Value::Int(i),
            executor::Value::Text(t) => Value::Bytes(t.into_bytes()),
        }
    }
}

fn to_row(r: mysql_async::Row) -> Row {
    Row(r
        .unwrap()
        .into_iter()
        .map(|v| match v {
            Value::NULL => executor::Value::Null,
            Value::Int(i) => executor::Value::Int(i),
            Value::UInt(u) => executor::Value::Int(u as i64),
            Value::Bytes(b) => executor::Value::Text(String::from_utf8_lossy(&b).into_owned()),
            other => executor::Value::Text(other.as_sql(true)),
        })
        .collect())
}

/// A pooled connection, or a transaction on one.
///
/// Statements without parameters go over the text protocol (DDL cannot
/// always be prepared, and `IN (..)` lists built inline would fill the
/// prepared-statement cache); [`Row`] parses the numbers it sends as text.
struct MysqlSession<'a> {
    store: &'a MysqlStore,
    conn: Option<Conn>,
    /// Dropped without `commit`, it rolls back when its connection returns
    /// to the pool.
    tx: Option<Transaction<'static>>,
}

impl MysqlSession<'_> {
    /// The idle connection, taken from the pool on first use.
    async fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.is_none() {
            self.conn = Some(self.store.conn().await?);
        }
        Ok(self.conn.as_mut().unwrap())
    }
}

async fn exec_on<Q: Queryable>(c: &mut Q, sql: &str, params: Vec<Value>) -> Result<(), StoreError> {
    if params.is_empty() {
        c.query_drop(sql).await.map_err(q)
    } else {
        c.exec_drop(sql, params).await.map_err(q)
    }
}

async fn query_on<Q: Queryable>(
    c: &mut Q,
    sql: &str,
    params: Vec<Value>,
) -> Result<Vec<Row>, StoreError> {
    let rows: Vec<mysql_async::Row> = if params.is_empty() {
        c.query(sql).await.map_err(q)?
    } else {
        c.exec(sql, params).await.map_err(q)?
    };
    Ok(rows.into_iter().map(to_row).collect())
}

fn done(affected: u64, last_id: Option<u64>) -> Done {
    Done {
        affected,
        last_id: last_id.unwrap_or(0),
    }
}

#[async_trait]
impl Executor for MysqlSession<'_> {
    async fn exec(&mut self, sql: &str, params: Vec<executor::Value>) -> Result<Done, StoreError> {
        let params: Vec<Value> = params.into_iter().map(Into::into).collect();
        if let Some(tx) = self.tx.as_mut() {
            exec_on(tx, sql, params).await?;
            return Ok(done(tx.affected_rows(), tx.last_insert_id()));
        }
        // An autocommit statement that lost a conflict (Galera: another
        // hub's write-set certified first) was rolled back whole: again.
        let mut attempt = 0;
        loop {
            let c = self.conn().await?;
            match exec_on(c, sql, params.clone()).await {
                Err(e) if e.is_conflict() && attempt < sql::sequence::MAX_CONFLICT_RETRIES => {
                    attempt += 1;
                    sql::sequence::back_off(attempt).await;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(done(c.affected_rows(), c.last_insert_id())),
            }
        }
    }

    async fn query(
        &mut self,
        sql: &str,
        params: Vec<executor::Value>,
    ) -> Result<Vec<Row>, StoreError> {
        let params: Vec<Value> = params.into_iter().map(Into::into).collect();
        match self.tx.as_mut() {
            Some(tx) => query_on(tx, sql, params).await,
            None => query_on(self.conn().await?, sql, params).await,
        }
    }

    async fn begin(&mut self) -> Result<(), StoreError> {
        // The pool's transaction owns its connection; the idle one goes back.
        self.conn = None;
        let tx = self
            .store
            .pool
            .start_transaction(TxOpts::default())
            .await
            .map_err(|e| unreachable(&self.store.at, e))?;
        self.tx = Some(tx);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        match self.tx.take() {
            Some(tx) => tx.commit().await.map_err(q),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for MysqlStore {
    fn dialect(&self) -> Dialect {
        Dialect::MySql
    }

    fn host_ids(&self) -> &HostIds {
        &self.host_ids
    }

    async fn session(&self) -> Result<Box<dyn Executor + '_>, StoreError> {
        Ok(Box::new(MysqlSession {
            store: self,
            conn: None,
            tx: None,
        }))
    }

    async fn commit_batch(
        &self,
        batch: &[NewReport],
        now: i64,
    ) -> Result<Vec<Committed>, StoreError> {
        self.group_commit(batch, now).await
    }

    async fn write_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError> {
        self.grouped_statuses(updates).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens on port 1: both the first connection and a later
    /// pooled one fail, and say where without the password.
    #[tokio::test]
    async fn an_unreachable_server_is_named_by_host_and_port_never_password() {
        let url = "mysql://banmesh:s3cret-pw@127.0.0.1:1/banmesh";
        let Err(e) = MysqlStore::open(url).await else {
            panic!("nothing listens on port 1");
        };
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Unreachable { .. }), "{msg}");
        assert!(msg.contains("127.0.0.1:1"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
        assert!(std::error::Error::source(&e).is_some(), "driver error kept");

        let store = MysqlStore {
            pool: Pool::new(Opts::from_url(url).unwrap()),
            at: "127.0.0.1:1".into(),
            host_ids: HostIds::default(),
        };
        let Err(e) = store.conn().await else {
            panic!("nothing listens on port 1");
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot reach the database at 127.0.0.1:1: "),
            "{msg}"
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }
}
