//! The `fz_file` and `cedar_file` targets: a policy file of the fuzzer's text beside fixed
//! declarations (the Cedar example's sites, resources and groups; for a Cedar file, its
//! tests and invariants too), through the front end and `fz_compiler::check`.
//!
//! Oracles: nothing panics; every diagnostic has a message and a location inside its file
//! (on character boundaries, so a renderer can show it), or is the tree's `E021`; a table
//! comes out exactly when there is no error, passes the checks a loaded bundle gets, reads
//! back from its bundle bytes as itself, and decides every resource for every user. A `.fz`
//! file that checks has its rules exported to Cedar, and the tree with the export in their
//! place compiles to a table that means the same.

use fz_compiler::{Bundle, Checked, DecisionTable, Request, Table};
use fz_lang::ast::Statement;
use fz_lang::{Code, FileId, SourceFile, Sources};

const DECLARATIONS: &str = include_str!("../../fixtures/cedar/tree/declarations.fz");
const TESTS: &str = include_str!("../../fixtures/cedar/tree/tests.fz");

pub fn fz_file(data: &[u8]) {
    // Trees are read as UTF-8 (`load_tree` refuses anything else).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The front end reads a file's text as the tree holds it (no BOM, LF line ends).
    let file = SourceFile::new("fuzzed.fz", text);
    let (_, diagnostics) = fz_lang::parse_file(FileId(0), &file.text);
    check_spans(&file, &diagnostics);
    let checked = check(&[("declarations.fz", DECLARATIONS), ("fuzzed.fz", text)]);
    export_round_trip(&checked, text);
}

pub fn cedar_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The front end reads a file's text as the tree holds it (no BOM, LF line ends).
    let file = SourceFile::new("fuzzed.cedar", text);
    let (_, diagnostics) = fz_lang::parse_cedar_file(FileId(0), &file.text);
    check_spans(&file, &diagnostics);
    check(&[
        ("declarations.fz", DECLARATIONS),
        ("tests.fz", TESTS),
        ("fuzzed.cedar", text),
    ]);
}

/// Checks a tree of these files and what came out of it.
fn check(files: &[(&str, &str)]) -> Checked {
    let sources = Sources::new(
        files
            .iter()
            .map(|(path, text)| SourceFile::new(*path, *text))
            .collect(),
    );
    let checked = fz_compiler::check(sources);
    for diagnostic in &checked.diagnostics {
        assert!(!diagnostic.message.is_empty(), "{diagnostic:?}");
        if diagnostic.loc.file == FileId::TREE {
            assert_eq!(diagnostic.code, Code::NoRules, "{diagnostic:?}");
            continue;
        }
        let Some(file) = checked.sources.get(diagnostic.loc.file) else {
            panic!("a diagnostic in no file of the tree: {diagnostic:?}");
        };
        check_spans(file, std::slice::from_ref(diagnostic));
    }
    assert_eq!(
        checked.table.is_some(),
        !checked.has_errors(),
        "a table comes out exactly when there is no error: {:#?}",
        checked.diagnostics
    );
    if let Some(table) = &checked.table {
        check_table(table);
    }
    checked
}

/// Every diagnostic's span lies inside the file, on character boundaries; one at the very
/// end may be one byte wide past it (the parser's caret for "found the end").
fn check_spans(file: &SourceFile, diagnostics: &[fz_lang::Diagnostic]) {
    let length = file.text.len();
    for diagnostic in diagnostics {
        let span = diagnostic.loc.span;
        let (start, end) = (span.start as usize, span.end as usize);
        let at_the_end = start == length && end == length + 1;
        assert!(
            start <= end
                && (end <= length || at_the_end)
                && file.text.is_char_boundary(start)
                && (file.text.is_char_boundary(end) || at_the_end),
            "span {start}..{end} outside `{}` ({} bytes): {diagnostic:?}",
            file.path,
            file.text.len()
        );
        let (line, column) = file.line_col(span.start);
        assert!(line >= 1 && column >= 1);
    }
}

/// A compiled table is one a portal loads, and it decides.
fn check_table(table: &Table) {
    if let Err(error) = table.validate() {
        panic!("the compiled table fails the checks of a loaded bundle: {error}");
    }
    let bytes = match Bundle::new(table.clone()).and_then(|b| b.to_bytes()) {
        Ok(bytes) => bytes,
        Err(error) => panic!("the table does not make a bundle: {error}"),
    };
    match Bundle::from_bytes(&bytes) {
        Ok(bundle) => assert_eq!(&bundle.table, table, "the bundle reads back"),
        Err(error) => panic!("the bundle does not read back: {error}"),
    }
    let decisions = DecisionTable::new(table.clone());
    let mut users: Vec<String> = table.users.iter().map(|u| u.email.clone()).collect();
    users.push("nobody@nowhere.example".to_owned());
    let contexts = [
        fz_compiler::condition::Context::default(),
        fz_compiler::condition::Context {
            source: "10.1.2.3".parse().ok(),
            country: Some("DE".to_owned()),
            provider: Some("okta".to_owned()),
            verified: true,
            ..Default::default()
        },
    ];
    for resource in &table.resources {
        for user in &users {
            for context in &contexts {
                let request = Request {
                    user: user.clone(),
                    groups: vec!["Engineering".to_owned()],
                    resource: resource.id.clone(),
                    port: None,
                    context: context.clone(),
                };
                let decision = decisions.decide(&request);
                let _ = decisions.explain(&request, &decision);
            }
        }
    }
}

/// `fzc export --cedar`'s promise: the tree with its `.fz` rules replaced by their export
/// compiles to a table that means the same.
fn export_round_trip(checked: &Checked, text: &str) {
    let Some(table) = &checked.table else {
        return;
    };
    let Ok(exported) = fz_compiler::cedar::export(checked, "fuzz") else {
        // A rule Cedar cannot express: an E020, and nothing exported.
        return;
    };
    // Spans are offsets into the text as the tree holds it (no BOM, LF line ends).
    let normalised = SourceFile::new("fuzzed.fz", text).text;
    let (ast, _) = fz_lang::parse_file(FileId(0), &normalised);
    let mut rules: Vec<_> = ast
        .statements
        .iter()
        .filter_map(|s| match s {
            Statement::Rule(rule) => Some(rule.loc.span),
            _ => None,
        })
        .collect();
    if rules.is_empty() {
        return;
    }
    rules.sort_by_key(|span| std::cmp::Reverse(span.start));
    let mut kept = normalised;
    for span in rules {
        kept.replace_range(span.start as usize..span.end as usize, "");
    }
    let round_trip = check(&[
        ("declarations.fz", DECLARATIONS),
        ("fuzzed.fz", &kept),
        ("exported.cedar", &exported),
    ]);
    let Some(round_trip) = &round_trip.table else {
        panic!(
            "the export does not compile back: {:#?}\n{exported}",
            round_trip.diagnostics
        );
    };
    assert_eq!(
        meaning(round_trip),
        meaning(table),
        "the export means something else:\n{exported}"
    );
}

/// What a table decides, without what only names its rules: derived rule ids (which come
/// from the file and the rule's text) and the order rules are filed in.
fn meaning(table: &Table) -> String {
    let rule = |index: &u32| {
        let Some(rule) = table.rules.get(*index as usize) else {
            return String::from("<missing>");
        };
        let id = if rule.id.contains('#') {
            "<derived>"
        } else {
            rule.id.as_str()
        };
        let groups: Vec<&str> = rule
            .groups
            .iter()
            .filter_map(|g| table.groups.get(*g as usize))
            .map(|g| g.id.as_str())
            .collect();
        let users: Vec<&str> = rule
            .users
            .iter()
            .filter_map(|u| table.users.get(*u as usize))
            .map(|u| u.email.as_str())
            .collect();
        format!("{id} {groups:?} {users:?} {:?}", rule.conditions)
    };
    let mut out = format!("{:?}\n{:?}\n{:?}\n", table.sites, table.groups, table.users);
    for resource in &table.resources {
        let mut allow: Vec<String> = resource.allow.iter().map(rule).collect();
        let mut deny: Vec<String> = resource.deny.iter().map(rule).collect();
        allow.sort();
        deny.sort();
        out += &format!(
            "{} {:?} allow {allow:#?} deny {deny:#?}\n",
            resource.id, resource.address
        );
    }
    out
}
