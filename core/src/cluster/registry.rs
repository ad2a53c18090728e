//! Node registration: `unimodel serve --etcd URL` puts the node and each of its models in
//! etcd under one lease (`docs/cluster.md`, "etcd key layout"), so a gateway can find them
//! and the keys vanish with the node.
//!
//! `Registration::start` spawns the actor (`registry_actor.rs`) that grants the lease, keeps
//! it alive, writes the keys (`registry_view.rs` computes them) and rewrites them when etcd
//! comes back. It follows the engine's and the repository's change events and samples the
//! load every 500 ms; nothing runs per request. When `stop` (a signal) fires, it revokes the
//! lease, so the keys are gone before the node starts draining.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::etcd::EtcdClient;
use super::keys::{NodeName, Prefix};
use super::registry_actor::Actor;
use super::registry_view::Advertised;
use crate::engine::Engine;
use crate::repository::Repository;

/// How long the exit waits for the lease revoke before leaving the keys to expire.
const REVOKE_WAIT: Duration = Duration::from_secs(2);

/// Lease TTL bounds (`--etcd-lease-ttl-s`): etcd refuses less than 1 s (it rounds up to its
/// minimum); more than an hour would keep a dead node routable for that long.
pub const MIN_LEASE_TTL_S: u64 = 1;
/// See `MIN_LEASE_TTL_S`.
pub const MAX_LEASE_TTL_S: u64 = 3600;
/// The default lease TTL.
pub const DEFAULT_LEASE_TTL_S: u64 = 10;

/// Checks an advertised URL (`http[s]://HOST[:PORT]`, nothing after it but an optional `/`)
/// and returns it without the trailing slash.
pub fn parse_advertise_url(given: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "bad advertised URL {:?}: {why} (expected http://HOST:PORT or https://HOST:PORT)",
            crate::echo::Echo(given)
        )
    };
    let uri: http::Uri = given
        .parse()
        .map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("the scheme must be http or https"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path or query is not allowed"));
    }
    Ok(given.trim_end_matches('/').to_string())
}

/// Everything the registration needs to know about the node.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The etcd client (`--etcd`).
    pub client: EtcdClient,
    /// `--etcd-prefix`.
    pub prefix: Prefix,
    /// `--node-name`, or `{hostname}-{port}`.
    pub node: NodeName,
    /// `--advertise-url`, or derived from the REST listener.
    pub rest_url: String,
    /// `--advertise-grpc-url`, or derived from the gRPC listener.
    pub grpc_url: Option<String>,
    /// `--etcd-lease-ttl-s`.
    pub lease_ttl: Duration,
}

/// The running registration; `leave` revokes its lease and waits for that.
pub struct Registration {
    stop: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

impl Registration {
    /// Starts registering the models of `engine` (and of `repository`, whose index also
    /// knows models that failed before reaching the engine) until `leave`.
    pub fn start(
        config: RegistryConfig,
        engine: Engine,
        repository: Option<Repository>,
    ) -> Registration {
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let advertised = Advertised {
            node: config.node.clone(),
            rest_url: config.rest_url.clone(),
            grpc_url: config.grpc_url.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms,
        };
        tracing::info!(
            node = %config.node,
            etcd = %config.client.endpoints().join(","),
            prefix = %config.prefix.as_str(),
            rest_url = %config.rest_url,
            grpc_url = config.grpc_url.as_deref().unwrap_or("-"),
            "registering in etcd as node {} (lease TTL {:?})",
            config.node,
            config.lease_ttl,
        );
        let (done_tx, done) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let stop_signal = async move {
            // Sent by `leave`, or dropped with the registration: both end it.
            let _ = stopped.await;
        };
        let actor = Actor::new(config, advertised, engine, repository);
        crate::telemetry::panics::spawn_monitored(
            "etcd registration",
            async move {
                actor.run(stop_signal).await;
                let _ = done_tx.send(());
            },
            |_| {
                tracing::error!(
                    "etcd registration stopped by a bug; the node keeps serving but leaves etcd when its lease expires"
                )
            },
        );
        Registration { stop, done }
    }

    /// Revokes the lease (the node's keys leave etcd at once) and waits for that, at most
    /// `REVOKE_WAIT`. Called after the drain: until then the node's key says DRAINING (the
    /// engine's drain flag), so a gateway sends it nothing new while what it already sent
    /// finishes.
    pub async fn leave(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(REVOKE_WAIT, self.done).await.is_err() {
            tracing::warn!(
                "etcd lease not revoked within {REVOKE_WAIT:?}: the node's keys expire with its lease"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_advertise_url;

    #[test]
    fn advertised_urls_are_checked_and_normalized() {
        assert_eq!(
            parse_advertise_url("http://gpu-1:8000/").unwrap(),
            "http://gpu-1:8000"
        );
        assert_eq!(
            parse_advertise_url("https://[fd00::1]:443").unwrap(),
            "https://[fd00::1]:443"
        );
        for (given, says) in [
            ("gpu-1:8000", "scheme"),
            ("tcp://gpu-1:8000", "scheme"),
            ("http://gpu-1:8000/v2", "path"),
            ("http://gpu-1:8000?x=1", "query"),
            ("", "not a URL"),
        ] {
            let err = parse_advertise_url(given).unwrap_err();
            assert!(
                err.contains(says) && err.contains("expected http://HOST:PORT"),
                "{given}: {err}"
            );
        }
    }
}
