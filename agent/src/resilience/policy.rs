//! `TrafficPolicy` (`trellis.dev/v1alpha1`; its CRD is generated from these
//! types, see [`crate::crds`]): how the agent sends requests to a
//! Service, whether a client called it or a route picked it: load balancing,
//! retries and their budget, circuit breaking, outlier detection, active
//! health checks, local rate limiting and fault injection. Validated here
//! and compiled to [`Resilience`], the form the L7 proxy reads.

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    crds::schema::DURATION,
    routes::http_route::{ENTRY_GROUPS, parse_duration},
};

/// How node agents send HTTP and gRPC requests to a Service (whether a
/// client called it or a route picked it): load balancing, retries with a
/// budget, circuit breaking, outlier detection, active health checks,
/// local rate limiting and fault injection. Limits and counts are each
/// agent's own, as Envoy's are per proxy. Durations are Gateway API
/// durations (`500ms`, `2s`, `1m`, `1h`).
// The derive makes the object as written in the config folder or the API
// server, and its CRD.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[expect(
    clippy::duplicated_attributes,
    reason = "two print columns are both of type string"
)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    doc = "Trellis TrafficPolicy: how node agents send requests to a Service.",
    namespaced,
    shortname = "ttp",
    derive = "PartialEq",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.targetRefs[0].name"
    ),
    printcolumn(name = "LB", type_ = "string", json_path = ".spec.loadBalancer.type"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// Services of the policy's namespace, or HTTPRoutes / GRPCRoutes (the
    /// requests a route sends, with their own breaker and endpoint
    /// records; a route's policy wins over its backends' Service policies;
    /// no healthCheck). Two policies on one target: the older applies.
    #[schemars(length(min = 1))]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub fault: Option<FaultSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `""` (core, for a Service), `gateway.networking.k8s.io` (routes),
    /// or `trellis.dev` or `networking.istio.io` (a ServiceEntry).
    #[serde(default)]
    #[schemars(extend("enum" = ["", "gateway.networking.k8s.io", "trellis.dev", "networking.istio.io"]))]
    pub group: Option<String>,
    #[schemars(extend("enum" = ["Service", "ServiceEntry", "HTTPRoute", "GRPCRoute"]))]
    pub kind: String,
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum Algorithm {
    #[default]
    RoundRobin,
    /// Power of two choices on requests in flight.
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default, rename = "type")]
    pub algorithm: Algorithm,
    /// What the consistent hash of `RingHash` and `Maglev` is taken over.
    #[serde(default)]
    pub hash: Option<HashSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashSpec {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<CookieSpec>,
    #[serde(default, rename = "sourceIP")]
    pub source_ip: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieSpec {
    #[schemars(length(min = 1))]
    pub name: String,
    /// With a ttl, a client without the cookie gets one (`Set-Cookie`).
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub ttl: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Retries after the first attempt.
    #[schemars(range(max = 10))]
    pub attempts: u32,
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub per_try_timeout: Option<String>,
    /// `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `refused-stream`, `retriable-status-codes`; default
    /// `connect-failure, refused-stream, reset, gateway-error`.
    #[serde(default)]
    #[schemars(schema_with = "retry_on_schema")]
    pub retry_on: Vec<String>,
    #[serde(default)]
    #[schemars(inner(range(min = 100, max = 599)))]
    pub retriable_status_codes: Vec<u16>,
    /// gRPC status names (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, ...) retried
    /// when a response carries one in its headers.
    #[serde(default)]
    pub retriable_grpc_codes: Vec<String>,
    #[serde(default)]
    pub backoff: Option<BackoffSpec>,
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffSpec {
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub base_interval: Option<String>,
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub max_interval: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    /// Retries in flight may be this share of the requests in flight.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// Retries in flight always allowed, however few requests there are.
    #[serde(default)]
    pub min_retry_concurrency: Option<u32>,
}

/// The L7 path's upstream connections to the Service's endpoints, as
/// Istio's `connectionPool.http`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    /// Requests a connection carries before it is closed (1: none is kept
    /// alive); unlimited when absent.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_requests_per_connection: Option<u32>,
    /// How long a connection may sit unused before it is closed, in place
    /// of the agent's `--idle-timeout` (a Gateway API duration).
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub consecutive_5xx: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub max_ejection_time: Option<String>,
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub interval: Option<String>,
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub timeout: Option<String>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub healthy_threshold: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub unhealthy_threshold: Option<u32>,
    /// An HTTP GET of this path, 2xx healthy; else a TCP connect.
    #[serde(default)]
    pub http: Option<HttpCheckSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheckSpec {
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Tokens added per `per`.
    #[schemars(range(min = 1))]
    pub requests: u32,
    #[serde(default)]
    #[schemars(pattern(DURATION))]
    pub per: Option<String>,
    /// Bucket size; `requests` when absent.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// One bucket per source identity instead of one for the Service.
    #[serde(default)]
    pub per_source: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(default)]
    pub delay: Option<DelaySpec>,
    #[serde(default)]
    pub abort: Option<AbortSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelaySpec {
    #[schemars(pattern(DURATION))]
    pub fixed_delay: String,
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortSpec {
    #[serde(default)]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    /// For gRPC requests; `UNAVAILABLE` when absent.
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

/// `retryOn` in the CRD: a list of [`RETRY_ON`].
fn retry_on_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "string", "enum": RETRY_ON},
    })
}

/// Conditions a retry can be made on.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-status-codes",
];

/// gRPC status codes by name, as the gRPC specification numbers them.
pub const GRPC_CODES: &[(&str, u8)] = &[
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

fn grpc_code(name: &str) -> Option<u8> {
    let name = name.to_ascii_uppercase().replace('-', "_");
    GRPC_CODES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

type Invalid = (String, String);

fn duration(field: &str, v: Option<&String>) -> Result<Option<Duration>, Invalid> {
    v.map(|v| parse_duration(v).map_err(|e| (field.to_owned(), e)))
        .transpose()
}

/// A percentage as parts per million (so that compiled policies compare
/// exactly).
fn percent(field: &str, v: f64) -> Result<u32, Invalid> {
    if !(0.0..=100.0).contains(&v) {
        return Err((field.into(), format!("{v} is not a percentage (0 to 100)")));
    }
    Ok((v * 10_000.0).round() as u32)
}

fn positive(field: &str, v: Option<u32>) -> Result<Option<u32>, Invalid> {
    match v {
        Some(0) => Err((field.into(), "must be at least 1".into())),
        v => Ok(v),
    }
}

/// Checks the object on its own; `(field, reason)` of the first problem.
pub fn validate(policy: &TrafficPolicy) -> Result<(), Invalid> {
    Resilience::compile(&policy.spec).map(drop)
}

/// How to pick an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub algorithm: Algorithm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashOn>,
}

/// What a consistent hash is taken over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashOn {
    Header(String),
    Cookie { name: String, ttl: Option<Duration> },
    SourceIp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_reset: bool,
    pub on_connect_failure: bool,
    /// A stream the backend refused unprocessed (REFUSED_STREAM, or past
    /// its GOAWAY), which is safe to send again whatever the method; also
    /// retried with `on_reset` or `on_5xx`, as Envoy.
    pub on_refused_stream: bool,
    /// An attempt that outlived its per-try timeout, whatever else is set
    /// (otherwise retried with `on_5xx` or `on_gateway_error`, as Envoy).
    pub on_timeout: bool,
    pub statuses: Vec<u16>,
    pub grpc_codes: Vec<u8>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// Parts per million of the requests in flight.
    pub budget_ppm: u32,
    pub min_retry_concurrency: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outlier {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    pub burst: u32,
    pub per_source: bool,
}

/// Shares are parts per million of requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    /// HTTP status, gRPC status, share of requests.
    pub abort: Option<(u16, u8, u32)>,
}

/// A policy, compiled: what the proxy applies to requests sent to a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resilience {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub balance: Balance,
    pub retry: Retry,
    pub limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Requests an upstream connection carries before it is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// How long an upstream connection may sit unused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

/// Envoy's retry budget defaults: 20 % of active requests, at least 3.
const DEFAULT_BUDGET_PPM: u32 = 200_000;
const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 3;

impl Default for Retry {
    /// No retries; the budget's defaults for when some are configured.
    fn default() -> Self {
        Self {
            attempts: 0,
            per_try_timeout: None,
            on_5xx: false,
            on_gateway_error: true,
            on_reset: true,
            on_connect_failure: true,
            on_refused_stream: true,
            on_timeout: false,
            statuses: Vec::new(),
            grpc_codes: Vec::new(),
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            budget_ppm: DEFAULT_BUDGET_PPM,
            min_retry_concurrency: DEFAULT_MIN_RETRY_CONCURRENCY,
        }
    }
}

impl Resilience {
    /// Compiles a spec; `(field, reason)` of the first problem.
    pub fn compile(spec: &TrafficPolicySpec) -> Result<Self, Invalid> {
        if spec.target_refs.is_empty() {
            return Err(("spec.targetRefs".into(), "at least one is required".into()));
        }
        for (i, t) in spec.target_refs.iter().enumerate() {
            let group = t.group.as_deref().unwrap_or("");
            let service = (t.kind == "Service" && group.is_empty())
                || (t.kind == "ServiceEntry" && ENTRY_GROUPS.contains(&group));
            let route = matches!(t.kind.as_str(), "HTTPRoute" | "GRPCRoute")
                && group == "gateway.networking.k8s.io";
            if !service && !route {
                return Err((
                    format!("spec.targetRefs[{i}]"),
                    format!(
                        "{group}/{}: targets are Services (group \"\"), ServiceEntries (group trellis.dev or networking.istio.io) and HTTPRoutes or GRPCRoutes (group gateway.networking.k8s.io)",
                        t.kind
                    ),
                ));
            }
            if t.name.is_empty() {
                return Err((format!("spec.targetRefs[{i}].name"), "required".into()));
            }
            if route && spec.health_check.is_some() {
                return Err((
                    "spec.healthCheck".into(),
                    "active health checks are per Service: target the Service, not a route".into(),
                ));
            }
        }
        let mut out = Self::default();
        if let Some(lb) = &spec.load_balancer {
            out.balance.algorithm = lb.algorithm;
            let hashed = matches!(lb.algorithm, Algorithm::RingHash | Algorithm::Maglev);
            out.balance.hash = match &lb.hash {
                None if hashed => {
                    return Err((
                        "spec.loadBalancer.hash".into(),
                        "RingHash and Maglev need a hash (header, cookie or sourceIP)".into(),
                    ));
                }
                None => None,
                Some(_) if !hashed => {
                    return Err((
                        "spec.loadBalancer.hash".into(),
                        "only RingHash and Maglev hash".into(),
                    ));
                }
                Some(h) => {
                    let set = [h.header.is_some(), h.cookie.is_some(), h.source_ip];
                    if set.iter().filter(|s| **s).count() != 1 {
                        return Err((
                            "spec.loadBalancer.hash".into(),
                            "exactly one of header, cookie, sourceIP".into(),
                        ));
                    }
                    Some(if let Some(name) = &h.header {
                        http::HeaderName::try_from(name.as_str()).map_err(|_| {
                            (
                                "spec.loadBalancer.hash.header".into(),
                                format!("{name:?} is not a header name"),
                            )
                        })?;
                        HashOn::Header(name.to_ascii_lowercase())
                    } else if let Some(c) = &h.cookie {
                        if c.name.is_empty()
                            || !c
                                .name
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                        {
                            return Err((
                                "spec.loadBalancer.hash.cookie.name".into(),
                                format!("{:?} is not a cookie name", c.name),
                            ));
                        }
                        HashOn::Cookie {
                            name: c.name.clone(),
                            ttl: duration("spec.loadBalancer.hash.cookie.ttl", c.ttl.as_ref())?,
                        }
                    } else {
                        HashOn::SourceIp
                    })
                }
            };
        }
        if let Some(r) = &spec.retry {
            let at = |f: &str| format!("spec.retry.{f}");
            if r.attempts > 10 {
                return Err((at("attempts"), format!("{} is more than 10", r.attempts)));
            }
            let retry = &mut out.retry;
            retry.attempts = r.attempts;
            retry.per_try_timeout = duration(&at("perTryTimeout"), r.per_try_timeout.as_ref())?;
            if !r.retry_on.is_empty() {
                retry.on_gateway_error = false;
                retry.on_reset = false;
                retry.on_connect_failure = false;
                retry.on_refused_stream = false;
            }
            for (i, on) in r.retry_on.iter().enumerate() {
                match on.as_str() {
                    "5xx" => retry.on_5xx = true,
                    "gateway-error" => retry.on_gateway_error = true,
                    "reset" => retry.on_reset = true,
                    "connect-failure" => retry.on_connect_failure = true,
                    "refused-stream" => retry.on_refused_stream = true,
                    "retriable-status-codes" => {}
                    other => {
                        return Err((
                            at(&format!("retryOn[{i}]")),
                            format!("{other:?} is not one of {}", RETRY_ON.join(", ")),
                        ));
                    }
                }
            }
            for (i, s) in r.retriable_status_codes.iter().enumerate() {
                if !(100..=599).contains(s) {
                    return Err((
                        at(&format!("retriableStatusCodes[{i}]")),
                        format!("{s} is not an HTTP status"),
                    ));
                }
            }
            retry.statuses = r.retriable_status_codes.clone();
            for (i, name) in r.retriable_grpc_codes.iter().enumerate() {
                retry.grpc_codes.push(grpc_code(name).ok_or_else(|| {
                    (
                        at(&format!("retriableGrpcCodes[{i}]")),
                        format!("{name:?} is not a gRPC status name"),
                    )
                })?);
            }
            if let Some(b) = &r.backoff {
                if let Some(d) = duration(&at("backoff.baseInterval"), b.base_interval.as_ref())? {
                    retry.base_interval = d;
                }
                if let Some(d) = duration(&at("backoff.maxInterval"), b.max_interval.as_ref())? {
                    retry.max_interval = d;
                }
                if retry.max_interval < retry.base_interval {
                    return Err((
                        at("backoff.maxInterval"),
                        "shorter than baseInterval".into(),
                    ));
                }
            }
            if let Some(b) = &r.budget {
                retry.budget_ppm = percent(&at("budget.percent"), b.percent)?;
                if let Some(m) = b.min_retry_concurrency {
                    retry.min_retry_concurrency = m;
                }
            }
        }
        if let Some(c) = &spec.circuit_breaker {
            let at = |f: &str| format!("spec.circuitBreaker.{f}");
            out.limits = Limits {
                max_connections: positive(&at("maxConnections"), c.max_connections)?,
                max_pending_requests: positive(&at("maxPendingRequests"), c.max_pending_requests)?,
                max_requests: positive(&at("maxRequests"), c.max_requests)?,
                max_retries: c.max_retries,
            };
        }
        if let Some(p) = &spec.connection_pool {
            out.max_requests_per_connection = positive(
                "spec.connectionPool.maxRequestsPerConnection",
                p.max_requests_per_connection,
            )?;
            out.idle_timeout =
                duration("spec.connectionPool.idleTimeout", p.idle_timeout.as_ref())?;
            if out
                .idle_timeout
                .is_some_and(|d| d < Duration::from_millis(100))
            {
                return Err((
                    "spec.connectionPool.idleTimeout".into(),
                    "shorter than 100ms".into(),
                ));
            }
        }
        if let Some(o) = &spec.outlier_detection {
            let at = |f: &str| format!("spec.outlierDetection.{f}");
            let base = duration(&at("baseEjectionTime"), o.base_ejection_time.as_ref())?
                .unwrap_or(Duration::from_secs(30));
            let max = duration(&at("maxEjectionTime"), o.max_ejection_time.as_ref())?
                .unwrap_or(Duration::from_secs(300))
                .max(base);
            let max_ejection_percent = o.max_ejection_percent.unwrap_or(10);
            if max_ejection_percent > 100 {
                return Err((at("maxEjectionPercent"), "a percentage: 0 to 100".into()));
            }
            let consecutive_5xx = positive(&at("consecutive5xx"), o.consecutive_5xx)?;
            let consecutive_gateway_errors = positive(
                &at("consecutiveGatewayErrors"),
                o.consecutive_gateway_errors,
            )?;
            out.outlier = Some(Outlier {
                consecutive_5xx: consecutive_5xx
                    .or(consecutive_gateway_errors.is_none().then_some(5)),
                consecutive_gateway_errors,
                base_ejection_time: base,
                max_ejection_time: max,
                max_ejection_percent,
            });
        }
        if let Some(h) = &spec.health_check {
            let at = |f: &str| format!("spec.healthCheck.{f}");
            let interval =
                duration(&at("interval"), h.interval.as_ref())?.unwrap_or(Duration::from_secs(5));
            if interval < Duration::from_millis(50) {
                return Err((at("interval"), "shorter than 50ms".into()));
            }
            if let Some(http) = &h.http
                && !http.path.starts_with('/')
            {
                return Err((
                    at("http.path"),
                    format!("{:?} does not start with /", http.path),
                ));
            }
            out.health = Some(HealthCheck {
                interval,
                timeout: duration(&at("timeout"), h.timeout.as_ref())?
                    .unwrap_or(Duration::from_secs(1))
                    .min(interval),
                healthy_threshold: positive(&at("healthyThreshold"), h.healthy_threshold)?
                    .unwrap_or(1),
                unhealthy_threshold: positive(&at("unhealthyThreshold"), h.unhealthy_threshold)?
                    .unwrap_or(2),
                http_path: h.http.as_ref().map(|h| h.path.clone()),
            });
        }
        if let Some(r) = &spec.rate_limit {
            let at = |f: &str| format!("spec.rateLimit.{f}");
            if r.requests == 0 {
                return Err((at("requests"), "must be at least 1".into()));
            }
            let fill = duration(&at("per"), r.per.as_ref())?.unwrap_or(Duration::from_secs(1));
            if fill.is_zero() {
                return Err((at("per"), "must be longer than 0".into()));
            }
            out.rate_limit = Some(RateLimit {
                tokens_per_fill: r.requests,
                fill_interval: fill,
                burst: positive(&at("burst"), r.burst)?.unwrap_or(r.requests),
                per_source: r.per_source,
            });
        }
        if let Some(f) = &spec.fault {
            let at = |f: &str| format!("spec.fault.{f}");
            let delay = f
                .delay
                .as_ref()
                .map(|d| {
                    Ok::<_, Invalid>((
                        parse_duration(&d.fixed_delay).map_err(|e| (at("delay.fixedDelay"), e))?,
                        percent(&at("delay.percent"), d.percent)?,
                    ))
                })
                .transpose()?;
            let abort = f
                .abort
                .as_ref()
                .map(|a| {
                    let status = a.http_status.unwrap_or(503);
                    if !(200..=599).contains(&status) {
                        return Err((
                            at("abort.httpStatus"),
                            format!("{status} is not an HTTP status"),
                        ));
                    }
                    let grpc = match &a.grpc_status {
                        None => 14,
                        Some(name) => grpc_code(name).ok_or_else(|| {
                            (
                                at("abort.grpcStatus"),
                                format!("{name:?} is not a gRPC status name"),
                            )
                        })?,
                    };
                    Ok((status, grpc, percent(&at("abort.percent"), a.percent)?))
                })
                .transpose()?;
            out.fault = Some(Fault { delay, abort });
        }
        Ok(out)
    }
}
