//! Externally issued SVIDs, as cert-manager's CSI driver, SPIRE's helper or
//! any issuer writing files provides them: `<dir>/<namespace>/<service-account>/`
//! holds `tls.crt` (the leaf first, then any intermediates), `tls.key` and
//! `ca.crt` (the trust bundle), the key names of a cert-manager Secret.
//!
//! The folder is polled: a folder whose files changed is loaded again and,
//! if anything is wrong with it (a half-written file, a key of another
//! certificate, a leaf for another identity, an expired leaf), keeps its last
//! good SVID. An error is reported once it has been seen on two polls in a
//! row, since issuers write the three files one after the other. Renewal is
//! the issuer's job: the agent only reloads.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use super::{
    Identity,
    svid::{Svid, SvidInfo},
    watch::{Failure, fingerprint},
};

pub const CERT: &str = "tls.crt";
pub const KEY: &str = "tls.key";
pub const BUNDLE: &str = "ca.crt";

/// Why a folder's files were not loaded. Names the file; never carries key
/// material (only what kind of thing was wrong).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FileError {
    pub path: PathBuf,
    pub reason: String,
}

struct Loaded {
    svid: Arc<Svid>,
    bundle: Vec<CertificateDer<'static>>,
    fingerprint: u64,
}

/// What a poll found.
#[derive(Debug, Default)]
pub struct Poll {
    /// Some SVID or bundle was added, replaced or removed.
    pub changed: bool,
    /// Failures seen for the second time in a row (reported once each).
    pub errors: Vec<FileError>,
}

/// The SVIDs of a certificate folder, as last loaded.
pub struct FileSvids {
    dir: PathBuf,
    trust_domain: String,
    loaded: HashMap<Identity, Loaded>,
    /// Folders (and the folder itself) whose last load failed.
    failing: HashMap<PathBuf, Failure>,
}

impl FileSvids {
    pub fn new(dir: impl Into<PathBuf>, trust_domain: &str) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: trust_domain.into(),
            loaded: HashMap::new(),
            failing: HashMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder `identity`'s files belong in.
    pub fn folder_of(&self, identity: &Identity) -> PathBuf {
        self.dir
            .join(&identity.namespace)
            .join(&identity.service_account)
    }

    pub fn get(&self, identity: &Identity) -> Option<Arc<Svid>> {
        self.loaded.get(identity).map(|l| l.svid.clone())
    }

    pub fn list(&self) -> Vec<SvidInfo> {
        self.loaded.values().map(|l| l.svid.info.clone()).collect()
    }

    /// Every root of every loaded folder, each once.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        let mut seen = HashSet::new();
        let mut identities: Vec<&Identity> = self.loaded.keys().collect();
        identities.sort();
        identities
            .into_iter()
            .flat_map(|id| &self.loaded[id].bundle)
            .filter(|root| seen.insert(root.as_ref().to_vec()))
            .cloned()
            .collect()
    }

    /// Reads every identity folder and loads those that changed.
    pub fn poll(&mut self) -> Poll {
        let mut poll = Poll::default();
        let folders = match identity_folders(&self.dir) {
            Ok(folders) => folders,
            Err(e) => {
                // Unreadable for now (not mounted yet?): keep what we have.
                let err = FileError {
                    path: self.dir.clone(),
                    reason: e.to_string(),
                };
                // Not readable has no content: the same "content" each time.
                if self.failing.entry(self.dir.clone()).or_default().seen(0) {
                    poll.errors.push(err);
                }
                return poll;
            }
        };
        self.failing.remove(&self.dir);
        let mut present = HashSet::new();
        for (namespace, service_account, folder) in folders {
            let identity = Identity::new(&self.trust_domain, &namespace, &service_account);
            present.insert(identity.clone());
            let fingerprint = fingerprint(&folder, &[CERT, KEY, BUNDLE]);
            if self
                .loaded
                .get(&identity)
                .is_some_and(|l| l.fingerprint == fingerprint)
            {
                self.failing.remove(&folder);
                continue;
            }
            match load(&folder, &identity, SystemTime::now()) {
                Ok((svid, bundle)) => {
                    self.failing.remove(&folder);
                    self.loaded.insert(
                        identity,
                        Loaded {
                            svid: Arc::new(svid),
                            bundle,
                            fingerprint,
                        },
                    );
                    poll.changed = true;
                }
                Err(e) => {
                    if self.failing.entry(folder).or_default().seen(fingerprint) {
                        poll.errors.push(e);
                    }
                }
            }
        }
        let before = self.loaded.len();
        self.loaded.retain(|id, _| present.contains(id));
        poll.changed |= self.loaded.len() != before;
        self.failing
            .retain(|path, _| path == &self.dir || path.exists());
        poll
    }
}

/// `(namespace, service account, folder)` for every `<dir>/<ns>/<sa>/`.
/// Hidden entries are skipped: a mounted Secret keeps its versions in
/// `..data`-style folders.
fn identity_folders(dir: &Path) -> std::io::Result<Vec<(String, String, PathBuf)>> {
    fn subfolders(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.starts_with('.') && path.is_dir() {
                out.push((name.to_owned(), path));
            }
        }
        out.sort();
        Ok(out)
    }
    let mut out = Vec::new();
    for (namespace, ns_dir) in subfolders(dir)? {
        for (service_account, folder) in subfolders(&ns_dir)? {
            out.push((namespace.clone(), service_account, folder));
        }
    }
    Ok(out)
}

/// Loads and checks one identity's files.
pub fn load(
    folder: &Path,
    identity: &Identity,
    now: SystemTime,
) -> Result<(Svid, Vec<CertificateDer<'static>>), FileError> {
    let read = |name: &str| {
        let path = folder.join(name);
        std::fs::read(&path)
            .map_err(|e| FileError {
                path: path.clone(),
                reason: e.to_string(),
            })
            .map(|bytes| (path, bytes))
    };
    let (cert_path, cert_pem) = read(CERT)?;
    let (key_path, key_pem) = read(KEY)?;
    let (bundle_path, bundle_pem) = read(BUNDLE)?;
    let bad_cert = |reason: String| FileError {
        path: cert_path.clone(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_cert(format!("not PEM certificates: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad_cert("holds no certificate".into()))?;
    // The parser's error could quote the text it choked on: only say what
    // kind of thing was wrong.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| FileError {
        path: key_path.clone(),
        reason: "not a PEM private key (PKCS#8, SEC1 or PKCS#1)".into(),
    })?;
    match rustls::sign::CertifiedKey::from_der(
        chain.clone(),
        key.clone_key(),
        &crate::tls::provider(),
    ) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(FileError {
                path: key_path,
                reason: format!(
                    "does not belong to the certificate in {}",
                    cert_path.display()
                ),
            });
        }
        Err(_) => {
            return Err(FileError {
                path: key_path,
                reason: "a private key TLS cannot sign with (ECDSA, Ed25519 or RSA)".into(),
            });
        }
    }
    let found = crate::tls::identity_of(leaf).map_err(bad_cert)?;
    if &found != identity {
        return Err(bad_cert(format!(
            "the certificate is for {found}, but the folder is for {identity}"
        )));
    }
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad_cert(e.to_string()))?;
    let validity = parsed.validity();
    let seconds = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let (not_before, not_after) = (seconds(validity.not_before), seconds(validity.not_after));
    if now >= not_after {
        return Err(bad_cert(format!(
            "expired at {} (unix seconds)",
            validity.not_after.timestamp()
        )));
    }
    let bundle = super::ca::read_bundle(&bundle_pem).map_err(|reason| FileError {
        path: bundle_path,
        reason,
    })?;
    let mut issuers = vec![parsed.issuer().to_string()];
    for cert in &chain[1..] {
        if let Ok((_, c)) = x509_parser::parse_x509_certificate(cert) {
            issuers.push(c.issuer().to_string());
        }
    }
    let info = SvidInfo {
        identity: identity.to_string(),
        serial: parsed.raw_serial_as_string().replace(':', ""),
        not_before,
        not_after,
        // The issuer renews; the agent picks up what it writes.
        renew_at: not_after,
        issuers,
    };
    Ok((Svid::new(identity.clone(), chain, key, info), bundle))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{identity::ca::Ca, testing::TempDir};

    /// Writes `identity`'s three files as an issuer would; returns the key PEM.
    fn write(dir: &Path, ca: &Ca, identity: &Identity, lifetime: Duration) -> String {
        let svid = ca.issue(identity, lifetime, SystemTime::now()).unwrap();
        let folder = dir
            .join(&identity.namespace)
            .join(&identity.service_account);
        std::fs::create_dir_all(&folder).unwrap();
        let pem = |label: &str, der: &[u8]| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                lines.join("\n")
            )
        };
        let key = pem("PRIVATE KEY", svid.key().secret_der());
        std::fs::write(folder.join(CERT), pem("CERTIFICATE", &svid.chain[0])).unwrap();
        std::fs::write(folder.join(KEY), &key).unwrap();
        std::fs::write(folder.join(BUNDLE), pem("CERTIFICATE", &ca.roots()[0])).unwrap();
        key
    }

    #[test]
    fn loads_reloads_keeps_the_last_good_and_forgets_removed_folders() {
        let dir = TempDir::new("files-reload");
        let ca = Ca::in_memory("cluster.local").unwrap();
        let web = Identity::new("cluster.local", "shop", "web");
        let db = Identity::new("cluster.local", "shop", "db");
        write(dir.path(), &ca, &web, Duration::from_secs(3600));
        let mut files = FileSvids::new(dir.path(), "cluster.local");
        let poll = files.poll();
        assert!(poll.changed && poll.errors.is_empty(), "{poll:?}");
        let first = files.get(&web).expect("loaded");
        assert!(files.get(&db).is_none());
        assert_eq!(files.bundle(), ca.roots());
        assert!(!files.poll().changed, "nothing changed");

        // A new certificate from the issuer replaces the old one.
        write(dir.path(), &ca, &web, Duration::from_secs(3600));
        assert!(files.poll().changed);
        let second = files.get(&web).unwrap();
        assert_ne!(first.info.serial, second.info.serial);

        // A key of another certificate: the last good one stays; reported
        // on the second poll that sees it, once.
        let folder = files.folder_of(&web);
        let other = Ca::in_memory("cluster.local").unwrap();
        let stray = TempDir::new("files-stray");
        let stray_key = write(stray.path(), &other, &web, Duration::from_secs(3600));
        std::fs::write(folder.join(KEY), &stray_key).unwrap();
        let p1 = files.poll();
        assert!(!p1.changed && p1.errors.is_empty(), "{p1:?}");
        let p2 = files.poll();
        assert_eq!(p2.errors.len(), 1, "{p2:?}");
        let err = p2.errors[0].to_string();
        assert!(
            err.contains("tls.key") && err.contains("does not belong"),
            "{err}"
        );
        for line in stray_key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!err.contains(line), "the error echoes key material");
        }
        assert!(files.poll().errors.is_empty(), "reported once");
        assert_eq!(files.get(&web).unwrap().info.serial, second.info.serial);

        // A leaf for another identity, an expired leaf, garbage: refused.
        for (case, want) in [
            ("identity", "but the folder is for"),
            ("garbage", "not a PEM"),
        ] {
            let tmp = TempDir::new(case);
            match case {
                "identity" => {
                    write(tmp.path(), &ca, &db, Duration::from_secs(3600));
                    let from = tmp.path().join("shop/db");
                    for name in [CERT, KEY, BUNDLE] {
                        std::fs::copy(from.join(name), folder.join(name)).unwrap();
                    }
                }
                _ => std::fs::write(folder.join(KEY), "-----BEGIN PRIVATE KEY-----\n!!\n").unwrap(),
            }
            let err = load(&folder, &web, SystemTime::now())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{case}: {err}");
        }
        write(dir.path(), &ca, &web, Duration::from_secs(2));
        let err = load(&folder, &web, SystemTime::now() + Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expired"), "{err}");

        // A folder that goes away takes its SVID with it.
        std::fs::remove_dir_all(dir.path().join("shop")).unwrap();
        assert!(files.poll().changed);
        assert!(files.get(&web).is_none());
    }
}
