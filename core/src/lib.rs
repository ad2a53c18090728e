//! UniModel: serve Python model plugins with a Rust core.
//!
//! - `api`: HTTP front end (KServe V2 REST, binary tensor extension), error → status mapping.
//! - `engine`: model registry, bounded queues, dynamic batcher, instance scheduling.
//! - `worker`: supervised Python worker processes, shared-memory arenas, control channel.
//! - `telemetry`: logging.
//!
//! Dependencies point one way: `api -> engine -> worker`.

pub mod api;
pub mod engine;
pub mod telemetry;
pub mod worker;
