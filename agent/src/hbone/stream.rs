//! One HBONE CONNECT stream as `AsyncRead + AsyncWrite`, so the relay moves
//! its bytes like a socket's. Half-close maps to END_STREAM; received data's
//! flow-control capacity is released as soon as it is taken off the stream,
//! so the window refills while at most one frame waits here.
//!
//! A plain relay takes the stream apart instead ([`H2Stream::into_parts`],
//! [`send_all`], [`next_data`]) and moves `Bytes` without copying them.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    recv_done: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
        }
    }

    /// Ends the stream with RST_STREAM (CANCEL): the client sees the
    /// connection reset, not a clean end.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// The send and receive halves, and the bytes put back in front of the
    /// received ones ([`Self::unread`]).
    pub fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Bytes) {
        (self.send, self.recv, self.pending)
    }

    /// Puts bytes already read back in front of the stream (after a
    /// protocol was sniffed from them).
    pub fn unread(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            let mut joined = bytes::BytesMut::from(&bytes[..]);
            joined.extend_from_slice(&self.pending);
            self.pending = joined.freeze();
        }
    }
}

pub fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// Sends `data` as DATA frames as flow control lets it through; the
/// payload is sliced, never copied.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = send.capacity();
        if capacity > 0 {
            let n = capacity.min(data.len());
            send.send_data(data.split_to(n), false).map_err(h2_to_io)?;
            continue;
        }
        std::future::poll_fn(|cx| poll_capacity(send, cx)).await?;
    }
    Ok(())
}

/// Ends the sending half (END_STREAM). The stream may be gone already
/// (reset by the peer), which leaves nothing to end.
pub fn end(send: &mut SendStream<Bytes>) {
    let _ = send.send_data(Bytes::new(), true);
}

/// The next DATA frame's payload, its flow-control capacity released;
/// `None` at END_STREAM.
pub async fn next_data(recv: &mut RecvStream) -> io::Result<Option<Bytes>> {
    std::future::poll_fn(|cx| poll_next_data(recv, cx)).await
}

fn poll_next_data(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    Poll::Ready(match ready!(recv.poll_data(cx)) {
        Some(Ok(data)) => {
            let _ = recv.flow_control().release_capacity(data.len());
            Ok(Some(data))
        }
        Some(Err(e)) => Err(h2_to_io(e)),
        None => Ok(None),
    })
}

/// Waits for send capacity to be assigned (after `reserve_capacity`).
fn poll_capacity(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    Poll::Ready(match ready!(send.poll_capacity(cx)) {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(h2_to_io(e)),
        None => Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the HBONE stream is closed",
        )),
    })
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(poll_next_data(&mut this.recv, cx))? {
                Some(data) => this.pending = data,
                None => this.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            let capacity = this.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            ready!(poll_capacity(&mut this.send, cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        end(&mut self.get_mut().send);
        Poll::Ready(Ok(()))
    }
}
