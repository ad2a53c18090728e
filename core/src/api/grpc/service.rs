//! `inference.GRPCInferenceService`: each RPC translates its message, calls the `Backend`,
//! and translates the answer back. Every failure is an `ApiError`, turned into a status in
//! one place (`status.rs`). Inference is shared by ModelInfer and ModelStreamInfer
//! (`infer_one`), which also records metrics (protocol "grpc") and the access log line.

use super::call::CallContext;
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::*;
use super::{convert, metadata, repository, shm, stream, unsupported};
use crate::api::metrics::{self as api_metrics, Target};
use crate::api::{ApiError, Backend};
use crate::engine::{EngineError, InferStream};
use crate::regions::Regions;
use crate::telemetry::metrics::{Metrics, PROTOCOL_GRPC};
use futures::StreamExt as _;
use std::sync::Arc;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

type RpcResult<T> = Result<Response<T>, Status>;

/// The service over a backend; cheap to clone (a stream clones it per request).
pub struct InferenceService<B> {
    backend: Arc<B>,
    metrics: Option<Arc<Metrics>>,
    /// Clients' shared-memory regions, shared with the REST routes.
    regions: Arc<Regions>,
}

// Derived Clone would demand `B: Clone`; only the Arcs are cloned.
impl<B> Clone for InferenceService<B> {
    fn clone(&self) -> Self {
        InferenceService {
            backend: Arc::clone(&self.backend),
            metrics: self.metrics.clone(),
            regions: Arc::clone(&self.regions),
        }
    }
}

impl<B: Backend> InferenceService<B> {
    pub fn new(backend: Arc<B>, regions: Arc<Regions>) -> InferenceService<B> {
        let metrics = backend.metrics();
        InferenceService {
            backend,
            metrics,
            regions,
        }
    }

    /// One inference, recorded in the metrics and the access log whatever its outcome.
    pub async fn infer_one(
        &self,
        req: ModelInferRequest,
        call: &CallContext,
    ) -> Result<ModelInferResponse, ApiError> {
        let started = Instant::now();
        let model = req.model_name.clone();
        let version = (!req.model_version.is_empty()).then(|| req.model_version.clone());
        let mut served: Option<(String, u32)> = None;
        let answer = async {
            let (mut request, shm) = convert::decode(req, call.deadline, &self.regions)?;
            request.trace = call.trace.propagate.then_some(call.trace.trace);
            let infer = self.backend.infer(request);
            let response = match call.expires {
                // Dropping `infer` cancels the request in the engine.
                Some(at) => tokio::time::timeout_at(at, infer).await.map_err(|_| {
                    EngineError::Timeout {
                        model: model.clone(),
                        after: call.deadline.unwrap_or_default(),
                    }
                })??,
                None => infer.await?,
            };
            served = Some((response.model_version.clone(), response.batch_size));
            convert::encode(response, &shm)
        }
        .instrument(call.span.clone())
        .await;
        if let Some(m) = &self.metrics {
            let target = Target {
                model: &model,
                version: version.as_deref(),
                served_version: served.as_ref().map(|(v, _)| v.as_str()),
            };
            let result = answer.as_ref().map(|_| ());
            api_metrics::record_infer(m, &*self.backend, PROTOCOL_GRPC, target, result, started);
        }
        let outcome = answer.as_ref().map(|_| ());
        access_log(&model, outcome, served.map(|(_, b)| b), started, call);
        answer
    }

    /// Whether `name` (at `version`, empty: the default) is a generator model; `false` when
    /// unknown, so `infer_one` answers the error.
    pub fn is_generator(&self, name: &str, version: &str) -> bool {
        self.model_status(name, version)
            .is_ok_and(|status| status.config.streaming)
    }

    /// Starts a streaming inference and waits for its first response, so that a request
    /// failing early is recorded (metrics, access log) as failed, as REST generate_stream does.
    pub async fn start_stream(
        &self,
        req: ModelInferRequest,
        call: &CallContext,
    ) -> Result<(Option<ModelInferResponse>, InferStream), ApiError> {
        let started = Instant::now();
        let model = req.model_name.clone();
        let version = (!req.model_version.is_empty()).then(|| req.model_version.clone());
        let mut served: Option<(String, u32)> = None;
        let answer = async {
            let (mut request, shm) = convert::decode(req, call.deadline, &self.regions)?;
            if !shm.is_empty() {
                // Each chunk would overwrite the last in the region; chunks come back as data.
                return Err(ApiError::BadRequest(format!(
                    "model '{model}' streams (a generator): its outputs cannot be written into \
                     shared-memory regions; request them without shared_memory_region"
                )));
            }
            request.trace = call.trace.propagate.then_some(call.trace.trace);
            let mut stream = self.backend.infer_stream(request).await?;
            let first = stream.next().await.transpose()?;
            served = first
                .as_ref()
                .map(|r| (r.model_version.clone(), r.batch_size));
            let first = first.map(|r| convert::encode(r, &[])).transpose()?;
            Ok((first, stream))
        }
        .instrument(call.span.clone())
        .await;
        if let Some(m) = &self.metrics {
            let target = Target {
                model: &model,
                version: version.as_deref(),
                served_version: served.as_ref().map(|(v, _)| v.as_str()),
            };
            let result = answer.as_ref().map(|_| ());
            api_metrics::record_infer(m, &*self.backend, PROTOCOL_GRPC, target, result, started);
        }
        let outcome = answer.as_ref().map(|_| ());
        access_log(&model, outcome, served.map(|(_, b)| b), started, call);
        answer
    }

    fn model_status(
        &self,
        name: &str,
        version: &str,
    ) -> Result<crate::engine::ModelStatus, ApiError> {
        let version = (!version.is_empty()).then_some(version);
        Ok(self.backend.model(name, version)?)
    }
}

/// One line per inference at INFO, target `unimodel::access` (off unless `--access-log`),
/// the gRPC counterpart of the REST line.
fn access_log(
    model: &str,
    outcome: Result<(), &ApiError>,
    batch_size: Option<u32>,
    started: Instant,
    call: &CallContext,
) {
    let latency_ms = started.elapsed().as_micros() as f64 / 1e3;
    let code = match outcome {
        Ok(_) => tonic::Code::Ok,
        Err(e) => super::status::code(e),
    };
    tracing::info!(
        target: "unimodel::access",
        protocol = "grpc",
        model,
        code = ?code,
        latency_ms,
        batch_size,
        trace_id = %call.trace.trace,
        "grpc ModelInfer {model} {code:?} {latency_ms:.3}ms",
    );
}

#[tonic::async_trait]
impl<B: Backend> GrpcInferenceService for InferenceService<B> {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> RpcResult<ServerLiveResponse> {
        Ok(Response::new(ServerLiveResponse {
            live: self.backend.live(),
        }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> RpcResult<ServerReadyResponse> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.backend.ready(),
        }))
    }

    /// Ready false (not an error) for an unknown model, as Triton answers.
    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> RpcResult<ModelReadyResponse> {
        let req = req.into_inner();
        let ready = match self.model_status(&req.name, &req.version) {
            Ok(status) => status.state.is_ready(),
            Err(ApiError::Engine(
                EngineError::ModelNotFound { .. } | EngineError::VersionNotFound { .. },
            )) => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> RpcResult<ServerMetadataResponse> {
        let m = crate::api::metadata::ServerMetadata::of(&*self.backend, &self.regions);
        Ok(Response::new(metadata::server_metadata(m)))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> RpcResult<ModelMetadataResponse> {
        let req = req.into_inner();
        let status = self.model_status(&req.name, &req.version)?;
        Ok(Response::new(metadata::model_metadata(&status)))
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> RpcResult<ModelInferResponse> {
        let call = CallContext::new(req.metadata(), "ModelInfer").expiring(req.extensions());
        let response = self.infer_one(req.into_inner(), &call).await?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = stream::ResponseStream;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> RpcResult<Self::ModelStreamInferStream> {
        let call = CallContext::new(req.metadata(), "ModelStreamInfer");
        let charges = req
            .extensions()
            .get::<super::budget::MessageCharges>()
            .cloned();
        Ok(Response::new(stream::answer_in_order(
            self.clone(),
            req.into_inner(),
            call,
            charges,
        )))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> RpcResult<ModelConfigResponse> {
        let req = req.into_inner();
        let status = self.model_status(&req.name, &req.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(crate::api::model_config::model_config(&status.config)),
        }))
    }

    /// Empty name: every model.
    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> RpcResult<ModelStatisticsResponse> {
        let req = req.into_inner();
        let name = (!req.name.is_empty()).then_some(req.name.as_str());
        let version = (!req.version.is_empty()).then_some(req.version.as_str());
        let stats = self.backend.stats(name, version).map_err(ApiError::from)?;
        Ok(Response::new(metadata::statistics(&stats)))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> RpcResult<RepositoryIndexResponse> {
        let answer = repository::index(&*self.backend, req.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> RpcResult<RepositoryModelLoadResponse> {
        let answer = repository::load(&*self.backend, req.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> RpcResult<RepositoryModelUnloadResponse> {
        let answer = repository::unload(&*self.backend, req.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<SystemSharedMemoryStatusRequest>,
    ) -> RpcResult<SystemSharedMemoryStatusResponse> {
        Ok(Response::new(shm::status(&self.regions, req.into_inner())?))
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<SystemSharedMemoryRegisterRequest>,
    ) -> RpcResult<SystemSharedMemoryRegisterResponse> {
        Ok(Response::new(shm::register(
            &self.regions,
            req.into_inner(),
        )?))
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> RpcResult<SystemSharedMemoryUnregisterResponse> {
        Ok(Response::new(shm::unregister(
            &self.regions,
            req.into_inner(),
        )))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> RpcResult<CudaSharedMemoryStatusResponse> {
        Err(unsupported::cuda_shm().into())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> RpcResult<CudaSharedMemoryRegisterResponse> {
        Err(unsupported::cuda_shm().into())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> RpcResult<CudaSharedMemoryUnregisterResponse> {
        Err(unsupported::cuda_shm().into())
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> RpcResult<TraceSettingResponse> {
        Err(unsupported::settings("TraceSetting", "--otlp-endpoint").into())
    }

    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> RpcResult<LogSettingsResponse> {
        Err(unsupported::settings("LogSettings", "UNIMODEL_LOG and --access-log").into())
    }
}
