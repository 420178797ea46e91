//! Readers of the pinned maps, for the CLI, the admin API and tests. They open
//! the pins, so they work whether or not an agent runs.

use std::path::Path;

use aya::maps::{HashMap, MapInfo, PerCpuHashMap, lpm_trie::LpmTrie};
use serde::Serialize;
use trellis_common::{
    ALL_MAPS, CounterKey, CounterValue, EndpointInfo, EndpointKey, IpInfo, IpPort, MAP_COUNTERS,
    MAP_ENDPOINTS, MAP_IPCACHE, MAP_ORIG_BY_TUPLE, MAP_POLICY, MAP_SERVICES, MAP_SOCK_STATE,
    OrigDst, PolicyEntry, PolicyKey, ServiceInfo, SockKey, SockState, direction, hook, reason,
    sock_mode, verdict,
};

use crate::sync::socket_addr;

use super::{BpfError, PinLayout};

/// One counter, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counter {
    pub hook: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub endpoint_id: u32,
    pub events: u64,
    pub bytes: u64,
}

impl Counter {
    fn new(key: CounterKey, value: CounterValue) -> Self {
        Self {
            hook: hook::name(key.hook),
            verdict: verdict::name(key.verdict),
            reason: reason::name(key.reason),
            endpoint_id: key.endpoint_id,
            events: value.events,
            bytes: value.bytes,
        }
    }
}

/// The `counters` map, summed over CPUs, sorted by key.
pub fn counters(bpffs: &Path) -> Result<Vec<Counter>, BpfError> {
    let name = MAP_COUNTERS;
    let map: PerCpuHashMap<_, CounterKey, CounterValue> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.map_err(|source| BpfError::Map { name, source })?;
        let sum = per_cpu
            .iter()
            .fold(CounterValue::default(), |acc, v| CounterValue {
                events: acc.events + v.events,
                bytes: acc.bytes + v.bytes,
            });
        out.push((key, sum));
    }
    out.sort_by_key(|(k, _)| *k);
    Ok(out.into_iter().map(|(k, v)| Counter::new(k, v)).collect())
}

/// One meshed endpoint in the kernel's table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub netns_cookie: u64,
    pub endpoint_id: u32,
    pub identity: u32,
    pub flags: u32,
    pub ifindex: u32,
}

/// The `endpoints` map, sorted by endpoint id.
pub fn endpoints(bpffs: &Path) -> Result<Vec<Endpoint>, BpfError> {
    let name = MAP_ENDPOINTS;
    let map: HashMap<_, EndpointKey, EndpointInfo> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, info) = entry.map_err(|source| BpfError::Map { name, source })?;
        out.push(Endpoint {
            netns_cookie: key.netns_cookie,
            endpoint_id: info.endpoint_id,
            identity: info.identity,
            flags: info.flags,
            ifindex: info.ifindex,
        });
    }
    out.sort_by_key(|e| e.endpoint_id);
    Ok(out)
}

/// A service VIP:port in the kernel's table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub vip: String,
    pub service_id: u32,
    pub flags: u32,
}

/// The `services` map, sorted by id then VIP.
pub fn services(bpffs: &Path) -> Result<Vec<ServiceEntry>, BpfError> {
    let name = MAP_SERVICES;
    let map: HashMap<_, IpPort, ServiceInfo> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, info) = entry.map_err(|source| BpfError::Map { name, source })?;
        out.push((info.service_id, socket_addr(&key), info.flags));
    }
    out.sort();
    Ok(out
        .into_iter()
        .map(|(service_id, vip, flags)| ServiceEntry {
            vip: vip.to_string(),
            service_id,
            flags,
        })
        .collect())
}

/// An ipcache prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IpCacheEntry {
    pub prefix: String,
    pub identity: u32,
    pub flags: u32,
    pub cidr_identity: u32,
}

/// The `ipcache` LPM trie, sorted by prefix. IPv4 shows as a.b.c.d/len.
pub fn ipcache(bpffs: &Path) -> Result<Vec<IpCacheEntry>, BpfError> {
    let name = MAP_IPCACHE;
    let map: LpmTrie<_, [u8; 16], IpInfo> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, info) = entry.map_err(|source| BpfError::Map { name, source })?;
        let v6 = std::net::Ipv6Addr::from(key.data());
        let prefix = match v6.to_ipv4_mapped() {
            Some(v4) => format!("{v4}/{}", key.prefix_len().saturating_sub(96)),
            None => format!("{v6}/{}", key.prefix_len()),
        };
        out.push((key.data(), key.prefix_len(), prefix, info));
    }
    out.sort_by_key(|(addr, len, _, _)| (*addr, *len));
    Ok(out
        .into_iter()
        .map(|(_, _, prefix, info)| IpCacheEntry {
            prefix,
            identity: info.identity,
            flags: info.flags,
            cidr_identity: info.cidr_identity,
        })
        .collect())
}

/// One entry of the `policy` LPM trie, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyMapEntry {
    pub endpoint_id: u32,
    pub direction: &'static str,
    /// The peer identity; absent for an endpoint's not-isolated entry.
    pub identity: Option<u32>,
    /// Absent when the entry covers every protocol.
    pub protocol: Option<u8>,
    /// `80`, `8000-8015`; absent when the entry covers every port.
    pub ports: Option<String>,
    pub rule_id: u32,
}

/// The `policy` map, sorted by key.
pub fn policy(bpffs: &Path) -> Result<Vec<PolicyMapEntry>, BpfError> {
    let name = MAP_POLICY;
    let map: LpmTrie<_, PolicyKey, PolicyEntry> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.map_err(|source| BpfError::Map { name, source })?;
        out.push(((key.data(), key.prefix_len()), value));
    }
    out.sort_by_key(|(k, _)| *k);
    Ok(out
        .into_iter()
        .map(|((k, len), v)| {
            let port_bits = len.saturating_sub(PolicyKey::PREFIX_PROTOCOL);
            let first = u16::from_be_bytes(k.port);
            let last = first | u16::MAX.checked_shr(port_bits).unwrap_or(0);
            PolicyMapEntry {
                endpoint_id: k.endpoint_id,
                direction: direction::name(k.direction),
                identity: (len > PolicyKey::PREFIX_ENDPOINT).then_some(k.identity),
                protocol: (len > PolicyKey::PREFIX_IDENTITY).then_some(k.protocol),
                ports: (len > PolicyKey::PREFIX_PROTOCOL).then(|| {
                    if first == last {
                        first.to_string()
                    } else {
                        format!("{first}-{last}")
                    }
                }),
                rule_id: v.rule_id,
            }
        })
        .collect())
}

/// A captured connection's original destination, by client address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrigEntry {
    pub client: String,
    pub original_destination: String,
    pub endpoint_id: u32,
    pub service_id: u32,
}

/// The `orig_by_tuple` map (LRU), sorted by client.
pub fn original_destinations(bpffs: &Path) -> Result<Vec<OrigEntry>, BpfError> {
    let name = MAP_ORIG_BY_TUPLE;
    let map: HashMap<_, IpPort, OrigDst> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, orig) = entry.map_err(|source| BpfError::Map { name, source })?;
        out.push((socket_addr(&key), orig));
    }
    out.sort_by_key(|(client, _)| *client);
    Ok(out
        .into_iter()
        .map(|(client, orig)| OrigEntry {
            client: client.to_string(),
            original_destination: socket_addr(&orig.dst).to_string(),
            endpoint_id: orig.endpoint_id,
            service_id: orig.service_id,
        })
        .collect())
}

/// A socket sk_msg acts on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketEntry {
    pub local: String,
    pub remote: String,
    /// `agent` for the agent's sockets, else the pod socket's path.
    pub owner: &'static str,
    pub mode: &'static str,
    pub sent: u64,
    pub forwarded: u64,
    pub splice_to: Option<String>,
    /// A pod socket that fell too far behind in reading what was redirected
    /// into it: the agent's socket facing it sends through TCP.
    pub backlogged: bool,
}

/// The `sock_state` map, sorted by local address.
pub fn sockets(bpffs: &Path) -> Result<Vec<SocketEntry>, BpfError> {
    let name = MAP_SOCK_STATE;
    let map: HashMap<_, SockKey, SockState> = PinLayout::new(bpffs).open_map(name)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, state) = entry.map_err(|source| BpfError::Map { name, source })?;
        out.push((socket_addr(&key.local), socket_addr(&key.remote), state));
    }
    out.sort_by_key(|(l, r, _)| (*l, *r));
    let agent = |s: &SockState| s.flags & trellis_common::sock_flags::AGENT != 0;
    Ok(out
        .into_iter()
        .map(|(local, remote, s)| SocketEntry {
            local: local.to_string(),
            remote: remote.to_string(),
            owner: if agent(&s) { "agent" } else { "pod" },
            mode: if agent(&s) {
                "-"
            } else {
                sock_mode::name(s.mode)
            },
            sent: s.sent,
            forwarded: s.forwarded,
            splice_to: (s.flags & trellis_common::sock_flags::SPLICE != 0
                || s.mode == sock_mode::SPLICED)
                .then(|| socket_addr(&s.target.local).to_string()),
            backlogged: s.flags & trellis_common::sock_flags::BACKLOGGED != 0,
        })
        .collect())
}

/// How full a pinned map is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Occupancy {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: String,
    pub entries: usize,
    pub max_entries: u32,
}

/// Every map's entry count against its capacity.
pub fn occupancy(bpffs: &Path) -> Result<Vec<Occupancy>, BpfError> {
    let layout = PinLayout::new(bpffs);
    ALL_MAPS
        .iter()
        .map(|&name| {
            let path = layout.map(name);
            let info = MapInfo::from_pin(&path).map_err(|source| BpfError::Map { name, source })?;
            let fd = super::sys::obj_get(&path).map_err(|source| BpfError::Pin {
                path: path.clone(),
                source,
            })?;
            let kind = info
                .map_type()
                .map_or_else(|_| "unknown".to_string(), |t| format!("{t:?}"));
            let entries = if kind == "Array" {
                info.max_entries() as usize
            } else if kind == "RingBuf" {
                // A byte ring, not keyed entries.
                0
            } else {
                super::sys::map_count(std::os::fd::AsFd::as_fd(&fd), info.key_size() as usize)
                    .map_err(|source| BpfError::Pin { path, source })?
            };
            Ok(Occupancy {
                name,
                kind,
                entries,
                max_entries: info.max_entries(),
            })
        })
        .collect()
}

/// Every map, decoded, as one JSON document (`trellis maps -o json`, `/maps`).
pub fn dump(bpffs: &Path) -> Result<serde_json::Value, BpfError> {
    Ok(serde_json::json!({
        "occupancy": occupancy(bpffs)?,
        "counters": counters(bpffs)?,
        "endpoints": endpoints(bpffs)?,
        "services": services(bpffs)?,
        "ipcache": ipcache(bpffs)?,
        "policy": policy(bpffs)?,
        "orig_by_tuple": original_destinations(bpffs)?,
        "sockets": sockets(bpffs)?,
    }))
}
