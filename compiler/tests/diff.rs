//! `fzc diff`: the access delta is exact.
//! - On random pairs of trees (unrelated, and one an edit of the other), every sampled request
//!   the two tables decide differently lies in a reported delta of the right direction, and
//!   every reported delta's witness is decided differently, in that direction, and lies in it.
//! - On the example tree: reformatting and reordering files is "no access change"; a real edit
//!   reads as a reviewer expects in text, JSON and Markdown; `--fail-on` gates; `--git` reads
//!   revisions through git.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::random_tree::{TreeSpec, render, request, tree_spec};
use common::{fzc, repo};
use fz_compiler::diff::{AccessDiff, Delta, Direction, ResourceDiff, Truth};
use fz_compiler::table::{Effect, Table};
use fz_compiler::{DecisionTable, Reason, Request};
use fz_lang::{SourceFile, Sources};
use proptest::prelude::*;

fn table(text: &str) -> Table {
    let checked = fz_compiler::check(Sources::new(vec![SourceFile::new("random.fz", text)]));
    let errors: Vec<_> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .collect();
    assert!(errors.is_empty(), "{text}\n{errors:#?}");
    checked.table.expect("a table")
}

/// Whether `request` lies in `delta` of `resource`. A request is "in" a group when it claims
/// the group and the group is open in either tree, or when both trees list its user in it.
fn covers(tables: [&Table; 2], resource: &ResourceDiff, delta: &Delta, request: &Request) -> bool {
    let email = request.user.to_lowercase();
    let subject = match &delta.users {
        Some(users) => users.contains(&email),
        None => !resource.named_users.contains(&email),
    };
    let group = |table: &Table, name: &str| table.groups.iter().find(|g| g.id == name).cloned();
    let in_group = |name: &String| {
        let claimed = request.groups.contains(name)
            && tables
                .iter()
                .any(|t| group(t, name).is_some_and(|g| g.is_open()));
        let listed = tables
            .iter()
            .all(|t| group(t, name).is_some_and(|g| g.members.contains(&email)));
        claimed || listed
    };
    let claims = delta.claims_any.iter().all(|any| any.iter().any(in_group))
        && !delta.claims_none.iter().any(in_group);
    // Without a port, a request is about the rules alone: decided differently only where the
    // rules decide differently, which a delta whose sides are not about the port says.
    let port = match &request.port {
        Some(port) => delta.ports.iter().any(|p| p.covers(port)),
        None => ![delta.old.reason, delta.new.reason].contains(&Reason::PortNotAllowed),
    };
    let when = delta.when.iter().any(|term| {
        term.iter().all(|literal| {
            literal.truths.contains(&Truth::of(
                &resource.conditions[literal.condition],
                &request.context,
            ))
        })
    });
    resource.id == request.resource && subject && claims && port && when
}

fn direction(old: Effect, new: Effect) -> Option<Direction> {
    match (old, new) {
        (Effect::Deny, Effect::Allow) => Some(Direction::Gain),
        (Effect::Allow, Effect::Deny) => Some(Direction::Loss),
        _ => None,
    }
}

fn check_exact(
    old: &DecisionTable,
    new: &DecisionTable,
    diff: &AccessDiff,
    requests: &[Request],
) -> Result<(), String> {
    let tables = [old.table(), new.table()];
    for request in requests {
        let changed = direction(old.decide(request).effect, new.decide(request).effect);
        if let Some(changed) = changed {
            let covered = diff.resources.iter().any(|resource| {
                resource
                    .deltas
                    .iter()
                    .any(|d| d.direction == changed && covers(tables, resource, d, request))
            });
            if !covered {
                return Err(format!(
                    "{changed:?} for {request:?} is in no delta of {diff:#?}"
                ));
            }
        }
    }
    for resource in &diff.resources {
        for delta in &resource.deltas {
            let witness = &delta.witness;
            let decided = direction(old.decide(witness).effect, new.decide(witness).effect);
            if decided != Some(delta.direction) || !covers(tables, resource, delta, witness) {
                return Err(format!("the witness of {delta:#?} is decided {decided:?}"));
            }
        }
    }
    Ok(())
}

/// A second tree that takes each rule, membership list and `idp` line from `edit` where the
/// mask says so, and from `base` elsewhere: a change of a few lines, or of everything.
fn edited(base: &TreeSpec, edit: &TreeSpec, mask: &[bool]) -> TreeSpec {
    let pick = |i: usize| mask.get(i % mask.len()).copied().unwrap_or(false);
    let mut tree = base.clone();
    for (i, rule) in tree.rules.iter_mut().enumerate() {
        if pick(i)
            && let Some(other) = edit.rules.get(i)
        {
            *rule = other.clone();
        }
    }
    if pick(7) {
        tree.rules
            .extend(edit.rules.iter().skip(base.rules.len()).cloned());
    }
    if pick(3) {
        tree.rules.truncate(edit.rules.len().max(1));
    }
    for g in 0..tree.members.len() {
        if pick(g + 11) {
            tree.members[g] = edit.members[g].clone();
            tree.idp[g] = edit.idp[g];
        }
    }
    for r in 0..tree.resource_ports.len() {
        if pick(r + 17) {
            tree.resource_ports[r] = edit.resource_ports[r].clone();
        }
    }
    tree
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_request_decided_differently_is_in_a_delta_and_every_delta_has_a_witness(
        base in tree_spec(),
        edit in tree_spec(),
        mask in prop::collection::vec(prop::bool::weighted(0.15), 1..24),
        requests in prop::collection::vec(request(), 120),
    ) {
        let new_spec = edited(&base, &edit, &mask);
        let old = DecisionTable::new(table(&render(&base)));
        let new = DecisionTable::new(table(&render(&new_spec)));
        let diff = fz_compiler::diff::diff(&old, &new);
        if let Err(message) = check_exact(&old, &new, &diff, &requests) {
            return Err(TestCaseError::fail(format!("{message}\nold:\n{}\nnew:\n{}", render(&base), render(&new_spec))));
        }
        // The other way round, as exact.
        let back = fz_compiler::diff::diff(&new, &old);
        if let Err(message) = check_exact(&new, &old, &back, &requests) {
            return Err(TestCaseError::fail(format!("{message}\nold:\n{}\nnew:\n{}", render(&new_spec), render(&base))));
        }
        // A tree against itself: nothing.
        prop_assert!(fz_compiler::diff::diff(&old, &DecisionTable::new(table(&render(&base)))).no_access_change());
    }
}

// ------------------------------------------------------------------ the command

/// The example tree copied twice into a temporary directory, as `old/` and `new/`.
fn two_copies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for side in ["old", "new"] {
        copy_tree(&repo().join("policies"), &dir.path().join(side));
    }
    dir
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn edit(path: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).expect("write");
}

#[test]
fn reordering_and_reformatting_files_is_no_access_change() {
    let dir = two_copies();
    let new = dir.path().join("new");
    // Rules in another order, one moved to another file, and the layout changed.
    let company = new.join("access/company.fz");
    let text = std::fs::read_to_string(&company).expect("read");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.reverse();
    let moved = lines.remove(0);
    std::fs::write(&company, lines.join("\n\n") + "\n").expect("write");
    std::fs::write(
        new.join("access/moved.fz"),
        format!("  {}\n", moved.replace(" -> ", "  ->  ")),
    )
    .expect("write");
    let run = fzc(dir.path(), &["diff", "old", "new", "--fail-on", "any"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .ends_with("no access change, 1 unchanged rule moved\n"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("access/moved.fz:1"), "{}", run.stdout);
}

/// The edit the README shows: finance may use the dashboards, France leaves production's
/// countries, and contractors lose the wiki.
fn readme_edit(new: &std::path::Path) {
    edit(
        &new.join("access/engineering.fz"),
        "allow engineering -> grafana when provider okta",
        "allow engineering, finance -> grafana when provider okta",
    );
    edit(
        &new.join("access/engineering.fz"),
        "country in DE, FR, NL",
        "country in DE, NL",
    );
    edit(
        &new.join("access/guardrails.fz"),
        "deny everyone -> admin-net",
        "deny contractors -> wiki as no-contractor-wiki\ndeny everyone -> admin-net",
    );
}

#[test]
fn an_edit_reads_as_gains_and_losses_with_the_rules_that_decide() {
    let dir = two_copies();
    readme_edit(&dir.path().join("new"));
    let run = fzc(dir.path(), &["diff", "old", "new"]);
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;
    // Contractors (a static group) lose the wiki by the new deny; the line names the group.
    assert!(out.contains("resource wiki\n  - everyone in contractors (not in engineering, sre) loses tcp/443\n      now: denied by `no-contractor-wiki` (access/guardrails.fz:3); before: allowed by `all-wiki` (access/company.fz:1)\n"), "{out}");
    // Finance is an identity-provider group: anyone in it gains, when the rule's condition holds.
    assert!(out.contains("  + everyone in finance (not in engineering) gains tcp/443, when `provider okta` holds and `source in 198.51.100.0/24` does not hold and `client verified` fails\n"), "{out}");
    // Production from France, for engineering.
    assert!(out.contains("resource prod-db\n  - everyone in engineering (not in contractors) loses tcp/5432, when `time mon-fri 08:00-18:00 Europe/Berlin` holds and `country in DE, FR, NL` holds and "), "{out}");
    assert!(out.contains("`country in DE, NL` fails\n      now: no rule allows; before: allowed by `eng-prod-read` (access/engineering.fz:5)\n"), "{out}");
    assert!(
        out.ends_with("\n+4 grants, -6 grants, 0 unchanged rules moved\n"),
        "{out}"
    );

    // Gates: gains and losses both fail `any`; with only gains, `loss` passes.
    assert_eq!(
        fzc(dir.path(), &["diff", "old", "new", "--fail-on", "gain"]).code,
        1
    );
    assert_eq!(
        fzc(dir.path(), &["diff", "old", "new", "--fail-on", "loss"]).code,
        1
    );
    assert_eq!(
        fzc(dir.path(), &["diff", "new", "old", "--fail-on", "any"]).code,
        1
    );
    let only_gains = two_copies();
    edit(
        &only_gains.path().join("new/access/engineering.fz"),
        "allow engineering -> grafana when provider okta",
        "allow engineering -> grafana",
    );
    assert_eq!(
        fzc(
            only_gains.path(),
            &["diff", "old", "new", "--fail-on", "loss"]
        )
        .code,
        0
    );
    assert_eq!(
        fzc(
            only_gains.path(),
            &["diff", "old", "new", "--fail-on", "gain"]
        )
        .code,
        1
    );

    // JSON: counts, and witnesses that `fzc query` decides as the delta says.
    let json = fzc(dir.path(), &["diff", "old", "new", "--format", "json"]);
    let value: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(value["summary"]["gains"], 4);
    assert_eq!(value["summary"]["losses"], 6);
    let witnesses: Vec<(String, &serde_json::Value)> = value["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .flat_map(|r| r["deltas"].as_array().expect("deltas"))
        .map(|d| {
            (
                d["direction"].as_str().expect("direction").to_owned(),
                &d["witness"],
            )
        })
        .collect();
    let lines: String = witnesses.iter().map(|(_, w)| format!("{w}\n")).collect();
    std::fs::write(dir.path().join("witnesses.jsonl"), lines).expect("write");
    let decide = |side: &str| -> Vec<String> {
        let run = fzc(
            dir.path(),
            &[
                "query",
                side,
                "--requests",
                "witnesses.jsonl",
                "--format",
                "json",
            ],
        );
        assert_eq!(run.code, 0, "{run:?}");
        run.stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("decision")["decision"]
                    .as_str()
                    .expect("decision")
                    .to_owned()
            })
            .collect()
    };
    let (before, after) = (decide("old"), decide("new"));
    for (((direction, witness), before), after) in witnesses.iter().zip(&before).zip(&after) {
        let expected = if direction == "gain" {
            ("deny", "allow")
        } else {
            ("allow", "deny")
        };
        assert_eq!((before.as_str(), after.as_str()), expected, "{witness}");
    }

    // Markdown: the summary, then a table row per delta.
    let markdown = fzc(dir.path(), &["diff", "old", "new", "--format", "markdown"]).stdout;
    assert!(markdown.starts_with("**Access change**: +4 grants, -6 grants, 0 unchanged rules moved\n\n| | Who | Resource |"), "{markdown}");
    assert_eq!(
        markdown
            .lines()
            .filter(|l| l.starts_with("| ➕") || l.starts_with("| ➖"))
            .count(),
        10,
        "{markdown}"
    );
}

#[test]
fn resources_added_and_removed_are_whole_gains_and_losses() {
    let dir = two_copies();
    let new = dir.path().join("new");
    edit(
        &new.join("access/company.fz"),
        "allow everyone -> wiki as all-wiki\n",
        "",
    );
    edit(
        &new.join("access/engineering.fz"),
        "gitlab, ci-runners, wiki, previews",
        "gitlab, ci-runners, previews",
    );
    std::fs::write(
        new.join("resources/status.fz"),
        "resource status { address \"status.acme.example\"; site eu-west; ports tcp/443 }\nallow everyone -> status as all-status\n",
    )
    .expect("write");
    let resources = std::fs::read_to_string(new.join("resources/engineering.fz")).expect("read");
    let wiki_start = resources
        .find("resource wiki")
        .expect("wiki is in engineering.fz");
    let wiki_end = wiki_start + resources[wiki_start..].find("\n}\n").expect("end") + 3;
    std::fs::write(
        new.join("resources/engineering.fz"),
        format!("{}{}", &resources[..wiki_start], &resources[wiki_end..]),
    )
    .expect("write");
    edit(
        &new.join("tests.fz"),
        "  expect allow \"someone@acme.example\" -> wiki tcp/443\n",
        "",
    );
    let run = fzc(dir.path(), &["diff", "old", "new"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.ends_with(
            "\n+1 grant, -1 grant, 1 resource added, 1 resource removed, 0 unchanged rules moved\n"
        ),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("resource status (added: status.acme.example in site eu-west, tcp/443)\n  + everyone gains tcp/443\n      now: allowed by `all-status` (resources/status.fz:2); before: no such resource\n"), "{}", run.stdout);
    assert!(
        run.stdout.contains("resource wiki (removed)\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            "  - everyone loses tcp/443\n      now: no such resource; before: allowed by `all-wiki`"
        ),
        "{}",
        run.stdout
    );
}

#[test]
fn git_revisions_are_read_through_git() {
    let dir = two_copies();
    let repo_dir = dir.path().join("repo");
    let git = |args: &[&str]| {
        let output = std::process::Command::new("git")
            .args(["-c", "user.name=fz", "-c", "user.email=fz@example.com"])
            .args(args)
            .current_dir(&repo_dir)
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    std::fs::create_dir_all(&repo_dir).expect("mkdir");
    git(&["init", "-q", "-b", "main"]);
    copy_tree(&dir.path().join("old"), &repo_dir.join("policies"));
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "policies"]);
    readme_edit(&repo_dir.join("policies"));
    git(&["commit", "-q", "-am", "edit"]);
    // Uncommitted: not part of either revision.
    std::fs::write(
        repo_dir.join("policies/access/company.fz"),
        "allow everyone -> erp\n",
    )
    .expect("write");

    let from_git = fzc(&repo_dir, &["diff", "--git", "main~1", "main", "policies/"]);
    assert_eq!(from_git.code, 0, "{from_git:?}");
    readme_edit(&dir.path().join("new"));
    let from_dirs = fzc(dir.path(), &["diff", "old", "new"]);
    assert_eq!(from_git.stdout, from_dirs.stdout);
    // From a subdirectory, the path is relative to it, as git's own paths are.
    let inside = fzc(
        &repo_dir.join("policies"),
        &["diff", "--git", "main~1", "main", "."],
    );
    assert_eq!(inside.stdout, from_dirs.stdout, "{inside:?}");
    // Before the policies existed, everything is a gain.
    git(&["commit", "-q", "--allow-empty", "-m", "empty"]);
    let unknown = fzc(
        &repo_dir,
        &["diff", "--git", "no-such-revision", "main", "policies"],
    );
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(
        unknown
            .stderr
            .contains("`no-such-revision` is not a revision of the repository"),
        "{unknown:?}"
    );
    let elsewhere = fzc(
        &repo_dir,
        &["diff", "--git", "main", "main", "nothing-here"],
    );
    assert_eq!(elsewhere.code, 0, "{elsewhere:?}");
    assert_eq!(
        elsewhere.stdout,
        "no access change, 0 unchanged rules moved\n"
    );
}

#[test]
fn a_tree_with_errors_is_refused_with_its_diagnostics() {
    let dir = two_copies();
    edit(
        &dir.path().join("new/access/company.fz"),
        "allow everyone -> wiki",
        "allow everyone -> wikki",
    );
    let run = fzc(dir.path(), &["diff", "old", "new"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("error[E004]"), "{}", run.stderr);
    assert!(
        run.stderr.contains("error: `new` has errors; no diff made"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
}
