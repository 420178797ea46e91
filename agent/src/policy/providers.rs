//! The mesh's extension providers: the external authorization services an
//! `AuthorizationPolicy` with `action: CUSTOM` names, defined as Istio
//! defines them, in the mesh configuration's `extensionProviders`. Trellis
//! reads that configuration from the ConfigMap [`CONFIG_MAP`] (key
//! [`CONFIG_KEY`], YAML), as istiod reads its `istio` ConfigMap: in the
//! agent's own namespace from the API server, or in the config folder.
//!
//! Both of Istio's ext_authz provider kinds are served, by the code that
//! serves a route's `ExternalAuth` filter: `envoyExtAuthzHttp` (the
//! request's head is sent to the service) and `envoyExtAuthzGrpc` (Envoy's
//! `Authorization/Check`).

use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use crate::routes::table::{AuthProtocol, ExternalAuth};

/// The ConfigMap holding the mesh configuration.
pub const CONFIG_MAP: &str = "trellis-mesh";
/// Its key holding the configuration's YAML.
pub const CONFIG_KEY: &str = "mesh";

/// The mesh configuration, as far as Trellis reads it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    /// Where meshed pods may connect, as Istio's mesh configuration says.
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundMode,
}

/// Istio's `outboundTrafficPolicy.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Meshed pods may connect anywhere.
    #[default]
    AllowAny,
    /// A meshed pod's TCP connect succeeds only to what the cluster knows:
    /// a Service's or ServiceEntry's address, a pod's, a node's (the
    /// kernel refuses the others with EPERM at connect time).
    RegistryOnly,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(default)]
    pub envoy_ext_authz_http: Option<HttpProvider>,
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<GrpcProvider>,
}

/// A service asked with the request's head (Envoy's HTTP ext_authz).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProvider {
    /// `name.namespace.svc.cluster.local`, or `namespace/name`.
    pub service: String,
    pub port: u32,
    /// Put before the request's path in the check.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Request headers the check carries besides Host and Authorization.
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// Headers of an allowing answer put on the request (all but framing
    /// ones when none are named).
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Headers of an allowing answer put on the client's answer.
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
    /// Headers of a denial passed on to the client (all when none named).
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    /// Headers put on the check, whatever the request carries.
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default)]
    pub include_request_body_in_check: Option<BodyInCheck>,
    /// How long it has to answer (`500ms`, `2s`, `0.5s`; 2 s by default).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Let the request through when it cannot be asked, or answers 5xx.
    #[serde(default)]
    pub fail_open: bool,
    /// The status of a request refused because it could not be asked
    /// (`"403"` by default; Istio writes it as a string).
    #[serde(default)]
    pub status_on_error: Option<StatusText>,
}

/// A service asked with `envoy.service.auth.v3.Authorization/Check`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcProvider {
    pub service: String,
    pub port: u32,
    #[serde(default)]
    pub include_request_body_in_check: Option<BodyInCheck>,
    /// How long it has to answer (`500ms`, `2s`, `0.5s`; 2 s by default).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Let the request through when it cannot be asked, or answers 5xx.
    #[serde(default)]
    pub fail_open: bool,
    /// The status of a request refused because it could not be asked
    /// (`"403"` by default; Istio writes it as a string).
    #[serde(default)]
    pub status_on_error: Option<StatusText>,
}

/// A status as Istio writes it (a string), or as a number.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StatusText {
    Number(u32),
    Text(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BodyInCheck {
    /// The most of the body the check carries.
    pub max_request_bytes: u32,
}

/// Providers by name, ready to ask.
pub type Providers = BTreeMap<String, Arc<ExternalAuth>>;

/// The providers of the configuration's YAML; an error names the field
/// (under `data.mesh`) and says why.
pub fn parse(yaml: &str) -> Result<Providers, (String, String)> {
    compile(&parse_config(yaml)?)
}

/// The configuration's YAML, read; an error names the field (under
/// `data.mesh`) and says why.
pub fn parse_config(yaml: &str) -> Result<MeshConfig, (String, String)> {
    serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(yaml)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            format!("data.{CONFIG_KEY}")
        } else {
            format!("data.{CONFIG_KEY}.{path}")
        };
        (field, e.inner().to_string())
    })
}

/// The providers of a configuration read by [`parse_config`].
pub fn compile(config: &MeshConfig) -> Result<Providers, (String, String)> {
    let mut providers = Providers::new();
    for (i, p) in config.extension_providers.iter().enumerate() {
        let field = |name: &str| format!("data.{CONFIG_KEY}.extensionProviders[{i}].{name}");
        if p.name.is_empty() {
            return Err((field("name"), "empty".into()));
        }
        let auth = match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(http), None) => {
                let at = |name: &str| field(&format!("envoyExtAuthzHttp.{name}"));
                let common = Common {
                    service: &http.service,
                    port: http.port,
                    body: http.include_request_body_in_check.as_ref(),
                    timeout: http.timeout.as_deref(),
                    fail_open: http.fail_open,
                    status_on_error: http.status_on_error.as_ref(),
                };
                ExternalAuth {
                    path_prefix: http.path_prefix.clone().unwrap_or_default(),
                    allowed_headers: lower(&http.include_request_headers_in_check),
                    allowed_response_headers: lower(&http.headers_to_upstream_on_allow),
                    check_headers: check_headers(&http.include_additional_headers_in_check)
                        .map_err(|why| (at("includeAdditionalHeadersInCheck"), why))?,
                    downstream_on_allow: lower(&http.headers_to_downstream_on_allow),
                    downstream_on_deny: lower(&http.headers_to_downstream_on_deny),
                    ..common.auth(AuthProtocol::Http, &at)?
                }
            }
            (None, Some(grpc)) => {
                let at = |name: &str| field(&format!("envoyExtAuthzGrpc.{name}"));
                // Over gRPC the check carries every header.
                Common {
                    service: &grpc.service,
                    port: grpc.port,
                    body: grpc.include_request_body_in_check.as_ref(),
                    timeout: grpc.timeout.as_deref(),
                    fail_open: grpc.fail_open,
                    status_on_error: grpc.status_on_error.as_ref(),
                }
                .auth(AuthProtocol::Grpc, &at)?
            }
            (Some(_), Some(_)) => {
                return Err((
                    field("envoyExtAuthzGrpc"),
                    "a provider is envoyExtAuthzHttp or envoyExtAuthzGrpc, not both".into(),
                ));
            }
            (None, None) => {
                return Err((
                    field("name"),
                    format!(
                        "{:?} defines no provider Trellis serves (envoyExtAuthzHttp, envoyExtAuthzGrpc)",
                        p.name
                    ),
                ));
            }
        };
        if providers.insert(p.name.clone(), Arc::new(auth)).is_some() {
            return Err((field("name"), format!("{:?} is defined twice", p.name)));
        }
    }
    Ok(providers)
}

/// `namespace/name` of a provider's service as Istio writes it: a
/// cluster host name (`name.namespace.svc.cluster.local`, or shorter down
/// to `name.namespace`) or `namespace/name`.
fn service_name(service: &str) -> Result<String, String> {
    let wrong = || {
        format!(
            "{service:?} is not a Service: write name.namespace.svc.cluster.local or namespace/name"
        )
    };
    let label = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let (namespace, name) = match service.split_once('/') {
        Some((namespace, host)) => {
            let name = host.split('.').next().unwrap_or_default();
            (namespace, name)
        }
        None => {
            let mut labels = service.split('.');
            let name = labels.next().unwrap_or_default();
            let namespace = labels.next().ok_or_else(wrong)?;
            if labels.next().is_some_and(|svc| svc != "svc") {
                return Err(wrong());
            }
            (namespace, name)
        }
    };
    if label(namespace) && label(name) {
        Ok(format!("{namespace}/{name}"))
    } else {
        Err(wrong())
    }
}

/// The fields both kinds of provider have. (Each kind spells them out:
/// serde cannot refuse unknown fields of a struct that flattens another.)
struct Common<'a> {
    service: &'a str,
    port: u32,
    body: Option<&'a BodyInCheck>,
    timeout: Option<&'a str>,
    fail_open: bool,
    status_on_error: Option<&'a StatusText>,
}

impl Common<'_> {
    /// The provider as `protocol` with these fields, the rest empty (the
    /// caller fills what its kind has); `at` names a field in errors.
    fn auth(
        &self,
        protocol: AuthProtocol,
        at: &dyn Fn(&str) -> String,
    ) -> Result<ExternalAuth, (String, String)> {
        let service = service_name(self.service).map_err(|why| (at("service"), why))?;
        let port = port(self.port).map_err(|why| (at("port"), why))?;
        let timeout = match self.timeout {
            None => ExternalAuth::TIMEOUT,
            Some(text) => duration(text).map_err(|why| (at("timeout"), why))?,
        };
        let status = match self.status_on_error {
            None => u32::from(ExternalAuth::STATUS_ON_ERROR),
            Some(StatusText::Number(n)) => *n,
            Some(StatusText::Text(t)) => t
                .trim()
                .parse()
                .map_err(|_| (at("statusOnError"), format!("{t:?} is not an HTTP status")))?,
        };
        let status_on_error = u16::try_from(status)
            .ok()
            .filter(|s| (200..=599).contains(s))
            .ok_or_else(|| {
                (
                    at("statusOnError"),
                    format!("{status} is not an HTTP status (200-599)"),
                )
            })?;
        Ok(ExternalAuth {
            forward_body: self.body.map_or(0, |b| b.max_request_bytes as usize),
            timeout,
            fail_open: self.fail_open,
            status_on_error,
            ..ExternalAuth::new(protocol, Some((service, port)))
        })
    }
}

/// A check's time limit as Istio writes it (`0.5s`, protobuf's form) or
/// as the Gateway API does (`500ms`, `2s`, `1m`): more than nothing, at
/// most a minute.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let parsed = match text.strip_suffix('s') {
        Some(seconds) if seconds.contains('.') => seconds
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 60.0)
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| format!("{text:?} is not a duration such as 0.5s or 2s")),
        _ => crate::routes::http_route::parse_duration(text),
    }?;
    if parsed.is_zero() || parsed > std::time::Duration::from_secs(60) {
        return Err(format!("{text:?}: more than 0 and at most 1m"));
    }
    Ok(parsed)
}

fn port(port: u32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{port} is not a port (1-65535)"))
}

/// Valid header names and values, names lower-cased.
fn check_headers(headers: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            http::HeaderValue::from_str(value)
                .map_err(|_| format!("{name}: {value:?} is not a header value"))?;
            Ok((name.as_str().to_owned(), value.clone()))
        })
        .collect()
}

fn lower(names: &[String]) -> Vec<String> {
    names.iter().map(|n| n.to_ascii_lowercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbound_traffic_policy_is_read_as_istio_writes_it() {
        let mode = |yaml: &str| parse_config(yaml).map(|c| c.outbound_traffic_policy.mode);
        assert_eq!(mode(""), Ok(OutboundMode::AllowAny));
        assert_eq!(
            mode("outboundTrafficPolicy: {mode: REGISTRY_ONLY}"),
            Ok(OutboundMode::RegistryOnly)
        );
        assert_eq!(
            mode("outboundTrafficPolicy: {mode: ALLOW_ANY}"),
            Ok(OutboundMode::AllowAny)
        );
        let (field, reason) = mode("outboundTrafficPolicy: {mode: DENY_ALL}").expect_err("refused");
        assert_eq!(field, "data.mesh.outboundTrafficPolicy.mode");
        assert!(reason.contains("REGISTRY_ONLY"), "{reason}");
    }

    #[test]
    fn providers_are_read_as_istio_writes_them() {
        let providers = parse(
            "extensionProviders:\n\
             - name: http-authz\n  envoyExtAuthzHttp:\n    service: ext-authz.auth.svc.cluster.local\n    port: 8000\n    pathPrefix: /check\n    includeRequestHeadersInCheck: [X-User]\n    headersToUpstreamOnAllow: [x-verdict]\n    includeRequestBodyInCheck: {maxRequestBytes: 512}\n    headersToDownstreamOnAllow: [Set-Cookie]\n    headersToDownstreamOnDeny: [x-why]\n    includeAdditionalHeadersInCheck: {X-Mesh: trellis}\n\
             - name: grpc-authz\n  envoyExtAuthzGrpc: {service: auth/opa, port: 9191, timeout: 0.5s, failOpen: true, statusOnError: '503'}\n",
        )
        .expect("valid");
        let http = &providers["http-authz"];
        assert_eq!(http.protocol, AuthProtocol::Http);
        assert_eq!(http.service, Some(("auth/ext-authz".into(), 8000)));
        assert_eq!(http.path_prefix, "/check");
        assert_eq!(http.allowed_headers, ["x-user"]);
        assert_eq!(http.allowed_response_headers, ["x-verdict"]);
        assert_eq!(http.forward_body, 512);
        assert_eq!(http.timeout, ExternalAuth::TIMEOUT);
        assert!(!http.fail_open);
        assert_eq!(http.status_on_error, 403);
        assert_eq!(http.downstream_on_allow, ["set-cookie"]);
        assert_eq!(http.downstream_on_deny, ["x-why"]);
        assert_eq!(
            http.check_headers,
            [("x-mesh".to_string(), "trellis".to_string())]
        );
        let grpc = &providers["grpc-authz"];
        assert_eq!(grpc.protocol, AuthProtocol::Grpc);
        assert_eq!(grpc.service, Some(("auth/opa".into(), 9191)));
        assert_eq!(grpc.timeout, std::time::Duration::from_millis(500));
        assert!(grpc.fail_open);
        assert_eq!(grpc.status_on_error, 503);
        assert!(parse("").expect("empty").is_empty());
    }

    #[test]
    fn service_names_take_istio_forms() {
        for (written, want) in [
            ("ext.auth.svc.cluster.local", "auth/ext"),
            ("ext.auth.svc", "auth/ext"),
            ("ext.auth", "auth/ext"),
            ("auth/ext", "auth/ext"),
            ("auth/ext.auth.svc.cluster.local", "auth/ext"),
        ] {
            assert_eq!(service_name(written).as_deref(), Ok(want), "{written}");
        }
        for bad in ["ext", "ext.auth.example.com", "/ext", "Auth/ext", ""] {
            assert!(service_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: x.y, port: 0}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzHttp.port",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: nowhere, port: 1}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.service",
            ),
            (
                "extensionProviders: [{name: a, zipkin: {service: x.y, port: 1}}]",
                "data.mesh.extensionProviders[0].zipkin",
            ),
            (
                "extensionProviders: [{name: a}]",
                "data.mesh.extensionProviders[0].name",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.y, port: 1}}, \
                 {name: a, envoyExtAuthzGrpc: {service: x.y, port: 2}}]",
                "data.mesh.extensionProviders[1].name",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: x.y, port: 1, includeAdditionalHeadersInCheck: {'a b': c}}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzHttp.includeAdditionalHeadersInCheck",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.y, port: 1, headersToDownstreamOnDeny: [x]}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.headersToDownstreamOnDeny",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: x.y, port: 1, timeout: 0s}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzHttp.timeout",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.y, port: 1, timeout: 2h}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.timeout",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.y, port: 1, statusOnError: '99'}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.statusOnError",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.y, port: 1, statusOnError: teapot}}]",
                "data.mesh.extensionProviders[0].envoyExtAuthzGrpc.statusOnError",
            ),
            ("extensionProviders: 3", "data.mesh.extensionProviders"),
        ];
        for (yaml, field) in cases {
            let (got, why) = parse(yaml).expect_err(yaml);
            assert_eq!(got, field, "{yaml}: {why}");
        }
    }
}
