//! Moving a hub's data: between backends (`banmesh hub migrate`, when a
//! fleet outgrows the embedded store) and from the seed's MySQL table
//! (`banmesh hub import-seed`, so an existing installation keeps its
//! history).
//!
//! Both copy rows with their ids, so event ids that nodes hold as their
//! position stay valid. Neither writes into a store that already holds
//! data unless told to (`--force`), and then rows whose ids exist are kept
//! as they are.
use std::collections::HashMap;

use indicatif::{ProgressBar, ProgressStyle};
use mysql_async::prelude::*;
use thiserror::Error;

use super::store::{RawEvent, RawHost, RawStatus, Store, StoreError};
use crate::ban::{Ban, seed_column, valid_host_name};

const PAGE: usize = 5000;

/// Why `hub migrate` or `hub import-seed` stopped.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// Reading the source store or writing the target failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target store already holds data and `--force` was not given: copying
    /// into it could mix two fleets' ids.
    #[error(
        "the target already holds {hosts} hosts, {events} events and {statuses} statuses; pass --force to add to it anyway"
    )]
    NotEmpty {
        /// Host rows already in the target.
        hosts: u64,
        /// Event rows already in the target.
        events: u64,
        /// Status rows already in the target.
        statuses: u64,
    },
    /// The seed's database could not be reached or its `ip_table` read (a bad
    /// URL, no such table, a column of an unexpected type).
    #[error("cannot read the seed table: {0}")]
    Seed(String),
}

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Host rows written.
    pub hosts: u64,
    /// Event rows written (bans and unbans).
    pub events: u64,
    /// Status rows written.
    pub statuses: u64,
    /// Seed rows refused (an invalid IP, port, reporter name ...), by id.
    pub skipped: Vec<u64>,
}

async fn check_empty(to: &dyn Store, force: bool) -> Result<(), MigrateError> {
    let (hosts, events, statuses) = to.counts().await?;
    if !force && (hosts, events, statuses) != (0, 0, 0) {
        return Err(MigrateError::NotEmpty {
            hosts,
            events,
            statuses,
        });
    }
    Ok(())
}

fn bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Copies every row of `from` into `to`.
pub async fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    force: bool,
    progress: bool,
) -> Result<Copied, MigrateError> {
    check_empty(to, force).await?;
    let (_, total_events, total_statuses) = from.counts().await?;
    let hosts = from.dump_hosts().await?;
    to.load(&hosts, &[], &[]).await?;
    // Revocations and admin names too: a migration must not readmit a
    // revoked certificate.
    to.load_names(&from.dump_names().await?).await?;
    // The allow-list the new hub's committer checks reports against (its
    // events, which nodes already hold, are copied with the others).
    to.load_allow(&from.allow_entries().await?).await?;
    let mut copied = Copied {
        hosts: hosts.len() as u64,
        ..Default::default()
    };

    let pb = bar(total_events, "events", progress);
    let mut after = 0;
    loop {
        let page = from.dump_events(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        to.load(&[], &page, &[]).await?;
        copied.events += page.len() as u64;
        pb.inc(page.len() as u64);
    }
    pb.finish();

    let pb = bar(total_statuses, "statuses", progress);
    let mut after = 0;
    loop {
        // Pages end on an event boundary, so no event's statuses are split
        // (an event with more statuses than a page, 20,000 hosts, would be).
        let mut page = from.dump_statuses(after, PAGE * 4).await?;
        let Some(last) = page.last().map(|s| s.event_id) else {
            break;
        };
        if page.len() == PAGE * 4 && page.first().map(|s| s.event_id) != Some(last) {
            page.retain(|s| s.event_id < last);
            after = last - 1;
        } else {
            after = last;
        }
        to.load(&[], &[], &page).await?;
        copied.statuses += page.len() as u64;
        pb.inc(page.len() as u64);
    }
    pb.finish();
    Ok(copied)
}

/// Imports the seed's `ip_table` (one `host_<name>` status column per host)
/// from a MySQL database.
pub async fn import_seed(
    seed_url: &str,
    to: &dyn Store,
    force: bool,
    progress: bool,
) -> Result<Copied, MigrateError> {
    check_empty(to, force).await?;
    let seed_err = |e: mysql_async::Error| MigrateError::Seed(e.to_string());
    let opts =
        mysql_async::Opts::from_url(seed_url).map_err(|e| MigrateError::Seed(e.to_string()))?;
    let mut c = mysql_async::Conn::new(opts).await.map_err(seed_err)?;

    let columns: Vec<String> = c
        .query("SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ip_table' AND COLUMN_NAME LIKE 'host\\\\_%' ORDER BY ORDINAL_POSITION")
        .await
        .map_err(seed_err)?;
    // A column name goes into SQL below and becomes a host name: one that
    // is not a host name after its prefix is left out (its statuses with it).
    let columns: Vec<String> = columns
        .into_iter()
        .filter(|c| valid_host_name(&c["host_".len().min(c.len())..]))
        .collect();
    // Reporter names reach every host's shared.log: only host names are
    // taken (rows of any other reporter are skipped below).
    let reporters: Vec<Option<String>> = c
        .query::<Option<String>, _>("SELECT DISTINCT added_by FROM ip_table")
        .await
        .map_err(seed_err)?
        .into_iter()
        .filter(|r| r.as_deref().is_none_or(valid_host_name))
        .collect();
    let total: Option<u64> = c
        .query_first("SELECT COUNT(*) FROM ip_table")
        .await
        .map_err(seed_err)?;

    // Host names: a reporter's real name when its column matches, else the
    // column without its prefix (the seed dropped dots and hyphens).
    let mut by_column: HashMap<String, String> = HashMap::new();
    for name in reporters.iter().flatten() {
        by_column
            .entry(seed_column(name))
            .or_insert_with(|| name.clone());
    }
    let mut names: Vec<String> = columns
        .iter()
        .map(|col| {
            by_column
                .get(col)
                .cloned()
                .unwrap_or_else(|| col["host_".len()..].to_string())
        })
        .collect();
    for r in reporters.iter().flatten() {
        if !names.contains(r) {
            names.push(r.clone());
        }
    }
    let existing = to.dump_hosts().await?;
    let mut ids: HashMap<String, u64> = existing.iter().map(|h| (h.name.clone(), h.id)).collect();
    let mut next = existing.iter().map(|h| h.id).max().unwrap_or(0) + 1;
    let now = super::store::now_ms();
    let mut new_hosts = Vec::new();
    for n in names.iter().chain(std::iter::once(&"unknown".to_string())) {
        if !ids.contains_key(n) {
            ids.insert(n.clone(), next);
            new_hosts.push(RawHost {
                id: next,
                name: n.clone(),
                first_seen_ms: now,
                last_seen_ms: now,
            });
            next += 1;
        }
    }
    to.load(&new_hosts, &[], &[]).await?;
    let column_hosts: Vec<u64> = columns.iter().zip(&names).map(|(_, n)| ids[n]).collect();

    let mut copied = Copied {
        hosts: new_hosts.len() as u64,
        ..Default::default()
    };
    let select_cols: String = columns
        .iter()
        .map(|c| format!(", COALESCE(`{c}`, 0)"))
        .collect();
    let sql = format!(
        "SELECT id, added_by, CAST(UNIX_TIMESTAMP(created) * 1000 AS SIGNED), jailname, protocol, port, ip{select_cols} \
         FROM ip_table WHERE id > ? ORDER BY id LIMIT {PAGE}"
    );
    let pb = bar(total.unwrap_or(0), "seed rows", progress);
    let mut after = 0u64;
    loop {
        let rows: Vec<mysql_async::Row> = c.exec(&sql, (after,)).await.map_err(seed_err)?;
        if rows.is_empty() {
            break;
        }
        let page_len = rows.len() as u64;
        let mut events = Vec::with_capacity(rows.len());
        let mut statuses = Vec::new();
        for mut row in rows {
            let id: u64 = row.take(0).unwrap_or(0);
            after = id;
            let added_by: Option<String> = row.take(1).unwrap_or(None);
            let added_by = added_by.unwrap_or_else(|| "unknown".into());
            let created_ms: i64 = row.take::<Option<i64>, _>(2).flatten().unwrap_or(0);
            let text = |row: &mut mysql_async::Row, i| {
                row.take::<Option<String>, _>(i)
                    .flatten()
                    .unwrap_or_default()
            };
            let (jail, protocol, port, ip) = (
                text(&mut row, 3),
                text(&mut row, 4),
                text(&mut row, 5),
                text(&mut row, 6),
            );
            let Ok(ban) = Ban::new(&jail, &protocol, &port, &ip) else {
                copied.skipped.push(id);
                continue;
            };
            if !valid_host_name(&added_by) {
                copied.skipped.push(id);
                continue;
            }
            events.push(RawEvent {
                id,
                kind: 1,
                reporter_id: ids.get(&added_by).copied().unwrap_or(ids["unknown"]),
                node_seq: None,
                added_by,
                created_ms,
                jail: ban.jail,
                protocol: ban.protocol,
                port: ban.port,
                ip: ban.ip,
                lifted_by: None,
                lifts: None,
                ends_ms: None,
                rung: None,
                extends: None,
                reason: None,
            });
            let reporter_id = events.last().map_or(0, |e: &RawEvent| e.reporter_id);
            for (i, host_id) in column_hosts.iter().enumerate() {
                let status: i64 = row.take(7 + i).unwrap_or(0);
                // No row reads as 0, or 1 for the reporter: keep a reporter's 0.
                if (1..=3).contains(&status) || (status == 0 && *host_id == reporter_id) {
                    statuses.push(RawStatus {
                        event_id: id,
                        host_id: *host_id,
                        status,
                    });
                }
            }
        }
        to.load(&[], &events, &statuses).await?;
        copied.events += events.len() as u64;
        copied.statuses += statuses.len() as u64;
        pb.inc(page_len);
    }
    pb.finish();
    let _ = c.disconnect().await;
    Ok(copied)
}
