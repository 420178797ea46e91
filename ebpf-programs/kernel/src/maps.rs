//! The maps, as BTF maps: `bpftool map dump` prints their fields by name.
//! Names, keys and values come from `trellis-common`, shared with the agent.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, RingBuf, SockHash},
    macros::btf_map,
};
use trellis_common::{
    CONNTRACK_MAX_ENTRIES, COUNTERS_MAX_ENTRIES, CounterKey, CounterValue, CtEntry, CtKey,
    DatapathConfig, ENDPOINTS_MAX_ENTRIES, EndpointInfo, EndpointKey, FLOWS_BYTES, FlowEvent,
    IPCACHE_MAX_ENTRIES, IpInfo, IpPort, ORIG_MAX_ENTRIES, OrigDst, POLICY_MAX_ENTRIES, PodIface,
    PolicyEntry, PolicyKey, SERVICES_MAX_ENTRIES, SOCKETS_MAX_ENTRIES, ServiceInfo, SockKey,
    SockState,
};

/// Read by no program: the agent's record of the layout of these maps.
#[btf_map(name = "layout")]
pub static LAYOUT: Array<u32, 1> = Array::new();

#[btf_map(name = "config")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map(name = "counters")]
pub static COUNTERS: PerCpuHashMap<CounterKey, CounterValue, { COUNTERS_MAX_ENTRIES as usize }> =
    PerCpuHashMap::new();

#[btf_map(name = "endpoints")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { ENDPOINTS_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "services")]
pub static SERVICES: HashMap<IpPort, ServiceInfo, { SERVICES_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "ipcache")]
pub static IPCACHE: LpmTrie<[u8; 16], IpInfo, { IPCACHE_MAX_ENTRIES as usize }> = LpmTrie::new();

#[btf_map(name = "orig_by_cookie")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst, { ORIG_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "orig_by_tuple")]
pub static ORIG_BY_TUPLE: LruHashMap<IpPort, OrigDst, { ORIG_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "sockets")]
pub static SOCKETS: SockHash<SockKey, { SOCKETS_MAX_ENTRIES as usize }> = SockHash::new();

#[btf_map(name = "sock_state")]
pub static SOCK_STATE: LruHashMap<SockKey, SockState, { SOCKETS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "pod_ifaces")]
pub static POD_IFACES: HashMap<u32, PodIface, { ENDPOINTS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "policy")]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry, { POLICY_MAX_ENTRIES as usize }> =
    LpmTrie::new();

#[btf_map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, { CONNTRACK_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "flows")]
pub static FLOWS: RingBuf<FlowEvent, { FLOWS_BYTES as usize }> = RingBuf::new();

/// The ipcache flags of `addr` (a 16-byte address, IPv4 mapped); 0 when the
/// address is not there.
#[inline(always)]
pub fn ip_flags_of(addr: [u8; 16]) -> u32 {
    IPCACHE
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, addr))
        .map_or(0, |info| info.flags)
}

/// Whether `addr` is in the ipcache with every bit of `want`.
#[inline(always)]
pub fn has_flags(addr: [u8; 16], want: u32) -> bool {
    ip_flags_of(addr) & want == want
}
