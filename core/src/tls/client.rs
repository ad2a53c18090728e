//! The client side, for `unimodel bench` against an `https://` server: trust the CA in
//! `--cacert` (there is no system store to fall back on) and, for servers that require client
//! certificates, present `--cert` with `--key`.

use super::{TlsError, pem, provider};
use rustls::{ClientConfig, RootCertStore};
use std::path::PathBuf;

/// The client's certificate files.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// PEM: the CAs the server's certificate must chain to.
    pub cacert: Option<PathBuf>,
    /// PEM: the client's certificate (chain), for mTLS.
    pub cert: Option<PathBuf>,
    /// PEM: its private key.
    pub key: Option<PathBuf>,
}

/// A rustls client config offering `alpn`; `--cacert` is required.
pub fn client_config(files: &ClientTlsFiles, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let Some(cacert) = &files.cacert else {
        return Err(TlsError::Config(
            "an https:// URL needs --cacert FILE: the PEM CA certificate that signed the server's certificate (the system store is not read)".into(),
        ));
    };
    let mut roots = RootCertStore::empty();
    for (i, cert) in pem::certificates("--cacert", cacert)?
        .into_iter()
        .enumerate()
    {
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            flag: "--cacert",
            path: cacert.clone(),
            detail: format!("certificate {} of the file: {e}", i + 1),
        })?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = pem::certificates("--cert", cert)?;
            let key_der = pem::private_key("--key", key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        TlsError::KeyMismatch {
                            cert_flag: "--cert",
                            cert: cert.clone(),
                            key_flag: "--key",
                            key: key.clone(),
                        }
                    }
                    e => TlsError::BadKey {
                        flag: "--key",
                        path: key.clone(),
                        detail: e.to_string(),
                    },
                })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "--cert and --key go together: give both (client certificate and its key) or neither".into(),
            ));
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
