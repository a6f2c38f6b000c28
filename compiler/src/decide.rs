//! Decisions: a [`Table`] loaded for lookups, and the one function that says allow or deny.
//!
//! A decision reads only the rules filed under the requested resource, and tests group
//! membership against a bitset, so its cost does not grow with rules about other resources.
//!
//! INVARIANT: default deny. `decide` returns allow only when an allow rule on the resource
//! covers the user with all its conditions true, no deny rule on the resource covers the user
//! with all its conditions true (missing facts count as true there), and the port, when given,
//! is inside the resource's filter.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;

use crate::address::{Address, AddressIndex, Network};
use crate::condition::{Condition, Context};
use crate::table::*;

/// One connection request, as `fzc query` and the portal pose it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Email; compared case-insensitively.
    pub user: String,
    /// Groups the identity provider says the user is in (static members come from the table).
    /// They count for open groups only (`everyone`, groups with `idp` lines): naming a
    /// static-only group the user is not listed in, or a name the table does not know, adds
    /// nothing ([`DecisionTable::ignored_groups`]).
    pub groups: Vec<String>,
    pub resource: String,
    /// `None`: decide for the resource as a whole, whatever port.
    pub port: Option<PortRange>,
    pub context: Context,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    pub reason: Reason,
    /// The rules that decided it: the deny rules that apply, or the allow rules that apply.
    /// Empty when no rule applies.
    pub rules: Vec<RuleIdx>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Allow rules apply and no deny rule does.
    Allowed,
    /// A deny rule applies.
    DeniedByRule,
    /// No allow rule covers the user and the resource with all its conditions true.
    NoRule,
    /// The port is outside the resource's `ports`.
    PortNotAllowed,
    /// The table has no resource of that id.
    UnknownResource,
}

/// A table ready to answer requests: indexes over names and addresses, and the rules laid out
/// for decisions, built once at load.
#[derive(Debug)]
pub struct DecisionTable {
    table: Table,
    groups: FxHashMap<String, GroupIdx>,
    /// Per group: whether anyone may be in it at connection time ([`Group::is_open`]).
    open: Vec<bool>,
    users: FxHashMap<String, UserEntry>,
    resources: FxHashMap<String, ResourceIdx>,
    addresses: AddressIndex<ResourceIdx>,
    everyone: GroupIdx,
    /// Words of a group bitset.
    words: usize,
    /// Static groups of every user, one run per user.
    user_groups: Vec<GroupIdx>,
    /// Per resource: where its rules are in `stream`, and its port filter.
    layout: Vec<Layout>,
    /// Port filters of every resource, one run per resource.
    ports: Vec<PortRange>,
    /// Per resource, the networks a grant for it keeps closed ([`Self::carve_outs`]): worked
    /// out once at load, since every grant for a wide network or `internet` carries them.
    carve_outs: Vec<Vec<Network>>,
    /// The rules of every resource as a decision reads them, allow rules then deny rules,
    /// each as `[rule, groups, users | CONDITIONAL, group..., user...]`. One resource's rules
    /// are contiguous, so a decision walks a few cache lines instead of each rule's own lists;
    /// the rule itself is read only when it has conditions.
    stream: Vec<u32>,
}

/// Marks a rule with conditions in its stream entry.
const CONDITIONAL: u32 = 1 << 31;

#[derive(Clone, Copy, Debug)]
struct UserEntry {
    index: UserIdx,
    /// The user's run in `user_groups`.
    groups: (u32, u32),
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Allow rules run from `allow` to `deny`, deny rules from `deny` to `end`, in `stream`.
    allow: u32,
    deny: u32,
    end: u32,
    /// The resource's run in `ports`; `None` when it takes all traffic.
    ports: Option<(u32, u32)>,
}

/// One rule of a resource's stream.
#[derive(Clone, Copy, Debug)]
struct StreamEntry<'a> {
    rule: RuleIdx,
    conditional: bool,
    groups: &'a [GroupIdx],
    users: &'a [UserIdx],
}

/// Group bitsets of up to this many words (1024 groups) live on the stack: a decision then
/// allocates nothing to know who the user is.
const INLINE_WORDS: usize = 16;

/// The groups a user is in, as a bitset over group indexes, and who the user is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    bits: Bits,
    user: Option<UserIdx>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Bits {
    Inline([u64; INLINE_WORDS]),
    Heap(Vec<u64>),
}

impl Membership {
    fn empty(words: usize) -> Self {
        let bits = if words <= INLINE_WORDS {
            Bits::Inline([0; INLINE_WORDS])
        } else {
            Bits::Heap(vec![0; words])
        };
        Membership { bits, user: None }
    }

    fn words(&self) -> &[u64] {
        match &self.bits {
            Bits::Inline(words) => words,
            Bits::Heap(words) => words,
        }
    }

    pub fn contains(&self, group: GroupIdx) -> bool {
        self.words()
            .get(group as usize / 64)
            .is_some_and(|w| w & (1 << (group % 64)) != 0)
    }

    fn insert(&mut self, group: GroupIdx) {
        let words = match &mut self.bits {
            Bits::Inline(words) => &mut words[..],
            Bits::Heap(words) => &mut words[..],
        };
        if let Some(word) = words.get_mut(group as usize / 64) {
            *word |= 1 << (group % 64);
        }
    }
}

impl DecisionTable {
    pub fn new(table: Table) -> Self {
        let index = |ids: &mut dyn Iterator<Item = &String>| -> FxHashMap<String, u32> {
            ids.zip(0..).map(|(id, i)| (id.clone(), i)).collect()
        };
        let groups = index(&mut table.groups.iter().map(|g| &g.id));
        let everyone = groups.get(EVERYONE).copied().unwrap_or(GroupIdx::MAX);
        let mut user_groups = Vec::new();
        let mut users = FxHashMap::default();
        for (index, user) in (0..).zip(&table.users) {
            let start = user_groups.len() as u32;
            user_groups.extend(&user.groups);
            users.insert(
                user.email.clone(),
                UserEntry {
                    index,
                    groups: (start, user_groups.len() as u32),
                },
            );
        }
        let mut layout = Vec::with_capacity(table.resources.len());
        let mut ports = Vec::new();
        let mut stream = Vec::new();
        for resource in &table.resources {
            let allow = stream.len() as u32;
            lay_out(&table, &resource.allow, &mut stream);
            let deny = stream.len() as u32;
            lay_out(&table, &resource.deny, &mut stream);
            let filter = resource.ports.as_ref().map(|filter| {
                let start = ports.len() as u32;
                ports.extend(filter);
                (start, ports.len() as u32)
            });
            layout.push(Layout {
                allow,
                deny,
                end: stream.len() as u32,
                ports: filter,
            });
        }
        DecisionTable {
            carve_outs: carve_outs(&table),
            users,
            resources: index(&mut table.resources.iter().map(|r| &r.id)),
            addresses: AddressIndex::new(
                table
                    .resources
                    .iter()
                    .zip(0..)
                    .map(|(r, i)| (&r.address, i)),
            ),
            words: table.groups.len().div_ceil(64),
            open: table.groups.iter().map(Group::is_open).collect(),
            groups,
            everyone,
            user_groups,
            layout,
            ports,
            stream,
            table,
        }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn resource_index(&self, id: &str) -> Option<ResourceIdx> {
        self.resources.get(id).copied()
    }

    pub fn group_index(&self, id: &str) -> Option<GroupIdx> {
        self.groups.get(id).copied()
    }

    /// The user of that email (lowercase) in the table's list of named users.
    pub fn user_index(&self, email: &str) -> Option<UserIdx> {
        self.users.get(email).map(|user| user.index)
    }

    /// The resource that serves a DNS name, most specific first.
    pub fn resource_for_name(&self, name: &str) -> Option<&Resource> {
        self.addresses
            .lookup_name(name)
            .and_then(|i| self.table.resources.get(i as usize))
    }

    /// The networks a grant for `resource` keeps closed, sorted: a grant opens what its
    /// resource serves, so for an IP or CIDR resource the networks of the resources inside
    /// it, and for `internet` every network resource with public addresses. Empty for a DNS
    /// resource, whose grant names the one name it opens (see [`Self::resource_for_name`]).
    pub fn carve_outs(&self, resource: ResourceIdx) -> &[Network] {
        self.carve_outs
            .get(resource as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// The resource that serves an IP: longest prefix, else `internet` for a public address.
    pub fn resource_for_ip(&self, ip: IpAddr) -> Option<&Resource> {
        self.addresses
            .lookup_ip(ip)
            .and_then(|i| self.table.resources.get(i as usize))
    }

    /// Who the user is to the table: static groups, the open groups among those given (what
    /// the identity provider says), and `everyone`.
    pub fn membership<'a>(
        &self,
        email: &str,
        groups: impl IntoIterator<Item = &'a str>,
    ) -> Membership {
        let mut membership = Membership::empty(self.words);
        membership.insert(self.everyone);
        let lowercase;
        let email = if email.bytes().any(|b| b.is_ascii_uppercase()) {
            lowercase = email.to_ascii_lowercase();
            lowercase.as_str()
        } else {
            email
        };
        if let Some(user) = self.users.get(email) {
            membership.user = Some(user.index);
            let (start, end) = user.groups;
            for &g in self
                .user_groups
                .get(start as usize..end as usize)
                .unwrap_or(&[])
            {
                membership.insert(g);
            }
        }
        // INVARIANT: a claim never puts anyone in a static-only group; only the tree does.
        for group in groups {
            if let Some(&g) = self.groups.get(group)
                && self.is_open(g)
            {
                membership.insert(g);
            }
        }
        membership
    }

    fn is_open(&self, group: GroupIdx) -> bool {
        self.open.get(group as usize).copied().unwrap_or(false)
    }

    /// The groups a request claims that count for nothing: names the table does not know, and
    /// static-only groups that do not list the user (membership of those is the tree's to
    /// say, never the identity provider's).
    pub fn ignored_groups<'a>(&self, request: &'a Request) -> Vec<&'a str> {
        let membership = self.membership(&request.user, std::iter::empty());
        request
            .groups
            .iter()
            .map(String::as_str)
            .filter(|name| match self.groups.get(*name) {
                None => true,
                Some(&g) => !self.is_open(g) && !membership.contains(g),
            })
            .collect()
    }

    pub fn decide(&self, request: &Request) -> Decision {
        let membership = self.membership(&request.user, request.groups.iter().map(String::as_str));
        match self.resources.get(&request.resource) {
            Some(&resource) => self.decide_for(
                &membership,
                resource,
                request.port.as_ref(),
                &request.context,
            ),
            None => Decision {
                effect: Effect::Deny,
                reason: Reason::UnknownResource,
                rules: Vec::new(),
            },
        }
    }

    /// The decision for a resolved user and resource.
    pub fn decide_for(
        &self,
        membership: &Membership,
        resource: ResourceIdx,
        port: Option<&PortRange>,
        context: &Context,
    ) -> Decision {
        let deny = |reason, rules| Decision {
            effect: Effect::Deny,
            reason,
            rules,
        };
        let Some(layout) = self.layout.get(resource as usize) else {
            return deny(Reason::UnknownResource, Vec::new());
        };
        if let (Some(port), Some((start, end))) = (port, layout.ports) {
            let filter = self.ports.get(start as usize..end as usize).unwrap_or(&[]);
            if !filter.iter().any(|p| p.covers(port)) {
                return deny(Reason::PortNotAllowed, Vec::new());
            }
        }
        let denying = self.applying(layout.deny..layout.end, membership, context, true);
        if !denying.is_empty() {
            return deny(Reason::DeniedByRule, denying);
        }
        let allowing = self.applying(layout.allow..layout.deny, membership, context, false);
        if allowing.is_empty() {
            return deny(Reason::NoRule, Vec::new());
        }
        Decision {
            effect: Effect::Allow,
            reason: Reason::Allowed,
            rules: allowing,
        }
    }

    /// The rules in a stretch of the stream that name the user and whose conditions all hold.
    fn applying(
        &self,
        stretch: std::ops::Range<u32>,
        membership: &Membership,
        context: &Context,
        when_missing: bool,
    ) -> Vec<RuleIdx> {
        self.entries(stretch)
            .filter(|entry| {
                names(entry, membership)
                    && (!entry.conditional
                        || self
                            .table
                            .rules
                            .get(entry.rule as usize)
                            .is_some_and(|rule| {
                                rule.conditions
                                    .iter()
                                    .all(|c| c.holds(context, when_missing))
                            }))
            })
            .map(|entry| entry.rule)
            .collect()
    }

    /// The stream entries in a stretch of the stream.
    fn entries(&self, stretch: std::ops::Range<u32>) -> impl Iterator<Item = StreamEntry<'_>> {
        let mut rest = self
            .stream
            .get(stretch.start as usize..stretch.end as usize)
            .unwrap_or(&[]);
        std::iter::from_fn(move || {
            let [rule, groups, users_and_flag, tail @ ..] = rest else {
                return None;
            };
            let groups = *groups as usize;
            let users = (users_and_flag & !CONDITIONAL) as usize;
            let (subjects, next) = tail.split_at_checked(groups + users)?;
            rest = next;
            let (groups, users) = subjects.split_at(groups);
            Some(StreamEntry {
                rule: *rule,
                conditional: users_and_flag & CONDITIONAL != 0,
                groups,
                users,
            })
        })
    }

    /// The allow rules on a resource that cover the user, with the conditions that failed for
    /// each: what a deny for "no rule" explains itself with.
    pub fn near_misses(
        &self,
        membership: &Membership,
        resource: ResourceIdx,
        context: &Context,
    ) -> Vec<(RuleIdx, Vec<usize>)> {
        let Some(layout) = self.layout.get(resource as usize) else {
            return Vec::new();
        };
        self.entries(layout.allow..layout.deny)
            .filter(|entry| names(entry, membership))
            .filter_map(|entry| {
                let rule = self.table.rules.get(entry.rule as usize)?;
                let failed: Vec<usize> = rule
                    .conditions
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.holds(context, false))
                    .map(|(i, _)| i)
                    .collect();
                Some((entry.rule, failed))
            })
            .collect()
    }

    /// Until when an allow made at `at` lasts as far as time goes: the portal gives the grant
    /// this expiry, so that access ends when the policy's time windows close and not only when
    /// the grant's own lifetime does. `at` is the instant the decision was made for.
    ///
    /// The allow lasts while any allowing rule holds, and a rule holds until the first of its
    /// `time` conditions closes ([`TimeCondition::window_end`]): so the latest over the
    /// allowing rules of the earliest over each rule's windows. `None`: unbounded, because an
    /// allowing rule has no `time` condition or only windows that never close. A deny gives
    /// `Some(at)`, nothing to grant; so does a rule whose windows do not hold at `at` (a
    /// decision made for another instant), which then extends nothing.
    ///
    /// Only the allowing rules' time conditions are read. A deny rule whose window opens later
    /// (`deny ... when time sat,sun ...`) does not shorten the allow, nor do other facts that
    /// may change (address, country): the portal re-decides live grants for those.
    ///
    /// [`TimeCondition::window_end`]: crate::condition::TimeCondition::window_end
    pub fn allowed_until(&self, decision: &Decision, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if decision.effect != Effect::Allow {
            return Some(at);
        }
        // Starting at `at`, an allow that names no rule it can find grants nothing.
        let mut latest = at;
        for rule in decision
            .rules
            .iter()
            .filter_map(|r| self.table.rules.get(*r as usize))
        {
            let closes = rule
                .conditions
                .iter()
                .filter_map(|c| match c {
                    Condition::Time(time) => time.window_end(at),
                    _ => None,
                })
                .min();
            // No window of this rule closes: neither does the allow.
            latest = latest.max(closes?);
        }
        Some(latest)
    }
}

impl Reason {
    /// The reason in words.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed by the rules below",
            Reason::DeniedByRule => "denied by the rules below",
            Reason::NoRule => "no allow rule applies",
            Reason::PortNotAllowed => "the port is outside the resource's `ports`",
            Reason::UnknownResource => "no such resource",
        }
    }
}

impl DecisionTable {
    /// Lines that say why: the rules that decided, and for a deny because no rule applied,
    /// the allow rules that name the user with the conditions that did not hold.
    pub fn explain(&self, request: &Request, decision: &Decision) -> Vec<String> {
        let mut lines = self.rule_notes(&decision.rules);
        for group in self.ignored_groups(request) {
            lines.push(match self.groups.get(group) {
                Some(_) => format!(
                    "group `{group}` was ignored: it has no `idp` line, so only its `members` are in it, and the user is not one of them"
                ),
                None => format!("group `{group}` was ignored: the tree declares no such group"),
            });
        }
        if decision.reason != Reason::NoRule {
            return lines;
        }
        let membership = self.membership(&request.user, request.groups.iter().map(String::as_str));
        let Some(resource) = self.resource_index(&request.resource) else {
            return lines;
        };
        for (rule, failed) in self.near_misses(&membership, resource, &request.context) {
            let Some(rule) = self.table.rules.get(rule as usize) else {
                continue;
            };
            let conditions: Vec<String> = failed
                .iter()
                .filter_map(|i| rule.conditions.get(*i))
                .map(|c| format!("`{c}`"))
                .collect();
            lines.push(format!(
                "allow rule `{}` ({}) names the user, but {} did not hold",
                rule.id,
                rule.origin,
                conditions.join(" and ")
            ));
        }
        lines
    }

    /// "effect rule `id` (file:line)" for each rule.
    pub fn rule_notes(&self, rules: &[RuleIdx]) -> Vec<String> {
        rules
            .iter()
            .filter_map(|r| self.table.rules.get(*r as usize))
            .map(|rule| format!("{} rule `{}` ({})", rule.effect, rule.id, rule.origin))
            .collect()
    }
}

/// Per resource, the networks of the resources inside it (for `internet`, of every network
/// resource with public addresses), sorted.
fn carve_outs(table: &Table) -> Vec<Vec<Network>> {
    let addresses: Vec<&Address> = table.resources.iter().map(|r| &r.address).collect();
    let mut carve_outs = vec![Vec::new(); addresses.len()];
    for (winner, loser) in crate::address::overlapping_pairs(&addresses) {
        let (Some(inner), Some(outer)) = (addresses.get(winner), addresses.get(loser)) else {
            continue;
        };
        if let Address::Network(network) = inner
            && inner.lies_inside(outer)
            && let Some(list) = carve_outs.get_mut(loser)
        {
            list.push(*network);
        }
    }
    let public: Vec<Network> = addresses
        .iter()
        .filter_map(|a| match a {
            Address::Network(n) if !n.is_wholly_non_public() => Some(*n),
            _ => None,
        })
        .collect();
    for (address, list) in addresses.iter().zip(&mut carve_outs) {
        if matches!(address, Address::Internet) {
            list.clone_from(&public);
        }
        list.sort();
        list.dedup();
    }
    carve_outs
}

/// Appends the stream entries of `rules`.
fn lay_out(table: &Table, rules: &[RuleIdx], stream: &mut Vec<u32>) {
    for &r in rules {
        let Some(rule) = table.rules.get(r as usize) else {
            continue;
        };
        let flag = if rule.conditions.is_empty() {
            0
        } else {
            CONDITIONAL
        };
        stream.extend([r, rule.groups.len() as u32, rule.users.len() as u32 | flag]);
        stream.extend(&rule.groups);
        stream.extend(&rule.users);
    }
}

/// Whether an entry's rule names the user or one of the user's groups.
fn names(entry: &StreamEntry<'_>, membership: &Membership) -> bool {
    entry.groups.iter().any(|&g| membership.contains(g))
        || membership.user.is_some_and(|u| entry.users.contains(&u))
}

#[cfg(test)]
mod tests {
    use fz_lang::{SourceFile, Sources};

    use super::*;

    /// `allowed_until` for `a@x.com`, in group `eng`, reaching `db` at `at` (RFC 3339), under
    /// `rules`, and the decision's effect.
    fn allowed_until(rules: &str, at: &str) -> (Effect, Option<DateTime<Utc>>) {
        let text = format!(
            "site s\nresource db {{ address \"db.x.com\"; site s }}\n\
             group eng {{ members \"a@x.com\" }}\n{rules}"
        );
        let checked = crate::check(Sources::new(vec![SourceFile::new("t.fz", text)]));
        assert!(!checked.has_errors(), "{:#?}", checked.diagnostics);
        let table = DecisionTable::new(checked.table.expect("a table"));
        let at = instant(at);
        let request = Request {
            user: "a@x.com".into(),
            resource: "db".into(),
            context: Context {
                at: Some(at),
                ..Context::default()
            },
            ..Request::default()
        };
        let decision = table.decide(&request);
        (decision.effect, table.allowed_until(&decision, at))
    }

    fn instant(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    // 2026-11-26 is a Thursday; Berlin is at +01:00 in November.
    const THURSDAY: &str = "2026-11-26T10:00:00+01:00";
    const OFFICE: &str = "allow eng -> db when time mon-fri 08:00-18:00 Europe/Berlin as office\n";

    #[test]
    fn allowed_until_is_the_latest_close_among_the_allowing_rules() {
        let late = "allow eng -> db when time mon-fri 07:00-20:00 UTC as late\n";
        let until = allowed_until(&format!("{OFFICE}{late}"), THURSDAY);
        assert_eq!(
            until,
            (Effect::Allow, Some(instant("2026-11-26T20:00:00Z")))
        );
        // A rule that does not apply does not extend the allow.
        let late_in_de = "allow eng -> db when time mon-fri 07:00-20:00 UTC and country in DE\n";
        let until = allowed_until(&format!("{OFFICE}{late_in_de}"), THURSDAY);
        assert_eq!(
            until,
            (Effect::Allow, Some(instant("2026-11-26T18:00:00+01:00")))
        );
        // Within a rule, the first of its windows to close ends it.
        let two_windows =
            "allow eng -> db when time any 00:00-24:00 UTC and time thu 06:00-12:00 UTC\n";
        let until = allowed_until(two_windows, THURSDAY);
        assert_eq!(
            until,
            (Effect::Allow, Some(instant("2026-11-26T12:00:00Z")))
        );
    }

    #[test]
    fn allowed_until_is_unbounded_when_an_allowing_rule_never_closes() {
        let always = "allow eng -> db as always\n";
        let until = allowed_until(&format!("{OFFICE}{always}"), THURSDAY);
        assert_eq!(until, (Effect::Allow, None));
        let every_day = "allow eng -> db when time any 00:00-24:00 Europe/Berlin as every-day\n";
        let until = allowed_until(&format!("{OFFICE}{every_day}"), THURSDAY);
        assert_eq!(until, (Effect::Allow, None));
        // A deny whose window opens later is the portal's to enforce when it re-decides.
        let weekend = "deny eng -> db when time sat,sun 00:00-24:00 Europe/Berlin\n";
        let until = allowed_until(&format!("{always}{weekend}"), THURSDAY);
        assert_eq!(until, (Effect::Allow, None));
    }

    #[test]
    fn allowed_until_of_a_deny_is_now() {
        let saturday = "2026-11-28T10:00:00+01:00";
        let until = allowed_until(OFFICE, saturday);
        assert_eq!(until, (Effect::Deny, Some(instant(saturday))));
        let weekend = "deny eng -> db when time sat,sun 00:00-24:00 Europe/Berlin\n";
        let until = allowed_until(&format!("allow eng -> db\n{weekend}"), saturday);
        assert_eq!(until, (Effect::Deny, Some(instant(saturday))));
    }
}
