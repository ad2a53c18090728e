//! What `run`, `serve` and `predict` share: resolve the plugin, prepare Python, learn the
//! plugin's models, apply overrides (CLI flags or a model's config.toml), and start workers.
//! `PluginLoader` is the same path for the model repository (`repository::Loader`).

use super::args::{PluginArgs, WorkerArgs};
use crate::engine::model::MAX_BATCH_SIZE;
use crate::engine::validate::Limits;
use crate::engine::{
    Engine, EngineOptions, Executor, FaultPolicy, LlmLimits, MAX_INSTANCES, ModelConfig, WakeClock,
};
use crate::repository::{Built, Loader, ModelSpec, VersionSpec};
use crate::telemetry::metrics::Metrics;
use crate::worker::codec::MAX_FDS_PER_FRAME;
use crate::worker::types::{InstanceConfig, ModelDecl, PythonEnv, RestartPolicy, Timeouts};
use crate::worker::{inspect, prepare_python, spawn_instance};
use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A plugin argument split into its file and optional class.
#[derive(Debug, PartialEq)]
pub struct PluginSpec {
    pub file: PathBuf,
    pub class: Option<String>,
}

impl PluginSpec {
    /// Parses `FILE.py`, `FILE.py:Class` or `DIR`, checking that the file exists.
    pub fn parse(spec: &str) -> anyhow::Result<PluginSpec> {
        let (path, class) = match spec.rsplit_once(':') {
            Some((p, c)) if !c.is_empty() && !c.contains('/') => (p, Some(c.to_string())),
            _ => (spec, None),
        };
        let path = Path::new(path);
        let file = if path.is_dir() {
            path.join("plugin.py")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            if path.is_dir() {
                bail!("plugin directory '{}' has no plugin.py", path.display());
            }
            bail!(
                "plugin file '{}' not found (expected FILE.py, FILE.py:ClassName or a directory with plugin.py)",
                path.display()
            );
        }
        let file = file
            .canonicalize()
            .with_context(|| format!("cannot resolve '{}'", file.display()))?;
        Ok(PluginSpec { file, class })
    }

    /// The form `python -m unimodel.worker --inspect` takes.
    pub fn to_arg(&self) -> String {
        match &self.class {
            Some(c) => format!("{}:{}", self.file.display(), c),
            None => self.file.display().to_string(),
        }
    }
}

/// A plugin's models, ready to serve.
pub struct Loaded {
    pub spec: PluginSpec,
    pub models: Vec<(ModelConfig, Vec<InstanceConfig>)>,
}

/// Server-side settings that are not per model.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    pub queue_capacity: usize,
    pub request_timeout: Duration,
    /// The continuous-batching limits of an `um.LLM` model.
    pub llm: LlmLimits,
}

/// Resolves the plugin, prepares Python and inspects the plugin's classes.
pub async fn load_plugin(args: &PluginArgs, settings: &ServeSettings) -> anyhow::Result<Loaded> {
    let spec = PluginSpec::parse(&args.plugin)?;
    let mut python = prepare_python(args.worker.python.as_deref()).await?;
    python.pass_env.clone_from(&args.worker.worker_env);
    let decls = inspect(&python, &spec.to_arg()).await?;
    if decls.is_empty() {
        bail!(
            "'{}' defines no um.Model or um.LLM subclass",
            spec.file.display()
        );
    }
    for d in &decls {
        check_servable(d)?;
    }
    let mut seen = BTreeMap::new();
    for d in &decls {
        if let Some(prev) = seen.insert(d.name.clone(), d.class.clone()) {
            bail!(
                "classes {prev} and {} both serve model name '{}'; set `name` on one of them",
                d.class,
                d.name
            );
        }
    }
    let models = decls
        .into_iter()
        .map(|d| {
            let config = model_config(&d, &spec.file, &Overrides::from_args(args), settings)?;
            let model_dir = spec
                .file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let instances = instance_configs(
                &config,
                d.concurrency,
                &args.worker,
                &args.worker.device,
                &python,
                &model_dir,
            );
            Ok((config, instances))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Loaded { spec, models })
}

/// Refuses what this server cannot serve yet, before any worker starts.
fn check_servable(d: &ModelDecl) -> anyhow::Result<()> {
    // Tensors too large for an arena travel as one descriptor each in a single frame.
    let most = MAX_FDS_PER_FRAME;
    if d.inputs.len() > most || d.outputs.len() > most {
        bail!(
            "model '{}' declares {} inputs and {} outputs; at most {most} of each are supported",
            d.name,
            d.inputs.len(),
            d.outputs.len()
        );
    }
    Ok(())
}

/// What may replace a plugin's class attributes: CLI flags (`run`) or config.toml (`serve`).
#[derive(Debug, Default)]
struct Overrides {
    max_batch_size: Option<u32>,
    max_queue_delay_ms: Option<f64>,
    instances: Option<u32>,
    parameters: BTreeMap<String, String>,
    max_concurrency: Option<u64>,
    retry_on_worker_failure: Option<bool>,
    memory_limit_bytes: Option<u64>,
    concurrency: Option<u32>,
}

impl Overrides {
    fn from_args(args: &PluginArgs) -> Overrides {
        Overrides {
            max_batch_size: args.max_batch_size,
            max_queue_delay_ms: args.max_queue_delay_ms,
            instances: args.instances,
            parameters: args.set.iter().cloned().collect(),
            max_concurrency: args.max_concurrency,
            retry_on_worker_failure: None,
            memory_limit_bytes: None,
            concurrency: None,
        }
    }
}

fn model_config(
    d: &ModelDecl,
    plugin: &Path,
    o: &Overrides,
    s: &ServeSettings,
) -> anyhow::Result<ModelConfig> {
    let instances = o.instances.unwrap_or(d.instances);
    if !(1..=MAX_INSTANCES).contains(&instances) {
        bail!(
            "instances must be between 1 and {MAX_INSTANCES}, got {instances} (from {}); \
             lower the plugin's `instances`, or override it with --instances (run) or \
             config.toml's instances (serve)",
            if o.instances.is_some() {
                "the override"
            } else {
                "the plugin's class attribute"
            }
        );
    }
    // Checked here too: the plugin's class attribute reaches no other check.
    let delay_ms = o.max_queue_delay_ms.unwrap_or(d.max_queue_delay_ms);
    if let Err(e) = super::limits::queue_delay_in_range(delay_ms) {
        bail!("max_queue_delay_ms of model '{}': {e}", d.name);
    }
    let max_batch_size = o.max_batch_size.unwrap_or(d.max_batch_size);
    if max_batch_size > MAX_BATCH_SIZE {
        bail!(
            "max_batch_size of model '{}' must be between 0 and {MAX_BATCH_SIZE}, got {max_batch_size}",
            d.name
        );
    }
    Ok(ModelConfig {
        name: d.name.clone(),
        version: "1".into(),
        plugin: plugin.to_path_buf(),
        class: d.class.clone(),
        max_batch_size,
        max_queue_delay: Duration::from_secs_f64(delay_ms / 1000.0),
        instances,
        inputs: d.inputs.clone(),
        outputs: d.outputs.clone(),
        parameters: o.parameters.clone(),
        queue_capacity: s.queue_capacity,
        request_timeout: s.request_timeout,
        streaming: d.streaming,
        llm: d.llm.then_some(s.llm),
        faults: FaultPolicy {
            max_concurrency: o
                .max_concurrency
                .or(d.max_concurrency)
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            retry_on_worker_failure: o
                .retry_on_worker_failure
                .unwrap_or(d.retry_on_worker_failure),
            memory_limit_bytes: o.memory_limit_bytes.or(d.memory_limit_bytes),
        },
    })
}

fn instance_configs(
    c: &ModelConfig,
    concurrency: u32,
    worker: &WorkerArgs,
    device: &str,
    python: &PythonEnv,
    model_dir: &Path,
) -> Vec<InstanceConfig> {
    (0..c.instances)
        .map(|instance| InstanceConfig {
            model: c.name.clone(),
            instance,
            plugin: c.plugin.clone(),
            class: c.class.clone(),
            model_dir: model_dir.to_path_buf(),
            device: device.to_string(),
            parameters: c.parameters.clone(),
            max_batch_size: c.max_batch_size,
            python: python.clone(),
            input_arena_bytes: worker.arena_bytes,
            output_arena_bytes: worker.arena_bytes,
            max_output_bytes: worker.max_tensor_bytes,
            timeouts: Timeouts {
                hello: Duration::from_secs(60),
                load: Duration::from_millis(worker.load_timeout_ms),
                execute: Duration::from_millis(worker.execution_timeout_ms),
                heartbeat_interval: Duration::from_secs(5),
                heartbeat_timeout: Duration::from_secs(10),
            },
            restart: RestartPolicy {
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(10),
                max_setup_failures: 3,
            },
            memory_limit_bytes: c.faults.memory_limit_bytes,
            concurrency,
        })
        .collect()
}

fn spawn_all(instances: &[InstanceConfig]) -> Vec<Arc<dyn Executor>> {
    instances
        .iter()
        .map(|ic| Arc::new(spawn_instance(ic.clone())) as Arc<dyn Executor>)
        .collect()
}

/// The engine's limits from the worker flags.
pub fn engine_options(worker: &WorkerArgs, metrics: Arc<Metrics>) -> EngineOptions {
    EngineOptions {
        limits: Limits {
            max_tensor_bytes: worker.max_tensor_bytes,
        },
        metrics,
        wake_clock: WakeClock::Precise,
    }
}

/// Builds repository models the way `run` builds a plugin's: inspect, apply the model's
/// config.toml, spawn workers. The model is named after its folder (or its listing).
pub struct PluginLoader {
    pub python: PythonEnv,
    pub worker: WorkerArgs,
    pub settings: ServeSettings,
}

impl Loader for PluginLoader {
    fn build(
        &self,
        spec: &ModelSpec,
        version: &VersionSpec,
    ) -> BoxFuture<'static, Result<Built, String>> {
        let python = self.python.clone();
        let worker = self.worker.clone();
        let settings = self.settings.clone();
        let spec = spec.clone();
        let version = version.clone();
        Box::pin(async move {
            let plugin = version.plugin.display().to_string();
            let decls = inspect(&python, &plugin).await.map_err(|e| {
                if let crate::worker::InspectError::Plugin { traceback, .. } = &e {
                    tracing::error!(model = %spec.name, "{e}\n{traceback}");
                }
                e.to_string()
            })?;
            let decl = pick_class(&decls, spec.overrides.class.as_deref(), &plugin)?;
            check_servable(decl).map_err(|e| e.to_string())?;
            let o = &spec.overrides;
            let overrides = Overrides {
                max_batch_size: o.max_batch_size,
                max_queue_delay_ms: o.max_queue_delay_ms,
                instances: o.instances,
                parameters: o.parameters.clone(),
                max_concurrency: o.max_concurrency,
                retry_on_worker_failure: o.retry_on_worker_failure,
                memory_limit_bytes: o.memory_limit_bytes,
                concurrency: o.concurrency,
            };
            let mut config = model_config(decl, &version.plugin, &overrides, &settings)
                .map_err(|e| e.to_string())?;
            config.name = spec.name.clone();
            config.version = version.version.to_string();
            let device = o.device.as_deref().unwrap_or(&worker.device);
            let instances = instance_configs(
                &config,
                overrides.concurrency.unwrap_or(decl.concurrency),
                &worker,
                device,
                &python,
                &version.model_dir,
            );
            tracing::info!(
                model = %config.name,
                version = %config.version,
                "loading model {} version {}: {} instance(s) starting",
                config.name,
                config.version,
                instances.len()
            );
            Ok((config, spawn_all(&instances)))
        })
    }
}

/// The class a repository model serves: the one named in config.toml, else the only one.
fn pick_class<'a>(
    decls: &'a [ModelDecl],
    class: Option<&str>,
    plugin: &str,
) -> Result<&'a ModelDecl, String> {
    let names = || {
        decls
            .iter()
            .map(|d| d.class.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (class, decls) {
        (_, []) => Err(format!("'{plugin}' defines no um.Model or um.LLM subclass")),
        (Some(c), _) => decls.iter().find(|d| d.class == c).ok_or_else(|| {
            format!(
                "config.toml class = \"{c}\", but '{plugin}' defines only: {}",
                names()
            )
        }),
        (None, [only]) => Ok(only),
        (None, _) => Err(format!(
            "'{plugin}' defines several models ({}); pick one with `class = \"...\"` in config.toml",
            names()
        )),
    }
}

/// Spawns every worker and starts the engine over them.
pub fn start_engine(loaded: &Loaded, args: &PluginArgs, metrics: Arc<Metrics>) -> Engine {
    let models = loaded
        .models
        .iter()
        .map(|(config, instances)| (config.clone(), spawn_all(instances)))
        .collect();
    Engine::start(models, engine_options(&args.worker, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_class_and_directory_specs() {
        let dir = std::env::temp_dir().join(format!("um-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plugin.py");
        std::fs::write(&file, "").unwrap();
        let canon = file.canonicalize().unwrap();

        let s = PluginSpec::parse(file.to_str().unwrap()).unwrap();
        assert_eq!(
            s,
            PluginSpec {
                file: canon.clone(),
                class: None
            }
        );
        let s = PluginSpec::parse(&format!("{}:Doubler", file.display())).unwrap();
        assert_eq!(s.class.as_deref(), Some("Doubler"));
        assert_eq!(s.to_arg(), format!("{}:Doubler", canon.display()));
        let s = PluginSpec::parse(dir.to_str().unwrap()).unwrap();
        assert_eq!(s.file, canon);

        let err = PluginSpec::parse("/nonexistent/x.py")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
