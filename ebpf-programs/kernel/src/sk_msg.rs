//! `sk_msg` on the sockhash: moves data written to one local socket straight
//! into the receive queue of another, around the TCP/IP stack.
//!
//! - An agent socket's data goes to the pod socket at the other end of its
//!   connection (agent → app, agent → local backend, agent → the pod an
//!   HBONE stream is for).
//! - A pod socket's data goes to the agent socket at the other end (app →
//!   agent, backend → agent), or, once the agent has spliced the connection,
//!   straight to the pod socket on the far side of the agent (app ↔ backend).
//!
//! Bytes never overtake each other: a pod socket switches path only when the
//! agent reports that it has forwarded every byte the socket sent so far
//! (`forwarded == sent`), so nothing earlier is still queued on the old path.
//!
//! A redirect never waits for its reader, so each one first checks how much
//! the receiving socket has not read yet; past [`SK_MSG_BACKLOG_MAX`] the
//! bytes take TCP (see there).

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, bpf_sock, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use trellis_common::{
    CounterKey, IpPort, SK_MSG_BACKLOG_MAX, SockKey, hook, reason, sock_flags, sock_mode, verdict,
};

use crate::{
    counters::count,
    maps::{SOCK_STATE, SOCKETS},
    sock,
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

/// Whether bytes may still be redirected into the pod socket under `key`.
/// Once it is found backlogged it is marked, so every writer into it (the
/// agent's socket facing it, a pod spliced to it) stays on TCP. Only the
/// agent's socket, the one writer that can see its own TCP bytes, lifts the
/// mark (`writer`): when the pod has read everything and none of the agent's
/// TCP bytes is still on the way, nothing a redirect could overtake remains.
#[inline(always)]
fn pod_can_take(key: &SockKey, writer: Option<*mut bpf_sock>) -> bool {
    if !sock::known() {
        return false;
    }
    let Some(pod) = SOCK_STATE.get_ptr_mut(*key) else {
        // Not a pod socket of ours: the redirect finds nothing either.
        return true;
    };
    // SAFETY: the entry lives (RCU) while we run; only this bit is written.
    let pod = unsafe { &mut *pod };
    let unread = sock::unread(pod.sk);
    if pod.flags & sock_flags::BACKLOGGED != 0 {
        let drained = unread == 0 && writer.is_some_and(sock::all_acked);
        if !drained {
            return false;
        }
        pod.flags &= !sock_flags::BACKLOGGED;
    }
    if unread != sock::UNREAD_UNKNOWN && unread > SK_MSG_BACKLOG_MAX {
        pod.flags |= sock_flags::BACKLOGGED;
        return false;
    }
    true
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
        let own = ctx_field!(ctx.msg, __bindgen_anon_3);
        // SAFETY: the union holds the context's socket pointer.
        let own = unsafe { own.sk };
        if !pod_can_take(&peer, Some(own)) {
            counted(verdict::PASS, reason::BACKLOGGED, size);
        } else if redirect(ctx, peer) {
            counted(verdict::REDIRECT, reason::TO_PEER, size);
        } else {
            counted(verdict::PASS, reason::CATCHING_UP, size);
        }
        return;
    }

    // A pod socket. `sent` counts every byte before this message, whatever
    // the path: it is the connection's byte count in that direction.
    let Some(seq) = sock::write_seq(state.sk).filter(|_| sock::known()) else {
        counted(verdict::PASS, reason::CATCHING_UP, size);
        return;
    };
    state.tcp_sent += u64::from(seq.wrapping_sub(state.tcp_seq));
    state.tcp_seq = seq;
    let sent = state.redirected + state.tcp_sent;
    // This message included, as the next look will find it.
    state.sent = sent + size;
    // What went to the agent (by TCP or redirect), not around it.
    let to_agent = sent - state.spliced;
    if state.mode == sock_mode::SPLICED {
        if pod_can_take(&state.target, None) {
            if redirect(ctx, state.target) {
                state.redirected += size;
                state.spliced += size;
                counted(verdict::REDIRECT, reason::SPLICED, size);
            } else {
                // The far socket is gone: the connection is ending anyway.
                counted(verdict::PASS, reason::CATCHING_UP, size);
            }
            return;
        }
        // The target fell behind: through the agent from here, at once.
        // Every byte spliced so far is in the target's queue already, and
        // whatever the agent writes to it queues behind them.
        state.mode = sock_mode::PEER;
    }
    // SAFETY: copied out at once.
    let agent = unsafe { SOCK_STATE.get(peer) }
        .copied()
        .filter(|a| a.flags & sock_flags::AGENT != 0);
    let caught_up = agent.is_some_and(|a| a.forwarded == to_agent);
    if let Some(agent) = agent
        && caught_up
        && agent.flags & sock_flags::SPLICE != 0
        && pod_can_take(&agent.target, None)
        && redirect(ctx, agent.target)
    {
        state.mode = sock_mode::SPLICED;
        state.target = agent.target;
        state.redirected += size;
        state.spliced += size;
        counted(verdict::REDIRECT, reason::SPLICED, size);
        return;
    }
    if state.mode == sock_mode::PEER || caught_up {
        // Into the agent's socket, whose unread bytes are what went to the
        // agent and it has not forwarded yet (it publishes its count at
        // least every `SK_MSG_FORWARDED_EVERY` bytes; a stalled agent does
        // not). Back to TCP until the agent has caught up.
        if agent
            .is_some_and(|a| to_agent - a.forwarded.min(to_agent) > u64::from(SK_MSG_BACKLOG_MAX))
        {
            state.mode = sock_mode::CATCHING_UP;
            counted(verdict::PASS, reason::BACKLOGGED, size);
            return;
        }
        if redirect(ctx, peer) {
            state.mode = sock_mode::PEER;
            state.redirected += size;
            counted(verdict::REDIRECT, reason::TO_PEER, size);
            return;
        }
    }
    state.mode = sock_mode::CATCHING_UP;
    counted(verdict::PASS, reason::CATCHING_UP, size);
}
