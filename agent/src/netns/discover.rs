//! Finding a local pod's network namespace on a real node, where nothing
//! names it: from the pod's UID to its cgroup, from the cgroup to one of its
//! processes, and from that process to `/proc/<pid>/ns/net`.
//!
//! Kubelet puts every container of a pod under a cgroup named after the
//! pod's UID, with either cgroup driver: `kubepods-<qos>-pod<uid with _>.slice`
//! (systemd) or `pod<uid>` (cgroupfs), on v2, v1 or hybrid hosts alike. The
//! agent reads `<proc>/<pid>/cgroup` of each process and matches those
//! names. It reads the processes' own view rather than each cgroup's
//! `cgroup.procs` because the agent runs in a pid namespace of its own (the
//! DaemonSet mounts the host's `/proc` instead of using `hostPID`), and
//! `cgroup.procs` shows processes of other pid namespaces as 0. Every
//! process of a pod but a host-network one shares the pod's namespace; the
//! oldest (lowest pid, the sandbox's pause process) is taken.
//!
//! A chained CNI plugin (istio-cni's way) would learn the namespace at pod
//! creation without a scan; this way needs nothing installed on the node
//! beyond the agent, and finds pods that started before it. The scan runs
//! only while some local pod is unresolved.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::state::Workload;

/// The cgroup names kubelet gives a pod, under either driver.
fn pod_cgroup_names(uid: &str) -> [String; 2] {
    [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))]
}

/// Whether a `/proc/<pid>/cgroup` text puts the process in the pod `uid`:
/// some hierarchy's path has a component `pod<uid>` (cgroupfs) or ending in
/// `-pod<uid_>.slice` (systemd).
pub fn in_pod(cgroup_file: &str, uid: &str) -> bool {
    let [plain, systemd] = pod_cgroup_names(uid);
    let systemd = format!("-{systemd}.slice");
    cgroup_file.lines().any(|line| {
        // hierarchy-id:controllers:path
        let path = line.splitn(3, ':').nth(2).unwrap_or_default();
        path.split('/')
            .any(|part| part == plain || part.ends_with(&systemd))
    })
}

/// Finds network namespaces of pods by UID through a `/proc`.
#[derive(Clone, Debug)]
pub struct Locator {
    proc_root: PathBuf,
}

impl Locator {
    /// `proc_root` is the host's `/proc` (mounted at `/host/proc` in the
    /// DaemonSet).
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }

    /// For each of `uids`, the `ns/net` path of its oldest process, one
    /// pass over the processes for all of them. UIDs with no process are
    /// left out.
    pub fn locate(&self, uids: &[&str]) -> io::Result<BTreeMap<String, PathBuf>> {
        let mut pids: Vec<u32> = std::fs::read_dir(&self.proc_root)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut found = BTreeMap::new();
        for pid in pids {
            if found.len() == uids.len() {
                break;
            }
            // A process may end between the listing and the read.
            let Ok(text) = std::fs::read_to_string(self.proc_root.join(format!("{pid}/cgroup")))
            else {
                continue;
            };
            for uid in uids {
                if !found.contains_key(*uid) && in_pod(&text, uid) {
                    found.insert((*uid).to_owned(), self.netns_of(pid));
                }
            }
        }
        Ok(found)
    }

    /// The path of a process's network namespace.
    pub fn netns_of(&self, pid: u32) -> PathBuf {
        self.proc_root.join(format!("{pid}/ns/net"))
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }
}

/// Gives local workloads without a netns path (no `trellis.dev/netns`
/// annotation) the one their processes show, remembering each answer while
/// its process lives.
#[derive(Debug)]
pub struct Resolver {
    locator: Locator,
    known: BTreeMap<String, PathBuf>,
}

impl Resolver {
    pub fn new(locator: Locator) -> Self {
        Self {
            locator,
            known: BTreeMap::new(),
        }
    }

    /// Whether a remembered process has gone (or its pid now belongs to
    /// another process): the workloads need filling in again.
    pub fn stale(&self) -> bool {
        self.known
            .iter()
            .any(|(uid, path)| !still_in_pod(path, uid))
    }

    /// Fills in `netns` for this node's workloads that have a UID and no
    /// path; returns the IDs of those still without one (no process yet).
    pub fn fill(&mut self, node: &str, workloads: &mut [Arc<Workload>]) -> Vec<String> {
        let wanted: Vec<usize> = workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| w.node == node && w.netns.is_none() && !w.uid.is_empty())
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        self.known.retain(|uid, path| still_in_pod(path, uid));
        let missing: Vec<&str> = wanted
            .iter()
            .map(|&i| workloads[i].uid.as_str())
            .filter(|uid| !self.known.contains_key(*uid))
            .collect();
        if !missing.is_empty() {
            match self.locator.locate(&missing) {
                Ok(found) => {
                    for (uid, path) in found {
                        tracing::debug!(%uid, netns = %path.display(), "found a pod's network namespace through its cgroup");
                        self.known.insert(uid, path);
                    }
                }
                Err(e) => tracing::warn!(
                    proc = %self.locator.proc_root().display(),
                    error = %e,
                    "cannot read the host's processes to find pods' network namespaces (is --proc-root the host's /proc?)"
                ),
            }
        }
        let live: std::collections::BTreeSet<&str> =
            workloads.iter().map(|w| w.uid.as_str()).collect();
        self.known.retain(|uid, _| live.contains(uid.as_str()));
        let mut unresolved = Vec::new();
        for i in wanted {
            let w = &mut workloads[i];
            match self.known.get(&w.uid) {
                // A copy of this one workload: the last snapshot and the
                // build's memo share the one without.
                Some(path) => Arc::make_mut(w).netns = Some(path.clone()),
                None => unresolved.push(w.id()),
            }
        }
        unresolved
    }
}

/// Whether the process of a `<proc>/<pid>/ns/net` path still lives in the
/// pod `uid` (pids are reused).
fn still_in_pod(netns: &Path, uid: &str) -> bool {
    netns
        .parent()
        .map(|ns| ns.with_file_name("cgroup"))
        .and_then(|c| std::fs::read_to_string(c).ok())
        .is_some_and(|text| in_pod(&text, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10";

    #[test]
    fn pod_cgroups_of_both_drivers_and_layouts() {
        // cgroup v2, systemd driver, a burstable pod's container.
        let systemd_v2 = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f2b6c1e_8a7d_4b1e_9c3f_0d2e4a6b8c10.slice/cri-containerd-4c1a.scope\n";
        // Guaranteed pods have no QoS level in between.
        let systemd_guaranteed = "0::/kubepods.slice/kubepods-pod5f2b6c1e_8a7d_4b1e_9c3f_0d2e4a6b8c10.slice/crio-9e.scope\n";
        // cgroup v2, cgroupfs driver.
        let cgroupfs_v2 = "0::/kubepods/besteffort/pod5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10/4c1a\n";
        // Hybrid: v1 controllers carry the pod, the v2 line does not.
        let hybrid = "12:pids:/kubepods/burstable/pod5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10/4c1a\n\
                      11:memory:/kubepods/burstable/pod5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10/4c1a\n\
                      0::/system.slice/containerd.service\n";
        // Read from inside another cgroup namespace: paths climb out with `..`.
        let from_a_container = "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod5f2b6c1e_8a7d_4b1e_9c3f_0d2e4a6b8c10.slice/cri-containerd-4c1a.scope\n";
        for text in [
            systemd_v2,
            systemd_guaranteed,
            cgroupfs_v2,
            hybrid,
            from_a_container,
        ] {
            assert!(in_pod(text, UID), "{text}");
        }
        // Other pods, and names that only contain the UID, do not match.
        let other = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod11111111_8a7d_4b1e_9c3f_0d2e4a6b8c10.slice/x.scope\n";
        let lookalike = "0::/kubepods/besteffort/pod5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10-old/x\n";
        let host = "0::/system.slice/kubelet.service\n";
        for text in [other, lookalike, host] {
            assert!(!in_pod(text, UID), "{text}");
        }
    }

    #[test]
    fn locates_through_a_proc_folder() {
        let dir = std::env::temp_dir().join(format!("trellis-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let write = |pid: u32, cgroup: &str| {
            std::fs::create_dir_all(dir.join(pid.to_string())).expect("mkdir");
            std::fs::write(dir.join(format!("{pid}/cgroup")), cgroup).expect("write");
        };
        write(1, "0::/init.scope\n");
        write(
            900,
            "0::/kubepods/burstable/pod5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10/app\n",
        );
        write(
            45,
            "0::/kubepods/burstable/pod5f2b6c1e-8a7d-4b1e-9c3f-0d2e4a6b8c10/pause\n",
        );
        std::fs::create_dir_all(dir.join("self")).expect("mkdir");
        let locator = Locator::new(&dir);
        let found = locator.locate(&[UID, "missing"]).expect("locate");
        // The oldest process of the pod, and nothing for a pod with none.
        assert_eq!(found.get(UID), Some(&dir.join("45/ns/net")));
        assert_eq!(found.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
