//! The namespace hosts and admins share: revoked names, admin names and
//! the certificate lifetimes hosts enrolled with.
//!
//! Every table here is keyed by the name in lower case, so `NODE-B` and
//! `node-b` are one name on both backends, whatever the collation. A name
//! needs no host row to be revoked or to be an admin's: an admin is never a
//! host, and a hand-issued certificate can be revoked before its first call.
use super::super::{
    RawNames, Revocation, StoreError,
    executor::{Backend, params},
    now_ms,
};

/// `Store::revoke` for any backend.
pub async fn revoke<B: Backend + ?Sized>(
    b: &B,
    name: &str,
    by: &str,
) -> Result<Revocation, StoreError> {
    let d = b.dialect();
    let key = name.to_ascii_lowercase();
    let now = now_ms();
    let mut ex = b.session().await?;
    ex.begin().await?;
    // The first revocation's time and author stay.
    ex.exec(
        &format!(
            "{} INTO revoked_names (name_key, name, revoked_ms, revoked_by) VALUES (?, ?, ?, ?)",
            d.insert_ignore()
        ),
        params![&key, name, now, by],
    )
    .await?;
    // The host row keeps its flag too: `hosts` shows it, and stores read
    // by earlier builds still refuse it.
    ex.exec(
        &format!(
            "UPDATE hosts SET revoked_ms = COALESCE(revoked_ms, ?) WHERE {}",
            d.name_is("name")
        ),
        params![now, name],
    )
    .await?;
    let host = ex
        .query(
            &format!(
                "SELECT name FROM hosts WHERE {} ORDER BY id LIMIT 1",
                d.name_is("name")
            ),
            params![name],
        )
        .await?
        .first()
        .map(|r| r.text(0))
        .transpose()?;
    let admin = ex
        .query(
            "SELECT COUNT(*) FROM admin_names WHERE name_key = ?",
            params![&key],
        )
        .await?
        .first()
        .map(|r| r.i64(0))
        .transpose()?
        .unwrap_or(0)
        > 0;
    ex.commit().await?;
    Ok(Revocation { host, admin })
}

/// `Store::revoked` for any backend: the names revoked here, and hosts
/// revoked by earlier builds (which flagged the host row only).
pub async fn revoked<B: Backend + ?Sized>(b: &B) -> Result<Vec<String>, StoreError> {
    let mut ex = b.session().await?;
    let mut names = ex
        .query(
            "SELECT name_key FROM revoked_names \
             UNION SELECT LOWER(name) FROM hosts WHERE revoked_ms IS NOT NULL",
            vec![],
        )
        .await?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<Vec<_>, _>>()?;
    names.sort();
    names.dedup();
    Ok(names)
}

/// `Store::record_admin` for any backend.
pub async fn record_admin<B: Backend + ?Sized>(b: &B, name: &str) -> Result<(), StoreError> {
    let mut ex = b.session().await?;
    ex.exec(
        &format!(
            "{} INTO admin_names (name_key, name, first_seen_ms) VALUES (?, ?, ?)",
            b.dialect().insert_ignore()
        ),
        params![name.to_ascii_lowercase(), name, now_ms()],
    )
    .await
    .map(drop)
}

/// `Store::cert_ttl` for any backend.
pub async fn cert_ttl<B: Backend + ?Sized>(b: &B, name: &str) -> Result<Option<i64>, StoreError> {
    let mut ex = b.session().await?;
    ex.query(
        "SELECT cert_ttl_s FROM host_lifetimes WHERE name_key = ?",
        params![name.to_ascii_lowercase()],
    )
    .await?
    .first()
    .map(|r| r.i64(0))
    .transpose()
}

/// `Store::dump_names` for any backend.
pub async fn dump<B: Backend + ?Sized>(b: &B) -> Result<RawNames, StoreError> {
    let mut ex = b.session().await?;
    let revoked = ex
        .query(
            "SELECT name, revoked_ms, revoked_by FROM revoked_names \
             UNION ALL SELECT name, revoked_ms, '' FROM hosts WHERE revoked_ms IS NOT NULL \
             ORDER BY 2",
            vec![],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.i64(1)?, r.text(2)?)))
        .collect::<Result<_, StoreError>>()?;
    let admins = ex
        .query(
            "SELECT name, first_seen_ms FROM admin_names ORDER BY name_key",
            vec![],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.i64(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let lifetimes = ex
        .query(
            "SELECT name_key, cert_ttl_s FROM host_lifetimes ORDER BY name_key",
            vec![],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.i64(1)?)))
        .collect::<Result<_, StoreError>>()?;
    let forgotten = ex
        .query(
            "SELECT ip, up_to, forgotten_ms, forgotten_by FROM forgotten ORDER BY ip",
            vec![],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.u64(1)?, r.i64(2)?, r.text(3)?)))
        .collect::<Result<_, StoreError>>()?;
    Ok(RawNames {
        revoked,
        admins,
        lifetimes,
        forgotten,
    })
}

/// `Store::load_names` for any backend. A name revoked twice in the dump
/// (in `revoked_names` and on its host row) keeps its earliest time.
pub async fn load<B: Backend + ?Sized>(b: &B, n: &RawNames) -> Result<(), StoreError> {
    let d = b.dialect();
    let ignore = d.insert_ignore();
    let mut ex = b.session().await?;
    ex.begin().await?;
    for (name, ms, by) in &n.revoked {
        ex.exec(
            &format!(
                "{ignore} INTO revoked_names (name_key, name, revoked_ms, revoked_by) \
                 VALUES (?, ?, ?, ?)"
            ),
            params![name.to_ascii_lowercase(), name, *ms, by],
        )
        .await?;
        ex.exec(
            &format!(
                "UPDATE hosts SET revoked_ms = COALESCE(revoked_ms, ?) WHERE {}",
                d.name_is("name")
            ),
            params![*ms, name],
        )
        .await?;
    }
    for (name, ms) in &n.admins {
        ex.exec(
            &format!("{ignore} INTO admin_names (name_key, name, first_seen_ms) VALUES (?, ?, ?)"),
            params![name.to_ascii_lowercase(), name, *ms],
        )
        .await?;
    }
    for (key, ttl) in &n.lifetimes {
        ex.exec(
            &format!("{ignore} INTO host_lifetimes (name_key, cert_ttl_s) VALUES (?, ?)"),
            params![key.to_ascii_lowercase(), *ttl],
        )
        .await?;
    }
    for (ip, up_to, ms, by) in &n.forgotten {
        ex.exec(
            &format!(
                "{ignore} INTO forgotten (ip, up_to, forgotten_ms, forgotten_by) VALUES (?, ?, ?, ?)"
            ),
            params![ip, *up_to, *ms, by],
        )
        .await?;
    }
    ex.commit().await
}

/// `Store::note_fleet_address` for any backend.
pub async fn note_fleet_address<B: Backend + ?Sized>(
    b: &B,
    ip: &str,
    owner: &str,
) -> Result<(), StoreError> {
    let mut ex = b.session().await?;
    ex.exec(
        &format!(
            "{} INTO fleet_addresses (ip, owner, first_seen_ms) VALUES (?, ?, ?)",
            b.dialect().insert_ignore()
        ),
        params![ip, owner, now_ms()],
    )
    .await
    .map(drop)
}

/// `Store::fleet_addresses` for any backend.
pub async fn fleet_addresses<B: Backend + ?Sized>(
    b: &B,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut ex = b.session().await?;
    ex.query("SELECT ip, owner FROM fleet_addresses ORDER BY ip", vec![])
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?)))
        .collect()
}
