//! `GRPCRoute` (`gateway.networking.k8s.io/v1`) as a mesh uses it (GAMMA):
//! matches on the gRPC service and method and on headers, the same filters
//! and backends as `HTTPRoute`. It compiles into the same rules, a method
//! match becoming a match on the parts of the request path
//! `/<service>/<method>`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::http_route::{BackendRef, HttpRouteFilter, ParentRef, ValueMatch, ValueMatchKind};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRoute {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GrpcRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Ignored for mesh routes, as GAMMA says.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Any one matching is enough; none matches every call.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// GEP-1619 (experimental channel).
    #[serde(default)]
    pub session_persistence: Option<super::session::SessionPersistence>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// A service and/or method; absent parts match any.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(default = "exact", rename = "type")]
    pub kind: ValueMatchKind,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

fn exact() -> ValueMatchKind {
    ValueMatchKind::Exact
}

/// Checks the object on its own; `(field, reason)` of the first problem.
/// Filters and backends are checked as an `HTTPRoute`'s.
pub fn validate(route: &GrpcRoute) -> Result<(), (String, String)> {
    let spec = &route.spec;
    if spec.parent_refs.is_empty() {
        return Err(("spec.parentRefs".into(), "at least one is required".into()));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("spec.rules[{i}].matches[{j}]");
            if let Some(method) = &m.method {
                if method.service.is_none() && method.method.is_none() {
                    return Err((
                        format!("{at}.method"),
                        "give a service, a method or both".into(),
                    ));
                }
                for (part, value) in [("service", &method.service), ("method", &method.method)] {
                    let Some(value) = value else { continue };
                    let bad = match method.kind {
                        ValueMatchKind::Exact => (value.is_empty() || value.contains('/'))
                            .then(|| "a name without '/'".to_owned()),
                        ValueMatchKind::RegularExpression => {
                            regex::Regex::new(value).err().map(|e| e.to_string())
                        }
                    };
                    if let Some(reason) = bad {
                        return Err((format!("{at}.method.{part}"), reason));
                    }
                }
            }
            super::http_route::validate_value_matches(&at, "headers", &m.headers)?;
        }
        let at = format!("spec.rules[{i}]");
        super::http_route::validate_filters(&at, &rule.filters)?;
        super::http_route::validate_backends(&at, &rule.backend_refs)?;
        super::http_route::validate_session(&at, rule.session_persistence.as_ref())?;
    }
    Ok(())
}
