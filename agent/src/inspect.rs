//! The commands that inspect a running node (`trellis status`, `trellis
//! workloads`): fetch the admin API's JSON and print it as tables or as is.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "cannot reach the agent's admin API at {addr}: {source} (run this in the node's network namespace, where the agent runs; see --admin-addr)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API {addr}{path}: {reason}")]
    Http {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
}

/// GETs `path` from the admin API and parses the JSON.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<Value, InspectError> {
    let body = fetch_bytes(addr, path).await?;
    serde_json::from_slice(&body).map_err(|e| InspectError::Http {
        addr,
        path: path.to_owned(),
        reason: format!("not JSON: {e}"),
    })
}

/// GET `path` from the admin API at `addr`: the body as text.
pub async fn fetch_text(addr: SocketAddr, path: &str) -> Result<String, InspectError> {
    Ok(String::from_utf8_lossy(&fetch_bytes(addr, path).await?).into_owned())
}

async fn fetch_bytes(addr: SocketAddr, path: &str) -> Result<Bytes, InspectError> {
    let http = |reason: String| InspectError::Http {
        addr,
        path: path.to_owned(),
        reason,
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| InspectError::Connect {
            addr,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| InspectError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(http(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    Ok(body)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `trellis status` as text.
pub fn render_status(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node:          {}", s(&doc["node"]));
    let _ = writeln!(out, "version:       {}", s(&doc["version"]));
    let ready = if doc["ready"] == Value::Bool(true) {
        "yes".to_string()
    } else {
        format!("no (waiting for: {})", s(&doc["missing"]))
    };
    let _ = writeln!(out, "ready:         {ready}");
    let _ = writeln!(out, "capture:       {}", s(&doc["capture"]));
    let accel = &doc["acceleration"];
    let _ = writeln!(
        out,
        "acceleration:  sk_msg {}, splice {}",
        on_off(&accel["sk_msg"]),
        on_off(&accel["splice"])
    );
    let _ = writeln!(
        out,
        "state:         {} workloads ({} on this node), {} services",
        s(&doc["workloads"]),
        s(&doc["local_endpoints"]),
        s(&doc["services"])
    );
    let r = &doc["rebuilds"];
    let last = &r["last"];
    let _ = writeln!(
        out,
        "rebuilds:      {} ({:.3} s in all, {} polls put off); the last took {:.3} s and reused {} of {} workloads, {} of {} services",
        s(&r["rebuilds"]),
        r["seconds"].as_f64().unwrap_or(0.0),
        s(&r["deferred"]),
        r["last_seconds"].as_f64().unwrap_or(0.0),
        s(&last["workloads_reused"]),
        last["workloads_reused"].as_u64().unwrap_or(0)
            + last["workloads_made"].as_u64().unwrap_or(0),
        s(&last["services_reused"]),
        last["services_reused"].as_u64().unwrap_or(0) + last["services_made"].as_u64().unwrap_or(0),
    );
    let o = &doc["outbound"];
    let _ = writeln!(
        out,
        "outbound:      {} accepted, {} completed, {} accelerated, {} spliced, {} refused (no original destination), {} no backend, {} connect failures, {} idle timeouts, {} sniffed ({} timed out)",
        s(&o["accepted"]),
        s(&o["completed"]),
        s(&o["accelerated"]),
        s(&o["spliced"]),
        s(&o["no_original_destination"]),
        s(&o["no_backend"]),
        s(&o["connect_failed"]),
        s(&o["idle_timeouts"]),
        s(&o["sniffed"]),
        s(&o["sniff_timeouts"]),
    );
    let _ = writeln!(out, "\nPROGRAMS");
    for p in doc["programs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<14} {:<9} {}",
            s(&p["name"]),
            s(&p["attachment"]),
            s(&p["link"])
        );
    }
    let _ = writeln!(
        out,
        "\nMAPS\n  {:<16} {:<14} {:>9} {:>9}",
        "NAME", "TYPE", "ENTRIES", "MAX"
    );
    for m in doc["maps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<16} {:<14} {:>9} {:>9}",
            s(&m["name"]),
            s(&m["type"]),
            s(&m["entries"]),
            s(&m["max_entries"])
        );
    }
    out
}

fn on_off(v: &Value) -> &'static str {
    if *v == Value::Bool(true) { "on" } else { "off" }
}

/// `trellis certs` as text.
pub fn render_certs(doc: &Value) -> String {
    let mut out = String::new();
    let source = &doc["source"];
    let _ = writeln!(
        out,
        "SOURCE {} {}   lifetime {}s   reloads {} (refused {})",
        s(&source["kind"]),
        s(&source["dir"]),
        s(&doc["lifetime_seconds"]),
        s(&doc["reloads"]["reloads"]),
        s(&doc["reloads"]["errors"]),
    );
    if let Some(error) = doc["reloads"]["last_error"].as_str() {
        let _ = writeln!(out, "  last refused: {error}");
    }
    let _ = writeln!(
        out,
        "TRUST BUNDLE: {} root(s)",
        s(&doc["trust_bundle_roots"])
    );
    for root in doc["trust_bundle"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {}", s(root));
    }
    let _ = writeln!(
        out,
        "  {:<52} {:<34} {:>11} {:>11} {:>9}  ISSUERS",
        "IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "RENEW IN"
    );
    for c in doc["certificates"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<52} {:<34} {:>11} {:>11} {:>8}s  {}",
            s(&c["identity"]),
            s(&c["serial"]),
            s(&c["not_before"]),
            s(&c["not_after"]),
            s(&c["renew_in_seconds"]),
            s(&c["issuers"]),
        );
    }
    out
}

/// A policy's `matchLabels` as `k=v,k=v`, or the whole namespace.
fn selector_text(selector: &Value) -> String {
    match selector.as_object() {
        Some(labels) => labels
            .iter()
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect::<Vec<_>>()
            .join(","),
        None => "(whole namespace)".into(),
    }
}

/// Ports and their mTLS modes as `9090 PERMISSIVE, ...`; `None` for none.
fn port_modes(ports: &Value) -> Option<String> {
    let ports = ports.as_object().filter(|p| !p.is_empty())?;
    Some(
        ports
            .iter()
            .map(|(port, mode)| format!("{port} {}", s(mode)))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// `trellis policy` as text.
pub fn render_policies(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "AUTHORIZATION POLICIES seen by {}", s(&doc["node"]));
    let _ = writeln!(
        out,
        "  {:<36} {:<6} {:>5}  {:<28} SELECTS ON THIS NODE",
        "POLICY", "ACTION", "RULES", "SELECTOR"
    );
    for p in doc["authorization"].as_array().into_iter().flatten() {
        let selector = selector_text(&p["selector"]);
        let selects: Vec<String> = p["selects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let _ = writeln!(
            out,
            "  {:<36} {:<6} {:>5}  {:<28} {}",
            s(&p["policy"]),
            s(&p["action"]),
            s(&p["rules"]),
            selector,
            if selects.is_empty() {
                "-".into()
            } else {
                selects.join(" ")
            }
        );
        if let Some(provider) = p["provider"].as_str() {
            let _ = writeln!(out, "    asks provider {provider}");
        }
    }
    if let Some(peer) = doc["peer_authentication"]
        .as_array()
        .filter(|a| !a.is_empty())
    {
        let _ = writeln!(out, "\nPEER AUTHENTICATION (mTLS)");
        let _ = writeln!(
            out,
            "  {:<36} {:<11} {:<28} PORTS",
            "POLICY", "MODE", "SELECTOR"
        );
        for p in peer {
            let selector = selector_text(&p["selector"]);
            let ports = port_modes(&p["ports"]).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:<36} {:<11} {:<28} {ports}",
                format!("{}/{}", s(&p["namespace"]), s(&p["name"])),
                s(&p["mode"]),
                selector
            );
        }
    }
    if let Some(telemetry) = doc["telemetry"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(out, "\nTELEMETRY (per workload: trellis workloads)");
        let _ = writeln!(out, "  {:<36} {:<28} PARTS", "POLICY", "SELECTOR");
        for t in telemetry {
            let parts: Vec<&str> = [
                ("tracing", "tracing"),
                ("logging", "accessLogging"),
                ("metrics", "metrics"),
            ]
            .into_iter()
            .filter(|(key, _)| t[*key].as_array().is_some_and(|a| !a.is_empty()))
            .map(|(_, name)| name)
            .collect();
            let _ = writeln!(
                out,
                "  {:<36} {:<28} {}",
                format!("{}/{}", s(&t["namespace"]), s(&t["name"])),
                selector_text(&t["selector"]),
                parts.join(",")
            );
        }
    }
    if let Some(authentication) = doc["authentication"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(out, "\nREQUEST AUTHENTICATION (JWT)");
        let _ = writeln!(
            out,
            "  {:<36} {:<40} KEYS  SELECTS ON THIS NODE",
            "POLICY", "ISSUER"
        );
        for a in authentication {
            let selects: Vec<String> = a["selects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            for rule in a["rules"].as_array().into_iter().flatten() {
                let keys = match rule["jwksUri"].as_str() {
                    Some(uri) => uri.to_string(),
                    None => format!("inline {}", s(&rule["kids"])),
                };
                let _ = writeln!(
                    out,
                    "  {:<36} {:<40} {keys}  {}",
                    s(&a["policy"]),
                    s(&rule["issuer"]),
                    if selects.is_empty() {
                        "-".into()
                    } else {
                        selects.join(" ")
                    }
                );
            }
        }
    }
    if let Some(network) = doc["network"].as_array() {
        let _ = writeln!(out, "\nNETWORK POLICIES");
        let _ = writeln!(
            out,
            "  {:<36} {:<16} {:>7} {:>6}  SELECTS ON THIS NODE",
            "POLICY", "TYPES", "INGRESS", "EGRESS"
        );
        for p in network {
            let selects = s(&p["selects"]);
            let _ = writeln!(
                out,
                "  {:<36} {:<16} {:>7} {:>6}  {}",
                s(&p["policy"]),
                s(&p["types"]),
                s(&p["ingress_rules"]),
                s(&p["egress_rules"]),
                if selects.is_empty() {
                    "-".into()
                } else {
                    selects.replace(',', " ")
                }
            );
        }
    }
    out
}

/// `trellis policy POD` as text.
pub fn render_pod_policy(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "POD {}  on {}  endpoint {}  identity {} ({})",
        s(&doc["pod"]),
        s(&doc["node"]),
        s(&doc["endpoint_id"]),
        s(&doc["identity"]),
        s(&doc["identity_is"])
    );
    for dir in ["ingress", "egress"] {
        let d = &doc[dir];
        let _ = writeln!(out, "\n{}", dir.to_uppercase());
        if d["isolated"] != true {
            let _ = writeln!(out, "  not isolated: every peer allowed");
            continue;
        }
        let _ = writeln!(out, "  isolated by: {}", s(&d["policies"]));
        let allows: Vec<&Value> = d["allows"].as_array().into_iter().flatten().collect();
        if allows.is_empty() {
            let _ = writeln!(out, "  nothing allowed (deny all)");
            continue;
        }
        let _ = writeln!(
            out,
            "  {:>10}  {:<44} {:<6} {:<12} RULE",
            "IDENTITY", "PEER", "PROTO", "PORTS"
        );
        for a in allows {
            let _ = writeln!(
                out,
                "  {:>10}  {:<44} {:<6} {:<12} {}",
                s(&a["peer_identity"]),
                s(&a["peer"]),
                s(&a["protocol"]),
                s(&a["ports"]),
                s(&a["rule"])
            );
        }
    }
    out
}

/// `trellis policy explain` as text.
pub fn render_explain(doc: &Value) -> String {
    let mut out = String::new();
    let verdict = if doc["allowed"] == true {
        "ALLOWED"
    } else {
        "DENIED"
    };
    let _ = writeln!(
        out,
        "{} ({}) -> {} ({}) {}/{}: {verdict}",
        s(&doc["source"]["name"]),
        s(&doc["source"]["ip"]),
        s(&doc["destination"]["name"]),
        s(&doc["destination"]["ip"]),
        s(&doc["protocol"]),
        s(&doc["port"]),
    );
    for step in doc["steps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<8} of {:<24} {:<8} {}",
            s(&step["direction"]),
            s(&step["endpoint"]),
            if step["allowed"] == true {
                "allowed"
            } else {
                "denied"
            },
            s(&step["why"])
        );
    }
    for note in doc["judged_elsewhere"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  (the {})", s(note));
    }
    out
}

/// One flow of `trellis flows`, Hubble-like.
pub fn render_flow(f: &Value) -> String {
    let side = |v: &Value| {
        let who = match v["pod"].as_str() {
            Some(pod) => pod.to_owned(),
            None => v["identity_name"]
                .as_str()
                .map_or_else(|| s(&v["ip"]), |n| format!("{} ({n})", s(&v["ip"]))),
        };
        if v["port"] == 0 {
            who
        } else {
            format!("{who}:{}", s(&v["port"]))
        }
    };
    let verdict = if f["verdict"] == "allowed" {
        "ALLOWED"
    } else {
        "DENIED "
    };
    let hook = match f["via"].as_str() {
        Some(via) => format!("agent/{via}"),
        None => s(&f["hook"]),
    };
    let rule = f["policy"]
        .as_str()
        .map_or(String::new(), |r| format!(" by {r}"));
    format!(
        "{} {:<8} {:<28} -> {:<28} {:<4} {verdict} {} {} ({}){rule}",
        s(&f["time"]),
        s(&f["node"]),
        side(&f["source"]),
        side(&f["destination"]),
        s(&f["protocol"]),
        s(&f["direction"]),
        s(&f["reason"]),
        hook,
    )
}

/// `trellis config` as text: routes first (what a user checks after
/// applying one), then policies, then the agent's settings.
pub fn render_config(doc: &Value) -> String {
    let mut out = String::new();
    let statuses = doc["routes"]["status"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "routes:");
    if statuses.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for r in &statuses {
        let _ = writeln!(
            out,
            "  {} {}/{}",
            s(&r["kind"]),
            s(&r["namespace"]),
            s(&r["name"])
        );
        for c in r["conditions"].as_array().into_iter().flatten() {
            let message = c["message"].as_str().filter(|m| !m.is_empty());
            let _ = writeln!(
                out,
                "    {}={} ({}){}",
                s(&c["type"]),
                if c["status"] == Value::Bool(true) {
                    "True"
                } else {
                    "False"
                },
                s(&c["reason"]),
                message.map(|m| format!(": {m}")).unwrap_or_default()
            );
        }
    }
    if let Some(services) = doc["routes"]["services"].as_object() {
        for (service, ports) in services {
            for (port, routes) in ports.as_object().into_iter().flatten() {
                let count = |v: &Value| v.as_array().map_or(0, Vec::len);
                let consumers = routes["consumer"].as_object().map_or(0, |c| c.len());
                let _ = writeln!(
                    out,
                    "  {service}:{port}: {} producer rules, consumer rules for {consumers} namespaces",
                    count(&routes["producer"])
                );
            }
        }
    }
    let traffic = doc["trafficPolicies"]
        .as_object()
        .map(|m| m.keys().cloned().collect::<Vec<_>>());
    let _ = writeln!(
        out,
        "traffic policies: {}",
        traffic
            .filter(|t| !t.is_empty())
            .map_or("(none)".into(), |t| t.join(", "))
    );
    let authz: Vec<String> = doc["authorizationPolicies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{} ({})",
                s(&p["namespace"]),
                s(&p["name"]),
                s(&p["action"])
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "authorization policies: {}",
        if authz.is_empty() {
            "(none)".into()
        } else {
            authz.join(", ")
        }
    );
    let _ = writeln!(out, "settings:");
    for (k, v) in doc["settings"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {k}: {}", s(v));
    }
    out
}

/// `trellis topology` as text: one line per edge.
pub fn render_topology(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<40} {:<7} {:>5} {:>8} {:>7} {:>6} {:>12} {:>8} {:>7}",
        "FROM", "TO", "PROTO", "MTLS", "REQUESTS", "ERR %", "CONNS", "BYTES", "ALLOWED", "DENIED"
    );
    for e in doc["edges"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<34} {:<40} {:<7} {:>5} {:>8} {:>7.1} {:>6} {:>12} {:>8} {:>7}",
            s(&e["from"]),
            s(&e["to"]),
            s(&e["protocol"]),
            if e["mtls"] == Value::Bool(true) {
                "yes"
            } else {
                "no"
            },
            s(&e["requests"]),
            e["error_ratio"].as_f64().unwrap_or(0.0) * 100.0,
            s(&e["connections"]),
            s(&e["bytes"]),
            s(&e["allowed"]),
            s(&e["denied"]),
        );
    }
    out
}

/// One side's reporting, in a few words.
fn reporting_text(r: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(ppm) = r["sampling_ppm"].as_u64() {
        parts.push(format!("sampling {}%", ppm as f64 / 10_000.0));
    }
    if r["report_spans"] == false {
        parts.push("spans not reported".into());
    }
    let tags: Vec<&str> = r["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t[0].as_str())
        .collect();
    if !tags.is_empty() {
        parts.push(format!("span tags {}", tags.join(",")));
    }
    if r["access_log"] == false {
        parts.push("no access log".into());
    } else if let Some(filter) = r["log_filter"].as_str() {
        parts.push(format!("access log if {filter}"));
    }
    let off: Vec<&str> = r["metrics_off"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !off.is_empty() {
        parts.push(format!("metrics off {}", off.join(",")));
    }
    if let Some(relabels) = r["relabels"].as_object().filter(|m| !m.is_empty()) {
        let metrics: Vec<&str> = relabels.keys().map(String::as_str).collect();
        parts.push(format!("labels changed on {}", metrics.join(",")));
    }
    if parts.is_empty() {
        "as the flags say".into()
    } else {
        parts.join("; ")
    }
}

/// `trellis workloads` as text.
pub fn render_workloads(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "ENDPOINTS on {}", s(&doc["node"]));
    let _ = writeln!(
        out,
        "  {:<28} {:<30} {:<7} {:<11} {:<6} {:>4} {:>8} {:>20} {:<16}",
        "WORKLOAD", "IPS", "MESHED", "MTLS", "READY", "ID", "IDENTITY", "NETNS COOKIE", "INTERFACE"
    );
    let mut own_modes = Vec::new();
    for e in doc["endpoints"].as_array().into_iter().flatten() {
        let ports = port_modes(&e["mtls_ports"]);
        if let Some(ports) = &ports {
            own_modes.push(format!("{}: {ports}", s(&e["workload"])));
        }
        let _ = writeln!(
            out,
            "  {:<28} {:<30} {:<7} {:<11} {:<6} {:>4} {:>8} {:>20} {:<16}",
            s(&e["workload"]),
            s(&e["ips"]),
            s(&e["meshed"]),
            format!(
                "{}{}{}",
                s(&e["mtls"]),
                if ports.is_some() { "+" } else { "" },
                if e["tc_hooked"] == true { "" } else { "*" }
            ),
            s(&e["ready"]),
            s(&e["endpoint_id"]),
            s(&e["identity"]),
            s(&e["netns_cookie"]),
            format!("{} ({})", s(&e["interface"]), s(&e["ifindex"])),
        );
    }
    let _ = writeln!(
        out,
        "  (* no TC programs on its interface: STRICT not enforced there)"
    );
    if !own_modes.is_empty() {
        let _ = writeln!(
            out,
            "  (+ ports with their own mode) {}",
            own_modes.join("; ")
        );
    }
    let reports: Vec<(&Value, &Value)> = doc["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| !e["telemetry"].is_null())
        .map(|e| (&e["workload"], &e["telemetry"]))
        .collect();
    if !reports.is_empty() {
        let _ = writeln!(out, "\nTELEMETRY (what differs from the flags)");
        for (workload, t) in reports {
            for side in ["client", "server"] {
                let _ = writeln!(
                    out,
                    "  {:<28} {side:<6} {}",
                    s(workload),
                    reporting_text(&t[side])
                );
            }
        }
    }
    out.push('\n');
    out.push_str(&render_services(doc));
    out
}

/// `trellis services` as text: each Service (or ServiceEntry, with its
/// hosts), its VIPs, and per port its backends with their state.
pub fn render_services(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "SERVICES");
    for svc in doc["services"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {}/{}  {}",
            s(&svc["namespace"]),
            s(&svc["name"]),
            s(&svc["vips"])
        );
        if let Some(entry) = svc["entry"].as_object() {
            let _ = writeln!(
                out,
                "    ServiceEntry {} {}",
                s(&entry["location"]),
                s(&entry["hosts"])
            );
        }
        for (port, backends) in svc["backends"].as_object().into_iter().flatten() {
            for b in backends.as_array().into_iter().flatten() {
                let state = match (b["ready"].as_bool(), b["terminating"].as_bool()) {
                    (_, Some(true)) => "terminating",
                    (Some(true), _) => "ready",
                    _ => "not ready",
                };
                let _ = writeln!(
                    out,
                    "    :{port:<6} -> {:<28} {:<28} {state}",
                    s(&b["addr"]),
                    s(&b["workload"])
                );
            }
        }
    }
    out
}

/// Prints rows of JSON objects as a table with the given columns.
fn table(out: &mut String, title: &str, rows: &Value, columns: &[&str]) {
    let rows: Vec<&Value> = rows.as_array().into_iter().flatten().collect();
    let _ = writeln!(out, "{title} ({})", rows.len());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| s(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<String>| {
        values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(
        out,
        "  {}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for row in cells {
        let _ = writeln!(out, "  {}", line(row).trim_end());
    }
    out.push('\n');
}

/// `trellis maps` as text: every pinned map, decoded field by field.
pub fn render_maps(doc: &Value) -> String {
    let mut out = String::new();
    table(
        &mut out,
        "MAPS",
        &doc["occupancy"],
        &["name", "type", "entries", "max_entries"],
    );
    table(
        &mut out,
        "COUNTERS",
        &doc["counters"],
        &[
            "hook",
            "verdict",
            "reason",
            "endpoint_id",
            "events",
            "bytes",
        ],
    );
    table(
        &mut out,
        "ENDPOINTS",
        &doc["endpoints"],
        &[
            "endpoint_id",
            "netns_cookie",
            "identity",
            "flags",
            "ifindex",
        ],
    );
    table(
        &mut out,
        "SERVICES",
        &doc["services"],
        &["vip", "service_id", "flags"],
    );
    table(
        &mut out,
        "IPCACHE",
        &doc["ipcache"],
        &["prefix", "identity", "flags"],
    );
    table(
        &mut out,
        "ORIGINAL DESTINATIONS",
        &doc["orig_by_tuple"],
        &[
            "client",
            "original_destination",
            "endpoint_id",
            "service_id",
        ],
    );
    table(
        &mut out,
        "SOCKETS",
        &doc["sockets"],
        &[
            "local",
            "remote",
            "owner",
            "mode",
            "sent",
            "forwarded",
            "splice_to",
            "backlogged",
        ],
    );
    out
}
