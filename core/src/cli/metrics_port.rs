//! `--metrics-port`: `/metrics` on a listener of its own, so a scraper can reach it on a port
//! that is not exposed to inference clients (and keep scraping while the server drains).
//! With `--auth-metrics` it checks credentials like the main port. With TLS on, it speaks
//! TLS too, with the same certificate and client-certificate rule as the other ports: a TLS
//! server has no plain-text port.

use crate::api::auth::{AuthGate, check};
use crate::api::conn::{Acceptor, Guard, HttpIncoming, serve_http};
use crate::api::metrics::routes;
use crate::auth::Auth;
use crate::telemetry::metrics::Metrics;
use crate::tls::Handshake;
use anyhow::Context as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Binds `host:port` and serves `GET /metrics` there until the process exits; returns the
/// bound address (useful with port 0). With `tls`, over TLS.
pub async fn start(
    host: IpAddr,
    port: u16,
    metrics: Arc<Metrics>,
    auth: Option<Arc<Auth>>,
    tls: Option<Handshake>,
    guard: Guard,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| {
            format!("cannot listen on {host}:{port} for metrics (pick another --metrics-port)")
        })?;
    let local = listener
        .local_addr()
        .context("reading the metrics listening address")?;
    let acceptor = Acceptor::new(listener, guard.limit, Some(&metrics), "metrics");
    let mut app = routes(metrics.clone());
    if let Some(auth) = auth {
        let gate = AuthGate::new(auth, Some(metrics));
        app = app.layer(axum::middleware::from_fn_with_state(gate, check));
    }
    let incoming = HttpIncoming::new(acceptor, tls).context("starting TLS on the metrics port")?;
    tokio::spawn(async move {
        // Never asked to stop: it lives as long as the runtime, like the workers' metrics.
        if let Err(e) = serve_http(incoming, app, guard.timeouts, std::future::pending()).await {
            tracing::warn!("metrics listener: {e}");
        }
    });
    Ok(local)
}
