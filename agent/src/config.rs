//! The agent's effective settings: built from the command line and
//! environment, validated in one place, and dumped by the admin API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Serialize;

use crate::{cli::AgentArgs, telemetry::LogFormat};

/// The agent's settings after validation.
#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    /// Name of the `Node` object that is this node.
    pub node: String,
    /// Folder of Kubernetes YAML objects; `None` serves the embedded default.
    pub config_dir: Option<PathBuf>,
    /// The state comes from the Kubernetes API (instead of `config_dir`).
    pub kubernetes: bool,
    /// Its kubeconfig outside a cluster; else in-cluster or `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the mesh configuration's ConfigMap (API source).
    pub mesh_namespace: String,
    /// cgroup v2 folder the cgroup programs attach to.
    pub cgroup_root: PathBuf,
    /// The host's /proc, where local pods' network namespaces are found.
    pub proc_root: PathBuf,
    /// bpffs folder for pinned links and maps.
    pub bpffs: PathBuf,
    /// Built-in CA folder; `None` makes an in-memory root at start.
    pub ca_dir: Option<PathBuf>,
    /// Certificates from an external issuer, instead of the built-in CA.
    pub cert_dir: Option<PathBuf>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// `/healthz/ready` listener.
    pub readiness_addr: SocketAddr,
    /// Admin API listener (loopback).
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics` listener.
    pub metrics_addr: SocketAddr,
    /// Share of requests and connections access-logged.
    pub access_log_sample: f64,
    /// Istio metrics (and access logs, topology) recorded.
    pub metrics: bool,
    /// The OTLP collector spans go to; no tracing without one.
    pub tracing: Option<crate::trace::otlp::Endpoint>,
    /// Share of new traces sampled.
    pub trace_sampling: f64,
    /// Kernel acceleration modes.
    pub accel: Acceleration,
    /// Give up connecting to a backend after this.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Close a proxied connection idle this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Sniffing a Service connection's protocol gives up after this.
    #[serde(with = "humantime_serde")]
    pub protocol_detect_timeout: Duration,
    /// How often the kernel maps are read back (`bpf::tables`).
    #[serde(with = "humantime_serde")]
    pub map_resync: Duration,
    /// Pings on HBONE connections.
    pub hbone_keepalive: crate::hbone::Keepalive,
    /// Threads of the async runtime.
    pub worker_threads: usize,
    /// How long the L7 path polls for a same-node answer before sleeping.
    #[serde(with = "humantime_serde")]
    pub busy_poll: Duration,
    /// Lifetime of issued workload certificates.
    #[serde(with = "humantime_serde")]
    pub cert_lifetime: Duration,
}

/// Which kernel shortcuts the data path takes (each can be switched off for
/// comparison).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Acceleration {
    /// sk_msg redirection between local sockets.
    pub sk_msg: bool,
    /// Kernel splicing of opaque same-node connections (implies sk_msg).
    pub splice: bool,
}

pub(crate) mod humantime_serde {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{d:?}"))
    }
}

/// The longest duration a setting takes: a deadline made from a longer one
/// could overflow the clock's type.
const MAX_SETTING_SECS: u64 = 10 * 365 * 24 * 3600;

/// Parses `500ms`, `5s`, `2m`, `1h` (a number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "needs a unit: ms, s, m or h".to_string())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "starts with a whole number, as in 500ms or 5s".to_string())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        // Saturating: an overflow is too long, as the check below says.
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    if d.as_secs() > MAX_SETTING_SECS {
        return Err("longer than 10 years".into());
    }
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
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
        if !is_dns_label(&args.mesh_namespace) {
            return Err(ConfigError::Invalid {
                flag: "mesh-namespace",
                value: args.mesh_namespace.clone(),
                reason: "a namespace name is a DNS label: lowercase letters, digits and '-'".into(),
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
        if let Some(dir) = &args.cert_dir
            && !dir.is_dir()
        {
            return Err(ConfigError::Invalid {
                flag: "cert-dir",
                value: dir.display().to_string(),
                reason: "no such folder".into(),
            });
        }
        let duration = |flag: &'static str, text: &str| {
            parse_duration(text).map_err(|reason| ConfigError::Invalid {
                flag,
                value: text.into(),
                reason,
            })
        };
        let connect_timeout = duration("connect-timeout", &args.connect_timeout)?;
        let idle_timeout = duration("idle-timeout", &args.idle_timeout)?;
        let protocol_detect_timeout =
            duration("protocol-detect-timeout", &args.protocol_detect_timeout)?;
        if protocol_detect_timeout > Duration::from_secs(10) {
            return Err(ConfigError::Invalid {
                flag: "protocol-detect-timeout",
                value: args.protocol_detect_timeout.clone(),
                reason: "longer than 10s: server-first protocols would stall that long".into(),
            });
        }
        let map_resync = duration("map-resync", &args.map_resync)?;
        if map_resync < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                flag: "map-resync",
                value: args.map_resync.clone(),
                reason: "shorter than 1s: reading every map back would cost more than the changes"
                    .into(),
            });
        }
        let hbone_keepalive = crate::hbone::Keepalive {
            interval: duration("hbone-keepalive-interval", &args.hbone_keepalive_interval)?,
            timeout: duration("hbone-keepalive-timeout", &args.hbone_keepalive_timeout)?,
        };
        for (flag, value, text) in [
            (
                "hbone-keepalive-interval",
                hbone_keepalive.interval,
                &args.hbone_keepalive_interval,
            ),
            (
                "hbone-keepalive-timeout",
                hbone_keepalive.timeout,
                &args.hbone_keepalive_timeout,
            ),
        ] {
            if value < Duration::from_millis(100) {
                return Err(ConfigError::Invalid {
                    flag,
                    value: text.clone(),
                    reason: "shorter than 100ms: pings would crowd out the streams".into(),
                });
            }
        }
        if !(0.0..=1.0).contains(&args.access_log_sample) {
            return Err(ConfigError::Invalid {
                flag: "access-log-sample",
                value: args.access_log_sample.to_string(),
                reason: "a share between 0 and 1".into(),
            });
        }
        if !(0.0..=1.0).contains(&args.trace_sampling) {
            return Err(ConfigError::Invalid {
                flag: "trace-sampling",
                value: args.trace_sampling.to_string(),
                reason: "a share between 0 and 1".into(),
            });
        }
        let tracing = args
            .otlp_endpoint
            .as_deref()
            .map(|url| {
                crate::trace::otlp::Endpoint::parse(url, args.otlp_protocol).map_err(|reason| {
                    ConfigError::Invalid {
                        flag: "otlp-endpoint",
                        value: url.into(),
                        reason,
                    }
                })
            })
            .transpose()?;
        if !(1..=64).contains(&args.worker_threads) {
            return Err(ConfigError::Invalid {
                flag: "worker-threads",
                value: args.worker_threads.to_string(),
                reason: "between 1 and 64".into(),
            });
        }
        if args.busy_poll_us > 1000 {
            return Err(ConfigError::Invalid {
                flag: "busy-poll-us",
                value: args.busy_poll_us.to_string(),
                reason: "at most 1000: past a millisecond, sleeping costs less than polling".into(),
            });
        }
        let cert_lifetime = duration("cert-lifetime", &args.cert_lifetime)?;
        if cert_lifetime < Duration::from_secs(2) {
            return Err(ConfigError::Invalid {
                flag: "cert-lifetime",
                value: args.cert_lifetime.clone(),
                reason: "shorter than 2s: certificates would renew faster than handshakes finish"
                    .into(),
            });
        }
        Ok(Self {
            node,
            config_dir: args.config_dir.clone(),
            kubernetes: args.kubernetes,
            kubeconfig: args.kubeconfig.clone(),
            mesh_namespace: args.mesh_namespace.clone(),
            cgroup_root: args.cgroup_root.clone(),
            proc_root: args.proc_root.clone(),
            bpffs: args.bpffs.clone(),
            ca_dir: args.ca_dir.clone(),
            cert_dir: args.cert_dir.clone(),
            trust_domain: args.trust_domain.clone(),
            log_level: args.log_level.clone(),
            log_format: args.log_format,
            readiness_addr: args.readiness_addr,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            access_log_sample: args.access_log_sample,
            metrics: args.metrics,
            tracing,
            trace_sampling: args.trace_sampling,
            accel: Acceleration {
                sk_msg: args.sk_msg,
                // Splicing works through the sockhash: no sk_msg, no splice.
                splice: args.splice && args.sk_msg,
            },
            connect_timeout,
            idle_timeout,
            protocol_detect_timeout,
            map_resync,
            hbone_keepalive,
            worker_threads: args.worker_threads,
            busy_poll: Duration::from_micros(args.busy_poll_us),
            cert_lifetime,
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

/// RFC 1123 label, as namespace names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
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
        assert_eq!(cfg.hbone_keepalive, crate::hbone::Keepalive::default());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
        for huge in ["99999999999999999h", "18446744073709551615ms", "87601h"] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
        assert_eq!(
            parse_duration("87600h"),
            Ok(Duration::from_secs(MAX_SETTING_SECS))
        );
    }

    #[test]
    fn acceleration_switches() {
        let cfg = AgentConfig::from_args(&args(&["--node", "a"])).expect("valid");
        assert_eq!(
            cfg.accel,
            Acceleration {
                sk_msg: true,
                splice: true
            }
        );
        let cfg =
            AgentConfig::from_args(&args(&["--node", "a", "--sk-msg", "false"])).expect("valid");
        assert!(!cfg.accel.sk_msg && !cfg.accel.splice);
        let cfg =
            AgentConfig::from_args(&args(&["--node", "a", "--splice", "false"])).expect("valid");
        assert!(cfg.accel.sk_msg && !cfg.accel.splice);
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
            (
                &["--node", "a", "--idle-timeout", "10 parsecs"][..],
                "--idle-timeout",
            ),
            (
                &["--node", "a", "--connect-timeout", "0s"][..],
                "--connect-timeout",
            ),
            (
                &["--node", "a", "--hbone-keepalive-interval", "50ms"][..],
                "--hbone-keepalive-interval",
            ),
            (
                &["--node", "a", "--hbone-keepalive-timeout", "soon"][..],
                "--hbone-keepalive-timeout",
            ),
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
