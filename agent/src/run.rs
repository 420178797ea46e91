//! The agent's life: install the data path, load the state and keep the
//! kernel maps in step with it, serve captured connections and health, report
//! ready, and on SIGTERM or SIGINT exit leaving the pinned programs enforcing.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::{
    admin::{self, Readiness},
    bpf::{
        self, BpfError, Datapath,
        tables::{OrigDstTable, Tables},
    },
    config::AgentConfig,
    proxy::outbound::{Outbound, OutboundConfig},
    state::{Snapshot, files::FileSource},
    sync::{CAPTURE_PORT, Syncer},
};

/// Readiness condition: every kernel program is attached.
pub const READY_DATAPATH: &str = "datapath";
/// Readiness condition: the state is loaded, this node is in it, and the maps reflect it.
pub const READY_STATE: &str = "state";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(
        "binding {what} on {addr}: {source} (is another agent running in this network namespace?)"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { what, addr, source })
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
        let readiness = Readiness::new(&[READY_DATAPATH, READY_STATE]);
        let health = tokio::spawn(admin::serve_health(bind("the readiness listener", cfg.readiness_addr).await?, readiness.clone()));
        let outbound_listener = bind("the outbound capture listener", SocketAddr::from(([0, 0, 0, 0], CAPTURE_PORT))).await?;

        let datapath = Datapath::install(&cfg.cgroup_root, &cfg.bpffs)?;
        for program in datapath.programs() {
            info!(program = program.name, link = %program.link.display(), attachment = ?program.attachment, "kernel program attached");
        }
        readiness.set(READY_DATAPATH, true);

        let (state_tx, state_rx) = watch::channel(Arc::new(Snapshot::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let syncer = Syncer::new(&cfg.node, Tables::open(&cfg.bpffs)?, true);
        let state_thread = {
            let (cfg, readiness, stop) = (cfg.clone(), readiness.clone(), stop.clone());
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name("trellis-state".into())
                .spawn(move || span.in_scope(|| state_loop(&cfg, syncer, &state_tx, &readiness, &stop)))
                .expect("spawning the state thread")
        };

        let outbound = Arc::new(Outbound::new(OutboundConfig::default(), OrigDstTable::open(&cfg.bpffs)?, state_rx));
        let outbound_task = tokio::spawn(outbound.clone().serve(outbound_listener));

        shutdown.await;
        info!("shutting down; pinned programs and maps stay attached and enforcing");
        stop.store(true, Ordering::Relaxed);
        outbound_task.abort();
        health.abort();
        let _ = tokio::task::spawn_blocking(move || state_thread.join()).await;
        drop(datapath);
        Ok(())
    }
    .instrument(span)
    .await
}

/// Polls the config source, rebuilds the snapshot on change, syncs the maps
/// and publishes the snapshot to the proxies. Blocking work: its own thread.
fn state_loop(
    cfg: &AgentConfig,
    mut syncer: Syncer,
    state_tx: &watch::Sender<Arc<Snapshot>>,
    readiness: &Readiness,
    stop: &AtomicBool,
) {
    let mut source = cfg.config_dir.as_ref().map(FileSource::new);
    if source.is_none() {
        warn!("no --config-dir: serving an empty state (nothing is meshed)");
    }
    let mut pending: Option<Arc<Snapshot>> = Some(Arc::new(Snapshot::default()));
    while !stop.load(Ordering::Relaxed) {
        if let Some(objects) = source.as_mut().and_then(FileSource::poll) {
            pending = Some(Arc::new(Snapshot::build(&cfg.node, &objects)));
        }
        if let Some(snapshot) = pending.take() {
            match syncer.apply(&snapshot) {
                Ok(report) => {
                    let found = snapshot.node.is_some() || source.is_none();
                    if !found {
                        warn!(node = %cfg.node, "no Node object named like --node in the state; not ready");
                    }
                    readiness.set(READY_STATE, found);
                    let _ = state_tx.send(snapshot);
                    tracing::debug!(endpoints = report.endpoints.len(), "state applied");
                }
                Err(e) => {
                    // Keep the last good maps; retry on the next round.
                    error!(error = %e, "writing the kernel maps failed; retrying");
                    pending = Some(snapshot);
                }
            }
        }
        std::thread::sleep(crate::state::files::POLL);
    }
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
