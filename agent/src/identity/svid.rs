//! An X.509 SVID: a workload's certificate chain and private key.

use std::{fmt, time::SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use super::Identity;

/// A certificate chain (leaf first, without the root) and its key. The key
/// never leaves this type except into a rustls config: `Debug` and
/// `Serialize` leave it out.
pub struct Svid {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub info: SvidInfo,
}

/// What may be shown about an SVID (`trellis certs`, logs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SvidInfo {
    pub identity: String,
    /// Hex.
    pub serial: String,
    #[serde(with = "unix_seconds")]
    pub not_before: SystemTime,
    #[serde(with = "unix_seconds")]
    pub not_after: SystemTime,
    /// When the agent replaces it: half its lifetime, with jitter.
    #[serde(with = "unix_seconds")]
    pub renew_at: SystemTime,
    /// Subjects of the chain above the leaf, up to the root.
    pub issuers: Vec<String>,
}

mod unix_seconds {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        s.serialize_u64(secs)
    }
}

impl Svid {
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        info: SvidInfo,
    ) -> Self {
        Self {
            identity,
            chain,
            key,
            info,
        }
    }

    /// The key, for a TLS config.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Valid at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.info.not_before <= now && now < self.info.not_after
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("info", &self.info)
            .field("key", &"<redacted>")
            .finish()
    }
}
