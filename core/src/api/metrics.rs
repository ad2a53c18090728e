//! `GET /metrics` (Prometheus text format) and the per-request recording the infer route does.
//!
//! The route serves on the main HTTP port and, with `--metrics-port`, on a listener of its
//! own (`routes` is the whole app there). Requests are recorded here, after the response is
//! built, because only then is the final outcome known (`outcome.rs`).

use super::backend::Backend;
use super::error::ApiError;
use super::outcome::OUTCOME_SUCCESS;
use crate::telemetry::metrics::{CONTENT_TYPE, Metrics};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use tokio::time::Instant;

/// A router with only `GET /metrics`.
pub fn routes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

/// `GET /metrics`: 200, every metric in the Prometheus text format (version 0.0.4).
async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode()).into_response()
}

/// The model a request asked for, as it came in and as it was served.
pub struct Target<'a> {
    pub model: &'a str,
    pub version: Option<&'a str>,
    /// The version that answered (known only on success).
    pub served_version: Option<&'a str>,
}

/// Records one infer request: its outcome, and its latency if it succeeded. A request for a
/// model that is not served is labelled with empty model and version, so clients cannot
/// create series at will.
pub fn record_infer<B: Backend>(
    metrics: &Metrics,
    backend: &B,
    protocol: &'static str,
    target: Target<'_>,
    result: &Result<Response, ApiError>,
    started: Instant,
) {
    let elapsed = started.elapsed();
    match (result, target.served_version) {
        (Ok(_), Some(version)) => {
            metrics.record_request(target.model, version, protocol, OUTCOME_SUCCESS, elapsed)
        }
        (result, _) => {
            let outcome = match result {
                Ok(_) => OUTCOME_SUCCESS,
                Err(e) => e.outcome(),
            };
            match backend.model(target.model, target.version) {
                Ok(status) => metrics.record_request(
                    &status.config.name,
                    &status.config.version,
                    protocol,
                    outcome,
                    elapsed,
                ),
                Err(_) => metrics.record_request("", "", protocol, outcome, elapsed),
            }
        }
    }
}
