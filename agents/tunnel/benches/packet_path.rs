//! The gateway's packet path on one core, in process: what each 1420-byte packet costs through
//! the sans-IO core, beside what it costs boringtun alone and what ChaCha20-Poly1305 alone
//! costs on this machine.
//!
//! Timed, per packet:
//! - `gateway_handle_network`: a datagram the client sealed goes in, the translated packet
//!   comes out (decrypt, filter, NAT); `gateway_handle_tun`: the resource's reply goes in, a
//!   sealed datagram comes out (reverse NAT, filter, encrypt). The client holds a DNS grant
//!   (tcp/443, mapped 100.96.0.1, real 172.16.0.5), so both the filter and the NAT run.
//!   `…_5000_grants`: the same, the client holding 4,999 more grants (IP grants for other
//!   hosts, installed before the DNS grant): what a packet costs must not grow with them.
//! - `boringtun_decapsulate` / `boringtun_encapsulate`: a bare `Tunn` pair doing the same, no
//!   filter and no NAT.
//! - `filter_check_bytes`, `filter_check_reply` (parse and check), `nat_outbound`,
//!   `nat_reply`: the filter and the NAT alone. The NAT rewrites in place, so each call first
//!   copies the 40 header bytes it changes back from the original (a few ns, included).
//! - `chacha20poly1305_seal` / `_open`: RustCrypto's `chacha20poly1305` 0.10, the crate
//!   boringtun's handshake uses; `ring_seal` / `ring_open`: ring's ChaCha20-Poly1305, which is
//!   what boringtun 0.7 seals and opens data packets with.
//!
//! WireGuard refuses a datagram it has seen (its replay window), so the client seals a chunk
//! of 256 distinct datagrams (increasing counters) before each timed stretch, untimed, and the
//! gateway takes them in order. Inputs that are changed in place (packets the NAT rewrites,
//! ciphertexts opened in place) are copied back the same way, untimed. A chunk (370 KB) stays
//! in the 1 MiB L2 cache, as a driver's receive buffers would.
//!
//! Besides criterion's report it prints a summary measured side by side: every case timed in
//! 61 interleaved rounds of about 10 ms each, so that noise from other work on the machine
//! falls on all of them alike; the table gives each case's median round and its best round
//! (noise only ever adds time), and the ratios from both.
//! Goals: the filter and NAT add under 5% to boringtun's decrypt, and the whole path runs at
//! at least 70% of this machine's ChaCha20-Poly1305 throughput on one core.
//!
//! Run by hand: `cargo bench -p fz-tunnel --bench packet_path` (about a minute and a half). In
//! test mode (`cargo test --benches`) every case runs once and the summary takes one short
//! round; with `--profile-time` (to run one case under `perf`) there is no summary.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)] // a bench: it prints its figures, and a setup that fails should fail loudly

#[path = "common/setup.rs"]
mod setup;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use chacha20poly1305::{AeadInPlace, ChaCha20Poly1305, KeyInit};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fz_tunnel::Output;
use fz_tunnel::filter::GrantFilter;
use fz_tunnel::gateway::{Gateway, MAX_DATAGRAM};
use fz_tunnel::nat::Nat;
use fz_tunnel::packet::Packet;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use setup::{MAPPED, PACKET, REAL};

/// Datagrams sealed (or inputs restored) ahead of each timed stretch.
const CHUNK: usize = 256;
/// Rounds of the summary: short and many, so that the median round is one no other work on
/// the machine got into.
const ROUNDS: usize = 61;
/// Grants the busy client holds in the `…_5000_grants` cases.
const MANY_GRANTS: usize = 5000;
/// The IPv4 and TCP headers: all the NAT reads and writes.
const HEADERS: usize = 40;
const TAG: usize = 16;
/// The client's address as the gateway sees it.
const FROM: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)), 40000);

fn packet_path(c: &mut Criterion) {
    let mut cases = cases();
    let mut group = c.benchmark_group("packet_path");
    group
        .throughput(Throughput::Bytes(PACKET as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for case in &mut cases {
        let step = case.step.as_mut();
        group.bench_function(case.name, |b| b.iter_custom(|iters| timed(step, iters)));
    }
    group.finish();
    // Profiling one case (`-- --profile-time 10 NAME`, under perf): its loop alone.
    if !std::env::args().any(|a| a == "--profile-time") {
        summary(&mut cases);
    }
}

criterion_group!(benches, packet_path);
criterion_main!(benches);

/// One thing timed per packet.
trait Step {
    /// Gets the next `n` inputs ready (not timed); `n` is at most [`CHUNK`].
    fn prepare(&mut self, n: usize);
    /// Takes the `n` inputs prepared (timed).
    fn run(&mut self, n: usize);
}

struct Case {
    name: &'static str,
    step: Box<dyn Step>,
}

fn cases() -> Vec<Case> {
    let case = |name, step: Box<dyn Step>| Case { name, step };
    vec![
        case("gateway_handle_network", Box::new(FromClient::new())),
        case("gateway_handle_tun", Box::new(ToClient::new())),
        case(
            "gateway_handle_network_5000_grants",
            Box::new(FromClient::holding(MANY_GRANTS - 1)),
        ),
        case(
            "gateway_handle_tun_5000_grants",
            Box::new(ToClient::holding(MANY_GRANTS - 1)),
        ),
        case("boringtun_decapsulate", Box::new(BareDecapsulate::new())),
        case("boringtun_encapsulate", Box::new(BareEncapsulate::new())),
        case("filter_check_bytes", Box::new(FilterOut::new())),
        case("filter_check_reply", Box::new(FilterReply::new())),
        case("nat_outbound", Box::new(NatStep::outbound())),
        case("nat_reply", Box::new(NatStep::reply())),
        case("chacha20poly1305_seal", Box::new(RustCryptoSeal::new())),
        case("chacha20poly1305_open", Box::new(RustCryptoOpen::new())),
        case("ring_seal", Box::new(RingSeal::new())),
        case("ring_open", Box::new(RingOpen::new())),
    ]
}

/// Runs `iters` packets through `step` in chunks; only `run` is timed.
fn timed(step: &mut dyn Step, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        step.prepare(n);
        let start = Instant::now();
        step.run(n);
        total += start.elapsed();
        left -= n as u64;
    }
    total
}

// ---- the summary ----

fn summary(cases: &mut [Case]) {
    // `cargo bench` passes `--bench`; without it criterion runs each benchmark once as a test.
    let bench = std::env::args().any(|a| a == "--bench");
    let (rounds, round_time) = if bench {
        (ROUNDS, Duration::from_millis(10))
    } else {
        (1, Duration::ZERO)
    };
    let iters: Vec<u64> = cases
        .iter_mut()
        .map(|case| {
            let probe = timed(case.step.as_mut(), 4 * CHUNK as u64);
            let per_packet = probe.as_secs_f64() / (4 * CHUNK) as f64;
            ((round_time.as_secs_f64() / per_packet) as u64).max(CHUNK as u64)
        })
        .collect();
    let mut samples = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for ((case, iters), samples) in cases.iter_mut().zip(&iters).zip(&mut samples) {
            let time = timed(case.step.as_mut(), *iters);
            samples.push(time.as_secs_f64() * 1e9 / *iters as f64);
        }
    }
    let stats: Vec<Stats> = samples.iter_mut().map(|s| Stats::of(s)).collect();
    let find = |name: &str| {
        cases
            .iter()
            .zip(&stats)
            .find(|(case, _)| case.name == name)
            .map(|(_, stats)| stats)
            .expect("a case of that name")
    };

    println!();
    println!(
        "summary: {rounds} interleaved rounds of about {round_time:?} per case, {PACKET}-byte packets, one core"
    );
    println!(
        "{:<24} {:>13} {:>13} {:>13} {:>13}",
        "case", "median ns/pkt", "best ns/pkt", "median Gbit/s", "best Gbit/s"
    );
    for (case, stats) in cases.iter().zip(&stats) {
        println!(
            "{:<24} {:>13.1} {:>13.1} {:>13.2} {:>13.2}",
            case.name,
            stats.median,
            stats.min,
            gbits(stats.median),
            gbits(stats.min)
        );
    }

    println!();
    println!(
        "ratios (goals: filter+NAT under 5% of boringtun's decrypt; whole path at least 70% of ChaCha20-Poly1305)"
    );
    println!("{:<74} {:>7} {:>7}", "", "median", "best");
    type Of = fn(&Stats) -> f64;
    let (median, best): (Of, Of) = (|s| s.median, |s| s.min);
    let ratio = |label: &str, value: &dyn Fn(Of) -> f64| {
        println!(
            "{label:<74} {:>6.1}% {:>6.1}%",
            value(median) * 100.0,
            value(best) * 100.0
        );
    };
    let ns = |name: &str, of: Of| of(find(name));
    ratio(
        "(filter check_bytes + NAT outbound) / boringtun decapsulate",
        &|of| {
            (ns("filter_check_bytes", of) + ns("nat_outbound", of))
                / ns("boringtun_decapsulate", of)
        },
    );
    ratio(
        "(gateway handle_network - boringtun decapsulate) / boringtun decapsulate",
        &|of| ns("gateway_handle_network", of) / ns("boringtun_decapsulate", of) - 1.0,
    );
    ratio(
        "(NAT reply + filter check_reply) / boringtun encapsulate",
        &|of| {
            (ns("nat_reply", of) + ns("filter_check_reply", of)) / ns("boringtun_encapsulate", of)
        },
    );
    ratio(
        "(gateway handle_tun - boringtun encapsulate) / boringtun encapsulate",
        &|of| ns("gateway_handle_tun", of) / ns("boringtun_encapsulate", of) - 1.0,
    );
    ratio(
        "handle_network, client with 5,000 grants / with 1 (goal: 100%)",
        &|of| ns("gateway_handle_network_5000_grants", of) / ns("gateway_handle_network", of),
    );
    ratio(
        "handle_tun, client with 5,000 grants / with 1 (goal: 100%)",
        &|of| ns("gateway_handle_tun_5000_grants", of) / ns("gateway_handle_tun", of),
    );
    ratio(
        "handle_network throughput / chacha20poly1305 open (RustCrypto)",
        &|of| ns("chacha20poly1305_open", of) / ns("gateway_handle_network", of),
    );
    ratio(
        "handle_tun throughput / chacha20poly1305 seal (RustCrypto)",
        &|of| ns("chacha20poly1305_seal", of) / ns("gateway_handle_tun", of),
    );
    ratio(
        "handle_network throughput / ring open (what boringtun opens with)",
        &|of| ns("ring_open", of) / ns("gateway_handle_network", of),
    );
    ratio(
        "handle_tun throughput / ring seal (what boringtun seals with)",
        &|of| ns("ring_seal", of) / ns("gateway_handle_tun", of),
    );
}

/// A case's rounds: the median, and the best (the least disturbed).
struct Stats {
    median: f64,
    min: f64,
}

impl Stats {
    fn of(samples: &mut [f64]) -> Stats {
        samples.sort_by(f64::total_cmp);
        Stats {
            median: samples[samples.len() / 2],
            min: samples[0],
        }
    }
}

fn gbits(ns_per_packet: f64) -> f64 {
    (PACKET * 8) as f64 / ns_per_packet
}

// ---- the cases ----

/// Datagrams the client sealed, ready for the gateway (or a bare peer) to open.
struct Sealed {
    client: Tunn,
    packet: Vec<u8>,
    datagrams: Vec<Vec<u8>>,
    lengths: Vec<usize>,
}

impl Sealed {
    fn new(client: Tunn) -> Sealed {
        Sealed {
            client,
            packet: setup::to_resource(),
            datagrams: vec![vec![0; MAX_DATAGRAM]; CHUNK],
            lengths: vec![0; CHUNK],
        }
    }

    fn seal(&mut self, n: usize) {
        for (datagram, length) in self.datagrams.iter_mut().zip(&mut self.lengths).take(n) {
            match self.client.encapsulate(&self.packet, datagram) {
                TunnResult::WriteToNetwork(bytes) => *length = bytes.len(),
                other => panic!("the client could not seal: {other:?}"),
            }
        }
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.datagrams[i][..self.lengths[i]]
    }
}

/// Copies of one packet, restored before each stretch because the path rewrites them.
struct Copies {
    original: Vec<u8>,
    copies: Vec<Vec<u8>>,
}

impl Copies {
    fn new(original: Vec<u8>) -> Copies {
        Copies {
            copies: vec![original.clone(); CHUNK],
            original,
        }
    }

    fn restore(&mut self, n: usize) {
        for copy in self.copies.iter_mut().take(n) {
            copy.copy_from_slice(&self.original);
        }
    }
}

struct FromClient {
    gateway: Gateway,
    sealed: Sealed,
    buffer: Vec<u8>,
    now: Instant,
}

impl FromClient {
    fn new() -> FromClient {
        FromClient::holding(0)
    }

    fn holding(others: usize) -> FromClient {
        let setup = setup::gateway_with_client_holding(FROM, others);
        FromClient {
            gateway: setup.gateway,
            sealed: Sealed::new(setup.client),
            buffer: vec![0; MAX_DATAGRAM],
            now: Instant::now(),
        }
    }
}

impl Step for FromClient {
    fn prepare(&mut self, n: usize) {
        self.sealed.seal(n);
        // A driver reads the clock once per batch it receives.
        self.now = Instant::now();
    }

    fn run(&mut self, n: usize) {
        for i in 0..n {
            let output = self.gateway.handle_network(
                FROM,
                black_box(self.sealed.datagram(i)),
                &mut self.buffer,
                self.now,
            );
            let Some(Output::Tun(packet)) = output else {
                panic!("a client's datagram did not come out of the tunnel: {output:?}");
            };
            black_box(packet);
        }
    }
}

struct ToClient {
    gateway: Gateway,
    packets: Copies,
    buffer: Vec<u8>,
    now: Instant,
}

impl ToClient {
    fn new() -> ToClient {
        ToClient::holding(0)
    }

    fn holding(others: usize) -> ToClient {
        let setup = setup::gateway_with_client_holding(FROM, others);
        ToClient {
            gateway: setup.gateway,
            packets: Copies::new(setup::from_resource()),
            buffer: vec![0; MAX_DATAGRAM],
            now: Instant::now(),
        }
    }
}

impl Step for ToClient {
    fn prepare(&mut self, n: usize) {
        self.packets.restore(n);
        self.now = Instant::now();
    }

    fn run(&mut self, n: usize) {
        for packet in self.packets.copies.iter_mut().take(n) {
            let output = self
                .gateway
                .handle_tun(black_box(packet), &mut self.buffer, self.now);
            let Some(Output::Network(_, datagram)) = output else {
                panic!("the resource's reply was not sealed for the client: {output:?}");
            };
            black_box(datagram);
        }
    }
}

struct BareDecapsulate {
    server: Tunn,
    sealed: Sealed,
    buffer: Vec<u8>,
}

impl BareDecapsulate {
    fn new() -> BareDecapsulate {
        let (client, server) = setup::bare_pair();
        BareDecapsulate {
            server,
            sealed: Sealed::new(client),
            buffer: vec![0; MAX_DATAGRAM],
        }
    }
}

impl Step for BareDecapsulate {
    fn prepare(&mut self, n: usize) {
        self.sealed.seal(n);
    }

    fn run(&mut self, n: usize) {
        for i in 0..n {
            let result = self.server.decapsulate(
                Some(FROM.ip()),
                black_box(self.sealed.datagram(i)),
                &mut self.buffer,
            );
            let TunnResult::WriteToTunnelV4(packet, _) = result else {
                panic!("boringtun did not open the datagram: {result:?}");
            };
            black_box(packet);
        }
    }
}

struct BareEncapsulate {
    server: Tunn,
    packets: Copies,
    buffer: Vec<u8>,
}

impl BareEncapsulate {
    fn new() -> BareEncapsulate {
        let (_, server) = setup::bare_pair();
        BareEncapsulate {
            server,
            packets: Copies::new(setup::from_resource()),
            buffer: vec![0; MAX_DATAGRAM],
        }
    }
}

impl Step for BareEncapsulate {
    fn prepare(&mut self, n: usize) {
        // Nothing rewrites these; restored anyway so that the inputs sit where
        // `gateway_handle_tun`'s do.
        self.packets.restore(n);
    }

    fn run(&mut self, n: usize) {
        for packet in self.packets.copies.iter().take(n) {
            let result = self.server.encapsulate(black_box(packet), &mut self.buffer);
            let TunnResult::WriteToNetwork(datagram) = result else {
                panic!("boringtun did not seal the packet: {result:?}");
            };
            black_box(datagram);
        }
    }
}

struct FilterOut {
    filter: GrantFilter,
    packet: Vec<u8>,
}

impl FilterOut {
    fn new() -> FilterOut {
        let setup = setup::gateway_with_client(FROM);
        FilterOut {
            filter: GrantFilter::new(&setup.grant).expect("the grant's filter"),
            packet: setup::to_resource(),
        }
    }
}

impl Step for FilterOut {
    fn prepare(&mut self, _: usize) {}

    fn run(&mut self, n: usize) {
        for _ in 0..n {
            let verdict = self.filter.check_bytes(black_box(&self.packet));
            assert!(black_box(verdict).is_ok(), "the filter dropped the packet");
        }
    }
}

/// The reply after the NAT wrote the mapped address back: what `check_reply` sees.
struct FilterReply {
    filter: GrantFilter,
    packet: Vec<u8>,
}

impl FilterReply {
    fn new() -> FilterReply {
        let setup = setup::gateway_with_client(FROM);
        let mut packet = setup::from_resource();
        packet[12..16].copy_from_slice(&MAPPED.octets());
        FilterReply {
            filter: GrantFilter::new(&setup.grant).expect("the grant's filter"),
            packet,
        }
    }
}

impl Step for FilterReply {
    fn prepare(&mut self, _: usize) {}

    fn run(&mut self, n: usize) {
        for _ in 0..n {
            let passes = Packet::parse(black_box(&self.packet))
                .is_ok_and(|parsed| self.filter.check_reply(&parsed));
            assert!(black_box(passes), "the filter dropped the reply");
        }
    }
}

/// The NAT one way or the other, on a NAT holding the one flow.
struct NatStep {
    nat: Nat,
    original: Vec<u8>,
    packet: Vec<u8>,
    outbound: bool,
    millis: u64,
}

impl NatStep {
    fn outbound() -> NatStep {
        NatStep::new(setup::to_resource(), true)
    }

    fn reply() -> NatStep {
        NatStep::new(setup::from_resource(), false)
    }

    fn new(original: Vec<u8>, outbound: bool) -> NatStep {
        let mut nat = Nat::default();
        nat.set_targets(IpAddr::V4(MAPPED), vec![IpAddr::V4(REAL)]);
        let mut first = setup::to_resource();
        assert_eq!(nat.outbound(&mut first, 0), Ok(IpAddr::V4(REAL)));
        NatStep {
            nat,
            packet: original.clone(),
            original,
            outbound,
            millis: 1,
        }
    }
}

impl Step for NatStep {
    fn prepare(&mut self, _: usize) {
        self.millis += 1;
    }

    fn run(&mut self, n: usize) {
        for _ in 0..n {
            self.packet[..HEADERS].copy_from_slice(&self.original[..HEADERS]);
            let packet = black_box(&mut self.packet);
            let translated = if self.outbound {
                self.nat.outbound(packet, self.millis)
            } else {
                self.nat.reply(packet, self.millis)
            };
            assert!(black_box(translated).is_ok(), "the NAT refused the packet");
        }
    }
}

const KEY: [u8; 32] = [42; 32];

fn nonce(counter: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    nonce
}

struct RustCryptoSeal {
    cipher: ChaCha20Poly1305,
    buffer: Vec<u8>,
    counter: u64,
}

impl RustCryptoSeal {
    fn new() -> RustCryptoSeal {
        RustCryptoSeal {
            cipher: ChaCha20Poly1305::new(&KEY.into()),
            buffer: setup::to_resource(),
            counter: 0,
        }
    }
}

impl Step for RustCryptoSeal {
    fn prepare(&mut self, _: usize) {}

    fn run(&mut self, n: usize) {
        for _ in 0..n {
            self.counter += 1;
            let tag = self
                .cipher
                .encrypt_in_place_detached(&nonce(self.counter).into(), &[], &mut self.buffer)
                .expect("sealed");
            black_box(tag);
        }
    }
}

struct RustCryptoOpen {
    cipher: ChaCha20Poly1305,
    sealed: Copies,
    tag: chacha20poly1305::Tag,
}

impl RustCryptoOpen {
    fn new() -> RustCryptoOpen {
        let cipher = ChaCha20Poly1305::new(&KEY.into());
        let mut ciphertext = setup::to_resource();
        let tag = cipher
            .encrypt_in_place_detached(&nonce(1).into(), &[], &mut ciphertext)
            .expect("sealed");
        RustCryptoOpen {
            cipher,
            sealed: Copies::new(ciphertext),
            tag,
        }
    }
}

impl Step for RustCryptoOpen {
    fn prepare(&mut self, n: usize) {
        self.sealed.restore(n);
    }

    fn run(&mut self, n: usize) {
        for ciphertext in self.sealed.copies.iter_mut().take(n) {
            self.cipher
                .decrypt_in_place_detached(&nonce(1).into(), &[], black_box(ciphertext), &self.tag)
                .expect("opened");
        }
    }
}

fn ring_key() -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &KEY).expect("a key"))
}

struct RingSeal {
    key: LessSafeKey,
    buffer: Vec<u8>,
    counter: u64,
}

impl RingSeal {
    fn new() -> RingSeal {
        RingSeal {
            key: ring_key(),
            buffer: setup::to_resource(),
            counter: 0,
        }
    }
}

impl Step for RingSeal {
    fn prepare(&mut self, _: usize) {}

    fn run(&mut self, n: usize) {
        for _ in 0..n {
            self.counter += 1;
            let tag = self
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce(self.counter)),
                    Aad::empty(),
                    &mut self.buffer,
                )
                .expect("sealed");
            let _ = black_box(tag);
        }
    }
}

/// Ciphertext with its tag behind it, as ring opens it.
struct RingOpen {
    key: LessSafeKey,
    sealed: Copies,
}

impl RingOpen {
    fn new() -> RingOpen {
        let key = ring_key();
        let mut sealed = setup::to_resource();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce(1)),
                Aad::empty(),
                &mut sealed,
            )
            .expect("sealed");
        sealed.extend_from_slice(tag.as_ref());
        assert_eq!(sealed.len(), PACKET + TAG);
        RingOpen {
            key,
            sealed: Copies::new(sealed),
        }
    }
}

impl Step for RingOpen {
    fn prepare(&mut self, n: usize) {
        self.sealed.restore(n);
    }

    fn run(&mut self, n: usize) {
        for sealed in self.sealed.copies.iter_mut().take(n) {
            let plain = self
                .key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce(1)),
                    Aad::empty(),
                    black_box(sealed),
                )
                .expect("opened");
            black_box(plain);
        }
    }
}
