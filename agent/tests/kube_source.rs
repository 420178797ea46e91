//! The Kubernetes API source against a stand-in API server
//! (`fixtures/fake_apiserver.py`: the list and watch protocol with
//! resourceVersions, chunked watch streams, bookmarks, `410 Gone` after a
//! compaction, dropped watches, an outage, 404 for resources not installed).
//! No real kube-apiserver can be installed on this machine, so this is the
//! closest check of the watch logic; the objects are shaped as a real API
//! server returns them (managed fields, full pod specs and statuses).
//!
//! Adds, updates, deletes, a watch restart after 410 (with a delete it
//! never saw as an event), a refused object, and a long outage all end in
//! the right state, built by the same code the file source feeds.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use trellis_agent::state::{Snapshot, kube::KubeSource};

const SCRIPT: &str = include_str!("fixtures/fake_apiserver.py");

/// The fake API server, killed on drop.
struct FakeApiServer {
    child: Child,
    port: u16,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakeApiServer {
    fn start(plurals: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg(port.to_string())
            .args(plurals)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the fake API server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    fn control(&self, body: &Value) {
        let body = body.to_string();
        let out = Command::new("curl")
            .args(["-sf", "-m", "5", "-X", "POST", "-d", &body])
            .arg(format!("http://127.0.0.1:{}/__control", self.port))
            .output()
            .expect("curl");
        assert!(out.status.success(), "control {body}");
    }

    fn apply(&self, plural: &str, object: &Value) {
        self.control(&json!({"op": "apply", "plural": plural, "object": object}));
    }

    fn delete(&self, plural: &str, namespace: &str, name: &str) {
        self.control(
            &json!({"op": "delete", "plural": plural, "namespace": namespace, "name": name}),
        );
    }

    fn requests(&self) -> Vec<String> {
        let out = Command::new("curl")
            .args(["-sf", "-m", "5"])
            .arg(format!("http://127.0.0.1:{}/__log", self.port))
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).expect("log")
    }
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "uid": "5c1c8f0e-0000-4000-8000-000000000001",
            "labels": {"kubernetes.io/hostname": "node-a", "kubernetes.io/os": "linux"},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]},
        "spec": {"podCIDR": "10.1.1.0/24", "podCIDRs": ["10.1.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.255.0.1"}, {"type": "Hostname", "address": "node-a"}],
            "nodeInfo": {"kubeletVersion": "v1.34.1", "containerRuntimeVersion": "containerd://2.1.4", "architecture": "amd64",
                "bootID": "", "kernelVersion": "6.18.0", "kubeProxyVersion": "", "machineID": "", "operatingSystem": "linux",
                "osImage": "Debian", "systemUUID": ""}}
    })
}

fn namespace() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "trellis.dev/mesh": "enabled"}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
    })
}

fn pod(name: &str, ip: &str, version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "labels": {"app": "web", "version": version, "pod-template-hash": "7d9c5b"},
            "annotations": {"trellis.dev/netns": format!("/var/run/netns/{name}")},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c5b", "uid": "rs", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "serviceAccount": "web", "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30,
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "containers": [{"name": "web", "image": "ghcr.io/example/web:1.4.2", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "prod"}], "resources": {"requests": {"cpu": "100m"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]},
        "status": {"phase": "Running", "hostIP": "10.255.0.1", "podIP": ip, "podIPs": [{"ip": ip}],
            "qosClass": "Burstable", "startTime": "2026-11-20T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-20T10:00:03Z"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "ghcr.io/example/web:1.4.2",
                "imageID": "sha256:abc", "containerID": "containerd://def", "started": true,
                "state": {"running": {"startedAt": "2026-11-20T10:00:02Z"}}, "lastState": {}}]}
    })
}

fn service(port: i32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "svc-web"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "web"},
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": "http"}]},
        "status": {"loadBalancer": {}}
    })
}

/// Polls until `check` holds on a fresh snapshot, or fails with the last.
/// The deadline covers the watchers' longest backoff (30 s) after errors.
async fn until(source: &mut KubeSource, what: &str, check: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut last = None;
    loop {
        if let Some(objects) = source.poll() {
            let snapshot = Snapshot::build("node-a", &objects);
            if check(&snapshot) {
                return snapshot;
            }
            last = Some(objects.len());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached (last poll had {last:?} objects)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn backends(snapshot: &Snapshot) -> Vec<String> {
    let mut ips: Vec<String> = snapshot
        .local_workloads("node-a")
        .map(|w| w.name.clone())
        .collect();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_source_follows_lists_watches_410s_and_outages() {
    // Gateway API routes are not installed in this "cluster": 404.
    let server = FakeApiServer::start(&[]);
    server.apply("nodes", &node());
    server.apply("namespaces", &namespace());
    server.apply("pods", &pod("web-7d9c5b-aaaaa", "10.1.1.12", "v1"));
    server.apply("services", &service(80));

    let config = kube::Config::new(format!("http://127.0.0.1:{}", server.port).parse().unwrap());
    let mut source = KubeSource::connect(config, "trellis-system").expect("client");

    // The first list of every kind (routes: absent) gives the state.
    let snapshot = until(&mut source, "first list", |s| {
        s.node.is_some() && backends(s) == ["web-7d9c5b-aaaaa"] && s.service("shop/web").is_some()
    })
    .await;
    let w = snapshot.workload("shop/web-7d9c5b-aaaaa").expect("the pod");
    assert!(w.meshed, "in a mesh namespace");
    assert!(source.waiting_for().is_empty());

    // Watch events: an add, an update, a delete.
    server.apply("pods", &pod("web-7d9c5b-bbbbb", "10.1.1.13", "v2"));
    until(&mut source, "an added pod", |s| backends(s).len() == 2).await;
    server.apply("services", &service(8000));
    until(&mut source, "an updated service", |s| {
        s.service("shop/web")
            .is_some_and(|v| v.ports.iter().any(|p| p.port == 8000))
    })
    .await;
    server.delete("pods", "shop", "web-7d9c5b-aaaaa");
    until(&mut source, "a deleted pod", |s| {
        backends(s) == ["web-7d9c5b-bbbbb"]
    })
    .await;

    // A refused object: its last good version keeps serving.
    let mut broken = service(8000);
    broken["spec"]["ports"][0]["port"] = json!(0);
    server.apply("services", &broken);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(source.stats().rejected >= 1, "{:?}", source.stats());
    server.apply("pods", &pod("web-7d9c5b-ccccc", "10.1.1.14", "v2"));
    until(&mut source, "the last good service kept", |s| {
        backends(s).len() == 2
            && s.service("shop/web")
                .is_some_and(|v| v.ports.iter().any(|p| p.port == 8000))
    })
    .await;

    // Compaction: history is gone, every watch is cut; they come back with
    // an old resourceVersion, get 410 and relist. A pod deleted meanwhile
    // (its event compacted away) must go.
    server.control(&json!({"op": "compact"}));
    server.delete("pods", "shop", "web-7d9c5b-bbbbb");
    server.control(&json!({"op": "compact"}));
    until(&mut source, "the relist after 410", |s| {
        backends(s) == ["web-7d9c5b-ccccc"]
    })
    .await;

    // A long outage: nothing changes, the state is stale and says so.
    server.control(&json!({"op": "down"}));
    let deadline = Instant::now() + Duration::from_secs(30);
    let stale = loop {
        if let Some((for_, error)) = source.stale_for()
            && for_ > Duration::from_secs(3)
        {
            break error;
        }
        assert!(Instant::now() < deadline, "never stale");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!stale.is_empty());
    assert!(source.poll().is_none(), "an outage changes nothing");
    server.control(&json!({"op": "up"}));
    // A change made while the agent could not see it.
    server.apply("pods", &pod("web-7d9c5b-ddddd", "10.1.1.15", "v3"));
    until(&mut source, "caught up after the outage", |s| {
        backends(s) == ["web-7d9c5b-ccccc", "web-7d9c5b-ddddd"]
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(45);
    while source.stale_for().is_some() {
        assert!(Instant::now() < deadline, "still stale after recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The mesh configuration: the ConfigMap of the agent's namespace, not
    // one of the same name elsewhere; a broken one keeps the last good.
    let mesh = |namespace: &str, port: u16| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "trellis-mesh", "namespace": namespace},
               "data": {"mesh": format!("extensionProviders: [{{name: authz, \
                   envoyExtAuthzHttp: {{service: authz.auth.svc.cluster.local, port: {port}}}}}]")}})
    };
    server.apply("configmaps", &mesh("elsewhere", 1));
    server.apply("configmaps", &mesh("trellis-system", 8000));
    let port_of = |s: &Snapshot| s.providers.get("authz").and_then(|p| p.service.clone());
    until(&mut source, "the mesh configuration", |s| {
        port_of(s) == Some(("auth/authz".into(), 8000))
    })
    .await;
    server.apply("configmaps", &mesh("trellis-system", 0));
    server.apply("configmaps", &mesh("elsewhere", 2));
    server.apply("pods", &pod("web-7d9c5b-eeeee", "10.1.1.16", "v3"));
    let s = until(
        &mut source,
        "a pod after a broken mesh configuration",
        |s| backends(s).len() == 3,
    )
    .await;
    assert_eq!(
        port_of(&s),
        Some(("auth/authz".into(), 8000)),
        "the last good one"
    );

    // The protocol as a real client speaks it: lists, then watches from a
    // version with bookmarks, and the routes' 404s.
    let log = server.requests();
    assert!(
        log.iter()
            .any(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|r| r.starts_with("/api/v1/pods?")
            && r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")
            && r.contains("resourceVersion=")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|r| r.starts_with("/apis/gateway.networking.k8s.io/v1/httproutes"))
    );
    assert!(
        log.iter().any(
            |r| r.starts_with("/api/v1/namespaces/trellis-system/configmaps?")
                && r.contains("fieldSelector=metadata.name%3Dtrellis-mesh")
        ),
        "{log:?}"
    );
}
