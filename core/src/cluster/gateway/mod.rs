//! `unimodel gateway`: one endpoint for the whole cluster. It watches the cluster table in
//! etcd, and sends each request to a node that has the model READY and is SERVING.
//!
//! - `table`: the table as plain state (etcd keys and values → nodes and models).
//! - `actor`: the one task that owns the table, publishes `Routes` snapshots and probes
//!   nodes taken out of rotation.
//! - `feed`: the etcd watch that feeds the actor (no polling).
//! - `node`: one node: addresses, outstanding requests, rotation flag, gRPC channel.
//! - `routes`: the snapshot requests read, and the pick (two choices, least outstanding).
//! - `forward`: REST to a node: pooled keep-alive connections, streamed bodies, retries only
//!   of what cannot have run.
//! - `rest`: the REST front end (KServe V2, health, metadata, index, `/v1` by `model`).
//! - `grpc`: the gRPC front end (`inference.GRPCInferenceService`) over per-node channels.
//! - `health`: `grpc.health.v1` (SERVING while a node serves).
//! - `metrics`: `/metrics` families of the gateway.
//! - `trace`: the `traceparent` a node gets (the gateway's span is its parent).
//! - `control`: repository load/unload and cluster drain/resume as NATS orders to nodes
//!   (`--nats`).
//! - `error`: `GatewayError`, the one place the gateway's own answers get a status.
//! - `serve`: the listeners (the serve stack's connection limits, timeouts, TLS, auth).

pub mod actor;
pub mod control;
pub mod error;
pub mod feed;
pub mod forward;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod node;
pub mod rest;
pub mod routes;
pub mod serve;
pub mod table;
mod trace;

pub use error::GatewayError;
pub use serve::{GatewaySettings, Listeners, run};
