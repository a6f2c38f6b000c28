//! Property tests of the data plane: any bytes read as a packet or an error, never a panic;
//! a filter drops every packet that is not from its client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::IpAddr;

use fz_proto::{ClientPeer, GatewayPeer, Grant, GrantedResource, PresharedKey, PublicKey};
use fz_tunnel::filter::{Drop, GrantFilter};
use fz_tunnel::nat::Nat;
use fz_tunnel::packet::{Packet, build};
use proptest::prelude::*;

fn grant() -> Grant {
    Grant {
        id: "g".into(),
        account: "acme".into(),
        client: ClientPeer {
            id: "c".into(),
            public_key: PublicKey([1; 32]),
            tunnel_ipv4: "100.64.0.2".parse().unwrap(),
            tunnel_ipv6: "fd00:2021:1111::2".parse().unwrap(),
            endpoints: vec![],
        },
        gateway: GatewayPeer {
            id: "gw".into(),
            public_key: PublicKey([2; 32]),
            endpoints: vec![],
        },
        preshared_key: PresharedKey([3; 32]),
        resource: GrantedResource {
            id: "r".into(),
            address: "internet".into(),
            filter: None,
            except: Vec::new(),
            dns: None,
        },
        rule: "r".into(),
        bundle_hash: "h".into(),
        issued_at: 0,
        expires_at: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_parse_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..128), version in 4u8..=6) {
        let _ = Packet::parse(&bytes);
        // The same bytes behind a plausible first byte reach deeper into the parser.
        let mut shaped = bytes.clone();
        if let Some(first) = shaped.first_mut() {
            *first = (version << 4) | (*first & 0x0f);
        }
        let _ = Packet::parse(&shaped);
    }

    #[test]
    fn packets_round_trip_their_addresses_and_ports(
        source in any::<IpAddr>(),
        destination in any::<IpAddr>(),
        ports in (1u16.., 1u16..),
        tcp in any::<bool>(),
    ) {
        let destination = match (source, destination) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => IpAddr::V4(v6.to_ipv4().unwrap_or(std::net::Ipv4Addr::LOCALHOST)),
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => destination,
        };
        let bytes = build::ip(source, destination, if tcp { 6 } else { 17 }, &build::ports(ports.0, ports.1));
        let packet = Packet::parse(&bytes).unwrap();
        prop_assert_eq!(packet.source, source);
        prop_assert_eq!(packet.destination, destination);
    }

    #[test]
    fn only_the_clients_packets_pass(source in any::<IpAddr>(), destination in any::<IpAddr>()) {
        let filter = GrantFilter::new(&grant()).unwrap();
        let destination = match (source, destination) {
            (IpAddr::V4(_), IpAddr::V6(_)) => IpAddr::from([10, 0, 0, 1]),
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => destination,
        };
        let bytes = build::ip(source, destination, 6, &build::ports(1, 443));
        let client: [IpAddr; 2] = ["100.64.0.2".parse().unwrap(), "fd00:2021:1111::2".parse().unwrap()];
        let verdict = filter.check_bytes(&bytes).map(|_| ());
        if client.contains(&source) {
            prop_assert_eq!(verdict, Ok(()));
        } else {
            prop_assert_eq!(verdict, Err(Drop::NotFromClient));
        }
    }

    #[test]
    fn the_nat_takes_any_bytes_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..96), version in 4u8..=6) {
        let mut nat = Nat::default();
        nat.set_targets("100.96.0.1".parse().unwrap(), vec!["172.16.0.5".parse().unwrap()]);
        let mut shaped = bytes.clone();
        if let Some(first) = shaped.first_mut() {
            *first = (version << 4) | (*first & 0x0f);
        }
        for mut packet in [bytes, shaped] {
            let _ = nat.outbound(&mut packet.clone(), 0);
            let _ = nat.reply(&mut packet, 0);
        }
    }

    #[test]
    fn a_translated_flow_translates_back(client_port in 1u16.., server_port in 1u16.., real in any::<[u8; 4]>()) {
        let mut nat = Nat::default();
        let mapped: IpAddr = "100.96.0.1".parse().unwrap();
        let client: IpAddr = "100.64.0.2".parse().unwrap();
        let real = IpAddr::from(real);
        nat.set_targets(mapped, vec![real]);
        let mut out = build::ip(client, mapped, 17, &build::ports(client_port, server_port));
        prop_assert_eq!(nat.outbound(&mut out, 0), Ok(real));
        let mut back = build::ip(real, client, 17, &build::ports(server_port, client_port));
        prop_assert_eq!(nat.reply(&mut back, 1), Ok(mapped));
        prop_assert_eq!(Packet::parse(&back).unwrap().source, mapped);
    }
}
