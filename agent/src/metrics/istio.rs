//! Istio's standard metrics, with its names and labels, so that existing
//! Grafana and Kiali dashboards read the mesh unchanged: requests (count,
//! duration, sizes) from the L7 path, connections and bytes from the L4
//! paths. Label values follow Istio's documentation; per-IP or per-path
//! labels never appear, so cardinality is bounded by workloads × services.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{
    identity::Identity,
    policy::telemetry::{MetricName, MetricSet, Reporting},
    state::Workload,
};

/// Who reports: the agent on the client's side or on the server's.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// One side of the traffic as Istio's `source_*` / `destination_*` labels
/// name it; `unknown` where nothing is known.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

const UNKNOWN: &str = "unknown";

impl Peer {
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        }
    }

    /// A pod: its workload is its Deployment's name when the pod's name
    /// shows one (`<deployment>-<pod-template-hash>-<suffix>`), else its own.
    pub fn of(w: &Workload, trust_domain: &str) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| w.labels.get(*k)).cloned();
        let workload = w
            .labels
            .get("pod-template-hash")
            .and_then(|hash| {
                let (base, _) = w.name.rsplit_once('-')?;
                base.strip_suffix(hash.as_str())?
                    .strip_suffix('-')
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| w.name.clone());
        let app = label(&["app.kubernetes.io/name", "app"]);
        let version = label(&["app.kubernetes.io/version", "version"]);
        Self {
            principal: Identity::of(w, trust_domain).to_string(),
            canonical_service: label(&["service.istio.io/canonical-name"])
                .or_else(|| app.clone())
                .unwrap_or_else(|| workload.clone()),
            canonical_revision: label(&["service.istio.io/canonical-revision"])
                .or_else(|| version.clone())
                .unwrap_or_else(|| "latest".into()),
            app: app.unwrap_or_else(|| UNKNOWN.into()),
            version: version.unwrap_or_else(|| UNKNOWN.into()),
            namespace: w.namespace.clone(),
            workload,
        }
    }

    /// The workload holding `ip` in `snapshot`, or `unknown`.
    pub fn at(
        snapshot: &crate::state::Snapshot,
        ip: std::net::IpAddr,
        trust_domain: &str,
    ) -> Arc<Self> {
        Arc::new(
            snapshot
                .workload_by_ip(ip.to_canonical())
                .map_or_else(Self::unknown, |w| Self::of(w, trust_domain)),
        )
    }

    /// A peer known only by its certificate.
    pub fn of_identity(id: &Identity) -> Self {
        Self {
            namespace: id.namespace.clone(),
            principal: id.to_string(),
            ..Self::unknown()
        }
    }
}

/// The Service called, as `destination_service*` names it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ServiceName {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    /// From `namespace/name`.
    pub fn of(id: &str) -> Self {
        match id.split_once('/') {
            Some((namespace, name)) => Self {
                host: format!("{name}.{namespace}.svc.cluster.local"),
                name: name.into(),
                namespace: namespace.into(),
            },
            None => Self::unknown(),
        }
    }

    pub fn unknown() -> Self {
        Self {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }
}

/// What every metric of one connection or request shares. Its hash is
/// taken once, when made: the metric families hash their label sets on
/// every update, and twenty strings per request would cost more than the
/// counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Traffic {
    reporter: Reporter,
    source: Arc<Peer>,
    destination: Arc<Peer>,
    service: Arc<ServiceName>,
    /// `http`, `grpc` or `tcp`.
    protocol: &'static str,
    /// Over HBONE mTLS or not.
    mtls: bool,
    hash: u64,
}

impl std::hash::Hash for Traffic {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Traffic {
    pub fn new(
        reporter: Reporter,
        source: Arc<Peer>,
        destination: Arc<Peer>,
        service: Arc<ServiceName>,
        protocol: &'static str,
        mtls: bool,
    ) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (reporter, &*source, &*destination, &*service, protocol, mtls).hash(&mut h);
        Self {
            reporter,
            source,
            destination,
            service,
            protocol,
            mtls,
            hash: h.finish(),
        }
    }

    pub fn source(&self) -> &Peer {
        &self.source
    }

    pub fn destination(&self) -> &Peer {
        &self.destination
    }

    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    pub fn mtls(&self) -> bool {
        self.mtls
    }

    pub fn reporter_name(&self) -> &'static str {
        match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    fn pairs(&self) -> [(&'static str, &str); 20] {
        let (s, d, svc) = (&self.source, &self.destination, &self.service);
        [
            ("reporter", self.reporter_name()),
            ("source_workload", &s.workload),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &s.principal),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("destination_workload", &d.workload),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &d.principal),
            ("destination_app", &d.app),
            ("destination_version", &d.version),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_service", &svc.host),
            ("destination_service_name", &svc.name),
            ("destination_service_namespace", &svc.namespace),
            ("request_protocol", self.protocol),
            (
                "connection_security_policy",
                if self.mtls { "mutual_tls" } else { "none" },
            ),
        ]
    }
}

/// A request's labels: the traffic's, and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub traffic: Traffic,
    pub response_code: u16,
    /// gRPC calls only.
    pub grpc_status: Option<u8>,
    /// Envoy's response flags (`-` when none).
    pub flags: &'static str,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let code = self.response_code.to_string();
        let grpc = self.grpc_status.map(|s| s.to_string()).unwrap_or_default();
        let mut pairs: Vec<(&str, &str)> = self.traffic.pairs().to_vec();
        pairs.extend([
            ("response_code", code.as_str()),
            ("grpc_response_status", grpc.as_str()),
            ("response_flags", self.flags),
        ]);
        pairs.as_slice().encode(encoder)
    }
}

/// A TCP connection's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TcpLabels {
    pub traffic: Traffic,
    pub flags: &'static str,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let mut pairs: Vec<(&str, &str)> = self.traffic.pairs().to_vec();
        pairs.push(("response_flags", self.flags));
        pairs.as_slice().encode(encoder)
    }
}

fn duration_histogram() -> Histogram {
    // Istio's default buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_histogram() -> Histogram {
    Histogram::new([
        1.0,
        10.0,
        100.0,
        1000.0,
        10000.0,
        100000.0,
        1000000.0,
        10000000.0,
        100000000.0,
        1000000000.0,
    ])
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The families, registered once.
pub struct IstioMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    request_messages: Family<RequestLabels, Counter>,
    response_messages: Family<RequestLabels, Counter>,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    /// The same traffic as a graph.
    pub topology: super::topology::Topology,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
}

/// One finished request, as the proxy saw it.
pub struct Request {
    pub labels: RequestLabels,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages each way, when counted.
    pub messages: Option<(u64, u64)>,
    /// The metrics its workload's Telemetry turned off.
    pub off: MetricSet,
}

impl IstioMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            request_messages: Family::default(),
            response_messages: Family::default(),
            opened: Family::default(),
            closed: Family::default(),
            topology: Default::default(),
            sent: Family::default(),
            received: Family::default(),
            failed: Family::default(),
        };
        // prometheus-client appends `_total` to counters itself.
        registry.register("istio_requests", "Requests", this.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, until the response's head",
            this.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size: head and body",
            this.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size: head and body",
            this.response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages sent by clients",
            this.request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages sent by servers",
            this.response_messages.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            this.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            this.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes the server sent back, over closed connections",
            this.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the client sent, over closed connections",
            this.received.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that could not be made",
            this.failed.clone(),
        );
        this
    }

    pub fn request(&self, r: &Request) {
        let error = r.labels.response_code >= 500
            || r.labels.flags != "-"
            || r.labels.grpc_status.is_some_and(|s| s != 0);
        self.topology
            .request(&r.labels.traffic, error, r.request_bytes + r.response_bytes);
        let on = |m| !r.off.has(m);
        if on(MetricName::RequestCount) {
            self.requests.get_or_create(&r.labels).inc();
        }
        if on(MetricName::RequestDuration) {
            self.duration
                .get_or_create(&r.labels)
                .observe(r.duration_ms);
        }
        if on(MetricName::RequestSize) {
            self.request_bytes
                .get_or_create(&r.labels)
                .observe(r.request_bytes as f64);
        }
        if on(MetricName::ResponseSize) {
            self.response_bytes
                .get_or_create(&r.labels)
                .observe(r.response_bytes as f64);
        }
        if let Some((up, down)) = r.messages {
            if on(MetricName::GrpcRequestMessages) {
                self.request_messages.get_or_create(&r.labels).inc_by(up);
            }
            if on(MetricName::GrpcResponseMessages) {
                self.response_messages.get_or_create(&r.labels).inc_by(down);
            }
        }
    }

    pub fn tcp_opened(&self, labels: &TcpLabels, off: MetricSet) {
        if !off.has(MetricName::TcpOpenedConnections) {
            self.opened.get_or_create(labels).inc();
        }
    }

    /// A connection's end, with its bytes as Istio counts them:
    /// `received` what the client sent, `sent` what the server answered.
    pub fn tcp_closed(
        &self,
        labels: &TcpLabels,
        (from_client, from_server): (u64, u64),
        off: MetricSet,
    ) {
        self.topology
            .connection(&labels.traffic, from_client + from_server);
        if !off.has(MetricName::TcpClosedConnections) {
            self.closed.get_or_create(labels).inc();
        }
        if !off.has(MetricName::TcpReceivedBytes) {
            self.received.get_or_create(labels).inc_by(from_client);
        }
        if !off.has(MetricName::TcpSentBytes) {
            self.sent.get_or_create(labels).inc_by(from_server);
        }
    }

    pub fn tcp_failed(&self, labels: &TcpLabels) {
        self.failed.get_or_create(labels).inc();
    }
}

/// A connection counted opened; closed (with its bytes) when dropped, so
/// that every way out of a connection's task counts it.
pub struct OpenConnection {
    metrics: Arc<IstioMetrics>,
    labels: TcpLabels,
    bytes: std::sync::Mutex<(u64, u64)>,
    /// For its access log line.
    start: (std::time::SystemTime, std::time::Instant),
    upstream: std::net::SocketAddr,
    /// What the reporting workload's Telemetry has reported.
    reporting: Arc<Reporting>,
}

impl OpenConnection {
    pub fn new(
        metrics: Arc<IstioMetrics>,
        labels: TcpLabels,
        upstream: std::net::SocketAddr,
        reporting: Arc<Reporting>,
    ) -> Self {
        metrics.tcp_opened(&labels, reporting.metrics_off);
        Self {
            metrics,
            labels,
            bytes: std::sync::Mutex::new((0, 0)),
            start: (std::time::SystemTime::now(), std::time::Instant::now()),
            upstream,
            reporting,
        }
    }

    /// The connection's bytes: from the client, from the server.
    pub fn bytes(&self, from_client: u64, from_server: u64) {
        *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) = (from_client, from_server);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let (up, down) = *self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics
            .tcp_closed(&self.labels, (up, down), self.reporting.metrics_off);
        if self.reporting.access_log && crate::access_log::sampled() {
            let entry = crate::access_log::Entry {
                traffic: &self.labels.traffic,
                start: self.start.0,
                duration: self.start.1.elapsed(),
                upstream: Some(self.upstream),
                route: None,
                bytes_in: up,
                bytes_out: down,
                response_code: None,
                grpc_status: None,
                flags: self.labels.flags,
                trace_id: None,
                request: None,
            };
            if self.reporting.logs(&entry) {
                crate::access_log::write(&entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_and_labels_follow_istio() {
        let mut w = crate::testing::workload(
            "shop",
            "web-7d4b9c8f6-x2k9p",
            "web",
            &[
                ("pod-template-hash", "7d4b9c8f6"),
                ("app", "web"),
                ("version", "v2"),
            ],
        );
        let p = Peer::of(&w, "cluster.local");
        assert_eq!(p.workload, "web");
        assert_eq!(p.principal, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((p.app.as_str(), p.version.as_str()), ("web", "v2"));
        assert_eq!(p.canonical_service, "web");
        assert_eq!(p.canonical_revision, "v2");
        w.labels = Default::default();
        w.name = "db-0".into();
        let p = Peer::of(&w, "cluster.local");
        assert_eq!(p.workload, "db-0");
        assert_eq!(
            (p.app.as_str(), p.canonical_service.as_str()),
            ("unknown", "db-0")
        );
        assert_eq!(p.canonical_revision, "latest");
        let s = ServiceName::of("shop/web");
        assert_eq!(s.host, "web.shop.svc.cluster.local");
    }
}
