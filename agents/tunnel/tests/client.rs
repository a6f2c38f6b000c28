//! The client core and two gateway cores on a simulated network and clock: access on the
//! first packet, denial as ICMP, and failover from a gateway that falls silent to another of
//! its site within ten seconds of silence, and not before.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fz_proto::{
    ClientMessage, ClientPeer, ClientReady, GatewayPeer, Grant, GrantedResource, PortalSigningKey,
    PortalToClient, PortalToGateway, PresharedKey, ResourceView, SignedGrant,
};
use fz_tunnel::Output;
use fz_tunnel::client::{self, Client, Event, REPORTED_DOWN_LIMIT, SILENCE_LIMIT};
use fz_tunnel::gateway::{self, Gateway, MAX_DATAGRAM};
use fz_tunnel::packet::{Packet, build};

const START_UNIX: u64 = 1_800_000_000;
const TICK: Duration = Duration::from_millis(250);
const CLIENT_ID: &str = "client-1";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

struct Site {
    id: String,
    core: Gateway,
    address: SocketAddr,
    alive: bool,
    /// What came out of its TUN side.
    forwarded: Vec<Vec<u8>>,
}

struct World {
    now: Instant,
    portal: PortalSigningKey,
    client: Client,
    client_address: SocketAddr,
    gateways: Vec<Site>,
    /// What the client asked the portal, in order.
    requests: Vec<ClientMessage>,
    events: Vec<Event>,
    /// What the client's TUN side delivered to applications.
    delivered: Vec<Vec<u8>>,
    /// When the client last received anything from each gateway.
    last_heard: Vec<Option<Instant>>,
    next_grant: u32,
}

impl World {
    fn new() -> World {
        World::with(false, Vec::new())
    }

    /// A world whose client has the full-tunnel option as given, and `more` resources in the
    /// portal's list beside `db`.
    fn with(full_tunnel: bool, more: Vec<ResourceView>) -> World {
        let now = Instant::now();
        let portal = PortalSigningKey::from_seed([7; 32]);
        let mut client = Client::new(
            client::Config {
                private_key: [2; 32],
                portal_key: portal.public_key(),
                seed: 10,
                // No host candidates: ICE stays idle and datagrams go to the grants'
                // endpoints, as they do when a gateway is reachable directly.
                host: Vec::new(),
                full_tunnel,
            },
            now,
            START_UNIX * 1000,
        );
        let mut resources = vec![ResourceView {
            id: "db".into(),
            address: "10.0.5.0/24".into(),
        }];
        resources.extend(more);
        client.handle_portal(
            PortalToClient::Ready(Box::new(ClientReady {
                client_id: CLIENT_ID.into(),
                tunnel_ipv4: "100.64.0.2".parse().unwrap(),
                tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
                resources,
                more: false,
            })),
            now,
        );
        let gateways = (0..2u8)
            .map(|n| {
                let id = format!("gw-{}", ["a", "b"][usize::from(n)]);
                let mut core = Gateway::new(
                    gateway::Config {
                        private_key: [50 + n; 32],
                        portal_key: portal.public_key(),
                        seed: 100 * u32::from(n),
                        host: Vec::new(),
                    },
                    now,
                    START_UNIX * 1000,
                );
                core.handle_portal(
                    PortalToGateway::Ready {
                        gateway_id: id.clone(),
                        heartbeat_interval_ms: 5000,
                        grants: vec![],
                    },
                    now,
                );
                Site {
                    id,
                    core,
                    address: format!("203.0.113.{}:51820", n + 1).parse().unwrap(),
                    alive: true,
                    forwarded: Vec::new(),
                }
            })
            .collect();
        World {
            now,
            portal,
            client,
            client_address: "198.51.100.2:40000".parse().unwrap(),
            gateways,
            requests: Vec::new(),
            events: Vec::new(),
            delivered: Vec::new(),
            last_heard: vec![None, None],
            next_grant: 0,
        }
    }

    /// The portal's grant of `resource` through gateway `g`, as both agents receive it.
    fn grant_via(&mut self, g: usize, resource: &str, address: &str) -> SignedGrant {
        self.next_grant += 1;
        let site = &mut self.gateways[g];
        let signed = Grant {
            id: format!("gr-{}", self.next_grant),
            account: "acme".into(),
            client: ClientPeer {
                id: CLIENT_ID.into(),
                public_key: self.client.public_key(),
                tunnel_ipv4: "100.64.0.2".parse().unwrap(),
                tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
                endpoints: vec![self.client_address],
            },
            gateway: GatewayPeer {
                id: site.id.clone(),
                public_key: site.core.public_key(),
                endpoints: vec![site.address],
            },
            preshared_key: PresharedKey([g as u8 + 1; 32]),
            resource: GrantedResource {
                id: resource.into(),
                address: address.into(),
                filter: None,
                except: Vec::new(),
                dns: None,
            },
            rule: "rule".into(),
            bundle_hash: "hash".into(),
            issued_at: START_UNIX,
            expires_at: START_UNIX + 3600,
        }
        .sign(&self.portal);
        site.core.handle_portal(
            PortalToGateway::Grant {
                grant: Box::new(signed.clone()),
            },
            self.now,
        );
        while site.core.poll_event().is_some() {}
        self.client.handle_portal(
            PortalToClient::Granted {
                grant: Box::new(signed.clone()),
                resolved: None,
            },
            self.now,
        );
        self.pump(Vec::new());
        signed
    }

    /// An application's packet into the client's TUN side.
    fn app_sends(&mut self, packet: &[u8]) {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let first = self.client.handle_tun(packet, &mut buffer, self.now);
        let first = self.take(first);
        self.pump(first);
    }

    /// A packet from the site to the client, through gateway `g`.
    fn site_sends(&mut self, g: usize, packet: &[u8]) {
        let mut packet = packet.to_vec();
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let site = &mut self.gateways[g];
        let datagram = match site.core.handle_tun(&mut packet, &mut buffer, self.now) {
            Some(Output::Network(to, bytes)) => {
                assert_eq!(to, self.client_address);
                bytes.to_vec()
            }
            other => panic!("the gateway did not send the reply: {other:?}"),
        };
        self.deliver_to_client(g, &datagram);
        self.pump(Vec::new());
    }

    fn deliver_to_client(&mut self, g: usize, datagram: &[u8]) -> Vec<client::Transmit> {
        self.last_heard[g] = Some(self.now);
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let from = self.gateways[g].address;
        let output = self
            .client
            .handle_network(from, datagram, &mut buffer, self.now);
        self.take(output)
    }

    /// What the client gave back for one input: a packet for the application is delivered,
    /// a datagram for a gateway returned.
    fn take(&mut self, output: Option<Output<'_>>) -> Vec<client::Transmit> {
        match output {
            Some(Output::Tun(packet)) => {
                self.delivered.push(packet.to_vec());
                Vec::new()
            }
            Some(Output::Network(destination, payload)) => vec![client::Transmit {
                destination,
                payload: payload.into_owned(),
            }],
            None => Vec::new(),
        }
    }

    /// Moves datagrams both ways until nobody has anything to say.
    fn pump(&mut self, mut to_gateways: Vec<client::Transmit>) {
        loop {
            to_gateways.extend(std::iter::from_fn(|| self.client.poll_transmit()));
            self.delivered
                .extend(std::iter::from_fn(|| self.client.poll_tun()));
            for event in std::iter::from_fn(|| self.client.poll_event()) {
                match event {
                    Event::ToPortal(message) => self.requests.push(message),
                    other => self.events.push(other),
                }
            }
            if to_gateways.is_empty() {
                return;
            }
            let mut to_client: Vec<(usize, Vec<u8>)> = Vec::new();
            for transmit in to_gateways.drain(..) {
                let g = self
                    .gateways
                    .iter()
                    .position(|s| s.address == transmit.destination)
                    .expect("a datagram to a known gateway");
                let site = &mut self.gateways[g];
                if !site.alive {
                    continue;
                }
                let mut buffer = vec![0u8; MAX_DATAGRAM];
                match site.core.handle_network(
                    self.client_address,
                    &transmit.payload,
                    &mut buffer,
                    self.now,
                ) {
                    Some(Output::Tun(packet)) => site.forwarded.push(packet.to_vec()),
                    Some(Output::Network(_, bytes)) => to_client.push((g, bytes.to_vec())),
                    None => {}
                }
                while let Some(t) = site.core.poll_transmit() {
                    to_client.push((g, t.payload));
                }
            }
            for (g, datagram) in to_client {
                let answers = self.deliver_to_client(g, &datagram);
                to_gateways.extend(answers);
            }
        }
    }

    /// Time passes in ticks; both sides run their timers.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while self.now < until {
            self.now += TICK;
            self.client.handle_timeout(self.now);
            let mut from_gateways = Vec::new();
            for (g, site) in self.gateways.iter_mut().enumerate() {
                if !site.alive {
                    continue;
                }
                site.core.handle_timeout(self.now);
                while let Some(t) = site.core.poll_transmit() {
                    from_gateways.push((g, t.payload));
                }
            }
            let mut answers = Vec::new();
            for (g, datagram) in from_gateways {
                answers.extend(self.deliver_to_client(g, &datagram));
            }
            self.pump(answers);
        }
    }

    fn lost(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::GatewayLost { gateway_id } => Some(gateway_id.as_str()),
                _ => None,
            })
            .collect()
    }
}

fn full_tunnel_events(world: &World) -> Vec<bool> {
    world
        .events
        .iter()
        .filter_map(|e| match e {
            Event::FullTunnel { on } => Some(*on),
            _ => None,
        })
        .collect()
}

fn internet_requests(world: &World) -> usize {
    world
        .requests
        .iter()
        .filter(
            |r| matches!(r, ClientMessage::RequestAccess { resource, .. } if resource == "egress"),
        )
        .count()
}

fn to_db(port: u16) -> Vec<u8> {
    build::ip(
        ip("100.64.0.2"),
        ip("10.0.5.10"),
        6,
        &build::ports(port, 5432),
    )
}

#[test]
fn the_first_packet_asks_and_waits_and_goes_once_granted() {
    let mut world = World::new();
    world.app_sends(&to_db(40000));
    world.app_sends(&to_db(40001));
    assert_eq!(
        world.requests,
        [ClientMessage::RequestAccess {
            resource: "db".into(),
            dns: None,
            avoid: vec![],
        }],
        "one request for both packets"
    );
    assert!(world.gateways[0].forwarded.is_empty());
    world.grant_via(0, "db", "10.0.5.0/24");
    assert_eq!(world.gateways[0].forwarded, [to_db(40000), to_db(40001)]);
    // The answer comes back to the application.
    let reply = build::ip(
        ip("10.0.5.10"),
        ip("100.64.0.2"),
        6,
        &build::ports(5432, 40000),
    );
    world.site_sends(0, &reply);
    assert_eq!(world.delivered, [reply]);
    assert_eq!(
        world.client.gateways_in_use(),
        [("db".into(), "gw-a".into())]
    );
}

/// `internet` in the portal's list: a client with the full-tunnel option asks for it at once
/// and is told to route everything in once granted; public addresses then go to the grant's
/// gateway. A grant that expires keeps the routes (the next packet asks again); a revoked one
/// gives them back at once, as does a refusal. Without the option nothing is asked.
#[test]
fn a_full_tunnel_asks_for_internet_at_once_and_follows_its_grant() {
    let egress = || ResourceView {
        id: "egress".into(),
        address: "internet".into(),
    };
    let mut world = World::with(false, vec![egress()]);
    world.pump(Vec::new());
    assert_eq!(internet_requests(&world), 0);
    assert!(full_tunnel_events(&world).is_empty());

    let mut world = World::with(true, vec![egress()]);
    world.pump(Vec::new());
    assert_eq!(
        world.requests,
        [ClientMessage::RequestAccess {
            resource: "egress".into(),
            dns: None,
            avoid: vec![],
        }]
    );
    assert!(
        full_tunnel_events(&world).is_empty(),
        "nothing before the grant"
    );
    let grant = world.grant_via(1, "egress", "internet");
    assert_eq!(full_tunnel_events(&world), [true]);
    let public = |port| {
        build::ip(
            ip("100.64.0.2"),
            ip("192.0.2.80"),
            6,
            &build::ports(port, 443),
        )
    };
    world.app_sends(&public(40000));
    assert_eq!(world.gateways[1].forwarded, [public(40000)]);
    // db is its own resource, not the internet's.
    world.app_sends(&to_db(40000));
    assert!(world.gateways[1].forwarded.len() == 1);

    // Revoked: the routes go at once.
    world.client.handle_portal(
        PortalToClient::Revoked {
            grant_id: grant.grant.id.clone(),
            reason: "the policy no longer allows it".into(),
        },
        world.now,
    );
    world.pump(Vec::new());
    assert_eq!(full_tunnel_events(&world), [true, false]);

    // Granted again, then expired: the routes stay, and the next public packet asks again.
    world.grant_via(0, "egress", "internet");
    assert_eq!(full_tunnel_events(&world), [true, false, true]);
    world.now += Duration::from_secs(3601);
    world.client.handle_timeout(world.now);
    world.pump(Vec::new());
    assert_eq!(full_tunnel_events(&world), [true, false, true]);
    let asked = internet_requests(&world);
    world.app_sends(&public(40001));
    assert_eq!(internet_requests(&world), asked + 1);

    // Refused this time: off.
    world.client.handle_portal(
        PortalToClient::Rejected {
            resource: "egress".into(),
            reason: "no allow rule applies".into(),
        },
        world.now,
    );
    world.pump(Vec::new());
    assert_eq!(full_tunnel_events(&world), [true, false, true, false]);
}

#[test]
fn a_denial_answers_the_application_with_icmp_prohibited() {
    let mut world = World::new();
    world.app_sends(&to_db(40000));
    world.client.handle_portal(
        PortalToClient::Rejected {
            resource: "db".into(),
            reason: "no allow rule applies".into(),
        },
        world.now,
    );
    world.pump(Vec::new());
    let [error] = world.delivered.as_slice() else {
        panic!("{:?}", world.delivered)
    };
    let parsed = Packet::parse(error).unwrap();
    assert_eq!(
        (parsed.source, parsed.destination),
        (ip("10.0.5.10"), ip("100.64.0.2"))
    );
    assert_eq!(&error[20..22], &[3, 13], "ICMP administratively prohibited");
    assert!(world.events.contains(&Event::Rejected {
        resource: "db".into(),
        reason: "no allow rule applies".into()
    }));
    // Packets to no resource go nowhere.
    world.app_sends(&build::ip(
        ip("100.64.0.2"),
        ip("192.0.2.1"),
        6,
        &build::ports(1, 2),
    ));
    assert_eq!(world.requests.len(), 1);
}

#[test]
fn a_silent_gateway_is_left_after_ten_seconds_and_traffic_resumes_through_the_other() {
    let mut world = World::new();
    world.app_sends(&to_db(40000));
    world.grant_via(0, "db", "10.0.5.0/24");

    // A live gateway keeps the client sure of it, even when the resource never answers:
    // a minute of one-way traffic, one packet a second, and no failover.
    for second in 0..60 {
        world.app_sends(&to_db(41000 + second));
        world.advance(Duration::from_secs(1));
    }
    assert!(world.lost().is_empty(), "{:?}", world.events);
    assert_eq!(world.gateways[0].forwarded.len(), 61);

    // gw-a dies. The client keeps sending; the first packet nobody answers starts the clock.
    world.gateways[0].alive = false;
    let last_heard = world.last_heard[0].unwrap();
    let (first_unanswered, moved_at) = send_until_a_gateway_is_left(&mut world);
    assert_eq!(world.lost(), ["gw-a"]);
    assert!(
        moved_at - last_heard >= SILENCE_LIMIT,
        "left after {:?} of silence, before the limit",
        moved_at - last_heard
    );
    assert!(
        moved_at - first_unanswered <= SILENCE_LIMIT + TICK,
        "left {:?} after the first unanswered packet",
        moved_at - first_unanswered
    );
    // It asks again, avoiding gw-a; the portal grants through gw-b and traffic resumes there.
    assert_eq!(
        world.requests.last(),
        Some(&ClientMessage::RequestAccess {
            resource: "db".into(),
            dns: None,
            avoid: vec!["gw-a".into()],
        })
    );
    world.app_sends(&to_db(43000));
    world.grant_via(1, "db", "10.0.5.0/24");
    assert_eq!(world.gateways[1].forwarded, [to_db(43000)]);
    world.app_sends(&to_db(43001));
    assert_eq!(world.gateways[1].forwarded.len(), 2);
    assert_eq!(
        world.client.gateways_in_use(),
        [("db".into(), "gw-b".into())]
    );
    let reply = build::ip(
        ip("10.0.5.10"),
        ip("100.64.0.2"),
        6,
        &build::ports(5432, 43001),
    );
    world.site_sends(1, &reply);
    assert_eq!(world.delivered.last(), Some(&reply));
}

#[test]
fn a_gateway_the_portal_reports_down_is_left_after_a_short_silence_and_not_before() {
    let mut world = World::new();
    world.app_sends(&to_db(40000));
    world.grant_via(0, "db", "10.0.5.0/24");
    let down = || PortalToClient::GatewayDown {
        gateway_id: "gw-a".into(),
    };

    // Only gw-a's connection to the portal broke: it still answers, so the client keeps it,
    // through a minute of one-way traffic.
    world.client.handle_portal(down(), world.now);
    for second in 0..60 {
        world.app_sends(&to_db(41000 + second));
        world.advance(Duration::from_secs(1));
    }
    assert!(world.lost().is_empty(), "{:?}", world.events);

    // gw-a dies, and the portal says so: the client leaves it once it has waited
    // REPORTED_DOWN_LIMIT for an answer, long before the ten seconds it gives a gateway the
    // portal says nothing of.
    world.gateways[0].alive = false;
    world.client.handle_portal(down(), world.now);
    let last_heard = world.last_heard[0].unwrap();
    let (first_unanswered, moved_at) = send_until_a_gateway_is_left(&mut world);
    assert_eq!(world.lost(), ["gw-a"]);
    assert!(
        moved_at - last_heard >= REPORTED_DOWN_LIMIT,
        "left after {:?} of silence, before the limit",
        moved_at - last_heard
    );
    assert!(
        moved_at - first_unanswered <= REPORTED_DOWN_LIMIT + TICK,
        "left {:?} after the first unanswered packet",
        moved_at - first_unanswered
    );
    assert!(REPORTED_DOWN_LIMIT + TICK < SILENCE_LIMIT);
    assert_eq!(
        world.requests.last(),
        Some(&ClientMessage::RequestAccess {
            resource: "db".into(),
            dns: None,
            avoid: vec!["gw-a".into()],
        })
    );
}

#[test]
fn a_gateway_can_only_deliver_what_its_grants_cover_and_bad_grants_are_refused() {
    let mut world = World::new();
    world.app_sends(&to_db(40000));
    world.grant_via(0, "db", "10.0.5.0/24");
    // The gateway is trusted with 10.0.5.0/24 only: a packet from elsewhere is dropped,
    // even though it arrives through the tunnel. (The gateway core itself would not send
    // one; a compromised gateway might.)
    let before = world.client.metrics().dropped;
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let forged = build::ip(ip("192.0.2.9"), ip("100.64.0.2"), 6, &build::ports(1, 2));
    // Seal it as gw-a would, through gw-a's own core with a grant that covers the address.
    let everything = Grant {
        resource: GrantedResource {
            id: "everything".into(),
            address: "internet".into(),
            filter: None,
            except: Vec::new(),
            dns: None,
        },
        id: "gr-forged".into(),
        ..world_grant(&world, 0)
    }
    .sign(&world.portal);
    let now = world.now;
    world.gateways[0].core.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(everything),
        },
        now,
    );
    let mut packet = forged.clone();
    let Some(Output::Network(_, datagram)) =
        world.gateways[0]
            .core
            .handle_tun(&mut packet, &mut buffer, world.now)
    else {
        panic!("the gateway sealed the packet")
    };
    let datagram = datagram.to_vec();
    let delivered = world.delivered.len();
    world.deliver_to_client(0, &datagram);
    assert!(world.client.poll_tun().is_none());
    assert_eq!(
        world.delivered.len(),
        delivered,
        "a forged packet reached the application"
    );
    assert_eq!(world.client.metrics().dropped, before + 1);

    // A grant signed by another key is refused and routes nothing.
    let mut forged_grant = world_grant(&world, 1);
    forged_grant.resource.id = "db".into();
    let forged_grant = forged_grant.sign(&PortalSigningKey::from_seed([66; 32]));
    world.client.handle_portal(
        PortalToClient::Granted {
            grant: Box::new(forged_grant),
            resolved: None,
        },
        world.now,
    );
    assert!(matches!(
        world.client.poll_event(),
        Some(Event::Refused { .. })
    ));
    assert_eq!(
        world.client.gateways_in_use(),
        [("db".into(), "gw-a".into())]
    );
}

/// A grant for the client through gateway `g` (unsigned, for tests to change).
/// The application sends to db once a second (every fourth tick) until the client leaves a
/// gateway, for at most twenty seconds; when it sent the first packet and when it left.
fn send_until_a_gateway_is_left(world: &mut World) -> (Instant, Instant) {
    let mut first_sent = None;
    for step in 0..80u16 {
        if step % 4 == 0 {
            world.app_sends(&to_db(42000 + step));
            first_sent.get_or_insert(world.now);
        }
        world.advance(TICK);
        if !world.lost().is_empty() {
            return (first_sent.unwrap(), world.now);
        }
    }
    panic!(
        "the client left no gateway in twenty seconds: {:?}",
        world.events
    );
}

fn world_grant(world: &World, g: usize) -> Grant {
    let site = &world.gateways[g];
    Grant {
        id: "gr-x".into(),
        account: "acme".into(),
        client: ClientPeer {
            id: CLIENT_ID.into(),
            public_key: world.client.public_key(),
            tunnel_ipv4: "100.64.0.2".parse().unwrap(),
            tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
            endpoints: vec![world.client_address],
        },
        gateway: GatewayPeer {
            id: site.id.clone(),
            public_key: site.core.public_key(),
            endpoints: vec![site.address],
        },
        preshared_key: PresharedKey([g as u8 + 1; 32]),
        resource: GrantedResource {
            id: "db".into(),
            address: "10.0.5.0/24".into(),
            filter: None,
            except: Vec::new(),
            dns: None,
        },
        rule: "rule".into(),
        bundle_hash: "hash".into(),
        issued_at: START_UNIX,
        expires_at: START_UNIX + 3600,
    }
}
