//! The engine: model registry, admission, schedulers (the dynamic batcher) and instances.
//!
//! It knows nothing of HTTP or gRPC (the `api` layer translates) and nothing of sockets or
//! processes (the `worker` layer executes one formed batch at a time).
//!
//! The request path: `admission` (written once for every request) -> the model's
//! `scheduler` (the seam; docs/schedulers.md) -> the worker, answered through `response`
//! as a stream of responses. The dynamic batcher is one scheduler: `batcher` (the actor),
//! `queue` (its policy), `execution` (one worker call), `batch` (concatenate and split).
//! `continuous` is the other: continuous batching of `um.LLM` models' token steps.

mod admission;
mod batch;
mod batcher;
mod continuous;
pub mod drains;
pub mod error;
pub mod events;
mod execution;
pub mod executor;
mod handle;
mod lifecycle;
pub mod model;
mod queue;
mod registry;
pub mod response;
pub mod scheduler;
mod stats;
pub mod validate;
mod wake_timer;

#[cfg(test)]
mod path_tests;
#[cfg(test)]
mod tests;

pub use crate::tensor::client_shm::OutputTarget;
/// The tensor types live in the leaf module `crate::tensor`; these paths are kept for the
/// engine's callers.
pub use crate::tensor::{self, bytes_codec};
pub use drains::Drained;
pub use error::EngineError;
pub use events::EngineEvent;
pub use executor::Executor;
pub use handle::{Engine, EngineOptions};
pub use model::{FaultPolicy, LlmLimits, MAX_INSTANCES, ModelConfig, ModelState};
pub use registry::{is_noncanonical_version, parse_version};
pub use response::InferStream;
pub use tensor::{DataType, Storage, Tensor, TensorSpec};
pub use wake_timer::WakeClock;

use std::sync::Arc;
use std::time::Duration;

/// One inference request as the engine sees it: already parsed, not yet validated.
#[derive(Clone, Debug)]
pub struct InferRequest {
    pub model: String,
    /// `None` means the version the model serves by default.
    pub version: Option<String>,
    /// Client-chosen id, echoed in the response.
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// Names of the outputs to return; `None` returns every output.
    pub outputs: Option<Vec<String>>,
    /// Client deadline, if shorter than the model's default request timeout.
    pub timeout: Option<Duration>,
    /// The trace this request belongs to (from `traceparent`, or fresh); handed to the
    /// worker so the plugin's log lines name it. `None`: no trace (e.g. `unimodel predict`).
    pub trace: Option<crate::telemetry::TraceId>,
    /// Outputs the client wants written into its shared memory. When the request runs in a
    /// batch of its own, the worker writes them there directly (no copy through the core);
    /// otherwise they come back as usual and the `api` layer copies them in.
    pub output_targets: Vec<OutputTarget>,
    /// The request's KServe `parameters` (REST `parameters`, gRPC `InferParameter`s, the
    /// generate extension's `parameters`) that no layer above consumed; an LLM model's
    /// scheduler reads its sampling settings here (docs/llm.md "Requests").
    pub parameters: Parameters,
}

/// An LLM model as the OpenAI routes see it (`Engine::llm_models`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmModel {
    /// The KServe model name and version requests are submitted to.
    pub model: String,
    pub version: String,
    /// The OpenAI `model` id (`LlmDecl::served_model_name`).
    pub served_model_name: String,
    /// Prompt + generated tokens of one sequence.
    pub max_model_len: usize,
}

/// Request parameters as JSON values (KServe's bool / int64 / double / string, and the
/// generate extension's arbitrary JSON).
pub type Parameters = serde_json::Map<String, serde_json::Value>;

/// The answer to an `InferRequest`.
#[derive(Clone, Debug)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub outputs: Vec<Tensor>,
    /// Rows in the batch that served this request (its own rows included), for the access log.
    pub batch_size: u32,
}

/// A snapshot of one model for metadata and readiness routes.
#[derive(Clone, Debug)]
pub struct ModelStatus {
    pub config: Arc<ModelConfig>,
    pub state: ModelState,
    pub ready_instances: u32,
}

/// The load of one model version at one moment (`Engine::loads`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLoadSample {
    pub name: String,
    pub version: String,
    /// Its predict is a generator (answers stream).
    pub streaming: bool,
    /// Requests holding a place in its queue (not yet in a batch).
    pub queue_depth: u64,
    /// Requests admitted and not yet answered.
    pub in_flight: u64,
    pub ready_instances: u32,
}

/// A count and the total time spent, as Triton's statistics report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatDuration {
    pub count: u64,
    pub ns: u64,
}

/// Per-batch-size execution statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStat {
    pub batch_size: u64,
    pub compute_input: StatDuration,
    pub compute_infer: StatDuration,
    pub compute_output: StatDuration,
}

/// Triton-style statistics of one model (`GET /v2/models/{m}/stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub name: String,
    pub version: String,
    /// Unix time of the last inference, in milliseconds (0 if none).
    pub last_inference_ms: u64,
    /// Rows inferred (sum of request batch sizes).
    pub inference_count: u64,
    /// Worker calls (batches).
    pub execution_count: u64,
    pub success: StatDuration,
    pub fail: StatDuration,
    pub queue: StatDuration,
    /// Copying inputs into the worker's arena.
    pub compute_input: StatDuration,
    /// The plugin's `predict`, measured by the worker.
    pub compute_infer: StatDuration,
    /// Copying outputs back out and splitting them per request.
    pub compute_output: StatDuration,
    pub batch_stats: Vec<BatchStat>,
}
