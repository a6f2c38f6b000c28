//! Writes the made part of the seed corpus: `cargo run --example seeds` (in `tests/fuzz`).
//!
//! - `corpus/fz_file/` and `corpus/cedar_file/`: every policy file of `policies/` and
//!   `tests/fixtures/`, and rules written for the fixed declarations the targets put beside
//!   them;
//! - `corpus/proto_decode/`: every control message, in both directions;
//! - `corpus/grant/`: the standard grants, signed with the fixed portal key (`signed-*`,
//!   which `tests/replay.rs` checks still verify);
//! - `corpus/packet/`: IP packets of every shape the parser reads.
//!
//! The other targets' seeds (their inputs are recipes, not messages) are what `run.sh --merge`
//! kept of short runs.
#![allow(clippy::print_stdout, clippy::expect_used)] // a tool run by hand: it says what it wrote

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fz_fuzz::fixtures::{self, START_UNIX};
use fz_proto::{
    ClientMessage, ClientReady, DnsMapping, GatewayMessage, PortalToClient, PortalToGateway,
    PublicKey, Resolution, ResourceView, encode,
};
use fz_tunnel::packet::build;

/// Rules over the fixed declarations' names, in every form `fzc export` writes, for the
/// export round trip of `fz_file` (the compiler's Cedar tests use the same).
const RULES: &str = r#"allow engineering, security, user "Dave@Acme.example" -> gitlab, site eu-west as mixed
allow everyone -> wiki when country not in ru, by and provider okta
allow everyone, contractors -> gitlab when client verified and source in 10.0.0.0/8, 2001:db8::/32
deny contractors -> site hq, admin-net when source not in 192.0.2.0/24, 198.51.100.7
deny user "carol@vendor.example" -> prod-db when country in DE              as carol-db
allow security -> admin-net when source not in 10.1.0.0/16 and country not in US
allow engineering -> prod-db when time mon-fri 08:00-18:00 Europe/Berlin and country in DE
allow security -> prod-db when country in DE and time fri-sun 22:00-06:00, 12:00-13:00 UTC as late
allow contractors -> wiki when time any 22:00-02:00 Asia/Tokyo and time sat 00:00-24:00 UTC

test "rules over the declarations" {
  expect allow "alice@acme.example" -> gitlab tcp/443
  expect deny  "carol@vendor.example" -> prod-db tcp/5432 country DE
}
assert never contractors -> prod-db
"#;

/// A Cedar time window and a condition of each kind, over the declarations' names.
const CEDAR: &str = r#"@id("office-hours")
permit (principal in Group::"engineering", action, resource == Resource::"prod-db")
when {
  ["mon", "tue", "wed", "thu", "fri"].contains(context.time["Europe/Berlin"].day) &&
  context.time["Europe/Berlin"].minute >= 480 && context.time["Europe/Berlin"].minute < 1080
};

permit (principal == User::"erin@acme.example", action, resource in Site::"eu-west")
when { context.client_verified && context.provider == "okta" }
unless { context.source_ip.isInRange(ip("203.0.113.0/24")) };
"#;

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here.join("../..");
    let corpus = here.join("corpus");

    let mut written = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).expect("the corpus directory");
        fs::write(dir.join(name), bytes).expect("a seed file");
        written += 1;
    };

    for tree in ["policies", "tests/fixtures"] {
        for path in policy_files(&root.join(tree)) {
            let relative = path.strip_prefix(&root).expect("inside the repository");
            let name = relative.to_string_lossy().replace('/', "-");
            let target = if name.ends_with(".cedar") {
                "cedar_file"
            } else {
                "fz_file"
            };
            write(target, &name, &fs::read(&path).expect("a policy file"));
        }
    }
    write(
        "fz_file",
        "rules-over-the-declarations.fz",
        RULES.as_bytes(),
    );
    write(
        "cedar_file",
        "conditions-over-the-declarations.cedar",
        CEDAR.as_bytes(),
    );

    for (name, text) in messages() {
        write("proto_decode", &format!("{name}.json"), text.as_bytes());
    }

    for grant in fixtures::standard_grants() {
        let name = format!("signed-{}.json", grant.id);
        let signed = grant.sign(fixtures::portal());
        let json = serde_json::to_vec_pretty(&signed).expect("a grant's JSON");
        write("grant", &name, &json);
    }

    for (name, packet) in packets() {
        write("packet", &format!("{name}.bin"), &packet);
    }
    println!("wrote {written} seeds under {}", corpus.display());
}

/// Every `.fz` and `.cedar` file under `dir`, sorted.
fn policy_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).expect("a fixture directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "fz" || e == "cedar") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

/// One message of every type, each direction.
fn messages() -> Vec<(&'static str, String)> {
    let [one, _] = fixtures::devices();
    let grants = fixtures::standard_grants();
    let signed = grants[1].clone().sign(fixtures::portal());
    let mapping = DnsMapping {
        name: "gitlab.company.com".into(),
        mapped: vec![ip("100.96.0.1"), ip("fd00:2021:1111:8000::1")],
    };
    vec![
        (
            "client-hello",
            encode(&ClientMessage::Hello {
                public_key: one.public_key(),
                endpoints: vec![one.address, "[2001:db8::7]:51820".parse().expect("")],
            }),
        ),
        (
            "client-request-access",
            encode(&ClientMessage::RequestAccess {
                resource: "gitlab".into(),
                dns: Some(mapping),
                avoid: vec!["gw-2".into()],
            }),
        ),
        (
            "portal-ready",
            encode(&PortalToClient::Ready(Box::new(ClientReady {
                client_id: one.id.clone(),
                tunnel_ipv4: one.v4,
                tunnel_ipv6: one.v6,
                resources: vec![
                    ResourceView {
                        id: "gitlab".into(),
                        address: "gitlab.company.com".into(),
                    },
                    ResourceView {
                        id: "db".into(),
                        address: "10.0.5.0/24".into(),
                    },
                ],
                more: false,
            }))),
        ),
        (
            "portal-granted",
            encode(&PortalToClient::Granted {
                grant: Box::new(signed.clone()),
                resolved: Some(Resolution::Exists {
                    ipv4: true,
                    ipv6: false,
                }),
            }),
        ),
        (
            "portal-rejected",
            encode(&PortalToClient::Rejected {
                resource: "db".into(),
                reason: "no allow rule applies".into(),
            }),
        ),
        (
            "portal-revoked",
            encode(&PortalToClient::Revoked {
                grant_id: "g-db".into(),
                reason: "policy changed".into(),
            }),
        ),
        (
            "portal-gateway-down",
            encode(&PortalToClient::GatewayDown {
                gateway_id: "gw-1".into(),
            }),
        ),
        (
            "portal-error",
            encode(&PortalToClient::Error {
                message: "bad message".into(),
            }),
        ),
        (
            "gateway-hello",
            encode(&GatewayMessage::Hello {
                public_key: PublicKey([9; 32]),
                endpoints: vec!["203.0.113.1:51820".parse().expect("")],
            }),
        ),
        ("gateway-heartbeat", encode(&GatewayMessage::Heartbeat)),
        (
            "gateway-ack",
            encode(&GatewayMessage::Ack {
                grant_id: "g-gitlab".into(),
                resolved: Some(Resolution::NoSuchName),
            }),
        ),
        (
            "gateway-refused",
            encode(&GatewayMessage::Refused {
                grant_id: "g-web".into(),
                reason: "the grant expired".into(),
            }),
        ),
        (
            "portal-gateway-ready",
            encode(&PortalToGateway::Ready {
                gateway_id: "gw-1".into(),
                heartbeat_interval_ms: 10_000,
                grants: vec!["g-db".into()],
            }),
        ),
        (
            "portal-grant",
            encode(&PortalToGateway::Grant {
                grant: Box::new(signed),
            }),
        ),
        (
            "portal-revoke",
            encode(&PortalToGateway::Revoke {
                grant_id: "g-db".into(),
            }),
        ),
        (
            "portal-gateway-error",
            encode(&PortalToGateway::Error {
                message: "unknown grant".into(),
            }),
        ),
        (
            "newer-version",
            format!("{{\"v\":2,\"type\":\"heartbeat\",\"at\":{START_UNIX}}}"),
        ),
    ]
}

/// IP packets of every shape the parser reads.
fn packets() -> Vec<(&'static str, Vec<u8>)> {
    let (c4, c6) = (ip("100.64.0.1"), ip("fd00:2021:1111::1"));
    let (d4, d6) = (ip("10.0.5.10"), ip("2001:db8::53"));
    let udp = |source: u16, destination: u16| {
        let mut header = build::ports(source, destination);
        header.truncate(8);
        header
    };
    let mut options = build::ip(c4, d4, 6, &build::ports(40000, 5432));
    // An IPv4 header with one word of options (a no-op and three ends of list).
    options[0] = 0x46;
    options.splice(20..20, [1, 0, 0, 0]);
    let mut later_fragment = build::ip(c4, d4, 17, &[0; 16]);
    later_fragment[6..8].copy_from_slice(&[0x00, 0xb9]);
    let mut hop_by_hop = vec![6, 0, 0, 0, 0, 0, 0, 0];
    hop_by_hop.extend(build::ports(40000, 443));
    let mut fragment_header = vec![17, 0, 0, 0, 0, 0, 0, 7];
    fragment_header.extend(udp(40000, 53));
    vec![
        ("v4-tcp", build::ip(c4, d4, 6, &build::ports(40000, 5432))),
        (
            "v4-udp",
            build::ip(c4, ip("100.96.0.1"), 17, &udp(40000, 8000)),
        ),
        (
            "v4-echo",
            build::ip(c4, d4, 1, &[8, 0, 0, 0, 0x9c, 0x40, 0, 1]),
        ),
        ("v4-gre", build::ip(c4, d4, 47, &[0; 8])),
        ("v4-options", options),
        ("v4-later-fragment", later_fragment),
        ("v6-tcp", build::ip(c6, d6, 6, &build::ports(40000, 443))),
        ("v6-udp", build::ip(c6, d6, 17, &udp(40000, 53))),
        (
            "v6-echo",
            build::ip(
                c6,
                ip("fd00:2021:1111:8000::1"),
                58,
                &[128, 0, 0, 0, 0, 7, 0, 1],
            ),
        ),
        ("v6-hop-by-hop", build::ip(c6, d6, 0, &hop_by_hop)),
        ("v6-fragment", build::ip(c6, d6, 44, &fragment_header)),
    ]
}
