//! The `fzc` command-line contract (LANGUAGE.md): commands, output shapes and exit codes,
//! run against the example tree, the language reference's own examples and small trees.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::{Run, fzc, repo, tree};

const TREE: &str = r#"
site hq
resource gitlab { address "gitlab.company.com"; site hq; ports tcp/443 }
resource prod-db { address "10.0.5.0/24"; site hq; ports tcp/5432 }
group engineering { members "alice@company.com"; idp okta "Engineering" }
group contractors { members "carol@vendor.com" }
allow engineering -> gitlab as eng-git
allow engineering -> prod-db when country in DE as eng-db
deny contractors -> prod-db as no-contractors
"#;

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not json ({e}): {}", run.stdout))
}

#[test]
fn the_example_tree_checks_clean() {
    let run = fzc(&repo(), &["check", "policies", "--deny-warnings"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.ends_with("0 errors, 0 warnings\n"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("0 failed"), "{}", run.stdout);
}

#[test]
fn check_defaults_to_the_policies_directory() {
    let run = fzc(&repo(), &["check"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("policies: "), "{}", run.stdout);
}

#[test]
fn the_language_reference_examples_hold() {
    let dir = repo().join("tests/fixtures/language-md");
    let run = fzc(&dir, &["check", ".", "--format", "json"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(
        json(&run),
        serde_json::json!({ "diagnostics": [], "tests": { "passed": 3, "failed": 0 } })
    );
}

/// The fixture is the language reference's examples, verbatim; when the reference is beside
/// the repository (as in CI), they must not have drifted apart.
#[test]
fn the_language_fixture_is_the_reference_verbatim() {
    let reference = repo().join("../shared/LANGUAGE.md");
    let Ok(text) = std::fs::read_to_string(&reference) else {
        eprintln!(
            "note: {} is not here; the fixture is compared only where it is",
            reference.display()
        );
        return;
    };
    let blocks: Vec<&str> = text
        .split("```fz\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    let fixture = std::fs::read_to_string(repo().join("tests/fixtures/language-md/examples.fz"))
        .expect("fixture");
    assert_eq!(fixture, blocks.join("\n"));
}

#[test]
fn exit_codes() {
    let good = tree(&[("a.fz", TREE)]);
    let bad = tree(&[("a.fz", "allow nobody -> nothing\n")]);
    let failing = tree(&[
        ("a.fz", TREE),
        (
            "t.fz",
            "test \"t\" { expect allow \"carol@vendor.com\" -> prod-db }\n",
        ),
    ]);
    let cases: [(&tempfile::TempDir, &[&str], i32); 8] = [
        (&good, &["check", "."], 0),
        (&bad, &["check", "."], 1),
        (&failing, &["check", "."], 1),
        (&good, &["check", "missing-dir"], 2),
        (&good, &["check", ".", "--no-such-flag"], 2),
        (&good, &["frobnicate"], 2),
        (&good, &["query", ".", "--user", "alice@company.com"], 2),
        (
            &bad,
            &["query", ".", "--user", "a@b.c", "--resource", "gitlab"],
            1,
        ),
    ];
    for (dir, args, code) in cases {
        let run = fzc(dir.path(), args);
        assert_eq!(
            run.code, code,
            "fzc {args:?}:\n{}{}",
            run.stdout, run.stderr
        );
    }
    // A tree that cannot be read says so once, with its cause once.
    let missing = fzc(good.path(), &["check", "missing-dir"]);
    assert_eq!(
        missing.stderr.trim_end(),
        "error: cannot read `missing-dir`: No such file or directory (os error 2)"
    );
}

#[test]
fn compile_is_byte_identical_whatever_the_file_order_and_carries_its_hash() {
    // The same tree, with files created in opposite orders (directory order differs).
    let files = [
        ("sites.fz", "site hq\n"),
        (
            "resources.fz",
            "resource gitlab { address \"gitlab.company.com\"; site hq }\nresource wiki { address \"**.wiki.company.com\"; site hq }\n",
        ),
        (
            "groups.fz",
            "group engineering { members \"alice@company.com\" }\n",
        ),
        ("rules/a.fz", "allow engineering -> gitlab\n"),
        ("rules/b.fz", "allow everyone -> wiki\n"),
    ];
    let mut reversed = files;
    reversed.reverse();
    let first = tree(&files);
    let second = tree(&reversed);
    for dir in [&first, &second] {
        let run = fzc(dir.path(), &["compile", ".", "-o", "bundle.json"]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    }
    let a = std::fs::read(first.path().join("bundle.json")).expect("bundle");
    let b = std::fs::read(second.path().join("bundle.json")).expect("bundle");
    assert_eq!(a, b);
    let bundle = fz_compiler::Bundle::from_bytes(&a).expect("a valid bundle");
    assert!(
        bundle.hash.starts_with("sha256:") && bundle.hash.len() == 71,
        "{}",
        bundle.hash
    );
}

#[test]
fn compile_refuses_a_tree_check_rejects_and_writes_nothing() {
    let dir = tree(&[(
        "a.fz",
        "site hq\nresource r { address \"10.0.0.1/8\"; site hq }\n",
    )]);
    let run = fzc(dir.path(), &["compile", ".", "-o", "bundle.json"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("error[E008]"), "{}", run.stderr);
    assert!(!dir.path().join("bundle.json").exists());
}

#[test]
fn a_damaged_bundle_is_refused() {
    let dir = tree(&[("a.fz", TREE)]);
    assert_eq!(
        fzc(dir.path(), &["compile", ".", "-o", "bundle.json"]).code,
        0
    );
    let path = dir.path().join("bundle.json");
    let text = std::fs::read_to_string(&path).expect("bundle");
    std::fs::write(&path, text.replace("no-contractors", "no-contractorz")).expect("write");
    let run = fzc(
        dir.path(),
        &[
            "query",
            "bundle.json",
            "--user",
            "carol@vendor.com",
            "--resource",
            "prod-db",
        ],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("content hash does not match"),
        "{}",
        run.stderr
    );
}

#[test]
fn query_names_the_rules_that_decided() {
    let dir = tree(&[("a.fz", TREE)]);
    let cases: [(&[&str], serde_json::Value); 5] = [
        (
            &[
                "--user",
                "alice@company.com",
                "--resource",
                "gitlab",
                "--port",
                "tcp/443",
            ],
            serde_json::json!({ "decision": "allow", "rules": ["eng-git"], "reason": "allowed" }),
        ),
        (
            &[
                "--user",
                "ALICE@company.com",
                "--resource",
                "gitlab",
                "--port",
                "tcp/22",
            ],
            serde_json::json!({ "decision": "deny", "rules": [], "reason": "port_not_allowed" }),
        ),
        (
            &[
                "--user",
                "dave@company.com",
                "--group",
                "engineering",
                "--resource",
                "prod-db",
                "--country",
                "DE",
            ],
            serde_json::json!({ "decision": "allow", "rules": ["eng-db"], "reason": "allowed" }),
        ),
        (
            &[
                "--user",
                "dave@company.com",
                "--group",
                "engineering",
                "--resource",
                "prod-db",
            ],
            serde_json::json!({ "decision": "deny", "rules": [], "reason": "no_rule" }),
        ),
        (
            &[
                "--user",
                "carol@vendor.com",
                "--group",
                "engineering",
                "--resource",
                "prod-db",
                "--country",
                "DE",
            ],
            serde_json::json!({ "decision": "deny", "rules": ["no-contractors"], "reason": "denied_by_rule" }),
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["query", ".", "--format", "json"];
        all.extend_from_slice(args);
        let run = fzc(dir.path(), &all);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        assert_eq!(json(&run), expected, "{args:?}");
    }
}

#[test]
fn human_query_explains_a_deny() {
    let dir = tree(&[("a.fz", TREE)]);
    let run = fzc(
        dir.path(),
        &[
            "query",
            ".",
            "--user",
            "alice@company.com",
            "--resource",
            "prod-db",
        ],
    );
    assert_eq!(run.code, 0);
    assert_eq!(
        run.stdout,
        "deny: alice@company.com -> prod-db\n  no allow rule applies\n  allow rule `eng-db` (a.fz:8) names the user, but `country in DE` did not hold\n"
    );
}

#[test]
fn batch_queries_answer_line_by_line_and_flag_bad_lines() {
    let dir = tree(&[
        ("a.fz", TREE),
        (
            "requests.jsonl",
            concat!(
                r#"{"user":"alice@company.com","resource":"gitlab","port":"tcp/443"}"#,
                "\n",
                r#"{"user":"carol@vendor.com","groups":["engineering"],"resource":"prod-db","country":"DE"}"#,
                "\n",
                r#"{"user":"alice@company.com","resource":"gitlab","port":"tcp/0"}"#,
                "\n",
                r#"{"user":"alice@company.com","resource":"gitlub"}"#,
                "\n",
                "not json\n",
                r#"{"user":"dave@company.com","groups":["engineering"],"resource":"prod-db","at":"2026-11-26T10:00:00+01:00","from":"192.0.2.1","country":"de","provider":"okta","verified":true}"#,
                "\n",
            ),
        ),
    ]);
    let run = fzc(dir.path(), &["query", ".", "--requests", "requests.jsonl"]);
    assert_eq!(
        run.code, 2,
        "a bad line makes the batch exit 2 after answering every line"
    );
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["decision"], "allow");
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[1]["rules"], serde_json::json!(["no-contractors"]));
    assert_eq!(
        lines[2]["error"],
        "requests.jsonl:3: bad port: port 0 is not a port"
    );
    assert_eq!(
        lines[3]["error"],
        "requests.jsonl:4: unknown resource `gitlub`; did you mean `gitlab`?"
    );
    assert!(
        lines[4]["error"]
            .as_str()
            .expect("error")
            .starts_with("requests.jsonl:5: ")
    );
    assert_eq!(lines[5]["decision"], "allow");
}

#[test]
fn queries_read_compiled_bundles_too() {
    let dir = tree(&[("a.fz", TREE)]);
    assert_eq!(fzc(dir.path(), &["compile", ".", "-o", "out.json"]).code, 0);
    let run = fzc(
        dir.path(),
        &[
            "query",
            "out.json",
            "--user",
            "alice@company.com",
            "--resource",
            "gitlab",
            "--format",
            "json",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(json(&run)["decision"], "allow");
}
