//! A model's resolved configuration and its observable state.
//!
//! `ModelConfig` is what the engine serves: the plugin's class attributes (found by
//! `worker::inspect`) with CLI flags and `--set` parameters applied on top.

use super::tensor::TensorSpec;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Most worker processes one model may ask for, wherever the number comes from (the plugin's
/// `instances`, `--instances`, `config.toml`): each is a Python process with its own arenas,
/// and a typo of a few zeros must not fork thousands of them.
pub const MAX_INSTANCES: u32 = 256;

/// The longest `max_queue_delay` a model may have, in milliseconds: one hour. Far beyond any
/// useful batching delay, and a bound every source of the setting is checked against (a
/// delay becomes a deadline, `Instant + Duration`, which panics past the clock's range).
pub const MAX_QUEUE_DELAY_MS: f64 = 3_600_000.0;

/// The largest `max_batch_size` a model may have (`--max-batch-size` has the same bound).
pub const MAX_BATCH_SIZE: u32 = 1_048_576;

/// Everything the engine needs to serve one model.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Name in URLs (`/v2/models/{name}`).
    pub name: String,
    /// Version served; a single-plugin run serves version "1".
    pub version: String,
    /// Path of the plugin file and the `um.Model` subclass in it.
    pub plugin: PathBuf,
    pub class: String,
    /// 0 disables batching: each request is executed alone and shapes are taken whole.
    pub max_batch_size: u32,
    /// How long the batcher may hold a request waiting for a fuller batch (at most
    /// `MAX_QUEUE_DELAY_MS`).
    pub max_queue_delay: Duration,
    /// Worker processes for this model, 1..=`MAX_INSTANCES`.
    pub instances: u32,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// `ctx.parameters` in the plugin (`--set key=value`).
    pub parameters: BTreeMap<String, String>,
    /// Requests waiting beyond this many get 429.
    pub queue_capacity: usize,
    /// Default per-request deadline (queue wait plus execution); a request may ask for less.
    /// For a generator model it bounds the wait for each response (see `engine::response`).
    pub request_timeout: Duration,
    /// `predict` is a generator: each request is answered with a stream of responses
    /// (`Engine::infer_stream`) and executed alone, never batched with others.
    pub streaming: bool,
    /// An `um.LLM` plugin (`ModelDecl::llm`), with its scheduler's limits: served by the
    /// continuous-batching scheduler (`engine::continuous`), which reads the rest of its
    /// declaration (tokenizer, KV, context) from the instances. `None`: an `um.Model`.
    pub llm: Option<LlmLimits>,
    /// Limits and recovery under faults and overload.
    pub faults: FaultPolicy,
}

/// The continuous-batching scheduler's per-step limits (vLLM's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlmLimits {
    /// Tokens fed per step, all sequences together (chunked prefill splits longer prompts).
    pub max_num_batched_tokens: usize,
    /// Running sequences at most (further capped by a slots KV's `num_slots`).
    pub max_num_seqs: usize,
}

impl Default for LlmLimits {
    fn default() -> Self {
        LlmLimits {
            max_num_batched_tokens: 512,
            max_num_seqs: 16,
        }
    }
}

/// A model's guards against overload and crashing workers (plugin class attributes or
/// config.toml keys of the same names; `run --max-concurrency` too). All off by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPolicy {
    /// Requests admitted at once, queued plus running; past it 429 / RESOURCE_EXHAUSTED
    /// naming the limit. `None`: only the queue capacity bounds the waiting ones.
    pub max_concurrency: Option<usize>,
    /// Requests of a batch whose worker crashed are queued again, once, for another (or the
    /// restarted) instance, within their deadline. Plain infer only: a stream's responses
    /// may already have reached its client. For models whose `predict` is idempotent.
    pub retry_on_worker_failure: bool,
    /// `RLIMIT_AS` of each worker process, in bytes.
    pub memory_limit_bytes: Option<u64>,
}

/// Lifecycle of a model, as `GET /v2/models/{m}` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    /// Workers are starting (or retrying a failed setup); not yet serving, requests get 503.
    Loading,
    /// At least one instance serves.
    Ready,
    /// Every instance is down (crashed, restarting) after having served: requests still
    /// queue (a replacement usually serves within a second) until their deadline.
    Unavailable { reason: String },
    /// `setup` kept failing; the model will not be retried.
    Failed { error: String, traceback: String },
    /// The server is shutting down.
    Stopping,
}

impl ModelState {
    /// The state's name as reported in JSON ("READY", "FAILED", ...), Triton style.
    pub fn name(&self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable { .. } => "UNAVAILABLE",
            ModelState::Failed { .. } => "FAILED",
            ModelState::Stopping => "UNLOADING",
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, ModelState::Ready)
    }
}
