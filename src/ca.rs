//! The fleet's private certificate authority (`banmesh ca init|issue`).
//!
//! The CA key signs every host certificate; whoever holds it can add hosts,
//! so it is written 0600 and never leaves the machine it was made on. Host
//! certificates carry the host's name as common name (its identity) and as
//! a DNS name, plus any extra names or addresses the host is reached by.
//!
//! Each certificate has one [`Role`]. Only the hub's carries the hub mark
//! (organizational unit [`crate::tls::HUB_ROLE`]), and nodes, admins and
//! enrolling servers accept no other certificate as the hub: a host
//! certificate, enrolled or issued by hand, never passes as the hub even
//! when it names the hub's address. Only `banmesh ca issue --hub` makes
//! one; enrolment and renewal sign host certificates only.
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
/// The longest validity this CA signs (the CA/Browser Forum's old cap);
/// beyond it a lifetime is a typo, and far beyond it, a date overflow.
pub const MAX_VALIDITY: Duration = Duration::from_secs(825 * 24 * 3600);

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
    /// The host name is not usable as an identity (see [`crate::hostname`]).
    #[error(transparent)]
    BadName(#[from] crate::hostname::BadHostName),
    /// A `--san` is neither an IP address nor a valid DNS name.
    #[error("{0:?} is neither an IP address nor a valid DNS name for --san")]
    BadSan(String),
    /// A validity beyond [`MAX_VALIDITY`] (or one that would overflow a date).
    #[error("a validity of {0:?} is out of range (at most 825 days)")]
    BadValidity(Duration),
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

fn validity(params: &mut CertificateParams, valid_for: Duration) -> Result<(), CaError> {
    let now = OffsetDateTime::now_utc();
    // A minute of slack for clocks that are slightly apart across the fleet.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = time::Duration::try_from(valid_for)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or(CaError::BadValidity(valid_for))?;
    Ok(())
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
    validity(&mut params, CA_VALIDITY)?;
    let cert = params.self_signed(&key)?;
    write_new(&paths.key(), &key.serialize_pem(), true)?;
    write_new(&paths.cert(), &cert.pem(), false)
}

/// What a certificate is for; exactly one per certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// A server in the fleet: a client of the hub (publish, subscribe) and
    /// the server of its own inspection port. What enrolment and renewal
    /// sign.
    #[default]
    Host,
    /// An operator: unban, revoke, token create (OU
    /// [`crate::tls::ADMIN_ROLE`]).
    Admin,
    /// The hub: server authentication only, with the hub mark (OU
    /// [`crate::tls::HUB_ROLE`]) that nodes require. `ca issue --hub` only.
    Hub,
}

/// A certificate request: who, reached how, for how long, in which role.
pub struct HostCert<'a> {
    /// The identity: common name and first DNS name (see [`crate::hostname`]).
    pub name: &'a str,
    /// Extra DNS names or IP addresses the holder is reached by.
    pub sans: &'a [String],
    /// Validity from now, at most [`MAX_VALIDITY`].
    pub valid_for: Duration,
    /// Host, admin or hub.
    pub role: Role,
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
        crate::hostname::validate(req.name)?;
        if req.valid_for > MAX_VALIDITY {
            return Err(CaError::BadValidity(req.valid_for));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.name);
        match req.role {
            Role::Host => {}
            Role::Admin => dn.push(DnType::OrganizationalUnitName, crate::tls::ADMIN_ROLE),
            Role::Hub => dn.push(DnType::OrganizationalUnitName, crate::tls::HUB_ROLE),
        }
        params.distinguished_name = dn;
        params
            .subject_alt_names
            .push(SanType::DnsName(req.name.try_into()?));
        for n in req.sans {
            params.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if crate::hostname::validate(n).is_ok() => {
                    SanType::DnsName(n.as_str().try_into()?)
                }
                Err(_) => return Err(CaError::BadSan(crate::hostname::shown(n))),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // The hub is never a client: its certificate cannot call the hub
        // (the handshake requires client authentication usage).
        params.extended_key_usages = match req.role {
            Role::Hub => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::Host | Role::Admin => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        validity(&mut params, req.valid_for)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    fn signed(dir: &Path, name: &str, sans: &[String], role: Role) -> Result<String, CaError> {
        let signer = CaSigner::load(&CaDir(dir.into()).cert(), &CaDir(dir.into()).key())?;
        let key = KeyPair::generate()?;
        let req = HostCert {
            name,
            sans,
            valid_for: HOST_VALIDITY,
            role,
        };
        signer.sign(&req, &key)
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn only_the_hub_role_carries_the_hub_mark() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let ip = ["127.0.0.1".to_string()];
        let hub = der(&signed(dir.path(), "hub", &ip, Role::Hub).unwrap());
        assert!(crate::tls::is_hub(&hub) && !crate::tls::is_admin(&hub));
        assert_eq!(
            crate::tls::certificate_names(&hub),
            ["hub", "hub", "127.0.0.1"]
        );
        for role in [Role::Host, Role::Admin] {
            let c = der(&signed(dir.path(), "web-1", &ip, role).unwrap());
            assert!(!crate::tls::is_hub(&c), "{role:?}");
        }
    }

    #[test]
    fn names_dots_and_lifetimes_out_of_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        for name in [".", "..", "127.0.0.1", "a_b"] {
            assert!(matches!(
                signed(dir.path(), name, &[], Role::Host),
                Err(CaError::BadName(_))
            ));
        }
        assert!(matches!(
            signed(dir.path(), "web-1", &["a b".into()], Role::Host),
            Err(CaError::BadSan(_))
        ));
        let signer =
            CaSigner::load(&dir.path().join("ca.crt"), &dir.path().join("ca.key")).unwrap();
        let key = KeyPair::generate().unwrap();
        for valid_for in [MAX_VALIDITY + Duration::from_secs(1), Duration::MAX] {
            let req = HostCert {
                name: "web-1",
                sans: &[],
                valid_for,
                role: Role::Host,
            };
            assert!(matches!(
                signer.sign(&req, &key),
                Err(CaError::BadValidity(_))
            ));
        }
    }
}
