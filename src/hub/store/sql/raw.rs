//! Rows as stored, ids kept: what `hub migrate` moves between backends.
use super::{
    super::{
        RawEvent, RawHost, RawStatus, StoreError,
        executor::{Backend, Executor, Value, params},
        schema::Dialect,
    },
    refresh_hosts,
};

/// Inserts `values`, `width` to a row, in multi-row statements of at most
/// `per` rows (under both engines' limits on placeholders), skipping rows
/// whose key exists.
async fn insert_ignore(
    ex: &mut dyn Executor,
    d: Dialect,
    into: &str,
    width: usize,
    per: usize,
    values: Vec<Value>,
) -> Result<(), StoreError> {
    let row = format!("({})", vec!["?"; width].join(", "));
    for chunk in values.chunks(width * per) {
        let rows = vec![row.as_str(); chunk.len() / width].join(",");
        let sql = format!("{} INTO {into} VALUES {rows}", d.insert_ignore());
        ex.exec(&sql, chunk.to_vec()).await?;
    }
    Ok(())
}

/// `Store::dump_hosts` for any backend.
pub async fn dump_hosts<B: Backend + ?Sized>(b: &B) -> Result<Vec<RawHost>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT id, name, first_seen_ms, last_seen_ms FROM hosts ORDER BY id",
        vec![],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(RawHost {
            id: r.u64(0)?,
            name: r.text(1)?,
            first_seen_ms: r.i64(2)?,
            last_seen_ms: r.i64(3)?,
        })
    })
    .collect()
}

/// `Store::dump_events` for any backend.
pub async fn dump_events<B: Backend + ?Sized>(
    b: &B,
    after: u64,
    limit: usize,
) -> Result<Vec<RawEvent>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT id, kind, reporter_id, node_seq, added_by, created_ms, jailname, protocol, \
         port, ip, lifted_by, lifts, ends_ms, rung, extends, reason FROM events \
         WHERE id > ? ORDER BY id LIMIT ?",
        params![after, limit as u64],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(RawEvent {
            id: r.u64(0)?,
            kind: r.i64(1)?,
            reporter_id: r.u64(2)?,
            node_seq: r.opt_u64(3)?,
            added_by: r.text(4)?,
            created_ms: r.i64(5)?,
            jail: r.text(6)?,
            protocol: r.text(7)?,
            port: r.text(8)?,
            ip: r.text(9)?,
            lifted_by: r.opt_u64(10)?,
            lifts: r.opt_u64(11)?,
            ends_ms: r.opt_i64(12)?,
            rung: r.opt_i64(13)?,
            extends: r.opt_u64(14)?,
            reason: r.opt_text(15)?,
        })
    })
    .collect()
}

/// `Store::dump_statuses` for any backend.
pub async fn dump_statuses<B: Backend + ?Sized>(
    b: &B,
    after: u64,
    limit: usize,
) -> Result<Vec<RawStatus>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT event_id, host_id, status FROM statuses WHERE event_id > ? \
         ORDER BY event_id, host_id LIMIT ?",
        params![after, limit as u64],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(RawStatus {
            event_id: r.u64(0)?,
            host_id: r.u64(1)?,
            status: r.i64(2)?,
        })
    })
    .collect()
}

/// `Store::load` for any backend.
pub async fn load<B: Backend + ?Sized>(
    b: &B,
    hosts: &[RawHost],
    events: &[RawEvent],
    statuses: &[RawStatus],
) -> Result<(), StoreError> {
    let d = b.dialect();
    let mut ex = b.session().await?;
    ex.begin().await?;
    let h = hosts
        .iter()
        .flat_map(|h| params![h.id, &h.name, h.first_seen_ms, h.last_seen_ms]);
    let into = "hosts (id, name, first_seen_ms, last_seen_ms)";
    insert_ignore(&mut *ex, d, into, 4, 1000, h.collect()).await?;
    let e = events.iter().flat_map(|e| {
        params![
            e.id,
            e.kind,
            e.reporter_id,
            e.node_seq,
            &e.added_by,
            e.created_ms,
            &e.jail,
            &e.protocol,
            &e.port,
            &e.ip,
            e.lifted_by,
            e.lifts,
            e.ends_ms,
            e.rung,
            e.extends,
            e.reason.as_deref()
        ]
    });
    let into = "events (id, kind, reporter_id, node_seq, added_by, created_ms, \
                jailname, protocol, port, ip, lifted_by, lifts, ends_ms, rung, extends, reason)";
    insert_ignore(&mut *ex, d, into, 16, 1000, e.collect()).await?;
    let s = statuses
        .iter()
        .flat_map(|s| params![s.event_id, s.host_id, s.status]);
    let into = "statuses (event_id, host_id, status)";
    insert_ignore(&mut *ex, d, into, 3, 3000, s.collect()).await?;
    ex.commit().await?;
    if !hosts.is_empty() {
        refresh_hosts(b, &mut *ex).await?;
    }
    Ok(())
}

/// `Store::counts` for any backend.
pub async fn counts<B: Backend + ?Sized>(b: &B) -> Result<(u64, u64, u64), StoreError> {
    let mut ex = b.session().await?;
    let r = ex
        .query(
            "SELECT (SELECT COUNT(*) FROM hosts), (SELECT COUNT(*) FROM events), \
             (SELECT COUNT(*) FROM statuses)",
            vec![],
        )
        .await?;
    match r.first() {
        Some(r) => Ok((r.u64(0)?, r.u64(1)?, r.u64(2)?)),
        None => Ok((0, 0, 0)),
    }
}
