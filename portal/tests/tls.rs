//! HTTPS with rustls: `tls::load` reads the PEM files and names the one that is wrong;
//! `listener::serve` with TLS answers HTTPS and WebSockets on a real loopback socket, hands handlers the
//! peer address, outlives clients that do not speak TLS, drops sockets that never shake hands,
//! and shuts down gracefully.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::routing::get;
use axum::{Extension, response::Response};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use fz_portal::config::{ConnectionLimits, TlsFiles};
use fz_portal::listener::{self, Caps, Connections, Settings};
use fz_portal::tls;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn https_answers_and_hands_handlers_the_peer_address() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let (mut stream, local) = connect(server.addr, &pki, Versions::Default).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, body) = request(&mut stream, "/healthz").await;
    assert_eq!((status.as_str(), body.as_str()), ("200", "ok"));

    let (mut stream, local_again) = connect(server.addr, &pki, Versions::Default).await;
    assert_ne!(local, local_again);
    let (status, body) = request(&mut stream, "/peer").await;
    assert_eq!(status, "200");
    assert_eq!(body, local_again.to_string());

    server.stop().await;
}

#[tokio::test]
async fn tls_1_2_is_still_served() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let (mut stream, _) = connect(server.addr, &pki, Versions::Tls12Only).await;
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (status, body) = request(&mut stream, "/healthz").await;
    assert_eq!((status.as_str(), body.as_str()), ("200", "ok"));

    server.stop().await;
}

#[tokio::test]
async fn websockets_upgrade_over_tls() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let (stream, _) = connect(server.addr, &pki, Versions::Default).await;
    let (mut socket, response) = tokio_tungstenite::client_async("wss://localhost/ws", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    socket.send(Message::text("hello")).await.unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed, Message::text("hello"));
    socket.close(None).await.unwrap();

    server.stop().await;
}

#[tokio::test]
async fn the_portal_serves_its_agents_over_wss_when_given_a_certificate() {
    let pki = Pki::new();
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("access.fz"),
        "site hq\nresource db { address \"10.0.5.0/24\"; site hq }\nallow everyone -> db\n",
    )
    .unwrap();
    // Not loopback, no `allow_plain_http`: accepted only because TLS is configured.
    let text = format!(
        "listen = \"0.0.0.0:0\"\ndata_dir = \"data\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [[accounts]]\nslug = \"acme\"\npolicy = \".\"\n",
        pki.files.cert.display(),
        pki.files.key.display()
    );
    let config = fz_portal::config::Config::parse(&text, home.path()).unwrap();
    let portal =
        fz_portal::server::RunningPortal::start(&config, fz_portal::broker::system_clock())
            .await
            .unwrap();
    let address = SocketAddr::from(([127, 0, 0, 1], portal.address.port()));
    let now = chrono::Utc::now().timestamp();
    let token = portal
        .broker
        .store()
        .create_token(
            "acme",
            fz_portal::store::TokenKind::Client {
                user: "alice@example.com".into(),
                provider: None,
            },
            "laptop",
            now + 3600,
            now,
        )
        .await
        .unwrap();

    let (mut stream, _) = connect(address, &pki, Versions::Default).await;
    let (status, _) = request(&mut stream, "/healthz").await;
    assert_eq!(status, "200");
    let (stream, _) = connect(address, &pki, Versions::Default).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            "wss://localhost/api/acme/client",
        )
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token.secret).parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let hello = fz_proto::encode(&fz_proto::ClientMessage::Hello {
        public_key: fz_proto::PublicKey([1; 32]),
        endpoints: vec![],
    });
    socket.send(Message::text(hello)).await.unwrap();
    let Some(Ok(Message::Text(ready))) = socket.next().await else {
        panic!("no answer over wss");
    };
    let ready: fz_proto::PortalToClient = fz_proto::decode(ready.as_bytes()).unwrap();
    assert!(
        matches!(ready, fz_proto::PortalToClient::Ready(_)),
        "{ready:?}"
    );
    drop(socket);
    portal.stop().await.unwrap();
}

#[tokio::test]
async fn plain_http_gets_no_answer_and_the_server_goes_on() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    // The server closes (at most after a TLS alert); a reset is as good as a close.
    match plain.read_to_end(&mut reply).await {
        Ok(_) => assert!(
            !reply.starts_with(b"HTTP/"),
            "plain HTTP got an HTTP answer: {:?}",
            String::from_utf8_lossy(&reply)
        ),
        Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
    }

    let (mut stream, _) = connect(server.addr, &pki, Versions::Default).await;
    let (status, body) = request(&mut stream, "/healthz").await;
    assert_eq!((status.as_str(), body.as_str()), ("200", "ok"));

    server.stop().await;
}

/// The clock is paused: it jumps ahead whenever every task waits, so the timeout passes at once.
#[tokio::test(start_paused = true)]
async fn a_socket_that_never_shakes_hands_is_dropped_after_the_timeout() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut byte = [0_u8; 1];
    let mut read = pin!(silent.read(&mut byte));
    // The clock may jump before the server has accepted the socket (and so before its
    // handshake timer exists): a guard that fires is retried, a few times at most.
    let read = async {
        for _ in 0..3 {
            if let Ok(read) = tokio::time::timeout(2 * handshake_timeout(), &mut read).await {
                return read;
            }
        }
        panic!("the silent socket is still open");
    }
    .await;
    match read {
        Ok(read) => assert_eq!(read, 0, "the server sent something to a silent peer"),
        Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
    }
    assert!(started.elapsed() >= handshake_timeout());

    server.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_serve_returns() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let (mut stream, _) = connect(server.addr, &pki, Versions::Default).await;
    let in_flight = tokio::spawn(async move { request(&mut stream, "/slow").await });
    server.slow.entered.notified().await;

    // On this single-threaded runtime `serve` has closed the listener and told every
    // connection to finish by the time the shutdown future's completion is seen here.
    server.stop.send(()).unwrap();
    server.shutdown_seen.await.unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());

    server.slow.release.notify_one();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status.as_str(), body.as_str()), ("200", "done"));
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_closes_connections_still_busy_after_the_grace_period() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;

    let (mut stream, _) = connect(server.addr, &pki, Versions::Default).await;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    server.slow.entered.notified().await;

    // From here the clock jumps ahead whenever every task waits; `/slow` is never released.
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    server.stop.send(()).unwrap();
    tokio::time::timeout(2 * listener::SHUTDOWN_GRACE, server.task)
        .await
        .expect("serve waits past its grace period")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= listener::SHUTDOWN_GRACE);

    let mut reply = Vec::new();
    // Closed without a response (and without close_notify: an unexpected EOF).
    let _ = stream.read_to_end(&mut reply).await;
    assert!(reply.is_empty(), "{:?}", String::from_utf8_lossy(&reply));
}

#[test]
fn load_accepts_pkcs8_and_sec1_keys_and_one_file_with_both() {
    let pki = Pki::new();
    tls::load(&pki.files).unwrap();

    let sec1 = pki.write(
        "sec1.key",
        &pem("EC PRIVATE KEY", &pkcs8_to_sec1(&pki.key_der)),
    );
    tls::load(&TlsFiles {
        cert: pki.files.cert.clone(),
        key: sec1,
    })
    .unwrap();

    let both = std::fs::read_to_string(&pki.files.cert).unwrap()
        + &std::fs::read_to_string(&pki.files.key).unwrap();
    let both = pki.write("both.pem", &both);
    tls::load(&TlsFiles {
        cert: both.clone(),
        key: both,
    })
    .unwrap();
}

#[test]
fn load_names_the_file_that_is_wrong() {
    let pki = Pki::new();
    let cert = pki.files.cert.clone();
    let key = pki.files.key.clone();
    let missing = pki.dir.path().join("missing.pem");
    let cert_text = std::fs::read_to_string(&cert).unwrap();
    let key_text = std::fs::read_to_string(&key).unwrap();
    let only_key = pki.write("only-key.pem", &key_text);
    let only_cert = pki.write("only-cert.pem", &cert_text);
    let other_key = pki.write(
        "other.key",
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let broken = pki.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );

    // (certificate file, key file, the error's variant, the files its message names)
    let cases: [(&Path, &Path, &str, &[&Path]); 6] = [
        (&missing, &key, "Read", &[&missing]),
        (&cert, &missing, "Read", &[&missing]),
        (&only_key, &key, "NoCertificate", &[&only_key]),
        (&cert, &only_cert, "NoKey", &[&only_cert]),
        (&broken, &key, "Pem", &[&broken]),
        (&cert, &other_key, "KeyMismatch", &[&cert, &other_key]),
    ];
    for (cert, key, variant, named) in cases {
        let files = TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
        let error = tls::load(&files).unwrap_err();
        assert!(
            format!("{error:?}").starts_with(variant),
            "{files:?}: expected {variant}, got {error:?}"
        );
        let message = error.to_string();
        for path in named {
            let path = format!("`{}`", path.display());
            assert!(message.contains(&path), "`{message}` does not name {path}");
        }
    }
}

fn handshake_timeout() -> std::time::Duration {
    ConnectionLimits::default().tls_handshake_timeout
}

/// A self-signed certificate for `localhost` and 127.0.0.1, its PEM files in a tempdir.
struct Pki {
    dir: tempfile::TempDir,
    files: TlsFiles,
    cert: CertificateDer<'static>,
    /// The key, PKCS#8 DER.
    key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("portal.crt"),
            key: dir.path().join("portal.key"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, signing_key.serialize_pem()).unwrap();
        Self {
            dir,
            files,
            cert: cert.der().clone(),
            key_der: signing_key.serialize_der(),
        }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

/// `listener::serve` with TLS on a loopback port with `/healthz`, `/peer` (the `ConnectInfo` address),
/// `/ws` (a WebSocket echo) and `/slow` (answers once released).
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    shutdown_seen: oneshot::Receiver<()>,
    slow: Arc<Gate>,
    task: JoinHandle<io::Result<()>>,
}

#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

impl Server {
    async fn start(pki: &Pki) -> Self {
        let config = tls::load(&pki.files).unwrap();
        let slow = Arc::new(Gate::default());
        let gate = Arc::clone(&slow);
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/peer", get(peer))
            .route("/ws", get(echo))
            .route(
                "/slow",
                get(move || async move {
                    gate.entered.notify_one();
                    gate.release.notified().await;
                    "done"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let (seen, shutdown_seen) = oneshot::channel();
        let shutdown = async move {
            let _ = stopped.await;
            let _ = seen.send(());
        };
        let settings = Settings::new(Some(config), ConnectionLimits::default());
        let connections = Connections::new(Caps {
            unauthenticated: 64,
            per_source: 64,
            agents: 64,
        });
        let task = tokio::spawn(listener::serve(
            listener,
            app,
            settings,
            connections,
            shutdown,
        ));
        Self {
            addr,
            stop,
            shutdown_seen,
            slow,
            task,
        }
    }

    /// Triggers shutdown and checks that `serve` returns.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Reads the peer the way the portal's handlers do.
async fn peer(connect_info: Option<Extension<ConnectInfo<SocketAddr>>>) -> String {
    match connect_info {
        Some(Extension(ConnectInfo(peer))) => peer.to_string(),
        None => "none".to_owned(),
    }
}

async fn echo(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            if socket.send(message).await.is_err() {
                break;
            }
        }
    })
}

enum Versions {
    Default,
    Tls12Only,
}

/// A TLS client that trusts only the test certificate; returns the stream and its local
/// address.
async fn connect(
    server: SocketAddr,
    pki: &Pki,
    versions: Versions,
) -> (TlsStream<TcpStream>, SocketAddr) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.cert.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ));
    let builder = match versions {
        Versions::Default => builder.with_safe_default_protocol_versions(),
        Versions::Tls12Only => builder.with_protocol_versions(&[&rustls::version::TLS12]),
    };
    let mut config = builder
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(server).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    (stream, local)
}

/// One HTTP/1.1 GET written by hand; returns the status code and the body.
async fn request(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    path: &str,
) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().to_owned();
    (status, body.to_owned())
}

/// The SEC1 `ECPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (the contents of its
/// `privateKey` octet string).
fn pkcs8_to_sec1(pkcs8: &[u8]) -> Vec<u8> {
    let (tag, info, _) = der_element(pkcs8);
    assert_eq!(tag, 0x30);
    let rest = der_skip(info); // version
    let rest = der_skip(rest); // privateKeyAlgorithm
    let (tag, private_key, _) = der_element(rest);
    assert_eq!(tag, 0x04);
    private_key.to_vec()
}

fn der_skip(der: &[u8]) -> &[u8] {
    der_element(der).2
}

/// Splits one DER element off `der`: its tag, its contents and what follows.
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let (length, header) = match der[1] {
        short @ 0..=0x7f => (usize::from(short), 2),
        0x81 => (usize::from(der[2]), 3),
        0x82 => (usize::from(u16::from_be_bytes([der[2], der[3]])), 4),
        other => panic!("unexpected DER length byte {other:#x}"),
    };
    let (contents, rest) = der[header..].split_at(length);
    (der[0], contents, rest)
}

fn pem(label: &str, der: &[u8]) -> String {
    let base64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in base64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}
