//! `AuthorizationPolicy` (`trellis.dev/v1alpha1`, schema in
//! `deploy/crds/authorizationpolicy.yaml`), L4: rules by source principal,
//! source namespace and destination port, as Istio writes them.
//!
//! A policy applies to the pods of its namespace that its `selector` matches
//! (all of them without one). Semantics, in order: a matching `DENY` rule
//! denies; else, when ALLOW policies apply to the workload, one of their
//! rules must match; with no policy the connection is allowed. Identity is
//! the peer certificate's (HBONE) or the local client pod's, never a header.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::{identity::Identity, state::Workload};

/// The object as written in the config folder or the API server.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Which pods of the namespace it applies to; all of them when absent.
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Action,
    /// Any one rule matching is enough. An ALLOW policy without rules allows
    /// nothing (Istio's "allow-nothing").
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Matches when one of `from` matches (or there is none) and one of `to`
/// matches (or there is none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Every field given must match (an empty list is no condition). Patterns
/// are exact, `prefix*`, `*suffix` or `*`; principals are written
/// `<trust-domain>/ns/<ns>/sa/<sa>` as in Istio (a `spiffe://` in front is
/// accepted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub not_ports: Vec<PortValue>,
}

/// Istio writes ports as strings; a number is accepted too.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Text(String),
}

impl PortValue {
    fn port(&self) -> Option<u16> {
        match self {
            Self::Number(n) => u16::try_from(*n).ok(),
            Self::Text(s) => s.parse().ok(),
        }
        .filter(|p| *p != 0)
    }
}

/// Checks what the schema cannot say: a field path and a reason.
pub fn validate(spec: &AuthorizationPolicySpec) -> Result<(), (String, String)> {
    for (r, rule) in spec.rules.iter().enumerate() {
        for (f, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            for (name, list) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
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
        }
        for (t, to) in rule.to.iter().enumerate() {
            let op = &to.operation;
            for (name, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                for (i, port) in list.iter().enumerate() {
                    if port.port().is_none() {
                        return Err((
                            format!("spec.rules[{r}].to[{t}].operation.{name}[{i}]"),
                            format!("{port:?} is not a port (1-65535)"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
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
    pub rules: Vec<CompiledRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompiledRule {
    pub from: Vec<Source>,
    pub ports: Vec<(Vec<u16>, Vec<u16>)>,
}

impl Policy {
    /// Compiles a validated object.
    pub fn compile(object: &AuthorizationPolicy) -> Self {
        let ports = |list: &[PortValue]| list.iter().filter_map(PortValue::port).collect();
        Self {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            selector: object
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone()),
            action: object.spec.action,
            rules: object
                .spec
                .rules
                .iter()
                .map(|r| CompiledRule {
                    from: r.from.iter().map(|f| f.source.clone()).collect(),
                    ports: r
                        .to
                        .iter()
                        .map(|t| (ports(&t.operation.ports), ports(&t.operation.not_ports)))
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
        self.namespace == workload.namespace
            && self.selector.as_ref().is_none_or(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
            })
    }

    fn matches(&self, check: &Check<'_>, principal: &str) -> bool {
        self.rules.iter().any(|rule| rule.matches(check, principal))
    }
}

impl CompiledRule {
    fn matches(&self, check: &Check<'_>, principal: &str) -> bool {
        let from = self.from.is_empty()
            || self
                .from
                .iter()
                .any(|s| source_matches(s, principal, &check.source.namespace));
        let to = self.ports.is_empty()
            || self.ports.iter().any(|(ports, not_ports)| {
                (ports.is_empty() || ports.contains(&check.port))
                    && !not_ports.contains(&check.port)
            });
        from && to
    }
}

fn source_matches(source: &Source, principal: &str, ns: &str) -> bool {
    let any = |patterns: &[String], value: &str| patterns.iter().any(|p| pattern_matches(p, value));
    (source.principals.is_empty() || any(&source.principals, principal))
        && !any(&source.not_principals, principal)
        && (source.namespaces.is_empty() || any(&source.namespaces, ns))
        && !any(&source.not_namespaces, ns)
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

/// One connection to authorize.
#[derive(Clone, Copy, Debug)]
pub struct Check<'a> {
    /// Who connects: from the peer certificate, or the local client pod.
    pub source: &'a Identity,
    /// The local pod it reaches.
    pub destination: &'a Workload,
    pub port: u16,
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
}

/// Decides one connection against all policies.
pub fn evaluate(policies: &[Policy], check: &Check<'_>) -> Verdict {
    // Istio's form of the SPIFFE ID, made once for every rule to match.
    let principal = format!(
        "{}/ns/{}/sa/{}",
        check.source.trust_domain, check.source.namespace, check.source.service_account
    );
    let applying = || policies.iter().filter(|p| p.applies_to(check.destination));
    if let Some(p) = applying().find(|p| p.action == Action::Deny && p.matches(check, &principal)) {
        return Verdict::Deny {
            policy: p.id(),
            reason: "a DENY rule matched",
        };
    }
    let allow: Vec<&Policy> = applying().filter(|p| p.action == Action::Allow).collect();
    if allow.is_empty() || allow.iter().any(|p| p.matches(check, &principal)) {
        Verdict::Allow
    } else {
        Verdict::Deny {
            policy: allow.iter().map(|p| p.id()).collect::<Vec<_>>().join(","),
            reason: "no ALLOW rule matched",
        }
    }
}

/// Decides a connection from `source` to `destination` on this node:
/// policies apply only to meshed pods, so anything else is allowed here (the
/// kernel's NetworkPolicy still applies).
pub fn authorize(
    snapshot: &crate::state::Snapshot,
    source: &Identity,
    destination: std::net::SocketAddr,
) -> Verdict {
    match snapshot
        .workload_by_ip(destination.ip().to_canonical())
        .filter(|w| w.meshed)
    {
        Some(workload) => evaluate(
            &snapshot.policies,
            &Check {
                source,
                destination: workload,
                port: destination.port(),
            },
        ),
        None => Verdict::Allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ns: &str, yaml: &str) -> Policy {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).expect("spec");
        validate(&spec).expect("valid");
        Policy::compile(&AuthorizationPolicy {
            api_version: "trellis.dev/v1alpha1".into(),
            kind: "AuthorizationPolicy".into(),
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("p{}", yaml.len())),
                ..ObjectMeta::default()
            },
            spec,
        })
    }

    fn web() -> Workload {
        Workload {
            namespace: "shop".into(),
            name: "web".into(),
            service_account: "web".into(),
            node: "a".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ips: vec![],
            netns: None,
            meshed: true,
            mtls: crate::state::model::MtlsMode::Permissive,
            ready: true,
            terminating: false,
            named_ports: BTreeMap::new(),
        }
    }

    fn allowed(policies: &[Policy], ns: &str, sa: &str, port: u16) -> bool {
        let source = Identity::new("cluster.local", ns, sa);
        let destination = web();
        evaluate(
            policies,
            &Check {
                source: &source,
                destination: &destination,
                port,
            },
        ) == Verdict::Allow
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

    /// The CRD in deploy/ and these types agree: an example holding every
    /// field the schema declares deserializes (the types refuse unknown
    /// fields), and the action enum is the same.
    #[test]
    fn crd_schema_matches_the_types() {
        fn example(schema: &serde_json::Value) -> serde_json::Value {
            if let Some(values) = schema.get("enum") {
                return values[0].clone();
            }
            if schema.get("x-kubernetes-int-or-string").is_some() {
                return "8080".into();
            }
            match schema["type"].as_str() {
                Some("object") => match schema.get("properties") {
                    Some(props) => props
                        .as_object()
                        .expect("properties")
                        .iter()
                        .map(|(k, v)| (k.clone(), example(v)))
                        .collect::<serde_json::Map<_, _>>()
                        .into(),
                    None => serde_json::json!({"app": "web"}),
                },
                Some("array") => vec![example(&schema["items"])].into(),
                Some("string") => "cluster.local/ns/shop/sa/web".into(),
                other => panic!("schema type {other:?}"),
            }
        }
        let crd: serde_json::Value = serde_yaml_ng::from_str(include_str!(
            "../../../deploy/crds/authorizationpolicy.yaml"
        ))
        .expect("CRD yaml");
        assert_eq!(crd["spec"]["names"]["kind"], "AuthorizationPolicy");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(
            format!(
                "{}/{}",
                crd["spec"]["group"].as_str().unwrap_or_default(),
                version["name"].as_str().unwrap_or_default()
            ),
            "trellis.dev/v1alpha1"
        );
        let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let spec: AuthorizationPolicySpec =
            serde_json::from_value(example(schema)).expect("the schema's fields are the types'");
        validate(&spec).expect("valid");
        assert_eq!(spec.rules[0].from[0].source.not_namespaces.len(), 1);
        assert_eq!(spec.rules[0].to[0].operation.not_ports.len(), 1);
        assert_eq!(
            schema["properties"]["action"]["enum"],
            serde_json::json!(["ALLOW", "DENY"])
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
    }
}
