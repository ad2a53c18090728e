//! Errors as gRPC statuses. The code comes from the error's class (`api/error.rs`, one
//! table for HTTP status and gRPC code), and the message is exactly the REST
//! `{"error": ...}` text, so a client sees the same words whichever protocol it speaks.

use crate::api::ApiError;
use crate::engine::EngineError;
use crate::telemetry::throttle::{self, Throttle};
use tonic::{Code, Status};

/// The gRPC code of an error: its class's (`ApiError::class`, the table shared with HTTP).
pub fn code(e: &ApiError) -> Code {
    e.class().code()
}

/// The status a failed RPC answers with; server-side failures are logged like REST's 5xx.
pub fn to_status(e: &ApiError) -> Status {
    let code = code(e);
    let message = e.message();
    if matches!(code, Code::Internal | Code::Unavailable) {
        // Rate-limited: a client can make requests fail as often as it likes.
        static FAILED: Throttle = Throttle::new("gRPC request failed");
        if let Some(suppressed) = FAILED.admit(&format!("{code:?}")) {
            throttle::report("gRPC request failed", suppressed);
            tracing::warn!(code = ?code, error = %message, "gRPC request failed");
        }
    }
    let mut status = Status::new(code, message);
    if e.never_ran() {
        status.metadata_mut().insert(
            crate::api::error::NOT_RUN_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    status
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
    use crate::auth::DenialKind;
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
                EngineError::InvalidGeneration {
                    model: m(),
                    message: "parameter `top_p` must be a number in (0, 1], got 2".into(),
                },
                Code::InvalidArgument,
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

    #[test]
    fn refusals_before_acceptance_carry_the_not_run_metadata() {
        let key = crate::api::error::NOT_RUN_HEADER;
        let draining = EngineError::Draining {
            model: "m".into(),
            node: false,
        };
        let status = Status::from(draining);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get(key).unwrap(), "1");
        assert!(
            Status::from(EngineError::ShuttingDown)
                .metadata()
                .get(key)
                .is_none()
        );
    }
}
