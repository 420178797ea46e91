//! The agent's life: install the data path, load the state and keep the
//! kernel maps in step with it, serve captured connections and health, report
//! ready, and on SIGTERM or SIGINT exit leaving the pinned programs enforcing.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{Instrument as _, error, info, info_span, warn};
use trellis_common::{HBONE_MARK, HBONE_PORT, HBONE_TABLE, MAP_FLOWS};

use crate::metrics::{self, IstioMetrics, node::NodeCollector};
use crate::routes::table::RouteStatus;
use crate::{
    admin::{
        self, Readiness,
        api::{AdminState, serve_admin},
    },
    bpf::{
        self, BpfError, Datapath, PinLayout,
        sockets::SocketMaps,
        tables::{OrigDstTable, Tables},
    },
    config::AgentConfig,
    flows::{self, FlowLog, Namer},
    hbone::{client::Pool, server::Inbound},
    identity::{ca::Ca, manager::CertManager},
    netlink,
    policy::verdict::{PolicyMaps, Verdicts},
    proxy::outbound::{Outbound, OutboundConfig},
    state::{Snapshot, files::FileSource},
    sync::{CAPTURE_PORT, SyncReport, Syncer},
};

/// Readiness condition: every kernel program is attached.
pub const READY_DATAPATH: &str = "datapath";
/// Readiness condition: the state is loaded, this node is in it, and the maps reflect it.
pub const READY_STATE: &str = "state";
/// Readiness condition: HBONE steering is attached to the node's uplink.
pub const READY_HBONE: &str = "hbone";
/// Readiness condition: workload certificates can be issued (the CA signs,
/// or the external issuer's folder gives a trust bundle); checked again
/// every [`CERT_CHECK`].
pub const READY_CERTIFICATES: &str = "certificates";
const CERT_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("--ca-dir: {0}")]
    Ca(#[from] crate::identity::ca::CaError),
    #[error("{0}")]
    Kubernetes(String),
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

async fn bind(
    what: &'static str,
    addr: SocketAddr,
    inherited: Option<std::net::TcpListener>,
) -> Result<TcpListener, AgentError> {
    let err = |source| AgentError::Bind { what, addr, source };
    match inherited {
        Some(l) => TcpListener::from_std(l).map_err(err),
        None => TcpListener::bind(addr).await.map_err(err),
    }
}

/// The predecessor's listener `name` when it listens on `addr`.
fn inherit(
    predecessor: &mut Option<crate::handoff::Predecessor>,
    name: &str,
    addr: SocketAddr,
) -> Option<std::net::TcpListener> {
    predecessor.as_mut()?.listener(name, addr)
}

/// A listener on the wildcard address of one family (IPv6 only for IPv6:
/// the IPv4 listener takes IPv4); `None` when this network namespace has no
/// IPv6. `transparent` listeners also take connections addressed to other
/// IPs, those `trl_hbone_in` assigns to them.
fn listen(
    what: &'static str,
    port: u16,
    v6: bool,
    transparent: bool,
    inherited: Option<std::net::TcpListener>,
) -> Result<Option<TcpListener>, AgentError> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::AsFd as _;
    let addr = wildcard(port, v6);
    let err = |source| AgentError::Bind { what, addr, source };
    if let Some(l) = inherited {
        return TcpListener::from_std(l).map(Some).map_err(err);
    }
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = match Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) if v6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    if v6 {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    if transparent {
        crate::sockopt::set_transparent(socket.as_fd(), v6).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    match socket.bind(&addr.into()) {
        Ok(()) => {}
        Err(e) if v6 && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => return Ok(None),
        Err(e) => return Err(err(e)),
    }
    socket.listen(1024).map_err(err)?;
    TcpListener::from_std(socket.into()).map(Some).map_err(err)
}

fn wildcard(port: u16, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from(([0, 0, 0, 0], port))
    }
}

/// Where certificates come from: an external issuer's files, the mounted
/// CA, or a root made now.
fn certificate_manager(cfg: &AgentConfig) -> Result<Arc<CertManager>, AgentError> {
    let manager = match (&cfg.cert_dir, &cfg.ca_dir) {
        (Some(dir), _) => CertManager::from_files(dir, &cfg.trust_domain),
        (None, Some(dir)) => CertManager::from_ca_dir(dir, cfg.cert_lifetime)?,
        (None, None) => {
            warn!(
                "no --ca-dir or --cert-dir: using an in-memory root made now; other nodes cannot verify this one, so cross-node mTLS needs a shared --ca-dir"
            );
            CertManager::new(Ca::in_memory(&cfg.trust_domain)?, cfg.cert_lifetime)
        }
    };
    info!(source = ?manager.origin(), lifetime = ?cfg.cert_lifetime, roots = manager.bundle().roots().len(), "certificate source");
    Ok(Arc::new(manager))
}

/// How often local pods whose network namespace was not found are looked
/// for again.
const NETNS_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The API server may fail this long before the state is reported stale.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The configured state source: a folder, the API server, or none.
async fn state_source(cfg: &AgentConfig) -> Result<Option<crate::state::Source>, AgentError> {
    if let Some(dir) = &cfg.config_dir {
        return Ok(Some(crate::state::Source::Files(FileSource::new(dir))));
    }
    if !cfg.kubernetes {
        return Ok(None);
    }
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                AgentError::Kubernetes(format!("--kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    AgentError::Kubernetes(format!("--kubeconfig {}: {e}", path.display()))
                })?
        }
        None => kube::Config::infer().await.map_err(|e| {
            AgentError::Kubernetes(format!(
                "--kubernetes: no in-cluster config or kubeconfig: {e}"
            ))
        })?,
    };
    info!(api_server = %config.cluster_url, "state from the Kubernetes API");
    let source = crate::state::kube::KubeSource::connect(config, &cfg.mesh_namespace)
        .map_err(|e| AgentError::Kubernetes(e.to_string()))?;
    Ok(Some(crate::state::Source::Kubernetes(source)))
}

/// Keeps [`READY_CERTIFICATES`] current: checked every [`CERT_CHECK`] and
/// whenever the state changes (new local workloads need certificates).
async fn check_certificates(
    certs: Arc<CertManager>,
    mut state: watch::Receiver<Arc<Snapshot>>,
    readiness: Readiness,
    cfg: AgentConfig,
) {
    loop {
        let needed: Vec<crate::identity::Identity> = {
            let snapshot = state.borrow_and_update().clone();
            let mut ids: Vec<crate::identity::Identity> = snapshot
                .local_workloads(&cfg.node)
                .filter(|w| w.meshed)
                .map(|w| crate::identity::Identity::of(w, &cfg.trust_domain))
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        readiness.set_because(
            READY_CERTIFICATES,
            certs.check_issuance(&cfg.trust_domain, &needed),
        );
        let _ = tokio::time::timeout(CERT_CHECK, state.changed()).await;
    }
}

/// Waits for this node's InternalIPs, then attaches HBONE steering to the
/// interface holding them and routes marked packets locally.
async fn install_steering(
    datapath: &mut Datapath,
    mut state: watch::Receiver<Arc<Snapshot>>,
) -> Result<(), String> {
    let ips = loop {
        let ips = state
            .borrow()
            .node
            .as_ref()
            .map(|n| n.internal_ips.clone())
            .unwrap_or_default();
        if !ips.is_empty() {
            break ips;
        }
        state.changed().await.map_err(|e| e.to_string())?;
    };
    let (name, ifindex) = ips
        .iter()
        .find_map(|ip| netlink::interface_with(*ip))
        .ok_or_else(|| format!("no interface here holds the node's InternalIPs {ips:?}"))?;
    for ip in &ips {
        netlink::ensure_mark_to_local(*ip, HBONE_MARK, HBONE_TABLE)
            .map_err(|e| format!("routing HBONE packets locally ({ip}): {e}"))?;
    }
    let program = datapath
        .attach_hbone_steering(ifindex)
        .map_err(|e| e.to_string())?;
    info!(interface = %name, link = %program.link.display(), attachment = ?program.attachment, "HBONE steering attached");
    Ok(())
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
        let readiness = Readiness::new(&[READY_DATAPATH, READY_STATE, READY_HBONE, READY_CERTIFICATES]);
        let certs = certificate_manager(&cfg)?;

        // A predecessor under the same --bpffs hands over its listeners now
        // (nothing is refused meanwhile) and its connections once this
        // agent is ready.
        let mut predecessor = {
            let bpffs = cfg.bpffs.clone();
            tokio::task::spawn_blocking(move || crate::handoff::Predecessor::connect(&bpffs))
                .await
                .unwrap_or_else(|e| Err(crate::handoff::HandoffError::Io(std::io::Error::other(e))))
                .unwrap_or_else(|e| {
                    warn!(error = %e, "the running agent's handoff failed: binding afresh");
                    None
                })
        };
        if predecessor.is_some() {
            info!("an agent runs under this --bpffs: took its listeners; its connections follow once this one is ready");
        }
        let hbone_listeners = [
            listen("the HBONE listener", HBONE_PORT, false, true, inherit(&mut predecessor, "hbone4", wildcard(HBONE_PORT, false)))?,
            listen("the HBONE listener", HBONE_PORT, true, true, inherit(&mut predecessor, "hbone6", wildcard(HBONE_PORT, true)))?,
        ];
        let readiness_listener = bind("the readiness listener", cfg.readiness_addr, inherit(&mut predecessor, "readiness", cfg.readiness_addr)).await?;
        let outbound_listener = bind("the outbound capture listener", wildcard(CAPTURE_PORT, false), inherit(&mut predecessor, "outbound4", wildcard(CAPTURE_PORT, false))).await?;
        let outbound_listener6 = listen("the IPv6 outbound capture listener", CAPTURE_PORT, true, false, inherit(&mut predecessor, "outbound6", wildcard(CAPTURE_PORT, true)))?;
        let admin_listener = bind("the admin API", cfg.admin_addr, inherit(&mut predecessor, "admin", cfg.admin_addr)).await?;
        let metrics_listener = match inherit(&mut predecessor, "metrics", cfg.metrics_addr) {
            Some(l) => l,
            None => metrics::bind(cfg.metrics_addr).map_err(|source| AgentError::Bind { what: "the metrics listener", addr: cfg.metrics_addr, source })?,
        };
        // Copies of every listener, for this agent's own successor.
        let handed_listeners: Vec<(&'static str, std::os::fd::OwnedFd)> = {
            use std::os::fd::AsFd as _;
            let [h4, h6] = &hbone_listeners;
            [
                ("hbone4", h4.as_ref().map(|l| l.as_fd())),
                ("hbone6", h6.as_ref().map(|l| l.as_fd())),
                ("readiness", Some(readiness_listener.as_fd())),
                ("outbound4", Some(outbound_listener.as_fd())),
                ("outbound6", outbound_listener6.as_ref().map(|l| l.as_fd())),
                ("admin", Some(admin_listener.as_fd())),
                ("metrics", Some(metrics_listener.as_fd())),
            ]
            .into_iter()
            .filter_map(|(name, fd)| Some((name, fd?.try_clone_to_owned().ok()?)))
            .collect()
        };
        let health = tokio::spawn(admin::serve_health(readiness_listener, readiness.clone()));
        if outbound_listener6.is_none() {
            warn!("no IPv6 in this network namespace: IPv6 connections are not captured");
        }

        let mut datapath = Datapath::install(&cfg.cgroup_root, &cfg.bpffs)?;
        // Loading parsed the kernel's BTF and the object: megabytes freed.
        crate::memory::release_free_heap();
        tokio::spawn(release_startup_memory(readiness.clone()));
        let mut accel = cfg.accel;
        if !datapath.sk_msg_usable() {
            accel.sk_msg = false;
            accel.splice = false;
        }
        for program in datapath.programs() {
            info!(program = program.name, link = %program.link.display(), attachment = ?program.attachment, "kernel program attached");
        }
        readiness.set(READY_DATAPATH, true);

        let (state_tx, state_rx) = watch::channel(Arc::new(Snapshot::default()));
        let cert_check = tokio::spawn(check_certificates(certs.clone(), state_rx.clone(), readiness.clone(), cfg.clone()));
        let report = Arc::new(Mutex::new(SyncReport::default()));
        let source_stats = Arc::new(Mutex::new(crate::state::SourceStats::default()));
        let source = state_source(&cfg).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let syncer = Syncer::new(&cfg.node, Tables::open(&cfg.bpffs)?.with_resync(cfg.map_resync), accel)
            .with_pod_hooks(datapath.pod_hooks()?);
        let flows = Arc::new(FlowLog::new(&cfg.node, flows::CAPACITY));
        let verdicts = Arc::new(Verdicts::new(PolicyMaps::open(&cfg.bpffs)?).with_flows(flows.clone()));
        let state_thread = {
            let (cfg, readiness, stop, report, verdicts, source_stats) = (cfg.clone(), readiness.clone(), stop.clone(), report.clone(), verdicts.clone(), source_stats.clone());
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name("trellis-state".into())
                .spawn(move || span.in_scope(|| state_loop(&cfg, source, syncer, &state_tx, (&report, &source_stats), &verdicts, &readiness, &stop)))
                .expect("spawning the state thread")
        };

        let outbound_config = OutboundConfig {
            detect_timeout: cfg.protocol_detect_timeout,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            busy_poll: cfg.busy_poll,
            accel,
        };
        info!(sk_msg = accel.sk_msg, splice = accel.splice, idle_timeout = ?cfg.idle_timeout, "outbound proxy");
        let sockets = accel.sk_msg.then(|| SocketMaps::open(&cfg.bpffs)).transpose()?.map(Arc::new);
        let pool = Arc::new(Pool::new(certs.clone(), cfg.connect_timeout).with_keepalive(cfg.hbone_keepalive));
        crate::access_log::set_sample(cfg.access_log_sample);
        let mut registry = prometheus_client::registry::Registry::default();
        let istio = Arc::new(IstioMetrics::register(&mut registry));
        let relays = Arc::new(crate::handoff::Relays::default());
        let mut outbound = Outbound::new(&cfg.node, outbound_config, OrigDstTable::open(&cfg.bpffs)?, sockets.clone(), state_rx.clone(), &cfg.trust_domain)
            .with_hbone(pool.clone())
            .with_policy(verdicts.clone())
            .with_handoff(relays.clone());
        let mut inbound = Inbound::new(&cfg.node, &cfg.trust_domain, certs.clone(), state_rx.clone(), cfg.connect_timeout, cfg.idle_timeout)
            .with_keepalive(cfg.hbone_keepalive)
            .with_policy(verdicts.clone())
            .with_sockets(sockets);
        if cfg.metrics {
            outbound = outbound.with_metrics(istio.clone());
            inbound = inbound.with_metrics(istio.clone());
        } else {
            warn!("--metrics false: no Istio metrics, access logs or topology are recorded");
        }
        let tracer = cfg.tracing.clone().map(|endpoint| crate::trace::Tracer::start(endpoint, cfg.trace_sampling, &cfg.node));
        if let Some(tracer) = &tracer {
            outbound = outbound.with_tracer(tracer.clone());
            inbound = inbound.with_tracer(tracer.clone());
        }
        let outbound = Arc::new(outbound);
        let inbound = Arc::new(inbound.with_authorizer(outbound.authorizer()));
        registry.register_collector(Box::new(NodeCollector {
            bpffs: cfg.bpffs.clone(),
            certs: certs.clone(),
            pool: pool.clone(),
            outbound: outbound.clone(),
            inbound: inbound.clone(),
            tracing: tracer.as_ref().map(|t| t.stats.clone()),
            source: source_stats.clone(),
        }));
        metrics::serve(metrics_listener, Arc::new(registry)).map_err(|source| AgentError::Bind { what: "the metrics thread", addr: cfg.metrics_addr, source })?;
        let mut hbone_tasks: Vec<_> = hbone_listeners.into_iter().flatten().map(|l| tokio::spawn(inbound.clone().serve(l))).collect();
        hbone_tasks.push(tokio::spawn(certs.clone().run_renewals()));
        let mut outbound_tasks = vec![tokio::spawn(outbound.clone().serve(outbound_listener))];
        let namer = Namer { state: state_rx.clone(), verdicts: verdicts.clone() };
        let flow_reader = tokio::spawn(flows::read_kernel(PinLayout::new(&cfg.bpffs).open_map(MAP_FLOWS)?, namer, flows.clone()));
        // Identity providers' key sets (RequestAuthentication jwksUri) for this node's pods.
        tokio::spawn(crate::policy::jwks::run(state_rx.clone(), cfg.node.clone(), crate::policy::jwks::REFRESH));
        let admin_state = AdminState {
            config: cfg.clone(),
            readiness: readiness.clone(),
            programs: datapath.programs().to_vec(),
            snapshot: outbound.state(),
            report,
            source: source_stats.clone(),
            outbound: outbound.clone(),
            inbound: inbound.clone(),
            pool: pool.clone(),
            certs: certs.clone(),
            flows,
            verdicts: verdicts.clone(),
            metrics: istio,
        };
        let admin = admin_thread(cfg.admin_addr)?.spawn(async move {
            match admin_listener.into_std().and_then(TcpListener::from_std) {
                Ok(listener) => serve_admin(listener, admin_state).await,
                Err(e) => error!(error = %e, "the admin API cannot serve: its listener did not move to the admin thread"),
            }
        });
        if let Some(listener) = outbound_listener6 {
            outbound_tasks.push(tokio::spawn(outbound.clone().serve(listener)));
        }

        // Once a successor asks for the connections, this agent accepts no more.
        let (handed_tx, mut handed_rx) = watch::channel(false);
        {
            let accepting: Vec<_> = hbone_tasks.iter().chain(&outbound_tasks).map(tokio::task::JoinHandle::abort_handle)
                .chain([health.abort_handle(), admin.abort_handle()]).collect();
            tokio::spawn(async move {
                if handed_rx.wait_for(|h| *h).await.is_ok() {
                    accepting.iter().for_each(tokio::task::AbortHandle::abort);
                    info!("the successor agent accepts now; this one serves what it has until SIGTERM");
                }
            });
        }
        tokio::spawn(take_over(predecessor, readiness.clone(), outbound.clone(), cfg.bpffs.clone(), handed_listeners, relays.clone(), handed_tx));

        tokio::pin!(shutdown);
        if cfg.config_dir.is_none() && !cfg.kubernetes {
            // No state source, no node and no pods: nothing to steer.
            readiness.set(READY_HBONE, true);
        }
        tokio::select! {
            () = &mut shutdown => {}
            result = install_steering(&mut datapath, state_rx.clone()) => {
                match result {
                    Ok(()) => readiness.set(READY_HBONE, true),
                    Err(e) => {
                        error!(error = %e, "HBONE steering not installed: connections from other nodes cannot reach this node's pods");
                        readiness.set_because(READY_HBONE, Err(e));
                    }
                }
                shutdown.await;
            }
        }
        // Stop accepting tunnels, GOAWAY the open ones and let their streams end.
        hbone_tasks.iter().for_each(tokio::task::JoinHandle::abort);
        pool.drain();
        inbound.drain_for(crate::hbone::DRAIN_TIMEOUT).await;
        info!("shutting down; pinned programs and maps stay attached and enforcing");
        stop.store(true, Ordering::Relaxed);
        outbound_tasks.iter().for_each(tokio::task::JoinHandle::abort);
        health.abort();
        admin.abort();
        cert_check.abort();
        flow_reader.abort();
        let _ = tokio::task::spawn_blocking(move || state_thread.join()).await;
        drop(datapath);
        Ok(())
    }
    .instrument(span)
    .await
}

/// Once the agent is ready and settled, gives back what start-up alone
/// used: the resident set is then what serving needs (docs/architecture.md,
/// "Memory after start-up").
async fn release_startup_memory(readiness: Readiness) {
    readiness.until_ready().await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    crate::memory::release_free_heap();
    match tokio::task::spawn_blocking(crate::memory::release_startup_code).await {
        Ok(Ok(bytes)) => info!(bytes, "start-up code pages handed back"),
        Ok(Err(e)) => warn!(error = %e, "start-up code pages kept: /proc/self/smaps unreadable"),
        Err(_) => {}
    }
}

/// Takes the predecessor's connections once this agent is ready, then
/// listens for a successor of its own and hands over to it when asked.
async fn take_over(
    predecessor: Option<crate::handoff::Predecessor>,
    readiness: Readiness,
    outbound: Arc<Outbound>,
    bpffs: std::path::PathBuf,
    listeners: Vec<(&'static str, std::os::fd::OwnedFd)>,
    relays: Arc<crate::handoff::Relays>,
    handed: watch::Sender<bool>,
) {
    if let Some(predecessor) = predecessor {
        // Ready means the state is in the maps: adopted connections are
        // judged by the same policy as new ones.
        readiness.until_ready().await;
        match tokio::task::spawn_blocking(move || predecessor.take()).await {
            Ok(Ok(parked)) => {
                info!(
                    connections = parked.len(),
                    "took over the predecessor agent's connections"
                );
                for p in parked {
                    tokio::spawn(outbound.clone().adopt(p));
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "taking over the predecessor agent's connections failed; they stay with it")
            }
            Err(e) => warn!(error = %e, "the handoff task failed"),
        }
    }
    // A thread of its own, not the runtime's blocking pool: it waits in
    // accept() for as long as the agent runs, and a runtime being dropped
    // waits for its blocking tasks.
    let span = tracing::Span::current();
    let spawned = std::thread::Builder::new()
        .name("trellis-handoff".into())
        .spawn(move || {
            let _span = span.entered();
            use std::os::fd::AsFd as _;
            let served = crate::handoff::Successors::listen(&bpffs, std::time::Duration::from_secs(30))
                .and_then(|successors| {
                    let borrowed: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
                        listeners.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
                    successors.serve(&borrowed, &relays, || {
                        handed.send_replace(true);
                    })
                });
            match served {
                Ok(handed) => info!(handed, "handed over to the successor agent"),
                Err(e) => warn!(error = %e, "no handoff to a successor is possible: an upgrade will drop this agent's connections"),
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the handoff thread");
    }
}

/// A thread for the admin API, with a runtime of its own: on a large
/// cluster `trellis status` counts every map entry and `/workloads` writes
/// every pod, tens of milliseconds that the proxy's connections would wait
/// on its thread. Tasks spawned on the returned handle run there.
fn admin_thread(addr: SocketAddr) -> Result<tokio::runtime::Handle, AgentError> {
    let err = |source| AgentError::Bind {
        what: "the admin thread",
        addr,
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(err)?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("trellis-admin".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .map_err(err)?;
    Ok(handle)
}

/// Polls the config source, rebuilds the snapshot on change, syncs the maps
/// and publishes the snapshot to the proxies. Blocking work: its own thread.
#[expect(
    clippy::too_many_arguments,
    reason = "the state thread's whole context, passed once"
)]
fn state_loop(
    cfg: &AgentConfig,
    mut source: Option<crate::state::Source>,
    mut syncer: Syncer,
    state_tx: &watch::Sender<Arc<Snapshot>>,
    (report_out, source_stats): (&Mutex<SyncReport>, &Mutex<crate::state::SourceStats>),
    verdicts: &Verdicts,
    readiness: &Readiness,
    stop: &AtomicBool,
) {
    if source.is_none() {
        warn!("no --config-dir or --kubernetes: serving an empty state (nothing is meshed)");
    }
    let mut trouble = None;
    let mut pending: Option<Arc<Snapshot>> = Some(Arc::new(Snapshot::default()));
    let mut routes = Vec::new();
    let mut netns =
        crate::netns::discover::Resolver::new(crate::netns::discover::Locator::new(&cfg.proc_root));
    // The last objects, to build again when a local pod's namespace is not
    // found yet (its sandbox may have no process yet) or a found one's
    // process has gone: checked each second.
    let mut last: Option<Vec<crate::state::Object>> = None;
    let mut unresolved = false;
    let mut checked = std::time::Instant::now();
    // A change waits here while the last rebuild is too recent (`pace`).
    let mut due = false;
    let mut pacer = crate::state::pace::Pacer::default();
    // Old snapshots and policy views are freed here, not on a proxy worker.
    let mut retired = crate::state::retire::Retired::default();
    let mut retired_views = crate::state::retire::Retired::default();
    // What the last build made of each object, for the next.
    let mut memo = crate::state::memo::Memo::default();
    while !stop.load(Ordering::Relaxed) {
        // The source is not even asked while the pace holds: collecting
        // every object is part of a rebuild's cost.
        let started = std::time::Instant::now();
        let ready = pacer.ready(started);
        let polled = source
            .as_mut()
            .filter(|_| ready)
            .and_then(crate::state::Source::poll);
        if let Some(objects) = polled {
            last = Some(objects);
            due = true;
        } else if checked.elapsed() >= NETNS_RETRY {
            checked = std::time::Instant::now();
            due |= unresolved || netns.stale();
        }
        let rebuild = due && ready;
        if let Some(source) = &source {
            let mut stats = source.stats();
            stats.rebuilds = pacer.stats();
            *source_stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
            let now = source.trouble(STALE_AFTER);
            if now != trouble {
                if readiness.is_ready() || now.is_some() {
                    readiness.note(READY_STATE, now.clone());
                }
                trouble = now;
            }
        }
        if let Some(objects) = last.as_ref().filter(|_| rebuild) {
            due = false;
            let mut snapshot =
                Snapshot::build_for(&cfg.node, &cfg.mesh_namespace, objects, &mut memo);
            tracing::debug!(reuse = ?memo.last, "snapshot built");
            let missing = netns.fill(&cfg.node, &mut snapshot.workloads);
            if !missing.is_empty() && !unresolved {
                info!(pods = ?missing, "local pods with no process yet to find their network namespace by; looking again each second");
            }
            unresolved = !missing.is_empty();
            log_route_changes(&routes, &snapshot.routes.status);
            routes = snapshot.routes.status.clone();
            pending = Some(Arc::new(snapshot));
        }
        // Now and then the maps are read back from the kernel, to undo what
        // anything else changed there (`Tables`).
        if pending.is_none() && syncer.resync_due() {
            pending = Some(state_tx.borrow().clone());
        }
        if let Some(snapshot) = pending.take() {
            let resync = Arc::ptr_eq(&snapshot, &state_tx.borrow());
            match syncer.apply(&snapshot) {
                Ok(report) => {
                    let found = snapshot.node.is_some() || source.is_none();
                    if !found {
                        warn!(node = %cfg.node, "no Node object named like --node in the state; not ready");
                    }
                    readiness.set_because(
                        READY_STATE,
                        found.then_some(()).ok_or_else(|| {
                            trouble.clone().unwrap_or_else(|| {
                                format!("no Node object named {} in the state", cfg.node)
                            })
                        }),
                    );
                    if found && trouble.is_some() {
                        readiness.note(READY_STATE, trouble.clone());
                    }
                    tracing::debug!(endpoints = report.endpoints.len(), resync, "state applied");
                    if !resync {
                        retired.keep(&snapshot);
                        retired_views.keep(&report.policy);
                        let _ = state_tx.send(snapshot);
                        verdicts.set_view(report.policy.clone());
                    }
                    *report_out.lock().unwrap_or_else(|e| e.into_inner()) = report;
                    // The replaced snapshot and view, unless a connection
                    // still holds them.
                    retired.release();
                    retired_views.release();
                    // A build's scratch (parsed documents, the replaced
                    // snapshot and maps) is freed in many small pieces that
                    // malloc would keep: at 20,000 pods, 100+ MiB held
                    // for nothing. Milliseconds, once per change.
                    crate::memory::release_free_heap();
                    if rebuild {
                        pacer.rebuilt(std::time::Instant::now(), started.elapsed(), memo.last);
                        // Shown at once, not at the next poll.
                        source_stats
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .rebuilds = pacer.stats();
                    }
                }
                Err(e) => {
                    // Keep the last good maps; retry on the next round.
                    error!(error = %e, "writing the kernel maps failed; retrying");
                    if !readiness.is_ready() {
                        readiness
                            .set_because(READY_STATE, Err(format!("writing the kernel maps: {e}")));
                    }
                    pending = Some(snapshot);
                }
            }
        }
        // Those a connection held until now.
        if retired.release() + retired_views.release() > 0 {
            crate::memory::release_free_heap();
        }
        std::thread::sleep(crate::state::files::POLL);
    }
}

/// Logs each route whose status conditions are new or changed: accepted
/// ones at info, the others (not accepted, unresolved references) at warn.
fn log_route_changes(before: &[RouteStatus], now: &[RouteStatus]) {
    for status in now.iter().filter(|s| !before.contains(s)) {
        let conditions = status
            .conditions
            .iter()
            .map(|c| {
                let state = if c.status { "True" } else { "False" };
                match c.message.as_str() {
                    "" => format!("{}={state} ({})", c.kind, c.reason),
                    m => format!("{}={state} ({}): {m}", c.kind, c.reason),
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let route = format!("{} {}/{}", status.kind, status.namespace, status.name);
        if status.healthy() {
            info!(%route, %conditions, "route status");
        } else {
            warn!(%route, %conditions, "route status: not fully applied");
        }
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
