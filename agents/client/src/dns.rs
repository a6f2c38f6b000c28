//! The client's DNS front: UDP and TCP sockets that stand for a sentinel address, the
//! service that puts their queries to the stub (`fz_dns::Stub`) and sends its answers back,
//! and the forwarding of pass-through queries to their upstream.
//!
//! Sockets run as tasks and hand each query to the event loop with a [`Reply`], the way back
//! to the application; the loop owns the stub through [`DnsService`], so the stub stays a
//! plain state machine. A UDP answer leaves straight from the socket the query came in on; a
//! TCP connection's task writes its answers in order. A query whose answer never comes (the
//! stub dropped it, the upstream is silent) simply gets none, as a DNS server's silence.
//!
//! Under load, UDP goes in batches ([`fz_host::datagrams`]): the front reads up to
//! [`BATCH`] queries per system call, the loop takes what is queued in one go
//! ([`DnsService::handle_queries`]) and sends that batch's forwarded queries, and its answers,
//! a system call per batch; an upstream socket's answers are read and sent back the same way.
//! Each query and answer is its own datagram, so the system calls are most of a pass-through's
//! cost. A forwarded query offers to take at most a receive slot back (its EDNS payload size
//! is capped at 4 KiB); a longer answer comes truncated, and the application asks over TCP.
//!
//! Pass-through over UDP goes through one connected socket per upstream ([`UdpExchange`])
//! rather than a socket per query: a socket's set-up and tear-down cost more than the query.
//! Each forwarded query gets a fresh random id on the wire, its own id back in the answer,
//! and an answer counts only if it comes from the upstream (the socket is connected), carries
//! an id in flight and repeats the query's question. A socket is retired after
//! [`QUERIES_PER_SOCKET`] queries, so its port, which an off-path spoofer would have to
//! guess along with the id, does not stay the same for long.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fz_dns::{Event, Handled, QueryId, Stub};
use fz_host::datagrams::{self, BATCH, Inbox};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

/// How long an upstream has to answer a forwarded query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How many queries one upstream socket carries before a fresh one (a fresh port) takes over.
pub const QUERIES_PER_SOCKET: u32 = 1024;
/// How many random ids a forwarded query may draw before one is free (or randomness fails).
const ID_DRAWS: usize = 16;
/// How long a TCP client may take to send its query.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The DNS header's length: the question starts after it.
const HEADER: usize = 12;
/// The type of EDNS's pseudo-record, whose class is the UDP payload size its sender takes.
const OPT: u16 = 41;
/// The largest UDP payload a forwarded query offers to take back: what a receive slot holds
/// ([`datagrams::SLOT_BYTES`]). Queries themselves are smaller still: a name and two numbers.
const UDP_PAYLOAD_CAP: u16 = 4096;
const _: () = assert!(UDP_PAYLOAD_CAP as usize == datagrams::SLOT_BYTES);

/// A query from an application, on its way to the event loop.
#[derive(Debug)]
pub struct DnsQuery {
    pub sentinel: IpAddr,
    pub bytes: Vec<u8>,
    pub reply: Reply,
}

/// The way an answer goes back to the application that asked.
#[derive(Debug)]
pub enum Reply {
    /// Out of the UDP socket the query came in on, to its sender.
    Udp {
        socket: Arc<std::net::UdpSocket>,
        to: SocketAddr,
    },
    /// To the TCP connection's task, which writes answers in the order of their queries.
    Tcp(oneshot::Sender<Vec<u8>>),
}

impl Reply {
    /// Sends the answer now (`Answers` sends many at once). A UDP answer that the socket cannot
    /// take now is lost, as it would be on the network; the application asks again. (UDP sends
    /// go through a `std` handle of the socket: tokio's `try_send_to` refuses until the runtime
    /// has seen the socket writable, which a socket that only ever sends this way may never
    /// be.)
    pub fn send(self, answer: &[u8]) {
        match self {
            Reply::Udp { socket, to } => {
                if let Err(error) = socket.send_to(answer, to) {
                    tracing::debug!(%error, "cannot send a DNS answer");
                }
            }
            Reply::Tcp(connection) => {
                let _ = connection.send(answer.to_vec());
            }
        }
    }
}

/// Binds UDP and TCP on `listen` for `sentinel` and sends every query to `queries`. Returns
/// the address bound (the port, when `listen` asked for any).
pub async fn serve(
    sentinel: IpAddr,
    listen: SocketAddr,
    queries: mpsc::Sender<DnsQuery>,
) -> io::Result<SocketAddr> {
    let udp = UdpSocket::bind(listen).await?;
    let bound = udp.local_addr()?;
    let tcp = TcpListener::bind(bound).await?;
    tokio::spawn(serve_udp(sentinel, udp, queries.clone()));
    tokio::spawn(serve_tcp(sentinel, tcp, queries));
    Ok(bound)
}

async fn serve_udp(sentinel: IpAddr, socket: UdpSocket, queries: mpsc::Sender<DnsQuery>) {
    let sender = match socket.as_fd().try_clone_to_owned() {
        Ok(fd) => Arc::new(std::net::UdpSocket::from(fd)),
        Err(error) => {
            tracing::warn!(%error, "cannot share the DNS socket for answers");
            return;
        }
    };
    let mut inbox = Inbox::default();
    loop {
        if let Err(error) = inbox.recv(&socket).await {
            tracing::debug!(%error, "a DNS socket's read failed");
            continue;
        }
        for (from, bytes) in inbox.datagrams() {
            let query = DnsQuery {
                sentinel,
                bytes: bytes.to_vec(),
                reply: Reply::Udp {
                    socket: sender.clone(),
                    to: from,
                },
            };
            if queries.send(query).await.is_err() {
                return;
            }
        }
    }
}

/// UDP answers gathered to leave together: a system call per socket and [`BATCH`] answers
/// rather than one per answer. TCP answers go to their connection's task at once.
#[derive(Debug, Default)]
struct Answers {
    udp: Vec<(Arc<std::net::UdpSocket>, SocketAddr, Vec<u8>)>,
}

impl Answers {
    fn push(&mut self, reply: Reply, answer: Vec<u8>) {
        match reply {
            Reply::Udp { socket, to } => self.udp.push((socket, to, answer)),
            tcp @ Reply::Tcp(_) => tcp.send(&answer),
        }
    }

    /// Sends what was gathered, each run of answers for one socket in as few calls as may be.
    fn send(&mut self) {
        let mut rest = self.udp.as_slice();
        while let Some((socket, _, _)) = rest.first() {
            let run = rest
                .iter()
                .position(|(other, _, _)| !Arc::ptr_eq(other, socket))
                .unwrap_or(rest.len());
            let (same_socket, after) = rest.split_at(run);
            let datagrams: Vec<(Option<SocketAddr>, &[u8])> = same_socket
                .iter()
                .map(|(_, to, answer)| (Some(*to), answer.as_slice()))
                .collect();
            let refused = datagrams::send_all(socket.as_ref(), &datagrams);
            if refused > 0 {
                tracing::debug!(refused, "DNS answers the socket would not take");
            }
            rest = after;
        }
        self.udp.clear();
    }
}

async fn serve_tcp(sentinel: IpAddr, listener: TcpListener, queries: mpsc::Sender<DnsQuery>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_connection(sentinel, stream, queries.clone()));
    }
}

/// One TCP connection: length-prefixed queries, answered in order, until the client closes
/// or is too slow.
async fn serve_connection(
    sentinel: IpAddr,
    mut stream: TcpStream,
    queries: mpsc::Sender<DnsQuery>,
) {
    loop {
        let Ok(Ok(bytes)) = tokio::time::timeout(TCP_READ_TIMEOUT, read_framed(&mut stream)).await
        else {
            return;
        };
        let (answer, answered) = oneshot::channel();
        let query = DnsQuery {
            sentinel,
            bytes,
            reply: Reply::Tcp(answer),
        };
        if queries.send(query).await.is_err() {
            return;
        }
        let Ok(answer) = answered.await else {
            // No answer (dropped): close, as a server would.
            return;
        };
        if write_framed(&mut stream, &answer).await.is_err() {
            return;
        }
    }
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let length = stream.read_u16().await?;
    let mut bytes = vec![0u8; usize::from(length)];
    stream.read_exact(&mut bytes).await?;
    Ok(bytes)
}

async fn write_framed(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let length = u16::try_from(bytes.len()).map_err(|_| io::ErrorKind::InvalidData)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await
}

/// Passes a TCP query to its upstream over a connection of its own, and the answer back,
/// both unchanged.
async fn forward_tcp(upstream: SocketAddr, query: Vec<u8>, answer: oneshot::Sender<Vec<u8>>) {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        write_framed(&mut stream, &query).await?;
        read_framed(&mut stream).await
    };
    match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
        Ok(Ok(bytes)) => {
            let _ = answer.send(bytes);
        }
        Ok(Err(error)) => tracing::debug!(%error, "an upstream exchange over TCP failed"),
        Err(_) => tracing::debug!("an upstream did not answer over TCP in time"),
    }
}

/// The upstreams' UDP sockets, one in service per upstream, and the ids they put on the wire.
#[derive(Debug, Default)]
struct Upstreams {
    in_service: HashMap<SocketAddr, InService>,
    ids: RandomIds,
}

#[derive(Debug)]
struct InService {
    exchange: Arc<UdpExchange>,
    queries: u32,
}

impl Upstreams {
    /// Passes a query to its upstream and the answer, with the query's own id, back to the
    /// application; TCP queries go over TCP, so a truncated UDP answer goes back truncated and
    /// the application asks again over TCP, as it would of the upstream itself.
    fn forward(&mut self, upstream: SocketAddr, query: Vec<u8>, reply: Reply, now: Instant) {
        let reply = match reply {
            Reply::Tcp(answer) => {
                tokio::spawn(forward_tcp(upstream, query, answer));
                return;
            }
            udp @ Reply::Udp { .. } => udp,
        };
        let in_service = match self.in_service.entry(upstream) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => match UdpExchange::open(upstream) {
                Ok(exchange) => entry.insert(InService {
                    exchange,
                    queries: 0,
                }),
                Err(error) => {
                    tracing::debug!(%error, %upstream, "cannot open a socket to an upstream");
                    return;
                }
            },
        };
        in_service.exchange.queue(&mut self.ids, query, reply, now);
        in_service.queries += 1;
        if in_service.queries >= QUERIES_PER_SOCKET {
            // The next query opens a fresh socket; this one sends what it has queued and
            // answers what it has in flight.
            in_service.exchange.send_queued();
            in_service.exchange.retire();
            self.in_service.remove(&upstream);
        }
    }

    /// Sends the queries queued since the last call, a system call per upstream.
    fn send_queued(&self) {
        for in_service in self.in_service.values() {
            in_service.exchange.send_queued();
        }
    }
}

/// One connected UDP socket to an upstream, the queries in flight on it, and the task that
/// reads their answers.
#[derive(Debug)]
struct UdpExchange {
    socket: UdpSocket,
    /// The same socket for sends, which need no readiness (see [`Reply::send`]).
    sender: std::net::UdpSocket,
    in_flight: Mutex<InFlight>,
    retired: AtomicBool,
}

#[derive(Debug, Default)]
struct InFlight {
    by_wire_id: HashMap<u16, Waiting>,
    /// Wire ids in the order queued, which is the order of their deadlines.
    deadlines: VecDeque<(Instant, u16)>,
    /// Wire ids queued and not yet sent.
    unsent: Vec<u16>,
}

#[derive(Debug)]
struct Waiting {
    /// The query as sent, with the wire id.
    query: Vec<u8>,
    /// Where the question ends in `query`: the answer must repeat it.
    question_end: usize,
    original_id: [u8; 2],
    reply: Reply,
    deadline: Instant,
}

impl UdpExchange {
    fn open(upstream: SocketAddr) -> io::Result<Arc<UdpExchange>> {
        let any: SocketAddr = match upstream {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(any)?;
        // Connected: the kernel hands this socket datagrams from the upstream only.
        socket.connect(upstream)?;
        socket.set_nonblocking(true)?;
        let exchange = Arc::new(UdpExchange {
            sender: socket.try_clone()?,
            socket: UdpSocket::from_std(socket)?,
            in_flight: Mutex::default(),
            retired: AtomicBool::new(false),
        });
        tokio::spawn(exchange.clone().read_answers());
        Ok(exchange)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        // Nothing panics while holding the lock, and the map stays whole if something did.
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a query in flight with a fresh wire id; [`UdpExchange::send_queued`] sends it.
    fn queue(&self, ids: &mut RandomIds, mut query: Vec<u8>, reply: Reply, now: Instant) {
        let mut in_flight = self.in_flight();
        in_flight.expire(now);
        let Some(question_end) = question_end(&query) else {
            tracing::debug!("a pass-through query without a whole question is dropped");
            return;
        };
        cap_udp_payload(&mut query, question_end);
        let Some(id) = query.get_mut(..2) else {
            return;
        };
        // An id drawn again while in flight (one in 65,536 per query in flight) is drawn anew.
        let Some(wire_id) = (0..ID_DRAWS)
            .filter_map(|_| ids.next())
            .find(|wire_id| !in_flight.by_wire_id.contains_key(wire_id))
        else {
            tracing::warn!("no free random DNS id; a pass-through query is dropped");
            return;
        };
        let original_id = [id[0], id[1]];
        id.copy_from_slice(&wire_id.to_be_bytes());
        let deadline = now + UPSTREAM_TIMEOUT;
        in_flight.deadlines.push_back((deadline, wire_id));
        in_flight.unsent.push(wire_id);
        in_flight.by_wire_id.insert(
            wire_id,
            Waiting {
                query,
                question_end,
                original_id,
                reply,
                deadline,
            },
        );
    }

    /// Sends the queued queries. One the kernel refuses is not retried: it expires unanswered,
    /// as a query lost on the network would, and the application asks again.
    fn send_queued(&self) {
        let mut in_flight = self.in_flight();
        if in_flight.unsent.is_empty() {
            return;
        }
        let unsent = std::mem::take(&mut in_flight.unsent);
        let queries: Vec<(Option<SocketAddr>, &[u8])> = unsent
            .iter()
            .filter_map(|wire_id| in_flight.by_wire_id.get(wire_id))
            .map(|waiting| (None, waiting.query.as_slice()))
            .collect();
        let refused = datagrams::send_all(&self.sender, &queries);
        if refused > 0 {
            tracing::debug!(refused, "queries an upstream socket would not take");
        }
        drop(queries);
        // The list's allocation is kept for the next batch.
        in_flight.unsent = unsent;
        in_flight.unsent.clear();
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Reads answers until the socket is retired and has nothing in flight. What is there
    /// when the socket wakes (up to [`BATCH`]) is read, and goes back to the applications,
    /// together. No answer is larger than a receive slot: the queries said so
    /// ([`cap_udp_payload`]); one that is anyway is dropped, and its query expires.
    async fn read_answers(self: Arc<UdpExchange>) {
        let mut inbox = Inbox::default();
        let mut answers = Answers::default();
        loop {
            // The timeout lets a retired socket whose queries went unanswered see them expire.
            match tokio::time::timeout(UPSTREAM_TIMEOUT, inbox.recv(&self.socket)).await {
                Ok(Ok(())) => {
                    for (_, answer) in inbox.datagrams() {
                        self.answer(answer, &mut answers);
                    }
                    answers.send();
                }
                // An upstream's ICMP error shows up here once; its queries just expire.
                Ok(Err(error)) => tracing::debug!(%error, "an upstream socket"),
                Err(_) => {}
            }
            let mut in_flight = self.in_flight();
            in_flight.expire(Instant::now());
            if self.retired.load(Ordering::Relaxed) && in_flight.by_wire_id.is_empty() {
                return;
            }
        }
    }

    /// Matches an answer to its query and gathers it for the application.
    fn answer(&self, answer: &[u8], answers: &mut Answers) {
        let Some(&[high, low]) = answer.get(..2) else {
            return;
        };
        let mut in_flight = self.in_flight();
        let wire_id = u16::from_be_bytes([high, low]);
        let Some(waiting) = in_flight.by_wire_id.get(&wire_id) else {
            tracing::debug!("an upstream answer for no query in flight is dropped");
            return;
        };
        let question = waiting.query.get(HEADER..waiting.question_end);
        if question.is_none() || answer.get(HEADER..waiting.question_end) != question {
            tracing::debug!("an upstream answer that does not repeat the question is dropped");
            return;
        }
        let Some(waiting) = in_flight.by_wire_id.remove(&wire_id) else {
            return;
        };
        drop(in_flight);
        let mut answer = answer.to_vec();
        if let Some(id) = answer.get_mut(..2) {
            id.copy_from_slice(&waiting.original_id);
        }
        answers.push(waiting.reply, answer);
    }
}

impl InFlight {
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, wire_id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // The id may have been answered and used again since: only this query expires.
            if self
                .by_wire_id
                .get(&wire_id)
                .is_some_and(|waiting| waiting.deadline == deadline)
            {
                self.by_wire_id.remove(&wire_id);
            }
        }
    }
}

/// Where the question section of a DNS message ends, or `None` when it is not whole.
fn question_end(message: &[u8]) -> Option<usize> {
    let mut at = HEADER;
    for _ in 0..section_count(message, 4)? {
        // Type and class.
        at = name_end(message, at)? + 4;
    }
    (at <= message.len()).then_some(at)
}

/// The count of records in a section, from the header field at `offset`.
fn section_count(message: &[u8], offset: usize) -> Option<usize> {
    let count = message.get(offset..offset + 2)?;
    Some(usize::from(u16::from_be_bytes([count[0], count[1]])))
}

/// Where the name that starts at `at` ends. Names in a query are written out in full; a
/// compression pointer ends a name too.
fn name_end(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let length = *message.get(at)?;
        if length == 0 {
            return Some(at + 1);
        }
        if length & 0xC0 == 0xC0 {
            return Some(at + 2);
        }
        at += 1 + usize::from(length);
    }
}

/// Caps the UDP payload size that a query's EDNS record (OPT) offers at [`UDP_PAYLOAD_CAP`],
/// so that no answer comes back larger than the stub reads. An upstream with more to say sets
/// TC, and the application asks again over TCP, which has no such limit. A query whose
/// records cannot be read goes as it is: its answer is at most what it offered, and the
/// upstream's answer to a malformed query is an error.
fn cap_udp_payload(query: &mut [u8], question_end: usize) {
    let (Some(answers), Some(authorities), Some(additionals)) = (
        section_count(query, 6),
        section_count(query, 8),
        section_count(query, 10),
    ) else {
        return;
    };
    let mut at = question_end;
    for index in 0..answers + authorities + additionals {
        // Type, class, TTL and the data's length follow the name.
        let Some(fixed_at) = name_end(query, at) else {
            return;
        };
        let Some(
            &[
                type_high,
                type_low,
                class_high,
                class_low,
                _,
                _,
                _,
                _,
                length_high,
                length_low,
            ],
        ) = query.get(fixed_at..fixed_at + 10)
        else {
            return;
        };
        if index >= answers + authorities && u16::from_be_bytes([type_high, type_low]) == OPT {
            let offered = u16::from_be_bytes([class_high, class_low]);
            if let Some(class) = query.get_mut(fixed_at + 2..fixed_at + 4) {
                class.copy_from_slice(&offered.min(UDP_PAYLOAD_CAP).to_be_bytes());
            }
        }
        at = fixed_at + 10 + usize::from(u16::from_be_bytes([length_high, length_low]));
    }
}

/// Random 16-bit ids, drawn from the system's generator a batch at a time.
#[derive(Debug)]
struct RandomIds {
    batch: [u8; 512],
    used: usize,
}

impl Default for RandomIds {
    fn default() -> Self {
        RandomIds {
            batch: [0; 512],
            used: 512,
        }
    }
}

impl RandomIds {
    fn next(&mut self) -> Option<u16> {
        if self.used + 2 > self.batch.len() {
            getrandom::fill(&mut self.batch).ok()?;
            self.used = 0;
        }
        let id = self.batch.get(self.used..self.used + 2)?;
        self.used += 2;
        Some(u16::from_be_bytes([id[0], id[1]]))
    }
}

/// The stub as the event loop drives it: queries in, answers out through their channels.
#[derive(Debug)]
pub struct DnsService {
    stub: Stub,
    waiting: HashMap<QueryId, Reply>,
    next_query: QueryId,
    upstreams: Upstreams,
    answers: Answers,
}

impl DnsService {
    pub fn new(stub: Stub) -> DnsService {
        DnsService {
            stub,
            waiting: HashMap::new(),
            next_query: 0,
            upstreams: Upstreams::default(),
            answers: Answers::default(),
        }
    }

    pub fn stub(&self) -> &Stub {
        &self.stub
    }

    pub fn stub_mut(&mut self) -> &mut Stub {
        &mut self.stub
    }

    /// `first` and the queries queued behind it (up to [`BATCH`] in all), each answered, held,
    /// dropped or passed to its upstream; then the batch's answers and forwarded queries are
    /// sent, a system call per socket.
    pub fn handle_queries(
        &mut self,
        first: DnsQuery,
        queued: &mut mpsc::Receiver<DnsQuery>,
        now: Instant,
    ) {
        self.handle_query(first, now);
        for _ in 1..BATCH {
            let Ok(query) = queued.try_recv() else {
                break;
            };
            self.handle_query(query, now);
        }
        self.answers.send();
        self.upstreams.send_queued();
    }

    fn handle_query(&mut self, query: DnsQuery, now: Instant) {
        self.next_query += 1;
        let id = self.next_query;
        match self
            .stub
            .handle_query(id, query.sentinel, &query.bytes, now)
        {
            Handled::Answer(bytes) => self.answers.push(query.reply, bytes),
            Handled::Forward(upstream) => {
                self.upstreams
                    .forward(upstream, query.bytes, query.reply, now);
            }
            Handled::Later => {
                self.waiting.insert(id, query.reply);
            }
            Handled::Drop => {}
        }
    }

    /// The stub's events: answers go to their sockets; the rest (access requests, denials)
    /// are the loop's to act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        loop {
            match self.stub.poll_event()? {
                Event::Answer { query, bytes } => {
                    if let Some(reply) = self.waiting.remove(&query) {
                        reply.send(&bytes);
                    }
                }
                other => return Some(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::RecordType;

    use super::*;

    /// A query for `www.example.org` (A), with EDNS offering `payload` when there is one.
    fn query(payload: Option<u16>) -> Vec<u8> {
        let mut query = Message::query();
        query.add_query(Query::query(
            "www.example.org.".parse().unwrap(),
            RecordType::A,
        ));
        if let Some(payload) = payload {
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            query.set_edns(edns);
        }
        query.to_vec().unwrap()
    }

    fn capped(mut bytes: Vec<u8>) -> Vec<u8> {
        let end = question_end(&bytes).unwrap();
        cap_udp_payload(&mut bytes, end);
        bytes
    }

    #[test]
    fn a_query_offering_more_than_a_slot_offers_a_slot() {
        let forwarded = Message::from_vec(&capped(query(Some(65_535)))).unwrap();
        let edns = forwarded.edns.expect("EDNS stays");
        assert_eq!(edns.max_payload(), UDP_PAYLOAD_CAP);
        assert_eq!(
            forwarded.queries,
            Message::from_vec(&query(None)).unwrap().queries
        );
    }

    #[test]
    fn a_query_offering_less_or_nothing_goes_unchanged() {
        for bytes in [query(Some(1232)), query(Some(UDP_PAYLOAD_CAP)), query(None)] {
            assert_eq!(capped(bytes.clone()), bytes);
        }
    }

    #[test]
    fn a_query_whose_records_are_cut_short_goes_unchanged() {
        let whole = query(Some(65_535));
        let end = question_end(&whole).unwrap();
        for length in end..whole.len() {
            let mut cut = whole[..length].to_vec();
            cap_udp_payload(&mut cut, end);
            assert_eq!(cut, whole[..length], "cut at {length}");
        }
    }
}
