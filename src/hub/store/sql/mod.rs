//! Every `Store` method but the two tuned write paths, written once against
//! [`Executor`]: any [`Backend`] is a `Store`. The bodies live by subject:
//! `hosts.rs` (hosts and enrolment), `names.rs` (the namespace shared with
//! admins: revocation, admin names, enrolled lifetimes), `events.rs`
//! (replay, unban, listing), `allow.rs` (the allow-list and refused reports), `raw.rs` (rows as stored, for `hub migrate`).
//!
//! What must stay true here, for both databases:
//! - a host's id comes from [`host_id`], which also keeps the `ip_table`
//!   view's columns current (outside any transaction: the view is DDL);
//! - a method that reads then writes (`enroll`, `unban`) does both in one
//!   transaction, locking what it read where the dialect needs it;
//! - an early return inside a transaction drops the executor, which rolls
//!   back (see [`Executor`]).
use async_trait::async_trait;

use super::{
    BanFilter, BanRow, Committed, EnrollRefused, Enrolled, HostRow, NewReport, NewToken, RawEvent,
    RawHost, RawNames, RawStatus, Revocation, Store, StoreError,
    executor::{Backend, Executor, params},
    schema::{self, MAX_VIEW_HOSTS},
};
use crate::ban::{Event, Status};

mod allow;
mod events;
mod hosts;
mod names;
mod raw;
pub mod sequence;

/// The id of host `name`, creating its row (and view column) when new.
/// Names match case-insensitively (see `Dialect::name_is`): `WEB-1` is
/// host `web-1`, under the name it first connected with.
pub async fn host_id<B: Backend + ?Sized>(b: &B, name: &str) -> Result<u64, StoreError> {
    // The hub's own fleet bans: reporter 0 (as admins' unbans), no hosts
    // row, so no `ip_table` column and no host in `hub hosts`.
    if name.eq_ignore_ascii_case(crate::hostname::FLEET) {
        return Ok(0);
    }
    if let Some(id) = b.host_ids().get(name) {
        return Ok(id);
    }
    let mut ex = b.session().await?;
    let d = b.dialect();
    let find = format!(
        "SELECT id FROM hosts WHERE {} ORDER BY id LIMIT 1",
        d.name_is("name")
    );
    let mut rows = ex.query(&find, params![name]).await?;
    if rows.is_empty() {
        let now = super::now_ms();
        ex.exec(
            &format!(
                "INSERT INTO hosts (name, first_seen_ms, last_seen_ms) VALUES (?, ?, ?){}",
                d.upsert(&["name"], &["last_seen_ms"])
            ),
            params![name, now, now],
        )
        .await?;
        rows = ex.query(&find, params![name]).await?;
    }
    let id = match rows.first() {
        Some(r) => r.u64(0)?,
        None => return Err(StoreError::query(format!("host {name} vanished"))),
    };
    // Past the view's last column, a new host changes nothing there.
    if b.host_ids().extend([(id, name.to_string())]) <= MAX_VIEW_HOSTS {
        refresh_hosts(b, &mut *ex).await?;
    }
    Ok(id)
}

/// Reloads every host into the cache and rebuilds the `ip_table` view.
///
/// The view is the seed's shape for operators' SQL, not something the hub
/// reads: a failure to rebuild it is logged and the view stays as it was,
/// so it can never fail a start, an enrolment (after its token is spent)
/// or a host's first call.
pub async fn refresh_hosts<B: Backend + ?Sized>(
    b: &B,
    ex: &mut dyn Executor,
) -> Result<(), StoreError> {
    let _one_at_a_time = b.host_ids().rebuilding().await;
    let hosts = hosts_by_id(ex).await?;
    let rebuilt = schema::rebuild_view(ex, b.dialect(), &hosts).await;
    if let Err(e) = &rebuilt {
        tracing::warn!(error = %e, hosts = hosts.len(), "cannot rebuild the ip_table view; it stays as it was (the hub reads no view: serving continues; retried with other hubs' hosts)");
    }
    b.host_ids().set_view_stale(rebuilt.is_err());
    b.host_ids().extend(hosts);
    Ok(())
}

pub(super) async fn hosts_by_id(ex: &mut dyn Executor) -> Result<Vec<(u64, String)>, StoreError> {
    ex.query("SELECT id, name FROM hosts ORDER BY id", vec![])
        .await?
        .iter()
        .map(|r| Ok((r.u64(0)?, r.text(1)?)))
        .collect()
}

#[async_trait]
impl<B: Backend> Store for B {
    async fn refresh_view(&self) -> Result<(), StoreError> {
        let mut ex = self.session().await?;
        let rows = ex.query("SELECT COUNT(*) FROM hosts", vec![]).await?;
        let stored = rows.first().map(|r| r.u64(0)).transpose()?.unwrap_or(0);
        if stored as usize == self.host_ids().len() && !self.host_ids().view_stale() {
            return Ok(());
        }
        refresh_hosts(self, &mut *ex).await
    }

    async fn touch_host(&self, name: &str, cert_expires_ms: Option<i64>) -> Result<(), StoreError> {
        hosts::touch_host(self, name, cert_expires_ms).await
    }

    async fn create_token(&self, t: &NewToken) -> Result<(), StoreError> {
        hosts::create_token(self, t).await
    }

    async fn enroll(
        &self,
        token_hash: &str,
        name: &str,
    ) -> Result<Result<Enrolled, EnrollRefused>, StoreError> {
        sequence::retrying(|| hosts::enroll(self, token_hash, name)).await
    }

    async fn revoke(&self, name: &str, by: &str) -> Result<Revocation, StoreError> {
        sequence::retrying(|| names::revoke(self, name, by)).await
    }

    async fn revoked(&self) -> Result<Vec<String>, StoreError> {
        names::revoked(self).await
    }

    async fn record_admin(&self, name: &str) -> Result<(), StoreError> {
        names::record_admin(self, name).await
    }

    async fn cert_ttl(&self, name: &str) -> Result<Option<i64>, StoreError> {
        names::cert_ttl(self, name).await
    }

    async fn note_fleet_address(&self, ip: &str, owner: &str) -> Result<(), StoreError> {
        names::note_fleet_address(self, ip, owner).await
    }

    async fn fleet_addresses(&self) -> Result<Vec<(String, String)>, StoreError> {
        names::fleet_addresses(self).await
    }

    async fn commit_at(&self, batch: &[NewReport], now: i64) -> Result<Vec<Committed>, StoreError> {
        self.commit_batch(batch, now).await
    }

    async fn events_after(
        &self,
        after: u64,
        subscriber: &str,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        events::events_after(self, after, subscriber, limit).await
    }

    async fn committed_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        events::committed_after(self, after, limit).await
    }

    async fn unban(
        &self,
        ip: &str,
        by: &str,
        forget: bool,
    ) -> Result<Option<(Event, u32)>, StoreError> {
        sequence::retrying(|| events::unban(self, ip, by, forget)).await
    }

    async fn ladder_facts(&self, batch: &[NewReport]) -> Result<super::LadderFacts, StoreError> {
        events::ladder_facts(self, batch).await
    }

    async fn set_statuses(&self, updates: &[(String, u64, Status)]) -> Result<usize, StoreError> {
        self.write_statuses(updates).await
    }

    async fn list_bans(&self, f: &BanFilter) -> Result<Vec<BanRow>, StoreError> {
        events::list_bans(self, f).await
    }

    async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        hosts::hosts(self).await
    }

    async fn subscribed_via(&self, host: &str, hub: &str, since_ms: i64) -> Result<(), StoreError> {
        sequence::retrying(|| hosts::subscribed_via(self, host, hub, since_ms)).await
    }

    async fn unsubscribed_via(
        &self,
        host: &str,
        hub: &str,
        since_ms: i64,
    ) -> Result<bool, StoreError> {
        sequence::retrying(|| hosts::unsubscribed_via(self, host, hub, since_ms)).await
    }

    async fn release_hub(&self, hub: &str) -> Result<u64, StoreError> {
        sequence::retrying(|| hosts::release_hub(self, hub)).await
    }

    async fn hub_seen(&self, hub: &str, now_ms: i64) -> Result<(), StoreError> {
        sequence::retrying(|| hosts::hub_seen(self, hub, now_ms)).await
    }

    async fn allow_entries(&self) -> Result<Vec<super::AllowRow>, StoreError> {
        allow::entries(self).await
    }

    async fn allow_add(
        &self,
        entry: &super::AllowRow,
    ) -> Result<Option<super::AllowAdded>, StoreError> {
        sequence::retrying(|| allow::add(self, entry)).await
    }

    async fn allow_remove(
        &self,
        network: &crate::allow::Network,
        by: &str,
    ) -> Result<Option<Event>, StoreError> {
        sequence::retrying(|| allow::remove(self, network, by)).await
    }

    async fn load_allow(&self, rows: &[super::AllowRow]) -> Result<(), StoreError> {
        allow::load(self, rows).await
    }

    async fn refuse(&self, refused: &[(NewReport, String)]) -> Result<(), StoreError> {
        allow::refuse(self, refused).await
    }

    async fn refused(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<super::RefusedRow>, StoreError> {
        allow::refused(self, after, limit).await
    }

    async fn last_event_id(&self) -> Result<u64, StoreError> {
        events::last_event_id(self).await
    }

    async fn last_seq(&self, host: &str) -> Result<u64, StoreError> {
        hosts::last_seq(self, host).await
    }

    async fn dump_hosts(&self) -> Result<Vec<RawHost>, StoreError> {
        raw::dump_hosts(self).await
    }

    async fn dump_events(&self, after: u64, limit: usize) -> Result<Vec<RawEvent>, StoreError> {
        raw::dump_events(self, after, limit).await
    }

    async fn dump_statuses(&self, after: u64, limit: usize) -> Result<Vec<RawStatus>, StoreError> {
        raw::dump_statuses(self, after, limit).await
    }

    async fn load(
        &self,
        hosts: &[RawHost],
        events: &[RawEvent],
        statuses: &[RawStatus],
    ) -> Result<(), StoreError> {
        raw::load(self, hosts, events, statuses).await
    }

    async fn counts(&self) -> Result<(u64, u64, u64), StoreError> {
        raw::counts(self).await
    }

    async fn dump_names(&self) -> Result<RawNames, StoreError> {
        names::dump(self).await
    }

    async fn load_names(&self, n: &RawNames) -> Result<(), StoreError> {
        names::load(self, n).await
    }
}
