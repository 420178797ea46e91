//! The agent's life: install the data path, serve health, report ready, and
//! on SIGTERM or SIGINT exit leaving the pinned programs enforcing.

use std::{future::Future, net::SocketAddr};

use tokio::net::TcpListener;
use tracing::{Instrument as _, info, info_span};

use crate::{
    admin::{self, Readiness},
    bpf::{self, BpfError, Datapath},
    config::AgentConfig,
};

/// Readiness condition: every kernel program is attached.
pub const READY_DATAPATH: &str = "datapath";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(
        "binding the readiness listener on {addr}: {source} (is another agent running in this network namespace?)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` completes.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let span = info_span!("agent", node = %cfg.node);
    async move {
        info!(
            cgroup_root = %cfg.cgroup_root.display(),
            bpffs = %cfg.bpffs.display(),
            config_dir = ?cfg.config_dir,
            trust_domain = %cfg.trust_domain,
            "starting"
        );
        let readiness = Readiness::new(&[READY_DATAPATH]);
        let listener = TcpListener::bind(cfg.readiness_addr)
            .await
            .map_err(|source| AgentError::Bind {
                addr: cfg.readiness_addr,
                source,
            })?;
        let health = tokio::spawn(admin::serve_health(listener, readiness.clone()));

        let datapath = Datapath::install(&cfg.cgroup_root, &cfg.bpffs)?;
        for program in datapath.programs() {
            info!(
                program = program.name,
                link = %program.link.display(),
                attachment = ?program.attachment,
                "kernel program attached"
            );
        }
        readiness.set(READY_DATAPATH, true);
        info!(readiness = %cfg.readiness_addr, "trellis agent ready");

        shutdown.await;
        info!("shutting down; pinned programs and maps stay attached and enforcing");
        health.abort();
        drop(datapath);
        Ok(())
    }
    .instrument(span)
    .await
}

/// Removes what an agent pinned and attached under `bpffs`.
pub fn uninstall(bpffs: &std::path::Path) -> Result<usize, AgentError> {
    let removed = bpf::uninstall(bpffs)?;
    for path in &removed {
        info!(pin = %path.display(), "removed");
    }
    Ok(removed.len())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
}
