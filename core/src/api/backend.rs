//! What the HTTP routes need from the engine, as a trait.
//!
//! The methods mirror `engine::Engine` one for one, so the production implementation is
//! plain delegation; tests drive the router with a fake backend instead of real workers.
//! No method has a default body: a backend that forgot one (as `unimodel serve` once forgot
//! `infer_stream`, and answered every stream with "use generate_stream") does not compile.
//! The repository methods are protocol-neutral, for REST (`/v2/repository/*`) and gRPC
//! (`RepositoryIndex`, `RepositoryModelLoad`, `RepositoryModelUnload`) alike; `Engine`
//! (`unimodel run`) has no repository, `repository::ModelServer` (`unimodel serve`) has.

use crate::engine::{
    Engine, EngineError, InferRequest, InferResponse, InferStream, LlmModel, ModelStats,
    ModelStatus,
};
use crate::repository::{IndexEntry, ModelServer, RepositoryError};
use crate::telemetry::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;

/// The engine as seen by the routes.
pub trait Backend: Send + Sync + 'static {
    /// The process is up.
    fn live(&self) -> bool;
    /// Every model is ready and the server is not draining.
    fn ready(&self) -> bool;
    /// All models, sorted by name.
    fn models(&self) -> Vec<ModelStatus>;
    /// One model; `version` `None` means the default version.
    fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError>;
    /// The LLM models that can answer now, for the OpenAI routes (`/v1/models`, and the
    /// body's `model` -> the KServe model its requests go to).
    fn llm_models(&self) -> Vec<LlmModel>;
    /// Validates, queues, batches and executes one request.
    fn infer(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferResponse, EngineError>> + Send;
    /// Like `infer`, answered with a stream of responses: one per chunk a generator model
    /// yields (KServe `generate_stream`, gRPC `ModelStreamInfer`), exactly one for an
    /// ordinary model. Errors before the first response (unknown model, invalid input, 429,
    /// not ready) are this call's `Err`; once streaming, an error is the stream's last item.
    /// Dropping the stream cancels the request, a generator already running included.
    fn infer_stream(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferStream, EngineError>> + Send;
    /// Statistics of one model, or of every model when `name` is `None`.
    fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError>;
    /// Where requests are recorded and what `/metrics` serves; `None`: no metrics.
    fn metrics(&self) -> Option<Arc<Metrics>>;
    /// Whether models can be loaded and unloaded (`unimodel serve`): decides whether server
    /// metadata announces the model repository extension.
    fn has_repository(&self) -> bool;
    /// The model repository index: every model with each version's state (READY, LOADING,
    /// UNLOADING, UNAVAILABLE, FAILED) and, when not READY, the reason; `ready_only` keeps
    /// the READY rows. Without a repository: the models served.
    fn repository_index(
        &self,
        ready_only: bool,
    ) -> impl Future<Output = Result<Vec<IndexEntry>, RepositoryError>> + Send;
    /// Loads model `name`, or reloads it (re-reading its files) when loaded; answers once
    /// every selected version is READY (`Ok`) or has failed (`LoadFailed` with the reason).
    /// Refused with `ControlDisabled` under `--model-control-mode none`.
    /// Without a repository: `NoRepository`.
    fn load_model(&self, name: &str) -> impl Future<Output = Result<(), RepositoryError>> + Send;
    /// Unloads every version of model `name`: new requests are refused at once, queued and
    /// running ones finish, then its workers stop. Unloading a model that is not loaded
    /// succeeds; an unknown name is `UnknownModel`. Without a repository: `NoRepository`.
    fn unload_model(&self, name: &str) -> impl Future<Output = Result<(), RepositoryError>> + Send;
}

/// The index of what is served, for a backend without a repository.
pub fn served_index(models: &[ModelStatus], ready_only: bool) -> Vec<IndexEntry> {
    models
        .iter()
        .filter(|m| !ready_only || m.state.is_ready())
        .map(|m| IndexEntry {
            name: m.config.name.clone(),
            version: m.config.version.clone(),
            state: m.state.name().to_string(),
            reason: match &m.state {
                crate::engine::ModelState::Failed { error, .. } => error.clone(),
                crate::engine::ModelState::Unavailable { reason } => reason.clone(),
                _ => String::new(),
            },
        })
        .collect()
}

impl Backend for Engine {
    fn live(&self) -> bool {
        Engine::live(self)
    }

    fn ready(&self) -> bool {
        Engine::ready(self)
    }

    fn models(&self) -> Vec<ModelStatus> {
        Engine::models(self)
    }

    fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        Engine::model(self, name, version)
    }

    fn llm_models(&self) -> Vec<LlmModel> {
        Engine::llm_models(self)
    }

    fn infer(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferResponse, EngineError>> + Send {
        Engine::infer(self, req)
    }

    fn infer_stream(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferStream, EngineError>> + Send {
        Engine::infer_stream(self, req)
    }

    fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError> {
        Engine::stats(self, name, version)
    }

    fn metrics(&self) -> Option<Arc<Metrics>> {
        Some(Engine::metrics(self).clone())
    }

    fn has_repository(&self) -> bool {
        false
    }

    fn repository_index(
        &self,
        ready_only: bool,
    ) -> impl Future<Output = Result<Vec<IndexEntry>, RepositoryError>> + Send {
        let rows = served_index(&Engine::models(self), ready_only);
        async move { Ok(rows) }
    }

    /// `unimodel run` serves what it was given: nothing to load or unload.
    async fn load_model(&self, _name: &str) -> Result<(), RepositoryError> {
        Err(RepositoryError::NoRepository)
    }

    async fn unload_model(&self, _name: &str) -> Result<(), RepositoryError> {
        Err(RepositoryError::NoRepository)
    }
}

impl Backend for ModelServer {
    fn live(&self) -> bool {
        self.engine.live()
    }

    /// Every model that should be loaded is READY (none loading, none failed), not draining.
    fn ready(&self) -> bool {
        self.engine.ready() && self.repository.settled()
    }

    fn models(&self) -> Vec<ModelStatus> {
        self.engine.models()
    }

    fn model(&self, name: &str, version: Option<&str>) -> Result<ModelStatus, EngineError> {
        self.engine.model(name, version)
    }

    fn llm_models(&self) -> Vec<LlmModel> {
        self.engine.llm_models()
    }

    fn infer(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferResponse, EngineError>> + Send {
        self.engine.infer(req)
    }

    fn infer_stream(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferStream, EngineError>> + Send {
        self.engine.infer_stream(req)
    }

    fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError> {
        self.engine.stats(name, version)
    }

    fn metrics(&self) -> Option<Arc<Metrics>> {
        Some(self.engine.metrics().clone())
    }

    fn has_repository(&self) -> bool {
        true
    }

    fn repository_index(
        &self,
        ready_only: bool,
    ) -> impl Future<Output = Result<Vec<IndexEntry>, RepositoryError>> + Send {
        self.repository.index(ready_only)
    }

    fn load_model(&self, name: &str) -> impl Future<Output = Result<(), RepositoryError>> + Send {
        self.repository.load(name)
    }

    fn unload_model(&self, name: &str) -> impl Future<Output = Result<(), RepositoryError>> + Send {
        self.repository.unload(name)
    }
}
