//! Property tests of the protocol crate.
//! - Any bytes given to `decode` give a message or an error, never a panic.
//! - Two grants that differ anywhere have different canonical encodings, so a signature over
//!   one never verifies the other.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use fz_proto::*;
use proptest::prelude::*;

fn grant() -> impl Strategy<Value = Grant> {
    let text = || "[a-z0-9:.*/-]{0,12}";
    let endpoints = || prop::collection::vec(any::<SocketAddr>(), 0..3);
    (
        (
            text(),
            text(),
            text(),
            any::<[u8; 32]>(),
            any::<u32>(),
            any::<u128>(),
            endpoints(),
        ),
        (
            text(),
            any::<[u8; 32]>(),
            endpoints(),
            any::<[u8; 32]>(),
            prop::option::of((text(), prop::collection::vec(any::<IpAddr>(), 0..4))),
        ),
        (
            text(),
            text(),
            prop::option::of(prop::collection::vec(text(), 0..3)),
            text(),
            text(),
            any::<u64>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (id, account, client_id, client_key, v4, v6, client_endpoints),
                (gateway_id, gateway_key, gateway_endpoints, psk, dns),
                (resource_id, address, filter, rule, bundle_hash, issued_at, expires_at),
            )| Grant {
                id,
                account,
                client: ClientPeer {
                    id: client_id,
                    public_key: PublicKey(client_key),
                    tunnel_ipv4: Ipv4Addr::from(v4),
                    tunnel_ipv6: Ipv6Addr::from(v6),
                    endpoints: client_endpoints,
                },
                gateway: GatewayPeer {
                    id: gateway_id,
                    public_key: PublicKey(gateway_key),
                    endpoints: gateway_endpoints,
                },
                preshared_key: PresharedKey(psk),
                resource: GrantedResource {
                    id: resource_id,
                    address,
                    filter,
                    except: Vec::new(),
                    dns: dns.map(|(name, mapped)| DnsMapping { name, mapped }),
                },
                rule,
                bundle_hash,
                issued_at,
                expires_at,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), text in r#"\{"v":[0-9]{1,3},"type":"[a-z_]{0,16}"(,"[a-z_]{1,10}":("[^"]{0,8}"|[0-9]{1,4}|null|\[\]|true))*\}"#) {
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<GatewayMessage>(&bytes);
        let _ = decode::<PortalToClient>(text.as_bytes());
        let _ = decode::<PortalToGateway>(text.as_bytes());
    }

    #[test]
    fn different_grants_encode_differently(a in grant(), b in grant()) {
        prop_assert_eq!(a == b, a.canonical_bytes() == b.canonical_bytes());
    }

    #[test]
    fn a_signature_covers_only_its_grant(a in grant(), b in grant()) {
        prop_assume!(a != b);
        let portal = PortalSigningKey::from_seed([5; 32]);
        let signed = a.sign(&portal);
        let forged = SignedGrant { grant: b.clone(), signature: signed.signature };
        let me = Identity::Gateway { id: b.gateway.id.clone(), public_key: b.gateway.public_key };
        prop_assert_eq!(forged.verify(&portal.public_key(), &me, b.issued_at), Err(GrantError::BadSignature));
    }
}
