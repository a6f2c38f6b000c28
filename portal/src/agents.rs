//! The agents' WebSockets: `GET /api/{account}/client` and `GET /api/{account}/gateway`, each
//! authenticated with `Authorization: Bearer <token>` before the upgrade ([`require_token`]).
//!
//! These handlers only move frames: they check the token, read `fz-proto` messages, hand
//! them to the [`Broker`], and write what it answers. A message that is malformed, too large,
//! from a newer protocol version or out of place gets an `error` message and the connection
//! stays open; a frame beyond the WebSocket limit closes that connection only.
//!
//! The hello must come by the connection's [`Slot::hello_deadline`] (`hello_timeout` after
//! accept); with it the connection counts as an agent's ([`Slot::authenticate`]), and its slot
//! is held until the socket closes. A connection from a trusted proxy is counted against the
//! per-source cap for the client the proxy names, before its token is looked at.
//!
//! **Invariant:** nothing reaches the broker from a connection whose token was not live and of
//! the account in the path when it connected; a revoked token's connections are closed by the
//! broker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fz_proto::{
    ClientMessage, GatewayMessage, MAX_MESSAGE_BYTES, PortalToClient, PortalToGateway, SignedGrant,
    decode, encode,
};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::broker::{Broker, BrokerError, Link, LinkReceiver, cut};
use crate::config::{DEFAULT_HELLO_TIMEOUT_MS, TrustedProxy};
use crate::http::AppState;
use crate::listener::{Busy, Slot};
use crate::registry::ConnectionPath;
use crate::store::{TokenKind, TokenRecord};

/// Frames beyond this close the connection; messages between this and
/// [`MAX_MESSAGE_BYTES`] are refused with an error and the connection stays.
const MAX_FRAME_BYTES: usize = 4 * MAX_MESSAGE_BYTES;

/// An idle connection should cost little: tungstenite's default read buffer is 128 KiB.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How long an agent has to say hello after the upgrade when the router runs without the
/// listener (tests call it directly); the listener's connections have their own deadline.
const HELLO_TIMEOUT: Duration = Duration::from_millis(DEFAULT_HELLO_TIMEOUT_MS);

/// Connection requests one client may have waiting at once.
const MAX_REQUESTS_IN_FLIGHT: usize = 32;

/// The longest error an agent gets back about a message it sent: parse errors quote what they
/// could not read (an unknown `type`, a field name), which is the sender's to make as long as a
/// message.
const MAX_ECHOED: usize = 256;

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The bearer secret of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The live token of `account` the request carries, or the response that refuses it. A
/// missing, wrong, expired, revoked or other account's token all get the same answer.
async fn authenticate(
    broker: &Broker,
    account: &str,
    headers: &HeaderMap,
) -> Result<TokenRecord, Response> {
    let unauthorised = || {
        error(
            StatusCode::UNAUTHORIZED,
            "a live token of this account is needed: `Authorization: Bearer <token>`",
        )
    };
    let secret = bearer(headers).ok_or_else(unauthorised)?;
    match broker.authenticate(account, secret).await {
        Ok(Some(token)) => Ok(token),
        Ok(None) => Err(unauthorised()),
        Err(BrokerError::NoAccount(_)) => Err(unauthorised()),
        Err(other) => Err(error(StatusCode::SERVICE_UNAVAILABLE, other.to_string())),
    }
}

/// The client's address: the socket's peer, or what a trusted proxy says it is.
pub(crate) fn source_address(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    proxy: Option<&TrustedProxy>,
) -> Option<IpAddr> {
    let peer = peer?.ip();
    let Some(proxy) = proxy else {
        return Some(peer);
    };
    if !proxy.peers.iter().any(|n| n.contains(peer)) {
        return Some(peer);
    }
    // The proxy appends the address it saw last: the rightmost entry is the one it vouches
    // for; anything left of it came from the client and proves nothing.
    let said = headers
        .get_all(proxy.header.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|v| v.trim().parse::<IpAddr>().ok())
        .next_back();
    Some(said.unwrap_or(peer))
}

/// Middleware in front of the agents' route: the request must carry a live token of the
/// account in the path, of the kind the path names. The token goes on to the handler as an
/// extension; nothing else gets through.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    Path((account, agent)): Path<(String, String)>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(slot) = request.extensions().get::<Slot>() {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| *peer);
        if let Some(source) = source_address(peer, request.headers(), state.trusted_proxy.as_ref())
            && slot.attribute(source).is_err()
        {
            let mut refused = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address are saying hello; try again later",
            );
            refused.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return refused;
        }
    }
    let token = match authenticate(&state.broker, &account, request.headers()).await {
        Ok(token) => token,
        Err(response) => return response,
    };
    let kind_matches = match agent.as_str() {
        "client" => matches!(token.kind, TokenKind::Client { .. }),
        "gateway" => matches!(token.kind, TokenKind::Gateway { .. }),
        _ => return error(StatusCode::NOT_FOUND, "agents are `client` or `gateway`"),
    };
    if !kind_matches {
        return error(
            StatusCode::FORBIDDEN,
            format!("this is not a {agent} token"),
        );
    }
    request.extensions_mut().insert(token);
    next.run(request).await
}

/// `POST /api/{account}/sign-out`: a client ends its own token (`fz-client sign-out`). The
/// token is revoked at once, and its connections closed and its grants withdrawn before the
/// answer, so the device loses access as it is told it signed out.
pub async fn sign_out(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    let token = match authenticate(&state.broker, &account, &headers).await {
        Ok(token) => token,
        Err(response) => return response,
    };
    if !matches!(token.kind, TokenKind::Client { .. }) {
        return error(StatusCode::FORBIDDEN, "only a client token signs out");
    }
    match state.broker.sign_out(&token).await {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({ "revoked": token.id })),
        )
            .into_response(),
        Err(other) => error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

/// `GET /api/{account}/{agent}`: the WebSocket of a client or a gateway, after
/// [`require_token`].
pub async fn connect(
    State(state): State<Arc<AppState>>,
    Extension(token): Extension<TokenRecord>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<Slot>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let broker = state.broker.clone();
    // Taken before the response goes out, so the connection is never idle (and never evicted)
    // between the upgrade and the hello; held until the socket closes.
    let place = slot.map(|Extension(slot)| slot.busy());
    let ws = ws
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0);
    match token.kind {
        TokenKind::Client { .. } => {
            let source = source_address(
                peer.map(|Extension(ConnectInfo(addr))| addr),
                &headers,
                state.trusted_proxy.as_ref(),
            );
            ws.on_upgrade(move |socket| client_connection(broker, token, source, place, socket))
        }
        TokenKind::Gateway { .. } => {
            ws.on_upgrade(move |socket| gateway_connection(broker, token, place, socket))
        }
    }
}

/// What one frame from an agent turned out to be.
enum Incoming<T> {
    Message(T),
    /// Not a message; the text goes back in an `error` message.
    Bad(String),
    /// Control frames: nothing to do.
    Nothing,
    Closed,
}

fn read<T: serde::de::DeserializeOwned>(
    frame: Option<Result<Message, axum::Error>>,
) -> Incoming<T> {
    match frame {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Incoming::Closed,
        Some(Ok(Message::Text(text))) => match decode(text.as_bytes()) {
            Ok(message) => Incoming::Message(message),
            Err(error) => Incoming::Bad(cut(&error.to_string(), MAX_ECHOED)),
        },
        Some(Ok(Message::Binary(_))) => {
            Incoming::Bad("messages are JSON text frames, not binary".to_owned())
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Incoming::Nothing,
    }
}

async fn send<T: Serialize>(socket: &mut WebSocket, message: &T) -> bool {
    socket
        .send(Message::Text(encode(message).into()))
        .await
        .is_ok()
}

/// Waits for the agent's hello until the connection's deadline and answers anything else with
/// an error; then counts the connection as an agent's, if agents have room.
async fn hello<T: serde::de::DeserializeOwned>(
    socket: &mut WebSocket,
    place: Option<&Busy>,
    is_hello: impl Fn(&T) -> bool,
    error: impl Fn(String) -> String,
) -> Option<T> {
    let deadline = place.map_or_else(
        || tokio::time::Instant::now() + HELLO_TIMEOUT,
        |place| place.slot().hello_deadline(),
    );
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.recv())
            .await
            .ok()?;
        match read::<T>(frame) {
            Incoming::Message(message) if is_hello(&message) => {
                if let Some(place) = place
                    && place.slot().authenticate().is_err()
                {
                    let full = error(
                        "the portal serves as many agents as it can; try again later".to_owned(),
                    );
                    let _ = socket.send(Message::Text(full.into())).await;
                    return None;
                }
                return Some(message);
            }
            Incoming::Message(_) => {
                let text = error("say `hello` first".to_owned());
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return None;
                }
            }
            Incoming::Bad(reason) => {
                if socket
                    .send(Message::Text(error(reason).into()))
                    .await
                    .is_err()
                {
                    return None;
                }
            }
            Incoming::Nothing => {}
            Incoming::Closed => return None,
        }
    }
}

fn client_error(message: String) -> String {
    encode(&PortalToClient::Error { message })
}

fn gateway_error(message: String) -> String {
    encode(&PortalToGateway::Error { message })
}

async fn client_connection(
    broker: Arc<Broker>,
    token: TokenRecord,
    source: Option<IpAddr>,
    place: Option<Busy>,
    mut socket: WebSocket,
) {
    let Some(ClientMessage::Hello {
        public_key,
        endpoints,
    }) = hello(
        &mut socket,
        place.as_ref(),
        |m| matches!(m, ClientMessage::Hello { .. }),
        client_error,
    )
    .await
    else {
        return;
    };
    let (link, mut outbound) = Link::new();
    let (session, connection, ready) = match broker
        .client_hello(&token, public_key, endpoints, source, link.clone())
        .await
    {
        Ok(started) => started,
        Err(refused) => {
            let _ = send(
                &mut socket,
                &PortalToClient::Error {
                    message: refused.to_string(),
                },
            )
            .await;
            return;
        }
    };
    tracing::debug!(account = %session.account, client = %session.client_id, "client connected");
    let in_flight = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    // In pages, each sent (and so flushed) before the next: the connection's send buffer keeps
    // the size of its largest frame for as long as it is open, and an account's whole list
    // of resources in one frame would make every idle client hold it.
    let mut ready_sent = true;
    for page in ready.into_pages() {
        ready_sent = send(&mut socket, &page).await;
        if !ready_sent {
            break;
        }
    }
    if ready_sent && let Some(relays) = broker.relay_credentials(&session.client_id) {
        ready_sent = send(&mut socket, &PortalToClient::Relays { relays }).await;
    }
    if ready_sent {
        loop {
            tokio::select! {
                frame = socket.recv() => match read::<ClientMessage>(frame) {
                    Incoming::Message(ClientMessage::RequestAccess { resource, dns, avoid }) => {
                        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                            link.send(&PortalToClient::Error {
                                message: format!("at most {MAX_REQUESTS_IN_FLIGHT} requests may wait at once"),
                            });
                            continue;
                        };
                        let broker = broker.clone();
                        let session = session.clone();
                        let link = link.clone();
                        tokio::spawn(async move {
                            let answer = broker.request_access(&session, &resource, dns, &avoid).await;
                            link.send(&answer);
                            drop(permit);
                        });
                    }
                    Incoming::Message(ClientMessage::Candidates { gateway_id, candidates }) => {
                        if let Err(message) = broker.client_candidates(&session, &gateway_id, candidates) {
                            link.send(&PortalToClient::Error { message });
                        }
                    }
                    Incoming::Message(ClientMessage::Hello { .. }) => {
                        link.send(&PortalToClient::Error { message: "`hello` was already said".to_owned() });
                    }
                    Incoming::Bad(message) => link.send(&PortalToClient::Error { message }),
                    Incoming::Nothing => {}
                    Incoming::Closed => break,
                },
                Some(text) = outbound.messages.recv() => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                () = outbound.close.notified() => break,
            }
        }
    }
    broker.client_closed(&session.client_id, connection);
    let _ = socket.send(Message::Close(None)).await;
    tracing::debug!(account = %session.account, client = %session.client_id, "client disconnected");
}

async fn gateway_connection(
    broker: Arc<Broker>,
    token: TokenRecord,
    place: Option<Busy>,
    mut socket: WebSocket,
) {
    let Some(GatewayMessage::Hello {
        public_key,
        endpoints,
    }) = hello(
        &mut socket,
        place.as_ref(),
        |m| matches!(m, GatewayMessage::Hello { .. }),
        gateway_error,
    )
    .await
    else {
        return;
    };
    let (link, outbound) = Link::new();
    let (gateway_id, connection, ready, held) = match broker
        .gateway_hello(&token, public_key, endpoints, link.clone())
        .await
    {
        Ok(started) => started,
        Err(refused) => {
            let _ = send(
                &mut socket,
                &PortalToGateway::Error {
                    message: refused.to_string(),
                },
            )
            .await;
            return;
        }
    };
    let mut ready_sent = send(&mut socket, &ready).await;
    // The relays come before the grants, so that the gateway can reach a grant's client
    // through them from the start.
    if ready_sent && let Some(relays) = broker.relay_credentials(&gateway_id) {
        ready_sent = send(&mut socket, &PortalToGateway::Relays { relays }).await;
    }
    for grant in held {
        if !ready_sent {
            break;
        }
        ready_sent = send(
            &mut socket,
            &PortalToGateway::Grant {
                grant: Box::new(SignedGrant::clone(&grant)),
            },
        )
        .await;
    }
    if ready_sent {
        serve_gateway(
            &broker,
            &token.account,
            &gateway_id,
            &link,
            outbound,
            &mut socket,
        )
        .await;
    }
    broker
        .gateway_closed(&token.account, &gateway_id, connection)
        .await;
    let _ = socket.send(Message::Close(None)).await;
}

/// A gateway's messages until it closes, goes silent for three heartbeat intervals, or the
/// broker closes it.
async fn serve_gateway(
    broker: &Broker,
    account: &str,
    gateway_id: &str,
    link: &Link,
    mut outbound: LinkReceiver,
    socket: &mut WebSocket,
) {
    let silence = broker.timings().heartbeat_timeout();
    let mut deadline = tokio::time::Instant::now() + silence;
    // The last heartbeat's write. It is not waited for here, so the acknowledgements read
    // after a heartbeat do not wait on a commit; and there is one at a time, so a gateway
    // that heartbeats faster than the store commits cannot queue writes without end.
    let mut heartbeat_recorded: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            frame = socket.recv() => {
                deadline = tokio::time::Instant::now() + silence;
                match read::<GatewayMessage>(frame) {
                    Incoming::Message(GatewayMessage::Heartbeat) => {
                        if heartbeat_recorded.as_ref().is_none_or(|h| h.is_finished()) {
                            heartbeat_recorded = Some(tokio::spawn(broker.gateway_heartbeat(account, gateway_id)));
                        }
                    }
                    Incoming::Message(GatewayMessage::Ack { grant_id, resolved }) => {
                        broker.gateway_answered(gateway_id, &grant_id, Ok(resolved));
                    }
                    Incoming::Message(GatewayMessage::Refused { grant_id, reason }) => {
                        broker.gateway_answered(gateway_id, &grant_id, Err(reason));
                    }
                    Incoming::Message(GatewayMessage::Candidates { client_id, candidates }) => {
                        if let Err(message) = broker.gateway_candidates(account, gateway_id, &client_id, candidates) {
                            link.send(&PortalToGateway::Error { message });
                        }
                    }
                    Incoming::Message(GatewayMessage::Path { client_id, path, relay }) => {
                        let path = ConnectionPath { kind: path, relay };
                        broker.gateway_path(account, gateway_id, &client_id, path).await;
                    }
                    Incoming::Message(GatewayMessage::Hello { .. }) => {
                        link.send(&PortalToGateway::Error { message: "`hello` was already said".to_owned() });
                    }
                    Incoming::Bad(message) => link.send(&PortalToGateway::Error { message }),
                    Incoming::Nothing => {}
                    Incoming::Closed => return,
                }
            }
            Some(text) = outbound.messages.recv() => {
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            () = outbound.close.notified() => return,
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(%account, gateway = %gateway_id, "gateway missed its heartbeats");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_proxy_is_believed_and_no_one_else() {
        let proxy = TrustedProxy {
            header: "x-forwarded-for".to_owned(),
            peers: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        let from = |peer: &str| {
            source_address(Some(peer.parse().unwrap()), &headers, Some(&proxy))
                .map(|ip| ip.to_string())
        };
        assert_eq!(from("10.1.2.3:4000").as_deref(), Some("198.51.100.7"));
        assert_eq!(from("192.0.2.1:4000").as_deref(), Some("192.0.2.1"));
        assert_eq!(
            source_address(Some("10.1.2.3:4000".parse().unwrap()), &headers, None),
            Some("10.1.2.3".parse().unwrap())
        );
        let empty = HeaderMap::new();
        assert_eq!(
            source_address(Some("10.1.2.3:4000".parse().unwrap()), &empty, Some(&proxy)),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(source_address(None, &headers, Some(&proxy)), None);
    }
}
