//! Authorization checked against the words of Istio's `AuthorizationPolicy`
//! reference, on generated policies. [`decide`] reads the test's own model
//! of the policies (none of [`super`]'s code): a policy applies to the
//! workloads of its namespace its selector matches (an AUDIT one decides
//! nothing); a request is denied
//! when a DENY rule matches it, else allowed when no ALLOW policy applies
//! or one of their rules matches; a rule matches when one of its sources,
//! one of its operations and all of its conditions do (a missing list is
//! no condition); each field given must match, patterns being exact,
//! `prefix*`, `*suffix` or `*`; hosts in any case, with or without their
//! port; addresses by the blocks (address or CIDR) that hold them. A
//! connection that is not HTTP is read as Istio reads a TCP connection
//! under rules with HTTP fields (hosts, paths, methods, gRPC methods,
//! conditions on request attributes): such a rule cannot match in an ALLOW
//! policy, and in a DENY policy its HTTP fields are dropped (the module
//! docs of [`super`] say the same per operation).
//!
//! The same policies, written as the objects a user writes, are parsed,
//! validated and compiled, and [`evaluate`] answers for every identity,
//! port and generated request of the case, at each layer the agent asks:
//!
//! - a request (`Layer::Request`) gets the reference's verdict, never
//!   `Inspect`, and a denial names the policy that decided it;
//! - a connection that is not HTTP (`Layer::Opaque`) likewise;
//! - a connection before any byte (`Layer::Connection`) is allowed only if
//!   every generated request and the opaque reading are, denied only if
//!   all of them are, since the agent reads no request after either; and
//!   it waits (`Inspect`) only when a policy applying to the destination
//!   has an HTTP field.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{
    AuthorizationPolicy, AuthorizationPolicySpec, Caller, Layer, Policy, Request, Verdict,
    evaluate, is_grpc, validate,
};
use crate::{
    identity::Identity,
    state::Workload,
    testing::{self, Rng},
};

const TRUST_DOMAINS: &[&str] = &["cluster.local", "corp.example"];
const NAMESPACES: &[&str] = &["shop", "dev", "ops", "ops-test"];
const ACCOUNTS: &[&str] = &["web", "client", "admin"];
/// 22 is never in a generated rule's `ports`, only in `notPorts`.
const PORTS: &[u16] = &[80, 8080, 9090, 22];
const PATHS: &[&str] = &[
    "/",
    "/api/v1/users",
    "/api/v2",
    "/admin",
    "/static/site.css",
    "/pkg.Greeter/SayHello",
    "/pkg.Greeter/Shout",
    "/ops.Health/Check",
];
const METHODS: &[&str] = &["GET", "POST", "DELETE", "HEAD"];
const GRPC: &[(&str, &[&str])] = &[
    ("pkg.Greeter", &["SayHello", "Shout"]),
    ("ops.Health", &["Check"]),
];
const HEADERS: &[(&str, &[&str])] = &[
    ("x-user", &["alice", "bob", "alice-admin"]),
    ("x-env", &["prod", "dev"]),
];
const LABELS: &[(&str, &str)] = &[("app", "web"), ("app", "db"), ("tier", "front")];
const HOSTS: &[&str] = &["web.shop", "web.shop.svc.cluster.local", "api.example.com"];
/// Callers' addresses and the blocks rules name (addresses and CIDRs).
const CALLER_IPS: &[&str] = &["10.1.0.5", "10.1.7.9", "192.168.3.4", "fd00::5"];
const DESTINATION_IPS: &[&str] = &["10.1.1.12", "fd00::c"];
const BLOCKS: &[&str] = &[
    "10.1.0.5",
    "10.1.0.0/16",
    "10.0.0.0/8",
    "192.168.0.0/16",
    "10.1.1.12",
    "fd00::5",
    "fd00::/8",
    "0.0.0.0/0",
];

#[derive(Clone, Debug, Default)]
struct Source {
    principals: Vec<String>,
    not_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<String>,
    not_ip_blocks: Vec<String>,
    remote_ip_blocks: Vec<String>,
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    /// Service, and method or all of them.
    grpc: Vec<(String, Option<String>)>,
    /// Ports written as strings, as Istio writes them, or as numbers.
    ports_as_text: bool,
}

#[derive(Clone, Debug)]
struct Condition {
    key: Key,
    values: Vec<String>,
    not_values: Vec<String>,
}

#[derive(Clone, Debug)]
enum Key {
    /// `request.headers[<name>]`, the name in any case.
    Header(String),
    /// `source.ip`, `remote.ip`, `destination.ip`, `destination.port`,
    /// `source.namespace` or `source.principal`.
    Connection(&'static str),
}

#[derive(Clone, Debug, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Clone, Debug)]
struct Pol {
    namespace: &'static str,
    name: String,
    selector: Option<Vec<(&'static str, &'static str)>>,
    deny: bool,
    /// AUDIT: decides nothing.
    audit: bool,
    rules: Vec<Rule>,
    /// An empty rule list written out (`rules: []`) rather than left out:
    /// both must mean the same.
    write_empty_rules: bool,
}

#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
    /// In any case, with a port or not.
    host: String,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

/// Who calls what: the caller's identity and address, the pod's address
/// and port.
#[derive(Clone, Copy, Debug)]
struct Call<'a> {
    who: &'a Identity,
    from: std::net::IpAddr,
    to: std::net::IpAddr,
    port: u16,
}

/// What the reference is told of the traffic.
#[derive(Clone, Copy, Debug)]
enum Seen<'a> {
    Request(&'a Req),
    /// Not HTTP.
    Opaque,
}

/// The reference's answer: allowed, or the policies that denied.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Decision {
    Allow,
    /// A DENY rule of each of these matched.
    DeniedBy(Vec<String>),
    /// ALLOW policies applied (these, in order) and none matched.
    NotAllowed(Vec<String>),
}

// ---- the reference ----

/// Exact, `prefix*`, `*suffix`, or `*` for any value.
fn fits(pattern: &str, value: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(""), _) => true,
        (Some(suffix), _) => value.ends_with(suffix),
        (None, Some(prefix)) => value.starts_with(prefix),
        (None, None) => pattern == value,
    }
}

/// A list given must have a pattern that fits; a `not` list must have none.
fn listed(yes: &[String], no: &[String], value: &str) -> bool {
    (yes.is_empty() || yes.iter().any(|p| fits(p, value))) && !no.iter().any(|p| fits(p, value))
}

/// Whether `block` (an address, or `address/length`) holds `addr`: the
/// first `length` bits are the same, in the same family.
fn holds(block: &str, addr: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let (net, len) = match block.split_once('/') {
        Some((net, len)) => (net, len.parse::<u32>().expect("length")),
        None => (block, if block.contains(':') { 128 } else { 32 }),
    };
    let bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    };
    let (net, width) = bits(net.parse().expect("address"));
    let (addr, addr_width) = bits(addr);
    let shift = width - len;
    width == addr_width && (len == 0 || net >> shift == addr >> shift)
}

/// A block list given must hold the address; a `not` list must not.
fn in_list(yes: &[String], no: &[String], addr: std::net::IpAddr) -> bool {
    (yes.is_empty() || yes.iter().any(|b| holds(b, addr))) && !no.iter().any(|b| holds(b, addr))
}

impl Source {
    fn matches(&self, call: Call<'_>) -> bool {
        let who = call.who;
        let principal = format!(
            "{}/ns/{}/sa/{}",
            who.trust_domain, who.namespace, who.service_account
        );
        let strip = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_owned())
                .collect()
        };
        listed(
            &strip(&self.principals),
            &strip(&self.not_principals),
            &principal,
        ) && listed(&self.namespaces, &self.not_namespaces, &who.namespace)
            && in_list(&self.ip_blocks, &self.not_ip_blocks, call.from)
            && in_list(
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
                call.from,
            )
    }
}

impl Operation {
    fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.grpc.is_empty())
    }

    fn port_matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }

    fn matches(&self, port: u16, request: &Req) -> bool {
        let grpc_call = request_is_grpc(request);
        let host = request.host.to_ascii_lowercase();
        let bare = host.split(':').next().unwrap_or_default().to_owned();
        let lower =
            |l: &[String]| -> Vec<String> { l.iter().map(|p| p.to_ascii_lowercase()).collect() };
        let (hosts, not_hosts) = (lower(&self.hosts), lower(&self.not_hosts));
        let host_in = |list: &[String]| list.iter().any(|p| fits(p, &host) || fits(p, &bare));
        self.port_matches(port)
            && (hosts.is_empty() || host_in(&hosts))
            && !host_in(&not_hosts)
            && listed(&self.paths, &self.not_paths, request.path)
            && listed(&self.methods, &self.not_methods, request.method)
            && (self.grpc.is_empty()
                || grpc_call
                    && self.grpc.iter().any(|(service, method)| {
                        let call = request.path.strip_prefix('/').unwrap_or("");
                        match call.split_once('/') {
                            Some((s, m)) => {
                                s == service && method.as_deref().is_none_or(|want| want == m)
                            }
                            None => false,
                        }
                    }))
    }
}

fn request_is_grpc(request: &Req) -> bool {
    request
        .headers
        .iter()
        .any(|(k, v)| *k == "content-type" && v.starts_with("application/grpc"))
}

impl Condition {
    fn is_http(&self) -> bool {
        matches!(self.key, Key::Header(_))
    }

    /// A connection's attribute, in `call`: addresses by block, the rest
    /// by pattern.
    fn holds_for(&self, call: Call<'_>) -> bool {
        let Key::Connection(key) = self.key else {
            unreachable!("a request's attribute")
        };
        let addr = match key {
            "source.ip" | "remote.ip" => Some(call.from),
            "destination.ip" => Some(call.to),
            _ => None,
        };
        if let Some(addr) = addr {
            return in_list(&self.values, &self.not_values, addr);
        }
        let value = match key {
            "destination.port" => call.port.to_string(),
            "source.namespace" => call.who.namespace.clone(),
            _ => format!(
                "{}/ns/{}/sa/{}",
                call.who.trust_domain, call.who.namespace, call.who.service_account
            ),
        };
        let strip = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_owned())
                .collect()
        };
        listed(&strip(&self.values), &strip(&self.not_values), &value)
    }

    /// Header names are case-blind; the header must have a value in
    /// `values` (if given) and none in `notValues` (an absent header has
    /// none).
    fn holds(&self, call: Call<'_>, request: &Req) -> bool {
        let Key::Header(header) = &self.key else {
            return self.holds_for(call);
        };
        let name = header.to_ascii_lowercase();
        let values: Vec<&str> = request
            .headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .collect();
        let some = |patterns: &[String]| values.iter().any(|v| patterns.iter().any(|p| fits(p, v)));
        (self.values.is_empty() || some(&self.values)) && !some(&self.not_values)
    }
}

impl Rule {
    fn matches(&self, call: Call<'_>, seen: Seen<'_>, deny: bool) -> bool {
        let port = call.port;
        if !(self.from.is_empty() || self.from.iter().any(|s| s.matches(call))) {
            return false;
        }
        match seen {
            Seen::Request(request) => {
                (self.to.is_empty() || self.to.iter().any(|op| op.matches(port, request)))
                    && self.when.iter().all(|c| c.holds(call, request))
            }
            // DENY: the HTTP fields are dropped, ports and the
            // connection's attributes still count.
            Seen::Opaque if deny => {
                (self.to.is_empty() || self.to.iter().any(|op| op.port_matches(port)))
                    && self
                        .when
                        .iter()
                        .filter(|c| !c.is_http())
                        .all(|c| c.holds_for(call))
            }
            // ALLOW: an HTTP field cannot match.
            Seen::Opaque => {
                self.when.iter().all(|c| !c.is_http() && c.holds_for(call))
                    && (self.to.is_empty()
                        || self
                            .to
                            .iter()
                            .any(|op| !op.has_http_fields() && op.port_matches(port)))
            }
        }
    }
}

impl Pol {
    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn applies_to(&self, workload: &Workload) -> bool {
        self.namespace == workload.namespace
            && self.selector.as_ref().is_none_or(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    fn has_http_fields(&self) -> bool {
        self.rules.iter().any(|r| {
            r.when.iter().any(Condition::is_http) || r.to.iter().any(Operation::has_http_fields)
        })
    }
}

fn decide(policies: &[Pol], call: Call<'_>, workload: &Workload, seen: Seen<'_>) -> Decision {
    let applying: Vec<&Pol> = policies
        .iter()
        .filter(|p| !p.audit && p.applies_to(workload))
        .collect();
    let matched = |p: &Pol| p.rules.iter().any(|r| r.matches(call, seen, p.deny));
    let denied: Vec<String> = applying
        .iter()
        .filter(|p| p.deny && matched(p))
        .map(|p| p.id())
        .collect();
    if !denied.is_empty() {
        return Decision::DeniedBy(denied);
    }
    let allow: Vec<&&Pol> = applying.iter().filter(|p| !p.deny).collect();
    if allow.is_empty() || allow.iter().any(|p| matched(p)) {
        Decision::Allow
    } else {
        Decision::NotAllowed(allow.iter().map(|p| p.id()).collect())
    }
}

// ---- generating ----

/// A pattern that `value` may or may not fit: exact, a prefix of it, a
/// suffix of it, or `*`.
fn pattern_for(rng: &mut Rng, value: &str) -> String {
    let cut = 1 + rng.below(value.len().max(2) - 1);
    match rng.below(6) {
        0 => "*".into(),
        1 => format!("{}*", &value[..cut.min(value.len())]),
        2 => format!("*{}", &value[cut.min(value.len())..]),
        _ => value.into(),
    }
}

fn some_patterns(rng: &mut Rng, values: &[&str]) -> Vec<String> {
    (0..1 + rng.below(2))
        .map(|_| {
            let value = rng.pick(values);
            pattern_for(rng, value)
        })
        .collect()
}

/// A field given a third of the time.
fn maybe(rng: &mut Rng, values: &[&str]) -> Vec<String> {
    if rng.chance(33) {
        some_patterns(rng, values)
    } else {
        Vec::new()
    }
}

fn principals(rng: &mut Rng) -> Vec<String> {
    (0..1 + rng.below(2))
        .map(|_| {
            let principal = format!(
                "{}/ns/{}/sa/{}",
                rng.pick(TRUST_DOMAINS),
                rng.pick(NAMESPACES),
                rng.pick(ACCOUNTS)
            );
            let pattern = pattern_for(rng, &principal);
            // The scheme may be written in front of a pattern that has no
            // leading `*` (`spiffe://*x` would be a `*` in the middle).
            if rng.chance(20) && !pattern.starts_with('*') {
                format!("spiffe://{pattern}")
            } else {
                pattern
            }
        })
        .collect()
}

fn source(rng: &mut Rng) -> Source {
    Source {
        principals: if rng.chance(40) {
            principals(rng)
        } else {
            Vec::new()
        },
        not_principals: if rng.chance(20) {
            principals(rng)
        } else {
            Vec::new()
        },
        namespaces: maybe(rng, NAMESPACES),
        not_namespaces: if rng.chance(20) {
            some_patterns(rng, NAMESPACES)
        } else {
            Vec::new()
        },
        ip_blocks: blocks(rng, 25),
        not_ip_blocks: blocks(rng, 15),
        remote_ip_blocks: blocks(rng, 10),
        not_remote_ip_blocks: blocks(rng, 10),
    }
}

/// Blocks, `percent` of the time.
fn blocks(rng: &mut Rng, percent: u64) -> Vec<String> {
    if rng.chance(percent) {
        (0..1 + rng.below(2))
            .map(|_| rng.pick(BLOCKS).to_owned())
            .collect()
    } else {
        Vec::new()
    }
}

/// Host patterns, in any case.
fn hosts(rng: &mut Rng) -> Vec<String> {
    maybe(rng, HOSTS)
        .into_iter()
        .map(|h| {
            if rng.chance(20) {
                h.to_ascii_uppercase()
            } else {
                h
            }
        })
        .collect()
}

fn ports(rng: &mut Rng, from: &[u16]) -> Vec<u16> {
    if rng.chance(35) {
        (0..1 + rng.below(2)).map(|_| rng.pick(from)).collect()
    } else {
        Vec::new()
    }
}

fn operation(rng: &mut Rng) -> Operation {
    // Half the operations are L4 only.
    let http = rng.chance(50);
    let mut op = Operation {
        ports: ports(rng, &PORTS[..3]),
        not_ports: ports(rng, PORTS),
        ports_as_text: rng.chance(50),
        ..Operation::default()
    };
    if http {
        op.hosts = hosts(rng);
        op.not_hosts = hosts(rng);
        op.paths = maybe(rng, PATHS);
        op.not_paths = maybe(rng, PATHS);
        op.methods = maybe(rng, METHODS);
        op.not_methods = maybe(rng, METHODS);
        if rng.chance(25) {
            let (service, methods) = rng.pick(GRPC);
            let method = rng.chance(60).then(|| rng.pick(methods).to_owned());
            op.grpc.push((service.to_owned(), method));
        }
    }
    op
}

fn condition(rng: &mut Rng) -> Condition {
    // A third are of the connection.
    if rng.chance(33) {
        let key = rng.pick(&[
            "source.ip",
            "remote.ip",
            "destination.ip",
            "destination.port",
            "source.namespace",
            "source.principal",
        ]);
        let values = |rng: &mut Rng| -> Vec<String> {
            match key {
                "destination.port" => (0..1 + rng.below(2))
                    .map(|_| rng.pick(PORTS).to_string())
                    .collect(),
                "source.namespace" => some_patterns(rng, NAMESPACES),
                "source.principal" => principals(rng),
                _ => (0..1 + rng.below(2))
                    .map(|_| rng.pick(BLOCKS).to_owned())
                    .collect(),
            }
        };
        let (yes, no) = match rng.below(3) {
            0 => (values(rng), Vec::new()),
            1 => (Vec::new(), values(rng)),
            _ => (values(rng), values(rng)),
        };
        return Condition {
            key: Key::Connection(key),
            values: yes,
            not_values: no,
        };
    }
    let (name, values) = rng.pick(HEADERS);
    let header = name
        .chars()
        .map(|c| {
            if rng.chance(30) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let (yes, no) = match rng.below(3) {
        0 => (some_patterns(rng, values), Vec::new()),
        1 => (Vec::new(), some_patterns(rng, values)),
        _ => (some_patterns(rng, values), some_patterns(rng, values)),
    };
    Condition {
        key: Key::Header(header),
        values: yes,
        not_values: no,
    }
}

/// One or two items, or (four times in ten) none.
fn few<T>(rng: &mut Rng, item: fn(&mut Rng) -> T) -> Vec<T> {
    if rng.chance(60) {
        (0..1 + rng.below(2)).map(|_| item(rng)).collect()
    } else {
        Vec::new()
    }
}

fn rule(rng: &mut Rng) -> Rule {
    Rule {
        from: few(rng, source),
        to: few(rng, operation),
        when: if rng.chance(20) {
            vec![condition(rng)]
        } else {
            Vec::new()
        },
    }
}

fn policy(rng: &mut Rng, n: usize) -> Pol {
    Pol {
        // One in six in another namespace, where it must not apply.
        namespace: if rng.chance(16) { "dev" } else { "shop" },
        name: format!("p{n}"),
        selector: rng.chance(35).then(|| {
            // One value per key, as in the map a user writes.
            let mut labels: Vec<(&str, &str)> = Vec::new();
            for _ in 0..1 + rng.below(2) {
                let (key, value) = rng.pick(LABELS);
                labels.retain(|(k, _)| *k != key);
                labels.push((key, value));
            }
            labels
        }),
        deny: rng.chance(40),
        audit: rng.chance(8),
        // Some policies have no rules: ALLOW allows nothing, DENY denies
        // nothing.
        rules: if rng.chance(8) {
            Vec::new()
        } else {
            (0..1 + rng.below(3)).map(|_| rule(rng)).collect()
        },
        write_empty_rules: rng.chance(50),
    }
}

fn request(rng: &mut Rng) -> Req {
    let path = rng.pick(PATHS);
    let mut headers = Vec::new();
    for (name, values) in HEADERS {
        for _ in 0..rng.below(3) {
            headers.push((*name, rng.pick(values)));
        }
    }
    // gRPC calls and a path that looks like one without the content type.
    match rng.below(4) {
        0 => headers.push(("content-type", "application/grpc")),
        1 => headers.push(("content-type", "application/grpc+proto")),
        2 => headers.push(("content-type", "application/json")),
        _ => {}
    }
    let mut host = rng.pick(HOSTS).to_owned();
    if rng.chance(30) {
        host = host.to_ascii_uppercase();
    }
    if rng.chance(40) {
        host.push_str(":8080");
    }
    Req {
        host,
        method: if path.starts_with("/pkg.") || path.starts_with("/ops.") {
            rng.pick(&["POST", "GET"])
        } else {
            rng.pick(METHODS)
        },
        path,
        headers,
    }
}

// ---- the objects a user writes ----

fn spec_json(p: &Pol) -> Value {
    let strings = |v: &[String]| json!(v);
    let source = |s: &Source| {
        let mut o = serde_json::Map::new();
        for (key, list) in [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if !list.is_empty() {
                o.insert(key.into(), strings(list));
            }
        }
        json!({"source": o})
    };
    let operation = |op: &Operation| {
        let mut o = serde_json::Map::new();
        let port_list = |ports: &[u16]| -> Value {
            if op.ports_as_text {
                json!(ports.iter().map(u16::to_string).collect::<Vec<_>>())
            } else {
                json!(ports)
            }
        };
        for (key, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
            if !list.is_empty() {
                o.insert(key.into(), port_list(list));
            }
        }
        for (key, list) in [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
        ] {
            if !list.is_empty() {
                o.insert(key.into(), strings(list));
            }
        }
        if !op.grpc.is_empty() {
            let calls: Vec<Value> = op
                .grpc
                .iter()
                .map(|(service, method)| match method {
                    Some(m) => json!({"service": service, "method": m}),
                    None => json!({"service": service}),
                })
                .collect();
            o.insert("grpcMethods".into(), json!(calls));
        }
        json!({"operation": o})
    };
    let condition = |c: &Condition| {
        let mut o = serde_json::Map::new();
        let key = match &c.key {
            Key::Header(name) => format!("request.headers[{name}]"),
            Key::Connection(key) => (*key).to_owned(),
        };
        o.insert("key".into(), json!(key));
        if !c.values.is_empty() {
            o.insert("values".into(), strings(&c.values));
        }
        if !c.not_values.is_empty() {
            o.insert("notValues".into(), strings(&c.not_values));
        }
        Value::Object(o)
    };
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            let mut o = serde_json::Map::new();
            if !r.from.is_empty() {
                o.insert("from".into(), r.from.iter().map(source).collect());
            }
            if !r.to.is_empty() {
                o.insert("to".into(), r.to.iter().map(operation).collect());
            }
            if !r.when.is_empty() {
                o.insert("when".into(), r.when.iter().map(condition).collect());
            }
            Value::Object(o)
        })
        .collect();
    let mut spec = serde_json::Map::new();
    if let Some(labels) = &p.selector {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        spec.insert("selector".into(), json!({"matchLabels": labels}));
    }
    if p.audit {
        spec.insert("action".into(), json!("AUDIT"));
    } else if p.deny {
        spec.insert("action".into(), json!("DENY"));
    }
    if !rules.is_empty() || p.write_empty_rules {
        spec.insert("rules".into(), json!(rules));
    }
    Value::Object(spec)
}

fn compile(p: &Pol) -> Policy {
    let spec: AuthorizationPolicySpec =
        serde_json::from_value(spec_json(p)).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    validate(&spec).unwrap_or_else(|e| panic!("{}: {e:?}", spec_json(p)));
    Policy::compile(&AuthorizationPolicy {
        metadata: kube::api::ObjectMeta {
            namespace: Some(p.namespace.into()),
            name: Some(p.name.clone()),
            ..kube::api::ObjectMeta::default()
        },
        spec,
    })
}

fn workload(rng: &mut Rng) -> Workload {
    let mut labels = vec![("app", rng.pick(&["web", "db"]))];
    if rng.chance(50) {
        labels.push(("tier", "front"));
    }
    testing::workload("shop", "dest", "dest", &labels)
}

/// Whether the agent's verdict is the reference's decision, naming a
/// policy that decided it.
fn agrees(verdict: &Verdict, decision: &Decision) -> bool {
    match (verdict, decision) {
        (Verdict::Allow, Decision::Allow) => true,
        (Verdict::Deny { policy, .. }, Decision::DeniedBy(ids)) => ids.contains(policy),
        (Verdict::Deny { policy, .. }, Decision::NotAllowed(ids)) => *policy == ids.join(","),
        _ => false,
    }
}

/// Checks one generated case; returns how many questions it asked.
fn check_case(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let model: Vec<Pol> = (0..1 + rng.below(4)).map(|n| policy(&mut rng, n)).collect();
    let compiled: Vec<Policy> = model.iter().map(compile).collect();
    let dest = workload(&mut rng);
    let to: std::net::IpAddr = rng.pick(DESTINATION_IPS).parse().expect("address");
    let requests: Vec<Req> = (0..16).map(|_| request(&mut rng)).collect();
    let header_maps: Vec<http::HeaderMap> = requests
        .iter()
        .map(|r| {
            let mut map = http::HeaderMap::new();
            for (k, v) in &r.headers {
                map.append(
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                );
            }
            map
        })
        .collect();
    let written = || {
        model
            .iter()
            .map(|p| format!("{} {}", p.id(), spec_json(p)))
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    let http_applies = model
        .iter()
        .any(|p| p.applies_to(&dest) && p.has_http_fields());
    let mut asked = 0;
    for td in TRUST_DOMAINS {
        for ns in NAMESPACES {
            for sa in ACCOUNTS {
                let who = Identity::new(td, ns, sa);
                let from: std::net::IpAddr = rng.pick(CALLER_IPS).parse().expect("address");
                let caller = Caller::new(&who, from);
                for &port in PORTS {
                    let call = Call {
                        who: &who,
                        from,
                        to,
                        port,
                    };
                    let at = std::net::SocketAddr::new(to, port);
                    let context = || {
                        format!(
                            "seed {seed}: {td}/ns/{ns}/sa/{sa} at {from} to {at} of {:?}\n  {}",
                            dest.labels,
                            written()
                        )
                    };
                    let mut decisions = Vec::new();
                    for (req, headers) in requests.iter().zip(&header_maps) {
                        let layer = Layer::Request(Request {
                            method: req.method,
                            host: Some(&req.host),
                            path: req.path,
                            headers,
                            grpc: is_grpc(headers),
                            auth: None,
                        });
                        let verdict = evaluate(&compiled, caller, &dest, at, layer);
                        let decision = decide(&model, call, &dest, Seen::Request(req));
                        assert!(
                            agrees(&verdict, &decision),
                            "{}\n  request {req:?}: agent {verdict:?}, reference {decision:?}",
                            context()
                        );
                        decisions.push(decision);
                    }
                    let verdict = evaluate(&compiled, caller, &dest, at, Layer::Opaque);
                    let decision = decide(&model, call, &dest, Seen::Opaque);
                    assert!(
                        agrees(&verdict, &decision),
                        "{}\n  not HTTP: agent {verdict:?}, reference {decision:?}",
                        context()
                    );
                    decisions.push(decision);
                    let connection = evaluate(&compiled, caller, &dest, at, Layer::Connection);
                    let all_allowed = decisions.iter().all(|d| *d == Decision::Allow);
                    let none_allowed = decisions.iter().all(|d| *d != Decision::Allow);
                    match connection {
                        Verdict::Allow => assert!(
                            all_allowed,
                            "{}\n  the connection was allowed before any request, but the reference denies some: {decisions:?}",
                            context()
                        ),
                        Verdict::Deny { .. } => assert!(
                            none_allowed,
                            "{}\n  the connection was denied before any request, but the reference allows some: {decisions:?}",
                            context()
                        ),
                        Verdict::Inspect => assert!(
                            http_applies,
                            "{}\n  the connection waits for requests, but no policy applying has an HTTP field",
                            context()
                        ),
                    }
                    asked += decisions.len() + 1;
                }
            }
        }
    }
    asked
}

#[test]
fn generated_policies_decide_as_the_reference() {
    let cases = testing::cases("TRELLIS_AUTHZ_CASES", 300);
    let asked: usize = (0..cases).map(|case| check_case(0x7a11 ^ case)).sum();
    // Every case asks each identity on each port about 16 requests, the
    // opaque reading and the connection.
    assert!(asked >= cases as usize * 2 * 4 * 3 * 4 * 18, "{asked}");
}
