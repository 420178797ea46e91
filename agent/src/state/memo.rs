//! What the last build made of each object, kept for the next one. On a
//! large cluster most rebuilds follow a change to one pod or a few: with
//! this, a build makes again only the workloads of pods that changed and
//! the Services that can see them, and shares the rest (`Arc`) with the
//! snapshot before it, which also makes dropping that snapshot cheap.
//!
//! An entry is reused only while each of its inputs is the very object it
//! was made from (`Arc::ptr_eq`: a source makes a new `Arc` for every
//! object it reads again) and what it read of other objects compares
//! equal. An entry holds its inputs, so their addresses cannot be taken by
//! other objects while it is kept. Entries not used by a build are dropped.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    model::{ServiceView, Workload},
    objects::SlimPod,
};

/// What a pod's workload reads of its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NamespaceMesh {
    /// Labelled into the mesh.
    pub meshed: bool,
    /// Its mTLS label, when it has one.
    pub mtls: Option<String>,
    /// The PeerAuthentications that may apply to its pods.
    pub peer: crate::policy::peer_auth::Applicable,
}

/// Hashes an address (the entries' keys) with one multiply: SipHash's
/// strength is for keys someone else picks, and these are the agent's own
/// allocations, 20,000 of them looked up at each build on a large cluster.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        // Allocations are aligned (their low bits are zero), and the table
        // picks a bucket by the low bits: fold the high half down.
        let h = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}

type ByAddress<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;

/// An object's address, as the key of its entry.
fn key<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

/// A workload's address: what a Service's entry records of the pods it
/// saw.
pub(super) fn address(w: &Workload) -> usize {
    std::ptr::from_ref(w) as usize
}

struct WorkloadEntry {
    /// Kept so that its address (the key) stays its own.
    _pod: Arc<SlimPod>,
    namespace: NamespaceMesh,
    /// `None` for a pod that is no workload (no address yet, finished).
    workload: Option<Arc<Workload>>,
}

struct ServiceEntry {
    /// Kept so that its address (the key) stays its own.
    _service: Arc<Service>,
    /// Its EndpointSlices: the same ones while their addresses are equal.
    slices: Vec<Arc<EndpointSlice>>,
    /// Every address they list, parsed once.
    addresses: Vec<IpAddr>,
    /// The workload at each of those addresses (its address), or none.
    workloads: Vec<Option<usize>>,
    view: Arc<ServiceView>,
}

/// See the module's documentation. One per state thread; a fresh one
/// builds everything.
#[derive(Default)]
pub struct Memo {
    workloads: ByAddress<WorkloadEntry>,
    services: ByAddress<ServiceEntry>,
    /// Each namespace's workloads in the last build, by address, in order.
    namespaces: HashMap<String, Vec<usize>>,
    /// The node the last build was for, and every node's zone (node,
    /// zone), sorted: a Service view marks the endpoints close to it.
    here: (String, Vec<(String, String)>),
    /// What the last build reused and made.
    pub last: Reuse,
    /// The label sets of the workloads built, by [`Workload::label_set`]:
    /// a workload made with labels equal to a known set's takes that set's
    /// `Arc`. Pods of one ReplicaSet carry equal labels, and one `Arc`
    /// between them lets the identities compare sets by address (`Arc`'s
    /// `==` tries that first) instead of entry by entry, 20,000 of them at
    /// each sync.
    labels: HashMap<u64, Vec<Arc<Labels>>>,
}

type Labels = std::collections::BTreeMap<String, String>;

/// What one build took from the one before it and what it made (or, in
/// [`super::pace::RebuildStats`], every build's, added up).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reuse {
    pub workloads_reused: usize,
    pub workloads_made: usize,
    pub services_reused: usize,
    pub services_made: usize,
}

impl std::ops::AddAssign for Reuse {
    fn add_assign(&mut self, other: Self) {
        self.workloads_reused += other.workloads_reused;
        self.workloads_made += other.workloads_made;
        self.services_reused += other.services_reused;
        self.services_made += other.services_made;
    }
}

/// A build's use of a [`Memo`]: it reads the last build's entries and
/// collects this one's, which replace them at [`Pass::finish`].
pub(super) struct Pass<'m> {
    memo: &'m mut Memo,
    workloads: ByAddress<WorkloadEntry>,
    services: ByAddress<ServiceEntry>,
    namespaces: HashMap<String, Vec<usize>>,
    /// Namespaces whose workloads are not all those of the last build.
    changed: HashSet<String>,
    /// The last build's entries this one did not reuse, freed at the end:
    /// until then no workload made here can take the address of one the
    /// last build recorded.
    discarded: Vec<WorkloadEntry>,
    reuse: Reuse,
}

impl<'m> Pass<'m> {
    /// Starts a build for `node` with the nodes' `zones`: when either
    /// changed, no Service view is reused.
    pub fn new(memo: &'m mut Memo, node: &str, mut zones: Vec<(String, String)>) -> Self {
        zones.sort();
        if memo.here.0 != node || memo.here.1 != zones {
            memo.services.clear();
            memo.here = (node.to_owned(), zones);
        }
        Self {
            workloads: ByAddress::with_capacity_and_hasher(
                memo.workloads.len(),
                Default::default(),
            ),
            services: ByAddress::with_capacity_and_hasher(memo.services.len(), Default::default()),
            namespaces: HashMap::with_capacity(memo.namespaces.len()),
            changed: HashSet::new(),
            discarded: Vec::new(),
            memo,
            reuse: Reuse::default(),
        }
    }

    /// The workload of `pod` in a namespace that reads as `namespace`:
    /// the last build's, or `make`'s.
    pub fn workload(
        &mut self,
        pod: &Arc<SlimPod>,
        namespace: &NamespaceMesh,
        make: impl FnOnce() -> Option<Workload>,
    ) -> Option<Arc<Workload>> {
        let k = key(pod);
        let entry = match self.memo.workloads.remove(&k) {
            Some(e) if e.namespace == *namespace => {
                self.reuse.workloads_reused += 1;
                e
            }
            old => {
                self.discarded.extend(old);
                self.reuse.workloads_made += 1;
                WorkloadEntry {
                    _pod: pod.clone(),
                    namespace: namespace.clone(),
                    workload: make().map(|mut w| {
                        self.memo.share_labels(&mut w);
                        Arc::new(w)
                    }),
                }
            }
        };
        let workload = entry.workload.clone();
        self.workloads.insert(k, entry);
        workload
    }

    /// Records the workloads of each namespace in this build (by address,
    /// in order), before any [`Pass::service`].
    pub fn namespaces(&mut self, now: HashMap<String, Vec<usize>>) {
        self.changed = self
            .memo
            .namespaces
            .keys()
            .filter(|ns| !now.contains_key(*ns))
            .cloned()
            .collect();
        for (ns, list) in &now {
            if self.memo.namespaces.get(ns) != Some(list) {
                self.changed.insert(ns.clone());
            }
        }
        self.namespaces = now;
    }

    /// The view of `service` in `namespace` with its EndpointSlices
    /// `slices` (none: it picks pods by selector): the last build's, or
    /// `make`'s. A view is made again when the Service or a slice is
    /// another object, when a workload at an address a slice lists is
    /// another (`at` finds them), and for a selector when its namespace's
    /// workloads are not all the same ones.
    pub fn service(
        &mut self,
        service: &Arc<Service>,
        namespace: &str,
        slices: &[&Arc<EndpointSlice>],
        addresses: impl FnOnce() -> Vec<IpAddr>,
        at: impl Fn(IpAddr) -> Option<usize>,
        make: impl FnOnce() -> ServiceView,
    ) -> Arc<ServiceView> {
        let k = key(service);
        // An entry made from other slices is of no use.
        let mut old = self.memo.services.remove(&k).filter(|e| {
            e.slices.len() == slices.len()
                && e.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
        });
        let addresses = match &mut old {
            Some(e) => std::mem::take(&mut e.addresses),
            None => addresses(),
        };
        let workloads: Vec<Option<usize>> = addresses.iter().map(|ip| at(*ip)).collect();
        let entry = match old {
            Some(mut e)
                if e.workloads == workloads
                    && (!slices.is_empty() || !self.changed.contains(namespace)) =>
            {
                self.reuse.services_reused += 1;
                e.addresses = addresses;
                e
            }
            _ => {
                self.reuse.services_made += 1;
                ServiceEntry {
                    _service: service.clone(),
                    slices: slices.iter().map(|s| Arc::clone(s)).collect(),
                    addresses,
                    workloads,
                    view: Arc::new(make()),
                }
            }
        };
        let view = entry.view.clone();
        self.services.insert(k, entry);
        view
    }

    /// Keeps this build's entries for the next one.
    pub fn finish(self) {
        let Self {
            memo,
            workloads,
            services,
            namespaces,
            changed: _,
            discarded,
            reuse,
        } = self;
        drop(discarded);
        memo.workloads = workloads;
        memo.services = services;
        memo.namespaces = namespaces;
        memo.last = reuse;
        // A set no workload holds any more (only this table, or a snapshot
        // about to be replaced) is forgotten.
        memo.labels.retain(|_, sets| {
            sets.retain(|l| Arc::strong_count(l) > 1);
            !sets.is_empty()
        });
    }
}

impl Memo {
    /// Gives `w` the known `Arc` of labels equal to its own, or makes its
    /// own known.
    fn share_labels(&mut self, w: &mut Workload) {
        let sets = self.labels.entry(w.label_set).or_default();
        match sets.iter().find(|l| **l == w.labels) {
            Some(known) => w.labels = known.clone(),
            None => sets.push(w.labels.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::state::{Object, Snapshot, objects::parse_file};

    const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
spec: {podCIDR: 10.1.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {topology.kubernetes.io/zone: z2}}
---
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {trellis.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {trellis.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: a1, namespace: a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: a2, namespace: a, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}
status: {podIP: 10.1.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: b, labels: {app: api}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b2, namespace: b, labels: {app: api}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, trafficDistribution: PreferClose, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: b}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: listed, namespace: b}
spec: {clusterIP: 10.96.0.3, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: listed-1, namespace: b, labels: {kubernetes.io/service-name: listed}}
addressType: IPv4
endpoints: [{addresses: [10.1.1.2]}, {addresses: [10.1.1.1]}, {addresses: [10.1.3.9]}]
";

    fn parse(text: &str) -> Vec<Object> {
        let parsed = parse_file(Path::new("cluster.yaml"), text).expect("yaml");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        parsed.objects
    }

    /// `objects` with each of `changes` (YAML) in place of the object of
    /// its kind and name, or added; every other object stays the same
    /// `Arc`, as a source keeps it.
    fn with(objects: &[Object], changes: &str) -> Vec<Object> {
        let mut out = objects.to_vec();
        for new in parse(changes) {
            match out.iter_mut().find(|o| o.key() == new.key()) {
                Some(old) => *old = new,
                None => out.push(new),
            }
        }
        out
    }

    /// Builds `objects` with `memo`, checks the result against a build
    /// from nothing, and returns what was reused.
    fn step(memo: &mut Memo, objects: &[Object]) -> (Snapshot, Reuse) {
        let snap = Snapshot::build_with("n1", objects, memo);
        assert_eq!(snap, Snapshot::build("n1", objects));
        (snap, memo.last)
    }

    fn reuse(workloads: (usize, usize), services: (usize, usize)) -> Reuse {
        Reuse {
            workloads_reused: workloads.0,
            workloads_made: workloads.1,
            services_reused: services.0,
            services_made: services.1,
        }
    }

    #[test]
    fn a_rebuild_makes_again_only_what_a_change_can_reach() {
        let mut memo = Memo::default();
        let objects = parse(CLUSTER);
        let (first, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((0, 4), (0, 3)));

        // Nothing changed: everything is shared with the last snapshot.
        let (again, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((4, 0), (3, 0)));
        assert!(
            first
                .workloads
                .iter()
                .zip(&again.workloads)
                .all(|(x, y)| Arc::ptr_eq(x, y))
        );
        assert!(
            first
                .services
                .iter()
                .zip(&again.services)
                .all(|(x, y)| Arc::ptr_eq(x, y))
        );

        // A pod of `a` changes: its workload and `a`'s Service are made
        // again; `b`'s two are kept.
        let objects = with(
            &objects,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a2, namespace: a, labels: {app: web, v: '2'}}\n\
             spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 8082}]}]}\n\
             status: {podIP: 10.1.2.1}\n",
        );
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((3, 1), (2, 1)));
        assert_eq!(
            snap.service("a/web").expect("web").backends[&80][1]
                .addr
                .port(),
            8082
        );

        // A pod of `a` appears at the address `b`'s slice lists and no pod
        // had: the slice's Service is made again though nothing of `b`
        // changed.
        let objects = with(
            &objects,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a3, namespace: a, labels: {app: other}}\n\
             spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 7070}]}]}\n\
             status: {podIP: 10.1.3.9}\n",
        );
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((4, 1), (1, 2)));
        // (b1 has no port named `http`: no backend.)
        let listed = &snap.service("b/listed").expect("listed").backends[&80];
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].workload.as_deref(), Some("a/a3"));
        assert_eq!(listed[1].addr.port(), 7070);

        // `b` leaves the mesh: its pods' workloads are made again, and so
        // its Services (the slice's too: its pods are new workloads).
        let objects = with(
            &objects,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        );
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((3, 2), (1, 2)));
        assert!(!snap.workload("b/b1").expect("b1").meshed);

        // A node changes zone: which endpoints are close changes for every
        // Service.
        let objects = with(
            &objects,
            "apiVersion: v1\nkind: Node\nmetadata: {name: n2, labels: {topology.kubernetes.io/zone: z1}}\n",
        );
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((5, 0), (0, 3)));
        assert!(
            snap.service("a/web").expect("web").backends[&80]
                .iter()
                .all(|b| b.close)
        );

        // A pod is deleted: its namespace's Service is made again.
        let objects: Vec<Object> = objects
            .into_iter()
            .filter(|o| o.key().name != "a1")
            .collect();
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((4, 0), (1, 2)));
        assert_eq!(snap.service("a/web").expect("web").backends[&80].len(), 1);
    }

    #[test]
    fn workloads_with_equal_labels_share_one_set_and_a_set_no_one_holds_is_forgotten() {
        let mut memo = Memo::default();
        let objects = parse(CLUSTER);
        let (snap, _) = step(&mut memo, &objects);
        let labels = |snap: &Snapshot, id: &str| snap.workload(id).expect(id).labels.clone();
        assert!(Arc::ptr_eq(&labels(&snap, "a/a1"), &labels(&snap, "a/a2")));
        assert!(Arc::ptr_eq(&labels(&snap, "b/b1"), &labels(&snap, "b/b2")));
        assert!(!Arc::ptr_eq(&labels(&snap, "a/a1"), &labels(&snap, "b/b1")));
        // Made again with other labels, then back: a2 takes the set a1
        // still holds.
        let changed = with(
            &objects,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a2, namespace: a, labels: {app: web, v: '2'}}\n\
             spec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIP: 10.1.2.1}\n",
        );
        let (other, _) = step(&mut memo, &changed);
        assert_eq!(memo.labels.len(), 3);
        let back = with(
            &changed,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a2, namespace: a, labels: {app: web}}\n\
             spec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIP: 10.1.2.1}\n",
        );
        // The pods hold their labels too (a workload starts with its
        // pod's `Arc`): gone with the objects that had them.
        drop((snap, other, changed));
        let (snap, r) = step(&mut memo, &back);
        assert_eq!(r.workloads_made, 1);
        assert!(Arc::ptr_eq(&labels(&snap, "a/a1"), &labels(&snap, "a/a2")));
        // The set {app: web, v: 2} is held by no workload now.
        assert_eq!(memo.labels.len(), 2);
    }

    #[test]
    fn a_build_for_another_node_makes_every_view_again() {
        let mut memo = Memo::default();
        let objects = parse(CLUSTER);
        step(&mut memo, &objects);
        let snap = Snapshot::build_with("n2", &objects, &mut memo);
        assert_eq!(snap, Snapshot::build("n2", &objects));
        assert_eq!(memo.last, reuse((4, 0), (0, 3)));
    }

    #[test]
    fn a_pod_with_no_workload_is_remembered_too() {
        let mut memo = Memo::default();
        let objects = with(
            &parse(CLUSTER),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: a, labels: {app: web}}\n\
             spec: {nodeName: n1, containers: [{name: c}]}\n",
        );
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!((snap.workloads.len(), r.workloads_made), (4, 5));
        // Started: it has an address now, and `a`'s Service picks it.
        let objects = with(
            &objects,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: a, labels: {app: web}}\n\
             spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n\
             status: {podIP: 10.1.1.7}\n",
        );
        let (snap, r) = step(&mut memo, &objects);
        assert_eq!(r, reuse((4, 1), (2, 1)));
        assert_eq!(snap.service("a/web").expect("web").backends[&80].len(), 3);
    }
}
