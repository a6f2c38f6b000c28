//! The gateway's NAT for DNS resources: a client sends to a mapped address its DNS stub handed
//! out; the gateway sends the packet on to one of the real addresses the name resolved to, and
//! writes the mapped address back into the replies.
//!
//! State is per flow (client address, mapped address, protocol, client port or ICMP
//! identifier), so two resources on one real IP stay apart: a reply belongs to the flow whose
//! real address, protocol and ports it answers, and goes back with that flow's mapped address.
//! Real addresses are taken round robin per mapped address. Flows expire after an idle time
//! (TCP 2 h, UDP 2 min, ICMP 30 s); time comes in as milliseconds from any fixed start.
//!
//! Checksums are updated incrementally (RFC 1624) for the IPv4 header and for TCP, UDP and
//! ICMPv6, whose checksums cover the addresses.

use std::collections::HashMap;
use std::net::IpAddr;

use foldhash::fast::RandomState;

/// Milliseconds since an arbitrary start, as the driver's clock reads.
pub type Millis = u64;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// The most flows one NAT (one client) keeps: enough for any real workload, and a bound on
/// what a client can make the gateway remember.
pub const MAX_FLOWS: usize = 65_536;

/// How long a flow lives without packets.
pub fn idle_timeout(protocol: u8) -> Millis {
    match protocol {
        TCP => 2 * 60 * 60 * 1000,
        UDP => 2 * 60 * 1000,
        _ => 30 * 1000,
    }
}

/// One side of a flow as the NAT keys it: address, protocol, and the port (TCP, UDP) or
/// identifier (ICMP echo) that tells flows between the same addresses apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    client: IpAddr,
    client_port: u16,
    protocol: u8,
    /// The mapped address (outbound key) or the real address (reply key).
    peer: IpAddr,
    peer_port: u16,
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    mapped: IpAddr,
    real: IpAddr,
    last_seen: Millis,
}

/// Why a packet could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    #[error("the packet is not an IP packet the NAT reads")]
    Malformed,
    #[error("the mapped address has no real address of the packet's family")]
    Unresolved,
    #[error("no flow of this NAT answers to the packet")]
    NoFlow,
    #[error("the client has as many flows as one client may")]
    Full,
}

/// The NAT of one gateway.
#[derive(Debug, Default)]
pub struct Nat {
    /// Real addresses per mapped address, and where the round robin stands.
    targets: HashMap<IpAddr, (Vec<IpAddr>, usize), RandomState>,
    outbound: HashMap<FlowKey, Flow, RandomState>,
    replies: HashMap<FlowKey, FlowKey, RandomState>,
}

impl Nat {
    /// Sets what a mapped address stands for (what the name resolved to). Flows already
    /// running keep their real address.
    pub fn set_targets(&mut self, mapped: IpAddr, real: Vec<IpAddr>) {
        self.targets.insert(mapped, (real, 0));
    }

    /// Forgets a mapped address and every flow to it (its grant ended).
    pub fn remove_mapped(&mut self, mapped: IpAddr) {
        self.targets.remove(&mapped);
        self.outbound.retain(|key, _| key.peer != mapped);
        let outbound = &self.outbound;
        self.replies.retain(|_, key| outbound.contains_key(key));
    }

    /// Rewrites a client's packet to a mapped address so it goes to a real address.
    pub fn outbound(&mut self, packet: &mut [u8], now: Millis) -> Result<IpAddr, NatError> {
        let view = View::read(packet).ok_or(NatError::Malformed)?;
        let key = FlowKey {
            client: view.source,
            client_port: view.source_port,
            protocol: view.protocol,
            peer: view.destination,
            peer_port: view.destination_port,
        };
        let real = match self.outbound.get_mut(&key) {
            Some(flow) if now.saturating_sub(flow.last_seen) < idle_timeout(key.protocol) => {
                flow.last_seen = now;
                flow.real
            }
            stale => {
                if let Some(old) = stale {
                    // An idle flow comes back: its old real address answers it no more.
                    let old_reply = FlowKey {
                        peer: old.real,
                        ..key
                    };
                    self.replies.remove(&old_reply);
                } else if self.outbound.len() >= MAX_FLOWS {
                    self.expire(now);
                    if self.outbound.len() >= MAX_FLOWS {
                        return Err(NatError::Full);
                    }
                }
                let (reals, next) = self
                    .targets
                    .get_mut(&view.destination)
                    .ok_or(NatError::Unresolved)?;
                let family: Vec<IpAddr> = reals
                    .iter()
                    .copied()
                    .filter(|ip| ip.is_ipv4() == view.destination.is_ipv4())
                    .collect();
                let real = *family
                    .get(*next % family.len().max(1))
                    .ok_or(NatError::Unresolved)?;
                *next = next.wrapping_add(1);
                self.outbound.insert(
                    key,
                    Flow {
                        mapped: view.destination,
                        real,
                        last_seen: now,
                    },
                );
                self.replies.insert(FlowKey { peer: real, ..key }, key);
                real
            }
        };
        rewrite(packet, &view, Side::Destination, real);
        Ok(real)
    }

    /// Rewrites a reply from a real address so it comes from the mapped address the client
    /// sent to.
    pub fn reply(&mut self, packet: &mut [u8], now: Millis) -> Result<IpAddr, NatError> {
        let view = View::read(packet).ok_or(NatError::Malformed)?;
        let key = FlowKey {
            client: view.destination,
            client_port: view.destination_port,
            protocol: view.protocol,
            peer: view.source,
            peer_port: view.source_port,
        };
        let outbound_key = *self.replies.get(&key).ok_or(NatError::NoFlow)?;
        let flow = self
            .outbound
            .get_mut(&outbound_key)
            .ok_or(NatError::NoFlow)?;
        if now.saturating_sub(flow.last_seen) >= idle_timeout(key.protocol)
            || flow.real != view.source
        {
            return Err(NatError::NoFlow);
        }
        flow.last_seen = now;
        let mapped = flow.mapped;
        rewrite(packet, &view, Side::Source, mapped);
        Ok(mapped)
    }

    /// Drops flows idle past their timeout.
    pub fn expire(&mut self, now: Millis) {
        self.outbound
            .retain(|key, flow| now.saturating_sub(flow.last_seen) < idle_timeout(key.protocol));
        let outbound = &self.outbound;
        self.replies.retain(|_, key| outbound.contains_key(key));
    }

    pub fn flows(&self) -> usize {
        self.outbound.len()
    }
}

/// Where the fields the NAT reads and writes are.
struct View {
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    /// Offset of the transport header.
    transport: usize,
    /// TCP/UDP ports; for ICMP echo, the identifier in both.
    source_port: u16,
    destination_port: u16,
}

impl View {
    /// Only unfragmented packets without IPv6 extension headers: what flows through a tunnel
    /// to a resource. Anything else is `None`.
    fn read(packet: &[u8]) -> Option<View> {
        let first = *packet.first()?;
        let (source, destination, protocol, transport) = match first >> 4 {
            4 => {
                let header_len = usize::from(first & 0x0f) * 4;
                let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x3fff;
                if header_len < 20 || fragment != 0 {
                    return None;
                }
                let address = |at: usize| -> Option<IpAddr> {
                    let octets: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
                    Some(IpAddr::from(octets))
                };
                (address(12)?, address(16)?, *packet.get(9)?, header_len)
            }
            6 => {
                let address = |at: usize| -> Option<IpAddr> {
                    let octets: [u8; 16] = packet.get(at..at + 16)?.try_into().ok()?;
                    Some(IpAddr::from(octets))
                };
                (address(8)?, address(24)?, *packet.get(6)?, 40)
            }
            _ => return None,
        };
        let word = |at: usize| -> Option<u16> {
            Some(u16::from_be_bytes([
                *packet.get(transport + at)?,
                *packet.get(transport + at + 1)?,
            ]))
        };
        let (source_port, destination_port) = match protocol {
            TCP | UDP => (word(0)?, word(2)?),
            // Echo request and reply (ICMP 8/0, ICMPv6 128/129): the identifier names the flow.
            ICMP | ICMPV6 => {
                let id = word(4)?;
                (id, id)
            }
            _ => return None,
        };
        Some(View {
            source,
            destination,
            protocol,
            transport,
            source_port,
            destination_port,
        })
    }
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Writes `new` as the packet's source or destination and updates the checksums that cover it.
fn rewrite(packet: &mut [u8], view: &View, side: Side, new: IpAddr) {
    let (old, at) = match (side, new) {
        (Side::Source, IpAddr::V4(_)) => (view.source, 12),
        (Side::Destination, IpAddr::V4(_)) => (view.destination, 16),
        (Side::Source, IpAddr::V6(_)) => (view.source, 8),
        (Side::Destination, IpAddr::V6(_)) => (view.destination, 24),
    };
    // The addresses as bytes, on the stack: this runs for every translated packet.
    let mut old_buffer = [0u8; 16];
    let mut new_buffer = [0u8; 16];
    let length = match (old, new) {
        (IpAddr::V4(o), IpAddr::V4(n)) => {
            old_buffer[..4].copy_from_slice(&o.octets());
            new_buffer[..4].copy_from_slice(&n.octets());
            4
        }
        (IpAddr::V6(o), IpAddr::V6(n)) => {
            old_buffer = o.octets();
            new_buffer = n.octets();
            16
        }
        // Families never change: targets are chosen within the packet's family.
        _ => return,
    };
    let (old_bytes, new_bytes) = (&old_buffer[..length], &new_buffer[..length]);
    if let Some(field) = packet.get_mut(at..at + length) {
        field.copy_from_slice(new_bytes);
    }
    if new.is_ipv4() {
        update_checksum(packet, 10, old_bytes, new_bytes);
    }
    let checksum_at = match view.protocol {
        TCP => Some(16),
        // A UDP checksum of zero (IPv4 only) means "none": leave it.
        UDP if new.is_ipv6() || checksum(packet, view.transport + 6) != 0 => Some(6),
        ICMPV6 => Some(2),
        _ => None,
    };
    if let Some(offset) = checksum_at {
        update_checksum(packet, view.transport + offset, old_bytes, new_bytes);
    }
    // For UDP a computed checksum of zero is sent as all ones (RFC 768): zero would mean "no
    // checksum" over IPv4 and is invalid over IPv6 (RFC 8200, 8.1), where the receiver drops it.
    if view.protocol == UDP
        && checksum_at.is_some()
        && let Some(field) = packet.get_mut(view.transport + 6..view.transport + 8)
        && field == [0, 0]
    {
        field.copy_from_slice(&[0xff, 0xff]);
    }
}

fn checksum(packet: &[u8], at: usize) -> u16 {
    match (packet.get(at), packet.get(at + 1)) {
        (Some(a), Some(b)) => u16::from_be_bytes([*a, *b]),
        _ => 0,
    }
}

/// RFC 1624: HC' = ~(~HC + ~m + m'), summed over the 16-bit words that changed.
fn update_checksum(packet: &mut [u8], at: usize, old: &[u8], new: &[u8]) {
    let Some([high, low]) = packet.get_mut(at..at + 2) else {
        return;
    };
    let word = |c: &[u8]| match c {
        [a, b] => u16::from_be_bytes([*a, *b]),
        [a] => u16::from_be_bytes([*a, 0]),
        _ => 0,
    };
    let mut sum = u32::from(!u16::from_be_bytes([*high, *low]));
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        sum += u32::from(!word(o)) + u32::from(word(n));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let [h, l] = (!(sum as u16)).to_be_bytes();
    *high = h;
    *low = l;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// The one's-complement checksum of `data` plus `initial`.
    fn fold(data: &[u8], initial: u32) -> u16 {
        let mut sum = initial;
        for chunk in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A TCP/UDP packet with correct IPv4 header and transport checksums.
    fn packet(source: &str, destination: &str, protocol: u8, ports: (u16, u16)) -> Vec<u8> {
        let mut bytes = build::ip(
            ip(source),
            ip(destination),
            protocol,
            &build::ports(ports.0, ports.1),
        );
        fix_checksums(&mut bytes);
        bytes
    }

    fn pseudo_header(bytes: &[u8]) -> u32 {
        let v4 = bytes[0] >> 4 == 4;
        let (addresses, protocol, transport) = if v4 {
            (&bytes[12..20], bytes[9], 20)
        } else {
            (&bytes[8..40], bytes[6], 40)
        };
        let length = (bytes.len() - transport) as u32;
        let mut sum = 0u32;
        for chunk in addresses.chunks(2) {
            sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        }
        sum + u32::from(protocol) + length
    }

    fn fix_checksums(bytes: &mut [u8]) {
        let v4 = bytes[0] >> 4 == 4;
        let transport = if v4 { 20 } else { 40 };
        let protocol = if v4 { bytes[9] } else { bytes[6] };
        if v4 {
            bytes[10..12].copy_from_slice(&[0, 0]);
            let sum = fold(&bytes[..20], 0);
            bytes[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let offset = if protocol == TCP { 16 } else { 6 };
        bytes[transport + offset..transport + offset + 2].copy_from_slice(&[0, 0]);
        let sum = fold(&bytes[transport..], pseudo_header(bytes));
        bytes[transport + offset..transport + offset + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// Whether the packet's checksums verify.
    fn valid(bytes: &[u8]) -> bool {
        let v4 = bytes[0] >> 4 == 4;
        let transport = if v4 { 20 } else { 40 };
        let header_ok = !v4 || fold(&bytes[..20], 0) == 0;
        header_ok && fold(&bytes[transport..], pseudo_header(bytes)) == 0
    }

    #[test]
    fn a_flow_goes_to_a_real_address_and_its_replies_come_back_mapped() {
        let mut nat = Nat::default();
        nat.set_targets(ip("100.96.0.1"), vec![ip("172.16.0.5"), ip("2001:db8::5")]);
        let mut out = packet("100.64.0.2", "100.96.0.1", TCP, (40000, 443));
        assert_eq!(nat.outbound(&mut out, 0), Ok(ip("172.16.0.5")));
        assert!(valid(&out), "checksums after rewriting the destination");
        assert_eq!(
            crate::packet::Packet::parse(&out).unwrap().destination,
            ip("172.16.0.5")
        );

        let mut back = packet("172.16.0.5", "100.64.0.2", TCP, (443, 40000));
        assert_eq!(nat.reply(&mut back, 10), Ok(ip("100.96.0.1")));
        assert!(valid(&back));
        assert_eq!(
            crate::packet::Packet::parse(&back).unwrap().source,
            ip("100.96.0.1")
        );
        // A reply no flow asked for is not translated.
        let mut stray = packet("172.16.0.5", "100.64.0.2", TCP, (443, 40001));
        assert_eq!(nat.reply(&mut stray, 10), Err(NatError::NoFlow));
    }

    #[test]
    fn two_resources_on_one_real_address_stay_apart() {
        let mut nat = Nat::default();
        nat.set_targets(ip("100.96.0.1"), vec![ip("172.16.0.5")]); // gitlab
        nat.set_targets(ip("100.96.0.5"), vec![ip("172.16.0.5")]); // jenkins
        let mut gitlab = packet("100.64.0.2", "100.96.0.1", TCP, (40000, 443));
        let mut jenkins = packet("100.64.0.2", "100.96.0.5", TCP, (40001, 443));
        nat.outbound(&mut gitlab, 0).unwrap();
        nat.outbound(&mut jenkins, 0).unwrap();
        let mut gitlab_reply = packet("172.16.0.5", "100.64.0.2", TCP, (443, 40000));
        let mut jenkins_reply = packet("172.16.0.5", "100.64.0.2", TCP, (443, 40001));
        assert_eq!(nat.reply(&mut gitlab_reply, 1), Ok(ip("100.96.0.1")));
        assert_eq!(nat.reply(&mut jenkins_reply, 1), Ok(ip("100.96.0.5")));
        // Forgetting jenkins's mapping leaves gitlab's flow alone.
        nat.remove_mapped(ip("100.96.0.5"));
        let mut jenkins_reply = packet("172.16.0.5", "100.64.0.2", TCP, (443, 40001));
        assert_eq!(nat.reply(&mut jenkins_reply, 2), Err(NatError::NoFlow));
        let mut gitlab_reply = packet("172.16.0.5", "100.64.0.2", TCP, (443, 40000));
        assert_eq!(nat.reply(&mut gitlab_reply, 2), Ok(ip("100.96.0.1")));
    }

    #[test]
    fn real_addresses_are_taken_round_robin_within_the_family() {
        let mut nat = Nat::default();
        nat.set_targets(
            ip("fd00:2021:1111:8000::1"),
            vec![ip("2001:db8::1"), ip("10.0.0.1"), ip("2001:db8::2")],
        );
        let mut seen = Vec::new();
        for port in 1..=4 {
            let mut bytes = packet(
                "fd00:2021:1111::2",
                "fd00:2021:1111:8000::1",
                UDP,
                (port, 53),
            );
            seen.push(nat.outbound(&mut bytes, 0).unwrap());
            assert!(valid(&bytes));
        }
        assert_eq!(
            seen,
            [
                ip("2001:db8::1"),
                ip("2001:db8::2"),
                ip("2001:db8::1"),
                ip("2001:db8::2")
            ]
        );
        // A flow keeps its real address.
        let mut again = packet("fd00:2021:1111::2", "fd00:2021:1111:8000::1", UDP, (1, 53));
        assert_eq!(nat.outbound(&mut again, 1), Ok(ip("2001:db8::1")));
        // An IPv4 packet to an IPv6-only mapping has nowhere to go.
        nat.set_targets(ip("100.96.0.9"), vec![ip("2001:db8::9")]);
        let mut v4 = packet("100.64.0.2", "100.96.0.9", UDP, (1, 53));
        assert_eq!(nat.outbound(&mut v4, 0), Err(NatError::Unresolved));
    }

    #[test]
    fn idle_flows_expire() {
        let mut nat = Nat::default();
        nat.set_targets(ip("100.96.0.1"), vec![ip("172.16.0.5")]);
        let mut out = packet("100.64.0.2", "100.96.0.1", UDP, (5000, 53));
        nat.outbound(&mut out, 0).unwrap();
        let udp_timeout = idle_timeout(UDP);
        let mut reply = packet("172.16.0.5", "100.64.0.2", UDP, (53, 5000));
        assert!(nat.reply(&mut reply, udp_timeout - 1).is_ok());
        nat.expire(2 * udp_timeout);
        assert_eq!(nat.flows(), 0);
        let mut late = packet("172.16.0.5", "100.64.0.2", UDP, (53, 5000));
        assert_eq!(nat.reply(&mut late, 2 * udp_timeout), Err(NatError::NoFlow));
    }

    #[test]
    fn a_translated_udp_checksum_is_never_zero() {
        // Every value of a two-byte payload, so that some reply's checksum after translation
        // is the one a UDP sender writes as all ones; zero would mean "none" over IPv4 and be
        // dropped over IPv6.
        for (mapped, real, client) in [
            ("100.96.0.1", "172.16.0.5", "100.64.0.2"),
            ("fd00:2021:1111:8000::1", "2001:db8::5", "fd00:2021:1111::2"),
        ] {
            let mut nat = Nat::default();
            nat.set_targets(ip(mapped), vec![ip(real)]);
            let mut out = packet(client, mapped, UDP, (5000, 53));
            assert_eq!(nat.outbound(&mut out, 0), Ok(ip(real)));
            let transport = if ip(real).is_ipv4() { 20 } else { 40 };
            for payload in 0..=u16::MAX {
                let mut udp = build::ports(53, 5000);
                udp.extend_from_slice(&payload.to_be_bytes());
                let mut reply = build::ip(ip(real), ip(client), UDP, &udp);
                fix_checksums(&mut reply);
                if checksum(&reply, transport + 6) == 0 {
                    // The sender's own zero: "no checksum" (IPv4), which stays as it is.
                    continue;
                }
                assert_eq!(nat.reply(&mut reply, 0), Ok(ip(mapped)));
                assert_ne!(checksum(&reply, transport + 6), 0, "payload {payload:#06x}");
                assert!(
                    valid(&reply),
                    "payload {payload:#06x}: checksums after translation"
                );
            }
        }
    }

    #[test]
    fn packets_the_nat_cannot_read_are_refused() {
        let mut nat = Nat::default();
        for bytes in [vec![], vec![0x45, 0, 0], vec![0x70; 40]] {
            let mut bytes = bytes;
            assert_eq!(nat.outbound(&mut bytes, 0), Err(NatError::Malformed));
        }
        let mut unknown = packet("100.64.0.2", "100.96.0.77", TCP, (1, 2));
        assert_eq!(nat.outbound(&mut unknown, 0), Err(NatError::Unresolved));
    }

    #[test]
    fn a_client_has_at_most_max_flows_until_some_go_idle() {
        let mut nat = Nat::default();
        nat.set_targets(ip("100.96.0.1"), vec![ip("172.16.0.5")]);
        let mut flows = 0;
        'fill: for protocol in [TCP, UDP] {
            for port in 1..=u16::MAX {
                if flows == MAX_FLOWS {
                    break 'fill;
                }
                let mut out = packet("100.64.0.2", "100.96.0.1", protocol, (port, 443));
                assert!(nat.outbound(&mut out, 0).is_ok());
                flows += 1;
            }
        }
        let mut one_more = packet("100.64.0.2", "100.96.0.1", UDP, (9, 53));
        assert_eq!(nat.outbound(&mut one_more, 1), Err(NatError::Full));
        // Flows already running go on.
        let mut running = packet("100.64.0.2", "100.96.0.1", TCP, (1, 443));
        assert!(nat.outbound(&mut running, 2).is_ok());
        // Once the UDP flows are idle past their timeout, there is room again.
        let later = idle_timeout(UDP) + 1;
        assert!(nat.outbound(&mut one_more, later).is_ok());
        // The one idle UDP flow went; the TCP flows (2 h) stay.
        assert_eq!(nat.flows(), MAX_FLOWS);
    }

    #[test]
    fn a_flow_that_comes_back_after_idling_answers_only_its_new_address() {
        let mut nat = Nat::default();
        nat.set_targets(ip("100.96.0.1"), vec![ip("172.16.0.5"), ip("172.16.0.6")]);
        let mut out = packet("100.64.0.2", "100.96.0.1", UDP, (40000, 53));
        assert_eq!(nat.outbound(&mut out, 0), Ok(ip("172.16.0.5")));
        let later = idle_timeout(UDP) + 1;
        let mut again = packet("100.64.0.2", "100.96.0.1", UDP, (40000, 53));
        assert_eq!(nat.outbound(&mut again, later), Ok(ip("172.16.0.6")));
        let mut from_old = packet("172.16.0.5", "100.64.0.2", UDP, (53, 40000));
        assert_eq!(nat.reply(&mut from_old, later), Err(NatError::NoFlow));
        let mut from_new = packet("172.16.0.6", "100.64.0.2", UDP, (53, 40000));
        assert_eq!(nat.reply(&mut from_new, later), Ok(ip("100.96.0.1")));
    }
}
