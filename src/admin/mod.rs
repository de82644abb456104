//! Operator commands against the hub: what `banmesh unban`, `banmesh bans`
//! and `banmesh hub token|revoke|hosts|migrate|import-seed` do.
//!
//! Each command is a function that does the work and returns a typed
//! result whose `Display` is exactly what the command prints, so the CLI
//! only parses flags, calls, and prints (and tests or the demo can use the
//! values). Calls to the hub go over mTLS with an admin certificate; the
//! hub decides what that certificate may do (see `hub::access`).
//!
//! # Layout
//! - [`allow`]: the fleet allow-list (`allow add|list|remove`) and the
//!   reports it refused (`bans --refused`).
//! - [`bans`]: unban an address fleet-wide; list bans with every host's
//!   status in the seed's table shape.
//! - [`membership`]: enrolment tokens, revocation, the hosts list.
//! - [`data`]: copying a hub's data between stores; importing the seed's
//!   `ip_table`.
pub mod allow;
pub mod bans;
pub mod data;
pub mod membership;

pub use bans::{seed_table, unban};

use thiserror::Error;
use tonic::transport::Channel;

use crate::{
    hub::{migrate::MigrateError, store::StoreError},
    node::link::{self, LinkError},
    proto::hub_client::HubClient,
    tls::TlsFiles,
};

/// Why an operator command failed; each message says what went wrong in
/// terms of the command's flags.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The hub address or the certificate files are unusable.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The hub answered with an error (unreachable, not an admin, not
    /// found, ...): its message is the one to show.
    #[error("{message}")]
    Hub {
        /// The gRPC status code the hub answered with.
        code: tonic::Code,
        /// The hub's message.
        message: String,
    },
    /// `banmesh bans` found nothing.
    #[error("no bans match")]
    NoBans,
    /// A store named by `--from`/`--to` cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `hub migrate` or `hub import-seed` failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

impl From<tonic::Status> for AdminError {
    fn from(s: tonic::Status) -> Self {
        AdminError::Hub {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// A client for the hub's read and admin RPCs.
pub async fn client(hub: &str, tls: &TlsFiles) -> Result<HubClient<Channel>, AdminError> {
    let channel = link::channel(&[hub.to_string()], tls)?;
    Ok(HubClient::new(channel))
}

/// A unix-millisecond time as `YYYY-MM-DD HH:MM[:SS]` UTC ("-" for none).
pub fn utc(ms: i64, seconds: bool) -> String {
    if ms <= 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .map(|t| {
            let minutes = format!(
                "{:04}-{:02}-{:02} {:02}:{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute()
            );
            if seconds {
                format!("{minutes}:{:02}", t.second())
            } else {
                minutes
            }
        })
        .unwrap_or_default()
}
