//! Writers of the maps the agent owns: config, endpoints, pod interfaces,
//! services, ipcache, policy. Each sync computes the difference with what
//! the kernel holds and applies it in place, in two phases: every map's new
//! and changed entries first ([`Tables::upsert`]), then every map's stale
//! ones ([`Tables::prune`]), so there is no moment where a live entry is
//! missing (a new pod's policy is there before the pod is, a policy's new
//! rules before its old ones go).

use std::{collections::BTreeMap, path::Path};

use aya::{
    Pod,
    maps::{
        Array, HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use trellis_common::{
    DatapathConfig, EndpointInfo, EndpointKey, IpInfo, IpPort, MAP_CONFIG, MAP_ENDPOINTS,
    MAP_IPCACHE, MAP_ORIG_BY_TUPLE, MAP_POD_IFACES, MAP_POLICY, MAP_SERVICES, OrigDst, PodIface,
    PolicyEntry, PolicyKey, ServiceInfo,
};

use super::{BpfError, PinLayout};

/// What one sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub upserted: usize,
    pub removed: usize,
}

/// The agent-owned maps, opened from their pins.
pub struct Tables {
    config: Array<MapData, DatapathConfig>,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pod_ifaces: HashMap<MapData, u32, PodIface>,
    services: HashMap<MapData, IpPort, ServiceInfo>,
    ipcache: LpmTrie<MapData, [u8; 16], IpInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
}

/// What the maps should hold (besides config). LPM keys are
/// (prefix length, data).
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub endpoints: BTreeMap<EndpointKey, EndpointInfo>,
    pub pod_ifaces: BTreeMap<u32, PodIface>,
    pub services: BTreeMap<IpPort, ServiceInfo>,
    pub ipcache: BTreeMap<(u32, [u8; 16]), IpInfo>,
    pub policy: BTreeMap<(u32, PolicyKey), PolicyEntry>,
}

/// What one sync changed, per map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub endpoints: SyncStats,
    pub pod_ifaces: SyncStats,
    pub services: SyncStats,
    pub ipcache: SyncStats,
    pub policy: SyncStats,
}

impl Changes {
    pub fn any(&self) -> bool {
        *self != Self::default()
    }

    /// The ipcache or the policy changed: flows must be judged again.
    pub fn policy_inputs(&self) -> bool {
        self.ipcache != SyncStats::default() || self.policy != SyncStats::default()
    }
}

impl Tables {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        let layout = PinLayout::new(bpffs);
        Ok(Self {
            config: layout.open_map(MAP_CONFIG)?,
            endpoints: layout.open_map(MAP_ENDPOINTS)?,
            pod_ifaces: layout.open_map(MAP_POD_IFACES)?,
            services: layout.open_map(MAP_SERVICES)?,
            ipcache: layout.open_map(MAP_IPCACHE)?,
            policy: layout.open_map(MAP_POLICY)?,
        })
    }

    pub fn config(&self) -> Result<DatapathConfig, BpfError> {
        self.config.get(&0, 0).map_err(|source| BpfError::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<(), BpfError> {
        let name = MAP_CONFIG;
        if self.config()? != config {
            self.config
                .set(0, config, 0)
                .map_err(|source| BpfError::Map { name, source })?;
        }
        Ok(())
    }

    /// Writes every new or changed entry, in the order the kernel reads
    /// them: identities and policy before the endpoints they protect.
    pub fn upsert(&mut self, d: &Desired) -> Result<(Changes, Stale), BpfError> {
        let (ipcache, stale_ipcache) = upsert_lpm(&mut self.ipcache, MAP_IPCACHE, &d.ipcache)?;
        let (policy, stale_policy) = upsert_lpm(&mut self.policy, MAP_POLICY, &d.policy)?;
        let changes = Changes {
            ipcache,
            policy,
            services: upsert_hash(&mut self.services, MAP_SERVICES, &d.services)?,
            pod_ifaces: upsert_hash(&mut self.pod_ifaces, MAP_POD_IFACES, &d.pod_ifaces)?,
            endpoints: upsert_hash(&mut self.endpoints, MAP_ENDPOINTS, &d.endpoints)?,
        };
        let stale = Stale {
            ipcache: stale_ipcache,
            policy: stale_policy,
        };
        Ok((changes, stale))
    }

    /// Removes every entry `d` does not hold, endpoints before their policy.
    /// The LPM maps' stale entries are those [`Tables::upsert`] found while
    /// reading them (only the agent writes them): read once, not twice, a
    /// node's ipcache holds every pod address of the cluster.
    pub fn prune(
        &mut self,
        d: &Desired,
        stale: Stale,
        changes: &mut Changes,
    ) -> Result<(), BpfError> {
        changes.endpoints.removed += prune_hash(&mut self.endpoints, MAP_ENDPOINTS, &d.endpoints)?;
        changes.pod_ifaces.removed +=
            prune_hash(&mut self.pod_ifaces, MAP_POD_IFACES, &d.pod_ifaces)?;
        changes.services.removed += prune_hash(&mut self.services, MAP_SERVICES, &d.services)?;
        changes.policy.removed += prune_lpm(&mut self.policy, MAP_POLICY, stale.policy)?;
        changes.ipcache.removed += prune_lpm(&mut self.ipcache, MAP_IPCACHE, stale.ipcache)?;
        Ok(())
    }
}

/// Entries of the LPM maps that the state no longer wants, as (prefix
/// length, data).
#[derive(Debug, Default)]
pub struct Stale {
    ipcache: Vec<(u32, [u8; 16])>,
    policy: Vec<(u32, PolicyKey)>,
}

/// Writes what differs from the map's contents; returns the counts and the
/// entries the map holds that `desired` does not.
fn upsert_lpm<K: Pod + Ord, V: Pod + PartialEq>(
    map: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    desired: &BTreeMap<(u32, K), V>,
) -> Result<(SyncStats, Vec<(u32, K)>), BpfError> {
    let err = |source| BpfError::Map { name, source };
    let mut stats = SyncStats::default();
    let current: BTreeMap<(u32, K), V> = map
        .iter()
        .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    for (&(len, data), value) in desired {
        if current.get(&(len, data)) != Some(value) {
            map.insert(&Key::new(len, data), value, 0).map_err(err)?;
            stats.upserted += 1;
        }
    }
    let stale = current
        .into_keys()
        .filter(|k| !desired.contains_key(k))
        .collect();
    Ok((stats, stale))
}

fn prune_lpm<K: Pod + Ord, V: Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    stale: Vec<(u32, K)>,
) -> Result<usize, BpfError> {
    let err = |source| BpfError::Map { name, source };
    let mut removed = 0;
    for (len, data) in stale {
        match map.remove(&Key::new(len, data)) {
            Ok(()) => removed += 1,
            // Gone already: nothing to do.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(removed)
}

fn upsert_hash<K: Pod + Ord, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    desired: &BTreeMap<K, V>,
) -> Result<SyncStats, BpfError> {
    let err = |source| BpfError::Map { name, source };
    let mut stats = SyncStats::default();
    for (key, value) in desired {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0).map_err(err)?;
            stats.upserted += 1;
        }
    }
    Ok(stats)
}

fn prune_hash<K: Pod + Ord, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    desired: &BTreeMap<K, V>,
) -> Result<usize, BpfError> {
    let err = |source| BpfError::Map { name, source };
    let current: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(err)?;
    let mut removed = 0;
    for key in current {
        if !desired.contains_key(&key) {
            map.remove(&key).map_err(err)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Looks up captured connections' original destinations, by client address.
pub struct OrigDstTable {
    map: HashMap<MapData, IpPort, OrigDst>,
}

impl OrigDstTable {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        Ok(Self {
            map: PinLayout::new(bpffs).open_map(MAP_ORIG_BY_TUPLE)?,
        })
    }

    /// The original destination of the connection from `client`.
    pub fn get(&self, client: &IpPort) -> Option<OrigDst> {
        self.map.get(client, 0).ok()
    }
}
