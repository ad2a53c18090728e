//! Watching a key prefix from a revision: one bidirectional stream per watch, its events in
//! the order etcd applied them. Read the prefix first (`get_prefix`), then watch from the
//! read's revision + 1, and no change is missed or seen twice.

use futures::SinkExt;
use futures::channel::mpsc;

use super::client::{Entry, prefix_end};
use super::pb::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_request::RequestUnion,
};
use super::pb::mvccpb::event::EventType;
use super::{EtcdClient, EtcdError};

/// One change under the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or changed.
    Put(Entry),
    /// A key was deleted (or its lease ended).
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

/// The changes of one etcd response (one or more revisions), in order.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    /// The events.
    pub events: Vec<WatchEvent>,
    /// The store revision when etcd sent them.
    pub revision: i64,
}

/// An open watch. Dropping it closes the stream (etcd then cancels the watch).
#[derive(Debug)]
pub struct Watch {
    // Held so the request side stays open: closing it ends the watch.
    _requests: mpsc::Sender<WatchRequest>,
    replies: tonic::Streaming<WatchResponse>,
}

impl EtcdClient {
    /// Watches every key under `prefix` from `start_revision` (0: from now on).
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let (mut requests, receiver) = mpsc::channel(1);
        let create = WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            start_revision,
            ..Default::default()
        };
        // Queued before the call: etcd sends its response headers with its first reply.
        requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            })
            .await
            .map_err(|e| ended(e.to_string()))?;
        let replies = self
            .watch
            .clone()
            .watch(receiver)
            .await
            .map_err(EtcdError::rpc("watch"))?
            .into_inner();
        Ok(Watch {
            _requests: requests,
            replies,
        })
    }
}

impl Watch {
    /// The next batch of changes. Errors end the watch: `Compacted` means re-read the prefix
    /// and watch again from the read; anything else means etcd went away.
    pub async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        loop {
            let reply = match self.replies.message().await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Err(ended("etcd closed it".to_string())),
                Err(status) => {
                    return Err(EtcdError::Rpc {
                        op: "watch",
                        status,
                    });
                }
            };
            if reply.compact_revision > 0 {
                return Err(EtcdError::Compacted {
                    compact_revision: reply.compact_revision,
                });
            }
            if reply.canceled {
                return Err(ended(format!("etcd cancelled it: {}", reply.cancel_reason)));
            }
            if reply.events.is_empty() {
                // The `created` confirmation or a progress notice: nothing changed.
                continue;
            }
            let revision = reply.header.map_or(0, |h| h.revision);
            let events = reply.events.into_iter().filter_map(event).collect();
            return Ok(WatchBatch { events, revision });
        }
    }
}

fn event(event: super::pb::mvccpb::Event) -> Option<WatchEvent> {
    let kv = event.kv?;
    match EventType::try_from(event.r#type) {
        Ok(EventType::Put) => Some(WatchEvent::Put(Entry::from(kv))),
        Ok(EventType::Delete) => Some(WatchEvent::Delete {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            mod_revision: kv.mod_revision,
        }),
        Err(_) => None,
    }
}

fn ended(why: String) -> EtcdError {
    EtcdError::StreamEnded { op: "watch", why }
}
