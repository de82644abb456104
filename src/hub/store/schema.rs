//! The schema, written once, and the few places the two SQL dialects differ.
//!
//! Tables are data ([`TABLES`]): a new table, column or index is one edit
//! here, rendered for each backend by [`Dialect`]. Every difference between
//! MySQL/MariaDB and SQLite that banmesh meets is a method of `Dialect`, so
//! the list below is the whole of it:
//!
//! | what                | MySQL / MariaDB                   | SQLite                              |
//! |---------------------|-----------------------------------|-------------------------------------|
//! | auto-increment key  | `.. UNSIGNED AUTO_INCREMENT`      | `INTEGER PRIMARY KEY AUTOINCREMENT` |
//! | column types        | `BIGINT`, `VARCHAR(n)`, ..        | `INTEGER`, `TEXT`                   |
//! | table options       | `ENGINE=InnoDB`, utf8mb4          | `WITHOUT ROWID` for key-only tables |
//! | secondary indexes   | inside `CREATE TABLE`             | `CREATE INDEX IF NOT EXISTS`        |
//! | skip existing keys  | `INSERT IGNORE`                   | `INSERT OR IGNORE`                  |
//! | upsert              | `ON DUPLICATE KEY UPDATE`         | `ON CONFLICT(..) DO UPDATE`         |
//! | lock rows read      | `FOR UPDATE`                      | nothing (one writer connection)     |
//! | ms to datetime      | `FROM_UNIXTIME(ms / 1000)`        | `datetime(ms / 1000, 'unixepoch')`  |
//! | replace a view      | `CREATE OR REPLACE VIEW`          | `DROP VIEW` then `CREATE VIEW`      |
//! | a host name equals  | `name = ?` (the column is `_ci`)  | `name = ? COLLATE NOCASE`           |
//!
//! Placeholders are `?` in both (SQLite numbers bare `?` in order).
use super::{SCHEMA_VERSION, StoreError, executor::Executor};

/// Which SQL a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Sqlite,
}

/// A column's type, named for what it holds.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    /// The table's auto-increment key (32 bits in MySQL).
    Serial,
    /// The table's auto-increment key (64 bits in MySQL).
    BigSerial,
    /// A reference to a `Serial` key.
    U32,
    /// A reference to a `BigSerial` key, or a sequence.
    U64,
    /// Milliseconds, seconds, versions.
    I64,
    /// A small code (kind, status).
    Tiny,
    /// Text of at most n characters.
    Str(u16),
    /// Text of exactly n characters (hex digests).
    Char(u16),
}

/// One column: name, type, whether NULL is allowed.
pub type Column = (&'static str, Ty, bool);

/// A table as data; see the module doc.
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [Column],
    /// Primary key columns when the key is not a `Serial`/`BigSerial` column.
    pub primary: &'static [&'static str],
    /// Named unique keys.
    pub unique: &'static [(&'static str, &'static [&'static str])],
    /// Named secondary indexes.
    pub indexes: &'static [(&'static str, &'static [&'static str])],
    /// SQLite: store rows in the primary key's b-tree (`WITHOUT ROWID`).
    pub clustered: bool,
}

const NULL: bool = true;
const NOT_NULL: bool = false;

/// Every table, in creation order.
pub const TABLES: &[Table] = &[
    Table {
        name: "banmesh_meta",
        columns: &[("k", Ty::Str(64), NOT_NULL), ("v", Ty::I64, NOT_NULL)],
        primary: &["k"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    Table {
        name: "hosts",
        columns: &[
            ("id", Ty::Serial, NOT_NULL),
            ("name", Ty::Str(253), NOT_NULL),
            ("first_seen_ms", Ty::I64, NOT_NULL),
            ("last_seen_ms", Ty::I64, NOT_NULL),
            ("enrolled_ms", Ty::I64, NULL),
            ("cert_expires_ms", Ty::I64, NULL),
            ("revoked_ms", Ty::I64, NULL),
            // Schema 3 (hubs sharing one store): the hub the host is
            // subscribed through and since when; NULL when it is not, or
            // its stream ended cleanly. See `sql::hosts::subscribed_via`.
            ("hub", Ty::Str(253), NULL),
            ("hub_since_ms", Ty::I64, NULL),
        ],
        primary: &[],
        unique: &[("name", &["name"])],
        indexes: &[],
        clustered: false,
    },
    Table {
        name: "enrol_tokens",
        columns: &[
            ("hash", Ty::Char(64), NOT_NULL),
            ("name", Ty::Str(253), NULL),
            ("created_ms", Ty::I64, NOT_NULL),
            ("expires_ms", Ty::I64, NOT_NULL),
            ("used_ms", Ty::I64, NULL),
            ("cert_ttl_s", Ty::I64, NOT_NULL),
        ],
        primary: &["hash"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    Table {
        name: "events",
        columns: &[
            ("id", Ty::BigSerial, NOT_NULL),
            ("kind", Ty::Tiny, NOT_NULL),
            ("reporter_id", Ty::U32, NOT_NULL),
            ("node_seq", Ty::U64, NULL),
            ("added_by", Ty::Str(253), NOT_NULL),
            ("created_ms", Ty::I64, NOT_NULL),
            ("jailname", Ty::Str(64), NOT_NULL),
            ("protocol", Ty::Str(16), NOT_NULL),
            ("port", Ty::Str(32), NOT_NULL),
            ("ip", Ty::Str(64), NOT_NULL),
            ("lifted_by", Ty::U64, NULL),
            ("lifts", Ty::U64, NULL),
            // Schema 2 (the escalation ladder); see `ADDED_COLUMNS`.
            ("ends_ms", Ty::I64, NULL),
            ("rung", Ty::Tiny, NULL),
            ("extends", Ty::U64, NULL),
            ("reason", Ty::Str(255), NULL),
        ],
        primary: &[],
        // A report is (reporting host, node sequence): re-sends hit this key,
        // whether the report became a ban (kind 1) or was coalesced into an
        // active one (kind 5, `extends` naming that ban).
        unique: &[("report", &["reporter_id", "node_seq"])],
        // `extends`: the reports coalesced into a ban (and its updates),
        // read for every ban `bans`/`GetBan` show (schema 2).
        indexes: &[
            ("ip", &["ip"]),
            ("added_by", &["added_by", "ip"]),
            ("extends", &["extends"]),
        ],
        clustered: false,
    },
    Table {
        name: "statuses",
        columns: &[
            ("event_id", Ty::U64, NOT_NULL),
            ("host_id", Ty::U32, NOT_NULL),
            ("status", Ty::Tiny, NOT_NULL),
        ],
        primary: &["event_id", "host_id"],
        unique: &[],
        indexes: &[],
        clustered: true,
    },
    // The tables below are keyed by `name_key`, the name in lower case:
    // hosts and admins are one namespace, compared case-insensitively.
    // Each is its own table (not a column of `hosts`) because a name can
    // be revoked, or belong to an admin, without ever being a host; and
    // stores of earlier builds gain them by `CREATE TABLE IF NOT EXISTS`.
    Table {
        // Names refused from now on: a host's, an admin's, or one no
        // certificate has connected under yet.
        name: "revoked_names",
        columns: &[
            ("name_key", Ty::Str(253), NOT_NULL),
            ("name", Ty::Str(253), NOT_NULL),
            ("revoked_ms", Ty::I64, NOT_NULL),
            ("revoked_by", Ty::Str(253), NOT_NULL),
        ],
        primary: &["name_key"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    Table {
        // Names an admin certificate has called the hub under: no host
        // may enrol as one.
        name: "admin_names",
        columns: &[
            ("name_key", Ty::Str(253), NOT_NULL),
            ("name", Ty::Str(253), NOT_NULL),
            ("first_seen_ms", Ty::I64, NOT_NULL),
        ],
        primary: &["name_key"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    Table {
        // The certificate lifetime a host enrolled with, which `Renew`
        // keeps.
        name: "host_lifetimes",
        columns: &[
            ("name_key", Ty::Str(253), NOT_NULL),
            ("cert_ttl_s", Ty::I64, NOT_NULL),
        ],
        primary: &["name_key"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    // The fleet allow-list (`banmesh allow`): canonical CIDR text, so one
    // network has one spelling and one row. Its changes are also events
    // (kinds 3 and 4), which carry it to the nodes in the event order.
    Table {
        name: "allow_list",
        columns: &[
            ("network", Ty::Str(64), NOT_NULL),
            ("note", Ty::Str(255), NOT_NULL),
            ("added_by", Ty::Str(253), NOT_NULL),
            ("added_ms", Ty::I64, NOT_NULL),
        ],
        primary: &["network"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    // The fleet's own addresses (each host's connection source, the hub's
    // address as hosts reach it): never banned by the fleet. Kept so a
    // restarted hub refuses reports of them before their owners reconnect.
    Table {
        name: "fleet_addresses",
        columns: &[
            ("ip", Ty::Str(64), NOT_NULL),
            ("owner", Ty::Str(253), NOT_NULL),
            ("first_seen_ms", Ty::I64, NOT_NULL),
        ],
        primary: &["ip"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    // Reports the hub refused because their address is on the allow-list:
    // who reported what, when, and which entry matched. Keyed like events
    // by (host, seq), so a re-sent refused report is stored once.
    Table {
        name: "refused_reports",
        columns: &[
            ("id", Ty::BigSerial, NOT_NULL),
            ("host", Ty::Str(253), NOT_NULL),
            ("seq", Ty::U64, NOT_NULL),
            ("created_ms", Ty::I64, NOT_NULL),
            ("jailname", Ty::Str(64), NOT_NULL),
            ("protocol", Ty::Str(16), NOT_NULL),
            ("port", Ty::Str(32), NOT_NULL),
            ("ip", Ty::Str(64), NOT_NULL),
            ("allowed_by", Ty::Str(128), NOT_NULL),
        ],
        primary: &[],
        unique: &[("report", &["host", "seq"])],
        indexes: &[],
        clustered: false,
    },
    // Addresses whose fleet history an admin cleared (`unban --forget`):
    // bans with ids up to `up_to` no longer count on the ladder.
    Table {
        name: "forgotten",
        columns: &[
            ("ip", Ty::Str(64), NOT_NULL),
            ("up_to", Ty::U64, NOT_NULL),
            ("forgotten_ms", Ty::I64, NOT_NULL),
            ("forgotten_by", Ty::Str(253), NOT_NULL),
        ],
        primary: &["ip"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
    // Hubs sharing the store (schema 3): each writes `seen_ms` every few
    // seconds (`hub::presence`), so that any hub can tell a claim in
    // `hosts.hub` of a hub that died from a live hub's.
    Table {
        name: "hubs",
        columns: &[
            ("name", Ty::Str(253), NOT_NULL),
            ("seen_ms", Ty::I64, NOT_NULL),
        ],
        primary: &["name"],
        unique: &[],
        indexes: &[],
        clustered: false,
    },
];

/// Columns added to tables after schema 1, as `(table, column)`: a store
/// written by an earlier build gains them by `ALTER TABLE .. ADD COLUMN`
/// at open (each is in its table's [`TABLES`] entry too, and NULL-able, so
/// old rows read as "not given").
pub const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("events", "ends_ms"),
    ("events", "rung"),
    ("events", "extends"),
    ("events", "reason"),
    ("hosts", "hub"),
    ("hosts", "hub_since_ms"),
];

impl Dialect {
    fn column_type(self, ty: Ty) -> String {
        use Ty::*;
        match (self, ty) {
            (Dialect::MySql, Serial) => "INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY".into(),
            (Dialect::MySql, BigSerial) => {
                "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY".into()
            }
            (Dialect::MySql, U32) => "INT UNSIGNED".into(),
            (Dialect::MySql, U64) => "BIGINT UNSIGNED".into(),
            (Dialect::MySql, I64) => "BIGINT".into(),
            (Dialect::MySql, Tiny) => "TINYINT".into(),
            (Dialect::MySql, Str(n)) => format!("VARCHAR({n})"),
            (Dialect::MySql, Char(n)) => format!("CHAR({n})"),
            (Dialect::Sqlite, Serial | BigSerial) => "INTEGER PRIMARY KEY AUTOINCREMENT".into(),
            (Dialect::Sqlite, U32 | U64 | I64 | Tiny) => "INTEGER".into(),
            (Dialect::Sqlite, Str(_) | Char(_)) => "TEXT".into(),
        }
    }

    /// The statements creating `t` (and its indexes) when missing.
    pub fn create_table(self, t: &Table) -> Vec<String> {
        let mut parts: Vec<String> = t
            .columns
            .iter()
            .map(|&(name, ty, null)| match ty {
                Ty::Serial | Ty::BigSerial => format!("{name} {}", self.column_type(ty)),
                _ => format!(
                    "{name} {} {}",
                    self.column_type(ty),
                    if null { "NULL" } else { "NOT NULL" }
                ),
            })
            .collect();
        if !t.primary.is_empty() {
            parts.push(format!("PRIMARY KEY ({})", t.primary.join(", ")));
        }
        for (name, cols) in t.unique {
            parts.push(match self {
                Dialect::MySql => format!("UNIQUE KEY {name} ({})", cols.join(", ")),
                Dialect::Sqlite => format!("UNIQUE ({})", cols.join(", ")),
            });
        }
        let mut out = Vec::new();
        match self {
            Dialect::MySql => {
                for (name, cols) in t.indexes {
                    parts.push(format!("KEY {name} ({})", cols.join(", ")));
                }
                out.push(format!(
                    "CREATE TABLE IF NOT EXISTS {} (\n    {}\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
                    t.name,
                    parts.join(",\n    ")
                ));
            }
            Dialect::Sqlite => {
                out.push(format!(
                    "CREATE TABLE IF NOT EXISTS {} (\n    {}\n){}",
                    t.name,
                    parts.join(",\n    "),
                    if t.clustered { " WITHOUT ROWID" } else { "" }
                ));
                for (name, cols) in t.indexes {
                    out.push(format!(
                        "CREATE INDEX IF NOT EXISTS {0}_{name} ON {0} ({1})",
                        t.name,
                        cols.join(", ")
                    ));
                }
            }
        }
        out
    }

    /// `INSERT` that skips rows whose key exists.
    pub fn insert_ignore(self) -> &'static str {
        match self {
            Dialect::MySql => "INSERT IGNORE",
            Dialect::Sqlite => "INSERT OR IGNORE",
        }
    }

    /// The clause after `VALUES (..)` that updates `set` columns from the
    /// new row when the `key` columns collide.
    pub fn upsert(self, key: &[&str], set: &[&str]) -> String {
        match self {
            Dialect::MySql => {
                let set: Vec<String> = set.iter().map(|c| format!("{c} = VALUES({c})")).collect();
                format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
            }
            Dialect::Sqlite => {
                let set: Vec<String> = set.iter().map(|c| format!("{c} = excluded.{c}")).collect();
                format!(
                    " ON CONFLICT({}) DO UPDATE SET {}",
                    key.join(", "),
                    set.join(", ")
                )
            }
        }
    }

    /// Suffix of a `SELECT` inside a transaction that will update what it
    /// read. SQLite has one writer connection, so nothing can intervene.
    pub fn for_update(self) -> &'static str {
        match self {
            Dialect::MySql => " FOR UPDATE",
            Dialect::Sqlite => "",
        }
    }

    /// A condition matching `col` to a `?` host name case-insensitively:
    /// hosts and admins are one namespace where `web-1` and `WEB-1` are the
    /// same name. MySQL's `hosts.name` has utf8mb4's default collation,
    /// which is case-insensitive (its unique key already treats the two as
    /// one), so the index still serves it; SQLite's `NOCASE` folds ASCII,
    /// all a valid name holds.
    pub fn name_is(self, col: &str) -> String {
        match self {
            Dialect::MySql => format!("{col} = ?"),
            Dialect::Sqlite => format!("{col} = ? COLLATE NOCASE"),
        }
    }

    /// A query counting the columns named `?` (2nd) in table `?` (1st).
    fn has_column(self) -> &'static str {
        match self {
            Dialect::MySql => {
                "SELECT COUNT(*) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?"
            }
            Dialect::Sqlite => "SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?",
        }
    }

    /// Counts the tables named `?` (0 or 1).
    fn has_table(self) -> &'static str {
        match self {
            Dialect::MySql => {
                "SELECT COUNT(*) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
            }
            Dialect::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
            }
        }
    }

    /// `ALTER TABLE` adding `column` of `table` as [`TABLES`] defines it.
    fn add_column(self, table: &str, column: &str) -> Option<String> {
        let t = TABLES.iter().find(|t| t.name == table)?;
        let &(name, ty, null) = t.columns.iter().find(|c| c.0 == column)?;
        Some(format!(
            "ALTER TABLE {table} ADD COLUMN {name} {} {}",
            self.column_type(ty),
            if null { "NULL" } else { "NOT NULL" }
        ))
    }

    /// An expression turning milliseconds since the epoch into a datetime.
    fn datetime(self, ms: &str) -> String {
        match self {
            Dialect::MySql => format!("FROM_UNIXTIME({ms} / 1000)"),
            Dialect::Sqlite => format!("datetime({ms} / 1000, 'unixepoch')"),
        }
    }

    /// Statements (re)defining view `name` as `select`.
    fn replace_view(self, name: &str, select: &str) -> Vec<String> {
        match self {
            Dialect::MySql => vec![format!("CREATE OR REPLACE VIEW {name} AS {select}")],
            Dialect::Sqlite => vec![
                format!("DROP VIEW IF EXISTS {name}"),
                format!("CREATE VIEW {name} AS {select}"),
            ],
        }
    }
}

/// Creates missing tables, adds missing columns and records the schema
/// version: a store written by a newer banmesh is refused, untouched,
/// rather than misread. Every step is idempotent, so a migration cut short
/// (the database went away) is finished by the next start.
///
/// A store already at this build's version gets no DDL at all: under
/// Galera every DDL statement runs in total order isolation on the whole
/// cluster, and one started while other hubs write can stall the cluster
/// (see [`rebuild_view`]); a hub (re)starting beside live hubs must not
/// issue any.
pub async fn migrate(ex: &mut dyn Executor, d: Dialect) -> Result<(), StoreError> {
    const VERSION: &str = "SELECT v FROM banmesh_meta WHERE k = 'schema_version'";
    // The version first: nothing is altered in a store from a newer build.
    // An error here is a store without `banmesh_meta` (new): create it.
    // A new store has no `banmesh_meta`: asked first, so that no query
    // fails (the driver would log that failure as an error).
    let has_meta = ex
        .query(d.has_table(), vec!["banmesh_meta".into()])
        .await?
        .first()
        .map(|r| r.i64(0))
        .transpose()?
        .unwrap_or(0)
        > 0;
    if !has_meta {
        for stmt in d.create_table(&TABLES[0]) {
            ex.exec(&stmt, vec![]).await?;
        }
    }
    let found = ex.query(VERSION, vec![]).await?;
    let found = found.first().map(|r| r.i64(0)).transpose()?;
    if let Some(v) = found.filter(|v| *v > SCHEMA_VERSION) {
        return Err(StoreError::NewerSchema { found: v });
    }
    if found == Some(SCHEMA_VERSION) {
        // The counter row is data, not DDL (a store of this version made
        // before the counter existed gains it here).
        ex.exec(super::sql::sequence::create_sql(d), vec![]).await?;
        return Ok(());
    }
    // Another version: the view's definition may have changed with it;
    // dropped here, it is made anew by the hosts' refresh after opening
    // (`rebuild_view` skips a view whose columns are already right).
    for stmt in d.create_table(&TABLES[0]) {
        ex.exec(&stmt, vec![]).await?;
    }
    ex.exec("DROP VIEW IF EXISTS ip_table", vec![]).await?;
    // Tables first, then the columns added since, then SQLite's separate
    // indexes (one may name an added column).
    let mut indexes = Vec::new();
    for t in TABLES {
        let mut stmts = d.create_table(t).into_iter();
        if let Some(create) = stmts.next() {
            ex.exec(&create, vec![]).await?;
        }
        indexes.extend(stmts);
    }
    for &(table, column) in ADDED_COLUMNS {
        let n = ex
            .query(d.has_column(), vec![table.into(), column.into()])
            .await?;
        if n.first().map(|r| r.i64(0)).transpose()?.unwrap_or(0) == 0 {
            let alter = d.add_column(table, column).ok_or_else(|| {
                StoreError::query(format!("no column {table}.{column} in TABLES"))
            })?;
            tracing::info!(%table, %column, "adding a column to a store from an earlier build");
            ex.exec(&alter, vec![]).await?;
        }
    }
    for stmt in indexes {
        ex.exec(&stmt, vec![]).await?;
    }
    // MySQL creates indexes inside `CREATE TABLE`, which an existing table
    // skips: an index added since is created here.
    if d == Dialect::MySql {
        for t in TABLES {
            for (name, cols) in t.indexes {
                let n = ex
                    .query(
                        "SELECT COUNT(*) FROM information_schema.statistics \
                         WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
                        vec![t.name.into(), (*name).into()],
                    )
                    .await?;
                if n.first().map(|r| r.i64(0)).transpose()?.unwrap_or(0) == 0 {
                    tracing::info!(
                        table = t.name,
                        index = name,
                        "adding an index to a store from an earlier build"
                    );
                    ex.exec(
                        &format!("CREATE INDEX {name} ON {} ({})", t.name, cols.join(", ")),
                        vec![],
                    )
                    .await?;
                }
            }
        }
    }
    // The event-id counter (see `sql::sequence`); `reserve` steps over
    // rows already stored, so 1 is a safe start for any store.
    ex.exec(super::sql::sequence::create_sql(d), vec![]).await?;
    match found {
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        Some(_) => ex
            .exec(
                "UPDATE banmesh_meta SET v = ? WHERE k = 'schema_version'",
                vec![SCHEMA_VERSION.into()],
            )
            .await
            .map(drop),
        None => ex
            .exec(
                "INSERT INTO banmesh_meta (k, v) VALUES ('schema_version', ?)",
                vec![SCHEMA_VERSION.into()],
            )
            .await
            .map(drop),
    }
}

/// Hosts given a column in the `ip_table` view (the first by enrolment).
/// MySQL caps a view at 4,096 columns and every column is a subquery, so
/// the seed's shape stops here; the `statuses` rows hold every host.
pub const MAX_VIEW_HOSTS: usize = 1000;

/// MySQL's longest identifier: a column name is at most this many characters.
pub const MAX_COLUMN: usize = 64;

/// The `ip_table` view's host columns: `host_<name>` per host, as the seed
/// named them where that is a valid, distinct column. Column names are
/// compared case-insensitively by MySQL and limited to [`MAX_COLUMN`]
/// characters, so a name that is too long, or that collides with an
/// earlier host's column in any letter case (`web-1` and `WEB1`), is
/// truncated and given a suffix from a hash of the host's name: stable
/// across restarts whatever other hosts appear later.
pub fn view_columns(hosts: &[(u64, String)]) -> Vec<(u64, String)> {
    let mut seen = std::collections::HashSet::new();
    hosts
        .iter()
        .take(MAX_VIEW_HOSTS)
        .map(|(id, name)| {
            let seed = crate::ban::seed_column(name);
            let mut col = seed.clone();
            if col.len() > MAX_COLUMN || seen.contains(&col.to_ascii_lowercase()) {
                use sha2::Digest;
                let hash = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..4]);
                // `seed` is ASCII: any byte index is a character boundary.
                let keep = seed.len().min(MAX_COLUMN - hash.len() - 1);
                col = format!("{}_{hash}", &seed[..keep]);
                if seen.contains(&col.to_ascii_lowercase()) {
                    // Two names with one hash prefix: the id settles it.
                    let id = id.to_string();
                    let keep = seed.len().min(MAX_COLUMN - hash.len() - id.len() - 2);
                    col = format!("{}_{hash}_{id}", &seed[..keep]);
                }
            }
            seen.insert(col.to_ascii_lowercase());
            (*id, col)
        })
        .collect()
}

/// The `SELECT` behind the `ip_table` view: bans only, one column per host
/// with its status, or 1 for the reporter and 0 for others when it has none.
pub fn view_sql(hosts: &[(u64, String)], d: Dialect) -> String {
    let created = d.datetime("e.created_ms");
    let mut sql = format!(
        "SELECT e.id AS id, e.added_by AS added_by, {created} AS created, e.jailname AS jailname, \
         e.protocol AS protocol, e.port AS port, e.ip AS ip"
    );
    for (id, col) in view_columns(hosts) {
        sql.push_str(&format!(
            ", COALESCE((SELECT s.status FROM statuses s WHERE s.event_id = e.id AND s.host_id = {id}), \
             CASE WHEN e.reporter_id = {id} THEN 1 ELSE 0 END) AS {col}"
        ));
    }
    sql.push_str(" FROM events e WHERE e.kind = 1");
    sql
}

/// Rebuilds the `ip_table` view for `hosts` (by id). DDL: MySQL commits
/// an open transaction on it, so callers run it outside one.
///
/// On MySQL a view whose columns are already those of `hosts` is left as
/// it is (a hub's start, a host of its cache), so DDL runs only when a
/// host is new. Under Galera that DDL runs in rolling schema upgrade mode
/// (`wsrep_OSU_method = RSU`): on this hub's own database node only,
/// never in the cluster's total order. Measured here (MariaDB 10.11,
/// galera-4 26.4, 3 nodes on loopback): `CREATE OR REPLACE VIEW` in the
/// default total order isolation through two nodes while a third upserts
/// `hosts` stalled the whole cluster for good ("Waiting to execute in
/// isolation" / "Waiting for certification") within seconds; the same
/// 200 rebuilds under RSU finished in 1.5 s, cluster Synced, in each of
/// four runs. Each hub thus keeps its own node's view: `Store::refresh_view`
/// every few seconds picks up hosts that joined through other hubs.
pub async fn rebuild_view(
    ex: &mut dyn Executor,
    d: Dialect,
    hosts: &[(u64, String)],
) -> Result<(), StoreError> {
    if d == Dialect::Sqlite {
        for stmt in d.replace_view("ip_table", &view_sql(hosts, d)) {
            ex.exec(&stmt, vec![]).await?;
        }
        return Ok(());
    }
    let have: Vec<String> = ex
        .query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ip_table' ORDER BY ORDINAL_POSITION",
            vec![],
        )
        .await?
        .iter()
        .map(|r| r.text(0).map(|c| c.to_ascii_lowercase()))
        .collect::<Result<_, _>>()?;
    let want: Vec<String> = VIEW_FIXED_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .chain(
            view_columns(hosts)
                .into_iter()
                .map(|(_, c)| c.to_ascii_lowercase()),
        )
        .collect();
    if have == want {
        return Ok(());
    }
    // `@@wsrep_on` is OFF on a MariaDB without Galera, and unknown (an
    // error) on MySQL: either way, the default mode.
    let galera = ex
        .query("SELECT @@wsrep_on", vec![])
        .await
        .ok()
        .and_then(|rows| rows.first().map(|r| r.i64(0).unwrap_or(0) == 1))
        .unwrap_or(false);
    if galera {
        ex.exec("SET SESSION wsrep_OSU_method = 'RSU'", vec![])
            .await?;
    }
    let mut result = Ok(());
    for stmt in d.replace_view("ip_table", &view_sql(hosts, d)) {
        if let Err(e) = ex.exec(&stmt, vec![]).await {
            result = Err(e);
            break;
        }
    }
    if galera {
        // The session goes back to the pool: back to total order first.
        ex.exec("SET SESSION wsrep_OSU_method = 'TOI'", vec![])
            .await?;
    }
    result
}

/// The `ip_table` view's columns before the hosts' (lower case).
const VIEW_FIXED_COLUMNS: [&str; 7] = [
    "id", "added_by", "created", "jailname", "protocol", "port", "ip",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn ddl(d: Dialect) -> String {
        TABLES
            .iter()
            .flat_map(|t| d.create_table(t))
            .collect::<Vec<_>>()
            .join(";\n")
    }

    /// Stores created by earlier builds keep their tables (`IF NOT
    /// EXISTS`); SQLite's separate indexes must keep their names too, or
    /// every old store would gain a second copy of each.
    #[test]
    fn renders_the_keys_and_index_names_earlier_builds_created() {
        let my = ddl(Dialect::MySql);
        for part in [
            "id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY",
            "UNIQUE KEY report (reporter_id, node_seq)",
            "KEY ip (ip)",
            "KEY added_by (added_by, ip)",
            "UNIQUE KEY name (name)",
            "PRIMARY KEY (event_id, host_id)\n) ENGINE=InnoDB",
        ] {
            assert!(my.contains(part), "{part}");
        }
        let lite = ddl(Dialect::Sqlite);
        for part in [
            "id INTEGER PRIMARY KEY AUTOINCREMENT",
            "UNIQUE (reporter_id, node_seq)",
            "CREATE INDEX IF NOT EXISTS events_ip ON events (ip)",
            "CREATE INDEX IF NOT EXISTS events_added_by ON events (added_by, ip)",
            "PRIMARY KEY (event_id, host_id)\n) WITHOUT ROWID",
        ] {
            assert!(lite.contains(part), "{part}");
        }
        assert_eq!(lite.matches("WITHOUT ROWID").count(), 1);
    }

    #[test]
    fn dialects_differ_only_where_listed() {
        let (m, s) = (Dialect::MySql, Dialect::Sqlite);
        assert_eq!(m.insert_ignore(), "INSERT IGNORE");
        assert_eq!(s.insert_ignore(), "INSERT OR IGNORE");
        assert_eq!(
            m.upsert(&["name"], &["last_seen_ms"]),
            " ON DUPLICATE KEY UPDATE last_seen_ms = VALUES(last_seen_ms)"
        );
        assert_eq!(
            s.upsert(&["name"], &["last_seen_ms"]),
            " ON CONFLICT(name) DO UPDATE SET last_seen_ms = excluded.last_seen_ms"
        );
        let hosts = [(1, "web-1".to_string()), (2, "web1".to_string())];
        let cols = view_columns(&hosts);
        assert_eq!(cols[0].1, "host_web1");
        assert!(cols[1].1.starts_with("host_web1_"), "made unique");
        assert!(view_sql(&hosts, m).contains("FROM_UNIXTIME(e.created_ms / 1000) AS created"));
        assert_eq!(m.name_is("name"), "name = ?");
        assert_eq!(s.name_is("name"), "name = ? COLLATE NOCASE");
    }

    /// MySQL refuses a column name over 64 characters (ERROR 1166) and two
    /// that differ only in case (ERROR 1060): either stopped a hub from
    /// starting, since the view is rebuilt at every start.
    #[test]
    fn view_columns_fit_mysql_and_are_unique_in_any_case() {
        let long = "a".repeat(70) + ".example";
        let hosts: Vec<(u64, String)> = [
            "web-1",
            "WEB1",
            "Web1",
            long.as_str(),
            &long.to_uppercase(),
            "db",
        ]
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1, n.to_string()))
        .collect();
        let cols = view_columns(&hosts);
        assert_eq!(cols[0].1, "host_web1", "the seed's name where it fits");
        assert_eq!(cols[5].1, "host_db");
        let mut lower: Vec<String> = cols.iter().map(|c| c.1.to_ascii_lowercase()).collect();
        assert!(cols.iter().all(|c| c.1.len() <= MAX_COLUMN), "{cols:?}");
        lower.sort();
        lower.dedup();
        assert_eq!(lower.len(), cols.len(), "{cols:?}");
        // Stable: the same hosts give the same columns.
        assert_eq!(view_columns(&hosts), cols);
    }
}
