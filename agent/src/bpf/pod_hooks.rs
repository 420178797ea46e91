//! The TC programs on each local pod's host-side interface (`trl_pod_to`
//! on egress, `trl_pod_from` on ingress), attached as pods appear and
//! detached as they go. Their links are pinned as `<program>@<ifindex>` in
//! the links folder, so a restarted agent adopts them (no moment without
//! STRICT enforcement) and `--uninstall` removes them with the rest.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
};

use trellis_common::{PROG_POD_FROM, PROG_POD_TO};

use super::{BpfError, PinLayout, hint_for, sys};

/// One pod program: its name, where it attaches, the loaded program.
struct Hook {
    program: &'static str,
    attach_type: u32,
    fd: OwnedFd,
}

/// The loaded pod programs, and which interfaces have them.
pub struct PodHooks {
    layout: PinLayout,
    hooks: [Hook; 2],
    attached: BTreeSet<u32>,
}

impl PodHooks {
    pub(super) fn new(layout: PinLayout, to: OwnedFd, from: OwnedFd) -> Self {
        let hooks = [
            Hook {
                program: PROG_POD_TO,
                attach_type: sys::attach_type::TCX_EGRESS,
                fd: to,
            },
            Hook {
                program: PROG_POD_FROM,
                attach_type: sys::attach_type::TCX_INGRESS,
                fd: from,
            },
        ];
        Self {
            layout,
            hooks,
            attached: BTreeSet::new(),
        }
    }

    fn link_path(&self, program: &str, ifindex: u32) -> PathBuf {
        self.layout.links_dir().join(format!("{program}@{ifindex}"))
    }

    /// Makes the set of hooked interfaces `wanted`: attaches (or adopts) on
    /// new ones, detaches from the rest, pins left by an earlier agent
    /// included. Returns the interfaces that could not be hooked, with why;
    /// the others are hooked regardless.
    pub fn sync(&mut self, wanted: &BTreeSet<u32>) -> Vec<(u32, BpfError)> {
        let mut failed = Vec::new();
        let new: Vec<u32> = wanted.difference(&self.attached).copied().collect();
        for ifindex in new {
            match self.attach(ifindex) {
                Ok(()) => {
                    self.attached.insert(ifindex);
                }
                Err(e) => failed.push((ifindex, e)),
            }
        }
        for (ifindex, path) in self.pinned() {
            if !wanted.contains(&ifindex) {
                // Unpinning drops the last reference: the link detaches.
                let _ = std::fs::remove_file(path);
                self.attached.remove(&ifindex);
            }
        }
        failed
    }

    /// The pod links pinned now: (ifindex, path).
    fn pinned(&self) -> Vec<(u32, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.layout.links_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (program, ifindex) = name.split_once('@')?;
                self.hooks
                    .iter()
                    .any(|h| h.program == program)
                    .then_some(())?;
                Some((ifindex.parse().ok()?, e.path()))
            })
            .collect()
    }

    fn attach(&self, ifindex: u32) -> Result<(), BpfError> {
        for hook in &self.hooks {
            let path = self.link_path(hook.program, ifindex);
            if path.exists() {
                let adopted = sys::obj_get(&path)
                    .and_then(|link| sys::link_update(link.as_fd(), hook.fd.as_fd()));
                match adopted {
                    Ok(()) => continue,
                    // The interface went and its link with it: start afresh.
                    Err(_) => std::fs::remove_file(&path).map_err(|source| BpfError::Remove {
                        path: path.clone(),
                        source,
                    })?,
                }
            }
            let link = sys::link_create(hook.fd.as_fd(), ifindex, hook.attach_type).map_err(
                |source: io::Error| BpfError::Attach {
                    name: hook.program,
                    hint: hint_for(&source),
                    source,
                },
            )?;
            sys::obj_pin(link.as_fd(), &path).map_err(|source| BpfError::Pin { path, source })?;
        }
        Ok(())
    }

    /// Interfaces hooked now.
    pub fn attached(&self) -> &BTreeSet<u32> {
        &self.attached
    }
}
