//! `fzc diff`: the access delta between two trees, each a directory or a revision of one in
//! git, for people (text), scripts (JSON) and pull-request comments (Markdown).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fz_compiler::Reason;
use fz_compiler::condition::Condition;
use fz_compiler::diff::{
    AccessDiff, Delta, Direction, Literal, ResourceDiff, Shape, SideDecision, Truth,
};
use fz_lang::Sources;
use serde_json::{Value, json};

use crate::git;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    Human,
    Json,
    /// A summary line and a table, for a pull-request comment.
    Markdown,
}

/// Which deltas fail the run (exit 1), for a CI gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailOn {
    Gain,
    Loss,
    Any,
}

impl FailOn {
    pub fn hit(self, diff: &AccessDiff) -> bool {
        let gains = diff.count(Direction::Gain) > 0;
        let losses = diff.count(Direction::Loss) > 0;
        match self {
            FailOn::Gain => gains,
            FailOn::Loss => losses,
            FailOn::Any => !diff.no_access_change(),
        }
    }
}

/// One side of the comparison, as the command line gives it.
pub enum TreeSource {
    Directory(PathBuf),
    /// The tree at `dir` as of `revision` in the git repository around the working directory.
    Revision {
        revision: String,
        dir: PathBuf,
    },
}

impl TreeSource {
    pub fn load(&self) -> anyhow::Result<Sources> {
        match self {
            TreeSource::Directory(dir) => Ok(fz_compiler::load_tree(dir)?),
            TreeSource::Revision { revision, dir } => git::tree_at(revision, dir),
        }
    }

    /// How diagnostics name the tree: the directory, or `REVISION:DIR`.
    pub fn label(&self) -> String {
        match self {
            TreeSource::Directory(dir) => dir.display().to_string(),
            TreeSource::Revision { revision, dir } => format!("{revision}:{}", dir.display()),
        }
    }
}

/// The one-line summary: "+2 grants, -1 grant, 1 resource changed, 0 unchanged rules moved",
/// or "no access change, ...".
pub fn summary(diff: &AccessDiff) -> String {
    let gains = diff.count(Direction::Gain);
    let losses = diff.count(Direction::Loss);
    let moved = diff.moved_rules.len();
    let moved = format!(
        "{moved} unchanged {} moved",
        if moved == 1 { "rule" } else { "rules" }
    );
    if diff.no_access_change() {
        return format!("no access change, {moved}");
    }
    let grants = |n: usize| if n == 1 { "grant" } else { "grants" };
    let mut parts = vec![
        format!("+{gains} {}", grants(gains)),
        format!("-{losses} {}", grants(losses)),
    ];
    let shapes = |what: &str, keep: fn(&ResourceDiff) -> bool| {
        let n = diff.resources.iter().filter(|r| keep(r)).count();
        (n > 0).then(|| {
            format!(
                "{n} {} {what}",
                if n == 1 { "resource" } else { "resources" }
            )
        })
    };
    parts.extend(shapes("added", |r| r.old.is_none()));
    parts.extend(shapes("removed", |r| r.new.is_none()));
    parts.extend(shapes("changed", |r| {
        r.old.is_some() && r.new.is_some() && r.old != r.new
    }));
    parts.push(moved);
    parts.join(", ")
}

pub fn render(diff: &AccessDiff, format: DiffFormat) -> String {
    match format {
        DiffFormat::Human => human(diff),
        DiffFormat::Json => format!("{:#}\n", to_json(diff)),
        DiffFormat::Markdown => markdown(diff),
    }
}

fn human(diff: &AccessDiff) -> String {
    let mut out = String::new();
    for resource in &diff.resources {
        let _ = writeln!(out, "resource {}{}", resource.id, shape_change(resource));
        if !resource.named_users.is_empty() && resource.deltas.iter().any(|d| d.users.is_none()) {
            let _ = writeln!(
                out,
                "  (decided on their own lines, or unchanged: {}; \"anyone else\" leaves them out)",
                resource.named_users.join(", ")
            );
        }
        for delta in &resource.deltas {
            let (sign, verb) = match delta.direction {
                Direction::Gain => ('+', "gains"),
                Direction::Loss => ('-', "loses"),
            };
            let _ = writeln!(
                out,
                "  {sign} {} {verb} {}{}",
                subject(resource, delta, false),
                ports(&delta.ports),
                when(&resource.conditions, &delta.when, ", when "),
            );
            let _ = writeln!(
                out,
                "      now: {}; before: {}",
                side(&delta.new),
                side(&delta.old)
            );
        }
    }
    for moved in &diff.moved_rules {
        let _ = writeln!(
            out,
            "moved: `{}` ({}) is now `{}` ({}), unchanged",
            moved.old.id, moved.old.origin, moved.new.id, moved.new.origin
        );
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out + &summary(diff) + "\n"
}

fn markdown(diff: &AccessDiff) -> String {
    let mut out = format!("**Access change**: {}\n", summary(diff));
    let rows: Vec<String> = diff
        .resources
        .iter()
        .flat_map(|resource| {
            resource.deltas.iter().map(move |delta| {
                let change = match delta.direction {
                    Direction::Gain => "➕ gain",
                    Direction::Loss => "➖ loss",
                };
                format!(
                    "| {change} | {} | `{}` | {} | {} | {} | {} |\n",
                    cell(&subject(resource, delta, true)),
                    resource.id,
                    ports(&delta.ports),
                    cell(&when(&resource.conditions, &delta.when, "")),
                    cell(&side(&delta.new)),
                    cell(&side(&delta.old)),
                )
            })
        })
        .collect();
    if !rows.is_empty() {
        out += "\n| | Who | Resource | Ports | When | Now | Before |\n";
        out += "|---|---|---|---|---|---|---|\n";
        out += &rows.concat();
    }
    let reshaped: Vec<&ResourceDiff> = diff.resources.iter().filter(|r| r.old != r.new).collect();
    if !reshaped.is_empty() {
        out += "\nResources:\n";
        for resource in reshaped {
            let _ = writeln!(out, "- `{}`{}", resource.id, cell(&shape_change(resource)));
        }
    }
    out
}

/// Text fits a Markdown table cell: no pipe ends it, no newline breaks the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// What changed about the resource itself, if anything: ` (added: ADDRESS in site S, PORTS)`,
/// ` (removed)`, or what changed of its address, site and ports.
fn shape_change(resource: &ResourceDiff) -> String {
    let ports = |shape: &Shape| {
        shape.ports.as_ref().map_or("all traffic".to_owned(), |p| {
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    match (&resource.old, &resource.new) {
        (None, Some(new)) => format!(
            " (added: {} in site {}, {})",
            new.address,
            new.site,
            ports(new)
        ),
        (Some(_), None) => " (removed)".to_owned(),
        (Some(old), Some(new)) if old != new => {
            let mut changes = Vec::new();
            if old.address != new.address {
                changes.push(format!("address {} -> {}", old.address, new.address));
            }
            if old.site != new.site {
                changes.push(format!("site {} -> {}", old.site, new.site));
            }
            if old.ports != new.ports {
                changes.push(format!("ports {} -> {}", ports(old), ports(new)));
            }
            format!(" ({})", changes.join("; "))
        }
        _ => String::new(),
    }
}

/// Who a delta is about: users by name, or everyone (else), with the groups they are in by
/// the identity provider's word. The text leaves out who "anyone else" excludes unless
/// `exclusions` asks for it inline (a table cell has no header line to say it).
fn subject(resource: &ResourceDiff, delta: &Delta, exclusions: bool) -> String {
    let mut text = match &delta.users {
        Some(users) => users.join(", "),
        None if resource.named_users.is_empty() => "everyone".to_owned(),
        None if exclusions => format!("anyone but {}", resource.named_users.join(", ")),
        None => "anyone else".to_owned(),
    };
    for any in &delta.claims_any {
        match any.as_slice() {
            [one] => {
                let _ = write!(text, " in {one}");
            }
            several => {
                let _ = write!(text, " in one of {}", several.join(", "));
            }
        }
    }
    if !delta.claims_none.is_empty() {
        let _ = write!(text, " (not in {})", delta.claims_none.join(", "));
    }
    text
}

fn ports(ports: &[fz_compiler::table::PortRange]) -> String {
    let all = ports.len() == 3
        && ports.iter().all(|p| {
            p.protocol == fz_compiler::table::Protocol::Icmp || (p.first == 1 && p.last == u16::MAX)
        });
    if all {
        "all traffic".to_owned()
    } else {
        ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `when` as text after `lead`; nothing for always.
fn when(conditions: &[Condition], when: &[Vec<Literal>], lead: &str) -> String {
    if when.iter().any(Vec::is_empty) {
        return if lead.is_empty() {
            "always".to_owned()
        } else {
            String::new()
        };
    }
    let terms: Vec<String> = when
        .iter()
        .map(|term| {
            term.iter()
                .map(|literal| {
                    let condition = conditions
                        .get(literal.condition)
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    format!("`{condition}` {}", truths(&literal.truths))
                })
                .collect::<Vec<_>>()
                .join(" and ")
        })
        .collect();
    format!("{lead}{}", terms.join(", or "))
}

/// How a condition turns out, in words: "does not hold" is "fails, or its fact is unknown".
fn truths(truths: &[Truth]) -> &'static str {
    match truths {
        [Truth::Holds] => "holds",
        [Truth::Fails] => "fails",
        [Truth::Unknown] => "is unknown",
        [Truth::Fails, Truth::Unknown] => "does not hold",
        [Truth::Holds, Truth::Unknown] => "holds or is unknown",
        _ => "is known",
    }
}

fn side(decision: &SideDecision) -> String {
    let rules = || {
        decision
            .rules
            .iter()
            .map(|r| format!("`{}` ({})", r.id, r.origin))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match decision.reason {
        Reason::Allowed => format!("allowed by {}", rules()),
        Reason::DeniedByRule => format!("denied by {}", rules()),
        Reason::NoRule => "no rule allows".to_owned(),
        Reason::PortNotAllowed => "port outside the resource's ports".to_owned(),
        Reason::UnknownResource => "no such resource".to_owned(),
    }
}

fn to_json(diff: &AccessDiff) -> Value {
    let side = |decision: &SideDecision| {
        json!({
            "reason": decision.reason.describe(),
            "rules": decision.rules.iter().map(|r| json!({"id": r.id, "origin": r.origin})).collect::<Vec<_>>(),
        })
    };
    let shape = |shape: &Option<Shape>| {
        shape.as_ref().map(|s| {
            json!({
                "site": s.site,
                "address": s.address,
                "ports": s.ports.as_ref().map(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>()),
            })
        })
    };
    let resources: Vec<Value> = diff
        .resources
        .iter()
        .map(|resource| {
            let deltas: Vec<Value> = resource
                .deltas
                .iter()
                .map(|delta| {
                    let when: Vec<Vec<Value>> = delta
                        .when
                        .iter()
                        .map(|term| {
                            term.iter()
                                .map(|l| {
                                    json!({
                                        "condition": resource.conditions.get(l.condition).map(ToString::to_string),
                                        "truths": l.truths.iter().map(|t| match t {
                                            Truth::Holds => "holds",
                                            Truth::Fails => "fails",
                                            Truth::Unknown => "unknown",
                                        }).collect::<Vec<_>>(),
                                    })
                                })
                                .collect()
                        })
                        .collect();
                    let witness = &delta.witness;
                    json!({
                        "direction": match delta.direction { Direction::Gain => "gain", Direction::Loss => "loss" },
                        "users": delta.users,
                        "claims_any": delta.claims_any,
                        "claims_none": delta.claims_none,
                        "ports": delta.ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "when": when,
                        "new": side(&delta.new),
                        "old": side(&delta.old),
                        // In the form `fzc query --requests` reads.
                        "witness": {
                            "user": witness.user,
                            "groups": witness.groups,
                            "resource": witness.resource,
                            "port": witness.port.map(|p| p.to_string()),
                            "at": witness.context.at.map(|t| t.to_rfc3339()),
                            "from": witness.context.source.map(|s| s.to_string()),
                            "country": witness.context.country,
                            "provider": witness.context.provider,
                            "verified": witness.context.verified,
                        },
                    })
                })
                .collect();
            json!({
                "id": resource.id,
                "old": shape(&resource.old),
                "new": shape(&resource.new),
                "named_users": resource.named_users,
                "deltas": deltas,
            })
        })
        .collect();
    let moved: Vec<Value> = diff
        .moved_rules
        .iter()
        .map(|m| {
            json!({
                "old": {"id": m.old.id, "origin": m.old.origin},
                "new": {"id": m.new.id, "origin": m.new.origin},
            })
        })
        .collect();
    json!({
        "summary": {
            "text": summary(diff),
            "gains": diff.count(Direction::Gain),
            "losses": diff.count(Direction::Loss),
            "resources_changed": diff.reshaped(),
            "moved_rules": diff.moved_rules.len(),
        },
        "resources": resources,
        "moved_rules": moved,
    })
}

/// `--git REV REV [DIR]` or `OLD NEW` directories into the two sides.
pub fn sources(
    git: bool,
    old: String,
    new: String,
    dir: Option<PathBuf>,
) -> anyhow::Result<[TreeSource; 2]> {
    if git {
        let dir = dir.unwrap_or_else(|| Path::new("policies").to_owned());
        Ok([old, new].map(|revision| TreeSource::Revision {
            revision,
            dir: dir.clone(),
        }))
    } else if let Some(dir) = dir {
        anyhow::bail!(
            "`{}`: a third path is the tree's directory in git, and needs `--git`",
            dir.display()
        )
    } else {
        Ok([old, new].map(|dir| TreeSource::Directory(dir.into())))
    }
}
