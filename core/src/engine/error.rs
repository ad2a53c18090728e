//! Errors of the engine layer. `api::error` maps each variant to an HTTP status once.

use crate::echo::Echo;
use std::time::Duration;

/// Why a request could not be served by the engine.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model '{}'; loaded models: {available}", Echo(name))]
    ModelNotFound { name: String, available: String },
    #[error(
        "model '{}' has no version '{}'; available versions: {available}",
        Echo(name),
        Echo(version)
    )]
    VersionNotFound {
        name: String,
        version: String,
        available: String,
    },
    #[error("{0}")]
    Validation(#[from] super::validate::ValidationError),
    /// A generator model asked for one answer (`infer`): its responses need a stream.
    #[error(
        "model '{model}' streams (its predict is a generator); call POST /v2/models/{model}/generate_stream (or /generate), or gRPC ModelStreamInfer"
    )]
    StreamingOnly { model: String },
    #[error(
        "model '{model}' queue is full ({capacity} requests waiting); retry later or raise --queue-capacity"
    )]
    QueueFull { model: String, capacity: usize },
    /// The model's `max_concurrency` requests are already admitted (queued or running).
    #[error(
        "model '{model}' is at its max_concurrency limit of {limit} requests (queued plus running); retry later or raise max_concurrency"
    )]
    Overloaded { model: String, limit: usize },
    #[error("model '{model}' is not ready: {state}")]
    NotReady { model: String, state: String },
    #[error("model '{model}' worker failed: {reason}")]
    WorkerFailed { model: String, reason: String },
    /// An LLM request's generation parameters or prompt are unusable (a parameter of the
    /// wrong type or out of range, a prompt too long, `max_tokens` past the context); the
    /// message names the parameter and what it accepts.
    #[error("model '{model}': {message}")]
    InvalidGeneration { model: String, message: String },
    #[error("model '{model}' raised {message}")]
    Plugin { model: String, message: String },
    /// The plugin returned something the server cannot send (wrong rows, too large, ...).
    #[error("model '{model}' returned unusable outputs: {message}")]
    BadOutput { model: String, message: String },
    #[error("model '{model}': request timed out after {after:?}")]
    Timeout { model: String, after: Duration },
    /// The request's client shared memory became unusable while it ran (the client shrank
    /// its segment); the message names the region, its size and the range.
    #[error("{0}")]
    ClientMemory(String),
    /// An operator drained the node or the model (`unimodel ctl drain`): refused before it
    /// was accepted, so it never ran; another node can take it.
    #[error(
        "{} is draining (an operator's drain): it takes no new requests; send this one to another node, or resume it with `unimodel ctl resume`",
        if *node { "this node".to_string() } else { format!("model '{model}' on this node") }
    )]
    Draining { model: String, node: bool },
    /// Refused at admission because the server is shutting down (SIGTERM): never ran, so
    /// a gateway may send it to another node.
    #[error("server is shutting down; not accepting new requests (this one never ran)")]
    Closing,
    /// Work cut off by the shutdown after it was accepted: it may have run.
    #[error("server is shutting down; not accepting new requests")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Refused before the engine accepted the request, so it certainly never ran and
    /// another node may take it: an operator's drain, or a model not ready (LOADING,
    /// FAILED, UNAVAILABLE with no instance, UNLOADING; queued requests failed for that
    /// reason never reached a worker either), or a shutdown seen at admission. The front ends mark these answers
    /// (`unimodel-not-run: 1`) so a gateway can retry them elsewhere.
    pub fn never_ran(&self) -> bool {
        matches!(
            self,
            EngineError::Draining { .. } | EngineError::NotReady { .. } | EngineError::Closing
        )
    }
}
