//! The servers' TLS settings (`--tls-cert-file`, `--tls-key-file`, `--tls-client-ca-file`).
//!
//! Everything is read and checked in `ServerTlsFiles::load`, before any worker starts: an
//! unreadable file, a file without a certificate or key, a key that does not belong to the
//! certificate, an unusable client CA. The result holds one rustls config per listener kind
//! (HTTP offers ALPN `h2` and `http/1.1`, gRPC only `h2`) behind a `watch`, so `reload` (on
//! SIGHUP) swaps them for the next handshakes without touching open connections.

use super::{TlsError, pem, provider};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const CERT_FLAG: &str = "--tls-cert-file";
const KEY_FLAG: &str = "--tls-key-file";
const CLIENT_CA_FLAG: &str = "--tls-client-ca-file";

/// Which listener a handshake is for: it decides the ALPN protocols offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// The HTTP port: REST, HTTP/1.1 or HTTP/2.
    Http,
    /// The gRPC port: HTTP/2 only.
    Grpc,
    /// `--metrics-port`: like HTTP.
    Metrics,
}

impl ListenerKind {
    /// The `listener` label of the handshake failure metric.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Http => "http",
            ListenerKind::Grpc => "grpc",
            ListenerKind::Metrics => "metrics",
        }
    }
}

/// Where the server's certificate, key and (for client certificates) CA are.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    /// PEM: the server's certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, RSA or EC).
    pub key: PathBuf,
    /// PEM: the CAs client certificates must chain to; with it, a client without a valid
    /// certificate fails the handshake.
    pub client_ca: Option<PathBuf>,
    /// How long a client may take to complete its handshake.
    pub handshake_timeout: Duration,
}

impl ServerTlsFiles {
    /// Reads and checks every file.
    pub fn load(self) -> Result<ServerTls, TlsError> {
        let configs = Configs::build(&self)?;
        let (current, _) = watch::channel(Arc::new(configs));
        Ok(ServerTls {
            files: self,
            current,
        })
    }
}

/// The loaded TLS settings of a server.
#[derive(Debug)]
pub struct ServerTls {
    files: ServerTlsFiles,
    current: watch::Sender<Arc<Configs>>,
}

impl ServerTls {
    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// What one listener needs to accept TLS connections; `failures` counts its failed and
    /// timed-out handshakes.
    pub fn handshake(
        &self,
        kind: ListenerKind,
        failures: Option<crate::telemetry::metrics::HandshakeFailures>,
    ) -> super::Handshake {
        super::Handshake {
            kind,
            configs: self.current.subscribe(),
            timeout: self.files.handshake_timeout,
            failures,
        }
    }

    /// Reads the files again; on success, new handshakes use them (open connections keep
    /// theirs). On failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = Configs::build(&self.files)?;
        self.current.send_replace(Arc::new(configs));
        Ok(())
    }
}

/// One rustls config per ALPN set.
#[derive(Debug)]
pub(super) struct Configs {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
}

impl Configs {
    pub(super) fn for_kind(&self, kind: ListenerKind) -> Arc<ServerConfig> {
        match kind {
            ListenerKind::Http | ListenerKind::Metrics => Arc::clone(&self.http),
            ListenerKind::Grpc => Arc::clone(&self.grpc),
        }
    }

    fn build(files: &ServerTlsFiles) -> Result<Configs, TlsError> {
        let provider = provider();
        let chain = pem::certificates(CERT_FLAG, &files.cert)?;
        let key = pem::private_key(KEY_FLAG, &files.key)?;
        // Loaded once here only to tell a bad key apart from a key of another certificate.
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::BadKey {
                flag: KEY_FLAG,
                path: files.key.clone(),
                detail: e.to_string(),
            })?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &files.client_ca {
            Some(ca) => builder.with_client_cert_verifier(client_verifier(ca)?),
            None => builder.with_no_client_auth(),
        };
        let mut http = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert_flag: CERT_FLAG,
                    cert: files.cert.clone(),
                    key_flag: KEY_FLAG,
                    key: files.key.clone(),
                }
            }
            e => TlsError::BadCertificate {
                flag: CERT_FLAG,
                path: files.cert.clone(),
                detail: e.to_string(),
            },
        })?;
        let mut grpc = http.clone();
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Configs {
            http: Arc::new(http),
            grpc: Arc::new(grpc),
        })
    }
}

/// Requires a client certificate that chains to a CA in `path`.
fn client_verifier(path: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in pem::certificates(CLIENT_CA_FLAG, path)?
        .into_iter()
        .enumerate()
    {
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            flag: CLIENT_CA_FLAG,
            path: path.to_path_buf(),
            detail: format!("certificate {} of the file: {e}", i + 1),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("{CLIENT_CA_FLAG} '{}': {e}", path.display())))
}
