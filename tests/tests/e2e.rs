//! The end-to-end scenarios: the whole system in network namespaces (`fz_e2e::world`), each
//! scenario a check of one behaviour as a user meets it. They run in order in one world, each
//! setting the rules it needs first; a failed scenario is reported with the processes' last
//! log lines and the rest still run. At the end the report goes to `target/e2e-report.json`
//! and a summary to standard error, and the run fails if any scenario failed.
//!
//! `cargo test -p fz-e2e -- NAME…` runs only the scenarios whose names contain a NAME.
//! Without root, or without `dnsmasq`, `curl` or `dig`, the run skips loudly and leaves the
//! marker `.ci/run` fails on (`.ci/run` installs the packages first).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::StaticSecret;
use fz_e2e::nat::inbound_refused;
use fz_e2e::relay::{allocate, credentials, unix_now};
use fz_e2e::replicas::{REPLICAS, Replicas};
use fz_e2e::report::{Report, Scenario, Status};
use fz_e2e::world::{
    ACCOUNT, BUILD, CLIENT_WAN, CONTRACTOR, DB, EDGES, EdgeGateway, GATEWAYS, IDP_PROVIDER,
    IDP_USER, LAB_WEB, Nat, Outage, RELAY, SSH, UPSTREAM_DNS, USER, WEB, World,
};
use fz_host::testing::WAIT;
use fz_host::testing::net::{
    REFUSAL, a_answers, a_query, cannot_connect, connect_from, greeting, try_greeting,
};
use fz_host::testing::packet::{self, RST, Segment};
use fz_proto::{DnsMapping, PortalToClient, SignedGrant};

/// The run's name for its skip marker.
const RUN: &str = "fz-e2e";
/// A failover must be done within this, or the scenario fails (the goal, 10 s, is reported).
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

type Check = fn(&mut World, &mut Report) -> String;

/// In the order they run: later ones stop and start processes.
const SCENARIOS: &[(&str, Check)] = &[
    ("default deny", default_deny),
    ("allow", allow),
    ("same real address", same_real_address),
    ("cidr resource with a filter", cidr_with_filter),
    ("pass-through", pass_through),
    ("invisible gateway", invisible_gateway),
    ("tunnel throughput", tunnel_throughput),
    ("policy change", policy_change),
    ("internet grant", internet_grant),
    ("full tunnel", full_tunnel),
    ("broad grant", broad_grant),
    ("wildcard grant", wildcard_grant),
    ("site cannot open a connection", site_cannot_open),
    ("copied token", copied_token),
    ("relay credentials", relay_credentials),
    ("nat matrix", nat_matrix),
    ("relay restart", relay_restart),
    ("roaming client", roaming_client),
    ("relay first", relay_first),
    ("identity provider groups", identity_provider_groups),
    ("load balancing", load_balancing),
    ("time window", time_window),
    ("portal down", portal_down),
    ("failover", failover),
    ("hung gateway", hung_gateway),
    ("restarted gateway", restarted_gateway),
    ("portal replicas", portal_replicas),
];

fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let chosen: Vec<&(&str, Check)> = SCENARIOS
        .iter()
        .filter(|(name, _)| {
            filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        eprintln!("fz-e2e: no scenario matches {filters:?}");
        return ExitCode::SUCCESS;
    }
    if !fz_host::testing::may_run_as_root(RUN) {
        return ExitCode::SUCCESS;
    }
    if let Some(missing) = fz_e2e::world::missing_tool() {
        fz_host::testing::skip(RUN, &format!("`{missing}` is not installed"));
        return ExitCode::SUCCESS;
    }

    let started = Instant::now();
    let mut world = match World::new() {
        Ok(world) => world,
        Err(why) => {
            fz_host::testing::skip(RUN, &why);
            return ExitCode::SUCCESS;
        }
    };
    eprintln!(
        "fz-e2e: the world is up in {:.1} s",
        World::seconds(started)
    );
    // A failing check says where and what in one line; the harness adds the logs.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("fz-e2e: check failed at {location}");
    }));
    let mut report = Report::default();
    for (name, check) in chosen {
        let began = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(&mut world, &mut report)));
        let (status, detail) = match outcome {
            Ok(detail) => (Status::Pass, detail),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                let kept = fz_host::testing::target_dir()
                    .join("e2e-logs")
                    .join(name.replace(' ', "-"));
                let kept = match world.keep_logs(&kept) {
                    Ok(()) => format!("every log is in {}", kept.display()),
                    Err(error) => format!("the logs could not be kept: {error}"),
                };
                eprintln!("fz-e2e: {name} FAILED: {message}\n{}{kept}", world.logs(40));
                (Status::Fail, message)
            }
        };
        eprintln!(
            "fz-e2e: {name}: {status:?} in {:.1} s: {detail}",
            World::seconds(began)
        );
        report.scenarios.push(Scenario {
            name: (*name).to_owned(),
            status,
            detail,
        });
    }
    drop(world);

    let path = fz_host::testing::target_dir().join("e2e-report.json");
    if let Err(error) = report.write(&path) {
        eprintln!("fz-e2e: cannot write {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!("{}report: {}", report.summary(), path.display());
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---- the scenarios ----

/// 1. No rule for the user: the name gets no address and curl fails; no gateway saw a
///    handshake; the portal recorded the denial with its reason.
fn default_deny(world: &mut World, _: &mut Report) -> String {
    world.set_rules("");
    let failed = world.curl("gitlab.company.com", "/", &[]);
    assert!(failed.is_err(), "curl got through: {failed:?}");
    for (index, spec) in GATEWAYS.iter().enumerate() {
        let metrics = world.metrics(index);
        assert_eq!(
            metrics.value("fz_gateway_handshakes_total"),
            0,
            "{} saw a handshake",
            spec.name
        );
    }
    let flow = world.wait_for("the denial in the flow log", WAIT, |world| {
        world
            .flows()
            .into_iter()
            .find(|flow| flow["resource_id"] == "gitlab" && flow["decision"] == "deny")
    });
    let reason = flow["reason"].as_str().unwrap_or_default().to_owned();
    assert!(!reason.is_empty(), "a denial without a reason: {flow}");
    format!(
        "curl failed: {}; the portal recorded: {reason}",
        failed.unwrap_err().trim()
    )
}

/// 2. A rule is added: the portal reloads the tree, the name resolves to mapped addresses and
///    curl gets the page through the tunnel. The connection setup figure comes from `docs`,
///    a name nobody asked before: curl's time to the first byte, DNS and handshake included.
fn allow(world: &mut World, report: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs as web");
    let docs = world
        .curl("docs.company.com", "/", &[])
        .unwrap_or_else(|error| panic!("no page from docs: {error}"));
    assert!(
        docs.body.starts_with("docs page from 172.16.0."),
        "{docs:?}"
    );
    let setup_ms = docs.first_byte.as_secs_f64() * 1000.0;
    report.figures.connection_setup_ms = Some(setup_ms);

    // gitlab was refused a moment ago; the client remembers a denial for a few seconds.
    let mapped = world.wait_for("gitlab's mapped addresses", WAIT, |world| {
        let answer = world.dig(&["gitlab.company.com", "A"]);
        (!answer.is_empty()).then_some(answer)
    });
    assert_eq!(mapped.len(), 4, "{mapped:?}");
    for address in &mapped {
        let address: Ipv4Addr = address.parse().unwrap();
        assert!(is_mapped(address), "{address} is outside 100.96.0.0/11");
    }
    let page = world
        .curl("gitlab.company.com", "/", &[])
        .unwrap_or_else(|error| panic!("no page from gitlab: {error}"));
    assert!(
        page.body.starts_with("gitlab page from 172.16.0."),
        "{page:?}"
    );
    format!(
        "gitlab -> {}; \"{}\"; setup {setup_ms:.0} ms (docs, first query to first byte)",
        mapped.join(" "),
        page.body
    )
}

/// 3. gitlab and jenkins share 172.16.0.5; only gitlab is allowed. jenkins gets no address
///    (the client answers a name policy refuses with an empty answer), no grant reaches a
///    gateway, and gitlab's mapped addresses name gitlab alone.
fn same_real_address(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs as web");
    let gitlab = world.dig(&["gitlab.company.com", "A"]);
    assert_eq!(gitlab.len(), 4, "{gitlab:?}");
    let jenkins = world.dig(&["jenkins.company.com", "A"]);
    assert!(jenkins.is_empty(), "jenkins got addresses: {jenkins:?}");
    let failed = world.curl("jenkins.company.com", "/", &[]);
    assert!(failed.is_err(), "jenkins answered: {failed:?}");
    world.wait_for("jenkins's denial in the flow log", WAIT, |world| {
        world
            .flows()
            .into_iter()
            .find(|flow| flow["resource_id"] == "jenkins" && flow["decision"] == "deny")
    });
    // The client handed jenkins mapped addresses of its own when it asked (the portal said
    // no, so the application got none of them); gitlab's name gitlab alone.
    let mut jenkins_mapped = Vec::new();
    for last in 1..=24u8 {
        let address = format!("100.96.0.{last}");
        let named = world.dig(&["-x", &address]);
        match named.as_slice() {
            [name] if name == "gitlab.company.com." => assert!(gitlab.contains(&address)),
            [name] if name == "jenkins.company.com." => jenkins_mapped.push(address),
            _ => assert!(!gitlab.contains(&address), "{address} names {named:?}"),
        }
    }
    assert_eq!(
        jenkins_mapped.len(),
        4,
        "jenkins's own mapped addresses: {jenkins_mapped:?}"
    );
    // The gateways hold the two web grants and nothing for jenkins.
    let grants: u64 = (0..2)
        .map(|index| world.metrics(index).value("fz_gateway_grants"))
        .sum();
    assert_eq!(grants, 2, "grants at hq besides gitlab's and docs's");
    format!(
        "jenkins: mapped {} but answered empty, denied; {} name gitlab only",
        jenkins_mapped.join(" "),
        gitlab.join(" ")
    )
}

/// 4. `db` is 10.0.5.0/24 with tcp/5432: 5432 answers through a gateway, 22 is dropped there
///    and counted.
fn cidr_with_filter(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let greeting = world.greeting(DB);
    let serving = serving_gateway(world, &greeting);
    let before = world.metrics(serving).dropped("port_not_granted");
    world.cannot_connect(SSH);
    world.wait_metrics(serving, "the SYN to port 22 dropped", |m| {
        m.dropped("port_not_granted") > before
    });
    format!(
        "{greeting:?} on 5432; 22 dropped at {}",
        GATEWAYS[serving].name
    )
}

/// 5. A name that is no resource goes to the client's own resolver and comes back as that
///    resolver gives it, found or not.
fn pass_through(world: &mut World, _: &mut Report) -> String {
    let upstream = format!("@{UPSTREAM_DNS}");
    for name in ["www.example.org", "nothing.example.org"] {
        let through = world
            .client_ns
            .exec("dig", &["+time=5", "+tries=1", name, "A"])
            .unwrap();
        let direct = world
            .client_ns
            .exec("dig", &[&upstream, "+time=5", "+tries=1", name, "A"])
            .unwrap();
        assert_eq!(
            sections(&through),
            sections(&direct),
            "{name} through the client differs from the upstream's answer:\n{through}\n{direct}"
        );
    }
    let answer = world.dig(&["www.example.org", "A"]);
    assert_eq!(answer, ["192.0.2.80"]);
    "www.example.org and an unknown name: the same answers through the client as directly"
        .to_owned()
}

/// 10. A key no grant names gets no answer from any gateway: not to a well-formed handshake,
///     not to junk. The gateways count each as dropped.
fn invisible_gateway(world: &mut World, _: &mut Report) -> String {
    let socket = world
        .client_ns
        .run(|| UdpSocket::bind((CLIENT_WAN, 0)))
        .unwrap();
    let stranger = StaticSecret::from([7u8; 32]);
    for (index, spec) in GATEWAYS.iter().enumerate() {
        let before = world.metrics(index);
        let mut tunnel = Tunn::new(
            stranger.clone(),
            world.gateway_public_key(index),
            None,
            None,
            1,
            None,
        );
        let mut buffer = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(initiation) =
            tunnel.format_handshake_initiation(&mut buffer, false)
        else {
            panic!("boringtun made no handshake initiation");
        };
        socket.send_to(initiation, spec.endpoint()).unwrap();
        socket.send_to(b"hello?", spec.endpoint()).unwrap();
        world.wait_metrics(index, "both datagrams dropped", |m| {
            m.dropped("unknown_key") > before.dropped("unknown_key")
                && m.dropped("not_wireguard") > before.dropped("not_wireguard")
        });
    }
    // Each gateway handled both (its counters say so) and would have answered in the same
    // step: any answer is here by now.
    socket.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 2048];
    match socket.recv_from(&mut buffer) {
        Err(error) if error.kind() == ErrorKind::WouldBlock => {}
        Ok((length, from)) => panic!("{from} answered {length} bytes"),
        Err(error) => panic!("an error came back (an ICMP answer?): {error}"),
    }
    "a stranger's handshake and junk, to all three gateways: no answer, both counted".to_owned()
}

/// One TCP stream through the tunnel against the same transfer without fz: the client is
/// routed to 172.16.0.5 through gw-a's namespace as a plain router for the comparison, then
/// the route goes again.
fn tunnel_throughput(world: &mut World, report: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let through = world
        .curl("gitlab.company.com", "/big", &["-o", "/dev/null"])
        .unwrap_or_else(|error| panic!("no transfer through the tunnel: {error}"));
    let web = WEB.to_string();
    let gw_a = GATEWAYS[0];
    world
        .client_ns
        .ip(&[
            "route",
            "add",
            &format!("{web}/32"),
            "via",
            &gw_a.wan.to_string(),
        ])
        .unwrap();
    world
        .hq_ns
        .ip(&[
            "route",
            "add",
            "198.18.0.0/24",
            "via",
            gw_a.lan_address("172.16."),
        ])
        .unwrap();
    let resolve = format!("gitlab.company.com:443:{web}");
    let direct = world.curl(
        "gitlab.company.com",
        "/big",
        &["-o", "/dev/null", "--resolve", &resolve],
    );
    world
        .client_ns
        .ip(&["route", "del", &format!("{web}/32")])
        .unwrap();
    world.hq_ns.ip(&["route", "del", "198.18.0.0/24"]).unwrap();
    let direct = direct.unwrap_or_else(|error| panic!("no direct transfer: {error}"));
    let ratio = through.speed / direct.speed;
    report.figures.tunnel_throughput_ratio = Some(ratio);
    format!(
        "tunnel {:.0} Mbit/s, direct {:.0} Mbit/s: {ratio:.2}x",
        through.speed * 8.0 / 1e6,
        direct.speed * 8.0 / 1e6
    )
}

/// 9. The rule for db goes: the gateway drops the grant within seconds, the client hears it
///    and refuses the next connection at once. Then db is allowed again but a deny guardrail
///    is added: the guardrail wins.
fn policy_change(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let greeting = world.greeting(DB);
    let serving = serving_gateway(world, &greeting);
    let grants = world.metrics(serving).value("fz_gateway_grants");

    let edited = Instant::now();
    world.set_rules("allow engineering -> gitlab, docs as web");
    world.wait_metrics(serving, "db's grant withdrawn", |m| {
        m.value("fz_gateway_grants") < grants
    });
    world.wait_for("the client to hear db's grant ended", WAIT, |world| {
        world
            .client
            .log_text()
            .contains("grant ended")
            .then_some(())
    });
    let withdrawn = World::seconds(edited);
    refused(world, DB);

    world
        .set_rules("allow engineering -> gitlab, docs, db as eng\ndeny engineering -> db as no-db");
    refused(world, DB);
    let guardrail = world.wait_for_or("the guardrail's denial in the flow log", WAIT, |world| {
        world.flows().into_iter().find(|flow| {
            flow["resource_id"] == "db"
                && flow["decision"] == "deny"
                && flow["rule_id"]
                    .as_str()
                    .is_some_and(|rule| rule.contains("no-db"))
        })
    });
    assert!(
        guardrail.is_some(),
        "no denial by the guardrail among {:#?}",
        world.flows()
    );
    format!("db withdrawn {withdrawn:.2} s after the edit; the guardrail wins over the allow")
}

/// A contractor is allowed `egress` (`internet`) at hq and nothing else; engineering uses db
/// there. A client of our own signs in with a real token of the contractor's, is refused db,
/// gets `egress`, and sends by hand through the granted gateway a SYN to db, then a DNS query
/// to the wan's resolver (198.18.0.1, public by fz's definition). The query is answered, the
/// SYN is dropped at the gateway (`destination_not_granted`), and nothing came back from db
/// before the answer. (The real client does not route `internet`: full tunnel is not built.)
fn internet_grant(world: &mut World, _: &mut Report) -> String {
    world.set_rules(
        "allow engineering -> gitlab, docs, db as eng\nallow contractors -> egress as egress",
    );
    let token = world.client_token("bob-laptop", CONTRACTOR);
    let mut rogue = world.rogue(&token, StaticSecret::from([0x21; 32]));
    let refusal = refusal(rogue.request("db", None), "db to a contractor");
    let grant = rogue
        .request("egress", None)
        .unwrap_or_else(|why| panic!("egress refused: {why}"));
    let serving = gateway_of(&grant);
    rogue.connect(&grant);
    let before = world.metrics(serving).dropped("destination_not_granted");

    let me = IpAddr::V4(rogue.tunnel_ipv4());
    let db: SocketAddr = DB.parse().unwrap();
    rogue.send(&packet::tcp(
        SocketAddr::new(me, 40001),
        db,
        Segment::syn(1),
    ));
    let resolver = SocketAddr::new(IpAddr::V4(UPSTREAM_DNS), 53);
    let asking = SocketAddr::new(me, 40002);
    rogue.send(&packet::udp(
        asking,
        resolver,
        &a_query(0x4201, "www.example.org"),
    ));
    let (answer, earlier) = rogue.receive_until("the resolver's answer through egress", |p| {
        let (from, to, payload) = packet::parse_udp(p)?;
        (from == resolver && to == asking)
            .then(|| a_answers(0x4201, payload))
            .flatten()
    });
    assert_eq!(answer, [Ipv4Addr::new(192, 0, 2, 80)]);
    assert_nothing_from(&earlier, db);
    world.wait_metrics(serving, "the SYN to db dropped", |m| {
        m.dropped("destination_not_granted") > before
    });
    format!(
        "db refused ({refusal}); through egress at {}: www.example.org -> 192.0.2.80 from {UPSTREAM_DNS}, a SYN to {DB} dropped, no answer",
        GATEWAYS[serving].name
    )
}

/// A host with a public address behind hq, which only the gateways route to.
const INTERNET_HOST: &str = "203.0.113.80:80";

/// `internet` through a client's full tunnel. A laptop behind an easy NAT (so that the portal,
/// the relay and the gateways are all beyond its default route, which the tunnel takes over)
/// cannot reach [`INTERNET_HOST`]. It runs `fz-client --full-tunnel` and policy grants
/// `egress`: the host answers, and saw the connection come from a gateway's address; a name no
/// resource matches is asked through the tunnel too (the upstream resolver logs the query from
/// a gateway). Policy then withdraws `egress`: the laptop's rules are gone at once, its own
/// default route is still there, and the host is out of reach again.
fn full_tunnel(world: &mut World, _: &mut Report) -> String {
    world.set_rules(
        "allow engineering -> gitlab, docs, db as eng\nallow engineering -> egress as net",
    );
    let host = world.site_host("inet", "203.0.113.80/24");
    // Its answers go back to the gateways' addresses on the same bridge.
    host.ip(&["route", "add", "172.16.0.0/16", "dev", "eth0"])
        .unwrap();
    for gateway in &world.gateways {
        if gateway.spec.name != "gw-c" {
            gateway
                .ns
                .ip(&["route", "replace", "203.0.113.0/24", "dev", "eth1"])
                .unwrap();
        }
    }
    world.greeter(&host, INTERNET_HOST, "inet");

    let mut laptop = world.natted_host("full", Nat::Easy, 6);
    cannot_connect(&laptop.ns, INTERNET_HOST);
    laptop.full_tunnel = true;
    world.start_again(&mut laptop);
    let up = Instant::now();
    world.wait_for("the laptop's full tunnel", WAIT, |_| {
        laptop
            .running()
            .log_text()
            .contains("full tunnel up")
            .then_some(())
    });
    let seen = greeting(&laptop.ns, INTERNET_HOST);
    let from = seen.strip_prefix("inet ").unwrap_or_default();
    assert!(
        GATEWAYS[..2]
            .iter()
            .any(|g| g.lan_address("172.16.") == from),
        "the host saw {seen:?}, not a gateway of hq"
    );
    let took = World::seconds(up);

    // DNS for a name no resource matches: through the tunnel, out of a gateway.
    let asked = laptop
        .ns
        .exec(
            "dig",
            &["+short", "+time=5", "+tries=1", "www.example.org", "A"],
        )
        .unwrap();
    assert_eq!(asked.trim(), "192.0.2.80");
    let log = world.upstream_dns_log();
    let query = log
        .lines()
        .rev()
        .find(|line| line.contains("query[A] www.example.org from"))
        .unwrap_or_else(|| panic!("the upstream resolver logged no query:\n{log}"));
    assert!(
        GATEWAYS[..2]
            .iter()
            .any(|g| query.ends_with(&format!("from {}", g.wan))),
        "the query did not come from a gateway: {query}"
    );

    // Withdrawn: the host's own routes again.
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let withdrawn = Instant::now();
    world.wait_for("the laptop's full tunnel to go", WAIT, |_| {
        laptop
            .running()
            .log_text()
            .contains("full tunnel down")
            .then_some(())
    });
    let down = World::seconds(withdrawn);
    let rules = laptop.ns.ip(&["rule", "show"]).unwrap();
    assert!(!rules.contains("51820"), "rules left: {rules}");
    let routes = laptop.ns.ip(&["route", "show", "default"]).unwrap();
    assert!(
        routes.contains("via 172.21.6.1"),
        "the laptop's own default route: {routes}"
    );
    cannot_connect(&laptop.ns, INTERNET_HOST);
    format!(
        "{INTERNET_HOST} answered {took:.2} s after the client was up, from {from}; \
         www.example.org asked {query:?}; routes back {down:.2} s after egress was withdrawn"
    )
}

/// `corp-net` (10.0.0.0/8) is allowed and `db` (10.0.5.0/24, inside it) denied. The real
/// client reaches the build server (10.0.6.10, in corp-net) and is refused db at once. A client
/// of our own with a token of the same user holds the corp-net grant and sends by hand a SYN
/// to db, then one to the build server, through the same gateway: the build server answers,
/// the SYN to db is dropped at the gateway (`destination_not_granted`), and nothing came back
/// from db before the build server's answer.
fn broad_grant(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> corp-net as corp\ndeny engineering -> db as not-db");
    let build = world.greeting(BUILD);
    assert!(build.starts_with("build 10.0.6."), "{build:?}");
    refused(world, DB);

    let token = world.client_token("alice-tablet", USER);
    let mut rogue = world.rogue(&token, StaticSecret::from([0x22; 32]));
    let grant = rogue
        .request("corp-net", None)
        .unwrap_or_else(|why| panic!("corp-net refused: {why}"));
    let serving = gateway_of(&grant);
    rogue.connect(&grant);
    let before = world.metrics(serving).dropped("destination_not_granted");

    let me = IpAddr::V4(rogue.tunnel_ipv4());
    let (db, build_server): (SocketAddr, SocketAddr) =
        (DB.parse().unwrap(), BUILD.parse().unwrap());
    rogue.send(&packet::tcp(
        SocketAddr::new(me, 40011),
        db,
        Segment::syn(1),
    ));
    let to_build = SocketAddr::new(me, 40012);
    rogue.send(&packet::tcp(to_build, build_server, Segment::syn(1)));
    let (answer, earlier) = rogue.receive_until("the build server's SYN-ACK", |p| {
        let (from, to, segment) = packet::parse_tcp(p)?;
        (from == build_server && to == to_build && segment.is_syn_ack()).then_some(segment)
    });
    assert_nothing_from(&earlier, db);
    // The build server need not wait for the rest of a handshake that will not come.
    rogue.send(&packet::tcp(
        to_build,
        build_server,
        Segment {
            seq: answer.ack,
            ack: 0,
            flags: RST,
        },
    ));
    world.wait_metrics(serving, "the SYN to db dropped", |m| {
        m.dropped("destination_not_granted") > before
    });
    format!(
        "the client: {build:?}, db refused; a corp-net grant at {}: the build server answers a SYN, one to {DB} is dropped",
        GATEWAYS[serving].name
    )
}

/// `intranet` (`*.company.com`) is allowed and `jenkins` (`jenkins.company.com`, one of its
/// names) denied. The real client gets mapped addresses for `wiki.company.com` and none for
/// `jenkins.company.com`. A client of our own asks for `intranet` with the name
/// `jenkins.company.com`: refused, with the resource that serves the name; the same request
/// for `wiki.company.com` is granted. The flow log records the names.
fn wildcard_grant(world: &mut World, _: &mut Report) -> String {
    world.set_rules(
        "allow engineering -> intranet as intranet\ndeny engineering -> jenkins as not-jenkins",
    );
    let mark = world.last_flow();
    let wiki = world.dig(&["wiki.company.com", "A"]);
    assert_eq!(wiki.len(), 4, "wiki.company.com: {wiki:?}");
    // An earlier scenario may have had jenkins refused a moment ago, and the client remembers
    // a refusal for a few seconds before it asks again: ask until the portal was asked.
    world.wait_for("the client's denial of jenkins, by name", WAIT, |world| {
        let jenkins = world.dig(&["jenkins.company.com", "A"]);
        assert!(jenkins.is_empty(), "jenkins got addresses: {jenkins:?}");
        world.flow_after(mark, |flow| {
            flow["resource_id"] == "jenkins"
                && flow["decision"] == "deny"
                && flow["name"] == "jenkins.company.com"
        })
    });

    let token = world.client_token("alice-phone", USER);
    let mut rogue = world.rogue(&token, StaticSecret::from([0x23; 32]));
    let mapping = |name: &str, last: u8| {
        Some(DnsMapping {
            name: name.to_owned(),
            mapped: vec![IpAddr::V4(Ipv4Addr::new(100, 96, 200, last))],
        })
    };
    let reason = refusal(
        rogue.request("intranet", mapping("jenkins.company.com", 1)),
        "jenkins.company.com through intranet",
    );
    assert_eq!(
        reason,
        "`jenkins.company.com` is served by resource `jenkins`, not `intranet`: ask for `jenkins`"
    );
    let flow = world.wait_flow("the refusal, with the name", mark, |flow| {
        flow["resource_id"] == "intranet"
            && flow["decision"] == "deny"
            && flow["name"] == "jenkins.company.com"
            && flow["client_id"] == rogue.client_id()
    });
    assert_eq!(flow["reason"], reason.as_str());
    rogue
        .request("intranet", mapping("wiki.company.com", 2))
        .unwrap_or_else(|why| panic!("wiki.company.com through intranet refused: {why}"));
    world.wait_flow("the grant of wiki, with the name", mark, |flow| {
        flow["resource_id"] == "intranet"
            && flow["decision"] == "allow"
            && flow["name"] == "wiki.company.com"
            && flow["client_id"] == rogue.client_id()
    });
    format!(
        "the client: wiki -> {}, jenkins empty; intranet asked with jenkins's name: {reason}; with wiki's: granted",
        wiki.join(" ")
    )
}

/// The client holds a db grant through a gateway of hq. A host on hq's resource network
/// (10.0.5.20, inside db's network) with a route to the client tunnel ranges through that
/// gateway tries to open a connection to a listener on the client's tunnel address, from
/// port 5432, the port the grant lets answers come from: its SYN goes unanswered (it does
/// reach the gateway: a closed port there answers with a reset). The client's connections
/// to db through the same gateway keep working.
fn site_cannot_open(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let greeted = world.greeting(DB);
    let serving = serving_gateway(world, &greeted);
    let gateway = GATEWAYS[serving].lan_address("10.0.5.");
    let client = world.client_tunnel_ipv4();
    let listener = world
        .client_ns
        .run(|| TcpListener::bind((client, 7000)))
        .unwrap();
    listener.set_nonblocking(true).unwrap();

    let host = world.site_host("host", "10.0.5.20/24");
    host.ip(&["route", "add", "100.64.0.0/11", "via", gateway])
        .unwrap();
    let closed: SocketAddr = SocketAddr::new(gateway.parse().unwrap(), 9);
    let reset = host.run(|| TcpStream::connect_timeout(&closed, WAIT));
    assert!(
        reset
            .as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "the host does not reach {}: {reset:?}",
        GATEWAYS[serving].name
    );
    let from: SocketAddr = "10.0.5.20:5432".parse().unwrap();
    let to = SocketAddr::new(IpAddr::V4(client), 7000);
    let opened = host.run(|| connect_from(from, to, REFUSAL));
    match opened {
        Err(error) if error.kind() == ErrorKind::TimedOut => {}
        Err(error) => panic!("the connection failed, but not by silence: {error}"),
        Ok(_) => panic!("the site opened a connection to the client ({from} -> {to})"),
    }
    match listener.accept() {
        Err(error) if error.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the client's listener got something: {other:?}"),
    }
    assert_eq!(world.greeting(DB), greeted, "db after the attempt");
    format!(
        "{from} -> {to} through {}: no answer within {REFUSAL:?}; db still answers",
        GATEWAYS[serving].name
    )
}

/// db is allowed only `when client verified`. Another laptop of the user's (its own token
/// and WireGuard key) is marked verified with `fz-portal verify` and reaches db. Its token
/// file is copied to a client of our own with a new key, which asks for db while the laptop
/// is off: refused, `client verified` did not hold, and the flow log says so for that device.
/// The laptop, back with its own key, reaches db again.
/// The relay (coturn) takes the credentials the portal minted for a device, and nothing
/// else: not a made-up password, not the password with another device's name or a later
/// expiry, not credentials made with the right secret that have expired.
fn relay_credentials(world: &mut World, _: &mut Report) -> String {
    let token = world.client_token("laptop-r", USER);
    let mut device = world.rogue(&token, StaticSecret::from([0x31; 32]));
    let relays = device.relays();
    let [relay] = relays.as_slice() else {
        panic!("the world has one relay; the portal sent {relays:?}");
    };
    assert_eq!(relay.address, RELAY);
    let (expiry, agent) = relay.username.split_once(':').unwrap();
    assert_eq!(agent, device.client_id());
    let expiry: u64 = expiry.parse().unwrap();
    let client_ns = &world.client_ns;
    let try_allocating = |username: &str, password: &str| {
        client_ns.run(|| allocate(RELAY, username, password, Duration::from_secs(5)))
    };
    let relayed = try_allocating(&relay.username, &relay.password)
        .unwrap_or_else(|error| panic!("the portal's credentials: {error}"));
    assert_eq!(relayed.ip(), RELAY.ip(), "relayed from {relayed}");
    let (expired_name, expired_password) = credentials(&world.relay_secret, agent, unix_now() - 60);
    let refusals = [
        (
            "a made-up password",
            relay.username.clone(),
            "bm90IHRoZSBwYXNzd29yZA==".to_owned(),
        ),
        (
            "another device's name",
            format!("{expiry}:c_someone-else"),
            relay.password.clone(),
        ),
        (
            "a later expiry",
            format!("{}:{agent}", expiry + 86_400),
            relay.password.clone(),
        ),
        ("expired a minute ago", expired_name, expired_password),
    ];
    for (what, username, password) in &refusals {
        let answer = try_allocating(username, password);
        assert!(
            answer.as_ref().is_err_and(|e| e.starts_with("refused")),
            "{what}: {answer:?}"
        );
    }
    format!(
        "the portal's credentials for {agent} (until {expiry}) got {relayed}; refused: {}",
        refusals.map(|(what, ..)| what).join(", ")
    )
}

/// Clients behind no NAT, an easy and a hard one reach a resource behind each of three
/// gateways behind no NAT, an easy and a hard one (those two with no way in from the wan):
/// data passes in every cell, and the path each ends on is what the NATs allow: direct unless
/// both NATs are hard, when only the relay carries it. Nothing unasked-for got into a NAT'd
/// gateway's network before its grant: its router let in only answers.
fn nat_matrix(world: &mut World, report: &mut Report) -> String {
    world.set_rules("allow engineering -> edge-open-web, edge-easy-web, edge-hard-web as edge");
    let gateways: Vec<EdgeGateway> = (0u8..)
        .zip(EDGES)
        .map(|(index, (name, ..))| world.edge_gateway(index, name))
        .collect();
    let clients: Vec<(Nat, fz_e2e::world::ExtraClient)> = [Nat::None, Nat::Easy, Nat::Hard]
        .into_iter()
        .zip(0u8..)
        .map(|(nat, index)| {
            let name = format!("nat-{}", nat.name());
            (nat, world.natted_client(&name, nat, index))
        })
        .collect();
    // Before any grant names a client, what the wan sends a NAT'd gateway gets nowhere: a
    // handshake and junk to its public address and WireGuard port are refused by its router,
    // and the gateway hears nothing of them.
    for gateway in &gateways {
        let Some(router) = &gateway.router else {
            continue;
        };
        let before = inbound_refused(router);
        let heard = |gateway: &EdgeGateway| {
            let m = gateway
                .ns
                .run(|| fz_host::testing::metrics::scrape(fz_e2e::world::METRICS))
                .unwrap();
            m.dropped("not_wireguard") + m.dropped("unknown_key") + m.dropped("bad_mac")
        };
        let heard_before = heard(gateway);
        let target = SocketAddr::new(IpAddr::V4(gateway.wan), fz_e2e::world::WIREGUARD_PORT);
        clients[0].1.ns.run(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut initiation = vec![1u8, 0, 0, 0];
            initiation.resize(148, 0x5a);
            socket.send_to(&initiation, target).unwrap();
            socket.send_to(b"anyone there?", target).unwrap();
        });
        world.wait_for(
            &format!("{}'s router to refuse both", gateway.name),
            WAIT,
            |_| (inbound_refused(router) >= before + 2).then_some(()),
        );
        assert_eq!(
            heard(gateway),
            heard_before,
            "{} heard the wan",
            gateway.name
        );
    }
    let mut cells = Vec::new();
    let (mut direct, mut direct_ms, mut relayed_ms) = (0, 0f64, 0f64);
    for (client_nat, client) in &clients {
        let client_id = ready_client_id(&client.running().log_text());
        for gateway in &gateways {
            let cell = format!("{}/{}", client_nat.name(), gateway.nat.name());
            let started = Instant::now();
            let answer = greeting(&client.ns, &gateway.resource);
            let took_ms = started.elapsed().as_secs_f64() * 1000.0;
            assert!(
                answer.starts_with(gateway.name),
                "{cell}: the greeting came from elsewhere: {answer}"
            );
            let both_hard = *client_nat == Nat::Hard && gateway.nat == Nat::Hard;
            let one_hard = *client_nat == Nat::Hard || gateway.nat == Nat::Hard;
            // The relay may carry the first bytes; without a hard NAT, ICE must move the
            // connection to a direct path soon after.
            let path = world.wait_for(&format!("{cell}: the gateway's path"), WAIT, |_| {
                path_of(&gateway.process.log_text(), &client_id)
                    .filter(|path| one_hard || path == "direct")
            });
            if both_hard {
                assert_eq!(path, "relayed", "{cell}: only the relay can carry it");
                relayed_ms = relayed_ms.max(took_ms);
            } else if path == "direct" {
                direct += 1;
                direct_ms = direct_ms.max(took_ms);
            } else {
                // One hard NAT: hole punching may or may not find a pair; the relay always does.
                relayed_ms = relayed_ms.max(took_ms);
            }
            cells.push(format!("{cell} {path} {took_ms:.0} ms"));
        }
    }
    let refused: Vec<String> = gateways
        .iter()
        .filter_map(|g| {
            Some(format!(
                "{} {}",
                g.name,
                inbound_refused(g.router.as_ref()?)
            ))
        })
        .collect();
    // What the gateways' metrics say of the paths (published each second): gw-open's
    // clients all direct, gw-hard's relayed at least for the client behind the other hard
    // NAT, with bytes through the relay.
    let count = |m: &fz_host::testing::metrics::Metrics, path: &str| {
        m.value(&format!("fz_gateway_clients{{path=\"{path}\"}}"))
    };
    let paths = |gateway: &EdgeGateway,
                 holds: &dyn Fn(&fz_host::testing::metrics::Metrics) -> bool| {
        fz_host::testing::metrics::wait_metrics(
            &gateway.ns,
            fz_e2e::world::METRICS,
            &format!("{}'s clients by path", gateway.name),
            WAIT,
            |what| gateway.process.assert_running(what),
            holds,
        )
    };
    paths(&gateways[0], &|m| {
        count(m, "direct") == 3 && count(m, "relayed") == 0
    });
    paths(&gateways[2], &|m| {
        count(m, "direct") + count(m, "relayed") == 3
            && count(m, "relayed") >= 1
            && m.value("fz_gateway_wireguard_bytes_total{path=\"relayed\"}") > 0
    });
    // Throughput of a tunnel that only the relay carries, against one that goes directly,
    // on the same world.
    let direct_speed = clients[0]
        .1
        .ns
        .run(|| fz_e2e::servers::drink(gateways[0].bulk))
        .unwrap_or_else(|error| panic!("no bulk transfer none/none: {error}"));
    let relayed_speed = clients[2]
        .1
        .ns
        .run(|| fz_e2e::servers::drink(gateways[2].bulk))
        .unwrap_or_else(|error| panic!("no bulk transfer hard/hard: {error}"));
    let ratio = relayed_speed / direct_speed;
    report.figures.relay_throughput_ratio = Some(ratio);
    report.figures.nat_setup_direct_ms = Some(direct_ms);
    report.figures.nat_setup_relayed_ms = Some(relayed_ms);
    report.figures.nat_direct_share = Some(f64::from(direct) / cells.len() as f64);
    format!(
        "{} (client/gateway NAT, path, first connection); unasked-for datagrams the gateways' \
         routers refused: {}; tunnel throughput {:.0} Mbit/s direct, {:.0} Mbit/s relayed \
         ({ratio:.2}x)",
        cells.join(", "),
        refused.join(", "),
        direct_speed * 8.0 / 1e6,
        relayed_speed * 8.0 / 1e6,
    )
}

/// A client and a gateway both behind hard NATs, so only the relay carries them: the relay
/// restarts (coturn killed and started again, every allocation gone) and the connection
/// recovers: the client, hearing nothing, has ICE check again; each side that sent through
/// its lost allocation and heard nothing allocates again and tells the other its new
/// candidate.
fn relay_restart(world: &mut World, report: &mut Report) -> String {
    world.set_rules("allow engineering -> edge-hard-web as edge");
    let gateway = world.edge_gateway(2, "gw-hard-r");
    let client = world.natted_client("nat-hard-r", Nat::Hard, 3);
    let client_id = ready_client_id(&client.running().log_text());
    let first = greeting(&client.ns, &gateway.resource);
    let path = world.wait_for("the gateway's path", WAIT, |_| {
        path_of(&gateway.process.log_text(), &client_id)
    });
    assert_eq!(path, "relayed", "both NATs are hard");
    let restarted = Instant::now();
    world.restart_relay();
    let (answer, took, attempts) =
        greeting_again(&client, &gateway.resource, restarted, "the relay's restart");
    report.figures.relay_restart_seconds = Some(took);
    format!(
        "{first:?} relayed; the relay restarted; {answer:?} again after {took:.2} s ({attempts} attempts)"
    )
}

/// A client on the wan, using a resource behind a gateway behind an easy NAT (reached by
/// hole punching), moves to another address: its old path and relay allocation are dead, its
/// portal connection too. It hears nothing, has ICE check again, allocates again, tells the
/// gateway its new candidates, and the resource answers again.
fn roaming_client(world: &mut World, report: &mut Report) -> String {
    world.set_rules("allow engineering -> edge-easy-web as edge");
    let gateway = world.edge_gateway(1, "gw-easy-r");
    let client = world.natted_client("roamer", Nat::None, 4);
    let first = greeting(&client.ns, &gateway.resource);
    let old = "198.18.0.44/24";
    let new = "198.18.0.54/24";
    client
        .ns
        .ip(&["address", "del", old, "dev", "eth0"])
        .unwrap();
    client
        .ns
        .ip(&["address", "add", new, "dev", "eth0"])
        .unwrap();
    client
        .ns
        .ip(&["route", "replace", "default", "via", "198.18.0.1"])
        .unwrap();
    let (answer, took, attempts) =
        greeting_again(&client, &gateway.resource, Instant::now(), "the move");
    report.figures.roaming_seconds = Some(took);
    format!(
        "{first:?}; moved from {old} to {new}; {answer:?} again after {took:.2} s ({attempts} attempts)"
    )
}

/// Relay first, then direct: a client and a gateway behind easy NATs, whose direct datagrams
/// the gateway's router drops at first, so that the relay carries the connection's first
/// bytes. A long transfer starts; the router lets direct datagrams through again; ICE's
/// checks of the direct pairs (still under way) get through, the client nominates the direct
/// pair, both sides move to it without a new connection, and the transfer completes, every
/// byte of it, the rest of it directly.
fn relay_first(world: &mut World, _: &mut Report) -> String {
    use std::io::Read as _;
    world.set_rules("allow engineering -> edge-easy-web as edge");
    let gateway = world.edge_gateway(1, "gw-easy-f");
    let router = gateway.router.as_ref().expect("an easy NAT has a router");
    let IpAddr::V4(relay) = RELAY.ip() else {
        unreachable!("the relay is on the IPv4 wan")
    };
    fz_e2e::nat::block_direct(router, relay);
    let client = world.natted_client("first", Nat::Easy, 5);
    let client_id = ready_client_id(&client.running().log_text());
    let bulk = gateway.bulk;
    let mut stream = client
        .ns
        .run(|| TcpStream::connect_timeout(&bulk, WAIT))
        .unwrap_or_else(|error| panic!("no connection to {bulk}: {error}"));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buffer = vec![0u8; 64 << 10];
    let mut received = stream.read(&mut buffer).unwrap();
    assert!(received > 0, "{bulk} closed at once");
    let first_path = world.wait_for("the gateway's first path", WAIT, |_| {
        path_of(&gateway.process.log_text(), &client_id)
    });
    assert_eq!(
        first_path, "relayed",
        "the first bytes came while only the relay could carry them"
    );
    // The portal's flow log says so too, on the grant's row.
    let logged_path = |wanted: &'static str| {
        world.wait_for(&format!("the flow log's path: {wanted}"), WAIT, |world| {
            world
                .flows()
                .into_iter()
                .find(|f| f["client_id"] == client_id.as_str() && f["decision"] == "allow")
                .filter(|f| f["path"] == wanted)
                .map(|f| f["relay"].as_str().map(str::to_owned))
        })
    };
    assert_eq!(logged_path("relayed"), Some(relay.to_string()));
    let metrics = || {
        gateway
            .ns
            .run(|| fz_host::testing::metrics::scrape(fz_e2e::world::METRICS))
            .unwrap()
    };
    let direct_bytes = "fz_gateway_wireguard_bytes_total{path=\"direct\"}";
    let direct_before = metrics().value(direct_bytes);
    fz_e2e::nat::unblock_direct(router);
    let lifted = Instant::now();
    world.wait_for("the connection's move to a direct path", WAIT, |_| {
        path_of(&gateway.process.log_text(), &client_id).filter(|path| path == "direct")
    });
    let moved = lifted.elapsed().as_secs_f64();
    assert_eq!(
        logged_path("direct"),
        None,
        "a direct path goes through no relay"
    );
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(error) => panic!("the transfer broke after {received} bytes: {error}"),
        }
    }
    assert_eq!(
        received,
        fz_e2e::servers::POUR_BYTES,
        "bytes of the transfer"
    );
    // The rest went directly: at least a megabyte more on the gateway's direct path (its
    // metrics are published each second).
    fz_host::testing::metrics::wait_metrics(
        &gateway.ns,
        fz_e2e::world::METRICS,
        "direct bytes after the move",
        WAIT,
        |what| gateway.process.assert_running(what),
        |m| m.value(direct_bytes) >= direct_before + (1 << 20),
    );
    format!(
        "{} MiB from gw-easy-f: the first bytes relayed (direct datagrams dropped); direct \
         again {moved:.2} s after the drop ended, the transfer went on and completed; the flow \
         log said relayed via {relay}, then direct",
        received >> 20
    )
}

/// Connects from `client`'s host to `to` again and again (half a second each) until it
/// answers: the answer, the seconds since `since` (`what` happened then) and the attempts.
/// Fails past [`FAILOVER_LIMIT`], or if the client exits.
fn greeting_again(
    client: &fz_e2e::world::ExtraClient,
    to: &str,
    since: Instant,
    what: &str,
) -> (String, f64, u32) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Ok(answer) = client
            .ns
            .run(|| try_greeting(to, Duration::from_millis(500)))
        {
            return (answer, since.elapsed().as_secs_f64(), attempts);
        }
        client.running().assert_running(what);
        assert!(
            since.elapsed() < FAILOVER_LIMIT,
            "no greeting within {FAILOVER_LIMIT:?} of {what} ({attempts} attempts)"
        );
    }
}

/// The path a gateway's log last named for a client: `direct` or `relayed`.
fn path_of(log: &str, client_id: &str) -> Option<String> {
    log.lines()
        .rev()
        .filter(|line| line.contains(&format!("client={client_id}")))
        .find_map(|line| {
            let (_, rest) = line.split_once("path: ")?;
            rest.split_whitespace().next().map(str::to_owned)
        })
}

fn copied_token(world: &mut World, _: &mut Report) -> String {
    world.set_rules(
        "allow engineering -> gitlab, docs as web\nallow engineering -> db when client verified as verified-db",
    );
    let mut laptop = world.extra_client("laptop-v", 90);
    let device = ready_client_id(&laptop.running().log_text());
    let marked = world.admin(&["verify", "--account", ACCOUNT, &device]);
    assert!(
        marked.contains("is verified while it holds key"),
        "{marked}"
    );
    let reached = greeting(&laptop.ns, DB);
    let status = laptop.running().terminate();
    assert!(status.success(), "the laptop exited with {status}");

    let mark = world.last_flow();
    let mut copy = world.rogue(&laptop.token, StaticSecret::from([0x24; 32]));
    assert_eq!(copy.client_id(), device, "one device per token");
    let reason = refusal(
        copy.request("db", None),
        "db to the copied token with another key",
    );
    assert!(
        reason.contains("`client verified` did not hold"),
        "refused for another reason: {reason}"
    );
    world.wait_flow("the copy's denial in the flow log", mark, |flow| {
        flow["client_id"] == device.as_str()
            && flow["resource_id"] == "db"
            && flow["decision"] == "deny"
            && flow["reason"].as_str() == Some(reason.as_str())
    });
    drop(copy);

    world.start_again(&mut laptop);
    let again = greeting(&laptop.ns, DB);
    format!(
        "{device} verified: {reached:?}; its token with another key: {reason}; with its own key again: {again:?}"
    )
}

/// A person signs in at the identity provider (oidc-provider, over https on the wan) from a
/// host of their own, as `fz-client sign-in` and a browser do it: the provider's button, its
/// login page, the redirects back to the client's loopback listener. Their token is their own
/// sign-in's, not an admin's. The provider puts them in `SRE`, and `group sre { idp corp "SRE" }`
/// is the only group allowed db: they reach db, and are refused lab-web, which only `finance`
/// (`idp corp "Finance"`) may use. The provider moves them to Finance and they sign in again:
/// db is refused within moments of that sign-in (the portal withdraws the grant and closes the
/// session that counted SRE; the goal is 2 s) and lab-web answers. An admin revokes their
/// token: lab-web is refused within moments too.
fn identity_provider_groups(world: &mut World, report: &mut Report) -> String {
    world.set_rules(&format!(
        "group sre {{ idp {IDP_PROVIDER} \"SRE\" }}\ngroup finance {{ idp {IDP_PROVIDER} \"Finance\" }}\n\
         allow sre -> db as sre-db\nallow finance -> lab-web as finance-lab"
    ));
    world
        .set_idp_groups(&["SRE"])
        .unwrap_or_else(|why| panic!("{why}"));
    let mut host = world.extra_host("sso-laptop", 95);
    world
        .sign_in_at_provider(&host)
        .unwrap_or_else(|why| panic!("the sign-in at the provider failed: {why}"));
    world.start_again(&mut host);
    let tokens = world.admin(&["token", "list", "--account", ACCOUNT]);
    let token_id = tokens
        .lines()
        .find(|line| line.contains(&format!("client of {IDP_USER} via {IDP_PROVIDER}")))
        .and_then(|line| line.split('\t').next())
        .unwrap_or_else(|| panic!("no token of the sign-in's among {tokens}"))
        .to_owned();
    let reached = greeting(&host.ns, DB);
    cannot_connect(&host.ns, LAB_WEB);

    // The provider's word changes; it counts from the person's next sign-in.
    world
        .set_idp_groups(&["Finance"])
        .unwrap_or_else(|why| panic!("{why}"));
    world
        .sign_in_at_provider(&host)
        .unwrap_or_else(|why| panic!("the second sign-in failed: {why}"));
    let moved = Instant::now();
    let until_refused = |to: &str| {
        world.wait_for("the connection to be refused", WAIT, |_| {
            host.ns
                .run(|| try_greeting(to, Duration::from_millis(500)))
                .is_err()
                .then_some(())
        });
    };
    until_refused(DB);
    let db_lost = World::seconds(moved);
    let finance = world.wait_for("lab-web to answer the person in finance", WAIT, |_| {
        host.ns
            .run(|| try_greeting(LAB_WEB, Duration::from_millis(500)))
            .ok()
    });

    let revoked = Instant::now();
    world.admin(&["token", "revoke", "--account", ACCOUNT, &token_id]);
    until_refused(LAB_WEB);
    let lab_lost = World::seconds(revoked);
    report.figures.idp_group_removed_seconds = Some(db_lost);
    report.figures.token_revoked_seconds = Some(lab_lost);
    format!(
        "{IDP_USER} signed in at the provider; in SRE: db {reached:?}, lab-web refused; moved to \
         Finance: db refused {db_lost:.2} s after the sign-in, lab-web {finance:?}; token \
         revoked: lab-web refused after {lab_lost:.2} s (goal 2 s each)"
    )
}

/// 6. Twenty more clients (each a host of its own with its own token and key, the same user)
///    connect to db: the portal picks a random healthy gateway of hq for each, so neither
///    gateway carries them all. (All twenty on one: a chance of one in half a million.)
fn load_balancing(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let clients = world.extra_clients(20);
    let mut carried = [0u32; GATEWAYS.len()];
    for extra in &clients {
        let greeting = greeting(&extra.ns, DB);
        carried[serving_gateway(world, &greeting)] += 1;
    }
    assert!(
        carried[0] > 0 && carried[1] > 0,
        "one gateway carried every client: {carried:?}"
    );
    format!(
        "of 20 clients, gw-a carried {} and gw-b {}",
        carried[0], carried[1]
    )
}

/// 11. A rule that holds only until the end of this minute (UTC, the window `00:00-HH:MM`):
///     lab-web answers while it holds; when the window closes the portal withdraws the grant,
///     gw-c drops it, and the next connection is refused with the time as the reason.
fn time_window(world: &mut World, _: &mut Report) -> String {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let minute_of_day = |seconds: u64| (seconds / 60) % (24 * 60);
    // A window cannot close at midnight (24:00 is no time of day): wait for the next day.
    world.wait_for(
        "the last minute of the day to pass",
        Duration::from_secs(70),
        |_| (minute_of_day(now()) != 24 * 60 - 1).then_some(()),
    );
    // Closes at the next minute, or the one after when this one is nearly over: the test
    // connects first.
    let started = now();
    let closes = (started / 60 + if started % 60 > 45 { 2 } else { 1 }) * 60;
    let end = minute_of_day(closes);
    let rule = format!(
        "allow engineering -> lab-web when time any 00:00-{:02}:{:02} UTC as until-{:02}{:02}",
        end / 60,
        end % 60,
        end / 60,
        end % 60
    );
    world.set_rules(&format!(
        "allow engineering -> gitlab, docs, db as eng\n{rule}"
    ));
    assert_eq!(world.greeting(LAB_WEB), "lab 192.168.50.1");
    let lab = 2;
    let patience = Duration::from_secs(closes.saturating_sub(now())) + WAIT;
    world.wait_for(
        "gw-c to drop the grant when the window closes",
        patience,
        |world| (world.metrics(lab).value("fz_gateway_grants") == 0).then_some(()),
    );
    let dropped_after = now().saturating_sub(closes);
    refused(world, LAB_WEB);
    let denial = world.wait_for(
        "the denial after the window in the flow log",
        WAIT,
        |world| {
            world
                .flows()
                .into_iter()
                .find(|flow| flow["resource_id"] == "lab-web" && flow["decision"] == "deny")
        },
    );
    format!(
        "`{rule}`: lab-web answered, the grant went {dropped_after} s after the window closed; then refused: {}",
        denial["reason"].as_str().unwrap_or_default()
    )
}

/// 8. The portal stops: the tunnels that are up keep working. It starts again on its store:
///    every gateway is back, the tokens still hold, the flow log is whole, and a new request
///    (to the other site) works.
fn portal_down(world: &mut World, _: &mut Report) -> String {
    world.set_rules("allow engineering -> gitlab, docs, db, lab-web as eng");
    let greeting = world.greeting(DB);
    let page = world.curl("gitlab.company.com", "/", &[]).unwrap();
    let flows = world.flows().len();

    world.stop_portal();
    world.wait_for("the client to notice the portal is gone", WAIT, |world| {
        world
            .client
            .log_text()
            .contains("portal away")
            .then_some(())
    });
    assert_eq!(world.greeting(DB), greeting, "db without the portal");
    let again = world
        .curl("gitlab.company.com", "/", &[])
        .unwrap_or_else(|error| panic!("gitlab without the portal: {error}"));
    assert_eq!(again.body, page.body);

    world.restart_portal();
    assert_eq!(world.gateways_connected(), [true, true, true]);
    assert!(world.flows().len() >= flows, "flows were lost");
    // The client reconnects with backoff; its token still holds, and a resource it never
    // used (at the other site) comes up through the portal.
    let lab = world.wait_for(
        "lab-web through the restarted portal",
        Duration::from_secs(30),
        |world| {
            world
                .client_ns
                .run(|| try_greeting(LAB_WEB, Duration::from_secs(1)))
                .ok()
        },
    );
    assert_eq!(lab, "lab 192.168.50.1");
    format!("db and gitlab kept working without the portal; after its restart: {lab:?}")
}

/// 7. The gateway carrying db dies: the portal tells the client its connection closed, the
///    client leaves it after four seconds without an answer, and db answers through the other
///    gateway of the site. The portal took the dead one out of service. The dead gateway is
///    started again afterwards.
fn failover(world: &mut World, report: &mut Report) -> String {
    let (failover, detail) = fail_over_db(world, Outage::Crash, "killed");
    report.figures.failover_seconds = Some(failover.took.as_secs_f64());
    let connected = world.gateways_connected();
    assert!(
        !connected[failover.dead],
        "the portal keeps the dead gateway in service"
    );
    assert!(connected[failover.alive]);
    world.restart_gateway(failover.dead);
    detail
}

/// The gateway carrying db hangs (SIGSTOP): its portal connection stays open and nobody
/// tells the client, which leaves it after `SILENCE_LIMIT` without an answer; db answers
/// through the other gateway. The hung one is started again afterwards.
fn hung_gateway(world: &mut World, report: &mut Report) -> String {
    let (failover, detail) = fail_over_db(world, Outage::Hang, "hung");
    report.figures.failover_hung_seconds = Some(failover.took.as_secs_f64());
    detail
}

/// The gateway carrying db crashes and is started again at once (the same key and token, a
/// new process that knows no session): db answers again, through whichever gateway the
/// portal gives the client when it leaves the silent session.
fn restarted_gateway(world: &mut World, report: &mut Report) -> String {
    let (failover, detail) = fail_over_db(world, Outage::Restart, "restarted");
    report.figures.failover_restart_seconds = Some(failover.took.as_secs_f64());
    detail
}

/// Takes the gateway carrying db out as `outage` says and waits for db through a gateway
/// again: what happened, and the scenario's line (`what` the gateway was).
fn fail_over_db(
    world: &mut World,
    outage: Outage,
    what: &str,
) -> (fz_e2e::world::Failover, String) {
    world.set_rules("allow engineering -> gitlab, docs, db as eng");
    let failover = world.fail_over(DB, FAILOVER_LIMIT, outage);
    let detail = format!(
        "{} {what}; db answered through {} after {:.2} s ({} attempts)",
        GATEWAYS[failover.dead].name,
        GATEWAYS[failover.alive].name,
        failover.took.as_secs_f64(),
        failover.attempts
    );
    (failover, detail)
}

// ---- helpers ----

/// The gateway a grant names, as an index of [`GATEWAYS`].
/// Three portal replicas on one PostgreSQL (`fz_e2e::replicas`). A client connected to the
/// first reaches a resource through a gateway connected to one of the others: the grant
/// crosses replicas. The gateway's replica is killed (`kill -9`): the tunnel goes on carrying
/// connections, the gateway re-homes to the replica left, and every replica is then restarted
/// in turn (each drains), the tunnel working after each. Revoking the client's token on the
/// first replica still reaches the gateway, wherever it is now. Grants are timed from a probe
/// client's request to its grant, through the first replica (the gateway elsewhere) and
/// through the gateway's own.
fn portal_replicas(world: &mut World, report: &mut Report) -> String {
    world.set_rules("allow engineering -> edge-open-web as edge");
    let mut replicas = Replicas::start(world).unwrap_or_else(|why| panic!("{why}"));
    let gateway = world.edge_gateway_of(0, "gw-rep", &replicas.at(&[1, 2]));
    let client = world.extra_client_of("rlaptop", 130, &replicas.at(&[0]));
    let holding = || -> Vec<usize> {
        (1..REPLICAS)
            .filter(|index| {
                let log = replicas.process(*index).log_text();
                log.matches("gateway in service").count() > 0
            })
            .collect()
    };
    let home = match holding()[..] {
        [home] => home,
        ref other => panic!("the gateway is in service on replicas {other:?}"),
    };
    let first = greeting(&client.ns, &gateway.resource);

    let probes = 30;
    let mut cross = grant_round_trips(world, &replicas, 0, ("probe-cross", 100), probes);
    let mut same = grant_round_trips(world, &replicas, home, ("probe-same", 140), probes);
    let cross_p99 = percentile(&mut cross, 0.99);
    let same_p99 = percentile(&mut same, 0.99);
    report.figures.cross_replica_grant_p99_ms = Some(cross_p99);
    report.figures.same_replica_grant_p99_ms = Some(same_p99);

    // The gateway's replica dies: the tunnel does not need it.
    let killed = Instant::now();
    replicas.kill(home);
    let during = greeting(&client.ns, &gateway.resource);
    let other = 3 - home;
    world.wait_for("the gateway to re-home to the replica left", WAIT, |_| {
        let log = replicas.process(other).log_text();
        log.contains("gateway in service").then_some(())
    });
    let rehome = World::seconds(killed);
    report.figures.replica_rehome_seconds = Some(rehome);
    let after = greeting(&client.ns, &gateway.resource);

    // A rolling restart of every replica (the killed one simply starts again), each next one
    // once the agents it held are connected again, as an operator would go.
    for index in 0..REPLICAS {
        let agents = [gateway.process.log_text(), client.running().log_text()];
        let held: Vec<usize> = agents
            .iter()
            .map(|log| log.matches(READY).count())
            .collect();
        let holding: Vec<bool> = agents
            .iter()
            .map(|log| connected_to(log) == Some(replicas.address(index)))
            .collect();
        replicas.restart(world, index);
        world.wait_for("the agents of the restarted replica back", WAIT, |_| {
            let logs = [gateway.process.log_text(), client.running().log_text()];
            logs.iter()
                .zip(&held)
                .zip(&holding)
                .all(|((log, before), moved)| {
                    !moved || (log.matches(READY).count() > *before && connected_to(log).is_some())
                })
                .then_some(())
        });
        assert_eq!(
            greeting(&client.ns, &gateway.resource),
            first,
            "the tunnel after replica {index}'s restart"
        );
    }
    let mut again = grant_round_trips(world, &replicas, 0, ("probe-after", 180), 3);
    let again_p99 = percentile(&mut again, 0.99);

    // Revocation on the first replica reaches the gateway on whichever it is now.
    let tokens = admin_at(
        world,
        &replicas,
        0,
        &["token", "list", "--account", ACCOUNT],
    );
    let token_id = tokens
        .lines()
        .find(|line| line.contains("rlaptop"))
        .and_then(|line| line.split('\t').next())
        .unwrap_or_else(|| panic!("no token of rlaptop among {tokens}"))
        .to_owned();
    let revoked = Instant::now();
    admin_at(
        world,
        &replicas,
        0,
        &["token", "revoke", "--account", ACCOUNT, &token_id],
    );
    let command = World::seconds(revoked);
    world.wait_for(
        "the revoked device's connection to be refused",
        WAIT,
        |_| {
            client
                .ns
                .run(|| try_greeting(&gateway.resource, Duration::from_millis(500)))
                .is_err()
                .then_some(())
        },
    );
    let refused = World::seconds(revoked);
    report.figures.replica_token_revoked_seconds = Some(refused);
    report.figures.replica_revoke_command_seconds = Some(command);
    format!(
        "{first:?} through replica {home} for a client on replica 0; grants p99 {cross_p99:.1} ms \
         across replicas, {same_p99:.1} ms on the gateway's own ({probes} each); replica {home} \
         killed: {during:?} at once, the gateway re-homed to replica {other} in {rehome:.2} s, \
         {after:?}; every replica restarted in turn, the tunnel up after each, a grant across \
         in {again_p99:.1} ms; the token revoked on replica 0: refused after {refused:.2} s (the \
         command took {command:.2} s)"
    )
}

/// What an agent logs when the portal said `ready`.
const READY: &str = "the portal says ready";

/// The portal an agent's log says it is connected to now: the last it connected to, unless
/// the connection went down after its last `ready`.
fn connected_to(log: &str) -> Option<SocketAddr> {
    if log.rfind(READY) <= log.rfind("portal connection down") {
        return None;
    }
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("connected to the portal"))?;
    let url = line.split("portal=ws://").nth(1)?;
    url.split('/').next()?.parse().ok()
}

/// `fz-portal <args>` with replica `index`'s configuration.
fn admin_at(world: &World, replicas: &Replicas, index: usize, args: &[&str]) -> String {
    fz_e2e::world::admin(&world.portal_ns, &replicas.at(&[index]).config, args)
}

/// Times `count` grants of `edge-open-web` to a probe client (a token of device `device`)
/// connected to replica `index`, from the request to the grant, in milliseconds. Each comes
/// with a WireGuard key of its own (`key(first_seed + n)`; a key is one device's in an
/// account), so each is a new grant: a grant in force is only handed out again to its key.
fn grant_round_trips(
    world: &World,
    replicas: &Replicas,
    index: usize,
    (device, first_seed): (&str, u8),
    count: u8,
) -> Vec<f64> {
    let config = replicas.at(&[index]).config;
    let created = fz_e2e::world::create_client_token(&world.portal_ns, &config, device, USER);
    let secret = fz_e2e::world::secret_of(&created).to_owned();
    let pinned = replicas.key.parse().unwrap();
    let address = replicas.address(index);
    world.portal_ns.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut took = Vec::new();
            for seed in 0..count {
                let key = fz_host::testing::agents::key(first_seed.wrapping_add(seed));
                let mut probe = fz_host::testing::agents::TestClient::connect(
                    address, pinned, ACCOUNT, &secret, key,
                )
                .await
                .unwrap_or_else(|error| panic!("the probe cannot connect: {error:?}"));
                let asked = Instant::now();
                match probe.request("edge-open-web", None).await {
                    PortalToClient::Granted { .. } => {
                        took.push(asked.elapsed().as_secs_f64() * 1e3)
                    }
                    other => panic!("the probe's request through replica {index}: {other:?}"),
                }
            }
            took
        })
    })
}

/// The `share` percentile of `samples` (nearest rank).
fn percentile(samples: &mut [f64], share: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let rank = (share * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn gateway_of(grant: &SignedGrant) -> usize {
    let endpoints = &grant.grant.gateway.endpoints;
    GATEWAYS
        .iter()
        .position(|spec| endpoints.contains(&spec.endpoint()))
        .unwrap_or_else(|| panic!("the grant names no gateway of the world: {endpoints:?}"))
}

/// The portal's reason for refusing what a rogue client asked for; fails if it was granted.
fn refusal(answer: Result<SignedGrant, String>, what: &str) -> String {
    match answer {
        Err(reason) => reason,
        Ok(granted) => panic!(
            "the portal granted {what}: grant {} by rule `{}` through {}",
            granted.grant.id,
            granted.grant.rule,
            GATEWAYS[gateway_of(&granted)].name
        ),
    }
}

/// Fails if any of `packets` (out of a rogue client's tunnel) came from `address`.
fn assert_nothing_from(packets: &[Vec<u8>], address: SocketAddr) {
    let answered: Vec<String> = packets
        .iter()
        .filter_map(|p| {
            if let Some((from, to, segment)) = packet::parse_tcp(p) {
                (from == address).then(|| format!("{from} -> {to} {segment:?}"))
            } else {
                let (from, to, payload) = packet::parse_udp(p)?;
                (from == address).then(|| format!("{from} -> {to} udp, {} bytes", payload.len()))
            }
        })
        .collect();
    assert!(answered.is_empty(), "{address} answered: {answered:?}");
}

/// The client id an `fz-client`'s log says the portal gave it.
fn ready_client_id(log: &str) -> String {
    log.lines()
        .filter(|line| line.contains("the portal says ready"))
        .find_map(|line| {
            let (_, rest) = line.split_once("client=")?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no `ready` in the client's log:\n{log}"))
}

/// The gateway a greeting (`<name> <address>`) came through.
fn serving_gateway(world: &World, greeting: &str) -> usize {
    let address = greeting.split_whitespace().nth(1).unwrap_or_default();
    world.gateway_by_lan(address)
}

/// A connection from the client to `to` is refused at once: "no route to host", the ICMP
/// answer the client gives when policy says no.
fn refused(world: &World, to: &str) {
    let to: SocketAddr = to.parse().unwrap();
    let outcome = world
        .client_ns
        .run(|| TcpStream::connect_timeout(&to, WAIT));
    match outcome {
        Err(error) if error.kind() == ErrorKind::HostUnreachable => {}
        Err(error) => panic!("{to}: not refused with \"no route to host\": {error}"),
        Ok(_) => panic!("connected to {to}, which policy refuses"),
    }
}

fn is_mapped(address: Ipv4Addr) -> bool {
    u32::from(address) & 0xffe0_0000 == u32::from(Ipv4Addr::new(100, 96, 0, 0))
}

/// dig's output without the parts that differ between two asks of the same thing (the id,
/// the timing, the server line).
fn sections(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with(";; ->>HEADER")
                && !line.starts_with(";; Query time")
                && !line.starts_with(";; SERVER")
                && !line.starts_with(";; WHEN")
                && !line.starts_with(";; MSG SIZE")
                && !line.starts_with("; <<>> DiG")
                && !line.starts_with("; (")
                && !line.starts_with(";; global options")
        })
        .map(str::to_owned)
        .collect()
}
