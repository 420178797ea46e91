//! Writers of the maps the agent owns: config, endpoints, pod interfaces,
//! services, ipcache, policy. Each sync computes the difference with what
//! the maps hold and applies it in place, in two phases: every map's new
//! and changed entries first ([`Tables::upsert`]), then every map's stale
//! ones ([`Tables::prune`]), so there is no moment where a live entry is
//! missing (a new pod's policy is there before the pod is, a policy's new
//! rules before its old ones go).
//!
//! What the maps hold is remembered from the last sync, not read back each
//! time: only the agent writes them, and at 20,000 pods reading the
//! ipcache alone is 40,000 syscalls (about 60 ms of every change). They are
//! read from the kernel at start, after a failed write, and every
//! `--map-resync` (a change made behind the agent's back, with `bpftool`
//! say, is logged and undone then).

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Pod,
    maps::{
        Array, HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use tracing::warn;
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
    /// What the maps hold, as last read or written; `None` until read, and
    /// after a sync that failed half way.
    held: Option<Desired>,
    /// When `held` was last read from the kernel.
    read_at: Option<Instant>,
    /// How often `held` is checked against the kernel.
    resync: Duration,
}

/// What the maps should hold (besides config). LPM keys are
/// (prefix length, data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// How often the maps are read back by default (`--map-resync`).
    pub const RESYNC: Duration = Duration::from_secs(300);

    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        let layout = PinLayout::new(bpffs);
        Ok(Self {
            config: layout.open_map(MAP_CONFIG)?,
            endpoints: layout.open_map(MAP_ENDPOINTS)?,
            pod_ifaces: layout.open_map(MAP_POD_IFACES)?,
            services: layout.open_map(MAP_SERVICES)?,
            ipcache: layout.open_map(MAP_IPCACHE)?,
            policy: layout.open_map(MAP_POLICY)?,
            held: None,
            read_at: None,
            resync: Self::RESYNC,
        })
    }

    /// Reads the maps back from the kernel every `every`.
    #[must_use]
    pub fn with_resync(mut self, every: Duration) -> Self {
        self.resync = every;
        self
    }

    /// Whether the next sync reads the maps back from the kernel.
    pub fn resync_due(&self) -> bool {
        self.read_at.is_none_or(|at| at.elapsed() >= self.resync)
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

    /// Every map's contents, from the kernel.
    fn read(&self) -> Result<Desired, BpfError> {
        Ok(Desired {
            endpoints: read_hash(&self.endpoints, MAP_ENDPOINTS)?,
            pod_ifaces: read_hash(&self.pod_ifaces, MAP_POD_IFACES)?,
            services: read_hash(&self.services, MAP_SERVICES)?,
            ipcache: read_lpm(&self.ipcache, MAP_IPCACHE)?,
            policy: read_lpm(&self.policy, MAP_POLICY)?,
        })
    }

    /// What the maps hold: remembered, or read when a resync is due.
    fn held(&mut self) -> Result<Desired, BpfError> {
        let remembered = match self.held.take() {
            Some(held) if !self.resync_due() => return Ok(held),
            other => other,
        };
        let read = self.read()?;
        self.read_at = Some(Instant::now());
        if let Some(remembered) = remembered
            && remembered != read
        {
            warn!(
                maps = ?differing(&remembered, &read),
                "the kernel maps were changed by something other than this agent; writing them back"
            );
        }
        Ok(read)
    }

    /// Writes every new or changed entry, in the order the kernel reads
    /// them: identities and policy before the endpoints they protect.
    pub fn upsert(&mut self, d: &Desired) -> Result<(Changes, Stale), BpfError> {
        let held = self.held()?;
        let changes = Changes {
            ipcache: write(&held.ipcache, &d.ipcache, MAP_IPCACHE, |(len, data), v| {
                self.ipcache.insert(&Key::new(*len, *data), v, 0)
            })?,
            policy: write(&held.policy, &d.policy, MAP_POLICY, |(len, data), v| {
                self.policy.insert(&Key::new(*len, *data), v, 0)
            })?,
            services: write(&held.services, &d.services, MAP_SERVICES, |k, v| {
                self.services.insert(k, v, 0)
            })?,
            pod_ifaces: write(&held.pod_ifaces, &d.pod_ifaces, MAP_POD_IFACES, |k, v| {
                self.pod_ifaces.insert(k, v, 0)
            })?,
            endpoints: write(&held.endpoints, &d.endpoints, MAP_ENDPOINTS, |k, v| {
                self.endpoints.insert(k, v, 0)
            })?,
        };
        let stale = Stale {
            endpoints: stale(&held.endpoints, &d.endpoints),
            pod_ifaces: stale(&held.pod_ifaces, &d.pod_ifaces),
            services: stale(&held.services, &d.services),
            ipcache: stale(&held.ipcache, &d.ipcache),
            policy: stale(&held.policy, &d.policy),
        };
        Ok((changes, stale))
    }

    /// Removes the entries [`Tables::upsert`] found stale, endpoints before
    /// their policy; the maps then hold `d`.
    pub fn prune(
        &mut self,
        d: Desired,
        stale: Stale,
        changes: &mut Changes,
    ) -> Result<(), BpfError> {
        changes.endpoints.removed +=
            remove(stale.endpoints, MAP_ENDPOINTS, |k| self.endpoints.remove(k))?;
        changes.pod_ifaces.removed += remove(stale.pod_ifaces, MAP_POD_IFACES, |k| {
            self.pod_ifaces.remove(k)
        })?;
        changes.services.removed +=
            remove(stale.services, MAP_SERVICES, |k| self.services.remove(k))?;
        changes.policy.removed += remove(stale.policy, MAP_POLICY, |(len, data)| {
            self.policy.remove(&Key::new(*len, *data))
        })?;
        changes.ipcache.removed += remove(stale.ipcache, MAP_IPCACHE, |(len, data)| {
            self.ipcache.remove(&Key::new(*len, *data))
        })?;
        self.held = Some(d);
        Ok(())
    }
}

/// Entries the maps hold that the state no longer wants.
#[derive(Debug, Default)]
pub struct Stale {
    endpoints: Vec<EndpointKey>,
    pod_ifaces: Vec<u32>,
    services: Vec<IpPort>,
    ipcache: Vec<(u32, [u8; 16])>,
    policy: Vec<(u32, PolicyKey)>,
}

/// Names of the maps whose contents differ between `a` and `b`.
fn differing(a: &Desired, b: &Desired) -> Vec<&'static str> {
    [
        (MAP_ENDPOINTS, a.endpoints != b.endpoints),
        (MAP_POD_IFACES, a.pod_ifaces != b.pod_ifaces),
        (MAP_SERVICES, a.services != b.services),
        (MAP_IPCACHE, a.ipcache != b.ipcache),
        (MAP_POLICY, a.policy != b.policy),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect()
}

/// Writes (with `insert`) each entry of `desired` that `held` lacks or
/// holds with another value.
fn write<K: Ord, V: PartialEq>(
    held: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
    mut insert: impl FnMut(&K, &V) -> Result<(), aya::maps::MapError>,
) -> Result<SyncStats, BpfError> {
    let mut stats = SyncStats::default();
    for (key, value) in desired {
        if held.get(key) != Some(value) {
            insert(key, value).map_err(|source| BpfError::Map { name, source })?;
            stats.upserted += 1;
        }
    }
    Ok(stats)
}

fn stale<K: Ord + Copy, V>(held: &BTreeMap<K, V>, desired: &BTreeMap<K, V>) -> Vec<K> {
    held.keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect()
}

/// Removes each key; one gone already is not an error.
fn remove<K>(
    keys: Vec<K>,
    name: &'static str,
    mut remove: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
) -> Result<usize, BpfError> {
    let mut removed = 0;
    for key in &keys {
        match remove(key) {
            Ok(()) => removed += 1,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(BpfError::Map { name, source }),
        }
    }
    Ok(removed)
}

fn read_lpm<K: Pod + Ord, V: Pod>(
    map: &LpmTrie<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<(u32, K), V>, BpfError> {
    map.iter()
        .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
        .collect::<Result<_, _>>()
        .map_err(|source| BpfError::Map { name, source })
}

fn read_hash<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, BpfError> {
    map.iter()
        .collect::<Result<_, _>>()
        .map_err(|source| BpfError::Map { name, source })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_writes_what_differs_and_removes_what_is_no_longer_wanted() {
        let held = BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]);
        let desired = BTreeMap::from([(2, 'b'), (3, 'x'), (4, 'd')]);
        let mut written = Vec::new();
        let stats = write(&held, &desired, "test", |k, v| {
            written.push((*k, *v));
            Ok(())
        })
        .expect("write");
        assert_eq!(written, [(3, 'x'), (4, 'd')], "changed and new only");
        assert_eq!(stats.upserted, 2);
        assert_eq!(stale(&held, &desired), [1]);

        let mut gone = Vec::new();
        let removed = remove(vec![1, 5], "test", |k| {
            gone.push(*k);
            match k {
                5 => Err(aya::maps::MapError::KeyNotFound),
                _ => Ok(()),
            }
        })
        .expect("an entry gone already is no error");
        assert_eq!((gone, removed), (vec![1, 5], 1));
    }

    #[test]
    fn what_was_changed_behind_the_agents_back_is_named_by_map() {
        let mut a = Desired::default();
        let b = a.clone();
        assert!(differing(&a, &b).is_empty());
        a.services.insert(IpPort::default(), ServiceInfo::default());
        a.pod_ifaces.insert(7, PodIface::default());
        assert_eq!(differing(&a, &b), [MAP_POD_IFACES, MAP_SERVICES]);
    }
}
