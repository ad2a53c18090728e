//! `unimodel serve`: many models from a model repository directory or a config file.
//!
//! 1. Find the models (`repository::Source`), check the `--load-model` names, prepare Python.
//! 2. Listen at once; start an empty engine and the repository actor over it.
//! 3. Load the models the control mode asks for at start (every model with `none`, the
//!    `--load-model` ones with `explicit`), each in its own task, logging READY or FAILED.
//! 4. Serve `/v2/repository/*` beside the inference routes; on a signal, drain and stop.
//!
//! With `--etcd`, the node and its models are registered in etcd from step 2 on
//! (`registration.rs`); at the first signal its key says DRAINING, and it leaves etcd after the drain. With
//! `--nats`, the node takes control requests and publishes events over NATS
//! (`cluster::control`) from step 2 on.

use super::args::{ControlModeArg, ServeArgs};
use super::server::{listen, metrics, serve_until_signal, settings};
use super::serving::{PluginLoader, engine_options};
use crate::cluster::control::{NatsOptions, Subjects};
use crate::cluster::keys::{NodeName, Prefix};
use crate::engine::Engine;
use crate::repository::{ControlMode, ModelServer, Repository, Source};
use crate::worker::prepare_python;
use anyhow::{Context as _, bail};
use std::process::ExitCode;
use std::sync::Arc;

pub async fn serve(mut args: ServeArgs) -> anyhow::Result<ExitCode> {
    let source = source(&mut args)?;
    let auth = super::auth::load(&args.server.auth)?;
    let mode = match args.model_control_mode {
        ControlModeArg::None => ControlMode::None,
        ControlModeArg::Explicit => ControlMode::Explicit,
    };
    let names = source.names()?;
    let at_start = match mode {
        ControlMode::None if !args.load_model.is_empty() => bail!(
            "--load-model needs --model-control-mode explicit (with `none`, every model is loaded at start)"
        ),
        ControlMode::None => names.clone(),
        ControlMode::Explicit => args.load_model.clone(),
    };
    if let Some(missing) = at_start.iter().find(|n| !names.contains(n)) {
        bail!(
            "--load-model {missing}: no such model in {}; it holds: {}",
            source.describe(),
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    let nats = args.nats.nats.clone().map(|url| NatsOptions {
        url,
        creds: args.nats.nats_creds.clone(),
    });
    // A bad NATS URL or credentials file fails before anything starts (the prefix and the
    // node name are checked as they are parsed).
    let prefix = Prefix::parse(&args.server.cluster.etcd_prefix)?;
    if let Some(nats) = &nats {
        nats.prepare("unimodel").await?;
    }
    let mut python = prepare_python(args.worker.python.as_deref()).await?;
    python.pass_env.clone_from(&args.worker.worker_env);
    let listening = listen(&args.server).await?;
    let base = listening.base.clone();
    let metrics = metrics(&args.server, &listening, auth.as_ref()).await?;
    let engine = Engine::start(Vec::new(), engine_options(&args.worker, metrics));
    let loader = PluginLoader {
        python,
        worker: args.worker.clone(),
        settings: settings(&args.server),
    };
    tracing::info!(
        models = %source.describe(),
        mode = ?mode,
        "serving a model repository ({} model(s) found)",
        names.len()
    );
    let repository = Repository::start(
        source,
        Arc::new(loader),
        engine.clone(),
        mode,
        !at_start.is_empty(),
    );
    let backend = Arc::new(ModelServer {
        engine: engine.clone(),
        repository: repository.clone(),
    });
    let registration =
        super::registration::start(&args.server.cluster, &listening, &engine, Some(&repository))?;
    if let Some(nats) = nats {
        let node = node_name(&args, listening.http_addr.port())?;
        let subjects = Subjects::new(&prefix, &node);
        crate::cluster::control::node::start(&nats, subjects, (*backend).clone()).await?;
    }
    let code = serve_until_signal(
        backend,
        engine,
        listening,
        &args.server,
        auth,
        load_at_start(&repository, at_start, &base),
    )
    .await?;
    if let Some(registration) = registration {
        registration.leave().await;
    }
    Ok(code)
}

/// `--node-name`, or `{hostname}-{port}` with the HTTP port actually bound (as the etcd
/// registration names the node, `registration.rs`).
fn node_name(args: &ServeArgs, port: u16) -> anyhow::Result<NodeName> {
    if let Some(name) = &args.server.cluster.node_name {
        return Ok(NodeName::parse(name)?);
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    Ok(NodeName::from_host_port(&host, port))
}

/// The model source from `--model-repository` or `--config`.
fn source(args: &mut ServeArgs) -> anyhow::Result<Source> {
    if let Some(file) = args.config.clone() {
        if args.model_repository.is_some() {
            bail!("give either --model-repository or --config, not both");
        }
        let given = given_flags();
        return super::serve_config::apply(&file, args, &|id| given.iter().any(|g| g == id));
    }
    let Some(dir) = args.model_repository.clone() else {
        bail!("say where the models are: --model-repository DIR or --config FILE");
    };
    if !dir.is_dir() {
        bail!(
            "model repository '{}' is not a directory (expected one folder per model, each with plugin.py)",
            dir.display()
        );
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve '{}'", dir.display()))?;
    Ok(Source::Directory(dir))
}

/// The ids of the `serve` flags given on the command line (they win over the config file).
fn given_flags() -> Vec<String> {
    use clap::CommandFactory as _;
    use clap::parser::ValueSource;
    let Ok(matches) = super::args::Cli::command().try_get_matches_from(std::env::args_os()) else {
        return Vec::new();
    };
    let Some(serve) = matches.subcommand_matches("serve") else {
        return Vec::new();
    };
    serve
        .ids()
        .filter(|id| serve.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

/// Loads the start-up models concurrently and logs one line per model.
async fn load_at_start(repository: &Repository, names: Vec<String>, base: &str) {
    let loads = names.iter().map(|name| async move {
        match repository.load_at_start(name).await {
            Ok(()) => {
                tracing::info!(model = %name, "model {name} READY at {base}/v2/models/{name}")
            }
            Err(e) => tracing::error!(model = %name, "model {name} FAILED: {e}"),
        }
    });
    futures::future::join_all(loads).await;
    tracing::info!(
        "{} model(s) loaded at start; serving at {base}",
        names.len()
    );
}
