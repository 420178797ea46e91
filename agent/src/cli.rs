//! The `trellis` command line: the agent and the commands that inspect it.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::LogFormat;

/// Environment variables, one per agent setting (the interface contract).
pub mod env {
    pub const NODE: &str = "TRELLIS_NODE";
    pub const CONFIG_DIR: &str = "TRELLIS_CONFIG_DIR";
    pub const KUBERNETES: &str = "TRELLIS_KUBERNETES";
    pub const KUBECONFIG: &str = "KUBECONFIG";
    pub const CGROUP_ROOT: &str = "TRELLIS_CGROUP_ROOT";
    pub const PROC_ROOT: &str = "TRELLIS_PROC_ROOT";
    pub const BPFFS: &str = "TRELLIS_BPFFS";
    pub const CA_DIR: &str = "TRELLIS_CA_DIR";
    pub const CERT_DIR: &str = "TRELLIS_CERT_DIR";
    pub const WORKER_THREADS: &str = "TRELLIS_WORKER_THREADS";
    pub const BUSY_POLL_US: &str = "TRELLIS_BUSY_POLL_US";
    pub const TRUST_DOMAIN: &str = "TRELLIS_TRUST_DOMAIN";
    pub const MESH_NAMESPACE: &str = "TRELLIS_MESH_NAMESPACE";
    pub const LOG_LEVEL: &str = "TRELLIS_LOG_LEVEL";
    pub const LOG_FORMAT: &str = "TRELLIS_LOG_FORMAT";
    pub const READINESS_ADDR: &str = "TRELLIS_READINESS_ADDR";
    pub const ADMIN_ADDR: &str = "TRELLIS_ADMIN_ADDR";
    pub const METRICS_ADDR: &str = "TRELLIS_METRICS_ADDR";
    pub const ACCESS_LOG_SAMPLE: &str = "TRELLIS_ACCESS_LOG_SAMPLE";
    pub const METRICS: &str = "TRELLIS_METRICS";
    /// OpenTelemetry's own variable names, so a collector set up for other
    /// exporters needs nothing new.
    pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    pub const OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    pub const TRACE_SAMPLING: &str = "TRELLIS_TRACE_SAMPLING";
    pub const SK_MSG: &str = "TRELLIS_SK_MSG";
    pub const SPLICE: &str = "TRELLIS_SPLICE";
    pub const CONNECT_TIMEOUT: &str = "TRELLIS_CONNECT_TIMEOUT";
    pub const PROTOCOL_DETECT_TIMEOUT: &str = "TRELLIS_PROTOCOL_DETECT_TIMEOUT";
    pub const IDLE_TIMEOUT: &str = "TRELLIS_IDLE_TIMEOUT";
    pub const MAP_RESYNC: &str = "TRELLIS_MAP_RESYNC";
    pub const HBONE_KEEPALIVE_INTERVAL: &str = "TRELLIS_HBONE_KEEPALIVE_INTERVAL";
    pub const HBONE_KEEPALIVE_TIMEOUT: &str = "TRELLIS_HBONE_KEEPALIVE_TIMEOUT";
    pub const CERT_LIFETIME: &str = "TRELLIS_CERT_LIFETIME";
}

/// Trellis: a sidecarless, eBPF-accelerated service mesh.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (or, with --uninstall, remove what it pinned and attached).
    Agent(Box<AgentArgs>),
    /// Decode the kernel maps pinned under an agent's bpffs folder.
    Maps(MapsArgs),
    /// What a running agent sees: node, capture addresses, data path, counts.
    Status(AdminArgs),
    /// The workloads of a running agent's node: endpoints with netns cookie
    /// and interface, and the services with their backends.
    Workloads(AdminArgs),
    /// The services a running agent knows: VIPs, ports and backends with
    /// their state (the second half of `workloads`).
    Services(AdminArgs),
    /// The certificates a running agent holds for its node's workloads:
    /// identity, serial, validity, time to renewal, issuer chain.
    Certs(AdminArgs),
    /// Policies: without arguments, the authorization and network policies
    /// a running agent enforces and what each selects on its node; with a
    /// pod, that pod's compiled network policy; `explain` says which rule
    /// allows or denies one connection, from the maps the kernel uses.
    Policy(PolicyArgs),
    /// The configuration a running agent applies: its settings, the routes
    /// attached to Services with their status conditions (Accepted,
    /// ResolvedRefs) and rules, traffic and authorization policies.
    Config(AdminArgs),
    /// The service graph this node has seen: workloads and Services, edges
    /// with requests, errors, bytes, connections, mTLS and policy verdicts;
    /// `--dot` for Graphviz (`trellis topology --dot | dot -Tpng > g.png`).
    Topology(TopologyArgs),
    /// Flow events, Hubble-like: every verdict of the kernel's policy
    /// points and of the agent, with pods, identities and the rule.
    Flows(FlowsArgs),
    /// The built-in CA's root.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The Trellis CRDs, generated from the agent's own types: printed as
    /// one YAML stream (`trellis crds | kubectl apply -f -`), or written
    /// one file each into `--dir`.
    Crds(CrdsArgs),
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Write `<singular>.yaml` files into this folder instead of printing.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TopologyArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Graphviz DOT instead of a table.
    #[arg(long)]
    pub dot: bool,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new root (`ca.crt`, and `ca.key` readable by its owner only)
    /// into DIR, for `trellis agent --ca-dir DIR`. Never overwrites.
    Init {
        dir: PathBuf,
        /// Trust domain named in the root's subject.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The agent's admin API (run the command in the node's network namespace).
    #[arg(long, env = env::ADMIN_ADDR, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub explain: Option<PolicyCommand>,

    /// A pod on the agent's node (`namespace/name`, or `name` in `default`):
    /// show its compiled network policy.
    pub pod: Option<String>,

    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Which rule allows or denies SRC connecting to DST on PORT: DST's
    /// ingress policy when DST is on this node, SRC's egress policy when
    /// SRC is. SRC and DST are pods (`namespace/name`) or IP addresses.
    Explain {
        src: String,
        dst: String,
        port: u16,
        /// TCP, UDP or SCTP.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Keep printing new flows as they come.
    #[arg(short, long)]
    pub follow: bool,

    /// Only flows from or to this pod (`namespace/name`, or a name in any namespace).
    #[arg(long)]
    pub pod: Option<String>,

    /// Only flows from or to pods of this namespace.
    #[arg(long)]
    pub namespace: Option<String>,

    /// Only `allowed` or only `denied` flows.
    #[arg(long, value_parser = ["allowed", "denied"])]
    pub verdict: Option<String>,

    /// Print only the last N of the flows kept (before following).
    #[arg(long)]
    pub last: Option<usize>,

    /// Start at this sequence number (each flow's `seq`): resume where an
    /// earlier run stopped.
    #[arg(long, default_value_t = 0)]
    pub since: u64,

    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of the `Node` object that is this node.
    #[arg(long, env = env::NODE, required_unless_present = "uninstall")]
    pub node: Option<String>,

    /// Folder of Kubernetes YAML objects (watched and hot-reloaded).
    #[arg(long, env = env::CONFIG_DIR, conflicts_with = "kubernetes")]
    pub config_dir: Option<PathBuf>,

    /// Take the state from the Kubernetes API: in-cluster (the pod's service
    /// account), or the kubeconfig of `--kubeconfig` / `KUBECONFIG`.
    #[arg(long, env = env::KUBERNETES, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub kubernetes: bool,

    /// Where the mesh configuration (the ConfigMap `trellis-mesh`) is read
    /// from the API server: the agent's own namespace in the DaemonSet.
    #[arg(long, env = env::MESH_NAMESPACE, default_value = "trellis-system")]
    pub mesh_namespace: String,

    /// The kubeconfig file for `--kubernetes` outside a cluster.
    #[arg(long, env = env::KUBECONFIG, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,

    /// cgroup v2 folder the kernel programs attach to (the kubepods cgroup on a real node).
    #[arg(long, env = env::CGROUP_ROOT)]
    pub cgroup_root: PathBuf,

    /// The host's /proc: local pods without a `trellis.dev/netns`
    /// annotation are found through their cgroup and a process's
    /// `ns/net` (`/host/proc` in the DaemonSet).
    #[arg(long, env = env::PROC_ROOT, default_value = "/proc")]
    pub proc_root: PathBuf,

    /// bpffs folder where programs' links and maps are pinned.
    #[arg(long, env = env::BPFFS)]
    pub bpffs: PathBuf,

    /// Folder with `ca.crt` and `ca.key` (from `trellis ca init`), and
    /// optionally `bundle.crt`, for the built-in CA; reloaded on change.
    #[arg(long, env = env::CA_DIR, conflicts_with = "cert_dir")]
    pub ca_dir: Option<PathBuf>,

    /// Folder of certificates an external issuer (cert-manager, SPIRE)
    /// writes: `<namespace>/<service-account>/{tls.crt,tls.key,ca.crt}`;
    /// reloaded on change. Instead of the built-in CA.
    #[arg(long, env = env::CERT_DIR)]
    pub cert_dir: Option<PathBuf>,

    /// SPIFFE trust domain of the workloads' identities.
    #[arg(long, env = env::TRUST_DOMAIN, default_value = "cluster.local")]
    pub trust_domain: String,

    /// Lifetime of the workload certificates the built-in CA issues; each is
    /// renewed at half life, with jitter (`24h`, `10m`, `5s`).
    #[arg(long, env = env::CERT_LIFETIME, default_value = "24h")]
    pub cert_lifetime: String,

    /// Log filter: a level (`info`, `debug`) or tracing directives.
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t)]
    pub log_format: LogFormat,

    /// Where `/healthz/ready` is served.
    #[arg(long, env = env::READINESS_ADDR, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// The share of requests and connections given an access log line
    /// (target `access`): 1 logs all, 0 none.
    #[arg(long, env = env::ACCESS_LOG_SAMPLE, default_value_t = 1.0)]
    pub access_log_sample: f64,

    /// Record Istio's request and TCP metrics (and access logs, topology).
    /// `false` for comparison: `/metrics` then has the `trellis_*` ones only.
    #[arg(long, env = env::METRICS, default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,

    /// Export request spans over OTLP to this collector
    /// (`http://host:4317` for grpc, `http://host:4318` for http/protobuf);
    /// no tracing without it.
    #[arg(long, env = env::OTLP_ENDPOINT)]
    pub otlp_endpoint: Option<String>,

    /// The OTLP transport.
    #[arg(long, env = env::OTLP_PROTOCOL, value_enum, default_value = "grpc")]
    pub otlp_protocol: crate::trace::otlp::Protocol,

    /// The share of new traces sampled (0 to 1; Istio's default is 1%). A
    /// request whose trace headers carry a decision keeps it.
    #[arg(long, env = env::TRACE_SAMPLING, default_value_t = 0.01)]
    pub trace_sampling: f64,

    /// Where Prometheus scrapes `/metrics` (OpenMetrics text).
    #[arg(long, env = env::METRICS_ADDR, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Where the admin API (`trellis status`, `trellis workloads`) is served;
    /// keep it on loopback.
    #[arg(long, env = env::ADMIN_ADDR, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// sk_msg acceleration: data between local sockets (app ↔ agent, agent ↔
    /// local pod) skips the TCP/IP stack. `false` for comparison.
    #[arg(long, env = env::SK_MSG, default_value_t = true, action = clap::ArgAction::Set)]
    pub sk_msg: bool,

    /// Kernel splicing of opaque same-node connections (app ↔ backend through
    /// the sockhash, the agent out of the byte path). Needs --sk-msg.
    #[arg(long, env = env::SPLICE, default_value_t = true, action = clap::ArgAction::Set)]
    pub splice: bool,

    /// Give up connecting to a backend after this long (`500ms`, `5s`, `1m`).
    #[arg(long, env = env::CONNECT_TIMEOUT, default_value = "5s")]
    pub connect_timeout: String,

    /// Sniff a Service connection's protocol this long at most: a client
    /// silent for longer is taken for a server-first protocol and relayed
    /// as opaque TCP. Ports with an `appProtocol` skip sniffing.
    #[arg(long, env = env::PROTOCOL_DETECT_TIMEOUT, default_value = "100ms")]
    pub protocol_detect_timeout: String,

    /// Close a proxied connection after this long without a byte either way,
    /// and an HTTP client connection or pooled upstream connection after
    /// this long without a request.
    #[arg(long, env = env::IDLE_TIMEOUT, default_value = "1h")]
    pub idle_timeout: String,

    /// Read the kernel maps back this often and undo what anything else
    /// changed in them (between, each change is written from what the
    /// agent remembers writing).
    #[arg(long, env = env::MAP_RESYNC, default_value = "5m")]
    pub map_resync: String,

    /// Ping each HBONE connection this often (both ends do)...
    #[arg(long, env = env::HBONE_KEEPALIVE_INTERVAL, default_value = "30s")]
    pub hbone_keepalive_interval: String,

    /// ...and close it when a ping is not answered within this.
    #[arg(long, env = env::HBONE_KEEPALIVE_TIMEOUT, default_value = "10s")]
    pub hbone_keepalive_timeout: String,

    /// Threads running the proxy. One keeps every hop of a connection on
    /// one core, which measured lowest in latency, CPU and memory on a
    /// 2-core node (docs/architecture.md); more spread many busy
    /// connections over more cores.
    #[arg(long, env = env::WORKER_THREADS, default_value_t = 1)]
    pub worker_threads: usize,

    /// After forwarding a request to a pod on this node, keep the worker
    /// polling for the answer up to this many microseconds instead of
    /// sleeping (0: never; at most 1000). For nodes with cores to spare: a
    /// VM's idle core is slow to wake, but where the pod must share the
    /// agent's core, polling delays it (docs/l7.md, "Busy polling").
    #[arg(long, env = env::BUSY_POLL_US, default_value_t = 0)]
    pub busy_poll_us: u64,

    /// Detach and unpin everything a previous agent left under --bpffs and --cgroup-root, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

#[derive(Debug, Args)]
pub struct MapsArgs {
    /// The agent's bpffs folder.
    #[arg(long, env = env::BPFFS)]
    pub bpffs: PathBuf,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// Output format of the inspection commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_flags_of_the_contract() {
        let cli = Cli::try_parse_from([
            "trellis",
            "agent",
            "--node",
            "node-a",
            "--config-dir",
            "/c",
            "--cgroup-root",
            "/sys/fs/cgroup/unified/x",
            "--bpffs",
            "/sys/fs/bpf/x",
            "--ca-dir",
            "/ca",
            "--trust-domain",
            "example.org",
        ])
        .expect("parse");
        let Command::Agent(args) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(args.node.as_deref(), Some("node-a"));
        assert_eq!(args.trust_domain, "example.org");
        assert_eq!(args.ca_dir, Some(PathBuf::from("/ca")));
    }

    #[test]
    fn node_is_required_unless_uninstalling() {
        let run = ["trellis", "agent", "--cgroup-root", "/cg", "--bpffs", "/b"];
        assert!(Cli::try_parse_from(run).is_err());
        let uninstall = [
            "trellis",
            "agent",
            "--uninstall",
            "--cgroup-root",
            "/cg",
            "--bpffs",
            "/b",
        ];
        assert!(Cli::try_parse_from(uninstall).is_ok());
    }
}
