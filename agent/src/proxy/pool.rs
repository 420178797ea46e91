//! The L7 path's upstream connections, pooled per (endpoint, source
//! identity): idle HTTP/1.1 connections, one request at a time each, and
//! one shared HTTP/2 connection per key. Connections that carry no request
//! for the agent's idle timeout (`--idle-timeout`, as Envoy's upstream
//! `idle_timeout`) are let go: an idle HTTP/1.1 one closes, an HTTP/2 one
//! closes once its streams end. A sweep also drops the entries of
//! connections the backend closed, so endpoints that come and go (every
//! rollout's pods) leave nothing behind. A Service's
//! `connectionPool.maxRequestsPerConnection` retires a connection after
//! that many requests (its last one runs to its end), and its
//! `connectionPool.idleTimeout` replaces the agent's for its connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};

use crate::identity::Identity;

/// What a pooled connection is kept under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct UpstreamKey {
    pub backend: SocketAddr,
    /// The tunnel's source identity; `None` for plain connections.
    pub src: Option<Identity>,
}

/// Idle HTTP/1.1 connections kept per key.
const IDLE_PER_BACKEND: usize = 64;

/// Sweeps come at least this often, so closed connections' entries go
/// however long the idle timeout.
const MAX_SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Connections let go by the last sweeps.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Swept {
    /// Idle past the timeout.
    pub idle: usize,
    /// Closed by the backend (or its connection failed) while pooled.
    pub closed: usize,
}

/// A Service's settings for its pooled connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Limits {
    /// Requests a connection carries before it is closed.
    pub max_requests: Option<u32>,
    /// In place of the agent's idle timeout.
    pub idle: Option<Duration>,
}

/// A pooled connection, when it last took a request, how many it took, and
/// its own idle timeout.
type Used<S> = (S, Instant, u32, Option<Duration>);

/// The pools of one L7 proxy.
pub(super) struct Pools<B> {
    h1: Mutex<HashMap<UpstreamKey, Vec<Used<http1::SendRequest<B>>>>>,
    h2: Mutex<HashMap<UpstreamKey, Used<http2::SendRequest<B>>>>,
}

impl<B> Default for Pools<B> {
    fn default() -> Self {
        Self {
            h1: Mutex::default(),
            h2: Mutex::default(),
        }
    }
}

impl<B> Pools<B> {
    /// An idle HTTP/1.1 connection ready for a request, taken out of the
    /// pool while it carries one, with the number it has carried.
    pub fn take_h1(&self, key: &UpstreamKey) -> Option<(http1::SendRequest<B>, u32)> {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        list.retain(|(s, ..)| !s.is_closed());
        let i = list.iter().position(|(s, ..)| s.is_ready())?;
        let (sender, _, served, _) = list.swap_remove(i);
        Some((sender, served))
    }

    /// Back to the pool after its `served`th request (it takes the next one
    /// once this response's body has been read), unless enough are idle
    /// already or it has served its maximum: then it closes after this
    /// response.
    pub fn put_h1(
        &self,
        key: UpstreamKey,
        sender: http1::SendRequest<B>,
        served: u32,
        limits: Limits,
    ) {
        if limits.max_requests.is_some_and(|m| served >= m) {
            return;
        }
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_PER_BACKEND {
            list.push((sender, Instant::now(), served, limits.idle));
        }
    }

    /// The key's HTTP/2 connection for one more request, unless it has
    /// closed; its use resets its idle time. At its last request it
    /// leaves the pool (its streams go on), so the next opens a new one.
    pub fn h2(&self, key: &UpstreamKey, limits: Limits) -> Option<http2::SendRequest<B>> {
        let mut shared = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let (sender, last, served, idle) = shared.get_mut(key).filter(|(s, ..)| !s.is_closed())?;
        *last = Instant::now();
        *served += 1;
        *idle = limits.idle;
        let sender = sender.clone();
        if limits.max_requests.is_some_and(|m| *served >= m) {
            shared.remove(key);
        }
        Some(sender)
    }

    /// Makes `sender`, about to carry its first request, the key's HTTP/2
    /// connection in place of any before (unless that request is its last).
    pub fn put_h2(&self, key: UpstreamKey, sender: http2::SendRequest<B>, limits: Limits) {
        let mut shared = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        if limits.max_requests.is_some_and(|m| m <= 1) {
            shared.remove(&key);
        } else {
            shared.insert(key, (sender, Instant::now(), 1, limits.idle));
        }
    }

    /// Stops handing out the key's HTTP/2 connection (its streams go on),
    /// so the next request opens a new one.
    pub fn forget_h2(&self, key: &UpstreamKey) {
        self.h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Lets go of connections unused for their idle timeout (`idle`
    /// unless their Service gave its own) and of closed ones, and of keys
    /// left with none.
    pub fn sweep(&self, now: Instant, idle: Duration) -> Swept {
        let mut swept = Swept::default();
        let mut fresh = |closed: bool, last: Instant, own: Option<Duration>| {
            if closed {
                swept.closed += 1;
                false
            } else if now.saturating_duration_since(last) >= own.unwrap_or(idle) {
                swept.idle += 1;
                false
            } else {
                true
            }
        };
        {
            let mut h1 = self.h1.lock().unwrap_or_else(|e| e.into_inner());
            h1.retain(|_, list| {
                list.retain(|(s, last, _, own)| fresh(s.is_closed(), *last, *own));
                !list.is_empty()
            });
        }
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.retain(|_, (s, last, _, own)| fresh(s.is_closed(), *last, *own));
        swept
    }

    /// Pooled connections: HTTP/1.1 idle ones, HTTP/2 shared ones.
    pub fn len(&self) -> (usize, usize) {
        let h1 = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        (h1.values().map(Vec::len).sum(), h2.len())
    }
}

/// How often pools idle for `idle` are swept: often enough that a
/// connection goes within half the timeout after it.
pub(super) fn sweep_every(idle: Duration) -> Duration {
    (idle / 2).clamp(Duration::from_millis(100), MAX_SWEEP_EVERY)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    fn key(port: u16) -> UpstreamKey {
        UpstreamKey {
            backend: SocketAddr::from(([10, 1, 1, 12], port)),
            src: None,
        }
    }

    /// A client connection over an in-memory pipe, and the pipe's far end
    /// (dropping it closes the connection).
    async fn h1() -> (http1::SendRequest<Empty<Bytes>>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(4096);
        let (sender, conn) = http1::handshake(TokioIo::new(near)).await.expect("h1");
        tokio::spawn(conn);
        (sender, far)
    }

    #[tokio::test]
    async fn idle_and_closed_connections_are_let_go_and_used_ones_kept() {
        let pools = Pools::default();
        let (a, _a_far) = h1().await;
        let (b, b_far) = h1().await;
        let (c, _c_far) = h1().await;
        pools.put_h1(key(1), a, 1, Limits::default());
        pools.put_h1(key(2), b, 1, Limits::default());
        let t0 = Instant::now();
        let idle = Duration::from_secs(60);
        assert_eq!(pools.sweep(t0, idle), Swept::default(), "all fresh");
        assert_eq!(pools.len(), (2, 0));

        // The backend closes one: swept, and its key goes with it.
        drop(b_far);
        tokio::time::timeout(Duration::from_secs(5), async {
            while pools.sweep(Instant::now(), idle).closed == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the closed connection is noticed");
        assert_eq!(pools.len(), (1, 0));
        assert!(pools.take_h1(&key(2)).is_none());

        // One used just before the sweep stays; the other, idle past the
        // timeout, goes.
        let later = Instant::now() + idle;
        pools.put_h1(key(3), c, 1, Limits::default());
        let swept = pools.sweep(later, idle);
        assert_eq!(swept, Swept { idle: 1, closed: 0 });
        assert!(pools.take_h1(&key(1)).is_none());
        assert!(pools.take_h1(&key(3)).is_some(), "used within the timeout");
    }

    #[tokio::test]
    async fn a_shared_http2_connection_stays_while_it_is_used() {
        let pools = Pools::<Empty<Bytes>>::default();
        let (near, _far) = tokio::io::duplex(65536);
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(near))
            .await
            .expect("h2");
        tokio::spawn(conn);
        pools.put_h2(key(1), sender, Limits::default());
        let idle = Duration::from_secs(60);
        let start = Instant::now();
        // Used now: its idle time starts again.
        assert!(pools.h2(&key(1), Limits::default()).is_some());
        assert_eq!(pools.sweep(start + idle / 2, idle), Swept::default());
        assert!(pools.h2(&key(1), Limits::default()).is_some());
        assert_eq!(
            pools.sweep(Instant::now() + idle, idle),
            Swept { idle: 1, closed: 0 }
        );
        assert!(pools.h2(&key(1), Limits::default()).is_none());
        assert_eq!(pools.len(), (0, 0));
    }

    #[tokio::test]
    async fn connections_retire_after_max_requests() {
        let pools = Pools::default();
        // HTTP/1.1: back in the pool after its first request, not after
        // its second.
        let (mut a, _a_far) = h1().await;
        a.ready().await.expect("ready");
        let two = Limits {
            max_requests: Some(2),
            idle: None,
        };
        pools.put_h1(key(1), a, 1, two);
        let (a, served) = pools.take_h1(&key(1)).expect("pooled");
        assert_eq!(served, 1);
        pools.put_h1(key(1), a, served + 1, two);
        assert!(pools.take_h1(&key(1)).is_none(), "retired");

        // HTTP/2: its first request at put_h2, the second and third through
        // h2(); the third is its last.
        let (near, _far) = tokio::io::duplex(65536);
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(near))
            .await
            .expect("h2");
        tokio::spawn(conn);
        let (three, one) = (
            Limits {
                max_requests: Some(3),
                idle: None,
            },
            Limits {
                max_requests: Some(1),
                idle: None,
            },
        );
        pools.put_h2(key(2), sender.clone(), three);
        assert!(pools.h2(&key(2), three).is_some());
        assert!(pools.h2(&key(2), three).is_some());
        assert!(pools.h2(&key(2), three).is_none(), "retired");
        // One request per connection: never pooled.
        pools.put_h2(key(3), sender, one);
        assert!(pools.h2(&key(3), one).is_none());
    }

    #[tokio::test]
    async fn a_service_idle_timeout_replaces_the_agents() {
        let pools = Pools::default();
        let (mut a, _a_far) = h1().await;
        let (mut b, _b_far) = h1().await;
        a.ready().await.expect("ready");
        b.ready().await.expect("ready");
        let short = Limits {
            max_requests: None,
            idle: Some(Duration::from_secs(1)),
        };
        pools.put_h1(key(1), a, 1, short);
        pools.put_h1(key(2), b, 1, Limits::default());
        let swept = pools.sweep(
            Instant::now() + Duration::from_secs(2),
            Duration::from_secs(60),
        );
        assert_eq!(swept, Swept { idle: 1, closed: 0 });
        assert!(pools.take_h1(&key(1)).is_none());
        assert!(pools.take_h1(&key(2)).is_some());
    }

    #[test]
    fn sweeps_come_within_half_the_timeout() {
        assert_eq!(sweep_every(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(sweep_every(Duration::from_secs(3600)), MAX_SWEEP_EVERY);
        assert_eq!(
            sweep_every(Duration::from_millis(10)),
            Duration::from_millis(100)
        );
    }
}
