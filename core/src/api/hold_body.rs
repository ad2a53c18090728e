//! A body that holds something (a request's in-flight mark, its budget charge) until the
//! body is finished or dropped: the connection watchdog (`conn/watch.rs`) and the gRPC body
//! budget (`grpc/budget.rs`) both need "release when the answer is done", and hyper may keep
//! a finished body around, so dropping alone would release too late.

use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// `inner`, holding `held` until its last frame is read or it is dropped.
    pub struct HoldUntilEnd<B, T> {
        #[pin]
        inner: B,
        held: Option<T>,
    }
}

impl<B, T> HoldUntilEnd<B, T> {
    pub fn new(inner: B, held: T) -> HoldUntilEnd<B, T> {
        HoldUntilEnd {
            inner,
            held: Some(held),
        }
    }
}

impl<B: Body, T> Body for HoldUntilEnd<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            // Finished: release now, even if hyper keeps the body.
            this.held.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
