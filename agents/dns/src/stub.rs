//! The stub's state machine. See the crate documentation for what it answers and why.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use fz_address::{Address, AddressIndex};
use fz_proto::{DnsMapping, Resolution, ResourceView};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::mapped::Allocator;

/// How long answers about resource names live in the application's cache. Short, so that a
/// revoked grant or a new policy shows quickly.
pub const TTL_SECS: u32 = 5;
/// How long a name waits for the portal before its queries get SERVFAIL.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a denial is remembered before the portal is asked again.
pub const DENIAL_MEMORY: Duration = Duration::from_secs(5);
/// Queries one name may have waiting; more get SERVFAIL at once.
pub const MAX_WAITING: usize = 64;
/// The EDNS payload size the stub advertises (the DNS flag day's safe size).
const EDNS_PAYLOAD: u16 = 1232;

/// The driver's name for the socket (or TCP connection) a query came from, so that a later
/// answer can go back there.
pub type QueryId = u64;

/// One upstream resolver and the two addresses on which the stub stands in for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sentinel {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub upstream: SocketAddr,
}

/// What to do with a query now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Send the query, unchanged, to this upstream and its answer, unchanged, back.
    Forward(SocketAddr),
    /// The answer comes later as [`Event::Answer`].
    Later,
    /// Say nothing (unreadable bytes, or a response where a query belongs).
    Drop,
}

/// Something for the driver to do or log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Ask the portal for access to `resource` for this name and its mapped addresses.
    RequestAccess { resource: String, dns: DnsMapping },
    /// The answer to a query [`Handled::Later`] held.
    Answer { query: QueryId, bytes: Vec<u8> },
    /// Policy said no: the queries got an empty answer; this says why, for the log.
    Denied { name: String, reason: String },
}

/// Where a name stands with the portal.
#[derive(Debug)]
enum Access {
    Asking {
        resource: String,
        since: Instant,
        waiting: Vec<(QueryId, Message)>,
    },
    Granted(Resolution),
    Denied {
        until: Instant,
    },
}

/// The DNS stub.
#[derive(Debug)]
pub struct Stub {
    sentinels: Vec<Sentinel>,
    resources: Vec<ResourceView>,
    index: AddressIndex<usize>,
    mapped: Allocator,
    access: HashMap<String, Access>,
    /// The names whose access is `Asking` or `Denied`: the only ones time changes. Kept apart
    /// so that the event loop's `poll_timeout` (called before every wait) never walks the
    /// granted names, however many there are.
    timed: HashSet<String>,
    events: VecDeque<Event>,
}

/// Where the sentinels come from: one IPv4 and one IPv6 address per upstream, in order.
const SENTINEL_V4: u32 = u32::from_be_bytes([100, 100, 111, 0]);
const SENTINEL_V6: u128 = 0xfd00_2021_1111_8000_0100_0100_0111_0000;
/// Each range has 255 usable addresses.
pub const MAX_UPSTREAMS: usize = 255;

impl Stub {
    /// A stub for these upstreams (at most [`MAX_UPSTREAMS`]; more are ignored).
    pub fn new(upstreams: &[SocketAddr]) -> Stub {
        let sentinels = upstreams
            .iter()
            .take(MAX_UPSTREAMS)
            .zip(1u8..)
            .map(|(upstream, n)| Sentinel {
                v4: Ipv4Addr::from(SENTINEL_V4 + u32::from(n)),
                v6: Ipv6Addr::from(SENTINEL_V6 + u128::from(n)),
                upstream: *upstream,
            })
            .collect();
        Stub {
            sentinels,
            resources: Vec::new(),
            index: AddressIndex::new(std::iter::empty()),
            mapped: Allocator::default(),
            access: HashMap::new(),
            timed: HashSet::new(),
            events: VecDeque::new(),
        }
    }

    // ---- getters ----

    pub fn sentinels(&self) -> &[Sentinel] {
        &self.sentinels
    }

    /// The name a mapped address stands for, if the stub handed it out.
    pub fn name_of(&self, mapped: IpAddr) -> Option<&str> {
        self.mapped.name_of(mapped)
    }

    // ---- inputs ----

    /// The resources the user may see, as the portal's `ready` lists them. Names that no
    /// longer match a resource pass through from now on; their mapped addresses stay theirs.
    /// Returns the addresses it could not read (the portal sent something this build does not
    /// understand), so the driver can log them.
    pub fn set_resources(&mut self, resources: Vec<ResourceView>) -> Vec<String> {
        let mut unreadable = Vec::new();
        let parsed: Vec<(Address, usize)> = resources
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.address.parse::<Address>() {
                Ok(address) => Some((address, i)),
                Err(_) => {
                    unreadable.push(r.address.clone());
                    None
                }
            })
            .collect();
        self.index = AddressIndex::new(parsed.iter().map(|(a, i)| (a, *i)));
        self.resources = resources;
        unreadable
    }

    /// A query that arrived on `sentinel` (over UDP or TCP; the bytes are the message
    /// without TCP's length prefix).
    pub fn handle_query(
        &mut self,
        query: QueryId,
        sentinel: IpAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Handled {
        let Ok(request) = Message::from_vec(bytes) else {
            // Unreadable: FORMERR if there is an id to answer to, else silence.
            return match bytes {
                [high, low, ..] => Handled::Answer(form_error(u16::from_be_bytes([*high, *low]))),
                _ => Handled::Drop,
            };
        };
        if request.metadata.message_type != MessageType::Query {
            return Handled::Drop;
        }
        if request.metadata.op_code != OpCode::Query {
            return Handled::Answer(encode(respond(&request, ResponseCode::NotImp)));
        }
        let [question] = request.queries.as_slice() else {
            return Handled::Answer(encode(respond(&request, ResponseCode::FormErr)));
        };
        let name = normalise(question.name());
        let qtype = question.query_type();

        if let Some(address) = reverse_address(&name)
            && fz_proto::is_mapped_address(address)
        {
            // The mapped ranges are ours alone: never ask an upstream about them, whatever
            // the type asked (which mapped address a program looks up is nobody else's).
            let target = self
                .mapped
                .name_of(address)
                .and_then(|name| Name::from_ascii(format!("{name}.")).ok());
            let response = match target {
                Some(target) if qtype == RecordType::PTR => {
                    let mut response = respond(&request, ResponseCode::NoError);
                    let record = Record::from_rdata(
                        question.name().clone(),
                        TTL_SECS,
                        RData::PTR(PTR(target)),
                    );
                    response.add_answer(record);
                    response
                }
                // The name exists, with no record of the type asked.
                Some(_) => respond(&request, ResponseCode::NoError),
                None => respond(&request, ResponseCode::NXDomain),
            };
            return Handled::Answer(encode(response));
        }

        let Some(resource) = self.resource_for(&name) else {
            return match self.upstream_for(sentinel) {
                Some(upstream) => Handled::Forward(upstream),
                None => Handled::Answer(encode(respond(&request, ResponseCode::Refused))),
            };
        };
        if !matches!(qtype, RecordType::A | RecordType::AAAA) {
            // HTTPS and SVCB would tell a browser of other addresses (and ECH keys) that
            // bypass the tunnel; the rest (MX, TXT, ...) are not ours to invent. All get an
            // empty answer, and the name never leaves the machine.
            return Handled::Answer(encode(respond(&request, ResponseCode::NoError)));
        }
        let Some(mapped) = self.mapped.for_name(&name).cloned() else {
            return Handled::Answer(encode(respond(&request, ResponseCode::ServFail)));
        };
        match self.access.get_mut(&name) {
            Some(Access::Granted(resolution)) => {
                Handled::Answer(encode(answer(&request, *resolution, &mapped)))
            }
            Some(Access::Denied { until }) if now < *until => {
                Handled::Answer(encode(respond(&request, ResponseCode::NoError)))
            }
            Some(Access::Asking { waiting, .. }) => {
                if waiting.len() >= MAX_WAITING {
                    return Handled::Answer(encode(respond(&request, ResponseCode::ServFail)));
                }
                waiting.push((query, request));
                Handled::Later
            }
            Some(Access::Denied { .. }) | None => {
                self.timed.insert(name.clone());
                self.access.insert(
                    name.clone(),
                    Access::Asking {
                        resource: resource.clone(),
                        since: now,
                        waiting: vec![(query, request)],
                    },
                );
                self.events.push_back(Event::RequestAccess {
                    resource,
                    dns: DnsMapping {
                        name,
                        mapped: mapped.all(),
                    },
                });
                Handled::Later
            }
        }
    }

    /// The portal granted access for `name`, and the gateway found this for it.
    pub fn handle_granted(&mut self, name: &str, resolution: Resolution) {
        let name = name.to_ascii_lowercase();
        self.timed.remove(&name);
        let previous = self
            .access
            .insert(name.clone(), Access::Granted(resolution));
        let Some(Access::Asking { waiting, .. }) = previous else {
            return;
        };
        let Some(mapped) = self.mapped.for_name(&name).cloned() else {
            return;
        };
        for (query, request) in waiting {
            let bytes = encode(answer(&request, resolution, &mapped));
            self.events.push_back(Event::Answer { query, bytes });
        }
    }

    /// The portal refused access to `resource`: every name of it that is waiting gets an
    /// empty answer, and the refusal is remembered for a moment.
    pub fn handle_rejected(&mut self, resource: &str, reason: &str, now: Instant) {
        let names: Vec<String> = self
            .timed
            .iter()
            .filter(|name| {
                matches!(self.access.get(*name), Some(Access::Asking { resource: r, .. }) if r == resource)
            })
            .cloned()
            .collect();
        for name in names {
            let previous = self.access.insert(
                name.clone(),
                Access::Denied {
                    until: now + DENIAL_MEMORY,
                },
            );
            if let Some(Access::Asking { waiting, .. }) = previous {
                for (query, request) in waiting {
                    let bytes = encode(respond(&request, ResponseCode::NoError));
                    self.events.push_back(Event::Answer { query, bytes });
                }
            }
            self.events.push_back(Event::Denied {
                name,
                reason: reason.to_owned(),
            });
        }
    }

    /// The grant for `name` ended: its next query asks the portal again.
    pub fn handle_revoked(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        if matches!(self.access.get(&name), Some(Access::Granted(_))) {
            self.access.remove(&name);
        }
    }

    /// Names that waited too long for the portal get SERVFAIL; old denials are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let access = &mut self.access;
        self.timed.retain(|name| {
            let over = match access.get_mut(name) {
                Some(Access::Asking { since, waiting, .. }) if now >= *since + ASK_TIMEOUT => {
                    expired.append(waiting);
                    true
                }
                Some(Access::Denied { until }) => now >= *until,
                Some(Access::Asking { .. }) => false,
                Some(Access::Granted(_)) | None => return false,
            };
            if over {
                access.remove(name);
            }
            !over
        });
        for (query, request) in expired {
            let bytes = encode(respond(&request, ResponseCode::ServFail));
            self.events.push_back(Event::Answer { query, bytes });
        }
    }

    // ---- outputs ----

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Stub::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timed
            .iter()
            .filter_map(|name| match self.access.get(name)? {
                Access::Asking { since, .. } => Some(*since + ASK_TIMEOUT),
                Access::Denied { until } => Some(*until),
                Access::Granted(_) => None,
            })
            .min()
    }

    // ---- helpers ----

    /// The id of the DNS resource that serves `name`, if any.
    fn resource_for(&self, name: &str) -> Option<String> {
        let index = self.index.lookup_name(name)?;
        self.resources.get(index).map(|r| r.id.clone())
    }

    fn upstream_for(&self, sentinel: IpAddr) -> Option<SocketAddr> {
        self.sentinels
            .iter()
            .find(|s| IpAddr::V4(s.v4) == sentinel || IpAddr::V6(s.v6) == sentinel)
            .map(|s| s.upstream)
    }
}

/// A name as the stub keys it: lowercase, without the root's dot.
fn normalise(name: &Name) -> String {
    let text = name.to_ascii().to_ascii_lowercase();
    match text.strip_suffix('.') {
        Some(stripped) => stripped.to_owned(),
        None => text,
    }
}

/// The address a reverse name (`4.0.96.100.in-addr.arpa`, `...ip6.arpa`) stands for.
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
    let mut value: u128 = 0;
    let mut count = 0;
    for label in nibbles.split('.').rev() {
        let [digit] = label.as_bytes() else {
            return None;
        };
        value = (value << 4) | u128::from(char::from(*digit).to_digit(16)?);
        count += 1;
    }
    (count == 32).then(|| IpAddr::V6(Ipv6Addr::from(value)))
}

/// A response to `request` with its question, and no records.
fn respond(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.metadata.response_code = code;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// The answer for a granted name: its mapped addresses of the asked family if the name has
/// addresses of that family, an empty answer if not, NXDOMAIN if the name does not exist.
fn answer(request: &Message, resolution: Resolution, mapped: &crate::mapped::Mapped) -> Message {
    let Some(question) = request.queries.first() else {
        return respond(request, ResponseCode::FormErr);
    };
    let (ipv4, ipv6) = match resolution {
        Resolution::NoSuchName => return respond(request, ResponseCode::NXDomain),
        Resolution::Exists { ipv4, ipv6 } => (ipv4, ipv6),
    };
    let mut response = respond(request, ResponseCode::NoError);
    let owner = question.name().clone();
    let records: Vec<RData> = match question.query_type() {
        RecordType::A if ipv4 => mapped.v4.iter().map(|a| RData::A(A(*a))).collect(),
        RecordType::AAAA if ipv6 => mapped.v6.iter().map(|a| RData::AAAA(AAAA(*a))).collect(),
        _ => Vec::new(),
    };
    for data in records {
        response.add_answer(Record::from_rdata(owner.clone(), TTL_SECS, data));
    }
    response
}

fn encode(message: Message) -> Vec<u8> {
    // A message built from a parsed request and our own records always encodes; if hickory
    // ever refuses, SERVFAIL says so rather than silence.
    message
        .to_vec()
        .unwrap_or_else(|_| server_failure(message.metadata.id))
}

/// A bare header: `id`, a response, `code`, no sections.
fn bare(id: u16, code: u8) -> Vec<u8> {
    let [high, low] = id.to_be_bytes();
    vec![high, low, 0x80, code, 0, 0, 0, 0, 0, 0, 0, 0]
}

fn form_error(id: u16) -> Vec<u8> {
    bare(id, 1)
}

fn server_failure(id: u16) -> Vec<u8> {
    bare(id, 2)
}
