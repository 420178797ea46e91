//! The agent's effective settings: built from the command line and
//! environment, validated in one place, and dumped by the admin API.

use std::{net::SocketAddr, path::PathBuf};

use serde::Serialize;

use crate::{cli::AgentArgs, telemetry::LogFormat};

/// The agent's settings after validation.
#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    /// Name of the `Node` object that is this node.
    pub node: String,
    /// Folder of Kubernetes YAML objects; `None` serves the embedded default.
    pub config_dir: Option<PathBuf>,
    /// cgroup v2 folder the cgroup programs attach to.
    pub cgroup_root: PathBuf,
    /// bpffs folder for pinned links and maps.
    pub bpffs: PathBuf,
    /// Built-in CA folder; `None` makes an in-memory root at start.
    pub ca_dir: Option<PathBuf>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// `/healthz/ready` listener.
    pub readiness_addr: SocketAddr,
}

/// A setting that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} is required")]
    Missing { flag: &'static str },
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

impl AgentConfig {
    /// Validates the parsed arguments. Checks that need the file system
    /// (cgroup2, bpffs) happen when the data path is installed, where the
    /// error can say which mount is missing.
    pub fn from_args(args: &AgentArgs) -> Result<Self, ConfigError> {
        let node = args
            .node
            .clone()
            .ok_or(ConfigError::Missing { flag: "node" })?;
        if !is_dns_subdomain(&node) {
            return Err(ConfigError::Invalid {
                flag: "node",
                value: node,
                reason: "a Node name is a DNS subdomain: lowercase letters, digits, '-' and '.'"
                    .into(),
            });
        }
        if !is_dns_subdomain(&args.trust_domain) {
            return Err(ConfigError::Invalid {
                flag: "trust-domain",
                value: args.trust_domain.clone(),
                reason: "a SPIFFE trust domain is lowercase letters, digits, '-', '.' and '_'"
                    .into(),
            });
        }
        for (flag, path) in [("cgroup-root", &args.cgroup_root), ("bpffs", &args.bpffs)] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid {
                    flag,
                    value: path.display().to_string(),
                    reason: "must be an absolute path".into(),
                });
            }
        }
        if let Some(dir) = &args.config_dir
            && !dir.is_dir()
        {
            return Err(ConfigError::Invalid {
                flag: "config-dir",
                value: dir.display().to_string(),
                reason: "no such folder".into(),
            });
        }
        if let Some(dir) = &args.ca_dir
            && !dir.is_dir()
        {
            return Err(ConfigError::Invalid {
                flag: "ca-dir",
                value: dir.display().to_string(),
                reason: "no such folder (create one with `trellis ca init DIR`)".into(),
            });
        }
        Ok(Self {
            node,
            config_dir: args.config_dir.clone(),
            cgroup_root: args.cgroup_root.clone(),
            bpffs: args.bpffs.clone(),
            ca_dir: args.ca_dir.clone(),
            trust_domain: args.trust_domain.clone(),
            log_level: args.log_level.clone(),
            log_format: args.log_format,
            readiness_addr: args.readiness_addr,
        })
    }
}

/// RFC 1123 subdomain, as Kubernetes names are (`_` allowed for trust domains).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> AgentArgs {
        let mut argv = vec!["trellis", "agent", "--cgroup-root", "/cg", "--bpffs", "/b"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Agent(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_node() {
        let cfg = AgentConfig::from_args(&args(&["--node", "node-a"])).expect("valid");
        assert_eq!(cfg.node, "node-a");
        assert_eq!(cfg.trust_domain, "cluster.local");
    }

    #[test]
    fn rejects_with_flag_and_reason() {
        for (extra, flag) in [
            (&["--node", "Node_A"][..], "--node"),
            (
                &["--node", "a", "--trust-domain", "Bad Domain"][..],
                "--trust-domain",
            ),
            (
                &["--node", "a", "--config-dir", "/no/such/dir"][..],
                "--config-dir",
            ),
            (&["--node", "a", "--ca-dir", "/no/such/dir"][..], "--ca-dir"),
        ] {
            let err = AgentConfig::from_args(&args(extra))
                .expect_err("invalid")
                .to_string();
            assert!(err.starts_with(flag), "{err}");
        }
        let mut relative = args(&["--node", "a"]);
        relative.bpffs = "relative/dir".into();
        let err = AgentConfig::from_args(&relative)
            .expect_err("relative")
            .to_string();
        assert!(err.contains("--bpffs") && err.contains("absolute"), "{err}");
    }
}
