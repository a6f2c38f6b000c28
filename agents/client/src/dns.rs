//! The client's DNS front: UDP and TCP sockets that stand for a sentinel address, the
//! service that puts their queries to the stub (`fz_dns::Stub`) and sends its answers back,
//! and the forwarding of pass-through queries to their upstream.
//!
//! Sockets run as tasks and hand each query to the event loop with a one-shot channel for the
//! answer; the loop owns the stub through [`DnsService`], so the stub stays a plain state
//! machine. A query whose answer never comes (the stub dropped it, the upstream is silent)
//! simply gets none, as a DNS server's silence.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fz_dns::{Event, Handled, QueryId, Stub};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

/// How long an upstream has to answer a forwarded query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP client may take to send its query.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest DNS message over UDP the stub takes or forwards (EDNS allows up to 64 KiB).
const MAX_MESSAGE: usize = 65_535;

/// How a query came, which is how it is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A query from an application, on its way to the event loop.
#[derive(Debug)]
pub struct DnsQuery {
    pub sentinel: IpAddr,
    pub transport: Transport,
    pub bytes: Vec<u8>,
    pub answer: oneshot::Sender<Vec<u8>>,
}

/// A query to pass through: the loop spawns [`forward`] for it.
#[derive(Debug)]
pub struct Forward {
    pub upstream: SocketAddr,
    pub transport: Transport,
    pub bytes: Vec<u8>,
    pub answer: oneshot::Sender<Vec<u8>>,
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
    let socket = std::sync::Arc::new(socket);
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((length, from)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let Some(bytes) = buffer.get(..length) else {
            continue;
        };
        let (answer, answered) = oneshot::channel();
        let query = DnsQuery {
            sentinel,
            transport: Transport::Udp,
            bytes: bytes.to_vec(),
            answer,
        };
        if queries.send(query).await.is_err() {
            return;
        }
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Ok(bytes) = answered.await
                && let Err(error) = socket.send_to(&bytes, from).await
            {
                tracing::debug!(%error, "cannot send a DNS answer");
            }
        });
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
            transport: Transport::Tcp,
            bytes,
            answer,
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

/// Passes a query to its upstream and its answer back, both unchanged. Over UDP only an
/// answer from the upstream's address with the query's id counts, so nobody else can slip
/// one in; a truncated answer goes back truncated, and the application asks again over TCP.
pub async fn forward(job: Forward) {
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        match job.transport {
            Transport::Udp => exchange_udp(job.upstream, &job.bytes).await,
            Transport::Tcp => exchange_tcp(job.upstream, &job.bytes).await,
        }
    })
    .await;
    match answer {
        Ok(Ok(bytes)) => {
            let _ = job.answer.send(bytes);
        }
        Ok(Err(error)) => tracing::debug!(%error, "an upstream exchange failed"),
        Err(_) => tracing::debug!("an upstream did not answer in time"),
    }
}

async fn exchange_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let id = query.get(..2);
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        // A connected socket only takes datagrams from the upstream.
        let length = socket.recv(&mut buffer).await?;
        let answer = buffer.get(..length).unwrap_or_default();
        if answer.get(..2) == id {
            return Ok(answer.to_vec());
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

/// The stub as the event loop drives it: queries in, answers out through their channels.
#[derive(Debug)]
pub struct DnsService {
    stub: Stub,
    waiting: HashMap<QueryId, oneshot::Sender<Vec<u8>>>,
    next_query: QueryId,
}

impl DnsService {
    pub fn new(stub: Stub) -> DnsService {
        DnsService {
            stub,
            waiting: HashMap::new(),
            next_query: 0,
        }
    }

    pub fn stub(&self) -> &Stub {
        &self.stub
    }

    pub fn stub_mut(&mut self) -> &mut Stub {
        &mut self.stub
    }

    /// A query from a socket: answered now, held, dropped, or returned to forward.
    pub fn handle_query(&mut self, query: DnsQuery, now: Instant) -> Option<Forward> {
        self.next_query += 1;
        let id = self.next_query;
        match self
            .stub
            .handle_query(id, query.sentinel, &query.bytes, now)
        {
            Handled::Answer(bytes) => {
                let _ = query.answer.send(bytes);
                None
            }
            Handled::Forward(upstream) => Some(Forward {
                upstream,
                transport: query.transport,
                bytes: query.bytes,
                answer: query.answer,
            }),
            Handled::Later => {
                self.waiting.insert(id, query.answer);
                None
            }
            Handled::Drop => None,
        }
    }

    /// The stub's events: answers go to their sockets; the rest (access requests, denials)
    /// are the loop's to act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        loop {
            match self.stub.poll_event()? {
                Event::Answer { query, bytes } => {
                    if let Some(answer) = self.waiting.remove(&query) {
                        let _ = answer.send(bytes);
                    }
                }
                other => return Some(other),
            }
        }
    }
}
