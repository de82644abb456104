//! The node daemon: one per server, beside fail2ban.
//!
//! Contract:
//! - A report is on disk (the outbox) before `banmesh report` returns, and
//!   leaves the outbox only once the hub has committed it.
//! - Events from the hub are applied in id order, each once: a ban becomes a
//!   line in `shared.log`, and its status goes back to the hub.
//! - The node's state lives under its data dir, so several nodes can share
//!   a machine.
//!
//! - Every task of a node, and every request to its local socket, runs in a
//!   `node` span carrying `host = NAME`, so the lines of several nodes in
//!   one process (the demo, the benchmark) can be told apart.
//!
//! # Layout
//! One hop of a ban per file. Reports leave the host:
//! - [`local`]: the unix-socket service `banmesh report` talks to.
//! - [`spool`]: where `report` leaves a ban while the node is down, and how
//!   the node takes it in.
//! - [`outbox`]: the durable queue of reports (what `add2db.py` wrote to
//!   MySQL); its record format ([`outbox::record`]) is the spool's too.
//! - [`publisher`]: outbox -> hub.
//!
//! Events arrive and are applied (what `readdb.py` did):
//! - [`subscriber`]: hub -> apply task, from the [`position`] on.
//! - [`position`]: the last applied event id.
//! - [`apply`]: the seed's rules ([`apply::decide`]) carried out through
//!   fail2ban's socket and `shared.log`.
//! - [`shared_log`]: the line format, its writer and tail reader, and the
//!   `failregex` that matches it.
//! - [`ignore`]: fail2ban's ignore list for the shared jail, kept current
//!   by a background task, looked up before a ban is applied.
//! - [`deferred`]: bans put off until an older ban ends.
//! - [`lifts`]: when each fleet ban held in the shared jail is lifted
//!   (fail2ban cannot be told a ban's own end).
//! - [`allow_list`]: this host's saved copy of the fleet allow-list.
//! - [`status_journal`]: every status decided, on disk until the hub has it.
//! - [`status_reporter`]: status journal -> hub.
//!
//! Signals (hints, never on disk, never ahead of a ban):
//! - [`signals`]: failures from fail2ban's log and probes of closed ports
//!   from NFLOG, batched to the hub's `SendSignals`.
//!
//! Around them:
//! - [`link`]: TLS channels to the hubs, the one in use, failover and the
//!   return to this host's first choice, reconnect backoff.
//! - [`renewal`]: renews the node's certificate before it expires.
//! - [`health`]: what `banmesh status` reads at request time.
//! - [`inspect`]: the optional mTLS port for grpcurl (status, health, reflection).
//! - [`state_file`]: how every file above is opened: never through a
//!   symbolic link, readable by its owner only.
pub mod acked_mark;
pub mod allow_list;
pub mod apply;
pub mod deferred;
pub mod health;
pub mod ignore;
pub mod inspect;
pub mod lifts;
pub mod link;
pub mod local;
pub mod memory;
pub mod outbox;
pub mod position;
pub mod publisher;
pub mod renewal;
pub mod shared_log;
pub mod signals;
pub mod spool;
pub mod state_file;
pub mod status_journal;
pub mod status_reporter;
pub mod subscriber;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use thiserror::Error;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tracing::{Instrument, info, warn};

use crate::{proto::node_server::NodeServer, shutdown::Shutdown, tls::TlsFiles};

/// Where `banmesh report` finds the node by default.
pub const DEFAULT_SOCKET: &str = "/run/banmesh/node.sock";
/// Default state directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/banmesh/node";
/// Default log file of fail2ban's `shared` jail.
pub const DEFAULT_SHARED_LOG: &str = "/var/log/shared.log";
/// Default most reports held while the hub is unreachable.
pub const DEFAULT_OUTBOX_LIMIT: usize = 1_000_000;

/// Why the node daemon could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum NodeError {
    /// This host's certificate, key or the CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The outbox (reports not yet acknowledged by the hub) could not be opened or written.
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    /// A hub address is not `https://HOST:PORT`, or the TLS client could not be built.
    #[error(transparent)]
    Link(#[from] link::LinkError),
    /// The saved allow-list is unreadable: starting without it could let
    /// through bans the fleet refuses.
    #[error(transparent)]
    AllowList(#[from] allow_list::LoadError),
    /// The report socket (or the inspection port) could not be bound.
    #[error("cannot listen on {path}: {source} (is another node running with this --socket?)")]
    Socket {
        /// The socket path or address that could not be bound.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The data directory could not be made or its state files opened.
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        /// The file or directory in question.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `shared.log` could not be read back at start (or is a link).
    #[error("cannot use shared.log {path}: {source}")]
    SharedLog {
        /// The `--shared-log` path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The local gRPC server (report socket or inspection port) failed while serving.
    #[error("local gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The inspection port's reflection service could not be built.
    #[error("inspection port setup failed: {0}")]
    Inspect(String),
}

/// Everything the node daemon needs; `banmesh node` builds it from its flags,
/// the demo and the benchmark from [`NodeConfig::in_dir`].
#[derive(Clone)]
pub struct NodeConfig {
    /// Hub addresses, `https://HOST:PORT`, in any order (each host orders
    /// them itself: `link::order`); a value may list several, separated by
    /// commas or spaces. Several for failover.
    pub hubs: Vec<String>,
    /// This host's certificate and key (its identity: the name its bans are
    /// reported under) and the fleet CA.
    pub tls: TlsFiles,
    /// Log file of fail2ban's `shared` jail; bans from other hosts are appended here.
    pub shared_log: PathBuf,
    /// Unix socket `banmesh report` hands bans to.
    pub socket: PathBuf,
    /// State directory: outbox, spool, last applied event, status journal.
    pub data_dir: PathBuf,
    /// Most reports kept while the hub is unreachable; beyond it new reports are refused.
    pub outbox_limit: usize,
    /// fail2ban's control socket; `None` to use the log path only.
    pub fail2ban_socket: Option<PathBuf>,
    /// Share of an existing ban's time left above which a ban is status 2.
    pub recent_ratio: f64,
    /// Ban fresh bans through fail2ban's socket at once, besides the line.
    pub fast_path: bool,
    /// Renew the certificate when less than this is left.
    pub renew_before: Duration,
    /// mTLS TCP address for inspection (status, health, reflection).
    pub listen: Option<std::net::SocketAddr>,
    /// Told of every batch applied (the demo and the benchmark).
    pub observer: Option<apply::Observer>,
    /// Send the hub a failure signal for each failure fail2ban's filters
    /// find here (read from fail2ban's log; needs `fail2ban_socket`).
    pub failure_signals: bool,
    /// Read probes of closed ports from this NFLOG group (see
    /// `banmesh node setup-probes`); `None`: no probe signals.
    pub probe_nflog_group: Option<u16>,
    /// Closed ports whose probes are not reported.
    pub probe_ignore_ports: Vec<u16>,
}

impl NodeConfig {
    /// A node keeping everything under `dir` (socket, `shared.log`, state),
    /// with no fail2ban beside it: the demo's and the benchmark's nodes.
    pub fn in_dir(dir: &Path, hub: &str, tls: TlsFiles, observer: Option<apply::Observer>) -> Self {
        NodeConfig {
            hubs: vec![hub.to_string()],
            tls,
            shared_log: dir.join("shared.log"),
            socket: dir.join("node.sock"),
            data_dir: dir.to_path_buf(),
            outbox_limit: DEFAULT_OUTBOX_LIMIT,
            fail2ban_socket: None,
            recent_ratio: apply::DEFAULT_RECENT_RATIO,
            fast_path: true,
            renew_before: renewal::DEFAULT_RENEW_BEFORE,
            listen: None,
            observer,
            failure_signals: true,
            probe_nflog_group: None,
            probe_ignore_ports: Vec::new(),
        }
    }
}

/// Binds the local socket, replacing a stale one left by a dead node but
/// never stealing one a live node still serves.
fn bind_socket(path: &Path) -> Result<UnixListener, NodeError> {
    let err = |source| NodeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "a live process answers on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Runs the node until `shutdown` fires, then lets its tasks finish their
/// current batch before returning.
pub async fn run(config: NodeConfig, shutdown: Shutdown) -> Result<(), NodeError> {
    let name = config.tls.own_name()?;
    // `hub`: the hubs the node may use, on each of its lines (the one in
    // use is named where it changes: `subscribed to hub`, `publishing to
    // hub`, `moved to another hub`).
    let span = tracing::info_span!("node", host = %name, hub = %config.hubs.join(" "));
    serve(config, name, shutdown, span.clone())
        .instrument(span)
        .await
}

async fn serve(
    config: NodeConfig,
    name: String,
    shutdown: Shutdown,
    span: tracing::Span,
) -> Result<(), NodeError> {
    let data_err = |source| NodeError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(data_err)?;
    let (outbox, recovery) = outbox::Outbox::open(&config.data_dir, config.outbox_limit)?;
    if recovery.skipped_bytes > 0 {
        warn!(
            skipped_bytes = recovery.skipped_bytes,
            kept = recovery.pending,
            "outbox had damaged records; kept every intact one"
        );
    }
    let outbox = Arc::new(outbox);
    let applied = config.data_dir.join("applied");
    let saved = position::Position::saved(&applied).map_err(data_err)?;
    let logged = shared_log::written_tail(&config.shared_log, saved).map_err(|source| {
        NodeError::SharedLog {
            path: config.shared_log.clone(),
            source,
        }
    })?;
    let position = Arc::new(position::Position::load(applied, saved, logged));
    let journal =
        Arc::new(status_journal::StatusJournal::open(&config.data_dir).map_err(data_err)?);
    // Refuse to start on an unreadable list (the applier loads it again).
    allow_list::LocalAllowList::load(&config.data_dir)?;
    let (ignore_tx, ignore) = ignore::channel();
    let applier = apply::Applier::new(
        apply::ApplyConfig {
            shared_log: config.shared_log.clone(),
            fail2ban_socket: config.fail2ban_socket.clone(),
            recent_ratio: config.recent_ratio,
            data_dir: config.data_dir.clone(),
            fast_path: config.fast_path,
            own_name: name.clone(),
        },
        journal.clone(),
        ignore,
    );
    // Without a control socket there is no list to read: every ban goes
    // through shared.log, where fail2ban's filter checks it.
    let ignore_refresh = config.fail2ban_socket.clone().map(|socket| {
        spawn_in(
            &span,
            ignore::refresh::run(socket, ignore_tx, shutdown.clone()),
        )
    });
    let fast_path = applier.fast_path_up.clone();
    crate::metrics::node::attach(outbox.clone(), fast_path.clone());
    let link = link::Link::new(&name, &config.hubs, &config.tls)?;
    info!(hub = %link.hub(), order = %link.hubs().join(" "), "using this host's first choice of hub");
    let connected = Arc::new(AtomicBool::new(false));
    let listener = bind_socket(&config.socket)?;
    // Bans `report` spooled while the node was down join the outbox now
    // that the socket takes new ones; the spool task takes any spooled in
    // between.
    let spool_dir = spool::dir(&config.data_dir);
    spool::log(spool::ingest(&outbox, &spool_dir));
    info!(socket = %config.socket.display(), pending = recovery.pending, applied = position.get(), "node started");

    // Signals have their own queue and sender: a flood of them never
    // waits in front of a ban.
    let (signal_tx, signal_queue) = signals::queue(signals::QUEUE);
    let mut signal_tasks = vec![spawn_in(
        &span,
        signals::run(signal_queue, link.clone(), shutdown.clone()),
    )];
    match (&config.fail2ban_socket, config.failure_signals) {
        (Some(socket), true) => signal_tasks.push(spawn_in(
            &span,
            signals::fail2ban_log::run(socket.clone(), signal_tx.clone(), shutdown.clone()),
        )),
        (None, true) => {
            tracing::debug!(
                "no fail2ban socket: failure signals are off (the node cannot ask fail2ban where it logs)"
            )
        }
        _ => {}
    }
    if let Some(group) = config.probe_nflog_group {
        signal_tasks.push(spawn_in(
            &span,
            signals::probes::run(
                group,
                config.probe_ignore_ports.iter().copied().collect(),
                signal_tx.clone(),
                shutdown.clone(),
            ),
        ));
    }
    let signal_stats = signal_tx.stats().clone();
    drop(signal_tx);

    // A few batches may wait for the apply task; beyond that the
    // subscriber waits, and the hub moves it back to replay.
    let (batch_tx, batch_rx) = tokio::sync::mpsc::channel(4);
    let tasks = [
        spawn_in(
            &span,
            spool::run(outbox.clone(), spool_dir, shutdown.clone()),
        ),
        spawn_in(
            &span,
            publisher::run(
                outbox.clone(),
                link.clone(),
                connected.clone(),
                shutdown.clone(),
            ),
        ),
        spawn_in(
            &span,
            subscriber::run(link.clone(), position.clone(), batch_tx, shutdown.clone()),
        ),
        spawn_in(
            &span,
            apply::run(
                applier,
                batch_rx,
                position.clone(),
                config.observer.clone(),
                shutdown.clone(),
            ),
        ),
        spawn_in(
            &span,
            status_reporter::run(link.clone(), journal, shutdown.clone()),
        ),
        spawn_in(
            &span,
            memory::trim_when_idle(position.clone(), shutdown.clone()),
        ),
        spawn_in(
            &span,
            renewal::run(
                config.tls.clone(),
                name.clone(),
                link.clone(),
                config.renew_before,
                shutdown.clone(),
            ),
        ),
        spawn_in(&span, link::probe::run(link.clone(), shutdown.clone())),
    ];
    let local = local::LocalService {
        name,
        outbox,
        connected,
        position,
        fast_path,
        signals: signal_stats,
        health: health::Health {
            link,
            tls: config.tls.clone(),
            fail2ban_socket: config.fail2ban_socket.clone(),
        },
    };
    let local = Arc::new(local);
    let inspection = match config.listen {
        Some(addr) => Some(tokio::spawn(
            inspect::serve(addr, config.tls.clone(), local.clone(), shutdown.clone())
                .instrument(span.clone()),
        )),
        None => None,
    };
    let request_span = span.clone();
    // The report socket is bound and the outbox loaded.
    crate::systemd::ready("node serving");
    let served = Server::builder()
        .trace_fn(move |_| request_span.clone())
        .add_service(NodeServer::from_arc(local))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.signalled())
        .await;
    if let Some(t) = inspection {
        match t.await {
            Ok(Err(e)) => warn!(error = %e, "inspection listener failed"),
            Err(e) => warn!(error = %e, "inspection listener panicked"),
            Ok(Ok(())) => {}
        }
    }
    for t in tasks.into_iter().chain(ignore_refresh).chain(signal_tasks) {
        if tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .is_err()
        {
            warn!("a node task did not stop within 5s");
        }
    }
    let _ = std::fs::remove_file(&config.socket);
    info!("node stopped");
    Ok(served?)
}

/// Spawns a node task in the node's span, so its lines name the host.
fn spawn_in(
    span: &tracing::Span,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(task.instrument(span.clone()))
}
