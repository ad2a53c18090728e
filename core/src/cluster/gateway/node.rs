//! One node as the gateway sees it: where to reach it (REST base, a lazily connected gRPC
//! channel), how many requests the gateway has outstanding on it (the load that routing
//! compares), and whether it is out of rotation after a connection failure.
//!
//! A `Node` is created by the table actor (`actor.rs`) when a node key appears, and kept
//! while its addresses stay the same, so counts and pooled connections survive table
//! rebuilds. Snapshots (`routes.rs`) share it; the request path only touches its atomics.

use crate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use http::uri::{Authority, Scheme};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long a gRPC channel gives a node to accept a connection; past it the call fails
/// unsent (and goes elsewhere).
const GRPC_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 PINGs on a node's gRPC connection, idle or not: a node that stops answering them
/// within `GRPC_KEEPALIVE_TIMEOUT` (stopped, partitioned) has its connection closed, and
/// the calls and streams on it fail instead of waiting forever.
const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a node's REST front end is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestTarget {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl RestTarget {
    /// `http://H:P` (a trailing `/` or path is ignored); `None` for anything else, https
    /// included: the gateway dials nodes over plain HTTP only.
    pub fn parse(url: &str) -> Option<RestTarget> {
        let uri: http::Uri = url.parse().ok()?;
        let scheme = uri.scheme()?.clone();
        if scheme != Scheme::HTTP {
            return None;
        }
        Some(RestTarget {
            scheme,
            authority: uri.authority()?.clone(),
        })
    }
}

/// A node in the table.
#[derive(Debug)]
pub struct Node {
    /// Its name (unique per cluster), shared with the metrics labels.
    pub name: Arc<String>,
    pub rest: RestTarget,
    /// `grpc_url` as registered (`None`: the node serves no gRPC).
    pub grpc_url: Option<String>,
    /// A client over a channel that connects on first use and reconnects by itself.
    pub grpc: Option<GrpcInferenceServiceClient<Channel>>,
    /// Requests sent through the gateway and not yet answered (streams: until they end).
    outstanding: AtomicUsize,
    /// Out of rotation: a connection to it failed; cleared by a successful probe or when
    /// etcd rewrites its key.
    down: AtomicBool,
    /// Removed from the table or replaced: its probe stops, and requests still waiting for
    /// its answer fail at once (a node whose lease expired is not coming back to them).
    retired: tokio::sync::watch::Sender<bool>,
}

impl Node {
    /// A node reachable at `rest` (and `grpc_url`); the gRPC channel is not connected yet.
    pub fn new(name: &str, rest: RestTarget, grpc_url: Option<String>) -> Node {
        let grpc = grpc_url.as_deref().and_then(|url| {
            let endpoint = Endpoint::from_shared(url.to_string()).ok()?;
            let channel = endpoint
                .tcp_nodelay(true)
                .connect_timeout(GRPC_CONNECT_TIMEOUT)
                .http2_keep_alive_interval(GRPC_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(GRPC_KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_lazy();
            Some(
                GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            )
        });
        Node {
            name: Arc::new(name.to_string()),
            rest,
            grpc_url,
            grpc,
            outstanding: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            retired: tokio::sync::watch::Sender::new(false),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Takes the node out of rotation; true when it was in rotation until now (the caller
    /// then asks the actor for a probe).
    pub fn mark_down(&self) -> bool {
        !self.down.swap(true, Ordering::AcqRel)
    }

    /// Back in rotation; true when it was out.
    pub fn mark_up(&self) -> bool {
        self.down.swap(false, Ordering::AcqRel)
    }

    pub fn retire(&self) {
        self.retired.send_replace(true);
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

    /// Completes once the node is retired (never, while it is in the table).
    pub async fn gone(&self) {
        let mut rx = self.retired.subscribe();
        let _ = rx.wait_for(|retired| *retired).await;
    }

    /// Counts one request as outstanding until the returned mark is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// One outstanding request on a node; dropping it ends it.
#[derive(Debug)]
pub struct InFlight(Arc<Node>);

impl InFlight {
    pub fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_targets_are_http_urls() {
        let t = RestTarget::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(t.authority.as_str(), "127.0.0.1:8000");
        assert_eq!(t.scheme, Scheme::HTTP);
        assert!(RestTarget::parse("http://h:1/").is_some());
        assert!(RestTarget::parse("ftp://h:1").is_none());
        assert!(
            RestTarget::parse("https://h:1").is_none(),
            "dialled over plain HTTP only"
        );
        assert!(RestTarget::parse("h:1").is_none());
        assert!(RestTarget::parse("").is_none());
    }

    #[tokio::test]
    async fn counts_and_rotation() {
        let n = Arc::new(Node::new(
            "a",
            RestTarget::parse("http://127.0.0.1:1").unwrap(),
            Some("http://127.0.0.1:2".into()),
        ));
        let a = n.start();
        let b = n.start();
        assert_eq!(n.outstanding(), 2);
        drop(a);
        assert_eq!(b.node().outstanding(), 1);
        assert!(n.mark_down(), "first failure takes it out");
        assert!(!n.mark_down(), "already out");
        assert!(n.is_down());
        assert!(n.mark_up());
        assert!(!n.is_down());
    }
}
