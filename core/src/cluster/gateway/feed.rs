//! The feed of the table actor: the etcd watch of the cluster prefix. It reads every key
//! under the prefix once (a `Reset`), then watches from the next revision and turns each
//! event into a `Put` or `Delete`; when the watch breaks (etcd restarted, unreachable), it
//! reconnects with back-off and starts again with a fresh `Reset`, while the actor keeps
//! routing by the last table it had.

use super::table::{Kv, Update};
use crate::cluster::etcd::{Entry, EtcdClient, EtcdError, WatchEvent};
use crate::cluster::keys::Prefix;
use std::time::Duration;
use tokio::sync::mpsc;

/// First wait before watching again after the watch broke; doubled up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Updates the actor has not applied yet; a full queue makes the watch wait (etcd keeps
/// the events), never drops one.
pub const FEED_QUEUE: usize = 1024;

/// A feed channel: the watch sends, the actor receives.
pub fn channel() -> (mpsc::Sender<Update>, mpsc::Receiver<Update>) {
    mpsc::channel(FEED_QUEUE)
}

/// Starts the etcd watch of `prefix` on `endpoints` (`--etcd`, `--etcd-prefix`), feeding
/// `tx` until the actor is gone. Fails at once on a malformed endpoint or prefix; etcd
/// itself may be down (the watch keeps trying).
pub fn watch_etcd(endpoints: &str, prefix: &str, tx: mpsc::Sender<Update>) -> anyhow::Result<()> {
    let client = EtcdClient::from_list(endpoints)?;
    let prefix = Prefix::parse(prefix)?;
    tokio::spawn(run(client, prefix, tx));
    Ok(())
}

/// Watches until the actor is gone, starting again after every break.
async fn run(client: EtcdClient, prefix: Prefix, tx: mpsc::Sender<Update>) {
    let mut wait = RETRY_FIRST;
    loop {
        match watch_once(&client, &prefix, &tx, &mut wait).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(
                    "etcd watch of {} broke ({e}); routing by the last known table, watching again in {wait:?}",
                    prefix.as_str()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

/// One read of the prefix, then its changes until the watch breaks (`Err`) or the actor is
/// gone (`Ok`).
async fn watch_once(
    client: &EtcdClient,
    prefix: &Prefix,
    tx: &mpsc::Sender<Update>,
    wait: &mut Duration,
) -> Result<(), EtcdError> {
    let all = prefix.all();
    let snapshot = client.get_prefix(&all).await?;
    let kvs = snapshot
        .entries
        .into_iter()
        .map(|e| kv(prefix, e))
        .collect();
    tracing::debug!(revision = snapshot.revision, "cluster table read from etcd");
    if tx.send(Update::Reset(kvs)).await.is_err() {
        return Ok(());
    }
    let mut watch = client.watch_prefix(&all, snapshot.revision + 1).await?;
    // Connected and read: the next break starts its back-off from the beginning.
    *wait = RETRY_FIRST;
    loop {
        let batch = watch.next().await?;
        for event in batch.events {
            let update = match event {
                WatchEvent::Put(entry) => Update::Put(kv(prefix, entry)),
                WatchEvent::Delete { key, .. } => Update::Delete(relative(prefix, &key)),
            };
            if tx.send(update).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A key without the prefix (`nodes/a`, `models/m/a`).
fn relative(prefix: &Prefix, key: &str) -> String {
    key.strip_prefix(prefix.as_str())
        .unwrap_or(key)
        .trim_start_matches('/')
        .to_string()
}

fn kv(prefix: &Prefix, e: Entry) -> Kv {
    Kv {
        key: relative(prefix, &e.key),
        value: e.value,
        revision: e.mod_revision,
    }
}
