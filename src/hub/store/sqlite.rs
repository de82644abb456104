//! Embedded backend: SQLite through `rusqlite` with its bundled library.
//!
//! Chosen because it is one file, needs no server, is the most deployed
//! embedded SQL engine, and speaks enough SQL (views, upserts, row values)
//! to keep the same schema and semantics as MySQL. WAL with
//! `synchronous=FULL`: an acknowledged batch survives a SIGKILL and a power
//! cut. One connection behind a mutex: the hub has one writer anyway.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter, types::Value};

use super::{
    BanFilter, BanRow, Committed, EnrollRefused, Enrolled, HostRow, NewReport, NewToken, RawEvent,
    RawHost, RawStatus, SCHEMA_VERSION, Store, StoreError, TokenRow,
};
use crate::ban::{Event, EventKind, Status};

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS banmesh_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS hosts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        enrolled_ms INTEGER NULL,
        cert_expires_ms INTEGER NULL,
        revoked_ms INTEGER NULL
    );
    CREATE TABLE IF NOT EXISTS enrol_tokens (
        hash TEXT PRIMARY KEY,
        name TEXT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        used_ms INTEGER NULL,
        cert_ttl_s INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind INTEGER NOT NULL,
        reporter_id INTEGER NOT NULL,
        node_seq INTEGER NULL,
        added_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        jailname TEXT NOT NULL,
        protocol TEXT NOT NULL,
        port TEXT NOT NULL,
        ip TEXT NOT NULL,
        lifted_by INTEGER NULL,
        lifts INTEGER NULL,
        UNIQUE (reporter_id, node_seq)
    );
    CREATE INDEX IF NOT EXISTS events_ip ON events (ip);
    CREATE INDEX IF NOT EXISTS events_added_by ON events (added_by, ip);
    CREATE TABLE IF NOT EXISTS statuses (
        event_id INTEGER NOT NULL,
        host_id INTEGER NOT NULL,
        status INTEGER NOT NULL,
        PRIMARY KEY (event_id, host_id)
    ) WITHOUT ROWID;
";

const EVENT_COLUMNS: &str = "id, kind, added_by, created_ms, jailname, protocol, port, ip, lifts";

fn q(e: rusqlite::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

fn row_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(super::event_from_row(
        r.get::<_, i64>(0)? as u64,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
    ))
}

struct Inner {
    conn: Connection,
    host_ids: HashMap<String, u64>,
}

pub struct SqliteStore {
    inner: Arc<Mutex<Inner>>,
}

impl Inner {
    fn host_id(&mut self, name: &str) -> Result<u64, StoreError> {
        if let Some(id) = self.host_ids.get(name) {
            return Ok(*id);
        }
        let now = super::now_ms();
        self.conn
            .execute(
                "INSERT INTO hosts (name, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?2)
                 ON CONFLICT(name) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
                params![name, now],
            )
            .map_err(q)?;
        let id: i64 = self
            .conn
            .query_row("SELECT id FROM hosts WHERE name = ?1", [name], |r| r.get(0))
            .map_err(q)?;
        self.host_ids.insert(name.to_string(), id as u64);
        // Past the view's last column, a new host changes nothing there.
        if self.host_ids.len() <= super::MAX_VIEW_HOSTS {
            self.reload_hosts()?;
        }
        Ok(id as u64)
    }

    fn hosts_by_id(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, name FROM hosts ORDER BY id")
            .map_err(q)?;
        st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .map_err(q)?
            .collect::<Result<_, _>>()
            .map_err(q)
    }

    /// Reloads the host cache and rebuilds the `ip_table` view.
    fn reload_hosts(&mut self) -> Result<(), StoreError> {
        let hosts = self.hosts_by_id()?;
        let sql = super::view_sql(&hosts, "datetime(e.created_ms / 1000, 'unixepoch')");
        self.conn
            .execute_batch(&format!(
                "DROP VIEW IF EXISTS ip_table; CREATE VIEW ip_table AS {sql};"
            ))
            .map_err(q)?;
        self.host_ids = hosts.into_iter().map(|(id, n)| (n, id)).collect();
        Ok(())
    }
}

impl SqliteStore {
    pub async fn open(path: &str) -> Result<Self, StoreError> {
        let path = path.to_string();
        let inner = tokio::task::spawn_blocking(move || -> Result<Inner, StoreError> {
            if let Some(dir) = Path::new(&path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Unreachable {
                    url: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let conn = Connection::open(&path).map_err(|e| StoreError::Unreachable {
                url: path.clone(),
                reason: e.to_string(),
            })?;
            conn.execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
            )
            .map_err(q)?;
            conn.execute_batch(SCHEMA).map_err(q)?;
            let found: Option<i64> = conn
                .query_row(
                    "SELECT v FROM banmesh_meta WHERE k = 'schema_version'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(q)?;
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema { found: v }),
                Some(_) => {}
                None => {
                    conn.execute(
                        "INSERT INTO banmesh_meta (k, v) VALUES ('schema_version', ?1)",
                        [SCHEMA_VERSION],
                    )
                    .map_err(q)?;
                }
            }
            let mut inner = Inner {
                conn,
                host_ids: HashMap::new(),
            };
            inner.reload_hosts()?;
            Ok(inner)
        })
        .await
        .map_err(|e| StoreError::Query(e.to_string()))??;
        Ok(SqliteStore {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// Runs `f` on the connection off the async threads.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.lock().unwrap()))
            .await
            .map_err(|e| StoreError::Query(e.to_string()))?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn touch_host(&self, name: &str, cert_expires_ms: Option<i64>) -> Result<(), StoreError> {
        let name = name.to_string();
        self.with(move |i| {
            let id = i.host_id(&name)?;
            i.conn
                .execute(
                    "UPDATE hosts SET last_seen_ms = ?1, cert_expires_ms = COALESCE(?2, cert_expires_ms) WHERE id = ?3",
                    params![super::now_ms(), cert_expires_ms, id as i64],
                )
                .map_err(q)?;
            Ok(())
        })
        .await
    }

    async fn create_token(&self, t: &NewToken) -> Result<(), StoreError> {
        let t = t.clone();
        self.with(move |i| {
            i.conn
                .execute(
                    "INSERT INTO enrol_tokens (hash, name, created_ms, expires_ms, used_ms, cert_ttl_s) VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
                    params![t.hash, t.name, super::now_ms(), t.expires_ms, t.cert_ttl_s],
                )
                .map_err(q)?;
            Ok(())
        })
        .await
    }

    async fn enroll(
        &self,
        token_hash: &str,
        name: &str,
    ) -> Result<Result<Enrolled, EnrollRefused>, StoreError> {
        let (hash, name) = (token_hash.to_string(), name.to_string());
        self.with(move |i| {
            let tx = i.conn.transaction().map_err(q)?;
            let token = tx
                .query_row(
                    "SELECT name, expires_ms, used_ms, cert_ttl_s FROM enrol_tokens WHERE hash = ?1",
                    [&hash],
                    |r| {
                        Ok(TokenRow {
                            name: r.get(0)?,
                            expires_ms: r.get(1)?,
                            used: r.get::<_, Option<i64>>(2)?.is_some(),
                            cert_ttl_s: r.get(3)?,
                        })
                    },
                )
                .optional()
                .map_err(q)?;
            let host: Option<bool> = tx
                .query_row("SELECT revoked_ms IS NOT NULL FROM hosts WHERE name = ?1", [&name], |r| r.get(0))
                .optional()
                .map_err(q)?;
            let now = super::now_ms();
            let verdict = super::check_enrolment(token, &name, host, now);
            if verdict.is_ok() {
                tx.execute("UPDATE enrol_tokens SET used_ms = ?1 WHERE hash = ?2", params![now, hash])
                    .map_err(q)?;
                tx.execute(
                    "INSERT INTO hosts (name, first_seen_ms, last_seen_ms, enrolled_ms) VALUES (?1, ?2, ?2, ?2)",
                    params![name, now],
                )
                .map_err(q)?;
            }
            tx.commit().map_err(q)?;
            if verdict.is_ok() {
                i.reload_hosts()?;
            }
            Ok(verdict)
        })
        .await
    }

    async fn revoke(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with(move |i| {
            let n = i
                .conn
                .execute(
                    "UPDATE hosts SET revoked_ms = COALESCE(revoked_ms, ?1) WHERE name = ?2",
                    params![super::now_ms(), name],
                )
                .map_err(q)?;
            Ok(n > 0)
        })
        .await
    }

    async fn revoked(&self) -> Result<Vec<String>, StoreError> {
        self.with(|i| {
            let mut st = i
                .conn
                .prepare("SELECT name FROM hosts WHERE revoked_ms IS NOT NULL")
                .map_err(q)?;
            st.query_map([], |r| r.get(0))
                .map_err(q)?
                .collect::<Result<_, _>>()
                .map_err(q)
        })
        .await
    }

    async fn commit(&self, batch: &[NewReport]) -> Result<Vec<Committed>, StoreError> {
        let batch = batch.to_vec();
        self.with(move |i| {
            let ids: Vec<u64> = batch
                .iter()
                .map(|r| i.host_id(&r.host))
                .collect::<Result<_, _>>()?;
            let tx = i.conn.transaction().map_err(q)?;
            let now = super::now_ms();
            let mut out = Vec::with_capacity(batch.len());
            {
                let mut find = tx
                    .prepare_cached(
                        "SELECT id, ip, jailname, protocol, port FROM events WHERE reporter_id = ?1 AND node_seq = ?2",
                    )
                    .map_err(q)?;
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, \
                         jailname, protocol, port, ip) VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .map_err(q)?;
                for (r, hid) in batch.iter().zip(&ids) {
                    let hid = *hid as i64;
                    let seq = r.seq as i64;
                    type Row = (i64, String, String, String, String);
                    let existing: Option<Row> = find
                        .query_row(params![hid, seq], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })
                        .optional()
                        .map_err(q)?;
                    let b = &r.ban;
                    let mut key = Some(seq);
                    if let Some((id, ip, jail, protocol, port)) = existing {
                        if (ip, jail, protocol, port) == (b.ip.clone(), b.jail.clone(), b.protocol.clone(), b.port.clone()) {
                            out.push(Committed::Duplicate(id as u64));
                            continue;
                        }
                        // The same (host, seq) for another ban: the node's
                        // sequence was reset. Not a re-send: store it, keyless.
                        tracing::warn!(host = %r.host, seq, ip = %b.ip, "sequence reused for a different ban; stored as a new report");
                        key = None;
                    }
                    insert
                        .execute(params![
                            hid,
                            key,
                            r.host,
                            now,
                            r.ban.jail,
                            r.ban.protocol,
                            r.ban.port,
                            r.ban.ip
                        ])
                        .map_err(q)?;
                    let id = tx.last_insert_rowid();
                    out.push(Committed::New(Event {
                        id: id as u64,
                        kind: EventKind::Ban,
                        ban: r.ban.clone(),
                        added_by: r.host.clone(),
                        created_ms: now,
                        lifts: 0,
                    }));
                }
            }
            tx.commit().map_err(q)?;
            Ok(out)
        })
        .await
    }

    async fn events_after(
        &self,
        after: u64,
        subscriber: &str,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let subscriber = subscriber.to_string();
        self.with(move |i| {
            // An admin following the stream is not a host: it excludes nothing.
            let me = i.host_ids.get(&subscriber).copied().unwrap_or(0) as i64;
            let mut st = i
                .conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE id > ?1 \
                     AND (kind = 2 OR (reporter_id <> ?2 AND lifted_by IS NULL)) \
                     ORDER BY id LIMIT ?3"
                ))
                .map_err(q)?;
            st.query_map(params![after as i64, me, limit as i64], row_event)
                .map_err(q)?
                .collect::<Result<_, _>>()
                .map_err(q)
        })
        .await
    }

    async fn unban(&self, ip: &str, by: &str) -> Result<Option<(Event, u32)>, StoreError> {
        let (ip, by) = (ip.to_string(), by.to_string());
        self.with(move |i| {
            // Unbans come from admins, who are not hosts.
            let by_id = 0i64;
            let tx = i.conn.transaction().map_err(q)?;
            let active: Vec<Event> = {
                let mut st = tx
                    .prepare(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE ip = ?1 AND kind = 1 \
                         AND lifted_by IS NULL ORDER BY id"
                    ))
                    .map_err(q)?;
                st.query_map([&ip], row_event)
                    .map_err(q)?
                    .collect::<Result<_, _>>()
                    .map_err(q)?
            };
            let Some(last) = active.last().cloned() else {
                return Ok(None);
            };
            let now = super::now_ms();
            tx.execute(
                "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, jailname, \
                 protocol, port, ip, lifts) VALUES (2, ?1, NULL, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    by_id,
                    by,
                    now,
                    last.ban.jail,
                    last.ban.protocol,
                    last.ban.port,
                    ip,
                    last.id as i64
                ],
            )
            .map_err(q)?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "UPDATE events SET lifted_by = ?1 WHERE ip = ?2 AND kind = 1 AND lifted_by IS NULL",
                params![id, ip],
            )
            .map_err(q)?;
            tx.commit().map_err(q)?;
            let event = Event {
                id: id as u64,
                kind: EventKind::Unban,
                ban: last.ban,
                added_by: by,
                created_ms: now,
                lifts: last.id,
            };
            Ok(Some((event, active.len() as u32)))
        })
        .await
    }

    async fn set_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError> {
        let updates = updates.to_vec();
        self.with(move |i| {
            let ids: Vec<i64> = updates
                .iter()
                .map(|(h, _, _)| i.host_id(h).map(|id| id as i64))
                .collect::<Result<_, _>>()?;
            let tx = i.conn.transaction().map_err(q)?;
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

    async fn list_bans(&self, f: &BanFilter) -> Result<Vec<BanRow>, StoreError> {
        let f = f.clone();
        self.with(move |i| {
            let mut sql = format!(
                "SELECT {EVENT_COLUMNS}, lifted_by IS NOT NULL FROM events WHERE kind = 1 AND id > ?"
            );
            let mut args: Vec<Value> = vec![Value::Integer(f.after_id as i64)];
            for (col, v) in [("ip", &f.ip), ("added_by", &f.added_by), ("jailname", &f.jail)] {
                if let Some(v) = v {
                    sql.push_str(&format!(" AND {col} = ?"));
                    args.push(Value::Text(v.clone()));
                }
            }
            if let Some(since) = f.since_ms {
                sql.push_str(" AND created_ms >= ?");
                args.push(Value::Integer(since));
            }
            sql.push_str(" ORDER BY id LIMIT ?");
            args.push(Value::Integer(f.limit as i64));
            let bans: Vec<(Event, bool)> = {
                let mut st = i.conn.prepare(&sql).map_err(q)?;
                st.query_map(params_from_iter(args), |r| Ok((row_event(r)?, r.get::<_, bool>(9)?)))
                    .map_err(q)?
                    .collect::<Result<_, _>>()
                    .map_err(q)?
            };
            let mut statuses = HashMap::new();
            if !bans.is_empty() {
                let ids: Vec<String> = bans.iter().map(|(e, _)| e.id.to_string()).collect();
                let mut st = i
                    .conn
                    .prepare(&format!(
                        "SELECT event_id, host_id, status FROM statuses WHERE event_id IN ({})",
                        ids.join(",")
                    ))
                    .map_err(q)?;
                let rows = st
                    .query_map([], |r| {
                        Ok(((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64), r.get(2)?))
                    })
                    .map_err(q)?;
                for row in rows {
                    let (k, v) = row.map_err(q)?;
                    statuses.insert(k, v);
                }
            }
            Ok(super::assemble_bans(bans, &i.hosts_by_id()?, &statuses))
        })
        .await
    }

    async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.with(|i| {
            let mut st = i
                .conn
                .prepare(
                    "SELECT name, first_seen_ms, last_seen_ms, enrolled_ms, cert_expires_ms, revoked_ms \
                     FROM hosts ORDER BY name",
                )
                .map_err(q)?;
            st.query_map([], |r| {
                Ok(HostRow {
                    name: r.get(0)?,
                    first_seen_ms: r.get(1)?,
                    last_seen_ms: r.get(2)?,
                    enrolled_ms: r.get(3)?,
                    cert_expires_ms: r.get(4)?,
                    revoked: r.get::<_, Option<i64>>(5)?.is_some(),
                })
            })
            .map_err(q)?
            .collect::<Result<_, _>>()
            .map_err(q)
        })
        .await
    }

    async fn last_event_id(&self) -> Result<u64, StoreError> {
        self.with(|i| {
            i.conn
                .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|v| v as u64)
                .map_err(q)
        })
        .await
    }

    async fn last_seq(&self, host: &str) -> Result<u64, StoreError> {
        let host = host.to_string();
        self.with(move |i| {
            let id = i.host_id(&host)? as i64;
            i.conn
                .query_row(
                    "SELECT COALESCE(MAX(node_seq), 0) FROM events WHERE reporter_id = ?1",
                    [id],
                    |r| r.get::<_, i64>(0),
                )
                .map(|v| v as u64)
                .map_err(q)
        })
        .await
    }

    async fn dump_hosts(&self) -> Result<Vec<RawHost>, StoreError> {
        self.with(|i| {
            let mut st = i
                .conn
                .prepare("SELECT id, name, first_seen_ms, last_seen_ms FROM hosts ORDER BY id")
                .map_err(q)?;
            st.query_map([], |r| {
                Ok(RawHost {
                    id: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    first_seen_ms: r.get(2)?,
                    last_seen_ms: r.get(3)?,
                })
            })
            .map_err(q)?
            .collect::<Result<_, _>>()
            .map_err(q)
        })
        .await
    }

    async fn dump_events(&self, after: u64, limit: usize) -> Result<Vec<RawEvent>, StoreError> {
        self.with(move |i| {
            let mut st = i
                .conn
                .prepare_cached(
                    "SELECT id, kind, reporter_id, node_seq, added_by, created_ms, jailname, protocol, \
                     port, ip, lifted_by, lifts FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(q)?;
            let opt = |v: Option<i64>| v.map(|v| v as u64);
            st.query_map(params![after as i64, limit as i64], |r| {
                Ok(RawEvent {
                    id: r.get::<_, i64>(0)? as u64,
                    kind: r.get(1)?,
                    reporter_id: r.get::<_, i64>(2)? as u64,
                    node_seq: opt(r.get(3)?),
                    added_by: r.get(4)?,
                    created_ms: r.get(5)?,
                    jail: r.get(6)?,
                    protocol: r.get(7)?,
                    port: r.get(8)?,
                    ip: r.get(9)?,
                    lifted_by: opt(r.get(10)?),
                    lifts: opt(r.get(11)?),
                })
            })
            .map_err(q)?
            .collect::<Result<_, _>>()
            .map_err(q)
        })
        .await
    }

    async fn dump_statuses(&self, after: u64, limit: usize) -> Result<Vec<RawStatus>, StoreError> {
        self.with(move |i| {
            let mut st = i
                .conn
                .prepare_cached(
                    "SELECT event_id, host_id, status FROM statuses WHERE event_id > ?1 \
                     ORDER BY event_id, host_id LIMIT ?2",
                )
                .map_err(q)?;
            st.query_map(params![after as i64, limit as i64], |r| {
                Ok(RawStatus {
                    event_id: r.get::<_, i64>(0)? as u64,
                    host_id: r.get::<_, i64>(1)? as u64,
                    status: r.get(2)?,
                })
            })
            .map_err(q)?
            .collect::<Result<_, _>>()
            .map_err(q)
        })
        .await
    }

    async fn load(
        &self,
        hosts: &[RawHost],
        events: &[RawEvent],
        statuses: &[RawStatus],
    ) -> Result<(), StoreError> {
        let (hosts, events, statuses) = (hosts.to_vec(), events.to_vec(), statuses.to_vec());
        self.with(move |i| {
            let tx = i.conn.transaction().map_err(q)?;
            {
                let mut h = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO hosts (id, name, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .map_err(q)?;
                for r in &hosts {
                    h.execute(params![r.id as i64, r.name, r.first_seen_ms, r.last_seen_ms]).map_err(q)?;
                }
                let mut e = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO events (id, kind, reporter_id, node_seq, added_by, created_ms, \
                         jailname, protocol, port, ip, lifted_by, lifts) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    )
                    .map_err(q)?;
                let opt = |v: Option<u64>| v.map(|v| v as i64);
                for r in &events {
                    e.execute(params![
                        r.id as i64,
                        r.kind,
                        r.reporter_id as i64,
                        opt(r.node_seq),
                        r.added_by,
                        r.created_ms,
                        r.jail,
                        r.protocol,
                        r.port,
                        r.ip,
                        opt(r.lifted_by),
                        opt(r.lifts)
                    ])
                    .map_err(q)?;
                }
                let mut s = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO statuses (event_id, host_id, status) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(q)?;
                for r in &statuses {
                    s.execute(params![r.event_id as i64, r.host_id as i64, r.status]).map_err(q)?;
                }
            }
            tx.commit().map_err(q)?;
            if !hosts.is_empty() {
                i.reload_hosts()?;
            }
            Ok(())
        })
        .await
    }

    async fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        self.with(|i| {
            i.conn
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM hosts), (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM statuses)",
                    [],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
                )
                .map_err(q)
        })
        .await
    }
}
