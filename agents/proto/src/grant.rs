//! Grants: what the portal allows one client to reach through one gateway, signed so that each
//! agent can check it against the portal key it pins.
//!
//! INVARIANT: a signature covers the grant's canonical encoding (`Grant::canonical_bytes`), a
//! fixed, length-prefixed byte layout behind a domain tag, never the JSON the grant travelled
//! in; verification uses only the pinned key and the strict Ed25519 check, and reads nothing
//! the grant says about how it was signed (it says nothing).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::Signature;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::key::{PortalPublicKey, PortalSigningKey, PresharedKey, PublicKey};

/// What the canonical encoding starts with, so a grant signature can never be taken for a
/// signature over anything else the portal signs.
const DOMAIN: &[u8] = b"fz-grant\0v2\0";

/// Seconds since the Unix epoch.
pub type UnixTime = u64;

/// How far a grant's issue time may be ahead of the verifier's clock.
pub const CLOCK_SKEW: u64 = 60;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub id: String,
    /// The account's slug.
    pub account: String,
    pub client: ClientPeer,
    pub gateway: GatewayPeer,
    /// Fresh for every grant.
    pub preshared_key: PresharedKey,
    pub resource: GrantedResource,
    /// The rule that allowed it.
    pub rule: String,
    /// The content hash of the bundle that decided it.
    pub bundle_hash: String,
    pub issued_at: UnixTime,
    pub expires_at: UnixTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPeer {
    pub id: String,
    pub public_key: PublicKey,
    pub tunnel_ipv4: Ipv4Addr,
    pub tunnel_ipv6: Ipv6Addr,
    /// Candidate endpoints for NAT traversal.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPeer {
    pub id: String,
    pub public_key: PublicKey,
    /// Candidate endpoints for NAT traversal.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantedResource {
    pub id: String,
    /// As the bundle writes it: a DNS name or pattern, an IP or CIDR, or `internet`.
    pub address: String,
    /// Port filters (`tcp/443`, `udp/8000-8100`, `icmp`); `None`: all traffic to the address.
    pub filter: Option<Vec<String>>,
    /// Networks inside the address (or, for `internet`, anywhere) that more specific resources
    /// serve: a grant opens what its resource serves, so these stay closed through it.
    #[serde(default)]
    pub except: Vec<String>,
    /// For a DNS resource: the name the client asked for and the addresses it mapped it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsMapping>,
}

/// A name inside a DNS resource's pattern and the mapped addresses the client's DNS stub
/// handed out for it: the gateway resolves the name and translates these to what it resolves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsMapping {
    pub name: String,
    pub mapped: Vec<IpAddr>,
}

impl DnsMapping {
    /// A name gets at most 4 IPv4 and 4 IPv6 mapped addresses.
    pub const MAX_MAPPED: usize = 8;

    /// The longest DNS name, without its trailing dot (RFC 1035: 255 octets on the wire).
    pub const MAX_NAME: usize = 253;

    /// Whether the mapping is one a client's DNS stub could have made: a name of 1 to
    /// [`Self::MAX_NAME`] characters (a trailing dot aside), at most [`Self::MAX_MAPPED`]
    /// distinct addresses, each inside the mapped ranges.
    pub fn is_well_formed(&self) -> bool {
        let mut seen = self.mapped.clone();
        seen.sort();
        seen.dedup();
        let name = self.name.strip_suffix('.').unwrap_or(&self.name);
        !name.is_empty()
            && name.len() <= Self::MAX_NAME
            && !self.mapped.is_empty()
            && self.mapped.len() <= Self::MAX_MAPPED
            && seen.len() == self.mapped.len()
            && self.mapped.iter().all(|ip| is_mapped_address(*ip))
    }
}

/// Mapped addresses for DNS resources come from 100.96.0.0/11 and fd00:2021:1111:8000::/107,
/// never from anything a real host could have.
pub fn is_mapped_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) >> 21 == u32::from(Ipv4Addr::new(100, 96, 0, 0)) >> 21,
        IpAddr::V6(v6) => {
            u128::from(v6) >> 21
                == u128::from(Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0x8000, 0, 0, 0, 0)) >> 21
        }
    }
}

/// A grant and the portal's signature over its canonical encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedGrant {
    pub grant: Grant,
    #[serde(serialize_with = "signature_out", deserialize_with = "signature_in")]
    pub signature: [u8; 64],
}

/// Who is verifying: the agent's own id and WireGuard public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Client { id: String, public_key: PublicKey },
    Gateway { id: String, public_key: PublicKey },
}

/// Why a grant is refused. Every refusal is logged by the agent; none is acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the grant's signature does not verify against the pinned portal key")]
    BadSignature,
    #[error("the grant expired at {expires_at} (now {now})")]
    Expired { expires_at: UnixTime, now: UnixTime },
    #[error("the grant is issued at {issued_at}, after now ({now}) by more than the allowed skew")]
    NotYetValid { issued_at: UnixTime, now: UnixTime },
    #[error("the grant is addressed to another {0}")]
    NotForUs(&'static str),
}

impl Grant {
    /// Signs the grant with the portal key.
    pub fn sign(self, key: &PortalSigningKey) -> SignedGrant {
        let signature = key.sign(&self.canonical_bytes());
        SignedGrant {
            grant: self,
            signature,
        }
    }

    /// The bytes a signature covers: the domain tag, then every field in declaration order,
    /// strings and lists length-prefixed, numbers big-endian, so that no two different grants
    /// share an encoding.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Canonical(DOMAIN.to_vec());
        out.text(&self.id);
        out.text(&self.account);
        out.text(&self.client.id);
        out.bytes(&self.client.public_key.0);
        out.bytes(&self.client.tunnel_ipv4.octets());
        out.bytes(&self.client.tunnel_ipv6.octets());
        out.endpoints(&self.client.endpoints);
        out.text(&self.gateway.id);
        out.bytes(&self.gateway.public_key.0);
        out.endpoints(&self.gateway.endpoints);
        out.bytes(&self.preshared_key.0);
        out.text(&self.resource.id);
        out.text(&self.resource.address);
        match &self.resource.filter {
            None => out.number(0),
            Some(filters) => {
                out.number(1);
                out.number(filters.len() as u64);
                for filter in filters {
                    out.text(filter);
                }
            }
        }
        out.number(self.resource.except.len() as u64);
        for network in &self.resource.except {
            out.text(network);
        }
        match &self.resource.dns {
            None => out.number(0),
            Some(dns) => {
                out.number(1);
                out.text(&dns.name);
                out.number(dns.mapped.len() as u64);
                for ip in &dns.mapped {
                    match ip {
                        IpAddr::V4(v4) => out.bytes(&v4.octets()),
                        IpAddr::V6(v6) => out.bytes(&v6.octets()),
                    }
                }
            }
        }
        out.text(&self.rule);
        out.text(&self.bundle_hash);
        out.number(self.issued_at);
        out.number(self.expires_at);
        out.0
    }
}

impl SignedGrant {
    /// The grant, if the pinned portal key signed it, it is valid at `now`, and it names the
    /// verifying agent. The signature is checked first: nothing in an unverified grant is read.
    pub fn verify(
        &self,
        portal: &PortalPublicKey,
        me: &Identity,
        now: UnixTime,
    ) -> Result<&Grant, GrantError> {
        let signature = Signature::from_bytes(&self.signature);
        portal
            .0
            .verify_strict(&self.grant.canonical_bytes(), &signature)
            .map_err(|_| GrantError::BadSignature)?;
        let grant = &self.grant;
        if now >= grant.expires_at {
            return Err(GrantError::Expired {
                expires_at: grant.expires_at,
                now,
            });
        }
        if grant.issued_at > now.saturating_add(CLOCK_SKEW) {
            return Err(GrantError::NotYetValid {
                issued_at: grant.issued_at,
                now,
            });
        }
        let addressed = match me {
            Identity::Client { id, public_key } => (&grant.client.id == id
                && grant.client.public_key == *public_key)
                .then_some(())
                .ok_or("client"),
            Identity::Gateway { id, public_key } => (&grant.gateway.id == id
                && grant.gateway.public_key == *public_key)
                .then_some(())
                .ok_or("gateway"),
        };
        addressed.map_err(GrantError::NotForUs)?;
        Ok(grant)
    }
}

struct Canonical(Vec<u8>);

impl Canonical {
    fn number(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.number(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn endpoints(&mut self, endpoints: &[SocketAddr]) {
        self.number(endpoints.len() as u64);
        for endpoint in endpoints {
            match endpoint {
                SocketAddr::V4(v4) => self.bytes(&v4.ip().octets()),
                SocketAddr::V6(v6) => self.bytes(&v6.ip().octets()),
            }
            self.number(u64::from(endpoint.port()));
        }
    }
}

fn signature_out<S: Serializer>(signature: &[u8; 64], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&STANDARD.encode(signature))
}

fn signature_in<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 64], D::Error> {
    let text = String::deserialize(deserializer)?;
    STANDARD
        .decode(&text)
        .ok()
        .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        .ok_or_else(|| serde::de::Error::custom("a signature is 64 bytes in base64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixTime = 1_795_000_000;

    fn grant() -> Grant {
        Grant {
            id: "g-1".into(),
            account: "acme".into(),
            client: ClientPeer {
                id: "c-1".into(),
                public_key: PublicKey([1; 32]),
                tunnel_ipv4: Ipv4Addr::new(100, 64, 0, 2),
                tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
                endpoints: vec!["198.51.100.7:51820".parse().unwrap()],
            },
            gateway: GatewayPeer {
                id: "gw-1".into(),
                public_key: PublicKey([2; 32]),
                endpoints: vec![
                    "203.0.113.1:51820".parse().unwrap(),
                    "[2001:db8::1]:51820".parse().unwrap(),
                ],
            },
            preshared_key: PresharedKey([3; 32]),
            resource: GrantedResource {
                id: "gitlab".into(),
                address: "gitlab.acme.example".into(),
                filter: Some(vec!["tcp/443".into(), "tcp/22".into()]),
                except: Vec::new(),
                dns: Some(DnsMapping {
                    name: "gitlab.acme.example".into(),
                    mapped: vec![
                        "100.96.0.1".parse().unwrap(),
                        "fd00:2021:1111:8000::1".parse().unwrap(),
                    ],
                }),
            },
            rule: "eng-tools".into(),
            bundle_hash: "sha256:00".into(),
            issued_at: NOW,
            expires_at: NOW + 3600,
        }
    }

    fn portal() -> PortalSigningKey {
        PortalSigningKey::from_seed([42; 32])
    }

    fn gateway() -> Identity {
        Identity::Gateway {
            id: "gw-1".into(),
            public_key: PublicKey([2; 32]),
        }
    }

    fn client() -> Identity {
        Identity::Client {
            id: "c-1".into(),
            public_key: PublicKey([1; 32]),
        }
    }

    #[test]
    fn both_sides_accept_a_good_grant_after_a_json_round_trip() {
        let signed = grant().sign(&portal());
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedGrant = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back.verify(&portal().public_key(), &gateway(), NOW + 10),
            Ok(&grant())
        );
        assert_eq!(
            back.verify(&portal().public_key(), &client(), NOW + 10),
            Ok(&grant())
        );
    }

    #[test]
    fn mapped_addresses_stay_in_their_ranges() {
        let mapping = |mapped: &[&str]| DnsMapping {
            name: "gitlab.acme.example".into(),
            mapped: mapped.iter().map(|ip| ip.parse().unwrap()).collect(),
        };
        assert!(
            mapping(&["100.96.0.1", "100.127.255.254", "fd00:2021:1111:8000::1"]).is_well_formed()
        );
        assert!(mapping(&["fd00:2021:1111:8000:0:0:1f:ffff"]).is_well_formed());
        for bad in [
            &[][..],
            &["100.128.0.1"][..],
            &["100.95.255.255"][..],
            &["172.16.0.5"][..],
            &["fd00:2021:1111:8000:0:0:20:0"][..],
            &["100.96.0.1", "100.96.0.1"][..],
        ] {
            assert!(!mapping(bad).is_well_formed(), "{bad:?}");
        }
        // A name is as long as DNS allows, and no longer.
        let named = |name: String| DnsMapping {
            name,
            mapped: vec!["100.96.0.1".parse().unwrap()],
        };
        let longest = format!("{}.example", "a".repeat(DnsMapping::MAX_NAME - 8));
        assert!(named(longest.clone()).is_well_formed());
        assert!(named(format!("{longest}.")).is_well_formed());
        assert!(!named(format!("a{longest}")).is_well_formed());
        assert!(!named(".".to_owned()).is_well_formed());
    }

    #[test]
    fn refusals() {
        let pinned = portal().public_key();
        let signed = grant().sign(&portal());
        let other_portal = PortalSigningKey::from_seed([43; 32]).public_key();
        let cases: [(&str, Result<&Grant, GrantError>); 6] = [
            (
                "another portal key",
                signed.verify(&other_portal, &gateway(), NOW),
            ),
            ("expired", signed.verify(&pinned, &gateway(), NOW + 3600)),
            (
                "issued in the future",
                signed.verify(&pinned, &gateway(), NOW - CLOCK_SKEW - 1),
            ),
            (
                "another gateway",
                signed.verify(
                    &pinned,
                    &Identity::Gateway {
                        id: "gw-2".into(),
                        public_key: PublicKey([2; 32]),
                    },
                    NOW,
                ),
            ),
            (
                "the gateway's id with another key",
                signed.verify(
                    &pinned,
                    &Identity::Gateway {
                        id: "gw-1".into(),
                        public_key: PublicKey([9; 32]),
                    },
                    NOW,
                ),
            ),
            (
                "another client",
                signed.verify(
                    &pinned,
                    &Identity::Client {
                        id: "c-2".into(),
                        public_key: PublicKey([1; 32]),
                    },
                    NOW,
                ),
            ),
        ];
        let expected = [
            GrantError::BadSignature,
            GrantError::Expired {
                expires_at: NOW + 3600,
                now: NOW + 3600,
            },
            GrantError::NotYetValid {
                issued_at: NOW,
                now: NOW - CLOCK_SKEW - 1,
            },
            GrantError::NotForUs("gateway"),
            GrantError::NotForUs("gateway"),
            GrantError::NotForUs("client"),
        ];
        for ((name, result), expected) in cases.into_iter().zip(expected) {
            assert_eq!(result, Err(expected), "{name}");
        }
    }

    /// Each edit a man in the middle might make, to a grant signed for someone else.
    #[test]
    fn any_edit_breaks_the_signature() {
        let edits: [fn(&mut Grant); 13] = [
            |g| g.id.push('x'),
            |g| g.account = "other".into(),
            |g| g.client.public_key = PublicKey([8; 32]),
            |g| g.client.tunnel_ipv4 = Ipv4Addr::new(100, 64, 0, 3),
            |g| g.client.endpoints.clear(),
            |g| g.gateway.id = "gw-2".into(),
            |g| g.gateway.endpoints[1] = "[2001:db8::1]:51821".parse().unwrap(),
            |g| g.preshared_key = PresharedKey([0; 32]),
            |g| g.resource.address = "**.acme.example".into(),
            |g| g.resource.filter = None,
            |g| g.resource.except.push("10.0.5.0/24".into()),
            |g| g.rule = "all".into(),
            |g| g.expires_at += 1,
        ];
        let pinned = portal().public_key();
        for (i, edit) in edits.iter().enumerate() {
            let mut signed = grant().sign(&portal());
            edit(&mut signed.grant);
            assert_eq!(
                signed.verify(&pinned, &gateway(), NOW),
                Err(GrantError::BadSignature),
                "edit {i}"
            );
        }
    }

    /// Without its carve-outs a grant for a wide network would open the narrower resources
    /// inside it: they are signed like every other field.
    #[test]
    fn dropping_a_carve_out_breaks_the_signature() {
        let mut wide = grant();
        wide.resource.address = "10.0.0.0/8".into();
        wide.resource.dns = None;
        wide.resource.except = vec!["10.0.5.0/24".into(), "10.9.0.0/16".into()];
        let pinned = portal().public_key();
        let mut signed = wide.sign(&portal());
        assert!(signed.verify(&pinned, &gateway(), NOW).is_ok());
        signed.grant.resource.except.pop();
        assert_eq!(
            signed.verify(&pinned, &gateway(), NOW),
            Err(GrantError::BadSignature)
        );
    }

    #[test]
    fn a_bad_signature_text_is_a_decode_error() {
        let mut json: serde_json::Value = serde_json::to_value(grant().sign(&portal())).unwrap();
        json["signature"] = "AAAA".into();
        let error = serde_json::from_value::<SignedGrant>(json).unwrap_err();
        assert!(error.to_string().contains("64 bytes"), "{error}");
    }

    #[test]
    fn the_encoding_separates_fields() {
        // Moving a character from one field to the next changes the bytes.
        let mut a = grant();
        let mut b = grant();
        a.rule = "ab".into();
        a.bundle_hash = "c".into();
        b.rule = "a".into();
        b.bundle_hash = "bc".into();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }
}
