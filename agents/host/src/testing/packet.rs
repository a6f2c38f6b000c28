//! IP packets built by hand for tests that put them where a kernel reads them (a TUN device, a
//! WireGuard tunnel to a gateway): UDP datagrams and TCP segments over IPv4 or IPv6, with the
//! checksums right, and what a test reads back out of one. IPv6 packets carry no extension
//! headers, and the reading side expects none.

use std::net::{IpAddr, SocketAddr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// TCP flags, to combine with `|`.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// What a TCP segment without data says besides its ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

impl Segment {
    /// A connection's first segment, with `seq` as its initial sequence number.
    pub fn syn(seq: u32) -> Segment {
        Segment {
            seq,
            ack: 0,
            flags: SYN,
        }
    }

    /// Whether this is a SYN-ACK: the answer to a SYN whose port is open.
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (SYN | ACK) == SYN | ACK
    }
}

/// A UDP datagram from `src` to `dst` (one family) carrying `payload`.
pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let length = u16::try_from(8 + payload.len()).unwrap();
    let mut datagram = Vec::with_capacity(usize::from(length));
    datagram.extend_from_slice(&src.port().to_be_bytes());
    datagram.extend_from_slice(&dst.port().to_be_bytes());
    datagram.extend_from_slice(&length.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    ip(src.ip(), dst.ip(), UDP, datagram)
}

/// A TCP segment without data from `src` to `dst` (one family).
pub fn tcp(src: SocketAddr, dst: SocketAddr, segment: Segment) -> Vec<u8> {
    let mut header = Vec::with_capacity(20);
    header.extend_from_slice(&src.port().to_be_bytes());
    header.extend_from_slice(&dst.port().to_be_bytes());
    header.extend_from_slice(&segment.seq.to_be_bytes());
    header.extend_from_slice(&segment.ack.to_be_bytes());
    // Data offset 5 words (no options), the flags, a window of 64240, checksum, urgent.
    header.extend_from_slice(&[5 << 4, segment.flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    ip(src.ip(), dst.ip(), TCP, header)
}

/// Source, destination and payload of a UDP datagram; `None` for anything else.
pub fn parse_udp(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let (src, dst, protocol, rest) = split(packet)?;
    if protocol != UDP {
        return None;
    }
    let (src_port, dst_port) = ports(rest)?;
    let len = usize::from(u16::from_be_bytes(rest.get(4..6)?.try_into().ok()?));
    Some((
        SocketAddr::new(src, src_port),
        SocketAddr::new(dst, dst_port),
        rest.get(8..len)?,
    ))
}

/// Source, destination and header of a TCP segment; `None` for anything else.
pub fn parse_tcp(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, Segment)> {
    let (src, dst, protocol, rest) = split(packet)?;
    if protocol != TCP {
        return None;
    }
    let (src_port, dst_port) = ports(rest)?;
    let segment = Segment {
        seq: u32::from_be_bytes(rest.get(4..8)?.try_into().ok()?),
        ack: u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?),
        flags: *rest.get(13)?,
    };
    Some((
        SocketAddr::new(src, src_port),
        SocketAddr::new(dst, dst_port),
        segment,
    ))
}

/// The Internet checksum (RFC 1071) over the parts, as if they were one buffer of even-length
/// parts.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap())
}

/// Whether the UDP or TCP checksum of `packet` (IPv4 or IPv6) holds, as the receiving
/// kernel would check it.
pub fn transport_checksum_valid(packet: &[u8]) -> bool {
    let Some((src, dst, protocol, transport)) = split(packet) else {
        return false;
    };
    let Ok(length) = u32::try_from(transport.len()) else {
        return false;
    };
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend_from_slice(&[0, protocol]);
            pseudo.extend_from_slice(&u16::try_from(length).unwrap_or(0).to_be_bytes());
            pseudo
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend_from_slice(&length.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, protocol]);
            pseudo
        }
        _ => return false,
    };
    checksum(&[&pseudo, transport]) == 0
}

/// `transport` (a UDP or TCP header and its data) behind an IP header, with both checksums.
fn ip(src: IpAddr, dst: IpAddr, protocol: u8, mut transport: Vec<u8>) -> Vec<u8> {
    let length = u16::try_from(transport.len()).unwrap();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend_from_slice(&[0, protocol]);
            pseudo.extend_from_slice(&length.to_be_bytes());
            set_checksum(protocol, &mut transport, &pseudo);
            let mut packet = vec![0x45, 0];
            packet.extend_from_slice(&(20 + length).to_be_bytes());
            packet.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]); // id, DF, TTL
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
            let sum = checksum(&[&packet]);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
            packet.extend_from_slice(&transport);
            packet
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend_from_slice(&u32::from(length).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, protocol]);
            set_checksum(protocol, &mut transport, &pseudo);
            let mut packet = vec![0x60, 0, 0, 0];
            packet.extend_from_slice(&length.to_be_bytes());
            packet.extend_from_slice(&[protocol, 64]);
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
            packet.extend_from_slice(&transport);
            packet
        }
        _ => panic!("mixed families: {src} → {dst}"),
    }
}

fn set_checksum(protocol: u8, transport: &mut [u8], pseudo_header: &[u8]) {
    let at = if protocol == UDP { 6 } else { 16 };
    let sum = match checksum(&[pseudo_header, transport]) {
        0 if protocol == UDP => 0xffff, // 0 means "no checksum" in UDP
        sum => sum,
    };
    transport[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Source, destination, protocol and what follows the IP header.
fn split(packet: &[u8]) -> Option<(IpAddr, IpAddr, u8, &[u8])> {
    match packet.first()? >> 4 {
        4 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some((src.into(), dst.into(), packet[9], packet.get(header_len..)?))
        }
        6 => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some((src.into(), dst.into(), packet[6], packet.get(40..)?))
        }
        _ => None,
    }
}

fn ports(transport: &[u8]) -> Option<(u16, u16)> {
    Some((
        u16::from_be_bytes(transport.get(0..2)?.try_into().ok()?),
        u16::from_be_bytes(transport.get(2..4)?.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIRS: [(&str, &str); 2] = [
        ("198.18.0.2:40000", "198.18.0.1:53"),
        ("[2001:db8::2]:40000", "[2001:db8::1]:53"),
    ];

    fn pair((src, dst): (&str, &str)) -> (SocketAddr, SocketAddr) {
        (src.parse().unwrap(), dst.parse().unwrap())
    }

    #[test]
    fn udp_datagrams_and_tcp_segments_parse_back() {
        for addresses in PAIRS {
            let (src, dst) = pair(addresses);
            let datagram = udp(src, dst, b"hello");
            assert_eq!(parse_udp(&datagram), Some((src, dst, &b"hello"[..])));
            assert_eq!(parse_tcp(&datagram), None);
            let segment = Segment {
                seq: 7,
                ack: 9,
                flags: SYN | ACK,
            };
            let packet = tcp(src, dst, segment);
            assert_eq!(parse_tcp(&packet), Some((src, dst, segment)));
            assert!(segment.is_syn_ack() && !Segment::syn(1).is_syn_ack());
            assert_eq!(parse_udp(&packet), None);
        }
    }

    /// A receiver sums header (IPv4) and pseudo-header with the transport, checksum included,
    /// and must get 0.
    #[test]
    fn built_packets_have_valid_transport_checksums_and_a_flipped_bit_breaks_them() {
        for addresses in PAIRS {
            let (src, dst) = pair(addresses);
            let mut datagram = udp(src, dst, b"hello");
            assert!(transport_checksum_valid(&datagram));
            let last = datagram.len() - 1;
            datagram[last] ^= 1;
            assert!(!transport_checksum_valid(&datagram));
        }
    }

    #[test]
    fn checksums_verify() {
        // RFC 1071's example: the words 0001 f203 f4f5 f6f7 sum to ddf2, complemented 220d.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            0x220d
        );
        let (src, dst) = pair(PAIRS[0]);
        for packet in [udp(src, dst, b"odd"), tcp(src, dst, Segment::syn(42))] {
            assert_eq!(checksum(&[&packet[..20]]), 0, "the IPv4 header");
            let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
                unreachable!()
            };
            let transport = &packet[20..];
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend_from_slice(&[0, packet[9]]);
            pseudo.extend_from_slice(&u16::try_from(transport.len()).unwrap().to_be_bytes());
            assert_eq!(checksum(&[&pseudo, transport]), 0, "protocol {}", packet[9]);
        }
    }
}
