//! Differential test: the fz decision table decides exactly as Cedar itself (the `cedar-policy`
//! crate) on the same policies and entities.
//!
//! Each case is a random tree (sites, resources, groups with static members or an `idp` line,
//! and allow/deny rules with subjects, targets and conditions). Every rule is written either as
//! an fz line in a `.fz` file or as a Cedar policy in a `.cedar` file, so trees mix the two
//! front ends; declarations are always fz. fz checks the tree (it must have no errors) and
//! builds its table. The oracle is one Cedar `PolicySet`: the `.cedar` files verbatim, plus
//! every `.fz` rule rendered as Cedar by this file's generator. Entities follow the model of
//! docs/language.md ("Cedar policies"): a `User` is in `Group::"everyone"`, the groups that
//! list it as a member and the open groups (with an `idp` line) the identity provider reports
//! (the request's groups), exactly as `DecisionTable::membership` counts them; a `Resource` is
//! in its `Site` and in every resource it lies inside (resources nest: hosts and ranges inside
//! wider ranges, names inside `*.` and `**.` patterns); the one action is
//! `Action::"connect"`. An fz deny reads as a Cedar `forbid` with `resource in` (it reaches the
//! resources inside its targets), an fz allow as a `permit` naming each resource with `==`
//! (a site's resources listed, since `in Site` would reach resources of other sites lying
//! inside them); `.cedar` files name each resource with `==` or `in` at random. Then, for random requests, fz's effect must equal Cedar's
//! decision, the rules that decided must be the same (compared by name, `as NAME` / `@id`),
//! and Cedar must report no evaluation error: an error would mean that a policy fz accepted
//! can be skipped by Cedar, failing open where fz does not.
//!
//! What is proved, then (by sampling, not exhaustively): on complete contexts, the Cedar front
//! end lowers every generated form as Cedar means it, and fz rules mean what their Cedar
//! rendering means. Cedar forms: the principal unconstrained, `in Group::` (`everyone` too),
//! `==`/`in User::`; every accepted action form; `==`/`in Resource::`, `in Site::`; country
//! tests by `[..].contains`, `containsAny` either way round, `==` and `!=` either way round,
//! `||` chains; source tests by `isInRange` and `||` chains, IPv4 and IPv6 (uppercase hex too),
//! single addresses and `/0`; `context.provider ==`; `context.client_verified` bare, `== true`,
//! `!= false`, and negated inside `unless`; `context["key"]`; `!`, `unless`, `&&` chains,
//! several clauses, `true`/`false` that say nothing; `\u{..}` escapes in strings and entity
//! ids; `@id`, other annotations, comments and layout; subjects and targets in `when` tests
//! (`principal in [..]`, `resource in [..]`, `||` of `==`/`in` tests); time windows on a
//! zone's clock (`context.time["ZONE"]`): day tests by `contains`, `==`, `!=` and `!`, minute
//! bounds by `<`, `<=`, `>`, `>=` either way round and `!`, several windows, windows across
//! midnight (to `00:00` too). fz forms: several subjects and targets, `everyone`, `user`,
//! `site ID`, `not in`, lowercase country codes, capitalised emails, `time` with day lists,
//! ranges and `any`, continuation lines, `as NAME`.
//! [`the_comparison_sees_both_outcomes_and_every_form`] checks that the generator still writes
//! each of them.
//!
//! Each tree also makes the round trip of `fzc export --cedar`: its `.fz` rules, exported and
//! put in the tree in their place, must compile to the same table.
//!
//! Missing facts are excluded by construction: every request context has every key
//! (`country`, `source_ip`, `provider`, `client_verified`, and the clock of every zone in
//! [`ZONES`]). On a missing fact fz fails closed (false in an allow, true in a deny;
//! docs/language.md, "Meaning"), where Cedar would skip the policy with an evaluation error;
//! that difference is deliberate and documented, so it is not compared here. A zone's clock is
//! computed from the request's instant as the entity model defines it (the local weekday and
//! minute, with chrono-tz); requests fall on window edges, a minute before them, and across
//! clock changes.
//!
//! Forms the front end refuses (lowercase country codes and capitalised emails in `.cedar`
//! files, which Cedar compares exactly) are not generated in `.cedar` files: they are E017,
//! tested with the front end's own tests. Not covered: ports (requests name none; a port
//! filter is fz's alone, checked after the policy decision) and resource addresses (requests
//! name the resource by id).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context as CedarContext, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, PolicySet, Request as CedarRequest, RestrictedExpression,
};
use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use fz_compiler::condition::Context;
use fz_compiler::table::Effect;
use fz_compiler::{DecisionTable, Request};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

// ------------------------------------------------------------------ sizes

/// Random trees per run of the property.
const CASES: u32 = 256;
/// Requests decided per tree.
const REQUESTS: usize = 48;

// ------------------------------------------------------------------ value pools

/// The users a tree may name (the first `TreeSpec::users` of them).
const USERS: [&str; 6] = [
    "alice@corp.example",
    "bob@corp.example",
    "carol@vendor.example",
    "dave@corp.example",
    "erin@corp.example",
    "frank@vendor.example",
];
/// A user no tree names.
const STRANGER: &str = "mallory@elsewhere.example";

const RULE_COUNTRIES: [&str; 6] = ["DE", "FR", "US", "GB", "RU", "JP"];
/// Requests come from listed countries and from some no rule lists.
const REQUEST_COUNTRIES: [&str; 8] = ["DE", "FR", "US", "GB", "RU", "JP", "BR", "CH"];

const NETWORKS: [&str; 10] = [
    "10.0.0.0/8",
    "192.168.1.0/24",
    "203.0.113.7",
    "198.51.100.0/25",
    "100.64.0.0/10",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8::1",
    "fd00::/8",
    "::/0",
];
/// Addresses inside and just outside each of [`NETWORKS`], IPv4 and IPv6.
const SOURCES: [&str; 15] = [
    "10.1.2.3",
    "10.255.255.255",
    "11.0.0.1",
    "192.168.1.200",
    "192.168.2.1",
    "203.0.113.7",
    "203.0.113.8",
    "198.51.100.127",
    "198.51.100.128",
    "100.127.255.255",
    "2001:db8::1",
    "2001:db8::2",
    "2001:db9::1",
    "fd12::1",
    "fe80::1",
];

const RULE_PROVIDERS: [&str; 3] = ["okta", "google", "email"];
const REQUEST_PROVIDERS: [&str; 4] = ["okta", "google", "email", "azure"];
const IDP_PROVIDERS: [&str; 2] = ["okta", "google"];

const PORTS: [&str; 3] = ["tcp/443", "tcp/22, udp/53", "icmp"];

/// Zones time windows read; the context carries the clock of each. Whole-hour offsets, with
/// and without daylight saving, so that requests on the hour fall on window edges everywhere.
const ZONES: [&str; 4] = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"];
/// Where windows start and end, in hours.
const HOURS: [u16; 9] = [0, 1, 6, 8, 12, 13, 18, 22, 24];
/// Day names as the clock gives them, Monday first: bit `i` of a day mask.
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// Weeks requests fall in, at midnight UTC on a Monday: the last week of March 2026 (Europe
/// moves its clocks on the 29th) and the week around 1 November 2026 (New York moves its).
const WEEKS: [&str; 2] = ["2026-03-23T00:00:00Z", "2026-10-26T00:00:00Z"];

// ------------------------------------------------------------------ the generated tree

/// A random tree, as drawn. Indexes may be out of range: [`TreeSpec::normalized`] maps them
/// into the tree (so shrinking never makes an invalid tree).
#[derive(Clone, Debug)]
struct TreeSpec {
    /// 1 to 3.
    sites: usize,
    /// How many of [`USERS`] the tree may name: 3 to 6.
    users: usize,
    resources: Vec<ResourceSpec>,
    groups: Vec<GroupSpec>,
    rules: Vec<RuleSpec>,
}

#[derive(Clone, Debug)]
struct ResourceSpec {
    site: usize,
    /// The address form, see [`resource_address`].
    address: usize,
    ports: Option<usize>,
}

#[derive(Clone, Debug)]
struct GroupSpec {
    /// Static members, indexes into the tree's users.
    members: Vec<usize>,
    /// An `idp PROVIDER "G"` line: the group is open.
    idp: Option<usize>,
}

#[derive(Clone, Debug)]
struct RuleSpec {
    deny: bool,
    subjects: Vec<Subject>,
    targets: Vec<Target>,
    conditions: Vec<Cond>,
    /// `as rule-N` / `@id("rule-N")`.
    named: bool,
    /// Written into a `.cedar` file when the lowering takes its shape.
    cedar: bool,
    /// Which file of its kind.
    file: usize,
    /// Drives every choice of form (spelling, layout, Cedar idiom).
    style: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Subject {
    Everyone,
    Group(usize),
    User(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Target {
    Resource(usize),
    Site(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Cond {
    Country {
        negated: bool,
        codes: Vec<usize>,
    },
    Source {
        negated: bool,
        networks: Vec<usize>,
    },
    Provider(usize),
    Verified,
    /// Days (a mask of [`DAY_NAMES`], not empty), windows as indexes into [`HOURS`] (start,
    /// end; an end before the start crosses midnight), and a zone of [`ZONES`].
    Time {
        days: u8,
        windows: Vec<(usize, usize)>,
        zone: usize,
    },
}

impl Cond {
    /// The windows in minutes, never empty (an end equal to its start moves an hour on).
    fn minutes(windows: &[(usize, usize)]) -> Vec<(u16, u16)> {
        windows
            .iter()
            .map(|(a, b)| {
                let start = HOURS.get(*a).copied().unwrap_or(8).min(23) * 60;
                let end = HOURS.get(*b).copied().unwrap_or(18) * 60;
                (start, if end == start { start + 60 } else { end })
            })
            .collect()
    }
}

fn subject() -> impl Strategy<Value = Subject> {
    prop_oneof![
        1 => Just(Subject::Everyone),
        4 => (0..5usize).prop_map(Subject::Group),
        2 => (0..6usize).prop_map(Subject::User),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => (0..8usize).prop_map(Target::Resource),
        1 => (0..3usize).prop_map(Target::Site),
    ]
}

fn cond() -> impl Strategy<Value = Cond> {
    prop_oneof![
        (
            any::<bool>(),
            prop::collection::vec(0..RULE_COUNTRIES.len(), 1..=3)
        )
            .prop_map(|(negated, codes)| Cond::Country { negated, codes }),
        (
            any::<bool>(),
            prop::collection::vec(0..NETWORKS.len(), 1..=3)
        )
            .prop_map(|(negated, networks)| Cond::Source { negated, networks }),
        (0..RULE_PROVIDERS.len()).prop_map(Cond::Provider),
        Just(Cond::Verified),
        (
            // Any days, and often one day, all days but one (written with `==`, `!=`) or
            // every day (`any`).
            prop_oneof![
                3 => 1..=0x7fu8,
                1 => (0..7u8).prop_map(|d| 1 << d),
                1 => (0..7u8).prop_map(|d| 0x7f & !(1 << d)),
                1 => Just(0x7fu8),
            ],
            prop::collection::vec((0..HOURS.len(), 0..HOURS.len()), 1..=2),
            0..ZONES.len(),
        )
            .prop_map(|(days, windows, zone)| Cond::Time {
                days,
                windows,
                zone
            }),
    ]
}

fn rule() -> impl Strategy<Value = RuleSpec> {
    // Mostly one subject and one target, so that many rules can go into Cedar files.
    let subjects = prop_oneof![
        3 => prop::collection::vec(subject(), 1..=1),
        1 => prop::collection::vec(subject(), 2..=3),
    ];
    let targets = prop_oneof![
        3 => prop::collection::vec(target(), 1..=1),
        1 => prop::collection::vec(target(), 2..=2),
    ];
    (
        prop::bool::weighted(0.3),
        subjects,
        targets,
        prop::collection::vec(cond(), 0..=3),
        prop::bool::weighted(0.3),
        any::<bool>(),
        0..2usize,
        any::<u64>(),
    )
        .prop_map(
            |(deny, subjects, targets, mut conditions, named, cedar, file, style)| {
                // One time condition per rule: the front end joins the clock tests of one
                // `when` clause into one window, so two windows on one zone would be
                // intersected into one (the same meaning, but a different table).
                let mut timed = false;
                conditions.retain(|c| {
                    !matches!(c, Cond::Time { .. }) || !std::mem::replace(&mut timed, true)
                });
                RuleSpec {
                    deny,
                    subjects,
                    targets,
                    conditions,
                    named,
                    cedar,
                    file,
                    style,
                }
            },
        )
}

fn tree_spec() -> impl Strategy<Value = TreeSpec> {
    let resource = (
        0..3usize,
        0..ADDRESS_FORMS,
        prop::option::of(0..PORTS.len()),
    )
        .prop_map(|(site, address, ports)| ResourceSpec {
            site,
            address,
            ports,
        });
    let group = (
        prop::collection::vec(0..USERS.len(), 0..=3),
        prop::option::of(0..IDP_PROVIDERS.len()),
    )
        .prop_map(|(members, idp)| GroupSpec { members, idp });
    (
        1..=3usize,
        3..=USERS.len(),
        prop::collection::vec(resource, 2..=8),
        prop::collection::vec(group, 1..=5),
        prop::collection::vec(rule(), 1..=12),
    )
        .prop_map(|(sites, users, resources, groups, rules)| TreeSpec {
            sites,
            users,
            resources,
            groups,
            rules,
        })
}

impl TreeSpec {
    /// Every index mapped into the tree, and no repeats where fz would read a list as a set.
    fn normalized(&self) -> TreeSpec {
        let (sites, users) = (self.sites, self.users);
        let (resources, groups) = (self.resources.len(), self.groups.len());
        let dedup = |items: Vec<usize>| -> Vec<usize> {
            let mut seen = BTreeSet::new();
            items.into_iter().filter(|i| seen.insert(*i)).collect()
        };
        TreeSpec {
            sites,
            users,
            resources: {
                let mut seen = HashSet::new();
                (0..)
                    .zip(&self.resources)
                    .map(|(i, r)| ResourceSpec {
                        site: r.site % sites,
                        // One address, one resource.
                        address: if seen.insert(resource_address(i, r.address)) {
                            r.address
                        } else {
                            0
                        },
                        ..r.clone()
                    })
                    .collect()
            },
            groups: self
                .groups
                .iter()
                .map(|g| GroupSpec {
                    members: dedup(g.members.iter().map(|m| m % users).collect()),
                    idp: g.idp,
                })
                .collect(),
            rules: self
                .rules
                .iter()
                .map(|rule| {
                    let mut seen = HashSet::new();
                    let subjects = rule
                        .subjects
                        .iter()
                        .map(|s| match *s {
                            Subject::Everyone => Subject::Everyone,
                            Subject::Group(g) => Subject::Group(g % groups),
                            Subject::User(u) => Subject::User(u % users),
                        })
                        .filter(|s| seen.insert(*s))
                        .collect();
                    let mut seen = HashSet::new();
                    let targets = rule
                        .targets
                        .iter()
                        .map(|t| match *t {
                            Target::Resource(r) => Target::Resource(r % resources),
                            Target::Site(s) => Target::Site(s % sites),
                        })
                        .filter(|t| seen.insert(*t))
                        .collect();
                    let conditions = rule
                        .conditions
                        .iter()
                        .map(|c| match c {
                            Cond::Country { negated, codes } => Cond::Country {
                                negated: *negated,
                                codes: dedup(codes.clone()),
                            },
                            Cond::Source { negated, networks } => Cond::Source {
                                negated: *negated,
                                networks: dedup(networks.clone()),
                            },
                            other => other.clone(),
                        })
                        .collect();
                    RuleSpec {
                        subjects,
                        targets,
                        conditions,
                        ..rule.clone()
                    }
                })
                .collect(),
        }
    }

    /// Whether a rule goes into a `.cedar` file: drawn so, and of a shape the lowering takes.
    fn in_cedar(&self, rule: &RuleSpec) -> bool {
        rule.cedar
    }

    fn email(&self, user: usize) -> &'static str {
        USERS.get(user).copied().unwrap_or(STRANGER)
    }
}

/// Address forms [`resource_address`] knows.
const ADDRESS_FORMS: usize = 9;

/// Resource `i`'s address, in one of [`ADDRESS_FORMS`] forms. The first six are `i`'s own, so
/// no two resources share one; the wider ones hold others (hosts and ranges of 10.200.0.0
/// inside each other, names inside `*.corp.example` and `**.corp.example`), and a tree that
/// would give two resources one of those falls back to the first form
/// ([`TreeSpec::normalized`]).
fn resource_address(i: usize, form: usize) -> String {
    match form {
        0 => format!("\"r{i}.corp.example\""),
        1 => format!("\"10.200.0.{}\"", i + 1),
        2 => format!("\"10.201.{i}.0/24\""),
        3 => format!("\"fd00:{}::/64\"", i + 1),
        4 => format!("\"*.r{i}.corp.example\""),
        5 => format!("\"**.w{i}.corp.example\""),
        6 => format!("\"10.200.0.0/{}\"", 17 + i % 8),
        7 => "\"*.corp.example\"".to_owned(),
        _ => "\"**.corp.example\"".to_owned(),
    }
}

/// What a resource's address is, as fz reads it.
fn parsed_address(i: usize, form: usize) -> fz_address::Address {
    resource_address(i, form)
        .trim_matches('"')
        .parse()
        .expect("an address")
}

/// SplitMix64, seeded by a rule's `style`: every choice of form is a function of the case.
#[derive(Debug)]
struct Style(u64);

impl Style {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ------------------------------------------------------------------ rendering: fz

/// The tree's files: `(path, text)`.
fn files(tree: &TreeSpec) -> Vec<(String, String)> {
    let mut declarations = String::new();
    for s in 0..tree.sites {
        writeln!(declarations, "site s{s} \"Site {s}\"").ok();
    }
    for (i, r) in tree.resources.iter().enumerate() {
        write!(
            declarations,
            "resource r{i} {{ address {}; site s{}",
            resource_address(i, r.address),
            r.site
        )
        .ok();
        if let Some(ports) = r.ports.and_then(|p| PORTS.get(p)) {
            write!(declarations, "; ports {ports}").ok();
        }
        declarations.push_str(" }\n");
    }
    for (i, g) in tree.groups.iter().enumerate() {
        writeln!(declarations, "group g{i} {{").ok();
        if !g.members.is_empty() {
            let mut style = Style(i as u64);
            let members: Vec<String> = g
                .members
                .iter()
                .map(|m| format!("\"{}\"", fz_email(tree.email(*m), &mut style)))
                .collect();
            writeln!(declarations, "  members {}", members.join(", ")).ok();
        }
        if let Some(provider) = g.idp.and_then(|p| IDP_PROVIDERS.get(p)) {
            writeln!(declarations, "  idp {provider} \"Group {i}\"").ok();
        }
        declarations.push_str("}\n");
    }

    let mut fz = [String::new(), String::new()];
    let mut cedar = [String::new(), String::new()];
    for (i, rule) in tree.rules.iter().enumerate() {
        if tree.in_cedar(rule) {
            if let Some(text) = cedar.get_mut(rule.file) {
                text.push_str(&cedar_file_rule(tree, i, rule));
            }
        } else if let Some(text) = fz.get_mut(rule.file) {
            text.push_str(&fz_rule(tree, i, rule));
        }
    }
    let [fz0, fz1] = fz;
    let [cedar0, cedar1] = cedar;
    [
        ("declarations.fz", declarations),
        ("rules.fz", fz0),
        ("teams/more.fz", fz1),
        ("access.cedar", cedar0),
        ("teams/more.cedar", cedar1),
    ]
    .into_iter()
    .filter(|(_, text)| !text.is_empty())
    .map(|(path, text)| (path.to_owned(), text))
    .collect()
}

fn rule_name(i: usize) -> String {
    format!("rule-{i}")
}

/// fz compares emails case-insensitively: sometimes capitalise the first letter.
fn fz_email(email: &str, style: &mut Style) -> String {
    if style.one_in(4) {
        capitalised(email)
    } else {
        email.to_owned()
    }
}

fn capitalised(email: &str) -> String {
    let mut chars = email.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

fn fz_rule(tree: &TreeSpec, i: usize, rule: &RuleSpec) -> String {
    let mut style = Style(rule.style);
    // Continuation lines are allowed after `,` and `->`, and before `when`, `and` and `as`.
    let breaks = |style: &mut Style| {
        if style.one_in(5) { "\n    " } else { " " }
    };
    let subjects: Vec<String> = rule
        .subjects
        .iter()
        .map(|s| match *s {
            Subject::Everyone => "everyone".to_owned(),
            Subject::Group(g) => format!("g{g}"),
            Subject::User(u) => format!("user \"{}\"", fz_email(tree.email(u), &mut style)),
        })
        .collect();
    let targets: Vec<String> = rule
        .targets
        .iter()
        .map(|t| match *t {
            Target::Resource(r) => format!("r{r}"),
            Target::Site(s) => format!("site s{s}"),
        })
        .collect();
    let effect = if rule.deny { "deny" } else { "allow" };
    let mut line = format!("{effect} {} ->", subjects.join(", "));
    line.push_str(breaks(&mut style));
    line.push_str(&targets.join(", "));
    for (n, c) in rule.conditions.iter().enumerate() {
        line.push_str(breaks(&mut style));
        line.push_str(if n == 0 { "when " } else { "and " });
        line.push_str(&fz_condition(c, &mut style));
    }
    if rule.named {
        line.push_str(breaks(&mut style));
        write!(line, "as {}", rule_name(i)).ok();
    }
    if style.one_in(6) {
        line.push_str("   # a comment");
    }
    line.push('\n');
    line
}

fn fz_condition(cond: &Cond, style: &mut Style) -> String {
    let not = |negated: bool| if negated { "not " } else { "" };
    match cond {
        Cond::Country { negated, codes } => {
            // fz takes lowercase codes and stores them uppercase.
            let lowercase = style.one_in(4);
            let codes: Vec<String> = codes
                .iter()
                .map(|c| {
                    let code = RULE_COUNTRIES.get(*c).copied().unwrap_or("DE");
                    if lowercase {
                        code.to_ascii_lowercase()
                    } else {
                        code.to_owned()
                    }
                })
                .collect();
            format!("country {}in {}", not(*negated), codes.join(", "))
        }
        Cond::Source { negated, networks } => {
            let networks: Vec<String> = networks.iter().map(|n| network(*n, style)).collect();
            format!("source {}in {}", not(*negated), networks.join(", "))
        }
        Cond::Provider(p) => {
            format!(
                "provider {}",
                RULE_PROVIDERS.get(*p).copied().unwrap_or("okta")
            )
        }
        Cond::Verified => "client verified".to_owned(),
        Cond::Time {
            days,
            windows,
            zone,
        } => {
            let days = match *days {
                0x7f if style.one_in(2) => "any".to_owned(),
                0x1f => "mon-fri".to_owned(),
                0x60 => "sat-sun".to_owned(),
                mask => DAY_NAMES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, d)| *d)
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let clock = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
            let windows: Vec<String> = Cond::minutes(windows)
                .iter()
                .map(|(s, e)| format!("{}-{}", clock(*s), clock(*e)))
                .collect();
            let zone = ZONES.get(*zone).copied().unwrap_or("UTC");
            format!("time {days} {} {zone}", windows.join(", "))
        }
    }
}

/// Network `n`, as written in either language: IPv6 hex digits are sometimes uppercase.
fn network(n: usize, style: &mut Style) -> String {
    let network = NETWORKS.get(n).copied().unwrap_or("10.0.0.0/8");
    if network.contains(':') && style.one_in(3) {
        network.to_ascii_uppercase()
    } else {
        network.to_owned()
    }
}

// ------------------------------------------------------------------ rendering: Cedar

/// One part of a policy's condition: an expression that must hold (`when`) or must not
/// (`unless`).
#[derive(Clone, Debug)]
enum Piece {
    When(String),
    Unless(String),
}

/// How a Cedar policy names a resource: `==` reaches the resource alone, `in` also every
/// resource inside it (and a site's, transitively).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    Named,
    Inside,
}

/// Rule `i` as a `.cedar` file holds it: each resource named with `in` or `==` at random (a
/// site always with `in`).
fn cedar_file_rule(tree: &TreeSpec, i: usize, rule: &RuleSpec) -> String {
    let mut style = Style(rule.style ^ 0x0eac);
    let targets: Vec<(Target, Reach)> = rule
        .targets
        .iter()
        .map(|t| match t {
            Target::Site(_) => (*t, Reach::Inside),
            Target::Resource(_) if style.one_in(3) => (*t, Reach::Inside),
            Target::Resource(_) => (*t, Reach::Named),
        })
        .collect();
    cedar_rule(tree, i, rule, &targets)
}

/// An fz rule as the Cedar oracle reads it: a deny reaches inside its targets (`in`); an allow
/// names its resources (`==`), a site's resources listed one by one, since Cedar's `in Site`
/// would also reach resources of other sites that lie inside them. `None` for an allow that
/// names only sites without resources: it covers nothing.
fn oracle_rule(tree: &TreeSpec, i: usize, rule: &RuleSpec) -> Option<String> {
    if rule.deny {
        let targets: Vec<(Target, Reach)> =
            rule.targets.iter().map(|t| (*t, Reach::Inside)).collect();
        return Some(cedar_rule(tree, i, rule, &targets));
    }
    let mut targets: Vec<Target> = Vec::new();
    for target in &rule.targets {
        match *target {
            Target::Resource(r) => targets.push(Target::Resource(r)),
            Target::Site(s) => targets.extend(
                (0..tree.resources.len())
                    .filter(|r| tree.resources[*r].site == s)
                    .map(Target::Resource),
            ),
        }
    }
    targets.sort();
    targets.dedup();
    let targets: Vec<(Target, Reach)> = targets.into_iter().map(|t| (t, Reach::Named)).collect();
    (!targets.is_empty()).then(|| cedar_rule(tree, i, rule, &targets))
}

fn cedar_rule(tree: &TreeSpec, i: usize, rule: &RuleSpec, targets: &[(Target, Reach)]) -> String {
    let mut style = Style(rule.style ^ 0xced4);
    let mut policy = String::new();
    if style.one_in(4) {
        policy.push_str("// generated\n");
    }
    if rule.named {
        writeln!(policy, "@id(\"{}\")", rule_name(i)).ok();
    }
    if style.one_in(6) {
        writeln!(policy, "@advice(\"rule {i}\")").ok();
    }
    let effect = if rule.deny { "forbid" } else { "permit" };

    // Lists of subjects or targets go into `when` tests; so, now and then, does a single one.
    let mut pieces = Vec::new();
    let principal = match rule.subjects.as_slice() {
        [one] if !style.one_in(4) => principal_scope(tree, *one, &mut style),
        many => {
            if let Some(test) = principal_test(tree, many, &mut style) {
                pieces.push(Piece::When(test));
            }
            "principal".to_owned()
        }
    };
    let action = match style.below(4) {
        0 => "action",
        1 => "action == Action::\"connect\"",
        2 => "action in [Action::\"connect\"]",
        _ => "action in Action::\"connect\"",
    };
    let resource = match targets {
        [(one, reach)] if !style.one_in(4) => resource_scope(*one, *reach, &mut style),
        many => {
            pieces.push(Piece::When(resource_test(many, &mut style)));
            "resource".to_owned()
        }
    };
    if style.one_in(3) {
        write!(
            policy,
            "{effect} (\n  {principal},\n  {action},\n  {resource}\n)"
        )
        .ok();
    } else {
        write!(policy, "{effect}({principal}, {action}, {resource})").ok();
    }

    pieces.extend(
        rule.conditions
            .iter()
            .map(|c| cedar_condition(c, &mut style)),
    );
    style.shuffle(&mut pieces);
    let mut clauses = clauses_of(pieces, &mut style);
    if style.one_in(8) {
        let filler = if style.one_in(2) {
            "when { true }"
        } else {
            "unless { false }"
        };
        let at = style.below(clauses.len() + 1);
        clauses.insert(at, filler.to_owned());
    }
    for clause in clauses {
        policy.push_str(if style.one_in(3) { "\n" } else { " " });
        policy.push_str(&clause);
    }
    policy.push_str(";\n");
    policy
}

/// Groups the pieces into `when` and `unless` clauses: `&&` chains, several `when` clauses,
/// `unless { a || b }`, and `unless` turned into `when { !(...) }`.
fn clauses_of(pieces: Vec<Piece>, style: &mut Style) -> Vec<String> {
    let mut whens: Vec<Vec<String>> = Vec::new();
    let mut unlesses: Vec<Vec<String>> = Vec::new();
    for piece in pieces {
        let (groups, expr) = match piece {
            Piece::Unless(expr) if style.one_in(3) => (&mut whens, format!("!({expr})")),
            Piece::Unless(expr) => (&mut unlesses, expr),
            Piece::When(expr) => (&mut whens, expr),
        };
        match groups.last_mut() {
            Some(group) if style.one_in(2) => group.push(expr),
            _ => groups.push(vec![expr]),
        }
    }
    // `true` in an `&&` chain and `false` in an `||` say nothing.
    let (w, u) = (whens.len().max(1), unlesses.len().max(1));
    if style.one_in(5)
        && let Some(group) = whens.get_mut(style.below(w))
    {
        group.insert(style.below(group.len() + 1), "true".to_owned());
    }
    if style.one_in(4)
        && let Some(group) = unlesses.get_mut(style.below(u))
    {
        group.insert(style.below(group.len() + 1), "false".to_owned());
    }
    let mut clauses: Vec<String> = whens
        .into_iter()
        .map(|parts| format!("when {{ {} }}", join_parts(&parts, " && ")))
        .chain(
            unlesses
                .into_iter()
                .map(|parts| format!("unless {{ {} }}", join_parts(&parts, " || "))),
        )
        .collect();
    style.shuffle(&mut clauses);
    clauses
}

/// Joins expressions with an operator, parenthesising each when there are several.
fn join_parts(parts: &[String], op: &str) -> String {
    match parts {
        [one] => one.clone(),
        many => many
            .iter()
            .map(|p| format!("({p})"))
            .collect::<Vec<_>>()
            .join(op),
    }
}

/// The entity a subject is, for `principal in [...]`: every user is in `Group::"everyone"`
/// (the entities say so, as the table does).
fn subject_entity(tree: &TreeSpec, s: Subject, style: &mut Style) -> String {
    match s {
        Subject::Everyone => format!("Group::{}", lit("everyone", style)),
        Subject::Group(g) => format!("Group::{}", lit(&format!("g{g}"), style)),
        Subject::User(u) => {
            format!("User::{}", lit(tree.email(u), style))
        }
    }
}

/// Subjects as a `when` test: `principal in [..]`, or `==`/`in` tests joined with `||`.
/// `None` (no test) for a list with `everyone`, most of the time.
fn principal_test(tree: &TreeSpec, subjects: &[Subject], style: &mut Style) -> Option<String> {
    if subjects.contains(&Subject::Everyone) && !style.one_in(3) {
        return None;
    }
    let entities: Vec<(Subject, String)> = subjects
        .iter()
        .map(|s| (*s, subject_entity(tree, *s, style)))
        .collect();
    Some(if style.one_in(2) {
        let list: Vec<&str> = entities.iter().map(|(_, e)| e.as_str()).collect();
        format!("principal in [{}]", list.join(", "))
    } else {
        let tests: Vec<String> = entities
            .iter()
            .map(|(s, e)| {
                let op = if matches!(s, Subject::User(_)) && !style.one_in(3) {
                    "=="
                } else {
                    "in"
                };
                format!("principal {op} {e}")
            })
            .collect();
        join_parts(&tests, " || ")
    })
}

/// Targets as a `when` test: `resource in [..]` (all reaching inside), or tests joined with
/// `||`, each with its own reach.
fn resource_test(targets: &[(Target, Reach)], style: &mut Style) -> String {
    let all_inside = targets.iter().all(|(_, reach)| *reach == Reach::Inside);
    if all_inside && style.one_in(2) {
        let list: Vec<String> = targets
            .iter()
            .map(|(t, _)| target_entity(*t, style))
            .collect();
        format!("resource in [{}]", list.join(", "))
    } else {
        let tests: Vec<String> = targets
            .iter()
            .map(|(t, reach)| resource_scope(*t, *reach, style))
            .collect();
        join_parts(&tests, " || ")
    }
}

fn principal_scope(tree: &TreeSpec, s: Subject, style: &mut Style) -> String {
    match s {
        // Every user is in `everyone` (the entities say so, as the table does).
        Subject::Everyone if style.one_in(4) => {
            format!("principal in Group::{}", lit("everyone", style))
        }
        Subject::Everyone => "principal".to_owned(),
        Subject::Group(g) => format!("principal in Group::{}", lit(&format!("g{g}"), style)),
        Subject::User(u) => {
            // `in` is reflexive: `principal in User::"e"` is that user too.
            let op = if style.one_in(3) { "in" } else { "==" };
            format!("principal {op} User::{}", lit(tree.email(u), style))
        }
    }
}

fn target_entity(t: Target, style: &mut Style) -> String {
    match t {
        Target::Resource(r) => format!("Resource::{}", lit(&format!("r{r}"), style)),
        Target::Site(s) => format!("Site::{}", lit(&format!("s{s}"), style)),
    }
}

fn resource_scope(t: Target, reach: Reach, style: &mut Style) -> String {
    match t {
        Target::Resource(r) => {
            let op = match reach {
                Reach::Inside => "in",
                Reach::Named => "==",
            };
            format!("resource {op} Resource::{}", lit(&format!("r{r}"), style))
        }
        Target::Site(s) => format!("resource in Site::{}", lit(&format!("s{s}"), style)),
    }
}

/// A Cedar string literal, now and then with a character written as a `\u{..}` escape.
fn lit(text: &str, style: &mut Style) -> String {
    let escape = if style.one_in(10) {
        Some(style.below(text.chars().count().max(1)))
    } else {
        None
    };
    let body: String = text
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if Some(i) == escape {
                format!("\\u{{{:x}}}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect();
    format!("\"{body}\"")
}

/// `context.country`, or `context["country"]` now and then.
fn key(name: &str, style: &mut Style) -> String {
    if style.one_in(6) {
        format!("context[\"{name}\"]")
    } else {
        format!("context.{name}")
    }
}

/// `a == b` with the operands either way round.
fn equals(left: &str, right: &str, op: &str, style: &mut Style) -> String {
    if style.one_in(4) {
        format!("{right} {op} {left}")
    } else {
        format!("{left} {op} {right}")
    }
}

fn cedar_condition(cond: &Cond, style: &mut Style) -> Piece {
    match cond {
        Cond::Country { negated, codes } => {
            let codes: Vec<String> = codes
                .iter()
                .map(|c| lit(RULE_COUNTRIES.get(*c).copied().unwrap_or("DE"), style))
                .collect();
            let any = country_any(&codes, style);
            let not_one = |style: &mut Style| match codes.as_slice() {
                [one] => Some(equals(&key("country", style), one, "!=", style)),
                _ => None,
            };
            match (negated, style.below(6)) {
                (false, 0) => Piece::Unless(format!("!({any})")),
                // `unless { country != "DE" }`, `when { !(country != "DE") }`.
                (false, 1) => not_one(style).map_or(Piece::When(any), Piece::Unless),
                (false, 2) => not_one(style).map_or_else(
                    || Piece::Unless(format!("!({any})")),
                    |t| Piece::When(format!("!({t})")),
                ),
                (false, _) => Piece::When(any),
                (true, 0 | 1) => Piece::Unless(any),
                (true, 2 | 3) => Piece::When(format!("!({any})")),
                (true, _) => {
                    let each: Vec<String> = codes
                        .iter()
                        .map(|c| equals(&key("country", style), c, "!=", style))
                        .collect();
                    Piece::When(each.join(" && "))
                }
            }
        }
        Cond::Source { negated, networks } => {
            let tests: Vec<String> = networks
                .iter()
                .map(|n| {
                    let network = lit(&network(*n, style), style);
                    format!("{}.isInRange(ip({network}))", key("source_ip", style))
                })
                .collect();
            let any = join_parts(&tests, " || ");
            match (negated, style.below(3)) {
                (false, _) => Piece::When(any),
                (true, 0) => Piece::Unless(any),
                (true, 1) => Piece::When(format!("!({any})")),
                (true, _) => {
                    let each: Vec<String> = tests.iter().map(|t| format!("!{t}")).collect();
                    Piece::When(each.join(" && "))
                }
            }
        }
        Cond::Provider(p) => {
            let provider = RULE_PROVIDERS.get(*p).copied().unwrap_or("okta");
            Piece::When(equals(
                &key("provider", style),
                &lit(provider, style),
                "==",
                style,
            ))
        }
        Cond::Verified => {
            let verified = key("client_verified", style);
            match style.below(6) {
                0 => Piece::When(equals(&verified, "true", "==", style)),
                1 => Piece::When(equals(&verified, "false", "!=", style)),
                2 => Piece::Unless(format!("!{verified}")),
                3 => Piece::Unless(equals(&verified, "false", "==", style)),
                _ => Piece::When(verified),
            }
        }
        Cond::Time {
            days,
            windows,
            zone,
        } => Piece::When(time_windows(*days, windows, *zone, style)),
    }
}

/// A time condition on a zone's clock: one clause per window, two for a window across
/// midnight (the second names the following days and has no lower bound, as the front end
/// reads them); clauses joined with `||`.
fn time_windows(days: u8, windows: &[(usize, usize)], zone: usize, style: &mut Style) -> String {
    let zone = ZONES.get(zone).copied().unwrap_or("UTC");
    let clock = if style.one_in(5) {
        format!("context[\"time\"][{}]", lit(zone, style))
    } else {
        format!("context.time[{}]", lit(zone, style))
    };
    let windows = Cond::minutes(windows);
    let several = windows.len() > 1;
    let mut clauses = Vec::new();
    for (start, end) in windows {
        if start < end {
            let mut tests = Vec::new();
            if days != 0x7f || style.one_in(3) {
                tests.push(day_test(&clock, days, style));
            }
            // A window of its own always has a lower bound when it is one of several, so that
            // it is not read as the second half of a window across midnight.
            // So does a window of every day, all day, that has no day test: some test must
            // name the zone's clock.
            let whole = tests.is_empty() && end >= 1440;
            if start > 0 || several || whole || style.one_in(2) {
                tests.push(lower_bound(&clock, start, style));
            }
            if end < 1440 {
                tests.push(upper_bound(&clock, end, style));
            }
            style.shuffle(&mut tests);
            clauses.push(tests.join(" && "));
        } else {
            let mut head = vec![lower_bound(&clock, start, style)];
            if days != 0x7f || style.one_in(3) {
                head.push(day_test(&clock, days, style));
            }
            style.shuffle(&mut head);
            let following = ((days << 1) | (days >> 6)) & 0x7f;
            let mut tail = vec![
                day_test(&clock, following, style),
                upper_bound(&clock, end, style),
            ];
            style.shuffle(&mut tail);
            clauses.push(head.join(" && "));
            clauses.push(tail.join(" && "));
        }
    }
    join_parts(&clauses, " || ")
}

/// The day is in `days`: `[..].contains`, `==` for one day, `!=` or `!` for all but some.
fn day_test(clock: &str, days: u8, style: &mut Style) -> String {
    let names = |mask: u8| -> Vec<String> {
        DAY_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, d)| format!("\"{d}\""))
            .collect()
    };
    let day = format!("{clock}.day");
    let (on, off) = (names(days), names(!days & 0x7f));
    match (on.as_slice(), off.as_slice()) {
        ([one], _) if style.one_in(2) => equals(&day, one, "==", style),
        (_, [one]) if style.one_in(2) => equals(&day, one, "!=", style),
        (_, off) if !off.is_empty() && style.one_in(3) => {
            format!("![{}].contains({day})", off.join(", "))
        }
        (on, _) => format!("[{}].contains({day})", on.join(", ")),
    }
}

/// The minute is at least `start`.
fn lower_bound(clock: &str, start: u16, style: &mut Style) -> String {
    let minute = format!("{clock}.minute");
    match style.below(5) {
        0 if start > 0 => format!("{minute} > {}", start - 1),
        1 => format!("{start} <= {minute}"),
        2 => format!("!({minute} < {start})"),
        _ => format!("{minute} >= {start}"),
    }
}

/// The minute is below `end`.
fn upper_bound(clock: &str, end: u16, style: &mut Style) -> String {
    let minute = format!("{clock}.minute");
    match style.below(5) {
        0 if end > 0 => format!("{minute} <= {}", end - 1),
        1 => format!("{end} > {minute}"),
        2 => format!("!({minute} >= {end})"),
        _ => format!("{minute} < {end}"),
    }
}

/// The country is one of `codes` (quoted): `[..].contains(..)`, `containsAny`, `==` tests
/// joined with `||`, or both mixed.
fn country_any(codes: &[String], style: &mut Style) -> String {
    let set = |codes: &[String]| format!("[{}]", codes.join(", "));
    match style.below(4) {
        0 => format!("{}.contains({})", set(codes), key("country", style)),
        // `containsAny`, either way round.
        1 if style.one_in(2) => {
            format!("[{}].containsAny({})", key("country", style), set(codes))
        }
        1 => format!("{}.containsAny([{}])", set(codes), key("country", style)),
        2 => {
            let tests: Vec<String> = codes
                .iter()
                .map(|c| equals(&key("country", style), c, "==", style))
                .collect();
            join_parts(&tests, " || ")
        }
        _ => {
            let tests: Vec<String> = codes
                .iter()
                .map(|c| {
                    if style.one_in(2) {
                        format!("[{c}].contains({})", key("country", style))
                    } else {
                        equals(&key("country", style), c, "==", style)
                    }
                })
                .collect();
            join_parts(&tests, " || ")
        }
    }
}

/// The oracle: the `.cedar` files verbatim, then every fz rule rendered as Cedar.
fn oracle_text(tree: &TreeSpec, files: &[(String, String)]) -> String {
    let mut text: String = files
        .iter()
        .filter(|(path, _)| path.ends_with(".cedar"))
        .map(|(_, text)| text.as_str())
        .collect();
    for (i, rule) in tree.rules.iter().enumerate() {
        if !tree.in_cedar(rule)
            && let Some(policy) = oracle_rule(tree, i, rule)
        {
            text.push_str(&policy);
        }
    }
    text
}

// ------------------------------------------------------------------ requests

/// A request, as drawn; indexes are mapped into the tree by [`Probe::request`].
#[derive(Clone, Debug)]
struct Probe {
    /// Into the tree's users; one past them is a user the tree never names.
    user: usize,
    /// Bit `g`: the identity provider reports group `g`; bit 7: a group the tree lacks.
    groups: u8,
    resource: usize,
    country: usize,
    source: usize,
    provider: usize,
    verified: bool,
    /// When: the week of [`WEEKS`], the day in it, the hour (UTC), and whether a minute
    /// before the hour (the last minute of a window that ends on it).
    at: (usize, u8, u8, bool),
}

fn probe() -> impl Strategy<Value = Probe> {
    (
        0..=USERS.len(),
        any::<u8>(),
        any::<usize>(),
        0..REQUEST_COUNTRIES.len(),
        0..SOURCES.len(),
        0..REQUEST_PROVIDERS.len(),
        any::<bool>(),
        (0..WEEKS.len(), 0..7u8, 0..24u8, any::<bool>()),
    )
        .prop_map(
            |(user, groups, resource, country, source, provider, verified, at)| Probe {
                user,
                groups,
                resource,
                country,
                source,
                provider,
                verified,
                at,
            },
        )
}

impl Probe {
    fn instant(&self) -> DateTime<Utc> {
        let (week, day, hour, early) = self.at;
        let monday: DateTime<Utc> = WEEKS
            .get(week)
            .copied()
            .unwrap_or("2026-03-23T00:00:00Z")
            .parse()
            .expect("an instant");
        let minutes = i64::from(day) * 1440 + i64::from(hour) * 60 - i64::from(early);
        monday + TimeDelta::minutes(minutes)
    }

    fn request(&self, tree: &TreeSpec) -> Request {
        let user = if self.user >= tree.users {
            STRANGER
        } else {
            tree.email(self.user)
        };
        let mut groups: Vec<String> = (0..tree.groups.len())
            .filter(|g| self.groups & (1 << g) != 0)
            .map(|g| format!("g{g}"))
            .collect();
        if self.groups & 0x80 != 0 {
            groups.push("unknown".to_owned());
        }
        Request {
            user: user.to_owned(),
            groups,
            resource: format!("r{}", self.resource % tree.resources.len()),
            port: None,
            context: Context {
                at: Some(self.instant()),
                source: SOURCES.get(self.source).map(|s| s.parse().expect("ip")),
                country: REQUEST_COUNTRIES.get(self.country).map(|c| (*c).to_owned()),
                provider: REQUEST_PROVIDERS
                    .get(self.provider)
                    .map(|p| (*p).to_owned()),
                verified: self.verified,
            },
        }
    }
}

// ------------------------------------------------------------------ Cedar entities

/// An entity uid, of one of the model's five types. Parsing a uid goes through Cedar's parser,
/// which is slow unoptimised: the type names are parsed once per thread.
fn uid(ty: &str, id: &str) -> EntityUid {
    thread_local! {
        static TYPES: Vec<(&'static str, EntityTypeName)> = ["User", "Group", "Resource", "Site", "Action"]
            .into_iter()
            .map(|t| (t, EntityTypeName::from_str(t).expect("type name")))
            .collect();
    }
    let ty = TYPES.with(|types| {
        types
            .iter()
            .find(|(name, _)| *name == ty)
            .map(|(_, t)| t.clone())
            .expect("a type of the model")
    });
    EntityUid::from_type_name_and_id(ty, EntityId::new(id))
}

/// Everything but the user: groups, sites, resources in their sites, and the action.
fn fixed_entities(tree: &TreeSpec) -> Vec<Entity> {
    let mut entities = vec![
        Entity::new_no_attrs(uid("Action", "connect"), HashSet::new()),
        Entity::new_no_attrs(uid("Group", "everyone"), HashSet::new()),
        Entity::new_no_attrs(uid("Group", "unknown"), HashSet::new()),
    ];
    for g in 0..tree.groups.len() {
        entities.push(Entity::new_no_attrs(
            uid("Group", &format!("g{g}")),
            HashSet::new(),
        ));
    }
    for s in 0..tree.sites {
        entities.push(Entity::new_no_attrs(
            uid("Site", &format!("s{s}")),
            HashSet::new(),
        ));
    }
    for (i, r) in tree.resources.iter().enumerate() {
        // A resource is in its site and in every resource it lies inside.
        let address = parsed_address(i, r.address);
        let mut parents = HashSet::from([uid("Site", &format!("s{}", r.site))]);
        for (j, other) in tree.resources.iter().enumerate() {
            if address.lies_inside(&parsed_address(j, other.address)) {
                parents.insert(uid("Resource", &format!("r{j}")));
            }
        }
        entities.push(Entity::new_no_attrs(
            uid("Resource", &format!("r{i}")),
            parents,
        ));
    }
    entities
}

/// The user's groups as `DecisionTable::membership` counts them: `everyone`, the groups that
/// list the user as a static member, and the open groups (those with an `idp` line) among
/// the ones the identity provider reports.
fn user_entity(tree: &TreeSpec, request: &Request) -> Entity {
    let mut parents = HashSet::from([uid("Group", "everyone")]);
    for (g, group) in tree.groups.iter().enumerate() {
        let claimed = group.idp.is_some() && request.groups.contains(&format!("g{g}"));
        if claimed || group.members.iter().any(|m| tree.email(*m) == request.user) {
            parents.insert(uid("Group", &format!("g{g}")));
        }
    }
    Entity::new_no_attrs(uid("User", &request.user), parents)
}

/// The request's context as Cedar's record, with every key: the clock of every zone in
/// [`ZONES`] is the local weekday and minute of the request's instant. Building one evaluates
/// `ip(..)`, which is slow unoptimised, and requests draw from few contexts: they are kept per
/// thread.
fn cedar_context(context: &Context) -> CedarContext {
    type Key = (String, IpAddr, String, bool, DateTime<Utc>);
    thread_local! {
        static BUILT: RefCell<HashMap<Key, CedarContext>> = RefCell::new(HashMap::new());
    }
    let key = (
        context.country.clone().expect("complete"),
        context.source.expect("complete"),
        context.provider.clone().expect("complete"),
        context.verified,
        context.at.expect("complete"),
    );
    BUILT.with(|built| {
        built
            .borrow_mut()
            .entry(key)
            .or_insert_with_key(|(country, source, provider, verified, at)| {
                let clocks = ZONES.iter().map(|zone| {
                    let local = at.with_timezone(&zone.parse::<Tz>().expect("a zone"));
                    let day = DAY_NAMES
                        .get(local.weekday().num_days_from_monday() as usize)
                        .copied()
                        .unwrap_or("mon");
                    let minute = i64::from(local.hour() * 60 + local.minute());
                    let clock = RestrictedExpression::new_record([
                        (
                            "day".to_owned(),
                            RestrictedExpression::new_string(day.to_owned()),
                        ),
                        ("minute".to_owned(), RestrictedExpression::new_long(minute)),
                    ])
                    .expect("a clock");
                    ((*zone).to_owned(), clock)
                });
                CedarContext::from_pairs([
                    (
                        "country".to_owned(),
                        RestrictedExpression::new_string(country.clone()),
                    ),
                    (
                        "source_ip".to_owned(),
                        RestrictedExpression::new_ip(source.to_string()),
                    ),
                    (
                        "provider".to_owned(),
                        RestrictedExpression::new_string(provider.clone()),
                    ),
                    (
                        "client_verified".to_owned(),
                        RestrictedExpression::new_bool(*verified),
                    ),
                    (
                        "time".to_owned(),
                        RestrictedExpression::new_record(clocks).expect("clocks"),
                    ),
                ])
                .expect("context")
            })
            .clone()
    })
}

// ------------------------------------------------------------------ the comparison

/// What one tree's comparison saw, for the test that the comparison is not vacuous.
#[derive(Clone, Debug, Default)]
struct Tally {
    decisions: usize,
    allows: usize,
    /// Denials by a deny rule (not for want of an allow).
    denied_by_rule: usize,
    /// Decisions that a rule from a `.cedar` file took part in.
    by_cedar_rule: usize,
    /// Rules written into `.cedar` files, and into `.fz` files.
    cedar_rules: usize,
    fz_rules: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.decisions += other.decisions;
        self.allows += other.allows;
        self.denied_by_rule += other.denied_by_rule;
        self.by_cedar_rule += other.by_cedar_rule;
        self.cedar_rules += other.cedar_rules;
        self.fz_rules += other.fz_rules;
    }
}

fn show_files(files: &[(String, String)]) -> String {
    files
        .iter()
        .map(|(path, text)| format!("--- {path}\n{text}"))
        .collect()
}

/// `fzc export --cedar` of the tree's `.fz` rules, in the tree in place of those rules,
/// compiles to the same table (rule provenance aside).
fn round_trip(
    files: &[(String, String)],
    exported: Result<String, Vec<fz_lang::Diagnostic>>,
    original: &fz_compiler::Table,
) -> Result<(), String> {
    let exported = exported.map_err(|refused| {
        format!(
            "the export was refused\n{}\n{refused:#?}",
            show_files(files)
        )
    })?;
    let mut kept: Vec<(&str, &str)> = files
        .iter()
        .filter(|(path, _)| path == "declarations.fz" || path.ends_with(".cedar"))
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    kept.push(("exported.cedar", &exported));
    let dir = common::tree(&kept);
    let checked = fz_compiler::check(fz_compiler::load_tree(dir.path()).expect("loads"));
    let round_trip = checked.table.ok_or_else(|| {
        format!(
            "the export does not compile\n{}\n--- exported.cedar\n{exported}\n{:#?}",
            show_files(files),
            checked.diagnostics
        )
    })?;
    if common::meaning(&round_trip) != common::meaning(original) {
        return Err(format!(
            "the export compiles to another table\n{}\n--- exported.cedar\n{exported}\n\
             --- original\n{}\n--- round trip\n{}",
            show_files(files),
            common::meaning(original),
            common::meaning(&round_trip)
        ));
    }
    Ok(())
}

/// Checks the tree with fz, builds the Cedar oracle, and compares every request. `Err` says
/// what differed, with everything needed to reproduce it.
fn compare(spec: &TreeSpec, probes: &[Probe]) -> Result<Tally, String> {
    let tree = spec.normalized();
    let files = files(&tree);
    let dir = common::tree(
        &files
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect::<Vec<_>>(),
    );
    let checked = fz_compiler::check(fz_compiler::load_tree(dir.path()).expect("loads"));
    let errors: Vec<String> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| {
            let (path, line, column) = checked.sources.position(d.loc);
            let label = d.label.as_deref().unwrap_or("");
            let help = d.help.as_deref().unwrap_or("");
            format!(
                "error[{}]: {} --> {path}:{line}:{column} ({label}; help: {help})",
                d.code.as_str(),
                d.message
            )
        })
        .collect();
    if !errors.is_empty() {
        return Err(format!(
            "fz rejected the tree\n{}\n{}",
            show_files(&files),
            errors.join("\n")
        ));
    }
    let exported = fz_compiler::cedar::export(&checked, ".");
    let original = checked.table.expect("a table without errors");
    round_trip(&files, exported, &original)?;
    let table = DecisionTable::new(original);

    let oracle = oracle_text(&tree, &files);
    let policies = PolicySet::from_str(&oracle).map_err(|e| {
        format!(
            "Cedar rejected the oracle\n{}\n--- oracle\n{oracle}\n{e:?}",
            show_files(&files)
        )
    })?;
    let fixed = fixed_entities(&tree);
    let base = Entities::from_entities(fixed.iter().cloned(), None).expect("entities");
    let authorizer = Authorizer::new();

    let mut tally = Tally {
        cedar_rules: tree.rules.iter().filter(|r| tree.in_cedar(r)).count(),
        fz_rules: tree.rules.iter().filter(|r| !tree.in_cedar(r)).count(),
        ..Tally::default()
    };
    for probe in probes {
        let request = probe.request(&tree);
        let fz = table.decide(&request);

        let user = user_entity(&tree, &request);
        let parents = format!("{user}");
        let entities = base.clone().add_entities([user], None).expect("entities");
        let cedar_request = CedarRequest::new(
            uid("User", &request.user),
            uid("Action", "connect"),
            uid("Resource", &request.resource),
            cedar_context(&request.context),
            None,
        )
        .expect("request");
        let response = authorizer.is_authorized(&cedar_request, &policies, &entities);

        let cedar_errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();

        // The rules that decided, by name: fz's ids (derived ids are unnamed), Cedar's `@id`s.
        let rules = &table.table().rules;
        let mut fz_names: Vec<Option<String>> = fz
            .rules
            .iter()
            .map(|r| {
                let id = &rules[*r as usize].id;
                (!id.contains('#')).then(|| id.clone())
            })
            .collect();
        fz_names.sort();
        let mut cedar_names: Vec<Option<String>> = response
            .diagnostics()
            .reason()
            .map(|id| policies.annotation(id, "id").map(str::to_owned))
            .collect();
        cedar_names.sort();

        let cedar_effect = match response.decision() {
            CedarDecision::Allow => Effect::Allow,
            CedarDecision::Deny => Effect::Deny,
        };
        if fz.effect != cedar_effect || fz_names != cedar_names || !cedar_errors.is_empty() {
            let fz_rules: Vec<(&str, &str)> = fz
                .rules
                .iter()
                .map(|r| {
                    let rule = &rules[*r as usize];
                    (rule.id.as_str(), rule.origin.as_str())
                })
                .collect();
            let cedar_policies: Vec<String> = response
                .diagnostics()
                .reason()
                .map(ToString::to_string)
                .collect();
            return Err(format!(
                "fz and Cedar disagree\n{}\n--- oracle (Cedar policy set)\n{oracle}\n\
                 request: {request:?}\nCedar user entity: {parents}\n\
                 fz: {:?} ({:?}) by {fz_rules:?}, names {fz_names:?}\n\
                 Cedar: {:?} by {cedar_policies:?}, names {cedar_names:?}\n\
                 Cedar errors: {cedar_errors:#?}",
                show_files(&files),
                fz.effect,
                fz.reason,
                response.decision(),
            ));
        }

        tally.decisions += 1;
        tally.allows += usize::from(fz.effect == Effect::Allow);
        tally.denied_by_rule += usize::from(fz.reason == fz_compiler::Reason::DeniedByRule);
        tally.by_cedar_rule += usize::from(
            fz.rules
                .iter()
                .any(|r| rules[*r as usize].origin.contains(".cedar:")),
        );
    }

    Ok(tally)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// fz decides every request exactly as Cedar does, by the same rules, and Cedar never
    /// errors on the policies fz accepted.
    #[test]
    fn fz_decides_as_cedar(tree in tree_spec(), probes in prop::collection::vec(probe(), REQUESTS)) {
        if let Err(report) = compare(&tree, &probes) {
            prop_assert!(false, "{}", report);
        }
    }
}

/// The comparison is not vacuous: over a fixed sample of trees drawn as the property draws
/// them, both outcomes are common, deny rules decide, rules from `.cedar` files take part in
/// many decisions, and the files use every form the generator knows.
#[test]
fn the_comparison_sees_both_outcomes_and_every_form() {
    const TREES: usize = 64;
    let mut runner = TestRunner::deterministic();
    let mut total = Tally::default();
    let (mut fz_text, mut cedar_text) = (String::new(), String::new());
    for _ in 0..TREES {
        let tree = tree_spec().new_tree(&mut runner).expect("a tree").current();
        let probes = prop::collection::vec(probe(), REQUESTS)
            .new_tree(&mut runner)
            .expect("requests")
            .current();
        match compare(&tree, &probes) {
            Ok(tally) => total.add(&tally),
            Err(report) => panic!("{report}"),
        }
        for (path, text) in files(&tree.normalized()) {
            let into = if path.ends_with(".cedar") {
                &mut cedar_text
            } else {
                &mut fz_text
            };
            into.push_str(&text);
        }
    }
    let Tally {
        decisions,
        allows,
        denied_by_rule,
        by_cedar_rule,
        cedar_rules,
        fz_rules,
    } = total;
    assert_eq!(decisions, TREES * REQUESTS);
    assert!(
        allows * 10 >= decisions && allows * 10 <= decisions * 9,
        "{total:?}"
    );
    assert!(denied_by_rule * 20 >= decisions, "{total:?}");
    assert!(by_cedar_rule * 10 >= decisions, "{total:?}");
    assert!(cedar_rules * 4 >= cedar_rules + fz_rules, "{total:?}");
    assert!(fz_rules * 4 >= cedar_rules + fz_rules, "{total:?}");

    let fz_forms = [
        "allow ",
        "deny ",
        "everyone",
        "user \"",
        "-> site s",
        ", ",
        "country in ",
        "country not in ",
        "source in ",
        "source not in ",
        "provider ",
        "client verified",
        " as rule-",
        "\n    ",
        "members \"",
        "idp okta",
        "when time ",
        "any ",
        "-24:00",
        // Resources that hold others.
        "address \"10.200.0.0/",
        "address \"*.corp.example\"",
        "address \"**.corp.example\"",
    ];
    for form in fz_forms {
        assert!(fz_text.contains(form), "no `{form}` in the .fz files");
    }
    // A country code in lowercase, and an email with a capital.
    assert!(
        RULE_COUNTRIES
            .iter()
            .any(|c| fz_text.contains(&format!("in {}", c.to_ascii_lowercase())))
    );
    assert!(USERS.iter().any(|u| fz_text.contains(&capitalised(u))));
    let cedar_forms = [
        "permit",
        "forbid",
        "@id(\"rule-",
        "@advice(",
        "// generated",
        "(principal,",
        "(principal in Group::\"everyone\"",
        "(principal in Group::",
        "(principal == User::",
        "(principal in User::",
        "action,",
        "action == Action::\"connect\"",
        "action in [Action::\"connect\"]",
        "action in Action::\"connect\"",
        "resource == Resource::",
        "resource in Resource::",
        "resource in Site::",
        "].contains(context.country)",
        "].contains(context[\"country\"])",
        "[context.country].containsAny([",
        "].containsAny([context.country])",
        "context.country == \"",
        "context.country != \"",
        "== context.country",
        "!(context.country != ",
        ".isInRange(ip(\"",
        "!context.source_ip.isInRange(",
        "context.provider == \"",
        "== context.provider",
        "context.client_verified }",
        "context.client_verified == true",
        "context.client_verified != false",
        "context.client_verified == false",
        "!context.client_verified",
        "when { ",
        "unless { ",
        ") && (",
        ") || (",
        "!((",
        "when { true }",
        "unless { false }",
        "(true)",
        "(false)",
        "\\u{",
        "\n)",
        "principal in [",
        "resource in [",
        ") || (principal ",
        "context.time[\"",
        "context[\"time\"][\"",
        ".day == \"",
        ".day != \"",
        "].contains(context.time[",
        "![\"",
        ".minute >= ",
        ".minute < ",
        ".minute > ",
        ".minute <= ",
        " <= context.time[",
        " > context.time[",
        "!(context.time[",
        ".minute < 0",
    ];
    for form in cedar_forms {
        assert!(cedar_text.contains(form), "no `{form}` in the .cedar files");
    }
}
