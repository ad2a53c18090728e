//! What metrics cost on the request path: everything one successful request records (the
//! REST counter and latency histogram with their label lookups, the in-flight guard, queue
//! time, and its share of a batch: batch size, worker call, plugin time, shared-memory
//! bytes), and one scrape of a server with ten models.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use unimodel::telemetry::metrics::{Metrics, PROTOCOL_REST};

fn per_request(c: &mut Criterion) {
    let metrics = Metrics::new();
    let model = metrics.model("doubler", "1");
    c.bench_function("metrics/one request (api + engine)", |b| {
        b.iter(|| {
            let guard = model.inflight();
            model.observe_queue(black_box(Duration::from_micros(40)));
            model.observe_batch(1, Duration::from_micros(90), Duration::from_micros(9));
            model.shm_in(12);
            model.shm_out(12);
            drop(guard);
            metrics.record_request(
                black_box("doubler"),
                "1",
                PROTOCOL_REST,
                "success",
                Duration::from_micros(250),
            );
        })
    });
}

fn scrape(c: &mut Criterion) {
    let metrics = Metrics::new();
    for i in 0..10 {
        let name = format!("model{i}");
        let m = metrics.model(&name, "1");
        m.observe_batch(4, Duration::from_millis(1), Duration::from_micros(500));
        metrics.record_request(
            &name,
            "1",
            PROTOCOL_REST,
            "success",
            Duration::from_millis(2),
        );
    }
    c.bench_function("metrics/scrape 10 models", |b| {
        b.iter(|| black_box(metrics.encode().len()))
    });
}

criterion_group!(benches, per_request, scrape);
criterion_main!(benches);
