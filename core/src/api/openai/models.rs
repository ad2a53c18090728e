//! `GET /v1/models` and `GET /v1/models/{id}`, and the one lookup every `/v1` route makes:
//! the body's `model` (an LLM's `served_model_name`) -> the KServe model that serves it.

use super::Ctx;
use super::error::OpenAiError;
use crate::api::backend::Backend;
use crate::engine::{EngineError, LlmModel};
use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};
use std::sync::OnceLock;

/// The LLM served as `name`; 404 `model_not_found` listing the served names otherwise.
pub fn find<B: Backend>(backend: &B, name: &str) -> Result<LlmModel, OpenAiError> {
    let models = backend.llm_models();
    if let Some(m) = models.iter().find(|m| m.served_model_name == name) {
        return Ok(m.clone());
    }
    let served: Vec<&str> = models
        .iter()
        .map(|m| m.served_model_name.as_str())
        .collect();
    Err(EngineError::ModelNotFound {
        name: name.to_string(),
        available: if served.is_empty() {
            "none (no LLM model is ready)".to_string()
        } else {
            served.join(", ")
        },
    }
    .into())
}

/// Unix seconds at the first call: a model's `created` (OpenAI's is its publication time;
/// ours is when this server started answering for it, stable across calls).
fn created() -> u64 {
    static CREATED: OnceLock<u64> = OnceLock::new();
    *CREATED.get_or_init(super::unix_now)
}

fn model_json(m: &LlmModel) -> Value {
    json!({
        "id": m.served_model_name,
        "object": "model",
        "created": created(),
        "owned_by": "unimodel",
        // vLLM's extension: what a client needs to size its requests.
        "max_model_len": m.max_model_len,
    })
}

/// `GET /v1/models`: 200 `{"object": "list", "data": [...]}`, every LLM that can answer.
pub async fn list<B: Backend>(State(ctx): State<Ctx<B>>) -> Json<Value> {
    let data: Vec<Value> = ctx.backend.llm_models().iter().map(model_json).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (ids may hold `/`): 200 the model, 404 `model_not_found`.
pub async fn get<B: Backend>(
    State(ctx): State<Ctx<B>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    let m = find(&*ctx.backend, &id)?;
    Ok(Json(model_json(&m)))
}
