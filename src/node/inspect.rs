//! The node's mTLS TCP port for operators (`--listen`): its status, gRPC
//! health and server reflection, for grpcurl. Reports are taken only on
//! the local unix socket, never here.
use std::{net::SocketAddr, sync::Arc};

use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, transport::Server};
use tracing::info;

use super::local::LocalService;
use crate::{
    proto::{self, node_server},
    shutdown::Shutdown,
    tls::TlsFiles,
};

/// The `Node` service as seen over TCP: status yes, report no.
struct Inspect(Arc<LocalService>);

#[tonic::async_trait]
impl node_server::Node for Inspect {
    async fn report(
        &self,
        _request: Request<proto::Ban>,
    ) -> Result<Response<proto::LocalReportResponse>, Status> {
        Err(Status::permission_denied(
            "reports are taken only on the node's local unix socket",
        ))
    }

    async fn status(
        &self,
        request: Request<proto::NodeStatusRequest>,
    ) -> Result<Response<proto::NodeStatusResponse>, Status> {
        self.0.status(request).await
    }
}

/// Serves the inspection port until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    tls: TlsFiles,
    local: Arc<LocalService>,
    shutdown: Shutdown,
) -> Result<(), super::NodeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| super::NodeError::Socket {
            path: addr.to_string().into(),
            source,
        })?;
    let (reflection, reflection_alpha) =
        proto::reflection().map_err(|e| super::NodeError::Inspect(e.to_string()))?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<node_server::NodeServer<Inspect>>()
        .await;
    // The bound address, not the asked one: with port 0 the kernel picks
    // it, and tests and operators read it from this line.
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "inspection port listening (mTLS)");
    // Requests run in the caller's span (the node's, naming its host).
    let span = tracing::Span::current();
    Server::builder()
        .trace_fn(move |_| span.clone())
        .tls_config(tls.server()?)?
        .add_service(node_server::NodeServer::new(Inspect(local)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_incoming_shutdown(
            crate::tls::nodelay(TcpListenerStream::new(listener)),
            shutdown.signalled(),
        )
        .await?;
    Ok(())
}
