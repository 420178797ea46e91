//! Kubernetes objects from YAML: parsing with the real schemas (k8s-openapi),
//! and validation of each object on its own, with file, object, field and reason.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, LoadBalancerIngress, Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Deserialize as _;

use super::service_entry::ServiceEntry;
use crate::{
    policy::{
        authn::RequestAuthentication, authz::AuthorizationPolicy, peer_auth::PeerAuthentication,
        providers, telemetry::Telemetry,
    },
    resilience::TrafficPolicy,
    routes::{grpc_route::GrpcRoute, http_route::HttpRoute, reference_grant::ReferenceGrant},
};

/// The annotation that tells the agent where a pod's network namespace is.
pub const NETNS_ANNOTATION: &str = "trellis.dev/netns";
/// Namespace label `enabled` puts its pods in the mesh; Pod label `disabled` opts one out.
pub const MESH_LABEL: &str = "trellis.dev/mesh";
/// Namespace or Pod label: `strict` or `permissive` (default).
pub const MTLS_LABEL: &str = "trellis.dev/mtls";
/// EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One object the state model knows. Shared, not copied: a source keeps
/// every object and hands all of them to each rebuild, so a clone is a
/// reference count (at 20,000 pods a deep copy took 110 ms and 108 MiB).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Node(Arc<Node>),
    Namespace(Arc<Namespace>),
    Pod(Arc<SlimPod>),
    Service(Arc<Service>),
    ServiceEntry(Arc<ServiceEntry>),
    EndpointSlice(Arc<EndpointSlice>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    RequestAuthentication(Arc<RequestAuthentication>),
    PeerAuthentication(Arc<PeerAuthentication>),
    Telemetry(Arc<Telemetry>),
    NetworkPolicy(Arc<NetworkPolicy>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
    ReferenceGrant(Arc<ReferenceGrant>),
    TrafficPolicy(Arc<TrafficPolicy>),
    /// The ConfigMap [`providers::CONFIG_MAP`]: the mesh configuration.
    MeshConfig(Arc<ConfigMap>),
}

/// What the agent reads of a Pod, kept instead of the API object: pods are
/// most of a cluster's objects, and `k8s_openapi`'s `Pod` takes 2.2 KiB
/// plus 2.1 KiB per container before a single field is set.
#[derive(Clone, Debug, PartialEq)]
pub struct SlimPod {
    /// Name, namespace, uid, deletionTimestamp and the
    /// [`NETNS_ANNOTATION`]; nothing else (the labels are below).
    pub metadata: ObjectMeta,
    /// Shared with the workload each snapshot makes of the pod.
    pub labels: Arc<BTreeMap<String, String>>,
    pub node_name: String,
    /// `default` when the spec names none, as admission sets it.
    pub service_account: String,
    pub host_network: bool,
    /// `status.podIP` first, then the rest of `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// In phase `Succeeded` or `Failed`: its containers have ended, and its
    /// address may already be another pod's.
    pub terminal: bool,
    /// The `Ready` condition; `None` without one.
    pub ready: Option<bool>,
    /// Container port names → ports, for Services' named target ports and
    /// network policies' named ports.
    pub named_ports: BTreeMap<String, NamedPort>,
}

/// The container port a name stands for. Kubernetes resolves a name with
/// its protocol (a Service port's, a policy port's), so it is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NamedPort {
    pub port: u16,
    /// IP protocol number: TCP unless the container says UDP or SCTP.
    #[serde(serialize_with = "protocol_name")]
    pub protocol: u8,
}

impl NamedPort {
    /// The port number, when the name is used with `protocol`.
    pub fn number(&self, protocol: u8) -> Option<u16> {
        (self.protocol == protocol).then_some(self.port)
    }
}

fn protocol_name<S: serde::Serializer>(protocol: &u8, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(crate::policy::network::protocol_name(*protocol))
}

/// A port's protocol as an object writes it (`TCP` when absent): its number,
/// or `field` and why not.
pub fn protocol_number(field: &str, protocol: Option<&str>) -> Result<u8, Invalid> {
    let name = protocol.unwrap_or("TCP");
    crate::policy::network::protocol_number(name)
        .ok_or_else(|| invalid(field, format!("{name:?} is not TCP, UDP or SCTP")))
}

impl SlimPod {
    /// Checks what the agent relies on in `pod` and keeps only that.
    fn new(pod: Pod) -> Result<Self, Invalid> {
        let Pod {
            metadata,
            spec,
            status,
        } = pod;
        let spec = spec.unwrap_or_default();
        let status = status.unwrap_or_default();
        let service_account = match spec.service_account_name {
            Some(account) if !account.is_empty() => {
                check_name("spec.serviceAccountName", &account, NameForm::Subdomain)?;
                account
            }
            _ => "default".into(),
        };
        let mut ips = Vec::new();
        if let Some(ip) = &status.pod_ip {
            ips.push(parse_ip("status.podIP", ip)?);
        }
        for (i, p) in status.pod_ips.iter().flatten().enumerate() {
            let ip = parse_ip(&format!("status.podIPs[{i}].ip"), &p.ip)?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let netns = metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NETNS_ANNOTATION));
        if let Some(path) = netns
            && !path.starts_with('/')
        {
            return Err(invalid(
                format!("metadata.annotations[{NETNS_ANNOTATION}]"),
                format!("{path:?} is not an absolute path"),
            ));
        }
        let mut named_ports = BTreeMap::new();
        for (c, container) in spec.containers.iter().enumerate() {
            for (p, port) in container.ports.iter().flatten().enumerate() {
                let field = format!("spec.containers[{c}].ports[{p}].containerPort");
                check_port(&field, port.container_port)?;
                let protocol = protocol_number(
                    &format!("spec.containers[{c}].ports[{p}].protocol"),
                    port.protocol.as_deref(),
                )?;
                if let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) {
                    named_ports.entry(name.clone()).or_insert(NamedPort {
                        port: number,
                        protocol,
                    });
                }
            }
        }
        for label in [MESH_LABEL, MTLS_LABEL] {
            validate_label(metadata.labels.as_ref(), label, "metadata.labels")?;
        }
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status == "True");
        Ok(Self {
            metadata: ObjectMeta {
                annotations: netns
                    .map(|path| BTreeMap::from([(NETNS_ANNOTATION.to_owned(), path.clone())])),
                name: metadata.name,
                namespace: metadata.namespace,
                uid: metadata.uid,
                deletion_timestamp: metadata.deletion_timestamp,
                ..ObjectMeta::default()
            },
            labels: Arc::new(metadata.labels.unwrap_or_default()),
            node_name: spec.node_name.unwrap_or_default(),
            service_account,
            host_network: spec.host_network == Some(true),
            ips,
            terminal: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            ready,
            named_ports,
        })
    }

    /// The path in its [`NETNS_ANNOTATION`].
    pub fn netns(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NETNS_ANNOTATION))
            .map(String::as_str)
    }
}

/// Identifies an object: kind, namespace (empty for cluster-scoped), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        ObjectKey {
            kind: self.kind(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// Its kind, as the API names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Node(_) => "Node",
            Self::Namespace(_) => "Namespace",
            Self::Pod(_) => "Pod",
            Self::Service(_) => "Service",
            Self::ServiceEntry(_) => "ServiceEntry",
            Self::EndpointSlice(_) => "EndpointSlice",
            Self::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Self::RequestAuthentication(_) => "RequestAuthentication",
            Self::PeerAuthentication(_) => "PeerAuthentication",
            Self::Telemetry(_) => "Telemetry",
            Self::NetworkPolicy(_) => "NetworkPolicy",
            Self::HttpRoute(_) => "HTTPRoute",
            Self::GrpcRoute(_) => "GRPCRoute",
            Self::ReferenceGrant(_) => "ReferenceGrant",
            Self::TrafficPolicy(_) => "TrafficPolicy",
            Self::MeshConfig(_) => "ConfigMap",
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Node(o) => &o.metadata,
            Self::Namespace(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::ServiceEntry(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::RequestAuthentication(o) => &o.metadata,
            Self::PeerAuthentication(o) => &o.metadata,
            Self::Telemetry(o) => &o.metadata,
            Self::NetworkPolicy(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::GrpcRoute(o) => &o.metadata,
            Self::ReferenceGrant(o) => &o.metadata,
            Self::TrafficPolicy(o) => &o.metadata,
            Self::MeshConfig(o) => &o.metadata,
        }
    }
}

/// An object rejected, with where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {object}: {field}: {reason}")]
pub struct ObjectError {
    pub file: String,
    /// `Pod shop/web` when the object could be named, else `document N`.
    pub object: String,
    /// A dotted path such as `spec.ports[0].port`.
    pub field: String,
    pub reason: String,
}

/// A whole file that could not be read as YAML (often a write in progress).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: not valid YAML: {reason}")]
pub struct FileError {
    pub file: String,
    pub reason: String,
}

/// What one file holds: the objects that passed validation, the rejected
/// ones (with their key when it could be read, so the last good version of
/// that object can keep serving), and documents of kinds this agent ignores.
#[derive(Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub rejected: Vec<(Option<ObjectKey>, ObjectError)>,
    pub ignored: Vec<String>,
}

/// Parses a multi-document YAML text.
pub fn parse_file(file: &Path, text: &str) -> Result<ParsedFile, FileError> {
    let file_name = file.display().to_string();
    let mut parsed = ParsedFile::default();
    // One document's tree at a time: a whole file's, kept until the end,
    // took several times the objects' own memory for a large one.
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|e| FileError {
            file: file_name.clone(),
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue; // an empty document (`---` at the end)
        }
        match parse_object(&file_name, index + 1, value) {
            Ok(Some(object)) => parsed.objects.push(object),
            Ok(None) => {}
            Err((key, err)) if err.field == "kind" && err.reason.starts_with("ignored") => {
                let _ = key;
                parsed.ignored.push(err.reason);
            }
            Err((key, err)) => parsed.rejected.push((key, err)),
        }
    }
    Ok(parsed)
}

type Rejection = (Option<ObjectKey>, ObjectError);

/// One object as JSON (from the API server, or a file's document
/// `index`), parsed and validated as a file's are; `origin` is what errors
/// name as the file. `Ok(None)` for an object to skip.
#[expect(clippy::result_large_err, reason = "config parsing, off the data path")]
pub fn parse_value(
    origin: &str,
    index: usize,
    value: serde_json::Value,
) -> Result<Option<Object>, Rejection> {
    parse_object(origin, index, value)
}

#[expect(clippy::result_large_err, reason = "config parsing, off the data path")]
fn parse_object(
    file: &str,
    index: usize,
    value: serde_json::Value,
) -> Result<Option<Object>, Rejection> {
    let str_field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (str_field("apiVersion"), str_field("kind"));
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let doc_name = match &name {
        Some(n) => format!("{kind} {n}"),
        None => format!("document {index}"),
    };
    let reject = |key: Option<ObjectKey>, field: &str, reason: String| {
        (
            key,
            ObjectError {
                file: file.into(),
                object: doc_name.clone(),
                field: field.into(),
                reason,
            },
        )
    };
    if kind.is_empty() || api_version.is_empty() {
        return Err(reject(
            None,
            "kind",
            "every object needs apiVersion and kind".into(),
        ));
    }
    if name.as_deref().is_none_or(str::is_empty) {
        return Err(reject(None, "metadata.name", "required".into()));
    }

    macro_rules! typed {
        ($ty:ty, $api:literal) => {{
            if api_version != $api {
                return Err(reject(
                    None,
                    "apiVersion",
                    format!("{kind} is {} here, not {api_version}", $api),
                ));
            }
            let object: $ty = serde_path_to_error::deserialize(value).map_err(|e| {
                let field = e.path().to_string();
                reject(None, &field, e.inner().to_string())
            })?;
            object
        }};
        ($ty:ty, $variant:ident, $api:literal, namespaced) => {{
            let mut object = typed!($ty, $api);
            default_namespace(&mut object.metadata);
            Object::$variant(Arc::new(object))
        }};
        ($ty:ty, $variant:ident, $api:literal) => {{ Object::$variant(Arc::new(typed!($ty, $api))) }};
    }
    let rejected = |key: ObjectKey, (field, reason): Invalid| {
        let object = key.to_string();
        (
            Some(key),
            ObjectError {
                file: file.into(),
                object,
                field,
                reason,
            },
        )
    };
    let object = match kind.as_str() {
        "Node" => typed!(Node, Node, "v1"),
        "Namespace" => typed!(Namespace, Namespace, "v1"),
        "Pod" => {
            let mut pod = typed!(Pod, "v1");
            default_namespace(&mut pod.metadata);
            let key = ObjectKey {
                kind: "Pod",
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
            };
            match SlimPod::new(pod) {
                Ok(pod) => Object::Pod(Arc::new(pod)),
                Err(invalid) => return Err(rejected(key, invalid)),
            }
        }
        "Service" => typed!(Service, Service, "v1", namespaced),
        "ServiceEntry" => typed!(
            ServiceEntry,
            ServiceEntry,
            "trellis.dev/v1alpha1",
            namespaced
        ),
        "EndpointSlice" => typed!(
            EndpointSlice,
            EndpointSlice,
            "discovery.k8s.io/v1",
            namespaced
        ),
        "NetworkPolicy" => typed!(
            NetworkPolicy,
            NetworkPolicy,
            "networking.k8s.io/v1",
            namespaced
        ),
        "AuthorizationPolicy" => typed!(
            AuthorizationPolicy,
            AuthorizationPolicy,
            "trellis.dev/v1alpha1",
            namespaced
        ),
        "RequestAuthentication" => typed!(
            RequestAuthentication,
            RequestAuthentication,
            "trellis.dev/v1alpha1",
            namespaced
        ),
        "PeerAuthentication" => typed!(
            PeerAuthentication,
            PeerAuthentication,
            "trellis.dev/v1alpha1",
            namespaced
        ),
        "Telemetry" => typed!(Telemetry, Telemetry, "trellis.dev/v1alpha1", namespaced),
        "HTTPRoute" => typed!(
            HttpRoute,
            HttpRoute,
            "gateway.networking.k8s.io/v1",
            namespaced
        ),
        "GRPCRoute" => typed!(
            GrpcRoute,
            GrpcRoute,
            "gateway.networking.k8s.io/v1",
            namespaced
        ),
        "ReferenceGrant" => typed!(
            ReferenceGrant,
            ReferenceGrant,
            "gateway.networking.k8s.io/v1beta1",
            namespaced
        ),
        "TrafficPolicy" => typed!(
            TrafficPolicy,
            TrafficPolicy,
            "trellis.dev/v1alpha1",
            namespaced
        ),
        // Of ConfigMaps, only the mesh configuration is the agent's.
        "ConfigMap" if name.as_deref() == Some(providers::CONFIG_MAP) => {
            typed!(ConfigMap, MeshConfig, "v1", namespaced)
        }
        "ConfigMap" => return Ok(None),
        other => {
            return Err(reject(
                None,
                "kind",
                format!("ignored: {api_version} {other} is not handled by this agent yet"),
            ));
        }
    };
    let key = object.key();
    validate(&object).map_err(|invalid| rejected(key, invalid))?;
    Ok(Some(object))
}

/// The mesh configuration's YAML (empty when the key is missing).
pub fn mesh_yaml(config: &ConfigMap) -> &str {
    config
        .data
        .as_ref()
        .and_then(|d| d.get(providers::CONFIG_KEY))
        .map_or("", String::as_str)
}

/// Namespaced objects without a namespace live in `default`, as kubectl applies them.
fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".into());
    }
}

type Invalid = (String, String);

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (field.into(), reason.into())
}

fn parse_ip(field: &str, value: &str) -> Result<IpAddr, Invalid> {
    value
        .parse()
        .map_err(|_| invalid(field, format!("{value:?} is not an IP address")))
}

fn check_port(field: &str, port: i32) -> Result<(), Invalid> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(invalid(field, format!("{port} is not a port (1-65535)")))
    }
}

/// The forms Kubernetes allows a name (RFC 1123 and 1035).
#[derive(Clone, Copy)]
enum NameForm {
    /// Up to 63 of `a-z`, `0-9` and `-`, starting and ending alphanumeric.
    Label,
    /// A label that starts with a letter (Services: DNS names of their own).
    Rfc1035Label,
    /// Up to 253 characters of labels joined by dots.
    Subdomain,
}

/// Names go into DNS names, SPIFFE IDs and HBONE headers: a name the API
/// server would refuse is refused here too, with the rule it breaks.
fn check_name(field: &str, name: &str, form: NameForm) -> Result<(), Invalid> {
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    let (ok, rule) = match form {
        NameForm::Label => (
            label(name),
            "up to 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        ),
        NameForm::Rfc1035Label => (
            label(name) && name.starts_with(|c: char| c.is_ascii_lowercase()),
            "up to 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit",
        ),
        NameForm::Subdomain => (
            name.len() <= 253 && name.split('.').all(label),
            "up to 253 characters: lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a valid name: {rule}"),
        ))
    }
}

/// Checks what the agent relies on, beyond what the schema already enforced.
fn validate(object: &Object) -> Result<(), Invalid> {
    let meta = object.metadata();
    let form = match object {
        Object::Namespace(_) => NameForm::Label,
        Object::Service(_) => NameForm::Rfc1035Label,
        _ => NameForm::Subdomain,
    };
    check_name(
        "metadata.name",
        meta.name.as_deref().unwrap_or_default(),
        form,
    )?;
    if let Some(namespace) = meta.namespace.as_deref() {
        check_name("metadata.namespace", namespace, NameForm::Label)?;
    }
    match object {
        Object::Node(node) => {
            for (i, a) in node
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .enumerate()
            {
                if a.type_ == "InternalIP" {
                    parse_ip(&format!("status.addresses[{i}].address"), &a.address)?;
                }
            }
            if let Some(cidr) = node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()) {
                parse_cidr(cidr).map_err(|r| invalid("spec.podCIDR", r))?;
            }
        }
        Object::Namespace(_) => {}
        // Checked as it was slimmed (SlimPod::new).
        Object::Pod(_) => {}
        Object::Service(svc) => {
            let Some(spec) = &svc.spec else { return Ok(()) };
            for (i, ip) in spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .enumerate()
            {
                if ip != "None" && !ip.is_empty() {
                    parse_ip(&format!("spec.clusterIPs[{i}]"), ip)?;
                }
            }
            check_session_affinity(spec)?;
            for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
                parse_ip(&format!("spec.externalIPs[{i}]"), ip)?;
            }
            for (i, ingress) in load_balancer_ingress(svc).enumerate() {
                if let Some(ip) = &ingress.ip {
                    parse_ip(&format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
                }
            }
            for (i, port) in spec.ports.iter().flatten().enumerate() {
                check_port(&format!("spec.ports[{i}].port"), port.port)?;
                if let Some(IntOrString::Int(t)) = &port.target_port {
                    check_port(&format!("spec.ports[{i}].targetPort"), *t)?;
                }
                protocol_number(
                    &format!("spec.ports[{i}].protocol"),
                    port.protocol.as_deref(),
                )?;
            }
        }
        Object::AuthorizationPolicy(policy) => {
            crate::policy::authz::validate(&policy.spec)?;
        }
        Object::RequestAuthentication(policy) => {
            crate::policy::authn::validate(&policy.spec)?;
        }
        Object::PeerAuthentication(policy) => {
            crate::policy::peer_auth::validate(&policy.spec)?;
        }
        Object::Telemetry(policy) => {
            crate::policy::telemetry::validate(&policy.spec)?;
        }
        Object::ServiceEntry(entry) => super::service_entry::validate(&entry.spec)?,
        Object::NetworkPolicy(policy) => {
            crate::policy::network::NetworkPolicy::from_object(policy)?;
        }
        Object::HttpRoute(route) => crate::routes::http_route::validate(route)?,
        Object::GrpcRoute(route) => crate::routes::grpc_route::validate(route)?,
        Object::ReferenceGrant(grant) => crate::routes::reference_grant::validate(grant)?,
        Object::TrafficPolicy(policy) => crate::resilience::policy::validate(policy)?,
        Object::MeshConfig(config) => {
            providers::parse(mesh_yaml(config))?;
        }
        Object::EndpointSlice(slice) => {
            let labels = slice.metadata.labels.as_ref();
            if labels.and_then(|l| l.get(SERVICE_NAME_LABEL)).is_none() {
                return Err(invalid(
                    format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                    "required: names the slice's Service",
                ));
            }
            for (e, ep) in slice.endpoints.iter().enumerate() {
                for (a, addr) in ep.addresses.iter().enumerate() {
                    parse_ip(&format!("endpoints[{e}].addresses[{a}]"), addr)?;
                }
            }
        }
    }
    Ok(())
}

/// The addresses a Service's load balancer reports
/// (`status.loadBalancer.ingress`).
pub fn load_balancer_ingress(svc: &Service) -> impl Iterator<Item = &LoadBalancerIngress> {
    svc.status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
}

/// `sessionAffinity` as the API server takes it: `None` or `ClientIP`, a
/// timeout only with `ClientIP`, of 1 s to a day.
fn check_session_affinity(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<(), Invalid> {
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match spec.session_affinity.as_deref() {
        None | Some("None") if timeout.is_some() => Err(invalid(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "only with sessionAffinity: ClientIP",
        )),
        None | Some("None") => Ok(()),
        Some("ClientIP") => match timeout {
            Some(t) if !(1..=86_400).contains(&t) => Err(invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{t} is not within 1 to 86400"),
            )),
            _ => Ok(()),
        },
        Some(other) => Err(invalid(
            "spec.sessionAffinity",
            format!("{other:?} is not one of [\"None\", \"ClientIP\"]"),
        )),
    }
}

fn validate_label(
    labels: Option<&std::collections::BTreeMap<String, String>>,
    label: &str,
    field: &str,
) -> Result<(), Invalid> {
    let allowed: &[&str] = match label {
        MESH_LABEL => &["enabled", "disabled"],
        _ => &["strict", "permissive"],
    };
    match labels.and_then(|l| l.get(label)) {
        Some(v) if !allowed.contains(&v.as_str()) => Err(invalid(
            format!("{field}[{label}]"),
            format!("{v:?} is not one of {allowed:?}"),
        )),
        _ => Ok(()),
    }
}

/// `10.1.1.0/24` → (address, prefix length).
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = cidr
        .split_once('/')
        .ok_or_else(|| format!("{cidr:?} is not a CIDR"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{cidr:?} is not a CIDR"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{cidr:?} has no valid prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{cidr:?}: prefix length over {max}"));
    }
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ParsedFile {
        parse_file(Path::new("/cfg/mesh.yaml"), text).expect("yaml")
    }

    #[test]
    fn parses_the_contract_objects() {
        let parsed = parse(
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.1.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 10.255.0.1}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web, annotations: {trellis.dev/netns: /var/run/netns/x}}\n\
             spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}\n\
             status: {podIP: 10.1.1.12}\n---\n",
        );
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let keys: Vec<String> = parsed.objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(keys, ["Node node-a", "Pod default/web"]);
    }

    #[test]
    fn rejections_name_file_object_field_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {ports: [{port: 70000}]}",
                "spec.ports[0].port",
                "70000 is not a port",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {ports: [{port: 80, protocol: QUIC}]}",
                "spec.ports[0].protocol",
                "not TCP, UDP or SCTP",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.1.1.300}",
                "status.podIP",
                "not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {trellis.dev/netns: relative}}",
                "metadata.annotations[trellis.dev/netns]",
                "absolute",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {trellis.dev/mesh: maybe}}",
                "metadata.labels[trellis.dev/mesh]",
                "not one of",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: http}]}]}",
                "spec.containers[0].ports[0].containerPort",
                "invalid type",
            ),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.1.1.0/40}",
                "spec.podCIDR",
                "prefix length",
            ),
            (
                "apiVersion: v2\nkind: Pod\nmetadata: {name: p}",
                "apiVersion",
                "Pod is v1 here",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{to: [{operation: {pathz: [/a]}}]}]}",
                "spec.rules[0].to[0].operation.pathz",
                "unknown field `pathz`",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: LOG}",
                "spec.action",
                "unknown variant `LOG`",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{to: [{operation: {ports: ['0']}}]}]}",
                "spec.rules[0].to[0].operation.ports[0]",
                "not a port",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]}",
                "spec.rules[0].filters[0].urlRewrite.path",
                "PathPrefix",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{filters: [{type: CORS, cors: {allowOrigins: ['https://a.test', 'a.test']}}]}]}",
                "spec.rules[0].filters[0].cors.allowOrigins[1]",
                "is not <scheme>://<host>",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{sessionPersistence: {cookieConfig: {lifetimeType: Permanent}}}]}",
                "spec.rules[0].sessionPersistence.absoluteTimeout",
                "required when cookieConfig.lifetimeType is Permanent",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{sessionPersistence: {idleTimeout: 1d}}]}",
                "spec.rules[0].sessionPersistence.idleTimeout",
                "is not a duration",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{filters: [{type: ExternalAuth, externalAuth: {protocol: HTTP, backendRef: {name: a}}}]}]}",
                "spec.rules[0].filters[0].externalAuth.http",
                "required by protocol HTTP",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{filters: [{type: ExternalAuth, externalAuth: {protocol: HTTP, backendRef: {name: a, port: 80}, http: {path: check}}}]}]}",
                "spec.rules[0].filters[0].externalAuth.http.path",
                "is not a path",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{filters: [{type: CORS}]}]}",
                "spec.rules[0].filters[0].cors",
                "required by type CORS",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]}]}",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
                "301",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}], rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m}}}]}]}",
                "spec.rules[0].filters[0].requestMirror.backendRef.port",
                "required",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec: {parentRefs: [{name: web}], rules: [{matches: [{method: {service: a/b}}]}]}",
                "spec.rules[0].matches[0].method.service",
                "without '/'",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {targetRefs: [{group: apps, kind: Deployment, name: web}]}",
                "spec.targetRefs[0]",
                "targets are Services",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}], healthCheck: {interval: 1s}}",
                "spec.healthCheck",
                "per Service",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}",
                "metadata.name",
                "required",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nendpoints: []",
                "metadata.labels[kubernetes.io/service-name]",
                "required",
            ),
            // Names as the API server allows them: they go into DNS names,
            // SPIFFE IDs and HBONE headers.
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: Web}",
                "metadata.name",
                "\"Web\" is not a valid name",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop_1}",
                "metadata.namespace",
                "not a valid name",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {serviceAccountName: \"web\\nx\", containers: []}",
                "spec.serviceAccountName",
                "not a valid name",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: 1web}",
                "metadata.name",
                "starting with a letter",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop.eu}",
                "metadata.name",
                "up to 63",
            ),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {name: node-.a}",
                "metadata.name",
                "each part",
            ),
        ];
        for (text, field, reason) in cases {
            let parsed = parse(text);
            assert!(parsed.objects.is_empty(), "{text}");
            let (_, err) = parsed
                .rejected
                .first()
                .unwrap_or_else(|| panic!("not rejected: {text}"));
            assert_eq!(err.field, *field, "{err}");
            assert!(err.reason.contains(reason), "{err}");
            assert!(err.to_string().starts_with("/cfg/mesh.yaml: "), "{err}");
        }
    }

    #[test]
    fn names_the_api_server_allows_are_accepted() {
        let parsed = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0.v1, namespace: shop-2}\n\
             spec: {serviceAccountName: system.web, containers: []}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: ip-10-0-0-1.ec2.internal}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: 9lives}\n",
        );
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        assert_eq!(parsed.objects.len(), 3);
        // An empty account is the namespace's `default`, as admission sets it.
        let parsed = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {serviceAccountName: '', containers: []}\n",
        );
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let long = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n",
            "a".repeat(64)
        );
        assert_eq!(parse(&long).rejected.len(), 1, "a label is 63 at most");
    }

    #[test]
    fn a_bad_object_does_not_take_its_neighbours_down() {
        let parsed = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec: {ports: [{port: 0}]}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        );
        assert_eq!(parsed.objects.len(), 2);
        let (key, err) = &parsed.rejected[0];
        assert_eq!(
            key.as_ref().map(ToString::to_string).as_deref(),
            Some("Service a/s")
        );
        assert_eq!(err.object, "Service a/s");
    }

    #[test]
    fn unknown_kinds_are_ignored_not_rejected() {
        let parsed = parse("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n");
        assert!(parsed.rejected.is_empty());
        assert_eq!(parsed.ignored.len(), 1);
    }

    #[test]
    fn broken_yaml_fails_the_whole_file() {
        let err = parse_file(
            Path::new("/cfg/x.yaml"),
            "apiVersion: v1\nkind: [unclosed\n",
        )
        .expect_err("bad yaml");
        assert!(
            err.to_string().starts_with("/cfg/x.yaml: not valid YAML"),
            "{err}"
        );
    }
}
