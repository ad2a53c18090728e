//! The LLM serving metrics, vLLM's names with the `unimodel_` prefix (issue 11): time to
//! first token, inter-token latency, end-to-end and queue time of generations, prompt and
//! generated token counters, running and waiting sequences, KV cache usage and preemptions,
//! by model and version. Recorded by the continuous-batching scheduler (`engine::continuous`)
//! through the `LlmMetrics` handles its model's `ModelMetrics` resolves once.

use super::metrics::{HistogramFamily, ModelVersionLabels, latency_histogram};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

type FloatGauge = Gauge<f64, AtomicU64>;

/// The families, registered once per server.
#[derive(Clone)]
pub(super) struct LlmFamilies {
    ttft: HistogramFamily<ModelVersionLabels>,
    itl: HistogramFamily<ModelVersionLabels>,
    e2e: HistogramFamily<ModelVersionLabels>,
    queue: HistogramFamily<ModelVersionLabels>,
    prompt_tokens: Family<ModelVersionLabels, Counter>,
    generation_tokens: Family<ModelVersionLabels, Counter>,
    running: Family<ModelVersionLabels, Gauge>,
    waiting: Family<ModelVersionLabels, Gauge>,
    kv_usage: Family<ModelVersionLabels, FloatGauge>,
    preemptions: Family<ModelVersionLabels, Counter>,
}

/// One model version's handles.
#[derive(Clone, Debug)]
pub struct LlmMetrics {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    running: Gauge,
    waiting: Gauge,
    kv_usage: FloatGauge,
    preemptions: Counter,
}

impl LlmFamilies {
    pub(super) fn new() -> LlmFamilies {
        LlmFamilies {
            ttft: Family::new_with_constructor(latency_histogram),
            itl: Family::new_with_constructor(latency_histogram),
            e2e: Family::new_with_constructor(latency_histogram),
            queue: Family::new_with_constructor(latency_histogram),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            running: Family::default(),
            waiting: Family::default(),
            kv_usage: Family::default(),
            preemptions: Family::default(),
        }
    }

    pub(super) fn register(&self, r: &mut Registry) {
        let seconds = [
            (
                "time_to_first_token",
                "Time from a generation's arrival to its first token",
                &self.ttft,
            ),
            (
                "inter_token_latency",
                "Time between a generation's consecutive tokens",
                &self.itl,
            ),
            (
                "e2e_request_latency",
                "Time from a generation's arrival to its end",
                &self.e2e,
            ),
            (
                "request_queue_time",
                "Time a generation waited before its first step",
                &self.queue,
            ),
        ];
        for (name, help, family) in seconds {
            r.register_with_unit(name, help, Unit::Seconds, family.clone());
        }
        r.register(
            "prompt_tokens",
            "Prompt tokens of generations that started",
            self.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated (sampled), stop ids included",
            self.generation_tokens.clone(),
        );
        r.register(
            "num_requests_running",
            "Sequences running (in the policy's running set), all instances",
            self.running.clone(),
        );
        r.register(
            "num_requests_waiting",
            "Sequences waiting for KV or a step, all instances",
            self.waiting.clone(),
        );
        r.register(
            "kv_cache_usage_perc",
            "Share of the KV cache (blocks or slots) in use, 0 to 1, across instances",
            self.kv_usage.clone(),
        );
        r.register(
            "num_preemptions",
            "Sequences preempted (sent back to recompute) for lack of KV",
            self.preemptions.clone(),
        );
    }

    pub(super) fn model(&self, mv: &ModelVersionLabels) -> LlmMetrics {
        LlmMetrics {
            ttft: self.ttft.get_or_create_owned(mv),
            itl: self.itl.get_or_create_owned(mv),
            e2e: self.e2e.get_or_create_owned(mv),
            queue: self.queue.get_or_create_owned(mv),
            prompt_tokens: self.prompt_tokens.get_or_create_owned(mv),
            generation_tokens: self.generation_tokens.get_or_create_owned(mv),
            running: self.running.get_or_create_owned(mv),
            waiting: self.waiting.get_or_create_owned(mv),
            kv_usage: self.kv_usage.get_or_create_owned(mv),
            preemptions: self.preemptions.get_or_create_owned(mv),
        }
    }
}

impl LlmMetrics {
    /// A generation's first step: its queue time and its prompt.
    pub fn started(&self, queue: Duration, prompt_tokens: usize) {
        self.queue.observe(queue.as_secs_f64());
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// A sampled token: the time since the generation's arrival (its first) or since its
    /// previous token.
    pub fn token(&self, first: bool, since: Duration) {
        self.generation_tokens.inc();
        let h = if first { &self.ttft } else { &self.itl };
        h.observe(since.as_secs_f64());
    }

    /// A generation ended normally.
    pub fn finished(&self, e2e: Duration) {
        self.e2e.observe(e2e.as_secs_f64());
    }

    /// The scheduler's state after a step, summed over instances.
    pub fn scheduler(&self, running: usize, waiting: usize, kv_usage: f64, new_preemptions: u64) {
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
        self.kv_usage.set(kv_usage);
        self.preemptions.inc_by(new_preemptions);
    }
}
