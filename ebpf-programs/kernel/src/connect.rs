//! `cgroup/connect4`, `cgroup/connect6`, `cgroup/sendmsg4/6` and
//! `cgroup/getpeername4/6`.
//!
//! connect sees every `connect()` under the agent's cgroup root. First the
//! endpoint's egress policy: a denied TCP or UDP connect fails with EPERM
//! at once (for a service VIP, only when no backend is allowed: the agent
//! leaves out the denied ones). sendmsg does the same for each unconnected
//! UDP datagram. Then capture: a TCP
//! connect from a meshed pod to a mesh destination (a service VIP:port, or a
//! meshed pod's address) is rewritten to the agent's capture address, and the
//! original destination saved by socket cookie; with `REGISTRY_ONLY`, one to
//! an address the cluster does not know fails with EPERM; everything else
//! goes on untouched. connect6 handles IPv4-mapped destinations (`::ffff:a.b.c.d`)
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
    CounterKey, EndpointInfo, EndpointKey, IpPort, OrigDst, PodIface, config_flags, direction,
    endpoint_flags, hook, identity, ip_flags, reason, verdict,
};

use crate::{
    conntrack,
    counters::count,
    maps::{CONFIG, ENDPOINTS, IPCACHE, ORIG_BY_COOKIE, POD_IFACES, SERVICES},
    policy::{self, Decision, FlowInfo, Peer},
};

/// Return code that lets the syscall go on.
const ALLOW: i32 = 1;
/// Return code that fails it with EPERM.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

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

/// The endpoint the socket's network namespace belongs to.
#[inline(always)]
fn endpoint(ctx: &SockAddrContext) -> Option<EndpointInfo> {
    // SAFETY: the helper only reads the context the kernel gave us.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { ENDPOINTS.get(EndpointKey { netns_cookie }) }.copied()
}

/// The endpoint's interface entry (its addresses).
#[inline(always)]
fn pod_iface(endpoint: &EndpointInfo) -> Option<PodIface> {
    // SAFETY: copied out at once.
    unsafe { POD_IFACES.get(endpoint.ifindex) }.copied()
}

/// Whether `dst` is the endpoint's own address.
#[inline(always)]
fn own_address(endpoint: &EndpointInfo, dst: &IpPort) -> bool {
    pod_iface(endpoint).is_some_and(|pod| pod.is_own(&dst.addr, !dst.is_v4_mapped()))
}

/// The endpoint's egress verdict for `dst` (a service VIP when
/// `service_id` is not 0), counted and recorded as a flow event when
/// `always_record` or denied. True when allowed.
#[inline(always)]
fn egress_allowed(
    hook: u32,
    endpoint: &EndpointInfo,
    dst: &IpPort,
    service_id: u32,
    protocol: u32,
    always_record: bool,
) -> bool {
    let peer = if service_id != 0 {
        Peer {
            identity: identity::service(service_id),
            cidr_identity: 0,
        }
    } else {
        policy::peer(dst.addr)
    };
    let decision = policy::judge(
        direction::EGRESS,
        endpoint.endpoint_id,
        peer,
        protocol as u8,
        dst.port,
    );
    if always_record || !decision.allowed {
        let info = egress_flow(hook, endpoint, dst, protocol, peer.identity);
        policy::record(&info, &decision, 0);
    }
    decision.allowed
}

/// The flow event of `endpoint`'s connect or datagram to `dst`.
#[inline(always)]
fn egress_flow(
    hook: u32,
    endpoint: &EndpointInfo,
    dst: &IpPort,
    protocol: u32,
    dst_identity: u32,
) -> FlowInfo {
    FlowInfo {
        hook,
        direction: direction::EGRESS,
        endpoint_id: endpoint.endpoint_id,
        saddr: [0; 16],
        daddr: dst.addr,
        sport: 0,
        dport: dst.port,
        protocol: protocol as u8,
        src_identity: endpoint.identity,
        dst_identity,
    }
}

#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let endpoint = endpoint(ctx);
    // SAFETY: the kernel hands us a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let endpoint_id = endpoint.map_or(0, |e| e.endpoint_id);
    let hook = if V6 { hook::CONNECT6 } else { hook::CONNECT4 };
    let dst = destination::<V6>(sa);
    // SAFETY: copied out at once.
    let service_id = unsafe { SERVICES.get(dst) }.map_or(0, |s| s.service_id);
    if let Some(endpoint) = &endpoint
        && own_address(endpoint, &dst)
    {
        // Loopback inside the pod: neither judged nor captured.
        return decide::<V6>(verdict::PASS, reason::SELF, endpoint_id);
    }
    if let Some(endpoint) = &endpoint
        && (sa.protocol == IPPROTO_TCP || sa.protocol == IPPROTO_UDP)
        && !egress_allowed(hook, endpoint, &dst, service_id, sa.protocol, true)
    {
        return Err(REFUSE);
    }
    if sa.protocol != IPPROTO_TCP {
        // Connected UDP (DNS lookups, for one) comes through here too.
        return decide::<V6>(verdict::PASS, reason::OTHER_PROTOCOL, endpoint_id);
    }
    let Some(endpoint) = endpoint.filter(|e| e.flags & endpoint_flags::MESHED != 0) else {
        return decide::<V6>(verdict::PASS, reason::NOT_MESHED, endpoint_id);
    };
    let endpoint_id = endpoint.endpoint_id;

    let config = CONFIG.get(0).copied();
    if service_id == 0 {
        let known = IPCACHE.get(&Key::new(128, dst.addr)).copied();
        if !known.is_some_and(|info| info.flags & ip_flags::MESHED != 0) {
            // A pod's, a node's: identities below the CIDR ones. Policy
            // CIDRs in the ipcache name no destination of the cluster.
            let in_cluster = known.is_some_and(|info| info.identity < identity::CIDR_BASE);
            let registry_only = config.is_some_and(|c| c.flags & config_flags::REGISTRY_ONLY != 0);
            if registry_only && !in_cluster && !dst.is_loopback() {
                let info = egress_flow(hook, &endpoint, &dst, IPPROTO_TCP, identity::WORLD);
                policy::record(&info, &Decision::deny(reason::NOT_IN_REGISTRY), 0);
                return Err(REFUSE);
            }
            return decide::<V6>(verdict::PASS, reason::NOT_MESH_DESTINATION, endpoint_id);
        }
    }

    let capture = config
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

#[cgroup_sock_addr(sendmsg4)]
pub fn trl_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn trl_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg::<true>(&ctx)
}

/// An unconnected UDP datagram: the endpoint's egress policy, per datagram
/// (only denials are recorded: allowed flows show at TC).
#[inline(always)]
fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some(endpoint) = endpoint(ctx) else {
        return ALLOW;
    };
    // SAFETY: the kernel hands us a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let dst = destination::<V6>(sa);
    let hook = if V6 { hook::SENDMSG6 } else { hook::SENDMSG4 };
    if own_address(&endpoint, &dst) || is_reply(&endpoint, sa, &dst) {
        return ALLOW;
    }
    if egress_allowed(hook, &endpoint, &dst, 0, IPPROTO_UDP, false) {
        ALLOW
    } else {
        REFUSE
    }
}

/// A UDP server's answer: `dst` sent to this socket's port first, and the
/// pod's ingress policy let it in (a conntrack entry): replies always pass.
#[inline(always)]
fn is_reply(endpoint: &EndpointInfo, sa: &bpf_sock_addr, dst: &IpPort) -> bool {
    // SAFETY: the kernel fills `sk` for sendmsg hooks.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a valid socket pointer from the context; bpf_sock's src_port
    // is in host order.
    let local_port = unsafe { (*sk).src_port } as u16;
    pod_iface(endpoint)
        .and_then(|pod| pod.address(!dst.is_v4_mapped()))
        .is_some_and(|own| {
            conntrack::answers_ingress(
                &dst.addr,
                dst.port,
                &own,
                local_port,
                IPPROTO_UDP as u8,
                endpoint.ifindex,
            )
        })
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
