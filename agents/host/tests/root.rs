#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The TUN device and the nftables masquerade for real: these need root (`CAP_NET_ADMIN`,
//! `CAP_SYS_ADMIN`), `/dev/net/tun`, iproute2's `ip` and nftables' `nft`.
//!
//! Each test runs on a thread of its own that first moves into a fresh network namespace
//! (`unshare(CLONE_NEWNET)`, which Linux allows per thread), and drives a current-thread tokio
//! runtime there. Devices, addresses, routes, nftables tables and forwarding switches made by
//! the test, and the `ip`/`nft` commands it spawns, all live in that namespace: nothing touches
//! the host's networking, no packet can leave the machine, and the namespace vanishes with the
//! thread. Addresses come from the benchmarking range 198.18.0.0/15 and the documentation range
//! 2001:db8::/32.
//!
//! Without root each test prints `SKIPPED (needs root): <test> — <why>` and leaves a marker in
//! `<target>/fz-root-skips/<test>`, so a CI that means to run them can see they did not
//! (`support`).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use fz_host::firewall::{self, Masquerade};
use fz_host::testing::packet::{parse_udp, transport_checksum_valid, udp};
use fz_host::testing::{cidr, ip, nft, skip};
use fz_host::tun::{self, Tun, WriteBatch};
use fz_host::udp::{SendQueue, Udp};
use tokio::net::UdpSocket;

const TUN_V4: &str = "198.18.0.1/24";
const PEER_V4: &str = "198.18.0.2";
const TUN_V6: &str = "2001:db8:f2::1/64";
const PEER_V6: &str = "2001:db8:f2::2";

#[test]
fn tun_comes_up_with_its_mtu_and_goes_away_when_dropped() {
    as_root(
        "tun_comes_up_with_its_mtu_and_goes_away_when_dropped",
        || async {
            let name = tun_name('a');
            let device = Tun::create(&name, tun::DEFAULT_MTU).unwrap();
            assert_eq!(device.name(), name);
            assert_eq!(device.mtu().unwrap(), 1420);
            let link = ip(&["-o", "link", "show", "dev", &name]).unwrap();
            assert!(link.contains("mtu 1420"), "{link}");
            assert!(link.contains(",UP"), "not up: {link}");

            let mtu = 1380;
            let again = Tun::create(&tun_name('b'), mtu).unwrap();
            assert_eq!(again.mtu().unwrap(), mtu);

            drop(device);
            let gone = ip(&["-o", "link", "show", "dev", &name]);
            assert!(gone.is_err(), "still there: {gone:?}");
        },
    );
}

#[test]
fn tun_carries_udp_both_ways_through_the_kernel() {
    as_root("tun_carries_udp_both_ways_through_the_kernel", || async {
        let device = Tun::create(&tun_name('c'), tun::DEFAULT_MTU).unwrap();
        device.add_address(cidr(TUN_V4)).unwrap();
        device.add_address(cidr(TUN_V6)).unwrap();
        // A second time is fine: a restarted gateway runs the same set-up.
        device.add_address(cidr(TUN_V4)).unwrap();

        for (local, peer) in [(TUN_V4, PEER_V4), (TUN_V6, PEER_V6)] {
            let local = cidr(local).address();
            let peer = SocketAddr::new(peer.parse().unwrap(), 40000);
            let socket = UdpSocket::bind(SocketAddr::new(local, 0)).await.unwrap();
            let server = socket.local_addr().unwrap();

            // In: a packet written to the device reaches the socket, as one from a client
            // reaches a resource.
            write(&device, &udp(peer, server, b"ping")).await;
            let mut buf = [0; 64];
            let (len, from) = bounded(socket.recv_from(&mut buf)).await.unwrap();
            assert_eq!((&buf[..len], from), (&b"ping"[..], peer));

            // Out: the socket's reply is routed into the device and read from it.
            socket.send_to(b"pong", peer).await.unwrap();
            let (src, payload) = next_udp_to(&device, peer).await;
            assert_eq!((src, payload.as_slice()), (server, &b"pong"[..]));
        }
    });
}

/// The batched paths both ways. Out: a run of equal datagrams sent with one UDP GSO call to a
/// peer behind the device reaches the device as one segment (USO) or as separate packets, and
/// reads back as the datagrams, in order, with valid checksums. In: a batch of packets of one
/// flow written at once (which the device may coalesce) reaches the local socket as the same
/// datagrams, in order.
#[test]
fn tun_batches_carry_runs_of_datagrams_whole_and_in_order() {
    as_root(
        "tun_batches_carry_runs_of_datagrams_whole_and_in_order",
        || async {
            let device = Tun::create(&tun_name('e'), tun::DEFAULT_MTU).unwrap();
            device.add_address(cidr(TUN_V4)).unwrap();
            device.add_address(cidr(TUN_V6)).unwrap();
            let datagrams: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000]).collect();

            for (local, peer) in [(TUN_V4, PEER_V4), (TUN_V6, PEER_V6)] {
                let local = cidr(local).address();
                let peer = SocketAddr::new(peer.parse().unwrap(), 40000);

                let socket = Udp::bind(SocketAddr::new(local, 0)).unwrap();
                let mut queue = SendQueue::default();
                for datagram in &datagrams {
                    queue.push(peer, datagram);
                }
                socket.send(&mut queue).await;
                assert!(queue.is_empty());
                let mut payloads = Vec::new();
                let mut batch = device.read_batch();
                while payloads.len() < datagrams.len() {
                    bounded(device.recv(&mut batch)).await.unwrap();
                    for packet in batch.packets_mut() {
                        if let Some((_, to, payload)) = parse_udp(packet)
                            && to == peer
                        {
                            assert!(transport_checksum_valid(packet), "bad checksum");
                            payloads.push(payload.to_vec());
                        }
                    }
                }
                assert_eq!(payloads, datagrams, "out of the device");

                let receiver = UdpSocket::bind(SocketAddr::new(local, 0)).await.unwrap();
                let server = receiver.local_addr().unwrap();
                let mut batch = WriteBatch::default();
                for datagram in &datagrams {
                    batch.push(&udp(peer, server, datagram));
                }
                device.send(&mut batch).await.unwrap();
                assert!(batch.is_empty());
                let mut buf = vec![0; 2048];
                for datagram in &datagrams {
                    let (len, from) = bounded(receiver.recv_from(&mut buf)).await.unwrap();
                    assert_eq!((&buf[..len], from), (datagram.as_slice(), peer), "into it");
                }
            }
        },
    );
}

#[test]
fn tun_gets_the_client_tunnel_ranges_routed_to_it() {
    as_root("tun_gets_the_client_tunnel_ranges_routed_to_it", || async {
        let device = Tun::create(&tun_name('d'), tun::DEFAULT_MTU).unwrap();
        device.add_address(cidr(TUN_V4)).unwrap();
        device.add_address(cidr(TUN_V6)).unwrap();
        device.add_client_routes().unwrap();
        device.add_client_routes().unwrap();

        let routes = ip(&["-4", "route", "show", "dev", device.name()]).unwrap();
        assert!(routes.contains("100.64.0.0/11"), "{routes}");
        let routes = ip(&["-6", "route", "show", "dev", device.name()]).unwrap();
        assert!(routes.contains("fd00:2021:1111::/107"), "{routes}");

        // A resource's reply to a client address anywhere in the ranges goes to the device.
        for client in [
            "100.64.0.7",
            "100.95.255.254",
            "fd00:2021:1111::7",
            "fd00:2021:1111::1f:fffe",
        ] {
            let client = SocketAddr::new(client.parse().unwrap(), 9);
            let any: IpAddr = if client.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await.unwrap();
            socket.send_to(b"reply", client).await.unwrap();
            let (_, payload) = next_udp_to(&device, client).await;
            assert_eq!(payload, b"reply");
        }
    });
}

#[test]
fn masquerade_is_installed_listed_and_removed() {
    as_root("masquerade_is_installed_listed_and_removed", || async {
        let tun = tun_name('e');
        let masquerade = Masquerade::install(&tun).unwrap();
        let table = masquerade.table_name().to_owned();
        assert_eq!(table, firewall::table_name(&tun));

        let listed = nft(&["list", "table", "inet", &table]).unwrap();
        for rule in [
            format!("iifname \"{tun}\" oifname != \"{tun}\" ip saddr 100.64.0.0/11 masquerade"),
            format!(
                "iifname \"{tun}\" oifname != \"{tun}\" ip6 saddr fd00:2021:1111::/107 masquerade"
            ),
            format!("iifname \"{tun}\" accept"),
            format!("oifname \"{tun}\" ct state established,related accept"),
            format!("oifname \"{tun}\" drop"),
        ] {
            assert!(listed.contains(&rule), "missing {rule:?} in\n{listed}");
        }

        masquerade.remove().unwrap();
        assert!(
            nft(&["list", "table", "inet", &table]).is_err(),
            "table still there"
        );
        assert!(!nft(&["list", "tables"]).unwrap().contains(&table));
    });
}

#[test]
fn a_table_left_by_a_crash_is_replaced_and_drop_removes_it() {
    as_root(
        "a_table_left_by_a_crash_is_replaced_and_drop_removes_it",
        || async {
            let tun = tun_name('f');
            // A crashed run: the table stays because nothing removed it.
            std::mem::forget(Masquerade::install(&tun).unwrap());
            let table = firewall::table_name(&tun);
            assert!(nft(&["list", "table", "inet", &table]).is_ok());

            let masquerade = Masquerade::install(&tun).unwrap();
            let listed = nft(&["list", "table", "inet", &table]).unwrap();
            assert_eq!(listed.matches("masquerade").count(), 2, "{listed}");

            drop(masquerade);
            assert!(
                nft(&["list", "table", "inet", &table]).is_err(),
                "table still there"
            );
            // Removing what is gone already is fine.
            Masquerade::install(&tun).unwrap().remove().unwrap();
        },
    );
}

#[test]
fn forwarding_is_turned_on() {
    as_root("forwarding_is_turned_on", || async {
        firewall::enable_forwarding().unwrap();
        for path in [firewall::IPV4_FORWARD, firewall::IPV6_FORWARD] {
            assert_eq!(std::fs::read_to_string(path).unwrap().trim(), "1", "{path}");
        }
    });
}

/// The gateway's whole kernel path with two TUN devices: `gw` is the gateway's (the core
/// writes clients' packets into it) and `lan` stands for the network the resources are on.
/// A client's packet written into `gw` leaves by `lan` with the gateway's address, and the
/// resource's reply, written into `lan`, comes back out of `gw` to the client's address. A
/// packet from the site that belongs to no connection a client opened (one sent straight to a
/// client's tunnel address) never reaches `gw`.
#[test]
fn masquerade_rewrites_client_traffic_and_brings_replies_back() {
    as_root(
        "masquerade_rewrites_client_traffic_and_brings_replies_back",
        || async {
            let gw = Tun::create(&tun_name('g'), tun::DEFAULT_MTU).unwrap();
            gw.add_client_routes().unwrap();
            let lan = Tun::create(&tun_name('h'), 1500).unwrap();
            lan.add_address(cidr("198.19.0.1/24")).unwrap();
            lan.add_address(cidr("2001:db8:f3::1/64")).unwrap();
            firewall::enable_forwarding().unwrap();
            let _masquerade = Masquerade::install(gw.name()).unwrap();

            for (client, resource, gateway) in [
                ("100.64.0.2:40000", "198.19.0.9:5432", "198.19.0.1"),
                (
                    "[fd00:2021:1111::2]:40000",
                    "[2001:db8:f3::9]:443",
                    "2001:db8:f3::1",
                ),
            ] {
                let client: SocketAddr = client.parse().unwrap();
                let resource: SocketAddr = resource.parse().unwrap();
                let gateway: IpAddr = gateway.parse().unwrap();

                write(&gw, &udp(client, resource, b"query")).await;
                let (masqueraded, payload) = next_udp_to(&lan, resource).await;
                assert_eq!(masqueraded.ip(), gateway, "not masqueraded");
                assert_eq!(payload, b"query");

                write(&lan, &udp(resource, masqueraded, b"rows")).await;
                let (from, payload) = next_udp_to(&gw, client).await;
                assert_eq!((from, payload.as_slice()), (resource, &b"rows"[..]));

                // A host at the site opening a connection to the client: dropped. A reply sent
                // after it comes through the same path, so when the reply is out of `gw`, the
                // unsolicited packet would have been too.
                let opened_by_site = SocketAddr::new(client.ip(), 40001);
                write(&lan, &udp(resource, opened_by_site, b"hello")).await;
                write(&lan, &udp(resource, masqueraded, b"marker")).await;
                let seen = udp_until(&gw, client).await;
                assert!(
                    !seen.iter().any(|(_, to, _)| *to == opened_by_site),
                    "a connection from the site reached the client: {seen:?}"
                );
                assert_eq!(
                    seen.last().map(|(_, _, p)| p.as_slice()),
                    Some(&b"marker"[..])
                );
            }
        },
    );
}

// ---- running as root in a namespace of our own ----

/// Runs `body` on a thread in a fresh network namespace, or skips loudly without root.
fn as_root<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !fz_host::testing::may_run_as_root(test) {
        return;
    }
    let outcome = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            ip(&["link", "set", "lo", "up"]).unwrap();
            body().await;
        });
        Ok::<_, nix::Error>(())
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(errno)) => skip(test, &format!("cannot make a network namespace: {errno}")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A device name unique to this test process, so that runs never meet even outside a
/// namespace: `fzt<pid % 10000><letter>`.
fn tun_name(letter: char) -> String {
    format!("fzt{}{letter}", std::process::id() % 10_000)
}

/// A bound on waiting, so a lost packet fails the test instead of hanging it. Not a sleep:
/// the test goes on the moment the awaited thing happens.
async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("nothing came within 10 s")
}

/// Writes one packet into the device.
async fn write(device: &Tun, packet: &[u8]) {
    let mut batch = WriteBatch::default();
    batch.push(packet);
    device.send(&mut batch).await.unwrap();
}

/// Reads the device until a UDP packet to `to` comes, and returns its source and payload.
/// Other packets (IPv6 router solicitations, MLD reports) are the kernel's own and skipped.
async fn next_udp_to(device: &Tun, to: SocketAddr) -> (SocketAddr, Vec<u8>) {
    let (src, _, payload) = udp_until(device, to).await.pop().unwrap();
    (src, payload)
}

/// Every UDP packet read from the device, `(source, destination, payload)`, up to and
/// including the first one to `to`. Each must carry a valid checksum.
async fn udp_until(device: &Tun, to: SocketAddr) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
    bounded(async {
        let mut seen = Vec::new();
        let mut batch = device.read_batch();
        loop {
            device.recv(&mut batch).await.unwrap();
            for packet in batch.packets_mut() {
                if let Some((src, dst, payload)) = parse_udp(packet) {
                    assert!(transport_checksum_valid(packet), "bad checksum: {packet:?}");
                    seen.push((src, dst, payload.to_vec()));
                    if dst == to {
                        return seen;
                    }
                }
            }
        }
    })
    .await
}
