//! The node renews its own certificate before it expires, over its current
//! mTLS connection, with no operator step: a new key made here (0600), a
//! CSR to the hub's `Renew`, the new pair written atomically, and new
//! channels to every hub for every later connection (streams already open
//! keep theirs until they next reconnect).
use std::{path::PathBuf, time::Duration};

use thiserror::Error;
use tracing::{info, warn};

use super::link::Link;
use crate::{ca, enroll::write_identity, proto, shutdown::Shutdown, tls::TlsFiles};

/// Renew when less than this is left (a third of the default 90 days).
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the certificate's expiry is checked.
const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Retry delay after a failed renewal.
const RETRY: Duration = Duration::from_secs(60);

fn expires_ms(tls: &TlsFiles) -> Option<i64> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let pem = std::fs::read(&tls.cert).ok()?;
    let der = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    crate::tls::expiry_ms(&der)
}

/// Why a renewal failed; the node keeps its current certificate and tries
/// again after [`RETRY`].
#[derive(Debug, Error)]
pub enum RenewError {
    /// Making the new key or its CSR failed.
    #[error("cannot make a new key: {0}")]
    Key(#[from] ca::CaError),
    /// The `Renew` call failed: the hub unreachable, this host revoked, or the
    /// hub without a CA key.
    #[error(
        "the hub did not renew the certificate: {0} (is the hub reachable, and this host not revoked?)"
    )]
    Refused(String),
    /// The new key and certificate could not be written; the old pair stays in place.
    #[error("cannot write the renewed key and certificate to {cert}: {source}")]
    Write {
        /// The certificate path being replaced.
        cert: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Trades a fresh key's CSR for a certificate and writes both; returns
/// when the new certificate expires.
async fn renew(tls: &TlsFiles, name: &str, link: &Link) -> Result<i64, RenewError> {
    let (key, csr) = ca::key_and_csr(name)?;
    let route = link.current();
    let issued = proto::hub_client::HubClient::new(route.channel.clone())
        .renew(proto::RenewRequest { csr_pem: csr })
        .await
        .map_err(|s| {
            // A hub gone moves the link; the retry goes to the next one.
            link.failed(&route, &s);
            RenewError::Refused(s.message().to_string())
        })?
        .into_inner();
    link.succeeded(&route);
    write_identity(&tls.key, &key.serialize_pem(), &tls.cert, &issued.cert_pem).map_err(
        |source| RenewError::Write {
            cert: tls.cert.clone(),
            source,
        },
    )?;
    Ok(issued.expires_ms)
}

/// Checks the certificate every [`CHECK_EVERY`] and renews it when less
/// than `renew_before` is left; new connections then use the new one.
pub async fn run(
    tls: TlsFiles,
    name: String,
    link: Link,
    renew_before: Duration,
    mut shutdown: Shutdown,
) {
    loop {
        let mut wait = CHECK_EVERY;
        let left_ms = expires_ms(&tls).map(|e| e - crate::clock::now_ms());
        if left_ms.is_some_and(|l| l < renew_before.as_millis() as i64) {
            match renew(&tls, &name, &link).await {
                Ok(expires_ms) => match link.reload(&tls) {
                    Ok(()) => info!(expires_ms, "certificate renewed"),
                    Err(e) => warn!(error = %e, "renewed certificate cannot be loaded"),
                },
                Err(e) => {
                    warn!(error = %e, "certificate renewal failed; retrying");
                    wait = RETRY;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.recv() => return,
        }
    }
}
