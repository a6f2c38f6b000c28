//! An agent's WebSocket to the portal: connect (ws or wss) with the agent's token, say
//! `hello`, wait for `ready`, heartbeat if the portal asks for it, ping it to know it is
//! there, pass messages both ways, and when the connection drops (or the portal goes silent),
//! connect again with jittered exponential backoff. A token
//! the portal refuses (401, 403) stops it: no retry would help.
//!
//! The portal may be several replicas, each at a URL of the list the agent is given: every
//! attempt picks one at random, never the one that just failed, so that the agents of a lost
//! replica spread over the others.
//!
//! It runs as its own task and speaks to the agent's event loop through channels, so a slow
//! or absent portal never holds up packets: tunnels keep forwarding while it is away. What
//! differs between the client and the gateway (their messages, the socket's path, the
//! heartbeat) is a [`Role`]: [`GatewayRole`], [`ClientRole`].

use std::fmt;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use fz_proto::{
    ClientMessage, GatewayMessage, PortalPublicKey, PortalToClient, PortalToGateway, decode, encode,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, Uri};
use tokio_tungstenite::tungstenite::{self, Message};

/// How long the portal has to answer `hello`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an agent pings the portal (a WebSocket ping, which the portal answers by
/// itself), and how long it lets the portal say nothing at all before it takes the
/// connection for dead and connects again. A connection whose address went away (the
/// laptop moved to another network) fails no write and gets no error; only this finds it.
const LIVENESS_PING: Duration = Duration::from_secs(2);
const LIVENESS_LIMIT: Duration = Duration::from_secs(6);

/// How much an agent's WebSocket reads from its TCP stream at a time. tungstenite's default
/// is 128 KiB, and it zero-fills the whole window before every read: 128 KiB written per
/// message received, when a grant is 1 KiB. 16 KiB takes the largest message (a page of
/// `ready`, a `revoke_many`) in a few reads.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// The WebSocket settings of an agent's link to the portal; the test agents use them too, so
/// that the load bench's clients and gateways cost what the real ones do.
pub fn websocket_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES)
}

/// What one kind of agent says and hears over its link.
pub trait Role: Send + 'static {
    /// Agent to portal.
    type Up: Serialize + fmt::Debug + Send + Sync + 'static;
    /// Portal to agent.
    type Down: DeserializeOwned + fmt::Debug + Send + Sync + 'static;
    /// The last segment of the socket's path: `/api/{account}/{PATH}`.
    const PATH: &'static str;
    /// If `message` is `ready`: what to send how often from now on (`None`: nothing).
    /// `Err` if it is not `ready`, with the portal's error text if it is an error.
    fn ready(message: &Self::Down) -> Result<Option<(Duration, Self::Up)>, Option<String>>;
    /// Whether more pages of `ready` follow it.
    fn more_pages(_ready: &Self::Down) -> bool {
        false
    }
    /// Takes `page`, the next page of `ready`, into it; gives back what came instead.
    fn take_page(_ready: &mut Self::Down, page: Self::Down) -> Result<(), Self::Down> {
        Err(page)
    }
}

/// The gateway: heartbeats at the interval the portal's `ready` names.
#[derive(Debug)]
pub struct GatewayRole;

impl Role for GatewayRole {
    type Up = GatewayMessage;
    type Down = PortalToGateway;
    const PATH: &'static str = "gateway";

    fn ready(
        message: &PortalToGateway,
    ) -> Result<Option<(Duration, GatewayMessage)>, Option<String>> {
        match message {
            PortalToGateway::Ready {
                heartbeat_interval_ms,
                ..
            } => Ok(Some((
                Duration::from_millis((*heartbeat_interval_ms).max(100)),
                GatewayMessage::Heartbeat,
            ))),
            PortalToGateway::Error { message } => Err(Some(message.clone())),
            _ => Err(None),
        }
    }
}

/// The client: no heartbeats (the portal learns of a lost client from its connection).
#[derive(Debug)]
pub struct ClientRole;

impl Role for ClientRole {
    type Up = ClientMessage;
    type Down = PortalToClient;
    const PATH: &'static str = "client";

    fn ready(
        message: &PortalToClient,
    ) -> Result<Option<(Duration, ClientMessage)>, Option<String>> {
        match message {
            PortalToClient::Ready(_) => Ok(None),
            PortalToClient::Error { message } => Err(Some(message.clone())),
            _ => Err(None),
        }
    }

    fn more_pages(ready: &PortalToClient) -> bool {
        matches!(ready, PortalToClient::Ready(ready) if ready.more)
    }

    fn take_page(ready: &mut PortalToClient, page: PortalToClient) -> Result<(), PortalToClient> {
        match ready {
            PortalToClient::Ready(ready) => ready.take_page(page),
            _ => Err(page),
        }
    }
}

/// Where the portal is and how to prove who we are.
#[derive(Clone)]
pub struct PortalConfig {
    /// The portal's replicas (one or more), each `ws://host:port` or `wss://host:port`,
    /// without a path.
    pub urls: Vec<String>,
    pub account: String,
    /// The agent token's secret.
    pub token: String,
    /// Extra CA certificates (PEM) to trust for wss, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// A firewall mark for the connection's socket: the client's, so that its full tunnel
    /// (policy routing on the mark) never carries the link itself.
    pub socket_mark: Option<u32>,
}

impl fmt::Debug for PortalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortalConfig")
            .field("urls", &self.urls)
            .field("account", &self.account)
            .field("ca_file", &self.ca_file)
            .field("socket_mark", &self.socket_mark)
            .finish_non_exhaustive()
    }
}

/// The command-line flags that say where the portal is and which key it signs with; both
/// agents' command lines include them (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct PortalArgs {
    /// The portal, as `ws://host:port` or `wss://host:port`; for a portal of several
    /// replicas, each of them, comma-separated or the flag repeated (each connection picks
    /// one at random).
    #[arg(long, env = "FZ_PORTAL_URL", value_delimiter = ',', required = true)]
    pub portal_url: Vec<String>,
    /// The account (its slug).
    #[arg(long, env = "FZ_ACCOUNT")]
    pub account: String,
    /// The portal's grant-signing public key (base64), pinned: grants signed with any other
    /// key are refused.
    #[arg(long, env = "FZ_PORTAL_KEY")]
    pub portal_key: String,
    /// Extra CA certificates (PEM) to trust for a `wss://` portal, beside the system's.
    #[arg(long)]
    pub portal_ca: Option<PathBuf>,
}

impl PortalArgs {
    /// The link's configuration with `token`, and the pinned key; the error names the flag.
    pub fn resolve(self, token: String) -> Result<(PortalConfig, PortalPublicKey), String> {
        let key: PortalPublicKey = self
            .portal_key
            .parse()
            .map_err(|e: fz_proto::KeyError| format!("`--portal-key`: {e}"))?;
        let config = PortalConfig {
            urls: self.portal_url,
            account: self.account,
            token,
            ca_file: self.portal_ca,
            socket_mark: None,
        };
        Ok((config, key))
    }
}

/// What the link tells the event loop.
#[derive(Debug)]
pub enum LinkEvent<M> {
    /// A message from the portal; `ready` first on every connection.
    Message(M),
    /// The connection ended; the link connects again by itself.
    Down(String),
    /// The portal refused the token (401/403): no retry will help.
    Refused(String),
}

/// Why the link cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the portal URL `{0}` is not `ws://host[:port]` or `wss://host[:port]`")]
    Url(String),
    #[error("no portal URL was given")]
    NoUrl,
    #[error("cannot read the CA file `{path}`: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("cannot reach the portal: {0}")]
    Unreachable(String),
    #[error("the portal answered {status}: {body}")]
    Answered { status: u16, body: String },
}

/// The longest answer [`sign_out`] reads.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// Ends the device's token at the portal (`POST /api/{account}/sign-out` with it as the
/// bearer): revoked, its connections closed, its grants withdrawn. One request, over TLS when
/// the URL is `wss://`, checked as the link checks the portal (system roots and `ca_file`).
///
/// Of several replicas, each is asked in random order until one answers.
pub async fn sign_out(config: &PortalConfig) -> Result<(), LinkError> {
    let mut targets = Target::parse_all(config, "sign-out")?;
    let mut failure = LinkError::NoUrl;
    while !targets.is_empty() {
        let target = targets.swap_remove(pick(targets.len(), None, random_fraction()));
        match sign_out_at(config, &target).await {
            Err(error @ LinkError::Unreachable(_)) => failure = error,
            answered => return answered,
        }
    }
    Err(failure)
}

async fn sign_out_at(config: &PortalConfig, target: &Target) -> Result<(), LinkError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let path = format!("/api/{}/sign-out", config.account);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        target.host, config.token
    );
    let unreachable = |e: std::io::Error| LinkError::Unreachable(e.to_string());
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(unreachable)?;
    let mut answer = Vec::new();
    match &target.tls {
        None => {
            let mut tcp = tcp;
            tcp.write_all(request.as_bytes())
                .await
                .map_err(unreachable)?;
            tcp.take(MAX_ANSWER_BYTES)
                .read_to_end(&mut answer)
                .await
                .map_err(unreachable)?;
        }
        Some(config) => {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| LinkError::Unreachable(format!("`{}`: {e}", target.host)))?;
            let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(unreachable)?;
            tls.write_all(request.as_bytes())
                .await
                .map_err(unreachable)?;
            tls.take(MAX_ANSWER_BYTES)
                .read_to_end(&mut answer)
                .await
                .map_err(unreachable)?;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let status: u16 = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| LinkError::Unreachable("the portal's answer is not HTTP".to_owned()))?;
    if status == 200 {
        return Ok(());
    }
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Err(LinkError::Answered {
        status,
        body: body.chars().take(512).collect(),
    })
}

/// The ends of a link the event loop holds.
pub type Ends<R> = (
    mpsc::UnboundedSender<<R as Role>::Up>,
    mpsc::Receiver<LinkEvent<<R as Role>::Down>>,
);

/// Starts the link. Messages sent on the returned sender go to the portal while connected
/// and are dropped while not (the portal sends what is in force again on reconnect, and the
/// agent answers again). `hello` is said on every connection.
pub fn spawn<R: Role>(config: PortalConfig, hello: R::Up) -> Result<Ends<R>, LinkError> {
    let targets = Target::parse_all(&config, R::PATH)?;
    let (to_portal, outgoing) = mpsc::unbounded_channel();
    let (events, from_portal) = mpsc::channel(256);
    tokio::spawn(run::<R>(targets, config.token, hello, outgoing, events));
    Ok((to_portal, from_portal))
}

/// The host name (or address) and port of the portal's first URL.
pub fn portal_host(config: &PortalConfig) -> Result<(String, u16), LinkError> {
    let url = config.urls.first().ok_or(LinkError::NoUrl)?;
    let target = Target::parse_for(config, url, "")?;
    Ok((target.host, target.port))
}

/// Which of `count` replicas to try next, `fraction` (in `0..1`) choosing at random among
/// them all but `failed` (the one whose connection just failed), when there is another.
fn pick(count: usize, failed: Option<usize>, fraction: f64) -> usize {
    let others = match failed {
        Some(failed) if failed < count && count > 1 => count - 1,
        _ => count,
    };
    // `fraction` < 1, so this is below `others`; `min` only guards a rounding surprise.
    let chosen = ((fraction.clamp(0.0, 1.0) * others as f64) as usize).min(others - 1);
    match failed {
        Some(failed) if others < count && chosen >= failed => chosen + 1,
        _ => chosen,
    }
}

/// A parsed portal address.
struct Target {
    request_url: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    mark: Option<u32>,
}

impl Target {
    /// The target of `/api/{account}/{path}` at each of the portal's URLs: all of them good, or
    /// an error naming the first that is not.
    fn parse_all(config: &PortalConfig, path: &str) -> Result<Vec<Target>, LinkError> {
        if config.urls.is_empty() {
            return Err(LinkError::NoUrl);
        }
        config
            .urls
            .iter()
            .map(|url| Target::parse_for(config, url, path))
            .collect()
    }

    /// The target of `/api/{account}/{path}` at `url`.
    fn parse_for(config: &PortalConfig, url: &str, path: &str) -> Result<Target, LinkError> {
        let bad = || LinkError::Url(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad()),
        };
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad());
        }
        let host = uri.host().ok_or_else(bad)?.to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tls = secure
            .then(|| tls_config(config.ca_file.as_ref()))
            .transpose()?;
        let base = url.trim_end_matches('/');
        Ok(Target {
            request_url: format!("{base}/api/{}/{path}", config.account),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            tls,
            mark: config.socket_mark,
        })
    }
}

fn tls_config(ca_file: Option<&PathBuf>) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    let mut roots = rustls::RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        tracing::debug!(%error, "a system CA certificate could not be read");
    }
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let ca_error = |message: String| LinkError::CaFile {
            path: path.clone(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("no certificate in it".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| LinkError::CaFile {
        path: PathBuf::new(),
        message: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connected WebSocket, over TLS or not. Made once per connection, so its size does not
/// matter.
#[allow(clippy::large_enum_variant)]
enum Connected {
    Plain(WebSocketStream<TcpStream>),
    Tls(WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// How one connection ended.
enum Ended {
    /// Connect again after a backoff.
    Retry(String),
    /// The token is refused; stop.
    Refused(String),
    /// The event loop is gone.
    Stop,
}

async fn run<R: Role>(
    targets: Vec<Target>,
    token: String,
    hello: R::Up,
    mut outgoing: mpsc::UnboundedReceiver<R::Up>,
    events: mpsc::Sender<LinkEvent<R::Down>>,
) {
    let mut backoff = Backoff::default();
    let mut failed = None;
    loop {
        let chosen = pick(targets.len(), failed, random_fraction());
        let target = &targets[chosen];
        let ended = match connect(target, &token).await {
            Ok(connected) => {
                tracing::info!(portal = %target.request_url, "connected to the portal");
                match connected {
                    Connected::Plain(socket) => {
                        session::<R, _>(socket, &hello, &mut outgoing, &events, &mut backoff).await
                    }
                    Connected::Tls(socket) => {
                        session::<R, _>(socket, &hello, &mut outgoing, &events, &mut backoff).await
                    }
                }
            }
            Err(ended) => ended,
        };
        let wait = backoff.wait(random_fraction());
        failed = Some(chosen);
        match ended {
            Ended::Retry(reason) => {
                tracing::warn!(%reason, retry_in_ms = wait.as_millis() as u64, "portal connection down");
                if events.send(LinkEvent::Down(reason)).await.is_err() {
                    return;
                }
            }
            Ended::Refused(reason) => {
                let _ = events.send(LinkEvent::Refused(reason)).await;
                return;
            }
            Ended::Stop => return,
        }
        // Messages queued while down would answer a connection that no longer exists.
        while outgoing.try_recv().is_ok() {}
        tokio::time::sleep(wait).await;
    }
}

/// When to connect again after a connection (or its hello) failed: from 0.5 s, each failure
/// half as long again as the last, at most 60 s, and each wait jittered by ±50%, so that the
/// agents of a portal that went away (thousands, after a restart) do not all come back in the
/// same instant. A connection that got as far as `ready` starts it afresh.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const FACTOR: f64 = 1.5;
    const MAX: Duration = Duration::from_secs(60);

    /// The wait before the next attempt, `fraction` (in `0..1`) placing it between half and
    /// one and a half times the current step; the step then grows.
    fn wait(&mut self, fraction: f64) -> Duration {
        let wait = self.next.mul_f64(0.5 + fraction.clamp(0.0, 1.0));
        self.next = self.next.mul_f64(Self::FACTOR).min(Self::MAX);
        wait
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

/// A fraction in `0..1` from the system's random source (the middle, if it fails).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 2];
    match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / 65_536.0,
        Err(_) => 0.5,
    }
}

/// A TCP connection to the portal, from a socket with the target's mark if it has one.
async fn open(target: &Target) -> std::io::Result<TcpStream> {
    let Some(mark) = target.mark else {
        return TcpStream::connect((target.host.as_str(), target.port)).await;
    };
    let mut failure = std::io::Error::other("the portal's name has no address");
    for address in tokio::net::lookup_host((target.host.as_str(), target.port)).await? {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)?;
        match socket.connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => failure = error,
        }
    }
    Err(failure)
}

async fn connect(target: &Target, token: &str) -> Result<Connected, Ended> {
    let mut request = target
        .request_url
        .as_str()
        .into_client_request()
        .map_err(|e| Ended::Retry(e.to_string()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| Ended::Refused("the token has characters a header cannot carry".into()))?;
    request.headers_mut().insert("authorization", bearer);
    let tcp = open(target)
        .await
        .map_err(|e| Ended::Retry(format!("cannot reach {}:{}: {e}", target.host, target.port)))?;
    let _ = tcp.set_nodelay(true);
    match &target.tls {
        None => handshake(request, tcp).await.map(Connected::Plain),
        Some(config) => {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| Ended::Refused(format!("`{}`: {e}", target.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| Ended::Retry(format!("TLS with the portal failed: {e}")))?;
            handshake(request, tls).await.map(Connected::Tls)
        }
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    request: tungstenite::handshake::client::Request,
    stream: S,
) -> Result<WebSocketStream<S>, Ended> {
    match tokio_tungstenite::client_async_with_config(request, stream, Some(websocket_config()))
        .await
    {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response))
            if matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            Err(Ended::Refused(format!(
                "the portal refused the gateway token ({}): {body}",
                response.status()
            )))
        }
        Err(error) => Err(Ended::Retry(format!("WebSocket handshake failed: {error}"))),
    }
}

/// One connection: hello, ready, then messages both ways and heartbeats until it ends.
async fn session<R: Role, S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: WebSocketStream<S>,
    hello: &R::Up,
    outgoing: &mut mpsc::UnboundedReceiver<R::Up>,
    events: &mpsc::Sender<LinkEvent<R::Down>>,
    backoff: &mut Backoff,
) -> Ended {
    if let Err(error) = socket.send(Message::Text(encode(hello).into())).await {
        return Ended::Retry(format!("cannot say hello: {error}"));
    }
    let ready = match tokio::time::timeout(READY_TIMEOUT, whole_ready::<R, S>(&mut socket)).await {
        Ok(Ok(ready)) => ready,
        Ok(Err(reason)) => return Ended::Retry(reason),
        Err(_) => return Ended::Retry("the portal did not answer hello".to_owned()),
    };
    let beat = match R::ready(&ready) {
        Ok(beat) => beat,
        Err(Some(message)) => {
            return Ended::Retry(format!("the portal refused hello: {message}"));
        }
        Err(None) => return Ended::Retry(format!("expected ready, got {ready:?}")),
    };
    // Without a heartbeat the timer still runs, hourly, and sends nothing.
    let (period, heartbeat_message) = match beat {
        Some((period, message)) => (period, Some(message)),
        None => (Duration::from_secs(3600), None),
    };
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness =
        tokio::time::interval_at(tokio::time::Instant::now() + LIVENESS_PING, LIVENESS_PING);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    if events.send(LinkEvent::Message(ready)).await.is_err() {
        return Ended::Stop;
    }
    // A connection that got as far as `ready` counts as healthy: the next failure starts
    // the backoff afresh.
    *backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = liveness.tick() => {
                if heard.elapsed() >= LIVENESS_LIMIT {
                    return Ended::Retry(format!(
                        "the portal said nothing for {} s",
                        LIVENESS_LIMIT.as_secs()
                    ));
                }
                if let Err(error) = socket.send(Message::Ping(Vec::new().into())).await {
                    return Ended::Retry(format!("cannot ping the portal: {error}"));
                }
            }
            _ = heartbeat.tick() => {
                let Some(message) = &heartbeat_message else { continue };
                if let Err(error) = socket.send(Message::Text(encode(message).into())).await {
                    return Ended::Retry(format!("cannot send a heartbeat: {error}"));
                }
            }
            message = outgoing.recv() => {
                let Some(message) = message else { return Ended::Stop };
                if let Err(error) = socket.send(Message::Text(encode(&message).into())).await {
                    return Ended::Retry(format!("cannot send to the portal: {error}"));
                }
            }
            incoming = next_frame::<R, S>(&mut socket) => match incoming {
                Ok(message) => {
                    heard = tokio::time::Instant::now();
                    if let Some(message) = message
                        && events.send(LinkEvent::Message(message)).await.is_err()
                    {
                        return Ended::Stop;
                    }
                }
                Err(reason) => return Ended::Retry(reason),
            },
        }
    }
}

/// The portal's answer to hello, with the pages that follow it put back into it: the rest of
/// the session sees one `ready`.
async fn whole_ready<R: Role, S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
) -> Result<R::Down, String> {
    let mut ready = next_message::<R, S>(socket).await?;
    while R::more_pages(&ready) {
        let page = next_message::<R, S>(socket).await?;
        R::take_page(&mut ready, page)
            .map_err(|other| format!("expected the next page of ready, got {other:?}"))?;
    }
    Ok(ready)
}

/// The next message from the portal; a message that does not decode is logged and skipped
/// (the portal is trusted, but a newer one may say things this build does not know).
async fn next_message<R: Role, S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
) -> Result<R::Down, String> {
    loop {
        if let Some(message) = next_frame::<R, S>(socket).await? {
            return Ok(message);
        }
    }
}

/// The next frame from the portal: a message, or `None` for anything else that shows the
/// portal is there (a pong, a ping, a message this build does not understand).
async fn next_frame<R: Role, S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut WebSocketStream<S>,
) -> Result<Option<R::Down>, String> {
    match socket.next().await {
        Some(Ok(Message::Text(text))) => match decode::<R::Down>(text.as_bytes()) {
            Ok(message) => Ok(Some(message)),
            Err(error) => {
                tracing::warn!(%error, "a message from the portal was not understood");
                Ok(None)
            }
        },
        Some(Ok(Message::Close(frame))) => Err(match frame {
            Some(frame) => format!("the portal closed the connection: {}", frame.reason),
            None => "the portal closed the connection".to_owned(),
        }),
        Some(Ok(_)) => Ok(None),
        Some(Err(error)) => Err(format!("the connection failed: {error}")),
        None => Err("the portal closed the connection".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_from_half_a_second_to_a_minute_with_half_of_it_as_jitter() {
        let mut backoff = Backoff::default();
        // Unjittered (the middle of the range), the steps themselves.
        let steps: Vec<Duration> = (0..16).map(|_| backoff.wait(0.5)).collect();
        assert_eq!(steps[0], Duration::from_millis(500));
        assert_eq!(steps[1], Duration::from_millis(750));
        assert_eq!(steps[2], Duration::from_micros(1_125_000));
        assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
        assert!(steps[11] < Backoff::MAX, "{steps:?}");
        assert_eq!(steps[12..], [Backoff::MAX; 4]);
        // At the ends of the jitter: half and one and a half times the step.
        assert_eq!(Backoff::default().wait(0.0), Duration::from_millis(250));
        assert_eq!(Backoff::default().wait(1.0), Duration::from_millis(750));
        assert_eq!(backoff.wait(1.0), Duration::from_secs(90));
        // A fraction out of range is clamped, never a longer wait.
        assert_eq!(Backoff::default().wait(7.0), Duration::from_millis(750));
    }

    #[test]
    fn each_attempt_picks_any_replica_but_the_one_that_just_failed() {
        let fractions = [0.0, 0.2, 0.34, 0.5, 0.67, 0.9, 0.999_99];
        let picks = |count, failed| -> Vec<usize> {
            fractions.iter().map(|f| pick(count, failed, *f)).collect()
        };
        assert_eq!(picks(1, None), [0; 7]);
        // A lone portal is tried again: there is no other.
        assert_eq!(picks(1, Some(0)), [0; 7]);
        assert_eq!(picks(3, None), [0, 0, 1, 1, 2, 2, 2]);
        assert_eq!(picks(3, Some(0)), [1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(picks(3, Some(1)), [0, 0, 0, 2, 2, 2, 2]);
        assert_eq!(picks(3, Some(2)), [0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(picks(2, Some(1)), [0; 7]);
    }

    #[test]
    fn random_fractions_stay_in_range() {
        for _ in 0..1000 {
            let fraction = random_fraction();
            assert!((0.0..1.0).contains(&fraction), "{fraction}");
        }
    }
}
