//! What the HTTP routes need from the engine, as a trait.
//!
//! The methods mirror `engine::Engine` one for one, so the production implementation is
//! plain delegation; tests drive the router with a fake backend instead of real workers.

use crate::engine::{Engine, EngineError, InferRequest, InferResponse, ModelStats, ModelStatus};
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
    /// Validates, queues, batches and executes one request.
    fn infer(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferResponse, EngineError>> + Send;
    /// Statistics of one model, or of every model when `name` is `None`.
    fn stats(
        &self,
        name: Option<&str>,
        version: Option<&str>,
    ) -> Result<Vec<ModelStats>, EngineError>;
    /// Where requests are recorded and what `/metrics` serves; `None`: no metrics.
    fn metrics(&self) -> Option<Arc<Metrics>> {
        None
    }
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

    fn infer(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferResponse, EngineError>> + Send {
        Engine::infer(self, req)
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
}
