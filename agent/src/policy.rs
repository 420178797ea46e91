//! Policy. [`network`] and [`compiler`]: Kubernetes `NetworkPolicy`,
//! compiled into the kernel's identities and policy map and enforced there
//! (connect, sendmsg, the pod interfaces); [`verdict`] reads the same maps
//! for the connections the agent delivers, and [`explain`] for `trellis
//! policy POD` and `trellis policy explain`.
//! [`authz`]: Trellis `AuthorizationPolicy` (who may connect to which
//! workload and port, and which HTTP requests it may send), checked on
//! every connection and request the agent delivers to a local pod, through
//! HBONE or on the same node; [`authn`]: `RequestAuthentication`, the JSON
//! Web Tokens ([`jwt`]) those requests may carry, checked before them, with
//! key sets inline or fetched ([`jwks`]); [`providers`]: the external
//! authorization services `CUSTOM` policies ask, from the mesh config;
//! [`peer_auth`]: `PeerAuthentication`, each pod's mTLS mode (STRICT or
//! PERMISSIVE, per port too); [`telemetry`]: `Telemetry`, what is traced,
//! logged and counted of each workload.

pub mod authn;
pub mod authz;
pub mod compiler;
pub mod explain;
pub mod jwks;
pub mod jwt;
pub mod network;
pub mod peer_auth;
pub mod providers;
#[cfg(test)]
mod reference;
pub mod scope;
pub mod telemetry;
pub mod verdict;
