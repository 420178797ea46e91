//! The node's certificate cache: one SVID per local workload identity,
//! issued on demand when the first connection needs it, renewed ahead of
//! time (at half life, with jitter) by a background task, and re-issued on
//! the spot should a lookup ever find one past its renewal time, so no
//! connection is ever handed an expired certificate.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use rustls_pki_types::CertificateDer;
use tracing::{debug, info, warn};

use super::{
    Identity,
    ca::{Ca, CaError},
    svid::{Svid, SvidInfo},
};

/// The roots peers are verified against. Shared by every TLS config made
/// from the manager, so swapping it applies to the next handshake; running
/// connections, already verified, are untouched.
#[derive(Clone, Default)]
pub struct TrustBundle(Arc<RwLock<Arc<Vec<CertificateDer<'static>>>>>);

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(roots))))
    }

    pub fn roots(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(roots);
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots().len())
            .finish()
    }
}

/// Issues and caches the SVIDs of this node's workloads.
pub struct CertManager {
    ca: Ca,
    lifetime: Duration,
    bundle: TrustBundle,
    cache: Mutex<HashMap<Identity, Arc<Svid>>>,
}

impl CertManager {
    pub fn new(ca: Ca, lifetime: Duration) -> Self {
        let bundle = TrustBundle::new(ca.roots());
        Self {
            ca,
            lifetime,
            bundle,
            cache: Mutex::default(),
        }
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The workload's current SVID, issued now if there is none yet or the
    /// cached one is due for renewal.
    pub fn get(&self, identity: &Identity) -> Result<Arc<Svid>, CaError> {
        let now = SystemTime::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(svid) = cache.get(identity)
            && now < svid.info.renew_at
            && svid.valid_at(now)
        {
            return Ok(svid.clone());
        }
        // Signing a P-256 certificate takes well under a millisecond: doing it
        // under the lock keeps two first connections from issuing twice.
        let svid = Arc::new(self.ca.issue(identity, self.lifetime, now)?);
        debug!(%identity, serial = %svid.info.serial, "issued a certificate");
        cache.insert(identity.clone(), svid.clone());
        Ok(svid)
    }

    /// Drops the certificates of identities no local workload has any more.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|id, _| keep(id));
    }

    /// What `trellis certs` shows, sorted by identity.
    pub fn list(&self) -> Vec<SvidInfo> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut infos: Vec<SvidInfo> = cache.values().map(|s| s.info.clone()).collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// Renews every cached certificate whose time has come; returns how long
    /// until the next one is due.
    pub fn renew_due(&self) -> Duration {
        let now = SystemTime::now();
        let due: Vec<Identity> = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .iter()
                .filter(|(_, s)| s.info.renew_at <= now)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for identity in due {
            match self.get(&identity) {
                Ok(svid) => info!(%identity, serial = %svid.info.serial, "renewed a certificate"),
                Err(e) => warn!(%identity, error = %e, "cannot renew a certificate; retrying"),
            }
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .values()
            .map(|s| {
                s.info
                    .renew_at
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO)
            })
            .min()
            .unwrap_or(Duration::from_secs(60))
    }

    /// Renews certificates ahead of time, for as long as the agent runs.
    pub async fn run_renewals(self: Arc<Self>) {
        loop {
            let wait = self
                .renew_due()
                .clamp(Duration::from_millis(100), Duration::from_secs(60));
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_on_demand_caches_and_renews_when_due() {
        let id = Identity::new("cluster.local", "shop", "web");
        // Caching, with a lifetime far from renewal (X.509 seconds are whole,
        // so a 2 s certificate can be due again within the same second).
        let long = CertManager::new(
            Ca::in_memory("cluster.local").unwrap(),
            Duration::from_secs(3600),
        );
        let first = long.get(&id).unwrap();
        assert!(Arc::ptr_eq(&first, &long.get(&id).unwrap()), "cached");

        let ca = Ca::in_memory("cluster.local").unwrap();
        let m = CertManager::new(ca, Duration::from_secs(2));
        assert!(m.list().is_empty(), "nothing before the first connection");
        let a = m.get(&id).unwrap();
        assert_eq!(m.list().len(), 1);
        // Half of two seconds, ±10%: due within 1.2 s.
        std::thread::sleep(Duration::from_millis(1300));
        m.renew_due();
        let c = m.get(&id).unwrap();
        assert_ne!(a.info.serial, c.info.serial, "renewed");
        assert!(c.valid_at(SystemTime::now()));
        m.retain(|_| false);
        assert!(m.list().is_empty());
    }
}
