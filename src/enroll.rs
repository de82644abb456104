//! `banmesh enroll`: a new server joins the fleet with one command.
//!
//! It makes its private key here (written 0600; the key never leaves the
//! machine), connects to the hub over TLS that must verify against the CA
//! whose SHA-256 the operator pinned (the way `kubeadm join` pins its CA),
//! and trades a one-time token and a CSR for its certificate. A wrong hash,
//! or a certificate without the hub mark (a host's, even one naming the
//! hub's address), fails the TLS handshake, so nothing (not even the
//! token) is sent.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper_util::rt::TokioIo;
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::WebPkiServerVerifier,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use sha2::Digest;
use thiserror::Error;
use tokio::net::TcpStream;
use tonic::transport::{Endpoint, Uri};

use crate::{
    ca,
    proto::{self, enrollment_client::EnrollmentClient},
};

/// Why an enrolment failed; each says what the operator can do about it.
#[derive(Debug, Error)]
pub enum EnrollError {
    /// `--ca-sha256` is not 64 hex digits (colons allowed); checked before
    /// anything is sent.
    #[error("--ca-sha256 must be the 64 hex digits printed by `banmesh hub token create`")]
    BadPin,
    /// The host name (given, or this machine's) is not one banmesh accepts as an identity.
    #[error("{0}; pass --name")]
    BadName(crate::hostname::BadHostName),
    /// `host.key` already exists in the target directory; enrolling never
    /// overwrites an identity.
    #[error("{0} already exists: this machine is enrolled (move it away to enrol again)")]
    AlreadyEnrolled(PathBuf),
    /// `--hub` has no `:PORT` or is not a usable address.
    #[error("--hub {0:?} must be HOST:PORT")]
    BadHub(String),
    /// The hub's host part is neither an IP address nor a valid DNS name for TLS.
    #[error("bad hub host name {0:?}: use a DNS name or an IP address")]
    BadHubName(String),
    /// rustls refused the client configuration (no usable protocol version).
    #[error("cannot set up TLS to the hub: {0}")]
    Tls(#[from] rustls::Error),
    /// No connection to the hub: refused, timed out, or a failed handshake.
    /// The TLS handshake failing on the pinned CA lands here too.
    #[error("cannot reach the hub at {hub}: {reason}")]
    Unreachable {
        /// The hub as given with `--hub`.
        hub: String,
        /// The innermost error's message (the most specific cause).
        reason: String,
    },
    /// Making this host's key or CSR failed.
    #[error("cannot make this host's key: {0}")]
    Key(#[from] ca::CaError),
    /// The enrol call failed, usually the hub refusing: an unknown, used or
    /// expired token, a name taken or revoked, or no CA key on the hub.
    #[error("the hub refused the enrolment: {0}")]
    Refused(String),
    /// The hub's issued CA certificate does not hash to the pin; nothing is written.
    #[error("the hub returned a CA certificate that does not match --ca-sha256")]
    CaMismatch,
    /// Writing the key, certificate or CA file (or making the directory) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Accepts the hub only if its chain carries the pinned CA, the hub's
/// certificate verifies against it, and it carries the hub mark.
#[derive(Debug)]
struct PinnedCa {
    sha256: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(sha2::Sha256::digest(c.as_ref())) == self.sha256)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the hub's CA does not match --ca-sha256; nothing was sent".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = verifier.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        if !crate::tls::is_hub(end_entity) {
            return Err(rustls::Error::General(format!(
                "{}; nothing was sent",
                crate::tls::NOT_A_HUB
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    /// `HOST:PORT` (an `https://` prefix is accepted).
    pub hub: String,
    /// The one-time token from `banmesh hub token create` (sent once, stored by
    /// the hub only as a hash).
    pub token: String,
    /// Hex SHA-256 of the fleet CA certificate: the hub's chain must carry it.
    pub ca_sha256: String,
    /// The identity to enrol as: the new certificate's common name.
    pub name: String,
    /// Where `host.key` (0600), `host.crt` and `ca.crt` are written.
    pub dir: PathBuf,
}

/// Files written by a successful enrolment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The new host certificate (`DIR/host.crt`).
    pub cert: PathBuf,
    /// The new private key (`DIR/host.key`, 0600), made here and never sent.
    pub key: PathBuf,
    /// The fleet CA certificate (`DIR/ca.crt`), checked against the pin.
    pub ca: PathBuf,
    /// When the issued certificate expires, Unix ms.
    pub expires_ms: i64,
}

/// This machine's host name, the default identity.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Writes a private key 0600 and a certificate, replacing older ones
/// atomically (used by enrolment and renewal).
pub fn write_identity(
    key: &Path,
    key_pem: &str,
    cert: &Path,
    cert_pem: &str,
) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    for (path, text, mode) in [(key, key_pem, 0o600), (cert, cert_pem, 0o644)] {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

fn split_hub(hub: &str) -> Result<(String, String), EnrollError> {
    let addr = hub.trim_start_matches("https://").trim_end_matches('/');
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| EnrollError::BadHub(hub.to_string()))?;
    Ok((host.trim_matches(['[', ']']).to_string(), addr.to_string()))
}

/// Enrols this machine: see the module doc.
pub async fn enroll(req: &EnrollRequest) -> Result<Enrolled, EnrollError> {
    let pin = req.ca_sha256.trim().to_ascii_lowercase().replace(':', "");
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EnrollError::BadPin);
    }
    crate::hostname::validate(&req.name).map_err(EnrollError::BadName)?;
    let files = Enrolled {
        cert: req.dir.join("host.crt"),
        key: req.dir.join("host.key"),
        ca: req.dir.join("ca.crt"),
        expires_ms: 0,
    };
    if files.key.exists() {
        return Err(EnrollError::AlreadyEnrolled(files.key.clone()));
    }
    let (host, addr) = split_hub(&req.hub)?;
    let server_name: ServerName<'static> = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => {
            ServerName::try_from(host.clone()).map_err(|_| EnrollError::BadHubName(host.clone()))?
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            sha256: pin.clone(),
            provider,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| EnrollError::BadHub(req.hub.clone()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, addr, server_name) =
                (connector.clone(), addr.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = s.to_string();
                src = s.source();
            }
            EnrollError::Unreachable {
                hub: req.hub.clone(),
                reason: msg,
            }
        })?;

    let (key, csr) = ca::key_and_csr(&req.name)?;
    let issued = EnrollmentClient::new(channel)
        .enroll(proto::EnrollRequest {
            token: req.token.clone(),
            name: req.name.clone(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| EnrollError::Refused(s.message().to_string()))?
        .into_inner();
    if ca::fingerprint(&issued.ca_pem).as_deref() != Some(pin.as_str()) {
        return Err(EnrollError::CaMismatch);
    }
    let write = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EnrollError::Write { path, source }
    };
    std::fs::create_dir_all(&req.dir).map_err(write(&req.dir))?;
    write_identity(
        &files.key,
        &key.serialize_pem(),
        &files.cert,
        &issued.cert_pem,
    )
    .map_err(write(&req.dir))?;
    std::fs::write(&files.ca, &issued.ca_pem).map_err(write(&files.ca))?;
    Ok(Enrolled {
        expires_ms: issued.expires_ms,
        ..files
    })
}
