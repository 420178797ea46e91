//! TC ingress (tcx) on the node's uplink: HBONE arrives addressed to a
//! local pod's `IP:15008`, as ztunnel sends it. This program hands such
//! packets to the agent's socket (its transparent 15008 listener for a new
//! connection, the accepted socket after that) with `bpf_sk_assign`, and
//! marks them so a policy route delivers them locally instead of forwarding
//! them to the pod. The agent then knows from the local address which
//! workload was dialled. Everything else passes untouched.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple, tcx_action_base::TCX_NEXT},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use trellis_common::{
    CounterKey, HBONE_MARK, HBONE_PORT, hook, ip_flags, ipv4_mapped, reason, verdict,
};

use crate::{counters::count, maps::IPCACHE};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;

#[repr(C)]
struct Tuple4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
}

#[repr(C)]
struct Tuple6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

#[classifier]
pub fn trl_hbone_in(ctx: TcContext) -> i32 {
    let _ = try_hbone_in(&ctx);
    TCX_NEXT
}

#[inline(always)]
fn is_local_pod(addr: [u8; 16]) -> bool {
    const WANT: u32 = ip_flags::MESHED | ip_flags::LOCAL;
    IPCACHE
        .get(&Key::new(128, addr))
        .is_some_and(|info| info.flags & WANT == WANT)
}

#[inline(always)]
fn try_hbone_in(ctx: &TcContext) -> Result<(), i64> {
    let proto = u16::from_be(ctx.load::<u16>(12)?);
    match proto {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
                return Ok(());
            }
            let l4 = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
            let mut tuple = Tuple4 {
                saddr: ctx.load(ETH_HLEN + 12)?,
                daddr: ctx.load(ETH_HLEN + 16)?,
                sport: ctx.load(l4)?,
                dport: ctx.load(l4 + 2)?,
            };
            if u16::from_be(tuple.dport) != HBONE_PORT || !is_local_pod(ipv4_mapped(tuple.daddr)) {
                return Ok(());
            }
            steer(ctx, (&raw mut tuple).cast(), size_of::<Tuple4>() as u32);
        }
        ETH_P_IPV6 => {
            // HBONE carries no extension headers: TCP follows at once.
            if ctx.load::<u8>(ETH_HLEN + 6)? != IPPROTO_TCP {
                return Ok(());
            }
            let l4 = ETH_HLEN + 40;
            let mut tuple = Tuple6 {
                saddr: ctx.load(ETH_HLEN + 8)?,
                daddr: ctx.load(ETH_HLEN + 24)?,
                sport: ctx.load(l4)?,
                dport: ctx.load(l4 + 2)?,
            };
            if u16::from_be(tuple.dport) != HBONE_PORT || !is_local_pod(tuple.daddr) {
                return Ok(());
            }
            steer(ctx, (&raw mut tuple).cast(), size_of::<Tuple6>() as u32);
        }
        _ => {}
    }
    Ok(())
}

/// Finds the socket the packet belongs to (an established one first, else
/// the listener, which is bound to the wildcard address) and assigns it.
#[inline(always)]
fn steer(ctx: &TcContext, tuple: *mut bpf_sock_tuple, size: u32) {
    let key = |reason| CounterKey {
        hook: hook::TC_INGRESS,
        verdict: if reason == reason::HBONE_STEERED {
            verdict::REDIRECT
        } else {
            verdict::PASS
        },
        reason,
        endpoint_id: 0,
    };
    let skb = ctx.skb.skb.cast();
    // SAFETY: the tuple lives on our stack and `size` is its size.
    let sk = unsafe { bpf_skc_lookup_tcp(skb, tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        count(key(reason::HBONE_NO_LISTENER), u64::from(ctx.len()));
        return;
    }
    // SAFETY: `sk` is a referenced socket from the lookup, released below.
    let assigned = unsafe { bpf_sk_assign(skb, sk.cast(), 0) } == 0;
    // SAFETY: as above: every acquired socket is released once.
    unsafe { bpf_sk_release(sk.cast()) };
    if assigned {
        ctx.set_mark(HBONE_MARK);
        count(key(reason::HBONE_STEERED), u64::from(ctx.len()));
    } else {
        count(key(reason::HBONE_NO_LISTENER), u64::from(ctx.len()));
    }
}
