//! `fzc fmt` is safe and canonical:
//! - every `.fz` file of the repository (the example tree, the fixtures, the fuzz corpus), as a
//!   tree of its own, checks to the same diagnostics and compiles to the same bundle bytes and
//!   the same Cedar once formatted, and formatting it twice changes nothing; one that does not
//!   parse is refused, never changed;
//! - the whole example tree formatted compiles to the same bundle, and is in canonical layout;
//! - whitespace added anywhere it may stand (between tokens, before `,` and `;`, at the start
//!   and end of lines, CRLF endings, a byte-order mark) formats back to the same text;
//! - the command line: `--check` lists and changes nothing, without it files are rewritten.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use std::path::Path;

use common::{fzc, repo, tree};
use fz_lang::{FileId, SourceFile, Sources, format_file};
use proptest::prelude::*;

/// Every `.fz` file of the repository: path and raw text.
fn repository_files() -> Vec<(String, String)> {
    let mut files = Vec::new();
    for dir in ["policies", "tests/fixtures", "tests/fuzz/corpus/fz_file"] {
        collect(&repo().join(dir), &mut files);
    }
    files.sort();
    assert!(files.len() > 100, "{} files", files.len());
    files
}

fn collect(dir: &Path, files: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "fz")
            && let Ok(text) = String::from_utf8(std::fs::read(&path).unwrap())
        {
            files.push((path.display().to_string(), text));
        }
    }
}

/// What a one-file tree means: its diagnostics (code, line, message), its bundle and its
/// Cedar export, as far as each exists.
#[derive(Debug, PartialEq)]
struct Meaning {
    diagnostics: Vec<(String, usize, String)>,
    bundle: Option<Vec<u8>>,
    cedar: Option<String>,
}

fn meaning(text: &str) -> Meaning {
    let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("policy.fz", text)]));
    let diagnostics = checked
        .diagnostics
        .iter()
        .map(|d| {
            let (_, line, _) = checked.sources.position(d.loc);
            (d.code.as_str().to_owned(), line, d.message.clone())
        })
        .collect();
    let bundle = checked
        .table
        .clone()
        .map(|table| fz_compiler::Bundle::new(table).unwrap().to_bytes().unwrap());
    let cedar = fz_compiler::cedar::export(&checked, "tree").ok();
    Meaning {
        diagnostics,
        bundle,
        cedar,
    }
}

#[test]
fn every_file_means_the_same_once_formatted() {
    let mut formatted_files = 0;
    for (path, text) in repository_files() {
        match format_file(FileId(0), &text) {
            Ok(formatted) => {
                formatted_files += 1;
                assert_eq!(
                    meaning(&text),
                    meaning(&formatted),
                    "{path} means something else formatted:\n{formatted}"
                );
                assert_eq!(
                    format_file(FileId(0), &formatted).unwrap(),
                    formatted,
                    "{path}: formatting twice changes it"
                );
            }
            Err(errors) => {
                assert!(!errors.is_empty(), "{path}");
                assert!(
                    meaning(&text)
                        .diagnostics
                        .iter()
                        .any(|(code, _, _)| code == "E001"),
                    "{path} was refused, but checks without a syntax error"
                );
            }
        }
    }
    assert!(
        formatted_files > 60,
        "only {formatted_files} files formatted"
    );
}

#[test]
fn the_example_tree_is_canonical_and_formatting_it_keeps_its_bundle() {
    let run = fzc(&repo(), &["fmt", "--check", "policies"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "");

    // A copy of the tree with every file's whitespace disturbed compiles to the same bundle,
    // before and after `fzc fmt`, which gives back the tree as it is.
    let sources = fz_compiler::load_tree(&repo().join("policies")).unwrap();
    let files: Vec<(String, String)> = sources
        .iter()
        .map(|(_, f)| {
            let text = if f.path.ends_with(".fz") {
                disturb(&f.text, 7)
            } else {
                f.text.clone()
            };
            (f.path.clone(), text)
        })
        .collect();
    let borrowed: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let disturbed = tree(&borrowed);
    let bundle = |dir: &Path| {
        let out = dir.join("out.bundle");
        let run = fzc(dir, &["compile", ".", "-o", out.to_str().unwrap()]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    };
    let original = bundle(&repo().join("policies"));
    assert_eq!(bundle(disturbed.path()), original);
    let run = fzc(disturbed.path(), &["fmt", "."]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(bundle(disturbed.path()), original);
    for (path, _) in &files {
        assert_eq!(
            std::fs::read_to_string(disturbed.path().join(path)).unwrap(),
            std::fs::read_to_string(repo().join("policies").join(path)).unwrap(),
            "{path} is not back in its layout"
        );
    }
}

#[test]
fn check_lists_what_would_change_and_changes_nothing() {
    let messy = "site  hq\nresource gitlab {address \"gitlab.company.com\";site hq}\n\
                 group eng { members \"a@company.com\" }\nallow eng->gitlab\n";
    let messy = messy.replace("eng->gitlab", "eng  ->  gitlab");
    let clean = "site hq\nresource gitlab { address \"gitlab.company.com\"; site hq }\n\
                 group eng { members \"a@company.com\" }\nallow eng -> gitlab\n";
    let dir = tree(&[("a/messy.fz", &messy), ("clean.fz", clean)]);

    let run = fzc(dir.path(), &["fmt", "--check", "."]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "./a/messy.fz\n");
    assert!(
        run.stderr.contains("1 file not in the canonical layout"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a/messy.fz")).unwrap(),
        messy
    );

    let run = fzc(dir.path(), &["fmt", "."]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "./a/messy.fz\n"));
    let rewritten = std::fs::read_to_string(dir.path().join("a/messy.fz")).unwrap();
    assert_eq!(rewritten, clean);

    let run = fzc(dir.path(), &["fmt", "--check", "a/messy.fz", "clean.fz"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, ""));
}

/// A rewritten file keeps its permissions, and a symbolic link stays a link to the file it
/// names, which is what gets rewritten.
#[test]
fn a_rewritten_file_keeps_its_mode_and_its_link() {
    use std::os::unix::fs::PermissionsExt as _;
    let messy = "site  hq\n";
    let dir = tree(&[("private.fz", messy), ("elsewhere/target.fz", messy)]);
    let private = dir.path().join("private.fz");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("linked.fz");
    std::os::unix::fs::symlink(dir.path().join("elsewhere/target.fz"), &link).unwrap();

    let run = fzc(dir.path(), &["fmt", "private.fz", "linked.fz"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&private).unwrap(), "site hq\n");
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("elsewhere/target.fz")).unwrap(),
        "site hq\n"
    );
}

#[test]
fn a_file_that_does_not_parse_is_reported_and_left_alone() {
    let broken = "site hq\nallow eng gitlab   \n";
    let dir = tree(&[("broken.fz", broken)]);
    let run = fzc(dir.path(), &["fmt", "."]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("error[E001]"), "{}", run.stderr);
    assert!(run.stderr.contains("./broken.fz:2:"), "{}", run.stderr);
    assert!(
        run.stderr.contains("does not parse; it was not formatted"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("broken.fz")).unwrap(),
        broken
    );
}

/// `text` with whitespace added where whitespace may stand, chosen by `seed`: runs of spaces
/// and tabs for single spaces and before `,` and `;` outside strings and comments, indentation
/// and trailing blanks on lines, CRLF line endings, and a byte-order mark.
fn disturb(text: &str, seed: u64) -> String {
    let mut random = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |n: u64| {
        random = random
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (random >> 33) % n
    };
    let blanks = |n: u64| -> String {
        (0..n)
            .map(|i| if i % 3 == 2 { '\t' } else { ' ' })
            .collect()
    };
    let crlf = next(2) == 0;
    let mut out = String::new();
    if next(2) == 0 {
        out.push('\u{feff}');
    }
    for line in text.split('\n') {
        out += &blanks(next(4));
        let mut in_string = false;
        let mut escaped = false;
        let mut chars = line.trim_start().chars().peekable();
        while let Some(c) = chars.next() {
            if in_string {
                out.push(c);
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => in_string = false,
                    _ => escaped = false,
                }
                continue;
            }
            match c {
                '#' => {
                    out.push(c);
                    out.extend(chars.by_ref());
                    break;
                }
                '"' => {
                    in_string = true;
                    out.push(c);
                }
                ' ' => out += &blanks(1 + next(3)),
                ',' | ';' => {
                    out += &blanks(next(2));
                    out.push(c);
                }
                _ => out.push(c),
            }
        }
        out += &blanks(next(3));
        out += if crlf { "\r\n" } else { "\n" };
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// One canonical layout: however a parsing file's whitespace is disturbed, it formats to
    /// the same text as the file itself, and means the same.
    #[test]
    fn disturbed_whitespace_formats_back(file in any::<prop::sample::Index>(), seed in any::<u64>()) {
        let files = repository_files();
        let (path, text) = file.get(&files);
        let Ok(canonical) = format_file(FileId(0), text) else {
            return Ok(());
        };
        let disturbed = disturb(text, seed);
        let formatted = format_file(FileId(0), &disturbed);
        prop_assert_eq!(formatted.as_deref(), Ok(canonical.as_str()), "{} disturbed:\n{}", path, disturbed);
        prop_assert_eq!(meaning(&disturbed).bundle, meaning(&canonical).bundle);
    }
}
