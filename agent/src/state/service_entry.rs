//! `ServiceEntry` (`trellis.dev/v1alpha1`, in the shape of Istio's
//! `networking.istio.io/v1`): a service the cluster's API does not list,
//! such as an API outside the cluster or a database on a VM, added to the
//! mesh's registry so that calls to it are captured, balanced over its
//! endpoints, held to egress policy and reported under its host name, as
//! a Service's calls are.
//!
//! Departures from Istio, for lack of the machinery they need: Trellis has
//! no DNS proxy to allocate addresses or learn which host a pod looked up,
//! so an entry lists the `addresses` its callers dial (exact addresses, not
//! ranges), and its `resolution` is `STATIC` (endpoints by address, or a
//! `workloadSelector` choosing pods) or `NONE` (each call goes to the
//! address it dialled); `DNS` is refused with a reason rather than half
//! done.

use std::{collections::BTreeMap, net::IpAddr};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A service outside the cluster's Services: the addresses its callers
/// dial, its ports, and where its calls go.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "ServiceEntry",
    plural = "serviceentries",
    doc = "Trellis ServiceEntry: a service outside the cluster's Services, added to the mesh.",
    namespaced,
    shortname = "tse",
    derive = "PartialEq",
    printcolumn(name = "Hosts", type_ = "string", json_path = ".spec.hosts"),
    printcolumn(name = "Location", type_ = "string", json_path = ".spec.location"),
    printcolumn(name = "Resolution", type_ = "string", json_path = ".spec.resolution"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new(
        "!has(self.spec.workloadSelector) || !has(self.spec.endpoints) || size(self.spec.endpoints) == 0"
    )
    .message("endpoints or a workloadSelector, not both"),
    validation = Rule::new("self.spec.resolution in ['STATIC', 'NONE']").message(NO_DNS),
    validation = Rule::new(
        "self.spec.resolution != 'NONE' || ((!has(self.spec.endpoints) || size(self.spec.endpoints) == 0) && !has(self.spec.workloadSelector))"
    )
    .message(NONE_ALONE)
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    /// The names the service is known by; the first names it in metrics
    /// (`destination_service`), traces and logs.
    #[schemars(length(min = 1), inner(length(min = 1, max = 253)))]
    pub hosts: Vec<String>,
    /// The addresses its callers dial (IPv4 or IPv6, one address each):
    /// the agent captures calls to them on the entry's ports.
    #[schemars(length(min = 1))]
    #[serde(default)]
    pub addresses: Vec<String>,
    #[schemars(length(min = 1))]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub resolution: Resolution,
    /// Where its calls go, by address (`resolution: STATIC`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Or the pods of the entry's namespace it selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// The port callers dial.
    #[schemars(range(min = 1, max = 65535))]
    pub number: u32,
    /// `HTTP`, `HTTP2`, `GRPC` (served on the L7 path when it applies),
    /// or `TCP`, `TLS`, `HTTPS`, `MONGO` (relayed as bytes); sniffed when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS", "MONGO"]))]
    pub protocol: Option<String>,
    #[schemars(length(min = 1))]
    pub name: String,
    /// The endpoints' port, when it is not `number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<u32>,
}

/// The protocols a port may declare.
const PROTOCOLS: &[&str] = &["HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS", "MONGO"];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh: its endpoints are called in plaintext (what the
    /// app sends, TLS included, goes as it is).
    #[default]
    MeshExternal,
    /// Part of the mesh: endpoints that are meshed pods are reached over
    /// HBONE, as a Service's.
    MeshInternal,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Istio's default: each call goes to the address it dialled.
    #[default]
    None,
    /// To the endpoints listed, or the pods selected.
    Static,
    /// Endpoints by host name. Refused: the agent resolves no names.
    Dns,
    DnsRoundRobin,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// An IPv4 or IPv6 address.
    #[schemars(length(min = 1))]
    pub address: String,
    /// Its port for an entry's port, by the port's name, when it is not
    /// the port's `targetPort` (or `number`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("additionalProperties" = {"type": "integer", "minimum": 1, "maximum": 65535}))]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[schemars(extend("minProperties" = 1))]
    pub labels: BTreeMap<String, String>,
}

type Invalid = (String, String);

/// Why an entry's `resolution` is refused, in the CRD and the agent alike.
const NO_DNS: &str = "resolution is STATIC or NONE";
/// Why a `NONE` entry with endpoints is refused.
const NONE_ALONE: &str =
    "NONE sends each call to the address dialled: no endpoints or workloadSelector";

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (field.into(), reason.into())
}

fn port(field: &str, n: u32) -> Result<u16, Invalid> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("{n} is not a port (1-65535)")))
}

fn address(field: &str, text: &str) -> Result<IpAddr, Invalid> {
    text.parse().map_err(|_| {
        let reason = if text.contains('/') {
            format!("{text:?} is a range: list single addresses (a call is captured by its exact address)")
        } else {
            format!("{text:?} is not an IP address")
        };
        invalid(field, reason)
    })
}

/// Checks what the schema cannot say (and, for entries from files, what
/// it can).
pub fn validate(spec: &ServiceEntrySpec) -> Result<(), Invalid> {
    if spec.hosts.is_empty() {
        return Err(invalid("spec.hosts", "required: at least one host name"));
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        if host.contains('*') {
            return Err(invalid(
                field,
                format!(
                    "{host:?}: wildcard hosts are matched by DNS, which this agent does not serve"
                ),
            ));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(invalid(field, format!("{host:?} is not a DNS name")));
        }
    }
    if spec.addresses.is_empty() {
        return Err(invalid(
            "spec.addresses",
            "required: the addresses callers dial (no DNS proxy allocates one here)",
        ));
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        address(&format!("spec.addresses[{i}]"), a)?;
    }
    if spec.ports.is_empty() {
        return Err(invalid("spec.ports", "required: at least one port"));
    }
    for (i, p) in spec.ports.iter().enumerate() {
        port(&format!("spec.ports[{i}].number"), p.number)?;
        if let Some(t) = p.target_port {
            port(&format!("spec.ports[{i}].targetPort"), t)?;
        }
        if let Some(protocol) = &p.protocol
            && !PROTOCOLS.contains(&protocol.as_str())
        {
            return Err(invalid(
                format!("spec.ports[{i}].protocol"),
                format!("{protocol:?} is not one of {}", PROTOCOLS.join(", ")),
            ));
        }
        if p.name.is_empty() {
            return Err(invalid(format!("spec.ports[{i}].name"), "required"));
        }
        if spec.ports[..i].iter().any(|q| q.name == p.name) {
            return Err(invalid(
                format!("spec.ports[{i}].name"),
                format!("{:?} names another port already", p.name),
            ));
        }
        if spec.ports[..i].iter().any(|q| q.number == p.number) {
            return Err(invalid(
                format!("spec.ports[{i}].number"),
                format!("port {} is listed twice", p.number),
            ));
        }
    }
    match spec.resolution {
        Resolution::Static => {}
        Resolution::None => {
            if !spec.endpoints.is_empty() || spec.workload_selector.is_some() {
                let field = if spec.endpoints.is_empty() {
                    "spec.workloadSelector"
                } else {
                    "spec.endpoints"
                };
                return Err(invalid(field, NONE_ALONE));
            }
            return Ok(());
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            return Err(invalid(
                "spec.resolution",
                format!(
                    "{NO_DNS}: the agent resolves no host names (DNS); list endpoint addresses"
                ),
            ));
        }
    }
    match (&spec.workload_selector, spec.endpoints.is_empty()) {
        (Some(_), false) => {
            return Err(invalid(
                "spec.workloadSelector",
                "endpoints or a workloadSelector, not both",
            ));
        }
        (None, true) => {
            return Err(invalid(
                "spec.endpoints",
                "required with STATIC: the endpoints' addresses, or a workloadSelector",
            ));
        }
        (Some(s), true) if s.labels.is_empty() => {
            return Err(invalid(
                "spec.workloadSelector.labels",
                "required: an empty selector would choose every pod of the namespace",
            ));
        }
        _ => {}
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        address(&format!("spec.endpoints[{i}].address"), &e.address)?;
        for (name, n) in &e.ports {
            let field = format!("spec.endpoints[{i}].ports.{name}");
            if !spec.ports.iter().any(|p| &p.name == name) {
                return Err(invalid(
                    field,
                    format!("no port of the entry is named {name:?}"),
                ));
            }
            port(&field, *n)?;
        }
    }
    Ok(())
}

impl Port {
    /// Its `protocol` as a Service port's `appProtocol`, which is how the
    /// proxy reads what a port declares.
    pub fn app_protocol(&self) -> Option<String> {
        self.protocol.as_deref().map(str::to_ascii_lowercase)
    }

    /// The endpoints' port (validated).
    pub fn target(&self) -> u16 {
        u16::try_from(self.target_port.unwrap_or(self.number)).unwrap_or_default()
    }
}

impl Endpoint {
    /// This endpoint's port for `port` (validated).
    pub fn port_for(&self, port: &Port) -> u16 {
        self.ports
            .get(&port.name)
            .and_then(|n| u16::try_from(*n).ok())
            .unwrap_or_else(|| port.target())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ServiceEntrySpec {
        serde_yaml_ng::from_str(yaml).expect("parses")
    }

    const GOOD: &str = "hosts: [api.example.com]\naddresses: [192.0.2.10, '2001:db8::10']\n\
        ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP, targetPort: 8080}]\n\
        resolution: STATIC\nendpoints: [{address: 198.51.100.1}, {address: 198.51.100.2, ports: {http: 9090}}]\n";

    #[test]
    fn a_static_entry_is_accepted_and_reads_its_ports() {
        let s = spec(GOOD);
        assert_eq!(validate(&s), Ok(()));
        assert_eq!(s.location, Location::MeshExternal);
        assert_eq!(s.ports[1].app_protocol().as_deref(), Some("http"));
        assert_eq!(s.ports[1].target(), 8080);
        assert_eq!(s.ports[0].target(), 443);
        assert_eq!(s.endpoints[0].port_for(&s.ports[1]), 8080);
        assert_eq!(s.endpoints[1].port_for(&s.ports[1]), 9090);
        assert_eq!(s.endpoints[1].port_for(&s.ports[0]), 443);
        let selected = spec(
            "hosts: [db.internal]\naddresses: [10.96.9.9]\nports: [{number: 5432, name: tcp-pg}]\n\
             location: MESH_INTERNAL\nresolution: STATIC\nworkloadSelector: {labels: {app: pg}}\n",
        );
        assert_eq!(validate(&selected), Ok(()));
        let dialled = spec(
            "hosts: [partner.example]\naddresses: [192.0.2.7, 192.0.2.8]\n\
             ports: [{number: 443, name: tls, protocol: TLS}]\n",
        );
        assert_eq!(dialled.resolution, Resolution::None);
        assert_eq!(validate(&dialled), Ok(()));
    }

    #[test]
    fn refusals_name_the_field_and_why() {
        let cases: &[(&str, &str, &str)] = &[
            ("hosts: [api.example.com]", "hosts: []", "spec.hosts"),
            (
                "hosts: [api.example.com]",
                "hosts: ['*.example.com']",
                "spec.hosts[0]",
            ),
            (
                "hosts: [api.example.com]",
                "hosts: [a_b.example]",
                "spec.hosts[0]",
            ),
            (
                "addresses: [192.0.2.10, '2001:db8::10']",
                "addresses: []",
                "spec.addresses",
            ),
            (
                "addresses: [192.0.2.10, '2001:db8::10']",
                "addresses: [192.0.2.0/24]",
                "spec.addresses[0]",
            ),
            (
                "number: 443, name: https",
                "number: 70000, name: https",
                "spec.ports[0].number",
            ),
            (
                "targetPort: 8080",
                "targetPort: 0",
                "spec.ports[1].targetPort",
            ),
            (
                "protocol: HTTPS",
                "protocol: QUIC",
                "spec.ports[0].protocol",
            ),
            (
                "name: http, protocol: HTTP",
                "name: https, protocol: HTTP",
                "spec.ports[1].name",
            ),
            (
                "number: 80, name: http",
                "number: 443, name: http",
                "spec.ports[1].number",
            ),
            ("resolution: STATIC", "resolution: DNS", "spec.resolution"),
            ("resolution: STATIC\n", "\n", "spec.endpoints"),
            ("resolution: STATIC", "resolution: NONE", "spec.endpoints"),
            (
                "address: 198.51.100.1",
                "address: api.example.com",
                "spec.endpoints[0].address",
            ),
            (
                "ports: {http: 9090}",
                "ports: {grpc: 9090}",
                "spec.endpoints[1].ports.grpc",
            ),
            (
                "ports: {http: 9090}",
                "ports: {http: 0}",
                "spec.endpoints[1].ports.http",
            ),
            (
                "endpoints: [{address: 198.51.100.1}, {address: 198.51.100.2, ports: {http: 9090}}]",
                "endpoints: []",
                "spec.endpoints",
            ),
            (
                "endpoints: [{address: 198.51.100.1}, {address: 198.51.100.2, ports: {http: 9090}}]",
                "endpoints: [{address: 198.51.100.1}]\nworkloadSelector: {labels: {app: x}}",
                "spec.workloadSelector",
            ),
            (
                "endpoints: [{address: 198.51.100.1}, {address: 198.51.100.2, ports: {http: 9090}}]",
                "workloadSelector: {labels: {}}",
                "spec.workloadSelector.labels",
            ),
        ];
        for (from, to, field) in cases {
            assert!(GOOD.contains(from), "{from}");
            let s = spec(&GOOD.replacen(from, to, 1));
            let (got, reason) = validate(&s).expect_err(to);
            assert_eq!(&got, field, "{to}: {reason}");
            assert!(!reason.is_empty());
        }
    }
}
