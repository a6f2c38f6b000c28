//! The client's DNS front under dnsperf on loopback, beside the same queries sent straight to
//! its upstream and a plain UDP echo: how many cached resource answers a second, how much
//! pass-through costs against asking the upstream directly, and whether anything is lost at
//! half the highest rate.
//!
//! Three servers run in this process on 127.0.0.1, each on a port and a thread of its own:
//! - **the stub**, as `fz-client` runs it: a current-thread tokio runtime (what
//!   `fz_host::agent::run_until_signal` builds) on one thread, with `fz_client::dns::serve`'s
//!   UDP and TCP tasks, the pooled upstream sockets `DnsService` forwards through, and one loop owning a `DnsService`
//!   over a `fz_dns::Stub`, shaped like the DNS half of `driver::serve`'s loop: a channel of
//!   1,024, the deadline from `Stub::poll_timeout` before every wait, `sleep_until` beside the
//!   queue, the stub's events drained after every input. The driver's other inputs (the
//!   tunnels' socket, the TUN device, the portal link) are not there. The stub stands for its
//!   first sentinel and has two DNS resources, `gitlab` = `gitlab.company.com` and `corp` =
//!   `*.corp.example`; the loop plays the portal and grants every `RequestAccess` at once
//!   (IPv4 only), as the `dig` test does.
//! - **the upstream**: blocking `std` UDP sockets on threads of their own (one by default,
//!   `FZ_BENCH_UPSTREAM_THREADS` to change it; they share the socket). It answers
//!   `www<i>.example.org` with one A record and anything else with NXDOMAIN, built with
//!   hickory-proto; each thread keeps the answer to each distinct query (the bytes after the
//!   id) and from then on only copies it and puts the query's id in, so the upstream costs
//!   little more than its two syscalls and the direct figure is its socket's rate, not
//!   hickory's.
//! - **the bare forwarder**, the floor of pass-through: the stub's batched UDP path (the
//!   front's `recvmmsg`, one connected upstream socket, `sendmmsg` both ways, through
//!   `fz_host::datagrams`) on a current-thread runtime of its own, with no DNS in it: ids
//!   swapped through a table, nothing parsed or checked. Whatever the stub does, its
//!   pass-through costs at least this; the gap between the two is the stub's own work.
//! - **the echo**, the ceiling: a current-thread tokio runtime on one thread, one tokio
//!   `UdpSocket`, `recv_from` then `send_to` of the same bytes with the QR bit set. dnsperf
//!   takes any datagram with an outstanding query's id from the right socket as its answer and
//!   never looks at QR, so a bare echo counts too; the bit is set only so that what comes back
//!   is a well-formed response, and nothing else is parsed. This is the stub's UDP front
//!   (same socket type, runtime and thread) without the channel and the stub.
//!
//! Before timing, every resource name is asked once through the stub (so it is granted, and
//! answered from the stub's state from then on) and its answer checked: four mapped addresses
//! in 100.96.0.0/11. A pass-through name is checked to come back with the upstream's address
//! through the stub and directly, and the echo to come back.
//!
//! Each target then gets `FZ_BENCH_ROUNDS` dnsperf runs at its highest rate (`-l` seconds,
//! interleaved round by round), and one at half its median rate (`-Q`) that goes through the
//! query file `-n` times and waits for the stragglers (`-t 2`), so that its lost queries are
//! real losses (at the highest rate, dnsperf's time limit would count the queries still in
//! flight as lost). Targets: the echo; the stub with resource names (`host<i>.corp.example`
//! and `gitlab.company.com`); the stub with pass-through names (`www<i>.example.org`); the
//! upstream directly with the same pass-through names; the bare forwarder with them too. Type A, dnsperf's defaults (RD set, no
//! EDNS).
//!
//! dnsperf's `-q` (outstanding queries) is 150, not more: at its start dnsperf sends up to `-q`
//! queries in one burst, even with `-Q`, and a socket's default receive queue (212,992 bytes)
//! holds about 194 of these datagrams, so with `-q 1000` every run began by losing about 806
//! queries at the server's socket within 100 ms, whatever the server (none with `-q 100`), and
//! those then held their slots until dnsperf's 5 s timeout.
//!
//! Printed per run: dnsperf's queries per second, completed, lost, mean latency; the CPU time
//! per completed query of each server thread (`/proc/self/task/<tid>/schedstat`) and of dnsperf
//! (this process's `cutime` + `cstime`, so its whole run); how busy all CPUs were
//! (`/proc/stat`); and the datagrams the kernel dropped for a full receive queue at the
//! target's listening sockets (`/proc/net/udp`) and anywhere else (`RcvbufErrors` in
//! `/proc/net/snmp`). Then the ratios and the goals: resource answers at least half the
//! echo's rate and 100,000/s, pass-through at least 0.8x direct, no lost query at half rate.
//!
//! Threads are not pinned by default: the scheduler spreads dnsperf's two threads (sender and
//! receiver) and the servers' over the CPUs. `FZ_BENCH_PIN=1` puts every server thread on the
//! last CPU and dnsperf on the others (with `taskset`).
//!
//! Run by hand: `cargo bench -p fz-client --bench dns` (about 3 minutes; needs dnsperf:
//! `apt-get install -y dnsperf`; without it the bench says so and stops). `FZ_BENCH_SECONDS`
//! sets the length of each run (10), `FZ_BENCH_ROUNDS` the rounds (3), `FZ_BENCH_CLIENTS`
//! dnsperf's `-c` (4), `FZ_BENCH_THREADS` its `-T` (1), `FZ_BENCH_OUTSTANDING` its `-q`
//! (150), `FZ_BENCH_NAMES` the number of resource names and of pass-through names (1,000
//! each). `FZ_BENCH_SERVE=<seconds>` only starts the servers, grants the names, prints the
//! ports and waits, for dnsperf and `perf` by hand. Without `--bench` (`cargo test --benches`)
//! there is one round and each run lasts 1 s.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)] // a bench: it prints its figures, and a setup that fails should fail loudly

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fz_client::dns::{self, DnsService};
use fz_dns::{Event, Stub};
use fz_host::datagrams::{self, Inbox};
use fz_proto::{Resolution, ResourceView};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// How a run is shaped; every field can be set from the environment.
#[derive(Debug, Clone)]
struct Settings {
    seconds: u64,
    rounds: u64,
    clients: u64,
    threads: u64,
    outstanding: u64,
    names: u32,
    upstream_threads: u32,
    /// With `FZ_BENCH_PIN=1`: the servers' threads on the last CPU, dnsperf on the others.
    pin: Option<(String, String)>,
}

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
        Err(_) => default,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let bench = std::env::args().any(|a| a == "--bench");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let settings = Settings {
        seconds: env_or("FZ_BENCH_SECONDS", if bench { 10 } else { 1 }),
        rounds: env_or("FZ_BENCH_ROUNDS", if bench { 3 } else { 1 }).max(1),
        clients: env_or("FZ_BENCH_CLIENTS", 4),
        threads: env_or("FZ_BENCH_THREADS", 1),
        outstanding: env_or("FZ_BENCH_OUTSTANDING", 150),
        names: u32::try_from(env_or("FZ_BENCH_NAMES", 1000).max(2)).unwrap(),
        upstream_threads: u32::try_from(env_or("FZ_BENCH_UPSTREAM_THREADS", 1).max(1)).unwrap(),
        pin: (env_or("FZ_BENCH_PIN", 0) == 1 && cpus >= 2)
            .then(|| ((cpus - 1).to_string(), format!("0-{}", cpus - 2))),
    };
    match Command::new("dnsperf").arg("-h").output() {
        Ok(_) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {
            println!(
                "dnsperf is not installed, so there is nothing to measure: \
                 apt-get install -y dnsperf"
            );
            return;
        }
        Err(error) => {
            println!("cannot run dnsperf ({error}), so there is nothing to measure");
            return;
        }
    }

    if !bench {
        println!("(a smoke run, without --bench: short runs whose figures mean little)");
    }
    let upstream = Upstream::start(settings.upstream_threads, settings.names);
    let stub = start_stub(upstream.address);
    let echo = start_echo();
    let forwarder = start_forwarder(upstream.address);
    if let Some((server_cpu, _)) = &settings.pin {
        for tid in stub
            .threads
            .iter()
            .chain(&upstream.threads)
            .chain(&echo.threads)
            .chain(&forwarder.threads)
        {
            tid.pin(server_cpu);
        }
    }

    let directory = tempfile::tempdir().unwrap();
    let resource_names: Vec<String> = std::iter::once("gitlab.company.com".to_owned())
        .chain((1..settings.names).map(|i| format!("host{i}.corp.example")))
        .collect();
    let pass_names: Vec<String> = (0..settings.names)
        .map(|i| format!("www{i}.example.org"))
        .collect();
    let resource_file = write_queries(directory.path(), "resources.txt", &resource_names);
    let pass_file = write_queries(directory.path(), "pass.txt", &pass_names);

    warm_up(
        &stub,
        &echo,
        &forwarder,
        upstream.address,
        &resource_names,
        &pass_names,
    );

    if let Ok(seconds) = std::env::var("FZ_BENCH_SERVE") {
        // For profiling by hand: the servers stay up, names granted, and dnsperf is yours.
        println!(
            "serving for {seconds} s: stub {}, upstream {}, echo {}, forwarder {}; queries in {} \
             (pid {})",
            stub.address,
            upstream.address,
            echo.address,
            forwarder.address,
            directory.path().display(),
            std::process::id(),
        );
        std::thread::sleep(Duration::from_secs(seconds.parse().unwrap()));
        return;
    }

    let targets = [
        Target {
            label: "echo (ceiling)",
            address: echo.address,
            file: pass_file.clone(),
            names: pass_names.len(),
            groups: vec![("echo", echo.threads.clone())],
            ports: vec![echo.address.port()],
        },
        Target {
            label: "stub, resource names (cached)",
            address: stub.address,
            file: resource_file,
            names: resource_names.len(),
            groups: vec![("stub", stub.threads.clone())],
            ports: vec![stub.address.port()],
        },
        Target {
            label: "stub, pass-through",
            address: stub.address,
            file: pass_file.clone(),
            names: pass_names.len(),
            // The upstream works for the stub too: both count, each on its own.
            groups: vec![
                ("stub", stub.threads.clone()),
                ("upstream", upstream.threads.clone()),
            ],
            ports: vec![stub.address.port(), upstream.address.port()],
        },
        Target {
            label: "upstream directly",
            address: upstream.address,
            file: pass_file.clone(),
            names: pass_names.len(),
            groups: vec![("upstream", upstream.threads.clone())],
            ports: vec![upstream.address.port()],
        },
        Target {
            label: "bare forwarder (floor)",
            address: forwarder.address,
            file: pass_file,
            names: pass_names.len(),
            groups: vec![
                ("forwarder", forwarder.threads.clone()),
                ("upstream", upstream.threads.clone()),
            ],
            ports: vec![forwarder.address.port(), upstream.address.port()],
        },
    ];

    println!(
        "dnsperf on 127.0.0.1: {} rounds of {} s per target, -c {} -T {} -q {}; {} resource \
         names, {} pass-through names; upstream threads {}; {cpus} CPUs; {}",
        settings.rounds,
        settings.seconds,
        settings.clients,
        settings.threads,
        settings.outstanding,
        resource_names.len(),
        pass_names.len(),
        settings.upstream_threads,
        match &settings.pin {
            Some((server, dnsperf)) => format!("servers on CPU {server}, dnsperf on {dnsperf}"),
            None => "threads not pinned".to_owned(),
        },
    );
    let mut rounds: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 1..=settings.rounds {
        println!("round {round}, highest rate:");
        for (target, runs) in targets.iter().zip(&mut rounds) {
            let run = measure(&settings, target, None);
            println!("  {:<30} {}", target.label, run.describe(target));
            runs.push(run);
        }
    }
    let highest: Vec<Run> = rounds.iter().map(|runs| median(runs)).collect();
    println!("half the median highest rate:");
    let mut half = Vec::new();
    for (target, run) in targets.iter().zip(&highest) {
        let rate = (run.qps / 2.0).round().max(1.0) as u64;
        let run = measure(&settings, target, Some(rate));
        println!("  {:<30} -Q {rate}: {}", target.label, run.describe(target));
        half.push(run);
    }

    print_table(&targets, &rounds, &highest, &half);
}

/// The run with the median rate (the lower one of the middle two).
fn median(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.qps.total_cmp(&b.qps));
    sorted[(sorted.len() - 1) / 2].clone()
}

/// One dnsperf target: where it listens, what to ask it, which threads serve it, and the
/// ports of its listening sockets (whose drops are the server's).
#[derive(Debug)]
struct Target {
    label: &'static str,
    address: SocketAddr,
    file: PathBuf,
    names: usize,
    groups: Vec<(&'static str, Vec<Tid>)>,
    ports: Vec<u16>,
}

// ---- the servers ----

/// A thread's id under `/proc/self/task`, for its CPU time.
#[derive(Debug, Clone)]
struct Tid(String);

impl Tid {
    fn current() -> Tid {
        // "/proc/thread-self" links to "<pid>/task/<tid>".
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        Tid(link.file_name().unwrap().to_string_lossy().into_owned())
    }

    /// Time on a CPU so far.
    fn cpu(&self) -> Duration {
        let text = std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", self.0))
            .unwrap_or_default();
        let nanos = text
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Duration::from_nanos(nanos)
    }

    /// Keeps the thread on `cpu` from now on.
    fn pin(&self, cpu: &str) {
        let status = Command::new("taskset")
            .args(["-p", "-c", cpu, &self.0])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("FZ_BENCH_PIN needs taskset (util-linux)");
        assert!(status.success(), "taskset failed for thread {}", self.0);
    }
}

/// A server that runs until the process ends.
#[derive(Debug)]
struct Server {
    address: SocketAddr,
    threads: Vec<Tid>,
}

/// Starts `body` on a thread of its own with a current-thread runtime; it sends its address
/// back once bound.
fn on_own_runtime<F, Fut>(name: &str, body: F) -> Server
where
    F: FnOnce(std::sync::mpsc::Sender<SocketAddr>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (bound, address) = std::sync::mpsc::channel();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tid_tx.send(Tid::current()).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(body(bound));
        })
        .unwrap();
    Server {
        address: address.recv().unwrap(),
        threads: vec![tid_rx.recv().unwrap()],
    }
}

/// The client's DNS front as `fz-client` runs it, standing for the first sentinel; the loop
/// grants every name the stub asks for.
fn start_stub(upstream: SocketAddr) -> Server {
    on_own_runtime("stub", move |bound| async move {
        let mut stub = Stub::new(&[upstream]);
        stub.set_resources(vec![
            ResourceView {
                id: "gitlab".into(),
                address: "gitlab.company.com".into(),
            },
            ResourceView {
                id: "corp".into(),
                address: "*.corp.example".into(),
            },
        ]);
        let sentinel = IpAddr::V4(stub.sentinels()[0].v4);
        let mut service = DnsService::new(stub);
        let (queries, mut incoming) = tokio::sync::mpsc::channel(1024);
        let address = dns::serve(sentinel, (Ipv4Addr::LOCALHOST, 0).into(), queries)
            .await
            .unwrap();
        bound.send(address).unwrap();
        // The DNS half of `driver::serve`'s loop.
        loop {
            let deadline = service.stub().poll_timeout();
            let query = tokio::select! {
                Some(query) = incoming.recv() => Some(query),
                () = fz_host::agent::sleep_until(deadline) => None,
            };
            let now = Instant::now();
            match query {
                Some(query) => service.handle_queries(query, &mut incoming, now),
                None => service.stub_mut().handle_timeout(now),
            }
            while let Some(event) = service.poll_event() {
                if let Event::RequestAccess { dns, .. } = event {
                    // The portal's part: granted at once, the name exists with IPv4 only.
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
    })
}

/// The floor of pass-through: the stub's batched UDP path with no DNS in it. A query's id is
/// swapped for a counter's on the way up and back on the way down; nothing else is read.
fn start_forwarder(upstream: SocketAddr) -> Server {
    on_own_runtime("forwarder", move |bound| async move {
        let front = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let to_upstream = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        to_upstream.connect(upstream).await.unwrap();
        bound.send(front.local_addr().unwrap()).unwrap();
        // By wire id: who asked, and with which id.
        let mut asked: Vec<Option<(SocketAddr, [u8; 2])>> = vec![None; 1 << 16];
        let mut wire_id = 0u16;
        let (mut queries, mut answers) = (Inbox::default(), Inbox::default());
        let mut out: Vec<(Option<SocketAddr>, Vec<u8>)> = Vec::new();
        loop {
            let towards = tokio::select! {
                Ok(()) = queries.recv(&front) => {
                    for (from, query) in queries.datagrams() {
                        let Some(&[high, low]) = query.get(..2) else { continue };
                        wire_id = wire_id.wrapping_add(1);
                        asked[usize::from(wire_id)] = Some((from, [high, low]));
                        let mut query = query.to_vec();
                        query[..2].copy_from_slice(&wire_id.to_be_bytes());
                        out.push((None, query));
                    }
                    &to_upstream
                }
                Ok(()) = answers.recv(&to_upstream) => {
                    for (_, answer) in answers.datagrams() {
                        let Some(&[high, low]) = answer.get(..2) else { continue };
                        let Some((to, id)) = asked[usize::from(u16::from_be_bytes([high, low]))].take()
                        else {
                            continue;
                        };
                        let mut answer = answer.to_vec();
                        answer[..2].copy_from_slice(&id);
                        out.push((Some(to), answer));
                    }
                    &front
                }
            };
            let batch: Vec<(Option<SocketAddr>, &[u8])> = out
                .iter()
                .map(|(to, bytes)| (*to, bytes.as_slice()))
                .collect();
            datagrams::send_all(towards, &batch);
            out.clear();
        }
    })
}

/// The ceiling: every datagram straight back with QR set, from one tokio socket on one thread.
fn start_echo() -> Server {
    on_own_runtime("echo", |bound| async move {
        let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        bound.send(socket.local_addr().unwrap()).unwrap();
        let mut buffer = vec![0u8; 65_535];
        loop {
            let Ok((length, from)) = socket.recv_from(&mut buffer).await else {
                continue;
            };
            if let Some(flags) = buffer.get_mut(2) {
                *flags |= 0x80;
            }
            let _ = socket.send_to(&buffer[..length], from).await;
        }
    })
}

/// The upstream: `threads` blocking threads on one socket.
#[derive(Debug)]
struct Upstream {
    address: SocketAddr,
    threads: Vec<Tid>,
}

impl Upstream {
    fn start(threads: u32, names: u32) -> Upstream {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = socket.local_addr().unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        for n in 0..threads.max(1) {
            let socket = socket.try_clone().unwrap();
            let tid_tx = tid_tx.clone();
            std::thread::Builder::new()
                .name(format!("upstream-{n}"))
                .spawn(move || {
                    tid_tx.send(Tid::current()).unwrap();
                    upstream_loop(&socket, names);
                })
                .unwrap();
        }
        Upstream {
            address,
            threads: (0..threads.max(1))
                .map(|_| tid_rx.recv().unwrap())
                .collect(),
        }
    }
}

fn upstream_loop(socket: &std::net::UdpSocket, names: u32) {
    // The answer to each distinct query, keyed by the query after its id, with the id zeroed.
    let mut known: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut buffer = vec![0u8; 65_535];
    let mut reply = Vec::with_capacity(512);
    loop {
        let Ok((length, from)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        let query = &buffer[..length];
        let Some(key) = query.get(2..) else {
            continue;
        };
        reply.clear();
        match known.get(key) {
            Some(answer) => reply.extend_from_slice(answer),
            None => {
                let Some(answer) = upstream_answer(query, names) else {
                    continue;
                };
                if known.len() < 100_000 {
                    known.insert(key.to_vec(), answer.clone());
                }
                reply.extend_from_slice(&answer);
            }
        }
        reply[..2].copy_from_slice(&query[..2]);
        let _ = socket.send_to(&reply, from);
    }
}

/// The upstream's answer to `query`, id zeroed: one A record for `www<i>.example.org` with
/// `i` below `names`, NXDOMAIN for anything else. `None` for what is not a query.
fn upstream_answer(query: &[u8], names: u32) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(0, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let question = query.queries.first()?.clone();
    response.add_query(question.clone());
    let name = question.name().to_ascii().to_ascii_lowercase();
    let index = name
        .strip_prefix("www")
        .and_then(|rest| rest.strip_suffix(".example.org."))
        .and_then(|i| i.parse::<u32>().ok())
        .filter(|i| *i < names);
    match (index, question.query_type()) {
        (Some(i), RecordType::A) => {
            response.add_answer(Record::from_rdata(
                question.name().clone(),
                300,
                RData::A(A(upstream_address(i))),
            ));
        }
        (Some(_), _) => {}
        (None, _) => response.metadata.response_code = ResponseCode::NXDomain,
    }
    response.to_vec().ok()
}

/// What the upstream says `www<i>.example.org` is: 198.18.0.0/15, the benchmarking range.
fn upstream_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([198, 18, 0, 0]) + i)
}

// ---- queries ----

fn write_queries(directory: &Path, file: &str, names: &[String]) -> PathBuf {
    let path = directory.join(file);
    let mut text = String::new();
    for name in names {
        writeln!(text, "{name} A").unwrap();
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Asks `server` for `name` (A) and returns the answer.
fn ask(socket: &std::net::UdpSocket, server: SocketAddr, name: &str, id: u16) -> Vec<u8> {
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.op_code = OpCode::Query;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).unwrap(),
        RecordType::A,
    ));
    let bytes = query.to_vec().unwrap();
    socket.send_to(&bytes, server).unwrap();
    let mut buffer = vec![0u8; 65_535];
    loop {
        let (length, _) = socket
            .recv_from(&mut buffer)
            .unwrap_or_else(|error| panic!("no answer from {server} for {name}: {error}"));
        if buffer[..2] == id.to_be_bytes() {
            return buffer[..length].to_vec();
        }
    }
}

/// Grants every resource name (one query each through the stub) and checks what each server
/// answers.
fn warm_up(
    stub: &Server,
    echo: &Server,
    forwarder: &Server,
    upstream: SocketAddr,
    resource_names: &[String],
    pass_names: &[String],
) {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for (i, name) in resource_names.iter().enumerate() {
        let answer = Message::from_vec(&ask(&socket, stub.address, name, i as u16)).unwrap();
        let addresses: Vec<Ipv4Addr> = answer
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(a)) => Some(a),
                _ => None,
            })
            .collect();
        assert!(
            addresses.len() == 4
                && addresses
                    .iter()
                    .all(|a| u32::from(*a) >> 21 == u32::from(Ipv4Addr::new(100, 96, 0, 0)) >> 21),
            "{name}: not four mapped addresses: {answer:?}"
        );
    }
    for (server, label) in [
        (stub.address, "the stub"),
        (upstream, "the upstream"),
        (forwarder.address, "the bare forwarder"),
    ] {
        let answer = Message::from_vec(&ask(&socket, server, &pass_names[1], 7)).unwrap();
        assert!(
            matches!(answer.answers.as_slice(), [record] if record.data == RData::A(A(upstream_address(1)))),
            "{label} did not pass the upstream's answer: {answer:?}"
        );
    }
    let echoed = ask(&socket, echo.address, &pass_names[0], 9);
    assert_eq!(echoed[2] & 0x80, 0x80, "the echo did not come back");
}

// ---- dnsperf ----

/// What one dnsperf run gave.
#[derive(Debug, Default, Clone)]
struct Run {
    qps: f64,
    sent: u64,
    completed: u64,
    lost: u64,
    latency_ms: f64,
    noerror: u64,
    /// CPU µs per completed query, per group of the target's threads.
    server_cpu_us: Vec<f64>,
    /// dnsperf's CPU µs per completed query, over its whole run.
    dnsperf_cpu_us: f64,
    /// How busy all the CPUs were over the run, 0 to 1.
    busy: f64,
    /// Datagrams the kernel dropped at the target's listening sockets (full receive queue).
    server_drops: u64,
    /// Receive-queue drops at any other UDP socket over the run (dnsperf's, the stub's
    /// upstream sockets, anything else on the machine).
    other_drops: u64,
}

impl Run {
    fn describe(&self, target: &Target) -> String {
        let cpu: Vec<String> = target
            .groups
            .iter()
            .zip(&self.server_cpu_us)
            .map(|((name, _), us)| format!("{name} {us:.2}"))
            .collect();
        format!(
            "{:.0} q/s, sent {}, completed {}, lost {}, NOERROR {}, mean latency {:.3} ms; \
             CPU µs/query: {}, dnsperf {:.2}; CPUs busy {:.0}%; dropped at the server {}, \
             elsewhere {}",
            self.qps,
            self.sent,
            self.completed,
            self.lost,
            self.noerror,
            self.latency_ms,
            cpu.join(", "),
            self.dnsperf_cpu_us,
            self.busy * 100.0,
            self.server_drops,
            self.other_drops,
        )
    }

    fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.lost as f64 / self.sent as f64 * 100.0
    }
}

/// The counters a run is the difference of.
#[derive(Debug)]
struct Counters {
    groups: Vec<Duration>,
    children: Duration,
    /// Busy and total jiffies of all CPUs.
    cpus: (u64, u64),
    port_drops: u64,
    rcvbuf_errors: u64,
}

impl Counters {
    fn now(target: &Target) -> Counters {
        Counters {
            groups: target
                .groups
                .iter()
                .map(|(_, tids)| tids.iter().map(Tid::cpu).sum())
                .collect(),
            children: children_cpu(),
            cpus: cpu_jiffies(),
            port_drops: port_drops(&target.ports),
            rcvbuf_errors: rcvbuf_errors(),
        }
    }
}

/// The CPU time of this process's waited-for children so far (`cutime` + `cstime`).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // Fields 16 and 17 of the whole line; the slice starts at field 3.
    let ticks: u64 = fields[13].parse::<u64>().unwrap() + fields[14].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// Busy and total jiffies of all CPUs, from `/proc/stat` (busy: all but idle and iowait).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).unwrap_or(&0) + values.get(4).unwrap_or(&0);
    (total - idle, total)
}

/// The drops counted at the IPv4 UDP sockets bound to these ports (`/proc/net/udp`).
fn port_drops(ports: &[u16]) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let drops: u64 = fields.get(12)?.parse().ok()?;
            ports.contains(&port).then_some(drops)
        })
        .sum()
}

/// The machine's count of UDP datagrams dropped for a full receive queue (`/proc/net/snmp`).
fn rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Runs dnsperf against `target`: as fast as it goes for the set seconds, or at `rate` through
/// the file as many times as that takes, waiting for the last answers.
fn measure(settings: &Settings, target: &Target, rate: Option<u64>) -> Run {
    let mut command = match &settings.pin {
        Some((_, dnsperf_cpus)) => {
            let mut command = Command::new("taskset");
            command.args(["-c", dnsperf_cpus, "dnsperf"]);
            command
        }
        None => Command::new("dnsperf"),
    };
    let port = target.address.port().to_string();
    let clients = settings.clients.to_string();
    let threads = settings.threads.to_string();
    let outstanding = settings.outstanding.to_string();
    command
        .args(["-s", "127.0.0.1", "-p", &port, "-d"])
        .arg(&target.file)
        .args(["-c", &clients, "-T", &threads, "-q", &outstanding])
        .args(["-O", "suppress=timeouts,unexpected"]);
    match rate {
        None => {
            command.args(["-l", &settings.seconds.to_string()]);
        }
        Some(rate) => {
            let total = rate * settings.seconds;
            let passes = total.div_ceil(target.names as u64).max(1);
            command.args([
                "-Q",
                &rate.to_string(),
                "-n",
                &passes.to_string(),
                "-t",
                "2",
            ]);
        }
    }
    let before = Counters::now(target);
    let output = command.output().unwrap();
    let after = Counters::now(target);
    let text = String::from_utf8_lossy(&output.stdout);
    let mut run = parse_dnsperf(&text).unwrap_or_else(|| {
        panic!(
            "cannot read dnsperf's output ({}):\n{text}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let per_query = |time: Duration| {
        if run.completed == 0 {
            return 0.0;
        }
        time.as_secs_f64() * 1e6 / run.completed as f64
    };
    run.server_cpu_us = after
        .groups
        .iter()
        .zip(&before.groups)
        .map(|(after, before)| per_query(*after - *before))
        .collect();
    run.dnsperf_cpu_us = per_query(after.children - before.children);
    let (busy, total) = (
        after.cpus.0 - before.cpus.0,
        (after.cpus.1 - before.cpus.1).max(1),
    );
    run.busy = busy as f64 / total as f64;
    run.server_drops = after.port_drops - before.port_drops;
    run.other_drops = (after.rcvbuf_errors - before.rcvbuf_errors).saturating_sub(run.server_drops);
    run
}

/// Reads dnsperf's statistics: sent, completed, lost, NOERROR, queries per second, latency.
fn parse_dnsperf(text: &str) -> Option<Run> {
    let field = |label: &str| -> Option<&str> {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(str::trim)
    };
    let count =
        |label: &str| -> Option<u64> { field(label)?.split_whitespace().next()?.parse().ok() };
    let noerror = field("Response codes:").map_or(0, |codes| {
        let words: Vec<&str> = codes.split_whitespace().collect();
        words
            .iter()
            .position(|w| *w == "NOERROR")
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or(0)
    });
    Some(Run {
        qps: field("Queries per second:")?.parse().ok()?,
        sent: count("Queries sent:")?,
        completed: count("Queries completed:")?,
        lost: count("Queries lost:")?,
        latency_ms: field("Average Latency (s):")?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()?
            * 1e3,
        noerror,
        ..Run::default()
    })
}

fn print_table(targets: &[Target], rounds: &[Vec<Run>], highest: &[Run], half: &[Run]) {
    println!();
    println!(
        "| target | highest q/s, each round | median | mean latency | server CPU µs/q | \
         dnsperf CPU µs/q | CPUs busy | half rate q/s | lost at half rate | dropped at the \
         server / elsewhere |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for (((target, runs), top), half) in targets.iter().zip(rounds).zip(highest).zip(half) {
        let each: Vec<String> = runs.iter().map(|run| format!("{:.0}", run.qps)).collect();
        let cpu: Vec<String> = target
            .groups
            .iter()
            .zip(&top.server_cpu_us)
            .map(|((name, _), us)| format!("{name} {us:.2}"))
            .collect();
        println!(
            "| {} | {} | {:.0} | {:.3} ms | {} | {:.2} | {:.0}% | {:.0} | {} ({:.3}%) | {} / {} |",
            target.label,
            each.join(", "),
            top.qps,
            top.latency_ms,
            cpu.join(" + "),
            top.dnsperf_cpu_us,
            top.busy * 100.0,
            half.qps,
            half.lost,
            half.loss(),
            half.server_drops,
            half.other_drops,
        );
    }
    let [echo, resources, pass, direct, forwarder] = highest else {
        return;
    };
    let ratios = |a: usize, b: usize| -> String {
        let each: Vec<String> = rounds[a]
            .iter()
            .zip(&rounds[b])
            .map(|(x, y)| format!("{:.3}", x.qps / y.qps))
            .collect();
        each.join(", ")
    };
    let resource_ratio = resources.qps / echo.qps;
    let pass_ratio = pass.qps / direct.qps;
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!();
    println!(
        "resource answers / echo: {resource_ratio:.3}x of the medians ({:.0} against {:.0} q/s); \
         each round: {}",
        resources.qps,
        echo.qps,
        ratios(1, 0)
    );
    println!(
        "pass-through / direct:   {pass_ratio:.3}x of the medians ({:.0} against {:.0} q/s); \
         each round: {}",
        pass.qps,
        direct.qps,
        ratios(2, 3)
    );
    println!(
        "bare forwarder / direct: {:.3}x of the medians ({:.0} against {:.0} q/s); each round: {}",
        forwarder.qps / direct.qps,
        forwarder.qps,
        direct.qps,
        ratios(4, 3)
    );
    println!(
        "pass-through / bare forwarder: {:.3}x of the medians; each round: {}",
        pass.qps / forwarder.qps,
        ratios(2, 4)
    );
    println!();
    println!(
        "goal: resource answers at least 0.5x the echo: {}",
        verdict(resource_ratio >= 0.5)
    );
    println!(
        "goal: resource answers at least 100,000/s:    {}",
        verdict(resources.qps >= 100_000.0)
    );
    println!(
        "goal: pass-through at least 0.8x direct:      {}",
        verdict(pass_ratio >= 0.8)
    );
    for (target, run) in targets.iter().zip(half) {
        println!(
            "goal: no lost query at half rate, {:<30} {} ({} lost)",
            format!("{}:", target.label),
            verdict(run.lost == 0),
            run.lost
        );
    }
}
