//! Idle client connections on the L7 path, closed after the agent's idle
//! timeout (`--idle-timeout`) as Envoy's `idle_timeout` closes them, and
//! never sooner.
//!
//! HTTP/1.1: hyper arms its header read timeout as soon as it waits for a
//! request, so a keep-alive connection idle between requests would be
//! closed after that timeout (10 s here): a keep-alive limit of the agent's
//! own, which the application's server does not have and its clients would
//! race (a request written as the agent closes is lost). [`HeadTimer`]
//! gives hyper sleeps that start the head's time at its first byte: until
//! one comes the connection is idle, and an idle one is closed after the
//! idle timeout instead.
//!
//! HTTP/2: hyper's server has no idle timeout. [`Quiet`] notices a
//! connection the client has sent nothing on for the idle timeout, and the
//! connection is then shut gracefully (GOAWAY): streams still answering
//! finish, and the client opens a new connection for its next request.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads a client connection has had with bytes in them.
#[derive(Debug, Default)]
pub(super) struct Reads(AtomicU64);

impl Reads {
    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A client connection, counting its reads for [`HeadTimer`].
pub(super) struct Counted<I> {
    inner: I,
    reads: Arc<Reads>,
}

impl<I> Counted<I> {
    pub fn new(inner: I) -> (Self, Arc<Reads>) {
        let reads = Arc::new(Reads::default());
        (
            Self {
                inner,
                reads: reads.clone(),
            },
            reads,
        )
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.0.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Waits for a client connection to go quiet: no read for `idle`.
pub(super) struct Quiet {
    reads: Arc<Reads>,
    idle: Duration,
    seen: u64,
    since: tokio::time::Instant,
}

impl Quiet {
    pub fn new(reads: Arc<Reads>, idle: Duration) -> Self {
        Self {
            seen: reads.count(),
            reads,
            idle,
            since: tokio::time::Instant::now(),
        }
    }

    /// Resolves once a whole `idle` has passed without a read. Reads are
    /// looked at only when a period ends (no timer per read), so that is
    /// between one and two periods after the last one.
    pub async fn elapsed(&mut self) {
        loop {
            tokio::time::sleep_until(self.since + self.idle).await;
            let count = self.reads.count();
            if count == self.seen {
                return;
            }
            self.seen = count;
            self.since = tokio::time::Instant::now();
        }
    }
}

/// hyper's timer for one client connection (it uses it for the header
/// read timeout only).
#[derive(Clone, Debug)]
pub(super) struct HeadTimer {
    reads: Arc<Reads>,
    idle: Duration,
}

impl HeadTimer {
    pub fn new(reads: Arc<Reads>, idle: Duration) -> Self {
        Self { reads, idle }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            reads: self.reads.clone(),
            seen: self.reads.count(),
            head: deadline.saturating_duration_since(Instant::now()),
            started: false,
            sleep: Box::pin(tokio::time::sleep(self.idle)),
        })
    }
}

/// Ends `idle` after it was armed while no byte comes, or `head` after the
/// first byte that does.
struct HeadSleep {
    reads: Arc<Reads>,
    seen: u64,
    head: Duration,
    started: bool,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this each time a read leaves the head incomplete, so
        // the first byte's time is now, within a read.
        if !self.started && self.reads.count() != self.seen {
            self.started = true;
            let at = tokio::time::Instant::now() + self.head;
            self.sleep.as_mut().reset(at);
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use hyper::rt::Timer as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_quiet_after_a_whole_period_without_a_read() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut conn, reads) = Counted::new(near);
        let idle = Duration::from_secs(60);
        let mut quiet = Quiet::new(reads, idle);
        let start = tokio::time::Instant::now();
        // A read 30 s in restarts the wait.
        let reader = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            far.write_all(b"x").await.expect("write");
            let mut buf = [0u8; 1];
            conn.read_exact(&mut buf).await.expect("read");
        };
        tokio::join!(quiet.elapsed(), reader);
        let waited = start.elapsed();
        assert!(waited > idle && waited <= 2 * idle, "{waited:?}");
        // Nothing read since: the next period ends it.
        let start = tokio::time::Instant::now();
        quiet.elapsed().await;
        assert_eq!(start.elapsed(), Duration::ZERO, "already quiet");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_waits_out_the_idle_timeout_and_a_head_its_own() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut conn, reads) = Counted::new(near);
        let timer = HeadTimer::new(reads, Duration::from_secs(3600));
        let head = Duration::from_secs(10);

        // Idle: past the head timeout, not past the idle one.
        let mut sleep = timer.sleep(head);
        let waited = tokio::time::timeout(Duration::from_secs(60), sleep.as_mut()).await;
        assert!(waited.is_err(), "an idle connection is not cut at 10 s");

        // A head starts: its 10 s run from the first byte.
        far.write_all(b"GET / HT").await.expect("write");
        let mut buf = [0u8; 16];
        let n = conn.read(&mut buf).await.expect("read");
        assert_eq!(n, 8);
        let start = tokio::time::Instant::now();
        sleep.as_mut().await;
        assert_eq!(start.elapsed(), head);

        // Never a byte: the idle timeout ends it.
        let mut idle = timer.sleep(head);
        let start = tokio::time::Instant::now();
        idle.as_mut().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3600));
    }
}
