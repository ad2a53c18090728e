//! Streaming requests: a generator model answers one request with several responses.
//!
//! A streaming request takes the path of any other (validation, the model's bounded queue
//! and its 429, the deadline, least-loaded dispatch, drain, statistics) and differs in two
//! places: the batcher runs it alone (a generator's chunks belong to one client, so
//! generator models are never batched across requests), and its batch task (`run_stream`)
//! forwards every chunk the worker yields through a small bounded channel before the final
//! answer. The chunk's worker receipt is dropped only once the chunk is in that channel, so
//! a slow client holds the generator at its next `yield` (see `worker::WorkStream`).
//!
//! Dropping the client's `InferStream` closes the channel and the reply: a queued request is
//! dropped from the queue before it costs a worker call, a running one cancels its execute,
//! which closes the generator at its next `yield`.
//!
//! Deadline: the request's timeout (the model's, or less if the client asks) bounds the wait
//! for each response, the first one including the queue wait, and also the wait for a client
//! to take a response (one connected but not reading must not hold a worker forever); the
//! worker's execution timeout likewise bounds each chunk. A generator may stream for as long
//! as it keeps producing and its client keeps reading.

use super::EngineError;
use super::batch::{build_work, split_outputs};
use super::batcher::Command;
use super::execution::{BatchContext, FinishGuard, Outcome, worker_error};
use super::executor::Executor;
use super::handle::{Admission, Engine, admit, check_ready, in_declared_order};
use super::queue::{Answer, Origin, Pending, Reply};
use super::stats::BatchTimes;
use super::tensor::Tensor;
use super::validate::validate_request;
use super::{InferRequest, InferResponse};
use crate::telemetry::metrics::InflightGuard;
use crate::worker::types::WorkerError;
use crate::worker::{StreamItem, WorkStream};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The responses to one request, in order; an `Err` item ends it. Dropping it cancels the
/// request (see the module doc).
pub type InferStream = BoxStream<'static, Result<InferResponse, EngineError>>;

/// Where a batch task puts a streaming request's responses.
pub type ChunkSink = mpsc::Sender<Vec<Tensor>>;

/// Responses buffered between a batch task and its client. Small: beyond it the generator
/// waits, instead of the server holding what a slow client has not read.
const CHUNK_BUFFER: usize = 2;

impl Engine {
    /// Validates, queues and executes one request, answering with a stream of responses: one
    /// per chunk a generator model yields, or exactly one for an ordinary model. Errors before
    /// the stream starts (unknown model, invalid input, queue full, not ready, shutting down)
    /// are the `Err` of this call; once streaming, an error is the stream's last item.
    #[tracing::instrument(level = "debug", name = "infer_stream", skip_all, fields(model = %req.model))]
    pub async fn infer_stream(&self, req: InferRequest) -> Result<InferStream, EngineError> {
        let entry = self.entry(&req.model, req.version.as_deref())?;
        if !entry.config.streaming {
            let response = self.infer(req).await?;
            return Ok(futures::stream::once(async { Ok(response) }).boxed());
        }
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        let config = entry.config.clone();
        let rows = validate_request(
            &config,
            &req.inputs,
            req.outputs.as_deref(),
            &self.options().limits,
        )?;
        check_ready(&config, &entry.state(), entry.is_unloading())?;
        let Admission { admitted, place } = admit(&entry)?;
        let inflight = entry.metrics.inflight();
        let timeout = req
            .timeout
            .map_or(config.request_timeout, |t| t.min(config.request_timeout));
        let now = Instant::now();
        let (reply_tx, reply_rx) = oneshot::channel();
        let (chunks_tx, chunks_rx) = mpsc::channel(CHUNK_BUFFER);
        let pending = Pending {
            inputs: in_declared_order(&config, req.inputs),
            outputs: req.outputs,
            rows,
            enqueued: now,
            deadline: now + timeout,
            reply: reply_tx,
            permit: Some(place),
            chunks: Some(chunks_tx),
            // A stream's responses may already have reached its client: never retried.
            retried: true,
            // A stream's responses come back in its events, never written into client memory.
            targets: Vec::new(),
            origin: Origin {
                id: req.id.clone(),
                trace: req.trace,
                span: tracing::Span::current(),
            },
        };
        entry
            .commands
            .send(Command::Enqueue(pending))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        let flow = Flow {
            chunks: chunks_rx,
            reply: Some(reply_rx),
            timeout,
            model: config.name.clone(),
            version: config.version.clone(),
            id: req.id,
            _inflight: inflight,
            _admitted: admitted,
            _wake: WakeOnDrop(entry.commands.clone()),
        };
        Ok(futures::stream::unfold(flow, Flow::step).boxed())
    }
}

/// The client's side of a streaming request.
struct Flow {
    chunks: mpsc::Receiver<Vec<Tensor>>,
    /// The final answer; `None` once the stream has ended.
    reply: Option<oneshot::Receiver<Reply>>,
    /// Bound on the wait for each response.
    timeout: Duration,
    model: String,
    version: String,
    id: Option<String>,
    /// Counted in flight until the stream is dropped.
    _inflight: InflightGuard,
    /// The model's `max_concurrency` counts the stream until it is dropped.
    _admitted: Option<tokio::sync::OwnedSemaphorePermit>,
    _wake: WakeOnDrop,
}

/// What the wait for the next response brought.
enum Next {
    Chunk(Vec<Tensor>),
    /// The batch task sent its final answer (or was dropped without one).
    End(Result<Reply, oneshot::error::RecvError>),
}

impl Flow {
    async fn step(mut self) -> Option<(Result<InferResponse, EngineError>, Flow)> {
        let reply = self.reply.as_mut()?;
        let chunks = &mut self.chunks;
        let wait = async {
            match chunks.recv().await {
                Some(outputs) => Next::Chunk(outputs),
                // The sender goes before the answer is sent (`finish`).
                None => Next::End(reply.await),
            }
        };
        let item = match tokio::time::timeout(self.timeout, wait).await {
            Ok(Next::Chunk(outputs)) => Ok(self.response(outputs)),
            Ok(Next::End(answer)) => {
                self.reply = None;
                match answer {
                    Ok(Ok(_)) => return None,
                    Ok(Err(e)) => Err(e),
                    // The batch task was cancelled (shutdown after the drain deadline).
                    Err(_) => Err(EngineError::ShuttingDown),
                }
            }
            Err(_) => {
                // Ends the stream; dropping the reply cancels the work.
                self.reply = None;
                Err(EngineError::Timeout {
                    model: self.model.clone(),
                    after: self.timeout,
                })
            }
        };
        Some((item, self))
    }

    fn response(&self, outputs: Vec<Tensor>) -> InferResponse {
        InferResponse {
            model_name: self.model.clone(),
            model_version: self.version.clone(),
            id: self.id.clone(),
            outputs,
            batch_size: 1,
        }
    }
}

/// Wakes the batcher when a client stops waiting, so a queued request's place is freed now.
struct WakeOnDrop(mpsc::Sender<Command>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        // A full channel means the batcher is busy and will look at its queue anyway.
        let _ = self.0.try_send(Command::Wake);
    }
}

/// Runs one streaming request (a batch of one) on `exec`: forwards each chunk to the
/// client, then answers. Hands the request back if the instance could not start it.
pub(super) async fn run_stream(
    ctx: BatchContext,
    idx: usize,
    batch_id: u64,
    exec: Arc<dyn Executor>,
    mut batch: Vec<Pending>,
) {
    let mut guard = FinishGuard::new(&ctx, idx, batch_id);
    let batching = ctx.config.max_batch_size > 0;
    let started = Instant::now();
    let work = build_work(&batch, batching);
    let rows = work.batch_size;
    let built = Instant::now();
    let Some(first) = batch.first_mut() else {
        return;
    };
    // Dropping the work stream (the client went away) cancels the execute.
    let mut stream = tokio::select! {
        s = exec.execute_stream(work) => s,
        _ = first.reply.closed() => return,
    };
    let mut forwarded = 0usize;
    let result = loop {
        let Some(item) = next_item(&mut stream, &mut batch).await else {
            return;
        };
        match item {
            Some(Ok(StreamItem::Chunk(chunk))) => {
                let outputs =
                    match split_outputs(&batch, chunk.outputs, &ctx.declared_outputs, batching) {
                        Ok(mut parts) => parts.pop().unwrap_or_default(),
                        Err(e) => {
                            break Err(EngineError::BadOutput {
                                model: ctx.config.name.clone(),
                                message: e.to_string(),
                            });
                        }
                    };
                match forward(&mut batch, outputs).await {
                    Forwarded::Sent => {}
                    Forwarded::Gone => return,
                    Forwarded::Stalled(after) => {
                        break Err(EngineError::Timeout {
                            model: ctx.config.name.clone(),
                            after,
                        });
                    }
                }
                // Passed on: the worker may write its next chunk.
                drop(chunk.receipt);
                forwarded += 1;
            }
            Some(Ok(StreamItem::End { compute_ns })) => break Ok(compute_ns),
            Some(Err(WorkerError::NotStarted { reason })) if forwarded == 0 => {
                guard.armed = false;
                let _ = ctx.outcomes.send(Outcome::NotStarted {
                    idx,
                    batch_id,
                    batch,
                    reason,
                });
                return;
            }
            Some(Err(e)) => {
                if matches!(e, WorkerError::ExecutionTimeout { .. }) {
                    ctx.stats.metrics().execution_timeout();
                }
                break Err(worker_error(&ctx.config.name, e));
            }
            None => break Err(EngineError::ShuttingDown),
        }
    };
    if let Ok(compute_ns) = &result {
        ctx.stats.record_batch(BatchTimes {
            rows,
            input: built - started,
            infer: Duration::from_nanos(*compute_ns),
            output: Duration::ZERO,
            call: built.elapsed(),
        });
    }
    finish(&ctx, batch, started, result.map(|_| rows));
}

/// The next item of the worker stream, or `None` when the client has gone (dropping the
/// stream then cancels the work).
async fn next_item(
    stream: &mut WorkStream,
    batch: &mut [Pending],
) -> Option<Option<Result<StreamItem, WorkerError>>> {
    let first = batch.first_mut()?;
    tokio::select! {
        biased;
        _ = first.reply.closed() => None,
        item = stream.next() => Some(item),
    }
}

/// What became of a response handed to the client.
enum Forwarded {
    Sent,
    /// The client has gone.
    Gone,
    /// The client has not read it within the request's deadline (a client that stays
    /// connected without reading must not hold a worker forever).
    Stalled(Duration),
}

/// Hands one response to the client, waiting at most the request's deadline for room.
async fn forward(batch: &mut [Pending], outputs: Vec<Tensor>) -> Forwarded {
    let Some(first) = batch.first_mut() else {
        return Forwarded::Gone;
    };
    let Some(sink) = first.chunks.clone() else {
        return Forwarded::Gone;
    };
    let within = first.deadline.saturating_duration_since(first.enqueued);
    tokio::select! {
        biased;
        _ = first.reply.closed() => Forwarded::Gone,
        sent = tokio::time::timeout(within, sink.send(outputs)) => match sent {
            Ok(Ok(())) => Forwarded::Sent,
            Ok(Err(_)) => Forwarded::Gone,
            Err(_) => Forwarded::Stalled(within),
        },
    }
}

/// Records and sends the final answer; the chunk channel closes first, so the client reads
/// every response before the answer.
fn finish(
    ctx: &BatchContext,
    batch: Vec<Pending>,
    started: Instant,
    result: Result<u32, EngineError>,
) {
    for mut p in batch {
        p.chunks = None;
        ctx.stats.record_request(
            result.is_ok(),
            started.saturating_duration_since(p.enqueued),
            p.enqueued.elapsed(),
        );
        let reply = match &result {
            Ok(rows) => Ok(Answer {
                outputs: Vec::new(),
                batch_size: *rows,
            }),
            Err(e) => Err(e.clone()),
        };
        // The client may have gone; nobody to tell then.
        let _ = p.reply.send(reply);
    }
}
