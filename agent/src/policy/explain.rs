//! `trellis policy POD` and `trellis policy explain SRC DST PORT`: a pod's
//! network policy as the pinned policy map holds it, and which rule allows
//! or denies one connection and why, with the verdicts the kernel makes
//! ([`super::verdict`] reads the same maps with the same function).

use std::{net::IpAddr, path::Path};

use serde_json::{Value, json};
use trellis_common::{direction, identity};

use super::{
    compiler::IdentityOf,
    network::{SCTP, TCP, UDP},
    verdict::{Judgement, Verdicts},
};
use crate::{
    bpf::{self, BpfError},
    state::{Snapshot, Workload},
    sync::PolicyView,
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0}: no such pod in the state (give namespace/name, or an IP address)")]
    UnknownPod(String),
    #[error("{pod} runs on node {node}, not on {here}: ask that node's agent")]
    NotHere {
        pod: String,
        node: String,
        here: String,
    },
    #[error("{0}: not a protocol network policies name (TCP, UDP or SCTP)")]
    Protocol(String),
    #[error(
        "neither {src} nor {dst} is a pod of this node ({here}): no policy here decides; ask the agent of the source's or the destination's node"
    )]
    NeitherHere {
        src: String,
        dst: String,
        here: String,
    },
    #[error(transparent)]
    Map(#[from] BpfError),
}

/// A pod (`namespace/name`, or `name` in `default`).
fn find_pod<'a>(snapshot: &'a Snapshot, name: &str) -> Option<&'a Workload> {
    let id = if name.contains('/') {
        name.to_owned()
    } else {
        format!("default/{name}")
    };
    snapshot.workload(&id)
}

/// An identity, in words.
pub fn describe(view: &PolicyView, id: u32) -> String {
    if let Some(name) = identity::reserved_name(id) {
        return name.to_owned();
    }
    if id & identity::SERVICE_BASE != 0 {
        return format!("service #{}", id & !identity::SERVICE_BASE);
    }
    match view.identities.describe(id) {
        Some(IdentityOf::Pods { namespace, labels }) => {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("pods of {namespace} with {{{}}}", labels.join(","))
        }
        Some(IdentityOf::Cidr(c)) => format!("addresses in {c}"),
        None => "unknown".to_owned(),
    }
}

/// The policies of the pod's namespace that select it for `dir`.
fn selecting(snapshot: &Snapshot, w: &Workload, dir: u8) -> Vec<String> {
    snapshot
        .network_policies
        .iter()
        .filter(|p| p.selects(&w.namespace, &w.labels) && p.rules(dir).is_some())
        .map(super::network::NetworkPolicy::id)
        .collect()
}

/// `GET /policy/pod?name=`: the local pod's identity and, per direction,
/// whether it is isolated, by which policies, and the entries of the
/// pinned policy map that allow traffic, each with the rule it came from.
pub fn pod_policy(
    bpffs: &Path,
    snapshot: &Snapshot,
    view: &PolicyView,
    node: &str,
    name: &str,
) -> Result<Value, ExplainError> {
    let w = find_pod(snapshot, name).ok_or_else(|| ExplainError::UnknownPod(name.into()))?;
    let Some(&endpoint_id) = view.endpoints.get(&w.id()) else {
        return Err(ExplainError::NotHere {
            pod: w.id(),
            node: w.node.clone(),
            here: node.into(),
        });
    };
    let entries = bpf::maps::policy(bpffs)?;
    let id = view.identities.of_workload(w);
    let mut doc = json!({
        "pod": w.id(),
        "node": node,
        "ips": w.ips,
        "endpoint_id": endpoint_id,
        "identity": id,
        "identity_is": describe(view, id),
        "named_ports": w.named_ports,
    });
    for dir in [direction::INGRESS, direction::EGRESS] {
        let policies = selecting(snapshot, w, dir);
        let allows: Vec<Value> = entries
            .iter()
            .filter(|e| e.endpoint_id == endpoint_id && e.direction == direction::name(dir))
            .filter(|e| e.identity.is_some())
            .map(|e| {
                let peer = e.identity.unwrap_or_default();
                json!({
                    "peer_identity": peer,
                    "peer": describe(view, peer),
                    "protocol": e.protocol.map_or("any", super::network::protocol_name),
                    "ports": e.ports.clone().unwrap_or_else(|| "any".into()),
                    "rule": view.compiled.rule(e.rule_id).map(ToString::to_string),
                })
            })
            .collect();
        doc[direction::name(dir)] = json!({
            "isolated": !policies.is_empty(),
            "policies": policies,
            "allows": if policies.is_empty() { json!("everything (not isolated)") } else { json!(allows) },
        });
    }
    Ok(doc)
}

/// One side of an explained connection.
struct End<'a> {
    given: String,
    ip: IpAddr,
    pod: Option<&'a Workload>,
}

fn end<'a>(snapshot: &'a Snapshot, given: &str, v6: Option<bool>) -> Result<End<'a>, ExplainError> {
    if let Ok(ip) = given.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        return Ok(End {
            given: given.into(),
            ip,
            pod: snapshot.workload_by_ip(ip),
        });
    }
    let w = find_pod(snapshot, given).ok_or_else(|| ExplainError::UnknownPod(given.into()))?;
    let ip = w
        .ips
        .iter()
        .find(|ip| v6.is_none_or(|v6| ip.is_ipv6() == v6))
        .or(w.ips.first())
        .copied()
        .ok_or_else(|| ExplainError::UnknownPod(format!("{given} (it has no IP yet)")))?;
    Ok(End {
        given: w.id(),
        ip,
        pod: Some(w),
    })
}

fn protocol_number(name: &str) -> Result<u8, ExplainError> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Ok(TCP),
        "UDP" => Ok(UDP),
        "SCTP" => Ok(SCTP),
        _ => Err(ExplainError::Protocol(name.into())),
    }
}

/// Why a judgement came out as it did, in a sentence.
fn why(
    view: &PolicyView,
    snapshot: &Snapshot,
    w: &Workload,
    j: &Judgement,
    protocol: &str,
) -> String {
    let dir = j.direction;
    let pod = w.id();
    match j.reason {
        "not-isolated" => {
            format!("{pod} is not isolated for {dir}: no network policy selects it for {dir}")
        }
        "host" => format!(
            "the peer {} is this node: a node always reaches its pods",
            j.peer
        ),
        "policy-allowed" => format!(
            "allowed by {} (peer {}: identity {}, {})",
            j.rule.as_deref().unwrap_or("?"),
            j.peer,
            j.peer_identity,
            describe(view, j.peer_identity)
        ),
        _ => {
            let dir_number = if dir == "ingress" {
                direction::INGRESS
            } else {
                direction::EGRESS
            };
            let mut text = format!(
                "{pod} is isolated for {dir} by {}, and no rule of theirs allows {} (identity {}, {}",
                selecting(snapshot, w, dir_number).join(", "),
                j.peer,
                j.peer_identity,
                describe(view, j.peer_identity)
            );
            if j.peer_cidr_identity != 0 {
                text += &format!("; in {}", describe(view, j.peer_cidr_identity));
            }
            text += &format!(") on {protocol}/{}", j.port);
            text
        }
    }
}

/// `GET /policy/explain?src=&dst=&port=&protocol=`: the source's egress
/// verdict when it is a pod of this node, the destination's ingress
/// verdict when that is, each with the rule and the reason.
pub fn explain(
    verdicts: &Verdicts,
    snapshot: &Snapshot,
    node: &str,
    src: &str,
    dst: &str,
    port: u16,
    protocol: &str,
) -> Result<Value, ExplainError> {
    let proto = protocol_number(protocol)?;
    let protocol = super::network::protocol_name(proto);
    let dst = end(snapshot, dst, None)?;
    let src = end(snapshot, src, Some(dst.ip.is_ipv6()))?;
    let view = verdicts.view();
    let mut steps = Vec::new();
    let mut elsewhere = Vec::new();
    for (dir, this, peer) in [
        (direction::EGRESS, &src, &dst),
        (direction::INGRESS, &dst, &src),
    ] {
        let local = this.pod.filter(|w| view.endpoints.contains_key(&w.id()));
        match (local, this.pod) {
            (Some(w), _) => {
                let j = verdicts.judge(dir, &w.id(), peer.ip, proto, port);
                let mut step = serde_json::to_value(&j).unwrap_or_default();
                step["why"] = why(&view, snapshot, w, &j, protocol).into();
                steps.push(step);
            }
            (None, Some(w)) => elsewhere.push(format!(
                "{} policy of {} is judged on node {}",
                direction::name(dir),
                w.id(),
                w.node
            )),
            (None, None) => {}
        }
    }
    if steps.is_empty() {
        return Err(ExplainError::NeitherHere {
            src: src.given,
            dst: dst.given,
            here: node.into(),
        });
    }
    let allowed = steps.iter().all(|s| s["allowed"] == true);
    Ok(json!({
        "node": node,
        "source": { "name": src.given, "ip": src.ip },
        "destination": { "name": dst.given, "ip": dst.ip },
        "protocol": protocol,
        "port": port,
        "allowed": allowed,
        "steps": steps,
        "judged_elsewhere": elsewhere,
    }))
}
