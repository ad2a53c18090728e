//! The HTTP server loop (the REST port and `--metrics-port`), on hyper-util directly rather
//! than `axum::serve`, which has no place for the connection limit or the timeouts: accept
//! under `--max-connections` (plain or after the TLS handshake), wrap each connection in a
//! `Conn` with its watchdog, serve HTTP/1.1 or HTTP/2 on it, and on shutdown stop accepting,
//! ask every connection to finish gracefully and wait until they have.

use super::ConnTimeouts;
use super::body::{BodyDeadline, limit_body_time};
use super::shards::Placement;
use super::watch::{TrackLayer, guard_stream};
use crate::net::{Acceptor, ConnGuard};
use crate::telemetry::metrics::ConnectionMetrics;
use crate::tls::{TlsIncoming, TlsPeer};
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;

/// Where the HTTP server's connections come from.
pub enum HttpIncoming {
    Plain(Acceptor),
    /// Connections that finished their TLS handshake (ALPN picks HTTP/1.1 or HTTP/2).
    Tls(TlsIncoming),
}

impl HttpIncoming {
    /// `acceptor` as is, or with TLS handshakes in front of it.
    pub fn new(
        acceptor: Acceptor,
        tls: Option<crate::tls::Handshake>,
    ) -> std::io::Result<HttpIncoming> {
        Ok(match tls {
            None => HttpIncoming::Plain(acceptor),
            Some(handshake) => HttpIncoming::Tls(TlsIncoming::start(acceptor, handshake)?),
        })
    }
}

/// What every connection task shares.
#[derive(Clone)]
struct Shared {
    router: Router,
    timeouts: ConnTimeouts,
    metrics: Option<ConnectionMetrics>,
    stop: watch::Receiver<bool>,
    /// Held by every connection task; the loop's receiver ends once all have finished.
    _running: mpsc::Sender<()>,
}

/// Serves `router` on `incoming` until `shutdown` completes, then lets open requests finish
/// (each connection closes gracefully) before returning.
pub async fn serve_http(
    incoming: HttpIncoming,
    router: Router,
    timeouts: ConnTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_http_on(incoming, Placement::Here(router), timeouts, shutdown).await
}

/// `serve_http`, with the connections served where `placement` says (`shards`).
pub async fn serve_http_on(
    incoming: HttpIncoming,
    placement: Placement,
    timeouts: ConnTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = match &incoming {
        HttpIncoming::Plain(a) => a.metrics().cloned(),
        HttpIncoming::Tls(t) => t.metrics().cloned(),
    };
    let deadline = BodyDeadline {
        timeout: timeouts.body_read,
        metrics: metrics.clone(),
    };
    let guarded = |router: Router| {
        router.layer(axum::middleware::from_fn_with_state(
            deadline.clone(),
            limit_body_time,
        ))
    };
    let (stop_tx, stop) = watch::channel(false);
    let (running, mut all_done) = mpsc::channel::<()>(1);
    let shared = |router: Router| Shared {
        router: guarded(router),
        timeouts,
        metrics: metrics.clone(),
        stop: stop.clone(),
        _running: running.clone(),
    };
    let (here, shards) = match placement {
        Placement::Here(router) => (shared(router), Vec::new()),
        Placement::Shards { shards, here } => (
            shared(here),
            shards
                .into_iter()
                .map(|(handle, router)| (handle, shared(router)))
                .collect(),
        ),
    };
    drop(running);
    let mut turn = 0usize;
    tokio::pin!(shutdown);
    let mut incoming = incoming;
    loop {
        match &mut incoming {
            HttpIncoming::Plain(acceptor) => tokio::select! {
                _ = &mut shutdown => break,
                (tcp, peer, guard) = acceptor.accept() => {
                    if shards.is_empty() {
                        tokio::spawn(serve_one(tcp, ConnectInfo(peer), guard, here.clone()));
                    } else {
                        let (handle, shared) = &shards[turn % shards.len()];
                        turn = turn.wrapping_add(1);
                        hand_over(tcp, peer, guard, handle, shared.clone());
                    }
                }
            },
            HttpIncoming::Tls(tls) => tokio::select! {
                _ = &mut shutdown => break,
                (stream, peer, guard) = tls.accept() => {
                    tokio::spawn(serve_one(stream, ConnectInfo(TlsPeer(peer)), guard, here.clone()));
                }
            },
        }
    }
    // Stop listening first (the port refuses from here), then drain the connections.
    drop(incoming);
    let _ = stop_tx.send(true);
    drop(here);
    drop(shards);
    let _ = all_done.recv().await;
    Ok(())
}

/// Moves an accepted connection to a shard's runtime, whose reactor then watches it: a
/// socket stays bound to the runtime it was registered with.
fn hand_over(tcp: TcpStream, peer: SocketAddr, guard: ConnGuard, shard: &Handle, shared: Shared) {
    let std = match tcp.into_std() {
        Ok(std) => std,
        Err(e) => {
            tracing::debug!("cannot move a connection to a shard: {e}");
            return;
        }
    };
    shard.spawn(async move {
        // Non-blocking already (`into_std` keeps the mode tokio set).
        match TcpStream::from_std(std) {
            Ok(tcp) => serve_one(tcp, ConnectInfo(peer), guard, shared).await,
            Err(e) => tracing::debug!("cannot serve a connection on its shard: {e}"),
        }
    });
}

/// Serves one connection until it ends, is closed by its watchdog, or the server stops.
async fn serve_one<IO, I>(io: IO, info: I, guard: ConnGuard, shared: Shared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    let Shared {
        router,
        timeouts,
        metrics,
        mut stop,
        _running,
    } = shared;
    let (conn, state) = guard_stream(io, guard, timeouts, metrics, None);
    // Connect info gives handlers (the auth audit log) the client's address.
    let service = tower::Layer::layer(&TrackLayer::fixed(state), router).map_request(
        move |req: http::Request<hyper::body::Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(info.clone());
            req
        },
    );
    let mut builder = Builder::new(TokioExecutor::new());
    // CONNECT protocol for HTTP/2 websockets, as axum::serve enables it.
    builder.http2().enable_connect_protocol();
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(conn), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!("connection ended: {e}");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
