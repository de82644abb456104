//! The `Enrollment` service: the one call served without a client
//! certificate. A new server proves itself with a one-time token (created
//! by an admin, stored hashed, expiring) and sends a CSR for a key it made
//! itself; it gets back a host certificate and the CA certificate. The
//! name it asked for becomes its identity, unless another live host holds
//! it.
//!
//! Anyone who reaches the port can call it, so the order of work is part
//! of the contract:
//! 1. attempts per source address are rate-limited ([`Throttle`]) before
//!    anything is read;
//! 2. sizes, the name ([`crate::hostname`], never one of the hub's own
//!    names) and the CSR are checked; a refused value is logged only
//!    escaped and cut short ([`crate::hostname::shown`]);
//! 3. only then is the token spent (with the name, in one transaction);
//! 4. and only then is anything signed: a host certificate, never with an
//!    IP address or the hub mark, for a lifetime within
//!    [`CERT_TTL_MIN_S`]..=[`CERT_TTL_MAX_S`].
//!
//! The helpers here are shared with the `Hub` service's admin and host
//! calls: [`create_token`] and [`token_name`] (`CreateToken`) and
//! [`sign_csr`] (`Renew`). Tokens are kept only as their SHA-256
//! ([`token_hash`]), so the store never holds a usable token and no log
//! line prints one.
use std::{collections::HashSet, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::store::{NewToken, Store};
pub use super::throttle::Throttle;
use crate::{
    ca::{CaSigner, HostCert, Role},
    clock::now_ms,
    hostname::shown,
    proto,
};

/// Default lifetime of an enrolment token.
pub const TOKEN_TTL_S: u64 = 3600;
/// Shortest token lifetime `CreateToken` accepts, seconds.
pub const TOKEN_TTL_MIN_S: u64 = 1;
/// Longest token lifetime `CreateToken` accepts (30 days), seconds.
pub const TOKEN_TTL_MAX_S: u64 = 30 * 24 * 3600;
/// Shortest certificate lifetime a token may buy, seconds.
pub const CERT_TTL_MIN_S: u64 = 60;
/// Longest certificate lifetime a token may buy (825 days), seconds.
pub const CERT_TTL_MAX_S: u64 = crate::ca::MAX_VALIDITY.as_secs();
/// Longest token an `Enroll` call may carry (ours are 48 hex digits).
const MAX_TOKEN_LEN: usize = 128;
/// Longest CSR an `Enroll` call may carry (ours are under 1 KiB).
const MAX_CSR_LEN: usize = 16 * 1024;

/// SHA-256 of a token, hex: what the store keeps.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The names in the hub's own certificate (common name, DNS names, IP
/// addresses), compared without case: no host may enrol under one, so no
/// host certificate names what nodes dial to reach the hub.
#[derive(Debug, Clone, Default)]
pub struct HubNames(HashSet<String>);

impl HubNames {
    /// The hub's names, from its certificate.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        HubNames(names.into_iter().map(|n| n.to_ascii_lowercase()).collect())
    }

    /// Whether `name` is one of them, in any case.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(&name.to_ascii_lowercase())
    }
}

/// Checks a name a host asks for (or a token is bound to): a host name
/// (see [`crate::hostname`]) that is none of the hub's.
pub fn check_host_name(name: &str, hub: &HubNames) -> Result<(), Status> {
    crate::hostname::validate(name).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if hub.contains(name) {
        return Err(Status::invalid_argument(format!(
            "{} is one of the hub's own names; a host cannot take it",
            shown(name)
        )));
    }
    Ok(())
}

/// The name a new token is bound to: `name`, checked, or none when the
/// admin asked for `any_name` explicitly (and gave no name).
pub fn token_name(name: &str, any_name: bool, hub: &HubNames) -> Result<Option<String>, Status> {
    match (name.is_empty(), any_name) {
        (true, true) => Ok(None),
        (false, false) => check_host_name(name, hub).map(|()| Some(name.to_string())),
        (true, false) => Err(Status::invalid_argument(
            "a token is bound to the one host name it may enrol: give --name, or --any-name \
             to let its holder pick any free name",
        )),
        (false, true) => Err(Status::invalid_argument(
            "give either a name or any_name, not both",
        )),
    }
}

fn parse_csr(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, Status> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Status::invalid_argument(format!("not a valid CSR: {e}")))
}

fn loaded(signer: Option<&CaSigner>) -> Result<&CaSigner, Status> {
    signer.ok_or_else(|| {
        Status::failed_precondition(
            "this hub has no CA key (--ca-key): it cannot sign certificates",
        )
    })
}

fn sign_parsed(
    signer: &CaSigner,
    name: &str,
    csr: &rcgen::CertificateSigningRequestParams,
    valid_for: Duration,
) -> Result<proto::IssuedCertificate, Status> {
    // A host certificate, always: no extra names or addresses, no mark.
    let req = HostCert {
        name,
        sans: &[],
        valid_for,
        role: Role::Host,
    };
    let cert_pem = signer
        .sign(&req, &csr.public_key)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(proto::IssuedCertificate {
        name: name.to_string(),
        cert_pem,
        ca_pem: signer.cert_pem.clone(),
        expires_ms: now_ms() + valid_for.as_millis() as i64,
    })
}

/// Signs a CSR for `name`; the name and validity are the hub's, the CSR
/// only contributes its public key. Always a host certificate.
pub fn sign_csr(
    signer: Option<&CaSigner>,
    name: &str,
    csr_pem: &str,
    valid_for: Duration,
) -> Result<proto::IssuedCertificate, Status> {
    sign_parsed(loaded(signer)?, name, &parse_csr(csr_pem)?, valid_for)
}

/// A new one-time token, its lifetime and when it expires (unix ms).
pub struct Token {
    /// The token itself: shown once, never stored or logged.
    pub token: String,
    /// How long it can be used, seconds.
    pub ttl_s: u64,
    /// When it expires, unix milliseconds.
    pub expires_ms: i64,
}

/// The token and certificate lifetimes asked for, defaulted (0) and
/// checked against their bounds; INVALID_ARGUMENT outside them.
pub fn lifetimes(ttl_s: u64, cert_ttl_s: u64) -> Result<(u64, u64), Status> {
    let ttl = if ttl_s == 0 { TOKEN_TTL_S } else { ttl_s };
    let cert_ttl = if cert_ttl_s == 0 {
        crate::ca::HOST_VALIDITY.as_secs()
    } else {
        cert_ttl_s
    };
    if !(TOKEN_TTL_MIN_S..=TOKEN_TTL_MAX_S).contains(&ttl) {
        return Err(Status::invalid_argument(format!(
            "a token lifetime of {ttl} s is out of range ({TOKEN_TTL_MIN_S} s to 30 days)"
        )));
    }
    if !(CERT_TTL_MIN_S..=CERT_TTL_MAX_S).contains(&cert_ttl) {
        return Err(Status::invalid_argument(format!(
            "a certificate lifetime of {cert_ttl} s is out of range (1 minute to 825 days)"
        )));
    }
    Ok((ttl, cert_ttl))
}

/// Makes a token that enrols one host (`name`, when bound) within `ttl_s`
/// seconds, for a certificate valid `cert_ttl_s` seconds, and stores its
/// hash. 0 means the default for either; out-of-range values are refused
/// (see [`lifetimes`]) before anything is stored.
pub async fn create_token(
    store: &dyn Store,
    name: Option<String>,
    ttl_s: u64,
    cert_ttl_s: u64,
) -> Result<Token, Status> {
    let (ttl, cert_ttl) = lifetimes(ttl_s, cert_ttl_s)?;
    let token = hex::encode(rand::random::<[u8; 24]>());
    let expires_ms = now_ms() + (ttl as i64) * 1000;
    store
        .create_token(&NewToken {
            hash: token_hash(&token),
            name,
            expires_ms,
            cert_ttl_s: cert_ttl as i64,
        })
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(Token {
        token,
        ttl_s: ttl,
        expires_ms,
    })
}

/// The `Enrollment` service (see the module doc for its order of work).
pub struct EnrollmentService {
    /// Tokens and hosts.
    pub store: Arc<dyn Store>,
    /// The CA, when this hub signs enrolments.
    pub signer: Option<Arc<CaSigner>>,
    /// Names no host may take.
    pub hub_names: Arc<HubNames>,
    /// Attempts per source address.
    pub throttle: Arc<Throttle>,
    /// Whether the database serves: an enrolment while it does not is
    /// refused as UNAVAILABLE before anything else (the token is not
    /// touched), as every `Hub` call is.
    pub db: crate::hub::db_health::DbGate,
}

#[tonic::async_trait]
impl proto::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::IssuedCertificate>, Status> {
        self.db.check()?;
        let source = request.remote_addr().map(|a| a.ip());
        if !self.throttle.allow(source) {
            // Not logged above debug: refusals are what a flood is made of.
            debug!(source = ?source, "enrolment attempt over the rate limit");
            return Err(Status::resource_exhausted(
                "too many enrolment attempts from this address; try again in a minute",
            ));
        }
        let r = request.into_inner();
        let refuse = |status: Status| {
            warn!(source = ?source, name = %shown(&r.name), reason = %status.message(),
                "enrolment refused");
            status
        };
        if r.token.len() > MAX_TOKEN_LEN || r.csr_pem.len() > MAX_CSR_LEN {
            return Err(refuse(Status::invalid_argument(
                "the token or the CSR is far longer than any banmesh makes",
            )));
        }
        check_host_name(&r.name, &self.hub_names).map_err(refuse)?;
        let signer = loaded(self.signer.as_deref()).map_err(refuse)?;
        // Parsed (not signed) before the token is spent, so a bad CSR
        // leaves the token usable.
        let csr = parse_csr(&r.csr_pem).map_err(refuse)?;
        let verdict = self
            .store
            .enroll(&token_hash(&r.token), &r.name)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let enrolled =
            verdict.map_err(|refused| refuse(Status::permission_denied(refused.to_string())))?;
        // Tokens stored before lifetimes were bounded may hold any value.
        let valid_for = Duration::from_secs(
            (enrolled.cert_ttl_s.max(0) as u64).clamp(CERT_TTL_MIN_S, CERT_TTL_MAX_S),
        );
        let issued = sign_parsed(signer, &r.name, &csr, valid_for)?;
        // The enrolment has committed (token spent, host recorded): failing
        // now would throw the signed certificate away and burn the name.
        // The expiry is recorded again on the host's first call anyway.
        if let Err(e) = self
            .store
            .touch_host(&r.name, Some(issued.expires_ms))
            .await
        {
            warn!(name = %r.name, error = %e, "cannot record the new host's certificate expiry; it is recorded on its first call");
        }
        info!(source = ?source, name = %r.name, expires_ms = issued.expires_ms, "host enrolled");
        Ok(Response::new(issued))
    }
}
