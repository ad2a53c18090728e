//! `--max-connections`: one count of open connections shared by every listener, and the
//! accept loop that enforces it.
//!
//! A connection past the cap is accepted and closed at once (the client reads end of stream)
//! and counted in `unimodel_connections_refused_total`; the kernel's backlog is drained
//! rather than left to fill, and connections already open are not touched. Accept errors
//! (EMFILE, ENFILE, a connection reset before it was taken) pause the loop briefly and never
//! stop it.

use crate::telemetry::metrics::{ConnectionMetrics, Metrics};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Pause after an accept error such as EMFILE, so a full descriptor table is not a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The cap on open connections, shared by all listeners (cheap to clone).
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    inner: Arc<LimitInner>,
}

#[derive(Debug)]
struct LimitInner {
    max: usize,
    open: AtomicUsize,
    /// Connections refused so far (for the rate-limited log line).
    refused: AtomicU64,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            inner: Arc::new(LimitInner {
                max,
                open: AtomicUsize::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    pub fn max(&self) -> usize {
        self.inner.max
    }

    /// Connections open now, on every listener.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// A place under the cap, or `None` when every place is taken.
    fn try_take(&self, metrics: Option<&ConnectionMetrics>) -> Option<ConnGuard> {
        let max = self.inner.max;
        let taken = self
            .inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return None;
        }
        let open = metrics.map(|m| m.open.clone());
        if let Some(g) = &open {
            g.inc();
        }
        Some(ConnGuard {
            limit: self.clone(),
            open,
        })
    }

    /// Counts a refusal; logs the 1st, 10th, 100th, ... so a flood cannot flood the log.
    fn refused(&self, peer: SocketAddr, listener: &str, metrics: Option<&ConnectionMetrics>) {
        if let Some(m) = metrics {
            m.refused.inc();
        }
        let n = self.inner.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if is_power_of_ten(n) {
            tracing::warn!(
                %peer,
                listener,
                refused = n,
                "connection closed at once: {} connections are open, the --max-connections limit",
                self.inner.max
            );
        }
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// One open connection's place under the cap; dropping it (the connection closing) frees it.
#[derive(Debug)]
pub struct ConnGuard {
    limit: ConnectionLimit,
    open: Option<prometheus_client::metrics::gauge::Gauge>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.limit.inner.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

/// A listening socket whose connections count against the limit.
pub struct Acceptor {
    listener: TcpListener,
    limit: ConnectionLimit,
    metrics: Option<ConnectionMetrics>,
    name: &'static str,
}

impl Acceptor {
    /// `name` labels the metrics and log lines: `http`, `grpc` or `metrics`.
    pub fn new(
        listener: TcpListener,
        limit: ConnectionLimit,
        metrics: Option<&Metrics>,
        name: &'static str,
    ) -> Acceptor {
        Acceptor {
            listener,
            limit,
            metrics: metrics.map(|m| m.connections(name)),
            name,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// This listener's connection metrics (none in tests without a registry).
    pub fn metrics(&self) -> Option<&ConnectionMetrics> {
        self.metrics.as_ref()
    }

    /// The next connection with a place under the cap (TCP_NODELAY set: requests and
    /// responses are small and latency-bound). Connections past the cap are closed here.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, ConnGuard) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e, self.name).await;
                    continue;
                }
            };
            let Some(guard) = self.limit.try_take(self.metrics.as_ref()) else {
                drop(tcp);
                self.limit.refused(peer, self.name, self.metrics.as_ref());
                continue;
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY: {e}");
            }
            return (tcp, peer, guard);
        }
    }
}

/// Errors of `accept` concern one connection (reset before it was taken) or a temporary
/// shortage (descriptors); neither stops the listener.
async fn accept_error(e: io::Error, listener: &str) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) {
        tracing::debug!(listener, "accept failed: {e}");
        return;
    }
    tracing::debug!(
        listener,
        "accept failed, pausing {ACCEPT_ERROR_BACKOFF:?}: {e}"
    );
    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_cap_connections_are_closed_and_places_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let acceptor = Acceptor::new(listener, ConnectionLimit::new(1), Some(&metrics), "http");
        let _first = TcpStream::connect(addr).await.unwrap();
        let (_a, _, held) = acceptor.accept().await;
        // The second is closed by the acceptor while it waits for a third.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(async move {
            let got = acceptor.accept().await;
            (acceptor, got)
        });
        let mut buf = [0u8; 1];
        use tokio::io::AsyncReadExt as _;
        assert_eq!(second.read(&mut buf).await.unwrap(), 0, "closed at once");
        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        let (acceptor, _accepted) = waiting.await.unwrap();
        let m = acceptor.metrics().unwrap();
        assert_eq!(m.refused.get(), 1);
        assert_eq!(m.open.get(), 1);
    }

    #[test]
    fn powers_of_ten() {
        assert!(is_power_of_ten(1) && is_power_of_ten(10) && is_power_of_ten(1000));
        assert!(!is_power_of_ten(20) && !is_power_of_ten(11) && !is_power_of_ten(0));
    }
}
