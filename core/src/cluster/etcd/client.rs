//! `EtcdClient`: the few etcd v3 calls cluster mode needs (put with a lease, delete, range by
//! prefix), over one lazy channel. Cheap to clone: every clone shares the connection.

use tonic::transport::Channel;

use super::pb::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, kv_client::KvClient, lease_client::LeaseClient,
    watch_client::WatchClient,
};
use super::{EtcdError, endpoints};

/// A key and its value as etcd holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key (etcd keys are bytes; ours are UTF-8, anything else is shown lossily).
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

impl From<super::pb::mvccpb::KeyValue> for Entry {
    fn from(kv: super::pb::mvccpb::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: kv.value,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

/// Every key under a prefix, and the store revision they were read at (watch from
/// `revision + 1` to miss nothing after the read).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The keys, in key order.
    pub entries: Vec<Entry>,
    /// The store revision of the read.
    pub revision: i64,
}

/// A client of one etcd cluster (any of its endpoints).
#[derive(Clone, Debug)]
pub struct EtcdClient {
    pub(super) kv: KvClient<Channel>,
    pub(super) lease: LeaseClient<Channel>,
    pub(super) watch: WatchClient<Channel>,
    endpoints: Vec<String>,
}

impl EtcdClient {
    /// A client of `endpoints` (normalized by `endpoints::parse_endpoints`). Connects lazily:
    /// this succeeds while etcd is down, and each call fails `Unavailable` until it is up.
    pub fn new(endpoints: Vec<String>) -> Result<Self, EtcdError> {
        let channel = endpoints::channel(&endpoints)?;
        Ok(Self {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
            endpoints,
        })
    }

    /// Parses `--etcd URL[,URL...]` and makes a client of it.
    pub fn from_list(list: &str) -> Result<Self, EtcdError> {
        Self::new(endpoints::parse_endpoints(list)?)
    }

    /// The endpoints, for log lines.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sets `key` to `value`, attached to `lease` (0: no lease). Returns the new revision.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64, EtcdError> {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        };
        let reply = self
            .kv
            .clone()
            .put(request)
            .await
            .map_err(EtcdError::rpc("put"))?;
        Ok(reply.into_inner().header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`. Returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let reply = self
            .kv
            .clone()
            .delete_range(request)
            .await
            .map_err(EtcdError::rpc("delete"))?;
        Ok(reply.into_inner().deleted)
    }

    /// Deletes every key under `prefix`. Returns how many were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64, EtcdError> {
        let request = DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        let reply = self
            .kv
            .clone()
            .delete_range(request)
            .await
            .map_err(EtcdError::rpc("delete"))?;
        Ok(reply.into_inner().deleted)
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, EtcdError> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let reply = self
            .kv
            .clone()
            .range(request)
            .await
            .map_err(EtcdError::rpc("get"))?;
        Ok(reply.into_inner().kvs.into_iter().next().map(Entry::from))
    }

    /// Every key under `prefix`, with the revision of the read.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Snapshot, EtcdError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        let reply = self
            .kv
            .clone()
            .range(request)
            .await
            .map_err(EtcdError::rpc("range"))?;
        let reply = reply.into_inner();
        Ok(Snapshot {
            revision: reply.header.map_or(0, |h| h.revision),
            entries: reply.kvs.into_iter().map(Entry::from).collect(),
        })
    }
}

/// The end of the key range that holds every key starting with `prefix`: the prefix with its
/// last byte below 0xff incremented (etcd's own rule); `[0]` (every key) for an all-0xff
/// or empty prefix.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/unimodel/"), b"/unimodel0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }
}
