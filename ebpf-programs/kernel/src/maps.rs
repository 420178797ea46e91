//! The maps, as BTF maps: `bpftool map dump` prints their fields by name.
//! Names, keys and values come from `trellis-common`, shared with the agent.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuHashMap},
    macros::btf_map,
};
use trellis_common::{
    COUNTERS_MAX_ENTRIES, CounterKey, CounterValue, ENDPOINTS_MAX_ENTRIES, EndpointInfo,
    EndpointKey,
};

#[btf_map(name = "counters")]
pub static COUNTERS: PerCpuHashMap<CounterKey, CounterValue, { COUNTERS_MAX_ENTRIES as usize }> =
    PerCpuHashMap::new();

#[btf_map(name = "endpoints")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { ENDPOINTS_MAX_ENTRIES as usize }> =
    HashMap::new();
