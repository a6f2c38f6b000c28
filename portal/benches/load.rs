//! Load benchmark of the portal over real WebSockets on loopback, run by hand (never by CI):
//!
//! ```text
//! cargo bench -p fz-portal --bench load -- [OPTIONS]      # or portal/benches/load.sh
//! ```
//!
//! It writes a policy tree (100 sites of 5 resources each, DNS names, wildcards, CIDRs, IPv4
//! and IPv6, 53 groups, 600 rules with conditions and guardrails), creates the client and
//! gateway tokens and the identity provider's group memberships straight through
//! `fz_portal::store::Store`, and starts the real `fz-portal serve` as a child process so its
//! memory can be read from `/proc`. Then it connects one gateway per site and the clients
//! (two devices per user), each saying hello and waiting for `ready`, and reads the portal's
//! RSS per idle connection. In the load phase, `--concurrency` workers each own a share of
//! the clients and, in a closed loop, make one of their clients ask for the next resource
//! the policy allows its user; latency runs from sending `request_access` to the client
//! holding its signed grant, the gateway's verification and acknowledgement included. The
//! gateways are the tests' `TestGateway`s: they heartbeat, verify every grant and
//! acknowledge it.
//!
//! The same harness then runs against a trivial axum WebSocket echo server (this binary,
//! started again as `echo-server`): same connections, same concurrency, a message the size
//! of a `request_access`, and waits for the echo. That is the ceiling a WebSocket service
//! on this machine can reach; a grant needs two WebSocket round trips (client and gateway)
//! where the echo needs one.
//!
//! Each phase also prints where the time goes without a profiler: the CPU the server's
//! threads used (tokio workers, sqlx's SQLite threads) and the generator's, server CPU per
//! answer (on PostgreSQL, the database's CPU beside it), and each answer's latency split
//! where its gateway acknowledged the grant (request to acknowledgement; acknowledgement to
//! the client holding the grant, which is the store write and the answer). With `--store disk,shm` the portal runs twice, its data dir on disk
//! and on tmpfs, to show what disk syncs cost.
//!
//! A client's first request for each resource makes a grant that stays in force for hours;
//! asking again for the same resource gets the grant in force again (issue 14), so once a
//! client has been through its resources its answers are grants handed out again, not new
//! ones. The phases run one after the other on the same portal, so each phase starts with the
//! grants of those before it (printed as "grants in force", which counts every answer granted,
//! so it is an upper bound once grants are handed out again): the portal decides every grant
//! in force again each minute. The account's per-client limits are
//! raised out of the way: the generator sets the pace.
//! The gateways get 30 s to acknowledge (`gateway_ack_timeout_ms`) so that a busy generator
//! does not get them taken out of service.
//!
//! The load generator runs on the same machine as the server; `--pin` puts the server on
//! CPU 0 and the generator on CPU 1 (with `taskset`), otherwise they share both cores.
//!
//! With `--abuse LIST` it runs the abuse scenario instead (or after the phases above when
//! `--concurrency` is given too): one abusive client (idle or slow connections, names that
//! never resolve, a grant burst, identical requests, a flood of denials) beside the
//! well-behaved clients, on a portal with the limits the product ships; see `load/abuse.rs`.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it does nothing.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)] // A bench binary: it prints its figures, and a setup step that cannot be done fails loudly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use fz_host::testing::agents::{self as agent, Socket, TestClient, TestGateway};
use fz_portal::data_dir::Creation;
use fz_portal::keys::KeyFiles;
use fz_portal::store::{DATABASE_FILE, Database, Store, TokenKind};
use fz_proto::{
    ClientMessage, DnsMapping, PortalPublicKey, PortalToClient, PortalToGateway, PublicKey, encode,
};
use tokio::sync::Semaphore;

#[path = "load/abuse.rs"]
mod abuse;
use abuse::{Abuse, AbuseOptions};

const USAGE: &str = "\
usage: cargo bench -p fz-portal --bench load -- [OPTIONS]
  --clients N          connected clients, two per user (default 10000)
  --gateways N         sites, one gateway each (default 100)
  --concurrency LIST   requests in flight, one load phase each; `all` = every client
                       (default 16,64,256,1024)
  --warmup SECS        before measuring, per phase (default 2)
  --duration SECS      measured, per phase (default 10)
  --targets LIST       portal, echo (default portal,echo)
  --store LIST         where the portal's store is: disk, shm (its SQLite file in a data dir
                       there), postgres (a PostgreSQL server the bench starts; needs
                       Debian's postgresql) (default disk,shm)
  --replicas N         1, or 2 with `--store postgres`: a second portal on the same database,
                       the gateways connected to it and the clients to the first, so every
                       grant crosses replicas (default 1)
  --pin                server on CPU 0, load generator on CPU 1 (taskset)
  --client-verify      clients verify each grant too (gateways always do)
  --connect-parallel N connections opened at once (default 256)
  --log FILTER         the portal's RUST_LOG (default info)
  --portal-binary PATH run this fz-portal instead of the one cargo built, to compare two
                       builds under one run's conditions (default: cargo's)
  --keep               keep the temporary directories (printed)
abuse scenario (a portal of its own with the shipped limits; without `--concurrency` only
this runs):
  --abuse LIST         none, idle, idle-sources, slowloris, slowloris-sources, unresolved,
                       grant-burst, grant-repeat, flood, or all: for each, a phase of the
                       well-behaved clients alone and one beside the abuser
  --abuse-concurrency N  well-behaved requests in flight (default 64)
  --abuse-rate R       requests a second per well-behaved client, at most 5 (default 2)
  --abuse-connections N  idle or slow connections the abuser holds at most (default 5000)
  --abuse-open-rate N  connections it opens a second at most (default 1000)
  --abuse-sources N    addresses of the `-sources` kinds, 127.0.0.2 and up (default 100)
  --abuse-window N     requests a flooding client keeps outstanding (default 256)
  --abuse-id-bytes N   length of the flood's ids and names (default 16384)";

/// The argument that starts this binary as the echo server.
const ECHO_SERVER: &str = "echo-server";
const ACCOUNT: &str = "acme";
const TEAMS: usize = 50;
const ADMINS: usize = 20;
/// The same WebSocket settings as the portal's agent endpoint (`portal/src/agents.rs`), so
/// the echo's memory per connection is comparable.
const READ_BUFFER_BYTES: usize = 4 * 1024;
const MAX_FRAME_BYTES: usize = 4 * fz_proto::MAX_MESSAGE_BYTES;
/// Where the generator and the server run with `--pin`.
const SERVER_CPU: &str = "0";
const GENERATOR_CPU: &str = "1";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(ECHO_SERVER) {
        return echo_server();
    }
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "load: nothing to do outside `cargo bench -p fz-portal --bench load` (it is run by hand)"
        );
        return ExitCode::SUCCESS;
    }
    let options = match Options::parse(args.into_iter().filter(|a| a != "--bench")) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.pin {
        // Before the runtime starts, so that every thread it makes inherits the mask.
        let pid = std::process::id().to_string();
        let status = Command::new("taskset")
            .args(["-p", "-c", GENERATOR_CPU, &pid])
            .stdout(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("error: `taskset` could not pin the generator to CPU {GENERATOR_CPU}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(options));
    ExitCode::SUCCESS
}

#[derive(Debug, Clone)]
struct Options {
    clients: usize,
    sites: usize,
    concurrency: Vec<usize>,
    warmup: Duration,
    duration: Duration,
    portal: bool,
    echo: bool,
    stores: Vec<StoreKind>,
    /// Portals on the one database: 2 puts the gateways on a second one.
    replicas: usize,
    pin: bool,
    client_verify: bool,
    connect_parallel: usize,
    log: String,
    /// The `fz-portal` to start: cargo's build unless `--portal-binary` names another.
    portal_binary: PathBuf,
    keep: bool,
    abuse: AbuseOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Disk,
    Shm,
    /// A fresh database on a PostgreSQL server of the bench's own (`fz_host::testing::
    /// postgres`: its files on disk, synchronous commits), the data dir (keys) on disk.
    Postgres,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Disk => "disk",
            StoreKind::Shm => "shm",
            StoreKind::Postgres => "postgres",
        }
    }

    /// A data directory's parent (`prefix…`, on tmpfs for `shm`) and the database.
    fn prepare(self, prefix: &str) -> (tempfile::TempDir, Database) {
        let builder = tempfile::Builder::new().prefix(prefix).clone();
        let base = match self {
            StoreKind::Shm => builder.tempdir_in("/dev/shm"),
            StoreKind::Disk | StoreKind::Postgres => builder.tempdir(),
        }
        .expect("a data directory");
        let database = match self {
            StoreKind::Postgres => {
                let server = fz_host::testing::postgres::server()
                    .unwrap_or_else(|why| panic!("no PostgreSQL for the bench: {why}"));
                Database::Postgres(server.database())
            }
            StoreKind::Disk | StoreKind::Shm => Database::Sqlite,
        };
        (base, database)
    }
}

/// The configuration line that keeps the portal's store in `database` (none for SQLite).
fn database_line(database: &Database) -> String {
    match database {
        Database::Sqlite => String::new(),
        Database::Postgres(url) => format!("database_url = \"{url}\"\n"),
    }
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut options = Options {
            clients: 10_000,
            sites: 100,
            concurrency: Vec::new(),
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            portal: true,
            echo: true,
            stores: vec![StoreKind::Disk, StoreKind::Shm],
            replicas: 1,
            pin: false,
            client_verify: false,
            connect_parallel: 256,
            log: "info".to_owned(),
            portal_binary: PathBuf::from(env!("CARGO_BIN_EXE_fz-portal")),
            keep: false,
            abuse: AbuseOptions::default(),
        };
        let mut concurrency = None;
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("`{arg}` needs a value"));
            let number = |text: String| {
                text.replace('_', "")
                    .parse::<usize>()
                    .map_err(|_| format!("`{text}` is not a number"))
            };
            match arg.as_str() {
                "--clients" => options.clients = number(value()?)?,
                "--gateways" => options.sites = number(value()?)?,
                "--concurrency" => concurrency = Some(value()?),
                "--warmup" => options.warmup = Duration::from_secs(number(value()?)? as u64),
                "--duration" => options.duration = Duration::from_secs(number(value()?)? as u64),
                "--targets" => {
                    let list = value()?;
                    options.portal = false;
                    options.echo = false;
                    for target in list.split(',') {
                        match target {
                            "portal" => options.portal = true,
                            "echo" => options.echo = true,
                            other => return Err(format!("unknown target `{other}`")),
                        }
                    }
                }
                "--store" => {
                    options.stores = value()?
                        .split(',')
                        .map(|s| match s {
                            "disk" => Ok(StoreKind::Disk),
                            "shm" => Ok(StoreKind::Shm),
                            "postgres" => Ok(StoreKind::Postgres),
                            other => Err(format!("unknown store `{other}`")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--replicas" => {
                    options.replicas = number(value()?)?;
                    if !(1..=2).contains(&options.replicas) {
                        return Err("--replicas is 1 or 2".to_owned());
                    }
                }
                "--pin" => options.pin = true,
                "--client-verify" => options.client_verify = true,
                "--connect-parallel" => options.connect_parallel = number(value()?)?.max(1),
                "--portal-binary" => options.portal_binary = PathBuf::from(value()?),
                "--log" => options.log = value()?,
                "--keep" => options.keep = true,
                "--abuse" => options.abuse.kinds = Abuse::parse_list(&value()?)?,
                "--abuse-concurrency" => options.abuse.concurrency = number(value()?)?,
                "--abuse-rate" => {
                    let text = value()?;
                    options.abuse.rate = text
                        .parse()
                        .map_err(|_| format!("`{text}` is not a number"))?;
                }
                "--abuse-connections" => options.abuse.connections = number(value()?)?,
                "--abuse-open-rate" => options.abuse.open_rate = number(value()?)?,
                "--abuse-sources" => options.abuse.sources = number(value()?)?,
                "--abuse-window" => options.abuse.window = number(value()?)?,
                "--abuse-id-bytes" => options.abuse.id_bytes = number(value()?)?,
                other => return Err(format!("unknown option `{other}`")),
            }
        }
        if options.clients < 2 || options.sites == 0 {
            return Err("at least 2 clients and 1 gateway".to_owned());
        }
        if options.replicas > 1 && options.stores != [StoreKind::Postgres] {
            return Err("`--replicas 2` shares one database: `--store postgres` alone".to_owned());
        }
        options.abuse.validate()?;
        if !options.abuse.kinds.is_empty() && !options.portal {
            return Err("`--abuse` runs against the portal: `--targets` must name it".to_owned());
        }
        // With `--abuse` alone, only the abuse scenario runs.
        let concurrency = match concurrency {
            Some(list) => list,
            None if options.abuse.kinds.is_empty() => "16,64,256,1024".to_owned(),
            None => String::new(),
        };
        for item in concurrency.split(',').filter(|i| !i.is_empty()) {
            let n = if item == "all" {
                options.clients
            } else {
                number_of(item)?
            };
            options.concurrency.push(n.clamp(1, options.clients));
        }
        Ok(options)
    }
}

fn number_of(text: &str) -> Result<usize, String> {
    text.replace('_', "")
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))
}

// ---- the run ----

async fn run(options: Options) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let needed = options.clients + options.sites + 256;
    println!("== fz-portal load benchmark");
    println!("machine: {}", machine());
    println!(
        "open files limit {limit} (the generator holds about {needed} sockets, the server as many)"
    );
    if (limit as usize) < needed {
        println!("warning: the open files limit is below what the run needs");
    }
    if options.pin {
        println!("pinned: server on CPU {SERVER_CPU}, load generator on CPU {GENERATOR_CPU}");
    } else {
        println!(
            "not pinned: the load generator and the server share the machine's {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    let model = Model::new(options.clients, options.sites);
    let work = tempfile::Builder::new()
        .prefix("fz-load-")
        .tempdir()
        .expect("a temporary directory");
    let policy = work.path().join("policy");
    let summary = model.write_tree(&policy);
    println!("policy: {summary}");
    println!(
        "clients: {} ({} users, two devices each), gateways: {} (one per site)",
        options.clients,
        model.users.len(),
        options.sites
    );
    let mut results = Vec::new();
    if !options.concurrency.is_empty() {
        println!(
            "load: closed loop, concurrency {:?}, {} s warm-up + {} s measured per phase",
            options.concurrency,
            options.warmup.as_secs(),
            options.duration.as_secs()
        );
        if options.portal {
            for &store in &options.stores {
                results.push(portal_target(&options, &model, &policy, store).await);
            }
        }
        if options.echo {
            results.push(echo_target(&options, &model).await);
        }
    }
    let mut abused = Vec::new();
    if !options.abuse.kinds.is_empty() {
        for &store in &options.stores {
            abused.push(abuse::abuse_target(&options, &policy, store).await);
        }
    }
    if !results.is_empty() {
        print_summary(&options, &results);
    }
    if !abused.is_empty() {
        abuse::print_abuse_summary(&options, &abused);
    }
    if options.keep {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
}

/// What one target (portal on a store, or the echo) measured.
struct TargetResult {
    name: String,
    idle: Idle,
    phases: Vec<Phase>,
}

struct Idle {
    rss_started_kib: u64,
    rss_gateways_kib: u64,
    rss_clients_kib: u64,
    per_client_kib: f64,
    connect_secs: f64,
}

struct Phase {
    concurrency: usize,
    tally: Tally,
    seconds: f64,
    server_cpu: f64,
    generator_cpu: f64,
    /// The PostgreSQL server's, postmaster and backends (none on SQLite).
    database_cpu: Option<f64>,
    threads: Vec<(String, f64)>,
    rss_after_kib: u64,
    /// Grants the portal holds after the phase (each one stays in force for hours).
    in_force_after: Option<u64>,
    /// The store's commits in the measured window, from the portal's `/metrics`.
    commits: Option<Commits>,
}

/// The portal's commit histogram (`fz_portal_store_commit_seconds`): how many, and their
/// summed wall time.
#[derive(Debug, Clone, Copy)]
struct Commits {
    count: u64,
    seconds: f64,
}

impl Commits {
    /// Read from the portal's `/metrics` at `address`; none when it cannot be read.
    async fn read(address: SocketAddr) -> Option<Commits> {
        let scrape = move || fz_host::testing::metrics::http_get(address, "/metrics");
        let text = tokio::task::spawn_blocking(scrape).await.ok()?.ok()?;
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some(Commits {
            count: value("fz_portal_store_commit_seconds_count")? as u64,
            seconds: value("fz_portal_store_commit_seconds_sum")?,
        })
    }

    fn since(self, before: Commits) -> Commits {
        Commits {
            count: self.count.saturating_sub(before.count),
            seconds: self.seconds - before.seconds,
        }
    }
}

impl Phase {
    fn rate(&self) -> f64 {
        self.tally.ok as f64 / self.seconds
    }
}

// ---- the portal ----

async fn portal_target(
    options: &Options,
    model: &Model,
    policy: &Path,
    store_kind: StoreKind,
) -> TargetResult {
    let name = match options.replicas {
        1 => format!("portal ({})", store_kind.name()),
        _ => format!("portal ({}, two replicas)", store_kind.name()),
    };
    println!("\n== {name}");
    let (base, database) = store_kind.prepare("fz-load-data-");
    let data = base.path().join("data");
    let started = Instant::now();
    let secrets = populate(&data, &database, model, store_kind).await;
    println!(
        "store: {} client and {} gateway tokens, {} users' memberships written in {:.1} s ({})",
        secrets.clients.len(),
        secrets.gateways.len(),
        model.users.len(),
        started.elapsed().as_secs_f64(),
        data.display()
    );
    let config = base.path().join("portal.toml");
    // The first replica's `/metrics`, on a port free a moment ago, for the store's commits.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port");
    let settings = |data_dir: &Path, keys: &str, metrics: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\n{metrics}data_dir = \"{}\"\n{}{keys}\
             # The generator shares the machine: give the gateways time before they count as silent.\n\
             gateway_ack_timeout_ms = 30000\n\
             # Every client connects from 127.0.0.1, `--connect-parallel` of them at once.\n\
             max_unauthenticated_per_source = 4096\n\n\
             [[accounts]]\nslug = \"{ACCOUNT}\"\npolicy = \"{}\"\n\
             # An administrator's device asks for up to 500 resources; the generator, not\n\
             # one client, sets the pace.\n\
             max_grants_per_client = 100000\nrequests_per_second = 100000\n\
             request_burst = 100000\n",
            data_dir.display(),
            database_line(&database),
            policy.display()
        )
    };
    let metrics_line = format!("metrics_listen = \"{metrics}\"\n");
    std::fs::write(&config, settings(&data, "", &metrics_line)).expect("a configuration file");
    let log = base.path().join("portal.log");
    let serve = |config: &Path| {
        let mut command = server_command(options, &options.portal_binary);
        command
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("RUST_LOG", &options.log);
        command
    };
    let listening = "fz-portal listening on ";
    let (server, line) = Server::spawn(serve(&config), &log, listening).await;
    let (address, pinned) = portal_address(&line);
    println!("portal pid {} on {address}", server.pid());
    // The second replica: its own data dir, the first one's keys, the gateways' portal.
    let second = if options.replicas > 1 {
        let keys = format!(
            "signing_key_file = \"{}\"\ntoken_key_file = \"{}\"\n",
            data.join(fz_portal::keys::FILE).display(),
            data.join(fz_portal::keys::TOKEN_KEY_FILE).display()
        );
        let config = base.path().join("replica.toml");
        std::fs::write(&config, settings(&base.path().join("replica"), &keys, ""))
            .expect("a configuration file");
        let log = base.path().join("replica.log");
        let (second, line) = Server::spawn(serve(&config), &log, listening).await;
        let (address, _) = portal_address(&line);
        println!(
            "second replica pid {} on {address}: the gateways' portal",
            second.pid()
        );
        Some((second, address))
    } else {
        None
    };
    let gateway_address = second.as_ref().map_or(address, |(_, address)| *address);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_started_kib = server.rss_kib();

    let acks: Acks = Arc::default();
    let mut gateways = Vec::new();
    for (site, secret) in secrets.gateways.iter().enumerate() {
        let gateway =
            TestGateway::connect(gateway_address, pinned, ACCOUNT, secret, gateway_key(site))
                .await
                .unwrap_or_else(|e| panic!("gateway of site {site} cannot connect: {e:?}"));
        gateways.push(gateway.id.clone());
        // The gateway passes on each message after it has verified and acknowledged it: note
        // when, so each answer's latency splits at the acknowledgement.
        let mut seen = gateway.serve();
        let acks = acks.clone();
        tokio::spawn(async move {
            while let Some(message) = seen.recv().await {
                if let PortalToGateway::Grant { grant } = message {
                    acks.lock()
                        .expect("the ack map")
                        .insert(grant.grant.id.clone(), Instant::now());
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_gateways_kib = server.rss_kib();
    println!(
        "{} gateways connected and serving; portal RSS {} KiB (started: {} KiB)",
        gateways.len(),
        rss_gateways_kib,
        rss_started_kib
    );

    let started = Instant::now();
    let secrets_clients = Arc::new(secrets.clients);
    // Every client, `--connect-parallel` at a time, to the portal at `address`.
    let connect_clients = |address: SocketAddr| {
        let secrets_clients = secrets_clients.clone();
        connect_all(options.clients, options.connect_parallel, move |index| {
            let secrets = secrets_clients.clone();
            async move {
                TestClient::connect(address, pinned, ACCOUNT, &secrets[index], client_key(index))
                    .await
                    .unwrap_or_else(|e| panic!("client {index} cannot connect: {e:?}"))
            }
        })
    };
    let clients = connect_clients(address).await;
    let connect_secs = started.elapsed().as_secs_f64();
    // Let the allocator and the connection tasks settle before reading the RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_clients_kib = server.rss_kib();
    let per_client_kib =
        rss_clients_kib.saturating_sub(rss_gateways_kib) as f64 / clients.len() as f64;
    println!(
        "{} clients connected (hello, ready) in {connect_secs:.1} s ({:.0}/s); portal RSS {} KiB: \
         {per_client_kib:.1} KiB per idle client",
        clients.len(),
        clients.len() as f64 / connect_secs,
        rss_clients_kib
    );

    let mut agents = Vec::with_capacity(clients.len());
    let mut missing = 0;
    for (index, client) in clients.into_iter().enumerate() {
        let visible: HashSet<&str> = client
            .ready
            .resources
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        let wants = model.wants(index);
        missing += wants
            .iter()
            .filter(|w| !visible.contains(w.resource.as_str()))
            .count();
        let offset = index % wants.len();
        agents.push(Agent::Portal {
            client: Box::new(client),
            wants,
            next: offset,
        });
    }
    if missing > 0 {
        println!("warning: {missing} allowed resources were missing from the clients' `ready`");
    }
    let visible: usize = agents
        .iter()
        .map(|a| match a {
            Agent::Portal { wants, .. } => wants.len(),
            Agent::Echo { .. } => 0,
        })
        .sum();
    println!(
        "each client asks in turn for the resources its user is allowed: {:.1} per client on \
         average",
        visible as f64 / agents.len() as f64
    );
    if let Some(sizes) = probe_sizes(&mut agents).await {
        println!("{sizes}");
    }

    // The probe's grant.
    let mut in_force = Some(1);
    let mut phases = Vec::new();
    for &concurrency in &options.concurrency {
        let servers: Vec<&Server> = std::iter::once(&server)
            .chain(second.as_ref().map(|(second, _)| second))
            .collect();
        let watch = Watch {
            acks: &acks,
            metrics,
            database: database_port(&database),
        };
        let (back, phase) = load_phase(
            options,
            agents,
            concurrency,
            &servers,
            &mut in_force,
            Some(watch),
        )
        .await;
        agents = back;
        print_phase(&phase);
        phases.push(phase);
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!("portal log: {} WARN/ERROR lines", warnings.len());
    for line in warnings.iter().take(5) {
        println!("    {line}");
    }
    drop(agents);
    drop(server);
    // The clients' replica is lost (killed, as a machine that dies): every client connects to
    // the replica left at once, `--connect-parallel` at a time, as a reconnection storm.
    if let Some((second, second_address)) = &second {
        let started = Instant::now();
        let reconnected = connect_clients(*second_address).await;
        let took = started.elapsed().as_secs_f64();
        println!(
            "storm: the clients' replica killed; {} clients connected again to the other in \
             {took:.1} s ({:.0}/s); its RSS {} KiB; each replica holds at most {} database \
             connections",
            reconnected.len(),
            reconnected.len() as f64 / took,
            second.rss_kib(),
            fz_portal::store::MAX_CONNECTIONS + 1
        );
    }
    if options.keep {
        println!("kept {}", base.keep().display());
    }
    TargetResult {
        name,
        idle: Idle {
            rss_started_kib,
            rss_gateways_kib,
            rss_clients_kib,
            per_client_kib,
            connect_secs,
        },
        phases,
    }
}

/// Where the portal listens and its key, from the line it prints when it is up:
/// "fz-portal listening on http://127.0.0.1:PORT (portal key KEY)".
fn portal_address(line: &str) -> (SocketAddr, PortalPublicKey) {
    let address: SocketAddr = line
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"));
    let pinned: PortalPublicKey = line
        .split("portal key ")
        .nth(1)
        .and_then(|rest| rest.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no key in `{line}`"));
    (address, pinned)
}

struct Secrets {
    clients: Vec<String>,
    gateways: Vec<String>,
}

/// Creates the account, the tokens and the memberships through the store. Every write is a
/// transaction with `synchronous = FULL`; for a data dir on disk they are made on tmpfs and
/// the file is copied, so the setup does not wait for thousands of disk syncs (PostgreSQL's
/// database is written where it is).
async fn populate(data: &Path, database: &Database, model: &Model, kind: StoreKind) -> Secrets {
    let staging = match kind {
        StoreKind::Shm | StoreKind::Postgres => None,
        StoreKind::Disk => Some(
            tempfile::Builder::new()
                .prefix("fz-load-staging-")
                .tempdir_in("/dev/shm")
                .expect("a staging directory"),
        ),
    };
    let dir = staging
        .as_ref()
        .map_or_else(|| data.to_owned(), |s| s.path().join("data"));
    let store = Store::open_in(&dir, database, &KeyFiles::default(), Creation::Allowed)
        .await
        .expect("the store opens");
    store.ensure_account(ACCOUNT).await.expect("an account");
    let now = chrono::Utc::now().timestamp();
    let expires = now + 2 * 86_400;
    let mut gateways = Vec::new();
    for site in 0..model.sites {
        let token = store
            .create_token(
                ACCOUNT,
                TokenKind::Gateway {
                    site: site_id(site),
                },
                &format!("gw-{site}"),
                expires,
                now,
            )
            .await
            .expect("a gateway token");
        gateways.push(token.secret);
    }
    let mut clients = Vec::new();
    for index in 0..model.clients {
        let user = &model.users[index / 2];
        let token = store
            .create_token(
                ACCOUNT,
                TokenKind::Client {
                    user: user.email.clone(),
                    provider: Some("okta".to_owned()),
                },
                &format!("laptop-{index}"),
                expires,
                now,
            )
            .await
            .expect("a client token");
        clients.push(token.secret);
    }
    for user in &model.users {
        store
            .set_memberships(ACCOUNT, &user.email, "okta", &user.okta_groups())
            .await
            .expect("memberships");
    }
    // Everything in the database file and the log emptied, so the log and its index need
    // not be copied: the last connection may still be closing, and deleting them, after
    // `close` returns.
    let folded = store.checkpoint().await.expect("a checkpoint");
    assert!(folded, "the staged store's log could not be emptied");
    store.close().await;
    if staging.is_some() {
        // The portal refuses a data directory open to group or others.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data)
            .expect("the data directory");
        let log_files = [
            format!("{DATABASE_FILE}-wal"),
            format!("{DATABASE_FILE}-shm"),
        ];
        for entry in std::fs::read_dir(&dir).expect("the staged store") {
            let entry = entry.expect("a staged file");
            if log_files
                .iter()
                .any(|log| entry.file_name() == log.as_str())
            {
                continue;
            }
            std::fs::copy(entry.path(), data.join(entry.file_name())).expect("a copy");
        }
    }
    Secrets { clients, gateways }
}

/// Sends one request and reports the sizes of what travels.
async fn probe_sizes(agents: &mut [Agent]) -> Option<String> {
    let Agent::Portal {
        client,
        wants,
        next,
    } = agents.first_mut()?
    else {
        return None;
    };
    let want = wants.get(*next % wants.len())?.clone();
    let request = encode(&ClientMessage::RequestAccess {
        resource: want.resource.clone(),
        dns: want.dns.clone(),
        avoid: vec![],
    });
    let answer = client.request(&want.resource, want.dns.clone()).await;
    let granted = encode(&answer);
    let to_gateway = match &answer {
        PortalToClient::Granted { grant, .. } => encode(&PortalToGateway::Grant {
            grant: grant.clone(),
        })
        .len(),
        _ => 0,
    };
    Some(format!(
        "message sizes: request_access {} B, granted {} B, grant to the gateway {} B",
        request.len(),
        granted.len(),
        to_gateway
    ))
}

// ---- the echo ----

async fn echo_target(options: &Options, model: &Model) -> TargetResult {
    let name = "echo".to_owned();
    println!("\n== {name}");
    let base = tempfile::Builder::new()
        .prefix("fz-load-echo-")
        .tempdir()
        .expect("a temporary directory");
    let log = base.path().join("echo.log");
    let exe = std::env::current_exe().expect("this binary's path");
    let mut command = server_command(options, &exe);
    command.arg(ECHO_SERVER);
    let (server, line) = Server::spawn(command, &log, "echo-server listening on ").await;
    let address: SocketAddr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"));
    println!("echo server pid {} on {address}", server.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_started_kib = server.rss_kib();
    // The message each client sends: as long as a typical `request_access` of the portal run.
    let message = {
        let want = model.wants(0).into_iter().next().expect("a resource");
        encode(&ClientMessage::RequestAccess {
            resource: want.resource,
            dns: want.dns,
            avoid: vec![],
        })
    };
    let hello = encode(&ClientMessage::Hello {
        public_key: client_key(0),
        endpoints: vec!["198.51.100.7:51820".parse().expect("an address")],
    });
    let started = Instant::now();
    let sockets = connect_all(options.clients, options.connect_parallel, |index| {
        let hello = hello.clone();
        async move {
            let mut socket = agent::open(address, ACCOUNT, "client", "echo")
                .await
                .unwrap_or_else(|e| panic!("echo client {index} cannot connect: {e:?}"));
            agent::send_text(&mut socket, hello.clone()).await;
            assert_eq!(agent::next_text(&mut socket).await, Some(hello));
            socket
        }
    })
    .await;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_clients_kib = server.rss_kib();
    let per_client_kib =
        rss_clients_kib.saturating_sub(rss_started_kib) as f64 / sockets.len() as f64;
    println!(
        "{} clients connected (hello echoed) in {connect_secs:.1} s ({:.0}/s); echo RSS {} KiB: \
         {per_client_kib:.1} KiB per idle client",
        sockets.len(),
        sockets.len() as f64 / connect_secs,
        rss_clients_kib
    );
    println!("message size: {} B each way", message.len());
    let mut agents: Vec<Agent> = sockets
        .into_iter()
        .map(|socket| Agent::Echo {
            socket: Box::new(socket),
            message: message.clone(),
        })
        .collect();
    let mut in_force = None;
    let mut phases = Vec::new();
    for &concurrency in &options.concurrency {
        let (back, phase) = load_phase(
            options,
            agents,
            concurrency,
            &[&server],
            &mut in_force,
            None,
        )
        .await;
        agents = back;
        print_phase(&phase);
        phases.push(phase);
    }
    drop(agents);
    drop(server);
    TargetResult {
        name,
        idle: Idle {
            rss_started_kib,
            rss_gateways_kib: rss_started_kib,
            rss_clients_kib,
            per_client_kib,
            connect_secs,
        },
        phases,
    }
}

/// This binary as the echo server: a trivial axum WebSocket endpoint that sends every text
/// message back, on the same runtime the portal uses.
fn echo_server() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback socket");
        println!(
            "echo-server listening on {}",
            listener.local_addr().expect("an address")
        );
        let app =
            axum::Router::new().route("/api/{account}/{agent}", axum::routing::get(echo_upgrade));
        axum::serve(listener, app).await.expect("the echo serves");
    });
    ExitCode::SUCCESS
}

async fn echo_upgrade(ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .on_upgrade(|mut socket| async move {
            while let Some(Ok(message)) = socket.recv().await {
                match message {
                    Message::Text(_) | Message::Binary(_) => {
                        if socket.send(message).await.is_err() {
                            break;
                        }
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
        })
}

// ---- the harness both targets share ----

/// One connection of the load generator.
enum Agent {
    Portal {
        client: Box<TestClient>,
        wants: Vec<Want>,
        next: usize,
    },
    Echo {
        socket: Box<Socket>,
        message: String,
    },
}

#[derive(Debug, Clone)]
struct Want {
    resource: String,
    dns: Option<DnsMapping>,
}

/// When each grant's gateway acknowledged it, by grant id.
type Acks = Arc<std::sync::Mutex<HashMap<String, Instant>>>;

enum Outcome {
    /// A grant (with its id) or the echo.
    Granted(Option<String>),
    Rejected(String),
    Failed(String),
}

impl Agent {
    /// One request and its answer: a grant (or the echo), a rejection or something else.
    async fn exchange(&mut self, verify: bool) -> Outcome {
        match self {
            Agent::Portal {
                client,
                wants,
                next,
            } => {
                let want = &wants[*next % wants.len()];
                *next += 1;
                match client.request(&want.resource, want.dns.clone()).await {
                    PortalToClient::Granted { grant, .. } => {
                        if verify && let Err(error) = client.verify(&grant) {
                            return Outcome::Failed(format!("bad grant: {error}"));
                        }
                        Outcome::Granted(Some(grant.grant.id))
                    }
                    PortalToClient::Rejected { resource, reason } => {
                        Outcome::Rejected(format!("{resource}: {reason}"))
                    }
                    other => Outcome::Failed(format!("{other:?}")),
                }
            }
            Agent::Echo { socket, message } => {
                agent::send_text(socket, message.clone()).await;
                match agent::next_text(socket).await {
                    Some(text) if text == *message => Outcome::Granted(None),
                    Some(text) => Outcome::Failed(format!("a different echo: {text}")),
                    None => Outcome::Failed("the echo server closed".to_owned()),
                }
            }
        }
    }
}

/// Opens `count` connections, `parallel` at a time, in index order.
async fn connect_all<T, F, Fut>(count: usize, parallel: usize, connect: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let gate = gate.clone();
        let connecting = connect(index);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("the gate stays open");
            connecting.await
        }));
    }
    let mut connected = Vec::with_capacity(tasks.len());
    for task in tasks {
        connected.push(task.await.expect("a connection"));
    }
    connected
}

#[derive(Default)]
struct Tally {
    /// Answers that completed inside the measured window.
    ok: u64,
    rejected: u64,
    failed: u64,
    latencies: Vec<Duration>,
    /// The same answers split where the gateway acknowledged: request to acknowledgement
    /// (decision, signing, push, the gateway's check) and acknowledgement to the client
    /// holding the grant (the store write, the answer).
    to_ack: Vec<Duration>,
    from_ack: Vec<Duration>,
    /// Every grant the phase got, warm-up included (they all stay in force).
    granted_total: u64,
    examples: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.failed += other.failed;
        self.latencies.extend(other.latencies);
        self.to_ack.extend(other.to_ack);
        self.from_ack.extend(other.from_ack);
        self.granted_total += other.granted_total;
        for example in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(example);
            }
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// The `p`th percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let Some(last) = sorted.len().checked_sub(1) else {
        return Duration::ZERO;
    };
    let index = ((sorted.len() as f64 * p / 100.0) as usize).min(last);
    sorted[index]
}

/// What a phase reads about portals beyond their processes.
#[derive(Clone, Copy)]
struct Watch<'a> {
    /// When each grant reached its gateway.
    acks: &'a Acks,
    /// The first portal's `/metrics`, for the store's commits.
    metrics: SocketAddr,
    /// The port of the PostgreSQL server the store is on, for its CPU; none on SQLite.
    database: Option<u16>,
}

/// Runs `concurrency` workers over all the agents for the warm-up and the measured window.
/// The CPU of `servers` is summed (the first one's threads are listed); with a `watch`, the
/// split at the gateways' acknowledgements, the store's commits and the database's CPU are
/// measured too.
async fn load_phase(
    options: &Options,
    agents: Vec<Agent>,
    concurrency: usize,
    servers: &[&Server],
    in_force: &mut Option<u64>,
    watch: Option<Watch<'_>>,
) -> (Vec<Agent>, Phase) {
    let acks = watch.map(|w| w.acks);
    let metrics = watch.map(|w| w.metrics);
    let database = watch.and_then(|w| w.database);
    let mut shares: Vec<Vec<Agent>> = (0..concurrency).map(|_| Vec::new()).collect();
    for (index, agent) in agents.into_iter().enumerate() {
        shares[index % concurrency].push(agent);
    }
    let start = tokio::time::Instant::now();
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    let verify = options.client_verify;
    let workers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            tokio::spawn(worker(
                share,
                measure_from.into_std(),
                end.into_std(),
                verify,
                acks.cloned(),
            ))
        })
        .collect();
    tokio::time::sleep_until(measure_from).await;
    let commits_before = match metrics {
        Some(address) => Commits::read(address).await,
        None => None,
    };
    let server_before = servers[0].cpu();
    let others_before: u64 = servers[1..].iter().map(|s| s.cpu().total).sum();
    let generator_before = process_cpu("self");
    let database_before = database.map(database_cpu);
    let wall_before = Instant::now();
    tokio::time::sleep_until(end).await;
    let seconds = wall_before.elapsed().as_secs_f64();
    let server_after = servers[0].cpu();
    let others_after: u64 = servers[1..].iter().map(|s| s.cpu().total).sum();
    let generator_after = process_cpu("self");
    let database_after = database.map(database_cpu);
    let commits = match (metrics, commits_before) {
        (Some(address), Some(before)) => Commits::read(address).await.map(|c| c.since(before)),
        _ => None,
    };
    let mut agents = Vec::new();
    let mut tally = Tally::default();
    for worker in workers {
        let (share, part) = worker.await.expect("a worker");
        agents.extend(share);
        tally.merge(part);
    }
    tally.latencies.sort_unstable();
    tally.to_ack.sort_unstable();
    tally.from_ack.sort_unstable();
    let ticks = clock_ticks();
    let share = |before: u64, after: u64| after.saturating_sub(before) as f64 / ticks / seconds;
    let threads = thread_shares(&server_before, &server_after, share);
    let in_force_after = in_force.as_mut().map(|n| {
        *n += tally.granted_total;
        *n
    });
    let phase = Phase {
        concurrency,
        tally,
        seconds: options.duration.as_secs_f64(),
        server_cpu: share(
            server_before.total + others_before,
            server_after.total + others_after,
        ),
        generator_cpu: share(generator_before, generator_after),
        database_cpu: database_before
            .zip(database_after)
            .map(|(before, after)| share(before, after)),
        threads,
        rss_after_kib: servers[0].rss_kib(),
        in_force_after,
        commits,
    };
    (agents, phase)
}

async fn worker(
    mut agents: Vec<Agent>,
    measure_from: Instant,
    end: Instant,
    verify: bool,
    acks: Option<Acks>,
) -> (Vec<Agent>, Tally) {
    let mut tally = Tally::default();
    let mut turn = 0;
    while Instant::now() < end {
        let count = agents.len();
        let agent = &mut agents[turn % count];
        turn += 1;
        let sent = Instant::now();
        let outcome = agent.exchange(verify).await;
        let done = Instant::now();
        let acked = match (&outcome, &acks) {
            (Outcome::Granted(Some(id)), Some(acks)) => {
                tally.granted_total += 1;
                acks.lock().expect("the ack map").remove(id)
            }
            (Outcome::Granted(_), _) => {
                tally.granted_total += 1;
                None
            }
            _ => None,
        };
        if done < measure_from || done > end {
            continue;
        }
        match outcome {
            Outcome::Granted(_) => {
                tally.ok += 1;
                tally.latencies.push(done - sent);
                if let Some(acked) = acked.filter(|a| *a >= sent && *a <= done) {
                    tally.to_ack.push(acked - sent);
                    tally.from_ack.push(done - acked);
                }
            }
            Outcome::Rejected(reason) => {
                tally.rejected += 1;
                if tally.examples.len() < 5 {
                    tally.examples.push(format!("rejected {reason}"));
                }
            }
            Outcome::Failed(reason) => {
                tally.failed += 1;
                if tally.examples.len() < 5 {
                    tally.examples.push(format!("failed: {reason}"));
                }
            }
        }
    }
    (agents, tally)
}

fn print_phase(phase: &Phase) {
    let t = &phase.tally;
    println!(
        "concurrency {:>5}: {:>8.0}/s  p50 {:>8}  p99 {:>8}  max {:>8}  ({} ok, {} rejected, {} failed \
         in {:.0} s)",
        phase.concurrency,
        phase.rate(),
        ms(t.percentile(50.0)),
        ms(t.percentile(99.0)),
        ms(t.latencies.last().copied().unwrap_or_default()),
        t.ok,
        t.rejected,
        t.failed,
        phase.seconds
    );
    let mut threads = String::new();
    for (name, cpu) in phase.threads.iter().take(6) {
        write!(threads, "{name} {:.0}%, ", cpu * 100.0).ok();
    }
    let in_force = match phase.in_force_after {
        Some(n) => format!("; grants in force {n}"),
        None => String::new(),
    };
    println!(
        "    CPU: server {:.0}% ({}), generator {:.0}% (100% = one core); server RSS {} KiB{in_force}",
        phase.server_cpu * 100.0,
        threads.trim_end_matches(", "),
        phase.generator_cpu * 100.0,
        phase.rss_after_kib,
    );
    if phase.tally.ok > 0 {
        let per_answer = |cpu: f64| cpu * phase.seconds * 1e6 / phase.tally.ok as f64;
        println!(
            "    server CPU per answer: {:.1} µs",
            per_answer(phase.server_cpu)
        );
        if let Some(database) = phase.database_cpu {
            println!(
                "    database CPU: {:.0}% of a core, {:.1} µs per answer (with the server's, {:.1} µs)",
                database * 100.0,
                per_answer(database),
                per_answer(database + phase.server_cpu)
            );
        }
    }
    if let Some(commits) = phase.commits.filter(|c| c.count > 0) {
        println!(
            "    store: {:.0} commits/s of {:.0} answers each on average, {:.1} ms each on \
             average (busy {:.0}% of the window)",
            commits.count as f64 / phase.seconds,
            phase.tally.ok as f64 / commits.count as f64,
            commits.seconds * 1e3 / commits.count as f64,
            commits.seconds * 100.0 / phase.seconds,
        );
    }
    if !t.to_ack.is_empty() {
        println!(
            "    split at the gateway's ack ({} answers): request -> ack p50 {} p99 {}; \
             ack -> client holds grant p50 {} p99 {}",
            t.to_ack.len(),
            ms(percentile(&t.to_ack, 50.0)),
            ms(percentile(&t.to_ack, 99.0)),
            ms(percentile(&t.from_ack, 50.0)),
            ms(percentile(&t.from_ack, 99.0)),
        );
    }
    for example in &t.examples {
        println!("    {example}");
    }
}

fn print_summary(options: &Options, results: &[TargetResult]) {
    println!("\n== summary ({})", machine());
    println!(
        "{} clients, {} gateways; {}",
        options.clients,
        options.sites,
        if options.pin {
            "server pinned to CPU 0, generator to CPU 1"
        } else {
            "server and generator share both cores"
        }
    );
    println!(
        "{:<14} {:>11} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "target", "concurrency", "rate/s", "p50 ms", "p99 ms", "KiB/idle", "errors"
    );
    let echo = results.iter().find(|r| r.name == "echo");
    for result in results {
        for phase in &result.phases {
            println!(
                "{:<14} {:>11} {:>10.0} {:>10} {:>10} {:>12.1} {:>14}",
                result.name,
                phase.concurrency,
                phase.rate(),
                ms(phase.tally.percentile(50.0)),
                ms(phase.tally.percentile(99.0)),
                result.idle.per_client_kib,
                phase.tally.rejected + phase.tally.failed
            );
        }
    }
    if let Some(echo) = echo {
        println!("\nportal / echo, same concurrency:");
        println!(
            "{:<14} {:>11} {:>10} {:>10} {:>10} {:>12}",
            "target", "concurrency", "rate", "p50", "p99", "KiB/idle"
        );
        for result in results.iter().filter(|r| r.name != "echo") {
            for phase in &result.phases {
                let Some(base) = echo
                    .phases
                    .iter()
                    .find(|p| p.concurrency == phase.concurrency)
                else {
                    continue;
                };
                let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
                println!(
                    "{:<14} {:>11} {:>9.2}x {:>9.2}x {:>9.2}x {:>11.2}x",
                    result.name,
                    phase.concurrency,
                    ratio(phase.rate(), base.rate()),
                    ratio(
                        phase.tally.percentile(50.0).as_secs_f64(),
                        base.tally.percentile(50.0).as_secs_f64()
                    ),
                    ratio(
                        phase.tally.percentile(99.0).as_secs_f64(),
                        base.tally.percentile(99.0).as_secs_f64()
                    ),
                    ratio(result.idle.per_client_kib, echo.idle.per_client_kib)
                );
            }
        }
    }
    println!("\nidle connections:");
    for result in results {
        println!(
            "{:<14} RSS started {} KiB, with gateways {} KiB, with clients {} KiB: {:.1} KiB per \
             idle client; connected in {:.1} s",
            result.name,
            result.idle.rss_started_kib,
            result.idle.rss_gateways_kib,
            result.idle.rss_clients_kib,
            result.idle.per_client_kib,
            result.idle.connect_secs
        );
    }
    println!(
        "\ngoals (portal): rate >= 10,000 grants/s and >= 0.5x echo, p99 < 25 ms, < 64 KiB per idle connection"
    );
    for result in results.iter().filter(|r| r.name != "echo") {
        let best = result
            .phases
            .iter()
            .filter(|p| p.tally.percentile(99.0) < Duration::from_millis(25))
            .max_by(|a, b| a.rate().total_cmp(&b.rate()));
        let peak = result
            .phases
            .iter()
            .max_by(|a, b| a.rate().total_cmp(&b.rate()));
        if let Some(peak) = peak {
            let versus = echo
                .and_then(|e| e.phases.iter().find(|p| p.concurrency == peak.concurrency))
                .map_or(String::new(), |e| {
                    format!(" = {:.2}x echo at that concurrency", peak.rate() / e.rate())
                });
            println!(
                "{}: peak {:.0}/s at concurrency {} (p99 {} ms){versus}",
                result.name,
                peak.rate(),
                peak.concurrency,
                ms(peak.tally.percentile(99.0))
            );
        }
        match best {
            Some(best) => println!(
                "{}: best with p99 < 25 ms: {:.0}/s at concurrency {} (p99 {} ms)",
                result.name,
                best.rate(),
                best.concurrency,
                ms(best.tally.percentile(99.0))
            ),
            None => println!("{}: no phase had p99 < 25 ms", result.name),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

// ---- the server processes ----

fn server_command(options: &Options, program: impl AsRef<std::ffi::OsStr>) -> Command {
    if options.pin {
        let mut command = Command::new("taskset");
        command.args(["-c", SERVER_CPU]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A server child process, killed when dropped.
struct Server {
    child: Child,
}

struct CpuSample {
    total: u64,
    threads: BTreeMap<String, u64>,
}

impl Server {
    /// Starts the command (stdout piped, stderr to `log`) and waits for the line that starts
    /// with `ready`.
    async fn spawn(mut command: Command, log: &Path, ready: &str) -> (Server, String) {
        let log_file = std::fs::File::create(log).expect("a log file");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("the server starts");
        let stdout = child.stdout.take().expect("its stdout");
        let (line_tx, line_rx) = tokio::sync::oneshot::channel();
        let ready = ready.to_owned();
        // Reads every line (so the pipe never fills) and hands on the first one that says
        // where it listens.
        std::thread::spawn(move || {
            let mut line_tx = Some(line_tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with(&ready)
                    && let Some(tx) = line_tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        let server = Server { child };
        let line = match tokio::time::timeout(Duration::from_secs(60), line_rx).await {
            Ok(Ok(line)) => line,
            _ => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("the server did not start; its log:\n{text}");
            }
        };
        (server, line)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU ticks of the process and of its threads, by thread name.
    fn cpu(&self) -> CpuSample {
        cpu_sample(&self.pid().to_string())
    }
}

/// Each thread group's share of a core between two samples of one process (`share` turns
/// ticks before and after into it), busiest first; those under half a percent left out.
fn thread_shares(
    before: &CpuSample,
    after: &CpuSample,
    share: impl Fn(u64, u64) -> f64,
) -> Vec<(String, f64)> {
    let mut threads: Vec<(String, f64)> = after
        .threads
        .iter()
        .map(|(name, ticks)| {
            let earlier = before.threads.get(name).copied().unwrap_or(0);
            (name.clone(), share(earlier, *ticks))
        })
        .filter(|(_, cpu)| *cpu >= 0.005)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    threads
}

/// CPU ticks of a process (`self` or a pid) and of its threads, by thread name.
fn cpu_sample(pid: &str) -> CpuSample {
    let mut threads = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            let ticks = stat_ticks(&std::fs::read_to_string(path.join("stat")).unwrap_or_default());
            *threads.entry(thread_group(&name)).or_insert(0) += ticks;
        }
    }
    CpuSample {
        total: process_cpu(pid),
        threads,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Threads named `name-3` count as `name`.
fn thread_group(name: &str) -> String {
    name.trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches('-')
        .to_owned()
}

/// The port of the PostgreSQL server `database` is on; none for SQLite.
fn database_port(database: &Database) -> Option<u16> {
    match database {
        Database::Sqlite => None,
        Database::Postgres(url) => url::Url::parse(url).ok()?.port(),
    }
}

/// CPU ticks of the PostgreSQL server listening on `port`: its postmaster (the `postgres`
/// process started with `-p port`) and the processes it forked (backends and workers) that
/// are running now. A backend that ended takes its ticks with it, so a phase reads the
/// connections that stay open through it: the portal's pools.
fn database_cpu(port: u16) -> u64 {
    let port = port.to_string();
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default();
    let is_postmaster = |pid: &String| {
        let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = line.split(|&b| b == 0).collect();
        args.first()
            .is_some_and(|program| program.ends_with(b"/postgres"))
            && args
                .windows(2)
                .any(|pair| pair[0] == b"-p" && pair[1] == port.as_bytes())
    };
    let Some(postmaster) = pids.iter().find(|pid| is_postmaster(pid)) else {
        return 0;
    };
    let parent = postmaster.parse().ok();
    let forked: u64 = pids
        .iter()
        .map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
        .filter(|stat| stat_field(stat, 4) == parent)
        .map(|stat| stat_ticks(&stat))
        .sum();
    process_cpu(postmaster) + forked
}

/// utime + stime of a process, in clock ticks.
fn process_cpu(pid: &str) -> u64 {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// utime + stime from a `/proc/.../stat` line (fields 14 and 15).
fn stat_ticks(stat: &str) -> u64 {
    stat_field(stat, 14).unwrap_or(0) + stat_field(stat, 15).unwrap_or(0)
}

/// Numeric field `n` of a `/proc/.../stat` line, numbered from 1 as proc(5) does; from 3 on,
/// since the name in parentheses (field 2) may hold spaces.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    // Every CPU the machine has, not just those this process may run on (`--pin`).
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    format!("{cpus} CPUs, {model}")
}

// ---- keys ----

/// A distinct WireGuard key per client: the portal refuses a key another client holds.
fn client_key(index: usize) -> PublicKey {
    let mut bytes = [0x11; 32];
    bytes[..8].copy_from_slice(&(index as u64).to_le_bytes());
    PublicKey(bytes)
}

fn gateway_key(site: usize) -> PublicKey {
    let mut bytes = [0x22; 32];
    bytes[..8].copy_from_slice(&(site as u64).to_le_bytes());
    PublicKey(bytes)
}

// ---- the policy ----

/// The generated account: sites, users and their groups. Each site has five resources (an
/// exact DNS name, a DNS wildcard, an IPv4 CIDR, an IPv4 host, an IPv6 CIDR) and six rules:
/// two teams reach the whole site; everyone signed in with okta reaches its app; SRE reach
/// its hosts and database from loopback sources; a team may reach its database only from
/// Germany or France (never holds here: no GeoIP database); contractors reach its web apps
/// only from verified devices (never holds: no device is verified); and contractors never
/// reach its database (a guardrail). A static group of admins reaches every site.
struct Model {
    clients: usize,
    sites: usize,
    users: Vec<UserSpec>,
}

struct UserSpec {
    email: String,
    teams: Vec<usize>,
    sre: bool,
    contractor: bool,
    admin: bool,
}

impl UserSpec {
    fn okta_groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.teams.iter().map(|t| team_id(*t)).collect();
        if self.sre {
            groups.push("sre".to_owned());
        }
        if self.contractor {
            groups.push("contractors".to_owned());
        }
        groups
    }
}

fn site_id(site: usize) -> String {
    format!("site-{site:03}")
}

fn team_id(team: usize) -> String {
    format!("team-{team:02}")
}

impl Model {
    fn new(clients: usize, sites: usize) -> Model {
        let mut rng = 0x5eed_u64;
        let mut draw = move |n: usize| {
            // splitmix64
            rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        };
        let users = (0..clients.div_ceil(2))
            .map(|u| {
                let count = 1 + draw(3);
                let mut teams = Vec::new();
                while teams.len() < count {
                    let team = draw(TEAMS);
                    if !teams.contains(&team) {
                        teams.push(team);
                    }
                }
                teams.sort_unstable();
                let role = draw(20);
                UserSpec {
                    email: format!("user-{u:05}@corp.example"),
                    teams,
                    sre: role == 0,
                    contractor: role == 1,
                    admin: u < ADMINS,
                }
            })
            .collect();
        Model {
            clients,
            sites,
            users,
        }
    }

    /// The two teams that reach the whole of `site`.
    fn owners(site: usize) -> (usize, usize) {
        let a = site % TEAMS;
        let b = (site * 7 + 3) % TEAMS;
        (a, if a == b { (a + 1) % TEAMS } else { b })
    }

    /// What the client at `index` may ask for (its user's allowed resources), with the DNS
    /// mapping a DNS resource needs.
    fn wants(&self, index: usize) -> Vec<Want> {
        let user = &self.users[index / 2];
        let mut wants = Vec::new();
        let mapped = vec![
            "100.96.0.1".parse().expect("an address"),
            "fd00:2021:1111:8000::1".parse().expect("an address"),
        ];
        let dns = |name: String| {
            Some(DnsMapping {
                name,
                mapped: mapped.clone(),
            })
        };
        for site in 0..self.sites {
            let s = format!("{site:03}");
            let (a, b) = Model::owners(site);
            let whole = user.admin || user.teams.contains(&a) || user.teams.contains(&b);
            wants.push(Want {
                resource: format!("app-{s}"),
                dns: dns(format!("app.site-{s}.corp.example")),
            });
            if whole {
                wants.push(Want {
                    resource: format!("web-{s}"),
                    dns: dns(format!("portal.web.site-{s}.corp.example")),
                });
                wants.push(Want {
                    resource: format!("metrics-{s}"),
                    dns: None,
                });
            }
            if whole || user.sre {
                wants.push(Want {
                    resource: format!("ssh-{s}"),
                    dns: None,
                });
                if !user.contractor {
                    wants.push(Want {
                        resource: format!("db-{s}"),
                        dns: None,
                    });
                }
            }
        }
        wants
    }

    /// Writes the tree and says what is in it.
    fn write_tree(&self, dir: &Path) -> String {
        let write = |path: PathBuf, text: &str| {
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("a directory");
            std::fs::write(&path, text).expect("a policy file");
        };
        let mut sites = String::new();
        for site in 0..self.sites {
            writeln!(sites, "site {} \"Generated site {site}\"", site_id(site)).ok();
        }
        write(dir.join("sites.fz"), &sites);
        let mut groups = String::new();
        for team in 0..TEAMS {
            let id = team_id(team);
            writeln!(groups, "group {id} {{ idp okta \"{id}\" }}").ok();
        }
        groups.push_str("group sre { description \"On call\"; idp okta \"sre\" }\n");
        groups.push_str("group contractors { idp okta \"contractors\" }\n");
        let admins: Vec<String> = self
            .users
            .iter()
            .filter(|u| u.admin)
            .map(|u| format!("\"{}\"", u.email))
            .collect();
        writeln!(groups, "group admins {{ members {} }}", admins.join(", ")).ok();
        write(dir.join("groups.fz"), &groups);
        let mut rules = 0;
        for site in 0..self.sites {
            let s = format!("{site:03}");
            let (hi, lo) = (site / 256, site % 256);
            let (a, b) = Model::owners(site);
            let eu = (site + 5) % TEAMS;
            let text = format!(
                "resource app-{s} {{ address \"app.site-{s}.corp.example\"; site site-{s}; ports tcp/443 }}\n\
                 resource web-{s} {{ address \"**.web.site-{s}.corp.example\"; site site-{s}; ports tcp/443, tcp/8000-8100 }}\n\
                 resource db-{s} {{ address \"10.{}.{lo}.0/24\"; site site-{s}; ports tcp/5432 }}\n\
                 resource ssh-{s} {{ address \"172.{}.{lo}.10\"; site site-{s}; ports tcp/22 }}\n\
                 resource metrics-{s} {{ address \"fd00:0:{site:x}::/64\"; site site-{s}; ports tcp/9090-9100 }}\n\
                 \n\
                 allow {}, {}, admins -> site site-{s} as site-{s}-teams\n\
                 allow everyone -> app-{s} when provider okta as app-{s}-okta\n\
                 allow sre -> ssh-{s}, db-{s} when source in 127.0.0.0/8 as sre-{s}\n\
                 allow {} -> db-{s} when country in DE, FR as db-{s}-eu\n\
                 allow contractors -> web-{s} when client verified as contractors-web-{s}\n\
                 deny contractors -> db-{s} as no-contractors-db-{s}\n",
                100 + hi,
                16 + hi,
                team_id(a),
                team_id(b),
                team_id(eu),
            );
            rules += 6;
            write(dir.join("sites").join(format!("site-{s}.fz")), &text);
        }
        format!(
            "{} sites, {} resources, {} groups, {} rules ({} files) in {}",
            self.sites,
            self.sites * 5,
            TEAMS + 3,
            rules,
            self.sites + 2,
            dir.display()
        )
    }
}
