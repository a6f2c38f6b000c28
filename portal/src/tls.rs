//! HTTPS for the portal: [`load`] turns the configured PEM files into a rustls
//! [`ServerConfig`], and [`serve`] runs an axum [`Router`] behind it on a TCP listener.
//!
//! The boundary: this module owns the TLS handshake and the HTTP/1.1 connections (hyper, with
//! upgrades so the agents' WebSockets work), and nothing above them. It does not decide whether
//! to serve TLS (the configuration and the binary do), does not route (the [`Router`] does) and
//! does not ask for client certificates. Requests reach the router exactly as under
//! `axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())`: with
//! [`ConnectInfo<SocketAddr>`](ConnectInfo) holding the TCP peer in their extensions.
//!
//! Only the `ring` provider is used, only TLS 1.3 and 1.2, and ALPN offers only `http/1.1`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::TlsFiles;

/// A peer that has not finished its TLS handshake by then is dropped, so sockets that connect
/// and say nothing cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After the shutdown signal, connections have this long to finish their requests; the ones
/// still open then are closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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

/// Serves `app` over TLS on `listener` until `shutdown` resolves.
///
/// Each connection runs in its own task: a TLS handshake bounded by [`HANDSHAKE_TIMEOUT`]
/// (a failure is logged at debug and costs only that connection), then HTTP/1.1 with upgrades.
/// When `shutdown` resolves the listener is closed, every connection is asked to finish its
/// request in flight and close (hyper's graceful shutdown), and after [`SHUTDOWN_GRACE`] the
/// ones left are dropped. Returns once every connection task has ended; the `io::Result` is
/// `axum::serve`'s shape; accept errors are logged and retried, never returned.
///
/// As under `axum::serve`, a connection upgraded to a WebSocket has left hyper: its task is
/// the router's (`WebSocketUpgrade::on_upgrade`), so shutdown neither waits for nor closes it.
/// hyper's header read timeout (30 s) is on, so a connection idle between requests is closed.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    // `true` once shutting down; each connection task watches it.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            (stream, peer) = accept(&listener) => {
                connections.spawn(connection(
                    acceptor.clone(),
                    stream,
                    peer,
                    app.clone(),
                    stopping_rx.clone(),
                ));
            }
            // Reap finished tasks so the set holds only live connections.
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                log_join(joined);
            }
        }
    }

    drop(listener);
    stopping_tx.send_replace(true);
    tracing::debug!(
        connections = connections.len(),
        "shutting down, waiting for connections"
    );
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = connections.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "connections still open after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// The next connection. Like `axum::serve`: errors about one connection are skipped, others
/// (e.g. out of file descriptors) are logged and retried after a second so the loop does not
/// spin.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                tracing::error!(%error, "accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One connection: the TLS handshake, then HTTP/1.1 until the peer closes or shutdown.
async fn connection(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    mut stopping: watch::Receiver<bool>,
) {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "tls handshake failed");
                return;
            }
            Err(_elapsed) => {
                tracing::debug!(%peer, "tls handshake timed out");
                return;
            }
        },
        // A peer still shaking hands at shutdown has no request in flight.
        () = stopped(&mut stopping) => return,
    };

    let service = service_fn(move |mut request: Request<Incoming>| {
        // What `into_make_service_with_connect_info::<SocketAddr>` gives handlers.
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request)
    });
    let mut builder = http1::Builder::new();
    // The timer turns on hyper's header read timeout (30 s by default).
    builder.timer(TokioTimer::new());
    let mut conn = pin!(
        builder
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades()
    );

    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped(&mut stopping) => {
            // Finish the request in flight, then close; an upgraded connection (a WebSocket)
            // has left hyper already and is not waited for here.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Resolves once shutdown has begun (or `serve` is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here, not across an await.
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "connection task panicked");
    }
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
