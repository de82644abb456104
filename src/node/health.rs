//! What `banmesh status` asks the node beyond its counters: its hubs (the
//! one in use marked), its certificate's expiry, whether fail2ban answers, and the last problem it
//! logged. Read at request time, so the answer is current.
use std::{path::PathBuf, time::Duration};

use super::link::Link;
use crate::tls::TlsFiles;

/// How long a status request waits for fail2ban's ping.
const FAIL2BAN_PING: Duration = Duration::from_secs(2);

/// The node's configuration the status reports on.
pub struct Health {
    /// The link to the hubs: their order and the one in use.
    pub link: Link,
    /// This host's certificate files (expiry read from `cert`).
    pub tls: TlsFiles,
    /// fail2ban's control socket; `None` with `--no-fail2ban-socket`.
    pub fail2ban_socket: Option<PathBuf>,
}

impl Health {
    /// The hubs in this host's order of preference, the one in use marked
    /// with a leading `*`, space-separated (`NodeStatusResponse.hubs`).
    pub fn hubs(&self) -> String {
        self.link.status_text()
    }

    /// When this host's certificate expires (unix ms), read from its file
    /// now (renewal replaces it).
    pub fn cert_expires_ms(&self) -> Option<i64> {
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        let pem = std::fs::read(&self.tls.cert).ok()?;
        let der = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
        crate::tls::expiry_ms(&der)
    }

    /// Whether fail2ban answers a ping on its socket (false without one).
    pub async fn fail2ban_reachable(&self) -> bool {
        let Some(path) = &self.fail2ban_socket else {
            return false;
        };
        let mut client = crate::fail2ban::client::Fail2ban::new(path);
        let up = matches!(
            tokio::time::timeout(FAIL2BAN_PING, client.ping()).await,
            Ok(Ok(()))
        );
        client.close().await;
        up
    }
}
