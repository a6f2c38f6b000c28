//! The gateway core behind a real UDP socket on loopback, against plain UDP between two
//! sockets, in one run: how many 1420-byte packets a second arrive.
//!
//! Each phase has two threads and fresh sockets on 127.0.0.1. The sender sends 1420-byte
//! packets as fast as it can: for the tunnelled phases it is a client's boringtun `Tunn`
//! sealing each packet (1452-byte datagrams), for the plain phases a `send()` of the 1420
//! bytes. The receiver runs the same loop in both: receive, read the clock, hand the datagram
//! on. Tunnelled, "on" is the `Gateway` core (`handle_network`, with its timers run when
//! `poll_timeout` says, as a driver would) and a packet counts when it comes out as
//! `Output::Tun`; plain, every datagram counts. The client holds a DNS grant (tcp/443, mapped
//! 100.96.0.1 → 172.16.0.5), so the filter and the NAT run on every packet.
//!
//! Each phase warms up for 0.5 s, then counts for 2.5 s what arrives (not what was sent); loss
//! is 1 − arrived/sent over the counting window. Phases run one packet per syscall
//! (`send`/`recv_from`), in batches of 32 (`sendmmsg`/`recvmmsg`), and with UDP GSO/GRO: the
//! sender lays 32 equal-sized datagrams end to end and sends them with one `sendmsg` carrying
//! a `UDP_SEGMENT` control message, and the receiver, with `UDP_GRO` on, gets them back as one
//! coalesced buffer from one `recvmsg`, its `UDP_GRO` control message giving the segment size,
//! and splits it. All through nix, no unsafe code. The last two phases use the agents' own
//! socket, `fz_host::udp`, as the drivers do (quinn-udp underneath): the sender queues 64
//! datagrams in a `SendQueue`, which one `Udp::send` hands over as one GSO run, and the
//! receiver's `Udp::recv` takes up to 16 coalesced buffers in one `recvmmsg`, split by
//! `RecvBatch::datagrams`; each side on a single-threaded tokio runtime of its own, as in the
//! agents. The eight phases run five rounds, interleaved; the table gives the round with the
//! median arrival rate of each.
//! Goals: tunnelled at least 0.6x plain one packet per syscall, and at least 1.0x the plain
//! unbatched rate with batched IO.
//!
//! CPU time per packet is each thread's own (`/proc/thread-self/schedstat`) over the counting
//! window, divided by the packets counted; on loopback the sender's thread also pays for
//! delivering each datagram into the receiver's socket. Also printed: datagrams per receive
//! call, and how often per packet the receiver slept waiting (its voluntary context switches):
//! a receiver that keeps up sleeps whenever its queue runs dry, and the sender pays to wake it.
//!
//! Nothing can hang: sockets have 100 ms timeouts and both threads stop at a deadline of their
//! own even if told nothing. Run by hand: `cargo bench -p fz-tunnel --bench udp_loopback`
//! (about 90 s). Without `--bench` (`cargo test --benches`) each phase runs once for 0.1 s.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)] // a bench: it prints its figures, and a setup that fails should fail loudly

#[path = "common/setup.rs"]
#[allow(dead_code)] // this bench uses the gateway and the client's packet, not the rest
mod setup;

use std::hint::black_box;
use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use fz_host::udp::{RecvBatch, SendQueue, Udp};
use fz_tunnel::Output;
use fz_tunnel::gateway::{Gateway, MAX_DATAGRAM};
use nix::errno::Errno;
use nix::sys::socket::sockopt::UdpGroSegment;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, recvmsg,
    sendmmsg, sendmsg, setsockopt,
};
use setup::PACKET;

/// Datagrams per `sendmmsg`/`recvmmsg`, and segments per GSO send.
const BATCH: usize = 32;
/// Datagrams the agents' socket is given per send: one GSO run, as many as Linux takes.
const RUN: usize = 64;
/// Room for any datagram in a receive slot.
const SLOT: usize = 2048;
/// Room for any coalesced GRO buffer: the kernel caps one at an IP packet's 64 KiB.
const COALESCED: usize = 65_536;
const TIMEOUT: Duration = Duration::from_millis(100);

const WARMING: u8 = 0;
const COUNTING: u8 = 1;
const STOPPED: u8 = 2;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let bench = std::env::args().any(|a| a == "--bench");
    let timing = if bench {
        Timing {
            rounds: 5,
            warm_up: Duration::from_millis(500),
            count: Duration::from_millis(2500),
        }
    } else {
        Timing {
            rounds: 1,
            warm_up: Duration::from_millis(20),
            count: Duration::from_millis(100),
        }
    };
    // The handshake happens in process; the gateway's peer then roams to each phase's socket.
    let setup = setup::gateway_with_client("127.0.0.1:9".parse().expect("an address"));
    let mut tunnel = Tunnel {
        gateway: setup.gateway,
        client: setup.client,
        packet: setup::to_resource(),
    };

    let phases = [
        (Path::Plain, Io::Single),
        (Path::Tunnelled, Io::Single),
        (Path::Plain, Io::Batched),
        (Path::Tunnelled, Io::Batched),
        (Path::Plain, Io::Segmented),
        (Path::Tunnelled, Io::Segmented),
        (Path::Plain, Io::Agents),
        (Path::Tunnelled, Io::Agents),
    ];
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); phases.len()];
    println!(
        "udp_loopback: {PACKET}-byte packets, {} rounds of {:?} warm-up + {:?} counted per phase",
        timing.rounds, timing.warm_up, timing.count
    );
    for round in 1..=timing.rounds {
        for ((path, io), results) in phases.iter().zip(&mut results) {
            let outcome = run_phase(*path, *io, &mut tunnel, &timing);
            println!(
                "round {round}: {:<28} {}",
                label(*path, *io),
                outcome.line()
            );
            assert!(outcome.arrived > 0, "nothing arrived: {outcome:?}");
            results.push(outcome);
        }
    }

    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>7} {:>10} {:>10} {:>9} {:>10}",
        "median of rounds",
        "arrived/s",
        "sent/s",
        "loss",
        "rx CPU ns",
        "tx CPU ns",
        "pkt/recv",
        "rx sleeps"
    );
    let medians: Vec<Outcome> = results.iter().map(|r| median(r)).collect();
    for ((path, io), outcome) in phases.iter().zip(&medians) {
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>6.2}% {:>10.0} {:>10.0} {:>9.1} {:>10.2}",
            label(*path, *io),
            outcome.arrived_per_second(),
            outcome.sent_per_second(),
            outcome.loss() * 100.0,
            outcome.receiver_ns_per_packet(),
            outcome.sender_ns_per_packet(),
            outcome.packets_per_receive(),
            outcome.receiver_sleeps_per_packet(),
        );
    }
    let [
        plain,
        tunnelled,
        plain_batched,
        tunnelled_batched,
        plain_segmented,
        tunnelled_segmented,
        plain_agents,
        tunnelled_agents,
    ] = medians
        .iter()
        .map(Outcome::arrived_per_second)
        .collect::<Vec<_>>()[..]
    else {
        unreachable!("eight phases");
    };
    println!();
    println!(
        "tunnelled / plain, 1 packet per syscall:          {:.3}x (goal: at least 0.6x)",
        tunnelled / plain
    );
    println!(
        "tunnelled batched / plain, 1 packet per syscall:  {:.3}x (goal: at least 1.0x)",
        tunnelled_batched / plain
    );
    println!(
        "tunnelled batched / plain batched:                {:.3}x",
        tunnelled_batched / plain_batched
    );
    println!(
        "tunnelled GSO/GRO / plain, 1 packet per syscall:  {:.3}x (goal: at least 1.0x)",
        tunnelled_segmented / plain
    );
    println!(
        "tunnelled GSO/GRO / plain GSO/GRO:                {:.3}x",
        tunnelled_segmented / plain_segmented
    );
    println!(
        "tunnelled agents' socket / plain, 1 per syscall:  {:.3}x",
        tunnelled_agents / plain
    );
    println!(
        "tunnelled agents' socket / plain agents' socket:  {:.3}x",
        tunnelled_agents / plain_agents
    );
}

struct Timing {
    rounds: usize,
    warm_up: Duration,
    count: Duration,
}

#[derive(Clone, Copy, Debug)]
enum Path {
    Plain,
    Tunnelled,
}

#[derive(Clone, Copy, Debug)]
enum Io {
    /// `send` and `recv_from`: one packet per syscall.
    Single,
    /// `sendmmsg` and `recvmmsg` of up to [`BATCH`] packets.
    Batched,
    /// UDP GSO and GRO: one `sendmsg` of [`BATCH`] equal segments, one `recvmsg` per
    /// coalesced buffer.
    Segmented,
    /// The agents' socket (`fz_host::udp`): GSO runs of [`RUN`] from a `SendQueue`, and
    /// `recvmmsg` of up to 16 coalesced buffers.
    Agents,
}

fn label(path: Path, io: Io) -> String {
    let path = match path {
        Path::Plain => "plain",
        Path::Tunnelled => "tunnelled",
    };
    let io = match io {
        Io::Single => "1 per syscall".to_owned(),
        Io::Batched => format!("batches of {BATCH}"),
        Io::Segmented => format!("GSO/GRO of {BATCH}"),
        Io::Agents => "agents' socket".to_owned(),
    };
    format!("{path}, {io}")
}

/// The gateway and its client, moved into a phase's threads and back.
struct Tunnel {
    gateway: Gateway,
    client: Tunn,
    packet: Vec<u8>,
}

/// What one phase counted over its counting window.
#[derive(Clone, Debug, Default)]
struct Outcome {
    seconds: f64,
    sent: u64,
    arrived: u64,
    /// Datagrams the gateway received but did not put out as a packet (should be none).
    refused: u64,
    send_errors: u64,
    sender: Usage,
    receiver: Usage,
    /// Receive calls that returned datagrams.
    receive_calls: u64,
}

impl Outcome {
    fn arrived_per_second(&self) -> f64 {
        self.arrived as f64 / self.seconds
    }

    fn sent_per_second(&self) -> f64 {
        self.sent as f64 / self.seconds
    }

    fn loss(&self) -> f64 {
        (1.0 - self.arrived as f64 / self.sent.max(1) as f64).max(0.0)
    }

    fn receiver_ns_per_packet(&self) -> f64 {
        self.receiver.cpu_ns as f64 / self.arrived.max(1) as f64
    }

    fn sender_ns_per_packet(&self) -> f64 {
        self.sender.cpu_ns as f64 / self.sent.max(1) as f64
    }

    fn packets_per_receive(&self) -> f64 {
        (self.arrived + self.refused) as f64 / self.receive_calls.max(1) as f64
    }

    /// How often the receiver went to sleep waiting, per packet.
    fn receiver_sleeps_per_packet(&self) -> f64 {
        self.receiver.sleeps as f64 / self.arrived.max(1) as f64
    }

    fn line(&self) -> String {
        format!(
            "arrived {:>7.0}/s  sent {:>7.0}/s  loss {:>5.2}%  CPU rx {:>4.0} tx {:>4.0} ns/pkt  \
             {:>4.1} pkt/recv  {:.2} rx sleeps/pkt  refused {}  send errors {}",
            self.arrived_per_second(),
            self.sent_per_second(),
            self.loss() * 100.0,
            self.receiver_ns_per_packet(),
            self.sender_ns_per_packet(),
            self.packets_per_receive(),
            self.receiver_sleeps_per_packet(),
            self.refused,
            self.send_errors,
        )
    }
}

/// The round with the median arrival rate.
fn median(outcomes: &[Outcome]) -> Outcome {
    let mut sorted = outcomes.to_vec();
    sorted.sort_by(|a, b| a.arrived_per_second().total_cmp(&b.arrived_per_second()));
    sorted[sorted.len() / 2].clone()
}

fn run_phase(path: Path, io: Io, tunnel: &mut Tunnel, timing: &Timing) -> Outcome {
    let receiver = UdpSocket::bind("127.0.0.1:0").expect("a receiving socket");
    let sender = UdpSocket::bind("127.0.0.1:0").expect("a sending socket");
    sender
        .connect(receiver.local_addr().expect("an address"))
        .expect("connected");
    for socket in [&receiver, &sender] {
        socket.set_read_timeout(Some(TIMEOUT)).expect("a timeout");
        socket.set_write_timeout(Some(TIMEOUT)).expect("a timeout");
    }
    // Only the phases on the agents' socket use these, each on its thread's runtime.
    let (agents_receiver, agents_sender) = (AgentSocket::bind(), AgentSocket::bind());
    let agents_destination = agents_receiver.udp.local_addr().expect("an address");
    if matches!(io, Io::Segmented) {
        // Before the sender starts: without it the kernel splits each GSO send back into
        // datagrams on delivery, and the receiver would see them one by one.
        setsockopt(&receiver, UdpGroSegment, &true).expect("UDP_GRO on the receiver");
    }
    let state = AtomicU8::new(WARMING);
    // Both threads give up by themselves after this, whatever happens here.
    let deadline = Instant::now() + timing.warm_up + timing.count + Duration::from_secs(10);
    let Tunnel {
        gateway,
        client,
        packet,
    } = tunnel;

    std::thread::scope(|scope| {
        // Named, so that `perf report --sort comm` tells them apart.
        let receiving = std::thread::Builder::new().name("receiver".into());
        let receiving = receiving.spawn_scoped(scope, || {
            let mut reply = vec![0u8; MAX_DATAGRAM];
            let mut hand_on = |from: SocketAddr, datagram: &[u8], now: Instant| match path {
                Path::Plain => {
                    black_box(datagram);
                    true
                }
                Path::Tunnelled => drive(gateway, &receiver, from, datagram, &mut reply, now),
            };
            match io {
                Io::Single => receive_single(&receiver, &state, deadline, &mut hand_on),
                Io::Batched => receive_batched(&receiver, &state, deadline, &mut hand_on),
                Io::Segmented => receive_coalesced(&receiver, &state, deadline, &mut hand_on),
                Io::Agents => receive_agents(&agents_receiver, &state, deadline, &mut hand_on),
            }
        });
        let sending = std::thread::Builder::new().name("sender".into());
        let sending = sending.spawn_scoped(scope, || {
            let mut seal = |slot: &mut [u8]| match path {
                // The slots hold the plain packet already.
                Path::Plain => PACKET,
                Path::Tunnelled => match client.encapsulate(packet, slot) {
                    TunnResult::WriteToNetwork(datagram) => datagram.len(),
                    other => panic!("the client could not seal: {other:?}"),
                },
            };
            match io {
                Io::Single => send_single(&sender, &state, deadline, &mut seal),
                Io::Batched => send_batched(&sender, &state, deadline, &mut seal),
                Io::Segmented => send_segmented(&sender, &state, deadline, &mut seal),
                Io::Agents => send_agents(
                    &agents_sender,
                    agents_destination,
                    &state,
                    deadline,
                    &mut seal,
                ),
            }
        });
        let (receiving, sending) = (
            receiving.expect("a receiver thread"),
            sending.expect("a sender thread"),
        );

        std::thread::sleep(timing.warm_up);
        state.store(COUNTING, Ordering::Relaxed);
        let start = Instant::now();
        std::thread::sleep(timing.count);
        state.store(STOPPED, Ordering::Relaxed);
        let seconds = start.elapsed().as_secs_f64();
        let received = receiving.join().expect("the receiver");
        let sent = sending.join().expect("the sender");
        Outcome {
            seconds,
            sent: sent.packets,
            arrived: received.delivered,
            refused: received.refused,
            send_errors: sent.errors,
            sender: sent.used,
            receiver: received.used,
            receive_calls: received.calls,
        }
    })
}

/// The gateway driver's work for one datagram: the core, then whatever it asks for. True when
/// a packet came out for the TUN device.
fn drive(
    gateway: &mut Gateway,
    socket: &UdpSocket,
    from: SocketAddr,
    datagram: &[u8],
    buffer: &mut [u8],
    now: Instant,
) -> bool {
    let delivered = match gateway.handle_network(from, datagram, buffer, now) {
        Some(Output::Tun(packet)) => {
            black_box(packet);
            true
        }
        Some(Output::Network(to, reply)) => {
            let _ = socket.send_to(&reply, to);
            false
        }
        None => false,
    };
    if gateway.poll_timeout(now).is_some_and(|due| due <= now) {
        gateway.handle_timeout(now);
        while let Some(transmit) = gateway.poll_transmit() {
            let _ = socket.send_to(&transmit.payload, transmit.destination);
        }
        while gateway.poll_event().is_some() {}
    }
    delivered
}

/// What a receiver counted while counting.
#[derive(Default)]
struct Received {
    delivered: u64,
    refused: u64,
    calls: u64,
    used: Usage,
}

/// What a sender counted while counting.
#[derive(Default)]
struct Sent {
    packets: u64,
    errors: u64,
    used: Usage,
}

/// A thread's CPU time and voluntary context switches (sleeps waiting for something).
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_ns: u64,
    sleeps: u64,
}

impl Usage {
    /// This thread's so far, from `/proc/thread-self` (zero where it cannot be read).
    fn now() -> Usage {
        let cpu_ns = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let sleeps = std::fs::read_to_string("/proc/thread-self/status")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        Usage { cpu_ns, sleeps }
    }

    fn since(self, start: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(start.cpu_ns),
            sleeps: self.sleeps.saturating_sub(start.sleeps),
        }
    }
}

/// Tells when the counting window opens and closes, and what this thread used over it.
struct Window<'a> {
    state: &'a AtomicU8,
    deadline: Instant,
    seen: u8,
    at_start: Usage,
    used: Usage,
}

impl Window<'_> {
    fn new(state: &AtomicU8, deadline: Instant) -> Window<'_> {
        Window {
            state,
            deadline,
            seen: WARMING,
            at_start: Usage::default(),
            used: Usage::default(),
        }
    }

    /// The state now; `None` once the phase is over (or past the deadline).
    fn poll(&mut self) -> Option<u8> {
        let state = self.state.load(Ordering::Relaxed);
        if state != self.seen {
            match state {
                COUNTING => self.at_start = Usage::now(),
                _ => self.used = Usage::now().since(self.at_start),
            }
            self.seen = state;
        }
        (state != STOPPED).then_some(state)
    }

    fn past_deadline(&self) -> bool {
        Instant::now() > self.deadline
    }
}

fn receive_single(
    socket: &UdpSocket,
    state: &AtomicU8,
    deadline: Instant,
    hand_on: &mut dyn FnMut(SocketAddr, &[u8], Instant) -> bool,
) -> Received {
    let mut window = Window::new(state, deadline);
    let mut counts = Received::default();
    let mut buffer = vec![0u8; SLOT];
    while let Some(state) = window.poll() {
        match socket.recv_from(&mut buffer) {
            Ok((length, from)) => {
                let now = Instant::now();
                let delivered = hand_on(from, &buffer[..length], now);
                if state == COUNTING {
                    counts.calls += 1;
                    count(&mut counts, delivered);
                }
                if now > deadline {
                    break;
                }
            }
            Err(e) if is_timeout(e.kind()) && !window.past_deadline() => {}
            Err(e) if is_timeout(e.kind()) => break,
            Err(e) => panic!("receiving: {e}"),
        }
    }
    counts.used = window.used;
    counts
}

fn receive_batched(
    socket: &UdpSocket,
    state: &AtomicU8,
    deadline: Instant,
    hand_on: &mut dyn FnMut(SocketAddr, &[u8], Instant) -> bool,
) -> Received {
    let mut window = Window::new(state, deadline);
    let mut counts = Received::default();
    let mut storage = vec![0u8; SLOT * BATCH];
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let mut received: [(Option<SockaddrIn>, usize); BATCH] = [(None, 0); BATCH];
    while let Some(state) = window.poll() {
        let mut got = 0;
        {
            let mut slots = storage.chunks_mut(SLOT);
            let mut slices: [[IoSliceMut; 1]; BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(slots.next().expect("BATCH slots"))]);
            // MSG_WAITFORONE: wait (up to the socket's timeout) for the first datagram, then
            // take whatever else is queued without waiting.
            match recvmmsg(
                socket.as_raw_fd(),
                &mut headers,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(messages) => {
                    for (slot, message) in received.iter_mut().zip(messages) {
                        *slot = (message.address, message.bytes);
                        got += 1;
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) if !window.past_deadline() => continue,
                Err(Errno::EAGAIN | Errno::EINTR) => break,
                Err(e) => panic!("receiving: {e}"),
            }
        }
        let now = Instant::now();
        if state == COUNTING {
            counts.calls += 1;
        }
        for (i, (address, length)) in received.iter().take(got).enumerate() {
            let Some(address) = address else {
                continue;
            };
            let from = SocketAddr::V4(SocketAddrV4::from(*address));
            let datagram = &storage[i * SLOT..i * SLOT + length];
            let delivered = hand_on(from, datagram, now);
            if state == COUNTING {
                count(&mut counts, delivered);
            }
        }
        if now > deadline {
            break;
        }
    }
    counts.used = window.used;
    counts
}

/// One `recvmsg` per coalesced GRO buffer, split into its segments, each handed on as the
/// datagram it was sent as.
fn receive_coalesced(
    socket: &UdpSocket,
    state: &AtomicU8,
    deadline: Instant,
    hand_on: &mut dyn FnMut(SocketAddr, &[u8], Instant) -> bool,
) -> Received {
    let mut window = Window::new(state, deadline);
    let mut counts = Received::default();
    let mut buffer = vec![0u8; COALESCED];
    let mut control = nix::cmsg_space!(i32);
    while let Some(state) = window.poll() {
        let (from, length, segment) = {
            let mut slice = [IoSliceMut::new(&mut buffer)];
            match recvmsg::<SockaddrIn>(
                socket.as_raw_fd(),
                &mut slice,
                Some(&mut control),
                MsgFlags::empty(),
            ) {
                Ok(message) => {
                    assert!(
                        !message.flags.contains(MsgFlags::MSG_TRUNC),
                        "a coalesced buffer did not fit in {COALESCED} bytes"
                    );
                    // No UDP_GRO message: the datagram came alone, a segment of its own.
                    let segment = message
                        .cmsgs()
                        .expect("room for the UDP_GRO message")
                        .find_map(|control| match control {
                            ControlMessageOwned::UdpGroSegments(size) => Some(size),
                            _ => None,
                        })
                        .and_then(|size| usize::try_from(size).ok())
                        .filter(|&size| size > 0)
                        .unwrap_or(message.bytes);
                    (message.address, message.bytes, segment)
                }
                Err(Errno::EAGAIN | Errno::EINTR) if !window.past_deadline() => continue,
                Err(Errno::EAGAIN | Errno::EINTR) => break,
                Err(e) => panic!("receiving: {e}"),
            }
        };
        let now = Instant::now();
        if state == COUNTING {
            counts.calls += 1;
        }
        let Some(from) = from else {
            continue;
        };
        let from = SocketAddr::V4(SocketAddrV4::from(from));
        // Every segment is `segment` bytes long but the last, which may be shorter.
        for datagram in buffer[..length].chunks(segment.max(1)) {
            let delivered = hand_on(from, datagram, now);
            if state == COUNTING {
                count(&mut counts, delivered);
            }
        }
        if now > deadline {
            break;
        }
    }
    counts.used = window.used;
    counts
}

fn count(counts: &mut Received, delivered: bool) {
    if delivered {
        counts.delivered += 1;
    } else {
        counts.refused += 1;
    }
}

fn send_single(
    socket: &UdpSocket,
    state: &AtomicU8,
    deadline: Instant,
    seal: &mut dyn FnMut(&mut [u8]) -> usize,
) -> Sent {
    let mut window = Window::new(state, deadline);
    let mut counts = Sent::default();
    let mut slot = setup::to_resource();
    slot.resize(SLOT, 0);
    let mut sends: u64 = 0;
    while let Some(state) = window.poll() {
        let length = seal(&mut slot);
        match socket.send(&slot[..length]) {
            Ok(_) if state == COUNTING => counts.packets += 1,
            Ok(_) => {}
            Err(e) if state == COUNTING && is_transient(&e) => counts.errors += 1,
            Err(e) if is_transient(&e) => {}
            Err(e) => panic!("sending: {e}"),
        }
        sends += 1;
        if sends.is_multiple_of(1024) && window.past_deadline() {
            break;
        }
    }
    counts.used = window.used;
    counts
}

fn send_batched(
    socket: &UdpSocket,
    state: &AtomicU8,
    deadline: Instant,
    seal: &mut dyn FnMut(&mut [u8]) -> usize,
) -> Sent {
    let mut window = Window::new(state, deadline);
    let mut counts = Sent::default();
    let mut slot = setup::to_resource();
    slot.resize(SLOT, 0);
    let mut slots = vec![slot; BATCH];
    let mut lengths = [0usize; BATCH];
    // `()`: the socket is connected, so no message names an address.
    let mut headers = MultiHeaders::<()>::preallocate(BATCH, None);
    let addresses = [None::<()>; BATCH];
    while let Some(state) = window.poll() {
        for (slot, length) in slots.iter_mut().zip(&mut lengths) {
            *length = seal(slot);
        }
        let slices: [[IoSlice; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(&slots[i][..lengths[i]])]);
        match sendmmsg(
            socket.as_raw_fd(),
            &mut headers,
            &slices,
            addresses,
            [] as [ControlMessage; 0],
            MsgFlags::empty(),
        ) {
            Ok(sent) if state == COUNTING => counts.packets += sent.count() as u64,
            Ok(_) => {}
            Err(e) if state == COUNTING && is_transient(&e.into()) => counts.errors += 1,
            Err(e) if is_transient(&e.into()) => {}
            Err(e) => panic!("sending: {e}"),
        }
        if window.past_deadline() {
            break;
        }
    }
    counts.used = window.used;
    counts
}

/// [`BATCH`] datagrams sealed end to end into one buffer and sent with one `sendmsg`, the
/// `UDP_SEGMENT` control message telling the kernel where to cut: GSO needs every segment but
/// the last to be the same size, which holds here since every packet is, sealed or not.
fn send_segmented(
    socket: &UdpSocket,
    state: &AtomicU8,
    deadline: Instant,
    seal: &mut dyn FnMut(&mut [u8]) -> usize,
) -> Sent {
    let mut window = Window::new(state, deadline);
    let mut counts = Sent::default();
    // The plain phase's `seal` writes nothing, so the buffer holds the plain packet end to end
    // from the start; a tunnelled phase's seals over it.
    let mut buffer: Vec<u8> = std::iter::repeat_n(setup::to_resource(), BATCH)
        .flatten()
        .collect();
    // Room for the last seal, which boringtun wants a whole slot for.
    buffer.resize(BATCH * SLOT, 0);
    while let Some(state) = window.poll() {
        let mut length = 0;
        let mut segment = 0;
        for _ in 0..BATCH {
            let sealed = seal(&mut buffer[length..length + SLOT]);
            if segment == 0 {
                segment = sealed;
            }
            assert_eq!(sealed, segment, "GSO needs segments of one size");
            length += sealed;
        }
        let segment = u16::try_from(segment).expect("a segment fits in a datagram");
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&buffer[..length])],
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            None,
        ) {
            Ok(_) if state == COUNTING => counts.packets += BATCH as u64,
            Ok(_) => {}
            Err(e) if state == COUNTING && is_transient(&e.into()) => counts.errors += 1,
            Err(e) if is_transient(&e.into()) => {}
            Err(e) => panic!("sending: {e}"),
        }
        if window.past_deadline() {
            break;
        }
    }
    counts.used = window.used;
    counts
}

/// The agents' socket and the single-threaded runtime that drives it, as in an agent.
struct AgentSocket {
    runtime: tokio::runtime::Runtime,
    udp: Udp,
}

impl AgentSocket {
    fn bind() -> AgentSocket {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let udp = {
            let _inside = runtime.enter();
            Udp::bind("127.0.0.1:0".parse().expect("an address")).expect("the agents' socket")
        };
        AgentSocket { runtime, udp }
    }
}

/// `Udp::recv` as the drivers call it, each datagram of the batch handed on in order.
fn receive_agents(
    socket: &AgentSocket,
    state: &AtomicU8,
    deadline: Instant,
    hand_on: &mut dyn FnMut(SocketAddr, &[u8], Instant) -> bool,
) -> Received {
    let mut window = Window::new(state, deadline);
    let mut counts = Received::default();
    let mut batch = RecvBatch::default();
    socket.runtime.block_on(async {
        while let Some(state) = window.poll() {
            match tokio::time::timeout(TIMEOUT, socket.udp.recv(&mut batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if is_transient(&e) => continue,
                Ok(Err(e)) => panic!("receiving: {e}"),
                Err(_) if !window.past_deadline() => continue,
                Err(_) => break,
            }
            let now = Instant::now();
            if state == COUNTING {
                counts.calls += 1;
            }
            for (from, datagram) in batch.datagrams() {
                let delivered = hand_on(from, datagram, now);
                if state == COUNTING {
                    count(&mut counts, delivered);
                }
            }
            if now > deadline {
                break;
            }
        }
    });
    counts.used = window.used;
    counts
}

/// [`RUN`] datagrams queued as the drivers queue the core's outputs, and one `Udp::send`.
/// The socket logs what the kernel refuses rather than returning it, so only loss shows it.
fn send_agents(
    socket: &AgentSocket,
    destination: SocketAddr,
    state: &AtomicU8,
    deadline: Instant,
    seal: &mut dyn FnMut(&mut [u8]) -> usize,
) -> Sent {
    let mut window = Window::new(state, deadline);
    let mut counts = Sent::default();
    let mut slot = setup::to_resource();
    slot.resize(SLOT, 0);
    let mut queue = SendQueue::default();
    socket.runtime.block_on(async {
        while let Some(state) = window.poll() {
            for _ in 0..RUN {
                let length = seal(&mut slot);
                queue.push(destination, &slot[..length]);
            }
            socket.udp.send(&mut queue).await;
            if state == COUNTING {
                counts.packets += RUN as u64;
            }
            if window.past_deadline() {
                break;
            }
        }
    });
    counts.used = window.used;
    counts
}

fn is_timeout(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Errors a sender on loopback may see and carry on past: a full send buffer, a signal, or
/// the port-unreachable of a receiver that stopped first.
fn is_transient(error: &std::io::Error) -> bool {
    is_timeout(error.kind())
        || error.kind() == ErrorKind::ConnectionRefused
        || error.raw_os_error() == Some(Errno::ENOBUFS as i32)
}
