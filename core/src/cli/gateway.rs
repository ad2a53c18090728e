//! `unimodel gateway`: reads the auth and TLS files, binds both ports (so a bad file or a
//! taken port stops it before anything runs), starts the etcd watch and serves until
//! SIGTERM/SIGINT, then lets the calls in flight finish.

use super::args::GatewayArgs;
use crate::api::conn::{Acceptor, ConnTimeouts, ConnectionLimit};
use crate::cluster::control::{ControlClient, NatsOptions};
use crate::cluster::gateway::control::Control;
use crate::cluster::gateway::{self, GatewaySettings, Listeners, feed};
use crate::cluster::keys::Prefix;
use crate::telemetry::metrics::Metrics;
use crate::tls::{ServerTls, ServerTlsFiles};
use anyhow::Context as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

pub async fn gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let auth = super::auth::load(&args.auth)?;
    let tls = load_tls(&args)?.map(Arc::new);
    let fd_limit = super::fd_limit::raise_nofile();
    let limit = ConnectionLimit::new(super::fd_limit::max_connections(
        args.conn.max_connections,
        fd_limit,
    ));
    let c = &args.conn;
    let timeouts = ConnTimeouts {
        header_read: Duration::from_millis(c.header_read_timeout_ms),
        body_read: Duration::from_millis(c.body_read_timeout_ms),
        idle: Duration::from_millis(c.idle_connection_timeout_ms),
    };
    let listener_metrics = Arc::new(Metrics::new());
    let http = bind(args.host, args.port, "--port").await?;
    let grpc = bind(args.host, args.grpc_port, "--grpc-port").await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let http_at = http.local_addr().context("reading the listening address")?;
    let grpc_at = grpc
        .local_addr()
        .context("reading the gRPC listening address")?;
    let metrics = match args.metrics_port {
        Some(port) => {
            let listener = bind(args.host, port, "--metrics-port").await?;
            let at = listener
                .local_addr()
                .context("reading the metrics listening address")?;
            tracing::info!(address = %format!("{scheme}://{at}/metrics"), "metrics listening");
            Some(Acceptor::new(
                listener,
                limit.clone(),
                Some(&listener_metrics),
                "metrics",
            ))
        }
        None => None,
    };
    let listeners = Listeners {
        http: Acceptor::new(http, limit.clone(), Some(&listener_metrics), "http"),
        grpc: Acceptor::new(grpc, limit, Some(&listener_metrics), "grpc"),
        metrics,
        tls: tls.clone(),
        timeouts,
    };
    if let Some(tls) = tls {
        tokio::spawn(super::server::reload_tls_on_sighup(tls));
    }
    let (feed_tx, feed_rx) = feed::channel();
    feed::watch_etcd(&args.etcd, &args.etcd_prefix, feed_tx)?;
    tracing::info!(etcd = %args.etcd, prefix = %args.etcd_prefix, "gateway watching the cluster table in etcd");
    tracing::info!(address = %format!("{grpc_at}"), tls = scheme == "https", "grpc listening");
    tracing::info!(address = %format!("{scheme}://{http_at}"), "gateway listening");
    let control = control(&args).await?;
    if control.is_some() && auth.is_none() {
        // The control routes need the admin role only when auth is on.
        tracing::warn!(
            "--nats without auth: anyone who reaches this gateway can load, unload and drain models on every node; give --api-key-file or --jwt-* to keep control to the admin role"
        );
    }
    let settings = GatewaySettings {
        upstream_timeout: Duration::from_millis(args.upstream_timeout_ms),
        stale_grace: Duration::from_millis(args.stale_grace_ms),
        max_body_bytes: args.max_body_bytes,
        auth,
        listener_metrics,
        http_threads: args.http_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            usize::from,
        ),
        control,
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    gateway::run(feed_rx, listeners, settings, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// With `--nats`: the connection that sends control orders, made in the background (a
/// NATS that is down at start or later is retried; only a bad URL or credentials file
/// stops the gateway here).
async fn control(args: &GatewayArgs) -> anyhow::Result<Option<Control>> {
    let Some(url) = args.nats.nats.clone() else {
        if args.nats.nats_creds.is_some() {
            anyhow::bail!("--nats-creds needs --nats nats://HOST:4222 (where NATS is)");
        }
        return Ok(None);
    };
    let nats = NatsOptions {
        url,
        creds: args.nats.nats_creds.clone(),
    };
    let prefix = Prefix::parse(&args.etcd_prefix)?;
    let client =
        ControlClient::connect_background(&nats, "unimodel gateway", "the gateway").await?;
    tracing::info!(nats = %nats.shown(), prefix = %prefix.dotted(), "gateway sends control orders over NATS");
    Ok(Some(Control {
        client,
        prefix,
        timeout: Duration::from_secs(args.control_timeout_s),
    }))
}

async fn bind(host: IpAddr, port: u16, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port)).await.with_context(|| {
        format!("cannot listen on {host}:{port} (is another server using the port? pick one with {flag})")
    })
}

/// The `--tls-*` files, read and checked; `None` without `--tls-cert-file`.
fn load_tls(args: &GatewayArgs) -> anyhow::Result<Option<ServerTls>> {
    let t = &args.tls;
    let (Some(cert), Some(key)) = (&t.tls_cert_file, &t.tls_key_file) else {
        return Ok(None);
    };
    let tls = ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: t.tls_client_ca_file.clone(),
        handshake_timeout: Duration::from_millis(t.tls_handshake_timeout_ms),
    }
    .load()?;
    tracing::info!(cert = %cert.display(), "TLS on for the gateway's HTTP and gRPC ports");
    Ok(Some(tls))
}
