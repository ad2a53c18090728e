//! Control over NATS (`docs/cluster.md`, "Control over NATS").
//!
//! - `subjects`: the subject names, from the cluster prefix and the node name.
//! - `protocol`: the request and reply JSON, parsed with errors that say what was expected.
//! - `connect`: connecting to NATS with the credentials of `--nats` / `--nats-creds`.
//! - `node`: what `unimodel serve --nats` runs: answers load, unload, drain and resume on
//!   `{prefix}.ctl.{node}` through the repository actor and the engine.
//! - `error`: `ControlError`.
//!
//! The events a node publishes are in `cluster::events`; the sender side of the requests is
//! `unimodel ctl` (`cli::ctl`).

pub mod connect;
mod error;
pub mod node;
pub mod protocol;
pub mod subjects;

pub use connect::NatsOptions;
pub use error::ControlError;
pub use subjects::Subjects;
