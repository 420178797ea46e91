//! Distributed tracing. Every request on the L7 path gets a span: CLIENT on
//! the caller's node, SERVER on the callee's (for requests that reach it
//! inside HBONE), joined to the trace the request's headers carry (W3C
//! Trace Context or B3, [`context`]) and passed on as the new parent.
//! Sampling follows the caller's decision when its headers carry one, else
//! `--trace-sampling`; a request not sampled still carries a context saying
//! so, so the callee's agent decides the same. Finished spans go to a
//! bounded queue that a background task exports over OTLP ([`otlp`]); a
//! full queue drops spans (counted) rather than slow a request.

pub mod context;
pub mod otlp;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use http::{HeaderMap, Method, Version};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    metrics::istio::{Peer, Traffic},
    policy::telemetry::Reporting,
};
use context::{SpanId, TraceId};

/// Finished spans waiting for export at most; more are dropped.
const QUEUE: usize = 8192;

/// A span's side of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The agent serving a callee (the destination side).
    Server,
    /// The agent calling out for a caller (the source side).
    Client,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// What a span's spans describe: the workload the agent acts for.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    key: String,
    pub attributes: Vec<(&'static str, String)>,
}

impl Resource {
    /// The first attribute (`service.name`) names the resource.
    pub fn new(attributes: Vec<(&'static str, String)>) -> Self {
        let key = attributes
            .first()
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Self { key, attributes }
    }

    /// A workload, named as Istio names it in traces
    /// (`<canonical service>.<namespace>`).
    fn of(peer: &Peer, node: &str) -> Self {
        Self::new(vec![
            (
                "service.name",
                format!("{}.{}", peer.canonical_service, peer.namespace),
            ),
            ("service.namespace", peer.namespace.clone()),
            ("service.version", peer.canonical_revision.clone()),
            ("k8s.namespace.name", peer.namespace.clone()),
            ("k8s.node.name", node.into()),
            ("telemetry.sdk.name", "trellis".into()),
        ])
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A span ready for export.
#[derive(Clone, Debug)]
pub struct Finished {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub trace_state: Option<String>,
    pub name: String,
    pub kind: Kind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// A Telemetry's custom tags: more attributes, named by the user.
    pub tags: Vec<(String, String)>,
    /// Set when the span failed: its status message.
    pub error: Option<String>,
    pub resource: Arc<Resource>,
}

/// Counters of the tracer (exported as `trellis_tracing_*`).
#[derive(Debug, Default, Serialize)]
pub struct TraceStats {
    /// Spans started (sampled requests).
    pub spans: AtomicU64,
    /// Requests passed on without a span (not sampled).
    pub unsampled: AtomicU64,
    /// Sampled requests passed on without a span: their workload's
    /// Telemetry says `disableSpanReporting`.
    pub unreported: AtomicU64,
    pub exported: AtomicU64,
    pub batches: AtomicU64,
    /// Spans dropped because the export queue was full.
    pub dropped: AtomicU64,
    /// Spans lost because the collector did not take them.
    pub failed: AtomicU64,
}

/// Starts spans and hands finished ones to the exporter.
pub struct Tracer {
    /// Share of new traces sampled, in parts per million.
    sampling_ppm: u32,
    node: String,
    queue: mpsc::Sender<Finished>,
    pub stats: Arc<TraceStats>,
}

impl Tracer {
    /// A tracer exporting to `endpoint` (its task spawned on the current
    /// runtime), sampling `sampling` (0 to 1) of new traces.
    pub fn start(endpoint: otlp::Endpoint, sampling: f64, node: &str) -> Arc<Self> {
        let (queue, finished) = mpsc::channel(QUEUE);
        let stats = Arc::new(TraceStats::default());
        tokio::spawn(otlp::export(endpoint, finished, stats.clone()));
        Arc::new(Self::new(queue, sampling, node, stats))
    }

    fn new(
        queue: mpsc::Sender<Finished>,
        sampling: f64,
        node: &str,
        stats: Arc<TraceStats>,
    ) -> Self {
        Self {
            sampling_ppm: (sampling.clamp(0.0, 1.0) * 1_000_000.0).round() as u32,
            node: node.into(),
            queue,
            stats,
        }
    }

    /// Joins the request's trace (or starts one) and rewrites its headers
    /// with the new span as parent; `None` when not sampled, or when the
    /// workload's Telemetry has its spans not reported (the decision is
    /// passed on all the same). A new trace is sampled with the
    /// Telemetry's share when it sets one, else the tracer's own.
    pub fn begin(
        &self,
        headers: &mut HeaderMap,
        kind: Kind,
        reporting: &Reporting,
    ) -> Option<ActiveSpan> {
        let incoming = context::extract(headers);
        let sampled = incoming
            .as_ref()
            .and_then(|c| c.sampled)
            .unwrap_or_else(|| {
                crate::resilience::balance::chance(
                    reporting.sampling_ppm.unwrap_or(self.sampling_ppm),
                )
            });
        let trace_id = incoming
            .as_ref()
            .map_or_else(random_id::<16>, |c| c.trace_id);
        let span_id = random_id::<8>();
        context::inject(headers, incoming.as_ref(), &trace_id, &span_id, sampled);
        if !sampled {
            self.stats.unsampled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !reporting.report_spans {
            self.stats.unreported.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.stats.spans.fetch_add(1, Ordering::Relaxed);
        let (parent, trace_state) = incoming.map_or((None, None), |c| (c.parent, c.trace_state));
        Some(ActiveSpan {
            trace_id,
            span_id,
            parent,
            trace_state,
            kind,
            start: SystemTime::now(),
        })
    }

    fn submit(&self, span: Finished) {
        if self.queue.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A sampled request's span, open.
#[derive(Debug)]
pub struct ActiveSpan {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    trace_state: Option<String>,
    kind: Kind,
    start: SystemTime,
}

impl ActiveSpan {
    pub fn trace_id(&self) -> String {
        context::hex(&self.trace_id)
    }
}

/// A request's span with what its attributes need from the request: made
/// when the request comes, finished when its response ends.
pub struct RequestSpan {
    tracer: Arc<Tracer>,
    span: ActiveSpan,
    method: Method,
    path: String,
    host: Option<String>,
    version: Version,
    /// The port called (a Service port, or the pod's).
    port: u16,
    /// The caller's address.
    peer: SocketAddr,
    /// A Telemetry's custom tags, with their values.
    tags: Vec<(String, String)>,
}

/// How a request ended, for its span.
pub struct Ending<'a> {
    pub traffic: &'a Traffic,
    pub status: u16,
    pub grpc_status: Option<u8>,
    pub flags: &'a str,
    pub upstream: Option<SocketAddr>,
    pub route: Option<&'a str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl RequestSpan {
    /// Begins the span of `req` (rewriting its trace headers) as the
    /// workload's Telemetry says; `None` when not sampled, or not reported.
    pub fn begin<B>(
        tracer: &Arc<Tracer>,
        req: &mut http::Request<B>,
        (kind, port, peer): (Kind, u16, SocketAddr),
        reporting: &Reporting,
    ) -> Option<Self> {
        let span = tracer.begin(req.headers_mut(), kind, reporting)?;
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        Some(Self {
            tracer: tracer.clone(),
            span,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            host,
            version: req.version(),
            port,
            peer,
            tags: reporting.tag_values(req.headers()),
        })
    }

    pub fn trace_id(&self) -> String {
        self.span.trace_id()
    }

    /// Ends the span and queues it for export.
    pub fn end(self, e: &Ending<'_>) {
        let end = SystemTime::now();
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        };
        let (us, them) = match self.span.kind {
            Kind::Client => (e.traffic.source(), e.traffic.destination()),
            Kind::Server => (e.traffic.destination(), e.traffic.source()),
        };
        let service = e.traffic.service();
        // Istio's operation name: the Service called, else the workload.
        let name = if service.name == "unknown" {
            let dst = e.traffic.destination();
            format!(
                "{}.{}:{}/*",
                dst.canonical_service, dst.namespace, self.port
            )
        } else {
            format!("{}:{}/*", service.host, self.port)
        };
        let s = |v: &str| Value::Str(v.to_owned());
        let mut attributes = vec![
            ("http.request.method", s(self.method.as_str())),
            ("url.path", Value::Str(self.path)),
            ("http.response.status_code", Value::Int(e.status.into())),
            (
                "network.protocol.version",
                s(match self.version {
                    Version::HTTP_2 => "2",
                    Version::HTTP_10 => "1.0",
                    _ => "1.1",
                }),
            ),
            ("component", s("proxy")),
            ("node_id", s(&self.tracer.node)),
            ("istio.canonical_service", s(&us.canonical_service)),
            ("istio.namespace", s(&us.namespace)),
            ("trellis.reporter", s(e.traffic.reporter_name())),
            ("trellis.peer.workload", s(&them.workload)),
            ("trellis.peer.principal", s(&them.principal)),
            ("peer.address", Value::Str(self.peer.ip().to_string())),
            ("response_flags", s(e.flags)),
            ("http.request.body.size", Value::Int(e.request_bytes as i64)),
            (
                "http.response.body.size",
                Value::Int(e.response_bytes as i64),
            ),
            ("trellis.mtls", Value::Bool(e.traffic.mtls())),
        ];
        if let Some(host) = self.host {
            attributes.push(("server.address", Value::Str(host)));
        }
        if service.name != "unknown" {
            attributes.push(("trellis.destination_service", s(&service.host)));
        }
        if let Some(upstream) = e.upstream {
            attributes.push(("upstream.address", Value::Str(upstream.to_string())));
        }
        if let Some(route) = e.route {
            attributes.push(("trellis.route", s(route)));
        }
        if let Some(grpc) = e.grpc_status {
            attributes.push(("rpc.grpc.status_code", Value::Int(grpc.into())));
        }
        // OpenTelemetry's HTTP conventions: a server's span fails on 5xx
        // only, a client's on 4xx too; a gRPC call on a non-OK status.
        let error = if e.grpc_status.is_some_and(|g| g != 0) {
            Some(format!("grpc-status {}", e.grpc_status.unwrap_or(0)))
        } else if e.status >= 500 || (e.status >= 400 && self.span.kind == Kind::Client) {
            Some(format!("HTTP {}", e.status))
        } else {
            None
        };
        let tracer = self.tracer;
        tracer.submit(Finished {
            trace_id: self.span.trace_id,
            span_id: self.span.span_id,
            parent: self.span.parent,
            trace_state: self.span.trace_state,
            name,
            kind: self.span.kind,
            start_unix_nanos: nanos(self.span.start),
            end_unix_nanos: nanos(end),
            attributes,
            tags: self.tags,
            error,
            resource: Arc::new(Resource::of(us, &tracer.node)),
        });
    }
}

/// A random non-zero id.
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0; N];
    loop {
        for chunk in id.chunks_mut(8) {
            let r = crate::resilience::balance::random_below(u64::MAX).to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        if id.iter().any(|b| *b != 0) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(sampling: f64) -> (Tracer, mpsc::Receiver<Finished>) {
        let (tx, rx) = mpsc::channel(4);
        (Tracer::new(tx, sampling, "node-a", Arc::default()), rx)
    }

    #[test]
    fn the_callers_decision_wins_over_the_ratio() {
        let (never, _rx) = tracer(0.0);
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let span = never
            .begin(&mut h, Kind::Client, &Reporting::default())
            .expect("sampled by the caller");
        assert_eq!(span.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        let sent = h["traceparent"].to_str().unwrap();
        assert!(
            sent.ends_with("-01") && !sent.contains("00f067aa0ba902b7"),
            "{sent}"
        );

        let (always, _rx) = tracer(1.0);
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .unwrap(),
        );
        assert!(
            always
                .begin(&mut h, Kind::Client, &Reporting::default())
                .is_none()
        );
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        assert_eq!(always.stats.unsampled.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_new_trace_passes_its_decision_on() {
        let (never, _rx) = tracer(0.0);
        let mut h = HeaderMap::new();
        assert!(
            never
                .begin(&mut h, Kind::Client, &Reporting::default())
                .is_none()
        );
        let sent = context::extract(&h).expect("a context is passed on");
        assert_eq!(sent.sampled, Some(false));

        let (always, _rx) = tracer(1.0);
        let mut h = HeaderMap::new();
        let span = always
            .begin(&mut h, Kind::Client, &Reporting::default())
            .expect("sampled");
        let sent = context::extract(&h).unwrap();
        assert_eq!(context::hex(&sent.trace_id), span.trace_id());
        assert_eq!(sent.parent, Some(span.span_id));
        assert_eq!(span.parent, None);
    }

    #[test]
    fn a_telemetrys_share_and_span_reporting_apply() {
        let (never, _rx) = tracer(0.0);
        let all = Reporting {
            sampling_ppm: Some(1_000_000),
            ..Reporting::default()
        };
        let mut h = HeaderMap::new();
        assert!(never.begin(&mut h, Kind::Server, &all).is_some(), "100%");
        let (always, _rx) = tracer(1.0);
        let none = Reporting {
            sampling_ppm: Some(0),
            ..Reporting::default()
        };
        let mut h = HeaderMap::new();
        assert!(always.begin(&mut h, Kind::Server, &none).is_none(), "0%");
        // Not reported: no span, but the sampled decision goes on.
        let quiet = Reporting {
            report_spans: false,
            ..Reporting::default()
        };
        let mut h = HeaderMap::new();
        assert!(always.begin(&mut h, Kind::Server, &quiet).is_none());
        assert_eq!(context::extract(&h).unwrap().sampled, Some(true));
        assert_eq!(always.stats.unreported.load(Ordering::Relaxed), 1);
        assert_eq!(always.stats.spans.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (t, _rx) = tracer(1.0);
        let span = |i: u8| Finished {
            trace_id: [i; 16],
            span_id: [i; 8],
            parent: None,
            trace_state: None,
            name: "x".into(),
            kind: Kind::Server,
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            attributes: Vec::new(),
            tags: Vec::new(),
            error: None,
            resource: Arc::new(Resource::new(Vec::new())),
        };
        for i in 0..6 {
            t.submit(span(i));
        }
        assert_eq!(t.stats.dropped.load(Ordering::Relaxed), 2);
    }
}
