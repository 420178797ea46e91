//! The agent's side of sk_msg: it adds its own sockets to the sockhash (they
//! are not under the cgroup root, so sock_ops never sees them), publishes how
//! far it has forwarded each one, asks for splices, and reads the kernel's
//! per-connection byte counts. Shared by every connection task, so element
//! access goes through raw syscalls taking `&self`.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, OwnedFd},
    path::Path,
};

use trellis_common::{MAP_SOCK_STATE, MAP_SOCKETS, SockKey, SockState, sock_flags};

use super::{BpfError, PinLayout, sys};

const BPF_ANY: u64 = 0;

/// The pinned sockhash and its state map.
pub struct SocketMaps {
    sockets: OwnedFd,
    state: OwnedFd,
}

impl SocketMaps {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        let layout = PinLayout::new(bpffs);
        let open = |name: &str| {
            let path = layout.map(name);
            sys::obj_get(&path).map_err(|source| BpfError::Pin { path, source })
        };
        Ok(Self {
            sockets: open(MAP_SOCKETS)?,
            state: open(MAP_SOCK_STATE)?,
        })
    }

    /// Adds one of the agent's sockets: its state first (sk_msg ignores a
    /// socket without one), then the socket. `splice_to`, when given, is where
    /// the pod socket facing this one should send once the agent has caught up.
    pub fn add(
        &self,
        key: &SockKey,
        socket: &impl AsRawFd,
        splice_to: Option<SockKey>,
    ) -> io::Result<SockState> {
        let state = SockState {
            flags: sock_flags::AGENT | splice_to.map_or(0, |_| sock_flags::SPLICE),
            target: splice_to.unwrap_or_default(),
            ..Default::default()
        };
        sys::map_update(self.state.as_fd(), key, &state, BPF_ANY)?;
        let fd = socket.as_raw_fd() as u32;
        if let Err(e) = sys::map_update(self.sockets.as_fd(), key, &fd, BPF_ANY) {
            let _ = sys::map_delete(self.state.as_fd(), key);
            return Err(e);
        }
        Ok(state)
    }

    /// Publishes the agent's socket `key` state: its `forwarded` count tells
    /// sk_msg how far the agent has read and written onwards.
    pub fn publish(&self, key: &SockKey, state: &SockState) -> io::Result<()> {
        sys::map_update(self.state.as_fd(), key, state, BPF_ANY)
    }

    /// The state of a socket, if the kernel (or the agent) has one.
    pub fn state(&self, key: &SockKey) -> Option<SockState> {
        sys::map_lookup(self.state.as_fd(), key).ok().flatten()
    }

    /// Forgets a connection's entries (the sockhash drops closed sockets itself).
    pub fn remove(&self, keys: &[SockKey]) {
        for key in keys {
            let _ = sys::map_delete(self.state.as_fd(), key);
        }
    }
}
