//! `--metrics-port`: `/metrics` on a listener of its own, so a scraper can reach it on a port
//! that is not exposed to inference clients (and keep scraping while the server drains).

use crate::api::http::serve;
use crate::api::metrics::routes;
use crate::telemetry::metrics::Metrics;
use anyhow::Context as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Binds `host:port` and serves `GET /metrics` there until the process exits; returns the
/// bound address (useful with port 0).
pub async fn start(host: IpAddr, port: u16, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| {
            format!("cannot listen on {host}:{port} for metrics (pick another --metrics-port)")
        })?;
    let local = listener
        .local_addr()
        .context("reading the metrics listening address")?;
    tokio::spawn(async move {
        // Never asked to stop: it lives as long as the runtime, like the workers' metrics.
        if let Err(e) = serve(listener, routes(metrics), std::future::pending()).await {
            tracing::warn!("metrics listener: {e}");
        }
    });
    Ok(local)
}
