//! The `Hub` gRPC service: converts protos at the edge and forwards to the
//! committer, the store and the fan-out. No state of its own.
use std::{pin::Pin, sync::Arc};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::{
    committer::Committer,
    fanout::Fanout,
    store::{BanFilter, Committed, NewReport, Store, StoreError},
    subscription,
};
use crate::{
    ban::{Ban, Status as BanStatus},
    proto::{self, hub_server},
    shutdown::Shutdown,
    tls::{peer_name, require_admin},
};

/// Acks that may wait for the node to read them.
const ACK_QUEUE: usize = 1024;
/// Events buffered per subscriber between the replay/live task and gRPC.
const SUBSCRIBER_QUEUE: usize = 256;
/// Most statuses in one `ReportStatus` call.
const MAX_STATUS_BATCH: usize = 10_000;

pub struct HubService {
    pub store: Arc<dyn Store>,
    pub committer: Committer,
    pub fanout: Fanout,
    pub shutdown: Shutdown,
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// An ack in the making: answered at once (a refused report) or when the
/// committer has it durable. Kept in arrival order.
enum PendingAck {
    Ready(proto::Ack),
    Committing(u64, oneshot::Receiver<Result<Committed, Arc<StoreError>>>),
}

#[tonic::async_trait]
impl hub_server::Hub for HubService {
    type PublishStream = BoxStream<proto::Ack>;
    type SubscribeStream = BoxStream<proto::Event>;

    async fn publish(
        &self,
        request: Request<Streaming<proto::Report>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let host = peer_name(&request)?;
        self.store.touch_host(&host).await.map_err(unavailable)?;
        let span = info_span!("publish", host = %host);
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) = mpsc::channel::<PendingAck>(ACK_QUEUE);
        let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
        let committer = self.committer.clone();
        let mut shutdown = self.shutdown.clone();

        // Reader: validate and queue each report with the committer, so many
        // are in flight at once and share a transaction.
        tokio::spawn(
            async move {
                loop {
                    let next = tokio::select! {
                        m = inbound.next() => m,
                        _ = shutdown.recv() => None,
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

        // Writer: answer in arrival order once each is durable. A failed
        // commit ends the stream with UNAVAILABLE; the node keeps the report
        // in its outbox and sends it again after reconnecting.
        tokio::spawn(
            async move {
                while let Some(p) = pending_rx.recv().await {
                    let ack = match p {
                        PendingAck::Ready(ack) => Ok(ack),
                        PendingAck::Committing(seq, rx) => match rx.await {
                            Ok(Ok(c)) => Ok(proto::Ack {
                                seq,
                                event_id: c.event_id(),
                                duplicate: matches!(c, Committed::Duplicate(_)),
                                rejected: String::new(),
                            }),
                            Ok(Err(e)) => Err(unavailable(e)),
                            Err(_) => Err(Status::unavailable("the hub is shutting down")),
                        },
                    };
                    let failed = ack.is_err();
                    if ack_tx.send(ack).await.is_err() || failed {
                        break;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let host = peer_name(&request)?;
        self.store.touch_host(&host).await.map_err(unavailable)?;
        let after = request.get_ref().after_event_id;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let span = info_span!("subscribe", host = %host, after);
        info!(parent: &span, "subscribed");
        tokio::spawn(
            subscription::run(
                self.store.clone(),
                self.fanout.clone(),
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
        let host = peer_name(&request)?;
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
                    .map(|s| (u.event_id, s))
                    .ok_or_else(|| Status::invalid_argument(format!("unknown status {}", u.status)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stored = self
            .store
            .set_statuses(&host, &updates)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::StatusBatchAck {
            stored: stored as u32,
        }))
    }

    async fn list_bans(
        &self,
        request: Request<proto::ListBansRequest>,
    ) -> Result<Response<proto::ListBansResponse>, Status> {
        peer_name(&request)?;
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
            bans: bans
                .into_iter()
                .map(|b| proto::BanRecord {
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
                })
                .collect(),
        }))
    }

    async fn hosts(
        &self,
        request: Request<proto::HostsRequest>,
    ) -> Result<Response<proto::HostsResponse>, Status> {
        peer_name(&request)?;
        let hosts = self.store.hosts().await.map_err(unavailable)?;
        Ok(Response::new(proto::HostsResponse {
            hosts: hosts
                .into_iter()
                .map(|h| proto::HostInfo {
                    subscribed: self.fanout.is_subscribed(&h.name),
                    name: h.name,
                    first_seen_ms: h.first_seen_ms,
                    last_seen_ms: h.last_seen_ms,
                })
                .collect(),
        }))
    }

    async fn unban(
        &self,
        request: Request<proto::UnbanRequest>,
    ) -> Result<Response<proto::UnbanResponse>, Status> {
        let admin = require_admin(&request)?;
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
}
