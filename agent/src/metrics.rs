//! Prometheus metrics on `:15020/metrics` (OpenMetrics text): Istio's
//! standard request and TCP metrics (`istio`), and the agent's and the
//! kernel data path's own under `trellis_*` (`node`), read at scrape time.
//!
//! Scrapes are served by a thread of their own, outside the proxies'
//! runtime, so a slow scraper or a large exposition never delays a packet.

pub mod grpc;
pub mod istio;
pub mod node;
pub mod topology;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use prometheus_client::registry::Registry;
use tracing::{debug, warn};

pub use istio::IstioMetrics;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `registry` on `listener` until the process ends.
pub fn serve(listener: TcpListener, registry: Arc<Registry>) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("trellis-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if let Err(e) = answer(&mut stream, &registry) {
                    debug!(error = %e, "metrics scrape failed");
                }
            }
            warn!(%addr, "the metrics listener stopped");
        })?;
    Ok(())
}

fn answer(stream: &mut std::net::TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|b| *b == b' ');
    let (method, path) = (words.next(), words.next());
    let path = path.map(|p| p.split(|b| *b == b'?').next().unwrap_or_default());
    let (status, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => {
            let mut text = String::with_capacity(64 * 1024);
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => ("200 OK", CONTENT_TYPE, text),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        _ => ("404 Not Found", "text/plain", "try GET /metrics\n".into()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())
}

/// Binds the metrics listener (in the node's network namespace).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}
