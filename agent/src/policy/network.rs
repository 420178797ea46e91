//! Kubernetes `NetworkPolicy` (networking.k8s.io/v1), read into a checked
//! model: selectors, peers, ports. [`super::compiler`] turns the model into
//! the kernel's identities, ipcache and policy entries.
//!
//! Semantics (the Kubernetes API's): a pod is isolated in a direction when
//! a policy of its namespace selects it with that policy type; an isolated
//! pod allows what any rule of any of those policies allows (a union; no
//! deny rules). A rule with no peers matches every peer, with no ports every
//! port and protocol. `policyTypes` defaults to `Ingress`, plus `Egress`
//! when the policy has egress rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy as K8sNetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use serde::Serialize;

use crate::state::objects::parse_cidr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

/// The name of an IP protocol number, as policies write it.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        TCP => "TCP",
        UDP => "UDP",
        SCTP => "SCTP",
        1 => "ICMP",
        58 => "ICMPv6",
        _ => "other",
    }
}

/// The number of a protocol as Kubernetes objects write it.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}

/// A label selector: every `match_labels` pair and every expression.
/// The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub expressions: Vec<Expression>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "operator", rename_all = "PascalCase")]
pub enum Expression {
    In {
        key: String,
        values: BTreeSet<String>,
    },
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    Exists {
        key: String,
    },
    DoesNotExist {
        key: String,
    },
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                Expression::In { key, values } => {
                    labels.get(key).is_some_and(|v| values.contains(v))
                }
                Expression::NotIn { key, values } => {
                    labels.get(key).is_none_or(|v| !values.contains(v))
                }
                Expression::Exists { key } => labels.contains_key(key),
                Expression::DoesNotExist { key } => !labels.contains_key(key),
            })
    }
}

/// Where IPv4 addresses live among the maps' 16-byte keys: `::ffff:0:0/96`.
pub const V4_MAPPED: (u32, [u8; 16]) = (96, trellis_common::ipv4_mapped([0; 4]));

/// A CIDR: address (host bits cleared) and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// The block of one address (`/32`, `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// The prefix in the maps' 16-byte form (IPv4 mapped, +96 bits).
    pub fn map_prefix(&self) -> (u32, [u8; 16]) {
        match self.addr {
            IpAddr::V4(a) => (
                96 + u32::from(self.len),
                trellis_common::ipv4_mapped(a.octets()),
            ),
            IpAddr::V6(a) => (u32::from(self.len), a.octets()),
        }
    }

    /// Whether `other` lies within this one (equal included). Never across
    /// families: `::/0` does not hold IPv4 prefixes, though their mapped
    /// forms start with its bits.
    pub fn contains(&self, other: &Cidr) -> bool {
        let (len, net) = self.map_prefix();
        let (olen, onet) = other.map_prefix();
        // `net` has its host bits clear (see [`cidr`]).
        self.addr.is_ipv4() == other.addr.is_ipv4() && olen >= len && mask16(onet, len) == net
    }

    /// Whether this IPv6 prefix (`::/0`, `::/64`, ...) takes in the
    /// v4-mapped range ([`V4_MAPPED`]) in the maps' keys, where a longest
    /// match would give it IPv4 addresses too.
    pub fn covers_v4_mapped(&self) -> bool {
        let (len, net) = self.map_prefix();
        self.addr.is_ipv6() && len <= V4_MAPPED.0 && mask16(V4_MAPPED.1, len) == net
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `addr` with the bits past the first `bits` cleared.
pub fn mask16(mut addr: [u8; 16], bits: u32) -> [u8; 16] {
    let bits = bits.min(128) as usize;
    let (bytes, rest) = (bits / 8, bits % 8);
    if bytes < 16 {
        addr[bytes] &= 0xffu8.checked_shl(8 - rest as u32).unwrap_or(0);
        addr[bytes + 1..].fill(0);
    }
    addr
}

/// Parses `10.0.0.0/8`, clearing host bits as Kubernetes accepts them.
pub fn cidr(text: &str) -> Result<Cidr, String> {
    let (addr, len) = parse_cidr(text)?;
    let addr = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Ok(Cidr { addr, len })
}

/// Who a rule is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Peer {
    /// Pods: in the namespaces `namespaces` selects (the policy's own when
    /// `None`), that `pods` selects (all when `None`).
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` but in none of `except`.
    Block { cidr: Cidr, except: Vec<Cidr> },
}

/// Which ports a rule allows, for one protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Ports {
    All,
    Range(u16, u16),
    /// A container port name, resolved per pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Port {
    pub protocol: u8,
    pub ports: Ports,
}

/// One ingress or egress rule: traffic with one of `peers` (any peer when
/// `None`) on one of `ports` (any port and protocol when `None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<Port>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `Some` when the policy isolates for ingress (possibly with no rule:
    /// deny all).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

type Invalid = (String, String);

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (field.into(), reason.into())
}

impl NetworkPolicy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Reads and checks the object; an error names the field and reason.
    pub fn from_object(object: &K8sNetworkPolicy) -> Result<Self, Invalid> {
        let spec = object.spec.clone().unwrap_or_default();
        let mut types = BTreeSet::new();
        for (i, t) in spec.policy_types.iter().flatten().enumerate() {
            if t != "Ingress" && t != "Egress" {
                return Err(invalid(
                    format!("spec.policyTypes[{i}]"),
                    format!("{t:?} is not Ingress or Egress"),
                ));
            }
            types.insert(t.as_str());
        }
        // The API server's defaulting: `Egress` only for a non-empty
        // `egress` list (`egress: []` alone isolates nothing).
        if spec.policy_types.as_ref().is_none_or(Vec::is_empty) {
            types.insert("Ingress");
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.insert("Egress");
            }
        }
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                rule(
                    &format!("spec.ingress[{i}]"),
                    "from",
                    r.from.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let egress = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                rule(
                    &format!("spec.egress[{i}]"),
                    "to",
                    r.to.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            pod_selector: selector("spec.podSelector", spec.pod_selector.as_ref())?,
            ingress: types.contains("Ingress").then_some(ingress),
            egress: types.contains("Egress").then_some(egress),
        })
    }

    /// The rules for `dir` ([`trellis_common::direction`]); `None` when the
    /// policy does not isolate in that direction.
    pub fn rules(&self, dir: u8) -> Option<&[Rule]> {
        if dir == trellis_common::direction::INGRESS {
            self.ingress.as_deref()
        } else {
            self.egress.as_deref()
        }
    }

    /// Whether the policy selects `labels` in `namespace`.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace && self.pod_selector.matches(labels)
    }
}

fn rule(
    field: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, Invalid> {
    let peers = match peers {
        None | Some([]) => None,
        Some(peers) => Some(
            peers
                .iter()
                .enumerate()
                .map(|(i, p)| peer(&format!("{field}.{peers_field}[{i}]"), p))
                .collect::<Result<_, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(ports) => Some(
            ports
                .iter()
                .enumerate()
                .map(|(i, p)| port(&format!("{field}.ports[{i}]"), p))
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

fn peer(field: &str, p: &NetworkPolicyPeer) -> Result<Peer, Invalid> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(block), None, None) => {
            let c = cidr(&block.cidr).map_err(|r| invalid(format!("{field}.ipBlock.cidr"), r))?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let ef = format!("{field}.ipBlock.except[{i}]");
                let e = cidr(e).map_err(|r| invalid(&ef, r))?;
                if !c.contains(&e) || e == c {
                    return Err(invalid(ef, format!("{e} is not strictly inside {c}")));
                }
                except.push(e);
            }
            Ok(Peer::Block { cidr: c, except })
        }
        (Some(_), _, _) => Err(invalid(
            field,
            "ipBlock cannot be combined with namespaceSelector or podSelector",
        )),
        (None, None, None) => Err(invalid(
            field,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: ns
                .as_ref()
                .map(|s| selector(&format!("{field}.namespaceSelector"), Some(s)))
                .transpose()?,
            pods: pods
                .as_ref()
                .map(|s| selector(&format!("{field}.podSelector"), Some(s)))
                .transpose()?,
        }),
    }
}

fn port(field: &str, p: &NetworkPolicyPort) -> Result<Port, Invalid> {
    let protocol = crate::state::objects::protocol_number(
        &format!("{field}.protocol"),
        p.protocol.as_deref(),
    )?;
    let check = |f: &str, n: i32| {
        u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
            invalid(
                format!("{field}.{f}"),
                format!("{n} is not a port (1-65535)"),
            )
        })
    };
    let ports = match (&p.port, p.end_port) {
        (None, None) => Ports::All,
        (None, Some(_)) => {
            return Err(invalid(format!("{field}.endPort"), "needs a numeric port"));
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = check("port", *n)?;
            let end = end
                .map(|e| check("endPort", e))
                .transpose()?
                .unwrap_or(start);
            if end < start {
                return Err(invalid(
                    format!("{field}.endPort"),
                    format!("{end} is below port {start}"),
                ));
            }
            Ports::Range(start, end)
        }
        (Some(IntOrString::String(name)), None) => {
            if name.is_empty() || name.len() > 15 {
                return Err(invalid(
                    format!("{field}.port"),
                    format!("{name:?} is not a port name (1-15 characters)"),
                ));
            }
            Ports::Named(name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err(invalid(format!("{field}.endPort"), "needs a numeric port"));
        }
    };
    Ok(Port { protocol, ports })
}

fn selector(field: &str, s: Option<&LabelSelector>) -> Result<Selector, Invalid> {
    let Some(s) = s else {
        return Ok(Selector::default());
    };
    let mut expressions = Vec::new();
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
        let key = e.key.clone();
        let f = format!("{field}.matchExpressions[{i}]");
        let expr = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(invalid(format!("{f}.values"), "In and NotIn need values"));
            }
            "In" => Expression::In { key, values },
            "NotIn" => Expression::NotIn { key, values },
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(invalid(
                    format!("{f}.values"),
                    "Exists and DoesNotExist take no values",
                ));
            }
            "Exists" => Expression::Exists { key },
            "DoesNotExist" => Expression::DoesNotExist { key },
            other => {
                return Err(invalid(
                    format!("{f}.operator"),
                    format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                ));
            }
        };
        expressions.push(expr);
    }
    Ok(Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        expressions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<NetworkPolicy, Invalid> {
        let object: K8sNetworkPolicy = serde_yaml_ng::from_str(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\n{yaml}"
        ))
        .expect("schema");
        NetworkPolicy::from_object(&object)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn policy_types_default_from_the_rules() {
        let p = policy("spec: {podSelector: {}}").unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
        let p = policy("spec: {podSelector: {}, egress: [{}]}").unwrap();
        assert!(p.ingress.is_some() && p.egress.is_some());
        // As the API server defaults it: an empty list is no egress section.
        let p = policy("spec: {podSelector: {}, egress: []}").unwrap();
        assert_eq!(p.egress, None);
        let p = policy("spec: {podSelector: {}, policyTypes: [Egress]}").unwrap();
        assert_eq!(p.ingress, None);
        assert_eq!(p.egress, Some(vec![]));
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let p = policy(
            "spec: {podSelector: {matchLabels: {app: web}, matchExpressions: [\
             {key: tier, operator: In, values: [a, b]}, {key: canary, operator: DoesNotExist}]}}",
        )
        .unwrap();
        assert!(p.selects("x", &labels(&[("app", "web"), ("tier", "a")])));
        assert!(!p.selects("y", &labels(&[("app", "web"), ("tier", "a")])));
        assert!(!p.selects("x", &labels(&[("app", "web"), ("tier", "c")])));
        assert!(!p.selects(
            "x",
            &labels(&[("app", "web"), ("tier", "a"), ("canary", "1")])
        ));
        let not_in = Selector {
            match_labels: BTreeMap::new(),
            expressions: vec![Expression::NotIn {
                key: "env".into(),
                values: ["prod".to_string()].into(),
            }],
        };
        assert!(not_in.matches(&labels(&[])));
        assert!(!not_in.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn empty_peer_and_port_lists_mean_any() {
        let p = policy("spec: {podSelector: {}, ingress: [{from: [], ports: []}]}").unwrap();
        assert_eq!(
            p.ingress.unwrap(),
            vec![Rule {
                peers: None,
                ports: None
            }]
        );
    }

    #[test]
    fn cidrs_are_normalised_and_excepts_checked() {
        assert_eq!(cidr("10.1.2.3/16").unwrap().to_string(), "10.1.0.0/16");
        assert_eq!(cidr("fd01:1::5/64").unwrap().to_string(), "fd01:1::/64");
        let c = cidr("10.0.0.0/8").unwrap();
        assert!(c.contains(&cidr("10.1.0.0/16").unwrap()));
        assert!(!c.contains(&cidr("11.0.0.0/16").unwrap()));
        let host =
            |ip: &str| cidr(&format!("{ip}/{}", if ip.contains(':') { 128 } else { 32 })).unwrap();
        assert!(c.contains(&host("10.9.9.9")));
        assert!(!c.contains(&host("fd00::1")));
        assert!(cidr("0.0.0.0/0").unwrap().contains(&host("1.2.3.4")));
        let err = policy(
            "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}",
        )
        .unwrap_err();
        assert_eq!(err.0, "spec.ingress[0].from[0].ipBlock.except[0]");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                "spec: {podSelector: {}, policyTypes: [Sideways]}",
                "spec.policyTypes[0]",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
                "spec.ingress[0].ports[0].protocol",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                "spec: {podSelector: {}, egress: [{ports: [{port: http, endPort: 80}]}]}",
                "spec.egress[0].ports[0].endPort",
            ),
            (
                "spec: {podSelector: {}, egress: [{ports: [{port: 70000}]}]}",
                "spec.egress[0].ports[0].port",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{}]}]}",
                "spec.egress[0].to[0]",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "spec.egress[0].to[0]",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
                "spec.egress[0].to[0].ipBlock.cidr",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: Near}]}}",
                "spec.podSelector.matchExpressions[0].operator",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: In}]}}",
                "spec.podSelector.matchExpressions[0].values",
            ),
        ];
        for (yaml, field) in cases {
            let (got, reason) = policy(yaml).expect_err(yaml);
            assert_eq!(got, field, "{yaml}: {reason}");
        }
    }

    #[test]
    fn peers_and_ports_read() {
        let p = policy(
            "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}, \
             {podSelector: {}}], ports: [{port: 80, endPort: 90}, {port: serve-81, protocol: UDP}, {protocol: SCTP}]}]}",
        )
        .unwrap();
        let rule = &p.ingress.unwrap()[0];
        assert_eq!(rule.peers.as_ref().unwrap().len(), 2);
        assert!(matches!(
            &rule.peers.as_ref().unwrap()[1],
            Peer::Pods {
                namespaces: None,
                pods: Some(_)
            }
        ));
        assert_eq!(
            rule.ports.as_ref().unwrap(),
            &vec![
                Port {
                    protocol: TCP,
                    ports: Ports::Range(80, 90)
                },
                Port {
                    protocol: UDP,
                    ports: Ports::Named("serve-81".into())
                },
                Port {
                    protocol: SCTP,
                    ports: Ports::All
                },
            ]
        );
    }
}
