//! `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`): lets routes of
//! another namespace send to Services of this one. Without a grant a
//! cross-namespace `backendRef` (or mirror) is `RefNotPermitted`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrant {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantSpec {
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    /// Every object of the kind when absent.
    #[serde(default)]
    pub name: Option<String>,
}

/// Checks the object on its own; `(field, reason)` of the first problem.
pub fn validate(grant: &ReferenceGrant) -> Result<(), (String, String)> {
    if grant.spec.from.is_empty() {
        return Err(("spec.from".into(), "at least one is required".into()));
    }
    if grant.spec.to.is_empty() {
        return Err(("spec.to".into(), "at least one is required".into()));
    }
    for (i, f) in grant.spec.from.iter().enumerate() {
        if f.kind.is_empty() || f.namespace.is_empty() {
            return Err((
                format!("spec.from[{i}]"),
                "kind and namespace are required".into(),
            ));
        }
    }
    for (i, t) in grant.spec.to.iter().enumerate() {
        if t.kind.is_empty() {
            return Err((format!("spec.to[{i}].kind"), "required".into()));
        }
    }
    Ok(())
}

/// Whether `grants` let a route of `kind` in `from_ns` refer to Service
/// `name` in the grants' namespace `to_ns`.
pub fn permits(
    grants: &[&ReferenceGrant],
    kind: &str,
    from_ns: &str,
    to_ns: &str,
    name: &str,
) -> bool {
    grants
        .iter()
        .filter(|g| g.metadata.namespace.as_deref() == Some(to_ns))
        .any(|g| {
            g.spec.from.iter().any(|f| {
                f.group == "gateway.networking.k8s.io" && f.kind == kind && f.namespace == from_ns
            }) && g.spec.to.iter().any(|t| {
                matches!(t.group.as_str(), "" | "core")
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == name)
            })
        })
}
