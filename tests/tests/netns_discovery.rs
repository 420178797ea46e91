//! Local pods found without the `trellis.dev/netns` annotation, as on a real
//! node: each pod's "sandbox" is a real process in the pod's network
//! namespace, moved into a kubepods-style cgroup named after the pod's UID,
//! one pod per layout: the systemd driver and the cgroupfs driver on cgroup
//! v2, and the cgroupfs driver on a v1 hierarchy (a hybrid host). The agent
//! must find each pod's namespace (its netns cookie in the endpoints), capture
//! the pods' connections (only endpoints are captured), pick up a pod whose
//! process appears after the pod object, and let go of one whose process
//! goes away.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use trellis_tests::{Lab, Pod, mesh, mesh::Cluster, process::ChildGuard, py};

/// A pod object with a UID and no netns annotation.
fn pod_object(pod: &Pod, uid: &str, labels: &[(&str, &str)]) -> String {
    let annotated = mesh::pod(pod, "shop", labels, &[("http", 8080, "TCP")], "");
    let annotation = format!(
        "annotations: {{trellis.dev/netns: /run/netns/{}}}",
        pod.netns
    );
    assert!(annotated.contains(&annotation), "{annotated}");
    annotated.replace(&annotation, &format!("uid: {uid}"))
}

/// A v1 hierarchy's mount (a controller hierarchy of a hybrid host).
fn cgroup_v1_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let (fstype, options) = (post.next()?, post.nth(1)?);
        let mount_point = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup" && options.split(',').any(|o| o == "pids"))
            .then(|| PathBuf::from(mount_point))
    })
}

/// A sandbox process in `pod`'s namespace, moved into `cgroup` (made with
/// its parents); the folders it made go with it.
struct Sandbox {
    child: ChildGuard,
    made: Vec<PathBuf>,
}

impl Sandbox {
    fn start(pod: &Pod, cgroup: &Path) -> Self {
        let mut made = Vec::new();
        for dir in cgroup.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if !dir.exists() {
                std::fs::create_dir(dir).expect("cgroup folder");
                made.push(dir.to_owned());
            }
        }
        let mut cmd = pod.exec().command("sleep").expect("sleep");
        cmd.arg("600");
        let child = ChildGuard::spawn(&mut cmd).expect("sandbox");
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
            .expect("moving the sandbox into its pod cgroup");
        Self { child, made }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self
            .child
            .signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
        for dir in self.made.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Waits for `check` (the agent looks for pods each second).
fn eventually(what: &str, check: impl Fn() -> bool) {
    trellis_tests::eventually(what, Duration::from_secs(20), check);
}

#[test]
fn local_pods_are_found_through_their_cgroups() {
    let mut lab = Lab::new("netns_discovery").expect("lab");
    let a = lab.add_node("a").expect("node");
    let systemd = lab.add_pod(&a, "a1").expect("pod");
    let cgroupfs = lab.add_pod(&a, "a2").expect("pod");
    let hybrid = lab.add_pod(&a, "a3").expect("pod");
    let late = lab.add_pod(&a, "a4").expect("pod");
    let uid = |n: u8| format!("6e1c5a3b-9d2f-4c1e-8b7a-00000000000{n}");

    // The node's cgroup root is on the v2 mount, like the kubepods cgroup;
    // the v1 layout goes on the pids hierarchy, in a folder of this lab's.
    let v2 = &a.cgroup_root;
    let v1 = cgroup_v1_mount()
        .expect("this machine is a hybrid host: a v1 pids hierarchy is mounted")
        .join(lab.name());
    let systemd_cgroup = v2
        .join("kubepods.slice/kubepods-burstable.slice")
        .join(format!(
            "kubepods-burstable-pod{}.slice",
            uid(1).replace('-', "_")
        ))
        .join("cri-containerd-4c1a9e.scope");
    let cgroupfs_cgroup = v2
        .join("kubepods/besteffort")
        .join(format!("pod{}", uid(2)))
        .join("7b3d0f");
    let hybrid_cgroup = v1
        .join("kubepods/burstable")
        .join(format!("pod{}", uid(3)))
        .join("e5a2c8");
    let sandboxes = [
        Sandbox::start(&systemd, &systemd_cgroup),
        Sandbox::start(&cgroupfs, &cgroupfs_cgroup),
        Sandbox::start(&hybrid, &hybrid_cgroup),
    ];
    let _web = cgroupfs
        .serve(py::NAME_SERVER, &["web", "8080"], 8080)
        .expect("server");

    let docs = vec![
        mesh::node(&a),
        mesh::namespace("shop", true),
        pod_object(&systemd, &uid(1), &[("app", "client")]),
        pod_object(&cgroupfs, &uid(2), &[("app", "web")]),
        pod_object(&hybrid, &uid(3), &[("app", "client")]),
        pod_object(&late, &uid(4), &[("app", "client")]),
        mesh::service("shop", "web", "10.96.0.60", 80, "8080", &[("app", "web")]),
    ];
    let cluster = Cluster::start(lab.name(), &[&a], &docs).expect("agent");
    let agent = &cluster.agents[0];

    let cookie = |pod: &Pod| {
        trellis_agent::netns::netns_cookie(&Path::new("/run/netns").join(&pod.netns))
            .expect("cookie")
    };
    let endpoints = || {
        let doc = agent.cli_json("workloads").expect("workloads");
        doc["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["workload"].as_str().unwrap_or_default().to_owned(),
                    e["netns_cookie"].as_u64().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    let has = |pod: &Pod| endpoints().contains(&(format!("shop/{}", pod.name), cookie(pod)));
    eventually("the three pods' namespaces found", || {
        has(&systemd) && has(&cgroupfs) && has(&hybrid)
    });
    assert!(
        !endpoints().iter().any(|(w, _)| w == "shop/a4"),
        "a pod with no process yet is no endpoint: {:?}",
        endpoints()
    );
    assert!(
        agent.log_text().contains("no process yet"),
        "the unresolved pod is reported"
    );

    // Found pods are captured: a client found through each layout reaches
    // the Service through the agent (an unknown netns would go direct to a
    // VIP nobody serves).
    let call = |pod: &Pod| {
        pod.exec()
            .output(
                "curl",
                &["-s", "-m", "3", "http://10.96.0.60/"],
                Duration::from_secs(10),
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    assert_eq!(call(&systemd), "web");
    assert_eq!(call(&hybrid), "web");

    // The late pod's sandbox appears: found on the agent's next look.
    let late_sandbox = Sandbox::start(
        &late,
        &v2.join("kubepods.slice")
            .join(format!("kubepods-pod{}.slice", uid(4).replace('-', "_")))
            .join("crio-55aa.scope"),
    );
    eventually("the late pod found once its process exists", || has(&late));
    assert_eq!(call(&late), "web");

    // Its process goes: the pod's namespace is no longer known (a stale
    // /proc path is never kept).
    drop(late_sandbox);
    eventually("a pod whose process is gone is no endpoint", || {
        !endpoints().iter().any(|(w, _)| w == "shop/a4")
    });
    drop(sandboxes);
}
