//! Relaying a proxied connection's bytes both ways, half-close included, with
//! an idle timeout; and the agent's side of the kernel shortcuts.
//!
//! With sk_msg, the agent's sockets are in the sockhash and, after each
//! write onwards, the agent publishes how many bytes it has forwarded from
//! each; the kernel moves a pod socket onto a faster path only when that
//! count equals what the pod socket has sent, so no byte overtakes another.
//! Once a connection is spliced the agent sees no more data, only the FINs,
//! which it still forwards; the kernel's per-socket `spliced` counts then
//! carry the byte counts and keep the idle timer honest.

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};
use tracing::debug;
use trellis_common::{SK_MSG_FORWARDED_EVERY, SockKey, SockState, sock_flags, sock_mode};

use crate::{
    bpf::sockets::SocketMaps,
    hbone::stream::{self, H2Stream},
};

const BUFFER: usize = 64 * 1024;

/// Reads from the app's socket into a tunnel start at `TUNNEL_READ_MIN` and
/// double, up to `TUNNEL_READ_MAX`, while each read fills all the room it
/// had: a bulk sender gets few, large DATA frames (fewer h2 frames, TLS
/// writes and syscalls per byte: agent a's CPU per GB fell by a tenth
/// against fixed 64 KiB reads), while a connection of small messages keeps
/// a small block.
const TUNNEL_READ_MIN: usize = 16 * 1024;
const TUNNEL_READ_MAX: usize = 256 * 1024;

/// The next tunnel read's size after a read of `n` bytes into `room`.
fn next_read(want: usize, n: usize, room: usize) -> usize {
    if n == room {
        (want * 2).min(TUNNEL_READ_MAX)
    } else if n < TUNNEL_READ_MIN / 2 {
        TUNNEL_READ_MIN
    } else {
        want
    }
}

/// The agent's sockets of a connection that are in the sockhash.
#[derive(Clone, Copy, Debug)]
pub struct Accelerated {
    /// The accepted socket (facing the app).
    pub inbound: (SockKey, SockState),
    /// The socket to a local backend, when the backend's socket is in the
    /// sockhash too.
    pub upstream: Option<(SockKey, SockState)>,
}

impl Accelerated {
    pub fn inbound_only(key: SockKey, state: SockState) -> Self {
        Self {
            inbound: (key, state),
            upstream: None,
        }
    }

    pub fn spliced(&self) -> bool {
        self.inbound.1.flags & sock_flags::SPLICE != 0
    }

    pub fn mode(&self) -> &'static str {
        match (self.spliced(), self.upstream.is_some()) {
            (true, _) => "splice",
            (false, true) => "sk_msg",
            (false, false) => "sk_msg (app side)",
        }
    }
}

/// Bytes of a finished connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// App → backend.
    pub sent: u64,
    /// Backend → app.
    pub received: u64,
    /// Of those, moved by the kernel splice without the agent.
    pub spliced: u64,
}

/// Where a relay starts: what a predecessor agent already relayed of a
/// connection it handed over ([`crate::handoff`]), or nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// App → backend bytes, and whether that direction has ended.
    pub sent: u64,
    pub sent_done: bool,
    /// Backend → app bytes, and whether that direction has ended.
    pub received: u64,
    pub received_done: bool,
}

/// How a relay ended: the connection is over, or the relay stopped at
/// `pause` with no byte held in its buffers, for a successor to carry on.
#[derive(Debug)]
pub enum Relayed {
    Done(Bytes),
    Paused {
        inbound: TcpStream,
        upstream: TcpStream,
        progress: Progress,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no byte either way for {after:?}: closed (idle timeout)")]
    Idle { after: Duration },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Relays until both directions have ended (or one fails, or the
/// connection idles out), or until `pause` turns true: then each direction
/// stops before its next read and the sockets are given back.
pub async fn relay(
    mut inbound: TcpStream,
    mut upstream: TcpStream,
    accel: Option<(&SocketMaps, Accelerated)>,
    idle_timeout: Duration,
    pause: Option<watch::Receiver<bool>>,
    from: Progress,
) -> Result<Relayed, RelayError> {
    let activity = AtomicU64::new(0);
    let tracker = |side: Option<(SockKey, SockState)>| {
        accel.and_then(|(maps, _)| side.map(|side| Tracker::new(maps, side)))
    };
    let (up_tracker, down_tracker) = (
        tracker(accel.map(|(_, a)| a.inbound)),
        tracker(accel.and_then(|(_, a)| a.upstream)),
    );
    // The pod sockets facing the agent's: what the kernel spliced of theirs,
    // which the agent never sees.
    let pods = accel.map(|(maps, a)| {
        (
            maps,
            a.inbound.0.reversed(),
            a.upstream.map(|(k, _)| k.reversed()),
        )
    });
    let kernel_spliced = || -> (u64, u64) {
        pods.map_or((0, 0), |(maps, app, backend)| {
            let spliced =
                |k: Option<SockKey>| k.and_then(|k| maps.state(&k)).map_or(0, |s| s.spliced);
            (spliced(Some(app)), spliced(backend))
        })
    };

    let ((up, up_done), (down, down_done)) = {
        let (inbound_read, inbound_write) = inbound.split();
        let (upstream_read, upstream_write) = upstream.split();
        let up = Direction {
            tracker: up_tracker,
            start: from.sent,
            done: from.sent_done,
            pause: pause.clone(),
        };
        let down = Direction {
            tracker: down_tracker,
            start: from.received,
            done: from.received_done,
            pause,
        };
        let both = async {
            tokio::try_join!(
                pump(inbound_read, upstream_write, up, &activity),
                pump(upstream_read, inbound_write, down, &activity),
            )
        };
        until_idle(
            both,
            &activity,
            || {
                let (a, b) = kernel_spliced();
                a + b
            },
            idle_timeout,
        )
        .await?
    };
    if !(up_done && down_done) {
        return Ok(Relayed::Paused {
            inbound,
            upstream,
            progress: Progress {
                sent: up,
                sent_done: up_done,
                received: down,
                received_done: down_done,
            },
        });
    }
    let (app_spliced, backend_spliced) = kernel_spliced();
    Ok(Relayed::Done(Bytes {
        sent: up + app_spliced,
        received: down + backend_spliced,
        spliced: app_spliced + backend_spliced,
    }))
}

/// Relays a socket and an HBONE stream both ways, half-close included;
/// returns the bytes socket → tunnel and tunnel → socket. Nothing is copied
/// in between: a socket read becomes DATA frames as it is, and each DATA
/// frame is written to the socket from where h2 decoded it: two copies
/// fewer per byte than relaying through buffers (about 7% of the sending
/// agent's CPU in a cross-node bulk transfer). `accel`: the socket is
/// in the sockhash, facing a pod socket that writes into it directly.
pub async fn relay_tunnel(
    mut socket: TcpStream,
    tunnel: H2Stream,
    accel: Option<(&SocketMaps, (SockKey, SockState))>,
    idle_timeout: Duration,
) -> Result<(u64, u64), RelayError> {
    let activity = AtomicU64::new(0);
    let (mut send, mut recv, unread) = tunnel.into_parts();
    let (mut read, mut write) = socket.split();
    let up = async {
        let mut tracker = accel.map(|(maps, side)| Tracker::new(maps, side));
        let mut buf = BytesMut::new();
        let mut want = TUNNEL_READ_MIN;
        let mut total = 0;
        loop {
            // Small reads share one block until it runs low; each frozen
            // slice keeps only its block alive.
            if buf.capacity() - buf.len() < want / 8 {
                buf.reserve(want);
            }
            let room = buf.capacity() - buf.len();
            let n = read.read_buf(&mut buf).await?;
            if n == 0 {
                stream::end(&mut send);
                return io::Result::Ok(total);
            }
            want = next_read(want, n, room);
            stream::send_all(&mut send, buf.split().freeze()).await?;
            total += n as u64;
            activity.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(t) = tracker.as_mut()
                && !t.forwarded(total, n < room)
            {
                tracker = None;
            }
        }
    };
    let down = async {
        let mut total = 0;
        let mut next = Some(unread).filter(|b| !b.is_empty());
        loop {
            let data = match next.take() {
                Some(data) => data,
                None => match stream::next_data(&mut recv).await? {
                    Some(data) => data,
                    None => {
                        write.shutdown().await?;
                        return io::Result::Ok(total);
                    }
                },
            };
            write.write_all(&data).await?;
            total += data.len() as u64;
            activity.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    };
    let both = async { tokio::try_join!(up, down) };
    until_idle(both, &activity, || 0, idle_timeout).await
}

/// Runs `both` to its end unless no byte moves for `idle_timeout`: neither
/// through the agent (`activity`) nor around it (`elsewhere`, the kernel's
/// counts for spliced connections).
async fn until_idle<T>(
    both: impl Future<Output = io::Result<T>>,
    activity: &AtomicU64,
    elsewhere: impl Fn() -> u64,
    idle_timeout: Duration,
) -> Result<T, RelayError> {
    tokio::pin!(both);
    let check_every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut seen = 0;
    let mut last_change = Instant::now();
    loop {
        tokio::select! {
            done = &mut both => return Ok(done?),
            () = tokio::time::sleep(check_every) => {
                let total = activity.load(Ordering::Relaxed) + elsewhere();
                if total != seen {
                    seen = total;
                    last_change = Instant::now();
                } else if last_change.elapsed() >= idle_timeout {
                    return Err(RelayError::Idle { after: idle_timeout });
                }
            }
        }
    }
}

/// Puts the agent's socket `stream`, just connected to a pod on this node,
/// into the sockhash facing the pod's socket, once that one is there and
/// before any byte is written, so sk_msg carries both directions around the
/// TCP/IP stack; `splice_to` as for [`SocketMaps::add`]. `None` (plain TCP)
/// when the pod's socket never shows or this one cannot be added.
pub async fn add_facing_pod(
    maps: &SocketMaps,
    stream: &TcpStream,
    splice_to: Option<SockKey>,
) -> Option<(SockKey, SockState)> {
    let pod = stream.peer_addr().ok()?;
    let key = super::outbound::sock_key(stream.local_addr().ok()?, pod);
    if !await_in_sockhash(maps, &key.reversed()).await {
        debug!(%pod, "the pod's socket never reached the sockhash; plain TCP");
        return None;
    }
    match maps.add(&key, stream, splice_to) {
        Ok(state) => Some((key, state)),
        Err(e) => {
            // No relay will forget the pod's entry: the connection is not
            // accelerated.
            maps.remove(&[key.reversed()]);
            debug!(error = %e, "cannot add the upstream socket to the sockhash");
            None
        }
    }
}

/// Waits (briefly: the final ACK is on its way) until the pod socket under
/// `key` is in the sockhash, where sock_ops puts it once its side of the
/// handshake completes; `false` when it never shows.
async fn await_in_sockhash(maps: &SocketMaps, key: &SockKey) -> bool {
    for attempt in 0..50u32 {
        if maps.state(key).is_some() {
            return true;
        }
        if attempt < 5 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    false
}

/// An agent socket in the sockhash, facing a pod socket, read by something
/// other than [`relay`] (the L7 path's upstream connections): it publishes
/// how far it has read, and leaves the maps when dropped.
pub struct Tracked {
    inner: tokio::net::TcpStream,
    tracker: Option<Tracker<std::sync::Arc<SocketMaps>>>,
    total: u64,
    maps: std::sync::Arc<SocketMaps>,
    key: SockKey,
}

impl Tracked {
    pub fn new(
        inner: tokio::net::TcpStream,
        maps: std::sync::Arc<SocketMaps>,
        side: (SockKey, SockState),
    ) -> Self {
        Self {
            inner,
            tracker: Some(Tracker::new(maps.clone(), side)),
            total: 0,
            key: side.0,
            maps,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.maps.remove(&[self.key, self.key.reversed()]);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining());
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let this = &mut *self;
            this.total += n;
            if let Some(t) = this.tracker.as_mut()
                && !t.forwarded(this.total, (n as usize) < room)
            {
                this.tracker = None;
            }
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Publishes an agent socket's forwarded count: after every read that
/// emptied the socket while the pod socket facing it is not on its final
/// path (the kernel switches it on an exact count, which only such a read
/// can give), and every [`SK_MSG_FORWARDED_EVERY`] bytes, the kernel's
/// measure of how far behind the agent is. A pod that runs too far ahead
/// goes back to TCP until the agent catches up, which the periodic check
/// notices. A bulk sender that never pauses stays on TCP (counted
/// `catching-up`), and the agent's full reads cost no map syscalls.
pub struct Tracker<M> {
    maps: M,
    key: SockKey,
    state: SockState,
    settled: bool,
}

impl<M: std::ops::Deref<Target = SocketMaps>> Tracker<M> {
    pub fn new(maps: M, (key, state): (SockKey, SockState)) -> Self {
        Self {
            maps,
            key,
            state,
            settled: false,
        }
    }

    /// `total` bytes forwarded, the last read having `drained` the socket
    /// (it came back shorter than its buffer). Returns whether to keep
    /// tracking.
    pub fn forwarded(&mut self, total: u64, drained: bool) -> bool {
        if (self.settled || !drained) && total - self.state.forwarded < SK_MSG_FORWARDED_EVERY {
            return true;
        }
        self.state.forwarded = total;
        if self.maps.publish(&self.key, &self.state).is_err() {
            return false;
        }
        let Some(pod) = self.maps.state(&self.key.reversed()) else {
            return false;
        };
        // Spliced when it can be; when the target fell behind, the agent
        // relays it for good.
        self.settled = pod.mode == sock_mode::SPLICED
            || (pod.mode == sock_mode::PEER
                && (self.state.flags & sock_flags::SPLICE == 0
                    || self
                        .maps
                        .state(&self.state.target)
                        .is_none_or(|t| t.flags & sock_flags::BACKLOGGED != 0)));
        true
    }
}

/// One direction of a relay: its tracker, where it starts, and the pause
/// signal it obeys.
struct Direction<'a> {
    tracker: Option<Tracker<&'a SocketMaps>>,
    /// Bytes already relayed (by a predecessor).
    start: u64,
    /// Already ended (its FIN forwarded by a predecessor).
    done: bool,
    pause: Option<watch::Receiver<bool>>,
}

/// Completes once `pause` is true; never without one (or once its sender
/// is gone).
async fn paused(pause: &mut Option<watch::Receiver<bool>>) {
    if let Some(p) = pause
        && p.wait_for(|p| *p).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Copies one direction; at EOF forwards the FIN (half-close). Returns the
/// bytes copied (from the direction's start) and whether it ended; `false`
/// when the pause stopped it before a read, with nothing held back.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction<'_>,
    activity: &AtomicU64,
) -> io::Result<(u64, bool)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Direction {
        mut tracker,
        start,
        done,
        mut pause,
    } = direction;
    if done {
        return Ok((start, true));
    }
    let mut buf = vec![0u8; BUFFER];
    let mut total = start;
    loop {
        // A read is cancel-safe: a pause that wins takes no byte.
        let n = tokio::select! {
            biased;
            () = paused(&mut pause) => return Ok((total, false)),
            n = from.read(&mut buf) => n?,
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok((total, true));
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        activity.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(t) = tracker.as_mut()
            && !t.forwarded(total, n < buf.len())
        {
            tracker = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use h2::{client, server};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::{TUNNEL_READ_MAX, TUNNEL_READ_MIN, next_read, relay_tunnel};
    use crate::hbone::stream::{self, H2Stream};

    /// Full reads grow the next one to the cap; a small read goes back to
    /// the start; a partial but not small read keeps the size.
    #[test]
    fn tunnel_reads_grow_while_full_and_shrink_when_small() {
        let mut want = TUNNEL_READ_MIN;
        let mut sizes = vec![want];
        for _ in 0..6 {
            want = next_read(want, want, want);
            sizes.push(want);
        }
        assert_eq!(
            sizes,
            [16, 32, 64, 128, 256, 256, 256].map(|k| k * 1024),
            "doubling up to the cap"
        );
        assert_eq!(want, TUNNEL_READ_MAX);
        assert_eq!(next_read(want, 100_000, want), want, "partial read");
        assert_eq!(next_read(want, 1024, want), TUNNEL_READ_MIN, "small read");
    }

    /// A socket and a tunnel relayed into each other: the tunnel's client end
    /// sends more than one flow-control window and ends its stream, the
    /// socket's far end answers and shuts down; both sides get every byte in
    /// order (the bytes put back in front first) and each end.
    #[tokio::test]
    async fn relay_tunnel_moves_both_ways_and_half_closes() {
        let up_payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let down_payload: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let server = tokio::spawn(async move {
            let mut conn = server::handshake(server_io).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut tunnel = H2Stream::new(send, request.into_body());
            tunnel.unread(Bytes::from_static(b"sniffed:"));
            let (socket, _) = listener.accept().await.unwrap();
            relay_tunnel(socket, tunnel, None, Duration::from_secs(10)).await
        });
        let backend = {
            let down_payload = down_payload.clone();
            tokio::spawn(async move {
                let mut socket = TcpStream::connect(addr).await.unwrap();
                let mut got = Vec::new();
                socket.read_to_end(&mut got).await.unwrap();
                socket.write_all(&down_payload).await.unwrap();
                socket.shutdown().await.unwrap();
                got
            })
        };

        let (h2, conn) = client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        let request = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (response, mut send) = h2.send_request(request, false).unwrap();
        stream::send_all(&mut send, Bytes::from(up_payload.clone()))
            .await
            .unwrap();
        send.send_data(Bytes::new(), true).unwrap();
        let mut recv = response.await.unwrap().into_body();
        let mut down = Vec::new();
        while let Some(data) = stream::next_data(&mut recv).await.unwrap() {
            down.extend_from_slice(&data);
        }

        let mut expected_up = b"sniffed:".to_vec();
        expected_up.extend_from_slice(&up_payload);
        let got_up = backend.await.unwrap();
        assert_eq!(got_up.len(), expected_up.len());
        assert!(got_up == expected_up, "socket got the bytes out of order");
        assert!(down == down_payload, "tunnel got the bytes out of order");
        let (sent, received) = server.await.unwrap().unwrap();
        assert_eq!(
            (sent, received),
            (down_payload.len() as u64, expected_up.len() as u64)
        );
    }
}
