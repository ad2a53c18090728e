//! The worker layer's public face: what the engine hands a worker instance and what it gets
//! back. The engine never sees sockets, arenas or processes; the worker layer never sees
//! batching policy (it executes already-formed batches, up to the model's `concurrency` at once).

use crate::tensor::{DataType, Storage, Tensor, TensorSpec};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A Python interpreter that can run the worker runtime, and where the SDK lives.
#[derive(Clone, Debug)]
pub struct PythonEnv {
    /// Interpreter with numpy and msgpack importable.
    pub interpreter: PathBuf,
    /// Directory put first on `PYTHONPATH`; holds the `unimodel` package.
    pub sdk_path: PathBuf,
    /// Variables of the core's environment passed on to workers beyond the allow-list
    /// (`--worker-env NAME`).
    pub pass_env: Vec<String>,
}

/// A model class as the plugin declares it (`python -m unimodel.worker --inspect`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ModelDecl {
    /// The `um.Model` subclass name.
    pub class: String,
    pub name: String,
    pub max_batch_size: u32,
    pub max_queue_delay_ms: f64,
    pub instances: u32,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// `predict` is a generator (streams several responses per request).
    #[serde(default)]
    pub streaming: bool,
    /// Requests admitted at once (queued plus running); `None`: no limit but the queue's.
    #[serde(default)]
    pub max_concurrency: Option<u64>,
    /// Retry the requests of a batch whose worker crashed, once.
    #[serde(default)]
    pub retry_on_worker_failure: bool,
    /// `RLIMIT_AS` of each worker process.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    /// Requests one worker runs at once (`async def predict`, or a thread pool).
    #[serde(default = "one")]
    pub concurrency: u32,
    /// The class is an `um.LLM`: served by the continuous-batching scheduler; its
    /// declaration comes with each instance's `ready` (docs/llm.md).
    #[serde(default)]
    pub llm: bool,
}

fn one() -> u32 {
    1
}

/// Timeouts the supervisor enforces.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// Spawn to `hello`.
    pub hello: Duration,
    /// `load` sent to `ready` (covers the plugin's `setup`).
    pub load: Duration,
    /// One `execute` to its `result`; past it the worker is killed and restarted.
    pub execute: Duration,
    /// Idle time between pings.
    pub heartbeat_interval: Duration,
    /// Ping to pong while idle.
    pub heartbeat_timeout: Duration,
}

/// How crashed or failing workers are restarted.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// Delay before restarting a worker that died after serving a batch successfully, or
    /// while idle (a kill, an OOM): a healthy model's replacement should serve at once. It
    /// is doubled on each consecutive failure that does not qualify (a setup that fails, a
    /// worker that dies in every `predict` it runs), up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Consecutive failed `setup` calls (or crashes before `ready`) before the instance is FAILED.
    pub max_setup_failures: u32,
}

/// Everything needed to run one worker process for one model instance.
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    pub model: String,
    pub instance: u32,
    pub plugin: PathBuf,
    pub class: String,
    /// Directory given to the plugin as `ctx.model_dir`.
    pub model_dir: PathBuf,
    pub device: String,
    pub parameters: BTreeMap<String, String>,
    pub max_batch_size: u32,
    pub python: PythonEnv,
    pub input_arena_bytes: usize,
    pub output_arena_bytes: usize,
    /// Largest output tensor a plugin may return (bytes); larger fails the batch with a clear error.
    pub max_output_bytes: usize,
    pub timeouts: Timeouts,
    pub restart: RestartPolicy,
    /// `RLIMIT_AS` of the worker process (bytes of virtual memory), if the model sets
    /// `memory_limit_bytes`; an allocation past it fails (Python `MemoryError`).
    pub memory_limit_bytes: Option<u64>,
    /// Executes the worker runs at once (the model's `concurrency`, at least 1).
    pub concurrency: u32,
}

/// State of one worker instance, published on a `watch` channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Process starting or running `setup`.
    Starting,
    /// Serving.
    Ready,
    /// Crashed or hung; waiting out the backoff before the next start.
    Restarting { reason: String },
    /// `setup` failed `max_setup_failures` times in a row; not retried.
    Failed { error: String, traceback: String },
    /// Shut down on request.
    Stopped,
}

/// One input of a batch: the batch's shape, and the parts (one per request, in order)
/// that concatenated along the first dimension form its data.
#[derive(Clone, Debug)]
pub struct WorkInput {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub parts: Vec<Bytes>,
    /// Where the input lives when it is in one place a worker can map (one request's slice
    /// of a client's region, `Storage::Client`); `Storage::Core` when its parts are to be
    /// copied into the input arena.
    pub storage: Storage,
}

/// A formed batch for one worker call.
#[derive(Clone, Debug)]
pub struct Work {
    /// Rows in the batch (sum of the requests' first dimensions), or 1 without batching.
    pub batch_size: u32,
    /// Trace ids of the batch's requests, in batch order without repeats; sent to the
    /// worker (`execute.trace`) so the plugin's log lines name them.
    pub trace: Vec<crate::telemetry::TraceId>,
    pub inputs: Vec<WorkInput>,
    /// Outputs to return; `None` means all.
    pub outputs: Option<Vec<String>>,
    /// Client memory the worker should write these outputs into directly, when they fit.
    pub targets: Vec<super::client_shm::OutputTarget>,
}

/// What the plugin returned for a batch. Each tensor's data is an owned copy (the arena
/// block is released as soon as it is copied).
#[derive(Clone, Debug)]
pub struct WorkOutput {
    pub outputs: Vec<Tensor>,
    /// Time spent inside the plugin's `predict`, measured by the worker.
    pub compute_ns: u64,
}

/// Why a batch failed in the worker layer.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum WorkerError {
    /// The process died while the batch was queued or running; `status` names the exit code or signal.
    #[error("worker process {status}")]
    Crashed { status: String },
    #[error("execution exceeded the {after:?} execution timeout; worker killed and restarting")]
    ExecutionTimeout { after: Duration },
    /// `predict` raised: `message` is "ExceptionType: text".
    #[error("{message}")]
    Plugin { message: String, traceback: String },
    #[error("worker is not ready ({state})")]
    NotReady { state: String },
    /// The batch never reached a running worker (the instance was not ready, or its process
    /// died before starting it): it may safely run on another instance.
    #[error("batch was not started ({reason})")]
    NotStarted { reason: String },
    /// A tensor exceeds a configured hard limit; the message names the limit and the flag.
    #[error("{0}")]
    TooLarge(String),
    #[error("worker protocol error: {0}")]
    Protocol(String),
    /// An output the worker wrote into a client's shared memory cannot be read back: the
    /// client shrank its segment meanwhile. The request's fault, not the worker's.
    #[error("{0}")]
    ClientMemory(String),
    #[error("request cancelled")]
    Cancelled,
    #[error("worker is shutting down")]
    ShuttingDown,
}

/// Describes a datatype for error messages and specs.
pub fn spec_of(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        datatype,
        shape: shape.to_vec(),
    }
}
