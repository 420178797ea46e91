//! Socket options the standard library and tokio do not expose.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `IP_BIND_ADDRESS_NO_PORT`: a later `bind(addr, 0)` fixes only the address,
/// and `connect()` picks the port knowing the destination. Without it, bind
/// picks a port unused by *any* socket on that address, so TIME_WAIT sockets
/// of earlier connections (to any destination) exhaust the port range long
/// before the 4-tuples do.
pub fn bind_address_no_port(socket: BorrowedFd<'_>) -> io::Result<()> {
    set_int(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`: a listener accepts connections
/// addressed to any IP (those TC assigned to it), and a socket may bind a
/// non-local source address.
pub fn set_transparent(socket: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    if v6 {
        set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        set_int(socket, libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1)
    }
}

/// `SO_MARK`: the pod programs know the agent's packets by it.
pub fn set_mark(socket: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

fn set_int(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd, and an int option of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
