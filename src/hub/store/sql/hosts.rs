//! Hosts and enrolment.
use super::{
    super::{
        EnrollRefused, Enrolled, HostRow, NameState, NewToken, StoreError, TokenRow,
        check_enrolment,
        executor::{Backend, params},
        now_ms,
    },
    host_id, refresh_hosts,
};

/// `Store::touch_host` for any backend.
pub async fn touch_host<B: Backend + ?Sized>(
    b: &B,
    name: &str,
    cert_expires_ms: Option<i64>,
) -> Result<(), StoreError> {
    let id = host_id(b, name).await?;
    let mut ex = b.session().await?;
    ex.exec(
        "UPDATE hosts SET last_seen_ms = ?, cert_expires_ms = COALESCE(?, cert_expires_ms) WHERE id = ?",
        params![now_ms(), cert_expires_ms, id],
    )
    .await
    .map(drop)
}

/// `Store::create_token` for any backend.
pub async fn create_token<B: Backend + ?Sized>(b: &B, t: &NewToken) -> Result<(), StoreError> {
    let mut ex = b.session().await?;
    ex.exec(
        "INSERT INTO enrol_tokens (hash, name, created_ms, expires_ms, used_ms, cert_ttl_s) \
         VALUES (?, ?, ?, ?, NULL, ?)",
        params![
            &t.hash,
            t.name.as_deref(),
            now_ms(),
            t.expires_ms,
            t.cert_ttl_s
        ],
    )
    .await
    .map(drop)
}

/// `Store::enroll` for any backend.
pub async fn enroll<B: Backend + ?Sized>(
    b: &B,
    token_hash: &str,
    name: &str,
) -> Result<Result<Enrolled, EnrollRefused>, StoreError> {
    let lock = b.dialect().for_update();
    let mut ex = b.session().await?;
    ex.begin().await?;
    let token = ex
        .query(
            &format!(
                "SELECT name, expires_ms, used_ms, cert_ttl_s FROM enrol_tokens WHERE hash = ?{lock}"
            ),
            params![token_hash],
        )
        .await?;
    let token = match token.first() {
        Some(r) => Some(TokenRow {
            name: r.opt_text(0)?,
            expires_ms: r.i64(1)?,
            used: r.opt_i64(2)?.is_some(),
            cert_ttl_s: r.i64(3)?,
        }),
        None => None,
    };
    let host = ex
        .query(
            &format!(
                "SELECT revoked_ms FROM hosts WHERE {} ORDER BY id LIMIT 1{lock}",
                b.dialect().name_is("name")
            ),
            params![name],
        )
        .await?;
    let key = name.to_ascii_lowercase();
    let listed = |table: &str| format!("SELECT COUNT(*) FROM {table} WHERE name_key = ?");
    let count = |rows: Vec<super::super::executor::Row>| -> Result<bool, StoreError> {
        Ok(rows.first().map(|r| r.i64(0)).transpose()?.unwrap_or(0) > 0)
    };
    let known = NameState {
        host: match host.first() {
            Some(r) => Some(r.opt_i64(0)?.is_some()),
            None => None,
        },
        revoked: count(ex.query(&listed("revoked_names"), params![&key]).await?)?,
        admin: count(ex.query(&listed("admin_names"), params![&key]).await?)?,
    };
    let now = now_ms();
    let verdict = check_enrolment(token, name, known, now);
    if let Ok(enrolled) = &verdict {
        ex.exec(
            "UPDATE enrol_tokens SET used_ms = ? WHERE hash = ?",
            params![now, token_hash],
        )
        .await?;
        ex.exec(
            "INSERT INTO hosts (name, first_seen_ms, last_seen_ms, enrolled_ms) VALUES (?, ?, ?, ?)",
            params![name, now, now, now],
        )
        .await?;
        // What `Renew` will keep. A row left by an earlier host of this
        // name cannot exist (the name would be taken), but replace it
        // rather than fail if one does.
        ex.exec(
            &format!(
                "INSERT INTO host_lifetimes (name_key, cert_ttl_s) VALUES (?, ?){}",
                b.dialect().upsert(&["name_key"], &["cert_ttl_s"])
            ),
            params![&key, enrolled.cert_ttl_s],
        )
        .await?;
    }
    ex.commit().await?;
    // The token is spent and the host recorded: an error now would burn
    // the name (a retry finds it taken). The cache and view catch up on
    // the host's first call (`host_id`), so a failure here is only logged.
    if verdict.is_ok()
        && let Err(e) = refresh_hosts(b, &mut *ex).await
    {
        tracing::warn!(host = %name, error = %e, "enrolled; the host cache is refreshed on its first call");
    }
    Ok(verdict)
}

/// `Store::hosts` for any backend.
pub async fn hosts<B: Backend + ?Sized>(b: &B) -> Result<Vec<HostRow>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT h.name, h.first_seen_ms, h.last_seen_ms, h.enrolled_ms, h.cert_expires_ms, \
         h.revoked_ms, h.hub, h.hub_since_ms, b.seen_ms \
         FROM hosts h LEFT JOIN hubs b ON b.name = h.hub ORDER BY h.name",
        vec![],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(HostRow {
            name: r.text(0)?,
            first_seen_ms: r.i64(1)?,
            last_seen_ms: r.i64(2)?,
            enrolled_ms: r.opt_i64(3)?,
            cert_expires_ms: r.opt_i64(4)?,
            revoked: r.opt_i64(5)?.is_some(),
            hub: r.opt_text(6)?,
            hub_since_ms: r.opt_i64(7)?,
            hub_seen_ms: r.opt_i64(8)?,
        })
    })
    .collect()
}

/// `Store::subscribed_via` for any backend: one `UPDATE` of the host's
/// row. Hubs write their own name only, so two hubs never race for one
/// claim except when the host itself moves, and then the later stream's
/// write is the truth (a host's older stream is closed for a newer one).
pub async fn subscribed_via<B: Backend + ?Sized>(
    b: &B,
    host: &str,
    hub: &str,
    since_ms: i64,
) -> Result<(), StoreError> {
    let id = host_id(b, host).await?;
    let mut ex = b.session().await?;
    ex.exec(
        "UPDATE hosts SET hub = ?, hub_since_ms = ? WHERE id = ?",
        params![hub, since_ms, id],
    )
    .await
    .map(drop)
}

/// `Store::unsubscribed_via` for any backend: clears only the claim this
/// subscription wrote (hub and time both match).
pub async fn unsubscribed_via<B: Backend + ?Sized>(
    b: &B,
    host: &str,
    hub: &str,
    since_ms: i64,
) -> Result<bool, StoreError> {
    let id = host_id(b, host).await?;
    let mut ex = b.session().await?;
    let done = ex
        .exec(
            "UPDATE hosts SET hub = NULL, hub_since_ms = NULL \
             WHERE id = ? AND hub = ? AND hub_since_ms = ?",
            params![id, hub, since_ms],
        )
        .await?;
    Ok(done.affected > 0)
}

/// `Store::release_hub` for any backend.
pub async fn release_hub<B: Backend + ?Sized>(b: &B, hub: &str) -> Result<u64, StoreError> {
    let mut ex = b.session().await?;
    let done = ex
        .exec(
            "UPDATE hosts SET hub = NULL, hub_since_ms = NULL WHERE hub = ?",
            params![hub],
        )
        .await?;
    Ok(done.affected)
}

/// `Store::hub_seen` for any backend: one upsert of the hub's own row.
pub async fn hub_seen<B: Backend + ?Sized>(
    b: &B,
    hub: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut ex = b.session().await?;
    ex.exec(
        &format!(
            "INSERT INTO hubs (name, seen_ms) VALUES (?, ?){}",
            b.dialect().upsert(&["name"], &["seen_ms"])
        ),
        params![hub, now_ms],
    )
    .await
    .map(drop)
}

/// `Store::last_seq` for any backend.
pub async fn last_seq<B: Backend + ?Sized>(b: &B, host: &str) -> Result<u64, StoreError> {
    let id = host_id(b, host).await?;
    let mut ex = b.session().await?;
    let r = ex
        .query(
            "SELECT MAX(node_seq) FROM events WHERE reporter_id = ?",
            params![id],
        )
        .await?;
    Ok(r.first()
        .map(|r| r.opt_u64(0))
        .transpose()?
        .flatten()
        .unwrap_or(0))
}
