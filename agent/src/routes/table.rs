//! Routes compiled for the data path: per Service port, the rules that apply
//! to a client, in the Gateway API's precedence order, and the match of one
//! request against them.
//!
//! GAMMA attachment: a route whose parent is a Service applies to calls made
//! to that Service. A route in the Service's own namespace (a producer route)
//! applies to every client; one in another namespace (a consumer route)
//! applies only to clients in its namespace, and for them replaces the
//! producer routes. Once any route applies, a request no rule matches gets
//! 404.

use std::{borrow::Cow, cmp::Ordering, collections::BTreeMap, fmt, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Serialize, Serializer};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};

use super::{
    cors::Cors,
    grpc_route::{self, GrpcRoute},
    http_route::{
        BackendRef, HeaderModifier, HttpRoute, HttpRouteFilter, HttpRouteRetry, ParentRef,
        PathMatchKind, PathModifier, PathModifierKind, SUPPORTED_BACKEND_FILTERS,
        SUPPORTED_FILTERS, ServiceKind, Timeouts, ValueMatchKind, parse_duration,
    },
    reference_grant::{self, ReferenceGrant},
    session::{Session, SessionPersistence},
};
use crate::{resilience::policy::Retry, state::ServiceView};

/// Services by namespace and name, while routes are compiled.
type ServicesByName<'a> = std::collections::HashMap<(&'a str, &'a str), &'a ServiceView>;

/// A compiled regular expression, matched against the whole value as the
/// Gateway API asks.
#[derive(Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    fn new(text: &str) -> Option<Self> {
        regex::Regex::new(&format!("^(?:{text})$")).ok().map(Self)
    }

    fn matches(&self, value: &str) -> bool {
        self.0.is_match(value)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathRule {
    Exact(String),
    /// Element-wise: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(Pattern),
    /// A gRPC call, `/<service>/<method>`, each part a name without `/`
    /// that its rule (if any) must match.
    #[serde(rename_all = "camelCase")]
    GrpcMethod {
        #[serde(skip_serializing_if = "Option::is_none")]
        service: Option<ValueRule>,
        #[serde(skip_serializing_if = "Option::is_none")]
        method: Option<ValueRule>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum ValueRule {
    Exact(String),
    Regex(Pattern),
}

impl ValueRule {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(p) => p.matches(value),
        }
    }
}

/// One `matches[]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestMatch {
    pub path: PathRule,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, ValueRule)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<(String, ValueRule)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// What a request presents to the matcher.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathRule::Exact(p) => req.path == p,
            PathRule::Prefix(p) => prefix_matches(p, req.path),
            PathRule::Regex(r) => r.matches(req.path),
            PathRule::GrpcMethod { service, method } => {
                grpc_call(req.path).is_some_and(|(s, m)| {
                    service.as_ref().is_none_or(|rule| rule.matches(s))
                        && method.as_ref().is_none_or(|rule| rule.matches(m))
                })
            }
        };
        path_ok
            && self
                .method
                .as_deref()
                .is_none_or(|m| m == req.method.as_str())
            && self.headers.iter().all(|(name, rule)| {
                header_value(req.headers, name).is_some_and(|v| rule.matches(&v))
            })
            && self.query.iter().all(|(name, rule)| {
                crate::query::value(req.query, name).is_some_and(|v| rule.matches(&v))
            })
    }

    /// An `HTTPRoute` match's precedence: exact path, then the longest
    /// prefix, then a method, then more header, then more query matches.
    /// Regular expressions (implementation-specific) rank after exact paths
    /// and before prefixes, the longer pattern first.
    fn http_rank(&self) -> Rank {
        let (kind, len) = match &self.path {
            PathRule::Exact(p) => (0, p.len()),
            PathRule::Regex(r) => (1, r.0.as_str().len()),
            PathRule::Prefix(p) => (2, p.len()),
            // Only in a GRPCRoute, which ranks its own way.
            PathRule::GrpcMethod { .. } => (1, 0),
        };
        Rank([
            kind,
            usize::MAX - len,
            usize::from(self.method.is_none()),
            usize::MAX - self.headers.len(),
            usize::MAX - self.query.len(),
        ])
    }
}

/// Where a match stands among a port's, smaller first. `HTTPRoute` and
/// `GRPCRoute` rank differently, and never share a port's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank([usize; 5]);

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A `GRPCRoute` match's precedence: more characters in the service, then
/// in the method, then more header matches (a pattern counts as written).
fn grpc_rank(m: &grpc_route::GrpcRouteMatch, compiled: &RequestMatch) -> Rank {
    let chars = |part: Option<&String>| part.map_or(0, String::len);
    let method = m.method.as_ref();
    Rank([
        usize::MAX - chars(method.and_then(|m| m.service.as_ref())),
        usize::MAX - chars(method.and_then(|m| m.method.as_ref())),
        usize::MAX - compiled.headers.len(),
        0,
        0,
    ])
}

/// A header's value for matching: repeated fields joined with `,`, as
/// RFC 9110 (5.3) combines them and Envoy matches them. Borrowed in the
/// common case of one field.
fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first));
    };
    let mut joined = format!("{first},{}", second.to_str().ok()?);
    for v in values {
        joined.push(',');
        joined.push_str(v.to_str().ok()?);
    }
    Some(Cow::Owned(joined))
}

/// The service and method of a gRPC request path.
fn grpc_call(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Header changes of a `RequestHeaderModifier` or `ResponseHeaderModifier`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderEdits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    fn from_modifier(m: &HeaderModifier) -> Self {
        let pairs = |v: &[super::http_route::HeaderValue]| {
            v.iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect()
        };
        Self {
            set: pairs(&m.set),
            add: pairs(&m.add),
            remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits (validated when the route was read).
    pub fn apply(&self, headers: &mut HeaderMap) {
        let pair = |(n, v): &(String, String)| {
            Some((
                HeaderName::try_from(n.as_str()).ok()?,
                HeaderValue::try_from(v.as_str()).ok()?,
            ))
        };
        for (name, value) in self.set.iter().filter_map(pair) {
            headers.insert(name, value);
        }
        for (name, value) in self.add.iter().filter_map(pair) {
            headers.append(name, value);
        }
        for name in &self.remove {
            headers.remove(name.as_str());
        }
    }
}

/// One backend of a rule, resolved to a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedBackend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub port: u16,
    pub weight: u32,
    /// The reference's own filters, after the rule's.
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
}

/// A new path: the whole of it, or in place of the prefix a `PathPrefix`
/// match matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathEdit {
    Full(String),
    Prefix(String),
}

impl PathEdit {
    fn of(m: &PathModifier) -> Option<Self> {
        match m.kind {
            PathModifierKind::ReplaceFullPath => m.replace_full_path.clone().map(Self::Full),
            PathModifierKind::ReplacePrefixMatch => {
                m.replace_prefix_match.clone().map(Self::Prefix)
            }
        }
    }

    /// `path` edited; `matched` is the match the request took.
    pub fn apply(&self, matched: &PathRule, path: &str) -> String {
        match (self, matched) {
            (Self::Full(p), _) => p.clone(),
            (Self::Prefix(new), PathRule::Prefix(old)) => {
                let old = old.trim_end_matches('/');
                let rest = path.get(old.len()..).unwrap_or("");
                let joined = format!("{}{rest}", new.trim_end_matches('/'));
                if joined.is_empty() {
                    "/".into()
                } else {
                    joined
                }
            }
            // Validation allows a prefix edit only on prefix matches.
            (Self::Prefix(new), _) => new.clone(),
        }
    }
}

/// A `RequestRedirect`: the agent answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathEdit>,
    pub status: u16,
}

/// A `URLRewrite`, applied before the request is forwarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathEdit>,
}

/// A `RequestMirror`: where copies go, and the share of requests copied in
/// parts per million.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub service: String,
    pub port: u16,
    pub ppm: u32,
}

/// One rule of a route, as the proxy applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// `HTTPRoute` or `GRPCRoute`, `namespace/name` of its route, and its
    /// index there.
    pub kind: &'static str,
    pub route: String,
    pub index: usize,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
    /// Resolved backends; an empty list with `unresolved` set means every
    /// reference was invalid (requests get 500, as the API says).
    pub backends: Vec<WeightedBackend>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unresolved: bool,
    /// The weight of the invalid references: the share of requests the
    /// API says must get 500, as the backends they would have gone to.
    #[serde(skip_serializing_if = "is_zero")]
    pub unresolved_weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    /// Each attempt's limit (GEP-1742), `request_timeout` all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<Duration>,
    /// The rule's own `retry`: it wins over a TrafficPolicy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_auth: Option<ExternalAuth>,
}

/// An authorization service asked about each request (GEP-1494).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExternalAuth {
    pub protocol: AuthProtocol,
    /// `namespace/name` and port; `None` when the reference did not
    /// resolve (requests then fail closed).
    pub service: Option<(String, u16)>,
    /// Put before the request's path (HTTP).
    pub path_prefix: String,
    /// Request headers the check carries besides the ones it always does
    /// (lower case). Over gRPC an empty list means all of them, as the API
    /// says.
    pub allowed_headers: Vec<String>,
    /// The answer's headers put on the request; all but framing ones when
    /// empty (lower case; HTTP: over gRPC the answer names its headers).
    pub allowed_response_headers: Vec<String>,
    /// The most of the request's body the check carries (`forwardBody`);
    /// 0 for none.
    pub forward_body: usize,
    /// How long the service has to answer, body included.
    pub timeout: std::time::Duration,
    /// When the service cannot be asked, fails or answers 5xx, the request
    /// goes on unchanged (Istio's `failOpen`) instead of being refused.
    pub fail_open: bool,
    /// The status of a request refused because the check could not be
    /// made (Envoy's `status_on_error`).
    pub status_on_error: u16,
    /// Headers put on the check itself (HTTP; Istio's
    /// `includeAdditionalHeadersInCheck`), lower-case names.
    pub check_headers: Vec<(String, String)>,
    /// Headers of an allowing answer put on the client's answer (HTTP;
    /// none when empty).
    pub downstream_on_allow: Vec<String>,
    /// Headers of a denial passed on to the client (HTTP; all but framing
    /// ones when empty).
    pub downstream_on_deny: Vec<String>,
}

impl ExternalAuth {
    /// How long a service has by default (Envoy's default is 200 ms; this
    /// allows a remote node and a cold connection).
    pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
    /// Fails closed by default.
    pub const STATUS_ON_ERROR: u16 = 403;

    /// A service asked by `protocol` at `service`, with the defaults: no
    /// prefix, header lists or body, [`Self::TIMEOUT`], failing closed with
    /// [`Self::STATUS_ON_ERROR`].
    pub fn new(protocol: AuthProtocol, service: Option<(String, u16)>) -> Self {
        Self {
            protocol,
            service,
            path_prefix: String::new(),
            allowed_headers: Vec::new(),
            allowed_response_headers: Vec::new(),
            forward_body: 0,
            timeout: Self::TIMEOUT,
            fail_open: false,
            status_on_error: Self::STATUS_ON_ERROR,
            check_headers: Vec::new(),
            downstream_on_allow: Vec::new(),
            downstream_on_deny: Vec::new(),
        }
    }
}

/// How the authorization service is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthProtocol {
    /// The request's head itself (Envoy's HTTP `ext_authz` service).
    Http,
    /// `envoy.service.auth.v3.Authorization/Check`.
    Grpc,
}

/// A match and the rule it leads to, in precedence order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    #[serde(rename = "match")]
    pub request: RequestMatch,
    pub rule: Arc<Rule>,
    #[serde(skip)]
    rank: Rank,
    /// Tie-breaks after the rank: older route (one without a creation time
    /// first), then `namespace/name`, then rule and match index.
    #[serde(skip)]
    order: (Option<Timestamp>, String, usize, usize),
    /// From a `GRPCRoute`: it wins the port over `HTTPRoute`s.
    #[serde(skip)]
    grpc: bool,
}

/// The rules that apply to one Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortRoutes {
    /// From routes in the Service's namespace: for every client.
    pub producer: Vec<Entry>,
    /// From routes in other namespaces: for clients there only.
    pub consumer: BTreeMap<String, Vec<Entry>>,
}

impl PortRoutes {
    /// The entries for a client in `namespace`; `None` when no route
    /// applies to it (the Service routes as plain L4/L7 without rules).
    pub fn for_client(&self, namespace: &str) -> Option<&[Entry]> {
        if let Some(entries) = self.consumer.get(namespace) {
            return Some(entries);
        }
        (!self.producer.is_empty()).then_some(self.producer.as_slice())
    }
}

/// The first entry whose match the request satisfies.
pub fn route<'a>(entries: &'a [Entry], req: &RequestView<'_>) -> Option<&'a Entry> {
    entries.iter().find(|e| e.request.matches(req))
}

/// A status condition, as the Gateway API writes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A route's status for `trellis config` and the logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteStatus {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub conditions: Vec<Condition>,
}

impl RouteStatus {
    /// Whether every condition holds.
    pub fn healthy(&self) -> bool {
        self.conditions.iter().all(|c| c.status)
    }
}

/// Every Service port's routes, and each route's status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// By `namespace/name` of the Service, then port.
    pub services: BTreeMap<String, BTreeMap<u16, PortRoutes>>,
    pub status: Vec<RouteStatus>,
}

impl RouteTable {
    /// The routes attached to a Service port.
    pub fn port(&self, service: &str, port: u16) -> Option<&PortRoutes> {
        self.services.get(service)?.get(&port)
    }

    /// Compiles `routes` against the Services that exist.
    pub fn build(
        http_routes: &[&HttpRoute],
        grpc_routes: &[&GrpcRoute],
        grants: &[&ReferenceGrant],
        services: &[Arc<ServiceView>],
    ) -> Self {
        // By `namespace/name`, the first of a name winning (inserted last).
        let services: ServicesByName<'_> = services
            .iter()
            .rev()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), &**s))
            .collect();
        let mut table = Self::default();
        for route in http_routes {
            table.add(&Source::http(route), grants, &services);
        }
        for route in grpc_routes {
            table.add(&Source::grpc(route), grants, &services);
        }
        // A GRPCRoute wins a port (for the clients it applies to) over the
        // HTTPRoutes there, which report the conflict.
        let mut lost: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (service, ports) in &mut table.services {
            for (port, routes) in ports.iter_mut() {
                let lists =
                    std::iter::once(&mut routes.producer).chain(routes.consumer.values_mut());
                for entries in lists {
                    if entries.iter().any(|e| e.grpc) {
                        for e in entries.iter().filter(|e| !e.grpc) {
                            lost.entry(e.rule.route.clone())
                                .or_default()
                                .push(format!("{service}:{port}"));
                        }
                        entries.retain(|e| e.grpc);
                    }
                    entries.sort_by(precedence);
                }
            }
        }
        for status in &mut table.status {
            let id = format!("{}/{}", status.namespace, status.name);
            if let (Some(ports), "HTTPRoute") = (lost.get_mut(&id), status.kind) {
                ports.dedup();
                for c in status
                    .conditions
                    .iter_mut()
                    .filter(|c| c.kind == "Accepted")
                {
                    *c = Condition {
                        kind: "Accepted",
                        status: false,
                        reason: "Conflicted",
                        message: format!(
                            "a GRPCRoute takes {} for the same clients",
                            ports.join(", ")
                        ),
                    };
                }
            }
        }
        table
    }

    fn add(
        &mut self,
        route: &Source<'_>,
        grants: &[&ReferenceGrant],
        services: &ServicesByName<'_>,
    ) {
        let namespace = route.metadata.namespace.clone().unwrap_or_default();
        let name = route.metadata.name.clone().unwrap_or_default();
        let id = format!("{namespace}/{name}");
        let created = route.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let mut conditions = Vec::new();
        let find = |ns: &str, name: &str, kind: ServiceKind| {
            services
                .get(&(ns, name))
                .copied()
                .filter(|s| s.entry.is_some() == (kind == ServiceKind::Entry))
        };

        // Features this agent does not honour yet: the route is not
        // accepted rather than half applied.
        let unsupported: Vec<&str> = route
            .rules
            .iter()
            .flat_map(|r| r.filters)
            .map(|f| f.kind.as_str())
            .filter(|k| !SUPPORTED_FILTERS.contains(k))
            .collect();
        let unsupported_on_backends: Vec<&str> = route
            .rules
            .iter()
            .flat_map(|r| r.backend_refs)
            .flat_map(|b| &b.filters)
            .map(|f| f.kind.as_str())
            .filter(|k| !SUPPORTED_BACKEND_FILTERS.contains(k))
            .collect();
        if !unsupported.is_empty() || !unsupported_on_backends.is_empty() {
            let mut message = Vec::new();
            if !unsupported.is_empty() {
                message.push(format!(
                    "filters not supported yet: {}",
                    unsupported.join(", ")
                ));
            }
            if !unsupported_on_backends.is_empty() {
                message.push(format!(
                    "filters not supported on a backendRef: {}",
                    unsupported_on_backends.join(", ")
                ));
            }
            conditions.push(Condition {
                kind: "Accepted",
                status: false,
                reason: "UnsupportedValue",
                message: message.join("; "),
            });
            self.status.push(RouteStatus {
                kind: route.kind,
                namespace,
                name,
                conditions,
            });
            return;
        }

        // Rules, with their backends resolved.
        let mut unresolved = Vec::new();
        // A backend reference resolved to `namespace/name` and port.
        let mut resolve = |b: &BackendRef| -> Option<(String, u16)> {
            let ns = b.namespace.clone().unwrap_or_else(|| namespace.clone());
            let port = b.port.unwrap_or_default();
            let Some(kind) = b.service_kind() else {
                unresolved.push(format!(
                    "{}: only Service and ServiceEntry backends",
                    b.name
                ));
                return None;
            };
            if ns != namespace
                && (kind != ServiceKind::Service
                    || !reference_grant::permits(grants, route.kind, &namespace, &ns, &b.name))
            {
                unresolved.push(format!("{ns}/{}: RefNotPermitted", b.name));
            } else if !find(&ns, &b.name, kind)
                .is_some_and(|s| s.ports.iter().any(|p| p.port == port))
            {
                unresolved.push(format!("{ns}/{}:{port}: BackendNotFound", b.name));
            } else {
                return Some((format!("{ns}/{}", b.name), port));
            }
            None
        };
        let rules: Vec<(Arc<Rule>, &[Ranked])> = route
            .rules
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let mut backends = Vec::new();
                let mut unresolved_weight = 0u32;
                for b in r.backend_refs {
                    let weight = b.weight.unwrap_or(1);
                    match resolve(b) {
                        Some((service, port)) if weight > 0 => backends.push(WeightedBackend {
                            service,
                            port,
                            weight,
                            request_headers: edits(&b.filters, "RequestHeaderModifier"),
                            response_headers: edits(&b.filters, "ResponseHeaderModifier"),
                        }),
                        Some(_) => {}
                        None => unresolved_weight = unresolved_weight.saturating_add(weight),
                    }
                }
                let mirrors = r
                    .filters
                    .iter()
                    .filter_map(|f| f.request_mirror.as_ref())
                    .filter_map(|m| {
                        let (service, port) = resolve(&m.backend_ref)?;
                        let ppm = match (m.percent, m.fraction) {
                            (Some(p), _) => p * 10_000,
                            (None, Some(f)) => {
                                (u64::from(f.numerator) * 1_000_000
                                    / u64::from(f.denominator.max(1)))
                                    as u32
                            }
                            (None, None) => 1_000_000,
                        };
                        Some(Mirror { service, port, ppm })
                    })
                    .collect();
                let redirect = r
                    .filters
                    .iter()
                    .find_map(|f| f.request_redirect.as_ref())
                    .map(|x| Redirect {
                        scheme: x.scheme.clone(),
                        hostname: x.hostname.clone(),
                        port: x.port,
                        path: x.path.as_ref().and_then(PathEdit::of),
                        status: x.status_code.unwrap_or(302),
                    });
                let external_auth =
                    r.filters
                        .iter()
                        .find_map(|f| f.external_auth.as_ref())
                        .map(|e| {
                            let http = e.http.clone().unwrap_or_default();
                            let lower =
                                |l: &[String]| l.iter().map(|h| h.to_ascii_lowercase()).collect();
                            let (protocol, allowed) = match &e.grpc {
                                Some(grpc) if e.protocol == "GRPC" => {
                                    (AuthProtocol::Grpc, lower(&grpc.allowed_headers))
                                }
                                _ => (AuthProtocol::Http, lower(&http.allowed_headers)),
                            };
                            ExternalAuth {
                                path_prefix: http
                                    .path
                                    .unwrap_or_default()
                                    .trim_end_matches('/')
                                    .to_owned(),
                                allowed_headers: allowed,
                                allowed_response_headers: lower(&http.allowed_response_headers),
                                forward_body: e.forward_body.map_or(0, |b| usize::from(b.max_size)),
                                ..ExternalAuth::new(protocol, resolve(&e.backend_ref))
                            }
                        });
                let rewrite = r
                    .filters
                    .iter()
                    .find_map(|f| f.url_rewrite.as_ref())
                    .map(|x| Rewrite {
                        hostname: x.hostname.clone(),
                        path: x.path.as_ref().and_then(PathEdit::of),
                    });
                let timeout = |v: Option<&String>| {
                    v.and_then(|v| parse_duration(v).ok())
                        .filter(|d| !d.is_zero())
                };
                // A redirect answers without a backend.
                let all_invalid = redirect.is_none()
                    && !r.backend_refs.is_empty()
                    && backends.is_empty()
                    && r.backend_refs.iter().any(|b| b.weight != Some(0));
                (
                    Arc::new(Rule {
                        kind: route.kind,
                        route: id.clone(),
                        index,
                        request_headers: edits(r.filters, "RequestHeaderModifier"),
                        response_headers: edits(r.filters, "ResponseHeaderModifier"),
                        backends,
                        unresolved: all_invalid,
                        unresolved_weight,
                        request_timeout: timeout(r.timeouts.and_then(|t| t.request.as_ref())),
                        backend_timeout: timeout(
                            r.timeouts.and_then(|t| t.backend_request.as_ref()),
                        ),
                        // Validation made it compile.
                        retry: r.retry.and_then(|r| r.compile().ok()),
                        redirect,
                        rewrite,
                        mirrors,
                        // Validation made it compile.
                        cors: r
                            .filters
                            .iter()
                            .find_map(|f| f.cors.as_ref()?.compile().ok()),
                        session: r.session.and_then(|s| s.compile().ok()),
                        external_auth,
                    }),
                    r.matches.as_slice(),
                )
            })
            .collect();

        // Parents.
        let mut attached = 0;
        let mut missing = Vec::new();
        for parent in route.parent_refs {
            let Some(kind) = parent.service_kind() else {
                continue; // a Gateway parent: not the mesh's business
            };
            let ns = parent
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.clone());
            let Some(service) = find(&ns, &parent.name, kind) else {
                missing.push(format!("{ns}/{}", parent.name));
                continue;
            };
            let ports: Vec<u16> = service
                .ports
                .iter()
                .map(|p| p.port)
                .filter(|p| parent.port.is_none_or(|want| want == *p))
                .collect();
            if ports.is_empty() {
                missing.push(format!("{ns}/{}:{}", parent.name, parent.port.unwrap_or(0)));
                continue;
            }
            attached += 1;
            for port in ports {
                let routes = self
                    .services
                    .entry(service.id())
                    .or_default()
                    .entry(port)
                    .or_default();
                let entries = if ns == namespace {
                    &mut routes.producer
                } else {
                    routes.consumer.entry(namespace.clone()).or_default()
                };
                for (rule, matches) in &rules {
                    for (m, (request, rank)) in matches.iter().enumerate() {
                        entries.push(Entry {
                            request: request.clone(),
                            rule: rule.clone(),
                            rank: *rank,
                            order: (created, id.clone(), rule.index, m),
                            grpc: route.kind == "GRPCRoute",
                        });
                    }
                }
            }
        }
        conditions.push(if attached > 0 {
            Condition {
                kind: "Accepted",
                status: true,
                reason: "Accepted",
                message: String::new(),
            }
        } else {
            Condition {
                kind: "Accepted",
                status: false,
                reason: "NoMatchingParent",
                message: if missing.is_empty() {
                    "no Service among parentRefs".into()
                } else {
                    format!("no such Service port: {}", missing.join(", "))
                },
            }
        });
        conditions.push(if unresolved.is_empty() {
            Condition {
                kind: "ResolvedRefs",
                status: true,
                reason: "ResolvedRefs",
                message: String::new(),
            }
        } else {
            Condition {
                kind: "ResolvedRefs",
                status: false,
                reason: if unresolved.iter().any(|u| u.ends_with("RefNotPermitted")) {
                    "RefNotPermitted"
                } else {
                    "BackendNotFound"
                },
                message: unresolved.join(", "),
            }
        });
        self.status.push(RouteStatus {
            kind: route.kind,
            namespace,
            name,
            conditions,
        });
    }
}

/// The header edits of the `kind` filter among `filters` (validation
/// allows one of each).
fn edits(filters: &[HttpRouteFilter], kind: &str) -> HeaderEdits {
    filters
        .iter()
        .filter(|f| f.kind == kind)
        .filter_map(|f| match kind {
            "RequestHeaderModifier" => f.request_header_modifier.as_ref(),
            _ => f.response_header_modifier.as_ref(),
        })
        .map(HeaderEdits::from_modifier)
        .next()
        .unwrap_or_default()
}

/// A route of either kind, as the table compiles it.
struct Source<'a> {
    kind: &'static str,
    metadata: &'a ObjectMeta,
    parent_refs: &'a [ParentRef],
    rules: Vec<RuleSource<'a>>,
}

struct RuleSource<'a> {
    /// Compiled and ranked; a rule without matches has the catch-all one.
    matches: Vec<Ranked>,
    filters: &'a [HttpRouteFilter],
    backend_refs: &'a [BackendRef],
    timeouts: Option<&'a Timeouts>,
    retry: Option<&'a HttpRouteRetry>,
    session: Option<&'a SessionPersistence>,
}

/// A compiled match and its rank.
type Ranked = (RequestMatch, Rank);

/// A rule's matches compiled (validation made them compile) and ranked; a
/// rule without matches has the catch-all one, ranked as an empty match.
fn compiled<M: Default>(matches: &[M], compile: impl Fn(&M) -> Option<Ranked>) -> Vec<Ranked> {
    if matches.is_empty() {
        compile(&M::default()).into_iter().collect()
    } else {
        matches.iter().filter_map(compile).collect()
    }
}

impl<'a> Source<'a> {
    fn http(route: &'a HttpRoute) -> Self {
        Self {
            kind: "HTTPRoute",
            metadata: &route.metadata,
            parent_refs: &route.spec.parent_refs,
            rules: route
                .spec
                .rules
                .iter()
                .map(|r| RuleSource {
                    matches: compiled(&r.matches, |m| {
                        compile_match(m).map(|c| {
                            let rank = c.http_rank();
                            (c, rank)
                        })
                    }),
                    filters: &r.filters,
                    backend_refs: &r.backend_refs,
                    timeouts: r.timeouts.as_ref(),
                    retry: r.retry.as_ref(),
                    session: r.session_persistence.as_ref(),
                })
                .collect(),
        }
    }

    fn grpc(route: &'a GrpcRoute) -> Self {
        let compile = |m: &grpc_route::GrpcRouteMatch| {
            let path = match &m.method {
                None => PathRule::Prefix("/".into()),
                Some(method) => {
                    let part = |value: &Option<String>| -> Option<Option<ValueRule>> {
                        Some(match (value, method.kind) {
                            (None, _) => None,
                            (Some(v), ValueMatchKind::Exact) => Some(ValueRule::Exact(v.clone())),
                            (Some(v), ValueMatchKind::RegularExpression) => {
                                Some(ValueRule::Regex(Pattern::new(v)?))
                            }
                        })
                    };
                    PathRule::GrpcMethod {
                        service: part(&method.service)?,
                        method: part(&method.method)?,
                    }
                }
            };
            let compiled = RequestMatch {
                path,
                headers: compile_values(&m.headers, true)?,
                query: Vec::new(),
                method: None,
            };
            let rank = grpc_rank(m, &compiled);
            Some((compiled, rank))
        };
        Self {
            kind: "GRPCRoute",
            metadata: &route.metadata,
            parent_refs: &route.spec.parent_refs,
            rules: route
                .spec
                .rules
                .iter()
                .map(|r| RuleSource {
                    matches: compiled(&r.matches, compile),
                    filters: &r.filters,
                    backend_refs: &r.backend_refs,
                    timeouts: None,
                    retry: None,
                    session: r.session_persistence.as_ref(),
                })
                .collect(),
        }
    }
}

/// Header (names in lower case, since they are case-blind) or query
/// parameter (names as written) matches. Of entries with one name only the
/// first counts, as the Gateway API says.
fn compile_values(
    list: &[super::http_route::ValueMatch],
    header: bool,
) -> Option<Vec<(String, ValueRule)>> {
    let mut out: Vec<(String, ValueRule)> = Vec::with_capacity(list.len());
    for v in list {
        let name = if header {
            v.name.to_ascii_lowercase()
        } else {
            v.name.clone()
        };
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let rule = match v.kind {
            ValueMatchKind::Exact => ValueRule::Exact(v.value.clone()),
            ValueMatchKind::RegularExpression => ValueRule::Regex(Pattern::new(&v.value)?),
        };
        out.push((name, rule));
    }
    Some(out)
}

fn precedence(a: &Entry, b: &Entry) -> Ordering {
    a.rank.cmp(&b.rank).then_with(|| a.order.cmp(&b.order))
}

fn compile_match(m: &super::http_route::HttpRouteMatch) -> Option<RequestMatch> {
    let path = match &m.path {
        None => PathRule::Prefix("/".into()),
        Some(p) => match p.kind {
            PathMatchKind::Exact => PathRule::Exact(p.value.clone()),
            PathMatchKind::PathPrefix => PathRule::Prefix(p.value.clone()),
            PathMatchKind::RegularExpression => PathRule::Regex(Pattern::new(&p.value)?),
        },
    };
    Some(RequestMatch {
        path,
        headers: compile_values(&m.headers, true)?,
        // Query parameter names are case-sensitive.
        query: compile_values(&m.query_params, false)?,
        method: m.method.clone(),
    })
}
