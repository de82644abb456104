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
//! - [`service`]: the `Hub` gRPC surface: thin handlers that check the
//!   caller ([`access`]), convert protos at the edge and forward.
//! - [`publish`]: one node's `Publish` stream and its ack contract (an ack
//!   means durable; acks fold).
//! - [`subscription`]: one subscriber's replay-then-live stream.
//! - [`committer`]: the single writer, batching reports into transactions.
//! - [`fanout`]: the shared ring of live events and the subscriber registry.
//! - [`rate_limit`]: the per-host report limit that contains a flooding
//!   host (its reports wait in its outbox), on [`throttle`]'s buckets.
//! - [`fleet`]: the fleet's own addresses, which the allow-list always holds.
//! - [`signals`]: hosts' observations (failures, closed-port probes)
//!   aggregated into fleet bans by thresholds (`hub policy`).
//! - [`statuses`]: hosts' statuses, written in groups.
//! - [`db_health`]: the database health watch: a hub whose database is
//!   lost stops serving cleanly, or moves to another `--db` address.
//! - [`access`]: who may call what, and revocation.
//! - [`allow`]: the allow-list check on every report, and its admin RPCs.
//! - [`enrollment`]: the token-for-certificate `Enrollment` service, and the
//!   token and signing helpers `CreateToken` and `Renew` share;
//!   [`throttle`]: its per-source rate limit.
//! - [`store`]: the store interface and its MySQL and SQLite backends.
//! - [`migrate`]: copying a hub's data between stores, and importing the
//!   seed's `ip_table`.
//! - [`run`] (here): wires them together behind one mTLS listener, with a
//!   tracing span per request naming the RPC and the caller.
//! - [`listener`]: the accept loop: TLS handshakes with a deadline, and
//!   limits on connections that carry no client certificate.
pub mod access;
pub mod allow;
pub mod committer;
pub mod db_health;
pub mod enrollment;
pub mod fanout;
pub mod fleet;
pub mod ladder;
pub mod listener;
pub mod migrate;
pub mod presence;
pub mod publish;
pub mod rate_limit;
pub mod service;
pub mod signals;
pub mod statuses;
pub mod store;
pub mod subscription;
pub mod throttle;
use std::{path::PathBuf, sync::Arc};

use thiserror::Error;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::{
    codegen::http,
    service::interceptor::InterceptedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::{info, warn};

use crate::{
    ca::{CaError, CaSigner},
    proto::{enrollment_server::EnrollmentServer, served::hub_server::HubServer},
    shutdown::Shutdown,
    tls::TlsFiles,
};

/// Default address the hub listens on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Most concurrent HTTP/2 streams on one connection (RFC 9113 suggests
/// no fewer than 100).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Largest message a fleet member may send the hub (a batch of 10,000
/// statuses is ~60 kB; tonic's default is 4 MiB).
pub const MAX_HUB_MESSAGE: usize = 1 << 20;
/// Largest enrolment request (token, name and CSR are well under 4 kB).
pub const MAX_ENROLL_MESSAGE: usize = 32 * 1024;
/// Default data directory (the embedded store lives here).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/banmesh/hub";

/// Why the hub could not start, or stopped with an error.
#[derive(Debug, Error)]
pub enum HubError {
    /// The store could not be opened, migrated or read at start.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The hub's certificate, key or the CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The gRPC server failed while serving.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service (for grpcurl) could not be built.
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// `--ca-key` (or `ca.key` beside the CA) exists but could not be loaded,
    /// so enrolment and renewal cannot be signed.
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

/// How often a hub sharing its store with other hubs re-reads the revoked
/// names (issue 18: a revocation ends the host's streams on every hub
/// within a second).
pub const REVOCATION_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Everything the hub needs besides its listener.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `mysql://...` or `sqlite:PATH`; `None` means SQLite under `data_dir`.
    /// Several MySQL URLs separated by commas are addresses of one database
    /// (Galera nodes), used in order (see [`db_health`]).
    pub db: Option<String>,
    /// Directory of the embedded store (used when `db` is `None`).
    pub data_dir: PathBuf,
    /// The hub's certificate and key, and the fleet CA every client is verified against.
    pub tls: TlsFiles,
    /// The CA key, for enrolment and renewal; `None` looks for `ca.key`
    /// beside the CA certificate and turns enrolment off if it is absent.
    pub ca_key: Option<PathBuf>,
    /// The per-host report limit (`--report-rate`, `--report-burst`).
    pub report_limit: rate_limit::ReportLimit,
    /// The fleet signal policy: thresholds, bound, dry run, rate limit.
    pub signals: signals::SignalConfig,
    /// The escalation ladder every ban's term is decided by (`--ladder`,
    /// `--ladder-window`); `None` (`--ladder off`): bans carry no fleet
    /// term and are not coalesced, as before the ladder.
    pub ladder: Option<ladder::Ladder>,
    /// How often an idle committer reads the store for events other hubs
    /// committed (`--peer-poll`), to publish them to this hub's
    /// subscribers; `None`: never (one hub, or SQLite).
    pub peer_poll: Option<std::time::Duration>,
    /// This hub's name (`--name`), recorded in the store against each host
    /// subscribed through it; `None`: this machine's host name (the hub
    /// certificate's name if that is unknown). Hubs sharing a store need
    /// distinct names.
    pub name: Option<String>,
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

/// The span every request to the hub runs in (streams too: their tasks are
/// spawned inside it): the RPC's full name and, when the caller presented
/// a certificate (all but `Enrollment`), its name. The name is read here
/// for the log only; `access` decides what the caller may do.
fn request_span(request: &http::Request<()>) -> tracing::Span {
    let rpc = request.uri().path().trim_start_matches('/');
    let span = tracing::info_span!("rpc", rpc = %rpc, peer = tracing::field::Empty);
    let peer = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .and_then(|certs| certs.first().and_then(crate::tls::common_name));
    if let Some(name) = peer {
        span.record("peer", tracing::field::display(name));
    }
    span
}

/// Opens the store `url` names and, for MySQL, starts its health watch;
/// the embedded store's gate never closes.
async fn open_store(
    url: &str,
    shutdown: &Shutdown,
) -> Result<(Arc<dyn store::Store>, db_health::DbGate), HubError> {
    if url.starts_with("mysql:") {
        let mysql = Arc::new(store::mysql::MysqlStore::open(url).await?);
        let addresses = mysql.addresses();
        info!(at = %addresses[mysql.current()], addresses = addresses.len(), "database");
        let gate = db_health::watch(mysql.clone(), shutdown.clone());
        Ok((mysql, gate))
    } else {
        Ok((store::open(url).await?, db_health::DbGate::open()))
    }
}

/// The gRPC health service follows the database: NOT_SERVING while the
/// hub refuses calls for want of it.
async fn follow_db(mut db: db_health::DbGate, health: tonic_health::server::HealthReporter) {
    loop {
        if db.serving() {
            health.set_serving::<HubServer<service::HubService>>().await;
        } else {
            health
                .set_not_serving::<HubServer<service::HubService>>()
                .await;
        }
        if !db.changed().await {
            return;
        }
    }
}

/// Runs the hub on `tcp` until `shutdown` fires; in-flight commits
/// finish and streams end cleanly before it returns.
pub async fn run(tcp: TcpListener, config: HubConfig, shutdown: Shutdown) -> Result<(), HubError> {
    // Clients without a certificate get through the handshake only to
    // reach `Enrollment`; every other service checks the certificate (see
    // `access`). A certificate from another CA still fails the handshake.
    // `listener` bounds what such clients can hold open.
    let tls = config.tls.hub_server_config()?;
    let limits = listener::Limits::for_nofile(listener::raise_nofile_limit());
    let signer = config.signer()?;
    if signer.is_none() {
        warn!(
            "no CA key (--ca-key, beside --ca by default): enrolment and renewal are off, and host certificates expire unrenewed"
        );
    }
    keep_private(&config.db_url())?;
    if !config.tls.own_is_hub()? {
        // Nodes refuse this hub; say why where the operator looks first.
        tracing::error!(cert = %config.tls.cert.display(), "{}", crate::tls::NOT_A_HUB);
    }
    let hub_names = Arc::new(enrollment::HubNames::new(config.tls.own_names()?));
    let (store, db) = open_store(&config.db_url(), &shutdown).await?;
    crate::metrics::hub::get().database_up.set(1);
    let name: Arc<str> = match config.name.clone() {
        Some(n) => n,
        None => Some(crate::enroll::host_name())
            .filter(|n| !n.is_empty())
            .map_or_else(|| config.tls.own_name(), Ok)?,
    }
    .into();
    // No stream is open yet: a claim under this name is an earlier run's.
    let released = store.release_hub(&name).await?;
    info!(hub = %name, released, "hub name (recorded against the hosts subscribed here)");
    if config.db_url().starts_with("mysql:") {
        // Other hubs may share the store: they tell this hub's claims on
        // hosts from a dead hub's by its heartbeat.
        tokio::spawn(presence::run(store.clone(), name.clone(), shutdown.clone()));
    }
    let access = access::Access::new(store.revoked().await?).recording_admins(store.clone());
    if config.db_url().starts_with("mysql:") && config.peer_poll.is_some() {
        // Other hubs may share the store: their revocations end streams
        // here within this period.
        access.follow_store(store.clone(), REVOCATION_POLL, shutdown.clone());
    }
    let fanout = fanout::Fanout::default();
    crate::metrics::hub::attach(fanout.clone());
    let fleet = fleet::FleetAddrs::from_rows(store.fleet_addresses().await?);
    if let Ok(addr) = tcp.local_addr().map(|a| a.ip())
        && !addr.is_unspecified()
        && fleet.note(addr, "hub")
    {
        store.note_fleet_address(&addr.to_string(), "hub").await?;
    }
    let committer = committer::Committer::spawn(
        store.clone(),
        fanout.clone(),
        fleet.clone(),
        config.ladder.clone(),
        config
            .peer_poll
            .filter(|_| config.db_url().starts_with("mysql:")),
        db.clone(),
        shutdown.clone(),
    );
    let signals = signals::Signals::spawn(
        config.signals,
        store.clone(),
        committer.clone(),
        fleet.clone(),
        shutdown.clone(),
    );
    match &config.ladder {
        Some(l) => info!(ladder = %l, "escalation ladder"),
        None => info!("escalation ladder off: no fleet terms, no coalescing"),
    }
    let enrollment = enrollment::EnrollmentService {
        store: Arc::clone(&store),
        signer: signer.clone(),
        hub_names: hub_names.clone(),
        throttle: Arc::default(),
        db: db.clone(),
    };
    info!(rate = %config.report_limit.rate, burst = config.report_limit.burst, "per-host report limit");
    let service = service::HubService {
        limits: Arc::new(rate_limit::ReportLimits::new(config.report_limit)),
        statuses: statuses::StatusWriter::spawn(Arc::clone(&store), {
            let fanout = fanout.clone();
            Arc::new(move || fanout.head())
        }),
        store: Arc::clone(&store),
        committer,
        signals,
        fanout,
        fleet,
        access: access.clone(),
        signer,
        hub_names,
        shutdown: shutdown.clone(),
        ladder: config.ladder.clone(),
        db: db.clone(),
        name,
    };
    let (reflection, reflection_alpha) = crate::proto::reflection()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<HubServer<service::HubService>>().await;
    tokio::spawn(follow_db(db, health));

    info!(addr = %tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(), "hub listening");
    // The store is open and the listener bound (connections wait in its
    // backlog until `serve` below takes them).
    crate::systemd::ready("hub serving");
    Server::builder()
        .trace_fn(request_span)
        // A node needs a handful of streams per connection (Publish,
        // Subscribe, statuses, a unary call); without a cap one certificate
        // could open thousands and hyper keeps ~17 kB for each.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(listener::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(listener::KEEPALIVE_TIMEOUT))
        // Interceptors run on the headers, before tonic reads a body: a
        // client without a fleet certificate (or a revoked one) is turned
        // away before it can make the hub buffer a message. Handlers still
        // check the role each call needs.
        .add_service(InterceptedService::new(
            HubServer::new(service).max_decoding_message_size(MAX_HUB_MESSAGE),
            access.interceptor(),
        ))
        // Open to clients without a certificate: its messages (a token, a
        // CSR, a name) are small, so the buffer tonic fills before the
        // handler's checks is too.
        .add_service(
            EnrollmentServer::new(enrollment).max_decoding_message_size(MAX_ENROLL_MESSAGE),
        )
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
            listener::incoming(tcp, tls, limits, shutdown.clone()),
            shutdown.signalled(),
        )
        .await?;
    info!("hub stopped");
    Ok(())
}
