#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `Resolver` against a real authoritative DNS server over UDP on loopback: a few lines of
//! hickory-proto that answer A and AAAA for some names under `fz.test.`, NOERROR with nothing
//! for one, SERVFAIL for one, and NXDOMAIN for everything else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use fz_host::resolve::{LookupFailure, Resolver};
use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// The zone: name → the addresses it has. A name not here is NXDOMAIN.
const ZONE: &[(&str, &[&str])] = &[
    (
        "both.fz.test.",
        &["192.0.2.10", "192.0.2.11", "2001:db8::10"],
    ),
    ("v4only.fz.test.", &["192.0.2.20"]),
    ("v6only.fz.test.", &["2001:db8::30"]),
    ("empty.fz.test.", &[]),
];
const SERVFAIL_NAME: &str = "broken.fz.test.";

#[tokio::test]
async fn a_name_with_both_families_gives_ipv4_then_ipv6() {
    check(
        "both.fz.test",
        Ok(&["192.0.2.10", "192.0.2.11", "2001:db8::10"]),
    )
    .await;
}

#[tokio::test]
async fn a_name_with_one_family_is_fine() {
    check("v4only.fz.test", Ok(&["192.0.2.20"])).await;
    check("v6only.fz.test.", Ok(&["2001:db8::30"])).await;
}

#[tokio::test]
async fn nxdomain_and_a_name_without_addresses_are_no_such_name() {
    check("nothing.fz.test", Err(LookupFailure::NoSuchName)).await;
    check("empty.fz.test", Err(LookupFailure::NoSuchName)).await;
}

#[tokio::test]
async fn servfail_is_a_failure_not_an_answer() {
    let resolver = Resolver::with_nameserver(serve().await).unwrap();
    let got = resolver.resolve("broken.fz.test").await;
    assert!(matches!(got, Err(LookupFailure::Failed(_))), "{got:?}");
}

#[tokio::test]
async fn the_system_configuration_loads() {
    // Reads this host's /etc/resolv.conf; asking its servers would need a network we do not
    // have, so loading is what is checked here.
    Resolver::from_system_conf().unwrap();
}

async fn check(name: &str, want: Result<&[&str], LookupFailure>) {
    let resolver = Resolver::with_nameserver(serve().await).unwrap();
    let want = want.map(|ips| {
        ips.iter()
            .map(|ip| ip.parse().unwrap())
            .collect::<Vec<IpAddr>>()
    });
    let got = resolver.resolve(name).await;
    if let Ok(found) = &got {
        // The zone's records live 60 s; the resolver counts down from there.
        assert!(found.ttl <= Duration::from_secs(60), "{found:?}");
        assert!(found.ttl > Duration::ZERO, "{found:?}");
    }
    assert_eq!(got.map(|found| found.ips), want, "{name}");
}

/// Starts the server on an ephemeral loopback port; it lives as long as the test's runtime.
async fn serve() -> SocketAddr {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        loop {
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            let query = Message::from_vec(&buf[..len]).unwrap();
            let answer = answer(&query).to_vec().unwrap();
            socket.send_to(&answer, from).await.unwrap();
        }
    });
    address
}

fn answer(query: &Message) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.message_type = MessageType::Response;
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    let Some(question) = query.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    response.add_query(question.clone());
    let name = question.name().to_ascii().to_lowercase();
    if name == SERVFAIL_NAME {
        response.metadata.response_code = ResponseCode::ServFail;
        return response;
    }
    let Some((_, ips)) = ZONE.iter().find(|(zone_name, _)| *zone_name == name) else {
        response.metadata.response_code = ResponseCode::NXDomain;
        return response;
    };
    for ip in ips.iter().map(|ip| ip.parse::<IpAddr>().unwrap()) {
        let data = match (ip, question.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        response.add_answer(Record::from_rdata(question.name().clone(), 60, data));
    }
    response
}

#[test]
fn the_zone_is_what_the_tests_say() {
    // Keeps the fixture honest: every address parses and is from a documentation range.
    for (_, ips) in ZONE {
        for ip in *ips {
            let ip: IpAddr = ip.parse().unwrap();
            let documentation = match ip {
                IpAddr::V4(v4) => v4.octets()[..3] == [192, 0, 2],
                IpAddr::V6(v6) => {
                    v6.segments()[..2]
                        == Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0).segments()[..2]
                }
            };
            assert!(documentation, "{ip}");
        }
    }
}
