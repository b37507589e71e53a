//! A request body the gateway stops reading before its end is read to its
//! end in the background, the way servers linger before a close.
//!
//! The gateway answers some requests without reading all of their body: a
//! 413 for a body over `max_body_bytes` (announced, or found while it
//! streams), a 401 or 429 decided before the body is needed, a 502 when the
//! upstream fails while the body is on its way. Closing a connection whose
//! unread bytes sit in the socket makes the kernel send a reset, and a
//! client still sending its body then loses the answer already on its way
//! (hyper's client reports an incomplete message, not the 413). So a body
//! dropped before its end is handed to a task that reads and discards the
//! rest, for at most [`LINGER_TIME`] and [`LINGER_BYTES`]; the connection
//! then ends cleanly, or serves the client's next request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// How long an abandoned body is read before the connection is let go.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// How much of an abandoned body is read before the connection is let go.
pub const LINGER_BYTES: usize = 64 << 20;

/// A request body that, dropped before its end, is read to its end in the background.
pub struct Linger {
    /// `None` once the body has ended (or failed): nothing is left to read.
    inner: Option<Body>,
}

impl Linger {
    /// `body`, lingering when dropped early; a body with nothing to read is
    /// returned as it is, so a request without one costs nothing more.
    pub fn wrap(body: Body) -> Body {
        if http_body::Body::is_end_stream(&body) {
            return body;
        }
        Body::new(Linger { inner: Some(body) })
    }
}

impl http_body::Body for Linger {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for Linger {
    fn drop(&mut self) {
        let Some(mut rest) = self.inner.take() else { return };
        if http_body::Body::is_end_stream(&rest) {
            return;
        }
        // Outside a runtime (nothing serves the connection then) it just drops.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let mut read = 0usize;
            let discard = async {
                while let Some(Ok(frame)) = rest.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > LINGER_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, discard).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body fed chunk by chunk through a channel of one slot.
    fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>, Body) {
        let (tx, rx) = mpsc::channel(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) });
        (tx, Body::new(http_body_util::StreamBody::new(stream)))
    }

    #[tokio::test]
    async fn a_body_dropped_early_is_read_to_its_end() {
        let (tx, body) = channel_body();
        let mut body = Linger::wrap(body);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await.unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first");
        drop(body);
        // Every further chunk is taken (the channel holds one), then the end.
        for _ in 0..100 {
            tx.send(Ok(Frame::data(Bytes::from_static(b"more")))).await.expect("the rest is still read");
        }
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_leaves_nothing_behind() {
        let (tx, body) = channel_body();
        let mut body = Linger::wrap(body);
        tx.send(Ok(Frame::data(Bytes::from_static(b"all")))).await.unwrap();
        drop(tx);
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "all");
        assert!(body.frame().await.is_none());
        assert!(http_body::Body::is_end_stream(&body));
    }
}
