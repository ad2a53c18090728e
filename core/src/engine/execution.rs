//! Running one formed batch on one instance and answering its requests.
//!
//! Each batch runs in its own task so a slow worker never blocks the batcher actor. The task
//! always reports back (`Finished`, from a drop guard, so even a panic frees the instance's
//! pipeline slot); a batch that never reached a live worker goes back to the actor to be
//! queued again instead of failing.

use super::EngineError;
use super::batch::{build_work, split_outputs};
use super::executor::Executor;
use super::model::ModelConfig;
use super::queue::{Answer, Pending, Reply};
use super::stats::{BatchTimes, StatsRecorder};
use crate::telemetry::metrics::ModelMetrics;
use crate::worker::types::{Work, WorkOutput, WorkerError};
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
        batch: Vec<Pending>,
        reason: String,
    },
    /// The instance crashed running it and the model retries (`retry_on_worker_failure`):
    /// queue these requests again, once. The batch's `Finished` follows separately.
    Retry {
        idx: usize,
        batch: Vec<Pending>,
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
    mut batch: Vec<Pending>,
) {
    if ctx.config.streaming {
        return super::stream::run_stream(ctx, idx, batch_id, exec, batch).await;
    }
    let mut guard = FinishGuard::new(&ctx, idx, batch_id);
    let batching = ctx.config.max_batch_size > 0;
    let started = Instant::now();
    let work = build_work(&batch, batching);
    let rows = work.batch_size;
    let staged = staged_bytes(&work);
    let built = Instant::now();

    // Dropping the execute future cancels the batch in the worker if it has not started.
    let result = {
        let all_gone = futures::future::join_all(batch.iter_mut().map(|p| p.reply.closed()));
        tokio::select! {
            r = exec.execute(work) => Some(r),
            _ = all_gone => None,
        }
    };
    let Some(result) = result else {
        return; // every client has gone: nobody to answer
    };
    let returned = Instant::now();
    count_worker_call(ctx.stats.metrics(), staged, &result);
    let result = match result {
        Err(WorkerError::Crashed { status }) if ctx.config.faults.retry_on_worker_failure => {
            // Each request gets one more try; a client already gone needs none.
            let (again, failed): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut batch)
                .into_iter()
                .partition(|p| !p.retried && !p.is_cancelled());
            batch = failed;
            if !again.is_empty() {
                let _ = ctx.outcomes.send(Outcome::Retry {
                    idx,
                    batch: again,
                    reason: status.clone(),
                });
            }
            Err(WorkerError::Crashed { status })
        }
        other => other,
    };

    let replies: Vec<Reply> = match result {
        Err(WorkerError::NotStarted { reason }) => {
            guard.armed = false;
            let _ = ctx.outcomes.send(Outcome::NotStarted {
                idx,
                batch_id,
                batch,
                reason,
            });
            return;
        }
        Err(e) => vec![Err(worker_error(&ctx.config.name, e)); batch.len()],
        Ok(out) => {
            let infer = Duration::from_nanos(out.compute_ns);
            match split_outputs(&batch, out.outputs, &ctx.declared_outputs, batching) {
                Ok(parts) => {
                    let output = (returned - built).saturating_sub(infer) + returned.elapsed();
                    ctx.stats.record_batch(BatchTimes {
                        rows,
                        input: built - started,
                        infer,
                        output,
                        call: returned - built,
                    });
                    parts
                        .into_iter()
                        .map(|outputs| {
                            Ok(Answer {
                                outputs,
                                batch_size: rows,
                            })
                        })
                        .collect()
                }
                Err(e) => {
                    let err = EngineError::BadOutput {
                        model: ctx.config.name.clone(),
                        message: e.to_string(),
                    };
                    vec![Err(err); batch.len()]
                }
            }
        }
    };

    for (p, reply) in batch.into_iter().zip(replies) {
        ctx.stats.record_request(
            reply.is_ok(),
            started.saturating_duration_since(p.enqueued),
            p.enqueued.elapsed(),
        );
        // The client may have gone; nobody to tell then.
        let _ = p.reply.send(reply);
    }
}

/// Tensor bytes a batch puts into the worker's input arena.
fn staged_bytes(work: &Work) -> u64 {
    let bytes: usize = work
        .inputs
        .iter()
        .flat_map(|i| i.parts.iter().map(|p| p.len()))
        .sum();
    bytes as u64
}

/// Shared-memory traffic and execution timeouts of one worker call. Inputs count once the
/// worker has answered (a result or a plugin error): only then were they surely staged.
fn count_worker_call(
    metrics: &ModelMetrics,
    staged: u64,
    result: &Result<WorkOutput, WorkerError>,
) {
    match result {
        Ok(out) => {
            metrics.shm_in(staged);
            metrics.shm_out(out.outputs.iter().map(|t| t.data.len() as u64).sum());
        }
        Err(WorkerError::Plugin { .. }) => metrics.shm_in(staged),
        Err(WorkerError::ExecutionTimeout { .. }) => metrics.execution_timeout(),
        Err(_) => {}
    }
}

/// Maps a worker-layer failure to what the client is told.
pub(super) fn worker_error(model: &str, e: WorkerError) -> EngineError {
    let model = model.to_string();
    match e {
        WorkerError::Plugin { message, .. } => EngineError::Plugin { model, message },
        WorkerError::TooLarge(message) => EngineError::BadOutput { model, message },
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
