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
    let on: libc::c_int = 1;
    // SAFETY: a valid fd, and an int option of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
