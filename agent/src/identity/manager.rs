//! The node's certificate cache: one SVID per local workload identity,
//! issued on demand when the first connection needs it, renewed ahead of
//! time (at half life, with jitter) by a background task, and re-issued on
//! the spot should a lookup ever find one past its renewal time, so no
//! connection is ever handed an expired certificate. With an external
//! issuer (`--cert-dir`) the cache is the issuer's files, reloaded when they
//! change. Either way the watched folder is polled every [`POLL`], and a new
//! trust bundle applies to the next handshake.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use rustls_pki_types::CertificateDer;
use tracing::{debug, info, warn};

use super::{
    Identity,
    ca::{CA_BUNDLE, CA_CERT, CA_KEY, Ca, CaError},
    files::FileSvids,
    svid::{Svid, SvidInfo},
    watch::{Failure, fingerprint},
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

/// Where certificates come from.
enum Source {
    /// The built-in CA signs them; `dir` (`--ca-dir`) is watched for a new
    /// signing pair or trust bundle.
    Ca {
        ca: Box<Ca>,
        cache: HashMap<Identity, Arc<Svid>>,
        dir: Option<WatchedCa>,
    },
    /// An external issuer writes them (`--cert-dir`).
    Files(FileSvids),
}

struct WatchedCa {
    dir: PathBuf,
    fingerprint: u64,
    failing: Failure,
}

/// Where certificates come from, for `trellis certs`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "dir")]
pub enum Origin {
    /// The built-in CA, from `--ca-dir`.
    CaDir(PathBuf),
    /// The built-in CA with a root made at start.
    CaInMemory,
    /// Files written by an external issuer (`--cert-dir`).
    Files(PathBuf),
}

/// Why there is no certificate to present. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(
        "no certificate for {identity}: the issuer has not written {} yet",
        folder.display()
    )]
    Missing { identity: String, folder: PathBuf },
    #[error("the certificate of {identity} from {} has expired and no new one was written", folder.display())]
    Expired { identity: String, folder: PathBuf },
}

/// Reloads of the certificate source, for `trellis certs`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReloadStats {
    /// Changes applied (a new signing CA, bundle or certificate files).
    pub reloads: u64,
    /// Changes refused: the last good certificates kept serving.
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Issues (or loads) and caches the SVIDs of this node's workloads.
pub struct CertManager {
    lifetime: Duration,
    bundle: TrustBundle,
    source: Mutex<Source>,
    reloads: Mutex<ReloadStats>,
}

/// How often a watched folder is read.
pub const POLL: Duration = Duration::from_secs(1);

impl CertManager {
    /// The built-in CA, as given: nothing watched.
    pub fn new(ca: Ca, lifetime: Duration) -> Self {
        Self::with_source(
            Source::Ca {
                ca: Box::new(ca),
                cache: HashMap::new(),
                dir: None,
            },
            lifetime,
        )
    }

    /// The built-in CA from `dir` (`ca.crt`, `ca.key`, optional
    /// `bundle.crt`), reloaded when they change.
    pub fn from_ca_dir(dir: &Path, lifetime: Duration) -> Result<Self, CaError> {
        let ca = Ca::load(dir)?;
        Ok(Self::with_source(
            Source::Ca {
                ca: Box::new(ca),
                cache: HashMap::new(),
                dir: Some(WatchedCa {
                    dir: dir.into(),
                    fingerprint: fingerprint(dir, CA_FILES),
                    failing: Failure::default(),
                }),
            },
            lifetime,
        ))
    }

    /// Certificates an external issuer writes under `dir`, loaded now and
    /// reloaded when they change. Folders that fail to load are logged.
    pub fn from_files(dir: &Path, trust_domain: &str) -> Self {
        let mut files = FileSvids::new(dir, trust_domain);
        files.poll();
        // A first look reports no failure (it waits for a second look); at
        // start there is no last good version to wait for: look again now.
        let errors = files.poll().errors;
        let manager = Self::with_source(Source::Files(files), Duration::ZERO);
        manager.note_errors(errors.iter().map(ToString::to_string));
        manager
    }

    fn with_source(source: Source, lifetime: Duration) -> Self {
        let roots = match &source {
            Source::Ca { ca, .. } => ca.roots(),
            Source::Files(files) => files.bundle(),
        };
        Self {
            lifetime,
            bundle: TrustBundle::new(roots),
            source: Mutex::new(source),
            reloads: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Source> {
        self.source.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn origin(&self) -> Origin {
        match &*self.lock() {
            Source::Ca { dir: Some(w), .. } => Origin::CaDir(w.dir.clone()),
            Source::Ca { dir: None, .. } => Origin::CaInMemory,
            Source::Files(files) => Origin::Files(files.dir().into()),
        }
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The lifetime of issued certificates (zero when an external issuer
    /// decides it).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn reload_stats(&self) -> ReloadStats {
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The workload's current SVID: issued now if there is none yet or the
    /// cached one is due for renewal; from files, the last one loaded.
    pub fn get(&self, identity: &Identity) -> Result<Arc<Svid>, CertError> {
        let now = SystemTime::now();
        let mut source = self.lock();
        match &mut *source {
            Source::Ca { ca, cache, .. } => {
                if let Some(svid) = cache.get(identity)
                    && now < svid.info.renew_at
                    && svid.valid_at(now)
                {
                    return Ok(svid.clone());
                }
                // Signing a P-256 certificate takes well under a millisecond:
                // doing it under the lock keeps two first connections from
                // issuing twice.
                let svid = Arc::new(ca.issue(identity, self.lifetime, now)?);
                debug!(%identity, serial = %svid.info.serial, "issued a certificate");
                cache.insert(identity.clone(), svid.clone());
                Ok(svid)
            }
            Source::Files(files) => {
                let folder = || files.folder_of(identity);
                let svid = files.get(identity).ok_or_else(|| CertError::Missing {
                    identity: identity.to_string(),
                    folder: folder(),
                })?;
                if !svid.valid_at(now) {
                    return Err(CertError::Expired {
                        identity: identity.to_string(),
                        folder: folder(),
                    });
                }
                Ok(svid)
            }
        }
    }

    /// Whether certificates can be had now, for readiness: the CA signs a
    /// throwaway one (not cached); an external issuer's folder must hold a
    /// valid certificate for each identity in `needed` (the local meshed
    /// workloads'). `Err` says what is wrong.
    pub fn check_issuance(&self, trust_domain: &str, needed: &[Identity]) -> Result<(), String> {
        let now = SystemTime::now();
        match &*self.lock() {
            Source::Ca { ca, .. } => {
                let probe = Identity::new(trust_domain, "trellis-system", "readiness-probe");
                let lifetime = self.lifetime.min(Duration::from_secs(60));
                ca.issue(&probe, lifetime, now)
                    .map(drop)
                    .map_err(|e| format!("the CA cannot sign: {e}"))
            }
            Source::Files(files) => {
                let lacking: Vec<String> = needed
                    .iter()
                    .filter(|id| !files.get(id).is_some_and(|svid| svid.valid_at(now)))
                    .map(|id| files.folder_of(id).display().to_string())
                    .collect();
                match lacking.as_slice() {
                    [] => Ok(()),
                    [one] => Err(format!("no valid certificate in {one}")),
                    [first, rest @ ..] => Err(format!(
                        "no valid certificate in {first} and {} other folders",
                        rest.len()
                    )),
                }
            }
        }
    }

    /// Drops the certificates of identities no local workload has any more
    /// (files stay: the issuer decides what is there).
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        if let Source::Ca { cache, .. } = &mut *self.lock() {
            cache.retain(|id, _| keep(id));
        }
    }

    /// What `trellis certs` shows, sorted by identity.
    pub fn list(&self) -> Vec<SvidInfo> {
        let mut infos: Vec<SvidInfo> = match &*self.lock() {
            Source::Ca { cache, .. } => cache.values().map(|s| s.info.clone()).collect(),
            Source::Files(files) => files.list(),
        };
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    fn note_errors(&self, errors: impl IntoIterator<Item = String>) {
        let mut stats = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        for error in errors {
            warn!(%error, "certificate source not reloaded; the last good certificates keep serving");
            stats.errors += 1;
            stats.last_error = Some(error);
        }
    }

    fn note_reload(&self) {
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reloads += 1;
    }

    /// Reads the watched folder, if any, and applies what changed: a new
    /// trust bundle for the next handshakes, a new signing CA (every cached
    /// certificate re-issued from it), new certificate files.
    pub fn reload(&self) {
        let mut source = self.lock();
        match &mut *source {
            Source::Ca {
                dir: Some(watched),
                ca,
                cache,
                ..
            } => {
                let fingerprint = fingerprint(&watched.dir, CA_FILES);
                if fingerprint == watched.fingerprint {
                    watched.failing = Failure::default();
                    return;
                }
                let new = match Ca::load(&watched.dir) {
                    Ok(new) => new,
                    Err(e) => {
                        let report = watched.failing.seen(fingerprint);
                        drop(source);
                        if report {
                            self.note_errors([e.to_string()]);
                        }
                        return;
                    }
                };
                watched.fingerprint = fingerprint;
                watched.failing = Failure::default();
                if new.roots() != ca.roots() {
                    info!(roots = new.roots().len(), "trust bundle changed");
                    self.bundle.replace(new.roots());
                }
                let resign = new.cert() != ca.cert();
                **ca = new;
                if resign {
                    info!(ca = ?ca, "signing CA changed: re-issuing every certificate");
                    let now = SystemTime::now();
                    for (identity, svid) in cache.iter_mut() {
                        match ca.issue(identity, self.lifetime, now) {
                            Ok(new) => {
                                info!(%identity, serial = %new.info.serial, "re-issued a certificate");
                                *svid = Arc::new(new);
                            }
                            // The old one serves until its renewal retries.
                            Err(e) => warn!(%identity, error = %e, "cannot re-issue a certificate"),
                        }
                    }
                }
                drop(source);
                self.note_reload();
            }
            Source::Ca { dir: None, .. } => {}
            Source::Files(files) => {
                let poll = files.poll();
                let roots = poll.changed.then(|| files.bundle());
                drop(source);
                if let Some(roots) = roots {
                    if roots != *self.bundle.roots() {
                        info!(roots = roots.len(), "trust bundle changed");
                    }
                    self.bundle.replace(roots);
                    info!("certificate files reloaded");
                    self.note_reload();
                }
                self.note_errors(poll.errors.iter().map(|e| e.to_string()));
            }
        }
    }

    /// Renews every cached certificate whose time has come; returns how long
    /// until the next one is due.
    pub fn renew_due(&self) -> Duration {
        let now = SystemTime::now();
        let due: Vec<Identity> = match &*self.lock() {
            Source::Ca { cache, .. } => cache
                .iter()
                .filter(|(_, s)| s.info.renew_at <= now)
                .map(|(id, _)| id.clone())
                .collect(),
            Source::Files(_) => return Duration::from_secs(60),
        };
        for identity in due {
            match self.get(&identity) {
                Ok(svid) => info!(%identity, serial = %svid.info.serial, "renewed a certificate"),
                Err(e) => warn!(%identity, error = %e, "cannot renew a certificate; retrying"),
            }
        }
        match &*self.lock() {
            Source::Ca { cache, .. } => cache
                .values()
                .map(|s| {
                    s.info
                        .renew_at
                        .duration_since(now)
                        .unwrap_or(Duration::ZERO)
                })
                .min()
                .unwrap_or(Duration::from_secs(60)),
            Source::Files(_) => Duration::from_secs(60),
        }
    }

    /// Renews certificates ahead of time and reloads the watched folder, for
    /// as long as the agent runs.
    pub async fn run_renewals(self: Arc<Self>) {
        let mut next_poll = tokio::time::Instant::now() + POLL;
        loop {
            let renew_in = self.renew_due();
            let wait = renew_in.clamp(Duration::from_millis(100), Duration::from_secs(60));
            let deadline = (tokio::time::Instant::now() + wait).min(next_poll);
            tokio::time::sleep_until(deadline).await;
            if tokio::time::Instant::now() >= next_poll {
                // Reading a few small files: cheap enough for the runtime.
                self.reload();
                next_poll = tokio::time::Instant::now() + POLL;
            }
        }
    }
}

/// The watched files of a CA folder.
const CA_FILES: &[&str] = &[CA_CERT, CA_KEY, CA_BUNDLE];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

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

    #[test]
    fn a_watched_ca_folder_rotates_its_root_without_a_restart() {
        let (tmp, tmp_next) = (TempDir::new("rotate"), TempDir::new("rotate-next"));
        let (dir, next) = (tmp.path(), tmp_next.path());
        Ca::init(dir, "cluster.local").unwrap();
        Ca::init(next, "cluster.local").unwrap();
        let read = |d: &Path, name: &str| std::fs::read_to_string(d.join(name)).unwrap();
        let (old_root, new_root) = (read(dir, CA_CERT), read(next, CA_CERT));
        let m = CertManager::from_ca_dir(dir, Duration::from_secs(3600)).unwrap();
        let id = Identity::new("cluster.local", "shop", "web");
        let first = m.get(&id).unwrap();
        m.reload();
        assert_eq!(m.reload_stats().reloads, 0, "nothing changed");

        // 1. Both roots trusted; still signing with the old one.
        std::fs::write(dir.join(CA_BUNDLE), format!("{old_root}{new_root}")).unwrap();
        m.reload();
        assert_eq!(m.bundle().roots().len(), 2);
        assert!(Arc::ptr_eq(&first, &m.get(&id).unwrap()), "same signer");

        // A half-done swap (new certificate, old key) is refused, reported
        // on the second look, and the old pair keeps signing.
        std::fs::write(dir.join(CA_CERT), &new_root).unwrap();
        m.reload();
        assert_eq!(m.reload_stats().errors, 0, "maybe a write in progress");
        m.reload();
        let stats = m.reload_stats();
        assert_eq!(stats.errors, 1, "{stats:?}");
        assert!(stats.last_error.unwrap().contains("does not belong"));
        assert!(Arc::ptr_eq(&first, &m.get(&id).unwrap()));

        // 2. The new signing pair: every cached certificate is re-issued.
        std::fs::write(dir.join(CA_KEY), read(next, CA_KEY)).unwrap();
        m.reload();
        let second = m.get(&id).unwrap();
        assert_ne!(first.info.serial, second.info.serial);
        assert_ne!(first.info.issuers, second.info.issuers, "{:?}", second.info);
        assert_eq!(m.list(), vec![second.info.clone()]);

        // 3. The old root retired.
        std::fs::write(dir.join(CA_BUNDLE), &new_root).unwrap();
        m.reload();
        assert_eq!(m.bundle().roots().len(), 1);
        assert_eq!(m.reload_stats().reloads, 3);
    }
}
