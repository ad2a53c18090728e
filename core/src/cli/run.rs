//! `unimodel run`: serve a plugin's models over HTTP and gRPC until SIGTERM or SIGINT.
//!
//! 1. Prepare Python and inspect the plugin (errors print the plugin's traceback).
//! 2. Listen at once, so `/v2/health/live` answers while workers load.
//! 3. Spawn the workers; report each instance that becomes ready ("2/4 instances ready",
//!    `progress.rs`) and print one line per model once it is READY (or FAILED).
//! 4. On the first signal, drain and stop (`server.rs`); with `--etcd`, the node's
//!    key says DRAINING during the drain and leaves etcd after it (`registration.rs`).

use super::args::RunArgs;
use super::server::{listen, metrics, serve_until_signal, settings};
use super::serving::{load_plugin, start_engine};
use crate::engine::{Engine, ModelState};
use std::process::ExitCode;
use std::sync::Arc;

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let auth = super::auth::load(&args.server.auth)?;
    let loaded = load_plugin(&args.plugin, &settings(&args.server)).await?;
    let listening = listen(&args.server).await?;
    let base = listening.base.clone();
    let metrics = metrics(&args.server, &listening, auth.as_ref()).await?;
    let engine = start_engine(&loaded, &args.plugin, metrics);
    super::progress::report_load_progress(&engine);
    tracing::info!(plugin = %loaded.spec.file.display(), "serving plugin");
    let registration = super::registration::start(&args.server.cluster, &listening, &engine, None)?;
    let code = serve_until_signal(
        Arc::new(engine.clone()),
        engine.clone(),
        listening,
        &args.server,
        auth,
        report_models(&engine, &base),
    )
    .await?;
    if let Some(registration) = registration {
        registration.leave().await;
    }
    Ok(code)
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
