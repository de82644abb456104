//! MySQL / MariaDB backend through `mysql_async`: the production store.
//!
//! InnoDB tables, one transaction per batch; the hub's committer is the only
//! writer of events, so ids are assigned in commit order.
use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, TxOpts, Value, prelude::*};

use super::{
    BanFilter, BanRow, Committed, EnrollRefused, Enrolled, HostRow, NewReport, NewToken, RawEvent,
    RawHost, RawStatus, SCHEMA_VERSION, Store, StoreError, TokenRow,
};
use crate::ban::{Event, EventKind, Status};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS banmesh_meta (
        k VARCHAR(64) NOT NULL PRIMARY KEY,
        v BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS hosts (
        id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(253) NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        enrolled_ms BIGINT NULL,
        cert_expires_ms BIGINT NULL,
        revoked_ms BIGINT NULL,
        UNIQUE KEY name (name)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS enrol_tokens (
        hash CHAR(64) NOT NULL PRIMARY KEY,
        name VARCHAR(253) NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        used_ms BIGINT NULL,
        cert_ttl_s BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS events (
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        kind TINYINT NOT NULL,
        reporter_id INT UNSIGNED NOT NULL,
        node_seq BIGINT UNSIGNED NULL,
        added_by VARCHAR(253) NOT NULL,
        created_ms BIGINT NOT NULL,
        jailname VARCHAR(64) NOT NULL,
        protocol VARCHAR(16) NOT NULL,
        port VARCHAR(32) NOT NULL,
        ip VARCHAR(64) NOT NULL,
        lifted_by BIGINT UNSIGNED NULL,
        lifts BIGINT UNSIGNED NULL,
        UNIQUE KEY report (reporter_id, node_seq),
        KEY ip (ip),
        KEY added_by (added_by, ip)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS statuses (
        event_id BIGINT UNSIGNED NOT NULL,
        host_id INT UNSIGNED NOT NULL,
        status TINYINT NOT NULL,
        PRIMARY KEY (event_id, host_id)
    ) ENGINE=InnoDB",
];

const EVENT_COLUMNS: &str = "id, kind, added_by, created_ms, jailname, protocol, port, ip, lifts";

type EventRow = (
    u64,
    i64,
    String,
    i64,
    String,
    String,
    String,
    String,
    Option<u64>,
);

fn to_event(r: EventRow) -> Event {
    super::event_from_row(r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8)
}

pub struct MysqlStore {
    pool: Pool,
    /// The server hands a multi-row INSERT consecutive ids
    /// (`innodb_autoinc_lock_mode` below 2).
    consecutive_ids: bool,
    /// Host name -> id; hosts are never renamed or deleted.
    host_ids: Mutex<HashMap<String, u64>>,
}

fn q(e: mysql_async::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

impl MysqlStore {
    /// Connects, creates the database named in the URL if missing, and
    /// brings the schema to this build's version.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let opts = Opts::from_url(url).map_err(|_| StoreError::BadUrl(redact(url)))?;
        // The URL's password must never reach a log line.
        let shown = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        let unreachable = |e: mysql_async::Error| StoreError::Unreachable {
            url: shown.clone(),
            reason: e.to_string(),
        };
        let db = opts.db_name().unwrap_or("banmesh").to_string();
        if !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StoreError::BadUrl(redact(url)));
        }
        let mut admin = Conn::new(OptsBuilder::from_opts(opts.clone()).db_name(None::<String>))
            .await
            .map_err(unreachable)?;
        admin
            .query_drop(format!("CREATE DATABASE IF NOT EXISTS `{db}`"))
            .await
            .map_err(q)?;
        admin.disconnect().await.map_err(q)?;

        let pool = Pool::new(OptsBuilder::from_opts(opts).db_name(Some(db)));
        let mut c = pool.get_conn().await.map_err(unreachable)?;
        let lock_mode: Option<i64> = c
            .query_first("SELECT @@innodb_autoinc_lock_mode")
            .await
            .map_err(q)?;
        drop(c);
        let store = MysqlStore {
            consecutive_ids: lock_mode.is_some_and(|m| m < 2),
            pool,
            host_ids: Mutex::new(HashMap::new()),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.pool
            .get_conn()
            .await
            .map_err(|e| StoreError::Unreachable {
                url: "mysql".into(),
                reason: e.to_string(),
            })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        for stmt in SCHEMA {
            c.query_drop(*stmt).await.map_err(q)?;
        }
        let found: Option<i64> = c
            .query_first("SELECT v FROM banmesh_meta WHERE k = 'schema_version'")
            .await
            .map_err(q)?;
        match found {
            Some(v) if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema { found: v }),
            Some(_) => {}
            None => c
                .exec_drop(
                    "INSERT INTO banmesh_meta (k, v) VALUES ('schema_version', ?)",
                    (SCHEMA_VERSION,),
                )
                .await
                .map_err(q)?,
        }
        let hosts: Vec<(u64, String)> = c
            .query("SELECT id, name FROM hosts ORDER BY id")
            .await
            .map_err(q)?;
        self.host_ids
            .lock()
            .unwrap()
            .extend(hosts.iter().map(|(id, n)| (n.clone(), *id)));
        Self::rebuild_view(&mut c, &hosts).await
    }

    async fn rebuild_view(c: &mut Conn, hosts: &[(u64, String)]) -> Result<(), StoreError> {
        let sql = super::view_sql(hosts, "FROM_UNIXTIME(e.created_ms / 1000)");
        c.query_drop(format!("CREATE OR REPLACE VIEW ip_table AS {sql}"))
            .await
            .map_err(q)
    }

    /// The id of a host, creating its row (and view column) when new.
    async fn host_id(&self, c: &mut Conn, name: &str) -> Result<u64, StoreError> {
        if let Some(id) = self.host_ids.lock().unwrap().get(name) {
            return Ok(*id);
        }
        let now = super::now_ms();
        c.exec_drop(
            "INSERT INTO hosts (name, first_seen_ms, last_seen_ms) VALUES (?, ?, ?)
             ON DUPLICATE KEY UPDATE last_seen_ms = VALUES(last_seen_ms)",
            (name, now, now),
        )
        .await
        .map_err(q)?;
        let id: Option<u64> = c
            .exec_first("SELECT id FROM hosts WHERE name = ?", (name,))
            .await
            .map_err(q)?;
        let id = id.ok_or_else(|| StoreError::Query(format!("host {name} vanished")))?;
        let known = {
            let mut ids = self.host_ids.lock().unwrap();
            ids.insert(name.to_string(), id);
            ids.len()
        };
        // Past the view's last column, a new host changes nothing there.
        if known <= super::MAX_VIEW_HOSTS {
            let hosts: Vec<(u64, String)> = c
                .query("SELECT id, name FROM hosts ORDER BY id")
                .await
                .map_err(q)?;
            Self::rebuild_view(c, &hosts).await?;
        }
        Ok(id)
    }
}

/// What makes two reports the same ban, as stored.
#[derive(Debug, PartialEq, Eq)]
struct BanKey(String, String, String, String);

impl BanKey {
    fn of(b: &crate::ban::Ban) -> Self {
        BanKey(
            b.ip.clone(),
            b.jail.clone(),
            b.protocol.clone(),
            b.port.clone(),
        )
    }
}

/// The URL with its password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// `(reporter_id = ? AND node_seq IN (...)) OR ...`, grouped by reporter so
/// the `report` index serves it.
fn report_keys(keys: &[(u64, u64)]) -> String {
    let mut by_host: HashMap<u64, Vec<u64>> = HashMap::new();
    for (h, s) in keys {
        by_host.entry(*h).or_default().push(*s);
    }
    by_host
        .iter()
        .map(|(h, seqs)| {
            let list: Vec<String> = seqs.iter().map(u64::to_string).collect();
            format!("(reporter_id = {h} AND node_seq IN ({}))", list.join(","))
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

#[async_trait]
impl Store for MysqlStore {
    async fn touch_host(&self, name: &str, cert_expires_ms: Option<i64>) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let id = self.host_id(&mut c, name).await?;
        c.exec_drop(
            "UPDATE hosts SET last_seen_ms = ?, cert_expires_ms = COALESCE(?, cert_expires_ms) WHERE id = ?",
            (super::now_ms(), cert_expires_ms, id),
        )
        .await
        .map_err(q)
    }

    async fn create_token(&self, t: &NewToken) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        c.exec_drop(
            "INSERT INTO enrol_tokens (hash, name, created_ms, expires_ms, used_ms, cert_ttl_s) VALUES (?, ?, ?, ?, NULL, ?)",
            (&t.hash, &t.name, super::now_ms(), t.expires_ms, t.cert_ttl_s),
        )
        .await
        .map_err(q)
    }

    async fn enroll(
        &self,
        token_hash: &str,
        name: &str,
    ) -> Result<Result<Enrolled, EnrollRefused>, StoreError> {
        let mut c = self.conn().await?;
        let mut tx = c.start_transaction(TxOpts::default()).await.map_err(q)?;
        let token: Option<(Option<String>, i64, Option<i64>, i64)> = tx
            .exec_first(
                "SELECT name, expires_ms, used_ms, cert_ttl_s FROM enrol_tokens WHERE hash = ? FOR UPDATE",
                (token_hash,),
            )
            .await
            .map_err(q)?;
        let host: Option<Option<i64>> = tx
            .exec_first(
                "SELECT revoked_ms FROM hosts WHERE name = ? FOR UPDATE",
                (name,),
            )
            .await
            .map_err(q)?;
        let now = super::now_ms();
        let token = token.map(|(name, expires_ms, used, cert_ttl_s)| TokenRow {
            name,
            expires_ms,
            used: used.is_some(),
            cert_ttl_s,
        });
        let verdict = super::check_enrolment(token, name, host.map(|r| r.is_some()), now);
        if verdict.is_ok() {
            tx.exec_drop(
                "UPDATE enrol_tokens SET used_ms = ? WHERE hash = ?",
                (now, token_hash),
            )
            .await
            .map_err(q)?;
            tx.exec_drop(
                "INSERT INTO hosts (name, first_seen_ms, last_seen_ms, enrolled_ms) VALUES (?, ?, ?, ?)",
                (name, now, now, now),
            )
            .await
            .map_err(q)?;
        }
        tx.commit().await.map_err(q)?;
        if verdict.is_ok() {
            let hosts: Vec<(u64, String)> = c
                .query("SELECT id, name FROM hosts ORDER BY id")
                .await
                .map_err(q)?;
            Self::rebuild_view(&mut c, &hosts).await?;
            self.host_ids
                .lock()
                .unwrap()
                .extend(hosts.into_iter().map(|(id, n)| (n, id)));
        }
        Ok(verdict)
    }

    async fn revoke(&self, name: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        c.exec_drop(
            "UPDATE hosts SET revoked_ms = COALESCE(revoked_ms, ?) WHERE name = ?",
            (super::now_ms(), name),
        )
        .await
        .map_err(q)?;
        Ok(c.affected_rows() > 0 || {
            let n: Option<i64> = c
                .exec_first("SELECT COUNT(*) FROM hosts WHERE name = ?", (name,))
                .await
                .map_err(q)?;
            n.unwrap_or(0) > 0
        })
    }

    async fn revoked(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        c.query("SELECT name FROM hosts WHERE revoked_ms IS NOT NULL")
            .await
            .map_err(q)
    }

    async fn commit(&self, batch: &[NewReport]) -> Result<Vec<Committed>, StoreError> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut c = self.conn().await?;
        let mut ids = Vec::with_capacity(batch.len());
        for r in batch {
            ids.push(self.host_id(&mut c, &r.host).await?);
        }
        let keys: Vec<(u64, u64)> = ids
            .iter()
            .copied()
            .zip(batch.iter().map(|r| r.seq))
            .collect();
        // One row per key: a key repeated within the batch is a re-send.
        let mut fresh = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            if seen.insert(*key) {
                fresh.push(i);
            }
        }
        let now = super::now_ms();
        let mut params: Vec<Value> = Vec::with_capacity(fresh.len() * 8);
        for &i in &fresh {
            let r = &batch[i];
            params.extend([
                keys[i].0.into(),
                r.seq.into(),
                r.host.as_str().into(),
                now.into(),
                r.ban.jail.as_str().into(),
                r.ban.protocol.as_str().into(),
                r.ban.port.as_str().into(),
                r.ban.ip.as_str().into(),
            ]);
        }
        let rows = vec!["(1, ?, ?, ?, ?, ?, ?, ?, ?)"; fresh.len()].join(",");
        let mut tx = c.start_transaction(TxOpts::default()).await.map_err(q)?;
        // Re-sent reports hit the (reporter, seq) unique key and are skipped;
        // every value was validated, so IGNORE hides nothing else.
        tx.exec_drop(
            format!(
                "INSERT IGNORE INTO events (kind, reporter_id, node_seq, added_by, created_ms, \
                 jailname, protocol, port, ip) VALUES {rows}"
            ),
            params,
        )
        .await
        .map_err(q)?;
        let inserted = tx.affected_rows() as usize;
        let first = tx.last_insert_id().filter(|f| *f > 0);
        // (reporter, seq) -> (id, the ban stored under it).
        let mut known: HashMap<(u64, u64), (u64, BanKey)> = HashMap::with_capacity(fresh.len());
        // New rows got consecutive ids from the first (unless the server
        // interleaves auto-increment allocation, lock mode 2).
        let all_new = inserted == fresh.len() && self.consecutive_ids;
        let mut new_keys = std::collections::HashSet::new();
        if let (true, Some(first)) = (all_new, first) {
            for (n, &i) in fresh.iter().enumerate() {
                known.insert(keys[i], (first + n as u64, BanKey::of(&batch[i].ban)));
                new_keys.insert(keys[i]);
            }
        } else {
            // Some were stored before: look every key up. This statement's
            // rows have ids from `first` on; older ones are below it.
            let fresh_keys: Vec<(u64, u64)> = fresh.iter().map(|&i| keys[i]).collect();
            type Row = (u64, u64, u64, String, String, String, String);
            let rows: Vec<Row> = tx
                .query(format!(
                    "SELECT id, reporter_id, node_seq, ip, jailname, protocol, port FROM events WHERE {}",
                    report_keys(&fresh_keys)
                ))
                .await
                .map_err(q)?;
            for (id, h, s, ip, jail, protocol, port) in rows {
                if inserted > 0 && first.is_some_and(|f| id >= f) {
                    new_keys.insert((h, s));
                }
                known.insert((h, s), (id, BanKey(ip, jail, protocol, port)));
            }
        }

        let fresh: std::collections::HashSet<usize> = fresh
            .into_iter()
            .filter(|&i| new_keys.contains(&keys[i]))
            .collect();
        let event = |id: u64, r: &NewReport| {
            Committed::New(Event {
                id,
                kind: EventKind::Ban,
                ban: r.ban.clone(),
                added_by: r.host.clone(),
                created_ms: now,
                lifts: 0,
            })
        };
        let mut out = Vec::with_capacity(batch.len());
        for (i, key) in keys.iter().enumerate() {
            let r = &batch[i];
            let (id, stored) = &known[key];
            if fresh.contains(&i) {
                out.push(event(*id, r));
            } else if *stored == BanKey::of(&r.ban) {
                out.push(Committed::Duplicate(*id));
            } else {
                // The same (host, seq) for another ban: the node's sequence
                // was reset (restored from a backup?). Not a re-send: store
                // it, without the key, and say so.
                tracing::warn!(host = %r.host, seq = r.seq, ip = %r.ban.ip, "sequence reused for a different ban; stored as a new report");
                tx.exec_drop(
                    "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, jailname, \
                     protocol, port, ip) VALUES (1, ?, NULL, ?, ?, ?, ?, ?, ?)",
                    (key.0, &r.host, now, &r.ban.jail, &r.ban.protocol, &r.ban.port, &r.ban.ip),
                )
                .await
                .map_err(q)?;
                let id = tx.last_insert_id().unwrap_or(0);
                out.push(event(id, r));
            }
        }
        tx.commit().await.map_err(q)?;
        Ok(out)
    }

    async fn events_after(
        &self,
        after: u64,
        subscriber: &str,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut c = self.conn().await?;
        // An admin following the stream is not a host: it excludes nothing.
        let me = self
            .host_ids
            .lock()
            .unwrap()
            .get(subscriber)
            .copied()
            .unwrap_or(0);
        let rows: Vec<EventRow> = c
            .exec(
                format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE id > ? \
                     AND (kind = 2 OR (reporter_id <> ? AND lifted_by IS NULL)) \
                     ORDER BY id LIMIT ?"
                ),
                (after, me, limit as u64),
            )
            .await
            .map_err(q)?;
        Ok(rows.into_iter().map(to_event).collect())
    }

    async fn unban(&self, ip: &str, by: &str) -> Result<Option<(Event, u32)>, StoreError> {
        let mut c = self.conn().await?;
        // Unbans come from admins, who are not hosts.
        let by_id = 0u64;
        let mut tx = c.start_transaction(TxOpts::default()).await.map_err(q)?;
        let active: Vec<EventRow> = tx
            .exec(
                format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE ip = ? AND kind = 1 \
                     AND lifted_by IS NULL ORDER BY id FOR UPDATE"
                ),
                (ip,),
            )
            .await
            .map_err(q)?;
        let Some(last) = active.last().cloned().map(to_event) else {
            return Ok(None);
        };
        let now = super::now_ms();
        tx.exec_drop(
            "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, jailname, \
             protocol, port, ip, lifts) VALUES (2, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
            (
                by_id,
                by,
                now,
                &last.ban.jail,
                &last.ban.protocol,
                &last.ban.port,
                ip,
                last.id,
            ),
        )
        .await
        .map_err(q)?;
        let id = tx.last_insert_id().unwrap_or(0);
        tx.exec_drop(
            "UPDATE events SET lifted_by = ? WHERE ip = ? AND kind = 1 AND lifted_by IS NULL",
            (id, ip),
        )
        .await
        .map_err(q)?;
        tx.commit().await.map_err(q)?;
        let event = Event {
            id,
            kind: EventKind::Unban,
            ban: last.ban,
            added_by: by.to_string(),
            created_ms: now,
            lifts: last.id,
        };
        Ok(Some((event, active.len() as u32)))
    }

    async fn set_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn().await?;
        let mut ids: HashMap<&str, u64> = HashMap::new();
        for (host, _, _) in updates {
            if !ids.contains_key(host.as_str()) {
                ids.insert(host, self.host_id(&mut c, host).await?);
            }
        }
        for chunk in updates.chunks(5000) {
            let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
            for (host, id, st) in chunk {
                params.extend([(*id).into(), ids[host.as_str()].into(), (*st as u8).into()]);
            }
            let rows = vec!["(?, ?, ?)"; chunk.len()].join(",");
            c.exec_drop(
                format!(
                    "INSERT INTO statuses (event_id, host_id, status) VALUES {rows} \
                     ON DUPLICATE KEY UPDATE status = VALUES(status)"
                ),
                params,
            )
            .await
            .map_err(q)?;
        }
        Ok(updates.len())
    }

    async fn list_bans(&self, f: &BanFilter) -> Result<Vec<BanRow>, StoreError> {
        let mut c = self.conn().await?;
        let mut sql = format!(
            "SELECT {EVENT_COLUMNS}, lifted_by IS NOT NULL FROM events WHERE kind = 1 AND id > ?"
        );
        let mut params: Vec<Value> = vec![f.after_id.into()];
        for (col, v) in [
            ("ip", &f.ip),
            ("added_by", &f.added_by),
            ("jailname", &f.jail),
        ] {
            if let Some(v) = v {
                sql.push_str(&format!(" AND {col} = ?"));
                params.push(v.as_str().into());
            }
        }
        if let Some(since) = f.since_ms {
            sql.push_str(" AND created_ms >= ?");
            params.push(since.into());
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        params.push((f.limit as u64).into());
        type ListRow = (
            u64,
            i64,
            String,
            i64,
            String,
            String,
            String,
            String,
            Option<u64>,
            i64,
        );
        let rows: Vec<ListRow> = c.exec(sql, params).await.map_err(q)?;
        let bans: Vec<(Event, bool)> = rows
            .into_iter()
            .map(|r| {
                (
                    to_event((r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8)),
                    r.9 != 0,
                )
            })
            .collect();
        let hosts: Vec<(u64, String)> = c
            .query("SELECT id, name FROM hosts ORDER BY id")
            .await
            .map_err(q)?;
        let ids: Vec<String> = bans.iter().map(|(e, _)| e.id.to_string()).collect();
        let mut statuses: HashMap<(u64, u64), i64> = HashMap::new();
        if !ids.is_empty() {
            let rows: Vec<(u64, u64, i64)> = c
                .query(format!(
                    "SELECT event_id, host_id, status FROM statuses WHERE event_id IN ({})",
                    ids.join(",")
                ))
                .await
                .map_err(q)?;
            statuses.extend(rows.into_iter().map(|(e, h, s)| ((e, h), s)));
        }
        Ok(super::assemble_bans(bans, &hosts, &statuses))
    }

    async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        let mut c = self.conn().await?;
        type Row = (String, i64, i64, Option<i64>, Option<i64>, Option<i64>);
        let rows: Vec<Row> = c
            .query(
                "SELECT name, first_seen_ms, last_seen_ms, enrolled_ms, cert_expires_ms, revoked_ms \
                 FROM hosts ORDER BY name",
            )
            .await
            .map_err(q)?;
        Ok(rows
            .into_iter()
            .map(
                |(name, first_seen_ms, last_seen_ms, enrolled_ms, cert_expires_ms, revoked)| {
                    HostRow {
                        name,
                        first_seen_ms,
                        last_seen_ms,
                        enrolled_ms,
                        cert_expires_ms,
                        revoked: revoked.is_some(),
                    }
                },
            )
            .collect())
    }

    async fn last_event_id(&self) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let id: Option<Option<u64>> = c
            .query_first("SELECT MAX(id) FROM events")
            .await
            .map_err(q)?;
        Ok(id.flatten().unwrap_or(0))
    }

    async fn last_seq(&self, host: &str) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let id = self.host_id(&mut c, host).await?;
        let seq: Option<Option<u64>> = c
            .exec_first(
                "SELECT MAX(node_seq) FROM events WHERE reporter_id = ?",
                (id,),
            )
            .await
            .map_err(q)?;
        Ok(seq.flatten().unwrap_or(0))
    }

    async fn dump_hosts(&self) -> Result<Vec<RawHost>, StoreError> {
        let mut c = self.conn().await?;
        let rows: Vec<(u64, String, i64, i64)> = c
            .query("SELECT id, name, first_seen_ms, last_seen_ms FROM hosts ORDER BY id")
            .await
            .map_err(q)?;
        Ok(rows
            .into_iter()
            .map(|(id, name, first_seen_ms, last_seen_ms)| RawHost {
                id,
                name,
                first_seen_ms,
                last_seen_ms,
            })
            .collect())
    }

    async fn dump_events(&self, after: u64, limit: usize) -> Result<Vec<RawEvent>, StoreError> {
        let mut c = self.conn().await?;
        let rows: Vec<mysql_async::Row> = c
            .exec(
                "SELECT id, kind, reporter_id, node_seq, added_by, created_ms, jailname, protocol, \
                 port, ip, lifted_by, lifts FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit as u64),
            )
            .await
            .map_err(q)?;
        rows.into_iter()
            .map(|mut r| {
                let bad = || StoreError::Query("unexpected NULL in events".into());
                Ok(RawEvent {
                    id: r.take(0).ok_or_else(bad)?,
                    kind: r.take(1).ok_or_else(bad)?,
                    reporter_id: r.take(2).ok_or_else(bad)?,
                    node_seq: r.take(3).ok_or_else(bad)?,
                    added_by: r.take(4).ok_or_else(bad)?,
                    created_ms: r.take(5).ok_or_else(bad)?,
                    jail: r.take(6).ok_or_else(bad)?,
                    protocol: r.take(7).ok_or_else(bad)?,
                    port: r.take(8).ok_or_else(bad)?,
                    ip: r.take(9).ok_or_else(bad)?,
                    lifted_by: r.take(10).ok_or_else(bad)?,
                    lifts: r.take(11).ok_or_else(bad)?,
                })
            })
            .collect()
    }

    async fn dump_statuses(&self, after: u64, limit: usize) -> Result<Vec<RawStatus>, StoreError> {
        let mut c = self.conn().await?;
        let rows: Vec<(u64, u64, i64)> = c
            .exec(
                "SELECT event_id, host_id, status FROM statuses WHERE event_id > ? \
                 ORDER BY event_id, host_id LIMIT ?",
                (after, limit as u64),
            )
            .await
            .map_err(q)?;
        Ok(rows
            .into_iter()
            .map(|(event_id, host_id, status)| RawStatus {
                event_id,
                host_id,
                status,
            })
            .collect())
    }

    async fn load(
        &self,
        hosts: &[RawHost],
        events: &[RawEvent],
        statuses: &[RawStatus],
    ) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let mut tx = c.start_transaction(TxOpts::default()).await.map_err(q)?;
        for chunk in hosts.chunks(1000) {
            let mut p: Vec<Value> = Vec::new();
            for h in chunk {
                p.extend([
                    h.id.into(),
                    h.name.as_str().into(),
                    h.first_seen_ms.into(),
                    h.last_seen_ms.into(),
                ]);
            }
            let rows = vec!["(?, ?, ?, ?)"; chunk.len()].join(",");
            tx.exec_drop(
                format!(
                    "INSERT IGNORE INTO hosts (id, name, first_seen_ms, last_seen_ms) VALUES {rows}"
                ),
                p,
            )
            .await
            .map_err(q)?;
        }
        for chunk in events.chunks(1000) {
            let mut p: Vec<Value> = Vec::new();
            for e in chunk {
                p.extend([
                    e.id.into(),
                    e.kind.into(),
                    e.reporter_id.into(),
                    e.node_seq.into(),
                    e.added_by.as_str().into(),
                    e.created_ms.into(),
                    e.jail.as_str().into(),
                    e.protocol.as_str().into(),
                    e.port.as_str().into(),
                    e.ip.as_str().into(),
                    e.lifted_by.into(),
                    e.lifts.into(),
                ]);
            }
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(",");
            tx.exec_drop(
                format!(
                    "INSERT IGNORE INTO events (id, kind, reporter_id, node_seq, added_by, created_ms, \
                     jailname, protocol, port, ip, lifted_by, lifts) VALUES {rows}"
                ),
                p,
            )
            .await
            .map_err(q)?;
        }
        for chunk in statuses.chunks(3000) {
            let mut p: Vec<Value> = Vec::new();
            for s in chunk {
                p.extend([s.event_id.into(), s.host_id.into(), s.status.into()]);
            }
            let rows = vec!["(?, ?, ?)"; chunk.len()].join(",");
            tx.exec_drop(
                format!("INSERT IGNORE INTO statuses (event_id, host_id, status) VALUES {rows}"),
                p,
            )
            .await
            .map_err(q)?;
        }
        tx.commit().await.map_err(q)?;
        if !hosts.is_empty() {
            let all: Vec<(u64, String)> = c
                .query("SELECT id, name FROM hosts ORDER BY id")
                .await
                .map_err(q)?;
            Self::rebuild_view(&mut c, &all).await?;
            self.host_ids
                .lock()
                .unwrap()
                .extend(all.into_iter().map(|(id, n)| (n, id)));
        }
        Ok(())
    }

    async fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let mut c = self.conn().await?;
        let r: Option<(u64, u64, u64)> = c
            .query_first(
                "SELECT (SELECT COUNT(*) FROM hosts), (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM statuses)",
            )
            .await
            .map_err(q)?;
        Ok(r.unwrap_or_default())
    }
}
