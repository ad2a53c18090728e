//! The registration actor: the one owner of this node's lease and of what it wrote to etcd.
//!
//! 1. Register: grant a lease, open its keep-alive stream, write the node key and every
//!    model key under it, then revoke the lease of a lost session (its leftovers go).
//! 2. Serve: renew every TTL/3; on an engine or repository change event, re-read the model
//!    rows and write what changed beyond load at once; every 500 ms write the keys whose
//!    load changed; delete the keys of models that are gone.
//! 3. On any etcd error (unreachable, lease lost): warn (once, then every 30 s while it
//!    lasts), keep serving, retry registering (0.5 s, 1 s, then every 2 s); when it works,
//!    the new lease carries every key again.
//! 4. On stop: revoke the lease, so every key vanishes at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::etcd::{EtcdError, KeepAlive};
use super::keys::{ModelValue, NodeState, NodeValue};
use super::registry::RegistryConfig;
use super::registry_view::{Advertised, differs_beyond_load, model_values, rows_from_engine};
use crate::engine::Engine;
use crate::repository::{IndexEntry, Repository};

/// How often load is written at most (and only when it changed).
const LOAD_EVERY: Duration = Duration::from_millis(500);
/// How often a continuing outage is logged again.
const OUTAGE_WARN_EVERY: Duration = Duration::from_secs(30);
/// Retry delays while etcd is unreachable; the last repeats.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
/// How long the revoke at stop may take (the exit waits a little longer, `registry.rs`).
const REVOKE_TIMEOUT: Duration = Duration::from_millis(1500);

/// One lease and what was written under it.
struct Session {
    lease: i64,
    keep_alive: KeepAlive,
    node: Option<NodeValue>,
    models: BTreeMap<String, ModelValue>,
}

/// An ongoing etcd outage, for the warnings.
struct Outage {
    since: Instant,
    attempts: u32,
    warned: Instant,
}

/// What woke the actor.
enum Wake {
    Stop,
    Renew,
    Changed,
    Load,
}

pub(super) struct Actor {
    config: RegistryConfig,
    advertised: Advertised,
    engine: Engine,
    repository: Option<Repository>,
    engine_changes: Option<watch::Receiver<()>>,
    repository_changes: Option<watch::Receiver<()>>,
    /// The model rows as of the last change event (load is sampled separately).
    rows: Vec<IndexEntry>,
    session: Option<Session>,
    /// The lease of a lost session, revoked once a new one carries the keys.
    stale_lease: Option<i64>,
    outage: Option<Outage>,
}

impl Actor {
    pub(super) fn new(
        config: RegistryConfig,
        advertised: Advertised,
        engine: Engine,
        repository: Option<Repository>,
    ) -> Actor {
        Actor {
            engine_changes: Some(engine.changes()),
            repository_changes: repository.as_ref().map(Repository::changes),
            config,
            advertised,
            engine,
            repository,
            rows: Vec::new(),
            session: None,
            stale_lease: None,
            outage: None,
        }
    }

    pub(super) async fn run(mut self, stop: impl Future<Output = ()>) {
        let mut stop = pin!(stop);
        let mut renew =
            tokio::time::interval((self.config.lease_ttl / 3).max(Duration::from_millis(100)));
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut load = tokio::time::interval(LOAD_EVERY);
        load.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.session.is_none() {
                let registered = tokio::select! {
                    biased;
                    () = &mut stop => break,
                    registered = self.register() => registered,
                };
                match registered {
                    Ok(session) => self.registered(session),
                    Err(e) => {
                        self.failed(&e);
                        let delay = self.retry_delay();
                        tokio::select! {
                            biased;
                            () = &mut stop => break,
                            () = tokio::time::sleep(delay) => continue,
                        }
                    }
                }
                renew.reset();
            }
            let wake = tokio::select! {
                biased;
                () = &mut stop => Wake::Stop,
                _ = renew.tick() => Wake::Renew,
                () = changed(&mut self.engine_changes) => Wake::Changed,
                () = changed(&mut self.repository_changes) => Wake::Changed,
                _ = load.tick() => Wake::Load,
            };
            let result = match wake {
                Wake::Stop => break,
                Wake::Renew => self.renew().await,
                Wake::Changed => {
                    self.refresh_rows().await;
                    self.sync(false).await
                }
                Wake::Load => self.sync(true).await,
            };
            if let Err(e) = result {
                self.lost(&e);
            }
        }
        self.leave().await;
    }

    /// Grants a lease and writes every key under it.
    async fn register(&mut self) -> Result<Session, EtcdError> {
        // A clone shares the channel; it frees `self` for the writes below.
        let client = self.config.client.clone();
        let ttl_s = i64::try_from(self.config.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl_s).await?;
        let keep_alive = match client.lease_keep_alive(lease.id).await {
            Ok((keep_alive, _)) => keep_alive,
            Err(e) => {
                let _ = client.lease_revoke(lease.id).await;
                return Err(e);
            }
        };
        self.warn_if_name_taken(&client).await;
        self.session = Some(Session {
            lease: lease.id,
            keep_alive,
            node: None,
            models: BTreeMap::new(),
        });
        self.refresh_rows().await;
        if let Err(e) = self.sync(true).await {
            // Whatever was written goes with the lease (now, or at its TTL).
            if let Some(session) = self.session.take() {
                let _ = client.lease_revoke(session.lease).await;
            }
            return Err(e);
        }
        if let Some(stale) = self.stale_lease.take() {
            // Keys the new session rewrote moved to its lease; what is left are keys of
            // models gone meanwhile. etcd may have dropped the lease already (NotFound).
            let _ = client.lease_revoke(stale).await;
        }
        self.session
            .take()
            .ok_or(EtcdError::LeaseLost { id: lease.id })
    }

    /// Node names must be unique: a node key held by a lease that is not ours means another
    /// node uses the name (or this node's previous run, until its lease expires).
    async fn warn_if_name_taken(&self, client: &super::etcd::EtcdClient) {
        let key = self.config.prefix.node(&self.advertised.node);
        let Ok(Some(entry)) = client.get(&key).await else {
            return;
        };
        if entry.lease != 0 && Some(entry.lease) != self.stale_lease {
            tracing::warn!(
                node = %self.advertised.node,
                "another node is registered as {} (lease {:x}), or this node's previous run whose lease has not expired yet: node names must be unique in a cluster (--node-name); taking the name over",
                self.advertised.node,
                entry.lease,
            );
        }
    }

    fn registered(&mut self, session: Session) {
        let models = session.models.len();
        match self.outage.take() {
            Some(outage) => tracing::info!(
                node = %self.advertised.node,
                "etcd is back: re-registered after {:.1?} ({} attempts) under a new lease, {models} model key(s) rewritten",
                outage.since.elapsed(),
                outage.attempts,
            ),
            None => tracing::info!(
                node = %self.advertised.node,
                lease = %format!("{:x}", session.lease),
                "registered in etcd with {models} model key(s)"
            ),
        }
        self.session = Some(session);
    }

    /// A failed registration attempt: warn at the first, then every `OUTAGE_WARN_EVERY`.
    fn failed(&mut self, e: &EtcdError) {
        let now = Instant::now();
        let endpoints = self.config.client.endpoints().join(",");
        match &mut self.outage {
            None => {
                tracing::warn!(
                    "cannot register in etcd at {endpoints}: {e}; the node keeps serving and retries"
                );
                self.outage = Some(Outage {
                    since: now,
                    attempts: 1,
                    warned: now,
                });
            }
            Some(outage) => {
                outage.attempts += 1;
                if now.duration_since(outage.warned) >= OUTAGE_WARN_EVERY {
                    tracing::warn!(
                        "etcd at {endpoints} still unreachable after {:.0?} ({} attempts): {e}; the node keeps serving",
                        now.duration_since(outage.since),
                        outage.attempts,
                    );
                    outage.warned = now;
                }
            }
        }
    }

    /// The registration broke (etcd gone, lease lost): start over under a new lease.
    fn lost(&mut self, e: &EtcdError) {
        if let Some(session) = self.session.take() {
            self.stale_lease = Some(session.lease);
        }
        let now = Instant::now();
        tracing::warn!(
            node = %self.advertised.node,
            "lost the etcd registration: {e}; the node keeps serving and re-registers when etcd answers"
        );
        self.outage = Some(Outage {
            since: now,
            attempts: 0,
            warned: now,
        });
    }

    fn retry_delay(&self) -> Duration {
        let attempts = self.outage.as_ref().map_or(0, |o| o.attempts as usize);
        RETRY_DELAYS[attempts.saturating_sub(1).min(RETRY_DELAYS.len() - 1)]
    }

    /// Renews the lease once, within a third of its TTL (a hung etcd counts as gone).
    async fn renew(&mut self) -> Result<(), EtcdError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let limit = (self.config.lease_ttl / 3).max(Duration::from_secs(1));
        match tokio::time::timeout(limit, session.keep_alive.keep_alive()).await {
            Ok(Ok(_ttl)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EtcdError::StreamEnded {
                op: "keep-alive",
                why: format!("no answer within {limit:?}"),
            }),
        }
    }

    /// Re-reads the model rows (on a change event; kept as they were if the repository is
    /// shutting down).
    async fn refresh_rows(&mut self) {
        match &self.repository {
            Some(repository) => {
                if let Ok(rows) = repository.index(false).await {
                    self.rows = rows;
                }
            }
            None => self.rows = rows_from_engine(&self.engine.models()),
        }
    }

    /// Writes what differs from what the session wrote: the node value, model values
    /// that changed beyond load (with `with_load`, any change), and deletes the keys of
    /// models no longer listed.
    async fn sync(&mut self, with_load: bool) -> Result<(), EtcdError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let client = &self.config.client;
        let prefix = &self.config.prefix;
        let node = &self.advertised.node;
        let state = if self.engine.is_draining() {
            NodeState::Draining
        } else {
            NodeState::Serving
        };
        let node_value = self.advertised.node_value(state);
        if session.node.as_ref() != Some(&node_value) {
            client
                .put(&prefix.node(node), json(&node_value), session.lease)
                .await?;
            session.node = Some(node_value);
        }
        // An operator's drains (NATS control) plug in here: node-wide -> every READY model
        // DRAINING, per model -> that model; until they exist, nothing is drained.
        let values = model_values(node, &self.rows, &self.engine.loads(), &|_| false);
        let mut listed = Vec::with_capacity(values.len());
        for value in values {
            let key = prefix.model_on(&value.model, node);
            let write = match session.models.get(&key) {
                None => true,
                Some(old) if with_load => *old != value,
                Some(old) => differs_beyond_load(old, &value),
            };
            if write {
                client.put(&key, json(&value), session.lease).await?;
                session.models.insert(key.clone(), value);
            }
            listed.push(key);
        }
        let gone: Vec<String> = session
            .models
            .keys()
            .filter(|k| !listed.contains(k))
            .cloned()
            .collect();
        for key in gone {
            client.delete(&key).await?;
            session.models.remove(&key);
        }
        Ok(())
    }

    /// Revokes the lease (every key vanishes) before the node drains and exits.
    async fn leave(&mut self) {
        let client = &self.config.client;
        let leases: Vec<i64> = self
            .session
            .take()
            .map(|s| s.lease)
            .into_iter()
            .chain(self.stale_lease.take())
            .collect();
        for lease in leases {
            match tokio::time::timeout(REVOKE_TIMEOUT, client.lease_revoke(lease)).await {
                Ok(Ok(())) => tracing::info!(
                    node = %self.advertised.node,
                    "left etcd: lease revoked, the node's keys are gone"
                ),
                Ok(Err(e)) => {
                    tracing::warn!("cannot revoke the etcd lease ({e}): the keys expire with it")
                }
                Err(_) => tracing::warn!(
                    "etcd did not answer the lease revoke within {REVOKE_TIMEOUT:?}: the keys expire with the lease"
                ),
            }
        }
    }
}

/// The next change on `rx`; never, once its sender is gone (the engine or the repository
/// stopped), so a closed channel cannot spin the loop.
async fn changed(rx: &mut Option<watch::Receiver<()>>) {
    if let Some(receiver) = rx {
        if receiver.changed().await.is_ok() {
            return;
        }
        *rx = None;
    }
    std::future::pending::<()>().await;
}

/// A value as JSON. The values are plain structs of strings, numbers and lists, which
/// serde_json always encodes; an impossible failure writes `{}` rather than panicking.
fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}
