//! TC (tcx) on each local pod's host-side interface.
//!
//! - `trl_pod_to` (egress: towards the pod) enforces STRICT mTLS: a new TCP
//!   connection (SYN) to a strict pod must come from this node's own stack
//!   (the agent delivering HBONE or same-node traffic, or kubelet's probes);
//!   a forwarded one (another pod, another node) is plaintext from outside
//!   the mesh and is dropped, counted as `plaintext-in-strict`. Packets sent
//!   by a local socket still carry it here; forwarded ones lost theirs when
//!   the node received them (`ip_rcv` orphans every skb).
//! - `trl_pod_from` (ingress: from the pod) steers replies to the agent's
//!   source-preserving sockets: the agent connects to a pod from the remote
//!   client pod's own address (transparent socket), so the pod answers that
//!   address; the segment is assigned to the agent's socket
//!   (`bpf_sk_assign`) and marked for local delivery instead of being routed
//!   off the node.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, tcx_action_base::TCX_NEXT},
    macros::classifier,
    programs::TcContext,
};
use trellis_common::{CounterKey, hook, ip_flags, reason, verdict};

use crate::{counters::count, hbone::steer, maps::ip_flags_of, packet};

#[classifier]
pub fn trl_pod_to(ctx: TcContext) -> i32 {
    let Ok(Some(tcp)) = packet::tcp(&ctx) else {
        return TCX_NEXT;
    };
    const STRICT_POD: u32 = ip_flags::MESHED | ip_flags::LOCAL | ip_flags::STRICT;
    if !tcp.is_syn() || ip_flags_of(tcp.daddr) & STRICT_POD != STRICT_POD {
        return TCX_NEXT;
    }
    // SAFETY: reading a field of the context the kernel hands us.
    let local = !unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null();
    let (verdict, reason, ret) = if local {
        (verdict::PASS, reason::FROM_NODE, TCX_NEXT)
    } else {
        (verdict::DENY, reason::PLAINTEXT_IN_STRICT, TC_ACT_SHOT)
    };
    count(
        CounterKey {
            hook: hook::TC_EGRESS,
            verdict,
            reason,
            endpoint_id: 0,
        },
        u64::from(ctx.len()),
    );
    ret
}

#[classifier]
pub fn trl_pod_from(ctx: TcContext) -> i32 {
    // Only segments to a meshed pod elsewhere can belong to a
    // source-preserving socket: the agent takes that address only for HBONE
    // clients, which are meshed pods on other nodes.
    if let Ok(Some(mut tcp)) = packet::tcp(&ctx)
        && ip_flags_of(tcp.daddr) & (ip_flags::MESHED | ip_flags::LOCAL) == ip_flags::MESHED
        && steer(&ctx, &mut tcp)
    {
        count(
            CounterKey {
                hook: hook::TC_INGRESS,
                verdict: verdict::REDIRECT,
                reason: reason::REPLY_TO_AGENT,
                endpoint_id: 0,
            },
            u64::from(ctx.len()),
        );
    }
    TCX_NEXT
}
