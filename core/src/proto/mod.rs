//! The KServe V2 gRPC protocol (`proto/`, compiled by `core/build.rs`): the generated
//! messages, the server trait for `api::grpc` and the client for `bench`. A leaf: the types
//! name nothing else in the crate.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod codec;

tonic::include_proto!("inference");
