//! Policy. [`network`] and [`compiler`]: Kubernetes `NetworkPolicy`,
//! compiled into the kernel's identities and policy map and enforced there
//! (connect, sendmsg, the pod interfaces); [`verdict`] reads the same maps
//! for the connections the agent delivers, and [`explain`] for `trellis
//! policy POD` and `trellis policy explain`.
//! [`authz`]: Trellis `AuthorizationPolicy` (L4 for now: who may connect to
//! which workload and port), checked on every connection the agent
//! delivers to a local pod, through HBONE or on the same node.

pub mod authz;
pub mod compiler;
pub mod explain;
pub mod network;
#[cfg(test)]
mod reference;
pub mod verdict;
