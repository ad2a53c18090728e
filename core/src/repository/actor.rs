//! The repository actor: the one owner of the repository's model table.
//!
//! `Repository` is a cloneable handle; `index`, `load` and `unload` are messages to one task.
//! A load or unload runs in its own task so a slow model never blocks the others, but the
//! operations of one model run one after another, in arrival order (a second load waits for
//! the first). The engine holds what is served; this table only remembers what the engine
//! cannot say: a load that failed before any worker ran (bad config, import error) and
//! versions that were unloaded.

use super::error::RepositoryError;
use super::scan::{ModelSpec, Source, VersionSpec};
use crate::engine::{Engine, EngineError, Executor, ModelConfig, ModelState};
use crate::telemetry::panics::spawn_monitored;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// Whether clients may load and unload models (Triton's `--model-control-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlMode {
    /// Every model in the repository is loaded at start; load and unload are refused.
    None,
    /// Only the models named at start are loaded; clients load and unload the others.
    Explicit,
}

/// One row of the repository index (Triton's `RepositoryIndex` shape).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IndexEntry {
    pub name: String,
    /// Empty when no version is known (never loaded, or failed before reading versions).
    pub version: String,
    /// READY, LOADING, UNLOADING, UNAVAILABLE or FAILED.
    pub state: String,
    pub reason: String,
}

/// A version ready to hand to the engine: its config and its started instances.
pub type Built = (ModelConfig, Vec<Arc<dyn Executor>>);

/// Builds what the engine serves for one version: inspects the plugin and spawns its
/// workers. Implemented by the CLI (which knows the Python and worker settings).
pub trait Loader: Send + Sync + 'static {
    /// The model config and its started instances, or why they could not be made.
    fn build(
        &self,
        spec: &ModelSpec,
        version: &VersionSpec,
    ) -> BoxFuture<'static, Result<Built, String>>;
}

type Reply = oneshot::Sender<Result<(), RepositoryError>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Load,
    Unload,
}

enum Msg {
    Index {
        ready_only: bool,
        reply: oneshot::Sender<Result<Vec<IndexEntry>, RepositoryError>>,
    },
    Run {
        kind: OpKind,
        name: String,
        reply: Reply,
    },
    /// An operation's task is done: record what the engine cannot say, then answer.
    Finished {
        name: String,
        notes: Notes,
        result: Result<(), RepositoryError>,
        reply: Reply,
    },
}

/// What is known of versions the engine does not serve, by version ("" for the model).
type Notes = BTreeMap<String, Note>;

#[derive(Clone, Debug)]
enum Note {
    Failed(String),
    Unloaded,
}

#[derive(Default)]
struct Record {
    notes: Notes,
    running: Option<OpKind>,
    waiting: VecDeque<(OpKind, Reply)>,
}

/// Handle to the repository actor; cheap to clone.
#[derive(Clone)]
pub struct Repository {
    tx: mpsc::Sender<Msg>,
    mode: ControlMode,
    settled: watch::Receiver<bool>,
    changes: watch::Receiver<()>,
}

/// Everything an operation task needs.
#[derive(Clone)]
struct Shared {
    source: Arc<Source>,
    loader: Arc<dyn Loader>,
    engine: Engine,
}

impl Repository {
    /// Starts the actor over `source`; no model is loaded yet (see `load_at_start`).
    /// `loads_coming`: start-up loads follow, so the server is not ready before they begin.
    pub fn start(
        source: Source,
        loader: Arc<dyn Loader>,
        engine: Engine,
        mode: ControlMode,
        loads_coming: bool,
    ) -> Repository {
        let (tx, rx) = mpsc::channel(64);
        let (settled_tx, settled) = watch::channel(!loads_coming);
        let (changes_tx, changes) = watch::channel(());
        // A panic in the actor (a bug) leaves nobody to load, unload or list models: the
        // server is then never ready again (the panic is logged with the reason).
        let on_panic = {
            let settled = settled_tx.clone();
            move |_: String| {
                settled.send_replace(false);
            }
        };
        let actor = Actor {
            shared: Shared {
                source: Arc::new(source),
                loader,
                engine,
            },
            records: BTreeMap::new(),
            tx: tx.clone(),
            settled: settled_tx,
            changes: changes_tx,
        };
        spawn_monitored("model repository", actor.run(rx), on_panic);
        Repository {
            tx,
            mode,
            settled,
            changes,
        }
    }

    pub fn mode(&self) -> ControlMode {
        self.mode
    }

    /// No load is running and no model that should be served failed to load.
    pub fn settled(&self) -> bool {
        *self.settled.borrow()
    }

    /// Marked after every operation starts or ends (what `index` says may have changed):
    /// an event for observers such as cluster registration.
    pub fn changes(&self) -> watch::Receiver<()> {
        let mut rx = self.changes.clone();
        rx.mark_unchanged();
        rx
    }

    /// Every model of the repository with its versions' states; `ready_only` keeps READY rows.
    pub async fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, RepositoryError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Index { ready_only, reply }).await?;
        rx.await.map_err(|_| RepositoryError::ShuttingDown)?
    }

    /// Loads (or reloads, re-reading its files) model `name`; answers once it serves or failed.
    pub async fn load(&self, name: &str) -> Result<(), RepositoryError> {
        self.allowed("load", name)?;
        self.load_at_start(name).await
    }

    /// Unloads every version of `name`; answers once their requests finished and workers stopped.
    pub async fn unload(&self, name: &str) -> Result<(), RepositoryError> {
        self.allowed("unload", name)?;
        self.run(OpKind::Unload, name).await
    }

    /// A load the server itself asks for (at start), whatever the control mode.
    pub async fn load_at_start(&self, name: &str) -> Result<(), RepositoryError> {
        self.run(OpKind::Load, name).await
    }

    fn allowed(&self, action: &'static str, name: &str) -> Result<(), RepositoryError> {
        match self.mode {
            ControlMode::Explicit => Ok(()),
            ControlMode::None => Err(RepositoryError::ControlDisabled {
                action,
                name: name.to_string(),
            }),
        }
    }

    async fn run(&self, kind: OpKind, name: &str) -> Result<(), RepositoryError> {
        let (reply, rx) = oneshot::channel();
        let name = name.to_string();
        self.send(Msg::Run { kind, name, reply }).await?;
        rx.await.map_err(|_| RepositoryError::ShuttingDown)?
    }

    async fn send(&self, msg: Msg) -> Result<(), RepositoryError> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| RepositoryError::ShuttingDown)
    }
}

struct Actor {
    shared: Shared,
    records: BTreeMap<String, Record>,
    /// To hand each operation task a way back.
    tx: mpsc::Sender<Msg>,
    settled: watch::Sender<bool>,
    /// Bumped after each operation starts or ends (`Repository::changes`).
    changes: watch::Sender<()>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Index { ready_only, reply } => {
                    let _ = reply.send(self.index(ready_only));
                    self.publish_settled();
                    continue;
                }
                Msg::Run { kind, name, reply } => {
                    let record = self.records.entry(name.clone()).or_default();
                    record.waiting.push_back((kind, reply));
                    self.next(&name);
                }
                Msg::Finished {
                    name,
                    notes,
                    result,
                    reply,
                } => {
                    if let Some(record) = self.records.get_mut(&name) {
                        record.running = None;
                        record.notes = notes;
                    }
                    // Readiness first, then the answer: a client that unloads a failed model
                    // and then asks `/v2/health/ready` must see the state its call produced.
                    self.publish_settled();
                    let _ = reply.send(result);
                    self.next(&name);
                    self.forget_if_empty(&name);
                }
            }
            self.publish_settled();
            self.changes.send_replace(());
        }
    }

    /// Starts the model's next waiting operation unless one is running.
    fn next(&mut self, name: &str) {
        let Some(record) = self.records.get_mut(name) else {
            return;
        };
        if record.running.is_some() {
            return;
        }
        let Some((kind, reply)) = record.waiting.pop_front() else {
            return;
        };
        record.running = Some(kind);
        let shared = self.shared.clone();
        let notes = record.notes.clone();
        let tx = self.tx.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let (result, notes) = match kind {
                OpKind::Load => load(&shared, &name, notes).await,
                OpKind::Unload => unload(&shared, &name, notes).await,
            };
            let done = Msg::Finished {
                name,
                notes,
                result,
                reply,
            };
            // The actor is gone only when the server stops; nobody waits for the answer then.
            let _ = tx.send(done).await;
        });
    }

    /// A record with nothing to say (e.g. after a load of an unknown name) is dropped, so
    /// the index lists only real models.
    fn forget_if_empty(&mut self, name: &str) {
        if self
            .records
            .get(name)
            .is_some_and(|r| r.running.is_none() && r.waiting.is_empty() && r.notes.is_empty())
        {
            self.records.remove(name);
        }
    }

    /// Settled: no load running, and every failure is covered by a version still served
    /// (a failed reload leaves the old version serving; that is not a readiness problem).
    fn publish_settled(&self) {
        let served = self.shared.engine.models();
        let covered = |name: &str, version: &str| {
            served.iter().any(|s| {
                s.config.name == name && (version.is_empty() || s.config.version == version)
            })
        };
        let settled = self.records.iter().all(|(name, r)| {
            r.running != Some(OpKind::Load)
                && r.notes
                    .iter()
                    .all(|(v, n)| !matches!(n, Note::Failed(_)) || covered(name, v))
        });
        self.settled.send_if_modified(|cur| {
            let changed = *cur != settled;
            *cur = settled;
            changed
        });
    }

    fn index(&self, ready_only: bool) -> Result<Vec<IndexEntry>, RepositoryError> {
        let mut names = self.shared.source.names()?;
        let served = self.shared.engine.models();
        names.extend(served.iter().map(|s| s.config.name.clone()));
        names.extend(self.records.keys().cloned());
        names.sort();
        names.dedup();
        let mut rows = Vec::new();
        for name in names {
            let before = rows.len();
            for s in served.iter().filter(|s| s.config.name == name) {
                rows.push(IndexEntry {
                    name: name.clone(),
                    version: s.config.version.clone(),
                    state: s.state.name().to_string(),
                    reason: reason_of(&s.state),
                });
            }
            let record = self.records.get(&name);
            let in_engine: Vec<String> = rows[before..].iter().map(|r| r.version.clone()).collect();
            for (version, note) in record.map(|r| &r.notes).into_iter().flatten() {
                if in_engine.contains(version) {
                    continue;
                }
                let (state, reason) = match note {
                    Note::Failed(reason) => ("FAILED", reason.clone()),
                    Note::Unloaded => ("UNAVAILABLE", "unloaded".to_string()),
                };
                rows.push(IndexEntry {
                    name: name.clone(),
                    version: version.clone(),
                    state: state.into(),
                    reason,
                });
            }
            if rows.len() == before {
                let loading = record.is_some_and(|r| r.running == Some(OpKind::Load));
                let (state, reason) = if loading {
                    ("LOADING", "")
                } else {
                    ("UNAVAILABLE", "not loaded")
                };
                rows.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: state.into(),
                    reason: reason.into(),
                });
            }
        }
        if ready_only {
            rows.retain(|r| r.state == "READY");
        }
        Ok(rows)
    }
}

/// The reason column for a served version's state.
fn reason_of(state: &ModelState) -> String {
    match state {
        ModelState::Failed { error, .. } => error.clone(),
        ModelState::Unavailable { reason } => reason.clone(),
        ModelState::Stopping => "unloading: finishing queued and running requests".into(),
        ModelState::Loading | ModelState::Ready => String::new(),
    }
}

/// Versions of `name` the engine serves now.
fn served_versions(engine: &Engine, name: &str) -> Vec<String> {
    engine
        .models()
        .into_iter()
        .filter(|s| s.config.name == name)
        .map(|s| s.config.version.clone())
        .collect()
}

/// Reads the model from disk, loads every selected version (reloading served ones) and
/// unloads served versions the policy no longer selects. A config error leaves what is
/// served untouched.
async fn load(
    shared: &Shared,
    name: &str,
    mut notes: Notes,
) -> (Result<(), RepositoryError>, Notes) {
    let spec = match shared.source.resolve(name) {
        Ok(spec) => spec,
        Err(e @ RepositoryError::UnknownModel { .. }) => return (Err(e), notes),
        Err(e) => {
            notes.insert(String::new(), Note::Failed(e.to_string()));
            return (Err(e), notes);
        }
    };
    notes.remove("");
    let loads = spec.versions.iter().map(|v| load_version(shared, &spec, v));
    let results = futures::future::join_all(loads).await;
    let mut failures = Vec::new();
    for (v, result) in spec.versions.iter().zip(results) {
        let key = v.version.to_string();
        match result {
            Ok(()) => {
                notes.remove(&key);
            }
            Err(reason) => {
                failures.push(format!("version {key}: {reason}"));
                notes.insert(key, Note::Failed(reason));
            }
        }
    }
    let selected: Vec<String> = spec
        .versions
        .iter()
        .map(|v| v.version.to_string())
        .collect();
    for old in served_versions(&shared.engine, name) {
        if !selected.contains(&old) && shared.engine.unload(name, &old).await.is_ok() {
            notes.insert(old, Note::Unloaded);
        }
    }
    if failures.is_empty() {
        return (Ok(()), notes);
    }
    let err = RepositoryError::LoadFailed {
        name: name.to_string(),
        reason: failures.join("; "),
    };
    (Err(err), notes)
}

async fn load_version(shared: &Shared, spec: &ModelSpec, v: &VersionSpec) -> Result<(), String> {
    // A panic while building (a bug) fails this load with its message, instead of killing
    // the load task and leaving the model LOADING for good. The panic hook has logged it.
    let built = AssertUnwindSafe(shared.loader.build(spec, v))
        .catch_unwind()
        .await
        .map_err(|panic| {
            format!(
                "internal error while loading (a bug, please report it): {}",
                crate::telemetry::panics::message_of(&*panic)
            )
        })?;
    let (config, instances) = built?;
    match shared.engine.load(config, instances).await {
        Ok(ModelState::Failed { error, .. }) => Err(error),
        Ok(_) => Ok(()),
        Err(EngineError::ShuttingDown) => Err("the server is shutting down".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Unloads every served version of `name` at once.
async fn unload(
    shared: &Shared,
    name: &str,
    mut notes: Notes,
) -> (Result<(), RepositoryError>, Notes) {
    let versions = served_versions(&shared.engine, name);
    if versions.is_empty() && notes.is_empty() {
        // Unloading what is not loaded succeeds (as in Triton), if the model exists at all.
        if let Err(e @ RepositoryError::UnknownModel { .. }) = shared.source.resolve(name) {
            return (Err(e), notes);
        }
    }
    let unloads = versions.iter().map(|v| shared.engine.unload(name, v));
    futures::future::join_all(unloads).await;
    notes.retain(|_, n| !matches!(n, Note::Failed(_)));
    notes.remove("");
    for v in versions {
        notes.insert(v, Note::Unloaded);
    }
    (Ok(()), notes)
}
