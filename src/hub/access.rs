//! Who may call what on the hub.
//!
//! The TLS handshake has already checked any certificate presented against
//! the fleet CA. Presenting none is allowed only for enrolment; every other
//! service goes through [`Access`]: a certificate is required, its name
//! must not be revoked, and admin calls need the admin role. Revocation is
//! a watch value, so open streams of a revoked host end at once.
use std::{collections::HashSet, sync::Arc};

use tokio::sync::watch;
use tonic::{Request, Status};

use crate::tls::{Peer, peer};

/// The revoked names, shared by handlers, streams and interceptors.
#[derive(Clone)]
pub struct Access {
    revoked: Arc<watch::Sender<Arc<HashSet<String>>>>,
}

impl Access {
    /// Starts with `revoked` (the store's revoked names, read at start).
    pub fn new(revoked: impl IntoIterator<Item = String>) -> Self {
        let set: HashSet<String> = revoked.into_iter().collect();
        Access {
            revoked: Arc::new(watch::channel(Arc::new(set)).0),
        }
    }

    fn check(&self, p: Peer) -> Result<Peer, Status> {
        if self.revoked.borrow().contains(&p.name) {
            return Err(Status::permission_denied(format!(
                "host {} has been revoked",
                p.name
            )));
        }
        Ok(p)
    }

    /// Any fleet member (host or admin) that is not revoked.
    pub fn member<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        self.check(peer(request)?)
    }

    /// A host (not an admin): the only kind that publishes and reports statuses.
    pub fn host<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let p = self.member(request)?;
        if p.admin {
            return Err(Status::permission_denied(
                "admin certificates inspect and administer; they do not report bans",
            ));
        }
        Ok(p)
    }

    /// An admin: unban, revoke, token create.
    pub fn admin<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let p = self.member(request)?;
        if !p.admin {
            return Err(Status::permission_denied(format!(
                "{} is not an admin: this call needs a certificate from `banmesh ca issue --admin`",
                p.name
            )));
        }
        Ok(p)
    }

    /// Whether `name` is revoked now, revocations since the hub started included.
    pub fn is_revoked(&self, name: &str) -> bool {
        self.revoked.borrow().contains(name)
    }

    /// Adds a name to the revoked set, waking every stream.
    pub fn revoke(&self, name: &str) {
        self.revoked.send_modify(|set| {
            let mut next = (**set).clone();
            next.insert(name.to_string());
            *set = Arc::new(next);
        });
    }

    /// Resolves once `name` is revoked: streams select on it.
    pub fn revoked(&self, name: &str) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut rx = self.revoked.subscribe();
        let name = name.to_string();
        async move {
            let _ = rx.wait_for(|set| set.contains(&name)).await;
        }
    }

    /// An interceptor for services that have no checks of their own
    /// (health, reflection): a fleet certificate, not revoked.
    pub fn interceptor(&self) -> impl tonic::service::Interceptor + Clone + use<> {
        let access = self.clone();
        move |request: Request<()>| access.member(&request).map(|_| request)
    }
}
