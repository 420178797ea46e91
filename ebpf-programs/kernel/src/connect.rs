//! `cgroup/connect4`: sees every IPv4 connect() made under the agent's cgroup
//! root. It finds the socket's endpoint by network namespace cookie and counts
//! the decision.

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use trellis_common::{CounterKey, EndpointKey, hook, reason, verdict};

use crate::{counters::count, maps::ENDPOINTS};

/// Return code that lets the connect go on.
const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn trl_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the helper only reads the context the kernel gave us.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let endpoint = unsafe { ENDPOINTS.get(EndpointKey { netns_cookie }) }.copied();
    // SAFETY: the kernel hands us a valid bpf_sock_addr; protocol is readable.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    let (endpoint_id, why) = match endpoint {
        // Connected UDP (DNS lookups, for one) comes through here too.
        _ if protocol != IPPROTO_TCP => (
            endpoint.map_or(0, |e| e.endpoint_id),
            reason::OTHER_PROTOCOL,
        ),
        Some(info) => (info.endpoint_id, reason::NOT_MESH_DESTINATION),
        None => (0, reason::NOT_MESHED),
    };
    count(
        CounterKey {
            hook: hook::CONNECT4,
            verdict: verdict::PASS,
            reason: why,
            endpoint_id,
        },
        0,
    );
    Ok(ALLOW)
}
