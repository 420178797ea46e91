//! Retries: which results may be retried, the backoff between attempts, the
//! budget that keeps retries from amplifying an outage, and a request body
//! that can be sent again (recorded as the first attempt streams it, up to a
//! limit, so streaming calls are not held back waiting for their end).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::{Gauges, balance::random_below, policy::Retry};

/// Request bodies larger than this are not kept for a retry (as Envoy's
/// per-request buffer limit).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// How long a retry waits for the rest of a body its client is still
/// sending, when the request has no timeout of its own (Envoy's default
/// route timeout).
pub const REPLAY_WAIT: Duration = Duration::from_secs(15);

/// What an attempt produced, as retry conditions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A response with this status, and a `grpc-status` in its headers (a
    /// trailers-only gRPC response).
    Response(u16, Option<u8>),
    ConnectFailure,
    /// The backend refused the stream before processing it.
    Refused,
    Reset,
    /// The per-try timeout.
    Timeout,
}

/// Whether `policy` retries `attempt`.
pub fn retriable(policy: &Retry, attempt: Attempt) -> bool {
    match attempt {
        Attempt::ConnectFailure => policy.on_connect_failure || policy.on_gateway_error,
        Attempt::Refused => policy.on_refused_stream || policy.on_reset || policy.on_5xx,
        Attempt::Reset => policy.on_reset || policy.on_5xx,
        Attempt::Timeout => policy.on_timeout || policy.on_gateway_error || policy.on_5xx,
        Attempt::Response(status, grpc) => {
            (policy.on_5xx && (500..=599).contains(&status))
                || (policy.on_gateway_error && (502..=504).contains(&status))
                || policy.statuses.contains(&status)
                || grpc.is_some_and(|g| policy.grpc_codes.contains(&g))
        }
    }
}

/// The wait before retry `n` (1-based): full jitter over an exponential
/// ceiling, `base × 2^(n-1)` capped at `max`.
pub fn backoff(policy: &Retry, n: u32) -> Duration {
    let ceiling = policy
        .base_interval
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(policy.max_interval);
    let micros = ceiling.as_micros() as u64;
    Duration::from_micros(random_below(micros + 1))
}

/// A retry in flight, counted against the budget until dropped.
pub struct RetryPermit(Arc<Gauges>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0
            .retries
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Admits a retry when retries in flight stay within the budget (a share of
/// requests in flight, at least `min_retry_concurrency`) and the circuit
/// breaker's `max_retries`.
pub fn admit(
    policy: &Retry,
    max_retries: Option<u32>,
    gauges: &Arc<Gauges>,
) -> Option<RetryPermit> {
    use std::sync::atomic::Ordering::Relaxed;
    let requests = gauges.requests.load(Relaxed);
    let budget = (requests * u64::from(policy.budget_ppm) / 1_000_000)
        .max(u64::from(policy.min_retry_concurrency));
    let cap = max_retries.map_or(budget, |m| budget.min(u64::from(m)));
    let mut current = gauges.retries.load(Relaxed);
    loop {
        if current >= cap {
            return None;
        }
        match gauges
            .retries
            .compare_exchange(current, current + 1, Relaxed, Relaxed)
        {
            Ok(_) => return Some(RetryPermit(gauges.clone())),
            Err(now) => current = now,
        }
    }
}

/// What the first attempt's body has streamed so far.
#[derive(Default)]
struct Recording {
    data: Vec<Bytes>,
    size: usize,
    trailers: Option<HeaderMap>,
    done: bool,
    overflow: bool,
    /// The part of the body the first attempt never read: its sender let go
    /// of it (the backend refused or reset the stream before the client
    /// had sent everything), so a retry reads it from here.
    rest: Option<Rest>,
}

type Rest = http_body_util::combinators::UnsyncBoxBody<Bytes, ()>;

impl Recording {
    fn add(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.size += data.len();
            if self.size > REPLAY_LIMIT {
                self.overflow = true;
                self.data.clear();
            } else if !self.overflow {
                self.data.push(data.clone());
            }
        } else if let Some(t) = frame.trailers_ref() {
            self.trailers = Some(t.clone());
        }
    }

    fn replay(&self) -> Option<ReplayBody> {
        (self.done && !self.overflow).then(|| ReplayBody {
            data: self.data.clone().into(),
            trailers: self.trailers.clone(),
        })
    }
}

#[derive(Default)]
struct Shared {
    recording: Mutex<Recording>,
    /// Woken when the record ends (complete or over the limit) or the rest
    /// is handed back.
    changed: tokio::sync::Notify,
}

/// A shared record of a request body, for replays.
#[derive(Clone, Default)]
pub struct Replay(Arc<Shared>);

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.lock();
        f.debug_struct("Replay")
            .field("size", &r.size)
            .field("done", &r.done)
            .field("overflow", &r.overflow)
            .field("rest", &r.rest.is_some())
            .finish()
    }
}

impl Replay {
    /// A record already complete: the request has no body.
    pub fn empty() -> Self {
        let r = Self::default();
        r.lock().done = true;
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.0.recording.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body again, when the whole of it was seen and kept.
    pub fn body(&self) -> Option<ReplayBody> {
        self.lock().replay()
    }

    /// The body again for a retry, reading what the first attempt left
    /// unread until `until`: a backend may refuse a stream on its headers,
    /// before the client has sent its body, and that request is the one a
    /// retry exists for. `None` when the body outgrows the record's limit,
    /// fails, or does not end in time.
    pub async fn complete(&self, until: tokio::time::Instant) -> Option<ReplayBody> {
        tokio::time::timeout_at(until, self.read_rest())
            .await
            .ok()?
    }

    async fn read_rest(&self) -> Option<ReplayBody> {
        use http_body_util::BodyExt as _;
        // The first attempt's sender drops the body soon after its stream
        // fails; until then it may still be reading it itself.
        let mut rest = loop {
            let changed = self.0.changed.notified();
            {
                let mut r = self.lock();
                if r.done || r.overflow {
                    return r.replay();
                }
                if let Some(rest) = r.rest.take() {
                    break rest;
                }
            }
            changed.await;
        };
        loop {
            match rest.frame().await {
                Some(Ok(frame)) => {
                    let mut r = self.lock();
                    r.add(&frame);
                    if r.overflow {
                        return None;
                    }
                }
                Some(Err(())) => return None,
                None => {
                    let mut r = self.lock();
                    r.done = true;
                    return r.replay();
                }
            }
        }
    }

    /// Wraps the original body so that what it streams is recorded.
    pub fn tee<B>(&self, inner: B) -> Tee<B>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
    {
        Tee {
            inner: Some(inner),
            record: self.clone(),
        }
    }
}

/// The original body, recording as it streams.
pub struct Tee<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    /// Taken only on drop.
    inner: Option<B>,
    record: Replay,
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        // A sender that knows the length stops polling after the last
        // byte: the body is complete once it says so, without a `None`.
        let ended = inner.is_end_stream();
        let mut r = self.record.lock();
        let was_open = !r.done && !r.overflow;
        match &polled {
            Poll::Ready(Some(Ok(frame))) => r.add(frame),
            Poll::Ready(None) => r.done = true,
            Poll::Ready(Some(Err(_))) => r.overflow = true,
            Poll::Pending => {}
        }
        if ended {
            r.done = true;
        }
        let settled = was_open && (r.done || r.overflow);
        drop(r);
        if settled {
            self.record.0.changed.notify_waiters();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> Drop for Tee<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let mut r = self.record.lock();
        if r.done || r.overflow {
            return;
        }
        // Handed back, not dropped: dropping it would lose the client's
        // unread bytes, and with them the retry.
        r.rest = Some(http_body_util::BodyExt::boxed_unsync(
            http_body_util::BodyExt::map_err(inner, |_| ()),
        ));
        drop(r);
        self.record.0.changed.notify_waiters();
    }
}

/// A recorded body, sent again.
pub struct ReplayBody {
    data: std::collections::VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let n: usize = self.data.iter().map(Bytes::len).sum();
        if self.trailers.is_none() {
            SizeHint::with_exact(n as u64)
        } else {
            let mut h = SizeHint::new();
            h.set_lower(n as u64);
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, Full};

    use super::*;

    fn policy() -> Retry {
        Retry {
            attempts: 2,
            ..Retry::default()
        }
    }

    #[test]
    fn default_conditions_are_connect_failure_reset_and_gateway_errors() {
        let p = policy();
        assert!(retriable(&p, Attempt::ConnectFailure));
        assert!(retriable(&p, Attempt::Reset));
        assert!(retriable(&p, Attempt::Response(503, None)));
        assert!(!retriable(&p, Attempt::Response(500, None)));
        assert!(!retriable(&p, Attempt::Response(200, Some(14))));
        let p = Retry {
            on_5xx: true,
            grpc_codes: vec![14],
            statuses: vec![409],
            ..policy()
        };
        assert!(retriable(&p, Attempt::Response(500, None)));
        assert!(retriable(&p, Attempt::Response(409, None)));
        assert!(retriable(&p, Attempt::Response(200, Some(14))));
        assert!(!retriable(&p, Attempt::Response(200, Some(5))));
    }

    #[test]
    fn a_refused_stream_is_retried_unless_its_condition_and_resets_are_off() {
        let mut p = policy();
        assert!(retriable(&p, Attempt::Refused));
        p.on_reset = false;
        assert!(retriable(&p, Attempt::Refused), "its own condition");
        assert!(!retriable(&p, Attempt::Reset));
        p.on_refused_stream = false;
        assert!(!retriable(&p, Attempt::Refused));
        p.on_5xx = true;
        assert!(retriable(&p, Attempt::Refused), "5xx covers resets");
    }

    #[test]
    fn backoff_stays_under_its_exponential_ceiling() {
        let p = policy();
        for n in 1..8 {
            let ceiling = (p.base_interval * (1 << (n - 1))).min(p.max_interval);
            for _ in 0..100 {
                assert!(backoff(&p, n) <= ceiling);
            }
        }
    }

    #[test]
    fn the_budget_is_a_share_of_requests_in_flight() {
        use std::sync::atomic::Ordering::Relaxed;
        let p = Retry {
            budget_ppm: 200_000,
            min_retry_concurrency: 1,
            ..policy()
        };
        let gauges = Arc::new(Gauges::default());
        gauges.requests.store(20, Relaxed);
        let permits: Vec<_> = (0..10).filter_map(|_| admit(&p, None, &gauges)).collect();
        assert_eq!(permits.len(), 4, "20 % of 20");
        drop(permits);
        assert_eq!(gauges.retries.load(Relaxed), 0);
        gauges.requests.store(1, Relaxed);
        let permits: Vec<_> = (0..10).filter_map(|_| admit(&p, None, &gauges)).collect();
        assert_eq!(permits.len(), 1, "the minimum");
        drop(permits);
        gauges.requests.store(100, Relaxed);
        let permits: Vec<_> = (0..10)
            .filter_map(|_| admit(&p, Some(3), &gauges))
            .collect();
        assert_eq!(permits.len(), 3, "maxRetries caps the budget");
    }

    #[tokio::test]
    async fn a_recorded_body_replays_and_a_large_one_does_not() {
        let replay = Replay::default();
        let body = replay.tee(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let again = replay.body().expect("complete and small");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "hello");

        let replay = Replay::default();
        let big = Bytes::from(vec![0u8; REPLAY_LIMIT + 1]);
        let body = replay.tee(Full::new(big));
        body.collect().await.unwrap();
        assert!(replay.body().is_none());

        let replay = Replay::default();
        let unread = replay.tee(Full::new(Bytes::from_static(b"x")));
        assert!(replay.body().is_none(), "not seen to its end");
        drop(unread);
        let soon = tokio::time::Instant::now() + Duration::from_secs(5);
        let again = replay.complete(soon).await.expect("the rest read");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "x");
        assert!(Replay::empty().body().is_some());

        // A sender that stops at the last byte (hyper, with a length):
        // complete once the body says it has ended, with no final poll.
        let replay = Replay::default();
        let mut body = replay.tee(Full::new(Bytes::from_static(b"sized")));
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok().as_deref(), Some(&b"sized"[..]));
        let again = replay.body().expect("complete after its last frame");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "sized");
    }

    /// A body fed by the test, frame by frame.
    fn channel() -> (
        tokio::sync::mpsc::Sender<Bytes>,
        impl Body<Data = Bytes, Error = std::convert::Infallible> + Send + Unpin + 'static,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok(Frame::data(data)), rx))
        });
        (tx, http_body_util::StreamBody::new(Box::pin(frames)))
    }

    #[tokio::test]
    async fn a_retry_reads_what_the_first_attempt_left_unread() {
        let soon = || tokio::time::Instant::now() + Duration::from_secs(5);

        // The sender read one frame, then let go (a refused stream); the
        // client's last bytes come later.
        let replay = Replay::default();
        let (tx, body) = channel();
        let mut first = replay.tee(body);
        tx.send(Bytes::from_static(b"head ")).await.unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "head "
        );
        drop(first);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(Bytes::from_static(b"tail")).await.unwrap();
        });
        let again = replay.complete(soon()).await.expect("the whole body");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "head tail");
        assert!(replay.body().is_some(), "complete from now on");

        // The sender lets go only after the retry began waiting for it.
        let replay = Replay::default();
        let (tx, body) = channel();
        let first = replay.tee(body);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(first);
            tx.send(Bytes::from_static(b"late")).await.unwrap();
        });
        let again = replay.complete(soon()).await.expect("handed back");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "late");

        // A body that does not end in time, and one over the limit.
        let replay = Replay::default();
        let (_tx, body) = channel();
        drop(replay.tee(body));
        let quickly = tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(replay.complete(quickly).await.is_none());

        let replay = Replay::default();
        let (tx, body) = channel();
        drop(replay.tee(body));
        tokio::spawn(async move {
            for _ in 0..=REPLAY_LIMIT / 1024 {
                if tx.send(Bytes::from(vec![0u8; 1024])).await.is_err() {
                    break;
                }
            }
        });
        assert!(replay.complete(soon()).await.is_none(), "over the limit");
    }
}
