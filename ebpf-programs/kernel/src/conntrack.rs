//! Connection tracking for the pod programs: an LRU hash of the flows they
//! allowed, keyed by the flow as the endpoint's interface saw its first
//! packet. A packet is a reply when the reversed flow was allowed the other
//! way, established when its own flow was allowed at the current policy
//! revision, and judged (again) otherwise.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use trellis_common::{CtEntry, CtKey, direction};

use crate::{maps::CONNTRACK, packet::Flow};

pub enum State {
    /// No entry either way: a new flow.
    New,
    /// Allowed at an older policy revision: judge it again.
    Stale,
    /// Allowed at the current revision.
    Established,
    /// The reverse of a flow allowed the other way.
    Reply,
}

#[inline(always)]
fn key(flow: &Flow, dir: u8, ifindex: u32, reversed: bool) -> CtKey {
    let (saddr, daddr, sport, dport) = if reversed {
        (flow.daddr, flow.saddr, flow.dport, flow.sport)
    } else {
        (flow.saddr, flow.daddr, flow.sport, flow.dport)
    };
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        protocol: flow.protocol,
        direction: dir,
        _pad: 0,
        ifindex,
    }
}

#[inline(always)]
fn other(dir: u8) -> u8 {
    if dir == direction::INGRESS {
        direction::EGRESS
    } else {
        direction::INGRESS
    }
}

#[inline(always)]
pub fn lookup(flow: &Flow, dir: u8, ifindex: u32, revision: u32) -> State {
    // SAFETY: copied out at once.
    if let Some(entry) = unsafe { CONNTRACK.get(key(flow, dir, ifindex, false)) } {
        return if entry.revision == revision {
            State::Established
        } else {
            State::Stale
        };
    }
    // SAFETY: as above.
    if unsafe { CONNTRACK.get(key(flow, other(dir), ifindex, true)) }.is_some() {
        return State::Reply;
    }
    State::New
}

/// Whether a datagram the endpoint sends from `local` to `remote` answers
/// a flow allowed in from `remote` (the sendmsg hook: a UDP server's
/// unconnected reply).
#[inline(always)]
pub fn answers_ingress(
    remote: &[u8; 16],
    remote_port: u16,
    local: &[u8; 16],
    local_port: u16,
    protocol: u8,
    ifindex: u32,
) -> bool {
    let key = CtKey {
        saddr: *remote,
        daddr: *local,
        sport: remote_port,
        dport: local_port,
        protocol,
        direction: direction::INGRESS,
        _pad: 0,
        ifindex,
    };
    // SAFETY: only tested for presence.
    unsafe { CONNTRACK.get(key) }.is_some()
}

/// Records (or refreshes) an allowed flow.
#[inline(always)]
pub fn allow(flow: &Flow, dir: u8, ifindex: u32, revision: u32, rule_id: u32) {
    let entry = CtEntry {
        // SAFETY: a helper with no arguments.
        created_ns: unsafe { bpf_ktime_get_ns() },
        revision,
        rule_id,
    };
    // A full LRU evicts the oldest flow, whose next packet is judged again.
    let _ = CONNTRACK.insert(key(flow, dir, ifindex, false), entry, 0);
}
