//! The tuned write paths: the group commit and the grouped status writes.
//!
//! MySQL pays a round trip per statement, so a batch is one multi-row
//! `INSERT IGNORE` (re-sends skipped by the `report` key) and its ids are
//! read back from the first id when the server hands out consecutive ones.
use std::collections::HashMap;

use mysql_async::{TxOpts, Value, prelude::*};

use super::{MysqlStore, q};
use crate::{
    ban::{Event, EventKind, Status},
    hub::store::{Committed, NewReport, StoreError, now_ms, sql},
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

impl MysqlStore {
    /// One multi-row `INSERT IGNORE` per batch (see the module doc).
    pub(super) async fn group_commit(
        &self,
        batch: &[NewReport],
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
        // One row per key: a key repeated within the batch is a re-send.
        let mut fresh = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, key) in keys.iter().enumerate() {
            if seen.insert(*key) {
                fresh.push(i);
            }
        }
        let now = now_ms();
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
                term: crate::ban::BanTerm {
                    reason: r.reason.clone(),
                    ..Default::default()
                },
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
