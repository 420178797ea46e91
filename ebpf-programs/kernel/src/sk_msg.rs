//! `sk_msg` on the sockhash: moves data written to one local socket straight
//! into the receive queue of another, around the TCP/IP stack.
//!
//! - An agent socket's data goes to the pod socket at the other end of its
//!   connection (agent → app, agent → local backend).
//! - A pod socket's data goes to the agent socket at the other end (app →
//!   agent, backend → agent), or, once the agent has spliced the connection,
//!   straight to the pod socket on the far side of the agent (app ↔ backend).
//!
//! Bytes never overtake each other: a pod socket switches path only when the
//! agent reports that it has forwarded every byte the socket sent so far
//! (`forwarded == sent`), so nothing earlier is still queued on the old path.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use trellis_common::{CounterKey, IpPort, SockKey, hook, reason, sock_flags, sock_mode, verdict};

use crate::{
    counters::count,
    maps::{SOCK_STATE, SOCKETS},
    sock_ops::{AF_INET, AF_INET6, remote_port},
};

#[sk_msg]
pub fn trl_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    // With a redirect set up this sends the data there; without, the normal way.
    SK_PASS
}

#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> Option<(SockKey, u64)> {
    let md = ctx.msg;
    // Every field first, unconditionally: branches would let the compiler
    // share an address computation between loads.
    let size = ctx_field!(md, size);
    let family = ctx_field!(md, family);
    let local_port = ctx_field!(md, local_port);
    let remote_port_raw = ctx_field!(md, remote_port);
    let local_ip4 = ctx_field!(md, local_ip4);
    let remote_ip4 = ctx_field!(md, remote_ip4);
    let local_ip6 = [
        ctx_field!(md, local_ip6[0]),
        ctx_field!(md, local_ip6[1]),
        ctx_field!(md, local_ip6[2]),
        ctx_field!(md, local_ip6[3]),
    ];
    let remote_ip6 = [
        ctx_field!(md, remote_ip6[0]),
        ctx_field!(md, remote_ip6[1]),
        ctx_field!(md, remote_ip6[2]),
        ctx_field!(md, remote_ip6[3]),
    ];
    let (local_port, peer_port) = (local_port as u16, remote_port(remote_port_raw));
    let key = match family {
        AF_INET => SockKey {
            local: IpPort::v4(local_ip4.to_ne_bytes(), local_port),
            remote: IpPort::v4(remote_ip4.to_ne_bytes(), peer_port),
        },
        AF_INET6 => SockKey {
            local: IpPort::v6_words(local_ip6, local_port),
            remote: IpPort::v6_words(remote_ip6, peer_port),
        },
        _ => return None,
    };
    Some((key, u64::from(size)))
}

#[inline(always)]
fn redirect(ctx: &SkMsgContext, to: SockKey) -> bool {
    let mut to = to;
    SOCKETS.redirect_msg(ctx, &mut to, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
}

#[inline(always)]
fn counted(verdict: u32, reason: u32, bytes: u64) {
    count(
        CounterKey {
            hook: hook::SK_MSG,
            verdict,
            reason,
            endpoint_id: 0,
        },
        bytes,
    );
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    let Some((key, size)) = msg_key(ctx) else {
        return;
    };
    let Some(state) = SOCK_STATE.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: the entry lives (RCU) while we run; a socket's sends are
    // serialised by its lock, so no other program writes this entry now.
    let state = unsafe { &mut *state };
    let peer = key.reversed();

    if state.flags & sock_flags::AGENT != 0 {
        // The agent adds its socket only once the pod socket facing it is in
        // the sockhash, before writing a byte: nothing of its own is in flight.
        if redirect(ctx, peer) {
            counted(verdict::REDIRECT, reason::TO_PEER, size);
        } else {
            counted(verdict::PASS, reason::CATCHING_UP, size);
        }
        return;
    }

    // A pod socket. `sent` counts every byte, whatever the path: it is the
    // connection's byte count in that direction.
    let sent = state.sent;
    state.sent = sent + size;
    if state.mode == sock_mode::SPLICED {
        if redirect(ctx, state.target) {
            counted(verdict::REDIRECT, reason::SPLICED, size);
        } else {
            // The far socket is gone: the connection is ending anyway.
            counted(verdict::PASS, reason::CATCHING_UP, size);
        }
        return;
    }
    // SAFETY: copied out at once.
    let agent = unsafe { SOCK_STATE.get(peer) }
        .copied()
        .filter(|a| a.flags & sock_flags::AGENT != 0);
    let caught_up = agent.is_some_and(|a| a.forwarded == sent);
    if let Some(agent) = agent
        && caught_up
        && agent.flags & sock_flags::SPLICE != 0
        && redirect(ctx, agent.target)
    {
        state.mode = sock_mode::SPLICED;
        state.target = agent.target;
        counted(verdict::REDIRECT, reason::SPLICED, size);
        return;
    }
    if (state.mode == sock_mode::PEER || caught_up) && redirect(ctx, peer) {
        state.mode = sock_mode::PEER;
        counted(verdict::REDIRECT, reason::TO_PEER, size);
        return;
    }
    state.mode = sock_mode::CATCHING_UP;
    counted(verdict::PASS, reason::CATCHING_UP, size);
}
