//! Route selection checked against the words of the Gateway API, on
//! generated routes. [`decide`] reads the test's own model of the routes
//! (none of [`super::table`]'s code):
//!
//! - GAMMA attachment: a route attaches to the Service port its `parentRef`
//!   names (every port without one). Routes in the client's namespace, when
//!   it is not the Service's, replace the Service namespace's routes for
//!   that client. No route attached: the Service is not routed by rules.
//!   Routes attached and no rule matching: 404.
//! - A `GRPCRoute` takes the port from the `HTTPRoute`s there (Trellis,
//!   as GEP-1016 lets an implementation do).
//! - `HTTPRoute` precedence across every rule of the routes: exact path,
//!   then the prefix with the most characters, then a method, then more
//!   header matches, then more query matches. Regular expressions are
//!   implementation-specific: Trellis ranks them after exact paths and
//!   before prefixes, the longer pattern first (docs/architecture.md).
//! - `GRPCRoute` precedence: more characters in the service, then in the
//!   method, then more header matches (a pattern counts as written).
//! - Ties: the older route (one without a creation time first), then
//!   `namespace/name` in alphabetical order, then the first rule.
//! - A prefix matches element by element, a trailing `/` ignored; a
//!   regular expression matches the whole value; header names are
//!   case-blind, a repeated header is read as its values joined with `,`
//!   (RFC 9110, 5.3); query parameter names are exact; of match entries
//!   naming one header or parameter only the first counts.
//!
//! - A rule's path edit (`URLRewrite` or `RequestRedirect`):
//!   `ReplaceFullPath` is the new path; `ReplacePrefixMatch` replaces the
//!   path elements the winning `PathPrefix` match matched (a match without
//!   a path is the prefix `/`), as the API's table of examples does: the
//!   request's trailing `/` is kept, an empty result is `/`, and an empty
//!   replacement strips the prefix.
//!
//! - A rule's backends: a reference resolves to a Service port in the
//!   route's namespace, weighted (1 when not written, none at 0); the
//!   weight of references that do not resolve is the share of requests
//!   that must get 500 ("the proportion of requests that would otherwise
//!   have been routed to an invalid backend").
//!
//! The same routes, written as the objects a user writes, are parsed and
//! built into a snapshot, and the agent's table picks a rule for every
//! client namespace, port and generated request; the picks, the path each
//! pick's edit makes and where it sends requests must agree.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{
    routes::table::{RequestView, route},
    state::{Snapshot, objects::parse_file},
    testing::{self, Rng},
};

/// The Service routed: `shop/web`, two ports.
const PORTS: &[u16] = &[80, 81];
/// Clients: the Service's namespace, one with consumer routes, one without.
const CLIENTS: &[&str] = &["shop", "dev", "ops"];
const PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/",
    "/api/v1",
    "/api/v1/users",
    "/apix",
    "/static/a.css",
    "/pkg.Greeter/SayHello",
    "/pkg.Greeter/Shout",
    "/ops.Health/Check",
    "/a.B/LongMethodName",
    "/pkg.Greeter",
    "/pkg.Greeter/Say/Hello",
];
const PREFIXES: &[&str] = &["/", "/api", "/api/", "/api/v1", "/pkg.Greeter", "/static"];
const PATH_REGEXES: &[&str] = &[
    "/api/.*",
    r"/pkg\.Greeter/.*",
    "/[a-z]+",
    ".*",
    "/api/v[0-9]+(/.*)?",
];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
/// Header names as a match may write them; `x-env` twice, in two cases.
const HEADER_NAMES: &[&str] = &["x-env", "X-Env", "x-user"];
const HEADER_VALUES: &[(&str, &[&str])] =
    &[("x-env", &["prod", "dev"]), ("x-user", &["alice", "bob"])];
const VALUE_REGEXES: &[&str] = &["prod|dev", "al.*", "prod,prod", "[a-z]+"];
const QUERY: &[(&str, &[&str])] = &[("v", &["1", "2"]), ("debug", &["true"]), ("Debug", &["1"])];
const SERVICES: &[&str] = &["pkg.Greeter", "ops.Health", "a.B"];
const SERVICE_REGEXES: &[&str] = &[r"pkg\..*", ".*"];
const GRPC_METHODS: &[&str] = &["SayHello", "Shout", "Check", "LongMethodName"];
const METHOD_REGEXES: &[&str] = &["S.*", ".*"];
/// New paths and prefixes for path edits; "" only as a prefix.
const NEW_PATHS: &[&str] = &["/", "/v2", "/v2/", "/new/api", ""];
/// Backend references: `b` has port 80 in both route namespaces.
const BACKENDS: &[(&str, u16)] = &[("b", 80), ("b", 81), ("gone", 80)];
const WEIGHTS: &[Option<u32>] = &[None, Some(0), Some(1), Some(3)];

#[derive(Clone, Debug)]
struct ValueMatch {
    name: String,
    regex: bool,
    value: String,
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, Default)]
struct HttpMatch {
    path: Option<PathMatch>,
    method: Option<String>,
    headers: Vec<ValueMatch>,
    query: Vec<ValueMatch>,
}

#[derive(Clone, Debug)]
struct MethodMatch {
    regex: bool,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Clone, Debug, Default)]
struct GrpcMatch {
    method: Option<MethodMatch>,
    headers: Vec<ValueMatch>,
}

/// A rule's matches: none means every request.
#[derive(Clone, Debug)]
enum Matches {
    Http(Vec<HttpMatch>),
    Grpc(Vec<GrpcMatch>),
}

/// A path edit of a `URLRewrite` or `RequestRedirect` filter.
#[derive(Clone, Debug)]
enum NewPath {
    Full(String),
    Prefix(String),
}

#[derive(Clone, Debug)]
struct Rule {
    matches: Matches,
    /// With `redirect`, a `RequestRedirect` makes it, else a `URLRewrite`.
    edit: Option<NewPath>,
    redirect: bool,
    /// Name, port, weight as written.
    backends: Vec<(&'static str, u16, Option<u32>)>,
}

/// What a rule does with a request it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sends {
    /// The path its edit makes of the request's.
    path: Option<String>,
    /// `namespace/name`, port and weight of each backend requests go to.
    backends: Vec<(String, u16, u32)>,
    /// The share of requests that get 500.
    invalid_weight: u32,
}

#[derive(Clone, Debug)]
struct Route {
    grpc: bool,
    namespace: &'static str,
    name: &'static str,
    /// Seconds after a fixed time; `None`: not written.
    created: Option<u8>,
    port: Option<u16>,
    rules: Vec<Rule>,
}

impl Route {
    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn kind(&self) -> &'static str {
        if self.grpc { "GRPCRoute" } else { "HTTPRoute" }
    }
}

#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
    path: &'static str,
    /// Distinct names: a repeated parameter is left undefined by the API.
    query: Vec<(&'static str, &'static str)>,
    headers: Vec<(&'static str, &'static str)>,
}

/// Which rule serves a request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pick {
    /// No route applies: the Service is not routed by rules.
    Unrouted,
    /// Routes apply and no rule matches: 404.
    NotFound,
    /// The rule at this index of the route of this kind and id, and what
    /// it does with the request.
    Rule(&'static str, String, usize, Sends),
}

// ---- the reference ----

fn full_match(pattern: &str, value: &str) -> bool {
    thread_local! {
        static COMPILED: std::cell::RefCell<std::collections::HashMap<String, regex::Regex>> =
            std::cell::RefCell::default();
    }
    COMPILED.with_borrow_mut(|compiled| {
        compiled
            .entry(pattern.to_owned())
            .or_insert_with(|| {
                regex::Regex::new(&format!("^(?:{pattern})$")).expect("generated patterns compile")
            })
            .is_match(value)
    })
}

fn fits(m: &ValueMatch, value: &str) -> bool {
    if m.regex {
        full_match(&m.value, value)
    } else {
        m.value == value
    }
}

/// The entries that count: the first of each name (`fold` for headers).
fn first_of_each(list: &[ValueMatch], fold: bool) -> Vec<&ValueMatch> {
    let key = |m: &ValueMatch| {
        if fold {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        }
    };
    let mut out: Vec<&ValueMatch> = Vec::new();
    for m in list {
        if !out.iter().any(|o| key(o) == key(m)) {
            out.push(m);
        }
    }
    out
}

fn headers_hold(list: &[ValueMatch], req: &Req) -> bool {
    first_of_each(list, true).iter().all(|m| {
        let values: Vec<&str> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(&m.name))
            .map(|(_, v)| *v)
            .collect();
        !values.is_empty() && fits(m, &values.join(","))
    })
}

fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

impl HttpMatch {
    fn fits(&self, req: &Req) -> bool {
        let path = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => p == req.path,
            Some(PathMatch::Prefix(p)) => segments(req.path).starts_with(&segments(p)),
            Some(PathMatch::Regex(r)) => full_match(r, req.path),
        };
        path && self.method.as_deref().is_none_or(|m| m == req.method)
            && headers_hold(&self.headers, req)
            && first_of_each(&self.query, false).iter().all(|m| {
                req.query
                    .iter()
                    .find(|(k, _)| *k == m.name)
                    .is_some_and(|(_, v)| fits(m, v))
            })
    }

    /// Smaller first.
    fn rank(&self) -> Vec<i64> {
        let (kind, chars) = match &self.path {
            Some(PathMatch::Exact(p)) => (0, p.len()),
            Some(PathMatch::Regex(r)) => (1, r.len()),
            Some(PathMatch::Prefix(p)) => (2, p.len()),
            None => (2, 1),
        };
        vec![
            kind,
            -(chars as i64),
            i64::from(self.method.is_none()),
            -(first_of_each(&self.headers, true).len() as i64),
            -(first_of_each(&self.query, false).len() as i64),
        ]
    }
}

impl GrpcMatch {
    fn fits(&self, req: &Req) -> bool {
        let method = match &self.method {
            None => true,
            Some(m) => {
                let parts: Vec<&str> = req.path.split('/').collect();
                match parts.as_slice() {
                    ["", service, method] if !service.is_empty() && !method.is_empty() => {
                        let part = |want: &Option<String>, got: &str| match want {
                            None => true,
                            Some(w) if m.regex => full_match(w, got),
                            Some(w) => w == got,
                        };
                        part(&m.service, service) && part(&m.method, method)
                    }
                    _ => false,
                }
            }
        };
        method && headers_hold(&self.headers, req)
    }

    fn rank(&self) -> Vec<i64> {
        let chars = |part: Option<&String>| -(part.map_or(0, |p| p.len()) as i64);
        let m = self.method.as_ref();
        vec![
            chars(m.and_then(|m| m.service.as_ref())),
            chars(m.and_then(|m| m.method.as_ref())),
            -(first_of_each(&self.headers, true).len() as i64),
        ]
    }
}

/// The path `edit` makes of `path`, which `matched` (a prefix) matched.
fn edited(edit: &NewPath, matched: Option<&PathMatch>, path: &str) -> String {
    let replacement = match edit {
        NewPath::Full(p) => return p.clone(),
        NewPath::Prefix(p) => p,
    };
    let prefix = match matched {
        None => "/",
        Some(PathMatch::Prefix(p)) => p,
        Some(other) => panic!("a prefix edit on a rule matching {other:?}"),
    };
    // Element by element: the request's elements after the prefix's, put
    // after the replacement's; the request's trailing '/' stays.
    let rest = &segments(path)[segments(prefix).len()..];
    let mut parts = segments(replacement);
    parts.extend_from_slice(rest);
    let mut out = format!("/{}", parts.join("/"));
    if path.ends_with('/') && !out.ends_with('/') {
        out.push('/');
    }
    out
}

fn decide(routes: &[Route], client: &str, port: u16, req: &Req) -> Pick {
    let attached: Vec<&Route> = routes
        .iter()
        .filter(|r| r.port.is_none_or(|p| p == port))
        .collect();
    let consumer: Vec<&Route> = attached
        .iter()
        .copied()
        .filter(|r| client != "shop" && r.namespace == client)
        .collect();
    let mut applying = if consumer.is_empty() {
        attached
            .into_iter()
            .filter(|r| r.namespace == "shop")
            .collect()
    } else {
        consumer
    };
    if applying.is_empty() {
        return Pick::Unrouted;
    }
    if applying.iter().any(|r| r.grpc) {
        applying.retain(|r| r.grpc);
    }
    // (rank, created, id, rule) of every match that fits, the least wins;
    // with what the winning match's rule does.
    type Candidate = (Vec<i64>, Option<u8>, String, usize, &'static str);
    let mut best: Option<(Candidate, Sends)> = None;
    for r in &applying {
        for (index, rule) in r.rules.iter().enumerate() {
            let fitting: Vec<(Vec<i64>, Option<&PathMatch>)> = match &rule.matches {
                Matches::Http(list) if list.is_empty() => {
                    vec![(HttpMatch::default().rank(), None)]
                }
                Matches::Grpc(list) if list.is_empty() => vec![(GrpcMatch::default().rank(), None)],
                Matches::Http(list) => list
                    .iter()
                    .filter(|m| m.fits(req))
                    .map(|m| (m.rank(), m.path.as_ref()))
                    .collect(),
                Matches::Grpc(list) => list
                    .iter()
                    .filter(|m| m.fits(req))
                    .map(|m| (m.rank(), None))
                    .collect(),
            };
            for (rank, path) in fitting {
                let candidate = (rank, r.created, r.id(), index, r.kind());
                if best.as_ref().is_none_or(|(b, _)| candidate < *b) {
                    let mut sends = Sends {
                        path: rule.edit.as_ref().map(|e| edited(e, path, req.path)),
                        backends: Vec::new(),
                        invalid_weight: 0,
                    };
                    for &(name, port, weight) in &rule.backends {
                        let weight = weight.unwrap_or(1);
                        if (name, port) != ("b", 80) {
                            sends.invalid_weight += weight;
                        } else if weight > 0 {
                            sends
                                .backends
                                .push((format!("{}/{name}", r.namespace), port, weight));
                        }
                    }
                    best = Some((candidate, sends));
                }
            }
        }
    }
    match best {
        None => Pick::NotFound,
        Some(((_, _, id, index, kind), sends)) => Pick::Rule(kind, id, index, sends),
    }
}

// ---- generating ----

fn value_match(
    rng: &mut Rng,
    names: &[&str],
    values: impl Fn(&str) -> Vec<&'static str>,
) -> ValueMatch {
    let name = rng.pick(names).to_string();
    let regex = rng.chance(35);
    let value = if regex {
        rng.pick(VALUE_REGEXES).to_string()
    } else {
        let choices = values(&name.to_ascii_lowercase());
        if choices.is_empty() || rng.chance(10) {
            "none".into()
        } else {
            rng.pick(&choices).to_string()
        }
    };
    ValueMatch { name, regex, value }
}

fn header_match(rng: &mut Rng) -> ValueMatch {
    value_match(rng, HEADER_NAMES, |name| {
        HEADER_VALUES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_vec())
            .unwrap_or_default()
    })
}

fn query_match(rng: &mut Rng) -> ValueMatch {
    let names: Vec<&str> = QUERY.iter().map(|(n, _)| *n).collect();
    let mut m = value_match(rng, &names, |name| {
        QUERY
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_vec())
            .unwrap_or_default()
    });
    if m.regex {
        m.value = rng.pick(&["[0-9]+", "t.*"]).to_string();
    }
    m
}

fn up_to<T>(rng: &mut Rng, max: usize, item: impl Fn(&mut Rng) -> T) -> Vec<T> {
    (0..rng.below(max + 1)).map(|_| item(rng)).collect()
}

fn http_match(rng: &mut Rng) -> HttpMatch {
    HttpMatch {
        path: match rng.below(4) {
            0 => None,
            1 => Some(PathMatch::Exact(rng.pick(PATHS).to_string())),
            2 => Some(PathMatch::Prefix(rng.pick(PREFIXES).to_string())),
            _ => Some(PathMatch::Regex(rng.pick(PATH_REGEXES).to_string())),
        },
        method: rng.chance(30).then(|| rng.pick(METHODS).to_string()),
        headers: up_to(rng, 2, header_match),
        query: if rng.chance(30) {
            up_to(rng, 2, query_match)
        } else {
            Vec::new()
        },
    }
}

fn grpc_match(rng: &mut Rng) -> GrpcMatch {
    let method = rng.chance(75).then(|| {
        let regex = rng.chance(30);
        let (services, methods) = if regex {
            (SERVICE_REGEXES, METHOD_REGEXES)
        } else {
            (SERVICES, GRPC_METHODS)
        };
        let (service, method) = match rng.below(3) {
            0 => (Some(rng.pick(services)), None),
            1 => (None, Some(rng.pick(methods))),
            _ => (Some(rng.pick(services)), Some(rng.pick(methods))),
        };
        MethodMatch {
            regex,
            service: service.map(|s| s.to_string()),
            method: method.map(|m| m.to_string()),
        }
    });
    GrpcMatch {
        method,
        headers: up_to(rng, 2, header_match),
    }
}

fn routes(rng: &mut Rng) -> Vec<Route> {
    // Names out of the order they are made in, so that the order in the
    // input is not the alphabetical one.
    const NAMES: &[&str] = &["m", "c", "x", "a"];
    (0..1 + rng.below(4))
        .map(|n| {
            let grpc = rng.chance(25);
            Route {
                grpc,
                namespace: if rng.chance(30) { "dev" } else { "shop" },
                name: NAMES[n],
                created: rng.chance(75).then(|| rng.below(3) as u8),
                port: rng.chance(50).then(|| rng.pick(PORTS)),
                rules: (0..1 + rng.below(3))
                    .map(|_| {
                        let none = rng.chance(15);
                        if grpc {
                            let matches = Matches::Grpc(if none {
                                Vec::new()
                            } else {
                                (0..1 + rng.below(3)).map(|_| grpc_match(rng)).collect()
                            });
                            Rule {
                                matches,
                                edit: None,
                                redirect: false,
                                backends: backend_refs(rng),
                            }
                        } else {
                            let list: Vec<HttpMatch> = if none {
                                Vec::new()
                            } else {
                                (0..1 + rng.below(3)).map(|_| http_match(rng)).collect()
                            };
                            http_rule(rng, list)
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// An `HTTPRoute` rule; some edit the path, by prefix only where every
/// match is a prefix (the API refuses it otherwise).
fn http_rule(rng: &mut Rng, list: Vec<HttpMatch>) -> Rule {
    let prefixes = list.iter().all(|m| {
        m.path
            .as_ref()
            .is_none_or(|p| matches!(p, PathMatch::Prefix(_)))
    });
    let edit = rng.chance(40).then(|| {
        let new = rng.pick(NEW_PATHS).to_string();
        if prefixes && rng.chance(75) {
            NewPath::Prefix(new)
        } else if new.is_empty() {
            NewPath::Full("/".into())
        } else {
            NewPath::Full(new)
        }
    });
    let redirect = edit.is_some() && rng.chance(30);
    Rule {
        matches: Matches::Http(list),
        redirect,
        edit,
        // A redirect answers: it has no backends.
        backends: if redirect {
            Vec::new()
        } else {
            backend_refs(rng)
        },
    }
}

/// Mostly the one valid backend, as most rules are; else up to three
/// references of any weight, valid or not, or none.
fn backend_refs(rng: &mut Rng) -> Vec<(&'static str, u16, Option<u32>)> {
    if rng.chance(60) {
        return vec![("b", 80, None)];
    }
    (0..rng.below(4))
        .map(|_| {
            let (name, port) = rng.pick(BACKENDS);
            (name, port, rng.pick(WEIGHTS))
        })
        .collect()
}

fn request(rng: &mut Rng) -> Req {
    let mut headers = Vec::new();
    for (name, values) in HEADER_VALUES {
        for _ in 0..rng.below(3) {
            headers.push((*name, rng.pick(values)));
        }
    }
    let mut query: Vec<(&str, &str)> = Vec::new();
    for (name, values) in QUERY {
        if rng.chance(35) {
            query.push((*name, rng.pick(values)));
        }
    }
    Req {
        method: rng.pick(METHODS),
        path: rng.pick(PATHS),
        query,
        headers,
    }
}

// ---- the objects a user writes ----

fn value_json(m: &ValueMatch) -> Value {
    if m.regex {
        json!({"type": "RegularExpression", "name": m.name, "value": m.value})
    } else if m.name.len().is_multiple_of(2) {
        // `type` left out half the time: Exact is the default.
        json!({"name": m.name, "value": m.value})
    } else {
        json!({"type": "Exact", "name": m.name, "value": m.value})
    }
}

fn route_json(r: &Route) -> Value {
    let mut parent = json!({"group": "", "kind": "Service", "name": "web"});
    if r.namespace != "shop" {
        parent["namespace"] = json!("shop");
    }
    if let Some(port) = r.port {
        parent["port"] = json!(port);
    }
    let rules: Vec<Value> = r
        .rules
        .iter()
        .map(|rule| {
            let matches: Vec<Value> = match &rule.matches {
                Matches::Http(list) => list
                    .iter()
                    .map(|m| {
                        let mut o = json!({});
                        match &m.path {
                            None => {}
                            Some(PathMatch::Exact(p)) => {
                                o["path"] = json!({"type": "Exact", "value": p})
                            }
                            Some(PathMatch::Prefix(p)) => {
                                o["path"] = json!({"type": "PathPrefix", "value": p})
                            }
                            Some(PathMatch::Regex(p)) => {
                                o["path"] = json!({"type": "RegularExpression", "value": p})
                            }
                        }
                        if let Some(method) = &m.method {
                            o["method"] = json!(method);
                        }
                        if !m.headers.is_empty() {
                            o["headers"] = m.headers.iter().map(value_json).collect();
                        }
                        if !m.query.is_empty() {
                            o["queryParams"] = m.query.iter().map(value_json).collect();
                        }
                        o
                    })
                    .collect(),
                Matches::Grpc(list) => list
                    .iter()
                    .map(|m| {
                        let mut o = json!({});
                        if let Some(method) = &m.method {
                            let mut mm = json!({
                                "type": if method.regex { "RegularExpression" } else { "Exact" }
                            });
                            if let Some(s) = &method.service {
                                mm["service"] = json!(s);
                            }
                            if let Some(name) = &method.method {
                                mm["method"] = json!(name);
                            }
                            o["method"] = mm;
                        }
                        if !m.headers.is_empty() {
                            o["headers"] = m.headers.iter().map(value_json).collect();
                        }
                        o
                    })
                    .collect(),
            };
            let mut o = json!({});
            if !matches.is_empty() {
                o["matches"] = json!(matches);
            }
            let path = rule.edit.as_ref().map(|edit| match edit {
                NewPath::Full(p) => json!({"type": "ReplaceFullPath", "replaceFullPath": p}),
                NewPath::Prefix(p) => {
                    json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": p})
                }
            });
            match path {
                Some(path) if rule.redirect => {
                    o["filters"] =
                        json!([{"type": "RequestRedirect", "requestRedirect": {"path": path}}]);
                }
                Some(path) => {
                    o["filters"] = json!([{"type": "URLRewrite", "urlRewrite": {"path": path}}]);
                }
                None => {}
            }
            if !rule.backends.is_empty() {
                let refs: Vec<Value> = rule
                    .backends
                    .iter()
                    .map(|&(name, port, weight)| {
                        let mut b = json!({"name": name, "port": port});
                        if let Some(w) = weight {
                            b["weight"] = json!(w);
                        }
                        b
                    })
                    .collect();
                o["backendRefs"] = json!(refs);
            }
            o
        })
        .collect();
    let mut metadata = json!({"name": r.name, "namespace": r.namespace});
    if let Some(s) = r.created {
        metadata["creationTimestamp"] = json!(format!("2026-12-01T10:00:0{s}Z"));
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": r.kind(),
        "metadata": metadata,
        "spec": {"parentRefs": [parent], "rules": rules},
    })
}

fn cluster(routes: &[Route]) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: 81}]}\n",
    );
    for ns in ["shop", "dev"] {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: b, namespace: {ns}}}\n\
             spec: {{clusterIP: 10.96.1.{}, ports: [{{port: 80}}]}}\n",
            if ns == "shop" { 1 } else { 2 }
        );
    }
    for r in routes {
        let _ = write!(text, "---\n{}\n", route_json(r));
    }
    text
}

/// Checks one generated case; returns how many questions it asked.
fn check_case(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let model = routes(&mut rng);
    let requests: Vec<Req> = (0..24).map(|_| request(&mut rng)).collect();
    let text = cluster(&model);
    let parsed = parse_file(std::path::Path::new("routes.yaml"), &text)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{text}"));
    assert!(
        parsed.rejected.is_empty(),
        "seed {seed}: {:?}\n{text}",
        parsed.rejected
    );
    let snap = Snapshot::build("node-a", &parsed.objects);
    let mut asked = 0;
    for &client in CLIENTS {
        for &port in PORTS {
            let entries = snap
                .routes
                .port("shop/web", port)
                .and_then(|p| p.for_client(client));
            for req in &requests {
                let mut headers = http::HeaderMap::new();
                for (k, v) in &req.headers {
                    headers.append(*k, http::HeaderValue::from_static(v));
                }
                let query = req
                    .query
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&");
                let method = http::Method::from_bytes(req.method.as_bytes()).expect("method");
                let view = RequestView {
                    method: &method,
                    path: req.path,
                    query: (!query.is_empty()).then_some(query.as_str()),
                    headers: &headers,
                };
                let agent = match entries {
                    None => Pick::Unrouted,
                    Some(entries) => match route(entries, &view) {
                        None => Pick::NotFound,
                        Some(e) => {
                            let edit = match (&e.rule.redirect, &e.rule.rewrite) {
                                (Some(r), _) => r.path.as_ref(),
                                (None, Some(r)) => r.path.as_ref(),
                                (None, None) => None,
                            };
                            let sends = Sends {
                                path: edit.map(|edit| edit.apply(&e.request.path, req.path)),
                                backends: e
                                    .rule
                                    .backends
                                    .iter()
                                    .map(|b| (b.service.clone(), b.port, b.weight))
                                    .collect(),
                                invalid_weight: e.rule.unresolved_weight,
                            };
                            Pick::Rule(e.rule.kind, e.rule.route.clone(), e.rule.index, sends)
                        }
                    },
                };
                let reference = decide(&model, client, port, req);
                assert_eq!(
                    agent, reference,
                    "seed {seed}: a client in {client} to port {port}, {req:?}\n{text}"
                );
                asked += 1;
            }
        }
    }
    asked
}

#[test]
fn generated_routes_pick_as_the_reference() {
    let cases = testing::cases("TRELLIS_ROUTE_CASES", 200);
    let asked: usize = (0..cases).map(|case| check_case(0x2047e ^ case)).sum();
    assert_eq!(asked, cases as usize * CLIENTS.len() * PORTS.len() * 24);
}
