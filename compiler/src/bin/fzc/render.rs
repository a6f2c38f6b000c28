//! Diagnostics for people (a compiler-style excerpt with a caret), for scripts (JSON) and for
//! CI systems: SARIF 2.1.0, which code-scanning services read, and GitHub Actions' workflow
//! commands, which annotate a pull request's lines.

use fz_lang::{Code, Diagnostic, Severity, Sources};
use serde::Serialize;
use serde_json::json;

use crate::explain::Explanation;

/// How `fzc query` prints a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// How `fzc` prints what it found in a tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Human,
    Json,
    /// SARIF 2.1.0, one rule per diagnostic code.
    Sarif,
    /// GitHub Actions workflow commands (`::error file=...,line=...::message`).
    Github,
}

impl From<Format> for ReportFormat {
    fn from(format: Format) -> Self {
        match format {
            Format::Human => ReportFormat::Human,
            Format::Json => ReportFormat::Json,
        }
    }
}

/// Where a diagnostic points, as the machine-readable formats give it: the file's path as the
/// user would open it, and one-based line and column (in characters) of its start and end. A
/// diagnostic about the tree as a whole names the tree's directory, at line and column 0.
struct Place {
    file: String,
    line: usize,
    column: usize,
    end_line: usize,
    end_column: usize,
}

/// Where diagnostics point: the tree's directory as the user wrote it, then the file's path
/// inside the tree.
pub struct Renderer<'a> {
    pub sources: &'a Sources,
    pub root: &'a str,
}

impl Renderer<'_> {
    /// A path in the tree as the user would open it.
    pub fn path(&self, relative: &str) -> String {
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

    fn place(&self, diagnostic: &Diagnostic) -> Place {
        match self.sources.get(diagnostic.loc.file) {
            Some(file) => {
                let (line, column) = file.line_col(diagnostic.loc.span.start);
                let (end_line, end_column) = file.line_col(diagnostic.loc.span.end);
                Place {
                    file: self.path(&file.path),
                    line,
                    column,
                    end_line,
                    end_column,
                }
            }
            None => Place {
                file: self.root.to_owned(),
                line: 0,
                column: 0,
                end_line: 0,
                end_column: 0,
            },
        }
    }

    pub fn json(&self, diagnostic: &Diagnostic) -> JsonDiagnostic {
        let Place {
            file, line, column, ..
        } = self.place(diagnostic);
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

    /// One workflow command per diagnostic: GitHub shows it on the line it names in a pull
    /// request's diff, and in the run's summary. The message carries the help and notes too,
    /// on lines of their own.
    pub fn github(&self, diagnostic: &Diagnostic) -> String {
        let place = self.place(diagnostic);
        let command = match diagnostic.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut properties = vec![format!("file={}", escape_property(&place.file))];
        if place.line > 0 {
            properties.push(format!("line={}", place.line));
            properties.push(format!("col={}", place.column));
            properties.push(format!("endLine={}", place.end_line));
            if place.end_line == place.line {
                properties.push(format!("endColumn={}", place.end_column));
            }
        }
        properties.push(format!(
            "title={}",
            escape_property(&format!("fzc {}", diagnostic.code.as_str()))
        ));
        format!(
            "::{command} {}::{}\n",
            properties.join(","),
            escape_data(&full_message(diagnostic))
        )
    }

    /// The whole report as one SARIF 2.1.0 log: the tool with one rule per diagnostic code
    /// (its summary, and its whole explanation from the language reference as help), and one
    /// result per diagnostic. `docs_url`, when given, is where the language reference is
    /// published; each rule's `helpUri` then points at the code's section there.
    pub fn sarif(&self, diagnostics: &[Diagnostic], docs_url: Option<&str>) -> serde_json::Value {
        let rules: Vec<serde_json::Value> = Code::ALL
            .iter()
            .map(|code| {
                let explanation = Explanation::of(code.as_str());
                let summary = explanation.map(|e| e.summary()).unwrap_or_default();
                let mut rule = json!({
                    "id": code.as_str(),
                    "name": explanation.map_or(code.as_str(), |e| e.title),
                    "shortDescription": { "text": summary },
                    "fullDescription": { "text": summary },
                    "help": {
                        "text": explanation.map_or("", |e| e.text),
                        "markdown": explanation.map_or("", |e| e.text),
                    },
                    "defaultConfiguration": { "level": level(code.severity()) },
                });
                if let (Some(url), Some(explanation)) = (docs_url, explanation) {
                    rule["helpUri"] = json!(format!("{url}#{}", explanation.anchor()));
                }
                rule
            })
            .collect();
        let results: Vec<serde_json::Value> = diagnostics
            .iter()
            .map(|diagnostic| {
                let place = self.place(diagnostic);
                let mut location = json!({ "artifactLocation": { "uri": place.file } });
                if place.line > 0 {
                    location["region"] = json!({
                        "startLine": place.line,
                        "startColumn": place.column,
                        "endLine": place.end_line,
                        "endColumn": place.end_column.max(place.column),
                    });
                }
                json!({
                    "ruleId": diagnostic.code.as_str(),
                    "ruleIndex": Code::ALL.iter().position(|c| *c == diagnostic.code),
                    "level": level(diagnostic.severity),
                    "message": { "text": full_message(diagnostic) },
                    "locations": [{ "physicalLocation": location }],
                })
            })
            .collect();
        json!({
            "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
            "version": "2.1.0",
            "runs": [{
                "tool": {
                    "driver": {
                        "name": "fzc",
                        "version": env!("CARGO_PKG_VERSION"),
                        "rules": rules,
                    }
                },
                "columnKind": "unicodeCodePoints",
                "results": results,
            }],
        })
    }
}

fn level(severity: Severity) -> &'static str {
    match severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// The message, then its notes and help, one per line.
fn full_message(diagnostic: &Diagnostic) -> String {
    let mut text = diagnostic.message.clone();
    for note in &diagnostic.notes {
        text += &format!("\nnote: {note}");
    }
    if let Some(help) = &diagnostic.help {
        text += &format!("\nhelp: {help}");
    }
    text
}

/// A workflow command's message: `%`, CR and LF would end or alter the command.
fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A workflow command's property value: as a message, and `:` and `,`, which end it.
fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
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
