//! `HTTPRoute` (`gateway.networking.k8s.io/v1`) as written, the subset a mesh
//! (GAMMA) uses, and its validation. Fields the Gateway API has but the agent
//! does not honour are kept (not rejected) and reported in the route's status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The object as written in the config folder or the API server.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Ignored for mesh routes, as GAMMA says.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// A Service parent (GAMMA): group `""` or `core`, kind `Service`.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), Some("" | "core"))
            && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Any one matching is enough; none means `PathPrefix /`.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default = "path_prefix", rename = "type")]
    pub kind: PathMatchKind,
    #[serde(default = "slash")]
    pub value: String,
}

fn path_prefix() -> PathMatchKind {
    PathMatchKind::PathPrefix
}

fn slash() -> String {
    "/".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathMatchKind {
    Exact,
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(default = "exact", rename = "type")]
    pub kind: ValueMatchKind,
    pub name: String,
    pub value: String,
}

fn exact() -> ValueMatchKind {
    ValueMatchKind::Exact
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchKind {
    Exact,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<serde_json::Value>,
    #[serde(default)]
    pub url_rewrite: Option<serde_json::Value>,
    #[serde(default)]
    pub request_mirror: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Share of requests against the rule's other backends; 1 when absent.
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Filters this agent applies; the others leave the route `Accepted=False`.
pub const SUPPORTED_FILTERS: &[&str] = &["RequestHeaderModifier", "ResponseHeaderModifier"];

/// The Gateway API's cap on a backend weight.
const MAX_WEIGHT: u32 = 1_000_000;

/// Checks the object on its own; `(field, reason)` of the first problem.
pub fn validate(route: &HttpRoute) -> Result<(), (String, String)> {
    let spec = &route.spec;
    if spec.parent_refs.is_empty() {
        return Err(("spec.parentRefs".into(), "at least one is required".into()));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{j}]");
            if let Some(path) = &m.path {
                match path.kind {
                    PathMatchKind::Exact | PathMatchKind::PathPrefix
                        if !path.value.starts_with('/') =>
                    {
                        return Err((format!("{at}.path.value"), "must start with '/'".into()));
                    }
                    PathMatchKind::RegularExpression => {
                        regex::Regex::new(&path.value)
                            .map_err(|e| (format!("{at}.path.value"), e.to_string()))?;
                    }
                    _ => {}
                }
            }
            for (field, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
                for (k, v) in list.iter().enumerate() {
                    let at = format!("{at}.{field}[{k}]");
                    if v.name.is_empty() {
                        return Err((format!("{at}.name"), "required".into()));
                    }
                    if field == "headers" && http::HeaderName::try_from(&v.name).is_err() {
                        return Err((format!("{at}.name"), "not a valid header name".into()));
                    }
                    if v.kind == ValueMatchKind::RegularExpression {
                        regex::Regex::new(&v.value)
                            .map_err(|e| (format!("{at}.value"), e.to_string()))?;
                    }
                }
            }
            if let Some(method) = &m.method
                && http::Method::from_bytes(method.as_bytes()).is_err()
            {
                return Err((format!("{at}.method"), "not an HTTP method".into()));
            }
        }
        for (j, f) in rule.filters.iter().enumerate() {
            let at = format!("{at}.filters[{j}]");
            for (name, m) in [
                ("requestHeaderModifier", &f.request_header_modifier),
                ("responseHeaderModifier", &f.response_header_modifier),
            ] {
                let Some(m) = m else { continue };
                for (list, values) in [("set", &m.set), ("add", &m.add)] {
                    for (k, h) in values.iter().enumerate() {
                        if http::HeaderName::try_from(&h.name).is_err() {
                            return Err((
                                format!("{at}.{name}.{list}[{k}].name"),
                                "not a valid header name".into(),
                            ));
                        }
                        if http::HeaderValue::try_from(&h.value).is_err() {
                            return Err((
                                format!("{at}.{name}.{list}[{k}].value"),
                                "not a valid header value".into(),
                            ));
                        }
                    }
                }
                for (k, h) in m.remove.iter().enumerate() {
                    if http::HeaderName::try_from(h).is_err() {
                        return Err((
                            format!("{at}.{name}.remove[{k}]"),
                            "not a valid header name".into(),
                        ));
                    }
                }
            }
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{j}]");
            if b.weight.is_some_and(|w| w > MAX_WEIGHT) {
                return Err((format!("{at}.weight"), format!("at most {MAX_WEIGHT}")));
            }
            if b.kind.as_deref().is_none_or(|k| k == "Service") && b.port.is_none() {
                return Err((
                    format!("{at}.port"),
                    "required for a Service backend".into(),
                ));
            }
        }
        if let Some(t) = &rule.timeouts {
            for (name, v) in [
                ("request", &t.request),
                ("backendRequest", &t.backend_request),
            ] {
                if let Some(v) = v {
                    parse_duration(v).map_err(|e| (format!("{at}.timeouts.{name}"), e))?;
                }
            }
        }
    }
    Ok(())
}

/// A Gateway API duration: `1h`, `10s`, `500ms`, or combinations (`1m30s`);
/// `0s` means none.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 10s, 500ms or 1m30s");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = ["ms", "h", "m", "s"]
            .into_iter()
            .find(|u| rest.starts_with(u))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        total += match unit {
            "h" => std::time::Duration::from_secs(n * 3600),
            "m" => std::time::Duration::from_secs(n * 60),
            "s" => std::time::Duration::from_secs(n),
            _ => std::time::Duration::from_millis(n),
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("1h").unwrap().as_secs(), 3600);
        for bad in ["", "10", "s", "1.5s", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
