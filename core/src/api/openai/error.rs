//! OpenAI's error shape on `/v1`: `{"error": {"message", "type", "param", "code"}}`.
//!
//! Statuses are not chosen here: an `OpenAiError` wraps the `ApiError` every other route
//! fails with, so `api/error.rs` stays the one place a failure gets its status (and its
//! `Retry-After`, `WWW-Authenticate` and `unimodel-not-run` headers); this file only
//! rewrites the body. `reshape` does the same for answers the shared layers give before a
//! `/v1` handler runs (auth, rate limits, body limits, unknown routes), whose bodies are
//! Triton's `{"error": "<message>"}`.

use crate::api::error::ApiError;
use crate::engine::EngineError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// A failed `/v1` request: the classified error, and what OpenAI's body adds to it.
#[derive(Debug)]
pub struct OpenAiError {
    /// Boxed: results carry this on every path, and `ApiError` is large.
    pub error: Box<ApiError>,
    /// The request field at fault (`"messages"`, `"temperature"`), when there is one.
    pub param: Option<String>,
    /// A stable machine-readable code (`model_not_found`), when there is one.
    pub code: Option<&'static str>,
}

impl OpenAiError {
    /// A 400 about one field of the body.
    pub fn invalid(param: &str, message: String) -> OpenAiError {
        OpenAiError {
            error: Box::new(ApiError::BadRequest(message)),
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// The body's `error` object.
    pub fn body(&self) -> Value {
        let status = self.error.status();
        let code = self.code.map(Value::from).unwrap_or_else(|| {
            // Without a specific code the status's own name is the most useful one.
            match status {
                StatusCode::SERVICE_UNAVAILABLE => Value::from("service_unavailable"),
                StatusCode::TOO_MANY_REQUESTS => Value::from("rate_limit_exceeded"),
                StatusCode::UNAUTHORIZED => Value::from("invalid_api_key"),
                _ => Value::Null,
            }
        });
        json!({ "error": {
            "message": self.error.message(),
            "type": error_type(status),
            "param": self.param,
            "code": code,
        }})
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> OpenAiError {
        // An unknown model is the one case clients branch on by code.
        let not_found = matches!(error, ApiError::Engine(EngineError::ModelNotFound { .. }));
        OpenAiError {
            error: Box::new(error),
            param: not_found.then(|| "model".to_string()),
            code: not_found.then_some("model_not_found"),
        }
    }
}

impl From<EngineError> for OpenAiError {
    fn from(error: EngineError) -> OpenAiError {
        ApiError::Engine(error).into()
    }
}

/// OpenAI's `type` for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        // The shared mapping gives status, headers and the failure log line; only the
        // body changes.
        let mut response = (*self.error).into_response();
        *response.body_mut() = Body::from(body);
        response
    }
}

/// Largest error body `reshape` rewrites; the shared layers' messages are bounded far below.
const RESHAPE_LIMIT: usize = 64 * 1024;

/// Middleware: an error answered under `/v1` by a shared layer (auth, rate limit, body
/// limit, compression, unknown route) gets OpenAI's shape, message and headers kept. Bodies
/// already in OpenAI's shape (an object under `error`) and successes pass untouched.
pub async fn reshape(req: Request, next: Next) -> Response {
    let openai = req.uri().path() == "/v1" || req.uri().path().starts_with("/v1/");
    let response = next.run(req).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !openai
        || !is_json
        || !(response.status().is_client_error() || response.status().is_server_error())
    {
        return response;
    }
    let status = response.status();
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, RESHAPE_LIMIT).await else {
        return (parts, Body::empty()).into_response();
    };
    let message = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut o)) => match o.remove("error") {
            Some(Value::String(message)) => message,
            _ => return Response::from_parts(parts, Body::from(bytes)),
        },
        _ => return Response::from_parts(parts, Body::from(bytes)),
    };
    let code = match status {
        StatusCode::UNAUTHORIZED => Value::from("invalid_api_key"),
        StatusCode::TOO_MANY_REQUESTS => Value::from("rate_limit_exceeded"),
        StatusCode::NOT_FOUND => Value::from("not_found"),
        _ => Value::Null,
    };
    let body = json!({ "error": {
        "message": message,
        "type": error_type(status),
        "param": null,
        "code": code,
    }})
    .to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
