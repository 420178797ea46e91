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
