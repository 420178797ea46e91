//! Network policy verdicts, shared by every enforcement point (connect,
//! sendmsg, the pod interfaces): the peer's identity from the ipcache, then
//! the endpoint's compiled policy (an LPM trie) for that identity, the
//! identity of the policy CIDR holding the peer's address, and any peer.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
pub use trellis_common::Decision;
use trellis_common::{CounterKey, FlowEvent, PolicyKey, identity, reason};

use crate::{
    counters::count,
    maps::{CONFIG, FLOWS, IPCACHE, POLICY},
};

/// The peer's identities: its own, and the most specific policy CIDR's
/// holding its address (0 when none).
#[derive(Clone, Copy)]
pub struct Peer {
    pub identity: u32,
    pub cidr_identity: u32,
}

#[inline(always)]
pub fn peer(addr: [u8; 16]) -> Peer {
    match IPCACHE.get(&Key::new(128, addr)) {
        Some(info) => Peer {
            identity: info.identity,
            cidr_identity: info.cidr_identity,
        },
        None => Peer {
            identity: identity::WORLD,
            cidr_identity: 0,
        },
    }
}

#[inline(always)]
fn lookup(direction: u8, endpoint_id: u32, id: u32, protocol: u8, port: u16) -> Option<u32> {
    let key = Key::new(
        PolicyKey::PREFIX_FULL,
        PolicyKey::new(direction, endpoint_id, id, protocol, port),
    );
    POLICY.get(&key).map(|e| e.rule_id)
}

/// The endpoint's policy verdict for traffic with `peer` in `direction`
/// (`port` is the endpoint's own port for ingress, the peer's for egress).
#[inline(always)]
pub fn judge(direction: u8, endpoint_id: u32, peer: Peer, protocol: u8, port: u16) -> Decision {
    trellis_common::judge(peer.identity, peer.cidr_identity, |id| {
        lookup(direction, endpoint_id, id, protocol, port)
    })
}

/// The current policy revision (see `DatapathConfig::policy_revision`).
#[inline(always)]
pub fn revision() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.policy_revision)
}

/// What a flow event says besides the decision.
pub struct FlowInfo {
    pub hook: u32,
    pub direction: u8,
    pub endpoint_id: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
}

/// Counts a decision and writes its flow event (dropped, not waited for,
/// when the ring is full: the counters still have the decision, and a
/// `flow-event-lost` counter the loss).
#[inline(always)]
pub fn record(info: &FlowInfo, decision: &Decision, bytes: u64) {
    count(
        CounterKey {
            hook: info.hook,
            verdict: decision.verdict(),
            reason: decision.reason,
            endpoint_id: info.endpoint_id,
        },
        bytes,
    );
    let event = FlowEvent {
        // SAFETY: a helper with no arguments.
        time_ns: unsafe { bpf_ktime_get_ns() },
        saddr: info.saddr,
        daddr: info.daddr,
        sport: info.sport,
        dport: info.dport,
        protocol: info.protocol,
        direction: info.direction,
        hook: info.hook as u16,
        src_identity: info.src_identity,
        dst_identity: info.dst_identity,
        endpoint_id: info.endpoint_id,
        verdict: decision.verdict(),
        reason: decision.reason,
        rule_id: decision.rule_id,
    };
    if FLOWS.output(event, 0).is_err() {
        count(
            CounterKey {
                hook: info.hook,
                verdict: decision.verdict(),
                reason: reason::FLOW_EVENT_LOST,
                endpoint_id: info.endpoint_id,
            },
            0,
        );
    }
}
