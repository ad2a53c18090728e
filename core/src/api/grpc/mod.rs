//! KServe V2 over gRPC (tonic): `inference.GRPCInferenceService` and `grpc.health.v1`.
//!
//! The protocol comes from `proto/` (compiled by `core/build.rs`); the handlers only
//! translate, like the REST routes, and call the same `Backend`.
//!
//! - `service`: the RPCs; `infer_one` is the inference both ModelInfer and ModelStreamInfer use.
//! - `stream`: ModelStreamInfer (concurrent, answered in order; generators once per chunk).
//! - `convert`: infer request/response messages ↔ engine types (through `api::input`).
//! - `metadata`: server/model metadata and statistics messages.
//! - `status`: the one place errors become gRPC statuses.
//! - `call`: trace and deadline from the call's metadata.
//! - `health`: `grpc.health.v1.Health`.
//! - `repository`: RepositoryIndex / RepositoryModelLoad / RepositoryModelUnload.
//! - `shm`: SystemSharedMemory{Status,Register,Unregister} over the REST routes' regions.
//! - `unsupported`: RPCs whose engine side does not exist yet (clear UNIMPLEMENTED).
//! - `auth`: the auth layer around every service (only when auth is on).
//! - `compression`: gzip/deflate/zstd messages, and when answers are compressed.
//! - `budget`: request bytes charged to `--max-buffered-bytes`, the budget REST bodies use.

pub mod auth;
mod budget;
mod call;
mod compression;
mod convert;
mod health;
mod metadata;
mod repository;
mod service;
mod shm;
pub mod status;
mod stream;
mod unsupported;

/// The generated protocol types (messages, server trait, client), a leaf module of the crate.
pub use crate::proto;

use super::Backend;
use super::auth::AuthGate;
use super::body_budget::BodyBudget;
use super::conn::{Acceptor, ConnRegistry, GrpcConns, Guard, TrackLayer};
use crate::regions::Regions;
use crate::tls::TlsIncoming;
use anyhow::Context as _;
use futures::StreamExt as _;
use proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::pb::health_server::HealthServer;

pub use service::InferenceService;

/// Settings of the gRPC front end.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// Largest request message accepted (`--max-body-bytes`, the REST body limit).
    pub max_message_bytes: usize,
    /// Clients' shared-memory regions: the same table the REST routes use.
    pub regions: Arc<Regions>,
    /// API keys / JWT (`--api-key-file`, `--jwt-*`); `None`: auth off, no layer at all.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// TLS handshakes in front of the port (`--tls-cert-file`); `None`: plain HTTP/2.
    pub tls: Option<crate::tls::Handshake>,
    /// `--max-connections` (shared with the other listeners) and the connection timeouts.
    pub guard: Guard,
    /// `--max-buffered-bytes`: the budget REST bodies are charged to, shared.
    pub budget: BodyBudget,
}

/// How long a keepalive ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A running gRPC server.
pub struct GrpcServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Wakes health watchers to re-check readiness.
    readiness: watch::Sender<()>,
}

/// Serves gRPC on `listener` (bound by the caller, with the HTTP port, before any worker
/// starts) until `GrpcServer::stop`.
pub async fn start<B: Backend>(
    listener: tokio::net::TcpListener,
    backend: Arc<B>,
    cfg: GrpcConfig,
) -> anyhow::Result<GrpcServer> {
    let addr = listener
        .local_addr()
        .context("reading the gRPC listening address")?;
    let gate = cfg
        .auth
        .map(|a| auth::AuthLayer::new(AuthGate::new(a, backend.metrics())));
    let metrics = backend.metrics();
    let acceptor = Acceptor::new(listener, cfg.guard.limit, metrics.as_deref(), "grpc");
    let conns = GrpcConns {
        registry: ConnRegistry::default(),
        timeouts: cfg.guard.timeouts,
        metrics: acceptor.metrics().cloned(),
    };
    let service = InferenceService::new(Arc::clone(&backend), cfg.regions);
    // The decoding limit caps compressed messages once inflated, too (`compression.rs`).
    let mut inference = GrpcInferenceServiceServer::new(service)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    for encoding in compression::ENCODINGS {
        inference = inference
            .accept_compressed(encoding)
            .send_compressed(encoding);
    }
    let (readiness, changed) = watch::channel(());
    // Health calls are not charged to the buffered-bytes budget; their own limit is small.
    let health = HealthServer::new(health::HealthService::new(backend, changed))
        .max_decoding_message_size(budget::HEALTH_MESSAGE_LIMIT);
    let (stop, stopped) = oneshot::channel::<()>();
    // A peer that stops answering pings is gone: its connection closes after the keepalive
    // timeout, streams included. Pings go out after half the idle timeout without frames.
    let keepalive = (cfg.guard.timeouts.idle / 2).max(Duration::from_secs(1));
    let server = Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // Outermost: the arrival stamp, taken before tonic arms its deadline timer (`call.rs`).
        .layer(tower::util::MapRequestLayer::new(call::stamp_arrival))
        // A request denied by auth still counts as activity on its connection.
        .layer(TrackLayer::registry(conns.registry.clone()))
        .layer(tower::util::option_layer(gate))
        .layer(budget::BudgetLayer::new(cfg.budget))
        .layer(tower::util::MapRequestLayer::new(
            compression::plain_answers_to_plain_calls,
        ))
        .add_service(inference)
        .add_service(health);
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = match cfg.tls {
        None => {
            // The acceptor sets TCP_NODELAY (requests are small and latency-bound).
            let incoming = futures::stream::unfold(acceptor, move |acceptor| {
                let conns = conns.clone();
                async move {
                    let (tcp, peer, guard) = acceptor.accept().await;
                    Some((
                        Ok::<_, std::io::Error>(conns.wrap(tcp, peer, guard)),
                        acceptor,
                    ))
                }
            });
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, shutdown))
        }
        Some(handshake) => {
            let incoming = TlsIncoming::start(acceptor, handshake)
                .context("starting TLS on the gRPC port")?
                .into_stream()
                .map(move |(stream, peer, guard)| {
                    Ok::<_, std::io::Error>(conns.wrap(stream, peer, guard))
                });
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    Ok(GrpcServer {
        addr,
        stop,
        task,
        readiness,
    })
}

impl GrpcServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Tells health watchers that readiness may have changed.
    pub fn readiness_changed(&self) {
        self.readiness.send_replace(());
    }

    /// Stops accepting calls and waits up to `grace` for the ones in flight (open streams
    /// included) to finish.
    pub async fn stop(self, grace: Duration) {
        self.readiness_changed();
        let _ = self.stop.send(());
        match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(Err(e))) => tracing::warn!("gRPC server: {e}"),
            Ok(Err(e)) => tracing::warn!("gRPC server task: {e}"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => tracing::warn!("gRPC calls still open after {grace:?}; closing them"),
        }
    }
}
