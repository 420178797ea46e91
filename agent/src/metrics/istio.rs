//! Istio's standard metrics, with its names and labels, so that existing
//! Grafana and Kiali dashboards read the mesh unchanged: requests (count,
//! duration, sizes) from the L7 path, connections and bytes from the L4
//! paths. Label values follow Istio's documentation; per-IP or per-path
//! labels never appear, so cardinality is bounded by workloads × services.

use std::{borrow::Cow, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{
    access_log::Entry,
    identity::Identity,
    policy::telemetry::{self, LabelOp, MetricName, Reporting},
    state::{ServiceView, Snapshot, Workload},
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

    /// A service of the snapshot, as Istio names it: a Service by its
    /// cluster DNS name, a `ServiceEntry` by its first host (name and host
    /// alike).
    pub fn of_view(svc: &ServiceView) -> Self {
        let host = svc.host();
        Self {
            name: if svc.entry.is_some() {
                host.clone()
            } else {
                svc.name.clone()
            },
            host,
            namespace: svc.namespace.clone(),
        }
    }

    /// The service `namespace/name` of `snapshot` ([`Self::of`] when it has
    /// none of that name).
    pub fn in_snapshot(snapshot: &Snapshot, id: &str) -> Self {
        snapshot
            .service(id)
            .map_or_else(|| Self::of(id), Self::of_view)
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

    /// [`Self::pairs`] with their values owned.
    fn owned_pairs(&self) -> Vec<(&'static str, String)> {
        self.pairs()
            .iter()
            .map(|(n, v)| (*n, (*v).to_owned()))
            .collect()
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
#[derive(Clone, Debug)]
pub struct RequestLabels {
    pub traffic: Traffic,
    pub response_code: u16,
    /// gRPC calls only.
    pub grpc_status: Option<u8>,
    /// Envoy's response flags (`-` when none).
    pub flags: &'static str,
    /// The labels instead, as a Telemetry's `tagOverrides` changed them.
    pub relabelled: Option<Relabelled>,
}

/// Label pairs written out (Istio's, then changed); a series is the same
/// as another when these are. Hashed once, when made, as [`Traffic`] is.
#[derive(Clone, Debug)]
pub struct Relabelled {
    pairs: Arc<[(Cow<'static, str>, String)]>,
    hash: u64,
}

impl Relabelled {
    fn new(pairs: Vec<(Cow<'static, str>, String)>) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pairs.hash(&mut h);
        Self {
            pairs: pairs.into(),
            hash: h.finish(),
        }
    }

    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let pairs: Vec<(&str, &str)> = self.pairs.iter().map(|(k, v)| (&**k, v.as_str())).collect();
        pairs.as_slice().encode(encoder)
    }
}

impl std::hash::Hash for Relabelled {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Relabelled {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.pairs == other.pairs
    }
}

impl RequestLabels {
    fn key(&self) -> Result<(&Traffic, u16, Option<u8>, &'static str), &Relabelled> {
        self.relabelled.as_ref().map_or(
            Ok((
                &self.traffic,
                self.response_code,
                self.grpc_status,
                self.flags,
            )),
            Err,
        )
    }
}

/// A label set is the same series as another when their keys are equal:
/// Istio's labels, or the changed ones when a Telemetry changed them.
macro_rules! same_series_by_key {
    ($($labels:ty),*) => {$(
        impl std::hash::Hash for $labels {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.key().hash(state);
            }
        }

        impl PartialEq for $labels {
            fn eq(&self, other: &Self) -> bool {
                self.key() == other.key()
            }
        }

        impl Eq for $labels {}
    )*};
}

same_series_by_key!(RequestLabels, TcpLabels);

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(relabelled) = &self.relabelled {
            return relabelled.encode(encoder);
        }
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
#[derive(Clone, Debug)]
pub struct TcpLabels {
    pub traffic: Traffic,
    pub flags: &'static str,
    /// The labels instead, as a Telemetry's `tagOverrides` changed them.
    pub relabelled: Option<Relabelled>,
}

impl TcpLabels {
    fn key(&self) -> Result<(&Traffic, &'static str), &Relabelled> {
        self.relabelled
            .as_ref()
            .map_or(Ok((&self.traffic, self.flags)), Err)
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(relabelled) = &self.relabelled {
            return relabelled.encode(encoder);
        }
        let mut pairs: Vec<(&str, &str)> = self.traffic.pairs().to_vec();
        pairs.push(("response_flags", self.flags));
        pairs.as_slice().encode(encoder)
    }
}

/// Labels a Telemetry's `tagOverrides` may change.
trait Relabel: Clone {
    /// Istio's labels, in order.
    fn istio_pairs(&self) -> Vec<(&'static str, String)>;

    fn set_relabelled(&mut self, to: Relabelled);

    /// These labels with `ops` applied, values read from `entry`.
    fn relabelled(&self, ops: &telemetry::Relabel, entry: &Entry<'_>) -> Self {
        let mut out = self.clone();
        out.set_relabelled(apply(self.istio_pairs(), ops, entry));
        out
    }
}

/// Istio's labels with `ops` applied: removed ones left out, upserted ones
/// (new, or replacing Istio's) last with their expression's value.
fn apply(
    pairs: Vec<(&'static str, String)>,
    ops: &telemetry::Relabel,
    entry: &Entry<'_>,
) -> Relabelled {
    let mut out: Vec<(Cow<'static, str>, String)> = pairs
        .into_iter()
        .filter(|(name, _)| !ops.contains_key(*name))
        .map(|(name, value)| (Cow::Borrowed(name), value))
        .collect();
    for (name, op) in ops {
        if let LabelOp::Upsert(x) = op {
            out.push((Cow::Owned(name.clone()), x.label(entry)));
        }
    }
    Relabelled::new(out)
}

impl Relabel for RequestLabels {
    fn istio_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = self.traffic.owned_pairs();
        pairs.extend([
            ("response_code", self.response_code.to_string()),
            (
                "grpc_response_status",
                self.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
            ),
            ("response_flags", self.flags.to_owned()),
        ]);
        pairs
    }

    fn set_relabelled(&mut self, to: Relabelled) {
        self.relabelled = Some(to);
    }
}

impl Relabel for TcpLabels {
    fn istio_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = self.traffic.owned_pairs();
        pairs.push(("response_flags", self.flags.to_owned()));
        pairs
    }

    fn set_relabelled(&mut self, to: Relabelled) {
        self.relabelled = Some(to);
    }
}

/// The labels each metric of one request or connection is recorded
/// under: Istio's, or as its workload's Telemetry changes them (made once
/// per distinct change, and only when there is one).
struct Series<'l, L> {
    istio: &'l L,
    relabels: &'l telemetry::Relabels,
    made: Vec<(*const telemetry::Relabel, L)>,
}

impl<'l, L: Relabel> Series<'l, L> {
    fn new(
        istio: &'l L,
        reporting: &'l Reporting,
        entry: Option<&Entry<'_>>,
        metrics: &[MetricName],
    ) -> Self {
        let mut made: Vec<(*const telemetry::Relabel, L)> = Vec::new();
        if let Some(entry) = entry {
            let on = metrics.iter().filter(|m| !reporting.metrics_off.has(**m));
            for ops in on.filter_map(|m| reporting.relabels.of(*m)) {
                if !made.iter().any(|(p, _)| *p == Arc::as_ptr(ops)) {
                    made.push((Arc::as_ptr(ops), istio.relabelled(ops, entry)));
                }
            }
        }
        Self {
            istio,
            relabels: &reporting.relabels,
            made,
        }
    }

    fn of(&self, metric: MetricName) -> &L {
        self.relabels
            .of(metric)
            .and_then(|ops| self.made.iter().find(|(p, _)| *p == Arc::as_ptr(ops)))
            .map_or(self.istio, |(_, l)| l)
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
pub struct Request<'a> {
    pub labels: &'a RequestLabels,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages each way, when counted.
    pub messages: Option<(u64, u64)>,
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

    /// Records a request as its workload's Telemetry (`reporting`) says;
    /// `entry` is what label values are computed from, when it changes
    /// labels.
    pub fn request(&self, r: &Request<'_>, reporting: &Reporting, entry: Option<&Entry<'_>>) {
        use MetricName::*;
        let error = r.labels.response_code >= 500
            || r.labels.flags != "-"
            || r.labels.grpc_status.is_some_and(|s| s != 0);
        self.topology
            .request(&r.labels.traffic, error, r.request_bytes + r.response_bytes);
        // No allocation per request unless a Telemetry changes labels.
        const REQUEST: [MetricName; 6] = [
            RequestCount,
            RequestDuration,
            RequestSize,
            ResponseSize,
            GrpcRequestMessages,
            GrpcResponseMessages,
        ];
        let series = Series::new(r.labels, reporting, entry, &REQUEST);
        for metric in REQUEST {
            if reporting.metrics_off.has(metric) {
                continue;
            }
            let labels = series.of(metric);
            match (metric, r.messages) {
                (RequestCount, _) => {
                    self.requests.get_or_create(labels).inc();
                }
                (RequestDuration, _) => self.duration.get_or_create(labels).observe(r.duration_ms),
                (RequestSize, _) => self
                    .request_bytes
                    .get_or_create(labels)
                    .observe(r.request_bytes as f64),
                (ResponseSize, _) => self
                    .response_bytes
                    .get_or_create(labels)
                    .observe(r.response_bytes as f64),
                (GrpcRequestMessages, Some((up, _))) => {
                    self.request_messages.get_or_create(labels).inc_by(up);
                }
                (GrpcResponseMessages, Some((_, down))) => {
                    self.response_messages.get_or_create(labels).inc_by(down);
                }
                _ => {}
            }
        }
    }

    pub fn tcp_opened(&self, labels: &TcpLabels, reporting: &Reporting, entry: Option<&Entry<'_>>) {
        let metric = MetricName::TcpOpenedConnections;
        if !reporting.metrics_off.has(metric) {
            let series = Series::new(labels, reporting, entry, &[metric]);
            self.opened.get_or_create(series.of(metric)).inc();
        }
    }

    /// A connection's end, with its bytes as Istio counts them:
    /// `received` what the client sent, `sent` what the server answered.
    pub fn tcp_closed(
        &self,
        labels: &TcpLabels,
        (from_client, from_server): (u64, u64),
        reporting: &Reporting,
        entry: Option<&Entry<'_>>,
    ) {
        use MetricName::*;
        self.topology
            .connection(&labels.traffic, from_client + from_server);
        const CLOSED: [MetricName; 3] = [TcpClosedConnections, TcpReceivedBytes, TcpSentBytes];
        let series = Series::new(labels, reporting, entry, &CLOSED);
        for metric in CLOSED {
            if reporting.metrics_off.has(metric) {
                continue;
            }
            let labels = series.of(metric);
            match metric {
                TcpClosedConnections => self.closed.get_or_create(labels).inc(),
                TcpReceivedBytes => self.received.get_or_create(labels).inc_by(from_client),
                _ => self.sent.get_or_create(labels).inc_by(from_server),
            };
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
        let this = Self {
            metrics,
            labels,
            bytes: std::sync::Mutex::new((0, 0)),
            start: (std::time::SystemTime::now(), std::time::Instant::now()),
            upstream,
            reporting,
        };
        // Label values are read from an entry only when labels change.
        let entry = (!this.reporting.relabels.is_empty()).then(|| this.entry((0, 0)));
        this.metrics
            .tcp_opened(&this.labels, &this.reporting, entry.as_ref());
        this
    }

    /// What its access log line and its labels' values read, with the
    /// bytes so far.
    fn entry(&self, (up, down): (u64, u64)) -> crate::access_log::Entry<'_> {
        crate::access_log::Entry {
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
        }
    }

    /// The connection's bytes: from the client, from the server.
    pub fn bytes(&self, from_client: u64, from_server: u64) {
        *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) = (from_client, from_server);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let bytes = *self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let entry = self.entry(bytes);
        self.metrics
            .tcp_closed(&self.labels, bytes, &self.reporting, Some(&entry));
        if self.reporting.access_log && crate::access_log::sampled() && self.reporting.logs(&entry)
        {
            crate::access_log::write(&entry);
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

    /// A Telemetry's tagOverrides: REMOVE merges series that differed only
    /// there, UPSERT adds a label computed from the request, each metric
    /// with its own changes; the metrics it turns off are not recorded.
    #[test]
    fn telemetry_changes_labels_per_metric() {
        use crate::policy::telemetry::{Side, Telemetries, TelemetryPolicy, TelemetrySpec};
        let spec: TelemetrySpec = serde_yaml_ng::from_str(
            "metrics:\n- overrides:\n  - match: {metric: REQUEST_COUNT}\n    tagOverrides:\n      source_workload: {operation: REMOVE}\n      request_host: {value: request.host}\n      tenant: {value: \"request.headers['x-tenant']\"}\n  - match: {metric: REQUEST_SIZE}\n    disabled: true",
        )
        .expect("spec");
        crate::policy::telemetry::validate(&spec).expect("valid");
        let policy = TelemetryPolicy::compile(&crate::policy::telemetry::Telemetry {
            metadata: kube::api::ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("t".into()),
                ..Default::default()
            },
            spec,
        });
        let web = crate::testing::workload("shop", "web", "web", &[("app", "web")]);
        let reporting =
            Telemetries::new("trellis-system", vec![policy]).reporting(&web, Side::Server);
        assert_eq!(
            reporting.headers,
            [http::HeaderName::from_static("x-tenant")]
        );

        let mut registry = Registry::default();
        let metrics = IstioMetrics::register(&mut registry);
        let destination = Arc::new(Peer::of(&web, "cluster.local"));
        for (caller, tenant) in [("a", "acme"), ("b", "acme"), ("c", "globex")] {
            let traffic = Traffic::new(
                Reporter::Destination,
                Arc::new(Peer::of(
                    // One Deployment's pods: only the workload name differs.
                    &crate::testing::workload("shop", caller, "client", &[("app", "client")]),
                    "cluster.local",
                )),
                destination.clone(),
                Arc::new(ServiceName::of("shop/web")),
                "http",
                true,
            );
            let labels = RequestLabels {
                traffic,
                response_code: 200,
                grpc_status: None,
                flags: "-",
                relabelled: None,
            };
            let req = http::Request::builder()
                .uri("/x")
                .header("host", "web.shop")
                .header("x-tenant", tenant)
                .body(())
                .unwrap();
            let line = crate::access_log::RequestLine::of(&req, &reporting.headers);
            let entry = Entry {
                traffic: &labels.traffic,
                start: std::time::SystemTime::now(),
                duration: std::time::Duration::from_millis(3),
                upstream: None,
                route: None,
                bytes_in: 0,
                bytes_out: 0,
                response_code: Some(200),
                grpc_status: None,
                flags: "-",
                trace_id: None,
                request: Some(&line),
            };
            let r = Request {
                labels: &labels,
                duration_ms: 3.0,
                request_bytes: 0,
                response_bytes: 0,
                messages: None,
            };
            metrics.request(&r, &reporting, Some(&entry));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let lines = |name: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect()
        };
        let counts = lines("istio_requests_total");
        assert_eq!(counts.len(), 2, "a and b merged: {counts:#?}");
        for l in &counts {
            assert!(
                !l.contains("source_workload=") && l.contains("request_host=\"web.shop\""),
                "{l}"
            );
        }
        assert!(
            counts
                .iter()
                .any(|l| l.contains("tenant=\"acme\"") && l.ends_with(" 2"))
        );
        assert!(
            counts
                .iter()
                .any(|l| l.contains("tenant=\"globex\"") && l.ends_with(" 1"))
        );
        // Other metrics keep Istio's labels; the one turned off is absent.
        let durations = lines("istio_request_duration_milliseconds_count");
        assert_eq!(durations.len(), 3, "{durations:#?}");
        assert!(
            durations
                .iter()
                .all(|l| l.contains("source_workload=") && !l.contains("request_host="))
        );
        assert!(lines("istio_request_bytes_count").is_empty(), "{text}");
        assert_eq!(lines("istio_response_bytes_count").len(), 3);
    }
}
