//! The `fzc` examples of README.md and docs/language.md, run as written, so the documents
//! cannot drift from the tool: every `$ fzc ...` line of a `console` block that shows output is
//! run in the repository's root, and what it prints must be what the block shows.
//!
//! In the shown output a line `...` stands for any number of lines. A command chained with
//! `&&` (`$ fzc check policies/ && fz-portal serve`) must succeed, and the shown output must
//! begin with what it prints (the rest is the next command's). `cargo run -q [--release] --bin
//! fzc -- ARGS` is `fzc ARGS`. Other commands (`curl`, `fz-portal`, ...) are not run here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::{fzc, repo};

/// The documents whose examples are run, and how many `fzc` examples with output each holds at
/// least (so that a change to the parsing below cannot make this test pass on nothing).
const DOCUMENTS: [(&str, usize); 2] = [("README.md", 8), ("docs/language.md", 0)];

/// How the examples' commands may start, and what stands for `fzc`.
const FZC: [&str; 3] = [
    "fzc ",
    "cargo run -q --release --bin fzc -- ",
    "cargo run -q --bin fzc -- ",
];

#[derive(Debug)]
struct Example {
    /// `README.md:123`, for messages.
    place: String,
    command: String,
    args: Vec<String>,
    /// Followed by `&& ...`: it must succeed, and its output begin the shown output.
    chained: bool,
    shown: Vec<String>,
}

#[test]
fn every_fzc_example_prints_what_the_documents_show() {
    for (document, at_least) in DOCUMENTS {
        let text = std::fs::read_to_string(repo().join(document)).expect("document");
        let examples = examples(document, &text);
        assert!(
            examples.len() >= at_least,
            "{document}: {} fzc examples with output found, expected at least {at_least}: {examples:#?}",
            examples.len()
        );
        for example in examples {
            let args: Vec<&str> = example.args.iter().map(String::as_str).collect();
            let run = fzc(&repo(), &args);
            let printed = format!("{}{}", run.stdout, run.stderr);
            let printed: Vec<&str> = printed.lines().collect();
            let holds = if example.chained {
                run.code == 0
                    && example.shown.len() >= printed.len()
                    && example.shown.iter().zip(&printed).all(|(s, p)| s == p)
            } else {
                matches(&example.shown, &printed)
            };
            assert!(
                holds,
                "{}: `$ {}` (exit {}) prints\n{}\nbut the document shows\n{}",
                example.place,
                example.command,
                run.code,
                printed.join("\n"),
                example.shown.join("\n")
            );
        }
    }
}

/// The `fzc` commands of a document's `console` blocks that are followed by output.
fn examples(document: &str, text: &str) -> Vec<Example> {
    let mut examples = Vec::new();
    let mut in_console = false;
    let mut current: Option<Example> = None;
    let mut finish = |current: &mut Option<Example>| {
        if let Some(example) = current.take()
            && !example.shown.is_empty()
        {
            examples.push(example);
        }
    };
    for (number, line) in (1..).zip(text.lines()) {
        if !in_console {
            in_console = line.trim_start().starts_with("```console");
            continue;
        }
        if line.trim_start().starts_with("```") {
            finish(&mut current);
            in_console = false;
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            finish(&mut current);
            current = fzc_example(&format!("{document}:{number}"), command);
            continue;
        }
        if let Some(example) = &mut current {
            example.shown.push(line.to_owned());
        }
    }
    finish(&mut current);
    examples
}

/// An example, when `command` runs `fzc`.
fn fzc_example(place: &str, command: &str) -> Option<Example> {
    let (own, rest) = match command.split_once(" && ") {
        Some((own, rest)) => (own, Some(rest)),
        None => (command, None),
    };
    let args = FZC.iter().find_map(|start| own.strip_prefix(start))?;
    assert!(
        !args.contains(['"', '\'', '$', '|', '>', '<', '#', '`', '\\']),
        "{place}: `{command}` needs a shell; the test splits arguments at spaces only"
    );
    Some(Example {
        place: place.to_owned(),
        command: command.to_owned(),
        args: args.split_whitespace().map(str::to_owned).collect(),
        chained: rest.is_some(),
        shown: Vec::new(),
    })
}

/// Whether the printed lines are the shown ones, where a shown `...` stands for any lines.
fn matches(shown: &[String], printed: &[&str]) -> bool {
    match shown.split_first() {
        None => printed.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=printed.len()).any(|skip| matches(rest, &printed[skip..]))
        }
        Some((first, rest)) => {
            printed.first().is_some_and(|p| p == first) && matches(rest, &printed[1..])
        }
    }
}

#[test]
fn examples_are_read_as_the_documents_write_them() {
    let text = "\
text
```console
$ fzc check a/
one
...
$ curl -s x
{}
$ fzc query --format json --user u && fz-portal serve
two
$ fzc compile a/ -o b.json
```
```fz
$ fzc check not-a-console-block
shown
```
";
    let found: Vec<(String, Vec<String>, bool, Vec<String>)> = examples("doc.md", text)
        .into_iter()
        .map(|e| (e.place, e.args, e.chained, e.shown))
        .collect();
    let strings = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        found,
        [
            (
                "doc.md:3".to_owned(),
                strings(&["check", "a/"]),
                false,
                strings(&["one", "..."])
            ),
            (
                "doc.md:8".to_owned(),
                strings(&["query", "--format", "json", "--user", "u"]),
                true,
                strings(&["two"])
            ),
        ]
    );
    let cases: [(&[&str], &[&str], bool); 6] = [
        (&["a", "b"], &["a", "b"], true),
        (&["a", "b"], &["a", "b", "c"], false),
        (&["...", "b"], &["a", "b"], true),
        (&["a", "...", "d"], &["a", "b", "c", "d"], true),
        (&["a", "...", "d"], &["a", "b", "c"], false),
        (&["...", "b", "..."], &["a", "b", "c", "b"], true),
    ];
    for (shown, printed, expected) in cases {
        assert_eq!(
            matches(&strings(shown), printed),
            expected,
            "{shown:?} against {printed:?}"
        );
    }
}
