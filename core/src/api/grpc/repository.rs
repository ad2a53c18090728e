//! The model repository RPCs (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload):
//! translations onto `Backend::{repository_index, load_model, unload_model}`, the calls the
//! REST `/v2/repository/*` routes make. Errors are `RepositoryError`s, coded in `status.rs`.

use super::proto::*;
use crate::api::{ApiError, Backend};

/// Every model the repository knows (only ready ones with `ready`), as Triton lists them.
pub async fn index<B: Backend>(
    backend: &B,
    req: RepositoryIndexRequest,
) -> Result<RepositoryIndexResponse, ApiError> {
    let rows = backend.repository_index(req.ready).await?;
    Ok(RepositoryIndexResponse {
        models: rows
            .into_iter()
            .map(|r| repository_index_response::ModelIndex {
                name: r.name,
                version: r.version,
                state: r.state,
                reason: r.reason,
            })
            .collect(),
    })
}

/// Loads (or reloads) a model; answers once it is READY.
pub async fn load<B: Backend>(
    backend: &B,
    req: RepositoryModelLoadRequest,
) -> Result<RepositoryModelLoadResponse, ApiError> {
    // Triton's clients send "config" (and "file:..." entries) to override the model's files.
    if let Some(key) = req
        .parameters
        .keys()
        .find(|k| *k == "config" || k.starts_with("file:"))
    {
        return Err(ApiError::BadRequest(format!(
            "load parameter '{key}' is not supported: edit the model's config.toml and plugin.py in the repository, then load again"
        )));
    }
    backend.load_model(&req.model_name).await?;
    Ok(RepositoryModelLoadResponse {})
}

/// Unloads a model; answers once its requests are answered and its workers stopped.
/// `unload_dependents` is accepted and has nothing to do (no ensembles).
pub async fn unload<B: Backend>(
    backend: &B,
    req: RepositoryModelUnloadRequest,
) -> Result<RepositoryModelUnloadResponse, ApiError> {
    backend.unload_model(&req.model_name).await?;
    Ok(RepositoryModelUnloadResponse {})
}
