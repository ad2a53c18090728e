//! TLS with rustls and the `ring` crypto provider, for the servers and for `unimodel bench`.
//!
//! - `server`: `--tls-cert-file`, `--tls-key-file`, `--tls-client-ca-file` read and checked
//!   at start-up (every mistake is a `TlsError` naming the flag, the file and what was wrong),
//!   turned into one rustls `ServerConfig` per listener kind (ALPN differs), reloadable.
//! - `incoming`: the accept side: handshakes run concurrently, each under a deadline, so a
//!   client that fails or stalls its handshake never holds up another connection.
//! - `client`: the bench's side (`--cacert`, `--cert`, `--key`).
//! - `error`: `TlsError`.
//!
//! One provider for the whole process: `ring` (aws-lc-rs needs cmake and a long build). It is
//! passed explicitly to every config built here, and `install_crypto_provider` also makes it
//! the process default, for the configs tonic builds itself (the bench's gRPC client).

mod client;
mod error;
mod incoming;
mod pem;
mod server;

pub use client::{ClientTlsFiles, client_config};
pub use error::TlsError;
pub use incoming::{Handshake, TlsIncoming, TlsPeer};
pub use server::{ListenerKind, ServerTls, ServerTlsFiles};

use rustls::crypto::CryptoProvider;
use std::sync::Arc;

/// The crypto provider every TLS config of the process uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes `ring` the process-wide default provider (idempotent).
pub fn install_crypto_provider() {
    // Err means a default is already installed; it can only be ring, the one compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests;
