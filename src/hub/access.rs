//! Who may call what on the hub.
//!
//! The TLS handshake has already checked any certificate presented against
//! the fleet CA. Presenting none is allowed only for enrolment; every other
//! service goes through [`Access`]: a certificate is required, its name
//! must not be revoked, and admin calls need the admin role. Revocation is
//! a watch value, so open streams of a revoked name end at once.
//!
//! Names are one namespace for hosts and admins, compared without regard
//! to letter case (as MySQL compares them): the revoked set holds names in
//! lower case, so revoking `NODE-B` refuses `node-b`'s certificate, and
//! revoking an admin's name refuses that admin. Every admin name seen on a
//! call is recorded in the store, where enrolment refuses it as a host
//! name.
//!
//! What stays open: the hub learns an admin's name only when it first
//! calls (admin certificates are issued offline by `banmesh ca issue
//! --admin`; the name is written a few milliseconds after that call, off
//! its path), so a host may still enrol under the name of an admin that
//! has never called, and an admin certificate may be issued under an
//! enrolled host's name. Either way the two share the name, and revoking
//! it refuses both: issue admin names that no host will take (`ops-…`).
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tonic::{Request, Status};

use super::store::Store;
use crate::tls::{Peer, peer};

/// The revoked names, shared by handlers, streams and interceptors, and
/// the admin names already recorded.
#[derive(Clone)]
pub struct Access {
    /// Lower-case names.
    revoked: Arc<watch::Sender<Arc<HashSet<String>>>>,
    admins: Arc<AdminNames>,
}

/// Admin names recorded in the store by this process (lower case), so a
/// name is written once, on its first call, not on every call.
#[derive(Default)]
struct AdminNames {
    store: Option<Arc<dyn Store>>,
    seen: Mutex<HashSet<String>>,
}

impl AdminNames {
    fn saw(self: &Arc<Self>, name: &str) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let key = name.to_ascii_lowercase();
        if !self.seen.lock().unwrap().insert(key.clone()) {
            return;
        }
        // Off the request's path: the call never waits for the write. A
        // failed write is forgotten, so the next call tries again.
        let (me, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = store.record_admin(&name).await {
                tracing::warn!(admin = %name, error = %e, "cannot record an admin name; retried on its next call");
                me.seen.lock().unwrap().remove(&key);
            }
        });
    }
}

impl Access {
    /// Access refusing the `revoked` names (any letter case).
    pub fn new(revoked: impl IntoIterator<Item = String>) -> Self {
        let set: HashSet<String> = revoked
            .into_iter()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        Access {
            revoked: Arc::new(watch::channel(Arc::new(set)).0),
            admins: Arc::default(),
        }
    }

    /// Records every admin name seen on a call in `store` (see the
    /// module doc).
    pub fn recording_admins(self, store: Arc<dyn Store>) -> Self {
        Access {
            admins: Arc::new(AdminNames {
                store: Some(store),
                seen: Mutex::default(),
            }),
            ..self
        }
    }

    fn check(&self, p: Peer) -> Result<Peer, Status> {
        if self.is_revoked(&p.name) {
            let what = if p.admin { "admin" } else { "host" };
            return Err(Status::permission_denied(format!(
                "{what} {} has been revoked",
                p.name
            )));
        }
        if p.admin {
            self.admins.saw(&p.name);
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

    /// Whether `name` (in any letter case) is revoked.
    pub fn is_revoked(&self, name: &str) -> bool {
        self.revoked.borrow().contains(&name.to_ascii_lowercase())
    }

    /// Adds a name (in any letter case) to the revoked set, waking every
    /// stream.
    pub fn revoke(&self, name: &str) {
        let key = name.to_ascii_lowercase();
        self.revoked.send_modify(|set| {
            let mut next = (**set).clone();
            next.insert(key);
            *set = Arc::new(next);
        });
    }

    /// Follows revocations made through other hubs sharing the store:
    /// every `every`, the store's revoked names not yet known here are
    /// revoked here too, ending their streams on this hub. Runs until
    /// `shutdown`; a failed read is retried on the next tick. The same
    /// tick keeps this hub's `ip_table` view up to hosts that joined
    /// through other hubs (`Store::refresh_view`).
    pub fn follow_store(
        &self,
        store: Arc<dyn Store>,
        every: std::time::Duration,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let access = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.recv() => return,
                }
                // Hosts that joined through other hubs get their `ip_table`
                // column on this hub's database node too (under Galera each
                // hub keeps its own node's view: `schema::rebuild_view`).
                if let Err(e) = store.refresh_view().await {
                    tracing::debug!(error = %e, "cannot refresh the ip_table view; next tick retries");
                }
                match store.revoked().await {
                    Ok(names) => {
                        for name in names.iter().filter(|n| !access.is_revoked(n)) {
                            tracing::info!(%name, "revoked through another hub: ending its streams here");
                            access.revoke(name);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read revoked names; next tick retries")
                    }
                }
            }
        });
    }

    /// Resolves once `name` is revoked (in any letter case): streams
    /// select on it.
    pub fn revoked(&self, name: &str) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut rx = self.revoked.subscribe();
        let key = name.to_ascii_lowercase();
        async move {
            let _ = rx.wait_for(|set| set.contains(&key)).await;
        }
    }

    /// An interceptor for services that have no checks of their own
    /// (health, reflection): a fleet certificate, not revoked.
    pub fn interceptor(&self) -> impl tonic::service::Interceptor + Clone + use<> {
        let access = self.clone();
        move |request: Request<()>| access.member(&request).map(|_| request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_are_revoked_in_any_letter_case() {
        let access = Access::new(["Mail".to_string()]);
        assert!(access.is_revoked("mail") && access.is_revoked("MAIL"));
        let ended = access.revoked("node-b");
        access.revoke("NODE-B");
        tokio::time::timeout(std::time::Duration::from_secs(1), ended)
            .await
            .expect("a stream of node-b ends when NODE-B is revoked");
        assert!(access.is_revoked("Node-B"));
    }
}
