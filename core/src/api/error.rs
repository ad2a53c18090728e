//! The one place errors are classified, for HTTP and gRPC alike.
//!
//! Every handler (REST and gRPC) fails with an `ApiError`; `ApiError::class` sorts it into an
//! `ErrorClass` with exhaustive matches (no wildcard), so a new error variant does not compile
//! until it has a class, and `ErrorClass::status_and_code` is the one table that gives each
//! class its HTTP status and its gRPC code, so the two protocols cannot drift apart. Every
//! REST error body is `{"error": "<message>"}`, Triton's shape, which its clients print
//! as-is; gRPC carries the same message (`grpc/status.rs`).
//!
//! A refusal made before the engine accepted the request (`EngineError::never_ran`: an
//! operator's drain, a model not ready) carries `unimodel-not-run: 1`, as a REST header and
//! as gRPC metadata, so a gateway knows it may send the request to another node.

use crate::auth::DenialKind;
use crate::echo::{Echo, bound_message};
use crate::engine::EngineError;
use crate::regions::RegionError;
use crate::repository::RepositoryError;
use crate::telemetry::throttle::{self, Throttle};
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// The header (REST) and metadata key (gRPC) marking an answer to a request that never ran.
pub const NOT_RUN_HEADER: &str = "unimodel-not-run";

/// Why the HTTP front end could not answer a request successfully.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request could not be parsed: bad JSON, wrong JSON shape, bad binary framing.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `--max-body-bytes`.
    #[error(
        "request body is larger than the limit of {limit} bytes; raise it with --max-body-bytes"
    )]
    PayloadTooLarge { limit: usize },
    /// A control request's body (repository index/load/unload, shm registration) is larger
    /// than the small fixed limit of those routes (`http::CONTROL_BODY_BYTES`).
    #[error(
        "the {what} body is larger than the limit of {limit} bytes for control requests (they carry a few small fields)"
    )]
    ControlBodyTooLarge { what: &'static str, limit: usize },
    /// The body is larger than the whole `--max-buffered-bytes` budget: it could never fit.
    #[error(
        "request body is larger than --max-buffered-bytes ({limit} bytes), the most the server holds of request bodies at once; raise --max-buffered-bytes"
    )]
    OverBudget { limit: usize },
    /// The body did not arrive within `--body-read-timeout-ms` (`conn/body.rs`).
    #[error(
        "the request body did not arrive within {after:?}; the connection is closed (send the body at once, or raise --body-read-timeout-ms)"
    )]
    BodyTimeout { after: std::time::Duration },
    /// The body's `Content-Encoding` is not one the server decodes (`compression.rs`).
    #[error(
        "request Content-Encoding '{}' is not supported; send the body uncompressed or compressed with one of: {accepted}",
        Echo(given)
    )]
    UnsupportedEncoding {
        given: String,
        accepted: &'static str,
    },
    /// No route matches the path.
    #[error("no route for {} {}", Echo(method), Echo(path))]
    RouteNotFound { method: String, path: String },
    /// The path exists, the method does not.
    #[error("method {} is not allowed on {}", Echo(method), Echo(path))]
    MethodNotAllowed { method: String, path: String },
    /// The server as a whole is not live or not ready (health routes).
    #[error("{0}")]
    Unavailable(String),
    /// A protocol feature this server does not offer (yet), e.g. CUDA shared memory.
    #[error("{0}")]
    NotImplemented(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A shared-memory region operation, or a tensor naming a region, failed.
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// Refused by auth (`api/auth.rs`): only the kind, whose message says nothing more
    /// than "authentication required", "not permitted" or "rate limit exceeded".
    #[error(transparent)]
    Auth(DenialKind),
}

/// What kind of failure an error is, as a client sees it: one HTTP status and one gRPC code
/// per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is malformed or does not fit the model (fix the request).
    BadRequest,
    /// No or bad credentials.
    Unauthenticated,
    /// Known caller (or this server's configuration) refuses it; repeating will not help.
    Forbidden,
    /// The model, version, route or region does not exist.
    NotFound,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// The body is over `--max-body-bytes`.
    PayloadTooLarge,
    /// The body did not arrive in time (`--body-read-timeout-ms`).
    RequestTimeout,
    /// The body's `Content-Encoding` is not one the server decodes (REST only: tonic itself
    /// answers an unknown `grpc-encoding` with UNIMPLEMENTED).
    UnsupportedMediaType,
    /// A limit refused it for now (queue, max_concurrency, rate limit): retry later.
    TooManyRequests,
    /// The plugin or the server failed.
    Internal,
    /// A feature this server does not offer.
    NotImplemented,
    /// Not ready, a worker failed, or shutting down.
    Unavailable,
    /// The request's deadline passed.
    Timeout,
}

impl ErrorClass {
    /// The one table: each class's HTTP status and gRPC code.
    pub const fn status_and_code(self) -> (StatusCode, Code) {
        match self {
            ErrorClass::BadRequest => (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            ErrorClass::Unauthenticated => (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            ErrorClass::Forbidden => (StatusCode::FORBIDDEN, Code::PermissionDenied),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, Code::NotFound),
            ErrorClass::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, Code::Unimplemented),
            ErrorClass::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
            ErrorClass::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, Code::DeadlineExceeded),
            ErrorClass::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, Code::Unimplemented)
            }
            ErrorClass::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, Code::ResourceExhausted),
            ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
            ErrorClass::NotImplemented => (StatusCode::NOT_IMPLEMENTED, Code::Unimplemented),
            ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            ErrorClass::Timeout => (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded),
        }
    }

    pub const fn status(self) -> StatusCode {
        self.status_and_code().0
    }

    pub const fn code(self) -> Code {
        self.status_and_code().1
    }
}

impl ApiError {
    /// The error's class; its status and code follow from it.
    pub fn class(&self) -> ErrorClass {
        match self {
            ApiError::BadRequest(_) => ErrorClass::BadRequest,
            ApiError::PayloadTooLarge { .. }
            | ApiError::ControlBodyTooLarge { .. }
            | ApiError::OverBudget { .. } => ErrorClass::PayloadTooLarge,
            ApiError::BodyTimeout { .. } => ErrorClass::RequestTimeout,
            ApiError::UnsupportedEncoding { .. } => ErrorClass::UnsupportedMediaType,
            ApiError::RouteNotFound { .. } => ErrorClass::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorClass::MethodNotAllowed,
            ApiError::Unavailable(_) => ErrorClass::Unavailable,
            ApiError::NotImplemented(_) => ErrorClass::NotImplemented,
            ApiError::Engine(e) => engine_class(e),
            ApiError::Region(e) => region_class(e),
            ApiError::Repository(e) => repository_class(e),
            ApiError::Auth(kind) => match kind {
                DenialKind::Unauthenticated => ErrorClass::Unauthenticated,
                DenialKind::Forbidden => ErrorClass::Forbidden,
                DenialKind::RateLimited { .. } => ErrorClass::TooManyRequests,
            },
        }
    }

    /// The message a client gets (REST body, gRPC status), never longer than
    /// `echo::MESSAGE_MAX_CHARS` characters whatever the client sent.
    pub fn message(&self) -> String {
        bound_message(self.to_string())
    }

    /// Refused before the engine accepted it: it never ran (`NOT_RUN_HEADER`).
    pub fn never_ran(&self) -> bool {
        matches!(self, ApiError::Engine(e) if e.never_ran())
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.class().status()
    }

    /// Maps axum's body rejection: over the limit is 413 naming the flag, anything else
    /// (a client that hung up mid-body) is 400.
    pub fn from_body(rejection: BytesRejection, limit: usize) -> ApiError {
        match rejection {
            BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
                ApiError::PayloadTooLarge { limit }
            }
            other => ApiError::BadRequest(format!(
                "could not read the request body: {}",
                other.body_text()
            )),
        }
    }

    /// A control route's body rejection: 413 naming that route's own small limit.
    pub fn from_control_body(
        rejection: BytesRejection,
        limit: usize,
        what: &'static str,
    ) -> ApiError {
        match ApiError::from_body(rejection, limit) {
            ApiError::PayloadTooLarge { limit } => ApiError::ControlBodyTooLarge { what, limit },
            other => other,
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::BadRequest(format!("invalid path: {}", rejection.body_text()))
    }
}

fn engine_class(e: &EngineError) -> ErrorClass {
    match e {
        EngineError::ModelNotFound { .. } | EngineError::VersionNotFound { .. } => {
            ErrorClass::NotFound
        }
        EngineError::Validation(_)
        | EngineError::StreamingOnly { .. }
        | EngineError::ClientMemory(_)
        | EngineError::InvalidGeneration { .. } => ErrorClass::BadRequest,
        EngineError::QueueFull { .. } | EngineError::Overloaded { .. } => {
            ErrorClass::TooManyRequests
        }
        EngineError::NotReady { .. }
        | EngineError::Draining { .. }
        | EngineError::WorkerFailed { .. }
        | EngineError::ShuttingDown
        | EngineError::Closing => ErrorClass::Unavailable,
        EngineError::Plugin { .. } | EngineError::BadOutput { .. } | EngineError::Internal(_) => {
            ErrorClass::Internal
        }
        EngineError::Timeout { .. } => ErrorClass::Timeout,
    }
}

fn region_class(e: &RegionError) -> ErrorClass {
    match e {
        // The request is fine; this server's configuration refuses it, and repeating it will
        // not help until an operator restarts with --allow-client-shm: 403, not 400.
        RegionError::Disabled { .. } => ErrorClass::Forbidden,
        // A whole extension this server does not implement, not a malformed request.
        RegionError::CudaUnsupported => ErrorClass::NotImplemented,
        // A limit refused it for now: registering succeeds again once a region goes.
        RegionError::TooMany { .. } => ErrorClass::TooManyRequests,
        // Everything else is the client's key, sizes, offsets or names (Triton answers 400).
        RegionError::BadKey { .. }
        | RegionError::Open { .. }
        | RegionError::OutOfSegment { .. }
        | RegionError::Duplicate(_)
        | RegionError::Unknown(_)
        | RegionError::OutOfRegion { .. }
        | RegionError::BadTensor { .. }
        | RegionError::OutputTooLarge { .. }
        | RegionError::Shrunk { .. }
        | RegionError::Access { .. } => ErrorClass::BadRequest,
    }
}

fn repository_class(e: &RepositoryError) -> ErrorClass {
    match e {
        RepositoryError::UnknownModel { .. } => ErrorClass::NotFound,
        // The request cannot succeed until the files or the server's mode change.
        RepositoryError::BadConfig { .. }
        | RepositoryError::BadLayout { .. }
        | RepositoryError::ControlDisabled { .. }
        | RepositoryError::NoRepository => ErrorClass::BadRequest,
        // The plugin itself failed (import, setup): the server could not do what was asked.
        RepositoryError::LoadFailed { .. } => ErrorClass::Internal,
        RepositoryError::ShuttingDown => ErrorClass::Unavailable,
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.message();
        if status.is_server_error() {
            // Rate-limited: a client can make requests fail as often as it likes.
            static FAILED: Throttle = Throttle::new("request failed");
            if let Some(suppressed) = FAILED.admit(status.as_str()) {
                throttle::report("request failed", suppressed);
                tracing::warn!(status = status.as_u16(), error = %message, "request failed");
            }
        }
        let mut response = (status, axum::Json(ErrorBody { error: &message })).into_response();
        if self.never_ran() {
            response
                .headers_mut()
                .insert(NOT_RUN_HEADER, HeaderValue::from_static("1"));
        }
        if let ApiError::Engine(EngineError::QueueFull { .. } | EngineError::Overloaded { .. }) =
            self
        {
            // The queue drains in milliseconds; a second is a polite, short back-off.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::BodyTimeout { .. } = self {
            // The rest of the body may still come; the connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ApiError::UnsupportedEncoding { accepted, .. } = self {
            // RFC 7694: a 415 for a content coding lists the codings the server accepts.
            response
                .headers_mut()
                .insert(header::ACCEPT_ENCODING, HeaderValue::from_static(accepted));
        }
        if let ApiError::Auth(kind) = self {
            let headers = response.headers_mut();
            if kind == DenialKind::Unauthenticated {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            if let Some(secs) = kind.retry_after_secs() {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn body_of(r: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn engine_errors() -> Vec<(EngineError, StatusCode)> {
        let m = || "m".to_string();
        vec![
            (
                EngineError::ModelNotFound {
                    name: m(),
                    available: "a".into(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                EngineError::VersionNotFound {
                    name: m(),
                    version: "2".into(),
                    available: "1".into(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                EngineError::Validation(
                    crate::engine::validate::ValidationError::DuplicateOutput { name: "y".into() },
                ),
                StatusCode::BAD_REQUEST,
            ),
            (
                EngineError::QueueFull {
                    model: m(),
                    capacity: 4,
                },
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                EngineError::Overloaded {
                    model: m(),
                    limit: 8,
                },
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                EngineError::NotReady {
                    model: m(),
                    state: "LOADING".into(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                EngineError::WorkerFailed {
                    model: m(),
                    reason: "SIGKILL".into(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                EngineError::Plugin {
                    model: m(),
                    message: "ValueError".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                EngineError::InvalidGeneration {
                    model: m(),
                    message: "parameter `temperature` must be a number >= 0".into(),
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                EngineError::BadOutput {
                    model: m(),
                    message: "3 rows, 2 expected".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                EngineError::Timeout {
                    model: m(),
                    after: Duration::from_secs(1),
                },
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (EngineError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
            (
                EngineError::Internal("boom".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ]
    }

    #[test]
    fn each_class_has_one_status_and_its_grpc_counterpart() {
        let table = [
            (ErrorClass::BadRequest, 400, Code::InvalidArgument),
            (ErrorClass::Unauthenticated, 401, Code::Unauthenticated),
            (ErrorClass::Forbidden, 403, Code::PermissionDenied),
            (ErrorClass::NotFound, 404, Code::NotFound),
            (ErrorClass::MethodNotAllowed, 405, Code::Unimplemented),
            (ErrorClass::PayloadTooLarge, 413, Code::ResourceExhausted),
            (ErrorClass::UnsupportedMediaType, 415, Code::Unimplemented),
            (ErrorClass::TooManyRequests, 429, Code::ResourceExhausted),
            (ErrorClass::Internal, 500, Code::Internal),
            (ErrorClass::NotImplemented, 501, Code::Unimplemented),
            (ErrorClass::Unavailable, 503, Code::Unavailable),
            (ErrorClass::Timeout, 504, Code::DeadlineExceeded),
        ];
        for (class, status, code) in table {
            assert_eq!(class.status().as_u16(), status, "{class:?}");
            assert_eq!(class.code(), code, "{class:?}");
        }
        let statuses: std::collections::BTreeSet<u16> = table.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(statuses.len(), table.len(), "one status per class");
    }

    #[tokio::test]
    async fn every_engine_error_has_its_status_and_json_body() {
        for (err, status) in engine_errors() {
            let message = err.to_string();
            let is_queue_full = matches!(
                err,
                EngineError::QueueFull { .. } | EngineError::Overloaded { .. }
            );
            let response = ApiError::from(err).into_response();
            assert_eq!(response.status(), status, "{message}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                response.headers().get(header::RETRY_AFTER).is_some(),
                is_queue_full
            );
            assert_eq!(
                body_of(response).await,
                serde_json::json!({ "error": message })
            );
        }
    }

    #[test]
    fn repository_errors_have_their_status() {
        let cases = [
            (
                RepositoryError::UnknownModel {
                    name: "m".into(),
                    repository: "'r'".into(),
                    available: "a".into(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                RepositoryError::BadConfig {
                    name: "m".into(),
                    file: "m/config.toml".into(),
                    message: "unknown field `x`".into(),
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                RepositoryError::ControlDisabled {
                    action: "load",
                    name: "m".into(),
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                RepositoryError::LoadFailed {
                    name: "m".into(),
                    reason: "boom".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                RepositoryError::ShuttingDown,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(ApiError::from(err).status(), status);
        }
    }

    #[tokio::test]
    async fn api_errors_have_their_status() {
        let cases = [
            (ApiError::BadRequest("bad".into()), StatusCode::BAD_REQUEST),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                ApiError::RouteNotFound {
                    method: "GET".into(),
                    path: "/x".into(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                ApiError::MethodNotAllowed {
                    method: "PUT".into(),
                    path: "/v2".into(),
                },
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (
                ApiError::Unavailable("not ready".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                RegionError::Disabled { name: "r".into() }.into(),
                StatusCode::FORBIDDEN,
            ),
            (
                RegionError::CudaUnsupported.into(),
                StatusCode::NOT_IMPLEMENTED,
            ),
            (
                RegionError::Unknown("r".into()).into(),
                StatusCode::BAD_REQUEST,
            ),
            (
                RegionError::OutputTooLarge {
                    output: "y".into(),
                    region: "r".into(),
                    size: 8,
                    byte_size: 4,
                }
                .into(),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (err, status) in cases {
            let message = err.to_string();
            let response = err.into_response();
            assert_eq!(response.status(), status);
            assert_eq!(body_of(response).await["error"], message);
        }
        assert_eq!(
            ApiError::PayloadTooLarge { limit: 10 }.to_string(),
            "request body is larger than the limit of 10 bytes; raise it with --max-body-bytes"
        );
    }

    #[tokio::test]
    async fn auth_denials_have_their_status_headers_and_a_bare_message() {
        let cases = [
            (
                DenialKind::Unauthenticated,
                StatusCode::UNAUTHORIZED,
                "authentication required",
            ),
            (
                DenialKind::Forbidden,
                StatusCode::FORBIDDEN,
                "not permitted",
            ),
            (
                DenialKind::RateLimited {
                    retry_after: Duration::from_millis(1500),
                },
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded",
            ),
        ];
        for (kind, status, message) in cases {
            let response = ApiError::Auth(kind).into_response();
            assert_eq!(response.status(), status);
            assert_eq!(
                response.headers().get(header::WWW_AUTHENTICATE).is_some(),
                kind == DenialKind::Unauthenticated
            );
            let retry = response.headers().get(header::RETRY_AFTER).cloned();
            assert_eq!(retry.is_some(), status == StatusCode::TOO_MANY_REQUESTS);
            if let Some(v) = retry {
                assert_eq!(v, "2");
            }
            assert_eq!(
                body_of(response).await,
                serde_json::json!({ "error": message })
            );
        }
    }

    #[test]
    fn refusals_before_acceptance_and_only_they_are_marked_not_run() {
        let m = || "m".to_string();
        let marked = |e: EngineError| {
            ApiError::Engine(e)
                .into_response()
                .headers()
                .get(NOT_RUN_HEADER)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let draining = EngineError::Draining {
            model: m(),
            node: true,
        };
        assert_eq!(marked(draining), Some("1".into()));
        let not_ready = EngineError::NotReady {
            model: m(),
            state: "LOADING".into(),
        };
        assert_eq!(marked(not_ready), Some("1".into()));
        assert_eq!(marked(EngineError::Closing), Some("1".into()));
        // These may have reached a worker: a gateway must not run them again.
        assert_eq!(marked(EngineError::ShuttingDown), None);
        let crashed = EngineError::WorkerFailed {
            model: m(),
            reason: "SIGKILL".into(),
        };
        assert_eq!(marked(crashed), None);
    }
}
