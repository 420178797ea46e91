//! The lab described as Kubernetes objects, for the agent's config folder.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    Agent,
    lab::{Node, Pod},
};

/// `v1/Node` with the node's InternalIPs and pod CIDRs (dual stack).
pub fn node(node: &Node) -> String {
    let (net, len) = node.pod_cidr;
    let (net6, len6) = node.pod_cidr6;
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{}}}\n\
         spec: {{podCIDR: {net}/{len}, podCIDRs: [{net}/{len}, \"{net6}/{len6}\"]}}\n\
         status: {{addresses: [{{type: InternalIP, address: {}}}, {{type: InternalIP, address: \"{}\"}}]}}\n",
        node.name, node.ip, node.ip6
    )
}

/// `v1/Namespace`, in the mesh or not.
pub fn namespace(name: &str, meshed: bool) -> String {
    let mesh = if meshed {
        ", trellis.dev/mesh: enabled"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{kubernetes.io/metadata.name: {name}{mesh}}}}}\n"
    )
}

/// `v1/Pod` for a lab pod: labels as `k: v` pairs, container ports as
/// (name, port, protocol).
pub fn pod(
    pod: &Pod,
    namespace: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
    extra_status: &str,
) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p, proto)| format!("{{name: {n}, containerPort: {p}, protocol: {proto}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}, \
         annotations: {{trellis.dev/netns: /run/netns/{netns}}}}}\n\
         spec: {{nodeName: node-{node}, serviceAccountName: {name}, containers: [{{name: c, image: none, ports: [{ports}]}}]}}\n\
         status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]{extra_status}}}\n",
        name = pod.name,
        labels = labels.join(", "),
        netns = pod.netns,
        node = pod.node,
        ports = ports.join(", "),
        ip = pod.ip,
        ip6 = pod.ip6,
    )
}

/// `v1/Service` with one TCP port.
pub fn service(
    namespace: &str,
    name: &str,
    vip: &str,
    port: u16,
    target: &str,
    selector: &[(&str, &str)],
) -> String {
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{clusterIP: {vip}, selector: {{{}}}, ports: [{{name: p{port}, port: {port}, targetPort: {target}}}]}}\n",
        selector.join(", ")
    )
}

/// `v1/Service` with one TCP port that declares its `appProtocol`.
pub fn service_with_protocol(
    namespace: &str,
    name: &str,
    vip: &str,
    port: u16,
    target: &str,
    app_protocol: &str,
    selector: &[(&str, &str)],
) -> String {
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{clusterIP: {vip}, selector: {{{}}}, ports: [{{name: p{port}, port: {port}, targetPort: {target}, appProtocol: {app_protocol}}}]}}\n",
        selector.join(", ")
    )
}

/// `v1/Service` with one VIP per family (`RequireDualStack`) and one TCP port.
pub fn dual_stack_service(
    namespace: &str,
    name: &str,
    vips: [&str; 2],
    port: u16,
    target: &str,
    selector: &[(&str, &str)],
) -> String {
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{clusterIP: \"{v4}\", clusterIPs: [\"{v4}\", \"{v6}\"], ipFamilies: [IPv4, IPv6], \
         ipFamilyPolicy: RequireDualStack, selector: {{{sel}}}, ports: [{{name: p{port}, port: {port}, targetPort: {target}}}]}}\n",
        v4 = vips[0],
        v6 = vips[1],
        sel = selector.join(", ")
    )
}

/// `trellis.dev/v1alpha1/AuthorizationPolicy` with `spec` in YAML flow style.
pub fn authorization_policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

/// `trellis.dev/v1alpha1/TrafficPolicy` for Service `service`, with the
/// rest of `spec` in YAML flow style (without braces).
pub fn traffic_policy(namespace: &str, service: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {{name: {service}, namespace: {namespace}}}\n\
         spec: {{targetRefs: [{{kind: Service, name: {service}}}], {spec}}}\n"
    )
}

/// `networking.k8s.io/v1/NetworkPolicy` with `spec` in YAML flow style.
pub fn network_policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

/// Joins documents into one multi-document file.
/// A Trellis `PeerAuthentication` with `spec` (YAML flow mapping).
pub fn peer_authentication(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

/// `trellis.dev/v1alpha1` Telemetry with `spec` (flow-style YAML).
pub fn telemetry(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Telemetry\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

pub fn docs(docs: &[String]) -> String {
    docs.join("---\n")
}

/// Replaces `path` at once, as an issuer or a mounted volume does: written
/// beside it under a hidden name (which pollers skip), then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a file name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A config folder, removed on drop; files are replaced atomically (rename),
/// as `kubectl`-style tools and ConfigMap mounts do.
pub struct ConfigDir {
    path: PathBuf,
}

impl ConfigDir {
    pub fn new(lab: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{lab}-config"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        write_atomic(&self.path.join(name), text.as_bytes())
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.path.join(name))?)
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One root CA for every node of a lab (`trellis ca init`), as a mounted
/// Secret would be; removed on drop.
pub struct SharedCa {
    path: PathBuf,
}

impl SharedCa {
    pub fn new(lab: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{lab}-ca"));
        let _ = std::fs::remove_dir_all(&path);
        trellis_agent::identity::ca::Ca::init(&path, "cluster.local")?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for SharedCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where the agents of a [`Cluster`] get certificates.
pub enum Certs<'a> {
    /// The built-in CA, from one shared `--ca-dir`.
    SharedCa,
    /// An external issuer's folder per node (`--cert-dir`), in node order.
    Files(&'a [&'a Path]),
}

/// The set-up of every cross-node test: one shared root, the config folder
/// holding `docs`, and an agent on each of `nodes`, started and ready (in
/// the order of `nodes`). Agents stop before the folders go.
pub struct Cluster {
    pub agents: Vec<Agent>,
    config: ConfigDir,
    ca: SharedCa,
}

impl Cluster {
    pub fn start(lab: &str, nodes: &[&Node], docs: &[String]) -> anyhow::Result<Self> {
        Self::start_with(lab, nodes, docs, Certs::SharedCa, &[])
    }

    /// [`Cluster::start`], choosing where certificates come from and adding
    /// `extra` arguments to every agent.
    pub fn start_with(
        lab: &str,
        nodes: &[&Node],
        docs: &[String],
        certs: Certs<'_>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let ca = SharedCa::new(lab)?;
        let config = ConfigDir::new(lab)?;
        config.write("mesh.yaml", &self::docs(docs))?;
        let dir = config
            .path()
            .to_str()
            .expect("temp paths are UTF-8")
            .to_owned();
        let mut agents = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let (flag, certs_dir) = match &certs {
                Certs::SharedCa => ("--ca-dir", ca.path()),
                Certs::Files(dirs) => (
                    "--cert-dir",
                    dirs[i].to_str().expect("temp paths are UTF-8"),
                ),
            };
            let mut args = vec!["--config-dir", &dir, flag, certs_dir];
            args.extend_from_slice(extra);
            let mut agent = Agent::start(node, &args)?;
            agent.wait_ready(Duration::from_secs(30))?;
            agents.push(agent);
        }
        Ok(Self { agents, config, ca })
    }

    pub fn ca(&self) -> &SharedCa {
        &self.ca
    }

    /// Replaces agent `i` (on `node`) with a new one started with `extra`
    /// (the shared CA's clusters only); it adopts the pinned programs.
    pub fn restart(&mut self, i: usize, node: &Node, extra: &[&str]) -> anyhow::Result<()> {
        self.agents[i].terminate()?;
        let dir = self
            .config
            .path()
            .to_str()
            .expect("temp paths are UTF-8")
            .to_owned();
        let mut args = vec!["--config-dir", &dir, "--ca-dir", self.ca.path()];
        args.extend_from_slice(extra);
        let mut agent = Agent::start(node, &args)?;
        agent.wait_ready(Duration::from_secs(30))?;
        self.agents[i] = agent;
        Ok(())
    }

    /// The config folder every agent reads.
    pub fn config(&self) -> &ConfigDir {
        &self.config
    }

    /// Writes `policies` as `netpol.yaml` (removes it when there are none)
    /// and waits until every agent has applied them: the network policy
    /// fingerprint in its `/status` moved.
    pub fn apply_network_policies(&self, policies: &[String]) -> anyhow::Result<()> {
        let fingerprints = || -> anyhow::Result<Vec<serde_json::Value>> {
            self.agents
                .iter()
                .map(|a| Ok(a.cli_json("status")?["policy"]["fingerprint"].clone()))
                .collect()
        };
        let before = fingerprints()?;
        if policies.is_empty() {
            let _ = self.config.remove("netpol.yaml");
        } else {
            self.config.write("netpol.yaml", &docs(policies))?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = fingerprints()?;
            if now.iter().zip(&before).all(|(n, b)| n != b) {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "agents did not apply the policies: {before:?} → {now:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
