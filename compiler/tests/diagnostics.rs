//! Every diagnostic, rendered as a user sees it: one fixture per diagnostic under
//! `tests/fixtures/diagnostics/`, named after the code it must produce: a `.fz` file, a
//! `.cedar` file for the Cedar front end's own, or a directory holding a tree (declarations in
//! `.fz` beside the `.cedar` policies that name them). Each is checked by `fzc check` (or, for
//! `E020`, exported by `fzc export --cedar`) and its output snapshotted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::path::Path;

use common::{fzc, repo, tree};

/// The files of a fixture: the file itself, or every file of its directory.
fn fixture_files(path: &Path) -> Vec<(String, String)> {
    let read = |p: &Path| std::fs::read_to_string(p).expect("read fixture");
    if !path.is_dir() {
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        return vec![(name, read(path))];
    }
    let mut files: Vec<(String, String)> = std::fs::read_dir(path)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                read(&p),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_fixture_gives_its_diagnostic() {
    let fixtures = repo().join("tests/fixtures/diagnostics");
    let mut names: Vec<String> = std::fs::read_dir(&fixtures)
        .expect("fixtures")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fz") || n.ends_with(".cedar") || !n.contains('.'))
        .collect();
    names.sort();
    assert!(names.len() >= 44, "fixtures missing: {names:?}");
    for name in names {
        let files = fixture_files(&fixtures.join(&name));
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        let dir = tree(&files);
        let code = name.split('-').next().expect("code prefix");
        // E020 is the export's own: the tree itself is fine.
        let (run, output) = if code == "E020" {
            let run = fzc(dir.path(), &["export", "--cedar", "."]);
            let stderr = run.stderr.clone();
            (run, stderr)
        } else {
            let run = fzc(dir.path(), &["check", "."]);
            let stdout = run.stdout.clone();
            (run, stdout)
        };
        assert!(
            output.contains(&format!("[{code}]")),
            "{name} does not give {code}:\n{output}"
        );
        let expected_exit = if code.starts_with('E') { 1 } else { 0 };
        assert_eq!(run.code, expected_exit, "{name}:\n{output}");
        insta::with_settings!({ snapshot_suffix => name.split('.').next().expect("stem"), prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("diagnostic", output);
        });
    }
}

#[test]
fn every_code_has_a_fixture_and_a_line_in_the_reference() {
    let fixtures: Vec<String> = std::fs::read_dir(repo().join("tests/fixtures/diagnostics"))
        .expect("fixtures")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let reference = std::fs::read_to_string(repo().join("docs/language.md")).expect("reference");
    for code in fz_lang::Code::ALL.map(fz_lang::Code::as_str) {
        assert!(
            fixtures.iter().any(|f| f.starts_with(&format!("{code}-"))),
            "no fixture for {code}"
        );
        assert!(
            reference.contains(&format!("| {code} |")),
            "docs/language.md does not list {code}"
        );
    }
}

#[test]
fn json_diagnostics_follow_the_contract() {
    let text =
        std::fs::read_to_string(repo().join("tests/fixtures/diagnostics/E004-unknown-group.fz"))
            .expect("read");
    let dir = tree(&[("access.fz", &text)]);
    let run = fzc(dir.path(), &["check", ".", "--format", "json"]);
    assert_eq!(run.code, 1);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    let diagnostic = &report["diagnostics"][0];
    assert_eq!(diagnostic["severity"], "error");
    assert_eq!(diagnostic["code"], "E004");
    assert_eq!(diagnostic["message"], "unknown group `engineerng`");
    assert_eq!(diagnostic["file"], "access.fz");
    assert_eq!(diagnostic["line"], 4);
    assert_eq!(diagnostic["column"], 7);
    assert_eq!(
        report["tests"],
        serde_json::json!({ "passed": 0, "failed": 0 })
    );
}

#[test]
fn warnings_pass_unless_denied() {
    let text =
        std::fs::read_to_string(repo().join("tests/fixtures/diagnostics/W004-unused-resource.fz"))
            .expect("read");
    let dir = tree(&[("a.fz", &text)]);
    assert_eq!(fzc(dir.path(), &["check", "."]).code, 0);
    assert_eq!(fzc(dir.path(), &["check", ".", "--deny-warnings"]).code, 1);
}
