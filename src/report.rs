//! `banmesh report`: what fail2ban's `actionban` runs (the seed's
//! `add2db.py`). It checks the ban, hands it to the local node over the unix
//! socket and exits 0 once the node has it on disk, or, when no node
//! answers, once it is durable in the node's spool ([`crate::node::spool`],
//! taken into the outbox when the node runs again). It never talks to the
//! hub: fail2ban's action waits only for a local fsync.
//!
//! The `Node/Report` call is [`wire`]: HTTP/2 by hand on std I/O, no
//! runtime, the request in one write; the `report` command, the small
//! `banmesh-report` binary and (async, [`report`]) the
//! benchmark use it, because fail2ban's action waits for the whole run on
//! every ban. `status` still goes through tonic ([`connect`]).
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    ban::{Ban, InvalidBan},
    node::spool,
    proto::{self, node_client::NodeClient},
};

/// Why `banmesh report` failed; fail2ban's action logs the message.
#[derive(Debug, Error)]
pub enum ReportError {
    /// A field of the ban failed validation; nothing was stored.
    #[error("{0}")]
    Invalid(#[from] InvalidBan),
    /// No connection to the node could be made, so it surely does not have
    /// the ban; [`report_or_spool`] spools it then, and returns this only
    /// when the spool cannot be written either.
    #[error(
        "cannot reach the banmesh node at {path}: {reason} (is `banmesh node` running with this --socket?)"
    )]
    NodeDown {
        /// The node's socket.
        path: PathBuf,
        /// Why the connection failed (and why spooling failed, if it did).
        reason: String,
    },
    /// The request reached the node and failed: it refused the ban (outbox
    /// full or unwritable) or failed to answer; never spooled, since the
    /// node may have stored it.
    #[error("node refused the report: {0}")]
    Refused(String),
}

mod hpack;
pub mod wire;

/// A channel to the node's local socket.
pub async fn connect(socket: &Path) -> Result<Channel, ReportError> {
    let path = socket.to_path_buf();
    let down = |reason: String| ReportError::NodeDown {
        path: socket.to_path_buf(),
        reason,
    };
    // The URI is ignored: every connection goes to the socket.
    Endpoint::from_static("http://node.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| down(std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string())))
}

/// Checks and hands one ban to the node; returns the node's sequence number.
///
/// The same call as `banmesh report` makes ([`report_blocking`]: one
/// connection, the request in one write, [`wire`]'s frames), on tokio's
/// socket, so the benchmark's and the demo's in-process reports cost the
/// node what fail2ban's do, without a thread each.
///
/// `NodeDown` only when no connection could be made or the node said it
/// did not take the request: once the request is sent, the node may have
/// stored the ban before failing to answer, so any other failure then is
/// `Refused` (and never spooled, which could store it twice).
pub async fn report(socket: &Path, ban: Ban) -> Result<u64, ReportError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = wire::request(fields(&ban)).map_err(|e| ReportError::Refused(e.to_string()))?;
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| ReportError::NodeDown {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        })?;
    // A node that did not take the request is as good as down (spooled).
    let refused = |e: wire::WireError| match e {
        wire::WireError::NotTaken(_) => ReportError::NodeDown {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        },
        e => ReportError::Refused(e.to_string()),
    };
    let io = |e: std::io::Error| refused(wire::WireError::Io(e));
    stream.write_all(&request).await.map_err(io)?;
    let (read, mut write) = stream.split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut call = wire::Call::default();
    loop {
        let mut head = [0u8; 9];
        reader
            .read_exact(&mut head)
            .await
            .map_err(|e| refused(wire::eof(e)))?;
        let (kind, flags, id, len) = wire::frame_head(&head).map_err(refused)?;
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).await.map_err(io)?;
        match call.frame(kind, flags, id, &payload).map_err(refused)? {
            wire::Step::More(Some(reply)) => write.write_all(&reply).await.map_err(io)?,
            wire::Step::More(None) => {}
            wire::Step::Done(result) => return result.map_err(refused),
        }
    }
}

fn fields(ban: &Ban) -> wire::BanFields<'_> {
    wire::BanFields {
        jail: &ban.jail,
        protocol: &ban.protocol,
        port: &ban.port,
        ip: &ban.ip,
    }
}

/// Hands one ban to the node without an async runtime: one connection,
/// one write, one answer ([`wire`]). `NodeDown` only when no connection
/// could be made.
pub fn report_blocking(socket: &Path, ban: &Ban) -> Result<u64, ReportError> {
    wire::report(socket, fields(ban)).map_err(|e| match e {
        wire::WireError::Connect(e) => ReportError::NodeDown {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        },
        e @ wire::WireError::NotTaken(_) => ReportError::NodeDown {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        },
        e => ReportError::Refused(e.to_string()),
    })
}

/// What happened to a report.
#[derive(Debug)]
pub enum Accepted {
    /// The node has it in its outbox, as this sequence number.
    Queued(u64),
    /// The node is down; the ban waits in this spool file.
    Spooled(PathBuf),
}

/// Hands a ban to the node, or spools it ([`spool::write`]) when the node
/// is not running.
pub async fn report_or_spool(
    socket: &Path,
    data_dir: &Path,
    ban: Ban,
) -> Result<Accepted, ReportError> {
    let result = report(socket, ban.clone()).await;
    spool_if_down(result, data_dir, &ban)
}

/// [`report_or_spool`] without an async runtime (what `banmesh report` runs).
pub fn report_or_spool_blocking(
    socket: &Path,
    data_dir: &Path,
    ban: Ban,
) -> Result<Accepted, ReportError> {
    spool_if_down(report_blocking(socket, &ban), data_dir, &ban)
}

/// Spools `ban` when `result` says no node could be reached.
fn spool_if_down(
    result: Result<u64, ReportError>,
    data_dir: &Path,
    ban: &Ban,
) -> Result<Accepted, ReportError> {
    match result {
        Ok(seq) => Ok(Accepted::Queued(seq)),
        Err(ReportError::NodeDown { path, reason }) => spool::write(data_dir, ban)
            .map(Accepted::Spooled)
            .map_err(|e| ReportError::NodeDown {
                path,
                reason: format!(
                    "{reason}; and cannot spool in {}: {e}",
                    spool::dir(data_dir).display()
                ),
            }),
        Err(e) => Err(e),
    }
}

/// The node's own view of itself.
pub async fn node_status(socket: &Path) -> Result<proto::NodeStatusResponse, ReportError> {
    let mut client = NodeClient::new(connect(socket).await?);
    client
        .status(proto::NodeStatusRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| ReportError::Refused(s.message().to_string()))
}
