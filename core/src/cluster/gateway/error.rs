//! `GatewayError`: everything the gateway itself answers, and the one place it becomes an
//! HTTP status (with the `{"error": ...}` body the nodes use) or a gRPC status. Errors a
//! node answered pass through untouched and never become one of these.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "unknown model '{model}': no node in the cluster has it (GET /v2/repository/index lists the models)"
    )]
    UnknownModel { model: String },
    #[error("unknown version '{version}' of model '{model}': no node in the cluster has it")]
    UnknownVersion { model: String, version: String },
    #[error("model '{model}' is not ready on any node: {detail}")]
    NoReadyNode { model: String, detail: String },
    #[error("no node is serving: the cluster table lists none in state SERVING and in rotation")]
    NoNode,
    #[error(
        "node '{node}' failed after the request was sent ({detail}); it may have run there, so it was not retried"
    )]
    NodeFailed { node: Arc<String>, detail: String },
    #[error(
        "node '{node}' did not answer within {after:?} (--upstream-timeout-ms); the request may have run there, so it was not retried"
    )]
    NodeTimeout { node: Arc<String>, after: Duration },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotThroughGateway(String),
    #[error("no route {method} {path} on the gateway")]
    NoRoute { method: String, path: String },
    /// A control order names a node the cluster table lacks.
    #[error("unknown node '{node}': the cluster table has no such node (it has: {known})")]
    UnknownNode { node: String, known: String },
    /// A control route on a gateway started without `--nats`.
    #[error(
        "{what} through the gateway needs NATS: start the gateway with --nats nats://HOST:4222 (and --nats-creds FILE where NATS wants credentials), or use `unimodel ctl` or a node's own routes"
    )]
    NoControl { what: &'static str },
    #[error(
        "the gateway is not connected to NATS at {nats} (it keeps reconnecting); nothing was sent, try again"
    )]
    NatsDown { nats: String },
    /// Some target nodes refused, failed or did not answer a control order; `nodes` holds
    /// every node's reply (successes too), for the body.
    #[error("{message}")]
    ControlFailed {
        message: String,
        /// Every failure is a node that did not answer (504, not 502).
        timed_out: bool,
        nodes: Arc<Vec<serde_json::Value>>,
    },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::UnknownModel { .. }
            | GatewayError::UnknownVersion { .. }
            | GatewayError::NoRoute { .. }
            | GatewayError::UnknownNode { .. } => StatusCode::NOT_FOUND,
            GatewayError::NoReadyNode { .. }
            | GatewayError::NoNode
            | GatewayError::NatsDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::ControlFailed {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::ControlFailed { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::NodeFailed { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::NodeTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::NotThroughGateway(_) | GatewayError::NoControl { .. } => {
                StatusCode::NOT_IMPLEMENTED
            }
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            GatewayError::UnknownModel { .. }
            | GatewayError::UnknownVersion { .. }
            | GatewayError::NoRoute { .. }
            | GatewayError::UnknownNode { .. } => tonic::Code::NotFound,
            GatewayError::NoReadyNode { .. }
            | GatewayError::NoNode
            | GatewayError::NatsDown { .. }
            | GatewayError::NodeFailed { .. } => tonic::Code::Unavailable,
            GatewayError::ControlFailed {
                timed_out: true, ..
            } => tonic::Code::DeadlineExceeded,
            GatewayError::ControlFailed { .. } => tonic::Code::Unavailable,
            GatewayError::NodeTimeout { .. } => tonic::Code::DeadlineExceeded,
            GatewayError::BadRequest(_) => tonic::Code::InvalidArgument,
            GatewayError::NotThroughGateway(_) | GatewayError::NoControl { .. } => {
                tonic::Code::Unimplemented
            }
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let GatewayError::ControlFailed { nodes, .. } = &self {
            body["nodes"] = serde_json::Value::Array(nodes.as_ref().clone());
        }
        (status, Json(body)).into_response()
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(e: GatewayError) -> tonic::Status {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        let unknown = GatewayError::UnknownModel { model: "m".into() };
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        assert!(unknown.to_string().contains("'m'"));
        let none = GatewayError::NoReadyNode {
            model: "m".into(),
            detail: "x".into(),
        };
        assert_eq!(none.status(), StatusCode::SERVICE_UNAVAILABLE);
        let failed = GatewayError::NodeFailed {
            node: Arc::new("n1".into()),
            detail: "reset".into(),
        };
        assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
        assert!(failed.to_string().contains("'n1'"));
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable);
    }
}
