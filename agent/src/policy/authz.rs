//! `AuthorizationPolicy` (`trellis.dev/v1alpha1`; its CRD is generated
//! from these types, see [`crate::crds`]): rules by source principal,
//! namespace and address, destination port and the connection's attributes
//! (L4), and by HTTP host, path, method, gRPC method and request headers
//! (L7), as Istio writes them.
//!
//! A policy applies to the pods of its namespace that its `selector` matches
//! (all of them without one). Semantics, in order: a matching `DENY` rule
//! denies; else, when ALLOW policies apply to the workload, one of their
//! rules must match; with no policy the connection is allowed. Identity is
//! the peer certificate's (HBONE) or the local client pod's, never a header.
//!
//! L7 conditions are decided per request by the destination's agent. When a
//! connection's verdict hangs on them, [`authorize`] says
//! [`Verdict::Inspect`]: the agent reads the connection as HTTP and asks
//! again for each request. A connection that turns out not to be HTTP is
//! judged on what can be known of it: in an ALLOW rule, an operation or a
//! `when` with L7 conditions does not match it (another operation of the
//! rule still may); a DENY rule with L7 conditions matches it on its L4
//! part alone.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::authn::{self, Authenticated};
use crate::{crds::schema, identity::Identity, state::Workload};

/// Who may connect to which meshed workloads: L4 rules (source principal,
/// namespace and address, destination port) and L7 ones (HTTP hosts,
/// paths, methods, gRPC methods, request headers), in Istio's shape. DENY wins; when ALLOW
/// policies select a workload, one of their rules must match; with no
/// policy everything is allowed. L7 rules are decided per request by the
/// destination's agent (403, or PERMISSION_DENIED for gRPC).
// The derive makes the object as written in the config folder or the API
// server, and its CRD.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    doc = "Trellis AuthorizationPolicy: who may connect to which meshed workloads.",
    namespaced,
    shortname = "tap",
    derive = "PartialEq",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // The API server refuses what `validate` refuses of the provider (the
    // agent checks it again, for the config folder).
    validation = Rule::new(
        "!has(self.spec.action) || self.spec.action != 'CUSTOM' || has(self.spec.provider)"
    )
    .message("a CUSTOM policy names the provider to ask"),
    validation = Rule::new(
        "!has(self.spec.provider) || (has(self.spec.action) && self.spec.action == 'CUSTOM')"
    )
    .message("only a CUSTOM policy names a provider")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Which pods of the namespace it applies to; all of them when absent.
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Action,
    /// The external authorization service a CUSTOM policy asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// Any one rule matching is enough. An ALLOW policy without rules allows
    /// nothing (Istio's "allow-nothing").
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// The request goes to the policy's `provider` (an external
    /// authorization service of the mesh configuration) when a rule matches;
    /// its answer decides, before DENY and ALLOW policies are applied.
    Custom,
    /// A matching rule marks the connection or request for audit: one
    /// line at log target `audit`, whatever the other policies decide. It
    /// allows and denies nothing.
    Audit,
}

/// The extension provider a CUSTOM policy asks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    /// An `extensionProviders` name of the mesh configuration (the
    /// `trellis-mesh` ConfigMap).
    pub name: String,
}

/// Matches when one of `from` matches (or there is none) and one of `to`
/// matches (or there is none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    /// Every condition must hold.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// Istio's `when`: `key` is `request.headers[<name>]`, an attribute of
/// the request's verified token (`RequestAuthentication`):
/// `request.auth.principal` (`<iss>/<sub>`), `request.auth.audiences`,
/// `request.auth.presenter` (`azp`) or `request.auth.claims[<name>]`
/// (nested: `[<name>][<name>]`; a list claim matches by any element), or
/// one of the connection: `source.ip`, `remote.ip`, `destination.ip`
/// (values are addresses or CIDRs), `destination.port`, `source.namespace`,
/// `source.principal`. The attribute must have one of `values` and none of
/// `notValues` (an absent one has none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    // The schema's pattern is the keys' shape (a line of a CRD has room for
    // no more); validation names the keys.
    #[schemars(regex(
        pattern = r"^(request\.(headers|auth\.claims)(\[[^\]]+\])+|request\.auth\.[a-z]+|(source|remote|destination)\.[a-z]+)$"
    ))]
    pub key: String,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub values: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Every field given must match (an empty list is no condition). Patterns
/// are exact, `prefix*`, `*suffix` or `*`; principals are written
/// `<trust-domain>/ns/<ns>/sa/<sa>` as in Istio (a `spiffe://` in front is
/// accepted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub principals: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_principals: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub namespaces: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_namespaces: Vec<String>,
    /// Request principals (`<iss>/<sub>` of a token a
    /// `RequestAuthentication` verified); `*` is any verified token.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub request_principals: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_request_principals: Vec<String>,
    /// The caller's address, as `10.1.0.7` or `10.1.0.0/16`: its pod's own
    /// when the agent has proven it (same node, or HBONE's `forwarded`
    /// matched to the certificate), else its node's.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_ip_blocks: Vec<String>,
    /// The original client's address; with no trusted proxies in front
    /// (Istio's default), the caller's, as `ipBlocks`.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub not_ports: Vec<PortValue>,
    /// HTTP hosts (`Host` or `:authority`, with or without its port),
    /// patterns as for principals, in any case.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub hosts: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_hosts: Vec<String>,
    /// HTTP request paths (no query), patterns as for principals.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub paths: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_paths: Vec<String>,
    /// HTTP methods, as `GET` or `*`.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub methods: Vec<String>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub not_methods: Vec<String>,
    /// gRPC calls (requests with a `application/grpc` content type).
    #[serde(default)]
    pub grpc_methods: Vec<GrpcMethod>,
}

/// A gRPC service (`package.Service`) and one of its methods, or all of
/// them when `method` is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethod {
    #[schemars(length(min = 1))]
    pub service: String,
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub method: Option<String>,
}

/// Istio writes ports as strings; a number is accepted too.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
#[schemars(with = "schema::PortNumber")]
pub enum PortValue {
    Number(i64),
    Text(String),
}

impl PortValue {
    fn port(&self) -> Option<u16> {
        match self {
            Self::Number(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
            Self::Text(s) => port_number(s),
        }
    }
}

/// A port written as text (`"8080"`), 1-65535.
pub(super) fn port_number(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Checks what the schema cannot say: a field path and a reason.
pub fn validate(spec: &AuthorizationPolicySpec) -> Result<(), (String, String)> {
    match (spec.action, &spec.provider) {
        (Action::Custom, None) => {
            return Err((
                "spec.provider".into(),
                "a CUSTOM policy names the provider to ask".into(),
            ));
        }
        (Action::Custom, Some(p)) if p.name.is_empty() => {
            return Err(("spec.provider.name".into(), "empty".into()));
        }
        (Action::Allow | Action::Deny | Action::Audit, Some(_)) => {
            return Err((
                "spec.provider".into(),
                "only a CUSTOM policy names a provider".into(),
            ));
        }
        _ => {}
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        for (f, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            for (name, list) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                for (i, pattern) in list.iter().enumerate() {
                    check_pattern(pattern).map_err(|reason| {
                        (
                            format!("spec.rules[{r}].from[{f}].source.{name}[{i}]"),
                            reason,
                        )
                    })?;
                }
            }
            for (name, list) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                for (i, block) in list.iter().enumerate() {
                    ip_block(block).map_err(|reason| {
                        (
                            format!("spec.rules[{r}].from[{f}].source.{name}[{i}]"),
                            reason,
                        )
                    })?;
                }
            }
        }
        for (t, to) in rule.to.iter().enumerate() {
            let op = &to.operation;
            let field =
                |name: &str, i: usize| format!("spec.rules[{r}].to[{t}].operation.{name}[{i}]");
            for (name, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                for (i, port) in list.iter().enumerate() {
                    if port.port().is_none() {
                        return Err((field(name, i), format!("{port:?} is not a port (1-65535)")));
                    }
                }
            }
            for (name, list) in [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
            ] {
                for (i, pattern) in list.iter().enumerate() {
                    check_pattern(pattern).map_err(|reason| (field(name, i), reason))?;
                }
            }
            for (i, g) in op.grpc_methods.iter().enumerate() {
                let bad = |part: &str, value: &str| {
                    (value.is_empty() || value.contains(['/', '*', ' '])).then(|| {
                        (
                            format!("{}.{part}", field("grpcMethods", i)),
                            format!("{value:?}: a gRPC {part} name, without `/`, `*` or spaces"),
                        )
                    })
                };
                if let Some(e) = bad("service", &g.service)
                    .or_else(|| g.method.as_deref().and_then(|m| bad("method", m)))
                {
                    return Err(e);
                }
            }
        }
        for (c, cond) in rule.when.iter().enumerate() {
            let field = format!("spec.rules[{r}].when[{c}]");
            let attribute = Attribute::parse(&cond.key).ok_or_else(|| {
                (
                    format!("{field}.key"),
                    format!(
                        "{:?}: the supported keys are request.headers[<name>], request.auth.principal, \
                         request.auth.audiences, request.auth.presenter, request.auth.claims[<name>], \
                         source.ip, remote.ip, destination.ip, destination.port, source.namespace \
                         and source.principal",
                        cond.key
                    ),
                )
            })?;
            if cond.values.is_empty() && cond.not_values.is_empty() {
                return Err((field, "give values, notValues or both".into()));
            }
            for (name, list) in [("values", &cond.values), ("notValues", &cond.not_values)] {
                for (i, value) in list.iter().enumerate() {
                    match attribute {
                        _ if attribute.is_address() => ip_block(value).map(drop),
                        Attribute::DestinationPort => port_number(value)
                            .map(drop)
                            .ok_or_else(|| format!("{value:?} is not a port (1-65535)")),
                        _ => check_pattern(value),
                    }
                    .map_err(|reason| (format!("{field}.{name}[{i}]"), reason))?;
                }
            }
        }
    }
    Ok(())
}

/// What a `when` condition reads of a request or connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// A header, its name lower-cased.
    Header(http::HeaderName),
    Principal,
    Audiences,
    Presenter,
    /// A claim's path.
    Claim(Vec<String>),
    // Of the connection: known before any request.
    SourceIp,
    RemoteIp,
    DestinationIp,
    DestinationPort,
    SourceNamespace,
    SourcePrincipal,
}

impl Attribute {
    fn parse(key: &str) -> Option<Self> {
        match key {
            "source.ip" => return Some(Self::SourceIp),
            "remote.ip" => return Some(Self::RemoteIp),
            "destination.ip" => return Some(Self::DestinationIp),
            "destination.port" => return Some(Self::DestinationPort),
            "source.namespace" => return Some(Self::SourceNamespace),
            "source.principal" => return Some(Self::SourcePrincipal),
            _ => {}
        }
        if let Some(name) = key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            return http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
                .ok()
                .map(Self::Header);
        }
        match key {
            "request.auth.principal" => return Some(Self::Principal),
            "request.auth.audiences" => return Some(Self::Audiences),
            "request.auth.presenter" => return Some(Self::Presenter),
            _ => {}
        }
        let path = key
            .strip_prefix("request.auth.claims[")?
            .strip_suffix(']')?;
        let path: Vec<String> = path.split("][").map(String::from).collect();
        (!path.iter().any(|p| p.is_empty() || p.contains(['[', ']']))).then_some(Self::Claim(path))
    }

    /// Whether its values are addresses and CIDRs.
    fn is_address(&self) -> bool {
        matches!(self, Self::SourceIp | Self::RemoteIp | Self::DestinationIp)
    }

    /// The address an IP attribute reads.
    fn address(&self, check: &Check<'_>) -> Option<std::net::IpAddr> {
        match self {
            // No trusted proxies: the remote address is the caller's.
            Self::SourceIp | Self::RemoteIp => Some(check.source_ip),
            Self::DestinationIp => Some(check.destination.ip().to_canonical()),
            _ => None,
        }
    }

    /// The value a connection attribute reads (not the addresses).
    fn of_connection(&self, check: &Check<'_>) -> Option<String> {
        match self {
            Self::DestinationPort => Some(check.destination.port().to_string()),
            Self::SourceNamespace => Some(check.source.namespace.clone()),
            Self::SourcePrincipal => Some(check.principal.clone()),
            _ => None,
        }
    }

    /// The attribute's values in `request` (an attribute of the request).
    fn values<'r>(&self, request: &Request<'r>) -> Vec<std::borrow::Cow<'r, str>> {
        use serde_json::Value;
        let auth = request.auth;
        match self {
            Self::Header(name) => request
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(Into::into)
                .collect(),
            Self::Principal => auth.map(|a| a.principal().into()).into_iter().collect(),
            Self::Audiences => auth
                .into_iter()
                .flat_map(|a| super::jwt::strings(a.claims().get("aud")))
                .map(Into::into)
                .collect(),
            Self::Presenter => auth
                .and_then(|a| a.claims().get("azp")?.as_str())
                .map(Into::into)
                .into_iter()
                .collect(),
            // A list claim matches by any of its elements.
            Self::Claim(path) => match auth.and_then(|a| a.claim(path)) {
                Some(Value::Array(list)) => {
                    list.iter().filter_map(super::jwt::claim_text).collect()
                }
                Some(v) => super::jwt::claim_text(v).into_iter().collect(),
                None => Vec::new(),
            },
            Self::SourceIp
            | Self::RemoteIp
            | Self::DestinationIp
            | Self::DestinationPort
            | Self::SourceNamespace
            | Self::SourcePrincipal => Vec::new(),
        }
    }
}

/// An `ipBlocks` entry: an address (`10.1.0.7`, a block of one) or a
/// CIDR (`10.1.0.0/16`).
fn ip_block(text: &str) -> Result<super::network::Cidr, String> {
    if text.contains('/') {
        return super::network::cidr(text);
    }
    let addr: std::net::IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an address or a CIDR"))?;
    Ok(super::network::Cidr::host(addr.to_canonical()))
}

/// Whether `addr` lies in one of `blocks`.
fn in_blocks(blocks: &[super::network::Cidr], addr: std::net::IpAddr) -> bool {
    let one = super::network::Cidr::host(addr);
    blocks.iter().any(|b| b.contains(&one))
}

fn check_pattern(pattern: &str) -> Result<(), String> {
    let inner = pattern
        .strip_prefix('*')
        .or_else(|| pattern.strip_suffix('*'))
        .unwrap_or(pattern);
    if pattern.is_empty() {
        Err("empty: use \"*\" to match anything".into())
    } else if inner.contains('*') {
        Err(format!(
            "{pattern:?}: `*` may only stand at the start or the end"
        ))
    } else {
        Ok(())
    }
}

/// A policy ready to evaluate, as the state snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    /// A CUSTOM policy's provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub rules: Vec<CompiledRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompiledRule {
    pub from: Vec<CompiledSource>,
    pub to: Vec<CompiledOperation>,
    pub when: Vec<CompiledCondition>,
}

/// A source as written, with its address blocks parsed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompiledSource {
    #[serde(flatten)]
    pub source: Source,
    /// `ipBlocks` and `remoteIpBlocks` (one address is both), and their
    /// `not` lists.
    #[serde(skip)]
    blocks: [Vec<super::network::Cidr>; 2],
    #[serde(skip)]
    not_blocks: [Vec<super::network::Cidr>; 2],
}

impl CompiledSource {
    fn new(source: &Source) -> Self {
        let parse = |list: &[String]| list.iter().filter_map(|b| ip_block(b).ok()).collect();
        Self {
            blocks: [parse(&source.ip_blocks), parse(&source.remote_ip_blocks)],
            not_blocks: [
                parse(&source.not_ip_blocks),
                parse(&source.not_remote_ip_blocks),
            ],
            source: source.clone(),
        }
    }

    /// Whether the caller's address is in the blocks given and none of
    /// the `not` ones.
    fn address_matches(&self, addr: std::net::IpAddr) -> bool {
        self.blocks
            .iter()
            .all(|b| b.is_empty() || in_blocks(b, addr))
            && !self.not_blocks.iter().any(|b| in_blocks(b, addr))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompiledOperation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// Lower-cased.
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// `/service/method` or `/service/*` path patterns.
    pub grpc: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompiledCondition {
    /// As written.
    pub key: String,
    #[serde(skip)]
    pub attribute: Attribute,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
    /// `values` and `notValues` parsed, for an address attribute.
    #[serde(skip)]
    blocks: [Vec<super::network::Cidr>; 2],
}

impl Policy {
    /// Compiles a validated object.
    pub fn compile(object: &AuthorizationPolicy) -> Self {
        let ports = |list: &[PortValue]| list.iter().filter_map(PortValue::port).collect();
        let lower = |list: &[String]| list.iter().map(|h| h.to_ascii_lowercase()).collect();
        let operation = |op: &Operation| CompiledOperation {
            ports: ports(&op.ports),
            not_ports: ports(&op.not_ports),
            hosts: lower(&op.hosts),
            not_hosts: lower(&op.not_hosts),
            paths: op.paths.clone(),
            not_paths: op.not_paths.clone(),
            methods: op.methods.clone(),
            not_methods: op.not_methods.clone(),
            grpc: op
                .grpc_methods
                .iter()
                .map(|g| format!("/{}/{}", g.service, g.method.as_deref().unwrap_or("*")))
                .collect(),
        };
        Self {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            selector: object
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone()),
            action: object.spec.action,
            provider: object.spec.provider.as_ref().map(|p| p.name.clone()),
            rules: object
                .spec
                .rules
                .iter()
                .map(|r| CompiledRule {
                    from: r
                        .from
                        .iter()
                        .map(|f| CompiledSource::new(&f.source))
                        .collect(),
                    to: r.to.iter().map(|t| operation(&t.operation)).collect(),
                    when: r
                        .when
                        .iter()
                        .filter_map(|c| {
                            let attribute = Attribute::parse(&c.key)?;
                            let blocks = |list: &[String]| {
                                if attribute.is_address() {
                                    list.iter().filter_map(|b| ip_block(b).ok()).collect()
                                } else {
                                    Vec::new()
                                }
                            };
                            Some(CompiledCondition {
                                key: c.key.clone(),
                                blocks: [blocks(&c.values), blocks(&c.not_values)],
                                attribute,
                                values: c.values.clone(),
                                not_values: c.not_values.clone(),
                            })
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it selects `workload`.
    pub fn applies_to(&self, workload: &Workload) -> bool {
        selects(&self.namespace, self.selector.as_ref(), workload)
    }

    fn matches(&self, check: &Check<'_>) -> Match {
        self.rules
            .iter()
            .map(|rule| rule.matches(check))
            .max()
            .unwrap_or(Match::No)
    }
}

/// Whether a policy of `namespace` with `selector` (the whole namespace
/// without one) applies to `workload`: the rule of `AuthorizationPolicy`
/// and `RequestAuthentication` alike.
pub fn selects(
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    workload: &Workload,
) -> bool {
    namespace == workload.namespace
        && selector.is_none_or(|selector| selector_matches(selector, &workload.labels))
}

/// Whether a pod with `labels` has every label of `selector`.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a rule matches; `Unknown` while its L7 conditions wait for a
/// request. Ordered so that `max` is "any of" and `min` is "all of".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Match {
    No,
    Unknown,
    Yes,
}

impl std::convert::From<bool> for Match {
    fn from(b: bool) -> Self {
        if b { Self::Yes } else { Self::No }
    }
}

impl CompiledRule {
    fn matches(&self, check: &Check<'_>) -> Match {
        let from = if self.from.is_empty() {
            Match::Yes
        } else {
            self.from
                .iter()
                .map(|s| source_matches(s, check))
                .max()
                .unwrap_or(Match::No)
        };
        if from == Match::No {
            return Match::No;
        }
        let to = if self.to.is_empty() {
            Match::Yes
        } else {
            self.to
                .iter()
                .map(|op| op.matches(check))
                .max()
                .unwrap_or(Match::No)
        };
        let when = self
            .when
            .iter()
            .map(|c| c.holds(check))
            .min()
            .unwrap_or(Match::Yes);
        from.min(to).min(when)
    }
}

impl CompiledOperation {
    fn is_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.grpc.is_empty())
    }

    fn matches(&self, check: &Check<'_>) -> Match {
        let to = check.destination.port();
        let port =
            (self.ports.is_empty() || self.ports.contains(&to)) && !self.not_ports.contains(&to);
        if !port {
            return Match::No;
        }
        if !self.is_l7() {
            return Match::Yes;
        }
        let Some(request) = check.request() else {
            return Match::Unknown;
        };
        let listed = |list: &[String], value: &str| list.iter().any(|p| pattern_matches(p, value));
        // A host matches with or without its port, in any case.
        let host = request.host.map(str::to_ascii_lowercase);
        let host_listed = |list: &[String]| {
            host.as_deref().is_some_and(|h| {
                let bare = match h.rsplit_once(':') {
                    Some((name, port))
                        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        name
                    }
                    _ => h,
                };
                listed(list, h) || listed(list, bare)
            })
        };
        Match::from(
            (self.hosts.is_empty() || host_listed(&self.hosts))
                && !host_listed(&self.not_hosts)
                && (self.paths.is_empty() || listed(&self.paths, request.path))
                && !listed(&self.not_paths, request.path)
                && (self.methods.is_empty() || listed(&self.methods, request.method))
                && !listed(&self.not_methods, request.method)
                && (self.grpc.is_empty() || (request.grpc && listed(&self.grpc, request.path))),
        )
    }
}

impl CompiledCondition {
    /// Attributes of the connection decide at once; those of a request
    /// wait for one.
    fn holds(&self, check: &Check<'_>) -> Match {
        if let Some(addr) = self.attribute.address(check) {
            let [yes, no] = &self.blocks;
            return Match::from(
                (self.values.is_empty() || in_blocks(yes, addr)) && !in_blocks(no, addr),
            );
        }
        let values: Vec<std::borrow::Cow<'_, str>> = match self.attribute.of_connection(check) {
            Some(value) => vec![value.into()],
            None => match check.request() {
                Some(request) => self.attribute.values(&request),
                None => return Match::Unknown,
            },
        };
        let any = |patterns: &[String]| {
            values
                .iter()
                .any(|v| patterns.iter().any(|p| pattern_matches(p, v)))
        };
        Match::from((self.values.is_empty() || any(&self.values)) && !any(&self.not_values))
    }
}

/// A source's L4 fields decide at once; its request principals only with a
/// request to read (a request without a verified token has none, so it
/// matches no `requestPrincipals` and every `notRequestPrincipals`).
fn source_matches(compiled: &CompiledSource, check: &Check<'_>) -> Match {
    let (source, principal, ns) = (
        &compiled.source,
        check.principal.as_str(),
        check.source.namespace.as_str(),
    );
    let any = |patterns: &[String], value: &str| patterns.iter().any(|p| pattern_matches(p, value));
    let l4 = (source.principals.is_empty() || any(&source.principals, principal))
        && !any(&source.not_principals, principal)
        && (source.namespaces.is_empty() || any(&source.namespaces, ns))
        && !any(&source.not_namespaces, ns)
        && compiled.address_matches(check.source_ip);
    if !l4 {
        return Match::No;
    }
    if source.request_principals.is_empty() && source.not_request_principals.is_empty() {
        return Match::Yes;
    }
    let Some(request) = check.request() else {
        return Match::Unknown;
    };
    let token = request.auth.map(|a| a.principal());
    Match::from(
        (source.request_principals.is_empty()
            || token.is_some_and(|t| any(&source.request_principals, t)))
            && !token.is_some_and(|t| any(&source.not_request_principals, t)),
    )
}

fn pattern_matches(pattern: &str, value: &str) -> bool {
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        value == pattern
    }
}

/// One HTTP request, as L7 conditions read it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `:authority`, else `Host`.
    pub host: Option<&'a str>,
    /// Without the query.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// A gRPC call (`content-type: application/grpc...`).
    pub grpc: bool,
    /// Its verified token (`RequestAuthentication`), if it carries one.
    pub auth: Option<&'a Authenticated>,
}

impl<'a> Request<'a> {
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method().as_str(),
            host: req.uri().authority().map(|a| a.as_str()).or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            }),
            path: req.uri().path(),
            headers: req.headers(),
            grpc: is_grpc(req.headers()),
            auth: None,
        }
    }
}

/// Whether a request's content type makes it a gRPC call.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// What is known of the traffic being authorized.
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    /// A connection, before anything is read from it.
    Connection,
    /// One HTTP request on it.
    Request(Request<'a>),
    /// A connection that is not HTTP: L7 conditions cannot be read.
    Opaque,
}

/// Who connects: its identity (from the peer certificate, or the local
/// client pod's) and its address (its pod's when proven, else its node's).
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub identity: &'a Identity,
    pub ip: std::net::IpAddr,
}

impl<'a> Caller<'a> {
    pub fn new(identity: &'a Identity, ip: std::net::IpAddr) -> Self {
        Self { identity, ip }
    }
}

/// One connection or request to authorize.
#[derive(Clone, Debug)]
struct Check<'a> {
    source: &'a Identity,
    /// Its SPIFFE ID in Istio's form, made once for every rule to match.
    principal: String,
    source_ip: std::net::IpAddr,
    /// The pod's address and port.
    destination: std::net::SocketAddr,
    layer: Layer<'a>,
}

impl<'a> Check<'a> {
    fn new(source: Caller<'a>, destination: std::net::SocketAddr, layer: Layer<'a>) -> Self {
        let identity = source.identity;
        Self {
            source: identity,
            principal: format!(
                "{}/ns/{}/sa/{}",
                identity.trust_domain, identity.namespace, identity.service_account
            ),
            source_ip: source.ip.to_canonical(),
            destination,
            layer,
        }
    }

    /// The request, when one is being authorized.
    fn request(&self) -> Option<Request<'a>> {
        match self.layer {
            Layer::Request(r) => Some(r),
            _ => None,
        }
    }
}

/// The outcome, with the policy that decided a denial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny {
        /// `namespace/name` of the DENY policy that matched, or the ALLOW
        /// policies that applied when none matched.
        policy: String,
        reason: &'static str,
    },
    /// L7 conditions decide: read the connection as HTTP and authorize each
    /// request (or [`admit_opaque`] the connection when it is not HTTP).
    Inspect,
}

/// Decides one connection or request from `source` to `destination` (at
/// `to`) against all policies: [`decide`] for the tests, which make no
/// [`Check`] of their own.
#[cfg(test)]
fn evaluate(
    policies: &[Policy],
    source: Caller<'_>,
    destination: &Workload,
    to: std::net::SocketAddr,
    layer: Layer<'_>,
) -> Verdict {
    decide(policies, destination, &Check::new(source, to, layer))
}

/// Decides one connection or request against all policies.
fn decide(policies: &[Policy], destination: &Workload, check: &Check<'_>) -> Verdict {
    let opaque = matches!(check.layer, Layer::Opaque);
    let applying = || policies.iter().filter(|p| p.applies_to(destination));
    let mut deny_unknown = false;
    for p in applying().filter(|p| p.action == Action::Deny) {
        match p.matches(check) {
            Match::Yes => {
                return Verdict::Deny {
                    policy: p.id(),
                    reason: "a DENY rule matched",
                };
            }
            Match::Unknown if opaque => {
                return Verdict::Deny {
                    policy: p.id(),
                    reason: "a DENY rule with HTTP conditions matched a connection that is not HTTP",
                };
            }
            Match::Unknown => deny_unknown = true,
            Match::No => {}
        }
    }
    let allow: Vec<&Policy> = applying().filter(|p| p.action == Action::Allow).collect();
    let allowed = if allow.is_empty() {
        Match::Yes
    } else {
        allow
            .iter()
            .map(|p| p.matches(check))
            .max()
            .unwrap_or(Match::No)
    };
    match allowed {
        Match::Yes if !deny_unknown => Verdict::Allow,
        Match::Yes | Match::Unknown if !opaque => Verdict::Inspect,
        _ => Verdict::Deny {
            policy: allow.iter().map(|p| p.id()).collect::<Vec<_>>().join(","),
            reason: if opaque {
                "no ALLOW rule without HTTP conditions matched a connection that is not HTTP"
            } else {
                "no ALLOW rule matched"
            },
        },
    }
}

/// What the CUSTOM policies applying to `destination` ask of one
/// connection or request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Custom {
    /// No CUSTOM rule matches.
    Nothing,
    /// A CUSTOM rule may match a request: read the connection as HTTP.
    Inspect,
    /// Ask each of these providers about the request, or about the
    /// connection when it is not HTTP (one ask per provider).
    Ask(Vec<(String, String)>),
}

/// The providers that CUSTOM policies send a connection or request to:
/// `(policy, provider)` for each provider, the first policy naming it:
/// [`custom_asks`] for the tests.
#[cfg(test)]
fn custom(
    policies: &[Policy],
    source: Caller<'_>,
    destination: &Workload,
    to: std::net::SocketAddr,
    layer: Layer<'_>,
) -> Custom {
    custom_asks(policies, destination, &Check::new(source, to, layer))
}

/// What the CUSTOM policies applying to `destination` ask of `check`:
/// `(policy, provider)` for each provider, the first policy naming it.
fn custom_asks(policies: &[Policy], destination: &Workload, check: &Check<'_>) -> Custom {
    let mut asks: Vec<(String, String)> = Vec::new();
    for p in policies
        .iter()
        .filter(|p| p.action == Action::Custom && p.applies_to(destination))
    {
        if p.matches(check) == Match::No {
            continue;
        }
        match check.layer {
            Layer::Connection => return Custom::Inspect,
            Layer::Opaque | Layer::Request(_) => {
                let provider = p.provider.clone().unwrap_or_default();
                if !asks.iter().any(|(_, named)| *named == provider) {
                    asks.push((p.id(), provider));
                }
            }
        }
    }
    if asks.is_empty() {
        Custom::Nothing
    } else {
        Custom::Ask(asks)
    }
}

/// Decides a connection from `source` to `destination` on this node, before
/// anything is read from it: policies apply only to meshed pods, so
/// anything else is allowed here (the kernel's NetworkPolicy still
/// applies). [`Verdict::Inspect`]: what the connection carries decides,
/// [`admit`] for each request when it is HTTP, else [`admit_opaque`].
pub fn authorize(
    snapshot: &crate::state::Snapshot,
    source: Caller<'_>,
    destination: std::net::SocketAddr,
) -> Verdict {
    let Some(workload) = meshed_workload(snapshot, destination) else {
        return Verdict::Allow;
    };
    let policies = snapshot.policies_in(&workload.namespace);
    let check = Check::new(source, destination, Layer::Connection);
    let verdict = match (
        decide(policies, workload, &check),
        custom_asks(policies, workload, &check),
    ) {
        (deny @ Verdict::Deny { .. }, _) => deny,
        (_, Custom::Inspect | Custom::Ask(_)) => Verdict::Inspect,
        // Tokens are checked per request: a connection to a workload that
        // a RequestAuthentication selects is read as HTTP.
        (Verdict::Allow, Custom::Nothing) if snapshot.jwt_rules_for(workload).next().is_some() => {
            Verdict::Inspect
        }
        (verdict, Custom::Nothing) => verdict,
    };
    // An AUDIT rule that may match a request: read the connection as
    // HTTP, so that each request it matches is audited.
    match (audit(policies, workload, &check, &verdict), verdict) {
        (Match::Unknown, Verdict::Allow) => Verdict::Inspect,
        (_, verdict) => verdict,
    }
}

/// Logs the connection or request `check` at target `audit` for each AUDIT
/// policy applying to `destination` that matches it, with what the other
/// policies decided; `Unknown` when one may match a request yet to come.
fn audit(
    policies: &[Policy],
    destination: &Workload,
    check: &Check<'_>,
    verdict: &Verdict,
) -> Match {
    let mut pending = Match::No;
    for p in policies
        .iter()
        .filter(|p| p.action == Action::Audit && p.applies_to(destination))
    {
        // A connection that is not HTTP is audited on its L4 part (as a
        // DENY rule matches it).
        let matched = match (p.matches(check), check.layer) {
            (Match::Unknown, Layer::Opaque) => Match::Yes,
            (m, _) => m,
        };
        match matched {
            Match::Yes => {
                let decision = match verdict {
                    Verdict::Allow => "allowed",
                    Verdict::Deny { .. } => "denied",
                    Verdict::Inspect => "read as HTTP",
                };
                let (method, path) = check.request().map_or(("", ""), |r| (r.method, r.path));
                tracing::info!(target: "audit", policy = %p.id(), src = %check.principal,
                    src_ip = %check.source_ip, dst = %check.destination, method, path,
                    decision, "audit");
            }
            Match::Unknown => pending = Match::Unknown,
            Match::No => {}
        }
    }
    pending
}

/// Admits a connection from `source` to the local pod at `destination`
/// that turned out not to be HTTP (after [`Verdict::Inspect`]): L4 rules
/// alone decide it, and the providers of the CUSTOM policies that match it
/// are to be asked about the connection, as Envoy's network `ext_authz`
/// filter asks. Only gRPC providers can be: an HTTP one judges requests.
pub fn admit_opaque(
    snapshot: &crate::state::Snapshot,
    source: Caller<'_>,
    destination: std::net::SocketAddr,
) -> Result<Vec<Ask>, Refusal> {
    let Some(workload) = meshed_workload(snapshot, destination) else {
        return Ok(Vec::new());
    };
    let policies = snapshot.policies_in(&workload.namespace);
    let check = Check::new(source, destination, Layer::Opaque);
    let verdict = decide(policies, workload, &check);
    audit(policies, workload, &check, &verdict);
    if let Verdict::Deny { policy, reason } = verdict {
        return Err(Refusal::Denied { policy, reason });
    }
    match custom_asks(policies, workload, &check) {
        Custom::Ask(asks) => providers(snapshot, asks, true),
        Custom::Nothing | Custom::Inspect => Ok(Vec::new()),
    }
}

/// The providers to ask, `(policy, provider)`, from the mesh
/// configuration: one it lacks cannot allow anything, nor can an HTTP one
/// allow a connection that is not HTTP.
fn providers(
    snapshot: &crate::state::Snapshot,
    asks: Vec<(String, String)>,
    opaque: bool,
) -> Result<Vec<Ask>, Refusal> {
    asks.into_iter()
        .map(|(policy, provider)| {
            let Some(service) = snapshot.providers.get(&provider) else {
                return Err(Refusal::Denied {
                    policy,
                    reason: "its CUSTOM provider is not in the mesh configuration",
                });
            };
            if opaque && service.protocol != crate::routes::table::AuthProtocol::Grpc {
                return Err(Refusal::Denied {
                    policy,
                    reason: "its CUSTOM provider (envoyExtAuthzHttp) judges HTTP requests and the connection is not HTTP",
                });
            }
            Ok(Ask {
                policy,
                provider,
                service: service.clone(),
            })
        })
        .collect()
}

/// The meshed pod at `destination`: policies apply only to those.
fn meshed_workload(
    snapshot: &crate::state::Snapshot,
    destination: std::net::SocketAddr,
) -> Option<&Workload> {
    snapshot
        .workload_by_ip(destination.ip().to_canonical())
        .filter(|w| w.meshed)
}

/// Why a request to a local pod is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its token did not verify (401, `UNAUTHENTICATED` for gRPC).
    Unauthenticated(super::jwt::Error),
    /// An authorization policy denies it (403, `PERMISSION_DENIED`).
    Denied {
        policy: String,
        reason: &'static str,
    },
}

impl Refusal {
    /// Of two counters, the one this refusal counts in.
    pub fn counter<'c, T>(&self, denied: &'c T, unauthenticated: &'c T) -> &'c T {
        match self {
            Self::Denied { .. } => denied,
            Self::Unauthenticated(_) => unauthenticated,
        }
    }
}

/// An external authorization service to ask about an admitted request
/// before it goes on (a CUSTOM policy matched it).
#[derive(Clone, Debug)]
pub struct Ask {
    /// `namespace/name` of the CUSTOM policy.
    pub policy: String,
    pub provider: String,
    pub service: std::sync::Arc<crate::routes::table::ExternalAuth>,
}

/// Admits one request from `source` to the local pod at `destination`:
/// its token checked by the `RequestAuthentication`s selecting the pod,
/// then the request authorized with it. An admitted request gets the
/// edits authentication makes (the token taken off, claims put in headers)
/// and may still have to be put to the providers of CUSTOM policies (the
/// caller asks them, in order); a refused one is logged, with why.
pub fn admit<B>(
    snapshot: &crate::state::Snapshot,
    source: Caller<'_>,
    destination: std::net::SocketAddr,
    req: &mut http::Request<B>,
) -> Result<Vec<Ask>, Refusal> {
    let Some(workload) = meshed_workload(snapshot, destination) else {
        return Ok(Vec::new());
    };
    let refusal = check_request(snapshot, source, destination, workload, req);
    if let Err(refusal) = &refusal {
        let (method, path) = (req.method().as_str(), req.uri().path());
        match refusal {
            Refusal::Denied { policy, reason } => tracing::info!(src = %source.identity,
                dst = %destination, method, path, %policy, reason,
                "request denied by authorization policy"),
            Refusal::Unauthenticated(why) => tracing::info!(src = %source.identity,
                dst = %destination, method, path, reason = %why,
                "request refused: its token does not verify"),
        }
    }
    refusal
}

/// [`admit`] for the meshed pod `workload` at `destination`.
fn check_request<B>(
    snapshot: &crate::state::Snapshot,
    source: Caller<'_>,
    destination: std::net::SocketAddr,
    workload: &Workload,
    req: &mut http::Request<B>,
) -> Result<Vec<Ask>, Refusal> {
    let rules: Vec<_> = snapshot.jwt_rules_for(workload).cloned().collect();
    let auth = if rules.is_empty() {
        None
    } else {
        authn::authenticate(
            &rules,
            req.headers(),
            req.uri(),
            std::time::SystemTime::now(),
        )
        .map_err(Refusal::Unauthenticated)?
    };
    let request = Request {
        auth: auth.as_ref(),
        ..Request::of(req)
    };
    let policies = snapshot.policies_in(&workload.namespace);
    let check = Check::new(source, destination, Layer::Request(request));
    let asks = match custom_asks(policies, workload, &check) {
        Custom::Ask(asks) => asks,
        _ => Vec::new(),
    };
    let verdict = decide(policies, workload, &check);
    audit(policies, workload, &check, &verdict);
    match verdict {
        Verdict::Allow => {}
        Verdict::Deny { policy, reason } => return Err(Refusal::Denied { policy, reason }),
        // A request leaves nothing undecided.
        Verdict::Inspect => {
            return Err(Refusal::Denied {
                policy: "an undecided policy".into(),
                reason: "undecided",
            });
        }
    }
    let asks = providers(snapshot, asks, false)?;
    if !rules.is_empty() {
        let mut uri = req.uri().clone();
        authn::edit(&rules, auth.as_ref(), req.headers_mut(), &mut uri);
        *req.uri_mut() = uri;
    }
    Ok(asks)
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ns: &str, yaml: &str) -> Policy {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).expect("spec");
        validate(&spec).expect("valid");
        Policy::compile(&AuthorizationPolicy {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("p{}", yaml.len())),
                ..kube::api::ObjectMeta::default()
            },
            spec,
        })
    }

    /// A caller at a pod address.
    fn caller(source: &Identity) -> Caller<'_> {
        Caller::new(source, "10.1.0.5".parse().unwrap())
    }

    /// The destination pod's address, at `port`.
    fn at(port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new("10.1.1.12".parse().unwrap(), port)
    }

    fn web() -> Workload {
        crate::testing::workload("shop", "web", "web", &[("app", "web")])
    }

    fn allowed(policies: &[Policy], ns: &str, sa: &str, port: u16) -> bool {
        let source = Identity::new("cluster.local", ns, sa);
        evaluate(
            policies,
            caller(&source),
            &web(),
            at(port),
            Layer::Connection,
        ) == Verdict::Allow
    }

    #[test]
    fn custom_policies_send_matching_requests_to_their_providers() {
        let ext = policy(
            "shop",
            "action: CUSTOM\nprovider: {name: ext}\nrules: [{to: [{operation: {paths: [/admin*]}}]}]",
        );
        let opa = policy(
            "shop",
            "action: CUSTOM\nprovider: {name: opa}\nrules: [{from: [{source: {namespaces: [lab]}}]}]",
        );
        let other = policy(
            "shop",
            "action: CUSTOM\nprovider: {name: ext}\nselector: {matchLabels: {app: db}}\nrules: [{}]",
        );
        let ps = [ext, opa, other];
        let map = http::HeaderMap::new();
        let ask = |ns: &str, path: &str| {
            let source = Identity::new("cluster.local", ns, "client");
            let request = Request {
                method: "GET",
                host: None,
                path,
                headers: &map,
                grpc: false,
                auth: None,
            };
            match custom(
                &ps,
                caller(&source),
                &web(),
                at(80),
                Layer::Request(request),
            ) {
                Custom::Ask(asks) => asks.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
                Custom::Nothing => Vec::new(),
                other => panic!("{other:?} for a request"),
            }
        };
        assert_eq!(ask("shop", "/admin/x"), ["ext"]);
        assert_eq!(ask("lab", "/admin/x"), ["ext", "opa"]);
        assert_eq!(ask("lab", "/"), ["opa"]);
        assert!(ask("shop", "/").is_empty());
        // Before a request: read it as HTTP when a rule may match. A
        // connection that is not HTTP is put to the providers of the rules
        // that may match it (HTTP conditions cannot be read, so they do not
        // spare it, as Istio drops them from CUSTOM rules for TCP).
        let source = Identity::new("cluster.local", "shop", "client");
        assert_eq!(
            custom(&ps, caller(&source), &web(), at(80), Layer::Connection),
            Custom::Inspect
        );
        let opaque = |ns: &str| {
            let source = Identity::new("cluster.local", ns, "client");
            match custom(&ps, caller(&source), &web(), at(80), Layer::Opaque) {
                Custom::Ask(asks) => asks.into_iter().map(|(_, p)| p).collect::<Vec<_>>(),
                other => panic!("{other:?} for a connection that is not HTTP"),
            }
        };
        assert_eq!(opaque("shop"), ["ext"]);
        assert_eq!(opaque("lab"), ["ext", "opa"]);
        // ALLOW and DENY evaluation leaves CUSTOM policies alone.
        assert_eq!(
            evaluate(&ps, caller(&source), &web(), at(80), Layer::Connection),
            Verdict::Allow
        );
    }

    #[test]
    fn a_custom_policy_names_a_provider_and_only_it_does() {
        let spec =
            |yaml: &str| serde_yaml_ng::from_str::<AuthorizationPolicySpec>(yaml).expect(yaml);
        for (yaml, field) in [
            ("action: CUSTOM\nrules: [{}]", "spec.provider"),
            ("action: CUSTOM\nprovider: {name: ''}", "spec.provider.name"),
            ("action: DENY\nprovider: {name: ext}", "spec.provider"),
            ("action: AUDIT\nprovider: {name: ext}", "spec.provider"),
            ("provider: {name: ext}", "spec.provider"),
        ] {
            assert_eq!(validate(&spec(yaml)).expect_err(yaml).0, field, "{yaml}");
        }
        assert!(validate(&spec("action: CUSTOM\nprovider: {name: ext}")).is_ok());
    }

    #[test]
    fn audit_policies_decide_nothing_and_wait_for_the_requests_they_may_match() {
        let paths = policy(
            "shop",
            "action: AUDIT\nrules: [{to: [{operation: {paths: [/admin*]}}]}]",
        );
        let port = policy(
            "shop",
            "action: AUDIT\nrules: [{to: [{operation: {ports: ['80']}}]}]",
        );
        let ps = [paths, port];
        let source = Identity::new("cluster.local", "shop", "client");
        for layer in [Layer::Connection, Layer::Opaque] {
            assert_eq!(
                evaluate(&ps, caller(&source), &web(), at(80), layer),
                Verdict::Allow
            );
        }
        let audit_of = |ps: &[Policy], layer| {
            let check = Check::new(caller(&source), at(80), layer);
            audit(ps, &web(), &check, &Verdict::Allow)
        };
        // Before a request, one may match: read the connection as HTTP.
        assert_eq!(audit_of(&ps, Layer::Connection), Match::Unknown);
        // The L4 one matched (and logged) at once; on traffic that is not
        // HTTP both did.
        assert_eq!(audit_of(&ps[1..], Layer::Connection), Match::No);
        assert_eq!(audit_of(&ps, Layer::Opaque), Match::No);
        let map = http::HeaderMap::new();
        let request = Request {
            method: "GET",
            host: None,
            path: "/admin/x",
            headers: &map,
            grpc: false,
            auth: None,
        };
        assert_eq!(audit_of(&ps, Layer::Request(request)), Match::No);
    }

    #[test]
    fn no_policy_allows() {
        assert!(allowed(&[], "any", "one", 80));
    }

    #[test]
    fn allow_by_principal_denies_the_rest() {
        let p = policy(
            "shop",
            "rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]",
        );
        assert!(allowed(std::slice::from_ref(&p), "shop", "client", 80));
        assert!(!allowed(std::slice::from_ref(&p), "shop", "other", 80));
    }

    #[test]
    fn patterns_and_negations() {
        let p = policy(
            "shop",
            "rules: [{from: [{source: {principals: ['*/sa/client', 'spiffe://cluster.local/ns/ops*'], notNamespaces: [ops-test]}}]}]",
        );
        let ps = std::slice::from_ref(&p);
        assert!(allowed(ps, "anywhere", "client", 80));
        assert!(allowed(ps, "ops", "x", 80));
        assert!(allowed(ps, "ops-prod", "x", 80));
        assert!(!allowed(ps, "ops-test", "x", 80));
        assert!(!allowed(ps, "dev", "x", 80));
    }

    #[test]
    fn deny_wins_over_allow() {
        let allow_all = policy("shop", "rules: [{}]");
        let deny_dev = policy(
            "shop",
            "action: DENY\nrules: [{from: [{source: {namespaces: [dev]}}]}]",
        );
        let ps = [allow_all, deny_dev];
        assert!(allowed(&ps, "prod", "x", 80));
        assert!(!allowed(&ps, "dev", "x", 80));
    }

    #[test]
    fn ports_and_not_ports() {
        let p = policy(
            "shop",
            "rules: [{to: [{operation: {ports: ['8080', 9090]}}]}, {from: [{source: {namespaces: [ops]}}], to: [{operation: {notPorts: ['22']}}]}]",
        );
        let ps = std::slice::from_ref(&p);
        assert!(allowed(ps, "dev", "x", 8080));
        assert!(allowed(ps, "dev", "x", 9090));
        assert!(!allowed(ps, "dev", "x", 22));
        assert!(allowed(ps, "ops", "x", 23));
        assert!(!allowed(ps, "ops", "x", 22));
    }

    #[test]
    fn scope_namespace_and_selector() {
        let elsewhere = policy("other", "action: DENY\nrules: [{}]");
        let not_web = policy(
            "shop",
            "selector: {matchLabels: {app: db}}\naction: DENY\nrules: [{}]",
        );
        assert!(allowed(&[elsewhere, not_web], "x", "y", 80));
        let web = policy(
            "shop",
            "selector: {matchLabels: {app: web}}\naction: DENY\nrules: [{}]",
        );
        assert!(!allowed(&[web], "x", "y", 80));
    }

    #[test]
    fn allow_nothing() {
        assert!(!allowed(&[policy("shop", "{}")], "shop", "web", 80));
        // A DENY policy with no rules denies nothing.
        assert!(allowed(
            &[policy("shop", "action: DENY")],
            "shop",
            "web",
            80
        ));
    }

    fn request_verdict(
        policies: &[Policy],
        sa: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Verdict {
        let source = Identity::new("cluster.local", "shop", sa);
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let request = Request {
            method,
            host: map.get("host").and_then(|h| h.to_str().ok()),
            path,
            headers: &map,
            grpc: is_grpc(&map),
            auth: None,
        };
        evaluate(
            policies,
            caller(&source),
            &web(),
            at(80),
            Layer::Request(request),
        )
    }

    #[test]
    fn request_principals_and_token_claims_decide_requests() {
        use crate::policy::authn::tests::authenticated;
        use serde_json::json;
        let p = policy(
            "shop",
            "rules: [{from: [{source: {requestPrincipals: ['https://idp.example/*']}}], \
             when: [{key: 'request.auth.claims[groups]', values: [admins]}, \
                    {key: 'request.auth.claims[org][tier]', notValues: [free]}, \
                    {key: request.auth.audiences, values: [shop]}]}]",
        );
        let deny_anonymous = policy(
            "shop",
            "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}], to: [{operation: {paths: [/admin*]}}]}]",
        );
        let ps = [p, deny_anonymous];
        let judge = |claims: Option<serde_json::Value>, path: &str| {
            let auth = claims.map(authenticated);
            let map = http::HeaderMap::new();
            let request = Request {
                method: "GET",
                host: None,
                path,
                headers: &map,
                grpc: false,
                auth: auth.as_ref(),
            };
            let source = Identity::new("cluster.local", "shop", "client");
            evaluate(
                &ps,
                caller(&source),
                &web(),
                at(80),
                Layer::Request(request),
            ) == Verdict::Allow
        };
        let admin = json!({"sub": "alice", "groups": ["dev", "admins"], "org": {"tier": "gold"}, "aud": "shop"});
        assert!(judge(Some(admin.clone()), "/admin/x"));
        let mut free = admin.clone();
        free["org"]["tier"] = json!("free");
        assert!(!judge(Some(free), "/x"));
        let mut other_aud = admin.clone();
        other_aud["aud"] = json!(["bank"]);
        assert!(!judge(Some(other_aud), "/x"));
        let mut dev = admin;
        dev["groups"] = json!("dev");
        assert!(!judge(Some(dev), "/x"));
        assert!(!judge(None, "/x"));

        // Without a request to read, request principals wait for one.
        let source = Identity::new("cluster.local", "shop", "client");
        assert_eq!(
            evaluate(&ps, caller(&source), &web(), at(80), Layer::Connection),
            Verdict::Inspect
        );
        assert!(matches!(
            evaluate(&ps, caller(&source), &web(), at(80), Layer::Opaque),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn token_condition_keys_are_validated() {
        for key in [
            "request.auth.principal",
            "request.auth.presenter",
            "request.auth.claims[a]",
            "request.auth.claims[a][b]",
        ] {
            let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(&format!(
                "rules: [{{when: [{{key: '{key}', values: [x]}}]}}]"
            ))
            .expect("spec");
            assert_eq!(validate(&spec), Ok(()), "{key}");
        }
        for key in [
            "request.auth.claims[]",
            "request.auth.claims",
            "request.auth.subject",
            "request.auth.claims[a]b]",
        ] {
            let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(&format!(
                "rules: [{{when: [{{key: '{key}', values: [x]}}]}}]"
            ))
            .expect("spec");
            let (field, _) = validate(&spec).expect_err(key);
            assert_eq!(field, "spec.rules[0].when[0].key", "{key}");
        }
    }

    fn connection_verdict(policies: &[Policy], sa: &str, layer: Layer<'_>) -> Verdict {
        let source = Identity::new("cluster.local", "shop", sa);
        evaluate(policies, caller(&source), &web(), at(80), layer)
    }

    #[test]
    fn paths_methods_and_headers_decide_per_request() {
        let p = policy(
            "shop",
            "rules: [\
             {from: [{source: {principals: ['*/sa/reader']}}], to: [{operation: {paths: ['/public/*', '*.css', /health], methods: [GET, HEAD]}}]}, \
             {from: [{source: {principals: ['*/sa/admin']}}], to: [{operation: {notPaths: ['/internal/*']}}], when: [{key: 'request.headers[x-role]', values: [ops, 'dev*']}]}]",
        );
        let ps = std::slice::from_ref(&p);
        let allow =
            |sa, m, path, h: &[(&str, &str)]| request_verdict(ps, sa, m, path, h) == Verdict::Allow;
        assert!(allow("reader", "GET", "/public/a", &[]));
        assert!(allow("reader", "HEAD", "/site.css", &[]));
        assert!(allow("reader", "GET", "/health", &[]));
        assert!(!allow("reader", "GET", "/health/x", &[]));
        assert!(!allow("reader", "POST", "/public/a", &[]));
        assert!(!allow("reader", "GET", "/private", &[]));
        assert!(allow("admin", "POST", "/x", &[("x-role", "ops")]));
        assert!(allow("admin", "POST", "/x", &[("x-role", "develop")]));
        assert!(!allow("admin", "POST", "/x", &[("x-role", "guest")]));
        assert!(!allow("admin", "POST", "/x", &[]));
        assert!(!allow(
            "admin",
            "GET",
            "/internal/keys",
            &[("x-role", "ops")]
        ));
        assert!(!allow("other", "GET", "/public/a", &[]));
        // Before any request: the readers and admins wait for one, others
        // are denied at once.
        assert_eq!(
            connection_verdict(ps, "reader", Layer::Connection),
            Verdict::Inspect
        );
        assert!(matches!(
            connection_verdict(ps, "other", Layer::Connection),
            Verdict::Deny { .. }
        ));
        // Not HTTP: an ALLOW rule with HTTP conditions cannot match.
        assert!(matches!(
            connection_verdict(ps, "reader", Layer::Opaque),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn deny_rules_with_http_conditions() {
        let allow_all = policy("shop", "rules: [{}]");
        let deny = policy(
            "shop",
            "action: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}, {when: [{key: 'request.headers[x-debug]', notValues: ['0']}]}]",
        );
        let ps = [allow_all, deny];
        let verdict = |m, h: &[(&str, &str)]| request_verdict(&ps, "any", m, "/", h);
        assert_eq!(verdict("GET", &[("x-debug", "0")]), Verdict::Allow);
        assert!(matches!(
            verdict("DELETE", &[("x-debug", "0")]),
            Verdict::Deny { .. }
        ));
        // notValues: an absent header has none of them.
        assert!(matches!(verdict("GET", &[]), Verdict::Deny { .. }));
        assert!(matches!(
            verdict("GET", &[("x-debug", "1")]),
            Verdict::Deny { .. }
        ));
        assert_eq!(
            connection_verdict(&ps, "any", Layer::Connection),
            Verdict::Inspect
        );
        // Not HTTP: the DENY rule matches on its L4 part.
        assert!(matches!(
            connection_verdict(&ps, "any", Layer::Opaque),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn grpc_methods() {
        let p = policy(
            "shop",
            "rules: [{to: [{operation: {grpcMethods: [{service: echo.Echo, method: Say}, {service: health.Health}]}}]}]",
        );
        let ps = std::slice::from_ref(&p);
        let grpc = [("content-type", "application/grpc+proto")];
        let allow =
            |path, h: &[(&str, &str)]| request_verdict(ps, "x", "POST", path, h) == Verdict::Allow;
        assert!(allow("/echo.Echo/Say", &grpc));
        assert!(!allow("/echo.Echo/Shout", &grpc));
        assert!(allow("/health.Health/Check", &grpc));
        // The path alone is not a gRPC call.
        assert!(!allow("/echo.Echo/Say", &[]));
    }

    #[test]
    fn l4_only_policies_never_wait_for_requests() {
        let p = policy("shop", "rules: [{from: [{source: {namespaces: [shop]}}]}]");
        assert_eq!(
            connection_verdict(std::slice::from_ref(&p), "x", Layer::Connection),
            Verdict::Allow
        );
        // An L7 ALLOW rule for someone else leaves the L4 one deciding.
        let l7 = policy(
            "shop",
            "rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {paths: [/x]}}]}]",
        );
        assert_eq!(
            connection_verdict(&[p, l7], "x", Layer::Connection),
            Verdict::Allow
        );
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |yaml: &str| {
            let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).expect("spec");
            validate(&spec).expect_err("invalid")
        };
        let (field, reason) = bad("rules: [{to: [{operation: {ports: ['http']}}]}]");
        assert_eq!(field, "spec.rules[0].to[0].operation.ports[0]");
        assert!(reason.contains("not a port"), "{reason}");
        let (field, _) = bad("rules: [{to: [{operation: {notPorts: [70000]}}]}]");
        assert_eq!(field, "spec.rules[0].to[0].operation.notPorts[0]");
        let (field, reason) =
            bad("rules: [{}, {from: [{source: {principals: ['cluster.local/*/sa/x']}}]}]");
        assert_eq!(field, "spec.rules[1].from[0].source.principals[0]");
        assert!(reason.contains("start or the end"), "{reason}");
        let (field, _) = bad("rules: [{to: [{operation: {paths: ['/a/*/b']}}]}]");
        assert_eq!(field, "spec.rules[0].to[0].operation.paths[0]");
        let (field, _) = bad("rules: [{to: [{operation: {grpcMethods: [{service: 'a/b'}]}}]}]");
        assert_eq!(
            field,
            "spec.rules[0].to[0].operation.grpcMethods[0].service"
        );
        let (field, reason) = bad("rules: [{when: [{key: connection.sni, values: [x]}]}]");
        assert_eq!(field, "spec.rules[0].when[0].key");
        assert!(reason.contains("request.headers"), "{reason}");
        let (field, reason) = bad("rules: [{when: [{key: source.ip, values: [x]}]}]");
        assert_eq!(field, "spec.rules[0].when[0].values[0]");
        assert!(reason.contains("not an address or a CIDR"), "{reason}");
        let (field, reason) =
            bad("rules: [{when: [{key: destination.port, values: ['80'], notValues: [http]}]}]");
        assert_eq!(field, "spec.rules[0].when[0].notValues[0]");
        assert!(reason.contains("not a port"), "{reason}");
        let (field, _) = bad("rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.1.0.0/33]}}]}]");
        assert_eq!(field, "spec.rules[0].from[0].source.ipBlocks[1]");
        let (field, _) = bad("rules: [{from: [{source: {notRemoteIpBlocks: [web]}}]}]");
        assert_eq!(field, "spec.rules[0].from[0].source.notRemoteIpBlocks[0]");
        let (field, _) = bad("rules: [{to: [{operation: {hosts: ['a.*.b']}}]}]");
        assert_eq!(field, "spec.rules[0].to[0].operation.hosts[0]");
        let (field, _) = bad("rules: [{when: [{key: 'request.headers[x]'}]}]");
        assert_eq!(field, "spec.rules[0].when[0]");
    }
}
