//! The service graph this node has seen, for `trellis topology` and the
//! admin API's `/topology`: workloads and Services as nodes, edges with
//! requests, errors, bytes and connections (from the same records as the
//! Istio metrics) and the kernel's and agent's policy verdicts (from the flow
//! log), as JSON or Graphviz DOT.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::Mutex,
    time::Instant,
};

use serde::Serialize;

use super::istio::Traffic;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct EdgeKey {
    from: String,
    to: String,
    protocol: &'static str,
    mtls: bool,
}

/// Kept per piece of traffic (its labels are hashed once and compared by
/// pointer), split into named edges only when the graph is read: the hot
/// path makes no string.

#[derive(Clone, Copy, Debug)]
struct EdgeStats {
    requests: u64,
    errors: u64,
    connections: u64,
    bytes: u64,
    first: Instant,
    last: Instant,
}

/// Traffic seen, by its labels.
#[derive(Debug, Default)]
pub struct Topology {
    traffic: Mutex<HashMap<Traffic, EdgeStats>>,
}

/// A node's name in the graph: `namespace/workload`, or a Service's host.
fn workload(p: &super::istio::Peer) -> String {
    if p.workload == "unknown" {
        "unknown".into()
    } else {
        format!("{}/{}", p.namespace, p.workload)
    }
}

impl Topology {
    fn add(&self, t: &Traffic, f: impl FnOnce(&mut EdgeStats)) {
        let now = Instant::now();
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = traffic.get_mut(t) {
            e.last = now;
            f(e);
            return;
        }
        let mut e = EdgeStats {
            requests: 0,
            errors: 0,
            connections: 0,
            bytes: 0,
            first: now,
            last: now,
        };
        f(&mut e);
        traffic.insert(t.clone(), e);
    }

    /// The edges of one piece of traffic: client → Service → server when
    /// the Service is known, else client → server.
    fn keys(t: &Traffic) -> Vec<EdgeKey> {
        let (from, to) = (workload(t.source()), workload(t.destination()));
        let key = |from: String, to: String, mtls: bool| EdgeKey {
            from,
            to,
            protocol: t.protocol(),
            mtls,
        };
        // The client's call of a Service is one edge whatever endpoint
        // served it; mTLS is the endpoint leg's.
        match t.service().host.as_str() {
            "unknown" => vec![key(from, to, t.mtls())],
            host => {
                let mut keys = vec![key(from, host.to_owned(), false)];
                if to != "unknown" {
                    keys.push(key(host.to_owned(), to, t.mtls()));
                }
                keys
            }
        }
    }

    pub fn request(&self, t: &Traffic, error: bool, bytes: u64) {
        self.add(t, |e| {
            e.requests += 1;
            e.errors += u64::from(error);
            e.bytes += bytes;
        });
    }

    pub fn connection(&self, t: &Traffic, bytes: u64) {
        self.add(t, |e| {
            e.connections += 1;
            e.bytes += bytes;
        });
    }

    /// The graph now, with the policy verdicts of `flows` (pod → pod:
    /// allowed, denied).
    pub fn view(&self, flows: &BTreeMap<(String, String), (u64, u64)>) -> TopologyView {
        let now = Instant::now();
        // Traffic into named edges, merged.
        let mut merged: BTreeMap<EdgeKey, EdgeStats> = BTreeMap::new();
        for (t, s) in self
            .traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for key in Self::keys(t) {
                merged
                    .entry(key)
                    .and_modify(|m| {
                        m.requests += s.requests;
                        m.errors += s.errors;
                        m.connections += s.connections;
                        m.bytes += s.bytes;
                        m.first = m.first.min(s.first);
                        m.last = m.last.max(s.last);
                    })
                    .or_insert(*s);
            }
        }
        let mut edges: Vec<Edge> = merged
            .iter()
            .map(|(k, s)| {
                let seconds = now.duration_since(s.first).as_secs_f64().max(1.0);
                Edge {
                    from: k.from.clone(),
                    to: k.to.clone(),
                    protocol: k.protocol,
                    mtls: k.mtls,
                    requests: s.requests,
                    errors: s.errors,
                    error_ratio: if s.requests == 0 {
                        0.0
                    } else {
                        s.errors as f64 / s.requests as f64
                    },
                    connections: s.connections,
                    bytes: s.bytes,
                    request_rate: s.requests as f64 / seconds,
                    byte_rate: s.bytes as f64 / seconds,
                    last_seen_seconds_ago: now.duration_since(s.last).as_secs_f64(),
                    allowed: 0,
                    denied: 0,
                }
            })
            .collect();
        for ((from, to), (allowed, denied)) in flows {
            match edges
                .iter_mut()
                .find(|e| &e.from == from && &e.to == to && e.protocol == "tcp")
            {
                Some(e) => {
                    e.allowed += allowed;
                    e.denied += denied;
                }
                None => edges.push(Edge {
                    from: from.clone(),
                    to: to.clone(),
                    protocol: "policy",
                    mtls: false,
                    requests: 0,
                    errors: 0,
                    error_ratio: 0.0,
                    connections: 0,
                    bytes: 0,
                    request_rate: 0.0,
                    byte_rate: 0.0,
                    last_seen_seconds_ago: 0.0,
                    allowed: *allowed,
                    denied: *denied,
                }),
            }
        }
        edges.sort_by(|a, b| (&a.from, &a.to, a.protocol).cmp(&(&b.from, &b.to, b.protocol)));
        let mut nodes: Vec<Node> = Vec::new();
        for e in &edges {
            for name in [&e.from, &e.to] {
                if !nodes.iter().any(|n| &n.name == name) {
                    nodes.push(Node {
                        name: name.clone(),
                        kind: if name.ends_with(".svc.cluster.local") {
                            "service"
                        } else {
                            "workload"
                        },
                    });
                }
            }
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        TopologyView { nodes, edges }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub name: String,
    /// `workload` or `service`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `http`, `grpc`, `tcp`, or `policy` (verdicts only).
    pub protocol: &'static str,
    pub mtls: bool,
    pub requests: u64,
    pub errors: u64,
    pub error_ratio: f64,
    pub connections: u64,
    pub bytes: u64,
    /// Per second since the edge was first seen.
    pub request_rate: f64,
    pub byte_rate: f64,
    pub last_seen_seconds_ago: f64,
    /// Policy verdicts between the two pods (flow log).
    pub allowed: u64,
    pub denied: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopologyView {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

impl TopologyView {
    /// Graphviz DOT: Services as ellipses, workloads as boxes; an edge says
    /// what went over it; red when denied or erroring, bold when mTLS.
    pub fn dot(&self) -> String {
        let mut out =
            String::from("digraph trellis {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
        for n in &self.nodes {
            let shape = if n.kind == "service" {
                "ellipse"
            } else {
                "box"
            };
            let _ = writeln!(out, "  \"{}\" [shape={shape}];", escape(&n.name));
        }
        for e in &self.edges {
            let mut label = Vec::new();
            if e.requests > 0 {
                label.push(format!(
                    "{} {} req, {:.0}% err",
                    e.requests,
                    e.protocol,
                    e.error_ratio * 100.0
                ));
            }
            if e.connections > 0 {
                label.push(format!("{} conn", e.connections));
            }
            if e.bytes > 0 {
                label.push(format!("{} B", e.bytes));
            }
            if e.allowed + e.denied > 0 {
                label.push(format!("{} allowed, {} denied", e.allowed, e.denied));
            }
            if e.mtls {
                label.push("mTLS".into());
            }
            let color = if e.denied > 0 || e.errors > 0 {
                "red"
            } else {
                "black"
            };
            let style = if e.mtls { "bold" } else { "solid" };
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [label=\"{}\", color={color}, style={style}];",
                escape(&e.from),
                escape(&e.to),
                escape(&label.join("\\n"))
            );
        }
        out.push_str("}\n");
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('"', "\\\"")
}
