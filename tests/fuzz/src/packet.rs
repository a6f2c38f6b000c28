//! The `packet` target: what the data plane reads of IP packets, on raw bytes and on packets
//! built well-formed from the same bytes.
//!
//! Raw bytes go to `Packet::parse`, the standard grants' filters (both directions), a NAT
//! both ways and `icmp::prohibited`: nothing panics, a packet that parses has addresses of
//! the family its version says, and an ICMP error goes back from the destination to the
//! source with valid checksums and is never itself answered with an error. A well-formed
//! packet (valid checksums) to a mapped address goes through the NAT to its real address and
//! its reply comes back from the mapped address, both with valid checksums still.

use std::net::IpAddr;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use fz_tunnel::filter::GrantFilter;
use fz_tunnel::icmp;
use fz_tunnel::nat::Nat;
use fz_tunnel::packet::{Packet, Transport, build as ip};

use crate::{fixtures, pick};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Real addresses for the NAT.
const REAL: &[&str] = &[
    "172.16.0.5",
    "10.0.5.10",
    "8.8.8.8",
    "0.0.0.0",
    "255.255.255.255",
    "2001:db8:5::5",
    "::",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
];

pub fn packet(data: &[u8]) {
    raw(data);
    // The same bytes, read as the recipe for a well-formed packet; running out of them only
    // ends the recipe.
    let _ = translated(&mut Unstructured::new(data));
}

/// The standard grants' filters.
fn filters() -> &'static [GrantFilter] {
    static FILTERS: OnceLock<Vec<GrantFilter>> = OnceLock::new();
    FILTERS.get_or_init(|| {
        fixtures::standard_grants()
            .iter()
            .filter_map(|g| GrantFilter::new(g).ok())
            .collect()
    })
}

fn raw(data: &[u8]) {
    let parsed = Packet::parse(data);
    if let Ok(packet) = &parsed {
        let v4 = data.first().is_some_and(|b| b >> 4 == 4);
        assert!(
            packet.source.is_ipv4() == v4 && packet.destination.is_ipv4() == v4,
            "{packet:?} from a packet of version {}",
            if v4 { 4 } else { 6 }
        );
        for filter in filters() {
            let _ = filter.check(packet);
            let _ = filter.check_reply(packet);
        }
    }
    for filter in filters() {
        assert_eq!(
            filter.check_bytes(data).ok(),
            parsed.ok().filter(|p| filter.check(p).is_ok()),
            "check_bytes reads what parse and check read"
        );
    }

    if let Some(error) = icmp::prohibited(data) {
        let Ok(original) = parsed else {
            panic!("an ICMP error for bytes that do not parse");
        };
        check_icmp_error(&original, &error);
    }

    let mut nat = Nat::default();
    for mapped in ["100.96.0.1", "fd00:2021:1111:8000::1"] {
        nat.set_targets(ip_of(mapped), pick::ips(REAL));
    }
    let mut outbound = data.to_vec();
    if let Ok(real) = nat.outbound(&mut outbound, 0) {
        let Ok(translated) = Packet::parse(&outbound) else {
            panic!("the NAT translated a packet that does not parse: {outbound:02x?}");
        };
        assert_eq!(translated.destination, real);
    }
    let mut reply = data.to_vec();
    let _ = nat.reply(&mut reply, 1);
}

fn check_icmp_error(original: &Packet, error: &[u8]) {
    let Ok(parsed) = Packet::parse(error) else {
        panic!("the ICMP error does not parse: {error:02x?}");
    };
    assert_eq!(
        (parsed.source, parsed.destination),
        (original.destination, original.source),
        "the ICMP error goes back from the destination"
    );
    let v4 = parsed.source.is_ipv4();
    let expected = if v4 { 3 } else { 1 };
    assert!(
        matches!(parsed.transport, Transport::Icmp { kind } if kind == expected),
        "{parsed:?} is no destination-unreachable"
    );
    assert!(
        icmp::prohibited(error).is_none(),
        "an ICMP error was answered with an error"
    );
    assert!(
        checksums_hold(error),
        "the ICMP error's checksums: {error:02x?}"
    );
    if !v4 {
        assert!(
            error.len() <= 1280,
            "an ICMPv6 error beyond the minimum MTU"
        );
    }
}

fn ip_of(text: &str) -> IpAddr {
    pick::ips(&[text])
        .first()
        .copied()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// A packet from a device to the mapped address, through the NAT and back.
fn translated(u: &mut Unstructured<'_>) -> Result<()> {
    let v6: bool = u.arbitrary()?;
    let (client, mapped) = if v6 {
        (ip_of("fd00:2021:1111::2"), ip_of("fd00:2021:1111:8000::1"))
    } else {
        (ip_of("100.64.0.2"), ip_of("100.96.0.1"))
    };
    let family: Vec<IpAddr> = pick::ips(REAL)
        .into_iter()
        .filter(|ip| ip.is_ipv6() == v6)
        .collect();
    let real = match pick::address(u, &family)? {
        ip if ip.is_ipv6() == v6 => ip,
        _ => family[0],
    };
    let protocol = *u.choose(&[TCP, UDP, if v6 { ICMPV6 } else { ICMP }])?;
    let client_port = pick::port(u)?;
    let server_port = pick::port(u)?;
    let length = u.int_in_range(0..=64)?;
    let payload = u.bytes(length.min(u.len()))?.to_vec();
    let no_udp_checksum = !v6 && u.ratio(1u8, 8)?;
    let shape = Shape {
        protocol,
        no_udp_checksum,
    };

    let mut packet = shape.build(client, mapped, (client_port, server_port), true, &payload);
    assert!(checksums_hold(&packet), "the recipe's own checksums");
    let before = udp_checksum(&packet);
    let mut nat = Nat::default();
    nat.set_targets(mapped, vec![real]);
    assert_eq!(nat.outbound(&mut packet, 0), Ok(real), "{packet:02x?}");
    check_translated(&packet, (client, real), before);

    let length = u.int_in_range(0..=64)?;
    let payload = u.bytes(length.min(u.len()))?.to_vec();
    let mut reply = shape.build(real, client, (server_port, client_port), false, &payload);
    let before = udp_checksum(&reply);
    assert_eq!(nat.reply(&mut reply, 1), Ok(mapped), "{reply:02x?}");
    check_translated(&reply, (mapped, client), before);
    Ok(())
}

fn check_translated(packet: &[u8], (source, destination): (IpAddr, IpAddr), udp_before: u16) {
    let Ok(parsed) = Packet::parse(packet) else {
        panic!("the NAT's packet does not parse: {packet:02x?}");
    };
    assert_eq!((parsed.source, parsed.destination), (source, destination));
    assert!(
        checksums_hold(packet),
        "the NAT left a wrong checksum: {packet:02x?}"
    );
    let after = udp_checksum(packet);
    // A UDP checksum the NAT updates is never zero, which would mean "none" (RFC 768 sends
    // all ones); one that was zero stays zero.
    assert!(
        (udp_before == 0) == (after == 0),
        "the NAT turned UDP checksum {udp_before:#06x} into {after:#06x} (zero means none): {packet:02x?}"
    );
}

/// The UDP checksum field, when the packet is UDP.
fn udp_checksum(packet: &[u8]) -> u16 {
    let Some(at) = transport_offset(packet) else {
        return 0;
    };
    if protocol(packet) != Some(UDP) {
        return 0;
    }
    word(packet, at + 6)
}

/// What a well-formed packet carries besides its addresses and ports.
struct Shape {
    protocol: u8,
    no_udp_checksum: bool,
}

impl Shape {
    /// A packet with correct lengths and checksums; for ICMP, an echo request (or reply)
    /// whose identifier is the client's port.
    fn build(
        &self,
        source: IpAddr,
        destination: IpAddr,
        (source_port, destination_port): (u16, u16),
        request: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut transport = match self.protocol {
            TCP => {
                let mut header = ip::ports(source_port, destination_port);
                header[12] = 5 << 4;
                header
            }
            UDP => {
                let mut header = ip::ports(source_port, destination_port);
                header.truncate(8);
                header
            }
            _ => {
                let kind = match (source.is_ipv4(), request) {
                    (true, true) => 8,
                    (true, false) => 0,
                    (false, true) => 128,
                    (false, false) => 129,
                };
                // The client's identifier, in the request and in its reply.
                let identifier = if request {
                    source_port
                } else {
                    destination_port
                };
                let [high, low] = identifier.to_be_bytes();
                vec![kind, 0, 0, 0, high, low, 0, 1]
            }
        };
        transport.extend_from_slice(payload);
        if self.protocol == UDP {
            let length = u16::try_from(transport.len()).unwrap_or(u16::MAX);
            transport[4..6].copy_from_slice(&length.to_be_bytes());
        }
        let mut packet = ip::ip(source, destination, self.protocol, &transport);
        let at = transport_offset(&packet).unwrap_or(packet.len());
        if source.is_ipv4() {
            let sum = fold(&packet[..20], 0);
            packet[10..12].copy_from_slice(&(!sum).to_be_bytes());
        }
        let checksum_at = match self.protocol {
            TCP => Some(16),
            UDP if !self.no_udp_checksum => Some(6),
            ICMP | ICMPV6 => Some(2),
            _ => None,
        };
        if let Some(offset) = checksum_at {
            let initial = if self.protocol == ICMP {
                0
            } else {
                u32::from(pseudo_header(&packet))
            };
            let mut checksum = !fold(&packet[at..], initial);
            if self.protocol == UDP && checksum == 0 {
                // RFC 768: a computed zero is sent as all ones; zero means "no checksum".
                checksum = 0xffff;
            }
            packet[at + offset..at + offset + 2].copy_from_slice(&checksum.to_be_bytes());
        }
        packet
    }
}

/// Whether the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6 checksum hold, for a
/// packet without options or extension headers.
fn checksums_hold(packet: &[u8]) -> bool {
    let Some(at) = transport_offset(packet) else {
        return false;
    };
    let v4 = packet[0] >> 4 == 4;
    if v4 && fold(&packet[..20], 0) != 0xffff {
        return false;
    }
    let transport = &packet[at..];
    match protocol(packet) {
        Some(ICMP) => fold(transport, 0) == 0xffff,
        Some(UDP) if v4 && word(packet, at + 6) == 0 => true,
        Some(TCP | UDP | ICMPV6) => fold(transport, u32::from(pseudo_header(packet))) == 0xffff,
        _ => true,
    }
}

/// The one's-complement sum of the pseudo-header of a TCP, UDP or ICMPv6 packet.
fn pseudo_header(packet: &[u8]) -> u16 {
    let Some(at) = transport_offset(packet) else {
        return 0;
    };
    let length = u32::try_from(packet.len() - at).unwrap_or(u32::MAX);
    let protocol = u32::from(protocol(packet).unwrap_or(0));
    let addresses = if packet[0] >> 4 == 4 {
        &packet[12..20]
    } else {
        &packet[8..40]
    };
    fold(addresses, protocol + (length >> 16) + (length & 0xffff))
}

/// Where the transport header starts: 20 (IPv4 without options) or 40 (IPv6 without
/// extension headers).
fn transport_offset(packet: &[u8]) -> Option<usize> {
    let at = match packet.first()? >> 4 {
        4 if packet[0] & 0x0f == 5 => 20,
        6 => 40,
        _ => return None,
    };
    (packet.len() >= at).then_some(at)
}

fn protocol(packet: &[u8]) -> Option<u8> {
    match packet.first()? >> 4 {
        4 => packet.get(9).copied(),
        6 => packet.get(6).copied(),
        _ => None,
    }
}

fn word(packet: &[u8], at: usize) -> u16 {
    match (packet.get(at), packet.get(at + 1)) {
        (Some(high), Some(low)) => u16::from_be_bytes([*high, *low]),
        _ => 0,
    }
}

/// The one's-complement sum of `data` on top of `initial`, folded to 16 bits (not
/// complemented: a block whose checksum holds sums to `0xffff`).
fn fold(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in data.chunks(2) {
        let high = chunk.first().copied().unwrap_or(0);
        let low = chunk.get(1).copied().unwrap_or(0);
        sum += u64::from(u16::from_be_bytes([high, low]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0)
}

/// An IP packet for the gateway sims: a TCP, UDP, ICMP or other packet of either family from
/// one of `sources` to one of `destinations` (mostly), sometimes a fragment or damaged, and
/// now and then raw bytes.
pub(crate) fn build(
    u: &mut Unstructured<'_>,
    sources: &[IpAddr],
    destinations: &[IpAddr],
) -> Result<Vec<u8>> {
    if u.ratio(1u8, 10)? {
        let length = u.int_in_range(0..=80)?;
        return Ok(u.bytes(length.min(u.len()))?.to_vec());
    }
    let v6: bool = u.arbitrary()?;
    let of_family = |list: &[IpAddr]| -> Vec<IpAddr> {
        list.iter()
            .copied()
            .filter(|ip| ip.is_ipv6() == v6)
            .collect()
    };
    let source = in_family(u, &of_family(sources), v6)?;
    let destination = in_family(u, &of_family(destinations), v6)?;
    let icmp = if v6 { ICMPV6 } else { ICMP };
    let protocol = *u.choose(&[TCP, TCP, UDP, UDP, icmp, icmp, 47, 44, 0])?;
    let mut transport = match protocol {
        TCP | UDP => {
            let mut header = ip::ports(pick::port(u)?, pick::port(u)?);
            if protocol == UDP {
                header.truncate(8);
            }
            header
        }
        ICMP | ICMPV6 => {
            let kind = *u.choose(&[8u8, 0, 3, 11, 128, 129, 1, 135, 5])?;
            let [high, low] = pick::port(u)?.to_be_bytes();
            vec![kind, 0, 0, 0, high, low, 0, 1]
        }
        // An IPv6 extension header (fragment or hop-by-hop) before a TCP header.
        44 | 0 if v6 => {
            let mut header = vec![TCP, 0, 0, 0, 0, 0, 0, 1];
            if u.ratio(1u8, 2)? {
                header[3] = 8;
            }
            header.extend(ip::ports(pick::port(u)?, pick::port(u)?));
            header
        }
        _ => Vec::new(),
    };
    let extra = u.int_in_range(0..=48)?;
    transport.extend_from_slice(u.bytes(extra.min(u.len()))?);
    let mut packet = ip::ip(source, destination, protocol, &transport);
    if !v6 && u.ratio(1u8, 16)? {
        // A fragment: more fragments, or a later one.
        packet[6] = *u.choose(&[0x20u8, 0x00, 0x01, 0x21])?;
        packet[7] = u.arbitrary()?;
    }
    if u.ratio(1u8, 10)? {
        for _ in 0..u.int_in_range(1..=3)? {
            let at = u.choose_index(packet.len())?;
            packet[at] ^= u.arbitrary::<u8>()?;
        }
    }
    Ok(packet)
}

/// An address of one family: one of `choices`, or any.
fn in_family(u: &mut Unstructured<'_>, choices: &[IpAddr], v6: bool) -> Result<IpAddr> {
    if !choices.is_empty() && u.ratio(7u8, 8)? {
        return Ok(*u.choose(choices)?);
    }
    Ok(if v6 {
        IpAddr::from(u.arbitrary::<u128>()?.to_be_bytes())
    } else {
        IpAddr::from(u.arbitrary::<u32>()?.to_be_bytes())
    })
}
