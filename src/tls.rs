//! Mutual TLS: loading PEM files, building tonic's TLS configs, and reading
//! a peer's identity from its certificate.
//!
//! A host's identity is the common name of the client certificate it
//! presented, verified against the fleet CA during the handshake. No message
//! field can claim another name.
//!
//! The other way round, a client (node, admin command, benchmark) accepts
//! the hub only if its certificate chains to the fleet CA, names the
//! address dialled, *and* carries the hub mark ([`HUB_ROLE`]), which only
//! `banmesh ca issue --hub` puts in a certificate ([`HubVerifier`]). Host
//! certificates often name addresses too (for the inspection port); the
//! mark is what keeps one from serving as the hub.
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// What went wrong with a certificate or key file.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate (or CA) file has no PEM certificate in it.
    #[error("{path} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----')")]
    NoCertificate {
        /// The file in question.
        path: PathBuf,
    },
    /// The key file has no PEM private key in it.
    #[error("{path} holds no PEM private key")]
    NoKey {
        /// The file in question.
        path: PathBuf,
    },
    /// The files were read but rustls or tonic refused them together (for
    /// example a key that does not match the certificate).
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// The three files a host needs to speak mTLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This host's certificate (PEM); its common name is the host's identity.
    pub cert: PathBuf,
    /// This host's private key (PEM).
    pub key: PathBuf,
    /// The fleet CA certificate (PEM) every peer is verified against.
    pub ca: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_cert(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    if CertificateDer::pem_slice_iter(&pem)
        .next()
        .is_none_or(|c| c.is_err())
    {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    if PrivateKeyDer::from_pem_slice(&pem).is_err() {
        return Err(TlsError::NoKey {
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

impl TlsFiles {
    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read_cert(&self.cert)?,
            read_key(&self.key)?,
        ))
    }

    fn ca(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read_cert(&self.ca)?))
    }

    /// Server side: present our certificate and require one signed by the CA.
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?))
    }

    /// The hub's rustls configuration, for its own accept loop: presents
    /// our certificate followed by the CA's (so a new server enrolling can
    /// check it against the pinned CA hash), verifies any client
    /// certificate against the CA, but lets a client present none (only
    /// enrolment accepts that; see `hub::access`), and speaks HTTP/2.
    pub fn hub_server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        use std::sync::Arc;
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            CertificateDer::pem_slice_iter(&read_cert(path)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| TlsError::NoCertificate {
                    path: path.to_path_buf(),
                })
        };
        let ca = certs(&self.ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The pair is read again on SIGHUP (certificate_reload).
        let files = self.clone();
        let key_provider = provider.clone();
        let load = move || -> Result<rustls::sign::CertifiedKey, TlsError> {
            let mut chain = certs(&files.cert)?;
            chain.extend(certs(&files.ca)?);
            let key = PrivateKeyDer::from_pem_slice(&read_key(&files.key)?).map_err(|_| {
                TlsError::NoKey {
                    path: files.key.clone(),
                }
            })?;
            let pair = rustls::sign::CertifiedKey::from_der(chain, key, &key_provider)
                .map_err(|e| TlsError::Config(e.to_string()))?;
            pair.keys_match()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            Ok(pair)
        };
        let resolver = crate::certificate_reload::ReloadingCert::new(
            self.cert.display().to_string(),
            Box::new(move || load().map_err(|e| e.to_string())),
        )
        .map_err(TlsError::Config)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(ca);
        let config = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| config(&e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config(&e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(server))
    }

    /// Client side: present our certificate, and accept the server only
    /// through [`HubVerifier`] (the fleet CA, no system roots, and the hub
    /// mark). Give both to `Endpoint::tls_config_with_verifier`.
    pub fn client(&self) -> Result<(ClientTlsConfig, std::sync::Arc<HubVerifier>), TlsError> {
        let verifier = HubVerifier::new(&self.ca)?;
        Ok((
            ClientTlsConfig::new().identity(self.identity()?),
            std::sync::Arc::new(verifier),
        ))
    }

    /// Every name in our own certificate (common name, DNS names and IP
    /// addresses), as written there.
    pub fn own_names(&self) -> Result<Vec<String>, TlsError> {
        Ok(certificate_names(&self.own_der()?))
    }

    /// Our own certificate (the first in `cert`), parsed from PEM.
    fn own_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        let pem = read_cert(&self.cert)?;
        CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| TlsError::NoCertificate {
                path: self.cert.clone(),
            })
    }

    /// Whether our own certificate carries the hub mark.
    pub fn own_is_hub(&self) -> Result<bool, TlsError> {
        let pem = read_cert(&self.cert)?;
        Ok(CertificateDer::pem_slice_iter(&pem)
            .next()
            .and_then(Result::ok)
            .is_some_and(|der| is_hub(&der)))
    }

    /// The identity in our own certificate.
    pub fn own_name(&self) -> Result<String, TlsError> {
        common_name(&self.own_der()?).ok_or_else(|| TlsError::NoCertificate {
            path: self.cert.clone(),
        })
    }
}

/// The common name of a DER certificate.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The role marker in a certificate's subject (organizational unit): set by
/// `banmesh ca issue --admin`, required by admin RPCs.
pub const ADMIN_ROLE: &str = "banmesh-admin";

/// Whether a DER certificate carries the admin role.
pub fn is_admin(der: &CertificateDer<'_>) -> bool {
    has_unit(der, ADMIN_ROLE)
}

/// The hub mark in a certificate's subject (organizational unit): set by
/// `banmesh ca issue --hub` and by nothing else; clients require it of the
/// hub.
pub const HUB_ROLE: &str = "banmesh-hub";

/// Whether a DER certificate carries the hub mark.
pub fn is_hub(der: &CertificateDer<'_>) -> bool {
    has_unit(der, HUB_ROLE)
}

fn has_unit(der: &CertificateDer<'_>, unit: &str) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| {
        cert.subject()
            .iter_organizational_unit()
            .any(|ou| ou.as_str() == Ok(unit))
    })
}

/// A certificate's common name, DNS names and IP addresses.
pub fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = common_name(der).into_iter().collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    names
}

/// Why a client refuses a hub whose certificate chains to the fleet CA
/// but lacks the hub mark.
pub const NOT_A_HUB: &str = "the hub's certificate lacks the hub mark; re-issue it with \
     `banmesh ca issue --hub` (a host certificate never serves as the hub)";

/// Verifies the hub: WebPKI against the fleet CA (chain, validity, the
/// name dialled), then the hub mark. Without the mark, the handshake fails
/// and the reason is logged here, since the transport error that reaches
/// the caller does not carry it.
#[derive(Debug)]
pub struct HubVerifier {
    inner: std::sync::Arc<rustls::client::WebPkiServerVerifier>,
}

impl HubVerifier {
    /// A verifier trusting the CA certificate(s) in `ca`.
    pub fn new(ca: &Path) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read_cert(ca)?) {
            let cert = cert.map_err(|_| TlsError::NoCertificate {
                path: ca.to_path_buf(),
            })?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(HubVerifier { inner })
    }
}

impl rustls::client::danger::ServerCertVerifier for HubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if !is_hub(end_entity) {
            let name = common_name(end_entity).unwrap_or_default();
            tracing::warn!(certificate = ?name, server = ?server_name, "{NOT_A_HUB}");
            return Err(rustls::Error::General(NOT_A_HUB.into()));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who is calling, from the verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The caller's host name: its certificate's common name.
    pub name: String,
    /// The certificate carries the admin role (OU `banmesh-admin`): it may
    /// unban, issue tokens, revoke.
    pub admin: bool,
    /// When the presented certificate expires, Unix ms; `None` if it could not be parsed.
    pub cert_expires_ms: Option<i64>,
}

/// The caller's identity, or UNAUTHENTICATED without a certificate.
pub fn peer<T>(request: &tonic::Request<T>) -> Result<Peer, tonic::Status> {
    let name = peer_name(request)?;
    let certs = request.peer_certs();
    let first = certs.as_ref().and_then(|c| c.first());
    Ok(Peer {
        name,
        admin: first.is_some_and(is_admin),
        cert_expires_ms: first.and_then(expiry_ms),
    })
}

/// A certificate's notAfter, in unix milliseconds.
pub fn expiry_ms(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() * 1000)
}

/// The verified host name of the caller of an RPC. The handshake already
/// checked the chain; a client may present no certificate (for enrolment)
/// and the local unix socket has none, hence the `Status`. The hub's
/// connections (`hub::listener::Conn`) carry tonic's `TlsConnectInfo`, so
/// `peer_certs` reads the handshake's certificates as with tonic's TLS.
pub fn peer_name<T>(request: &tonic::Request<T>) -> Result<String, tonic::Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    let name = certs
        .first()
        .and_then(common_name)
        .ok_or_else(|| tonic::Status::unauthenticated("client certificate has no common name"))?;
    if !crate::ban::valid_host_name(&name) {
        return Err(tonic::Status::permission_denied(format!(
            "certificate name {name:?} is not a valid host name"
        )));
    }
    Ok(name)
}

/// Accepted connections with Nagle's algorithm off: a gRPC message is one
/// small write, and waiting for the peer's delayed ACK costs ~40 ms.
pub fn nodelay(
    incoming: tokio_stream::wrappers::TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    incoming.map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}
