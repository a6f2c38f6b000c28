//! NAT routers for the world: a host put behind one reaches the wan only through it, and the
//! wan reaches the host only with answers to what it sent.
//!
//! A router is a namespace with `eth0` on the wan bridge and `eth1` toward the host, IP
//! forwarding on, and one nftables table: masquerade out of `eth0` (plain for an **easy** NAT:
//! Linux keeps the host's source port when it can, so one inside socket keeps one public
//! port whatever it talks to; `fully-random` for a **hard** one: every destination gets a
//! port of its own, so the address a relay sees is of no use to anyone else), and a forward
//! chain that lets in from the wan only what conntrack knows as an answer, counting what it
//! drops (`inbound_refused`): nothing on the wan can open a connection or send a datagram to
//! the host first. What comes from the wan for the router itself is dropped too, as home
//! routers do: were it delivered (and answered with ICMP), conntrack would keep the flow, and
//! the host's own datagram to that peer would then leave from another port, which is what
//! makes hole punching fail through a Linux router left open.

use std::net::Ipv4Addr;
use std::path::Path;

use fz_host::testing::netns::{Netns, link, port};

/// What stands between a host and the wan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// The host is on the wan itself.
    None,
    /// Endpoint-independent mapping (masquerade), answers only.
    Easy,
    /// A new public port per destination (`masquerade fully-random`), answers only.
    Hard,
}

impl Nat {
    pub fn name(self) -> &'static str {
        match self {
            Nat::None => "none",
            Nat::Easy => "easy",
            Nat::Hard => "hard",
        }
    }
}

/// A host on the wan, behind `nat`: the router's namespace (none without NAT) and the host's.
/// The host is `{inside}.2/24` behind a router at `{inside}.1`, or `wan` itself without NAT.
pub fn host_behind(
    bridge_ns: &Netns,
    id: &str,
    name: &str,
    nat: Nat,
    wan: Ipv4Addr,
    inside: &str,
    dir: &Path,
) -> (Option<Netns>, Netns) {
    let host = Netns::add(format!("fze-{id}-{name}")).unwrap();
    if nat == Nat::None {
        port(
            bridge_ns,
            &format!("wan-{name}"),
            &host,
            "eth0",
            &format!("{wan}/24"),
        );
        host.ip(&["route", "add", "default", "via", "198.18.0.1"])
            .unwrap();
        return (None, host);
    }
    let router = Netns::add(format!("fze-{id}-nat-{name}")).unwrap();
    port(
        bridge_ns,
        &format!("wan-{name}"),
        &router,
        "eth0",
        &format!("{wan}/24"),
    );
    router
        .ip(&["route", "add", "default", "via", "198.18.0.1"])
        .unwrap();
    link(
        &router,
        "eth1",
        &format!("{inside}.1/24"),
        &host,
        "eth0",
        &format!("{inside}.2/24"),
    );
    host.ip(&["route", "add", "default", "via", &format!("{inside}.1")])
        .unwrap();
    router
        .exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();
    let masquerade = match nat {
        Nat::Hard => "masquerade fully-random",
        _ => "masquerade",
    };
    let rules = dir.join(format!("nat-{name}.nft"));
    std::fs::write(
        &rules,
        format!(
            "table ip fz_test_nat {{\n\
             counter inbound_refused {{ }}\n\
             chain postrouting {{\n type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"eth0\" {masquerade}\n}}\n\
             chain forward {{\n type filter hook forward priority filter; policy drop;\n\
             iifname \"eth1\" oifname \"eth0\" accept\n\
             iifname \"eth0\" oifname \"eth1\" ct state established,related accept\n\
             iifname \"eth0\" counter name inbound_refused drop\n}}\n\
             chain input {{\n type filter hook input priority filter; policy accept;\n\
             iifname \"eth0\" ct state established,related accept\n\
             iifname \"eth0\" counter name inbound_refused drop\n}}\n}}\n"
        ),
    )
    .unwrap();
    router
        .exec("nft", &["-f", rules.to_str().unwrap()])
        .unwrap();
    (Some(router), host)
}

/// Packets from the wan the router refused to let in (nothing asked for them).
pub fn inbound_refused(router: &Netns) -> u64 {
    let listing = router
        .exec(
            "nft",
            &["list", "counter", "ip", "fz_test_nat", "inbound_refused"],
        )
        .unwrap_or_default();
    listing
        .split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Makes `router` drop every datagram between its host and the wan but those to and from
/// `relay`, until [`unblock_direct`]: the host's peers can reach it only through the relay.
/// A table of its own, in front of the NAT's, so that lifting it leaves the NAT as it was.
pub fn block_direct(router: &Netns, relay: Ipv4Addr) {
    let relay = relay.to_string();
    for command in [
        vec!["add", "table", "ip", "fz_test_block"],
        vec![
            "add",
            "chain",
            "ip",
            "fz_test_block",
            "forward",
            "{ type filter hook forward priority filter - 1 ; policy accept ; }",
        ],
        vec![
            "add",
            "rule",
            "ip",
            "fz_test_block",
            "forward",
            "meta",
            "l4proto",
            "udp",
            "ip",
            "saddr",
            "!=",
            &relay,
            "ip",
            "daddr",
            "!=",
            &relay,
            "drop",
        ],
    ] {
        router.exec("nft", &command).unwrap();
    }
}

/// Lets direct datagrams through `router` again ([`block_direct`]).
pub fn unblock_direct(router: &Netns) {
    router
        .exec("nft", &["delete", "table", "ip", "fz_test_block"])
        .unwrap();
}
