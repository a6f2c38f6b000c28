//! The fz compiler: reads a policy tree, resolves and checks it, runs its tests and
//! invariants, builds the decision table (`Bundle`) and answers queries against it. The
//! `fzc` binary (`main.rs`) is glue over this library.
//!
//! It does not parse (that is `fz-lang`) and does no IO beyond reading a tree from disk in
//! [`load_tree`]; rendering diagnostics belongs to the binary.
//!
//! Entry points: [`load_tree`] then [`check`] (every diagnostic, test results, the table when
//! there are no errors), or [`check_incrementally`] with a [`ParseCache`] for a tree that
//! changes a file at a time; [`Bundle`] to write and read tables; [`DecisionTable::decide`];
//! [`lsp::Server`], the language server's core without IO.

mod analysis;
pub mod bundle;
pub mod cedar;
pub mod condition;
mod country;
pub mod decide;
pub mod diff;
pub mod lsp;
mod resolve;
pub mod table;
pub mod timeline;
mod verify;

/// Addresses live in their own crate so the agents can match names without the compiler.
pub use fz_address as address;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fz_lang::{Code, Diagnostic, FileId, Loc, SourceFile, Sources, Span};

pub use bundle::{Bundle, BundleError};
pub use decide::{Decision, DecisionTable, Reason, Request};
pub use table::Table;
pub use verify::{Outcome, OutcomeKind, TestReport, UnexercisedRule};

/// What checking a tree found.
#[derive(Debug)]
pub struct Checked {
    pub sources: Sources,
    /// Sorted by file, position and code.
    pub diagnostics: Vec<Diagnostic>,
    pub tests: TestReport,
    /// The decision table, when the tree has no errors (failing tests are errors).
    pub table: Option<Table>,
}

impl Checked {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Parses, resolves and analyses every file, then runs the tests and invariants when the tree
/// has no errors so far.
pub fn check(sources: Sources) -> Checked {
    check_incrementally(sources, &mut ParseCache::default())
}

/// Files parsed by earlier checks of a tree that changes a file at a time (the language
/// server's): a file whose path, place in the tree and text are the same is not parsed again.
#[derive(Debug, Default)]
pub struct ParseCache {
    files: HashMap<String, Parsed>,
}

#[derive(Debug)]
struct Parsed {
    id: FileId,
    text: String,
    ast: fz_lang::ast::PolicyFile,
    diagnostics: Vec<Diagnostic>,
}

/// [`check`], taking each file's syntax tree from `cache` where its text has not changed, and
/// leaving the cache holding the tree's files as they are now.
pub fn check_incrementally(sources: Sources, cache: &mut ParseCache) -> Checked {
    let mut diagnostics = Vec::new();
    let parsed: Vec<(String, Parsed)> = sources
        .iter()
        .map(|(id, file)| {
            let entry = match cache.files.remove(&file.path) {
                Some(entry) if entry.id == id && entry.text == file.text => entry,
                _ => {
                    let (ast, diagnostics) = if file.path.ends_with(".cedar") {
                        fz_lang::parse_cedar_file(id, &file.text)
                    } else {
                        fz_lang::parse_file(id, &file.text)
                    };
                    Parsed {
                        id,
                        text: file.text.clone(),
                        ast,
                        diagnostics,
                    }
                }
            };
            (file.path.clone(), entry)
        })
        .collect();
    for (_, entry) in &parsed {
        diagnostics.extend(entry.diagnostics.iter().cloned());
    }
    let resolved = {
        let files: Vec<&fz_lang::ast::PolicyFile> =
            parsed.iter().map(|(_, entry)| &entry.ast).collect();
        resolve::resolve(&sources, &files, &mut diagnostics)
    };
    cache.files = parsed.into_iter().collect();
    // Only a tree that is otherwise sound is said to have no rules: a rule lost to a syntax
    // error is not a missing rule.
    if resolved.table.rules.is_empty() && !diagnostics.iter().any(Diagnostic::is_error) {
        diagnostics.push(no_rules(&sources));
    }
    let mut tests = TestReport::default();
    let mut table = None;
    if !diagnostics.iter().any(Diagnostic::is_error) {
        analysis::analyse(&resolved, &sources, &mut diagnostics);
        let decisions = DecisionTable::new(resolved.table.clone());
        tests = verify::run(&resolved, &decisions, &mut diagnostics);
        if tests.failed == 0 {
            table = Some(resolved.table);
        }
    }
    diagnostics.sort_by(|a, b| {
        (a.loc.file, a.loc.span.start, a.code).cmp(&(b.loc.file, b.loc.span.start, b.code))
    });
    Checked {
        sources,
        diagnostics,
        tests,
        table,
    }
}

/// E021. A tree without rules compiles to a table that denies every request: in the portal,
/// loading it would withdraw every grant of the account at once. That is never what an edit
/// (or a wrong directory) means, so it is an error, about the tree as a whole.
fn no_rules(sources: &Sources) -> Diagnostic {
    let tree = Loc {
        file: FileId::TREE,
        span: Span::default(),
    };
    if sources.is_empty() {
        return Diagnostic::new(
            Code::NoRules,
            tree,
            "the tree has no rules: it holds no `*.fz` or `*.cedar` file",
        )
        .with_help("policy files end in `.fz` or `.cedar`; is this the tree's directory?");
    }
    let files = sources.len();
    Diagnostic::new(Code::NoRules, tree, "the tree has no rules")
        .with_note(format!(
            "{files} {} read, without an `allow` or `deny` rule (or a Cedar `permit` or `forbid`)",
            if files == 1 { "file" } else { "files" }
        ))
        .with_help(
            "add a rule such as `allow GROUP -> RESOURCE`: a table without rules denies every request",
        )
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The cause is part of the message and not a `source()`, so that a caller printing the
    /// error with its chain (`fzc`, through anyhow) says it once.
    #[error("cannot read `{path}`: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("`{0}` is not a directory")]
    NotADirectory(PathBuf),
    #[error("`{0}` is not UTF-8 text")]
    NotText(PathBuf),
}

/// Reads every `*.fz` and `*.cedar` file below `dir`, recursively. Paths in the result are
/// relative to `dir`, with `/` separators, so diagnostics and rule ids do not depend on where
/// the tree was checked out.
pub fn load_tree(dir: &Path) -> Result<Sources, LoadError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |cause| LoadError::Io { path, cause }
    };
    if !std::fs::metadata(dir).map_err(io(dir))?.is_dir() {
        return Err(LoadError::NotADirectory(dir.to_owned()));
    }
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).map_err(io(&current))? {
            let entry = entry.map_err(io(&current))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "fz" || e == "cedar") {
                let bytes = std::fs::read(&path).map_err(io(&path))?;
                let text =
                    String::from_utf8(bytes).map_err(|_| LoadError::NotText(path.clone()))?;
                let relative = path.strip_prefix(dir).unwrap_or(&path);
                let name: Vec<String> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                files.push(SourceFile::new(name.join("/"), text));
            }
        }
    }
    Ok(Sources::new(files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Sources {
        Sources::new(
            files
                .iter()
                .map(|(path, text)| SourceFile::new(*path, *text))
                .collect(),
        )
    }

    /// What a check found, to compare two checks of one tree.
    fn found(checked: &Checked) -> (Vec<(Code, Loc, String)>, Option<Table>) {
        let diagnostics = checked
            .diagnostics
            .iter()
            .map(|d| (d.code, d.loc, d.message.clone()))
            .collect();
        (diagnostics, checked.table.clone())
    }

    #[test]
    fn an_incremental_check_finds_what_a_full_one_does() {
        let declarations = "site hq\nresource r { address \"r.company.com\"; site hq }\n\
                            group g { members \"a@company.com\" }\n";
        let steps: [&[(&str, &str)]; 4] = [
            &[("a.fz", declarations), ("b.fz", "allow g -> r\n")],
            &[("a.fz", declarations), ("b.fz", "allow gg -> r\n")],
            // A file added before the others moves their place in the tree.
            &[
                ("0.fz", "site eu\n"),
                ("a.fz", declarations),
                ("b.fz", "allow gg -> r\n"),
            ],
            &[
                ("0.fz", "site eu\n"),
                ("a.fz", declarations),
                ("b.fz", "allow g -> r\n"),
            ],
        ];
        let mut cache = ParseCache::default();
        for files in steps {
            let incremental = check_incrementally(tree(files), &mut cache);
            let full = check(tree(files));
            assert_eq!(found(&incremental), found(&full), "{files:?}");
            assert_eq!(cache.files.len(), files.len());
        }
    }
}
