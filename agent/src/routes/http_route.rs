//! `HTTPRoute` (`gateway.networking.k8s.io/v1`) as written, the subset a mesh
//! (GAMMA) uses, and its validation. Fields the Gateway API has but the agent
//! does not honour are kept (not rejected) and reported in the route's status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::resilience::policy::Retry;

/// The object as written in the config folder or the API server.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Ignored for mesh routes, as GAMMA says.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// The mesh service it names: a Service (GAMMA: group `""` or `core`,
    /// kind `Service`) or a ServiceEntry; `None` for a Gateway.
    pub fn service_kind(&self) -> Option<ServiceKind> {
        match (self.group.as_deref(), self.kind.as_deref()) {
            (Some("" | "core"), Some("Service")) => Some(ServiceKind::Service),
            (Some(group), Some("ServiceEntry")) if ENTRY_GROUPS.contains(&group) => {
                Some(ServiceKind::Entry)
            }
            _ => None,
        }
    }
}

/// The groups a reference to a ServiceEntry may name: Trellis's own, or
/// Istio's, so routes written for Istio attach as they are.
pub const ENTRY_GROUPS: &[&str] = &["trellis.dev", "networking.istio.io"];

/// Which of the mesh's services a reference names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    Service,
    Entry,
}

impl BackendRef {
    /// The mesh service it names (a Service when kind and group are
    /// left out); `None` for a kind this agent cannot send to.
    pub fn service_kind(&self) -> Option<ServiceKind> {
        match (self.group.as_deref(), self.kind.as_deref()) {
            (None | Some("" | "core"), None | Some("Service")) => Some(ServiceKind::Service),
            (Some(group), Some("ServiceEntry")) if ENTRY_GROUPS.contains(&group) => {
                Some(ServiceKind::Entry)
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Any one matching is enough; none means `PathPrefix /`.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// GEP-1731 (experimental channel).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
    /// GEP-1619 (experimental channel).
    #[serde(default)]
    pub session_persistence: Option<super::session::SessionPersistence>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default = "path_prefix", rename = "type")]
    pub kind: PathMatchKind,
    #[serde(default = "slash")]
    pub value: String,
}

fn path_prefix() -> PathMatchKind {
    PathMatchKind::PathPrefix
}

fn slash() -> String {
    "/".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathMatchKind {
    Exact,
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(default = "exact", rename = "type")]
    pub kind: ValueMatchKind,
    pub name: String,
    pub value: String,
}

fn exact() -> ValueMatchKind {
    ValueMatchKind::Exact
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchKind {
    Exact,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
    /// GEP-1767 (experimental channel).
    #[serde(default)]
    pub cors: Option<super::cors::CorsFilter>,
    /// GEP-1494 (experimental channel).
    #[serde(default)]
    pub external_auth: Option<ExternalAuth>,
}

/// An authorization service asked about each request before it goes on
/// (`type: ExternalAuth`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAuth {
    /// `HTTP` or `GRPC`.
    pub protocol: String,
    pub backend_ref: BackendRef,
    #[serde(default)]
    pub http: Option<ExternalAuthHttp>,
    #[serde(default)]
    pub grpc: Option<ExternalAuthGrpc>,
    #[serde(default)]
    pub forward_body: Option<ForwardBody>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAuthHttp {
    /// Put before the request's path in the check.
    #[serde(default)]
    pub path: Option<String>,
    /// Request headers the check carries besides those it always does.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// The check's answer headers put on the request; all when empty.
    #[serde(default)]
    pub allowed_response_headers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAuthGrpc {
    #[serde(default)]
    pub allowed_headers: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardBody {
    #[serde(default)]
    pub max_size: u16,
}

/// The agent answers with a redirect; absent parts keep the request's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    /// 302 when absent.
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// The request is forwarded with another host and/or path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierKind,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathModifierKind {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// A copy of each request (or of `percent` / `fraction` of them) goes to
/// another Service; its answer is dropped.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Share of requests against the rule's other backends; 1 when absent.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Applied only to requests sent to this backend: header modifiers
    /// (see [`SUPPORTED_BACKEND_FILTERS`]).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// A rule's own retries (GEP-1731): on the listed statuses, on a failed
/// connect or a refused stream, and on an attempt that outlives
/// `timeouts.backendRequest`; not on a reset after the request went out,
/// which the GEP leaves off by default as unsafe for non-idempotent
/// requests. Envoy's backoff curve (full jitter, capped at 10 × `backoff`)
/// and the default retry budget (TrafficPolicy's) apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<i64>,
    /// Retries after the first attempt; 2 when absent (Istio's default), 0
    /// for none.
    #[serde(default)]
    pub attempts: Option<i64>,
    /// The base interval; 25 ms when absent (Envoy's).
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Retries a rule gets from a `retry` stanza without `attempts`.
pub const DEFAULT_ROUTE_RETRIES: u32 = 2;

/// The most retries a rule may ask for (as a TrafficPolicy).
const MAX_ROUTE_RETRIES: i64 = 10;

impl HttpRouteRetry {
    /// The retry policy the proxy applies; `(field under retry, reason)`
    /// when the stanza cannot be honoured.
    pub fn compile(&self) -> Result<Retry, (String, String)> {
        let attempts = match self.attempts {
            None => DEFAULT_ROUTE_RETRIES,
            Some(n @ 0..=MAX_ROUTE_RETRIES) => n as u32,
            Some(n) => {
                return Err((
                    "attempts".into(),
                    format!("{n} is not between 0 and {MAX_ROUTE_RETRIES}"),
                ));
            }
        };
        let mut statuses = Vec::with_capacity(self.codes.len());
        for (i, code) in self.codes.iter().enumerate() {
            match u16::try_from(*code) {
                Ok(c @ 400..=599) => statuses.push(c),
                _ => {
                    return Err((
                        format!("codes[{i}]"),
                        format!("{code} is not an HTTP status from 400 to 599"),
                    ));
                }
            }
        }
        let mut retry = Retry {
            attempts,
            on_5xx: false,
            on_gateway_error: false,
            on_reset: false,
            on_connect_failure: true,
            on_refused_stream: true,
            on_timeout: true,
            statuses,
            ..Retry::default()
        };
        if let Some(b) = &self.backoff {
            let base = parse_duration(b).map_err(|e| ("backoff".to_owned(), e))?;
            if !base.is_zero() {
                retry.base_interval = base;
                retry.max_interval = base.saturating_mul(10);
            }
        }
        Ok(retry)
    }
}

/// Filters this agent applies; the others (`ExtensionRef`) leave the route
/// `Accepted=False`.
pub const SUPPORTED_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
    "CORS",
    "ExternalAuth",
];

/// Filters this agent applies on a backend reference (Istio's set); a
/// route with others there is `Accepted=False`.
pub const SUPPORTED_BACKEND_FILTERS: &[&str] = &["RequestHeaderModifier", "ResponseHeaderModifier"];

/// The Gateway API's cap on a backend weight.
const MAX_WEIGHT: u32 = 1_000_000;

/// Checks the object on its own; `(field, reason)` of the first problem.
pub fn validate(route: &HttpRoute) -> Result<(), (String, String)> {
    let spec = &route.spec;
    if spec.parent_refs.is_empty() {
        return Err(("spec.parentRefs".into(), "at least one is required".into()));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{j}]");
            if let Some(path) = &m.path {
                match path.kind {
                    PathMatchKind::Exact | PathMatchKind::PathPrefix
                        if !path.value.starts_with('/') =>
                    {
                        return Err((format!("{at}.path.value"), "must start with '/'".into()));
                    }
                    PathMatchKind::RegularExpression => {
                        regex::Regex::new(&path.value)
                            .map_err(|e| (format!("{at}.path.value"), e.to_string()))?;
                    }
                    _ => {}
                }
            }
            validate_value_matches(&at, "headers", &m.headers)?;
            validate_value_matches(&at, "queryParams", &m.query_params)?;
            if let Some(method) = &m.method
                && http::Method::from_bytes(method.as_bytes()).is_err()
            {
                return Err((format!("{at}.method"), "not an HTTP method".into()));
            }
        }
        validate_filters(&at, &rule.filters)?;
        // ReplacePrefixMatch replaces what a PathPrefix match matched.
        let prefix_only = rule.matches.iter().all(|m| {
            m.path
                .as_ref()
                .is_none_or(|p| p.kind == PathMatchKind::PathPrefix)
        });
        for (j, f) in rule.filters.iter().enumerate() {
            let path = f
                .request_redirect
                .as_ref()
                .and_then(|r| r.path.as_ref())
                .map(|p| ("requestRedirect", p))
                .or_else(|| {
                    f.url_rewrite
                        .as_ref()
                        .and_then(|r| r.path.as_ref())
                        .map(|p| ("urlRewrite", p))
                });
            if let Some((name, p)) = path
                && p.kind == PathModifierKind::ReplacePrefixMatch
                && !prefix_only
            {
                return Err((
                    format!("{at}.filters[{j}].{name}.path"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
                ));
            }
        }
        validate_backends(&at, &rule.backend_refs)?;
        validate_session(&at, rule.session_persistence.as_ref())?;
        if let Some(t) = &rule.timeouts {
            let parse = |name: &str, v: &Option<String>| {
                v.as_deref()
                    .map(|v| parse_duration(v).map_err(|e| (format!("{at}.timeouts.{name}"), e)))
                    .transpose()
            };
            let request = parse("request", &t.request)?;
            let backend = parse("backendRequest", &t.backend_request)?;
            // GEP-1742: a try cannot be given longer than the whole request.
            if let (Some(request), Some(backend)) = (request, backend)
                && !request.is_zero()
                && backend > request
            {
                return Err((
                    format!("{at}.timeouts.backendRequest"),
                    "longer than timeouts.request".into(),
                ));
            }
        }
        if let Some(r) = &rule.retry {
            r.compile()
                .map_err(|(field, why)| (format!("{at}.retry.{field}"), why))?;
        }
    }
    Ok(())
}

/// Header or query parameter matches at `at.field`.
pub fn validate_value_matches(
    at: &str,
    field: &str,
    list: &[ValueMatch],
) -> Result<(), (String, String)> {
    for (k, v) in list.iter().enumerate() {
        let at = format!("{at}.{field}[{k}]");
        if v.name.is_empty() {
            return Err((format!("{at}.name"), "required".into()));
        }
        if field == "headers" && http::HeaderName::try_from(&v.name).is_err() {
            return Err((format!("{at}.name"), "not a valid header name".into()));
        }
        if v.kind == ValueMatchKind::RegularExpression {
            regex::Regex::new(&v.value).map_err(|e| (format!("{at}.value"), e.to_string()))?;
        }
    }
    Ok(())
}

/// A rule's filters (the same for `HTTPRoute` and `GRPCRoute`).
pub fn validate_filters(at: &str, filters: &[HttpRouteFilter]) -> Result<(), (String, String)> {
    let count = |kind: &str| filters.iter().filter(|f| f.kind == kind).count();
    if count("RequestRedirect") > 0 && count("URLRewrite") > 0 {
        return Err((
            format!("{at}.filters"),
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    for kind in [
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "CORS",
    ] {
        if count(kind) > 1 {
            return Err((format!("{at}.filters"), format!("{kind} at most once")));
        }
    }
    for (j, f) in filters.iter().enumerate() {
        let at = format!("{at}.filters[{j}]");
        let missing = |name: &str| {
            Err((
                format!("{at}.{name}"),
                format!("required by type {}", f.kind),
            ))
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" if f.request_header_modifier.is_none() => {
                return missing("requestHeaderModifier");
            }
            "ResponseHeaderModifier" if f.response_header_modifier.is_none() => {
                return missing("responseHeaderModifier");
            }
            "RequestRedirect" if f.request_redirect.is_none() => {
                return missing("requestRedirect");
            }
            "URLRewrite" if f.url_rewrite.is_none() => return missing("urlRewrite"),
            "RequestMirror" if f.request_mirror.is_none() => return missing("requestMirror"),
            "CORS" if f.cors.is_none() => return missing("cors"),
            "ExternalAuth" if f.external_auth.is_none() => return missing("externalAuth"),
            _ => {}
        }
        for (name, m) in [
            ("requestHeaderModifier", &f.request_header_modifier),
            ("responseHeaderModifier", &f.response_header_modifier),
        ] {
            let Some(m) = m else { continue };
            for (list, values) in [("set", &m.set), ("add", &m.add)] {
                for (k, h) in values.iter().enumerate() {
                    if http::HeaderName::try_from(&h.name).is_err() {
                        return Err((
                            format!("{at}.{name}.{list}[{k}].name"),
                            "not a valid header name".into(),
                        ));
                    }
                    if http::HeaderValue::try_from(&h.value).is_err() {
                        return Err((
                            format!("{at}.{name}.{list}[{k}].value"),
                            "not a valid header value".into(),
                        ));
                    }
                }
            }
            for (k, h) in m.remove.iter().enumerate() {
                if http::HeaderName::try_from(h).is_err() {
                    return Err((
                        format!("{at}.{name}.remove[{k}]"),
                        "not a valid header name".into(),
                    ));
                }
            }
        }
        let hostname = |name: &str, h: &Option<String>| match h {
            Some(h)
                if h.is_empty()
                    || http::uri::Authority::try_from(h.as_str()).is_err()
                    || h.contains(':') =>
            {
                Err((
                    format!("{at}.{name}.hostname"),
                    format!("{h:?} is not a hostname"),
                ))
            }
            _ => Ok(()),
        };
        if let Some(r) = &f.request_redirect {
            if let Some(scheme) = &r.scheme
                && !matches!(scheme.as_str(), "http" | "https")
            {
                return Err((
                    format!("{at}.requestRedirect.scheme"),
                    "http or https".into(),
                ));
            }
            if let Some(code) = r.status_code
                && !matches!(code, 301 | 302 | 303 | 307 | 308)
            {
                return Err((
                    format!("{at}.requestRedirect.statusCode"),
                    "301, 302, 303, 307 or 308".into(),
                ));
            }
            if r.port == Some(0) {
                return Err((format!("{at}.requestRedirect.port"), "1-65535".into()));
            }
            hostname("requestRedirect", &r.hostname)?;
            if let Some(p) = &r.path {
                validate_path_modifier(&format!("{at}.requestRedirect.path"), p)?;
            }
        }
        if let Some(r) = &f.url_rewrite {
            hostname("urlRewrite", &r.hostname)?;
            if let Some(p) = &r.path {
                validate_path_modifier(&format!("{at}.urlRewrite.path"), p)?;
            }
        }
        if let Some(e) = &f.external_auth {
            let at = format!("{at}.externalAuth");
            if !matches!(e.protocol.as_str(), "HTTP" | "GRPC") {
                return Err((format!("{at}.protocol"), "HTTP or GRPC".into()));
            }
            // The API's rules: `http` with HTTP and only then, `grpc` likewise.
            for (name, wanted, set) in [
                ("http", "HTTP", e.http.is_some()),
                ("grpc", "GRPC", e.grpc.is_some()),
            ] {
                if (e.protocol == wanted) != set {
                    let why = if set {
                        "only with protocol "
                    } else {
                        "required by protocol "
                    };
                    return Err((format!("{at}.{name}"), format!("{why}{wanted}")));
                }
            }
            validate_backends(&at, std::slice::from_ref(&e.backend_ref)).map_err(
                |(field, reason)| (field.replace(".backendRefs[0]", ".backendRef"), reason),
            )?;
            if let Some(h) = &e.http {
                if let Some(p) = &h.path
                    && (!p.starts_with('/')
                        || p.contains(['?', '#'])
                        || http::uri::PathAndQuery::try_from(p.as_str()).is_err())
                {
                    return Err((
                        format!("{at}.http.path"),
                        format!("{p:?} is not a path starting with '/'"),
                    ));
                }
                for (list, names) in [
                    ("allowedHeaders", &h.allowed_headers),
                    ("allowedResponseHeaders", &h.allowed_response_headers),
                ] {
                    for (k, n) in names.iter().enumerate() {
                        if http::HeaderName::try_from(n.as_str()).is_err() {
                            return Err((
                                format!("{at}.http.{list}[{k}]"),
                                "not a valid header name".into(),
                            ));
                        }
                    }
                }
            }
        }
        if let Some(c) = &f.cors {
            c.compile()
                .map_err(|(field, reason)| (format!("{at}.cors.{field}"), reason))?;
        }
        if let Some(m) = &f.request_mirror {
            validate_backends(
                &format!("{at}.requestMirror"),
                std::slice::from_ref(&m.backend_ref),
            )
            .map_err(|(field, reason)| (field.replace(".backendRefs[0]", ".backendRef"), reason))?;
            if m.percent.is_some_and(|p| p > 100) {
                return Err((format!("{at}.requestMirror.percent"), "0-100".into()));
            }
            if let Some(f) = m.fraction
                && (f.denominator == 0 || f.numerator > f.denominator)
            {
                return Err((
                    format!("{at}.requestMirror.fraction"),
                    "numerator ≤ denominator, denominator > 0".into(),
                ));
            }
            if m.percent.is_some() && m.fraction.is_some() {
                return Err((
                    format!("{at}.requestMirror"),
                    "percent or fraction, not both".into(),
                ));
            }
        }
    }
    Ok(())
}

fn validate_path_modifier(at: &str, p: &PathModifier) -> Result<(), (String, String)> {
    let (name, value) = match p.kind {
        PathModifierKind::ReplaceFullPath => ("replaceFullPath", &p.replace_full_path),
        PathModifierKind::ReplacePrefixMatch => ("replacePrefixMatch", &p.replace_prefix_match),
    };
    match value {
        None => Err((
            format!("{at}.{name}"),
            format!("required by type {:?}", p.kind),
        )),
        // An empty prefix strips the matched one: the API's own table has
        // "/foo/bar" with prefix "/foo" and "" becoming "/bar".
        Some(v) if v.is_empty() && p.kind == PathModifierKind::ReplacePrefixMatch => Ok(()),
        Some(v)
            if !v.starts_with('/')
                || http::uri::PathAndQuery::try_from(v.as_str()).is_err()
                || v.contains('?') =>
        {
            Err((
                format!("{at}.{name}"),
                format!("{v:?} is not a path starting with '/'"),
            ))
        }
        Some(_) => Ok(()),
    }
}

/// A rule's `sessionPersistence`.
pub fn validate_session(
    at: &str,
    session: Option<&super::session::SessionPersistence>,
) -> Result<(), (String, String)> {
    match session.map(super::session::SessionPersistence::compile) {
        Some(Err((field, reason))) => Err((format!("{at}.sessionPersistence.{field}"), reason)),
        _ => Ok(()),
    }
}

/// A rule's backends.
pub fn validate_backends(at: &str, backends: &[BackendRef]) -> Result<(), (String, String)> {
    for (j, b) in backends.iter().enumerate() {
        let at = format!("{at}.backendRefs[{j}]");
        if b.weight.is_some_and(|w| w > MAX_WEIGHT) {
            return Err((format!("{at}.weight"), format!("at most {MAX_WEIGHT}")));
        }
        if b.service_kind().is_some() && b.port.is_none() {
            return Err((
                format!("{at}.port"),
                "required for a Service or ServiceEntry backend".into(),
            ));
        }
        validate_filters(&at, &b.filters)?;
    }
    Ok(())
}

/// A Gateway API duration (GEP-2257): one to four parts, each one to five
/// digits and a unit (`1h`, `10s`, `500ms`, `1m30s`); `0s` means none. The
/// limits are the API server's (the CRD pattern `crds::schema::DURATION`);
/// files skip that check, and without them a value could overflow the
/// sum, or a deadline taken from it (a panic in the state thread or on a
/// request). The largest is about 45 years.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 10s, 500ms or 1m30s");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        parts += 1;
        if parts > 4 {
            return Err(format!("{text:?} has more than 4 parts"));
        }
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        if digits > 5 {
            return Err(format!("{text:?}: at most 5 digits before a unit"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = ["ms", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        total += match unit {
            "h" => std::time::Duration::from_secs(n * 3600),
            "m" => std::time::Duration::from_secs(n * 60),
            "s" => std::time::Duration::from_secs(n),
            _ => std::time::Duration::from_millis(n),
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(
            parse_duration("99999h1m1s1ms").unwrap().as_secs(),
            359_996_461
        );
        // Past the API's limits: files are not checked by the API server,
        // and these overflowed a sum or a deadline.
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "10x",
            "-1s",
            "100000h",
            "99999999999999999h",
            "2562047788015216h",
            "18446744073709551615s1s",
            "1s1s1s1s1s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // The largest is a deadline that can be taken.
        let most = parse_duration("99999h99999h99999h99999h").unwrap();
        let _ = tokio::time::Instant::now() + most;
    }

    fn rule(yaml: &str) -> Result<(), (String, String)> {
        let route: HttpRoute = serde_yaml_ng::from_str(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: r, namespace: shop}}\n\
             spec: {{parentRefs: [{{kind: Service, name: web}}], rules: [{yaml}]}}"
        ))
        .expect("yaml");
        validate(&route)
    }

    #[test]
    fn a_rule_retry_compiles_as_gep_1731_says() {
        let retry: HttpRouteRetry =
            serde_yaml_ng::from_str("{codes: [500, 503], attempts: 3, backoff: 100ms}").unwrap();
        let r = retry.compile().unwrap();
        assert_eq!(r.attempts, 3);
        assert_eq!(r.statuses, [500, 503]);
        assert_eq!(r.base_interval, std::time::Duration::from_millis(100));
        assert_eq!(r.max_interval, std::time::Duration::from_secs(1));
        // Connect failures and per-try timeouts, not resets after sending
        // nor statuses not listed.
        use crate::resilience::retry::{Attempt, retriable};
        assert!(retriable(&r, Attempt::ConnectFailure));
        assert!(retriable(&r, Attempt::Timeout));
        assert!(retriable(&r, Attempt::Response(503, None)));
        assert!(!retriable(&r, Attempt::Response(502, None)));
        assert!(!retriable(&r, Attempt::Reset));
        // Defaults: 2 retries, Envoy's backoff.
        let r = HttpRouteRetry::default().compile().unwrap();
        assert_eq!((r.attempts, r.base_interval.as_millis()), (2, 25));
        let off: HttpRouteRetry = serde_yaml_ng::from_str("{attempts: 0}").unwrap();
        assert_eq!(off.compile().unwrap().attempts, 0);

        assert!(rule("{retry: {codes: [503], attempts: 2, backoff: 5ms}}").is_ok());
        for (yaml, field) in [
            ("{retry: {attempts: -1}}", "spec.rules[0].retry.attempts"),
            ("{retry: {attempts: 11}}", "spec.rules[0].retry.attempts"),
            ("{retry: {codes: [200]}}", "spec.rules[0].retry.codes[0]"),
            (
                "{retry: {codes: [503, 600]}}",
                "spec.rules[0].retry.codes[1]",
            ),
            ("{retry: {backoff: 1.5s}}", "spec.rules[0].retry.backoff"),
            (
                "{timeouts: {request: 1s, backendRequest: 2s}}",
                "spec.rules[0].timeouts.backendRequest",
            ),
        ] {
            assert_eq!(rule(yaml).map_err(|e| e.0), Err(field.to_owned()), "{yaml}");
        }
        // A zero request timeout means none: any try limit fits.
        assert!(rule("{timeouts: {request: 0s, backendRequest: 2s}}").is_ok());
    }
}
