//! The `Hub` gRPC service: converts protos at the edge and forwards to the
//! committer, the store and the fan-out. No state of its own.
use std::{pin::Pin, sync::Arc};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::{
    access::Access,
    committer::Committer,
    fanout::Fanout,
    store::{BanFilter, Committed, NewReport, Store, StoreError},
    subscription,
};
use crate::{
    ban::{Ban, Status as BanStatus},
    ca::{CaSigner, HostCert},
    proto::{self, hub_server},
    shutdown::Shutdown,
};

use crate::proto::LAST_SEQ_HEADER;
/// Acks that may wait for the node to read them.
const ACK_QUEUE: usize = 1024;
/// Events buffered per subscriber between the replay/live task and gRPC.
const SUBSCRIBER_QUEUE: usize = 256;
/// Most statuses in one `ReportStatus` call.
const MAX_STATUS_BATCH: usize = 10_000;

pub struct HubService {
    pub store: Arc<dyn Store>,
    pub statuses: super::statuses::StatusWriter,
    pub committer: Committer,
    pub fanout: Fanout,
    pub access: Access,
    /// The CA, when this hub signs enrolments and renewals.
    pub signer: Option<Arc<CaSigner>>,
    pub shutdown: Shutdown,
}

/// Default lifetime of an enrolment token.
pub const TOKEN_TTL_S: u64 = 3600;

/// SHA-256 of a token, hex: what the store keeps.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Signs a CSR for `name`; the name and validity are the hub's, the CSR
/// only contributes its public key.
pub fn sign_csr(
    signer: Option<&CaSigner>,
    name: &str,
    csr_pem: &str,
    valid_for: std::time::Duration,
) -> Result<proto::IssuedCertificate, Status> {
    let signer = signer.ok_or_else(|| {
        Status::failed_precondition(
            "this hub has no CA key (--ca-key): it cannot sign certificates",
        )
    })?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Status::invalid_argument(format!("not a valid CSR: {e}")))?;
    let req = HostCert {
        name,
        sans: &[],
        valid_for,
        admin: false,
    };
    let cert_pem = signer
        .sign(&req, &csr.public_key)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(proto::IssuedCertificate {
        name: name.to_string(),
        cert_pem,
        ca_pem: signer.cert_pem.clone(),
        expires_ms: super::store::now_ms() + valid_for.as_millis() as i64,
    })
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Waits for one pending report's outcome.
async fn resolve(p: PendingAck) -> Result<proto::Ack, Status> {
    match p {
        PendingAck::Ready(ack) => Ok(ack),
        PendingAck::Failed(status) => Err(status),
        PendingAck::Committing(seq, rx) => match rx.await {
            Ok(Ok(c)) => Ok(proto::Ack {
                seq,
                event_id: c.event_id(),
                duplicate: matches!(c, Committed::Duplicate(_)),
                rejected: String::new(),
                count: 1,
            }),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(Status::unavailable("the hub is shutting down")),
        },
    }
}

/// An ack in the making: answered at once (a refused report) or when the
/// committer has it durable. Kept in arrival order.
enum PendingAck {
    Ready(proto::Ack),
    Committing(u64, oneshot::Receiver<Result<Committed, Arc<StoreError>>>),
    /// Ends the stream with this status.
    Failed(Status),
}

#[tonic::async_trait]
impl hub_server::Hub for HubService {
    type PublishStream = BoxStream<proto::Ack>;
    type SubscribeStream = BoxStream<proto::Event>;

    async fn publish(
        &self,
        request: Request<Streaming<proto::Report>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let peer = self.access.host(&request)?;
        self.store
            .touch_host(&peer.name, peer.cert_expires_ms)
            .await
            .map_err(unavailable)?;
        let host = peer.name;
        let last_seq = self.store.last_seq(&host).await.map_err(unavailable)?;
        let span = info_span!("publish", host = %host);
        let mut inbound = request.into_inner();
        let revoked = self.access.revoked(&host);
        let (pending_tx, mut pending_rx) = mpsc::channel::<PendingAck>(ACK_QUEUE);
        let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
        let committer = self.committer.clone();
        let mut shutdown = self.shutdown.clone();

        // Reader: validate and queue each report with the committer, so many
        // are in flight at once and share a transaction.
        tokio::spawn(
            async move {
                tokio::pin!(revoked);
                loop {
                    let next = tokio::select! {
                        m = inbound.next() => m,
                        _ = shutdown.recv() => None,
                        _ = &mut revoked => {
                            info!("host revoked; ending its publish stream");
                            let _ = pending_tx
                                .send(PendingAck::Failed(Status::permission_denied("this host has been revoked")))
                                .await;
                            None
                        }
                    };
                    let report = match next {
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            info!(error = %e, "publish stream ended");
                            break;
                        }
                        None => break,
                    };
                    let pending = match Ban::from_proto(report.ban.as_ref()) {
                        Err(e) => {
                            warn!(seq = report.seq, reason = %e, "report refused");
                            PendingAck::Ready(proto::Ack {
                                seq: report.seq,
                                rejected: e.to_string(),
                                count: 1,
                                ..Default::default()
                            })
                        }
                        Ok(ban) => {
                            let new = NewReport {
                                host: host.clone(),
                                seq: report.seq,
                                ban,
                            };
                            PendingAck::Committing(report.seq, committer.report(new).await)
                        }
                    };
                    if pending_tx.send(pending).await.is_err() {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );

        // Writer: answer in arrival order once each is durable. Reports
        // already committed behind the first are folded into one cumulative
        // ack (`count`), so a busy stream costs one ack per commit, not one
        // per report. A failed commit ends the stream with UNAVAILABLE; the
        // node keeps the report in its outbox and sends it again.
        tokio::spawn(
            async move {
                let mut next = pending_rx.recv().await;
                while let Some(p) = next.take() {
                    let mut ack = match resolve(p).await {
                        Ok(ack) => ack,
                        Err(status) => {
                            let _ = ack_tx.send(Err(status)).await;
                            break;
                        }
                    };
                    // Fold in accepted reports whose commit is already known.
                    while ack.rejected.is_empty() {
                        match pending_rx.try_recv() {
                            Ok(PendingAck::Committing(seq, mut rx)) => match rx.try_recv() {
                                Ok(Ok(c)) => {
                                    ack.seq = seq;
                                    ack.event_id = c.event_id();
                                    ack.duplicate = matches!(c, Committed::Duplicate(_));
                                    ack.count += 1;
                                }
                                Ok(Err(e)) => {
                                    next = Some(PendingAck::Failed(unavailable(e)));
                                    break;
                                }
                                Err(oneshot::error::TryRecvError::Empty) => {
                                    next = Some(PendingAck::Committing(seq, rx));
                                    break;
                                }
                                Err(oneshot::error::TryRecvError::Closed) => {
                                    next = Some(PendingAck::Failed(Status::unavailable(
                                        "the hub is shutting down",
                                    )));
                                    break;
                                }
                            },
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if ack_tx.send(Ok(ack)).await.is_err() {
                        break;
                    }
                    if next.is_none() {
                        next = pending_rx.recv().await;
                    }
                }
            }
            .instrument(span),
        );
        let mut response: Response<Self::PublishStream> =
            Response::new(Box::pin(ReceiverStream::new(ack_rx)));
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
        // Admins may follow the stream; they are not hosts of the fleet.
        if !peer.admin {
            self.store
                .touch_host(&peer.name, peer.cert_expires_ms)
                .await
                .map_err(unavailable)?;
        }
        let host = peer.name;
        let after = request.get_ref().after_event_id;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let span = info_span!("subscribe", host = %host, after);
        info!(parent: &span, "subscribed");
        tokio::spawn(
            subscription::run(
                self.store.clone(),
                self.fanout.clone(),
                self.access.clone(),
                host,
                after,
                tx,
                self.shutdown.clone(),
            )
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_status(
        &self,
        request: Request<proto::StatusBatch>,
    ) -> Result<Response<proto::StatusBatchAck>, Status> {
        let host = self.access.host(&request)?.name;
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
        let stored = self.statuses.write(updates).await.map_err(unavailable)?;
        Ok(Response::new(proto::StatusBatchAck {
            stored: stored as u32,
        }))
    }

    async fn list_bans(
        &self,
        request: Request<proto::ListBansRequest>,
    ) -> Result<Response<proto::ListBansResponse>, Status> {
        self.access.member(&request)?;
        let r = request.into_inner();
        let some = |s: String| (!s.is_empty()).then_some(s);
        let filter = BanFilter {
            ip: some(r.ip),
            added_by: some(r.added_by),
            jail: some(r.jail),
            since_ms: (r.since_ms > 0).then_some(r.since_ms),
            after_id: r.after_event_id,
            limit: match r.limit {
                0 => 100,
                n => n.min(10_000) as usize,
            },
        };
        let bans = self.store.list_bans(&filter).await.map_err(unavailable)?;
        Ok(Response::new(proto::ListBansResponse {
            bans: bans.into_iter().map(ban_record).collect(),
        }))
    }

    async fn hosts(
        &self,
        request: Request<proto::HostsRequest>,
    ) -> Result<Response<proto::HostsResponse>, Status> {
        self.access.member(&request)?;
        let hosts = self.store.hosts().await.map_err(unavailable)?;
        let last = self.store.last_event_id().await.map_err(unavailable)?;
        Ok(Response::new(proto::HostsResponse {
            hosts: hosts
                .into_iter()
                .map(|h| {
                    let position = self.fanout.position(&h.name);
                    proto::HostInfo {
                        subscribed: position.is_some(),
                        lag_events: position.map_or(0, |p| last.saturating_sub(p)),
                        first_seen_ms: h.first_seen_ms,
                        last_seen_ms: h.last_seen_ms,
                        enrolled_ms: h.enrolled_ms.unwrap_or(0),
                        cert_expires_ms: h.cert_expires_ms.unwrap_or(0),
                        revoked: h.revoked || self.access.is_revoked(&h.name),
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
        let ip: std::net::IpAddr = request.get_ref().ip.trim().parse().map_err(|_| {
            Status::invalid_argument(format!("{:?} is not an IP address", request.get_ref().ip))
        })?;
        match self.committer.unban(ip.to_string(), admin.clone()).await {
            Ok(Some((event, lifted))) => {
                info!(%ip, by = %admin, event = event.id, lifted, "unbanned");
                Ok(Response::new(proto::UnbanResponse {
                    event_id: event.id,
                    lifted,
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
        let r = request.into_inner();
        let signer = self.signer.as_ref().ok_or_else(|| {
            Status::failed_precondition("this hub has no CA key (--ca-key): enrolment is off")
        })?;
        if !r.name.is_empty() && !crate::ban::valid_host_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a valid host name",
                r.name
            )));
        }
        let token = hex::encode(rand::random::<[u8; 24]>());
        let ttl = if r.ttl_s == 0 { TOKEN_TTL_S } else { r.ttl_s };
        let cert_ttl = if r.cert_ttl_s == 0 {
            crate::ca::HOST_VALIDITY.as_secs()
        } else {
            r.cert_ttl_s
        };
        let expires_ms = super::store::now_ms() + (ttl as i64) * 1000;
        self.store
            .create_token(&super::store::NewToken {
                hash: token_hash(&token),
                name: (!r.name.is_empty()).then_some(r.name.clone()),
                expires_ms,
                cert_ttl_s: cert_ttl as i64,
            })
            .await
            .map_err(unavailable)?;
        // The token itself never reaches a log line.
        info!(by = %admin, name = %r.name, ttl_s = ttl, "enrolment token created");
        Ok(Response::new(proto::CreateTokenResponse {
            token,
            expires_ms,
            ca_sha256: signer.sha256.clone(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<proto::RevokeRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let admin = self.access.admin(&request)?.name;
        let name = request.into_inner().name;
        if !self.store.revoke(&name).await.map_err(unavailable)? {
            return Err(Status::not_found(format!("no host named {name:?}")));
        }
        let streams = self.fanout.position(&name).map_or(0, |_| 1);
        self.access.revoke(&name);
        info!(host = %name, by = %admin, "host revoked");
        Ok(Response::new(proto::RevokeResponse {
            streams_closed: streams,
        }))
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::IssuedCertificate>, Status> {
        let peer = self.access.host(&request)?;
        let issued = sign_csr(
            self.signer.as_deref(),
            &peer.name,
            &request.get_ref().csr_pem,
            crate::ca::HOST_VALIDITY,
        )?;
        self.store
            .touch_host(&peer.name, Some(issued.expires_ms))
            .await
            .map_err(unavailable)?;
        info!(host = %peer.name, expires_ms = issued.expires_ms, "certificate renewed");
        Ok(Response::new(issued))
    }
}

fn ban_record(b: super::store::BanRow) -> proto::BanRecord {
    proto::BanRecord {
        event: Some(b.event.to_proto()),
        lifted: b.lifted,
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
