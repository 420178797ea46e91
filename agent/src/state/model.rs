//! The derived view the data path needs, computed from the objects of any
//! source: this node, workloads (pods with addresses), services and their
//! ready backends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Service},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Serialize;

use crate::{
    policy::{
        authn::{self, Authentication},
        authz::Policy,
        network::NetworkPolicy,
    },
    resilience::{Resilience, TrafficPolicy},
    routes::RouteTable,
};

use super::{
    memo::{self, Memo, NamespaceMesh, Pass},
    objects::{MESH_LABEL, MTLS_LABEL, NamedPort, Object, SERVICE_NAME_LABEL, SlimPod, parse_cidr},
    service_entry::{Location, Resolution, ServiceEntry},
};

/// Node label naming its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Where mesh-wide policies live when the build is not told (the agent's
/// `--mesh-namespace` default).
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";

/// This node, as its `Node` object describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// Where pods reach the agent: the capture address is InternalIP:15001
    /// (one per family on a dual-stack node).
    pub internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<(IpAddr, u8)>,
}

/// mTLS mode of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

/// A pod with an address, anywhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// The pod's UID: how its cgroup is named on its node.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    pub service_account: String,
    pub node: String,
    /// The pod's, shared with its object (20,000 pods' label maps are
    /// megabytes, and a rebuild would copy each).
    pub labels: Arc<BTreeMap<String, String>>,
    pub ips: Vec<IpAddr>,
    /// Path of its network namespace: the `trellis.dev/netns` annotation,
    /// or for a local pod without one, found through its cgroup
    /// ([`crate::netns::discover`]).
    pub netns: Option<PathBuf>,
    /// In the mesh: its namespace is labelled in, and it did not opt out.
    pub meshed: bool,
    pub mtls: MtlsMode,
    /// Ports whose mode is not `mtls` (PeerAuthentication `portLevelMtls`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub mtls_ports: BTreeMap<u16, MtlsMode>,
    /// `Ready` condition (pods without conditions count as ready).
    pub ready: bool,
    /// Being deleted.
    pub terminating: bool,
    /// Container port names → ports, for named target ports.
    #[serde(skip)]
    pub named_ports: BTreeMap<String, NamedPort>,
    /// The hash of its namespace and labels, where the search for its
    /// identity starts ([`crate::policy::compiler::set_hash`]): each sync
    /// finds the identity of every workload of the cluster, and did it by
    /// comparing label sets, a fifth of its cost at 20,000 pods.
    #[serde(skip)]
    pub label_set: u64,
}

impl Workload {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service port as the data path sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub app_protocol: Option<String>,
    /// The backends' port, resolved per backend for named ports.
    #[serde(skip)]
    target: Option<IntOrString>,
}

impl ServicePort {
    /// Its protocol's number (checked when the Service was read).
    pub fn protocol_number(&self) -> u8 {
        crate::policy::network::protocol_number(&self.protocol)
            .unwrap_or(crate::policy::network::TCP)
    }
}

/// One backend of a service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `namespace/name` of the pod behind it, when known.
    pub workload: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    /// Answers requests, terminating or not (EndpointSlice `serving`).
    pub serving: bool,
    /// Preferred by the Service's `trafficDistribution` for this node's
    /// calls (in its zone, or on it).
    pub close: bool,
}

impl Backend {
    /// Whether it may take new connections: `ready`, as kube-proxy reads
    /// it (the EndpointSlice controller clears it for terminating pods
    /// unless the Service publishes not-ready addresses).
    pub fn usable(&self) -> bool {
        self.ready
    }

    /// Which backends a call takes: only those of the highest tier present.
    /// Usable and `close`; usable; shutting down but still serving (the
    /// last pods of a rollout, say); `None`, never.
    fn tier(&self) -> Option<u8> {
        match (self.usable(), self.close) {
            (true, true) => Some(2),
            (true, false) => Some(1),
            (false, _) if self.terminating && self.serving => Some(0),
            (false, _) => None,
        }
    }
}

/// A Service with its virtual IPs and, per port, its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Backends by service port number.
    pub backends: BTreeMap<u16, Vec<Backend>>,
    /// `sessionAffinity: ClientIP`: how long a client stays on its backend
    /// after its last call.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "seconds")]
    pub client_ip_affinity: Option<Duration>,
    /// What a `ServiceEntry` adds; `None` for a Service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryView>,
}

/// A `ServiceEntry`'s own part of its view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryView {
    /// Its host names; the first names it in metrics and traces.
    pub hosts: Vec<String>,
    pub location: Location,
    /// `resolution: NONE`: a call goes to the address it dialled (its
    /// backends are the entry's addresses).
    pub passthrough: bool,
}

/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY: Duration = Duration::from_secs(10_800);

fn seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_u64(d.as_secs()),
        None => s.serialize_none(),
    }
}

impl ServiceView {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name its calls are reported under: a Service's cluster DNS
    /// name, a `ServiceEntry`'s first host.
    pub fn host(&self) -> String {
        match &self.entry {
            Some(entry) => entry.hosts.first().cloned().unwrap_or_default(),
            None => format!("{}.{}.svc.cluster.local", self.name, self.namespace),
        }
    }

    /// The backends of `port` for a call to `dialled`: the address itself
    /// for a pass-through entry's call to one of its addresses, else
    /// [`Self::ready_backends`] of its family.
    pub fn backends_for(&self, port: u16, dialled: IpAddr) -> Vec<SocketAddr> {
        let dialled = dialled.to_canonical();
        if self.entry.as_ref().is_some_and(|e| e.passthrough) && self.vips.contains(&dialled) {
            return self
                .backends
                .get(&port)
                .into_iter()
                .flatten()
                .filter(|b| b.addr.ip() == dialled)
                .map(|b| b.addr)
                .collect();
        }
        self.ready_backends(port, dialled.is_ipv6())
    }

    /// The usable backends of a port for a VIP of one family (a VIP's
    /// backends are of its family, as EndpointSlices are): the `close`
    /// ones when the Service prefers some and any is usable. With none, the
    /// terminating ones still serving, as kube-proxy and Cilium fall back
    /// to them: a call then finds a pod that is draining rather than none.
    pub fn ready_backends(&self, port: u16, ipv6: bool) -> Vec<SocketAddr> {
        let family = || {
            self.backends
                .get(&port)
                .into_iter()
                .flatten()
                .filter(|b| b.addr.is_ipv6() == ipv6)
        };
        let Some(best) = family().filter_map(Backend::tier).max() else {
            return Vec::new();
        };
        family()
            .filter(|b| b.tier() == Some(best))
            .map(|b| b.addr)
            .collect()
    }
}

/// Everything derived from one set of objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub node: Option<NodeInfo>,
    /// Shared with the snapshot before when their objects did not change
    /// ([`Memo`]).
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<ServiceView>>,
    /// Authorization policies of every namespace, grouped by namespace.
    pub policies: Vec<Policy>,
    /// Kubernetes network policies of every namespace.
    pub network_policies: Vec<NetworkPolicy>,
    /// Request authentication policies, by namespace.
    pub authentications: BTreeMap<String, Vec<Authentication>>,
    /// Peer authentication policies (mTLS modes), every namespace's.
    pub peer_authentications: Vec<crate::policy::peer_auth::PeerAuth>,
    /// Telemetry policies (what is traced, logged and counted), every
    /// namespace's, with the mesh's root namespace.
    pub telemetry: crate::policy::telemetry::Telemetries,
    /// The external authorization services CUSTOM policies name, from the
    /// mesh configuration.
    pub providers: crate::policy::providers::Providers,
    /// Where meshed pods may connect, from the mesh configuration.
    pub outbound_traffic_policy: crate::policy::providers::OutboundMode,
    /// Namespace labels, by name (for namespace selectors).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Every node of the cluster, this one included.
    pub nodes: Vec<NodeInfo>,
    /// HTTP routes by Service port, and their status.
    pub routes: RouteTable,
    /// Traffic policies by `namespace/name` of the Service they target.
    pub traffic: BTreeMap<String, Arc<Resilience>>,
    /// Objects by kind, for status output.
    pub counts: BTreeMap<&'static str, usize>,
    /// Where to find workloads and Services without a scan.
    #[serde(skip)]
    index: Index,
}

/// Positions in a snapshot's lists, for the lookups every proxied
/// connection and request makes: on a large cluster a scan costs
/// microseconds per lookup, and a rebuild that scans for each Service
/// seconds (`benches/state.rs`). Where two claim one key, the first in
/// order wins, as a scan would find it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Index {
    workload_by_ip: HashMap<IpAddr, usize>,
    workload_by_id: HashMap<String, usize>,
    service_by_id: HashMap<String, usize>,
    /// (VIP, port) to (Service, its port).
    service_by_vip: HashMap<(IpAddr, u16), (usize, usize)>,
    /// A `ServiceEntry`'s hosts to it.
    entry_by_host: HashMap<String, usize>,
    /// A namespace's authorization policies: a range of them.
    policies_by_namespace: HashMap<String, std::ops::Range<usize>>,
}

impl Index {
    fn workloads(workloads: &[Arc<Workload>]) -> Self {
        let mut index = Self::default();
        for (i, w) in workloads.iter().enumerate() {
            for ip in &w.ips {
                index.workload_by_ip.entry(*ip).or_insert(i);
            }
            index.workload_by_id.entry(w.id()).or_insert(i);
        }
        index
    }

    /// `policies`, grouped by namespace already.
    fn add_policies(&mut self, policies: &[Policy]) {
        for (i, p) in policies.iter().enumerate() {
            self.policies_by_namespace
                .entry(p.namespace.clone())
                .or_insert(i..i)
                .end = i + 1;
        }
    }

    fn add_services(&mut self, services: &[Arc<ServiceView>]) {
        for (i, s) in services.iter().enumerate() {
            self.service_by_id.entry(s.id()).or_insert(i);
            for host in s.entry.iter().flat_map(|e| &e.hosts) {
                self.entry_by_host.entry(host.clone()).or_insert(i);
            }
            for vip in &s.vips {
                for (p, port) in s.ports.iter().enumerate() {
                    self.service_by_vip
                        .entry((*vip, port.port))
                        .or_insert((i, p));
                }
            }
        }
    }
}

/// Compiles traffic policies per target Service. Two policies on one
/// Service: the older one applies (then the first by name), as the Gateway
/// API settles policy conflicts.
///
/// Keys: `namespace/name` for a Service or ServiceEntry, `Kind:namespace/name`
/// for a route.
///
/// `entries` are the ids of the ServiceEntries: a target of kind Service
/// does not name one, nor does one of kind ServiceEntry name a Service.
fn traffic_table(
    policies: &mut [&TrafficPolicy],
    entries: &HashSet<String>,
) -> BTreeMap<String, Arc<Resilience>> {
    policies.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            p.metadata.name.clone(),
        )
    });
    let mut out = BTreeMap::new();
    for p in policies.iter() {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        // Validated when parsed: compiling cannot fail here.
        let Ok(mut compiled) = Resilience::compile(&p.spec) else {
            continue;
        };
        compiled.policy = format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or_default());
        let compiled = Arc::new(compiled);
        for t in &p.spec.target_refs {
            let id = format!("{ns}/{}", t.name);
            let wrong_kind = match t.kind.as_str() {
                "Service" => entries.contains(&id),
                "ServiceEntry" => !entries.contains(&id),
                _ => false,
            };
            if !wrong_kind {
                out.entry(traffic_key(&t.kind, &id))
                    .or_insert_with(|| compiled.clone());
            }
        }
    }
    out
}

/// The key of a `TrafficPolicy` target in [`Snapshot::traffic`].
pub fn traffic_key(kind: &str, id: &str) -> String {
    // One `namespace/name` is one service's, Service or entry (see `build_for`).
    if kind == "Service" || kind == "ServiceEntry" {
        id.to_owned()
    } else {
        format!("{kind}:{id}")
    }
}

impl Snapshot {
    /// Builds the view for node `node_name` from all objects.
    pub fn build(node_name: &str, objects: &[Object]) -> Self {
        Self::build_with(node_name, objects, &mut Memo::default())
    }

    /// [`Snapshot::build`], taking from `memo` what the last build made of
    /// the objects that did not change, and leaving there what this one
    /// made.
    pub fn build_with(node_name: &str, objects: &[Object], memo: &mut Memo) -> Self {
        Self::build_for(node_name, DEFAULT_ROOT_NAMESPACE, objects, memo)
    }

    /// [`Snapshot::build_with`], with mesh-wide policies (PeerAuthentication)
    /// in `root_namespace`, the agent's own.
    pub fn build_for(
        node_name: &str,
        root_namespace: &str,
        objects: &[Object],
        memo: &mut Memo,
    ) -> Self {
        let mut nodes = Vec::new();
        let mut namespaces = BTreeMap::new();
        let mut pods = Vec::new();
        let mut services = Vec::new();
        let mut slices: BTreeMap<(String, String), Vec<&Arc<EndpointSlice>>> = BTreeMap::new();
        let mut counts = BTreeMap::new();
        let mut policies = Vec::new();
        let mut authentications: BTreeMap<String, Vec<Authentication>> = BTreeMap::new();
        let mut network_policies = Vec::new();
        let mut http_routes = Vec::new();
        let mut grpc_routes = Vec::new();
        let mut grants = Vec::new();
        let mut traffic_policies = Vec::new();
        let mut mesh_configs = Vec::new();
        let mut peer_authentications = Vec::new();
        let mut telemetry = Vec::new();
        let mut entries = Vec::new();
        for object in objects {
            *counts.entry(object.kind()).or_insert(0) += 1;
            match object {
                Object::Node(n) => nodes.push(n.as_ref()),
                Object::Namespace(n) => {
                    namespaces.insert(n.metadata.name.clone().unwrap_or_default(), n.as_ref());
                }
                Object::Pod(p) => pods.push(p),
                Object::Service(s) => services.push(s),
                Object::ServiceEntry(e) => entries.push(e.as_ref()),
                Object::HttpRoute(r) => http_routes.push(r.as_ref()),
                Object::GrpcRoute(r) => grpc_routes.push(r.as_ref()),
                Object::ReferenceGrant(g) => grants.push(g.as_ref()),
                Object::TrafficPolicy(p) => traffic_policies.push(p.as_ref()),
                Object::MeshConfig(c) => mesh_configs.push(c.as_ref()),
                Object::AuthorizationPolicy(p) => policies.push(Policy::compile(p)),
                Object::PeerAuthentication(p) => {
                    peer_authentications.push(crate::policy::peer_auth::PeerAuth::compile(p))
                }
                Object::Telemetry(t) => {
                    telemetry.push(crate::policy::telemetry::TelemetryPolicy::compile(t))
                }
                Object::RequestAuthentication(a) => {
                    let a = Authentication::compile(a);
                    authentications
                        .entry(a.namespace.clone())
                        .or_default()
                        .push(a);
                }
                // Validated when parsed: an error here cannot happen.
                Object::NetworkPolicy(p) => {
                    network_policies.extend(NetworkPolicy::from_object(p).ok())
                }
                Object::EndpointSlice(s) => {
                    let ns = s.metadata.namespace.clone().unwrap_or_default();
                    let svc = s
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .cloned()
                        .unwrap_or_default();
                    slices.entry((ns, svc)).or_default().push(s);
                }
            }
        }
        let node = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name))
            .map(|n| node_info(n));
        let zones: HashMap<&str, &str> = nodes
            .iter()
            .filter_map(|n| {
                let zone = n.metadata.labels.as_ref()?.get(ZONE_LABEL)?;
                Some((n.metadata.name.as_deref()?, zone.as_str()))
            })
            .collect();
        let mut pass = Pass::new(
            memo,
            node_name,
            zones
                .iter()
                .map(|(n, z)| ((*n).to_owned(), (*z).to_owned()))
                .collect(),
        );
        let mesh_wide: Vec<_> = peer_authentications
            .iter()
            .filter(|p| p.namespace == root_namespace && p.selector.is_none())
            .cloned()
            .collect();
        let meshes: HashMap<&str, NamespaceMesh> = namespaces
            .iter()
            .map(|(name, n)| {
                let mut mesh = namespace_mesh(n);
                mesh.peer = crate::policy::peer_auth::Applicable {
                    namespace: peer_authentications
                        .iter()
                        .filter(|p| p.namespace == *name)
                        .cloned()
                        .collect(),
                    mesh: mesh_wide.clone(),
                };
                (name.as_str(), mesh)
            })
            .collect();
        let outside = NamespaceMesh::default();
        let workloads: Vec<Arc<Workload>> = pods
            .iter()
            .filter_map(|p| {
                let ns = p.metadata.namespace.as_deref().unwrap_or_default();
                let mesh = meshes.get(ns).unwrap_or(&outside);
                pass.workload(p, mesh, || workload(p, mesh))
            })
            .collect();
        let mut index = Index::workloads(&workloads);
        let mut by_namespace: HashMap<&str, Vec<&Workload>> = HashMap::new();
        for w in &workloads {
            by_namespace.entry(&w.namespace).or_default().push(w);
        }
        pass.namespaces(
            by_namespace
                .iter()
                .map(|(ns, list)| {
                    let list = list.iter().map(|w| memo::address(w)).collect();
                    ((*ns).to_owned(), list)
                })
                .collect(),
        );
        let pods = Pods {
            all: &workloads,
            by_ip: &index.workload_by_ip,
            by_namespace,
        };
        let here = Here {
            node: node_name,
            zone: zones.get(node_name).copied(),
            zones,
        };
        let services: Vec<Arc<ServiceView>> = services
            .iter()
            .map(|s| {
                let namespace = s.metadata.namespace.as_deref().unwrap_or_default();
                let slices = slices
                    .get(&(
                        namespace.to_owned(),
                        s.metadata.name.clone().unwrap_or_default(),
                    ))
                    .map_or(&[][..], Vec::as_slice);
                pass.service(
                    s,
                    namespace,
                    slices,
                    || slice_addresses(slices).collect(),
                    |ip| pods.at(ip).map(memo::address),
                    || service_view(s, &here, &pods, slices),
                )
            })
            .collect();
        pass.finish();
        // Entries after the Services. The data path finds a service by
        // `namespace/name`, so an entry with a Service's name would get
        // that Service's routes, policies and, on the L7 path, its
        // backends: it is left out, and said so on each rebuild. So a
        // `namespace/name` is one service's, and routes and traffic
        // policies attach to entries by it as to Services.
        let taken: HashSet<(&str, &str)> = services
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .collect();
        let entries: Vec<ServiceView> = entries
            .iter()
            .map(|e| entry_view(e, &here, &pods))
            .filter(|e| {
                let free = !taken.contains(&(e.namespace.as_str(), e.name.as_str()));
                if !free {
                    tracing::warn!(
                        entry = %e.id(),
                        "ServiceEntry left out: a Service of its namespace has its name"
                    );
                }
                free
            })
            .collect();
        let mut services = services;
        services.extend(entries.into_iter().map(Arc::new));
        let routes = RouteTable::build(&http_routes, &grpc_routes, &grants, &services);
        let entry_ids = services
            .iter()
            .filter(|s| s.entry.is_some())
            .map(|s| s.id())
            .collect();
        let traffic = traffic_table(&mut traffic_policies, &entry_ids);
        let namespace_labels = namespaces
            .iter()
            .map(|(name, n)| (name.clone(), n.metadata.labels.clone().unwrap_or_default()))
            .collect();
        index.add_services(&services);
        let mesh = mesh_config(&mesh_configs);
        // Each connection is judged by its destination's namespace's
        // policies only (stable: each namespace's keep their order).
        policies.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        index.add_policies(&policies);
        Self {
            node,
            workloads,
            services,
            policies,
            network_policies,
            authentications,
            peer_authentications,
            telemetry: crate::policy::telemetry::Telemetries::new(root_namespace, telemetry),
            providers: crate::policy::providers::compile(&mesh).unwrap_or_default(),
            outbound_traffic_policy: mesh.outbound_traffic_policy.mode,
            namespaces: namespace_labels,
            nodes: nodes.iter().map(|n| node_info(n)).collect(),
            routes,
            traffic,
            counts,
            index,
        }
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .iter()
            .map(|w| &**w)
            .filter(move |w| w.node == node)
    }

    /// The service and port behind a VIP:port.
    pub fn service_for(&self, vip: SocketAddr) -> Option<(&ServiceView, &ServicePort)> {
        let (s, p) = self.index.service_by_vip.get(&(vip.ip(), vip.port()))?;
        let service = self.services.get(*s)?;
        Some((service, service.ports.get(*p)?))
    }

    /// The Service `namespace/name`.
    pub fn service(&self, id: &str) -> Option<&ServiceView> {
        self.services
            .get(*self.index.service_by_id.get(id)?)
            .map(|s| &**s)
    }

    /// The `ServiceEntry` that lists `host`.
    pub fn entry_for_host(&self, host: &str) -> Option<&ServiceView> {
        self.services
            .get(*self.index.entry_by_host.get(host)?)
            .map(|s| &**s)
    }

    /// The authorization policies of `namespace`.
    pub fn policies_in(&self, namespace: &str) -> &[Policy] {
        self.index
            .policies_by_namespace
            .get(namespace)
            .and_then(|r| self.policies.get(r.clone()))
            .unwrap_or_default()
    }

    /// The JWT rules of the `RequestAuthentication`s selecting `workload`.
    pub fn jwt_rules_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<authn::Rule>> + 'a {
        self.authentications
            .get(&workload.namespace)
            .into_iter()
            .flatten()
            .filter(|a| a.applies_to(workload))
            .flat_map(|a| a.rules.iter())
    }

    /// The workload `namespace/name`.
    pub fn workload(&self, id: &str) -> Option<&Workload> {
        self.workloads
            .get(*self.index.workload_by_id.get(id)?)
            .map(|w| &**w)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads
            .get(*self.index.workload_by_ip.get(&ip)?)
            .map(|w| &**w)
    }

    /// What the Telemetry policies have reported of `side` of a call by
    /// the workload at `ip` (everything when it is none of the mesh's).
    pub fn reporting(
        &self,
        ip: IpAddr,
        side: crate::policy::telemetry::Side,
    ) -> Arc<crate::policy::telemetry::Reporting> {
        use crate::policy::telemetry::Reporting;
        if self.telemetry.policies.is_empty() {
            return Reporting::everything();
        }
        self.workload_by_ip(ip.to_canonical())
            .map_or_else(Reporting::everything, |w| self.telemetry.reporting(w, side))
    }
}

/// The providers of the mesh configuration. The API source watches the
/// agent's own namespace only; a config folder with the ConfigMap in more
/// than one namespace has the first namespace's serve. Validated when
/// parsed, so no error is left here.
/// The mesh configuration (validated when parsed; of two, the one of the
/// first namespace by name), once per build.
fn mesh_config(
    configs: &[&k8s_openapi::api::core::v1::ConfigMap],
) -> crate::policy::providers::MeshConfig {
    configs
        .iter()
        .min_by(|a, b| a.metadata.namespace.cmp(&b.metadata.namespace))
        .and_then(|c| crate::policy::providers::parse_config(super::objects::mesh_yaml(c)).ok())
        .unwrap_or_default()
}

impl NodeInfo {
    /// The first InternalIP of the family: the capture address for it.
    pub fn internal_ip(&self, v6: bool) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv6() == v6)
    }
}

fn node_info(node: &Node) -> NodeInfo {
    let internal_ips = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let spec = node.spec.as_ref();
    let pod_cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default()
        .iter()
        .filter_map(|c| parse_cidr(c).ok())
        .collect();
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        internal_ips,
        pod_cidrs,
    }
}

/// What a pod's workload reads of its namespace `n`.
fn namespace_mesh(n: &Namespace) -> NamespaceMesh {
    let labels = n.metadata.labels.as_ref();
    NamespaceMesh {
        meshed: labels
            .and_then(|l| l.get(MESH_LABEL))
            .is_some_and(|v| v == "enabled"),
        mtls: labels.and_then(|l| l.get(MTLS_LABEL)).cloned(),
        peer: Default::default(),
    }
}

/// The workload of `pod`, in a namespace that reads as `ns`.
fn workload(pod: &SlimPod, ns: &NamespaceMesh) -> Option<Workload> {
    if pod.ips.is_empty() {
        return None; // not scheduled or not started: nothing to route to
    }
    if pod.terminal {
        // Its containers have ended and the kubelet has released its
        // address, which a new pod may have by now: the address is not
        // this pod's to claim (the EndpointSlice controller and Istio skip
        // terminal pods too).
        return None;
    }
    if pod.host_network {
        // Its address is its node's: it is the host to the mesh, as in
        // Cilium, never a workload (the agent's own pod is one).
        return None;
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let labels = pod.labels.clone();
    let meshed = ns.meshed && labels.get(MESH_LABEL).is_none_or(|v| v != "disabled");
    let mtls = match labels.get(MTLS_LABEL).or(ns.mtls.as_ref()) {
        Some(v) if v == "strict" => MtlsMode::Strict,
        _ => MtlsMode::Permissive,
    };
    let mut workload = Workload {
        label_set: crate::policy::compiler::set_hash(&namespace, &labels),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: pod.service_account.clone(),
        node: pod.node_name.clone(),
        netns: pod.netns().map(PathBuf::from),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        namespace,
        labels,
        ips: pod.ips.clone(),
        meshed,
        mtls,
        mtls_ports: BTreeMap::new(),
        ready: pod.ready.unwrap_or(true),
        named_ports: pod.named_ports.clone(),
    };
    // PeerAuthentication over the labels, when one sets a mode.
    let modes = ns.peer.modes(&workload);
    workload.mtls = modes.mode.unwrap_or(workload.mtls);
    workload.mtls_ports = modes
        .ports
        .into_iter()
        .filter(|(_, mode)| *mode != workload.mtls)
        .collect();
    Some(workload)
}

/// A snapshot's workloads while its Services are built: what a selector
/// or an EndpointSlice's address picks, found without a scan of them all.
struct Pods<'a> {
    all: &'a [Arc<Workload>],
    by_ip: &'a HashMap<IpAddr, usize>,
    by_namespace: HashMap<&'a str, Vec<&'a Workload>>,
}

impl Pods<'_> {
    fn at(&self, ip: IpAddr) -> Option<&Workload> {
        self.all.get(*self.by_ip.get(&ip)?).map(|w| &**w)
    }

    fn in_namespace(&self, namespace: &str) -> &[&Workload] {
        self.by_namespace.get(namespace).map_or(&[], Vec::as_slice)
    }
}

/// The node a snapshot is for, where its pods' calls start.
struct Here<'a> {
    node: &'a str,
    /// Node name → its `topology.kubernetes.io/zone` label.
    zones: HashMap<&'a str, &'a str>,
    /// This node's zone, when labelled.
    zone: Option<&'a str>,
}

/// How a Service picks endpoints for calls from [`Here`].
struct Locality<'a> {
    here: &'a Here<'a>,
    /// `internalTrafficPolicy: Local`: this node's endpoints only.
    only_node: bool,
    /// `trafficDistribution`: the endpoints to prefer while any is usable.
    prefer: Prefer,
    /// The EndpointSlices' topology hints, when they apply to [`Here`].
    hints: Option<HintMode>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prefer {
    Any,
    SameZone,
    SameNode,
}

impl Locality<'_> {
    /// Whether an endpoint on `node` (when known) may serve these calls.
    fn keeps(&self, node: Option<&str>) -> bool {
        !self.only_node || node == Some(self.here.node)
    }

    /// Whether an endpoint on `node`, in `zone` (its own, else its node's),
    /// is one the Service prefers for these calls.
    fn close(&self, node: Option<&str>, zone: Option<&str>) -> bool {
        match self.prefer {
            Prefer::Any => false,
            Prefer::SameNode => node == Some(self.here.node),
            Prefer::SameZone => {
                let zone = zone.or_else(|| self.here.zones.get(node?).copied());
                self.here.zone.is_some() && zone == self.here.zone
            }
        }
    }
}

/// `here`'s view of `svc`: with `internalTrafficPolicy: Local`, only the
/// endpoints on this node (calls from its pods go nowhere else, and fail
/// when there is none, as with kube-proxy and Cilium); with a
/// `trafficDistribution`, the endpoints it prefers marked `close`. Its
/// EndpointSlices `slices` list its endpoints; with none, its selector
/// picks them.
fn service_view(
    svc: &Service,
    here: &Here<'_>,
    pods: &Pods<'_>,
    slices: &[&Arc<EndpointSlice>],
) -> ServiceView {
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    // Besides the cluster IPs, a pod's calls to the Service's external IPs
    // and load balancer addresses are the Service's too, as kube-proxy and
    // Cilium take them inside the cluster; except a load balancer that
    // proxies (`ipMode: Proxy`), which must see the traffic itself.
    let balancers = super::objects::load_balancer_ingress(svc)
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.clone());
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(spec.cluster_ip.clone())
        .chain(spec.external_ips.clone().unwrap_or_default())
        .chain(balancers)
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                app_protocol: p.app_protocol.clone(),
                target: p.target_port.clone(),
            })
        })
        .collect();
    let locality = Locality {
        here,
        only_node: spec.internal_traffic_policy.as_deref() == Some("Local"),
        // PreferClose is PreferSameZone's older name.
        prefer: match spec.traffic_distribution.as_deref() {
            Some("PreferSameZone" | "PreferClose") => Prefer::SameZone,
            Some("PreferSameNode") => Prefer::SameNode,
            _ => Prefer::Any,
        },
        hints: hint_mode(slices, here),
    };
    let mut backends = BTreeMap::new();
    for port in &ports {
        let list = if slices.is_empty() {
            selector_backends(
                port,
                spec.selector.as_ref(),
                spec.publish_not_ready_addresses == Some(true),
                pods.in_namespace(&namespace),
                &locality,
            )
        } else {
            slice_backends(port, slices, pods, &locality)
        };
        backends.insert(port.port, list);
    }
    ServiceView {
        name: svc.metadata.name.clone().unwrap_or_default(),
        namespace,
        vips,
        ports,
        backends,
        client_ip_affinity: (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref()?.timeout_seconds)
                .and_then(|t| u64::try_from(t).ok())
                .map_or(DEFAULT_AFFINITY, Duration::from_secs)
        }),
        entry: None,
    }
}

/// A `ServiceEntry` (validated when parsed) as a service: its addresses
/// are its VIPs; its backends the endpoints it lists or the pods of its
/// namespace it selects, all ready (an entry says nothing of readiness;
/// a refused connection still tries another), none preferred.
fn entry_view(entry: &ServiceEntry, here: &Here<'_>, pods: &Pods<'_>) -> ServiceView {
    let namespace = entry.metadata.namespace.clone().unwrap_or_default();
    let spec = &entry.spec;
    // An address the entry lists: known as the pod it is, if it is one.
    let listed = |addr: SocketAddr| Backend {
        addr,
        workload: pods.at(addr.ip()).map(Workload::id),
        ready: true,
        terminating: false,
        serving: true,
        close: false,
    };
    let mut backends = BTreeMap::new();
    let mut ports = Vec::new();
    for p in &spec.ports {
        let port = ServicePort {
            name: p.name.clone(),
            port: u16::try_from(p.number).unwrap_or_default(),
            protocol: "TCP".into(),
            app_protocol: p.app_protocol(),
            target: Some(IntOrString::Int(p.target().into())),
        };
        let list = match &spec.workload_selector {
            // Pass-through: the addresses themselves, each call to the one
            // it dialled (`ServiceView::backends_for`).
            None if spec.resolution == Resolution::None => spec
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|ip| listed(SocketAddr::new(ip, p.target())))
                .collect(),
            Some(selector) => {
                let everywhere = Locality {
                    here,
                    only_node: false,
                    prefer: Prefer::Any,
                    hints: None,
                };
                selector_backends(
                    &port,
                    Some(&selector.labels),
                    false,
                    pods.in_namespace(&namespace),
                    &everywhere,
                )
            }
            None => spec
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip: IpAddr = e.address.parse().ok()?;
                    Some(listed(SocketAddr::new(ip, e.port_for(p))))
                })
                .collect(),
        };
        backends.insert(port.port, list);
        ports.push(port);
    }
    ServiceView {
        name: entry.metadata.name.clone().unwrap_or_default(),
        namespace,
        vips: spec
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        ports,
        backends,
        client_ip_affinity: None,
        entry: Some(EntryView {
            hosts: spec.hosts.clone(),
            location: spec.location,
            passthrough: spec.resolution == Resolution::None,
        }),
    }
}

/// The backend port for a pod: a number, a container port name, or the service port.
fn target_port(port: &ServicePort, workload: Option<&Workload>) -> Option<u16> {
    match &port.target {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => match name.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => workload?
                .named_ports
                .get(name)?
                .number(port.protocol_number()),
        },
    }
}

/// The backends a selector picks among the Service's namespace's
/// `workloads` (those `locality` keeps), with the conditions the
/// EndpointSlice controller would give them: ready when the pod is and is
/// not terminating, or always when the Service publishes not-ready
/// addresses (`publish_not_ready`).
fn selector_backends(
    port: &ServicePort,
    selector: Option<&BTreeMap<String, String>>,
    publish_not_ready: bool,
    workloads: &[&Workload],
    locality: &Locality<'_>,
) -> Vec<Backend> {
    // A Service without a selector has only what its EndpointSlices say.
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    workloads
        .iter()
        .copied()
        .filter(|w| locality.keeps(Some(&w.node)))
        .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .flat_map(|w| {
            let target = target_port(port, Some(w));
            let close = locality.close(Some(&w.node), None);
            w.ips.iter().filter_map(move |ip| {
                Some(Backend {
                    addr: SocketAddr::new(*ip, target?),
                    workload: Some(w.id()),
                    ready: (w.ready && !w.terminating) || publish_not_ready,
                    terminating: w.terminating,
                    serving: w.ready,
                    close,
                })
            })
        })
        .collect()
}

/// Every address `slices` list, in order: where [`slice_backends`] looks
/// for pods.
fn slice_addresses<'a>(slices: &'a [&Arc<EndpointSlice>]) -> impl Iterator<Item = IpAddr> + 'a {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .flat_map(|ep| &ep.addresses)
        .filter_map(|a| a.parse().ok())
}

/// The backends `slices` list (those `locality` keeps, by the endpoint's
/// `nodeName`, else its pod's node).
fn slice_backends(
    port: &ServicePort,
    slices: &[&Arc<EndpointSlice>],
    pods: &Pods<'_>,
    locality: &Locality<'_>,
) -> Vec<Backend> {
    let mut out = Vec::new();
    for slice in slices {
        // The slice's port of the same name carries the resolved number.
        let slice_port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.clone().unwrap_or_default() == port.name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        for ep in &slice.endpoints {
            let conditions = ep.conditions.as_ref();
            // Kubernetes: a nil `ready` means ready; `serving` covers terminating pods.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            // A nil `serving` defers to `ready`.
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let workload = pods.at(ip);
                let node = ep
                    .node_name
                    .as_deref()
                    .or(workload.map(|w| w.node.as_str()));
                if !locality.keeps(node) {
                    continue;
                }
                let Some(target) = slice_port.or_else(|| target_port(port, workload)) else {
                    continue;
                };
                out.push(Backend {
                    addr: SocketAddr::new(ip, target),
                    workload: workload.map(Workload::id),
                    ready,
                    terminating,
                    serving,
                    close: locality.close(node, ep.zone.as_deref())
                        || locality
                            .hints
                            .is_some_and(|mode| mode.hinted(ep, locality.here)),
                });
            }
        }
    }
    out
}

/// Topology hints the EndpointSlice controller wrote (Topology Aware
/// Routing, `trafficDistribution`), used as kube-proxy uses them: when
/// every ready endpoint carries node hints and one is for this node, the
/// endpoints hinted for it; else, the same with zone hints and this node's
/// zone; else none.
#[derive(Clone, Copy)]
enum HintMode {
    Node,
    Zone,
}

impl HintMode {
    /// Whether `ep` carries hints of this kind.
    fn written(self, ep: &Endpoint) -> bool {
        let hints = ep.hints.as_ref();
        match self {
            Self::Node => hints
                .and_then(|h| h.for_nodes.as_ref())
                .is_some_and(|n| !n.is_empty()),
            Self::Zone => hints
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|z| !z.is_empty()),
        }
    }

    /// Whether `ep`'s hints of this kind name `here`.
    fn hinted(self, ep: &Endpoint, here: &Here<'_>) -> bool {
        let hints = ep.hints.as_ref();
        match self {
            Self::Node => hints
                .and_then(|h| h.for_nodes.as_ref())
                .is_some_and(|n| n.iter().any(|n| n.name == here.node)),
            Self::Zone => hints
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|z| z.iter().any(|z| Some(z.name.as_str()) == here.zone)),
        }
    }
}

fn hint_mode(slices: &[&Arc<EndpointSlice>], here: &Here<'_>) -> Option<HintMode> {
    let ready: Vec<&Endpoint> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .collect();
    let usable = |mode: HintMode| {
        (!ready.is_empty()
            && ready.iter().all(|ep| mode.written(ep))
            && ready.iter().any(|ep| mode.hinted(ep, here)))
        .then_some(mode)
    };
    usable(HintMode::Node).or_else(|| {
        here.zone?;
        usable(HintMode::Zone)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::routes::table::AuthProtocol;
    use crate::state::objects::parse_file;

    const MESH: &str = include_str!("testdata/mesh.yaml");

    fn snapshot(extra: &str) -> Snapshot {
        let text = format!("{MESH}\n---\n{extra}");
        let parsed = parse_file(Path::new("mesh.yaml"), &text).expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        Snapshot::build("node-a", &parsed.objects)
    }

    fn addrs(backends: &[Backend]) -> Vec<String> {
        backends
            .iter()
            .filter(|b| b.usable())
            .map(|b| b.addr.to_string())
            .collect()
    }

    /// The route entries on `service` port 80 for clients in `shop`.
    fn route_entries<'a>(snap: &'a Snapshot, service: &str) -> &'a [crate::routes::Entry] {
        snap.routes
            .port(service, 80)
            .and_then(|p| p.for_client("shop"))
            .unwrap_or_else(|| panic!("routes on {service}: {:?}", snap.routes.status))
    }

    fn route_status<'a>(
        snap: &'a Snapshot,
        kind: &str,
        name: &str,
    ) -> &'a crate::routes::table::RouteStatus {
        snap.routes
            .status
            .iter()
            .find(|s| s.kind == kind && s.name == name)
            .unwrap_or_else(|| panic!("{kind} {name}: {:?}", snap.routes.status))
    }

    #[test]
    fn service_entries_are_services_named_by_their_hosts() {
        let snap = snapshot(
            "apiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\nmetadata: {name: payments, namespace: shop}\n\
             spec: {hosts: [api.payments.example, pay.example], addresses: [192.0.2.10, 192.0.2.10], resolution: STATIC, \
             ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}, {number: 443, name: tls, protocol: TLS}], \
             endpoints: [{address: 198.51.100.1}, {address: 10.1.2.11, ports: {http: 9090}}]}\n\
             ---\napiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\nmetadata: {name: pods, namespace: shop}\n\
             spec: {hosts: [web.internal], addresses: [10.96.50.1], location: MESH_INTERNAL, resolution: STATIC, \
             ports: [{number: 80, name: http}], workloadSelector: {labels: {app: web, version: v2}}}\n\
             ---\napiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\nmetadata: {name: direct, namespace: shop}\n\
             spec: {hosts: [direct.example], addresses: [192.0.2.30, 192.0.2.31], \
             ports: [{number: 443, name: tls, protocol: TLS}]}\n\
             ---\napiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\nmetadata: {name: web, namespace: shop}\n\
             spec: {hosts: [web.example], addresses: [192.0.2.20], resolution: STATIC, \
             ports: [{number: 80, name: http}], endpoints: [{address: 198.51.100.9}]}\n",
        );
        let (svc, port) = snap
            .service_for("192.0.2.10:80".parse().expect("addr"))
            .expect("the entry's address is a VIP");
        assert_eq!(svc.id(), "shop/payments");
        assert_eq!(svc.vips, ["192.0.2.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(port.app_protocol.as_deref(), Some("http"));
        assert_eq!(svc.host(), "api.payments.example");
        assert_eq!(
            addrs(&svc.backends[&80]),
            ["198.51.100.1:8080", "10.1.2.11:9090"]
        );
        assert_eq!(
            addrs(&svc.backends[&443]),
            ["198.51.100.1:443", "10.1.2.11:443"]
        );
        // An endpoint that is a meshed pod is known as that pod.
        assert_eq!(
            svc.backends[&80][1].workload.as_deref(),
            Some("shop/api-b1")
        );
        assert_eq!(svc.backends[&80][0].workload, None);
        assert_eq!(
            snap.entry_for_host("pay.example").map(ServiceView::id),
            Some("shop/payments".into())
        );
        // A selector chooses pods of the entry's namespace, on any node.
        let pods = snap.service("shop/pods").expect("pods entry");
        assert_eq!(addrs(&pods.backends[&80]), ["10.1.1.13:80"]);
        assert_eq!(
            pods.entry.as_ref().map(|e| e.location),
            Some(Location::MeshInternal)
        );
        // Pass-through (NONE): each call to the address it dialled.
        let direct = snap.service("shop/direct").expect("direct");
        for dialled in ["192.0.2.30", "192.0.2.31"] {
            let ip: IpAddr = dialled.parse().expect("ip");
            assert_eq!(
                direct.backends_for(443, ip),
                [SocketAddr::new(ip, 443)],
                "{dialled}"
            );
        }
        // A STATIC entry's calls are balanced over its endpoints.
        assert_eq!(
            svc.backends_for(80, "192.0.2.10".parse().expect("ip"))
                .len(),
            2
        );
        // A Service keeps its name: the entry of that name is left out.
        assert_eq!(snap.service("shop/web").expect("web").entry, None);
        assert!(
            snap.service_for("192.0.2.20:80".parse().expect("addr"))
                .is_none()
        );
        assert!(snap.entry_for_host("web.example").is_none());
        // A Service is named by its cluster DNS name.
        assert_eq!(
            snap.service("shop/api").expect("api").host(),
            "api.shop.svc.cluster.local"
        );
    }

    #[test]
    fn routes_and_traffic_policies_attach_to_service_entries() {
        let entry = |name: &str, vip: &str, ip: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{hosts: [{name}.example], addresses: [{vip}], resolution: STATIC, \
                 ports: [{{number: 80, name: http, protocol: HTTP}}], endpoints: [{{address: {ip}}}]}}\n---\n"
            )
        };
        let snap = snapshot(&format!(
            "{}{}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: pay, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: payments, port: 80}}], rules: [\
             {{matches: [{{path: {{type: PathPrefix, value: /v2}}}}], backendRefs: [{{group: trellis.dev, kind: ServiceEntry, name: payments-v2, port: 80}}]}}, \
             {{backendRefs: [{{group: trellis.dev, kind: ServiceEntry, name: payments, port: 80}}, {{name: payments, port: 80}}]}}]}}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: wrong-kind, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: '', kind: Service, name: payments}}], rules: [{{backendRefs: [{{name: web, port: 80}}]}}]}}\n\
             ---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t, namespace: shop}}\n\
             spec: {{targetRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: payments}}], retry: {{attempts: 2}}}}\n\
             ---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: wrong-kinds, namespace: shop}}\n\
             spec: {{targetRefs: [{{kind: Service, name: payments-v2}}, {{group: trellis.dev, kind: ServiceEntry, name: web}}], retry: {{attempts: 1}}}}\n",
            entry("payments", "192.0.2.10", "198.51.100.1"),
            entry("payments-v2", "192.0.2.11", "198.51.100.2"),
        ));
        let entries = route_entries(&snap, "shop/payments");
        let backends = |i: usize| -> Vec<String> {
            entries[i]
                .rule
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.service, b.port))
                .collect()
        };
        assert_eq!(backends(0), ["shop/payments-v2:80"]);
        // A Service reference does not name an entry of that name.
        assert_eq!(backends(1), ["shop/payments:80"]);
        assert!(entries[1].rule.unresolved_weight > 0);
        let wrong = route_status(&snap, "HTTPRoute", "wrong-kind");
        assert!(!wrong.healthy(), "{wrong:?}");
        assert!(snap.traffic.contains_key("shop/payments"));
        // A target names a service of its own kind only.
        assert!(!snap.traffic.contains_key("shop/payments-v2"));
        assert!(!snap.traffic.contains_key("shop/web"));
    }

    #[test]
    fn a_grpc_route_wins_the_port_and_the_http_route_says_conflicted() {
        let snap = snapshot(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: h, namespace: shop}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: web, port: 80}], rules: [{backendRefs: [{name: web-v1, port: 80}]}]}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: web}], rules: [\
             {matches: [{method: {service: shop.Cart, method: Add}}], backendRefs: [{name: web-v2, port: 80}]}, \
             {matches: [{method: {service: shop.Cart}}, {method: {type: RegularExpression, method: 'Get.*'}}], backendRefs: [{name: web-v1, port: 80}]}]}\n",
        );
        let h = route_status(&snap, "HTTPRoute", "h");
        let accepted = h
            .conditions
            .iter()
            .find(|c| c.kind == "Accepted")
            .expect("Accepted");
        assert!(!accepted.status);
        assert_eq!(accepted.reason, "Conflicted");
        assert!(
            accepted.message.contains("shop/web:80"),
            "{}",
            accepted.message
        );
        assert!(route_status(&snap, "GRPCRoute", "g").healthy());

        let entries = route_entries(&snap, "shop/web");
        let pick = |path: &str| {
            let headers = http::HeaderMap::new();
            let view = crate::routes::RequestView {
                method: &http::Method::POST,
                path,
                query: None,
                headers: &headers,
            };
            crate::routes::route(entries, &view).map(|e| e.rule.backends[0].service.clone())
        };
        // The exact method first, then the service's other methods, then
        // any service's Get*; the HTTPRoute's catch-all is gone.
        assert_eq!(pick("/shop.Cart/Add").as_deref(), Some("shop/web-v2"));
        assert_eq!(pick("/shop.Cart/Remove").as_deref(), Some("shop/web-v1"));
        assert_eq!(pick("/other.Svc/GetThing").as_deref(), Some("shop/web-v1"));
        assert_eq!(pick("/other.Svc/Put"), None);
        assert_eq!(pick("/"), None);
    }

    #[test]
    fn cross_namespace_backends_need_a_reference_grant() {
        let route = "apiVersion: v1\nkind: Service\nmetadata: {name: api2, namespace: other}\n\
             spec: {clusterIP: 10.96.0.99, selector: {app: api2}, ports: [{name: http, port: 80, targetPort: 8080}]}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: x, namespace: shop}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: web, port: 80}], rules: [{backendRefs: [{name: api2, namespace: other, port: 80}]}]}\n";
        let resolved = |snap: &Snapshot| {
            let status = route_status(snap, "HTTPRoute", "x");
            let c = status
                .conditions
                .iter()
                .find(|c| c.kind == "ResolvedRefs")
                .expect("ResolvedRefs");
            (c.status, c.reason)
        };
        assert_eq!(resolved(&snapshot(route)), (false, "RefNotPermitted"));
        let grant = |from_ns: &str, name: &str| {
            format!(
                "{route}---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
                 metadata: {{name: g, namespace: other}}\n\
                 spec: {{from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {from_ns}}}], \
                 to: [{{group: '', kind: Service{name}}}]}}\n"
            )
        };
        let snap = snapshot(&grant("shop", ""));
        assert_eq!(resolved(&snap), (true, "ResolvedRefs"));
        let entries = route_entries(&snap, "shop/web");
        assert_eq!(entries[0].rule.backends[0].service, "other/api2");
        assert_eq!(
            resolved(&snapshot(&grant("dev", ""))),
            (false, "RefNotPermitted")
        );
        assert_eq!(
            resolved(&snapshot(&grant("shop", ", name: api2"))),
            (true, "ResolvedRefs")
        );
        assert_eq!(
            resolved(&snapshot(&grant("shop", ", name: api3"))),
            (false, "RefNotPermitted")
        );
    }

    #[test]
    fn redirect_rewrite_and_mirror_filters_compile() {
        let snap = snapshot(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: h, namespace: shop}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: web, port: 80}], rules: [\
             {matches: [{path: {type: PathPrefix, value: /old}}], filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]}, \
             {matches: [{path: {type: PathPrefix, value: /api/v1}}], filters: [{type: URLRewrite, urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}, \
             {type: RequestMirror, requestMirror: {backendRef: {name: web-v2, port: 80}, percent: 25}}], backendRefs: [{name: web-v1, port: 80}]}]}\n",
        );
        assert!(
            route_status(&snap, "HTTPRoute", "h").healthy(),
            "{:?}",
            snap.routes.status
        );
        let entries = route_entries(&snap, "shop/web");
        let redirect = entries
            .iter()
            .find_map(|e| e.rule.redirect.as_ref().map(|r| (e, r)))
            .expect("redirect");
        assert_eq!(redirect.1.status, 301);
        let edit = redirect.1.path.as_ref().expect("path edit");
        assert_eq!(edit.apply(&redirect.0.request.path, "/old/a/b"), "/new/a/b");
        assert_eq!(edit.apply(&redirect.0.request.path, "/old"), "/new");
        let (entry, rewrite) = entries
            .iter()
            .find_map(|e| e.rule.rewrite.as_ref().map(|r| (e, r)))
            .expect("rewrite");
        assert_eq!(rewrite.hostname.as_deref(), Some("api.internal"));
        let edit = rewrite.path.as_ref().expect("path edit");
        assert_eq!(edit.apply(&entry.request.path, "/api/v1/users"), "/users");
        assert_eq!(edit.apply(&entry.request.path, "/api/v1"), "/");
        assert_eq!(entry.rule.mirrors[0].service, "shop/web-v2");
        assert_eq!(entry.rule.mirrors[0].ppm, 250_000);
    }

    #[test]
    fn peer_authentications_set_the_workloads_mtls_modes() {
        let pa = |namespace: &str, name: &str, spec: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\n\
                 metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
            )
        };
        let mode = |snap: &Snapshot, name: &str| {
            let w = snap
                .workloads
                .iter()
                .find(|w| w.name == name)
                .unwrap_or_else(|| panic!("{name}"));
            (w.mtls, w.mtls_ports.clone())
        };
        // Mesh-wide STRICT from the root namespace; another namespace's
        // policy without a selector is that namespace's only.
        let snap = snapshot(&format!(
            "{}{}",
            pa("trellis-system", "default", "{mtls: {mode: STRICT}}"),
            pa("outside", "loose", "{mtls: {mode: PERMISSIVE}}")
        ));
        assert_eq!(mode(&snap, "web-a2"), (MtlsMode::Strict, BTreeMap::new()));
        // The namespace's over the mesh's; a workload's over both, with
        // its ports (the same mode as the pod's is no exception).
        let snap = snapshot(&format!(
            "{}{}{}",
            pa("trellis-system", "default", "{mtls: {mode: STRICT}}"),
            pa("shop", "shop", "{mtls: {mode: PERMISSIVE}}"),
            pa(
                "shop",
                "api",
                "{selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, \
                 portLevelMtls: {'9090': {mode: PERMISSIVE}, '8080': {mode: STRICT}}}"
            )
        ));
        assert_eq!(
            mode(&snap, "web-a2"),
            (MtlsMode::Permissive, BTreeMap::new())
        );
        assert_eq!(
            mode(&snap, "api-b1"),
            (
                MtlsMode::Strict,
                BTreeMap::from([(9090, MtlsMode::Permissive)])
            )
        );
        // In another root namespace, the same policy is that namespace's.
        let parsed = parse_file(
            Path::new("mesh.yaml"),
            &format!(
                "{MESH}\n---\n{}",
                pa("trellis-system", "default", "{mtls: {mode: STRICT}}")
            ),
        )
        .expect("yaml");
        let snap =
            Snapshot::build_for("node-a", "mesh-root", &parsed.objects, &mut Memo::default());
        assert_eq!(
            mode(&snap, "web-a2"),
            (MtlsMode::Permissive, BTreeMap::new())
        );
    }

    #[test]
    fn custom_policies_ask_the_mesh_configurations_providers() {
        let mesh = |namespace: &str, port: u16| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-mesh, namespace: {namespace}}}\n\
                 data:\n  mesh: |\n    extensionProviders:\n    - name: ext\n      envoyExtAuthzHttp:\n\
                 \x20       service: authz.auth.svc.cluster.local\n        port: {port}\n\
                 \x20   - name: opa\n      envoyExtAuthzGrpc: {{service: opa/opa, port: 9191}}\n"
            )
        };
        let policies = "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: ext, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, action: CUSTOM, provider: {name: ext}, \
             rules: [{to: [{operation: {ports: ['8080'], paths: [/admin*]}}]}]}\n---\n\
             apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: gone, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, action: CUSTOM, provider: {name: gone}, \
             rules: [{to: [{operation: {ports: ['8080'], paths: [/gone*]}}]}]}\n---\n\
             apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: tcp, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, action: CUSTOM, provider: {name: opa}, \
             rules: [{to: [{operation: {ports: ['9000']}}]}]}\n";
        // Another namespace's copy, and other ConfigMaps, are not read.
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: shop}\ndata: {mesh: 'nonsense: ['}\n";
        let snap = snapshot(&format!(
            "{}---\n{}---\n{policies}---\n{other}",
            mesh("trellis-system", 8000),
            mesh("zzz", 9)
        ));
        let ext = &snap.providers["ext"];
        assert_eq!(ext.service, Some(("auth/authz".into(), 8000)));
        let client = crate::identity::Identity::new("cluster.local", "shop", "client");
        let source = crate::policy::authz::Caller::new(&client, "10.1.0.5".parse().unwrap());
        let web: SocketAddr = "10.1.1.12:8080".parse().unwrap();
        let admit = |path: &str| {
            let mut req = http::Request::get(path).body(()).unwrap();
            crate::policy::authz::admit(&snap, source, web, &mut req)
        };
        // A connection is read as HTTP for the provider. One that is not
        // HTTP is put to a gRPC provider (Envoy's network check); an HTTP
        // provider cannot judge it, nor can one the configuration lacks,
        // so it is refused (fail closed).
        use crate::policy::authz::{Refusal, Verdict, admit_opaque, authorize};
        assert_eq!(authorize(&snap, source, web), Verdict::Inspect);
        let tcp = SocketAddr::new(web.ip(), 9000);
        let asks = admit_opaque(&snap, source, tcp).expect("admitted");
        assert_eq!(
            asks.iter()
                .map(|a| (a.policy.as_str(), a.provider.as_str()))
                .collect::<Vec<_>>(),
            [("shop/tcp", "opa")]
        );
        assert!(
            matches!(
                admit_opaque(&snap, source, web),
                Err(Refusal::Denied { ref policy, reason }) if policy == "shop/ext" && reason.contains("envoyExtAuthzHttp")
            ),
            "{:?}",
            admit_opaque(&snap, source, web)
        );
        assert!(
            admit_opaque(&snap, source, SocketAddr::new(web.ip(), 7000))
                .expect("admitted")
                .is_empty()
        );
        let asks = admit("/admin/1").expect("admitted");
        assert_eq!(asks.len(), 1);
        assert_eq!(
            (asks[0].policy.as_str(), asks[0].provider.as_str()),
            ("shop/ext", "ext")
        );
        assert!(admit("/").expect("admitted").is_empty());
        assert!(
            matches!(
                admit("/gone/1"),
                Err(crate::policy::authz::Refusal::Denied { ref policy, .. }) if policy == "shop/gone"
            ),
            "a provider the mesh configuration lacks denies"
        );

        // A broken configuration is refused, naming the field.
        let parsed = parse_file(
            Path::new("mesh.yaml"),
            &mesh("trellis-system", 0).replace("port: 0", "port: 0\n        failOpen: true"),
        )
        .expect("yaml");
        let (_, error) = &parsed.rejected[0];
        assert_eq!(error.object, "ConfigMap trellis-system/trellis-mesh");
        assert!(
            error
                .field
                .starts_with("data.mesh.extensionProviders[0].envoyExtAuthzHttp"),
            "{error}"
        );
    }

    #[test]
    fn external_auth_compiles_over_http_and_grpc() {
        let route = |name: &str, auth: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{parentRefs: [{{group: '', kind: Service, name: web, port: 80}}], rules: [\
                 {{filters: [{{type: ExternalAuth, externalAuth: {auth}}}], backendRefs: [{{name: web-v1, port: 80}}]}}]}}\n"
            )
        };
        let snap = snapshot(&format!(
            "{}---\n{}---\n{}---\n{}",
            route(
                "http",
                "{protocol: HTTP, backendRef: {name: web-v2, port: 80}, http: {path: /auth/, allowedHeaders: [X-User], allowedResponseHeaders: [X-Id]}}"
            ),
            route(
                "grpc",
                "{protocol: GRPC, backendRef: {name: web-v2, port: 80}, grpc: {allowedHeaders: [X-Grpc]}}"
            ),
            route(
                "body",
                "{protocol: HTTP, backendRef: {name: web-v2, port: 80}, http: {}, forwardBody: {maxSize: 1024}}"
            ),
            route(
                "gone",
                "{protocol: HTTP, backendRef: {name: gone, port: 80}, http: {}}"
            ),
        ));
        let condition = |name: &str, kind: &str| {
            route_status(&snap, "HTTPRoute", name)
                .conditions
                .iter()
                .find(|c| c.kind == kind)
                .map(|c| (c.status, c.reason, c.message.clone()))
                .expect(kind)
        };
        for name in ["http", "grpc", "body"] {
            assert!(condition(name, "Accepted").0, "{name}");
        }
        assert!(!condition("gone", "ResolvedRefs").0);
        let entries = route_entries(&snap, "shop/web");
        let auths: Vec<_> = entries
            .iter()
            .filter_map(|e| e.rule.external_auth.clone())
            .collect();
        assert_eq!(auths.len(), 4, "{auths:?}");
        let grpc = auths
            .iter()
            .find(|a| a.protocol == AuthProtocol::Grpc)
            .expect("the gRPC one");
        assert_eq!(grpc.allowed_headers, ["x-grpc"]);
        assert!(auths.iter().any(|a| a.forward_body == 1024), "{auths:?}");
        let http = auths
            .iter()
            .find(|a| {
                a.service.is_some() && a.forward_body == 0 && a.protocol == AuthProtocol::Http
            })
            .expect("the resolved one");
        assert_eq!(http.service, Some(("shop/web-v2".to_owned(), 80)));
        assert_eq!(http.path_prefix, "/auth");
        assert_eq!(http.allowed_headers, ["x-user"]);
        assert_eq!(http.allowed_response_headers, ["x-id"]);
        assert!(auths.iter().any(|a| a.service.is_none()), "fails closed");
    }

    #[test]
    fn the_route_example_in_docs_l7_is_accepted_as_written() {
        let doc = include_str!("../../../docs/l7.md");
        let start = doc
            .find("    apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    metadata: {name: api,")
            .expect("the example in docs/l7.md");
        let example: Vec<&str> = doc[start..]
            .lines()
            .take_while(|l| l.starts_with("    "))
            .map(|l| &l[4..])
            .collect();
        let services = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.98, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: authz, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.97, selector: {app: authz}, ports: [{name: http, port: 8080}]}\n";
        let snap = snapshot(&format!("{services}---\n{}\n", example.join("\n")));
        assert!(
            route_status(&snap, "HTTPRoute", "api").healthy(),
            "{:?}",
            snap.routes.status
        );
        let entries = route_entries(&snap, "shop/api");
        let rule = &entries[0].rule;
        assert!(rule.cors.is_some() && rule.session.is_some() && rule.retry.is_some());
        assert_eq!(
            rule.external_auth.as_ref().and_then(|a| a.service.clone()),
            Some(("shop/authz".to_owned(), 8080))
        );
    }

    #[test]
    fn workloads_by_address() {
        let snap = snapshot("");
        for w in &snap.workloads {
            for ip in &w.ips {
                let found = snap.workload_by_ip(*ip).expect("indexed");
                assert!(found.ips.contains(ip), "{ip} → {}", found.id());
            }
        }
        assert!(snap.workload_by_ip("192.0.2.99".parse().unwrap()).is_none());
        assert!(!snap.workloads.is_empty());
    }

    #[test]
    fn node_and_membership() {
        let s = snapshot("");
        let node = s.node.as_ref().expect("node-a");
        assert_eq!(
            node.internal_ip(false),
            Some("10.255.0.1".parse().expect("ip"))
        );
        let meshed: Vec<String> = s
            .local_workloads("node-a")
            .filter(|w| w.meshed)
            .map(Workload::id)
            .collect();
        assert_eq!(meshed, ["shop/client", "shop/web-a2", "shop/web-a3"]);
        let stranger = s
            .workloads
            .iter()
            .find(|w| w.name == "stranger")
            .expect("stranger");
        assert!(!stranger.meshed, "its namespace is not in the mesh");
    }

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let s = snapshot("");
        let (svc, port) = s
            .service_for("10.96.0.10:80".parse().expect("addr"))
            .expect("web");
        assert_eq!(svc.id(), "shop/web");
        assert_eq!(
            addrs(&svc.backends[&port.port]),
            ["10.1.1.12:8080", "10.1.1.13:8080"]
        );
    }

    #[test]
    fn a_target_port_name_means_the_container_port_of_the_services_protocol() {
        // web's pods name TCP 8080 `http`: a UDP port finds no such port.
        let s = snapshot(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web-udp, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.77, selector: {app: web}, \
             ports: [{name: u, port: 80, protocol: UDP, targetPort: http}]}",
        );
        let (svc, port) = s
            .service_for("10.96.0.77:80".parse().expect("addr"))
            .expect("web-udp");
        assert_eq!(svc.id(), "shop/web-udp");
        assert!(addrs(svc.backends.get(&port.port).map_or(&[][..], Vec::as_slice)).is_empty());
    }

    #[test]
    fn opt_out_unready_and_terminating() {
        let s = snapshot(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-a4, namespace: shop, labels: {app: web, trellis.dev/mesh: disabled}, deletionTimestamp: '2026-01-01T00:00:00Z'}\n\
             spec: {nodeName: node-a, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.1.1.14}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web-a5, namespace: shop, labels: {app: web}}\n\
             spec: {nodeName: node-a, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}\n\
             status: {podIP: 10.1.1.15, conditions: [{type: Ready, status: 'False'}]}",
        );
        let a4 = s.workloads.iter().find(|w| w.name == "web-a4").expect("a4");
        assert!(!a4.meshed && a4.terminating);
        let (svc, _) = s
            .service_for("10.96.0.10:80".parse().expect("addr"))
            .expect("web");
        assert_eq!(svc.backends[&80].len(), 4, "all listed");
        assert_eq!(
            addrs(&svc.backends[&80]),
            ["10.1.1.12:8080", "10.1.1.13:8080"],
            "only usable ones take connections"
        );
    }

    #[test]
    fn a_service_publishing_not_ready_addresses_takes_them() {
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-a4, namespace: shop, labels: {app: web}, deletionTimestamp: '2026-01-01T00:00:00Z'}\n\
             spec: {nodeName: node-a, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.1.1.14}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web-a5, namespace: shop, labels: {app: web}}\n\
             spec: {nodeName: node-a, containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]}\n\
             status: {podIP: 10.1.1.15, conditions: [{type: Ready, status: 'False'}]}";
        let usable = |publish: bool| {
            let s = snapshot(&format!(
                "{pods}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: peers, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.0.40, publishNotReadyAddresses: {publish}, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}"
            ));
            let (svc, port) = s
                .service_for("10.96.0.40:80".parse().expect("addr"))
                .expect("peers");
            let mut all = svc.ready_backends(port.port, false);
            all.sort();
            all.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(
            usable(false),
            ["10.1.1.12:8080", "10.1.1.13:8080"],
            "ready pods only"
        );
        assert_eq!(
            usable(true),
            [
                "10.1.1.12:8080",
                "10.1.1.13:8080",
                "10.1.1.14:8080",
                "10.1.1.15:8080"
            ],
            "the unready and the terminating pods too, as their EndpointSlice would say"
        );
    }

    #[test]
    fn external_and_load_balancer_addresses_are_the_services_too() {
        let service = |status: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.0.30, externalIPs: [203.0.113.10], selector: {{app: web}}, ports: [{{port: 80}}]}}\n\
                 status: {{loadBalancer: {{ingress: [{status}]}}}}\n"
            )
        };
        let parsed = parse_file(
            Path::new("svc.yaml"),
            &service("{ip: 198.51.100.7}, {ip: 198.51.100.8, ipMode: Proxy}, {hostname: lb.example.com}, {ip: '2001:db8::7', ipMode: VIP}"),
        )
        .expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let snap = Snapshot::build("node-a", &parsed.objects);
        let vips: Vec<String> = snap
            .service("shop/web")
            .expect("web")
            .vips
            .iter()
            .map(ToString::to_string)
            .collect();
        // Not the proxying balancer, which must see its traffic itself.
        assert_eq!(
            vips,
            ["10.96.0.30", "198.51.100.7", "203.0.113.10", "2001:db8::7"]
        );
        assert!(
            snap.service_for("198.51.100.7:80".parse().expect("addr"))
                .is_some()
        );
        let parsed =
            parse_file(Path::new("svc.yaml"), &service("{ip: 198.51.100.300}")).expect("yaml");
        assert_eq!(
            parsed.rejected.first().map(|(_, e)| e.field.as_str()),
            Some("status.loadBalancer.ingress[0].ip")
        );
    }

    #[test]
    fn session_affinity_is_read_and_checked_as_the_api_server_does() {
        let service = |spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.0.30, {spec}selector: {{app: web}}, ports: [{{port: 80}}]}}\n"
            )
        };
        let affinity = |spec: &str| {
            let parsed = parse_file(Path::new("svc.yaml"), &service(spec)).expect("yaml");
            if let Some((_, e)) = parsed.rejected.first() {
                return Err((e.field.clone(), e.reason.clone()));
            }
            let snap = Snapshot::build("node-a", &parsed.objects);
            Ok(snap.service("shop/web").expect("web").client_ip_affinity)
        };
        let secs = |s| Ok(Some(Duration::from_secs(s)));
        assert_eq!(affinity(""), Ok(None));
        assert_eq!(affinity("sessionAffinity: None, "), Ok(None));
        assert_eq!(affinity("sessionAffinity: ClientIP, "), secs(10_800));
        assert_eq!(
            affinity(
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, "
            ),
            secs(60)
        );
        let field = |spec: &str| affinity(spec).map_err(|(field, _)| field);
        assert_eq!(
            field("sessionAffinity: Cookie, "),
            Err("spec.sessionAffinity".into())
        );
        for bad in [
            "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ",
            "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ",
            "sessionAffinity: None, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ",
            "sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ",
        ] {
            assert_eq!(
                field(bad),
                Err("spec.sessionAffinityConfig.clientIP.timeoutSeconds".into()),
                "{bad}"
            );
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_calls_on_the_node() {
        let local = |slice: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: near, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.0.30, internalTrafficPolicy: Local, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-b9, namespace: shop, labels: {{app: web}}}}\n\
                 spec: {{nodeName: node-b, containers: [{{name: web}}]}}\nstatus: {{podIP: 10.1.2.19}}\n{slice}"
            )
        };
        let backends = |s: &Snapshot| {
            let (svc, _) = s
                .service_for("10.96.0.30:80".parse().expect("addr"))
                .expect("near");
            addrs(&svc.backends[&80])
        };
        // By selector: each node sees its own pods only.
        let parsed = parse_file(
            Path::new("mesh.yaml"),
            &format!("{MESH}\n---\n{}", local("")),
        )
        .expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let on = |node| Snapshot::build(node, &parsed.objects);
        assert_eq!(
            backends(&on("node-a")),
            ["10.1.1.12:8080", "10.1.1.13:8080"]
        );
        assert_eq!(backends(&on("node-b")), ["10.1.2.19:8080"]);
        assert!(
            backends(&on("node-c")).is_empty(),
            "none here: the call fails"
        );
        // By EndpointSlice: the endpoint's nodeName, else its pod's node.
        let slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: near-1, namespace: shop, labels: {kubernetes.io/service-name: near}}\n\
             addressType: IPv4\nports: [{port: 8080}]\n\
             endpoints: [{addresses: [10.1.1.12], nodeName: node-a}, {addresses: [10.1.2.19]}, {addresses: [10.1.9.9], nodeName: node-b}]";
        let parsed = parse_file(
            Path::new("mesh.yaml"),
            &format!("{MESH}\n---\n{}", local(slice)),
        )
        .expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let on = |node| Snapshot::build(node, &parsed.objects);
        assert_eq!(backends(&on("node-a")), ["10.1.1.12:8080"]);
        assert_eq!(backends(&on("node-b")), ["10.1.2.19:8080", "10.1.9.9:8080"]);
        // Without the policy (or with `Cluster`), every endpoint, whichever the node.
        for policy in ["", "internalTrafficPolicy: Cluster, "] {
            let text = local("").replace("internalTrafficPolicy: Local, ", policy);
            let parsed =
                parse_file(Path::new("mesh.yaml"), &format!("{MESH}\n---\n{text}")).expect("yaml");
            assert_eq!(
                backends(&Snapshot::build("node-c", &parsed.objects)),
                ["10.1.1.12:8080", "10.1.1.13:8080", "10.1.2.19:8080"]
            );
        }
    }

    #[test]
    fn topology_hints_pick_endpoints_as_kube_proxy_does() {
        // Three endpoints whose slice carries `hints` as given.
        let cluster = |hints: [&str; 3]| {
            let mut text = String::new();
            for (node, zone) in [("node-x", "z1"), ("node-y", "z2"), ("node-n", "")] {
                let labels = if zone.is_empty() {
                    String::new()
                } else {
                    format!(", labels: {{topology.kubernetes.io/zone: {zone}}}")
                };
                text.push_str(&format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}{labels}}}\n---\n"
                ));
            }
            text.push_str(
                "apiVersion: v1\nkind: Service\nmetadata: {name: hinted, namespace: shop}\n\
                 spec: {clusterIP: 10.96.0.41, ports: [{port: 80}]}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: hinted-1, namespace: shop, labels: {kubernetes.io/service-name: hinted}}\n\
                 addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
            );
            for (i, h) in hints.iter().enumerate() {
                let hints = if h.is_empty() {
                    String::new()
                } else {
                    format!(", hints: {h}")
                };
                text.push_str(&format!("- {{addresses: [10.1.4.{}]{hints}}}\n", 31 + i));
            }
            let parsed = parse_file(Path::new("hints.yaml"), &text).expect("yaml");
            assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
            parsed.objects
        };
        let picks = |objects: &[Object], node: &str| {
            let s = Snapshot::build(node, objects);
            let svc = s.service("shop/hinted").expect("hinted");
            svc.ready_backends(80, false)
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
        };
        let all = ["10.1.4.31", "10.1.4.32", "10.1.4.33"];
        let z1 = "{forZones: [{name: z1}]}";
        let z2 = "{forZones: [{name: z2}]}";
        let zones = cluster([z1, z1, z2]);
        assert_eq!(picks(&zones, "node-x"), ["10.1.4.31", "10.1.4.32"]);
        assert_eq!(picks(&zones, "node-y"), ["10.1.4.33"]);
        assert_eq!(picks(&zones, "node-n"), all, "a node without a zone");
        // An endpoint without hints, or none for the caller's zone: all.
        assert_eq!(picks(&cluster([z1, z1, ""]), "node-x"), all);
        assert_eq!(picks(&cluster([z1, z1, z1]), "node-y"), all);
        // Node hints first (PreferSameNode), when every endpoint has some.
        let nodes = cluster([
            "{forNodes: [{name: node-y}], forZones: [{name: z2}]}",
            "{forNodes: [{name: node-x}], forZones: [{name: z1}]}",
            "{forNodes: [{name: node-x}], forZones: [{name: z1}]}",
        ]);
        assert_eq!(picks(&nodes, "node-y"), ["10.1.4.31"]);
        assert_eq!(picks(&nodes, "node-x"), ["10.1.4.32", "10.1.4.33"]);
        assert_eq!(picks(&nodes, "node-n"), all);
        let no_node = cluster([
            "{forNodes: [{name: node-y}], forZones: [{name: z2}]}",
            "{forZones: [{name: z1}]}",
            "{forZones: [{name: z1}]}",
        ]);
        assert_eq!(picks(&no_node, "node-x"), ["10.1.4.32", "10.1.4.33"]);
        // No hints at all: no preference.
        assert_eq!(picks(&cluster(["", "", ""]), "node-x"), all);
    }

    #[test]
    fn traffic_distribution_prefers_the_callers_zone_or_node_while_any_is_usable() {
        let cluster = |distribution: &str, ready_z: bool| {
            let mut text = String::new();
            for (node, zone) in [("node-x", "z1"), ("node-y", "z1"), ("node-z", "z2")] {
                text.push_str(&format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n---\n"
                ));
            }
            for (pod, node, ip) in [
                ("p-x", "node-x", 21),
                ("p-y", "node-y", 22),
                ("p-z", "node-z", 23),
            ] {
                let ready = if pod == "p-z" && !ready_z {
                    "False"
                } else {
                    "True"
                };
                text.push_str(&format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: shop, labels: {{app: spread}}}}\n\
                     spec: {{nodeName: {node}, containers: [{{name: c}}]}}\n\
                     status: {{podIP: 10.1.3.{ip}, conditions: [{{type: Ready, status: '{ready}'}}]}}\n---\n"
                ));
            }
            text.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: spread, namespace: shop}}\n\
                 spec: {{clusterIP: 10.96.0.40, {distribution}selector: {{app: spread}}, ports: [{{port: 80}}]}}\n"
            ));
            let parsed =
                parse_file(Path::new("mesh.yaml"), &format!("{MESH}\n---\n{text}")).expect("yaml");
            assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
            parsed.objects
        };
        let picks = |objects: &[Object], node: &str| {
            let s = Snapshot::build(node, objects);
            let (svc, port) = s
                .service_for("10.96.0.40:80".parse().expect("addr"))
                .expect("spread");
            svc.ready_backends(port.port, false)
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
        };
        let all = ["10.1.3.21", "10.1.3.22", "10.1.3.23"];
        for name in ["PreferSameZone", "PreferClose"] {
            let objects = cluster(&format!("trafficDistribution: {name}, "), true);
            assert_eq!(
                picks(&objects, "node-x"),
                ["10.1.3.21", "10.1.3.22"],
                "{name}"
            );
            assert_eq!(picks(&objects, "node-z"), ["10.1.3.23"], "{name}");
            assert_eq!(
                picks(&objects, "node-a"),
                all,
                "{name}: a node without a zone"
            );
            // Nothing usable in the caller's zone: anywhere else.
            let objects = cluster(&format!("trafficDistribution: {name}, "), false);
            assert_eq!(
                picks(&objects, "node-z"),
                ["10.1.3.21", "10.1.3.22"],
                "{name}"
            );
        }
        let objects = cluster("trafficDistribution: PreferSameNode, ", true);
        assert_eq!(picks(&objects, "node-y"), ["10.1.3.22"]);
        assert_eq!(picks(&objects, "node-a"), all, "no endpoint on the node");
        let objects = cluster("", true);
        assert_eq!(picks(&objects, "node-x"), all, "no preference");
        // From an EndpointSlice: the endpoint's own zone, else its node's.
        let mut objects = cluster("trafficDistribution: PreferSameZone, ", true);
        objects.extend(
            parse_file(
                Path::new("slice.yaml"),
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: spread-1, namespace: shop, labels: {kubernetes.io/service-name: spread}}\n\
                 addressType: IPv4\nports: [{port: 80}]\n\
                 endpoints: [{addresses: [10.1.3.21], nodeName: node-x, zone: z2}, {addresses: [10.1.3.22]}, {addresses: [10.1.3.23], nodeName: node-z}]",
            )
            .expect("yaml")
            .objects,
        );
        assert_eq!(picks(&objects, "node-z"), ["10.1.3.21", "10.1.3.23"]);
        assert_eq!(picks(&objects, "node-y"), ["10.1.3.22"]);
    }

    /// A finished pod keeps `status.podIP` while the kubelet has released
    /// the address, which the next pod on the node may get: the finished
    /// one must not claim it, even listed first, nor be a backend.
    #[test]
    fn finished_pods_claim_no_address() {
        let finished = "apiVersion: v1\nkind: Pod\nmetadata: {name: job-1, namespace: shop, labels: {app: web}}\n\
             spec: {nodeName: node-a, serviceAccountName: batch, containers: [{name: job}]}\n\
             status: {phase: Succeeded, podIP: 10.1.1.12}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: job-2, namespace: shop, labels: {app: web}}\n\
             spec: {nodeName: node-a, containers: [{name: job}]}\n\
             status: {phase: Failed, podIP: 10.1.1.13}\n---\n";
        let parsed =
            parse_file(Path::new("mesh.yaml"), &format!("{finished}{MESH}")).expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let s = Snapshot::build("node-a", &parsed.objects);
        assert!(s.workloads.iter().all(|w| !w.name.starts_with("job-")));
        let owner = |ip: &str| {
            s.workload_by_ip(ip.parse().expect("ip"))
                .map(|w| w.name.as_str())
        };
        assert_eq!(owner("10.1.1.12"), Some("web-a2"));
        assert_eq!(owner("10.1.1.13"), Some("web-a3"));
        let (svc, _) = s
            .service_for("10.96.0.10:80".parse().expect("addr"))
            .expect("web");
        assert_eq!(svc.backends[&80].len(), 2, "{:?}", svc.backends[&80]);
    }

    #[test]
    fn lookups_find_what_a_scan_in_order_finds() {
        // A second Service on web's VIP: its own port is found, the port they
        // share goes to the first (as a scan would find it).
        let s = snapshot(
            "apiVersion: v1\nkind: Service\nmetadata: {name: alias, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.10, selector: {app: api}, ports: [{port: 80}, {port: 81}]}",
        );
        let at = |vip: &str| {
            s.service_for(vip.parse().expect("addr"))
                .map(|(s, p)| (s.id(), p.port))
        };
        assert_eq!(at("10.96.0.10:80"), Some(("shop/web".into(), 80)));
        assert_eq!(at("10.96.0.10:81"), Some(("shop/alias".into(), 81)));
        assert_eq!(at("10.96.0.10:82"), None);
        for svc in &s.services {
            for vip in &svc.vips {
                for port in &svc.ports {
                    let addr = SocketAddr::new(*vip, port.port);
                    let scan = s.services.iter().find_map(|x| {
                        let p = x.ports.iter().find(|p| p.port == port.port)?;
                        x.vips.contains(vip).then(|| (x.id(), p.port))
                    });
                    assert_eq!(at(&addr.to_string()), scan, "{addr}");
                }
            }
            assert_eq!(s.service(&svc.id()).map(ServiceView::id), Some(svc.id()));
        }
        assert!(s.service("shop").is_none() && s.service("shop/nothing").is_none());
        for w in &s.workloads {
            let found = s.workload(&w.id()).expect("by name");
            assert_eq!(found.id(), w.id());
            for ip in &w.ips {
                let first = s.workloads.iter().find(|x| x.ips.contains(ip));
                assert_eq!(
                    s.workload_by_ip(*ip).map(Workload::id),
                    first.map(|w| w.id())
                );
            }
        }
        assert!(s.workload("shop/nothing").is_none());
    }

    #[test]
    fn policies_are_found_by_namespace_in_their_order() {
        let policy = |ns: &str, name: &str| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: {name}, namespace: {ns}}}\nspec: {{action: DENY}}\n---\n"
            )
        };
        let s = snapshot(&format!(
            "{}{}{}",
            policy("shop", "z"),
            policy("bank", "b"),
            policy("shop", "a")
        ));
        let names = |ns: &str| -> Vec<String> {
            s.policies_in(ns).iter().map(|p| p.name.clone()).collect()
        };
        assert_eq!(names("shop"), ["z", "a"]);
        assert_eq!(names("bank"), ["b"]);
        assert!(names("nowhere").is_empty());
        assert_eq!(s.policies.len(), 3);
    }

    #[test]
    fn endpoint_slices_override_selectors() {
        let s = snapshot(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{name: http, port: 8080}]\n\
             endpoints: [{addresses: [10.1.1.12], conditions: {ready: true}}, {addresses: [10.1.1.13], conditions: {ready: false, serving: true, terminating: true}}]",
        );
        let (svc, _) = s
            .service_for("10.96.0.10:80".parse().expect("addr"))
            .expect("web");
        assert_eq!(addrs(&svc.backends[&80]), ["10.1.1.12:8080"]);
        assert_eq!(
            svc.backends[&80][0].workload.as_deref(),
            Some("shop/web-a2")
        );
    }

    #[test]
    fn terminating_endpoints_still_serving_take_calls_only_when_nothing_else_can() {
        let slice = |endpoints: &str| {
            let s = snapshot(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{endpoints}]"
            ));
            let (svc, port) = s
                .service_for("10.96.0.10:80".parse().expect("addr"))
                .expect("web");
            svc.ready_backends(port.port, false)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        let draining = "{addresses: [10.1.1.13], conditions: {ready: false, serving: true, terminating: true}}";
        let gone = "{addresses: [10.1.1.11], conditions: {ready: false, serving: false, terminating: true}}";
        let unready = "{addresses: [10.1.1.19], conditions: {ready: false}}";
        assert_eq!(
            slice(&format!("{{addresses: [10.1.1.12]}}, {draining}, {gone}")),
            ["10.1.1.12:8080"],
            "a ready endpoint: only it"
        );
        assert_eq!(
            slice(&format!("{draining}, {gone}, {unready}")),
            ["10.1.1.13:8080"],
            "none ready: the one still serving, not the stopped one nor an unready one"
        );
        assert!(slice(&format!("{gone}, {unready}")).is_empty());
    }
}
