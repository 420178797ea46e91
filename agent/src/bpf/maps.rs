//! Readers of the pinned maps, for the CLI, the admin API and tests. They open
//! the pins, so they work whether or not an agent runs.

use std::path::Path;

use aya::maps::{HashMap, PerCpuHashMap};
use serde::Serialize;
use trellis_common::{
    CounterKey, CounterValue, EndpointInfo, EndpointKey, MAP_COUNTERS, MAP_ENDPOINTS, hook, reason,
    verdict,
};

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
