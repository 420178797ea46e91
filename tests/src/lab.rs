//! Labs, nodes and pods.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    process::{ChildGuard, Exec},
    sys::{self, ip},
};

const PREFIX: &str = "trl-";
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// One test's world of namespaces, veth pairs, cgroups and bpffs folders.
/// Dropping it removes all of them.
pub struct Lab {
    /// `trl-<pid>-<n>`: prefixes every namespace, cgroup and bpffs folder.
    name: String,
    /// Compact form for interface names (15 bytes at most).
    short: String,
    test: String,
    cgroup_root: PathBuf,
    bpffs_root: PathBuf,
    fabric: String,
    nodes: Vec<Node>,
    pods: usize,
}

/// A node: a network namespace on the fabric bridge, with a pod CIDR, a
/// cgroup root for its pods and a bpffs folder for its agent.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: String,
    /// The node's address on the fabric (its InternalIP).
    pub ip: Ipv4Addr,
    /// Its IPv6 InternalIP: fd00:255::<index>.
    pub ip6: Ipv6Addr,
    /// The pods' /24: 10.1.<index>.0.
    pub pod_cidr: (Ipv4Addr, u8),
    /// The pods' /64: fd01:<index>::.
    pub pod_cidr6: (Ipv6Addr, u8),
    pub cgroup_root: PathBuf,
    pub bpffs: PathBuf,
}

/// A pod: a network namespace with a veth to its node and a cgroup folder
/// under the node's cgroup root.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address: fd01:<node index>::<10 + n>.
    pub ip6: Ipv6Addr,
    /// The node-side end of the pod's veth.
    pub host_if: String,
    pub cgroup: PathBuf,
}

impl Lab {
    /// Makes an empty lab named after the test; sweeps labs of dead test processes first.
    pub fn new(test: &str) -> anyhow::Result<Self> {
        crate::require_privileges();
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid:x}-{n:02x}");
        let short = format!("{pid:x}{n:02x}");
        let cgroup_root = sys::cgroup2_root()?.join(&name);
        let bpffs_root = sys::bpffs_root()?.join(&name);
        std::fs::create_dir_all(&cgroup_root)
            .with_context(|| format!("creating {}", cgroup_root.display()))?;
        let fabric = format!("{name}-fab");
        let lab = Self {
            name,
            short,
            test: test.into(),
            cgroup_root,
            bpffs_root,
            fabric,
            nodes: Vec::new(),
            pods: 0,
        };
        ip(&["netns", "add", &lab.fabric])?;
        ip(&["-n", &lab.fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lab.fabric, "link", "set", "br0", "up"])?;
        eprintln!("lab {} for test {}", lab.name, lab.test);
        Ok(lab)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a node; the first is 10.255.0.1 with pods in 10.1.1.0/24, and so on.
    pub fn add_node(&mut self, name: &str) -> anyhow::Result<Node> {
        let index = u8::try_from(self.nodes.len() + 1).context("too many nodes")?;
        let netns = format!("{}-node-{name}", self.name);
        let node = Node {
            name: name.into(),
            index,
            netns: netns.clone(),
            ip: Ipv4Addr::new(10, 255, 0, index),
            ip6: Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, u16::from(index)),
            pod_cidr: (Ipv4Addr::new(10, 1, index, 0), 24),
            pod_cidr6: (
                Ipv6Addr::new(0xfd01, u16::from(index), 0, 0, 0, 0, 0, 0),
                64,
            ),
            cgroup_root: self.cgroup_root.join(format!("node-{name}")),
            bpffs: self.bpffs_root.join(format!("node-{name}")),
        };
        std::fs::create_dir_all(&node.cgroup_root)?;
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let uplink = self.ifname('f', name)?;
        ip(&[
            "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["link", "set", &uplink, "netns", &self.fabric])?;
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "set",
            &uplink,
            "master",
            "br0",
            "up",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", node.ip),
            "dev",
            "eth0",
        ])?;
        // No duplicate address detection: addresses are usable at once.
        node.exec().run(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.eth0.accept_dad=0",
            ],
        )?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/64", node.ip6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        for other in &self.nodes {
            route_pods_via(&node, other)?;
            route_pods_via(other, &node)?;
        }
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Adds a pod to `node`, at 10.1.<node index>.<10 + n>.
    pub fn add_pod(&mut self, node: &Node, name: &str) -> anyhow::Result<Pod> {
        self.pods += 1;
        let host_octet = u8::try_from(10 + self.pods).context("too many pods")?;
        let (net, _) = node.pod_cidr;
        let pod_ip = Ipv4Addr::new(
            net.octets()[0],
            net.octets()[1],
            net.octets()[2],
            host_octet,
        );
        let netns = format!("{}-{name}", self.name);
        let host_if = self.ifname('v', name)?;
        let (net6, _) = node.pod_cidr6;
        let mut segments = net6.segments();
        segments[7] = u16::from(host_octet);
        let pod_ip6 = Ipv6Addr::from(segments);
        let pod = Pod {
            name: name.into(),
            node: node.name.clone(),
            netns: netns.clone(),
            ip: pod_ip,
            ip6: pod_ip6,
            host_if: host_if.clone(),
            cgroup: node.cgroup_root.join(name),
        };
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["link", "set", &host_if, "netns", &node.netns])?;
        node.exec().run(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{host_if}.accept_dad=0")],
        )?;
        ip(&["-n", &node.netns, "link", "set", &host_if, "up"])?;
        // IPv6 gateway: fe80::1 on every pod's host side.
        ip(&[
            "-n",
            &node.netns,
            "addr",
            "add",
            "fe80::1/64",
            "dev",
            &host_if,
            "nodad",
        ])?;
        ip(&[
            "-n",
            &node.netns,
            "route",
            "add",
            &format!("{pod_ip6}/128"),
            "dev",
            &host_if,
        ])?;
        // The pod's gateway: a link-local address on every pod's host side,
        // as Calico and Cilium do.
        ip(&[
            "-n",
            &node.netns,
            "addr",
            "add",
            "169.254.1.1/32",
            "dev",
            &host_if,
        ])?;
        ip(&[
            "-n",
            &node.netns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &host_if,
        ])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Exec::new(netns_path(&netns), None).run(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.eth0.accept_dad=0",
            ],
        )?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n", &netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        std::fs::create_dir_all(&pod.cgroup)?;
        Ok(pod)
    }

    fn ifname(&self, kind: char, name: &str) -> anyhow::Result<String> {
        let ifname = format!("{kind}{}{name}", self.short);
        if ifname.len() > 15 {
            bail!("interface name {ifname} is over 15 bytes: use a shorter node or pod name");
        }
        Ok(ifname)
    }
}

fn route_pods_via(from: &Node, to: &Node) -> anyhow::Result<()> {
    let (net, len) = to.pod_cidr;
    ip(&[
        "-n",
        &from.netns,
        "route",
        "add",
        &format!("{net}/{len}"),
        "via",
        &to.ip.to_string(),
    ])?;
    let (net6, len6) = to.pod_cidr6;
    ip(&[
        "-n",
        &from.netns,
        "-6",
        "route",
        "add",
        &format!("{net6}/{len6}"),
        "via",
        &to.ip6.to_string(),
    ])
    .map(drop)
}

impl Node {
    /// Runs processes in the node's network namespace (not under the cgroup root).
    pub fn exec(&self) -> Exec {
        Exec::new(netns_path(&self.netns), None)
    }

    /// `/healthz/ready` of the node's agent, from the node's namespace:
    /// (HTTP status, JSON body; `Null` when it is not JSON).
    pub fn readiness(&self) -> (String, serde_json::Value) {
        let url = format!("http://{}:15021/healthz/ready", self.ip);
        let text = self
            .exec()
            .curl(&["-m", "2", "-w", "\n%{http_code}", &url])
            .unwrap_or_default();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        (
            code.to_owned(),
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl Pod {
    /// Runs processes in the pod: its cgroup, then its network namespace.
    pub fn exec(&self) -> Exec {
        Exec::new(netns_path(&self.netns), Some(self.cgroup.clone()))
    }

    /// Starts a Python server (`python3 -c SCRIPT args...`) in the pod and
    /// waits until it accepts connections on the pod's address at `port`.
    pub fn serve(&self, script: &str, args: &[&str], port: u16) -> anyhow::Result<ChildGuard> {
        let server = self.exec().python(script, args)?;
        self.exec()
            .wait_port(&self.ip.to_string(), port, Duration::from_secs(20))
            .with_context(|| format!("a server in pod {}", self.name))?;
        Ok(server)
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

impl Drop for Lab {
    fn drop(&mut self) {
        remove_lab(&self.name, &self.cgroup_root, &self.bpffs_root);
    }
}

fn remove_lab(name: &str, cgroup_root: &Path, bpffs_root: &Path) {
    // Processes first (in the cgroups and in the namespaces), then namespaces
    // (deleting one deletes its veth ends), then cgroups and pins.
    sys::remove_cgroup_tree(cgroup_root);
    for ns in netns_list()
        .into_iter()
        .filter(|ns| ns.starts_with(&format!("{name}-")))
    {
        if let Ok(pids) = ip(&["netns", "pids", &ns]) {
            for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a pid the kernel says lives in our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for _ in 0..20 {
            if ip(&["netns", "del", &ns]).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if let Ok(entries) = std::fs::read_dir(bpffs_root) {
        for e in entries.flatten() {
            let _ = trellis_agent::bpf::uninstall(&e.path());
        }
    }
    let _ = std::fs::remove_dir(bpffs_root);
}

fn netns_list() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Removes labs whose test process is gone (killed before its guards ran).
fn sweep_stale() {
    let dead = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(3, '-');
        let pid = u32::from_str_radix(parts.next()?, 16).ok()?;
        let n = parts.next()?;
        (!sys::pid_alive(pid)).then(|| format!("{PREFIX}{pid:x}-{n}"))
    };
    let mut labs: Vec<String> = netns_list().iter().filter_map(|ns| dead(ns)).collect();
    for root in [sys::cgroup2_root().ok(), sys::bpffs_root().ok()]
        .into_iter()
        .flatten()
    {
        if let Ok(entries) = std::fs::read_dir(&root) {
            labs.extend(
                entries
                    .flatten()
                    .filter_map(|e| dead(&e.file_name().to_string_lossy())),
            );
        }
    }
    labs.sort();
    labs.dedup();
    for lab in labs {
        eprintln!("sweeping lab {lab} left by a dead test process");
        let cg = sys::cgroup2_root()
            .map(|r| r.join(&lab))
            .unwrap_or_default();
        let bpf = sys::bpffs_root().map(|r| r.join(&lab)).unwrap_or_default();
        remove_lab(&lab, &cg, &bpf);
    }
}
