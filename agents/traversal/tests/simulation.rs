//! Two nodes on a simulated network, on a simulated clock: a client and a gateway, each
//! behind no NAT, an easy NAT (one public port per inside socket, the way Linux's masquerade
//! keeps ports) or a hard one (a new public port per destination, as `masquerade random`),
//! both filtering what comes in to answers of what went out; a TURN relay on the public side
//! (turn-server-proto, the server half of the same TURN implementation); datagrams delayed,
//! and optionally lost. ICE must find a path in every case, direct where the NATs allow it,
//! and the caller's datagrams must cross it both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fz_traversal::{Credentials, Event, Node, Path, Received, Role};
use turn_server_proto::api::{TurnServerApi, TurnServerPollRet};
use turn_server_proto::server::TurnServer;
use turn_server_proto::stun::agent::Transmit as TurnTransmit;
use turn_server_proto::types::attribute::XorPeerAddress;
use turn_server_proto::types::message::CHANNEL_BIND;
use turn_server_proto::types::stun::TransportType;
use turn_server_proto::types::stun::message::{Message, MessageClass, TransactionId};

const RELAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);
const CLIENT_INSIDE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 51820);
const GATEWAY_INSIDE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2)), 51820);
const CLIENT_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const GATEWAY_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const LATENCY: Duration = Duration::from_millis(15);
/// What the client's tunnel waits, hearing nothing back, before it asks ICE to check again
/// (`fz_tunnel::client::RECHECK_AFTER`).
const RECHECK_AFTER: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nat {
    /// The host has the public address itself.
    None,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    Easy,
    /// A new public port for every destination (symmetric).
    Hard,
}

/// One NAT: its public address, its mappings, and what it lets in.
struct Router {
    kind: Nat,
    public: Ipv4Addr,
    inside: SocketAddr,
    /// Public port by destination (hard) or one for all (easy, keyed by `None`).
    ports: HashMap<Option<SocketAddr>, u16>,
    /// Remote addresses the inside has sent to, by public port: the filter.
    allowed: HashMap<u16, Vec<SocketAddr>>,
    next_port: u16,
    /// Datagrams from outside that the filter dropped.
    refused: usize,
}

impl Router {
    fn new(kind: Nat, public: Ipv4Addr, inside: SocketAddr) -> Router {
        Router {
            kind,
            public,
            inside,
            ports: HashMap::new(),
            allowed: HashMap::new(),
            next_port: 40_000,
            refused: 0,
        }
    }

    /// The address the host's node knows itself by.
    fn host_address(&self) -> SocketAddr {
        match self.kind {
            Nat::None => SocketAddr::new(IpAddr::V4(self.public), self.inside.port()),
            _ => self.inside,
        }
    }

    /// Out: the source as the world sees it.
    fn outbound(&mut self, to: SocketAddr) -> SocketAddr {
        let port = match self.kind {
            Nat::None => return self.host_address(),
            Nat::Easy => self.port_for(None),
            Nat::Hard => self.port_for(Some(to)),
        };
        self.allowed.entry(port).or_default().push(to);
        SocketAddr::new(IpAddr::V4(self.public), port)
    }

    fn port_for(&mut self, key: Option<SocketAddr>) -> u16 {
        if let Some(port) = self.ports.get(&key) {
            return *port;
        }
        // The easy NAT keeps the port when it can, as Linux does; the hard one never does.
        let port = match (self.kind, key) {
            (Nat::Easy, None) => self.inside.port(),
            _ => {
                self.next_port += 1;
                self.next_port
            }
        };
        self.ports.insert(key, port);
        port
    }

    /// In: to the host, if the filter lets `from` in on `port`.
    fn inbound(&mut self, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        if self.kind == Nat::None {
            return (port == self.inside.port()).then_some(self.host_address());
        }
        if self
            .allowed
            .get(&port)
            .is_some_and(|remotes| remotes.contains(&from))
        {
            Some(self.inside)
        } else {
            self.refused += 1;
            None
        }
    }

    /// The NAT forgets its mappings (a reboot, a new network): the host's next datagrams
    /// leave from new ports.
    fn rebind(&mut self) {
        self.ports.clear();
        self.allowed.clear();
        self.next_port += 100;
        if self.kind == Nat::Easy {
            // Its old port is gone too: the next one is a new one.
            self.kind = Nat::Hard;
            let port = self.port_for(None);
            self.kind = Nat::Easy;
            self.ports.insert(None, port);
        }
    }
}

/// Who sent a datagram in flight, for where it is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Party {
    Client,
    Gateway,
}

#[derive(Debug)]
struct Flight {
    from: SocketAddr,
    to: SocketAddr,
    payload: Vec<u8>,
}

struct World {
    /// The first instant: the relay's clock counts from it.
    origin: Instant,
    now: Instant,
    client: Node<&'static str>,
    gateway: Node<&'static str>,
    routers: [Router; 2],
    relay: TurnServer,
    relay_ports: u16,
    /// Datagrams in flight, by arrival time (then order of sending).
    flights: BTreeMap<(Instant, u64), Flight>,
    sent: u64,
    /// Datagrams each side sent to anyone but the relay.
    to_peers: [usize; 2],
    /// Drops one datagram in `loss` (0: none), counted by a fixed rule so runs repeat.
    loss: u64,
    /// When set, datagrams take from one to seven times [`LATENCY`] by a fixed rule, so
    /// that later ones overtake earlier ones.
    reorder: bool,
    /// Candidates on their way through the "portal", to whom.
    signalling: Vec<(Party, String)>,
    /// Paths as each side's node nominated them, in order, with the relay each goes through.
    nominated: [Vec<(Path, Option<IpAddr>)>; 2],
    /// The caller's datagrams each side received, with the path they came by.
    received: [Vec<(Vec<u8>, Path)>; 2],
    /// Each channel binding asked of the relay: from which node's address, for which peer,
    /// in which transaction (a retransmission keeps its transaction).
    channel_binds: Vec<(SocketAddr, SocketAddr, TransactionId)>,
}

const CLIENT_CREDENTIALS: (&str, &str) = ("cufrag", "client-ice-password-0123");
const GATEWAY_CREDENTIALS: (&str, &str) = ("gufrag", "gateway-ice-password-0123");

fn credentials((ufrag, password): (&str, &str)) -> Credentials {
    Credentials {
        ufrag: ufrag.to_owned(),
        password: password.to_owned(),
    }
}

impl World {
    fn new(client_nat: Nat, gateway_nat: Nat) -> World {
        let now = Instant::now();
        let routers = [
            Router::new(client_nat, CLIENT_PUBLIC, CLIENT_INSIDE),
            Router::new(gateway_nat, GATEWAY_PUBLIC, GATEWAY_INSIDE),
        ];
        let relay = fresh_relay();
        let relays = |user: &str| {
            vec![fz_proto::Relay {
                address: RELAY,
                username: user.to_owned(),
                password: format!("{user}-turn-password"),
                expires_at: u64::MAX,
            }]
        };
        let mut client = Node::new(vec![routers[0].host_address()], now);
        let mut gateway = Node::new(vec![routers[1].host_address()], now);
        client.set_relays(&relays("client"), now);
        gateway.set_relays(&relays("gateway"), now);
        World {
            origin: now,
            now,
            client,
            gateway,
            routers,
            relay,
            relay_ports: 50_000,
            flights: BTreeMap::new(),
            sent: 0,
            to_peers: [0, 0],
            loss: 0,
            reorder: false,
            signalling: Vec::new(),
            nominated: [Vec::new(), Vec::new()],
            received: [Vec::new(), Vec::new()],
            channel_binds: Vec::new(),
        }
    }

    fn node(&mut self, party: Party) -> &mut Node<&'static str> {
        match party {
            Party::Client => &mut self.client,
            Party::Gateway => &mut self.gateway,
        }
    }

    /// The portal's part: each side starts ICE for the other (the gateway with the grant,
    /// the client with the answer).
    fn connect(&mut self) {
        let now = self.now;
        self.gateway.connect(
            "client",
            Role::Controlled,
            &credentials(GATEWAY_CREDENTIALS),
            &credentials(CLIENT_CREDENTIALS),
            now,
        );
        self.client.connect(
            "gateway",
            Role::Controlling,
            &credentials(CLIENT_CREDENTIALS),
            &credentials(GATEWAY_CREDENTIALS),
            now,
        );
    }

    fn send_from(&mut self, party: Party, transmit: fz_traversal::Transmit) {
        let index = party as usize;
        if transmit.destination != RELAY {
            self.to_peers[index] += 1;
        }
        let from = self.routers[index].outbound(transmit.destination);
        self.post(from, transmit.destination, transmit.payload);
    }

    fn post(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.sent += 1;
        if self.loss > 0 && self.sent.is_multiple_of(self.loss) {
            return;
        }
        let delay = if self.reorder {
            LATENCY * u32::try_from(1 + (self.sent * 5) % 7).unwrap()
        } else {
            LATENCY
        };
        self.flights
            .insert((self.now + delay, self.sent), Flight { from, to, payload });
    }

    /// Moves every node's and the relay's output onto the network, and signalling along.
    fn drain(&mut self) {
        for party in [Party::Client, Party::Gateway] {
            while let Some(transmit) = self.node(party).poll_transmit() {
                self.send_from(party, transmit);
            }
            while let Some(event) = self.node(party).poll_event() {
                let index = party as usize;
                match event {
                    Event::Candidate { candidate, .. } => {
                        let to = match party {
                            Party::Client => Party::Gateway,
                            Party::Gateway => Party::Client,
                        };
                        self.signalling.push((to, candidate));
                    }
                    Event::Nominated { path, relay, .. } => {
                        self.nominated[index].push((path, relay));
                    }
                    Event::Disconnected { .. } => {}
                }
            }
        }
        let signalling = std::mem::take(&mut self.signalling);
        let now = self.now;
        for (to, candidate) in signalling {
            let key = match to {
                Party::Client => "gateway",
                Party::Gateway => "client",
            };
            self.node(to)
                .add_remote_candidate(&key, &candidate, now)
                .unwrap();
        }
        self.drain_relay();
    }

    fn drain_relay(&mut self) {
        let at = turn_server_proto::stun::Instant::from_nanos(
            i64::try_from(self.now.duration_since(self.origin).as_nanos()).unwrap(),
        );
        while let TurnServerPollRet::AllocateSocket {
            listen_addr,
            client_addr,
            family,
            ..
        } = self.relay.poll(at)
        {
            self.relay_ports += 1;
            let relayed = SocketAddr::new(RELAY.ip(), self.relay_ports);
            self.relay.allocated_socket(
                TransportType::Udp,
                listen_addr,
                client_addr,
                TransportType::Udp,
                family,
                Ok(relayed),
                at,
            );
        }
        while let Some(transmit) = self.relay.poll_transmit(at) {
            self.post(transmit.from, transmit.to, transmit.data);
        }
    }

    /// Delivers one datagram: to the relay, or through a NAT to a node. The caller's data a
    /// node gives back is recorded, and the gateway answers it by the path it came (as
    /// WireGuard answers where it last heard from).
    fn deliver(&mut self, flight: Flight) {
        if flight.to.ip() == RELAY.ip() {
            if let Ok(message) = Message::from_bytes(&flight.payload)
                && message.method() == CHANNEL_BIND
                && message.has_class(MessageClass::Request)
                && let Ok(peer) = message.attribute::<XorPeerAddress>()
            {
                let peer = peer.addr(message.transaction_id());
                self.channel_binds
                    .push((flight.from, peer, message.transaction_id()));
            }
            let at = turn_server_proto::stun::Instant::from_nanos(
                i64::try_from(self.now.duration_since(self.origin).as_nanos()).unwrap(),
            );
            let answer = self.relay.recv(
                TurnTransmit {
                    data: flight.payload.as_slice(),
                    transport: TransportType::Udp,
                    from: flight.from,
                    to: flight.to,
                },
                at,
            );
            if let Some(answer) = answer {
                let built = answer.build();
                // turn-server-proto 0.7.3 addresses its answer to a binding request to itself
                // (`transmit.to` where it means `transmit.from`); coturn answers the sender,
                // and so does this relay here.
                let to = if built.to == RELAY {
                    flight.from
                } else {
                    built.to
                };
                self.post(built.from, to, built.data);
            }
            return;
        }
        let party = match flight.to.ip() {
            IpAddr::V4(ip) if ip == CLIENT_PUBLIC => Party::Client,
            IpAddr::V4(ip) if ip == GATEWAY_PUBLIC => Party::Gateway,
            // Private addresses are not routed on the public side.
            _ => return,
        };
        let index = party as usize;
        if self.routers[index]
            .inbound(flight.from, flight.to.port())
            .is_none()
        {
            return;
        }
        let now = self.now;
        let received = match self
            .node(party)
            .handle_datagram(flight.from, &flight.payload, now)
        {
            Received::Data { path, payload } => Some((payload.into_owned(), path)),
            Received::Handled | Received::Dropped => None,
        };
        if let Some((payload, path)) = received {
            self.received[index].push((payload.clone(), path));
            if party == Party::Gateway
                && let Some(transmit) = self.gateway.send(path, &payload, now)
            {
                self.send_from(Party::Gateway, transmit);
            }
        }
    }

    /// Runs the world until `until`: datagrams arrive in order, timers fire when due.
    fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        loop {
            self.drain();
            let next_flight = self.flights.keys().next().map(|(at, _)| *at);
            let next_timer = [self.client.poll_timeout(), self.gateway.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let next = [next_flight, next_timer].into_iter().flatten().min();
            let Some(next) = next.filter(|at| *at <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            if next_flight == Some(next) {
                let key = *self.flights.keys().next().unwrap();
                let flight = self.flights.remove(&key).unwrap();
                self.deliver(flight);
            } else {
                let now = self.now;
                self.client.handle_timeout(now);
                self.gateway.handle_timeout(now);
            }
        }
    }

    /// The client sends `payload` by its nominated path; false if it has none yet.
    fn client_sends(&mut self, payload: &[u8]) -> bool {
        let now = self.now;
        let Some(path) = self.client.path(&"gateway") else {
            return false;
        };
        match self.client.send(path, payload, now) {
            Some(transmit) => {
                self.send_from(Party::Client, transmit);
                true
            }
            None => false,
        }
    }

    /// Pings the gateway every 100 ms for `duration`; how many came back. As the client's
    /// tunnel does, it asks for every pair to be checked again once the gateway has been
    /// silent for [`RECHECK_AFTER`] while it sent.
    fn ping_for(&mut self, duration: Duration) -> (usize, usize) {
        let before = self.received[0].len();
        let mut sent = 0;
        let rounds = duration.as_millis() / 100;
        let mut heard = (self.received[0].len(), self.now);
        let mut rechecked = false;
        for round in 0..rounds {
            if self.client_sends(format!("ping {round}").as_bytes()) {
                sent += 1;
            }
            self.run_for(Duration::from_millis(100));
            if self.received[0].len() > heard.0 {
                heard = (self.received[0].len(), self.now);
                rechecked = false;
            } else if !rechecked && self.now.duration_since(heard.1) >= RECHECK_AFTER {
                let now = self.now;
                self.client.recheck(&"gateway", now);
                rechecked = true;
            }
        }
        self.run_for(LATENCY * 8);
        (sent, self.received[0].len() - before)
    }

    /// The client's last nominated path and the relay it goes through.
    fn client_path(&self) -> (Path, Option<IpAddr>) {
        *self.nominated[0]
            .last()
            .expect("the client nominated a path")
    }
}

/// A relay that knows both parties' credentials and nothing else.
fn fresh_relay() -> TurnServer {
    let mut relay = TurnServer::new(TransportType::Udp, RELAY, "fz.test".to_owned());
    for user in ["client", "gateway"] {
        relay.add_user(user.to_owned(), format!("{user}-turn-password"));
    }
    relay
}

fn connected(client_nat: Nat, gateway_nat: Nat) -> World {
    let mut world = World::new(client_nat, gateway_nat);
    // The relays first: allocations and server-reflexive addresses, as after `ready`.
    world.run_for(Duration::from_secs(1));
    world.connect();
    world.run_for(Duration::from_secs(3));
    world
}

#[test]
fn behind_easy_nats_the_path_is_direct_and_carries_data_both_ways() {
    let mut world = connected(Nat::Easy, Nat::Easy);
    let path = world.client_path();
    assert_eq!(
        path,
        (
            Path::Direct {
                remote: SocketAddr::new(IpAddr::V4(GATEWAY_PUBLIC), GATEWAY_INSIDE.port())
            },
            None
        ),
        "nominated: {:?}",
        world.nominated
    );
    let (sent, answered) = world.ping_for(Duration::from_secs(1));
    assert_eq!((sent, answered), (10, 10));
    assert!(
        world.received[1]
            .iter()
            .all(|(_, path)| matches!(path, Path::Direct { .. }))
    );
}

#[test]
fn behind_hard_nats_the_path_goes_through_the_relay() {
    let mut world = connected(Nat::Hard, Nat::Hard);
    // Through the relay: the client's allocation, or the gateway's (a direct path to its
    // relayed address), whichever pair ICE ends with.
    assert_eq!(
        world.client_path().1,
        Some(RELAY.ip()),
        "nominated: {:?}",
        world.nominated
    );
    let (sent, answered) = world.ping_for(Duration::from_secs(1));
    assert_eq!((sent, answered), (10, 10));
    assert!(world.received[1].iter().all(|(_, path)| match path {
        Path::Relayed { relay, .. } => *relay == RELAY,
        Path::Direct { remote } => remote.ip() == RELAY.ip(),
    }));
    // Each peer address got one channel on each allocation, asked for once: a second
    // binding for one peer is one the relay refuses.
    let mut asked = world.channel_binds.clone();
    asked.sort();
    asked.dedup();
    let mut peers: Vec<_> = asked.iter().map(|(from, peer, _)| (*from, *peer)).collect();
    peers.sort();
    peers.dedup();
    assert!(!peers.is_empty());
    assert_eq!(peers.len(), asked.len(), "{asked:?}");
}

#[test]
fn one_hard_nat_still_connects() {
    for (client, gateway) in [
        (Nat::Easy, Nat::Hard),
        (Nat::Hard, Nat::Easy),
        (Nat::None, Nat::Hard),
    ] {
        let mut world = connected(client, gateway);
        let (sent, answered) = world.ping_for(Duration::from_secs(1));
        assert_eq!(
            (sent, answered),
            (10, 10),
            "{client:?}/{gateway:?}: {:?}",
            world.nominated
        );
    }
}

#[test]
fn with_lost_datagrams_ice_still_finds_the_direct_path() {
    let mut world = World::new(Nat::Easy, Nat::None);
    world.loss = 5;
    world.run_for(Duration::from_secs(1));
    world.connect();
    world.run_for(Duration::from_secs(5));
    assert!(
        matches!(world.client_path(), (Path::Direct { .. }, None)),
        "nominated: {:?}",
        world.nominated
    );
    let (sent, answered) = world.ping_for(Duration::from_secs(2));
    assert_eq!(sent, 20);
    // Every fifth datagram is lost, pings and answers alike.
    assert!(answered >= 12, "{answered} of 20 came back");
}

#[test]
fn with_datagrams_overtaking_each_other_every_path_still_works() {
    for (client, gateway) in [(Nat::Easy, Nat::Easy), (Nat::Hard, Nat::Hard)] {
        let mut world = World::new(client, gateway);
        world.reorder = true;
        world.run_for(Duration::from_secs(1));
        world.connect();
        world.run_for(Duration::from_secs(3));
        let (sent, answered) = world.ping_for(Duration::from_secs(2));
        assert_eq!(sent, 20, "{client:?}/{gateway:?}: {:?}", world.nominated);
        // A ping overtaken by the path's last change may be lost; the rest come back.
        assert!(
            answered >= 18,
            "{client:?}/{gateway:?}: {answered} of 20: {:?}",
            world.nominated
        );
    }
}

#[test]
fn a_client_whose_nat_rebinds_gets_through_again() {
    let mut world = connected(Nat::Easy, Nat::None);
    assert_eq!(world.ping_for(Duration::from_secs(1)), (10, 10));
    world.routers[0].rebind();
    // Its next datagrams leave from another port: the gateway's ICE agent hears checks from
    // it and answers, and the gateway's answers follow the datagrams' new source.
    let (sent, answered) = world.ping_for(Duration::from_secs(10));
    assert_eq!(sent, 100);
    assert!(
        answered >= 90,
        "{answered} of 100 came back after the rebinding"
    );
}

#[test]
fn the_gateway_says_nothing_to_anyone_before_a_connection_exists() {
    let mut world = World::new(Nat::Easy, Nat::None);
    world.run_for(Duration::from_secs(1));
    // Only the client starts ICE: its checks reach the gateway, which has no connection.
    let now = world.now;
    world.client.connect(
        "gateway",
        Role::Controlling,
        &credentials(CLIENT_CREDENTIALS),
        &credentials(GATEWAY_CREDENTIALS),
        now,
    );
    let gateway_host = SocketAddr::new(IpAddr::V4(GATEWAY_PUBLIC), GATEWAY_INSIDE.port());
    let candidate = format!(
        "candidate:1 1 udp 2130706431 {} {} typ host",
        gateway_host.ip(),
        gateway_host.port()
    );
    world
        .client
        .add_remote_candidate(&"gateway", &candidate, now)
        .unwrap();
    world.run_for(Duration::from_secs(3));
    assert!(world.to_peers[0] > 0, "the client checked");
    // The checks reached the gateway (it has the public address itself) and were not
    // answered: it sent nothing to anyone but its relay.
    assert_eq!(world.to_peers[1], 0);
    assert!(world.client.path(&"gateway").is_none());
    assert!(world.received[1].is_empty());
}

#[test]
fn a_relay_that_restarts_loses_nothing_for_long() {
    let mut world = connected(Nat::Hard, Nat::Hard);
    assert_eq!(world.ping_for(Duration::from_secs(1)), (10, 10));
    // The relay restarts: every allocation, permission and channel it held is gone, and it
    // answers what it no longer knows with errors or not at all.
    world.relay = fresh_relay();
    let before = world.received[0].len();
    let (sent, _) = world.ping_for(Duration::from_secs(15));
    let answered: Vec<usize> = (before..world.received[0].len()).collect();
    assert_eq!(sent, 150);
    // ICE sees every pair fail, the nodes allocate again, trickle their new relayed
    // candidates and check the new pairs: answers come again, and keep coming.
    let last_ten = world.received[0]
        .iter()
        .rev()
        .take(10)
        .map(|(payload, _)| String::from_utf8_lossy(payload).into_owned())
        .collect::<Vec<_>>();
    assert!(
        answered.len() >= 50,
        "only {} of 150 pings came back after the relay restarted; last: {last_ten:?}",
        answered.len()
    );
    assert!(
        last_ten.contains(&"ping 149".to_owned()) || last_ten.contains(&"ping 148".to_owned()),
        "the last pings did not come back: {last_ten:?}"
    );
}
