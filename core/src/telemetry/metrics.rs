//! Prometheus metrics (`GET /metrics`, Prometheus text format 0.0.4) with `prometheus-client`.
//!
//! One `Metrics` per server, created by the CLI and handed to the engine in `EngineOptions`
//! (no globals, so tests get their own). Two kinds of recording:
//!
//! - per request, by the `api` layer, where the final status is known: `requests_total` by
//!   model, version, protocol and outcome, and the total latency of successful requests;
//! - per model, by the engine, through a `ModelMetrics` it resolves once at start (every
//!   handle pre-labelled, so the hot path never hashes labels): queue time, worker call round
//!   trip, plugin compute time and batch size (recorded by `StatsRecorder` in the same call
//!   that feeds the Triton statistics, so the two always agree), queue depth, in-flight
//!   requests, worker instances by state, worker starts/crashes/restarts, execution
//!   timeouts, 429 rejections and tensor bytes through shared memory.
//!
//! Gauges that mirror a state someone else owns (queue depth) are refreshed by samplers run
//! just before each scrape instead of on every request.

use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::Mutex;
use std::time::Duration;

/// The `Content-Type` of the `/metrics` answer.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `protocol` label of requests that came in over KServe V2 REST.
pub const PROTOCOL_REST: &str = "rest";

/// The `protocol` label of requests that came in over KServe V2 gRPC.
pub const PROTOCOL_GRPC: &str = "grpc";

/// Latency buckets in seconds: 100 µs (an in-process hop) to a minute (the default
/// execution timeout), roughly three per decade.
const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Batch size buckets: powers of two up to 1024 rows.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Worker instance states, as the `state` label spells them.
pub const WORKER_STATES: [&str; 5] = ["starting", "ready", "restarting", "failed", "stopped"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    version: String,
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    model: String,
    version: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ModelVersionLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    model: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionTimeoutLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    model: String,
    direction: &'static str,
}

pub(super) type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

// Plain functions (not closures) so the families' constructor type can be named.
pub(super) fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

type Sampler = Box<dyn Fn() + Send + Sync>;

/// A process-wide counter: its name, its help text and how to read it.
type ProcessCounter = (&'static str, &'static str, fn() -> u64);

/// Every metric family of the server, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<LatencyLabels>,
    queue_duration: HistogramFamily<ModelVersionLabels>,
    worker_call_duration: HistogramFamily<ModelVersionLabels>,
    plugin_compute_duration: HistogramFamily<ModelVersionLabels>,
    batch_size: HistogramFamily<ModelVersionLabels>,
    queue_depth: Family<ModelLabels, Gauge>,
    queue_capacity: Family<ModelLabels, Gauge>,
    inflight: Family<ModelLabels, Gauge>,
    worker_instances: Family<StateLabels, Gauge>,
    worker_starts: Family<ModelLabels, Counter>,
    worker_crashes: Family<ModelLabels, Counter>,
    worker_restarts: Family<ModelLabels, Counter>,
    execution_timeouts: Family<ModelLabels, Counter>,
    rejections: Family<ModelLabels, Counter>,
    shm_bytes: Family<DirectionLabels, Counter>,
    shm_regions: Gauge,
    auth_denials: Family<DenialLabels, Counter>,
    tls_handshake_failures: Family<HandshakeLabels, Counter>,
    open_connections: Family<ListenerLabels, Gauge>,
    refused_connections: Family<ListenerLabels, Counter>,
    connection_timeouts: Family<ConnectionTimeoutLabels, Counter>,
    buffered_request_bytes: Gauge,
    llm: super::metrics_llm::LlmFamilies,
    samplers: Mutex<Vec<Sampler>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family (names get the `unimodel_` prefix).
    pub fn new() -> Metrics {
        let mut m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            queue_duration: Family::new_with_constructor(latency_histogram),
            worker_call_duration: Family::new_with_constructor(latency_histogram),
            plugin_compute_duration: Family::new_with_constructor(latency_histogram),
            batch_size: Family::new_with_constructor(batch_histogram),
            queue_depth: Family::default(),
            queue_capacity: Family::default(),
            inflight: Family::default(),
            worker_instances: Family::default(),
            worker_starts: Family::default(),
            worker_crashes: Family::default(),
            worker_restarts: Family::default(),
            execution_timeouts: Family::default(),
            rejections: Family::default(),
            shm_bytes: Family::default(),
            shm_regions: Gauge::default(),
            auth_denials: Family::default(),
            tls_handshake_failures: Family::default(),
            open_connections: Family::default(),
            refused_connections: Family::default(),
            connection_timeouts: Family::default(),
            buffered_request_bytes: Gauge::default(),
            llm: super::metrics_llm::LlmFamilies::new(),
            samplers: Mutex::new(Vec::new()),
            registry: Registry::with_prefix("unimodel"),
        };
        m.register_families();
        m.register_heap();
        m.register_descriptors();
        m.register_log_counters();
        m
    }

    /// `open_fds` and `fd_limit`: the process's descriptors (counted in /proc/self/fd) and
    /// its soft RLIMIT_NOFILE, refreshed before each scrape. Where /proc is missing, the
    /// count is -1.
    fn register_descriptors(&mut self) {
        let open = Gauge::<i64>::default();
        let limit = Gauge::<i64>::default();
        self.registry.register(
            "open_fds",
            "File descriptors the server process holds (connections, worker sockets and arenas, client shared-memory regions, ...)",
            open.clone(),
        );
        self.registry.register(
            "fd_limit",
            "The process's soft RLIMIT_NOFILE (raised to the hard limit at start); at it, accepting connections and starting workers fail",
            limit.clone(),
        );
        self.add_sampler(move || {
            open.set(open_descriptors().map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)));
            let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(-1, |(soft, _)| i64::try_from(soft).unwrap_or(i64::MAX));
            limit.set(soft);
        });
    }

    /// One listener's connection gauges and counters (its series appear at zero).
    pub fn connections(&self, listener: &'static str) -> ConnectionMetrics {
        let timeouts = |reason| {
            self.connection_timeouts
                .get_or_create_owned(&ConnectionTimeoutLabels { listener, reason })
        };
        ConnectionMetrics {
            open: self
                .open_connections
                .get_or_create_owned(&ListenerLabels { listener }),
            refused: self
                .refused_connections
                .get_or_create_owned(&ListenerLabels { listener }),
            header_timeouts: timeouts("header"),
            body_timeouts: timeouts("body"),
            idle_timeouts: timeouts("idle"),
        }
    }

    /// Counters the log writer, the throttles and the panic hook keep as process-wide atomics
    /// (they run where no `Metrics` is at hand), copied in before each scrape.
    fn register_log_counters(&mut self) {
        let counters: [ProcessCounter; 3] = [
            (
                "log_lines_dropped",
                "Log lines dropped because stderr was not read fast enough (the log queue was full); each gap is reported in the log once the writer catches up",
                super::log_writer::dropped_lines,
            ),
            (
                "log_lines_suppressed",
                "Repetitive log lines (auth denials, failed requests) held back by the per-call-site rate limit and summarised as \"suppressed K similar lines\"",
                super::throttle::suppressed_lines,
            ),
            (
                "panics",
                "Panics in the core (each is logged with its task or thread; a model whose scheduler panicked goes UNAVAILABLE)",
                super::panics::panics,
            ),
        ];
        for (name, help, read) in counters {
            let counter = Counter::<u64>::default();
            self.registry.register(name, help, counter.clone());
            self.add_sampler(move || {
                counter.inc_by(read().saturating_sub(counter.get()));
            });
        }
    }

    /// `heap_live_bytes`, only while the allocator counts (`crate::heap`): refreshed before
    /// each scrape.
    fn register_heap(&mut self) {
        if crate::heap::live_bytes().is_none() {
            return;
        }
        let live = Gauge::<i64>::default();
        self.registry.register_with_unit(
            "heap_live",
            "Bytes in the core's live heap allocations (UNIMODEL_HEAP_ACCOUNTING is set)",
            Unit::Bytes,
            live.clone(),
        );
        self.add_sampler(move || {
            live.set(crate::heap::live_bytes().unwrap_or_default());
        });
    }

    /// Puts every family in the registry with its name, unit and help text.
    fn register_families(&mut self) {
        // Disjoint fields: the registry is borrowed mutably, the families only cloned.
        let r = &mut self.registry;
        self.llm.register(r);
        r.register(
            "requests",
            "Inference requests answered, by model, version, protocol and outcome (success, bad_request, not_found, queue_full, timeout, plugin_error, worker_error, unavailable, ...); model and version are empty when the request named no served model",
            self.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Total latency of successful inference requests, from arrival to the encoded response",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register_with_unit(
            "queue_duration",
            "Time successful requests waited in the model's queue before their batch was dispatched",
            Unit::Seconds,
            self.queue_duration.clone(),
        );
        r.register_with_unit(
            "worker_call_duration",
            "Round trip of one successful batch through a worker as the core measures it (staging inputs, predict, reading outputs)",
            Unit::Seconds,
            self.worker_call_duration.clone(),
        );
        r.register_with_unit(
            "plugin_compute_duration",
            "Time inside the plugin's predict for one successful batch, as the worker reports it",
            Unit::Seconds,
            self.plugin_compute_duration.clone(),
        );
        r.register(
            "batch_size",
            "Rows per successfully executed batch",
            self.batch_size.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting in the model's queue (not yet dispatched to a worker)",
            self.queue_depth.clone(),
        );
        r.register(
            "queue_capacity",
            "Places in the model's queue (--queue-capacity); a full queue answers 429",
            self.queue_capacity.clone(),
        );
        r.register(
            "inflight_requests",
            "Requests accepted by the engine and not yet answered (queued or executing)",
            self.inflight.clone(),
        );
        r.register(
            "worker_instances",
            "Worker instances of each model by state (starting, ready, restarting, failed, stopped)",
            self.worker_instances.clone(),
        );
        r.register(
            "worker_starts",
            "Worker processes started (first starts and restarts)",
            self.worker_starts.clone(),
        );
        r.register(
            "worker_crashes",
            "Worker processes that died or were killed (crash, hang, execution timeout, failed setup)",
            self.worker_crashes.clone(),
        );
        r.register(
            "worker_restarts",
            "Worker processes started again after a crash or a failed setup",
            self.worker_restarts.clone(),
        );
        r.register(
            "execution_timeouts",
            "Batches whose predict ran past the execution timeout (the worker was killed)",
            self.execution_timeouts.clone(),
        );
        r.register(
            "queue_rejections",
            "Requests refused with 429 because the model's queue was full or its max_concurrency reached",
            self.rejections.clone(),
        );
        r.register_with_unit(
            "shared_memory",
            "Tensor bytes moved between the core and workers through shared memory, by direction (in: inputs to the worker, out: outputs back)",
            Unit::Bytes,
            self.shm_bytes.clone(),
        );
        r.register(
            "shm_regions",
            "Client shared-memory regions registered now (at most --max-shm-regions; each holds two descriptors)",
            self.shm_regions.clone(),
        );
        r.register(
            "auth_denials",
            "Requests refused by auth, by protocol and outcome (unauthenticated: 401, forbidden: 403, rate_limited: 429)",
            self.auth_denials.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (reason \"failed\": not TLS, unknown CA, no or bad client certificate, ...) or did not finish within the handshake timeout (\"timeout\"), by listener (http, grpc, metrics)",
            self.tls_handshake_failures.clone(),
        );
        r.register(
            "open_connections",
            "Client connections open now, by listener (http, grpc, metrics); all listeners together are capped by --max-connections",
            self.open_connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open, by listener",
            self.refused_connections.clone(),
        );
        r.register(
            "connection_timeouts",
            "Connections closed by a timeout, by listener and reason (header: no complete request head within --header-read-timeout-ms; body: a request body not in within --body-read-timeout-ms, answered 408; idle: no request for --idle-connection-timeout-ms)",
            self.connection_timeouts.clone(),
        );
        r.register_with_unit(
            "buffered_request",
            "Bytes of request bodies the server holds (REST bodies and gRPC messages being read, or read and not yet released), counted against --max-buffered-bytes",
            Unit::Bytes,
            self.buffered_request_bytes.clone(),
        );
    }

    /// The gauge of registered client shared-memory regions, for the server to refresh.
    pub fn shm_regions(&self) -> Gauge {
        self.shm_regions.clone()
    }

    /// The gauge of request body bytes buffered under `--max-buffered-bytes`
    /// (`api::body_budget` keeps it).
    pub fn buffered_request_bytes(&self) -> Gauge {
        self.buffered_request_bytes.clone()
    }

    /// The handshake failure counters of one TLS listener (its series appear at zero).
    pub fn tls_handshake_failures(&self, listener: &'static str) -> HandshakeFailures {
        let counter = |reason| {
            self.tls_handshake_failures
                .get_or_create(&HandshakeLabels { listener, reason })
                .clone()
        };
        HandshakeFailures {
            failed: counter("failed"),
            timed_out: counter("timeout"),
        }
    }

    /// Handles for one model, labelled once. Creating them makes the model's series appear
    /// (at zero) before its first request, so dashboards and alerts see it at once.
    pub fn model(&self, model: &str, version: &str) -> ModelMetrics {
        let mv = ModelVersionLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        let ml = ModelLabels {
            model: model.to_string(),
        };
        let state = |state: &'static str| {
            self.worker_instances.get_or_create_owned(&StateLabels {
                model: model.to_string(),
                state,
            })
        };
        let direction = |direction: &'static str| {
            self.shm_bytes.get_or_create_owned(&DirectionLabels {
                model: model.to_string(),
                direction,
            })
        };
        ModelMetrics {
            queue_duration: self.queue_duration.get_or_create_owned(&mv),
            worker_call_duration: self.worker_call_duration.get_or_create_owned(&mv),
            plugin_compute_duration: self.plugin_compute_duration.get_or_create_owned(&mv),
            batch_size: self.batch_size.get_or_create_owned(&mv),
            queue_depth: self.queue_depth.get_or_create_owned(&ml),
            queue_capacity: self.queue_capacity.get_or_create_owned(&ml),
            inflight: self.inflight.get_or_create_owned(&ml),
            instances: WORKER_STATES.map(state),
            worker_starts: self.worker_starts.get_or_create_owned(&ml),
            worker_crashes: self.worker_crashes.get_or_create_owned(&ml),
            worker_restarts: self.worker_restarts.get_or_create_owned(&ml),
            execution_timeouts: self.execution_timeouts.get_or_create_owned(&ml),
            rejections: self.rejections.get_or_create_owned(&ml),
            shm_in: direction("in"),
            shm_out: direction("out"),
            llm: self.llm.model(&mv),
        }
    }

    /// One answered inference request. `model`/`version` are empty when the request named
    /// no served model (so a client cannot grow the label set without bound). Latency is
    /// recorded for successful requests only; failures are counted by outcome.
    pub fn record_request(
        &self,
        model: &str,
        version: &str,
        protocol: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_string(),
                version: version.to_string(),
                protocol,
                outcome,
            })
            .inc();
        if outcome == OUTCOME_SUCCESS {
            self.request_duration
                .get_or_create(&LatencyLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                    protocol,
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// A request refused by auth (`outcome`: unauthenticated, forbidden, rate_limited).
    pub fn auth_denied(&self, protocol: &'static str, outcome: &'static str) {
        self.auth_denials
            .get_or_create(&DenialLabels { protocol, outcome })
            .inc();
    }

    /// Runs `sample` before every scrape (to copy a state owned elsewhere into a gauge).
    pub fn add_sampler(&self, sample: impl Fn() + Send + Sync + 'static) {
        self.samplers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(sample));
    }

    /// The whole registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        for sample in self
            .samplers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            sample();
        }
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an error here would be an encoder bug.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics failed: {e}");
        }
        out
    }
}

/// Descriptors open in this process (entries of /proc/self/fd, less the one reading it).
pub fn open_descriptors() -> Option<usize> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.count().saturating_sub(1))
}

/// One listener's connection metrics (cheap to clone: each is an `Arc`).
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub refused: Counter,
    pub header_timeouts: Counter,
    pub body_timeouts: Counter,
    pub idle_timeouts: Counter,
}

/// One TLS listener's handshake failure counters.
#[derive(Clone, Debug)]
pub struct HandshakeFailures {
    pub failed: Counter,
    pub timed_out: Counter,
}

/// The `outcome` label of a successful request.
pub const OUTCOME_SUCCESS: &str = "success";

/// One model's metric handles (cheap to clone: each is an `Arc`).
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    queue_duration: Histogram,
    worker_call_duration: Histogram,
    plugin_compute_duration: Histogram,
    batch_size: Histogram,
    queue_depth: Gauge,
    queue_capacity: Gauge,
    inflight: Gauge,
    /// Indexed like `WORKER_STATES`.
    instances: [Gauge; 5],
    worker_starts: Counter,
    worker_crashes: Counter,
    worker_restarts: Counter,
    execution_timeouts: Counter,
    rejections: Counter,
    shm_in: Counter,
    shm_out: Counter,
    llm: super::metrics_llm::LlmMetrics,
}

/// What a worker state change means for the lifecycle counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lifecycle {
    pub started: bool,
    pub crashed: bool,
    pub restarted: bool,
}

impl ModelMetrics {
    /// A successful request waited `queue` before its batch left.
    pub fn observe_queue(&self, queue: Duration) {
        self.queue_duration.observe(queue.as_secs_f64());
    }

    /// A successful batch of `rows`: the worker round trip and the plugin's own time.
    pub fn observe_batch(&self, rows: u32, call: Duration, plugin: Duration) {
        self.batch_size.observe(f64::from(rows));
        self.worker_call_duration.observe(call.as_secs_f64());
        self.plugin_compute_duration.observe(plugin.as_secs_f64());
    }

    /// Tensor bytes staged into a worker's input arena.
    pub fn shm_in(&self, bytes: u64) {
        self.shm_in.inc_by(bytes);
    }

    /// Tensor bytes copied back out of a worker's output arena.
    pub fn shm_out(&self, bytes: u64) {
        self.shm_out.inc_by(bytes);
    }

    pub fn execution_timeout(&self) {
        self.execution_timeouts.inc();
    }

    pub fn rejected(&self) {
        self.rejections.inc();
    }

    pub fn set_queue_depth(&self, depth: i64) {
        self.queue_depth.set(depth);
    }

    pub fn set_queue_capacity(&self, capacity: i64) {
        self.queue_capacity.set(capacity);
    }

    /// The LLM serving metrics of this model version (`metrics_llm`).
    pub fn llm(&self) -> &super::metrics_llm::LlmMetrics {
        &self.llm
    }

    /// Requests in flight now (the gauge `inflight` keeps).
    pub fn inflight_now(&self) -> i64 {
        self.inflight.get()
    }

    /// Counts a request as in flight until the guard is dropped (answered, or abandoned).
    pub fn inflight(&self) -> InflightGuard {
        self.inflight.inc();
        InflightGuard(self.inflight.clone())
    }

    /// A worker instance moved from `from` (`None`: it just appeared) to `to`, both
    /// spelled as in `WORKER_STATES`; `lifecycle` says which counters the move adds to.
    pub fn instance_moved(&self, from: Option<&str>, to: &str, lifecycle: Lifecycle) {
        let gauge = |s: &str| WORKER_STATES.iter().position(|w| *w == s);
        if let Some(i) = from.and_then(gauge) {
            self.instances[i].dec();
        }
        if let Some(i) = gauge(to) {
            self.instances[i].inc();
        }
        if lifecycle.started {
            self.worker_starts.inc();
        }
        if lifecycle.crashed {
            self.worker_crashes.inc();
        }
        if lifecycle.restarted {
            self.worker_restarts.inc();
        }
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InflightGuard(Gauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the one sample whose line starts with `series` (name and labels).
    fn sample(text: &str, series: &str) -> f64 {
        let matches: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(matches.len(), 1, "{series} in:\n{text}");
        matches[0]
    }

    #[test]
    fn families_follow_prometheus_naming() {
        let m = Metrics::new();
        let _ = m.model("doubler", "1");
        m.record_request("doubler", "1", PROTOCOL_REST, "success", Duration::ZERO);
        let text = m.encode();
        for name in [
            "unimodel_requests_total",
            "unimodel_request_duration_seconds",
            "unimodel_queue_duration_seconds",
            "unimodel_worker_call_duration_seconds",
            "unimodel_plugin_compute_duration_seconds",
            "unimodel_batch_size",
            "unimodel_queue_depth",
            "unimodel_queue_capacity",
            "unimodel_inflight_requests",
            "unimodel_worker_instances",
            "unimodel_worker_starts_total",
            "unimodel_worker_crashes_total",
            "unimodel_worker_restarts_total",
            "unimodel_execution_timeouts_total",
            "unimodel_queue_rejections_total",
            "unimodel_shared_memory_bytes_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }

    #[test]
    fn requests_count_by_outcome_and_time_only_successes() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.record_request("a", "1", PROTOCOL_REST, "success", Duration::from_millis(2));
        }
        m.record_request(
            "a",
            "1",
            PROTOCOL_REST,
            "bad_request",
            Duration::from_secs(9),
        );
        m.record_request("", "", PROTOCOL_REST, "not_found", Duration::ZERO);
        let t = m.encode();
        let base = r#"model="a",version="1",protocol="rest""#;
        assert_eq!(
            sample(
                &t,
                &format!(r#"unimodel_requests_total{{{base},outcome="success"}}"#)
            ),
            3.0
        );
        assert_eq!(
            sample(
                &t,
                &format!(r#"unimodel_requests_total{{{base},outcome="bad_request"}}"#)
            ),
            1.0
        );
        assert_eq!(
            sample(
                &t,
                r#"unimodel_requests_total{model="",version="",protocol="rest",outcome="not_found"}"#
            ),
            1.0
        );
        assert_eq!(
            sample(
                &t,
                &format!("unimodel_request_duration_seconds_count{{{base}}}")
            ),
            3.0
        );
        let sum = sample(
            &t,
            &format!("unimodel_request_duration_seconds_sum{{{base}}}"),
        );
        assert!((sum - 0.006).abs() < 1e-9, "{sum}");
        assert_eq!(
            sample(
                &t,
                &format!(r#"unimodel_request_duration_seconds_bucket{{{base},le="0.0025"}}"#)
            ),
            3.0
        );
    }

    #[test]
    fn model_handles_record_batches_bytes_and_gauges() {
        let m = Metrics::new();
        let h = m.model("m", "1");
        h.observe_batch(3, Duration::from_millis(4), Duration::from_millis(1));
        h.observe_batch(8, Duration::from_millis(4), Duration::from_millis(1));
        h.observe_queue(Duration::from_micros(300));
        h.shm_in(100);
        h.shm_out(40);
        h.execution_timeout();
        h.rejected();
        h.rejected();
        let guard = h.inflight();
        let depth = h.clone();
        m.add_sampler(move || depth.set_queue_depth(7));
        let t = m.encode();
        let mv = r#"model="m",version="1""#;
        assert_eq!(
            sample(&t, &format!("unimodel_batch_size_count{{{mv}}}")),
            2.0
        );
        assert_eq!(
            sample(&t, &format!("unimodel_batch_size_sum{{{mv}}}")),
            11.0
        );
        assert_eq!(
            sample(&t, &format!(r#"unimodel_batch_size_bucket{{{mv},le="4"}}"#)),
            1.0
        );
        assert_eq!(
            sample(
                &t,
                &format!("unimodel_queue_duration_seconds_count{{{mv}}}")
            ),
            1.0
        );
        assert_eq!(
            sample(
                &t,
                r#"unimodel_shared_memory_bytes_total{model="m",direction="in"}"#
            ),
            100.0
        );
        assert_eq!(
            sample(
                &t,
                r#"unimodel_shared_memory_bytes_total{model="m",direction="out"}"#
            ),
            40.0
        );
        assert_eq!(
            sample(&t, r#"unimodel_execution_timeouts_total{model="m"}"#),
            1.0
        );
        assert_eq!(
            sample(&t, r#"unimodel_queue_rejections_total{model="m"}"#),
            2.0
        );
        assert_eq!(sample(&t, r#"unimodel_inflight_requests{model="m"}"#), 1.0);
        assert_eq!(sample(&t, r#"unimodel_queue_depth{model="m"}"#), 7.0);
        drop(guard);
        let t = m.encode();
        assert_eq!(sample(&t, r#"unimodel_inflight_requests{model="m"}"#), 0.0);
    }

    #[test]
    fn instance_moves_keep_one_count_per_instance() {
        let m = Metrics::new();
        let h = m.model("m", "1");
        let start = Lifecycle {
            started: true,
            ..Lifecycle::default()
        };
        h.instance_moved(None, "starting", start);
        h.instance_moved(None, "starting", start);
        h.instance_moved(Some("starting"), "ready", Lifecycle::default());
        h.instance_moved(
            Some("ready"),
            "restarting",
            Lifecycle {
                crashed: true,
                ..Lifecycle::default()
            },
        );
        let t = m.encode();
        let state = |s: &str| {
            sample(
                &t,
                &format!(r#"unimodel_worker_instances{{model="m",state="{s}"}}"#),
            )
        };
        assert_eq!(state("starting"), 1.0);
        assert_eq!(state("ready"), 0.0);
        assert_eq!(state("restarting"), 1.0);
        assert_eq!(state("failed"), 0.0);
        assert_eq!(
            sample(&t, r#"unimodel_worker_starts_total{model="m"}"#),
            2.0
        );
        assert_eq!(
            sample(&t, r#"unimodel_worker_crashes_total{model="m"}"#),
            1.0
        );
        assert_eq!(
            sample(&t, r#"unimodel_worker_restarts_total{model="m"}"#),
            0.0
        );
    }
}
