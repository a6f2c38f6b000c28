//! The abuse scenario of the load benchmark (`--abuse LIST`, issue 14): one abusive client
//! beside well-behaved ones, and how much the abuser moves the well-behaved clients' latency.
//!
//! It runs on a portal of its own whose configuration names only `listen`, `data_dir` and the
//! account's slug and policy: every limit is the one the product ships (a client's request
//! rate and burst, its grant cap, the gateway ack timeout, the connection timeouts and caps),
//! for the well-behaved clients and the abuser alike. The well-behaved clients (`--clients`)
//! connect from 127.0.0.1 at most 32 at a time (the per-source cap is 64), first ask once
//! for each resource their user may reach (at most [`MAX_WANTS`]), and then, in each phase,
//! `--abuse-concurrency` workers each own a share of them and make them ask in turn, each
//! client at most `--abuse-rate` times a second (at most half the shipped average): a
//! request every [`FRESH_EVERY`] is for a name never asked before under a wildcard DNS
//! resource (a new grant through the gateway, at most [`MAX_FRESH`] per client), the others
//! get their grant in force again (decided again in full, counted in the store). Latency runs
//! from sending `request_access` to the answer. Beside them a newcomer connects (hello,
//! `ready`) every [`NEWCOMER_EVERY`] and closes, which is what idle and slow connections would
//! keep out.
//!
//! For each kind asked for, a phase with the well-behaved clients alone, then one with the
//! abuser running beside them from the start of the warm-up to the end of the measured window
//! (same concurrency, same rate, same duration). The abuser runs on a thread of its own named
//! `abuser` (a single-threaded runtime), so its CPU is counted apart from the generator's:
//!
//! - `none`: nobody; the two phases show what the ratio is without abuse (noise, the
//!   minute's revalidation, the other engineer's work);
//! - `idle`, `idle-sources`: TCP connections that send nothing, opened at `--abuse-open-rate`
//!   a second up to `--abuse-connections` held, from 127.0.0.2 or from `--abuse-sources`
//!   addresses 127.0.0.2 and up; a closed one is opened again;
//! - `slowloris`, `slowloris-sources`: the same, each sending a request head one byte a
//!   second, never finishing it;
//! - `unresolved`: one client asks for names under site 0's wildcard DNS resource that its
//!   gateway never answers (the gateways leave grants for names with a `lame` label
//!   unanswered, as for a name under a lame delegation), keeping 32 requests waiting at
//!   once (the most a client may);
//! - `grant-burst`: one client asks as fast as it can for distinct names under every site's
//!   wildcard DNS resource (each a new grant), with `--abuse-window` requests outstanding;
//! - `grant-repeat`: one client asks as fast as it can for the same resource and name;
//! - `flood`: one client asks as fast as it can for resources that do not exist, with ids of
//!   `--abuse-id-bytes` characters, every other request naming a known resource with a name
//!   as long (past the 253 a name may have): denials.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use fz_host::testing::agents::{self as agent, Origin, Socket, TestGateway};
use fz_portal::config::{
    DEFAULT_ACK_TIMEOUT_MS, DEFAULT_HEADER_READ_TIMEOUT_MS, DEFAULT_HELLO_TIMEOUT_MS,
    DEFAULT_MAX_GRANTS_PER_CLIENT, DEFAULT_REQUEST_BURST, DEFAULT_REQUESTS_PER_SECOND,
};
use fz_proto::{ClientMessage, DnsMapping, PortalToClient, PublicKey, decode, encode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{
    ACCOUNT, CpuSample, Model, Options, Server, StoreKind, Want, client_key, clock_ticks,
    connect_all, cpu_sample, gateway_key, machine, ms, percentile, populate, thread_shares,
};

/// A well-behaved client asks for at most this many resources, half its grant cap, so that
/// it never meets the cap (an administrator may reach 5 resources a site).
const MAX_WANTS: usize = DEFAULT_MAX_GRANTS_PER_CLIENT / 2;
/// Every this many requests, a well-behaved client asks for a name it never asked for.
const FRESH_EVERY: u64 = 16;
/// ...at most this many times, so that its grants stay well inside the cap.
const MAX_FRESH: usize = DEFAULT_MAX_GRANTS_PER_CLIENT / 4;
/// A newcomer connects this often during each phase.
const NEWCOMER_EVERY: Duration = Duration::from_millis(100);
/// Newcomers take turns over this many tokens of their own.
const NEWCOMERS: usize = 4;
/// How long the generator waits for any one answer before it counts the request failed.
const PATIENCE: Duration = Duration::from_secs(30);
/// At most this many connections open at once while the well-behaved clients connect: the
/// shipped per-source cap (64) counts connections that have not said hello yet.
const CONNECT_PARALLEL: usize = 32;
/// What `portal/src/agents.rs` lets one client have waiting at once.
const MAX_REQUESTS_IN_FLIGHT: usize = 32;
/// A label the gateways never answer grants for.
const LAME: &str = "lame";
/// A slow connection sends a byte this often.
const TRICKLE: Duration = Duration::from_secs(1);
/// A connection closed within this much of its opening was refused at accept.
const AT_ONCE: Duration = Duration::from_millis(250);
/// Between phases, so that what one left behind (connections closing, grants waiting for
/// their ack timeout) is gone before the next.
const PAUSE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Abuse {
    None,
    Idle,
    IdleSources,
    Slowloris,
    SlowlorisSources,
    Unresolved,
    GrantBurst,
    GrantRepeat,
    Flood,
}

impl Abuse {
    const ALL: [Abuse; 9] = [
        Abuse::None,
        Abuse::Idle,
        Abuse::IdleSources,
        Abuse::Slowloris,
        Abuse::SlowlorisSources,
        Abuse::Unresolved,
        Abuse::GrantBurst,
        Abuse::GrantRepeat,
        Abuse::Flood,
    ];

    fn name(self) -> &'static str {
        match self {
            Abuse::None => "none",
            Abuse::Idle => "idle",
            Abuse::IdleSources => "idle-sources",
            Abuse::Slowloris => "slowloris",
            Abuse::SlowlorisSources => "slowloris-sources",
            Abuse::Unresolved => "unresolved",
            Abuse::GrantBurst => "grant-burst",
            Abuse::GrantRepeat => "grant-repeat",
            Abuse::Flood => "flood",
        }
    }

    /// `all`, or kinds separated by commas, each once, in the order given.
    pub(crate) fn parse_list(list: &str) -> Result<Vec<Abuse>, String> {
        let mut kinds = Vec::new();
        for item in list.split(',') {
            let found: Vec<Abuse> = if item == "all" {
                Abuse::ALL.to_vec()
            } else {
                let kind = Abuse::ALL
                    .into_iter()
                    .find(|k| k.name() == item)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Abuse::ALL.iter().map(|k| k.name()).collect();
                        format!(
                            "unknown abuse `{item}` (one of {}, or all)",
                            names.join(", ")
                        )
                    })?;
                vec![kind]
            };
            for kind in found {
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
        }
        Ok(kinds)
    }

    /// The kinds that need a client token of their own (an abuser's rate bucket and grants
    /// must not carry over from one kind to the next).
    fn client_index(self) -> usize {
        Abuse::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    fn describe(self, options: &AbuseOptions) -> String {
        let connections = |what: &str, sources: usize| {
            format!(
                "{what} from {}, opened at {}/s up to {} held, each opened again once closed",
                if sources == 1 {
                    "127.0.0.2".to_owned()
                } else {
                    format!("{sources} addresses (127.0.0.2 to 127.0.0.{})", sources + 1)
                },
                options.open_rate,
                options.connections
            )
        };
        match self {
            Abuse::None => "nobody (the ratio without abuse)".to_owned(),
            Abuse::Idle => connections("TCP connections that send nothing", 1),
            Abuse::IdleSources => connections("TCP connections that send nothing", options.sources),
            Abuse::Slowloris => connections("request heads sent a byte a second", 1),
            Abuse::SlowlorisSources => {
                connections("request heads sent a byte a second", options.sources)
            }
            Abuse::Unresolved => format!(
                "one client asking for names under `web-000` that its gateway never answers, \
                 {MAX_REQUESTS_IN_FLIGHT} waiting at once"
            ),
            Abuse::GrantBurst => format!(
                "one client asking as fast as it can for distinct names under every site's \
                 wildcard resource, {} outstanding",
                options.window
            ),
            Abuse::GrantRepeat => format!(
                "one client asking as fast as it can for `app-000` again and again, {} \
                 outstanding",
                options.window
            ),
            Abuse::Flood => format!(
                "one client asking as fast as it can for resources that do not exist with \
                 {}-character ids (every other request: `web-000` with a name as long), {} \
                 outstanding",
                options.id_bytes, options.window
            ),
        }
    }
}

/// What `--abuse` and its companions say.
#[derive(Debug, Clone)]
pub(crate) struct AbuseOptions {
    pub kinds: Vec<Abuse>,
    /// Well-behaved requests in flight.
    pub concurrency: usize,
    /// Requests a second each well-behaved client makes at most.
    pub rate: f64,
    /// Connections an idle or slow abuser holds at most.
    pub connections: usize,
    /// Connections it opens a second at most.
    pub open_rate: usize,
    /// Addresses the `-sources` kinds connect from.
    pub sources: usize,
    /// Requests a flooding client keeps outstanding.
    pub window: usize,
    /// Length of the flood's ids and names.
    pub id_bytes: usize,
}

impl Default for AbuseOptions {
    fn default() -> Self {
        AbuseOptions {
            kinds: Vec::new(),
            concurrency: 64,
            rate: 2.0,
            connections: 5_000,
            open_rate: 1_000,
            sources: 100,
            window: 256,
            id_bytes: 16 * 1024,
        }
    }
}

impl AbuseOptions {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let most = f64::from(DEFAULT_REQUESTS_PER_SECOND) / 2.0;
        if !(self.rate > 0.0 && self.rate <= most) {
            return Err(format!(
                "`--abuse-rate` must be above 0 and at most {most} (half the shipped \
                 `requests_per_second`): well-behaved clients stay well inside the limits"
            ));
        }
        if self.sources == 0 || self.sources > 250 {
            return Err("`--abuse-sources` must be 1 to 250 (127.0.0.2 and up)".to_owned());
        }
        if self.concurrency == 0 || self.window == 0 || self.open_rate == 0 {
            return Err(
                "`--abuse-concurrency`, `--abuse-window` and `--abuse-open-rate` must be at least 1"
                    .to_owned(),
            );
        }
        if self.id_bytes < 16 {
            return Err("`--abuse-id-bytes` must be at least 16".to_owned());
        }
        Ok(())
    }
}

/// What the abuse run measured, for the summary.
pub(crate) struct AbuseResult {
    name: String,
    pairs: Vec<Pair>,
}

/// One kind: the well-behaved clients alone, then beside the abuser.
struct Pair {
    kind: Abuse,
    alone: Phase,
    beside: Phase,
}

struct Phase {
    answers: Answers,
    newcomers: Connects,
    seconds: f64,
    server_cpu: f64,
    generator_cpu: f64,
    abuser_cpu: f64,
    threads: Vec<(String, f64)>,
    rss_after_kib: u64,
    abuser: Option<Report>,
    /// Grants the gateways left unanswered during the phase (names with the lame label).
    unanswered: u64,
    /// What the portal's log says it refused or closed (counts logged at most every 10 s).
    refusals: Refusals,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.answers.ok as f64 / self.seconds
    }

    fn p50(&self) -> Duration {
        percentile(&self.answers.all, 50.0)
    }

    fn p99(&self) -> Duration {
        percentile(&self.answers.all, 99.0)
    }
}

/// The well-behaved clients' answers inside the measured window.
#[derive(Default)]
struct Answers {
    ok: u64,
    rejected: u64,
    /// Rejections for the request rate: a well-behaved client must never see one.
    rate_limited: u64,
    failed: u64,
    /// Latency of every granted answer, and of those that were new grants.
    all: Vec<Duration>,
    fresh: Vec<Duration>,
    examples: Vec<String>,
}

impl Answers {
    fn merge(&mut self, other: Answers) {
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.rate_limited += other.rate_limited;
        self.failed += other.failed;
        self.all.extend(other.all);
        self.fresh.extend(other.fresh);
        for example in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(example);
            }
        }
    }

    fn note(&mut self, example: String) {
        if self.examples.len() < 5 {
            self.examples.push(example);
        }
    }
}

/// Newcomers' connections (accept to `ready`) inside the measured window.
#[derive(Default)]
struct Connects {
    ok: Vec<Duration>,
    failed: u64,
    examples: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Refusals {
    per_source: u64,
    full: u64,
    evicted: u64,
}

/// A well-behaved client and where it is in what it asks for.
struct WellBehaved {
    index: usize,
    socket: Socket,
    wants: Vec<Want>,
    next: usize,
    /// A wildcard DNS resource it may reach, for names it never asked for.
    fresh: Option<Want>,
    fresh_made: usize,
    asked: u64,
    due: Instant,
}

impl WellBehaved {
    /// The next request: in turn through its resources, and now and then a new name.
    fn next_request(&mut self) -> (bool, Want) {
        self.asked += 1;
        if self.asked.is_multiple_of(FRESH_EVERY)
            && self.fresh_made < MAX_FRESH
            && let Some(template) = &self.fresh
            && let Some(dns) = &template.dns
            && let Some((_, rest)) = dns.name.split_once('.')
        {
            self.fresh_made += 1;
            let name = format!("c{}-{}.{rest}", self.index, self.fresh_made);
            return (
                true,
                Want {
                    resource: template.resource.clone(),
                    dns: Some(DnsMapping {
                        name,
                        mapped: dns.mapped.clone(),
                    }),
                },
            );
        }
        let want = self.wants[self.next % self.wants.len()].clone();
        self.next += 1;
        (false, want)
    }
}

/// Everything the phases share.
struct Context<'a> {
    options: &'a Options,
    abuse: &'a AbuseOptions,
    address: SocketAddr,
    server: &'a Server,
    log: &'a Path,
    /// Secrets of the abusers' tokens (one per kind) and of the newcomers'.
    abusers: Vec<String>,
    newcomers: Arc<Vec<String>>,
    unanswered: Arc<AtomicU64>,
}

/// Starts a portal with the shipped limits, connects gateways and clients, and runs a pair
/// of phases for each kind of abuse.
pub(crate) async fn abuse_target(
    options: &Options,
    policy: &Path,
    store_kind: StoreKind,
) -> AbuseResult {
    let abuse = &options.abuse;
    let name = format!("portal ({}, shipped limits)", store_kind.name());
    println!("\n== abuse: {name}");
    // Abusers first (one token each), then newcomers, then the well-behaved clients. The
    // first 40 tokens are administrators' devices (every site), which the abusers need.
    let extra = Abuse::ALL.len() + NEWCOMERS;
    let model = Model::new(extra + options.clients, options.sites);
    let (base, database) = store_kind.prepare("fz-abuse-data-");
    let data = base.path().join("data");
    let secrets = populate(&data, &database, &model, store_kind).await;
    let config = base.path().join("portal.toml");
    // Nothing but what must be said: every limit is the product's default.
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}\n[[accounts]]\nslug = \"{ACCOUNT}\"\n\
             policy = \"{}\"\n",
            data.display(),
            super::database_line(&database),
            policy.display()
        ),
    )
    .expect("a configuration file");
    let log = base.path().join("portal.log");
    let mut command = super::server_command(options, &options.portal_binary);
    command
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", &options.log);
    let (server, line) = Server::spawn(command, &log, "fz-portal listening on ").await;
    let (address, pinned) = super::portal_address(&line);
    println!("portal pid {} on {address}", server.pid());
    println!(
        "limits: the shipped defaults for everyone (the configuration names only listen, \
         data_dir, the account and its policy): {DEFAULT_REQUESTS_PER_SECOND} requests/s, \
         burst {DEFAULT_REQUEST_BURST}, {DEFAULT_MAX_GRANTS_PER_CLIENT} grants per client, \
         {MAX_REQUESTS_IN_FLIGHT} requests waiting per client, gateway ack timeout \
         {DEFAULT_ACK_TIMEOUT_MS} ms, request head {DEFAULT_HEADER_READ_TIMEOUT_MS} ms, hello \
         {DEFAULT_HELLO_TIMEOUT_MS} ms"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(caps) = text
        .lines()
        .find_map(|l| l.split_once("connection caps").map(|(_, rest)| rest.trim()))
    {
        println!("connection caps (from the open files limit): {caps}");
    }

    // The gateways answer every grant but those for a lame name, which they leave unanswered
    // while heartbeating on.
    let unanswered = Arc::new(AtomicU64::new(0));
    for (site, secret) in secrets.gateways.iter().enumerate() {
        let gateway = TestGateway::connect(address, pinned, ACCOUNT, secret, gateway_key(site))
            .await
            .unwrap_or_else(|e| panic!("gateway of site {site} cannot connect: {e:?}"));
        let unanswered = unanswered.clone();
        let _seen = gateway.serve_answering(move |grant, answer| {
            let lame = grant.grant.resource.dns.as_ref().is_some_and(|d| {
                d.name
                    .split('.')
                    .any(|label| label.eq_ignore_ascii_case(LAME))
            });
            if lame {
                unanswered.fetch_add(1, Ordering::Relaxed);
                None
            } else {
                Some(answer)
            }
        });
    }

    let secrets_clients = Arc::new(secrets.clients);
    let started = Instant::now();
    let sockets = connect_all(options.clients, CONNECT_PARALLEL, |n| {
        let secrets = secrets_clients.clone();
        let index = extra + n;
        async move {
            hello(
                address,
                &secrets[index],
                client_key(index),
                &Origin::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("client {index} cannot connect: {e}"))
        }
    })
    .await;
    println!(
        "{} well-behaved clients connected in {:.1} s from 127.0.0.1, {CONNECT_PARALLEL} at a \
         time; portal RSS {} KiB",
        sockets.len(),
        started.elapsed().as_secs_f64(),
        server.rss_kib()
    );
    let mut clients: Vec<WellBehaved> = sockets
        .into_iter()
        .enumerate()
        .map(|(n, socket)| {
            let index = extra + n;
            let mut wants = model.wants(index);
            wants.truncate(MAX_WANTS);
            let fresh = wants
                .iter()
                .find(|w| w.resource.starts_with("web-"))
                .cloned();
            WellBehaved {
                index,
                socket,
                wants,
                next: index,
                fresh,
                fresh_made: 0,
                asked: 0,
                due: Instant::now(),
            }
        })
        .collect();

    let started = Instant::now();
    let (back, primed) = prime(clients, abuse.concurrency).await;
    clients = back;
    println!(
        "every well-behaved client asked once for each of its resources ({:.1} on average): \
         {} granted, {} rejected, {} failed in {:.1} s; from now on they get those grants again",
        clients.iter().map(|c| c.wants.len()).sum::<usize>() as f64 / clients.len() as f64,
        primed.ok,
        primed.rejected,
        primed.failed,
        started.elapsed().as_secs_f64()
    );
    for example in &primed.examples {
        println!("    {example}");
    }
    println!(
        "phases: {} well-behaved clients, each asking at most {}/s, {} in flight; a new name \
         every {FRESH_EVERY} requests where the user has a wildcard resource; a newcomer every \
         {} ms; {} s warm-up + {} s measured, alone then beside the abuser",
        clients.len(),
        abuse.rate,
        abuse.concurrency,
        NEWCOMER_EVERY.as_millis(),
        options.warmup.as_secs(),
        options.duration.as_secs()
    );

    let context = Context {
        options,
        abuse,
        address,
        server: &server,
        log: &log,
        abusers: secrets_clients[..Abuse::ALL.len()].to_vec(),
        newcomers: Arc::new(secrets_clients[Abuse::ALL.len()..extra].to_vec()),
        unanswered,
    };
    let mut pairs = Vec::new();
    for &kind in &abuse.kinds {
        println!("\n-- {}: {}", kind.name(), kind.describe(abuse));
        let (back, alone) = phase(&context, clients, None).await;
        clients = back;
        print_phase("alone", &alone);
        tokio::time::sleep(PAUSE).await;
        let (back, beside) = phase(&context, clients, Some(kind)).await;
        clients = back;
        print_phase("beside", &beside);
        let ratio = ratio(beside.p99(), alone.p99());
        println!(
            "    => well-behaved p99 {} ms alone, {} ms beside: {ratio:.2}x ({})",
            ms(alone.p99()),
            ms(beside.p99()),
            if ratio <= 2.0 {
                "within 2x"
            } else {
                "MORE than 2x"
            }
        );
        pairs.push(Pair {
            kind,
            alone,
            beside,
        });
        // Grants left waiting go on for the ack timeout after the abuser has gone.
        let settle = if kind == Abuse::Unresolved {
            Duration::from_millis(DEFAULT_ACK_TIMEOUT_MS) + PAUSE
        } else {
            PAUSE
        };
        tokio::time::sleep(settle).await;
    }

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in &warnings {
        *kinds.entry(log_message(line)).or_default() += 1;
    }
    println!("\nportal log: {} WARN/ERROR lines", warnings.len());
    for (message, count) in &kinds {
        println!("    {count:>6} x {message}");
    }
    drop(clients);
    drop(server);
    if options.keep {
        println!("kept {}", base.keep().display());
    }
    AbuseResult { name, pairs }
}

/// A log line's level and message, without its time and fields.
fn log_message(line: &str) -> String {
    let level = if line.contains("ERROR") {
        "ERROR"
    } else {
        "WARN"
    };
    let rest = line
        .split_once(level)
        .map_or(line, |(_, rest)| rest)
        .trim_start();
    // `target: message field=value ...`: keep the target and the words before the first field.
    let words: Vec<&str> = rest
        .split_whitespace()
        .take_while(|w| !w.contains('='))
        .collect();
    format!("{level} {}", words.join(" "))
}

/// Connects, says hello from `origin` and waits for `ready`, without panicking.
async fn hello(
    portal: SocketAddr,
    secret: &str,
    key: PublicKey,
    origin: &Origin,
) -> Result<Socket, String> {
    let mut socket = agent::open_with(portal, ACCOUNT, "client", secret, origin)
        .await
        .map_err(|(status, body)| format!("refused ({status}): {body}"))?;
    let hello = encode(&ClientMessage::Hello {
        public_key: key,
        endpoints: vec!["198.51.100.7:51820".parse().expect("an address")],
    });
    socket
        .send(WsMessage::Text(hello.into()))
        .await
        .map_err(|e| format!("hello not sent: {e}"))?;
    match answer(&mut socket).await? {
        PortalToClient::Ready(_) => Ok(socket),
        other => Err(format!("expected ready, got {}", short(&other))),
    }
}

/// The portal's next message to a client, waiting at most [`PATIENCE`].
async fn answer(socket: &mut Socket) -> Result<PortalToClient, String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| format!("no answer in {} s", PATIENCE.as_secs()))?;
        match frame {
            Some(Ok(WsMessage::Text(text))) => {
                return decode(text.as_bytes()).map_err(|e| format!("not a message: {e}"));
            }
            Some(Ok(WsMessage::Close(_))) | None => return Err("the portal closed".to_owned()),
            Some(Err(error)) => return Err(format!("connection error: {error}")),
            Some(Ok(_)) => {}
        }
    }
}

/// One request and its answer (a grant or rejection; other messages are skipped).
async fn ask(socket: &mut Socket, want: &Want) -> Result<PortalToClient, String> {
    let request = encode(&ClientMessage::RequestAccess {
        resource: want.resource.clone(),
        dns: want.dns.clone(),
        avoid: vec![],
    });
    socket
        .send(WsMessage::Text(request.into()))
        .await
        .map_err(|e| format!("request not sent: {e}"))?;
    loop {
        match answer(socket).await? {
            found @ (PortalToClient::Granted { .. } | PortalToClient::Rejected { .. }) => {
                return Ok(found);
            }
            PortalToClient::Error { message } => return Err(format!("error: {message}")),
            _ => {}
        }
    }
}

fn short(message: &PortalToClient) -> String {
    let mut text = format!("{message:?}");
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Every client asks once for each of its resources, `concurrency` at a time.
async fn prime(clients: Vec<WellBehaved>, concurrency: usize) -> (Vec<WellBehaved>, Answers) {
    let mut shares: Vec<Vec<WellBehaved>> = (0..concurrency).map(|_| Vec::new()).collect();
    for (n, client) in clients.into_iter().enumerate() {
        shares[n % concurrency].push(client);
    }
    let workers: Vec<_> = shares
        .into_iter()
        .map(|mut share| {
            tokio::spawn(async move {
                let mut answers = Answers::default();
                for client in &mut share {
                    for want in client.wants.clone() {
                        match ask(&mut client.socket, &want).await {
                            Ok(PortalToClient::Granted { .. }) => answers.ok += 1,
                            Ok(other) => {
                                answers.rejected += 1;
                                answers.note(format!("rejected: {}", short(&other)));
                            }
                            Err(error) => {
                                answers.failed += 1;
                                answers.note(format!("failed: {error}"));
                            }
                        }
                    }
                }
                (share, answers)
            })
        })
        .collect();
    let mut clients = Vec::new();
    let mut answers = Answers::default();
    for worker in workers {
        let (share, part) = worker.await.expect("a worker");
        clients.extend(share);
        answers.merge(part);
    }
    clients.sort_by_key(|c| c.index);
    (clients, answers)
}

/// One phase: the well-behaved clients (and the abuser, if any) for the warm-up and the
/// measured window.
async fn phase(
    context: &Context<'_>,
    clients: Vec<WellBehaved>,
    abuse: Option<Abuse>,
) -> (Vec<WellBehaved>, Phase) {
    let options = context.options;
    let concurrency = context.abuse.concurrency.min(clients.len()).max(1);
    let begin = Instant::now();
    let measure_from = begin + options.warmup;
    let end = measure_from + options.duration;
    let log_offset = std::fs::metadata(context.log).map_or(0, |m| m.len());

    let abuser = abuse.filter(|k| *k != Abuse::None).map(|kind| {
        spawn_abuser(Setup {
            kind,
            address: context.address,
            secret: context.abusers[kind.client_index()].clone(),
            key: client_key(kind.client_index()),
            options: context.abuse.clone(),
            sites: options.sites,
            measure_from,
            end,
        })
    });
    let newcomers = tokio::spawn(newcomers(
        context.address,
        context.newcomers.clone(),
        measure_from,
        end,
    ));
    let interval = Duration::from_secs_f64(1.0 / context.abuse.rate);
    let mut shares: Vec<Vec<WellBehaved>> = (0..concurrency).map(|_| Vec::new()).collect();
    for (n, client) in clients.into_iter().enumerate() {
        shares[n % concurrency].push(client);
    }
    let workers: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(w, share)| {
            let offset = w as f64 / concurrency as f64;
            tokio::spawn(paced_worker(
                share,
                begin,
                offset,
                measure_from,
                end,
                interval,
            ))
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let server_before = context.server.cpu();
    let generator_before = cpu_sample("self");
    let unanswered_before = context.unanswered.load(Ordering::Relaxed);
    let wall_before = Instant::now();
    tokio::time::sleep_until(end.into()).await;
    let seconds = wall_before.elapsed().as_secs_f64();
    let server_after = context.server.cpu();
    let generator_after = cpu_sample("self");
    let unanswered = context.unanswered.load(Ordering::Relaxed) - unanswered_before;

    let mut clients = Vec::new();
    let mut answers = Answers::default();
    for worker in workers {
        let (share, part) = worker.await.expect("a worker");
        clients.extend(share);
        answers.merge(part);
    }
    clients.sort_by_key(|c| c.index);
    answers.all.sort_unstable();
    answers.fresh.sort_unstable();
    let newcomers = newcomers.await.expect("the newcomers");
    let report = match abuser {
        Some(thread) => Some(
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("the abuser's thread")
                .unwrap_or_else(|_| Report::Failed("the abuser panicked".to_owned())),
        ),
        None => None,
    };

    let ticks = clock_ticks();
    let share = |before: u64, after: u64| after.saturating_sub(before) as f64 / ticks / seconds;
    let abuser_ticks = |sample: &CpuSample| sample.threads.get("abuser").copied().unwrap_or(0);
    let abuser_cpu = share(
        abuser_ticks(&generator_before),
        abuser_ticks(&generator_after),
    );
    let generator_cpu =
        (share(generator_before.total, generator_after.total) - abuser_cpu).max(0.0);
    let threads = thread_shares(&server_before, &server_after, share);
    let refusals = refusals_logged(context.log, log_offset);
    let phase = Phase {
        answers,
        newcomers,
        seconds: options.duration.as_secs_f64(),
        server_cpu: share(server_before.total, server_after.total),
        generator_cpu,
        abuser_cpu,
        threads,
        rss_after_kib: context.server.rss_kib(),
        abuser: report,
        unanswered,
        refusals,
    };
    (clients, phase)
}

/// A share of the well-behaved clients, each asking at most once per `interval`, in turn.
async fn paced_worker(
    mut share: Vec<WellBehaved>,
    begin: Instant,
    offset: f64,
    measure_from: Instant,
    end: Instant,
    interval: Duration,
) -> (Vec<WellBehaved>, Answers) {
    let mut answers = Answers::default();
    let count = share.len();
    if count == 0 {
        return (share, answers);
    }
    // Spread over the interval, and the workers over one client's slot.
    for (n, client) in share.iter_mut().enumerate() {
        client.due = begin + interval.mul_f64((n as f64 + offset) / count as f64);
    }
    let mut turn = 0;
    loop {
        let client = &mut share[turn % count];
        turn += 1;
        if client.due >= end {
            break;
        }
        tokio::time::sleep_until(client.due.into()).await;
        let (fresh, want) = client.next_request();
        let sent = Instant::now();
        let outcome = ask(&mut client.socket, &want).await;
        let done = Instant::now();
        // Never sooner than half an interval after the last request, even when behind.
        client.due = (client.due + interval).max(sent + interval / 2);
        if done < measure_from || done > end {
            continue;
        }
        match outcome {
            Ok(PortalToClient::Granted { .. }) => {
                answers.ok += 1;
                answers.all.push(done - sent);
                if fresh {
                    answers.fresh.push(done - sent);
                }
            }
            Ok(PortalToClient::Rejected { reason, .. }) => {
                answers.rejected += 1;
                if reason.contains("too many requests") {
                    answers.rate_limited += 1;
                }
                answers.note(format!("rejected {}: {reason}", want.resource));
            }
            Ok(other) => {
                answers.failed += 1;
                answers.note(format!("failed: {}", short(&other)));
            }
            Err(error) => {
                answers.failed += 1;
                answers.note(format!("failed: {error}"));
            }
        }
    }
    (share, answers)
}

/// A newcomer connects (hello, `ready`) every [`NEWCOMER_EVERY`] until `end`, and closes.
async fn newcomers(
    address: SocketAddr,
    secrets: Arc<Vec<String>>,
    measure_from: Instant,
    end: Instant,
) -> Connects {
    let mut connects = Connects::default();
    let mut ticks = tokio::time::interval(NEWCOMER_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut turn = 0;
    loop {
        ticks.tick().await;
        if Instant::now() >= end {
            return connects;
        }
        let n = turn % secrets.len();
        turn += 1;
        let key = newcomer_key(n);
        let started = Instant::now();
        let result = hello(address, &secrets[n], key, &Origin::default()).await;
        let done = Instant::now();
        if done < measure_from || done > end {
            continue;
        }
        match result {
            Ok(mut socket) => {
                connects.ok.push(done - started);
                let _ = socket.close(None).await;
            }
            Err(error) => {
                connects.failed += 1;
                if connects.examples.len() < 3 {
                    connects.examples.push(error);
                }
            }
        }
    }
}

fn newcomer_key(n: usize) -> PublicKey {
    client_key(Abuse::ALL.len() + n)
}

/// The counts the portal logged of connections refused or closed to make room, after
/// `offset` in its log.
fn refusals_logged(log: &Path, offset: u64) -> Refusals {
    let text = std::fs::read(log).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(text.len());
    let text = String::from_utf8_lossy(&text[start..]);
    let mut refusals = Refusals::default();
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for line in text
        .lines()
        .filter(|l| l.contains("connections refused or closed to make room"))
    {
        refusals.per_source += field(line, "refused_per_source");
        refusals.full += field(line, "refused_full");
        refusals.evicted += field(line, "evicted_idle");
    }
    refusals
}

// ---- the abuser ----

struct Setup {
    kind: Abuse,
    address: SocketAddr,
    secret: String,
    key: PublicKey,
    options: AbuseOptions,
    sites: usize,
    measure_from: Instant,
    end: Instant,
}

/// What the abuser did and what became of it, over its whole run (warm-up included).
enum Report {
    Connections(ConnectionReport),
    Requests(RequestReport),
    Failed(String),
}

#[derive(Default)]
struct ConnectionReport {
    attempted: u64,
    connect_failed: u64,
    opened: u64,
    /// How long each connection the portal closed had lived.
    lifetimes: Vec<Duration>,
    peak: usize,
    /// Held on average during the measured window.
    mean_held: f64,
    open_at_end: u64,
    seconds: f64,
}

#[derive(Default)]
struct RequestReport {
    sent: u64,
    bytes: u64,
    granted: u64,
    distinct_grants: u64,
    rate_refused: u64,
    cap_refused: u64,
    timed_out: u64,
    denied: u64,
    in_flight_refused: u64,
    errors: u64,
    /// Times the portal closed its connection (it connected again).
    closed: u64,
    seconds: f64,
    examples: Vec<String>,
}

/// Runs the abuser on a thread of its own (named `abuser`, so its CPU is counted apart) until
/// `setup.end`.
fn spawn_abuser(setup: Setup) -> std::thread::JoinHandle<Report> {
    std::thread::Builder::new()
        .name("abuser".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the abuser's runtime");
            runtime.block_on(abuse(setup))
        })
        .expect("the abuser's thread")
}

async fn abuse(setup: Setup) -> Report {
    let one = vec![Ipv4Addr::new(127, 0, 0, 2)];
    let many: Vec<Ipv4Addr> = (0..setup.options.sources)
        .map(|n| Ipv4Addr::new(127, 0, 0, 2 + n as u8))
        .collect();
    let mapped: Vec<IpAddr> = vec![
        "100.96.0.1".parse().expect("an address"),
        "fd00:2021:1111:8000::1".parse().expect("an address"),
    ];
    let dns = |name: String| {
        Some(DnsMapping {
            name,
            mapped: mapped.clone(),
        })
    };
    let request = |resource: String, dns: Option<DnsMapping>| {
        encode(&ClientMessage::RequestAccess {
            resource,
            dns,
            avoid: vec![],
        })
    };
    match setup.kind {
        Abuse::None => Report::Failed("nothing to do".to_owned()),
        Abuse::Idle => Report::Connections(connections(&setup, &one, false).await),
        Abuse::IdleSources => Report::Connections(connections(&setup, &many, false).await),
        Abuse::Slowloris => Report::Connections(connections(&setup, &one, true).await),
        Abuse::SlowlorisSources => Report::Connections(connections(&setup, &many, true).await),
        Abuse::Unresolved => Report::Requests(
            requests(&setup, MAX_REQUESTS_IN_FLIGHT, |n| {
                request(
                    "web-000".to_owned(),
                    dns(format!("u{n}.{LAME}.web.site-000.corp.example")),
                )
            })
            .await,
        ),
        Abuse::GrantBurst => {
            let sites = setup.sites.max(1);
            Report::Requests(
                requests(&setup, setup.options.window, |n| {
                    let site = n as usize % sites;
                    request(
                        format!("web-{site:03}"),
                        dns(format!("b{n}.web.site-{site:03}.corp.example")),
                    )
                })
                .await,
            )
        }
        Abuse::GrantRepeat => {
            let same = request(
                "app-000".to_owned(),
                dns("app.site-000.corp.example".to_owned()),
            );
            Report::Requests(requests(&setup, setup.options.window, |_| same.clone()).await)
        }
        Abuse::Flood => {
            let filler = "x".repeat(setup.options.id_bytes);
            let label = "a".repeat(63);
            let mut long_name = String::new();
            while long_name.len() < setup.options.id_bytes {
                long_name.push_str(&label);
                long_name.push('.');
            }
            long_name.push_str("web.site-000.corp.example");
            Report::Requests(
                requests(&setup, setup.options.window, |n| {
                    if n % 2 == 0 {
                        // Distinct from the start, so no two are the same denial.
                        let mut id = format!("{n:012}-");
                        id.push_str(&filler[id.len().min(filler.len())..]);
                        request(id, None)
                    } else {
                        request("web-000".to_owned(), dns(format!("{n}.{long_name}")))
                    }
                })
                .await,
            )
        }
    }
}

/// Idle or slow connections from `sources`, opened at the configured rate up to the
/// configured number held, each opened again once closed.
async fn connections(setup: &Setup, sources: &[Ipv4Addr], slow: bool) -> ConnectionReport {
    #[derive(Default)]
    struct Shared {
        held: AtomicUsize,
        connecting: AtomicUsize,
        peak: AtomicUsize,
        opened: AtomicU64,
        connect_failed: AtomicU64,
        open_at_end: AtomicU64,
        lifetimes: Mutex<Vec<Duration>>,
    }
    let shared = Arc::new(Shared::default());
    let options = &setup.options;
    let started = Instant::now();
    let end = setup.end;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / options.open_rate as f64));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    let (mut held_sum, mut samples) = (0_usize, 0_usize);
    let mut tasks = tokio::task::JoinSet::new();
    let mut attempted = 0_u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let busy = shared.held.load(Ordering::Relaxed) + shared.connecting.load(Ordering::Relaxed);
                if busy >= options.connections {
                    continue;
                }
                let source = sources[attempted as usize % sources.len()];
                attempted += 1;
                shared.connecting.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let portal = setup.address;
                tasks.spawn(async move {
                    let connected = async {
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
                        socket.connect(portal).await
                    };
                    let stream = tokio::time::timeout_at(end.into(), connected).await;
                    shared.connecting.fetch_sub(1, Ordering::Relaxed);
                    let Ok(Ok(stream)) = stream else {
                        shared.connect_failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let opened = Instant::now();
                    shared.opened.fetch_add(1, Ordering::Relaxed);
                    let held = shared.held.fetch_add(1, Ordering::Relaxed) + 1;
                    shared.peak.fetch_max(held, Ordering::Relaxed);
                    let (mut read, mut write) = stream.into_split();
                    let closed = async {
                        let mut buffer = [0_u8; 512];
                        loop {
                            match read.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    };
                    let trickle = async {
                        if !slow {
                            return std::future::pending::<()>().await;
                        }
                        if write
                            .write_all(b"GET /api/acme/client HTTP/1.1\r\nHost: portal\r\nX-Slow: ")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        loop {
                            tokio::time::sleep(TRICKLE).await;
                            if write.write_all(b"a").await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        () = closed => {}
                        () = trickle => {}
                        () = tokio::time::sleep_until(end.into()) => {
                            shared.open_at_end.fetch_add(1, Ordering::Relaxed);
                            shared.held.fetch_sub(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    shared.held.fetch_sub(1, Ordering::Relaxed);
                    shared.lifetimes.lock().expect("the lifetimes").push(opened.elapsed());
                });
            }
            _ = sample.tick() => {
                if Instant::now() >= setup.measure_from {
                    held_sum += shared.held.load(Ordering::Relaxed);
                    samples += 1;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = tokio::time::sleep_until(end.into()) => break,
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut lifetimes = std::mem::take(&mut *shared.lifetimes.lock().expect("the lifetimes"));
    lifetimes.sort_unstable();
    ConnectionReport {
        attempted,
        connect_failed: shared.connect_failed.load(Ordering::Relaxed),
        opened: shared.opened.load(Ordering::Relaxed),
        lifetimes,
        peak: shared.peak.load(Ordering::Relaxed),
        mean_held: held_sum as f64 / samples.max(1) as f64,
        open_at_end: shared.open_at_end.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// One client sending the requests `make` builds, `window` outstanding at most, as fast as
/// the portal takes them, connecting again if the portal closes it.
async fn requests(
    setup: &Setup,
    window: usize,
    mut make: impl FnMut(u64) -> String,
) -> RequestReport {
    let mut report = RequestReport::default();
    let mut ids: HashSet<String> = HashSet::new();
    let started = Instant::now();
    let mut n = 0_u64;
    while Instant::now() < setup.end {
        let socket = match hello(setup.address, &setup.secret, setup.key, &Origin::default()).await
        {
            Ok(socket) => socket,
            Err(error) => {
                report.errors += 1;
                if report.examples.len() < 5 {
                    report.examples.push(format!("cannot connect: {error}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (mut sink, mut stream) = socket.split();
        let room = Semaphore::new(window);
        let (mut sent, mut bytes) = (0_u64, 0_u64);
        let send = async {
            loop {
                let Ok(permit) = room.acquire().await else {
                    return;
                };
                permit.forget();
                let text = make(n);
                n += 1;
                bytes += text.len() as u64;
                if sink.send(WsMessage::Text(text.into())).await.is_err() {
                    return;
                }
                sent += 1;
            }
        };
        let receive = async {
            while let Some(frame) = stream.next().await {
                let Ok(WsMessage::Text(text)) = frame else {
                    if frame.is_err() {
                        return;
                    }
                    continue;
                };
                let Ok(message) = decode::<PortalToClient>(text.as_bytes()) else {
                    continue;
                };
                match message {
                    PortalToClient::Granted { grant, .. } => {
                        report.granted += 1;
                        ids.insert(grant.grant.id);
                    }
                    PortalToClient::Rejected { reason, .. } => {
                        if reason.contains("too many requests") {
                            report.rate_refused += 1;
                        } else if reason.contains("max_grants_per_client") {
                            report.cap_refused += 1;
                        } else if reason.contains("did not answer within") {
                            report.timed_out += 1;
                        } else {
                            report.denied += 1;
                            if report.examples.len() < 3 {
                                report.examples.push(format!("denied: {}", cut(&reason)));
                            }
                        }
                    }
                    PortalToClient::Error { message } => {
                        if message.contains("may wait at once") {
                            report.in_flight_refused += 1;
                        } else {
                            report.errors += 1;
                            if report.examples.len() < 5 {
                                report.examples.push(format!("error: {}", cut(&message)));
                            }
                        }
                    }
                    _ => continue,
                }
                room.add_permits(1);
            }
        };
        tokio::select! {
            () = send => {}
            () = receive => {}
            () = tokio::time::sleep_until(setup.end.into()) => {}
        }
        report.sent += sent;
        report.bytes += bytes;
        if Instant::now() < setup.end {
            report.closed += 1;
        }
    }
    report.distinct_grants = ids.len() as u64;
    report.seconds = started.elapsed().as_secs_f64();
    report
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(160) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

// ---- printing ----

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

fn print_phase(label: &str, phase: &Phase) {
    let a = &phase.answers;
    println!(
        "  {label:<6} well-behaved {:>6.0}/s  p50 {:>7} ms  p99 {:>7} ms  max {:>7} ms  ({} ok, \
         {} rejected, {} failed); new grants ({}) p50 {} p99 {} ms",
        phase.rate(),
        ms(phase.p50()),
        ms(phase.p99()),
        ms(a.all.last().copied().unwrap_or_default()),
        a.ok,
        a.rejected,
        a.failed,
        a.fresh.len(),
        ms(percentile(&a.fresh, 50.0)),
        ms(percentile(&a.fresh, 99.0)),
    );
    if a.rate_limited > 0 {
        println!(
            "         WARNING: {} well-behaved requests were refused for their rate",
            a.rate_limited
        );
    }
    for example in &a.examples {
        println!("         {example}");
    }
    let c = &phase.newcomers;
    println!(
        "         newcomers: {} connected, p50 {} ms, p99 {} ms, max {} ms; {} failed",
        c.ok.len(),
        ms(percentile(&sorted(&c.ok), 50.0)),
        ms(percentile(&sorted(&c.ok), 99.0)),
        ms(c.ok.iter().max().copied().unwrap_or_default()),
        c.failed
    );
    for example in &c.examples {
        println!("         newcomer failed: {example}");
    }
    let mut threads = String::new();
    for (name, cpu) in phase.threads.iter().take(5) {
        write!(threads, "{name} {:.0}%, ", cpu * 100.0).ok();
    }
    println!(
        "         CPU: server {:.0}% ({}), generator {:.0}%, abuser {:.0}% (100% = one core); \
         server RSS {} KiB",
        phase.server_cpu * 100.0,
        threads.trim_end_matches(", "),
        phase.generator_cpu * 100.0,
        phase.abuser_cpu * 100.0,
        phase.rss_after_kib
    );
    let r = phase.refusals;
    if r.per_source + r.full + r.evicted > 0 {
        println!(
            "         portal log: {} refused past the per-source cap, {} past the \
             unauthenticated cap, {} idle ones closed to make room (logged at most every 10 s)",
            r.per_source, r.full, r.evicted
        );
    }
    if let Some(report) = &phase.abuser {
        for line in describe_report(report, phase.unanswered) {
            println!("         abuser: {line}");
        }
    }
}

fn sorted(durations: &[Duration]) -> Vec<Duration> {
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    sorted
}

fn describe_report(report: &Report, unanswered: u64) -> Vec<String> {
    match report {
        Report::Failed(reason) => vec![format!("failed: {reason}")],
        Report::Connections(c) => {
            let at_once = c.lifetimes.iter().filter(|l| **l < AT_ONCE).count();
            let later: Vec<Duration> = c
                .lifetimes
                .iter()
                .copied()
                .filter(|l| *l >= AT_ONCE)
                .collect();
            vec![
                format!(
                    "{} connections attempted in {:.0} s ({:.0}/s), {} opened, {} failed to \
                     connect; held at most {} at once, {:.0} on average while measured, {} \
                     still open at the end",
                    c.attempted,
                    c.seconds,
                    c.attempted as f64 / c.seconds.max(0.001),
                    c.opened,
                    c.connect_failed,
                    c.peak,
                    c.mean_held,
                    c.open_at_end
                ),
                format!(
                    "closed by the portal: {at_once} at once (within {} ms: refused at accept), \
                     {} later after p50 {:.2} s, p90 {:.2} s, max {:.2} s",
                    AT_ONCE.as_millis(),
                    later.len(),
                    percentile(&later, 50.0).as_secs_f64(),
                    percentile(&later, 90.0).as_secs_f64(),
                    later.last().copied().unwrap_or_default().as_secs_f64()
                ),
            ]
        }
        Report::Requests(r) => {
            let mut lines = vec![
                format!(
                    "{} requests sent in {:.0} s ({:.0}/s, {:.1} MB); connection closed by the \
                     portal {} times",
                    r.sent,
                    r.seconds,
                    r.sent as f64 / r.seconds.max(0.001),
                    r.bytes as f64 / 1e6,
                    r.closed
                ),
                format!(
                    "granted {} ({} distinct grants), refused for the rate {}, for the grant \
                     cap {}, waiting past the ack timeout {}, denied {}, refused for requests \
                     waiting {}, other errors {}{}",
                    r.granted,
                    r.distinct_grants,
                    r.rate_refused,
                    r.cap_refused,
                    r.timed_out,
                    r.denied,
                    r.in_flight_refused,
                    r.errors,
                    if unanswered > 0 {
                        format!("; gateways left {unanswered} grants unanswered while measured")
                    } else {
                        String::new()
                    }
                ),
            ];
            lines.extend(r.examples.iter().cloned());
            lines
        }
    }
}

/// One short phrase of what the abuser got, for the summary table.
fn abuser_summary(report: Option<&Report>) -> String {
    match report {
        None => "-".to_owned(),
        Some(Report::Failed(reason)) => reason.clone(),
        Some(Report::Connections(c)) => {
            let at_once = c.lifetimes.iter().filter(|l| **l < AT_ONCE).count();
            format!(
                "held <= {} (avg {:.0}); {} of {} closed at once",
                c.peak, c.mean_held, at_once, c.opened
            )
        }
        Some(Report::Requests(r)) => format!(
            "{:.0} req/s: {} granted ({} new), {} rate-refused, {} cap, {} timed out, {} denied, {} too many waiting",
            r.sent as f64 / r.seconds.max(0.001),
            r.granted,
            r.distinct_grants,
            r.rate_refused,
            r.cap_refused,
            r.timed_out,
            r.denied,
            r.in_flight_refused
        ),
    }
}

pub(crate) fn print_abuse_summary(options: &Options, results: &[AbuseResult]) {
    let abuse = &options.abuse;
    println!("\n== abuse summary ({})", machine());
    println!(
        "{} well-behaved clients, each at most {}/s, {} in flight, {} gateways; {} s measured \
         per phase after {} s warm-up; {}",
        options.clients,
        abuse.rate,
        abuse.concurrency,
        options.sites,
        options.duration.as_secs(),
        options.warmup.as_secs(),
        if options.pin {
            "server pinned to CPU 0, generator and abuser to CPU 1"
        } else {
            "server, generator and abuser share the cores"
        }
    );
    for result in results {
        println!("\n{}", result.name);
        println!(
            "{:<18} {:>10} {:>10} {:>10} {:>10} {:>7} {:>6} {:>11} {:>11} {:>8} {:>8}  abuser",
            "abuse",
            "alone p50",
            "alone p99",
            "beside p50",
            "beside p99",
            "ratio",
            "goal",
            "rate alone",
            "rate beside",
            "conn p99",
            "conn p99"
        );
        println!(
            "{:<18} {:>10} {:>10} {:>10} {:>10} {:>7} {:>6} {:>11} {:>11} {:>8} {:>8}",
            "", "ms", "ms", "ms", "ms", "p99", "2x", "/s", "/s", "alone", "beside"
        );
        for pair in &result.pairs {
            let ratio = ratio(pair.beside.p99(), pair.alone.p99());
            let connect = |phase: &Phase| ms(percentile(&sorted(&phase.newcomers.ok), 99.0));
            println!(
                "{:<18} {:>10} {:>10} {:>10} {:>10} {:>6.2}x {:>6} {:>11.0} {:>11.0} {:>8} {:>8}  {}",
                pair.kind.name(),
                ms(pair.alone.p50()),
                ms(pair.alone.p99()),
                ms(pair.beside.p50()),
                ms(pair.beside.p99()),
                ratio,
                if ratio <= 2.0 { "met" } else { "MISSED" },
                pair.alone.rate(),
                pair.beside.rate(),
                connect(&pair.alone),
                connect(&pair.beside),
                abuser_summary(pair.beside.abuser.as_ref())
            );
        }
    }
}
