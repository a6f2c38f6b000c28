//! The DNS stub with real DNS messages: what it forwards, what it asks the portal, what it
//! answers and when, and what it makes of bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fz_dns::{ASK_TIMEOUT, DENIAL_MEMORY, Event, Handled, Stub, TTL_SECS};
use fz_proto::{Resolution, ResourceView};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use proptest::prelude::*;

const UPSTREAM: &str = "192.0.2.53:53";
const SECOND_UPSTREAM: &str = "[2001:db8::53]:53";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn stub() -> Stub {
    let upstreams: Vec<SocketAddr> = [UPSTREAM, SECOND_UPSTREAM]
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    let mut stub = Stub::new(&upstreams);
    let resources = [
        ("gitlab", "gitlab.company.com"),
        ("apps", "app?.company.com"),
        ("company", "*.company.com"),
        ("wiki", "**.wiki.company.com"),
        ("db", "10.0.5.0/24"),
        ("web", "internet"),
    ];
    let unreadable = stub.set_resources(
        resources
            .iter()
            .map(|(id, address)| ResourceView {
                id: (*id).into(),
                address: (*address).into(),
            })
            .collect(),
    );
    assert!(unreadable.is_empty(), "{unreadable:?}");
    stub
}

fn query(id: u16, name: &str, kind: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    message
}

fn bytes(message: &Message) -> Vec<u8> {
    message.to_vec().unwrap()
}

/// Sends a query to the first upstream's IPv4 sentinel.
fn ask(stub: &mut Stub, id: u16, name: &str, kind: RecordType, now: Instant) -> Handled {
    let sentinel = IpAddr::V4(stub.sentinels()[0].v4);
    stub.handle_query(u64::from(id), sentinel, &bytes(&query(id, name, kind)), now)
}

fn events(stub: &mut Stub) -> Vec<Event> {
    std::iter::from_fn(|| stub.poll_event()).collect()
}

fn one(events: Vec<Event>) -> Event {
    match <[Event; 1]>::try_from(events) {
        Ok([event]) => event,
        Err(events) => panic!("expected one event, got {events:?}"),
    }
}

fn decoded(handled: Handled) -> Message {
    match handled {
        Handled::Answer(bytes) => Message::from_vec(&bytes).unwrap(),
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// The answer's code and the addresses in it.
fn summary(message: &Message) -> (ResponseCode, Vec<IpAddr>) {
    let addresses = message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    (message.metadata.response_code, addresses)
}

#[test]
fn the_sentinels_stand_in_for_each_upstream() {
    let stub = stub();
    let sentinels: Vec<(IpAddr, IpAddr, SocketAddr)> = stub
        .sentinels()
        .iter()
        .map(|s| (IpAddr::V4(s.v4), IpAddr::V6(s.v6), s.upstream))
        .collect();
    assert_eq!(
        sentinels,
        [
            (
                ip("100.100.111.1"),
                ip("fd00:2021:1111:8000:100:100:111:1"),
                UPSTREAM.parse().unwrap()
            ),
            (
                ip("100.100.111.2"),
                ip("fd00:2021:1111:8000:100:100:111:2"),
                SECOND_UPSTREAM.parse().unwrap()
            ),
        ]
    );
}

#[test]
fn names_of_no_dns_resource_pass_through_to_their_sentinels_upstream() {
    let mut stub = stub();
    let now = Instant::now();
    let example = bytes(&query(7, "www.example.org", RecordType::A));
    let second = stub.sentinels()[1];
    for (sentinel, upstream) in [
        (ip("100.100.111.1"), UPSTREAM),
        (IpAddr::V6(second.v6), SECOND_UPSTREAM),
        (IpAddr::V4(second.v4), SECOND_UPSTREAM),
    ] {
        assert_eq!(
            stub.handle_query(1, sentinel, &example, now),
            Handled::Forward(upstream.parse().unwrap())
        );
    }
    // IP and CIDR resources and `internet` are no names: their names resolve as usual; so
    // does a name above a pattern (`wiki.company.com` is served by `**.wiki`, `company.com`
    // by nothing).
    for name in ["company.com", "5.0.10.in-addr.arpa", "example.net"] {
        assert_eq!(
            ask(&mut stub, 1, name, RecordType::A, now),
            Handled::Forward(UPSTREAM.parse().unwrap()),
            "{name}"
        );
    }
    assert!(events(&mut stub).is_empty(), "nothing asked of the portal");
    // A query to an address that is no sentinel is refused.
    let refused = decoded(stub.handle_query(1, ip("100.100.111.9"), &example, now));
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert_eq!(refused.metadata.id, 7);
}

#[test]
fn every_pattern_asks_the_portal_for_its_most_specific_resource() {
    let mut stub = stub();
    let now = Instant::now();
    let cases = [
        ("gitlab.company.com", "gitlab"),
        ("GitLab.Company.COM.", "gitlab"),
        ("app1.company.com", "apps"),
        ("jenkins.company.com", "company"),
        // `*` before `**`: one label under company.com is `company`'s, deeper is `wiki`'s.
        ("wiki.company.com", "company"),
        ("a.b.wiki.company.com", "wiki"),
    ];
    for (n, (name, resource)) in cases.iter().enumerate() {
        assert_eq!(
            ask(&mut stub, n as u16, name, RecordType::A, now),
            Handled::Later,
            "{name}"
        );
        match events(&mut stub).as_slice() {
            [
                Event::RequestAccess {
                    resource: asked,
                    dns,
                },
            ] => {
                assert_eq!(asked, resource, "{name}");
                assert_eq!(dns.name, name.to_ascii_lowercase().trim_end_matches('.'));
                assert_eq!(dns.mapped.len(), 8);
                assert!(dns.is_well_formed(), "{dns:?}");
            }
            // The second spelling of gitlab's name joins the first's request.
            [] if n == 1 => {}
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn a_granted_name_is_answered_with_its_mapped_addresses_of_the_families_that_exist() {
    let mut stub = stub();
    let now = Instant::now();
    assert_eq!(
        ask(&mut stub, 1, "gitlab.company.com", RecordType::A, now),
        Handled::Later
    );
    assert_eq!(
        ask(&mut stub, 2, "gitlab.company.com", RecordType::AAAA, now),
        Handled::Later
    );
    let Event::RequestAccess { dns, .. } = one(events(&mut stub)) else {
        panic!("one request for both queries")
    };
    stub.handle_granted(
        "gitlab.company.com",
        Resolution::Exists {
            ipv4: true,
            ipv6: false,
        },
    );
    let answers: Vec<(u64, Message)> = events(&mut stub)
        .into_iter()
        .map(|e| match e {
            Event::Answer { query, bytes } => (query, Message::from_vec(&bytes).unwrap()),
            other => panic!("{other:?}"),
        })
        .collect();
    let [(1, a), (2, aaaa)] = answers.as_slice() else {
        panic!("{answers:?}")
    };
    let v4: Vec<IpAddr> = dns.mapped.iter().copied().filter(IpAddr::is_ipv4).collect();
    assert_eq!(summary(a), (ResponseCode::NoError, v4.clone()));
    assert_eq!(a.metadata.id, 1);
    assert_eq!(a.metadata.message_type, MessageType::Response);
    assert!(a.metadata.recursion_available);
    let question = &a.queries[0];
    assert_eq!(
        (question.name().to_ascii(), question.query_type()),
        ("gitlab.company.com.".to_owned(), RecordType::A)
    );
    assert!(a.answers.iter().all(|r| r.ttl == TTL_SECS));
    // The name has no IPv6 address at the site: no AAAA, but the name exists.
    assert_eq!(summary(aaaa), (ResponseCode::NoError, vec![]));

    // Later queries are answered at once, from memory, without the portal.
    let again = decoded(ask(&mut stub, 3, "GITLAB.company.com", RecordType::A, now));
    assert_eq!(summary(&again), (ResponseCode::NoError, v4));
    assert!(events(&mut stub).is_empty());
    // The mapped address answers PTR with the name.
    let reverse = decoded(ask(
        &mut stub,
        4,
        "1.0.96.100.in-addr.arpa",
        RecordType::PTR,
        now,
    ));
    match &reverse.answers[..] {
        [record] => assert_eq!(
            record.data,
            RData::PTR(hickory_proto::rr::rdata::PTR(
                Name::from_ascii("gitlab.company.com.").unwrap()
            ))
        ),
        other => panic!("{other:?}"),
    }
    // Other types about the mapped address stay home too: the name exists, without them.
    for kind in [RecordType::A, RecordType::TXT, RecordType::ANY] {
        let other = decoded(ask(&mut stub, 4, "1.0.96.100.in-addr.arpa", kind, now));
        assert_eq!(summary(&other), (ResponseCode::NoError, vec![]), "{kind}");
    }

    // A revoked grant makes the next query ask again, with the same addresses.
    stub.handle_revoked("gitlab.company.com");
    assert_eq!(
        ask(&mut stub, 5, "gitlab.company.com", RecordType::A, now),
        Handled::Later
    );
    match events(&mut stub).as_slice() {
        [Event::RequestAccess { dns: again, .. }] => assert_eq!(again, &dns),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_name_that_does_not_exist_is_nxdomain_and_a_denial_is_an_empty_answer() {
    let mut stub = stub();
    let now = Instant::now();
    ask(&mut stub, 1, "nope.company.com", RecordType::A, now);
    events(&mut stub);
    stub.handle_granted("nope.company.com", Resolution::NoSuchName);
    let Event::Answer { bytes, .. } = one(events(&mut stub)) else {
        panic!()
    };
    assert_eq!(
        summary(&Message::from_vec(&bytes).unwrap()),
        (ResponseCode::NXDomain, vec![])
    );

    // Policy says no: the waiting queries get NOERROR with no records, and the log a reason.
    ask(&mut stub, 2, "app7.company.com", RecordType::A, now);
    ask(&mut stub, 3, "app7.company.com", RecordType::AAAA, now);
    events(&mut stub);
    stub.handle_rejected("apps", "no allow rule applies", now);
    let events = events(&mut stub);
    assert_eq!(events.len(), 3, "{events:?}");
    for event in &events[..2] {
        let Event::Answer { bytes, .. } = event else {
            panic!("{event:?}")
        };
        assert_eq!(
            summary(&Message::from_vec(bytes).unwrap()),
            (ResponseCode::NoError, vec![])
        );
    }
    assert_eq!(
        events[2],
        Event::Denied {
            name: "app7.company.com".into(),
            reason: "no allow rule applies".into()
        }
    );
    // For a moment the denial is remembered; then the portal is asked again.
    let soon = now + DENIAL_MEMORY / 2;
    let remembered = decoded(ask(&mut stub, 4, "app7.company.com", RecordType::A, soon));
    assert_eq!(summary(&remembered), (ResponseCode::NoError, vec![]));
    assert!(stub.poll_event().is_none());
    let later = now + DENIAL_MEMORY;
    stub.handle_timeout(later);
    assert_eq!(
        ask(&mut stub, 5, "app7.company.com", RecordType::A, later),
        Handled::Later
    );
    assert!(matches!(
        stub.poll_event(),
        Some(Event::RequestAccess { .. })
    ));
}

#[test]
fn a_portal_that_never_answers_gets_servfail_in_time() {
    let mut stub = stub();
    let now = Instant::now();
    ask(&mut stub, 9, "jenkins.company.com", RecordType::A, now);
    events(&mut stub);
    assert_eq!(stub.poll_timeout(), Some(now + ASK_TIMEOUT));
    stub.handle_timeout(now + ASK_TIMEOUT - Duration::from_millis(1));
    assert!(events(&mut stub).is_empty());
    stub.handle_timeout(now + ASK_TIMEOUT);
    let Event::Answer { query: 9, bytes } = one(events(&mut stub)) else {
        panic!()
    };
    assert_eq!(
        Message::from_vec(&bytes).unwrap().metadata.response_code,
        ResponseCode::ServFail
    );
    assert_eq!(stub.poll_timeout(), None);
}

#[test]
fn other_record_types_of_resource_names_never_leave_the_machine() {
    let mut stub = stub();
    let now = Instant::now();
    for kind in [
        RecordType::HTTPS,
        RecordType::SVCB,
        RecordType::MX,
        RecordType::TXT,
    ] {
        let answer = decoded(ask(&mut stub, 1, "gitlab.company.com", kind, now));
        assert_eq!(summary(&answer), (ResponseCode::NoError, vec![]), "{kind}");
        assert!(answer.answers.is_empty());
    }
    assert!(events(&mut stub).is_empty(), "no access asked for");
    // Mapped addresses nobody was given are ours too: NXDOMAIN, not a question upstream.
    let unknown = decoded(ask(
        &mut stub,
        2,
        "9.9.96.100.in-addr.arpa",
        RecordType::PTR,
        now,
    ));
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
    let unknown_a = decoded(ask(
        &mut stub,
        2,
        "9.9.96.100.in-addr.arpa",
        RecordType::A,
        now,
    ));
    assert_eq!(unknown_a.metadata.response_code, ResponseCode::NXDomain);
    let v6_reverse = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.1.1.1.1.1.2.0.2.0.0.d.f.ip6.arpa";
    let unknown_v6 = decoded(ask(&mut stub, 3, v6_reverse, RecordType::PTR, now));
    assert_eq!(unknown_v6.metadata.response_code, ResponseCode::NXDomain);
    // Any other reverse name is the upstream's.
    assert_eq!(
        ask(&mut stub, 4, "5.0.0.10.in-addr.arpa", RecordType::PTR, now),
        Handled::Forward(UPSTREAM.parse().unwrap())
    );
}

#[test]
fn bad_input_gets_formerr_or_silence_and_edns_is_answered() {
    let mut stub = stub();
    let now = Instant::now();
    let sentinel = ip("100.100.111.1");
    // Too short for an id: silence. Garbage with an id: FORMERR with that id.
    assert_eq!(stub.handle_query(1, sentinel, &[0x12], now), Handled::Drop);
    let garbage = decoded(stub.handle_query(1, sentinel, &[0xab, 0xcd, 0xff, 0xff, 0xff], now));
    assert_eq!(
        (garbage.metadata.id, garbage.metadata.response_code),
        (0xabcd, ResponseCode::FormErr)
    );
    // Two questions: FORMERR. A response where a query belongs: silence (no loops). Another
    // opcode: NOTIMP.
    let mut two = query(5, "gitlab.company.com", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("jenkins.company.com").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        decoded(stub.handle_query(1, sentinel, &bytes(&two), now))
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
    let mut response = query(6, "gitlab.company.com", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    assert_eq!(
        stub.handle_query(1, sentinel, &bytes(&response), now),
        Handled::Drop
    );
    let mut notify = query(7, "gitlab.company.com", RecordType::A);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        decoded(stub.handle_query(1, sentinel, &bytes(&notify), now))
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    assert!(events(&mut stub).is_empty());

    // A query with EDNS gets EDNS back.
    let mut with_edns = query(8, "gitlab.company.com", RecordType::HTTPS);
    with_edns.set_edns(Edns::new());
    let answered = decoded(stub.handle_query(1, sentinel, &bytes(&with_edns), now));
    assert!(answered.edns.is_some());
}

proptest! {
    #[test]
    fn any_bytes_are_answered_forwarded_or_dropped(
        input in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut stub = stub();
        let now = Instant::now();
        match stub.handle_query(1, ip("100.100.111.1"), &input, now) {
            Handled::Answer(bytes) => {
                // Whatever we say is a readable response.
                let message = Message::from_vec(&bytes).unwrap();
                prop_assert_eq!(message.metadata.message_type, MessageType::Response);
            }
            Handled::Forward(_) | Handled::Later | Handled::Drop => {}
        }
        stub.handle_timeout(now + ASK_TIMEOUT);
        while stub.poll_event().is_some() {}
    }

    #[test]
    fn any_question_name_is_handled(name in "[a-zA-Z0-9?*.-]{1,80}", kind in 0u16..300) {
        let mut stub = stub();
        if let Ok(name) = Name::from_ascii(&name) {
            let mut message = Message::query();
            message.add_query(Query::query(name, RecordType::from(kind)));
            let _ = stub.handle_query(1, ip("100.100.111.1"), &bytes(&message), Instant::now());
        }
    }
}
