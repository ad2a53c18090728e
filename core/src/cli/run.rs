//! `unimodel run`: serve a plugin's models over HTTP and gRPC until SIGTERM or SIGINT.
//!
//! 1. Prepare Python and inspect the plugin (errors print the plugin's traceback).
//! 2. Listen at once, so `/v2/health/live` answers while workers load.
//! 3. Spawn the workers; report each instance that becomes ready ("2/4 instances ready",
//!    `progress.rs`) and print one line per model once it is READY (or FAILED).
//! 4. On the first signal: readiness false, new requests 503, queued and running work
//!    finishes (up to `--drain-timeout-ms`), HTTP and gRPC stop, workers stop, exit 0.
//!    A second signal exits at once (workers die with us through PDEATHSIG).

use super::args::RunArgs;
use super::metrics_port;
use super::serving::{ServeSettings, load_plugin, start_engine};
use crate::api::grpc::{self, GrpcConfig, GrpcServer};
use crate::api::http::{HttpConfig, router, serve};
use crate::engine::{Engine, ModelState};
use crate::telemetry::metrics::Metrics;
use anyhow::Context as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// After the drain, how long idle keep-alive connections get to close.
const HTTP_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long workers get to exit cleanly before the process ends anyway.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = ServeSettings {
        queue_capacity: usize::try_from(args.queue_capacity).unwrap_or(usize::MAX),
        request_timeout: Duration::from_millis(args.request_timeout_ms),
    };
    let loaded = load_plugin(&args.plugin, &settings).await?;

    let addr = (args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {}:{} (is another server using the port? pick one with --port)",
            args.host, args.port
        )
    })?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    let base = format!("http://{local}");

    let metrics = Arc::new(Metrics::new());
    if let Some(port) = args.metrics_port {
        let at = metrics_port::start(args.host, port, metrics.clone()).await?;
        tracing::info!(address = %format!("http://{at}/metrics"), "metrics listening");
    }
    let engine = start_engine(&loaded, &args.plugin, metrics);
    super::progress::report_load_progress(&engine);
    let app = router(
        Arc::new(engine.clone()),
        HttpConfig {
            max_body_bytes: args.max_body_bytes,
        },
    );
    let (stop_http_tx, stop_http_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(serve(listener, app, async move {
        let _ = stop_http_rx.await;
    }));
    tracing::info!(address = %base, plugin = %loaded.spec.file.display(), "listening");
    let grpc = start_grpc(&args, &engine).await?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    tokio::select! {
        _ = report_models(&engine, &base) => grpc.readiness_changed(),
        _ = sigterm.recv() => return shutdown(&engine, &args, stop_http_tx, http, grpc, &mut sigterm, &mut sigint).await,
        _ = sigint.recv() => return shutdown(&engine, &args, stop_http_tx, http, grpc, &mut sigterm, &mut sigint).await,
    }
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    shutdown(
        &engine,
        &args,
        stop_http_tx,
        http,
        grpc,
        &mut sigterm,
        &mut sigint,
    )
    .await
}

/// Starts the gRPC server on `--host:--grpc-port` and logs where it listens.
async fn start_grpc(args: &RunArgs, engine: &Engine) -> anyhow::Result<GrpcServer> {
    let cfg = GrpcConfig {
        max_message_bytes: args.max_body_bytes,
    };
    let server = grpc::start(args.host, args.grpc_port, Arc::new(engine.clone()), cfg).await?;
    tracing::info!(address = %server.addr(), "grpc listening");
    Ok(server)
}

/// Waits for each model to finish loading and prints its summary line.
async fn report_models(engine: &Engine, base: &str) {
    let names: Vec<String> = engine
        .models()
        .iter()
        .map(|m| m.config.name.clone())
        .collect();
    let waits = names
        .iter()
        .map(|name| async move { (name, engine.wait_loaded(name).await) });
    for (name, state) in futures::future::join_all(waits).await {
        let Ok(status) = engine.model(name, None) else {
            continue;
        };
        match state {
            Ok(ModelState::Ready) => tracing::info!(
                model = %name,
                "model {name} READY ({}/{} instances, max_batch_size {}) at {base}/v2/models/{name}",
                status.ready_instances,
                status.config.instances,
                status.config.max_batch_size,
            ),
            Ok(ModelState::Failed { error, traceback }) => {
                tracing::error!(model = %name, "model {name} FAILED: {error}\n{traceback}")
            }
            Ok(other) => tracing::warn!(model = %name, "model {name} is {}", other.name()),
            Err(e) => tracing::error!(model = %name, "model {name}: {e}"),
        }
    }
    if engine.ready() {
        tracing::info!("serving {} model(s) at {base}", names.len());
    }
}

async fn shutdown(
    engine: &Engine,
    args: &RunArgs,
    stop_http: oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: GrpcServer,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_millis(args.drain_timeout_ms);
    tracing::info!(
        "shutting down: finishing queued and running requests (up to {timeout:?}); a second signal exits at once"
    );
    let graceful = async {
        if !engine.drain(timeout).await {
            tracing::warn!("drain timed out after {timeout:?}: answering what is left with 503");
            engine.abort().await;
        }
        let _ = stop_http.send(());
        grpc.stop(HTTP_STOP_GRACE).await;
        // In-flight responses are already written; bound the wait for idle connections.
        match tokio::time::timeout(HTTP_STOP_GRACE, http).await {
            Ok(Ok(Err(e))) => tracing::warn!("HTTP server: {e}"),
            Ok(Err(e)) => tracing::warn!("HTTP server task: {e}"),
            _ => {}
        }
        if !engine.shutdown(WORKER_STOP_GRACE).await {
            tracing::warn!(
                "workers did not stop within {WORKER_STOP_GRACE:?}; they exit with the server"
            );
        }
    };
    tokio::select! {
        _ = graceful => {
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        _ = sigterm.recv() => forced(),
        _ = sigint.recv() => forced(),
    }
}

fn forced() -> anyhow::Result<ExitCode> {
    tracing::warn!("second signal: exiting now");
    Ok(ExitCode::from(130))
}
