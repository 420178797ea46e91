//! Upgrades without dropped connections: an agent hands its listening
//! sockets and its long-lived L4 connections to its successor over a Unix
//! socket (`SCM_RIGHTS`), the way Envoy's hot restart passes listeners.
//!
//! The exchange, on a `SOCK_SEQPACKET` socket in the abstract namespace of
//! the node's network namespace, named after the `--bpffs` folder (one
//! agent per pin folder):
//!
//! 1. The successor starts, adopts the pinned programs, and before binding
//!    anything connects and says `hello`. The running agent answers with
//!    its listeners (the same sockets, so no connection is refused and none
//!    queued is lost) and keeps accepting meanwhile.
//! 2. Once the successor is ready (state in the maps), it says `take`. The
//!    old agent stops accepting, parks every L4 relay at a point where no
//!    byte is held in its buffers (between a completed write and the next
//!    read), and sends each connection's two sockets with their byte counts
//!    and route; then `done`. Sockets in the sockhash stay there: they are
//!    the same sockets, never closed. HTTP (L7) and HBONE connections are
//!    not handed over: they drain in the old agent, with GOAWAY, when it is
//!    told to stop.
//! 3. The successor relays the connections on and, once the old agent has
//!    let go of the name, listens for a successor of its own.
//!
//! A successor that goes away before `take` changes nothing: the old agent
//! keeps serving and waits for another.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The protocol's version; both sides must speak the same.
const VERSION: u32 = 1;

/// The largest message (a parked connection is a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// Most descriptors in one message (the listeners).
const MAX_FDS: usize = 16;

/// How long either side waits for the other's next message.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long the old agent waits for `take`: the successor loads its state
/// first (a first list from a large cluster's API server takes a while).
/// Both accept meanwhile.
const TAKE_PATIENCE: Duration = Duration::from_secs(300);

/// How long the old agent waits for its relays to park.
const PARK_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the handoff socket: {0}")]
    Io(#[from] io::Error),
    #[error("the other agent sent {got}, expected {expected}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the other agent speaks handoff version {0}, this one {VERSION}")]
    Version(u32),
    #[error("a message that does not parse: {0}")]
    Message(#[from] serde_json::Error),
}

/// What the agents say to each other; descriptors ride along where noted.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        version: u32,
    },
    /// With the listeners' descriptors, in the order of `names`.
    Listeners {
        names: Vec<String>,
    },
    Take,
    /// With the connection's two descriptors: inbound, upstream.
    Connection(ParkedMeta),
    Done {
        handed: usize,
    },
}

impl Message {
    fn name(&self) -> String {
        match self {
            Self::Hello { .. } => "hello",
            Self::Listeners { .. } => "listeners",
            Self::Take => "take",
            Self::Connection(_) => "connection",
            Self::Done { .. } => "done",
        }
        .into()
    }
}

/// A parked L4 connection's route and progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedMeta {
    /// The client pod's address (the accepted socket's peer).
    pub peer: SocketAddr,
    /// What the client asked for (a VIP or pod address).
    pub dst: SocketAddr,
    /// The backend the agent connected to.
    pub backend: SocketAddr,
    /// The backend is on this node.
    pub local: bool,
    /// How far it was relayed each way, and which directions have ended.
    pub progress: crate::proxy::relay::Progress,
}

/// A connection a relay let go of, with its sockets.
#[derive(Debug)]
pub struct Parked {
    pub meta: ParkedMeta,
    pub inbound: OwnedFd,
    pub upstream: OwnedFd,
}

// === impl Relays ===

/// The L4 relays of this agent that can be handed over: each relay watches
/// `pause`, and a paused one leaves its connection here.
#[derive(Debug)]
pub struct Relays {
    pause: watch::Sender<bool>,
    active: AtomicUsize,
    parked: Mutex<Vec<Parked>>,
}

impl Default for Relays {
    fn default() -> Self {
        Self {
            pause: watch::Sender::new(false),
            active: AtomicUsize::new(0),
            parked: Mutex::new(Vec::new()),
        }
    }
}

/// Counts a relay as running while it lives.
pub struct Active<'a>(&'a Relays);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Relays {
    /// A relay starts: the signal it watches, and its place in the count.
    pub fn enter(&self) -> (watch::Receiver<bool>, Active<'_>) {
        self.active.fetch_add(1, Ordering::AcqRel);
        (self.pause.subscribe(), Active(self))
    }

    /// A paused relay's connection.
    pub fn park(&self, parked: Parked) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(parked);
    }

    pub fn running(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Pauses every relay (and any that starts from now on) and returns the
    /// connections parked once all have stopped, or after `limit`; a relay
    /// busy writing to a slow reader past that stays with this agent.
    fn pause_all(&self, limit: Duration) -> Vec<Parked> {
        self.pause.send_replace(true);
        let deadline = Instant::now() + limit;
        // Connections being set up reach their relay within moments.
        std::thread::sleep(Duration::from_millis(100));
        while self.running() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

// === impl Channel ===

/// One end of the handoff socket.
struct Channel(OwnedFd);

impl Channel {
    #[expect(unsafe_code, reason = "sendmsg with SCM_RIGHTS")]
    fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
        let payload = serde_json::to_vec(message)?;
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let fd_bytes = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        let mut control = vec![0u8; if raw.is_empty() { 0 } else { space }];
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            // SAFETY: the control buffer holds one header of CMSG_SPACE(fd_bytes).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    fd_bytes,
                );
            }
        }
        // SAFETY: a valid socket and a message built above.
        let sent = unsafe { libc::sendmsg(self.0.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    #[expect(unsafe_code, reason = "recvmsg with SCM_RIGHTS")]
    fn recv(&self) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
        let mut payload = vec![0u8; MAX_MESSAGE];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space =
            unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; the buffers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: a valid socket; received descriptors are close-on-exec.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        if n == 0 {
            return Err(
                io::Error::new(io::ErrorKind::UnexpectedEof, "the other agent hung up").into(),
            );
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote; each
        // SCM_RIGHTS descriptor is ours to own from here on.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a handoff message was cut short",
            )
            .into());
        }
        let message = serde_json::from_slice(&payload[..n as usize])?;
        Ok((message, fds))
    }

    fn expect_fds(got: &[OwnedFd], want: usize, what: &'static str) -> Result<(), HandoffError> {
        if got.len() == want {
            Ok(())
        } else {
            Err(HandoffError::Unexpected {
                expected: what,
                got: format!("{} descriptors", got.len()),
            })
        }
    }
}

/// The abstract socket name of the agent pinning under `bpffs` (seen in
/// `ss -xl`); a path too long for a socket name is replaced by its FNV-1a
/// hash, stable across builds (old and new agents must agree on it).
fn address(bpffs: &Path) -> io::Result<socket2::SockAddr> {
    use std::os::unix::ffi::OsStrExt as _;
    let bpffs = std::fs::canonicalize(bpffs).unwrap_or_else(|_| bpffs.to_owned());
    let path = bpffs.as_os_str().as_bytes();
    let mut name = b"\0trellis-handoff:".to_vec();
    if name.len() + path.len() <= 107 {
        name.extend_from_slice(path);
    } else {
        let hash = path.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        name.extend_from_slice(format!("{hash:016x}").as_bytes());
    }
    socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&name))
}

fn seqpacket() -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    socket.set_read_timeout(Some(PATIENCE))?;
    socket.set_write_timeout(Some(PATIENCE))?;
    Ok(socket)
}

// === the successor's side ===

/// A predecessor that is handing over.
pub struct Predecessor {
    channel: Channel,
    /// Its listening sockets, by name, until taken.
    listeners: Vec<(String, OwnedFd)>,
}

impl Predecessor {
    /// Connects to the agent running under `bpffs`, if there is one, and
    /// receives its listeners.
    pub fn connect(bpffs: &Path) -> Result<Option<Self>, HandoffError> {
        let socket = seqpacket()?;
        match socket.connect(&address(bpffs)?) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let channel = Channel(socket.into());
        channel.send(&Message::Hello { version: VERSION }, &[])?;
        let (message, fds) = channel.recv()?;
        let Message::Listeners { names } = message else {
            if let Message::Hello { version } = message {
                return Err(HandoffError::Version(version));
            }
            return Err(HandoffError::Unexpected {
                expected: "listeners",
                got: message.name(),
            });
        };
        Channel::expect_fds(&fds, names.len(), "one descriptor per listener")?;
        Ok(Some(Self {
            channel,
            listeners: names.into_iter().zip(fds).collect(),
        }))
    }

    /// The predecessor's listener named `name`, when it had one.
    pub fn take_listener(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.listeners.iter().position(|(n, _)| n == name)?;
        Some(self.listeners.swap_remove(i).1)
    }

    /// The predecessor's TCP listener `name` when it listens on `addr` (a
    /// changed setting gets a socket of its own), non-blocking.
    pub fn listener(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let listener = std::net::TcpListener::from(self.take_listener(name)?);
        let same = listener.local_addr().is_ok_and(|a| a == addr);
        (same && listener.set_nonblocking(true).is_ok()).then_some(listener)
    }

    /// Asks for the connections (this agent is ready) and receives them.
    pub fn take(self) -> Result<Vec<Parked>, HandoffError> {
        self.channel.send(&Message::Take, &[])?;
        let mut parked = Vec::new();
        loop {
            let (message, fds) = self.channel.recv()?;
            match message {
                Message::Connection(meta) => {
                    Channel::expect_fds(&fds, 2, "a connection's two sockets")?;
                    let mut fds = fds.into_iter();
                    let (Some(inbound), Some(upstream)) = (fds.next(), fds.next()) else {
                        unreachable!("two descriptors checked above");
                    };
                    parked.push(Parked {
                        meta,
                        inbound,
                        upstream,
                    });
                }
                Message::Done { handed } if handed == parked.len() => return Ok(parked),
                other => {
                    return Err(HandoffError::Unexpected {
                        expected: "connection or done",
                        got: other.name(),
                    });
                }
            }
        }
    }
}

// === the running agent's side ===

/// Listens for a successor.
pub struct Successors {
    socket: socket2::Socket,
}

impl Successors {
    /// Takes the name for `bpffs`; waits up to `limit` for a predecessor
    /// that still holds it to let go.
    pub fn listen(bpffs: &Path, limit: Duration) -> Result<Self, HandoffError> {
        let address = address(bpffs)?;
        let deadline = Instant::now() + limit;
        loop {
            let socket =
                socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
            match socket.bind(&address) {
                Ok(()) => {
                    socket.listen(1)?;
                    return Ok(Self { socket });
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EADDRINUSE) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Serves successors, one at a time, until one has taken the
    /// connections. `listeners` are this agent's listening sockets by
    /// name; `stop_accepting` runs when the successor says `take`.
    /// Returns how many connections were handed over. Blocking: runs on a
    /// thread of its own.
    pub fn serve(
        self,
        listeners: &[(&str, BorrowedFd<'_>)],
        relays: &Relays,
        stop_accepting: impl Fn(),
    ) -> Result<usize, HandoffError> {
        loop {
            let (socket, _) = self.socket.accept()?;
            socket.set_read_timeout(Some(PATIENCE))?;
            socket.set_write_timeout(Some(PATIENCE))?;
            let channel = Channel(socket.into());
            match hand_over(&channel, listeners, relays, &stop_accepting) {
                Ok(Some(handed)) => return Ok(handed),
                Ok(None) => {
                    tracing::warn!("the successor went away before taking over; serving on");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a handoff failed before the successor took over; serving on");
                }
            }
        }
    }
}

/// One successor: `None` when it left before `take`.
fn hand_over(
    channel: &Channel,
    listeners: &[(&str, BorrowedFd<'_>)],
    relays: &Relays,
    stop_accepting: &impl Fn(),
) -> Result<Option<usize>, HandoffError> {
    match channel.recv()?.0 {
        Message::Hello { version } if version == VERSION => {}
        Message::Hello { version } => {
            channel.send(&Message::Hello { version: VERSION }, &[])?;
            return Err(HandoffError::Version(version));
        }
        other => {
            return Err(HandoffError::Unexpected {
                expected: "hello",
                got: other.name(),
            });
        }
    }
    let names = listeners.iter().map(|(n, _)| (*n).to_owned()).collect();
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| *fd).collect();
    channel.send(&Message::Listeners { names }, &fds)?;
    tracing::info!("a successor took the listeners; both accept until it is ready");
    // It becomes ready (loads the state) before it asks for the rest.
    socket2::SockRef::from(&channel.0).set_read_timeout(Some(TAKE_PATIENCE))?;
    let (message, _) = match channel.recv() {
        Ok(m) => m,
        Err(HandoffError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if !matches!(message, Message::Take) {
        return Err(HandoffError::Unexpected {
            expected: "take",
            got: message.name(),
        });
    }
    stop_accepting();
    let parked = relays.pause_all(PARK_WAIT);
    let kept = relays.running();
    for p in &parked {
        channel.send(
            &Message::Connection(p.meta.clone()),
            &[p.inbound.as_fd(), p.upstream.as_fd()],
        )?;
    }
    channel.send(
        &Message::Done {
            handed: parked.len(),
        },
        &[],
    )?;
    tracing::info!(
        handed = parked.len(),
        kept,
        "handed the L4 connections to the successor; HTTP and HBONE connections drain here on SIGTERM"
    );
    Ok(Some(parked.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_and_connections_cross_with_their_sockets() {
        let dir = std::env::temp_dir().join(format!("trellis-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let successors = Successors::listen(&dir, Duration::from_secs(1)).expect("listen");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let listen_addr = listener.local_addr().expect("addr");
        let relays = Relays::default();
        // A relay that parks a connected pair when paused.
        let client = std::net::TcpStream::connect(listen_addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let (pause, active) = relays.enter();
        let meta = ParkedMeta {
            peer: client.local_addr().expect("addr"),
            dst: listen_addr,
            backend: listen_addr,
            local: true,
            progress: crate::proxy::relay::Progress {
                sent: 5,
                sent_done: false,
                received: 7,
                received_done: true,
            },
        };
        let stopped = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let relays = &relays;
            let stopped = &stopped;
            let (accepted, client_copy) = (accepted, client.try_clone().expect("clone"));
            let meta_for_relay = meta.clone();
            s.spawn(move || {
                let mut pause = pause;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(pause.wait_for(|p| *p)).expect("paused");
                relays.park(Parked {
                    meta: meta_for_relay,
                    inbound: accepted.into(),
                    upstream: client_copy.into(),
                });
                drop(active);
            });
            let listener = &listener;
            let server = s.spawn(move || {
                successors.serve(&[("outbound4", listener.as_fd())], relays, || {
                    stopped.store(true, Ordering::Relaxed)
                })
            });
            let mut predecessor = Predecessor::connect(&dir)
                .expect("connect")
                .expect("a predecessor");
            let inherited = predecessor
                .take_listener("outbound4")
                .expect("the listener");
            assert!(predecessor.take_listener("outbound4").is_none());
            // The same listening socket: a connect to it is accepted through the copy.
            let inherited = std::net::TcpListener::from(inherited);
            assert_eq!(inherited.local_addr().expect("addr"), listen_addr);
            let _c = std::net::TcpStream::connect(listen_addr).expect("connect");
            inherited
                .accept()
                .expect("accepted through the handed listener");
            let parked = predecessor.take().expect("take");
            assert_eq!(server.join().expect("server").expect("served"), 1);
            assert!(stopped.load(Ordering::Relaxed));
            assert_eq!(parked.len(), 1);
            assert_eq!(parked[0].meta, meta);
            // The handed sockets are the connection: bytes written to the
            // client arrive on the handed inbound socket.
            use std::io::{Read as _, Write as _};
            let mut inbound =
                std::net::TcpStream::from(parked.into_iter().next().expect("one").inbound);
            (&client).write_all(b"hello").expect("write");
            let mut got = [0u8; 5];
            inbound.read_exact(&mut got).expect("read");
            assert_eq!(&got, b"hello");
        });
        // No agent listens any more: a successor finds none.
        assert!(Predecessor::connect(&dir).expect("connect").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
