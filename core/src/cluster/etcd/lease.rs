//! Leases: grant, keep alive over one bidirectional stream, revoke. Every key a node writes
//! is attached to its lease, so revoking it (a clean stop) or letting it expire (a crash, a
//! partition) removes them all at once.

use futures::SinkExt;
use futures::channel::mpsc;

use super::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
};
use super::{EtcdClient, EtcdError};

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease id (the value keys are attached with).
    pub id: i64,
    /// The TTL etcd granted, in seconds (it may differ from the one asked for).
    pub ttl_s: i64,
}

/// An open keep-alive stream for one lease: each `keep_alive` call renews it once.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    replies: tonic::Streaming<LeaseKeepAliveResponse>,
}

impl EtcdClient {
    /// Grants a lease of `ttl_s` seconds.
    pub async fn lease_grant(&self, ttl_s: i64) -> Result<Lease, EtcdError> {
        let request = LeaseGrantRequest { ttl: ttl_s, id: 0 };
        let reply = self
            .lease
            .clone()
            .lease_grant(request)
            .await
            .map_err(EtcdError::rpc("lease grant"))?;
        let reply = reply.into_inner();
        if !reply.error.is_empty() {
            return Err(EtcdError::Rpc {
                op: "lease grant",
                status: tonic::Status::unknown(reply.error),
            });
        }
        Ok(Lease {
            id: reply.id,
            ttl_s: reply.ttl,
        })
    }

    /// Revokes lease `id`: every key attached to it is deleted at once.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.lease
            .clone()
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .map_err(EtcdError::rpc("lease revoke"))?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id` and renews the lease once on it (so an
    /// expired lease is found here, not at the first renewal).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<(KeepAlive, i64), EtcdError> {
        let (mut requests, receiver) = mpsc::channel(1);
        // etcd sends the response headers with its first reply, which needs a request: queue
        // it before the call, or the call would wait for headers that never come.
        requests
            .send(LeaseKeepAliveRequest { id })
            .await
            .map_err(|e| stream_ended(e.to_string()))?;
        let replies = self
            .lease
            .clone()
            .lease_keep_alive(receiver)
            .await
            .map_err(EtcdError::rpc("lease keep-alive"))?
            .into_inner();
        let mut keep_alive = KeepAlive {
            id,
            requests,
            replies,
        };
        let ttl_s = keep_alive.reply().await?;
        Ok((keep_alive, ttl_s))
    }
}

impl KeepAlive {
    /// The lease this stream renews.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Renews the lease once; returns its new TTL in seconds. `LeaseLost` when etcd no
    /// longer knows it (expired, revoked, or etcd restarted without its data).
    pub async fn keep_alive(&mut self) -> Result<i64, EtcdError> {
        self.requests
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|e| stream_ended(e.to_string()))?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<i64, EtcdError> {
        match self.replies.message().await {
            Ok(Some(reply)) if reply.ttl <= 0 => Err(EtcdError::LeaseLost { id: self.id }),
            Ok(Some(reply)) => Ok(reply.ttl),
            Ok(None) => Err(stream_ended("etcd closed it".to_string())),
            Err(status) => Err(EtcdError::Rpc {
                op: "lease keep-alive",
                status,
            }),
        }
    }
}

fn stream_ended(why: String) -> EtcdError {
    EtcdError::StreamEnded {
        op: "keep-alive",
        why,
    }
}
