//! Control over NATS (`docs/cluster.md`, "Control over NATS").
//!
//! - `subjects`: the subject names, from the cluster prefix and the node name.
//! - `protocol`: the request and reply JSON, parsed with errors that say what was expected.
//! - `connect`: connecting to NATS with the credentials of `--nats` / `--nats-creds`.
//! - `client`: the sending side (`unimodel ctl`, `unimodel gateway --nats`): requests with
//!   deadlines, and NATS permission refusals reported at once instead of waited out.
//! - `node`: what `unimodel serve --nats` runs: answers load, unload, drain and resume on
//!   `{prefix}.ctl.{node}` through the repository actor and the engine.
//! - `error`: `ControlError`.
//!
//! The events a node publishes are in `cluster::events`; the requests are sent by `unimodel
//! ctl` (`cli::ctl`) and the gateway (`cluster::gateway::control`), both through `client`.

pub mod client;
pub mod connect;
mod error;
pub mod node;
pub mod protocol;
pub mod subjects;

pub use client::ControlClient;
pub use connect::NatsOptions;
pub use error::ControlError;
pub use subjects::Subjects;
