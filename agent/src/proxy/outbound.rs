//! Outbound: a captured connection arrives on 15001 from a local pod. Its
//! original destination comes from the kernel (indexed by sock_ops under the
//! client's address:port); a service VIP resolves to a ready backend, round
//! robin; the agent connects and splices bytes both ways, half-close included.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::{
    bpf::tables::OrigDstTable,
    state::Snapshot,
    sync::{ip_port, socket_addr},
};

/// Limits of the outbound proxy.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OutboundConfig {
    /// Connecting to a backend gives up after this.
    pub connect_timeout: Duration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a captured connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no original destination for {peer}: not a captured connection (refused)")]
    NoOriginalDestination { peer: SocketAddr },
    #[error("service {service} has no ready backend for port {port}")]
    NoBackend { service: String, port: u16 },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
}

/// Counters of the outbound proxy (exported as metrics by the observability work).
#[derive(Debug, Default, Serialize)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub completed: AtomicU64,
    pub no_original_destination: AtomicU64,
    pub no_backend: AtomicU64,
    pub connect_failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// The outbound proxy's shared state.
pub struct Outbound {
    config: OutboundConfig,
    orig: OrigDstTable,
    state: watch::Receiver<Arc<Snapshot>>,
    next: Mutex<HashMap<(String, u16), usize>>,
    pub stats: OutboundStats,
}

impl Outbound {
    pub fn new(
        config: OutboundConfig,
        orig: OrigDstTable,
        state: watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        Self {
            config,
            orig,
            state,
            next: Mutex::new(HashMap::new()),
            stats: OutboundStats::default(),
        }
    }

    /// Accepts captured connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let span = info_span!("outbound", src = %peer, dst = tracing::field::Empty);
            tokio::spawn(
                async move {
                    if let Err(e) = this.handle(stream, peer).await {
                        warn!(error = %e, "connection closed");
                    }
                }
                .instrument(span),
            );
        }
    }

    /// Where the connection from `peer` goes: its original destination, or
    /// for a service VIP one of its ready backends.
    pub fn resolve(&self, peer: SocketAddr) -> Result<(SocketAddr, SocketAddr), OutboundError> {
        let orig = self
            .orig
            .get(&ip_port(peer.ip(), peer.port()))
            .ok_or_else(|| {
                self.stats
                    .no_original_destination
                    .fetch_add(1, Ordering::Relaxed);
                OutboundError::NoOriginalDestination { peer }
            })?;
        let dst = socket_addr(&orig.dst);
        if orig.service_id == 0 {
            return Ok((dst, dst));
        }
        let snapshot = self.state.borrow().clone();
        let no_backend = |service: String| {
            self.stats.no_backend.fetch_add(1, Ordering::Relaxed);
            OutboundError::NoBackend {
                service,
                port: dst.port(),
            }
        };
        let (svc, port) = snapshot
            .service_for(dst)
            .ok_or_else(|| no_backend(dst.to_string()))?;
        let usable: Vec<SocketAddr> = svc
            .backends
            .get(&port.port)
            .into_iter()
            .flatten()
            .filter(|b| b.usable())
            .map(|b| b.addr)
            .collect();
        if usable.is_empty() {
            return Err(no_backend(svc.id()));
        }
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let slot = next.entry((svc.id(), port.port)).or_insert(0);
        let backend = usable[*slot % usable.len()];
        *slot = slot.wrapping_add(1);
        Ok((dst, backend))
    }

    async fn handle(&self, mut inbound: TcpStream, peer: SocketAddr) -> Result<(), OutboundError> {
        let (dst, backend) = match self.resolve(peer) {
            Ok(route) => route,
            Err(e) => {
                // Reset rather than FIN: the client must not mistake this for an answer.
                let _ = inbound.set_zero_linger();
                return Err(e);
            }
        };
        tracing::Span::current().record("dst", tracing::field::display(dst));
        let timeout = self.config.connect_timeout;
        let mut upstream = match tokio::time::timeout(timeout, TcpStream::connect(backend)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                let _ = inbound.set_zero_linger();
                return Err(OutboundError::Connect {
                    addr: backend,
                    source,
                });
            }
            Err(_) => {
                self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                let _ = inbound.set_zero_linger();
                return Err(OutboundError::ConnectTimeout {
                    addr: backend,
                    after: timeout,
                });
            }
        };
        let _ = upstream.set_nodelay(true);
        let _ = inbound.set_nodelay(true);
        debug!(%dst, %backend, "connected");
        // copy_bidirectional forwards a FIN each way (half-close) and ends
        // when both directions are done.
        match tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await {
            Ok((sent, received)) => {
                self.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
                self.stats
                    .bytes_received
                    .fetch_add(received, Ordering::Relaxed);
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                debug!(%dst, %backend, sent, received, "closed");
            }
            Err(e) => debug!(%dst, %backend, error = %e, "closed with an error"),
        }
        Ok(())
    }
}
