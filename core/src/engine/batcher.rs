//! The per-model batcher actor: owns the model's queue and its instances' load, forms
//! batches and dispatches each to the least-loaded ready instance.
//!
//! Flow: `Engine::infer` sends `Command::Enqueue`; the actor wakes on that, on instance
//! events (state changes, finished batches) and on the earliest batching or request
//! deadline, then calls `dispatch`. Each batch runs in its own task, which answers the
//! requests and reports `Event::BatchDone` so the actor frees the instance's slot.
//! A closed command channel (every engine handle dropped) stops the actor.

use super::EngineError;
use super::batch::{build_work, split_outputs};
use super::executor::Executor;
use super::model::{ModelConfig, ModelState};
use super::queue::{BatchPolicy, Decision, Pending, Queue};
use super::stats::{BatchTimes, StatsRecorder};
use crate::telemetry::metrics::ModelMetrics;
use crate::worker::types::{InstanceState, Work, WorkOutput, WorkerError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Batches a worker may hold at once: one running, one prepared behind it.
pub const PIPELINE_DEPTH: usize = 2;

pub enum Command {
    Enqueue(Pending),
    /// Answer once the queue is empty and no batch is running.
    Drain(oneshot::Sender<()>),
}

enum Event {
    Instance { idx: usize, state: InstanceState },
    BatchDone { idx: usize },
}

struct Slot {
    exec: Arc<dyn Executor>,
    state: InstanceState,
    outstanding: usize,
}

/// Shared with the batch tasks.
#[derive(Clone)]
struct BatchContext {
    config: Arc<ModelConfig>,
    stats: Arc<StatsRecorder>,
    declared_outputs: Arc<[String]>,
    events: mpsc::Sender<Event>,
}

pub struct Batcher {
    ctx: BatchContext,
    queue: Queue,
    slots: Vec<Slot>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<Event>,
    state: watch::Sender<ModelState>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// When the forming batch must be released, if one is forming.
    release_at: Option<Instant>,
}

impl Batcher {
    /// Starts the actor for `config` over `instances`; returns its command sender.
    pub fn spawn(
        config: Arc<ModelConfig>,
        instances: Vec<Arc<dyn Executor>>,
        stats: Arc<StatsRecorder>,
        state: watch::Sender<ModelState>,
        queue_capacity: usize,
    ) -> mpsc::Sender<Command> {
        let (cmd_tx, cmd_rx) = mpsc::channel(queue_capacity.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(64 + instances.len() * 4);
        for (idx, exec) in instances.iter().enumerate() {
            tokio::spawn(forward_states(idx, exec.state(), ev_tx.clone()));
        }
        let policy = BatchPolicy {
            max_batch_size: config.max_batch_size,
            max_queue_delay: config.max_queue_delay,
        };
        let declared_outputs: Arc<[String]> =
            config.outputs.iter().map(|o| o.name.clone()).collect();
        let slots = instances
            .into_iter()
            .map(|exec| Slot {
                state: exec.state().borrow().clone(),
                exec,
                outstanding: 0,
            })
            .collect();
        let batcher = Batcher {
            ctx: BatchContext {
                config,
                stats,
                declared_outputs,
                events: ev_tx,
            },
            queue: Queue::new(policy),
            slots,
            commands: cmd_rx,
            events: ev_rx,
            state,
            drain_waiters: Vec::new(),
            release_at: None,
        };
        tokio::spawn(batcher.run());
        cmd_tx
    }

    async fn run(mut self) {
        self.publish_state();
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => self.on_event(ev),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Enqueue(p)) => self.queue.push(p),
                    Some(Command::Drain(tx)) => self.drain_waiters.push(tx),
                    None => break,
                },
                _ = sleep_until(wake), if wake.is_some() => {}
            }
            self.expire();
            self.dispatch();
            self.finish_drain_if_idle();
        }
        self.fail_all_queued(EngineError::ShuttingDown);
        for slot in &self.slots {
            slot.exec.shutdown().await;
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        match (self.release_at, self.queue.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::BatchDone { idx } => {
                if let Some(slot) = self.slots.get_mut(idx) {
                    slot.outstanding = slot.outstanding.saturating_sub(1);
                }
            }
            Event::Instance { idx, state } => {
                if let Some(slot) = self.slots.get_mut(idx) {
                    slot.state = state;
                }
                self.publish_state();
                let failed = match &*self.state.borrow() {
                    ModelState::Failed { error, .. } => Some(error.clone()),
                    _ => None,
                };
                if let Some(error) = failed {
                    let model = self.ctx.config.name.clone();
                    self.fail_all_queued(EngineError::NotReady {
                        model,
                        state: format!("FAILED: {error}"),
                    });
                }
            }
        }
    }

    /// The model's state follows its instances: ready if any instance is.
    fn publish_state(&self) {
        let next = model_state(self.slots.iter().map(|s| &s.state));
        self.state.send_if_modified(|cur| {
            // Stopping is final: instances winding down must not make the model look loading again.
            if *cur == ModelState::Stopping || *cur == next {
                return false;
            }
            *cur = next;
            true
        });
    }

    fn expire(&mut self) {
        let expired = self.queue.expire(Instant::now());
        for p in expired.timed_out {
            let waited = p.enqueued.elapsed();
            self.ctx.stats.record_request(false, waited, waited);
            let _ = p.reply.send(Err(EngineError::Timeout {
                model: self.ctx.config.name.clone(),
                after: p.deadline.saturating_duration_since(p.enqueued),
            }));
        }
    }

    /// Least-loaded ready instance with a free pipeline slot, ties broken by index.
    fn pick_instance(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == InstanceState::Ready && s.outstanding < PIPELINE_DEPTH)
            .min_by_key(|(_, s)| s.outstanding)
            .map(|(i, _)| i)
    }

    fn dispatch(&mut self) {
        self.release_at = None;
        while let Some(idx) = self.pick_instance() {
            // A busy instance only gets a full batch in advance; partial batches keep
            // filling until some instance is idle.
            let full_only = self.slots[idx].outstanding > 0;
            match self.queue.next_batch(Instant::now(), full_only) {
                Decision::Empty => break,
                Decision::WaitUntil(at) => {
                    if !full_only {
                        self.release_at = Some(at);
                    }
                    break;
                }
                Decision::Batch(batch) => self.launch(idx, batch),
            }
        }
    }

    fn launch(&mut self, idx: usize, mut batch: Vec<Pending>) {
        let slot = &mut self.slots[idx];
        slot.outstanding += 1;
        for p in &mut batch {
            // The request leaves the queue: its place is free for the next one.
            p.permit = None;
        }
        tokio::spawn(run_batch(self.ctx.clone(), idx, slot.exec.clone(), batch));
    }

    fn finish_drain_if_idle(&mut self) {
        if self.drain_waiters.is_empty() {
            return;
        }
        if self.queue.is_empty() && self.slots.iter().all(|s| s.outstanding == 0) {
            for tx in self.drain_waiters.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    fn fail_all_queued(&mut self, err: EngineError) {
        for p in self.queue.drain_all() {
            let _ = p.reply.send(Err(err.clone()));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Turns an instance's watch channel into batcher events; ends with the instance.
async fn forward_states(
    idx: usize,
    mut rx: watch::Receiver<InstanceState>,
    tx: mpsc::Sender<Event>,
) {
    while rx.changed().await.is_ok() {
        let state = rx.borrow_and_update().clone();
        if tx.send(Event::Instance { idx, state }).await.is_err() {
            break;
        }
    }
}

/// Derives the model state from its instances' states.
pub fn model_state<'a>(states: impl Iterator<Item = &'a InstanceState>) -> ModelState {
    let states: Vec<&InstanceState> = states.collect();
    if states.iter().any(|s| **s == InstanceState::Ready) {
        return ModelState::Ready;
    }
    if let Some(InstanceState::Failed { error, traceback }) = states.first()
        && states
            .iter()
            .all(|s| matches!(s, InstanceState::Failed { .. }))
    {
        return ModelState::Failed {
            error: error.clone(),
            traceback: traceback.clone(),
        };
    }
    if states.iter().all(|s| matches!(s, InstanceState::Stopped)) && !states.is_empty() {
        return ModelState::Stopping;
    }
    let restarting = states.iter().find_map(|s| match s {
        InstanceState::Restarting { reason } => Some(reason.clone()),
        _ => None,
    });
    match restarting {
        Some(reason) => ModelState::Unavailable { reason },
        None => ModelState::Loading,
    }
}

/// Runs one batch on one instance and answers its requests.
async fn run_batch(ctx: BatchContext, idx: usize, exec: Arc<dyn Executor>, batch: Vec<Pending>) {
    let batching = ctx.config.max_batch_size > 0;
    let started = Instant::now();
    let work = build_work(&batch, batching);
    let rows = work.batch_size;
    let staged = staged_bytes(&work);
    let built = Instant::now();
    let result = exec.execute(work).await;
    let returned = Instant::now();
    count_worker_call(ctx.stats.metrics(), staged, &result);

    let replies: Vec<Result<Vec<_>, EngineError>> = match result {
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
                    parts.into_iter().map(Ok).collect()
                }
                Err(e) => {
                    let message = format!("returned unusable outputs: {e}");
                    vec![
                        Err(EngineError::Plugin {
                            model: ctx.config.name.clone(),
                            message
                        });
                        batch.len()
                    ]
                }
            }
        }
        Err(e) => vec![Err(worker_error(&ctx.config.name, e)); batch.len()],
    };

    for (p, reply) in batch.into_iter().zip(replies) {
        let ok = reply.is_ok();
        ctx.stats.record_request(
            ok,
            started.saturating_duration_since(p.enqueued),
            p.enqueued.elapsed(),
        );
        // The client may have gone; nobody to tell then.
        let _ = p.reply.send(reply);
    }
    let _ = ctx.events.send(Event::BatchDone { idx }).await;
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
fn worker_error(model: &str, e: WorkerError) -> EngineError {
    let model = model.to_string();
    match e {
        WorkerError::Plugin { message, .. } => EngineError::Plugin { model, message },
        WorkerError::TooLarge(message) => EngineError::Plugin { model, message },
        WorkerError::NotReady { state } => EngineError::NotReady { model, state },
        WorkerError::ShuttingDown => EngineError::ShuttingDown,
        e @ (WorkerError::Crashed { .. }
        | WorkerError::ExecutionTimeout { .. }
        | WorkerError::Protocol(_)) => EngineError::WorkerFailed {
            model,
            reason: e.to_string(),
        },
        WorkerError::Cancelled => EngineError::Internal("batch cancelled".into()),
    }
}
