//! Signed grants: `grant` reads raw bytes as a `SignedGrant` (the JSON inside the portal's
//! `grant` and `granted` messages), verifies it as the gateway and as each client would, and
//! hands it to a gateway core; `grant_gateway` builds grants of structured random contents,
//! signs them with the portal's key so that they verify, and feeds them to a gateway core
//! among packets, time and the portal's other messages ([`crate::sim`]).
//!
//! Oracles, beside the sim's: a grant that verifies survives its own JSON; one that does not
//! verify is never installed; every grant the portal holds is answered, and a grant whose
//! filter the gateway cannot read is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Result, Unstructured};
use fz_proto::{
    ClientPeer, DnsMapping, GatewayPeer, Grant, GrantedResource, Identity, PortalSigningKey,
    PresharedKey, PublicKey, SignedGrant, UnixTime,
};

use crate::fixtures::{self, DeviceSpec, GATEWAY_ID};
use crate::pick;
use crate::sim::Sim;

/// Resource addresses: every form a bundle writes, and some it never would.
const ADDRESSES: &[&str] = &[
    "10.0.5.0/24",
    "10.0.5.10",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "internet",
    "::/0",
    "fd00::/64",
    "2001:db8::/32",
    "172.16.0.5",
    "100.96.0.0/11",
    "100.64.0.0/10",
    "fd00:2021:1111:8000::/107",
    "gitlab.company.com",
    "*.company.com",
    "**.wiki.company.com",
    "app?.company.com",
    "10.0.5.0/33",
    "10.0.5.1/24",
    "::/129",
    "Internet",
    "",
];

/// Port filters, good and bad.
const FILTERS: &[&str] = &[
    "tcp/443",
    "tcp/22",
    "tcp/5432",
    "udp/53",
    "udp/8000-8100",
    "icmp",
    "tcp/1-65535",
    "tcp/0-0",
    "udp/65535",
    "tcp/9-1",
    "tcp",
    "tcp/",
    "/443",
    "TCP/443",
    "udp/1-",
    "tcp/65536",
    "icmp/8",
];

/// Carve-outs, good and bad.
const EXCEPT: &[&str] = &[
    "10.0.5.0/24",
    "10.0.5.10",
    "10.9.0.0/16",
    "0.0.0.0/0",
    "::/0",
    "192.168.0.0/16",
    "8.8.8.0/24",
    "2001:db8::/32",
    "10.0.0.0/33",
    "gitlab.company.com",
    "internet",
];

/// Names of DNS resources.
const NAMES: &[&str] = &[
    "gitlab.company.com",
    "wiki.company.com",
    "a.wiki.company.com",
    "GitLab.Company.com",
    "gitlab.company.com.",
    "x",
];

/// Mapped addresses, and some that are not.
const MAPPED: &[&str] = &[
    "100.96.0.1",
    "100.96.0.2",
    "100.127.255.254",
    "fd00:2021:1111:8000::1",
    "fd00:2021:1111:8000::2",
    "100.95.255.255",
    "100.128.0.1",
    "10.0.5.10",
];

/// The `grant` target.
pub fn grant(data: &[u8]) {
    let Ok(signed) = serde_json::from_slice::<SignedGrant>(data) else {
        return;
    };
    let portal = fixtures::portal_key();
    let now = fixtures::START_UNIX + 10;
    let gateway = Identity::Gateway {
        id: GATEWAY_ID.to_owned(),
        public_key: fixtures::gateway_key(),
    };
    let verified = signed.verify(&portal, &gateway, now).is_ok();
    for device in fixtures::devices() {
        let client = Identity::Client {
            id: device.id.clone(),
            public_key: device.public_key(),
        };
        let _ = signed.verify(&portal, &client, now);
    }
    if verified {
        // What the portal signed reads back as itself from the JSON it travels in.
        let json = serde_json::to_vec(&signed).unwrap_or_default();
        let back = serde_json::from_slice::<SignedGrant>(&json);
        assert_eq!(back.as_ref().ok(), Some(&signed), "a verified grant's JSON");
    }

    let mut sim = Sim::new();
    sim.portal_grant(signed);
    sim.finish();
}

/// The `grant_gateway` target.
pub fn grant_gateway(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut sim = Sim::new();
    // Running out of input only ends the run.
    let _ = sim.run(&mut u, true);
    sim.finish();
}

/// A grant of random contents, signed by the portal: for one of `devices` (mostly exactly
/// as the portal knows it), addressed to this gateway (mostly), with resource, filter,
/// carve-outs and DNS mapping from lists of good and bad values, in force around `now`.
/// One in sixteen is tampered with after signing, or signed with another key.
pub(crate) fn arbitrary_signed(
    u: &mut Unstructured<'_>,
    id: String,
    devices: &[DeviceSpec],
    now: UnixTime,
) -> Result<SignedGrant> {
    let device = u.choose(devices)?;
    let other = u.choose(devices)?;
    let mut client = ClientPeer {
        id: device.id.clone(),
        public_key: device.public_key(),
        tunnel_ipv4: device.v4,
        tunnel_ipv6: device.v6,
        endpoints: vec![device.address],
    };
    let mut preshared_key = PresharedKey(device.preshared_key);
    if u.ratio(1u8, 8)? {
        // Someone else's key, addresses or preshared key.
        match u.int_in_range(0u8..=3)? {
            0 => client.public_key = other.public_key(),
            1 => client.tunnel_ipv4 = other.v4,
            2 => client.tunnel_ipv6 = Ipv6Addr::from(u.arbitrary::<u128>()?),
            _ => preshared_key = PresharedKey(u.arbitrary()?),
        }
    }
    let mut gateway = GatewayPeer {
        id: GATEWAY_ID.to_owned(),
        public_key: fixtures::gateway_key(),
        endpoints: vec![SocketAddr::from(([203, 0, 113, 1], 51820))],
    };
    if u.ratio(1u8, 16)? {
        if u.arbitrary()? {
            gateway.id = pick::text(u, &["gw-2", "GW-1", ""])?;
        } else {
            gateway.public_key = PublicKey(u.arbitrary()?);
        }
    }
    let address = pick::text(u, ADDRESSES)?;
    let filter = if u.ratio(1u8, 3)? {
        None
    } else {
        Some(pick::texts(u, FILTERS, 4)?)
    };
    let except = if u.ratio(2u8, 3)? {
        Vec::new()
    } else {
        pick::texts(u, EXCEPT, 3)?
    };
    let looks_like_a_name = address.contains('.') && !address.contains('/');
    let dns = if looks_like_a_name == u.ratio(7u8, 8)? {
        let name = pick::text(u, NAMES)?;
        let count = u.int_in_range(0..=9)?;
        let mapped = pick::ips(MAPPED);
        let mapped = (0..count)
            .map(|_| pick::address(u, &mapped))
            .collect::<Result<Vec<IpAddr>>>()?;
        Some(DnsMapping { name, mapped })
    } else {
        None
    };
    let (issued_at, expires_at) = match u.int_in_range(0u8..=7)? {
        0 => (u.arbitrary()?, u.arbitrary()?),
        1 => (now.saturating_add(u.int_in_range(0..=120)?), now + 3600),
        _ => {
            let issued = now.saturating_sub(u.int_in_range(0..=600)?);
            let lifetime = *u.choose(&[1u64, 2, 30, 60, 600, 3600, 86_400])?;
            (issued, issued.saturating_add(lifetime))
        }
    };
    let grant = Grant {
        id,
        account: pick::text(u, &["acme"])?,
        client,
        gateway,
        preshared_key,
        resource: GrantedResource {
            id: pick::text(u, &["db", "gitlab", "web"])?,
            address,
            filter,
            except,
            dns,
        },
        rule: pick::text(u, &["rule"])?,
        bundle_hash: pick::text(u, &["sha256:00"])?,
        issued_at,
        expires_at,
    };
    if !u.ratio(1u8, 16)? {
        return Ok(grant.sign(fixtures::portal()));
    }
    Ok(match u.int_in_range(0u8..=2)? {
        0 => grant.sign(&PortalSigningKey::from_seed([8; 32])),
        1 => {
            let mut signed = grant.sign(fixtures::portal());
            let at = u.choose_index(64)?;
            signed.signature[at] ^= u.int_in_range(1u8..=255)?;
            signed
        }
        _ => {
            let mut signed = grant.sign(fixtures::portal());
            signed.grant.client.tunnel_ipv4 = Ipv4Addr::new(100, 64, 0, 99);
            signed
        }
    })
}
