//! gRPC request bytes charged to `--max-buffered-bytes`, the budget REST bodies use
//! (`api/body_budget.rs`), so that many calls that each send a near-limit message and stall,
//! or many large concurrent ModelInfer calls, cannot pin more memory than the budget.
//!
//! `BudgetLayer` wraps each call's request body and charges every data frame as it arrives
//! (waiting for room up to the budget's wait, then failing the call with the budget's error,
//! which names the flag; the code is its class's, as REST's 503). Waiting stops the read, so
//! HTTP/2 flow control pushes back on the client meanwhile.
//!
//! - A unary call keeps its charge until it is over: the response body finished or dropped,
//!   or the call cancelled (the charge is shared by the request body, the response future
//!   and the response body).
//! - ModelStreamInfer is charged per message: the bytes of a message being received are
//!   charged as they come, and once the message is whole its charge goes to the
//!   `MessageCharges` queue in the request's extensions, for the stream handler to hold
//!   while it answers that message (`stream.rs`). A long stream so holds only what it is
//!   working on, never the sum of everything it ever sent.
//!
//! Bytes are counted as they come off the wire (compressed, when a call is compressed).
//! `grpc.health.v1` calls are not charged, so health probes answer however full the budget
//! is; their messages are capped at `HEALTH_MESSAGE_LIMIT` instead (`mod.rs`).

use crate::api::ApiError;
use crate::api::body_budget::{BodyBudget, Charge};
use crate::api::hold_body::HoldUntilEnd;
use bytes::{Buf as _, Bytes};
use http::{Request, Response};
use http_body::Frame;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::Status;

/// The call whose messages are charged one by one.
const STREAM_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";
/// Calls that are not charged (their messages are small by their own limit).
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// The largest `grpc.health.v1` request message (a service name).
pub const HEALTH_MESSAGE_LIMIT: usize = 4096;

/// Charges of a stream's whole messages, oldest first, for the handler to take in the order
/// it receives the messages.
#[derive(Clone, Debug, Default)]
pub struct MessageCharges(Arc<Mutex<VecDeque<Charge>>>);

impl MessageCharges {
    /// The charge of the next message the handler receives (none if the call is not
    /// charged per message).
    pub fn next(&self) -> Option<Charge> {
        self.0.lock().ok()?.pop_front()
    }

    fn push(&self, charge: Charge) {
        if let Ok(mut queue) = self.0.lock() {
            queue.push_back(charge);
        }
    }
}

/// The layer: one budget for every call.
#[derive(Clone, Debug)]
pub struct BudgetLayer {
    budget: BodyBudget,
}

impl BudgetLayer {
    pub fn new(budget: BodyBudget) -> BudgetLayer {
        BudgetLayer { budget }
    }
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;

    fn layer(&self, inner: S) -> BudgetService<S> {
        BudgetService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BudgetService<S> {
    inner: S,
    budget: BodyBudget,
}

/// A unary call's charge, shared by its request body and its response.
type Shared = Arc<Mutex<Charge>>;

impl<S> tower::Service<Request<tonic::body::Body>> for BudgetService<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<tonic::body::Body>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = HoldingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path().starts_with(HEALTH_PREFIX) {
            return HoldingFuture {
                inner: self.inner.call(req),
                shared: None,
            };
        }
        let (mut parts, body) = req.into_parts();
        let (mode, shared) = if parts.uri.path() == STREAM_PATH {
            let queue = MessageCharges::default();
            parts.extensions.insert(queue.clone());
            (Mode::PerMessage(queue, Framing::default()), None)
        } else {
            let shared: Shared = Arc::new(Mutex::new(self.budget.empty()));
            (Mode::WholeCall(Arc::clone(&shared)), Some(shared))
        };
        let charged = ChargedBody {
            inner: body,
            budget: self.budget.clone(),
            current: self.budget.empty(),
            mode,
            waiting: None,
        };
        let req = Request::from_parts(parts, tonic::body::Body::new(charged));
        HoldingFuture {
            inner: self.inner.call(req),
            shared,
        }
    }
}

/// Where a request body's charges go.
enum Mode {
    /// All of it, until the call is over.
    WholeCall(Shared),
    /// Each whole message to the handler's queue.
    PerMessage(MessageCharges, Framing),
}

/// A frame waiting for room in the budget.
type Waiting = (
    Pin<Box<dyn Future<Output = Result<Charge, ApiError>> + Send>>,
    Frame<Bytes>,
);

/// A request body whose data frames are charged as they arrive.
struct ChargedBody {
    inner: tonic::body::Body,
    budget: BodyBudget,
    /// Bytes of the message being received (per-message mode), or of the call so far.
    current: Charge,
    mode: Mode,
    waiting: Option<Waiting>,
}

impl ChargedBody {
    /// Bytes this body already holds against the budget.
    fn held(&self) -> usize {
        match &self.mode {
            Mode::WholeCall(shared) => shared.lock().map_or(0, |c| c.bytes()),
            Mode::PerMessage(..) => self.current.bytes(),
        }
    }

    /// Books `charge` (for `frame`) and passes the frame on.
    fn admit(&mut self, charge: Charge, frame: &Frame<Bytes>) {
        match &mut self.mode {
            Mode::WholeCall(shared) => {
                if let Ok(mut c) = shared.lock() {
                    c.merge(charge);
                }
            }
            Mode::PerMessage(queue, framing) => {
                self.current.merge(charge);
                if let Some(data) = frame.data_ref() {
                    for whole in framing.advance(data.clone()) {
                        queue.push(self.current.split(whole));
                    }
                }
            }
        }
    }
}

impl http_body::Body for ChargedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some((wait, _)) = &mut this.waiting {
                let charged = std::task::ready!(wait.as_mut().poll(cx));
                let Some((_, frame)) = this.waiting.take() else {
                    continue;
                };
                return Poll::Ready(Some(match charged {
                    Ok(charge) => {
                        this.admit(charge, &frame);
                        Ok(frame)
                    }
                    Err(e) => Err(Status::from(e)),
                }));
            }
            let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let n = frame.data_ref().map_or(0, Bytes::len);
            let held = this.held();
            match this.budget.try_take(held, n) {
                Ok(Some(charge)) => {
                    this.admit(charge, &frame);
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) => {
                    let wait = this.budget.clone().take(held, n);
                    this.waiting = Some((Box::pin(wait), frame));
                }
                Err(e) => return Poll::Ready(Some(Err(Status::from(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }
}

/// Where a request stream is in gRPC's message framing: each message is a 5-byte prefix
/// (compressed flag, big-endian u32 length) and that many bytes.
#[derive(Debug, Default)]
struct Framing {
    /// Prefix bytes of the current message seen so far (0 to 5).
    prefix: usize,
    /// The current message's length, read from its prefix.
    length: [u8; 4],
    /// Bytes of the current message's payload still to come (once the prefix is whole).
    left: usize,
    /// Bytes of the current message seen so far, prefix included.
    seen: usize,
}

impl Framing {
    /// Reads `data`; returns the size (prefix included) of each message it completes.
    fn advance(&mut self, mut data: Bytes) -> Vec<usize> {
        let mut whole = Vec::new();
        while data.has_remaining() {
            if self.prefix < 5 {
                let byte = data.get_u8();
                if self.prefix > 0 {
                    self.length[self.prefix - 1] = byte;
                }
                self.prefix += 1;
                self.seen += 1;
                if self.prefix == 5 {
                    self.left = u32::from_be_bytes(self.length) as usize;
                }
            } else {
                let take = self.left.min(data.remaining());
                data.advance(take);
                self.left -= take;
                self.seen += take;
            }
            if self.prefix == 5 && self.left == 0 {
                whole.push(self.seen);
                *self = Framing::default();
            }
        }
        whole
    }
}

pin_project_lite::pin_project! {
    /// The response future; a unary call's charge goes on in the response body.
    pub struct HoldingFuture<F> {
        #[pin]
        inner: F,
        shared: Option<Shared>,
    }
}

impl<F, E> Future for HoldingFuture<F>
where
    F: Future<Output = Result<Response<tonic::body::Body>, E>>,
{
    type Output = Result<Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx));
        let shared = this.shared.take();
        Poll::Ready(response.map(|r| {
            r.map(|inner| match shared {
                None => inner,
                // The call's charge is held until its answer is finished or dropped.
                Some(shared) => tonic::body::Body::new(HoldUntilEnd::new(inner, shared)),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn framing_finds_messages_across_and_within_frames() {
        let mut f = Framing::default();
        let mut wire = message(10);
        wire.extend(message(0));
        wire.extend(message(3));
        // Split mid-prefix and mid-payload.
        assert_eq!(
            f.advance(Bytes::copy_from_slice(&wire[..3])),
            Vec::<usize>::new()
        );
        assert_eq!(
            f.advance(Bytes::copy_from_slice(&wire[3..12])),
            Vec::<usize>::new()
        );
        assert_eq!(
            f.advance(Bytes::copy_from_slice(&wire[12..])),
            vec![15, 5, 8]
        );
    }

    #[tokio::test]
    async fn a_stream_hands_each_whole_message_its_own_charge() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let budget = BodyBudget::new(1000, Some(gauge.clone()));
        let queue = MessageCharges::default();
        let mut wire = message(10);
        wire.extend(message(20));
        let half = wire.len() - 5;
        let chunks = vec![
            Ok::<_, Status>(Frame::data(Bytes::copy_from_slice(&wire[..half]))),
            Ok(Frame::data(Bytes::copy_from_slice(&wire[half..]))),
        ];
        let mut body = ChargedBody {
            inner: tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                chunks,
            ))),
            budget: budget.clone(),
            current: budget.empty(),
            mode: Mode::PerMessage(queue.clone(), Framing::default()),
            waiting: None,
        };
        use http_body_util::BodyExt as _;
        body.frame().await.unwrap().unwrap();
        // The first message is whole; the second is 20 of its 25 bytes in.
        assert_eq!(queue.0.lock().unwrap().len(), 1);
        assert_eq!(gauge.get(), half as i64);
        body.frame().await.unwrap().unwrap();
        let first = queue.next().unwrap();
        let second = queue.next().unwrap();
        assert_eq!((first.bytes(), second.bytes()), (15, 25));
        drop(first);
        assert_eq!(gauge.get(), 25);
        drop(second);
        drop(body);
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_unary_call_past_the_budget_fails_naming_the_flag() {
        let budget = BodyBudget::new(100, None);
        let _held = budget.clone().take(0, 90).await.unwrap();
        let chunks = vec![Ok::<_, Status>(Frame::data(Bytes::from_static(&[0; 20])))];
        let shared: Shared = Arc::new(Mutex::new(budget.empty()));
        let mut body = ChargedBody {
            inner: tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                chunks,
            ))),
            budget: budget.clone(),
            current: budget.empty(),
            mode: Mode::WholeCall(Arc::clone(&shared)),
            waiting: None,
        };
        use http_body_util::BodyExt as _;
        let status = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            crate::api::ApiError::Unavailable(String::new())
                .class()
                .code()
        );
        assert!(
            status.message().contains("--max-buffered-bytes"),
            "{status:?}"
        );
        assert_eq!(shared.lock().unwrap().bytes(), 0);
    }
}
