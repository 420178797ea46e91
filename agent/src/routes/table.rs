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

use std::{cmp::Ordering, collections::BTreeMap, fmt, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Serialize, Serializer};

use super::http_route::{
    HeaderModifier, HttpRoute, PathMatchKind, SUPPORTED_FILTERS, ValueMatchKind, parse_duration,
};
use crate::state::ServiceView;

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
        };
        path_ok
            && self
                .method
                .as_deref()
                .is_none_or(|m| m == req.method.as_str())
            && self.headers.iter().all(|(name, rule)| {
                // Several values of one header: the first, as Envoy does.
                req.headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| rule.matches(v))
            })
            && self
                .query
                .iter()
                .all(|(name, rule)| query_value(req.query, name).is_some_and(|v| rule.matches(&v)))
    }

    /// The Gateway API's precedence between matches: exact path, then the
    /// longest prefix, then a method, then more header, then more query
    /// matches. Regular expressions (implementation-specific) rank after
    /// exact paths and before prefixes, the longer pattern first.
    fn rank(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            PathRule::Exact(p) => (0, p.len()),
            PathRule::Regex(r) => (1, r.0.as_str().len()),
            PathRule::Prefix(p) => (2, p.len()),
        };
        (
            kind,
            usize::MAX - len,
            self.method.is_none(),
            usize::MAX - self.headers.len(),
            usize::MAX - self.query.len(),
        )
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
}

/// One rule of a route, as the proxy applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// `namespace/name` of its route, and its index there.
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<Duration>,
}

/// A match and the rule it leads to, in precedence order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    #[serde(rename = "match")]
    pub request: RequestMatch,
    pub rule: Arc<Rule>,
    /// Tie-breaks after the match's own rank: older route, then
    /// `namespace/name`, then rule and match index.
    #[serde(skip)]
    order: (String, String, usize, usize),
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
    pub fn build(routes: &[&HttpRoute], services: &[ServiceView]) -> Self {
        let mut table = Self::default();
        for route in routes {
            table.add(route, services);
        }
        for ports in table.services.values_mut() {
            for port in ports.values_mut() {
                port.producer.sort_by(precedence);
                for entries in port.consumer.values_mut() {
                    entries.sort_by(precedence);
                }
            }
        }
        table
    }

    fn add(&mut self, route: &HttpRoute, services: &[ServiceView]) {
        let namespace = route.metadata.namespace.clone().unwrap_or_default();
        let name = route.metadata.name.clone().unwrap_or_default();
        let id = format!("{namespace}/{name}");
        let created = route
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let mut conditions = Vec::new();
        let find = |ns: &str, name: &str| {
            services
                .iter()
                .find(|s| s.namespace == ns && s.name == name)
        };

        // Features this agent does not honour yet: the route is not
        // accepted rather than half applied.
        let unsupported: Vec<&str> = route
            .spec
            .rules
            .iter()
            .flat_map(|r| &r.filters)
            .map(|f| f.kind.as_str())
            .filter(|k| !SUPPORTED_FILTERS.contains(k))
            .collect();
        if !unsupported.is_empty() {
            conditions.push(Condition {
                kind: "Accepted",
                status: false,
                reason: "UnsupportedValue",
                message: format!("filters not supported yet: {}", unsupported.join(", ")),
            });
            self.status.push(RouteStatus {
                kind: "HTTPRoute",
                namespace,
                name,
                conditions,
            });
            return;
        }

        // Rules, with their backends resolved.
        let mut unresolved = Vec::new();
        let rules: Vec<(Arc<Rule>, &[super::http_route::HttpRouteMatch])> = route
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let mut backends = Vec::new();
                for b in &r.backend_refs {
                    let ns = b.namespace.clone().unwrap_or_else(|| namespace.clone());
                    let port = b.port.unwrap_or_default();
                    if b.kind.as_deref().is_some_and(|k| k != "Service")
                        || b.group
                            .as_deref()
                            .is_some_and(|g| !g.is_empty() && g != "core")
                    {
                        unresolved.push(format!("{}: only Service backends", b.name));
                    } else if ns != namespace {
                        // No ReferenceGrant support: cross-namespace
                        // references are refused, as without a grant.
                        unresolved.push(format!("{ns}/{}: RefNotPermitted", b.name));
                    } else if !find(&ns, &b.name)
                        .is_some_and(|s| s.ports.iter().any(|p| p.port == port))
                    {
                        unresolved.push(format!("{ns}/{}:{port}: BackendNotFound", b.name));
                    } else if b.weight != Some(0) {
                        backends.push(WeightedBackend {
                            service: format!("{ns}/{}", b.name),
                            port,
                            weight: b.weight.unwrap_or(1),
                        });
                    }
                }
                let edits = |kind: &str| {
                    r.filters
                        .iter()
                        .filter(|f| f.kind == kind)
                        .filter_map(|f| match kind {
                            "RequestHeaderModifier" => f.request_header_modifier.as_ref(),
                            _ => f.response_header_modifier.as_ref(),
                        })
                        .map(HeaderEdits::from_modifier)
                        .next()
                        .unwrap_or_default()
                };
                let timeout = |v: Option<&String>| {
                    v.and_then(|v| parse_duration(v).ok())
                        .filter(|d| !d.is_zero())
                };
                let all_invalid = !r.backend_refs.is_empty()
                    && backends.is_empty()
                    && r.backend_refs.iter().any(|b| b.weight != Some(0));
                (
                    Arc::new(Rule {
                        route: id.clone(),
                        index,
                        request_headers: edits("RequestHeaderModifier"),
                        response_headers: edits("ResponseHeaderModifier"),
                        backends,
                        unresolved: all_invalid,
                        request_timeout: timeout(
                            r.timeouts.as_ref().and_then(|t| t.request.as_ref()),
                        ),
                        backend_timeout: timeout(
                            r.timeouts.as_ref().and_then(|t| t.backend_request.as_ref()),
                        ),
                    }),
                    r.matches.as_slice(),
                )
            })
            .collect();

        // Parents.
        let mut attached = 0;
        let mut missing = Vec::new();
        for parent in &route.spec.parent_refs {
            if !parent.is_service() {
                continue; // a Gateway parent: not the mesh's business
            }
            let ns = parent
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.clone());
            let Some(service) = find(&ns, &parent.name) else {
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
                    let compiled: Vec<RequestMatch> = if matches.is_empty() {
                        vec![RequestMatch {
                            path: PathRule::Prefix("/".into()),
                            headers: Vec::new(),
                            query: Vec::new(),
                            method: None,
                        }]
                    } else {
                        matches.iter().filter_map(compile_match).collect()
                    };
                    for (m, request) in compiled.into_iter().enumerate() {
                        entries.push(Entry {
                            request,
                            rule: rule.clone(),
                            order: (created.clone(), id.clone(), rule.index, m),
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
            kind: "HTTPRoute",
            namespace,
            name,
            conditions,
        });
    }
}

fn precedence(a: &Entry, b: &Entry) -> Ordering {
    a.request
        .rank()
        .cmp(&b.request.rank())
        .then_with(|| a.order.cmp(&b.order))
}

fn compile_match(m: &super::http_route::HttpRouteMatch) -> Option<RequestMatch> {
    let value = |kind: ValueMatchKind, v: &str| match kind {
        ValueMatchKind::Exact => Some(ValueRule::Exact(v.to_owned())),
        ValueMatchKind::RegularExpression => Pattern::new(v).map(ValueRule::Regex),
    };
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
        headers: m
            .headers
            .iter()
            .map(|h| Some((h.name.to_ascii_lowercase(), value(h.kind, &h.value)?)))
            .collect::<Option<_>>()?,
        query: m
            .query_params
            .iter()
            .map(|q| Some((q.name.clone(), value(q.kind, &q.value)?)))
            .collect::<Option<_>>()?,
        method: m.method.clone(),
    })
}
