//! The `Hub` gRPC service: converts protos at the edge and forwards to the
//! committer, the store and the fan-out. No state of its own.
use std::{pin::Pin, sync::Arc};

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use super::{
    access::Access,
    allow,
    committer::Committer,
    db_health::DbGate,
    enrollment,
    fanout::Fanout,
    fleet::{FleetAddrs, LIFTER},
    publish,
    rate_limit::{BACKLOG_HEADER, ReportLimits},
    signals::Signals,
    statuses::{StatusWriter, WriteError},
    store::{BanFilter, BanRow, Store},
    subscription,
};
use crate::{
    ban::Status as BanStatus,
    ca::CaSigner,
    proto::{self, LAST_SEQ_HEADER, served::hub_server},
    shutdown::Shutdown,
};

/// Most statuses in one `ReportStatus` call.
const MAX_STATUS_BATCH: usize = 10_000;

/// Bans in a `ListBans` answer when the request names no limit.
pub const DEFAULT_LIST_BANS: usize = 100;
/// Most bans in one `ListBans` answer, whatever `limit` asks for.
pub const MAX_LIST_BANS: usize = 1_000;
/// Most host statuses in one `ListBans` answer, all its bans together: the
/// answer (and what the hub builds for it) grows with bans x hosts. At
/// 1,000 hosts a `limit` of 10,000 built a 200 MB answer (the hub peaked
/// at 0.8 GB per call); 10,000 statuses are ~200 kB.
pub const MAX_ANSWER_STATUSES: usize = 10_000;

/// Bans in one `ListBans` page when the fleet has `hosts` hosts: the
/// caller's `limit` (0 for the default), within [`MAX_LIST_BANS`] and the
/// bans whose statuses fit [`MAX_ANSWER_STATUSES`], and at least one.
pub fn list_page(limit: u32, hosts: usize) -> usize {
    let asked = match limit {
        0 => DEFAULT_LIST_BANS,
        n => (n as usize).min(MAX_LIST_BANS),
    };
    asked.min(MAX_ANSWER_STATUSES / hosts.max(1)).max(1)
}

/// The `Hub` gRPC service: publish, subscribe, statuses, bans, hosts, unban, tokens, revoke, renew.
pub struct HubService {
    /// The store: reads (bans, hosts, replay) go to it directly.
    pub store: Arc<dyn Store>,
    /// Batches hosts' `ReportStatus` calls into one write.
    pub statuses: StatusWriter,
    /// Group-commits published reports.
    pub committer: Committer,
    /// Hosts' signals, aggregated into fleet bans.
    pub signals: Arc<Signals>,
    /// Each host's report rate limit.
    pub limits: Arc<ReportLimits>,
    /// Live subscribers, and the ring new events are broadcast on.
    pub fanout: Fanout,
    /// The fleet's own addresses (never banned), learnt from connections.
    pub fleet: FleetAddrs,
    /// Who may call what (admin role, revoked names).
    pub access: Access,
    /// The CA, when this hub signs enrolments and renewals.
    pub signer: Option<Arc<CaSigner>>,
    /// The names in the hub's certificate, which no token may be bound to.
    pub hub_names: Arc<enrollment::HubNames>,
    /// Ends streams and refuses new work when the hub stops.
    pub shutdown: Shutdown,
    /// The escalation ladder in force (`None`: off), shown by `Policy`.
    pub ladder: Option<super::ladder::Ladder>,
    /// Whether the database is healthy: while it is not, every call is
    /// refused and every stream ended with UNAVAILABLE (`db_health`).
    pub db: DbGate,
    /// This hub's name (`--name`), recorded against the hosts subscribed
    /// through it so that `Hosts` on any hub sharing the store shows it.
    pub name: Arc<str>,
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `acks` until they end or the database is lost (`db_health`), which ends
/// the stream with UNAVAILABLE: the node then moves to another hub and
/// sends its unacknowledged reports there. Reports whose commit is still
/// out are not acknowledged; sent again, `(host, seq)` finds those that
/// committed.
fn until_lost(mut acks: publish::Acks, db: DbGate) -> BoxStream<proto::Ack> {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                biased;
                item = acks.next() => item,
                status = db.lost() => Some(Err(status)),
            };
            let Some(item) = item else { return };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl hub_server::Hub for HubService {
    type PublishStream = BoxStream<proto::Ack>;
    type SubscribeStream = subscription::Events;

    async fn publish(
        &self,
        request: Request<Streaming<proto::Report>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let peer = self.access.host(&request)?;
        self.db.check()?;
        self.note_fleet(&request, &peer.name);
        self.store
            .touch_host(&peer.name, peer.cert_expires_ms)
            .await
            .map_err(unavailable)?;
        let host = peer.name;
        let last_seq = self.store.last_seq(&host).await.map_err(unavailable)?;
        let revoked = self.access.revoked(&host);
        let backlog = request
            .metadata()
            .get(BACKLOG_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let sink = publish::Sink {
            committer: self.committer.clone(),
            gate: self.limits.gate(&host, backlog),
        };
        let acks = publish::start(
            host,
            request.into_inner(),
            sink,
            revoked,
            self.shutdown.clone(),
        );
        let acks = until_lost(acks, self.db.clone());
        let mut response: Response<Self::PublishStream> = Response::new(acks);
        if let Ok(v) = last_seq.to_string().parse() {
            response.metadata_mut().insert(LAST_SEQ_HEADER, v);
        }
        Ok(response)
    }

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = self.access.member(&request)?;
        self.db.check()?;
        // Admins may follow the stream; they are not hosts of the fleet.
        if !peer.admin {
            self.note_fleet(&request, &peer.name);
            self.store
                .touch_host(&peer.name, peer.cert_expires_ms)
                .await
                .map_err(unavailable)?;
        }
        let events = subscription::start(
            self.store.clone(),
            self.fanout.clone(),
            (self.access.clone(), self.db.clone()),
            (peer.name, (!peer.admin).then(|| self.name.clone())),
            request.get_ref().after_event_id,
            self.shutdown.clone(),
        );
        Ok(Response::new(events))
    }

    async fn report_status(
        &self,
        request: Request<proto::StatusBatch>,
    ) -> Result<Response<proto::StatusBatchAck>, Status> {
        let host = self.access.host(&request)?.name;
        self.db.check()?;
        let updates = request.into_inner().updates;
        if updates.len() > MAX_STATUS_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_STATUS_BATCH} statuses per call"
            )));
        }
        let updates = updates
            .iter()
            .map(|u| {
                BanStatus::from_code(u.status as i64)
                    .map(|s| (host.clone(), u.event_id, s))
                    .ok_or_else(|| Status::invalid_argument(format!("unknown status {}", u.status)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stored = self.statuses.write(updates).await.map_err(|e| match e {
            WriteError::NoSuchEvent { .. } => Status::invalid_argument(e.to_string()),
            WriteError::Store(e) => unavailable(e),
        })?;
        Ok(Response::new(proto::StatusBatchAck {
            stored: stored as u32,
        }))
    }

    async fn list_bans(
        &self,
        request: Request<proto::ListBansRequest>,
    ) -> Result<Response<proto::ListBansResponse>, Status> {
        self.access.member(&request)?;
        self.db.check()?;
        let r = request.into_inner();
        let hosts = self.store.hosts().await.map_err(unavailable)?.len();
        let page = list_page(r.limit, hosts);
        let some = |s: String| (!s.is_empty()).then_some(s);
        let filter = BanFilter {
            ip: some(r.ip),
            added_by: some(r.added_by),
            jail: some(r.jail),
            since_ms: (r.since_ms > 0).then_some(r.since_ms),
            after_id: r.after_event_id,
            limit: page,
        };
        let bans = self.store.list_bans(&filter).await.map_err(unavailable)?;
        let next_after_event_id = match bans.last() {
            Some(last) if bans.len() >= page => last.event.id,
            _ => 0,
        };
        Ok(Response::new(proto::ListBansResponse {
            bans: bans
                .into_iter()
                .map(|mut b| {
                    // More hosts than fit one answer: the first ones only.
                    let omitted = b.statuses.len().saturating_sub(MAX_ANSWER_STATUSES);
                    b.statuses.truncate(MAX_ANSWER_STATUSES);
                    proto::BanRecord {
                        statuses_omitted: omitted as u32,
                        ..ban_record(b)
                    }
                })
                .collect(),
            next_after_event_id,
        }))
    }

    async fn hosts(
        &self,
        request: Request<proto::HostsRequest>,
    ) -> Result<Response<proto::HostsResponse>, Status> {
        self.access.member(&request)?;
        self.db.check()?;
        let hosts = self.store.hosts().await.map_err(unavailable)?;
        let last = self.store.last_event_id().await.map_err(unavailable)?;
        let now = crate::clock::now_ms();
        Ok(Response::new(proto::HostsResponse {
            hosts: hosts
                .into_iter()
                .map(|h| {
                    let position = self.fanout.position(&h.name);
                    let limit = self.limits.status(&h.name);
                    proto::HostInfo {
                        throttled: limit.throttled,
                        throttled_since_ms: limit.throttled_since_ms,
                        backlog: limit.backlog,
                        subscribed: position.is_some(),
                        lag_events: position.map_or(0, |p| last.saturating_sub(p)),
                        first_seen_ms: h.first_seen_ms,
                        last_seen_ms: h.last_seen_ms,
                        enrolled_ms: h.enrolled_ms.unwrap_or(0),
                        cert_expires_ms: h.cert_expires_ms.unwrap_or(0),
                        revoked: h.revoked || self.access.is_revoked(&h.name),
                        // This hub's own claim with no stream here is one an
                        // earlier run left (its streams' ends went unrecorded);
                        // another hub's is stale when that hub fell silent.
                        stale_hub: match h.hub.as_deref() {
                            Some(hub) if hub.eq_ignore_ascii_case(&self.name) => position.is_none(),
                            Some(_) => super::presence::silent(h.hub_seen_ms, now),
                            None => false,
                        },
                        hub_seen_ms: h.hub_seen_ms.unwrap_or(0),
                        hub: h.hub.unwrap_or_default(),
                        hub_since_ms: h.hub_since_ms.unwrap_or(0),
                        name: h.name,
                    }
                })
                .collect(),
        }))
    }

    async fn unban(
        &self,
        request: Request<proto::UnbanRequest>,
    ) -> Result<Response<proto::UnbanResponse>, Status> {
        let admin = self.access.admin(&request)?.name;
        self.db.check()?;
        // The fleet's spelling: `::ffff:a.b.c.d` is the IPv4 address that
        // every ban of it was stored (and banned by fail2ban) as.
        let ip = crate::ban::parse_ip(&request.get_ref().ip).ok_or_else(|| {
            Status::invalid_argument(format!("{:?} is not an IP address", request.get_ref().ip))
        })?;
        let forget = request.get_ref().forget;
        match self
            .committer
            .unban(ip.to_string(), admin.clone(), forget)
            .await
        {
            Ok(Some((event, lifted))) => {
                info!(%ip, by = %admin, event = event.id, lifted, forget, "unbanned");
                Ok(Response::new(proto::UnbanResponse {
                    event_id: event.id,
                    lifted,
                }))
            }
            // Nothing to lift, but the history is cleared all the same.
            Ok(None) if forget => {
                info!(%ip, by = %admin, "ladder history forgotten (no active ban)");
                Ok(Response::new(proto::UnbanResponse {
                    event_id: 0,
                    lifted: 0,
                }))
            }
            Ok(None) => Err(Status::not_found(format!("{ip} has no active ban"))),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get_ban(
        &self,
        request: Request<proto::GetBanRequest>,
    ) -> Result<Response<proto::BanRecord>, Status> {
        self.access.member(&request)?;
        self.db.check()?;
        let id = request.get_ref().event_id;
        let filter = BanFilter {
            after_id: id.saturating_sub(1),
            limit: 1,
            ..Default::default()
        };
        let ban = self.store.list_bans(&filter).await.map_err(unavailable)?;
        match ban.into_iter().next().filter(|b| b.event.id == id) {
            Some(b) => Ok(Response::new(ban_record(b))),
            None => Err(Status::not_found(format!("no ban with event id {id}"))),
        }
    }

    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let admin = self.access.admin(&request)?.name;
        self.db.check()?;
        let r = request.into_inner();
        let signer = self.signer.as_ref().ok_or_else(|| {
            Status::failed_precondition("this hub has no CA key (--ca-key): enrolment is off")
        })?;
        let name = enrollment::token_name(&r.name, r.any_name, &self.hub_names)?;
        let token =
            enrollment::create_token(self.store.as_ref(), name, r.ttl_s, r.cert_ttl_s).await?;
        // The token itself never reaches a log line; the name is checked.
        info!(by = %admin, name = %r.name, any_name = r.any_name, ttl_s = token.ttl_s,
            "enrolment token created");
        Ok(Response::new(proto::CreateTokenResponse {
            token: token.token,
            expires_ms: token.expires_ms,
            ca_sha256: signer.sha256.clone(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<proto::RevokeRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let admin = self.access.admin(&request)?.name;
        self.db.check()?;
        let name = request.into_inner().name;
        if !crate::ban::valid_host_name(&name) {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not a valid certificate name"
            )));
        }
        // An admin locking itself out is a slip, not a policy: another
        // admin can revoke this one.
        if name.eq_ignore_ascii_case(&admin) {
            return Err(Status::failed_precondition(format!(
                "{admin} is the certificate making this call; revoke it with another admin's certificate"
            )));
        }
        let known = self
            .store
            .revoke(&name, &admin)
            .await
            .map_err(unavailable)?;
        // Counted before revoking: revoking ends them. Streams are
        // registered under their certificate's name, which may differ in
        // case from the name asked for and from the stored host.
        let mut streams = self.fanout.streams(&name);
        if let Some(host) = known.host.as_deref().filter(|h| *h != name) {
            streams += self.fanout.streams(host);
        }
        self.access.revoke(&name);
        if known.admin {
            info!(name = %name, by = %admin, "admin revoked");
        }
        match &known.host {
            Some(host) => info!(host = %host, by = %admin, "host revoked"),
            None if !known.admin => {
                info!(name = %name, by = %admin, "name revoked before any connection")
            }
            None => {}
        }
        Ok(Response::new(proto::RevokeResponse {
            streams_closed: streams as u32,
            unknown_name: known.host.is_none() && !known.admin,
            admin: known.admin,
        }))
    }

    async fn allow_add(
        &self,
        request: Request<proto::AllowAddRequest>,
    ) -> Result<Response<proto::AllowAddResponse>, Status> {
        self.db.check()?;
        allow::add(self, request).await
    }

    async fn allow_list(
        &self,
        request: Request<proto::AllowListRequest>,
    ) -> Result<Response<proto::AllowListResponse>, Status> {
        self.db.check()?;
        allow::list(self, request).await
    }

    async fn allow_remove(
        &self,
        request: Request<proto::AllowRemoveRequest>,
    ) -> Result<Response<proto::AllowRemoveResponse>, Status> {
        self.db.check()?;
        allow::remove(self, request).await
    }

    async fn list_refused(
        &self,
        request: Request<proto::ListRefusedRequest>,
    ) -> Result<Response<proto::ListRefusedResponse>, Status> {
        self.db.check()?;
        allow::refused(self, request).await
    }

    async fn send_signals(
        &self,
        request: Request<proto::SignalBatch>,
    ) -> Result<Response<proto::SignalBatchAck>, Status> {
        // The observer is the certificate's host, never a field.
        let host = self.access.host(&request)?.name;
        self.db.check()?;
        let ack = self.signals.take(&host, &request.get_ref().signals)?;
        Ok(Response::new(ack))
    }

    async fn policy(
        &self,
        request: Request<proto::PolicyRequest>,
    ) -> Result<Response<proto::PolicyResponse>, Status> {
        // Any fleet member may read it: a node shows it, an admin checks it.
        self.access.member(&request)?;
        Ok(Response::new(proto::PolicyResponse {
            ladder_s: self
                .ladder
                .iter()
                .flat_map(|l| l.rungs().iter().map(|d| d.as_secs()))
                .collect(),
            ladder_window_s: self.ladder.as_ref().map_or(0, |l| l.window().as_secs()),
            ..self.signals.policy()
        }))
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::IssuedCertificate>, Status> {
        let peer = self.access.host(&request)?;
        self.db.check()?;
        let valid_for = self.renewal_lifetime(&request, &peer.name).await?;
        let issued = enrollment::sign_csr(
            self.signer.as_deref(),
            &peer.name,
            &request.get_ref().csr_pem,
            valid_for,
        )?;
        self.store
            .touch_host(&peer.name, Some(issued.expires_ms))
            .await
            .map_err(unavailable)?;
        info!(host = %peer.name, expires_ms = issued.expires_ms, "certificate renewed");
        Ok(Response::new(issued))
    }
}

impl HubService {
    /// A host's connection reveals two fleet addresses: its own (the
    /// source) and the hub's as the host reaches it (the local end).
    /// A new one has its active bans lifted (see `fleet`).
    fn note_fleet<T>(&self, request: &Request<T>, host: &str) {
        let ends = [(request.remote_addr(), host), (request.local_addr(), "hub")];
        for (addr, who) in ends {
            let Some(ip) = addr.map(|a| crate::ban::canonical_ip(a.ip())) else {
                continue;
            };
            if !self.fleet.note(ip, who) {
                continue;
            }
            let committer = self.committer.clone();
            let fleet = self.fleet.clone();
            let store = Arc::clone(&self.store);
            let owner = who.to_string();
            tokio::spawn(async move {
                // Kept for the next start (see `fleet`); a failure here only
                // means it is learnt again at the next connection then.
                if let Err(e) = store.note_fleet_address(&ip.to_string(), &owner).await {
                    tracing::warn!(%ip, error = %e, "cannot record a fleet address");
                }
                // Right after an outage, when every host reconnects at once,
                // is when the store is most likely to fail: retry with a
                // growing wait before giving up.
                let mut wait = std::time::Duration::from_secs(1);
                for attempt in 1..=8 {
                    match committer.unban(ip.to_string(), LIFTER.into(), false).await {
                        Ok(Some((event, lifted))) => {
                            info!(%ip, event = event.id, lifted,
                                "a fleet address was banned; lifted on every host");
                            return;
                        }
                        Ok(None) => return,
                        Err(e) => tracing::warn!(%ip, attempt, error = %e,
                            "cannot lift the bans of a fleet address yet"),
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(60));
                }
                // Forgotten, so the host's next connection tries again.
                fleet.forget(ip);
            });
        }
    }

    /// How long a renewed certificate is valid: what the host enrolled
    /// with (its token's `--cert-ttl`), so a short-lived certificate stays
    /// short. A host issued by hand (`ca issue`) keeps the lifetime of the
    /// certificate it presents, at most the default.
    async fn renewal_lifetime<T>(
        &self,
        request: &Request<T>,
        name: &str,
    ) -> Result<std::time::Duration, Status> {
        use std::time::Duration;
        if let Some(s) = self.store.cert_ttl(name).await.map_err(unavailable)? {
            // As at enrolment: never below a minute.
            return Ok(Duration::from_secs(s.max(60) as u64));
        }
        let presented = request.peer_certs().and_then(|certs| {
            let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
            let v = cert.validity();
            // `ca` backdates by a minute for clock skew; that is not lifetime.
            let secs = v.not_after.timestamp() - v.not_before.timestamp() - 60;
            u64::try_from(secs).ok()
        });
        Ok(presented
            .map(Duration::from_secs)
            .unwrap_or(crate::ca::HOST_VALIDITY)
            .clamp(Duration::from_secs(60), crate::ca::HOST_VALIDITY))
    }
}

fn ban_record(b: BanRow) -> proto::BanRecord {
    proto::BanRecord {
        event: Some(b.event.to_proto()),
        lifted: b.lifted,
        statuses_omitted: 0,
        reporters: b
            .reporters
            .into_iter()
            .map(|r| proto::Reporter {
                host: r.host,
                jail: r.jail,
                count: r.count,
                first_ms: r.first_ms,
                last_ms: r.last_ms,
            })
            .collect(),
        forgotten: b.forgotten,
        statuses: b
            .statuses
            .into_iter()
            .map(|(host, s)| proto::HostStatus {
                host,
                status: s as i32,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_page_fits_the_answer_bounds() {
        assert_eq!(list_page(0, 3), DEFAULT_LIST_BANS);
        assert_eq!(list_page(u32::MAX, 3), MAX_LIST_BANS);
        assert_eq!(list_page(10_000, 1_000), 10);
        assert_eq!(list_page(5, 1_000), 5);
        assert_eq!(list_page(10_000, 0), MAX_LIST_BANS);
        // One ban even when its statuses alone exceed the budget.
        assert_eq!(list_page(100, 50_000), 1);
    }
}
