//! Reading an IP packet's addresses, protocol and ports, for filtering. Nothing is copied or
//! changed; any input gives a [`Packet`] or a [`PacketError`], never a panic.
//!
//! IPv4 (with options) and IPv6 (walking hop-by-hop, routing, destination-options and
//! fragment extension headers). A fragment other than the first carries no transport header:
//! its ports are unknown, and a filter that needs ports drops it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What a filter needs of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub transport: Transport,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        source: u16,
        destination: u16,
    },
    Udp {
        source: u16,
        destination: u16,
    },
    /// ICMP or ICMPv6.
    Icmp {
        kind: u8,
    },
    /// A later fragment of a TCP or UDP (or any) datagram: no transport header to read.
    Fragment {
        protocol: u8,
    },
    /// Any other protocol, by number.
    Other {
        protocol: u8,
    },
}

/// Why bytes are not a packet this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    Version(u8),
    #[error("the packet is shorter than its headers")]
    Truncated,
    #[error("the IPv4 header length is below 20 bytes")]
    HeaderLength,
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

impl Packet {
    pub fn parse(bytes: &[u8]) -> Result<Packet, PacketError> {
        let first = *bytes.first().ok_or(PacketError::Empty)?;
        match first >> 4 {
            4 => parse_v4(bytes),
            6 => parse_v6(bytes),
            other => Err(PacketError::Version(other)),
        }
    }
}

fn parse_v4(bytes: &[u8]) -> Result<Packet, PacketError> {
    let header: &[u8; 20] = bytes
        .get(..20)
        .and_then(|h| h.try_into().ok())
        .ok_or(PacketError::Truncated)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(PacketError::HeaderLength);
    }
    let protocol = header[9];
    let source = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let destination = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let payload = bytes.get(header_len..).ok_or(PacketError::Truncated)?;
    let transport = if fragment_offset != 0 {
        Transport::Fragment { protocol }
    } else {
        transport(protocol, payload, ICMP)?
    };
    Ok(Packet {
        source: source.into(),
        destination: destination.into(),
        transport,
    })
}

fn parse_v6(bytes: &[u8]) -> Result<Packet, PacketError> {
    let header: &[u8; 40] = bytes
        .get(..40)
        .and_then(|h| h.try_into().ok())
        .ok_or(PacketError::Truncated)?;
    let address = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&header[at..at + 16]);
        Ipv6Addr::from(octets)
    };
    let source = address(8);
    let destination = address(24);
    let mut next = header[6];
    let mut rest = bytes.get(40..).ok_or(PacketError::Truncated)?;
    // Extension headers: at most a handful in any real packet; the bound keeps a crafted
    // chain from costing more than it is worth.
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options: next header, length in 8-byte units
            // beyond the first 8.
            0 | 43 | 60 => {
                let [following, length, ..] = rest else {
                    return Err(PacketError::Truncated);
                };
                let skip = (usize::from(*length) + 1) * 8;
                next = *following;
                rest = rest.get(skip..).ok_or(PacketError::Truncated)?;
            }
            // Fragment: 8 bytes; a fragment with a non-zero offset has no transport header.
            44 => {
                let [following, _, offset_high, offset_low, ..] = rest else {
                    return Err(PacketError::Truncated);
                };
                let offset = u16::from_be_bytes([*offset_high, *offset_low]) >> 3;
                let protocol = *following;
                if offset != 0 {
                    return Ok(Packet {
                        source: source.into(),
                        destination: destination.into(),
                        transport: Transport::Fragment { protocol },
                    });
                }
                next = protocol;
                rest = rest.get(8..).ok_or(PacketError::Truncated)?;
            }
            _ => break,
        }
    }
    Ok(Packet {
        source: source.into(),
        destination: destination.into(),
        transport: transport(next, rest, ICMPV6)?,
    })
}

/// The transport header of a first (or only) fragment.
fn transport(protocol: u8, payload: &[u8], icmp: u8) -> Result<Transport, PacketError> {
    let ports = || match payload {
        [a, b, c, d, ..] => Ok((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        _ => Err(PacketError::Truncated),
    };
    Ok(match protocol {
        TCP => {
            let (source, destination) = ports()?;
            Transport::Tcp {
                source,
                destination,
            }
        }
        UDP => {
            let (source, destination) = ports()?;
            Transport::Udp {
                source,
                destination,
            }
        }
        p if p == icmp => Transport::Icmp {
            kind: *payload.first().ok_or(PacketError::Truncated)?,
        },
        protocol => Transport::Other { protocol },
    })
}

/// Packets built by hand, for the tests of this crate and of its users.
pub mod build {
    use std::net::IpAddr;

    /// An IPv4 or IPv6 packet from `source` to `destination` with `protocol` and `payload`
    /// (both addresses must be of one family). Checksums are left zero: nothing here reads
    /// them.
    pub fn ip(source: IpAddr, destination: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
        match (source, destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
                let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0];
                packet[2..4].copy_from_slice(&total.to_be_bytes());
                packet.extend_from_slice(&s.octets());
                packet.extend_from_slice(&d.octets());
                packet.extend_from_slice(payload);
                packet
            }
            (s, d) => {
                let to_v6 = |ip: IpAddr| match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let length = u16::try_from(payload.len()).unwrap_or(u16::MAX);
                let mut packet = vec![0x60, 0, 0, 0];
                packet.extend_from_slice(&length.to_be_bytes());
                packet.extend_from_slice(&[protocol, 64]);
                packet.extend_from_slice(&to_v6(s).octets());
                packet.extend_from_slice(&to_v6(d).octets());
                packet.extend_from_slice(payload);
                packet
            }
        }
    }

    /// A TCP or UDP header with these ports (the rest zero), to put after an IP header.
    pub fn ports(source: u16, destination: u16) -> Vec<u8> {
        let mut header = vec![0u8; 20];
        header[..2].copy_from_slice(&source.to_be_bytes());
        header[2..4].copy_from_slice(&destination.to_be_bytes());
        header
    }
}

#[cfg(test)]
mod tests {
    use super::build::{ip, ports};
    use super::*;

    fn v4(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn reads_tcp_udp_and_icmp_over_both_families() {
        let cases = [
            (
                ip(v4("100.64.0.2"), v4("10.0.5.9"), TCP, &ports(40000, 5432)),
                Transport::Tcp {
                    source: 40000,
                    destination: 5432,
                },
            ),
            (
                ip(v4("100.64.0.2"), v4("10.0.5.9"), UDP, &ports(5353, 53)),
                Transport::Udp {
                    source: 5353,
                    destination: 53,
                },
            ),
            (
                ip(v4("100.64.0.2"), v4("10.0.5.9"), ICMP, &[8, 0, 0, 0]),
                Transport::Icmp { kind: 8 },
            ),
            (
                ip(v4("fd00:2021:1111::2"), v4("fd00::5"), TCP, &ports(1, 443)),
                Transport::Tcp {
                    source: 1,
                    destination: 443,
                },
            ),
            (
                ip(
                    v4("fd00:2021:1111::2"),
                    v4("fd00::5"),
                    ICMPV6,
                    &[128, 0, 0, 0],
                ),
                Transport::Icmp { kind: 128 },
            ),
            (
                ip(v4("100.64.0.2"), v4("10.0.5.9"), 47, &[0; 8]),
                Transport::Other { protocol: 47 },
            ),
        ];
        for (bytes, transport) in cases {
            let packet = Packet::parse(&bytes).unwrap();
            assert_eq!(packet.transport, transport, "{bytes:?}");
        }
        let packet =
            Packet::parse(&ip(v4("100.64.0.2"), v4("10.0.5.9"), TCP, &ports(1, 2))).unwrap();
        assert_eq!(
            (packet.source, packet.destination),
            (v4("100.64.0.2"), v4("10.0.5.9"))
        );
    }

    #[test]
    fn ipv4_options_and_later_fragments() {
        // Header length 6 words: 4 bytes of options before TCP.
        let mut with_options = ip(v4("100.64.0.2"), v4("10.0.5.9"), TCP, &[]);
        with_options[0] = 0x46;
        with_options.extend_from_slice(&[1, 1, 1, 0]);
        with_options.extend_from_slice(&ports(7, 22));
        assert_eq!(
            Packet::parse(&with_options).unwrap().transport,
            Transport::Tcp {
                source: 7,
                destination: 22
            }
        );
        let mut fragment = ip(v4("100.64.0.2"), v4("10.0.5.9"), TCP, &[0xde, 0xad]);
        fragment[6..8].copy_from_slice(&185u16.to_be_bytes());
        assert_eq!(
            Packet::parse(&fragment).unwrap().transport,
            Transport::Fragment { protocol: TCP }
        );
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        // Hop-by-hop (8 bytes) then a first fragment header, then UDP.
        let mut payload = vec![44, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&[UDP, 0, 0, 1, 0, 0, 0, 7]);
        payload.extend_from_slice(&ports(9, 53));
        let bytes = ip(v4("fd00:2021:1111::2"), v4("fd00::5"), 0, &payload);
        assert_eq!(
            Packet::parse(&bytes).unwrap().transport,
            Transport::Udp {
                source: 9,
                destination: 53
            }
        );
        // A later fragment: no ports.
        let later = ip(
            v4("fd00:2021:1111::2"),
            v4("fd00::5"),
            44,
            &[UDP, 0, 0x05, 0x01, 0, 0, 0, 7, 1, 2],
        );
        assert_eq!(
            Packet::parse(&later).unwrap().transport,
            Transport::Fragment { protocol: UDP }
        );
    }

    #[test]
    fn bad_packets_say_what_is_wrong() {
        let mut short_header = ip(v4("100.64.0.2"), v4("10.0.5.9"), TCP, &ports(1, 2));
        short_header[0] = 0x44;
        let cases: [(&[u8], PacketError); 6] = [
            (&[], PacketError::Empty),
            (&[0x20, 0, 0], PacketError::Version(2)),
            (&[0x45, 0, 0], PacketError::Truncated),
            (&short_header, PacketError::HeaderLength),
            (
                &ip(v4("100.64.0.2"), v4("10.0.5.9"), TCP, &[0, 1]),
                PacketError::Truncated,
            ),
            (&[0x60; 39], PacketError::Truncated),
        ];
        for (bytes, error) in cases {
            assert_eq!(Packet::parse(bytes), Err(error), "{bytes:?}");
        }
    }
}
