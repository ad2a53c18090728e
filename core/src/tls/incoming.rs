//! Accepting TLS connections on a listening socket without letting one client hold up another.
//!
//! A task accepts TCP connections and runs each handshake in a task of its own, under
//! `Handshake::timeout`; finished handshakes are handed on through a channel, which axum
//! (`axum::serve::Listener`) or tonic (`into_stream`) reads like a listener. A handshake that
//! fails (plain HTTP to the TLS port, an unknown CA, no client certificate) or stalls is logged
//! at DEBUG, counted in `unimodel_tls_handshake_failures_total`, and its connection closed;
//! nothing else notices. At most `MAX_PENDING_HANDSHAKES` run at once: past that, accepting
//! waits (new connections queue in the kernel's backlog), so memory stays bounded.
//!
//! Connections are taken from an `Acceptor`, so `--max-connections` counts them from the TCP
//! accept, handshake included; each finished one carries its place (`ConnGuard`).
//!
//! Dropping the `TlsIncoming` (the servers do on shutdown) stops the accept task and
//! closes the listening socket; handshakes still running end with nobody to hand them to.

use super::ListenerKind;
use super::server::Configs;
use crate::net::{Acceptor, ConnGuard};
use crate::telemetry::metrics::{ConnectionMetrics, HandshakeFailures};
use futures::Stream;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Handshakes in progress per listener before accepting waits.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Finished handshakes waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// A connection that finished its handshake, its peer and its place under the limit.
pub type Accepted = (TlsStream<TcpStream>, SocketAddr, ConnGuard);

/// What a listener needs to run TLS handshakes (from `ServerTls::handshake`).
#[derive(Clone, Debug)]
pub struct Handshake {
    pub(super) kind: ListenerKind,
    /// The current configs; replaced on reload.
    pub(super) configs: watch::Receiver<Arc<Configs>>,
    pub(super) timeout: Duration,
    pub(super) failures: Option<HandshakeFailures>,
}

impl Handshake {
    /// Runs one handshake; `None` (logged and counted) when it fails or times out.
    async fn run(&self, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
        let config = self.configs.borrow().for_kind(self.kind);
        let listener = self.kind.name();
        let accept = TlsAcceptor::from(config).accept(tcp);
        // Pinned here, not moved into the timeout: a timed-out connection is counted before
        // it is closed (when `accept` drops at the end of this function).
        tokio::pin!(accept);
        match tokio::time::timeout(self.timeout, &mut accept).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, listener, "TLS handshake failed: {e}");
                if let Some(f) = &self.failures {
                    f.failed.inc();
                }
                None
            }
            Err(_) => {
                tracing::debug!(%peer, listener, "TLS handshake not finished within {:?}; closing", self.timeout);
                if let Some(f) = &self.failures {
                    f.timed_out.inc();
                }
                None
            }
        }
    }
}

/// A stream of connections that completed their TLS handshake.
pub struct TlsIncoming {
    accepted: mpsc::Receiver<Accepted>,
    local: SocketAddr,
    metrics: Option<ConnectionMetrics>,
}

impl TlsIncoming {
    /// Starts accepting from `acceptor`.
    pub fn start(acceptor: Acceptor, handshake: Handshake) -> io::Result<TlsIncoming> {
        let local = acceptor.local_addr()?;
        let metrics = acceptor.metrics().cloned();
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(accept_loop(acceptor, handshake, tx));
        Ok(TlsIncoming {
            accepted,
            local,
            metrics,
        })
    }

    /// The listener's connection metrics (from its `Acceptor`).
    pub fn metrics(&self) -> Option<&ConnectionMetrics> {
        self.metrics.as_ref()
    }

    /// The next connection that finished its handshake.
    pub async fn accept(&mut self) -> Accepted {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept task only ends once this receiver is gone; never reached.
            None => std::future::pending().await,
        }
    }

    /// The connections as a stream (for tonic's `serve_with_incoming`, once wrapped).
    pub fn into_stream(self) -> impl Stream<Item = Accepted> + Send + 'static {
        futures::stream::unfold(self.accepted, |mut rx| async move {
            let accepted = rx.recv().await?;
            Some((accepted, rx))
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// The client's address on a TLS connection, for handlers and the auth audit
/// (`ConnectInfo<TlsPeer>`; plain connections carry `ConnectInfo<SocketAddr>`).
#[derive(Clone, Copy, Debug)]
pub struct TlsPeer(pub SocketAddr);

/// Accepts until the `TlsIncoming` is dropped, one handshake task per connection.
async fn accept_loop(acceptor: Acceptor, handshake: Handshake, tx: mpsc::Sender<Accepted>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&pending).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        // The acceptor closes connections past --max-connections and sets TCP_NODELAY.
        let (tcp, peer, guard) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = tx.closed() => return,
        };
        let handshake = handshake.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(stream) = handshake.run(tcp, peer).await {
                // Fails only when the server stopped accepting; the connection just closes.
                let _ = tx.send((stream, peer, guard)).await;
            }
        });
    }
}
