//! The `dns_stub` target: the client's DNS stub with the resources a portal lists, fed
//! queries (raw bytes, or messages built from names of resources, of other hosts, and
//! reverse names of mapped addresses) on its sentinels, the portal's grants, rejections and
//! revocations, and time.
//!
//! Oracles: whatever the stub answers is a response with the query's id, and every address
//! in it is a mapped address of the name asked; it forwards only to the sentinel's own
//! upstream, and never a name under the mapped ranges or of a resource; it drops only what
//! is no query; every mapping it asks the portal for is one the gateway would take, and a
//! mapped address never changes names; every query it holds is answered once, in time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use fz_address::{Address, AddressIndex};
use fz_dns::{ASK_TIMEOUT, Event, Handled, QueryId, Stub};
use fz_proto::{Resolution, ResourceView, is_mapped_address};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use crate::pick;

/// The most steps one input drives.
const MAX_STEPS: usize = 64;

/// What the portal lists: every form of resource address.
const RESOURCES: &[(&str, &str)] = &[
    ("gitlab", "gitlab.company.com"),
    ("apps", "app?.company.com"),
    ("company", "*.company.com"),
    ("wiki", "**.wiki.company.com"),
    ("db", "10.0.5.0/24"),
    ("web", "internet"),
];

/// Labels names are made of.
const LABELS: &[&str] = &[
    "gitlab",
    "company",
    "com",
    "wiki",
    "a",
    "app1",
    "appx",
    "example",
    "*",
    "in-addr",
    "ip6",
    "arpa",
    "100",
    "96",
    "0",
    "1",
    "4",
    "f",
    "8",
    "2021",
    "1111",
    "d",
    "GitLab",
    "xn--bcher-kva",
];

/// Names asked for.
const NAMES: &[&str] = &[
    "gitlab.company.com.",
    "GITLAB.Company.COM.",
    "app1.company.com.",
    "other.company.com.",
    "company.com.",
    "a.b.wiki.company.com.",
    "wiki.company.com.",
    "example.org.",
    "1.0.96.100.in-addr.arpa.",
    "5.0.96.100.in-addr.arpa.",
    "99.0.96.100.in-addr.arpa.",
    "1.0.0.10.in-addr.arpa.",
    "96.100.in-addr.arpa.",
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.1.1.1.1.1.2.0.2.0.0.d.f.ip6.arpa.",
    ".",
];

const UPSTREAMS: [&str; 2] = ["192.0.2.53:53", "[2001:db8::53]:53"];

pub fn dns_stub(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut sim = StubSim::new();
    // Running out of input only ends the run.
    let _ = sim.run(&mut u);
    sim.finish();
}

struct StubSim {
    stub: Stub,
    upstreams: Vec<SocketAddr>,
    resources: Vec<ResourceView>,
    now: Instant,
    next_query: QueryId,
    /// Queries the stub holds: their bytes.
    pending: HashMap<QueryId, Vec<u8>>,
    /// Which name each mapped address stands for, as the stub's requests said.
    owners: HashMap<IpAddr, String>,
    /// Names the stub asked the portal about.
    asked: Vec<String>,
}

impl StubSim {
    fn new() -> StubSim {
        let upstreams: Vec<SocketAddr> = UPSTREAMS.iter().filter_map(|u| u.parse().ok()).collect();
        let mut sim = StubSim {
            stub: Stub::new(&upstreams),
            upstreams,
            resources: Vec::new(),
            now: Instant::now(),
            next_query: 0,
            pending: HashMap::new(),
            owners: HashMap::new(),
            asked: Vec::new(),
        };
        sim.set_resources(
            RESOURCES
                .iter()
                .map(|(id, address)| ResourceView {
                    id: (*id).to_owned(),
                    address: (*address).to_owned(),
                })
                .collect(),
        );
        sim
    }

    fn set_resources(&mut self, resources: Vec<ResourceView>) {
        let unreadable = self.stub.set_resources(resources.clone());
        for address in unreadable {
            assert!(
                address.parse::<Address>().is_err(),
                "the stub could not read `{address}`, which parses"
            );
        }
        self.resources = resources;
    }

    fn run(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        for _ in 0..MAX_STEPS {
            if u.is_empty() {
                break;
            }
            match u.int_in_range(0u8..=10)? {
                0..=4 => self.query(u)?,
                5 => {
                    let name = self.name_asked(u)?;
                    let resolution = if u.ratio(1u8, 4)? {
                        Resolution::NoSuchName
                    } else {
                        Resolution::Exists {
                            ipv4: u.arbitrary()?,
                            ipv6: u.arbitrary()?,
                        }
                    };
                    self.stub.handle_granted(&name, resolution);
                }
                6 => {
                    let ids: Vec<&str> = RESOURCES.iter().map(|(id, _)| *id).collect();
                    let resource = pick::text(u, &ids)?;
                    self.stub.handle_rejected(&resource, "no rule", self.now);
                }
                7 => {
                    let name = self.name_asked(u)?;
                    self.stub.handle_revoked(&name);
                }
                8 => {
                    let by = *u.choose(&[1u64, 1000, 4999, 5000, 9999, 10_000, 60_000])?;
                    self.now += Duration::from_millis(by);
                    self.stub.handle_timeout(self.now);
                }
                9 => {
                    let mut resources = Vec::new();
                    for (id, address) in RESOURCES {
                        if u.ratio(3u8, 4)? {
                            resources.push(ResourceView {
                                id: (*id).to_owned(),
                                address: (*address).to_owned(),
                            });
                        }
                    }
                    if u.ratio(1u8, 2)? {
                        resources.push(ResourceView {
                            id: pick::text(u, &["extra", "gitlab"])?,
                            address: pick::text(u, &["**.company.com", "*.*.com", "com", "?"])?,
                        });
                    }
                    self.set_resources(resources);
                }
                _ => {
                    if let Some(at) = self.stub.poll_timeout() {
                        self.now = self.now.max(at);
                        self.stub.handle_timeout(self.now);
                    }
                }
            }
            self.drain_events();
            if !self.pending.is_empty() {
                assert!(
                    self.stub.poll_timeout().is_some(),
                    "queries are held and the stub asks for no timeout"
                );
            }
        }
        Ok(())
    }

    /// Time runs past every deadline: every held query has had its answer.
    fn finish(&mut self) {
        self.now += ASK_TIMEOUT + Duration::from_secs(1);
        self.stub.handle_timeout(self.now);
        self.drain_events();
        assert!(
            self.pending.is_empty(),
            "queries held without an answer: {:?}",
            self.pending
        );
    }

    /// A name the stub asked about, mostly; any, sometimes.
    fn name_asked(&self, u: &mut Unstructured<'_>) -> Result<String> {
        if !self.asked.is_empty() && u.ratio(3u8, 4)? {
            return Ok(u.choose(&self.asked)?.clone());
        }
        pick::text(u, &["gitlab.company.com", "x.company.com"])
    }

    fn query(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let sentinels = self.stub.sentinels().to_vec();
        let sentinel = match u.int_in_range(0u8..=4)? {
            0 | 1 => IpAddr::V4(sentinels[0].v4),
            2 => IpAddr::V6(sentinels[1].v6),
            3 => IpAddr::V4(sentinels[1].v4),
            _ => pick::address(u, &pick::ips(&["100.100.111.99", "127.0.0.53"]))?,
        };
        let bytes = if u.ratio(1u8, 6)? {
            let length = u.int_in_range(0..=64)?;
            u.bytes(length.min(u.len()))?.to_vec()
        } else {
            let mut bytes = built_query(u)?;
            if u.ratio(1u8, 10)? && !bytes.is_empty() {
                let at = u.choose_index(bytes.len())?;
                bytes[at] ^= u.arbitrary::<u8>()?;
            }
            bytes
        };
        self.next_query += 1;
        let id = self.next_query;
        let handled = self.stub.handle_query(id, sentinel, &bytes, self.now);
        let request = Message::from_vec(&bytes).ok();
        match handled {
            Handled::Answer(answer) => self.check_answer(&bytes, &answer),
            Handled::Forward(upstream) => {
                let own = sentinels
                    .iter()
                    .find(|s| IpAddr::V4(s.v4) == sentinel || IpAddr::V6(s.v6) == sentinel);
                assert_eq!(
                    own.map(|s| s.upstream),
                    Some(upstream),
                    "a query to {sentinel} forwarded to {upstream}"
                );
                assert!(self.upstreams.contains(&upstream));
                let Some(request) = request else {
                    panic!("unreadable bytes forwarded");
                };
                if let Some(question) = request.queries.first() {
                    let name = normalise(question.name());
                    assert!(
                        !reverse_address(&name).is_some_and(is_mapped_address),
                        "a query of type {} about mapped address `{name}` went upstream",
                        question.query_type()
                    );
                    self.check_no_resource(&name);
                }
            }
            Handled::Later => {
                assert!(
                    request.is_some_and(|r| r.queries.len() == 1),
                    "a query without one question is held"
                );
                self.pending.insert(id, bytes);
            }
            Handled::Drop => {
                if let Some(request) = request {
                    assert_ne!(
                        request.metadata.message_type,
                        MessageType::Query,
                        "a readable query got no answer"
                    );
                } else {
                    assert!(
                        bytes.len() < 2,
                        "unreadable bytes with an id got no FORMERR"
                    );
                }
            }
        }
        Ok(())
    }

    /// A forwarded name is served by no DNS resource the stub knows.
    fn check_no_resource(&self, name: &str) {
        let parsed: Vec<(Address, usize)> = self
            .resources
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.address.parse::<Address>().ok().map(|a| (a, i)))
            .collect();
        let index = AddressIndex::new(parsed.iter().map(|(a, i)| (a, *i)));
        if let Some(i) = index.lookup_name(name) {
            panic!(
                "`{name}` went upstream, and resource `{}` serves it",
                self.resources[i].id
            );
        }
    }

    /// An answer, now or later, to the query in `request`.
    fn check_answer(&mut self, request: &[u8], answer: &[u8]) {
        let Ok(message) = Message::from_vec(answer) else {
            panic!("the stub's answer does not read: {answer:02x?}");
        };
        assert_eq!(message.metadata.message_type, MessageType::Response);
        if let [high, low, ..] = request {
            assert_eq!(
                message.metadata.id,
                u16::from_be_bytes([*high, *low]),
                "the answer's id"
            );
        }
        let name = message.queries.first().map(|q| normalise(q.name()));
        for record in &message.answers {
            let address = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            assert!(
                is_mapped_address(address),
                "the stub answered {address}, no mapped address"
            );
            let Some(name) = &name else {
                panic!("{address} answered to no question");
            };
            let owner = self.owners.entry(address).or_insert_with(|| name.clone());
            assert_eq!(owner, name, "mapped address {address} changed names");
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.stub.poll_event() {
            match event {
                Event::RequestAccess { resource, dns } => {
                    assert!(
                        self.resources.iter().any(|r| r.id == resource),
                        "access asked for unknown resource `{resource}`"
                    );
                    assert!(
                        dns.is_well_formed(),
                        "a mapping the gateway would refuse: {dns:?}"
                    );
                    for address in &dns.mapped {
                        let owner = self
                            .owners
                            .entry(*address)
                            .or_insert_with(|| dns.name.clone());
                        assert_eq!(owner, &dns.name, "mapped address {address} changed names");
                    }
                    if !self.asked.contains(&dns.name) {
                        self.asked.push(dns.name);
                    }
                }
                Event::Answer { query, bytes } => {
                    let Some(request) = self.pending.remove(&query) else {
                        panic!("an answer to query {query}, which is not held");
                    };
                    self.check_answer(&request, &bytes);
                }
                Event::Denied { .. } => {}
            }
        }
    }
}

/// A query message: mostly one question, for a name from the lists or made of labels.
fn built_query(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut message = Message::query();
    message.metadata.id = u.arbitrary()?;
    message.metadata.recursion_desired = u.arbitrary()?;
    if u.ratio(1u8, 16)? {
        message.metadata.message_type = MessageType::Response;
    }
    if u.ratio(1u8, 16)? {
        message.metadata.op_code = *u.choose(&[OpCode::Status, OpCode::Notify, OpCode::Update])?;
    }
    let questions = *u.choose(&[1usize, 1, 1, 1, 1, 1, 0, 2])?;
    for _ in 0..questions {
        let name = if u.ratio(2u8, 3)? {
            Name::from_ascii(*u.choose(NAMES)?).ok()
        } else {
            let count = u.int_in_range(0..=6)?;
            let mut labels: Vec<Vec<u8>> = Vec::new();
            for _ in 0..count {
                labels.push(if u.ratio(7u8, 8)? {
                    u.choose(LABELS)?.as_bytes().to_vec()
                } else {
                    let length = u.int_in_range(1..=12)?;
                    u.bytes(length.min(u.len()))?.to_vec()
                });
            }
            Name::from_labels(labels).ok()
        };
        let Some(name) = name else {
            continue;
        };
        let kind = if u.ratio(7u8, 8)? {
            *u.choose(&[
                RecordType::A,
                RecordType::AAAA,
                RecordType::PTR,
                RecordType::HTTPS,
                RecordType::SVCB,
                RecordType::MX,
                RecordType::TXT,
                RecordType::ANY,
                RecordType::CNAME,
            ])?
        } else {
            RecordType::from(u.arbitrary::<u16>()?)
        };
        let mut query = Query::query(name, kind);
        if u.ratio(1u8, 16)? {
            query.set_query_class(DNSClass::CH);
        }
        message.add_query(query);
    }
    if u.ratio(1u8, 4)? {
        message.set_edns(Edns::new());
    }
    Ok(message.to_vec().unwrap_or_default())
}

/// A name as the stub keys it: lowercase, without the root's dot.
fn normalise(name: &Name) -> String {
    let text = name.to_ascii().to_ascii_lowercase();
    text.strip_suffix('.').map(str::to_owned).unwrap_or(text)
}

/// The address a reverse name stands for (`1.0.96.100.in-addr.arpa`, or 32 nibbles under
/// `ip6.arpa`).
fn reverse_address(name: &str) -> Option<IpAddr> {
    if let Some(labels) = name.strip_suffix(".in-addr.arpa") {
        let octets: Vec<u8> = labels
            .split('.')
            .rev()
            .map(|l| l.parse().ok())
            .collect::<Option<_>>()?;
        let octets: [u8; 4] = octets.try_into().ok()?;
        return Some(IpAddr::from(octets));
    }
    let nibbles = name.strip_suffix(".ip6.arpa")?;
    let digits: Vec<u32> = nibbles
        .split('.')
        .rev()
        .map(|l| match l.as_bytes() {
            [digit] => char::from(*digit).to_digit(16),
            _ => None,
        })
        .collect::<Option<_>>()?;
    if digits.len() != 32 {
        return None;
    }
    let value = digits
        .iter()
        .fold(0u128, |value, digit| (value << 4) | u128::from(*digit));
    Some(IpAddr::V6(Ipv6Addr::from(value)))
}
