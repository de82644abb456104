//! The tuned write paths: the group commit and the grouped status writes.
//!
//! MySQL pays a round trip per statement, so a batch is one multi-row
//! `INSERT IGNORE` (re-sends skipped by the `report` key) and its ids are
//! the explicit ids reserved from the event-id counter (`sql::sequence`).
//! The multi-row statements go over the text protocol (`literal` says why).
use std::collections::HashMap;

use mysql_async::{TxOpts, Value, prelude::*};

use super::{MysqlStore, literal, q};
use crate::{
    ban::Status,
    hub::store::{COALESCED_KIND, Committed, NewReport, Plan, StoreError, Stored, sql},
};

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

/// The columns every `events` row a report writes gets, in order.
const REPORT_COLUMNS: &str = "kind, reporter_id, node_seq, added_by, created_ms, jailname, \
                              protocol, port, ip, ends_ms, rung, extends, reason, id";

/// How many [`REPORT_COLUMNS`] there are.
const REPORT_WIDTH: usize = 14;

/// `r` as the values of [`REPORT_COLUMNS`], stored as `row`.
fn values(
    row: &Stored,
    reporter: u64,
    seq: Option<u64>,
    r: &NewReport,
    now: i64,
    id: u64,
) -> [Value; REPORT_WIDTH] {
    [
        row.kind.into(),
        reporter.into(),
        seq.into(),
        r.host.as_str().into(),
        now.into(),
        r.ban.jail.as_str().into(),
        r.ban.protocol.as_str().into(),
        r.ban.port.as_str().into(),
        r.ban.ip.as_str().into(),
        row.ends_ms.into(),
        row.rung.into(),
        row.extends.into(),
        row.reason.clone().into(),
        id.into(),
    ]
}

/// The first of `n` event ids reserved in `tx` (`sql::sequence`): one
/// round trip, the new counter value coming back as `LAST_INSERT_ID`.
async fn reserve(tx: &mut mysql_async::Transaction<'_>, n: u64) -> Result<u64, StoreError> {
    for _ in 0..2 {
        tx.exec_drop(sql::sequence::MYSQL_RESERVE, (n,))
            .await
            .map_err(q)?;
        if tx.affected_rows() > 0 {
            let next = tx.last_insert_id().unwrap_or(0);
            return next
                .checked_sub(n)
                .ok_or_else(|| StoreError::query("the event-id counter returned no value"));
        }
        tx.query_drop(sql::sequence::create_sql(
            crate::hub::store::schema::Dialect::MySql,
        ))
        .await
        .map_err(q)?;
    }
    Err(StoreError::query(
        "banmesh_meta has no next_event_id row after creating it",
    ))
}

impl MysqlStore {
    /// One multi-row `INSERT IGNORE` per batch (see the module doc); a
    /// second one for reports coalesced into a ban of the same batch,
    /// whose id only the first tells.
    pub(super) async fn group_commit(
        &self,
        batch: &[NewReport],
        now: i64,
    ) -> Result<Vec<Committed>, StoreError> {
        // A lost conflict on the event-id counter (another hub committed
        // first; under Galera a certification failure) rolled everything
        // back: the batch is retried whole (`sql::sequence`).
        sql::sequence::retrying(|| self.group_commit_once(batch, now)).await
    }

    /// One attempt of [`Self::group_commit`], in one transaction.
    async fn group_commit_once(
        &self,
        batch: &[NewReport],
        now: i64,
    ) -> Result<Vec<Committed>, StoreError> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut ids = Vec::with_capacity(batch.len());
        for r in batch {
            ids.push(sql::host_id(self, &r.host).await?);
        }
        // The committer's own connection (`dedicated`): no pool reset, the
        // counter bump stays prepared. Any early return drops the
        // transaction, then the lease: the pool rolls back and resets it.
        let mut lease = self.lease().await?;
        let keys: Vec<(u64, u64)> = ids
            .iter()
            .copied()
            .zip(batch.iter().map(|r| r.seq))
            .collect();
        let (second, first): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| matches!(batch[i].plan, Plan::CoalesceWith(_)));
        let mut out: Vec<Option<Committed>> = vec![None; batch.len()];
        let mut tx = lease
            .conn()
            .start_transaction(TxOpts::default())
            .await
            .map_err(q)?;
        for phase in [first, second] {
            self.insert_phase(&mut tx, batch, &keys, &phase, &mut out, now)
                .await?;
        }
        tx.commit().await.map_err(q)?;
        lease.keep();
        out.into_iter()
            .map(|c| c.ok_or_else(|| StoreError::query("a report of the batch got no outcome")))
            .collect()
    }

    /// Stores the reports at `idx` of `batch` and fills their outcomes.
    async fn insert_phase(
        &self,
        tx: &mut mysql_async::Transaction<'_>,
        batch: &[NewReport],
        keys: &[(u64, u64)],
        idx: &[usize],
        out: &mut [Option<Committed>],
        now: i64,
    ) -> Result<(), StoreError> {
        if idx.is_empty() {
            return Ok(());
        }
        // One row per key: a key repeated within the batch is a re-send.
        let mut fresh = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &i in idx {
            if seen.insert(keys[i]) {
                fresh.push(i);
            }
        }
        let outcome = |out: &[Option<Committed>], i: usize| {
            out.get(i).and_then(|c| c.as_ref()).map(Committed::event_id)
        };
        let stored: HashMap<usize, Stored> = fresh
            .iter()
            .map(|&i| (i, Stored::of(&batch[i].plan, |j| outcome(out, j))))
            .collect();
        let first = reserve(tx, fresh.len() as u64).await?;
        let mut params: Vec<Value> = Vec::with_capacity(fresh.len() * REPORT_WIDTH);
        for (n, &i) in fresh.iter().enumerate() {
            params.extend(values(
                &stored[&i],
                keys[i].0,
                Some(keys[i].1),
                &batch[i],
                now,
                first + n as u64,
            ));
        }
        // Text protocol, values quoted by mysql_common (see `literal`): a
        // prepared statement of this row count would be prepared afresh.
        // The mode is the session's as `reserve`'s answer just stated it.
        let no_backslash_escapes = literal::no_backslash_escapes(tx).ok_or_else(|| {
            StoreError::query("the server's answer carried no status flags to quote values by")
        })?;
        let rows = literal::rows(&params, REPORT_WIDTH, no_backslash_escapes);
        // Re-sent reports hit the (reporter, seq) unique key and are skipped;
        // every value was validated, so IGNORE hides nothing else.
        tx.query_drop(format!(
            "INSERT IGNORE INTO events ({REPORT_COLUMNS}) VALUES {rows}"
        ))
        .await
        .map_err(q)?;
        let inserted = tx.affected_rows() as usize;
        // (reporter, seq) -> (the id a re-send is answered with, the row's
        // own id, the ban stored under it).
        let mut known: HashMap<(u64, u64), (u64, u64, BanKey)> =
            HashMap::with_capacity(fresh.len());
        // Row n of the statement has id first + n (explicit ids).
        let mut new_keys = std::collections::HashSet::new();
        if inserted == fresh.len() {
            for (n, &i) in fresh.iter().enumerate() {
                let id = first + n as u64;
                known.insert(keys[i], (id, id, BanKey::of(&batch[i].ban)));
                new_keys.insert(keys[i]);
            }
        } else {
            // Some were stored before: look every key up. This statement's
            // rows have ids from `first` on; older ones are below it.
            let fresh_keys: Vec<(u64, u64)> = fresh.iter().map(|&i| keys[i]).collect();
            type Row = (
                u64,
                i64,
                Option<u64>,
                u64,
                u64,
                String,
                String,
                String,
                String,
            );
            let rows: Vec<Row> = tx
                .query(format!(
                    "SELECT id, kind, extends, reporter_id, node_seq, ip, jailname, protocol, port \
                     FROM events WHERE {}",
                    report_keys(&fresh_keys)
                ))
                .await
                .map_err(q)?;
            for (id, kind, extends, h, s, ip, jail, protocol, port) in rows {
                if inserted > 0 && id >= first {
                    new_keys.insert((h, s));
                }
                let answer = if kind == COALESCED_KIND {
                    extends.unwrap_or(0)
                } else {
                    id
                };
                known.insert((h, s), (answer, id, BanKey(ip, jail, protocol, port)));
            }
        }
        let fresh: std::collections::HashSet<usize> = fresh
            .into_iter()
            .filter(|&i| new_keys.contains(&keys[i]))
            .collect();
        for &i in idx {
            let r = &batch[i];
            let key = keys[i];
            let (answer, id, stored_ban) = &known[&key];
            if fresh.contains(&i) {
                let row = Stored::of(&r.plan, |j| outcome(out, j));
                out[i] = Some(row.committed(*id, r, now));
            } else if *stored_ban == BanKey::of(&r.ban) {
                out[i] = Some(Committed::Duplicate(*answer));
            } else {
                // The same (host, seq) for another ban: the node's sequence
                // was reset (restored from a backup?). Not a re-send: store
                // it, without the key, and say so.
                tracing::warn!(host = %r.host, seq = r.seq, ip = %r.ban.ip, "sequence reused for a different ban; stored as a new report");
                let row = Stored::of(&r.plan, |j| outcome(out, j));
                let id = reserve(tx, 1).await?;
                tx.exec_drop(
                    format!(
                        "INSERT INTO events ({REPORT_COLUMNS}) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ),
                    values(&row, key.0, None, r, now, id).to_vec(),
                )
                .await
                .map_err(q)?;
                out[i] = Some(row.committed(id, r, now));
            }
        }
        Ok(())
    }

    /// Many hosts' statuses in one upsert per 5,000 rows.
    pub(super) async fn grouped_statuses(
        &self,
        updates: &[(String, u64, Status)],
    ) -> Result<usize, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let mut ids: HashMap<&str, u64> = HashMap::new();
        for (host, _, _) in updates {
            if !ids.contains_key(host.as_str()) {
                ids.insert(host, sql::host_id(self, host).await?);
            }
        }
        let mut c = self.conn().await?;
        for chunk in updates.chunks(5000) {
            let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
            for (host, id, st) in chunk {
                params.extend([(*id).into(), ids[host.as_str()].into(), (*st as u8).into()]);
            }
            // Text protocol, as the batch insert (see `literal`); numbers
            // only, whose text is the same in either quoting mode.
            let rows = literal::rows(&params, 3, false);
            c.query_drop(format!(
                "INSERT INTO statuses (event_id, host_id, status) VALUES {rows} \
                 ON DUPLICATE KEY UPDATE status = VALUES(status)"
            ))
            .await
            .map_err(q)?;
        }
        Ok(updates.len())
    }
}

#[cfg(test)]
mod tests {
    use mysql_async::{OptsBuilder, Pool};

    use super::*;
    use crate::ban::{Ban, BanTerm};

    /// The test server (as `tests/common` has it).
    fn server() -> String {
        std::env::var("BANMESH_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
    }

    /// A report of a fleet policy ban whose reason is `reason`.
    fn reasoned(seq: u64, ip: &str, reason: &str) -> NewReport {
        NewReport {
            host: "web-1".into(),
            seq,
            ban: Ban::new("sshd", "tcp", "22", ip).unwrap(),
            plan: Plan::New(BanTerm {
                reason: reason.into(),
                ..Default::default()
            }),
        }
    }

    /// Reasons are operator text: quotes, backslashes, a comment, a NUL,
    /// line breaks and non-ASCII come back as written whether the server
    /// runs with backslash escapes or `NO_BACKSLASH_ESCAPES`, and a re-send
    /// of the batch is still recognised.
    #[tokio::test]
    async fn values_written_as_text_come_back_as_written_in_either_quoting_mode() {
        let name = format!("banmesh_u{}_literal", std::process::id());
        let url = format!("{}/{name}", server());
        let store = MysqlStore::open(&url)
            .await
            .expect("open the test database");
        let reasons = [
            r"it's \'quoted\' and \\n not a line break",
            "a\\",
            "'); DROP TABLE events; -- \"",
            "nul \0 tab \t cr \r lf \n ctrl-z \x1a",
            "été 禁止 🚫",
        ];
        for (mode, no_backslash) in [(0, false), (1, true)] {
            let mut opts = OptsBuilder::from_opts(store.targets[0].opts.clone());
            if no_backslash {
                // `setup`, not `init`: the pool resets a returned
                // connection's session, and reruns only `setup`.
                opts = opts.setup(vec![
                    "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',NO_BACKSLASH_ESCAPES')",
                ]);
            }
            store.current.write().unwrap().pool = Pool::new(opts);
            // The commit's kept connection is of the old pool's mode.
            store.dedicated.clear();
            let mut c = store.conn().await.unwrap();
            let sql_mode: String = c
                .query_first("SELECT @@SESSION.sql_mode")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                sql_mode.contains("NO_BACKSLASH_ESCAPES"),
                no_backslash,
                "{sql_mode}"
            );
            drop(c);

            let batch: Vec<NewReport> = reasons
                .iter()
                .enumerate()
                .map(|(n, r)| {
                    reasoned(
                        mode * 100 + n as u64,
                        &format!("192.0.2.{}", mode * 100 + n as u64 + 1),
                        r,
                    )
                })
                .collect();
            let committed = store.group_commit(&batch, 1).await.unwrap();
            let mut c = store.conn().await.unwrap();
            for (outcome, reason) in committed.iter().zip(reasons) {
                let Committed::New(event) = outcome else {
                    panic!("a new report was stored as {outcome:?}");
                };
                let stored: Option<String> = c
                    .exec_first("SELECT reason FROM events WHERE id = ?", (event.id,))
                    .await
                    .unwrap();
                assert_eq!(stored.as_deref(), Some(reason), "mode {sql_mode}");
            }
            drop(c);
            let again = store.group_commit(&batch, 2).await.unwrap();
            let ids: Vec<u64> = committed.iter().map(Committed::event_id).collect();
            assert_eq!(
                again,
                ids.iter()
                    .map(|&id| Committed::Duplicate(id))
                    .collect::<Vec<_>>(),
                "a re-send is answered with the first ids"
            );
        }
        let mut c = store.conn().await.unwrap();
        c.query_drop(format!("DROP DATABASE {name}")).await.unwrap();
    }
}
