//! Outbound: a captured connection arrives on 15001 from a local pod. Its
//! original destination comes from the kernel (indexed by sock_ops under the
//! client's address:port); a service VIP resolves to a ready backend, round
//! robin; the agent connects and relays bytes both ways, half-close included,
//! with connect and idle timeouts.
//!
//! With sk_msg on, the agent adds its two sockets to the sockhash so data
//! between them and the local pods skips the TCP/IP stack, and for opaque TCP
//! to a backend on this node it splices the app's socket to the backend's in
//! the kernel (see [`crate::proxy::relay`]).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
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
use tracing::{Instrument as _, debug, info, info_span, warn};
use trellis_common::{SockKey, SockState, direction};

use crate::metrics::{
    IstioMetrics,
    istio::{Peer, Reporter, ServiceName, TcpLabels, Traffic},
};

use super::{
    affinity::Affinity,
    detect::{self, Protocol},
    http::{Call, HttpProxy, HttpStats},
    relay::{self, Accelerated, Progress, RelayError, Relayed},
};
use crate::{
    bpf::{sockets::SocketMaps, tables::OrigDstTable},
    config::Acceleration,
    handoff::{Parked, ParkedMeta, Relays},
    hbone::client::Pool,
    identity::Identity,
    policy::{
        authz::{self, Verdict},
        telemetry::Side,
        verdict::{Standing, Verdicts},
    },
    state::Snapshot,
    sync::{ip_port, socket_addr},
};

/// Backends a Service call tries before its client is reset (Envoy's and
/// Istio's default: the first and two more on connect failure).
const CONNECT_ATTEMPTS: usize = 3;

/// How long a client of a Service port declared HTTP may take to send its
/// first bytes before the connection is relayed as opaque TCP.
const DECLARED_HTTP_WAIT: Duration = Duration::from_secs(10);

/// Limits and modes of the outbound proxy.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OutboundConfig {
    /// Sniffing a Service connection's protocol gives up after this (a
    /// server-first protocol: the connection is opaque TCP).
    pub detect_timeout: Duration,
    /// Connecting to a backend gives up after this.
    pub connect_timeout: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// The L7 path polls this long for an answer from a pod on this node
    /// before letting the worker sleep.
    pub busy_poll: Duration,
    pub accel: Acceleration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            detect_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            busy_poll: Duration::ZERO,
            accel: Acceleration {
                sk_msg: true,
                splice: true,
            },
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
    #[error(transparent)]
    Connect(#[from] super::ConnectError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("{backend}: denied by authorization policy {policy}")]
    Denied { backend: SocketAddr, policy: String },
    #[error("{dst}: denied by network policy ({reason})")]
    NetworkPolicy { dst: SocketAddr, reason: String },
    #[error("HBONE: {0}")]
    Hbone(#[from] crate::hbone::client::HboneError),
    #[error("parking the connection for the successor agent failed")]
    Handoff,
    #[error("a handed-over socket: {0}")]
    Adopt(#[from] std::io::Error),
}

/// Counters of the outbound proxy (exported as metrics by the observability work).
#[derive(Debug, Default, Serialize)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub completed: AtomicU64,
    pub no_original_destination: AtomicU64,
    pub no_backend: AtomicU64,
    pub connect_failed: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Connections whose sockets went into the sockhash (sk_msg).
    pub accelerated: AtomicU64,
    /// Connections spliced app ↔ backend in the kernel.
    pub spliced: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Connections tunnelled through HBONE to another node.
    pub tunnelled: AtomicU64,
    /// Same-node connections refused by an authorization policy.
    pub denied: AtomicU64,
    /// Same-node connections served as HTTP so that L7 authorization rules
    /// apply to each request, and requests those rules denied.
    pub http_inspected: AtomicU64,
    pub requests_denied: AtomicU64,
    /// Requests refused because their token did not verify.
    pub requests_unauthenticated: AtomicU64,
    /// Same-node connections refused by the destination's ingress network
    /// policy, or to a service none of whose backends egress policy allows.
    pub policy_denied: AtomicU64,
    /// Open connections closed because a policy change denies them now.
    pub policy_revoked: AtomicU64,
    /// Connections taken over from a predecessor agent.
    pub adopted: AtomicU64,
    /// Service backends left out of a pick because egress policy denies them.
    pub policy_dropped_backends: AtomicU64,
    /// Service calls sent to another backend after theirs refused them.
    pub connect_retries: AtomicU64,
    /// Connections to a Service port peeked at for their protocol, and
    /// those whose client sent nothing decisive in time: many of these
    /// on one port mean a server-first protocol that its Service should
    /// declare (`appProtocol` or the port's name), to skip the wait.
    pub sniffed: AtomicU64,
    pub sniff_timeouts: AtomicU64,
}

/// The outbound proxy's shared state.
pub struct Outbound {
    node: String,
    config: OutboundConfig,
    orig: OrigDstTable,
    sockets: Option<Arc<SocketMaps>>,
    state: watch::Receiver<Arc<Snapshot>>,
    next: Mutex<HashMap<(String, u16), usize>>,
    /// Clients held to a backend (`sessionAffinity: ClientIP`), shared
    /// with the L7 path.
    affinity: Arc<Affinity>,
    /// The trust domain identities live in.
    trust_domain: String,
    /// Tunnels to other nodes.
    hbone: Option<Arc<Pool>>,
    /// Network policy verdicts.
    policy: Option<Arc<Verdicts>>,
    /// The L7 path, made at its first use (`serve` makes it at once, for
    /// health checks; after `with_hbone`).
    http: std::sync::OnceLock<Arc<HttpProxy>>,
    metrics: Option<Arc<IstioMetrics>>,
    tracer: Option<Arc<crate::trace::Tracer>>,
    /// L4 relays a successor agent can take over.
    relays: Option<Arc<Relays>>,
    pub stats: OutboundStats,
}

/// Where a captured connection goes.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// What the app asked for.
    pub dst: SocketAddr,
    /// The backend picked for it.
    pub backend: SocketAddr,
    /// The backend is a pod on this node.
    pub local: bool,
    /// The node's address of the backend's family: the source the agent
    /// connects from (sock_ops recognises the agent's connections by it).
    pub source: Option<IpAddr>,
}

/// Asks the providers of CUSTOM authorization policies about requests to
/// local pods, for the HBONE server and same-node deliveries: the L7
/// path's client (made on first use), as the pods' own proxy.
#[derive(Clone)]
pub struct Authorizer(Arc<Outbound>);

impl Authorizer {
    pub(super) fn proxy(&self) -> &Arc<HttpProxy> {
        self.0.http()
    }
}

/// Judges a connection from `source` (at its address) to the local pod at
/// `target` that turned out not to be HTTP: L4 rules, then the gRPC
/// providers of the CUSTOM policies matching it, asked through
/// `authorizer` (without one, a connection they are to judge is refused).
/// `Err`: the deciding policy and why.
pub async fn judge_opaque(
    snapshot: &Snapshot,
    source: (SocketAddr, &Identity),
    target: SocketAddr,
    authorizer: Option<&Authorizer>,
) -> Result<(), (String, String)> {
    let caller = authz::Caller::new(source.1, source.0.ip());
    let asks = authz::admit_opaque(snapshot, caller, target).map_err(|refusal| match refusal {
        authz::Refusal::Denied { policy, reason } => (policy, reason.to_owned()),
        authz::Refusal::Unauthenticated(why) => (String::new(), why.to_string()),
    })?;
    match (asks.first(), authorizer) {
        (None, _) => Ok(()),
        (Some(_), Some(authorizer)) => {
            authorizer
                .proxy()
                .ask_about_connection(snapshot, &asks, source, target)
                .await
        }
        (Some(ask), None) => Err((
            ask.policy.clone(),
            "no client for CUSTOM providers here".into(),
        )),
    }
}

impl Outbound {
    pub fn new(
        node: &str,
        config: OutboundConfig,
        orig: OrigDstTable,
        sockets: Option<Arc<SocketMaps>>,
        state: watch::Receiver<Arc<Snapshot>>,
        trust_domain: &str,
    ) -> Self {
        Self {
            node: node.into(),
            trust_domain: trust_domain.into(),
            config,
            orig,
            sockets: sockets.filter(|_| config.accel.sk_msg),
            state,
            next: Mutex::new(HashMap::new()),
            affinity: Arc::default(),
            hbone: None,
            policy: None,
            http: std::sync::OnceLock::new(),
            metrics: None,
            tracer: None,
            relays: None,
            stats: OutboundStats::default(),
        }
    }

    /// Enforces network policy: egress on service backends, ingress on
    /// same-node delivery.
    #[must_use]
    pub fn with_policy(mut self, verdicts: Arc<Verdicts>) -> Self {
        self.policy = Some(verdicts);
        self
    }

    /// Tunnels connections to meshed pods on other nodes through HBONE.
    #[must_use]
    pub fn with_hbone(mut self, pool: Arc<Pool>) -> Self {
        self.hbone = Some(pool);
        self
    }

    /// Records Istio's standard metrics (reporter `source`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<IstioMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Lets a successor agent take over the L4 relays.
    #[must_use]
    pub fn with_handoff(mut self, relays: Arc<Relays>) -> Self {
        self.relays = Some(relays);
        self
    }

    /// Traces the L7 path's requests.
    #[must_use]
    pub fn with_tracer(mut self, tracer: Arc<crate::trace::Tracer>) -> Self {
        self.tracer = Some(tracer);
        self
    }

    fn record_failed(&self, labels: Option<&TcpLabels>) {
        if let (Some(m), Some(l)) = (&self.metrics, labels) {
            m.tcp_failed(l);
        }
    }

    /// Counts a connection from `peer` opened; it is counted closed, with
    /// the bytes given, when the record is dropped.
    fn record_open(
        &self,
        labels: TcpLabels,
        peer: SocketAddr,
        upstream: SocketAddr,
    ) -> crate::metrics::istio::OpenConnection {
        let reporting = self.state.borrow().reporting(peer.ip(), Side::Client);
        crate::metrics::istio::OpenConnection::new(
            self.metrics.clone().expect("labels only with metrics"),
            labels,
            upstream,
            reporting,
        )
    }

    /// The Istio labels of a connection from `peer` taking `route`.
    fn tcp_labels(&self, peer: SocketAddr, route: &Route, mtls: bool) -> Option<TcpLabels> {
        self.metrics.as_ref()?;
        let snapshot = self.state.borrow().clone();
        let peer_of = |ip: IpAddr| Peer::at(&snapshot, ip, &self.trust_domain);
        let service = snapshot
            .service_for(route.dst)
            .map_or_else(ServiceName::unknown, |(svc, _)| ServiceName::of_view(svc));
        Some(TcpLabels {
            traffic: Traffic::new(
                Reporter::Source,
                peer_of(peer.ip()),
                peer_of(route.backend.ip()),
                Arc::new(service),
                "tcp",
                mtls,
            ),
            flags: "-",
            relabelled: None,
        })
    }

    /// The identities of a tunnel from the local pod at `client` to the
    /// meshed pod at `backend` on another node; `None` when the connection
    /// stays plain (same node, or a destination outside the mesh).
    fn tunnel_identities(&self, client: IpAddr, backend: IpAddr) -> Option<(Identity, Identity)> {
        self.hbone.as_ref()?;
        let td = &self.trust_domain;
        let snapshot = self.state.borrow().clone();
        let dst = snapshot
            .workload_by_ip(backend)
            .filter(|w| w.meshed && w.node != self.node)?;
        let src = snapshot
            .workload_by_ip(client.to_canonical())
            .filter(|w| w.node == self.node)?;
        Some((Identity::of(src, td), Identity::of(dst, td)))
    }

    /// Opens the HBONE stream for `route`; a failure is recorded.
    async fn open_tunnel(
        &self,
        peer: SocketAddr,
        route: &Route,
        (src, dst): &(Identity, Identity),
    ) -> Result<crate::hbone::client::Opened, OutboundError> {
        let pool = self.hbone.as_ref().expect("tunnel_identities checked it");
        pool.open(src, dst, route.backend, route.source, peer, None)
            .await
            .map_err(|e| {
                self.record_failed(self.tcp_labels(peer, route, true).as_ref());
                self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                e.into()
            })
    }

    async fn tunnel(
        &self,
        inbound: TcpStream,
        peer: SocketAddr,
        route: &Route,
        (src, dst): (Identity, Identity),
        (stream, _slot): crate::hbone::client::Opened,
        accel: Option<(SockKey, SockState)>,
    ) -> Result<(), OutboundError> {
        let labels = self.tcp_labels(peer, route, true);
        let _ = inbound.set_nodelay(true);
        self.stats.tunnelled.fetch_add(1, Ordering::Relaxed);
        let record = labels.map(|l| self.record_open(l, peer, route.backend));
        debug!(dst = %route.dst, backend = %route.backend, %src, %dst, "connected through HBONE");
        let standing = self.standing(peer, route.backend, "hbone-outbound", false);
        let resets = resets(&standing, &[inbound.as_fd()]);
        let accel = self.sockets.as_deref().zip(accel);
        let relayed = relay::relay_tunnel(inbound, stream, accel, self.config.idle_timeout);
        match self.unless_revoked(relayed, &standing, resets).await? {
            Ok((sent, received)) => {
                if let Some(r) = &record {
                    r.bytes(sent, received);
                }
                self.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
                self.stats
                    .bytes_received
                    .fetch_add(received, Ordering::Relaxed);
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                debug!(dst = %route.dst, sent, received, "closed");
                Ok(())
            }
            Err(e @ RelayError::Idle { .. }) => {
                self.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
            Err(e) => {
                debug!(dst = %route.dst, error = %e, "closed with an error");
                Ok(())
            }
        }
    }

    /// The verdicts an open connection from `peer` to `backend` must keep:
    /// the client pod's egress policy, and on the same node the
    /// destination pod's ingress policy.
    fn standing(
        &self,
        peer: SocketAddr,
        backend: SocketAddr,
        via: &'static str,
        same_node: bool,
    ) -> Vec<Standing> {
        if self.policy.is_none() {
            return Vec::new();
        }
        let snapshot = self.state.borrow().clone();
        let mut out = Vec::new();
        let mut add = |direction, ip: IpAddr| {
            if let Some(w) = snapshot.workload_by_ip(ip.to_canonical()) {
                out.push(Standing {
                    via,
                    direction,
                    workload: w.id(),
                    source: Some(peer),
                    destination: backend,
                });
            }
        };
        add(direction::EGRESS, peer.ip());
        if same_node {
            add(direction::INGRESS, backend.ip());
        }
        out
    }

    /// Awaits `relay`, unless a policy change denies the connection first:
    /// then it is reset, counted and logged.
    async fn unless_revoked<T>(
        &self,
        relay: impl Future<Output = T>,
        standing: &[Standing],
        resets: Vec<OwnedFd>,
    ) -> Result<T, OutboundError> {
        let Some(verdicts) = self.policy.as_ref().filter(|_| !standing.is_empty()) else {
            return Ok(relay.await);
        };
        super::until_revoked(relay, verdicts.revoked(&self.state, standing), resets)
            .await
            .map_err(|reason| {
                self.stats.policy_revoked.fetch_add(1, Ordering::Relaxed);
                let dst = standing[0].destination;
                info!(%dst, reason, "open connection reset: the network policy no longer allows it");
                OutboundError::NetworkPolicy {
                    dst,
                    reason: reason.into(),
                }
            })
    }

    /// The client of CUSTOM policies' providers, for local pods.
    pub fn authorizer(self: &Arc<Self>) -> Authorizer {
        Authorizer(self.clone())
    }

    /// The L7 path.
    fn http(&self) -> &Arc<HttpProxy> {
        self.http.get_or_init(|| {
            Arc::new(HttpProxy::new(
                &self.node,
                &self.trust_domain,
                self.state.clone(),
                super::http::Shared {
                    hbone: self.hbone.clone(),
                    policy: self.policy.clone(),
                    sockets: self.sockets.clone(),
                    metrics: self.metrics.clone(),
                    tracer: self.tracer.clone(),
                    affinity: self.affinity.clone(),
                },
                self.config.connect_timeout,
                self.config.busy_poll,
                self.config.idle_timeout,
            ))
        })
    }

    /// Counters of the L7 path.
    pub fn http_stats(&self) -> &HttpStats {
        &self.http().stats
    }

    /// The L7 path's pooled upstream connections: idle HTTP/1.1 ones and
    /// shared HTTP/2 ones.
    pub fn http_pools(&self) -> serde_json::Value {
        let (http1_idle, http2) = self.http().pooled();
        serde_json::json!({ "http1_idle": http1_idle, "http2": http2 })
    }

    /// The L7 path's endpoint records (requests in flight, health,
    /// ejections), by Service.
    pub fn http_endpoints(
        &self,
    ) -> std::collections::BTreeMap<String, Vec<crate::resilience::EndpointStatus>> {
        self.http().endpoints()
    }

    /// A call to a Service port from a local pod, which the L7 path may
    /// take: the call, whether the port declares HTTP (`Some(true)`) or
    /// opaque TCP (`appProtocol`, else its name), and whether routes apply
    /// to this client.
    fn l7_candidate(&self, peer: SocketAddr) -> Option<(Call, Option<bool>, bool)> {
        let orig = self.orig.get(&ip_port(peer.ip(), peer.port()))?;
        if orig.service_id == 0 {
            return None;
        }
        let dst = socket_addr(&orig.dst);
        let snapshot = self.state.borrow().clone();
        let (svc, port) = snapshot.service_for(dst)?;
        let client = snapshot.workload_by_ip(peer.ip().to_canonical())?;
        // Routes for this client, or a traffic policy on the Service.
        let routed = snapshot
            .routes
            .port(&svc.id(), port.port)
            .and_then(|p| p.for_client(&client.namespace))
            .is_some()
            || snapshot.traffic.contains_key(&svc.id());
        let call = Call {
            client: peer,
            client_namespace: client.namespace.clone(),
            client_identity: (client.node == self.node)
                .then(|| Identity::of(client, &self.trust_domain)),
            service: svc.id(),
            port: port.port,
            dialled: dst.ip(),
            upstream_h2: detect::declares_http2(port.app_protocol.as_deref(), &port.name),
            grpc_web_upstream: detect::declares_grpc_web(port.app_protocol.as_deref()),
            reporting: snapshot.telemetry.reporting(client, Side::Client),
        };
        Some((
            call,
            detect::declared(port.app_protocol.as_deref(), &port.name),
            routed,
        ))
    }

    /// The state the proxy routes by.
    pub fn state(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.state.clone()
    }

    /// Accepts captured connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        // Health checks run from the start, so a dead backend is out before
        // the first request could pick it; they end with this task.
        let checks = tokio::spawn(self.http().clone().run_health_checks());
        let _checks = AbortOnDrop(checks.abort_handle());
        let sweeps = tokio::spawn(self.http().clone().sweep_pools());
        let _sweeps = AbortOnDrop(sweeps.abort_handle());
        let span = |peer| info_span!("outbound", src = %peer, dst = tracing::field::Empty);
        super::accept_loop(listener, "outbound", span, |stream, peer| {
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            async move {
                if let Err(e) = this.handle(stream, peer).await {
                    warn!(error = %e, "connection closed");
                }
            }
        })
        .await;
    }

    /// Where the connection from `peer` goes: its original destination, or
    /// for a service VIP one of its ready backends, other than those in
    /// `avoid` (ones that refused it already).
    pub fn resolve(&self, peer: SocketAddr, avoid: &[SocketAddr]) -> Result<Route, OutboundError> {
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
        let snapshot = self.state.borrow().clone();
        let route = |backend: SocketAddr| Route {
            dst,
            backend,
            local: snapshot
                .workload_by_ip(backend.ip())
                .is_some_and(|w| w.node == self.node),
            source: snapshot
                .node
                .as_ref()
                .and_then(|n| n.internal_ip(backend.is_ipv6())),
        };
        if orig.service_id == 0 {
            return Ok(route(dst));
        }
        let no_backend = |service: String| {
            // After refusals, the call is counted as refused, not here.
            if avoid.is_empty() {
                self.stats.no_backend.fetch_add(1, Ordering::Relaxed);
            }
            OutboundError::NoBackend {
                service,
                port: dst.port(),
            }
        };
        let (svc, port) = snapshot
            .service_for(dst)
            .ok_or_else(|| no_backend(dst.to_string()))?;
        let mut usable = svc.backends_for(port.port, dst.ip());
        usable.retain(|b| !avoid.contains(b));
        if usable.is_empty() {
            return Err(no_backend(svc.id()));
        }
        let usable = self.egress_allowed(&snapshot, peer, dst, usable)?;
        // `sessionAffinity: ClientIP`: the Service's id and timeout.
        let affinity = svc.client_ip_affinity.map(|timeout| (svc.id(), timeout));
        let client = peer.ip().to_canonical();
        let now = std::time::Instant::now();
        let held = affinity.as_ref().and_then(|(id, timeout)| {
            self.affinity
                .held(id, port.port, client, *timeout, &usable, now)
        });
        let backend = held.unwrap_or_else(|| {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let slot = next.entry((svc.id(), port.port)).or_insert(0);
            let backend = usable[*slot % usable.len()];
            *slot = slot.wrapping_add(1);
            backend
        });
        if let Some((id, timeout)) = &affinity {
            self.affinity
                .hold(id, port.port, client, backend, *timeout, now);
        }
        Ok(route(backend))
    }

    /// The backends the client pod's egress policy allows; an error (the
    /// connection is reset) when none is left.
    fn egress_allowed(
        &self,
        snapshot: &Snapshot,
        peer: SocketAddr,
        dst: SocketAddr,
        backends: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, OutboundError> {
        let (Some(verdicts), Some(client)) = (
            &self.policy,
            snapshot.workload_by_ip(peer.ip().to_canonical()),
        ) else {
            return Ok(backends);
        };
        let before = backends.len();
        let allowed = verdicts.egress_backends(snapshot, &client.id(), peer, backends);
        let dropped = (before - allowed.len()) as u64;
        self.stats
            .policy_dropped_backends
            .fetch_add(dropped, Ordering::Relaxed);
        if allowed.is_empty() {
            self.stats.policy_denied.fetch_add(1, Ordering::Relaxed);
            info!(src = %client.id(), %dst, "connection reset: egress network policy denies every backend");
            return Err(OutboundError::NetworkPolicy {
                dst,
                reason: "egress policy denies every backend".into(),
            });
        }
        Ok(allowed)
    }

    /// Same-node delivery: the destination's ingress network policy, with
    /// the client pod's address (TC already checked it is the pod's own).
    fn ingress_allowed(
        &self,
        snapshot: &Snapshot,
        peer: SocketAddr,
        route: &Route,
    ) -> Result<(), OutboundError> {
        let Some(verdicts) = &self.policy else {
            return Ok(());
        };
        let Err(reason) = verdicts.delivery(snapshot, "same-node", Some(peer), route.backend)
        else {
            return Ok(());
        };
        self.stats.policy_denied.fetch_add(1, Ordering::Relaxed);
        info!(src = %peer, dst = %route.backend, reason, "connection reset: ingress network policy denies it");
        Err(OutboundError::NetworkPolicy {
            dst: route.backend,
            reason: reason.into(),
        })
    }

    /// Same-node delivery: the destination's authorization policies apply
    /// here, with the local client pod's identity (across nodes the
    /// destination's agent decides, from the client certificate). `Some`:
    /// L7 rules decide, for each request of this identity.
    fn authorize(
        &self,
        peer: SocketAddr,
        route: &Route,
    ) -> Result<Option<Identity>, OutboundError> {
        if !route.local {
            return Ok(None);
        }
        let snapshot = self.state.borrow().clone();
        self.ingress_allowed(&snapshot, peer, route)?;
        let Some(client) = snapshot.workload_by_ip(peer.ip().to_canonical()) else {
            return Ok(None);
        };
        let source = Identity::of(client, &self.trust_domain);
        match authz::authorize(
            &snapshot,
            authz::Caller::new(&source, peer.ip()),
            route.backend,
        ) {
            Verdict::Allow => Ok(None),
            Verdict::Inspect => Ok(Some(source)),
            Verdict::Deny { policy, reason } => {
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                info!(src = %source, dst = %route.backend, %policy, reason, "connection denied by authorization policy");
                Err(OutboundError::Denied {
                    backend: route.backend,
                    policy,
                })
            }
        }
    }

    async fn connect(&self, route: &Route) -> Result<TcpStream, OutboundError> {
        Ok(super::connect_from(
            route.backend,
            route.source.map_or(super::Source::Any, super::Source::Node),
            self.config.connect_timeout,
        )
        .await?)
    }

    async fn handle(
        self: &Arc<Self>,
        inbound: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), OutboundError> {
        // Into the sockhash before anything else: the app may be writing already.
        let inbound_key = inbound.local_addr().ok().map(|local| sock_key(local, peer));
        let inbound_accel = self
            .sockets
            .as_ref()
            .zip(inbound_key)
            .and_then(|(maps, key)| {
                maps.add(&key, &inbound, None)
                    .inspect_err(
                        |e| debug!(error = %e, "cannot add the accepted socket to the sockhash"),
                    )
                    .ok()
                    .map(|state| (key, state))
            });

        if let Some((call, declared, routed)) = self.l7_candidate(peer)
            && declared != Some(false)
        {
            // Declared HTTP waits for a slow client; sniffing gives up soon,
            // for servers that speak first.
            let wait = if declared == Some(true) {
                DECLARED_HTTP_WAIT
            } else {
                self.config.detect_timeout
            };
            self.stats.sniffed.fetch_add(1, Ordering::Relaxed);
            let protocol = detect::sniff(&inbound, wait).await.unwrap_or_else(|| {
                self.stats.sniff_timeouts.fetch_add(1, Ordering::Relaxed);
                debug!(service = %call.service, port = call.port, "no protocol in time: opaque");
                Protocol::Opaque
            });
            // HTTP/2 always (per-request balancing of its multiplexed
            // streams); HTTP/1.1 when routes apply or requests are traced,
            // else the L4 path keeps its kernel shortcuts.
            let traced = self.tracer.is_some();
            // HTTP/1.1 to a port that declares HTTP/2 is carried there as
            // HTTP/2, on the L7 path.
            let upgrade = call.upstream_h2;
            if protocol == Protocol::Http2
                || (protocol == Protocol::Http1 && (routed || traced || upgrade))
            {
                tracing::Span::current().record("dst", tracing::field::display(&call.service));
                debug!(protocol = protocol.name(), service = %call.service, "serving as HTTP");
                let served = self.http().clone().serve(inbound, call, protocol).await;
                self.forget(inbound_key, None);
                if let Err(e) = served {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }

        // A Service call whose backend refuses the connection (a pod gone
        // before its Service's endpoints say so) goes to another one: nothing
        // of the client's has been sent yet, so it cannot tell.
        let mut refused: Vec<SocketAddr> = Vec::new();
        let mut refusal: Option<OutboundError> = None;
        let (route, inspect, upstream) = loop {
            let route = match self.resolve(peer, &refused) {
                Ok(route) => route,
                Err(e) => {
                    // Reset rather than FIN: the client must not mistake this for an answer.
                    let _ = inbound.set_zero_linger();
                    self.forget(inbound_key, None);
                    // No other backend to try: what failed is the refused one.
                    return Err(refusal.unwrap_or(e));
                }
            };
            if refusal.is_some() {
                self.stats.connect_retries.fetch_add(1, Ordering::Relaxed);
            }
            tracing::Span::current().record("dst", tracing::field::display(route.dst));
            let retry = route.dst != route.backend && refused.len() < CONNECT_ATTEMPTS - 1;
            if let Some(ids) = self.tunnel_identities(peer.ip(), route.backend.ip()) {
                let result = match self.open_tunnel(peer, &route, &ids).await {
                    Ok(opened) => {
                        self.tunnel(inbound, peer, &route, ids, opened, inbound_accel)
                            .await
                    }
                    Err(e) if retry => {
                        debug!(backend = %route.backend, error = %e, "refused: another backend");
                        refused.push(route.backend);
                        refusal = Some(e);
                        continue;
                    }
                    Err(e) => {
                        let _ = inbound.set_zero_linger();
                        Err(e)
                    }
                };
                self.forget(inbound_key, None);
                return result;
            }
            let inspect = match self.authorize(peer, &route) {
                Ok(inspect) => inspect,
                Err(e) => {
                    let _ = inbound.set_zero_linger();
                    self.forget(inbound_key, None);
                    return Err(e);
                }
            };
            // L7 authorization rules decide: the first bytes say whether the
            // client speaks HTTP; if not, L4 rules alone judge it (before any
            // connection to the pod).
            let inspect = match inspect {
                None => None,
                Some(source) => match detect::detect(&inbound, self.config.detect_timeout).await {
                    Protocol::Opaque => {
                        let snapshot = self.state.borrow().clone();
                        let authorizer = self.authorizer();
                        let judged = judge_opaque(
                            &snapshot,
                            (peer, &source),
                            route.backend,
                            Some(&authorizer),
                        );
                        if let Err((policy, reason)) = judged.await {
                            self.stats.denied.fetch_add(1, Ordering::Relaxed);
                            info!(src = %source, dst = %route.backend, %policy, reason, "connection denied by authorization policy");
                            let _ = inbound.set_zero_linger();
                            self.forget(inbound_key, None);
                            return Err(OutboundError::Denied {
                                backend: route.backend,
                                policy,
                            });
                        }
                        None
                    }
                    protocol => Some((source, protocol)),
                },
            };
            match self.connect(&route).await {
                Ok(upstream) => break (route, inspect, upstream),
                Err(e) => {
                    self.record_failed(self.tcp_labels(peer, &route, false).as_ref());
                    self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                    if retry {
                        debug!(backend = %route.backend, error = %e, "refused: another backend");
                        refused.push(route.backend);
                        refusal = Some(e);
                        continue;
                    }
                    let _ = inbound.set_zero_linger();
                    self.forget(inbound_key, None);
                    return Err(e);
                }
            }
        };
        let labels = self.tcp_labels(peer, &route, false);
        let _ = upstream.set_nodelay(true);
        let _ = inbound.set_nodelay(true);
        let record = labels.map(|l| self.record_open(l, peer, route.backend));
        if let Some((source, protocol)) = inspect {
            let served = self
                .serve_authorized(inbound, upstream, peer, &route, source, protocol)
                .await;
            self.forget(inbound_key, None);
            return served;
        }

        let accel = match (&self.sockets, inbound_accel) {
            (Some(maps), Some((inbound_key, inbound_state))) if route.local => {
                self.stats.accelerated.fetch_add(1, Ordering::Relaxed);
                self.accelerate_upstream(maps, inbound_key, inbound_state, &upstream)
                    .await
            }
            (Some(_), Some((key, state))) => {
                self.stats.accelerated.fetch_add(1, Ordering::Relaxed);
                Some(Accelerated::inbound_only(key, state))
            }
            _ => None,
        };
        if accel.as_ref().is_some_and(Accelerated::spliced) {
            self.stats.spliced.fetch_add(1, Ordering::Relaxed);
        }
        debug!(dst = %route.dst, backend = %route.backend, local = route.local,
            mode = accel.as_ref().map_or("userspace", Accelerated::mode), "connected");
        self.relay_l4(
            inbound,
            upstream,
            peer,
            &route,
            accel,
            Progress::default(),
            record,
        )
        .await
    }

    /// Relays an L4 connection to its end, or, when a successor agent takes
    /// over, parks it for the handoff with its progress.
    #[expect(clippy::too_many_arguments, reason = "one connection's whole context")]
    async fn relay_l4(
        self: &Arc<Self>,
        inbound: TcpStream,
        upstream: TcpStream,
        peer: SocketAddr,
        route: &Route,
        accel: Option<Accelerated>,
        from: Progress,
        record: Option<crate::metrics::istio::OpenConnection>,
    ) -> Result<(), OutboundError> {
        let inbound_key = accel.map(|a| a.inbound.0);
        let upstream_key = accel.and_then(|a| a.upstream.map(|(k, _)| k));
        let standing = self.standing(peer, route.backend, "same-node", true);
        let resets = resets(&standing, &[inbound.as_fd(), upstream.as_fd()]);
        let (pause, active) = self
            .relays
            .as_ref()
            .map(|r| r.enter())
            .map_or((None, None), |(p, a)| (Some(p), Some(a)));
        let relayed = relay::relay(
            inbound,
            upstream,
            self.sockets.as_deref().zip(accel),
            self.config.idle_timeout,
            pause,
            from,
        );
        let result = self.unless_revoked(relayed, &standing, resets).await;
        if let Ok(Ok(Relayed::Paused {
            inbound,
            upstream,
            progress,
        })) = result
        {
            // The sockets stay in the sockhash: they live on in the successor.
            if let Some(r) = &record {
                r.bytes(progress.sent - from.sent, progress.received - from.received);
            }
            let meta = ParkedMeta {
                peer,
                dst: route.dst,
                backend: route.backend,
                local: route.local,
                progress,
            };
            let (Ok(inbound), Ok(upstream)) = (inbound.into_std(), upstream.into_std()) else {
                self.forget(inbound_key, upstream_key);
                return Err(OutboundError::Handoff);
            };
            if let Some(relays) = &self.relays {
                debug!(dst = %route.dst, backend = %route.backend, sent = progress.sent,
                    received = progress.received, "parked for the successor agent");
                relays.park(Parked {
                    meta,
                    inbound: inbound.into(),
                    upstream: upstream.into(),
                });
            }
            drop(active);
            return Ok(());
        }
        drop(active);
        self.forget(inbound_key, upstream_key);
        let result = result?;
        match result {
            Ok(Relayed::Done(bytes)) => {
                if let Some(r) = &record {
                    r.bytes(bytes.sent - from.sent, bytes.received - from.received);
                }
                self.stats
                    .bytes_sent
                    .fetch_add(bytes.sent - from.sent, Ordering::Relaxed);
                self.stats
                    .bytes_received
                    .fetch_add(bytes.received - from.received, Ordering::Relaxed);
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                debug!(dst = %route.dst, backend = %route.backend, sent = bytes.sent,
                    received = bytes.received, spliced = bytes.spliced, "closed");
                Ok(())
            }
            Ok(Relayed::Paused { .. }) => unreachable!("handled above"),
            Err(e @ RelayError::Idle { .. }) => {
                self.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
            Err(e) => {
                debug!(dst = %route.dst, backend = %route.backend, error = %e, "closed with an error");
                Ok(())
            }
        }
    }

    /// Carries on a connection a predecessor agent handed over: the same
    /// sockets (still in the sockhash when they were), its route, and how
    /// far it had relayed each way.
    pub async fn adopt(self: Arc<Self>, parked: Parked) {
        let meta = parked.meta.clone();
        let span = info_span!("outbound", src = %meta.peer, dst = %meta.dst, adopted = true);
        async move {
            self.stats.adopted.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.adopted(parked).await {
                warn!(error = %e, "connection closed");
            }
        }
        .instrument(span)
        .await;
    }

    async fn adopted(self: &Arc<Self>, parked: Parked) -> Result<(), OutboundError> {
        let Parked {
            meta,
            inbound,
            upstream,
        } = parked;
        let stream = |fd: OwnedFd| {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            TcpStream::from_std(s)
        };
        let (inbound, upstream) = (stream(inbound)?, stream(upstream)?);
        let key_of = |s: &TcpStream| Some(sock_key(s.local_addr().ok()?, s.peer_addr().ok()?));
        let accel = self.sockets.as_ref().and_then(|maps| {
            let key = key_of(&inbound)?;
            let state = maps.state(&key)?;
            let upstream = key_of(&upstream).and_then(|k| maps.state(&k).map(|s| (k, s)));
            Some(Accelerated {
                inbound: (key, state),
                upstream,
            })
        });
        let route = Route {
            dst: meta.dst,
            backend: meta.backend,
            local: meta.local,
            source: None,
        };
        debug!(backend = %route.backend, mode = accel.as_ref().map_or("userspace", Accelerated::mode),
            sent = meta.progress.sent, received = meta.progress.received, "adopted from the predecessor agent");
        let record = self
            .tcp_labels(meta.peer, &route, false)
            .map(|l| self.record_open(l, meta.peer, route.backend));
        self.relay_l4(
            inbound,
            upstream,
            meta.peer,
            &route,
            accel,
            meta.progress,
            record,
        )
        .await
    }

    /// A same-node connection whose destination's L7 authorization rules
    /// decide each request: served as HTTP, allowed requests forwarded on
    /// `upstream`.
    async fn serve_authorized(
        self: &Arc<Self>,
        inbound: TcpStream,
        upstream: TcpStream,
        peer: SocketAddr,
        route: &Route,
        source: Identity,
        protocol: Protocol,
    ) -> Result<(), OutboundError> {
        self.stats.http_inspected.fetch_add(1, Ordering::Relaxed);
        debug!(backend = %route.backend, protocol = protocol.name(), "serving as HTTP for L7 authorization");
        let standing = self.standing(peer, route.backend, "same-node", true);
        let resets = resets(&standing, &[inbound.as_fd(), upstream.as_fd()]);
        let this = self.clone();
        let judge = super::inbound_http::judge(
            self.state.clone(),
            (source, peer),
            route.backend,
            Some(self.authorizer()),
            move |refusal| {
                refusal
                    .counter(
                        &this.stats.requests_denied,
                        &this.stats.requests_unauthenticated,
                    )
                    .fetch_add(1, Ordering::Relaxed);
            },
        );
        let client = super::http::LingeringClose::new(inbound);
        let _ = upstream.set_nodelay(true);
        let upstream = Box::pin(upstream);
        let served = super::inbound_http::serve(
            client,
            protocol,
            upstream,
            Some(judge),
            None,
            self.config.idle_timeout,
        );
        if let Err(e) = self.unless_revoked(served, &standing, resets).await? {
            debug!(error = %e, "HTTP connection ended with an error");
        }
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Adds the agent's socket to a local backend to the sockhash
    /// ([`relay::add_facing_pod`]) and asks for a splice when enabled.
    async fn accelerate_upstream(
        &self,
        maps: &SocketMaps,
        inbound_key: SockKey,
        mut inbound_state: trellis_common::SockState,
        upstream: &TcpStream,
    ) -> Option<Accelerated> {
        let splice = self.config.accel.splice;
        let app_key = inbound_key.reversed();
        let Some((upstream_key, upstream_state)) =
            relay::add_facing_pod(maps, upstream, splice.then_some(app_key)).await
        else {
            return Some(Accelerated::inbound_only(inbound_key, inbound_state));
        };
        let backend_key = upstream_key.reversed();
        if splice {
            inbound_state.flags |= trellis_common::sock_flags::SPLICE;
            inbound_state.target = backend_key;
            if let Err(e) = maps.publish(&inbound_key, &inbound_state) {
                debug!(error = %e, "cannot ask for the splice");
                inbound_state.flags &= !trellis_common::sock_flags::SPLICE;
            }
        }
        Some(Accelerated {
            inbound: (inbound_key, inbound_state),
            upstream: Some((upstream_key, upstream_state)),
        })
    }

    fn forget(&self, inbound: Option<SockKey>, upstream: Option<SockKey>) {
        if let Some(maps) = &self.sockets {
            let keys: Vec<SockKey> = [inbound, upstream]
                .into_iter()
                .flatten()
                .flat_map(|k| [k, k.reversed()])
                .collect();
            maps.remove(&keys);
        }
    }
}

/// A connection as the socket with these addresses sees it.
pub fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    SockKey {
        local: ip_port(local.ip(), local.port()),
        remote: ip_port(remote.ip(), remote.port()),
    }
}

/// Duplicates of the relayed sockets, to reset them if the policy revokes
/// the connection; none when no verdict stands on it.
fn resets(standing: &[Standing], sockets: &[BorrowedFd<'_>]) -> Vec<OwnedFd> {
    if standing.is_empty() {
        return Vec::new();
    }
    super::duplicates(sockets)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
