//! `dig` against the client's DNS front on loopback, with a real upstream server beside it
//! and the test standing in for the portal: pass-through over UDP and TCP, a resource name
//! answered with its mapped addresses once access is granted, PTR for a mapped address, and
//! HTTPS kept local. Beside it, the pooled upstream sockets pass-through goes over: answers
//! that do not match a query in flight are dropped, and sockets are retired and replaced; and
//! a burst from several applications, read, forwarded and answered in batches.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use fz_client::dns::{self, DnsService};
use fz_dns::{Event, Stub};
use fz_proto::{Resolution, ResourceView};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

/// An upstream that knows one name, over UDP and TCP.
async fn upstream() -> SocketAddr {
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let address = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(address).await.unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0; 4096];
        loop {
            let (length, from) = udp.recv_from(&mut buffer).await.unwrap();
            let answer = answer(&buffer[..length]);
            udp.send_to(&answer, from).await.unwrap();
        }
    });
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            tokio::spawn(async move {
                let length = stream.read_u16().await.unwrap();
                let mut query = vec![0; usize::from(length)];
                stream.read_exact(&mut query).await.unwrap();
                let answer = answer(&query);
                stream.write_u16(answer.len() as u16).await.unwrap();
                stream.write_all(&answer).await.unwrap();
            });
        }
    });
    address
}

fn answer(query: &[u8]) -> Vec<u8> {
    let query = Message::from_vec(query).unwrap();
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    let question = query.queries[0].clone();
    response.add_query(question.clone());
    if question.name().to_ascii() == "www.example.org." && question.query_type() == RecordType::A {
        response.add_answer(Record::from_rdata(
            question.name().clone(),
            300,
            RData::A(A("192.0.2.80".parse().unwrap())),
        ));
    } else {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    response.to_vec().unwrap()
}

/// The client's DNS front on loopback, standing for the first sentinel, with an event loop
/// that grants every name the stub asks for (gitlab exists, with IPv4 only).
async fn client_dns(upstream: SocketAddr) -> SocketAddr {
    let mut stub = Stub::new(&[upstream]);
    stub.set_resources(vec![ResourceView {
        id: "gitlab".into(),
        address: "gitlab.company.com".into(),
    }]);
    let sentinel = IpAddr::V4(stub.sentinels()[0].v4);
    let mut service = DnsService::new(stub);
    let (queries, mut incoming) = mpsc::channel(64);
    let bound = dns::serve(sentinel, (Ipv4Addr::LOCALHOST, 0).into(), queries)
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(query) = incoming.recv().await {
            service.handle_queries(query, &mut incoming, Instant::now());
            while let Some(event) = service.poll_event() {
                if let Event::RequestAccess { dns, .. } = event {
                    service.stub_mut().handle_granted(
                        &dns.name,
                        Resolution::Exists {
                            ipv4: true,
                            ipv6: false,
                        },
                    );
                }
            }
        }
    });
    bound
}

/// Runs dig against `server` and returns its output.
async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let server_arg = format!("@{}", server.ip());
    let port = server.port().to_string();
    let mut command = Command::new("dig");
    command
        .args([server_arg.as_str(), "-p", &port, "+time=3", "+tries=1"])
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|error| {
            panic!("cannot run dig ({error}); install it: apt-get install dnsutils")
        });
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn dig_gets_pass_through_answers_and_mapped_addresses() {
    let upstream = upstream().await;
    let server = client_dns(upstream).await;

    // A name of no resource: the upstream's answer, over UDP and over TCP.
    for transport in ["+notcp", "+tcp"] {
        let out = dig(server, &[transport, "+short", "www.example.org", "A"]).await;
        assert_eq!(out.trim(), "192.0.2.80", "{transport}");
        let out = dig(server, &[transport, "nothing.example.org", "A"]).await;
        assert!(out.contains("status: NXDOMAIN"), "{transport}: {out}");
    }

    // A resource name: its four mapped IPv4 addresses, once the portal (here, the test)
    // granted it; IPv6 does not exist at the site, so AAAA is empty but not NXDOMAIN.
    let out = dig(server, &["+short", "gitlab.company.com", "A"]).await;
    let addresses: Vec<&str> = out.lines().collect();
    assert_eq!(
        addresses,
        ["100.96.0.1", "100.96.0.2", "100.96.0.3", "100.96.0.4"]
    );
    let out = dig(server, &["gitlab.company.com", "AAAA"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    let out = dig(server, &["+tcp", "+short", "GitLab.Company.com", "A"]).await;
    assert_eq!(out.lines().count(), 4, "the same over TCP, any case: {out}");

    // The mapped address names its name; HTTPS for the resource name stays local and empty.
    let out = dig(server, &["+short", "-x", "100.96.0.1"]).await;
    assert_eq!(out.trim(), "gitlab.company.com.");
    let out = dig(server, &["gitlab.company.com", "HTTPS"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
}

/// A query for `name` (type A) with `id`, as an application sends it.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.recursion_desired = true;
    query.add_query(hickory_proto::op::Query::query(
        name.parse().unwrap(),
        RecordType::A,
    ));
    query.to_vec().unwrap()
}

#[tokio::test]
async fn pass_through_takes_only_the_answer_to_the_query_in_flight() {
    // An upstream the test plays by hand.
    let upstream = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let server = client_dns(upstream.local_addr().unwrap()).await;
    let application = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    application
        .send_to(&query(0x1234, "www.example.org"), server)
        .await
        .unwrap();

    let mut buffer = vec![0; 4096];
    let (length, stub) = upstream.recv_from(&mut buffer).await.unwrap();
    let forwarded = buffer[..length].to_vec();
    assert_eq!(
        forwarded[2..],
        query(0x1234, "www.example.org")[2..],
        "everything but the id passes unchanged"
    );
    let wire_id = u16::from_be_bytes([forwarded[0], forwarded[1]]);

    // Two forgeries first: the right id with another question, and the right question with
    // another id. Then the real answer. The application must get the real one only, with
    // its own id back.
    let forged_question = answer(&query(wire_id, "www.example.org.attacker.test"));
    upstream.send_to(&forged_question, stub).await.unwrap();
    let forged_id = answer(&query(wire_id.wrapping_add(1), "www.example.org"));
    upstream.send_to(&forged_id, stub).await.unwrap();
    upstream.send_to(&answer(&forwarded), stub).await.unwrap();

    let length = application.recv(&mut buffer).await.unwrap();
    let answered = Message::from_vec(&buffer[..length]).unwrap();
    assert_eq!(answered.metadata.id, 0x1234);
    assert_eq!(answered.queries[0].name().to_ascii(), "www.example.org.");
    assert_eq!(
        answered.answers.len(),
        1,
        "the real answer, with its record"
    );
}

#[tokio::test]
async fn pass_through_moves_to_a_fresh_upstream_socket_and_answers_everything() {
    // An upstream that answers everything and notes the ports queries came from.
    let upstream = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let server = client_dns(upstream.local_addr().unwrap()).await;
    let ports = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let seen = ports.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0; 4096];
        loop {
            let (length, from) = upstream.recv_from(&mut buffer).await.unwrap();
            seen.lock().unwrap().insert(from.port());
            upstream
                .send_to(&answer(&buffer[..length]), from)
                .await
                .unwrap();
        }
    });

    // More queries than one socket carries, one at a time, each with its own id.
    let application = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let queries = dns::QUERIES_PER_SOCKET * 2 + 1;
    let mut buffer = vec![0; 4096];
    for id in 0..queries {
        let id = id as u16;
        application
            .send_to(&query(id, "www.example.org"), server)
            .await
            .unwrap();
        let length = application.recv(&mut buffer).await.unwrap();
        let answered = Message::from_vec(&buffer[..length]).unwrap();
        assert_eq!(answered.metadata.id, id);
        assert_eq!(answered.answers.len(), 1);
    }
    assert_eq!(
        ports.lock().unwrap().len(),
        3,
        "a fresh socket (port) after every {} queries",
        dns::QUERIES_PER_SOCKET
    );
}

#[tokio::test]
async fn a_burst_from_several_applications_is_answered_to_each_in_full() {
    let server = client_dns(upstream().await).await;
    let mut applications = Vec::new();
    for _ in 0..4 {
        applications.push(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
    }
    let mut buffer = vec![0; 4096];
    // Rounds of 32 queries from each application before any answer is read, so that the
    // front reads them in batches and the answers leave in batches, to several senders; half
    // pass through, half are the resource's, answered by the stub itself.
    for round in 0..8u16 {
        for application in &applications {
            for index in 0..32u16 {
                let name = if index.is_multiple_of(2) {
                    "www.example.org"
                } else {
                    "gitlab.company.com"
                };
                let id = round * 100 + index;
                application.send_to(&query(id, name), server).await.unwrap();
            }
        }
        for application in &applications {
            let mut answered = std::collections::BTreeSet::new();
            for _ in 0..32 {
                // A query left unsent or an answer sent elsewhere fails here, not hangs.
                let length =
                    tokio::time::timeout(Duration::from_secs(5), application.recv(&mut buffer))
                        .await
                        .expect("every query of the burst is answered")
                        .unwrap();
                let answer = Message::from_vec(&buffer[..length]).unwrap();
                // The upstream's one address, or the resource's four mapped ones.
                let (name, records) = if answer.metadata.id.is_multiple_of(2) {
                    ("www.example.org.", 1)
                } else {
                    ("gitlab.company.com.", 4)
                };
                assert_eq!(answer.queries[0].name().to_ascii(), name);
                assert_eq!(answer.answers.len(), records, "{answer:?}");
                answered.insert(answer.metadata.id);
            }
            let sent: std::collections::BTreeSet<u16> =
                (0..32).map(|index| round * 100 + index).collect();
            assert_eq!(
                answered, sent,
                "each application gets its own answers, all of them"
            );
        }
    }
}
