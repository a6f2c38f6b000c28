//! What a tree means where resources nest and where requests claim groups: a guardrail covers
//! every resource inside its target, an invariant covers every address of its targets, and a
//! claimed group counts only when an identity provider may fill it. Each case is a tree, a
//! command and what it must print, run through `fzc` as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::{Run, fzc, tree};

/// A production database with a guardrail and its proof, and a narrower resource someone
/// declares later inside the database's range, open to everyone.
const CARVED: &str = r#"
site hq
resource prod-db { address "10.0.5.0/24"; site hq; ports tcp/5432 }
resource primary { address "10.0.5.10"; site hq }
group engineering { members "alice@corp.example" }
group contractors { members "carol@vendor.example" }
allow engineering -> prod-db as eng-db
allow everyone -> primary as everyone-primary
deny contractors -> prod-db as no-contractors
assert never contractors -> prod-db
"#;

/// Two name patterns that overlap without either lying inside the other: the names both match
/// (`a.a.corp.example`) are served by `first-label`, whose text sorts first.
const PARTIAL: &str = r#"
site hq
resource first-label { address "*.a.corp.example"; site hq }
resource second-label { address "a.*.corp.example"; site hq }
group contractors { members "carol@vendor.example" }
allow everyone -> first-label, second-label
deny contractors -> second-label as no-contractors
assert never contractors -> second-label
"#;

/// A static-only group allowed to the vault, and an open one allowed to the wiki.
const CLAIMS: &str = r#"
site hq
resource vault { address "vault.corp.example"; site hq }
resource wiki { address "wiki.corp.example"; site hq }
group admins { members "ann@corp.example" }
group sre { idp okta "SRE" }
allow admins -> vault as admins-vault
allow sre -> wiki as sre-wiki
assert never user "zed@corp.example" -> vault
"#;

fn run(text: &str, args: &[&str]) -> Run {
    let dir = tree(&[("tree.fz", text)]);
    fzc(dir.path(), args)
}

/// `(tree, arguments, exit code, lines the output must hold)`.
#[test]
fn nesting_and_claims() {
    let cases: &[(&str, &[&str], i32, &[&str])] = &[
        // The guardrail reaches the narrower resource, so the proof holds and carol is denied
        // there by the guardrail, whatever the allow on `primary` says.
        (CARVED, &["check", "."], 0, &["1 passed, 0 failed"]),
        (
            CARVED,
            &[
                "query",
                ".",
                "--user",
                "carol@vendor.example",
                "--resource",
                "primary",
            ],
            0,
            &[
                "deny: carol@vendor.example -> primary",
                "deny rule `no-contractors`",
            ],
        ),
        (
            CARVED,
            &[
                "query",
                ".",
                "--user",
                "alice@corp.example",
                "--resource",
                "primary",
            ],
            0,
            &[
                "allow: alice@corp.example -> primary",
                "allow rule `everyone-primary`",
            ],
        ),
        // Allow rules do not reach down: engineering's rule on prod-db does not open primary
        // to alice on its own (everyone's rule does, above), and the warning says so.
        (
            CARVED,
            &["check", "."],
            0,
            &[
                "`primary` lies inside `prod-db`: allow rules on `prod-db` do not reach its addresses; deny rules on `prod-db` still do",
            ],
        ),
        // Where patterns only overlap, the deny on the one that loses does not reach the names
        // the other serves, and the invariant over the loser's names finds that.
        (
            PARTIAL,
            &["check", "."],
            1,
            &[
                "invariant `never contractors -> second-label` does not hold",
                "reaches `first-label`",
                "allow rules and deny rules on `second-label` do not reach the addresses `first-label` serves",
            ],
        ),
        // A claimed static-only group adds nothing, and the explanation says it was ignored.
        (CLAIMS, &["check", "."], 0, &["1 passed, 0 failed"]),
        (
            CLAIMS,
            &[
                "query",
                ".",
                "--user",
                "zed@corp.example",
                "--group",
                "admins",
                "--resource",
                "vault",
            ],
            0,
            &[
                "deny: zed@corp.example -> vault",
                "group `admins` was ignored: it has no `idp` line, so only its `members` are in it, and the user is not one of them",
            ],
        ),
        (
            CLAIMS,
            &[
                "query",
                ".",
                "--user",
                "zed@corp.example",
                "--group",
                "sre",
                "--resource",
                "wiki",
            ],
            0,
            &["allow: zed@corp.example -> wiki", "allow rule `sre-wiki`"],
        ),
        (
            CLAIMS,
            &[
                "query",
                ".",
                "--user",
                "ann@corp.example",
                "--group",
                "admins",
                "--resource",
                "vault",
            ],
            0,
            &[
                "allow: ann@corp.example -> vault",
                "allow rule `admins-vault`",
            ],
        ),
        (
            CLAIMS,
            &[
                "query",
                ".",
                "--format",
                "json",
                "--user",
                "zed@corp.example",
                "--group",
                "admins",
                "--group",
                "nosuch",
                "--resource",
                "vault",
            ],
            0,
            &[
                r#"{"decision":"deny","rules":[],"reason":"no_rule","ignored_groups":["admins","nosuch"]}"#,
            ],
        ),
    ];
    for (text, args, code, lines) in cases {
        let run = run(text, args);
        assert_eq!(run.code, *code, "{args:?}\n{}{}", run.stdout, run.stderr);
        assert_prints(&run, lines);
    }
}

/// Every one of `lines` is somewhere in what `run` printed.
fn assert_prints(run: &Run, lines: &[&str]) {
    for line in lines {
        assert!(
            run.stdout.contains(line),
            "missing {line:?} in\n{}",
            run.stdout
        );
    }
}

/// Without the guardrail, nothing keeps contractors off the narrower resource, and the
/// invariant (which covers every address of prod-db) fails there.
#[test]
fn an_invariant_covers_the_resources_inside_its_target() {
    let text = CARVED.replace("deny contractors -> prod-db as no-contractors\n", "");
    let run = run(&text, &["check", "."]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_prints(
        &run,
        &[
            "invariant `never contractors -> prod-db` does not hold",
            "counterexample: `carol@vendor.example`",
            "reaches `primary`",
            "let through by allow rule `everyone-primary`",
        ],
    );
}

/// A bundle from before deny rules reached down would let a guardrail be carved around: it is
/// refused, with what to do.
#[test]
fn bundles_of_the_earlier_format_are_refused() {
    let dir = tree(&[("tree.fz", CARVED)]);
    let bundle = dir.path().join("bundle.json");
    let run = fzc(dir.path(), &["compile", ".", "-o", "bundle.json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let text = std::fs::read_to_string(&bundle).unwrap();
    std::fs::write(&bundle, text.replace("\"version\": 2", "\"version\": 1")).unwrap();
    let bytes = std::fs::read(&bundle).unwrap();
    let error = fz_compiler::Bundle::from_bytes(&bytes)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("format version 1; this build reads version 2 only"),
        "{error}"
    );
}
