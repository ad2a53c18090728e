//! Sending one REST request to a node, and again to another when the first could not have
//! run it.
//!
//! Connections: one hyper client over HTTP/1.1 with a keep-alive pool per node (keyed by
//! the node's address), TCP_NODELAY, a short connect timeout. Bodies stream both ways:
//! the node's answer (JSON, binary tensors, SSE) goes back to the client frame by frame as
//! it arrives, headers untouched but for the hop-by-hop ones.
//!
//! Retries, and what is never retried:
//! - no connection (refused, unreachable, connect timeout): nothing was sent; the node goes
//!   out of rotation at once and the request goes to another node. A streamed request body
//!   was never read in that case and is taken back (`OutBody::Stream`).
//! - `503` with `unimodel-not-run: 1`: the node refused before accepting (draining, model
//!   unavailable); the request goes to another node when its body can be sent again, i.e.
//!   when it was small enough to be held (`REPLAY_LIMIT`); otherwise the node's answer is
//!   passed on.
//! - a node that left the table (its etcd lease expired) before the request was sent:
//!   nothing was sent; the request goes to another node.
//! - anything after the request was sent (a reset, a closed connection, no answer within
//!   `--upstream-timeout-ms`) may have run: 502 (504 for the timeout) naming the node, never
//!   sent again; the node goes out of rotation until a probe finds it live.
//!
//! An answer whose head arrived still ends (with an error) if its node leaves the table
//! before the last byte, so a stopped or partitioned node never holds a client forever;
//! pooled connections also have TCP keepalive on, which finds a dead peer on its own.

use super::actor::TableHandle;
use super::error::GatewayError;
use super::metrics::{GatewayMetrics, RetryReason};
use super::node::{InFlight, Node};
use crate::api::hold_body::HoldUntilEnd;
use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Request bodies up to this size (by `Content-Length`) are held whole before sending, so
/// they can be sent again after a not-run refusal. Larger ones stream through and are sent
/// again only when no connection was made.
pub const REPLAY_LIMIT: u64 = 256 << 10;
/// Nodes tried per request, at most.
pub const MAX_ATTEMPTS: usize = 3;
/// The header (and gRPC metadata key) a node sets on a refusal made before accepting.
pub const NOT_RUN: &str = "unimodel-not-run";
/// How long a connection to a node may take before the node counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle pooled connections per node (enough for the gateway's own concurrency; more are
/// opened when needed and closed when idle).
const POOL_IDLE_PER_NODE: usize = 1024;
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// TCP keepalive on node connections: first probe after this much silence, then one per
/// `KEEPALIVE_INTERVAL`, `KEEPALIVE_RETRIES` unanswered probes close it.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// Hop-by-hop headers (RFC 9110 §7.6.1): they concern one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The body sent to a node.
pub enum OutBody {
    /// Held whole (small, or empty): sent again as often as needed.
    Full(Option<Bytes>),
    /// The client's body, streamed; `slot` keeps it until the first read, so a request
    /// that never left (no connection) gives it back.
    Stream {
        slot: Arc<Mutex<Option<Body>>>,
        taken: Option<Body>,
    },
}

impl OutBody {
    fn replayable(&self) -> bool {
        matches!(self, OutBody::Full(_))
    }

    /// What is needed to send the same body again: a held body always, a streamed one
    /// only if it was never read (taken back from its slot after the attempt).
    fn spare(&self) -> Spare {
        match self {
            OutBody::Full(b) => Spare::Full(b.clone()),
            OutBody::Stream { slot, .. } => Spare::Slot(Arc::clone(slot)),
        }
    }

    fn stream(body: Body) -> OutBody {
        OutBody::Stream {
            slot: Arc::new(Mutex::new(Some(body))),
            taken: None,
        }
    }
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut() {
            OutBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream { slot, taken } => {
                if taken.is_none() {
                    *taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                match taken {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(Some(Err(axum::Error::new(std::io::Error::other(
                        "the request body was already sent to another node",
                    ))))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(b) => b.is_none(),
            OutBody::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Stream { taken, .. } => taken
                .as_ref()
                .map_or_else(SizeHint::default, http_body::Body::size_hint),
        }
    }
}

/// The means to send a body again (`OutBody::spare`).
enum Spare {
    Full(Option<Bytes>),
    Slot(Arc<Mutex<Option<Body>>>),
}

impl Spare {
    /// The body for the next attempt: `None` when a streamed body was already read, or when
    /// only a connection failure (`unsent`) may reuse a streamed one.
    fn body(self, unsent: bool) -> Option<OutBody> {
        match self {
            Spare::Full(b) => Some(OutBody::Full(b)),
            Spare::Slot(slot) if unsent => {
                let body = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
                Some(OutBody::stream(body))
            }
            Spare::Slot(_) => None,
        }
    }
}

/// The client side of the gateway's REST path.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, OutBody>,
    /// Longest wait for a node's response head (`--upstream-timeout-ms`).
    timeout: Duration,
    pub metrics: Arc<GatewayMetrics>,
    pub table: TableHandle,
}

/// A request ready to go to nodes: its head (kept for each attempt) and its body.
pub struct Outgoing {
    pub method: http::Method,
    /// Path and query, as the client sent them.
    pub path_and_query: http::uri::PathAndQuery,
    pub headers: HeaderMap,
    pub body: OutBody,
}

impl Outgoing {
    /// Takes the client's request apart; holds the body whole when small (`REPLAY_LIMIT`).
    pub async fn from_request(req: Request<Body>) -> Result<Outgoing, GatewayError> {
        let (parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut headers = parts.headers;
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
        headers.remove(header::HOST);
        // Answered by this hop's server already (it sent 100 Continue as the body was read).
        headers.remove(header::EXPECT);
        let small = http_body::Body::is_end_stream(&body)
            || headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n <= REPLAY_LIMIT);
        let body = if small {
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .map_err(|e| {
                    GatewayError::BadRequest(format!("reading the request body failed: {e}"))
                })?
                .to_bytes();
            OutBody::Full((!bytes.is_empty()).then_some(bytes))
        } else {
            OutBody::stream(body)
        };
        Ok(Outgoing {
            method: parts.method,
            path_and_query,
            headers,
            body,
        })
    }

    /// A request whose body was already read whole (the `/v1` routes read `model` from it).
    pub fn held(parts: http::request::Parts, body: Bytes) -> Outgoing {
        let mut headers = parts.headers;
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
        headers.remove(header::HOST);
        headers.remove(header::EXPECT);
        Outgoing {
            method: parts.method,
            path_and_query: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            headers,
            body: OutBody::Full((!body.is_empty()).then_some(body)),
        }
    }
}

/// How one attempt ended.
enum Attempt {
    /// The node answered (anything but a not-run refusal that can be sent elsewhere).
    Answered(Response<Incoming>, InFlight),
    /// The node refused before accepting and the body can be sent again.
    NotRun(Response<Incoming>),
    /// No connection, or the node left the table first: nothing was sent.
    Unsent,
    /// The request was sent and the node failed it (reset, closed, timed out): it may have
    /// run, and the node goes out of rotation.
    Broke(GatewayError),
    /// The request could not be made at all (the gateway's own error).
    Failed(GatewayError),
}

impl Upstream {
    pub fn new(table: TableHandle, metrics: Arc<GatewayMetrics>, timeout: Duration) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_keepalive(Some(KEEPALIVE_IDLE));
        connector.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
        connector.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_IDLE_PER_NODE)
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Upstream {
            client,
            timeout,
            metrics,
            table,
        }
    }

    /// Sends `out` to the nodes `pick` chooses (it gets the nodes tried so far) until one
    /// runs it, and streams the answer back. `model` labels the metrics.
    pub async fn forward(
        &self,
        mut out: Outgoing,
        model: &Arc<String>,
        traceparent: Option<HeaderValue>,
        pick: impl Fn(&super::routes::Tried) -> Result<Arc<Node>, GatewayError>,
    ) -> Result<Response<Body>, GatewayError> {
        if let Some(tp) = traceparent {
            out.headers
                .insert(crate::telemetry::trace_context::TRACEPARENT, tp);
        }
        let mut tried = super::routes::Tried::default();
        let mut refused: Option<Response<Incoming>> = None;
        let mut body = Some(out.body);
        while tried.count() < MAX_ATTEMPTS {
            let node = match pick(&tried) {
                Ok(node) => node,
                // Every node that could take it refused: their last answer says why.
                Err(_) if refused.is_some() => break,
                Err(e) => return Err(e),
            };
            let Some(this_body) = body.take() else {
                break;
            };
            let spare = this_body.spare();
            let attempt = self
                .attempt(
                    &node,
                    &out.method,
                    &out.path_and_query,
                    &out.headers,
                    this_body,
                )
                .await;
            match attempt {
                Attempt::Answered(resp, inflight) => {
                    self.metrics.request(
                        &node.name,
                        model,
                        crate::telemetry::metrics::PROTOCOL_REST,
                        resp.status().as_u16(),
                    );
                    return Ok(pass_back(resp, inflight));
                }
                Attempt::NotRun(resp) => {
                    self.metrics.retry(&node.name, RetryReason::NotRun);
                    tracing::debug!(node = %node.name, "node {} refused before accepting; trying another", node.name);
                    refused = Some(resp);
                    body = spare.body(false);
                }
                Attempt::Unsent => {
                    // A retired node is not coming back: no probe for it.
                    if !node.is_retired() {
                        self.table.node_failed(&node);
                    }
                    self.metrics.retry(&node.name, RetryReason::Connect);
                    body = spare.body(true);
                    if body.is_none() {
                        return Err(GatewayError::NodeFailed {
                            node: Arc::clone(&node.name),
                            detail:
                                "the connection failed and the request body could not be sent again"
                                    .into(),
                        });
                    }
                }
                Attempt::Broke(e) => {
                    if !node.is_retired() {
                        self.table.node_failed(&node);
                    }
                    let code = e.status().as_u16();
                    self.metrics.request(
                        &node.name,
                        model,
                        crate::telemetry::metrics::PROTOCOL_REST,
                        code,
                    );
                    return Err(e);
                }
                Attempt::Failed(e) => {
                    let code = e.status().as_u16();
                    self.metrics.request(
                        &node.name,
                        model,
                        crate::telemetry::metrics::PROTOCOL_REST,
                        code,
                    );
                    return Err(e);
                }
            }
            tried.add(node);
        }
        match refused {
            Some(resp) => Ok(resp.map(Body::new)),
            None => Err(GatewayError::NoReadyNode {
                model: model.to_string(),
                detail: format!(
                    "{} node(s) tried could not be reached, and the request was sent to none",
                    tried.count()
                ),
            }),
        }
    }

    async fn attempt(
        &self,
        node: &Arc<Node>,
        method: &http::Method,
        path: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: OutBody,
    ) -> Attempt {
        let uri = Uri::builder()
            .scheme(node.rest.scheme.clone())
            .authority(node.rest.authority.clone())
            .path_and_query(path.clone())
            .build();
        let uri = match uri {
            Ok(u) => u,
            Err(e) => {
                return Attempt::Failed(GatewayError::BadRequest(format!("bad request path: {e}")));
            }
        };
        if node.is_retired() {
            // Picked from a snapshot taken before the node left: nothing was sent.
            return Attempt::Unsent;
        }
        let replayable = body.replayable();
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers.clone();
        let inflight = node.start();
        let sent = Instant::now();
        let result = tokio::select! {
            r = tokio::time::timeout(self.timeout, self.client.request(req)) => r,
            () = node.gone() => return Attempt::Broke(left_the_table(node)),
        };
        match result {
            Err(_) => Attempt::Broke(GatewayError::NodeTimeout {
                node: Arc::clone(&node.name),
                after: self.timeout,
            }),
            Ok(Err(e)) if e.is_connect() => Attempt::Unsent,
            Ok(Err(e)) => Attempt::Broke(GatewayError::NodeFailed {
                node: Arc::clone(&node.name),
                detail: error_chain(&e),
            }),
            Ok(Ok(resp)) => {
                self.metrics.upstream(&node.name, sent.elapsed());
                if replayable && not_run(resp.status(), resp.headers()) {
                    Attempt::NotRun(resp)
                } else {
                    Attempt::Answered(resp, inflight)
                }
            }
        }
    }

    /// `GET /v2/health/live` on `node`: the probe that puts it back in rotation.
    pub async fn live(&self, node: &Node) -> bool {
        let uri = Uri::builder()
            .scheme(node.rest.scheme.clone())
            .authority(node.rest.authority.clone())
            .path_and_query("/v2/health/live")
            .build();
        let Ok(uri) = uri else { return false };
        let req = Request::get(uri).body(OutBody::Full(None));
        let Ok(req) = req else { return false };
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, self.client.request(req)).await {
            Ok(Ok(resp)) => resp.status() == StatusCode::OK,
            _ => false,
        }
    }
}

/// A node that left the table (its lease expired: stopped, partitioned) while a request
/// waited for its answer; the request may have run there.
pub fn left_the_table(node: &Node) -> GatewayError {
    GatewayError::NodeFailed {
        node: Arc::clone(&node.name),
        detail: "it left the cluster table (its etcd lease expired) before answering".into(),
    }
}

/// A refusal the node marks as made before accepting the request.
pub fn not_run(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        && headers.get(NOT_RUN).is_some_and(|v| v.as_bytes() == b"1")
}

/// The node's answer, streamed back; the request counts as outstanding on the node until
/// its last byte. Any answer (an event stream, or a JSON body whose node stopped after its
/// head) ends with an error if the node leaves the table before its last byte: a stopped
/// or partitioned node would otherwise hold it open forever.
fn pass_back(resp: Response<Incoming>, inflight: InFlight) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    for h in &HOP_BY_HOP {
        parts.headers.remove(h);
    }
    let node = Arc::clone(inflight.node());
    let gone = Box::pin(async move { node.gone().await });
    let body = UntilGone {
        inner: HoldUntilEnd::new(body, inflight),
        gone,
        ended: false,
    };
    Response::from_parts(parts, Body::new(body))
}

/// A streamed answer that fails once its node leaves the table.
struct UntilGone<B> {
    inner: B,
    gone: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ended: bool,
}

impl<B> http_body::Body for UntilGone<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.gone.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(
                "the node left the cluster table mid-stream".into()
            )));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

/// An error and its causes, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::actor::{self, Probe};
    use super::super::node::RestTarget;
    use super::super::routes::Tried;
    use super::*;
    use axum::routing::post;
    use futures::StreamExt as _;
    use futures::future::BoxFuture;

    struct NeverUp;

    impl Probe for NeverUp {
        fn live(&self, _node: Arc<Node>) -> BoxFuture<'static, bool> {
            Box::pin(async { false })
        }
    }

    /// A node on a free port that answers every infer with `status` (marked not-run when
    /// `not_run`) and the body it read, so a test sees what arrived.
    async fn node(name: &str, status: StatusCode, not_run: bool) -> Arc<Node> {
        let app = axum::Router::new().route(
            "/v2/models/m/infer",
            post(move |body: Bytes| async move {
                let mut resp = Response::new(Body::from(body));
                *resp.status_mut() = status;
                if not_run {
                    resp.headers_mut()
                        .insert(NOT_RUN, HeaderValue::from_static("1"));
                }
                resp
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let rest = RestTarget::parse(&format!("http://{at}")).unwrap();
        Arc::new(Node::new(name, rest, None))
    }

    fn upstream() -> Upstream {
        let (_feed, rx) = tokio::sync::mpsc::channel(1);
        let table = actor::start(rx, Arc::new(NeverUp), Duration::from_secs(60));
        Upstream::new(
            table,
            Arc::new(GatewayMetrics::new()),
            Duration::from_secs(10),
        )
    }

    fn request(body: Vec<u8>) -> Request<Body> {
        Request::post("/v2/models/m/infer")
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap()
    }

    /// Picks the nodes in the order given.
    fn in_order(nodes: Vec<Arc<Node>>) -> impl Fn(&Tried) -> Result<Arc<Node>, GatewayError> {
        move |tried: &Tried| {
            nodes
                .get(tried.count())
                .cloned()
                .ok_or(GatewayError::NoNode)
        }
    }

    async fn text(resp: Response<Body>) -> String {
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_not_run_refusal_is_sent_to_the_next_node_with_the_same_body() {
        let refusing = node("a", StatusCode::SERVICE_UNAVAILABLE, true).await;
        let serving = node("b", StatusCode::OK, false).await;
        let up = upstream();
        let out = Outgoing::from_request(request(b"payload".to_vec()))
            .await
            .unwrap();
        let model = Arc::new("m".to_string());
        let resp = up
            .forward(out, &model, None, in_order(vec![refusing, serving]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "payload");
        let metrics = up.metrics.encode();
        assert!(
            metrics.contains(r#"unimodel_gateway_retries_total{node="a",reason="not_run"} 1"#),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn an_unmarked_503_and_a_refused_large_body_pass_through() {
        let up = upstream();
        let model = Arc::new("m".to_string());
        // A 503 without the marker may have run: the client gets it, nothing is retried.
        let failing = node("a", StatusCode::SERVICE_UNAVAILABLE, false).await;
        let serving = node("b", StatusCode::OK, false).await;
        let out = Outgoing::from_request(request(b"x".to_vec()))
            .await
            .unwrap();
        let resp = up
            .forward(
                out,
                &model,
                None,
                in_order(vec![failing, Arc::clone(&serving)]),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        // A body too large to hold cannot be sent again: the node's refusal is the answer.
        let refusing = node("c", StatusCode::SERVICE_UNAVAILABLE, true).await;
        let big = vec![7u8; REPLAY_LIMIT as usize + 1];
        let out = Outgoing::from_request(request(big)).await.unwrap();
        let resp = up
            .forward(out, &model, None, in_order(vec![refusing, serving]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(not_run(resp.status(), resp.headers()));
    }

    #[tokio::test]
    async fn no_connection_takes_the_node_out_and_sends_a_streamed_body_elsewhere() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let rest = RestTarget::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let dead = Arc::new(Node::new("dead", rest, None));
        let serving = node("b", StatusCode::OK, false).await;
        let up = upstream();
        let big = vec![9u8; REPLAY_LIMIT as usize + 10];
        let out = Outgoing::from_request(request(big.clone())).await.unwrap();
        assert!(
            matches!(out.body, OutBody::Stream { .. }),
            "streamed, not held"
        );
        let model = Arc::new("m".to_string());
        let resp = up
            .forward(
                out,
                &model,
                None,
                in_order(vec![Arc::clone(&dead), serving]),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await.len(), big.len());
        assert!(dead.is_down(), "out of rotation at its first failure");
    }

    #[tokio::test]
    async fn a_node_that_left_the_table_before_sending_is_skipped() {
        let left = node("left", StatusCode::OK, false).await;
        left.retire();
        let serving = node("b", StatusCode::OK, false).await;
        let up = upstream();
        let out = Outgoing::from_request(request(b"p".to_vec()))
            .await
            .unwrap();
        let model = Arc::new("m".to_string());
        let resp = up
            .forward(out, &model, None, in_order(vec![left, serving]))
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "sent to the next node, not a 502"
        );
        assert_eq!(text(resp).await, "p");
    }

    #[tokio::test]
    async fn a_failure_after_sending_is_a_502_and_takes_the_node_out() {
        // A node that reads the request and closes the connection without an answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                drop(conn);
            }
        });
        let closing = Arc::new(Node::new(
            "closing",
            RestTarget::parse(&format!("http://{at}")).unwrap(),
            None,
        ));
        let serving = node("b", StatusCode::OK, false).await;
        let up = upstream();
        let out = Outgoing::from_request(request(b"p".to_vec()))
            .await
            .unwrap();
        let model = Arc::new("m".to_string());
        let err = up
            .forward(
                out,
                &model,
                None,
                in_order(vec![Arc::clone(&closing), serving]),
            )
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
        assert!(err.to_string().contains("closing"), "{err}");
        assert!(
            closing.is_down(),
            "out of rotation after a failure after sending"
        );
    }

    #[tokio::test]
    async fn a_json_answer_whose_node_leaves_mid_body_ends_with_an_error() {
        // Headers and a first chunk, then nothing: a node stopped mid-answer.
        let app = axum::Router::new().route(
            "/v2/models/m/infer",
            post(|| async {
                let chunks = futures::stream::once(async {
                    Ok::<_, std::io::Error>(Bytes::from_static(b"{\"outputs\":"))
                })
                .chain(futures::stream::pending());
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from_stream(chunks))
                    .unwrap()
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let stuck = Arc::new(Node::new(
            "stuck",
            RestTarget::parse(&format!("http://{at}")).unwrap(),
            None,
        ));
        let up = upstream();
        let out = Outgoing::from_request(request(b"p".to_vec()))
            .await
            .unwrap();
        let model = Arc::new("m".to_string());
        let resp = up
            .forward(out, &model, None, in_order(vec![Arc::clone(&stuck)]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = http_body_util::BodyExt::frame(&mut body)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first.into_data().unwrap(),
            Bytes::from_static(b"{\"outputs\":")
        );
        // Its lease expires: the table retires it, and the answer ends.
        stuck.retire();
        let rest = tokio::time::timeout(
            Duration::from_secs(60),
            http_body_util::BodyExt::collect(body),
        )
        .await
        .expect("the body ended once its node left the table");
        let err = rest.unwrap_err();
        assert!(err.to_string().contains("left the cluster table"), "{err}");
    }
}
