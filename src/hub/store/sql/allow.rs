//! The fleet allow-list and the reports it refused.
//!
//! `add` is one transaction: the entry, its allow-add event, and for every
//! address inside the network with an active ban an unban event (ids after
//! the allow-add), with those bans marked lifted. A node therefore meets
//! the entry before the unbans it causes, and no ban inside it stays
//! active in the store once the call returns. Active bans are read whole
//! and matched in Rust (a CIDR is not a range of the `ip` text column):
//! one scan per `allow add`, an admin's occasional call.
use std::collections::BTreeMap;

use super::{
    super::{
        AllowAdded, AllowRow, NewReport, RefusedRow, StoreError,
        executor::{Backend, Executor, params},
        now_ms,
    },
    events::{self, EVENT_COLUMNS},
};
use crate::{
    allow::Network,
    ban::{Ban, Event, EventKind},
};

/// `Store::allow_entries` for any backend.
pub async fn entries<B: Backend + ?Sized>(b: &B) -> Result<Vec<AllowRow>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT network, note, added_by, added_ms FROM allow_list ORDER BY network",
        vec![],
    )
    .await?
    .iter()
    .map(|r| {
        let text = r.text(0)?;
        Ok(AllowRow {
            network: text
                .parse()
                .map_err(|e| StoreError::query(format!("allow_list holds {text:?}: {e}")))?,
            note: r.text(1)?,
            added_by: r.text(2)?,
            added_ms: r.i64(3)?,
        })
    })
    .collect()
}

/// Inserts an allow-list event (kind 3 or 4) for `network`; its id.
async fn allow_event(
    ex: &mut dyn Executor,
    d: crate::hub::store::schema::Dialect,
    kind: EventKind,
    network: &Network,
    by: &str,
    now: i64,
) -> Result<Event, StoreError> {
    let ban = Ban::allow_entry(network);
    let id = super::sequence::reserve(&mut *ex, d, 1).await?;
    ex.exec(
        "INSERT INTO events (id, kind, reporter_id, node_seq, added_by, created_ms, jailname, \
         protocol, port, ip, lifts) VALUES (?, ?, 0, NULL, ?, ?, ?, ?, ?, ?, NULL)",
        params![
            id,
            kind.code(),
            by,
            now,
            &ban.jail,
            &ban.protocol,
            &ban.port,
            &ban.ip
        ],
    )
    .await?;
    Ok(Event {
        id,
        kind,
        ban,
        added_by: by.to_string(),
        created_ms: now,
        lifts: 0,
        term: Default::default(),
    })
}

/// `Store::allow_add` for any backend.
pub async fn add<B: Backend + ?Sized>(
    b: &B,
    entry: &AllowRow,
) -> Result<Option<AllowAdded>, StoreError> {
    let lock = b.dialect().for_update();
    let net = entry.network.to_string();
    let mut ex = b.session().await?;
    ex.begin().await?;
    let listed = ex
        .query(
            &format!("SELECT network FROM allow_list WHERE network = ?{lock}"),
            params![&net],
        )
        .await?;
    if !listed.is_empty() {
        return Ok(None);
    }
    ex.exec(
        "INSERT INTO allow_list (network, note, added_by, added_ms) VALUES (?, ?, ?, ?)",
        params![&net, &entry.note, &entry.added_by, entry.added_ms],
    )
    .await?;
    let now = now_ms();
    let event = allow_event(
        &mut *ex,
        b.dialect(),
        EventKind::AllowAdd,
        &entry.network,
        &entry.added_by,
        now,
    )
    .await?;
    let active = ex
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE kind = 1 AND lifted_by IS NULL \
                 ORDER BY id{lock}"
            ),
            vec![],
        )
        .await?;
    // Latest active ban per address inside the network, and how many.
    let mut inside: BTreeMap<String, (Event, u32)> = BTreeMap::new();
    for row in &active {
        let e = events::event(row)?;
        let Some(ip) = crate::ban::parse_ip(&e.ban.ip) else {
            continue;
        };
        if entry.network.contains(ip) {
            let slot = inside.entry(e.ban.ip.clone()).or_insert((e.clone(), 0));
            slot.0 = e;
            slot.1 += 1;
        }
    }
    let mut unbans = Vec::with_capacity(inside.len());
    let mut lifted = 0;
    for (ip, (last, count)) in inside {
        let id = super::sequence::reserve(&mut *ex, b.dialect(), 1).await?;
        ex.exec(
            "INSERT INTO events (id, kind, reporter_id, node_seq, added_by, created_ms, \
             jailname, protocol, port, ip, lifts) VALUES (?, 2, 0, NULL, ?, ?, ?, ?, ?, ?, ?)",
            params![
                id,
                &entry.added_by,
                now,
                &last.ban.jail,
                &last.ban.protocol,
                &last.ban.port,
                &ip,
                last.id
            ],
        )
        .await?;
        ex.exec(
            "UPDATE events SET lifted_by = ? WHERE ip = ? AND kind = 1 AND lifted_by IS NULL",
            params![id, &ip],
        )
        .await?;
        lifted += count;
        unbans.push(Event {
            id,
            kind: EventKind::Unban,
            ban: last.ban,
            added_by: entry.added_by.clone(),
            created_ms: now,
            term: Default::default(),
            lifts: last.id,
        });
    }
    ex.commit().await?;
    Ok(Some(AllowAdded {
        entry: entry.clone(),
        event,
        unbans,
        lifted,
    }))
}

/// `Store::allow_remove` for any backend.
pub async fn remove<B: Backend + ?Sized>(
    b: &B,
    network: &Network,
    by: &str,
) -> Result<Option<Event>, StoreError> {
    let mut ex = b.session().await?;
    ex.begin().await?;
    let gone = ex
        .exec(
            "DELETE FROM allow_list WHERE network = ?",
            params![network.to_string()],
        )
        .await?;
    if gone.affected == 0 {
        return Ok(None);
    }
    let event = allow_event(
        &mut *ex,
        b.dialect(),
        EventKind::AllowRemove,
        network,
        by,
        now_ms(),
    )
    .await?;
    ex.commit().await?;
    Ok(Some(event))
}

/// `Store::load_allow` for any backend.
pub async fn load<B: Backend + ?Sized>(b: &B, rows: &[AllowRow]) -> Result<(), StoreError> {
    let sql = format!(
        "{} INTO allow_list (network, note, added_by, added_ms) VALUES (?, ?, ?, ?)",
        b.dialect().insert_ignore()
    );
    let mut ex = b.session().await?;
    ex.begin().await?;
    for r in rows {
        ex.exec(
            &sql,
            params![r.network.to_string(), &r.note, &r.added_by, r.added_ms],
        )
        .await?;
    }
    ex.commit().await
}

/// `Store::refuse` for any backend.
pub async fn refuse<B: Backend + ?Sized>(
    b: &B,
    refused: &[(NewReport, String)],
) -> Result<(), StoreError> {
    if refused.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "{} INTO refused_reports (host, seq, created_ms, jailname, protocol, port, ip, \
         allowed_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        b.dialect().insert_ignore()
    );
    let now = now_ms();
    let mut ex = b.session().await?;
    ex.begin().await?;
    for (r, by) in refused {
        let by: String = by.chars().take(128).collect();
        ex.exec(
            &sql,
            params![
                &r.host,
                r.seq,
                now,
                &r.ban.jail,
                &r.ban.protocol,
                &r.ban.port,
                &r.ban.ip,
                by
            ],
        )
        .await?;
    }
    ex.commit().await
}

/// `Store::refused` for any backend.
pub async fn refused<B: Backend + ?Sized>(
    b: &B,
    after: u64,
    limit: usize,
) -> Result<Vec<RefusedRow>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT id, host, seq, created_ms, jailname, protocol, port, ip, allowed_by \
         FROM refused_reports WHERE id > ? ORDER BY id LIMIT ?",
        params![after, limit as u64],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(RefusedRow {
            id: r.u64(0)?,
            host: r.text(1)?,
            seq: r.u64(2)?,
            created_ms: r.i64(3)?,
            ban: Ban {
                jail: r.text(4)?,
                protocol: r.text(5)?,
                port: r.text(6)?,
                ip: r.text(7)?,
            },
            allowed_by: r.text(8)?,
        })
    })
    .collect()
}
