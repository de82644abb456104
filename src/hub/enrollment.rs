//! The `Enrollment` service: the one call served without a client
//! certificate. A new server proves itself with a one-time token (created
//! by an admin, stored hashed, expiring) and sends a CSR for a key it made
//! itself; it gets back its certificate and the CA certificate. The name
//! it asked for becomes its identity, unless another live host holds it.
//!
//! The helpers here are shared with the `Hub` service's admin and host
//! calls: [`create_token`] (`CreateToken`) and [`sign_csr`] (`Renew`).
//! Tokens are kept only as their SHA-256 ([`token_hash`]), so the store
//! never holds a usable token and no log line prints one.
use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::store::{NewToken, Store};
use crate::{
    ca::{CaSigner, HostCert},
    clock::now_ms,
    proto,
};

/// Default lifetime of an enrolment token.
pub const TOKEN_TTL_S: u64 = 3600;

/// SHA-256 of a token, hex: what the store keeps.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Signs a CSR for `name`; the name and validity are the hub's, the CSR
/// only contributes its public key.
pub fn sign_csr(
    signer: Option<&CaSigner>,
    name: &str,
    csr_pem: &str,
    valid_for: Duration,
) -> Result<proto::IssuedCertificate, Status> {
    let signer = signer.ok_or_else(|| {
        Status::failed_precondition(
            "this hub has no CA key (--ca-key): it cannot sign certificates",
        )
    })?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Status::invalid_argument(format!("not a valid CSR: {e}")))?;
    let req = HostCert {
        name,
        sans: &[],
        valid_for,
        admin: false,
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

/// A new one-time token, its lifetime and when it expires (unix ms).
pub struct Token {
    /// The token to hand to `banmesh enroll --token`; the hub keeps only its hash.
    pub token: String,
    /// How long it can be used, seconds.
    pub ttl_s: u64,
    /// When it stops being accepted, Unix ms.
    pub expires_ms: i64,
}

/// Makes a token that enrols one host (`name`, when bound) within `ttl_s`
/// seconds, for a certificate valid `cert_ttl_s` seconds, and stores its
/// hash. 0 means the default for either.
pub async fn create_token(
    store: &dyn Store,
    name: Option<String>,
    ttl_s: u64,
    cert_ttl_s: u64,
) -> Result<Token, Status> {
    let token = hex::encode(rand::random::<[u8; 24]>());
    let ttl = if ttl_s == 0 { TOKEN_TTL_S } else { ttl_s };
    let cert_ttl = if cert_ttl_s == 0 {
        crate::ca::HOST_VALIDITY.as_secs()
    } else {
        cert_ttl_s
    };
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

/// The `Enrollment` gRPC service: the one call a client without a certificate may make.
pub struct EnrollmentService {
    /// Where tokens are checked and spent and the new host recorded.
    pub store: Arc<dyn Store>,
    /// The CA; `None` when this hub has no CA key, so every enrolment is refused.
    pub signer: Option<Arc<CaSigner>>,
}

#[tonic::async_trait]
impl proto::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::IssuedCertificate>, Status> {
        let r = request.into_inner();
        info!(name = %r.name, "enrolment attempt");
        if !crate::ban::valid_host_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a valid host name",
                r.name
            )));
        }
        // Check the CSR before spending the token on it.
        let probe = sign_csr(
            self.signer.as_deref(),
            &r.name,
            &r.csr_pem,
            crate::ca::HOST_VALIDITY,
        )?;
        drop(probe);
        let verdict = self
            .store
            .enroll(&token_hash(&r.token), &r.name)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let enrolled = verdict.map_err(|refused| {
            warn!(name = %r.name, reason = %refused, "enrolment refused");
            Status::permission_denied(refused.to_string())
        })?;
        let valid_for = Duration::from_secs(enrolled.cert_ttl_s.max(60) as u64);
        let issued = sign_csr(self.signer.as_deref(), &r.name, &r.csr_pem, valid_for)?;
        self.store
            .touch_host(&r.name, Some(issued.expires_ms))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        info!(name = %r.name, expires_ms = issued.expires_ms, "host enrolled");
        Ok(Response::new(issued))
    }
}
