//! The Kubernetes API as the state source. One kube-runtime watcher per
//! kind (list, then watch from its resourceVersion; bookmarks; a full
//! relist after `410 Gone` or a broken watch, with backoff) keeps a store
//! of objects; each object goes through the same parsing and validation as
//! a YAML file's ([`super::objects::parse_value`]), so the two sources
//! differ only in where objects come from. The state is offered once every
//! kind has been listed (a kind whose resource the cluster does not serve,
//! such as Gateway API routes without their CRDs, counts as listed and
//! empty), and again after each change.
//!
//! Losing the API server disturbs nothing: the watchers retry with backoff
//! and the last known objects keep serving; [`KubeSource::stale_for`] says
//! for how long, for a metric and the readiness detail.
//!
//! Pods: every pod of the cluster is needed (the ipcache and policy peers),
//! so all are watched, and each is slimmed on arrival to what the state
//! model reads (names, uid, labels, timestamps and the netns annotation of
//! the metadata; node, service account, container ports, IPs, phase,
//! Ready), as Cilium does with its slim types,
//! and kept as a [`super::objects::SlimPod`]; the metadata-only API would
//! drop the IPs the model needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{debug, info, warn};

use super::objects::{NETNS_ANNOTATION, Object, ObjectKey, parse_value};

/// What the rejection messages name as the "file".
const ORIGIN: &str = "kubernetes";

/// A kind the agent watches.
#[derive(Clone, Copy, Debug)]
struct Kind {
    kind: &'static str,
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    /// Watched in the mesh namespace only, by this name (the mesh
    /// configuration), not in every namespace.
    only: Option<&'static str>,
}

const KINDS: &[Kind] = &[
    Kind {
        kind: "Node",
        group: "",
        version: "v1",
        plural: "nodes",
        only: None,
    },
    Kind {
        kind: "Namespace",
        group: "",
        version: "v1",
        plural: "namespaces",
        only: None,
    },
    Kind {
        kind: "Pod",
        group: "",
        version: "v1",
        plural: "pods",
        only: None,
    },
    Kind {
        kind: "Service",
        group: "",
        version: "v1",
        plural: "services",
        only: None,
    },
    Kind {
        kind: "EndpointSlice",
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        only: None,
    },
    Kind {
        kind: "NetworkPolicy",
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        only: None,
    },
    Kind {
        kind: "HTTPRoute",
        group: "gateway.networking.k8s.io",
        version: "v1",
        plural: "httproutes",
        only: None,
    },
    Kind {
        kind: "GRPCRoute",
        group: "gateway.networking.k8s.io",
        version: "v1",
        plural: "grpcroutes",
        only: None,
    },
    Kind {
        kind: "ReferenceGrant",
        group: "gateway.networking.k8s.io",
        version: "v1beta1",
        plural: "referencegrants",
        only: None,
    },
    Kind {
        kind: "AuthorizationPolicy",
        group: "trellis.dev",
        version: "v1alpha1",
        plural: "authorizationpolicies",
        only: None,
    },
    Kind {
        kind: "RequestAuthentication",
        group: "trellis.dev",
        version: "v1alpha1",
        plural: "requestauthentications",
        only: None,
    },
    Kind {
        kind: "PeerAuthentication",
        group: "trellis.dev",
        version: "v1alpha1",
        plural: "peerauthentications",
        only: None,
    },
    Kind {
        kind: "Telemetry",
        group: "trellis.dev",
        version: "v1alpha1",
        plural: "telemetries",
        only: None,
    },
    Kind {
        kind: "ServiceEntry",
        group: "trellis.dev",
        version: "v1alpha1",
        plural: "serviceentries",
        only: None,
    },
    Kind {
        kind: "TrafficPolicy",
        group: "trellis.dev",
        version: "v1alpha1",
        plural: "trafficpolicies",
        only: None,
    },
    Kind {
        kind: "ConfigMap",
        group: "",
        version: "v1",
        plural: "configmaps",
        only: Some(crate::policy::providers::CONFIG_MAP),
    },
];

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.into()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: self.version.into(),
            api_version: self.api_version(),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }
}

/// Counts of the source, for `trellis status` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KubeStats {
    /// Changes applied: objects added, updated, deleted, relists.
    pub events: u64,
    /// Objects refused by validation (their last good version kept).
    pub rejected: u64,
    /// Errors from the API server (lists, watches), each retried.
    pub errors: u64,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<ObjectKey, Object>,
    generation: u64,
    /// Kinds listed at least once.
    synced: BTreeSet<&'static str>,
    /// Kinds whose last call failed, since when.
    failing: BTreeMap<&'static str, (Instant, String)>,
    stats: KubeStats,
}

impl Store {
    fn parse(&mut self, kind: &Kind, object: DynamicObject) -> Option<Object> {
        let mut value = match serde_json::to_value(&object) {
            Ok(v) => v,
            Err(e) => {
                warn!(kind = kind.kind, error = %e, "an object from the API server could not be read");
                return None;
            }
        };
        // List items come without their type; the watch says which it is.
        value["apiVersion"] = kind.api_version().into();
        value["kind"] = kind.kind.into();
        slim(&mut value);
        match parse_value(ORIGIN, 0, value) {
            Ok(object) => object,
            Err((_, e)) => {
                self.stats.rejected += 1;
                warn!(error = %e, "object refused; its last good version keeps serving");
                None
            }
        }
    }

    fn apply(&mut self, kind: &Kind, object: DynamicObject) {
        if let Some(object) = self.parse(kind, object) {
            let key = object.key();
            if self.objects.get(&key) != Some(&object) {
                self.objects.insert(key, object);
                self.changed();
            }
        }
    }

    fn delete(&mut self, kind: &Kind, object: &DynamicObject) {
        let key = key_of(kind, object);
        if self.objects.remove(&key).is_some() {
            self.changed();
        }
    }

    /// A full list: the kind's objects are these, and no others (deletes
    /// missed while the watch was down end here). A refused object keeps
    /// its last good version.
    fn replace(&mut self, kind: &Kind, listed: Vec<DynamicObject>) {
        let mut fresh = BTreeMap::new();
        for object in listed {
            let key = key_of(kind, &object);
            match self.parse(kind, object) {
                Some(object) => {
                    fresh.insert(object.key(), object);
                }
                None => {
                    if let Some(last) = self.objects.get(&key) {
                        fresh.insert(key, last.clone());
                    }
                }
            }
        }
        let same = self
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind.kind)
            .eq(fresh.iter());
        if !same {
            self.objects.retain(|k, _| k.kind != kind.kind);
            self.objects.extend(fresh);
            self.changed();
        }
        if self.synced.insert(kind.kind) {
            self.changed();
        }
    }

    /// The kind's API answered: it is no longer failing.
    fn answered(&mut self, kind: &Kind) {
        if self.failing.remove(kind.kind).is_some() {
            info!(kind = kind.kind, "the API server answers again");
        }
    }

    fn changed(&mut self) {
        self.generation += 1;
        self.stats.events += 1;
    }
}

fn key_of(kind: &Kind, object: &DynamicObject) -> ObjectKey {
    ObjectKey {
        kind: kind.kind,
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
    }
}

/// Drops what the state model never reads: everywhere, the metadata
/// beyond names, uid, labels, timestamps and the netns annotation; for
/// pods, everything but metadata, node, service account, container names
/// and ports, host networking, IPs, phase and the Ready condition.
fn slim(value: &mut serde_json::Value) {
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        // resourceVersion changes with every write, managedFields and
        // kubectl's last-applied annotation are often bigger than the rest:
        // kept, they would make each write a change and a rebuild.
        meta.retain(|k, _| {
            matches!(
                k.as_str(),
                "name"
                    | "namespace"
                    | "uid"
                    | "labels"
                    | "annotations"
                    | "creationTimestamp"
                    | "deletionTimestamp"
            )
        });
        if let Some(annotations) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            annotations.retain(|k, _| k == NETNS_ANNOTATION);
        }
    }
    if value["kind"] != "Pod" {
        return;
    }
    if let Some(spec) = value.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.retain(|k, _| {
            matches!(
                k.as_str(),
                "nodeName" | "serviceAccountName" | "containers" | "hostNetwork"
            )
        });
        if let Some(containers) = spec.get_mut("containers").and_then(|c| c.as_array_mut()) {
            for c in containers {
                if let Some(c) = c.as_object_mut() {
                    c.retain(|k, _| matches!(k.as_str(), "name" | "ports"));
                }
            }
        }
    }
    if let Some(status) = value.get_mut("status").and_then(|s| s.as_object_mut()) {
        status.retain(|k, _| {
            matches!(
                k.as_str(),
                "podIP" | "podIPs" | "phase" | "hostIP" | "conditions"
            )
        });
        // Of the conditions, Ready says whether a Service without an
        // EndpointSlice yet may pick the pod.
        if let Some(conditions) = status.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            conditions.retain(|c| c["type"] == "Ready");
            for c in conditions.iter_mut().filter_map(|c| c.as_object_mut()) {
                c.retain(|k, _| matches!(k.as_str(), "type" | "status"));
            }
        }
    }
}

/// The API server as a state source: watchers run on the runtime it was
/// made in; [`KubeSource::poll`] is read from the state thread.
pub struct KubeSource {
    store: Arc<Mutex<Store>>,
    seen: u64,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

impl KubeSource {
    /// A client for `config` and a watcher per kind. The client's own
    /// retries are off: kube-client retries a 503 up to 15 times over
    /// minutes, which would hide an outage from the watchers (they back off
    /// on their own) and from the staleness they report.
    pub fn connect(mut config: kube::Config, mesh_namespace: &str) -> Result<Self, kube::Error> {
        config.default_retry = false;
        Ok(Self::start(&Client::try_from(config)?, mesh_namespace))
    }

    /// Starts a watcher per kind with `client`; the mesh configuration is
    /// read from `mesh_namespace`.
    pub fn start(client: &Client, mesh_namespace: &str) -> Self {
        let store = Arc::new(Mutex::new(Store::default()));
        let tasks = KINDS
            .iter()
            .map(|kind| {
                let (api, config) = match kind.only {
                    None => (
                        Api::<DynamicObject>::all_with(client.clone(), &kind.resource()),
                        watcher::Config::default(),
                    ),
                    Some(name) => (
                        Api::<DynamicObject>::namespaced_with(
                            client.clone(),
                            mesh_namespace,
                            &kind.resource(),
                        ),
                        watcher::Config::default().fields(&format!("metadata.name={name}")),
                    ),
                };
                tokio::spawn(watch(*kind, api, config, store.clone())).abort_handle()
            })
            .collect();
        Self {
            store,
            seen: 0,
            tasks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every object, when something changed since the last call and every
    /// kind has been listed.
    pub fn poll(&mut self) -> Option<Vec<Object>> {
        let store = self.lock();
        if store.synced.len() < KINDS.len() || store.generation == self.seen {
            return None;
        }
        let objects = store.objects.values().cloned().collect();
        let generation = store.generation;
        drop(store);
        self.seen = generation;
        Some(objects)
    }

    /// Kinds not listed yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let store = self.lock();
        KINDS
            .iter()
            .map(|k| k.kind)
            .filter(|k| !store.synced.contains(k))
            .collect()
    }

    /// How long the API server has been failing, and the last error, when
    /// it is.
    pub fn stale_for(&self) -> Option<(Duration, String)> {
        let store = self.lock();
        store
            .failing
            .values()
            .min_by_key(|(since, _)| *since)
            .map(|(since, error)| (since.elapsed(), error.clone()))
    }

    pub fn stats(&self) -> KubeStats {
        self.lock().stats
    }
}

/// While a kind's calls fail, its API is asked whether it answers again
/// (a watch that resumes from its resourceVersion brings no event until
/// something changes, so events alone cannot say so): first after this,
/// then twice as long each time up to [`PROBE_MAX`], jittered, the shape of
/// the watchers' own backoff, so a thousand agents do not hammer an API
/// server coming back.
const PROBE_FIRST: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// Runs one kind's watcher until aborted.
async fn watch(
    kind: Kind,
    api: Api<DynamicObject>,
    config: watcher::Config,
    store: Arc<Mutex<Store>>,
) {
    let lock = || store.lock().unwrap_or_else(|e| e.into_inner());
    let mut listing: Vec<DynamicObject> = Vec::new();
    let mut events = watcher(api.clone(), config).default_backoff().boxed();
    let mut delay = PROBE_FIRST;
    let probe = tokio::time::sleep(delay);
    tokio::pin!(probe);
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
            () = &mut probe => {
                if lock().failing.contains_key(kind.kind) {
                    if answers(&api).await {
                        lock().answered(&kind);
                        delay = PROBE_FIRST;
                    } else {
                        delay = (delay * 2).min(PROBE_MAX);
                    }
                } else {
                    delay = PROBE_FIRST;
                }
                // 75 % to 125 % of the delay.
                let jittered = delay.mul_f64(0.75 + crate::identity::ca::random_fraction() / 2.0);
                probe.as_mut().reset(tokio::time::Instant::now() + jittered);
                continue;
            }
        };
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(object)) => listing.push(object),
            Ok(watcher::Event::InitDone) => {
                let mut store = lock();
                store.answered(&kind);
                debug!(kind = kind.kind, objects = listing.len(), "listed");
                store.replace(&kind, std::mem::take(&mut listing));
            }
            Ok(watcher::Event::Apply(object)) => {
                let mut store = lock();
                store.answered(&kind);
                store.apply(&kind, object);
            }
            Ok(watcher::Event::Delete(object)) => {
                let mut store = lock();
                store.answered(&kind);
                store.delete(&kind, &object);
            }
            Err(e) => {
                let mut store = lock();
                store.stats.errors += 1;
                if not_served(&e) {
                    // The cluster has no such resource (its CRD is not
                    // installed): nothing of the kind, and look again later.
                    store.answered(&kind);
                    if store.synced.insert(kind.kind) {
                        info!(kind = kind.kind, api = %kind.api_version(), "not served by this cluster; none of the kind");
                        store.changed();
                    }
                    continue;
                }
                let error = e.to_string();
                if !store.failing.contains_key(kind.kind) {
                    warn!(kind = kind.kind, %error, "the API server failed; retrying, the last known state keeps serving");
                }
                store
                    .failing
                    .entry(kind.kind)
                    .or_insert_with(|| (Instant::now(), String::new()))
                    .1 = error;
            }
        }
    }
}

/// Whether the kind's API answers: a one-item list succeeds, or says the
/// resource is not served (an answer too).
async fn answers(api: &Api<DynamicObject>) -> bool {
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) => s.code == 404,
        Err(_) => false,
    }
}

/// Whether a watcher error says the resource does not exist (404).
fn not_served(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s,
        watcher::Error::WatchError(s) => s,
        _ => return false,
    };
    api.code == 404
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_slimmed_to_what_the_model_reads() {
        let mut pod = serde_json::json!({
            "kind": "Pod",
            "metadata": {
                "name": "p", "labels": {"app": "web"}, "managedFields": [{"manager": "kubelet"}],
                "resourceVersion": "7", "generateName": "p-", "ownerReferences": [{"kind": "ReplicaSet"}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", NETNS_ANNOTATION: "/run/netns/p"}
            },
            "spec": {
                "nodeName": "n1", "serviceAccountName": "sa", "volumes": [{"name": "v"}],
                "containers": [{"name": "c", "image": "x", "env": [{"name": "A"}], "ports": [{"containerPort": 80}]}]
            },
            "status": {"podIP": "10.0.0.1", "phase": "Running", "qosClass": "BestEffort", "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": null}
            ]}
        });
        slim(&mut pod);
        assert_eq!(
            pod,
            serde_json::json!({
                "kind": "Pod",
                "metadata": {"name": "p", "labels": {"app": "web"}, "annotations": {NETNS_ANNOTATION: "/run/netns/p"}},
                "spec": {"nodeName": "n1", "serviceAccountName": "sa", "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
                "status": {"podIP": "10.0.0.1", "phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}
            })
        );
    }

    fn pod(resource_version: &str, status: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": resource_version},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "web"}]},
            "status": status
        }))
        .expect("a pod")
    }

    /// Kubelet writes a pod's status many times over its life (probes,
    /// restarts, container states); each one rebuilt the whole snapshot
    /// while the object kept a field that changes with every write.
    #[test]
    fn a_write_that_changes_nothing_the_agent_reads_is_not_a_change() {
        let kind = KINDS.iter().find(|k| k.kind == "Pod").expect("Pod");
        let mut store = Store::default();
        let running = serde_json::json!({"phase": "Running", "podIP": "10.1.1.5"});
        store.apply(kind, pod("1", running.clone()));
        assert_eq!(store.generation, 1);
        let mut restarted = running.clone();
        restarted["containerStatuses"] = serde_json::json!([{"name": "c", "restartCount": 3}]);
        store.apply(kind, pod("2", restarted));
        assert_eq!(
            store.generation, 1,
            "a new resourceVersion and container state"
        );
        let mut unready = running;
        unready["conditions"] = serde_json::json!([{"type": "Ready", "status": "False"}]);
        store.apply(kind, pod("3", unready));
        assert_eq!(store.generation, 2, "Ready is read");
        let Some(Object::Pod(kept)) = store.objects.values().next() else {
            panic!("the pod is kept");
        };
        assert_eq!(kept.ready, Some(false));
    }
}
