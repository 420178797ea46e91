//! Policy the agent enforces in userspace. [`authz`]: Trellis
//! `AuthorizationPolicy` (L4 for now: who may connect to which workload and
//! port), checked on every connection the agent delivers to a local pod,
//! through HBONE or on the same node.

pub mod authz;
