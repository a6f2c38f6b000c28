//! The gateway's state machine: verified grants become WireGuard peers, packet filters and
//! NAT entries; packets from clients and from the site go through them or are dropped and
//! counted.
//!
//! The driver owns the UDP socket, the TUN device, the portal connection, the resolver and
//! the timer, and calls in this order (as quinn's `Connection` does):
//! - inputs: [`Gateway::handle_network`] (a datagram from the WireGuard port),
//!   [`Gateway::handle_tun`] (a packet from the site), [`Gateway::handle_portal`],
//!   [`Gateway::handle_resolved`], [`Gateway::handle_timeout`];
//! - outputs, drained after every input: [`Gateway::poll_transmit`] (datagrams that were not
//!   the direct answer to an input: queued packets after a handshake, timers),
//!   [`Gateway::poll_event`] (messages to the portal, names to resolve, what to log), and
//!   [`Gateway::poll_timeout`] (when to call `handle_timeout` next).
//!
//! The packet path answers in place: `handle_network` and `handle_tun` write into the
//! caller's buffer and return what to do with it, without allocating.
//!
//! INVARIANT: default deny. A handshake gets an answer only from a key some installed grant
//! names (under a handshake flood, WireGuard's cookie reply goes to any sender that knows our
//! public key before its key is read: a challenge, counted, that says nothing of grants); a
//! packet from a client goes on only when one of its grants' filters passes it; a
//! packet from the site goes back only to a client whose grant covers its source. A grant is
//! installed only after it verifies against the pinned portal key, and it is gone (filter,
//! NAT entries, and the peer with its last grant) the moment it is revoked or expires.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use fz_proto::{
    GatewayMessage, Grant, Identity, MAX_CANDIDATE_LENGTH, MAX_CANDIDATES, PathKind,
    PortalPublicKey, PortalToGateway, PublicKey, Resolution, SignedGrant, UnixTime,
};
use fz_traversal::{Event as TraversalEvent, Node, Path, Received, Role};

use crate::Output;
use crate::filter::{Drop, GrantFilter};
use crate::grants::{ClientGrants, Pass};
use crate::ice::pair_credentials;
use crate::nat::{Millis, Nat, NatError};
use crate::packet::Packet;
pub use crate::peer::Transmit;
use crate::peer::{
    Action, Clock, Flushing, Gatekeeper, Indices, KeyPair, Peer, Rejected, Screened,
    is_cookie_reply,
};
use crate::resolution::{self, Asked, Found, Resolutions};
pub use crate::resolution::{RESOLVE_DEADLINE, Resolved};

/// How often WireGuard's timers run, as boringtun's own device does.
const TIMER_TICK_MS: u64 = 250;

/// While a client sends, the gateway lets it hear something at least this often, so that
/// the client can tell a live gateway from a dead one (it moves after 6 s of silence)
/// even when the resource never answers.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);
/// How long after a client's last packet it counts as sending.
const ACTIVE: Duration = Duration::from_secs(10);

/// The largest packet the tunnel carries: a 1500-byte underlay MTU allows 1420 (the default
/// TUN MTU), and nothing larger than 1500 is ever sealed.
pub const MAX_PACKET: usize = 1500;

/// WireGuard's data message overhead: type, index, counter and tag.
const WIREGUARD_OVERHEAD: usize = 32;

/// What a relay adds to a datagram it carries: a TURN Send indication's header and
/// attributes (a channel's is 4 bytes).
pub const RELAY_OVERHEAD: usize = 36;

/// The largest datagram the gateway sends; buffers passed in must be at least this long.
pub const MAX_DATAGRAM: usize = MAX_PACKET + WIREGUARD_OVERHEAD;

/// Something for the driver to do or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Send to the portal.
    ToPortal(GatewayMessage),
    /// Resolve this name with the system's resolver and hand the answer to
    /// [`Gateway::handle_resolved`]. The core does not wait past [`RESOLVE_DEADLINE`]: the
    /// grants waiting for the name are refused then, and a later answer changes nothing.
    Resolve { name: String },
    /// A grant is in force: its peer, filter and NAT entries are installed.
    Installed {
        grant_id: String,
        client_id: String,
        resource_id: String,
    },
    /// A grant was refused; the portal has been told why.
    Refused { grant_id: String, reason: String },
    /// A grant is gone, and why.
    Removed { grant_id: String, why: Removal },
    /// The portal reported an error about something this gateway sent.
    PortalError { message: String },
    /// A candidate line a client sent that does not read; it was left out.
    BadCandidate { client_id: String, error: String },
    /// ICE chose how a client's datagrams travel: directly, or through `relay`.
    Path {
        client_id: String,
        path: Path,
        relay: Option<IpAddr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Revoked,
    Expired,
    /// The portal's `ready` did not list it: it was withdrawn while the gateway was away.
    NotInForce,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Revoked => "revoked",
            Removal::Expired => "expired",
            Removal::NotInForce => "not in force at the portal",
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    drops: HashMap<Drop, u64>,
    /// Bytes and packets of IP traffic from clients to the site and back.
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    pub packets_from_clients: u64,
    pub packets_to_clients: u64,
    pub handshakes: u64,
    /// WireGuard bytes (both ways) that went directly, and through a relay.
    pub bytes_direct: u64,
    pub bytes_relayed: u64,
    /// Cookie replies sent: under a handshake flood WireGuard answers a handshake whose MAC1
    /// is right (the sender knows the gateway's public key) with a cookie before anything
    /// looks at the sender's key, so these go to keys with and without a grant alike.
    pub cookie_replies: u64,
}

impl Metrics {
    pub fn dropped(&self, reason: Drop) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }

    fn drop(&mut self, reason: Drop) {
        *self.drops.entry(reason).or_default() += 1;
    }
}

/// How the gateway starts.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateway's WireGuard private key.
    pub private_key: [u8; 32],
    /// The portal key every grant must be signed with.
    pub portal_key: PortalPublicKey,
    /// Where peer indices start; random in the driver, fixed in tests.
    pub seed: u32,
    /// The WireGuard socket's addresses that clients may reach directly: ICE's host
    /// candidates. Behind NAT the gateway finds more through its relays.
    pub host: Vec<SocketAddr>,
}

/// A client's WireGuard peer and what its grants allow.
#[derive(Debug)]
struct ClientPeer {
    wireguard: Peer,
    /// When the client last sent an IP packet, and when the gateway last sent it anything.
    last_received: Option<Instant>,
    last_sent: Option<Instant>,
    key: PublicKey,
    client_id: String,
    preshared_key: [u8; 32],
    /// How ICE last said its datagrams travel, and the relay they go through.
    path: Option<(Path, Option<IpAddr>)>,
    addresses: [IpAddr; 2],
    /// What its grants let through, filed by destination: a packet meets only the grants
    /// that open its destination, however many the client holds.
    grants: ClientGrants,
    nat: Nat,
}

/// What the gateway remembers of an installed grant.
#[derive(Debug)]
struct Installed {
    peer: u32,
    expires_at: UnixTime,
    resolved: Option<Resolution>,
}

/// The gateway.
#[derive(Debug)]
pub struct Gateway {
    gatekeeper: Gatekeeper,
    /// The socket's other traffic: relays, and ICE with each client a grant names.
    traversal: Node<PublicKey>,
    portal_key: PortalPublicKey,
    /// Known once the portal said `ready`; grants are addressed to it.
    gateway_id: Option<String>,
    clock: Clock,
    // The packet path looks these up for every packet: a fast hasher, randomly seeded.
    peers: HashMap<u32, ClientPeer, RandomState>,
    peer_by_key: HashMap<PublicKey, u32, RandomState>,
    peer_by_address: HashMap<IpAddr, u32, RandomState>,
    installed: HashMap<String, Installed>,
    /// Names being resolved for DNS grants (and the grants waiting), and names known.
    resolutions: Resolutions,
    /// The installed grants by expiry, so that a timer tick visits only the expired ones.
    expiring: BTreeSet<(UnixTime, String)>,
    indices: Indices,
    next_tick: Option<Instant>,
    last_rate_reset: Instant,
    /// The latest time an input brought: what datagrams sent from `poll_transmit` go at.
    last_seen: Instant,
    transmits: VecDeque<Transmit>,
    flushing: Flushing,
    events: VecDeque<Event>,
    metrics: Metrics,
}

impl Gateway {
    /// A gateway at `now`, when the wall clock reads `unix_ms` milliseconds since the epoch.
    pub fn new(config: Config, now: Instant, unix_ms: u64) -> Gateway {
        Gateway {
            gatekeeper: Gatekeeper::new(KeyPair::from_secret(config.private_key)),
            traversal: Node::new(config.host, now),
            portal_key: config.portal_key,
            gateway_id: None,
            clock: Clock::new(now, unix_ms),
            peers: HashMap::default(),
            peer_by_key: HashMap::default(),
            peer_by_address: HashMap::default(),
            installed: HashMap::new(),
            resolutions: Resolutions::default(),
            expiring: BTreeSet::new(),
            indices: Indices::new(config.seed),
            next_tick: None,
            last_rate_reset: now,
            last_seen: now,
            transmits: VecDeque::new(),
            flushing: Flushing::default(),
            events: VecDeque::new(),
            metrics: Metrics::default(),
        }
    }

    // ---- getters ----

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.gatekeeper.keys().public_key())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Peers holding WireGuard state now (a session, or a handshake under way); the others are
    /// idle and cost only their grants.
    pub fn active_peer_count(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.wireguard.is_active())
            .count()
    }

    pub fn grant_count(&self) -> usize {
        self.installed.len()
    }

    /// Ids of the grants in force, sorted.
    pub fn grants(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.installed.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Names being resolved for DNS grants.
    pub fn resolutions_in_flight(&self) -> usize {
        self.resolutions.in_flight()
    }

    /// Names whose answer the gateway remembers.
    pub fn names_cached(&self) -> usize {
        self.resolutions.cached()
    }

    /// Each client with a nominated path: its id and the relay its datagrams go through
    /// (`None`: directly), sorted by client.
    pub fn paths(&self) -> Vec<(String, Option<IpAddr>)> {
        let mut paths: Vec<(String, Option<IpAddr>)> = self
            .peers
            .values()
            .filter_map(|p| Some((p.client_id.clone(), p.path?.1)))
            .collect();
        paths.sort();
        paths
    }

    /// NAT flows across all clients.
    pub fn nat_flows(&self) -> usize {
        self.peers.values().map(|p| p.nat.flows()).sum()
    }

    // ---- inputs ----

    /// A datagram from the WireGuard port. `buffer` (at least [`MAX_DATAGRAM`] bytes) holds
    /// the answer.
    pub fn handle_network<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        buffer: &'a mut [u8],
        now: Instant,
    ) -> Option<Output<'a>> {
        self.last_seen = now;
        let (path, payload) = match self.traversal.handle_datagram(from, datagram, now) {
            Received::Data { path, payload } => (path, payload),
            Received::Handled => {
                self.drain_traversal();
                return None;
            }
            Received::Dropped => {
                self.metrics.drop(Drop::NotWireGuard);
                return None;
            }
        };
        self.count_bytes(path, payload.len());
        let output = self.handle_wireguard(path.remote(), &payload, buffer, now)?;
        self.route(output, now)
    }

    /// A WireGuard datagram from `from` (the peer's address, directly or at a relay).
    fn handle_wireguard<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        buffer: &'a mut [u8],
        now: Instant,
    ) -> Option<Output<'a>> {
        // boringtun panics when a data message does not fit the buffer, before it checks
        // the message is genuine: anyone could send one.
        if datagram.len() > buffer.len() {
            self.metrics.drop(Drop::TooLarge);
            return None;
        }
        let index = match self.gatekeeper.screen(from.ip(), datagram, buffer) {
            Screened::Initiation { initiator } => {
                let Some(index) = self.peer_by_key.get(&PublicKey(initiator)) else {
                    // INVARIANT: silence for every key without a grant.
                    self.metrics.drop(Drop::UnknownKey);
                    return None;
                };
                self.metrics.handshakes += 1;
                *index
            }
            Screened::ForPeer(index) => index,
            Screened::Cookie(length) => {
                self.metrics.cookie_replies += 1;
                return buffer
                    .get(..length)
                    .map(|cookie| Output::Network(from, Cow::Borrowed(cookie)));
            }
            Screened::Rejected(rejected) => {
                self.metrics.drop(match rejected {
                    Rejected::NotWireGuard => Drop::NotWireGuard,
                    Rejected::BadMac => Drop::BadMac,
                    Rejected::Undecryptable => Drop::UnknownKey,
                });
                return None;
            }
        };
        let millis = self.clock.millis(now);
        let Some(peer) = self.peers.get_mut(&index) else {
            self.metrics.drop(Drop::UnknownSession);
            return None;
        };
        match peer.wireguard.decapsulate(from, datagram, buffer) {
            Action::Nothing => None,
            Action::Send(bytes) => {
                if is_cookie_reply(bytes) {
                    self.metrics.cookie_replies += 1;
                }
                // A handshake answered: packets may have queued while it was under way.
                self.flushing.mark(index);
                Some(Output::Network(from, Cow::Borrowed(bytes)))
            }
            Action::Refused => {
                self.metrics.drop(Drop::Decryption);
                None
            }
            Action::Received(packet) => match peer.admit(packet, millis) {
                Ok(()) => {
                    peer.last_received = Some(now);
                    self.metrics.packets_from_clients += 1;
                    self.metrics.bytes_from_clients += packet.len() as u64;
                    Some(Output::Tun(packet))
                }
                Err(reason) => {
                    self.metrics.drop(reason);
                    None
                }
            },
        }
    }

    /// An IP packet from the site (the TUN device). It is rewritten in place (the NAT) and
    /// sealed into `buffer` (at least [`MAX_DATAGRAM`] bytes).
    pub fn handle_tun<'a>(
        &mut self,
        packet: &mut [u8],
        buffer: &'a mut [u8],
        now: Instant,
    ) -> Option<Output<'a>> {
        self.last_seen = now;
        let output = self.seal_for_client(packet, buffer, now)?;
        self.route(output, now)
    }

    fn seal_for_client<'a>(
        &mut self,
        packet: &mut [u8],
        buffer: &'a mut [u8],
        now: Instant,
    ) -> Option<Output<'a>> {
        let millis = self.clock.millis(now);
        // boringtun panics when the sealed packet does not fit; and packets queued for a
        // handshake are sealed later into a MAX_DATAGRAM buffer.
        if packet.len() > MAX_PACKET || packet.len() + WIREGUARD_OVERHEAD > buffer.len() {
            self.metrics.drop(Drop::TooLarge);
            return None;
        }
        let Ok(parsed) = Packet::parse(packet) else {
            self.metrics.drop(Drop::Malformed);
            return None;
        };
        let Some(peer) = self
            .peer_by_address
            .get(&parsed.destination)
            .and_then(|index| self.peers.get_mut(index))
        else {
            self.metrics.drop(Drop::NoClient);
            return None;
        };
        if let Err(reason) = peer.answer(packet, millis) {
            self.metrics.drop(reason);
            return None;
        }
        let Some(endpoint) = peer.wireguard.endpoint() else {
            self.metrics.drop(Drop::NoEndpoint);
            return None;
        };
        match peer.wireguard.encapsulate(packet, buffer) {
            Action::Send(bytes) => {
                peer.last_sent = Some(now);
                self.metrics.packets_to_clients += 1;
                self.metrics.bytes_to_clients += packet.len() as u64;
                Some(Output::Network(endpoint, Cow::Borrowed(bytes)))
            }
            Action::Refused => {
                self.metrics.drop(Drop::Decryption);
                None
            }
            Action::Nothing | Action::Received(_) => None,
        }
    }

    /// A message from the portal.
    pub fn handle_portal(&mut self, message: PortalToGateway, now: Instant) {
        self.last_seen = now;
        match message {
            PortalToGateway::Ready {
                gateway_id, grants, ..
            } => {
                self.gateway_id = Some(gateway_id);
                let in_force: HashSet<&String> = grants.iter().collect();
                let stale: Vec<String> = self
                    .installed
                    .keys()
                    .filter(|id| !in_force.contains(id))
                    .cloned()
                    .collect();
                for id in stale {
                    self.remove(&id, Removal::NotInForce);
                }
                self.resolutions
                    .retain_waiting(|g| in_force.contains(&g.grant.id));
                // Back after the portal connection broke: candidates said meanwhile went
                // nowhere, so every client hears them again.
                let keys: Vec<PublicKey> = self.peers.values().map(|p| p.key).collect();
                for key in keys {
                    self.traversal.announce(&key);
                }
            }
            PortalToGateway::Grant { grant } => self.take_grant(*grant, now),
            PortalToGateway::Revoke { grant_id } => self.revoke(&[grant_id]),
            PortalToGateway::RevokeMany { grant_ids } => self.revoke(&grant_ids),
            PortalToGateway::Relays { relays } => self.traversal.set_relays(&relays, now),
            PortalToGateway::Candidates {
                client_id,
                candidates,
            } => self.take_candidates(&client_id, &candidates, now),
            PortalToGateway::Error { message } => {
                self.events.push_back(Event::PortalError { message });
            }
        }
        self.drain_traversal();
    }

    /// A client's ICE candidates, for its connection if a grant made one.
    fn take_candidates(&mut self, client_id: &str, candidates: &[String], now: Instant) {
        let Some(key) = self
            .peers
            .values()
            .find(|p| p.client_id == client_id)
            .map(|p| p.key)
        else {
            return;
        };
        for line in candidates.iter().take(MAX_CANDIDATES) {
            if line.len() <= MAX_CANDIDATE_LENGTH
                && let Err(error) = self.traversal.add_remote_candidate(&key, line, now)
            {
                self.events.push_back(Event::BadCandidate {
                    client_id: client_id.to_owned(),
                    error,
                });
            }
        }
    }

    /// The resolver's answer for a name asked for with [`Event::Resolve`]. The answer is
    /// remembered for the next grants naming it; an answer past the name's deadline, or for a
    /// name nobody asked for, changes nothing.
    pub fn handle_resolved(&mut self, name: &str, answer: Resolved, now: Instant) {
        let Some((found, waiting)) = self.resolutions.answered(name, answer, now) else {
            return;
        };
        for signed in waiting {
            self.settle(&signed, name, &found, now);
        }
    }

    /// Time passed: resolutions past their deadline fail, grants expire, idle NAT flows end,
    /// WireGuard's timers run.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_seen = now;
        self.traversal.handle_timeout(now);
        self.drain_traversal();
        for (name, found, waiting) in self.resolutions.overdue(now) {
            for signed in waiting {
                self.settle(&signed, &name, &found, now);
            }
        }
        let unix = self.clock.unix(now);
        // A grant expires at its `expires_at`.
        let expired: Vec<String> = self
            .expiring
            .range(..(unix.saturating_add(1), String::new()))
            .map(|(_, id)| id.clone())
            .collect();
        for id in expired {
            self.remove(&id, Removal::Expired);
        }
        if now
            .saturating_duration_since(self.last_rate_reset)
            .as_secs()
            >= 1
        {
            self.gatekeeper.reset_rate();
            self.last_rate_reset = now;
        }
        let millis = self.clock.millis(now);
        let mut buffer = [0u8; MAX_DATAGRAM];
        for peer in self.peers.values_mut() {
            peer.nat.expire(millis);
            let Some(destination) = peer.wireguard.endpoint() else {
                continue;
            };
            if let Some(bytes) = peer.wireguard.update_timers(&mut buffer) {
                self.transmits.push_back(Transmit {
                    destination,
                    payload: bytes.to_vec(),
                });
            }
            let sending = peer
                .last_received
                .is_some_and(|at| now.saturating_duration_since(at) < ACTIVE);
            let quiet = peer
                .last_sent
                .is_none_or(|at| now.saturating_duration_since(at) >= LIVENESS_INTERVAL);
            if sending
                && quiet
                && let Action::Send(bytes) = peer.wireguard.encapsulate(&[], &mut buffer)
            {
                peer.last_sent = Some(now);
                self.transmits.push_back(Transmit {
                    destination,
                    payload: bytes.to_vec(),
                });
            }
        }
        self.next_tick = None;
    }

    // ---- outputs ----

    /// The next datagram to send that was not a direct answer: packets that waited for a
    /// handshake, keepalives, handshake retries.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(transmit) = self.traversal.poll_transmit() {
            return Some(transmit);
        }
        let transmit = match self.transmits.pop_front() {
            Some(transmit) => transmit,
            None => self.flushing.next(&mut self.peers, |peer| {
                let endpoint = peer.wireguard.endpoint();
                (&mut peer.wireguard, endpoint)
            })?,
        };
        self.route_transmit(transmit)
    }

    /// A datagram for a client's address, sent the way it was last heard from: through its
    /// relay when it came through one. `None` when the relay cannot carry it (yet).
    fn route_transmit(&mut self, transmit: Transmit) -> Option<Transmit> {
        // Only the caller's WireGuard datagrams come here, at the last instant seen.
        let now = self.last_seen;
        self.route(Output::queued(transmit), now)?.into_transmit()
    }

    /// An answer for the network, sent by the path ICE chose: as it is, or through a relay.
    fn route<'a>(&mut self, output: Output<'a>, now: Instant) -> Option<Output<'a>> {
        let Output::Network(destination, bytes) = output else {
            return Some(output);
        };
        let length = bytes.len();
        let Some((path, destination, bytes)) = self.traversal.route(destination, bytes, now) else {
            self.metrics.drop(Drop::NoEndpoint);
            return None;
        };
        self.count_bytes(path, length);
        Some(Output::Network(destination, bytes))
    }

    fn count_bytes(&mut self, path: Path, length: usize) {
        match path {
            Path::Direct { .. } => self.metrics.bytes_direct += length as u64,
            Path::Relayed { .. } => self.metrics.bytes_relayed += length as u64,
        }
    }

    /// What the traversal has to say: candidates go to the portal for their client, paths
    /// are remembered and told.
    fn drain_traversal(&mut self) {
        while let Some(event) = self.traversal.poll_event() {
            let (key, event) = match event {
                TraversalEvent::Candidate {
                    connection,
                    candidate,
                } => (connection, Some(candidate)),
                TraversalEvent::Nominated {
                    connection,
                    path,
                    relay,
                } => {
                    if let Some(peer) = self
                        .peer_by_key
                        .get(&connection)
                        .and_then(|i| self.peers.get_mut(i))
                    {
                        peer.path = Some((path, relay));
                        // Through a relay when either side's allocation carries it: this
                        // side's (a relayed path) or the client's (a direct path to it).
                        let kind = if relay.is_some() {
                            PathKind::Relayed
                        } else {
                            PathKind::Direct
                        };
                        self.events.push_back(Event::ToPortal(GatewayMessage::Path {
                            client_id: peer.client_id.clone(),
                            path: kind,
                            relay,
                        }));
                        self.events.push_back(Event::Path {
                            client_id: peer.client_id.clone(),
                            path,
                            relay,
                        });
                    }
                    continue;
                }
                TraversalEvent::Disconnected { .. } => continue,
            };
            let Some(peer) = self.peer_by_key.get(&key).and_then(|i| self.peers.get(i)) else {
                continue;
            };
            if let Some(candidate) = event {
                self.events
                    .push_back(Event::ToPortal(GatewayMessage::Candidates {
                        client_id: peer.client_id.clone(),
                        candidates: vec![candidate],
                    }));
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Gateway::handle_timeout`] next: every 250 ms while any peer or grant
    /// exists, and at the deadline of each name being resolved; never while none of those is.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let deadline = match (
            self.resolutions.next_deadline(),
            self.traversal.poll_timeout(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.peers.is_empty() && self.installed.is_empty() {
            return deadline;
        }
        let tick = *self
            .next_tick
            .get_or_insert(now + Duration::from_millis(TIMER_TICK_MS));
        Some(deadline.map_or(tick, |deadline| deadline.min(tick)))
    }

    // ---- grants ----

    /// Takes revoked grants out of force, and out of the wait for their names to resolve.
    fn revoke(&mut self, grant_ids: &[String]) {
        let revoked: HashSet<&str> = grant_ids.iter().map(String::as_str).collect();
        // A grant waiting for its name stops waiting (its lookup still counts against the
        // client until it ends).
        self.resolutions
            .retain_waiting(|g| !revoked.contains(g.grant.id.as_str()));
        for id in revoked {
            self.remove(id, Removal::Revoked);
        }
    }

    fn take_grant(&mut self, signed: SignedGrant, now: Instant) {
        let grant_id = signed.grant.id.clone();
        let Some(gateway_id) = self.gateway_id.clone() else {
            self.refuse(
                &grant_id,
                "the gateway has not been told its id yet".to_owned(),
            );
            return;
        };
        let me = Identity::Gateway {
            id: gateway_id,
            public_key: self.public_key(),
        };
        if let Err(error) = signed.verify(&self.portal_key, &me, self.clock.unix(now)) {
            self.refuse(&grant_id, error.to_string());
            return;
        }
        if let Some(installed) = self.installed.get(&grant_id) {
            // The portal sends grants again when the gateway reconnects: same answer.
            let resolved = installed.resolved;
            self.ack(&grant_id, resolved);
            return;
        }
        if let Err(reason) = self.check_fits(&signed.grant) {
            self.refuse(&grant_id, reason);
            return;
        }
        let Some(dns) = &signed.grant.resource.dns else {
            self.install(&signed.grant, Vec::new(), None, now);
            return;
        };
        let name = resolution::key(&dns.name);
        match self.resolutions.ask(&name, signed, now) {
            Asked::Known(signed, found) => self.settle(&signed, &name, &found, now),
            Asked::Waiting => {}
            Asked::Resolve => self.events.push_back(Event::Resolve { name }),
            Asked::Refused(reason) => self.refuse(&grant_id, reason),
        }
    }

    /// A DNS grant whose name's answer is in: installed with the addresses (or none, for a
    /// name that does not exist), or refused when the name could not be resolved. Either way
    /// the portal hears of it at once.
    fn settle(&mut self, signed: &SignedGrant, name: &str, found: &Found, now: Instant) {
        let grant = &signed.grant;
        if self.clock.unix(now) >= grant.expires_at {
            self.refuse(
                &grant.id,
                "the grant expired while its name resolved".to_owned(),
            );
            return;
        }
        let (real, resolution) = match found {
            Found::Addresses(real) => (
                real.clone(),
                Resolution::Exists {
                    ipv4: real.iter().any(IpAddr::is_ipv4),
                    ipv6: real.iter().any(IpAddr::is_ipv6),
                },
            ),
            Found::NoSuchName => (Vec::new(), Resolution::NoSuchName),
            Found::Failed(error) => {
                self.refuse(&grant.id, format!("cannot resolve `{name}`: {error}"));
                return;
            }
        };
        self.install(grant, real, Some(resolution), now);
    }

    /// Whether a verified grant can sit beside those installed: its filter reads, its tunnel
    /// addresses belong to no other key and are those of the key's other grants, and its
    /// mapped addresses map no other name for the same client (else one grant's port filter
    /// would open another name's real address).
    fn check_fits(&self, grant: &Grant) -> Result<(), String> {
        GrantFilter::new(grant).map_err(|e| e.to_string())?;
        let addresses = [
            IpAddr::V4(grant.client.tunnel_ipv4),
            IpAddr::V6(grant.client.tunnel_ipv6),
        ];
        let peer = self
            .peer_by_key
            .get(&grant.client.public_key)
            .and_then(|i| self.peers.get(i));
        // INVARIANT: one key, one pair of tunnel addresses, so that every grant of a peer
        // agrees on what comes from its client (the portal gives a device's addresses to its
        // key alone; see `grants`).
        if let Some(peer) = peer
            && peer.addresses != addresses
        {
            return Err(format!(
                "tunnel addresses {} and {} are not those of this key's other grants",
                addresses[0], addresses[1]
            ));
        }
        for address in addresses {
            if let Some(peer) = self
                .peer_by_address
                .get(&address)
                .and_then(|i| self.peers.get(i))
                && peer.key != grant.client.public_key
            {
                return Err(format!(
                    "tunnel address {address} belongs to another client key"
                ));
            }
        }
        let Some(dns) = &grant.resource.dns else {
            return Ok(());
        };
        if !dns.is_well_formed() {
            return Err("the grant's DNS mapping is malformed".to_owned());
        }
        let taken = peer.is_some_and(|p| {
            dns.mapped.iter().any(|m| {
                p.grants
                    .name_of(*m)
                    .is_some_and(|name| name != dns.name.as_str())
            })
        });
        if taken {
            return Err(format!(
                "mapped addresses of `{}` are already mapped to another name for this client",
                dns.name
            ));
        }
        Ok(())
    }

    fn install(
        &mut self,
        grant: &Grant,
        real: Vec<IpAddr>,
        resolved: Option<Resolution>,
        now: Instant,
    ) {
        let filter = match GrantFilter::new(grant) {
            Ok(filter) => filter,
            Err(error) => {
                self.refuse(&grant.id, error.to_string());
                return;
            }
        };
        let key = grant.client.public_key;
        let preshared_key = grant.preshared_key.0;
        let index = match self.peer_by_key.get(&key).copied() {
            None => {
                let peers = &self.peers;
                let index = self.indices.fresh(|i| peers.contains_key(&i));
                let peer = ClientPeer {
                    wireguard: Peer::new(&self.gatekeeper, key.0, preshared_key, index),
                    last_received: None,
                    last_sent: None,
                    key,
                    client_id: grant.client.id.clone(),
                    preshared_key,
                    path: None,
                    addresses: [
                        IpAddr::V4(grant.client.tunnel_ipv4),
                        IpAddr::V6(grant.client.tunnel_ipv6),
                    ],
                    grants: ClientGrants::default(),
                    nat: Nat::default(),
                };
                for address in peer.addresses {
                    self.peer_by_address.insert(address, index);
                }
                self.peer_by_key.insert(key, index);
                self.peers.insert(index, peer);
                self.connect(grant, now);
                index
            }
            Some(index) => {
                // The client may have started over (left this gateway and come back, or
                // restarted): it hears this side's candidates again with every grant.
                self.traversal.announce(&key);
                self.drain_traversal();
                index
            }
        };
        let Some(peer) = self.peers.get_mut(&index) else {
            return;
        };
        if peer.preshared_key != preshared_key {
            // The portal keeps one key per client–gateway pair while grants are in force;
            // a new key means a new pair: the client handshakes again with it.
            peer.wireguard = Peer::new(&self.gatekeeper, key.0, preshared_key, index);
            peer.preshared_key = preshared_key;
            peer.path = None;
            self.connect(grant, now);
        }
        let Some(peer) = self.peers.get_mut(&index) else {
            return;
        };
        let name = grant.resource.dns.as_ref().map(|dns| {
            for address in &dns.mapped {
                peer.nat.set_targets(*address, real.clone());
            }
            dns.name.clone()
        });
        peer.grants.insert(&grant.id, filter, name);
        self.expiring.insert((grant.expires_at, grant.id.clone()));
        self.installed.insert(
            grant.id.clone(),
            Installed {
                peer: index,
                expires_at: grant.expires_at,
                resolved,
            },
        );
        self.events.push_back(Event::Installed {
            grant_id: grant.id.clone(),
            client_id: grant.client.id.clone(),
            resource_id: grant.resource.id.clone(),
        });
        self.ack(&grant.id, resolved);
    }

    /// Takes a grant out of force: its filter, its NAT entries no other grant of the client
    /// shares, and the peer with its last grant.
    fn remove(&mut self, grant_id: &str, why: Removal) {
        let Some(installed) = self.installed.remove(grant_id) else {
            return;
        };
        self.expiring
            .remove(&(installed.expires_at, grant_id.to_owned()));
        self.events.push_back(Event::Removed {
            grant_id: grant_id.to_owned(),
            why,
        });
        let Some(peer) = self.peers.get_mut(&installed.peer) else {
            return;
        };
        let Some(unmapped) = peer.grants.remove(grant_id) else {
            return;
        };
        for address in unmapped {
            peer.nat.remove_mapped(address);
        }
        if peer.grants.is_empty()
            && let Some(peer) = self.peers.remove(&installed.peer)
        {
            // INVARIANT: ICE with a client lives as long as a grant names it.
            self.traversal.disconnect(&peer.key);
            self.peer_by_key.remove(&peer.key);
            for address in peer.addresses {
                self.peer_by_address.remove(&address);
            }
        }
    }

    /// Starts ICE with the grant's client, with the pair's credentials and the addresses the
    /// client said it has; the rest of its candidates come through the portal.
    fn connect(&mut self, grant: &Grant, now: Instant) {
        let (client, gateway) = pair_credentials(&grant.preshared_key.0);
        let key = grant.client.public_key;
        self.traversal
            .connect(key, Role::Controlled, &gateway, &client, now);
        for address in &grant.client.endpoints {
            self.traversal.add_remote_address(&key, *address, now);
        }
        self.drain_traversal();
    }

    fn ack(&mut self, grant_id: &str, resolved: Option<Resolution>) {
        self.events.push_back(Event::ToPortal(GatewayMessage::Ack {
            grant_id: grant_id.to_owned(),
            resolved,
        }));
    }

    fn refuse(&mut self, grant_id: &str, reason: String) {
        self.events
            .push_back(Event::ToPortal(GatewayMessage::Refused {
                grant_id: grant_id.to_owned(),
                reason: reason.clone(),
            }));
        self.events.push_back(Event::Refused {
            grant_id: grant_id.to_owned(),
            reason,
        });
    }
}

impl ClientPeer {
    /// Checks a packet out of the client's tunnel against the grants that open its
    /// destination and translates it if it goes to a DNS resource's mapped address.
    fn admit(&mut self, packet: &mut [u8], millis: Millis) -> Result<(), Drop> {
        let parsed = Packet::parse(packet).map_err(|_| Drop::Malformed)?;
        let from_client = self.addresses.contains(&parsed.source);
        match self.grants.check(&parsed, from_client)? {
            Pass::Direct => Ok(()),
            Pass::Mapped => self
                .nat
                .outbound(packet, millis)
                .map(|_| ())
                .map_err(|error| match error {
                    NatError::Full => Drop::TooManyFlows,
                    _ => Drop::Unresolved,
                }),
        }
    }

    /// Checks a packet from the site to this client: a NAT reply gets its mapped address
    /// back first and then needs a DNS grant that covers it; any other packet needs an IP or
    /// CIDR grant that covers its source.
    ///
    /// INVARIANT: a DNS grant passes only replies of the client's own NAT flows. A packet
    /// from a mapped address that no flow translated (a host at the site spoofing one) is no
    /// reply, and an IP grant never covers a mapped address. Flows to IP resources are the
    /// kernel's to track (`ct state established,related` on the gateway's forward chain).
    fn answer(&mut self, packet: &mut [u8], millis: Millis) -> Result<(), Drop> {
        let translated = self.nat.reply(packet, millis).is_ok();
        let parsed = Packet::parse(packet).map_err(|_| Drop::Malformed)?;
        if self.grants.check_reply(&parsed, translated) {
            Ok(())
        } else {
            Err(Drop::NotFromResource)
        }
    }
}
