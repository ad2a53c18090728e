//! Cluster mode (optional: one machine needs none of it). `docs/cluster.md` is the contract.
//!
//! A node (`unimodel serve --etcd ...`) registers itself and its models in etcd under a lease
//! and takes orders over NATS; `unimodel gateway` watches etcd and routes each request to a
//! node that serves the model. This module wraps the engine and the repository from outside:
//! nothing below it knows the cluster exists.

pub mod control;
pub mod etcd;
pub mod events;
pub mod gateway;
pub mod keys;
pub mod registry;
mod registry_actor;
pub mod registry_view;
