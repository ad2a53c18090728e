//! Arena allocator micro-benchmarks: the bookkeeping cost per batch on the input arena
//! (`unimodel::worker::arena`), freed in order and out of order.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use unimodel::worker::arena::Allocator;

/// Two blocks in flight, freed in order: the engine's steady state for a worker that runs
/// one execute at a time (one running, one prepared).
fn alloc_free_pipelined(c: &mut Criterion) {
    c.bench_function("arena/alloc_free_depth2", |b| {
        let mut arena = Allocator::new(64 << 20);
        let mut oldest = arena.alloc(4096).expect("fits");
        b.iter(|| {
            let block = arena.alloc(black_box(4096)).expect("fits");
            arena.free(oldest).expect("live");
            oldest = block;
        });
    });
}

/// Sixteen blocks of mixed sizes in flight, answered out of order (a worker running many
/// requests at once): each step frees a live block chosen by a fixed sequence.
fn alloc_free_out_of_order(c: &mut Criterion) {
    c.bench_function("arena/alloc_free_16_out_of_order", |b| {
        let mut arena = Allocator::new(1 << 20);
        let sizes = [30_000usize, 12_345, 7_777, 25_000];
        let mut live: Vec<_> = (0..16)
            .map(|i| arena.alloc(sizes[i % sizes.len()]).expect("fits"))
            .collect();
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let victim = (i * 7) % live.len();
            arena.free(live.swap_remove(victim)).expect("live");
            let block = arena
                .alloc(black_box(sizes[i % sizes.len()]))
                .expect("fits");
            live.push(block);
        });
    });
}

/// Layout of a typical batch (four inputs) inside one block.
fn layout_batch(c: &mut Criterion) {
    c.bench_function("arena/layout_4_tensors", |b| {
        b.iter(|| unimodel::worker::arena::layout(black_box([4096usize, 17, 65_536, 3])))
    });
}

criterion_group!(
    benches,
    alloc_free_pipelined,
    alloc_free_out_of_order,
    layout_batch
);
criterion_main!(benches);
