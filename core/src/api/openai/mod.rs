//! The OpenAI-compatible API on the HTTP port under `/v1` (docs/llm.md "OpenAI API").
//!
//! A thin adapter, like the KServe routes: an OpenAI body becomes ordinary `InferRequest`s
//! (`text_input` and `parameters`, docs/llm.md "Serving: how the pieces connect") submitted
//! through the `Backend` with `infer_stream`, and the responses become OpenAI JSON or SSE.
//! The routes sit in the same router as the KServe ones, so auth, rate limits, body
//! limits, compression, tracing, the access log, metrics and drain apply unchanged.
//!
//! - `models`: `GET /v1/models[/{id}]`, and `model` -> the KServe model.
//! - `fields`: reading body fields with errors that name the field.
//! - `request`: an OpenAI body -> one `InferRequest` per choice.
//! - `delta`: one response of the model's stream -> the text, counts and logprobs it adds.
//! - `reply`: the chat and completions shapes (bodies, chunks, usage, logprobs).
//! - `answer`: the POST handlers: submit, then collect or stream.
//! - `error`: OpenAI's error body over `ApiError`'s statuses, and `reshape` for the shared
//!   layers' errors under `/v1`.

mod answer;
mod delta;
pub mod error;
mod fields;
mod models;
mod reply;
mod request;

#[cfg(test)]
mod tests;

use crate::api::backend::Backend;
use crate::api::body_budget::BodyBudget;
use crate::telemetry::metrics::Metrics;
use axum::Router;
use axum::extract::FromRef;
use axum::routing::{get, post};
use std::sync::Arc;

pub use error::reshape;

/// What the `/v1` handlers need (taken from the HTTP router's state with `FromRef`).
pub struct Ctx<B> {
    pub backend: Arc<B>,
    /// `--max-body-bytes`.
    pub max_body_bytes: usize,
    /// `--max-buffered-bytes`, shared with every tensor route.
    pub budget: BodyBudget,
    pub metrics: Option<Arc<Metrics>>,
}

// Derived Clone would demand `B: Clone`; only the Arcs are cloned.
impl<B> Clone for Ctx<B> {
    fn clone(&self) -> Self {
        Ctx {
            backend: Arc::clone(&self.backend),
            max_body_bytes: self.max_body_bytes,
            budget: self.budget.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The `/v1` routes, for a router whose state yields a `Ctx`.
pub fn routes<B: Backend, S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Ctx<B>: FromRef<S>,
{
    Router::new()
        .route("/v1/models", get(models::list::<B>))
        .route("/v1/models/{*id}", get(models::get::<B>))
        .route("/v1/chat/completions", post(answer::chat::<B>))
        .route("/v1/completions", post(answer::completions::<B>))
}

/// Seconds since the Unix epoch (`created` fields).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
