//! Per-model counters behind `GET /v2/models/{m}/stats`, and the Prometheus histograms that
//! mirror them.
//!
//! Updated once per batch and once per request by the batch task; a std `Mutex` is right
//! here (tiny critical sections, never held across an await). Each record call feeds the
//! Triton statistics and the matching `/metrics` histograms with the same values, so the two
//! always agree: `execution_count`/`inference_count` are `unimodel_batch_size` count/sum,
//! `compute_infer` is `unimodel_plugin_compute_duration_seconds`, `queue` is
//! `unimodel_queue_duration_seconds`.

use super::{BatchStat, ModelStats, StatDuration};
use crate::telemetry::metrics::ModelMetrics;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn add(d: &mut StatDuration, t: Duration) {
    d.count += 1;
    d.ns += u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
}

/// Times of one executed batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchTimes {
    pub rows: u32,
    /// Preparing and copying inputs into the worker.
    pub input: Duration,
    /// The plugin's `predict` as the worker measured it.
    pub infer: Duration,
    /// The rest of the worker round trip plus splitting outputs.
    pub output: Duration,
    /// The worker call round trip as the core measured it (staging, predict, reading back).
    pub call: Duration,
}

#[derive(Debug)]
pub struct StatsRecorder {
    inner: Mutex<ModelStats>,
    metrics: ModelMetrics,
}

impl StatsRecorder {
    pub fn new(name: &str, version: &str, metrics: ModelMetrics) -> Self {
        let stats = ModelStats {
            name: name.to_string(),
            version: version.to_string(),
            ..ModelStats::default()
        };
        StatsRecorder {
            inner: Mutex::new(stats),
            metrics,
        }
    }

    fn with(&self, f: impl FnOnce(&mut ModelStats)) {
        // A poisoned lock only means a panic elsewhere mid-update; counters are still usable.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
    }

    pub fn snapshot(&self) -> ModelStats {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The model's metric handles, for what the Triton statistics do not cover.
    pub fn metrics(&self) -> &ModelMetrics {
        &self.metrics
    }

    /// One worker call returned outputs.
    pub fn record_batch(&self, t: BatchTimes) {
        self.metrics.observe_batch(t.rows, t.call, t.infer);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.with(|s| {
            s.execution_count += 1;
            s.inference_count += u64::from(t.rows);
            s.last_inference_ms = now_ms;
            add(&mut s.compute_input, t.input);
            add(&mut s.compute_infer, t.infer);
            add(&mut s.compute_output, t.output);
            let size = u64::from(t.rows);
            let pos = s
                .batch_stats
                .iter()
                .position(|b| b.batch_size == size)
                .unwrap_or_else(|| {
                    s.batch_stats.push(BatchStat {
                        batch_size: size,
                        ..BatchStat::default()
                    });
                    s.batch_stats.sort_by_key(|b| b.batch_size);
                    s.batch_stats
                        .iter()
                        .position(|b| b.batch_size == size)
                        .unwrap_or(0)
                });
            if let Some(b) = s.batch_stats.get_mut(pos) {
                add(&mut b.compute_input, t.input);
                add(&mut b.compute_infer, t.infer);
                add(&mut b.compute_output, t.output);
            }
        });
    }

    /// One request answered: `queue` is its wait before dispatch, `total` enqueue to answer.
    pub fn record_request(&self, ok: bool, queue: Duration, total: Duration) {
        if ok {
            self.metrics.observe_queue(queue);
        }
        self.with(|s| {
            add(if ok { &mut s.success } else { &mut s.fail }, total);
            if ok {
                add(&mut s.queue, queue);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_batches_rows_and_batch_sizes() {
        let metrics = crate::telemetry::metrics::Metrics::new();
        let r = StatsRecorder::new("m", "1", metrics.model("m", "1"));
        let t = |rows| BatchTimes {
            rows,
            input: Duration::from_nanos(10),
            infer: Duration::from_nanos(100),
            output: Duration::from_nanos(20),
            call: Duration::from_nanos(110),
        };
        r.record_batch(t(4));
        r.record_batch(t(1));
        r.record_batch(t(4));
        r.record_request(true, Duration::from_nanos(5), Duration::from_nanos(50));
        r.record_request(false, Duration::from_nanos(5), Duration::from_nanos(70));
        let s = r.snapshot();
        assert_eq!(s.execution_count, 3);
        assert_eq!(s.inference_count, 9);
        assert_eq!(s.compute_infer, StatDuration { count: 3, ns: 300 });
        assert_eq!(
            s.batch_stats
                .iter()
                .map(|b| (b.batch_size, b.compute_infer.count))
                .collect::<Vec<_>>(),
            vec![(1, 1), (4, 2)]
        );
        assert_eq!(s.success, StatDuration { count: 1, ns: 50 });
        assert_eq!(s.fail, StatDuration { count: 1, ns: 70 });
        assert!(s.last_inference_ms > 0);

        // The same calls fed the metrics with the same numbers.
        let text = metrics.encode();
        let value = |series: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("{series} missing:\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let mv = r#"{model="m",version="1"}"#;
        assert_eq!(value(&format!("unimodel_batch_size_count{mv}")), 3.0);
        assert_eq!(value(&format!("unimodel_batch_size_sum{mv}")), 9.0);
        assert_eq!(
            value(&format!(
                "unimodel_plugin_compute_duration_seconds_count{mv}"
            )),
            3.0
        );
        let infer_s = value(&format!("unimodel_plugin_compute_duration_seconds_sum{mv}"));
        assert!((infer_s - 300e-9).abs() < 1e-15, "{infer_s}");
        assert_eq!(
            value(&format!("unimodel_queue_duration_seconds_count{mv}")),
            1.0
        );
    }
}
