//! The tuned write paths: the group commit and the grouped status writes.
//!
//! MySQL pays a round trip per statement, so a batch is one multi-row
//! `INSERT IGNORE` (re-sends skipped by the `report` key) and its ids are
//! the explicit ids reserved from the event-id counter (`sql::sequence`).
use std::collections::HashMap;

use mysql_async::{TxOpts, Value, prelude::*};

use super::{MysqlStore, q};
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

/// `r` as the values of [`REPORT_COLUMNS`], stored as `row`.
fn values(
    row: &Stored,
    reporter: u64,
    seq: Option<u64>,
    r: &NewReport,
    now: i64,
    id: u64,
) -> [Value; 14] {
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
        let mut c = self.conn().await?;
        let keys: Vec<(u64, u64)> = ids
            .iter()
            .copied()
            .zip(batch.iter().map(|r| r.seq))
            .collect();
        let (second, first): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| matches!(batch[i].plan, Plan::CoalesceWith(_)));
        let mut out: Vec<Option<Committed>> = vec![None; batch.len()];
        let mut tx = c.start_transaction(TxOpts::default()).await.map_err(q)?;
        for phase in [first, second] {
            self.insert_phase(&mut tx, batch, &keys, &phase, &mut out, now)
                .await?;
        }
        tx.commit().await.map_err(q)?;
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
        let mut params: Vec<Value> = Vec::with_capacity(fresh.len() * 14);
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
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; fresh.len()].join(",");
        // Re-sent reports hit the (reporter, seq) unique key and are skipped;
        // every value was validated, so IGNORE hides nothing else.
        tx.exec_drop(
            format!("INSERT IGNORE INTO events ({REPORT_COLUMNS}) VALUES {rows}"),
            params,
        )
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
}
