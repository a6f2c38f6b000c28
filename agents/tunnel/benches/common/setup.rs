//! What both packet benchmarks set up: a gateway core holding one client's DNS grant (tcp/443
//! to `gitlab.company.com`, mapped address 100.96.0.1, resolved to 172.16.0.5) with the
//! client's WireGuard session up (optionally with thousands more grants of the same client
//! installed before it, none of which the packets concern), a bare boringtun pair for comparison, and the 1420-byte TCP
//! packets that go each way. Built the way `tests/gateway.rs` builds its simulation: grants
//! signed with a real portal key, installed through `handle_portal`, resolved through
//! `handle_resolved`, handshakes pumped through the same calls a driver makes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use fz_proto::{
    ClientPeer, DnsMapping, GatewayPeer, Grant, GrantedResource, PortalSigningKey, PortalToGateway,
    PresharedKey, PublicKey, SignedGrant,
};
use fz_tunnel::Output;
use fz_tunnel::gateway::{Config, Event, Gateway, MAX_DATAGRAM, Resolved};
use fz_tunnel::packet::build;

/// The size of every IP packet: the default TUN MTU.
pub const PACKET: usize = 1420;
/// The client's tunnel addresses and the port its flow comes from.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0, 0, 0, 0, 2);
pub const CLIENT_PORT: u16 = 40000;
/// The mapped address the client's DNS stub handed out, and what the name resolved to.
pub const MAPPED: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
pub const REAL: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);
pub const SERVICE_PORT: u16 = 443;

const NAME: &str = "gitlab.company.com";
const GATEWAY_ID: &str = "gw-1";
const GATEWAY_SECRET: [u8; 32] = [9; 32];
const CLIENT_SECRET: [u8; 32] = [2; 32];
const PRESHARED_KEY: [u8; 32] = [102; 32];
const TCP: u8 = 6;

/// A gateway whose client holds the DNS grant, with the session up and the NAT flow open.
pub struct Setup {
    pub gateway: Gateway,
    /// The client's end of the tunnel: what seals datagrams for the gateway.
    pub client: Tunn,
    /// The grant as signed, for building its filter on its own.
    pub grant: Grant,
}

/// The gateway and client, the handshake done with the client at `client_address`, and one
/// packet through so the NAT flow exists.
pub fn gateway_with_client(client_address: SocketAddr) -> Setup {
    gateway_with_client_holding(client_address, 0)
}

/// [`gateway_with_client`], the client holding `others` more grants, installed before the DNS
/// grant (so a gateway that walked a client's grants in order would meet every one of them
/// first): IP grants for hosts in 10.0.0.0/8, tcp/22.
pub fn gateway_with_client_holding(client_address: SocketAddr, others: usize) -> Setup {
    let portal = PortalSigningKey::from_seed([7; 32]);
    let now = Instant::now();
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis();
    let unix_ms = u64::try_from(unix_ms).expect("milliseconds fit in u64");
    let mut gateway = Gateway::new(
        Config {
            private_key: GATEWAY_SECRET,
            portal_key: portal.public_key(),
            seed: 1000,
            host: Vec::new(),
        },
        now,
        unix_ms,
    );
    gateway.handle_portal(
        PortalToGateway::Ready {
            gateway_id: GATEWAY_ID.into(),
            heartbeat_interval_ms: 10_000,
            grants: vec![],
        },
        now,
    );
    for i in 0..others {
        let host = format!("10.{}.{}.{}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff);
        let mut grant = dns_grant(&gateway, &portal, unix_ms / 1000, client_address).grant;
        grant.id = format!("gr-other-{i}");
        grant.resource = GrantedResource {
            id: format!("host-{i}"),
            address: host,
            filter: Some(vec!["tcp/22".into()]),
            except: Vec::new(),
            dns: None,
        };
        gateway.handle_portal(
            PortalToGateway::Grant {
                grant: Box::new(grant.sign(&portal)),
            },
            now,
        );
    }
    let _ = std::iter::from_fn(|| gateway.poll_event()).count();
    let signed = dns_grant(&gateway, &portal, unix_ms / 1000, client_address);
    let grant = signed.grant.clone();
    gateway.handle_portal(
        PortalToGateway::Grant {
            grant: Box::new(signed),
        },
        now,
    );
    let events: Vec<Event> = std::iter::from_fn(|| gateway.poll_event()).collect();
    assert!(
        events.contains(&Event::Resolve { name: NAME.into() }),
        "the gateway did not ask to resolve the grant's name: {events:?}"
    );
    gateway.handle_resolved(
        NAME,
        Resolved::Addresses {
            addresses: vec![IpAddr::V4(REAL)],
            ttl: std::time::Duration::from_secs(60),
        },
        Instant::now(),
    );
    let events: Vec<Event> = std::iter::from_fn(|| gateway.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(e, Event::Installed { .. })),
        "the grant was not installed: {events:?}"
    );

    let mut client = client_tunnel(1);
    let delivered = handshake(&mut gateway, &mut client, client_address);
    let [first] = delivered.as_slice() else {
        panic!("the first packet did not come out of the tunnel once: {delivered:?}");
    };
    let parsed = fz_tunnel::packet::Packet::parse(first).expect("a packet");
    assert_eq!(
        parsed.destination,
        IpAddr::V4(REAL),
        "the NAT did not translate"
    );
    Setup {
        gateway,
        client,
        grant,
    }
}

/// A boringtun pair with no gateway around it, the session up: (client, server).
pub fn bare_pair() -> (Tunn, Tunn) {
    let mut client = client_tunnel(2);
    let mut server = Tunn::new(
        StaticSecret::from(GATEWAY_SECRET),
        public(CLIENT_SECRET),
        Some(PRESHARED_KEY),
        None,
        77,
        None,
    );
    let from = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut to_server = vec![seal(&mut client, &to_resource())];
    let mut delivered = 0;
    while !to_server.is_empty() {
        let mut to_client = Vec::new();
        for datagram in to_server.drain(..) {
            match server.decapsulate(from, &datagram, &mut buffer) {
                TunnResult::WriteToNetwork(bytes) => {
                    to_client.push(bytes.to_vec());
                    while let TunnResult::WriteToNetwork(bytes) =
                        server.decapsulate(None, &[], &mut buffer)
                    {
                        to_client.push(bytes.to_vec());
                    }
                }
                TunnResult::WriteToTunnelV4(..) => delivered += 1,
                _ => {}
            }
        }
        for datagram in to_client {
            if let TunnResult::WriteToNetwork(bytes) =
                client.decapsulate(None, &datagram, &mut buffer)
            {
                to_server.push(bytes.to_vec());
                while let TunnResult::WriteToNetwork(bytes) =
                    client.decapsulate(None, &[], &mut buffer)
                {
                    to_server.push(bytes.to_vec());
                }
            }
        }
    }
    assert_eq!(
        delivered, 1,
        "the bare pair did not deliver the first packet"
    );
    (client, server)
}

/// The client's packet to the resource: TCP from its tunnel address to the mapped address,
/// port 443, 1420 bytes in all. Checksums are left as they are: nothing on this path verifies
/// them, and the NAT updates them incrementally whatever they hold.
pub fn to_resource() -> Vec<u8> {
    tcp(
        IpAddr::V4(CLIENT_V4),
        IpAddr::V4(MAPPED),
        (CLIENT_PORT, SERVICE_PORT),
    )
}

/// The resource's reply as it comes from the site: from the real address to the client.
pub fn from_resource() -> Vec<u8> {
    tcp(
        IpAddr::V4(REAL),
        IpAddr::V4(CLIENT_V4),
        (SERVICE_PORT, CLIENT_PORT),
    )
}

/// Seals one packet as the client does.
pub fn seal(client: &mut Tunn, packet: &[u8]) -> Vec<u8> {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    match client.encapsulate(packet, &mut buffer) {
        TunnResult::WriteToNetwork(bytes) => bytes.to_vec(),
        other => panic!("the client could not seal: {other:?}"),
    }
}

fn tcp(source: IpAddr, destination: IpAddr, ports: (u16, u16)) -> Vec<u8> {
    let mut segment = build::ports(ports.0, ports.1);
    segment[12] = 5 << 4; // data offset: 20 bytes
    segment[13] = 0x18; // PSH, ACK
    segment.extend((0..PACKET - 40).map(|i| i as u8));
    let packet = build::ip(source, destination, TCP, &segment);
    assert_eq!(packet.len(), PACKET);
    packet
}

fn client_tunnel(index: u32) -> Tunn {
    Tunn::new(
        StaticSecret::from(CLIENT_SECRET),
        public(GATEWAY_SECRET),
        Some(PRESHARED_KEY),
        None,
        index,
        None,
    )
}

fn public(secret: [u8; 32]) -> X25519Public {
    X25519Public::from(&StaticSecret::from(secret))
}

/// Pumps the handshake the first packet starts, as `tests/gateway.rs` does: what came out of
/// the gateway's TUN side.
fn handshake(gateway: &mut Gateway, client: &mut Tunn, from: SocketAddr) -> Vec<Vec<u8>> {
    let mut to_gateway = vec![seal(client, &to_resource())];
    let mut tun = Vec::new();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    while !to_gateway.is_empty() {
        let mut to_client = Vec::new();
        for datagram in to_gateway.drain(..) {
            match gateway.handle_network(from, &datagram, &mut buffer, Instant::now()) {
                Some(Output::Tun(packet)) => tun.push(packet.to_vec()),
                Some(Output::Network(_, bytes)) => to_client.push(bytes.to_vec()),
                None => {}
            }
            while let Some(transmit) = gateway.poll_transmit() {
                to_client.push(transmit.payload);
            }
        }
        for datagram in to_client {
            if let TunnResult::WriteToNetwork(bytes) =
                client.decapsulate(None, &datagram, &mut buffer)
            {
                to_gateway.push(bytes.to_vec());
                while let TunnResult::WriteToNetwork(bytes) =
                    client.decapsulate(None, &[], &mut buffer)
                {
                    to_gateway.push(bytes.to_vec());
                }
            }
        }
    }
    tun
}

fn dns_grant(
    gateway: &Gateway,
    portal: &PortalSigningKey,
    unix: u64,
    client_address: SocketAddr,
) -> SignedGrant {
    Grant {
        id: "gr-1".into(),
        account: "acme".into(),
        client: ClientPeer {
            id: "client-2".into(),
            public_key: PublicKey(public(CLIENT_SECRET).to_bytes()),
            tunnel_ipv4: CLIENT_V4,
            tunnel_ipv6: CLIENT_V6,
            endpoints: vec![client_address],
        },
        gateway: GatewayPeer {
            id: GATEWAY_ID.into(),
            public_key: gateway.public_key(),
            endpoints: vec!["203.0.113.1:51820".parse().expect("an address")],
        },
        preshared_key: PresharedKey(PRESHARED_KEY),
        resource: GrantedResource {
            id: "gitlab".into(),
            address: NAME.into(),
            filter: Some(vec!["tcp/443".into()]),
            except: Vec::new(),
            dns: Some(DnsMapping {
                name: NAME.into(),
                mapped: vec![IpAddr::V4(MAPPED)],
            }),
        },
        rule: "rule".into(),
        bundle_hash: "hash".into(),
        issued_at: unix,
        expires_at: unix + 3600,
    }
    .sign(portal)
}
