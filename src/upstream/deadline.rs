//! A response body that fails when the exchange's total time runs out.
//!
//! A body cut by the deadline ends with an error, so the client sees an
//! aborted transfer, never a truncated body that looks complete.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

/// The error a body yields when its deadline passes.
#[derive(Debug, thiserror::Error)]
#[error("the upstream exchange exceeded its total timeout")]
pub struct DeadlineExceeded;

pin_project! {
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        sleep: Pin<Box<Sleep>>,
    }
}

impl<B> DeadlineBody<B> {
    /// `sleep` fires at the deadline (it may be a timer already in use, reset).
    pub fn new(inner: B, sleep: Pin<Box<Sleep>>) -> Self {
        DeadlineBody { inner, sleep }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(DeadlineExceeded)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
