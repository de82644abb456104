//! The node's local gRPC service, on its unix socket: what `banmesh report`
//! (run by fail2ban's action) talks to.
//!
//! Contract: `Report` answers with a sequence number only once the ban is
//! durable in the outbox; an invalid ban is `InvalidArgument` and changes
//! nothing; a full outbox is `ResourceExhausted` (and `report` then exits
//! non-zero rather than spooling: the node is up). The socket is the trust
//! boundary: it is created 0660, so only root (and the socket's group) can
//! report.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{outbox::Outbox, position::Position};
use crate::{
    ban::Ban,
    proto::{self, node_server},
};

/// The node's local `Node` gRPC service on the unix socket: `report` and `status`.
pub struct LocalService {
    /// This host's name (its certificate's common name), shown in `status`.
    pub name: String,
    /// Where a reported ban is made durable before `report` is answered.
    pub outbox: Arc<Outbox>,
    /// Whether the subscriber's stream to the hub is up now.
    pub connected: Arc<AtomicBool>,
    /// The last event from the hub this node applied.
    pub position: Arc<Position>,
    /// Whether the last ban through fail2ban's socket worked.
    pub fast_path: Arc<AtomicBool>,
    /// The signal path's counters: whether signals flow, how many dropped.
    pub signals: Arc<super::signals::SignalStats>,
    /// Hubs, certificate, fail2ban: read when `status` asks.
    pub health: super::health::Health,
}

#[tonic::async_trait]
impl node_server::Node for LocalService {
    async fn report(
        &self,
        request: Request<proto::Ban>,
    ) -> Result<Response<proto::LocalReportResponse>, Status> {
        let ban = Ban::from_proto(Some(request.get_ref()))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ip = &ban.ip;
        // Written inline and answered once the outbox's group fsync covers
        // it: no thread per report (see `outbox::sync`).
        let seq = self.outbox.append_async(&ban).await.map_err(|e| {
            warn!(error = %e, %ip, "report not queued");
            Status::resource_exhausted(e.to_string())
        })?;
        let pending = self.outbox.pending();
        if pending * 10 >= self.outbox.limit() * 8 {
            warn!(
                pending,
                limit = self.outbox.limit(),
                "outbox is over 80% full; is the hub reachable?"
            );
        }
        info!(%ip, seq, "report queued");
        Ok(Response::new(proto::LocalReportResponse { seq }))
    }

    async fn status(
        &self,
        _request: Request<proto::NodeStatusRequest>,
    ) -> Result<Response<proto::NodeStatusResponse>, Status> {
        Ok(Response::new(proto::NodeStatusResponse {
            name: self.name.clone(),
            hub_connected: self.connected.load(Ordering::Relaxed),
            outbox_pending: self.outbox.pending() as u64,
            last_applied_event_id: self.position.get(),
            fast_path: self.fast_path.load(Ordering::Relaxed),
            signals_flowing: self.signals.flowing.load(Ordering::Relaxed),
            signals_dropped: self.signals.dropped(),
            hubs: self.health.hubs(),
            received_event_id: self.position.received(),
            cert_expires_ms: self.health.cert_expires_ms().unwrap_or(0),
            fail2ban_socket_used: self.health.fail2ban_socket.is_some(),
            fail2ban_reachable: self.health.fail2ban_reachable().await,
            last_error: crate::logging::last_problem()
                .map(|p| p.1)
                .unwrap_or_default(),
            last_error_ms: crate::logging::last_problem().map_or(0, |p| p.0),
        }))
    }
}
