//! The one place errors become gRPC statuses (the counterpart of `api/error.rs` for HTTP).
//!
//! The message is exactly the REST `{"error": ...}` text, so a client sees the same words
//! whichever protocol it speaks. The match is exhaustive (no wildcard): a new error variant
//! does not compile until it has a code here too.

use crate::api::ApiError;
use crate::auth::DenialKind;
use crate::engine::EngineError;
use crate::regions::RegionError;
use crate::repository::RepositoryError;
use tonic::{Code, Status};

/// The gRPC code of an error.
pub fn code(e: &ApiError) -> Code {
    match e {
        ApiError::BadRequest(_) => Code::InvalidArgument,
        ApiError::PayloadTooLarge { .. } => Code::ResourceExhausted,
        // REST only: tonic itself answers an unknown `grpc-encoding` with UNIMPLEMENTED.
        ApiError::UnsupportedEncoding { .. } => Code::Unimplemented,
        ApiError::RouteNotFound { .. } => Code::NotFound,
        ApiError::MethodNotAllowed { .. } | ApiError::NotImplemented(_) => Code::Unimplemented,
        ApiError::Unavailable(_) => Code::Unavailable,
        ApiError::Engine(e) => engine_code(e),
        ApiError::Region(e) => region_code(e),
        ApiError::Repository(e) => repository_code(e),
        ApiError::Auth(kind) => match kind {
            DenialKind::Unauthenticated => Code::Unauthenticated,
            DenialKind::Forbidden => Code::PermissionDenied,
            DenialKind::RateLimited { .. } => Code::ResourceExhausted,
        },
    }
}

fn region_code(e: &RegionError) -> Code {
    match e {
        RegionError::Disabled { .. } => Code::PermissionDenied,
        RegionError::CudaUnsupported => Code::Unimplemented,
        RegionError::BadKey { .. }
        | RegionError::Open { .. }
        | RegionError::OutOfSegment { .. }
        | RegionError::Duplicate(_)
        | RegionError::Unknown(_)
        | RegionError::OutOfRegion { .. }
        | RegionError::BadTensor { .. }
        | RegionError::OutputTooLarge { .. } => Code::InvalidArgument,
    }
}

fn repository_code(e: &RepositoryError) -> Code {
    match e {
        RepositoryError::UnknownModel { .. } => Code::NotFound,
        RepositoryError::BadConfig { .. }
        | RepositoryError::BadLayout { .. }
        | RepositoryError::ControlDisabled { .. }
        | RepositoryError::NoRepository => Code::InvalidArgument,
        RepositoryError::LoadFailed { .. } => Code::Internal,
        RepositoryError::ShuttingDown => Code::Unavailable,
    }
}

fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::ModelNotFound { .. } | EngineError::VersionNotFound { .. } => Code::NotFound,
        EngineError::Validation(_) | EngineError::StreamingOnly { .. } => Code::InvalidArgument,
        EngineError::QueueFull { .. } | EngineError::Overloaded { .. } => Code::ResourceExhausted,
        EngineError::NotReady { .. }
        | EngineError::WorkerFailed { .. }
        | EngineError::ShuttingDown => Code::Unavailable,
        EngineError::Plugin { .. } | EngineError::BadOutput { .. } | EngineError::Internal(_) => {
            Code::Internal
        }
        EngineError::Timeout { .. } => Code::DeadlineExceeded,
    }
}

/// The status a failed RPC answers with; server-side failures are logged like REST's 5xx.
pub fn to_status(e: &ApiError) -> Status {
    let code = code(e);
    let message = e.to_string();
    if matches!(code, Code::Internal | Code::Unavailable) {
        tracing::warn!(code = ?code, error = %message, "gRPC request failed");
    }
    Status::new(code, message)
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        to_status(&e)
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        to_status(&ApiError::Engine(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::validate::ValidationError;
    use std::time::Duration;

    #[test]
    fn every_engine_error_has_its_code_and_the_rest_message() {
        let m = || "m".to_string();
        let cases = [
            (
                EngineError::ModelNotFound {
                    name: m(),
                    available: "a".into(),
                },
                Code::NotFound,
            ),
            (
                EngineError::VersionNotFound {
                    name: m(),
                    version: "2".into(),
                    available: "1".into(),
                },
                Code::NotFound,
            ),
            (
                EngineError::Validation(ValidationError::DuplicateOutput { name: "y".into() }),
                Code::InvalidArgument,
            ),
            (
                EngineError::QueueFull {
                    model: m(),
                    capacity: 4,
                },
                Code::ResourceExhausted,
            ),
            (
                EngineError::NotReady {
                    model: m(),
                    state: "LOADING".into(),
                },
                Code::Unavailable,
            ),
            (
                EngineError::WorkerFailed {
                    model: m(),
                    reason: "SIGKILL".into(),
                },
                Code::Unavailable,
            ),
            (
                EngineError::Plugin {
                    model: m(),
                    message: "ValueError: no".into(),
                },
                Code::Internal,
            ),
            (
                EngineError::BadOutput {
                    model: m(),
                    message: "3 rows".into(),
                },
                Code::Internal,
            ),
            (
                EngineError::Timeout {
                    model: m(),
                    after: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
            ),
            (EngineError::ShuttingDown, Code::Unavailable),
            (EngineError::Internal("boom".into()), Code::Internal),
            (
                EngineError::Overloaded {
                    model: m(),
                    limit: 8,
                },
                Code::ResourceExhausted,
            ),
        ];
        for (err, want) in cases {
            let rest_message = ApiError::from(err.clone()).to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), want, "{rest_message}");
            assert_eq!(status.message(), rest_message);
        }
    }

    #[test]
    fn api_errors_have_their_code() {
        let cases = [
            (ApiError::BadRequest("bad".into()), Code::InvalidArgument),
            (
                ApiError::PayloadTooLarge { limit: 1 },
                Code::ResourceExhausted,
            ),
            (
                ApiError::NotImplemented("CUDA shared memory is not supported".into()),
                Code::Unimplemented,
            ),
            (ApiError::Unavailable("draining".into()), Code::Unavailable),
            (
                ApiError::Auth(DenialKind::Unauthenticated),
                Code::Unauthenticated,
            ),
            (
                ApiError::Auth(DenialKind::Forbidden),
                Code::PermissionDenied,
            ),
            (
                ApiError::Auth(DenialKind::RateLimited {
                    retry_after: Duration::from_secs(1),
                }),
                Code::ResourceExhausted,
            ),
        ];
        for (err, want) in cases {
            let message = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), want);
            assert_eq!(status.message(), message);
        }
    }
}
