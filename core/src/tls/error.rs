//! Why a TLS file could not be used. Each variant names the flag and the file, so the
//! start-up error tells the operator which file to fix and what is expected in it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} '{}': cannot read the file: {source}", .path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} '{}' is not valid PEM: {detail}", .path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "{flag} '{}' holds no certificate (expected PEM '-----BEGIN CERTIFICATE-----' blocks; for a certificate chain, the leaf first, then its intermediates)",
        .path.display()
    )]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error(
        "{flag} '{}' holds no private key (expected a PEM block 'BEGIN PRIVATE KEY' (PKCS#8, RSA or EC), 'BEGIN RSA PRIVATE KEY' or 'BEGIN EC PRIVATE KEY')",
        .path.display()
    )]
    NoKey { flag: &'static str, path: PathBuf },
    #[error("{flag} '{}': the private key cannot be used: {detail}", .path.display())]
    BadKey {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "{key_flag} '{}' does not belong to the certificate in {cert_flag} '{}' (their public keys differ)",
        .key.display(),
        .cert.display()
    )]
    KeyMismatch {
        cert_flag: &'static str,
        cert: PathBuf,
        key_flag: &'static str,
        key: PathBuf,
    },
    #[error("{flag} '{}': the certificate cannot be used: {detail}", .path.display())]
    BadCertificate {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}
