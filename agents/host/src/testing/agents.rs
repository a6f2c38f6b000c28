//! Test agents built on the protocol crate: a client and a gateway that speak to a portal over
//! real WebSockets, verify every grant against the pinned portal key, and answer as the real
//! agents will. Used by the portal's integration tests and load benchmark, and by the
//! end-to-end harness, whose rogue client signs in with a [`TestClient`].

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use fz_proto::{
    ClientMessage, ClientReady, DnsMapping, GatewayMessage, Identity, PortalPublicKey,
    PortalToClient, PortalToGateway, PublicKey, Resolution, SignedGrant, decode, encode,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for the portal before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens the agent WebSocket `kind` (`client` or `gateway`) of `account` with a bearer
/// secret. `Err` carries the HTTP status and body of a refused upgrade.
pub async fn open(
    portal: SocketAddr,
    account: &str,
    kind: &str,
    secret: &str,
) -> Result<Socket, (u16, String)> {
    open_with(portal, account, kind, secret, &Origin::default()).await
}

/// Where a connection comes from: a local address to bind (e.g. 127.0.0.2) and extra
/// request headers (e.g. what a proxy would add).
#[derive(Debug, Default)]
pub struct Origin {
    pub bind: Option<std::net::IpAddr>,
    pub headers: Vec<(&'static str, String)>,
}

pub async fn open_with(
    portal: SocketAddr,
    account: &str,
    kind: &str,
    secret: &str,
    origin: &Origin,
) -> Result<Socket, (u16, String)> {
    let mut request = format!("ws://{portal}/api/{account}/{kind}")
        .into_client_request()
        .expect("a valid URL");
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {secret}")).expect("a header value"),
    );
    for (name, value) in &origin.headers {
        request
            .headers_mut()
            .append(*name, HeaderValue::from_str(value).expect("a header value"));
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    if let Some(ip) = origin.bind {
        socket
            .bind(SocketAddr::new(ip, 0))
            .expect("a local address");
    }
    let stream = socket
        .connect(portal)
        .await
        .map_err(|e| (0, e.to_string()))?;
    // As the real agents' links do: each message is a small write someone waits for.
    stream.set_nodelay(true).map_err(|e| (0, e.to_string()))?;
    match tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(stream),
        Some(fz_link::websocket_config()),
    )
    .await
    {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(other) => Err((0, other.to_string())),
    }
}

/// The next text message, or `None` when the portal closed the connection.
pub async fn next_text(socket: &mut Socket) -> Option<String> {
    loop {
        let frame = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("the portal answers within the test's patience");
        match frame {
            Some(Ok(Message::Text(text))) => return Some(text.to_string()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Binary(_))) => panic!("the portal sent a binary frame"),
            Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
        }
    }
}

pub async fn send_text(socket: &mut Socket, text: String) {
    socket
        .send(Message::Text(text.into()))
        .await
        .expect("the portal takes the message");
}

/// A WireGuard public key for tests: any 32 bytes will do for the portal.
pub fn key(seed: u8) -> PublicKey {
    PublicKey([seed; 32])
}

#[derive(Debug)]
pub struct TestClient {
    pub socket: Socket,
    pub ready: ClientReady,
    pub public_key: PublicKey,
    pub pinned: PortalPublicKey,
}

impl TestClient {
    /// Connects, says hello and waits for `ready`.
    pub async fn connect(
        portal: SocketAddr,
        pinned: PortalPublicKey,
        account: &str,
        secret: &str,
        public_key: PublicKey,
    ) -> Result<TestClient, (u16, String)> {
        Self::connect_from(
            portal,
            pinned,
            account,
            secret,
            public_key,
            &Origin::default(),
        )
        .await
    }

    pub async fn connect_from(
        portal: SocketAddr,
        pinned: PortalPublicKey,
        account: &str,
        secret: &str,
        public_key: PublicKey,
        origin: &Origin,
    ) -> Result<TestClient, (u16, String)> {
        let mut socket = open_with(portal, account, "client", secret, origin).await?;
        send_text(
            &mut socket,
            encode(&ClientMessage::Hello {
                public_key,
                endpoints: vec!["198.51.100.7:51820".parse().expect("an address")],
            }),
        )
        .await;
        let mut ready = match next_message::<PortalToClient>(&mut socket).await {
            Some(PortalToClient::Ready(ready)) => *ready,
            other => return Err((101, format!("expected ready, got {other:?}"))),
        };
        // Its pages, as the real client's link takes them.
        while ready.more {
            let page = next_message::<PortalToClient>(&mut socket).await;
            let taken = page.map(|page| ready.take_page(page));
            if let Some(Err(_)) | None = taken {
                return Err((
                    101,
                    format!("expected the next page of ready, got {taken:?}"),
                ));
            }
        }
        Ok(TestClient {
            socket,
            ready,
            public_key,
            pinned,
        })
    }

    pub async fn next(&mut self) -> Option<PortalToClient> {
        next_message::<PortalToClient>(&mut self.socket).await
    }

    /// Asks for a resource and returns the answer (the next `granted` or `rejected`).
    pub async fn request(&mut self, resource: &str, dns: Option<DnsMapping>) -> PortalToClient {
        self.request_avoiding(resource, dns, &[]).await
    }

    /// Asks for a resource through a gateway other than those in `avoid`.
    pub async fn request_avoiding(
        &mut self,
        resource: &str,
        dns: Option<DnsMapping>,
        avoid: &[&str],
    ) -> PortalToClient {
        self.try_request(resource, dns, avoid)
            .await
            .unwrap_or_else(|| panic!("the portal closed the connection instead of answering"))
    }

    /// [`TestClient::request_avoiding`], giving `None` when the portal closes the connection
    /// before it answers (a test that kills the portal).
    pub async fn try_request(
        &mut self,
        resource: &str,
        dns: Option<DnsMapping>,
        avoid: &[&str],
    ) -> Option<PortalToClient> {
        let request = encode(&ClientMessage::RequestAccess {
            resource: resource.to_owned(),
            dns,
            avoid: avoid.iter().map(|g| (*g).to_owned()).collect(),
        });
        self.socket.send(Message::Text(request.into())).await.ok()?;
        loop {
            match self.next().await? {
                answer @ (PortalToClient::Granted { .. } | PortalToClient::Rejected { .. }) => {
                    return Some(answer);
                }
                _ => continue,
            }
        }
    }

    /// Asks for a resource and returns the grant, verified as the real client verifies it.
    pub async fn grant(&mut self, resource: &str, dns: Option<DnsMapping>) -> SignedGrant {
        match self.request(resource, dns).await {
            PortalToClient::Granted { grant, .. } => {
                self.verify(&grant)
                    .expect("the grant verifies for its client");
                *grant
            }
            other => panic!("expected a grant for {resource}, got {other:?}"),
        }
    }

    pub fn verify(&self, grant: &SignedGrant) -> Result<(), fz_proto::GrantError> {
        grant
            .verify(
                &self.pinned,
                &Identity::Client {
                    id: self.ready.client_id.clone(),
                    public_key: self.public_key,
                },
                now(),
            )
            .map(|_| ())
    }
}

/// The next message, or `None` when the portal closed the connection.
async fn next_message<T: serde::de::DeserializeOwned>(socket: &mut Socket) -> Option<T> {
    let text = next_text(socket).await?;
    Some(decode(text.as_bytes()).expect("the portal speaks the protocol"))
}

#[derive(Debug)]
pub struct TestGateway {
    pub socket: Socket,
    pub id: String,
    pub public_key: PublicKey,
    pub pinned: PortalPublicKey,
    pub heartbeat_interval: Duration,
    /// Seconds this gateway's clock is ahead of the system clock.
    pub clock_offset: i64,
    /// The grants in force for it, as `ready` listed them.
    pub held: Vec<String>,
}

/// What [`TestGateway::serve`] says every DNS resource's name resolved to.
pub const RESOLVED: Resolution = Resolution::Exists {
    ipv4: true,
    ipv6: false,
};

impl TestGateway {
    /// Connects, says hello and waits for `ready`.
    pub async fn connect(
        portal: SocketAddr,
        pinned: PortalPublicKey,
        account: &str,
        secret: &str,
        public_key: PublicKey,
    ) -> Result<TestGateway, (u16, String)> {
        let mut socket = open(portal, account, "gateway", secret).await?;
        send_text(
            &mut socket,
            encode(&GatewayMessage::Hello {
                public_key,
                endpoints: vec!["203.0.113.1:51820".parse().expect("an address")],
            }),
        )
        .await;
        match next_message::<PortalToGateway>(&mut socket).await {
            Some(PortalToGateway::Ready {
                gateway_id,
                heartbeat_interval_ms,
                grants,
            }) => Ok(TestGateway {
                held: grants,
                socket,
                id: gateway_id,
                public_key,
                pinned,
                heartbeat_interval: Duration::from_millis(heartbeat_interval_ms),
                clock_offset: 0,
            }),
            other => Err((101, format!("expected ready, got {other:?}"))),
        }
    }

    pub async fn next(&mut self) -> Option<PortalToGateway> {
        next_message::<PortalToGateway>(&mut self.socket).await
    }

    pub async fn send(&mut self, message: &GatewayMessage) {
        send_text(&mut self.socket, encode(message)).await;
    }

    pub fn verify(&self, grant: &SignedGrant) -> Result<(), fz_proto::GrantError> {
        grant
            .verify(
                &self.pinned,
                &Identity::Gateway {
                    id: self.id.clone(),
                    public_key: self.public_key,
                },
                now().saturating_add_signed(self.clock_offset),
            )
            .map(|_| ())
    }

    /// Runs the gateway as the real one behaves: heartbeats on time, verifies every grant and
    /// acknowledges it (or refuses it, with the reason). Every message from the portal is
    /// passed on to the returned channel, so a test can watch grants and revocations arrive.
    pub fn serve(self) -> tokio::sync::mpsc::UnboundedReceiver<PortalToGateway> {
        self.serve_answering(|_, answer| Some(answer))
    }

    /// [`TestGateway::serve`], with `answer` deciding what to say to each grant: given the
    /// grant and what the real gateway would say, it returns what to send, or `None` to say
    /// nothing (while heartbeating on).
    pub fn serve_answering(
        mut self,
        mut answer: impl FnMut(&SignedGrant, GatewayMessage) -> Option<GatewayMessage> + Send + 'static,
    ) -> tokio::sync::mpsc::UnboundedReceiver<PortalToGateway> {
        let (seen, watch) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
            loop {
                tokio::select! {
                    _ = heartbeat.tick() => {
                        if self.socket.send(Message::Text(encode(&GatewayMessage::Heartbeat).into())).await.is_err() {
                            return;
                        }
                    }
                    frame = self.socket.next() => {
                        let Some(Ok(Message::Text(text))) = frame else {
                            match frame {
                                Some(Ok(_)) => continue,
                                _ => return,
                            }
                        };
                        let Ok(message) = decode::<PortalToGateway>(text.as_bytes()) else {
                            return;
                        };
                        if let PortalToGateway::Grant { grant } = &message {
                            let real = match self.verify(grant) {
                                Ok(()) => GatewayMessage::Ack {
                                    grant_id: grant.grant.id.clone(),
                                    resolved: grant.grant.resource.dns.as_ref().map(|_| RESOLVED),
                                },
                                Err(error) => GatewayMessage::Refused {
                                    grant_id: grant.grant.id.clone(),
                                    reason: error.to_string(),
                                },
                            };
                            if let Some(answer) = answer(grant, real)
                                && self.socket.send(Message::Text(encode(&answer).into())).await.is_err()
                            {
                                return;
                            }
                        }
                        if seen.send(message).is_err() {
                            // Nobody watches any more; keep serving.
                        }
                    }
                }
            }
        });
        watch
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
