//! The gateway's TUN device: one IP packet per read and per write, no packet-information
//! header, driven by tokio.
//!
//! Decrypted packets from clients are written here and the kernel forwards them to resources;
//! the kernel routes the resources' replies (to client tunnel addresses, [`CLIENT_TUNNEL_V4`]
//! and [`CLIENT_TUNNEL_V6`]) back here, where the core reads, checks and encrypts them. The
//! ioctls are `tun-rs`'s (this workspace forbids `unsafe`); addresses and routes are set with
//! iproute2's `ip`, which is on every Linux gateway and whose errors are readable.
//!
//! The device is not persistent: closing it (dropping [`Tun`]) makes the kernel delete the
//! link with its addresses and routes, so a crash leaves nothing behind.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
            .enable(true)
            .build_async()
            .map_err(create_error)?;
        tracing::info!(tun = name, mtu, "TUN device up");
        Ok(Self {
            name: name.to_owned(),
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

    /// Waits for the next IP packet the kernel sends into the device and copies it into `buf`,
    /// returning its length. `buf` should hold the MTU; a longer packet is cut short.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, PlatformError> {
        let len = self
            .device
            .recv(buf)
            .await
            .map_err(|source| self.io_error("read from", source))?;
        tracing::trace!(tun = %self.name, len, "packet read");
        Ok(len)
    }

    /// Hands one whole IP packet to the kernel, as if it had arrived on the device.
    pub async fn send(&self, packet: &[u8]) -> Result<(), PlatformError> {
        let written = self
            .device
            .send(packet)
            .await
            .map_err(|source| self.io_error("write to", source))?;
        // A TUN write takes the whole packet or fails; a short count would be a kernel bug,
        // but a cut packet must not pass silently.
        if written != packet.len() {
            return Err(self.io_error(
                "write a whole packet to",
                std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("wrote {written} of {} bytes", packet.len()),
                ),
            ));
        }
        tracing::trace!(tun = %self.name, len = written, "packet written");
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
