//! The gateway's listeners, from the serve stack's pieces: connections accepted under
//! `--max-connections` with the header/body/idle timeouts (`api::conn`, `net`), TLS
//! (`tls`), auth (`api::auth`, the gRPC auth layer), and a graceful stop: on the shutdown
//! signal both ports stop accepting, and calls in flight (streams included) finish.

use super::actor::{self, Probe};
use super::forward::Upstream;
use super::grpc::GatewayGrpc;
use super::metrics::GatewayMetrics;
use super::node::Node;
use super::rest::{Gateway, router};
use super::table::Update;
use crate::api::conn::{
    Acceptor, ConnRegistry, ConnTimeouts, GrpcConns, HttpIncoming, Placement, Shards, TrackLayer,
    serve_http, serve_http_on,
};
use crate::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::telemetry::metrics::Metrics;
use crate::tls::{ListenerKind, ServerTls, TlsIncoming};
use anyhow::Context as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Server;

/// How long calls in flight get to finish after the shutdown signal.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long a keepalive ping may go unanswered on a client's gRPC connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound sockets and what guards their connections.
pub struct Listeners {
    pub http: Acceptor,
    pub grpc: Acceptor,
    /// `--metrics-port`: `/metrics` alone, for a scraper that must not reach the API port.
    pub metrics: Option<Acceptor>,
    pub tls: Option<Arc<ServerTls>>,
    pub timeouts: ConnTimeouts,
}

/// What the flags say beyond the listeners.
pub struct GatewaySettings {
    /// `--upstream-timeout-ms`: the longest wait for a node's answer head.
    pub upstream_timeout: Duration,
    /// `--stale-grace-ms`: how long nodes an empty (data-lost) etcd no longer lists stay.
    pub stale_grace: Duration,
    /// `--max-body-bytes`: gRPC messages, and `/v1` bodies (read whole to find `model`).
    pub max_body_bytes: usize,
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// The listeners' registry (connections, TLS handshakes, auth denials).
    pub listener_metrics: Arc<Metrics>,
    /// `--http-threads`: REST connections are served on this many shard threads (each with
    /// its own node connection pool); 0 serves them on the main runtime. Not with TLS.
    pub http_threads: usize,
    /// `--nats`: control orders to nodes (repository load/unload, cluster drain/resume).
    pub control: Option<super::control::Control>,
}

/// The probe the actor runs on nodes out of rotation: REST liveness through the pool.
struct LiveProbe(Upstream);

impl Probe for LiveProbe {
    fn live(&self, node: Arc<Node>) -> BoxFuture<'static, bool> {
        let upstream = self.0.clone();
        Box::pin(async move { upstream.live(&node).await })
    }
}

/// Starts the table actor over `feed`, serves REST and gRPC until `shutdown`, then lets the
/// calls in flight finish.
pub async fn run(
    feed: tokio::sync::mpsc::Receiver<Update>,
    listeners: Listeners,
    settings: GatewaySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(GatewayMetrics::new());
    // The probe needs the upstream client, which needs the table handle: the actor starts
    // with a probe that reaches the client through a cell filled right after.
    let probe_cell: Arc<std::sync::OnceLock<Upstream>> = Arc::new(std::sync::OnceLock::new());
    let table = actor::start(
        feed,
        Arc::new(DeferredProbe(Arc::clone(&probe_cell))),
        settings.stale_grace,
    );
    metrics.watch_table(table.clone());
    let upstream = Upstream::new(
        table.clone(),
        Arc::clone(&metrics),
        settings.upstream_timeout,
    );
    let _ = probe_cell.set(upstream.clone());
    let handshake = |kind: ListenerKind| {
        listeners.tls.as_ref().map(|tls| {
            tls.handshake(
                kind,
                Some(
                    settings
                        .listener_metrics
                        .tls_handshake_failures(kind.name()),
                ),
            )
        })
    };
    let grpc_handshake = handshake(ListenerKind::Grpc);
    let http_handshake = handshake(ListenerKind::Http);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grpc = serve_grpc(
        listeners.grpc,
        grpc_handshake,
        listeners.timeouts,
        GatewayGrpc {
            table: table.clone(),
            metrics: Arc::clone(&metrics),
            timeout: settings.upstream_timeout,
            control: settings.control.clone(),
        },
        &settings,
        stopped(stop_rx.clone()),
    )?;
    let gateway = |upstream: Upstream| {
        Arc::new(Gateway {
            upstream,
            listener_metrics: Arc::clone(&settings.listener_metrics),
            metrics: Arc::clone(&metrics),
            max_body_bytes: settings.max_body_bytes,
            control: settings.control.clone(),
        })
    };
    let gw = gateway(upstream);
    if let Some(acceptor) = listeners.metrics {
        let app = super::rest::metrics_router(Arc::clone(&gw), settings.auth.clone());
        let incoming = HttpIncoming::new(acceptor, handshake(ListenerKind::Metrics))
            .context("starting TLS on the metrics port")?;
        // Not stopped with the API ports: a scraper sees the gateway to its end.
        tokio::spawn(serve_http(
            incoming,
            app,
            listeners.timeouts,
            std::future::pending(),
        ));
    }
    // Shards only for plain connections: a TLS stream stays on the runtime of its handshake.
    let threads = if http_handshake.is_some() {
        if settings.http_threads > 0 {
            tracing::info!(
                "REST connections are served on the shared runtime: with TLS, --http-threads does not apply"
            );
        }
        0
    } else {
        settings.http_threads
    };
    let shards = tokio::task::spawn_blocking(move || Shards::start(threads, "gateway-http"))
        .await
        .context("starting the HTTP threads")?
        .context("starting the HTTP threads")?;
    let placement = if shards.handles().is_empty() {
        Placement::Here(router(gw, settings.auth.clone()))
    } else {
        Placement::Shards {
            // Each shard its own client: a pooled node connection is polled by the thread
            // that uses it.
            shards: shards
                .handles()
                .iter()
                .map(|h| {
                    let own = gateway(Upstream::new(
                        table.clone(),
                        Arc::clone(&metrics),
                        settings.upstream_timeout,
                    ));
                    (h.clone(), router(own, settings.auth.clone()))
                })
                .collect(),
            here: router(gw, settings.auth.clone()),
        }
    };
    let incoming = HttpIncoming::new(listeners.http, http_handshake).context("starting TLS")?;
    let http = tokio::spawn(serve_http_on(
        incoming,
        placement,
        listeners.timeouts,
        stopped(stop_rx),
    ));
    shutdown.await;
    tracing::info!("gateway stopping: no new connections; calls in flight finish");
    let _ = stop_tx.send(true);
    let finished = async {
        let _ = http.await;
        let _ = grpc.await;
    };
    if tokio::time::timeout(STOP_GRACE, finished).await.is_err() {
        tracing::warn!("calls still open after {STOP_GRACE:?}; closing them");
    }
    // Off the runtime's workers: joining the threads blocks.
    let _ = tokio::task::spawn_blocking(move || drop(shards)).await;
    Ok(())
}

/// Completes once the stop flag is raised.
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

struct DeferredProbe(Arc<std::sync::OnceLock<Upstream>>);

impl Probe for DeferredProbe {
    fn live(&self, node: Arc<Node>) -> BoxFuture<'static, bool> {
        match self.0.get() {
            Some(upstream) => LiveProbe(upstream.clone()).live(node),
            None => Box::pin(async { false }),
        }
    }
}

/// Serves the gRPC front end on `acceptor` (behind TLS and auth when configured).
fn serve_grpc(
    acceptor: Acceptor,
    tls: Option<crate::tls::Handshake>,
    timeouts: ConnTimeouts,
    service: GatewayGrpc,
    settings: &GatewaySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let service_table = service.table.clone();
    let conns = GrpcConns {
        registry: ConnRegistry::default(),
        timeouts,
        metrics: acceptor.metrics().cloned(),
    };
    let gate = settings.auth.clone().map(|a| {
        crate::api::grpc::auth::AuthLayer::new(crate::api::auth::AuthGate::new(
            a,
            Some(Arc::clone(&settings.listener_metrics)),
        ))
    });
    let inference = GrpcInferenceServiceServer::new(service)
        .max_decoding_message_size(settings.max_body_bytes)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Deflate)
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd);
    let keepalive = (timeouts.idle / 2).max(Duration::from_secs(1));
    let server = Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(TrackLayer::registry(conns.registry.clone()))
        .layer(tower::util::option_layer(gate))
        .add_service(inference)
        .add_service(tonic_health::pb::health_server::HealthServer::new(
            super::health::GatewayHealth(service_table),
        ));
    let task = match tls {
        None => {
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
    Ok(task)
}
