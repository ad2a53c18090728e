//! `--body-read-timeout-ms`: a deadline on each request body, from its head to its last
//! byte. A body that has not arrived by then fails its reader (the handler) and the request
//! is answered `408 Request Timeout` with `Connection: close`, so a client that stalls part
//! way through a body holds neither a buffer nor a connection for long.

use crate::api::error::ApiError;
use crate::telemetry::metrics::ConnectionMetrics;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Body as _;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// What the middleware needs: the deadline and where to count expiries.
#[derive(Clone, Debug)]
pub struct BodyDeadline {
    pub timeout: Duration,
    pub metrics: Option<ConnectionMetrics>,
}

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn limit_body_time(
    State(deadline): State<BodyDeadline>,
    req: Request,
    next: Next,
) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(deadline.timeout)),
            expired: Arc::clone(&expired),
            finished: false,
        })
    });
    let response = next.run(req).await;
    if !expired.load(Ordering::Acquire) {
        return response;
    }
    if let Some(m) = &deadline.metrics {
        m.body_timeouts.inc();
    }
    ApiError::BodyTimeout {
        after: deadline.timeout,
    }
    .into_response()
}

/// A request body that fails once its deadline passes before its end.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
    finished: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.finished {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(frame) => Poll::Ready(frame),
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.expired.store(true, Ordering::Release);
                this.finished = true;
                Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request body did not arrive within the body-read timeout",
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
