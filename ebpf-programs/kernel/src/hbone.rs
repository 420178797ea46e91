//! TC ingress (tcx) on the node's uplink: HBONE arrives addressed to a
//! local pod's `IP:15008`, as ztunnel sends it. This program hands such
//! packets to the agent's socket (its transparent 15008 listener for a new
//! connection, the accepted socket after that) with `bpf_sk_assign`, and
//! marks them so a policy route delivers them locally instead of forwarding
//! them to the pod. The agent then knows from the local address which
//! workload was dialled. Everything else passes untouched.

use aya_ebpf::{
    bindings::tcx_action_base::TCX_NEXT,
    helpers::{bpf_sk_assign, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};
use trellis_common::{CounterKey, HBONE_MARK, HBONE_PORT, hook, ip_flags, reason, verdict};

use crate::{
    counters::count,
    maps::has_flags,
    packet::{self, Tcp},
};

#[classifier]
pub fn trl_hbone_in(ctx: TcContext) -> i32 {
    if let Ok(Some(mut tcp)) = packet::tcp(&ctx)
        && tcp.dport == HBONE_PORT
        && has_flags(tcp.daddr, ip_flags::MESHED | ip_flags::LOCAL)
    {
        let steered = steer(&ctx, &mut tcp);
        let (verdict, reason) = if steered {
            (verdict::REDIRECT, reason::HBONE_STEERED)
        } else {
            (verdict::PASS, reason::HBONE_NO_LISTENER)
        };
        count(
            CounterKey {
                hook: hook::TC_INGRESS,
                verdict,
                reason,
                endpoint_id: 0,
            },
            u64::from(ctx.len()),
        );
    }
    TCX_NEXT
}

/// Finds the socket the segment belongs to (an established one first, else
/// the listener, which is bound to the wildcard address), assigns it, and
/// marks the packet for local delivery. False when there is none.
#[inline(always)]
pub fn steer(ctx: &TcContext, tcp: &mut Tcp) -> bool {
    let sk = tcp.lookup(ctx);
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced socket from the lookup, released below.
    let assigned = unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0) } == 0;
    // SAFETY: as above: every acquired socket is released once.
    unsafe { bpf_sk_release(sk.cast()) };
    if assigned {
        ctx.set_mark(HBONE_MARK);
    }
    assigned
}
