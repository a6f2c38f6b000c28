//! The decision table: what a policy tree means once resolved, with every name turned into an
//! index and rules filed under the resources they reach. This is the body of the bundle; it
//! derives serde, and its layout is part of the bundle format (see `bundle::FORMAT_VERSION`).
//!
//! INVARIANT: every list is sorted by id (sites, groups, resources, rules) or by email
//! (users), and every index points into its list, so that the same tree always yields the same
//! bytes whatever the order of its files and statements.

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::condition::Condition;
pub use fz_lang::ast::{Effect, Protocol};

pub type SiteIdx = u32;
pub type GroupIdx = u32;
pub type ResourceIdx = u32;
pub type RuleIdx = u32;
pub type UserIdx = u32;

/// The built-in group of every user of the account.
pub const EVERYONE: &str = "everyone";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub sites: Vec<Site>,
    pub groups: Vec<Group>,
    pub resources: Vec<Resource>,
    pub rules: Vec<Rule>,
    /// Every user the tree names (static members, `user "..."` subjects), with their static
    /// groups.
    pub users: Vec<User>,
}

impl Table {
    /// Checks what a table read from a file must hold for decisions to be right: every
    /// reference in range, and the sorted lists that lookups binary-search sorted.
    pub fn validate(&self) -> Result<(), String> {
        let within = |what: &str, index: u32, len: usize| {
            if (index as usize) < len {
                Ok(())
            } else {
                Err(format!("{what} index {index} is out of range"))
            }
        };
        let sorted = |what: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("{what} are not sorted"))
            }
        };
        sorted("sites", self.sites.is_sorted_by(|a, b| a.id < b.id))?;
        sorted("groups", self.groups.is_sorted_by(|a, b| a.id < b.id))?;
        sorted("resources", self.resources.is_sorted_by(|a, b| a.id < b.id))?;
        sorted("rules", self.rules.is_sorted_by(|a, b| a.id < b.id))?;
        sorted("users", self.users.is_sorted_by(|a, b| a.email < b.email))?;
        for site in &self.sites {
            site.resources
                .iter()
                .try_for_each(|r| within("resource", *r, self.resources.len()))?;
        }
        for user in &self.users {
            user.groups
                .iter()
                .try_for_each(|g| within("group", *g, self.groups.len()))?;
        }
        for resource in &self.resources {
            within("site", resource.site, self.sites.len())?;
            resource
                .allow
                .iter()
                .chain(&resource.deny)
                .try_for_each(|r| within("rule", *r, self.rules.len()))?;
        }
        for rule in &self.rules {
            rule.groups
                .iter()
                .try_for_each(|g| within("group", *g, self.groups.len()))?;
            rule.users
                .iter()
                .try_for_each(|u| within("user", *u, self.users.len()))?;
            rule.resources
                .iter()
                .try_for_each(|r| within("resource", *r, self.resources.len()))?;
            sorted(
                &format!("users of rule `{}`", rule.id),
                rule.users.is_sorted(),
            )?;
            sorted(
                &format!("resources of rule `{}`", rule.id),
                rule.resources.is_sorted(),
            )?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub resources: Vec<ResourceIdx>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Static members, lowercase emails, sorted.
    pub members: Vec<String>,
    /// Identity-provider groups whose members this group takes in.
    pub idp: Vec<IdpBinding>,
}

impl Group {
    /// Whether anyone may be a member at connection time without being listed here: the
    /// built-in `everyone`, and groups synced from an identity provider.
    pub fn is_open(&self) -> bool {
        self.id == EVERYONE || !self.idp.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdpBinding {
    pub provider: String,
    pub group: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub email: String,
    pub groups: Vec<GroupIdx>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub site: SiteIdx,
    pub address: Address,
    /// `None`: all traffic to the address.
    pub ports: Option<Vec<PortRange>>,
    /// Allow and deny rules that reach this resource: a decision reads only these.
    pub allow: Vec<RuleIdx>,
    pub deny: Vec<RuleIdx>,
}

/// `tcp/443`, `udp/8000-8100`, `icmp` (numbers 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn covers(&self, other: &PortRange) -> bool {
        self.protocol == other.protocol && self.first <= other.first && other.last <= self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.protocol {
            Protocol::Icmp => f.write_str("icmp"),
            p if self.first == self.last => write!(f, "{}/{}", p.as_str(), self.first),
            p => write!(f, "{}/{}-{}", p.as_str(), self.first, self.last),
        }
    }
}

/// Why a port text is not a port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("`{0}` is not a port such as `tcp/443`, `udp/8000-8100` or `icmp`")]
    Syntax(String),
    #[error("port 0 is not a port")]
    Zero,
    #[error("port {0} is above 65535")]
    TooLarge(u32),
    #[error("port range {0}-{1} is reversed")]
    Reversed(u32, u32),
}

impl PortRange {
    /// Validates numbers as written (the parser keeps them unchecked).
    pub fn new(protocol: Protocol, first: u32, last: u32) -> Result<Self, PortError> {
        if protocol == Protocol::Icmp {
            return Ok(PortRange {
                protocol,
                first: 0,
                last: 0,
            });
        }
        for n in [first, last] {
            if n == 0 {
                return Err(PortError::Zero);
            }
            if n > 65535 {
                return Err(PortError::TooLarge(n));
            }
        }
        if first > last {
            return Err(PortError::Reversed(first, last));
        }
        Ok(PortRange {
            protocol,
            first: first as u16,
            last: last as u16,
        })
    }
}

impl std::str::FromStr for PortRange {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || PortError::Syntax(text.to_owned());
        if text == "icmp" {
            return Ok(PortRange {
                protocol: Protocol::Icmp,
                first: 0,
                last: 0,
            });
        }
        let (protocol, range) = text.split_once('/').ok_or_else(syntax)?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(syntax()),
        };
        let number = |s: &str| -> Result<u32, PortError> {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
                return Err(syntax());
            }
            Ok(s.parse::<u32>().unwrap_or(u32::MAX))
        };
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(range)?, number(range)?),
        };
        PortRange::new(protocol, first, last)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// `as NAME`, or derived from the file and the rule's text.
    pub id: String,
    #[serde(with = "EffectName")]
    pub effect: Effect,
    pub groups: Vec<GroupIdx>,
    pub users: Vec<UserIdx>,
    /// The resources the rule names (a site's resources, for `site ID`). A deny rule (or a
    /// Cedar policy with `resource in`) also covers every resource inside those:
    /// `Resource::allow` and `Resource::deny` list every rule that covers the resource.
    pub resources: Vec<ResourceIdx>,
    pub conditions: Vec<Condition>,
    /// Where the rule was written: `path:line`.
    pub origin: String,
}

impl Rule {
    pub fn is_unconditional(&self) -> bool {
        self.conditions.is_empty()
    }
}

/// How the bundle writes an effect: `allow` or `deny` (the syntax tree's type stays free of
/// serde).
#[derive(Serialize, Deserialize)]
#[serde(remote = "Effect", rename_all = "lowercase")]
enum EffectName {
    Allow,
    Deny,
}
