//! One meaning everywhere: on random trees, sessions and packets, the compiled table's
//! decision, the portal's admission of a request (`fz_portal::admission::admit`, what the
//! broker grants) and the gateway's filter built from that grant (`fz_tunnel::filter`) agree
//! on every (user, address, port).
//!
//! - Sound: whatever resource a client asks for (a malicious one may ask for a wider resource
//!   than the one serving an address), a packet the resulting grant's filter passes, or a
//!   reply it lets back, goes to or comes from an address whose most specific resource is the
//!   granted one, on a port the table allows the user there. A name is granted only through
//!   the resource serving it, and only when the table allows that resource.
//! - Complete: where the table allows the user the resource serving an address (or a name),
//!   asking for that resource gets a grant whose filter passes the packet.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{TimeZone, Utc};
use fz_compiler::table::{Effect, PortRange};
use fz_compiler::{DecisionTable, Request};
use fz_lang::{SourceFile, Sources};
use fz_portal::admission::{Admission, admit};
use fz_portal::registry::ClientSession;
use fz_proto::{
    ClientPeer, DnsMapping, GatewayPeer, Grant, GrantedResource, PresharedKey, PublicKey,
};
use fz_tunnel::filter::GrantFilter;
use fz_tunnel::packet::{Packet, build};
use proptest::prelude::*;

/// Resource addresses a tree draws from: networks inside networks (private and public, both
/// families), `internet`, and names inside patterns.
const ADDRESSES: [&str; 14] = [
    "\"10.0.0.0/8\"",
    "\"10.0.5.0/24\"",
    "\"10.0.5.10\"",
    "\"10.9.0.0/16\"",
    "\"203.0.113.0/24\"",
    "\"203.0.113.7\"",
    "\"fd00::/64\"",
    "\"fd00::5\"",
    "\"2001:db8::/48\"",
    "internet",
    "\"**.corp.example\"",
    "\"*.corp.example\"",
    "\"vault.corp.example\"",
    "\"a?.corp.example\"",
];

/// Addresses packets go to: in, at the edges of and beside every network above, public and
/// private addresses no resource names, and a mapped address.
const DESTINATIONS: [&str; 22] = [
    "10.0.0.1",
    "10.255.255.255",
    "10.0.5.0",
    "10.0.5.10",
    "10.0.5.11",
    "10.0.5.255",
    "10.0.6.0",
    "10.9.0.1",
    "11.0.0.1",
    "203.0.113.7",
    "203.0.113.8",
    "203.0.114.1",
    "8.8.8.8",
    "192.168.1.1",
    "100.96.0.1",
    "fd00::5",
    "fd00::6",
    "fd00:0:0:1::1",
    "2001:db8::1",
    "2001:db8:1::1",
    "2606:4700::1111",
    "fe80::1",
];

/// Names clients ask for, under every name pattern above and beside them.
const NAMES: [&str; 7] = [
    "vault.corp.example",
    "ab.corp.example",
    "wiki.corp.example",
    "x.y.corp.example",
    "corp.example",
    "a1.corp.example",
    "other.example",
];

/// Ports a resource may list and packets use.
const PORTS: [&str; 4] = ["tcp/443", "tcp/22", "udp/53", "icmp"];

const USERS: [&str; 3] = ["u0@corp.example", "u1@corp.example", "u2@corp.example"];

const CONDITIONS: [&str; 4] = [
    "country in DE",
    "client verified",
    "provider okta",
    "source in 198.51.100.0/24",
];

#[derive(Clone, Debug)]
struct Tree {
    /// Which addresses are resources, with their ports (`None`: all traffic).
    resources: Vec<(bool, Option<Vec<usize>>)>,
    /// Static members of g0..g2, and whether each is bound to an identity-provider group.
    members: Vec<Vec<usize>>,
    idp: Vec<bool>,
    rules: Vec<RuleSpec>,
}

/// `(deny, subjects: groups g0..g2 then everyone, targets into ADDRESSES, conditions)`.
type RuleSpec = (bool, Vec<usize>, Vec<usize>, Vec<usize>);

fn tree() -> impl Strategy<Value = Tree> {
    (
        prop::collection::vec(
            (
                prop::bool::weighted(0.7),
                prop::option::of(prop::collection::vec(0..PORTS.len(), 1..3)),
            ),
            ADDRESSES.len(),
        ),
        prop::collection::vec(prop::collection::vec(0..USERS.len(), 0..3), 3),
        prop::collection::vec(any::<bool>(), 3),
        prop::collection::vec(
            (
                prop::bool::weighted(0.3),
                prop::collection::vec(0..4usize, 1..3),
                prop::collection::vec(0..ADDRESSES.len(), 1..3),
                prop::collection::vec(0..CONDITIONS.len(), 0..2),
            ),
            1..12,
        ),
    )
        .prop_map(|(resources, members, idp, rules)| Tree {
            resources,
            members,
            idp,
            rules,
        })
}

fn render(tree: &Tree) -> String {
    let mut text = String::from("site hq\n");
    for (i, (present, ports)) in tree.resources.iter().enumerate() {
        if !present {
            continue;
        }
        let ports = ports.as_ref().map_or(String::new(), |ports| {
            let list: Vec<&str> = ports.iter().map(|p| PORTS[*p]).collect();
            format!("; ports {}", list.join(", "))
        });
        text += &format!(
            "resource r{i} {{ address {}; site hq{ports} }}\n",
            ADDRESSES[i]
        );
    }
    for (g, members) in tree.members.iter().enumerate() {
        text += &format!("group g{g} {{\n");
        if !members.is_empty() {
            let list: Vec<String> = members
                .iter()
                .map(|m| format!("\"{}\"", USERS[*m]))
                .collect();
            text += &format!("  members {}\n", list.join(", "));
        }
        if tree.idp[g] {
            text += &format!("  idp okta \"G{g}\"\n");
        }
        text += "}\n";
    }
    for (deny, subjects, targets, conditions) in &tree.rules {
        let targets: Vec<String> = targets
            .iter()
            .filter(|t| tree.resources[**t].0)
            .map(|t| format!("r{t}"))
            .collect();
        if targets.is_empty() {
            continue;
        }
        let subjects: Vec<String> = subjects
            .iter()
            .map(|s| match s {
                3 => "everyone".to_owned(),
                g => format!("g{g}"),
            })
            .collect();
        let when: Vec<&str> = conditions.iter().map(|c| CONDITIONS[*c]).collect();
        let when = if when.is_empty() {
            String::new()
        } else {
            format!(" when {}", when.join(" and "))
        };
        text += &format!(
            "{} {} -> {}{when}\n",
            if *deny { "deny" } else { "allow" },
            subjects.join(", "),
            targets.join(", ")
        );
    }
    // A tree needs a rule; this one is about a resource and a user no session asks for.
    text + "resource anchor { address \"anchor.example\"; site hq }\n\
             deny user \"nobody@corp.example\" -> anchor\n"
}

/// Who asks, and from where: a user, the identity provider's groups, the context.
#[derive(Clone, Debug)]
struct Asker {
    user: usize,
    idp_groups: Vec<usize>,
    country: bool,
    okta: bool,
    verified: bool,
    office: bool,
}

fn asker() -> impl Strategy<Value = Asker> {
    (
        0..USERS.len() + 1,
        prop::collection::vec(0..4usize, 0..3),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(user, idp_groups, country, okta, verified, office)| Asker {
                user,
                idp_groups,
                country,
                okta,
                verified,
                office,
            },
        )
}

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x2021, 0x1111, 0, 0, 0, 0, 2);

impl Asker {
    fn email(&self) -> &'static str {
        USERS
            .get(self.user)
            .copied()
            .unwrap_or("stranger@corp.example")
    }

    /// The session the portal would hold: the provider's groups as (provider, group) pairs,
    /// one of which (`admins`) no tree group is bound to.
    fn session(&self) -> ClientSession {
        ClientSession {
            account: "acme".into(),
            client_id: "cli".into(),
            token_id: "tok".into(),
            token_expires_at: u64::MAX,
            user: self.email().into(),
            provider: Some(if self.okta { "okta" } else { "email" }.into()),
            idp_groups: self
                .idp_groups
                .iter()
                .map(|g| {
                    (
                        "okta".to_owned(),
                        if *g < 3 {
                            format!("G{g}")
                        } else {
                            "admins".into()
                        },
                    )
                })
                .collect(),
            source: Some(
                if self.office {
                    "198.51.100.7"
                } else {
                    "203.0.113.200"
                }
                .parse()
                .unwrap(),
            ),
            country: Some(if self.country { "DE" } else { "FR" }.into()),
            peer: ClientPeer {
                id: "cli".into(),
                public_key: PublicKey([1; 32]),
                tunnel_ipv4: CLIENT_V4,
                tunnel_ipv6: CLIENT_V6,
                endpoints: vec![],
            },
        }
    }

    /// The table's request for the same user and context, the groups bound to the provider's
    /// groups computed here from the tree as written.
    fn request(&self, tree: &Tree, resource: &str, port: Option<PortRange>) -> Request {
        let groups = self
            .idp_groups
            .iter()
            .filter(|g| **g < 3 && tree.idp[**g])
            .map(|g| format!("g{g}"))
            .collect();
        let session = self.session();
        Request {
            user: self.email().into(),
            groups,
            resource: resource.into(),
            port,
            context: fz_compiler::condition::Context {
                at: Some(at()),
                source: session.source,
                country: session.country,
                provider: session.provider,
                verified: self.verified,
            },
        }
    }
}

fn at() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 7, 10, 0, 0).unwrap()
}

fn grant(resource: GrantedResource) -> Grant {
    Grant {
        id: "gr".into(),
        account: "acme".into(),
        client: ClientPeer {
            id: "cli".into(),
            public_key: PublicKey([1; 32]),
            tunnel_ipv4: CLIENT_V4,
            tunnel_ipv6: CLIENT_V6,
            endpoints: vec![],
        },
        gateway: GatewayPeer {
            id: "gw".into(),
            public_key: PublicKey([2; 32]),
            endpoints: vec![],
        },
        preshared_key: PresharedKey([3; 32]),
        resource,
        rule: "r".into(),
        bundle_hash: "h".into(),
        issued_at: 0,
        expires_at: u64::MAX,
    }
}

/// A packet from the client to `to` on `port`, and the reply from there.
fn packets(to: IpAddr, port: &PortRange) -> (Vec<u8>, Vec<u8>) {
    let client: IpAddr = if to.is_ipv4() {
        CLIENT_V4.into()
    } else {
        CLIENT_V6.into()
    };
    let (protocol, forth, back) = match port.protocol {
        fz_compiler::table::Protocol::Tcp => (
            6,
            build::ports(40000, port.first),
            build::ports(port.first, 40000),
        ),
        fz_compiler::table::Protocol::Udp => (
            17,
            build::ports(40000, port.first),
            build::ports(port.first, 40000),
        ),
        fz_compiler::table::Protocol::Icmp => {
            // An echo request and its reply.
            let (protocol, request, reply) = if to.is_ipv4() {
                (1, 8, 0)
            } else {
                (58, 128, 129)
            };
            (
                protocol,
                vec![request, 0, 0, 0, 0, 1, 0, 1],
                vec![reply, 0, 0, 0, 0, 1, 0, 1],
            )
        }
    };
    (
        build::ip(client, to, protocol, &forth),
        build::ip(to, client, protocol, &back),
    )
}

fn allows(table: &DecisionTable, request: &Request) -> bool {
    table.decide(request).effect == Effect::Allow
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn table_portal_and_gateway_agree(tree in tree(), askers in prop::collection::vec(asker(), 6)) {
        let text = render(&tree);
        let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("tree.fz", text.clone())]));
        let errors: Vec<_> = checked.diagnostics.iter().filter(|d| d.is_error()).collect();
        prop_assert!(errors.is_empty(), "{text}\n{errors:#?}");
        let table = DecisionTable::new(checked.table.expect("a table"));
        let resources = &table.table().resources;
        let ports: Vec<PortRange> = PORTS.iter().map(|p| p.parse().unwrap()).collect();

        for asker in &askers {
            let session = asker.session();
            // Addresses: every IP or internet resource a client might ask for.
            for asked in resources.iter().filter(|r| !matches!(r.address, fz_compiler::address::Address::Name(_))) {
                let admission = admit(&table, &session, &asked.id, None, asker.verified, at());
                let whole = asker.request(&tree, &asked.id, None);
                let filter = match &admission {
                    Admission::Granted { resource, .. } => {
                        prop_assert!(allows(&table, &whole), "{text}\ngranted {} to {asker:?} against the table", asked.id);
                        Some(GrantFilter::new(&grant(resource.clone())).expect("the gateway reads every grant the portal makes"))
                    }
                    _ => {
                        prop_assert!(!allows(&table, &whole), "{text}\n{} allowed by the table, not admitted: {admission:?}", asked.id);
                        None
                    }
                };
                for destination in DESTINATIONS {
                    let destination: IpAddr = destination.parse().unwrap();
                    let serving = table.resource_for_ip(destination);
                    for port in &ports {
                        let allowed = serving.is_some_and(|r| allows(&table, &asker.request(&tree, &r.id, Some(*port))));
                        let (forth, back) = packets(destination, port);
                        let passes = filter.as_ref().is_some_and(|f| f.check_bytes(&forth).is_ok());
                        // Sound: nothing passes that the table does not allow, whatever was asked.
                        prop_assert!(
                            !passes || (allowed && serving.is_some_and(|r| r.id == asked.id)),
                            "{text}\n{asker:?} asked for {}: {destination} {port} passes, but it is served by {:?} and the table allows it: {allowed}",
                            asked.id, serving.map(|r| &r.id)
                        );
                        if port.protocol != fz_compiler::table::Protocol::Icmp {
                            let reply = Packet::parse(&back).unwrap();
                            let answered = filter.as_ref().is_some_and(|f| f.check_reply(&reply));
                            prop_assert!(!answered || allowed, "{text}\na reply from {destination} {port} passes through {}", asked.id);
                        }
                        // Complete: asking for the serving resource opens what the table allows.
                        if allowed && serving.is_some_and(|r| r.id == asked.id) {
                            prop_assert!(passes, "{text}\n{asker:?}: the table allows {destination} {port} through {}, the filter drops it", asked.id);
                        }
                    }
                }
            }
            // Names: every DNS resource a client might ask for, with every name.
            for asked in resources.iter().filter(|r| matches!(r.address, fz_compiler::address::Address::Name(_))) {
                for name in NAMES {
                    let dns = DnsMapping { name: name.into(), mapped: vec!["100.96.0.1".parse().unwrap()] };
                    let admission = admit(&table, &session, &asked.id, Some(dns), asker.verified, at());
                    let serving = table.resource_for_name(name);
                    let allowed = serving.is_some_and(|r| allows(&table, &asker.request(&tree, &r.id, None)));
                    match &admission {
                        Admission::Granted { resource, .. } => {
                            prop_assert!(allowed && serving.is_some_and(|r| r.id == asked.id),
                                "{text}\n{asker:?}: `{name}` granted through {}, served by {:?}", asked.id, serving.map(|r| &r.id));
                            let filter = GrantFilter::new(&grant(resource.clone())).expect("a DNS grant the gateway reads");
                            for port in &ports {
                                let (forth, _) = packets("100.96.0.1".parse().unwrap(), port);
                                let on_port = allows(&table, &asker.request(&tree, &asked.id, Some(*port)));
                                prop_assert_eq!(filter.check_bytes(&forth).is_ok(), on_port, "{}\n`{}` {} through {}", text, name, port, asked.id);
                            }
                        }
                        _ => prop_assert!(
                            !(allowed && serving.is_some_and(|r| r.id == asked.id)),
                            "{text}\n{asker:?}: `{name}` allowed through {} by the table, refused: {admission:?}", asked.id
                        ),
                    }
                }
            }
        }
    }
}
