//! Random policy trees for property tests: a few sites, groups (static, open or both), users
//! and resources of every address kind, and rules over them with every kind of condition.

use std::net::IpAddr;

use chrono::{TimeZone, Utc};
use fz_compiler::Request;
use fz_compiler::condition::Context;
use fz_compiler::table::PortRange;
use proptest::prelude::*;

pub const USERS: [&str; 6] = [
    "u0@x.com", "u1@x.com", "u2@x.com", "u3@x.com", "u4@x.com", "U5@X.com",
];
pub const ADDRESSES: [&str; 12] = [
    "\"a.x.com\"",
    "\"*.x.com\"",
    "\"**.y.x.com\"",
    "\"app?.x.com\"",
    "\"10.0.0.0/8\"",
    "\"10.1.2.3\"",
    "\"fd00::/64\"",
    "\"fd00::5\"",
    "internet",
    "\"b.x.com\"",
    // Two patterns of equal specificity: the tie goes by their text.
    "\"a?.x.com\"",
    "\"?a.x.com\"",
];
pub const CONDITIONS: [&str; 11] = [
    "time mon-fri 08:00-18:00 Europe/Berlin",
    "time sat,sun 22:00-06:00 America/New_York",
    "time any 00:00-12:00 UTC",
    "country in DE, FR",
    "country not in US",
    "source in 10.0.0.0/8, 192.0.2.0/24",
    "source not in 192.0.2.0/24",
    "provider okta",
    "provider google",
    "client verified",
    "country in US",
];
pub const PORTS: [&str; 4] = ["tcp/443", "tcp/22", "udp/50-60", "icmp"];

#[derive(Clone, Debug)]
pub struct RuleSpec {
    pub deny: bool,
    pub subjects: Vec<usize>,
    pub targets: Vec<usize>,
    pub conditions: Vec<usize>,
}

/// Subjects index into: groups g0..g4, `everyone`, then `user` subjects of USERS.
pub const SUBJECTS: usize = 5 + 1 + USERS.len();
/// Targets index into: resources r0..r9, then `site s0..s2`.
pub const TARGETS: usize = ADDRESSES.len() + 3;

pub fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        prop::bool::weighted(0.25),
        prop::collection::vec(0..SUBJECTS, 1..3),
        prop::collection::vec(0..TARGETS, 1..3),
        prop::collection::vec(0..CONDITIONS.len(), 0..3),
    )
        .prop_map(|(deny, subjects, targets, conditions)| RuleSpec {
            deny,
            subjects,
            targets,
            conditions,
        })
}

#[derive(Clone, Debug)]
pub struct TreeSpec {
    pub resource_ports: Vec<Option<Vec<usize>>>,
    pub resource_sites: Vec<usize>,
    pub members: Vec<Vec<usize>>,
    pub idp: Vec<bool>,
    pub rules: Vec<RuleSpec>,
}

pub fn tree_spec() -> impl Strategy<Value = TreeSpec> {
    (
        prop::collection::vec(
            prop::option::of(prop::collection::vec(0..PORTS.len(), 1..3)),
            ADDRESSES.len(),
        ),
        prop::collection::vec(0..3usize, ADDRESSES.len()),
        prop::collection::vec(prop::collection::vec(0..USERS.len(), 0..3), 5),
        prop::collection::vec(any::<bool>(), 5),
        prop::collection::vec(rule_spec(), 1..25),
    )
        .prop_map(
            |(resource_ports, resource_sites, members, idp, rules)| TreeSpec {
                resource_ports,
                resource_sites,
                members,
                idp,
                rules,
            },
        )
}

pub fn render(tree: &TreeSpec) -> String {
    let mut text = String::from("site s0\nsite s1\nsite s2\n");
    for (i, address) in ADDRESSES.iter().enumerate() {
        let ports = match &tree.resource_ports[i] {
            Some(ports) => format!(
                "; ports {}",
                ports
                    .iter()
                    .map(|p| PORTS[*p])
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        };
        text += &format!(
            "resource r{i} {{ address {address}; site s{}{ports} }}\n",
            tree.resource_sites[i]
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
    for rule in &tree.rules {
        let subjects: Vec<String> = rule
            .subjects
            .iter()
            .map(|s| match *s {
                s if s < 5 => format!("g{s}"),
                5 => "everyone".to_owned(),
                s => format!("user \"{}\"", USERS[s - 6]),
            })
            .collect();
        let targets: Vec<String> = rule
            .targets
            .iter()
            .map(|t| {
                if *t < ADDRESSES.len() {
                    format!("r{t}")
                } else {
                    format!("site s{}", t - ADDRESSES.len())
                }
            })
            .collect();
        let conditions: Vec<&str> = rule.conditions.iter().map(|c| CONDITIONS[*c]).collect();
        let when = if conditions.is_empty() {
            String::new()
        } else {
            format!(" when {}", conditions.join(" and "))
        };
        text += &format!(
            "{} {} -> {}{when}\n",
            if rule.deny { "deny" } else { "allow" },
            subjects.join(", "),
            targets.join(", ")
        );
    }
    text
}

/// A request to one of the resources, by a user of the tree or a stranger, with claims,
/// a port and facts that fall inside and outside the conditions.
pub fn request() -> impl Strategy<Value = Request> {
    let user = prop_oneof![
        (0..USERS.len()).prop_map(|u| USERS[u].to_owned()),
        Just("stranger@x.com".to_owned())
    ];
    let groups = prop::collection::vec(
        prop_oneof![
            (0..5usize).prop_map(|g| format!("g{g}")),
            Just("unknown".to_owned())
        ],
        0..3,
    );
    let port = prop::option::of(prop_oneof![
        Just("tcp/443"),
        Just("tcp/22"),
        Just("udp/55"),
        Just("udp/61"),
        Just("icmp")
    ]);
    let at = prop::option::of(0..(366 * 24 * 60i64));
    let source = prop::option::of(prop_oneof![
        Just("10.2.3.4"),
        Just("192.0.2.9"),
        Just("203.0.113.1"),
        Just("fd00::1")
    ]);
    let country = prop::option::of(prop_oneof![Just("DE"), Just("FR"), Just("US"), Just("JP")]);
    let provider = prop::option::of(prop_oneof![Just("okta"), Just("google"), Just("email")]);
    (
        user,
        groups,
        0..ADDRESSES.len(),
        port,
        at,
        source,
        country,
        provider,
        any::<bool>(),
    )
        .prop_map(
            |(user, groups, resource, port, at, source, country, provider, verified)| Request {
                user,
                groups,
                resource: format!("r{resource}"),
                port: port.map(|p| p.parse::<PortRange>().expect("port")),
                context: Context {
                    at: at.map(|minutes| {
                        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
                            + chrono::Duration::minutes(minutes)
                    }),
                    source: source.map(|s| s.parse::<IpAddr>().expect("ip")),
                    country: country.map(str::to_owned),
                    provider: provider.map(str::to_owned),
                    verified,
                },
            },
        )
}
