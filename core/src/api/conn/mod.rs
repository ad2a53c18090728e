//! The connections of every listener (HTTP, gRPC, metrics), guarded so that no client can
//! hold the server's descriptors hostage (issue 15, item 3):
//!
//! - `crate::net`: `--max-connections`, shared by all listeners (and TLS in front of them).
//!   Past it a new connection is accepted and closed at once, and counted; the open ones keep
//!   working. The cap is kept below `RLIMIT_NOFILE` by a reserve (`cli/fd_limit.rs`), so
//!   workers can always restart.
//! - `io`: `Conn`, a connection's stream with its place under the limit and a kill switch.
//! - `watch`: per connection, the header-read and idle timeouts (`--header-read-timeout-ms`,
//!   `--idle-connection-timeout-ms`): a watchdog closes a connection whose request head does
//!   not arrive in time, or that has had no request for too long; `TrackLayer` tells it when
//!   requests start and end.
//! - `body`: `--body-read-timeout-ms`, a deadline on each request body (408, then close).
//! - `serve`: the HTTP server loop (hyper-util) over plain or TLS connections, with graceful
//!   shutdown; gRPC keeps tonic's loop and gets `Conn`s from `grpc_incoming`.
//! - `shards`: threads with a single-threaded runtime each that serve the connections the
//!   loop hands them (the gateway's REST port: no cross-thread wake-ups per request).

mod body;
mod io;
mod serve;
mod shards;
mod watch;

pub use crate::net::{Acceptor, ConnGuard, ConnectionLimit};
pub use body::limit_body_time;
pub use io::Conn;
pub use serve::{HttpIncoming, serve_http, serve_http_on};
pub use shards::{Placement, Shards};
pub use watch::{ConnRegistry, GrpcConns, TrackLayer};

use std::time::Duration;

/// The timeouts every connection gets (`--header-read-timeout-ms`, `--body-read-timeout-ms`,
/// `--idle-connection-timeout-ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// From accept (or the end of the previous request, on HTTP/1.1 once a byte of the next
    /// one arrives) to a complete request head.
    pub header_read: Duration,
    /// From a request's head to the last byte of its body.
    pub body_read: Duration,
    /// With no request running, how long a connection may stay open.
    pub idle: Duration,
}

impl Default for ConnTimeouts {
    fn default() -> Self {
        ConnTimeouts {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(60),
            idle: Duration::from_secs(120),
        }
    }
}

impl ConnTimeouts {
    /// The longest a connection's watchdog sleeps between looks (`watch`): any deadline a
    /// request sets is at least this far ahead, so none needs to wake it.
    pub fn recheck(&self) -> Duration {
        self.header_read.min(self.idle)
    }
}

/// Everything a listener needs to guard its connections.
#[derive(Clone, Debug)]
pub struct Guard {
    pub limit: ConnectionLimit,
    pub timeouts: ConnTimeouts,
}
