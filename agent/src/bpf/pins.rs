//! Where things are pinned under the agent's bpffs folder:
//!
//! ```text
//! <bpffs>/maps/<map name>     every map, BTF, readable with `bpftool map dump pinned`
//! <bpffs>/links/<program>     the bpf_link holding each program attached
//! ```
//!
//! Links, not program attachments, hold the programs in place, so the kernel
//! keeps enforcing while no agent runs; removing a link's pin detaches it.

use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError};

use super::BpfError;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin folder layout of one agent.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Opens the pinned map `name` as the aya map type `T` (which checks the
    /// map type and key/value sizes against `T`).
    pub fn open_map<T: TryFrom<Map, Error = MapError>>(
        &self,
        name: &'static str,
    ) -> Result<T, BpfError> {
        let err = |source| BpfError::Map { name, source };
        let data = MapData::from_pin(self.map(name)).map_err(err)?;
        Map::from_map_data(data)
            .map_err(err)?
            .try_into()
            .map_err(err)
    }
}

/// Why the bpffs folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "--bpffs {path}: not on a bpf file system (mount one with `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    NotBpffs { path: PathBuf },
    #[error("--bpffs {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PinLayout {
    /// The layout of the maps pinned here: `None` when nothing is pinned,
    /// `Some(0)` for maps pinned before the layout was recorded.
    pub fn pinned_layout(&self) -> Option<u32> {
        let any = std::fs::read_dir(self.maps_dir()).ok()?.next().is_some();
        if !any {
            return None;
        }
        let version = self
            .open_map::<aya::maps::Array<MapData, u32>>(trellis_common::MAP_LAYOUT)
            .ok()
            .and_then(|map| map.get(&0, 0).ok());
        Some(version.unwrap_or(0))
    }

    /// Unpins every map, and the sk_msg link (it hangs off the old
    /// sockhash): the maps of another layout, made anew by the next load.
    /// Programs still using them keep them until they are replaced.
    pub fn forget_maps(&self) -> Result<(), BpffsError> {
        let io = |path: PathBuf| move |source| BpffsError::Io { path, source };
        let dir = self.maps_dir();
        for entry in std::fs::read_dir(&dir).map_err(io(dir.clone()))? {
            let path = entry.map_err(io(dir.clone()))?.path();
            std::fs::remove_file(&path).map_err(io(path.clone()))?;
        }
        let sk_msg = self.link(trellis_common::PROG_SK_MSG);
        match std::fs::remove_file(&sk_msg) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(sk_msg)(e)),
            _ => Ok(()),
        }
    }

    /// Creates the folders, checking they are on bpffs.
    pub fn ensure(&self) -> Result<(), BpffsError> {
        for dir in [self.root.clone(), self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| BpffsError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let magic = super::sys::fs_magic(&self.root).map_err(|source| BpffsError::Io {
            path: self.root.clone(),
            source,
        })?;
        if magic != BPF_FS_MAGIC {
            return Err(BpffsError::NotBpffs {
                path: self.root.clone(),
            });
        }
        Ok(())
    }
}
