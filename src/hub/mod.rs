//! The hub: accepts reports over mutual TLS, commits them to the store, and
//! fans committed events out to every subscribed node.
//!
//! Contract:
//! - A report is acknowledged only after the transaction holding it has
//!   committed; an unacknowledged report stays in the node's outbox.
//! - Events reach subscribers in id order, after their commit; a subscriber
//!   resumes from the last id it applied, with no gap and no duplicate.
//! - The reporting host is the common name of its client certificate.
//! - A slow subscriber is moved back to replay from the store; memory does
//!   not grow with it.
//!
//! # Layout
//! - [`store`]: the store interface and its MySQL and SQLite backends.
//! - [`committer`]: the single writer, batching reports into transactions.
//! - [`fanout`]: the shared ring of live events and the subscriber registry.
//! - [`subscription`]: one subscriber's replay-then-live stream.
//! - [`statuses`]: hosts' statuses, written in groups.
//! - [`access`]: who may call what; [`enrollment`]: the token-for-certificate call.
//! - [`service`]: the gRPC surface.
pub mod access;
pub mod committer;
pub mod enrollment;
pub mod fanout;
pub mod migrate;
pub mod service;
pub mod statuses;
pub mod store;
pub mod subscription;

use std::{path::PathBuf, sync::Arc};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;

use tonic::service::interceptor::InterceptedService;

use crate::{
    ca::{CaError, CaSigner},
    proto::{enrollment_server::EnrollmentServer, hub_server::HubServer},
    shutdown::Shutdown,
    tls::TlsFiles,
};

/// Default address the hub listens on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default data directory (the embedded store lives here).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/banmesh/hub";

#[derive(Debug, Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot load the CA key for enrolment: {0}")]
    Ca(#[from] CaError),
    /// The embedded store's directory or file could not be made private.
    #[error("cannot make the embedded store {path} private: {source}")]
    StoreFile {
        /// The SQLite database file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Everything the hub needs besides its listener.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `mysql://...` or `sqlite:PATH`; `None` means SQLite under `data_dir`.
    pub db: Option<String>,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    /// The CA key, for enrolment and renewal; `None` looks for `ca.key`
    /// beside the CA certificate and turns enrolment off if it is absent.
    pub ca_key: Option<PathBuf>,
}

impl HubConfig {
    /// The CA signer, if this hub has the CA key.
    pub fn signer(&self) -> Result<Option<Arc<CaSigner>>, CaError> {
        let key = match &self.ca_key {
            Some(k) => k.clone(),
            None => {
                let beside = self.tls.ca.with_file_name("ca.key");
                if !beside.exists() {
                    return Ok(None);
                }
                beside
            }
        };
        Ok(Some(Arc::new(CaSigner::load(&self.tls.ca, &key)?)))
    }

    /// The store URL, defaulting to the embedded store in the data dir.
    pub fn db_url(&self) -> String {
        self.db
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("banmesh.db").display()))
    }
}

/// The embedded store holds token hashes and the fleet's names: before
/// SQLite opens it, a missing directory is created 0700 and the database
/// file 0600 (without following a link), and existing files are tightened.
/// SQLite gives the `-wal`, `-shm` and `-journal` files it creates the
/// database file's mode, so this covers them too; no process-wide umask,
/// which would reach every other file of a process (the demo's nodes).
fn keep_private(url: &str) -> Result<(), HubError> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(path) = url.strip_prefix("sqlite:") else {
        return Ok(());
    };
    let path = path.trim_start_matches("//");
    if path.is_empty() || path.starts_with(":memory:") {
        return Ok(());
    }
    let path = std::path::Path::new(path);
    let err = |source| HubError::StoreFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(suffix.is_empty());
        match crate::node::state_file::open(std::path::Path::new(&name), &mut options) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
    }
    Ok(())
}

/// Runs the hub on `listener` until `shutdown` fires; in-flight commits
/// finish and streams end cleanly before it returns.
pub async fn run(
    listener: TcpListener,
    config: HubConfig,
    shutdown: Shutdown,
) -> Result<(), HubError> {
    // Clients without a certificate get through the handshake only to
    // reach `Enrollment`; every other service checks the certificate (see
    // `access`). A certificate from another CA still fails the handshake.
    let tls = config.tls.server_with_chain()?.client_auth_optional(true);
    let signer = config.signer()?;
    if signer.is_none() {
        info!("no CA key: enrolment and renewal are off");
    }
    keep_private(&config.db_url())?;
    let store = store::open(&config.db_url()).await?;
    let access = access::Access::new(store.revoked().await?);
    let fanout = fanout::Fanout::default();
    let committer = committer::Committer::spawn(store.clone(), fanout.clone(), shutdown.clone());
    let enrollment = enrollment::EnrollmentService {
        store: Arc::clone(&store),
        signer: signer.clone(),
    };
    let service = service::HubService {
        statuses: statuses::StatusWriter::spawn(Arc::clone(&store)),
        store: Arc::clone(&store),
        committer,
        fanout,
        access: access.clone(),
        signer,
        shutdown: shutdown.clone(),
    };
    let (reflection, reflection_alpha) = crate::proto::reflection()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<HubServer<service::HubService>>().await;

    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "hub listening");
    Server::builder()
        .tls_config(tls)?
        .add_service(HubServer::new(service))
        .add_service(EnrollmentServer::new(enrollment))
        .add_service(InterceptedService::new(
            health_service,
            access.interceptor(),
        ))
        .add_service(InterceptedService::new(reflection, access.interceptor()))
        .add_service(InterceptedService::new(
            reflection_alpha,
            access.interceptor(),
        ))
        .serve_with_incoming_shutdown(
            crate::tls::nodelay(TcpListenerStream::new(listener)),
            shutdown.signalled(),
        )
        .await?;
    info!("hub stopped");
    Ok(())
}
