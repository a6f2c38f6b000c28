//! Diagnostics for people (a compiler-style excerpt with a caret) and for scripts (JSON).

use fz_lang::{Diagnostic, Sources};
use serde::Serialize;

/// How `fzc` prints what it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Where diagnostics point: the tree's directory as the user wrote it, then the file's path
/// inside the tree.
pub struct Renderer<'a> {
    pub sources: &'a Sources,
    pub root: &'a str,
}

impl Renderer<'_> {
    fn path(&self, relative: &str) -> String {
        if self.root.is_empty() || self.root == "." {
            relative.to_owned()
        } else {
            format!("{}/{relative}", self.root.trim_end_matches('/'))
        }
    }

    pub fn human(&self, diagnostic: &Diagnostic) -> String {
        let mut out = format!(
            "{}[{}]: {}\n",
            diagnostic.severity.as_str(),
            diagnostic.code.as_str(),
            diagnostic.message
        );
        let Some(file) = self.sources.get(diagnostic.loc.file) else {
            return out;
        };
        let (line, column) = file.line_col(diagnostic.loc.span.start);
        let text = file.line_text(line);
        let number = line.to_string();
        let pad = " ".repeat(number.len());
        out += &format!("{pad}--> {}:{line}:{column}\n", self.path(&file.path));
        out += &format!("{pad} |\n{number} | {text}\n");
        // The caret runs under the span, up to the end of its first line.
        let (end_line, end_column) = file.line_col(diagnostic.loc.span.end);
        let width = if end_line == line {
            end_column.saturating_sub(column)
        } else {
            text.chars().count() + 1 - column
        };
        let indent: String = text
            .chars()
            .take(column - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        out += &format!("{pad} | {indent}{}", "^".repeat(width.max(1)));
        if let Some(label) = &diagnostic.label {
            out += &format!(" {label}");
        }
        out += "\n";
        for note in &diagnostic.notes {
            out += &format!("{pad} = note: {note}\n");
        }
        if let Some(help) = &diagnostic.help {
            out += &format!("{pad} = help: {help}\n");
        }
        out
    }

    pub fn json(&self, diagnostic: &Diagnostic) -> JsonDiagnostic {
        let (path, line, column) = self.sources.position(diagnostic.loc);
        JsonDiagnostic {
            severity: diagnostic.severity.as_str(),
            code: diagnostic.code.as_str(),
            message: diagnostic.message.clone(),
            file: self.path(path),
            line,
            column,
            help: diagnostic.help.clone(),
            notes: diagnostic.notes.clone(),
        }
    }
}

/// One diagnostic in `--format json` output (the contract in the language reference).
#[derive(Debug, Serialize)]
pub struct JsonDiagnostic {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub file: String,
    pub line: usize,
    pub column: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}
