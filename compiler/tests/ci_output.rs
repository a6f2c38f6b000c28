//! `fzc` as a CI citizen: SARIF 2.1.0 that the schema accepts, GitHub Actions annotations on
//! the right lines, and `fzc explain` for every code, whose example in the language reference
//! really gives that code.
//!
//! `data/sarif-schema-2.1.0.json` is the OASIS SARIF 2.1.0 JSON schema, as the `serde-sarif`
//! crate (0.8.0) ships it; committed so that the test needs no network.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::{Run, fzc, repo, tree};

/// A misspelt group on line 4, column 7 (`engineerng`), and a warning-free rest.
const UNKNOWN_GROUP: &str = "site hq\n\
    resource gitlab { address \"gitlab.company.com\"; site hq }\n\
    group engineering { members \"alice@company.com\" }\n\
    allow engineerng -> gitlab\n";

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not json ({e}): {}", run.stdout))
}

fn assert_valid_sarif(log: &serde_json::Value) {
    let errors = sarif_errors(log);
    assert!(errors.is_empty(), "not valid SARIF 2.1.0: {errors:#?}");
}

fn sarif_errors(log: &serde_json::Value) -> Vec<String> {
    let schema =
        std::fs::read_to_string(repo().join("compiler/tests/data/sarif-schema-2.1.0.json"))
            .unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(&schema).unwrap();
    // Two patterns of the published schema (`language` of a run and of a tool component, which
    // fzc does not write) have a stray `]`, a literal in JavaScript's regular expressions and an
    // error in Rust's: escaped here, with the same meaning.
    assert_eq!(escape_stray_bracket(&mut schema), 2);
    let validator = jsonschema::draft7::new(&schema).expect("the SARIF schema compiles");
    validator
        .iter_errors(log)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

const STRAY_BRACKET: &str = "^[a-zA-Z]{2}|^[a-zA-Z]{2}-[a-zA-Z]{2}]?$";

/// Escapes [`STRAY_BRACKET`] wherever it is a pattern; how many it escaped.
fn escape_stray_bracket(schema: &mut serde_json::Value) -> usize {
    match schema {
        serde_json::Value::Object(map) => map
            .iter_mut()
            .map(|(key, value)| {
                if key == "pattern" && value == STRAY_BRACKET {
                    *value = serde_json::json!(STRAY_BRACKET.replace("]?$", "\\]?$"));
                    1
                } else {
                    escape_stray_bracket(value)
                }
            })
            .sum(),
        serde_json::Value::Array(items) => items.iter_mut().map(escape_stray_bracket).sum(),
        _ => 0,
    }
}

#[test]
fn sarif_is_valid_and_points_at_the_line() {
    let dir = tree(&[("rules.fz", UNKNOWN_GROUP)]);
    let run = fzc(dir.path(), &["check", ".", "--format", "sarif"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let log = json(&run);
    assert_valid_sarif(&log);
    // The validator does refuse what is not SARIF: a level the format does not have.
    let mut wrong = log.clone();
    wrong["runs"][0]["results"][0]["level"] = serde_json::json!("fatal");
    assert_eq!(sarif_errors(&wrong).len(), 1, "{:#?}", sarif_errors(&wrong));

    let sarif_run = &log["runs"][0];
    let rules = sarif_run["tool"]["driver"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), fz_lang::Code::ALL.len(), "one rule per code");
    for (rule, code) in rules.iter().zip(fz_lang::Code::ALL) {
        assert_eq!(rule["id"], code.as_str());
        let help = rule["help"]["markdown"].as_str().unwrap();
        assert!(
            help.starts_with(&format!("### {}: ", code.as_str())),
            "{}: {help}",
            code.as_str()
        );
        assert!(
            !rule["shortDescription"]["text"]
                .as_str()
                .unwrap()
                .is_empty()
        );
        assert!(rule.get("helpUri").is_none(), "no URL was given");
    }

    let results = sarif_run["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{results:#?}");
    let result = &results[0];
    assert_eq!(result["ruleId"], "E004");
    assert_eq!(result["level"], "error");
    assert_eq!(
        rules[result["ruleIndex"].as_u64().unwrap() as usize]["id"],
        "E004"
    );
    let message = result["message"]["text"].as_str().unwrap();
    assert!(message.contains("unknown group `engineerng`"), "{message}");
    assert!(message.contains("did you mean `engineering`?"), "{message}");
    let location = &result["locations"][0]["physicalLocation"];
    assert_eq!(location["artifactLocation"]["uri"], "rules.fz");
    assert_eq!(
        location["region"],
        serde_json::json!({ "startLine": 4, "startColumn": 7, "endLine": 4, "endColumn": 17 })
    );
}

#[test]
fn sarif_rules_link_to_their_section_when_the_reference_is_published() {
    let dir = tree(&[("rules.fz", UNKNOWN_GROUP)]);
    let url = "https://docs.example.org/language.md";
    let run = fzc(
        dir.path(),
        &["check", ".", "--format", "sarif", "--docs-url", url],
    );
    let log = json(&run);
    assert_valid_sarif(&log);
    let rules = log["runs"][0]["tool"]["driver"]["rules"]
        .as_array()
        .unwrap();
    let unknown_name = rules.iter().find(|r| r["id"] == "E004").unwrap();
    let link = unknown_name["helpUri"].as_str().unwrap();
    let title = unknown_name["name"].as_str().unwrap();
    // The anchor a Markdown renderer gives the heading `### E004: <title>`.
    assert_eq!(
        link,
        format!("{url}#e004-{}", title.to_lowercase().replace(' ', "-")),
        "{link}"
    );
}

#[test]
fn sarif_of_a_clean_tree_and_of_a_tree_without_rules_is_valid() {
    let run = fzc(&repo(), &["check", "policies", "--format", "sarif"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let log = json(&run);
    assert_valid_sarif(&log);
    assert_eq!(log["runs"][0]["results"], serde_json::json!([]));

    // E021 is about the tree as a whole: its location is the tree's directory, with no region.
    let dir = tree(&[("sites.fz", "site hq\n")]);
    let run = fzc(dir.path(), &["check", ".", "--format", "sarif"]);
    let log = json(&run);
    assert_valid_sarif(&log);
    let result = &log["runs"][0]["results"][0];
    assert_eq!(result["ruleId"], "E021");
    assert_eq!(
        result["locations"][0]["physicalLocation"],
        serde_json::json!({ "artifactLocation": { "uri": "." } })
    );
}

#[test]
fn github_annotations_name_the_file_line_and_column() {
    let dir = tree(&[("rules.fz", UNKNOWN_GROUP)]);
    let run = fzc(dir.path(), &["check", ".", "--format", "github"]);
    assert_eq!(run.code, 1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "::error file=rules.fz,line=4,col=7,endLine=4,endColumn=17,title=fzc E004::\
         unknown group `engineerng`%0Ahelp: did you mean `engineering`?"
    );
    assert_eq!(
        lines[1],
        ".: 1 file checked, tests not run; 1 error, 0 warnings"
    );
    assert_eq!(lines.len(), 2, "{}", run.stdout);
}

#[test]
fn github_annotations_escape_what_would_end_the_command() {
    // A path with a comma and a colon, and a warning (W002, a site without resources).
    let dir = tree(&[(
        "a,b:c.fz",
        "site hq\nsite spare\nresource gitlab { address \"gitlab.company.com\"; site hq }\n\
         group engineering { members \"alice@company.com\" }\nallow engineering -> gitlab\n",
    )]);
    let run = fzc(dir.path(), &["check", ".", "--format", "github"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let warning = run.stdout.lines().next().unwrap();
    assert!(
        warning.starts_with("::warning file=a%2Cb%3Ac.fz,line=2,col="),
        "{warning}"
    );
    assert!(warning.contains(",title=fzc W002::"), "{warning}");
    assert!(!warning.contains('\r'), "{warning}");
}

/// docs/ci.md shows what a finding looks like in a log and as an annotation: that is what
/// `fzc` prints for that tree.
#[test]
fn the_ci_guide_shows_real_output() {
    let guide = std::fs::read_to_string(repo().join("docs/ci.md")).unwrap();
    let dir = tree(&[("policies/rules.fz", UNKNOWN_GROUP)]);
    for format in ["human", "github"] {
        let run = fzc(dir.path(), &["check", "policies", "--format", format]);
        assert_eq!(run.code, 1);
        assert!(
            guide.contains(&run.stdout),
            "docs/ci.md does not show what `--format {format}` prints:\n{}",
            run.stdout
        );
    }
}

#[test]
fn explain_prints_a_code_and_lists_them_all() {
    let run = fzc(&repo(), &["explain", "e019"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("### E019: "), "{}", run.stdout);
    assert!(run.stdout.contains("\nFix: "), "{}", run.stdout);

    let run = fzc(&repo(), &["explain"]);
    assert_eq!(run.code, 0);
    let codes: Vec<&str> = run
        .stdout
        .lines()
        .map(|line| line.split_whitespace().next().unwrap())
        .collect();
    let all: Vec<&str> = fz_lang::Code::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, all);

    let run = fzc(&repo(), &["explain", "E999"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("`E999` is not a diagnostic code"),
        "{}",
        run.stderr
    );
}

/// Every code's example in the language reference, written out as a tree of its own, gives
/// that code (E020 from `fzc export --cedar`, the one command that reports it); a warning's
/// example gives no error.
#[test]
fn every_explained_example_gives_its_code() {
    let reference = std::fs::read_to_string(repo().join("docs/language.md")).unwrap();
    let mut checked = Vec::new();
    for code in fz_lang::Code::ALL {
        let code = code.as_str();
        let section = section(&reference, code);
        let files = examples(section);
        assert!(!files.is_empty(), "{code}: no example");
        let dir = tree(&files);
        let args: &[&str] = if code == "E020" {
            &["export", "--cedar", ".", "--format", "json"]
        } else {
            &["check", ".", "--format", "json"]
        };
        let run = fzc(dir.path(), args);
        // A refused export reports on standard error, in the format asked for.
        let output = if run.stdout.trim().is_empty() {
            &run.stderr
        } else {
            &run.stdout
        };
        let report: serde_json::Value = serde_json::from_str(output)
            .unwrap_or_else(|e| panic!("{code}: not json ({e}): {output}"));
        let diagnostics = report["diagnostics"].as_array().unwrap();
        assert!(
            diagnostics.iter().any(|d| d["code"] == code),
            "{code}: the example does not give it: {diagnostics:#?}"
        );
        if code.starts_with('W') {
            assert!(
                diagnostics.iter().all(|d| d["severity"] != "error"),
                "{code}: the example has errors: {diagnostics:#?}"
            );
        }
        checked.push(code);
    }
    assert_eq!(checked.len(), 28);
}

/// The subsection `### CODE: ...` of the reference, up to the next heading.
fn section<'a>(reference: &'a str, code: &str) -> &'a str {
    let heading = format!("\n### {code}: ");
    let start = reference
        .find(&heading)
        .unwrap_or_else(|| panic!("{code} has no section"));
    let rest = &reference[start + 1..];
    let end = rest[1..]
        .find("\n## ")
        .into_iter()
        .chain(rest[1..].find("\n### "))
        .min()
        .map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The fenced examples of a section: a ```fz block as `policy.fz`, a ```cedar one as
/// `policy.cedar`.
fn examples(section: &str) -> Vec<(&'static str, &str)> {
    let mut files = Vec::new();
    let mut rest = section;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let Some(newline) = after.find('\n') else {
            break;
        };
        let language = after[..newline].trim();
        let body = &after[newline + 1..];
        let Some(end) = body.find("```") else {
            break;
        };
        let name = match language {
            "fz" => "policy.fz",
            "cedar" => "policy.cedar",
            other => panic!("an example in `{other}`"),
        };
        files.push((name, &body[..end]));
        rest = &body[end + 3..];
    }
    files
}

/// Three rules: an allow and a deny that the test exercises, and an allow it does not.
const COVERED_IN_PART: &str = r#"
site hq
resource gitlab { address "gitlab.company.com"; site hq; ports tcp/443 }
resource wiki { address "wiki.company.com"; site hq }
group engineering { members "alice@company.com", "bob@company.com" }
group contractors { members "carol@vendor.com" }
allow engineering, contractors -> gitlab as code
deny contractors -> gitlab when country not in DE as contractors-from-germany
allow engineering -> wiki as eng-wiki

test "code review" {
  expect allow "alice@company.com" -> gitlab tcp/443
  expect deny "carol@vendor.com" -> gitlab tcp/443 country FR
}
assert never contractors -> wiki
"#;

#[test]
fn test_lists_each_test_and_invariant_and_what_no_test_exercises() {
    let dir = tree(&[("policy.fz", COVERED_IN_PART)]);
    let run = fzc(dir.path(), &["test", "."]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        run.stdout,
        "pass  test \"code review\"  (policy.fz:11)\n\
         pass  invariant `never contractors -> wiki`  (policy.fz:15)\n\
         coverage: 2 of 3 rules decide a test expectation (66.6%)\n  \
         no test exercises `eng-wiki` (policy.fz:9)\n\
         .: 1 test, 1 invariant: 2 passed, 0 failed\n"
    );

    let run = fzc(dir.path(), &["test", ".", "--format", "json"]);
    assert_eq!(run.code, 0);
    let report = json(&run);
    assert_eq!(
        report["tests"],
        serde_json::json!([
            { "kind": "test", "name": "code review", "file": "policy.fz", "line": 11, "column": 1, "passed": true },
            { "kind": "invariant", "name": "never contractors -> wiki", "file": "policy.fz", "line": 15, "column": 1, "passed": true },
        ])
    );
    assert_eq!(
        report["coverage"],
        serde_json::json!({
            "rules": 3, "exercised": 2, "percent": 66.6, "minimum_met": true,
            "unexercised": [{ "rule": "eng-wiki", "origin": "policy.fz:9" }],
        })
    );
}

#[test]
fn min_coverage_fails_a_tree_whose_tests_exercise_too_few_rules() {
    let dir = tree(&[("policy.fz", COVERED_IN_PART)]);
    // Two of three is 66.67%: compared exactly, not as the rounded figure shown.
    let run = fzc(dir.path(), &["test", ".", "--min-coverage", "66.6"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let run = fzc(dir.path(), &["test", ".", "--min-coverage", "67"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout
            .ends_with("error: the tests exercise 66.6% of the rules, below --min-coverage 67\n"),
        "{}",
        run.stdout
    );
    let run = fzc(
        dir.path(),
        &["test", ".", "--format", "json", "--min-coverage", "67%"],
    );
    assert_eq!(run.code, 1);
    assert_eq!(json(&run)["coverage"]["minimum_met"], false);

    for wrong in ["101", "-1", "most"] {
        let run = fzc(dir.path(), &["test", ".", "--min-coverage", wrong]);
        assert_eq!(run.code, 2, "--min-coverage {wrong}: {}", run.stderr);
    }
}

#[test]
fn a_failing_test_is_listed_with_why() {
    let failing = COVERED_IN_PART.replace(
        "expect deny \"carol@vendor.com\" -> gitlab tcp/443 country FR",
        "expect deny \"carol@vendor.com\" -> gitlab tcp/443 country DE",
    );
    let dir = tree(&[("policy.fz", &failing)]);
    let run = fzc(dir.path(), &["test", "."]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout
            .starts_with("FAIL  test \"code review\"  (policy.fz:11)\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("error[E018]: test \"code review\""),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(": 1 passed, 1 failed\n"),
        "{}",
        run.stdout
    );

    let run = fzc(dir.path(), &["test", ".", "--format", "json"]);
    let report = json(&run);
    assert_eq!(
        (report["passed"].clone(), report["failed"].clone()),
        (1.into(), 1.into())
    );
    assert_eq!(report["tests"][0]["passed"], false);
    assert_eq!(report["diagnostics"][0]["code"], "E018");
}

#[test]
fn test_on_a_broken_tree_reports_its_errors_and_runs_nothing() {
    let dir = tree(&[("rules.fz", UNKNOWN_GROUP)]);
    let run = fzc(dir.path(), &["test", "."]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("error[E004]"), "{}", run.stderr);
    assert!(run.stderr.contains("tests not run"), "{}", run.stderr);

    let run = fzc(dir.path(), &["test", ".", "--format", "json"]);
    assert_eq!(run.code, 1);
    let report = json(&run);
    assert_eq!(report["tests"], serde_json::json!([]));
    assert_eq!(report["coverage"], serde_json::Value::Null);
    assert_eq!(report["diagnostics"][0]["code"], "E004");
}
