//! HTTPS for the portal: [`load`] turns the configured PEM files into a rustls
//! [`ServerConfig`], which `listener::serve` (the one accept loop for HTTP and HTTPS) shakes
//! hands with.
//!
//! It does not decide whether to serve TLS (the configuration and the binary do) and does not
//! ask for client certificates. Only the `ring` provider is used, only TLS 1.3 and 1.2, and
//! ALPN offers only `http/1.1`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// A certificate or key file that cannot serve TLS, naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{path}`: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("`{path}`: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("`{path}`: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it")]
    NoKey { path: PathBuf },
    #[error("`{path}`: bad PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("the key in `{key}` does not match the certificate in `{cert}`: {message}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot use the certificate in `{cert}` with the key in `{key}`: {message}")]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

/// Reads the PEM certificate chain and private key and builds the server's TLS configuration:
/// the `ring` provider, TLS 1.3 and 1.2, ALPN `http/1.1`, no client certificates.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rejected = |error: rustls::Error| match error {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            message: error.to_string(),
        },
        other => TlsError::Rejected {
            cert: files.cert.clone(),
            key: files.key.clone(),
            message: other.to_string(),
        },
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rejected)?
        .with_no_client_auth()
        // Checks that the key is the certificate's (rustls' `keys_match`).
        .with_single_cert(chain, key)
        .map_err(rejected)?;
    // The agents' WebSockets upgrade HTTP/1.1 connections; HTTP/2 is not served.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(path, error))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        other => pem_error(path, other),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: error.to_string(),
    }
}
