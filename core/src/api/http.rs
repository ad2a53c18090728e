//! The KServe V2 REST routes (axum) and the server loop.
//!
//! Handlers only translate: they pull the path and body apart, call the `Backend`, and hand
//! the result to an encoder (`response.rs`, `metadata.rs`). Every failure is an `ApiError`,
//! whose `IntoResponse` (in `error.rs`) is the only place statuses are chosen. axum's own
//! rejections (body too large, bad path, unknown route, wrong method) are mapped to the same
//! `{"error": ...}` body. The OpenAI-compatible routes under `/v1` (`openai/`) share the
//! router and its layers. Bodies may be compressed both ways (`compression.rs`). With a
//! backend that has metrics, `GET /metrics` serves them and every infer request is recorded
//! (`metrics.rs`).

use super::backend::Backend;
use super::body_budget::BodyBudget;
use super::error::ApiError;
use super::metadata::{ModelMetadata, ServerMetadata, StatsResponse};
use super::metrics as api_metrics;
use super::observe::{BatchSize, RequestTrace};
use super::openapi;
use super::{generate, request, response, shm};
use crate::engine::EngineError;
use crate::regions::Regions;
use crate::telemetry::metrics::{Metrics, PROTOCOL_REST};
use axum::body::Body;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::Deserialize;
use std::future::Future;
use std::sync::Arc;
use tokio::time::Instant;

/// Largest body of a control route (repository index/load/unload, shm registration): their
/// bodies are a few small fields (load's "config" and "file:" overrides are refused), and
/// they are parsed into `serde_json` trees that cost many times their size, so they get far
/// less than `--max-body-bytes` and are not charged to `--max-buffered-bytes`.
pub const CONTROL_BODY_BYTES: usize = 1 << 20;

/// Settings of the HTTP front end.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted (`--max-body-bytes`); larger bodies get 413.
    pub max_body_bytes: usize,
    /// Budget for the bodies of tensor routes held at once (`--max-buffered-bytes`; see
    /// `body_budget.rs`), shared with gRPC; past it a body waits briefly, then gets 503; a
    /// body larger than all of it gets 413.
    pub budget: BodyBudget,
    /// Clients' shared-memory regions (`/v2/systemsharedmemory/*`, shm inputs and outputs).
    pub regions: Arc<Regions>,
    /// API keys / JWT (`--api-key-file`, `--jwt-*`); `None`: auth off, no layer at all.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

/// What every handler gets: the backend, the settings and where requests are recorded.
struct AppState<B> {
    backend: Arc<B>,
    cfg: Arc<HttpConfig>,
    metrics: Option<Arc<Metrics>>,
    budget: BodyBudget,
}

// Derived Clone would demand `B: Clone`; only the Arcs are cloned.
impl<B> Clone for AppState<B> {
    fn clone(&self) -> Self {
        AppState {
            backend: Arc::clone(&self.backend),
            cfg: Arc::clone(&self.cfg),
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
        }
    }
}

impl<B> axum::extract::FromRef<AppState<B>> for super::openai::Ctx<B> {
    fn from_ref(s: &AppState<B>) -> Self {
        super::openai::Ctx {
            backend: Arc::clone(&s.backend),
            max_body_bytes: s.cfg.max_body_bytes,
            budget: s.budget.clone(),
            metrics: s.metrics.clone(),
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
    // Below `--max-body-bytes` too when that is smaller.
    let control_body_limit = control_limit(&cfg);
    let regions = cfg.regions.clone();
    let metrics = backend.metrics();
    let auth = cfg.auth.clone();
    let gate = auth.map(|a| super::auth::AuthGate::new(a, metrics.clone()));
    if cfg.max_body_bytes > cfg.budget.total() {
        tracing::warn!(
            max_body_bytes = cfg.max_body_bytes,
            max_buffered_bytes = cfg.budget.total(),
            "--max-body-bytes is above --max-buffered-bytes: bodies and gRPC messages larger than --max-buffered-bytes get 413 / RESOURCE_EXHAUSTED"
        );
    }
    let budget = cfg.budget.clone();
    let state = AppState {
        backend,
        cfg: Arc::new(cfg),
        metrics,
        budget,
    };
    // Model repository (Triton's extension): index, load, unload.
    let control = Router::new()
        .route("/v2/repository/index", post(repository_index::<B>))
        .route(
            "/v2/repository/models/{model}/load",
            post(repository_load::<B>),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload::<B>),
        )
        .layer(DefaultBodyLimit::max(control_body_limit))
        .layer(axum::middleware::from_fn_with_state(
            control_body_limit,
            super::body_limit::refuse_declared_control,
        ));
    let routes = Router::new()
        .route("/v2", get(server_metadata::<B>))
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
        // The generate extension (`generate.rs`).
        .route("/v2/models/{model}/generate", post(generate::<B>))
        .route(
            "/v2/models/{model}/versions/{version}/generate",
            post(generate::<B>),
        )
        .route(
            "/v2/models/{model}/generate_stream",
            post(generate_stream::<B>),
        )
        .route(
            "/v2/models/{model}/versions/{version}/generate_stream",
            post(generate_stream::<B>),
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
        .merge(control)
        .merge(shm::routes(regions, control_body_limit))
        // The OpenAI-compatible API (`openai/`).
        .merge(super::openai::routes::<B, AppState<B>>())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit));
    // Under /v1, errors in OpenAI's shape: here, inside compression, for what the routes
    // answer (unknown route, wrong method, body too large); again outside auth below.
    let routes = routes.layer(axum::middleware::from_fn(super::openai::reshape));
    // Outside the body limit, so the limit counts decoded bytes (see `compression.rs`).
    let routes = super::compression::with_compression(routes);
    // Outside decompression, where `Content-Length` is still the client's own.
    let routes = routes.layer(axum::middleware::from_fn_with_state(
        limit,
        super::body_limit::refuse_declared_oversize,
    ));
    // Auth runs inside `observe`, so a denied request still gets its access log line.
    let routes = match gate {
        Some(gate) => routes.layer(axum::middleware::from_fn_with_state(
            gate,
            super::auth::check,
        )),
        None => routes,
    };
    // Outside auth, so its denials (and the 413 before decompression) under /v1 get
    // OpenAI's shape too; answers already reshaped inside pass through untouched.
    let routes = routes.layer(axum::middleware::from_fn(super::openai::reshape));
    routes
        .layer(axum::middleware::from_fn(super::observe::observe))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish before returning: `conn::serve_http` with no connection cap and the default
/// timeouts (tests and embedders; the CLI builds its own `Acceptor`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use super::conn::{Acceptor, ConnTimeouts, ConnectionLimit, HttpIncoming, serve_http};
    let acceptor = Acceptor::new(listener, ConnectionLimit::new(usize::MAX), None, "http");
    serve_http(
        HttpIncoming::Plain(acceptor),
        router,
        ConnTimeouts::default(),
        shutdown,
    )
    .await
}

/// `GET /v2`: 200 `{name, version, extensions}`.
async fn server_metadata<B: Backend>(State(s): State<AppState<B>>) -> Json<ServerMetadata> {
    Json(ServerMetadata::of(&*s.backend, &s.cfg.regions))
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
    let all = s.backend.models();
    let mut meta = ModelMetadata::new(&status);
    if p.version.is_none() {
        // Triton lists every version of the model here.
        meta.versions = all
            .iter()
            .filter(|m| m.config.name == status.config.name)
            .map(|m| m.config.version.as_str())
            .collect();
    }
    Ok(Json(meta).into_response())
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
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Path(p) = path?;
    let mut served_version = None;
    let answer = async {
        let body = s.budget.read(&headers, body, s.cfg.max_body_bytes).await?;
        let mut decoded = request::decode(
            p.model.clone(),
            p.version.clone(),
            &headers,
            body,
            &s.cfg.regions,
        )?;
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

/// Reads and decodes a generate body for the model in `p`.
async fn generate_request<B: Backend>(
    s: &AppState<B>,
    p: &ModelPath,
    trace: Option<Extension<RequestTrace>>,
    (headers, body): (HeaderMap, Body),
) -> Result<crate::engine::InferRequest, ApiError> {
    let body = s.budget.read(&headers, body, s.cfg.max_body_bytes).await?;
    let status = s.backend.model(&p.model, p.version.as_deref())?;
    let mut req = generate::decode(&status.config, p.model.clone(), p.version.clone(), &body)?;
    req.trace = trace.and_then(|Extension(t)| t.propagate.then_some(t.trace));
    Ok(req)
}

/// Records a generate request's outcome up to its first response.
fn record_generate<B: Backend>(
    s: &AppState<B>,
    p: &ModelPath,
    served_version: Option<&str>,
    answer: &Result<Response, ApiError>,
    started: Instant,
) {
    if let Some(m) = &s.metrics {
        let target = api_metrics::Target {
            model: &p.model,
            version: p.version.as_deref(),
            served_version,
        };
        let result = answer.as_ref().map(|_| ());
        api_metrics::record_infer(m, &*s.backend, PROTOCOL_REST, target, result, started);
    }
}

/// `POST /v2/models/{m}[/versions/{v}]/generate`: 200 one JSON object (a generator model's
/// chunks concatenated, see `generate.rs`); errors as `infer`.
async fn generate<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Path(p) = path?;
    let mut served_version = None;
    let answer = async {
        let req = generate_request(&s, &p, trace, (headers, body)).await?;
        let mut stream = s.backend.infer_stream(req).await?;
        let mut collected = generate::Collected::default();
        while let Some(item) = stream.next().await {
            let response = item?;
            served_version = Some(response.model_version.clone());
            collected.push(&response)?;
        }
        Ok(response::json_response(collected.finish().into_bytes()))
    }
    .await;
    record_generate(&s, &p, served_version.as_deref(), &answer, started);
    answer
}

/// `POST /v2/models/{m}[/versions/{v}]/generate_stream`: 200 `text/event-stream`, one
/// `data: {json}` event per response and `data: {"error"}` on a failure once streaming.
/// Errors before the first response are ordinary `{"error"}` responses, statuses as `infer`.
/// A client that disconnects cancels the request (its generator stops at its next `yield`).
async fn generate_stream<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<ModelPath>, PathRejection>,
    trace: Option<Extension<RequestTrace>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Path(p) = path?;
    let mut served_version = None;
    let answer = async {
        let req = generate_request(&s, &p, trace, (headers, body)).await?;
        let mut stream = s.backend.infer_stream(req).await?;
        // Waiting for the first response lets an early failure keep its status.
        let first = stream.next().await.transpose()?;
        served_version = first.as_ref().map(|r| r.model_version.clone());
        let events = futures::stream::iter(first.map(Ok))
            .chain(stream)
            .map(|item| Ok::<_, std::convert::Infallible>(generate::sse_event(item)));
        Ok(Sse::new(events).into_response())
    }
    .await;
    record_generate(&s, &p, served_version.as_deref(), &answer, started);
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
    let config = super::model_config::model_config(&status.config);
    Ok(Json(super::model_config::to_json(&config)).into_response())
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

/// The `{model}` path segment of the repository routes.
#[derive(Deserialize)]
struct RepositoryPath {
    model: String,
}

/// `POST /v2/repository/index` body: optional `{"ready": bool}`.
#[derive(Deserialize, Default)]
struct IndexBody {
    #[serde(default)]
    ready: bool,
}

/// `POST .../load` and `.../unload` body: optional `{"parameters": {...}}`.
#[derive(Deserialize, Default)]
struct ControlBody {
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
}

/// The body limit of the control routes (`CONTROL_BODY_BYTES`, or less).
fn control_limit(cfg: &HttpConfig) -> usize {
    cfg.max_body_bytes.min(CONTROL_BODY_BYTES)
}

/// An optional JSON body: empty (what tritonclient sends) means the default.
fn optional_json<T: serde::de::DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
    what: &'static str,
) -> Result<T, ApiError> {
    let body = body.map_err(|r| ApiError::from_control_body(r, limit, what))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid {what} body: {e}; expected {{}}")))
}

/// `POST /v2/repository/index`: 200 `[{"name","version","state","reason"}]`; 400 bad body.
async fn repository_index<B: Backend>(
    State(s): State<AppState<B>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: IndexBody = optional_json(body, control_limit(&s.cfg), "repository index")?;
    let rows = s.backend.repository_index(body.ready).await?;
    Ok(Json(rows).into_response())
}

/// `POST /v2/repository/models/{m}/load`: 200 (empty) once READY; 404 unknown model, 400 bad
/// config.toml (file and key named), explicit-mode only, or a config override in the body;
/// 500 the plugin failed to load (reason given); 503 shutting down.
async fn repository_load<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<RepositoryPath>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(p) = path?;
    let body: ControlBody = optional_json(body, control_limit(&s.cfg), "model load")?;
    // Triton's clients send "config" (and "file:..." entries) to override the model's files.
    if let Some(key) = body
        .parameters
        .keys()
        .find(|k| *k == "config" || k.starts_with("file:"))
    {
        return Err(ApiError::BadRequest(format!(
            "load parameter '{key}' is not supported: edit the model's config.toml and plugin.py in the repository, then load again"
        )));
    }
    s.backend.load_model(&p.model).await?;
    Ok(StatusCode::OK)
}

/// `POST /v2/repository/models/{m}/unload`: 200 (empty) once its requests are answered and
/// its workers stopped; 404 unknown model; 400 explicit-mode only. `unload_dependents` is
/// accepted and has nothing to do (no ensembles).
async fn repository_unload<B: Backend>(
    State(s): State<AppState<B>>,
    path: Result<Path<RepositoryPath>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(p) = path?;
    let _: ControlBody = optional_json(body, control_limit(&s.cfg), "model unload")?;
    s.backend.unload_model(&p.model).await?;
    Ok(StatusCode::OK)
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
