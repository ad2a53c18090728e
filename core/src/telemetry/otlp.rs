//! Span export over OTLP/HTTP with protobuf bodies (`--otlp-endpoint URL`): the
//! `tracing-opentelemetry` layer turns `tracing` spans into OpenTelemetry spans, a batch
//! processor (its own thread, blocking HTTP client) posts them to `URL/v1/traces`.
//!
//! A request's `http` span takes the caller's `traceparent` as its remote parent, so the
//! exported spans share the caller's trace id; `batch` spans link to their requests.

use super::trace_context::TraceParent;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId as OtelTraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;

/// How long a finished span may wait before its batch is posted.
const EXPORT_DELAY: Duration = Duration::from_millis(500);

/// Flushes and stops the exporter when dropped.
pub struct OtlpGuard {
    provider: SdkTracerProvider,
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            // Through the log queue: a stalled stderr must not hold the exit.
            tracing::warn!("flushing spans to the OTLP collector failed: {e}");
        }
    }
}

/// `URL` as given, with `/v1/traces` appended unless it already ends with it.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The layer that exports the core's spans (INFO and above, `unimodel` targets only).
pub fn layer<S>(endpoint: &str) -> anyhow::Result<(impl Layer<S> + Send + Sync, OtlpGuard)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let url = traces_url(endpoint);
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint {url}: {e}"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_DELAY)
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("unimodel")
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("unimodel");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Per-request spans are DEBUG (free when nothing exports them); events stay INFO+.
        .with_filter(filter_fn(|meta| {
            meta.target().starts_with("unimodel")
                && (meta.is_span() || *meta.level() <= tracing::Level::INFO)
        }));
    Ok((layer, OtlpGuard { provider }))
}

/// Makes `span` a child of the caller's span (a remote parent from `traceparent`).
pub fn set_remote_parent(span: &tracing::Span, parent: &TraceParent) {
    let cx = SpanContext::new(
        OtelTraceId::from_bytes(parent.trace_id.0),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(cx);
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!("cannot attach the traceparent to the span: {e}");
    }
}

/// The OpenTelemetry trace id of `span`, once the OTLP layer has given it one.
pub fn span_trace_id(span: &tracing::Span) -> Option<[u8; 16]> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_path_is_appended_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
