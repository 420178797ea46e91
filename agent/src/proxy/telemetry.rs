//! What one HTTP request leaves behind, on either side of the call: Istio's
//! request metrics, an access log line and a span, all recorded when its
//! response body ends (or is dropped unfinished), so that durations and
//! byte counts cover the whole exchange.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http::Request;
use hyper::body::{Frame, SizeHint};

use super::http::Body;
use crate::{
    metrics::{
        IstioMetrics,
        grpc::MessageCounter,
        istio::{self, RequestLabels},
    },
    policy::telemetry::Reporting,
    trace::{Ending, RequestSpan},
};

/// A request body's bytes and gRPC messages, counted as they pass.
#[derive(Debug, Default)]
pub struct BodyCount {
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
}

/// A body that counts into a [`BodyCount`].
pub struct Counted<B> {
    inner: B,
    parser: MessageCounter,
    count: Arc<BodyCount>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<BodyCount>) -> Self {
        Self {
            inner,
            parser: MessageCounter::default(),
            count,
        }
    }
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let this = &mut *self;
            let before = this.parser.messages;
            this.parser.feed(data);
            this.count
                .messages
                .fetch_add(this.parser.messages - before, Ordering::Relaxed);
            this.count
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Envoy's response flag for one of the agent's own answers (its
/// `x-trellis-reason`).
pub fn response_flags(reason: &str) -> &'static str {
    match reason {
        "no-route" => "NR",
        "backend-not-found" => "NC",
        "no-healthy-upstream" => "UH",
        "upstream-connect-failed" => "UF",
        "upstream-reset" | "upstream-refused" => "UR",
        "timeout" => "UT",
        "denied" => "RBAC",
        "ext-auth-denied" | "ext-auth-error" => "UAEX",
        "circuit-open" => "UO",
        "rate-limited" => "RL",
        "fault-injected" => "FI",
        "header-too-large" | "bad-request" => "DPE",
        _ => "-",
    }
}

/// The response flags of a response: the agent's reason, if it answered.
pub fn flags_of(headers: &http::HeaderMap) -> &'static str {
    headers
        .get("x-trellis-reason")
        .and_then(|v| v.to_str().ok())
        .map_or("-", response_flags)
}

/// `grpc-status` in response headers (a trailers-only gRPC answer), or in
/// trailers.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// What is kept of a request for its access log line, or for metric labels
/// a Telemetry computes from it.
struct Noted {
    at: SystemTime,
    trace_id: Option<String>,
    line: crate::access_log::RequestLine,
    /// Sampled for the access log (else kept for the labels only).
    log: bool,
}

/// The telemetry a request was chosen for, taken when it comes in.
pub struct Start {
    at: tokio::time::Instant,
    grpc: bool,
    /// What an access log line or a metric label may read of it.
    noted: Option<Noted>,
    span: Option<RequestSpan>,
    /// What the workload's Telemetry has reported.
    reporting: Arc<Reporting>,
    /// The request body's bytes and messages (it gets wrapped in
    /// [`Counted`]).
    pub body: Arc<BodyCount>,
}

impl Start {
    /// Starts `req`'s span (rewriting its trace headers) and decides its
    /// access log line, as `reporting` (the workload's Telemetry) says.
    /// `port` is the port called, `peer` the caller.
    pub fn new<B>(
        req: &mut Request<B>,
        tracer: Option<&Arc<crate::trace::Tracer>>,
        (kind, port, peer): (crate::trace::Kind, u16, SocketAddr),
        logs: bool,
        reporting: Arc<Reporting>,
    ) -> Self {
        let span = tracer.and_then(|t| RequestSpan::begin(t, req, (kind, port, peer), &reporting));
        let log = logs && reporting.access_log && crate::access_log::sampled();
        let noted = (log || !reporting.relabels.is_empty()).then(|| Noted {
            at: SystemTime::now(),
            trace_id: span.as_ref().map_or_else(
                || crate::access_log::trace_id(req.headers()),
                |s| Some(s.trace_id()),
            ),
            line: crate::access_log::RequestLine::of(req, &reporting.headers),
            log,
        });
        Self {
            at: tokio::time::Instant::now(),
            grpc: crate::policy::authz::is_grpc(req.headers()),
            noted,
            span,
            reporting,
            body: Arc::default(),
        }
    }

    pub fn grpc(&self) -> bool {
        self.grpc
    }

    /// The response body, recording everything when it ends. `upstream`
    /// and `route` are what the request went to.
    pub fn record(
        self,
        body: Body,
        metrics: Option<Arc<IstioMetrics>>,
        labels: RequestLabels,
        upstream: Option<SocketAddr>,
        route: Option<String>,
    ) -> Recorded {
        Recorded {
            inner: body,
            metrics,
            labels: Some(labels),
            response_bytes: 0,
            response_messages: self.grpc.then(MessageCounter::default),
            upstream,
            route,
            start: self,
        }
    }
}

/// A response body that records its request's telemetry when it ends.
pub struct Recorded {
    inner: Body,
    metrics: Option<Arc<IstioMetrics>>,
    labels: Option<RequestLabels>,
    response_bytes: u64,
    response_messages: Option<MessageCounter>,
    upstream: Option<SocketAddr>,
    route: Option<String>,
    start: Start,
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = super::http::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let this = &mut *self;
                this.response_bytes += data.len() as u64;
                if let Some(counter) = this.response_messages.as_mut() {
                    counter.feed(data);
                }
            } else if let (Some(trailers), Some(labels)) =
                (frame.trailers_ref(), self.labels.as_mut())
                && labels.grpc_status.is_some()
                && let Some(status) = grpc_status(trailers)
            {
                labels.grpc_status = Some(status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let Some(labels) = self.labels.take() else {
            return;
        };
        let duration = self.start.at.elapsed();
        let request_bytes = self.start.body.bytes.load(Ordering::Relaxed);
        let noted = self.start.noted.take();
        let entry = noted.as_ref().map(|n| crate::access_log::Entry {
            traffic: &labels.traffic,
            start: n.at,
            duration,
            upstream: self.upstream,
            route: self.route.as_deref(),
            bytes_in: request_bytes,
            bytes_out: self.response_bytes,
            response_code: Some(labels.response_code),
            grpc_status: labels.grpc_status,
            flags: labels.flags,
            trace_id: n.trace_id.as_deref(),
            request: Some(&n.line),
        });
        if let Some(entry) = &entry
            && noted.as_ref().is_some_and(|n| n.log)
            && self.start.reporting.logs(entry)
        {
            crate::access_log::write(entry);
        }
        if let Some(span) = self.start.span.take() {
            span.end(&Ending {
                traffic: &labels.traffic,
                status: labels.response_code,
                grpc_status: labels.grpc_status,
                flags: labels.flags,
                upstream: self.upstream,
                route: self.route.as_deref(),
                request_bytes,
                response_bytes: self.response_bytes,
            });
        }
        if let Some(metrics) = &self.metrics {
            metrics.request(
                &istio::Request {
                    messages: self.response_messages.as_ref().map(|received| {
                        (
                            self.start.body.messages.load(Ordering::Relaxed),
                            received.messages,
                        )
                    }),
                    labels: &labels,
                    duration_ms: duration.as_secs_f64() * 1000.0,
                    request_bytes,
                    response_bytes: self.response_bytes,
                },
                &self.start.reporting,
                entry.as_ref(),
            );
        }
    }
}
