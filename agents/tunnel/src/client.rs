//! The client's tunnel state machine: packets from applications go to the gateway of the
//! grant that covers them, through a WireGuard peer per gateway; the first packet to an IP or
//! CIDR resource asks the portal for access (packets wait meanwhile; DNS resources asked
//! already, through the DNS stub); a denial answers the application with ICMP "prohibited";
//! a gateway that falls silent while in use is left for another of its site.
//!
//! Like [`crate::gateway::Gateway`], it takes `handle_*` inputs with the time and gives
//! `poll_*` outputs: [`Client::poll_transmit`] (datagrams to gateways),
//! [`Client::poll_tun`] (packets for applications), [`Client::poll_event`],
//! [`Client::poll_timeout`].
//!
//! INVARIANT: a packet leaves only through the gateway of a grant that verified against the
//! pinned portal key and covers its destination; a packet from a gateway reaches an
//! application only if it comes from a resource a grant through that gateway covers.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fz_address::{Address, AddressIndex};
use fz_proto::{
    ClientMessage, DnsMapping, Grant, Identity, MAX_CANDIDATE_LENGTH, MAX_CANDIDATES,
    PortalPublicKey, PortalToClient, PublicKey, Resolution, ResourceView, SignedGrant,
};
use fz_traversal::{Event as TraversalEvent, Node, Path, Received, Role};

use crate::Output;
use crate::ice::pair_credentials;
use crate::icmp;
use crate::packet::Packet;
pub use crate::peer::Transmit;
use crate::peer::{Action, Clock, Flushing, Gatekeeper, Indices, KeyPair, Peer, Screened};

/// A gateway that has said nothing for this long while the client sends is given up. A live
/// gateway lets a sending client hear from it at least every two seconds (its liveness
/// keepalive, `gateway::LIVENESS_INTERVAL`), so six seconds is three missed keepalives: time
/// enough for a lost datagram or two, and what keeps a failover from a hung gateway, which
/// nobody reports, inside the design's ten seconds.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// A gateway that has said nothing for this long while the client sends makes the client
/// ask ICE to check every path to it again: a relay that restarted, or a NAT that forgot
/// the mapping, leaves ICE holding a dead path for up to 15 s otherwise.
pub const RECHECK_AFTER: Duration = Duration::from_secs(3);
/// The same for a gateway the portal reported down: a live gateway answers a sending client
/// within about two seconds (its liveness keepalive), so four seconds of silence after the
/// portal's word are enough to leave it.
pub const REPORTED_DOWN_LIMIT: Duration = Duration::from_secs(4);
/// How long a gateway given up stays avoided in requests to the portal.
const AVOID_FOR: Duration = Duration::from_secs(300);
/// Packets that wait per resource for the portal's answer; more are dropped.
pub const MAX_QUEUED: usize = 32;
/// How long a request waits for the portal before its packets are dropped.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
const TIMER_TICK: Duration = Duration::from_millis(250);

/// How the client starts.
#[derive(Debug, Clone)]
pub struct Config {
    pub private_key: [u8; 32],
    pub portal_key: PortalPublicKey,
    /// Where peer indices start; random in the driver, fixed in tests.
    pub seed: u32,
    /// The socket's addresses gateways may reach directly: ICE's host candidates.
    pub host: Vec<SocketAddr>,
    /// Ask for the `internet` resource as soon as the portal lists one, for a full tunnel
    /// ([`Event::FullTunnel`]).
    pub full_tunnel: bool,
}

/// Candidates of gateways the client holds no link to yet (they may come before the grant's
/// answer): at most this many gateways, each with at most [`MAX_CANDIDATES`] lines.
const MAX_EARLY_GATEWAYS: usize = 64;

/// Something for the driver to do or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Send to the portal.
    ToPortal(ClientMessage),
    /// A grant is in force; for a DNS resource, the DNS stub answers the name with `resolved`.
    Granted {
        grant_id: String,
        resource: String,
        dns: Option<(String, Resolution)>,
    },
    /// The portal said no; the DNS stub answers the resource's waiting names empty.
    Rejected { resource: String, reason: String },
    /// A grant ended (revoked, expired, or its gateway given up); for a DNS resource, the
    /// name to forget in the DNS stub.
    Ended {
        grant_id: String,
        name: Option<String>,
        why: String,
    },
    /// A grant failed verification and was dropped.
    Refused { grant_id: String, reason: String },
    /// A gateway went silent while in use and was left.
    GatewayLost { gateway_id: String },
    /// Whether everything without a more specific route should go into the tunnel: on while
    /// the client holds a grant of the `internet` resource (or asks again for one it held),
    /// off once that is refused or revoked, or the resource is gone from the portal's list.
    FullTunnel { on: bool },
    /// ICE chose how datagrams to a gateway travel: directly, or through `relay`.
    Path {
        gateway_id: String,
        path: Path,
        relay: Option<IpAddr>,
    },
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Packets to no resource, beyond a full queue, or that a gateway sent from elsewhere.
    pub dropped: u64,
    pub prohibited: u64,
}

#[derive(Debug)]
struct Held {
    grant: Grant,
    link: u32,
}

/// The WireGuard peer of one gateway.
#[derive(Debug)]
struct Link {
    wireguard: Peer,
    gateway_id: String,
    key: PublicKey,
    preshared_key: [u8; 32],
    endpoint: SocketAddr,
    /// Set by the first packet sent after the gateway was last heard; cleared by anything
    /// heard. Ten seconds set means the gateway is gone.
    awaiting_since: Option<Instant>,
    /// The portal said the gateway lost its connection; cleared by anything heard. While set,
    /// [`REPORTED_DOWN_LIMIT`] of silence means the gateway is gone.
    reported_down: bool,
    /// ICE was asked to check again during this silence ([`RECHECK_AFTER`]).
    rechecked: bool,
}

impl Link {
    /// Anything came from the gateway: it is there.
    fn heard(&mut self) {
        self.awaiting_since = None;
        self.reported_down = false;
        self.rechecked = false;
    }

    /// Whether the gateway has been silent too long while the client waited for it.
    fn silent(&self, now: Instant) -> bool {
        let limit = if self.reported_down {
            REPORTED_DOWN_LIMIT
        } else {
            SILENCE_LIMIT
        };
        self.awaiting_since
            .is_some_and(|since| now.saturating_duration_since(since) >= limit)
    }
}

#[derive(Debug)]
struct Asking {
    since: Instant,
    queued: Vec<Vec<u8>>,
}

/// The client's tunnels.
#[derive(Debug)]
pub struct Client {
    gatekeeper: Gatekeeper,
    /// The socket's other traffic: relays, and ICE with each gateway a grant names.
    traversal: Node<PublicKey>,
    /// Candidates of gateways with no link yet, by gateway id.
    early_candidates: HashMap<String, Vec<String>>,
    /// The latest time an input brought: what datagrams sent from `poll_transmit` go at.
    last_seen: Instant,
    portal_key: PortalPublicKey,
    client_id: Option<String>,
    resources: Vec<ResourceView>,
    index: AddressIndex<usize>,
    held: HashMap<String, Held>,
    /// The grant serving each resource, and each mapped address of a DNS grant.
    by_resource: HashMap<String, String>,
    by_mapped: HashMap<IpAddr, String>,
    links: HashMap<u32, Link>,
    link_by_key: HashMap<PublicKey, u32>,
    asking: HashMap<String, Asking>,
    avoided: HashMap<String, Instant>,
    /// Whether to ask for the `internet` resource at once ([`Config::full_tunnel`]).
    wants_full_tunnel: bool,
    /// What the driver was last told with [`Event::FullTunnel`].
    full_tunnel: bool,
    indices: Indices,
    clock: Clock,
    flushing: Flushing,
    transmits: VecDeque<Transmit>,
    to_tun: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    metrics: Metrics,
}

impl Client {
    /// A client at `now`, when the wall clock reads `unix_ms`.
    pub fn new(config: Config, now: Instant, unix_ms: u64) -> Client {
        Client {
            gatekeeper: Gatekeeper::new(KeyPair::from_secret(config.private_key)),
            traversal: Node::new(config.host, now),
            early_candidates: HashMap::new(),
            last_seen: now,
            portal_key: config.portal_key,
            client_id: None,
            resources: Vec::new(),
            index: AddressIndex::new(std::iter::empty()),
            held: HashMap::new(),
            by_resource: HashMap::new(),
            by_mapped: HashMap::new(),
            links: HashMap::new(),
            link_by_key: HashMap::new(),
            asking: HashMap::new(),
            avoided: HashMap::new(),
            wants_full_tunnel: config.full_tunnel,
            full_tunnel: false,
            indices: Indices::new(config.seed),
            clock: Clock::new(now, unix_ms),
            flushing: Flushing::default(),
            transmits: VecDeque::new(),
            to_tun: VecDeque::new(),
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

    /// Gateways left lately for silence, the one left last at the end: a request for access
    /// names them to avoid (and the portal, when they are all it has, tries the older ones).
    pub fn avoiding(&self) -> Vec<String> {
        let mut avoid: Vec<(&Instant, &String)> =
            self.avoided.iter().map(|(id, since)| (since, id)).collect();
        avoid.sort();
        avoid.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// The gateway (by id) each resource with a grant goes through, sorted by resource.
    pub fn gateways_in_use(&self) -> Vec<(String, String)> {
        let mut used: Vec<(String, String)> = self
            .by_resource
            .iter()
            .filter_map(|(resource, grant)| {
                let held = self.held.get(grant)?;
                Some((resource.clone(), held.grant.gateway.id.clone()))
            })
            .collect();
        used.sort();
        used
    }

    // ---- inputs ----

    /// A message from the portal.
    pub fn handle_portal(&mut self, message: PortalToClient, now: Instant) {
        self.last_seen = now;
        match message {
            PortalToClient::Ready(ready) => {
                self.client_id = Some(ready.client_id);
                let parsed: Vec<(Address, usize)> = ready
                    .resources
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.address.parse::<Address>().ok().map(|a| (a, i)))
                    .collect();
                self.index = AddressIndex::new(parsed.iter().map(|(a, i)| (a, *i)));
                self.resources = ready.resources;
                // A full tunnel asks for the `internet` resource at once, not on a first
                // packet: only its grant puts in the routes that bring packets for it here.
                match self.internet_resource().filter(|_| self.wants_full_tunnel) {
                    Some(internet) => {
                        if !self.by_resource.contains_key(&internet) {
                            self.asking.entry(internet).or_insert(Asking {
                                since: now,
                                queued: Vec::new(),
                            });
                        }
                    }
                    None => self.set_full_tunnel(false),
                }
                // Back after the portal connection broke: what was said meanwhile went
                // nowhere. Every gateway hears this side's candidates again, and resources
                // still waiting for an answer are asked for again (sorted, so the order is
                // the same on every run).
                let keys: Vec<PublicKey> = self.links.values().map(|l| l.key).collect();
                for key in keys {
                    self.traversal.announce(&key);
                }
                let mut waiting: Vec<String> = self.asking.keys().cloned().collect();
                waiting.sort();
                let avoid = self.avoiding();
                for resource in waiting {
                    self.events
                        .push_back(Event::ToPortal(ClientMessage::RequestAccess {
                            resource,
                            dns: None,
                            avoid: avoid.clone(),
                        }));
                }
            }
            PortalToClient::Granted { grant, resolved } => self.take_grant(*grant, resolved, now),
            PortalToClient::Rejected { resource, reason } => {
                if let Some(asking) = self.asking.remove(&resource) {
                    for packet in asking.queued {
                        self.prohibit(&packet);
                    }
                }
                if self.internet_resource().as_ref() == Some(&resource) {
                    self.set_full_tunnel(false);
                }
                self.events.push_back(Event::Rejected { resource, reason });
            }
            PortalToClient::Revoked { grant_id, reason } => {
                // A revoked `internet` grant gives the host its routes back at once; one that
                // expired or lost its gateway keeps them while the next packet asks again.
                let internet = self.internet_resource();
                if let Some(held) = self.held.get(&grant_id)
                    && internet.as_ref() == Some(&held.grant.resource.id)
                {
                    self.set_full_tunnel(false);
                }
                self.end(&grant_id, reason);
            }
            PortalToClient::GatewayDown { gateway_id } => {
                for link in self.links.values_mut() {
                    if link.gateway_id == gateway_id {
                        link.reported_down = true;
                    }
                }
            }
            PortalToClient::Relays { relays } => self.traversal.set_relays(&relays, now),
            PortalToClient::Candidates {
                gateway_id,
                candidates,
            } => self.take_candidates(gateway_id, candidates, now),
            // The link puts a `ready`'s pages back into it before it gets here.
            PortalToClient::Resources { .. } | PortalToClient::Error { .. } => {}
        }
        self.drain_traversal();
    }

    /// A gateway's ICE candidates: for its link, or kept (bounded) until the grant that
    /// makes the link arrives.
    fn take_candidates(&mut self, gateway_id: String, candidates: Vec<String>, now: Instant) {
        let candidates = candidates
            .into_iter()
            .filter(|line| line.len() <= MAX_CANDIDATE_LENGTH)
            .take(MAX_CANDIDATES);
        let key = self
            .links
            .values()
            .find(|l| l.gateway_id == gateway_id)
            .map(|l| l.key);
        match key {
            Some(key) => {
                for line in candidates {
                    // A line that does not read is left out; ICE goes on with the others.
                    let _ = self.traversal.add_remote_candidate(&key, &line, now);
                }
            }
            None => {
                if self.early_candidates.len() >= MAX_EARLY_GATEWAYS
                    && !self.early_candidates.contains_key(&gateway_id)
                {
                    return;
                }
                let early = self.early_candidates.entry(gateway_id).or_default();
                early.extend(candidates);
                early.truncate(MAX_CANDIDATES);
            }
        }
    }

    /// What the traversal has to say: candidates go to the portal for their gateway, and a
    /// nominated path becomes the link's endpoint.
    fn drain_traversal(&mut self) {
        while let Some(event) = self.traversal.poll_event() {
            match event {
                TraversalEvent::Candidate {
                    connection,
                    candidate,
                } => {
                    let Some(link) = self
                        .link_by_key
                        .get(&connection)
                        .and_then(|i| self.links.get(i))
                    else {
                        continue;
                    };
                    self.events
                        .push_back(Event::ToPortal(ClientMessage::Candidates {
                            gateway_id: link.gateway_id.clone(),
                            candidates: vec![candidate],
                        }));
                }
                TraversalEvent::Nominated {
                    connection,
                    path,
                    relay,
                } => {
                    let Some(link) = self
                        .link_by_key
                        .get(&connection)
                        .and_then(|i| self.links.get_mut(i))
                    else {
                        continue;
                    };
                    link.endpoint = path.remote();
                    self.events.push_back(Event::Path {
                        gateway_id: link.gateway_id.clone(),
                        path,
                        relay,
                    });
                    // The first handshake may have gone where the gateway cannot hear it (its
                    // host address, behind NAT): try again now, by the nominated path.
                    let mut buffer = [0u8; crate::gateway::MAX_DATAGRAM];
                    if let Some(bytes) = link.wireguard.initiate(&mut buffer) {
                        self.transmits.push_back(Transmit {
                            destination: link.endpoint,
                            payload: bytes.to_vec(),
                        });
                    }
                }
                TraversalEvent::Disconnected { .. } => {}
            }
        }
    }

    /// A datagram for a gateway's address, sent the way ICE or the gateway's last datagram
    /// says: through a relay when the path is relayed. `None` when the relay cannot carry it
    /// (yet).
    fn route<'a>(&mut self, output: Output<'a>, now: Instant) -> Option<Output<'a>> {
        let Output::Network(destination, bytes) = output else {
            return Some(output);
        };
        let (_, destination, bytes) = self.traversal.route(destination, bytes, now)?;
        Some(Output::Network(destination, bytes))
    }

    /// An IP packet from an application. It goes to its gateway (sealed into `buffer`, at
    /// least `crate::gateway::MAX_DATAGRAM` bytes), waits for the portal, or is refused.
    pub fn handle_tun<'a>(
        &mut self,
        packet: &[u8],
        buffer: &'a mut [u8],
        now: Instant,
    ) -> Option<Output<'a>> {
        self.last_seen = now;
        let (destination, sealed) = self.seal_for_gateway(packet, buffer, now)?;
        self.route(Output::Network(destination, Cow::Borrowed(sealed)), now)
    }

    fn seal_for_gateway<'a>(
        &mut self,
        packet: &[u8],
        buffer: &'a mut [u8],
        now: Instant,
    ) -> Option<(SocketAddr, &'a [u8])> {
        let Ok(parsed) = Packet::parse(packet) else {
            self.metrics.dropped += 1;
            return None;
        };
        let grant_id = match self.by_mapped.get(&parsed.destination) {
            Some(grant) => Some(grant.clone()),
            None => {
                let resource = self.ip_resource(parsed.destination)?;
                match self.by_resource.get(&resource) {
                    Some(grant) => Some(grant.clone()),
                    None => {
                        self.wait_for_access(resource, packet, now);
                        None
                    }
                }
            }
        };
        let link_index = self.held.get(&grant_id?)?.link;
        let link = self.links.get_mut(&link_index)?;
        let destination = link.endpoint;
        match link.wireguard.encapsulate(packet, buffer) {
            Action::Send(bytes) => {
                link.awaiting_since.get_or_insert(now);
                self.metrics.packets_sent += 1;
                Some((destination, bytes))
            }
            _ => None,
        }
    }

    /// A datagram from a gateway: a packet for the application ([`Output::Tun`]), an answer
    /// to the gateway, or nothing.
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
                self.metrics.dropped += 1;
                return None;
            }
        };
        let output = self.handle_wireguard(path.remote(), &payload, buffer)?;
        self.route(output, now)
    }

    /// A WireGuard datagram from `from` (the gateway's address, directly or at a relay).
    fn handle_wireguard<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        buffer: &'a mut [u8],
    ) -> Option<Output<'a>> {
        if datagram.len() > buffer.len() {
            self.metrics.dropped += 1;
            return None;
        }
        let index = match self.gatekeeper.screen(from.ip(), datagram, buffer) {
            Screened::ForPeer(index) => index,
            Screened::Initiation { initiator } => *self.link_by_key.get(&PublicKey(initiator))?,
            Screened::Cookie(length) => {
                return buffer
                    .get(..length)
                    .map(|cookie| Output::Network(from, Cow::Borrowed(cookie)));
            }
            Screened::Rejected(_) => {
                self.metrics.dropped += 1;
                return None;
            }
        };
        let link = self.links.get_mut(&index)?;
        match link.wireguard.decapsulate(from, datagram, buffer) {
            Action::Nothing => {
                link.heard();
                None
            }
            Action::Send(bytes) => {
                link.heard();
                self.flushing.mark(index);
                Some(Output::Network(from, Cow::Borrowed(bytes)))
            }
            Action::Received(packet) => {
                link.heard();
                let from_granted =
                    Packet::parse(packet).is_ok_and(|p| self.covered_by_link(index, p.source));
                if from_granted {
                    self.metrics.packets_received += 1;
                    Some(Output::Tun(packet))
                } else {
                    self.metrics.dropped += 1;
                    None
                }
            }
            Action::Refused => {
                self.metrics.dropped += 1;
                None
            }
        }
    }

    /// Time passed: grants expire, silent gateways are left, requests time out, WireGuard's
    /// timers run.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_seen = now;
        self.traversal.handle_timeout(now);
        self.drain_traversal();
        let unix = self.clock.unix(now);
        let expired: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| unix >= h.grant.expires_at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.end(&id, "expired".to_owned());
        }
        let silent: Vec<u32> = self
            .links
            .iter()
            .filter(|(_, l)| l.silent(now))
            .map(|(index, _)| *index)
            .collect();
        for index in silent {
            self.leave(index, now);
        }
        let quiet: Vec<PublicKey> = self
            .links
            .values_mut()
            .filter(|l| {
                !l.rechecked
                    && l.awaiting_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= RECHECK_AFTER)
            })
            .map(|l| {
                l.rechecked = true;
                l.key
            })
            .collect();
        for key in quiet {
            self.traversal.recheck(&key, now);
        }
        self.drain_traversal();
        self.asking
            .retain(|_, asking| now.saturating_duration_since(asking.since) < ASK_TIMEOUT);
        self.avoided
            .retain(|_, since| now.saturating_duration_since(*since) < AVOID_FOR);
        let mut buffer = [0u8; crate::gateway::MAX_DATAGRAM];
        for link in self.links.values_mut() {
            if let Some(bytes) = link.wireguard.update_timers(&mut buffer) {
                self.transmits.push_back(Transmit {
                    destination: link.endpoint,
                    payload: bytes.to_vec(),
                });
            }
        }
    }

    // ---- outputs ----

    /// Datagrams that were not the direct answer to an input: packets that waited for a
    /// handshake, WireGuard's keepalives and retries.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(transmit) = self.traversal.poll_transmit() {
            return Some(transmit);
        }
        let transmit = match self.transmits.pop_front() {
            Some(transmit) => transmit,
            None => self.flushing.next(&mut self.links, |link| {
                (&mut link.wireguard, Some(link.endpoint))
            })?,
        };
        let now = self.last_seen;
        self.route(Output::queued(transmit), now)?.into_transmit()
    }

    /// IP packets for applications that were not the direct answer to an input: ICMP errors
    /// for refusals.
    pub fn poll_tun(&mut self) -> Option<Vec<u8>> {
        self.to_tun.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Client::handle_timeout`] next.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let tick = (!self.links.is_empty() || !self.asking.is_empty() || !self.held.is_empty())
            .then(|| now + TIMER_TICK);
        match (tick, self.traversal.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- grants ----

    fn take_grant(&mut self, signed: SignedGrant, resolved: Option<Resolution>, now: Instant) {
        let grant_id = signed.grant.id.clone();
        let Some(client_id) = self.client_id.clone() else {
            return self.refuse(grant_id, "the client has not been told its id yet");
        };
        let me = Identity::Client {
            id: client_id,
            public_key: self.public_key(),
        };
        if let Err(error) = signed.verify(&self.portal_key, &me, self.clock.unix(now)) {
            return self.refuse(grant_id, &error.to_string());
        }
        let grant = signed.grant;
        let Some(endpoint) = grant.gateway.endpoints.first().copied() else {
            return self.refuse(grant_id, "the grant names no gateway endpoint");
        };
        // A grant replacing another for the same resource (a failover, a renewal) ends it.
        if let Some(previous) = self.by_resource.get(&grant.resource.id).cloned()
            && previous != grant.id
        {
            self.end(&previous, "replaced".to_owned());
        }
        let link = self.link_for(&grant, endpoint, now);
        let resource = grant.resource.id.clone();
        self.by_resource.insert(resource.clone(), grant.id.clone());
        let dns = grant.resource.dns.as_ref().map(|dns| {
            for mapped in &dns.mapped {
                self.by_mapped.insert(*mapped, grant.id.clone());
            }
            (
                dns.name.clone(),
                resolved.unwrap_or(Resolution::Exists {
                    ipv4: true,
                    ipv6: true,
                }),
            )
        });
        self.events.push_back(Event::Granted {
            grant_id: grant.id.clone(),
            resource: resource.clone(),
            dns,
        });
        if self.internet_resource().as_ref() == Some(&resource) {
            self.set_full_tunnel(true);
        }
        self.held.insert(grant.id.clone(), Held { grant, link });
        // Packets that waited for this grant go now (the first starts the handshake).
        let queued = self
            .asking
            .remove(&resource)
            .map(|a| a.queued)
            .unwrap_or_default();
        let mut buffer = [0u8; crate::gateway::MAX_DATAGRAM];
        for packet in queued {
            // Routed (through a relay, if need be) when it leaves by `poll_transmit`.
            if let Some((destination, sealed)) = self.seal_for_gateway(&packet, &mut buffer, now) {
                self.transmits.push_back(Transmit {
                    destination,
                    payload: sealed.to_vec(),
                });
            }
        }
    }

    /// The link to the grant's gateway, made if there is none (or if the pair's preshared
    /// key changed, which means the portal began a new pair).
    fn link_for(&mut self, grant: &Grant, endpoint: SocketAddr, now: Instant) -> u32 {
        let key = grant.gateway.public_key;
        let preshared_key = grant.preshared_key.0;
        if let Some(index) = self.link_by_key.get(&key).copied()
            && let Some(link) = self.links.get_mut(&index)
        {
            if link.preshared_key != preshared_key {
                link.wireguard = Peer::new(&self.gatekeeper, key.0, preshared_key, index);
                link.preshared_key = preshared_key;
                link.endpoint = endpoint;
                self.connect(grant, now);
            } else {
                // The gateway may have started over (restarted): it hears this side's
                // candidates again with every grant.
                self.traversal.announce(&key);
                self.drain_traversal();
            }
            return index;
        }
        let links = &self.links;
        let index = self.indices.fresh(|i| links.contains_key(&i));
        self.links.insert(
            index,
            Link {
                wireguard: Peer::new(&self.gatekeeper, key.0, preshared_key, index),
                gateway_id: grant.gateway.id.clone(),
                key,
                preshared_key,
                endpoint,
                awaiting_since: None,
                reported_down: false,
                rechecked: false,
            },
        );
        self.link_by_key.insert(key, index);
        self.connect(grant, now);
        index
    }

    /// Starts ICE with the grant's gateway (the client picks the pair), with the pair's
    /// credentials, the addresses the gateway said it has, and candidates that came first.
    fn connect(&mut self, grant: &Grant, now: Instant) {
        let (client, gateway) = pair_credentials(&grant.preshared_key.0);
        let key = grant.gateway.public_key;
        self.traversal
            .connect(key, Role::Controlling, &client, &gateway, now);
        for address in &grant.gateway.endpoints {
            self.traversal.add_remote_address(&key, *address, now);
        }
        for line in self
            .early_candidates
            .remove(&grant.gateway.id)
            .unwrap_or_default()
        {
            let _ = self.traversal.add_remote_candidate(&key, &line, now);
        }
        self.drain_traversal();
    }

    /// Ends a grant: its routes go, and its link with its last grant.
    fn end(&mut self, grant_id: &str, why: String) {
        let Some(held) = self.held.remove(grant_id) else {
            return;
        };
        if self
            .by_resource
            .get(&held.grant.resource.id)
            .map(String::as_str)
            == Some(grant_id)
        {
            self.by_resource.remove(&held.grant.resource.id);
        }
        self.by_mapped.retain(|_, g| g != grant_id);
        if !self.held.values().any(|h| h.link == held.link)
            && let Some(link) = self.links.remove(&held.link)
        {
            self.traversal.disconnect(&link.key);
            self.link_by_key.remove(&link.key);
        }
        self.events.push_back(Event::Ended {
            grant_id: grant_id.to_owned(),
            name: held.grant.resource.dns.map(|dns| dns.name),
            why,
        });
    }

    /// Leaves a silent gateway: its grants end, and each of their resources is asked for
    /// again, avoiding it (and any other gateway left lately).
    fn leave(&mut self, index: u32, now: Instant) {
        let Some(link) = self.links.get(&index) else {
            return;
        };
        let gateway_id = link.gateway_id.clone();
        self.avoided.insert(gateway_id.clone(), now);
        self.events.push_back(Event::GatewayLost {
            gateway_id: gateway_id.clone(),
        });
        let grants: Vec<(String, String, Option<DnsMapping>)> = self
            .held
            .iter()
            .filter(|(_, h)| h.link == index)
            .map(|(id, h)| {
                (
                    id.clone(),
                    h.grant.resource.id.clone(),
                    h.grant.resource.dns.clone(),
                )
            })
            .collect();
        let avoid = self.avoiding();
        for (grant_id, resource, dns) in grants {
            self.end(&grant_id, format!("gateway `{gateway_id}` went silent"));
            self.asking.entry(resource.clone()).or_insert(Asking {
                since: now,
                queued: Vec::new(),
            });
            self.events
                .push_back(Event::ToPortal(ClientMessage::RequestAccess {
                    resource,
                    dns,
                    avoid: avoid.clone(),
                }));
        }
    }

    fn refuse(&mut self, grant_id: String, reason: &str) {
        self.events.push_back(Event::Refused {
            grant_id,
            reason: reason.to_owned(),
        });
    }

    // ---- helpers ----

    /// The IP or CIDR resource that serves `ip` (DNS resources are reached through mapped
    /// addresses, `internet` is not routed here).
    /// The `internet` resource of the portal's list, if it has one.
    fn internet_resource(&self) -> Option<String> {
        self.resources
            .iter()
            .find(|r| r.address == "internet")
            .map(|r| r.id.clone())
    }

    fn set_full_tunnel(&mut self, on: bool) {
        if self.full_tunnel != on {
            self.full_tunnel = on;
            self.events.push_back(Event::FullTunnel { on });
        }
    }

    fn ip_resource(&mut self, ip: IpAddr) -> Option<String> {
        let Some(resource) = self.index.lookup_ip(ip).and_then(|i| self.resources.get(i)) else {
            self.metrics.dropped += 1;
            return None;
        };
        Some(resource.id.clone())
    }

    fn wait_for_access(&mut self, resource: String, packet: &[u8], now: Instant) {
        let asking = match self.asking.get_mut(&resource) {
            Some(asking) => asking,
            None => {
                let avoid = self.avoiding();
                self.events
                    .push_back(Event::ToPortal(ClientMessage::RequestAccess {
                        resource: resource.clone(),
                        dns: None,
                        avoid,
                    }));
                self.asking.entry(resource).or_insert(Asking {
                    since: now,
                    queued: Vec::new(),
                })
            }
        };
        if asking.queued.len() < MAX_QUEUED {
            asking.queued.push(packet.to_vec());
        } else {
            self.metrics.dropped += 1;
        }
    }

    /// Writes ICMP "prohibited" back to the application that sent `packet`.
    fn prohibit(&mut self, packet: &[u8]) {
        if let Some(error) = icmp::prohibited(packet) {
            self.metrics.prohibited += 1;
            self.to_tun.push_back(error);
        }
    }

    /// Whether a grant through link `index` covers `source`: a DNS grant's mapped address, or
    /// an address its resource serves (the most specific resource for it is the grant's, so
    /// a narrower resource carved out of a wide grant is not covered by it).
    fn covered_by_link(&self, index: u32, source: IpAddr) -> bool {
        let serving = self
            .index
            .lookup_ip(source)
            .and_then(|i| self.resources.get(i))
            .map(|r| r.id.as_str());
        self.held
            .values()
            .filter(|h| h.link == index)
            .any(|h| match &h.grant.resource.dns {
                Some(dns) => dns.mapped.contains(&source),
                None => serving == Some(h.grant.resource.id.as_str()),
            })
    }
}
