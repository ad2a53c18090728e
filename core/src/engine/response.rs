//! The one shape of every answer: a stream of responses, then an end (TGI's shape).
//!
//! A scheduler holds a request's `ResponseSink`; the client holds its `Responses`. A plain
//! model's request gets exactly one response, a generator model's one per `yield`; either
//! way the end follows (`Ok`, or the error). `Engine::infer` collects the one response,
//! `Engine::infer_stream` hands the stream on.
//!
//! Back-pressure: responses wait in a small bounded channel; past it a scheduler waits (at
//! most the request's deadline: a client connected but not reading must not hold a worker
//! forever). The end goes on its own oneshot, so it is never lost to a full buffer, and it
//! is sent after the response channel closes, so the client reads every response first.
//!
//! Dropping `Responses` is the client going away: the sink's `closed` resolves, a queued
//! request is dropped before it costs a worker call (the scheduler is woken at once,
//! `WakeOnDrop`), a running one is cancelled.
//!
//! Deadline: the request's timeout (the model's, or less if the client asks) bounds the
//! wait for each response; the first one must come by the request's deadline, set at
//! admission (the queue wait included). A generator may stream
//! for as long as it keeps producing and its client keeps reading.

use super::scheduler::Scheduler;
use super::tensor::Tensor;
use super::{EngineError, InferResponse};
use crate::telemetry::metrics::InflightGuard;
use futures::stream::BoxStream;
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

/// The responses to one request, in order; an `Err` item ends it. Dropping it cancels the
/// request (see the module doc).
pub type InferStream = BoxStream<'static, Result<InferResponse, EngineError>>;

/// Responses buffered between a scheduler and its client. Small: beyond it a generator
/// waits, instead of the server holding what a slow client has not read. At least 1, so a
/// plain model's one response never waits.
const RESPONSE_BUFFER: usize = 2;

/// One response: the outputs the request asked for, in its order, and the rows of the
/// worker call that produced them (its own included), for the access log.
#[derive(Clone, Debug)]
pub struct Answer {
    pub outputs: Vec<Tensor>,
    pub batch_size: u32,
}

/// How a request ended: after all its responses, or with an error.
pub type End = Result<(), EngineError>;

/// A new request's two ends.
pub fn channel() -> (ResponseSink, ResponseReceiver) {
    let (responses_tx, responses) = mpsc::channel(RESPONSE_BUFFER);
    let (end_tx, end) = oneshot::channel();
    (
        ResponseSink {
            responses: responses_tx,
            end: end_tx,
        },
        ResponseReceiver {
            responses,
            end: Some(end),
        },
    )
}

/// The scheduler's end of a request. `finish` consumes it, so a request is answered at most
/// once; dropping it unfinished (a cancelled task) tells the client 503.
#[derive(Debug)]
pub struct ResponseSink {
    responses: mpsc::Sender<Answer>,
    end: oneshot::Sender<End>,
}

/// What became of a response handed to the client.
#[derive(Debug, PartialEq)]
pub enum Delivered {
    Sent,
    /// The client has gone.
    Gone,
    /// The client has not taken it within `within` (its buffer stayed full).
    Stalled(Duration),
}

impl ResponseSink {
    /// The client stopped waiting.
    pub fn is_closed(&self) -> bool {
        self.end.is_closed()
    }

    /// Resolves when the client stops waiting.
    pub async fn closed(&mut self) {
        self.end.closed().await;
    }

    /// Hands one response to the client, waiting at most `within` for room.
    pub async fn send(&mut self, answer: Answer, within: Duration) -> Delivered {
        let answer = match self.responses.try_send(answer) {
            Ok(()) => return Delivered::Sent,
            Err(TrySendError::Closed(_)) => return Delivered::Gone,
            Err(TrySendError::Full(answer)) => answer,
        };
        tokio::select! {
            biased;
            _ = self.end.closed() => Delivered::Gone,
            sent = tokio::time::timeout(within, self.responses.send(answer)) => match sent {
                Ok(Ok(())) => Delivered::Sent,
                Ok(Err(_)) => Delivered::Gone,
                Err(_) => Delivered::Stalled(within),
            },
        }
    }

    /// Sends a request's only response and its end at once (a plain model's answer): the
    /// client wakes once, to both.
    pub fn finish_with(self, answer: Answer) {
        match self.responses.try_send(answer) {
            Ok(()) | Err(TrySendError::Closed(_)) => self.finish(Ok(())),
            // Only if a response was sent before, which a plain model's request never has.
            Err(TrySendError::Full(_)) => self.finish(Err(EngineError::Internal(
                "a request's only response found its buffer full".into(),
            ))),
        }
    }

    /// Ends the request. The client may have gone; nobody to tell then.
    pub fn finish(self, end: End) {
        let ResponseSink { responses, end: tx } = self;
        // Closed first: the client reads every response before the end.
        drop(responses);
        let _ = tx.send(end);
    }
}

/// The client's end of a request, before admission wraps it into `Responses`.
pub struct ResponseReceiver {
    responses: mpsc::Receiver<Answer>,
    /// `None` once the end has been read (or given up on).
    end: Option<oneshot::Receiver<End>>,
}

/// What the client of an admitted request holds besides its receiver.
pub(super) struct Holds {
    /// Bound on the wait for each response after the first.
    pub timeout: Duration,
    /// The request's deadline: bound on the wait for its first response (the queue included).
    pub deadline: Instant,
    pub model: String,
    pub version: String,
    pub id: Option<String>,
    /// Counted in flight until the client is done.
    pub inflight: InflightGuard,
    /// The model's `max_concurrency` counts the request until the client is done.
    pub admitted: Option<OwnedSemaphorePermit>,
    /// Woken if the client leaves before the end.
    pub scheduler: Scheduler,
}

/// The responses to one admitted request, as the client reads them.
pub struct Responses {
    receiver: ResponseReceiver,
    timeout: Duration,
    /// Until the first response: the request's deadline.
    first_deadline: Option<Instant>,
    model: String,
    version: String,
    id: Option<String>,
    _inflight: InflightGuard,
    _admitted: Option<OwnedSemaphorePermit>,
    wake: WakeOnDrop,
}

/// What the wait for the next response brought.
enum Next {
    Response(Answer),
    /// The scheduler sent the end (or dropped the sink without one).
    End(Result<End, oneshot::error::RecvError>),
}

impl Responses {
    pub(super) fn new(receiver: ResponseReceiver, holds: Holds) -> Responses {
        Responses {
            receiver,
            timeout: holds.timeout,
            first_deadline: Some(holds.deadline),
            model: holds.model,
            version: holds.version,
            id: holds.id,
            _inflight: holds.inflight,
            _admitted: holds.admitted,
            wake: WakeOnDrop(Some(holds.scheduler)),
        }
    }

    /// The next response; `None` after the last one. An `Err` is the last item.
    pub async fn next(&mut self) -> Option<Result<InferResponse, EngineError>> {
        let end = self.receiver.end.as_mut()?;
        let responses = &mut self.receiver.responses;
        let wait = async {
            match responses.recv().await {
                Some(answer) => Next::Response(answer),
                // The sender goes before the end is sent (`ResponseSink::finish`).
                None => Next::End(end.await),
            }
        };
        let until = self
            .first_deadline
            .unwrap_or_else(|| Instant::now() + self.timeout);
        match tokio::time::timeout_at(until, wait).await {
            Ok(Next::Response(answer)) => {
                self.first_deadline = None;
                Some(Ok(self.response(answer)))
            }
            Ok(Next::End(end)) => {
                self.receiver.end = None;
                // Answered: nothing left for the scheduler to look for.
                self.wake.0 = None;
                match end {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(Err(e)),
                    // The task serving it was cancelled (shutdown after the drain deadline).
                    Err(_) => Some(Err(EngineError::ShuttingDown)),
                }
            }
            Err(_) => {
                // Ends the stream; dropping the end cancels the work.
                self.receiver.end = None;
                Some(Err(EngineError::Timeout {
                    model: self.model.clone(),
                    after: self.timeout,
                }))
            }
        }
    }

    /// Reads the one response of a plain model's request, and its end.
    pub async fn collect_one(mut self) -> Result<InferResponse, EngineError> {
        let response = match self.next().await {
            Some(response) => response?,
            None => {
                return Err(EngineError::Internal(format!(
                    "model '{}' ended a request without a response",
                    self.model
                )));
            }
        };
        match self.next().await {
            None => Ok(response),
            Some(Err(e)) => Err(e),
            Some(Ok(_)) => Err(EngineError::Internal(format!(
                "model '{}' answered a request with more than one response",
                self.model
            ))),
        }
    }

    /// As a boxed stream, for callers that pass it on.
    pub fn boxed(self) -> InferStream {
        Box::pin(futures::stream::unfold(self, |mut r| async move {
            let item = r.next().await?;
            Some((item, r))
        }))
    }

    fn response(&self, answer: Answer) -> InferResponse {
        InferResponse {
            model_name: self.model.clone(),
            model_version: self.version.clone(),
            id: self.id.clone(),
            outputs: answer.outputs,
            batch_size: answer.batch_size,
        }
    }
}

/// Wakes the scheduler when a client stops waiting before its end, so a queued request's
/// place is freed now rather than at its next look at the queue.
struct WakeOnDrop(Option<Scheduler>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.client_left();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(n: u32) -> Answer {
        Answer {
            outputs: Vec::new(),
            batch_size: n,
        }
    }

    #[tokio::test]
    async fn responses_come_before_the_end_and_a_full_buffer_waits() {
        let (mut sink, mut rx) = channel();
        let within = Duration::from_secs(5);
        for n in 0..RESPONSE_BUFFER as u32 {
            assert_eq!(sink.send(answer(n), within).await, Delivered::Sent);
        }
        let stalled = sink.send(answer(9), Duration::from_millis(1)).await;
        assert_eq!(stalled, Delivered::Stalled(Duration::from_millis(1)));
        sink.finish(Err(EngineError::ShuttingDown));
        for n in 0..RESPONSE_BUFFER as u32 {
            assert_eq!(rx.responses.recv().await.map(|a| a.batch_size), Some(n));
        }
        assert!(rx.responses.recv().await.is_none());
        let end = rx.end.take().unwrap().await.unwrap();
        assert!(matches!(end, Err(EngineError::ShuttingDown)));
    }

    #[tokio::test]
    async fn a_client_that_leaves_closes_the_sink() {
        let (mut sink, rx) = channel();
        assert!(!sink.is_closed());
        drop(rx);
        assert!(sink.is_closed());
        sink.closed().await;
        assert_eq!(
            sink.send(answer(1), Duration::from_secs(1)).await,
            Delivered::Gone
        );
    }
}
