//! The Cedar front end through the whole pipeline: `tests/fixtures/cedar/tree` (declarations in
//! fz, access in Cedar) must check clean and decide exactly as its fz twin
//! (`tests/fixtures/cedar/access.fz`) does, for every combination of user, groups, resource
//! and context below.

// Helpers outside `#[test]` functions fail their test by panicking, as the tests themselves do.
#![allow(clippy::expect_used)]

mod common;

use common::{fzc, meaning, repo, tree};
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
        "--> access/bad.cedar:4:29",
        "did you mean `engineering`?",
    ] {
        assert!(run.stdout.contains(expected), "{expected}\n{}", run.stdout);
    }
    // The JSON form is the one `.fz` diagnostics have, located in the `.cedar` file.
    let json = fzc(dir.path(), &["check", ".", "--format", "json"]);
    assert_eq!(json.code, 1);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    let unknown = &report["diagnostics"][1];
    assert_eq!(unknown["code"], "E004", "{report:#}");
    assert_eq!(unknown["message"], "unknown group `enginering`");
    assert_eq!(unknown["file"], "access/bad.cedar");
    assert_eq!(
        (&unknown["line"], &unknown["column"]),
        (&4.into(), &29.into())
    );
    assert_eq!(unknown["help"], "did you mean `engineering`?");
}

/// The schema `fzc schema --cedar` prints for a tree, and a strict validator over it.
fn validator(dir: &std::path::Path) -> cedar_policy::Validator {
    let run = fzc(dir, &["schema", "--cedar", "."]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (schema, warnings) =
        cedar_policy::Schema::from_cedarschema_str(&run.stdout).expect("Cedar reads the schema");
    assert_eq!(warnings.count(), 0, "{}", run.stdout);
    cedar_policy::Validator::new(schema)
}

/// Cedar's validator, in strict mode, on policy text: its errors and warnings, one per line.
fn validate(validator: &cedar_policy::Validator, policies: &str) -> String {
    let set: cedar_policy::PolicySet = policies.parse().expect("Cedar parses the policies");
    let result = validator.validate(&set, cedar_policy::ValidationMode::Strict);
    let errors = result.validation_errors().map(|e| format!("error: {e}"));
    let warnings = result
        .validation_warnings()
        .map(|w| format!("warning: {w}"));
    errors.chain(warnings).collect::<Vec<_>>().join("\n")
}

#[test]
fn cedars_validator_accepts_the_trees_cedar_files_against_fzcs_schema() {
    for (tree_dir, cedar_file) in [
        ("tests/fixtures/cedar/tree", "access.cedar"),
        ("policies", "access/security.cedar"),
    ] {
        let dir = repo().join(tree_dir);
        let policies = std::fs::read_to_string(dir.join(cedar_file)).expect("cedar file");
        assert_eq!(validate(&validator(&dir), &policies), "", "{tree_dir}");
    }
}

#[test]
fn the_schema_enumerates_sites_and_groups_so_cedar_rejects_unknown_ones() {
    let dir = repo().join("tests/fixtures/cedar/tree");
    let found = validate(
        &validator(&dir),
        r#"permit (principal in Group::"enginering", action, resource in Site::"hq");
           permit (principal in Group::"everyone", action, resource in Site::"mars");"#,
    );
    assert!(
        found.contains(r#"`Group::"enginering"` is of an enumerated entity type"#),
        "{found}"
    );
    assert!(
        found.contains(r#"`Site::"mars"` is of an enumerated entity type"#),
        "{found}"
    );
}

/// Rules that use every form the export writes: several subjects and targets, users, sites,
/// negated and listed conditions, IPv6, rules with and without names.
const RICH_RULES: &str = r#"
allow engineering, security, user "Dave@Acme.example" -> gitlab, site eu-west as mixed
allow everyone -> wiki when country not in ru, by and provider okta
allow everyone, contractors -> gitlab when client verified and source in 10.0.0.0/8, 2001:db8::/32
deny contractors -> site hq, admin-net when source not in 192.0.2.0/24, 198.51.100.7
deny user "carol@vendor.example" -> prod-db when country in DE              as carol-db
allow security -> admin-net when source not in 10.1.0.0/16 and country not in US
allow engineering -> prod-db when time mon-fri 08:00-18:00 Europe/Berlin and country in DE
allow security -> prod-db when country in DE and time fri-sun 22:00-06:00, 12:00-13:00 UTC as late
allow contractors -> wiki when time any 22:00-02:00 Asia/Tokyo and time sat 00:00-24:00 UTC
deny everyone -> gitlab when time any 00:00-24:00 UTC and time sun 03:00-04:00 UTC
"#;

/// Checks a tree that must have no errors; its table.
fn table_of(files: &[(&str, &str)]) -> fz_compiler::Table {
    let dir = tree(files);
    let checked = fz_compiler::check(fz_compiler::load_tree(dir.path()).expect("loads"));
    let errors: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\n{files:#?}");
    checked.table.expect("a table")
}

#[test]
fn exported_rules_compile_to_the_same_table() {
    round_trip_of_the_example_tree();
    let declarations = fixture("tree/declarations.fz");
    for rules in [fixture("access.fz"), RICH_RULES.to_owned()] {
        let fz = [
            ("declarations.fz", declarations.as_str()),
            ("access.fz", rules.as_str()),
        ];
        let dir = tree(&fz);
        let run = fzc(dir.path(), &["export", "--cedar", "."]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        let exported = run.stdout;

        let round_trip = table_of(&[
            ("declarations.fz", declarations.as_str()),
            ("access.cedar", exported.as_str()),
        ]);
        assert_eq!(meaning(&round_trip), meaning(&table_of(&fz)), "{exported}");
        // Cedar's own validator accepts the export against the tree's schema.
        assert_eq!(
            validate(&validator(dir.path()), &exported),
            "",
            "{exported}"
        );
    }
}

/// The example tree with its `.fz` rules replaced by their export: the same table.
fn round_trip_of_the_example_tree() {
    let policies = repo().join("policies");
    let run = fzc(&policies, &["export", "--cedar", "."]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sources = fz_compiler::load_tree(&policies).expect("loads");
    let mut files: Vec<(String, String)> = Vec::new();
    for (_, file) in sources.iter() {
        let text = if file.path.ends_with(".fz") {
            // Declarations, tests and invariants stay; rules go to the export.
            let (ast, _) = fz_lang::parse_file(fz_lang::FileId(0), &file.text);
            let mut kept = file.text.clone();
            let mut rules: Vec<_> = ast
                .statements
                .iter()
                .filter_map(|s| match s {
                    fz_lang::ast::Statement::Rule(rule) => Some(rule.loc.span),
                    _ => None,
                })
                .collect();
            rules.sort_by_key(|span| std::cmp::Reverse(span.start));
            for span in rules {
                kept.replace_range(span.start as usize..span.end as usize, "");
            }
            kept
        } else {
            file.text.clone()
        };
        files.push((file.path.clone(), text));
    }
    files.push(("exported.cedar".to_owned(), run.stdout.clone()));
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let dir = tree(&files);
    let checked = fz_compiler::check(fz_compiler::load_tree(dir.path()).expect("loads"));
    assert!(
        !checked.has_errors(),
        "{:#?}\n{}",
        checked.diagnostics,
        run.stdout
    );
    let round_trip = checked.table.expect("a table");
    let example = fz_compiler::check(sources)
        .table
        .expect("the example tree checks");
    assert_eq!(meaning(&round_trip), meaning(&example), "{}", run.stdout);
    assert_eq!(
        validate(&validator(&policies), &run.stdout),
        "",
        "{}",
        run.stdout
    );
}

#[test]
fn an_export_shows_where_each_policy_came_from() {
    let declarations = fixture("tree/declarations.fz");
    let dir = tree(&[
        ("declarations.fz", &declarations),
        ("access/rich.fz", RICH_RULES),
    ]);
    let run = fzc(dir.path(), &["export", "--cedar", "."]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    insta::assert_snapshot!("export_of_the_rich_rules", run.stdout);
}

#[test]
fn a_rule_cedar_cannot_express_stops_the_export_and_is_pointed_at() {
    let declarations = fixture("tree/declarations.fz");
    let dir = tree(&[
        ("declarations.fz", &declarations),
        (
            "access.fz",
            "allow engineering -> gitlab\n\
             allow engineering -> prod-db when source in ::ffff:10.0.0.0/104\n",
        ),
    ]);
    let out = dir.path().join("out.cedar");
    let out_arg = out.to_string_lossy().into_owned();
    let run = fzc(dir.path(), &["export", "--cedar", ".", "-o", &out_arg]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stdout, "");
    assert!(!out.exists(), "a refused export writes nothing");
    // The rendering is snapshotted with the diagnostics' fixtures (E020).
    assert!(
        run.stderr
            .contains("error[E020]: `::ffff:10.0.0.0/104` cannot be written in Cedar"),
        "{}",
        run.stderr
    );

    let json = fzc(dir.path(), &["export", "--cedar", ".", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&json.stderr).expect("json");
    assert_eq!(report["diagnostics"][0]["code"], "E020");
    assert_eq!(report["diagnostics"][0]["line"], 2);
    assert_eq!(report["diagnostics"][0]["column"], 45);
}

#[test]
fn schema_and_export_refuse_a_tree_with_errors() {
    let dir = tree(&[("access.fz", "allow nobody -> nothing\n")]);
    for command in ["schema", "export"] {
        let run = fzc(dir.path(), &[command, "--cedar", "."]);
        assert_eq!(run.code, 1, "{command}: {}", run.stderr);
        assert_eq!(run.stdout, "", "{command}");
        assert!(
            run.stderr.contains("error[E004]"),
            "{command}: {}",
            run.stderr
        );
    }
    let run = fzc(dir.path(), &["schema", "."]);
    assert_eq!(run.code, 2, "the format is required: {}", run.stderr);
}
