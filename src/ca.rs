//! The fleet's private certificate authority (`banmesh ca init|issue`).
//!
//! The CA key signs every host certificate; whoever holds it can add hosts,
//! so it is written 0600 and never leaves the machine it was made on. Host
//! certificates carry the host's name as common name (its identity) and as
//! a DNS name, plus any extra names or addresses the host is reached by.
use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use thiserror::Error;
use time::OffsetDateTime;

/// How long the CA is valid by default.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a host certificate is valid by default.
pub const HOST_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Why a CA command failed; each message says what to do next.
#[derive(Debug, Error)]
pub enum CaError {
    /// A CA or host file is already there; nothing is ever overwritten, so an
    /// existing CA key (and every certificate it signed) cannot be lost by
    /// mistake.
    #[error("{0} already exists; refusing to overwrite it (remove it first if you mean to)")]
    Exists(PathBuf),
    /// A key, certificate or the directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA's certificate or key could not be read (usually: no `ca init` in this directory yet).
    #[error("cannot read {path}: {source} (run `banmesh ca init --dir ...` first)")]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The host name is not usable as an identity (certificate common name and
    /// `host_<name>` column).
    #[error("host name {0:?} must be 1-253 characters of letters, digits, '-', '.', '_'")]
    BadName(String),
    /// Generating, parsing or signing a key or certificate failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
}

/// Paths of a CA directory.
pub struct CaDir(pub PathBuf);

impl CaDir {
    /// The CA certificate, `DIR/ca.crt`: what every host verifies its peers against.
    pub fn cert(&self) -> PathBuf {
        self.0.join("ca.crt")
    }
    /// The CA private key, `DIR/ca.key` (0600): whoever holds it can add hosts.
    pub fn key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    /// A host certificate issued by `ca issue`, `DIR/NAME.crt`.
    pub fn host_cert(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.crt"))
    }
    /// A host private key written by `ca issue`, `DIR/NAME.key` (0600).
    pub fn host_key(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.key"))
    }

    /// The files a host named `name` presents (its pair and this CA).
    pub fn host_files(&self, name: &str) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            cert: self.host_cert(name),
            key: self.host_key(name),
            ca: self.cert(),
        }
    }
}

/// Writes a new file, 0600 for keys, refusing to replace an existing one.
pub fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    if path.exists() {
        return Err(CaError::Exists(path.to_path_buf()));
    }
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    // A minute of slack for clocks that are slightly apart across the fleet.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + valid_for;
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "banmesh fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// `banmesh ca init`: a new CA in `dir`.
pub fn init(dir: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let paths = CaDir(dir.to_path_buf());
    for p in [paths.cert(), paths.key()] {
        if p.exists() {
            return Err(CaError::Exists(p));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = ca_params();
    validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    write_new(&paths.key(), &key.serialize_pem(), true)?;
    write_new(&paths.cert(), &cert.pem(), false)
}

/// A host certificate request: who, reached how, for how long.
pub struct HostCert<'a> {
    /// The host's identity: the certificate's common name, and a DNS name.
    pub name: &'a str,
    /// Extra DNS names or IP addresses the host is reached by (parsed as an IP when they are one).
    pub sans: &'a [String],
    /// How long the certificate is valid from now.
    pub valid_for: Duration,
    /// Grants the admin role (unban and other fleet-wide calls).
    pub admin: bool,
}

/// A loaded CA, ready to sign host certificates (the CLI's `ca issue`, and
/// the hub's enrolment and renewal).
pub struct CaSigner {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// SHA-256 of the CA certificate's DER, hex: what `enroll` pins.
    pub sha256: String,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CaSigner")
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// SHA-256 of a PEM certificate's first DER, hex.
pub fn fingerprint(cert_pem: &str) -> Option<String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    use sha2::Digest;
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()?
        .ok()?;
    Some(hex::encode(sha2::Sha256::digest(der.as_ref())))
}

impl CaSigner {
    /// Loads the CA certificate and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let ca_key = KeyPair::from_pem(&read(key)?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, ca_key)?;
        let sha256 =
            fingerprint(&cert_pem).ok_or(CaError::Cert(rcgen::Error::CouldNotParseCertificate))?;
        Ok(CaSigner {
            issuer,
            cert_pem,
            sha256,
        })
    }

    /// Signs a certificate for a host's public key; returns PEM. The
    /// identity comes from `req`, never from whatever the key's owner asked.
    pub fn sign(
        &self,
        req: &HostCert<'_>,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, CaError> {
        if !crate::ban::valid_host_name(req.name) {
            return Err(CaError::BadName(req.name.to_string()));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.name);
        if req.admin {
            dn.push(DnType::OrganizationalUnitName, crate::tls::ADMIN_ROLE);
        }
        params.distinguished_name = dn;
        let mut names = vec![req.name.to_string()];
        names.extend(req.sans.iter().cloned());
        for n in names {
            params.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.try_into()?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, req.valid_for);
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }
}

/// A new private key and a CSR for it (what `enroll` and renewal send);
/// the key never leaves the host.
pub fn key_and_csr(name: &str) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// Issues a host's certificate unless the CA dir already holds one; its
/// files either way (the demo's, the benchmark's and the tests' fleets).
pub fn issue_once(dir: &Path, req: &HostCert<'_>) -> Result<crate::tls::TlsFiles, CaError> {
    let paths = CaDir(dir.to_path_buf());
    if !paths.host_cert(req.name).exists() {
        issue(dir, req)?;
    }
    Ok(paths.host_files(req.name))
}

/// `banmesh ca issue`: a key and certificate for a host, written beside the CA.
pub fn issue(dir: &Path, req: &HostCert<'_>) -> Result<(PathBuf, PathBuf), CaError> {
    let paths = CaDir(dir.to_path_buf());
    let (crt, key_path) = (paths.host_cert(req.name), paths.host_key(req.name));
    for p in [&crt, &key_path] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    let signer = CaSigner::load(&paths.cert(), &paths.key())?;
    let key = KeyPair::generate()?;
    let pem = signer.sign(req, &key)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&crt, &pem, false)?;
    Ok((crt, key_path))
}
