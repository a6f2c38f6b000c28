//! The agents' TUN device, with the kernel's offloads, driven by tokio.
//!
//! On the gateway, decrypted packets from clients are written here and the kernel forwards
//! them to resources; the kernel routes the resources' replies (to client tunnel addresses,
//! [`CLIENT_TUNNEL_V4`] and [`CLIENT_TUNNEL_V6`]) back here, where the core reads, checks and
//! encrypts them. On the client, applications' packets to resources are read here and the
//! gateways' answers written.
//!
//! The device speaks the virtio-net header (`IFF_VNET_HDR`) with TCP and UDP segmentation
//! offloads: one read ([`Tun::recv`]) may bring a 64 KiB TCP segment that the kernel left
//! whole, which [`ReadBatch`] splits into the MTU-sized packets it stands for (with their
//! checksums), and one write ([`Tun::send`]) coalesces the packets of a [`WriteBatch`] that
//! continue one TCP or UDP flow back into such a segment (GRO). A bulk transfer then crosses
//! the kernel boundary once per 64 KiB instead of once per packet, as in wireguard-go. The
//! ioctls, the splitting and the coalescing are `tun-rs`'s (this workspace forbids `unsafe`);
//! addresses and routes are set with iproute2's `ip`, which is on every Linux host and whose
//! errors are readable.
//!
//! The device is not persistent: closing it (dropping [`Tun`]) makes the kernel delete the
//! link with its addresses and routes, so a crash leaves nothing behind.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::{PlatformError, run_tool};

/// What WireGuard inside UDP adds to each packet at worst: an IPv6 outer header (40 bytes; 20
/// for IPv4), the UDP header (8) and WireGuard's data header and tag (16 + 16 = 32).
pub const WIREGUARD_OVERHEAD: u16 = 40 + 8 + 32;

/// The TUN MTU for the usual 1500-byte underlay: 1420. See [`mtu_for_underlay`].
pub const DEFAULT_MTU: u16 = mtu_for_underlay(1500);

/// The largest inner packet that still fits the underlay's MTU once WireGuard and UDP wrap it,
/// whichever family the outer packet uses: `underlay_mtu` − [`WIREGUARD_OVERHEAD`]. Callers
/// with a smaller underlay (PPPoE, another tunnel) pass its MTU, or pick an MTU of their own.
///
/// An MTU below 1280 makes the kernel turn IPv6 off on the device (RFC 8200's minimum).
pub const fn mtu_for_underlay(underlay_mtu: u16) -> u16 {
    underlay_mtu.saturating_sub(WIREGUARD_OVERHEAD)
}

/// The IPv4 range clients' tunnel addresses come from: 100.64.0.0/11.
pub const CLIENT_TUNNEL_V4: Cidr = Cidr {
    address: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)),
    len: 11,
};

/// The IPv6 range clients' tunnel addresses come from: fd00:2021:1111::/107.
pub const CLIENT_TUNNEL_V6: Cidr = Cidr {
    address: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0, 0, 0, 0, 0)),
    len: 107,
};

/// An address with a prefix length, such as `198.18.0.1/24` or `fd00:2021:1111::/107`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    address: IpAddr,
    len: u8,
}

impl Cidr {
    /// Fails when `len` is longer than the address (32 bits for IPv4, 128 for IPv6).
    pub fn new(address: IpAddr, len: u8) -> Result<Self, PlatformError> {
        let bits = if address.is_ipv4() { 32 } else { 128 };
        if len > bits {
            return Err(PlatformError::InvalidPrefix { address, len });
        }
        Ok(Self { address, len })
    }

    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The same prefix with the host bits cleared: what a route names.
    pub fn network(&self) -> Self {
        let address = match self.address {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Self {
            address,
            len: self.len,
        }
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match Self::new(ip, self.len) {
            Ok(other) => other.network() == self.network(),
            Err(_) => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.len)
    }
}

/// A TUN device that is up, with the MTU it was made with.
///
/// Reads and writes take `&self`, so one task can read while another writes.
pub struct Tun {
    name: String,
    mtu: u16,
    device: tun_rs::AsyncDevice,
}

impl fmt::Debug for Tun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
}

impl Tun {
    /// Creates the TUN device `name` (e.g. `fz-gw0`) with `mtu` (usually [`DEFAULT_MTU`]) and
    /// brings it up. Must run inside a tokio runtime, which will drive its reads and writes.
    ///
    /// The device is made in the network namespace of the calling thread.
    pub fn create(name: &str, mtu: u16) -> Result<Self, PlatformError> {
        validate_name(name)?;
        let create_error = |source| PlatformError::TunCreate {
            name: name.to_owned(),
            error: source,
        };
        // tun-rs registers the device with tokio's reactor and panics without one.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(create_error(std::io::Error::other(
                "not called inside a tokio runtime",
            )));
        }
        let device = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .packet_information(false)
            .offload(true)
            .enable(true)
            .build_async()
            .map_err(create_error)?;
        tracing::info!(
            tun = name,
            mtu,
            offloads = device.tcp_gso(),
            "TUN device up"
        );
        Ok(Self {
            name: name.to_owned(),
            mtu,
            device,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MTU the kernel has for the device now.
    pub fn mtu(&self) -> Result<u16, PlatformError> {
        self.device
            .mtu()
            .map_err(|source| self.io_error("read the MTU of", source))
    }

    /// Gives the device `address` with its prefix (e.g. `198.18.0.1/24`); the prefix also
    /// routes that network to the device. Adding an address the device already has is not an
    /// error, so a restarted gateway can run the same set-up.
    pub fn add_address(&self, address: Cidr) -> Result<(), PlatformError> {
        let text = address.to_string();
        let family = family_flag(address.address);
        // TUN links are NOARP, so the kernel skips IPv6 duplicate address detection on them
        // anyway; `nodad` says so and makes the address usable at once, never "tentative".
        let mut args = vec![
            family,
            "address",
            "replace",
            text.as_str(),
            "dev",
            &self.name,
        ];
        if address.address.is_ipv6() {
            args.push("nodad");
        }
        run_tool("ip", "iproute2", &args, None)?;
        tracing::debug!(tun = %self.name, %address, "address added");
        Ok(())
    }

    /// Routes `network` (host bits are cleared) to the device. Replacing an existing route to
    /// the same network is not an error.
    pub fn add_route(&self, network: Cidr) -> Result<(), PlatformError> {
        self.route(network, None)
    }

    /// Routes `network` to the device with `source` as the address local programs send from
    /// (the client's tunnel address, not another address the device has).
    pub fn add_route_from(&self, network: Cidr, source: IpAddr) -> Result<(), PlatformError> {
        self.route(network, Some(source))
    }

    fn route(&self, network: Cidr, source: Option<IpAddr>) -> Result<(), PlatformError> {
        let network = network.network();
        let text = network.to_string();
        let family = family_flag(network.address);
        let source_text = source.map(|s| s.to_string());
        let mut args = vec![family, "route", "replace", &text, "dev", &self.name];
        if let Some(source) = &source_text {
            args.extend(["src", source.as_str()]);
        }
        run_tool("ip", "iproute2", &args, None)?;
        tracing::debug!(tun = %self.name, %network, "route added");
        Ok(())
    }

    /// Routes both client tunnel ranges ([`CLIENT_TUNNEL_V4`], [`CLIENT_TUNNEL_V6`]) to the
    /// device, so that the resources' replies to clients come back through it.
    pub fn add_client_routes(&self) -> Result<(), PlatformError> {
        self.add_route(CLIENT_TUNNEL_V4)?;
        self.add_route(CLIENT_TUNNEL_V6)
    }

    /// Room for what one [`Tun::recv`] reads from this device.
    pub fn read_batch(&self) -> ReadBatch {
        let packet = usize::from(self.mtu).max(MIN_PACKET_BUFFER);
        ReadBatch {
            read: vec![0; VIRTIO_NET_HDR_LEN + MAX_READ],
            packets: (0..IDEAL_BATCH_SIZE).map(|_| vec![0; packet]).collect(),
            sizes: vec![0; IDEAL_BATCH_SIZE],
            count: 0,
        }
    }

    /// Waits for what the kernel sends into the device next: one packet, or one segment that
    /// stands for many, split into `batch`. A read the device cannot split (a malformed
    /// virtio header, more segments than the batch holds) is dropped and logged, and the
    /// batch is empty; an error means the device itself failed.
    pub async fn recv(&self, batch: &mut ReadBatch) -> Result<(), PlatformError> {
        batch.count = 0;
        let ReadBatch {
            read,
            packets,
            sizes,
            count,
        } = batch;
        match self.device.recv_multiple(read, packets, sizes, 0).await {
            Ok(read) => *count = read,
            // The kernel's own errors say the device failed; the others are tun-rs refusing
            // what one read held.
            Err(error) if error.raw_os_error().is_some() => {
                return Err(self.io_error("read from", error));
            }
            Err(error) => {
                tracing::debug!(tun = %self.name, %error, "a read from the device was dropped");
            }
        }
        tracing::trace!(tun = %self.name, packets = *count, "read");
        Ok(())
    }

    /// Hands the packets of `batch` to the kernel, as if they had arrived on the device,
    /// coalescing those that continue one flow, and empties the batch. The kernel may refuse
    /// a packet (no route, no buffer); that is logged and the rest still go.
    pub async fn send(&self, batch: &mut WriteBatch) -> Result<(), PlatformError> {
        let WriteBatch {
            packets,
            count,
            gro,
        } = batch;
        let Some(ready) = packets.get_mut(..*count) else {
            return Ok(());
        };
        if ready.is_empty() {
            return Ok(());
        }
        let sent = self
            .device
            .send_multiple(gro, ready, VIRTIO_NET_HDR_LEN)
            .await;
        let packets = std::mem::take(count);
        match sent {
            Ok(bytes) => tracing::trace!(tun = %self.name, packets, bytes, "written"),
            Err(error) if error.raw_os_error() == Some(EBADFD) => {
                return Err(self.io_error("write to", error));
            }
            Err(error) => tracing::debug!(tun = %self.name, %error, "the device refused a packet"),
        }
        Ok(())
    }

    fn io_error(&self, op: &'static str, source: std::io::Error) -> PlatformError {
        PlatformError::TunIo {
            name: self.name.clone(),
            op,
            error: source,
        }
    }
}

/// The error a TUN descriptor gives once its device is gone.
const EBADFD: i32 = nix::errno::Errno::EBADFD as i32;

/// The largest read: a whole segment the kernel left unsplit (IP's 64 KiB).
const MAX_READ: usize = 65_535;

/// What each buffer of a [`WriteBatch`] can grow to without moving: the room tun-rs asks for
/// before it appends a packet to a coalesced segment (a header of room on each side of it).
const WRITE_CAPACITY: usize = 2 * VIRTIO_NET_HDR_LEN + MAX_READ;

/// Each packet's buffer holds at least this much, whatever the MTU.
const MIN_PACKET_BUFFER: usize = 1_500;

/// The packets of one [`Tun::recv`].
pub struct ReadBatch {
    /// The read itself: the virtio-net header and a packet or an unsplit segment.
    read: Vec<u8>,
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl fmt::Debug for ReadBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBatch")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl ReadBatch {
    /// Each packet read, in order; the core may rewrite it in place.
    pub fn packets_mut(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.packets
            .iter_mut()
            .zip(&self.sizes)
            .take(self.count)
            .filter_map(|(packet, size)| packet.get_mut(..*size))
    }
}

/// Packets to hand to the kernel in one [`Tun::send`]: each with room in front for the
/// virtio-net header, coalesced where they continue one flow.
pub struct WriteBatch {
    packets: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
}

impl Default for WriteBatch {
    fn default() -> Self {
        Self {
            packets: Vec::new(),
            count: 0,
            gro: GROTable::new(),
        }
    }
}

impl fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBatch")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl WriteBatch {
    /// Adds a copy of `packet`.
    pub fn push(&mut self, packet: &[u8]) {
        if self.packets.len() == self.count {
            // Coalescing appends the flow's later packets to its first one in place, and only
            // where the buffer already has the room: each gets room for a whole segment. The
            // pages are touched only as far as packets are written.
            self.packets.push(Vec::with_capacity(WRITE_CAPACITY));
        }
        if let Some(buffer) = self.packets.get_mut(self.count) {
            buffer.clear();
            buffer.resize(VIRTIO_NET_HDR_LEN, 0);
            buffer.extend_from_slice(packet);
            self.count += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the batch holds as many packets as one coalescing pass takes well; the
    /// driver sends it then rather than growing it.
    pub fn is_full(&self) -> bool {
        self.count >= IDEAL_BATCH_SIZE
    }
}

/// Linux interface names are at most 15 bytes. We also keep to letters, digits, `-`, `_` and
/// `.`, because the name is written into nftables scripts and `ip` arguments.
pub(crate) fn validate_name(name: &str) -> Result<(), PlatformError> {
    let invalid = |reason| PlatformError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 15 {
        return Err(invalid("it is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("`.` and `..` are not interface names"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "only letters, digits, `-`, `_` and `.` are allowed",
        ));
    }
    Ok(())
}

fn family_flag(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "-4" } else { "-6" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mtu_leaves_room_for_wireguard_over_either_family() {
        assert_eq!(DEFAULT_MTU, 1420);
        assert_eq!(mtu_for_underlay(1500), 1420);
        assert_eq!(mtu_for_underlay(1492), 1412); // PPPoE
        assert_eq!(mtu_for_underlay(60), 0);
    }

    fn cidr(text: &str) -> Cidr {
        let (address, len) = text.split_once('/').unwrap();
        Cidr::new(address.parse().unwrap(), len.parse().unwrap()).unwrap()
    }

    #[test]
    fn network_clears_host_bits() {
        for (given, network) in [
            ("198.18.0.1/24", "198.18.0.0/24"),
            ("100.95.255.255/11", "100.64.0.0/11"),
            ("10.1.2.3/32", "10.1.2.3/32"),
            ("10.1.2.3/0", "0.0.0.0/0"),
            ("fd00:2021:1111::1f:ffff/107", "fd00:2021:1111::/107"),
            ("2001:db8::1/0", "::/0"),
        ] {
            assert_eq!(cidr(given).network().to_string(), network, "{given}");
        }
    }

    #[test]
    fn client_ranges_hold_client_addresses_only() {
        for (ip, inside) in [
            ("100.64.0.2", true),
            ("100.95.255.254", true),
            ("100.96.0.1", false), // mapped addresses for DNS resources
            ("fd00:2021:1111::2", true),
            ("fd00:2021:1111:0:0:0:1f:ffff", true),
            ("fd00:2021:1111:8000::1", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let range = if ip.is_ipv4() {
                CLIENT_TUNNEL_V4
            } else {
                CLIENT_TUNNEL_V6
            };
            assert_eq!(range.contains(ip), inside, "{ip}");
        }
        assert_eq!(CLIENT_TUNNEL_V4.to_string(), "100.64.0.0/11");
        assert_eq!(CLIENT_TUNNEL_V6.to_string(), "fd00:2021:1111::/107");
    }

    #[test]
    fn prefix_lengths_beyond_the_address_are_refused() {
        let error = Cidr::new("10.0.0.1".parse().unwrap(), 33).unwrap_err();
        assert_eq!(error.to_string(), "invalid prefix length 33 for `10.0.0.1`");
        assert!(Cidr::new("::1".parse().unwrap(), 129).is_err());
        assert!(Cidr::new("::1".parse().unwrap(), 128).is_ok());
    }

    /// One TCP segment of a bulk flow from 100.64.0.1:40000 to 10.0.5.10:5432: `index`
    /// of a run, 1368 bytes of data each, with its checksums.
    fn segment(index: u16) -> Vec<u8> {
        use crate::testing::packet::checksum;
        let (src, dst) = ([100, 64, 0, 1], [10, 0, 5, 10]);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5432u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&(u32::from(index) * 1368).to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x10; // ACK
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        tcp.extend_from_slice(&[0x5a; 1368]);
        let length = u16::try_from(tcp.len()).unwrap();
        let pseudo = [&src[..], &dst[..], &[0, 6], &length.to_be_bytes()].concat();
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut packet = vec![0x45, 0];
        packet.extend_from_slice(&(20 + length).to_be_bytes());
        packet.extend_from_slice(&(100 + index).to_be_bytes());
        packet.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
        packet.extend_from_slice(&src);
        packet.extend_from_slice(&dst);
        let sum = checksum(&[&packet]);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        packet.extend_from_slice(&tcp);
        packet
    }

    /// The point of the write batch: consecutive segments of one flow leave as one. tun-rs
    /// appends them to the first in place only where that buffer has the room, so without it
    /// every packet would still be written alone (as it was at first: a fifth of the speed).
    #[test]
    fn a_written_flow_is_coalesced_into_one_segment() {
        let mut batch = WriteBatch::default();
        for index in 0..8 {
            batch.push(&segment(index));
        }
        let WriteBatch {
            packets,
            count,
            gro,
            ..
        } = &mut batch;
        gro.apply_gro(&mut packets[..*count], VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        let lengths: Vec<usize> = packets.iter().map(Vec::len).collect();
        assert_eq!(
            lengths[0],
            VIRTIO_NET_HDR_LEN + 40 + 8 * 1368,
            "{lengths:?}"
        );
    }

    #[test]
    fn creating_outside_a_runtime_is_an_error_not_a_panic() {
        let error = Tun::create("fz-nort0", DEFAULT_MTU).unwrap_err();
        assert_eq!(
            error.to_string(),
            "could not create TUN device `fz-nort0`: not called inside a tokio runtime"
        );
    }

    #[test]
    fn interface_names() {
        for (name, error) in [
            ("fz-gw0", None),
            ("fz_gw.1", None),
            ("abcdefghijklmno", None),
            ("", Some("it is empty")),
            ("abcdefghijklmnop", Some("it is longer than 15 bytes")),
            ("..", Some("`.` and `..` are not interface names")),
            (
                "fz gw",
                Some("only letters, digits, `-`, `_` and `.` are allowed"),
            ),
            (
                "fz\"gw",
                Some("only letters, digits, `-`, `_` and `.` are allowed"),
            ),
            (
                "fz/gw",
                Some("only letters, digits, `-`, `_` and `.` are allowed"),
            ),
        ] {
            let got = validate_name(name).err().map(|e| e.to_string());
            let want = error.map(|reason| format!("invalid interface name `{name}`: {reason}"));
            assert_eq!(got, want, "{name:?}");
        }
    }
}
