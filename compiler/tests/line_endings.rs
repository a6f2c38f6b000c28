//! Trees written on Windows check exactly as on Linux (LANGUAGE.md, "Files"): a leading
//! byte-order mark is ignored and a CRLF line ending is a newline, in `.fz` and `.cedar` files
//! alike. Each tree below is written plainly and then in every encoding; `fzc check` (human and
//! JSON) and `fzc compile` must print the same, byte for byte, and write the same bundle.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::path::Path;

use common::{Run, fzc, repo, tree};

/// How the files of a tree may come from Windows, or from an editor that writes a byte-order
/// mark: each function writes the tree's `n`th file.
const ENCODINGS: [(&str, Encode); 5] = [
    ("CRLF", |_, text| crlf(text)),
    ("BOM", |_, text| format!("\u{feff}{text}")),
    ("BOM and CRLF", |_, text| format!("\u{feff}{}", crlf(text))),
    // Every other line ending CRLF, as after edits from two systems.
    ("CRLF and LF mixed", |_, text| {
        text.split_inclusive('\n')
            .enumerate()
            .map(|(i, line)| match line.strip_suffix('\n') {
                Some(line) if i % 2 == 0 => format!("{line}\r\n"),
                _ => line.to_owned(),
            })
            .collect()
    }),
    // One file of the tree from Windows, the others not.
    ("CRLF in the first file only", |n, text| {
        if n == 0 { crlf(text) } else { text.to_owned() }
    }),
];

/// Writes the `n`th file of a tree.
type Encode = fn(usize, &str) -> String;

fn crlf(text: &str) -> String {
    text.replace('\n', "\r\n")
}

#[test]
fn every_encoding_checks_and_compiles_as_the_plain_file() {
    let example: Vec<(String, String)> = files_below(&repo().join("policies"));
    assert!(example.len() >= 10, "the example tree: {example:?}");
    check("the example tree (`.fz` and `.cedar`)", 0, &example);
    check(
        "a small tree: comments, strings, `;`, blocks and rules over several lines",
        0,
        &[
            (
                "sites.fz",
                "# Sites.\nsite hq \"Headquarters\"   # the \"main\" office\n\nsite lab; site eu\n",
            ),
            (
                "resources.fz",
                "resource gitlab {          # a block over several lines\n  address \"gitlab.company.com\"\n  site hq\n  ports tcp/443, tcp/22\n  description \"GitLab \\\"main\\\"\"   # a comment\n}\nresource lab-net { address \"10.9.0.0/16\"; site lab }\n",
            ),
            (
                "access.fz",
                "group engineering {\n  members \"alice@company.com\"\n  idp okta \"Engineering\"\n}\nallow engineering ->\n  gitlab, lab-net\n  when time mon-fri 08:00-18:00 Europe/Berlin\n  and country in DE, FR\n  as eng\ndeny user \"mallory@company.com\" -> site hq\n",
            ),
            (
                "tests.fz",
                "test \"alice reaches gitlab\" {\n  expect allow \"alice@company.com\" -> gitlab tcp/443 at 2026-11-26T10:00:00+01:00 country DE\n  expect deny \"alice@company.com\" -> gitlab tcp/443\n}\nassert never user \"mallory@company.com\" -> gitlab\n",
            ),
            (
                "access.cedar",
                "// Cedar beside fz.\n@id(\"lab-for-engineering\")\npermit (\n  principal in Group::\"engineering\",\n  action,\n  resource in Site::\"lab\"\n)\nwhen { context.client_verified };   // a comment\n",
            ),
        ],
    );
    check(
        "a tree with errors: each at the same line and column",
        1,
        &[
            (
                "a.fz",
                "site hq   # the office\nresource gitlab {\n  address \"gitlab.company.com\"   # \"quoted\" in a comment\n  site hq\n  ports tcp/443, tpc/22\n}\ngroup engineering { members \"alice@company.com\" }\nallow engineerng -> gitlab\nresource wiki { address \"wiki..company.com\"; site hq\nallow engineering -> wiki,\n  Wiki\nsite lab Laboratory\n",
            ),
            (
                "b.cedar",
                "@id(\"x\")\npermit (principal in Group::\"enginering\", action, resource == Resource::\"gitlab\");\n\npermit (principal, action, resource == Resource::\"wiki\")\nwhen { context.country == \"XX\" };\nforbid (principal action, resource);\n",
            ),
        ],
    );
}

/// A carriage return that ends no line is not a line break: an error that says so, with the
/// excerpt showing it as `␍` (printed raw, it would garble the excerpt and its caret).
#[test]
fn a_carriage_return_alone_is_an_error_shown_as_a_picture() {
    let dir = tree(&[(
        "a.fz",
        "site hq\rsite lab\nresource r { address \"r.example.com\"; site hq }\nallow everyone -> r\n",
    )]);
    let run = fzc(dir.path(), &["check", "."]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(!run.stdout.contains('\r'), "{:?}", run.stdout);
    assert!(
        run.stdout.starts_with(
            "error[E001]: expected a quoted string or the end of the statement, found a carriage return that ends no line (`\\r`)\n \
             --> a.fz:1:8\n  |\n1 | site hq␍site lab\n  |        ^\n"
        ),
        "{}",
        run.stdout
    );
}

/// Checks a tree written plainly and in every encoding: `fzc check` exits with `exit`, and
/// every output is the same, with no `\r` in it.
fn check(name: &str, exit: i32, files: &[(impl AsRef<str>, impl AsRef<str>)]) {
    let plain: Vec<(&str, String)> = files
        .iter()
        .map(|(path, text)| (path.as_ref(), text.as_ref().to_owned()))
        .collect();
    let expected = outputs(&plain);
    assert!(
        expected[0].starts_with(&format!("exit {exit}\n")),
        "{name}:\n{}",
        expected[0]
    );
    for (encoding, encode) in ENCODINGS {
        let encoded: Vec<(&str, String)> = plain
            .iter()
            .enumerate()
            .map(|(n, (path, text))| (*path, encode(n, text)))
            .collect();
        assert_ne!(encoded, plain, "{name}: {encoding} changes nothing");
        let found = outputs(&encoded);
        for (output, shown) in found.iter().zip(&expected) {
            assert_eq!(output, shown, "{name}, written with {encoding}");
            assert!(!output.contains('\r'), "{name}, {encoding}: {output:?}");
        }
    }
}

/// What `fzc` says of a tree: `check` (human, then JSON) and `compile` (its report and the
/// bundle's bytes), each with its exit code.
fn outputs(files: &[(&str, String)]) -> Vec<String> {
    let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
    let dir = tree(&files);
    let said = |run: Run| format!("exit {}\n{}{}", run.code, run.stdout, run.stderr);
    let check = said(fzc(dir.path(), &["check", "."]));
    let json = said(fzc(dir.path(), &["check", ".", "--format", "json"]));
    let compile = said(fzc(dir.path(), &["compile", ".", "-o", "bundle.json"]));
    let bundle = std::fs::read_to_string(dir.path().join("bundle.json")).unwrap_or_default();
    vec![check, json, compile, bundle]
}

/// Every policy file below `dir`, by its path inside it.
fn files_below(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "fz" || e == "cedar") {
                let relative = path.strip_prefix(dir).expect("below");
                let text = std::fs::read_to_string(&path).expect("text");
                files.push((relative.to_string_lossy().into_owned(), text));
            }
        }
    }
    files.sort();
    files
}
