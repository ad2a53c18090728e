//! Running one formed batch on one instance and answering its requests: the batcher's
//! worker call.
//!
//! One path for every model: the worker call is a stream of chunks (a plain model's one
//! answer is a stream of one chunk), each chunk is split per request and handed to the
//! request's sink, and the stream's end answers every request (a plain model's one chunk goes
//! with its end, after the statistics are recorded, so its client wakes once). A generator
//! model's batch is one request (the batcher never batches them), so its chunks reach one
//! client in order.
//!
//! Each batch runs in its own task so a slow worker never blocks the batcher actor. The task
//! always reports back (`Finished`, from a drop guard, so even a panic frees the instance's
//! pipeline slot); a batch that never reached a live worker goes back to the actor to be
//! queued again instead of failing. Once every client has gone the task returns, and
//! dropping the worker call cancels it (a running generator stops at its next `yield`).

use super::EngineError;
use super::batch::{build_work, split_outputs};
use super::executor::Executor;
use super::model::ModelConfig;
use super::response::{Answer, Delivered};
use super::scheduler::Admitted;
use super::stats::{BatchTimes, StatsRecorder};
use super::tensor::{Storage, Tensor};
use crate::worker::types::{Work, WorkOutput, WorkerError};
use crate::worker::{StreamItem, WorkChunk, WorkStream};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a batch task tells the batcher.
pub enum Outcome {
    /// The batch is over (answered, failed, or abandoned by all its clients).
    Finished { idx: usize, batch_id: u64 },
    /// The instance could not start it: run it elsewhere.
    NotStarted {
        idx: usize,
        batch_id: u64,
        batch: Vec<Admitted>,
        reason: String,
    },
    /// The instance crashed running it and the model retries (`retry_on_worker_failure`):
    /// queue these requests again, once. The batch's `Finished` follows separately.
    Retry {
        idx: usize,
        batch: Vec<Admitted>,
        reason: String,
    },
}

/// Shared by every batch task of a model.
#[derive(Clone)]
pub struct BatchContext {
    pub config: Arc<ModelConfig>,
    pub stats: Arc<StatsRecorder>,
    pub declared_outputs: Arc<[String]>,
    pub outcomes: mpsc::UnboundedSender<Outcome>,
}

/// Sends `Finished` when dropped, unless the batch was handed back.
pub(super) struct FinishGuard {
    outcomes: mpsc::UnboundedSender<Outcome>,
    idx: usize,
    batch_id: u64,
    pub(super) armed: bool,
}

impl FinishGuard {
    pub(super) fn new(ctx: &BatchContext, idx: usize, batch_id: u64) -> Self {
        FinishGuard {
            outcomes: ctx.outcomes.clone(),
            idx,
            batch_id,
            armed: true,
        }
    }
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if self.armed {
            // The actor may have stopped; nobody needs the slot back then.
            let _ = self.outcomes.send(Outcome::Finished {
                idx: self.idx,
                batch_id: self.batch_id,
            });
        }
    }
}

/// Runs `batch` on `exec` (instance `idx`) and answers every request of it.
pub async fn run_batch(
    ctx: BatchContext,
    idx: usize,
    batch_id: u64,
    exec: Arc<dyn Executor>,
    mut batch: Vec<Admitted>,
) {
    let mut guard = FinishGuard::new(&ctx, idx, batch_id);
    let batching = ctx.config.max_batch_size > 0;
    let started = Instant::now();
    read_client_inputs(&ctx, &mut batch, started).await;
    if batch.is_empty() {
        return;
    }
    let work = build_work(&batch, batching);
    let mut run = Run {
        started,
        rows: work.batch_size,
        staged: staged_bytes(&work),
        built: Instant::now(),
        inputs_counted: false,
        delivered: 0,
        delivering: Duration::ZERO,
        failed: vec![None; batch.len()],
    };

    // Dropping the call (every client gone) cancels it in the worker if it has not started;
    // dropping the stream later cancels a running generator.
    let mut stream = tokio::select! {
        s = worker_call(&exec, work, ctx.config.streaming) => s,
        _ = all_gone(&mut batch, &run.failed) => return,
    };
    // A plain model's one chunk, held until its end so both reach the client together.
    let mut last: Option<Vec<Vec<Tensor>>> = None;
    let result = loop {
        let item = tokio::select! {
            biased;
            item = stream.next() => item,
            _ = all_gone(&mut batch, &run.failed) => return,
        };
        match item {
            Some(Ok(StreamItem::Chunk(chunk))) => {
                let at = Instant::now();
                run.count_inputs(&ctx);
                ctx.stats
                    .metrics()
                    .shm_out(chunk.outputs.iter().map(|t| t.byte_len() as u64).sum());
                let parts =
                    match split_outputs(&batch, chunk.outputs, &ctx.declared_outputs, batching) {
                        Ok(parts) => parts,
                        Err(e) => {
                            break Err(EngineError::BadOutput {
                                model: ctx.config.name.clone(),
                                message: e.to_string(),
                            });
                        }
                    };
                if stream.ends_next() {
                    last = Some(parts);
                    run.delivered += 1;
                    continue;
                }
                run.deliver(&ctx, &mut batch, parts).await;
                // Passed on: the worker may write its next chunk.
                drop(chunk.receipt);
                run.delivering += at.elapsed();
                if run.nobody_waits(&batch) {
                    return run.finish_failed(&ctx, batch);
                }
            }
            Some(Ok(StreamItem::End { compute_ns })) => break Ok(compute_ns),
            Some(Err(WorkerError::NotStarted { reason })) if run.delivered == 0 => {
                guard.armed = false;
                let _ = ctx.outcomes.send(Outcome::NotStarted {
                    idx,
                    batch_id,
                    batch,
                    reason,
                });
                return;
            }
            Some(Err(WorkerError::Crashed { status }))
                if run.delivered == 0 && ctx.config.faults.retry_on_worker_failure =>
            {
                // Each request gets one more try; a client already gone needs none.
                let (again, failed): (Vec<Admitted>, Vec<Admitted>) = std::mem::take(&mut batch)
                    .into_iter()
                    .partition(|p| !p.retried && !p.is_cancelled());
                batch = failed;
                run.failed = vec![None; batch.len()];
                if !again.is_empty() {
                    let _ = ctx.outcomes.send(Outcome::Retry {
                        idx,
                        batch: again,
                        reason: status.clone(),
                    });
                }
                break Err(worker_error(
                    &ctx.config.name,
                    WorkerError::Crashed { status },
                ));
            }
            Some(Err(e)) => {
                match &e {
                    WorkerError::ExecutionTimeout { .. } => ctx.stats.metrics().execution_timeout(),
                    WorkerError::Plugin { .. } => run.count_inputs(&ctx),
                    _ => {}
                }
                break Err(worker_error(&ctx.config.name, e));
            }
            None => break Err(EngineError::ShuttingDown),
        }
    };
    if let Ok(compute_ns) = result {
        run.record_batch(&ctx, compute_ns);
    }
    run.finish(&ctx, batch, result.map(|_| last));
}

/// Puts together what a batch of several requests needs from clients' shared memory: each
/// input still in a client's segment is read now (`batch::read_client_inputs`). A request
/// whose client shrank its segment since it was decoded is answered with that error alone
/// and leaves the batch; the others run. A request alone keeps its inputs where they are.
/// The reads (`pread`, up to `--max-tensor-bytes` per input) run on a blocking thread, never
/// on one of the runtime's.
async fn read_client_inputs(ctx: &BatchContext, batch: &mut Vec<Admitted>, started: Instant) {
    let in_client = |p: &Admitted| {
        p.inputs
            .iter()
            .any(|t| matches!(t.storage, Storage::Client(_)))
    };
    if batch.len() < 2 || !batch.iter().any(in_client) {
        return;
    }
    let taken = std::mem::take(batch);
    let read = tokio::task::spawn_blocking(move || {
        taken
            .into_iter()
            .map(|mut p| {
                let read = super::batch::read_client_inputs(&mut p);
                (p, read)
            })
            .collect::<Vec<_>>()
    })
    .await;
    // Only a panic or a runtime shutting down loses the batch; its sinks, dropped with it,
    // answer each request that it was not run.
    let Ok(read) = read else { return };
    let mut kept = Vec::with_capacity(read.len());
    for (p, read) in read {
        match read {
            Ok(()) => kept.push(p),
            Err(message) => {
                ctx.stats.record_request(
                    false,
                    started.saturating_duration_since(p.enqueued),
                    p.enqueued.elapsed(),
                );
                p.sink.finish(Err(EngineError::ClientMemory(message)));
            }
        }
    }
    *batch = kept;
}

/// The worker call for a batch. A generator model's streams its chunks; a plain model's one
/// answer is read as a stream of one chunk, so both are answered by the same loop.
async fn worker_call(exec: &Arc<dyn Executor>, work: Work, streaming: bool) -> Call {
    if streaming {
        Call::Stream(exec.execute_stream(work).await)
    } else {
        Call::Once(Once::Answer(exec.execute(work).await))
    }
}

/// What a worker call gives back, read item by item.
enum Call {
    Stream(WorkStream),
    Once(Once),
}

/// A plain model's one answer as stream items (no channel in between).
enum Once {
    Answer(Result<WorkOutput, WorkerError>),
    End { compute_ns: u64 },
    Done,
}

impl Call {
    /// The next item is known to be the end (a plain model's answer after its chunk).
    fn ends_next(&self) -> bool {
        matches!(self, Call::Once(Once::End { .. }))
    }

    async fn next(&mut self) -> Option<Result<StreamItem, WorkerError>> {
        let once = match self {
            Call::Stream(stream) => return stream.next().await,
            Call::Once(once) => once,
        };
        match std::mem::replace(once, Once::Done) {
            Once::Answer(Ok(out)) => {
                *once = Once::End {
                    compute_ns: out.compute_ns,
                };
                Some(Ok(StreamItem::Chunk(WorkChunk {
                    outputs: out.outputs,
                    receipt: None,
                })))
            }
            Once::Answer(Err(e)) => Some(Err(e)),
            Once::End { compute_ns } => Some(Ok(StreamItem::End { compute_ns })),
            Once::Done => None,
        }
    }
}

/// Resolves once every client still served (not failed) has gone.
async fn all_gone(batch: &mut [Admitted], failed: &[Option<EngineError>]) {
    let waits = batch
        .iter_mut()
        .zip(failed)
        .filter(|(_, f)| f.is_none())
        .map(|(p, _)| p.sink.closed());
    futures::future::join_all(waits).await;
}

/// The bookkeeping of one batch while it runs.
struct Run {
    started: Instant,
    /// Inputs built; the worker call starts here.
    built: Instant,
    rows: u32,
    staged: u64,
    inputs_counted: bool,
    /// Chunks handed on so far; before the first, a batch may still run elsewhere.
    delivered: usize,
    /// Time spent splitting chunks and handing them on (not the worker's).
    delivering: Duration,
    /// Per request: the error it already ended with (its client stopped reading).
    failed: Vec<Option<EngineError>>,
}

impl Run {
    /// Inputs count as staged once the worker has answered (a chunk or a plugin error).
    fn count_inputs(&mut self, ctx: &BatchContext) {
        if !self.inputs_counted {
            self.inputs_counted = true;
            ctx.stats.metrics().shm_in(self.staged);
        }
    }

    /// Hands each request its part of one chunk.
    async fn deliver(
        &mut self,
        ctx: &BatchContext,
        batch: &mut [Admitted],
        parts: Vec<Vec<Tensor>>,
    ) {
        for ((p, outputs), failed) in batch.iter_mut().zip(parts).zip(&mut self.failed) {
            if failed.is_some() {
                continue;
            }
            let answer = Answer {
                outputs,
                batch_size: self.rows,
            };
            let within = p.deadline.saturating_duration_since(p.enqueued);
            // A gone client is noticed by `nobody_waits` or answered at the end.
            if let Delivered::Stalled(after) = p.sink.send(answer, within).await {
                *failed = Some(EngineError::Timeout {
                    model: ctx.config.name.clone(),
                    after,
                });
            }
        }
        self.delivered += 1;
    }

    /// Every client has gone or stopped reading: the rest of the work is for nobody.
    fn nobody_waits(&self, batch: &[Admitted]) -> bool {
        batch
            .iter()
            .zip(&self.failed)
            .all(|(p, f)| f.is_some() || p.is_cancelled())
    }

    fn record_batch(&self, ctx: &BatchContext, compute_ns: u64) {
        let infer = Duration::from_nanos(compute_ns);
        let call = self.built.elapsed().saturating_sub(self.delivering);
        ctx.stats.record_batch(BatchTimes {
            rows: self.rows,
            input: self.built - self.started,
            infer,
            output: call.saturating_sub(infer) + self.delivering,
            call,
        });
    }

    /// Answers every request: its own error if it has one, else `result`, with its part of
    /// a held last chunk. Recorded before answering, so a client that reads the statistics
    /// after its answer finds itself counted.
    fn finish(
        self,
        ctx: &BatchContext,
        batch: Vec<Admitted>,
        result: Result<Option<Vec<Vec<Tensor>>>, EngineError>,
    ) {
        let (result, mut last) = match result {
            Ok(last) => (Ok(()), last.map(Vec::into_iter)),
            Err(e) => (Err(e), None),
        };
        for (p, failed) in batch.into_iter().zip(self.failed) {
            let end = match failed {
                Some(e) => Err(e),
                None => result.clone(),
            };
            ctx.stats.record_request(
                end.is_ok(),
                self.started.saturating_duration_since(p.enqueued),
                p.enqueued.elapsed(),
            );
            match last.as_mut().and_then(Iterator::next) {
                Some(outputs) if end.is_ok() => p.sink.finish_with(Answer {
                    outputs,
                    batch_size: self.rows,
                }),
                _ => p.sink.finish(end),
            }
        }
    }

    /// Answers the requests that failed; the others' clients have gone.
    fn finish_failed(self, ctx: &BatchContext, batch: Vec<Admitted>) {
        for (p, failed) in batch.into_iter().zip(self.failed) {
            if let Some(e) = failed {
                ctx.stats.record_request(
                    false,
                    self.started.saturating_duration_since(p.enqueued),
                    p.enqueued.elapsed(),
                );
                p.sink.finish(Err(e));
            }
        }
    }
}

/// Tensor bytes a batch puts into the worker's input arena.
fn staged_bytes(work: &Work) -> u64 {
    let bytes: usize = work
        .inputs
        .iter()
        .map(|i| match &i.storage {
            Storage::Client(slice) => slice.len,
            Storage::Core => i.parts.iter().map(|p| p.len()).sum(),
        })
        .sum();
    bytes as u64
}

/// Maps a worker-layer failure to what the client is told.
pub(super) fn worker_error(model: &str, e: WorkerError) -> EngineError {
    let model = model.to_string();
    match e {
        WorkerError::Plugin { message, .. } => EngineError::Plugin { model, message },
        WorkerError::TooLarge(message) => EngineError::BadOutput { model, message },
        WorkerError::ClientMemory(message) => EngineError::ClientMemory(message),
        WorkerError::NotReady { state } | WorkerError::NotStarted { reason: state } => {
            EngineError::NotReady { model, state }
        }
        // Cancelled only when every client of the batch has gone; nobody reads this.
        WorkerError::ShuttingDown | WorkerError::Cancelled => EngineError::ShuttingDown,
        e @ (WorkerError::Crashed { .. }
        | WorkerError::ExecutionTimeout { .. }
        | WorkerError::Protocol(_)) => EngineError::WorkerFailed {
            model,
            reason: e.to_string(),
        },
    }
}
