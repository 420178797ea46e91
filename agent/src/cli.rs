//! The `trellis` command line: the agent and the commands that inspect it.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::LogFormat;

/// Environment variables, one per agent setting (the interface contract).
pub mod env {
    pub const NODE: &str = "TRELLIS_NODE";
    pub const CONFIG_DIR: &str = "TRELLIS_CONFIG_DIR";
    pub const CGROUP_ROOT: &str = "TRELLIS_CGROUP_ROOT";
    pub const BPFFS: &str = "TRELLIS_BPFFS";
    pub const CA_DIR: &str = "TRELLIS_CA_DIR";
    pub const TRUST_DOMAIN: &str = "TRELLIS_TRUST_DOMAIN";
    pub const LOG_LEVEL: &str = "TRELLIS_LOG_LEVEL";
    pub const LOG_FORMAT: &str = "TRELLIS_LOG_FORMAT";
    pub const READINESS_ADDR: &str = "TRELLIS_READINESS_ADDR";
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
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of the `Node` object that is this node.
    #[arg(long, env = env::NODE, required_unless_present = "uninstall")]
    pub node: Option<String>,

    /// Folder of Kubernetes YAML objects (watched and hot-reloaded).
    #[arg(long, env = env::CONFIG_DIR)]
    pub config_dir: Option<PathBuf>,

    /// cgroup v2 folder the kernel programs attach to (the kubepods cgroup on a real node).
    #[arg(long, env = env::CGROUP_ROOT)]
    pub cgroup_root: PathBuf,

    /// bpffs folder where programs' links and maps are pinned.
    #[arg(long, env = env::BPFFS)]
    pub bpffs: PathBuf,

    /// Folder with `ca.crt` and `ca.key` (from `trellis ca init`) for the built-in CA.
    #[arg(long, env = env::CA_DIR)]
    pub ca_dir: Option<PathBuf>,

    /// SPIFFE trust domain of the workloads' identities.
    #[arg(long, env = env::TRUST_DOMAIN, default_value = "cluster.local")]
    pub trust_domain: String,

    /// Log filter: a level (`info`, `debug`) or tracing directives.
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t)]
    pub log_format: LogFormat,

    /// Where `/healthz/ready` is served.
    #[arg(long, env = env::READINESS_ADDR, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

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
