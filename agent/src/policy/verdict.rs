//! Network policy verdicts in the agent, read from the same pinned maps the
//! kernel programs use (ipcache and policy) with the same rule
//! ([`trellis_common::judge`]): for the connections the agent delivers to
//! local pods (same-node captured ones and HBONE streams), for the backends
//! of a service VIP, and for `trellis policy explain`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use serde::Serialize;
use tokio::sync::watch;
use trellis_common::{
    Decision, IpInfo, MAP_IPCACHE, MAP_POLICY, PolicyEntry, PolicyKey, direction, identity, reason,
};

use super::network::TCP;
use crate::{
    bpf::{BpfError, PinLayout},
    flows::{AgentVerdict, FlowLog},
    state::Snapshot,
    sync::{PolicyView, ip16},
};

/// The pinned ipcache and policy maps.
pub struct PolicyMaps {
    ipcache: LpmTrie<MapData, [u8; 16], IpInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
}

impl PolicyMaps {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        let layout = PinLayout::new(bpffs);
        Ok(Self {
            ipcache: layout.open_map(MAP_IPCACHE)?,
            policy: layout.open_map(MAP_POLICY)?,
        })
    }

    /// The identities of `ip`, as the kernel finds them.
    pub fn peer(&self, ip: IpAddr) -> (u32, u32) {
        match self.ipcache.get(&Key::new(128, ip16(ip.to_canonical())), 0) {
            Ok(info) => (info.identity, info.cidr_identity),
            Err(_) => (identity::WORLD, 0),
        }
    }

    pub fn judge(
        &self,
        dir: u8,
        endpoint_id: u32,
        peer: (u32, u32),
        protocol: u8,
        port: u16,
    ) -> Decision {
        trellis_common::judge(peer.0, peer.1, |id| {
            let key = PolicyKey::new(dir, endpoint_id, id, protocol, port);
            self.policy
                .get(&Key::new(PolicyKey::PREFIX_FULL, key), 0)
                .ok()
                .map(|e| e.rule_id)
        })
    }
}

/// One verdict, explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub allowed: bool,
    pub direction: &'static str,
    /// The endpoint whose policy decided; `None` when the pod is not a
    /// local endpoint (nothing to enforce here).
    pub endpoint: Option<String>,
    pub peer: String,
    pub peer_identity: u32,
    /// The identity of the most specific policy CIDR holding the peer's
    /// address, when any.
    pub peer_cidr_identity: u32,
    pub protocol: u8,
    pub port: u16,
    pub reason: &'static str,
    /// `namespace/name ingress[i]` of the rule that allowed it.
    pub rule: Option<String>,
}

/// Verdicts for the agent's proxies: the maps, and the compiled view of
/// the last sync (endpoint ids and rule names).
pub struct Verdicts {
    maps: PolicyMaps,
    current: Mutex<Arc<Current>>,
    flows: Option<Arc<FlowLog>>,
    /// Bumped on every new view: open connections are judged again.
    views: watch::Sender<u64>,
}

/// A verdict an open connection must keep: local pod `workload`'s policy
/// in `direction` for the connection from `source` to `destination`
/// (`source` is `None` when the agent could not prove it).
#[derive(Clone, Debug)]
pub struct Standing {
    pub via: &'static str,
    pub direction: u8,
    pub workload: String,
    pub source: Option<SocketAddr>,
    pub destination: SocketAddr,
}

/// The view of the last sync and the answers the maps gave under it.
///
/// The proxies ask the same few questions over and over (a Service's
/// backends for each request of a client), and each answer costs two to
/// four map lookups through `bpf(2)`: four syscalls per HTTP request to a
/// two-backend Service, as many as the request's own socket calls. The maps
/// change only in a sync, which the next view follows, so the answers are
/// kept until then; a new view starts with none.
#[derive(Default)]
struct Current {
    view: Arc<PolicyView>,
    answers: Mutex<HashMap<Question, Answer>>,
}

/// What [`Verdicts::judge`] asks the maps: direction, endpoint id, peer
/// address, protocol, port.
type Question = (u8, u32, IpAddr, u8, u16);

/// The peer's identities (its own, its policy CIDR's) and the decision.
type Answer = ((u32, u32), Decision);

/// Answers kept per view at most; past it they are dropped and asked
/// again (a node's distinct client/peer/port triples rarely come near).
const ANSWERS_MAX: usize = 4096;

impl Verdicts {
    pub fn new(maps: PolicyMaps) -> Self {
        Self {
            maps,
            current: Mutex::default(),
            flows: None,
            views: watch::Sender::new(0),
        }
    }

    /// Records the verdicts the agent makes for its connections in `flows`.
    pub fn with_flows(mut self, flows: Arc<FlowLog>) -> Self {
        self.flows = Some(flows);
        self
    }

    /// Records one of the agent's verdicts as a flow.
    pub fn record(
        &self,
        snapshot: &Snapshot,
        via: &'static str,
        source: Option<SocketAddr>,
        destination: SocketAddr,
        j: &Judgement,
    ) {
        let (Some(flows), Some(endpoint)) = (&self.flows, &j.endpoint) else {
            return;
        };
        // The endpoint is the destination for its ingress policy, the
        // source for its egress policy.
        let ingress = j.direction == direction::name(direction::INGRESS);
        let own_ip = match source {
            Some(s) if !ingress => s.ip(),
            _ => destination.ip(),
        };
        let own = self.view().identities.of_ip(snapshot, own_ip).0;
        let (source_identity, destination_identity) = if ingress {
            (j.peer_identity, own)
        } else {
            (own, j.peer_identity)
        };
        flows.agent(
            snapshot,
            AgentVerdict {
                via,
                direction: if ingress {
                    direction::INGRESS
                } else {
                    direction::EGRESS
                },
                endpoint,
                source,
                destination,
                allowed: j.allowed,
                reason: j.reason,
                rule: j.rule.clone(),
                source_identity,
                destination_identity,
            },
        );
    }

    pub fn set_view(&self, view: Arc<PolicyView>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(Current {
            view,
            answers: Mutex::default(),
        });
        self.views.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Completes, with the reason, when the policy stops allowing one of
    /// `standing` (judged again on every new view, as the kernel judges
    /// established flows again when the policy revision moves); never
    /// while they stay allowed. The denial is recorded as a flow.
    pub async fn revoked(
        &self,
        state: &watch::Receiver<Arc<Snapshot>>,
        standing: &[Standing],
    ) -> &'static str {
        let mut views = self.views.subscribe();
        loop {
            if views.changed().await.is_err() {
                return std::future::pending().await;
            }
            for s in standing {
                let Some(j) = self.verdict_of(s) else {
                    continue;
                };
                if !j.allowed {
                    let j = Judgement {
                        reason: "policy-revoked",
                        ..j
                    };
                    let snapshot = state.borrow().clone();
                    self.record(&snapshot, s.via, s.source, s.destination, &j);
                    return j.reason;
                }
            }
        }
    }

    pub fn view(&self) -> Arc<PolicyView> {
        self.current().view.clone()
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The backends of a Service call that the client pod's egress policy
    /// allows (TCP to each backend's address and port), each denial
    /// recorded as a flow; `peer` is the client's address.
    pub fn egress_backends(
        &self,
        snapshot: &Snapshot,
        client: &str,
        peer: SocketAddr,
        backends: Vec<SocketAddr>,
    ) -> Vec<SocketAddr> {
        let current = self.current();
        let Some(&endpoint_id) = current.view.endpoints.get(client) else {
            return backends;
        };
        backends
            .into_iter()
            .filter(|b| {
                let tcp = crate::policy::network::TCP;
                let (_, d) = self.answer(
                    &current,
                    direction::EGRESS,
                    endpoint_id,
                    b.ip(),
                    (tcp, b.port()),
                );
                if !d.allowed {
                    let j = self.judge(direction::EGRESS, client, b.ip(), tcp, b.port());
                    self.record(snapshot, "service-backend", Some(peer), *b, &j);
                }
                d.allowed
            })
            .collect()
    }

    /// The policy of local pod `workload` (`namespace/name`) for traffic
    /// with `peer` in `dir`; `port` is the pod's for ingress, the peer's
    /// for egress.
    pub fn judge(
        &self,
        dir: u8,
        workload: &str,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Judgement {
        let current = self.current();
        let view = &current.view;
        let mut out = Judgement {
            allowed: true,
            direction: direction::name(dir),
            endpoint: None,
            peer: peer.to_canonical().to_string(),
            peer_identity: 0,
            peer_cidr_identity: 0,
            protocol,
            port,
            reason: "not-an-endpoint",
            rule: None,
        };
        let Some(&endpoint_id) = view.endpoints.get(workload) else {
            (out.peer_identity, out.peer_cidr_identity) = self.maps.peer(peer);
            return out;
        };
        let ((identity, cidr_identity), d) =
            self.answer(&current, dir, endpoint_id, peer, (protocol, port));
        out.peer_identity = identity;
        out.peer_cidr_identity = cidr_identity;
        out.endpoint = Some(workload.to_owned());
        out.allowed = d.allowed;
        out.reason = reason::name(d.reason);
        out.rule = view.compiled.rule(d.rule_id).map(ToString::to_string);
        out
    }

    /// The maps' answer for endpoint `endpoint_id` and `peer` under
    /// `current`'s view, kept for the next time it is asked.
    fn answer(
        &self,
        current: &Current,
        dir: u8,
        endpoint_id: u32,
        peer: IpAddr,
        (protocol, port): (u8, u16),
    ) -> Answer {
        let peer = peer.to_canonical();
        let question = (dir, endpoint_id, peer, protocol, port);
        let known = current
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&question)
            .copied();
        if let Some(answer) = known {
            return answer;
        }
        let ids = self.maps.peer(peer);
        let answer = (ids, self.maps.judge(dir, endpoint_id, ids, protocol, port));
        let mut answers = current.answers.lock().unwrap_or_else(|e| e.into_inner());
        if answers.len() >= ANSWERS_MAX {
            answers.clear();
        }
        answers.insert(question, answer);
        answer
    }

    /// The destination's ingress policy for a TCP connection the agent
    /// delivers to `target` from `client`: the reason when it is denied.
    /// `client` is `None` for a source the agent could not prove: a pod
    /// isolated for ingress refuses it (its policy names pods, and the
    /// connection cannot say which one it comes from). A `target` that is
    /// no pod of the state has no policy here.
    /// Every verdict is recorded as a flow (`via` says which path).
    pub fn delivery(
        &self,
        snapshot: &Snapshot,
        via: &'static str,
        client: Option<SocketAddr>,
        target: SocketAddr,
    ) -> Result<(), &'static str> {
        let Some(dst) = snapshot.workload_by_ip(target.ip().to_canonical()) else {
            return Ok(());
        };
        let standing = Standing {
            via,
            direction: direction::INGRESS,
            workload: dst.id(),
            source: client,
            destination: target,
        };
        let Some(j) = self.verdict_of(&standing) else {
            return Ok(());
        };
        self.record(snapshot, via, client, target, &j);
        if j.allowed { Ok(()) } else { Err(j.reason) }
    }

    /// The verdict `s` has now; `None` when nothing is to be judged (an
    /// unproven source, to a pod not isolated for ingress).
    fn verdict_of(&self, s: &Standing) -> Option<Judgement> {
        let port = s.destination.port();
        match s.source {
            Some(source) => {
                let peer = if s.direction == direction::INGRESS {
                    source.ip()
                } else {
                    s.destination.ip()
                };
                Some(self.judge(s.direction, &s.workload, peer, TCP, port))
            }
            None if self.ingress_isolated(&s.workload) => Some(Judgement {
                allowed: false,
                direction: direction::name(direction::INGRESS),
                endpoint: Some(s.workload.clone()),
                peer: "-".into(),
                peer_identity: identity::ANY,
                peer_cidr_identity: 0,
                protocol: TCP,
                port,
                reason: "unproven-source",
                rule: None,
            }),
            None => None,
        }
    }

    /// Whether local pod `workload` is isolated for ingress.
    fn ingress_isolated(&self, workload: &str) -> bool {
        let view = self.view();
        view.endpoints
            .get(workload)
            .and_then(|ep| view.compiled.isolation.get(ep))
            .is_some_and(|(ingress, _)| *ingress)
    }
}
