//! Writers of the maps the agent owns: config, endpoints, services, ipcache.
//! Each sync computes the difference with what the kernel holds and applies
//! it in place — new and changed entries first, stale ones last — so there is
//! no moment where a live entry is missing.

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
    MAP_IPCACHE, MAP_ORIG_BY_TUPLE, MAP_SERVICES, OrigDst, ServiceInfo,
};

use super::{BpfError, PinLayout};

/// What one sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub upserted: usize,
    pub removed: usize,
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, o: Self) {
        self.upserted += o.upserted;
        self.removed += o.removed;
    }
}

/// The agent-owned maps, opened from their pins.
pub struct Tables {
    config: Array<MapData, DatapathConfig>,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    services: HashMap<MapData, IpPort, ServiceInfo>,
    ipcache: LpmTrie<MapData, [u8; 16], IpInfo>,
}

impl Tables {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        let layout = PinLayout::new(bpffs);
        Ok(Self {
            config: layout.open_map(MAP_CONFIG)?,
            endpoints: layout.open_map(MAP_ENDPOINTS)?,
            services: layout.open_map(MAP_SERVICES)?,
            ipcache: layout.open_map(MAP_IPCACHE)?,
        })
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<(), BpfError> {
        let name = MAP_CONFIG;
        let current = self
            .config
            .get(&0, 0)
            .map_err(|source| BpfError::Map { name, source })?;
        if current != config {
            self.config
                .set(0, config, 0)
                .map_err(|source| BpfError::Map { name, source })?;
        }
        Ok(())
    }

    pub fn sync_endpoints(
        &mut self,
        desired: &BTreeMap<EndpointKey, EndpointInfo>,
    ) -> Result<SyncStats, BpfError> {
        sync_hash(&mut self.endpoints, MAP_ENDPOINTS, desired)
    }

    pub fn sync_services(
        &mut self,
        desired: &BTreeMap<IpPort, ServiceInfo>,
    ) -> Result<SyncStats, BpfError> {
        sync_hash(&mut self.services, MAP_SERVICES, desired)
    }

    /// `desired`: (prefix length, address) → info.
    pub fn sync_ipcache(
        &mut self,
        desired: &BTreeMap<(u32, [u8; 16]), IpInfo>,
    ) -> Result<SyncStats, BpfError> {
        let name = MAP_IPCACHE;
        let err = |source| BpfError::Map { name, source };
        let mut stats = SyncStats::default();
        for (&(len, addr), info) in desired {
            let key = Key::new(len, addr);
            if self.ipcache.get(&key, 0).ok().as_ref() != Some(info) {
                self.ipcache.insert(&key, info, 0).map_err(err)?;
                stats.upserted += 1;
            }
        }
        let current: Vec<Key<[u8; 16]>> =
            self.ipcache.keys().collect::<Result<_, _>>().map_err(err)?;
        for key in current {
            if !desired.contains_key(&(key.prefix_len(), key.data())) {
                self.ipcache.remove(&key).map_err(err)?;
                stats.removed += 1;
            }
        }
        Ok(stats)
    }
}

fn sync_hash<K: Pod + Ord, V: Pod + PartialEq>(
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
    let current: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(err)?;
    for key in current {
        if !desired.contains_key(&key) {
            map.remove(&key).map_err(err)?;
            stats.removed += 1;
        }
    }
    Ok(stats)
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
