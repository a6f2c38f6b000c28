//! Property tests.
//! - Random edits of valid files never panic the parser, the checker, the bundle writer or a
//!   decision: bad input gets diagnostics, nothing else.
//! - On random trees and random requests, the indexed table decides exactly as a direct,
//!   unindexed reading of the rules does (every rule scanned, membership recomputed from the
//!   group lists), and names the same rules.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::net::IpAddr;

use common::random_tree::{ADDRESSES, render, request, tree_spec};
use fz_compiler::table::{Effect, Rule, Table};
use fz_compiler::{DecisionTable, Request};
use fz_lang::{Code, FileId, SourceFile, Sources};
use proptest::prelude::*;

// ------------------------------------------------------------------ never panics

/// Every policy file of the example and fixture trees, `.fz` and `.cedar`: (path, text).
fn seed_files() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "policies",
        "tests/fixtures/diagnostics",
        "tests/fixtures/language-md",
        "tests/fixtures/cedar",
    ] {
        let sources = fz_compiler::load_tree(&root.join(dir)).expect("fixture tree");
        files.extend(
            sources
                .iter()
                .map(|(_, f)| (f.path.clone(), f.text.clone())),
        );
    }
    files
}

/// Pieces of the language and of plausible mistakes, to splice into files.
const SPLICES: &[&str] = &[
    "{",
    "}",
    ";",
    "\n",
    "->",
    ",",
    "\"",
    "\\",
    "#",
    " when ",
    " and ",
    " as x",
    "time",
    "mon-fri",
    "25:61",
    "08:00-18:00",
    "Europe/Berlin",
    "country in",
    "DE",
    "source in",
    "10.0.0.0/33",
    "::/129",
    "tcp/0",
    "udp/65536",
    "tcp/9-1",
    "icmp",
    "**.",
    "*.",
    "?",
    "internet",
    "site",
    "resource",
    "group",
    "allow",
    "deny",
    "test",
    "assert never",
    "assert only",
    "expect allow",
    "given",
    "user \"x@y.z\"",
    "everyone",
    "\u{feff}",
    "permit (",
    "forbid (",
    "principal in Group::\"g\"",
    "resource == Resource::\"r\"",
    "when { ",
    "unless { ",
    "&&",
    "||",
    "context.country",
    "@id(\"x\")",
    "é",
    "\t",
    "\r\n",
    "members",
    "idp okta \"G\"",
    "ports",
    "address",
];

#[derive(Clone, Debug)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, piece: usize },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Truncate { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..40usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 0..SPLICES.len()).prop_map(|(at, piece)| Edit::Insert { at, piece }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
    ]
}

fn char_boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<&str> = text.split('\n').collect();
    match *edit {
        Edit::Delete { at, len } => {
            let start = char_boundary(text, at);
            let end = char_boundary(text, (start + len).min(text.len()));
            format!("{}{}", &text[..start], &text[end.max(start)..])
        }
        Edit::Insert { at, piece } => {
            let at = char_boundary(text, at);
            format!("{}{}{}", &text[..at], SPLICES[piece], &text[at..])
        }
        Edit::DuplicateLine { line } => {
            let line = line % lines.len();
            lines.insert(line, lines[line]);
            lines.join("\n")
        }
        Edit::SwapLines { a, b } => {
            let n = lines.len();
            lines.swap(a % n, b % n);
            lines.join("\n")
        }
        Edit::Truncate { at } => text[..char_boundary(text, at)].to_owned(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn edited_files_never_panic(file in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..6)) {
        let files = seed_files();
        let (path, mut text) = file.get(&files).clone();
        // Keep the extension, so each front end gets its own kind of file.
        let name = if path.ends_with(".cedar") { "edited.cedar" } else { "edited.fz" };
        for e in &edits {
            text = apply(&text, e);
        }
        let checked = fz_compiler::check(Sources::new(vec![SourceFile::new(name, text)]));
        for diagnostic in &checked.diagnostics {
            prop_assert!(!diagnostic.message.is_empty());
            if diagnostic.loc.file == FileId::TREE {
                // About the tree as a whole: an edit that leaves no rule.
                prop_assert_eq!(diagnostic.code, Code::NoRules);
                continue;
            }
            let (path, line, column) = checked.sources.position(diagnostic.loc);
            prop_assert!(path == name && line >= 1 && column >= 1);
        }
        if let Some(table) = checked.table {
            let bytes = fz_compiler::Bundle::new(table.clone()).and_then(|b| b.to_bytes());
            prop_assert!(bytes.is_ok());
            let decisions = DecisionTable::new(table);
            for resource in &decisions.table().resources {
                let request = Request { user: "x@y.z".into(), resource: resource.id.clone(), ..Request::default() };
                let _ = decisions.decide(&request);
            }
        }
    }
}

// ------------------------------------------------------------------ index == direct reading

/// The meaning of LANGUAGE.md read straight off the rule list: no per-resource index, no
/// bitsets, membership recomputed from each group's member list.
fn direct(table: &Table, request: &Request) -> (Effect, Vec<String>) {
    let Some(resource) = table
        .resources
        .iter()
        .position(|r| r.id == request.resource)
    else {
        return (Effect::Deny, Vec::new());
    };
    let email = request.user.to_lowercase();
    // A claimed group counts only when it is open: the tree alone fills static-only groups.
    let member = |g: u32| {
        let group = &table.groups[g as usize];
        group.id == "everyone"
            || group.members.contains(&email)
            || (group.is_open() && request.groups.contains(&group.id))
    };
    let names_user = |rule: &Rule| {
        rule.groups.iter().any(|g| member(*g))
            || rule
                .users
                .iter()
                .any(|u| table.users[*u as usize].email == email)
    };
    // A rule reaches the resources it names; a deny also every resource inside one of them.
    let reaches = |rule: &Rule| {
        rule.resources.contains(&(resource as u32))
            || (rule.effect == Effect::Deny
                && rule.resources.iter().any(|named| {
                    table.resources[resource]
                        .address
                        .lies_inside(&table.resources[*named as usize].address)
                }))
    };
    let applies = |rule: &Rule, when_missing: bool| {
        reaches(rule)
            && names_user(rule)
            && rule
                .conditions
                .iter()
                .all(|c| c.holds(&request.context, when_missing))
    };
    let ids = |effect: Effect, when_missing: bool| -> Vec<String> {
        table
            .rules
            .iter()
            .filter(|r| r.effect == effect && applies(r, when_missing))
            .map(|r| r.id.clone())
            .collect()
    };
    if let (Some(port), Some(ports)) = (request.port, &table.resources[resource].ports)
        && !ports.iter().any(|p| p.covers(&port))
    {
        return (Effect::Deny, Vec::new());
    }
    let denies = ids(Effect::Deny, true);
    if !denies.is_empty() {
        return (Effect::Deny, denies);
    }
    let allows = ids(Effect::Allow, false);
    if allows.is_empty() {
        (Effect::Deny, Vec::new())
    } else {
        (Effect::Allow, allows)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_table_decides_as_the_rules_say(tree in tree_spec(), requests in prop::collection::vec(request(), 40)) {
        let text = render(&tree);
        let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("random.fz", text.clone())]));
        let errors: Vec<_> = checked.diagnostics.iter().filter(|d| d.is_error()).collect();
        prop_assert!(errors.is_empty(), "{text}\n{errors:#?}");
        let table = checked.table.expect("a table");
        let decisions = DecisionTable::new(table.clone());
        for request in &requests {
            let decision = decisions.decide(request);
            let ids: Vec<String> = decision.rules.iter().map(|r| table.rules[*r as usize].id.clone()).collect();
            prop_assert_eq!((decision.effect, ids), direct(&table, request), "{}\n{:?}", text, request);
        }
    }
}

// ------------------------------------------------------------------ proved invariants hold

/// `assert never gK -> rJ` or `assert only gK -> rJ` on a random tree.
fn assertion() -> impl Strategy<Value = (bool, usize, usize)> {
    (any::<bool>(), 0..5usize, 0..ADDRESSES.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// When `fzc check` says an invariant holds, no request breaks it: every sampled request by
    /// a user the invariant covers, with any identity-provider groups (only groups with an
    /// `idp` line can be synced), is decided as the invariant says.
    #[test]
    fn invariants_that_check_hold_on_every_request(
        tree in tree_spec(),
        (never, group, resource) in assertion(),
        requests in prop::collection::vec(request(), 60),
    ) {
        let quantifier = if never { "never" } else { "only" };
        let text = format!("{}assert {quantifier} g{group} -> r{resource}\n", render(&tree));
        let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("random.fz", text.clone())]));
        let proved = !checked.diagnostics.iter().any(|d| d.code == Code::InvariantFailed);
        prop_assert!(checked.diagnostics.iter().all(|d| !d.is_error() || d.code == Code::InvariantFailed));
        if !proved {
            return Ok(());
        }
        let table = checked.table.expect("a table when every invariant holds");
        let decisions = DecisionTable::new(table.clone());
        let open: Vec<&str> = table.groups.iter().filter(|g| g.is_open()).map(|g| g.id.as_str()).collect();
        let target = format!("g{group}");
        // The invariant is about the target's addresses: the resources serving any of them
        // are the target and those that overlap it and win.
        let outer = &table.resources.iter().find(|r| r.id == format!("r{resource}")).expect("the target").address;
        let serving: Vec<String> = table
            .resources
            .iter()
            .filter(|r| r.address == *outer || (r.address.overlaps(outer) && r.address.wins_over(outer)))
            .map(|r| r.id.clone())
            .collect();
        for mut request in requests {
            request.groups.retain(|g| open.contains(&g.as_str()));
            let email = request.user.to_lowercase();
            let in_group = request.groups.contains(&target)
                || table.groups.iter().any(|g| g.id == target && g.members.contains(&email));
            for id in &serving {
                request.resource = id.clone();
                let decision = decisions.decide(&request);
                let broken = if never { in_group && decision.effect == Effect::Allow } else { !in_group && decision.effect == Effect::Allow };
                prop_assert!(!broken, "{text}\nproved, but {request:?} is allowed");
            }
        }
    }
}

// ------------------------------------------------------------------ guardrails reach down

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// No request for a resource inside another escapes a deny on the outer one: whenever a
    /// deny rule naming a resource applies to a request for it (its conditions true, a missing
    /// fact counting as true), the same request for any resource lying inside it is denied.
    #[test]
    fn no_resource_inside_another_escapes_a_deny_on_it(
        tree in tree_spec(),
        requests in prop::collection::vec(request(), 40),
    ) {
        let text = render(&tree);
        let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("random.fz", text.clone())]));
        let table = checked.table.expect("a table");
        let decisions = DecisionTable::new(table.clone());
        for request in &requests {
            let Some(outer) = decisions.resource_index(&request.resource) else { continue };
            let outer_address = &table.resources[outer as usize].address;
            // The deny rules that name the outer resource and apply to this request, port aside.
            let mut whole = request.clone();
            whole.port = None;
            let denied = decisions.decide(&whole);
            let named_deny = denied.effect == Effect::Deny
                && denied.rules.iter().any(|r| table.rules[*r as usize].resources.contains(&outer));
            if !named_deny {
                continue;
            }
            for inner in table.resources.iter().filter(|r| r.address.lies_inside(outer_address)) {
                let mut inside = request.clone();
                inside.resource = inner.id.clone();
                let decision = decisions.decide(&inside);
                prop_assert_eq!(decision.effect, Effect::Deny, "{}\n{:?} escapes the deny on {}", text, inside, request.resource);
            }
        }
    }
}

// ------------------------------------------------------------------ one resource per address

/// Labels of random names: written-out labels of the example addresses and others, so that
/// names fall under exact names, `?`, `*` and `**` patterns, several at once, and none.
const NAME_LABELS: [&str; 9] = ["a", "b", "aa", "ba", "app1", "appx", "y", "x", "com"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The client matches names and addresses with its own index, built from the resources
    /// the portal lists (their addresses as text, in the order sent), without the table's ids:
    /// for every name and IP it must pick the resource the table picks.
    #[test]
    fn the_table_and_the_clients_index_pick_the_same_resource(
        tree in tree_spec(),
        names in prop::collection::vec(prop::collection::vec(0..NAME_LABELS.len(), 1..5), 50),
        ips in prop::collection::vec(prop_oneof![
            any::<u32>().prop_map(|n| IpAddr::from(std::net::Ipv4Addr::from(n))),
            (0u32..4, any::<u8>()).prop_map(|(net, host)| IpAddr::from(std::net::Ipv4Addr::new(10, (net % 2) as u8, (net / 2 + 2) as u8, host))),
            any::<u16>().prop_map(|host| IpAddr::from(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, host))),
        ], 50),
        order in any::<u64>(),
    ) {
        let text = render(&tree);
        let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("random.fz", text)]));
        let table = checked.table.expect("a table");
        let decisions = DecisionTable::new(table.clone());
        // The client's list: the addresses as the portal writes them, in a shuffled order.
        let mut listed: Vec<(String, String)> = table
            .resources
            .iter()
            .map(|r| (r.id.clone(), r.address.to_string()))
            .collect();
        let len = listed.len();
        for i in 0..len {
            listed.swap(i, (order as usize).wrapping_mul(i + 7) % len);
        }
        let parsed: Vec<(fz_address::Address, usize)> = listed
            .iter()
            .enumerate()
            .map(|(i, (_, address))| (address.parse().expect("an address the portal wrote"), i))
            .collect();
        let client = fz_address::AddressIndex::new(parsed.iter().map(|(a, i)| (a, *i)));
        // One overlap warning per overlapping pair, naming the resource that serves.
        let mut warned: Vec<String> = checked
            .diagnostics
            .iter()
            .filter(|d| d.code == Code::OverlappingResources)
            .map(|d| format!("{}: {}", d.message, d.label.clone().unwrap_or_default()))
            .collect();
        warned.sort();
        let mut expected: Vec<String> = Vec::new();
        for a in &table.resources {
            for b in &table.resources {
                if a.id != b.id && a.address.overlaps(&b.address) && a.address.wins_over(&b.address) {
                    expected.push(format!(
                        "resources `{}` (`{}`) and `{}` (`{}`) overlap: `{}` serves the addresses both match",
                        b.id, b.address, a.id, a.address, a.id
                    ));
                }
            }
        }
        expected.sort();
        prop_assert_eq!(warned, expected);
        let client_pick = |found: Option<usize>| found.map(|i| listed[i].0.clone());
        for labels in &names {
            let name: Vec<&str> = labels.iter().map(|l| NAME_LABELS[*l]).collect();
            let name = format!("{}.x.com", name.join("."));
            prop_assert_eq!(
                decisions.resource_for_name(&name).map(|r| r.id.clone()),
                client_pick(client.lookup_name(&name)),
                "{}", name
            );
        }
        for ip in ips {
            prop_assert_eq!(
                decisions.resource_for_ip(ip).map(|r| r.id.clone()),
                client_pick(client.lookup_ip(ip)),
                "{}", ip
            );
        }
    }
}
