//! `Engine`: the registry of served models and the entry point for requests.
//!
//! Each model version has a scheduler (`scheduler.rs`; the dynamic batcher for now). Every
//! request goes through admission (`admission.rs`) to it and is answered as a stream of
//! responses (`response.rs`); `infer` collects a plain model's one response.
//!
//! The registry is an immutable table behind `registry::Registry`: a request clones the
//! current `Arc` (one uncontended read lock) and never waits on a load or an unload, which
//! build a new table and swap it in. Loads and unloads of one model are serialised by their
//! caller (the repository actor, `crate::repository`).

use super::LlmModel;
use super::admission::Expect;
use super::drains::Drained;
use super::events::{EngineEvent, Events};
use super::executor::Executor;
use super::lifecycle::watch_instances;
use super::model::{ModelConfig, ModelState};
use super::registry::{ModelEntry, Registry, Table, parse_version};
use super::scheduler::{SchedulerContext, SchedulerKind};
use super::stats::StatsRecorder;
use super::validate::Limits;
use super::wake_timer::WakeClock;
use super::{
    EngineError, InferRequest, InferResponse, InferStream, ModelLoadSample, ModelStats, ModelStatus,
};
use crate::telemetry::metrics::{Metrics, ModelMetrics};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, broadcast, watch};

/// Settings that apply to every model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub limits: Limits,
    /// Where the engine records its metrics (served at `/metrics`).
    pub metrics: Arc<Metrics>,
    /// The clock of the batchers' delays: the precise timerfd, or tokio's (paused in tests).
    pub wake_clock: WakeClock,
}

struct Inner {
    registry: Registry,
    draining: AtomicBool,
    /// Drains ordered by an operator (`drains.rs`); the SIGTERM drain is `draining`.
    drains: watch::Sender<Drained>,
    /// Model and worker changes, for observers (`events.rs`).
    events: Events,
    options: EngineOptions,
    /// Bumped whenever what `models()` reports may have changed (a model added, removed,
    /// unloading, changing state) or the engine starts draining; see `changes`.
    changes: watch::Sender<()>,
}

/// Handle to the running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// The limits every request is held to.
    pub fn limits(&self) -> &Limits {
        &self.inner.options.limits
    }

    /// Starts a scheduler for each model over its instances. Must run inside a tokio runtime.
    /// Models whose version is not a number are served as version 0.
    pub fn start(
        models: Vec<(ModelConfig, Vec<Arc<dyn Executor>>)>,
        options: EngineOptions,
    ) -> Engine {
        let mut table = Table::new();
        let events = Events::default();
        let (changes, _) = watch::channel(());
        for (config, instances) in models {
            let key = parse_version(&config.version).unwrap_or_default();
            let entry = spawn_entry(config, instances, &options, (&events, &changes));
            table
                .entry(entry.config.name.clone())
                .or_default()
                .insert(key, entry);
        }
        Engine {
            inner: Arc::new(Inner {
                registry: Registry::new(table),
                draining: AtomicBool::new(false),
                drains: watch::channel(Drained::default()).0,
                events,
                options,
                changes,
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

    /// Every served model (not being unloaded) is ready and the server is not draining
    /// (neither for SIGTERM nor by an operator's node drain).
    pub fn ready(&self) -> bool {
        !self.is_draining()
            && !self.inner.drains.borrow().node
            && self
                .inner
                .registry
                .entries()
                .iter()
                .filter(|m| !m.is_unloading())
                .all(|m| m.state.borrow().is_ready())
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// An operator's drain (`unimodel ctl drain`): new requests for `model` (every model for
    /// `None`, the whole node) are refused with 503 before they are accepted, accepted ones
    /// finish, workers stay up. Returns whether anything changed.
    pub fn drain_orders(&self, model: Option<&str>) -> bool {
        let changed = self.inner.drains.send_if_modified(|d| d.add(model));
        if changed {
            self.changed();
            self.announce_drains(model, |_| true);
        }
        changed
    }

    /// Lifts an operator's drain of `model`, or every such drain for `None`; the models serve
    /// again. Returns whether anything changed.
    pub fn resume(&self, model: Option<&str>) -> bool {
        let before = self.inner.drains.borrow().clone();
        let changed = self.inner.drains.send_if_modified(|d| d.remove(model));
        if changed {
            self.changed();
            let now = self.inner.drains.borrow().clone();
            self.announce_drains(model, |name| before.covers(name) && !now.covers(name));
        }
        changed
    }

    /// The operator's drains now and at every change (the etcd registry reports a drained
    /// node or model as DRAINING).
    pub fn drained(&self) -> watch::Receiver<Drained> {
        self.inner.drains.subscribe()
    }

    /// Model and worker changes from now on (`events.rs`).
    pub fn events(&self) -> broadcast::Receiver<EngineEvent> {
        self.inner.events.subscribe()
    }

    /// Model events for the served versions a drain or resume touched: DRAINING, or the
    /// state they serve in again.
    fn announce_drains(&self, model: Option<&str>, touched: impl Fn(&str) -> bool) {
        let drained = self.inner.drains.borrow().clone();
        for m in self.models() {
            let name = &m.config.name;
            if model.is_some_and(|only| only != name) || !touched(name) {
                continue;
            }
            if drained.covers(name) {
                self.inner.events.send(EngineEvent::Model {
                    model: name.clone(),
                    version: m.config.version.clone(),
                    state: "DRAINING".into(),
                    reason: Some("drained by an operator; accepted requests finish".into()),
                });
            } else {
                self.inner
                    .events
                    .model_state(name, &m.config.version, &m.state);
            }
        }
    }

    /// Whether an operator's drain refuses new requests for `model`.
    pub(super) fn drain_covers(&self, model: &str) -> Option<bool> {
        let d = self.inner.drains.borrow();
        d.covers(model).then_some(d.node)
    }

    /// Marks a change on every receiver: model states, the table or the drain moved. An
    /// event for observers outside the request path (cluster registration); nothing per
    /// request calls it.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.inner.changes.subscribe()
    }

    fn changed(&self) {
        self.inner.changes.send_replace(());
    }

    /// The load of every served model version now: queue depth, requests in flight and
    /// ready instances. Reads counters the request path keeps anyway (nothing is added to
    /// it); meant for a sampler a few times a second, not per request.
    pub fn loads(&self) -> Vec<ModelLoadSample> {
        self.inner
            .registry
            .entries()
            .iter()
            .map(|m| ModelLoadSample {
                name: m.config.name.clone(),
                version: m.config.version.clone(),
                streaming: m.config.streaming,
                queue_depth: m
                    .config
                    .queue_capacity
                    .saturating_sub(m.places.available_permits())
                    as u64,
                in_flight: u64::try_from(m.metrics.inflight_now()).unwrap_or(0),
                ready_instances: status_of(m).ready_instances,
            })
            .collect()
    }

    /// All served model versions, sorted by name, then version.
    pub fn models(&self) -> Vec<ModelStatus> {
        self.inner
            .registry
            .entries()
            .iter()
            .map(|m| status_of(m))
            .collect()
    }

    /// The LLM models that can answer now (an instance has declared itself in `ready`), by
    /// model name, for the OpenAI routes (`/v1/models`, and `model` -> KServe name).
    ///
    /// Read from the same places the continuous-batching scheduler reads: the model is
    /// READY (its scheduler turns it FAILED when no ready instance's declaration can be
    /// served) and a ready instance's `Executor::llm` declaration names it.
    pub fn llm_models(&self) -> Vec<LlmModel> {
        self.inner
            .registry
            .entries()
            .iter()
            .filter(|m| m.config.llm.is_some() && m.state().is_ready())
            .filter_map(|m| {
                let decl = m.instances.iter().find_map(|i| {
                    let ready = *i.state().borrow() == crate::worker::types::InstanceState::Ready;
                    if ready { i.llm() } else { None }
                })?;
                Some(LlmModel {
                    model: m.config.name.clone(),
                    version: m.config.version.clone(),
                    served_model_name: decl.served_model_name.clone(),
                    max_model_len: decl.max_model_len,
                })
            })
            .collect()
    }

    /// One model; `version` `None` means the default version (the highest served).
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        self.entry(name, version).map(|m| status_of(&m))
    }

    /// Waits until `name` (its default version) leaves LOADING and returns its state.
    pub async fn wait_loaded(&self, name: &str) -> Result<ModelState, EngineError> {
        let entry = self.entry(name, None)?;
        wait_settled(&entry).await
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

    /// Statistics of one model (or every model version when `name` is `None`).
    pub fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError> {
        match name {
            Some(n) => Ok(vec![self.entry(n, version)?.stats.snapshot()]),
            None => Ok(self
                .inner
                .registry
                .entries()
                .iter()
                .map(|m| m.stats.snapshot())
                .collect()),
        }
    }

    /// Starts serving `config` over `instances` and waits until it leaves LOADING; returns
    /// the state it reached (READY, or FAILED with the plugin's error).
    ///
    /// A new model (or version) is visible at once, as LOADING, and stays listed if its
    /// setup fails, so its status explains why. Loading a version that is already served
    /// reloads it: the new instances load beside the old ones, replace them once ready (no
    /// request is refused meanwhile), and the old ones drain and stop; if the new ones
    /// fail, the old version keeps serving and the failure is returned.
    pub async fn load(
        &self,
        config: ModelConfig,
        instances: Vec<Arc<dyn Executor>>,
    ) -> Result<ModelState, EngineError> {
        if self.is_draining() {
            return Err(EngineError::ShuttingDown);
        }
        let Some(key) = parse_version(&config.version) else {
            return Err(EngineError::Internal(format!(
                "model '{}': version '{}' is not a number",
                config.name, config.version
            )));
        };
        let name = config.name.clone();
        let entry = spawn_entry(
            config,
            instances,
            &self.inner.options,
            (&self.inner.events, &self.inner.changes),
        );
        let previous = self
            .inner
            .registry
            .snapshot()
            .get(&name)
            .and_then(|v| v.get(&key))
            .cloned();
        let Some(previous) = previous else {
            self.publish(key, entry.clone());
            return wait_settled(&entry).await;
        };
        let state = wait_settled(&entry).await?;
        if state.is_ready() {
            self.publish(key, entry);
            retire(&previous, &self.inner.changes).await;
        } else {
            retire(&entry, &self.inner.changes).await;
        }
        Ok(state)
    }

    /// Stops serving one version of a model: new requests for it are refused (503, state
    /// UNLOADING), queued and running ones finish, then its workers stop and it leaves the
    /// registry. Requests without a version move to the highest other version at once.
    pub async fn unload(&self, name: &str, version: &str) -> Result<(), EngineError> {
        let entry = self.entry(name, Some(version))?;
        let events = &self.inner.events;
        events.model_state(name, version, &ModelState::Stopping);
        retire(&entry, &self.inner.changes).await;
        self.inner.registry.update(|table| {
            if let Some(versions) = table.get_mut(name) {
                versions.retain(|_, e| !Arc::ptr_eq(e, &entry));
                if versions.is_empty() {
                    table.remove(name);
                }
            }
        });
        self.changed();
        entry.metrics.set_queue_depth(0);
        events.send(EngineEvent::Model {
            model: name.to_string(),
            version: version.to_string(),
            state: "UNAVAILABLE".into(),
            reason: Some("unloaded".into()),
        });
        Ok(())
    }

    /// Validates, queues, batches and executes one request: its one response, collected
    /// from the same stream `infer_stream` hands out. A generator model is refused
    /// (`StreamingOnly`): its responses need a stream.
    #[tracing::instrument(level = "debug", name = "infer", skip_all, fields(model = %req.model))]
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, EngineError> {
        self.submit(req, Expect::One).await?.collect_one().await
    }

    /// Validates, queues and executes one request, answering with a stream of responses: one
    /// per chunk a generator model yields, or exactly one for an ordinary model. Errors before
    /// the stream starts (unknown model, invalid input, queue full, not ready, shutting down)
    /// are the `Err` of this call; once streaming, an error is the stream's last item.
    /// Dropping the stream cancels the request (see `response.rs`).
    #[tracing::instrument(level = "debug", name = "infer_stream", skip_all, fields(model = %req.model))]
    pub async fn infer_stream(&self, req: InferRequest) -> Result<InferStream, EngineError> {
        Ok(self.submit(req, Expect::Stream).await?.boxed())
    }

    /// Readiness false and new requests refused from now on: the first step of a drain, taken
    /// before it so health watchers can be told at once.
    pub fn stop_accepting(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.changed();
    }

    /// Stops taking requests (readiness false, new requests 503) and waits until every
    /// queued and running request has been answered, at most `timeout`. Returns whether
    /// everything finished in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.inner.draining.store(true, Ordering::Release);
        self.changed();
        let entries = self.inner.registry.entries();
        let waits = entries.iter().map(|m| m.scheduler.drain());
        tokio::time::timeout(timeout, futures::future::join_all(waits))
            .await
            .is_ok()
    }

    /// Fails every request still queued and cancels running batches (their clients get 503);
    /// new requests are refused. Used once the drain deadline has passed.
    pub async fn abort(&self) {
        self.inner.draining.store(true, Ordering::Release);
        let entries = self.inner.registry.entries();
        let aborts = entries.iter().map(|m| m.scheduler.abort());
        futures::future::join_all(aborts).await;
    }

    /// Stops every worker instance, waiting at most `grace` for them to exit cleanly (a
    /// worker still busy after that dies with the server through PDEATHSIG).
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.draining.store(true, Ordering::Release);
        let entries = self.inner.registry.entries();
        let stops = entries
            .iter()
            .flat_map(|m| m.instances.iter().map(|i| i.shutdown()));
        tokio::time::timeout(grace, futures::future::join_all(stops))
            .await
            .is_ok()
    }

    /// Settings shared by every model (admission validates with them).
    pub(super) fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    pub(super) fn entry(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelEntry>, EngineError> {
        self.inner.registry.find(name, version)
    }

    /// Puts `entry` in the table as `name` at version `key`, replacing what was there.
    fn publish(&self, key: u64, entry: Arc<ModelEntry>) {
        self.inner.registry.update(|table| {
            table
                .entry(entry.config.name.clone())
                .or_default()
                .insert(key, entry);
        });
        self.changed();
    }
}

/// Starts the scheduler of one model version over its instances.
fn spawn_entry(
    config: ModelConfig,
    instances: Vec<Arc<dyn Executor>>,
    options: &EngineOptions,
    (events, changes): (&Events, &watch::Sender<()>),
) -> Arc<ModelEntry> {
    let all_metrics = &*options.metrics;
    let config = Arc::new(config);
    let metrics = all_metrics.model(&config.name, &config.version);
    let stats = Arc::new(StatsRecorder::new(
        &config.name,
        &config.version,
        metrics.clone(),
    ));
    watch_instances(&instances, &metrics, &events.for_model(&config));
    let (state_tx, state_rx) = watch::channel(ModelState::Loading);
    let scheduler = SchedulerKind::for_model(&config).spawn(SchedulerContext {
        config: config.clone(),
        instances: instances.clone(),
        stats: stats.clone(),
        state: state_tx,
        clock: options.wake_clock,
    });
    let places = Arc::new(Semaphore::new(config.queue_capacity));
    let admitted = config
        .faults
        .max_concurrency
        .map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))));
    sample_queue_depth(all_metrics, &metrics, &places, config.queue_capacity);
    forward_changes(state_rx.clone(), changes.clone());
    let entry = Arc::new(ModelEntry {
        config,
        scheduler,
        places,
        admitted,
        state: state_rx,
        stats,
        metrics,
        instances,
        unloading: AtomicBool::new(false),
    });
    tokio::spawn(announce_states(Arc::downgrade(&entry), events.clone()));
    entry
}

/// Sends a model event at each state change of one entry until it stops. An entry being
/// unloaded (or replaced by a reload) is quiet: `Engine::unload` says UNLOADING and
/// UNAVAILABLE itself, and a reload's new entry speaks for the model.
async fn announce_states(entry: std::sync::Weak<ModelEntry>, events: Events) {
    let Some(mut rx) = entry.upgrade().map(|e| e.state.clone()) else {
        return;
    };
    loop {
        let state = rx.borrow_and_update().clone();
        match entry.upgrade() {
            Some(e) if !e.is_unloading() => {
                events.model_state(&e.config.name, &e.config.version, &state);
            }
            Some(_) => {}
            None => return,
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until the entry leaves LOADING; returns the state it reached.
async fn wait_settled(entry: &ModelEntry) -> Result<ModelState, EngineError> {
    let mut rx = entry.state.clone();
    let state = rx
        .wait_for(|s| *s != ModelState::Loading)
        .await
        .map_err(|_| {
            EngineError::Internal(format!(
                "model '{}' stopped while loading",
                entry.config.name
            ))
        })?;
    Ok(state.clone())
}

/// Takes an entry out of service: refuses new requests, lets queued and running ones
/// finish (each is bounded by its own deadline), then stops its instances. Anything that
/// slipped in after the drain is answered 503 rather than left waiting.
async fn retire(entry: &ModelEntry, changes: &watch::Sender<()>) {
    entry.unloading.store(true, Ordering::Release);
    changes.send_replace(());
    entry.scheduler.drain().await;
    entry.scheduler.abort().await;
    futures::future::join_all(entry.instances.iter().map(|i| i.shutdown())).await;
}

/// Every state change of one model version is a change of the engine (`Engine::changes`).
/// Ends when the scheduler drops its end of the state channel.
fn forward_changes(mut state: watch::Receiver<ModelState>, changes: watch::Sender<()>) {
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            changes.send_replace(());
        }
    });
}

/// Queue depth is the places taken in the queue, read at scrape time (nothing per request).
/// A sampler whose model was unloaded (or replaced by a reload) stops writing.
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
        if let Some(p) = places.upgrade() {
            let taken = capacity.saturating_sub(p.available_permits());
            model.set_queue_depth(i64::try_from(taken).unwrap_or(i64::MAX));
        }
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
        state: m.state(),
        ready_instances: ready_instances as u32,
    }
}
