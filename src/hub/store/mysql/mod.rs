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
mod dedicated;
pub mod health;
mod literal;

/// mysql_async keeps up to this many freed packet buffers for reuse (its
/// default: 128)...
const BUFFER_POOL_CAP: &str = "1";
/// ...each shrunk to at most this many bytes (its default: 4 MiB).
const BUFFER_SIZE_CAP: &str = "262144";

/// Bounds the packet buffers mysql_async keeps for reuse, where the
/// operator has not set them: by default it keeps up to 128 of up to 4 MiB
/// each, and a hub that wrote many hosts' first rows at once held them for
/// good (29 KiB per subscriber, docs/perf/hub-subscriber-memory.txt).
/// Measured (`bench --quick --only fanout,ingest`, same binary, the
/// environment set): RSS per subscriber added 96 KiB with mysql_async's
/// defaults, 87 with 16 buffers kept, 73 with 1; hub CPU per ingested
/// report 5.85, 5.7 and 5.55 µs: reuse saved nothing measurable, so one
/// is kept. mysql_async reads these once, when its first pool is made,
/// from the environment only.
///
/// # Safety
///
/// Writes the process environment: call it before any other thread
/// exists (before the tokio runtime starts).
pub unsafe fn bound_buffer_pool() {
    for (name, value) in [
        ("MYSQL_ASYNC_BUFFER_POOL_CAP", BUFFER_POOL_CAP),
        ("MYSQL_ASYNC_BUFFER_SIZE_CAP", BUFFER_SIZE_CAP),
    ] {
        if std::env::var_os(name).is_none() {
            // SAFETY: the caller guarantees no other thread runs yet.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// The MySQL store: a connection pool and what it learnt at open.
///
/// `--db` may list several addresses of one Galera cluster (or of one
/// server and its replicas promoted by hand): the pool reaches one of them
/// at a time ([`Self::current`]), and the hub's database watch
/// (`hub::db_health`) moves it to another with [`Self::move_to`] when the
/// one in use stops being healthy. Every caller takes the pool afresh for
/// each session, so a move reaches the committer and every reader at their
/// next statement; statements in flight on the old pool fail, and nothing
/// that failed was acknowledged.
pub struct MysqlStore {
    /// Every address `--db` lists, in the operator's order of preference.
    targets: Vec<Target>,
    /// The pool in use and which target it reaches.
    current: std::sync::RwLock<Current>,
    host_ids: HostIds,
    /// The committer's connection, kept out of the pool (`dedicated`).
    dedicated: dedicated::Slot,
}

/// One `--db` address.
#[derive(Clone)]
struct Target {
    /// The URL's options, with the database name set.
    opts: Opts,
    /// `host:port` of the server, for messages (the URL may hold a password).
    at: String,
}

/// The pool in use and the index of its target.
#[derive(Clone)]
struct Current {
    pool: Pool,
    index: usize,
    /// Bumped by every [`MysqlStore::move_to`]: a connection taken from
    /// an older pool is not kept (`dedicated`).
    generation: u64,
}

/// How long opening one `--db` address may take before the next is tried
/// (a blackholed address would otherwise wait out TCP's timeouts).
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The MySQL URLs of a `--db` value: one URL, or several separated by
/// commas (a comma inside a URL, e.g. in a password, must be written
/// `%2C`; a piece that does not start with `mysql://` is refused).
pub fn urls(list: &str) -> Result<Vec<String>, StoreError> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty() || urls.iter().any(|u| !u.starts_with("mysql://")) {
        // Redacted whole: a piece may be the tail of a password.
        return Err(StoreError::BadUrl(redact(list)));
    }
    Ok(urls)
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
    /// Connects to the first healthy address of `list` (one URL, or several
    /// separated by commas: see [`urls`]), creates the database named in
    /// its URL if missing, and brings the schema to this build's version.
    pub async fn open(list: &str) -> Result<Self, StoreError> {
        let mut targets = Vec::new();
        for url in urls(list)? {
            let opts = Opts::from_url(&url).map_err(|_| StoreError::BadUrl(redact(&url)))?;
            let at = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
            let db = opts.db_name().unwrap_or("banmesh").to_string();
            if !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(StoreError::BadUrl(redact(&url)));
            }
            let opts = OptsBuilder::from_opts(opts).db_name(Some(db)).into();
            targets.push(Target { opts, at });
        }
        let mut failed = Vec::new();
        for index in 0..targets.len() {
            let open = tokio::time::timeout(OPEN_TIMEOUT, Self::open_at(&targets, index));
            let e = match open.await {
                Ok(Ok(store)) => return Ok(store),
                Ok(Err(e)) => e,
                Err(_) => StoreError::Unreachable {
                    at: targets[index].at.clone(),
                    source: format!("no answer within {OPEN_TIMEOUT:?}").into(),
                },
            };
            // A newer schema is the same everywhere: no other address helps.
            if targets.len() == 1 || matches!(e, StoreError::NewerSchema { .. }) {
                return Err(e);
            }
            tracing::warn!(at = %targets[index].at, error = %e, "cannot use this --db address; trying the next");
            failed.push(e.to_string());
        }
        Err(StoreError::Unreachable {
            at: targets
                .iter()
                .map(|t| t.at.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            source: format!("no --db address is healthy ({})", failed.join("; ")).into(),
        })
    }

    /// Opens the store on `targets[index]`, if that server is healthy
    /// (`health::probe`: a Galera node must be in the primary component).
    async fn open_at(targets: &[Target], index: usize) -> Result<Self, StoreError> {
        let Target { opts, at } = &targets[index];
        let db = opts.db_name().unwrap_or("banmesh").to_string();
        let mut admin = Conn::new(OptsBuilder::from_opts(opts.clone()).db_name(None::<String>))
            .await
            .map_err(|e| unreachable(at, e))?;
        if let Err(reason) = health::state(&mut admin, at).await {
            let _ = admin.disconnect().await;
            return Err(StoreError::Unreachable {
                at: at.clone(),
                source: reason.into(),
            });
        }
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

        let store = MysqlStore {
            current: std::sync::RwLock::new(Current {
                pool: Pool::new(opts.clone()),
                index,
                generation: 0,
            }),
            targets: targets.to_vec(),
            host_ids: HostIds::default(),
            dedicated: dedicated::Slot::default(),
        };
        let mut ex = store.session().await?;
        schema::migrate(&mut *ex, Dialect::MySql).await?;
        sql::refresh_hosts(&store, &mut *ex).await?;
        drop(ex);
        Ok(store)
    }

    /// The pool in use (a handle: cheap to clone).
    fn pool(&self) -> Pool {
        self.current.read().unwrap().pool.clone()
    }

    /// How many times the pool was replaced (`Current::generation`).
    fn generation(&self) -> u64 {
        self.current.read().unwrap().generation
    }

    /// `host:port` of the address in use.
    fn at(&self) -> String {
        self.targets[self.current()].at.clone()
    }

    /// The index in `--db` of the address in use.
    pub fn current(&self) -> usize {
        self.current.read().unwrap().index
    }

    /// `host:port` of every `--db` address, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.at.clone()).collect()
    }

    /// Points the store at `--db` address `index` with a new pool (also
    /// to renew the pool of the same address after it came back: its old
    /// connections may be dead). The old pool's connections close in the
    /// background; sessions holding one finish on it or fail.
    pub fn move_to(&self, index: usize) {
        let old = {
            let mut current = self.current.write().unwrap();
            let fresh = Current {
                pool: Pool::new(self.targets[index].opts.clone()),
                index,
                generation: current.generation + 1,
            };
            std::mem::replace(&mut *current, fresh)
        };
        self.dedicated.clear();
        tokio::spawn(async move {
            // A dead server never answers the goodbye: bounded.
            let _ = tokio::time::timeout(OPEN_TIMEOUT, old.pool.disconnect()).await;
        });
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.pool()
            .get_conn()
            .await
            .map_err(|e| unreachable(&self.at(), e))
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
    /// The committer's connection instead of a pooled one
    /// ([`Backend::commit_session`]); kept for the next commit when no
    /// statement failed.
    lease: Option<dedicated::Lease<'a>>,
    failed: bool,
}

impl MysqlSession<'_> {
    /// The idle connection, taken from the pool on first use.
    async fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        if let Some(lease) = self.lease.as_mut() {
            return Ok(lease.conn());
        }
        if self.conn.is_none() {
            self.conn = Some(self.store.conn().await?);
        }
        Ok(self.conn.as_mut().unwrap())
    }

    /// Marks a statement under way: a session dropped before it finishes
    /// (a call cancelled by the database watch's bound) leaves its answer
    /// unread on the connection, which must then not be kept.
    fn start(&mut self) -> bool {
        std::mem::replace(&mut self.failed, true)
    }

    /// Notes how a statement begun with [`Self::start`] ended: a failed one
    /// leaves the leased connection to the pool.
    fn note<T>(&mut self, failed_before: bool, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.failed = failed_before || r.is_err();
        r
    }
}

impl Drop for MysqlSession<'_> {
    fn drop(&mut self) {
        if let (Some(lease), false) = (self.lease.take(), self.failed) {
            lease.keep();
        }
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
        if self.lease.is_some() {
            let before = self.start();
            let c = self.conn().await?;
            let r = exec_on(c, sql, params)
                .await
                .map(|()| done(c.affected_rows(), c.last_insert_id()));
            return self.note(before, r);
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
        let before = self.start();
        let r = match self.tx.as_mut() {
            Some(tx) => query_on(tx, sql, params).await,
            None => query_on(self.conn().await?, sql, params).await,
        };
        self.note(before, r)
    }

    async fn begin(&mut self) -> Result<(), StoreError> {
        // The pool's transaction owns its connection; the idle one goes back.
        self.conn = None;
        // A lease serves reads only (the ladder's): given back as it is.
        if let Some(lease) = self.lease.take() {
            lease.keep();
        }
        let tx = self
            .store
            .pool()
            .start_transaction(TxOpts::default())
            .await
            .map_err(|e| unreachable(&self.store.at(), e))?;
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
            lease: None,
            failed: false,
        }))
    }

    async fn commit_session(&self) -> Result<Box<dyn Executor + '_>, StoreError> {
        Ok(Box::new(MysqlSession {
            store: self,
            conn: None,
            tx: None,
            lease: Some(self.lease().await?),
            failed: false,
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

    #[test]
    fn a_list_of_addresses_is_split_and_a_stray_piece_refused_without_its_password() {
        assert_eq!(
            urls("mysql://u:p@g1/banmesh, mysql://u:p@g2/banmesh").unwrap(),
            ["mysql://u:p@g1/banmesh", "mysql://u:p@g2/banmesh"]
        );
        assert_eq!(urls("mysql://g1/b").unwrap(), ["mysql://g1/b"]);
        for bad in [
            "mysql://u:s3,cret@g1/banmesh",
            "mysql://u:s3cret@g1/b,sqlite:x",
            ",",
        ] {
            let e = urls(bad).unwrap_err().to_string();
            assert!(e.starts_with("unsupported --db"), "{e}");
            assert!(!e.contains("s3"), "{e}");
        }
    }

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

        let opts = Opts::from_url(url).unwrap();
        let store = MysqlStore {
            current: std::sync::RwLock::new(Current {
                pool: Pool::new(opts.clone()),
                index: 0,
                generation: 0,
            }),
            targets: vec![Target {
                opts,
                at: "127.0.0.1:1".into(),
            }],
            host_ids: HostIds::default(),
            dedicated: dedicated::Slot::default(),
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
