//! Logging: human-readable lines by default, JSON with `--log-format json`, always on
//! stderr (stdout stays free for command output such as `unimodel predict`).
//! `UNIMODEL_LOG` (or `RUST_LOG`) sets the filter, e.g. `UNIMODEL_LOG=debug`.
//!
//! - `metrics`: the Prometheus metrics behind `/metrics`.

pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; call once at start-up.
pub fn init(json: bool) {
    let filter = std::env::var("UNIMODEL_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_target(false).init();
    }
}
