//! ICMP "communication administratively prohibited", which the client writes back to an
//! application whose packet policy refused, so that its connect fails at once instead of
//! timing out.

use std::net::IpAddr;

use crate::packet::Packet;

/// IPv6's minimum MTU: an ICMPv6 error carries as much of the offending packet as fits in it.
const IPV6_MIN_MTU: usize = 1280;

/// The error for `original` (an IPv4 or IPv6 packet the application sent), from the address
/// it was sent to; `None` for what must not get an error (unreadable packets, ICMP errors).
pub fn prohibited(original: &[u8]) -> Option<Vec<u8>> {
    let packet = Packet::parse(original).ok()?;
    if let crate::packet::Transport::Icmp { kind } = packet.transport
        && is_error(kind, packet.source.is_ipv4())
    {
        // Never answer an error with an error (RFC 1122, RFC 4443).
        return None;
    }
    match (packet.source, packet.destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let header_len = usize::from(original.first()? & 0x0f) * 4;
            let quoted = original.get(..(header_len + 8).min(original.len()))?;
            let mut icmp = vec![3, 13, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(quoted);
            let checksum = fold(&icmp, 0);
            icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
            let total = u16::try_from(20 + icmp.len()).ok()?;
            let mut out = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
            out[2..4].copy_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&destination.octets());
            out.extend_from_slice(&source.octets());
            let header_checksum = fold(&out, 0);
            out[10..12].copy_from_slice(&header_checksum.to_be_bytes());
            out.extend_from_slice(&icmp);
            Some(out)
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            let room = IPV6_MIN_MTU - 40 - 8;
            let quoted = original.get(..room.min(original.len()))?;
            let mut icmp = vec![1, 1, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(quoted);
            let length = u32::try_from(icmp.len()).ok()?;
            // The pseudo-header: addresses, length, next header (58).
            let mut pseudo = 0u32;
            for chunk in destination
                .octets()
                .chunks(2)
                .chain(source.octets().chunks(2))
            {
                pseudo += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
            }
            pseudo += (length >> 16) + (length & 0xffff) + 58;
            let checksum = fold(&icmp, pseudo);
            icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
            let mut out = vec![0x60, 0, 0, 0];
            out.extend_from_slice(&u16::try_from(icmp.len()).ok()?.to_be_bytes());
            out.extend_from_slice(&[58, 64]);
            out.extend_from_slice(&destination.octets());
            out.extend_from_slice(&source.octets());
            out.extend_from_slice(&icmp);
            Some(out)
        }
        _ => None,
    }
}

/// ICMPv4 types 3, 4, 5, 11, 12 and ICMPv6 types below 128 are errors.
fn is_error(kind: u8, v4: bool) -> bool {
    if v4 {
        matches!(kind, 3 | 4 | 5 | 11 | 12)
    } else {
        kind < 128
    }
}

/// The one's-complement checksum of `data` on top of `initial`.
fn fold(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [high, low] => u16::from_be_bytes([*high, *low]),
            [high] => u16::from_be_bytes([*high, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_error_goes_back_from_the_destination_with_valid_checksums() {
        let original = build::ip(
            ip("100.64.0.2"),
            ip("10.0.5.10"),
            6,
            &build::ports(40000, 22),
        );
        let error = prohibited(&original).unwrap();
        let parsed = Packet::parse(&error).unwrap();
        assert_eq!(
            (parsed.source, parsed.destination),
            (ip("10.0.5.10"), ip("100.64.0.2"))
        );
        assert_eq!(&error[20..22], &[3, 13]);
        assert_eq!(fold(&error[..20], 0), 0, "the IPv4 header checksum");
        assert_eq!(fold(&error[20..], 0), 0, "the ICMP checksum");
        assert_eq!(
            &error[28..],
            &original[..28],
            "quotes the header and 8 bytes"
        );

        let original = build::ip(ip("fd00:2021:1111::2"), ip("fd00::10"), 17, &vec![0; 2000]);
        let error = prohibited(&original).unwrap();
        assert_eq!(error.len(), IPV6_MIN_MTU);
        let parsed = Packet::parse(&error).unwrap();
        assert_eq!(
            (parsed.source, parsed.destination),
            (ip("fd00::10"), ip("fd00:2021:1111::2"))
        );
        assert_eq!(&error[40..42], &[1, 1]);
        // The ICMPv6 checksum covers the pseudo-header: addresses, length, next header.
        let mut pseudo = 0u32;
        for chunk in error[8..40].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        }
        pseudo += (error.len() - 40) as u32 + 58;
        assert_eq!(fold(&error[40..], pseudo), 0, "the ICMPv6 checksum");
    }

    #[test]
    fn errors_and_junk_get_no_error() {
        let icmp_error = build::ip(
            ip("100.64.0.2"),
            ip("10.0.5.10"),
            1,
            &[3, 1, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(prohibited(&icmp_error), None);
        let echo = build::ip(
            ip("100.64.0.2"),
            ip("10.0.5.10"),
            1,
            &[8, 0, 0, 0, 0, 1, 0, 1],
        );
        assert!(prohibited(&echo).is_some());
        assert_eq!(prohibited(&[0x45, 0, 0]), None);
        assert_eq!(prohibited(&[]), None);
    }
}
