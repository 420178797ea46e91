//! Flow events, Hubble-like: what the kernel's policy points decided (read
//! from the `flows` ring buffer) and what the agent decided for the
//! connections it delivers, named with pods, namespaces and the rule that
//! allowed them. A bounded log keeps the latest; `trellis flows` reads it
//! through the admin API (`/flows?since=…`), following it by polling with
//! the sequence number the last answer gave.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};
use tracing::{debug, warn};
use trellis_common::{FlowEvent, direction, hook, identity, reason};

use crate::{policy::verdict::Verdicts, query, state::Snapshot};

/// Flows kept for `trellis flows`; older ones are dropped first.
pub const CAPACITY: usize = 16_384;
/// Most flows one `/flows` answer carries.
pub const MAX_PAGE: usize = 2_000;

/// One side of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Side {
    /// Absent when the hook does not see it (the source address at connect).
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// `namespace/name` of the pod holding the address.
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// Numeric policy identity (see `trellis policy`); 0 when not known.
    pub identity: u32,
    /// The reserved identities' names (`host`, `world`, `remote-node`), or
    /// `service` for a service VIP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_name: Option<&'static str>,
}

/// One decision about a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Position in this agent's log; `/flows?since=` takes the next one.
    pub seq: u64,
    /// RFC 3339, nanoseconds (formatted only when the flow is read).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub node: String,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    pub reason: &'static str,
    /// The kernel hook, or `agent` for the agent's own verdicts.
    pub hook: &'static str,
    /// What the agent was doing, for its own verdicts: `same-node`,
    /// `hbone-inbound` or `service-backend`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'static str>,
    /// Whose policy: the endpoint's `ingress` or `egress`.
    pub direction: &'static str,
    /// The local pod whose policy decided.
    pub endpoint: Option<String>,
    pub protocol: String,
    pub source: Side,
    pub destination: Side,
    /// `namespace/name ingress[i]` of the rule that allowed it.
    pub policy: Option<String>,
}

/// What `trellis flows` asks for: flows whose source or destination pod
/// (or deciding endpoint) matches, all of them given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `namespace/name`, or a name in any namespace.
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// `allowed` or `denied`.
    pub verdict: Option<String>,
}

impl Filter {
    /// Parses `/flows`' query string: `since`, `pod`, `namespace`,
    /// `verdict`, `limit`. Unknown keys are an error, not ignored.
    pub fn parse_query(query: &str) -> Result<(Self, u64, usize), String> {
        let mut filter = Self::default();
        let (mut since, mut limit) = (0, MAX_PAGE);
        for (key, value) in query::pairs(query) {
            match key.as_str() {
                "since" => {
                    since = value
                        .parse()
                        .map_err(|_| format!("since={value}: not a number"))?
                }
                "limit" => {
                    limit = value
                        .parse::<usize>()
                        .map_err(|_| format!("limit={value}: not a number"))?
                        .min(MAX_PAGE);
                }
                "pod" => filter.pod = Some(value),
                "namespace" => filter.namespace = Some(value),
                "verdict" => match value.as_str() {
                    "allowed" | "denied" => filter.verdict = Some(value),
                    other => return Err(format!("verdict={other}: want allowed or denied")),
                },
                other => {
                    return Err(format!(
                        "{other}: unknown parameter (since, limit, pod, namespace, verdict)"
                    ));
                }
            }
        }
        Ok((filter, since, limit))
    }

    /// The query string for [`Filter::parse_query`].
    pub fn to_query(&self, since: u64) -> String {
        let mut q = format!("since={since}");
        for (key, value) in [
            ("pod", &self.pod),
            ("namespace", &self.namespace),
            ("verdict", &self.verdict),
        ] {
            if let Some(v) = value {
                q += &format!("&{key}={}", query::escape(v));
            }
        }
        q
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        let sides = [&flow.source, &flow.destination];
        let pod_ok = self.pod.as_deref().is_none_or(|want| {
            sides
                .iter()
                .filter_map(|s| s.pod.as_deref())
                .chain(flow.endpoint.as_deref())
                .any(|pod| pod == want || pod.split_once('/').is_some_and(|(_, n)| n == want))
        });
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|want| sides.iter().any(|s| s.namespace.as_deref() == Some(want)));
        let verdict_ok = self.verdict.as_deref().is_none_or(|v| v == flow.verdict);
        pod_ok && ns_ok && verdict_ok
    }
}

/// One page of the log.
#[derive(Clone, Debug, Serialize)]
pub struct Page {
    pub flows: Vec<Flow>,
    /// Ask with `since` = this for the flows after these.
    pub next: u64,
    /// Flows between `since` and the oldest kept that the log no longer
    /// holds (the reader was too slow, or asked from too far back).
    pub missed: u64,
}

#[derive(Default)]
struct Log {
    flows: VecDeque<Flow>,
    /// Sequence number of the next flow.
    next: u64,
}

/// The latest flows of this node, oldest first.
pub struct FlowLog {
    node: String,
    capacity: usize,
    log: Mutex<Log>,
}

impl FlowLog {
    pub fn new(node: &str, capacity: usize) -> Self {
        Self {
            node: node.to_owned(),
            capacity,
            log: Mutex::new(Log {
                flows: VecDeque::new(),
                next: 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a flow, numbering it and naming this node.
    pub fn push(&self, mut flow: Flow) {
        flow.node.clone_from(&self.node);
        let mut log = self.lock();
        flow.seq = log.next;
        log.next += 1;
        if log.flows.len() == self.capacity {
            log.flows.pop_front();
        }
        log.flows.push_back(flow);
    }

    /// Verdicts between pods in the log: (source pod, destination pod) →
    /// (allowed, denied).
    pub fn pod_pairs(&self) -> std::collections::BTreeMap<(String, String), (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for f in &self.lock().flows {
            let (Some(src), Some(dst)) = (&f.source.pod, &f.destination.pod) else {
                continue;
            };
            let e: &mut (u64, u64) = out.entry((src.clone(), dst.clone())).or_default();
            if f.verdict == "denied" {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
        out
    }

    /// The flows from `since` on that match, at most `limit`.
    pub fn page(&self, filter: &Filter, since: u64, limit: usize) -> Page {
        let log = self.lock();
        let oldest = log.flows.front().map_or(log.next, |f| f.seq);
        let missed = oldest.saturating_sub(since.max(1));
        let skip = since.saturating_sub(oldest) as usize;
        let mut next = since.max(oldest);
        let mut flows = Vec::new();
        for flow in log.flows.iter().skip(skip) {
            next = flow.seq + 1;
            if filter.matches(flow) {
                flows.push(flow.clone());
                if flows.len() == limit {
                    break;
                }
            }
        }
        Page {
            flows,
            next: next.max(since),
            missed,
        }
    }
}

/// Time now on the kernel's `bpf_ktime_get_ns` clock (CLOCK_MONOTONIC).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    #[expect(unsafe_code, reason = "clock_gettime")]
    let _ = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let text = time::OffsetDateTime::from(*t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    s.serialize_str(&text)
}

fn verdict_name(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

impl Side {
    /// `ip` (absent when the hook did not see it) and its pod, from the state.
    fn named(snapshot: &Snapshot, ip: Option<IpAddr>, port: u16, id: u32) -> Self {
        let ip = ip.map(|ip| ip.to_canonical());
        let workload = ip.and_then(|ip| snapshot.workload_by_ip(ip));
        let identity_name = identity::reserved_name(id)
            .filter(|_| id != identity::ANY)
            .or_else(|| (id & identity::SERVICE_BASE != 0).then_some("service"));
        Self {
            ip,
            port,
            pod: workload.map(crate::state::Workload::id),
            namespace: workload.map(|w| w.namespace.clone()),
            identity: id,
            identity_name,
        }
    }
}

/// Names the flows' addresses and rules from the state and the compiled
/// policy the agent applied last.
#[derive(Clone)]
pub struct Namer {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub verdicts: Arc<Verdicts>,
}

impl Namer {
    /// A kernel flow event, named.
    pub fn kernel(&self, event: &FlowEvent, now: (SystemTime, u64)) -> Flow {
        let snapshot = self.state.borrow().clone();
        let view = self.verdicts.view();
        let endpoint = view
            .endpoints
            .iter()
            .find(|(_, id)| **id == event.endpoint_id)
            .map(|(w, _)| w.clone());
        let addr = |a: [u8; 16]| (a != [0; 16]).then(|| IpAddr::from(Ipv6Addr::from(a)));
        let mut saddr = addr(event.saddr);
        if saddr.is_none() && event.direction == direction::EGRESS {
            // connect/sendmsg see no source address yet: it is the pod's.
            saddr = endpoint
                .as_deref()
                .and_then(|e| snapshot.workload(e))
                .and_then(|w| {
                    let v4 = addr(event.daddr).is_some_and(|d| d.to_canonical().is_ipv4());
                    w.ips.iter().find(|ip| ip.is_ipv4() == v4).copied()
                });
        }
        let age = Duration::from_nanos(now.1.saturating_sub(event.time_ns));
        Flow {
            seq: 0,
            time: now.0.checked_sub(age).unwrap_or(now.0),
            node: String::new(),
            verdict: verdict_name(event.verdict != trellis_common::verdict::DENY),
            reason: reason::name(event.reason),
            hook: hook::name(u32::from(event.hook)),
            via: None,
            direction: direction::name(event.direction),
            endpoint,
            protocol: protocol_name(event.protocol),
            source: Side::named(&snapshot, saddr, event.sport, event.src_identity),
            destination: Side::named(
                &snapshot,
                addr(event.daddr),
                event.dport,
                event.dst_identity,
            ),
            policy: view.compiled.rule(event.rule_id).map(ToString::to_string),
        }
    }
}

/// What the agent decided itself, for [`FlowLog`].
pub struct AgentVerdict<'a> {
    pub via: &'static str,
    pub direction: u8,
    pub endpoint: &'a str,
    pub source: Option<SocketAddr>,
    pub destination: SocketAddr,
    pub allowed: bool,
    pub reason: &'static str,
    pub rule: Option<String>,
    pub source_identity: u32,
    pub destination_identity: u32,
}

impl FlowLog {
    /// Records one of the agent's own TCP verdicts.
    pub fn agent(&self, snapshot: &Snapshot, v: AgentVerdict<'_>) {
        let side = |addr: Option<SocketAddr>, id: u32| {
            Side::named(
                snapshot,
                addr.map(|a| a.ip()),
                addr.map_or(0, |a| a.port()),
                id,
            )
        };
        self.push(Flow {
            seq: 0,
            time: SystemTime::now(),
            node: String::new(),
            verdict: verdict_name(v.allowed),
            reason: v.reason,
            hook: "agent",
            via: Some(v.via),
            direction: direction::name(v.direction),
            endpoint: Some(v.endpoint.to_owned()),
            protocol: "TCP".into(),
            source: side(v.source, v.source_identity),
            destination: side(Some(v.destination), v.destination_identity),
            policy: v.rule,
        });
    }
}

fn protocol_name(p: u8) -> String {
    match crate::policy::network::protocol_name(p) {
        "other" => p.to_string(),
        name => name.to_owned(),
    }
}

/// Reads the kernel's flow events into `log` until the task is dropped.
pub async fn read_kernel(ring: RingBuf<MapData>, namer: Namer, log: Arc<FlowLog>) {
    // SAFETY: the ring owns its map's file descriptor until it is dropped,
    // which only the AsyncFd does, and it always returns that descriptor.
    #[expect(unsafe_code, reason = "AsyncFd::register_with_interest")]
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the flows ring buffer: no flow events");
            return;
        }
    };
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "polling the flows ring buffer failed: no more flow events");
                return;
            }
        };
        let now = (SystemTime::now(), monotonic_ns());
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(event) => log.push(namer.kernel(&event, now)),
                None => debug!(len = item.len(), "flow event of an unknown size"),
            }
        }
        guard.clear_ready();
    }
}

fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain integers (aya::Pod), and the length is
    // checked; read_unaligned copes with any alignment.
    #[expect(unsafe_code, reason = "reading a POD record from the ring")]
    let event = unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() };
    Some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, dst: &str, allowed: bool) -> Flow {
        let side = |pod: &str| Side {
            pod: Some(pod.to_owned()),
            namespace: pod.split_once('/').map(|(ns, _)| ns.to_owned()),
            ..Side::default()
        };
        Flow {
            seq: 0,
            time: SystemTime::UNIX_EPOCH,
            node: String::new(),
            verdict: verdict_name(allowed),
            reason: "policy-denied",
            hook: "tc_egress",
            via: None,
            direction: "ingress",
            endpoint: Some(dst.to_owned()),
            protocol: "TCP".into(),
            source: side(src),
            destination: side(dst),
            policy: None,
        }
    }

    #[test]
    fn pages_follow_and_report_what_was_missed() {
        let log = FlowLog::new("node-a", 3);
        for i in 0..5 {
            log.push(flow("x/a", &format!("y/p{i}"), i % 2 == 0));
        }
        // Kept: seq 3, 4, 5; 1 and 2 are gone.
        let all = log.page(&Filter::default(), 0, 100);
        assert_eq!(
            all.flows.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!((all.next, all.missed), (6, 2));
        assert!(all.flows.iter().all(|f| f.node == "node-a"));
        let later = log.page(&Filter::default(), 4, 100);
        assert_eq!(
            later.flows.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(later.missed, 0);
        let limited = log.page(&Filter::default(), 0, 1);
        assert_eq!((limited.flows.len(), limited.next), (1, 4));
        let none = log.page(&Filter::default(), 6, 100);
        assert!(none.flows.is_empty());
        assert_eq!(none.next, 6);
    }

    #[test]
    fn filters_by_pod_namespace_and_verdict() {
        let log = FlowLog::new("n", 10);
        log.push(flow("x/a", "y/b", true));
        log.push(flow("z/c", "x/a", false));
        log.push(flow("z/c", "y/b", false));
        let seqs = |q: &str| {
            let (f, since, limit) = Filter::parse_query(q).expect("query");
            log.page(&f, since, limit)
                .flows
                .iter()
                .map(|f| f.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs("pod=x/a"), [1, 2]);
        assert_eq!(seqs("pod=b"), [1, 3]);
        assert_eq!(seqs("namespace=z&verdict=denied"), [2, 3]);
        assert_eq!(seqs("verdict=allowed"), [1]);
        assert_eq!(seqs("since=3&namespace=y"), [3]);
        assert!(Filter::parse_query("verdict=maybe").is_err());
        assert!(Filter::parse_query("colour=red").is_err());
    }

    #[test]
    fn queries_round_trip() {
        let f = Filter {
            pod: Some("x/a b".into()),
            namespace: Some("z".into()),
            verdict: Some("denied".into()),
        };
        let (back, since, _) = Filter::parse_query(&f.to_query(7)).expect("parse");
        assert_eq!((back, since), (f, 7));
    }

    #[test]
    fn decodes_the_kernel_record() {
        let event = FlowEvent {
            time_ns: 42,
            sport: 1234,
            dport: 80,
            protocol: 6,
            verdict: trellis_common::verdict::DENY,
            ..FlowEvent::default()
        };
        // SAFETY: FlowEvent is plain integers with no padding.
        #[expect(unsafe_code, reason = "viewing a POD record as bytes")]
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<FlowEvent>())
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[..10]), None);
    }
}
