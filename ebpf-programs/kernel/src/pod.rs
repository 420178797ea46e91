//! TC (tcx) on each local pod's host-side interface: the pod's network
//! policy for all its IP traffic, with connection tracking.
//!
//! - `trl_pod_to` (egress: packets to the pod) enforces the pod's ingress
//!   policy, and STRICT mTLS: a new TCP connection (SYN) to a strict pod
//!   must come from this node's own stack (the agent delivering HBONE or
//!   same-node traffic, or kubelet's probes); a forwarded one (another pod,
//!   another node) is plaintext from outside the mesh and is dropped,
//!   counted as `plaintext-in-strict`. Packets sent by a local socket still
//!   carry it here; forwarded ones lost theirs when the node received them
//!   (`ip_rcv` orphans every skb). The agent's own packets (its socket mark)
//!   pass: it judged the connection itself.
//! - `trl_pod_from` (ingress: packets from the pod) drops packets whose
//!   source is not the pod's address, enforces the pod's egress policy, and
//!   steers replies to the agent's source-preserving sockets: the agent
//!   connects to a pod from the remote client pod's own address
//!   (transparent socket), so the pod answers that address; the segment is
//!   assigned to the agent's socket (`bpf_sk_assign`) and marked for local
//!   delivery instead of being routed off the node.
//!
//! Replies to allowed flows always pass; established flows skip the policy
//! lookup until the policy revision changes.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_sock, tcx_action_base::TCX_NEXT},
    helpers::bpf_sk_fullsock,
    macros::classifier,
    programs::TcContext,
};
use trellis_common::{
    AGENT_MARK, CounterKey, PodIface, direction, endpoint_flags, hook, ip_flags, reason, verdict,
};

use crate::{
    conntrack::{self, State},
    counters::count,
    hbone::steer,
    maps::{POD_IFACES, ip_flags_of},
    packet::{self, Flow},
    policy::{self, Decision, FlowInfo},
};

#[classifier]
pub fn trl_pod_to(ctx: TcContext) -> i32 {
    try_pod_to(&ctx).unwrap_or(TCX_NEXT)
}

#[classifier]
pub fn trl_pod_from(ctx: TcContext) -> i32 {
    try_pod_from(&ctx).unwrap_or(TCX_NEXT)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel hands us.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn count_pass(hook: u32, reason: u32, endpoint_id: u32, ctx: &TcContext) {
    count(
        CounterKey {
            hook,
            verdict: verdict::PASS,
            reason,
            endpoint_id,
        },
        u64::from(ctx.len()),
    );
}

#[inline(always)]
fn info(hook: u32, dir: u8, pod: &PodIface, flow: &Flow) -> FlowInfo {
    FlowInfo {
        hook,
        direction: dir,
        endpoint_id: pod.endpoint_id,
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        protocol: flow.protocol,
        src_identity: 0,
        dst_identity: 0,
    }
}

/// What [`enforce`] decided.
#[derive(PartialEq, Eq)]
enum Outcome {
    Drop,
    Pass,
    /// A reply within a flow allowed the other way.
    Reply,
}

/// Policy for a packet that is not control: replies and established flows
/// pass; anything else is judged and recorded.
#[inline(always)]
fn enforce(
    ctx: &TcContext,
    hook: u32,
    dir: u8,
    pod: &PodIface,
    flow: &Flow,
    ifindex: u32,
) -> Outcome {
    let revision = policy::revision();
    let state = conntrack::lookup(flow, dir, ifindex, revision);
    match state {
        State::Reply => {
            count_pass(hook, reason::REPLY, pod.endpoint_id, ctx);
            return Outcome::Reply;
        }
        State::Established => {
            count_pass(hook, reason::ESTABLISHED, pod.endpoint_id, ctx);
            return Outcome::Pass;
        }
        State::New | State::Stale => {}
    }
    let mut info = info(hook, dir, pod, flow);
    let (peer_addr, port) = if dir == direction::INGRESS {
        (flow.saddr, flow.dport)
    } else {
        (flow.daddr, flow.dport)
    };
    let peer = policy::peer(peer_addr);
    if dir == direction::INGRESS {
        info.src_identity = peer.identity;
        info.dst_identity = pod.identity;
    } else {
        info.src_identity = pod.identity;
        info.dst_identity = peer.identity;
    }
    let decision = policy::judge(dir, pod.endpoint_id, peer, flow.protocol, port);
    if decision.allowed {
        conntrack::allow(flow, dir, ifindex, revision, decision.rule_id);
    }
    // Every lookup is a decision and an event: a new flow, or one judged
    // again after a policy change (its 5-tuple may also be a new flow that
    // reuses an old one's ports).
    policy::record(&info, &decision, u64::from(ctx.len()));
    if decision.allowed {
        Outcome::Pass
    } else {
        Outcome::Drop
    }
}

/// Whether `sk` (not null) is a socket of this node's stack. A request or
/// time-wait socket is; a full socket with protocol 0 is not: that is the
/// stand-in BPF_PROG_TEST_RUN attaches, whose packet is judged as one from
/// the wire (the tests run SCTP, which has no sockets here, that way).
#[inline(always)]
fn node_socket(sk: *mut bpf_sock) -> bool {
    // SAFETY: `sk` came from the context and is not null.
    let full = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: checked for null; the verifier allows reading `protocol`.
    full.is_null() || unsafe { (*full).protocol } != 0
}

#[inline(always)]
fn try_pod_to(ctx: &TcContext) -> Result<i32, i64> {
    let ifindex = ifindex(ctx);
    // SAFETY: copied out at once.
    let Some(pod) = (unsafe { POD_IFACES.get(ifindex) }).copied() else {
        return Ok(TCX_NEXT);
    };
    let Some(flow) = packet::flow(ctx)? else {
        return Ok(TCX_NEXT);
    };
    // SAFETY: reading fields of the context the kernel hands us.
    let (sk, mark) = unsafe { ((*ctx.skb.skb).__bindgen_anon_2.sk, (*ctx.skb.skb).mark) };
    let local = !sk.is_null() && node_socket(sk);
    let from_agent = local && mark & AGENT_MARK != 0;
    if mark & AGENT_MARK != 0 {
        ctx.set_mark(mark & !AGENT_MARK);
    }
    if flow.is_syn()
        && pod.flags & endpoint_flags::MESHED != 0
        && pod.strict_on(flow.dport)
        && !local
    {
        let mut info = info(hook::TC_EGRESS, direction::INGRESS, &pod, &flow);
        info.src_identity = policy::peer(flow.saddr).identity;
        info.dst_identity = pod.identity;
        policy::record(
            &info,
            &Decision::deny(reason::PLAINTEXT_IN_STRICT),
            u64::from(ctx.len()),
        );
        return Ok(TC_ACT_SHOT);
    }
    if flow.control {
        count_pass(hook::TC_EGRESS, reason::CONTROL, pod.endpoint_id, ctx);
        return Ok(TCX_NEXT);
    }
    if local {
        // Sent by this node's own stack: the agent (its mark; it judged the
        // connection) or another node process such as kubelet's probes,
        // whatever source address it picked (Kubernetes: always allowed).
        let revision = policy::revision();
        if !matches!(
            conntrack::lookup(&flow, direction::INGRESS, ifindex, revision),
            State::Established
        ) {
            conntrack::allow(&flow, direction::INGRESS, ifindex, revision, 0);
        }
        let reason = if from_agent {
            reason::FROM_AGENT
        } else {
            reason::HOST
        };
        count_pass(hook::TC_EGRESS, reason, pod.endpoint_id, ctx);
        return Ok(TCX_NEXT);
    }
    match enforce(
        ctx,
        hook::TC_EGRESS,
        direction::INGRESS,
        &pod,
        &flow,
        ifindex,
    ) {
        Outcome::Drop => Ok(TC_ACT_SHOT),
        Outcome::Pass | Outcome::Reply => Ok(TCX_NEXT),
    }
}

#[inline(always)]
fn try_pod_from(ctx: &TcContext) -> Result<i32, i64> {
    let ifindex = ifindex(ctx);
    // SAFETY: copied out at once.
    let Some(pod) = (unsafe { POD_IFACES.get(ifindex) }).copied() else {
        return Ok(TCX_NEXT);
    };
    let Some(flow) = packet::flow(ctx)? else {
        return Ok(TCX_NEXT);
    };
    // The kernel cleared it crossing into this namespace; so do we, so no
    // pod ever speaks with the agent's mark.
    ctx.set_mark(0);
    if flow.control && flow.v6 {
        // Neighbour discovery comes from link-local addresses.
        count_pass(hook::TC_INGRESS, reason::CONTROL, pod.endpoint_id, ctx);
        return Ok(TCX_NEXT);
    }
    if !pod.is_own(&flow.saddr, flow.v6) {
        let mut info = info(hook::TC_INGRESS, direction::EGRESS, &pod, &flow);
        info.src_identity = pod.identity;
        policy::record(
            &info,
            &Decision::deny(reason::SPOOFED_SOURCE),
            u64::from(ctx.len()),
        );
        return Ok(TC_ACT_SHOT);
    }
    if flow.control {
        count_pass(hook::TC_INGRESS, reason::CONTROL, pod.endpoint_id, ctx);
        return Ok(TCX_NEXT);
    }
    let outcome = enforce(
        ctx,
        hook::TC_INGRESS,
        direction::EGRESS,
        &pod,
        &flow,
        ifindex,
    );
    if outcome == Outcome::Drop {
        return Ok(TC_ACT_SHOT);
    }
    // Only replies (the agent's SYN made the flow) to a meshed pod elsewhere
    // can belong to a source-preserving socket: the agent takes that
    // address only for HBONE clients, which are meshed pods on other nodes.
    // A new connection never is, even when a listener of the node's stack
    // would match it.
    if outcome == Outcome::Reply
        && ip_flags_of(flow.daddr) & (ip_flags::MESHED | ip_flags::LOCAL) == ip_flags::MESHED
        && let Ok(Some(mut tcp)) = packet::tcp(ctx)
        && steer(ctx, &mut tcp)
    {
        count(
            CounterKey {
                hook: hook::TC_INGRESS,
                verdict: verdict::REDIRECT,
                reason: reason::REPLY_TO_AGENT,
                endpoint_id: pod.endpoint_id,
            },
            u64::from(ctx.len()),
        );
    }
    Ok(TCX_NEXT)
}
