//! `sock_ops`: when a captured connection is established, index its original
//! destination by the client's address:port, which is what the agent sees as
//! the peer of the socket it accepts.

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use trellis_common::{CounterKey, IpPort, hook, reason, verdict};

use crate::{
    counters::count,
    maps::{ORIG_BY_COOKIE, ORIG_BY_TUPLE},
};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn trl_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && ctx.family() == AF_INET {
        index_original_destination(&ctx);
    }
    0
}

#[inline(always)]
fn index_original_destination(ctx: &SockOpsContext) {
    // SAFETY: reads the socket the context belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    // local_ip4 is in network order, local_port in host order.
    let client = IpPort::v4(ctx.local_ip4().to_ne_bytes(), ctx.local_port() as u16);
    if ORIG_BY_TUPLE.insert(client, orig, 0).is_ok() {
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
}
