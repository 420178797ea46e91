//! The L7 path of the outbound proxy: a captured connection to a Service
//! that speaks HTTP is served by hyper, and each request is routed on its
//! own (the Service's `HTTPRoute`s, weighted backends, header filters,
//! timeouts) to a backend picked per request, over pooled upstream
//! connections: plain TCP to pods on this node or outside the mesh, an HBONE
//! stream per connection to meshed pods on other nodes (with the client
//! pod's identity, so the destination's agent authorizes the real caller).
//!
//! The agent's own answers carry `x-trellis-reason` (and `grpc-status` /
//! `grpc-message` for gRPC requests) and are counted by reason.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
};
use tracing::{Instrument as _, debug};

use super::{
    busy_poll::Poller,
    client_idle, deadline,
    detect::Protocol,
    ext_auth, grpc_deadline, grpc_web,
    pool::{self, Pools, UpstreamKey},
    telemetry,
};
use crate::metrics::{
    IstioMetrics,
    istio::{Peer, Reporter, RequestLabels, ServiceName, Traffic},
};
use crate::resilience::{
    self, Endpoint, Outcome, ServiceState,
    balance::{chance, random_below},
    retry::{self, Attempt, Replay},
};
use crate::{
    hbone::client::Pool,
    identity::Identity,
    policy::authz::{self, Refusal},
    policy::telemetry::Reporting,
    routes::{
        self, RequestView, Rule,
        table::{AuthProtocol, PathRule},
    },
    state::Snapshot,
};

pub type Body = BoxBody<Bytes, BodyError>;

/// Why a body ended early: hyper's own errors, or the agent's (a deadline).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The request line and headers of a request from a client, at most
/// (Envoy's default is 60 KiB): beyond, HTTP/1.1 gets 431 and HTTP/2 a
/// stream reset.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A client must send a request's headers within this (slowloris): the
/// connection is closed otherwise.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One client connection the L7 path serves.
#[derive(Clone, Debug)]
pub struct Call {
    /// The client pod's address.
    pub client: SocketAddr,
    /// Its namespace (consumer routes) and identity (tunnels, authorization).
    pub client_namespace: String,
    pub client_identity: Option<Identity>,
    /// The Service called (`namespace/name`) and its port.
    pub service: String,
    pub port: u16,
    /// The address called: backends are of its family, and a pass-through
    /// ServiceEntry's call goes to it.
    pub dialled: std::net::IpAddr,
    /// The port declares HTTP/2 (`detect::declares_http2`): requests go
    /// upstream as HTTP/2 whatever the client speaks.
    pub upstream_h2: bool,
    /// The port's server speaks gRPC-Web itself (`appProtocol: grpc-web`):
    /// such requests are passed through, not made gRPC.
    pub grpc_web_upstream: bool,
    /// What the client's Telemetry has reported (the client's side).
    pub reporting: Arc<Reporting>,
}

/// Requests the agent answered itself, by reason, and forwarded ones.
#[derive(Debug, Default, Serialize)]
pub struct HttpStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub no_route: AtomicU64,
    pub backend_not_found: AtomicU64,
    pub no_healthy_upstream: AtomicU64,
    pub upstream_connect_failed: AtomicU64,
    pub upstream_reset: AtomicU64,
    pub upstream_refused: AtomicU64,
    pub timeout: AtomicU64,
    pub denied: AtomicU64,
    /// Requests whose token did not verify.
    pub unauthenticated: AtomicU64,
    pub circuit_open: AtomicU64,
    /// Requests a route's authorization Service refused, and those refused
    /// because it could not be asked.
    pub ext_auth_denied: AtomicU64,
    pub ext_auth_error: AtomicU64,
    /// Requests let through because their authorization service could not
    /// be asked and it fails open.
    pub ext_auth_failed_open: AtomicU64,
    pub rate_limited: AtomicU64,
    pub fault_injected: AtomicU64,
    pub header_too_large: AtomicU64,
    pub bad_request: AtomicU64,
    /// Requests sent again on a new upstream connection because the pooled
    /// one they took had been closed by the backend under them.
    pub stale_retries: AtomicU64,
    /// Requests sent again on a new upstream HTTP/2 connection because the
    /// backend had not processed them (GOAWAY, REFUSED_STREAM).
    pub refused_retries: AtomicU64,
    /// Pooled upstream connections let go after `--idle-timeout` unused.
    pub pool_idle_closed: AtomicU64,
    /// Attempts after the first, and retries the budget refused.
    pub retries: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    /// Endpoints ejected by outlier detection.
    pub ejections: AtomicU64,
    /// Redirects answered, requests copied to mirrors, and copies skipped
    /// (body not complete or too large, no endpoint, denied).
    pub redirects: AtomicU64,
    /// CORS preflights the agent answered for a route's CORS filter.
    pub cors_preflights: AtomicU64,
    pub mirrored: AtomicU64,
    pub mirror_skipped: AtomicU64,
    /// Upstream connections to pods on this node put in the sockhash.
    pub accelerated_upstreams: AtomicU64,
    /// Answers from pods on this node that came while the agent polled for
    /// them (`--busy-poll-us`), and those it slept for.
    pub answers_while_polling: AtomicU64,
    pub answers_after_sleeping: AtomicU64,
}

/// Why a request could not be forwarded: the reason the client reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reason {
    NoRoute,
    BackendNotFound,
    NoHealthyUpstream,
    UpstreamConnectFailed,
    UpstreamReset,
    /// The backend turned the request away unprocessed (REFUSED_STREAM,
    /// or past its GOAWAY) and it could not be sent again.
    UpstreamRefused,
    Timeout,
    Denied,
    /// The request's token did not verify (`RequestAuthentication`).
    Unauthenticated,
    /// A route's authorization Service refused the request (its own answer
    /// goes back), or could not be asked (refused all the same).
    ExtAuthDenied,
    ExtAuthError,
    CircuitOpen,
    RateLimited,
    FaultInjected,
    HeaderTooLarge,
    BadRequest,
}

impl Reason {
    pub(super) fn text(self) -> &'static str {
        match self {
            Self::NoRoute => "no-route",
            Self::BackendNotFound => "backend-not-found",
            Self::NoHealthyUpstream => "no-healthy-upstream",
            Self::UpstreamConnectFailed => "upstream-connect-failed",
            Self::UpstreamReset => "upstream-reset",
            Self::UpstreamRefused => "upstream-refused",
            Self::Timeout => "timeout",
            Self::Denied => "denied",
            Self::Unauthenticated => "unauthenticated",
            Self::ExtAuthDenied => "ext-auth-denied",
            Self::ExtAuthError => "ext-auth-error",
            Self::CircuitOpen => "circuit-open",
            Self::RateLimited => "rate-limited",
            Self::FaultInjected => "fault-injected",
            Self::HeaderTooLarge => "header-too-large",
            Self::BadRequest => "bad-request",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BackendNotFound => StatusCode::INTERNAL_SERVER_ERROR,
            // Not processed: the client may send it again (RFC 9113 8.7).
            Self::NoHealthyUpstream | Self::UpstreamConnectFailed | Self::UpstreamRefused => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamReset => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Denied | Self::ExtAuthDenied => StatusCode::FORBIDDEN,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::ExtAuthError => ext_auth::ON_ERROR,
            Self::CircuitOpen | Self::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    /// The gRPC status a gRPC client gets instead.
    fn grpc_status(self) -> u8 {
        match self {
            Self::NoRoute => 12,                                          // UNIMPLEMENTED
            Self::BackendNotFound | Self::BadRequest => 13,               // INTERNAL
            Self::Timeout => 4,                                           // DEADLINE_EXCEEDED
            Self::Unauthenticated => 16,                                  // UNAUTHENTICATED
            Self::Denied | Self::ExtAuthDenied | Self::ExtAuthError => 7, // PERMISSION_DENIED
            Self::RateLimited | Self::HeaderTooLarge => 8,                // RESOURCE_EXHAUSTED
            _ => 14,                                                      // UNAVAILABLE
        }
    }
}

/// The agent's answer to a request the destination's policies refused.
pub(super) fn refused_answer(refusal: Refusal) -> (Reason, String) {
    match refusal {
        Refusal::Denied { policy, .. } => (Reason::Denied, format!("denied by {policy}")),
        Refusal::Unauthenticated(why) => (Reason::Unauthenticated, why.to_string()),
    }
}

/// A Service's policy's settings for its pooled connections.
fn pool_limits(policy: &resilience::Resilience) -> pool::Limits {
    pool::Limits {
        max_requests: policy.max_requests_per_connection,
        idle: policy.idle_timeout,
    }
}

/// An upstream connection of either kind (TCP, possibly in the sockhash, or
/// an HBONE stream): one type, so hyper's client code is compiled once.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The L7 proxy's shared state.
pub struct HttpProxy {
    node: String,
    trust_domain: String,
    state: watch::Receiver<Arc<Snapshot>>,
    hbone: Option<Arc<Pool>>,
    /// Network policy verdicts: the client's egress policy limits the
    /// endpoints a request may go to.
    policy: Option<Arc<crate::policy::verdict::Verdicts>>,
    /// With sk_msg on: upstream connections to pods on this node go into
    /// the sockhash, so their bytes skip the TCP/IP stack as on the L4 path.
    sockets: Option<Arc<crate::bpf::sockets::SocketMaps>>,
    metrics: Option<Arc<IstioMetrics>>,
    tracer: Option<Arc<crate::trace::Tracer>>,
    /// Requests' shared labels by (client, endpoint, gRPC, mTLS) and then
    /// Service, for the state they were made under (its address).
    traffic: Mutex<(usize, TrafficCache)>,
    connect_timeout: Duration,
    /// Polls for same-node upstreams' answers before sleeping.
    poller: Poller,
    /// Upstream connections; how long one, or a client's HTTP/1.1
    /// connection, may sit unused.
    pools: Pools<Body>,
    pool_idle: Duration,
    /// Per Service: its policy's run-time state.
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
    /// Clients held to a backend, shared with the L4 path.
    affinity: Arc<super::affinity::Affinity>,
    /// Active health checks running, by Service and endpoint.
    checks: Mutex<HashMap<(String, SocketAddr), tokio::task::AbortHandle>>,
    pub stats: HttpStats,
}

/// What the L7 path shares with the rest of the outbound proxy.
pub struct Shared {
    /// Clients held to a backend (`sessionAffinity: ClientIP`).
    pub affinity: Arc<super::affinity::Affinity>,
    pub hbone: Option<Arc<Pool>>,
    pub policy: Option<Arc<crate::policy::verdict::Verdicts>>,
    pub sockets: Option<Arc<crate::bpf::sockets::SocketMaps>>,
    pub metrics: Option<Arc<IstioMetrics>>,
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

impl HttpProxy {
    pub fn new(
        node: &str,
        trust_domain: &str,
        state: watch::Receiver<Arc<Snapshot>>,
        shared: Shared,
        connect_timeout: Duration,
        busy_poll: Duration,
        pool_idle: Duration,
    ) -> Self {
        Self {
            node: node.into(),
            trust_domain: trust_domain.into(),
            state,
            hbone: shared.hbone,
            policy: shared.policy,
            sockets: shared.sockets,
            metrics: shared.metrics,
            tracer: shared.tracer,
            traffic: Mutex::default(),
            connect_timeout,
            poller: Poller::new(busy_poll),
            pools: Pools::default(),
            pool_idle,
            services: Mutex::default(),
            affinity: shared.affinity,
            checks: Mutex::default(),
            stats: HttpStats::default(),
        }
    }

    /// Serves one client connection until it closes.
    pub async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        call: Call,
        protocol: Protocol,
    ) -> Result<(), hyper::Error> {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let client = LingeringClose(Some(stream));
        let this = self.clone();
        // Shared by the connection's requests, not copied for each.
        let call = Arc::new(call);
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let this = this.clone();
            let call = call.clone();
            async move {
                crate::access_log::ensure_request_id(req.headers_mut());
                // A browser's gRPC-Web goes on as gRPC; its answer is turned
                // back last, after the metrics have read its trailers.
                let web = if call.grpc_web_upstream {
                    None
                } else {
                    grpc_web::request(&mut req)
                };
                let to_client = |resp: Response<Body>| match &web {
                    Some(web) => web.clone().response(resp),
                    None => resp,
                };
                let web_text = web.as_ref().is_some_and(|w| w.text);
                if this.metrics.is_none() && this.tracer.is_none() {
                    let mut chosen = Chosen {
                        web_text,
                        ..Chosen::default()
                    };
                    return Ok::<_, Infallible>(to_client(
                        this.handle(req, &call, &mut chosen).await,
                    ));
                }
                let start = telemetry::Start::new(
                    &mut req,
                    this.tracer.as_ref(),
                    (crate::trace::Kind::Client, call.port, call.client),
                    this.metrics.is_some(),
                    call.reporting.clone(),
                );
                let mut chosen = Chosen {
                    body: start.body.clone(),
                    web_text,
                    ..Chosen::default()
                };
                let resp = this.handle(req, &call, &mut chosen).await;
                let labels = this.request_labels(&call, &chosen, start.grpc(), &resp);
                Ok(to_client(resp.map(|body| {
                    start
                        .record(
                            body,
                            this.metrics.clone(),
                            labels,
                            chosen.backend,
                            chosen.route.take(),
                        )
                        .boxed()
                })))
            }
        });
        serve_client(client, protocol, service, self.pool_idle).await
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        call: &Call,
        chosen: &mut Chosen,
    ) -> Response<Body> {
        let mut resp = self.answer_request(req, call, chosen).await;
        if let Some(cors) = chosen.cors.take() {
            routes::cors::Cors::apply(cors, resp.headers_mut());
        }
        ext_auth::put(&chosen.auth_answer, resp.headers_mut());
        resp
    }

    /// A request's answer: the route's, the backend's or the agent's own.
    async fn answer_request(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        call: &Call,
        chosen: &mut Chosen,
    ) -> Response<Body> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        // Routes and authorization rules match the path in normal form.
        super::inbound_http::normalize_uri(&mut req);
        if let Some(size) = oversized(&req) {
            let grpc = authz::is_grpc(req.headers());
            self.count(Reason::HeaderTooLarge);
            return reply(
                Reason::HeaderTooLarge,
                &format!("{size} bytes of request line and headers, over {MAX_HEADER_BYTES}"),
                grpc,
            );
        }
        let grpc = authz::is_grpc(req.headers());
        // gRPC over HTTP/2 ends a call in HTTP trailers (gRPC-Web has been
        // made gRPC by now, its trailers to become its last message, unless
        // its server speaks it); gRPC-Web passed through and an HTTP/1.1
        // client (whose trailers hyper may drop) carry the status in the
        // body, so a call cut midway there is aborted instead.
        let grpc_trailers = grpc
            && req.version() == Version::HTTP_2
            && !req
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc-web"));
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let answer = |reason: Reason, detail: String| {
            self.count(reason);
            debug!(%method, path, reason = reason.text(), detail, "answered by the agent");
            reply(reason, &detail, grpc)
        };
        if let Err(why) = settle_host(&mut req) {
            return answer(Reason::BadRequest, why.into());
        }
        let snapshot = self.state.borrow().clone();

        // The rule, and the Service port it sends to.
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let entries = snapshot
            .routes
            .port(&call.service, call.port)
            .and_then(|p| p.for_client(&call.client_namespace));
        let matched = match entries {
            None => None,
            Some(entries) => match routes::route(entries, &view) {
                None => {
                    return answer(
                        Reason::NoRoute,
                        format!("no route of {} matches", call.service),
                    );
                }
                Some(e) => Some(e),
            },
        };
        // Frames of the body an authorization check read (forwardBody).
        let mut read_for_check = ext_auth::Read::default();
        if let Some(e) = matched {
            // A browser's preflight is the CORS filter's to answer, before
            // authorization or a redirect (Envoy's filter runs first).
            if let Some(cors) = &e.rule.cors
                && routes::cors::is_preflight(req.method(), req.headers())
            {
                self.stats.cors_preflights.fetch_add(1, Ordering::Relaxed);
                let mut resp = Response::new(empty_body());
                *resp.status_mut() = StatusCode::NO_CONTENT;
                *resp.headers_mut() = cors.preflight(req.headers());
                return resp;
            }
            chosen.cors = e
                .rule
                .cors
                .as_ref()
                .and_then(|c| c.response_headers(req.headers()));
            if let Some(auth) = &e.rule.external_auth {
                let peers = ext_auth::grpc::Peers {
                    source: call.client,
                    source_principal: call.client_identity.as_ref().map(ToString::to_string),
                    destination_service: &call.service,
                    destination: None,
                    destination_principal: None,
                };
                match self
                    .external_auth(&snapshot, auth, &mut req, call, &peers)
                    .await
                {
                    Ok((allowed, read)) => {
                        let (mut parts, body) = req.into_parts();
                        ext_auth::apply(&allowed, &mut parts.headers, &mut parts.uri);
                        req = Request::from_parts(parts, body);
                        chosen.auth_answer = allowed.answer;
                        read_for_check = read;
                    }
                    Err(resp) => return resp,
                }
            }
            if e.rule.redirect.is_some() {
                self.stats.redirects.fetch_add(1, Ordering::Relaxed);
                return redirect(&req, e, call.port);
            }
        }
        let (rule, service, port): (Option<Picked>, String, u16) = match matched {
            None => (None, call.service.clone(), call.port),
            Some(e) => match pick_weighted(&e.rule.backends, e.rule.unresolved_weight) {
                None => {
                    let what = if e.rule.backends.is_empty() {
                        "has no valid backend"
                    } else {
                        "sent this request to the share of its invalid backends"
                    };
                    return answer(
                        Reason::BackendNotFound,
                        format!("rule {} of {} {what}", e.rule.index, e.rule.route),
                    );
                }
                Some(backend) => {
                    chosen.route = Some(e.rule.route.clone());
                    let b = &e.rule.backends[backend];
                    let (service, port) = (b.service.clone(), b.port);
                    let picked = Picked {
                        rule: e.rule.clone(),
                        matched: e.request.path.clone(),
                        backend,
                    };
                    (Some(picked), service, port)
                }
            },
        };
        // The rule's session persistence (GEP-1619): a request whose
        // token is still good goes to the endpoint it names.
        let session = rule
            .as_ref()
            .and_then(|p| p.rule.session.as_ref())
            .map(|s| (s, routes::session::now()));
        let token = session.and_then(|(s, wall)| s.of(req.headers(), wall));
        // A policy on the route that matched applies to what it sends, with
        // its own records; else the Service's.
        let route_policy = rule.as_ref().and_then(|p| {
            let key = crate::state::model::traffic_key(p.rule.kind, &p.rule.route);
            Some((snapshot.traffic.get(&key)?.clone(), key))
        });
        chosen.service = Some(service.clone());
        let svc = match route_policy {
            Some((policy, key)) => self.state_for(&format!("{key}→{service}"), policy),
            None => self.service_state(&snapshot, &service),
        };
        let policy = svc.policy.clone();
        if policy.health.is_some()
            && let Some(identity) = &call.client_identity
        {
            *svc.prober.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity.clone());
        }

        // Local rate limit, then injected faults, then the breaker.
        let source = || {
            call.client_identity
                .as_ref()
                .map_or_else(|| call.client.ip().to_string(), |i| i.to_string())
        };
        if let Err(wait) = svc.take_token(source) {
            let mut resp = answer(Reason::RateLimited, format!("{service} allows no more now"));
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
            );
            return resp;
        }
        if let Some(fault) = &policy.fault {
            if let Some((delay, share)) = fault.delay
                && chance(share)
            {
                tokio::time::sleep(delay).await;
            }
            if let Some((status, grpc_status, share)) = fault.abort
                && chance(share)
            {
                let mut resp = answer(Reason::FaultInjected, format!("by {}", policy.policy));
                if grpc {
                    resp.headers_mut()
                        .insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
                } else {
                    *resp.status_mut() =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                }
                return resp;
            }
        }
        let in_flight = Gauge::service(&svc.gauges, |g| &g.requests);
        if let Some(max) = policy.limits.max_requests
            && in_flight.value > u64::from(max)
        {
            return answer(
                Reason::CircuitOpen,
                format!("{service} has {max} requests in flight"),
            );
        }

        let view = snapshot.service(&service);
        let candidates = view
            .map(|svc| svc.backends_for(port, call.dialled))
            .unwrap_or_default();
        // `sessionAffinity: ClientIP` of the Service the rule sends to.
        let affinity = view.and_then(|s| s.client_ip_affinity);
        if candidates.is_empty() {
            return answer(
                Reason::NoHealthyUpstream,
                format!("{service}:{port} has no ready endpoint"),
            );
        }
        let candidates = self.egress_allowed(&snapshot, call, candidates);
        if candidates.is_empty() {
            return answer(
                Reason::Denied,
                format!("egress network policy denies every endpoint of {service}:{port}"),
            );
        }
        let hash = resilience::hash_key(&policy, req.headers(), call.client.ip());
        let client_ip = call.client.ip().to_canonical();

        // The request, and when retries are possible a copy of it (its body
        // recorded as it streams) to send again.
        let (mut parts, body) = req.into_parts();
        let client_deadline = grpc
            .then(|| grpc_deadline::parse(&parts.headers))
            .flatten()
            .map(|t| tokio::time::Instant::now() + t);
        let body = telemetry::Counted::new(
            grpc_web::Decoded::new(
                ext_auth::Prefixed::new(read_for_check, body),
                chosen.web_text,
            ),
            chosen.body.clone(),
        );
        if let Some(p) = &rule {
            p.rule.request_headers.apply(&mut parts.headers);
            if let Some(rewrite) = &p.rule.rewrite {
                rewrite_request(&mut parts, rewrite, &p.matched);
            }
        }
        let mirrors = rule.as_ref().map_or(&[][..], |p| &p.rule.mirrors[..]);
        let version = parts.version;
        // A rule's own retries win over the policy's.
        let retries = rule
            .as_ref()
            .and_then(|p| p.rule.retry.as_ref())
            .unwrap_or(&policy.retry);
        let (mut next, again) = if retries.attempts == 0 && mirrors.is_empty() {
            (
                Some(Request::from_parts(
                    parts,
                    body.map_err(BodyError::from).boxed(),
                )),
                None,
            )
        } else {
            let replay = if hyper::body::Body::is_end_stream(&body) {
                Replay::empty()
            } else {
                Replay::default()
            };
            let head = (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            );
            let first =
                Request::from_parts(parts, replay.tee(body).map_err(BodyError::from).boxed());
            (Some(first), Some((head, replay)))
        };

        // The route's `request` timeout bounds all attempts; its
        // `backendRequest` each one, as a policy's per-try timeout does
        // (GEP-1742), so an attempt that outlives it can be retried.
        // A gRPC client's own deadline bounds them too.
        let deadline = rule
            .as_ref()
            .and_then(|p| p.rule.request_timeout)
            .map(|t| tokio::time::Instant::now() + t)
            .into_iter()
            .chain(client_deadline)
            .min();
        let per_try = rule
            .as_ref()
            .and_then(|p| p.rule.backend_timeout)
            .or(retries.per_try_timeout);
        let mut tried = Vec::new();
        let mut retry_permit = None;
        loop {
            let Some(mut req) = next.take() else { break };
            // The backend reference's own edits go on each attempt, not on
            // the head kept for retries and mirrors (a mirror is another
            // backend).
            if let Some(p) = &rule {
                p.backend().request_headers.apply(req.headers_mut());
            }
            // Each attempt tells the server the time its client has left.
            if let Some(at) = client_deadline {
                let left = at.saturating_duration_since(tokio::time::Instant::now());
                req.headers_mut()
                    .insert(grpc_deadline::GRPC_TIMEOUT, grpc_deadline::encode(left));
            }
            let now = std::time::Instant::now();
            let held = token.map(|t| t.endpoint).or_else(|| {
                affinity.and_then(|timeout| {
                    self.affinity
                        .held(&service, port, client_ip, timeout, &candidates, now)
                })
            });
            let Some((backend, endpoint)) =
                svc.pick(&candidates, &tried, hash.as_ref().map(|h| h.key()), held)
            else {
                return answer(Reason::NoHealthyUpstream, format!("{service}:{port}"));
            };
            if let Some(timeout) = affinity {
                self.affinity
                    .hold(&service, port, client_ip, backend, timeout, now);
            }
            tried.push(backend);
            chosen.backend = Some(backend);
            match self.authorize(&snapshot, call, backend, &mut req) {
                Err((reason, detail)) => return answer(reason, detail),
                Ok(asks) if asks.is_empty() => {}
                Ok(asks) => {
                    let source = (call.client, call.client_identity.as_ref());
                    let asked = match source {
                        (addr, Some(identity)) => {
                            self.ask_providers(&snapshot, &asks, req, (addr, identity), backend)
                                .await
                        }
                        // Asks come only for a caller with an identity.
                        (_, None) => Ok((req, Vec::new())),
                    };
                    match asked {
                        Ok((allowed, puts)) => {
                            req = allowed;
                            chosen.auth_answer.extend(puts);
                        }
                        Err(resp) => return resp,
                    }
                }
            }
            let active = Gauge::enter(Counter::Endpoint(endpoint.clone()));
            let attempt = self.forward(&snapshot, req, call, backend, &svc);
            let limit = match (per_try, deadline) {
                (Some(t), Some(d)) => Some((tokio::time::Instant::now() + t).min(d)),
                (Some(t), None) => Some(tokio::time::Instant::now() + t),
                (None, d) => d,
            };
            let result = match limit {
                Some(at) => tokio::time::timeout_at(at, attempt)
                    .await
                    .unwrap_or_else(|_| Err((Reason::Timeout, "no response in time".into()))),
                None => attempt.await,
            };
            let kind = match &result {
                Ok(resp) => Attempt::Response(
                    resp.status().as_u16(),
                    telemetry::grpc_status(resp.headers()),
                ),
                Err((Reason::UpstreamConnectFailed, _)) => Attempt::ConnectFailure,
                Err((Reason::UpstreamRefused, _)) => Attempt::Refused,
                Err((Reason::UpstreamReset, _)) => Attempt::Reset,
                Err((Reason::Timeout, _)) => Attempt::Timeout,
                Err(_) => Attempt::Reset,
            };
            let outcome = match kind {
                Attempt::Response(status, _) => Outcome::of_status(status),
                _ => Outcome::GatewayError,
            };
            let circuit = matches!(result, Err((Reason::CircuitOpen, _)));
            if !circuit && svc.record(&endpoint, outcome, candidates.len()) {
                self.stats.ejections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%backend, service, "ejected by outlier detection");
            }
            let done = circuit
                || tried.len() > retries.attempts as usize
                || !retry::retriable(retries, kind)
                || deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if !done {
                drop(retry_permit.take());
                match retry::admit(retries, policy.limits.max_retries, &svc.gauges) {
                    None => {
                        self.stats
                            .retry_budget_exhausted
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some(permit) => {
                        // A body the client is still sending is read to
                        // its end first, within the request's time.
                        let until = deadline
                            .unwrap_or_else(|| tokio::time::Instant::now() + retry::REPLAY_WAIT);
                        let body = match &again {
                            Some((_, replay)) => replay.complete(until).await,
                            None => None,
                        };
                        if let (Some(((method, uri, headers), _)), Some(body)) = (&again, body) {
                            let (method, uri, headers) =
                                (method.clone(), uri.clone(), headers.clone());
                            let mut req =
                                Request::new(body.map_err(|never| match never {}).boxed());
                            *req.method_mut() = method;
                            *req.uri_mut() = uri;
                            *req.version_mut() = version;
                            *req.headers_mut() = headers;
                            next = Some(req);
                            retry_permit = Some(permit);
                            self.stats.retries.fetch_add(1, Ordering::Relaxed);
                            debug!(%backend, attempt = tried.len(), ?kind, "retrying");
                            tokio::time::sleep(retry::backoff(retries, tried.len() as u32)).await;
                            continue;
                        }
                    }
                }
            }
            if !mirrors.is_empty()
                && let Some((head, replay)) = &again
            {
                self.mirror(mirrors, head, version, replay, call);
            }
            return match result {
                Ok(mut resp) => {
                    // The client's version, whatever the backend spoke: an
                    // HTTP/1.0 backend must not end a keep-alive client
                    // connection.
                    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                        if version != Version::HTTP_2 {
                            *resp.version_mut() = Version::HTTP_11;
                        }
                        // The backend's connection is pooled apart from the
                        // client's: its `Connection: close` or `Keep-Alive`
                        // is not the client's to act on.
                        strip_hop_by_hop(resp.headers_mut());
                    }
                    if let Some(p) = &rule {
                        p.rule.response_headers.apply(resp.headers_mut());
                        p.backend().response_headers.apply(resp.headers_mut());
                    }
                    if let Some(resilience::HashInput::NewCookie(_, cookie)) = &hash
                        && let Ok(v) = HeaderValue::from_str(cookie)
                    {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                    if let Some((s, wall)) = session
                        && let Some(t) = s.next(token, backend, wall)
                    {
                        s.set(t, resp.headers_mut());
                    }
                    // In flight until the response body ends.
                    let resp = resp.map(|b| Guarded {
                        inner: b,
                        _gauges: (in_flight, active),
                    });
                    // The route's timeouts and a gRPC client's deadline
                    // cover the whole answer (not an upgraded connection).
                    match limit.filter(|_| resp.status() != StatusCode::SWITCHING_PROTOCOLS) {
                        None => resp.map(|b| b.boxed()),
                        Some(at) => {
                            let proxy = self.clone();
                            resp.map(|b| {
                                deadline::Bounded::new(b, at, grpc_trailers, move || {
                                    proxy.count(Reason::Timeout);
                                })
                                .boxed()
                            })
                        }
                    }
                }
                Err((reason, detail)) => answer(reason, format!("{backend}: {detail}")),
            };
        }
        answer(Reason::NoHealthyUpstream, format!("{service}:{port}"))
    }

    /// The Istio labels of a request answered with `resp` (its gRPC status
    /// is read again from trailers when it comes there).
    fn request_labels(
        &self,
        call: &Call,
        chosen: &Chosen,
        grpc: bool,
        resp: &Response<Body>,
    ) -> RequestLabels {
        let snapshot = self.state.borrow().clone();
        let service = chosen.service.as_deref().unwrap_or(&call.service);
        let backend = chosen.backend.map(|b| b.ip());
        let generation = Arc::as_ptr(&snapshot) as usize;
        let mtls = chosen
            .backend
            .is_some_and(|b| self.tunnelled(&snapshot, call, b).is_some());
        // One request after another between the same pods: their labels
        // are made once per state.
        let traffic = {
            let mut cache = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
            if cache.0 != generation {
                *cache = (generation, HashMap::new());
            }
            // Keyed without the Service's name, so a hit allocates nothing.
            let same = cache
                .1
                .entry((call.client.ip(), backend, grpc, mtls))
                .or_default();
            match same.iter().find(|(s, _)| s == service) {
                Some((_, traffic)) => traffic.clone(),
                None => {
                    let peer_of = |ip| Peer::at(&snapshot, ip, &self.trust_domain);
                    let traffic = Traffic::new(
                        Reporter::Source,
                        peer_of(call.client.ip()),
                        backend.map_or_else(|| Arc::new(Peer::unknown()), peer_of),
                        Arc::new(ServiceName::in_snapshot(&snapshot, service)),
                        if grpc { "grpc" } else { "http" },
                        mtls,
                    );
                    same.push((service.to_owned(), traffic.clone()));
                    traffic
                }
            }
        };
        let flags = telemetry::flags_of(resp.headers());
        RequestLabels {
            traffic,
            response_code: resp.status().as_u16(),
            grpc_status: if grpc {
                Some(telemetry::grpc_status(resp.headers()).unwrap_or(0))
            } else {
                None
            },
            flags,
            relabelled: None,
        }
    }

    /// Sends copies of a request to the rule's mirrors (each with its
    /// share), answers dropped. The body goes along when it was complete and
    /// within the record's limit by the time the first answer came; else
    /// the copy is skipped and counted.
    fn mirror(
        self: &Arc<Self>,
        mirrors: &[routes::table::Mirror],
        head: &Head,
        version: Version,
        replay: &Replay,
        call: &Call,
    ) {
        for m in mirrors.iter().filter(|m| chance(m.ppm)) {
            let Some(body) = replay.body() else {
                self.stats.mirror_skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (method, uri, mut headers) = head.clone();
            // Envoy's mark of a shadow request: `-shadow` after the host.
            let shadow = |host: &str| format!("{host}-shadow");
            if let Some(v) = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| HeaderValue::from_str(&shadow(h)).ok())
            {
                headers.insert(header::HOST, v);
            }
            let uri = match uri.authority() {
                Some(a) => {
                    let mut parts = uri.clone().into_parts();
                    parts.authority = shadow(a.as_str()).parse().ok();
                    Uri::from_parts(parts).unwrap_or(uri)
                }
                None => uri,
            };
            let mut req = Request::new(body.map_err(|never| match never {}).boxed());
            *req.method_mut() = method;
            *req.uri_mut() = uri;
            *req.version_mut() = version;
            *req.headers_mut() = headers;
            let (this, call, m) = (self.clone(), call.clone(), m.clone());
            tokio::spawn(
                async move {
                    let snapshot = this.state.borrow().clone();
                    let Ok((backend, svc)) =
                        this.endpoint_for(&snapshot, &m.service, m.port, &req, &call)
                    else {
                        this.stats.mirror_skipped.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    this.stats.mirrored.fetch_add(1, Ordering::Relaxed);
                    match this.forward(&snapshot, req, &call, backend, &svc).await {
                        // Read to the end, so the connection can be pooled.
                        Ok(resp) => drop(resp.into_body().collect().await),
                        Err((reason, detail)) => {
                            debug!(%backend, reason = reason.text(), detail, "mirrored request failed");
                        }
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// The endpoint of `service:port` that a request of the agent's own
    /// (a mirror's copy, an authorization check) goes to: balanced by the
    /// Service's policy, within the client's egress policy and authorized
    /// for it.
    fn endpoint_for(
        &self,
        snapshot: &Snapshot,
        service: &str,
        port: u16,
        req: &Request<Body>,
        call: &Call,
    ) -> Result<(SocketAddr, Arc<ServiceState>), (Reason, String)> {
        let svc = self.service_state(snapshot, service);
        let candidates = snapshot
            .service(service)
            .map(|s| s.backends_for(port, call.dialled))
            .unwrap_or_default();
        let candidates = self.egress_allowed(snapshot, call, candidates);
        let Some((backend, _)) = svc.pick(&candidates, &[], None, None) else {
            return Err((
                Reason::NoHealthyUpstream,
                format!("{service}:{port} has no usable endpoint"),
            ));
        };
        // The agent's own request is judged on a copy of its head: it is
        // sent as it is. CUSTOM policies of its destination are not asked
        // about it: a check or a mirror is not the request itself, and a
        // provider asking about its own checks would never end.
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.headers_mut() = req.headers().clone();
        if let Err((reason, detail)) = self.authorize(snapshot, call, backend, &mut head) {
            return Err((reason, format!("{backend}: {detail}")));
        }
        Ok((backend, svc))
    }

    /// Asks an authorization service (a route's `ExternalAuth`, a CUSTOM
    /// policy's provider) about a request: the changes
    /// to make to it when allowed, else the answer the client gets (the
    /// service's own, or its `status_on_error` when it could not be asked,
    /// unless it fails open).
    async fn external_auth<B>(
        &self,
        snapshot: &Snapshot,
        auth: &routes::table::ExternalAuth,
        req: &mut Request<B>,
        call: &Call,
        peers: &ext_auth::grpc::Peers<'_>,
    ) -> Result<(ext_auth::Allowed, ext_auth::Read), Response<Body>>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let grpc = authz::is_grpc(req.headers());
        let path = req.uri().path().to_owned();
        let error = |detail: String| {
            self.count(Reason::ExtAuthError);
            tracing::info!(
                path,
                detail,
                "request refused: its authorization service could not be asked"
            );
            let mut resp = reply(Reason::ExtAuthError, &detail, grpc);
            // A gRPC client reads the status in the trailers.
            if !grpc && let Ok(status) = StatusCode::from_u16(auth.status_on_error) {
                *resp.status_mut() = status;
            }
            resp
        };
        // The start of the body, when the check is to carry it; what was
        // read goes on to the backend.
        let (read, start) = if auth.forward_body > 0 {
            let reading = ext_auth::read_start(req.body_mut(), auth.forward_body);
            match tokio::time::timeout(auth.timeout, reading).await {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => return Err(error(format!("the request's body broke: {e}"))),
                Err(_) => return Err(error("the request's body did not come in time".into())),
            }
        } else {
            Default::default()
        };
        let check = match auth.protocol {
            AuthProtocol::Http => {
                ext_auth::check(auth, req.method(), req.uri(), req.headers(), start)
            }
            AuthProtocol::Grpc => {
                ext_auth::grpc::check(auth, req, &start, peers, std::time::SystemTime::now())
            }
        };
        match self.ask(snapshot, auth, check, call).await {
            Ok(ext_auth::Verdict::Allow(allowed)) => Ok((allowed, read)),
            Ok(ext_auth::Verdict::Deny(mut resp)) => {
                self.count(Reason::ExtAuthDenied);
                debug!(path, status = %resp.status(), "request refused by its authorization service");
                resp.headers_mut().insert(
                    "x-trellis-reason",
                    HeaderValue::from_static(Reason::ExtAuthDenied.text()),
                );
                Err(resp)
            }
            Err(detail) if auth.fail_open => {
                self.stats
                    .ext_auth_failed_open
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    path,
                    detail,
                    "request let through unchecked: its authorization service could not be asked (failOpen)"
                );
                Ok((ext_auth::Allowed::default(), read))
            }
            Err(detail) => Err(error(detail)),
        }
    }

    /// Sends `check` to `auth`'s service, as `call`, and reads its verdict
    /// within the service's timeout; `Err`: why there is none.
    async fn ask(
        &self,
        snapshot: &Snapshot,
        auth: &routes::table::ExternalAuth,
        check: Request<Body>,
        call: &Call,
    ) -> Result<ext_auth::Verdict, String> {
        let Some((service, port)) = &auth.service else {
            return Err("the authorization service does not resolve".to_string());
        };
        let (backend, svc) = self
            .endpoint_for(snapshot, service, *port, &check, call)
            .map_err(|(reason, detail)| format!("{service}:{port}: {}: {detail}", reason.text()))?;
        // The answer's body is read within the time too: a service that
        // sends its head and stalls is as late as one that says nothing.
        let answer = async {
            let answer = self.forward(snapshot, check, call, backend, &svc).await;
            let answer =
                answer.map_err(|(reason, detail)| format!("{}: {detail}", reason.text()))?;
            match auth.protocol {
                AuthProtocol::Http => Ok(ext_auth::verdict(auth, answer).await),
                AuthProtocol::Grpc => ext_auth::grpc::verdict(answer).await,
            }
        };
        match tokio::time::timeout(auth.timeout, answer).await {
            Err(_) => Err(format!("{service}:{port} did not answer in time")),
            Ok(Err(detail)) => Err(format!("{service}:{port}: {detail}")),
            // Istio's failOpen covers a service that fails as well as one
            // that cannot be reached.
            Ok(Ok(ext_auth::Verdict::Deny(resp)))
                if auth.fail_open && resp.status().is_server_error() =>
            {
                Err(format!("the service answered {}", resp.status()))
            }
            Ok(Ok(verdict)) => Ok(verdict),
        }
    }

    /// The run-time state of `service` under its current policy (a new one
    /// when the policy changed).
    fn service_state(&self, snapshot: &Snapshot, service: &str) -> Arc<ServiceState> {
        let policy = snapshot
            .traffic
            .get(service)
            .cloned()
            .unwrap_or_else(|| DEFAULT_POLICY.clone());
        self.state_for(service, policy)
    }

    /// The run-time state kept under `key` (a Service, or a route and the
    /// Service it sends to), new when `policy` changed.
    fn state_for(&self, key: &str, policy: Arc<resilience::Resilience>) -> Arc<ServiceState> {
        let mut map = self.services.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(s) if Arc::ptr_eq(&s.policy, &policy) || *s.policy == *policy => s.clone(),
            _ => {
                let state = Arc::new(ServiceState::new(policy));
                map.insert(key.to_owned(), state.clone());
                state
            }
        }
    }

    /// Keeps one health-check task per endpoint of every Service whose
    /// policy asks for checks, as the state changes.
    pub async fn run_health_checks(self: Arc<Self>) {
        let mut state = self.state.clone();
        loop {
            // Not held while waiting: the next change would free it here.
            self.reconcile_checks(&state.borrow_and_update().clone());
            if state.changed().await.is_err() {
                break;
            }
        }
        for (_, task) in self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            task.abort();
        }
    }

    /// Pooled upstream connections: idle HTTP/1.1 ones, shared HTTP/2 ones.
    pub fn pooled(&self) -> (usize, usize) {
        self.pools.len()
    }

    /// Lets go of pooled upstream connections idle past the idle timeout
    /// (theirs, or the agent's) and of closed ones, until the task is
    /// dropped; as often as the shortest of those timeouts needs.
    pub async fn sweep_pools(self: Arc<Self>) {
        let mut state = self.state.clone();
        let every = |snapshot: &Snapshot| {
            let shortest = snapshot
                .traffic
                .values()
                .filter_map(|p| p.idle_timeout)
                .chain([self.pool_idle])
                .min()
                .unwrap_or(self.pool_idle);
            pool::sweep_every(shortest)
        };
        let mut next = tokio::time::Instant::now() + every(&state.borrow_and_update());
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // A policy with a shorter idle timeout is swept for
                    // soon; a sweep due already stays due.
                    let soonest = tokio::time::Instant::now() + every(&state.borrow_and_update());
                    next = next.min(soonest);
                    continue;
                }
            }
            next = tokio::time::Instant::now() + every(&state.borrow());
            let swept = self.pools.sweep(std::time::Instant::now(), self.pool_idle);
            if swept.idle > 0 {
                self.stats
                    .pool_idle_closed
                    .fetch_add(swept.idle as u64, Ordering::Relaxed);
                debug!(connections = swept.idle, "idle upstream connections let go");
            }
        }
    }

    fn reconcile_checks(self: &Arc<Self>, snapshot: &Snapshot) {
        let mut wanted = HashMap::new();
        for (service, policy) in &snapshot.traffic {
            let Some(check) = &policy.health else {
                continue;
            };
            let Some(view) = snapshot.service(service) else {
                continue;
            };
            let svc = self.service_state(snapshot, service);
            let endpoints: Vec<SocketAddr> =
                view.backends.values().flatten().map(|b| b.addr).collect();
            svc.retain(&endpoints);
            for addr in endpoints {
                wanted.insert((service.clone(), addr), (svc.clone(), check.clone()));
            }
        }
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.retain(|key, task| {
            let keep = wanted
                .get(key)
                .is_some_and(|(svc, _)| !task.is_finished() && self.current(&key.0, svc));
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (svc, check)) in wanted {
            if checks.contains_key(&key) {
                continue;
            }
            let (service, addr) = key.clone();
            let this = self.clone();
            let prober = svc.clone();
            let path = check.http_path.clone();
            let task = tokio::spawn(resilience::health::run(
                svc,
                service,
                addr,
                check,
                move || {
                    let this = this.clone();
                    let prober = prober.clone();
                    let path = path.clone();
                    async move { this.probe(&prober, addr, path.as_deref()).await }
                },
            ));
            checks.insert(key, task.abort_handle());
        }
    }

    /// Whether `svc` is still the state of `service` (its policy unchanged).
    fn current(&self, service: &str, svc: &Arc<ServiceState>) -> bool {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .is_some_and(|s| Arc::ptr_eq(s, svc))
    }

    /// One health check: an HTTP GET of `path` (2xx passes) or a connect,
    /// through the path requests take (HBONE for meshed pods elsewhere, with
    /// the identity of the Service's last local caller).
    async fn probe(
        &self,
        svc: &ServiceState,
        backend: SocketAddr,
        path: Option<&str>,
    ) -> Result<(), String> {
        let snapshot = self.state.borrow().clone();
        let identity = svc.prober.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let node_ip = snapshot
            .node
            .as_ref()
            .and_then(|n| n.internal_ip(backend.is_ipv6()))
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let call = Call {
            client: SocketAddr::new(node_ip, 0),
            client_namespace: String::new(),
            client_identity: identity,
            service: String::new(),
            port: 0,
            dialled: backend.ip(),
            upstream_h2: false,
            grpc_web_upstream: false,
            reporting: Reporting::everything(),
        };
        let dst = self.tunnel(&snapshot, &call, backend);
        let (io, _guard) = self
            .connect(backend, dst, &call, None)
            .await
            .map_err(|(_, e)| e)?;
        let Some(path) = path else { return Ok(()) };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, backend.to_string())
            .header(header::USER_AGENT, "trellis-health-check")
            .body(empty_body())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string());
        conn.abort();
        let status = resp?.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("GET {path}: {status}"))
        }
    }

    /// Services' endpoint records, for the admin API.
    pub fn endpoints(&self) -> std::collections::BTreeMap<String, Vec<resilience::EndpointStatus>> {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.endpoint_status()))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    fn count(&self, reason: Reason) {
        let counter = match reason {
            Reason::NoRoute => &self.stats.no_route,
            Reason::BackendNotFound => &self.stats.backend_not_found,
            Reason::NoHealthyUpstream => &self.stats.no_healthy_upstream,
            Reason::UpstreamConnectFailed => &self.stats.upstream_connect_failed,
            Reason::UpstreamReset => &self.stats.upstream_reset,
            Reason::UpstreamRefused => &self.stats.upstream_refused,
            Reason::Timeout => &self.stats.timeout,
            Reason::Denied => &self.stats.denied,
            Reason::Unauthenticated => &self.stats.unauthenticated,
            Reason::ExtAuthDenied => &self.stats.ext_auth_denied,
            Reason::ExtAuthError => &self.stats.ext_auth_error,
            Reason::CircuitOpen => &self.stats.circuit_open,
            Reason::RateLimited => &self.stats.rate_limited,
            Reason::FaultInjected => &self.stats.fault_injected,
            Reason::HeaderTooLarge => &self.stats.header_too_large,
            Reason::BadRequest => &self.stats.bad_request,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The endpoints the client pod's egress network policy allows.
    fn egress_allowed(
        &self,
        snapshot: &Snapshot,
        call: &Call,
        candidates: Vec<SocketAddr>,
    ) -> Vec<SocketAddr> {
        match (
            &self.policy,
            snapshot.workload_by_ip(call.client.ip().to_canonical()),
        ) {
            (Some(verdicts), Some(client)) => {
                verdicts.egress_backends(snapshot, &client.id(), call.client, candidates)
            }
            _ => candidates,
        }
    }

    /// Same-node delivery: the destination's request authentication and
    /// authorization policies apply here (across nodes the destination's
    /// agent decides). An admitted request gets authentication's edits.
    fn authorize<B>(
        &self,
        snapshot: &Snapshot,
        call: &Call,
        backend: SocketAddr,
        req: &mut Request<B>,
    ) -> Result<Vec<authz::Ask>, (Reason, String)> {
        let Some(src) = &call.client_identity else {
            return Ok(Vec::new());
        };
        if !self.on_this_node(snapshot, backend) {
            return Ok(Vec::new());
        }
        let caller = authz::Caller::new(src, call.client.ip());
        authz::admit(snapshot, caller, backend, req).map_err(refused_answer)
    }

    /// Puts a request to the local pod at `target` to the providers of the
    /// CUSTOM policies it matched, in order, asking as that pod (its
    /// identity, through the mesh), as the pod's own proxy would: the
    /// request with the changes each allowing answer makes, and the headers
    /// they put on the client's answer; or the answer the client gets (the
    /// provider's denial, or 403 `ext-auth-error` when one cannot be asked:
    /// fail closed).
    pub(super) async fn ask_providers(
        &self,
        snapshot: &Snapshot,
        asks: &[authz::Ask],
        mut req: Request<Body>,
        source: (SocketAddr, &Identity),
        target: SocketAddr,
    ) -> Result<(Request<Body>, Vec<ext_auth::Put>), Response<Body>> {
        let Some(asker) = self.asker(snapshot, target) else {
            self.count(Reason::ExtAuthError);
            return Err(reply(
                Reason::ExtAuthError,
                &format!("{target} is no longer a known pod"),
                authz::is_grpc(req.headers()),
            ));
        };
        let peers = asker.peers(source, target);
        let asker = &asker.call;
        let mut answer = Vec::new();
        for ask in asks {
            debug!(policy = %ask.policy, provider = %ask.provider, path = req.uri().path(), "asking a CUSTOM policy's provider");
            let (allowed, read) = self
                .external_auth(snapshot, &ask.service, &mut req, asker, &peers)
                .await?;
            let (mut parts, body) = req.into_parts();
            ext_auth::apply(&allowed, &mut parts.headers, &mut parts.uri);
            answer.extend(allowed.answer);
            req = Request::from_parts(parts, ext_auth::Prefixed::new(read, body).boxed());
        }
        Ok((req, answer))
    }

    /// Asks the providers of CUSTOM policies, in order, about a connection
    /// from `source` to the local pod at `target` that is not HTTP (gRPC
    /// providers: Envoy's network check). `Err`: the policy whose provider
    /// refuses it, and why.
    pub(super) async fn ask_about_connection(
        &self,
        snapshot: &Snapshot,
        asks: &[authz::Ask],
        source: (SocketAddr, &Identity),
        target: SocketAddr,
    ) -> Result<(), (String, String)> {
        let Some(asker) = self.asker(snapshot, target) else {
            let policy = asks.first().map(|a| a.policy.clone()).unwrap_or_default();
            return Err((policy, format!("{target} is no longer a known pod")));
        };
        let peers = asker.peers(source, target);
        for ask in asks {
            debug!(policy = %ask.policy, provider = %ask.provider, "asking a CUSTOM policy's provider about a connection");
            let check = ext_auth::grpc::connection_check(
                &ask.service,
                &peers,
                std::time::SystemTime::now(),
            );
            let refused = match self.ask(snapshot, &ask.service, check, &asker.call).await {
                Ok(ext_auth::Verdict::Allow(_)) => continue,
                Ok(ext_auth::Verdict::Deny(resp)) => {
                    self.count(Reason::ExtAuthDenied);
                    format!(
                        "its provider {} denies it ({})",
                        ask.provider,
                        resp.status()
                    )
                }
                Err(detail) if ask.service.fail_open => {
                    self.stats
                        .ext_auth_failed_open
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(provider = %ask.provider, detail,
                        "connection let through unchecked: its authorization service could not be asked (failOpen)");
                    continue;
                }
                Err(detail) => {
                    self.count(Reason::ExtAuthError);
                    format!("its provider {} could not be asked: {detail}", ask.provider)
                }
            };
            return Err((ask.policy.clone(), refused));
        }
        Ok(())
    }

    /// How the agent asks providers for the local pod at `target`: as the
    /// pod, with its identity.
    fn asker(&self, snapshot: &Snapshot, target: SocketAddr) -> Option<Asker> {
        let pod = snapshot.workload_by_ip(target.ip().to_canonical())?;
        let identity = Identity::of(pod, &self.trust_domain);
        Some(Asker {
            call: Call {
                client: SocketAddr::new(target.ip(), 0),
                client_namespace: pod.namespace.clone(),
                client_identity: Some(identity.clone()),
                service: String::new(),
                port: 0,
                dialled: target.ip(),
                upstream_h2: false,
                grpc_web_upstream: false,
                reporting: Reporting::everything(),
            },
            principal: identity.to_string(),
        })
    }

    /// Whether `backend` is a pod on this node.
    fn on_this_node(&self, snapshot: &Snapshot, backend: SocketAddr) -> bool {
        snapshot
            .workload_by_ip(backend.ip())
            .is_some_and(|w| w.node == self.node)
    }

    /// The tunnel identities to `backend` when it is a meshed pod on another
    /// node.
    fn tunnel(&self, snapshot: &Snapshot, call: &Call, backend: SocketAddr) -> Option<Identity> {
        let dst = self.tunnelled(snapshot, call, backend)?;
        Some(Identity::of(dst, &self.trust_domain))
    }

    /// The pod at `backend` when requests to it go through a tunnel.
    fn tunnelled<'s>(
        &self,
        snapshot: &'s Snapshot,
        call: &Call,
        backend: SocketAddr,
    ) -> Option<&'s crate::state::Workload> {
        self.hbone.as_ref()?;
        call.client_identity.as_ref()?;
        snapshot
            .workload_by_ip(backend.ip())
            .filter(|w| w.meshed && w.node != self.node)
    }

    /// Sends one attempt of a request to `backend`, as `snapshot` (the state
    /// the request was routed by) says to reach it.
    async fn forward(
        &self,
        snapshot: &Snapshot,
        mut req: Request<Body>,
        call: &Call,
        backend: SocketAddr,
        svc: &ServiceState,
    ) -> Result<Response<Body>, (Reason, String)> {
        let dst = self.tunnel(snapshot, call, backend);
        // A pod on this node answers within tens of microseconds: worth
        // polling for rather than sleeping (busy_poll.rs).
        let local = self.on_this_node(snapshot, backend);
        let key = UpstreamKey {
            backend,
            src: dst.as_ref().and(call.client_identity.clone()),
        };
        let from_h2 = req.version() == Version::HTTP_2;
        let asked = (!from_h2)
            .then(|| upgrade_protocol(req.headers()))
            .flatten();
        // An upgrade keeps its HTTP/1.1 connection.
        let h2 = from_h2 || (call.upstream_h2 && asked.is_none());
        let upgrade = asked.and_then(|p| {
            Some((
                p,
                req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()?,
            ))
        });
        strip_hop_by_hop(req.headers_mut());
        if h2 {
            // hyper's HTTP/2 client wants the scheme and authority; from
            // HTTP/1.1, `Host` becomes `:authority` (RFC 9113 8.3.1).
            let host = (!from_h2)
                .then(|| req.headers_mut().remove(header::HOST))
                .flatten();
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| host.and_then(|h| h.to_str().ok().map(str::to_owned)))
                .unwrap_or_else(|| backend.to_string());
            *req.version_mut() = Version::HTTP_2;
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(pq)
                .build()
            {
                *req.uri_mut() = uri;
            }
            // A backend going away (GOAWAY: graceful restart, gRPC's
            // MaxConnectionAge) or shedding streams (REFUSED_STREAM) leaves
            // requests it never processed (RFC 9113 8.7, 6.8): those go
            // again on a new connection. hyper hands back a request it had
            // not started; one without a body is rebuilt from its head.
            let again = hyper::body::Body::is_end_stream(req.body()).then(|| head_of(&req));
            let mut sender = self.h2_sender(&key, dst.clone(), call, svc).await?;
            let resp = match self.answer(local, sender.try_send_request(req)).await {
                Ok(resp) => resp,
                Err(mut e) => {
                    let unprocessed = refused(e.error());
                    let retry = e.take_message().or_else(|| {
                        Some(bodiless(again.filter(|_| unprocessed)?, Version::HTTP_2))
                    });
                    // A refused request whose body had started out is
                    // the retry policy's to send again, from its record,
                    // on a new connection as the others are.
                    let Some(req) = retry else {
                        let reason = upstream_error(e.error());
                        if reason == Reason::UpstreamRefused {
                            self.pools.forget_h2(&key);
                        }
                        return Err((reason, e.into_error().to_string()));
                    };
                    self.stats.refused_retries.fetch_add(1, Ordering::Relaxed);
                    debug!(backend = %key.backend, error = %e.error(), "request not processed by the backend's HTTP/2 connection: sent again on a new one");
                    let mut sender = self.h2_connect(&key, dst, call, svc).await?;
                    self.answer(local, sender.send_request(req))
                        .await
                        .map_err(|e| (upstream_error(&e), e.to_string()))?
                }
            };
            Ok(resp.map(|b| b.map_err(BodyError::from).boxed()))
        } else {
            // HTTP/1.1 upstream: origin-form target, the authority in Host.
            if req.headers().get(header::HOST).is_none()
                && let Some(a) = req.uri().authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            *req.version_mut() = Version::HTTP_11;
            // Most requests come in origin form already.
            if req.uri().scheme().is_some() || req.uri().authority().is_some() {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                if let Ok(uri) = pq.parse() {
                    *req.uri_mut() = uri;
                }
            }
            if let Some((protocol, client)) = upgrade {
                return self
                    .upgrade(req, protocol, client, key, dst, call, svc)
                    .await;
            }
            let (mut sender, mut served) = self.h1_sender(&key, dst.clone(), call, svc).await?;
            let reused = served > 0;
            // A pooled connection the backend closed while it sat idle (its
            // keep-alive timeout racing this request) fails a request
            // through no fault of the request's. One that was never written
            // goes again on a new connection; so does one that was, when it
            // is idempotent and has no body (RFC 9112 9.3.1), as clients
            // retry such requests themselves.
            let again = (reused
                && req.method().is_idempotent()
                && hyper::body::Body::is_end_stream(req.body()))
            .then(|| head_of(&req));
            let resp = match self.answer(local, sender.try_send_request(req)).await {
                Ok(resp) => resp,
                Err(mut e) => {
                    let closed = e.error().is_incomplete_message() || e.error().is_canceled();
                    let retry = e
                        .take_message()
                        .or_else(|| Some(bodiless(again.filter(|_| closed)?, Version::HTTP_11)));
                    let Some(req) = retry.filter(|_| reused) else {
                        return Err((Reason::UpstreamReset, e.into_error().to_string()));
                    };
                    self.stats.stale_retries.fetch_add(1, Ordering::Relaxed);
                    debug!(backend = %key.backend, error = %e.error(), "pooled connection closed under the request: sent again on a new one");
                    sender = self.h1_connect(&key, dst, call, svc).await?;
                    served = 0;
                    self.answer(local, sender.send_request(req))
                        .await
                        .map_err(|e| (Reason::UpstreamReset, e.to_string()))?
                }
            };
            self.pools
                .put_h1(key, sender, served + 1, pool_limits(&svc.policy));
            Ok(resp.map(|b| b.map_err(BodyError::from).boxed()))
        }
    }

    /// Awaits an upstream's answer: polled for when the upstream is a pod on
    /// this node (busy_poll.rs).
    async fn answer<F: Future>(&self, local: bool, sent: F) -> F::Output {
        if !local {
            return sent.await;
        }
        let (answer, polled) = self.poller.wait(sent).await;
        let counter = if polled {
            &self.stats.answers_while_polling
        } else {
            &self.stats.answers_after_sleeping
        };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }

    /// An HTTP/1.1 upgrade (WebSocket, h2c) of a request already in
    /// HTTP/1.1 form: it goes on a connection of its own; after a 101 the two upgraded connections are
    /// spliced, bytes both ways, until either side closes.
    #[allow(clippy::too_many_arguments)]
    async fn upgrade(
        &self,
        mut req: Request<Body>,
        protocol: HeaderValue,
        client: hyper::upgrade::OnUpgrade,
        key: UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
        svc: &ServiceState,
    ) -> Result<Response<Body>, (Reason, String)> {
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        req.headers_mut().insert(header::UPGRADE, protocol);
        let (io, guard, counted) = self
            .connect_counted(key.backend, dst, call, svc, None)
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
        drive(
            conn.with_upgrades(),
            (guard, counted),
            "upgraded upstream connection",
        );
        let mut resp = sender
            .send_request(req)
            .await
            .map_err(|e| (Reason::UpstreamReset, e.to_string()))?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(
                async move {
                    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
                        debug!("an upgrade did not complete");
                        return;
                    };
                    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                        Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                        Err(e) => debug!(error = %e, "upgraded connection ended"),
                    }
                }
                .in_current_span(),
            );
        }
        Ok(resp.map(|b| b.map_err(BodyError::from).boxed()))
    }

    /// An HTTP/1.1 upstream connection: a pooled one when one is idle, with
    /// the requests it has carried, else a new one (none).
    async fn h1_sender(
        &self,
        key: &UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
        svc: &ServiceState,
    ) -> Result<(hyper::client::conn::http1::SendRequest<Body>, u32), (Reason, String)> {
        if let Some(pooled) = self.pools.take_h1(key) {
            return Ok(pooled);
        }
        Ok((self.h1_connect(key, dst, call, svc).await?, 0))
    }

    /// A new HTTP/1.1 upstream connection.
    async fn h1_connect(
        &self,
        key: &UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
        svc: &ServiceState,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, (Reason, String)> {
        let (io, guard, counted) = self
            .connect_counted(key.backend, dst, call, svc, Some("http/1.1"))
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
        drive(conn, (guard, counted), "upstream HTTP/1.1 connection");
        Ok(sender)
    }

    async fn h2_sender(
        &self,
        key: &UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
        svc: &ServiceState,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, (Reason, String)> {
        if let Some(sender) = self.pools.h2(key, pool_limits(&svc.policy)) {
            return Ok(sender);
        }
        self.h2_connect(key, dst, call, svc).await
    }

    /// A new HTTP/2 connection to the backend, pooled in place of any
    /// before it.
    async fn h2_connect(
        &self,
        key: &UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
        svc: &ServiceState,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, (Reason, String)> {
        let (io, guard, counted) = self
            .connect_counted(key.backend, dst, call, svc, Some("h2"))
            .await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
        drive(conn, (guard, counted), "upstream HTTP/2 connection");
        self.pools
            .put_h2(key.clone(), sender.clone(), pool_limits(&svc.policy));
        Ok(sender)
    }

    /// A new upstream connection within the circuit breaker's limits:
    /// connections open to the Service (`maxConnections`) and requests
    /// waiting for one (`maxPendingRequests`); counted while it lives.
    async fn connect_counted(
        &self,
        backend: SocketAddr,
        dst: Option<Identity>,
        call: &Call,
        svc: &ServiceState,
        hint: Option<&'static str>,
    ) -> Result<
        (
            Pin<Box<dyn Io>>,
            Option<crate::hbone::client::StreamGuard>,
            Gauge,
        ),
        (Reason, String),
    > {
        let limits = &svc.policy.limits;
        let connections = Gauge::service(&svc.gauges, |g| &g.connections);
        if let Some(max) = limits.max_connections
            && connections.value > u64::from(max)
        {
            return Err((Reason::CircuitOpen, format!("{max} connections open")));
        }
        let pending = Gauge::service(&svc.gauges, |g| &g.pending);
        if let Some(max) = limits.max_pending_requests
            && pending.value > u64::from(max)
        {
            return Err((
                Reason::CircuitOpen,
                format!("{max} requests wait for a connection"),
            ));
        }
        let (io, guard) = self.connect(backend, dst, call, hint).await?;
        Ok((io, guard, connections))
    }

    /// An upstream connection: an HBONE stream to a meshed pod on another
    /// node (saying it carries `hint`, the HTTP version), else TCP from the
    /// node's address.
    async fn connect(
        &self,
        backend: SocketAddr,
        dst: Option<Identity>,
        call: &Call,
        hint: Option<&'static str>,
    ) -> Result<(Pin<Box<dyn Io>>, Option<crate::hbone::client::StreamGuard>), (Reason, String)>
    {
        let source = self
            .state
            .borrow()
            .node
            .as_ref()
            .and_then(|n| n.internal_ip(backend.is_ipv6()));
        if let (Some(dst), Some(src), Some(pool)) = (dst, &call.client_identity, &self.hbone) {
            let (stream, guard) = pool
                .open(src, &dst, backend, source, call.client, hint)
                .await
                .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
            return Ok((Box::pin(stream), Some(guard)));
        }
        let stream = super::connect_from(
            backend,
            source.map_or(super::Source::Any, super::Source::Node),
            self.connect_timeout,
        )
        .await
        .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        match self.accelerate(&stream, backend).await {
            Some((maps, side)) => Ok((
                Box::pin(super::relay::Tracked::new(stream, maps, side)),
                None,
            )),
            None => Ok((Box::pin(stream), None)),
        }
    }

    /// Puts a new connection to a meshed pod on this node into the
    /// sockhash ([`super::relay::add_facing_pod`]).
    async fn accelerate(
        &self,
        stream: &TcpStream,
        backend: SocketAddr,
    ) -> Option<(
        Arc<crate::bpf::sockets::SocketMaps>,
        (trellis_common::SockKey, trellis_common::SockState),
    )> {
        let maps = self.sockets.as_ref()?;
        let local = self
            .state
            .borrow()
            .workload_by_ip(backend.ip())
            .is_some_and(|w| w.node == self.node && w.meshed);
        if !local {
            return None;
        }
        let side = super::relay::add_facing_pod(maps, stream, None).await?;
        self.stats
            .accelerated_upstreams
            .fetch_add(1, Ordering::Relaxed);
        Some((maps.clone(), side))
    }
}

/// Runs an upstream connection's task, holding `guards` (its HBONE stream,
/// its place in the circuit breaker's count) until it ends.
fn drive<F, E, G>(conn: F, guards: G, what: &'static str)
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
    G: Send + 'static,
{
    tokio::spawn(
        async move {
            let _guards = guards;
            if let Err(e) = conn.await {
                debug!(error = %e, "{what} ended");
            }
        }
        .in_current_span(),
    );
}

/// The policy of Services without a `TrafficPolicy`: round robin, no
/// retries, no limits.
static DEFAULT_POLICY: std::sync::LazyLock<Arc<resilience::Resilience>> =
    std::sync::LazyLock::new(Arc::default);

type TrafficKey = (std::net::IpAddr, Option<std::net::IpAddr>, bool, bool);
type TrafficCache = HashMap<TrafficKey, Vec<(String, Traffic)>>;

/// What a request's handling chose, for its metrics.
#[derive(Default)]
struct Chosen {
    /// The Service it was sent to (after routing).
    service: Option<String>,
    /// The endpoint of its last attempt.
    backend: Option<SocketAddr>,
    /// The request body's bytes and gRPC messages.
    body: Arc<telemetry::BodyCount>,
    /// `namespace/name` of the route that matched.
    route: Option<String>,
    /// What the answer gets when the rule's CORS filter allows the
    /// request's origin, whoever answers (the agent's own refusals too, so
    /// a page can read why).
    cors: Option<http::HeaderMap>,
    /// Headers the route's authorization service put on the answer.
    auth_answer: Vec<ext_auth::Put>,
    /// The request is gRPC-Web's text form: its body is base64.
    web_text: bool,
}

/// One count in a gauge, taken back when dropped.
struct Gauge {
    counter: Counter,
    /// The count with this one in it.
    value: u64,
}

enum Counter {
    /// An endpoint's requests in flight.
    Endpoint(Arc<Endpoint>),
    /// One of a Service's gauges.
    Service(
        Arc<resilience::Gauges>,
        fn(&resilience::Gauges) -> &AtomicU64,
    ),
}

impl Counter {
    fn get(&self) -> &AtomicU64 {
        match self {
            Self::Endpoint(e) => &e.active,
            Self::Service(g, pick) => pick(g),
        }
    }
}

impl Gauge {
    fn enter(counter: Counter) -> Self {
        let value = counter.get().fetch_add(1, Ordering::Relaxed) + 1;
        Self { counter, value }
    }

    fn service(
        gauges: &Arc<resilience::Gauges>,
        pick: fn(&resilience::Gauges) -> &AtomicU64,
    ) -> Self {
        Self::enter(Counter::Service(gauges.clone(), pick))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.counter.get().fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one client connection in `protocol` with the client limits
/// (header size; for HTTP/1.1 the header read timeout from a request's
/// first byte; upgrades), until it closes or sits `idle` (`client_idle`).
pub(super) async fn serve_client<I, S, B>(
    client: I,
    protocol: Protocol,
    service: S,
    idle: Duration,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match protocol {
        Protocol::Http2 => {
            let (client, reads) = client_idle::Counted::new(client);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .serve_connection(TokioIo::new(client), service);
            let mut conn = std::pin::pin!(conn);
            let mut quiet = client_idle::Quiet::new(reads, idle);
            tokio::select! {
                done = conn.as_mut() => return done,
                () = quiet.elapsed() => {}
            }
            debug!("client's HTTP/2 connection idle: shut gracefully");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ => {
            let (client, reads) = client_idle::Counted::new(client);
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .max_buf_size(MAX_HEADER_BYTES)
                .timer(client_idle::HeadTimer::new(reads, idle))
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(client), service)
                .with_upgrades()
                .await
        }
    }
}

/// A response body holding gauges until it ends.
struct Guarded<B> {
    inner: B,
    _gauges: (Gauge, Gauge),
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The size of a request's line and headers when over
/// [`MAX_HEADER_BYTES`]: hyper's own read limit is approximate (it depends
/// on how the bytes arrived), so the documented one is checked here.
pub(super) fn oversized<B>(req: &Request<B>) -> Option<usize> {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    let size = req
        .headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4);
    (size > MAX_HEADER_BYTES).then_some(size)
}

/// The agent's own answer.
pub(super) fn reply(reason: Reason, detail: &str, grpc: bool) -> Response<Body> {
    let mut resp = if grpc {
        // gRPC errors are a 200 with the status in trailers-only form.
        let mut r = Response::new(Full::new(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        grpc_status_fields(h, reason, &format!("{}: {detail}", reason.text()));
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from(format!(
            "{}: {detail}\n",
            reason.text()
        ))));
        *r.status_mut() = reason.status();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    resp.headers_mut()
        .insert("x-trellis-reason", HeaderValue::from_static(reason.text()));
    if reason == Reason::Unauthenticated {
        // RFC 6750 section 3: the challenge of a refused bearer token.
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

/// The gRPC status of the agent's own answer for `reason`: in a
/// trailers-only answer's headers, or in the trailers that end a call.
pub(super) fn grpc_status_fields(fields: &mut http::HeaderMap, reason: Reason, message: &str) {
    fields.insert(
        "grpc-status",
        HeaderValue::from(u16::from(reason.grpc_status())),
    );
    if let Ok(v) = HeaderValue::from_str(message) {
        fields.insert("grpc-message", v);
    }
}

/// A client connection that, when dropped, is shut for writing and drained
/// for a moment before it closes: closing with unread input would send a
/// reset, and the reset can destroy an error answer (431, 400) the client
/// has not read yet (nginx's lingering close).
pub(super) struct LingeringClose(Option<TcpStream>);

impl LingeringClose {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self(Some(stream))
    }
}

/// How long a closing client connection is drained.
const LINGER: Duration = Duration::from_secs(2);

impl Drop for LingeringClose {
    fn drop(&mut self) {
        let Some(mut stream) = self.0.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 16 * 1024];
            let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

impl AsyncRead for LingeringClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(s) => Pin::new(s).poll_read(cx, buf),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for LingeringClose {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.0.as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

/// The options of the `Connection` headers, trimmed, empty ones left out.
pub(super) fn connection_tokens(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection:
/// upgrade` with an `Upgrade` header).
pub(super) fn upgrade_protocol(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let asked = connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// What is kept of a request to send it again without its body.
type Head = (http::Method, Uri, http::HeaderMap);

fn head_of<B>(req: &Request<B>) -> Head {
    (
        req.method().clone(),
        req.uri().clone(),
        req.headers().clone(),
    )
}

/// A request without a body, from a kept head.
fn bodiless((method, uri, headers): Head, version: Version) -> Request<Body> {
    let mut req = Request::new(empty_body());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    req
}

/// Whether an HTTP/2 backend left the request unprocessed, so that it may
/// go again whatever its method: its stream was above a GOAWAY's last
/// stream (or opened after one) or reset with REFUSED_STREAM (RFC 9113
/// 6.8, 8.7). A stream cut by a closing connection is not: the backend may
/// have acted on it.
pub(super) fn refused(e: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// The reason for a request an HTTP/2 backend failed: refused when it was
/// not processed, so that a retry policy may send it again safely.
fn upstream_error(e: &hyper::Error) -> Reason {
    if refused(e) {
        Reason::UpstreamRefused
    } else {
        Reason::UpstreamReset
    }
}

/// Connection-level headers are the hop's, not the request's (RFC 9110 7.6.1).
pub(super) fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = connection_tokens(headers)
        .map(str::to_ascii_lowercase)
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Makes one host of the request's (RFC 9112 3.2, 3.2.2; RFC 9113
/// 8.3.1), so that routes, redirects and the backend cannot each read a
/// different one: with a target authority (HTTP/1.1 absolute form, HTTP/2
/// `:authority`), a `Host` naming another is replaced (HTTP/1.1) or dropped
/// (HTTP/2). More than one `Host` is refused, as the RFC asks of a server.
pub(super) fn settle_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let Some(authority) = req.uri().authority() else {
        return Ok(());
    };
    if host
        .as_bytes()
        .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Ok(());
    }
    if req.version() == Version::HTTP_2 {
        req.headers_mut().remove(header::HOST);
    } else if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(header::HOST, v);
    }
    Ok(())
}

/// A body of these bytes, whole.
pub(super) fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The body of a message that has none.
pub(super) fn empty_body() -> Body {
    full_body(Bytes::new())
}

/// The agent's answer to a request a `RequestRedirect` rule matched.
fn redirect(req: &Request<Incoming>, entry: &routes::Entry, port: u16) -> Response<Body> {
    let r = entry.rule.redirect.as_ref().expect("a redirect rule");
    let host_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .or_else(|| req.uri().authority().cloned());
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = r
        .hostname
        .clone()
        .or_else(|| host_header.as_ref().map(|a| a.host().to_owned()))
        .unwrap_or_default();
    // The Gateway API's rule: a given port, else the scheme's own when the
    // scheme changes, else the port called; the scheme's default is left
    // out.
    let port = r.port.unwrap_or(match r.scheme {
        Some(_) => 0,
        None => host_header.and_then(|a| a.port_u16()).unwrap_or(port),
    });
    let default = if scheme == "https" { 443 } else { 80 };
    let authority = if port == 0 || port == default {
        host
    } else {
        format!("{host}:{port}")
    };
    let path = match &r.path {
        Some(edit) => edit.apply(&entry.request.path, req.uri().path()),
        None => req.uri().path().to_owned(),
    };
    let location = match req.uri().query() {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    };
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A `URLRewrite`: the path, and the host in `Host` and the authority.
fn rewrite_request(
    parts: &mut http::request::Parts,
    rewrite: &routes::table::Rewrite,
    matched: &PathRule,
) {
    let path = rewrite
        .path
        .as_ref()
        .map(|edit| edit.apply(matched, parts.uri.path()));
    let mut uri = parts.uri.clone().into_parts();
    if let Some(path) = path {
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        uri.path_and_query = pq.parse().ok().or(uri.path_and_query);
    }
    if let Some(host) = &rewrite.hostname {
        if uri.authority.is_some() {
            let port = parts.uri.port_u16();
            let authority = port.map_or_else(|| host.clone(), |p| format!("{host}:{p}"));
            uri.authority = authority.parse().ok().or(uri.authority);
        }
        if let Ok(v) = HeaderValue::from_str(host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    if let Ok(new) = Uri::from_parts(uri) {
        parts.uri = new;
    }
}

/// The rule a request matched, what its match matched of the path, and
/// the backend reference it picked.
struct Picked {
    rule: Arc<Rule>,
    matched: PathRule,
    backend: usize,
}

impl Picked {
    fn backend(&self) -> &routes::table::WeightedBackend {
        &self.rule.backends[self.backend]
    }
}

/// The index of a backend by weight (weights are positive: zero-weight
/// ones were left out when compiled), or `None` for the share of the
/// rule's invalid references (`unresolved`), which the Gateway API answers
/// with 500, and when there is no backend at all.
fn pick_weighted(backends: &[routes::table::WeightedBackend], unresolved: u32) -> Option<usize> {
    let total: u64 =
        backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() + u64::from(unresolved);
    if total == 0 {
        return None;
    }
    let mut n = random_below(total);
    for (i, b) in backends.iter().enumerate() {
        if n < u64::from(b.weight) {
            return Some(i);
        }
        n -= u64::from(b.weight);
    }
    None
}

/// A local pod, as its agent asks providers for it (CUSTOM policies).
struct Asker {
    call: Call,
    /// The pod's SPIFFE ID.
    principal: String,
}

impl Asker {
    /// What the gRPC check says of a caller `source` and the pod at `target`.
    fn peers(
        &self,
        source: (SocketAddr, &Identity),
        target: SocketAddr,
    ) -> ext_auth::grpc::Peers<'_> {
        ext_auth::grpc::Peers {
            source: source.0,
            source_principal: Some(source.1.to_string()),
            destination_service: "",
            destination: Some(target),
            destination_principal: Some(self.principal.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_picks_follow_the_weights() {
        let b = |w| routes::table::WeightedBackend {
            service: format!("ns/s{w}"),
            port: 80,
            weight: w,
            request_headers: Default::default(),
            response_headers: Default::default(),
        };
        let backends = [b(90), b(10)];
        let n = 100_000;
        let heavy = (0..n)
            .filter(|_| pick_weighted(&backends, 0) == Some(0))
            .count();
        // Binomial(100000, 0.9): sd ≈ 95; 6 sd either side.
        assert!((89_430..=90_570).contains(&heavy), "{heavy}");
        // Invalid references keep their share (it gets 500): 30 of 100.
        let invalid = (0..n)
            .filter(|_| pick_weighted(&backends, 30).is_none())
            .count();
        // Binomial(100000, 30/130): sd ≈ 133; 6 sd either side.
        assert!((22_278..=23_876).contains(&invalid), "{invalid}");
        assert!(pick_weighted(&[], 1).is_none());
        assert!(pick_weighted(&[], 0).is_none());
    }

    #[test]
    fn a_request_has_one_host() {
        let req = |version, uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().version(version).uri(uri);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).expect("request")
        };
        let settled = |mut r: Request<()>| {
            settle_host(&mut r).map(|()| {
                r.headers()
                    .get_all(header::HOST)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
            })
        };
        let v11 = Version::HTTP_11;
        let v2 = Version::HTTP_2;
        assert_eq!(settled(req(v11, "/a", &["web"])), Ok(vec!["web".into()]));
        assert_eq!(settled(req(v11, "/a", &[])), Ok(vec![]));
        assert_eq!(
            settled(req(v11, "/a", &["web", "admin"])),
            Err("more than one Host header")
        );
        assert_eq!(
            settled(req(v11, "/a", &["web", "web"])),
            Err("more than one Host header")
        );
        // The absolute form's authority wins over Host (RFC 9112 3.2.2).
        assert_eq!(
            settled(req(v11, "http://web:80/a", &["admin"])),
            Ok(vec!["web:80".into()])
        );
        assert_eq!(
            settled(req(v11, "http://WEB/a", &["web"])),
            Ok(vec!["web".into()])
        );
        // HTTP/2: `:authority` is the host; a Host naming another goes.
        assert_eq!(settled(req(v2, "http://web/a", &["admin"])), Ok(vec![]));
        assert_eq!(
            settled(req(v2, "http://web/a", &["web"])),
            Ok(vec!["web".into()])
        );
        assert_eq!(
            settled(req(v2, "http://web/a", &["web", "web"])),
            Err("more than one Host header")
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-end", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end"));
    }
}
