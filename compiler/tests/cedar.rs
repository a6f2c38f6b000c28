//! The Cedar front end through the whole pipeline: `tests/fixtures/cedar/tree` (declarations in
//! fz, access in Cedar) must check clean and decide exactly as its fz twin
//! (`tests/fixtures/cedar/access.fz`) does, for every combination of user, groups, resource
//! and context below.

// Helpers outside `#[test]` functions fail their test by panicking, as the tests themselves do.
#![allow(clippy::expect_used)]

mod common;

use common::{fzc, repo, tree};
use fz_compiler::condition::Context;
use fz_compiler::{DecisionTable, Request};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo().join("tests/fixtures/cedar").join(name)).expect("fixture")
}

/// Checks a tree; it must have no diagnostics and pass its tests.
fn decisions(files: &[(&str, &str)]) -> DecisionTable {
    let dir = tree(files);
    let checked = fz_compiler::check(fz_compiler::load_tree(dir.path()).expect("loads"));
    assert!(checked.diagnostics.is_empty(), "{:#?}", checked.diagnostics);
    assert_eq!(checked.tests.failed, 0);
    DecisionTable::new(checked.table.expect("a table"))
}

#[test]
fn cedar_policies_decide_as_their_fz_twin() {
    let declarations = fixture("tree/declarations.fz");
    let tests = fixture("tree/tests.fz");
    let cedar = decisions(&[
        ("declarations.fz", &declarations),
        ("tests.fz", &tests),
        ("access.cedar", &fixture("tree/access.cedar")),
    ]);
    let fz = decisions(&[
        ("declarations.fz", &declarations),
        ("tests.fz", &tests),
        ("access.fz", &fixture("access.fz")),
    ]);
    assert_eq!(cedar.table().rules.len(), fz.table().rules.len());

    let users = [
        "alice@acme.example",
        "carol@vendor.example",
        "erin@acme.example",
        "someone@acme.example",
    ];
    let group_sets: [&[&str]; 5] = [
        &[],
        &["engineering"],
        &["contractors"],
        &["security"],
        &["engineering", "contractors"],
    ];
    let resources = ["gitlab", "prod-db", "wiki", "admin-net"];
    let countries = [None, Some("DE"), Some("FR"), Some("RU"), Some("US")];
    let sources = [
        None,
        Some("198.51.100.7"),
        Some("10.1.2.3"),
        Some("2001:db8::1"),
        Some("203.0.113.9"),
    ];
    let providers = [None, Some("okta"), Some("email")];
    let mut compared = 0;
    let mut allowed = 0;
    for user in users {
        for groups in group_sets {
            for resource in resources {
                for country in countries {
                    for source in sources {
                        for provider in providers {
                            for verified in [false, true] {
                                let request = Request {
                                    user: user.to_owned(),
                                    groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                                    resource: resource.to_owned(),
                                    port: None,
                                    context: Context {
                                        at: None,
                                        source: source.map(|s| s.parse().expect("ip")),
                                        country: country.map(str::to_owned),
                                        provider: provider.map(str::to_owned),
                                        verified,
                                    },
                                };
                                let (a, b) = (cedar.decide(&request), fz.decide(&request));
                                assert_eq!(
                                    (a.effect, a.reason, rule_names(&cedar, &a.rules)),
                                    (b.effect, b.reason, rule_names(&fz, &b.rules)),
                                    "{request:?}"
                                );
                                compared += 1;
                                allowed += usize::from(a.reason == fz_compiler::Reason::Allowed);
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(compared, 4 * 5 * 4 * 5 * 5 * 3 * 2);
    // The grid reaches both outcomes, so the comparison says something.
    assert!(
        allowed > 100 && allowed < compared / 2,
        "{allowed} of {compared}"
    );
}

/// Rule ids, with derived ids (which name their file) made comparable across the twins.
fn rule_names(table: &DecisionTable, rules: &[u32]) -> Vec<String> {
    rules
        .iter()
        .map(|r| {
            let id = &table.table().rules[*r as usize].id;
            if id.contains('#') {
                "<derived>".to_owned()
            } else {
                id.clone()
            }
        })
        .collect()
}

#[test]
fn fzc_checks_cedar_files_and_points_at_what_it_cannot_compile() {
    let dir = tree(&[
        ("declarations.fz", &fixture("tree/declarations.fz")),
        (
            "access/bad.cedar",
            "// a device fact fz does not have\n\
             permit (principal in Group::\"engineering\", action, resource == Resource::\"gitlab\")\n\
             when { context.country == \"DE\" && context.device_trust == \"high\" };\n\
             permit (principal in Group::\"enginering\", action, resource == Resource::\"wiki\");\n",
        ),
    ]);
    let run = fzc(dir.path(), &["check", "."]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    for expected in [
        "error[E017]: `context.device_trust == \"high\"` cannot be compiled into a decision table",
        "--> access/bad.cedar:3:35",
        "error[E004]: unknown group `enginering`",
        "--> access/bad.cedar:4:9",
        "did you mean `engineering`?",
    ] {
        assert!(run.stdout.contains(expected), "{expected}\n{}", run.stdout);
    }
}
