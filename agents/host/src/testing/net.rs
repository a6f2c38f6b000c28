//! The servers a test runs in its namespaces (greeters and a DNS server, on the test's tokio
//! runtime), and the connections it makes to them.

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::AsyncWriteExt as _;

use super::WAIT;
use super::netns::Netns;

/// How long a connection that must fail is given. A connection through the tunnel takes
/// milliseconds, and the gateway's drop counter confirms each refusal.
pub const REFUSAL: Duration = Duration::from_millis(700);

/// A non-blocking UDP socket on `address`, for the runtime; bind it inside a namespace.
pub fn udp_socket(address: impl ToSocketAddrs) -> UdpSocket {
    let socket = UdpSocket::bind(address).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
}

/// A non-blocking TCP listener on `address`, for the runtime; bind it inside a namespace.
pub fn tcp_listener(address: impl ToSocketAddrs) -> TcpListener {
    let listener = TcpListener::bind(address).unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Writes `<name> <the peer's address>` to every connection and closes it.
pub async fn greet(listener: TcpListener, name: &'static str) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let line = format!("{name} {}\n", peer.ip());
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// A name with this label gets no answer from [`serve_dns`].
pub const LAME_LABEL: &str = "lame";

/// Answers A queries for the names in `zone` (lower case, with the final dot); a known name
/// has no other records, and everything else is NXDOMAIN, except names with a label
/// [`LAME_LABEL`], which get no answer at all (as under a lame delegation).
pub async fn serve_dns(socket: UdpSocket, zone: &'static [(&'static str, Ipv4Addr)]) {
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let mut buf = vec![0; 4096];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let lame = query.queries.first().is_some_and(|q| {
            q.name()
                .to_ascii()
                .to_lowercase()
                .split('.')
                .any(|label| label == LAME_LABEL)
        });
        if lame {
            continue;
        }
        if let Ok(answer) = dns_answer(&query, zone).to_vec() {
            let _ = socket.send_to(&answer, from).await;
        }
    }
}

fn dns_answer(query: &Message, zone: &[(&str, Ipv4Addr)]) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.message_type = MessageType::Response;
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let Some(question) = query.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    response.add_query(question.clone());
    let name = question.name().to_ascii().to_lowercase();
    let Some((_, address)) = zone.iter().find(|(known, _)| *known == name) else {
        response.metadata.response_code = ResponseCode::NXDomain;
        return response;
    };
    // A known name with no AAAA record: NOERROR with no answer.
    if question.query_type() == RecordType::A {
        let record = Record::from_rdata(question.name().clone(), 60, RData::A(A(*address)));
        response.add_answer(record);
    }
    response
}

/// A DNS query for the A records of `name`, with `id` and recursion desired: the bytes a
/// client puts in a UDP datagram to port 53.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    query.to_vec().unwrap()
}

/// The IPv4 addresses a DNS response with `id` answers; `None` when the bytes are no such
/// response.
pub fn a_answers(id: u16, response: &[u8]) -> Option<Vec<Ipv4Addr>> {
    let message = Message::from_vec(response).ok()?;
    if message.metadata.id != id || message.metadata.message_type != MessageType::Response {
        return None;
    }
    let addresses = message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(A(address)) => Some(*address),
            _ => None,
        })
        .collect();
    Some(addresses)
}

/// Connects to `to` and reads the server's first line, each within `patience`. Run inside a
/// namespace.
///
/// The read is bounded by `patience` as well as the connect: a tunnel taken away between the
/// two (a grant withdrawn just after the handshake) leaves the greeting undelivered, and a
/// loop timing a refusal must see that attempt fail within its patience, not after [`WAIT`].
pub fn try_greeting(to: &str, patience: Duration) -> std::io::Result<String> {
    let to: SocketAddr = to.parse().unwrap();
    let stream = TcpStream::connect_timeout(&to, patience)?;
    stream.set_read_timeout(Some(patience))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("closed without a greeting"));
    }
    Ok(line.trim_end().to_owned())
}

/// Connects from the local address and port `from` (bound first, as a host does to pick
/// its source port) to `to`, within `patience`: a timeout is an error of kind `TimedOut`.
/// Run inside a namespace.
pub fn connect_from(
    from: SocketAddr,
    to: SocketAddr,
    patience: Duration,
) -> std::io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let socket = match from {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(from)?;
        match tokio::time::timeout(patience, socket.connect(to)).await {
            Ok(stream) => stream?.into_std(),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from {to} within {patience:?}"),
            )),
        }
    })
}

/// Connects from `ns` to `to` and reads the server's greeting line, failing without one.
pub fn greeting(ns: &Netns, to: &str) -> String {
    ns.run(|| try_greeting(to, WAIT))
        .unwrap_or_else(|error| panic!("no greeting from {to}: {error}"))
}

/// Checks that a connection from `ns` to `to` does not come up within [`REFUSAL`].
pub fn cannot_connect(ns: &Netns, to: &str) {
    let to: SocketAddr = to.parse().unwrap();
    let outcome = ns.run(move || TcpStream::connect_timeout(&to, REFUSAL));
    assert!(outcome.is_err(), "connected to {to}, which no grant allows");
}
