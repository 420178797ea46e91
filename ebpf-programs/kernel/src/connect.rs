//! `cgroup/connect4` and `cgroup/getpeername4`.
//!
//! connect4 sees every IPv4 `connect()` under the agent's cgroup root. A TCP
//! connect from a meshed pod to a mesh destination (a service VIP:port, or a
//! meshed pod's address) is rewritten to the agent's capture address, and the
//! original destination saved by socket cookie; everything else goes on
//! untouched. getpeername4 then shows the application the address it asked for.

use aya_ebpf::{
    EbpfContext as _,
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
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[inline(always)]
fn decide(hook: u32, verdict: u32, reason: u32, endpoint_id: u32) -> Result<i32, i32> {
    count(
        CounterKey {
            hook,
            verdict,
            reason,
            endpoint_id,
        },
        0,
    );
    Ok(ALLOW)
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
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
        return decide(
            hook::CONNECT4,
            verdict::PASS,
            reason::OTHER_PROTOCOL,
            endpoint_id,
        );
    }
    let Some(endpoint) = endpoint.filter(|e| e.flags & endpoint_flags::MESHED != 0) else {
        return decide(
            hook::CONNECT4,
            verdict::PASS,
            reason::NOT_MESHED,
            endpoint_id,
        );
    };

    let dst = IpPort::v4(sa.user_ip4.to_ne_bytes(), u16::from_be(sa.user_port as u16));
    // SAFETY: copied out at once.
    let service_id = unsafe { SERVICES.get(dst) }.map_or(0, |s| s.service_id);
    let mesh_pod = service_id == 0
        && IPCACHE
            .get(&Key::new(128, dst.addr))
            .is_some_and(|info| info.flags & ip_flags::MESHED != 0);
    if service_id == 0 && !mesh_pod {
        return decide(
            hook::CONNECT4,
            verdict::PASS,
            reason::NOT_MESH_DESTINATION,
            endpoint.endpoint_id,
        );
    }

    let Some(cfg) = CONFIG.get(0).copied() else {
        return decide(
            hook::CONNECT4,
            verdict::PASS,
            reason::NO_CAPTURE_ADDRESS,
            endpoint.endpoint_id,
        );
    };
    if cfg.capture_port == 0 || cfg.flags & config_flags::CAPTURE == 0 {
        return decide(
            hook::CONNECT4,
            verdict::PASS,
            reason::NO_CAPTURE_ADDRESS,
            endpoint.endpoint_id,
        );
    }

    // SAFETY: reads the socket the context belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        dst,
        endpoint_id: endpoint.endpoint_id,
        service_id,
    };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without the original destination the agent could not serve the
        // connection: leave it alone rather than break it.
        return decide(
            hook::CONNECT4,
            verdict::PASS,
            reason::NO_CAPTURE_ADDRESS,
            endpoint.endpoint_id,
        );
    }
    sa.user_ip4 = u32::from_ne_bytes(cfg.capture_ip4);
    sa.user_port = u32::from(cfg.capture_port.to_be());
    decide(
        hook::CONNECT4,
        verdict::REDIRECT,
        reason::CAPTURED,
        endpoint.endpoint_id,
    )
}

#[cgroup_sock_addr(getpeername4)]
pub fn trl_getpeer4(ctx: SockAddrContext) -> i32 {
    // SAFETY: reads the socket the context belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) }.copied() {
        // SAFETY: the kernel hands us a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = orig.dst.addr;
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(orig.dst.port.to_be());
        count(
            CounterKey {
                hook: hook::GETPEERNAME4,
                verdict: verdict::PASS,
                reason: reason::ORIGINAL_PEER,
                endpoint_id: orig.endpoint_id,
            },
            0,
        );
    }
    ALLOW
}
