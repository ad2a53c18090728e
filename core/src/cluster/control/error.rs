//! Errors of the control layer: what a node answers `{"ok": false, "error": ...}` with,
//! and what `unimodel ctl` prints for a node.

use crate::echo::Echo;
use crate::repository::RepositoryError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is not the JSON the contract describes.
    #[error(
        "malformed request: {0}; expected JSON {{\"op\": \"load\"|\"unload\"|\"drain\"|\"resume\", \"model\": NAME}} (model omitted for a node-wide drain or resume)"
    )]
    BadRequest(String),
    #[error("unknown op '{}'; expected one of {}", Echo(.0), super::protocol::OPS)]
    UnknownOp(String),
    /// Drain or resume of a model the node neither serves nor has in its repository.
    #[error("unknown model '{}'; this node knows: {known}", Echo(name))]
    UnknownModel { name: String, known: String },
    /// The repository refused or failed the load or unload (its message says why).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// `unimodel ctl`: the node did not answer.
    #[error("no reply from node {node} in {secs} s")]
    NoReply { node: String, secs: u64 },
    /// `unimodel ctl`: nothing subscribes to the node's subject.
    #[error(
        "no reply from node {node}: nothing listens on {subject} (the node is not running, runs without --nats, or uses another --etcd-prefix)"
    )]
    NoResponders { node: String, subject: String },
    /// NATS refused to carry the request: these credentials may not publish on the node's
    /// subject (or subscribe to the reply inbox).
    #[error(
        "NATS refused to carry the request to node {node} (permissions violation: {detail}): these credentials are not authorised to publish on {subject}; use credentials whose NATS permissions allow it (--nats nats://USER:PASS@HOST:PORT or --nats-creds FILE)"
    )]
    NotPermitted {
        node: String,
        subject: String,
        detail: String,
    },
    /// Connecting or talking to NATS failed.
    #[error("{0}")]
    Nats(String),
}
