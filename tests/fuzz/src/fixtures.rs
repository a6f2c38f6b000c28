//! The fixed world the targets run in: the portal's signing key, the gateway's key and id,
//! the client devices, the clock, and grants as the portal writes them. Fixed, so that an
//! input found once means the same thing in every later run (and the signed grants in
//! `corpus/grant` keep verifying).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use fz_proto::{
    ClientPeer, DnsMapping, GatewayPeer, Grant, GrantedResource, PortalPublicKey, PortalSigningKey,
    PresharedKey, PublicKey, UnixTime,
};

/// The wall clock when a gateway starts: 2027-01-15.
pub const START_UNIX: UnixTime = 1_800_000_000;
/// The gateway's id, as the portal's `ready` names it.
pub const GATEWAY_ID: &str = "gw-1";
/// The gateway's WireGuard private key.
pub const GATEWAY_SECRET: [u8; 32] = [9; 32];
/// The portal's Ed25519 seed.
const PORTAL_SEED: [u8; 32] = [7; 32];
/// How long the fixed grants last.
pub const LIFETIME: u64 = 3600;

// Keys are derived once per process: every input needs them, and the curve arithmetic would
// otherwise be most of an input's cost.

pub fn portal() -> &'static PortalSigningKey {
    static KEY: OnceLock<PortalSigningKey> = OnceLock::new();
    KEY.get_or_init(|| PortalSigningKey::from_seed(PORTAL_SEED))
}

pub fn portal_key() -> PortalPublicKey {
    static KEY: OnceLock<PortalPublicKey> = OnceLock::new();
    *KEY.get_or_init(|| portal().public_key())
}

pub fn gateway_key() -> PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    *KEY.get_or_init(|| public_key(GATEWAY_SECRET))
}

fn public_key(secret: [u8; 32]) -> PublicKey {
    PublicKey(X25519Public::from(&StaticSecret::from(secret)).to_bytes())
}

/// A client device as grants name it: its WireGuard keys, where it sends from, its tunnel
/// addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: String,
    pub secret: [u8; 32],
    public_key: PublicKey,
    pub preshared_key: [u8; 32],
    pub address: SocketAddr,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl DeviceSpec {
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }
}

/// The two devices, `client-1` and `client-2`.
pub fn devices() -> [DeviceSpec; 2] {
    static DEVICES: OnceLock<[DeviceSpec; 2]> = OnceLock::new();
    DEVICES
        .get_or_init(|| {
            [1u8, 2].map(|n| DeviceSpec {
                id: format!("client-{n}"),
                secret: [n; 32],
                public_key: public_key([n; 32]),
                preshared_key: [n.wrapping_add(100); 32],
                address: SocketAddr::from(([198, 51, 100, n], 40000)),
                v4: Ipv4Addr::new(100, 64, 0, n),
                v6: Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0, 0, 0, 0, u16::from(n)),
            })
        })
        .clone()
}

/// A grant the portal would sign for `device` through this gateway, in force from
/// [`START_UNIX`] for [`LIFETIME`].
pub fn grant(
    device: &DeviceSpec,
    id: &str,
    address: &str,
    filter: &[&str],
    except: &[&str],
    dns: Option<(&str, &[&str])>,
) -> Grant {
    Grant {
        id: id.to_owned(),
        account: "acme".to_owned(),
        client: ClientPeer {
            id: device.id.clone(),
            public_key: device.public_key(),
            tunnel_ipv4: device.v4,
            tunnel_ipv6: device.v6,
            endpoints: vec![device.address],
        },
        gateway: GatewayPeer {
            id: GATEWAY_ID.to_owned(),
            public_key: gateway_key(),
            endpoints: vec![SocketAddr::from(([203, 0, 113, 1], 51820))],
        },
        preshared_key: PresharedKey(device.preshared_key),
        resource: GrantedResource {
            id: format!("resource-{id}"),
            address: address.to_owned(),
            filter: (!filter.is_empty()).then(|| filter.iter().map(|f| (*f).to_owned()).collect()),
            except: except.iter().map(|e| (*e).to_owned()).collect(),
            dns: dns.map(|(name, mapped)| DnsMapping {
                name: name.to_owned(),
                mapped: mapped
                    .iter()
                    .filter_map(|m| m.parse::<IpAddr>().ok())
                    .collect(),
            }),
        },
        rule: "rule".to_owned(),
        bundle_hash: "sha256:00".to_owned(),
        issued_at: START_UNIX,
        expires_at: START_UNIX + LIFETIME,
    }
}

/// The grants `gateway_path` starts with, and the seeds of `grant`: client 1 reaches a
/// database network on two ports and a DNS resource; client 2 reaches the internet less
/// private networks, and an IPv6 network.
pub fn standard_grants() -> Vec<Grant> {
    let [one, two] = devices();
    vec![
        grant(
            &one,
            "g-db",
            "10.0.5.0/24",
            &["tcp/5432", "icmp"],
            &[],
            None,
        ),
        grant(
            &one,
            "g-gitlab",
            "gitlab.company.com",
            &["tcp/443", "udp/8000-8100", "icmp"],
            &[],
            Some((
                "gitlab.company.com",
                &["100.96.0.1", "fd00:2021:1111:8000::1"],
            )),
        ),
        grant(
            &two,
            "g-web",
            "internet",
            &[],
            &["10.0.0.0/8", "8.8.4.0/24"],
            None,
        ),
        grant(&two, "g-v6", "2001:db8::/64", &["udp/53"], &[], None),
    ]
}

/// What the DNS resource names of [`standard_grants`] resolve to at the site.
pub const STANDARD_REAL: [&str; 3] = ["172.16.0.5", "172.16.0.6", "2001:db8:5::5"];
