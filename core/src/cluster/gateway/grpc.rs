//! The gateway's gRPC front end: `inference.GRPCInferenceService`, each model RPC forwarded
//! to a node over its tonic channel (one HTTP/2 connection per node, multiplexed), the
//! server RPCs answered from the table.
//!
//! Same rules as REST (`forward.rs`): the node is picked by two choices on outstanding
//! requests; a call that could not connect (`tonic::ConnectError`), that HTTP/2 refused
//! (`REFUSED_STREAM`: never processed), that the node refused with `unimodel-not-run: 1`
//! metadata, or whose node left the table before it was sent goes to another node; a
//! transport failure after the call left is UNAVAILABLE naming the node (no answer within
//! `--upstream-timeout-ms`: DEADLINE_EXCEEDED), never sent again, and takes the node out
//! of rotation; a node's own status passes through. Metadata passes through (credentials,
//! `grpc-timeout`), with the gateway's `traceparent`. ModelStreamInfer goes to the node of
//! its first message's model and stays there; it is sent elsewhere only if its connection
//! failed before anything was read. Opening it waits for the node's answer head as long as
//! a unary call does, and fails at once if the node leaves the table meanwhile.

use super::actor::TableHandle;
use super::error::GatewayError;
use super::forward::{MAX_ATTEMPTS, NOT_RUN, error_chain, left_the_table};
use super::metrics::{GatewayMetrics, NONE, RetryReason};
use super::node::{InFlight, Node};
use super::routes::{Purpose, Tried};
use crate::cluster::control::protocol::{Op as ControlOp, Request as ControlRequest};
use crate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::*;
use crate::telemetry::metrics::PROTOCOL_GRPC;
use crate::telemetry::{TraceParent, trace_context::TRACEPARENT};
use futures::{Stream, StreamExt as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

type RpcResult<T> = Result<Response<T>, Status>;
type Client = GrpcInferenceServiceClient<Channel>;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct GatewayGrpc {
    pub table: TableHandle,
    pub metrics: Arc<GatewayMetrics>,
    /// Longest wait for a node's answer head (`--upstream-timeout-ms`).
    pub timeout: Duration,
    /// `--nats`: RepositoryModelLoad/Unload become orders to nodes (`control.rs`).
    pub control: Option<super::control::Control>,
}

/// Headers that describe this hop's encoding, not the call: tonic sets its own.
const HOP_METADATA: [&str; 2] = ["grpc-encoding", "grpc-accept-encoding"];

/// The call's metadata for the node: the client's, less this hop's encoding headers, with
/// the gateway's `traceparent`.
fn outgoing_metadata(mut md: MetadataMap) -> MetadataMap {
    for h in HOP_METADATA {
        md.remove(h);
    }
    let incoming = md
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let span = tracing::debug_span!("gateway_grpc", trace_id = tracing::field::Empty);
    let trace = crate::telemetry::request_trace(&span, incoming.as_ref());
    span.record("trace_id", tracing::field::display(trace));
    if (incoming.is_some() || crate::telemetry::otlp_active())
        && let Some(tp) = super::trace::outgoing(&span, trace, true)
        && let Ok(v) = MetadataValue::try_from(tp.as_bytes())
    {
        md.insert(TRACEPARENT, v);
    }
    md
}

/// True when the call never reached the node (no connection was made, or HTTP/2 refused
/// the stream before processing it).
fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

fn not_run(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status
            .metadata()
            .get(NOT_RUN)
            .is_some_and(|v| v.as_bytes() == b"1")
}

/// What a node's failure means for the client: its own status passes through; a transport
/// failure (the status has a source: tonic made it, not the node) names the node, and
/// takes the node out of rotation until a probe finds it live.
fn from_node(table: &TableHandle, node: &Arc<Node>, status: Status) -> Status {
    if std::error::Error::source(&status).is_some() {
        node_broke(table, node);
        return GatewayError::NodeFailed {
            node: Arc::clone(&node.name),
            detail: error_chain(&status),
        }
        .into();
    }
    status
}

/// `node` failed a call after it was sent: out of rotation (a retired node is not coming
/// back, so it gets no probe).
fn node_broke(table: &TableHandle, node: &Arc<Node>) {
    if !node.is_retired() {
        table.node_failed(node);
    }
}

/// How waiting for a node's answer head ended.
enum Waited<T> {
    Answered(T),
    /// Nothing within `--upstream-timeout-ms`, or the node left the table: the gateway's
    /// error naming it (the call may have run).
    Broke(GatewayError),
}

/// Waits for `call` at most `timeout`, and no longer than `node` stays in the table.
async fn wait_for<T>(node: &Node, timeout: Duration, call: impl Future<Output = T>) -> Waited<T> {
    tokio::select! {
        r = tokio::time::timeout(timeout, call) => match r {
            Ok(answer) => Waited::Answered(answer),
            Err(_) => Waited::Broke(GatewayError::NodeTimeout {
                node: Arc::clone(&node.name),
                after: timeout,
            }),
        },
        () = node.gone() => Waited::Broke(left_the_table(node)),
    }
}

impl GatewayGrpc {
    /// Sends a model call to the nodes the table picks, until one runs it.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        req: Request<Req>,
        model: &str,
        version: &str,
        purpose: Purpose,
        call: F,
    ) -> RpcResult<Resp>
    where
        Req: Clone,
        F: Fn(Client, Request<Req>) -> Fut,
        Fut: Future<Output = RpcResult<Resp>>,
    {
        let (md, _, msg) = req.into_parts();
        let md = outgoing_metadata(md);
        let routes = self.table.routes();
        let route = routes
            .model(model)
            .inspect_err(|e| self.gateway_answered(e))?;
        let version = (!version.is_empty()).then_some(version);
        let mut tried = Tried::default();
        let mut refused: Option<Status> = None;
        while tried.count() < MAX_ATTEMPTS {
            let node = match route.pick(version, purpose, &tried) {
                Ok(node) => node,
                Err(_) if refused.is_some() => break,
                Err(e) => {
                    self.gateway_answered(&e);
                    return Err(e.into());
                }
            };
            // A node that left the table after this snapshot was taken: nothing sent.
            let Some(client) = node.grpc.clone().filter(|_| !node.is_retired()) else {
                tried.add(node);
                continue;
            };
            let _inflight = node.start();
            let sent = Instant::now();
            let attempt = Request::from_parts(md.clone(), Default::default(), msg.clone());
            let result = match wait_for(&node, self.timeout, call(client, attempt)).await {
                Waited::Answered(r) => r,
                Waited::Broke(e) => {
                    node_broke(&self.table, &node);
                    self.record(&node, &route.name, e.grpc_code());
                    return Err(e.into());
                }
            };
            match result {
                Ok(resp) => {
                    self.metrics.upstream(&node.name, sent.elapsed());
                    self.record(&node, &route.name, tonic::Code::Ok);
                    return Ok(resp);
                }
                Err(status) if never_sent(&status) => {
                    self.table.node_failed(&node);
                    self.metrics.retry(&node.name, RetryReason::Connect);
                }
                Err(status) if not_run(&status) => {
                    self.metrics.retry(&node.name, RetryReason::NotRun);
                    refused = Some(status);
                }
                Err(status) => {
                    let status = from_node(&self.table, &node, status);
                    self.record(&node, &route.name, status.code());
                    return Err(status);
                }
            }
            tried.add(node);
        }
        Err(refused.unwrap_or_else(|| {
            GatewayError::NoReadyNode {
                model: model.to_string(),
                detail: format!(
                    "{} node(s) tried could not be reached, and the call was sent to none",
                    tried.count()
                ),
            }
            .into()
        }))
    }

    fn record(&self, node: &Node, model: &Arc<String>, code: tonic::Code) {
        self.metrics
            .request(&node.name, model, PROTOCOL_GRPC, code as u16);
    }

    fn gateway_answered(&self, e: &GatewayError) {
        self.metrics
            .request(&NONE, &NONE, PROTOCOL_GRPC, e.grpc_code() as u16);
    }
}

pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

/// The node's answers, outstanding on the node until the stream ends; the stream fails
/// (UNAVAILABLE naming the node) if the node leaves the table mid-stream, instead of
/// hanging on a stopped or partitioned node.
fn until_gone(answers: Streaming<ModelStreamInferResponse>, inflight: InFlight) -> ResponseStream {
    let node = Arc::clone(inflight.node());
    let gone: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move { node.gone().await });
    futures::stream::unfold(Some((answers, gone, inflight)), |state| async move {
        let (mut answers, mut gone, inflight) = state?;
        tokio::select! {
            biased;
            item = answers.next() => {
                let item = item?;
                Some((item, Some((answers, gone, inflight))))
            }
            () = &mut gone => {
                let status = left_the_table(inflight.node()).into();
                Some((Err(status), None))
            }
        }
    })
    .boxed()
}

/// A stream's messages waiting for the node: taken on the first read, so a call that never
/// connected can give them back and go to another node.
type Pending = Arc<Mutex<Option<(ModelInferRequest, Streaming<ModelInferRequest>)>>>;

/// The outgoing request stream over `pending`: the first message, then the client's.
fn request_stream(pending: Pending) -> impl Stream<Item = ModelInferRequest> + Send + 'static {
    futures::stream::once(async move { pending.lock().unwrap_or_else(|e| e.into_inner()).take() })
        .flat_map(|taken| match taken {
            Some((first, rest)) => futures::stream::once(async move { first })
                // A broken client stream ends the call's input; the node finishes its part.
                .chain(
                    rest.take_while(|m| std::future::ready(m.is_ok()))
                        .filter_map(|m| std::future::ready(m.ok())),
                )
                .boxed(),
            None => futures::stream::empty().boxed(),
        })
}

#[tonic::async_trait]
impl GrpcInferenceService for GatewayGrpc {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> RpcResult<ServerLiveResponse> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> RpcResult<ServerReadyResponse> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.table.routes().in_rotation() > 0,
        }))
    }

    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> RpcResult<ModelReadyResponse> {
        let (name, version) = (req.get_ref().name.clone(), req.get_ref().version.clone());
        // Triton answers ready false, not an error, for a model it does not know.
        if self.table.routes().model(&name).is_err() {
            return Ok(Response::new(ModelReadyResponse { ready: false }));
        }
        self.forward(req, &name, &version, Purpose::Read, |mut c, r| async move {
            c.model_ready(r).await
        })
        .await
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> RpcResult<ServerMetadataResponse> {
        Ok(Response::new(ServerMetadataResponse {
            name: "unimodel".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: ["model_configuration", "binary_tensor_data", "statistics"]
                .map(String::from)
                .to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> RpcResult<ModelMetadataResponse> {
        let (name, version) = (req.get_ref().name.clone(), req.get_ref().version.clone());
        self.forward(req, &name, &version, Purpose::Read, |mut c, r| async move {
            c.model_metadata(r).await
        })
        .await
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> RpcResult<ModelInferResponse> {
        let (name, version) = (
            req.get_ref().model_name.clone(),
            req.get_ref().model_version.clone(),
        );
        self.forward(
            req,
            &name,
            &version,
            Purpose::Infer,
            |mut c, r| async move { c.model_infer(r).await },
        )
        .await
    }

    type ModelStreamInferStream = ResponseStream;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> RpcResult<ResponseStream> {
        let (md, _, mut incoming) = req.into_parts();
        let md = outgoing_metadata(md);
        let Some(first) = incoming.message().await? else {
            return Ok(Response::new(futures::stream::empty().boxed()));
        };
        let routes = self.table.routes();
        let route = routes
            .model(&first.model_name)
            .inspect_err(|e| self.gateway_answered(e))?;
        let version = (!first.model_version.is_empty()).then(|| first.model_version.clone());
        let pending: Pending = Arc::new(Mutex::new(Some((first, incoming))));
        let mut tried = Tried::default();
        while tried.count() < MAX_ATTEMPTS {
            let node = route
                .pick(version.as_deref(), Purpose::Infer, &tried)
                .inspect_err(|e| self.gateway_answered(e))?;
            let Some(mut client) = node.grpc.clone().filter(|_| !node.is_retired()) else {
                tried.add(node);
                continue;
            };
            let inflight = node.start();
            let attempt = Request::from_parts(
                md.clone(),
                Default::default(),
                request_stream(Arc::clone(&pending)),
            );
            let opened = wait_for(&node, self.timeout, client.model_stream_infer(attempt)).await;
            let opened = match opened {
                Waited::Answered(r) => r,
                Waited::Broke(e) => {
                    node_broke(&self.table, &node);
                    self.record(&node, &route.name, e.grpc_code());
                    return Err(e.into());
                }
            };
            match opened {
                Ok(resp) => {
                    self.record(&node, &route.name, tonic::Code::Ok);
                    let (md, answers, ext) = resp.into_parts();
                    return Ok(Response::from_parts(md, until_gone(answers, inflight), ext));
                }
                Err(status)
                    if never_sent(&status)
                        && pending.lock().unwrap_or_else(|e| e.into_inner()).is_some() =>
                {
                    self.table.node_failed(&node);
                    self.metrics.retry(&node.name, RetryReason::Connect);
                }
                Err(status) => {
                    let status = from_node(&self.table, &node, status);
                    self.record(&node, &route.name, status.code());
                    return Err(status);
                }
            }
            tried.add(node);
        }
        Err(GatewayError::NoReadyNode {
            model: route.name.to_string(),
            detail: format!("{} node(s) tried could not be reached", tried.count()),
        }
        .into())
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> RpcResult<ModelConfigResponse> {
        let (name, version) = (req.get_ref().name.clone(), req.get_ref().version.clone());
        self.forward(req, &name, &version, Purpose::Read, |mut c, r| async move {
            c.model_config(r).await
        })
        .await
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> RpcResult<ModelStatisticsResponse> {
        let (name, version) = (req.get_ref().name.clone(), req.get_ref().version.clone());
        if name.is_empty() {
            return Err(GatewayError::NotThroughGateway(
                "statistics of every model are kept per node: name a model (one node's statistics), or ask each node".into(),
            )
            .into());
        }
        self.forward(req, &name, &version, Purpose::Read, |mut c, r| async move {
            c.model_statistics(r).await
        })
        .await
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> RpcResult<RepositoryIndexResponse> {
        let ready_only = req.get_ref().ready;
        let routes = self.table.routes();
        let models = routes
            .index
            .iter()
            .filter(|e| !ready_only || e.state == super::table::READY)
            .map(|e| repository_index_response::ModelIndex {
                name: e.name.clone(),
                version: e.version.clone(),
                state: e.state.clone(),
                reason: e.reason.clone(),
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> RpcResult<RepositoryModelLoadResponse> {
        let control = self.control_for("loading a model")?;
        let req = req.into_inner();
        // Triton's clients send "config" (and "file:..." entries) to override the files.
        if let Some(key) = req
            .parameters
            .keys()
            .find(|k| *k == "config" || k.starts_with("file:"))
        {
            return Err(GatewayError::BadRequest(format!(
                "load parameter '{key}' is not supported: edit the model's config.toml and plugin.py in each node's repository, then load again"
            ))
            .into());
        }
        let named = named_nodes(&req.parameters)?;
        let request = ControlRequest {
            op: ControlOp::Load,
            model: Some(req.model_name),
        };
        control.run(&self.table, request, named).await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> RpcResult<RepositoryModelUnloadResponse> {
        let control = self.control_for("unloading a model")?;
        let req = req.into_inner();
        let named = named_nodes(&req.parameters)?;
        let request = ControlRequest {
            op: ControlOp::Unload,
            model: Some(req.model_name),
        };
        control.run(&self.table, request, named).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> RpcResult<SystemSharedMemoryStatusResponse> {
        Err(not_through(SHM))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> RpcResult<SystemSharedMemoryRegisterResponse> {
        Err(not_through(SHM))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> RpcResult<SystemSharedMemoryUnregisterResponse> {
        Err(not_through(SHM))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> RpcResult<CudaSharedMemoryStatusResponse> {
        Err(not_through(SHM))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> RpcResult<CudaSharedMemoryRegisterResponse> {
        Err(not_through(SHM))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> RpcResult<CudaSharedMemoryUnregisterResponse> {
        Err(not_through(SHM))
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> RpcResult<TraceSettingResponse> {
        Err(not_through(
            "trace settings are per node: ask a node directly",
        ))
    }

    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> RpcResult<LogSettingsResponse> {
        Err(not_through(
            "log settings are per node: ask a node directly",
        ))
    }
}

impl GatewayGrpc {
    fn control_for(&self, what: &'static str) -> Result<&super::control::Control, Status> {
        self.control
            .as_ref()
            .ok_or_else(|| GatewayError::NoControl { what }.into())
    }
}

/// The `nodes` parameter of a repository call: a string parameter `"a,b"`.
fn named_nodes(
    parameters: &std::collections::HashMap<String, ModelRepositoryParameter>,
) -> Result<Option<Vec<String>>, Status> {
    let Some(p) = parameters.get(super::control::NODES_PARAMETER) else {
        return Ok(None);
    };
    match &p.parameter_choice {
        Some(model_repository_parameter::ParameterChoice::StringParam(list)) => {
            Ok(Some(super::control::nodes_from_text(list)?))
        }
        _ => Err(GatewayError::BadRequest(format!(
            "parameter \"{}\" must be a string parameter naming nodes, like \"node-a,node-b\"",
            super::control::NODES_PARAMETER
        ))
        .into()),
    }
}

const SHM: &str = "shared memory is local to one machine: register regions with the node that will read them, not through the gateway";

fn not_through(what: &str) -> Status {
    GatewayError::NotThroughGateway(format!("not through the gateway: {what}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_never_sent() {
        // A port nothing listens on: bind, read the port, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let mut client = GrpcInferenceServiceClient::new(channel);
        let status = client.server_live(ServerLiveRequest {}).await.unwrap_err();
        assert!(never_sent(&status), "{status:?}");
        assert!(!never_sent(&Status::unavailable("draining")));
        let mut refused = Status::unavailable("draining");
        refused
            .metadata_mut()
            .insert(NOT_RUN, MetadataValue::from_static("1"));
        assert!(not_run(&refused));
    }

    use super::super::actor::{self, Probe};
    use super::super::table::{Kv, Update};
    use crate::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
    use futures::future::BoxFuture;

    struct NeverUp;

    impl Probe for NeverUp {
        fn live(&self, _node: Arc<Node>) -> BoxFuture<'static, bool> {
            Box::pin(async { false })
        }
    }

    fn put(key: &str, value: String) -> Update {
        Update::Put(Kv {
            key: key.into(),
            value: value.into_bytes(),
            revision: 1,
        })
    }

    /// A gateway (answer timeout `timeout`) over one node "a" whose gRPC port accepts
    /// connections (the kernel's backlog) and never answers: a stopped node. Returns the
    /// gateway's URL, the feed (to delete the node) and the node's handle.
    async fn gateway_over_a_silent_node(
        timeout: Duration,
    ) -> (
        String,
        tokio::sync::mpsc::Sender<Update>,
        Arc<Node>,
        std::net::TcpListener,
    ) {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = silent.local_addr().unwrap();
        let (feed, rx) = tokio::sync::mpsc::channel(16);
        let table = actor::start(rx, Arc::new(NeverUp), Duration::from_secs(60));
        let mut watch = table.watch();
        feed.send(put(
            "nodes/a",
            format!(r#"{{"node":"a","rest_url":"http://{at}","grpc_url":"http://{at}","state":"SERVING"}}"#),
        ))
        .await
        .unwrap();
        feed.send(put(
            "models/m/a",
            r#"{"model":"m","node":"a","versions":["1"],"state":"READY","streams":true}"#.into(),
        ))
        .await
        .unwrap();
        let node = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                watch.changed().await.unwrap();
                let routes = Arc::clone(&watch.borrow_and_update());
                if let Ok(route) = routes.model("m")
                    && let Ok(node) = route.pick(None, Purpose::Infer, &Tried::default())
                {
                    return node;
                }
            }
        })
        .await
        .expect("the node in the routes");
        let service = GatewayGrpc {
            table,
            metrics: Arc::new(GatewayMetrics::new()),
            timeout,
            control: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(tcp, _)| tcp);
            Some((conn, l))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GrpcInferenceServiceServer::new(service))
                .serve_with_incoming(incoming),
        );
        (url, feed, node, silent)
    }

    async fn open_stream(url: String) -> Status {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = GrpcInferenceServiceClient::new(channel);
        let first = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        };
        // The client's side stays open: only the node's silence is in question.
        let requests =
            futures::stream::once(async move { first }).chain(futures::stream::pending());
        tokio::time::timeout(Duration::from_secs(60), client.model_stream_infer(requests))
            .await
            .expect("the open ended instead of hanging")
            .map(|_| "a stream from a silent node")
            .unwrap_err()
    }

    #[tokio::test]
    async fn opening_a_stream_on_a_silent_node_ends_at_the_upstream_timeout() {
        let (url, _feed, node, _silent) =
            gateway_over_a_silent_node(Duration::from_millis(300)).await;
        let status = open_stream(url).await;
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("node 'a'"), "{status:?}");
        assert!(
            node.is_down(),
            "out of rotation after a failure after sending"
        );
    }

    #[tokio::test]
    async fn opening_a_stream_ends_when_its_node_leaves_the_table() {
        let (url, feed, node, _silent) = gateway_over_a_silent_node(Duration::from_secs(600)).await;
        let open = tokio::spawn(open_stream(url));
        // The call is waiting on the node once it counts as outstanding there.
        tokio::time::timeout(Duration::from_secs(30), async {
            while node.outstanding() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the stream reached the node");
        // Its lease expires.
        feed.send(Update::Delete("nodes/a".into())).await.unwrap();
        let status = open.await.unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("left the cluster table"),
            "{status:?}"
        );
    }
}
