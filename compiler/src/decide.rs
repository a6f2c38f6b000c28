//! Decisions: a [`Table`] loaded for lookups, and the one function that says allow or deny.
//!
//! A decision reads only the rules filed under the requested resource, and tests group
//! membership against a bitset, so its cost does not grow with rules about other resources.
//!
//! INVARIANT: default deny. `decide` returns allow only when an allow rule on the resource
//! covers the user with all its conditions true, no deny rule on the resource covers the user
//! with all its conditions true (missing facts count as true there), and the port, when given,
//! is inside the resource's filter.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::address::AddressIndex;
use crate::condition::Context;
use crate::table::*;

/// One connection request, as `fzc query` and the portal pose it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Email; compared case-insensitively.
    pub user: String,
    /// Groups the identity provider says the user is in (static members come from the table).
    /// Names the table does not know are ignored.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// A table ready to answer requests: indexes over names and addresses built once at load.
#[derive(Debug)]
pub struct DecisionTable {
    table: Table,
    groups: HashMap<String, GroupIdx>,
    users: HashMap<String, UserIdx>,
    resources: HashMap<String, ResourceIdx>,
    addresses: AddressIndex<ResourceIdx>,
    everyone: GroupIdx,
    /// Words of a group bitset.
    words: usize,
}

/// The groups a user is in, as a bitset over group indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    bits: Vec<u64>,
    user: Option<UserIdx>,
}

impl Membership {
    pub fn contains(&self, group: GroupIdx) -> bool {
        self.bits
            .get(group as usize / 64)
            .is_some_and(|w| w & (1 << (group % 64)) != 0)
    }

    fn insert(&mut self, group: GroupIdx) {
        if let Some(word) = self.bits.get_mut(group as usize / 64) {
            *word |= 1 << (group % 64);
        }
    }
}

impl DecisionTable {
    pub fn new(table: Table) -> Self {
        let groups: HashMap<String, GroupIdx> = table
            .groups
            .iter()
            .zip(0..)
            .map(|(g, i)| (g.id.clone(), i))
            .collect();
        let everyone = groups.get(EVERYONE).copied().unwrap_or(GroupIdx::MAX);
        DecisionTable {
            users: table
                .users
                .iter()
                .zip(0..)
                .map(|(u, i)| (u.email.clone(), i))
                .collect(),
            resources: table
                .resources
                .iter()
                .zip(0..)
                .map(|(r, i)| (r.id.clone(), i))
                .collect(),
            addresses: AddressIndex::new(
                table
                    .resources
                    .iter()
                    .zip(0..)
                    .map(|(r, i)| (&r.address, i)),
            ),
            words: table.groups.len().div_ceil(64),
            groups,
            everyone,
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

    /// The resource that serves a DNS name, most specific first.
    pub fn resource_for_name(&self, name: &str) -> Option<&Resource> {
        self.addresses
            .lookup_name(name)
            .and_then(|i| self.table.resources.get(i as usize))
    }

    /// The resource that serves an IP: longest prefix, else `internet`.
    pub fn resource_for_ip(&self, ip: IpAddr) -> Option<&Resource> {
        self.addresses
            .lookup_ip(ip)
            .and_then(|i| self.table.resources.get(i as usize))
    }

    /// Who the user is to the table: static groups, the groups given, and `everyone`.
    pub fn membership<'a>(
        &self,
        email: &str,
        groups: impl IntoIterator<Item = &'a str>,
    ) -> Membership {
        let mut membership = Membership {
            bits: vec![0; self.words],
            user: None,
        };
        membership.insert(self.everyone);
        let lowercase;
        let email = if email.bytes().any(|b| b.is_ascii_uppercase()) {
            lowercase = email.to_ascii_lowercase();
            lowercase.as_str()
        } else {
            email
        };
        if let Some(&user) = self.users.get(email) {
            membership.user = Some(user);
            for &g in self
                .table
                .users
                .get(user as usize)
                .map_or(&[][..], |u| u.groups.as_slice())
            {
                membership.insert(g);
            }
        }
        for group in groups {
            if let Some(&g) = self.groups.get(group) {
                membership.insert(g);
            }
        }
        membership
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
        let Some(entry) = self.table.resources.get(resource as usize) else {
            return deny(Reason::UnknownResource, Vec::new());
        };
        if port.is_some_and(|p| !entry.admits(p)) {
            return deny(Reason::PortNotAllowed, Vec::new());
        }
        let denying = self.applying(&entry.deny, membership, context, true);
        if !denying.is_empty() {
            return deny(Reason::DeniedByRule, denying);
        }
        let allowing = self.applying(&entry.allow, membership, context, false);
        if allowing.is_empty() {
            return deny(Reason::NoRule, Vec::new());
        }
        Decision {
            effect: Effect::Allow,
            reason: Reason::Allowed,
            rules: allowing,
        }
    }

    /// The rules among `rules` that cover the user and whose conditions all hold.
    fn applying(
        &self,
        rules: &[RuleIdx],
        membership: &Membership,
        context: &Context,
        when_missing: bool,
    ) -> Vec<RuleIdx> {
        rules
            .iter()
            .copied()
            .filter(|&r| {
                self.table.rules.get(r as usize).is_some_and(|rule| {
                    covers(rule, membership)
                        && rule
                            .conditions
                            .iter()
                            .all(|c| c.holds(context, when_missing))
                })
            })
            .collect()
    }

    /// The allow rules on a resource that cover the user, with the conditions that failed for
    /// each: what a deny for "no rule" explains itself with.
    pub fn near_misses(
        &self,
        membership: &Membership,
        resource: ResourceIdx,
        context: &Context,
    ) -> Vec<(RuleIdx, Vec<usize>)> {
        let Some(entry) = self.table.resources.get(resource as usize) else {
            return Vec::new();
        };
        entry
            .allow
            .iter()
            .filter_map(|&r| {
                let rule = self.table.rules.get(r as usize)?;
                if !covers(rule, membership) {
                    return None;
                }
                let failed: Vec<usize> = (0..rule.conditions.len())
                    .filter(|&i| {
                        rule.conditions
                            .get(i)
                            .is_some_and(|c| !c.holds(context, false))
                    })
                    .collect();
                Some((r, failed))
            })
            .collect()
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

/// Whether a rule names the user or one of the user's groups.
fn covers(rule: &Rule, membership: &Membership) -> bool {
    rule.groups.iter().any(|&g| membership.contains(g))
        || membership
            .user
            .is_some_and(|u| rule.users.binary_search(&u).is_ok())
}
