//! The access delta between two decision tables (`fzc diff`): every request the two decide
//! differently, gathered into lines a reviewer reads ("everyone in ops gains tcp/5432 on db,
//! allowed by `ops-db`"), each with a request that shows it.
//!
//! Exact, not sampled. A request is a user, the groups the identity provider says they are in,
//! a resource id, a port and a context; for each resource whose meaning may have changed the
//! diff walks every class of each of these that a decision can tell apart:
//! - contexts: one per combination of truth values of the conditions on the resource's rules in
//!   either table (the representatives `fzc check` proves invariants over);
//! - users: the users either tree names that a rule on the resource can treat apart (named by
//!   a rule, or a static member of a group a rule names), in classes of users the rules cannot
//!   tell apart, and one stand-in for everyone else;
//! - claimed groups: only open groups count for a claim, and only those an applying rule names;
//!   groups the rules name alike form one class, and the classes are split (Shannon expansion)
//!   only as far as a decision depends on them, into regions such as "in ops or sre, not in
//!   contractors" where both decisions are settled;
//! - ports: the resource's port filter on each side.
//!
//! Each region decided differently becomes a [`Delta`] with a witness request, so every request
//! decided differently lies in some delta, and each delta holds a request decided differently.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::condition::{Condition, Context};
use crate::decide::{Decision, DecisionTable, Reason, Request};
use crate::table::*;
use crate::verify::{InstantCache, UNNAMED_USER, conditions_of, representative_contexts};

/// What changed between two tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessDiff {
    /// Resources with a delta or a changed address, site or port filter, by id.
    pub resources: Vec<ResourceDiff>,
    /// Rules whose meaning is the same in both trees, under another id or in another file.
    pub moved_rules: Vec<MovedRule>,
}

impl AccessDiff {
    pub fn count(&self, direction: Direction) -> usize {
        self.resources
            .iter()
            .flat_map(|r| &r.deltas)
            .filter(|d| d.direction == direction)
            .count()
    }

    /// Resources added, removed, or given another address, site or port filter.
    pub fn reshaped(&self) -> usize {
        self.resources.iter().filter(|r| r.old != r.new).count()
    }

    /// No request is decided differently and no resource changed what it is.
    pub fn no_access_change(&self) -> bool {
        self.resources.is_empty()
    }
}

/// One resource, by id, on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDiff {
    pub id: String,
    /// `None`: the tree has no resource of this id.
    pub old: Option<Shape>,
    pub new: Option<Shape>,
    /// The conditions [`Literal`]s refer to: those of the resource's rules in either tree.
    pub conditions: Vec<Condition>,
    /// Users whose deltas on this resource are listed by name (possibly none): a delta for
    /// everyone else ([`Delta::users`] `None`) is about every other user.
    pub named_users: Vec<String>,
    pub deltas: Vec<Delta>,
}

/// What a resource is, apart from the rules that reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub site: String,
    pub address: String,
    /// `None`: all traffic.
    pub ports: Option<Vec<PortRange>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Gain,
    Loss,
}

/// A region of requests to one resource that the new table decides otherwise than the old.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub direction: Direction,
    /// The users it is about, by email; `None`: every user not in
    /// [`ResourceDiff::named_users`].
    pub users: Option<Vec<String>>,
    /// Groups the request claims: at least one of each list.
    pub claims_any: Vec<Vec<String>>,
    /// Groups the request does not claim.
    pub claims_none: Vec<String>,
    /// The ports gained or lost, sorted and merged.
    pub ports: Vec<PortRange>,
    /// When: any of these conjunctions (an empty conjunction is always).
    pub when: Vec<Vec<Literal>>,
    pub old: SideDecision,
    pub new: SideDecision,
    /// A request of the region, decided as `old` and `new` say.
    pub witness: Request,
}

/// How one table decides a delta's witness, and the rules that decided it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SideDecision {
    pub reason: Reason,
    pub rules: Vec<RuleRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    pub id: String,
    /// `path:line`.
    pub origin: String,
}

/// A condition of [`ResourceDiff::conditions`] and how it turns out: any of `truths`
/// (sorted; never every value the condition can take, which would say nothing).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Literal {
    pub condition: usize,
    pub truths: Vec<Truth>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Truth {
    Holds,
    Fails,
    /// The request lacks the fact the condition reads (no country known, say).
    Unknown,
}

impl Truth {
    pub fn of(condition: &Condition, context: &Context) -> Truth {
        let known = match condition {
            Condition::Time(_) => context.at.is_some(),
            Condition::Country { .. } => context.country.is_some(),
            Condition::Source { .. } => context.source.is_some(),
            Condition::Provider { .. } => context.provider.is_some(),
            Condition::ClientVerified => true,
        };
        match (known, condition.holds(context, false)) {
            (false, _) => Truth::Unknown,
            (true, true) => Truth::Holds,
            (true, false) => Truth::Fails,
        }
    }
}

/// A rule that reads the same in both trees but moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovedRule {
    pub old: RuleRef,
    pub new: RuleRef,
}

/// The access delta from `old` to `new`.
pub fn diff(old: &DecisionTable, new: &DecisionTable) -> AccessDiff {
    let ids: BTreeSet<&str> = old
        .table()
        .resources
        .iter()
        .chain(&new.table().resources)
        .map(|r| r.id.as_str())
        .collect();
    let mut cache = InstantCache::default();
    let resources = ids
        .into_iter()
        .filter_map(|id| {
            let sides = [Side::new(old, id), Side::new(new, id)];
            resource_diff(id, sides, &mut cache)
        })
        .collect();
    AccessDiff {
        resources,
        moved_rules: moved_rules(old.table(), new.table()),
    }
}

/// One table's view of the resource being compared.
#[derive(Clone, Copy)]
struct Side<'a> {
    decisions: &'a DecisionTable,
    resource: Option<(ResourceIdx, &'a Resource)>,
}

impl<'a> Side<'a> {
    fn new(decisions: &'a DecisionTable, id: &str) -> Self {
        let resource = decisions.resource_index(id).and_then(|index| {
            let resource = decisions.table().resources.get(index as usize)?;
            Some((index, resource))
        });
        Side {
            decisions,
            resource,
        }
    }

    fn table(&self) -> &'a Table {
        self.decisions.table()
    }

    fn rules(&self, effect: Effect) -> impl Iterator<Item = &'a Rule> + 'a {
        let table = self.table();
        let indexes: &'a [RuleIdx] = match (self.resource, effect) {
            (None, _) => &[],
            (Some((_, r)), Effect::Allow) => &r.allow,
            (Some((_, r)), Effect::Deny) => &r.deny,
        };
        indexes
            .iter()
            .filter_map(move |i| table.rules.get(*i as usize))
    }

    fn all_rules(&self) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules(Effect::Allow).chain(self.rules(Effect::Deny))
    }

    fn group(&self, index: GroupIdx) -> Option<&'a Group> {
        self.table().groups.get(index as usize)
    }

    fn shape(&self) -> Option<Shape> {
        let (_, resource) = self.resource?;
        Some(Shape {
            site: self
                .table()
                .sites
                .get(resource.site as usize)
                .map(|s| s.id.clone())
                .unwrap_or_default(),
            address: resource.address.to_string(),
            ports: resource.ports.clone(),
        })
    }

    /// The ports a grant for the resource opens: none when the tree lacks it.
    fn filter(&self) -> Vec<PortRange> {
        match self.resource {
            None => Vec::new(),
            Some((_, r)) => match &r.ports {
                None => all_ports(),
                Some(ports) => normalize(ports.clone()),
            },
        }
    }

    /// What decides requests to the resource: equal for two tables only when they decide
    /// every request to it alike (its port filter, and its rules as a set, each with its
    /// groups by name, openness and static members, its users by email, its conditions).
    /// Rules alike but for their conditions may sort apart and make two equal meanings
    /// unequal; that only costs the search of a resource that did not change. `None` without
    /// the resource.
    fn meaning(&self) -> Option<ResourceMeaning<'a>> {
        self.resource?;
        let table = self.table();
        let mut rules: Vec<RuleMeaning<'a>> = self
            .all_rules()
            .map(|rule| {
                let mut groups: Vec<(&str, bool, &[String])> = rule
                    .groups
                    .iter()
                    .filter_map(|g| self.group(*g))
                    .map(|g| (g.id.as_str(), g.is_open(), g.members.as_slice()))
                    .collect();
                groups.sort_unstable();
                let users = rule
                    .users
                    .iter()
                    .filter_map(|u| table.users.get(*u as usize))
                    .map(|u| u.email.as_str())
                    .collect();
                (rule.effect, groups, users, rule.conditions.as_slice())
            })
            .collect();
        rules.sort_unstable_by(|a, b| (a.0, &a.1, &a.2).cmp(&(b.0, &b.1, &b.2)));
        Some((self.filter(), rules))
    }

    fn rule_ref(&self, rule: RuleIdx) -> RuleRef {
        let rule = self.table().rules.get(rule as usize);
        RuleRef {
            id: rule.map(|r| r.id.clone()).unwrap_or_default(),
            origin: rule.map(|r| r.origin.clone()).unwrap_or_default(),
        }
    }
}

fn resource_diff(id: &str, sides: [Side<'_>; 2], cache: &mut InstantCache) -> Option<ResourceDiff> {
    let [old, new] = sides;
    let shapes = [old.shape(), new.shape()];
    let meaning = old.meaning();
    let same_meaning = meaning.is_some() && meaning == new.meaning();
    if same_meaning && shapes[0] == shapes[1] {
        return None;
    }
    let mut conditions: Vec<&Condition> = Vec::new();
    for side in &sides {
        if let Some((_, resource)) = side.resource {
            for condition in conditions_of(resource, side.table()) {
                if !conditions.contains(&condition) {
                    conditions.push(condition);
                }
            }
        }
    }
    let [old_shape, new_shape] = shapes;
    let mut diff = ResourceDiff {
        id: id.to_owned(),
        old: old_shape,
        new: new_shape,
        conditions: conditions.iter().map(|c| (*c).clone()).collect(),
        named_users: Vec::new(),
        deltas: Vec::new(),
    };
    if !same_meaning {
        let contexts = representative_contexts(&conditions, cache);
        let subjects = subjects(&sides);
        let found = Search {
            id,
            sides,
            filters: [old.filter(), new.filter()],
            conditions: &conditions,
        }
        .run(&contexts, &subjects);
        (diff.named_users, diff.deltas) = found;
    }
    // Rules that changed without changing a decision (another group whose members all had
    // access already, say) leave nothing to report.
    (!diff.deltas.is_empty() || diff.old != diff.new).then_some(diff)
}

/// Users a decision on the resource cannot tell apart: a class of named users, or (with no
/// users) the stand-in for everyone else.
#[derive(Clone, Debug)]
struct Subject {
    users: Vec<String>,
    /// For the stand-in: the named users it stands for too, each with the groups the resource's
    /// rules name that list them in both trees (a witness for a region in such a group).
    stands_for: Vec<(String, BTreeSet<String>)>,
}

/// The stand-in first, then the named users it cannot stand for, in classes: users with the
/// same static groups among those the resource's rules name, on each side, and named by the
/// same rules.
///
/// The stand-in's "in G" is "claims G where G is open, or is listed in G in both trees", so it
/// stands for a named user whom no rule on the resource names directly and whose listed
/// groups among those named are the same in both trees and open (or not) in both.
fn subjects(sides: &[Side<'_>; 2]) -> Vec<Subject> {
    let mut emails: BTreeSet<&str> = BTreeSet::new();
    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    for side in sides {
        for rule in side.all_rules() {
            for group in rule.groups.iter().filter_map(|g| side.group(*g)) {
                referenced.insert(&group.id);
                emails.extend(group.members.iter().map(String::as_str));
            }
            emails.extend(
                rule.users
                    .iter()
                    .filter_map(|u| side.table().users.get(*u as usize))
                    .map(|u| u.email.as_str()),
            );
        }
    }
    let openness = |side: &Side<'_>, name: &str| {
        side.decisions
            .group_index(name)
            .and_then(|g| side.group(g))
            .map(Group::is_open)
    };
    let mut classes: BTreeMap<[Listing; 2], Vec<String>> = BTreeMap::new();
    let mut stands_for = Vec::new();
    for email in emails {
        let key = sides.each_ref().map(|side| {
            let user = side.decisions.user_index(email);
            let statics = user
                .and_then(|u| side.table().users.get(u as usize))
                .map_or(&[][..], |u| &u.groups[..]);
            let listed: Vec<String> = statics
                .iter()
                .filter_map(|g| side.group(*g))
                .map(|g| g.id.clone())
                .filter(|g| referenced.contains(g.as_str()))
                .collect();
            let named_by: Vec<String> = side
                .all_rules()
                .filter(|r| user.is_some_and(|u| r.users.binary_search(&u).is_ok()))
                .map(|r| r.id.clone())
                .collect();
            (listed, named_by)
        });
        let [(old_listed, old_named), (new_listed, new_named)] = &key;
        let standable = old_named.is_empty()
            && new_named.is_empty()
            && old_listed == new_listed
            && old_listed
                .iter()
                .all(|g| openness(&sides[0], g) == openness(&sides[1], g));
        if standable {
            stands_for.push((email.to_owned(), old_listed.iter().cloned().collect()));
        } else {
            classes.entry(key).or_default().push(email.to_owned());
        }
    }
    std::iter::once(Subject {
        users: Vec::new(),
        stands_for,
    })
    .chain(classes.into_values().map(|users| Subject {
        users,
        stands_for: Vec::new(),
    }))
    .collect()
}

/// A rule as a decision reads it, by names: effect, groups (id, open, static members), users,
/// conditions.
type RuleMeaning<'a> = (
    Effect,
    Vec<(&'a str, bool, &'a [String])>,
    Vec<&'a str>,
    &'a [Condition],
);

/// A resource's port filter and its rules ([`Side::meaning`]).
type ResourceMeaning<'a> = (Vec<PortRange>, Vec<RuleMeaning<'a>>);

/// Per side, a user's listed groups among those the resource's rules name, and the rules that
/// name the user.
type Listing = (Vec<String>, Vec<String>);

/// Any of these conjunctions of literals ([`Delta::when`]).
type When = Vec<Vec<Literal>>;

/// How a subject stands towards a group name on each side, and where the applying rules name
/// it: (side, allow or deny, position).
type Incidence = ([Standing; 2], Vec<(usize, usize, usize)>);

/// How a subject stands towards one group on one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    /// A static member.
    Member,
    /// In it only by claiming it (an open group).
    ByClaim,
    /// For the stand-in: in it when listed as a member in both trees (a static-only group).
    Listed,
    /// Never in it (a static-only group that does not list them, or no such group).
    Outside,
}

/// A rule as the region search reads it: whether it names the subject whatever the claims,
/// and the claim classes that would make it name them.
#[derive(Clone, Debug)]
struct RuleView {
    names_anyway: bool,
    classes: Vec<usize>,
}

/// The applying rules of one side for one context, allow then deny.
type Applying = [Vec<RuleView>; 2];

/// A region of claims where both sides' decisions are settled: per class, claimed or not
/// (`None`: either).
#[derive(Clone, Debug)]
struct Region {
    claims: Vec<Option<bool>>,
    allowed: [bool; 2],
}

/// What a delta line is before its contexts are gathered into `when`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct LineKey {
    direction: Direction,
    claims_any: Vec<Vec<String>>,
    claims_none: Vec<String>,
    ports: Vec<PortRange>,
    old: SideDecision,
    new: SideDecision,
}

/// A line of a subject in a context, and a request that shows it.
#[derive(Clone, Debug)]
struct Found {
    key: LineKey,
    witness: Request,
}

#[derive(Clone, Debug)]
struct Gathered {
    truths: BTreeSet<Vec<Truth>>,
    witness: Request,
}

struct Search<'a, 'b> {
    id: &'a str,
    sides: [Side<'a>; 2],
    filters: [Vec<PortRange>; 2],
    conditions: &'b [&'a Condition],
}

impl Search<'_, '_> {
    /// The named users and the deltas of the resource.
    fn run(&self, contexts: &[Context], subjects: &[Subject]) -> (Vec<String>, Vec<Delta>) {
        let mut per_subject: Vec<BTreeMap<LineKey, Gathered>> =
            vec![BTreeMap::new(); subjects.len()];
        let mut domains: Vec<BTreeSet<Truth>> = vec![BTreeSet::new(); self.conditions.len()];
        // What a subject's regions are depends on the context only through which rules apply
        // on each side: the contexts are sorted by that pattern (a handful of them), and the
        // regions worked out once per pattern, with its first context for the witnesses.
        let mut patterns: Vec<(Context, BTreeSet<Vec<Truth>>)> = Vec::new();
        let mut pattern_of: FxHashMap<Vec<bool>, usize> = FxHashMap::default();
        for context in contexts {
            let truths: Vec<Truth> = self
                .conditions
                .iter()
                .map(|c| Truth::of(c, context))
                .collect();
            for (domain, truth) in domains.iter_mut().zip(&truths) {
                domain.insert(*truth);
            }
            let index = *pattern_of
                .entry(self.applying_pattern(context))
                .or_insert_with(|| {
                    patterns.push((context.clone(), BTreeSet::new()));
                    patterns.len() - 1
                });
            if let Some((_, seen)) = patterns.get_mut(index) {
                seen.insert(truths);
            }
        }
        for (subject, lines) in subjects.iter().zip(per_subject.iter_mut()) {
            for (context, truths) in &patterns {
                for line in self.regions(subject, context) {
                    lines
                        .entry(line.key)
                        .or_insert_with(|| Gathered {
                            truths: BTreeSet::new(),
                            witness: line.witness,
                        })
                        .truths
                        .extend(truths.iter().cloned());
                }
            }
        }
        let mut per_subject = per_subject.into_iter().map(|lines| {
            lines
                .into_iter()
                .map(|(key, gathered)| (key, compact(gathered.truths, &domains), gathered.witness))
                .collect::<Vec<_>>()
        });
        let everyone_else = per_subject.next().unwrap_or_default();
        let same = |a: &[(LineKey, When, Request)], b: &[(LineKey, When, Request)]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1 == y.1)
        };
        let mut named_users = Vec::new();
        // Named users' lines merged where they read the same.
        let mut named: BTreeMap<(LineKey, When), (Vec<String>, Request)> = BTreeMap::new();
        for (subject, lines) in subjects.iter().skip(1).zip(per_subject) {
            if same(&lines, &everyone_else) {
                continue;
            }
            named_users.extend(subject.users.iter().cloned());
            for (key, when, witness) in lines {
                named
                    .entry((key, when))
                    .or_insert_with(|| (Vec::new(), witness))
                    .0
                    .extend(subject.users.iter().cloned());
            }
        }
        named_users.sort();
        let deltas = everyone_else
            .into_iter()
            .map(|(key, when, witness)| delta(key, None, when, witness))
            .chain(
                named
                    .into_iter()
                    .map(|((key, when), (mut users, witness))| {
                        users.sort();
                        delta(key, Some(users), when, witness)
                    }),
            )
            .collect();
        (named_users, deltas)
    }

    /// Which rules of either side apply in a context (allow rules with every condition true,
    /// deny rules with none false, missing facts counting against the allow and for the deny).
    fn applying_pattern(&self, context: &Context) -> Vec<bool> {
        self.sides
            .iter()
            .flat_map(|side| {
                [Effect::Allow, Effect::Deny]
                    .into_iter()
                    .flat_map(move |effect| {
                        let when_missing = effect == Effect::Deny;
                        side.rules(effect).map(move |r| {
                            r.conditions.iter().all(|c| c.holds(context, when_missing))
                        })
                    })
            })
            .collect()
    }

    /// The lines of one subject in a context, each with a witness request.
    fn regions(&self, subject: &Subject, context: &Context) -> Vec<Found> {
        let (classes, applying) = self.claim_classes(subject, context);
        let mut regions = Vec::new();
        split(&applying, &mut vec![None; classes.len()], &mut regions);
        let mut found = Vec::new();
        for region in regions {
            let outcomes = self.outcomes(region.allowed);
            if outcomes.is_empty() {
                continue;
            }
            // A region no user can be in (members of a static-only group that lists nobody
            // who fits) holds no request.
            let Some((email, claimed)) = witness_user(subject, &region, &classes) else {
                continue;
            };
            for (direction, ports) in outcomes {
                // A port only when the rules decide alike and the filters do not.
                let port = (region.allowed == [true, true])
                    .then(|| ports.first().map(first_port))
                    .flatten();
                let witness = Request {
                    user: email.clone(),
                    groups: claimed.clone(),
                    resource: self.id.to_owned(),
                    port,
                    context: context.clone(),
                };
                let [old, new] = [0, 1].map(|side| {
                    let decision = self.sides[side].decisions.decide(&witness);
                    self.side_decision(side, &decision)
                });
                let pick = |want: bool| -> Vec<Vec<String>> {
                    region
                        .claims
                        .iter()
                        .zip(&classes)
                        .filter(|(claim, _)| **claim == Some(want))
                        .map(|(_, class)| class.names.clone())
                        .collect()
                };
                let mut claims_none = pick(false).concat();
                claims_none.sort();
                let key = LineKey {
                    direction,
                    claims_any: pick(true),
                    claims_none,
                    ports,
                    old,
                    new,
                };
                found.push(Found { key, witness });
            }
        }
        found
    }

    fn side_decision(&self, side: usize, decision: &Decision) -> SideDecision {
        SideDecision {
            reason: decision.reason,
            rules: decision
                .rules
                .iter()
                .map(|r| self.sides[side].rule_ref(*r))
                .collect(),
        }
    }

    /// Gains and losses of a region, from the two decisions on the rules and the two port
    /// filters: a grant opens its resource's filter.
    fn outcomes(&self, allowed: [bool; 2]) -> Vec<(Direction, Vec<PortRange>)> {
        let [old, new] = &self.filters;
        let mut outcomes = match allowed {
            [false, true] => vec![(Direction::Gain, new.clone())],
            [true, false] => vec![(Direction::Loss, old.clone())],
            [true, true] => vec![
                (Direction::Gain, minus(new, old)),
                (Direction::Loss, minus(old, new)),
            ],
            [false, false] => Vec::new(),
        };
        outcomes.retain(|(_, ports)| !ports.is_empty());
        outcomes
    }

    /// The claim classes for a subject in a context, each a sorted list of group names a rule
    /// applying on either side names alike, and the applying rules of each side read through
    /// them.
    fn claim_classes(&self, subject: &Subject, context: &Context) -> (Vec<Class>, [Applying; 2]) {
        let applying: [[Vec<&Rule>; 2]; 2] = self.sides.map(|side| {
            [Effect::Allow, Effect::Deny].map(|effect| {
                // Missing facts fail an allow rule and hold for a deny rule.
                let when_missing = effect == Effect::Deny;
                side.rules(effect)
                    .filter(|r| r.conditions.iter().all(|c| c.holds(context, when_missing)))
                    .collect()
            })
        });
        let user = self.sides.map(|side| {
            subject
                .users
                .first()
                .and_then(|email| side.decisions.user_index(email))
        });
        let standing = |side: usize, name: &str| -> Standing {
            let side_view = &self.sides[side];
            let Some(group) = side_view.decisions.group_index(name) else {
                return Standing::Outside;
            };
            let member = name == EVERYONE
                || user[side]
                    .and_then(|u| side_view.table().users.get(u as usize))
                    .is_some_and(|u| u.groups.contains(&group));
            let listed_in_both = subject.users.is_empty()
                && self.sides.iter().all(|s| {
                    s.decisions
                        .group_index(name)
                        .and_then(|g| s.group(g))
                        .is_some_and(|g| !g.is_open())
                });
            match side_view.group(group) {
                _ if member => Standing::Member,
                Some(g) if g.is_open() => Standing::ByClaim,
                _ if listed_in_both => Standing::Listed,
                _ => Standing::Outside,
            }
        };
        // Each claimable group name, keyed by how it stands and which rules name it.
        let mut incidence: BTreeMap<&str, Vec<(usize, usize, usize)>> = BTreeMap::new();
        for (side, effects) in applying.iter().enumerate() {
            for (effect, rules) in effects.iter().enumerate() {
                for (position, rule) in rules.iter().enumerate() {
                    for group in rule
                        .groups
                        .iter()
                        .filter_map(|g| self.sides[side].group(*g))
                    {
                        incidence
                            .entry(&group.id)
                            .or_default()
                            .push((side, effect, position));
                    }
                }
            }
        }
        let mut by_key: BTreeMap<Incidence, Vec<String>> = BTreeMap::new();
        for (name, places) in incidence {
            let standings = [standing(0, name), standing(1, name)];
            if standings.contains(&Standing::ByClaim) || standings.contains(&Standing::Listed) {
                by_key
                    .entry((standings, places))
                    .or_default()
                    .push(name.to_owned());
            }
        }
        let class_of = |name: &str| {
            by_key
                .values()
                .position(|names| names.iter().any(|n| n == name))
        };
        let mut views: [Applying; 2] = Default::default();
        for (side, effects) in applying.iter().enumerate() {
            for (effect, rules) in effects.iter().enumerate() {
                for rule in rules {
                    let mut names_anyway =
                        user[side].is_some_and(|u| rule.users.binary_search(&u).is_ok());
                    let mut classes = Vec::new();
                    for group in rule
                        .groups
                        .iter()
                        .filter_map(|g| self.sides[side].group(*g))
                    {
                        match standing(side, &group.id) {
                            Standing::Member => names_anyway = true,
                            Standing::ByClaim | Standing::Listed => {
                                classes.extend(class_of(&group.id))
                            }
                            Standing::Outside => {}
                        }
                    }
                    views[side][effect].push(RuleView {
                        names_anyway,
                        classes,
                    });
                }
            }
        }
        let classes = by_key
            .into_iter()
            .map(|((standings, _), names)| Class {
                names,
                listed: standings.contains(&Standing::Listed),
            })
            .collect();
        (classes, views)
    }
}

/// Group names the rules applying in one context name alike, for one subject.
#[derive(Clone, Debug)]
struct Class {
    /// Sorted.
    names: Vec<String>,
    /// Static-only groups: the stand-in is in them by being listed, never by a claim.
    listed: bool,
}

/// Who shows a region: the subject's first user, or for the stand-in a user no tree names
/// (or, in a region inside a static-only group, a user it stands for whom the groups list
/// fittingly); and the groups the request claims. `None`: nobody is in the region.
fn witness_user(
    subject: &Subject,
    region: &Region,
    classes: &[Class],
) -> Option<(String, Vec<String>)> {
    let wanted = |value: bool| {
        region
            .claims
            .iter()
            .zip(classes)
            .filter(move |(claim, _)| **claim == Some(value))
            .map(|(_, class)| class)
    };
    let claims = |listed: &BTreeSet<String>| -> Vec<String> {
        wanted(true)
            .filter(|class| !class.names.iter().any(|n| listed.contains(n)))
            .filter_map(|class| class.names.first().cloned())
            .collect()
    };
    if let Some(first) = subject.users.first() {
        return Some((first.clone(), claims(&BTreeSet::new())));
    }
    if !wanted(true).any(|class| class.listed) {
        return Some((UNNAMED_USER.to_owned(), claims(&BTreeSet::new())));
    }
    subject
        .stands_for
        .iter()
        .find(|(_, listed)| {
            let in_class = |class: &Class| class.names.iter().any(|n| listed.contains(n));
            wanted(true).all(|class| !class.listed || in_class(class))
                && !wanted(false).any(in_class)
        })
        .map(|(email, listed)| (email.clone(), claims(listed)))
}

/// Splits the claims until both sides' decisions are settled, and records each region.
fn split(applying: &[Applying; 2], claims: &mut Vec<Option<bool>>, regions: &mut Vec<Region>) {
    let decided = applying.each_ref().map(|side| settled(side, claims));
    if let [Some(old), Some(new)] = decided {
        regions.push(Region {
            claims: claims.clone(),
            allowed: [old, new],
        });
        return;
    }
    // A class that an unsettled rule of an unsettled side waits on.
    let open = applying
        .iter()
        .zip(decided)
        .filter(|(_, decided)| decided.is_none())
        .flat_map(|(side, _)| side.iter().flatten())
        .filter(|rule| names(rule, claims).is_none())
        .flat_map(|rule| &rule.classes)
        .find(|class| claims.get(**class).copied().flatten().is_none())
        .copied();
    let Some(class) = open else {
        return;
    };
    for value in [true, false] {
        claims[class] = Some(value);
        split(applying, claims, regions);
    }
    claims[class] = None;
}

/// Whether a rule names the subject under partial claims; `None`: it depends on a free class.
fn names(rule: &RuleView, claims: &[Option<bool>]) -> Option<bool> {
    if rule.names_anyway {
        return Some(true);
    }
    let mut unsettled = false;
    for class in &rule.classes {
        match claims.get(*class).copied().flatten() {
            Some(true) => return Some(true),
            Some(false) => {}
            None => unsettled = true,
        }
    }
    if unsettled { None } else { Some(false) }
}

/// A side's decision under partial claims: allowed when an allow rule names the subject and no
/// deny rule does; `None` while it depends on a free class.
fn settled(side: &Applying, claims: &[Option<bool>]) -> Option<bool> {
    let any = |rules: &[RuleView]| {
        let mut result = Some(false);
        for rule in rules {
            match names(rule, claims) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => result = None,
            }
        }
        result
    };
    let [allow, deny] = side;
    match (any(allow), any(deny)) {
        (Some(false), _) | (_, Some(true)) => Some(false),
        (Some(true), Some(false)) => Some(true),
        _ => None,
    }
}

fn delta(key: LineKey, users: Option<Vec<String>>, when: When, witness: Request) -> Delta {
    Delta {
        direction: key.direction,
        users,
        claims_any: key.claims_any,
        claims_none: key.claims_none,
        ports: key.ports,
        when,
        old: key.old,
        new: key.new,
        witness,
    }
}

/// The truth vectors under which a line holds, as few conjunctions as a greedy merge finds:
/// two rows alike but in one condition become one row taking either value there, and a
/// condition that may take every value it takes for the resource drops out. Exact: the rows
/// cover the same vectors.
fn compact(truths: BTreeSet<Vec<Truth>>, domains: &[BTreeSet<Truth>]) -> When {
    let mut rows: Vec<Vec<BTreeSet<Truth>>> = truths
        .into_iter()
        .map(|row| row.into_iter().map(|t| BTreeSet::from([t])).collect())
        .collect();
    'merging: loop {
        for a in 0..rows.len() {
            for b in a + 1..rows.len() {
                let differing: Vec<usize> = (0..domains.len())
                    .filter(|k| rows[a].get(*k) != rows[b].get(*k))
                    .collect();
                if let [position] = differing[..] {
                    let other = rows.swap_remove(b);
                    if let (Some(into), Some(from)) =
                        (rows[a].get_mut(position), other.get(position))
                    {
                        into.extend(from);
                    }
                    continue 'merging;
                }
            }
        }
        break;
    }
    rows.sort();
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .zip(domains)
                .enumerate()
                .filter(|(_, (truths, domain))| !domain.is_subset(truths))
                .map(|(condition, (truths, _))| Literal {
                    condition,
                    truths: truths.into_iter().collect(),
                })
                .collect()
        })
        .collect()
}

/// Every port of every protocol: a resource without a filter.
fn all_ports() -> Vec<PortRange> {
    vec![
        PortRange {
            protocol: Protocol::Tcp,
            first: 1,
            last: u16::MAX,
        },
        PortRange {
            protocol: Protocol::Udp,
            first: 1,
            last: u16::MAX,
        },
        PortRange {
            protocol: Protocol::Icmp,
            first: 0,
            last: 0,
        },
    ]
}

/// Sorted, with overlapping and adjacent ranges of a protocol merged.
fn normalize(mut ports: Vec<PortRange>) -> Vec<PortRange> {
    ports.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ports.len());
    for port in ports {
        match merged.last_mut() {
            Some(last)
                if last.protocol == port.protocol
                    && u32::from(port.first) <= u32::from(last.last) + 1 =>
            {
                last.last = last.last.max(port.last);
            }
            _ => merged.push(port),
        }
    }
    merged
}

/// The ports of `a` outside `b` (both normalized).
fn minus(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut result = Vec::new();
    for range in a {
        let mut pieces = vec![*range];
        for cut in b.iter().filter(|c| c.protocol == range.protocol) {
            pieces = pieces
                .into_iter()
                .flat_map(|piece| {
                    let mut left = Vec::new();
                    if cut.last < piece.first || cut.first > piece.last {
                        left.push(piece);
                    } else {
                        if cut.first > piece.first {
                            left.push(PortRange {
                                last: cut.first - 1,
                                ..piece
                            });
                        }
                        if cut.last < piece.last {
                            left.push(PortRange {
                                first: cut.last + 1,
                                ..piece
                            });
                        }
                    }
                    left
                })
                .collect();
        }
        result.extend(pieces);
    }
    result
}

/// A rule as written, by names: what makes two rules of two trees the same rule.
#[allow(clippy::type_complexity)]
fn rule_text<'a>(
    table: &'a Table,
    rule: &'a Rule,
) -> (
    Effect,
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<&'a str>,
    &'a [Condition],
) {
    fn sorted<'a>(indexes: &[u32], name: impl Fn(u32) -> Option<&'a str>) -> Vec<&'a str> {
        let mut names: Vec<&str> = indexes.iter().filter_map(|i| name(*i)).collect();
        names.sort_unstable();
        names
    }
    (
        rule.effect,
        sorted(&rule.groups, |g| {
            table.groups.get(g as usize).map(|g| g.id.as_str())
        }),
        sorted(&rule.users, |u| {
            table.users.get(u as usize).map(|u| u.email.as_str())
        }),
        sorted(&rule.resources, |r| {
            table.resources.get(r as usize).map(|r| r.id.as_str())
        }),
        &rule.conditions,
    )
}

fn first_port(range: &PortRange) -> PortRange {
    PortRange {
        last: range.first,
        ..*range
    }
}

/// Rules that read the same in both trees (effect, subjects, resources and conditions, by
/// name) under another id or in another file. A rule that only changed lines in its file is
/// not moved.
fn moved_rules(old: &Table, new: &Table) -> Vec<MovedRule> {
    fn file(rule: &Rule) -> &str {
        let origin = rule.origin.as_str();
        origin.rsplit_once(':').map_or(origin, |(file, _)| file)
    }
    // Most rules keep their id and file: those are matched first, by id (unique in a table),
    // and only the rest are compared by their text.
    let new_by_id: FxHashMap<&str, &Rule> = new.rules.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut stayed: FxHashSet<&str> = FxHashSet::default();
    let mut by_text: FxHashMap<_, [Vec<&Rule>; 2]> = FxHashMap::default();
    for rule in &old.rules {
        let text = rule_text(old, rule);
        match new_by_id.get(rule.id.as_str()) {
            Some(twin) if file(twin) == file(rule) && rule_text(new, twin) == text => {
                stayed.insert(&rule.id);
            }
            _ => by_text.entry(text).or_default()[0].push(rule),
        }
    }
    for rule in new.rules.iter().filter(|r| !stayed.contains(r.id.as_str())) {
        by_text.entry(rule_text(new, rule)).or_default()[1].push(rule);
    }
    let reference = |rule: &Rule| RuleRef {
        id: rule.id.clone(),
        origin: rule.origin.clone(),
    };
    let mut moved: Vec<MovedRule> = by_text
        .into_values()
        .flat_map(|[before, after]| {
            before.into_iter().zip(after).map(|(old, new)| MovedRule {
                old: reference(old),
                new: reference(new),
            })
        })
        .collect();
    moved.sort_by(|a, b| a.new.cmp(&b.new));
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(protocol: Protocol, first: u16, last: u16) -> PortRange {
        PortRange {
            protocol,
            first,
            last,
        }
    }

    #[test]
    fn port_sets_subtract_and_merge() {
        let tcp = Protocol::Tcp;
        let a = normalize(vec![
            range(tcp, 80, 90),
            range(tcp, 91, 100),
            range(tcp, 443, 443),
        ]);
        assert_eq!(a, vec![range(tcp, 80, 100), range(tcp, 443, 443)]);
        let b = vec![range(tcp, 85, 87), range(tcp, 443, 443)];
        assert_eq!(minus(&a, &b), vec![range(tcp, 80, 84), range(tcp, 88, 100)]);
        assert_eq!(minus(&b, &a), Vec::new());
        let all = all_ports();
        assert_eq!(minus(&all, &all), Vec::new());
        assert!(minus(&all, &a).contains(&range(Protocol::Icmp, 0, 0)));
    }

    #[test]
    fn compacting_merges_rows_and_drops_a_condition_that_takes_every_value() {
        use Truth::*;
        let domains = vec![
            BTreeSet::from([Holds, Fails]),
            BTreeSet::from([Holds, Fails, Unknown]),
        ];
        // Whatever the second condition when the first holds; when it fails, only where the
        // second does not hold (fails, or its fact is unknown).
        let truths = BTreeSet::from([
            vec![Holds, Holds],
            vec![Holds, Fails],
            vec![Holds, Unknown],
            vec![Fails, Fails],
            vec![Fails, Unknown],
        ]);
        let literal = |condition, truths: &[Truth]| Literal {
            condition,
            truths: truths.to_vec(),
        };
        assert_eq!(
            compact(truths, &domains),
            vec![
                vec![literal(0, &[Holds])],
                vec![literal(0, &[Fails]), literal(1, &[Fails, Unknown])],
            ]
        );
        let every = BTreeSet::from([vec![Holds], vec![Fails]]);
        assert_eq!(compact(every, &domains[..1]), vec![Vec::<Literal>::new()]);
    }
}
