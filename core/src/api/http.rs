//! The KServe V2 REST routes (axum) and the server loop.
//!
//! Handlers only translate: they pull the path and body apart, call the `Backend`, and hand
//! the result to an encoder (`response.rs`, `metadata.rs`). Every failure is an `ApiError`,
//! whose `IntoResponse` (in `error.rs`) is the only place statuses are chosen. axum's own
//! rejections (body too large, bad path, unknown route, wrong method) are mapped to the same
//! `{"error": ...}` body. With a backend that has metrics, `GET /metrics` serves them and
//! every infer request is recorded (`metrics.rs`).

use super::backend::Backend;
use super::error::ApiError;
use super::metadata::{ModelMetadata, ServerMetadata, StatsResponse};
use super::metrics as api_metrics;
use super::observe::{BatchSize, RequestTrace};
use super::openapi;
use super::{request, response};
use crate::engine::EngineError;
use crate::telemetry::metrics::{Metrics, PROTOCOL_REST};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use std::future::Future;
use std::sync::Arc;
use tokio::time::Instant;

/// Settings of the HTTP front end.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted (`--max-body-bytes`); larger bodies get 413.
    pub max_body_bytes: usize,
}

/// What every handler gets: the backend, the settings and where requests are recorded.
struct AppState<B> {
    backend: Arc<B>,
    cfg: Arc<HttpConfig>,
    metrics: Option<Arc<Metrics>>,
}

// Derived Clone would demand `B: Clone`; only the Arcs are cloned.
impl<B> Clone for AppState<B> {
    fn clone(&self) -> Self {
        AppState {
            backend: Arc::clone(&self.backend),
            cfg: Arc::clone(&self.cfg),
            metrics: self.metrics.clone(),
        }
    }
}

/// The `{model}` and optional `{version}` path segments.
#[derive(Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

/// Builds the KServe V2 router over `backend`.
pub fn router<B: Backend>(backend: Arc<B>, cfg: HttpConfig) -> Router {
    let limit = cfg.max_body_bytes;
    let metrics = backend.metrics();
    let state = AppState {
        backend,
        cfg: Arc::new(cfg),
        metrics,
    };
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live::<B>))
        .route("/v2/health/ready", get(ready::<B>))
        .route("/health/live", get(live::<B>))
        .route("/health/ready", get(ready::<B>))
        .route("/v2/models/stats", get(stats::<B>))
        .route("/v2/models/{model}", get(model_metadata::<B>))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_metadata::<B>),
        )
        .route("/v2/models/{model}/ready", get(model_ready::<B>))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready::<B>),
        )
        .route("/v2/models/{model}/infer", post(infer::<B>))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer::<B>),
        )
        .route("/v2/models/{model}/stats", get(model_stats::<B>))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_stats::<B>),
        )
        .route("/v2/models/{model}/config", get(model_config::<B>))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config::<B>),
        )
        .route("/metrics", get(scrape_metrics::<B>))
        .route("/openapi.json", get(openapi::document))
        .route("/docs", get(openapi::page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(super::observe::observe))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (axum's graceful shutdown) before returning.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Responses are small and latency-bound: never let Nagle hold the last segment back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `GET /v2`: 200 `{name, version, extensions}`.
async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata::current())
}

/// `GET /v2/health/live`, `/health/live`: 200 (empty), or 503 `{"error"}`.
async fn live<B: Backend>(State(s): State<AppState<B>>) -> Result<StatusCode, ApiError> {
    if s.backend.live() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::Unavailable("server is not live".to_string()))
    }
}

/// `GET /v2/health/ready`, `/health/ready`: 200 (empty), or 503 `{"error"}` while a model
/// is not ready or the server drains.
async fn ready<B: Backend>(State(s): State<AppState<B>>) -> Result<StatusCode, ApiError> {
    if s.backend.ready() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::Unavailable(
            "server is not ready: a model is not ready or the server is shutting down".to_string(),
        ))
    }
}

/// `GET /v2/models/{m}[/versions/{v}]`: 200 metadata with `state` (and `error`/`traceback`
/// when failed or unavailable); 404 unknown model or version.
async fn model_metadata<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(p) = path?;
    let status = s.backend.model(&p.model, p.version.as_deref())?;
    Ok(Json(ModelMetadata::new(&status)).into_response())
}

/// `GET /v2/models/{m}[/versions/{v}]/ready`: 200 (empty) ready, 503 not ready, 404 unknown.
async fn model_ready<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(p) = path?;
    let status = s.backend.model(&p.model, p.version.as_deref())?;
    if status.state.is_ready() {
        return Ok(StatusCode::OK);
    }
    Err(EngineError::NotReady {
        model: status.config.name.clone(),
        state: status.state.name().to_string(),
    }
    .into())
}

/// `POST /v2/models/{m}[/versions/{v}]/infer`: 200 JSON or binary-extension response;
/// 400 unparsable or invalid request, 404 unknown model, 413 body over `--max-body-bytes`,
/// 429 queue full (`Retry-After: 1`), 500 plugin error, 503 not ready or worker failed,
/// 504 timed out.
async fn infer<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Path(p) = path?;
    let mut served_version = None;
    let answer = async {
        let body = body.map_err(|r| ApiError::from_body(r, s.cfg.max_body_bytes))?;
        let mut decoded = request::decode(p.model.clone(), p.version.clone(), &headers, body)?;
        decoded.request.trace = trace.and_then(|Extension(t)| t.propagate.then_some(t.trace));
        let result = s.backend.infer(decoded.request).await?;
        served_version = Some(result.model_version.clone());
        let mut encoded = response::encode(&result, &decoded.plan)?;
        encoded
            .extensions_mut()
            .insert(BatchSize(result.batch_size));
        Ok(encoded)
    }
    .await;
    if let Some(m) = &s.metrics {
        let target = api_metrics::Target {
            model: &p.model,
            version: p.version.as_deref(),
            served_version: served_version.as_deref(),
        };
        api_metrics::record_infer(
            m,
            &*s.backend,
            PROTOCOL_REST,
            target,
            answer.as_ref().map(|_| ()),
            started,
        );
    }
    answer
}

/// `GET /v2/models/{m}[/versions/{v}]/config`: 200 Triton's JSON model configuration (the
/// same message the gRPC ModelConfig RPC answers), 404 unknown model or version.
async fn model_config<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(p) = path?;
    let status = s.backend.model(&p.model, p.version.as_deref())?;
    let config = super::grpc::config::model_config(&status.config);
    Ok(Json(super::grpc::config::to_json(&config)).into_response())
}

/// `GET /metrics`: 200 Prometheus text format (version 0.0.4); 404 when the backend keeps
/// no metrics.
async fn scrape_metrics<B: Backend>(
    State(s): State<AppState<B>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    match &s.metrics {
        Some(m) => Ok(api_metrics::scrape_response(m)),
        None => Err(ApiError::RouteNotFound {
            method: Method::GET.to_string(),
            path: uri.path().to_string(),
        }),
    }
}

/// `GET /v2/models/stats`: 200 Triton statistics of every model.
async fn stats<B: Backend>(State(s): State<AppState<B>>) -> Result<Response, ApiError> {
    let stats = s.backend.stats(None, None)?;
    Ok(Json(StatsResponse::new(&stats)).into_response())
}

/// `GET /v2/models/{m}[/versions/{v}]/stats`: 200 Triton statistics, 404 unknown.
async fn model_stats<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(p) = path?;
    let stats = s.backend.stats(Some(&p.model), p.version.as_deref())?;
    Ok(Json(StatsResponse::new(&stats)).into_response())
}

/// Any other path: 404 `{"error"}` naming the method and path.
async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// A known path with another method: 405 `{"error"}`.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
