//! The agent's proxies: outbound capture on 15001, and the relay they share.

pub mod outbound;
pub mod relay;

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, Span, warn};

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
