//! Replay, unban and listing.
use std::collections::HashMap;

use super::{
    super::{
        BanFilter, BanRow, StoreError, assemble_bans,
        executor::{Backend, Row, params},
        now_ms,
    },
    hosts_by_id,
};
use crate::ban::{Ban, Event, EventKind};

/// The columns [`event`] reads, in its order.
pub const EVENT_COLUMNS: &str =
    "id, kind, added_by, created_ms, jailname, protocol, port, ip, lifts";

/// An event from a row starting with [`EVENT_COLUMNS`].
pub fn event(r: &Row) -> Result<Event, StoreError> {
    Ok(Event {
        id: r.u64(0)?,
        kind: EventKind::from_code(r.i64(1)?)
            .ok_or_else(|| StoreError::query(format!("event kind {:?} unknown", r.0.get(1))))?,
        added_by: r.text(2)?,
        created_ms: r.i64(3)?,
        ban: Ban {
            jail: r.text(4)?,
            protocol: r.text(5)?,
            port: r.text(6)?,
            ip: r.text(7)?,
        },
        lifts: r.opt_u64(8)?.unwrap_or(0),
        term: Default::default(),
    })
}

/// `Store::events_after` for any backend.
pub async fn events_after<B: Backend + ?Sized>(
    b: &B,
    after: u64,
    subscriber: &str,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    // An admin following the stream is not a host: it excludes nothing.
    // Every kind but a ban reaches every subscriber: unbans, and the
    // allow-list changes a node must hold before the bans after them.
    // Reporter 0 is the hub's own (`fleet` bans): excluded for no one.
    let me = b.host_ids().get(subscriber).unwrap_or(i64::MAX as u64);
    let mut ex = b.session().await?;
    ex.query(
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE id > ? \
             AND (kind <> 1 OR (reporter_id <> ? AND lifted_by IS NULL)) \
             ORDER BY id LIMIT ?"
        ),
        params![after, me, limit as u64],
    )
    .await?
    .iter()
    .map(event)
    .collect()
}

/// `Store::unban` for any backend.
pub async fn unban<B: Backend + ?Sized>(
    b: &B,
    ip: &str,
    by: &str,
) -> Result<Option<(Event, u32)>, StoreError> {
    let lock = b.dialect().for_update();
    // Unbans come from admins, who are not hosts.
    let by_id = 0u64;
    let mut ex = b.session().await?;
    ex.begin().await?;
    let active = ex
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE ip = ? AND kind = 1 \
                 AND lifted_by IS NULL ORDER BY id{lock}"
            ),
            params![ip],
        )
        .await?;
    let Some(last) = active.last().map(event).transpose()? else {
        return Ok(None);
    };
    let now = now_ms();
    let id = ex
        .exec(
            "INSERT INTO events (kind, reporter_id, node_seq, added_by, created_ms, jailname, \
             protocol, port, ip, lifts) VALUES (2, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
            params![
                by_id,
                by,
                now,
                &last.ban.jail,
                &last.ban.protocol,
                &last.ban.port,
                ip,
                last.id
            ],
        )
        .await?
        .last_id;
    ex.exec(
        "UPDATE events SET lifted_by = ? WHERE ip = ? AND kind = 1 AND lifted_by IS NULL",
        params![id, ip],
    )
    .await?;
    ex.commit().await?;
    let event = Event {
        id,
        kind: EventKind::Unban,
        ban: last.ban,
        added_by: by.to_string(),
        created_ms: now,
        term: Default::default(),
        lifts: last.id,
    };
    Ok(Some((event, active.len() as u32)))
}

/// `Store::list_bans` for any backend.
pub async fn list_bans<B: Backend + ?Sized>(
    b: &B,
    f: &BanFilter,
) -> Result<Vec<BanRow>, StoreError> {
    let mut sql = format!(
        "SELECT {EVENT_COLUMNS}, lifted_by IS NOT NULL FROM events WHERE kind = 1 AND id > ?"
    );
    let mut args = params![f.after_id];
    for (col, v) in [
        ("ip", &f.ip),
        ("added_by", &f.added_by),
        ("jailname", &f.jail),
    ] {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {col} = ?"));
            args.push(v.into());
        }
    }
    if let Some(since) = f.since_ms {
        sql.push_str(" AND created_ms >= ?");
        args.push(since.into());
    }
    sql.push_str(" ORDER BY id LIMIT ?");
    args.push((f.limit as u64).into());
    let mut ex = b.session().await?;
    let bans: Vec<(Event, bool)> = ex
        .query(&sql, args)
        .await?
        .iter()
        .map(|r| Ok((event(r)?, r.i64(9)? != 0)))
        .collect::<Result<_, StoreError>>()?;
    let hosts = hosts_by_id(&mut *ex).await?;
    let mut statuses = HashMap::new();
    if !bans.is_empty() {
        let ids: Vec<String> = bans.iter().map(|(e, _)| e.id.to_string()).collect();
        let sql = format!(
            "SELECT event_id, host_id, status FROM statuses WHERE event_id IN ({})",
            ids.join(",")
        );
        for r in ex.query(&sql, vec![]).await? {
            statuses.insert((r.u64(0)?, r.u64(1)?), r.i64(2)?);
        }
    }
    Ok(assemble_bans(bans, &hosts, &statuses))
}

/// `Store::last_event_id` for any backend.
pub async fn last_event_id<B: Backend + ?Sized>(b: &B) -> Result<u64, StoreError> {
    let mut ex = b.session().await?;
    let r = ex.query("SELECT MAX(id) FROM events", vec![]).await?;
    Ok(r.first()
        .map(|r| r.opt_u64(0))
        .transpose()?
        .flatten()
        .unwrap_or(0))
}
