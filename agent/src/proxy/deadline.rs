//! An answer's body held to its request's deadline: a route's `request`
//! and `backendRequest` timeouts cover the whole response (GEP-1742: "to
//! when the full response has been received"), as Envoy's route timeout
//! does, and a gRPC client's `grpc-timeout` the whole call. Past the
//! deadline the upstream body is dropped, which resets its stream (or
//! closes its connection) so the server stops sending; a gRPC client over
//! HTTP/2 gets trailers with DEADLINE_EXCEEDED after what had come, any
//! other client (gRPC-Web's status is in the body) an aborted answer
//! (HTTP/1.1: the connection closes before the body's end; HTTP/2: the
//! stream is reset), never a short body that looks whole.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::http::{BodyError, Reason, grpc_status_fields};

/// The error an HTTP answer is aborted with.
#[derive(Debug, thiserror::Error)]
#[error("the request's timeout passed before its answer ended")]
pub struct Expired;

pub struct Bounded<B, F> {
    inner: Option<B>,
    deadline: Pin<Box<Sleep>>,
    /// End with gRPC trailers rather than an error.
    grpc: bool,
    /// Called when the deadline ends an answer (to count it).
    on_expiry: Option<F>,
}

impl<B, F> Bounded<B, F> {
    pub fn new(inner: B, deadline: Instant, grpc: bool, on_expiry: F) -> Self {
        Self {
            inner: Some(inner),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            grpc,
            on_expiry: Some(on_expiry),
        }
    }
}

impl<B, F> Body for Bounded<B, F>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
    F: FnOnce() + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // What the server has sent is delivered first.
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            if frame.is_none() {
                self.inner = None;
            }
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.inner = None;
        if let Some(counted) = self.on_expiry.take() {
            counted();
        }
        if !self.grpc {
            return Poll::Ready(Some(Err(Box::new(Expired))));
        }
        let mut trailers = HeaderMap::new();
        grpc_status_fields(
            &mut trailers,
            Reason::Timeout,
            "deadline exceeded in the mesh",
        );
        trailers.insert(
            "x-trellis-reason",
            HeaderValue::from_static(Reason::Timeout.text()),
        );
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
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

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use http_body_util::{BodyExt as _, StreamBody};
    use tokio::sync::mpsc;

    use super::*;

    type Frames = mpsc::Sender<Result<Frame<Bytes>, BodyError>>;

    /// A body fed by hand, bounded at 1 s, and its expiry count.
    fn bounded(
        grpc: bool,
    ) -> (
        Frames,
        impl Body<Data = Bytes, Error = BodyError> + Unpin,
        Arc<AtomicU64>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        )));
        let expired = Arc::new(AtomicU64::new(0));
        let counted = expired.clone();
        let bounded = Bounded::new(
            body,
            Instant::now() + Duration::from_secs(1),
            grpc,
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
            },
        );
        (tx, bounded, expired)
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_answer_past_the_deadline_ends_with_deadline_exceeded() {
        let (tx, mut body, expired) = bounded(true);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "first");
        // The server goes quiet; the deadline ends the answer.
        let frame = body.frame().await.unwrap().unwrap();
        let trailers = frame.into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert!(body.frame().await.is_none());
        assert_eq!(expired.load(Ordering::Relaxed), 1);
        // The upstream body was dropped: the server's side sees it gone.
        assert!(tx.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_answer_past_the_deadline_is_aborted() {
        let (tx, mut body, expired) = bounded(false);
        tx.send(Ok(Frame::data(Bytes::from_static(b"half"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<Expired>(), "{err}");
        assert_eq!(expired.load(Ordering::Relaxed), 1);
        assert!(tx.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_ends_in_time_is_untouched() {
        let (tx, mut body, expired) = bounded(false);
        tx.send(Ok(Frame::data(Bytes::from_static(b"all"))))
            .await
            .unwrap();
        drop(tx);
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.is_none());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(body.frame().await.is_none());
        assert_eq!(expired.load(Ordering::Relaxed), 0);
    }
}
