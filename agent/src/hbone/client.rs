//! The HBONE client: tunnels to `<destination pod IP>:15008`, pooled per
//! (source identity, destination identity, destination address) and
//! multiplexed up to [`MAX_STREAMS`] streams each. A connection that fails
//! is dropped from the pool and the stream retried once on a new one.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tracing::{Instrument as _, debug, warn};

use super::{CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW};
use crate::{
    hbone::stream::H2Stream,
    identity::{Identity, manager::CertManager, svid::Svid},
    tls,
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error(transparent)]
    Connect(#[from] crate::proxy::ConnectError),
    #[error("TLS handshake with {addr} timed out after {after:?}")]
    TlsTimeout { addr: SocketAddr, after: Duration },
    #[error("TLS to {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 to {addr}: {source}")]
    H2 {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("the tunnel to {addr} this connection waited for failed: {reason}")]
    SharedDial { addr: SocketAddr, reason: String },
    #[error("{addr} answered {status} to CONNECT {target}")]
    Refused {
        addr: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    dst: Identity,
    addr: SocketAddr,
}

struct Pooled {
    send: h2::client::SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    id: u64,
    /// The serial of the certificate it was made with: once the workload
    /// has a new one, new streams go on a new connection.
    serial: String,
    /// When the first of the two certificates expires: no new streams after.
    until: SystemTime,
}

/// A dial that failed, for those that waited on it.
struct Failed {
    at: Instant,
    reason: String,
}

/// Holds a stream's slot in its connection until dropped.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open HBONE stream and its hold on the pooled connection.
pub type Opened = (H2Stream, StreamGuard);

/// One pooled connection, for `trellis status`.
#[derive(Debug, Serialize)]
pub struct PoolEntry {
    pub src: String,
    pub dst: String,
    pub addr: SocketAddr,
    pub streams: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct PoolStats {
    pub connections_opened: AtomicU64,
    /// Opens that waited for another's dial and used its connection.
    pub dials_shared: AtomicU64,
    pub streams_opened: AtomicU64,
    pub failures: AtomicU64,
    /// Connections given no more streams because a certificate was renewed
    /// or expires (their running streams finish on them).
    pub retired: AtomicU64,
}

pub struct Pool {
    certs: Arc<CertManager>,
    connect_timeout: Duration,
    keepalive: super::Keepalive,
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// One dial at a time per key: connections that start together wait for
    /// the first one's tunnel and share it, instead of a handshake each. The
    /// gate keeps the last failed dial, so those waiting fail with it at once
    /// rather than each trying (and timing out) in turn.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<Option<Failed>>>>>,
    next_id: AtomicU64,
    pub stats: PoolStats,
}

impl Pool {
    pub fn new(certs: Arc<CertManager>, connect_timeout: Duration) -> Self {
        Self {
            certs,
            connect_timeout,
            keepalive: super::Keepalive::default(),
            conns: Mutex::default(),
            dialing: Mutex::default(),
            next_id: AtomicU64::new(1),
            stats: PoolStats::default(),
        }
    }

    #[must_use]
    pub fn with_keepalive(mut self, keepalive: super::Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// The pooled connections and their open streams.
    pub fn list(&self) -> Vec<PoolEntry> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PoolEntry> = conns
            .iter()
            .flat_map(|(k, v)| {
                v.iter().map(|p| PoolEntry {
                    src: k.src.to_string(),
                    dst: k.dst.to_string(),
                    addr: k.addr,
                    streams: p.active.load(Ordering::Relaxed),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.src, &a.dst, a.addr).cmp(&(&b.src, &b.dst, b.addr)));
        out
    }

    /// Opens a CONNECT stream from workload `src` to `target` (a pod's
    /// `IP:port`) running as `dst`, through `target`'s IP on 15008;
    /// `source` is the node address to dial from, `client` the app's
    /// address for the `forwarded` header, `hint` what the stream carries
    /// when it is HTTP (see [`super::server::PROTOCOL_HINT`]).
    pub async fn open(
        &self,
        src: &Identity,
        dst: &Identity,
        target: SocketAddr,
        source: Option<IpAddr>,
        client: SocketAddr,
        hint: Option<&'static str>,
    ) -> Result<Opened, HboneError> {
        let key = PoolKey {
            src: src.clone(),
            dst: dst.clone(),
            addr: SocketAddr::new(target.ip(), trellis_common::HBONE_PORT),
        };
        let svid = self
            .certs
            .get(&key.src)
            .map_err(|e| HboneError::Certificate {
                identity: key.src.to_string(),
                reason: e.to_string(),
            })?;
        let mut last = None;
        for _ in 0..2 {
            let (send, active, id) = match self.checkout(&key, &svid.info.serial) {
                Some(found) => found,
                None => self.dial_once(&key, source, &svid).await?,
            };
            match self.request(send, target, client, hint, &key).await {
                Ok(stream) => {
                    self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
                    return Ok((stream, StreamGuard(active)));
                }
                Err(e @ HboneError::Refused { .. }) => {
                    active.fetch_sub(1, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) => {
                    // The connection is broken: forget it, try a fresh one.
                    active.fetch_sub(1, Ordering::Relaxed);
                    self.evict(&key, id);
                    last = Some(e);
                }
            }
        }
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        Err(last.expect("two attempts failed"))
    }

    /// A pooled connection made with the certificate `serial`, with a free
    /// stream slot, its slot taken. Connections made with an older
    /// certificate, or whose certificates are about to expire, leave the
    /// pool.
    fn checkout(
        &self,
        key: &PoolKey,
        serial: &str,
    ) -> Option<(h2::client::SendRequest<Bytes>, Arc<AtomicUsize>, u64)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        let now = SystemTime::now();
        let before = list.len();
        list.retain(|p| p.serial == serial && now < p.until);
        if list.len() != before {
            self.stats
                .retired
                .fetch_add((before - list.len()) as u64, Ordering::Relaxed);
            debug!(src = %key.src, dst = %key.dst, "renewed or expiring certificate: new streams go on a new connection");
        }
        let p = list
            .iter()
            .find(|p| p.active.load(Ordering::Relaxed) < MAX_STREAMS as usize)?;
        p.active.fetch_add(1, Ordering::Relaxed);
        Some((p.send.clone(), p.active.clone(), p.id))
    }

    /// Shutdown: forget every pooled connection, so each closes (with
    /// GOAWAY) as soon as its running streams end.
    pub fn drain(&self) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn evict(&self, key: &PoolKey, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = conns.get_mut(key) {
            list.retain(|p| p.id != id);
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    /// A slot on a new connection, unless another open for the same key is
    /// dialing already: then, once it is done, a slot on its connection.
    async fn dial_once(
        &self,
        key: &PoolKey,
        source: Option<IpAddr>,
        svid: &Svid,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicUsize>, u64), HboneError> {
        let gate = {
            let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            dialing.entry(key.clone()).or_default().clone()
        };
        let waited_from = Instant::now();
        let result = {
            let mut last_failed = gate.lock().await;
            match self.checkout(key, &svid.info.serial) {
                Some(found) => {
                    self.stats.dials_shared.fetch_add(1, Ordering::Relaxed);
                    Ok(found)
                }
                None => match last_failed.as_ref().filter(|f| f.at >= waited_from) {
                    Some(failed) => Err(HboneError::SharedDial {
                        addr: key.addr,
                        reason: failed.reason.clone(),
                    }),
                    None => {
                        let dialed = self.dial(key, source, svid).await;
                        if let Err(e) = &dialed {
                            *last_failed = Some(Failed {
                                at: Instant::now(),
                                reason: e.to_string(),
                            });
                        }
                        dialed
                    }
                },
            }
        };
        let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
        // The last one out (the map's and this reference left) removes it.
        if Arc::strong_count(&gate) == 2 {
            dialing.remove(key);
        }
        result
    }

    async fn dial(
        &self,
        key: &PoolKey,
        source: Option<IpAddr>,
        svid: &Svid,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicUsize>, u64), HboneError> {
        let addr = key.addr;
        let config =
            tls::client_config(svid, key.dst.clone(), self.certs.bundle()).map_err(|e| {
                HboneError::Certificate {
                    identity: key.src.to_string(),
                    reason: e.to_string(),
                }
            })?;
        let tcp = crate::proxy::connect_from(
            addr,
            source.map_or(crate::proxy::Source::Any, crate::proxy::Source::Node),
            self.connect_timeout,
        )
        .await?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(ServerName::IpAddress(addr.ip().into()), tcp),
        )
        .await
        .map_err(|_| HboneError::TlsTimeout {
            addr,
            after: HANDSHAKE_TIMEOUT,
        })?
        .map_err(|source| HboneError::Tls { addr, source })?;
        let peer_until = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::not_after);
        let until = peer_until.map_or(svid.info.not_after, |t| t.min(svid.info.not_after));
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.stats
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        let active = Arc::new(AtomicUsize::new(1));
        {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.entry(key.clone()).or_default().push(Pooled {
                send: send.clone(),
                active: active.clone(),
                id,
                serial: svid.info.serial.clone(),
                until,
            });
        }
        debug!(%addr, src = %key.src, dst = %key.dst, "HBONE connection up");
        let every = self.keepalive;
        tokio::spawn(
            async move {
                let keepalive = super::keepalive(connection.ping_pong(), every);
                tokio::select! {
                    result = connection => if let Err(e) = result {
                        debug!(%addr, error = %e, "HBONE connection ended");
                    },
                    // Dropping the connection fails its streams; the pool
                    // evicts it at its next use.
                    reason = keepalive => {
                        warn!(%addr, reason, "HBONE connection closed");
                    }
                }
            }
            .in_current_span(),
        );
        Ok((send, active, id))
    }

    async fn request(
        &self,
        send: h2::client::SendRequest<Bytes>,
        target: SocketAddr,
        client: SocketAddr,
        hint: Option<&'static str>,
        key: &PoolKey,
    ) -> Result<H2Stream, HboneError> {
        let addr = key.addr;
        let h2err = |source| HboneError::H2 { addr, source };
        let mut send = send.ready().await.map_err(h2err)?;
        let mut request = Request::builder();
        if let Some(hint) = hint {
            request = request.header(super::server::PROTOCOL_HINT, hint);
        }
        let request = request
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for=\"{client}\""))
            .header(
                "baggage",
                format!(
                    "k8s.namespace.name={},k8s.serviceaccount.name={}",
                    key.src.namespace, key.src.service_account
                ),
            )
            .body(())
            .expect("a CONNECT request from valid parts");
        let (response, stream) = send.send_request(request, false).map_err(h2err)?;
        let response = response.await.map_err(h2err)?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                addr,
                target,
                status: response.status(),
            });
        }
        Ok(H2Stream::new(stream, response.into_body()))
    }
}
