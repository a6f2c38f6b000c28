#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `fz-gateway` binary between a client and a site, each in a network namespace of its
//! own, driven by a test portal. Needs root, iproute2 and nftables (see `fz_host::testing`).
//!
//! ```text
//!  client ns                         gw ns                               site ns
//!  fzc0 100.64.0.2/32  ┐             fz-gateway (ip netns exec)         10.0.5.10 :5432 db
//!   routes 10.0.5.0/24 │  eth0       client0          site0      eth0              :22 ssh
//!   and 100.96.0.0/11  ├─ 198.18.1.2 ── 198.18.1.1   10.0.5.1 ── 10.0.5.10         :80 web
//!  boringtun client ───┘  (veth)      :51820 WireGuard    (veth)  10.0.5.53 :53 DNS
//!   (this process)                    test portal on 127.0.0.1 (this process)
//!                                     metrics on 127.0.0.1:9100
//! ```
//!
//! The client's tunnel is this process: tasks move packets between the TUN device `fzc0`, a
//! boringtun `Tunn` and a UDP socket to the gateway, so an ordinary `connect` made in the
//! client namespace goes through the real gateway. The site's servers greet with their name
//! and the address they saw the connection come from (`db 10.0.5.1`), which shows the
//! gateway's masquerade. The site's DNS server knows `gitlab.company.com` and
//! `jenkins.company.com` (both 10.0.5.10, one real address behind two names) and says NXDOMAIN
//! to everything else; `ip netns exec` gives the gateway `/etc/netns/<gw>/resolv.conf`, which
//! points at it. The test portal checks the gateway token, answers `hello` with `ready` (listing
//! the grants the test says are in force), and lets the test push grants and revokes, read the
//! gateway's answers, and drop the connection or turn reconnections away.
//!
//! Sockets keep the namespace they were made in, so each one is made on a short-lived thread
//! that has entered the right namespace (`Netns::run`) and then served by one tokio runtime.
//! Every test builds its own topology under names unique to the process and the test; guards
//! stop the gateway and delete namespaces and files also when a test fails, and print the
//! gateway's log then. Nothing waits by sleeping: each step waits for what it needs (an answer
//! from the portal, a counter in the gateway's metrics, a greeting) within a deadline.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as sync_mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use futures_util::{SinkExt as _, StreamExt as _};
use fz_host::testing::metrics::{Metrics, scrape};
use fz_host::testing::net::{greet, serve_dns, tcp_listener, udp_socket};
use fz_host::testing::netns::{Netns, RemoveDir, etc_netns, link, unique_id};
use fz_host::testing::process::Process;
use fz_host::testing::{WAIT, cidr};
use fz_host::tun::{Tun, WriteBatch};
use fz_proto::{
    ClientPeer, DnsMapping, GatewayMessage, GatewayPeer, Grant, GrantedResource, PortalSigningKey,
    PortalToGateway, PresharedKey, PublicKey, Resolution, SignedGrant,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

// ---- the scenarios ----

/// A gateway answers nobody it holds no grant for: not the client's handshake before its
/// grant, not junk, not a forged handshake. Only once the grant is in does the same client's
/// handshake get an answer, which also shows the silent part was heard and dropped.
#[test]
fn a_gateway_answers_no_key_without_a_grant() {
    Lab::run("a_gateway_answers_no_key_without_a_grant", |lab| {
        let socket = lab
            .client
            .run(|| UdpSocket::bind((CLIENT_UNDERLAY, 0)))
            .unwrap();
        let mut tunnel = lab.client_tunn();
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(initiation) =
            tunnel.format_handshake_initiation(&mut buf, false)
        else {
            panic!("boringtun made no handshake initiation");
        };
        socket.send_to(initiation, GATEWAY_UNDERLAY).unwrap();
        socket
            .send_to(b"GET / HTTP/1.0\r\n\r\n", GATEWAY_UNDERLAY)
            .unwrap();
        // The size and type of a handshake initiation, but the MACs are made up.
        let mut forged = [0x5au8; 148];
        forged[..4].copy_from_slice(&[1, 0, 0, 0]);
        socket.send_to(&forged, GATEWAY_UNDERLAY).unwrap();

        let seen = lab.wait_metrics("all three datagrams dropped", |m| {
            m.dropped("unknown_key") >= 1
                && m.dropped("not_wireguard") >= 1
                && m.dropped("bad_mac") >= 1
        });
        assert_eq!(seen.value("fz_gateway_handshakes_total"), 0);
        assert_eq!(seen.value("fz_gateway_peers"), 0);
        assert_eq!(seen.value("fz_gateway_peers_active"), 0);
        // The gateway handled all three (the counters say so) and answers in the same step
        // as it drops, so any answer would be here by now.
        socket.set_nonblocking(true).unwrap();
        match socket.recv_from(&mut buf) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok((len, from)) => panic!("the gateway answered {len} bytes from {from}"),
            Err(error) => panic!("the client's socket got an error (an ICMP answer?): {error}"),
        }

        let grant = lab.grant_ip("10.0.5.10", &["tcp/5432"]);
        lab.install(&grant);
        let TunnResult::WriteToNetwork(initiation) =
            tunnel.format_handshake_initiation(&mut buf, true)
        else {
            panic!("boringtun made no second handshake initiation");
        };
        socket.send_to(initiation, GATEWAY_UNDERLAY).unwrap();
        socket.set_nonblocking(false).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let (len, from) = socket
            .recv_from(&mut buf)
            .expect("no handshake response once the grant is in");
        assert_eq!(from, GATEWAY_UNDERLAY);
        let mut out = vec![0u8; 2048];
        let answer = tunnel.decapsulate(Some(from.ip()), &buf[..len], &mut out);
        assert!(
            matches!(answer, TunnResult::WriteToNetwork(_)),
            "the answer is no handshake response the client accepts: {answer:?}"
        );
        lab.wait_metrics("the handshake counted", |m| {
            m.value("fz_gateway_handshakes_total") >= 1
                && m.value("fz_gateway_peers") == 1
                && m.value("fz_gateway_peers_active") == 1
        });
    });
}

/// An IP grant with a port filter: its port answers through the tunnel, from the gateway's
/// masqueraded address; another port of the same host does not.
#[test]
fn an_ip_grant_opens_its_port_and_no_other() {
    Lab::run("an_ip_grant_opens_its_port_and_no_other", |lab| {
        let grant = lab.grant_ip("10.0.5.10", &["tcp/5432"]);
        lab.install(&grant);
        assert_eq!(lab.greeting(DB), "db 10.0.5.1");
        lab.wait_metrics("one peer with one grant", |m| {
            m.value("fz_gateway_peers") == 1
                && m.value("fz_gateway_grants") == 1
                && m.value("fz_gateway_handshakes_total") >= 1
        });

        let before = lab.metrics().dropped("port_not_granted");
        lab.cannot_connect(SSH);
        lab.wait_metrics("the SYN to port 22 dropped", |m| {
            m.dropped("port_not_granted") > before
        });
        // The refusal closed nothing: the granted port still answers.
        assert_eq!(lab.greeting(DB), "db 10.0.5.1");
    });
}

/// A DNS grant: the gateway resolves the name with the site's DNS server (as the host's
/// resolver), says what it found, and translates the client's mapped address to the real
/// one. Another name on the same real address stays closed, and so does the real address.
#[test]
fn a_dns_grant_reaches_its_name_and_not_another_name_on_the_same_address() {
    Lab::run(
        "a_dns_grant_reaches_its_name_and_not_another_name_on_the_same_address",
        |lab| {
            let gitlab = lab.grant_dns("gitlab.company.com", "100.96.0.1", &["tcp/80"]);
            assert_eq!(
                lab.send_grant(&gitlab),
                GatewayMessage::Ack {
                    grant_id: gitlab.grant.id.clone(),
                    resolved: Some(Resolution::Exists {
                        ipv4: true,
                        ipv6: false
                    }),
                }
            );
            let nope = lab.grant_dns("nope.company.com", "100.96.0.3", &["tcp/80"]);
            assert_eq!(
                lab.send_grant(&nope),
                GatewayMessage::Ack {
                    grant_id: nope.grant.id.clone(),
                    resolved: Some(Resolution::NoSuchName),
                }
            );

            assert_eq!(lab.greeting("100.96.0.1:80"), "web 10.0.5.1");

            // jenkins.company.com is 10.0.5.10 too, but no grant maps it: its would-be mapped
            // address leads nowhere, and neither does the real address behind both names.
            for (closed, what) in [
                ("100.96.0.2:80", "jenkins's mapped address"),
                ("10.0.5.10:80", "the real address"),
            ] {
                let before = lab.metrics().dropped("destination_not_granted");
                lab.cannot_connect(closed);
                lab.wait_metrics(&format!("the SYN to {what} dropped"), |m| {
                    m.dropped("destination_not_granted") > before
                });
            }
            assert_eq!(lab.greeting("100.96.0.1:80"), "web 10.0.5.1");
        },
    );
}

/// A name whose DNS server never answers (as under a lame delegation) gets its grant refused,
/// saying why, before the portal would give up waiting for the gateway's answer (its default
/// acknowledgement timeout): the resolver's budget sits inside it. The gateway answers the
/// next grants as ever, and one naming the same name again is refused at once from what it
/// remembers.
#[test]
fn a_name_that_never_resolves_is_refused_in_time_and_the_gateway_serves_on() {
    Lab::run(
        "a_name_that_never_resolves_is_refused_in_time_and_the_gateway_serves_on",
        |lab| {
            let patience = Duration::from_millis(fz_proto::DEFAULT_ACK_TIMEOUT_MS);
            let lame = lab.grant_dns("www.lame.company.com", "100.96.0.5", &["tcp/80"]);
            // The resolver's reason (its queries timed out) or the budget's, whichever ends it.
            match lab.send_grant_within(&lame, patience) {
                GatewayMessage::Refused { grant_id, reason } => {
                    assert_eq!(grant_id, lame.grant.id);
                    assert!(
                        reason.starts_with("cannot resolve `www.lame.company.com`: "),
                        "{reason}"
                    );
                }
                other => panic!("expected the grant refused, got {other:?}"),
            }

            let gitlab = lab.grant_dns("gitlab.company.com", "100.96.0.1", &["tcp/80"]);
            assert_eq!(
                lab.send_grant(&gitlab),
                GatewayMessage::Ack {
                    grant_id: gitlab.grant.id.clone(),
                    resolved: Some(Resolution::Exists {
                        ipv4: true,
                        ipv6: false
                    }),
                }
            );
            assert_eq!(lab.greeting("100.96.0.1:80"), "web 10.0.5.1");
            let again = lab.grant_dns("www.lame.company.com", "100.96.0.5", &["tcp/80"]);
            assert!(matches!(
                lab.send_grant_within(&again, patience),
                GatewayMessage::Refused { reason, .. } if reason.starts_with("cannot resolve")
            ));
        },
    );
}

/// Revoking a grant closes it at once, leaves the client's other grant working, and revoking
/// the last one takes the client's peer away.
#[test]
fn a_revoke_closes_its_grant_and_the_last_takes_the_peer() {
    Lab::run(
        "a_revoke_closes_its_grant_and_the_last_takes_the_peer",
        |lab| {
            let db = lab.grant_ip("10.0.5.10", &["tcp/5432"]);
            let ssh = lab.grant_ip("10.0.5.10", &["tcp/22"]);
            lab.install(&db);
            lab.install(&ssh);
            assert_eq!(lab.greeting(DB), "db 10.0.5.1");
            assert_eq!(lab.greeting(SSH), "ssh 10.0.5.1");

            lab.portal.send(PortalToGateway::Revoke {
                grant_id: db.grant.id.clone(),
            });
            let before = lab.wait_metrics("one grant left", |m| {
                m.value("fz_gateway_grants") == 1 && m.value("fz_gateway_peers") == 1
            });
            lab.cannot_connect(DB);
            lab.wait_metrics("the SYN to the revoked port dropped", |m| {
                m.dropped("port_not_granted") > before.dropped("port_not_granted")
            });
            assert_eq!(lab.greeting(SSH), "ssh 10.0.5.1");

            lab.portal.send(PortalToGateway::Revoke {
                grant_id: ssh.grant.id.clone(),
            });
            let before = lab.wait_metrics("no grant and no peer left", |m| {
                m.value("fz_gateway_grants") == 0 && m.value("fz_gateway_peers") == 0
            });
            lab.cannot_connect(SSH);
            // The client still seals with its old session; the gateway knows it no more.
            lab.wait_metrics("the client's packet to a gone peer dropped", |m| {
                m.dropped("unknown_session") > before.dropped("unknown_session")
            });
        },
    );
}

/// The portal goes away: tunnels keep carrying new connections, the gateway comes back by
/// itself, and the `ready` of the new connection prunes the grants it no longer lists.
#[test]
fn tunnels_outlive_the_portal_and_ready_prunes_what_it_no_longer_lists() {
    Lab::run(
        "tunnels_outlive_the_portal_and_ready_prunes_what_it_no_longer_lists",
        |lab| {
            let db = lab.grant_ip("10.0.5.10", &["tcp/5432"]);
            let ssh = lab.grant_ip("10.0.5.10", &["tcp/22"]);
            lab.install(&db);
            lab.install(&ssh);
            assert_eq!(lab.greeting(DB), "db 10.0.5.1");
            lab.wait_metrics("connected", |m| m.value("fz_gateway_portal_connected") == 1);

            lab.portal.turn_away(true);
            lab.portal.drop_connection();
            lab.wait_portal("the connection to end", |event| {
                matches!(event, PortalEvent::Closed).then_some(())
            });
            lab.wait_metrics("the gateway to see the portal gone", |m| {
                m.value("fz_gateway_portal_connected") == 0
            });
            lab.wait_for("the gateway to try again and be turned away", |lab| {
                (lab.portal.shared.turned_away.load(Ordering::SeqCst) >= 1).then_some(())
            });
            assert_eq!(lab.greeting(DB), "db 10.0.5.1");
            assert_eq!(lab.greeting(SSH), "ssh 10.0.5.1");

            // While it was away the portal withdrew the ssh grant.
            lab.portal.set_in_force(vec![db.grant.id.clone()]);
            lab.portal.turn_away(false);
            lab.wait_portal("a new hello", |event| {
                matches!(event, PortalEvent::Hello { .. }).then_some(())
            });
            let before = lab.wait_metrics("back, with the db grant only", |m| {
                m.value("fz_gateway_portal_connected") == 1
                    && m.value("fz_gateway_grants") == 1
                    && m.value("fz_gateway_peers") == 1
            });
            lab.cannot_connect(SSH);
            lab.wait_metrics("the SYN to the pruned port dropped", |m| {
                m.dropped("port_not_granted") > before.dropped("port_not_granted")
            });
            assert_eq!(lab.greeting(DB), "db 10.0.5.1");
            // The portal sends the grants in force again; the gateway gives the same answer.
            lab.install(&db);
            assert_eq!(lab.greeting(DB), "db 10.0.5.1");
        },
    );
}

/// SIGTERM: the gateway exits 0 and leaves nothing behind in its namespace: no nftables
/// table, no TUN device (and with it no routes).
#[test]
fn sigterm_exits_zero_and_removes_the_table_and_the_device() {
    Lab::run(
        "sigterm_exits_zero_and_removes_the_table_and_the_device",
        |lab| {
            let table = fz_host::firewall::table_name(GATEWAY_TUN);
            assert_eq!(table, format!("fz_gateway_{GATEWAY_TUN}"));
            let tables = lab.gw.exec("nft", &["list", "tables"]).unwrap();
            assert!(tables.contains(&format!("table inet {table}")), "{tables}");
            let link = lab.gw.ip(&["-o", "link", "show", "dev", GATEWAY_TUN]);
            assert!(link.is_ok(), "no TUN device: {link:?}");
            let routes = lab
                .gw
                .ip(&["-4", "route", "show", "dev", GATEWAY_TUN])
                .unwrap();
            assert!(routes.contains("100.64.0.0/11"), "{routes}");
            let routes = lab
                .gw
                .ip(&["-6", "route", "show", "dev", GATEWAY_TUN])
                .unwrap();
            assert!(routes.contains("fd00:2021:1111::/107"), "{routes}");
            let key_mode = std::fs::metadata(lab.dir.path().join("gateway.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(key_mode & 0o777, 0o600, "the key file's mode");
            lab.wait_for("a heartbeat", |lab| {
                (lab.portal.shared.heartbeats.load(Ordering::SeqCst) >= 1).then_some(())
            });

            let status = lab.gateway.terminate();
            assert_eq!(status.code(), Some(0), "{status}");
            let tables = lab.gw.exec("nft", &["list", "tables"]).unwrap();
            assert!(
                !tables.contains(&table),
                "the table outlived the gateway:\n{tables}"
            );
            let link = lab.gw.ip(&["-o", "link", "show", "dev", GATEWAY_TUN]);
            assert!(
                link.is_err(),
                "the TUN device outlived the gateway: {link:?}"
            );

            // A signal while the gateway is still setting up (its table is in, its loop not
            // yet running; the portal it names never answers) ends the same clean way.
            let starting = start_gateway(
                &lab.gw,
                &[
                    "--portal-url",
                    "ws://127.0.0.1:9",
                    "--account",
                    ACCOUNT,
                    "--token-file",
                    lab.dir.path().join("token").to_str().unwrap(),
                    "--portal-key",
                    &lab.signing.public_key().to_string(),
                    "--listen",
                    "198.18.1.1:51821",
                    "--tun",
                    "fzgw1",
                    "--key-file",
                    lab.dir.path().join("second.key").to_str().unwrap(),
                ],
                lab.dir.path().join("second.log"),
            );
            let second_table = fz_host::firewall::table_name("fzgw1");
            lab.wait_for("the second gateway's table", |lab| {
                starting.assert_running("its table");
                let tables = lab.gw.exec("nft", &["list", "tables"]).ok()?;
                tables.contains(&second_table).then_some(())
            });
            let status = starting.terminate();
            assert_eq!(status.code(), Some(0), "{status}");
            let tables = lab.gw.exec("nft", &["list", "tables"]).unwrap();
            assert!(
                !tables.contains(&second_table),
                "a signal during start-up left the table:\n{tables}"
            );
        },
    );
}

// ---- the topology ----

const ACCOUNT: &str = "acme";
const GATEWAY_ID: &str = "gw-netns";
const GATEWAY_TUN: &str = "fzgw0";
const CLIENT_TUN: &str = "fzc0";
const GATEWAY_UNDERLAY: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)), 51820);
const CLIENT_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0, 0, 0, 0, 2);
const CLIENT_SECRET: [u8; 32] = [2; 32];
const PRESHARED_KEY: [u8; 32] = [5; 32];
const DB: &str = "10.0.5.10:5432";
const SSH: &str = "10.0.5.10:22";
const HEARTBEAT_MS: u64 = 500;

/// One test's world. Fields drop in order: the gateway first, then the runtime with
/// everything on it (portal, site servers, the client's tunnel and TUN device), then the
/// namespaces and files.
struct Lab {
    gateway: Process,
    runtime: tokio::runtime::Runtime,
    portal: Portal,
    client: Netns,
    gw: Netns,
    _site: Netns,
    _resolv_conf: RemoveDir,
    dir: tempfile::TempDir,
    signing: PortalSigningKey,
    gateway_key: PublicKey,
    client_endpoint: SocketAddr,
    next_grant: u32,
}

impl Lab {
    /// Builds the world for `test` and runs `body` in it, or skips loudly without root.
    fn run(test: &str, body: impl FnOnce(&mut Lab)) {
        fz_host::testing::run_as_root(test, Lab::new, body);
    }

    /// The world, or why it cannot be made here (no network namespaces in this container, say).
    fn new() -> Result<Lab, String> {
        let id = unique_id();
        let client = Netns::add(format!("fz-{id}-client"))
            .map_err(|error| format!("cannot make a network namespace: {error}"))?;
        let gw = Netns::add(format!("fz-{id}-gw")).unwrap();
        let site = Netns::add(format!("fz-{id}-site")).unwrap();
        link(
            &gw,
            "client0",
            "198.18.1.1/24",
            &client,
            "eth0",
            "198.18.1.2/24",
        );
        link(&gw, "site0", "10.0.5.1/24", &site, "eth0", "10.0.5.10/24");
        site.ip(&["address", "add", "10.0.5.53/24", "dev", "eth0"])
            .unwrap();
        // The client's tunnel carries IPv4 only; without IPv6 its TUN device sends nothing
        // (router solicitations, MLD) that would start a handshake before a test means to.
        // (/proc/sys/net is the namespace of the thread that reads or writes it.)
        client.run(|| {
            for path in [
                "/proc/sys/net/ipv6/conf/all/disable_ipv6",
                "/proc/sys/net/ipv6/conf/default/disable_ipv6",
            ] {
                std::fs::write(path, "1").unwrap();
            }
        });
        let v6 = client.ip(&["-6", "address", "show"]).unwrap();
        assert!(v6.trim().is_empty(), "IPv6 still on in the client: {v6}");

        let resolv_conf = etc_netns(&gw, "nameserver 10.0.5.53\n");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        start_site(&runtime, &site);

        let dir = tempfile::tempdir().unwrap();
        let token = format!("gateway-token-{id}");
        let portal = Portal::start(&runtime, &gw, token.clone());
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let signing = PortalSigningKey::from_seed([7; 32]);
        let gateway = start_gateway(
            &gw,
            &[
                "--portal-url",
                &format!("ws://{}", portal.address),
                "--account",
                ACCOUNT,
                "--token-file",
                token_file.to_str().unwrap(),
                "--portal-key",
                &signing.public_key().to_string(),
                "--listen",
                &GATEWAY_UNDERLAY.to_string(),
                "--tun",
                GATEWAY_TUN,
                "--key-file",
                dir.path().join("gateway.key").to_str().unwrap(),
                "--metrics",
                &METRICS.to_string(),
            ],
            dir.path().join("gateway.log"),
        );

        let mut lab = Lab {
            gateway,
            runtime,
            portal,
            client,
            gw,
            _site: site,
            _resolv_conf: resolv_conf,
            dir,
            signing,
            gateway_key: PublicKey([0; 32]),
            client_endpoint: SocketAddr::new(IpAddr::V4(CLIENT_UNDERLAY), 0),
            next_grant: 0,
        };
        let (gateway_key, endpoints) =
            lab.wait_portal("the gateway's hello", |event| match event {
                PortalEvent::Hello {
                    public_key,
                    endpoints,
                } => Some((public_key, endpoints)),
                _ => None,
            });
        // Without `--endpoint`, the listen address is where clients reach the gateway.
        assert_eq!(endpoints, [GATEWAY_UNDERLAY]);
        lab.gateway_key = gateway_key;
        lab.wait_metrics("the metrics to be served", |_| true);
        lab.start_client_tunnel();
        Ok(lab)
    }

    /// The client's TUN device and the tasks that carry its packets through a boringtun
    /// tunnel to the gateway and back.
    fn start_client_tunnel(&mut self) {
        let handle = self.runtime.handle().clone();
        let (tun, udp) = self.client.run(move || {
            let _runtime = handle.enter();
            let tun = Tun::create(CLIENT_TUN, fz_host::tun::DEFAULT_MTU).unwrap();
            tun.add_address(cidr("100.64.0.2/32")).unwrap();
            tun.add_route(cidr("10.0.5.0/24")).unwrap();
            tun.add_route(cidr("100.96.0.0/11")).unwrap();
            let udp = UdpSocket::bind((CLIENT_UNDERLAY, 0)).unwrap();
            udp.set_nonblocking(true).unwrap();
            (tun, tokio::net::UdpSocket::from_std(udp).unwrap())
        });
        self.client_endpoint = udp.local_addr().unwrap();
        let tunnel = Arc::new(Mutex::new(self.client_tunn()));
        let (tun, udp) = (Arc::new(tun), Arc::new(udp));

        // Out: the kernel's packets, sealed, to the gateway.
        let (out_tun, out_udp, out_tunnel) = (tun.clone(), udp.clone(), tunnel.clone());
        self.runtime.spawn(async move {
            let (mut packets, mut sealed) = (out_tun.read_batch(), vec![0u8; 2048]);
            while out_tun.recv(&mut packets).await.is_ok() {
                for packet in packets.packets_mut() {
                    let datagram = match out_tunnel.lock().unwrap().encapsulate(packet, &mut sealed)
                    {
                        TunnResult::WriteToNetwork(bytes) => Some(bytes.to_vec()),
                        _ => None,
                    };
                    if let Some(datagram) = datagram {
                        let _ = out_udp.send_to(&datagram, GATEWAY_UNDERLAY).await;
                    }
                }
            }
        });
        // In: the gateway's datagrams, opened, to the kernel; handshake answers (and the
        // packets queued while the handshake ran) back to the gateway.
        let (in_tun, in_udp, in_tunnel) = (tun, udp.clone(), tunnel.clone());
        self.runtime.spawn(async move {
            let (mut datagram, mut opened) = (vec![0u8; 2048], vec![0u8; 2048]);
            loop {
                let Ok((len, from)) = in_udp.recv_from(&mut datagram).await else {
                    continue;
                };
                let (mut to_gateway, mut to_kernel) = (Vec::new(), Vec::new());
                {
                    let mut tunnel = in_tunnel.lock().unwrap();
                    match tunnel.decapsulate(Some(from.ip()), &datagram[..len], &mut opened) {
                        TunnResult::WriteToNetwork(bytes) => {
                            to_gateway.push(bytes.to_vec());
                            while let TunnResult::WriteToNetwork(bytes) =
                                tunnel.decapsulate(None, &[], &mut opened)
                            {
                                to_gateway.push(bytes.to_vec());
                            }
                        }
                        TunnResult::WriteToTunnelV4(packet, _)
                        | TunnResult::WriteToTunnelV6(packet, _) => to_kernel.push(packet.to_vec()),
                        TunnResult::Done | TunnResult::Err(_) => {}
                    }
                }
                for bytes in to_gateway {
                    let _ = in_udp.send_to(&bytes, GATEWAY_UNDERLAY).await;
                }
                let mut batch = WriteBatch::default();
                for packet in to_kernel {
                    batch.push(&packet);
                }
                let _ = in_tun.send(&mut batch).await;
            }
        });
        // WireGuard's timers: handshake retries, keepalives, rekeying.
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut buffer = vec![0u8; 2048];
            loop {
                tick.tick().await;
                let datagram = match tunnel.lock().unwrap().update_timers(&mut buffer) {
                    TunnResult::WriteToNetwork(bytes) => Some(bytes.to_vec()),
                    _ => None,
                };
                if let Some(datagram) = datagram {
                    let _ = udp.send_to(&datagram, GATEWAY_UNDERLAY).await;
                }
            }
        });
    }

    /// A boringtun peer with the client's key, for the gateway.
    fn client_tunn(&self) -> Tunn {
        Tunn::new(
            StaticSecret::from(CLIENT_SECRET),
            X25519Public::from(self.gateway_key.0),
            Some(PRESHARED_KEY),
            None,
            1,
            None,
        )
    }

    // ---- grants ----

    fn grant_ip(&mut self, address: &str, filter: &[&str]) -> SignedGrant {
        self.grant(address, filter, None)
    }

    fn grant_dns(&mut self, name: &str, mapped: &str, filter: &[&str]) -> SignedGrant {
        let dns = DnsMapping {
            name: name.to_owned(),
            mapped: vec![mapped.parse().unwrap()],
        };
        self.grant("*.company.com", filter, Some(dns))
    }

    fn grant(&mut self, address: &str, filter: &[&str], dns: Option<DnsMapping>) -> SignedGrant {
        self.next_grant += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let client_public = X25519Public::from(&StaticSecret::from(CLIENT_SECRET)).to_bytes();
        Grant {
            id: format!("gr-{}", self.next_grant),
            account: ACCOUNT.to_owned(),
            client: ClientPeer {
                id: "client-1".to_owned(),
                public_key: PublicKey(client_public),
                tunnel_ipv4: CLIENT_V4,
                tunnel_ipv6: CLIENT_V6,
                endpoints: vec![self.client_endpoint],
            },
            gateway: GatewayPeer {
                id: GATEWAY_ID.to_owned(),
                public_key: self.gateway_key,
                endpoints: vec![GATEWAY_UNDERLAY],
            },
            preshared_key: PresharedKey(PRESHARED_KEY),
            resource: GrantedResource {
                id: format!("resource-{}", self.next_grant),
                address: address.to_owned(),
                filter: Some(filter.iter().map(|f| (*f).to_owned()).collect()),
                except: Vec::new(),
                dns,
            },
            rule: "netns-test".to_owned(),
            bundle_hash: "netns-test".to_owned(),
            issued_at: now,
            expires_at: now + 3600,
        }
        .sign(&self.signing)
    }

    /// Sends a grant and waits for the gateway's answer to it.
    fn send_grant(&self, grant: &SignedGrant) -> GatewayMessage {
        self.send_grant_within(grant, WAIT)
    }

    /// Sends a grant and waits at most `patience` for the gateway's answer to it.
    fn send_grant_within(&self, grant: &SignedGrant, patience: Duration) -> GatewayMessage {
        let id = grant.grant.id.clone();
        self.portal.send(PortalToGateway::Grant {
            grant: Box::new(grant.clone()),
        });
        let what = format!("the answer to grant {id}");
        self.wait_portal_within(&what, patience, |event| match event {
            PortalEvent::Message(
                answer @ (GatewayMessage::Ack { .. } | GatewayMessage::Refused { .. }),
            ) if answer_to(&answer) == id => Some(answer),
            PortalEvent::Closed => panic!("the connection closed before grant {id} was answered"),
            _ => None,
        })
    }

    /// Sends an IP grant and checks it is acked.
    fn install(&self, grant: &SignedGrant) {
        assert_eq!(
            self.send_grant(grant),
            GatewayMessage::Ack {
                grant_id: grant.grant.id.clone(),
                resolved: None
            }
        );
    }

    // ---- the client's view ----

    /// Connects from the client namespace to `to` through the tunnel and reads the server's
    /// greeting line.
    fn greeting(&self, to: &str) -> String {
        fz_host::testing::net::greeting(&self.client, to)
    }

    /// Checks that a connection from the client namespace to `to` does not come up.
    fn cannot_connect(&self, to: &str) {
        fz_host::testing::net::cannot_connect(&self.client, to);
    }

    // ---- waiting ----

    /// Waits until `probe` gives something, failing at the deadline or as soon as the gateway
    /// exits.
    fn wait_for<T>(&self, what: &str, mut probe: impl FnMut(&Lab) -> Option<T>) -> T {
        fz_host::testing::wait_for(
            what,
            WAIT,
            |what| self.gateway.assert_running(what),
            || probe(self),
        )
    }

    /// The next portal event `pick` takes, skipping the others.
    fn wait_portal<T>(&self, what: &str, pick: impl FnMut(PortalEvent) -> Option<T>) -> T {
        self.wait_portal_within(what, WAIT, pick)
    }

    /// [`Lab::wait_portal`], failing after `patience`.
    fn wait_portal_within<T>(
        &self,
        what: &str,
        patience: Duration,
        mut pick: impl FnMut(PortalEvent) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            self.gateway.assert_running(what);
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "waited {patience:?} for {what}");
            match self
                .portal
                .events
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                // Neither happens with a gateway that speaks the protocol.
                Ok(PortalEvent::Rejected(why)) => {
                    panic!("the portal refused the gateway's connection: {why}")
                }
                Ok(PortalEvent::Garbled(why)) => {
                    panic!("the gateway sent the portal something it cannot read: {why}")
                }
                Ok(event) => {
                    if let Some(found) = pick(event) {
                        return found;
                    }
                }
                Err(sync_mpsc::RecvTimeoutError::Timeout) => {}
                Err(sync_mpsc::RecvTimeoutError::Disconnected) => panic!("the portal stopped"),
            }
        }
    }

    fn metrics(&self) -> Metrics {
        self.gw
            .run(|| scrape(METRICS))
            .unwrap_or_else(|error| panic!("cannot read the gateway's metrics: {error}"))
    }

    /// Waits until the metrics satisfy `holds` and returns them. The gateway publishes them
    /// about once a second.
    fn wait_metrics(&self, what: &str, holds: impl Fn(&Metrics) -> bool) -> Metrics {
        fz_host::testing::metrics::wait_metrics(
            &self.gw,
            METRICS,
            what,
            WAIT,
            |what| self.gateway.assert_running(what),
            holds,
        )
    }
}

/// The grant an ack or refusal answers.
fn answer_to(message: &GatewayMessage) -> &str {
    match message {
        GatewayMessage::Ack { grant_id, .. } | GatewayMessage::Refused { grant_id, .. } => grant_id,
        _ => "",
    }
}

/// `fz-gateway` in `ns` with `args`, its log to `log`.
fn start_gateway(ns: &Netns, args: &[&str], log: PathBuf) -> Process {
    Process::start(
        "the gateway",
        ns,
        Path::new(env!("CARGO_BIN_EXE_fz-gateway")),
        args,
        "info,fz_gateway=debug,fz_tunnel=debug",
        log,
    )
}

// ---- the test portal ----

/// A portal for one gateway: it checks the token, answers `hello` with `ready`, and hands
/// everything else the gateway says to the test (heartbeats are only counted).
struct Portal {
    address: SocketAddr,
    shared: Arc<PortalShared>,
    events: sync_mpsc::Receiver<PortalEvent>,
}

struct PortalShared {
    token: String,
    /// The grants `ready` lists.
    in_force: Mutex<Vec<String>>,
    /// While set, connections are closed as soon as they are accepted.
    turn_away: AtomicBool,
    turned_away: AtomicUsize,
    heartbeats: AtomicUsize,
    /// The latest connection's outbox.
    connection: Mutex<Option<tokio::sync::mpsc::UnboundedSender<ToConnection>>>,
}

#[derive(Debug)]
enum PortalEvent {
    Hello {
        public_key: PublicKey,
        endpoints: Vec<SocketAddr>,
    },
    Message(GatewayMessage),
    /// A connection whose handshake failed (a wrong token or path, say).
    Rejected(String),
    /// A message that does not decode.
    Garbled(String),
    Closed,
}

enum ToConnection {
    Send(PortalToGateway),
    Drop,
}

impl Portal {
    /// Listens on 127.0.0.1 inside `ns`.
    fn start(runtime: &tokio::runtime::Runtime, ns: &Netns, token: String) -> Portal {
        let listener = ns.run(|| tcp_listener((Ipv4Addr::LOCALHOST, 0)));
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(PortalShared {
            token,
            in_force: Mutex::new(Vec::new()),
            turn_away: AtomicBool::new(false),
            turned_away: AtomicUsize::new(0),
            heartbeats: AtomicUsize::new(0),
            connection: Mutex::new(None),
        });
        let (events_tx, events) = sync_mpsc::channel();
        let accepting = shared.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if accepting.turn_away.load(Ordering::SeqCst) {
                    accepting.turned_away.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                tokio::spawn(serve_gateway(stream, accepting.clone(), events_tx.clone()));
            }
        });
        Portal {
            address,
            shared,
            events,
        }
    }

    fn send(&self, message: PortalToGateway) {
        self.shared
            .connection
            .lock()
            .unwrap()
            .as_ref()
            .expect("no gateway is connected")
            .send(ToConnection::Send(message))
            .expect("the gateway's connection is gone");
    }

    fn drop_connection(&self) {
        if let Some(connection) = self.shared.connection.lock().unwrap().take() {
            let _ = connection.send(ToConnection::Drop);
        }
    }

    fn turn_away(&self, on: bool) {
        self.shared.turn_away.store(on, Ordering::SeqCst);
    }

    fn set_in_force(&self, grants: Vec<String>) {
        *self.shared.in_force.lock().unwrap() = grants;
    }
}

/// One gateway connection, as the real portal's `/api/{account}/gateway` with its token
/// check.
async fn serve_gateway(
    stream: tokio::net::TcpStream,
    shared: Arc<PortalShared>,
    events: sync_mpsc::Sender<PortalEvent>,
) {
    let bearer = format!("Bearer {}", shared.token);
    let path = format!("/api/{ACCOUNT}/gateway");
    // The error type is tungstenite's callback signature, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let check = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let token = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        if request.uri().path() != path || token != Some(bearer.as_str()) {
            let mut refusal = ErrorResponse::new(Some("unknown token".to_owned()));
            *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
            return Err(refusal);
        }
        Ok(response)
    };
    let mut socket = match tokio_tungstenite::accept_hdr_async(stream, check).await {
        Ok(socket) => socket,
        Err(error) => {
            let _ = events.send(PortalEvent::Rejected(error.to_string()));
            return;
        }
    };
    let (outbox, mut inbox) = tokio::sync::mpsc::unbounded_channel();
    *shared.connection.lock().unwrap() = Some(outbox);
    loop {
        tokio::select! {
            command = inbox.recv() => match command {
                Some(ToConnection::Send(message)) => {
                    if socket.send(Message::Text(fz_proto::encode(&message).into())).await.is_err() {
                        break;
                    }
                }
                Some(ToConnection::Drop) | None => break,
            },
            incoming = socket.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                match fz_proto::decode::<GatewayMessage>(text.as_bytes()) {
                    Ok(GatewayMessage::Hello { public_key, endpoints }) => {
                        let ready = PortalToGateway::Ready {
                            gateway_id: GATEWAY_ID.to_owned(),
                            heartbeat_interval_ms: HEARTBEAT_MS,
                            grants: shared.in_force.lock().unwrap().clone(),
                        };
                        if socket.send(Message::Text(fz_proto::encode(&ready).into())).await.is_err() {
                            break;
                        }
                        let _ = events.send(PortalEvent::Hello { public_key, endpoints });
                    }
                    Ok(GatewayMessage::Heartbeat) => {
                        shared.heartbeats.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(other) => {
                        let _ = events.send(PortalEvent::Message(other));
                    }
                    Err(error) => {
                        let _ = events.send(PortalEvent::Garbled(error.to_string()));
                    }
                }
            }
        }
    }
    // The socket drops here: the gateway sees the connection end.
    let _ = events.send(PortalEvent::Closed);
}

// ---- the site ----

/// The site's servers: TCP greeters on 10.0.5.10 and the DNS server on 10.0.5.53.
fn start_site(runtime: &tokio::runtime::Runtime, site: &Netns) {
    let (greeters, dns) = site.run(|| {
        let greeters: Vec<_> = [(5432, "db"), (22, "ssh"), (80, "web")]
            .into_iter()
            .map(|(port, name)| (tcp_listener((Ipv4Addr::new(10, 0, 5, 10), port)), name))
            .collect();
        (greeters, udp_socket((Ipv4Addr::new(10, 0, 5, 53), 53)))
    });
    for (listener, name) in greeters {
        runtime.spawn(greet(listener, name));
    }
    runtime.spawn(serve_dns(dns, ZONE));
}

/// The names the site's DNS server knows (A records only); everything else is NXDOMAIN.
const ZONE: &[(&str, Ipv4Addr)] = &[
    ("gitlab.company.com.", Ipv4Addr::new(10, 0, 5, 10)),
    ("jenkins.company.com.", Ipv4Addr::new(10, 0, 5, 10)),
];
