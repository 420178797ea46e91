//! Map names, keys and values. One section per map.

use core::mem::{offset_of, size_of};

/// Bumped whenever a pinned map's key or value layout changes, so an agent
/// never misreads a map pinned by an incompatible version.
pub const LAYOUT_VERSION: u32 = 1;

/// Every map the kernel object defines; the agent pins each one by this name
/// under `<bpffs>/maps/`.
pub const ALL_MAPS: &[&str] = &[MAP_COUNTERS, MAP_ENDPOINTS];

/// Every program, with the hook it attaches to; links are pinned under
/// `<bpffs>/links/<name>`.
pub const PROG_CONNECT4: &str = "trl_connect4";

// === counters ===

/// Per-CPU event counters, by hook, verdict and reason.
pub const MAP_COUNTERS: &str = "counters";
pub const COUNTERS_MAX_ENTRIES: u32 = 4096;

/// Which kernel hook counted the event.
pub mod hook {
    pub const CONNECT4: u32 = 1;
    pub const CONNECT6: u32 = 2;
    pub const SENDMSG4: u32 = 3;
    pub const SENDMSG6: u32 = 4;
    pub const SOCK_OPS: u32 = 5;
    pub const SK_MSG: u32 = 6;
    pub const TC_INGRESS: u32 = 7;
    pub const TC_EGRESS: u32 = 8;
    pub const GETPEERNAME4: u32 = 9;
    pub const GETPEERNAME6: u32 = 10;

    /// Name used by the CLI and metrics.
    pub const fn name(hook: u32) -> &'static str {
        match hook {
            CONNECT4 => "connect4",
            CONNECT6 => "connect6",
            SENDMSG4 => "sendmsg4",
            SENDMSG6 => "sendmsg6",
            SOCK_OPS => "sock_ops",
            SK_MSG => "sk_msg",
            TC_INGRESS => "tc_ingress",
            TC_EGRESS => "tc_egress",
            GETPEERNAME4 => "getpeername4",
            GETPEERNAME6 => "getpeername6",
            _ => "unknown",
        }
    }
}

/// What the hook did.
pub mod verdict {
    /// Left the socket or packet as it was.
    pub const PASS: u32 = 0;
    /// Rewrote the destination to the agent.
    pub const REDIRECT: u32 = 1;
    /// Refused (EPERM at connect, drop at TC).
    pub const DENY: u32 = 2;

    pub const fn name(verdict: u32) -> &'static str {
        match verdict {
            PASS => "pass",
            REDIRECT => "redirect",
            DENY => "deny",
            _ => "unknown",
        }
    }
}

/// Why the hook did it.
pub mod reason {
    /// The socket's network namespace is not a meshed endpoint.
    pub const NOT_MESHED: u32 = 0;
    /// The destination is not in the mesh.
    pub const NOT_MESH_DESTINATION: u32 = 1;
    /// A meshed endpoint connecting to a mesh destination.
    pub const CAPTURED: u32 = 2;
    /// Not TCP (or not a protocol the hook handles).
    pub const OTHER_PROTOCOL: u32 = 3;

    pub const fn name(reason: u32) -> &'static str {
        match reason {
            NOT_MESHED => "not-meshed",
            NOT_MESH_DESTINATION => "not-mesh-destination",
            CAPTURED => "captured",
            OTHER_PROTOCOL => "other-protocol",
            _ => "unknown",
        }
    }
}

/// Key of [`MAP_COUNTERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// One of [`hook`].
    pub hook: u32,
    /// One of [`verdict`].
    pub verdict: u32,
    /// One of [`reason`].
    pub reason: u32,
    /// The endpoint the event belongs to; 0 when the socket is not a meshed endpoint.
    pub endpoint_id: u32,
}

/// Value of [`MAP_COUNTERS`] (per CPU: the reader sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Number of events.
    pub events: u64,
    /// Bytes, where the hook sees them (TC, sk_msg); 0 elsewhere.
    pub bytes: u64,
}

// === endpoints ===

/// Meshed local pods, by network namespace cookie.
pub const MAP_ENDPOINTS: &str = "endpoints";
pub const ENDPOINTS_MAX_ENTRIES: u32 = 1024;

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// The pod's traffic is captured by the agent.
    pub const MESHED: u32 = 1 << 0;
    /// mTLS STRICT: plaintext from outside the mesh is dropped.
    pub const STRICT: u32 = 1 << 1;
}

/// Key of [`MAP_ENDPOINTS`]: the pod's network namespace cookie (SO_NETNS_COOKIE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub netns_cookie: u64,
}

/// Value of [`MAP_ENDPOINTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The agent's id for the endpoint, stable while the pod lives.
    pub endpoint_id: u32,
    /// The numeric security identity of the pod's labels and namespace.
    pub identity: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    /// Host-side interface index of the pod's veth.
    pub ifindex: u32,
}

// === layout checks: a change here is a change of LAYOUT_VERSION ===

const _: () = {
    assert!(size_of::<CounterKey>() == 16);
    assert!(offset_of!(CounterKey, endpoint_id) == 12);
    assert!(size_of::<CounterValue>() == 16);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(offset_of!(EndpointInfo, ifindex) == 12);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: each type is #[repr(C)], Copy, made only of integers, with no
    // implicit padding (checked above), so every bit pattern is valid.
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
}
