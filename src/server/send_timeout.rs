//! Close a connection whose client has stopped taking bytes.
//!
//! A client that stops reading fills its socket's buffers; the gateway's
//! writes then wait forever, and with them the response body, the
//! upstream connection it streams from, and the memory both hold. hyper's
//! server has no write timeout, so every proxy connection's socket is
//! wrapped: when a write has waited `send_timeout` without the client
//! taking a byte, the write fails with `TimedOut` and hyper closes the
//! connection, dropping the response and its upstream body. Like nginx's
//! `send_timeout`, this is the longest wait between two successful writes,
//! not a limit on a whole response: a slow reader that keeps reading is
//! never cut.
//!
//! The clock is armed only when a write waits, so the common path (a write
//! the kernel takes at once) costs one branch.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A socket whose writes fail after waiting `limit` without progress.
pub struct SendTimeout<T> {
    inner: T,
    limit: Duration,
    /// The stalled write's deadline; allocated on the first stall, reset on later ones.
    clock: Option<Pin<Box<Sleep>>>,
    /// Whether the last write waited (so the clock is running).
    waiting: bool,
}

impl<T> SendTimeout<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        SendTimeout { inner, limit, clock: None, waiting: false }
    }

    /// What a write that made progress (or failed) returns: the clock stops.
    fn progressed<R>(&mut self, result: io::Result<R>) -> Poll<io::Result<R>> {
        self.waiting = false;
        Poll::Ready(result)
    }

    /// What a write that must wait returns: pending until the clock runs out.
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.clock {
                Some(clock) => clock.as_mut().reset(deadline),
                None => self.clock = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let clock = self.clock.as_mut().expect("armed above");
        match clock.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.waiting = false;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took no bytes for {:?} (send_timeout)", self.limit),
                )))
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Ready(result) => self.progressed(result),
            Poll::Pending => self.stalled(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A write into a full pipe fails after the limit, on tokio's paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_limit_fails_with_timed_out() {
        let (near, mut far) = tokio::io::duplex(8);
        let mut near = SendTimeout::new(near, Duration::from_secs(5));
        near.write_all(b"12345678").await.unwrap();
        let start = Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(60), near.write_all(b"9")).await;
        let err = waited.expect("the write gave up by itself").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // What was written before the stall is still there to read.
        let mut got = [0u8; 8];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"12345678");
    }

    /// Every byte the reader takes restarts the clock: a reader slower than
    /// the writer but never silent for the limit gets everything.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_cut() {
        let (near, mut far) = tokio::io::duplex(4);
        let mut near = SendTimeout::new(near, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while far.read(&mut byte).await.unwrap() == 1 {
                got.push(byte[0]);
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            got
        });
        let start = Instant::now();
        near.write_all(b"0123456789").await.unwrap();
        near.shutdown().await.unwrap();
        drop(near);
        assert_eq!(reader.await.unwrap(), b"0123456789");
        // The last byte fit once the reader had taken six, one every 4 s:
        // 20 s of writing, four times the limit.
        assert!(start.elapsed() >= Duration::from_secs(20), "{:?}", start.elapsed());
    }
}
