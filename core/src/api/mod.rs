//! Network front ends: KServe V2 over HTTP (axum) and gRPC (tonic). Parses and encodes; the
//! engine serves.
//!
//! Two sibling front ends over shared pieces; neither names the other (checked by
//! `core/tests/layering.rs`):
//! - `grpc`: the gRPC service, its server and conversions (see its module doc).
//! - `http`: the router, its handlers and `serve` (graceful shutdown).
//!
//! Shared by both:
//! - `input`: the one input decoder (protocol-neutral descriptions of inputs and outputs).
//! - `contents`: typed tensor contents (gRPC's `InferTensorContents`, also what JSON decodes to).
//! - `model_config`: Triton's `ModelConfig`, as a message (gRPC) and as JSON (REST).
//! - `backend`: the `Backend` trait the routes call; `engine::Engine` implements it.
//! - `request`: KServe V2 infer request → `engine::InferRequest` (JSON and binary data).
//! - `response`: `engine::InferResponse` → HTTP response (JSON or binary data).
//! - `json_data`: the typed `data` field codec (no `serde_json::Value` trees).
//! - `nonfinite`: NaN and the infinities in JSON, read and written as Triton does.
//! - `binary`: Triton's binary tensor data framing.
//! - `body_budget`: the global budget for buffered request bodies (`--max-buffered-bytes`).
//! - `openai`: the OpenAI-compatible API under `/v1` (HTTP only).
//! - `generate`: the generate extension (`/generate`, `/generate_stream` over SSE).
//! - `metadata`: server/model metadata and statistics bodies.
//! - `auth`: the auth middleware of the REST routes, and `AuthGate` (shared with gRPC).
//! - `error`: `ApiError`, the one place errors become statuses.
//! - `body_limit`: 413 for a declared `Content-Length` over the limit, before any read.
//! - `compression`: gzip/deflate request and response bodies on every route.
//! - `observe`: per-request span, `traceparent`, access log line.
//! - `openapi`: the OpenAPI document (`/openapi.json`) and its offline page (`/docs`).
//! - `outcome`: the `outcome` metric label of each error, next to its status.
//! - `metrics`: `GET /metrics` and per-request recording.
//! - `shm`: the system (and, unsupported, CUDA) shared-memory routes.
//! - `conn`: every listener's connections: `--max-connections`, header/body/idle timeouts,
//!   and the HTTP server loop.

pub mod auth;
pub mod backend;
pub mod binary;
pub mod body_budget;
mod body_limit;
mod compression;
pub mod conn;
pub mod contents;
pub mod error;
pub mod generate;
pub mod grpc;
pub mod hold_body;
pub mod http;
pub mod input;
pub mod json_data;
pub mod metadata;
pub mod metrics;
pub mod model_config;
pub mod nonfinite;
pub mod observe;
pub mod openai;
pub mod openapi;
mod outcome;
pub mod request;
pub mod response;
pub mod shm;

#[cfg(test)]
mod http_tests;

pub use backend::Backend;
pub use error::ApiError;
pub use http::{HttpConfig, router, serve};
