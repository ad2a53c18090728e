//! Ring allocator micro-benchmarks: the bookkeeping cost per batch on the input arena
//! (`unimodel::worker::arena`), with and without wrap-around.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use unimodel::worker::arena::Ring;

/// Two blocks in flight, freed in order: the engine's steady state (pipelining depth 2).
fn alloc_free_pipelined(c: &mut Criterion) {
    c.bench_function("arena/alloc_free_depth2", |b| {
        let mut ring = Ring::new(64 << 20);
        let first = ring.alloc(4096).expect("fits");
        let mut oldest = first;
        b.iter(|| {
            let block = ring.alloc(black_box(4096)).expect("fits");
            ring.free(oldest).expect("in order");
            oldest = block;
        });
    });
}

/// Blocks sized so that every few allocations wrap to offset 0.
fn alloc_free_wrapping(c: &mut Criterion) {
    c.bench_function("arena/alloc_free_wraparound", |b| {
        let mut ring = Ring::new(1 << 20);
        let mut live = std::collections::VecDeque::new();
        let sizes = [300_000usize, 123_456, 77_777, 250_000];
        let mut i = 0;
        b.iter(|| {
            let size = sizes[i % sizes.len()];
            i += 1;
            loop {
                match ring.alloc(black_box(size)) {
                    Ok(block) => {
                        live.push_back(block);
                        break;
                    }
                    Err(_) => {
                        let oldest = live.pop_front().expect("a full ring has live blocks");
                        ring.free(oldest).expect("in order");
                    }
                }
            }
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
    alloc_free_wrapping,
    layout_batch
);
criterion_main!(benches);
