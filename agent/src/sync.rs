//! Keeps the kernel maps in step with the state: the capture address, the
//! node's endpoints (by netns cookie and by interface), the services' VIPs,
//! the ipcache (pods, nodes, policy CIDRs) and the compiled network policy.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;
use tracing::{debug, info, warn};
use trellis_common::{
    DatapathConfig, EndpointInfo, EndpointKey, IpInfo, IpPort, PodIface, ServiceInfo, config_flags,
    endpoint_flags, identity, ip_flags, ipv4_mapped,
};

use crate::{
    bpf::{
        BpfError,
        pod_hooks::PodHooks,
        tables::{Changes, Desired, Tables},
    },
    config::Acceleration,
    netns,
    policy::{
        compiler::{self, Compiled, Endpoints, Identities},
        providers::OutboundMode,
    },
    state::{Snapshot, model::MtlsMode},
};

/// Where pods' captured connections arrive, on the node's InternalIP.
pub const CAPTURE_PORT: u16 = 15001;

/// A local pod as the kernel knows it.
#[derive(Clone, Debug, Serialize)]
pub struct LocalEndpoint {
    pub workload: String,
    pub endpoint_id: u32,
    pub identity: u32,
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub meshed: bool,
    pub mtls: MtlsMode,
    /// Ports with the other mode (PeerAuthentication `portLevelMtls`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub mtls_ports: BTreeMap<u16, MtlsMode>,
    /// The pod programs (policy, STRICT, replies to the agent) are on its interface.
    pub tc_hooked: bool,
    /// Network policies isolate it for ingress / egress.
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
}

/// The compiled policy of the last sync, for `trellis policy` and flows.
#[derive(Debug, Default)]
pub struct PolicyView {
    pub identities: Identities,
    pub compiled: Compiled,
    /// Workload id → endpoint id.
    pub endpoints: BTreeMap<String, u32>,
    pub revision: u32,
}

/// The result of one sync, for logs and the status commands.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncReport {
    pub capture: Vec<String>,
    pub endpoints: Vec<LocalEndpoint>,
    pub services: usize,
    pub ipcache: usize,
    pub policy_entries: usize,
    pub policy_revision: u32,
    /// What this sync wrote, and how long it took from the snapshot to the
    /// last map write (identities, compiling, every map).
    pub changes: Changes,
    pub apply_seconds: f64,
    #[serde(skip)]
    pub policy: Arc<PolicyView>,
}

/// Turns snapshots into map contents.
pub struct Syncer {
    node: String,
    /// [`config_flags`] the agent runs with.
    flags: u32,
    tables: Tables,
    endpoint_ids: BTreeMap<String, u32>,
    service_ids: BTreeMap<String, u32>,
    /// netns path → (inode, cookie): a namespace recreated at the same path is a new inode.
    cookies: HashMap<PathBuf, (u64, u64)>,
    pod_hooks: Option<PodHooks>,
}

impl Syncer {
    pub fn new(node: &str, tables: Tables, accel: Acceleration) -> Self {
        let mut flags = config_flags::CAPTURE;
        if accel.sk_msg {
            flags |= config_flags::SK_MSG;
        }
        if accel.splice {
            flags |= config_flags::SPLICE;
        }
        Self {
            node: node.into(),
            flags,
            tables,
            endpoint_ids: BTreeMap::new(),
            service_ids: BTreeMap::new(),
            cookies: HashMap::new(),
            pod_hooks: None,
        }
    }

    /// Whether the next [`Syncer::apply`] reads the maps back from the
    /// kernel; the state thread then applies even with nothing new.
    pub fn resync_due(&self) -> bool {
        self.tables.resync_due()
    }

    /// Attaches the pod programs to each local pod's interface.
    #[must_use]
    pub fn with_pod_hooks(mut self, hooks: PodHooks) -> Self {
        self.pod_hooks = Some(hooks);
        self
    }

    fn id(ids: &mut BTreeMap<String, u32>, name: &str) -> u32 {
        let next = ids.len() as u32 + 1;
        *ids.entry(name.into()).or_insert(next)
    }

    fn cookie(&mut self, path: &PathBuf) -> std::io::Result<u64> {
        let inode = std::fs::metadata(path)?.ino();
        if let Some((cached_inode, cookie)) = self.cookies.get(path)
            && *cached_inode == inode
        {
            return Ok(*cookie);
        }
        let cookie = netns::netns_cookie(path)?;
        self.cookies.insert(path.clone(), (inode, cookie));
        Ok(cookie)
    }

    /// Writes the maps for `snap`.
    pub fn apply(&mut self, snap: &Snapshot) -> Result<SyncReport, BpfError> {
        let started = std::time::Instant::now();
        let mut report = SyncReport::default();
        let mut desired = Desired::default();
        let ids = Identities::build(snap);

        // Capture addresses: the node's InternalIPs, one per family.
        let (ip4, ip6) = snap.node.as_ref().map_or((None, None), |n| {
            (n.internal_ip(false), n.internal_ip(true))
        });
        let mut config = DatapathConfig::default();
        if let Some(IpAddr::V4(ip)) = ip4 {
            config.capture_ip4 = ip.octets();
        }
        if let Some(IpAddr::V6(ip)) = ip6 {
            config.capture_ip6 = ip.octets();
        }
        for ip in ip4.iter().chain(&ip6) {
            report
                .capture
                .push(std::net::SocketAddr::new(*ip, CAPTURE_PORT).to_string());
        }
        if !report.capture.is_empty() {
            config.capture_port = CAPTURE_PORT;
            config.flags = self.flags;
        }
        if snap.outbound_traffic_policy == OutboundMode::RegistryOnly {
            config.flags |= config_flags::REGISTRY_ONLY;
        }
        let current = self.tables.config()?;
        config.policy_revision = current.policy_revision;
        self.tables.set_config(config)?;

        // Endpoints: every local pod whose netns we can open.
        let node = self.node.clone();
        for w in snap.local_workloads(&node) {
            let Some(path) = &w.netns else {
                debug!(workload = %w.id(), "no netns annotation; not an endpoint on this node");
                continue;
            };
            let cookie = match self.cookie(path) {
                Ok(c) => c,
                Err(e) => {
                    warn!(workload = %w.id(), netns = %path.display(), error = %e, "cannot open the pod's network namespace; skipping it");
                    continue;
                }
            };
            let ifindex = w.ips.iter().find_map(|ip| netns::host_route_ifindex(*ip));
            let endpoint_id = Self::id(&mut self.endpoint_ids, &w.id());
            let identity = ids.of_workload(w);
            let mut flags = 0;
            if w.meshed {
                flags |= endpoint_flags::MESHED;
            }
            if w.mtls == MtlsMode::Strict {
                flags |= endpoint_flags::STRICT;
            }
            desired.endpoints.insert(
                EndpointKey {
                    netns_cookie: cookie,
                },
                EndpointInfo {
                    endpoint_id,
                    identity,
                    flags,
                    ifindex: ifindex.unwrap_or(0),
                },
            );
            if let Some(ifindex) = ifindex {
                let mut iface = PodIface {
                    endpoint_id,
                    identity,
                    flags,
                    ..PodIface::default()
                };
                // Validation keeps portLevelMtls within the slots.
                for (slot, port) in iface.mtls_ports.iter_mut().zip(w.mtls_ports.keys()) {
                    *slot = *port;
                }
                for ip in &w.ips {
                    match ip {
                        IpAddr::V4(v4) => iface.ip4 = v4.octets(),
                        IpAddr::V6(v6) => iface.ip6 = v6.octets(),
                    }
                }
                desired.pod_ifaces.insert(ifindex, iface);
            }
            report.endpoints.push(LocalEndpoint {
                workload: w.id(),
                endpoint_id,
                identity,
                netns_cookie: cookie,
                ifindex: ifindex.unwrap_or(0),
                meshed: w.meshed,
                mtls: w.mtls,
                mtls_ports: w.mtls_ports.clone(),
                tc_hooked: false,
                ingress_isolated: false,
                egress_isolated: false,
            });
        }

        // Services: every TCP VIP:port.
        for svc in &snap.services {
            let service_id = Self::id(&mut self.service_ids, &svc.id());
            for vip in &svc.vips {
                for port in svc.ports.iter().filter(|p| p.protocol == "TCP") {
                    desired.services.insert(
                        ip_port(*vip, port.port),
                        ServiceInfo {
                            service_id,
                            flags: 0,
                        },
                    );
                }
            }
        }
        report.services = desired.services.len();

        desired.ipcache = ipcache(snap, &ids, &self.node);
        report.ipcache = desired.ipcache.len();

        // Network policy of the local endpoints.
        let local: BTreeMap<String, u32> = report
            .endpoints
            .iter()
            .map(|e| (e.workload.clone(), e.endpoint_id))
            .collect();
        let compiled = compiler::compile(snap, &ids, &Endpoints(&local), &self.service_ids);
        desired.policy = compiled.entries.clone();
        report.policy_entries = desired.policy.len();
        for e in &mut report.endpoints {
            let (ingress, egress) = compiled
                .isolation
                .get(&e.endpoint_id)
                .copied()
                .unwrap_or_default();
            e.ingress_isolated = ingress;
            e.egress_isolated = egress;
        }

        let (mut changes, stale) = self.tables.upsert(&desired)?;
        if let Some(hooks) = &mut self.pod_hooks {
            let wanted = desired.pod_ifaces.keys().copied().collect();
            for (ifindex, e) in hooks.sync(&wanted) {
                warn!(ifindex, error = %e, "cannot attach the pod programs; policy and STRICT are not enforced there");
            }
            for e in &mut report.endpoints {
                e.tc_hooked = hooks.attached().contains(&e.ifindex);
            }
        }
        let endpoints = desired.endpoints.len();
        self.tables.prune(desired, stale, &mut changes)?;
        // Last: flows allowed under the old policy are judged again.
        if changes.policy_inputs() {
            config.policy_revision = config.policy_revision.wrapping_add(1);
            self.tables.set_config(config)?;
        }
        report.policy_revision = config.policy_revision;
        report.changes = changes;
        report.apply_seconds = started.elapsed().as_secs_f64();

        if changes.any() {
            info!(
                endpoints,
                services = report.services,
                ipcache = report.ipcache,
                policy_entries = report.policy_entries,
                policy_revision = report.policy_revision,
                policy_written = changes.policy.upserted,
                policy_removed = changes.policy.removed,
                seconds = report.apply_seconds,
                capture = ?report.capture,
                "kernel maps updated"
            );
        }
        report.policy = Arc::new(PolicyView {
            identities: ids,
            compiled,
            endpoints: local,
            revision: config.policy_revision,
        });
        Ok(report)
    }
}

/// The ipcache's content for `snap`: every pod and node address, every
/// policy CIDR (and the fence keeping IPv4 out of an IPv6 one), as node
/// `node` sees them.
pub fn ipcache(snap: &Snapshot, ids: &Identities, node: &str) -> BTreeMap<(u32, [u8; 16]), IpInfo> {
    let mut ipcache = BTreeMap::new();
    for w in &snap.workloads {
        let identity = ids.of_workload(w);
        let mut flags = if w.meshed { ip_flags::MESHED } else { 0 };
        if w.node == node {
            flags |= ip_flags::LOCAL;
            if w.meshed && w.mtls == MtlsMode::Strict {
                flags |= ip_flags::STRICT;
            }
        }
        for ip in &w.ips {
            let cidr_identity = ids.cidr_identity_of(*ip);
            ipcache.insert(
                (128, ip16(*ip)),
                IpInfo {
                    identity,
                    flags,
                    cidr_identity,
                },
            );
        }
    }
    for n in &snap.nodes {
        let identity = if n.name == node {
            identity::HOST
        } else {
            identity::REMOTE_NODE
        };
        for ip in &n.internal_ips {
            ipcache.entry((128, ip16(*ip))).or_insert(IpInfo {
                identity,
                flags: 0,
                cidr_identity: ids.cidr_identity_of(*ip),
            });
        }
    }
    for (cidr, id) in ids.cidrs() {
        ipcache.entry(cidr.map_prefix()).or_insert(IpInfo {
            identity: id,
            flags: 0,
            cidr_identity: id,
        });
    }
    // After the CIDRs: a policy's 0.0.0.0/0 is the same key, and wins.
    if let Some(fence) = ids.v4_fence() {
        ipcache.entry(fence).or_insert(IpInfo {
            identity: identity::WORLD,
            flags: 0,
            cidr_identity: 0,
        });
    }
    ipcache
}

/// A 16-byte map address: IPv4 as IPv4-mapped.
pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip_port(ip: IpAddr, port: u16) -> IpPort {
    IpPort {
        addr: ip16(ip),
        port,
        _pad: 0,
    }
}

/// The socket address an [`IpPort`] names.
pub fn socket_addr(ip_port: &IpPort) -> std::net::SocketAddr {
    let v6 = std::net::Ipv6Addr::from(ip_port.addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    std::net::SocketAddr::new(ip, ip_port.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_port_round_trips_both_families() {
        for addr in ["10.96.0.10:80", "[fd00::10]:443"] {
            let sa: std::net::SocketAddr = addr.parse().expect("addr");
            assert_eq!(socket_addr(&ip_port(sa.ip(), sa.port())), sa);
        }
        assert_eq!(
            ip16("10.1.2.3".parse().expect("ip"))[10..],
            [0xff, 0xff, 10, 1, 2, 3]
        );
    }
}
