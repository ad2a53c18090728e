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
//! Dropping the `TlsIncoming` (axum and tonic do on shutdown) stops the accept task and
//! closes the listening socket; handshakes still running end with nobody to hand them to.

use super::ListenerKind;
use super::server::Configs;
use crate::telemetry::metrics::HandshakeFailures;
use futures::Stream;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Handshakes in progress per listener before accepting waits.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Finished handshakes waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Pause after an accept error such as EMFILE, so a full fd table is not a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

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
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsIncoming {
    /// Starts accepting on `listener`.
    pub fn start(listener: TcpListener, handshake: Handshake) -> io::Result<TlsIncoming> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(accept_loop(listener, handshake, tx));
        Ok(TlsIncoming { accepted, local })
    }

    /// The connections as tonic's `serve_with_incoming` takes them.
    pub fn into_stream(
        self,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
        futures::stream::unfold(self.accepted, |mut rx| async move {
            let (stream, _) = rx.recv().await?;
            Some((Ok(stream), rx))
        })
    }
}

/// The client's address on a TLS connection, for handlers and the auth audit
/// (`ConnectInfo<TlsPeer>`; plain connections carry `ConnectInfo<SocketAddr>`).
#[derive(Clone, Copy, Debug)]
pub struct TlsPeer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsIncoming>>
    for TlsPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsIncoming>) -> Self {
        TlsPeer(*stream.remote_addr())
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept task only ends once this receiver is gone; never reached.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Accepts until the `TlsIncoming` is dropped, one handshake task per connection.
async fn accept_loop(
    listener: TcpListener,
    handshake: Handshake,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
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
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        // Requests and responses are small and latency-bound: never let Nagle hold them back.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let handshake = handshake.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(stream) = handshake.run(tcp, peer).await {
                // Fails only when the server stopped accepting; the connection just closes.
                let _ = tx.send((stream, peer)).await;
            }
        });
    }
}

/// Errors of `accept` concern one connection (reset before it was taken) or a temporary
/// shortage (file descriptors); neither stops the listener.
async fn accept_error(e: io::Error) {
    tracing::debug!("accept failed: {e}");
    if !matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) {
        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
    }
}
