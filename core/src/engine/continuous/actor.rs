//! The continuous-batching actor: one task per model that owns everything (no locks):
//! the requests not yet placed, each instance's `Policy` and text side, every running
//! generation and the steps in flight.
//!
//! Loop: place waiting requests on the least-loaded usable instance (`Policy::add`), start
//! a step on every instance that has none in flight (`plan` -> `step_io::encode` ->
//! `Executor::execute`), then wait for whatever comes first: a step's result, a client
//! gone, a tokenizer loaded, an instance's state, a command or a deadline. New requests
//! therefore join the very next step of their instance while the current one runs: that
//! is continuous batching. A step's samples go to `Policy::complete` and through each
//! sequence's `TextStream`; each sequence that produced text or finished gets a response.
//!
//! Failures: a step the plugin raised in fails that step's sequences only (they are
//! cancelled, so the next plan releases them) and the instance keeps serving. A crashed
//! (or hung, or restarting) worker fails every sequence of its instance with
//! `WorkerFailed` (503): their KV is gone with the process, and a request that crashed the
//! worker must not crash its replacement too; the instance gets a fresh policy when it is
//! ready again. Requests not yet placed wait for any instance.

mod steps;

use super::params::Sampling;
use super::request::{GoneTx, Live, LiveParts};
use super::step_io;
use super::text_model::TextModel;
use crate::engine::EngineError;
use crate::engine::batcher::model_state;
use crate::engine::executor::Executor;
use crate::engine::model::{ModelConfig, ModelState};
use crate::engine::scheduler::{Admitted, Command, SchedulerContext};
use crate::engine::stats::{BatchTimes, StatsRecorder};
use crate::engine::wake_timer::WakeTimer;
use crate::llm::sched::{FinishReason, KvConfig, Policy, SchedConfig, StepPlan};
use crate::llm::text::Finish;
use crate::telemetry::panics::spawn_monitored;
use crate::worker::types::{InstanceState, WorkOutput, WorkerError};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// An instance's text side.
enum Text {
    /// Not ready, or not asked yet.
    None,
    Loading,
    Ready(Arc<TextModel>),
    /// Its declaration cannot be served (no declaration, a tokenizer that does not load, a
    /// KV the policy refuses): the reason, for the model's state.
    Broken(String),
}

struct Instance {
    exec: Arc<dyn Executor>,
    state: InstanceState,
    /// Bumped whenever the worker behind it may change (each ready, each failure), so a
    /// late result (a step, a tokenizer) meant for an earlier worker is ignored.
    generation: u64,
    text: Text,
    policy: Option<Policy>,
    /// The step in flight, if any.
    stepping: Option<StepPlan>,
    /// Generations placed on it (waiting or running).
    load: usize,
    /// Its policy's preemption count already added to the metric.
    preemptions_seen: u64,
}

impl Instance {
    fn usable(&self) -> bool {
        self.state == InstanceState::Ready && self.policy.is_some()
    }
}

struct StepDone {
    idx: usize,
    generation: u64,
    result: Result<WorkOutput, WorkerError>,
    call: Duration,
}

struct Loaded {
    idx: usize,
    generation: u64,
    result: Result<Arc<TextModel>, String>,
}

pub struct ContinuousBatcher {
    config: Arc<ModelConfig>,
    stats: Arc<StatsRecorder>,
    state: watch::Sender<ModelState>,
    instances: Vec<Instance>,
    commands: mpsc::Receiver<Command>,
    states: mpsc::Receiver<(usize, InstanceState)>,
    loaded_tx: mpsc::UnboundedSender<Loaded>,
    loaded: mpsc::UnboundedReceiver<Loaded>,
    gone_tx: GoneTx,
    gone: mpsc::UnboundedReceiver<u64>,
    /// Admitted, not placed on an instance yet (none usable), in arrival order.
    pending: VecDeque<Admitted>,
    /// Every placed generation by sequence id (unique for the actor's life).
    live: HashMap<u64, Live>,
    steps: FuturesUnordered<BoxFuture<'static, StepDone>>,
    /// Text sides already loaded, by declaration (instances of a model share one).
    texts: Vec<Arc<TextModel>>,
    next_seq: u64,
    drain_waiters: Vec<oneshot::Sender<()>>,
    timer: WakeTimer,
    ever_ready: bool,
    aborted: bool,
}

impl ContinuousBatcher {
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
        for (idx, exec) in instances.iter().enumerate() {
            tokio::spawn(forward_states(idx, exec.state(), state_tx.clone()));
        }
        let (loaded_tx, loaded) = mpsc::unbounded_channel();
        let (gone_tx, gone) = mpsc::unbounded_channel();
        let instances = instances
            .into_iter()
            .map(|exec| Instance {
                state: InstanceState::Starting,
                exec,
                generation: 0,
                text: Text::None,
                policy: None,
                stepping: None,
                load: 0,
                preemptions_seen: 0,
            })
            .collect();
        let actor = ContinuousBatcher {
            config,
            stats,
            state,
            instances,
            commands,
            states: state_rx,
            loaded_tx,
            loaded,
            gone_tx,
            gone,
            pending: VecDeque::new(),
            live: HashMap::new(),
            steps: FuturesUnordered::new(),
            texts: Vec::new(),
            next_seq: 0,
            drain_waiters: Vec::new(),
            timer: WakeTimer::new(clock),
            ever_ready: false,
            aborted: false,
        };
        // As the batcher: a panic (a bug) turns the model UNAVAILABLE with the reason.
        let state = actor.state.clone();
        let model = actor.config.name.clone();
        spawn_monitored("model scheduler", actor.run(), move |message| {
            state.send_replace(ModelState::Unavailable {
                reason: format!(
                    "internal error: the scheduler of model '{model}' panicked ({message}); \
                     unload and load the model, or restart the server"
                ),
            });
        });
    }

    async fn run(mut self) {
        // The instances' current states (the watch only reports changes).
        for idx in 0..self.instances.len() {
            let state = self.instances[idx].exec.state().borrow().clone();
            self.on_instance_state(idx, state);
        }
        self.publish_state();
        loop {
            self.place_pending();
            self.start_steps();
            self.finish_drain_if_idle();
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(done) = self.steps.next(), if !self.steps.is_empty() => self.on_step(done),
                Some(seq_id) = self.gone.recv() => self.on_gone(seq_id),
                Some(loaded) = self.loaded.recv() => self.on_loaded(loaded),
                Some((idx, state)) = self.states.recv() => {
                    self.on_instance_state(idx, state);
                    self.publish_state();
                }
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = self.timer.sleep_until(wake), if wake.is_some() => {}
            }
            self.take_ready_events();
            self.expire();
            // After every event, not only after steps: a crash, an abort or a request
            // waiting for an instance changes the gauges too.
            self.record_scheduler();
        }
        self.abort();
        for inst in &self.instances {
            inst.exec.shutdown().await;
        }
    }

    /// Everything that has arrived meanwhile, before the next plan: requests that came
    /// while a step ran join the very next step, even when steps finish back to back.
    fn take_ready_events(&mut self) {
        while let Ok(seq_id) = self.gone.try_recv() {
            self.on_gone(seq_id);
        }
        while let Ok(cmd) = self.commands.try_recv() {
            self.on_command(cmd);
        }
    }

    fn model(&self) -> String {
        self.config.name.clone()
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Enqueue(p) if self.aborted => p.sink.finish(Err(EngineError::ShuttingDown)),
            Command::Enqueue(p) => self.pending.push_back(p),
            Command::Drain(tx) => self.drain_waiters.push(tx),
            Command::Abort(done) => {
                self.abort();
                let _ = done.send(());
            }
            // Delivery tasks report clients gone themselves (`on_gone`).
            Command::Wake => {}
            #[cfg(test)]
            Command::Panic => panic!("injected by a test"),
        }
    }

    /// Fails what waits and what runs (503), drops the steps in flight, refuses what comes.
    fn abort(&mut self) {
        self.aborted = true;
        for p in self.pending.drain(..) {
            p.sink.finish(Err(EngineError::ShuttingDown));
        }
        for (_, live) in self.live.drain() {
            self.stats
                .record_request(false, Duration::ZERO, live.enqueued.elapsed());
            live.end(Err(EngineError::ShuttingDown));
        }
        self.steps = FuturesUnordered::new();
        for inst in &mut self.instances {
            inst.generation += 1;
            inst.stepping = None;
            inst.policy = None;
            inst.load = 0;
        }
    }

    fn on_instance_state(&mut self, idx: usize, state: InstanceState) {
        let Some(inst) = self.instances.get_mut(idx) else {
            return;
        };
        let was_ready = inst.state == InstanceState::Ready;
        inst.state = state.clone();
        match state {
            InstanceState::Ready if !was_ready => {
                self.ever_ready = true;
                self.start_text(idx);
            }
            InstanceState::Ready => {
                // Ready again after a crash whose Restarting this actor never saw (a watch
                // keeps only the latest state): the new worker needs a fresh policy.
                if let (None, Text::Ready(text)) = (&inst.policy, &inst.text) {
                    let text = text.clone();
                    self.text_ready(idx, text);
                }
            }
            other if was_ready => {
                let reason = match other {
                    InstanceState::Restarting { reason } => reason,
                    InstanceState::Failed { error, .. } => error,
                    InstanceState::Stopped => "its worker stopped".into(),
                    _ => "its worker is starting again".into(),
                };
                self.instance_lost(idx, &reason);
                if let Some(inst) = self.instances.get_mut(idx) {
                    inst.policy = None;
                    inst.text = Text::None;
                }
            }
            _ => {}
        }
    }

    /// The model's state from its instances', FAILED when no ready instance can serve its
    /// declaration; a FAILED model fails what waits for an instance.
    fn publish_state(&mut self) {
        let mut state = model_state(self.instances.iter().map(|i| &i.state), self.ever_ready);
        let ready: Vec<&Instance> = self
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Ready)
            .collect();
        let broken = ready.iter().find_map(|i| match &i.text {
            Text::Broken(reason) => Some(reason.clone()),
            _ => None,
        });
        if let Some(error) = broken
            && ready.iter().all(|i| matches!(i.text, Text::Broken(_)))
        {
            state = ModelState::Failed {
                error,
                traceback: String::new(),
            };
        }
        if let ModelState::Failed { error, .. } = &state {
            for p in self.pending.drain(..) {
                self.stats
                    .record_request(false, Duration::ZERO, p.enqueued.elapsed());
                p.sink.finish(Err(EngineError::NotReady {
                    model: self.config.name.clone(),
                    state: format!("FAILED: {error}"),
                }));
            }
        }
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    /// Reads a ready instance's declaration and loads its text side (cached per
    /// declaration; a new one is loaded on a blocking thread).
    fn start_text(&mut self, idx: usize) {
        let inst = &mut self.instances[idx];
        inst.generation += 1;
        let Some(decl) = inst.exec.llm() else {
            inst.text = Text::Broken(format!(
                "instance {idx} is ready but declared no LLM (its worker's `ready` carries no \
                 `llm`): is the plugin an um.LLM subclass?"
            ));
            return;
        };
        if let Some(text) = self.texts.iter().find(|t| t.decl == *decl).cloned() {
            self.text_ready(idx, text);
            return;
        }
        inst.text = Text::Loading;
        let (tx, generation) = (self.loaded_tx.clone(), inst.generation);
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || TextModel::load(&decl).map(Arc::new))
                .await
                .unwrap_or_else(|e| Err(format!("loading the tokenizer failed: {e}")));
            let _ = tx.send(Loaded {
                idx,
                generation,
                result,
            });
        });
    }

    fn on_loaded(&mut self, loaded: Loaded) {
        let Some(inst) = self.instances.get_mut(loaded.idx) else {
            return;
        };
        if inst.generation != loaded.generation || inst.state != InstanceState::Ready {
            return;
        }
        match loaded.result {
            Ok(text) => {
                self.texts.push(text.clone());
                self.text_ready(loaded.idx, text);
            }
            Err(reason) => {
                tracing::error!(model = %self.config.name, instance = loaded.idx, "{reason}");
                inst.text = Text::Broken(reason);
            }
        }
        self.publish_state();
    }

    /// The instance can serve: a fresh policy for its (fresh) worker.
    fn text_ready(&mut self, idx: usize, text: Arc<TextModel>) {
        let limits = self.config.llm.unwrap_or_default();
        let kv = KvConfig::from(text.decl.kv);
        let mut max_num_seqs = limits.max_num_seqs.max(1);
        if let KvConfig::Slots { num_slots, .. } = kv {
            max_num_seqs = max_num_seqs.min(num_slots);
        }
        let config = SchedConfig {
            max_num_batched_tokens: limits.max_num_batched_tokens.max(max_num_seqs),
            max_num_seqs,
            max_model_len: text.decl.max_model_len,
            kv,
            prefix_caching: true,
        };
        let inst = &mut self.instances[idx];
        match Policy::new(config) {
            Ok(policy) => {
                inst.policy = Some(policy);
                inst.text = Text::Ready(text);
            }
            Err(e) => inst.text = Text::Broken(format!("the declared KV cannot be scheduled: {e}")),
        }
        inst.stepping = None;
        inst.load = 0;
        inst.preemptions_seen = 0;
    }

    /// Places waiting requests on the least-loaded usable instances.
    fn place_pending(&mut self) {
        while !self.pending.is_empty() {
            let best = self
                .instances
                .iter()
                .enumerate()
                .filter(|(_, i)| i.usable())
                .min_by_key(|(_, i)| i.load)
                .map(|(idx, _)| idx);
            let Some(idx) = best else {
                return;
            };
            if let Some(request) = self.pending.pop_front() {
                self.place(request, idx);
            }
        }
    }

    fn place(&mut self, request: Admitted, idx: usize) {
        if request.sink.is_closed() {
            return;
        }
        let model = self.model();
        let inst = &mut self.instances[idx];
        let (Text::Ready(text), Some(policy)) = (&inst.text, inst.policy.as_mut()) else {
            self.pending.push_front(request);
            return;
        };
        let text = text.clone();
        let seq_id = self.next_seq;
        let prepared = text.prepare(&request).and_then(|mut p| {
            p.seq.seq_id = seq_id;
            policy.add(p.seq.clone()).map_err(|e| e.to_string())?;
            Ok(p)
        });
        let prepared = match prepared {
            Ok(p) => p,
            Err(message) => {
                self.stats
                    .record_request(false, Duration::ZERO, request.enqueued.elapsed());
                request
                    .sink
                    .finish(Err(EngineError::InvalidGeneration { model, message }));
                return;
            }
        };
        self.next_seq += 1;
        inst.load += 1;
        let parts = LiveParts {
            instance: idx,
            text,
            stream: prepared.stream,
            sampling: prepared.params.sampling,
            logprobs: prepared.params.logprobs,
            outputs: request.outputs,
            enqueued: request.enqueued,
            deadline: request.deadline,
            model,
            place: request.place,
        };
        let live = Live::new(
            parts,
            seq_id,
            request.sink,
            self.config.request_timeout,
            self.gone_tx.clone(),
        );
        self.live.insert(seq_id, live);
    }

    fn on_gone(&mut self, seq_id: u64) {
        if let Some(live) = self.live.remove(&seq_id) {
            let inst = &mut self.instances[live.instance];
            inst.load = inst.load.saturating_sub(1);
            if let Some(policy) = inst.policy.as_mut() {
                policy.cancel(seq_id);
            }
            self.stats
                .record_request(false, live.queue_time(), live.enqueued.elapsed());
        }
    }

    /// Requests past their deadline before their first response end with `Timeout` (after
    /// it, the client bounds the wait for each response); those whose client left go.
    fn expire(&mut self) {
        let now = Instant::now();
        let model = self.model();
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            if p.sink.is_closed() {
                continue;
            }
            if now >= p.deadline {
                let after = now - p.enqueued;
                self.stats.record_request(false, after, after);
                p.sink.finish(Err(EngineError::Timeout {
                    model: model.clone(),
                    after,
                }));
            } else {
                kept.push_back(p);
            }
        }
        self.pending = kept;
        let expired: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, l)| !l.answered && now >= l.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(live) = self.live.remove(&id) {
                let inst = &mut self.instances[live.instance];
                inst.load = inst.load.saturating_sub(1);
                if let Some(policy) = inst.policy.as_mut() {
                    policy.cancel(id);
                }
                let after = now - live.enqueued;
                end(
                    &self.stats,
                    live,
                    Err(EngineError::Timeout {
                        model: model.clone(),
                        after,
                    }),
                );
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let pending = self.pending.iter().map(|p| p.deadline);
        let live = self
            .live
            .values()
            .filter(|l| !l.answered)
            .map(|l| l.deadline);
        pending.chain(live).min()
    }

    fn finish_drain_if_idle(&mut self) {
        if !self.drain_waiters.is_empty()
            && self.pending.is_empty()
            && self.live.is_empty()
            && self.steps.is_empty()
        {
            for tx in self.drain_waiters.drain(..) {
                let _ = tx.send(());
            }
        }
    }
}

/// Sampling of a sequence the actor no longer tracks (it left during planning): greedy.
const GREEDY: Sampling = Sampling {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    seed: -1,
    logprobs: 0,
};

fn reason_of(finish: &Finish) -> FinishReason {
    match finish {
        Finish::StopId(_) | Finish::StopString(_) => FinishReason::Stop,
        Finish::MaxTokens | Finish::ModelLength => FinishReason::Length,
    }
}

/// Records the request, then ends it (a client reading its stats after its end finds
/// itself counted).
fn end(stats: &StatsRecorder, live: Live, result: Result<(), EngineError>) {
    let total = live.enqueued.elapsed();
    if result.is_ok() {
        stats.metrics().llm().finished(total);
    }
    stats.record_request(result.is_ok(), live.queue_time(), total);
    live.end(result);
}

/// Turns an instance's watch channel into actor events; ends with the instance.
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
