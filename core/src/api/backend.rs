//! What the HTTP routes need from the engine, as a trait.
//!
//! The methods mirror `engine::Engine` one for one, so the production implementation is
//! plain delegation; tests drive the router with a fake backend instead of real workers.

use crate::engine::{
    Engine, EngineError, InferRequest, InferResponse, InferStream, ModelStats, ModelStatus,
};
use crate::telemetry::metrics::Metrics;
use futures::StreamExt as _;
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
    /// Like `infer`, answered with a stream of responses: one per chunk a generator model
    /// yields (KServe `generate_stream`, gRPC `ModelStreamInfer`), exactly one for an
    /// ordinary model. Errors before the first response (unknown model, invalid input, 429,
    /// not ready) are this call's `Err`; once streaming, an error is the stream's last item.
    /// Dropping the stream cancels the request, a generator already running included. The
    /// default serves backends that cannot stream: `infer`'s one answer.
    fn infer_stream(
        &self,
        req: InferRequest,
    ) -> impl Future<Output = Result<InferStream, EngineError>> + Send {
        let answer = self.infer(req);
        async move {
            let response = answer.await?;
            Ok(futures::stream::once(async { Ok(response) }).boxed())
        }
    }
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
}
