//! Trace context on the way out: the node's span becomes a child of the gateway's. The
//! request's trace id (the caller's `traceparent`, or the one the gateway started) goes on
//! with the gateway's own span id as the parent: the OpenTelemetry span id when spans are
//! exported, else a fresh random one (the trace id still ties the logs together).

use crate::telemetry::{TraceId, TraceParent};
use http::HeaderValue;
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The `traceparent` to send to the node for a request in `trace`, from inside `span`.
pub fn outgoing(span: &tracing::Span, trace: TraceId, sampled: bool) -> Option<HeaderValue> {
    let parent_id = otel_span_id(span).unwrap_or_else(random_span_id);
    let tp = TraceParent {
        trace_id: trace,
        parent_id,
        flags: u8::from(sampled),
    };
    HeaderValue::from_str(&tp.to_string()).ok()
}

fn otel_span_id(span: &tracing::Span) -> Option<[u8; 8]> {
    if !crate::telemetry::otlp_active() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.span_id().to_bytes())
}

fn random_span_id() -> [u8; 8] {
    let id = TraceId::random().0;
    let mut out = [0u8; 8];
    out.copy_from_slice(&id[..8]);
    if out == [0; 8] {
        out[7] = 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_trace_and_gives_a_new_parent() {
        let incoming =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let out = outgoing(&tracing::Span::none(), incoming.trace_id, true).unwrap();
        let parsed = TraceParent::parse(out.to_str().unwrap()).unwrap();
        assert_eq!(parsed.trace_id, incoming.trace_id);
        assert_ne!(parsed.parent_id, incoming.parent_id);
        assert_eq!(parsed.flags, 1);
    }
}
