//! The HBONE server on 15008. Its listener is transparent: `trl_hbone_in`
//! hands it connections addressed to local pods' `IP:15008`, so the accepted
//! socket's local address names the dialled workload, whose certificate the
//! agent presents. The client's identity comes from its certificate alone.
//! Each CONNECT stream gets 200 once the upstream connection is made, 400
//! for a bad request or a destination other than the dialled pod, 503 when
//! the upstream connect fails, 401 when an authorization policy denies it.
//! When the destination's policy has HTTP conditions, the stream is served
//! as HTTP and each request is authorized (`proxy::inbound_http`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument as _, debug, info, info_span, warn};
use trellis_common::{SockKey, SockState, direction};

use super::{CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW};

/// A stream's work: its bytes in and out, or why it ended.
type Served<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(u64, u64), String>> + Send + 'a>>;

/// How long a stream that L7 authorization rules apply to may stay silent
/// before it is taken for a server-first protocol (opaque TCP).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

/// A CONNECT request header by which a Trellis agent's L7 path says what
/// the stream carries (`http/1.1` or `h2`), so the destination's agent can
/// serve it as HTTP (for its spans) without waiting to sniff. Other HBONE
/// peers ignore it; without it a stream is opaque unless L7 authorization
/// needs it read.
pub const PROTOCOL_HINT: &str = "x-trellis-protocol";
use crate::{
    bpf::sockets::SocketMaps,
    hbone::stream::H2Stream,
    identity::{Identity, manager::CertManager},
    metrics::{
        IstioMetrics,
        istio::{OpenConnection, Peer, Reporter, ServiceName, TcpLabels, Traffic},
    },
    policy::telemetry::Side,
    policy::{
        authz::{self, Verdict},
        verdict::{Standing, Verdicts},
    },
    proxy::{Source, connect_from, detect, http::Io, inbound_http, relay},
    state::Snapshot,
    tls,
};

/// Counters of the HBONE server (exported as metrics by the observability work).
#[derive(Debug, Default, Serialize)]
pub struct InboundStats {
    pub connections: AtomicU64,
    /// Tunnel connections open now.
    pub open: AtomicU64,
    /// Closed before HTTP/2: not a local meshed pod, TLS failed, no identity.
    pub rejected: AtomicU64,
    pub streams: AtomicU64,
    pub bad_requests: AtomicU64,
    pub upstream_failed: AtomicU64,
    /// Streams whose upstream connection kept the client pod's address.
    pub source_preserved: AtomicU64,
    /// Streams refused with 401 by an authorization policy.
    pub denied: AtomicU64,
    /// Streams refused with 401 by the destination's ingress network policy.
    pub policy_denied: AtomicU64,
    /// Open streams reset because a policy change denies them now.
    pub policy_revoked: AtomicU64,
    /// Streams served as HTTP so that L7 authorization rules apply to each
    /// request, requests those rules denied (403 / `PERMISSION_DENIED`), and
    /// streams reset because they were not HTTP and L4 rules alone deny them.
    pub http_inspected: AtomicU64,
    /// Streams served as HTTP for destination-side spans and request
    /// metrics (tracing on, and the calling agent said they carry HTTP).
    pub http_traced: AtomicU64,
    pub requests_denied: AtomicU64,
    /// Requests refused because their token did not verify.
    pub requests_unauthenticated: AtomicU64,
    pub opaque_denied: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Streams whose socket to the pod went into the sockhash: sk_msg moves
    /// their bytes between the agent and the pod around the TCP/IP stack.
    pub accelerated: AtomicU64,
    /// Connections closed because the client stopped answering pings.
    pub keepalive_timeouts: AtomicU64,
}

pub struct Inbound {
    node: String,
    trust_domain: String,
    certs: Arc<CertManager>,
    state: watch::Receiver<Arc<Snapshot>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    keepalive: super::Keepalive,
    /// Set on shutdown: every tunnel sends GOAWAY and finishes its streams.
    draining: watch::Sender<bool>,
    /// One TLS config per local identity, rebuilt when its certificate is
    /// (the bundle is read at every handshake, so it needs no rebuild).
    configs: Mutex<HashMap<Identity, (String, Arc<rustls::ServerConfig>)>>,
    /// Network policy verdicts.
    policy: Option<Arc<Verdicts>>,
    metrics: Option<Arc<IstioMetrics>>,
    tracer: Option<Arc<crate::trace::Tracer>>,
    /// Asks CUSTOM policies' providers.
    authorizer: Option<crate::proxy::outbound::Authorizer>,
    /// The sockhash, when sk_msg is on.
    sockets: Option<Arc<SocketMaps>>,
    pub stats: InboundStats,
}

/// Why a tunnel connection was closed before any stream.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("dialled {0}, which is not a meshed pod on this node")]
    NotLocal(SocketAddr),
    #[error("no certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("TLS handshake timed out after {0:?}")]
    TlsTimeout(Duration),
    #[error("the client certificate carries no SPIFFE identity")]
    NoPeerIdentity,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("closed: {0}")]
    Keepalive(&'static str),
    #[error("the client did not negotiate ALPN h2")]
    NoAlpn,
}

impl Inbound {
    pub fn new(
        node: &str,
        trust_domain: &str,
        certs: Arc<CertManager>,
        state: watch::Receiver<Arc<Snapshot>>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            node: node.into(),
            trust_domain: trust_domain.into(),
            certs,
            state,
            connect_timeout,
            idle_timeout,
            keepalive: super::Keepalive::default(),
            draining: watch::Sender::new(false),
            configs: Mutex::default(),
            policy: None,
            metrics: None,
            tracer: None,
            authorizer: None,
            sockets: None,
            stats: InboundStats::default(),
        }
    }

    /// Requests that CUSTOM policies match are put to their providers with
    /// `authorizer` (without one they are refused).
    #[must_use]
    pub fn with_authorizer(mut self, authorizer: crate::proxy::outbound::Authorizer) -> Self {
        self.authorizer = Some(authorizer);
        self
    }

    #[must_use]
    pub fn with_keepalive(mut self, keepalive: super::Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Enforces the destination pods' ingress network policy.
    #[must_use]
    pub fn with_policy(mut self, verdicts: Arc<Verdicts>) -> Self {
        self.policy = Some(verdicts);
        self
    }

    /// Records Istio's standard metrics (reporter `destination`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<IstioMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Traces requests on streams that carry HTTP (see [`PROTOCOL_HINT`]).
    #[must_use]
    pub fn with_tracer(mut self, tracer: Arc<crate::trace::Tracer>) -> Self {
        self.tracer = Some(tracer);
        self
    }

    /// Moves the bytes between the agent and the pods around the TCP/IP
    /// stack (sk_msg), as on the same-node path.
    #[must_use]
    pub fn with_sockets(mut self, sockets: Option<Arc<SocketMaps>>) -> Self {
        self.sockets = sockets;
        self
    }

    /// Puts the socket to the pod into the sockhash
    /// ([`relay::add_facing_pod`]). sock_ops adds the pod's socket when its
    /// peer is a meshed pod on another node, which only a source-preserving
    /// connection of the agent's can be; from the node's address the pod's
    /// socket is not added, so none is looked for.
    async fn accelerate(
        &self,
        upstream: &TcpStream,
        source: Source,
    ) -> Option<(Arc<SocketMaps>, (SockKey, SockState))> {
        let maps = self.sockets.as_ref()?;
        if !matches!(source, Source::Client(_)) {
            return None;
        }
        let side = relay::add_facing_pod(maps, upstream, None).await?;
        self.stats.accelerated.fetch_add(1, Ordering::Relaxed);
        Some((maps.clone(), side))
    }

    /// The caller: its pod when proven, else what its certificate says.
    fn source_peer(
        &self,
        snapshot: &Snapshot,
        peer_id: &Identity,
        client: Option<SocketAddr>,
    ) -> Arc<Peer> {
        Arc::new(
            client
                .and_then(|c| snapshot.workload_by_ip(c.ip()))
                .map_or_else(
                    || Peer::of_identity(peer_id),
                    |w| Peer::of(w, &self.trust_domain),
                ),
        )
    }

    /// The Istio labels of a stream from `peer_id` (at `client` when proven)
    /// to the local pod at `target`.
    fn tcp_labels(
        &self,
        snapshot: &Snapshot,
        peer_id: &Identity,
        client: Option<SocketAddr>,
        target: SocketAddr,
    ) -> Option<TcpLabels> {
        self.metrics.as_ref()?;
        let source = self.source_peer(snapshot, peer_id, client);
        let destination = Peer::at(snapshot, target.ip(), &self.trust_domain);
        Some(TcpLabels {
            traffic: Traffic::new(
                Reporter::Destination,
                source,
                destination,
                Arc::new(ServiceName::unknown()),
                "tcp",
                true,
            ),
            flags: "-",
            relabelled: None,
        })
    }

    /// Accepts tunnel connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let span = |peer| info_span!("inbound", %peer, dst = tracing::field::Empty, peer_id = tracing::field::Empty);
        crate::proxy::accept_loop(listener, "HBONE", span, |stream, _| {
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            self.stats.open.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            async move {
                if let Err(e) = this.handle(stream).await {
                    this.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "HBONE connection closed");
                }
                this.stats.open.fetch_sub(1, Ordering::Relaxed);
            }
        })
        .await;
    }

    /// Starts a graceful shutdown: each tunnel sends GOAWAY, takes no new
    /// stream and closes once its running streams end.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Drains, then waits up to `limit` for the tunnels to close.
    pub async fn drain_for(&self, limit: Duration) {
        let open = || self.stats.open.load(Ordering::Relaxed);
        if open() > 0 {
            info!(open = open(), limit = ?limit, "draining HBONE tunnels: GOAWAY sent, running streams may finish");
        }
        self.drain();
        let deadline = tokio::time::Instant::now() + limit;
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if open() > 0 {
            warn!(
                open = open(),
                "drain time is up: closing the tunnels still open"
            );
        }
    }

    /// The TLS config presenting `identity`'s current certificate.
    fn server_config(
        &self,
        identity: &Identity,
    ) -> Result<Arc<rustls::ServerConfig>, InboundError> {
        let fail = |reason: String| InboundError::Certificate {
            identity: identity.to_string(),
            reason,
        };
        let svid = self.certs.get(identity).map_err(|e| fail(e.to_string()))?;
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((serial, config)) = configs.get(identity)
            && *serial == svid.info.serial
        {
            return Ok(config.clone());
        }
        let config =
            tls::server_config(&svid, self.certs.bundle()).map_err(|e| fail(e.to_string()))?;
        configs.insert(identity.clone(), (svid.info.serial.clone(), config.clone()));
        Ok(config)
    }

    /// The identity of the local meshed pod at `addr`.
    fn dialled(&self, addr: SocketAddr) -> Option<Identity> {
        let snapshot = self.state.borrow().clone();
        let w = snapshot
            .workload_by_ip(addr.ip())
            .filter(|w| w.node == self.node && w.meshed)?;
        Some(Identity::of(w, &self.trust_domain))
    }

    async fn handle(self: &Arc<Self>, stream: TcpStream) -> Result<(), InboundError> {
        let local = stream.local_addr().map_err(InboundError::Tls)?;
        let remote = stream.peer_addr().map_err(InboundError::Tls)?;
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        tracing::Span::current().record("dst", tracing::field::display(local));
        let identity = self.dialled(local).ok_or(InboundError::NotLocal(local))?;
        let config = self.server_config(&identity)?;
        let _ = stream.set_nodelay(true);
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)
            .await
            .map_err(|_| InboundError::TlsTimeout(HANDSHAKE_TIMEOUT))?
            .map_err(InboundError::Tls)?;
        // rustls lets a client that offers no ALPN through; HBONE is h2 only.
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(InboundError::NoAlpn);
        }
        let peer_id = tls::peer_identity(tls.get_ref().1).ok_or(InboundError::NoPeerIdentity)?;
        tracing::Span::current().record("peer_id", tracing::field::display(&peer_id));
        let mut conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .handshake::<_, Bytes>(tls)
            .await?;
        debug!("tunnel up");
        let keepalive = super::keepalive(conn.ping_pong(), self.keepalive);
        tokio::pin!(keepalive);
        let mut draining = self.draining.subscribe();
        let mut drain_started = *draining.borrow();
        if drain_started {
            conn.graceful_shutdown();
        }
        loop {
            tokio::select! {
                request = conn.accept() => {
                    let Some(request) = request else { break };
                    let (request, respond) = request?;
                    self.stats.streams.fetch_add(1, Ordering::Relaxed);
                    let this = self.clone();
                    let peer_id = peer_id.clone();
                    tokio::spawn(
                        async move { this.stream(request, respond, (local, remote), &peer_id).await }
                            .instrument(tracing::Span::current()),
                    );
                }
                reason = &mut keepalive => {
                    self.stats.keepalive_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(InboundError::Keepalive(reason));
                }
                changed = draining.changed(), if !drain_started => {
                    if changed.is_ok() && *draining.borrow() {
                        // GOAWAY: no new streams; running ones finish.
                        drain_started = true;
                        conn.graceful_shutdown();
                    }
                }
            }
        }
        debug!("tunnel closed");
        Ok(())
    }

    /// The client pod `forwarded` names, when that address is a meshed pod
    /// on another node running as the identity the certificate proves (a
    /// header alone never names a source).
    fn proven_client(
        &self,
        snapshot: &Snapshot,
        forwarded: &str,
        peer_id: &Identity,
    ) -> Option<SocketAddr> {
        let client = forwarded
            .strip_prefix("for=\"")
            .and_then(|f| f.strip_suffix('"'))
            .and_then(|f| f.parse::<SocketAddr>().ok())?;
        let ip = client.ip().to_canonical();
        let proven = snapshot.workload_by_ip(ip).is_some_and(|w| {
            w.meshed && w.node != self.node && Identity::of(w, &self.trust_domain) == *peer_id
        });
        if !proven {
            debug!(%client, %peer_id, "forwarded names no pod of the certificate's identity");
        }
        proven.then_some(SocketAddr::new(ip, client.port()))
    }

    async fn stream(
        self: &Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        (dialled, remote): (SocketAddr, SocketAddr),
        peer_id: &Identity,
    ) {
        let reply =
            |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, end: bool| {
                let response = Response::builder()
                    .status(status)
                    .body(())
                    .expect("a status-only response");
                respond.send_response(response, end)
            };
        let target = request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let Some(target) = target.filter(|t| {
            request.method() == Method::CONNECT && t.ip().to_canonical() == dialled.ip()
        }) else {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            debug!(method = %request.method(), uri = %request.uri(), "bad HBONE request");
            let _ = reply(&mut respond, StatusCode::BAD_REQUEST, true);
            return;
        };
        let snapshot = self.state.borrow().clone();
        let forwarded = request
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let client = self.proven_client(&snapshot, &forwarded, peer_id);
        // The caller's address, for policies: its pod's when proven.
        let caller = authz::Caller::new(peer_id, client.unwrap_or(remote).ip());
        let inspect = match authz::authorize(&snapshot, caller, target) {
            Verdict::Allow => false,
            Verdict::Inspect => true,
            Verdict::Deny { policy, reason } => {
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                info!(src = %peer_id, dst = %target, %policy, reason, "connection denied by authorization policy");
                let _ = reply(&mut respond, StatusCode::UNAUTHORIZED, true);
                return;
            }
        };
        let hinted = match request.headers().get(PROTOCOL_HINT).map(|v| v.as_bytes()) {
            Some(b"http/1.1") => Some(detect::Protocol::Http1),
            Some(b"h2") => Some(detect::Protocol::Http2),
            _ => None,
        };
        if let Some(Err(reason)) = self
            .policy
            .as_ref()
            .map(|v| v.delivery(&snapshot, "hbone-inbound", client, target))
        {
            self.stats.policy_denied.fetch_add(1, Ordering::Relaxed);
            info!(src = %peer_id, %forwarded, dst = %target, reason, "stream refused: ingress network policy denies it");
            let _ = reply(&mut respond, StatusCode::UNAUTHORIZED, true);
            return;
        }
        // Connect from the client pod's own address when it is proven and
        // of the target's family; else from the node's.
        let source = match client {
            Some(c) if c.is_ipv6() == target.is_ipv6() => Source::Client(c.ip()),
            _ => Source::Any,
        };
        if matches!(source, Source::Client(_)) {
            self.stats.source_preserved.fetch_add(1, Ordering::Relaxed);
        }
        let labels = self.tcp_labels(&snapshot, peer_id, client, target);
        let upstream = match connect_from(target, source, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                if let (Some(m), Some(l)) = (&self.metrics, &labels) {
                    m.tcp_failed(l);
                }
                self.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
                debug!(%target, error = %e, "upstream connect failed");
                let _ = reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE, true);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let accel = self.accelerate(&upstream, source).await;
        let _forget = accel
            .as_ref()
            .map(|(maps, (key, _))| Forget(maps.clone(), *key));
        let send = match reply(&mut respond, StatusCode::OK, false) {
            Ok(send) => send,
            Err(e) => {
                debug!(error = %e, "the client went away");
                return;
            }
        };
        debug!(%target, %peer_id, %forwarded, inspect, "stream open");
        let reporting = snapshot.reporting(target.ip(), Side::Server);
        let record = self
            .metrics
            .clone()
            .zip(labels)
            .map(|(m, l)| OpenConnection::new(m, l, target, reporting.clone()));
        let mut tunnel = H2Stream::new(send, request.into_body());
        // L7 rules decide: the stream is read as HTTP, else judged as
        // opaque TCP.
        let protocol = if inspect {
            let (protocol, seen) = detect::detect_read(&mut tunnel, SNIFF_TIMEOUT).await;
            tunnel.unread(seen.into());
            if protocol == detect::Protocol::Opaque {
                let judged = crate::proxy::outbound::judge_opaque(
                    &snapshot,
                    (client.unwrap_or(remote), peer_id),
                    target,
                    self.authorizer.as_ref(),
                );
                if let Err((policy, reason)) = judged.await {
                    self.stats.opaque_denied.fetch_add(1, Ordering::Relaxed);
                    info!(src = %peer_id, dst = %target, %policy, reason, "stream reset: denied by authorization policy");
                    tunnel.reset();
                    return;
                }
            }
            Some(protocol).filter(|p| *p != detect::Protocol::Opaque)
        } else {
            hinted.filter(|_| self.tracer.is_some())
        };
        // The destination's ingress verdict must keep holding while the
        // stream is open (the kernel sees only the agent's socket).
        let standing = snapshot
            .workload_by_ip(target.ip().to_canonical())
            .map(|w| Standing {
                via: "hbone-inbound",
                direction: direction::INGRESS,
                workload: w.id(),
                source: client,
                destination: target,
            });
        let watched = self.policy.as_ref().zip(standing);
        let resets = match watched {
            Some(_) => crate::proxy::duplicates(&[upstream.as_fd()]),
            None => Vec::new(),
        };
        let served: Served<'_> = match protocol {
            Some(protocol) => {
                let judge = inspect.then(|| {
                    self.stats.http_inspected.fetch_add(1, Ordering::Relaxed);
                    let this = self.clone();
                    inbound_http::judge(
                        self.state.clone(),
                        (peer_id.clone(), client.unwrap_or(remote)),
                        target,
                        self.authorizer.clone(),
                        move |refusal| {
                            refusal
                                .counter(
                                    &this.stats.requests_denied,
                                    &this.stats.requests_unauthenticated,
                                )
                                .fetch_add(1, Ordering::Relaxed);
                        },
                    )
                });
                if !inspect {
                    self.stats.http_traced.fetch_add(1, Ordering::Relaxed);
                }
                let telemetry = inbound_http::Telemetry::new(
                    self.tracer.clone(),
                    self.metrics.clone(),
                    self.state.clone(),
                    (
                        self.source_peer(&snapshot, peer_id, client),
                        Peer::at(&snapshot, target.ip(), &self.trust_domain),
                    ),
                    (client.unwrap_or(remote), target),
                    true,
                    reporting,
                );
                let idle = self.idle_timeout;
                Box::pin(async move {
                    let upstream: std::pin::Pin<Box<dyn Io>> = match accel {
                        Some((maps, side)) => Box::pin(relay::Tracked::new(upstream, maps, side)),
                        None => Box::pin(upstream),
                    };
                    inbound_http::serve(tunnel, protocol, upstream, judge, telemetry, idle)
                        .await
                        .map(|()| (0, 0))
                        .map_err(|e| e.to_string())
                })
            }
            None => Box::pin(async move {
                let accel = accel.as_ref().map(|(maps, side)| (&**maps, *side));
                // (socket → tunnel, tunnel → socket) is (out, in) here.
                relay::relay_tunnel(upstream, tunnel, accel, self.idle_timeout)
                    .await
                    .map(|(outbound, inbound)| (inbound, outbound))
                    .map_err(|e| e.to_string())
            }),
        };
        let outcome = match watched {
            Some((verdicts, standing)) => {
                let standing = [standing];
                crate::proxy::until_revoked(
                    served,
                    verdicts.revoked(&self.state, &standing),
                    resets,
                )
                .await
            }
            None => Ok(served.await),
        };
        let result = match outcome {
            Ok(result) => result,
            Err(reason) => {
                self.stats.policy_revoked.fetch_add(1, Ordering::Relaxed);
                info!(src = %peer_id, %forwarded, dst = %target, reason, "open stream reset: the network policy no longer allows it");
                return;
            }
        };
        match result {
            Ok((inbound, outbound)) => {
                if let Some(r) = &record {
                    r.bytes(inbound, outbound);
                }
                self.stats.bytes_in.fetch_add(inbound, Ordering::Relaxed);
                self.stats.bytes_out.fetch_add(outbound, Ordering::Relaxed);
                debug!(%target, bytes_in = inbound, bytes_out = outbound, "stream closed");
            }
            Err(e) => debug!(%target, error = %e, "stream closed with an error"),
        }
    }
}

/// Takes an accelerated connection's entries out of the sockhash's state
/// when the stream ends, however it ends.
struct Forget(Arc<SocketMaps>, SockKey);

impl Drop for Forget {
    fn drop(&mut self) {
        self.0.remove(&[self.1, self.1.reversed()]);
    }
}
