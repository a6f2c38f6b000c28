//! The per-grant packet filter: what one verified grant lets its client send.
//!
//! A packet passes when it comes from the client's tunnel address (IPv4 or IPv6), goes to the
//! grant's resource (its IP or CIDR; for a DNS resource, one of the mapped addresses the grant
//! names, which the NAT then translates; for `internet`, anywhere), and its protocol and port
//! are inside the grant's filter (`tcp/443`, `udp/8000-8100`, `icmp`; no filter: everything).
//! Everything else is a [`Drop`] with its reason.

use std::net::IpAddr;

use fz_proto::Grant;

use crate::packet::{Packet, Transport};

/// Why a packet (or a datagram) was dropped, anywhere in the data plane. Drivers count each
/// reason. The filter's own reasons are ordered from least to most specific, so that of
/// several grants' answers the most telling one is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Drop {
    /// The bytes are no IP packet this crate reads.
    Malformed,
    /// The source is not the grant's client tunnel address.
    NotFromClient,
    /// The destination is not the grant's resource.
    DestinationNotGranted,
    /// The protocol is not in the grant's filter (or it is a fragment and ports matter).
    ProtocolNotGranted,
    /// The port is outside the grant's filter.
    PortNotGranted,
    /// A datagram on the WireGuard port that is no WireGuard message.
    NotWireGuard,
    /// A handshake whose MAC does not prove the sender knows this gateway's public key.
    BadMac,
    /// A handshake from a key that holds no grant here, or that does not decrypt.
    UnknownKey,
    /// A message for a session index no peer has.
    UnknownSession,
    /// WireGuard refused the message: a bad tag, a replay, an expired or missing session.
    Decryption,
    /// A packet to a mapped address whose name resolved to no address of the packet's family.
    Unresolved,
    /// A packet from the site to an address that is no client's tunnel address.
    NoClient,
    /// A packet from the site to a client that no grant lets the source answer.
    NotFromResource,
    /// A packet for a client the gateway has not heard from, so it has nowhere to send it.
    NoEndpoint,
    /// A datagram larger than the caller's buffer, or a packet from the site too large to
    /// seal into one datagram (the TUN's MTU is above what the tunnel carries).
    TooLarge,
    /// A new flow to a DNS resource from a client that has `nat::MAX_FLOWS` already.
    TooManyFlows,
}

impl Drop {
    pub const ALL: [Drop; 16] = [
        Drop::Malformed,
        Drop::NotFromClient,
        Drop::DestinationNotGranted,
        Drop::ProtocolNotGranted,
        Drop::PortNotGranted,
        Drop::NotWireGuard,
        Drop::BadMac,
        Drop::UnknownKey,
        Drop::UnknownSession,
        Drop::Decryption,
        Drop::Unresolved,
        Drop::NoClient,
        Drop::NotFromResource,
        Drop::NoEndpoint,
        Drop::TooLarge,
        Drop::TooManyFlows,
    ];

    /// The reason as metrics and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::NotFromClient => "not_from_client",
            Drop::DestinationNotGranted => "destination_not_granted",
            Drop::ProtocolNotGranted => "protocol_not_granted",
            Drop::PortNotGranted => "port_not_granted",
            Drop::NotWireGuard => "not_wireguard",
            Drop::BadMac => "bad_mac",
            Drop::UnknownKey => "unknown_key",
            Drop::UnknownSession => "unknown_session",
            Drop::Decryption => "decryption",
            Drop::Unresolved => "unresolved",
            Drop::NoClient => "no_client",
            Drop::NotFromResource => "not_from_resource",
            Drop::NoEndpoint => "no_endpoint",
            Drop::TooLarge => "too_large",
            Drop::TooManyFlows => "too_many_flows",
        }
    }
}

/// Why a grant cannot be turned into a filter: the portal signed something this agent does
/// not understand, so it refuses the grant (and tells the portal) rather than guess.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("the grant's port filter `{0}` is not `tcp/PORT[-PORT]`, `udp/PORT[-PORT]` or `icmp`")]
    Port(String),
    #[error("the grant's resource address `{0}` is not an IP, a CIDR, `internet` or a DNS name")]
    Address(String),
    #[error("the grant is for DNS resource `{0}` but names no mapped addresses")]
    NoMapping(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortRule {
    protocol: Protocol,
    first: u16,
    last: u16,
}

/// An address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address.parse::<IpAddr>().ok()?, prefix.parse().ok()?),
            None => {
                let address = text.parse::<IpAddr>().ok()?;
                (address, if address.is_ipv4() { 32 } else { 128 })
            }
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        (prefix <= bits).then_some(Cidr { address, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let mask = |bits: u32| {
            u128::MAX
                .checked_shl(bits - u32::from(self.prefix))
                .unwrap_or(0)
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask(32) as u32;
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask(128);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Destinations {
    Anywhere,
    Networks(Vec<Cidr>),
}

/// What one grant allows, ready to check packets against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantFilter {
    sources: [IpAddr; 2],
    destinations: Destinations,
    /// `None`: every protocol and port.
    ports: Option<Vec<PortRule>>,
}

impl GrantFilter {
    /// The filter of a grant the caller has verified.
    pub fn new(grant: &Grant) -> Result<GrantFilter, FilterError> {
        let resource = &grant.resource;
        let destinations = if let Some(dns) = &resource.dns {
            if dns.mapped.is_empty() {
                return Err(FilterError::NoMapping(resource.address.clone()));
            }
            Destinations::Networks(
                dns.mapped
                    .iter()
                    .map(|ip| Cidr {
                        address: *ip,
                        prefix: if ip.is_ipv4() { 32 } else { 128 },
                    })
                    .collect(),
            )
        } else if resource.address == "internet" {
            Destinations::Anywhere
        } else if let Some(cidr) = Cidr::parse(&resource.address) {
            Destinations::Networks(vec![cidr])
        } else if resource.address.contains('.') && !resource.address.contains('/') {
            // A DNS resource's traffic goes to mapped addresses; a grant for one without them
            // could only ever drop.
            return Err(FilterError::NoMapping(resource.address.clone()));
        } else {
            return Err(FilterError::Address(resource.address.clone()));
        };
        let ports = resource
            .filter
            .as_ref()
            .map(|filters| filters.iter().map(|f| parse_port(f)).collect())
            .transpose()?;
        Ok(GrantFilter {
            sources: [
                grant.client.tunnel_ipv4.into(),
                grant.client.tunnel_ipv6.into(),
            ],
            destinations,
            ports,
        })
    }

    /// Whether the packet may go on, or why not.
    pub fn check(&self, packet: &Packet) -> Result<(), Drop> {
        if !self.sources.contains(&packet.source) {
            return Err(Drop::NotFromClient);
        }
        let destination_granted = match &self.destinations {
            Destinations::Anywhere => true,
            Destinations::Networks(networks) => {
                networks.iter().any(|n| n.contains(packet.destination))
            }
        };
        if !destination_granted {
            return Err(Drop::DestinationNotGranted);
        }
        let Some(rules) = &self.ports else {
            return Ok(());
        };
        let (protocol, port) = match packet.transport {
            Transport::Tcp { destination, .. } => (Protocol::Tcp, destination),
            Transport::Udp { destination, .. } => (Protocol::Udp, destination),
            Transport::Icmp { .. } => (Protocol::Icmp, 0),
            Transport::Fragment { .. } | Transport::Other { .. } => {
                return Err(Drop::ProtocolNotGranted);
            }
        };
        let mut same_protocol = rules.iter().filter(|r| r.protocol == protocol).peekable();
        if same_protocol.peek().is_none() {
            return Err(Drop::ProtocolNotGranted);
        }
        if same_protocol.any(|r| r.first <= port && port <= r.last) {
            Ok(())
        } else {
            Err(Drop::PortNotGranted)
        }
    }

    /// Whether a packet from the site may go back to the client: it goes to the client's
    /// tunnel address and comes from the grant's resource (for a DNS resource, from a mapped
    /// address, which the NAT has written back), from a port inside the filter. ICMP from the
    /// resource always passes: its errors (unreachable, fragmentation needed) belong to flows
    /// the client started, and path MTU discovery needs them.
    ///
    /// The check holds no state: a resource may send from a granted port to any port of the
    /// client. DNS resources' replies are stateful already (the NAT answers only flows the
    /// client opened).
    pub fn check_reply(&self, packet: &Packet) -> bool {
        if !self.sources.contains(&packet.destination) {
            return false;
        }
        let from_resource = match &self.destinations {
            Destinations::Anywhere => true,
            Destinations::Networks(networks) => networks.iter().any(|n| n.contains(packet.source)),
        };
        if !from_resource {
            return false;
        }
        let Some(rules) = &self.ports else {
            return true;
        };
        let (protocol, port) = match packet.transport {
            Transport::Tcp { source, .. } => (Protocol::Tcp, source),
            Transport::Udp { source, .. } => (Protocol::Udp, source),
            Transport::Icmp { .. } => return true,
            Transport::Fragment { .. } | Transport::Other { .. } => return false,
        };
        rules
            .iter()
            .any(|r| r.protocol == protocol && r.first <= port && port <= r.last)
    }

    /// Reads and checks a packet in one step.
    pub fn check_bytes(&self, bytes: &[u8]) -> Result<Packet, Drop> {
        let packet = Packet::parse(bytes).map_err(|_| Drop::Malformed)?;
        self.check(&packet).map(|()| packet)
    }
}

fn parse_port(text: &str) -> Result<PortRule, FilterError> {
    let bad = || FilterError::Port(text.to_owned());
    if text == "icmp" {
        return Ok(PortRule {
            protocol: Protocol::Icmp,
            first: 0,
            last: 0,
        });
    }
    let (protocol, range) = text.split_once('/').ok_or_else(bad)?;
    let protocol = match protocol {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Err(bad()),
    };
    let (first, last) = match range.split_once('-') {
        Some((first, last)) => (first, last),
        None => (range, range),
    };
    let first: u16 = first.parse().map_err(|_| bad())?;
    let last: u16 = last.parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(bad());
    }
    Ok(PortRule {
        protocol,
        first,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::{ip, ports};
    use fz_proto::{ClientPeer, DnsMapping, GatewayPeer, GrantedResource, PresharedKey, PublicKey};

    fn grant(address: &str, filter: Option<&[&str]>, dns: Option<&[&str]>) -> Grant {
        Grant {
            id: "g".into(),
            account: "acme".into(),
            client: ClientPeer {
                id: "c".into(),
                public_key: PublicKey([1; 32]),
                tunnel_ipv4: "100.64.0.2".parse().unwrap(),
                tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
                endpoints: vec![],
            },
            gateway: GatewayPeer {
                id: "gw".into(),
                public_key: PublicKey([2; 32]),
                endpoints: vec![],
            },
            preshared_key: PresharedKey([3; 32]),
            resource: GrantedResource {
                id: "r".into(),
                address: address.into(),
                filter: filter.map(|f| f.iter().map(|s| (*s).to_owned()).collect()),
                dns: dns.map(|mapped| DnsMapping {
                    name: address.trim_start_matches("**.").into(),
                    mapped: mapped.iter().map(|ip| ip.parse().unwrap()).collect(),
                }),
            },
            rule: "r".into(),
            bundle_hash: "h".into(),
            issued_at: 0,
            expires_at: 1,
        }
    }

    fn tcp(source: &str, destination: &str, port: u16) -> Vec<u8> {
        ip(
            source.parse().unwrap(),
            destination.parse().unwrap(),
            6,
            &ports(40000, port),
        )
    }

    fn udp(source: &str, destination: &str, port: u16) -> Vec<u8> {
        ip(
            source.parse().unwrap(),
            destination.parse().unwrap(),
            17,
            &ports(40000, port),
        )
    }

    fn icmp(source: &str, destination: &str) -> Vec<u8> {
        let protocol = if source.contains(':') { 58 } else { 1 };
        ip(
            source.parse().unwrap(),
            destination.parse().unwrap(),
            protocol,
            &[8, 0, 0, 0],
        )
    }

    const CLIENT: &str = "100.64.0.2";
    const CLIENT6: &str = "fd00:2021:1111::2";

    #[test]
    fn a_cidr_resource_with_ports() {
        let filter = GrantFilter::new(&grant(
            "10.0.5.0/24",
            Some(&["tcp/5432", "udp/8000-8100"]),
            None,
        ))
        .unwrap();
        let cases = [
            (tcp(CLIENT, "10.0.5.9", 5432), Ok(())),
            (udp(CLIENT, "10.0.5.200", 8050), Ok(())),
            (tcp(CLIENT, "10.0.5.9", 5433), Err(Drop::PortNotGranted)),
            (udp(CLIENT, "10.0.5.9", 8101), Err(Drop::PortNotGranted)),
            (icmp(CLIENT, "10.0.5.9"), Err(Drop::ProtocolNotGranted)),
            (
                tcp(CLIENT, "10.0.6.9", 5432),
                Err(Drop::DestinationNotGranted),
            ),
            (
                tcp("100.64.0.3", "10.0.5.9", 5432),
                Err(Drop::NotFromClient),
            ),
            (
                ip(
                    CLIENT.parse().unwrap(),
                    "10.0.5.9".parse().unwrap(),
                    47,
                    &[0; 4],
                ),
                Err(Drop::ProtocolNotGranted),
            ),
            (vec![0x45, 0], Err(Drop::Malformed)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                filter.check_bytes(&bytes).map(|_| ()),
                expected,
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_dns_resource_reaches_only_its_mapped_addresses() {
        let filter = GrantFilter::new(&grant(
            "gitlab.acme.example",
            Some(&["tcp/443", "icmp"]),
            Some(&["100.96.0.1", "fd00:2021:1111:8000::1"]),
        ))
        .unwrap();
        assert_eq!(
            filter
                .check_bytes(&tcp(CLIENT, "100.96.0.1", 443))
                .map(|_| ()),
            Ok(())
        );
        assert_eq!(
            filter
                .check_bytes(&tcp(CLIENT6, "fd00:2021:1111:8000::1", 443))
                .map(|_| ()),
            Ok(())
        );
        assert_eq!(
            filter
                .check_bytes(&icmp(CLIENT6, "fd00:2021:1111:8000::1"))
                .map(|_| ()),
            Ok(())
        );
        // Another resource's mapped address, or the real address behind it: not this grant.
        assert_eq!(
            filter.check_bytes(&tcp(CLIENT, "100.96.0.5", 443)),
            Err(Drop::DestinationNotGranted)
        );
        assert_eq!(
            filter.check_bytes(&tcp(CLIENT, "172.16.0.5", 443)),
            Err(Drop::DestinationNotGranted)
        );
    }

    #[test]
    fn no_filter_means_every_protocol_and_internet_means_anywhere() {
        let filter = GrantFilter::new(&grant("internet", None, None)).unwrap();
        for bytes in [
            tcp(CLIENT, "8.8.8.8", 1),
            icmp(CLIENT6, "2001:db8::1"),
            udp(CLIENT, "1.1.1.1", 53),
        ] {
            assert_eq!(filter.check_bytes(&bytes).map(|_| ()), Ok(()));
        }
        assert_eq!(
            filter.check_bytes(&tcp("10.0.0.1", "8.8.8.8", 1)),
            Err(Drop::NotFromClient)
        );
        let host = GrantFilter::new(&grant("172.16.0.5", None, None)).unwrap();
        assert_eq!(
            host.check_bytes(&tcp(CLIENT, "172.16.0.5", 22)).map(|_| ()),
            Ok(())
        );
        assert_eq!(
            host.check_bytes(&tcp(CLIENT, "172.16.0.6", 22)),
            Err(Drop::DestinationNotGranted)
        );
    }

    #[test]
    fn later_fragments_pass_only_without_a_port_filter() {
        let mut fragment = tcp(CLIENT, "10.0.5.9", 5432);
        fragment[6..8].copy_from_slice(&100u16.to_be_bytes());
        let ported = GrantFilter::new(&grant("10.0.5.0/24", Some(&["tcp/5432"]), None)).unwrap();
        assert_eq!(ported.check_bytes(&fragment), Err(Drop::ProtocolNotGranted));
        let open = GrantFilter::new(&grant("10.0.5.0/24", None, None)).unwrap();
        assert!(open.check_bytes(&fragment).is_ok());
    }

    #[test]
    fn grants_this_agent_cannot_read_are_refused() {
        let cases = [
            (
                grant("10.0.5.0/24", Some(&["tcp/0"]), None),
                FilterError::Port("tcp/0".into()),
            ),
            (
                grant("10.0.5.0/24", Some(&["sctp/9"]), None),
                FilterError::Port("sctp/9".into()),
            ),
            (
                grant("10.0.5.0/24", Some(&["tcp/9-1"]), None),
                FilterError::Port("tcp/9-1".into()),
            ),
            (
                grant("10.0.5.0/33", None, None),
                FilterError::Address("10.0.5.0/33".into()),
            ),
            (
                grant("gitlab.acme.example", None, None),
                FilterError::NoMapping("gitlab.acme.example".into()),
            ),
            (
                grant("gitlab.acme.example", None, Some(&[])),
                FilterError::NoMapping("gitlab.acme.example".into()),
            ),
        ];
        for (grant, error) in cases {
            assert_eq!(GrantFilter::new(&grant), Err(error));
        }
    }
}
