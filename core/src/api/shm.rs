//! The shared-memory REST routes (Triton's `systemsharedmemory` and `cudasharedmemory`
//! extensions). They only translate: `regions::Regions` does the work, and gRPC's
//! `SystemSharedMemory*` RPCs can call the same three functions (`register`, `status`,
//! `unregister`).
//!
//! Bodies are Triton's: register takes `{"key", "offset", "byte_size"}` and answers 200 with
//! an empty body, status answers a JSON list of `{"name", "key", "offset", "byte_size"}`,
//! unregister answers 200 (also for a name that is not registered, as Triton does). CUDA
//! routes exist so that tritonclient's calls get a clear "not supported" error, not a 404.

use super::error::ApiError;
use crate::regions::{RegionError, RegionStatus, Regions};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

/// The body of `POST /v2/systemsharedmemory/region/{r}/register`.
#[derive(Deserialize)]
struct RegisterBody {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

/// The shared-memory routes, ready to merge into the main router; their bodies are small
/// JSON objects, refused past `body_limit` (`http::CONTROL_BODY_BYTES`).
pub fn routes<S: Clone + Send + Sync + 'static>(
    regions: Arc<Regions>,
    body_limit: usize,
) -> Router<S> {
    Router::new()
        .route("/v2/systemsharedmemory/status", get(status_all))
        .route(
            "/v2/systemsharedmemory/region/{region}/status",
            get(status_one),
        )
        .route(
            "/v2/systemsharedmemory/region/{region}/register",
            post(move |regions, region, body| register(regions, region, body, body_limit)),
        )
        .route("/v2/systemsharedmemory/unregister", post(unregister_all))
        .route(
            "/v2/systemsharedmemory/region/{region}/unregister",
            post(unregister_one),
        )
        .route("/v2/cudasharedmemory/status", get(cuda))
        .route("/v2/cudasharedmemory/region/{region}/status", get(cuda))
        .route("/v2/cudasharedmemory/region/{region}/register", post(cuda))
        .route("/v2/cudasharedmemory/unregister", post(cuda))
        .route(
            "/v2/cudasharedmemory/region/{region}/unregister",
            post(cuda),
        )
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            super::body_limit::refuse_declared_control,
        ))
        .with_state(regions)
}

/// `GET /v2/systemsharedmemory/status`: 200, every region.
async fn status_all(
    State(regions): State<Arc<Regions>>,
) -> Result<Json<Vec<RegionStatus>>, ApiError> {
    Ok(Json(regions.status(None)?))
}

/// `GET /v2/systemsharedmemory/region/{r}/status`: 200 `[region]`; 400 unknown region.
async fn status_one(
    State(regions): State<Arc<Regions>>,
    region: Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<RegionStatus>>, ApiError> {
    let Path(name) = region?;
    Ok(Json(regions.status(Some(&name))?))
}

/// `POST /v2/systemsharedmemory/region/{r}/register`: 200; 403 without
/// `--allow-client-shm`; 400 bad key, missing segment, range past its end, duplicate name.
async fn register(
    State(regions): State<Arc<Regions>>,
    region: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
    body_limit: usize,
) -> Result<StatusCode, ApiError> {
    let Path(name) = region?;
    // tritonclient sends no Content-Type, so the body is parsed whatever it says.
    let body = body.map_err(|r| ApiError::from_control_body(r, body_limit, "shm register"))?;
    let body: RegisterBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid register request (expected {{\"key\", \"offset\", \"byte_size\"}}): {e}"
        ))
    })?;
    regions.register(&name, &body.key, body.offset, body.byte_size)?;
    Ok(StatusCode::OK)
}

/// `POST /v2/systemsharedmemory/unregister`: 200, every region forgotten.
async fn unregister_all(State(regions): State<Arc<Regions>>) -> StatusCode {
    regions.unregister(None);
    StatusCode::OK
}

/// `POST /v2/systemsharedmemory/region/{r}/unregister`: 200.
async fn unregister_one(
    State(regions): State<Arc<Regions>>,
    region: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = region?;
    regions.unregister(Some(&name));
    Ok(StatusCode::OK)
}

/// Every `/v2/cudasharedmemory/...` route: 501 with a clear message.
async fn cuda() -> ApiError {
    RegionError::CudaUnsupported.into()
}
