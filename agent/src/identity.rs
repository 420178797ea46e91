//! Workload identities: SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`),
//! the X.509 SVIDs that prove them, where they come from ([`ca`]), and the
//! per-node cache that issues them on demand and renews them ([`manager`]).

pub mod ca;
pub mod files;
pub mod manager;
pub mod svid;
pub mod watch;

use std::{fmt, str::FromStr};

use serde::{Serialize, Serializer};

/// A workload's SPIFFE identity, as Kubernetes names it: trust domain,
/// namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl Identity {
    /// The identity a workload runs as: its namespace and service account.
    pub fn of(workload: &crate::state::Workload, trust_domain: &str) -> Self {
        Self::new(trust_domain, &workload.namespace, &workload.service_account)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a string is not a Kubernetes workload's SPIFFE ID.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{id:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {reason}"
)]
pub struct IdentityError {
    pub id: String,
    pub reason: &'static str,
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let err = |reason| IdentityError {
            id: id.into(),
            reason,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("no spiffe:// scheme"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("no path"))?;
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, ns, sa_key, sa] = parts[..] else {
            return Err(err("the path is not /ns/<namespace>/sa/<service-account>"));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(err("the path is not /ns/<namespace>/sa/<service-account>"));
        }
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        };
        if !valid(td) {
            return Err(err("bad trust domain"));
        }
        if !valid(ns) || !valid(sa) {
            return Err(err("bad namespace or service account"));
        }
        Ok(Self::new(td, ns, sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects() {
        let id = Identity::new("cluster.local", "shop", "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string().parse::<Identity>(), Ok(id));
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
