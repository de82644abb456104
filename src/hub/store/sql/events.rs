//! Replay, unban and listing.
use std::collections::HashMap;

use super::{
    super::{
        BanFilter, BanRow, COALESCED_KIND, LadderFacts, NewReport, ReporterRow, StoreError,
        assemble_bans,
        executor::{Backend, Executor, Row, params},
        now_ms,
    },
    hosts_by_id,
};
use crate::{
    ban::{Ban, BanTerm, Event, EventKind},
    hub::ladder::PastBan,
};

/// The columns [`event`] reads, in its order.
pub const EVENT_COLUMNS: &str = "id, kind, added_by, created_ms, jailname, protocol, port, ip, lifts, ends_ms, rung, extends, reason";

/// How many columns [`EVENT_COLUMNS`] holds: a query's own columns follow.
pub const EVENT_WIDTH: usize = 13;

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
        term: BanTerm {
            ends_ms: r.opt_i64(9)?.unwrap_or(0),
            rung: r.opt_i64(10)?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
            extends: r.opt_u64(11)?.unwrap_or(0),
            reason: r.opt_text(12)?.unwrap_or_default(),
        },
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
    // allow-list changes a node must hold before the bans after them. A
    // ban with a fleet end reaches its reporter too (which learns the
    // fleet's end that way); one without (from before the ladder) does
    // not. Bans lifted or ended are not replayed; coalesced reports
    // (kind 5) are no events at all.
    // Reporter 0 is the hub's own (`fleet` bans): an admin excludes none.
    let me = b.host_ids().get(subscriber).unwrap_or(i64::MAX as u64);
    let mut ex = b.session().await?;
    read_after(&mut *ex, after, me, limit).await
}

/// `Store::committed_after` for any backend: what every subscriber may
/// get (reporter `i64::MAX`: no host is excluded), on the committer's
/// session (`Backend::commit_session`).
pub async fn committed_after<B: Backend + ?Sized>(
    b: &B,
    after: u64,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut ex = b.commit_session().await?;
    read_after(&mut *ex, after, i64::MAX as u64, limit).await
}

/// The replay query: events after `after` as reporter `me` gets them.
async fn read_after(
    ex: &mut dyn Executor,
    after: u64,
    me: u64,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    ex.query(
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE id > ? \
             AND (kind IN (2, 3, 4) OR (kind = 1 AND lifted_by IS NULL \
             AND (ends_ms > ? OR (ends_ms IS NULL AND reporter_id <> ?)))) \
             ORDER BY id LIMIT ?"
        ),
        params![after, now_ms(), me, limit as u64],
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
    forget: bool,
) -> Result<Option<(Event, u32)>, StoreError> {
    let d = b.dialect();
    let lock = d.for_update();
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
    let now = now_ms();
    let mut out = None;
    if let Some(last) = active.last().map(event).transpose()? {
        let id = super::sequence::reserve(&mut *ex, d, 1).await?;
        ex.exec(
            "INSERT INTO events (id, kind, reporter_id, node_seq, added_by, created_ms, jailname, \
             protocol, port, ip, lifts) VALUES (?, 2, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
            params![
                id,
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
        .await?;
        ex.exec(
            "UPDATE events SET lifted_by = ? WHERE ip = ? AND kind = 1 AND lifted_by IS NULL",
            params![id, ip],
        )
        .await?;
        let event = Event {
            id,
            kind: EventKind::Unban,
            ban: last.ban,
            added_by: by.to_string(),
            created_ms: now,
            term: Default::default(),
            lifts: last.id,
        };
        out = Some((event, active.len() as u32));
    }
    if forget {
        // Every ban stored so far leaves the history; later ones count.
        let up_to = ex
            .query("SELECT MAX(id) FROM events", vec![])
            .await?
            .first()
            .map(|r| r.opt_u64(0))
            .transpose()?
            .flatten()
            .unwrap_or(0);
        ex.exec(
            &format!(
                "INSERT INTO forgotten (ip, up_to, forgotten_ms, forgotten_by) VALUES (?, ?, ?, ?){}",
                d.upsert(&["ip"], &["up_to", "forgotten_ms", "forgotten_by"])
            ),
            params![ip, up_to, now, by],
        )
        .await?;
    }
    ex.commit().await?;
    Ok(out)
}

/// `Store::ladder_facts` for any backend: one read for the addresses'
/// latest bans, and one for the report keys of addresses the batch holds
/// more than once (only there does knowing a re-send change a plan: the
/// store answers a re-send with its first outcome whatever its plan), so a
/// batch of distinct addresses costs one read.
pub async fn ladder_facts<B: Backend + ?Sized>(
    b: &B,
    batch: &[NewReport],
) -> Result<LadderFacts, StoreError> {
    let mut facts = LadderFacts::default();
    if batch.is_empty() {
        return Ok(facts);
    }
    // The committer's own connection: see `Backend::commit_session`.
    let mut ex = b.commit_session().await?;
    let mut per_ip: HashMap<&str, usize> = HashMap::new();
    for r in batch {
        *per_ip.entry(r.ban.ip.as_str()).or_default() += 1;
    }
    // Keys: hosts not yet stored have no reports stored either.
    let mut by_host: HashMap<u64, (&str, Vec<String>)> = HashMap::new();
    for r in batch.iter().filter(|r| per_ip[r.ban.ip.as_str()] > 1) {
        if let Some(id) = b.host_ids().get(&r.host) {
            by_host
                .entry(id)
                .or_insert_with(|| (r.host.as_str(), Vec::new()))
                .1
                .push(r.seq.to_string());
        }
    }
    if !by_host.is_empty() {
        let names: HashMap<u64, &str> = by_host.iter().map(|(id, (n, _))| (*id, *n)).collect();
        let keys: Vec<String> = by_host
            .iter()
            .map(|(h, (_, seqs))| {
                format!("(reporter_id = {h} AND node_seq IN ({}))", seqs.join(","))
            })
            .collect();
        let sql = format!(
            "SELECT id, kind, extends, reporter_id, node_seq, jailname, protocol, port, ip \
             FROM events WHERE {}",
            keys.join(" OR ")
        );
        for r in ex.query(&sql, vec![]).await? {
            let id = if r.i64(1)? == COALESCED_KIND {
                r.opt_u64(2)?.unwrap_or(0)
            } else {
                r.u64(0)?
            };
            let host = names.get(&r.u64(3)?).copied().unwrap_or_default();
            let ban = Ban {
                jail: r.text(5)?,
                protocol: r.text(6)?,
                port: r.text(7)?,
                ip: r.text(8)?,
            };
            facts.known.insert((host.to_string(), r.u64(4)?), (id, ban));
        }
    }
    let mut ips: Vec<&str> = batch.iter().map(|r| r.ban.ip.as_str()).collect();
    ips.sort_unstable();
    ips.dedup();
    for chunk in ips.chunks(1000) {
        let marks = vec!["?"; chunk.len()].join(",");
        let sql = format!(
            "SELECT e.ip, e.id, e.created_ms, e.ends_ms, e.rung, e.lifted_by IS NOT NULL, \
             COALESCE(f.up_to, 0) FROM (SELECT MAX(id) AS id FROM events \
             WHERE kind = 1 AND ip IN ({marks}) GROUP BY ip) m \
             JOIN events e ON e.id = m.id LEFT JOIN forgotten f ON f.ip = e.ip"
        );
        let args = chunk.iter().map(|ip| (*ip).into()).collect();
        for r in ex.query(&sql, args).await? {
            let id = r.u64(1)?;
            facts.latest.insert(
                r.text(0)?,
                (
                    id,
                    PastBan {
                        created_ms: r.i64(2)?,
                        ends_ms: r.opt_i64(3)?.unwrap_or(0),
                        rung: r.opt_i64(4)?.unwrap_or(0).clamp(0, 255) as u32,
                        lifted: r.i64(5)? != 0,
                        forgotten: r.u64(6)? >= id,
                    },
                ),
            );
        }
    }
    Ok(facts)
}

/// `Store::list_bans` for any backend.
pub async fn list_bans<B: Backend + ?Sized>(
    b: &B,
    f: &BanFilter,
) -> Result<Vec<BanRow>, StoreError> {
    let mut sql = format!(
        "SELECT {EVENT_COLUMNS}, lifted_by IS NOT NULL, \
         (SELECT COUNT(*) FROM forgotten f WHERE f.ip = events.ip AND f.up_to >= events.id) \
         FROM events WHERE kind = 1 AND id > ?"
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
    let rows: Vec<(Event, bool, bool)> = ex
        .query(&sql, args)
        .await?
        .iter()
        .map(|r| {
            Ok((
                event(r)?,
                r.i64(EVENT_WIDTH)? != 0,
                r.i64(EVENT_WIDTH + 1)? != 0,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    let hosts = hosts_by_id(&mut *ex).await?;
    let mut statuses = HashMap::new();
    // Coalesced reports by ban: (host, jail, count, first, last), by host.
    let mut coalesced: HashMap<u64, Vec<ReporterRow>> = HashMap::new();
    if !rows.is_empty() {
        let ids: Vec<String> = rows.iter().map(|(e, ..)| e.id.to_string()).collect();
        let ids = ids.join(",");
        let sql =
            format!("SELECT event_id, host_id, status FROM statuses WHERE event_id IN ({ids})");
        for r in ex.query(&sql, vec![]).await? {
            statuses.insert((r.u64(0)?, r.u64(1)?), r.i64(2)?);
        }
        let sql = format!(
            "SELECT extends, added_by, jailname, COUNT(*), MIN(created_ms), MAX(created_ms) \
             FROM events WHERE kind = {COALESCED_KIND} AND extends IN ({ids}) \
             GROUP BY extends, added_by, jailname"
        );
        for r in ex.query(&sql, vec![]).await? {
            let row = ReporterRow {
                host: r.text(1)?,
                jail: r.text(2)?,
                count: r.u64(3)? as u32,
                first_ms: r.i64(4)?,
                last_ms: r.i64(5)?,
            };
            merge_reporter(coalesced.entry(r.u64(0)?).or_default(), row);
        }
    }
    let forgotten: HashMap<u64, bool> = rows.iter().map(|(e, _, f)| (e.id, *f)).collect();
    let bans = rows.into_iter().map(|(e, lifted, _)| (e, lifted)).collect();
    let mut out = assemble_bans(bans, &hosts, &statuses);
    for row in &mut out {
        let e = &row.event;
        let mut reporters = vec![ReporterRow {
            host: e.added_by.clone(),
            jail: e.ban.jail.clone(),
            count: 1,
            first_ms: e.created_ms,
            last_ms: e.created_ms,
        }];
        let mut more = coalesced.remove(&e.id).unwrap_or_default();
        more.sort_by_key(|r| (r.first_ms, r.host.clone()));
        for r in more {
            merge_reporter(&mut reporters, r);
        }
        row.reporters = reporters;
        row.forgotten = forgotten.get(&row.event.id).copied().unwrap_or(false);
    }
    Ok(out)
}

/// Adds `row` to `into`, folding it into the same host's row if present
/// (counts add up; the jail of the earlier first report stays).
fn merge_reporter(into: &mut Vec<ReporterRow>, row: ReporterRow) {
    match into.iter_mut().find(|r| r.host == row.host) {
        Some(r) => {
            r.count += row.count;
            if row.first_ms < r.first_ms {
                r.first_ms = row.first_ms;
                r.jail = row.jail;
            }
            r.last_ms = r.last_ms.max(row.last_ms);
        }
        None => into.push(row),
    }
}

/// `Store::last_event_id` for any backend.
pub async fn last_event_id<B: Backend + ?Sized>(b: &B) -> Result<u64, StoreError> {
    let mut ex = b.session().await?;
    // Coalesced reports' rows are no events: a node that applied every
    // event must not look behind. Read backwards along the key: it stops
    // at the first event.
    let r = ex
        .query(
            &format!(
                "SELECT id FROM events WHERE kind <> {COALESCED_KIND} ORDER BY id DESC LIMIT 1"
            ),
            vec![],
        )
        .await?;
    Ok(r.first()
        .map(|r| r.opt_u64(0))
        .transpose()?
        .flatten()
        .unwrap_or(0))
}
