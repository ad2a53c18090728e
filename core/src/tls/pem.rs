//! Reading certificates and keys from PEM files, with errors that name the flag and file.

use super::TlsError;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// Every certificate in `path` (other blocks, such as a key in a combined file, are skipped);
/// at least one.
pub fn certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in `path`: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn private_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            flag,
            path: path.to_path_buf(),
        },
        e => pem_error(flag, path, e),
    })
}

fn pem_error(flag: &'static str, path: &Path, e: pem::Error) -> TlsError {
    let path = path.to_path_buf();
    match e {
        pem::Error::Io(source) => TlsError::Read { flag, path, source },
        pem::Error::NoItemsFound => TlsError::NoCertificate { flag, path },
        e => TlsError::Pem {
            flag,
            path,
            detail: e.to_string(),
        },
    }
}
