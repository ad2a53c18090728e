//! The `outcome` label of `unimodel_requests_total`: what became of a request, in a small,
//! stable vocabulary (the metrics' counterpart of the statuses in `error.rs`).
//!
//! The matches are exhaustive like `ApiError::status`, so a new error variant does not
//! compile until it has an outcome here too.

use super::error::ApiError;
use crate::engine::EngineError;
pub use crate::telemetry::metrics::OUTCOME_SUCCESS;

impl ApiError {
    /// The `outcome` label of a request that ended with this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge { .. }
            | ApiError::ControlBodyTooLarge { .. }
            | ApiError::OverBudget { .. } => "payload_too_large",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::UnsupportedEncoding { .. } => "unsupported_encoding",
            ApiError::RouteNotFound { .. } => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::Engine(e) => engine_outcome(e),
            ApiError::Region(e) => match e {
                crate::regions::RegionError::Disabled { .. } => "forbidden",
                crate::regions::RegionError::CudaUnsupported => "not_implemented",
                _ => "bad_request",
            },
            // Not an inference: never recorded per request, labelled for completeness.
            ApiError::Repository(_) => "repository_error",
            // Refused before the handler: counted by `unimodel_auth_denials_total` instead.
            ApiError::Auth(kind) => kind.outcome(),
        }
    }
}

fn engine_outcome(e: &EngineError) -> &'static str {
    match e {
        EngineError::ModelNotFound { .. } | EngineError::VersionNotFound { .. } => "not_found",
        EngineError::Validation(_)
        | EngineError::StreamingOnly { .. }
        | EngineError::ClientMemory(_)
        | EngineError::InvalidGeneration { .. } => "bad_request",
        EngineError::QueueFull { .. } => "queue_full",
        EngineError::Overloaded { .. } => "overloaded",
        EngineError::NotReady { .. }
        | EngineError::Draining { .. }
        | EngineError::ShuttingDown
        | EngineError::Closing => "unavailable",
        EngineError::WorkerFailed { .. } => "worker_error",
        // Both are the plugin's fault: it raised, or returned outputs that do not fit.
        EngineError::Plugin { .. } | EngineError::BadOutput { .. } => "plugin_error",
        EngineError::Internal(_) => "internal_error",
        EngineError::Timeout { .. } => "timeout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_status_class_has_its_outcome() {
        let m = || "m".to_string();
        let cases = [
            (ApiError::BadRequest("x".into()), "bad_request"),
            (ApiError::PayloadTooLarge { limit: 1 }, "payload_too_large"),
            (
                EngineError::QueueFull {
                    model: m(),
                    capacity: 1,
                }
                .into(),
                "queue_full",
            ),
            (
                EngineError::Plugin {
                    model: m(),
                    message: "ValueError".into(),
                }
                .into(),
                "plugin_error",
            ),
            (
                EngineError::WorkerFailed {
                    model: m(),
                    reason: "SIGKILL".into(),
                }
                .into(),
                "worker_error",
            ),
            (
                EngineError::Timeout {
                    model: m(),
                    after: Duration::from_secs(1),
                }
                .into(),
                "timeout",
            ),
            (
                EngineError::ModelNotFound {
                    name: m(),
                    available: String::new(),
                }
                .into(),
                "not_found",
            ),
            (EngineError::ShuttingDown.into(), "unavailable"),
        ];
        for (err, outcome) in cases {
            assert_eq!(err.outcome(), outcome, "{err}");
        }
    }
}
