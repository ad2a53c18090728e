//! `--etcd URL[,URL...]`: parsing the endpoint list and opening one gRPC channel over it.
//!
//! The channel is lazy: it connects on first use and reconnects by itself, so a node started
//! before etcd (or outliving an etcd restart) needs no special path. With several endpoints,
//! tonic balances over those that connect; an endpoint that is down is retried in the
//! background while the others serve.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::EtcdError;
use crate::echo::Echo;

/// The port etcd clients use when the URL names none.
pub const DEFAULT_ETCD_PORT: u16 = 2379;

/// How long one connection attempt may take before the call fails as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a unary call (put, range, lease grant) may wait for etcd's answer. Streams are
/// not cut by it: the deadline covers the call until its response headers.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings on an idle connection, so a watch or keep-alive stream on a dead peer (a
/// partition, a SIGSTOPped etcd) fails within seconds instead of hanging.
const PING_INTERVAL: Duration = Duration::from_secs(3);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Parses `http://HOST:PORT[,http://HOST:PORT...]` into normalized endpoint URLs
/// (`http://HOST:PORT`, the port defaulting to 2379). Only `http` is accepted: the client has
/// no TLS to etcd yet, and a URL it would silently misuse is worse than an error at start.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, EtcdError> {
    let mut out = Vec::new();
    for given in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(parse_endpoint(given)?);
    }
    if out.is_empty() {
        return Err(EtcdError::NoEndpoint);
    }
    Ok(out)
}

fn parse_endpoint(given: &str) -> Result<String, EtcdError> {
    // `user:password@` would be dropped without a word (the client has no etcd auth yet),
    // and echoing it would print the password: refuse it and name only the host part.
    if let Some((_, after)) = given
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
    {
        return Err(EtcdError::BadEndpoint {
            given: format!("…@{}", Echo(after)),
            why: "credentials in the URL are not supported (no etcd authentication yet)"
                .to_string(),
        });
    }
    let bad = |why: &str| EtcdError::BadEndpoint {
        given: Echo(given).to_string(),
        why: why.to_string(),
    };
    let uri: http::Uri = given
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("https is not supported (no TLS to etcd yet)")),
        Some(other) => return Err(bad(&format!("scheme {:?} is not http", Echo(other)))),
        None => return Err(bad("no scheme")),
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path or query is not allowed"));
    }
    let port = uri.port_u16().unwrap_or(DEFAULT_ETCD_PORT);
    Ok(format!("http://{host}:{port}"))
}

/// One lazy channel balanced over `endpoints` (from `parse_endpoints`).
pub(super) fn channel(endpoints: &[String]) -> Result<Channel, EtcdError> {
    let mut list = Vec::with_capacity(endpoints.len());
    for url in endpoints {
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| EtcdError::BadEndpoint {
                given: Echo(url).to_string(),
                why: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .http2_keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        list.push(endpoint);
    }
    match list.len() {
        0 => Err(EtcdError::NoEndpoint),
        // One endpoint needs no balancer (and its errors stay the connection's own).
        1 => Ok(list.remove(0).connect_lazy()),
        _ => Ok(Channel::balance_list(list.into_iter())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        let got =
            parse_endpoints("http://127.0.0.1:2379, http://etcd-1 ,http://[::1]:3000/").unwrap();
        assert_eq!(
            got,
            [
                "http://127.0.0.1:2379",
                "http://etcd-1:2379",
                "http://[::1]:3000"
            ]
        );
    }

    #[test]
    fn bad_endpoints_say_what_is_wrong() {
        for (given, says) in [
            ("", "no etcd endpoint"),
            (" , ", "no etcd endpoint"),
            ("127.0.0.1:2379", "no scheme"),
            ("etcd", "no scheme"),
            ("https://etcd:2379", "https is not supported"),
            ("nats://etcd:4222", "is not http"),
            ("http://etcd:2379/v3", "path"),
            ("http://", "not a URL"),
            ("http://root:s3cret@etcd:2379", "credentials in the URL"),
        ] {
            let err = parse_endpoints(given).unwrap_err().to_string();
            assert!(err.contains(says), "{given:?}: {err}");
            assert!(
                err.contains("expected http://HOST:PORT"),
                "{given:?}: {err}"
            );
            assert!(!err.contains("s3cret"), "the password is echoed: {err}");
        }
    }
}
