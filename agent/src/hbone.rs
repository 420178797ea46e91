//! HBONE, ztunnel's tunnel: each proxied TCP connection is one HTTP/2
//! `CONNECT` stream, `:authority` = the destination pod's `IP:port`, over
//! mTLS to `<destination pod IP>:15008`. Wire-compatible with ztunnel, so a
//! Trellis node and a ztunnel node can talk.
//!
//! - [`server`]: the transparent 15008 listener (TC steers the packets to it)
//!   presenting the dialled workload's certificate.
//! - [`client`]: the pool of tunnels per (source identity, destination
//!   identity, destination address), multiplexed.
//! - [`stream`]: one CONNECT stream as a byte stream.

pub mod client;
pub mod server;
pub mod stream;

use std::time::Duration;

/// Flow control sized for throughput (per stream, per connection) and
/// frames large enough that framing costs little, as ztunnel sizes them.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per tunnel connection; past it the pool opens another connection.
pub const MAX_STREAMS: u32 = 100;
/// A TLS handshake that takes longer is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Both ends ping an HBONE connection every `interval`; a peer that has not
/// answered within `timeout` is gone (a dead node, a cut link), and the
/// connection is closed rather than left to hang its streams. 30 s and 10 s
/// unless `--hbone-keepalive-interval` / `--hbone-keepalive-timeout` say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Keepalive {
    #[serde(with = "crate::config::humantime_serde")]
    pub interval: Duration,
    #[serde(with = "crate::config::humantime_serde")]
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}
/// On shutdown, tunnels get a GOAWAY and this long to finish their streams.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Pings the peer through `ping_pong` every `interval`; completes when a
/// pong does not come back within `timeout` (or the connection is gone).
/// The caller then closes the connection. Without a handle (h2 gives it out
/// once) it never completes.
pub async fn keepalive(ping_pong: Option<h2::PingPong>, every: Keepalive) -> &'static str {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every.interval).await;
        match tokio::time::timeout(every.timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "the connection closed",
            Err(_) => return "the peer did not answer a keepalive ping",
        }
    }
}
