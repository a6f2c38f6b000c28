//! `fzc test`: every test and invariant of a tree with its outcome, and the rules no test
//! exercises (coverage), for people and for scripts.

use fz_compiler::{Checked, OutcomeKind, TestReport};
use fz_lang::Code;
use serde_json::json;

use crate::render::Renderer;

/// A share of the rules, in percent, that the tests must exercise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinCoverage(f64);

impl std::str::FromStr for MinCoverage {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let percent: f64 = text
            .trim_end_matches('%')
            .parse()
            .map_err(|_| format!("`{text}` is not a percentage such as `80`"))?;
        if (0.0..=100.0).contains(&percent) {
            Ok(MinCoverage(percent))
        } else {
            Err(format!("`{text}` is not between 0 and 100"))
        }
    }
}

/// What the tests exercised.
pub struct Coverage<'a> {
    report: &'a TestReport,
}

impl<'a> Coverage<'a> {
    pub fn of(report: &'a TestReport) -> Self {
        Coverage { report }
    }

    fn exercised(&self) -> usize {
        self.report.rules - self.report.unexercised.len()
    }

    /// In percent, one decimal.
    fn percent(&self) -> f64 {
        if self.report.rules == 0 {
            return 0.0;
        }
        (self.exercised() * 1000 / self.report.rules) as f64 / 10.0
    }

    /// Whether the share of exercised rules reaches `min` (compared exactly, not rounded).
    pub fn reaches(&self, min: Option<MinCoverage>) -> bool {
        min.is_none_or(|MinCoverage(min)| {
            self.exercised() as f64 * 100.0 >= min * self.report.rules as f64
        })
    }
}

/// Whether the tests and invariants ran: only on a tree without other errors.
pub fn ran(checked: &Checked) -> bool {
    !checked
        .diagnostics
        .iter()
        .any(|d| d.is_error() && !matches!(d.code, Code::TestFailed | Code::InvariantFailed))
}

/// The list, the failures' diagnostics, the coverage and a summary line.
pub fn human(checked: &Checked, renderer: &Renderer, min: Option<MinCoverage>) -> String {
    let report = &checked.tests;
    let mut out = String::new();
    for outcome in &report.outcomes {
        let (path, line, _) = checked.sources.position(outcome.loc);
        let name = match outcome.kind {
            OutcomeKind::Test => format!("test \"{}\"", outcome.name),
            OutcomeKind::Invariant => format!("invariant `{}`", outcome.name),
        };
        let verdict = if outcome.passed { "pass" } else { "FAIL" };
        out += &format!("{verdict}  {name}  ({}:{line})\n", renderer.path(path));
    }
    if report.outcomes.is_empty() {
        out += "no tests or invariants\n";
    }
    let failures: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| matches!(d.code, Code::TestFailed | Code::InvariantFailed))
        .collect();
    if !failures.is_empty() {
        out += "\n";
        for diagnostic in failures {
            out += &renderer.human(diagnostic);
            out += "\n";
        }
    }
    let coverage = Coverage::of(report);
    out += &format!(
        "coverage: {} of {} {} decide a test expectation ({:.1}%)\n",
        coverage.exercised(),
        report.rules,
        if report.rules == 1 { "rule" } else { "rules" },
        coverage.percent()
    );
    for rule in &report.unexercised {
        out += &format!("  no test exercises `{}` ({})\n", rule.id, rule.origin);
    }
    let count = |kind| report.outcomes.iter().filter(|o| o.kind == kind).count();
    let (tests, invariants) = (count(OutcomeKind::Test), count(OutcomeKind::Invariant));
    out += &format!(
        "{}: {tests} {}, {invariants} {}: {} passed, {} failed\n",
        renderer.root,
        if tests == 1 { "test" } else { "tests" },
        if invariants == 1 {
            "invariant"
        } else {
            "invariants"
        },
        report.passed,
        report.failed
    );
    if let Some(MinCoverage(min)) = min
        && !coverage.reaches(Some(MinCoverage(min)))
    {
        out += &format!(
            "error: the tests exercise {:.1}% of the rules, below --min-coverage {min}\n",
            coverage.percent()
        );
    }
    out
}

/// `{"tests":[...],"passed","failed","coverage":{...},"diagnostics":[...]}`; `coverage` is
/// null when the tests did not run (a tree with other errors, listed in `diagnostics`).
pub fn json(checked: &Checked, renderer: &Renderer, min: Option<MinCoverage>) -> String {
    let report = &checked.tests;
    let tests: Vec<serde_json::Value> = report
        .outcomes
        .iter()
        .map(|outcome| {
            let (path, line, column) = checked.sources.position(outcome.loc);
            json!({
                "kind": outcome.kind.as_str(),
                "name": outcome.name,
                "file": renderer.path(path),
                "line": line,
                "column": column,
                "passed": outcome.passed,
            })
        })
        .collect();
    let coverage = Coverage::of(report);
    let coverage = ran(checked).then(|| {
        json!({
            "rules": report.rules,
            "exercised": coverage.exercised(),
            "percent": coverage.percent(),
            "minimum_met": coverage.reaches(min),
            "unexercised": report.unexercised.iter().map(|rule| json!({
                "rule": rule.id,
                "origin": rule.origin,
            })).collect::<Vec<_>>(),
        })
    });
    let diagnostics: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| renderer.json(d))
        .collect();
    let value = json!({
        "tests": tests,
        "passed": report.passed,
        "failed": report.failed,
        "coverage": coverage,
        "diagnostics": diagnostics,
    });
    format!("{value}\n")
}
