//! Per-model counters behind `GET /v2/models/{m}/stats`.
//!
//! Updated once per batch and once per request by the batch task; a std `Mutex` is right
//! here (tiny critical sections, never held across an await).

use super::{BatchStat, ModelStats, StatDuration};
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
}

#[derive(Debug)]
pub struct StatsRecorder {
    inner: Mutex<ModelStats>,
}

impl StatsRecorder {
    pub fn new(name: &str, version: &str) -> Self {
        let stats = ModelStats {
            name: name.to_string(),
            version: version.to_string(),
            ..ModelStats::default()
        };
        StatsRecorder {
            inner: Mutex::new(stats),
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

    /// One worker call returned outputs.
    pub fn record_batch(&self, t: BatchTimes) {
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
        let r = StatsRecorder::new("m", "1");
        let t = |rows| BatchTimes {
            rows,
            input: Duration::from_nanos(10),
            infer: Duration::from_nanos(100),
            output: Duration::from_nanos(20),
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
    }
}
