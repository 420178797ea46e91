//! HTTP to one local pod, served by the agent delivering a connection to
//! it: each request authorized, traced and counted on the destination's
//! side. The HBONE server serves a stream this way when the pod's
//! `AuthorizationPolicy` has HTTP conditions (paths, methods, gRPC methods,
//! headers), or when tracing is on and the calling agent said the stream
//! carries HTTP; the outbound proxy does it for same-node callers that L7
//! rules apply to. Allowed requests go on one upstream connection to the
//! pod; a denied one gets 403 (`PERMISSION_DENIED` for gRPC) with
//! `x-trellis-reason: denied`, and the connection carries on.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{FutureExt as _, future::BoxFuture};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tracing::{Instrument as _, debug};

use super::{
    detect::Protocol,
    ext_auth,
    http::{
        Body, BodyError, Io, MAX_HEADER_BYTES, Reason, connection_tokens, oversized,
        refused_answer, reply, settle_host, strip_hop_by_hop, upgrade_protocol,
    },
    outbound::Authorizer,
    telemetry,
};
use crate::{
    identity::Identity,
    metrics::{
        IstioMetrics,
        istio::{Peer, Reporter, RequestLabels, ServiceName, Traffic},
    },
    policy::authz::{self, Refusal},
    policy::telemetry::Reporting,
    state::Snapshot,
    trace::{Kind, Tracer},
};

/// A request its judge let through: with authentication's edits and the
/// changes of the CUSTOM providers that allowed it, and the headers those
/// put on its answer.
pub struct Admitted {
    req: Request<Body>,
    answer: Vec<ext_auth::Put>,
}

/// Admits one request, or gives the answer that refuses it.
pub type Judge = Arc<
    dyn Fn(Request<Body>) -> BoxFuture<'static, Result<Admitted, Response<Body>>> + Send + Sync,
>;

/// The judge of requests from `source` (at `peer`) to the local pod at
/// `target`, under the policies of the current state: `authorizer` asks
/// the providers of CUSTOM policies; `on_refuse` counts a refusal by the
/// agent's own policies.
pub fn judge(
    state: watch::Receiver<Arc<Snapshot>>,
    (source, peer): (Identity, SocketAddr),
    target: SocketAddr,
    authorizer: Option<Authorizer>,
    on_refuse: impl Fn(&Refusal) + Send + Sync + 'static,
) -> Judge {
    Arc::new(move |mut req: Request<Body>| {
        let snapshot = state.borrow().clone();
        let grpc = authz::is_grpc(req.headers());
        let caller = authz::Caller::new(&source, peer.ip());
        let asks = match authz::admit(&snapshot, caller, target, &mut req) {
            Ok(asks) => asks,
            Err(refusal) => {
                on_refuse(&refusal);
                let (reason, detail) = refused_answer(refusal);
                return std::future::ready(Err(reply(reason, &detail, grpc))).boxed();
            }
        };
        if asks.is_empty() {
            let admitted = Admitted {
                req,
                answer: Vec::new(),
            };
            return std::future::ready(Ok(admitted)).boxed();
        }
        let (authorizer, source) = (authorizer.clone(), source.clone());
        async move {
            let Some(authorizer) = authorizer else {
                return Err(reply(
                    Reason::ExtAuthError,
                    "no client for CUSTOM providers here",
                    grpc,
                ));
            };
            let (req, answer) = authorizer
                .proxy()
                .ask_providers(&snapshot, &asks, req, (peer, &source), target)
                .await?;
            Ok(Admitted { req, answer })
        }
        .boxed()
    })
}

/// The upstream connection's sender, of the client's protocol.
#[derive(Clone)]
enum Upstream {
    Http1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Body>>>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

/// Destination-side telemetry of one caller's requests to one pod.
pub struct Telemetry {
    pub tracer: Option<Arc<Tracer>>,
    pub metrics: Option<Arc<IstioMetrics>>,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub source: Arc<Peer>,
    pub destination: Arc<Peer>,
    /// The caller's address (its pod's when proven, else its node's).
    pub peer: SocketAddr,
    /// The pod's address.
    pub target: SocketAddr,
    pub mtls: bool,
    /// What the pod's Telemetry has reported (the server's side).
    pub reporting: Arc<Reporting>,
    /// Labels by (Service called, gRPC), made once per connection.
    traffic: Mutex<HashMap<(Option<String>, bool), Traffic>>,
}

impl Telemetry {
    pub fn new(
        tracer: Option<Arc<Tracer>>,
        metrics: Option<Arc<IstioMetrics>>,
        state: watch::Receiver<Arc<Snapshot>>,
        (source, destination): (Arc<Peer>, Arc<Peer>),
        (peer, target): (SocketAddr, SocketAddr),
        mtls: bool,
        reporting: Arc<Reporting>,
    ) -> Option<Self> {
        (tracer.is_some() || metrics.is_some()).then(|| Self {
            tracer,
            metrics,
            state,
            source,
            destination,
            peer,
            target,
            mtls,
            reporting,
            traffic: Mutex::default(),
        })
    }

    /// The Istio labels of a request to `host` answered with `resp`.
    fn labels(&self, host: Option<&str>, grpc: bool, resp: &Response<Body>) -> RequestLabels {
        let service = host.and_then(|h| {
            let snapshot = self.state.borrow().clone();
            service_of(&snapshot, h, &self.destination.namespace)
        });
        let traffic = self
            .traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((service, grpc))
            .or_insert_with_key(|(service, grpc)| {
                Traffic::new(
                    Reporter::Destination,
                    self.source.clone(),
                    self.destination.clone(),
                    // Named once per service and protocol: a cache miss.
                    Arc::new(service.as_deref().map_or_else(ServiceName::unknown, |id| {
                        ServiceName::in_snapshot(&self.state.borrow(), id)
                    })),
                    if *grpc { "grpc" } else { "http" },
                    self.mtls,
                )
            })
            .clone();
        RequestLabels {
            traffic,
            response_code: resp.status().as_u16(),
            grpc_status: grpc.then(|| telemetry::grpc_status(resp.headers()).unwrap_or(0)),
            flags: telemetry::flags_of(resp.headers()),
            relabelled: None,
        }
    }
}

/// The service (`namespace/name`) a request's `Host` names: a
/// `ServiceEntry`'s host, a Service's DNS name (`name`, `name.ns`,
/// `name.ns.svc[.cluster.local]`, a bare name meaning the pod's namespace)
/// or its cluster IP.
fn service_of(snapshot: &Snapshot, host: &str, namespace: &str) -> Option<String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, p.parse::<u16>().ok()),
        _ => (host, None),
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = name.parse::<IpAddr>() {
        let (service, _) = snapshot.service_for(SocketAddr::new(ip, port.unwrap_or(80)))?;
        return Some(service.id());
    }
    if let Some(entry) = snapshot.entry_for_host(name) {
        return Some(entry.id());
    }
    let mut labels = name.split('.');
    let service = labels.next()?;
    let ns = labels.next().unwrap_or(namespace);
    let id = format!("{ns}/{service}");
    snapshot.service(&id).map(|_| id)
}

/// Serves `client` (which speaks `protocol`) until it closes, or sits
/// `idle` between HTTP/1.1 requests, forwarding the requests `judge` allows
/// (all, without one) to `upstream`.
pub async fn serve<I>(
    client: I,
    protocol: Protocol,
    upstream: Pin<Box<dyn Io>>,
    judge: Option<Judge>,
    telemetry: Option<Telemetry>,
    idle: Duration,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let upstream = match protocol {
        Protocol::Http2 => {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await?;
            spawn_conn(conn);
            Upstream::Http2(sender)
        }
        _ => {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
            spawn_conn(conn.with_upgrades());
            Upstream::Http1(Arc::new(tokio::sync::Mutex::new(sender)))
        }
    };
    let telemetry = telemetry.map(Arc::new);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (judge, upstream, telemetry) = (judge.clone(), upstream.clone(), telemetry.clone());
        async move {
            crate::access_log::ensure_request_id(req.headers_mut());
            let Some(t) = telemetry else {
                return handle(req, judge.as_ref(), upstream, None).await;
            };
            let start = telemetry::Start::new(
                &mut req,
                t.tracer.as_ref(),
                (Kind::Server, t.target.port(), t.peer),
                t.metrics.is_some(),
                t.reporting.clone(),
            );
            let host = crate::access_log::authority(&req);
            let resp = handle(req, judge.as_ref(), upstream, Some(start.body.clone())).await?;
            let host = host.as_ref().and_then(|h| h.to_str().ok());
            let labels = t.labels(host, start.grpc(), &resp);
            Ok(resp.map(|body| {
                start
                    .record(body, t.metrics.clone(), labels, Some(t.target), None)
                    .boxed()
            }))
        }
    });
    super::http::serve_client(client, protocol, service, idle).await
}

fn spawn_conn<F, E>(conn: F)
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection to the pod ended");
            }
        }
        .in_current_span(),
    );
}

/// Handles one request. `Err` resets an HTTP/2 request's stream with
/// REFUSED_STREAM: the pod did not process it (its connection had gone
/// away, or it refused the stream), and the caller may send it again, on
/// another connection, which gets a new one to the pod.
async fn handle(
    req: Request<Incoming>,
    judge: Option<&Judge>,
    upstream: Upstream,
    count: Option<Arc<telemetry::BodyCount>>,
) -> Result<Response<Body>, h2::Error> {
    let refused = match handle_or_refuse(req, judge, upstream, count).await {
        Ok(resp) => return Ok(resp),
        Err(refused) => refused,
    };
    debug!(error = %refused, "the pod did not process the request: refused to the caller");
    Err(h2::Error::from(h2::Reason::REFUSED_STREAM))
}

async fn handle_or_refuse(
    mut req: Request<Incoming>,
    judge: Option<&Judge>,
    upstream: Upstream,
    count: Option<Arc<telemetry::BodyCount>>,
) -> Result<Response<Body>, hyper::Error> {
    let grpc = authz::is_grpc(req.headers());
    normalize_uri(&mut req);
    if let Some(size) = oversized(&req) {
        return Ok(reply(
            Reason::HeaderTooLarge,
            &format!("{size} bytes of request line and headers, over {MAX_HEADER_BYTES}"),
            grpc,
        ));
    }
    if let Err(why) = settle_host(&mut req) {
        debug!(
            reason = "bad-request",
            detail = why,
            "answered by the agent"
        );
        return Ok(reply(Reason::BadRequest, why, grpc));
    }
    // Counted as the pod is sent it (a check reading its start counts it).
    let req = req.map(|body| match count {
        Some(count) => telemetry::Counted::new(body, count)
            .map_err(BodyError::from)
            .boxed(),
        None => body.map_err(BodyError::from).boxed(),
    });
    let Admitted { mut req, answer } = match judge {
        Some(judge) => match judge(req).await {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(refused),
        },
        None => Admitted {
            req,
            answer: Vec::new(),
        },
    };
    let upgrade = match &upstream {
        Upstream::Http1(_) => upgrade_protocol(req.headers()).and_then(|p| {
            Some((
                p,
                req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()?,
            ))
        }),
        Upstream::Http2(_) => None,
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some((protocol, _)) = &upgrade {
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        parts
            .headers
            .insert(http::header::UPGRADE, protocol.clone());
    }
    let mut req = Request::from_parts(parts, body);
    let sent = match upstream {
        Upstream::Http2(mut sender) => {
            // hyper's HTTP/2 client wants the scheme and authority.
            if req.uri().authority().is_none() {
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                if let Ok(uri) = Uri::builder()
                    .scheme("http")
                    .authority("localhost")
                    .path_and_query(pq)
                    .build()
                {
                    *req.uri_mut() = uri;
                }
            }
            match sender.try_send_request(req).await {
                Ok(resp) => Ok(resp),
                // Never sent (hyper hands it back), or not processed.
                Err(e) if e.message().is_some() || super::http::refused(e.error()) => {
                    return Err(e.into_error());
                }
                Err(e) => Err(e.into_error()),
            }
        }
        Upstream::Http1(sender) => {
            *req.version_mut() = Version::HTTP_11;
            let mut sender = sender.lock().await;
            match sender.ready().await {
                Ok(()) => sender.send_request(req).await.map(|mut resp| {
                    keep_or_close(&mut resp);
                    resp
                }),
                Err(e) => Err(e),
            }
        }
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => return Ok(reply(Reason::UpstreamReset, &e.to_string(), grpc)),
    };
    if let Some((_, client)) = upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let pod = hyper::upgrade::on(&mut resp);
        tokio::spawn(
            async move {
                let (Ok(client), Ok(pod)) = (client.await, pod.await) else {
                    debug!("an upgrade did not complete");
                    return;
                };
                let (mut client, mut pod) = (TokioIo::new(client), TokioIo::new(pod));
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut pod).await {
                    debug!(error = %e, "upgraded connection ended");
                }
            }
            .in_current_span(),
        );
    }
    ext_auth::put(&answer, resp.headers_mut());
    Ok(resp.map(|b| b.map_err(BodyError::from).boxed()))
}

/// An HTTP/1.1 answer for the client, without the pod's hop-by-hop
/// headers; when the pod closes its connection after this response
/// (HTTP/1.0 without keep-alive, `Connection: close`), the client's is
/// closed after it too, as the next request would have no upstream.
fn keep_or_close<B>(resp: &mut Response<B>) {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let tokens = |t: &str| connection_tokens(resp.headers()).any(|c| c.eq_ignore_ascii_case(t));
    let closes = tokens("close") || (resp.version() == Version::HTTP_10 && !tokens("keep-alive"));
    strip_hop_by_hop(resp.headers_mut());
    *resp.version_mut() = Version::HTTP_11;
    if closes {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// Puts the request's path in normal form ([`normalize_path`]).
pub fn normalize_uri<B>(req: &mut Request<B>) {
    let Some(path) = normalize_path(req.uri().path()) else {
        return;
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// A request path in normal form (RFC 3986, 6.2.2, Envoy's and Istio's
/// default): unreserved characters percent-decoded, `.` and `..` segments
/// resolved. Rules and routes see this path and the pod gets it, so that
/// `/public/%2e%2e/admin` can neither slip past a `/public/*` rule nor
/// reach anything but `/admin`. `None` when it is already normal.
pub fn normalize_path(path: &str) -> Option<String> {
    let decoded = decode_unreserved(path);
    let source = decoded.as_deref().unwrap_or(path);
    let resolved = remove_dot_segments(source);
    match (decoded.is_some(), resolved) {
        (_, Some(resolved)) => Some(resolved),
        (true, None) => decoded,
        (false, None) => None,
    }
}

fn decode_unreserved(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out: Option<String> = None;
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten()
            .map(|v| v as u8)
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'));
        match decoded {
            Some(c) => {
                out.get_or_insert_with(|| path[..i].to_owned())
                    .push(c as char);
                i += 3;
            }
            None => {
                let end = i + path[i..].chars().next().map_or(1, char::len_utf8);
                if let Some(o) = out.as_mut() {
                    o.push_str(&path[i..end]);
                }
                i = end;
            }
        }
    }
    out
}

/// RFC 3986, 5.2.4, on an absolute path; `None` when there is no dot
/// segment.
fn remove_dot_segments(path: &str) -> Option<String> {
    if !path.split('/').any(|s| s == "." || s == "..") {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    use super::{keep_or_close, normalize_path};
    use http::{Response, StatusCode, Version};

    #[test]
    fn the_pods_hop_by_hop_headers_stay_on_its_hop() {
        let resp = |version, connection: &str| {
            let mut r = Response::builder()
                .version(version)
                .header("connection", connection)
                .header("keep-alive", "timeout=5")
                .header("x-hop", "1")
                .header("x-end", "2")
                .body(())
                .expect("response");
            keep_or_close(&mut r);
            let mut names: Vec<String> = r
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            names.sort();
            (r.version(), names)
        };
        // Closing: the client's connection closes after this answer too.
        assert_eq!(
            resp(Version::HTTP_11, "close, x-hop"),
            (
                Version::HTTP_11,
                vec!["connection: close".into(), "x-end: 2".into()]
            )
        );
        assert_eq!(
            resp(Version::HTTP_10, "x-hop"),
            (
                Version::HTTP_11,
                vec!["connection: close".into(), "x-end: 2".into()]
            )
        );
        // Keeping the connection: nothing of the pod's hop is left.
        assert_eq!(
            resp(Version::HTTP_10, "keep-alive, x-hop"),
            (Version::HTTP_11, vec!["x-end: 2".into()])
        );
        assert_eq!(
            resp(Version::HTTP_11, "x-hop"),
            (Version::HTTP_11, vec!["x-end: 2".into()])
        );
        // An upgrade's answer keeps its Connection and Upgrade.
        let mut r = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("response");
        keep_or_close(&mut r);
        assert_eq!(r.headers().len(), 2);
    }

    #[test]
    fn paths_are_normalized_before_rules_see_them() {
        let n = |p: &str| normalize_path(p).unwrap_or_else(|| p.to_owned());
        assert_eq!(n("/public/page"), "/public/page");
        assert_eq!(normalize_path("/public/page"), None);
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/public/%2e%2e/admin"), "/admin");
        assert_eq!(n("/public/%2E%2E/%61dmin"), "/admin");
        assert_eq!(n("/a/./b/."), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/"), "/");
        // Reserved characters stay encoded; other bytes pass through.
        assert_eq!(n("/a%2Fb/%20c/ü"), "/a%2Fb/%20c/ü");
        assert_eq!(n("/100%"), "/100%");
        assert_eq!(n("/x%4"), "/x%4");
    }
}
