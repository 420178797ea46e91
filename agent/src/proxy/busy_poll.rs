//! Waiting for a quick answer without sleeping. On a VM a core that went
//! idle halts, and waking the task that waits on it costs an interrupt and
//! the halted vCPU's return: on this kind of machine tens of microseconds,
//! more than a pod on the same node takes to answer. For a short window the
//! waiting task yields instead: tokio then polls its I/O driver without
//! blocking (`epoll_wait` with no timeout) and runs the task again, so the
//! worker stays on its core and sees the answer as soon as it lands.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    task::Poll,
    time::{Duration, Instant},
};

/// Polls for answers, one waiter at a time: with several requests waiting
/// the worker has other work, and on a busy node a polling agent would take
/// the core from the very pods it waits for.
#[derive(Debug)]
pub struct Poller {
    window: Duration,
    waiting: AtomicUsize,
}

impl Poller {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Awaits `fut`, polling without sleeping for up to the window when no
    /// other waiter is, then waiting as usual; and whether the answer came
    /// while polling.
    pub async fn wait<F: Future>(&self, fut: F) -> (F::Output, bool) {
        let alone = self.waiting.fetch_add(1, Ordering::Relaxed) == 0;
        let _waiting = Waiting(&self.waiting);
        if alone {
            poll_then_await(fut, self.window, || self.crowded()).await
        } else {
            (fut.await, false)
        }
    }

    /// Another waiter has come: the one polling stops.
    fn crowded(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 1
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Awaits `fut`, polling for up to `window` (or until `stop` says so), and
/// whether it finished while polling.
async fn poll_then_await<F: Future>(
    fut: F,
    window: Duration,
    stop: impl Fn() -> bool,
) -> (F::Output, bool) {
    let mut fut = std::pin::pin!(fut);
    if window.is_zero() {
        return (fut.await, false);
    }
    let deadline = Instant::now() + window;
    loop {
        if let Poll::Ready(out) =
            std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
        {
            return (out, true);
        }
        if stop() || Instant::now() >= deadline {
            return (fut.await, false);
        }
        // Deferred: the worker polls the I/O driver before running us again.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_socket_answer_within_the_window_is_seen_while_polling() {
        // Bytes on a real socket reach the task only through the I/O
        // driver: seen within the window means the driver was polled.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            std::io::Write::write_all(&mut server, b"pong").unwrap();
            server
        });
        let mut buf = [0u8; 4];
        let read = tokio::io::AsyncReadExt::read_exact(&mut client, &mut buf);
        let (n, in_window) = poll_then_await(read, Duration::from_secs(20), || false).await;
        assert_eq!(n.unwrap(), 4);
        assert_eq!(&buf, b"pong");
        assert!(in_window, "the answer waited for the window to end");
        drop(writer.join());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_slow_answer_is_awaited_after_the_window() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let poller = std::sync::Arc::new(Poller::new(Duration::from_micros(50)));
        let waiter = tokio::spawn(async move { poller.wait(rx).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(7).unwrap();
        assert_eq!(waiter.await.unwrap(), (Ok(7), false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn other_tasks_run_while_it_polls() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The answer comes from a task on the same single worker: polling
        // must give way to it.
        tokio::spawn(async move { tx.send(()).unwrap() });
        let (answer, polled) = Poller::new(Duration::from_secs(5)).wait(rx).await;
        assert!(answer.is_ok() && polled);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_a_lone_waiter_polls() {
        let poller = std::sync::Arc::new(Poller::new(Duration::from_secs(20)));
        // Another request waits already: this one sleeps.
        poller.waiting.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(()).unwrap() });
        let (answer, polled) = poller.wait(rx).await;
        assert!(answer.is_ok() && !polled);

        // One that polls stops once a second waiter arrives.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (polled_once, started) = tokio::sync::oneshot::channel();
        let mut polled_once = Some(polled_once);
        let mut rx = rx;
        let answer = std::future::poll_fn(move |cx| {
            if let Some(first) = polled_once.take() {
                let _ = first.send(());
            }
            std::pin::Pin::new(&mut rx).poll(cx)
        });
        let first = tokio::spawn({
            let poller = poller.clone();
            async move {
                poll_then_await(answer, poller.window, || poller.crowded())
                    .await
                    .1
            }
        });
        started.await.unwrap();
        // The first is polling (its window is 20 s); a second arrives.
        poller.waiting.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        assert!(
            !first.await.unwrap(),
            "the first kept polling beside a second"
        );
    }
}
