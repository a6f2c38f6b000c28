//! Cedar out of a checked tree: the schema Cedar's own validator needs for the tree's `.cedar`
//! files ([`schema`]), and the tree's `.fz` rules written as Cedar policies ([`export`]).
//!
//! The entity model is the one the Cedar front end (`fz_lang::cedar`) reads: `User::"EMAIL"`
//! (lowercase) in `Group::"everyone"` and its groups, `Resource::"ID"` in its `Site::"ID"`, the
//! one action `Action::"connect"`, and a context that always carries `country`, `source_ip`,
//! `provider`, `client_verified` and, for each time zone the tree's windows use, that zone's
//! wall clock `time["ZONE"]` (`{ day: "mon".."sun", minute: 0..1439 }`, since Cedar has no
//! time zones). Exported policies use only constructs that front end
//! compiles, so that a tree whose `.fz` rules are replaced by the export compiles to the same
//! table (rule ids aside: only named rules keep theirs). This module writes text and never
//! links Cedar; the tests check its output with cedar-policy's parser and validator.

use std::fmt::Write as _;

use fz_lang::ast::{Condition, DayRange, RuleDecl, Statement, Subject, Target};
use fz_lang::{Code, Diagnostic, Node};

use crate::Checked;
use crate::address::Network;
use crate::condition::{DAYS, Day, parse_clock};
use crate::table::{EVERYONE, Table};

/// The Cedar schema (`.cedarschema` syntax) of a table's entities. Sites and groups are
/// enumerated, so the validator rejects an id the tree does not declare; resources cannot be
/// (Cedar's enumerated types have no parents), and users are whoever signs in.
pub fn schema(table: &Table, tree: &str) -> String {
    let mut groups: Vec<&str> = table.groups.iter().map(|g| g.id.as_str()).collect();
    groups.push(EVERYONE);
    groups.sort_unstable();
    groups.dedup();
    let sites: Vec<&str> = table.sites.iter().map(|s| s.id.as_str()).collect();
    let mut out = format!(
        "// The Cedar schema of the fz policy tree `{tree}`, written by `fzc schema --cedar`.\n\
         // Users are named by lowercase email and are in Group::\"everyone\" and their groups;\n\
         // a resource is in its site and in every resource it lies inside. The context always\n\
         // carries every key.\n"
    );
    if sites.is_empty() {
        // Cedar requires at least one member in an enumeration.
        out += "entity Site;\n";
    } else {
        writeln!(out, "entity Site enum [{}];", quoted_list(&sites)).ok();
    }
    writeln!(out, "entity Resource in [Site, Resource];").ok();
    writeln!(out, "entity Group enum [{}];", quoted_list(&groups)).ok();
    out += "entity User in [Group];\n";
    let mut zones: Vec<&str> = table
        .rules
        .iter()
        .flat_map(|r| &r.conditions)
        .filter_map(|c| match c {
            crate::condition::Condition::Time(time) => Some(time.zone.name()),
            _ => None,
        })
        .collect();
    zones.sort_unstable();
    zones.dedup();
    let clocks = if zones.is_empty() {
        String::new()
    } else {
        out += "// The wall clock of a time zone: weekday and minute of the day (0 to 1439).\n\
                type Clock = { day: String, minute: Long };\n";
        let zones: Vec<String> = zones
            .iter()
            .map(|z| format!("{}: Clock", quote(z)))
            .collect();
        format!("  time: {{ {} }},\n", zones.join(", "))
    };
    out += &format!(
        "type Context = {{\n\
         \x20 country: String,\n\
         \x20 source_ip: ipaddr,\n\
         \x20 provider: String,\n\
         \x20 client_verified: Bool,\n\
         {clocks}\
         }};\n\
         action connect appliesTo {{\n\
         \x20 principal: [User],\n\
         \x20 resource: [Resource],\n\
         \x20 context: Context,\n\
         }};\n"
    );
    out
}

/// Every `allow`/`deny` of a checked tree's `.fz` files as a Cedar policy, in file and line
/// order, each under a comment naming where it came from. A tree with errors gives its errors;
/// a rule Cedar cannot express is an `E020` diagnostic at the construct. Either way nothing is
/// exported: never a part of the rules.
pub fn export(checked: &Checked, tree: &str) -> Result<String, Vec<Diagnostic>> {
    let Some(table) = &checked.table else {
        let errors = checked.diagnostics.iter().filter(|d| d.is_error());
        return Err(errors.cloned().collect());
    };
    let sources = &checked.sources;
    let mut out = format!(
        "// The .fz rules of the fz policy tree `{tree}` as Cedar policies, written by\n\
         // `fzc export --cedar`. In the tree in place of those rules they compile to the same\n\
         // decision table; rules without `as NAME` get ids derived from this file.\n"
    );
    let mut refused = Vec::new();
    for (id, file) in sources.iter() {
        if !file.path.ends_with(".fz") {
            continue;
        }
        // The tree checked without errors, so the file parses without diagnostics.
        let (ast, _) = fz_lang::parse_file(id, &file.text);
        for statement in &ast.statements {
            let Statement::Rule(rule) = statement else {
                continue;
            };
            let (path, line, _) = sources.position(rule.loc);
            match policy(&rule.node, table) {
                Ok(text) => {
                    write!(out, "\n// {path}:{line}\n{text}").ok();
                }
                Err(diagnostics) => refused.extend(diagnostics),
            }
        }
    }
    if refused.is_empty() {
        Ok(out)
    } else {
        Err(refused)
    }
}

/// One rule as a Cedar policy, ending with `;` and a newline.
fn policy(rule: &RuleDecl, table: &Table) -> Result<String, Vec<Diagnostic>> {
    let mut tests = Vec::new();
    let principal = match rule.subjects.as_slice() {
        [one] => principal_scope(&one.node),
        many => {
            tests.push(principal_test(many));
            "principal".to_owned()
        }
    };
    let resource = match resource_constraint(rule, table) {
        ResourceConstraint::Scope(scope) => scope,
        ResourceConstraint::Test(test) => {
            tests.push(test);
            "resource".to_owned()
        }
    };
    // `when` clauses in the order of the conditions: a time window has a clause of its own,
    // since the front end joins the clock tests of one clause into one window.
    let mut clauses = Vec::new();
    let mut refused = Vec::new();
    for condition in &rule.conditions {
        match condition_test(condition) {
            Ok(test) if matches!(condition.node, Condition::Time { .. }) => {
                if !tests.is_empty() {
                    clauses.push(std::mem::take(&mut tests));
                }
                clauses.push(vec![test]);
            }
            Ok(test) => tests.push(test),
            Err(diagnostic) => refused.push(diagnostic),
        }
    }
    if !refused.is_empty() {
        return Err(refused);
    }
    if !tests.is_empty() {
        clauses.push(tests);
    }
    let mut out = String::new();
    if let Some(name) = &rule.name {
        writeln!(out, "@id({})", quote(&name.node)).ok();
    }
    let effect = match rule.effect {
        fz_lang::ast::Effect::Allow => "permit",
        fz_lang::ast::Effect::Deny => "forbid",
    };
    write!(
        out,
        "{effect} (\n  {principal},\n  action == Action::\"connect\",\n  {resource}\n)"
    )
    .ok();
    for clause in clauses {
        match clause.as_slice() {
            [one] if !one.contains('\n') && one.len() <= 60 => {
                out += &format!("\nwhen {{ {one} }}");
            }
            many => out += &format!("\nwhen {{\n  {}\n}}", many.join(" &&\n  ")),
        }
    }
    out += ";\n";
    Ok(out)
}

fn principal_scope(subject: &Subject) -> String {
    match subject {
        Subject::Group(group) if group == EVERYONE => "principal".to_owned(),
        Subject::Group(group) => format!("principal in Group::{}", quote(group)),
        Subject::User(email) => format!("principal == {}", user(email)),
    }
}

/// Several subjects: groups in one list and users in another, since Cedar's validator wants
/// the members of a set to have one type.
fn principal_test(subjects: &[Node<Subject>]) -> String {
    let mut groups = Vec::new();
    let mut users = Vec::new();
    for subject in subjects {
        match &subject.node {
            Subject::Group(group) => groups.push(format!("Group::{}", quote(group))),
            Subject::User(email) => users.push(user(email)),
        }
    }
    either(&[("principal in", groups), ("principal ==", users)])
}

/// How a policy names its resources: in its scope, or in a `when` test.
enum ResourceConstraint {
    Scope(String),
    Test(String),
}

/// The rule's targets as Cedar names them. Cedar's `in` follows the entity hierarchy, where a
/// resource is in its site and in every resource it lies inside, so it also reaches the
/// resources inside a target: what an fz deny covers. An fz allow covers only what it names,
/// so it names resources with `==`, and a site with `in` only where that reaches no resource
/// of another site (one lying inside a resource of this one); otherwise it lists the site's
/// resources. The Cedar front end gives all targets of a policy one reach, so an allow that
/// names resources and sites lists the sites' resources too.
fn resource_constraint(rule: &RuleDecl, table: &Table) -> ResourceConstraint {
    let named = |target: &Target| match target {
        Target::Resource(resource) => format!("Resource::{}", quote(resource)),
        Target::Site(site) => format!("Site::{}", quote(site)),
    };
    // An fz rule reaches inside all its targets (a deny) or none (an allow).
    if rule.targets.iter().all(|t| t.node.covers_inside) {
        return match rule.targets.as_slice() {
            [one] => ResourceConstraint::Scope(format!("resource in {}", named(&one.node.target))),
            many => {
                let mut resources = Vec::new();
                let mut sites = Vec::new();
                for target in many {
                    match &target.node.target {
                        Target::Resource(_) => resources.push(named(&target.node.target)),
                        Target::Site(_) => sites.push(named(&target.node.target)),
                    }
                }
                ResourceConstraint::Test(either(&[
                    ("resource in", resources),
                    ("resource in", sites),
                ]))
            }
        };
    }
    let sites_only = rule
        .targets
        .iter()
        .all(|t| matches!(&t.node.target, Target::Site(site) if site_keeps_to_itself(table, site)));
    if sites_only {
        return match rule.targets.as_slice() {
            [one] => ResourceConstraint::Scope(format!("resource in {}", named(&one.node.target))),
            many => {
                let sites = many.iter().map(|t| named(&t.node.target)).collect();
                ResourceConstraint::Test(either(&[("resource in", sites)]))
            }
        };
    }
    let mut resources: Vec<String> = Vec::new();
    for target in &rule.targets {
        match &target.node.target {
            Target::Resource(resource) => resources.push(resource.clone()),
            Target::Site(site) => resources.extend(site_resources(table, site)),
        }
    }
    resources.sort();
    resources.dedup();
    let tests: Vec<String> = resources
        .iter()
        .map(|r| format!("resource == Resource::{}", quote(r)))
        .collect();
    match tests.as_slice() {
        [one] => ResourceConstraint::Scope(one.clone()),
        many => ResourceConstraint::Test(format!("({})", many.join(" || "))),
    }
}

/// The ids of a site's resources.
fn site_resources<'a>(table: &'a Table, site: &'a str) -> impl Iterator<Item = String> + 'a {
    table
        .sites
        .iter()
        .filter(move |s| s.id == site)
        .flat_map(|s| &s.resources)
        .filter_map(|r| table.resources.get(*r as usize))
        .map(|r| r.id.clone())
}

/// Whether no resource of another site lies inside a resource of `site`: then Cedar's
/// `resource in Site::"site"` reaches exactly the site's resources.
fn site_keeps_to_itself(table: &Table, site: &str) -> bool {
    let Some(index) = table.sites.iter().position(|s| s.id == site) else {
        return false;
    };
    let Some(own) = table.sites.get(index) else {
        return false;
    };
    own.resources
        .iter()
        .filter_map(|r| table.resources.get(*r as usize))
        .all(|outer| {
            table.resources.iter().all(|inner| {
                inner.site as usize == index || !inner.address.lies_inside(&outer.address)
            })
        })
}

/// `VAR in [..] || VAR in [..]` over the non-empty lists, in parentheses when there are two.
/// A list of one is written with the test given for it (`principal == User::"e"`).
fn either(lists: &[(&str, Vec<String>)]) -> String {
    let tests: Vec<String> = lists
        .iter()
        .filter_map(|(single, list)| match list.as_slice() {
            [] => None,
            [one] => Some(format!("{single} {one}")),
            many => {
                let var = single.split(' ').next().unwrap_or(single);
                Some(format!("{var} in [{}]", many.join(", ")))
            }
        })
        .collect();
    match tests.as_slice() {
        [one] => one.clone(),
        many => format!("({})", many.join(" || ")),
    }
}

fn condition_test(condition: &Node<Condition>) -> Result<String, Diagnostic> {
    Ok(match &condition.node {
        Condition::Country { negated, codes } => {
            let codes: Vec<String> = codes
                .iter()
                .map(|c| quote(&c.node.to_ascii_uppercase()))
                .collect();
            match (codes.as_slice(), negated) {
                ([one], false) => format!("context.country == {one}"),
                ([one], true) => format!("context.country != {one}"),
                (many, negated) => format!(
                    "{}[{}].contains(context.country)",
                    if *negated { "!" } else { "" },
                    many.join(", ")
                ),
            }
        }
        Condition::Source { negated, networks } => {
            let mut ranges = Vec::new();
            for network in networks {
                ranges.push(format!(
                    "context.source_ip.isInRange(ip({}))",
                    quote(&cedar_network(network)?)
                ));
            }
            let any = match ranges.as_slice() {
                [one] => one.clone(),
                many => format!("({})", many.join(" || ")),
            };
            if *negated { format!("!{any}") } else { any }
        }
        Condition::Provider(provider) => format!("context.provider == {}", quote(&provider.node)),
        Condition::ClientVerified => "context.client_verified".to_owned(),
        Condition::Time {
            days,
            windows,
            zone,
        } => time_test(days, windows, &zone.node),
    })
}

/// A time condition over the zone's clock in the context: one clause per window, two for a
/// window that crosses midnight (the second names the following days and has no lower bound,
/// which is how the front end tells it from a window of its own).
fn time_test(
    days: &[Node<DayRange>],
    windows: &[Node<fz_lang::ast::Window>],
    zone: &str,
) -> String {
    // The tree passed `check`: days, clocks and the zone are valid.
    let mut on = [false; 7];
    for range in days {
        let first = Day::parse(&range.node.first);
        let last = range.node.last.as_deref().and_then(Day::parse);
        let covered = match (range.node.first.as_str(), first, last) {
            ("any", ..) => DAYS.to_vec(),
            (_, Some(first), Some(last)) => first.through(last),
            (_, Some(first), None) => vec![first],
            (_, None, _) => Vec::new(),
        };
        for day in covered {
            if let Some(slot) = on.get_mut(day as usize) {
                *slot = true;
            }
        }
    }
    let clock = format!("context.time[{}]", quote(zone));
    let day_test = |on: &[bool; 7], always: bool| -> Option<String> {
        let names: Vec<String> = DAYS
            .iter()
            .zip(on)
            .filter(|(_, on)| **on)
            .map(|(day, _)| quote(day.as_str()))
            .collect();
        match names.as_slice() {
            _ if names.len() == 7 && !always => None,
            [one] => Some(format!("{clock}.day == {one}")),
            many => Some(format!("[{}].contains({clock}.day)", many.join(", "))),
        }
    };
    let mut following = [false; 7];
    for (i, slot) in following.iter_mut().enumerate() {
        *slot = on.get((i + 6) % 7).copied().unwrap_or(false);
    }
    let mut clauses = Vec::new();
    for window in windows {
        let start = parse_clock(&window.node.start).unwrap_or(0);
        let end = parse_clock(&window.node.end).unwrap_or(DAY_MINUTES);
        let from = format!("{clock}.minute >= {start}");
        if start < end {
            let until = (end < DAY_MINUTES).then(|| format!("{clock}.minute < {end}"));
            let tests: Vec<String> = day_test(&on, false)
                .into_iter()
                .chain([from])
                .chain(until)
                .collect();
            clauses.push(tests.join(" && "));
        } else {
            let head: Vec<String> = day_test(&on, false).into_iter().chain([from]).collect();
            let tail: Vec<String> = day_test(&following, true)
                .into_iter()
                .chain([format!("{clock}.minute < {end}")])
                .collect();
            clauses.push(head.join(" && "));
            clauses.push(tail.join(" && "));
        }
    }
    match clauses.as_slice() {
        [one] => one.replace(" && ", " &&\n  "),
        many => many
            .iter()
            .map(|c| format!("({c})"))
            .collect::<Vec<_>>()
            .join(" ||\n  "),
    }
}

/// A network as Cedar's `ip("..")` reads it. Cedar refuses an IPv4 address written inside an
/// IPv6 one (`::ffff:10.0.0.0/104`), which is how such an address prints.
fn cedar_network(text: &Node<String>) -> Result<String, Diagnostic> {
    // The tree passed `check`, so the text is a network.
    let canonical = text
        .node
        .parse::<Network>()
        .map_or_else(|_| text.node.clone(), |n| n.to_string());
    if canonical.contains(':') && canonical.contains('.') {
        let help = match ipv4_inside(&canonical) {
            Some(ipv4) => format!("write the IPv4 range it stands for, `{ipv4}`"),
            None => "write the range as IPv4".to_owned(),
        };
        return Err(not_in_cedar(
            text,
            &format!("`{canonical}` cannot be written in Cedar"),
            "Cedar refuses IPv4 inside IPv6",
            &help,
        ));
    }
    Ok(canonical)
}

/// The IPv4 range an IPv4-mapped IPv6 range (`::ffff:192.0.2.0/120`) stands for
/// (`192.0.2.0/24`), when its prefix keeps the mapping whole.
fn ipv4_inside(network: &str) -> Option<String> {
    let (address, length) = network.split_once('/').unwrap_or((network, "128"));
    let ipv4 = address
        .parse::<std::net::Ipv6Addr>()
        .ok()?
        .to_ipv4_mapped()?;
    let length = length.parse::<u8>().ok()?.checked_sub(96)?;
    Some(format!("{ipv4}/{length}"))
}

fn not_in_cedar<T>(at: &Node<T>, message: &str, label: &str, help: &str) -> Diagnostic {
    Diagnostic::new(Code::NotInCedar, at.loc, message)
        .with_label(label)
        .with_help(help)
}

/// Minutes in a day: a window may end at `24:00`.
const DAY_MINUTES: u16 = 1440;

fn user(email: &str) -> String {
    format!("User::{}", quote(&email.to_ascii_lowercase()))
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| quote(i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Cedar string literal. Cedar reads Rust's escapes, so Rust's debug form of a string is one.
fn quote(text: &str) -> String {
    format!("{text:?}")
}
