//! UniModel: serve Python model plugins with a Rust core.
//!
//! - `api`: HTTP front end (KServe V2 REST, binary tensor extension), error → status mapping.
//! - `auth`: API keys, JWT, roles, rate limits and audit events (checked by `api`).
//! - `engine`: model registry, bounded queues, dynamic batcher, instance scheduling.
//! - `repository`: many models: a model repository directory, versions, load and unload.
//! - `worker`: supervised Python worker processes, shared-memory arenas, control channel.
//! - `telemetry`: logging (text or JSON), spans, W3C trace context, OTLP export, and the
//!   Prometheus metrics behind `/metrics`.
//! - `regions`: clients' system shared-memory regions (register, status, unregister).
//! - `tls`: TLS for the listeners (rustls with ring) and the bench's client side.
//! - `net`: accepting connections under `--max-connections` (shared by every listener).
//! - `cluster`: etcd registration, NATS control and the gateway (`docs/cluster.md`).
//! - `llm`: LLM serving: text (tokenizers, chat templates, detokenization, stops) and the
//!   continuous-batching scheduler's policy and KV bookkeeping, as plain data.
//! - `cli`: the `unimodel` commands (`run`, `serve`, `predict`, `bench`).
//! - `bench`: `unimodel bench`, the load generator (an HTTP client of any KServe V2 server).
//! - `heap`: the binary's global allocator (mimalloc), with optional live-heap accounting.
//! - `echo`: bounded echoes of client-supplied values in error messages.
//! - `tensor`: tensor types, the BYTES codec, where bytes live (`Storage`, client segments).
//! - `proto`: the generated KServe V2 gRPC messages, server trait and client.
//!
//! Dependencies point one way, leaves first (`core/tests/layering.rs` holds the table and
//! fails on any `crate::` path against it):
//!
//! ```text
//! tensor, proto, heap, echo         leaves
//! auth -> telemetry, echo
//! telemetry -> heap;  net -> telemetry;  tls -> telemetry, net
//! worker -> tensor, telemetry
//! llm -> tensor, worker, telemetry
//! engine -> worker, llm, tensor, telemetry, echo   (its LLM scheduler drives `llm`)
//! regions -> worker, tensor;  repository -> engine, echo
//! api -> engine, repository, regions, auth, tls, net, telemetry, tensor, proto, echo
//!        (REST and gRPC inside it are siblings: neither names the other)
//! bench -> tensor, proto, tls        (a client: it knows no server module)
//! cluster -> api, engine, repository, auth, tls, net, telemetry, tensor, proto, echo
//! cli -> everything (the commands wire the layers together)
//! ```

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod echo;
pub mod engine;
pub mod heap;
pub mod llm;
pub mod net;
pub mod proto;
pub mod regions;
pub mod repository;
pub mod telemetry;
pub mod tensor;
pub mod tls;
pub mod worker;
