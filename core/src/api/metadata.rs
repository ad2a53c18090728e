//! JSON bodies of the read-only routes: server and model metadata, Triton statistics.
//!
//! Plain borrowed structs serialised by serde; the field names are the wire format
//! (KServe V2 metadata, Triton's statistics extension). `extensions` is the one list of
//! extensions both protocols announce.

use super::Backend;
use crate::engine::{ModelState, ModelStats, ModelStatus, StatDuration, TensorSpec};
use crate::regions::Regions;
use serde::Serialize;

/// What this server can do, which decides the extensions it announces.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// `unimodel serve`: the repository index, load and unload (`unimodel run` refuses the
    /// last two, naming `unimodel serve`).
    pub repository: bool,
    /// `--allow-client-shm`: clients may register system shared-memory regions.
    pub client_shm: bool,
}

/// The extensions a server with `c` implements, by Triton's names and in Triton's order; the
/// one list `GET /v2` and gRPC ServerMetadata announce. Triton's clients branch on it, so a
/// name is here only when the extension works. Never here, because not implemented:
/// `classification`, `sequence`, `schedule_policy` (the `timeout` parameter is honoured,
/// `priority` is not), `cuda_shared_memory`, `parameters` (custom request parameters do not
/// reach the plugin), `trace` and `logging` (their settings are fixed at start-up).
/// `model_repository(unload_dependents)`: the parameter is accepted, and with no ensembles a
/// model has no dependents, so unloading it is all there is to do.
pub fn extensions(c: Capabilities) -> Vec<&'static str> {
    let mut names = Vec::with_capacity(6);
    if c.repository {
        names.extend(["model_repository", "model_repository(unload_dependents)"]);
    }
    names.push("model_configuration");
    if c.client_shm {
        names.push("system_shared_memory");
    }
    names.extend(["binary_tensor_data", "statistics"]);
    names
}

/// `GET /v2`.
#[derive(Serialize)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<&'static str>,
}

impl ServerMetadata {
    /// The metadata of `backend` serving clients' `regions`; REST and gRPC both answer this.
    pub fn of<B: Backend>(backend: &B, regions: &Regions) -> ServerMetadata {
        let capabilities = Capabilities {
            repository: backend.has_repository(),
            client_shm: regions.allowed(),
        };
        ServerMetadata {
            name: "unimodel",
            version: env!("CARGO_PKG_VERSION"),
            extensions: extensions(capabilities),
        }
    }
}

/// `GET /v2/models/{m}`: KServe model metadata plus the model's state, and its error and
/// traceback when it is failed or unavailable, so a broken plugin explains itself.
#[derive(Serialize)]
pub struct ModelMetadata<'a> {
    pub name: &'a str,
    /// Every version served (one entry unless the repository serves several).
    pub versions: Vec<&'a str>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata<'a>>,
    pub outputs: Vec<TensorMetadata<'a>>,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<&'a str>,
}

#[derive(Serialize)]
pub struct TensorMetadata<'a> {
    pub name: &'a str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

impl<'a> ModelMetadata<'a> {
    pub fn new(status: &'a ModelStatus) -> ModelMetadata<'a> {
        let config = &status.config;
        // Like Triton, a batching model shows its batch dimension as a leading -1.
        let batching = config.max_batch_size > 0;
        let tensors = |specs: &'a [TensorSpec]| {
            specs
                .iter()
                .map(|s| TensorMetadata::new(s, batching))
                .collect()
        };
        let (error, traceback) = match &status.state {
            ModelState::Failed { error, traceback } => {
                (Some(error.as_str()), Some(traceback.as_str()))
            }
            // No Python traceback when the worker died; an empty one keeps the fields fixed.
            ModelState::Unavailable { reason } => (Some(reason.as_str()), Some("")),
            ModelState::Loading | ModelState::Ready | ModelState::Stopping => (None, None),
        };
        ModelMetadata {
            name: &config.name,
            versions: vec![&config.version],
            platform: "unimodel_python",
            inputs: tensors(&config.inputs),
            outputs: tensors(&config.outputs),
            state: status.state.name(),
            error,
            traceback,
        }
    }
}

impl<'a> TensorMetadata<'a> {
    fn new(spec: &'a TensorSpec, batching: bool) -> TensorMetadata<'a> {
        let shape = if batching {
            std::iter::once(-1)
                .chain(spec.shape.iter().copied())
                .collect()
        } else {
            spec.shape.clone()
        };
        TensorMetadata {
            name: &spec.name,
            datatype: spec.datatype.as_str(),
            shape,
        }
    }
}

/// `GET /v2/models[/{m}[/versions/{v}]]/stats`, Triton's statistics shape.
#[derive(Serialize)]
pub struct StatsResponse<'a> {
    pub model_stats: Vec<ModelStatsJson<'a>>,
}

#[derive(Serialize)]
pub struct ModelStatsJson<'a> {
    name: &'a str,
    version: &'a str,
    last_inference: u64,
    inference_count: u64,
    execution_count: u64,
    inference_stats: InferenceStats,
    batch_stats: Vec<BatchStatsJson>,
}

#[derive(Serialize)]
struct InferenceStats {
    success: Duration,
    fail: Duration,
    queue: Duration,
    compute_input: Duration,
    compute_infer: Duration,
    compute_output: Duration,
}

#[derive(Serialize)]
struct BatchStatsJson {
    batch_size: u64,
    compute_input: Duration,
    compute_infer: Duration,
    compute_output: Duration,
}

#[derive(Serialize)]
struct Duration {
    count: u64,
    ns: u64,
}

impl From<StatDuration> for Duration {
    fn from(d: StatDuration) -> Duration {
        Duration {
            count: d.count,
            ns: d.ns,
        }
    }
}

impl<'a> StatsResponse<'a> {
    pub fn new(stats: &'a [ModelStats]) -> StatsResponse<'a> {
        StatsResponse {
            model_stats: stats.iter().map(ModelStatsJson::new).collect(),
        }
    }
}

impl<'a> ModelStatsJson<'a> {
    fn new(s: &'a ModelStats) -> ModelStatsJson<'a> {
        ModelStatsJson {
            name: &s.name,
            version: &s.version,
            last_inference: s.last_inference_ms,
            inference_count: s.inference_count,
            execution_count: s.execution_count,
            inference_stats: InferenceStats {
                success: s.success.into(),
                fail: s.fail.into(),
                queue: s.queue.into(),
                compute_input: s.compute_input.into(),
                compute_infer: s.compute_infer.into(),
                compute_output: s.compute_output.into(),
            },
            batch_stats: s
                .batch_stats
                .iter()
                .map(|b| BatchStatsJson {
                    batch_size: b.batch_size,
                    compute_input: b.compute_input.into(),
                    compute_infer: b.compute_infer.into(),
                    compute_output: b.compute_output.into(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_follow_the_capabilities() {
        let of = |repository, client_shm| {
            extensions(Capabilities {
                repository,
                client_shm,
            })
        };
        let always = ["model_configuration", "binary_tensor_data", "statistics"];
        assert_eq!(of(false, false), always);
        let all = of(true, true);
        assert_eq!(
            all,
            [
                "model_repository",
                "model_repository(unload_dependents)",
                "model_configuration",
                "system_shared_memory",
                "binary_tensor_data",
                "statistics"
            ]
        );
        assert!(of(true, false).contains(&"model_repository"));
        assert!(!of(true, false).contains(&"system_shared_memory"));
        assert!(of(false, true).contains(&"system_shared_memory"));
    }
}
