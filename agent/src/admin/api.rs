//! The admin API on 127.0.0.1:15000: what the agent sees, as JSON, for
//! `trellis status`, `trellis workloads` and `trellis maps`.
//!
//! - `/status`: node, readiness, capture addresses, acceleration, programs,
//!   object counts, map occupancy, proxy counters.
//! - `/workloads`: local endpoints (netns cookie, interface) and services
//!   with their backends.
//! - `/certs`: the certificates held for local workloads (never a key).
//! - `/config`: the effective settings.
//! - `/maps`: every pinned map, decoded.
//! - `/policies`: authorization and network policies, and what they select.
//! - `/policy/pod?name=ns/pod`: a local pod's compiled network policy.
//! - `/policy/explain?src=&dst=&port=&protocol=`: one connection's verdicts.
//! - `/flows?since=N&pod=&namespace=&verdict=&limit=`: the latest flow
//!   events (see [`crate::flows`]).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use super::{Readiness, reply};
use crate::query;
use crate::{
    bpf::{self, AttachedProgram},
    config::AgentConfig,
    flows::{Filter, FlowLog},
    hbone::{client::Pool, server::Inbound},
    identity::manager::CertManager,
    policy::{
        explain::{self, ExplainError},
        telemetry::{Reporting, Side},
        verdict::Verdicts,
    },
    proxy::outbound::Outbound,
    state::Snapshot,
    sync::SyncReport,
};

/// What the admin API reads from.
#[derive(Clone)]
pub struct AdminState {
    pub config: AgentConfig,
    pub readiness: Readiness,
    pub programs: Vec<AttachedProgram>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub report: Arc<Mutex<SyncReport>>,
    /// The source's health and the rebuilds' cost, kept by the state thread.
    pub source: Arc<Mutex<crate::state::SourceStats>>,
    pub outbound: Arc<Outbound>,
    pub inbound: Arc<Inbound>,
    pub pool: Arc<Pool>,
    pub certs: Arc<CertManager>,
    pub flows: Arc<FlowLog>,
    pub verdicts: Arc<Verdicts>,
    pub metrics: Arc<crate::metrics::IstioMetrics>,
}

/// Serves the admin API until the task is dropped.
pub async fn serve_admin(listener: TcpListener, state: AdminState) {
    let state = Arc::new(state);
    super::serve(listener, "admin", move |req| handle(&req, &state)).await;
}

fn handle(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let body = match req.uri().path() {
        "/status" => json(&status(state)),
        "/workloads" => json(&workloads(state)),
        "/config" => json(&config(state)),
        "/certs" => json(&certs(state)),
        "/policies" => json(&policies(state)),
        "/policy/pod" => {
            let q: BTreeMap<String, String> =
                query::pairs(req.uri().query().unwrap_or("")).collect();
            let snapshot = state.snapshot.borrow().clone();
            let name = q.get("name").map_or("", String::as_str);
            match explain::pod_policy(
                &state.config.bpffs,
                &snapshot,
                &state.verdicts.view(),
                &state.config.node,
                name,
            ) {
                Ok(doc) => json(&doc),
                Err(e) => {
                    let (status, text) = explain_error(&e);
                    return reply(status, "text/plain", text);
                }
            }
        }
        "/policy/explain" => match explain_query(state, req.uri().query().unwrap_or("")) {
            Ok(doc) => json(&doc),
            Err((status, text)) => return reply(status, "text/plain", text),
        },
        "/flows" => match Filter::parse_query(req.uri().query().unwrap_or("")) {
            Ok((filter, since, limit)) => json(&state.flows.page(&filter, since, limit)),
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("/flows: {e}\n"),
                );
            }
        },
        "/topology" => {
            let view = state.metrics.topology.view(&state.flows.pod_pairs());
            if req.uri().query() == Some("format=dot") {
                return reply(StatusCode::OK, "text/vnd.graphviz", view.dot());
            }
            json(&view)
        }
        "/maps" => match maps(state) {
            Ok(doc) => json(&doc),
            Err(e) => {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                );
            }
        },
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /status, /workloads, /certs, /policies, /flows, /config, /topology or /maps\n"
                    .into(),
            );
        }
    };
    reply(StatusCode::OK, "application/json", body)
}

/// An error of the policy views as a status and text.
type Refusal = (StatusCode, String);

fn explain_error(e: &ExplainError) -> Refusal {
    let status = match e {
        ExplainError::Map(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ExplainError::Protocol(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::NOT_FOUND,
    };
    (status, format!("{e}\n"))
}

/// `/policy/explain?src=&dst=&port=&protocol=`.
fn explain_query(state: &AdminState, query_string: &str) -> Result<serde_json::Value, Refusal> {
    let q: BTreeMap<String, String> = query::pairs(query_string).collect();
    let bad = |text: String| {
        (
            StatusCode::BAD_REQUEST,
            format!("/policy/explain: {text}\n"),
        )
    };
    let field = |key: &str| {
        q.get(key)
            .cloned()
            .ok_or_else(|| bad(format!("{key}= is required")))
    };
    let (src, dst, port) = (field("src")?, field("dst")?, field("port")?);
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("port={port}: not a port number")))?;
    let protocol = q.get("protocol").map_or("TCP", String::as_str);
    let snapshot = state.snapshot.borrow().clone();
    explain::explain(
        &state.verdicts,
        &snapshot,
        &state.config.node,
        &src,
        &dst,
        port,
        protocol,
    )
    .map_err(|e| explain_error(&e))
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")) + "\n"
}

fn report(state: &AdminState) -> SyncReport {
    state
        .report
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// A short hash of the network policies the agent applies: tests and
/// operators compare it across nodes to know every agent caught up.
fn policy_fingerprint(snapshot: &Snapshot) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&snapshot.network_policies)
        .unwrap_or_default()
        .hash(&mut h);
    format!("{:016x}", h.finish())
}

/// `GET /config`: the agent's settings and the configuration it applies
/// from objects: routes with their status conditions (Accepted,
/// ResolvedRefs) and compiled rules, traffic and authorization policies,
/// and the mesh configuration's extension providers.
pub fn config(state: &AdminState) -> serde_json::Value {
    let snapshot = state.snapshot.borrow().clone();
    serde_json::json!({
        "settings": state.config,
        "routes": {
            "status": snapshot.routes.status,
            "services": snapshot.routes.services,
        },
        "trafficPolicies": snapshot.traffic,
        "authorizationPolicies": snapshot.policies,
        "extensionProviders": snapshot.providers,
    })
}

/// `GET /status`.
pub fn status(state: &AdminState) -> serde_json::Value {
    let snapshot = state.snapshot.borrow().clone();
    let report = report(state);
    let missing = state.readiness.missing();
    let occupancy = bpf::maps::occupancy(&state.config.bpffs).unwrap_or_default();
    serde_json::json!({
        "node": state.config.node,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": missing.is_empty(),
        "missing": missing,
        "capture": report.capture,
        "acceleration": state.config.accel,
        "programs": state.programs,
        "objects": snapshot.counts,
        "workloads": snapshot.workloads.len(),
        "local_endpoints": report.endpoints.len(),
        "services": snapshot.services.len(),
        "outbound_traffic_policy": snapshot.outbound_traffic_policy,
        "kernel": { "services": report.services, "ipcache": report.ipcache },
        "policy": {
            "entries": report.policy_entries,
            "revision": report.policy_revision,
            "network_policies": snapshot.network_policies.len(),
            "fingerprint": policy_fingerprint(&snapshot),
        },
        "last_sync": { "seconds": report.apply_seconds, "changes": report.changes },
        "rebuilds": state.source.lock().unwrap_or_else(|e| e.into_inner()).rebuilds,
        "maps": occupancy,
        "outbound": state.outbound.stats,
        "http": state.outbound.http_stats(),
        "http_pools": state.outbound.http_pools(),
        "routes": snapshot.routes.status,
        "trafficPolicies": snapshot.traffic,
        "endpoints": state.outbound.http_endpoints(),
        "inbound": state.inbound.stats,
        "jwks": crate::policy::jwks::status(),
        "hbone_pool": { "stats": state.pool.stats, "connections": state.pool.list() },
    })
}

/// `GET /policies`: every authorization policy, with the local workloads it
/// selects.
pub fn policies(state: &AdminState) -> serde_json::Value {
    let snapshot = state.snapshot.borrow().clone();
    let local: Vec<_> = snapshot.local_workloads(&state.config.node).collect();
    let policies: Vec<serde_json::Value> = snapshot
        .policies
        .iter()
        .map(|p| {
            let selects: Vec<String> = local
                .iter()
                .filter(|w| p.applies_to(w))
                .map(|w| w.id())
                .collect();
            serde_json::json!({
                "policy": p.id(),
                "action": p.action,
                "provider": p.provider,
                "selector": p.selector,
                "rules": p.rules.len(),
                "selects": selects,
                "spec": p,
            })
        })
        .collect();
    let network: Vec<serde_json::Value> = snapshot
        .network_policies
        .iter()
        .map(|p| {
            let selects: Vec<String> = local
                .iter()
                .filter(|w| p.selects(&w.namespace, &w.labels))
                .map(|w| w.id())
                .collect();
            let mut types = Vec::new();
            if p.ingress.is_some() {
                types.push("Ingress");
            }
            if p.egress.is_some() {
                types.push("Egress");
            }
            serde_json::json!({
                "policy": p.id(),
                "types": types,
                "ingress_rules": p.ingress.as_ref().map_or(0, Vec::len),
                "egress_rules": p.egress.as_ref().map_or(0, Vec::len),
                "selects": selects,
            })
        })
        .collect();
    let authentication: Vec<serde_json::Value> = snapshot
        .authentications
        .values()
        .flatten()
        .map(|a| {
            let selects: Vec<String> = local
                .iter()
                .filter(|w| a.applies_to(w))
                .map(|w| w.id())
                .collect();
            serde_json::json!({
                "policy": format!("{}/{}", a.namespace, a.name),
                "selector": a.selector,
                "rules": a.rules,
                "selects": selects,
            })
        })
        .collect();
    serde_json::json!({
        "node": state.config.node,
        "authorization": policies,
        "authentication": authentication,
        // What each local workload's mode comes out as is in `workloads`.
        "peer_authentication": snapshot.peer_authentications,
        // Likewise what each local workload reports.
        "telemetry": snapshot.telemetry.policies,
        "network": network,
    })
}

/// `GET /workloads`.
pub fn workloads(state: &AdminState) -> serde_json::Value {
    let snapshot = state.snapshot.borrow().clone();
    let report = report(state);
    let endpoints: Vec<serde_json::Value> = report
        .endpoints
        .iter()
        .map(|e| {
            let w = snapshot.workload(&e.workload);
            // What its Telemetry policies change, side by side (null when
            // nothing: everything is reported as the flags say).
            let telemetry = w.and_then(|w| {
                let [client, server] =
                    [Side::Client, Side::Server].map(|side| snapshot.telemetry.reporting(w, side));
                let default = Reporting::everything();
                (*client != *default || *server != *default)
                    .then(|| serde_json::json!({"client": client, "server": server}))
            });
            serde_json::json!({
                "workload": e.workload,
                "ips": w.map(|w| w.ips.clone()).unwrap_or_default(),
                "service_account": w.map(|w| w.service_account.clone()),
                "meshed": e.meshed,
                "mtls": e.mtls,
                "mtls_ports": e.mtls_ports,
                "telemetry": telemetry,
                "tc_hooked": e.tc_hooked,
                "ready": w.is_some_and(|w| w.ready && !w.terminating),
                "endpoint_id": e.endpoint_id,
                "identity": e.identity,
                "netns_cookie": e.netns_cookie,
                "ifindex": e.ifindex,
                "interface": ifname(e.ifindex),
            })
        })
        .collect();
    serde_json::json!({
        "node": state.config.node,
        "endpoints": endpoints,
        "services": snapshot.services,
    })
}

/// `GET /maps`: the same decoding as `trellis maps`.
pub fn maps(state: &AdminState) -> Result<serde_json::Value, bpf::BpfError> {
    bpf::maps::dump(&state.config.bpffs)
}

fn ifname(index: u32) -> Option<String> {
    if index == 0 {
        return None;
    }
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    #[expect(unsafe_code, reason = "if_indextoname")]
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if ptr.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// `/certs`: what `trellis certs` shows. Certificates and roots only: the
/// keys never leave the manager.
fn certs(state: &AdminState) -> serde_json::Value {
    let now = std::time::SystemTime::now();
    let certs: Vec<serde_json::Value> = state
        .certs
        .list()
        .into_iter()
        .map(|info| {
            let renew_in = info.renew_at.duration_since(now).map_or(0, |d| d.as_secs());
            let mut v = serde_json::to_value(&info).unwrap_or_default();
            v["renew_in_seconds"] = renew_in.into();
            v
        })
        .collect();
    let roots = state.certs.bundle().roots();
    let subjects: Vec<String> = roots
        .iter()
        .map(|r| crate::identity::ca::subject_of(r).unwrap_or_else(|e| e))
        .collect();
    serde_json::json!({
        "source": state.certs.origin(),
        "lifetime_seconds": state.certs.lifetime().as_secs(),
        "trust_bundle_roots": roots.len(),
        "trust_bundle": subjects,
        "reloads": state.certs.reload_stats(),
        "certificates": certs,
    })
}
