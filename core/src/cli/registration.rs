//! `--etcd`: the node's registration (`cluster::registry`), configured from the cluster
//! flags and the ports actually bound. At SIGTERM the node's key turns DRAINING (the
//! engine's drain flag) and the lease is revoked only after the drain (`Registration::leave`),
//! so a gateway stops sending new work at once and lets what it sent finish.

use super::args::ClusterArgs;
use super::server::Listening;
use crate::cluster::etcd::EtcdClient;
use crate::cluster::keys::{NodeName, Prefix};
use crate::cluster::registry::{Registration, RegistryConfig};
use crate::engine::Engine;
use crate::repository::Repository;
use anyhow::Context as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Starts registering when `--etcd` is given; `None` without it.
pub fn start(
    args: &ClusterArgs,
    listening: &Listening,
    engine: &Engine,
    repository: Option<&Repository>,
) -> anyhow::Result<Option<Registration>> {
    let Some(etcd) = &args.etcd else {
        return Ok(None);
    };
    let config = config(args, etcd, listening)?;
    Ok(Some(Registration::start(
        config,
        engine.clone(),
        repository.cloned(),
    )))
}

fn config(args: &ClusterArgs, etcd: &str, listening: &Listening) -> anyhow::Result<RegistryConfig> {
    let client = EtcdClient::from_list(etcd).context("--etcd")?;
    let prefix = Prefix::parse(&args.etcd_prefix).context("--etcd-prefix")?;
    let hostname = hostname();
    let node = match &args.node_name {
        Some(name) => NodeName::parse(name).context("--node-name")?,
        None => NodeName::from_host_port(&hostname, listening.http_addr.port()),
    };
    let scheme = if listening.tls_on() { "https" } else { "http" };
    let rest_url = match &args.advertise_url {
        Some(url) => url.clone(),
        None => advertised(scheme, listening.http_addr, &hostname),
    };
    let grpc_url = match (&args.advertise_grpc_url, &args.advertise_url) {
        (Some(url), _) => url.clone(),
        (None, Some(rest)) => with_port(rest, listening.grpc_addr.port()),
        (None, None) => advertised(scheme, listening.grpc_addr, &hostname),
    };
    Ok(RegistryConfig {
        client,
        prefix,
        node,
        rest_url,
        grpc_url: Some(grpc_url),
        lease_ttl: Duration::from_secs(args.etcd_lease_ttl_s),
    })
}

/// `scheme://HOST:PORT` of a bound address: its IP, or the machine's hostname when it
/// listens on every address (0.0.0.0 or ::), which no other machine can dial.
fn advertised(scheme: &str, addr: SocketAddr, hostname: &str) -> String {
    let port = addr.port();
    match addr.ip() {
        ip if ip.is_unspecified() => format!("{scheme}://{hostname}:{port}"),
        IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
        IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
    }
}

/// `url` (a checked `--advertise-url`) with its port replaced by `port`: the gRPC URL
/// of a node whose REST URL was given, at the same host.
fn with_port(url: &str, port: u16) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("http");
            let host = uri.host().unwrap_or_default();
            format!("{scheme}://{host}:{port}")
        }
        Err(_) => url.to_string(),
    }
}

/// The machine's hostname ("localhost" if it cannot be read, with a warning).
fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) if !name.is_empty() => name.to_string_lossy().into_owned(),
        Ok(_) | Err(_) => {
            tracing::warn!(
                "cannot read the hostname; using \"localhost\" for the node name and advertised URLs"
            );
            "localhost".to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{advertised, with_port};

    #[test]
    fn advertised_urls_use_the_bound_address_or_the_hostname() {
        let at = |s: &str| s.parse().unwrap();
        assert_eq!(
            advertised("http", at("127.0.0.1:8000"), "h"),
            "http://127.0.0.1:8000"
        );
        assert_eq!(
            advertised("https", at("0.0.0.0:8001"), "gpu-1"),
            "https://gpu-1:8001"
        );
        assert_eq!(
            advertised("http", at("[::]:80"), "gpu-1"),
            "http://gpu-1:80"
        );
        assert_eq!(advertised("http", at("[::1]:80"), "h"), "http://[::1]:80");
    }

    #[test]
    fn the_grpc_url_follows_a_given_rest_url() {
        assert_eq!(
            with_port("http://gpu-1.lan:8000", 8001),
            "http://gpu-1.lan:8001"
        );
        assert_eq!(
            with_port("https://gpu-1.lan", 9001),
            "https://gpu-1.lan:9001"
        );
        assert_eq!(with_port("http://[fd00::1]:80", 81), "http://[fd00::1]:81");
    }
}
