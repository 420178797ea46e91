//! `sock_ops`: when a captured connection is established, index its original
//! destination by the client's address:port, which is what the agent sees as
//! the peer of the socket it accepts; and put the pod sockets sk_msg acts on
//! into the sockhash: the client socket of a captured connection (active
//! side) and a local pod's socket accepting a connection from the agent
//! (passive side). The agent connects to a local pod from the node's capture
//! address, or, for an HBONE stream, from the client pod's own address: a
//! meshed pod on another node, which reaches a local pod only through the
//! agent (its own node's agent captures its connections into the tunnel).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use trellis_common::{
    CounterKey, IpPort, SockKey, SockState, config_flags, hook, ip_flags, ipv4_mapped, reason,
    verdict,
};

use crate::{
    counters::count,
    maps::{CONFIG, ORIG_BY_COOKIE, ORIG_BY_TUPLE, SOCK_STATE, SOCKETS, ip_flags_of},
};

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
const BPF_ANY: u64 = 0;

#[sock_ops]
pub fn trl_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        _ => {}
    }
    0
}

/// A remote port as `bpf_sock_ops` and `sk_msg_md` give it: network byte
/// order, and on little-endian kernels in the upper half of the word.
#[inline(always)]
pub fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let ops = ctx.ops;
    // Every field first, unconditionally (see `ctx_field!`).
    let family = ctx_field!(ops, family);
    let local_port = ctx_field!(ops, local_port) as u16;
    let peer_port = remote_port(ctx_field!(ops, remote_port));
    let local_ip4 = ctx_field!(ops, local_ip4);
    let remote_ip4 = ctx_field!(ops, remote_ip4);
    let local_ip6 = [
        ctx_field!(ops, local_ip6[0]),
        ctx_field!(ops, local_ip6[1]),
        ctx_field!(ops, local_ip6[2]),
        ctx_field!(ops, local_ip6[3]),
    ];
    let remote_ip6 = [
        ctx_field!(ops, remote_ip6[0]),
        ctx_field!(ops, remote_ip6[1]),
        ctx_field!(ops, remote_ip6[2]),
        ctx_field!(ops, remote_ip6[3]),
    ];
    match family {
        AF_INET => Some(SockKey {
            local: IpPort::v4(local_ip4.to_ne_bytes(), local_port),
            remote: IpPort::v4(remote_ip4.to_ne_bytes(), peer_port),
        }),
        AF_INET6 => Some(SockKey {
            local: IpPort::v6_words(local_ip6, local_port),
            remote: IpPort::v6_words(remote_ip6, peer_port),
        }),
        _ => None,
    }
}

#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    // SAFETY: reads the socket the context belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let Some(key) = sock_key(ctx) else {
        return;
    };
    if ORIG_BY_TUPLE.insert(key.local, orig, 0).is_ok() {
        count(
            CounterKey {
                hook: hook::SOCK_OPS,
                verdict: verdict::PASS,
                reason: reason::INDEXED,
                endpoint_id: orig.endpoint_id,
            },
            0,
        );
    }
    if CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::SK_MSG != 0)
    {
        add_socket(ctx, key, orig.endpoint_id);
    }
}

#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0).copied() else {
        return;
    };
    if cfg.flags & config_flags::SK_MSG == 0 {
        return;
    }
    let Some(key) = sock_key(ctx) else {
        return;
    };
    let from_capture = if key.remote.is_v4_mapped() {
        cfg.capture_ip4 != [0; 4] && key.remote.addr == ipv4_mapped(cfg.capture_ip4)
    } else {
        cfg.capture_ip6 != [0; 16] && key.remote.addr == cfg.capture_ip6
    };
    const HERE: u32 = ip_flags::MESHED | ip_flags::LOCAL;
    let from_agent = from_capture
        || (ip_flags_of(key.remote.addr) & HERE == ip_flags::MESHED
            && ip_flags_of(key.local.addr) & HERE == HERE);
    if from_agent {
        add_socket(ctx, key, 0);
    }
}

#[inline(always)]
fn add_socket(ctx: &SockOpsContext, key: SockKey, endpoint_id: u32) {
    let ops = ctx.ops;
    let sk = ctx_field!(ops, __bindgen_anon_2);
    // SAFETY: the union holds the context's socket pointer.
    let sk = unsafe { sk.sk } as u64;
    // Counting TCP bytes starts here: nothing has been written yet, so the
    // write sequence is the next one to send.
    let state = SockState {
        sk,
        tcp_seq: ctx_field!(ops, snd_nxt),
        ..SockState::default()
    };
    // State first: sk_msg ignores a socket without one.
    if SOCK_STATE.insert(key, state, BPF_ANY).is_err() {
        return;
    }
    // SAFETY: the kernel hands us a valid bpf_sock_ops for this socket.
    let ops = unsafe { &mut *ctx.ops };
    let mut key = key;
    if SOCKETS.update(&mut key, ops, BPF_ANY).is_err() {
        let _ = SOCK_STATE.remove(key);
        return;
    }
    count(
        CounterKey {
            hook: hook::SOCK_OPS,
            verdict: verdict::PASS,
            reason: reason::SOCKHASH_ADDED,
            endpoint_id,
        },
        0,
    );
}
