//! `PeerAuthentication` (`trellis.dev/v1alpha1`, Istio's shape): which
//! mTLS mode a pod runs in, mesh-wide (in the mesh's root namespace, the
//! agent's own), per namespace (no selector) or per workload (a selector),
//! and per port of a workload (`portLevelMtls`). The most specific policy
//! with a mode other than `UNSET` decides: workload, then namespace, then
//! mesh; without one the `trellis.dev/mtls` labels do, then PERMISSIVE.
//!
//! STRICT is enforced in the kernel (`trl_pod_to`): a new connection from
//! outside the node's own stack is dropped, so only HBONE (delivered by the
//! agent) and the node's probes reach the pod. `DISABLE` reads as
//! PERMISSIVE: as in Istio's ambient mode, traffic between meshed pods
//! always goes through the tunnel, and plaintext is accepted.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    authz::{Selector, port_number},
    scope::{Scoped, oldest},
};
use crate::state::{Workload, model::MtlsMode};

/// The mTLS mode of the pods it selects, and of their ports.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    doc = "Trellis PeerAuthentication: the mTLS mode (STRICT or PERMISSIVE) of meshed workloads.",
    namespaced,
    shortname = "tpa",
    derive = "PartialEq",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new("!has(self.spec.portLevelMtls) || has(self.spec.selector)")
        .message("portLevelMtls needs a selector (it is about one workload's ports)"),
    validation = Rule::new("!has(self.spec.portLevelMtls) || size(self.spec.portLevelMtls) <= 8")
        .message("at most 8 ports may have their own mode (the kernel's slots per pod)")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Which pods of the namespace it applies to; all of them when absent
    /// (and, in the mesh's root namespace, every pod of the mesh).
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Modes by the pod's port number (a container port), overriding
    /// `mtls` on those ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, Mtls>")]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// Inherit: the next less specific policy decides.
    #[default]
    Unset,
    /// Plaintext accepted (read as PERMISSIVE: meshed traffic is tunnelled
    /// anyway).
    Disable,
    /// HBONE and plaintext accepted.
    Permissive,
    /// Only HBONE (and the node's own probes).
    Strict,
}

impl Mode {
    /// The mode it sets, `None` for UNSET.
    fn set(self) -> Option<MtlsMode> {
        match self {
            Self::Unset => None,
            Self::Disable | Self::Permissive => Some(MtlsMode::Permissive),
            Self::Strict => Some(MtlsMode::Strict),
        }
    }
}

/// Checks what the schema cannot say: a field path and a reason.
pub fn validate(spec: &PeerAuthenticationSpec) -> Result<(), (String, String)> {
    if !spec.port_level_mtls.is_empty() && spec.selector.is_none() {
        return Err((
            "spec.portLevelMtls".into(),
            "portLevelMtls needs a selector (it is about one workload's ports)".into(),
        ));
    }
    if spec.port_level_mtls.len() > trellis_common::MTLS_PORTS {
        return Err((
            "spec.portLevelMtls".into(),
            format!(
                "at most {} ports may have their own mode (the kernel's slots per pod); it names {}",
                trellis_common::MTLS_PORTS,
                spec.port_level_mtls.len()
            ),
        ));
    }
    for port in spec.port_level_mtls.keys() {
        if port_number(port).is_none() {
            return Err((
                format!("spec.portLevelMtls.{port}"),
                format!("{port:?} is not a port (1-65535)"),
            ));
        }
    }
    Ok(())
}

/// A policy ready to apply, as the state snapshot holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: Mode,
    /// Port number → mode (UNSET ports left out: they follow the pod).
    pub ports: BTreeMap<u16, Mode>,
    /// When it was made: of two at one level, the older one decides (as in
    /// Istio).
    #[serde(skip)]
    pub created: Option<k8s_openapi::jiff::Timestamp>,
}

impl PeerAuth {
    /// Compiles a validated object.
    pub fn compile(object: &PeerAuthentication) -> Self {
        let spec = &object.spec;
        Self {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            mode: spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
            ports: spec
                .port_level_mtls
                .iter()
                .filter(|(_, m)| m.mode != Mode::Unset)
                .filter_map(|(p, m)| Some((port_number(p)?, m.mode)))
                .collect(),
            created: object.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

impl Scoped for PeerAuth {
    fn name(&self) -> &str {
        &self.name
    }

    fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }

    fn created(&self) -> Option<k8s_openapi::jiff::Timestamp> {
        self.created
    }
}

/// The policies that may apply to the pods of one namespace: its own and
/// the mesh-wide ones of the root namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applicable {
    pub namespace: Vec<PeerAuth>,
    pub mesh: Vec<PeerAuth>,
}

/// A pod's modes: its own and its ports' that differ from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Modes {
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl Applicable {
    /// The modes the policies give `workload` (`mode: None` when none sets
    /// one, and the labels decide).
    pub fn modes(&self, workload: &Workload) -> Modes {
        let own = oldest(&self.namespace, Some(&workload.labels));
        let mode = [own, oldest(&self.namespace, None), oldest(&self.mesh, None)]
            .into_iter()
            .flatten()
            .find_map(|p| p.mode.set());
        let ports = own
            .into_iter()
            .flat_map(|p| &p.ports)
            .filter_map(|(port, m)| Some((*port, m.set()?)))
            .collect();
        Modes { mode, ports }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(namespace: &str, name: &str, age: i64, yaml: &str) -> PeerAuth {
        let spec: PeerAuthenticationSpec = serde_yaml_ng::from_str(yaml).expect(yaml);
        validate(&spec).expect("valid");
        PeerAuth::compile(&PeerAuthentication {
            metadata: crate::testing::meta(namespace, name, age),
            spec,
        })
    }

    fn pod(app: &str) -> Workload {
        crate::testing::workload("shop", app, app, &[("app", app)])
    }

    #[test]
    fn the_most_specific_mode_set_decides() {
        let mesh = compile("trellis-system", "default", 0, "mtls: {mode: STRICT}");
        let applicable = |namespace: Vec<PeerAuth>| Applicable {
            namespace,
            mesh: vec![mesh.clone()],
        };
        // The mesh's alone.
        assert_eq!(
            applicable(vec![]).modes(&pod("web")).mode,
            Some(MtlsMode::Strict)
        );
        // The namespace's over the mesh's; UNSET inherits; DISABLE is
        // permissive.
        let ns = compile("shop", "ns", 0, "mtls: {mode: DISABLE}");
        let unset = compile("shop", "web", 0, "selector: {matchLabels: {app: web}}");
        let a = applicable(vec![ns.clone(), unset]);
        assert_eq!(a.modes(&pod("web")).mode, Some(MtlsMode::Permissive));
        // The workload's over the namespace's, for the pods it selects.
        let web = compile(
            "shop",
            "web-strict",
            0,
            "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {'9090': {mode: PERMISSIVE}, '8443': {mode: UNSET}}",
        );
        let a = applicable(vec![ns, web]);
        let modes = a.modes(&pod("web"));
        assert_eq!(modes.mode, Some(MtlsMode::Strict));
        assert_eq!(modes.ports, BTreeMap::from([(9090, MtlsMode::Permissive)]));
        assert_eq!(a.modes(&pod("db")).mode, Some(MtlsMode::Permissive));
        assert!(a.modes(&pod("db")).ports.is_empty());
        // Of two at one level, the older decides.
        let old = compile("shop", "z-old", 60, "mtls: {mode: PERMISSIVE}");
        let new = compile("shop", "a-new", 0, "mtls: {mode: STRICT}");
        assert_eq!(
            applicable(vec![new, old]).modes(&pod("db")).mode,
            Some(MtlsMode::Permissive)
        );
        // None at all: the labels decide.
        assert_eq!(Applicable::default().modes(&pod("web")).mode, None);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |yaml: &str| {
            let spec: PeerAuthenticationSpec = serde_yaml_ng::from_str(yaml).expect(yaml);
            validate(&spec).expect_err("invalid")
        };
        let (field, _) = bad("portLevelMtls: {'80': {mode: STRICT}}");
        assert_eq!(field, "spec.portLevelMtls");
        let (field, reason) =
            bad("selector: {matchLabels: {app: web}}\nportLevelMtls: {http: {mode: STRICT}}");
        assert_eq!(field, "spec.portLevelMtls.http");
        assert!(reason.contains("not a port"), "{reason}");
        assert!(
            serde_yaml_ng::from_str::<PeerAuthenticationSpec>("mtls: {mode: STRICTER}").is_err()
        );
    }
}
