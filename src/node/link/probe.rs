//! Back to a preferred hub: while the link is not on this host's first
//! choice, every [`EVERY`] (with jitter, so a fleet does not probe in
//! step) it asks the hubs it prefers to the one in use, best first,
//! whether they serve (the gRPC health check, over the same mTLS channel
//! the node's calls use), and moves back to the first that does.
//!
//! Why: failover moves a dead hub's nodes to their next choices; without
//! a way back, a restarted hub would stay empty and the others carry its
//! share for good.
use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::debug;

use super::Link;
use crate::{proto::hub_server::SERVICE_NAME, shutdown::Shutdown};

/// Mean time between probes while off the first choice.
pub const EVERY: Duration = Duration::from_secs(30);
/// How long a probe waits for its answer (the connect timeout is 1 s).
const ANSWER: Duration = Duration::from_secs(3);

/// Probes the preferred hubs while the link is off its first choice,
/// until `shutdown`.
pub async fn run(link: Link, mut shutdown: Shutdown) {
    let mut moves = link.0.moves.subscribe();
    loop {
        let off_first = async { moves.wait_for(|h| *h != 0).await.is_ok() };
        tokio::select! {
            ok = off_first => if !ok { return },
            _ = shutdown.recv() => return,
        }
        let wait = EVERY.mul_f64(rand::random_range(0.67..=1.33));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.recv() => return,
        }
        for better in 0..link.in_use() {
            if serves(link.channel_to(better)).await {
                link.prefer(better);
                break;
            }
            debug!(hub = %link.hubs()[better], "preferred hub does not serve yet");
        }
    }
}

/// Whether the hub on `channel` answers that it serves.
async fn serves(channel: Channel) -> bool {
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: SERVICE_NAME.to_string(),
    };
    matches!(
        tokio::time::timeout(ANSWER, client.check(request)).await,
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
    )
}
