//! Warnings about a tree that resolves: overlapping resources, unused declarations, allow
//! rules a deny shadows, rules that repeat another. None of these changes what is decided.

use std::collections::{BTreeSet, HashMap};

use fz_lang::{Code, Diagnostic, Loc, Sources};

use crate::address::{Address, Network};
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

    for (winner, loser) in overlapping_resources(table) {
        let (Some(w), Some(l)) = (table.resources.get(winner), table.resources.get(loser)) else {
            continue;
        };
        diagnostics.push(
            Diagnostic::new(
                Code::OverlappingResources,
                at(&locations.addresses, loser),
                format!("resources `{}` (`{}`) and `{}` (`{}`) overlap", l.id, l.address, w.id, w.address),
            )
            .with_label(format!("`{}` serves the addresses both match", w.id))
            .with_note(format!("`{}` is declared at {}", w.id, origin(at(&locations.addresses, winner))))
            .with_help("the most specific address wins: an exact name before `?`, `*`, `**`; the longest prefix"),
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

/// Pairs (winner, loser) of resources whose addresses overlap, by resource index. `internet`
/// overlaps nothing: it serves only what no other resource does.
fn overlapping_resources(table: &Table) -> Vec<(usize, usize)> {
    let mut pairs = BTreeSet::new();
    let mut push = |a: usize, b: usize| {
        let (Some(ra), Some(rb)) = (table.resources.get(a), table.resources.get(b)) else {
            return;
        };
        if a != b && ra.address.overlaps(&rb.address) {
            pairs.insert(if ra.address.wins_over(&rb.address) {
                (a, b)
            } else {
                (b, a)
            });
        }
    };

    // Names: a name both patterns match ends in both literal suffixes, so one suffix is a
    // suffix of the other; walk each pattern's suffixes and compare with the patterns filed
    // under each.
    let mut by_suffix: HashMap<String, Vec<usize>> = HashMap::new();
    let mut names: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, resource) in table.resources.iter().enumerate() {
        let Address::Name(pattern) = &resource.address else {
            continue;
        };
        let labels: Vec<&str> = pattern.as_str().split('.').collect();
        let literal = labels
            .iter()
            .rev()
            .take_while(|l| !l.contains(['*', '?']))
            .count();
        let suffixes: Vec<String> = (1..=literal)
            .map(|n| labels.get(labels.len() - n..).unwrap_or(&[]).join("."))
            .collect();
        if let Some(full) = suffixes.last() {
            by_suffix.entry(full.clone()).or_default().push(i);
        }
        names.push((i, suffixes));
    }
    for (i, suffixes) in &names {
        for suffix in suffixes {
            for j in by_suffix.get(suffix).into_iter().flatten() {
                push(*i, *j);
            }
        }
    }

    // Networks: look each one up under every shorter prefix.
    let mut by_network: HashMap<Network, usize> = HashMap::new();
    for (i, resource) in table.resources.iter().enumerate() {
        if let Address::Network(n) = resource.address {
            by_network.insert(n, i);
        }
    }
    for (network, i) in &by_network {
        for prefix in 0..network.prefix() {
            let wider = network.widened(prefix);
            if let Some(j) = by_network.get(&wider) {
                push(*i, *j);
            }
        }
    }
    pairs.into_iter().collect()
}

/// An unconditional deny that covers every subject and every resource of an allow rule.
fn shadowing_deny<'a>(table: &'a Table, allow: &Rule) -> Option<&'a Rule> {
    let first = table.resources.get(*allow.resources.first()? as usize)?;
    let everyone = table
        .groups
        .iter()
        .position(|g| g.id == EVERYONE)
        .map(|i| i as GroupIdx);
    first
        .deny
        .iter()
        .filter_map(|&d| table.rules.get(d as usize))
        .find(|deny| {
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
                && allow
                    .resources
                    .iter()
                    .all(|r| deny.resources.binary_search(r).is_ok())
        })
}
