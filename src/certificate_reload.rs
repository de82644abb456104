//! The hub's own certificate, swappable while it runs: after a renewal
//! (`certbot`-style, or `banmesh ca issue --hub` again), `SIGHUP` re-reads
//! the certificate and key files and new TLS handshakes present the new
//! pair; open connections keep the one they began with. A pair that does
//! not load (missing, unparsable, key not matching) is refused and the
//! old one stays.
use std::sync::{Arc, Mutex, RwLock, Weak};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Loads the chain the hub presents: its certificate, then the CA's.
pub type Loader = Box<dyn Fn() -> Result<CertifiedKey, String> + Send + Sync>;

/// A server certificate that [`reload_all`] can replace.
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
    load: Loader,
    /// What the log calls it (the certificate's path).
    name: String,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("name", &self.name)
            .finish()
    }
}

/// Every live reloading certificate of this process (a hub has one).
static LIVE: Mutex<Vec<Weak<ReloadingCert>>> = Mutex::new(Vec::new());

impl ReloadingCert {
    /// Loads the pair now (an error fails the start) and registers it for
    /// [`reload_all`].
    pub fn new(name: String, load: Loader) -> Result<Arc<Self>, String> {
        let first = load()?;
        let cert = Arc::new(ReloadingCert {
            current: RwLock::new(Arc::new(first)),
            load,
            name,
        });
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|w| w.strong_count() > 0);
            live.push(Arc::downgrade(&cert));
        }
        Ok(cert)
    }

    fn reload(&self) -> Result<(), String> {
        let next = (self.load)()?;
        *self.current.write().map_err(|e| e.to_string())? = Arc::new(next);
        Ok(())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// Re-reads every live server certificate: per certificate, its name and
/// whether the new pair took (the old one stays when it did not).
pub fn reload_all() -> Vec<(String, Result<(), String>)> {
    let live: Vec<Arc<ReloadingCert>> = match LIVE.lock() {
        Ok(l) => l.iter().filter_map(Weak::upgrade).collect(),
        Err(_) => return Vec::new(),
    };
    live.iter().map(|c| (c.name.clone(), c.reload())).collect()
}
