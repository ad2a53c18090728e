//! Criterion micro-benchmarks of unimodel's core pieces live in `benches/`; this crate has no
//! code of its own. The load generator is `unimodel bench` (`core/src/bench/`).
