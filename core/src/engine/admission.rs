//! Admission: the one way into the engine for every request, unary or streaming.
//!
//! In order: model lookup (404), draining (503: SIGTERM, or an operator's drain of the node
//! or the model), a generator asked for one answer (400),
//! validation against the signature (400), readiness (503), the model's `max_concurrency`
//! and its queue bound (429), then the deadline. What passes is an `Admitted` request,
//! handed with its response sink to the model's scheduler (`scheduler.rs`); the caller
//! gets the client's end, `Responses`. `Engine::infer` collects its one response,
//! `Engine::infer_stream` passes the stream on.

use super::handle::Engine;
use super::model::{ModelConfig, ModelState};
use super::registry::ModelEntry;
use super::response::{self, Holds, Responses};
use super::scheduler::{Admitted, Origin};
use super::validate::validate_request;
use super::{EngineError, InferRequest, Tensor};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// The longest deadline a request can have: 7 days (`cli::limits::MAX_TIMEOUT_MS`).
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the caller will make of the responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    /// Exactly one answer (`infer`): a generator model cannot give it.
    One,
    /// Any number of responses (`infer_stream`).
    Stream,
}

impl Engine {
    /// Admits `req` and hands it to its model's scheduler; errors before that are this
    /// call's `Err` (see the module doc for their order).
    pub(super) async fn submit(
        &self,
        req: InferRequest,
        expect: Expect,
    ) -> Result<Responses, EngineError> {
        let entry = self.entry(&req.model, req.version.as_deref())?;
        if self.is_draining() {
            return Err(EngineError::Closing);
        }
        let config = &entry.config;
        if let Some(node) = self.drain_covers(&config.name) {
            return Err(EngineError::Draining {
                model: config.name.clone(),
                node,
            });
        }
        if config.streaming && expect == Expect::One {
            return Err(EngineError::StreamingOnly {
                model: config.name.clone(),
            });
        }
        let rows = validate_request(
            config,
            &req.inputs,
            req.outputs.as_deref(),
            &self.options().limits,
        )?;
        check_ready(config, &entry.state(), entry.is_unloading())?;
        let Admission { admitted, place } = admit(&entry)?;
        // Counted until the client is done: answered, timed out, or dropped.
        let inflight = entry.metrics.inflight();
        // Configured timeouts are bounded where they are parsed (`cli::limits`); the clamp
        // keeps `now + timeout` (here and per response) inside the clock's range whatever
        // a caller of the engine passes.
        let timeout = req
            .timeout
            .map_or(config.request_timeout, |t| t.min(config.request_timeout))
            .min(MAX_REQUEST_TIMEOUT);
        let now = Instant::now();
        let deadline = now + timeout;
        let (sink, receiver) = response::channel();
        let request = Admitted {
            inputs: in_declared_order(config, req.inputs),
            outputs: req.outputs,
            rows,
            enqueued: now,
            deadline,
            sink,
            place: Some(place),
            origin: Origin {
                id: req.id.clone(),
                trace: req.trace,
                span: tracing::Span::current(),
            },
            // A generator's responses come back in its events, never written into client
            // memory (each would overwrite the last).
            targets: if config.streaming {
                Vec::new()
            } else {
                req.output_targets
            },
            // A generator's responses may already have reached its client: never retried.
            retried: config.streaming,
            parameters: req.parameters,
        };
        // A scheduler that stopped while the model is not shutting down has failed (its
        // task panicked): say why, not "shutting down".
        entry
            .scheduler
            .submit(request)
            .await
            .map_err(|e| match entry.state() {
                ModelState::Unavailable { reason } => EngineError::NotReady {
                    model: config.name.clone(),
                    state: format!("UNAVAILABLE: {reason}"),
                },
                _ => e,
            })?;
        Ok(Responses::new(
            receiver,
            Holds {
                timeout,
                deadline,
                model: config.name.clone(),
                version: config.version.clone(),
                id: req.id,
                inflight,
                admitted,
                scheduler: entry.scheduler.clone(),
            },
        ))
    }
}

/// What a request holds while the engine has it: one of the model's `max_concurrency`
/// admissions, until it is answered (or its client goes), and a place in the model's queue,
/// given back when the scheduler takes it out of its queue.
struct Admission {
    admitted: Option<OwnedSemaphorePermit>,
    place: OwnedSemaphorePermit,
}

/// Takes a request's admission and queue place, or says which limit refused it (429).
fn admit(entry: &ModelEntry) -> Result<Admission, EngineError> {
    let config = &entry.config;
    let admitted = match (&entry.admitted, config.faults.max_concurrency) {
        (Some(sem), Some(limit)) => Some(sem.clone().try_acquire_owned().map_err(|_| {
            entry.metrics.rejected();
            EngineError::Overloaded {
                model: config.name.clone(),
                limit,
            }
        })?),
        _ => None,
    };
    let place = entry.places.clone().try_acquire_owned().map_err(|_| {
        entry.metrics.rejected();
        EngineError::QueueFull {
            model: config.name.clone(),
            capacity: config.queue_capacity,
        }
    })?;
    Ok(Admission { admitted, place })
}

/// Requests are refused at the door while no instance can serve. A model whose instances
/// are restarting still queues: a replacement usually serves within a second.
fn check_ready(
    config: &ModelConfig,
    state: &ModelState,
    unloading: bool,
) -> Result<(), EngineError> {
    let not_ready = |state: String| {
        Err(EngineError::NotReady {
            model: config.name.clone(),
            state,
        })
    };
    match state {
        ModelState::Ready | ModelState::Unavailable { .. } => Ok(()),
        ModelState::Loading => not_ready("LOADING (workers are starting)".into()),
        ModelState::Failed { error, .. } => not_ready(format!("FAILED: {error}")),
        ModelState::Stopping if unloading => not_ready(format!(
            "UNLOADING (version {} is being unloaded; it takes no new requests)",
            config.version
        )),
        ModelState::Stopping => Err(EngineError::Closing),
    }
}

/// Puts inputs in the order the model declares them, so batches line up input by input.
fn in_declared_order(config: &ModelConfig, mut inputs: Vec<Tensor>) -> Vec<Tensor> {
    inputs.sort_by_key(|t| {
        config
            .inputs
            .iter()
            .position(|s| s.name == t.name)
            .unwrap_or(usize::MAX)
    });
    inputs
}
