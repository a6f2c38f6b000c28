//! Warnings about a tree that resolves: overlapping resources, unused declarations, allow
//! rules a deny shadows, rules that repeat another. None of these changes what is decided.

use std::collections::{BTreeSet, HashMap};

use fz_lang::{Code, Diagnostic, Loc, Sources};

use crate::address::{self, Address};
use crate::condition::Condition;
use crate::resolve::Resolved;
use crate::table::*;

pub fn analyse(resolved: &Resolved, sources: &Sources, diagnostics: &mut Vec<Diagnostic>) {
    let table = &resolved.table;
    let locations = &resolved.locations;
    let at = |locs: &[Loc], i: usize| locs.get(i).copied().unwrap_or_default();
    let origin = |loc: Loc| {
        let (path, line, _) = sources.position(loc);
        format!("{path}:{line}")
    };

    for (i, site) in table.sites.iter().enumerate() {
        if site.resources.is_empty() {
            diagnostics.push(
                Diagnostic::new(
                    Code::UnusedSite,
                    at(&locations.sites, i),
                    format!("site `{}` has no resources", site.id),
                )
                .with_help("declare a resource with `site` set to it, or remove the site"),
            );
        }
    }

    let mut groups_used: BTreeSet<GroupIdx> = resolved.groups_named_outside_rules.clone();
    groups_used.extend(table.rules.iter().flat_map(|r| r.groups.iter().copied()));
    for (i, group) in (0..).zip(&table.groups) {
        let Some(Some(loc)) = locations.groups.get(i as usize) else {
            continue;
        };
        if !groups_used.contains(&i) {
            diagnostics.push(
                Diagnostic::new(
                    Code::UnusedGroup,
                    *loc,
                    format!(
                        "group `{}` is not used by any rule, test or invariant",
                        group.id
                    ),
                )
                .with_help("name it in a rule, or remove it"),
            );
        }
    }

    for (i, resource) in table.resources.iter().enumerate() {
        if resource.allow.is_empty() && resource.deny.is_empty() {
            diagnostics.push(
                Diagnostic::new(
                    Code::UnusedResource,
                    at(&locations.resources, i),
                    format!("no rule reaches resource `{}`", resource.id),
                )
                .with_help(
                    "everything not allowed is denied: add an allow rule, or remove the resource",
                ),
            );
        }
    }

    let addresses: Vec<&Address> = table.resources.iter().map(|r| &r.address).collect();
    for (winner, loser) in address::overlapping_pairs(&addresses) {
        let (Some(w), Some(l)) = (table.resources.get(winner), table.resources.get(loser)) else {
            continue;
        };
        // What the narrower resource does to the rules of the wider one: allow rules stop at
        // it, deny rules reach into it only when it lies wholly inside.
        let carve_out = if w.address.lies_inside(&l.address) {
            format!(
                "`{}` lies inside `{}`: allow rules on `{}` do not reach its addresses; deny rules on `{}` still do",
                w.id, l.id, l.id, l.id
            )
        } else {
            format!(
                "allow rules and deny rules on `{}` do not reach the addresses `{}` serves",
                l.id, w.id
            )
        };
        diagnostics.push(
            Diagnostic::new(
                Code::OverlappingResources,
                at(&locations.addresses, loser),
                format!("resources `{}` (`{}`) and `{}` (`{}`) overlap", l.id, l.address, w.id, w.address),
            )
            .with_label(format!("`{}` serves the addresses both match", w.id))
            .with_note(carve_out)
            .with_note(format!("`{}` is declared at {}", w.id, origin(at(&locations.addresses, winner))))
            .with_help("the most specific address wins: an exact name before `?`, `*`, `**`; the longest prefix; see docs/language.md for ties"),
        );
    }

    for (i, rule) in table.rules.iter().enumerate() {
        if rule.effect != Effect::Allow {
            continue;
        }
        if let Some(deny) = shadowing_deny(table, rule) {
            diagnostics.push(
                Diagnostic::new(
                    Code::ShadowedRule,
                    at(&locations.rules, i),
                    format!("allow rule `{}` never applies", rule.id),
                )
                .with_label(format!(
                    "deny rule `{}` covers every user and resource it names",
                    deny.id
                ))
                .with_note(format!("`{}` is written at {}", deny.id, deny.origin))
                .with_help("remove the allow rule, or narrow the deny"),
            );
        }
    }

    type Key<'a> = (
        Effect,
        &'a [GroupIdx],
        &'a [UserIdx],
        &'a [ResourceIdx],
        &'a [Condition],
    );
    let mut seen: HashMap<Key<'_>, &Rule> = HashMap::new();
    for (i, rule) in table.rules.iter().enumerate() {
        let key = (
            rule.effect,
            &rule.groups[..],
            &rule.users[..],
            &rule.resources[..],
            &rule.conditions[..],
        );
        if let Some(first) = seen.get(&key) {
            diagnostics.push(
                Diagnostic::new(
                    Code::DuplicateRule,
                    at(&locations.rules, i),
                    format!("rule `{}` repeats rule `{}`", rule.id, first.id),
                )
                .with_note(format!("`{}` is written at {}", first.id, first.origin))
                .with_help("remove one of them"),
            );
        } else {
            seen.insert(key, rule);
        }
    }
}

/// An unconditional deny that covers every subject and every resource of an allow rule
/// (naming it, or as a resource inside one it names).
fn shadowing_deny<'a>(table: &'a Table, allow: &Rule) -> Option<&'a Rule> {
    let first = table.resources.get(*allow.resources.first()? as usize)?;
    let covers = |deny: RuleIdx, resource: &ResourceIdx| {
        table
            .resources
            .get(*resource as usize)
            .is_some_and(|r| r.deny.binary_search(&deny).is_ok())
    };
    let everyone = table
        .groups
        .iter()
        .position(|g| g.id == EVERYONE)
        .map(|i| i as GroupIdx);
    first
        .deny
        .iter()
        .filter_map(|&d| table.rules.get(d as usize).map(|rule| (d, rule)))
        .find(|(d, deny)| {
            let all_users = everyone.is_some_and(|e| deny.groups.contains(&e));
            let subjects_covered = all_users
                || (allow.groups.iter().all(|g| deny.groups.contains(g))
                    && allow.users.iter().all(|u| {
                        deny.users.contains(u)
                            || table.users.get(*u as usize).is_some_and(|user| {
                                user.groups.iter().any(|g| deny.groups.contains(g))
                            })
                    }));
            deny.is_unconditional()
                && subjects_covered
                && allow.resources.iter().all(|r| covers(*d, r))
        })
        .map(|(_, deny)| deny)
}
