//! The servers at the sites, run on the harness's tokio runtime from sockets bound inside their
//! namespaces: the HTTPS server at 172.16.0.5 with a virtual host per name of
//! [`WEB_NAMES`], and (from `fz_host::testing::net`) the greeters that stand for TCP services.
//! The DNS servers are dnsmasq processes ([`crate::world`] starts them).

use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use fz_host::testing::WAIT;

/// The web server's virtual hosts, all on the one address.
pub const WEB_NAMES: [&str; 3] = [
    "gitlab.company.com",
    "jenkins.company.com",
    "docs.company.com",
];
/// What `GET /big` sends: enough for a throughput figure, little enough for CI.
pub const BIG_BYTES: usize = 64 << 20;

/// The web server's certificate (self-signed, naming every virtual host), PEM for `curl
/// --cacert`, and the TLS acceptor that serves it.
#[derive(Clone)]
pub struct WebTls {
    pub certificate_pem: String,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for WebTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebTls").finish_non_exhaustive()
    }
}

impl WebTls {
    pub fn generate() -> WebTls {
        let names: Vec<String> = WEB_NAMES.iter().map(|name| (*name).to_owned()).collect();
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(names).unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(signing_key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.into())
        .unwrap();
        WebTls {
            certificate_pem: cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }
}

/// HTTPS: `GET /` answers `<host> page from <peer address>` for the virtual host the client
/// named (SNI); `GET /big` sends [`BIG_BYTES`] bytes. The peer address is the masquerade of
/// the gateway that carried the connection.
pub async fn serve_web(listener: std::net::TcpListener, tls: WebTls) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = tls.acceptor.clone();
        tokio::spawn(async move {
            let Ok(Ok(mut stream)) = tokio::time::timeout(WAIT, acceptor.accept(stream)).await
            else {
                return;
            };
            let host = stream
                .get_ref()
                .1
                .server_name()
                .and_then(|name| name.split('.').next())
                .unwrap_or("nobody")
                .to_owned();
            let Some(path) = read_request_path(&mut stream).await else {
                return;
            };
            let big = path == "/big";
            let body = if big {
                String::new()
            } else {
                format!("{host} page from {}\n", peer.ip())
            };
            let length = if big { BIG_BYTES } else { body.len() };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\n\
                 Connection: close\r\n\r\n"
            );
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            if big {
                let chunk = vec![b'z'; 64 << 10];
                for _ in 0..BIG_BYTES / chunk.len() {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            } else if stream.write_all(body.as_bytes()).await.is_err() {
                return;
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// The path of an HTTP request, once its head has arrived (within [`WAIT`]).
async fn read_request_path(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    let read_head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            if request.len() > 16_384 {
                return false;
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(length) => request.extend_from_slice(&buffer[..length]),
            }
        }
        true
    };
    if !tokio::time::timeout(WAIT, read_head).await.ok()? {
        return None;
    }
    let head = String::from_utf8_lossy(&request);
    let mut words = head.split_whitespace();
    (words.next() == Some("GET")).then(|| words.next().unwrap_or("/").to_owned())
}

/// What an edge site's bulk server ([`pour`]) sends on every connection.
pub const POUR_BYTES: usize = 16 << 20;

/// The port of an edge site's bulk server.
pub const POUR_PORT: u16 = 9000;

/// Sends [`POUR_BYTES`] bytes to everyone who connects, then closes: a throughput figure
/// through whatever path lies between.
pub async fn pour(listener: std::net::TcpListener) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let chunk = vec![0u8; 64 << 10];
            let mut left = POUR_BYTES;
            while left > 0 {
                let n = left.min(chunk.len());
                if stream.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// Connects from the calling thread's namespace to a [`pour`] server at `to` and reads all
/// it sends: bytes per second from the connection's start.
pub fn drink(to: std::net::SocketAddr) -> std::io::Result<f64> {
    use std::io::Read as _;
    let started = std::time::Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&to, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut buffer = vec![0u8; 64 << 10];
    let mut total = 0usize;
    loop {
        match stream.read(&mut buffer)? {
            0 => break,
            n => total += n,
        }
    }
    if total != POUR_BYTES {
        return Err(std::io::Error::other(format!(
            "{total} of {POUR_BYTES} bytes came"
        )));
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
