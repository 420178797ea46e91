//! `Telemetry` (`trellis.dev/v1alpha1`, the shape of Istio's
//! `telemetry.istio.io` API): what the agent reports about a workload's
//! traffic, mesh-wide (in the mesh's root namespace, the agent's own), per
//! namespace (no selector) or per workload (a selector). Three parts, each a
//! list of entries that may be limited to one side of the call (`match.mode`:
//! the caller's agent is the CLIENT, the callee's the SERVER):
//!
//! - `tracing`: the share of new traces sampled (`randomSamplingPercentage`,
//!   over `--trace-sampling`), `disableSpanReporting` (the trace context is
//!   still passed on), and `customTags` added to each span (a literal, a
//!   request header, or a variable of the agent's environment);
//! - `accessLogging`: `disabled` turns a workload's access log lines off (or
//!   back on);
//! - `metrics`: `overrides` turn Istio's standard metrics off (or back on),
//!   one by one or `ALL_METRICS`, and change their labels (`tagOverrides`:
//!   REMOVE one, or UPSERT one with a CEL expression's value).
//!
//! Less specific first, each entry that sets a field overrides what came
//! before: the mesh's, then the namespace's, then the workload's (of two at
//! one level, the older one), as Istio merges them. A report is decided
//! once per connection, for the workload whose agent reports it: the
//! caller on the source node, the pod called on the destination node.

use std::{
    collections::BTreeMap,
    sync::{Arc, LazyLock},
};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    authz::Selector,
    scope::{Scoped, oldest},
};
use crate::{cel::Expression, state::Workload};

/// What the agent reports about the traffic of the pods it selects.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "Telemetry",
    plural = "telemetries",
    doc = "Trellis Telemetry: tracing, access logs and metrics of meshed workloads.",
    namespaced,
    shortname = "ttel",
    derive = "PartialEq",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    /// Which pods of the namespace it applies to; all of them when absent
    /// (and, in the mesh's root namespace, every pod of the mesh).
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<Tracing>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<AccessLogging>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metrics>,
}

/// A provider by name. Trellis has one of each kind (the OTLP exporter,
/// the access log at target `access`, the Prometheus endpoint), so the
/// names are kept for display and choose nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Which side of a call an entry is about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub mode: WorkloadMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    /// Both sides.
    #[default]
    ClientAndServer,
    /// The caller's side (reported by its node's agent).
    Client,
    /// The side called (reported by its node's agent).
    Server,
}

/// The side of a call an agent reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Server,
}

impl WorkloadMode {
    fn covers(self, side: Side) -> bool {
        matches!(
            (self, side),
            (Self::ClientAndServer, _)
                | (Self::Client, Side::Client)
                | (Self::Server, Side::Server)
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    #[serde(default, rename = "match")]
    pub match_: Option<Match>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<Provider>,
    /// The share of new traces sampled, in percent (0 to 100); a caller's
    /// own decision (`traceparent`, B3) still wins.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub random_sampling_percentage: Option<f64>,
    /// No spans reported; the trace context is still passed on.
    #[serde(default)]
    pub disable_span_reporting: Option<bool>,
    /// Attributes added to each span, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_tags: BTreeMap<String, CustomTag>,
}

/// Where a custom tag's value comes from: exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct CustomTag {
    #[serde(default)]
    pub literal: Option<Literal>,
    /// A variable of the agent's environment.
    #[serde(default)]
    pub environment: Option<Named>,
    /// A request header.
    #[serde(default)]
    pub header: Option<Named>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Literal {
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Named {
    #[schemars(length(min = 1))]
    pub name: String,
    /// The value when it is absent (else the tag is left out).
    #[serde(default)]
    pub default_value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(default, rename = "match")]
    pub match_: Option<Match>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<Provider>,
    /// Off when true; an entry without it turns the log on.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Only the lines this admits are written.
    #[serde(default)]
    pub filter: Option<LogFilter>,
}

/// A CEL expression over Envoy's attribute names (the part of CEL that
/// `crate::cel` reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    #[schemars(length(min = 1, max = 1024))]
    pub expression: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<Provider>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<MetricsOverride>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsOverride {
    /// Which metrics, on which side; all of them, both sides, when absent.
    #[serde(default, rename = "match")]
    pub match_: Option<MetricSelector>,
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Label changes, by label name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagOverride {
    #[serde(default)]
    pub operation: TagOperation,
    /// UPSERT: a CEL expression whose value the label takes
    /// (`request.host`, `request.headers['x-tenant']`, `'literal'`).
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum TagOperation {
    /// Adds the label, or replaces the standard one of that name.
    #[default]
    Upsert,
    /// Leaves the label out (series that differed only there merge).
    Remove,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSelector {
    #[serde(default)]
    pub metric: Option<MetricName>,
    #[serde(default)]
    pub mode: WorkloadMode,
}

/// Istio's standard metrics, by the names its API gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MetricName {
    AllMetrics,
    /// `istio_requests_total`
    RequestCount,
    /// `istio_request_duration_milliseconds`
    RequestDuration,
    /// `istio_request_bytes`
    RequestSize,
    /// `istio_response_bytes`
    ResponseSize,
    /// `istio_tcp_connections_opened_total`
    TcpOpenedConnections,
    /// `istio_tcp_connections_closed_total`
    TcpClosedConnections,
    /// `istio_tcp_sent_bytes_total`
    TcpSentBytes,
    /// `istio_tcp_received_bytes_total`
    TcpReceivedBytes,
    /// `istio_request_messages_total`
    GrpcRequestMessages,
    /// `istio_response_messages_total`
    GrpcResponseMessages,
}

impl MetricName {
    const ONE_BY_ONE: [Self; 10] = [
        Self::RequestCount,
        Self::RequestDuration,
        Self::RequestSize,
        Self::ResponseSize,
        Self::TcpOpenedConnections,
        Self::TcpClosedConnections,
        Self::TcpSentBytes,
        Self::TcpReceivedBytes,
        Self::GrpcRequestMessages,
        Self::GrpcResponseMessages,
    ];

    fn set(self) -> MetricSet {
        match self {
            Self::AllMetrics => MetricSet((1 << Self::ONE_BY_ONE.len()) - 1),
            one => MetricSet(1 << one.index()),
        }
    }

    /// Its place in [`Self::ONE_BY_ONE`] (ALL_METRICS: 0, never asked).
    fn index(self) -> usize {
        (self as usize).saturating_sub(1)
    }
}

/// A set of metrics (the ones turned off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetricSet(u16);

impl MetricSet {
    pub fn has(self, metric: MetricName) -> bool {
        self.0 & metric.set().0 == metric.set().0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl Serialize for MetricSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(MetricName::ONE_BY_ONE.iter().filter(|m| self.has(**m)))
    }
}

/// Checks what the schema cannot say: a field path and a reason.
pub fn validate(spec: &TelemetrySpec) -> Result<(), (String, String)> {
    for (i, t) in spec.tracing.iter().enumerate() {
        if let Some(p) = t.random_sampling_percentage
            && !(0.0..=100.0).contains(&p)
        {
            return Err((
                format!("spec.tracing[{i}].randomSamplingPercentage"),
                format!("{p} is not a percentage (0 to 100)"),
            ));
        }
        for (name, tag) in &t.custom_tags {
            let field = format!("spec.tracing[{i}].customTags.{name}");
            let set = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
            ];
            if set.iter().filter(|s| **s).count() != 1 {
                return Err((
                    field,
                    "needs exactly one of literal, environment and header".into(),
                ));
            }
            if name.is_empty() {
                return Err((field, "a tag needs a name".into()));
            }
            if let Some(h) = &tag.header
                && http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
            {
                return Err((
                    format!("{field}.header.name"),
                    format!("{:?} is not a header name", h.name),
                ));
            }
        }
    }
    for (i, a) in spec.access_logging.iter().enumerate() {
        if let Some(f) = &a.filter
            && let Err(e) = Expression::parse(&f.expression)
        {
            return Err((
                format!("spec.accessLogging[{i}].filter.expression"),
                format!("{:?} does not parse {e}", f.expression),
            ));
        }
    }
    for (i, m) in spec.metrics.iter().enumerate() {
        for (j, o) in m.overrides.iter().enumerate() {
            for (name, tag) in &o.tag_overrides {
                let field = format!("spec.metrics[{i}].overrides[{j}].tagOverrides.{name}");
                let mut chars = name.chars();
                let label = chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !name.starts_with("__");
                if !label {
                    return Err((field, format!("{name:?} is not a Prometheus label name")));
                }
                match (tag.operation, &tag.value) {
                    (TagOperation::Upsert, None) => {
                        return Err((field, "UPSERT needs a value (a CEL expression)".into()));
                    }
                    (TagOperation::Upsert, Some(value)) => {
                        if let Err(e) = Expression::parse(value) {
                            return Err((
                                format!("{field}.value"),
                                format!("{value:?} does not parse {e}"),
                            ));
                        }
                    }
                    (TagOperation::Remove, _) => {}
                }
            }
        }
    }
    let providers = spec
        .tracing
        .iter()
        .map(|t| ("tracing", &t.providers))
        .chain(
            spec.access_logging
                .iter()
                .map(|a| ("accessLogging", &a.providers)),
        )
        .chain(spec.metrics.iter().map(|m| ("metrics", &m.providers)));
    for (part, list) in providers {
        if list.iter().any(|p| p.name.is_empty()) {
            return Err((
                format!("spec.{part}.providers"),
                "a provider needs a name".into(),
            ));
        }
    }
    Ok(())
}

/// Where a custom tag's value comes from, once compiled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tag {
    /// A literal, or the agent's environment variable read when the
    /// policy was compiled.
    Value(String),
    /// A request header, and the value when the request has none.
    Header {
        #[serde(serialize_with = "header_name")]
        name: http::HeaderName,
        default: Option<String>,
    },
}

fn header_name<S: serde::Serializer>(name: &http::HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

/// One entry of a policy, compiled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct TraceEntry {
    mode: WorkloadMode,
    sampling_ppm: Option<u32>,
    report: Option<bool>,
    tags: Vec<(String, Tag)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct MetricEntry {
    mode: WorkloadMode,
    metrics: MetricSet,
    disabled: Option<bool>,
    labels: Vec<(String, LabelOp)>,
}

/// What a tag override does to a label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LabelOp {
    #[serde(rename = "REMOVE")]
    Remove,
    #[serde(rename = "UPSERT")]
    Upsert(Arc<Expression>),
}

/// How one metric's labels change, by label name.
pub type Relabel = BTreeMap<String, LabelOp>;

/// Label changes by metric ([`MetricName::ONE_BY_ONE`]'s order); `None`
/// keeps Istio's labels. Metrics with the same changes share them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Relabels([Option<Arc<Relabel>>; 10]);

impl Relabels {
    /// `metric`'s label changes.
    pub fn of(&self, metric: MetricName) -> Option<&Arc<Relabel>> {
        self.0[metric.index()].as_ref()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// Every UPSERT's expression.
    fn expressions(&self) -> impl Iterator<Item = &Expression> {
        self.0
            .iter()
            .flatten()
            .flat_map(|ops| ops.values())
            .filter_map(|op| match op {
                LabelOp::Upsert(x) => Some(&**x),
                LabelOp::Remove => None,
            })
    }
}

impl Serialize for Relabels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            MetricName::ONE_BY_ONE
                .iter()
                .zip(&self.0)
                .filter_map(|(m, r)| Some((m, r.as_deref()?))),
        )
    }
}

/// A policy ready to apply, as the state snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TelemetryPolicy {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    tracing: Vec<TraceEntry>,
    /// Access logging by side: `disabled` and the filter of each entry in
    /// order.
    logging: Vec<(WorkloadMode, bool, Option<Arc<Expression>>)>,
    metrics: Vec<MetricEntry>,
    #[serde(skip)]
    created: Option<k8s_openapi::jiff::Timestamp>,
}

impl TelemetryPolicy {
    /// Compiles a validated object; environment variables are read now.
    pub fn compile(object: &Telemetry) -> Self {
        let spec = &object.spec;
        let mode = |m: Option<Match>| m.unwrap_or_default().mode;
        let tracing = spec
            .tracing
            .iter()
            .map(|t| TraceEntry {
                mode: mode(t.match_),
                sampling_ppm: t
                    .random_sampling_percentage
                    .map(|p| (p.clamp(0.0, 100.0) * 10_000.0).round() as u32),
                report: t.disable_span_reporting.map(|d| !d),
                tags: t
                    .custom_tags
                    .iter()
                    .filter_map(|(name, tag)| Some((name.clone(), Self::tag(tag)?)))
                    .collect(),
            })
            .collect();
        let logging = spec
            .access_logging
            .iter()
            .map(|a| {
                let filter = a
                    .filter
                    .as_ref()
                    .and_then(|f| Expression::parse(&f.expression).ok());
                (
                    mode(a.match_),
                    a.disabled.unwrap_or(false),
                    filter.map(Arc::new),
                )
            })
            .collect();
        let metrics = spec
            .metrics
            .iter()
            .flat_map(|m| &m.overrides)
            .map(|o| {
                let selector = o.match_.unwrap_or_default();
                MetricEntry {
                    mode: selector.mode,
                    metrics: selector.metric.unwrap_or(MetricName::AllMetrics).set(),
                    disabled: o.disabled,
                    labels: o
                        .tag_overrides
                        .iter()
                        .filter_map(|(name, tag)| {
                            let op = match tag.operation {
                                TagOperation::Remove => LabelOp::Remove,
                                TagOperation::Upsert => LabelOp::Upsert(Arc::new(
                                    Expression::parse(tag.value.as_deref()?).ok()?,
                                )),
                            };
                            Some((name.clone(), op))
                        })
                        .collect(),
                }
            })
            .collect();
        Self {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            tracing,
            logging,
            metrics,
            created: object.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }

    fn tag(tag: &CustomTag) -> Option<Tag> {
        if let Some(l) = &tag.literal {
            return Some(Tag::Value(l.value.clone()));
        }
        if let Some(e) = &tag.environment {
            // As Envoy reads its own: unset and no default leaves it out.
            return std::env::var(&e.name)
                .ok()
                .or_else(|| e.default_value.clone())
                .map(Tag::Value);
        }
        let h = tag.header.as_ref()?;
        Some(Tag::Header {
            name: http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            default: h.default_value.clone(),
        })
    }

    /// Applies the entries about `side` over `report`.
    fn apply(&self, side: Side, report: &mut Reporting) {
        for t in self.tracing.iter().filter(|t| t.mode.covers(side)) {
            if t.sampling_ppm.is_some() {
                report.sampling_ppm = t.sampling_ppm;
            }
            if let Some(on) = t.report {
                report.report_spans = on;
            }
            for (name, tag) in &t.tags {
                match report.tags.iter_mut().find(|(n, _)| n == name) {
                    Some(same) => same.1 = tag.clone(),
                    None => report.tags.push((name.clone(), tag.clone())),
                }
            }
        }
        // An entry says all of the log's settings: a later one without a
        // filter drops an earlier one's.
        for (_, disabled, filter) in self.logging.iter().filter(|(m, ..)| m.covers(side)) {
            report.access_log = !disabled;
            report.log_filter.clone_from(filter);
        }
        for m in self.metrics.iter().filter(|m| m.mode.covers(side)) {
            match m.disabled {
                Some(true) => report.metrics_off.0 |= m.metrics.0,
                Some(false) => report.metrics_off.0 &= !m.metrics.0,
                None => {}
            }
            if m.labels.is_empty() {
                continue;
            }
            for metric in MetricName::ONE_BY_ONE
                .into_iter()
                .filter(|x| m.metrics.has(*x))
            {
                let ops = Arc::make_mut(report.relabels.0[metric.index()].get_or_insert_default());
                for (name, op) in &m.labels {
                    ops.insert(name.clone(), op.clone());
                }
            }
        }
    }
}

impl Scoped for TelemetryPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }

    fn created(&self) -> Option<k8s_openapi::jiff::Timestamp> {
        self.created
    }
}

/// What the agent reports about one workload's side of its calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reporting {
    /// Access log lines (then `--access-log-sample` picks).
    pub access_log: bool,
    /// Only the lines this admits are written.
    pub log_filter: Option<Arc<Expression>>,
    /// The share of new traces sampled, in parts per million (`None`:
    /// `--trace-sampling`).
    pub sampling_ppm: Option<u32>,
    /// Spans exported (else only the trace context is passed on).
    pub report_spans: bool,
    /// Attributes added to spans.
    pub tags: Vec<(String, Tag)>,
    /// Standard metrics not recorded.
    pub metrics_off: MetricSet,
    /// Their label changes.
    pub relabels: Relabels,
    /// The request headers the log filter and the label values read.
    #[serde(skip)]
    pub headers: Vec<http::HeaderName>,
}

impl Default for Reporting {
    fn default() -> Self {
        Self {
            access_log: true,
            log_filter: None,
            sampling_ppm: None,
            report_spans: true,
            tags: Vec::new(),
            metrics_off: MetricSet::default(),
            relabels: Relabels::default(),
            headers: Vec::new(),
        }
    }
}

/// What is reported without a policy: everything, as the flags say.
static EVERYTHING: LazyLock<Arc<Reporting>> = LazyLock::new(Arc::default);

impl Reporting {
    /// Shares equal label changes between metrics (a request's labels are
    /// then changed once for all of them) and lists the headers to keep.
    fn finish(&mut self) {
        let slots = &mut self.relabels.0;
        for i in 1..slots.len() {
            if let Some(same) = slots[..i]
                .iter()
                .flatten()
                .find(|earlier| slots[i].as_ref().is_some_and(|r| r == *earlier))
                .cloned()
            {
                slots[i] = Some(same);
            }
        }
        let mut headers = Vec::new();
        let reading = self
            .relabels
            .expressions()
            .chain(self.log_filter.as_deref());
        for h in reading.flat_map(Expression::headers) {
            if !headers.contains(&h) {
                headers.push(h);
            }
        }
        self.headers = headers;
    }

    /// Whether a line with `entry` is written (the sampled share aside).
    pub fn logs(&self, entry: &crate::access_log::Entry<'_>) -> bool {
        self.access_log && self.log_filter.as_ref().is_none_or(|f| f.admits(entry))
    }

    /// The default, shared.
    pub fn everything() -> Arc<Self> {
        EVERYTHING.clone()
    }

    /// The custom tags' values for a request with `headers`.
    pub fn tag_values(&self, headers: &http::HeaderMap) -> Vec<(String, String)> {
        self.tags
            .iter()
            .filter_map(|(name, tag)| {
                let value = match tag {
                    Tag::Value(v) => v.clone(),
                    Tag::Header { name, default } => headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        .or_else(|| default.clone())?,
                };
                Some((name.clone(), value))
            })
            .collect()
    }
}

/// Every namespace's policies, with the mesh's root namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Telemetries {
    pub root: String,
    pub policies: Vec<TelemetryPolicy>,
}

impl Telemetries {
    pub fn new(root: &str, policies: Vec<TelemetryPolicy>) -> Self {
        Self {
            root: root.into(),
            policies,
        }
    }

    /// What to report of `workload`'s `side` of a call.
    pub fn reporting(&self, workload: &Workload, side: Side) -> Arc<Reporting> {
        self.reporting_for(&workload.namespace, &workload.labels, side)
    }

    /// [`Self::reporting`] for a pod of `namespace` with `labels`.
    pub fn reporting_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        side: Side,
    ) -> Arc<Reporting> {
        if self.policies.is_empty() {
            return Reporting::everything();
        }
        let oldest =
            |at: &str, labels| oldest(self.policies.iter().filter(|p| p.namespace == at), labels);
        let levels = [
            oldest(&self.root, None),
            // The root namespace's own pods take its policies once.
            (namespace != self.root)
                .then(|| oldest(namespace, None))
                .flatten(),
            oldest(namespace, Some(labels)),
        ];
        if levels.iter().all(Option::is_none) {
            return Reporting::everything();
        }
        let mut report = Reporting::default();
        for policy in levels.into_iter().flatten() {
            policy.apply(side, &mut report);
        }
        report.finish();
        Arc::new(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(namespace: &str, name: &str, age: i64, yaml: &str) -> TelemetryPolicy {
        let spec: TelemetrySpec = serde_yaml_ng::from_str(yaml).expect(yaml);
        validate(&spec).expect("valid");
        TelemetryPolicy::compile(&Telemetry {
            metadata: crate::testing::meta(namespace, name, age),
            spec,
        })
    }

    fn pod(namespace: &str, app: &str) -> Workload {
        crate::testing::workload(namespace, app, app, &[("app", app)])
    }

    #[test]
    fn without_policies_everything_is_reported() {
        let none = Telemetries::new("trellis-system", vec![]);
        let r = none.reporting(&pod("shop", "web"), Side::Server);
        assert_eq!(*r, Reporting::default());
        assert!(Arc::ptr_eq(&r, &Reporting::everything()), "shared");
        // Policies elsewhere leave the pod's default shared too.
        let other = Telemetries::new(
            "trellis-system",
            vec![compile(
                "bank",
                "off",
                0,
                "accessLogging: [{disabled: true}]",
            )],
        );
        assert!(Arc::ptr_eq(
            &other.reporting(&pod("shop", "web"), Side::Server),
            &Reporting::everything()
        ));
    }

    #[test]
    fn the_more_specific_entry_overrides_field_by_field() {
        let mesh = compile(
            "trellis-system",
            "mesh-default",
            0,
            "tracing:\n- randomSamplingPercentage: 10\n  customTags:\n    env: {literal: {value: prod}}\n    user: {header: {name: x-user, defaultValue: anon}}\n\
             accessLogging: [{providers: [{name: envoy}]}]",
        );
        let ns = compile(
            "shop",
            "shop",
            0,
            "tracing:\n- match: {mode: SERVER}\n  disableSpanReporting: true\n  customTags: {env: {literal: {value: shop}}}\n\
             metrics:\n- overrides:\n  - match: {metric: REQUEST_COUNT, mode: SERVER}\n    disabled: true\n  - match: {metric: ALL_METRICS, mode: CLIENT}\n    disabled: true",
        );
        let web = compile(
            "shop",
            "web",
            0,
            "selector: {matchLabels: {app: web}}\n\
             tracing: [{randomSamplingPercentage: 100}]\n\
             accessLogging: [{match: {mode: CLIENT}, disabled: true}]\n\
             metrics: [{overrides: [{match: {metric: TCP_OPENED_CONNECTIONS}, disabled: false}]}]",
        );
        let all = Telemetries::new("trellis-system", vec![web, ns, mesh]);

        let db_server = all.reporting(&pod("shop", "db"), Side::Server);
        assert_eq!(db_server.sampling_ppm, Some(100_000), "the mesh's 10%");
        assert!(!db_server.report_spans, "the namespace's, server side");
        assert_eq!(
            db_server.tags,
            vec![
                ("env".into(), Tag::Value("shop".into())),
                (
                    "user".into(),
                    Tag::Header {
                        name: http::HeaderName::from_static("x-user"),
                        default: Some("anon".into())
                    }
                ),
            ],
            "tags merge by name, the namespace's value over the mesh's"
        );
        assert!(db_server.metrics_off.has(MetricName::RequestCount));
        assert!(!db_server.metrics_off.has(MetricName::RequestDuration));
        assert!(db_server.access_log);

        let db_client = all.reporting(&pod("shop", "db"), Side::Client);
        assert!(db_client.report_spans, "SERVER entries leave the client");
        assert_eq!(db_client.tags[0].1, Tag::Value("prod".into()));
        assert!(db_client.metrics_off.has(MetricName::AllMetrics));

        let web_client = all.reporting(&pod("shop", "web"), Side::Client);
        assert_eq!(web_client.sampling_ppm, Some(1_000_000));
        assert!(!web_client.access_log, "the workload's, client side");
        assert!(!web_client.metrics_off.has(MetricName::TcpOpenedConnections));
        assert!(web_client.metrics_off.has(MetricName::TcpClosedConnections));
        assert!(all.reporting(&pod("shop", "web"), Side::Server).access_log);

        // Another namespace has the mesh's alone.
        let bank = all.reporting(&pod("bank", "web"), Side::Server);
        assert_eq!(bank.sampling_ppm, Some(100_000));
        assert!(bank.report_spans && bank.metrics_off.is_empty());
        let headers = http::HeaderMap::from_iter([(
            http::HeaderName::from_static("x-user"),
            http::HeaderValue::from_static("ada"),
        )]);
        assert_eq!(
            bank.tag_values(&headers),
            vec![("env".into(), "prod".into()), ("user".into(), "ada".into())]
        );
        assert_eq!(
            bank.tag_values(&http::HeaderMap::new())[1],
            ("user".into(), "anon".into())
        );
    }

    #[test]
    fn of_two_at_one_level_the_older_decides() {
        let old = compile("shop", "z-old", 60, "accessLogging: [{disabled: true}]");
        let new = compile("shop", "a-new", 0, "accessLogging: [{disabled: false}]");
        let both = Telemetries::new("trellis-system", vec![new, old]);
        assert!(!both.reporting(&pod("shop", "web"), Side::Client).access_log);
        // The root namespace's own pods: its policy counts once, as the mesh's.
        let root = Telemetries::new(
            "trellis-system",
            vec![compile(
                "trellis-system",
                "m",
                0,
                "metrics: [{overrides: [{disabled: true}]}]",
            )],
        );
        assert!(
            root.reporting(&pod("trellis-system", "x"), Side::Client)
                .metrics_off
                .has(MetricName::AllMetrics)
        );
    }

    #[test]
    fn each_logging_entry_sets_the_filter_too() {
        let ns = compile(
            "shop",
            "shop",
            0,
            "accessLogging: [{filter: {expression: 'response.code >= 500'}}]",
        );
        let web = compile(
            "shop",
            "web",
            0,
            "selector: {matchLabels: {app: web}}\naccessLogging: [{match: {mode: SERVER}}]",
        );
        let all = Telemetries::new("trellis-system", vec![ns, web]);
        let text = |r: Arc<Reporting>| r.log_filter.as_ref().map(|f| format!("{f:?}"));
        assert_eq!(
            text(all.reporting(&pod("shop", "db"), Side::Server)).as_deref(),
            Some("response.code >= 500")
        );
        assert_eq!(
            text(all.reporting(&pod("shop", "web"), Side::Client)).as_deref(),
            Some("response.code >= 500"),
            "the workload's entry is the server's"
        );
        assert_eq!(
            text(all.reporting(&pod("shop", "web"), Side::Server)),
            None,
            "a later entry without a filter logs everything"
        );
    }

    #[test]
    fn tag_overrides_merge_by_label_and_metrics_share_them() {
        let mesh = compile(
            "trellis-system",
            "m",
            0,
            "metrics: [{overrides: [{tagOverrides: {request_protocol: {operation: REMOVE}, \
             tenant: {value: \"request.headers['x-tenant']\"}}}]}]",
        );
        let web = compile(
            "shop",
            "web",
            0,
            "selector: {matchLabels: {app: web}}\nmetrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, \
             tagOverrides: {tenant: {operation: REMOVE}, route: {value: request.url_path}}}]}]",
        );
        let all = Telemetries::new("trellis-system", vec![mesh, web]);
        let server = all.reporting(&pod("shop", "web"), Side::Server);
        let count = server.relabels.of(MetricName::RequestCount).expect("count");
        assert_eq!(
            count.keys().collect::<Vec<_>>(),
            ["request_protocol", "route", "tenant"]
        );
        assert_eq!(
            count["tenant"],
            LabelOp::Remove,
            "the workload's over the mesh's"
        );
        let duration = server
            .relabels
            .of(MetricName::RequestDuration)
            .expect("duration");
        assert!(matches!(duration["tenant"], LabelOp::Upsert(_)));
        // The metrics with the mesh's changes alone share one set.
        let tcp = server
            .relabels
            .of(MetricName::TcpOpenedConnections)
            .expect("tcp");
        assert!(Arc::ptr_eq(duration, tcp));
        assert!(!Arc::ptr_eq(duration, count));
        assert_eq!(server.headers, [http::HeaderName::from_static("x-tenant")]);
        let client = all.reporting(&pod("shop", "web"), Side::Client);
        assert!(matches!(
            client.relabels.of(MetricName::RequestCount).expect("count")["tenant"],
            LabelOp::Upsert(_)
        ));
        let shown = serde_json::to_value(&*server).expect("json");
        assert_eq!(shown["relabels"]["REQUEST_COUNT"]["tenant"], "REMOVE");
        assert_eq!(
            shown["relabels"]["REQUEST_DURATION"]["tenant"]["UPSERT"],
            "request.headers['x-tenant']"
        );
    }

    #[test]
    fn environment_tags_are_read_when_compiled() {
        // PATH is set wherever the tests run; the other is not.
        let p = compile(
            "shop",
            "env",
            0,
            "tracing:\n- customTags:\n    path: {environment: {name: PATH}}\n    gone: {environment: {name: TRELLIS_TEST_UNSET_VARIABLE}}\n    dflt: {environment: {name: TRELLIS_TEST_UNSET_VARIABLE, defaultValue: d}}",
        );
        let r =
            Telemetries::new("trellis-system", vec![p]).reporting(&pod("shop", "w"), Side::Client);
        let names: Vec<&str> = r.tags.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["dflt", "path"],
            "an unset one without a default is left out"
        );
        assert_eq!(r.tags[0].1, Tag::Value("d".into()));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |yaml: &str| {
            let spec: TelemetrySpec = serde_yaml_ng::from_str(yaml).expect(yaml);
            validate(&spec).expect_err("invalid")
        };
        let (field, reason) = bad("tracing: [{randomSamplingPercentage: 101}]");
        assert_eq!(field, "spec.tracing[0].randomSamplingPercentage");
        assert!(reason.contains("percentage"), "{reason}");
        let (field, reason) =
            bad("tracing: [{customTags: {t: {literal: {value: a}, header: {name: x}}}}]");
        assert_eq!(field, "spec.tracing[0].customTags.t");
        assert!(reason.contains("exactly one"), "{reason}");
        let (field, _) = bad("tracing: [{customTags: {t: {header: {name: 'a b'}}}}]");
        assert_eq!(field, "spec.tracing[0].customTags.t.header.name");
        let (field, reason) =
            bad("accessLogging: [{}, {filter: {expression: 'response.status >= 400'}}]");
        assert_eq!(field, "spec.accessLogging[1].filter.expression");
        assert!(reason.contains("unknown attribute"), "{reason}");
        let (field, reason) =
            bad("metrics: [{overrides: [{tagOverrides: {request-host: {value: request.host}}}]}]");
        assert_eq!(
            field,
            "spec.metrics[0].overrides[0].tagOverrides.request-host"
        );
        assert!(reason.contains("label name"), "{reason}");
        let (_, reason) =
            bad("metrics: [{overrides: [{tagOverrides: {__name__: {operation: REMOVE}}}]}]");
        assert!(reason.contains("label name"), "{reason}");
        let (field, reason) = bad("metrics: [{}, {overrides: [{}, {tagOverrides: {host: {}}}]}]");
        assert_eq!(field, "spec.metrics[1].overrides[1].tagOverrides.host");
        assert!(reason.contains("needs a value"), "{reason}");
        let (field, reason) =
            bad("metrics: [{overrides: [{tagOverrides: {host: {value: 'request.hots'}}}]}]");
        assert_eq!(
            field,
            "spec.metrics[0].overrides[0].tagOverrides.host.value"
        );
        assert!(reason.contains("unknown attribute"), "{reason}");
        let (field, _) = bad("accessLogging: [{providers: [{name: ''}]}]");
        assert_eq!(field, "spec.accessLogging.providers");
        for unknown in [
            "metrics: [{overrides: [{match: {metric: REQUEST_COUNTS}}]}]",
            "accessLogging: [{match: {mode: BOTH}}]",
            "tracing: [{sampling: 3}]",
        ] {
            assert!(
                serde_yaml_ng::from_str::<TelemetrySpec>(unknown).is_err(),
                "{unknown}"
            );
        }
    }
}
