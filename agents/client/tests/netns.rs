#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `fz-client` binary against the real `fz-portal` and two real `fz-gateway`s, each in
//! a network namespace of its own: the README's manual run of the client, automated. Needs
//! root, iproute2, nftables and `dig`.
//!
//! ```text
//!  client ns             portal ns                 gw-a ns, gw-b ns        site ns
//!  fz-client             fz-portal :8080           fz-gateway              br0 (lan)
//!   fzc0 (TUN)           br0 (wan) 198.18.1.1/24    eth0 198.18.1.11, .12   10.0.5.10 :5432 db
//!   eth0 198.18.1.10 ─── wan-c                      eth1 10.0.5.1, .2 ───  lan-a          :22 ssh
//!   default via .1       wan-a, wan-b ──────────── eth0                    lan-b          :80 gitlab
//!                        :53 DNS (www.example.org)  :51820 WireGuard        10.0.5.53 :53 DNS
//!                        :7000 off-tunnel server    metrics 127.0.0.1:9101
//! ```
//!
//! `───` is a veth pair; `wan-*` are ports of the bridge in the portal's namespace, `lan-*` of
//! the bridge in the site's.
//!
//! The policy tree (written by the test, watched by the portal) declares site `hq`, `db` =
//! `10.0.5.0/24` (tcp/5432, icmp) and `gitlab` = `gitlab.company.com` (tcp/80), and allows
//! `alice@acme.example` (the client token's user) both. `ip netns exec` gives each process
//! `/etc/netns/<ns>/resolv.conf` as its `/etc/resolv.conf`: the gateways ask the site's DNS
//! server (which knows `gitlab.company.com` as 10.0.5.10 and says NXDOMAIN to the rest), the
//! client's original resolver is the DNS server in the portal namespace (which knows
//! `www.example.org` as 192.0.2.80), and `fz-client` rewrites the client's file in place, so
//! the test reads the switch and the restore from `/etc/netns/<client>/resolv.conf`. The site's
//! servers greet with the address the connection came from (`db 10.0.5.1`): the masquerade of
//! the gateway that carried it.
//!
//! Sockets keep the namespace they were made in, so each is made on a short-lived thread that
//! has entered the namespace (`Netns::run`), then served by the test's tokio runtime. Every
//! test builds its own world under names unique to the process and the test; guards stop the
//! processes and delete namespaces and files also when a test fails, and print the processes'
//! logs then. Nothing waits by sleeping: each step waits for what it needs (a route, a metric,
//! a bundle hash, a log line, a greeting) within a deadline.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fz_e2e::binaries::binary;
use fz_e2e::world::{admin, secret_file};
use fz_host::testing::WAIT;
use fz_host::testing::metrics::{Metrics, http_get, scrape};
use fz_host::testing::net::{greet, serve_dns, tcp_listener, try_greeting, udp_socket};
use fz_host::testing::netns::{Netns, RemoveDir, bridge, etc_netns, port, unique_id};
use fz_host::testing::process::{Process, stop, wait_exit};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

// ---- the scenarios ----

/// Names: a name no resource matches goes to the original resolver unchanged, a resource's
/// name gets mapped addresses, and the host asks the client's sentinel meanwhile. Reach: the
/// IP resource and the DNS resource (by name, through the stub) answer through one gateway; a
/// port outside the grant is dropped there. Other traffic stays off the tunnel. SIGTERM: the
/// client exits 0 and leaves the resolver and the namespace as they were.
#[test]
fn the_client_answers_names_reaches_resources_and_leaves_the_rest_alone() {
    Lab::run(
        "the_client_answers_names_reaches_resources_and_leaves_the_rest_alone",
        |lab| {
            // -- 1. DNS --
            let switched = lab.client_resolv_conf();
            assert!(
                switched
                    .lines()
                    .any(|line| line.trim() == format!("nameserver {SENTINEL}")),
                "the resolver does not ask the client's sentinel:\n{switched}"
            );
            assert!(
                !switched.contains(&format!("nameserver {WAN_DNS}")),
                "the original nameserver is still asked directly:\n{switched}"
            );
            assert!(
                switched.contains("options timeout:2"),
                "the original's other lines were lost:\n{switched}"
            );
            assert_eq!(lab.dig("www.example.org"), ["192.0.2.80"]);
            let mapped = lab.dig("gitlab.company.com");
            assert_eq!(mapped.len(), 4, "not four mapped addresses: {mapped:?}");
            for address in &mapped {
                let address: Ipv4Addr = address
                    .parse()
                    .unwrap_or_else(|_| panic!("not an IPv4 address: {address:?} in {mapped:?}"));
                assert!(is_mapped(address), "{address} is outside 100.96.0.0/11");
            }

            // -- 2. Reach --
            let greeting = lab.greeting(DB);
            let serving = lab.gateway_of(&greeting, "db");
            let other = 1 - serving;
            // Both grants went to the gateway the client already used at the site.
            lab.wait_metrics(serving, "the client's peer at the serving gateway", |m| {
                m.value("fz_gateway_peers") == 1 && m.value("fz_gateway_grants") == 2
            });
            assert_eq!(lab.metrics(other).value("fz_gateway_peers"), 0);
            assert_eq!(
                lab.web_page("gitlab.company.com"),
                format!("gitlab page from {}", GATEWAYS[serving].lan)
            );
            let before = lab.metrics(serving).dropped("port_not_granted");
            lab.cannot_connect(SSH);
            lab.wait_metrics(serving, "the SYN to port 22 dropped", |m| {
                m.dropped("port_not_granted") > before
            });
            assert_eq!(lab.greeting(DB), greeting, "port 5432 stopped answering");

            // -- 3. Everything else stays off the tunnel --
            for (destination, device) in [
                ("10.0.5.10", CLIENT_TUN),
                ("100.96.0.1", CLIENT_TUN),
                ("198.18.1.1", "eth0"),
                ("198.18.1.11", "eth0"),
                ("192.0.2.1", "eth0"),
            ] {
                let route = lab.client_ns.ip(&["route", "get", destination]).unwrap();
                assert!(
                    route.contains(&format!(" dev {device} ")),
                    "{destination} is not routed through {device}: {route}"
                );
            }
            // Straight from the client's own address: through the tunnel it would come from a
            // gateway (and no grant reaches 198.18.1.1).
            assert_eq!(
                lab.greeting(&WAN_SERVER.to_string()),
                format!("wan {CLIENT_WAN}")
            );

            // -- 6. Exit --
            let status = lab.client.terminate();
            assert_eq!(status.code(), Some(0), "{status}");
            assert_eq!(
                lab.client_resolv_conf(),
                CLIENT_RESOLV_CONF,
                "the original resolver configuration is not back"
            );
            assert!(
                !lab.dir.path().join("state/resolv.conf.original").exists(),
                "the copy of the original outlived the client"
            );
            let link = lab.client_ns.ip(&["link", "show", "dev", CLIENT_TUN]);
            assert!(
                link.is_err(),
                "the TUN device outlived the client: {link:?}"
            );
            let routes = lab.client_ns.ip(&["route", "show"]).unwrap();
            assert!(
                !routes.contains(CLIENT_TUN),
                "routes left behind:\n{routes}"
            );
            // The host's resolver works again, without the client.
            assert_eq!(lab.dig("www.example.org"), ["192.0.2.80"]);
        },
    );
}

/// The rule for `db` is taken out of the policy tree: the portal reloads it and withdraws the
/// grant, and the next connection to `db` is refused at once with ICMP "prohibited" (no route
/// to host), not left to time out. `gitlab`, still allowed, still answers.
#[test]
fn a_rule_taken_away_is_refused_at_once() {
    Lab::run("a_rule_taken_away_is_refused_at_once", |lab| {
        let greeting = lab.greeting(DB);
        let serving = lab.gateway_of(&greeting, "db");
        lab.wait_metrics(serving, "the db grant at the gateway", |m| {
            m.value("fz_gateway_grants") == 1 && m.value("fz_gateway_peers") == 1
        });
        let hash = lab.bundle_hash();

        let edited = Instant::now();
        lab.write_policy(&POLICY.replace("-> db, gitlab", "-> gitlab"));
        lab.wait_for("the portal to load the new policy", WAIT, |lab| {
            (lab.bundle_hash() != hash).then_some(())
        });
        lab.wait_metrics(serving, "the db grant withdrawn at the gateway", |m| {
            m.value("fz_gateway_grants") == 0 && m.value("fz_gateway_peers") == 0
        });
        lab.wait_for("the client to hear the db grant ended", WAIT, |lab| {
            lab.client.log_text().contains("grant ended").then_some(())
        });

        let started = Instant::now();
        let outcome = lab
            .client_ns
            .run(|| TcpStream::connect_timeout(&DB.parse().unwrap(), WAIT));
        let took = started.elapsed();
        match outcome {
            Err(error) if error.kind() == std::io::ErrorKind::HostUnreachable => assert!(
                took < Duration::from_secs(2),
                "refused, but only after {took:?}"
            ),
            Err(error) => panic!("not refused with \"no route to host\" ({took:?}): {error}"),
            Ok(_) => panic!("connected to db after its rule was removed"),
        }
        let refused = edited.elapsed();
        assert!(
            refused < WITHDRAWAL,
            "db was refused only {refused:?} after the edit"
        );
        let _ = writeln!(
            std::io::stderr(),
            "withdrawal: db refused {:.2} s after the policy edit",
            refused.as_secs_f64()
        );
        // The refusal reaches the application before the client logs it.
        lab.wait_for("the client to log the portal's refusal", WAIT, |lab| {
            lab.client
                .log_text()
                .contains("access refused")
                .then_some(())
        });
        let flows = lab.admin(&[
            "flows",
            "--account",
            ACCOUNT,
            "--resource",
            "db",
            "--decision",
            "deny",
            "--json",
        ]);
        let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
        assert!(
            flows.as_array().is_some_and(|flows| !flows.is_empty()),
            "no denied flow to db in the log: {flows}"
        );

        // Only db went: gitlab is still allowed, by name.
        let page = lab.web_page("gitlab.company.com");
        assert!(
            page.starts_with("gitlab page from 10.0.5."),
            "not gitlab's page: {page:?}"
        );
    });
}

/// The portal stops: the tunnels that are up, and the names already answered, go on working
/// without it.
#[test]
fn tunnels_that_are_up_outlive_the_portal() {
    Lab::run("tunnels_that_are_up_outlive_the_portal", |lab| {
        let before = lab.greeting(DB);
        let page = lab.web_page("gitlab.company.com");
        assert!(page.starts_with("gitlab page from 10.0.5."), "{page:?}");

        let status = lab.portal.terminate();
        assert_eq!(status.code(), Some(0), "the portal's exit: {status}");
        lab.wait_for("the client to notice the portal is gone", WAIT, |lab| {
            lab.client.log_text().contains("portal away").then_some(())
        });
        // New connections over the tunnels that are up, and a name answered from memory.
        assert_eq!(lab.greeting(DB), before, "db through the same gateway");
        assert_eq!(lab.web_page("gitlab.company.com"), page);
        lab.client.assert_running("traffic without the portal");
    });
}

/// The gateway serving the client dies (SIGKILL, like a crash): the client hears nothing from
/// it for ten seconds, leaves it, and the portal grants the resource again through the other
/// gateway of the site; connections work again well within half a minute. The portal took the
/// dead gateway out of service when its connection closed.
#[test]
fn a_crashed_gateway_is_left_for_the_other() {
    Lab::run("a_crashed_gateway_is_left_for_the_other", |lab| {
        fail_over(lab, Failure::Crash);
    });
}

/// The gateway serving the client hangs (SIGSTOP): its connection to the portal stays open, so
/// when the client leaves it after six seconds of silence the portal still counts it in
/// service, and only the client's `avoid` steers the new grant to the other gateway. Later the
/// portal takes the hung gateway out of service for its missed heartbeats.
#[test]
fn a_hung_gateway_is_avoided_before_the_portal_notices() {
    Lab::run_with(
        "a_hung_gateway_is_avoided_before_the_portal_notices",
        Some(HANG_HEARTBEAT),
        |lab| fail_over(lab, Failure::Hang),
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// SIGKILL: the process and its connections are gone.
    Crash,
    /// SIGSTOP: the process and its connections are there, and silent.
    Hang,
}

/// Connects to db, stops its gateway as `failure` says, and keeps connecting until db answers
/// through the other gateway, which must be within [`FAILOVER_LIMIT`].
fn fail_over(lab: &Lab, failure: Failure) {
    let greeting = lab.greeting(DB);
    let serving = lab.gateway_of(&greeting, "db");
    let other = 1 - serving;
    let (dead, alive) = (GATEWAYS[serving], GATEWAYS[other]);
    lab.wait_metrics(serving, "the client's peer at the serving gateway", |m| {
        m.value("fz_gateway_peers") == 1
    });
    assert_eq!(lab.metrics(other).value("fz_gateway_peers"), 0);

    match failure {
        Failure::Crash => lab.gateways[serving].kill(),
        Failure::Hang => lab.gateways[serving].freeze(),
    }
    let stopped = Instant::now();
    let mut attempts = 0;
    let took = loop {
        attempts += 1;
        if let Ok(line) = lab
            .client_ns
            .run(|| try_greeting(DB, Duration::from_millis(500)))
        {
            assert_eq!(
                line,
                format!("db {}", alive.lan),
                "a greeting not through {}",
                alive.name
            );
            break stopped.elapsed();
        }
        lab.assert_running("the failover");
        assert!(
            stopped.elapsed() < FAILOVER_PATIENCE,
            "db did not answer again within {FAILOVER_PATIENCE:?} of stopping {} ({attempts} attempts)",
            dead.name
        );
    };
    // Past libtest's capture: the figure is worth seeing on every run.
    let _ = writeln!(
        std::io::stderr(),
        "failover ({failure:?}): {} stopped, db answered through {} after {:.2} s ({attempts} attempts)",
        dead.name,
        alive.name,
        took.as_secs_f64()
    );
    assert!(
        took < FAILOVER_LIMIT,
        "the failover took {took:?}, more than {FAILOVER_LIMIT:?}"
    );
    let in_service = lab.gateways_in_service();
    assert!(in_service[other], "{} is out of service", alive.name);
    match failure {
        // Its connection closed when it died: out of service at once.
        Failure::Crash => assert!(
            !in_service[serving],
            "the portal keeps the dead {} in service",
            dead.name
        ),
        // Not three heartbeats missed yet: still in service at the portal, which picked the
        // other gateway because the client asked it to avoid this one.
        Failure::Hang => assert!(
            in_service[serving],
            "the portal took the hung {} out of service already: the test shows nothing of `avoid`",
            dead.name
        ),
    }
    lab.wait_metrics(other, "the client's peer at the other gateway", |m| {
        m.value("fz_gateway_peers") == 1 && m.value("fz_gateway_grants") == 1
    });
    assert!(
        lab.client
            .log_text()
            .contains("gateway silent; asking for another"),
        "the client did not say it left the silent gateway"
    );
    assert_eq!(lab.greeting(DB), format!("db {}", alive.lan));

    if failure == Failure::Hang {
        let patience = HANG_HEARTBEAT * 3 + WAIT;
        lab.wait_for(
            "the portal to take the hung gateway out of service",
            patience,
            |lab| {
                let in_service = lab.gateways_in_service();
                (!in_service[serving] && in_service[other]).then_some(())
            },
        );
        let _ = writeln!(
            std::io::stderr(),
            "failover ({failure:?}): the portal took {} out of service {:.2} s after it hung",
            dead.name,
            stopped.elapsed().as_secs_f64()
        );
        assert!(
            lab.portal
                .log_text()
                .contains("gateway missed its heartbeats"),
            "the portal did not say why it took the gateway out of service"
        );
    }
}

/// A token file others can read: the client refuses to start (exit code 2), says why, and
/// touches nothing. This needs no root and no namespace: the check comes before anything else.
#[test]
fn a_token_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("client.token");
    std::fs::write(&token, "fzt_secret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let resolv_conf = dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, CLIENT_RESOLV_CONF).unwrap();
    let key = fz_proto::PortalSigningKey::from_seed([1; 32])
        .public_key()
        .to_string();
    let log = dir.path().join("client.log");
    let output = File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fz-client"))
        .args([
            "--portal-url",
            "ws://127.0.0.1:9",
            "--account",
            ACCOUNT,
            "--token-file",
            token.to_str().unwrap(),
            "--portal-key",
            &key,
            "--tun",
            "fzc-refused",
            "--key-file",
            dir.path().join("client.key").to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--resolv-conf",
            resolv_conf.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, WAIT).unwrap_or_else(|| {
        let _ = stop(&mut child, WAIT);
        panic!(
            "fz-client ran on with a world-readable token file; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{status}; it said:\n{said}");
    assert!(
        said.contains("is readable by group or others (mode 644)"),
        "it does not say why:\n{said}"
    );
    assert!(
        !dir.path().join("client.key").exists(),
        "a key was made before the token was checked"
    );
    assert!(
        !dir.path().join("state").exists(),
        "the state directory was touched"
    );
    assert_eq!(
        std::fs::read_to_string(&resolv_conf).unwrap(),
        CLIENT_RESOLV_CONF
    );
}

// ---- the world ----

/// A rule taken out of the tree closes its resource within this.
const WITHDRAWAL: Duration = Duration::from_secs(5);
/// The failover must be done within this (ten seconds of silence, then the portal).
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// How long the failover test keeps trying, to measure a failover that is too slow.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(40);
/// The gateways' heartbeat in the hang test: three missed (24 s) take a gateway out of service
/// at the portal, 16 s after it hangs at the earliest, well after the client leaves it (6 s).
const HANG_HEARTBEAT: Duration = Duration::from_secs(8);

const ACCOUNT: &str = "acme";
const USER: &str = "alice@acme.example";
const PORTAL_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)), 8080);
const WAN_DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const WAN_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)), 7000);
const CLIENT_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
/// The stub's first sentinel: the address the switched resolver configuration names.
const SENTINEL: &str = "100.100.111.1";
const CLIENT_TUN: &str = "fzc0";
const GATEWAY_TUN: &str = "fzgw0";
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9101);
const DB: &str = "10.0.5.10:5432";
const SSH: &str = "10.0.5.10:22";
const SITE: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 10);
const SITE_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 53);

/// The client namespace's resolver configuration before the client starts, and after.
const CLIENT_RESOLV_CONF: &str = concat!(
    "# the client namespace's own resolver (fz netns test)\n",
    "nameserver 198.18.1.1\n",
    "options timeout:2\n",
);

const POLICY: &str = r#"site hq

resource db { address "10.0.5.0/24"; site hq; ports tcp/5432, icmp }
resource gitlab { address "gitlab.company.com"; site hq; ports tcp/80 }

group engineering { members "alice@acme.example" }

allow engineering -> db, gitlab as eng
"#;

#[derive(Clone, Copy, Debug)]
struct GatewaySpec {
    name: &'static str,
    wan: &'static str,
    lan: Ipv4Addr,
}

const GATEWAYS: [GatewaySpec; 2] = [
    GatewaySpec {
        name: "gw-a",
        wan: "198.18.1.11",
        lan: Ipv4Addr::new(10, 0, 5, 1),
    },
    GatewaySpec {
        name: "gw-b",
        wan: "198.18.1.12",
        lan: Ipv4Addr::new(10, 0, 5, 2),
    },
];

/// One test's world. Fields drop in order: the client first (it restores the resolver while
/// its namespace is there), the gateways, the portal, the runtime with the servers on it, then
/// the namespaces and files.
struct Lab {
    client: Process,
    gateways: [Process; 2],
    portal: Process,
    _runtime: tokio::runtime::Runtime,
    client_ns: Netns,
    portal_ns: Netns,
    gateway_ns: [Netns; 2],
    _site_ns: Netns,
    _etc: Vec<RemoveDir>,
    client_etc: PathBuf,
    portal_config: PathBuf,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Builds the world for `test` and runs `body` in it, or skips loudly without root.
    fn run(test: &str, body: impl FnOnce(&mut Lab)) {
        Lab::run_with(test, None, body);
    }

    /// [`Lab::run`], with the gateways' heartbeat interval set in the portal's configuration.
    fn run_with(test: &str, heartbeat: Option<Duration>, body: impl FnOnce(&mut Lab)) {
        fz_host::testing::run_as_root(test, || Lab::new(heartbeat), body);
    }

    /// The world, or why it cannot be made here (no network namespaces in this container, say).
    fn new(heartbeat: Option<Duration>) -> Result<Lab, String> {
        let gateway_bin = binary("fz-gateway");
        let id = unique_id();
        let client_ns = Netns::add(format!("fzc-{id}-client"))
            .map_err(|error| format!("cannot make a network namespace: {error}"))?;
        let portal_ns = Netns::add(format!("fzc-{id}-portal")).unwrap();
        let gateway_ns = [
            Netns::add(format!("fzc-{id}-gw-a")).unwrap(),
            Netns::add(format!("fzc-{id}-gw-b")).unwrap(),
        ];
        let site_ns = Netns::add(format!("fzc-{id}-site")).unwrap();

        // The wan: a bridge in the portal's namespace, which also holds the portal's address.
        bridge(&portal_ns, &["198.18.1.1/24"]);
        port(&portal_ns, "wan-c", &client_ns, "eth0", "198.18.1.10/24");
        // The client's default route leads off the tunnel, to the wan.
        client_ns
            .ip(&["route", "add", "default", "via", "198.18.1.1"])
            .unwrap();
        // The lan: a bridge in the site's namespace, which holds the servers' addresses.
        bridge(&site_ns, &["10.0.5.10/24", "10.0.5.53/24"]);
        for ((spec, ns), (wan_port, lan_port)) in GATEWAYS
            .iter()
            .zip(&gateway_ns)
            .zip([("wan-a", "lan-a"), ("wan-b", "lan-b")])
        {
            port(
                &portal_ns,
                wan_port,
                ns,
                "eth0",
                &format!("{}/24", spec.wan),
            );
            port(&site_ns, lan_port, ns, "eth1", &format!("{}/24", spec.lan));
        }

        let mut etc = vec![etc_netns(&client_ns, CLIENT_RESOLV_CONF)];
        let client_etc = etc[0].path().to_owned();
        for ns in &gateway_ns {
            etc.push(etc_netns(ns, &format!("nameserver {SITE_DNS}\n")));
        }

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        start_servers(&runtime, &portal_ns, &site_ns);

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tree")).unwrap();
        std::fs::write(dir.path().join("tree/policy.fz"), POLICY).unwrap();
        let portal_config = dir.path().join("portal.toml");
        let mut config = format!(
            "listen = \"{PORTAL_LISTEN}\"\nallow_plain_http = true\ndata_dir = \"{}\"\n",
            dir.path().join("portal-data").display(),
        );
        if let Some(heartbeat) = heartbeat {
            config += &format!(
                "gateway_heartbeat_interval_ms = {}\n",
                heartbeat.as_millis()
            );
        }
        config += &format!(
            "\n[[accounts]]\nslug = \"{ACCOUNT}\"\npolicy = \"{}\"\n",
            dir.path().join("tree").display(),
        );
        std::fs::write(&portal_config, config).unwrap();
        let config = portal_config.to_str().unwrap();
        let portal = Process::start(
            "the portal",
            &portal_ns,
            &binary("fz-portal"),
            &["serve", "--config", config],
            "info",
            dir.path().join("portal.log"),
        );
        fz_host::testing::wait_for(
            "the portal's /healthz",
            WAIT,
            |what| portal.assert_running(what),
            || portal_ns.run(|| http_get(PORTAL_LISTEN, "/healthz")).ok(),
        );

        let admin = |args: &[&str]| admin(&portal_ns, &portal_config, args);
        let portal_key = admin(&["public-key"]).trim().to_owned();
        let mut gateways = Vec::new();
        for ((spec, ns), name) in GATEWAYS.iter().zip(&gateway_ns).zip(["a", "b"]) {
            let token = secret_file(
                dir.path(),
                &format!("gw-{name}.token"),
                &admin(&[
                    "token",
                    "create",
                    "--account",
                    ACCOUNT,
                    "--gateway",
                    spec.name,
                    "--site",
                    "hq",
                ]),
            );
            let listen = format!("{}:51820", spec.wan);
            gateways.push(Process::start(
                spec.name,
                ns,
                &gateway_bin,
                &[
                    "--portal-url",
                    &format!("ws://{PORTAL_LISTEN}"),
                    "--account",
                    ACCOUNT,
                    "--token-file",
                    token.to_str().unwrap(),
                    "--portal-key",
                    &portal_key,
                    "--listen",
                    &listen,
                    "--tun",
                    GATEWAY_TUN,
                    "--key-file",
                    dir.path().join(format!("gw-{name}.key")).to_str().unwrap(),
                    "--metrics",
                    &METRICS.to_string(),
                ],
                "info,fz_gateway=debug,fz_tunnel=debug",
                dir.path().join(format!("gw-{name}.log")),
            ));
        }
        let gateways: [Process; 2] = gateways.try_into().ok().unwrap();
        // Both gateways are in service before the client asks for anything.
        for ((process, ns), spec) in gateways.iter().zip(&gateway_ns).zip(GATEWAYS) {
            fz_host::testing::metrics::wait_metrics(
                ns,
                METRICS,
                &format!("{} to connect to the portal", spec.name),
                WAIT,
                |what| {
                    process.assert_running(what);
                    portal.assert_running(what);
                },
                |m| m.value("fz_gateway_portal_connected") == 1,
            );
        }

        let client_token = secret_file(
            dir.path(),
            "client.token",
            &admin(&[
                "token",
                "create",
                "--account",
                ACCOUNT,
                "--client",
                "laptop",
                "--user",
                USER,
            ]),
        );
        // The key file and the state directory are apart, and the state directory does not
        // exist yet: fz-client makes it.
        let client = Process::start(
            "the client",
            &client_ns,
            Path::new(env!("CARGO_BIN_EXE_fz-client")),
            &[
                "--portal-url",
                &format!("ws://{PORTAL_LISTEN}"),
                "--account",
                ACCOUNT,
                "--token-file",
                client_token.to_str().unwrap(),
                "--portal-key",
                &portal_key,
                "--tun",
                CLIENT_TUN,
                "--key-file",
                dir.path().join("client.key").to_str().unwrap(),
                "--state-dir",
                dir.path().join("state").to_str().unwrap(),
                "--resolv-conf",
                "/etc/resolv.conf",
            ],
            "info,fz_client=debug,fz_tunnel=debug,fz_dns=debug",
            dir.path().join("client.log"),
        );

        let lab = Lab {
            client,
            gateways,
            portal,
            _runtime: runtime,
            client_ns,
            portal_ns,
            gateway_ns,
            _site_ns: site_ns,
            _etc: etc,
            client_etc,
            portal_config,
            dir,
        };
        // Up: the resolver switched to the stub, and (after the portal's `ready`) the
        // resources' and the mapped range's routes into the TUN device.
        lab.wait_for("the client's resolver switch and routes", WAIT, |lab| {
            let resolv = lab.client_resolv_conf();
            let routes = lab
                .client_ns
                .ip(&["-4", "route", "show", "dev", CLIENT_TUN])
                .ok()?;
            (resolv.contains(SENTINEL)
                && routes.contains("10.0.5.0/24")
                && routes.contains("100.96.0.0/11"))
            .then_some(())
        });
        Ok(lab)
    }

    // ---- the client's view ----

    fn client_resolv_conf(&self) -> String {
        std::fs::read_to_string(self.client_etc.join("resolv.conf")).unwrap()
    }

    /// `dig +short name` in the client namespace, with its resolver configuration.
    fn dig(&self, name: &str) -> Vec<String> {
        let answer = self
            .client_ns
            .exec("dig", &["+short", "+time=5", "+tries=1", name])
            .unwrap_or_else(|error| panic!("dig {name} failed: {error}"));
        answer.lines().map(str::to_owned).collect()
    }

    /// `GET /` from `name`'s web server, as an application in the client namespace would: the
    /// name through the host's resolver (`getent ahosts`, A and AAAA), then HTTP to the first
    /// IPv4 address it gives. The page, without its line end.
    fn web_page(&self, name: &str) -> String {
        let resolved = self
            .client_ns
            .exec("getent", &["ahosts", name])
            .unwrap_or_else(|error| panic!("the host's resolver does not know {name}: {error}"));
        let addresses: Vec<IpAddr> = resolved
            .lines()
            .filter_map(|line| line.split_whitespace().next()?.parse().ok())
            .collect();
        let Some(&address) = addresses.iter().find(|a| a.is_ipv4()) else {
            panic!("no IPv4 address for {name}: {resolved}");
        };
        for address in &addresses {
            assert!(
                matches!(address, IpAddr::V4(v4) if is_mapped(*v4)),
                "{name} resolved to {address}, not a mapped address: {resolved}"
            );
        }
        let to = SocketAddr::new(address, 80);
        let response = self
            .client_ns
            .run(|| -> std::io::Result<String> {
                let mut stream = TcpStream::connect_timeout(&to, WAIT)?;
                stream.set_read_timeout(Some(WAIT))?;
                write!(stream, "GET / HTTP/1.0\r\nHost: {name}\r\n\r\n")?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                Ok(response)
            })
            .unwrap_or_else(|error| panic!("no page from {name} at {to}: {error}"));
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            panic!("not HTTP from {name} at {to}: {response:?}");
        };
        assert!(head.starts_with("HTTP/1.0 200"), "{name} at {to}: {head}");
        body.trim_end().to_owned()
    }

    /// Connects from the client namespace to `to` and reads the server's greeting line.
    fn greeting(&self, to: &str) -> String {
        fz_host::testing::net::greeting(&self.client_ns, to)
    }

    /// Checks that a connection from the client namespace to `to` does not come up.
    fn cannot_connect(&self, to: &str) {
        fz_host::testing::net::cannot_connect(&self.client_ns, to);
    }

    /// Which gateway a site server's greeting (`<name> <address>`) came through.
    fn gateway_of(&self, greeting: &str, name: &str) -> usize {
        GATEWAYS
            .iter()
            .position(|spec| greeting == format!("{name} {}", spec.lan))
            .unwrap_or_else(|| panic!("a greeting through no gateway: {greeting:?}"))
    }

    // ---- the portal ----

    /// An admin command on the portal's store, in the portal's namespace.
    fn admin(&self, args: &[&str]) -> String {
        admin(&self.portal_ns, &self.portal_config, args)
    }

    /// Whether the portal counts each gateway in service (`fz-portal gateways`), in the order
    /// of [`GATEWAYS`].
    fn gateways_in_service(&self) -> [bool; 2] {
        let listed = self.admin(&["gateways", "--account", ACCOUNT, "--json"]);
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        GATEWAYS.map(|spec| {
            let entry = listed
                .as_array()
                .and_then(|all| all.iter().find(|g| g["name"] == spec.name))
                .unwrap_or_else(|| panic!("the portal lists no {}: {listed}", spec.name));
            entry["connected"]
                .as_bool()
                .unwrap_or_else(|| panic!("no `connected` in {entry}"))
        })
    }

    /// The account's bundle hash, from `/healthz`.
    fn bundle_hash(&self) -> String {
        let body = self
            .portal_ns
            .run(|| http_get(PORTAL_LISTEN, "/healthz"))
            .unwrap_or_else(|error| panic!("no /healthz: {error}"));
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        health["accounts"][0]["bundle_hash"]
            .as_str()
            .unwrap_or_else(|| panic!("no bundle hash in {health}"))
            .to_owned()
    }

    /// Replaces the policy tree's file at once (a rename), as an editor or `git` would.
    fn write_policy(&self, text: &str) {
        let next = self.dir.path().join("policy.fz.next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, self.dir.path().join("tree/policy.fz")).unwrap();
    }

    // ---- the gateways ----

    fn metrics(&self, gateway: usize) -> Metrics {
        self.gateway_ns[gateway]
            .run(|| scrape(METRICS))
            .unwrap_or_else(|error| {
                panic!("cannot read {}'s metrics: {error}", GATEWAYS[gateway].name)
            })
    }

    /// Waits until a gateway's metrics satisfy `holds` and returns them. The gateway
    /// publishes them about once a second.
    fn wait_metrics(
        &self,
        gateway: usize,
        what: &str,
        holds: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        fz_host::testing::metrics::wait_metrics(
            &self.gateway_ns[gateway],
            METRICS,
            &format!("{what} at {}", GATEWAYS[gateway].name),
            WAIT,
            |what| self.assert_running(what),
            holds,
        )
    }

    // ---- waiting ----

    /// Fails at once, with its log, if any process the test did not stop has exited.
    fn assert_running(&self, waiting_for: &str) {
        self.client.assert_running(waiting_for);
        for gateway in &self.gateways {
            gateway.assert_running(waiting_for);
        }
        self.portal.assert_running(waiting_for);
    }

    /// Waits until `probe` gives something, failing at the deadline or as soon as a process
    /// exits.
    fn wait_for<T>(
        &self,
        what: &str,
        patience: Duration,
        mut probe: impl FnMut(&Lab) -> Option<T>,
    ) -> T {
        fz_host::testing::wait_for(
            what,
            patience,
            |what| self.assert_running(what),
            || probe(self),
        )
    }
}

fn is_mapped(address: Ipv4Addr) -> bool {
    u32::from(address) & 0xffe0_0000 == u32::from(Ipv4Addr::new(100, 96, 0, 0))
}

// ---- the servers ----

/// The names the client's original resolver knows.
const WAN_ZONE: &[(&str, Ipv4Addr)] = &[("www.example.org.", Ipv4Addr::new(192, 0, 2, 80))];
/// The names the site's DNS server (the gateways' resolver) knows.
const SITE_ZONE: &[(&str, Ipv4Addr)] = &[("gitlab.company.com.", SITE)];

/// In the portal's namespace, the client's original DNS server and a greeter off the tunnel;
/// at the site, the DNS server, the greeters for db and ssh, and gitlab's web server.
fn start_servers(runtime: &tokio::runtime::Runtime, portal_ns: &Netns, site_ns: &Netns) {
    let (wan_dns, wan_greeter) = portal_ns.run(|| {
        (
            udp_socket(SocketAddr::new(IpAddr::V4(WAN_DNS), 53)),
            tcp_listener(WAN_SERVER),
        )
    });
    let (site_dns, db, ssh, web) = site_ns.run(|| {
        (
            udp_socket(SocketAddr::new(IpAddr::V4(SITE_DNS), 53)),
            tcp_listener(SocketAddr::new(IpAddr::V4(SITE), 5432)),
            tcp_listener(SocketAddr::new(IpAddr::V4(SITE), 22)),
            tcp_listener(SocketAddr::new(IpAddr::V4(SITE), 80)),
        )
    });
    let _guard = runtime.enter();
    runtime.spawn(serve_dns(wan_dns, WAN_ZONE));
    runtime.spawn(serve_dns(site_dns, SITE_ZONE));
    runtime.spawn(greet(wan_greeter, "wan"));
    runtime.spawn(greet(db, "db"));
    runtime.spawn(greet(ssh, "ssh"));
    runtime.spawn(serve_web(web));
}

/// A minimal HTTP/1.0 server: reads the request's head, answers `gitlab page from <peer>`.
async fn serve_web(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            let read_head = async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16_384 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return false,
                        Ok(length) => request.extend_from_slice(&buffer[..length]),
                    }
                }
                true
            };
            if !tokio::time::timeout(WAIT, read_head).await.unwrap_or(false) {
                return;
            }
            let body = format!("gitlab page from {}\n", peer.ip());
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
