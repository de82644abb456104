//! The small interface the shared SQL layer (`sql/`) is written against,
//! and the values and rows that cross it.
//!
//! Each backend implements [`Executor`] with its own driver (`mysql_async`,
//! `rusqlite`) and [`Backend`] for what stays its own: opening a session and
//! the two tuned write paths. Everything else a store does is written once.
//!
//! Why values are three kinds only: every column banmesh stores is an
//! integer or text (ids are below 2^63, times are milliseconds), so a row
//! needs no richer type, and both drivers convert to and from these without
//! loss.
use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;

use super::{Committed, NewReport, StoreError, schema::Dialect};
use crate::ban::Status;

/// A value bound to a placeholder or read from a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    /// Ids and sequences stay below 2^63 (both databases' signed range).
    fn from(v: u64) -> Self {
        Value::Int(v as i64)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `params![a, b, ...]`: a `Vec<Value>` from anything convertible.
macro_rules! params {
    ($($v:expr),* $(,)?) => { vec![$($crate::hub::store::executor::Value::from($v)),*] };
}
pub(crate) use params;

/// One result row, read by column position.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn bad(&self, i: usize, want: &str) -> StoreError {
        StoreError::query(format!(
            "column {i} is {:?}, expected {want}",
            self.0.get(i)
        ))
    }

    /// An integer column that may be NULL. MySQL's text protocol sends
    /// numbers as text; they are parsed here.
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.0.get(i) {
            Some(Value::Null) => Ok(None),
            Some(Value::Int(v)) => Ok(Some(*v)),
            Some(Value::Text(t)) => t.parse().map(Some).map_err(|_| self.bad(i, "an integer")),
            None => Err(self.bad(i, "an integer")),
        }
    }

    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_i64(i)?.ok_or_else(|| self.bad(i, "an integer"))
    }

    pub fn u64(&self, i: usize) -> Result<u64, StoreError> {
        self.i64(i).map(|v| v as u64)
    }

    pub fn opt_u64(&self, i: usize) -> Result<Option<u64>, StoreError> {
        Ok(self.opt_i64(i)?.map(|v| v as u64))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.0.get(i) {
            Some(Value::Null) => Ok(None),
            Some(Value::Text(t)) => Ok(Some(t.clone())),
            _ => Err(self.bad(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.bad(i, "text"))
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// Rows the statement changed (MySQL: changed, not merely matched).
    pub affected: u64,
    /// The id the last single-row `INSERT` was given.
    pub last_id: u64,
}

/// One connection's worth of statements, `?` placeholders in both dialects.
///
/// A transaction runs from `begin` to `commit`; dropping the executor
/// before `commit` rolls it back, so an early return never half-writes.
#[async_trait]
pub trait Executor: Send {
    async fn exec(&mut self, sql: &str, params: Vec<Value>) -> Result<Done, StoreError>;
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<Vec<Row>, StoreError>;
    async fn begin(&mut self) -> Result<(), StoreError>;
    async fn commit(&mut self) -> Result<(), StoreError>;
}

/// What a backend provides; `sql/` turns any `Backend` into a `Store`.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    fn dialect(&self) -> Dialect;
    /// Host name -> id, shared by the generic and the tuned paths.
    fn host_ids(&self) -> &HostIds;
    /// A connection (MySQL: from the pool; SQLite: the one connection,
    /// held until the session is dropped).
    async fn session(&self) -> Result<Box<dyn Executor + '_>, StoreError>;
    /// The session of the committer's reads before a commit (the ladder's):
    /// MySQL lends the connection its commits run on, kept between them
    /// with its prepared statements (`mysql::dedicated`); elsewhere any
    /// session.
    async fn commit_session(&self) -> Result<Box<dyn Executor + '_>, StoreError> {
        self.session().await
    }
    /// The group commit, tuned per backend (see `Store::commit`).
    async fn commit_batch(
        &self,
        batch: &[NewReport],
        now: i64,
    ) -> Result<Vec<Committed>, StoreError>;
    /// The grouped status writes, tuned per backend (see `Store::set_statuses`).
    async fn write_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError>;
}

/// Host name -> id, by the name in lower case (hosts are one
/// case-insensitive namespace). Hosts are never renamed or deleted, so an
/// entry never goes stale; a miss is looked up (or created) in the database.
#[derive(Debug, Default)]
pub struct HostIds {
    ids: Mutex<HashMap<String, u64>>,
    /// The last `ip_table` rebuild failed: the next refresh retries it
    /// even if no host joined since.
    view_stale: std::sync::atomic::AtomicBool,
    /// Held across one rebuild of the view (read the hosts, replace the
    /// view): two rebuilds at once could finish out of order, leaving the
    /// view on the older list of hosts while the cache has the newer.
    rebuilding: tokio::sync::Mutex<()>,
}

impl HostIds {
    /// The id of host `name`, in any letter case, if cached.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.ids
            .lock()
            .unwrap()
            .get(&name.to_ascii_lowercase())
            .copied()
    }

    /// How many hosts are known.
    pub fn len(&self) -> usize {
        self.ids.lock().unwrap().len()
    }

    /// Whether the `ip_table` view may lag the hosts known (its last
    /// rebuild failed).
    pub fn view_stale(&self) -> bool {
        self.view_stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records whether the last `ip_table` rebuild failed.
    pub fn set_view_stale(&self, stale: bool) {
        self.view_stale
            .store(stale, std::sync::atomic::Ordering::Relaxed);
    }

    /// Taken for one rebuild of the view, so rebuilds run one at a time.
    pub async fn rebuilding(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.rebuilding.lock().await
    }

    /// Adds entries; returns how many hosts are now known. Of two stored
    /// names that differ only in case (possible in SQLite stores of
    /// earlier builds), the first (lowest id, as given in order) wins.
    pub fn extend(&self, hosts: impl IntoIterator<Item = (u64, String)>) -> usize {
        let mut ids = self.ids.lock().unwrap();
        for (id, n) in hosts {
            ids.entry(n.to_ascii_lowercase()).or_insert(id);
        }
        ids.len()
    }
}
