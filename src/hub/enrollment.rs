//! The `Enrollment` service: the one call served without a client
//! certificate. A new server proves itself with a one-time token (created
//! by an admin, stored hashed, expiring) and sends a CSR for a key it made
//! itself; it gets back its certificate and the CA certificate. The name
//! it asked for becomes its identity, unless another live host holds it.
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    service::{sign_csr, token_hash},
    store::Store,
};
use crate::{ca::CaSigner, proto};

pub struct EnrollmentService {
    pub store: Arc<dyn Store>,
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
        let valid_for = std::time::Duration::from_secs(enrolled.cert_ttl_s.max(60) as u64);
        let issued = sign_csr(self.signer.as_deref(), &r.name, &r.csr_pem, valid_for)?;
        self.store
            .touch_host(&r.name, Some(issued.expires_ms))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        info!(name = %r.name, expires_ms = issued.expires_ms, "host enrolled");
        Ok(Response::new(issued))
    }
}
