//! Logging and tracing: human-readable lines by default, JSON with `--log-format json`,
//! always on stderr (stdout stays free for command output such as `unimodel predict`).
//! `UNIMODEL_LOG` (or `RUST_LOG`) sets the filter, e.g. `UNIMODEL_LOG=debug`. The access
//! log (target `unimodel::access`) is off unless `--access-log` is given or the filter
//! names that target.
//!
//! Lines never block the code that logs them: they go through a bounded queue to a writer
//! thread (`log_writer`), which drops and counts what does not fit; lines a client can cause
//! at will (denials, failed requests) are rate-limited per call site (`throttle`).
//!
//! - `log_writer`: the non-blocking writer behind every line, and its flush at exit.
//! - `throttle`: per-call-site rate limits with "suppressed K similar lines" summaries.
//! - `panics`: the panic hook and `spawn_monitored` for long-lived tasks.
//! - `trace_context`: W3C `traceparent` parsing and the trace id a request carries.
//! - `otlp`: optional span export over OTLP/HTTP (`--otlp-endpoint`).
//! - `metrics`: the Prometheus metrics behind `/metrics`.
//!
//! Spans: `http` per REST request (its `trace_id` field is the request's trace), `infer`
//! per request inside the engine (queue wait included), and `batch` per worker call, a root
//! span that `follows_from` each of its requests' `infer` spans (OTLP: span links) and lists
//! their trace ids and request ids.

pub mod log_writer;
pub mod metrics;
pub mod metrics_llm;
pub mod otlp;
pub mod panics;
pub mod throttle;
pub mod trace_context;

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use log_writer::LogGuard;
pub use otlp::OtlpGuard;
pub use trace_context::{TraceId, TraceParent};

/// Set once OTLP export is installed: spans then carry OpenTelemetry contexts.
static OTLP_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported over OTLP (and carry OpenTelemetry trace ids).
pub fn otlp_active() -> bool {
    OTLP_ACTIVE.load(Ordering::Relaxed)
}

/// How to log and trace.
#[derive(Clone, Debug, Default)]
pub struct TelemetryOptions {
    pub json: bool,
    /// OTLP/HTTP collector base URL (`/v1/traces` is appended unless present).
    pub otlp_endpoint: Option<String>,
    /// Log one line per HTTP request.
    pub access_log: bool,
}

/// What `init` hands back; keep it until the end of `main`. Dropping it flushes the spans
/// not yet exported, then the log lines still queued (fields drop in this order).
pub struct TelemetryGuard {
    _otlp: Option<OtlpGuard>,
    _logs: LogGuard,
}

/// Installs the global subscriber and the panic hook; call once at start-up, before the
/// async runtime starts (the OTLP exporter owns a blocking HTTP client that must not live
/// inside it).
pub fn init(opts: &TelemetryOptions) -> anyhow::Result<TelemetryGuard> {
    let mut directives = std::env::var("UNIMODEL_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| "info".to_string());
    if !opts.access_log && !directives.contains("unimodel::access") {
        directives.push_str(",unimodel::access=off");
    }
    // async-nats logs every (re)connection at INFO in its own words; the cluster code logs
    // the same events once, naming the server and what it means for serving.
    if !directives.contains("async_nats") {
        directives.push_str(",async_nats=warn");
    }
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or collector gets plain text.
    let (writer, logs) = log_writer::spawn(std::io::stderr())?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = if opts.json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    } else {
        fmt.with_target(false).boxed()
    };
    let (otel, guard) = match &opts.otlp_endpoint {
        Some(url) => {
            let (layer, guard) = otlp::layer(url)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        // The log filter applies to log lines only; exported spans have their own.
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    OTLP_ACTIVE.store(guard.is_some(), Ordering::Relaxed);
    panics::install_hook();
    Ok(TelemetryGuard {
        _otlp: guard,
        _logs: logs,
    })
}

/// The trace a request belongs to: the caller's (valid `traceparent`), else the one the
/// OTLP layer started for `span`, else a fresh random id. With OTLP on, `span` becomes a
/// child of the caller's span.
pub fn request_trace(span: &tracing::Span, incoming: Option<&TraceParent>) -> TraceId {
    if let Some(parent) = incoming {
        if otlp_active() {
            otlp::set_remote_parent(span, parent);
        }
        return parent.trace_id;
    }
    if otlp_active()
        && let Some(id) = otlp::span_trace_id(span)
    {
        return TraceId(id);
    }
    TraceId::random()
}
