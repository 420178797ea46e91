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

use super::detect::Protocol;
use crate::{
    hbone::client::Pool,
    identity::Identity,
    policy::authz::{self, Verdict},
    routes::{self, RequestView, Rule},
    state::Snapshot,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Upstream HTTP/1.1 connections kept idle per backend.
const IDLE_PER_BACKEND: usize = 64;

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
    pub timeout: AtomicU64,
    pub denied: AtomicU64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct UpstreamKey {
    backend: SocketAddr,
    /// The tunnel's source identity; `None` for plain connections.
    src: Option<Identity>,
}

/// Why a request could not be forwarded: the reason the client reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    NoRoute,
    BackendNotFound,
    NoHealthyUpstream,
    UpstreamConnectFailed,
    UpstreamReset,
    Timeout,
    Denied,
}

impl Reason {
    fn text(self) -> &'static str {
        match self {
            Self::NoRoute => "no-route",
            Self::BackendNotFound => "backend-not-found",
            Self::NoHealthyUpstream => "no-healthy-upstream",
            Self::UpstreamConnectFailed => "upstream-connect-failed",
            Self::UpstreamReset => "upstream-reset",
            Self::Timeout => "timeout",
            Self::Denied => "denied",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BackendNotFound => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NoHealthyUpstream | Self::UpstreamConnectFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamReset => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Denied => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status a gRPC client gets instead.
    fn grpc_status(self) -> u8 {
        match self {
            Self::NoRoute => 12,         // UNIMPLEMENTED
            Self::BackendNotFound => 13, // INTERNAL
            Self::Timeout => 4,          // DEADLINE_EXCEEDED
            Self::Denied => 7,           // PERMISSION_DENIED
            _ => 14,                     // UNAVAILABLE
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The L7 proxy's shared state.
pub struct HttpProxy {
    node: String,
    trust_domain: String,
    state: watch::Receiver<Arc<Snapshot>>,
    hbone: Option<Arc<Pool>>,
    connect_timeout: Duration,
    h1: Mutex<HashMap<UpstreamKey, Vec<hyper::client::conn::http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<UpstreamKey, hyper::client::conn::http2::SendRequest<Body>>>,
    next: Mutex<HashMap<(String, u16), usize>>,
    pub stats: HttpStats,
}

impl HttpProxy {
    pub fn new(
        node: &str,
        trust_domain: &str,
        state: watch::Receiver<Arc<Snapshot>>,
        hbone: Option<Arc<Pool>>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            node: node.into(),
            trust_domain: trust_domain.into(),
            state,
            hbone,
            connect_timeout,
            h1: Mutex::default(),
            h2: Mutex::default(),
            next: Mutex::default(),
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
        let io = TokioIo::new(stream);
        let this = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let call = call.clone();
            async move { Ok::<_, Infallible>(this.handle(req, &call).await) }
        });
        match protocol {
            Protocol::Http2 => {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await
            }
            _ => {
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(io, service)
                    .await
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>, call: &Call) -> Response<Body> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let grpc = is_grpc(&req);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let answer = |reason: Reason, detail: String| {
            self.count(reason);
            debug!(%method, path, reason = reason.text(), detail, "answered by the agent");
            reply(reason, &detail, grpc)
        };
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
        let (rule, service, port): (Option<Arc<Rule>>, String, u16) = match entries {
            None => (None, call.service.clone(), call.port),
            Some(entries) => match routes::route(entries, &view) {
                None => {
                    return answer(
                        Reason::NoRoute,
                        format!("no route of {} matches", call.service),
                    );
                }
                Some(e) if e.rule.backends.is_empty() => {
                    return answer(
                        Reason::BackendNotFound,
                        format!(
                            "rule {} of {} has no valid backend",
                            e.rule.index, e.rule.route
                        ),
                    );
                }
                Some(e) => {
                    let b = pick_weighted(&e.rule.backends);
                    (Some(e.rule.clone()), b.service.clone(), b.port)
                }
            },
        };
        let Some(backend) = self.pick_endpoint(&snapshot, &service, port) else {
            return answer(
                Reason::NoHealthyUpstream,
                format!("{service}:{port} has no ready endpoint"),
            );
        };
        if let Err(policy) = self.authorize(&snapshot, call, backend) {
            return answer(Reason::Denied, format!("denied by {policy}"));
        }

        let mut req = req.map(|b| b.boxed());
        if let Some(rule) = &rule {
            rule.request_headers.apply(req.headers_mut());
        }
        let timeout = rule
            .as_ref()
            .and_then(|r| match (r.request_timeout, r.backend_timeout) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            });
        let forwarded = self.forward(req, call, backend);
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, forwarded).await {
                Ok(r) => r,
                Err(_) => {
                    return answer(Reason::Timeout, format!("no response within {t:?}"));
                }
            },
            None => forwarded.await,
        };
        match result {
            Ok(mut resp) => {
                if let Some(rule) = &rule {
                    rule.response_headers.apply(resp.headers_mut());
                }
                resp
            }
            Err((reason, detail)) => answer(reason, format!("{backend}: {detail}")),
        }
    }

    fn count(&self, reason: Reason) {
        let counter = match reason {
            Reason::NoRoute => &self.stats.no_route,
            Reason::BackendNotFound => &self.stats.backend_not_found,
            Reason::NoHealthyUpstream => &self.stats.no_healthy_upstream,
            Reason::UpstreamConnectFailed => &self.stats.upstream_connect_failed,
            Reason::UpstreamReset => &self.stats.upstream_reset,
            Reason::Timeout => &self.stats.timeout,
            Reason::Denied => &self.stats.denied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A ready endpoint of the Service port, round robin.
    fn pick_endpoint(&self, snapshot: &Snapshot, service: &str, port: u16) -> Option<SocketAddr> {
        let svc = snapshot.service(service)?;
        let usable: Vec<SocketAddr> = svc
            .backends
            .get(&port)?
            .iter()
            .filter(|b| b.usable())
            .map(|b| b.addr)
            .collect();
        if usable.is_empty() {
            return None;
        }
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let slot = next.entry((service.to_owned(), port)).or_insert(0);
        let pick = usable[*slot % usable.len()];
        *slot = slot.wrapping_add(1);
        Some(pick)
    }

    /// Same-node delivery: the destination's authorization policies apply
    /// here (across nodes the destination's agent decides).
    fn authorize(
        &self,
        snapshot: &Snapshot,
        call: &Call,
        backend: SocketAddr,
    ) -> Result<(), String> {
        let local = snapshot
            .workload_by_ip(backend.ip())
            .is_some_and(|w| w.node == self.node);
        match (&call.client_identity, local) {
            (Some(src), true) => match authz::authorize(snapshot, src, backend) {
                Verdict::Allow => Ok(()),
                Verdict::Deny { policy, .. } => Err(policy),
            },
            _ => Ok(()),
        }
    }

    /// The tunnel identities to `backend` when it is a meshed pod on another
    /// node.
    fn tunnel(&self, snapshot: &Snapshot, call: &Call, backend: SocketAddr) -> Option<Identity> {
        self.hbone.as_ref()?;
        let dst = snapshot
            .workload_by_ip(backend.ip())
            .filter(|w| w.meshed && w.node != self.node)?;
        call.client_identity.as_ref()?;
        Some(Identity::of(dst, &self.trust_domain))
    }

    async fn forward(
        &self,
        mut req: Request<Body>,
        call: &Call,
        backend: SocketAddr,
    ) -> Result<Response<Body>, (Reason, String)> {
        let snapshot = self.state.borrow().clone();
        let dst = self.tunnel(&snapshot, call, backend);
        let key = UpstreamKey {
            backend,
            src: dst.as_ref().and(call.client_identity.clone()),
        };
        let h2 = req.version() == Version::HTTP_2;
        strip_hop_by_hop(req.headers_mut());
        if h2 {
            // hyper's HTTP/2 client wants the scheme and authority.
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| backend.to_string());
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
            let mut sender = self.h2_sender(&key, dst, call).await?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| (Reason::UpstreamReset, e.to_string()))?;
            Ok(resp.map(|b| b.boxed()))
        } else {
            if req.headers().get(header::HOST).is_none()
                && let Some(a) = req.uri().authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            *req.version_mut() = Version::HTTP_11;
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Ok(uri) = pq.parse() {
                *req.uri_mut() = uri;
            }
            let mut sender = self.h1_sender(&key, dst, call).await?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| (Reason::UpstreamReset, e.to_string()))?;
            // Back to the pool: it takes the next request once this
            // response's body has been read.
            let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
            let list = idle.entry(key).or_default();
            if list.len() < IDLE_PER_BACKEND {
                list.push(sender);
            }
            Ok(resp.map(|b| b.boxed()))
        }
    }

    async fn h1_sender(
        &self,
        key: &UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
    ) -> Result<hyper::client::conn::http1::SendRequest<Body>, (Reason, String)> {
        {
            let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = idle.get_mut(key) {
                list.retain(|s| !s.is_closed());
                if let Some(i) = list.iter().position(|s| s.is_ready()) {
                    return Ok(list.swap_remove(i));
                }
            }
        }
        let (io, guard) = self.connect(key.backend, dst, call).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
        tokio::spawn(
            async move {
                let _guard = guard;
                if let Err(e) = conn.await {
                    debug!(error = %e, "upstream HTTP/1.1 connection ended");
                }
            }
            .in_current_span(),
        );
        Ok(sender)
    }

    async fn h2_sender(
        &self,
        key: &UpstreamKey,
        dst: Option<Identity>,
        call: &Call,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, (Reason, String)> {
        if let Some(s) = self
            .h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .filter(|s| !s.is_closed())
        {
            return Ok(s.clone());
        }
        let (io, guard) = self.connect(key.backend, dst, call).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| (Reason::UpstreamConnectFailed, e.to_string()))?;
        tokio::spawn(
            async move {
                let _guard = guard;
                if let Err(e) = conn.await {
                    debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            }
            .in_current_span(),
        );
        self.h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), sender.clone());
        Ok(sender)
    }

    /// An upstream connection: an HBONE stream to a meshed pod on another
    /// node, else TCP from the node's address.
    async fn connect(
        &self,
        backend: SocketAddr,
        dst: Option<Identity>,
        call: &Call,
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
                .open(src, &dst, backend, source, call.client)
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
        Ok((Box::pin(stream), None))
    }
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The agent's own answer.
fn reply(reason: Reason, detail: &str, grpc: bool) -> Response<Body> {
    let mut resp = if grpc {
        // gRPC errors are a 200 with the status in trailers-only form.
        let mut r = Response::new(Full::new(Bytes::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(reason.grpc_status())),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("{}: {detail}", reason.text())) {
            h.insert("grpc-message", v);
        }
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
    resp.map(|b| b.map_err(|never| match never {}).boxed())
}

/// Connection-level headers are the hop's, not the request's (RFC 9110 7.6.1).
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
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

/// A backend by weight (weights are positive: zero-weight ones were left
/// out when compiled).
fn pick_weighted(backends: &[routes::table::WeightedBackend]) -> &routes::table::WeightedBackend {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    let mut n = random_below(total.max(1));
    for b in backends {
        if n < u64::from(b.weight) {
            return b;
        }
        n -= u64::from(b.weight);
    }
    &backends[0]
}

/// A uniform number below `n`, from a per-thread xorshift seeded by the OS.
fn random_below(n: u64) -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            u64::from_ne_bytes(seed) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        // Multiply-shift: unbiased enough for weights (n ≤ 2^32 · rules).
        ((u128::from(x) * u128::from(n)) >> 64) as u64
    })
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
        };
        let backends = [b(90), b(10)];
        let n = 100_000;
        let heavy = (0..n)
            .filter(|_| pick_weighted(&backends).weight == 90)
            .count();
        // Binomial(100000, 0.9): sd ≈ 95; 6 sd either side.
        assert!((89_430..=90_570).contains(&heavy), "{heavy}");
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
