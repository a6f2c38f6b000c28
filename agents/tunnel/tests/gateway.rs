//! The gateway core on a simulated network and clock: real boringtun client peers talk to it
//! through plain byte vectors, the portal's messages are signed with a real portal key, and
//! time moves only when a test moves it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use fz_proto::{
    ClientPeer, DnsMapping, GatewayMessage, GatewayPeer, Grant, GrantedResource, PortalSigningKey,
    PortalToGateway, PresharedKey, PublicKey, Resolution, SignedGrant,
};
use fz_tunnel::Drop;
use fz_tunnel::Output;
use fz_tunnel::filter::GrantFilter;
use fz_tunnel::gateway::{
    Config, Event, Gateway, MAX_DATAGRAM, RESOLVE_DEADLINE, Removal, Resolved,
};
use fz_tunnel::packet::build;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// The simulated wall clock at the start: 2027-01-15.
const START_UNIX: u64 = 1_800_000_000;
const GATEWAY_ID: &str = "gw-1";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A client device: a boringtun peer of the gateway, with its tunnel addresses.
struct Client {
    id: String,
    secret: [u8; 32],
    tunnel: Tunn,
    address: SocketAddr,
    v4: IpAddr,
    v6: IpAddr,
    preshared_key: [u8; 32],
}

impl Client {
    fn public_key(&self) -> PublicKey {
        PublicKey(X25519Public::from(&StaticSecret::from(self.secret)).to_bytes())
    }
}

struct Sim {
    gateway: Gateway,
    gateway_secret: [u8; 32],
    portal: PortalSigningKey,
    now: Instant,
    next_grant: u32,
}

impl Sim {
    /// A gateway the portal has said `ready` to.
    fn new() -> Sim {
        let portal = PortalSigningKey::from_seed([7; 32]);
        let now = Instant::now();
        let gateway_secret = [9; 32];
        let mut gateway = Gateway::new(
            Config {
                private_key: gateway_secret,
                portal_key: portal.public_key(),
                seed: 1000,
                host: Vec::new(),
            },
            now,
            START_UNIX * 1000,
        );
        gateway.handle_portal(
            PortalToGateway::Ready {
                gateway_id: GATEWAY_ID.into(),
                heartbeat_interval_ms: 10_000,
                grants: vec![],
            },
            now,
        );
        Sim {
            gateway,
            gateway_secret,
            portal,
            now,
            next_grant: 0,
        }
    }

    fn client(&self, n: u8) -> Client {
        self.client_with_key(n, [n; 32], [n.wrapping_add(100); 32])
    }

    fn client_with_key(&self, n: u8, secret: [u8; 32], preshared_key: [u8; 32]) -> Client {
        let gateway_public =
            X25519Public::from(&StaticSecret::from(self.gateway_secret)).to_bytes();
        Client {
            id: format!("client-{n}"),
            secret,
            tunnel: Tunn::new(
                StaticSecret::from(secret),
                X25519Public::from(gateway_public),
                Some(preshared_key),
                None,
                u32::from(n),
                None,
            ),
            address: format!("198.51.100.{n}:40000").parse().unwrap(),
            v4: format!("100.64.0.{n}").parse().unwrap(),
            v6: format!("fd00:2021:1111::{n}").parse().unwrap(),
            preshared_key,
        }
    }

    fn grant(&mut self, client: &Client, address: &str, filter: &[&str]) -> SignedGrant {
        self.signed(client, address, filter, None, 3600)
    }

    /// A grant for `address` that does not open the networks in `except`.
    fn carved_grant(&mut self, client: &Client, address: &str, except: &[&str]) -> SignedGrant {
        let mut grant = self.signed(client, address, &[], None, 3600).grant;
        grant.resource.except = except.iter().map(|e| (*e).to_owned()).collect();
        grant.sign(&self.portal)
    }

    fn dns_grant(
        &mut self,
        client: &Client,
        pattern: &str,
        name: &str,
        mapped: &[&str],
        filter: &[&str],
    ) -> SignedGrant {
        let dns = DnsMapping {
            name: name.into(),
            mapped: mapped.iter().map(|m| ip(m)).collect(),
        };
        self.signed(client, pattern, filter, Some(dns), 3600)
    }

    fn signed(
        &mut self,
        client: &Client,
        address: &str,
        filter: &[&str],
        dns: Option<DnsMapping>,
        lifetime: u64,
    ) -> SignedGrant {
        self.next_grant += 1;
        let IpAddr::V4(v4) = client.v4 else { panic!() };
        let IpAddr::V6(v6) = client.v6 else { panic!() };
        Grant {
            id: format!("gr-{}", self.next_grant),
            account: "acme".into(),
            client: ClientPeer {
                id: client.id.clone(),
                public_key: client.public_key(),
                tunnel_ipv4: v4,
                tunnel_ipv6: v6,
                endpoints: vec![client.address],
            },
            gateway: GatewayPeer {
                id: GATEWAY_ID.into(),
                public_key: self.gateway.public_key(),
                endpoints: vec!["203.0.113.1:51820".parse().unwrap()],
            },
            preshared_key: PresharedKey(client.preshared_key),
            resource: GrantedResource {
                id: address.replace('/', "_"),
                address: address.into(),
                filter: (!filter.is_empty())
                    .then(|| filter.iter().map(|f| (*f).to_owned()).collect()),
                except: Vec::new(),
                dns,
            },
            rule: "rule".into(),
            bundle_hash: "hash".into(),
            issued_at: START_UNIX,
            expires_at: START_UNIX + lifetime,
        }
        .sign(&self.portal)
    }

    /// Sends a grant and returns what the gateway said to the portal about it.
    fn send_grant(&mut self, grant: &SignedGrant) -> Vec<GatewayMessage> {
        self.gateway.handle_portal(
            PortalToGateway::Grant {
                grant: Box::new(grant.clone()),
            },
            self.now,
        );
        self.said_to_portal()
    }

    fn said_to_portal(&mut self) -> Vec<GatewayMessage> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::ToPortal(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.gateway.poll_event()).collect()
    }

    fn install(&mut self, grant: &SignedGrant) {
        assert_eq!(
            self.send_grant(grant),
            [GatewayMessage::Ack {
                grant_id: grant.grant.id.clone(),
                resolved: None
            }]
        );
    }

    /// Installs a DNS grant whose name resolves to `real`.
    fn install_dns(&mut self, grant: &SignedGrant, real: &[&str]) -> Vec<GatewayMessage> {
        let name = grant.grant.resource.dns.as_ref().unwrap().name.clone();
        let events = {
            self.gateway.handle_portal(
                PortalToGateway::Grant {
                    grant: Box::new(grant.clone()),
                },
                self.now,
            );
            self.events()
        };
        assert!(
            events.contains(&Event::Resolve { name: name.clone() }),
            "{events:?}"
        );
        self.gateway.handle_resolved(
            &name,
            Resolved::Addresses {
                addresses: real.iter().map(|r| ip(r)).collect(),
                ttl: Duration::from_secs(60),
            },
            self.now,
        );
        self.said_to_portal()
    }

    /// A packet from the client through its tunnel: what came out on the gateway's TUN side.
    /// Handshakes happen on the way, as they would.
    fn send_from_client(&mut self, client: &mut Client, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![0u8; MAX_DATAGRAM];
        let mut to_gateway = Vec::new();
        match client.tunnel.encapsulate(packet, &mut out) {
            TunnResult::WriteToNetwork(bytes) => to_gateway.push(bytes.to_vec()),
            other => panic!("the client could not send: {other:?}"),
        }
        let mut tun = Vec::new();
        // Exchange datagrams until neither side has anything more to say.
        while !to_gateway.is_empty() {
            let mut to_client = Vec::new();
            for datagram in to_gateway.drain(..) {
                let mut buffer = vec![0u8; MAX_DATAGRAM];
                match self
                    .gateway
                    .handle_network(client.address, &datagram, &mut buffer, self.now)
                {
                    Some(Output::Tun(packet)) => tun.push(packet.to_vec()),
                    Some(Output::Network(to, bytes)) => {
                        assert_eq!(to, client.address);
                        to_client.push(bytes.to_vec());
                    }
                    None => {}
                }
                while let Some(transmit) = self.gateway.poll_transmit() {
                    assert_eq!(transmit.destination, client.address);
                    to_client.push(transmit.payload);
                }
            }
            for datagram in to_client {
                let mut buffer = vec![0u8; MAX_DATAGRAM];
                if let TunnResult::WriteToNetwork(bytes) =
                    client.tunnel.decapsulate(None, &datagram, &mut buffer)
                {
                    to_gateway.push(bytes.to_vec());
                    loop {
                        let mut buffer = vec![0u8; MAX_DATAGRAM];
                        match client.tunnel.decapsulate(None, &[], &mut buffer) {
                            TunnResult::WriteToNetwork(bytes) => to_gateway.push(bytes.to_vec()),
                            _ => break,
                        }
                    }
                }
            }
        }
        tun
    }

    /// A packet from the site to a client: what the client's tunnel delivered, if anything.
    fn send_to_client(&mut self, client: &mut Client, packet: &[u8]) -> Option<Vec<u8>> {
        let mut packet = packet.to_vec();
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let Output::Network(to, datagram) =
            self.gateway
                .handle_tun(&mut packet, &mut buffer, self.now)?
        else {
            panic!("a packet from the site went back to the site");
        };
        assert_eq!(to, client.address);
        let mut out = vec![0u8; MAX_DATAGRAM];
        match client.tunnel.decapsulate(None, &datagram, &mut out) {
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                Some(packet.to_vec())
            }
            other => panic!("the client could not open the gateway's packet: {other:?}"),
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.gateway.handle_timeout(self.now);
    }

    fn dropped(&self, reason: Drop) -> u64 {
        self.gateway.metrics().dropped(reason)
    }
}

fn tcp(source: IpAddr, destination: IpAddr, ports: (u16, u16)) -> Vec<u8> {
    build::ip(source, destination, TCP, &build::ports(ports.0, ports.1))
}

fn udp(source: IpAddr, destination: IpAddr, ports: (u16, u16)) -> Vec<u8> {
    let mut header = build::ports(ports.0, ports.1);
    header.truncate(8);
    build::ip(source, destination, UDP, &header)
}

fn echo(source: IpAddr, destination: IpAddr, identifier: u16, reply: bool) -> Vec<u8> {
    let (protocol, kind) = match (source.is_ipv4(), reply) {
        (true, false) => (ICMP, 8),
        (true, true) => (ICMP, 0),
        (false, false) => (ICMPV6, 128),
        (false, true) => (ICMPV6, 129),
    };
    let id = identifier.to_be_bytes();
    build::ip(
        source,
        destination,
        protocol,
        &[kind, 0, 0, 0, id[0], id[1], 0, 1],
    )
}

/// Source and destination of an IP packet.
fn addresses(packet: &[u8]) -> (IpAddr, IpAddr) {
    let parsed = fz_tunnel::packet::Packet::parse(packet).unwrap();
    (parsed.source, parsed.destination)
}

#[test]
fn a_client_key_gets_a_handshake_only_while_it_holds_a_grant() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let packet = tcp(a4, ip("10.0.5.10"), (40000, 5432));

    // No grant: the handshake initiation gets no answer at all.
    assert!(sim.send_from_client(&mut alice, &packet).is_empty());
    assert_eq!(sim.dropped(Drop::UnknownKey), 1);
    assert_eq!(sim.gateway.metrics().handshakes, 0);

    let grant = sim.grant(&alice, "10.0.5.10", &["tcp/5432"]);
    sim.install(&grant);
    assert_eq!(sim.gateway.peer_count(), 1);
    // boringtun waits before it initiates again; a new client device shows the same.
    let mut alice = sim.client(2);
    assert_eq!(
        sim.send_from_client(&mut alice, &packet),
        std::slice::from_ref(&packet)
    );
    assert_eq!(sim.gateway.metrics().handshakes, 1);
    assert_eq!(sim.gateway.metrics().packets_from_clients, 1);

    // And the answer goes back through the tunnel.
    let reply = tcp(ip("10.0.5.10"), a4, (5432, 40000));
    assert_eq!(sim.send_to_client(&mut alice, &reply), Some(reply.clone()));
}

/// A peer with a grant holds no WireGuard state until its client's handshake initiation
/// comes: an idle client costs the gateway its grant only. A data message for it before then
/// (a guessed index, a forged message) is refused and makes no state either.
#[test]
fn an_idle_peer_holds_no_wireguard_state_until_its_client_initiates() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let grant = sim.grant(&alice, "10.0.5.10", &["tcp/5432"]);
    sim.install(&grant);
    assert_eq!(
        (sim.gateway.peer_count(), sim.gateway.active_peer_count()),
        (1, 0)
    );

    // A data message for each of the first 2,048 peer indices (the gateway hands them out
    // from its seed, 1000): refused, nothing made.
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    for index in 0..2048u32 {
        let mut forged = vec![4, 0, 0, 0];
        forged.extend_from_slice(&(index << 8).to_le_bytes());
        forged.extend_from_slice(&[0; 8 + 16 + 32]);
        assert!(
            sim.gateway
                .handle_network(alice.address, &forged, &mut buffer, sim.now)
                .is_none()
        );
    }
    assert_eq!(sim.gateway.active_peer_count(), 0);

    let packet = tcp(alice.v4, ip("10.0.5.10"), (40000, 5432));
    assert_eq!(
        sim.send_from_client(&mut alice, &packet),
        std::slice::from_ref(&packet)
    );
    assert_eq!(sim.gateway.active_peer_count(), 1);
}

#[test]
fn the_filter_passes_exactly_what_the_grant_names() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let grant = sim.grant(
        &alice,
        "10.0.5.0/24",
        &["tcp/5432", "udp/8000-8100", "icmp"],
    );
    sim.install(&grant);
    let (a4, a6) = (alice.v4, alice.v6);
    let db = ip("10.0.5.10");
    let cases: Vec<(Vec<u8>, Result<(), Drop>)> = vec![
        (tcp(a4, db, (40000, 5432)), Ok(())),
        (udp(a4, db, (40000, 8000)), Ok(())),
        (udp(a4, db, (40000, 8100)), Ok(())),
        (echo(a4, db, 7, false), Ok(())),
        (tcp(a4, ip("10.0.5.254"), (40000, 5432)), Ok(())),
        (tcp(a4, db, (40000, 22)), Err(Drop::PortNotGranted)),
        (udp(a4, db, (40000, 8101)), Err(Drop::PortNotGranted)),
        (
            build::ip(a4, db, 47, &[0; 8]),
            Err(Drop::ProtocolNotGranted),
        ),
        (
            tcp(a4, ip("10.0.6.1"), (40000, 5432)),
            Err(Drop::DestinationNotGranted),
        ),
        (
            tcp(a6, ip("fd00::10"), (40000, 5432)),
            Err(Drop::DestinationNotGranted),
        ),
        (
            tcp(ip("100.64.0.9"), db, (40000, 5432)),
            Err(Drop::NotFromClient),
        ),
    ];
    for (packet, expected) in cases {
        let before = sim.gateway.metrics().clone();
        let out = sim.send_from_client(&mut alice, &packet);
        let parsed = fz_tunnel::packet::Packet::parse(&packet).unwrap();
        match expected {
            Ok(()) => assert_eq!(out, std::slice::from_ref(&packet), "{parsed:?}"),
            Err(reason) => {
                assert!(out.is_empty(), "{parsed:?} passed");
                assert_eq!(
                    sim.dropped(reason),
                    before.dropped(reason) + 1,
                    "{parsed:?} counted as {reason:?}"
                );
            }
        }
    }
    // Replies: from the resource and a granted port, to the client; nothing else.
    let replies: Vec<(Vec<u8>, bool)> = vec![
        (tcp(db, a4, (5432, 40000)), true),
        (echo(db, a4, 7, true), true),
        (tcp(db, a4, (22, 40000)), false),
        (tcp(ip("10.0.6.1"), a4, (5432, 40000)), false),
    ];
    for (packet, passes) in replies {
        assert_eq!(sim.send_to_client(&mut alice, &packet).is_some(), passes);
    }
    assert_eq!(sim.dropped(Drop::NotFromResource), 2);
    assert_eq!(
        sim.send_to_client(&mut alice, &tcp(db, ip("100.64.0.77"), (5432, 1))),
        None
    );
    assert_eq!(sim.dropped(Drop::NoClient), 1);
}

/// A grant opens what its resource serves: `internet` only public addresses, and neither a
/// wide network nor `internet` the networks more specific resources serve (the grant's
/// carve-outs), in either direction.
#[test]
fn a_grant_opens_only_what_its_resource_serves() {
    let mut sim = Sim::new();
    let mut frank = sim.client(2);
    let egress = sim.carved_grant(&frank, "internet", &["198.18.0.0/15"]);
    sim.install(&egress);
    let mut alice = sim.client(3);
    let corp = sim.carved_grant(&alice, "10.0.0.0/8", &["10.0.5.0/24"]);
    sim.install(&corp);
    let (f4, f6, a4) = (frank.v4, frank.v6, alice.v4);
    // (frank's or alice's, packet, passes)
    let cases: Vec<(bool, Vec<u8>, bool)> = vec![
        (true, tcp(f4, ip("8.8.8.8"), (40000, 443)), true),
        (true, tcp(f6, ip("2606:4700::1111"), (40000, 443)), true),
        // Private resources at the site (the example tree's bastion and prod-db), the
        // gateway's own ranges and another resource's public network: not `internet`.
        (true, tcp(f6, ip("fd00:20::10"), (40000, 22)), false),
        (true, tcp(f4, ip("10.20.5.9"), (40000, 5432)), false),
        (true, tcp(f4, ip("100.64.0.3"), (40000, 22)), false),
        (true, tcp(f4, ip("198.18.0.1"), (40000, 443)), false),
        (false, tcp(a4, ip("10.0.4.1"), (40000, 22)), true),
        (false, tcp(a4, ip("10.0.5.9"), (40000, 5432)), false),
    ];
    for (from_frank, packet, passes) in cases {
        let client = if from_frank { &mut frank } else { &mut alice };
        let out = sim.send_from_client(client, &packet);
        assert_eq!(!out.is_empty(), passes, "{:?}", addresses(&packet));
    }
    assert_eq!(sim.dropped(Drop::DestinationNotGranted), 5);
    // Nor does anything come back from a carved-out network.
    assert!(
        sim.send_to_client(&mut alice, &tcp(ip("10.0.4.1"), a4, (22, 40000)))
            .is_some()
    );
    assert!(
        sim.send_to_client(&mut alice, &tcp(ip("10.0.5.9"), a4, (5432, 40000)))
            .is_none()
    );
    assert!(
        sim.send_to_client(&mut frank, &tcp(ip("10.20.5.9"), f4, (5432, 40000)))
            .is_none()
    );
    assert_eq!(sim.dropped(Drop::NotFromResource), 2);
}

/// A host at the site cannot reach a client through a DNS grant: from a mapped address, only
/// replies of the client's own NAT flows go back; a packet that merely claims to come from one
/// (no flow translated it) is dropped.
#[test]
fn a_dns_grant_passes_only_replies_of_the_clients_flows() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let grant = sim.dns_grant(
        &alice,
        "gitlab.company.com",
        "gitlab.company.com",
        &["100.96.0.1"],
        &["tcp/443"],
    );
    sim.install_dns(&grant, &["172.16.0.5"]);
    let (a4, mapped, real) = (alice.v4, ip("100.96.0.1"), ip("172.16.0.5"));
    // Spoofed from the mapped address, and from the real one before any flow: dropped.
    assert!(
        sim.send_to_client(&mut alice, &tcp(mapped, a4, (443, 40000)))
            .is_none()
    );
    assert!(
        sim.send_to_client(&mut alice, &tcp(real, a4, (443, 40000)))
            .is_none()
    );
    assert_eq!(sim.dropped(Drop::NotFromResource), 2);
    // Once alice opens a flow, its replies come back under the mapped address.
    let sent = sim.send_from_client(&mut alice, &tcp(a4, mapped, (40000, 443)));
    assert_eq!(sent.len(), 1);
    let reply = sim.send_to_client(&mut alice, &tcp(real, a4, (443, 40000)));
    assert_eq!(reply.map(|r| addresses(&r)), Some((mapped, a4)));
    // Another port of the client is no reply of that flow.
    assert!(
        sim.send_to_client(&mut alice, &tcp(real, a4, (443, 40001)))
            .is_none()
    );
}

#[test]
fn dns_resources_are_translated_both_ways_for_tcp_udp_and_icmp() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let grant = sim.dns_grant(
        &alice,
        "gitlab.company.com",
        "gitlab.company.com",
        &["100.96.0.1", "fd00:2021:1111:8000::1"],
        &[],
    );
    assert_eq!(
        sim.install_dns(&grant, &["172.16.0.5", "172.16.0.6", "2001:db8::5"]),
        [GatewayMessage::Ack {
            grant_id: grant.grant.id.clone(),
            resolved: Some(Resolution::Exists {
                ipv4: true,
                ipv6: true
            }),
        }]
    );
    let (m4, m6) = (ip("100.96.0.1"), ip("fd00:2021:1111:8000::1"));
    let (a4, a6) = (alice.v4, alice.v6);
    type Build = fn(IpAddr, IpAddr, u16) -> Vec<u8>;
    let kinds: [(&str, Build, Build); 3] = [
        (
            "tcp",
            |s, d, p| tcp(s, d, (p, 443)),
            |s, d, p| tcp(s, d, (443, p)),
        ),
        (
            "udp",
            |s, d, p| udp(s, d, (p, 53)),
            |s, d, p| udp(s, d, (53, p)),
        ),
        (
            "icmp",
            |s, d, p| echo(s, d, p, false),
            |s, d, p| echo(s, d, p, true),
        ),
    ];
    for (kind, out, back) in kinds {
        for (client, mapped) in [(a4, m4), (a6, m6)] {
            let sent = sim.send_from_client(&mut alice, &out(client, mapped, 40001));
            let [translated] = sent.as_slice() else {
                panic!("{kind} to {mapped}: {sent:?}")
            };
            let (source, real) = addresses(translated);
            assert_eq!(source, client);
            assert_ne!(real, mapped, "{kind}: translated to a real address");
            assert!(real.is_ipv4() == mapped.is_ipv4());
            let reply = sim
                .send_to_client(&mut alice, &back(real, client, 40001))
                .unwrap_or_else(|| panic!("{kind} reply from {real} dropped"));
            assert_eq!(addresses(&reply), (mapped, client), "{kind}");
        }
    }
    // Flows are taken round robin across the real IPv4 addresses.
    let first = sim.send_from_client(&mut alice, &tcp(a4, m4, (50000, 443)));
    let second = sim.send_from_client(&mut alice, &tcp(a4, m4, (50001, 443)));
    assert_ne!(addresses(&first[0]).1, addresses(&second[0]).1);
    assert!(sim.gateway.nat_flows() >= 8);
}

#[test]
fn two_names_on_one_real_address_stay_apart() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let gitlab = sim.dns_grant(
        &alice,
        "gitlab.company.com",
        "gitlab.company.com",
        &["100.96.0.1"],
        &["tcp/443"],
    );
    sim.install_dns(&gitlab, &["172.16.0.5"]);
    let jenkins_mapped = ip("100.96.0.2");
    let real = ip("172.16.0.5");

    // jenkins is not granted: its mapped address goes nowhere, though its real address is
    // gitlab's.
    assert!(
        sim.send_from_client(&mut alice, &tcp(a4, jenkins_mapped, (40000, 443)))
            .is_empty()
    );
    assert_eq!(sim.dropped(Drop::DestinationNotGranted), 1);
    // Nor may a client map jenkins onto gitlab's mapped address to borrow gitlab's grant:
    // one mapped address stands for one name per client.
    let borrowing = sim.dns_grant(
        &alice,
        "*.company.com",
        "jenkins.company.com",
        &["100.96.0.1"],
        &[],
    );
    match sim.send_grant(&borrowing).as_slice() {
        [GatewayMessage::Refused { reason, .. }] => {
            assert!(
                reason.contains("already mapped to another name"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // With both granted, replies from the one real address go back under the mapped address
    // of the flow they answer.
    let jenkins = sim.dns_grant(
        &alice,
        "jenkins.company.com",
        "jenkins.company.com",
        &["100.96.0.2"],
        &["tcp/443"],
    );
    sim.install_dns(&jenkins, &["172.16.0.5"]);
    let to_gitlab = sim.send_from_client(&mut alice, &tcp(a4, ip("100.96.0.1"), (40001, 443)));
    let to_jenkins = sim.send_from_client(&mut alice, &tcp(a4, jenkins_mapped, (40002, 443)));
    assert_eq!(addresses(&to_gitlab[0]).1, real);
    assert_eq!(addresses(&to_jenkins[0]).1, real);
    let back_gitlab = sim
        .send_to_client(&mut alice, &tcp(real, a4, (443, 40001)))
        .unwrap();
    let back_jenkins = sim
        .send_to_client(&mut alice, &tcp(real, a4, (443, 40002)))
        .unwrap();
    assert_eq!(addresses(&back_gitlab).0, ip("100.96.0.1"));
    assert_eq!(addresses(&back_jenkins).0, jenkins_mapped);

    // Revoking jenkins closes its flows; gitlab's go on.
    sim.gateway.handle_portal(
        PortalToGateway::Revoke {
            grant_id: jenkins.grant.id.clone(),
        },
        sim.now,
    );
    assert!(
        sim.send_from_client(&mut alice, &tcp(a4, jenkins_mapped, (40002, 443)))
            .is_empty()
    );
    assert_eq!(
        sim.send_to_client(&mut alice, &tcp(real, a4, (443, 40002))),
        None
    );
    assert_eq!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("100.96.0.1"), (40001, 443)))
            .len(),
        1
    );
}

#[test]
fn another_client_with_the_same_mapped_address_reaches_its_own_name() {
    // Mapped addresses are each client's own: two clients may use one for different names.
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let mut bob = sim.client(3);
    let b4 = bob.v4;
    let gitlab = sim.dns_grant(
        &alice,
        "gitlab.company.com",
        "gitlab.company.com",
        &["100.96.0.1"],
        &[],
    );
    sim.install_dns(&gitlab, &["172.16.0.5"]);
    let wiki = sim.dns_grant(
        &bob,
        "wiki.company.com",
        "wiki.company.com",
        &["100.96.0.1"],
        &[],
    );
    sim.install_dns(&wiki, &["172.16.0.9"]);
    let from_alice = sim.send_from_client(&mut alice, &tcp(a4, ip("100.96.0.1"), (1, 443)));
    let from_bob = sim.send_from_client(&mut bob, &tcp(b4, ip("100.96.0.1"), (1, 443)));
    assert_eq!(addresses(&from_alice[0]).1, ip("172.16.0.5"));
    assert_eq!(addresses(&from_bob[0]).1, ip("172.16.0.9"));
}

#[test]
fn resolution_answers_go_to_the_portal_and_failures_refuse() {
    let mut sim = Sim::new();
    let alice = sim.client(2);
    let missing = sim.dns_grant(
        &alice,
        "*.company.com",
        "nope.company.com",
        &["100.96.0.3"],
        &[],
    );
    sim.gateway.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(missing.clone()),
        },
        sim.now,
    );
    // A second grant for the same name waits on the same resolution.
    let again = sim.dns_grant(
        &alice,
        "*.company.com",
        "nope.company.com",
        &["100.96.0.3"],
        &[],
    );
    sim.gateway.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(again.clone()),
        },
        sim.now,
    );
    let resolves: Vec<Event> = sim
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Resolve { .. }))
        .collect();
    assert_eq!(
        resolves,
        [Event::Resolve {
            name: "nope.company.com".into()
        }]
    );
    sim.gateway
        .handle_resolved("nope.company.com", Resolved::NoSuchName, sim.now);
    let answers = sim.said_to_portal();
    assert_eq!(
        answers,
        [missing.grant.id.clone(), again.grant.id.clone()].map(|grant_id| GatewayMessage::Ack {
            grant_id,
            resolved: Some(Resolution::NoSuchName)
        })
    );

    let broken = sim.dns_grant(
        &alice,
        "*.company.com",
        "slow.company.com",
        &["100.96.0.4"],
        &[],
    );
    sim.gateway.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(broken.clone()),
        },
        sim.now,
    );
    sim.events();
    sim.gateway.handle_resolved(
        "slow.company.com",
        Resolved::Failed("timed out".into()),
        sim.now,
    );
    assert_eq!(
        sim.said_to_portal(),
        [GatewayMessage::Refused {
            grant_id: broken.grant.id.clone(),
            reason: "cannot resolve `slow.company.com`: timed out".into()
        }]
    );
    // An answer nobody waits for changes nothing.
    sim.gateway
        .handle_resolved("other.company.com", Resolved::NoSuchName, sim.now);
    assert!(sim.events().is_empty());
}

/// A DNS grant for `name` under `*.company.com`, with mapped address `mapped`.
fn name_grant(sim: &mut Sim, client: &Client, name: &str, mapped: &str) -> SignedGrant {
    sim.dns_grant(client, "*.company.com", name, &[mapped], &[])
}

impl Sim {
    /// Sends a grant and returns every event it caused.
    fn offer(&mut self, grant: &SignedGrant) -> Vec<Event> {
        self.gateway.handle_portal(
            PortalToGateway::Grant {
                grant: Box::new(grant.clone()),
            },
            self.now,
        );
        self.events()
    }
}

fn resolves(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Resolve { name } => Some(name.as_str()),
            _ => None,
        })
        .collect()
}

fn to_portal(events: Vec<Event>) -> Vec<GatewayMessage> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::ToPortal(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn refused(grant: &SignedGrant, reason: &str) -> GatewayMessage {
    GatewayMessage::Refused {
        grant_id: grant.grant.id.clone(),
        reason: reason.to_owned(),
    }
}

fn exists_v4(grant: &SignedGrant) -> GatewayMessage {
    GatewayMessage::Ack {
        grant_id: grant.grant.id.clone(),
        resolved: Some(Resolution::Exists {
            ipv4: true,
            ipv6: false,
        }),
    }
}

fn addresses_for(real: &[&str], ttl: Duration) -> Resolved {
    Resolved::Addresses {
        addresses: real.iter().map(|r| ip(r)).collect(),
        ttl,
    }
}

/// A name that never resolves (a lame delegation) costs only the grants that asked for it:
/// they are refused at the deadline, well before the portal would give up on the gateway,
/// and everything else the gateway does goes on.
#[test]
fn a_resolution_that_never_answers_refuses_only_its_grants_at_the_deadline() {
    let mut sim = Sim::new();
    let start = sim.now;
    let mut alice = sim.client(2);
    let bob = sim.client(3);
    let lame = name_grant(&mut sim, &alice, "www.lame.company.com", "100.96.0.1");
    assert_eq!(resolves(&sim.offer(&lame)), ["www.lame.company.com"]);
    // The gateway has no peer yet, and still wants to be woken at the deadline.
    let wake = sim.gateway.poll_timeout(sim.now).expect("a wake-up");
    assert!(wake <= start + RESOLVE_DEADLINE, "{wake:?}");
    // Meanwhile: an IP grant of the same client, and a name of another client that resolves.
    let db = sim.grant(&alice, "10.0.5.10", &["tcp/5432"]);
    sim.install(&db);
    let gitlab = name_grant(&mut sim, &bob, "gitlab.company.com", "100.96.0.2");
    assert_eq!(resolves(&sim.offer(&gitlab)), ["gitlab.company.com"]);
    sim.gateway.handle_resolved(
        "gitlab.company.com",
        addresses_for(&["172.16.0.5"], Duration::from_secs(60)),
        sim.now,
    );
    assert_eq!(sim.said_to_portal(), [exists_v4(&gitlab)]);

    sim.advance(RESOLVE_DEADLINE - Duration::from_millis(1));
    assert_eq!(sim.said_to_portal(), [], "still within the deadline");
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        sim.said_to_portal(),
        [refused(
            &lame,
            "cannot resolve `www.lame.company.com`: no answer within 3 s"
        )]
    );
    assert_eq!(sim.gateway.resolutions_in_flight(), 0);
    assert!(!sim.gateway.grants().contains(&lame.grant.id));
    // The answer that comes after all changes nothing.
    sim.gateway.handle_resolved(
        "www.lame.company.com",
        addresses_for(&["172.16.0.9"], Duration::from_secs(60)),
        sim.now,
    );
    assert_eq!(sim.events(), []);
    // The failure is remembered briefly: asking again at once costs no lookup.
    let again = name_grant(&mut sim, &alice, "www.lame.company.com", "100.96.0.1");
    let events = sim.offer(&again);
    assert_eq!(resolves(&events), Vec::<&str>::new());
    assert_eq!(
        to_portal(events),
        [refused(
            &again,
            "cannot resolve `www.lame.company.com`: no answer within 3 s"
        )]
    );
    // The same client's other grant works throughout.
    let a4 = alice.v4;
    assert_eq!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("10.0.5.10"), (1, 5432)))
            .len(),
        1
    );

    // A grant the portal gave up on (it revokes it) while its name resolves is never
    // installed nor acknowledged, whenever the answer comes.
    let slow = name_grant(&mut sim, &alice, "slow.company.com", "100.96.0.3");
    assert_eq!(resolves(&sim.offer(&slow)), ["slow.company.com"]);
    sim.gateway.handle_portal(
        PortalToGateway::Revoke {
            grant_id: slow.grant.id.clone(),
        },
        sim.now,
    );
    sim.gateway.handle_resolved(
        "slow.company.com",
        addresses_for(&["172.16.0.7"], Duration::from_secs(60)),
        sim.now,
    );
    assert_eq!(sim.said_to_portal(), []);
    assert!(!sim.gateway.grants().contains(&slow.grant.id));
}

/// A name's answer is remembered for its TTL (however it is spelt): grants naming it within
/// that time are answered at once, without a lookup; after it, the name is resolved again.
/// "No such name" is remembered too, briefly.
#[test]
fn a_cached_name_is_not_resolved_twice_within_its_ttl() {
    let mut sim = Sim::new();
    let alice = sim.client(2);
    let mut bob = sim.client(3);
    let first = name_grant(&mut sim, &alice, "gitlab.company.com", "100.96.0.1");
    assert_eq!(resolves(&sim.offer(&first)), ["gitlab.company.com"]);
    sim.gateway.handle_resolved(
        "gitlab.company.com",
        addresses_for(&["172.16.0.5"], Duration::from_secs(60)),
        sim.now,
    );
    assert_eq!(sim.said_to_portal(), [exists_v4(&first)]);

    sim.advance(Duration::from_secs(59));
    let second = name_grant(&mut sim, &bob, "GitLab.Company.com.", "100.96.0.2");
    let events = sim.offer(&second);
    assert_eq!(resolves(&events), Vec::<&str>::new(), "{events:?}");
    assert_eq!(to_portal(events), [exists_v4(&second)]);
    // And the remembered addresses are where bob's mapped address leads.
    let b4 = bob.v4;
    let sent = sim.send_from_client(&mut bob, &tcp(b4, ip("100.96.0.2"), (1, 443)));
    assert_eq!(addresses(&sent[0]).1, ip("172.16.0.5"));

    sim.advance(Duration::from_secs(1));
    let third = name_grant(&mut sim, &alice, "gitlab.company.com", "100.96.0.1");
    assert_eq!(resolves(&sim.offer(&third)), ["gitlab.company.com"]);

    let missing = name_grant(&mut sim, &alice, "nope.company.com", "100.96.0.4");
    assert_eq!(resolves(&sim.offer(&missing)), ["nope.company.com"]);
    sim.gateway
        .handle_resolved("nope.company.com", Resolved::NoSuchName, sim.now);
    sim.events();
    let missing_again = name_grant(&mut sim, &bob, "nope.company.com", "100.96.0.5");
    let events = sim.offer(&missing_again);
    assert_eq!(resolves(&events), Vec::<&str>::new());
    assert_eq!(
        to_portal(events),
        [GatewayMessage::Ack {
            grant_id: missing_again.grant.id.clone(),
            resolved: Some(Resolution::NoSuchName),
        }]
    );
    sim.advance(fz_tunnel::resolution::NO_SUCH_NAME_TTL);
    let later = name_grant(&mut sim, &bob, "nope.company.com", "100.96.0.5");
    assert_eq!(resolves(&sim.offer(&later)), ["nope.company.com"]);
}

/// A client may have a few resolutions of its own in flight; the next new name it asks for
/// is refused at once, saying why, while names already in flight and other clients' names go
/// on as ever. The gateway as a whole has a bound too.
#[test]
fn a_client_with_its_resolutions_in_flight_gets_the_next_refused_and_others_do_not() {
    use fz_tunnel::resolution::{MAX_RESOLVING, MAX_RESOLVING_PER_CLIENT};
    let mut sim = Sim::new();
    let alice = sim.client(2);
    let bob = sim.client(3);
    let mut grants = Vec::new();
    for i in 0..MAX_RESOLVING_PER_CLIENT {
        let name = format!("n{i}.lame.company.com");
        let grant = name_grant(&mut sim, &alice, &name, &format!("100.96.0.{}", i + 1));
        assert_eq!(resolves(&sim.offer(&grant)), [name.as_str()]);
        grants.push(grant);
    }
    let one_more = name_grant(&mut sim, &alice, "n9.lame.company.com", "100.96.1.1");
    let events = sim.offer(&one_more);
    assert_eq!(resolves(&events), Vec::<&str>::new());
    assert_eq!(
        to_portal(events),
        [refused(
            &one_more,
            "this client has 8 names resolving already; ask again once they are answered"
        )]
    );
    // A name already in flight costs nothing more: the grant waits with the first.
    let joining = name_grant(&mut sim, &alice, "n0.lame.company.com", "100.96.0.1");
    assert_eq!(sim.offer(&joining), []);
    // Another client is not held back by alice's.
    let bobs = name_grant(&mut sim, &bob, "gitlab.company.com", "100.96.0.1");
    assert_eq!(resolves(&sim.offer(&bobs)), ["gitlab.company.com"]);
    // An answer frees alice's place.
    sim.gateway.handle_resolved(
        "n0.lame.company.com",
        addresses_for(&["172.16.0.5"], Duration::from_secs(60)),
        sim.now,
    );
    assert_eq!(
        sim.said_to_portal(),
        [exists_v4(&grants[0]), exists_v4(&joining)]
    );
    let next = name_grant(&mut sim, &alice, "n9.lame.company.com", "100.96.1.1");
    assert_eq!(resolves(&sim.offer(&next)), ["n9.lame.company.com"]);

    // Many clients at once: the gateway resolves at most MAX_RESOLVING names; the rest are
    // refused until some are answered or time out.
    let mut sim = Sim::new();
    let clients: Vec<Client> = (1..=40).map(|n| sim.client(n)).collect();
    let mut started = 0;
    let mut refusal = None;
    'asking: for (c, client) in clients.iter().enumerate() {
        for i in 0..MAX_RESOLVING_PER_CLIENT {
            let name = format!("n{i}.c{c}.company.com");
            let grant = name_grant(&mut sim, client, &name, &format!("100.96.0.{}", i + 1));
            let events = sim.offer(&grant);
            if resolves(&events).is_empty() {
                refusal = Some(to_portal(events));
                break 'asking;
            }
            started += 1;
        }
    }
    assert_eq!(started, MAX_RESOLVING);
    let refusal = refusal.expect("a refusal once the gateway is busy");
    let [GatewayMessage::Refused { reason, .. }] = refusal.as_slice() else {
        panic!("expected a refusal");
    };
    assert_eq!(
        reason,
        "the gateway is resolving 256 names already; ask again shortly"
    );
    sim.advance(RESOLVE_DEADLINE);
    assert_eq!(sim.gateway.resolutions_in_flight(), 0);
    assert_eq!(
        sim.said_to_portal().len(),
        MAX_RESOLVING,
        "each one refused"
    );
}

#[test]
fn revocation_and_expiry_take_everything_of_the_grant_at_once() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let db = sim.grant(&alice, "10.0.5.10", &["tcp/5432"]);
    let gitlab = sim.dns_grant(
        &alice,
        "gitlab.company.com",
        "gitlab.company.com",
        &["100.96.0.1"],
        &[],
    );
    sim.install(&db);
    sim.install_dns(&gitlab, &["172.16.0.5"]);
    let to_db = tcp(a4, ip("10.0.5.10"), (40000, 5432));
    let to_gitlab = tcp(a4, ip("100.96.0.1"), (40001, 443));
    assert_eq!(sim.send_from_client(&mut alice, &to_db).len(), 1);
    assert_eq!(sim.send_from_client(&mut alice, &to_gitlab).len(), 1);
    assert_eq!(sim.gateway.nat_flows(), 1);

    sim.gateway.handle_portal(
        PortalToGateway::Revoke {
            grant_id: gitlab.grant.id.clone(),
        },
        sim.now,
    );
    assert!(sim.events().contains(&Event::Removed {
        grant_id: gitlab.grant.id.clone(),
        why: Removal::Revoked
    }));
    assert_eq!(sim.gateway.nat_flows(), 0);
    assert!(sim.send_from_client(&mut alice, &to_gitlab).is_empty());
    assert_eq!(
        sim.send_to_client(&mut alice, &tcp(ip("172.16.0.5"), a4, (443, 40001))),
        None
    );
    assert_eq!(
        sim.send_from_client(&mut alice, &to_db).len(),
        1,
        "the other grant holds"
    );

    // The last grant expires on its own: the peer goes with it, and the session is dead.
    sim.advance(Duration::from_secs(3599));
    assert_eq!(sim.gateway.peer_count(), 1);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.gateway.peer_count(), 0);
    assert!(sim.events().contains(&Event::Removed {
        grant_id: db.grant.id.clone(),
        why: Removal::Expired
    }));
    let before = sim.dropped(Drop::UnknownSession);
    assert!(sim.send_from_client(&mut alice, &to_db).is_empty());
    assert_eq!(sim.dropped(Drop::UnknownSession), before + 1);
    assert_eq!(
        sim.send_to_client(&mut alice, &tcp(ip("10.0.5.10"), a4, (5432, 40000))),
        None
    );
    assert_eq!(
        sim.gateway.poll_timeout(sim.now),
        None,
        "nothing left to time"
    );
}

#[test]
fn grants_that_do_not_verify_or_fit_are_refused_with_the_reason() {
    let mut sim = Sim::new();
    let alice = sim.client(2);
    let mut forged = sim.grant(&alice, "10.0.5.10", &[]);
    forged.grant.resource.address = "0.0.0.0/0".into();
    let expired = sim.signed(&alice, "10.0.5.10", &[], None, 0);
    let mut elsewhere = sim.grant(&alice, "10.0.5.10", &[]);
    elsewhere.grant.gateway.id = "gw-2".into();
    let elsewhere = elsewhere.grant.sign(&sim.portal);
    let bad_filter = sim.grant(&alice, "10.0.5.10", &["sctp/9"]);
    let impostor = {
        // Another key claims alice's tunnel address.
        let alice_grant = sim.grant(&alice, "10.0.5.10", &[]);
        sim.install(&alice_grant);
        let mallory = sim.client_with_key(2, [66; 32], [1; 32]);
        sim.grant(&mallory, "10.0.5.10", &[])
    };
    let cases = [
        (forged, "does not verify against the pinned portal key"),
        (expired, "the grant expired at"),
        (elsewhere, "addressed to another gateway"),
        (bad_filter, "port filter `sctp/9`"),
        (impostor, "belongs to another client key"),
    ];
    for (grant, expected) in cases {
        match sim.send_grant(&grant).as_slice() {
            [GatewayMessage::Refused { grant_id, reason }] => {
                assert_eq!(grant_id, &grant.grant.id);
                assert!(reason.contains(expected), "{reason} lacks {expected}");
            }
            other => panic!("expected a refusal with {expected}, got {other:?}"),
        }
    }
    assert_eq!(sim.gateway.peer_count(), 1);

    // Before `ready`, the gateway cannot tell whether a grant is its own.
    let mut fresh = Gateway::new(
        Config {
            private_key: [9; 32],
            portal_key: sim.portal.public_key(),
            seed: 0,
            host: Vec::new(),
        },
        sim.now,
        START_UNIX * 1000,
    );
    let grant = sim.grant(&alice, "10.0.5.10", &[]);
    fresh.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(grant),
        },
        sim.now,
    );
    assert!(matches!(
        fresh.poll_event(),
        Some(Event::ToPortal(GatewayMessage::Refused { .. }))
    ));
}

#[test]
fn a_gateway_that_comes_back_keeps_only_what_the_portal_still_holds() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let kept = sim.grant(&alice, "10.0.5.10", &[]);
    let withdrawn = sim.grant(&alice, "10.0.5.11", &[]);
    sim.install(&kept);
    sim.install(&withdrawn);
    assert_eq!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("10.0.5.11"), (1, 2)))
            .len(),
        1
    );
    sim.gateway.handle_portal(
        PortalToGateway::Ready {
            gateway_id: GATEWAY_ID.into(),
            heartbeat_interval_ms: 10_000,
            grants: vec![kept.grant.id.clone()],
        },
        sim.now,
    );
    assert!(sim.events().contains(&Event::Removed {
        grant_id: withdrawn.grant.id.clone(),
        why: Removal::NotInForce
    }));
    assert_eq!(sim.gateway.grants(), std::slice::from_ref(&kept.grant.id));
    // The portal sends the kept one again: acknowledged again, nothing changes.
    sim.install(&kept);
    assert!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("10.0.5.11"), (1, 2)))
            .is_empty()
    );
    assert_eq!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("10.0.5.10"), (1, 2)))
            .len(),
        1
    );
}

/// What became of a packet from a client: passed (what came out), or dropped and why.
fn fate(sim: &mut Sim, client: &mut Client, packet: &[u8]) -> Result<usize, Drop> {
    let before = sim.gateway.metrics().clone();
    let out = sim.send_from_client(client, packet);
    if !out.is_empty() {
        return Ok(out.len());
    }
    Err(Drop::ALL
        .into_iter()
        .find(|reason| sim.dropped(*reason) > before.dropped(*reason))
        .expect("a dropped packet is counted"))
}

/// How the gateway decided before it filed grants by destination: every grant of the client
/// in turn, the first that passes wins, else the most telling reason of them all.
fn linear(filters: &[GrantFilter], packet: &[u8]) -> Result<usize, Drop> {
    let parsed = fz_tunnel::packet::Packet::parse(packet).map_err(|_| Drop::Malformed)?;
    let mut reason = Drop::Malformed;
    for filter in filters {
        match filter.check(&parsed) {
            Ok(()) => return Ok(1),
            Err(drop) => reason = reason.max(drop),
        }
    }
    Err(reason)
}

/// The gateway's per-packet lookup does not walk a client's grants, and must decide as the
/// walk did: a client holding 5,000 grants of every kind (hosts, networks with and without
/// carve-outs, IPv6, DNS names, `internet`) gets every packet decided as the linear walk over
/// them decides it, and the packets that only its one DNS grant concerns are decided as they
/// are when that grant is its only one.
#[test]
fn packets_are_decided_the_same_with_1_and_5000_grants() {
    let gitlab = |sim: &mut Sim, client: &Client| {
        let grant = sim.dns_grant(
            client,
            "gitlab.company.com",
            "gitlab.company.com",
            &["100.96.0.1"],
            &["tcp/443", "icmp"],
        );
        sim.install_dns(&grant, &["172.16.0.5"]);
        grant
    };
    let mut one = Sim::new();
    let mut alone = one.client(2);
    gitlab(&mut one, &alone);

    let mut many = Sim::new();
    let mut busy = many.client(2);
    let mut grants = Vec::new();
    for i in 0..4999u32 {
        let (hi, lo) = (i / 256, i % 256);
        let grant = match i % 7 {
            0 => many.grant(&busy, &format!("10.{hi}.{lo}.7"), &["tcp/22"]),
            1 => many.grant(
                &busy,
                &format!("10.{}.{lo}.0/24", 100 + hi),
                &["udp/53", "icmp"],
            ),
            2 => many.grant(&busy, &format!("fd00:20::{i:x}"), &["tcp/443"]),
            3 => many.carved_grant(
                &busy,
                &format!("10.200.{lo}.0/24"),
                &[&format!("10.200.{lo}.128/25")],
            ),
            4 => many.grant(&busy, "10.250.0.0/16", &[&format!("tcp/{}", 1000 + i)]),
            5 if i < 50 => many.carved_grant(&busy, "internet", &["198.18.0.0/15"]),
            _ => {
                let name = format!("n{i}.company.com");
                let grant = many.dns_grant(
                    &busy,
                    "*.company.com",
                    &name,
                    &[&format!("100.97.{hi}.{lo}")],
                    &["tcp/443"],
                );
                many.install_dns(&grant, &[&format!("172.17.{hi}.{lo}")]);
                grants.push(grant);
                continue;
            }
        };
        many.install(&grant);
        grants.push(grant);
    }
    grants.push(gitlab(&mut many, &busy));
    assert_eq!(many.gateway.grant_count(), 5000);
    let filters: Vec<GrantFilter> = grants
        .iter()
        .map(|g| GrantFilter::new(&g.grant).unwrap())
        .collect();

    let (a4, a6) = (alone.v4, alone.v6);
    assert_eq!((a4, a6), (busy.v4, busy.v6));
    // Packets that only gitlab's grant concerns, or none: the same fate with 1 and 5,000.
    let about_gitlab = [
        tcp(a4, ip("100.96.0.1"), (40000, 443)),
        echo(a4, ip("100.96.0.1"), 9, false),
        tcp(a4, ip("100.96.0.1"), (40000, 80)),
        udp(a4, ip("100.96.0.1"), (40000, 443)),
        tcp(a4, ip("100.96.0.9"), (40000, 443)),
        tcp(ip("100.64.0.99"), ip("100.96.0.1"), (40000, 443)),
        tcp(a4, ip("192.168.7.7"), (40000, 443)),
        tcp(a6, ip("fd00:99::1"), (40000, 443)),
        build::ip(a4, ip("100.96.0.1"), 47, &[0; 8]),
    ];
    for packet in &about_gitlab {
        let alone_fate = fate(&mut one, &mut alone, packet);
        let busy_fate = fate(&mut many, &mut busy, packet);
        assert_eq!(alone_fate, busy_fate, "{:?}", addresses(packet));
        assert_eq!(
            busy_fate,
            linear(&filters, packet),
            "{:?}",
            addresses(packet)
        );
    }
    // Packets the other grants concern: decided as the walk over all 5,000 decides them.
    let others = [
        tcp(a4, ip("10.3.9.7"), (40000, 22)),
        tcp(a4, ip("10.3.9.7"), (40000, 23)),
        tcp(a4, ip("10.3.9.8"), (40000, 22)),
        udp(a4, ip("10.105.3.9"), (40000, 53)),
        udp(a4, ip("10.105.3.9"), (40000, 54)),
        echo(a4, ip("10.105.3.9"), 3, false),
        tcp(a6, ip("fd00:20::2"), (40000, 443)),
        tcp(a6, ip("fd00:20::2"), (40000, 444)),
        tcp(a4, ip("10.200.3.1"), (40000, 1)),
        tcp(a4, ip("10.200.3.200"), (40000, 1)),
        tcp(a4, ip("10.250.1.1"), (40000, 1004)),
        tcp(a4, ip("10.250.1.1"), (40000, 1005)),
        tcp(a4, ip("10.250.1.1"), (40000, 999)),
        tcp(a4, ip("8.8.8.8"), (40000, 80)),
        tcp(a6, ip("2606:4700::1111"), (40000, 80)),
        tcp(a4, ip("198.18.0.1"), (40000, 80)),
        tcp(a4, ip("100.97.0.6"), (40000, 443)),
        tcp(a4, ip("100.97.0.6"), (40000, 22)),
        tcp(a4, ip("100.97.0.7"), (40000, 443)),
        tcp(ip("10.0.0.1"), ip("10.3.9.7"), (40000, 22)),
    ];
    for packet in &others {
        let busy_fate = fate(&mut many, &mut busy, packet);
        assert_eq!(
            busy_fate,
            linear(&filters, packet),
            "{:?}",
            addresses(packet)
        );
    }
    // And back: replies come only from what some grant opens.
    let replies = [
        (tcp(ip("172.16.0.5"), a4, (443, 40000)), true),
        (tcp(ip("172.17.0.6"), a4, (443, 40000)), true),
        (tcp(ip("10.3.9.7"), a4, (22, 40000)), true),
        (tcp(ip("10.3.9.7"), a4, (23, 40000)), false),
        (tcp(ip("10.200.3.200"), a4, (1, 40000)), false),
        (tcp(ip("8.8.8.8"), a4, (80, 40000)), true),
        (tcp(ip("100.97.0.13"), a4, (443, 40000)), false),
    ];
    for (packet, passes) in replies {
        assert_eq!(
            many.send_to_client(&mut busy, &packet).is_some(),
            passes,
            "{:?}",
            addresses(&packet)
        );
    }
}

#[test]
fn one_message_revokes_many_grants() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let grants: Vec<SignedGrant> = (0..300)
        .map(|i| {
            let grant = sim.grant(&alice, &format!("10.0.{}.{}", i / 256, i % 256), &[]);
            sim.install(&grant);
            grant
        })
        .collect();
    let gitlab = sim.dns_grant(
        &alice,
        "*.company.com",
        "gitlab.company.com",
        &["100.96.0.1"],
        &[],
    );
    sim.install_dns(&gitlab, &["172.16.0.5"]);
    // One grant still waits for its name: it goes too, and is never acknowledged.
    let waiting = sim.dns_grant(
        &alice,
        "*.company.com",
        "slow.company.com",
        &["100.96.0.2"],
        &[],
    );
    sim.gateway.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(waiting.clone()),
        },
        sim.now,
    );
    sim.events();
    assert_eq!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("100.96.0.1"), (1, 443)))
            .len(),
        1
    );
    let mut revoked: Vec<String> = grants[..299].iter().map(|g| g.grant.id.clone()).collect();
    revoked.push(gitlab.grant.id.clone());
    revoked.push(waiting.grant.id.clone());
    revoked.push("gr-unknown".to_owned());
    sim.gateway
        .handle_portal(PortalToGateway::RevokeMany { grant_ids: revoked }, sim.now);
    let removed = sim
        .events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Removed {
                    why: Removal::Revoked,
                    ..
                }
            )
        })
        .count();
    assert_eq!(removed, 300);
    assert_eq!(sim.gateway.grants(), [grants[299].grant.id.clone()]);
    assert_eq!(sim.gateway.nat_flows(), 0);
    sim.gateway.handle_resolved(
        "slow.company.com",
        Resolved::Addresses {
            addresses: vec![ip("172.16.0.9")],
            ttl: Duration::from_secs(60),
        },
        sim.now,
    );
    assert!(
        sim.said_to_portal().is_empty(),
        "a revoked grant is never acknowledged"
    );
    assert!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("10.0.0.0"), (1, 2)))
            .is_empty()
    );
    assert_eq!(
        sim.send_from_client(&mut alice, &tcp(a4, ip("10.0.1.43"), (1, 2)))
            .len(),
        1
    );
}

#[test]
fn a_key_keeps_its_tunnel_addresses_while_it_holds_grants() {
    let mut sim = Sim::new();
    let alice = sim.client(2);
    let first = sim.grant(&alice, "10.0.5.10", &[]);
    sim.install(&first);
    // The same key, other tunnel addresses: the portal never does this; refused.
    let mut moved = sim.grant(&alice, "10.0.5.11", &[]).grant;
    moved.client.tunnel_ipv4 = "100.64.0.77".parse().unwrap();
    let moved = moved.sign(&sim.portal);
    match sim.send_grant(&moved).as_slice() {
        [GatewayMessage::Refused { reason, .. }] => {
            assert!(
                reason.contains("not those of this key's other grants"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Once its grants are gone, the key may come back with other addresses.
    sim.gateway.handle_portal(
        PortalToGateway::Revoke {
            grant_id: first.grant.id.clone(),
        },
        sim.now,
    );
    sim.install(&moved);
}

#[test]
fn a_new_preshared_key_for_the_pair_replaces_the_peer() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let a4 = alice.v4;
    let first = sim.grant(&alice, "10.0.5.10", &[]);
    sim.install(&first);
    let packet = tcp(a4, ip("10.0.5.10"), (1, 2));
    assert_eq!(sim.send_from_client(&mut alice, &packet).len(), 1);
    // All grants ended at the portal and a new one came with a new key: the old session
    // stops, and a handshake with the new key works.
    let mut renewed = sim.client_with_key(2, [2; 32], [55; 32]);
    let second = sim.grant(&renewed, "10.0.5.10", &[]);
    sim.install(&second);
    assert!(sim.send_from_client(&mut alice, &packet).is_empty());
    assert_eq!(sim.send_from_client(&mut renewed, &packet).len(), 1);
}

#[test]
fn strangers_get_silence() {
    let mut sim = Sim::new();
    let alice = sim.client(2);
    let grant = sim.grant(&alice, "10.0.5.10", &[]);
    sim.install(&grant);
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let stranger: SocketAddr = "192.0.2.66:5555".parse().unwrap();
    // Junk, a data message for an index nobody has, and a handshake from an unknown key that
    // knows the gateway's public key (so its MAC is right).
    let mut data = vec![4, 0, 0, 0];
    data.extend_from_slice(&0x00ab_cd00u32.to_le_bytes());
    data.extend_from_slice(&[0; 40]);
    let mut mallory = sim.client_with_key(9, [99; 32], [1; 32]);
    let mut initiation = vec![0u8; MAX_DATAGRAM];
    let TunnResult::WriteToNetwork(initiation) = mallory
        .tunnel
        .encapsulate(&tcp(mallory.v4, ip("10.0.5.10"), (1, 2)), &mut initiation)
    else {
        panic!()
    };
    let initiation = initiation.to_vec();
    let mut bad_mac = initiation.clone();
    bad_mac[120] ^= 1;
    for (datagram, reason) in [
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), Drop::NotWireGuard),
        (data, Drop::UnknownSession),
        (initiation, Drop::UnknownKey),
        (bad_mac, Drop::BadMac),
    ] {
        assert!(
            sim.gateway
                .handle_network(stranger, &datagram, &mut buffer, sim.now)
                .is_none()
        );
        assert_eq!(sim.dropped(reason), 1, "{reason:?}");
        assert!(sim.gateway.poll_transmit().is_none());
    }
}

#[test]
fn under_a_handshake_flood_cookie_replies_go_to_any_key_and_are_counted() {
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let grant = sim.grant(&alice, "10.0.5.10", &[]);
    sim.install(&grant);
    // A stranger that knows the gateway's public key (so its MAC1 is right) floods it with
    // one handshake initiation, again and again, within one second of the gateway's clock.
    let mut mallory = sim.client_with_key(9, [99; 32], [1; 32]);
    let mut sealed = vec![0u8; MAX_DATAGRAM];
    let TunnResult::WriteToNetwork(initiation) = mallory
        .tunnel
        .encapsulate(&tcp(mallory.v4, ip("10.0.5.10"), (1, 2)), &mut sealed)
    else {
        panic!()
    };
    let initiation = initiation.to_vec();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut silent = 0;
    let cookie = loop {
        assert!(silent < 100_000, "the rate limiter never ran out of budget");
        match sim
            .gateway
            .handle_network(mallory.address, &initiation, &mut buffer, sim.now)
        {
            None => silent += 1,
            Some(Output::Network(to, bytes)) => {
                assert_eq!(to, mallory.address);
                break bytes.to_vec();
            }
            Some(Output::Tun(_)) => panic!("a stranger's handshake reached the site"),
        }
    };
    // Within the budget: silence, each counted as a key without a grant. Past it: a cookie
    // reply (type 3, 64 bytes) before anyone looked at the key, and nothing else.
    assert!(silent > 0);
    assert_eq!(sim.dropped(Drop::UnknownKey), silent);
    assert_eq!(&cookie[..4], &[3, 0, 0, 0]);
    assert_eq!(cookie.len(), 64);
    assert_eq!(sim.gateway.metrics().cookie_replies, 1);
    assert_eq!(sim.gateway.metrics().handshakes, 0);
    assert!(sim.gateway.poll_transmit().is_none());
    for _ in 0..3 {
        assert!(
            sim.gateway
                .handle_network(mallory.address, &initiation, &mut buffer, sim.now)
                .is_some()
        );
    }
    assert_eq!(sim.gateway.metrics().cookie_replies, 4);
    assert_eq!(sim.dropped(Drop::UnknownKey), silent);

    // A key with a grant gets the same cookie reply: under load, an answer proves nothing
    // about grants. (Its handshake is answered once it comes back with the cookie.)
    let packet = tcp(alice.v4, ip("10.0.5.10"), (40000, 443));
    assert!(sim.send_from_client(&mut alice, &packet).is_empty());
    assert_eq!(sim.gateway.metrics().cookie_replies, 5);
    assert_eq!(sim.gateway.peer_count(), 1);

    // At the budget's last handshake the gatekeeper lets a granted key through, and the
    // peer's own pass through the shared limiter answers with the cookie: counted as well.
    let mut sim = Sim::new();
    let mut alice = sim.client(2);
    let grant = sim.grant(&alice, "10.0.5.10", &[]);
    sim.install(&grant);
    for _ in 1..silent {
        assert!(
            sim.gateway
                .handle_network(mallory.address, &initiation, &mut buffer, sim.now)
                .is_none()
        );
    }
    assert!(sim.send_from_client(&mut alice, &packet).is_empty());
    assert_eq!(sim.gateway.metrics().cookie_replies, 1);
}

mod never_panics {
    use proptest::prelude::*;

    use super::*;

    /// A gateway with one client holding a DNS grant and an IP grant, its tunnel up, and
    /// the last datagram the client sent (a real data message to mutate).
    fn busy() -> (Sim, Client, Vec<u8>) {
        let mut sim = Sim::new();
        let mut alice = sim.client(2);
        let db = sim.grant(&alice, "10.0.5.0/24", &["tcp/5432", "icmp"]);
        sim.install(&db);
        let gitlab = sim.dns_grant(
            &alice,
            "gitlab.company.com",
            "gitlab.company.com",
            &["100.96.0.1"],
            &[],
        );
        sim.install_dns(&gitlab, &["172.16.0.5"]);
        let packet = tcp(alice.v4, ip("100.96.0.1"), (40000, 443));
        assert_eq!(sim.send_from_client(&mut alice, &packet).len(), 1);
        let mut sealed = vec![0u8; MAX_DATAGRAM];
        let TunnResult::WriteToNetwork(data) = alice.tunnel.encapsulate(&packet, &mut sealed)
        else {
            panic!()
        };
        let data = data.to_vec();
        (sim, alice, data)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_datagram_is_taken_or_dropped(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let (mut sim, alice, _) = busy();
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            let _ = sim.gateway.handle_network(alice.address, &bytes, &mut buffer, sim.now);
            while sim.gateway.poll_transmit().is_some() {}
        }

        #[test]
        fn an_oversized_data_message_for_a_live_session_is_dropped(extra in 0usize..3000) {
            // Its header names a real session; boringtun would panic on a buffer too small.
            let (mut sim, alice, data) = busy();
            let mut big = data.clone();
            big.resize(MAX_DATAGRAM + 1 + extra, 0);
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            prop_assert!(sim.gateway.handle_network(alice.address, &big, &mut buffer, sim.now).is_none());
            prop_assert_eq!(sim.dropped(Drop::TooLarge), 1);
            let mut huge = vec![0x45u8; MAX_DATAGRAM + extra];
            let _ = sim.gateway.handle_tun(&mut huge, &mut buffer, sim.now);
        }

        #[test]
        fn a_damaged_data_message_is_dropped(flips in proptest::collection::vec((0usize..200, 1u8..=255), 1..4)) {
            let (mut sim, alice, mut data) = busy();
            let original = data.clone();
            let len = data.len();
            for (at, mask) in flips {
                data[at % len] ^= mask;
            }
            // Flips of one byte can cancel out (133 ^ 245 ^ 112 == 0): that is no damage.
            prop_assume!(data != original);
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            let out = sim.gateway.handle_network(alice.address, &data, &mut buffer, sim.now);
            prop_assert!(!matches!(out, Some(Output::Tun(_))), "a damaged message got through");
        }

        #[test]
        fn any_packet_from_the_site_is_taken_or_dropped(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..1600),
            to_client in any::<bool>(),
        ) {
            let (mut sim, alice, _) = busy();
            if to_client && bytes.len() >= 20 {
                // Aim at the client's address so that the NAT and filters read it.
                bytes[0] = 0x45;
                let IpAddr::V4(v4) = alice.v4 else { panic!() };
                bytes[16..20].copy_from_slice(&v4.octets());
            }
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            let _ = sim.gateway.handle_tun(&mut bytes, &mut buffer, sim.now);
        }

        #[test]
        fn any_portal_text_is_decoded_or_refused(text in ".{0,400}") {
            // The driver decodes with fz-proto and hands the gateway only what decodes.
            let (mut sim, _, _) = busy();
            if let Ok(message) = fz_proto::decode::<PortalToGateway>(text.as_bytes()) {
                sim.gateway.handle_portal(message, sim.now);
            }
        }

        #[test]
        fn any_grant_the_portal_signs_is_installed_or_refused(
            address in prop_oneof![
                Just("10.0.5.10".to_owned()), Just("internet".to_owned()), Just("::/0".to_owned()),
                "[a-z0-9./:*-]{0,30}",
            ],
            filter in proptest::collection::vec("[a-z]{0,5}/?[0-9-]{0,12}", 0..4),
            mapped in proptest::collection::vec(any::<[u8; 4]>(), 0..10),
            name in "[a-z.*]{0,20}",
            dns in any::<bool>(),
        ) {
            let (mut sim, alice, _) = busy();
            let dns = dns.then(|| DnsMapping {
                name,
                mapped: mapped.into_iter().map(IpAddr::from).collect(),
            });
            let filter: Vec<&str> = filter.iter().map(String::as_str).collect();
            let grant = sim.signed(&alice, &address, &filter, dns, 60);
            sim.gateway.handle_portal(PortalToGateway::Grant { grant: Box::new(grant.clone()) }, sim.now);
            let mut answers = Vec::new();
            for event in sim.events() {
                match event {
                    Event::Resolve { name } => {
                        let real = Resolved::Addresses { addresses: vec![ip("172.16.0.5")], ttl: Duration::from_secs(60) };
                        sim.gateway.handle_resolved(&name, real, sim.now);
                        answers.extend(sim.said_to_portal());
                    }
                    Event::ToPortal(message) => answers.push(message),
                    _ => {}
                }
            }
            prop_assert_eq!(answers.len(), 1, "one answer per grant");
        }
    }
}
