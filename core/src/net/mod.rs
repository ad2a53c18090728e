//! Listening sockets shared by every server (HTTP, gRPC, metrics) and by TLS in front of
//! them: `--max-connections`, one count of open connections for all listeners, enforced
//! where connections are accepted (`limit.rs`). A leaf above `telemetry`, so that `tls` and
//! `api` can both take connections from it.

mod limit;

pub use limit::{Acceptor, ConnGuard, ConnectionLimit};
