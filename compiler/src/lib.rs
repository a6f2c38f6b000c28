//! The fz compiler: reads a policy tree, resolves and checks it, runs its tests and
//! invariants, builds the decision table (`Bundle`) and answers queries against it. The
//! `fzc` binary (`main.rs`) is glue over this library.
//!
//! It does not parse (that is `fz-lang`) and does no IO beyond reading a tree from disk in
//! [`load_tree`]; rendering diagnostics belongs to the binary.
//!
//! Entry points: [`load_tree`] then [`check`] (every diagnostic, test results, the table when
//! there are no errors); [`Bundle`] to write and read tables; [`DecisionTable::decide`];
//! [`lsp::Server`], the language server's core without IO.

mod analysis;
pub mod bundle;
pub mod cedar;
pub mod condition;
mod country;
pub mod decide;
pub mod lsp;
mod resolve;
pub mod table;
pub mod timeline;
mod verify;

/// Addresses live in their own crate so the agents can match names without the compiler.
pub use fz_address as address;

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
    let mut diagnostics = Vec::new();
    let files: Vec<_> = sources
        .iter()
        .map(|(id, file)| {
            let (ast, found) = if file.path.ends_with(".cedar") {
                fz_lang::parse_cedar_file(id, &file.text)
            } else {
                fz_lang::parse_file(id, &file.text)
            };
            diagnostics.extend(found);
            ast
        })
        .collect();
    let resolved = resolve::resolve(&sources, &files, &mut diagnostics);
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
