//! Network namespace helpers: a pod's netns cookie (the key of the kernel's
//! endpoint table) and the node-side interface that routes to a pod.

pub mod discover;

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

/// The cookie of the network namespace at `path` (`/var/run/netns/X` or
/// `/proc/PID/ns/net`): a socket made inside it reports it with
/// SO_NETNS_COOKIE, the same value `bpf_get_netns_cookie` gives the hooks.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    let ns = File::open(path)?;
    // setns changes the calling thread only: do it on a thread of its own.
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a descriptor we opened; this thread ends right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: plain socket(2); the result is checked before use.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: fd is a new descriptor we own.
                let sock = unsafe { OwnedFd::from_raw_fd(fd) };
                let mut cookie: u64 = 0;
                let mut len = size_of::<u64>() as libc::socklen_t;
                // SAFETY: cookie and len are valid for the kernel to write.
                let rc = unsafe {
                    libc::getsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_NETNS_COOKIE,
                        (&mut cookie as *mut u64).cast(),
                        &mut len,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(cookie)
            })
            .join()
            .map_err(|_| io::Error::other("netns cookie thread panicked"))?
    })
}

/// The index of the interface this network namespace routes `ip` through by
/// a host route (`ip/32 dev X` or `ip/128 dev X`, as CNIs install for local
/// pods), from `/proc/self/net/route` or `ipv6_route`; `None` when there is
/// no such route.
pub fn host_route_ifindex(ip: IpAddr) -> Option<u32> {
    let ifname = match ip {
        IpAddr::V4(v4) => {
            parse_host_route(&std::fs::read_to_string("/proc/self/net/route").ok()?, v4)?
        }
        IpAddr::V6(v6) => parse_host_route6(
            &std::fs::read_to_string("/proc/self/net/ipv6_route").ok()?,
            v6,
        )?,
    };
    let c_name = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Finds the interface of the /32 route to `ip` in a `/proc/net/route` text
/// (addresses in host-order hex of the network-order bytes).
fn parse_host_route(table: &str, ip: Ipv4Addr) -> Option<String> {
    let want = u32::from_ne_bytes(ip.octets());
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, dest, mask) = (f.first()?, f.get(1)?, f.get(7)?);
        let dest = u32::from_str_radix(dest, 16).ok()?;
        let mask = u32::from_str_radix(mask, 16).ok()?;
        (dest == want && mask == u32::MAX).then(|| (*iface).to_owned())
    })
}

/// Finds the interface of the /128 route to `ip` in a `/proc/net/ipv6_route`
/// text (destination as 32 hex digits, prefix length in hex, interface last).
fn parse_host_route6(table: &str, ip: Ipv6Addr) -> Option<String> {
    let want: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    table.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, len, iface) = (f.first()?, f.get(1)?, f.get(9)?);
        (*dest == want && *len == "80").then(|| (*iface).to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_host_route() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                     eth0\t0000FF0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     vpod1\t0C01010A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_host_route(table, Ipv4Addr::new(10, 1, 1, 12)).as_deref(),
            Some("vpod1")
        );
        assert_eq!(parse_host_route(table, Ipv4Addr::new(10, 1, 1, 13)), None);
    }

    #[test]
    fn finds_the_host_route6() {
        let table = "fd010001000000000000000000000000 40 00000000000000000000000000000000 00 fd000255000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
                     fd01000100000000000000000000000c 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001    vpod1\n";
        assert_eq!(
            parse_host_route6(table, "fd01:1::c".parse().expect("ip")).as_deref(),
            Some("vpod1")
        );
        assert_eq!(
            parse_host_route6(table, "fd01:1::d".parse().expect("ip")),
            None
        );
    }

    #[test]
    fn own_netns_cookie_is_stable() {
        let a = netns_cookie(Path::new("/proc/self/ns/net")).expect("cookie");
        let b = netns_cookie(Path::new("/proc/self/ns/net")).expect("cookie");
        assert_eq!(a, b);
        assert_ne!(a, 0);
    }
}
