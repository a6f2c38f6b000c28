//! Policy tests and invariants, run by `fzc check` against the decision table itself.
//!
//! Invariants are decided exhaustively, not sampled. Identity-provider membership is unknown
//! when compiling: a user may be in any group that is synced from a provider (and always in
//! `everyone`), but in a static-only group just when listed. The search is exact because:
//! - adding groups beyond what an allow rule and the assertion need can only make more deny
//!   rules apply, so the smallest membership for each way of matching each allow rule suffices;
//! - every condition splits its fact's domain at finitely many boundaries (codes and providers
//!   named, network edges), so one representative per region, plus "missing", covers every
//!   context;
//! - time enters a decision only through the `time` conditions of the resource's rules, and
//!   [`timeline::representatives`] gives one instant for every combination of their truth
//!   values that occurs at any instant, across every offset change of every zone they name,
//!   for all of time the time-zone database describes (see [`timeline`] for why that is
//!   exact). Those instants are found once per set of conditions.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use fz_lang::ast::Quantifier;
use fz_lang::{Code, Diagnostic, Loc};

use crate::condition::{Condition, Context, TimeCondition};
use crate::decide::DecisionTable;
use crate::resolve::{Invariant, Resolved};
use crate::table::*;
use crate::timeline;

/// Tests and invariants that held and that did not. A test counts once, however many
/// expectations it has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestReport {
    pub passed: usize,
    pub failed: usize,
    /// Every test, then every invariant, each in the order of the tree's files and lines.
    pub outcomes: Vec<Outcome>,
    /// How many rules the table has.
    pub rules: usize,
    /// The rules that decided no test expectation, in the table's order. A test exercises a
    /// rule when the rule is why one of its requests was allowed or denied (one `fzc query`
    /// would name); invariants prove properties of the whole table and exercise no rule in
    /// particular.
    pub unexercised: Vec<UnexercisedRule>,
}

/// A rule no test expectation rests on: its id, and where it was written (`path:line`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnexercisedRule {
    pub id: String,
    pub origin: String,
}

/// How one test or invariant came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: OutcomeKind,
    /// A test's name; an invariant as written (`never contractors -> prod-db`).
    pub name: String,
    pub loc: Loc,
    pub passed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeKind {
    Test,
    Invariant,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Test => "test",
            OutcomeKind::Invariant => "invariant",
        }
    }
}

/// Stands for every user the tree does not name, in counterexamples.
pub(crate) const UNNAMED_USER: &str = "unnamed-user@example.invalid";

pub fn run(
    resolved: &Resolved,
    decisions: &DecisionTable,
    diagnostics: &mut Vec<Diagnostic>,
) -> TestReport {
    let mut report = TestReport::default();
    let mut exercised: HashSet<RuleIdx> = HashSet::new();
    for test in &resolved.tests {
        let mut failed = false;
        for expectation in &test.expectations {
            let decision = decisions.decide(&expectation.request);
            exercised.extend(decision.rules.iter().copied());
            if decision.effect == expectation.effect {
                continue;
            }
            failed = true;
            let request = &expectation.request;
            let mut diagnostic = Diagnostic::new(
                Code::TestFailed,
                expectation.loc,
                format!(
                    "test \"{}\": expected {}, but `{}` is {} `{}`",
                    test.name,
                    expectation.effect,
                    request.user,
                    past_tense(decision.effect),
                    request.resource
                ),
            )
            .with_label(decision.reason.describe());
            for line in decisions.explain(request, &decision) {
                diagnostic = diagnostic.with_note(line);
            }
            diagnostics.push(diagnostic);
        }
        report.record(OutcomeKind::Test, &test.name, test.loc, !failed);
    }
    let mut cache = InstantCache::default();
    for invariant in &resolved.invariants {
        let found = counterexample(invariant, decisions, &mut cache);
        if let Some(found) = &found {
            diagnostics.push(found.diagnostic(invariant, decisions));
        }
        report.record(
            OutcomeKind::Invariant,
            &invariant.text,
            invariant.loc,
            found.is_none(),
        );
    }
    let rules = &decisions.table().rules;
    report.rules = rules.len();
    report.unexercised = (0..)
        .zip(rules)
        .filter(|(index, _)| !exercised.contains(index))
        .map(|(_, rule)| UnexercisedRule {
            id: rule.id.clone(),
            origin: rule.origin.clone(),
        })
        .collect();
    report.outcomes.sort_by_key(|o| {
        (
            o.kind == OutcomeKind::Invariant,
            o.loc.file,
            o.loc.span.start,
        )
    });
    report
}

impl TestReport {
    fn record(&mut self, kind: OutcomeKind, name: &str, loc: Loc, passed: bool) {
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        self.outcomes.push(Outcome {
            kind,
            name: name.to_owned(),
            loc,
            passed,
        });
    }
}

fn past_tense(effect: Effect) -> &'static str {
    match effect {
        Effect::Allow => "allowed",
        Effect::Deny => "denied",
    }
}

/// A request the invariant forbids that the table allows.
#[derive(Debug)]
struct Counterexample {
    user: String,
    groups: Vec<GroupIdx>,
    resource: ResourceIdx,
    port: Option<PortRange>,
    context: Context,
    rules: Vec<RuleIdx>,
}

impl Counterexample {
    fn diagnostic(&self, invariant: &Invariant, decisions: &DecisionTable) -> Diagnostic {
        let table = decisions.table();
        let groups: Vec<String> = self
            .groups
            .iter()
            .filter_map(|g| table.groups.get(*g as usize))
            .map(|g| format!("`{}`", g.id))
            .collect();
        let user = if self.user == UNNAMED_USER {
            "a user the tree does not name".to_owned()
        } else {
            format!("`{}`", self.user)
        };
        let resource = table
            .resources
            .get(self.resource as usize)
            .map_or("", |r| r.id.as_str());
        let port = self
            .port
            .map_or_else(|| "any port".to_owned(), |p| p.to_string());
        let mut diagnostic = Diagnostic::new(
            Code::InvariantFailed,
            invariant.loc,
            format!("invariant `{}` does not hold", invariant.text),
        )
        .with_label("a counterexample is below")
        .with_note(format!(
            "counterexample: {user} in groups {}",
            groups.join(", ")
        ))
        .with_note(format!(
            "reaches `{resource}` on {port} {}",
            describe_context(&self.context)
        ));
        for note in decisions.rule_notes(&self.rules) {
            diagnostic = diagnostic.with_note(format!("let through by {note}"));
        }
        diagnostic
    }
}

fn describe_context(context: &Context) -> String {
    let mut words = Vec::new();
    words.push(context.at.map_or_else(
        || "at any time".to_owned(),
        |at| format!("at {}", at.to_rfc3339()),
    ));
    words.push(context.source.map_or_else(
        || "from an unknown address".to_owned(),
        |ip| format!("from {ip}"),
    ));
    words.push(context.country.as_ref().map_or_else(
        || "in an unknown country".to_owned(),
        |c| format!("in country {c}"),
    ));
    words.push(context.provider.as_ref().map_or_else(
        || "signed in with any provider".to_owned(),
        |p| format!("signed in with {p}"),
    ));
    words.push(
        if context.verified {
            "on a verified device"
        } else {
            "on an unverified device"
        }
        .to_owned(),
    );
    words.join(", ")
}

/// A user the search tries: a user the tree names (with their index and static groups), one
/// only the invariant names, or the stand-in for every user nobody names.
#[derive(Clone, Copy, Debug)]
struct Candidate<'a> {
    email: &'a str,
    user: Option<UserIdx>,
    static_groups: &'a [GroupIdx],
}

fn counterexample(
    invariant: &Invariant,
    decisions: &DecisionTable,
    cache: &mut InstantCache,
) -> Option<Counterexample> {
    let table = decisions.table();
    let everyone = decisions.group_index(EVERYONE);
    let named_only_here = invariant
        .users
        .iter()
        .filter(|u| !table.users.iter().any(|t| &t.email == *u));
    let everybody: Vec<Candidate<'_>> = (0..)
        .zip(&table.users)
        .map(|(i, u)| Candidate {
            email: &u.email,
            user: Some(i),
            static_groups: &u.groups,
        })
        .chain(named_only_here.map(|u| Candidate {
            email: u,
            user: None,
            static_groups: &[],
        }))
        .chain([Candidate {
            email: UNNAMED_USER,
            user: None,
            static_groups: &[],
        }])
        .collect();
    for &resource in &invariant.resources {
        let entry = table.resources.get(resource as usize)?;
        let port = entry
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .map(|p| PortRange {
                last: p.first,
                ..*p
            });
        let contexts = representative_contexts(&conditions_of(entry, table), cache);
        let candidates = candidates_for(entry, invariant, table, &everybody);
        for &allow in &entry.allow {
            let rule = table.rules.get(allow as usize)?;
            for candidate in &candidates {
                for groups in memberships(invariant, rule, candidate, table, everyone) {
                    let names: Vec<&str> = groups
                        .iter()
                        .filter_map(|g| table.groups.get(*g as usize))
                        .map(|g| g.id.as_str())
                        .collect();
                    let membership = decisions.membership(candidate.email, names.iter().copied());
                    for context in &contexts {
                        let decision =
                            decisions.decide_for(&membership, resource, port.as_ref(), context);
                        if decision.effect == Effect::Allow {
                            return Some(Counterexample {
                                user: candidate.email.to_owned(),
                                groups,
                                resource,
                                port,
                                context: context.clone(),
                                rules: decision.rules,
                            });
                        }
                    }
                }
            }
        }
    }
    None
}

/// The candidates that can behave differently on this resource: users its rules or the
/// invariant name, users statically in a group they name, and the users without a tree entry.
/// Every other user is in no group that matters here and named by nothing, so the unnamed
/// stand-in already behaves exactly as they do.
fn candidates_for<'a>(
    resource: &Resource,
    invariant: &Invariant,
    table: &Table,
    everybody: &[Candidate<'a>],
) -> Vec<Candidate<'a>> {
    let rules: Vec<&Rule> = resource
        .allow
        .iter()
        .chain(&resource.deny)
        .filter_map(|r| table.rules.get(*r as usize))
        .collect();
    let groups: HashSet<GroupIdx> = rules
        .iter()
        .flat_map(|r| r.groups.iter().copied())
        .chain(invariant.groups.iter().copied())
        .collect();
    let users: HashSet<UserIdx> = rules.iter().flat_map(|r| r.users.iter().copied()).collect();
    everybody
        .iter()
        .filter(|c| match c.user {
            None => true,
            Some(u) => {
                users.contains(&u)
                    || c.static_groups.iter().any(|g| groups.contains(g))
                    || invariant.users.iter().any(|e| e == c.email)
            }
        })
        .copied()
        .collect()
}

/// The smallest group sets, for one user, that match `rule` and fall under the invariant's
/// quantifier (members of its subjects for `never`, non-members for `only`).
fn memberships(
    invariant: &Invariant,
    rule: &Rule,
    candidate: &Candidate<'_>,
    table: &Table,
    everyone: Option<GroupIdx>,
) -> Vec<Vec<GroupIdx>> {
    let is_open = |g: &GroupIdx| table.groups.get(*g as usize).is_some_and(Group::is_open);
    let base: Vec<GroupIdx> = candidate
        .static_groups
        .iter()
        .copied()
        .chain(everyone)
        .collect();
    let user_named_by_rule = candidate
        .user
        .is_some_and(|u| rule.users.binary_search(&u).is_ok());
    // Ways to match the rule: by name, or through a group the user is or may be in.
    let mut matched: Vec<Vec<GroupIdx>> = Vec::new();
    if user_named_by_rule || rule.groups.iter().any(|g| base.contains(g)) {
        matched.push(base.clone());
    } else {
        for g in rule.groups.iter().filter(|g| is_open(g)) {
            matched.push(with(&base, *g));
        }
    }
    let named = invariant.users.iter().any(|u| u == candidate.email);
    let mut result = Vec::new();
    for groups in matched {
        match invariant.quantifier {
            Quantifier::Never => {
                if named || invariant.groups.iter().any(|g| groups.contains(g)) {
                    result.push(groups);
                } else {
                    result.extend(
                        invariant
                            .groups
                            .iter()
                            .filter(|g| is_open(g))
                            .map(|g| with(&groups, *g)),
                    );
                }
            }
            Quantifier::Only => {
                if !named && !invariant.groups.iter().any(|g| groups.contains(g)) {
                    result.push(groups);
                }
            }
        }
    }
    result
}

fn with(groups: &[GroupIdx], group: GroupIdx) -> Vec<GroupIdx> {
    let mut groups = groups.to_vec();
    if !groups.contains(&group) {
        groups.push(group);
        groups.sort_unstable();
    }
    groups
}

/// The conditions of every rule that reaches a resource.
pub(crate) fn conditions_of<'a>(resource: &Resource, table: &'a Table) -> Vec<&'a Condition> {
    resource
        .allow
        .iter()
        .chain(&resource.deny)
        .filter_map(|r| table.rules.get(*r as usize))
        .flat_map(|r| &r.conditions)
        .collect()
}

/// One context per region of the facts `conditions` test, plus missing facts: every
/// combination of their truth values that some request can meet is met by one of these.
pub(crate) fn representative_contexts(
    conditions: &[&Condition],
    cache: &mut InstantCache,
) -> Vec<Context> {
    let mut times: Vec<TimeCondition> = Vec::new();
    let mut countries: Vec<Option<String>> = vec![None];
    let mut sources = vec![None];
    let mut providers: Vec<Option<String>> = vec![None];
    let mut verified = vec![false];
    for condition in conditions {
        match condition {
            Condition::Time(time) => {
                if !times.contains(time) {
                    times.push(time.clone());
                }
            }
            Condition::Country { codes, .. } => {
                countries.extend(codes.iter().cloned().map(Some));
                // A code no rule names.
                countries.push(Some(unnamed(codes, ["ZW", "AQ"])));
            }
            Condition::Source { networks, .. } => {
                for network in networks {
                    sources.push(Some(network.addr()));
                    sources.extend(network.next_after().map(Some));
                }
                sources.extend(
                    ["0.0.0.0", "::"]
                        .iter()
                        .filter_map(|ip| ip.parse().ok())
                        .map(Some),
                );
            }
            Condition::Provider { provider } => {
                providers.push(Some(provider.clone()));
                providers.push(Some("email".to_owned()));
                providers.push(Some("unnamed-provider".to_owned()));
            }
            Condition::ClientVerified => verified.push(true),
        }
    }
    // No time, then one instant per combination of the time conditions, in order of time.
    let mut instants: Vec<Option<DateTime<Utc>>> = vec![None];
    if !times.is_empty() {
        instants.extend(cache.of(times).iter().copied().map(Some));
    }
    for list in [&mut countries, &mut providers] {
        list.sort();
        list.dedup();
    }
    sources.sort();
    sources.dedup();
    verified.dedup();

    let mut contexts = Vec::new();
    for at in &instants {
        for country in &countries {
            for source in &sources {
                for provider in &providers {
                    for verified in &verified {
                        contexts.push(Context {
                            at: *at,
                            source: *source,
                            country: country.clone(),
                            provider: provider.clone(),
                            verified: *verified,
                        });
                    }
                }
            }
        }
    }
    contexts
}

fn unnamed<const N: usize>(codes: &[String], spare: [&str; N]) -> String {
    spare
        .iter()
        .find(|s| !codes.iter().any(|c| c == *s))
        .copied()
        .unwrap_or("ZW")
        .to_owned()
}

/// One instant per combination of truth values of a set of time conditions, over all time
/// ([`timeline::representatives`]), kept per set: resources whose rules test the same windows
/// share them, and every invariant about a resource asks again.
#[derive(Debug, Default)]
pub(crate) struct InstantCache(HashMap<Vec<TimeCondition>, Vec<DateTime<Utc>>>);

impl InstantCache {
    fn of(&mut self, conditions: Vec<TimeCondition>) -> &[DateTime<Utc>] {
        self.0.entry(conditions).or_insert_with_key(|conditions| {
            timeline::representatives(conditions, timeline::ALL_TIME)
                .into_iter()
                .map(|r| r.at)
                .collect()
        })
    }
}
