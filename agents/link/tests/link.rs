//! The portal link (as a gateway's) against a WebSocket server on loopback: it says hello with the
//! bearer token, passes `ready` (a client's put together from its pages) and later messages on, heartbeats, sends what it is given,
//! comes back after the server drops it, and gives up only when the token is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use futures_util::{SinkExt as _, StreamExt as _};
use fz_link::{GatewayRole, LinkEvent, PortalConfig};
use fz_proto::{GatewayMessage, PortalToGateway, PublicKey, decode, encode};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

const TOKEN: &str = "fzt_secret";

fn config(port: u16) -> PortalConfig {
    PortalConfig {
        urls: vec![format!("ws://127.0.0.1:{port}")],
        account: "acme".into(),
        token: TOKEN.into(),
        ca_file: None,
        socket_mark: None,
    }
}

fn hello() -> GatewayMessage {
    GatewayMessage::Hello {
        public_key: PublicKey([5; 32]),
        endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
    }
}

fn ready(interval_ms: u64) -> PortalToGateway {
    PortalToGateway::Ready {
        gateway_id: "gw-1".into(),
        heartbeat_interval_ms: interval_ms,
        grants: vec![],
    }
}

/// Accepts one WebSocket whose request is for acme's gateway socket with the right token;
/// answers 401 otherwise.
async fn accept(listener: &TcpListener) -> Option<WebSocketStream<TcpStream>> {
    accept_at(listener, "/api/acme/gateway").await
}

async fn accept_at(listener: &TcpListener, path: &str) -> Option<WebSocketStream<TcpStream>> {
    let (tcp, _) = listener.accept().await.unwrap();
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let authorised = request.uri().path() == path
            && request
                .headers()
                .get("authorization")
                .is_some_and(|v| v == format!("Bearer {TOKEN}").as_str());
        if authorised {
            Ok(response)
        } else {
            let mut refusal = ErrorResponse::new(Some("unknown token".into()));
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refusal)
        }
    };
    tokio_tungstenite::accept_hdr_async(tcp, check).await.ok()
}

async fn receive(socket: &mut WebSocketStream<TcpStream>) -> GatewayMessage {
    loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => return decode(text.as_bytes()).unwrap(),
            _ => continue,
        }
    }
}

async fn say(socket: &mut WebSocketStream<TcpStream>, message: &PortalToGateway) {
    socket
        .send(Message::Text(encode(message).into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_link_says_hello_heartbeats_passes_messages_and_comes_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (to_portal, mut events) = fz_link::spawn::<GatewayRole>(config(port), hello()).unwrap();

    let mut socket = accept(&listener).await.unwrap();
    assert_eq!(receive(&mut socket).await, hello());
    say(&mut socket, &ready(100)).await;
    match events.recv().await.unwrap() {
        LinkEvent::Message(message) => assert_eq!(message, ready(100)),
        other => panic!("expected ready, got {other:?}"),
    }
    // Heartbeats at the interval the portal asked for, and what the loop sends goes out.
    assert_eq!(receive(&mut socket).await, GatewayMessage::Heartbeat);
    let ack = GatewayMessage::Ack {
        grant_id: "gr-1".into(),
        resolved: None,
    };
    to_portal.send(ack.clone()).unwrap();
    loop {
        match receive(&mut socket).await {
            GatewayMessage::Heartbeat => continue,
            message => {
                assert_eq!(message, ack);
                break;
            }
        }
    }
    let revoke = PortalToGateway::Revoke {
        grant_id: "gr-1".into(),
    };
    say(&mut socket, &revoke).await;
    match events.recv().await.unwrap() {
        LinkEvent::Message(message) => assert_eq!(message, revoke),
        other => panic!("expected the revocation, got {other:?}"),
    }

    // The portal goes away: the loop hears of it, and the link comes back by itself with a
    // new hello.
    drop(socket);
    assert!(matches!(events.recv().await.unwrap(), LinkEvent::Down(_)));
    let mut socket = accept(&listener).await.unwrap();
    assert_eq!(receive(&mut socket).await, hello());
    say(&mut socket, &ready(10_000)).await;
    assert!(matches!(
        events.recv().await.unwrap(),
        LinkEvent::Message(PortalToGateway::Ready { .. })
    ));
}

#[tokio::test]
async fn a_client_link_uses_the_client_socket_and_passes_ready_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hello = fz_proto::ClientMessage::Hello {
        public_key: PublicKey([6; 32]),
        endpoints: vec![],
    };
    let (to_portal, mut events) =
        fz_link::spawn::<fz_link::ClientRole>(config(port), hello.clone()).unwrap();
    let mut socket = accept_at(&listener, "/api/acme/client").await.unwrap();
    let said = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => {
                break decode::<fz_proto::ClientMessage>(text.as_bytes()).unwrap();
            }
            _ => continue,
        }
    };
    assert_eq!(said, hello);
    // A ready with more resources than a page holds, sent in pages as the portal sends it:
    // the client hears one ready with all of them.
    let ready = fz_proto::ClientReady {
        client_id: "c-1".into(),
        tunnel_ipv4: "100.64.0.2".parse().unwrap(),
        tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
        resources: (0..200)
            .map(|i| fz_proto::ResourceView {
                id: format!("resource-{i}"),
                address: format!("10.{}.{}.0/24", i / 256, i % 256),
            })
            .collect(),
        more: false,
    };
    let pages = ready.clone().into_pages();
    assert!(pages.len() > 2);
    for page in &pages {
        socket
            .send(Message::Text(encode(page).into()))
            .await
            .unwrap();
    }
    match events.recv().await.unwrap() {
        LinkEvent::Message(message) => {
            assert_eq!(message, fz_proto::PortalToClient::Ready(Box::new(ready)));
        }
        other => panic!("expected ready, got {other:?}"),
    }
    // The first thing the client says after ready is what its loop sends: no heartbeat.
    let request = fz_proto::ClientMessage::RequestAccess {
        resource: "db".into(),
        dns: None,
        avoid: vec![],
    };
    to_portal.send(request.clone()).unwrap();
    let next = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => {
                break decode::<fz_proto::ClientMessage>(text.as_bytes()).unwrap();
            }
            _ => continue,
        }
    };
    assert_eq!(next, request);
}

#[tokio::test]
async fn a_refused_token_stops_the_link() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut wrong = config(port);
    wrong.token = "fzt_revoked".into();
    let (_to_portal, mut events) = fz_link::spawn::<GatewayRole>(wrong, hello()).unwrap();
    assert!(accept(&listener).await.is_none());
    match events.recv().await.unwrap() {
        LinkEvent::Refused(reason) => {
            assert!(reason.contains("401"), "{reason}");
            assert!(reason.contains("unknown token"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The link has stopped: its channel closes.
    assert!(events.recv().await.is_none());
}

#[tokio::test]
async fn over_wss_the_link_trusts_the_ca_it_is_given_and_no_other() {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("portal-ca.pem");
    std::fs::write(&ca_file, cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();

    // Pinned CA: the handshake completes and the portal hears hello.
    let mut trusted = config(port);
    trusted.urls = vec![format!("wss://localhost:{port}")];
    trusted.ca_file = Some(ca_file);
    let (_to_portal, mut events) = fz_link::spawn::<GatewayRole>(trusted.clone(), hello()).unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let tls = acceptor.accept(tcp).await.unwrap();
    let mut socket = tokio_tungstenite::accept_async(tls).await.unwrap();
    let first = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => break decode::<GatewayMessage>(text.as_bytes()).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(first, hello());
    socket
        .send(Message::Text(encode(&ready(10_000)).into()))
        .await
        .unwrap();
    assert!(matches!(
        events.recv().await.unwrap(),
        LinkEvent::Message(PortalToGateway::Ready { .. })
    ));

    // Without the CA, the same server is refused at the TLS handshake.
    let mut untrusted = trusted;
    untrusted.ca_file = None;
    let (_to_portal, mut events) = fz_link::spawn::<GatewayRole>(untrusted, hello()).unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(acceptor.accept(tcp).await.is_err());
    match events.recv().await.unwrap() {
        LinkEvent::Down(reason) => {
            assert!(reason.starts_with("TLS with the portal failed"), "{reason}")
        }
        other => panic!("expected the TLS failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_portal_url_is_an_error_before_anything_starts() {
    for url in ["http://portal:80", "ws://portal:80/api", "portal", "wss://"] {
        let mut bad = config(1);
        // A bad URL anywhere in the list, even after a good one.
        bad.urls.push(url.into());
        let error = fz_link::spawn::<GatewayRole>(bad, hello())
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!("the portal URL `{url}` is not `ws://host[:port]` or `wss://host[:port]`")
        );
    }
}

#[tokio::test]
async fn of_several_replicas_the_link_reaches_one_that_answers_and_moves_on_when_it_goes() {
    // Three replicas: one that refuses connections (gone), two that answer. An attempt that
    // failed is never followed by one at the same replica, so the link finds one that
    // answers, and when that one goes, the other.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_port = gone.local_addr().unwrap().port();
    drop(gone);
    let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut replicas = config(gone_port);
    for listener in [&first, &second] {
        let port = listener.local_addr().unwrap().port();
        replicas.urls.push(format!("ws://127.0.0.1:{port}"));
    }
    let (_to_portal, mut events) = fz_link::spawn::<GatewayRole>(replicas, hello()).unwrap();

    // Whichever answering replica it reached first, it says hello there.
    let (mut socket, served_by_first) = tokio::select! {
        socket = accept(&first) => (socket.unwrap(), true),
        socket = accept(&second) => (socket.unwrap(), false),
    };
    assert_eq!(receive(&mut socket).await, hello());
    say(&mut socket, &ready(60_000)).await;
    loop {
        match events.recv().await.unwrap() {
            LinkEvent::Message(PortalToGateway::Ready { .. }) => break,
            // The gone replica, if it was tried first.
            LinkEvent::Down(_) => continue,
            other => panic!("expected ready, got {other:?}"),
        }
    }
    // That replica goes away, listener and all: the link comes back at the other one (after
    // the first gone one, perhaps, and the one that just went).
    let other = if served_by_first {
        drop(first);
        second
    } else {
        drop(second);
        first
    };
    drop(socket);
    assert!(matches!(events.recv().await.unwrap(), LinkEvent::Down(_)));
    let mut socket = accept(&other).await.unwrap();
    assert_eq!(receive(&mut socket).await, hello());
}

#[tokio::test]
async fn a_portal_that_goes_silent_is_left_and_connected_to_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_to_portal, mut events) = fz_link::spawn::<GatewayRole>(config(port), hello()).unwrap();
    let mut socket = accept(&listener).await.unwrap();
    assert_eq!(receive(&mut socket).await, hello());
    // A long heartbeat: nothing but the link's own pings would show the portal is there.
    say(&mut socket, &ready(60_000)).await;
    assert!(matches!(
        events.recv().await.unwrap(),
        LinkEvent::Message(PortalToGateway::Ready { .. })
    ));
    // The portal reads nothing more (a WebSocket answers pings as it reads), so the link's
    // pings go unanswered: as a connection whose address went away looks from the agent.
    match events.recv().await.unwrap() {
        LinkEvent::Down(reason) => assert_eq!(reason, "the portal said nothing for 6 s"),
        other => panic!("expected the link down, got {other:?}"),
    }
    // It connects again at once (its backoff starts afresh after a `ready`).
    let mut again = accept(&listener).await.unwrap();
    assert_eq!(receive(&mut again).await, hello());
    drop(socket);
}
