//! The dynamic batcher, the scheduler of every model today (`scheduler::SchedulerKind`): an
//! actor that owns the model's queue and its instances' load, forms batches (Triton
//! semantics, `queue.rs`) and dispatches each to the least-loaded ready instance.
//!
//! Flow: admission sends `Command::Enqueue` (`scheduler.rs`); the actor wakes on that, on
//! instance state changes, on batch outcomes (`execution.rs`) and on the earliest batching or
//! request deadline, then calls `dispatch`. A batch an instance could not start comes back
//! and is queued again at the head. `Abort` fails everything still waiting and cancels
//! running batches (shutdown after a drain timeout). A closed command channel (every engine
//! handle dropped) stops the actor. docs/schedulers.md walks through it as the worked
//! example of a scheduler.

use super::EngineError;
use super::batch::trace_ids;
use super::execution::{BatchContext, Outcome, run_batch};
use super::executor::Executor;
use super::model::ModelState;
use super::queue::{BatchPolicy, Decision, Queue};
use super::scheduler::{Admitted, Command, SchedulerContext};
use super::wake_timer::WakeTimer;
use crate::telemetry::panics::spawn_monitored;
use crate::worker::types::InstanceState;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

/// Batches a worker may hold beyond those it runs at once (its `Executor::capacity`): one
/// prepared behind them, so the next starts as soon as one ends.
pub const PIPELINE_AHEAD: usize = 1;

/// How long an instance that could not start a batch is passed over, unless its state
/// changes first (its crash is usually being reported at that moment).
const SUSPECT_FOR: Duration = Duration::from_millis(50);

struct Slot {
    exec: Arc<dyn Executor>,
    state: InstanceState,
    /// Batches the instance runs at once.
    capacity: usize,
    outstanding: usize,
    /// Not chosen before this instant (it just failed to start a batch).
    suspect_until: Option<Instant>,
}

pub struct Batcher {
    ctx: BatchContext,
    queue: Queue,
    slots: Vec<Slot>,
    commands: mpsc::Receiver<Command>,
    states: mpsc::Receiver<(usize, InstanceState)>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    state: watch::Sender<ModelState>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// When the forming batch must be released, if one is forming.
    release_at: Option<Instant>,
    /// Wakes the loop at `next_wake` with microsecond precision (batching delays).
    timer: WakeTimer,
    /// Running batch tasks, so `Abort` can cancel them.
    running: HashMap<u64, AbortHandle>,
    next_batch_id: u64,
    /// Some instance has been ready once: later outages are UNAVAILABLE, not LOADING.
    ever_ready: bool,
    aborted: bool,
}

impl Batcher {
    /// Starts the actor over the model's instances, taking its commands from `commands`.
    pub fn spawn(ctx: SchedulerContext, commands: mpsc::Receiver<Command>) {
        let SchedulerContext {
            config,
            instances,
            stats,
            state,
            clock,
        } = ctx;
        let (state_tx, state_rx) = mpsc::channel(16 + instances.len() * 4);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        for (idx, exec) in instances.iter().enumerate() {
            tokio::spawn(forward_states(idx, exec.state(), state_tx.clone()));
        }
        let policy = BatchPolicy {
            // A generator's chunks belong to one client: its requests run alone.
            max_batch_size: if config.streaming {
                0
            } else {
                config.max_batch_size
            },
            max_queue_delay: config.max_queue_delay,
        };
        let declared_outputs: Arc<[String]> =
            config.outputs.iter().map(|o| o.name.clone()).collect();
        let slots = instances
            .into_iter()
            .map(|exec| Slot {
                state: exec.state().borrow().clone(),
                capacity: exec.capacity().max(1),
                exec,
                outstanding: 0,
                suspect_until: None,
            })
            .collect();
        let batcher = Batcher {
            ctx: BatchContext {
                config,
                stats,
                declared_outputs,
                outcomes: out_tx,
            },
            queue: Queue::new(policy),
            slots,
            commands,
            states: state_rx,
            outcomes: out_rx,
            state,
            drain_waiters: Vec::new(),
            release_at: None,
            timer: WakeTimer::new(clock),
            running: HashMap::new(),
            next_batch_id: 0,
            ever_ready: false,
            aborted: false,
        };
        // A panic in the actor (a bug) must not leave the model looking ready while nothing
        // serves it: the model goes UNAVAILABLE with the reason, so readiness turns false,
        // and new requests are refused naming it (`admission`). Its waiting requests' sinks
        // were dropped with the actor: their clients got 503 already.
        let state = batcher.state.clone();
        let model = batcher.ctx.config.name.clone();
        spawn_monitored("model scheduler", batcher.run(), move |message| {
            state.send_replace(ModelState::Unavailable {
                reason: format!(
                    "internal error: the scheduler of model '{model}' panicked ({message}); \
                     unload and load the model, or restart the server"
                ),
            });
        });
    }

    async fn run(mut self) {
        self.publish_state();
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(outcome) = self.outcomes.recv() => self.on_outcome(outcome),
                Some((idx, state)) = self.states.recv() => self.on_instance_state(idx, state),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = self.timer.sleep_until(wake), if wake.is_some() => {}
            }
            self.expire();
            self.dispatch();
            self.finish_drain_if_idle();
        }
        self.abort();
        for slot in &self.slots {
            slot.exec.shutdown().await;
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Enqueue(p) if self.aborted => {
                p.sink.finish(Err(EngineError::ShuttingDown));
            }
            Command::Enqueue(p) => self.queue.push(p),
            Command::Drain(tx) => self.drain_waiters.push(tx),
            Command::Abort(done) => {
                self.abort();
                let _ = done.send(());
            }
            Command::Wake => {}
            #[cfg(test)]
            Command::Panic => panic!("injected by a test"),
        }
    }

    /// Fails what waits, cancels what runs (their clients get 503), refuses what comes.
    fn abort(&mut self) {
        self.aborted = true;
        self.fail_all_queued(EngineError::ShuttingDown);
        for (_, task) in self.running.drain() {
            task.abort();
        }
        for slot in &mut self.slots {
            slot.outstanding = 0;
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let suspect = if self.queue.is_empty() {
            None
        } else {
            self.slots.iter().filter_map(|s| s.suspect_until).min()
        };
        [self.release_at, self.queue.next_deadline(), suspect]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_outcome(&mut self, outcome: Outcome) {
        let (idx, batch_id) = match outcome {
            Outcome::Finished { idx, batch_id } => (idx, batch_id),
            Outcome::Retry { idx, batch, reason } => return self.retry(idx, batch, reason),
            Outcome::NotStarted {
                idx,
                batch_id,
                batch,
                reason,
            } => {
                tracing::debug!(model = %self.ctx.config.name, instance = idx, "batch not started ({reason}); queued again");
                if let Some(slot) = self.slots.get_mut(idx) {
                    slot.suspect_until = Some(Instant::now() + SUSPECT_FOR);
                }
                if self.aborted {
                    for p in batch {
                        p.sink.finish(Err(EngineError::ShuttingDown));
                    }
                } else {
                    self.queue.requeue_front(batch);
                }
                (idx, batch_id)
            }
        };
        if self.running.remove(&batch_id).is_some()
            && let Some(slot) = self.slots.get_mut(idx)
        {
            slot.outstanding = slot.outstanding.saturating_sub(1);
        }
    }

    /// Requests whose worker crashed under them go back to the head of the queue, once,
    /// for another instance or the restarted one; their deadlines still hold.
    fn retry(&mut self, idx: usize, mut batch: Vec<Admitted>, reason: String) {
        tracing::info!(model = %self.ctx.config.name, instance = idx, requests = batch.len(), "worker {reason}; retrying its requests once");
        if let Some(slot) = self.slots.get_mut(idx) {
            slot.suspect_until = Some(Instant::now() + SUSPECT_FOR);
        }
        if self.aborted {
            for p in batch {
                p.sink.finish(Err(EngineError::ShuttingDown));
            }
            return;
        }
        for p in &mut batch {
            p.retried = true;
        }
        self.queue.requeue_front(batch);
    }

    fn on_instance_state(&mut self, idx: usize, state: InstanceState) {
        if let Some(slot) = self.slots.get_mut(idx) {
            slot.state = state;
            slot.suspect_until = None;
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

    /// The model's state follows its instances: ready if any instance is.
    fn publish_state(&mut self) {
        self.ever_ready |= self.slots.iter().any(|s| s.state == InstanceState::Ready);
        let next = model_state(self.slots.iter().map(|s| &s.state), self.ever_ready);
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
            let after = p.deadline.saturating_duration_since(p.enqueued);
            p.sink.finish(Err(EngineError::Timeout {
                model: self.ctx.config.name.clone(),
                after,
            }));
        }
    }

    /// Least-loaded ready instance with a free pipeline slot, ties broken by index.
    fn pick_instance(&self, now: Instant) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.state == InstanceState::Ready
                    && s.outstanding < s.capacity + PIPELINE_AHEAD
                    && s.suspect_until.is_none_or(|t| now >= t)
            })
            .min_by_key(|(_, s)| s.outstanding)
            .map(|(i, _)| i)
    }

    fn dispatch(&mut self) {
        self.release_at = None;
        if self.aborted {
            return;
        }
        let now = Instant::now();
        while let Some(idx) = self.pick_instance(now) {
            // A busy instance (running all it can at once) only gets a full batch in advance;
            // partial batches keep filling until some instance has room to run one.
            let slot = &self.slots[idx];
            let full_only = slot.outstanding >= slot.capacity;
            match self.queue.next_batch(now, full_only) {
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

    fn launch(&mut self, idx: usize, mut batch: Vec<Admitted>) {
        let slot = &mut self.slots[idx];
        slot.outstanding += 1;
        for p in &mut batch {
            // The request leaves the queue: its place is free for the next one.
            p.place = None;
        }
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let span = batch_span(&self.ctx.config.name, idx, &batch);
        let run = run_batch(self.ctx.clone(), idx, batch_id, slot.exec.clone(), batch);
        let task = tokio::spawn(run.instrument(span));
        self.running.insert(batch_id, task.abort_handle());
    }

    fn finish_drain_if_idle(&mut self) {
        if !self.drain_waiters.is_empty() && self.queue.is_empty() && self.running.is_empty() {
            for tx in self.drain_waiters.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    fn fail_all_queued(&mut self, err: EngineError) {
        for p in self.queue.drain_all() {
            p.sink.finish(Err(err.clone()));
        }
    }
}

/// Turns an instance's watch channel into batcher events; ends with the instance.
async fn forward_states(
    idx: usize,
    mut rx: watch::Receiver<InstanceState>,
    tx: mpsc::Sender<(usize, InstanceState)>,
) {
    while rx.changed().await.is_ok() {
        let state = rx.borrow_and_update().clone();
        if tx.send((idx, state)).await.is_err() {
            break;
        }
    }
}

/// Derives the model state from its instances' states. Until some instance has been ready
/// once, restarts after failed setups still count as LOADING (FAILED ends it).
pub fn model_state<'a>(
    states: impl Iterator<Item = &'a InstanceState>,
    ever_ready: bool,
) -> ModelState {
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
    if !states.is_empty() && states.iter().all(|s| matches!(s, InstanceState::Stopped)) {
        return ModelState::Stopping;
    }
    let restarting = states.iter().find_map(|s| match s {
        InstanceState::Restarting { reason } => Some(reason.clone()),
        _ => None,
    });
    match restarting {
        Some(reason) if ever_ready => ModelState::Unavailable { reason },
        // Replacements starting after crashes: still UNAVAILABLE, not LOADING, so requests
        // keep queueing for them instead of being refused at the door.
        None if ever_ready => ModelState::Unavailable {
            reason: "its workers are starting again after a crash".into(),
        },
        _ => ModelState::Loading,
    }
}

/// The span of one worker call: a root span linked (`follows_from`) to the `infer` span of
/// each request in it, listing their trace ids and client request ids ("-" for none).
fn batch_span(model: &str, instance: usize, batch: &[Admitted]) -> tracing::Span {
    // DEBUG: only built when exported (OTLP) or logged at debug level; at tens of thousands
    // of requests per second, span bookkeeping is otherwise a measurable share of the path.
    let span = tracing::debug_span!(
        parent: None,
        "batch",
        model,
        instance,
        requests = batch.len(),
        rows = batch.iter().map(|p| p.rows).sum::<u32>(),
        trace_ids = tracing::field::Empty,
        request_ids = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let join = |items: Vec<String>| items.join(",");
    span.record(
        "trace_ids",
        join(trace_ids(batch).iter().map(ToString::to_string).collect()),
    );
    span.record(
        "request_ids",
        join(
            batch
                .iter()
                .map(|p| p.origin.id.clone().unwrap_or_else(|| "-".into()))
                .collect(),
        ),
    );
    for p in batch {
        span.follows_from(&p.origin.span);
    }
    span
}
