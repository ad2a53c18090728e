//! What `run` and `predict` share: resolve the plugin, prepare Python, learn the plugin's
//! models, apply CLI overrides, and start the engine over freshly spawned workers.

use super::args::PluginArgs;
use crate::engine::validate::Limits;
use crate::engine::{Engine, EngineOptions, Executor, ModelConfig};
use crate::telemetry::metrics::Metrics;
use crate::worker::codec::MAX_FDS_PER_FRAME;
use crate::worker::types::{InstanceConfig, ModelDecl, PythonEnv, RestartPolicy, Timeouts};
use crate::worker::{inspect, prepare_python, spawn_instance};
use anyhow::{Context as _, bail};
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
pub struct ServeSettings {
    pub queue_capacity: usize,
    pub request_timeout: Duration,
}

/// Resolves the plugin, prepares Python and inspects the plugin's classes.
pub async fn load_plugin(args: &PluginArgs, settings: &ServeSettings) -> anyhow::Result<Loaded> {
    let spec = PluginSpec::parse(&args.plugin)?;
    let python = prepare_python(args.python.as_deref()).await?;
    let decls = inspect(&python, &spec.to_arg()).await?;
    if decls.is_empty() {
        bail!("'{}' defines no um.Model subclass", spec.file.display());
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
            let config = model_config(&d, &spec, args, settings)?;
            let instances = instance_configs(&config, args, &python, &spec);
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

fn model_config(
    d: &ModelDecl,
    spec: &PluginSpec,
    args: &PluginArgs,
    s: &ServeSettings,
) -> anyhow::Result<ModelConfig> {
    let delay_ms = args.max_queue_delay_ms.unwrap_or(d.max_queue_delay_ms);
    if !(delay_ms.is_finite() && delay_ms >= 0.0) {
        bail!("--max-queue-delay-ms must be a non-negative number of milliseconds, got {delay_ms}");
    }
    Ok(ModelConfig {
        name: d.name.clone(),
        version: "1".into(),
        plugin: spec.file.clone(),
        class: d.class.clone(),
        max_batch_size: args.max_batch_size.unwrap_or(d.max_batch_size),
        max_queue_delay: Duration::from_secs_f64(delay_ms / 1000.0),
        instances: args.instances.unwrap_or(d.instances).max(1),
        inputs: d.inputs.clone(),
        outputs: d.outputs.clone(),
        parameters: args.set.iter().cloned().collect(),
        queue_capacity: s.queue_capacity,
        request_timeout: s.request_timeout,
        streaming: d.streaming,
    })
}

fn instance_configs(
    c: &ModelConfig,
    args: &PluginArgs,
    python: &PythonEnv,
    spec: &PluginSpec,
) -> Vec<InstanceConfig> {
    let model_dir = spec
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    (0..c.instances)
        .map(|instance| InstanceConfig {
            model: c.name.clone(),
            instance,
            plugin: c.plugin.clone(),
            class: c.class.clone(),
            model_dir: model_dir.clone(),
            device: args.device.clone(),
            parameters: c.parameters.clone(),
            max_batch_size: c.max_batch_size,
            python: python.clone(),
            input_arena_bytes: args.arena_bytes,
            output_arena_bytes: args.arena_bytes,
            max_output_bytes: args.max_tensor_bytes,
            timeouts: Timeouts {
                hello: Duration::from_secs(60),
                load: Duration::from_millis(args.load_timeout_ms),
                execute: Duration::from_millis(args.execution_timeout_ms),
                heartbeat_interval: Duration::from_secs(5),
                heartbeat_timeout: Duration::from_secs(10),
            },
            restart: RestartPolicy {
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(10),
                max_setup_failures: 3,
            },
        })
        .collect()
}

/// Spawns every worker and starts the engine over them.
pub fn start_engine(loaded: &Loaded, args: &PluginArgs, metrics: Arc<Metrics>) -> Engine {
    let models = loaded
        .models
        .iter()
        .map(|(config, instances)| {
            let execs: Vec<Arc<dyn Executor>> = instances
                .iter()
                .map(|ic| Arc::new(spawn_instance(ic.clone())) as Arc<dyn Executor>)
                .collect();
            (config.clone(), execs)
        })
        .collect();
    Engine::start(
        models,
        EngineOptions {
            limits: Limits {
                max_tensor_bytes: args.max_tensor_bytes,
            },
            metrics,
        },
    )
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
