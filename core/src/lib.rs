//! UniModel: serve Python model plugins with a Rust core.
//!
//! - `api`: HTTP front end (KServe V2 REST, binary tensor extension), error → status mapping.
//! - `engine`: model registry, bounded queues, dynamic batcher, instance scheduling.
//! - `worker`: supervised Python worker processes, shared-memory arenas, control channel.
//! - `telemetry`: logging (text or JSON), spans, W3C trace context, OTLP export, and the
//!   Prometheus metrics behind `/metrics`.
//! - `cli`: the `unimodel` commands (`run`, `predict`, `bench`).
//! - `bench`: `unimodel bench`, the load generator (an HTTP client of any KServe V2 server).
//!
//! Dependencies point one way: `api -> engine -> worker`.

pub mod api;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod telemetry;
pub mod worker;
