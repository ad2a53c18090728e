//! What `run` and `serve` share around the engine: listening, the metrics port, serving HTTP
//! and gRPC until a signal, and the orderly shutdown.
//!
//! On the first SIGTERM/SIGINT: readiness false, new requests 503, queued and running work
//! finishes (up to `--drain-timeout-ms`), HTTP and gRPC stop, workers stop, exit 0. A second signal
//! exits at once with status 130 (workers die with us through PDEATHSIG): the drain it cut
//! short did not finish, which a supervisor should be able to tell from a clean stop.
//!
//! With `--tls-cert-file`, every listener speaks TLS (`tls/`); the files are checked in
//! `listen`, before any worker starts, and read again on SIGHUP.
//!
//! `listen` also raises the soft RLIMIT_NOFILE to the hard limit and sets the connection cap
//! every listener shares (`fd_limit.rs`, `api/conn/`).

use super::args::ServerArgs;
use super::metrics_port;
use super::serving::ServeSettings;
use crate::api::Backend;
use crate::api::body_budget::BodyBudget;
use crate::api::conn::{Acceptor, ConnTimeouts, ConnectionLimit, Guard, HttpIncoming, serve_http};
use crate::api::grpc::{self, GrpcConfig, GrpcServer};
use crate::api::http::{HttpConfig, router};
use crate::auth::Auth;
use crate::engine::Engine;
use crate::telemetry::metrics::Metrics;
use crate::tls::{ListenerKind, ServerTls, ServerTlsFiles};
use anyhow::Context as _;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;

/// After the drain, how long idle keep-alive connections get to close.
const HTTP_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long workers get to exit cleanly before the process ends anyway.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

/// A bound listener, its URL, the TLS settings and the connection guard of every listener.
pub struct Listening {
    listener: tokio::net::TcpListener,
    /// The gRPC port, bound with the HTTP one (taken when gRPC starts).
    grpc_listener: Option<tokio::net::TcpListener>,
    pub base: String,
    /// Where HTTP and gRPC listen (the ports actually bound, for `--port 0`).
    pub http_addr: std::net::SocketAddr,
    pub grpc_addr: std::net::SocketAddr,
    tls: Option<Arc<ServerTls>>,
    guard: Guard,
    /// The soft RLIMIT_NOFILE in force and the connection cap taken from it, which the
    /// region cap must fit beside.
    fd_limit: u64,
    max_connections: usize,
}

/// Per-model settings that come from the server flags.
pub fn settings(server: &ServerArgs) -> ServeSettings {
    ServeSettings {
        queue_capacity: usize::try_from(server.queue_capacity).unwrap_or(usize::MAX),
        request_timeout: Duration::from_millis(server.request_timeout_ms),
        llm: crate::engine::LlmLimits {
            max_num_batched_tokens: server.max_num_batched_tokens as usize,
            max_num_seqs: server.max_num_seqs as usize,
        },
    }
}

/// Reads the TLS files and binds the HTTP port (before workers start, so a bad file stops
/// the server before any worker starts, and liveness answers while they load).
pub async fn listen(server: &ServerArgs) -> anyhow::Result<Listening> {
    let tls = load_tls(server)?.map(Arc::new);
    let fd_limit = super::fd_limit::raise_nofile();
    let c = &server.conn;
    let max_connections = super::fd_limit::max_connections(c.max_connections, fd_limit);
    let guard = Guard {
        limit: ConnectionLimit::new(max_connections),
        timeouts: ConnTimeouts {
            header_read: Duration::from_millis(c.header_read_timeout_ms),
            body_read: Duration::from_millis(c.body_read_timeout_ms),
            idle: Duration::from_millis(c.idle_connection_timeout_ms),
        },
    };
    let listener = tokio::net::TcpListener::bind((server.host, server.port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}:{} (is another server using the port? pick one with --port)",
                server.host, server.port
            )
        })?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    let (host, port) = (server.host, server.grpc_port);
    let grpc_listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| {
            format!(
                "cannot listen for gRPC on {host}:{port} (is another server using the port? \
                 pick one with --grpc-port)"
            )
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .context("reading the gRPC listening address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    Ok(Listening {
        listener,
        grpc_listener: Some(grpc_listener),
        base: format!("{scheme}://{local}"),
        http_addr: local,
        grpc_addr,
        tls,
        guard,
        fd_limit,
        max_connections,
    })
}

/// The `--tls-*` files, read and checked; `None` without `--tls-cert-file`.
fn load_tls(server: &ServerArgs) -> anyhow::Result<Option<ServerTls>> {
    let args = &server.tls;
    let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let tls = ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca_file.clone(),
        handshake_timeout: Duration::from_millis(args.tls_handshake_timeout_ms),
    }
    .load()?;
    tracing::info!(
        cert = %cert.display(),
        client_certificates = if tls.requires_client_cert() { "required" } else { "not asked for" },
        "TLS on for HTTP, gRPC and metrics"
    );
    Ok(Some(tls))
}

impl Listening {
    /// Whether the listeners speak TLS.
    pub fn tls_on(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS handshake settings of one listener, its failures counted in `metrics`.
    fn handshake(
        &self,
        kind: ListenerKind,
        metrics: Option<&Metrics>,
    ) -> Option<crate::tls::Handshake> {
        let tls = self.tls.as_ref()?;
        Some(tls.handshake(kind, metrics.map(|m| m.tls_handshake_failures(kind.name()))))
    }
}

/// The metrics registry, also served on `--metrics-port` when given (over TLS when the
/// other listeners are; behind auth with `--auth-metrics`).
pub async fn metrics(
    server: &ServerArgs,
    listening: &Listening,
    auth: Option<&Arc<Auth>>,
) -> anyhow::Result<Arc<Metrics>> {
    let metrics = Arc::new(Metrics::new());
    if let Some(port) = server.metrics_port {
        let tls = listening.handshake(ListenerKind::Metrics, Some(metrics.as_ref()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let auth = auth.filter(|a| !a.open_metrics).cloned();
        let at = metrics_port::start(
            server.host,
            port,
            metrics.clone(),
            auth,
            tls,
            listening.guard.clone(),
        )
        .await?;
        tracing::info!(address = %format!("{scheme}://{at}/metrics"), "metrics listening");
    }
    Ok(metrics)
}

/// Serves `backend` over HTTP and gRPC, runs `startup` (load reports) beside it, and shuts
/// down on the first signal.
pub async fn serve_until_signal<B: Backend>(
    backend: Arc<B>,
    engine: Engine,
    mut listening: Listening,
    server: &ServerArgs,
    auth: Option<Arc<Auth>>,
    startup: impl Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    // What plugins start outside their worker's process group is re-parented to us, to be
    // killed with its worker (`worker/orphans.rs`).
    crate::worker::orphans::adopt();
    // One table of client shared-memory regions for both protocols, as many as the
    // descriptor limit leaves room for.
    let max_regions = super::fd_limit::max_shm_regions(
        server.max_shm_regions,
        listening.max_connections,
        listening.fd_limit,
        server.allow_client_shm,
    );
    let regions = Arc::new(
        crate::regions::Regions::new(server.allow_client_shm)
            .with_max_regions(max_regions)
            .with_max_read_bytes(engine.limits().max_tensor_bytes),
    );
    let metrics = backend.metrics();
    if let Some(m) = &metrics {
        let gauge = m.shm_regions();
        let counted = Arc::clone(&regions);
        m.add_sampler(move || {
            gauge.set(i64::try_from(counted.len()).unwrap_or(i64::MAX));
        });
    }
    // One budget for the request bytes both protocols hold (`--max-buffered-bytes`).
    let budget = BodyBudget::new(
        usize::try_from(server.max_buffered_bytes).unwrap_or(usize::MAX),
        metrics.as_ref().map(|m| m.buffered_request_bytes()),
    );
    if let Some(tls) = &listening.tls {
        tokio::spawn(reload_tls_on_sighup(Arc::clone(tls)));
    }
    let grpc_listener = listening
        .grpc_listener
        .take()
        .context("the gRPC port was already taken (a bug)")?;
    let grpc = grpc::start(
        grpc_listener,
        Arc::clone(&backend),
        GrpcConfig {
            max_message_bytes: server.max_body_bytes,
            regions: Arc::clone(&regions),
            auth: auth.clone(),
            tls: listening.handshake(ListenerKind::Grpc, metrics.as_deref()),
            guard: listening.guard.clone(),
            budget: budget.clone(),
        },
    )
    .await?;
    tracing::info!(address = %grpc.addr(), tls = listening.tls.is_some(), "grpc listening");
    let app = router(
        backend,
        HttpConfig {
            max_body_bytes: server.max_body_bytes,
            budget,
            regions,
            auth,
        },
    );
    let (stop_http_tx, stop_http_rx) = oneshot::channel::<()>();
    let handshake = listening.handshake(ListenerKind::Http, metrics.as_deref());
    let Guard { limit, timeouts } = listening.guard;
    let acceptor = Acceptor::new(listening.listener, limit, metrics.as_deref(), "http");
    let incoming = HttpIncoming::new(acceptor, handshake).context("starting TLS")?;
    let http = tokio::spawn(serve_http(incoming, app, timeouts, async move {
        let _ = stop_http_rx.await;
    }));
    tracing::info!(address = %listening.base, "listening");

    let mut signals = Signals {
        term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
    };
    let until_signal = async {
        tokio::select! {
            _ = startup => {
                grpc.readiness_changed();
                signals.next().await
            }
            _ = signals.next() => {}
        }
    };
    tokio::select! {
        _ = until_signal => {}
        _ = tell_drains(&engine, &grpc) => {}
    }
    let stop = Stop {
        engine: &engine,
        drain: Duration::from_millis(server.drain_timeout_ms),
        stop_http: stop_http_tx,
        http,
        grpc,
    };
    stop.run(&mut signals).await
}

/// SIGHUP: read the TLS files again. New handshakes use the new certificate; open
/// connections keep theirs; a file that fails the checks is logged and the old one kept.
pub(super) async fn reload_tls_on_sighup(tls: Arc<ServerTls>) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot install the SIGHUP handler (TLS reload is off): {e}");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let tls = Arc::clone(&tls);
        // Reading files blocks; keep it off the runtime's threads.
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(())) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
            Ok(Err(e)) => {
                tracing::warn!("SIGHUP: TLS files not reloaded, keeping the old ones: {e}")
            }
            Err(e) => tracing::warn!("SIGHUP: TLS reload task: {e}"),
        }
    }
}

/// An operator's node drain or resume (`unimodel ctl`) flips readiness without a signal to
/// the process: tell gRPC health watchers at each change. Never returns.
async fn tell_drains(engine: &Engine, grpc: &grpc::GrpcServer) {
    let mut drained = engine.drained();
    while drained.changed().await.is_ok() {
        grpc.readiness_changed();
    }
    std::future::pending::<()>().await
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// What the shutdown needs to stop, in order.
struct Stop<'a> {
    engine: &'a Engine,
    drain: Duration,
    stop_http: oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: GrpcServer,
}

impl Stop<'_> {
    async fn run(self, signals: &mut Signals) -> anyhow::Result<ExitCode> {
        let Stop {
            engine,
            drain,
            stop_http,
            http,
            grpc,
        } = self;
        tracing::info!(
            "shutting down: finishing queued and running requests (up to {drain:?}); a second signal exits at once"
        );
        // Readiness is false from here on: tell gRPC health watchers now, not after the drain.
        engine.stop_accepting();
        grpc.readiness_changed();
        let graceful = async {
            if !engine.drain(drain).await {
                tracing::warn!("drain timed out after {drain:?}: answering what is left with 503");
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
        let code = tokio::select! {
            _ = graceful => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            _ = signals.next() => {
                tracing::warn!("second signal: exiting now");
                ExitCode::from(130)
            }
        };
        // Whatever a plugin left behind (even with its environment cleared) goes with us.
        crate::worker::orphans::kill_left_behind(None);
        Ok(code)
    }
}
