//! `Engine`: the registry of served models and the entry point for requests.
//!
//! Each model has a batcher actor (see `batcher.rs`); this handle validates a request,
//! takes a place in the model's bounded queue (or answers 429), hands the request to the
//! actor and waits for the answer up to the request's deadline.

use super::batcher::{Batcher, Command};
use super::executor::Executor;
use super::lifecycle::watch_instances;
use super::model::{ModelConfig, ModelState};
use super::queue::{Origin, Pending};
use super::stats::StatsRecorder;
use super::validate::{Limits, validate_request};
use super::{EngineError, InferRequest, InferResponse, ModelStats, ModelStatus};
use crate::telemetry::metrics::{Metrics, ModelMetrics};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

/// Settings that apply to every model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub limits: Limits,
    /// Where the engine records its metrics (served at `/metrics`).
    pub metrics: Arc<Metrics>,
}

pub(super) struct ModelEntry {
    pub(super) config: Arc<ModelConfig>,
    pub(super) commands: mpsc::Sender<Command>,
    /// One permit per place in the queue.
    pub(super) places: Arc<Semaphore>,
    pub(super) state: watch::Receiver<ModelState>,
    stats: Arc<StatsRecorder>,
    pub(super) metrics: ModelMetrics,
    instances: Vec<Arc<dyn Executor>>,
}

struct Inner {
    models: BTreeMap<String, ModelEntry>,
    draining: AtomicBool,
    options: EngineOptions,
}

/// Handle to the running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts a batcher for each model over its instances. Must run inside a tokio runtime.
    pub fn start(
        models: Vec<(ModelConfig, Vec<Arc<dyn Executor>>)>,
        options: EngineOptions,
    ) -> Engine {
        let mut map = BTreeMap::new();
        for (config, instances) in models {
            let config = Arc::new(config);
            let metrics = options.metrics.model(&config.name, &config.version);
            let stats = Arc::new(StatsRecorder::new(
                &config.name,
                &config.version,
                metrics.clone(),
            ));
            watch_instances(&instances, &metrics);
            let (state_tx, state_rx) = watch::channel(ModelState::Loading);
            let commands = Batcher::spawn(
                config.clone(),
                instances.clone(),
                stats.clone(),
                state_tx,
                config.queue_capacity,
            );
            let places = Arc::new(Semaphore::new(config.queue_capacity));
            sample_queue_depth(&options.metrics, &metrics, &places, config.queue_capacity);
            let entry = ModelEntry {
                config: config.clone(),
                commands,
                places,
                state: state_rx,
                stats,
                metrics,
                instances,
            };
            map.insert(config.name.clone(), entry);
        }
        Engine {
            inner: Arc::new(Inner {
                models: map,
                draining: AtomicBool::new(false),
                options,
            }),
        }
    }

    /// The metrics every model records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.options.metrics
    }

    /// The process is up (always true while it answers).
    pub fn live(&self) -> bool {
        true
    }

    /// Every model is ready and the server is not draining.
    pub fn ready(&self) -> bool {
        !self.is_draining()
            && self
                .inner
                .models
                .values()
                .all(|m| m.state.borrow().is_ready())
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// All models, sorted by name.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.inner.models.values().map(status_of).collect()
    }

    /// One model; `version` `None` means the default version.
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        self.entry(name, version).map(status_of)
    }

    /// Waits until `name` leaves LOADING (READY, FAILED, ...) and returns its state.
    pub async fn wait_loaded(&self, name: &str) -> Result<ModelState, EngineError> {
        let entry = self.entry(name, None)?;
        let mut rx = entry.state.clone();
        let state = rx
            .wait_for(|s| *s != ModelState::Loading)
            .await
            .map_err(|_| EngineError::Internal(format!("model '{name}' stopped while loading")))?;
        Ok(state.clone())
    }

    /// A watch on each of the model's instances, in instance order (progress reports).
    pub fn instance_states(
        &self,
        name: &str,
    ) -> Result<Vec<watch::Receiver<crate::worker::types::InstanceState>>, EngineError> {
        Ok(self
            .entry(name, None)?
            .instances
            .iter()
            .map(|i| i.state())
            .collect())
    }

    /// Statistics of one model (or every model when `name` is `None`).
    pub fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError> {
        match name {
            Some(n) => Ok(vec![self.entry(n, version)?.stats.snapshot()]),
            None => Ok(self
                .inner
                .models
                .values()
                .map(|m| m.stats.snapshot())
                .collect()),
        }
    }

    /// Validates, queues, batches and executes one request.
    #[tracing::instrument(level = "debug", name = "infer", skip_all, fields(model = %req.model))]
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, EngineError> {
        let entry = self.entry(&req.model, req.version.as_deref())?;
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        let config = &entry.config;
        if config.streaming {
            return Err(EngineError::StreamingOnly {
                model: config.name.clone(),
            });
        }
        let rows = validate_request(
            config,
            &req.inputs,
            req.outputs.as_deref(),
            &self.inner.options.limits,
        )?;
        check_ready(config, &entry.state.borrow())?;

        let permit = entry.places.clone().try_acquire_owned().map_err(|_| {
            entry.metrics.rejected();
            EngineError::QueueFull {
                model: config.name.clone(),
                capacity: config.queue_capacity,
            }
        })?;
        // Counted until this future ends: answered, timed out, or dropped by the client.
        let _inflight = entry.metrics.inflight();
        let timeout = req
            .timeout
            .map_or(config.request_timeout, |t| t.min(config.request_timeout));
        let now = Instant::now();
        let (reply_tx, reply_rx) = oneshot::channel();
        let pending = Pending {
            inputs: in_declared_order(config, req.inputs),
            outputs: req.outputs,
            rows,
            enqueued: now,
            deadline: now + timeout,
            reply: reply_tx,
            permit: Some(permit),
            chunks: None,
            origin: Origin {
                id: req.id.clone(),
                trace: req.trace,
                span: tracing::Span::current(),
            },
            targets: req.output_targets,
        };
        entry
            .commands
            .send(Command::Enqueue(pending))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        // If this future is dropped (the client went away) while the request waits, the
        // guard wakes the batcher so the request's place is freed at once.
        let mut guard = WakeOnDrop {
            commands: &entry.commands,
            armed: true,
        };

        // The batcher answers timeouts of queued requests itself; this bound covers a batch
        // that is still running when the deadline passes.
        let waited = tokio::time::timeout(timeout, reply_rx).await;
        guard.armed = false;
        let answer = match waited {
            Ok(Ok(reply)) => reply?,
            // The batch task was cancelled (shutdown after the drain deadline).
            Ok(Err(_)) => return Err(EngineError::ShuttingDown),
            Err(_) => {
                return Err(EngineError::Timeout {
                    model: config.name.clone(),
                    after: timeout,
                });
            }
        };
        Ok(InferResponse {
            model_name: config.name.clone(),
            model_version: config.version.clone(),
            id: req.id,
            outputs: answer.outputs,
            batch_size: answer.batch_size,
        })
    }

    /// Stops taking requests (readiness false, new requests 503) and waits until every
    /// queued and running request has been answered, at most `timeout`. Returns whether
    /// everything finished in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.inner.draining.store(true, Ordering::Release);
        let waits = self.inner.models.values().map(|m| {
            let commands = m.commands.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                if commands.send(Command::Drain(tx)).await.is_ok() {
                    let _ = rx.await;
                }
            }
        });
        tokio::time::timeout(timeout, futures::future::join_all(waits))
            .await
            .is_ok()
    }

    /// Fails every request still queued and cancels running batches (their clients get 503);
    /// new requests are refused. Used once the drain deadline has passed.
    pub async fn abort(&self) {
        self.inner.draining.store(true, Ordering::Release);
        let aborts = self.inner.models.values().map(|m| {
            let commands = m.commands.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                if commands.send(Command::Abort(tx)).await.is_ok() {
                    let _ = rx.await;
                }
            }
        });
        futures::future::join_all(aborts).await;
    }

    /// Stops every worker instance, waiting at most `grace` for them to exit cleanly (a
    /// worker still busy after that dies with the server through PDEATHSIG).
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.draining.store(true, Ordering::Release);
        let stops = self
            .inner
            .models
            .values()
            .flat_map(|m| m.instances.iter().map(|i| i.shutdown()));
        tokio::time::timeout(grace, futures::future::join_all(stops))
            .await
            .is_ok()
    }

    /// Settings shared by every model (`engine::stream` validates with them too).
    pub(super) fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    pub(super) fn entry(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<&ModelEntry, EngineError> {
        let entry = self
            .inner
            .models
            .get(name)
            .ok_or_else(|| EngineError::ModelNotFound {
                name: name.to_string(),
                available: self
                    .inner
                    .models
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        match version {
            Some(v) if v != entry.config.version => Err(EngineError::VersionNotFound {
                name: name.to_string(),
                version: v.to_string(),
                available: entry.config.version.clone(),
            }),
            _ => Ok(entry),
        }
    }
}

/// Wakes the batcher when a waiting `infer` is dropped before its answer.
struct WakeOnDrop<'a> {
    commands: &'a mpsc::Sender<Command>,
    armed: bool,
}

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // A full channel means the batcher is busy and will look at its queue anyway.
            let _ = self.commands.try_send(Command::Wake);
        }
    }
}

/// Queue depth is the places taken in the queue, read at scrape time (nothing per request).
fn sample_queue_depth(
    metrics: &Metrics,
    model: &ModelMetrics,
    places: &Arc<Semaphore>,
    capacity: usize,
) {
    model.set_queue_capacity(i64::try_from(capacity).unwrap_or(i64::MAX));
    let places = Arc::downgrade(places);
    let model = model.clone();
    metrics.add_sampler(move || {
        let taken = places
            .upgrade()
            .map_or(0, |p| capacity.saturating_sub(p.available_permits()));
        model.set_queue_depth(i64::try_from(taken).unwrap_or(i64::MAX));
    });
}

fn status_of(m: &ModelEntry) -> ModelStatus {
    let ready_instances = m
        .instances
        .iter()
        .filter(|i| *i.state().borrow() == crate::worker::types::InstanceState::Ready)
        .count();
    ModelStatus {
        config: m.config.clone(),
        state: m.state.borrow().clone(),
        ready_instances: ready_instances as u32,
    }
}

/// Requests are refused at the door while no instance can serve. A model whose instances
/// are restarting still queues: a replacement usually serves within a second.
pub(super) fn check_ready(config: &ModelConfig, state: &ModelState) -> Result<(), EngineError> {
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
        ModelState::Stopping => Err(EngineError::ShuttingDown),
    }
}

/// Puts inputs in the order the model declares them, so batches line up input by input.
pub(super) fn in_declared_order(
    config: &ModelConfig,
    mut inputs: Vec<super::Tensor>,
) -> Vec<super::Tensor> {
    inputs.sort_by_key(|t| {
        config
            .inputs
            .iter()
            .position(|s| s.name == t.name)
            .unwrap_or(usize::MAX)
    });
    inputs
}
