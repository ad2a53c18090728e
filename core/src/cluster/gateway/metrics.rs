//! The gateway's own metrics (`GET /metrics` on the gateway, prefix `unimodel_gateway_`),
//! beside the connection, TLS and auth families the listeners share with `serve`
//! (`telemetry::metrics::Metrics`):
//!
//! - `requests_total{node, model, protocol, code}`: answers by node and model, `code` the
//!   HTTP status (REST) or the gRPC status code number (gRPC); `node` is empty when the
//!   gateway answered itself (unknown model, no ready node), `model` when none was named;
//! - `upstream_duration_seconds{node}`: from sending to a node to its response head;
//! - `retries_total{node, reason}`: requests sent again elsewhere after `node` could not run
//!   them (`connect`: no connection; `not_run`: it refused before accepting);
//! - `nodes{state}`: nodes in the table (`serving`, `in_rotation`, `all`), read at scrape.
//!
//! Label values are shared `Arc<String>`s from the table, so recording costs no allocation
//! once a series exists.

use super::actor::TableHandle;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// 50 µs (a loopback hop) to a minute, about three per decade.
const LATENCY_BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0, 30.0, 60.0,
];

/// The empty label value (the gateway answered itself, or no model was named).
pub static NONE: LazyLock<Arc<String>> = LazyLock::new(|| Arc::new(String::new()));

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    node: Arc<String>,
    model: Arc<String>,
    protocol: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    node: Arc<String>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Why a request was sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    NotRun,
}

/// The families, and the registry that encodes them.
pub struct GatewayMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream: Family<NodeLabels, Histogram, fn() -> Histogram>,
    retries: Family<RetryLabels, Counter>,
    nodes: Family<StateLabels, Gauge>,
    table: std::sync::OnceLock<TableHandle>,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    pub fn new() -> GatewayMetrics {
        let mut m = GatewayMetrics {
            registry: Registry::with_prefix("unimodel_gateway"),
            requests: Family::default(),
            upstream: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            nodes: Family::default(),
            table: std::sync::OnceLock::new(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Requests answered through the gateway, by node, model, protocol and code (HTTP status, or gRPC status code number); node is empty when the gateway answered itself",
            m.requests.clone(),
        );
        r.register_with_unit(
            "upstream_duration",
            "Time from sending a request to a node to the node's response head",
            Unit::Seconds,
            m.upstream.clone(),
        );
        r.register(
            "retries",
            "Requests sent again to another node because this one could not have run them (reason connect: no connection; not_run: refused before accepting)",
            m.retries.clone(),
        );
        r.register(
            "nodes",
            "Nodes in the gateway's table by state (all: registered; serving: state SERVING; in_rotation: SERVING and not out of rotation after a connection failure)",
            m.nodes.clone(),
        );
        m
    }

    /// Where the node gauges are read from at each scrape.
    pub fn watch_table(&self, table: TableHandle) {
        let _ = self.table.set(table);
    }

    pub fn request(
        &self,
        node: &Arc<String>,
        model: &Arc<String>,
        protocol: &'static str,
        code: u16,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                node: Arc::clone(node),
                model: Arc::clone(model),
                protocol,
                code,
            })
            .inc();
    }

    pub fn upstream(&self, node: &Arc<String>, took: Duration) {
        self.upstream
            .get_or_create(&NodeLabels {
                node: Arc::clone(node),
            })
            .observe(took.as_secs_f64());
    }

    pub fn retry(&self, node: &Arc<String>, reason: RetryReason) {
        let reason = match reason {
            RetryReason::Connect => "connect",
            RetryReason::NotRun => "not_run",
        };
        self.retries
            .get_or_create(&RetryLabels {
                node: Arc::clone(node),
                reason,
            })
            .inc();
    }

    /// The families in the Prometheus text format.
    pub fn encode(&self) -> String {
        if let Some(table) = self.table.get() {
            let routes = table.routes();
            let set = |state, n: usize| {
                self.nodes
                    .get_or_create(&StateLabels { state })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            set("all", routes.all.len());
            set("serving", routes.serving.len());
            set("in_rotation", routes.in_rotation());
        }
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!("encoding gateway metrics failed: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_labelled_by_node_model_and_code() {
        let m = GatewayMetrics::new();
        let n = Arc::new("n1".to_string());
        let model = Arc::new("m".to_string());
        m.request(&n, &model, "rest", 200);
        m.request(&n, &model, "rest", 200);
        m.retry(&n, RetryReason::Connect);
        m.upstream(&n, Duration::from_micros(80));
        let t = m.encode();
        assert!(
            t.contains(r#"unimodel_gateway_requests_total{node="n1",model="m",protocol="rest",code="200"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"unimodel_gateway_retries_total{node="n1",reason="connect"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"unimodel_gateway_upstream_duration_seconds_count{node="n1"} 1"#),
            "{t}"
        );
    }
}
