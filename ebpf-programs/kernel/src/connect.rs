//! `cgroup/connect4`, `cgroup/connect6` and `cgroup/getpeername4/6`.
//!
//! connect sees every `connect()` under the agent's cgroup root. A TCP
//! connect from a meshed pod to a mesh destination (a service VIP:port, or a
//! meshed pod's address) is rewritten to the agent's capture address, and the
//! original destination saved by socket cookie; everything else goes on
//! untouched. connect6 handles IPv4-mapped destinations (`::ffff:a.b.c.d`)
//! like connect4 does, since maps hold IPv4 in that form. getpeername then
//! shows the application the address it asked for.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use trellis_common::{
    CounterKey, EndpointInfo, EndpointKey, IpPort, OrigDst, config_flags, endpoint_flags, hook,
    ip_flags, reason, verdict,
};

use crate::{
    counters::count,
    maps::{CONFIG, ENDPOINTS, IPCACHE, ORIG_BY_COOKIE, SERVICES},
};

/// Return code that lets the syscall go on.
const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn trl_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect::<false>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn trl_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect::<true>(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// The destination in the context. `V6` is the hook's family: the verifier
/// lets each hook touch only its own family's fields, and the constant makes
/// sure the other branch is not even emitted.
#[inline(always)]
fn destination<const V6: bool>(sa: &bpf_sock_addr) -> IpPort {
    let port = u16::from_be(sa.user_port as u16);
    if V6 {
        IpPort::v6_words(sa.user_ip6, port)
    } else {
        IpPort::v4(sa.user_ip4.to_ne_bytes(), port)
    }
}

#[inline(always)]
fn set_destination<const V6: bool>(sa: &mut bpf_sock_addr, to: &IpPort) {
    if V6 {
        let w = to.words();
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
    } else {
        sa.user_ip4 = u32::from_ne_bytes(to.ip4());
    }
    sa.user_port = u32::from(to.port.to_be());
}

#[inline(always)]
fn decide<const V6: bool>(verdict: u32, reason: u32, endpoint_id: u32) -> Result<i32, i32> {
    count(
        CounterKey {
            hook: if V6 { hook::CONNECT6 } else { hook::CONNECT4 },
            verdict,
            reason,
            endpoint_id,
        },
        0,
    );
    Ok(ALLOW)
}

#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the helper only reads the context the kernel gave us.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let endpoint: Option<EndpointInfo> =
        unsafe { ENDPOINTS.get(EndpointKey { netns_cookie }) }.copied();
    // SAFETY: the kernel hands us a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let endpoint_id = endpoint.map_or(0, |e| e.endpoint_id);
    if sa.protocol != IPPROTO_TCP {
        // Connected UDP (DNS lookups, for one) comes through here too.
        return decide::<V6>(verdict::PASS, reason::OTHER_PROTOCOL, endpoint_id);
    }
    let Some(endpoint) = endpoint.filter(|e| e.flags & endpoint_flags::MESHED != 0) else {
        return decide::<V6>(verdict::PASS, reason::NOT_MESHED, endpoint_id);
    };
    let endpoint_id = endpoint.endpoint_id;

    let dst = destination::<V6>(sa);
    // SAFETY: copied out at once.
    let service_id = unsafe { SERVICES.get(dst) }.map_or(0, |s| s.service_id);
    let mesh_pod = service_id == 0
        && IPCACHE
            .get(&Key::new(128, dst.addr))
            .is_some_and(|info| info.flags & ip_flags::MESHED != 0);
    if service_id == 0 && !mesh_pod {
        return decide::<V6>(verdict::PASS, reason::NOT_MESH_DESTINATION, endpoint_id);
    }

    let capture = CONFIG
        .get(0)
        .filter(|cfg| cfg.flags & config_flags::CAPTURE != 0)
        .and_then(|cfg| cfg.capture_for(&dst));
    let Some(capture) = capture else {
        return decide::<V6>(verdict::PASS, reason::NO_CAPTURE_ADDRESS, endpoint_id);
    };

    // SAFETY: reads the socket the context belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        dst,
        endpoint_id,
        service_id,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without the original destination the agent could not serve the
        // connection: leave it alone rather than break it.
        return decide::<V6>(verdict::PASS, reason::NO_CAPTURE_ADDRESS, endpoint_id);
    }
    set_destination::<V6>(sa, &capture);
    decide::<V6>(verdict::REDIRECT, reason::CAPTURED, endpoint_id)
}

#[cgroup_sock_addr(getpeername4)]
pub fn trl_getpeer4(ctx: SockAddrContext) -> i32 {
    original_peer::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn trl_getpeer6(ctx: SockAddrContext) -> i32 {
    original_peer::<true>(&ctx)
}

#[inline(always)]
fn original_peer<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: reads the socket the context belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) }.copied() {
        // SAFETY: the kernel hands us a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        set_destination::<V6>(sa, &orig.dst);
        count(
            CounterKey {
                hook: if V6 {
                    hook::GETPEERNAME6
                } else {
                    hook::GETPEERNAME4
                },
                verdict: verdict::PASS,
                reason: reason::ORIGINAL_PEER,
                endpoint_id: orig.endpoint_id,
            },
            0,
        );
    }
    ALLOW
}
