//! Idle and slow sockets cannot hold the portal: a real portal on loopback, in a process whose
//! open files limit is lowered to [`LIMIT`] before it starts (as systemd's 1,024 would be
//! for a service), flooded with more idle connections than that limit from another process,
//! still lets agents say hello and answers `/healthz`; idle, slow and hello-less connections
//! are closed after their timeouts; a source past its cap is closed at once while others get
//! in, and behind a trusted proxy the cap counts the client the proxy names.
//!
//! Every wait is for an event (a close, an answer) with a bound; nothing sleeps to let
//! something happen. The tests run one at a time: they share the lowered limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a test that cannot set up fails loudly; the flood's child reports on stdout

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Once;
use std::time::Duration;

use fz_host::testing::agents::{Origin, PATIENCE, TestClient, key, next_text, open_with};
use fz_portal::config::ConnectionLimits;
use fz_portal::listener::Caps;
use fz_proto::PortalToClient;
use support::portal::TestPortal;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// The soft open files limit of this test process, and so of the portal in it.
const LIMIT: u64 = 256;

const POLICY: &str =
    "site hq\nresource db { address \"10.0.5.0/24\"; site hq }\nallow everyone -> db\n";

/// Timeouts no test waits for, so that what closes a connection is the cap under test.
const PATIENT: &str = "header_read_timeout_ms = 600000\nhello_timeout_ms = 600000\n";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lowers this process's soft open files limit to [`LIMIT`], once; the hard limit stays, so the
/// flood's child can raise its own.
fn lower_open_files_limit() {
    static LOWERED: Once = Once::new();
    LOWERED.call_once(|| {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        rlimit::Resource::NOFILE.set(LIMIT, hard).unwrap();
    });
}

/// A loopback address of its own for each kind of peer: `127.0.0.N`.
fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

#[tokio::test]
async fn a_flood_beyond_the_open_files_limit_leaves_room_for_agents_and_healthz() {
    let _serial = SERIAL.lock().await;
    lower_open_files_limit();
    let portal = TestPortal::start(POLICY, PATIENT).await;
    let connections = &portal.running().connections;
    let caps = connections.caps();
    assert_eq!(
        caps,
        Caps::for_descriptors(LIMIT, &ConnectionLimits::default()).0
    );
    assert!(caps.total() < LIMIT as usize, "{caps:?}");

    // Idle sockets from many addresses, each address within its cap, more in all than the
    // portal's process could hold open: only the unauthenticated cap can stop them.
    let sources = (LIMIT as usize + 64).div_ceil(caps.per_source);
    let flood = sources * caps.per_source;
    assert!(flood > LIMIT as usize);
    let mut child = Flood::start(
        portal.address(),
        sources,
        caps.per_source,
        flood - caps.unauthenticated,
    );
    assert_eq!(child.report().await, format!("connected {flood}"));
    // The portal closed the oldest idle ones to stay within its cap, and holds the rest.
    assert_eq!(
        child.report().await,
        format!("closed {}", flood - caps.unauthenticated)
    );
    let stats = connections.stats();
    assert_eq!(stats.unauthenticated, caps.unauthenticated, "{stats:?}");
    assert_eq!(
        stats.evicted,
        (flood - caps.unauthenticated) as u64,
        "{stats:?}"
    );
    // And a slow one, sending a header byte at a time (for as long as the portal lets it).
    let slowloris = tokio::spawn(slowloris(portal.address(), loopback(9)));

    // Agents still say hello and get what they ask for, and `/healthz` answers.
    // Bounded: a portal out of descriptors never accepts them, and the upgrade never ends.
    let gateway = tokio::time::timeout(PATIENCE, portal.gateway("acme", "hq", 200))
        .await
        .expect("a gateway connects under the flood");
    let _served = gateway.serve();
    let mut client = tokio::time::timeout(PATIENCE, portal.client("acme", "alice@acme.example", 1))
        .await
        .expect("a client connects under the flood");
    client.grant("db", None).await;
    assert_eq!(healthz(portal.address(), loopback(3)).await, "200");
    let stats = connections.stats();
    assert_eq!(stats.agents, 2, "{stats:?}");
    assert!(stats.unauthenticated <= caps.unauthenticated, "{stats:?}");

    slowloris.abort();
    drop(child);
}

#[tokio::test]
async fn idle_slow_and_hello_less_connections_are_closed_after_their_timeouts() {
    let _serial = SERIAL.lock().await;
    lower_open_files_limit();
    // Short enough to wait for; a connection that is no agent lives at most `hello_timeout`.
    let portal = TestPortal::start(
        POLICY,
        "header_read_timeout_ms = 500\nhello_timeout_ms = 3000\n",
    )
    .await;
    let address = portal.address();

    // Connected, nothing sent: closed by the header read timeout.
    let mut idle = connect(address, loopback(1)).await;
    closed(&mut idle, "an idle connection").await;

    // One header byte at a time: closed all the same.
    tokio::time::timeout(PATIENCE, slowloris(address, loopback(1)))
        .await
        .expect("a slow connection is closed");

    // One request answered, then idle on keep-alive: closed.
    let mut kept = connect(address, loopback(1)).await;
    assert_eq!(
        get_keep_alive(&mut kept, "/healthz").await,
        Some("200".to_owned())
    );
    closed(&mut kept, "an idle keep-alive connection").await;

    // A request every 100 ms never leaves it idle for long, but it is no agent: closed once
    // `hello_timeout` has passed since it connected.
    let busy = async {
        let mut stream = connect(address, loopback(1)).await;
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        loop {
            ticks.tick().await;
            if get_keep_alive(&mut stream, "/healthz").await.is_none() {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, busy)
        .await
        .expect("a busy plain HTTP connection is closed after `hello_timeout`");

    // Upgraded with a live token, but no hello: closed.
    let (_, secret) = portal.client_token("acme", "alice@acme.example").await;
    let mut silent = open_with(address, "acme", "client", &secret, &Origin::default())
        .await
        .expect("the upgrade");
    assert_eq!(next_text(&mut silent).await, None);

    // What says hello in time is served, and stays.
    let mut client = portal.client("acme", "alice@acme.example", 1).await;
    assert!(matches!(
        client.request("db", None).await,
        PortalToClient::Rejected { .. }
    ));
}

#[tokio::test]
async fn a_source_past_its_cap_is_closed_at_once_and_others_get_in() {
    let _serial = SERIAL.lock().await;
    lower_open_files_limit();
    let portal = TestPortal::start(
        POLICY,
        &format!("{PATIENT}max_unauthenticated_per_source = 4\n"),
    )
    .await;
    let address = portal.address();
    let crowded = loopback(1);

    // Four keep-alive connections from one address, each answered, then idle.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(address, crowded).await;
        assert_eq!(
            get_keep_alive(&mut stream, "/healthz").await,
            Some("200".to_owned())
        );
        held.push(stream);
    }
    // A fifth is closed before it is read from (the timeouts are ten minutes).
    let mut fifth = connect(address, crowded).await;
    closed(&mut fifth, "a connection past its source's cap").await;
    let (_, secret) = portal.client_token("acme", "alice@acme.example").await;
    let from = |ip| Origin {
        bind: Some(ip),
        headers: Vec::new(),
    };
    let refused = TestClient::connect_from(
        address,
        portal.pinned(),
        "acme",
        &secret,
        key(1),
        &from(crowded),
    )
    .await;
    assert!(matches!(refused, Err((0, _))), "{refused:?}");
    assert_eq!(portal.running().connections.stats().refused_per_source, 2);

    // Another address gets in: `/healthz`, and an agent, whose connection then no longer
    // counts against its address.
    let other = loopback(2);
    assert_eq!(healthz(address, other).await, "200");
    let mut agents = Vec::new();
    for seed in 1..=6 {
        agents.push(
            TestClient::connect_from(
                address,
                portal.pinned(),
                "acme",
                &secret,
                key(seed),
                &from(other),
            )
            .await
            .expect("an agent from another address connects"),
        );
    }
    // The held ones were never closed.
    for stream in &mut held {
        assert_eq!(
            get_keep_alive(stream, "/healthz").await,
            Some("200".to_owned())
        );
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_cap_counts_the_client_it_names() {
    let _serial = SERIAL.lock().await;
    lower_open_files_limit();
    let portal = TestPortal::start(
        POLICY,
        &format!(
            "{PATIENT}max_unauthenticated_per_source = 1\n\
             trusted_proxy_header = \"x-forwarded-for\"\n"
        ),
    )
    .await;
    let address = portal.address();
    let (_, secret) = portal.client_token("acme", "alice@acme.example").await;
    // The proxy is 127.0.0.1 and opens many connections; each client it names has one.
    let via_proxy = |client: &str| Origin {
        bind: Some(loopback(1)),
        headers: vec![("x-forwarded-for", client.to_owned())],
    };

    let first = open_with(
        address,
        "acme",
        "client",
        &secret,
        &via_proxy("198.51.100.7"),
    )
    .await
    .expect("the first connection of a client upgrades");
    let second = open_with(
        address,
        "acme",
        "client",
        &secret,
        &via_proxy("198.51.100.7"),
    )
    .await;
    assert_eq!(second.err().map(|(status, _)| status), Some(429));
    let mut other = TestClient::connect_from(
        address,
        portal.pinned(),
        "acme",
        &secret,
        key(2),
        &via_proxy("198.51.100.8"),
    )
    .await
    .expect("another client behind the proxy connects");
    assert!(matches!(
        other.request("db", None).await,
        PortalToClient::Rejected { .. }
    ));
    drop(first);
}

#[tokio::test]
async fn agents_past_their_cap_are_told_to_come_back_later() {
    let _serial = SERIAL.lock().await;
    lower_open_files_limit();
    let portal = TestPortal::start(
        POLICY,
        &format!("{PATIENT}max_connections = 3\nmax_unauthenticated_connections = 2\n"),
    )
    .await;
    let first = portal.client("acme", "alice@acme.example", 1).await;
    let (_, secret) = portal.client_token("acme", "bob@acme.example").await;
    let refused =
        TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(2)).await;
    let Err((101, message)) = refused else {
        panic!("expected a refusal after hello, got {refused:?}");
    };
    assert!(message.contains("as many agents as it can"), "{message}");
    assert_eq!(portal.running().connections.stats().refused_agents, 1);
    drop(first);
}

/// Not a test: the flood's own process, started by the flood test with `FZ_FLOOD` set (without
/// it, it returns at once). It raises its open files limit, opens `per_source` idle
/// connections from each of `sources` addresses (127.0.1.1 on), prints `connected N`, waits
/// (with a bound) until the portal has closed `expected` of them and prints `closed N`, then
/// holds the rest until its standard input closes.
#[tokio::test]
async fn flood_child() {
    let Ok(spec) = std::env::var("FZ_FLOOD") else {
        return;
    };
    let words: Vec<&str> = spec.split_whitespace().collect();
    let [portal, sources, per_source, expected] = words.as_slice() else {
        panic!("FZ_FLOOD: `{spec}`");
    };
    let portal: SocketAddr = portal.parse().unwrap();
    let (sources, per_source, expected): (u8, usize, usize) = (
        sources.parse().unwrap(),
        per_source.parse().unwrap(),
        expected.parse().unwrap(),
    );
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut opened = 0;
    for source in 1..=sources {
        for _ in 0..per_source {
            let mut stream = connect(portal, IpAddr::V4(Ipv4Addr::new(127, 0, 1, source))).await;
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut byte = [0_u8; 1];
                let _ = stream.read(&mut byte).await;
                let _ = closed.send(());
            });
            opened += 1;
        }
    }
    println!("flood: connected {opened}");
    let mut closed = 0;
    let all_closed = tokio::time::timeout(3 * PATIENCE, async {
        while closed < expected && closed_rx.recv().await.is_some() {
            closed += 1;
        }
    })
    .await;
    if all_closed.is_err() {
        println!("flood: only {closed} closed");
        return;
    }
    println!("flood: closed {closed}");
    let _ = tokio::task::spawn_blocking(|| {
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest)
    })
    .await;
}

/// The flood's process (this test binary, running [`flood_child`]), killed when dropped.
struct Flood {
    child: std::process::Child,
    /// Its reports, read by a thread of their own.
    reports: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Flood {
    fn start(portal: SocketAddr, sources: usize, per_source: usize, expected: usize) -> Flood {
        assert!(sources < 255);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["flood_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(
                "FZ_FLOOD",
                format!("{portal} {sources} {per_source} {expected}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (send, reports) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                // libtest may have begun the line (`test flood_child ... `).
                if let Some((_, report)) = line.split_once("flood: ") {
                    let _ = send.send(report.to_owned());
                }
            }
        });
        Flood { child, reports }
    }

    /// The child's next report, without its `flood: ` prefix.
    async fn report(&mut self) -> String {
        tokio::time::timeout(4 * PATIENCE, self.reports.recv())
            .await
            .expect("the flood's process reports")
            .expect("the flood's process reports before it ends")
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to the portal from `from`.
async fn connect(portal: SocketAddr, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(portal).await.unwrap()
}

/// Waits (with a bound) until the portal closes the connection.
async fn closed(stream: &mut (impl AsyncRead + Unpin), what: &str) {
    tokio::time::timeout(PATIENCE, eof(stream))
        .await
        .unwrap_or_else(|_| panic!("{what} is still open"));
}

/// Resolves when the peer has closed the stream; whatever it sent before is skipped.
async fn eof(stream: &mut (impl AsyncRead + Unpin)) {
    let mut buffer = [0_u8; 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A connection from `from` that sends a request head one byte every 50 ms, forever; returns
/// once the portal has closed it.
async fn slowloris(portal: SocketAddr, from: IpAddr) {
    let (mut read, mut write) = connect(portal, from).await.into_split();
    let head = b"GET /healthz HTTP/1.1\r\nHost: portal\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let trickle = async {
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        for byte in head {
            ticks.tick().await;
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = eof(&mut read) => {}
        () = trickle => {}
    }
}

/// `GET /healthz` from `from` on a connection of its own; the status code.
async fn healthz(portal: SocketAddr, from: IpAddr) -> String {
    let answer = async {
        let mut stream = connect(portal, from).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("`/healthz` answers");
    status(&response).expect("an HTTP response").to_owned()
}

/// A keep-alive `GET path` on `stream`: the status code, or `None` if the portal closed the
/// connection instead of answering in full.
async fn get_keep_alive(stream: &mut TcpStream, path: &str) -> Option<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: portal\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    let mut byte = [0_u8; 1];
    let head = loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => response.push(byte[0]),
            Ok(_) => return None,
            Err(_) => panic!("no answer to `GET {path}`"),
        }
        if response.ends_with(b"\r\n\r\n") {
            break String::from_utf8(response).unwrap();
        }
    };
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a content length");
    let mut body = vec![0_u8; length];
    stream.read_exact(&mut body).await.ok()?;
    status(&head).map(str::to_owned)
}

fn status(response: &str) -> Option<&str> {
    response.strip_prefix("HTTP/1.1 ")?.split(' ').next()
}
