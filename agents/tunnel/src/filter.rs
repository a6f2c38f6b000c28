//! The per-grant packet filter: what one verified grant lets its client send.
//!
//! A packet passes when it comes from the client's tunnel address (IPv4 or IPv6), goes to what
//! the grant opens (its resource's IP or CIDR; for a DNS resource, one of the mapped addresses
//! the grant names, which the NAT then translates; for `internet`, any public address), less
//! the carve-outs the grant carries (networks more specific resources serve), and its protocol
//! and port are inside the grant's filter (`tcp/443`, `udp/8000-8100`, `icmp`; no filter:
//! everything).
//! Everything else is a [`Drop`] with its reason.

use std::net::IpAddr;

use fz_address::{Network, is_public};
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
    #[error("the grant's carve-out `{0}` is not an IP or a CIDR")]
    Except(String),
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

/// Where a grant lets packets go (and replies come from).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Destinations {
    /// `internet`: public addresses ([`fz_address::is_public`]), less the carve-outs.
    Internet { except: Vec<Network> },
    /// The resource's network, or a DNS resource's mapped addresses, less the carve-outs.
    Networks {
        networks: Vec<Network>,
        except: Vec<Network>,
    },
}

impl Destinations {
    fn contains(&self, ip: IpAddr) -> bool {
        match self {
            Destinations::Internet { except } => {
                is_public(ip) && !except.iter().any(|n| n.contains(ip))
            }
            Destinations::Networks { networks, except } => {
                networks.iter().any(|n| n.contains(ip)) && !except.iter().any(|n| n.contains(ip))
            }
        }
    }
}

/// Where a grant lets packets go, before its carve-outs: what the gateway files a client's
/// grants under, so that a packet is checked only against the grants that may pass it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opens<'a> {
    /// `internet`: public addresses.
    Internet,
    /// These networks (a DNS resource's mapped addresses as host networks).
    Networks(&'a [Network]),
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
        let except = resource
            .except
            .iter()
            .map(|text| {
                text.parse::<Network>()
                    .map_err(|_| FilterError::Except(text.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let destinations = if let Some(dns) = &resource.dns {
            if dns.mapped.is_empty() {
                return Err(FilterError::NoMapping(resource.address.clone()));
            }
            Destinations::Networks {
                networks: dns.mapped.iter().map(|ip| Network::host(*ip)).collect(),
                except,
            }
        } else if resource.address == "internet" {
            Destinations::Internet { except }
        } else if let Ok(network) = resource.address.parse::<Network>() {
            Destinations::Networks {
                networks: vec![network],
                except,
            }
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

    /// Where the filter lets packets go, before carve-outs: every packet it passes (and
    /// every reply it lets back) has its destination (source) inside one of these.
    pub fn opens(&self) -> Opens<'_> {
        match &self.destinations {
            Destinations::Internet { .. } => Opens::Internet,
            Destinations::Networks { networks, .. } => Opens::Networks(networks),
        }
    }

    /// Whether the packet may go on, or why not.
    pub fn check(&self, packet: &Packet) -> Result<(), Drop> {
        if !self.sources.contains(&packet.source) {
            return Err(Drop::NotFromClient);
        }
        if !self.destinations.contains(packet.destination) {
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
    /// tunnel address and comes from what the grant opens (for a DNS resource, from a mapped
    /// address, which the NAT has written back), from a port inside the filter. ICMP from the
    /// resource always passes: its errors (unreachable, fragmentation needed) belong to flows
    /// the client started, and path MTU discovery needs them.
    ///
    /// The check holds no state. That a packet belongs to a flow the client opened is
    /// decided before it: by the kernel's connection tracking on the gateway's forward chain
    /// (`fz_host::firewall`) for IP resources, and by the NAT for DNS resources (the gateway
    /// takes a DNS grant's replies only from its NAT flows).
    pub fn check_reply(&self, packet: &Packet) -> bool {
        if !self.sources.contains(&packet.destination) {
            return false;
        }
        if !self.destinations.contains(packet.source) {
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
                except: Vec::new(),
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
    fn no_filter_means_every_protocol_and_internet_means_public_addresses() {
        let filter = GrantFilter::new(&grant("internet", None, None)).unwrap();
        for bytes in [
            tcp(CLIENT, "8.8.8.8", 1),
            icmp(CLIENT6, "2001:db8::1"),
            udp(CLIENT, "1.1.1.1", 53),
        ] {
            assert_eq!(filter.check_bytes(&bytes).map(|_| ()), Ok(()));
        }
        // The site's private networks, the gateway's own and the mapped ranges are no part of
        // `internet`: another resource (or none) serves them.
        for private in [
            tcp(CLIENT, "10.20.5.9", 5432),
            tcp(CLIENT6, "fd00:20::10", 22),
            tcp(CLIENT, "192.168.100.1", 443),
            tcp(CLIENT, "127.0.0.1", 22),
            tcp(CLIENT, "169.254.169.254", 80),
            tcp(CLIENT, "100.96.0.1", 443),
            tcp(CLIENT6, "::ffff:10.0.0.1", 22),
        ] {
            assert_eq!(
                filter.check_bytes(&private),
                Err(Drop::DestinationNotGranted)
            );
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

    /// A grant opens what its resource serves: the networks of more specific resources stay
    /// closed, both ways.
    #[test]
    fn carve_outs_stay_closed() {
        let mut wide = grant("10.0.0.0/8", None, None);
        wide.resource.except = vec!["10.0.5.0/24".into(), "10.9.9.9".into()];
        let filter = GrantFilter::new(&wide).unwrap();
        let mut internet = grant("internet", None, None);
        internet.resource.except = vec!["203.0.113.0/24".into()];
        let public = GrantFilter::new(&internet).unwrap();
        let cases = [
            (&filter, tcp(CLIENT, "10.0.4.255", 22), Ok(())),
            (&filter, tcp(CLIENT, "10.0.6.0", 22), Ok(())),
            (&filter, tcp(CLIENT, "10.9.9.8", 22), Ok(())),
            (
                &filter,
                tcp(CLIENT, "10.0.5.0", 5432),
                Err(Drop::DestinationNotGranted),
            ),
            (
                &filter,
                tcp(CLIENT, "10.0.5.255", 5432),
                Err(Drop::DestinationNotGranted),
            ),
            (
                &filter,
                tcp(CLIENT, "10.9.9.9", 22),
                Err(Drop::DestinationNotGranted),
            ),
            (&public, tcp(CLIENT, "203.0.114.1", 443), Ok(())),
            (
                &public,
                tcp(CLIENT, "203.0.113.1", 443),
                Err(Drop::DestinationNotGranted),
            ),
        ];
        for (filter, bytes, expected) in cases {
            assert_eq!(
                filter.check_bytes(&bytes).map(|_| ()),
                expected,
                "{bytes:?}"
            );
        }
        let reply = |source: &str| Packet::parse(&tcp(source, CLIENT, 40000)).unwrap();
        assert!(filter.check_reply(&reply("10.0.4.1")));
        assert!(!filter.check_reply(&reply("10.0.5.1")));
        assert!(!filter.check_reply(&reply("10.9.9.9")));
        assert!(public.check_reply(&reply("8.8.8.8")));
        assert!(!public.check_reply(&reply("203.0.113.9")));
        assert!(!public.check_reply(&reply("10.0.0.1")));
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
            (
                Grant {
                    resource: GrantedResource {
                        except: vec!["10.0.5.1/24".into()],
                        ..grant("10.0.0.0/8", None, None).resource
                    },
                    ..grant("10.0.0.0/8", None, None)
                },
                FilterError::Except("10.0.5.1/24".into()),
            ),
        ];
        for (grant, error) in cases {
            assert_eq!(GrantFilter::new(&grant), Err(error));
        }
    }
}
