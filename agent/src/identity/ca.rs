//! The built-in CA: a signing certificate and key from a mounted folder (a
//! Kubernetes Secret in production; `trellis ca init` makes one for local use),
//! or an in-memory root when none is given. It signs SVIDs for the workloads
//! of this node only.
//!
//! The folder may also hold `bundle.crt`, the roots peers are verified
//! against, when they are not just `ca.crt`: an intermediate signing CA, or
//! a root rotation (first a bundle with the old and the new root on every
//! node, then the new signing pair, then the new root alone).

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject as _};

use super::{
    Identity,
    svid::{Svid, SvidInfo},
};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Optional: the trust bundle, when it is not `ca.crt` alone.
pub const CA_BUNDLE: &str = "bundle.crt";
/// A root made by `trellis ca init` lives this long.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What went wrong with the CA. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path} already exists: not overwriting a CA (remove it first to make a new root)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue { identity: String, reason: String },
}

/// Where the root came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "dir")]
pub enum CaOrigin {
    /// `--ca-dir`.
    Files(PathBuf),
    /// Made at start: nodes cannot verify each other.
    InMemory,
}

/// A signing CA and the roots its certificates verify against.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate.
    cert: CertificateDer<'static>,
    /// Sent after the leaf when the signer is not itself a root.
    intermediate: Option<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    subject: String,
    pub origin: CaOrigin,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.subject)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

fn root_params(trust_domain: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // A short random tag tells roots apart in `trellis certs` and logs
    // (a rotation has two roots of the same trust domain side by side).
    let tag: String = random_serial().as_ref()[..3]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(DnType::CommonName, format!("Trellis root CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(random_serial());
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The OS RNG failing is not something to carry on from.
    getrandom::fill(&mut bytes).expect("the OS random number generator");
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// A uniformly random fraction in [0, 1).
pub(crate) fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random number generator");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn new_key() -> Result<KeyPair, String> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())
}

impl Ca {
    /// Writes a new root (`ca.crt`, and `ca.key` readable by the owner only)
    /// into `dir`, for `--ca-dir`. Refuses to overwrite.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<(PathBuf, PathBuf), CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let invalid = |reason: String| CaError::Invalid {
            path: dir.into(),
            reason,
        };
        let key = new_key().map_err(invalid)?;
        let cert = root_params(trust_domain, SystemTime::now())
            .self_signed(&key)
            .map_err(|e| invalid(e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io(&key_path))?;
        file.write_all(key.serialize_pem().as_bytes())
            .map_err(io(&key_path))?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok((cert_path, key_path))
    }

    /// Loads the root from `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map_err(|source| CaError::Io {
                    path: path.clone(),
                    source,
                })
                .map(|text| (path, text))
        };
        let (cert_path, cert_pem) = read(CA_CERT)?;
        let (key_path, key_pem) = read(CA_KEY)?;
        // Only the error's kind, never the text: it must not echo key bytes.
        let key = KeyPair::from_pem(&key_pem).map_err(|_| CaError::Invalid {
            path: key_path.clone(),
            reason: "not a PEM private key rcgen can sign with (ECDSA P-256, Ed25519 or RSA)"
                .into(),
        })?;
        let invalid_cert = |reason: String| CaError::Invalid {
            path: cert_path.clone(),
            reason,
        };
        let root = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid_cert(format!("not a PEM certificate: {e}")))?;
        let subject = subject_of(&root).map_err(invalid_cert)?;
        if key.subject_public_key_info() != public_key_of(&root).map_err(invalid_cert)? {
            return Err(CaError::Invalid {
                path: key_path,
                reason: format!(
                    "does not belong to the certificate in {}",
                    cert_path.display()
                ),
            });
        }
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid_cert(e.to_string()))?;
        let bundle_path = dir.join(CA_BUNDLE);
        let roots = match std::fs::read(&bundle_path) {
            Ok(pem) => read_bundle(&pem).map_err(|reason| CaError::Invalid {
                path: bundle_path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![root.clone()],
            Err(source) => {
                return Err(CaError::Io {
                    path: bundle_path,
                    source,
                });
            }
        };
        let intermediate = if roots.contains(&root) {
            None
        } else {
            // Not a root: the bundle must hold what signed it, or no peer
            // could verify the certificates issued here.
            let issuer_name = issuer_of(&root).map_err(invalid_cert)?;
            let signed_by_bundle = roots
                .iter()
                .any(|r| subject_of(r).is_ok_and(|s| s == issuer_name));
            if !signed_by_bundle {
                return Err(CaError::Invalid {
                    path: bundle_path,
                    reason: format!(
                        "holds neither {} nor its issuer ({issuer_name}): peers could not verify the certificates it signs",
                        cert_path.display()
                    ),
                });
            }
            Some(root.clone())
        };
        Ok(Self {
            issuer,
            cert: root,
            intermediate,
            roots,
            subject,
            origin: CaOrigin::Files(dir.into()),
        })
    }

    /// A root made now, held in memory only.
    pub fn in_memory(trust_domain: &str) -> Result<Self, CaError> {
        let invalid = |reason: String| CaError::Invalid {
            path: "<in-memory CA>".into(),
            reason,
        };
        let key = new_key().map_err(invalid)?;
        let params = root_params(trust_domain, SystemTime::now());
        let root = params
            .self_signed(&key)
            .map_err(|e| invalid(e.to_string()))?
            .der()
            .clone();
        let subject = subject_of(&root).map_err(invalid)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: root.clone(),
            intermediate: None,
            roots: vec![root],
            subject,
            origin: CaOrigin::InMemory,
        })
    }

    /// The trust bundle this CA's SVIDs verify against.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    /// The signing certificate: when it changes, issued SVIDs are replaced.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs a new SVID for `identity`, valid from `now` for `lifetime`
    /// (backdated a little against clock skew), renewed at half life with
    /// ±10% jitter so a node's certificates do not all renew at once.
    pub fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Svid, CaError> {
        let fail = |reason: String| CaError::Issue {
            identity: identity.to_string(),
            reason,
        };
        // X.509 times have whole seconds.
        let now = truncate_to_seconds(now);
        let backdate = (lifetime / 10).min(Duration::from_secs(60));
        let (not_before, not_after) = (now - backdate, now + lifetime);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| fail(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let key = new_key().map_err(fail)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        // Half life, ±10% of the lifetime.
        let renew_after = lifetime.mul_f64(0.4 + 0.2 * random_fraction());
        let info = SvidInfo {
            identity: identity.to_string(),
            serial: serial.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            not_before,
            not_after,
            renew_at: now + renew_after,
            issuers: vec![self.subject.clone()],
        };
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediate.clone());
        Ok(Svid::new(
            identity.clone(),
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            info,
        ))
    }
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, String> {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c)
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// The certificate's subject, as text.
pub fn subject_of(cert: &CertificateDer<'_>) -> Result<String, String> {
    Ok(parse(cert)?.subject().to_string())
}

fn issuer_of(cert: &CertificateDer<'_>) -> Result<String, String> {
    Ok(parse(cert)?.issuer().to_string())
}

/// Every certificate of a PEM trust bundle (at least one).
pub fn read_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if roots.is_empty() {
        return Err("holds no certificate".into());
    }
    for root in &roots {
        parse(root)?;
    }
    Ok(roots)
}

fn public_key_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    Ok(parse(cert)?.public_key().raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn init_writes_a_root_that_loads_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = TempDir::new("ca-init");
        let dir = tmp.path().to_path_buf();
        let (cert, key) = Ca::init(&dir, "cluster.local").unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key is readable by its owner only");
        let ca = Ca::load(&dir).unwrap();
        assert_eq!(ca.origin, CaOrigin::Files(dir.clone()));
        assert!(matches!(
            Ca::init(&dir, "cluster.local"),
            Err(CaError::Exists { .. })
        ));
        // Issued SVIDs chain to the root and carry only the URI SAN.
        let id = Identity::new("cluster.local", "shop", "web");
        let svid = ca
            .issue(&id, Duration::from_secs(60), SystemTime::now())
            .unwrap();
        assert_eq!(crate::tls::identity_of(&svid.chain[0]), Ok(id));
        assert!(
            svid.info.renew_at > svid.info.not_before && svid.info.renew_at < svid.info.not_after
        );
        assert!(
            std::fs::read_to_string(cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }

    #[test]
    fn a_key_of_another_root_or_garbage_is_refused_without_echoing_it() {
        let (tmp_a, tmp_b) = (TempDir::new("ca-a"), TempDir::new("ca-b"));
        let (a, b) = (tmp_a.path(), tmp_b.path());
        Ca::init(a, "cluster.local").unwrap();
        Ca::init(b, "cluster.local").unwrap();
        std::fs::copy(b.join(CA_KEY), a.join(CA_KEY)).unwrap();
        let err = Ca::load(a).unwrap_err().to_string();
        assert!(err.contains("does not belong to the certificate"), "{err}");
        let key = std::fs::read_to_string(a.join(CA_KEY)).unwrap();
        let garbage = key.replace('A', "!");
        std::fs::write(a.join(CA_KEY), &garbage).unwrap();
        let err = Ca::load(a).unwrap_err().to_string();
        assert!(err.contains("not a PEM private key"), "{err}");
        for line in key
            .lines()
            .chain(garbage.lines())
            .filter(|l| !l.starts_with("-----"))
        {
            assert!(!err.contains(line), "the error echoes key material");
        }
    }
}
