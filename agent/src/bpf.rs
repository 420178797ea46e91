//! The kernel data path: the embedded object, loading it, pinning its maps,
//! attaching its programs with pinned links, adopting what a previous agent
//! left pinned, and uninstalling.

pub mod btf;
pub mod maps;
pub mod pins;
pub mod pod_hooks;
pub mod sockets;
#[expect(unsafe_code, reason = "raw syscalls aya 0.14 does not wrap")]
pub mod sys;
pub mod tables;

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, ProgramError},
};
use serde::Serialize;
use tracing::warn;
use trellis_common::{
    ALL_MAPS, GLOBAL_SOCK_RMEM_ALLOC, GLOBAL_TCP_SND_UNA, GLOBAL_TCP_WRITE_SEQ, LAYOUT_VERSION,
    MAP_LAYOUT, MAP_SOCKETS, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6,
    PROG_HBONE_IN, PROG_POD_FROM, PROG_POD_TO, PROG_SENDMSG4, PROG_SENDMSG6, PROG_SK_MSG,
    PROG_SOCK_OPS,
};

pub use self::pins::{BpffsError, PinLayout};

/// The kernel programs, built by `build.rs` with BTF.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trellis-ebpf.o"));

/// The cgroup programs and their hooks, in attach order (after sk_msg, which
/// hangs off the sockhash): sock_ops first, so
/// no captured connection is established before its original destination
/// can be indexed.
const CGROUP_PROGRAMS: &[(&str, u32)] = &[
    (PROG_SOCK_OPS, sys::attach_type::CGROUP_SOCK_OPS),
    (
        PROG_GETPEERNAME4,
        sys::attach_type::CGROUP_INET4_GETPEERNAME,
    ),
    (
        PROG_GETPEERNAME6,
        sys::attach_type::CGROUP_INET6_GETPEERNAME,
    ),
    (PROG_CONNECT4, sys::attach_type::CGROUP_INET4_CONNECT),
    (PROG_CONNECT6, sys::attach_type::CGROUP_INET6_CONNECT),
    (PROG_SENDMSG4, sys::attach_type::CGROUP_UDP4_SENDMSG),
    (PROG_SENDMSG6, sys::attach_type::CGROUP_UDP6_SENDMSG),
];

/// What went wrong installing or removing the data path, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("--cgroup-root {path}: not a cgroup v2 folder{hint}")]
    NotCgroup2 { path: PathBuf, hint: String },
    #[error("--cgroup-root {path}: {source}")]
    CgroupRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "this agent was built without its kernel programs (TRELLIS_SKIP_EBPF_BUILD=1); \
         run `cargo xtask setup` and rebuild"
    )]
    NoObject,
    #[error("loading the kernel object: {source}{hint}")]
    Load {
        #[source]
        source: aya::EbpfError,
        hint: &'static str,
    },
    #[error("the kernel object has no program {name}: agent and object are out of step")]
    MissingProgram { name: &'static str },
    #[error("the kernel object has no map {name}: agent and object are out of step")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}{hint}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
        hint: &'static str,
    },
    #[error("attaching program {name}: {source}{hint}")]
    Attach {
        name: &'static str,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("updating the pinned link {path} to the new program: {source}")]
    LinkUpdate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

const PRIVILEGE_HINT: &str = "; the agent needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and \
    CAP_PERFMON (run it as root, or grant those capabilities)";

fn hint_for(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => PRIVILEGE_HINT,
        _ => "",
    }
}

/// How a program came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attachment {
    /// This agent made the link.
    Attached,
    /// A previous agent's pinned link was kept, its program swapped for ours.
    Adopted,
}

/// One attached program.
#[derive(Clone, Debug, Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub link: PathBuf,
    pub attachment: Attachment,
}

/// The loaded, pinned and attached kernel programs of this agent.
pub struct Datapath {
    layout: PinLayout,
    /// Whether the programs know where the socket fields sk_msg needs are.
    socket_offsets: bool,
    programs: Vec<AttachedProgram>,
    // Holds program and map fds for the agent's lifetime. Dropping it closes
    // them; the pinned links keep the programs attached.
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the embedded object, pins (or reuses the pinned) maps, and
    /// attaches every cgroup program at `cgroup_root` through a pinned link,
    /// adopting links a previous agent pinned.
    pub fn install(cgroup_root: &Path, bpffs: &Path) -> Result<Self, BpfError> {
        Self::install_object(OBJECT, cgroup_root, bpffs)
    }

    fn install_object(object: &[u8], cgroup_root: &Path, bpffs: &Path) -> Result<Self, BpfError> {
        if object.is_empty() {
            return Err(BpfError::NoObject);
        }
        check_cgroup_root(cgroup_root)?;
        let layout = PinLayout::new(bpffs);
        layout.ensure()?;
        if let Some(pinned) = layout.pinned_layout().filter(|&v| v != LAYOUT_VERSION) {
            warn!(
                pinned,
                current = LAYOUT_VERSION,
                "the pinned maps have another layout: making them anew"
            );
            layout.forget_maps()?;
        }

        let offsets = btf::socket_offsets(Path::new(btf::VMLINUX))
            .inspect_err(|e| warn!(error = %e, "sk_msg turned off: the kernel's socket fields cannot be located"))
            .ok();
        let mut loader = EbpfLoader::new();
        // No kernel BTF for aya: the programs carry no CO-RE relocations
        // (the few kernel offsets they need are the globals below) and attach
        // to no BTF-typed hook. `new()` has parsed vmlinux's BTF regardless
        // (about 17 MiB of heap, the agent's peak RSS); dropping it here
        // frees it before the object is loaded.
        loader.btf(None);
        if let Some(offsets) = &offsets {
            loader
                .override_global(GLOBAL_SOCK_RMEM_ALLOC, &offsets.sock_rmem_alloc, true)
                .override_global(GLOBAL_TCP_WRITE_SEQ, &offsets.tcp_write_seq, true)
                .override_global(GLOBAL_TCP_SND_UNA, &offsets.tcp_snd_una, true);
        }
        let map_paths: Vec<(&str, PathBuf)> = ALL_MAPS
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(|source| {
            let hint = match &source {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) => {
                    hint_for(io_error)
                }
                _ => "",
            };
            BpfError::Load { source, hint }
        })?;

        // Recorded once the maps are there: pinned maps of this layout.
        let map = ebpf
            .map_mut(MAP_LAYOUT)
            .ok_or(BpfError::MissingMap { name: MAP_LAYOUT })?;
        aya::maps::Array::<_, u32>::try_from(map)
            .and_then(|mut map| map.set(0, LAYOUT_VERSION, 0))
            .map_err(|source| BpfError::Map {
                name: MAP_LAYOUT,
                source,
            })?;

        let cgroup = File::open(cgroup_root).map_err(|source| BpfError::CgroupRoot {
            path: cgroup_root.into(),
            source,
        })?;
        let mut programs = Vec::new();
        // sk_msg before sock_ops: a socket added to the sockhash is handled
        // from its first byte.
        let sockets = layout.map(MAP_SOCKETS);
        let sockets = sys::obj_get(&sockets).map_err(|source| BpfError::Pin {
            path: sockets,
            source,
        })?;
        programs.push(attach_program(
            &mut ebpf,
            &layout,
            sockets.as_raw_fd() as u32,
            PROG_SK_MSG,
            sys::attach_type::SK_MSG_VERDICT,
        )?);
        for &(name, attach_type) in CGROUP_PROGRAMS {
            programs.push(attach_program(
                &mut ebpf,
                &layout,
                cgroup.as_raw_fd() as u32,
                name,
                attach_type,
            )?);
        }
        Ok(Self {
            layout,
            socket_offsets: offsets.is_some(),
            programs,
            ebpf,
        })
    }

    /// Whether sk_msg can work: without the kernel's socket field offsets
    /// it redirects nothing.
    pub fn sk_msg_usable(&self) -> bool {
        self.socket_offsets
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Attaches HBONE steering (tcx ingress) to the node's uplink, `ifindex`
    /// in the agent's network namespace.
    pub fn attach_hbone_steering(&mut self, ifindex: u32) -> Result<AttachedProgram, BpfError> {
        let program = attach_program(
            &mut self.ebpf,
            &self.layout,
            ifindex,
            PROG_HBONE_IN,
            sys::attach_type::TCX_INGRESS,
        )?;
        self.programs.push(program.clone());
        Ok(program)
    }

    /// Loads the pod programs (STRICT mTLS, replies to source-preserving
    /// sockets), for the state loop to attach to each local pod's interface.
    pub fn pod_hooks(&mut self) -> Result<pod_hooks::PodHooks, BpfError> {
        let mut fds = Vec::new();
        for name in [PROG_POD_TO, PROG_POD_FROM] {
            let err = |e| program_error(name, e);
            let Some(Program::SchedClassifier(p)) = self.ebpf.program_mut(name) else {
                return Err(BpfError::MissingProgram { name });
            };
            if p.fd().is_err() {
                retrying(|| p.load()).map_err(err)?;
            }
            let fd = p
                .fd()
                .map_err(err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| BpfError::Attach {
                    name,
                    hint: "",
                    source,
                })?;
            fds.push(fd);
        }
        let from = fds.pop().expect("two programs");
        let to = fds.pop().expect("two programs");
        Ok(pod_hooks::PodHooks::new(self.layout.clone(), to, from))
    }

    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Runs a program load again when the verifier gave up because a signal
/// was pending (`EAGAIN`), as libbpf does: a signal to the agent at start-up
/// (a child exiting, a reload) must not fail it.
fn retrying(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            done => return done,
        }
    }
}

fn program_error(name: &'static str, source: ProgramError) -> BpfError {
    let hint = match &source {
        ProgramError::LoadError { io_error, .. } => hint_for(io_error),
        ProgramError::SyscallError(e) => hint_for(&e.io_error),
        _ => "",
    };
    BpfError::Program { name, source, hint }
}

/// Attaches a program to `target` (a cgroup or the sockhash by fd, an
/// interface by ifindex) through a pinned link, or adopts the link a
/// previous agent pinned.
fn attach_program(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    target: u32,
    name: &'static str,
    attach_type: u32,
) -> Result<AttachedProgram, BpfError> {
    let err = |e| program_error(name, e);
    let program = ebpf
        .program_mut(name)
        .ok_or(BpfError::MissingProgram { name })?;
    match program {
        Program::CgroupSockAddr(p) => retrying(|| p.load()).map_err(err)?,
        Program::SockOps(p) => retrying(|| p.load()).map_err(err)?,
        Program::SkMsg(p) => retrying(|| p.load()).map_err(err)?,
        Program::SchedClassifier(p) => retrying(|| p.load()).map_err(err)?,
        _ => return Err(BpfError::MissingProgram { name }),
    }
    let prog_fd = program.fd().map_err(err)?.as_fd();

    let link_path = layout.link(name);
    if link_path.exists() {
        adopt_link(&link_path, prog_fd)?;
        return Ok(AttachedProgram {
            name,
            link: link_path,
            attachment: Attachment::Adopted,
        });
    }
    let link =
        sys::link_create(prog_fd, target, attach_type).map_err(|source| BpfError::Attach {
            name,
            hint: hint_for(&source),
            source,
        })?;
    sys::obj_pin(link.as_fd(), &link_path).map_err(|source| BpfError::Pin {
        path: link_path.clone(),
        source,
    })?;
    Ok(AttachedProgram {
        name,
        link: link_path,
        attachment: Attachment::Attached,
    })
}

/// A previous agent's link: keep it (no moment without the hook) and swap in
/// our program.
fn adopt_link(link_path: &Path, program: std::os::fd::BorrowedFd<'_>) -> Result<(), BpfError> {
    let link = sys::obj_get(link_path).map_err(|source| BpfError::Pin {
        path: link_path.into(),
        source,
    })?;
    sys::link_update(link.as_fd(), program).map_err(|source| BpfError::LinkUpdate {
        path: link_path.into(),
        source,
    })
}

fn check_cgroup_root(path: &Path) -> Result<(), BpfError> {
    match crate::cgroup::is_cgroup2(path) {
        Ok(true) => Ok(()),
        Ok(false) => {
            let hint = match crate::cgroup::cgroup2_mount() {
                Ok(mount) => format!(" (cgroup2 is mounted at {})", mount.display()),
                Err(e) => format!(" ({e})"),
            };
            Err(BpfError::NotCgroup2 {
                path: path.into(),
                hint,
            })
        }
        Err(source) => Err(BpfError::CgroupRoot {
            path: path.into(),
            source,
        }),
    }
}

/// Removes every link and map pinned under `bpffs` (detaching the programs),
/// then the folders. Returns what it removed. Safe to run twice.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let layout = PinLayout::new(bpffs);
    let mut removed = Vec::new();
    // Links first: the hooks go before the maps they read.
    for dir in [layout.links_dir(), layout.maps_dir()] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(BpfError::Remove { path: dir, source }),
        };
        for entry in entries {
            let path = entry
                .map_err(|source| BpfError::Remove {
                    path: dir.clone(),
                    source,
                })?
                .path();
            std::fs::remove_file(&path).map_err(|source| BpfError::Remove {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    for dir in [
        layout.links_dir(),
        layout.maps_dir(),
        layout.root().to_path_buf(),
    ] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Something else lives there (another tool's pins): leave it.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(source) => return Err(BpfError::Remove { path: dir, source }),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya::programs::ProgramError;

    use super::retrying;

    fn load_error(kind: io::ErrorKind) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from(kind),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        }
    }

    #[test]
    fn a_load_the_verifier_gave_up_on_is_tried_again() {
        let mut calls = 0;
        let loaded = retrying(|| {
            calls += 1;
            if calls < 3 {
                Err(load_error(io::ErrorKind::WouldBlock))
            } else {
                Ok(())
            }
        });
        assert!(loaded.is_ok());
        assert_eq!(calls, 3);
    }

    #[test]
    fn other_errors_and_the_last_attempt_are_returned() {
        let mut calls = 0;
        let denied = retrying(|| {
            calls += 1;
            Err(load_error(io::ErrorKind::PermissionDenied))
        });
        assert!(matches!(denied, Err(ProgramError::LoadError { .. })));
        assert_eq!(calls, 1, "a verifier rejection is not retried");
        calls = 0;
        let interrupted = retrying(|| {
            calls += 1;
            Err(load_error(io::ErrorKind::WouldBlock))
        });
        assert!(interrupted.is_err());
        assert_eq!(calls, 5, "bounded");
    }
}
