//! The one error type of the etcd client: what went wrong, said so a log line explains it.

/// A failed etcd operation.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint string that is not `http://HOST:PORT`.
    #[error(
        "bad etcd endpoint {given:?}: {why} (expected http://HOST:PORT, several separated by commas)"
    )]
    BadEndpoint {
        /// The endpoint as given (echoed bounded).
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// No endpoint at all.
    #[error("no etcd endpoint given (expected http://HOST:PORT, several separated by commas)")]
    NoEndpoint,
    /// The call reached no etcd, or etcd answered with an error status.
    #[error("etcd {op} failed: {status}")]
    Rpc {
        /// The operation (`put`, `lease grant`, ...).
        op: &'static str,
        /// The gRPC status (connection errors arrive as `Unavailable`).
        #[source]
        status: tonic::Status,
    },
    /// etcd no longer knows the lease (it expired, or etcd lost its data).
    #[error("etcd lease {id:x} is gone (expired or revoked)")]
    LeaseLost {
        /// The lease id.
        id: i64,
    },
    /// A stream (keep-alive or watch) ended: etcd went away or cancelled it.
    #[error("etcd {op} stream ended: {why}")]
    StreamEnded {
        /// The stream (`keep-alive`, `watch`).
        op: &'static str,
        /// Why, as far as etcd said.
        why: String,
    },
    /// A watch asked for a revision etcd has compacted away; re-read and watch from the
    /// revision the read returns.
    #[error("etcd watch start revision was compacted (oldest kept: {compact_revision})")]
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
}

impl EtcdError {
    /// Wraps a gRPC status of operation `op`.
    pub(crate) fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Rpc { op, status }
    }
}
