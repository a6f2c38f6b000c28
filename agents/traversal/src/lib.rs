//! How two agents reach each other over one UDP socket, without IO.
//!
//! A [`Node`] is one agent's side of every connection it has. It knows
//! - its **host candidate**s: the addresses its socket has (the driver says which: the
//!   interface toward the portal, one per address family);
//! - its **relays**: TURN servers the portal named, with credentials minted for this agent. On
//!   each it keeps an allocation (refreshed before it lapses, made again when the relay loses
//!   it): the **relayed candidate**. It also asks each relay, every [`BINDING_INTERVAL`], the
//!   address the socket's packets come from as the relay sees them: behind NAT, that is the
//!   **server-reflexive candidate**, and the asking keeps the NAT's mapping alive;
//! - one ICE agent per **connection** (str0m's standalone agent, crate `is`), made by the
//!   caller for a peer with both sides' ICE credentials, which pairs local and remote
//!   candidates, checks the pairs and nominates one. The controlling side (the client) picks.
//!
//! The one socket carries WireGuard, STUN and TURN. [`Node::handle_datagram`] tells them apart:
//! what comes from a relay's address is TURN (the caller's datagrams relayed, or the relay's
//! own answers), what has STUN's magic cookie and parses is STUN (for the connection whose ICE
//! user name it bears), and the rest is the caller's, given back with the [`Path`] it came by.
//! [`Node::send`] sends a datagram by a path, wrapped for the relay when the path is relayed.
//! ICE nominates the best working pair and may nominate a better one later (a direct pair
//! after a relayed one) without an ICE restart: [`Event::Nominated`] says so each time, and
//! the caller moves its WireGuard peer to the new path without a new handshake.
//!
//! **Invariant:** a node talks only to relays and to connections the caller made. A STUN
//! request is answered only by the connection whose user name it bears and only when its
//! integrity checks with that connection's password; the gateway makes a connection only
//! for a client a grant names, so it says nothing to anybody else.
//!
//! **Invariant:** no IO and no clock: time is an argument, and every output comes from
//! [`Node::poll_transmit`], [`Node::poll_event`] and [`Node::poll_timeout`]. Randomness: STUN
//! transaction ids only. Any bytes give a result, never a panic.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use is::{Candidate, CandidateKind, IceAgent, IceAgentEvent, IceConnectionState, IceCreds};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::agent::Transmit as TurnTransmit;
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::types::stun::TransportType;
use turn_client_proto::types::stun::attribute::XorMappedAddress;
use turn_client_proto::types::stun::message::{
    BINDING, Message, MessageClass, MessageWrite as _, MessageWriteExt as _, MessageWriteVec,
    TransactionId,
};
use turn_client_proto::udp::TurnClientUdp;

/// How often a node asks each relay for its server-reflexive address. Under NAT timeouts for
/// UDP (30 s is common), so the mapping the address names stays.
pub const BINDING_INTERVAL: Duration = Duration::from_secs(25);

/// How fast ICE checks and gives a pair up: a check unanswered is sent again after
/// [`STUN_INITIAL_RTO`], then after twice that, doubling up to [`STUN_MAX_RTO`], at most
/// [`STUN_MAX_RETRANSMITS`] times, so a path that stops answering is given up about 4.5 s
/// after its last answer (str0m's defaults, made for browsers, take about 21 s). That keeps
/// the recovery from a relay restart or a roaming peer inside the design's ten seconds.
///
/// The first check of a pair often goes unanswered for want of a hole the peer's check has
/// not punched yet, or a permission the peer's relay has not installed yet: resending it after
/// 100 ms rather than str0m's 250 ms is most of what keeps a first connection through a relay
/// under 300 ms.
pub const STUN_INITIAL_RTO: Duration = Duration::from_millis(100);
pub const STUN_MAX_RTO: Duration = Duration::from_secs(1);
pub const STUN_MAX_RETRANSMITS: usize = 6;

/// The pace of new checks (ICE's Ta): one pair every 20 ms rather than the 50 ms RFC 8445
/// suggests for browsers with dozens of pairs. Pairs through a relay come last by priority,
/// and an agent here has a handful of pairs per peer: all are under way within 150 ms.
pub const TIMING_ADVANCE: Duration = Duration::from_millis(20);

/// A relay through which a node keeps sending but from which no peer's datagram has come
/// for this long has most likely lost the allocation (it restarted: it drops what comes for
/// an allocation it does not know, and says nothing); the node allocates again. A live peer
/// answers well within it: a gateway lets a sending client hear from it every 2 s.
pub const RELAY_SILENCE: Duration = Duration::from_secs(5);
/// Each allocation made again for silence doubles the silence the next one needs, up to
/// this: a peer that is gone for good costs a new allocation a minute, not one every 5 s.
const MAX_RELAY_SILENCE: Duration = Duration::from_secs(60);

/// How long a node gives a relay to take the deletion of an allocation in before it asks for
/// a new one from the same address and port.
const DELETION_SETTLES: Duration = Duration::from_millis(500);

/// How long a node waits before asking a relay again for an allocation it lost or never got.
pub const RELAY_RETRY: Duration = Duration::from_secs(2);

/// The most peer addresses a node remembers as reached through a relay; past it, it forgets
/// them all (replies go direct until the next relayed datagram), which only peers a
/// connection gave permission to can cause.
const MAX_ROUTES: usize = 4096;

/// STUN's magic cookie, at bytes 4..8 of every STUN message (RFC 5389).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The ICE user name fragment and password of one side of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub ufrag: String,
    pub password: String,
}

impl Credentials {
    fn to_ice(&self) -> IceCreds {
        IceCreds {
            ufrag: self.ufrag.clone(),
            pass: self.password.clone(),
        }
    }
}

/// Which side of a connection picks the pair (ICE's controlling agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Controlling,
    Controlled,
}

/// How datagrams travel between this node and a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// From this node's socket to `remote`, which may be the peer's NAT.
    Direct { remote: SocketAddr },
    /// Through this node's allocation on the relay at `relay`, to `remote`.
    Relayed {
        relay: SocketAddr,
        remote: SocketAddr,
    },
}

impl Path {
    fn relay_server(&self) -> Option<SocketAddr> {
        match self {
            Path::Direct { .. } => None,
            Path::Relayed { relay, .. } => Some(*relay),
        }
    }

    /// The peer's address on this path: where its datagrams come from, as WireGuard sees it.
    pub fn remote(&self) -> SocketAddr {
        match self {
            Path::Direct { remote } | Path::Relayed { remote, .. } => *remote,
        }
    }
}

/// What a node has to say to its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<K> {
    /// A local candidate for `connection`'s peer, as an ICE candidate line: the caller sends
    /// it to the peer (through the portal).
    Candidate { connection: K, candidate: String },
    /// ICE nominated a path for `connection` (again): its datagrams go this way from now on.
    /// `relay` is the address of the relay it goes through, if any: this node's (the path is
    /// [`Path::Relayed`]) or the peer's (a direct path to the peer's relayed candidate).
    Nominated {
        connection: K,
        path: Path,
        relay: Option<IpAddr>,
    },
    /// Every pair of `connection` stopped answering. ICE goes on checking: a pair that works
    /// again brings a new [`Event::Nominated`].
    Disconnected { connection: K },
}

/// What a datagram was.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// The caller's (WireGuard), and the path it came by.
    Data { path: Path, payload: Cow<'a, [u8]> },
    /// STUN or TURN, taken care of.
    Handled,
    /// Nothing this node expects (STUN for no connection, TURN from a relay it has no
    /// allocation on): dropped without an answer.
    Dropped,
}

/// A datagram to send from the node's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}

/// A relay the portal named, and what this node holds on it.
struct Relay {
    server: SocketAddr,
    username: String,
    password: String,
    /// The allocation under way or made; `None` while waiting for `retry_at`.
    client: Option<TurnClientUdp>,
    relayed: Option<SocketAddr>,
    reflexive: Option<SocketAddr>,
    /// The binding request waiting for its answer.
    binding: Option<TransactionId>,
    next_binding: Instant,
    retry_at: Option<Instant>,
    /// When the node last sent through the allocation, and last heard a peer through it.
    sent_at: Option<Instant>,
    heard_at: Instant,
    /// How much silence makes the allocation suspect now ([`RELAY_SILENCE`], doubled by
    /// each suspicion that heard nothing after).
    silence_limit: Duration,
    /// Peer addresses the allocation was asked to let through ([`Relay::open_to`]): asking
    /// twice for one would bind a second channel to it, which the relay refuses.
    opened: HashSet<SocketAddr>,
    /// When the TURN client wants to be polled next, as it said at its last poll.
    wake_at: Option<Instant>,
}

impl Relay {
    /// Lets `remote` reach this node through the allocation, and this node it: a channel where
    /// one can be bound (4 bytes of header a datagram instead of a Send indication's 36, and
    /// the relay forwards it without reading STUN), else a permission for its address. Past
    /// [`MAX_ROUTES`] peers, permissions only.
    fn open_to(&mut self, remote: SocketAddr, at: turn_client_proto::stun::Instant) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        if self.relayed.is_none() || self.opened.contains(&remote) {
            return;
        }
        let bound = self.opened.len() < MAX_ROUTES
            && client.bind_channel(TransportType::Udp, remote, at).is_ok();
        if bound {
            self.opened.insert(remote);
        } else if !client.have_permission(TransportType::Udp, remote.ip()) {
            let _ = client.create_permission(TransportType::Udp, remote.ip(), at);
        }
    }
}

impl Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("server", &self.server)
            .field("relayed", &self.relayed)
            .field("reflexive", &self.reflexive)
            .finish_non_exhaustive()
    }
}

struct Connection {
    agent: IceAgent,
    path: Option<Path>,
}

/// One agent's connections to its peers, keyed by `K` (the peer's WireGuard key, say).
pub struct Node<K> {
    /// The origin of the TURN client's clock (it counts from a zero of its own).
    epoch: Instant,
    host: Vec<SocketAddr>,
    relays: Vec<Relay>,
    connections: HashMap<K, Connection>,
    /// Each connection by its local ICE user name fragment, which a peer's requests name.
    by_ufrag: HashMap<String, K>,
    /// Peer addresses last heard from, or nominated, through a relay: datagrams to them go
    /// back the same way ([`Node::path_to`]). Empty while every path is direct.
    routes: HashMap<SocketAddr, Path>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event<K>>,
}

impl<K> Debug for Node<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("host", &self.host)
            .field("relays", &self.relays)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

impl<K: Clone + Eq + Hash + Debug> Node<K> {
    /// A node whose socket has the addresses `host` (its host candidates).
    pub fn new(host: Vec<SocketAddr>, now: Instant) -> Node<K> {
        Node {
            epoch: now,
            host,
            relays: Vec::new(),
            connections: HashMap::new(),
            by_ufrag: HashMap::new(),
            routes: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The relays to use from now on, with their credentials. A relay whose credentials are
    /// new gets a new allocation (its old relayed candidate goes); a relay no longer named is
    /// left (its allocation deleted).
    pub fn set_relays(&mut self, relays: &[fz_proto::Relay], now: Instant) {
        let mut kept = Vec::with_capacity(relays.len());
        let mut old = std::mem::take(&mut self.relays);
        for wanted in relays {
            let same = old.iter().position(|r| {
                r.server == wanted.address
                    && r.username == wanted.username
                    && r.password == wanted.password
            });
            match same {
                Some(index) => kept.push(old.swap_remove(index)),
                None => kept.push(Relay {
                    server: wanted.address,
                    username: wanted.username.clone(),
                    password: wanted.password.clone(),
                    client: None,
                    relayed: None,
                    reflexive: None,
                    binding: None,
                    next_binding: now,
                    retry_at: Some(now),
                    sent_at: None,
                    heard_at: now,
                    silence_limit: RELAY_SILENCE,
                    opened: HashSet::new(),
                    wake_at: None,
                }),
            }
        }
        for mut gone in old {
            self.forget_candidates(&gone);
            if let Some(client) = gone.client.as_mut() {
                let _ = client.delete(self.turn_time(now));
                self.drain_turn(client, now);
            }
        }
        self.relays = kept;
        self.handle_timeout(now);
    }

    /// Starts ICE with a peer. Both sides' credentials come from the portal (in the grant);
    /// the peer's candidates follow with [`Node::add_remote_candidate`]. Making it again
    /// starts over.
    pub fn connect(
        &mut self,
        connection: K,
        role: Role,
        local: &Credentials,
        remote: &Credentials,
        now: Instant,
    ) {
        self.disconnect(&connection);
        let mut agent = IceAgent::new(local.to_ice());
        agent.set_max_stun_rto(STUN_MAX_RTO);
        agent.set_initial_stun_rto(STUN_INITIAL_RTO);
        agent.set_timing_advance(TIMING_ADVANCE);
        agent.set_max_stun_retransmits(STUN_MAX_RETRANSMITS);
        agent.set_controlling(role == Role::Controlling);
        agent.set_remote_credentials(remote.to_ice());
        for candidate in self.local_candidates() {
            if let Some(added) = agent.add_local_candidate(candidate) {
                self.events.push_back(Event::Candidate {
                    connection: connection.clone(),
                    candidate: added.to_sdp_string(),
                });
            }
        }
        agent.handle_timeout(now);
        self.by_ufrag
            .insert(local.ufrag.clone(), connection.clone());
        self.connections
            .insert(connection, Connection { agent, path: None });
        self.flush_ice(now);
    }

    /// Says every local candidate of `connection` again ([`Event::Candidate`]): for a peer
    /// that may have started over (a new grant for the pair, a restarted agent) and lost
    /// what it heard.
    pub fn announce(&mut self, connection: &K) {
        let Some(entry) = self.connections.get(connection) else {
            return;
        };
        for candidate in entry.agent.local_candidates() {
            self.events.push_back(Event::Candidate {
                connection: connection.clone(),
                candidate: candidate.to_sdp_string(),
            });
        }
    }

    /// Ends ICE with a peer: its checks stop and its STUN goes unanswered.
    pub fn disconnect(&mut self, connection: &K) {
        if self.connections.remove(connection).is_some() {
            self.by_ufrag.retain(|_, k| k != connection);
        }
    }

    /// A candidate line the peer of `connection` sent. A line that does not parse is refused
    /// with the reason; a candidate for an unknown connection is ignored.
    pub fn add_remote_candidate(
        &mut self,
        connection: &K,
        candidate: &str,
        now: Instant,
    ) -> Result<(), String> {
        let parsed = Candidate::from_sdp_string(candidate).map_err(|e| e.to_string())?;
        let Some(entry) = self.connections.get_mut(connection) else {
            return Ok(());
        };
        let address = parsed.addr();
        entry.agent.add_remote_candidate(parsed);
        entry.agent.handle_timeout(now);
        // Relays forward only from peers with a permission: one per remote address, on every
        // allocation, so that any pair through any relay can be checked.
        let at = self.turn_time(now);
        for relay in &mut self.relays {
            relay.open_to(address, at);
        }
        self.flush_turn(now);
        self.flush_ice(now);
        Ok(())
    }

    /// An address the peer of `connection` has (one it said at hello, say), as a host
    /// candidate.
    pub fn add_remote_address(&mut self, connection: &K, address: SocketAddr, now: Instant) {
        if let Ok(candidate) = Candidate::host(address, "udp") {
            let line = candidate.to_sdp_string();
            // A line made from a valid candidate parses.
            let _ = self.add_remote_candidate(connection, &line, now);
        }
    }

    /// How to reach `remote`: back through the relay it was last heard from (or nominated
    /// through), else directly.
    pub fn path_to(&self, remote: SocketAddr) -> Path {
        if self.routes.is_empty() {
            return Path::Direct { remote };
        }
        self.routes
            .get(&remote)
            .copied()
            .unwrap_or(Path::Direct { remote })
    }

    /// The caller has heard nothing from the peer of `connection` for a while although it
    /// sent: every pair is checked again now, from the candidates known now. ICE by itself
    /// keeps a path it heard a check on lately for 15 s, however dead its data is (a relay
    /// that restarted passes checks no more, but the last ones came recently).
    pub fn recheck(&mut self, connection: &K, now: Instant) {
        if let Some(entry) = self.connections.get_mut(connection) {
            entry.agent.recreate_candidate_pairs();
            entry.agent.handle_timeout(now);
        }
        self.flush_ice(now);
    }

    /// The path `connection` sends by, once ICE nominated one.
    pub fn path(&self, connection: &K) -> Option<Path> {
        self.connections.get(connection)?.path
    }

    /// A datagram that arrived on the socket from `from`.
    pub fn handle_datagram<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &'a [u8],
        now: Instant,
    ) -> Received<'a> {
        if let Some(index) = self.relays.iter().position(|r| r.server == from) {
            return self.handle_relayed(index, datagram, now);
        }
        if is_stun(datagram) {
            let Some(local) = self.host_for(from) else {
                return Received::Dropped;
            };
            return if self.handle_stun(from, local, datagram, now) {
                Received::Handled
            } else {
                Received::Dropped
            };
        }
        if !self.routes.is_empty() {
            self.routes.remove(&from);
        }
        Received::Data {
            path: Path::Direct { remote: from },
            payload: Cow::Borrowed(datagram),
        }
    }

    fn remember_route(&mut self, path: Path) {
        match path {
            Path::Direct { remote } => {
                self.routes.remove(&remote);
            }
            Path::Relayed { remote, .. } => {
                if self.routes.len() >= MAX_ROUTES && !self.routes.contains_key(&remote) {
                    self.routes.clear();
                }
                self.routes.insert(remote, path);
            }
        }
    }

    /// The caller's datagram for `remote` as it is to leave the socket, by the path
    /// [`Node::path_to`] gives: itself when direct (borrowed, never copied), wrapped for the
    /// relay when relayed; `None` when the relay cannot carry it (yet). The path comes back too,
    /// for the caller's byte counts.
    pub fn route<'a>(
        &mut self,
        remote: SocketAddr,
        datagram: Cow<'a, [u8]>,
        now: Instant,
    ) -> Option<(Path, SocketAddr, Cow<'a, [u8]>)> {
        let path = self.path_to(remote);
        match path {
            Path::Direct { .. } => Some((path, remote, datagram)),
            Path::Relayed { .. } => {
                let relayed = self.send(path, &datagram, now)?;
                Some((path, relayed.destination, Cow::Owned(relayed.payload)))
            }
        }
    }

    /// The caller's datagram sent by `path`; `None` when the path's relay has no allocation
    /// (any more) or no permission for the peer yet.
    pub fn send(&mut self, path: Path, payload: &[u8], now: Instant) -> Option<Transmit> {
        match path {
            Path::Direct { remote } => Some(Transmit {
                destination: remote,
                payload: payload.to_vec(),
            }),
            Path::Relayed { relay, remote } => {
                let at = self.turn_time(now);
                let relay = self.relays.iter_mut().find(|r| r.server == relay)?;
                relay.sent_at = Some(now);
                let client = relay.client.as_mut()?;
                let built = match client.send_to(TransportType::Udp, remote, payload, at) {
                    Ok(Some(built)) => built.build(),
                    Ok(None) => return None,
                    Err(error) => {
                        tracing::debug!(relay = %relay.server, %remote, %error, "the relay cannot carry a datagram");
                        return None;
                    }
                };
                Some(Transmit {
                    destination: built.to,
                    payload: built.data,
                })
            }
        }
    }

    /// Time passed: ICE checks and keepalives, relay refreshes and retries, binding requests.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent: Vec<SocketAddr> = self
            .relays
            .iter_mut()
            .filter(|r| {
                r.relayed.is_some()
                    && r.sent_at.is_some_and(|sent| {
                        sent > r.heard_at
                            && now.saturating_duration_since(r.heard_at) >= r.silence_limit
                            && now.saturating_duration_since(sent) < RELAY_SILENCE
                    })
            })
            .map(|r| {
                r.silence_limit = (r.silence_limit * 2).min(MAX_RELAY_SILENCE);
                r.server
            })
            .collect();
        for relay in silent {
            self.allocate_again(relay, now);
        }
        for index in 0..self.relays.len() {
            let relay = &mut self.relays[index];
            if relay.client.is_none() && relay.retry_at.is_some_and(|at| at <= now) {
                relay.retry_at = None;
                match self
                    .host
                    .iter()
                    .find(|h| h.is_ipv4() == relay.server.is_ipv4())
                {
                    Some(local) => {
                        relay.opened.clear();
                        relay.client = Some(TurnClientUdp::allocate(
                            *local,
                            relay.server,
                            TurnConfig::new(TurnCredentials::new(&relay.username, &relay.password)),
                        ));
                    }
                    None => {
                        tracing::debug!(relay = %relay.server, "no host address of the relay's family")
                    }
                }
            }
            if relay.next_binding <= now {
                relay.next_binding = now + BINDING_INTERVAL;
                let request = Message::builder_request(BINDING, MessageWriteVec::new());
                relay.binding = Some(request.transaction_id());
                self.transmits.push_back(Transmit {
                    destination: relay.server,
                    payload: request.finish(),
                });
            }
        }
        self.flush_turn(now);
        for connection in self.connections.values_mut() {
            connection.agent.handle_timeout(now);
        }
        self.flush_ice(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event<K>> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] is due next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        let mut consider = |at: Instant| {
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        };
        for relay in &self.relays {
            consider(relay.next_binding);
            relay
                .retry_at
                .into_iter()
                .chain(relay.wake_at)
                .for_each(&mut consider);
        }
        for connection in self.connections.values_mut() {
            if let Some(at) = connection.agent.poll_timeout() {
                consider(at);
            }
        }
        earliest
    }

    // ---- inside ----

    fn turn_time(&self, now: Instant) -> turn_client_proto::stun::Instant {
        turn_at(self.epoch, now)
    }

    /// The host candidate of `remote`'s family: where a direct datagram from it arrived.
    fn host_for(&self, remote: SocketAddr) -> Option<SocketAddr> {
        self.host
            .iter()
            .find(|h| h.is_ipv4() == remote.is_ipv4())
            .copied()
    }

    fn local_candidates(&self) -> Vec<Candidate> {
        let mut candidates = Vec::new();
        for host in &self.host {
            candidates.extend(Candidate::host(*host, "udp").ok());
        }
        for relay in &self.relays {
            let Some(base) = self.host_for(relay.server) else {
                continue;
            };
            if let Some(reflexive) = relay.reflexive
                && !self.host.contains(&reflexive)
            {
                candidates.extend(Candidate::server_reflexive(reflexive, base, "udp").ok());
            }
            if let Some(relayed) = relay.relayed {
                candidates.extend(Candidate::relayed(relayed, base, "udp").ok());
            }
        }
        candidates
    }

    /// A local candidate came: every connection gets it, and its peer hears of it.
    fn add_local_candidate(&mut self, candidate: Candidate, now: Instant) {
        for (key, connection) in &mut self.connections {
            if let Some(added) = connection.agent.add_local_candidate(candidate.clone()) {
                self.events.push_back(Event::Candidate {
                    connection: key.clone(),
                    candidate: added.to_sdp_string(),
                });
            }
            connection.agent.handle_timeout(now);
        }
        self.flush_ice(now);
    }

    /// A relay's candidates went (its allocation was lost or replaced).
    fn forget_candidates(&mut self, relay: &Relay) {
        self.invalidate_relayed(relay.server, relay.relayed);
    }

    /// The relay at `index` has no allocation any more: its relayed candidate goes.
    fn forget_relayed(&mut self, index: usize) {
        let relayed = self.relays[index].relayed.take();
        self.invalidate_relayed(self.relays[index].server, relayed);
    }

    fn invalidate_relayed(&mut self, server: SocketAddr, relayed: Option<SocketAddr>) {
        let (Some(base), Some(relayed)) = (self.host_for(server), relayed) else {
            return;
        };
        let Ok(candidate) = Candidate::relayed(relayed, base, "udp") else {
            return;
        };
        for connection in self.connections.values_mut() {
            connection.agent.invalidate_candidate(&candidate);
        }
        self.routes
            .retain(|_, path| path.relay_server() != Some(server));
    }

    fn handle_relayed<'a>(
        &mut self,
        index: usize,
        datagram: &'a [u8],
        now: Instant,
    ) -> Received<'a> {
        if self.take_binding_answer(index, datagram, now) {
            return Received::Handled;
        }
        let at = self.turn_time(now);
        let relay = &mut self.relays[index];
        let server = relay.server;
        let Some(client) = relay.client.as_mut() else {
            return Received::Dropped;
        };
        let local = client.local_addr();
        let received = client.recv(
            TurnTransmit {
                data: datagram,
                transport: TransportType::Udp,
                from: server,
                to: local,
            },
            at,
        );
        let peer = match received {
            TurnRecvRet::Handled => {
                self.flush_turn(now);
                return Received::Handled;
            }
            TurnRecvRet::Ignored(_) | TurnRecvRet::PeerIcmp { .. } => return Received::Dropped,
            TurnRecvRet::PeerData(peer) => peer,
        };
        let remote = peer.peer;
        let payload = peer.data().to_vec();
        self.relays[index].heard_at = now;
        self.relays[index].silence_limit = RELAY_SILENCE;
        let Some(relayed) = self.relays[index].relayed else {
            return Received::Dropped;
        };
        if is_stun(&payload) {
            return if self.handle_stun(remote, relayed, &payload, now) {
                Received::Handled
            } else {
                Received::Dropped
            };
        }
        let path = Path::Relayed {
            relay: server,
            remote,
        };
        self.remember_route(path);
        Received::Data {
            path,
            payload: Cow::Owned(payload),
        }
    }

    /// The relay's answer to our binding request: the server-reflexive address.
    fn take_binding_answer(&mut self, index: usize, datagram: &[u8], now: Instant) -> bool {
        let relay = &mut self.relays[index];
        let Some(expected) = relay.binding else {
            return false;
        };
        let Ok(message) = Message::from_bytes(datagram) else {
            return false;
        };
        if message.transaction_id() != expected {
            return false;
        }
        relay.binding = None;
        if !message.has_class(MessageClass::Success) {
            return true;
        }
        let Ok(mapped) = message.attribute::<XorMappedAddress>() else {
            return true;
        };
        let address = mapped.addr(expected);
        if relay.reflexive == Some(address) {
            return true;
        }
        relay.reflexive = Some(address);
        let Some(base) = self.host_for(address) else {
            return true;
        };
        if !self.host.contains(&address)
            && let Ok(candidate) = Candidate::server_reflexive(address, base, "udp")
        {
            self.add_local_candidate(candidate, now);
        }
        true
    }

    /// A STUN message for ICE, from `remote` to our candidate `local`. True if a connection
    /// took it.
    fn handle_stun(
        &mut self,
        remote: SocketAddr,
        local: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> bool {
        let Ok(message) = is::stun::StunMessage::parse(datagram) else {
            return false;
        };
        // Requests name the connection (`our-ufrag:their-ufrag`); answers to our checks are
        // matched by each agent to its own transactions.
        let named = message
            .split_username()
            .and_then(|(ours, _)| self.by_ufrag.get(ours))
            .cloned();
        let packet = is::stun::StunPacket {
            proto: is::Protocol::Udp,
            source: remote,
            destination: local,
            message,
        };
        let taken = match named {
            Some(key) => self
                .connections
                .get_mut(&key)
                .is_some_and(|c| c.agent.handle_packet(now, packet)),
            None if packet.message.is_binding_request() => false,
            None => self
                .connections
                .values_mut()
                .find(|c| c.agent.accepts_message(&packet.message))
                .is_some_and(|c| c.agent.handle_packet(now, packet)),
        };
        self.flush_ice(now);
        taken
    }

    /// Moves what the ICE agents have to send and say into the node's queues.
    fn flush_ice(&mut self, now: Instant) {
        let mut relayed_sends = Vec::new();
        let mut nominated = Vec::new();
        let mut relays_suspect = false;
        let mut recheck = Vec::new();
        for (key, connection) in &mut self.connections {
            while let Some(transmit) = connection.agent.poll_transmit() {
                let payload: Vec<u8> = transmit.contents.into();
                if self.host.contains(&transmit.source) {
                    self.transmits.push_back(Transmit {
                        destination: transmit.destination,
                        payload,
                    });
                } else if !connection
                    .agent
                    .remote_candidates()
                    .any(|c| c.addr() == transmit.destination && c.kind() == CandidateKind::Relayed)
                {
                    // From a relay to a relay is never checked, so never chosen: wherever both
                    // sides have an allocation, the way from this socket to the peer's relayed
                    // address works too (the peer's allocation lets this side's public address
                    // in), through one relay instead of two; and paths through two
                    // allocations of one coturn proved unreliable under test.
                    relayed_sends.push((transmit.source, transmit.destination, payload));
                }
            }
            while let Some(event) = connection.agent.poll_event() {
                match event {
                    IceAgentEvent::NominatedSend {
                        source,
                        destination,
                        ..
                    } => {
                        let (path, relay) =
                            match self.relays.iter().find(|r| r.relayed == Some(source)) {
                                Some(relay) => (
                                    Path::Relayed {
                                        relay: relay.server,
                                        remote: destination,
                                    },
                                    Some(relay.server.ip()),
                                ),
                                None => {
                                    let peers_relay =
                                        connection.agent.remote_candidates().any(|c| {
                                            c.addr() == destination
                                                && c.kind() == CandidateKind::Relayed
                                        });
                                    (
                                        Path::Direct {
                                            remote: destination,
                                        },
                                        peers_relay.then_some(destination.ip()),
                                    )
                                }
                            };
                        if connection.path != Some(path) {
                            connection.path = Some(path);
                            nominated.push(path);
                            self.events.push_back(Event::Nominated {
                                connection: key.clone(),
                                path,
                                relay,
                            });
                        }
                    }
                    IceAgentEvent::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        self.events.push_back(Event::Disconnected {
                            connection: key.clone(),
                        });
                        // Every pair failed. A relay that restarted forgets allocations
                        // without a word, and a path through either side's allocation dies
                        // with it: the node allocates again on every relay (its new relayed
                        // candidates go to its peers), and the pairs ICE gave up are checked
                        // again, so a path that comes back is found.
                        relays_suspect = true;
                        connection.path = None;
                        recheck.push(key.clone());
                    }
                    _ => {}
                }
            }
        }
        for path in nominated {
            self.remember_route(path);
        }
        if relays_suspect {
            let servers: Vec<SocketAddr> = self.relays.iter().map(|r| r.server).collect();
            for relay in servers {
                self.allocate_again(relay, now);
            }
        }
        for key in recheck {
            if let Some(connection) = self.connections.get_mut(&key) {
                connection.agent.recreate_candidate_pairs();
                connection.agent.handle_timeout(now);
            }
        }
        for (source, destination, payload) in relayed_sends {
            let Some(relay) = self.relays.iter().find(|r| r.relayed == Some(source)) else {
                continue;
            };
            let path = Path::Relayed {
                relay: relay.server,
                remote: destination,
            };
            if let Some(transmit) = self.send(path, &payload, now) {
                self.transmits.push_back(transmit);
            }
        }
    }

    /// Moves what the TURN clients have to send into the queue, and acts on their events.
    fn flush_turn(&mut self, now: Instant) {
        let at = self.turn_time(now);
        let mut created = Vec::new();
        for index in 0..self.relays.len() {
            let Some(closed) = self.poll_relay(index, at) else {
                continue;
            };
            let relay = &mut self.relays[index];
            let Some(client) = relay.client.as_mut() else {
                continue;
            };
            while let Some(event) = client.poll_event() {
                match event {
                    TurnEvent::AllocationCreated(TransportType::Udp, relayed) => {
                        relay.relayed = Some(relayed);
                        relay.heard_at = now;
                        relay.sent_at = None;
                        created.push(index);
                    }
                    TurnEvent::AllocationCreateFailed(_) => {
                        tracing::warn!(relay = %relay.server, "the relay refused an allocation");
                    }
                    TurnEvent::ChannelCreateFailed(_, peer) => {
                        tracing::debug!(relay = %relay.server, %peer, "the relay refused a channel");
                        relay.opened.remove(&peer);
                    }
                    _ => {}
                }
            }
            if closed {
                tracing::info!(relay = %relay.server, "the relay allocation ended; asking again");
                relay.client = None;
                relay.wake_at = None;
                relay.retry_at = Some(now + RELAY_RETRY);
            }
        }
        // A relay that lost its allocation takes its relayed candidate with it.
        let lost: Vec<usize> = (0..self.relays.len())
            .filter(|&i| self.relays[i].client.is_none() && self.relays[i].relayed.is_some())
            .collect();
        for index in lost {
            self.forget_relayed(index);
        }
        for index in created {
            let Some(base) = self.host_for(self.relays[index].server) else {
                continue;
            };
            let Some(relayed) = self.relays[index].relayed else {
                continue;
            };
            // Channels for every peer address known so far.
            let remotes: Vec<SocketAddr> = self
                .connections
                .values()
                .flat_map(|c| c.agent.remote_candidates().map(|r| r.addr()))
                .collect();
            for remote in remotes {
                self.relays[index].open_to(remote, at);
            }
            // The channel bindings go out, and their retransmissions count in the wake time.
            self.poll_relay(index, at);
            if let Ok(candidate) = Candidate::relayed(relayed, base, "udp") {
                self.add_local_candidate(candidate, now);
            }
        }
    }

    /// Polls the TURN client of relay `index` at `at` (only ever at the present: a poll at
    /// another time acts on its timers early): what it has to send is queued, and when it
    /// wants the next poll is kept for [`Node::poll_timeout`]. Whether the allocation closed;
    /// `None` without a client.
    fn poll_relay(&mut self, index: usize, at: turn_client_proto::stun::Instant) -> Option<bool> {
        let relay = &mut self.relays[index];
        let Some(client) = relay.client.as_mut() else {
            relay.wake_at = None;
            return None;
        };
        let answer = client.poll(at);
        let closed = matches!(answer, TurnPollRet::Closed);
        relay.wake_at = relay_time(self.epoch, answer);
        queue_transmits(client, at, &mut self.transmits);
        Some(closed)
    }

    /// Drops the allocation on `relay` (its relayed candidate goes) and asks for a new one
    /// at once: what a relay that restarted needs, since it forgot the old one.
    fn allocate_again(&mut self, relay: SocketAddr, now: Instant) {
        let Some(index) = self.relays.iter().position(|r| r.server == relay) else {
            return;
        };
        let Some(mut old) = self.relays[index].client.take() else {
            return;
        };
        tracing::info!(%relay, "the relay's allocation seems lost; allocating again");
        // Deleted first: a relay that still has it (only the path to it broke) would refuse
        // a new allocation from the same address and port while the old one lives.
        let _ = old.delete(self.turn_time(now));
        self.drain_turn(&mut old, now);
        // The new allocation waits for the deletion to be through: on one address and port
        // the relay keeps one nonce, and an answer to the deletion would change it under the
        // new allocation's feet.
        self.relays[index].retry_at = Some(now + DELETION_SETTLES);
        self.forget_relayed(index);
    }

    fn drain_turn(&mut self, client: &mut TurnClientUdp, now: Instant) {
        queue_transmits(client, self.turn_time(now), &mut self.transmits);
    }
}

/// What a TURN client has to send, into `queue`.
fn queue_transmits(
    client: &mut TurnClientUdp,
    at: turn_client_proto::stun::Instant,
    queue: &mut VecDeque<Transmit>,
) {
    while let Some(transmit) = client.poll_transmit(at) {
        queue.push_back(Transmit {
            destination: transmit.to,
            payload: transmit.data.as_ref().to_vec(),
        });
    }
}

fn turn_at(epoch: Instant, now: Instant) -> turn_client_proto::stun::Instant {
    let nanos = now.saturating_duration_since(epoch).as_nanos();
    turn_client_proto::stun::Instant::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

/// When a TURN client wants to be polled again, on our clock.
fn relay_time(epoch: Instant, answer: TurnPollRet) -> Option<Instant> {
    match answer {
        TurnPollRet::WaitUntil(at) => {
            let since = at.saturating_duration_since(turn_client_proto::stun::Instant::ZERO);
            epoch.checked_add(since)
        }
        _ => None,
    }
}

/// STUN by its header: the two top bits clear, the magic cookie, and a length that is the
/// datagram's. A WireGuard message never is: its type byte is 1 to 4 followed by three zero
/// bytes, so its "length" would be 0, and every WireGuard message is longer than 20 bytes.
fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= 20
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE
        && usize::from(u16::from_be_bytes([datagram[2], datagram[3]])) + 20 == datagram.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_is_never_taken_for_stun() {
        // A handshake initiation whose sender index happens to be the magic cookie.
        let mut initiation = vec![1, 0, 0, 0];
        initiation.extend(MAGIC_COOKIE);
        initiation.resize(148, 7);
        assert!(!is_stun(&initiation));
        let request = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
        assert!(is_stun(&request));
    }

    #[test]
    fn any_bytes_from_anyone_give_an_answer() {
        let now = Instant::now();
        let mut node: Node<u8> = Node::new(vec!["192.0.2.1:51820".parse().unwrap()], now);
        node.set_relays(
            &[fz_proto::Relay {
                address: "203.0.113.5:3478".parse().unwrap(),
                username: "1:a".into(),
                password: "p".into(),
                expires_at: 1,
            }],
            now,
        );
        let mut seed = 1u32;
        for length in 0..300 {
            let bytes: Vec<u8> = (0..length)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 24) as u8
                })
                .collect();
            for from in ["198.51.100.7:4000", "203.0.113.5:3478"] {
                let _ = node.handle_datagram(from.parse().unwrap(), &bytes, now);
            }
        }
        // STUN that names no connection gets no answer.
        let request = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
        while node.poll_transmit().is_some() {}
        assert_eq!(
            node.handle_datagram("198.51.100.7:4000".parse().unwrap(), &request, now),
            Received::Dropped
        );
        assert_eq!(node.poll_transmit(), None);
    }
}
