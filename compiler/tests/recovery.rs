//! One mistake, one diagnostic: a statement that does not parse keeps what can be read of it,
//! so that a bad property or a missing `}` does not drop its declaration and add an "unknown
//! name" error at every rule naming it. And diagnostics print in file and line order, in both
//! output formats, however many files and checking phases they come from.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod common;

use common::{Run, fzc, tree};

/// Declarations the cases below build on; each case's own text follows them (from line 5).
const BASE: &str = "\
site hq
group engineering { members \"alice@company.com\" }
group contractors { members \"carol@vendor.com\" }
resource wiki { address \"wiki.company.com\"; site hq }
";

/// Rules that name `gitlab` five ways, so that a dropped `gitlab` would show.
const USES_GITLAB: &str = "\
allow engineering -> gitlab as eng-web
allow contractors -> gitlab when client verified
deny contractors -> gitlab when country not in DE
test \"alice\" { expect allow \"alice@company.com\" -> gitlab tcp/443 }
assert never contractors -> gitlab
";

#[test]
fn a_statement_that_does_not_parse_costs_its_own_errors_only() {
    let cases: [(&str, &str, &[&str]); 14] = [
        (
            "a bad port in a resource block",
            "resource gitlab {\n  address \"gitlab.company.com\"\n  site hq\n  ports tcp/443, tpc/22\n}\n",
            &["8:18 E001 expected a port such as `tcp/443`, found `tpc/22`"],
        ),
        (
            "a bad port in a one-line block",
            "resource gitlab { address \"gitlab.company.com\"; site hq; ports tpc/22 }\n",
            &["5:64 E001 expected a port such as `tcp/443`, found `tpc/22`"],
        ),
        (
            "a missing `}`",
            "resource gitlab {\n  address \"gitlab.company.com\"\n  site hq   # the office\n\n",
            &[
                "7:10 E001 expected `}`, found the end of the statement (a `{` in this statement is never closed)",
            ],
        ),
        (
            "a misspelt property: not also `address` missing",
            "resource gitlab {\n  adress \"gitlab.company.com\"\n  site hq\n}\n",
            &[
                "6:3 E001 expected `address`, `description`, `ports` or `site`, found `adress` (did you mean `address`?)",
            ],
        ),
        (
            "two bad lines and a missing `}`: each its own",
            "resource gitlab {\n  address gitlab.company.com\n  site HQ\n  ports tcp/443\n",
            &[
                "6:11 E001 expected `internet` or a quoted string, found `gitlab.company.com`",
                "7:8 E001 expected a name such as `engineering`, found `HQ` (names are lowercase: letters, digits, `_` and `-`)",
                "8:16 E001 expected `}`, found the end of the statement (a `{` in this statement is never closed)",
            ],
        ),
        (
            "no block at all",
            "resource gitlab address \"gitlab.company.com\"\n",
            &["5:17 E001 expected `{`, found `address`"],
        ),
        (
            "text after the block",
            "resource gitlab { address \"gitlab.company.com\"; site hq } # fine\nresource jenkins { address \"jenkins.company.com\"; site hq } and more\nallow everyone -> jenkins\n",
            &["6:61 E001 expected the end of the statement, found `and`"],
        ),
        (
            "a readable bad value beside an unreadable line: both",
            "resource gitlab {\n  address \"gitlab..company.com\"\n  ports tcp/\n  site hq\n}\n",
            &[
                "6:11 E005 `gitlab..company.com` is not a valid DNS name: it has an empty label (a DNS name looks like `gitlab.company.com`)",
                "7:13 E001 expected a port number such as `443` or a range such as `8000-8100`, found the end of the line",
            ],
        ),
        (
            "a bad `members` line keeps the group",
            "resource gitlab { address \"gitlab.company.com\"; site hq }\ngroup sre {\n  members \"dan@company.com\", eve@company.com\n  idp okta \"SRE\"\n}\nallow sre -> gitlab, wiki\ndeny sre -> wiki when country not in DE\n",
            &["7:30 E001 expected a quoted string, found `eve`"],
        ),
        (
            "a group missing its `}`",
            "resource gitlab { address \"gitlab.company.com\"; site hq }\ngroup sre {\n  members \"dan@company.com\"\nallow sre -> gitlab\n",
            &[
                "7:28 E001 expected `}`, found the end of the statement (a `{` in this statement is never closed)",
            ],
        ),
        (
            "a site with an unquoted description keeps the site",
            "site lab Laboratory\nresource gitlab { address \"gitlab.company.com\"; site lab }\n",
            &[
                "5:10 E001 expected a quoted string or the end of the statement, found `Laboratory` (names are lowercase: letters, digits, `_` and `-`)",
            ],
        ),
        (
            "a rule with one bad target",
            "resource gitlab { address \"gitlab.company.com\"; site hq }\nallow engineering -> gitlab, Wiki\n",
            &[
                "6:30 E001 expected a resource name or `site NAME`, found `Wiki` (names are lowercase: letters, digits, `_` and `-`)",
            ],
        ),
        (
            "a test with one bad step keeps its other steps",
            "resource gitlab { address \"gitlab.company.com\"; site hq }\ntest \"steps\" {\n  expect allow \"alice@company.com\" -> gitlab\n  expect alow \"alice@company.com\" -> gitlab\n  expect deny \"carol@vendor.com\" -> gitlab tcp/0\n}\n",
            &[
                "8:10 E001 expected `allow` or `deny`, found `alow`",
                "9:44 E009 port 0 is not a port (ports run from 1 to 65535; a range is written low-high, such as `tcp/8000-8100`)",
            ],
        ),
        (
            "real errors elsewhere are still found",
            "resource gitlab { address \"gitlab.company.com\"; site hq; ports tcp/443, tpc/22 }\nallow engineerng -> gitlab\n",
            &[
                "5:73 E001 expected a port such as `tcp/443`, found `tpc/22`",
                "6:7 E004 unknown group `engineerng` (did you mean `engineering`?)",
            ],
        ),
    ];
    for (name, text, expected) in cases {
        check(name, text, expected);
    }
}

/// Checks `BASE`, then `text`, then `USES_GITLAB`; `expected` is every diagnostic as
/// `line:column code message (help)`, in the order `fzc check --format json` gives them.
fn check(name: &str, text: &str, expected: &[&str]) {
    let source = format!("{BASE}{text}{USES_GITLAB}");
    let dir = tree(&[("a.fz", &source)]);
    let run = fzc(dir.path(), &["check", ".", "--format", "json"]);
    let found: Vec<String> = json(&run)["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| {
            let help = d["help"]
                .as_str()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            format!(
                "{}:{} {} {}{help}",
                d["line"],
                d["column"],
                d["code"].as_str().expect("code"),
                d["message"].as_str().expect("message")
            )
        })
        .collect();
    assert_eq!(found, expected, "{name}:\n{source}");
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not json ({e}): {}", run.stdout))
}

/// Errors of every phase (parsing, names, values, Cedar) in several files, some of them in
/// folders: human and JSON output list them by file (in path order), then line and column.
#[test]
fn diagnostics_print_in_file_and_line_order() {
    let dir = tree(&[
        (
            "b.fz",
            "allow engineerng -> gitlab\nresource gitlab { address \"gitlab.company.com\"; site hq; ports tcp/0 }\nsite hq\nsite hq\n",
        ),
        (
            "a/z.cedar",
            "permit (principal in Group::\"sre\", action, resource == Resource::\"gitlab\")\nwhen { context.country == \"XX\" };\n",
        ),
        (
            "a.fz",
            "group engineering { members \"alice@company\" }\nalow engineering -> gitlab\nresource wiki { address \"wiki.company.com\"; site lab }\n",
        ),
        ("c/d/e.fz", "allow engineering -> wiky\n"),
    ]);
    let expected = [
        "a.fz:1:29 E015",
        "a.fz:2:1 E001",
        "a.fz:3:50 E004",
        "a/z.cedar:1:29 E004",
        "a/z.cedar:2:27 E013",
        "b.fz:1:7 E004",
        "b.fz:2:64 E009",
        "b.fz:4:6 E003",
        "c/d/e.fz:1:22 E004",
    ];

    let run = fzc(dir.path(), &["check", ".", "--format", "json"]);
    let found: Vec<String> = json(&run)["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| {
            format!(
                "{}:{}:{} {}",
                d["file"].as_str().expect("file"),
                d["line"],
                d["column"],
                d["code"].as_str().expect("code")
            )
        })
        .collect();
    assert_eq!(found, expected, "{}", run.stdout);

    let run = fzc(dir.path(), &["check", "."]);
    let mut codes = run.stdout.lines().filter_map(|l| {
        l.strip_prefix("error[")
            .and_then(|rest| rest.get(..4))
            .map(str::to_owned)
    });
    let places = run
        .stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--> "));
    let found: Vec<String> = places
        .map(|place| format!("{place} {}", codes.next().unwrap_or_default()))
        .collect();
    assert_eq!(found, expected, "{}", run.stdout);
}
