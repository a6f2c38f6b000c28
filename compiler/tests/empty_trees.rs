//! A tree without rules is an error (`E021`): it would compile to a table that denies every
//! request, and in the portal withdraw every grant of the account. So is a directory without
//! policy files, which names the directory. Every command that reads a tree refuses both, in
//! both output formats; a tree with only `deny` rules, or only Cedar, is a tree with rules.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::{Run, fzc};

const DECLARATIONS: &str = "site hq\nresource gitlab { address \"gitlab.company.com\"; site hq }\ngroup engineering { members \"alice@company.com\" }\n";

/// Files of a tree: path below the tree's directory, and text.
type Files = &'static [(&'static str, &'static str)];

/// Each tree, as files below the directory `tree/`, and the E021 message it gets (`None`: it
/// has rules, and checks).
const TREES: [(&str, Files, Option<&str>); 7] = [
    (
        "an empty directory",
        &[],
        Some("the tree has no rules: it holds no `*.fz` or `*.cedar` file"),
    ),
    (
        "files, none of them policy files",
        &[
            ("README.md", "allow engineering -> gitlab\n"),
            ("nested/access.fz.bak", "allow engineering -> gitlab\n"),
        ],
        Some("the tree has no rules: it holds no `*.fz` or `*.cedar` file"),
    ),
    (
        "declarations and no rule",
        &[("declarations.fz", DECLARATIONS)],
        Some("the tree has no rules"),
    ),
    (
        "declarations, tests and invariants, and no rule",
        &[
            ("declarations.fz", DECLARATIONS),
            (
                "tests.fz",
                "test \"t\" { expect deny \"alice@company.com\" -> gitlab }\nassert never engineering -> gitlab\n",
            ),
        ],
        Some("the tree has no rules"),
    ),
    (
        "a Cedar file of comments only",
        &[
            ("declarations.fz", DECLARATIONS),
            ("access.cedar", "// the policies are still to come\n"),
        ],
        Some("the tree has no rules"),
    ),
    (
        "a deny rule and nothing else",
        &[(
            "access.fz",
            "site hq\nresource gitlab { address \"gitlab.company.com\"; site hq }\ndeny everyone -> gitlab\n",
        )],
        None,
    ),
    (
        "a Cedar permit and nothing else",
        &[
            (
                "declarations.fz",
                "site hq\nresource gitlab { address \"gitlab.company.com\"; site hq }\n",
            ),
            (
                "access.cedar",
                "permit (principal, action, resource == Resource::\"gitlab\");\n",
            ),
        ],
        None,
    ),
];

#[test]
fn a_tree_without_rules_is_refused_by_every_command() {
    for (name, files, message) in TREES {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("tree")).expect("tree dir");
        for (path, text) in files {
            let path = dir.path().join("tree").join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let query = [
            "query",
            "tree",
            "--user",
            "alice@company.com",
            "--resource",
            "gitlab",
        ];
        let commands: [(&[&str], Stream); 3] = [
            (&["check", "tree"], Stream::Stdout),
            (&["compile", "tree", "-o", "bundle.json"], Stream::Stderr),
            (&query, Stream::Stderr),
        ];
        for (command, stream) in commands {
            let human = fzc(dir.path(), command);
            let json = fzc(dir.path(), &[command, &["--format", "json"]].concat());
            let Some(message) = message else {
                assert_eq!(human.code, 0, "{name}: {command:?}\n{}", human.stderr);
                continue;
            };
            for run in [&human, &json] {
                assert_eq!(run.code, 1, "{name}: {command:?}\n{run:?}");
            }
            assert!(!dir.path().join("bundle.json").exists(), "{name}");
            // The human report names the directory where a file would stand.
            let report = stream.of(&human);
            assert!(
                report.starts_with(&format!("error[E021]: {message}\n --> tree\n")),
                "{name}: {command:?}\n{report}"
            );
            // JSON: the documented shape, the directory as the file, at line and column 0.
            let report: serde_json::Value = serde_json::from_str(stream.of(&json))
                .unwrap_or_else(|e| panic!("{name}: {command:?}: not JSON ({e}): {json:?}"));
            let diagnostic = &report["diagnostics"][0];
            let documented: serde_json::Map<String, serde_json::Value> =
                ["severity", "code", "message", "file", "line", "column"]
                    .into_iter()
                    .map(|key| (key.to_owned(), diagnostic[key].clone()))
                    .collect();
            assert_eq!(
                serde_json::Value::Object(documented),
                serde_json::json!({
                    "severity": "error",
                    "code": "E021",
                    "message": message,
                    "file": "tree",
                    "line": 0,
                    "column": 0,
                }),
                "{name}: {command:?}"
            );
            assert!(report["diagnostics"][0]["help"].is_string(), "{name}");
            assert_eq!(report["diagnostics"].as_array().map(Vec::len), Some(1));
            assert_eq!(
                report["tests"],
                serde_json::json!({ "passed": 0, "failed": 0 })
            );
        }
    }
}

/// Which output stream a command writes its report to: `check` reports on standard output,
/// a refused `compile` or `query` on standard error.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn of(self, run: &Run) -> &str {
        match self {
            Stream::Stdout => &run.stdout,
            Stream::Stderr => &run.stderr,
        }
    }
}

/// The library says so too, for whoever loads trees without the command line (the portal).
#[test]
fn the_library_refuses_an_empty_tree() {
    let checked = fz_compiler::check(fz_lang::Sources::default());
    assert!(checked.table.is_none());
    let codes: Vec<&str> = checked
        .diagnostics
        .iter()
        .map(|d| d.code.as_str())
        .collect();
    assert_eq!(codes, ["E021"]);
    assert_eq!(checked.diagnostics[0].loc.file, fz_lang::FileId::TREE);
}
