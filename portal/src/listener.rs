//! The portal's one accept loop, for HTTP and HTTPS alike: [`serve`] accepts TCP connections,
//! admits or refuses each one against the [`Caps`] ([`limiter`], without IO), shakes hands
//! with TLS when configured, and serves HTTP/1.1 with upgrades (hyper) to an axum [`Router`],
//! each request carrying the peer as [`ConnectInfo<SocketAddr>`](ConnectInfo) and the
//! connection's [`Slot`].
//!
//! Every connection is bounded in time and number before it is worth anything:
//!
//! - refused at accept past the per-source cap, or past the unauthenticated cap when no idle
//!   connection can make room: the socket is closed before anything is read from it;
//! - the TLS handshake within `tls_handshake_timeout`, each request head within
//!   `header_read_timeout` (hyper's timer, which also runs while a keep-alive connection
//!   waits for its next request), and the agent's `hello` within `hello_timeout` of accept
//!   (`agents` waits for the hello until [`Slot::hello_deadline`]); a connection that is not an
//!   agent by then finishes its request in flight and is closed;
//! - an agent that said hello leaves the unauthenticated counts for the agents'
//!   ([`Slot::authenticate`]), so connected agents are never crowded out by a flood and a
//!   flood never by them.
//!
//! `/healthz` shares the listener: a probe is an unauthenticated connection like any other,
//! and gets in under a flood of idle sockets because the oldest idle one is closed for it
//! (see [`limiter`]), and under one source's flood because the cap is per source.
//!
//! It does not decide what is served (the router), nor whether TLS is (the configuration). The
//! caps are the portal's; the descriptors they are sized from are the process's, read at start.

pub mod limiter;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use fz_compiler::address::Network;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::ConnectionLimits;
pub use limiter::{Caps, Refusal, Source, Stats};
use limiter::{ConnectionId, Limiter};

/// After the shutdown signal, connections have this long to finish their requests; the ones
/// still open then are closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The most a request head may take in the read buffer. The portal's requests are GETs with a
/// token and perhaps a proxy's header; hyper's default (about 400 KiB) would let each slow
/// connection pin that much memory.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

/// Refusals are logged at warn at most this often, with the counts since the last warning.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What [`serve`] needs besides the listener and the router.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Serve HTTPS with this; plain HTTP without.
    pub tls: Option<Arc<ServerConfig>>,
    pub limits: ConnectionLimits,
    /// Peers that speak for many clients (the configured trusted proxies): their connections
    /// count against the per-source cap only once a request names the client
    /// ([`Slot::attribute`]).
    pub trusted_proxies: Vec<Network>,
}

impl Settings {
    pub fn new(tls: Option<Arc<ServerConfig>>, limits: ConnectionLimits) -> Settings {
        Settings {
            tls,
            limits,
            trusted_proxies: Vec::new(),
        }
    }
}

/// The open files limit, soft and hard, as `getrlimit(RLIMIT_NOFILE)` says.
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    rlimit::Resource::NOFILE.get()
}

/// Raises the soft open files limit to the hard one (systemd gives services 1,024 soft and
/// far more hard). Returns the soft limit before and after, and the hard limit.
pub fn raise_open_files_limit() -> io::Result<(u64, u64, u64)> {
    let (before, hard) = open_files_limit()?;
    let after = rlimit::increase_nofile_limit(hard)?;
    Ok((before, after, hard))
}

/// The connections a server holds: shared by the accept loop, its connection tasks and the
/// handlers (through [`Slot`]s), and readable by whoever runs the portal.
#[derive(Clone)]
pub struct Connections(Arc<Mutex<State>>);

struct State {
    limiter: Limiter,
    /// How to close each connection that may be evicted.
    evict: HashMap<ConnectionId, Arc<Notify>>,
    /// When refusals were last logged, and the counts then.
    warned: Option<(Instant, Stats)>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: formatting must never wait for (or deadlock on) the accept loop.
        let mut debug = f.debug_struct("Connections");
        if let Ok(state) = self.0.try_lock() {
            debug
                .field("caps", &state.limiter.caps())
                .field("stats", &state.limiter.stats());
        }
        debug.finish_non_exhaustive()
    }
}

impl Connections {
    pub fn new(caps: Caps) -> Connections {
        Connections(Arc::new(Mutex::new(State {
            limiter: Limiter::new(caps),
            evict: HashMap::new(),
            warned: None,
        })))
    }

    pub fn caps(&self) -> Caps {
        self.lock().limiter.caps()
    }

    /// What is held now and what was refused so far.
    pub fn stats(&self) -> Stats {
        self.lock().limiter.stats()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `source` or refuses it; the `Notify` fires if it is evicted
    /// later. Closes (through its task) the idle connection it displaces.
    fn open(
        &self,
        source: Option<Source>,
        hello_deadline: Instant,
    ) -> Result<(Slot, Arc<Notify>), Refusal> {
        let mut state = self.lock();
        let admitted = state.limiter.open(source);
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                state.warn_now_and_then();
                return Err(refusal);
            }
        };
        if let Some(old) = admitted.evict {
            if let Some(close) = state.evict.remove(&old) {
                // A permit: the task sees it even if it is not waiting yet.
                close.notify_one();
            }
            state.warn_now_and_then();
        }
        let evicted = Arc::new(Notify::new());
        state.evict.insert(admitted.id, evicted.clone());
        let slot = Slot(Arc::new(SlotInner {
            id: admitted.id,
            connections: self.clone(),
            hello_deadline,
        }));
        Ok((slot, evicted))
    }
}

impl State {
    /// Called on every refusal and eviction: logs the counts at warn, at most once per
    /// [`REFUSAL_LOG_INTERVAL`]. No addresses: those are at debug, where each refusal is.
    fn warn_now_and_then(&mut self) {
        let now = Instant::now();
        if let Some((at, _)) = self.warned
            && now.duration_since(at) < REFUSAL_LOG_INTERVAL
        {
            return;
        }
        let stats = self.limiter.stats();
        let before = self.warned.map(|(_, stats)| stats).unwrap_or_default();
        let caps = self.limiter.caps();
        tracing::warn!(
            refused_per_source = stats.refused_per_source - before.refused_per_source,
            refused_full = stats.refused_full - before.refused_full,
            refused_agents = stats.refused_agents - before.refused_agents,
            evicted_idle = stats.evicted - before.evicted,
            unauthenticated = stats.unauthenticated,
            agents = stats.agents,
            max_unauthenticated = caps.unauthenticated,
            max_per_source = caps.per_source,
            max_agents = caps.agents,
            "connections refused or closed to make room (counts since the last such warning)"
        );
        self.warned = Some((now, stats));
    }
}

/// A connection's place among the [`Connections`], shared by its task and the handlers of its
/// requests (a request extension); the place is free once every clone is dropped, so an
/// upgraded connection keeps it for as long as its WebSocket lives.
#[derive(Clone, Debug)]
pub struct Slot(Arc<SlotInner>);

#[derive(Debug)]
struct SlotInner {
    id: ConnectionId,
    connections: Connections,
    hello_deadline: Instant,
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        let mut state = self.connections.lock();
        state.limiter.close(self.id);
        state.evict.remove(&self.id);
    }
}

impl Slot {
    /// When the connection must have become an agent's: `hello_timeout` after accept.
    pub fn hello_deadline(&self) -> Instant {
        self.0.hello_deadline
    }

    /// Marks a request in flight until the guard is dropped: the connection is not idle, so
    /// never evicted, meanwhile. An upgraded connection holds one until it closes.
    pub fn busy(&self) -> Busy {
        self.0.connections.lock().limiter.busy(self.0.id);
        Busy(self.clone())
    }

    /// The client a trusted proxy's connection speaks for (a no-op for other connections).
    pub fn attribute(&self, client: IpAddr) -> Result<(), Refusal> {
        let mut state = self.0.connections.lock();
        let attributed = state.limiter.attribute(self.0.id, Source::of(client));
        if attributed.is_err() {
            state.warn_now_and_then();
        }
        attributed
    }

    /// The agent said hello: count the connection among the agents', if they have room.
    pub fn authenticate(&self) -> Result<(), Refusal> {
        let mut state = self.0.connections.lock();
        let authenticated = state.limiter.authenticate(self.0.id);
        if authenticated.is_ok() {
            // Never evicted now: nothing to close it with.
            state.evict.remove(&self.0.id);
        } else {
            state.warn_now_and_then();
        }
        authenticated
    }
}

/// A request in flight on a connection (see [`Slot::busy`]).
#[derive(Debug)]
pub struct Busy(Slot);

impl Busy {
    pub fn slot(&self) -> &Slot {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.connections.lock().limiter.idle(self.0.0.id);
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, with TLS if `settings.tls` is set.
///
/// Each admitted connection runs in its own task. When `shutdown` resolves the listener is
/// closed, every connection is asked to finish its request in flight and close (hyper's
/// graceful shutdown), and after [`SHUTDOWN_GRACE`] the ones left are dropped. Returns once
/// every connection task has ended; accept errors are logged and retried, never returned.
///
/// A connection upgraded to a WebSocket has left hyper: its task is the router's
/// (`WebSocketUpgrade::on_upgrade`), so shutdown neither waits for nor closes it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: Settings,
    connections: Connections,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let acceptor = settings.tls.clone().map(TlsAcceptor::from);
    let settings = Arc::new(settings);
    // `true` once shutting down; each connection task watches it.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            (stream, peer) = accept(&listener) => {
                let source = if settings.trusted_proxies.iter().any(|n| n.contains(peer.ip())) {
                    None
                } else {
                    Some(Source::of(peer.ip()))
                };
                let deadline = Instant::now() + settings.limits.hello_timeout;
                let (slot, evicted) = match connections.open(source, deadline) {
                    Ok(admitted) => admitted,
                    Err(refusal) => {
                        // Closed before anything is read: the descriptor is free at once.
                        tracing::debug!(%peer, ?refusal, "connection refused");
                        drop(stream);
                        continue;
                    }
                };
                tasks.spawn(connection(stream, Connection {
                    peer,
                    slot,
                    evicted,
                    acceptor: acceptor.clone(),
                    app: app.clone(),
                    settings: settings.clone(),
                    stopping: stopping_rx.clone(),
                }));
            }
            // Reap finished tasks so the set holds only live connections.
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
        }
    }

    drop(listener);
    stopping_tx.send_replace(true);
    tracing::debug!(
        connections = tasks.len(),
        "shutting down, waiting for connections"
    );
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = tasks.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            "connections still open after the shutdown grace period; closing them"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// The next connection. Errors about one connection are skipped; others (e.g. out of file
/// descriptors, which the caps are there to prevent) are logged and retried after a second so
/// the loop does not spin.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Each message (a grant, its answer) is one small write that someone waits
                // for: Nagle's algorithm would hold it for the peer's delayed ACK.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY");
                }
                return (stream, peer);
            }
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

/// An admitted connection's context: what its task needs besides the socket.
struct Connection {
    peer: SocketAddr,
    slot: Slot,
    /// Fires when the limiter closes this (idle) connection to make room for a newer one.
    evicted: Arc<Notify>,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    settings: Arc<Settings>,
    stopping: watch::Receiver<bool>,
}

/// One connection: the TLS handshake if any, then HTTP/1.1 until the peer closes, the
/// deadline, eviction or shutdown.
async fn connection(stream: TcpStream, mut conn: Connection) {
    let Some(acceptor) = conn.acceptor.take() else {
        return serve_http(stream, conn).await;
    };
    let peer = conn.peer;
    let handshake_deadline = (Instant::now() + conn.settings.limits.tls_handshake_timeout)
        .min(conn.slot.hello_deadline());
    let handshake = tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream));
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
        () = conn.evicted.notified() => return,
        // A peer still shaking hands at shutdown has no request in flight.
        () = stopped(&mut conn.stopping) => return,
    };
    serve_http(tls, conn).await;
}

/// HTTP/1.1 with upgrades on an established stream.
async fn serve_http<I>(io: I, mut conn: Connection)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let limits = &conn.settings.limits;
    let service = {
        let slot = conn.slot.clone();
        let app = conn.app.clone();
        service_fn(move |mut request: Request<Incoming>| {
            let busy = slot.busy();
            // What `into_make_service_with_connect_info::<SocketAddr>` gives handlers.
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(slot.clone());
            let response = app.clone().oneshot(request);
            async move {
                let response = response.await;
                drop(busy);
                response
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES);
    let mut http = pin!(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );

    let result = tokio::select! {
        result = http.as_mut() => result,
        // Idle: nothing in flight to finish.
        () = conn.evicted.notified() => {
            tracing::debug!(%peer, "idle connection closed to make room");
            return;
        }
        () = tokio::time::sleep_until(conn.slot.hello_deadline()) => {
            // Not an agent's by now (an upgraded connection has left hyper): finish the
            // request in flight, if any, and close. A client that does not even read its
            // response gets one more header read timeout.
            http.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_read_timeout, http.as_mut()).await {
                Ok(result) => result,
                Err(_elapsed) => return,
            }
        }
        () = stopped(&mut conn.stopping) => {
            // Finish the request in flight, then close; an upgraded connection (a WebSocket)
            // has left hyper already and is not waited for here.
            http.as_mut().graceful_shutdown();
            http.await
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
