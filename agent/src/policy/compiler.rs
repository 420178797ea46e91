//! Network policies compiled into what the kernel matches: numeric
//! identities (one per namespace + label set, as Cilium allocates them, and
//! one per policy CIDR), and per local endpoint and direction the LPM
//! entries `(peer identity, protocol, port prefix) → rule` that allow
//! traffic. An endpoint no policy isolates gets one short entry that allows
//! everything in that direction.
//!
//! `ipBlock` peers become CIDR identities: every prefix named by any policy
//! (`cidr` and `except` alike) gets one, and the ipcache holds them, so the
//! longest match gives an address the identity of the most specific one.
//! A rule's block then allows the identities of the prefixes inside its
//! `cidr` and outside its `except`s. Pod and node addresses keep their own
//! identity and also carry their most specific prefix's (`cidr_identity`),
//! so a block matches in-cluster addresses as well.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;
use trellis_common::{PolicyEntry, PolicyKey, RULE_NOT_ISOLATED, direction, identity};

use super::network::{Cidr, NetworkPolicy, Peer, Ports, Rule, mask16};
use crate::state::{Snapshot, Workload};

/// A rule of a policy, as flow events and `trellis policy` name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub direction: &'static str,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub index: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)
    }
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityOf {
    Pods {
        namespace: String,
        labels: Arc<Labels>,
    },
    Cidr(Cidr),
}

type Labels = BTreeMap<String, String>;

/// Identities of namespace + label sets and of policy CIDRs, by hashing,
/// so every agent (and every restart) gives the same set the same number.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    by_id: BTreeMap<u32, IdentityOf>,
    /// Namespace and label set → identity, by the set's hash: looked up
    /// for each pod of the cluster at every sync, so with no key to build
    /// and one comparison of label sets (ordered maps compared hundreds of
    /// thousands of them at 20,000 pods).
    pods: HashMap<u64, Vec<(String, Arc<Labels>, u32)>>,
    cidrs: BTreeMap<Cidr, u32>,
    /// The CIDRs by prefix length in the maps' 16-byte form, longest
    /// first, and family (IPv4 or not): a longest-prefix match is one hash
    /// lookup per length of the address's family.
    cidr_index: Vec<(u32, bool, HashMap<[u8; 16], u32>)>,
}

fn fnv1a<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The hash of a namespace and label set: where its identity starts
/// looking for a free number. A workload keeps its own
/// ([`Workload::label_set`]).
pub fn set_hash(namespace: &str, labels: &BTreeMap<String, String>) -> u64 {
    fnv1a(
        std::iter::once(namespace.as_bytes()).chain(
            labels
                .iter()
                .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()]),
        ),
    )
}

impl Identities {
    /// Allocates identities for every pod label set of `snap` and every
    /// CIDR its policies name. Sets are taken in sorted order, so a hash
    /// collision (rare: 24 bits) resolves the same way everywhere.
    pub fn build(snap: &Snapshot) -> Self {
        let mut ids = Self::default();
        // The distinct sets, found by hash (most pods share theirs with
        // others of their ReplicaSet), then sorted.
        let mut seen: HashMap<u64, Vec<(&str, &Arc<Labels>)>> = HashMap::new();
        for w in &snap.workloads {
            // Equal sets of a snapshot share one `Arc` (`state::memo`), so
            // most of these comparisons are of addresses.
            let set = (w.namespace.as_str(), &w.labels);
            debug_assert_eq!(w.label_set, set_hash(set.0, set.1), "{}", w.id());
            let same = seen.entry(w.label_set).or_default();
            if !same.contains(&set) {
                same.push(set);
            }
        }
        let mut sets: Vec<(u64, &str, &Arc<Labels>)> = seen
            .into_iter()
            .flat_map(|(hash, sets)| sets.into_iter().map(move |(ns, l)| (hash, ns, l)))
            .collect();
        sets.sort_unstable_by(|a, b| (a.1, a.2).cmp(&(b.1, b.2)));
        for (hash, ns, labels) in sets {
            let span = identity::CIDR_BASE - identity::FIRST_POD;
            let start = (hash % u64::from(span)) as u32;
            let id = ids.free(identity::FIRST_POD, span, start);
            ids.by_id.insert(
                id,
                IdentityOf::Pods {
                    namespace: ns.to_owned(),
                    labels: labels.clone(),
                },
            );
            ids.pods
                .entry(hash)
                .or_default()
                .push((ns.to_owned(), labels.clone(), id));
        }
        let cidrs: BTreeSet<Cidr> = snap
            .network_policies
            .iter()
            .flat_map(policy_cidrs)
            .collect();
        for c in cidrs {
            let text = c.to_string();
            let span = identity::SERVICE_BASE - identity::CIDR_BASE;
            let start = (fnv1a([text.as_bytes()]) % u64::from(span)) as u32;
            let id = ids.free(identity::CIDR_BASE, span, start);
            ids.by_id.insert(id, IdentityOf::Cidr(c));
            ids.cidrs.insert(c, id);
        }
        let mut index: BTreeMap<(std::cmp::Reverse<u32>, bool), HashMap<[u8; 16], u32>> =
            BTreeMap::new();
        for (c, id) in &ids.cidrs {
            let (len, net) = c.map_prefix();
            index
                .entry((std::cmp::Reverse(len), c.addr.is_ipv4()))
                .or_default()
                .insert(net, *id);
        }
        ids.cidr_index = index
            .into_iter()
            .map(|((len, v4), nets)| (len.0, v4, nets))
            .collect();
        ids
    }

    /// The first free id from `base + start`, probing within the span.
    fn free(&self, base: u32, span: u32, start: u32) -> u32 {
        (0..span)
            .map(|i| base + (start + i) % span)
            .find(|id| !self.by_id.contains_key(id))
            .expect("fewer identities than the span holds")
    }

    pub fn of_pod(&self, namespace: &str, labels: &BTreeMap<String, String>) -> u32 {
        self.of_set(set_hash(namespace, labels), namespace, |l| **l == *labels)
    }

    pub fn of_workload(&self, w: &Workload) -> u32 {
        // `Arc`'s `==` compares addresses first: equal sets share one.
        self.of_set(w.label_set, &w.namespace, |l| *l == w.labels)
    }

    fn of_set(&self, hash: u64, namespace: &str, same: impl Fn(&Arc<Labels>) -> bool) -> u32 {
        self.pods
            .get(&hash)
            .into_iter()
            .flatten()
            .find(|(ns, l, _)| ns == namespace && same(l))
            .map_or(identity::WORLD, |(_, _, id)| *id)
    }

    /// Every policy CIDR with its identity.
    pub fn cidrs(&self) -> impl Iterator<Item = (&Cidr, u32)> {
        self.cidrs.iter().map(|(c, id)| (c, *id))
    }

    /// The identities the ipcache gives `ip` (its own, its most specific
    /// policy CIDR's): a pod's, else that CIDR's, else world. For the
    /// addresses in `snap` (node addresses are not looked at).
    pub fn of_ip(&self, snap: &Snapshot, ip: IpAddr) -> (u32, u32) {
        let cidr = self.cidr_identity_of(ip);
        match snap.workload_by_ip(ip) {
            Some(w) => (self.of_workload(w), cidr),
            None if cidr != 0 => (cidr, cidr),
            None => (identity::WORLD, 0),
        }
    }

    /// The identity of the most specific policy CIDR holding `ip`; 0 when none.
    pub fn cidr_identity_of(&self, ip: IpAddr) -> u32 {
        let ip = ip.to_canonical();
        let addr = match ip {
            IpAddr::V4(v4) => trellis_common::ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        self.cidr_index
            .iter()
            .filter(|(_, v4, _)| *v4 == ip.is_ipv4())
            .find_map(|(len, _, nets)| nets.get(&mask16(addr, *len)).copied())
            .unwrap_or(0)
    }

    /// The ipcache key that keeps IPv4 addresses out of an IPv6 policy
    /// CIDR holding the v4-mapped range (`::/0`): the kernel's longest match
    /// sees only 16-byte keys, so without it every IPv4 address no IPv4
    /// CIDR holds would take that prefix's identity. Its entry says world,
    /// as a miss does. `None` when no such CIDR is named.
    pub fn v4_fence(&self) -> Option<(u32, [u8; 16])> {
        self.cidrs
            .keys()
            .any(Cidr::covers_v4_mapped)
            .then_some(super::network::V4_MAPPED)
    }

    pub fn describe(&self, id: u32) -> Option<&IdentityOf> {
        self.by_id.get(&id)
    }

    pub fn all(&self) -> &BTreeMap<u32, IdentityOf> {
        &self.by_id
    }
}

fn policy_cidrs(p: &NetworkPolicy) -> Vec<Cidr> {
    let mut out = Vec::new();
    for rule in p.ingress.iter().chain(p.egress.iter()).flatten() {
        for peer in rule.peers.iter().flatten() {
            if let Peer::Block { cidr, except } = peer {
                out.push(*cidr);
                out.extend(except.iter().copied());
            }
        }
    }
    out
}

/// The LPM form of a policy key: prefix length and key, bits past the
/// prefix cleared (the kernel ignores them; clearing makes keys unique).
pub type LpmKey = (u32, PolicyKey);

fn lpm(prefix: u32, direction: u8, endpoint_id: u32, id: u32, protocol: u8, port: u16) -> LpmKey {
    let mut key = PolicyKey::new(direction, endpoint_id, id, protocol, port);
    if prefix <= PolicyKey::PREFIX_ENDPOINT {
        key.identity = 0;
    }
    if prefix <= PolicyKey::PREFIX_IDENTITY {
        key.protocol = 0;
    }
    let port_bits = prefix.saturating_sub(PolicyKey::PREFIX_PROTOCOL);
    let mask = u16::MAX.checked_shl(16 - port_bits).unwrap_or(0);
    key.port = (port & mask).to_be_bytes();
    (prefix, key)
}

/// `lo..=hi` as the fewest aligned blocks: (first port, prefix bits of 16).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size /= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// The compiled policy of the node's endpoints.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// The policy map's desired content.
    pub entries: BTreeMap<LpmKey, PolicyEntry>,
    /// Rule `n` is `rules[n - 1]`.
    pub rules: Vec<RuleRef>,
    /// Endpoint id → (isolated for ingress, for egress).
    pub isolation: BTreeMap<u32, (bool, bool)>,
}

impl Compiled {
    pub fn rule(&self, rule_id: u32) -> Option<&RuleRef> {
        (rule_id as usize)
            .checked_sub(1)
            .and_then(|i| self.rules.get(i))
    }

    /// The rule the entries give `(direction, endpoint, identity, protocol,
    /// port)`, longest prefix first, as the kernel's lookup does.
    pub fn lookup(
        &self,
        dir: u8,
        endpoint_id: u32,
        id: u32,
        protocol: u8,
        port: u16,
    ) -> Option<u32> {
        (PolicyKey::PREFIX_PROTOCOL..=PolicyKey::PREFIX_FULL)
            .rev()
            .chain([PolicyKey::PREFIX_IDENTITY, PolicyKey::PREFIX_ENDPOINT])
            .find_map(|prefix| {
                self.entries
                    .get(&lpm(prefix, dir, endpoint_id, id, protocol, port))
                    .map(|e| e.rule_id)
            })
    }
}

/// The local endpoints the entries are for: workload id → endpoint id.
pub struct Endpoints<'a>(pub &'a BTreeMap<String, u32>);

struct Builder<'a> {
    snap: &'a Snapshot,
    ids: &'a Identities,
    out: Compiled,
    rule_ids: BTreeMap<(String, &'static str, usize), u32>,
}

/// A rule's peers: identities, with the pods behind each (for named ports
/// of egress rules); `None` pods for CIDRs and any-peer.
type PeerSet<'a> = Vec<(u32, Vec<&'a Workload>)>;

impl<'a> Builder<'a> {
    fn rule_id(&mut self, policy: &NetworkPolicy, direction: &'static str, index: usize) -> u32 {
        let key = (policy.id(), direction, index);
        if let Some(id) = self.rule_ids.get(&key) {
            return *id;
        }
        self.out.rules.push(RuleRef {
            policy: key.0.clone(),
            direction,
            index,
        });
        let id = self.out.rules.len() as u32;
        self.rule_ids.insert(key, id);
        id
    }

    fn insert(&mut self, key: LpmKey, rule_id: u32) {
        // The first rule to allow a key names it; the union is the same.
        self.out
            .entries
            .entry(key)
            .or_insert(PolicyEntry { rule_id, flags: 0 });
    }

    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.snap.namespaces.get(ns).cloned().unwrap_or_default()
    }

    fn peers(&self, policy: &NetworkPolicy, rule: &Rule) -> PeerSet<'a> {
        let Some(peers) = &rule.peers else {
            return vec![(
                identity::ANY,
                self.snap.workloads.iter().map(|w| &**w).collect(),
            )];
        };
        let mut by_id: BTreeMap<u32, Vec<&'a Workload>> = BTreeMap::new();
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    for w in &self.snap.workloads {
                        let ns_ok = match namespaces {
                            None => w.namespace == policy.namespace,
                            Some(sel) => sel.matches(&self.namespace_labels(&w.namespace)),
                        };
                        if ns_ok && pods.as_ref().is_none_or(|s| s.matches(&w.labels)) {
                            by_id.entry(self.ids.of_workload(w)).or_default().push(w);
                        }
                    }
                }
                Peer::Block { cidr, except } => {
                    for (c, id) in self.ids.cidrs() {
                        if cidr.contains(c) && !except.iter().any(|e| e.contains(c)) {
                            by_id.entry(id).or_default();
                        }
                    }
                }
            }
        }
        by_id.into_iter().collect()
    }

    fn rule(
        &mut self,
        dir: u8,
        ep: u32,
        w: &Workload,
        policy: &NetworkPolicy,
        rule: &Rule,
        rule_id: u32,
    ) {
        for (id, pods) in self.peers(policy, rule) {
            let Some(ports) = &rule.ports else {
                self.insert(lpm(PolicyKey::PREFIX_IDENTITY, dir, ep, id, 0, 0), rule_id);
                continue;
            };
            for port in ports {
                let p = port.protocol;
                match &port.ports {
                    Ports::All => {
                        self.insert(lpm(PolicyKey::PREFIX_PROTOCOL, dir, ep, id, p, 0), rule_id);
                    }
                    Ports::Range(lo, hi) => {
                        for (first, bits) in port_blocks(*lo, *hi) {
                            let prefix = PolicyKey::PREFIX_PROTOCOL + bits;
                            self.insert(lpm(prefix, dir, ep, id, p, first), rule_id);
                        }
                    }
                    Ports::Named(name) => {
                        // Ingress: the endpoint's own port of that name;
                        // egress: each peer pod's, under its own identity
                        // when the rule names no peers (any peer's number
                        // under "any" would open it to every address).
                        let numbers: BTreeSet<(u32, u16)> = if dir == direction::INGRESS {
                            w.named_ports
                                .get(name)
                                .and_then(|n| n.number(p))
                                .map(|n| (id, n))
                                .into_iter()
                                .collect()
                        } else {
                            pods.iter()
                                .filter_map(|pw| {
                                    let n = pw.named_ports.get(name)?.number(p)?;
                                    let peer = if id == identity::ANY {
                                        self.ids.of_workload(pw)
                                    } else {
                                        id
                                    };
                                    Some((peer, n))
                                })
                                .collect()
                        };
                        for (id, n) in numbers {
                            self.insert(lpm(PolicyKey::PREFIX_FULL, dir, ep, id, p, n), rule_id);
                        }
                    }
                }
            }
        }
    }
}

/// Compiles the policies of `snap` for the local endpoints `endpoints`.
/// `service_ids` gives each service (`namespace/name`) its data-path id,
/// for the egress entries of service VIPs.
pub fn compile(
    snap: &Snapshot,
    ids: &Identities,
    endpoints: &Endpoints<'_>,
    service_ids: &BTreeMap<String, u32>,
) -> Compiled {
    let mut b = Builder {
        snap,
        ids,
        out: Compiled::default(),
        rule_ids: BTreeMap::new(),
    };
    // By namespace and name: each workload of the cluster is looked up,
    // with no id to format for it.
    let local: HashMap<(&str, &str), u32> = endpoints
        .0
        .iter()
        .filter_map(|(id, ep)| Some((id.split_once('/')?, *ep)))
        .collect();
    for w in &snap.workloads {
        let Some(&ep) = local.get(&(w.namespace.as_str(), w.name.as_str())) else {
            continue;
        };
        let mut isolated = (false, false);
        for dir in [direction::INGRESS, direction::EGRESS] {
            let mut any = false;
            for policy in snap
                .network_policies
                .iter()
                .filter(|p| p.selects(&w.namespace, &w.labels))
            {
                let Some(rules) = policy.rules(dir) else {
                    continue;
                };
                let name = direction::name(dir);
                any = true;
                for (index, rule) in rules.iter().enumerate() {
                    let rule_id = b.rule_id(policy, name, index);
                    b.rule(dir, ep, w, policy, rule, rule_id);
                }
            }
            if !any {
                b.insert(
                    lpm(PolicyKey::PREFIX_ENDPOINT, dir, ep, 0, 0, 0),
                    RULE_NOT_ISOLATED,
                );
            }
            if dir == direction::INGRESS {
                isolated.0 = any;
            } else {
                isolated.1 = any;
            }
        }
        b.out.isolation.insert(ep, isolated);
        if isolated.1 {
            services(&mut b, ep, service_ids);
        }
    }
    b.out
}

/// Egress entries for service VIPs: a VIP port is allowed when at least one
/// of its backends is (the agent drops the denied ones when it picks).
fn services(b: &mut Builder<'_>, ep: u32, service_ids: &BTreeMap<String, u32>) {
    for svc in &b.snap.services {
        let Some(&service_id) = service_ids.get(&svc.id()) else {
            continue;
        };
        for port in &svc.ports {
            let protocol = port.protocol_number();
            let allowed = svc
                .backends
                .get(&port.port)
                .into_iter()
                .flatten()
                .find_map(|backend| {
                    let (id, cidr_id) = b.ids.of_ip(b.snap, backend.addr.ip());
                    let port = backend.addr.port();
                    let d = trellis_common::judge(id, cidr_id, |i| {
                        b.out.lookup(direction::EGRESS, ep, i, protocol, port)
                    });
                    d.allowed.then_some(d.rule_id)
                });
            if let Some(rule_id) = allowed {
                b.insert(
                    lpm(
                        PolicyKey::PREFIX_FULL,
                        direction::EGRESS,
                        ep,
                        identity::service(service_id),
                        protocol,
                        port.port,
                    ),
                    rule_id,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::network::{TCP, UDP},
        state::objects::parse_file,
    };

    fn snapshot(yaml: &str) -> Snapshot {
        let parsed = parse_file(std::path::Path::new("t.yaml"), yaml).expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        Snapshot::build("n1", &parsed.objects)
    }

    fn pod(ns: &str, name: &str, ip: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec: {{nodeName: n1, containers: [{{name: c, ports: [{{name: serve-80, containerPort: 80}}]}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        )
    }

    const WORLD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {ns: y}}\n---\n";

    struct Case {
        snap: Snapshot,
        ids: Identities,
        compiled: Compiled,
        eps: BTreeMap<String, u32>,
    }

    impl Case {
        fn new(policies: &str) -> Self {
            let yaml = format!(
                "{WORLD}{}{}{}{policies}",
                pod("x", "a", "10.0.0.1", "pod: a"),
                pod("x", "b", "10.0.0.2", "pod: b"),
                pod("y", "a", "10.0.1.1", "pod: a"),
            );
            let snap = snapshot(&yaml);
            let ids = Identities::build(&snap);
            let eps: BTreeMap<String, u32> =
                [("x/a".to_string(), 1), ("x/b".into(), 2), ("y/a".into(), 3)].into();
            let compiled = compile(&snap, &ids, &Endpoints(&eps), &BTreeMap::new());
            Self {
                snap,
                ids,
                compiled,
                eps,
            }
        }

        /// Whether `from` (a pod id or an IP) may reach pod `to` on TCP `port`.
        fn allowed(&self, from: &str, to: &str, port: u16) -> bool {
            self.judged(direction::INGRESS, to, from, 6, port)
        }

        /// Local pod `pod`'s policy in `dir` on traffic with `peer` (a pod
        /// id or an IP).
        fn judged(&self, dir: u8, pod: &str, peer: &str, protocol: u8, port: u16) -> bool {
            let ip: IpAddr = match self.snap.workload(peer) {
                Some(w) => w.ips[0],
                None => peer.parse().expect("ip"),
            };
            let (id, cidr) = self.ids.of_ip(&self.snap, ip);
            let ep = self.eps[pod];
            trellis_common::judge(id, cidr, |i| {
                self.compiled.lookup(dir, ep, i, protocol, port)
            })
            .allowed
        }
    }

    fn netpol(spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {spec}\n"
        )
    }

    #[test]
    fn port_ranges_become_aligned_prefixes() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(80, 81), vec![(80, 15)]);
        assert_eq!(port_blocks(81, 84), vec![(81, 16), (82, 15), (84, 16)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        for (lo, hi) in [(1, 1000), (1024, 65535), (7, 9), (32000, 32768)] {
            let covered: u32 = port_blocks(lo, hi).iter().map(|(_, b)| 1 << (16 - b)).sum();
            assert_eq!(covered, u32::from(hi - lo) + 1);
        }
    }

    #[test]
    fn unselected_pods_are_not_isolated() {
        let c = Case::new(&netpol(
            "{podSelector: {matchLabels: {pod: a}}, ingress: []}",
        ));
        assert!(!c.allowed("x/b", "x/a", 80), "default deny for x/a");
        assert!(c.allowed("x/a", "x/b", 80), "x/b is not selected");
        assert!(c.allowed("x/a", "y/a", 80), "other namespace untouched");
        assert_eq!(c.compiled.isolation[&1], (true, false));
        assert_eq!(c.compiled.isolation[&2], (false, false));
    }

    #[test]
    fn selectors_ports_and_blocks() {
        let c = Case::new(&netpol(
            "{podSelector: {matchLabels: {pod: a}}, ingress: [\
             {from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}], ports: [{port: serve-80}]}, \
             {from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}], ports: [{port: 8000, endPort: 8010}]}]}",
        ));
        assert!(c.allowed("y/a", "x/a", 80));
        assert!(!c.allowed("y/a", "x/a", 81));
        assert!(!c.allowed("x/b", "x/a", 80));
        assert!(c.allowed("192.168.2.3", "x/a", 8005));
        assert!(!c.allowed("192.168.2.3", "x/a", 8011));
        assert!(!c.allowed("192.168.1.3", "x/a", 8005), "except");
        assert!(!c.allowed("10.9.9.9", "x/a", 8005), "world");
        let rule = c.compiled.lookup(
            direction::INGRESS,
            1,
            c.ids.of_pod("y", &[("pod".into(), "a".into())].into()),
            6,
            80,
        );
        assert_eq!(
            c.compiled.rule(rule.unwrap()).unwrap().to_string(),
            "x/p ingress[0]"
        );
    }

    #[test]
    fn ip_blocks_match_pod_addresses_too() {
        let c = Case::new(&netpol(
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.2/32]}}]}]}",
        ));
        assert!(!c.allowed("x/b", "x/a", 80), "x/b is the except");
        assert!(!c.allowed("y/a", "x/a", 80), "10.0.1.1 is outside");
        assert!(c.allowed("10.0.0.77", "x/a", 80));
    }

    #[test]
    fn the_most_specific_cidr_names_an_address() {
        let c = Case::new(&netpol(
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/24]}}, \
             {ipBlock: {cidr: \"fd00::/16\"}}, {ipBlock: {cidr: 0.0.0.0/0}}]}]}",
        ));
        let id = |text: &str| {
            let cidr = super::super::network::cidr(text).expect("cidr");
            c.ids
                .cidrs()
                .find(|(x, _)| **x == cidr)
                .expect("a policy CIDR")
                .1
        };
        let of = |ip: &str| c.ids.cidr_identity_of(ip.parse().expect("ip"));
        assert_eq!(of("10.0.0.9"), id("10.0.0.0/24"));
        assert_eq!(of("10.200.0.9"), id("10.0.0.0/8"));
        assert_eq!(of("192.0.2.1"), id("0.0.0.0/0"));
        assert_eq!(of("fd00:1::1"), id("fd00::/16"));
        assert_eq!(of("fe80::1"), 0, "no IPv6 prefix holds it");
        assert_eq!(mask16([0xff; 16], 99)[12..], [0xe0, 0, 0, 0]);
    }

    #[test]
    fn a_port_name_means_one_protocol_and_each_peer_pods_own_port() {
        // serve-80 is a TCP port: a UDP rule of that name opens nothing.
        let c = Case::new(&netpol(
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-80, protocol: UDP}]}]}",
        ));
        assert!(!c.judged(direction::INGRESS, "x/a", "x/b", UDP, 80));
        assert!(!c.judged(direction::INGRESS, "x/a", "x/b", TCP, 80));
        // Egress to any peer on a name: each pod's port of that name, and no
        // address that is not a pod's.
        let c = Case::new(&netpol(
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-80}]}]}",
        ));
        assert!(c.judged(direction::EGRESS, "x/a", "y/a", TCP, 80));
        assert!(!c.judged(direction::EGRESS, "x/a", "y/a", TCP, 81));
        assert!(!c.judged(direction::EGRESS, "x/a", "192.0.2.1", TCP, 80));
    }

    #[test]
    fn an_ipv6_block_holds_no_ipv4_address() {
        let c = Case::new(&netpol(
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: \"::/0\"}}]}]}",
        ));
        assert!(c.allowed("2001:db8::1", "x/a", 80));
        assert!(!c.allowed("192.0.2.1", "x/a", 80));
        assert!(!c.allowed("x/b", "x/a", 80));
        assert_eq!(c.ids.cidr_identity_of("192.0.2.1".parse().expect("ip")), 0);
        // The kernel's longest match sees 16-byte keys: the fence keeps
        // IPv4 addresses out of ::/0's entry.
        assert_eq!(c.ids.v4_fence(), Some(super::super::network::V4_MAPPED));
        let all = super::super::network::cidr("::/0").expect("cidr");
        assert!(!all.contains(&super::super::network::cidr("10.0.0.0/8").expect("cidr")));
    }

    #[test]
    fn identities_are_stable_across_builds() {
        let a = Case::new("");
        let b = Case::new("");
        assert_eq!(a.ids.all(), b.ids.all());
        assert!(a.ids.all().keys().all(|id| *id >= identity::FIRST_POD));
    }
}
