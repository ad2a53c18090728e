//! The seam between admission and scheduling: what every scheduler receives and must do.
//!
//! The engine admits a request once (`admission.rs`: model lookup, validation, readiness,
//! limits, deadline) and hands it, with the sink its responses go to, to the model's
//! scheduler. How the scheduler queues, groups and dispatches requests to the model's
//! instances is its own business; the engine only sends it `Command`s. A model's scheduler
//! is chosen when the model is spawned (`SchedulerKind::for_model`): the Triton dynamic
//! batcher (`batcher.rs`), or continuous batching (`continuous/`) for an `um.LLM` model. docs/schedulers.md is the contract a new
//! scheduler implements, with the batcher as the worked example.

use super::EngineError;
use super::batcher::Batcher;
use super::continuous::ContinuousBatcher;
use super::executor::Executor;
use super::model::{ModelConfig, ModelState};
use super::response::ResponseSink;
use super::stats::StatsRecorder;
use super::tensor::Tensor;
use super::wake_timer::WakeClock;
use crate::worker::client_shm::OutputTarget;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::time::Instant;

/// What the engine tells a model's scheduler. The channel is bounded by the model's queue
/// capacity: admission holds a queue place before it sends `Enqueue`, so it rarely waits.
// Nearly every command is an `Enqueue`: boxing it would add an allocation per request to save
// moving a couple of hundred bytes through the channel.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// An admitted request: answer it exactly once through its sink.
    Enqueue(Admitted),
    /// Answer once nothing is queued and nothing runs.
    Drain(oneshot::Sender<()>),
    /// Fail every waiting request, cancel running work and refuse new requests (503).
    Abort(oneshot::Sender<()>),
    /// A client went away: look at the waiting requests again so its place is freed now.
    Wake,
    /// Tests only: the scheduler panics, as a bug would make it.
    #[cfg(test)]
    Panic,
}

/// A request that passed admission: valid for its model, within its limits, with a deadline.
#[derive(Debug)]
pub struct Admitted {
    /// Inputs in the model's declared order.
    pub inputs: Vec<Tensor>,
    /// Outputs the client asked for (`None`: all), in its order.
    pub outputs: Option<Vec<String>>,
    /// Rows this request contributes (its first dimension, or 1 without batching).
    pub rows: u32,
    pub enqueued: Instant,
    /// Past it the request is answered `Timeout`; the scheduler answers a request still
    /// waiting at its deadline itself (the client's side bounds each response too).
    pub deadline: Instant,
    /// Where the responses and the end go; dropping it unanswered tells the client 503.
    pub sink: ResponseSink,
    /// One place in the model's queue; drop it when the request leaves the queue.
    pub place: Option<OwnedSemaphorePermit>,
    pub origin: Origin,
    /// Where the client wants outputs written (`InferRequest::output_targets`).
    pub targets: Vec<OutputTarget>,
    /// Already queued again after a worker crash (`retry_on_worker_failure`), or never to
    /// be (a generator's responses may already have reached its client): a crash fails it.
    pub retried: bool,
    /// The request's parameters (`InferRequest::parameters`): an LLM scheduler's sampling
    /// settings; the batcher ignores them.
    pub parameters: super::Parameters,
}

impl Admitted {
    /// The client stopped waiting (dropped its stream, disconnected, timed out).
    pub fn is_cancelled(&self) -> bool {
        self.sink.is_closed()
    }
}

/// Where a request came from, for the batch span: its client id, its trace and the span
/// it waits in (`follows_from` target).
#[derive(Debug)]
pub struct Origin {
    pub id: Option<String>,
    pub trace: Option<crate::telemetry::TraceId>,
    pub span: tracing::Span,
}

impl Default for Origin {
    fn default() -> Self {
        Origin {
            id: None,
            trace: None,
            span: tracing::Span::none(),
        }
    }
}

/// What a scheduler is given when its model is spawned.
pub struct SchedulerContext {
    pub config: Arc<ModelConfig>,
    /// The model's instances; the scheduler dispatches to them and stops them when its
    /// command channel closes.
    pub instances: Vec<Arc<dyn Executor>>,
    /// Triton statistics and metrics; the scheduler records every request and worker call.
    pub stats: Arc<StatsRecorder>,
    /// The model's state, derived from its instances (`batcher::model_state`); admission
    /// reads it for readiness, loads wait on it.
    pub state: watch::Sender<ModelState>,
    /// The clock of the scheduler's delays: the precise timerfd, or tokio's (paused in tests).
    pub clock: WakeClock,
}

/// The schedulers a model can be served by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    /// Triton's dynamic batcher: requests with matching shapes are concatenated along the
    /// batch dimension; a generator model's requests run one at a time.
    DynamicBatcher,
    /// Continuous batching of an `um.LLM` model: every step, the running sequences' next
    /// tokens and new requests' prompt chunks go to an instance as one worker call.
    ContinuousBatching,
}

impl SchedulerKind {
    /// The scheduler that serves `config`.
    pub fn for_model(config: &ModelConfig) -> SchedulerKind {
        if config.llm.is_some() {
            SchedulerKind::ContinuousBatching
        } else {
            SchedulerKind::DynamicBatcher
        }
    }

    /// Starts the scheduler's task over the model's instances. Must run inside a tokio runtime.
    pub fn spawn(self, ctx: SchedulerContext) -> Scheduler {
        let (tx, rx) = mpsc::channel(ctx.config.queue_capacity.max(1));
        match self {
            SchedulerKind::DynamicBatcher => Batcher::spawn(ctx, rx),
            SchedulerKind::ContinuousBatching => ContinuousBatcher::spawn(ctx, rx),
        }
        Scheduler { commands: tx }
    }
}

/// The engine's handle on a model's scheduler; cheap to clone. When every handle is dropped
/// the scheduler fails what it still holds and stops the model's instances.
#[derive(Clone)]
pub struct Scheduler {
    commands: mpsc::Sender<Command>,
}

impl Scheduler {
    /// Hands over an admitted request. Fails only when the scheduler has stopped.
    pub async fn submit(&self, request: Admitted) -> Result<(), EngineError> {
        self.commands
            .send(Command::Enqueue(request))
            .await
            .map_err(|_| EngineError::ShuttingDown)
    }

    /// A client stopped waiting before its end. A full channel means the scheduler is busy
    /// and looks at its queue anyway, so this never waits.
    pub fn client_left(&self) {
        let _ = self.commands.try_send(Command::Wake);
    }

    /// Waits until nothing is queued or running (or the scheduler has stopped).
    pub async fn drain(&self) {
        self.ask(Command::Drain).await;
    }

    /// Fails what waits and cancels what runs; waits until done.
    pub async fn abort(&self) {
        self.ask(Command::Abort).await;
    }

    /// Tests only: makes the scheduler's task panic.
    #[cfg(test)]
    pub async fn inject_panic(&self) {
        let _ = self.commands.send(Command::Panic).await;
    }

    async fn ask(&self, make: fn(oneshot::Sender<()>) -> Command) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
