//! The agent's proxies: outbound capture on 15001, and the relay they share.

pub mod affinity;
pub mod busy_poll;
mod client_idle;
mod deadline;
pub mod detect;
mod ext_auth;
mod grpc_deadline;
mod grpc_web;
pub mod http;
pub mod inbound_http;
pub mod outbound;
mod pool;
pub mod relay;
pub mod telemetry;

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{Instrument as _, Span, debug, warn};

/// Why an upstream connection (to a backend, or to a peer node's 15008)
/// could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Failed {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

/// Where an upstream connection comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The kernel picks.
    Any,
    /// The node's own address (ignored when not of the destination's family).
    Node(IpAddr),
    /// Another host's address, a remote client pod's, through a transparent
    /// socket: the app sees its client's own address. TC steers the replies
    /// back (`trl_pod_from`).
    Client(IpAddr),
}

/// Connects to `addr` from `source`, giving up after `timeout`. The source
/// is bound without fixing the port (`IP_BIND_ADDRESS_NO_PORT`), so
/// TIME_WAIT sockets never exhaust the port range. A node address that
/// cannot be bound is left to the kernel; a client address that cannot be
/// bound is an error (the caller decides whether to fall back).
pub async fn connect_from(
    addr: SocketAddr,
    source: Source,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let connect = async {
        let socket = if addr.is_ipv6() {
            TcpSocket::new_v6()
        } else {
            TcpSocket::new_v4()
        }?;
        // The pod programs let the agent's own connections through (it
        // judged them): they know them by this mark, never by address.
        crate::sockopt::set_mark(socket.as_fd(), trellis_common::AGENT_MARK)?;
        match source {
            Source::Any => {}
            Source::Node(ip) if ip.is_ipv6() != addr.is_ipv6() => {}
            Source::Node(ip) => {
                if let Err(e) = crate::sockopt::bind_address_no_port(socket.as_fd())
                    .and_then(|()| socket.bind(SocketAddr::new(ip, 0)))
                {
                    debug!(source = %ip, error = %e, "cannot connect from the node address; letting the kernel pick");
                }
            }
            Source::Client(ip) => {
                crate::sockopt::set_transparent(socket.as_fd(), addr.is_ipv6())?;
                crate::sockopt::bind_address_no_port(socket.as_fd())?;
                socket.bind(SocketAddr::new(ip, 0))?;
            }
        }
        socket.connect(addr).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Failed { addr, source }),
        Err(_) => Err(ConnectError::Timeout {
            addr,
            after: timeout,
        }),
    }
}

/// Accepts connections until the task is dropped, each served by its own
/// task in the span `span` makes for it. A failed accept (out of file
/// descriptors, say) is logged and retried shortly, never fatal.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    span: impl Fn(SocketAddr) -> Span,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve(stream, peer).instrument(span(peer)));
            }
            Err(e) => {
                warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs `relay` to its end, unless `revoked` completes first (the network
/// policy no longer allows the connection): then the relayed sockets, of
/// which `resets` are duplicates, are closed with a reset, and the reason
/// is returned.
pub async fn until_revoked<F: Future>(
    relay: F,
    revoked: impl Future<Output = &'static str>,
    resets: Vec<std::os::fd::OwnedFd>,
) -> Result<F::Output, &'static str> {
    let outcome = tokio::select! {
        out = relay => Ok(out),
        reason = revoked => {
            for fd in &resets {
                let _ = socket2::SockRef::from(fd).set_linger(Some(std::time::Duration::ZERO));
            }
            Err(reason)
        }
    };
    // The relay's own descriptors are gone now; closing these last sends
    // the reset.
    drop(resets);
    outcome
}

/// Duplicates of the sockets' descriptors, for [`until_revoked`] (one
/// that cannot be duplicated is left out: it closes without a reset).
pub fn duplicates(sockets: &[std::os::fd::BorrowedFd<'_>]) -> Vec<std::os::fd::OwnedFd> {
    sockets
        .iter()
        .filter_map(|fd| fd.try_clone_to_owned().ok())
        .collect()
}
