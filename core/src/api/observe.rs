//! Per-request observability of the REST routes, as one axum middleware: the `http` span,
//! the request's trace (a valid W3C `traceparent` is adopted, an invalid one ignored), and
//! one access log line per request (target `unimodel::access`) with method, path, model,
//! status, latency, batch size and trace id.
//!
//! Handlers read the trace from the `RequestTrace` extension; the infer route reports the
//! batch size back through the `BatchSize` response extension.

use crate::telemetry::{self, TraceId, TraceParent, trace_context::TRACEPARENT};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;
use tracing::Instrument as _;
use tracing::field;

/// The trace a request belongs to (request extension, set before the handler runs).
#[derive(Clone, Copy, Debug)]
pub struct RequestTrace(pub TraceId);

/// Rows in the batch that served the request (response extension, infer route only).
#[derive(Clone, Copy, Debug)]
pub struct BatchSize(pub u32);

/// The middleware: wraps the rest of the stack in the request's span and logs the outcome.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let incoming = req
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let span = tracing::info_span!("http", method = %method, path = %path, trace_id = field::Empty);
    let trace = telemetry::request_trace(&span, incoming.as_ref());
    span.record("trace_id", field::display(trace));
    req.extensions_mut().insert(RequestTrace(trace));

    let response = next.run(req).instrument(span).await;

    // Microsecond resolution: more digits would be noise.
    let latency_ms = started.elapsed().as_micros() as f64 / 1e3;
    let status = response.status().as_u16();
    let batch_size = response.extensions().get::<BatchSize>().map(|b| b.0);
    let model = model_of(&path);
    tracing::info!(
        target: "unimodel::access",
        method = %method,
        path = %path,
        model,
        status,
        latency_ms,
        batch_size,
        trace_id = %trace,
        "{method} {path} {status} {latency_ms:.3}ms",
    );
    response
}

/// The model named by a `/v2/models/{model}/...` path, if any.
fn model_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/models/")?;
    let model = rest.split('/').next()?;
    (!model.is_empty() && model != "stats").then_some(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_comes_from_model_paths_only() {
        assert_eq!(model_of("/v2/models/arith/infer"), Some("arith"));
        assert_eq!(model_of("/v2/models/arith"), Some("arith"));
        assert_eq!(model_of("/v2/models/arith/versions/1/ready"), Some("arith"));
        assert_eq!(model_of("/v2/models/stats"), None);
        assert_eq!(model_of("/v2/health/ready"), None);
        assert_eq!(model_of("/v2/models/"), None);
    }
}
