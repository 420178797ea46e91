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

/// The loaded pod programs, and which interfaces have them.
pub struct PodHooks {
    layout: PinLayout,
    to: OwnedFd,
    from: OwnedFd,
    attached: BTreeSet<u32>,
}

const HOOKS: [(&str, u32); 2] = [
    (PROG_POD_TO, sys::attach_type::TCX_EGRESS),
    (PROG_POD_FROM, sys::attach_type::TCX_INGRESS),
];

impl PodHooks {
    pub(super) fn new(layout: PinLayout, to: OwnedFd, from: OwnedFd) -> Self {
        Self {
            layout,
            to,
            from,
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
        for &ifindex in wanted.difference(&self.attached.clone()) {
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
                HOOKS.iter().any(|(p, _)| *p == program).then_some(())?;
                Some((ifindex.parse().ok()?, e.path()))
            })
            .collect()
    }

    fn attach(&self, ifindex: u32) -> Result<(), BpfError> {
        for (program, attach_type) in HOOKS {
            let prog = if program == PROG_POD_TO {
                &self.to
            } else {
                &self.from
            };
            let path = self.link_path(program, ifindex);
            if path.exists() {
                let adopted = sys::obj_get(&path)
                    .and_then(|link| sys::link_update(link.as_fd(), prog.as_fd()));
                match adopted {
                    Ok(()) => continue,
                    // The interface went and its link with it: start afresh.
                    Err(_) => std::fs::remove_file(&path).map_err(|source| BpfError::Remove {
                        path: path.clone(),
                        source,
                    })?,
                }
            }
            let link = sys::link_create(prog.as_fd(), ifindex, attach_type).map_err(
                |source: io::Error| BpfError::Attach {
                    name: program_name(program),
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

fn program_name(program: &str) -> &'static str {
    if program == PROG_POD_TO {
        PROG_POD_TO
    } else {
        PROG_POD_FROM
    }
}
