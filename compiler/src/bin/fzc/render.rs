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
            // About the tree as a whole (`FileId::TREE`): no line to show.
            out += &format!(" --> {}\n", self.root);
            out += &footer(diagnostic, " ");
            return out;
        };
        let (line, column) = file.line_col(diagnostic.loc.span.start);
        // Control characters (a carriage return that ends no line, say) are shown as their
        // pictures: printed as they are, they would move the cursor and garble the excerpt. One
        // character for one keeps the caret under its column.
        let text: String = file.line_text(line).chars().map(visible).collect();
        let text = text.as_str();
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
        out += &footer(diagnostic, &pad);
        out
    }

    /// A diagnostic about the tree as a whole names the tree's directory, at line and column 0.
    pub fn json(&self, diagnostic: &Diagnostic) -> JsonDiagnostic {
        let (file, line, column) = match self.sources.get(diagnostic.loc.file) {
            Some(_) => {
                let (path, line, column) = self.sources.position(diagnostic.loc);
                (self.path(path), line, column)
            }
            None => (self.root.to_owned(), 0, 0),
        };
        JsonDiagnostic {
            severity: diagnostic.severity.as_str(),
            code: diagnostic.code.as_str(),
            message: diagnostic.message.clone(),
            file,
            line,
            column,
            help: diagnostic.help.clone(),
            notes: diagnostic.notes.clone(),
        }
    }
}

/// The notes and the help of a diagnostic, under its excerpt.
fn footer(diagnostic: &Diagnostic, pad: &str) -> String {
    let mut out = String::new();
    for note in &diagnostic.notes {
        out += &format!("{pad} = note: {note}\n");
    }
    if let Some(help) = &diagnostic.help {
        out += &format!("{pad} = help: {help}\n");
    }
    out
}

/// A character of a source line as the excerpt shows it: a control character other than a tab
/// as its Unicode control picture (`\r` as `␍`).
fn visible(c: char) -> char {
    match u32::from(c) {
        code @ 0..=0x1f if c != '\t' => char::from_u32(0x2400 + code).unwrap_or(c),
        0x7f => '\u{2421}',
        _ => c,
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
