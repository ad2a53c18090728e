//! A small etcd v3 client of our own: leases, put/delete/range by prefix, and watches, over
//! tonic with the messages generated from `proto/etcd/` by `core/build.rs`.
//!
//! Why not the `etcd-client` crate: its build script runs a system `protoc`, and the README's
//! first command (`cargo build`) must work on a fresh machine with no protobuf compiler
//! installed. Our protos are compiled by `protox` (pure Rust), so we compile etcd's the same
//! way and keep only the calls cluster mode makes.
//!
//! - `endpoints`: `--etcd URL[,URL...]` parsing and one lazy, self-reconnecting channel.
//! - `client`: `EtcdClient` (put with a lease, delete, get, range by prefix).
//! - `lease`: grant, the keep-alive stream, revoke.
//! - `watch`: watch a prefix from a revision.
//! - `error`: `EtcdError`, the one error type.

mod client;
mod endpoints;
mod error;
mod lease;
pub mod pb;
mod watch;

pub use client::{Entry, EtcdClient, Snapshot, prefix_end};
pub use endpoints::{DEFAULT_ETCD_PORT, parse_endpoints};
pub use error::EtcdError;
pub use lease::{KeepAlive, Lease};
pub use watch::{Watch, WatchBatch, WatchEvent};
