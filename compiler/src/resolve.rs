//! From syntax trees to a [`Table`]: names resolved to indexes, every value validated, rules
//! given ids and filed under the resources they reach. Every problem becomes a diagnostic and
//! resolution goes on, so one run reports all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use fz_lang::ast::{self, Statement};
use fz_lang::{Code, Diagnostic, Loc, Node, Sources, did_you_mean};
use sha2::{Digest, Sha256};

use crate::address::{Address, AddressError, Network, NetworkError};
use crate::condition::{ClockWindow, Condition, Context, DAYS, Day, TimeCondition, parse_clock};
use crate::country::{is_country_code, suggest_country_code};
use crate::decide::Request;
use crate::table::*;

/// A resolved tree: the table, plus what `check` needs beyond it (tests, invariants, where
/// each declaration was written).
#[derive(Debug, Default)]
pub struct Resolved {
    pub table: Table,
    pub tests: Vec<PolicyTest>,
    pub invariants: Vec<Invariant>,
    pub locations: Locations,
    /// Groups named by a test or an invariant (rules are read from the table).
    pub groups_named_outside_rules: BTreeSet<GroupIdx>,
}

/// Where each declaration of the table was written, by index.
#[derive(Debug, Default)]
pub struct Locations {
    pub sites: Vec<Loc>,
    /// `None` for the built-in `everyone`.
    pub groups: Vec<Option<Loc>>,
    /// Resource names, then the addresses of the same resources.
    pub resources: Vec<Loc>,
    pub addresses: Vec<Loc>,
    pub rules: Vec<Loc>,
}

#[derive(Debug)]
pub struct PolicyTest {
    pub loc: Loc,
    pub name: String,
    pub expectations: Vec<Expectation>,
}

#[derive(Debug)]
pub struct Expectation {
    pub loc: Loc,
    pub effect: Effect,
    pub request: Request,
}

#[derive(Debug)]
pub struct Invariant {
    pub loc: Loc,
    pub quantifier: ast::Quantifier,
    pub groups: Vec<GroupIdx>,
    pub users: Vec<String>,
    pub resources: Vec<ResourceIdx>,
    /// The assertion as written, for messages.
    pub text: String,
}

/// Resolves every parsed file. Diagnostics are appended to `diagnostics`.
pub fn resolve(
    sources: &Sources,
    files: &[&ast::PolicyFile],
    diagnostics: &mut Vec<Diagnostic>,
) -> Resolved {
    let mut resolver = Resolver {
        sources,
        diagnostics,
        names: HashMap::new(),
    };
    resolver.run(files)
}

struct Resolver<'a> {
    sources: &'a Sources,
    diagnostics: &'a mut Vec<Diagnostic>,
    /// Every declared name: kind and where.
    names: HashMap<String, (Kind, Loc)>,
}

/// What a declared name names. Sites, resources and groups share one namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Site,
    Resource,
    Group,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Site => "site",
            Kind::Resource => "resource",
            Kind::Group => "group",
        }
    }
}

/// Name to index, for each kind of declaration.
struct Indexes {
    sites: HashMap<String, SiteIdx>,
    groups: HashMap<String, GroupIdx>,
    resources: HashMap<String, ResourceIdx>,
}

impl Resolver<'_> {
    fn run(&mut self, files: &[&ast::PolicyFile]) -> Resolved {
        let statements: Vec<&Statement> = files.iter().flat_map(|f| &f.statements).collect();
        let mut sites = BTreeMap::new();
        let mut groups = BTreeMap::new();
        let mut resources = BTreeMap::new();
        // One pass in source order, so "declared twice" points at the later declaration.
        for statement in &statements {
            match statement {
                Statement::Site(d) if self.declare(&d.node.name, Kind::Site) => {
                    sites.insert(d.node.name.node.clone(), d);
                }
                Statement::Group(d) if self.declare(&d.node.name, Kind::Group) => {
                    groups.insert(d.node.name.node.clone(), d);
                }
                Statement::Resource(d) if self.declare(&d.node.name, Kind::Resource) => {
                    resources.insert(d.node.name.node.clone(), d);
                }
                _ => {}
            }
        }

        let mut group_ids: Vec<&str> = groups
            .keys()
            .map(String::as_str)
            .chain([EVERYONE])
            .collect();
        group_ids.sort_unstable();
        let indexes = Indexes {
            sites: sites.keys().zip(0..).map(|(k, i)| (k.clone(), i)).collect(),
            groups: group_ids
                .iter()
                .zip(0..)
                .map(|(k, i)| ((*k).to_owned(), i))
                .collect(),
            resources: resources
                .keys()
                .zip(0..)
                .map(|(k, i)| (k.clone(), i))
                .collect(),
        };

        let mut resolved = Resolved::default();
        let table = &mut resolved.table;
        for (id, decl) in &sites {
            table.sites.push(Site {
                id: id.clone(),
                description: decl.node.description.clone(),
                resources: Vec::new(),
            });
            resolved.locations.sites.push(decl.node.name.loc);
        }
        for id in &group_ids {
            let Some(decl) = groups.get(*id) else {
                table.groups.push(Group {
                    id: EVERYONE.to_owned(),
                    description: None,
                    members: Vec::new(),
                    idp: Vec::new(),
                });
                resolved.locations.groups.push(None);
                continue;
            };
            table.groups.push(self.group(decl));
            resolved.locations.groups.push(Some(decl.node.name.loc));
        }
        let mut invalid_resources = BTreeSet::new();
        for (idx, (id, decl)) in (0..).zip(&resources) {
            if let Some(resource) = self.resource(id, decl, &indexes) {
                if let Some(site) = table.sites.get_mut(resource.site as usize) {
                    site.resources.push(idx);
                }
                table.resources.push(resource);
            } else {
                // Keep indexes aligned with names; a bad resource still occupies its slot.
                invalid_resources.insert(idx);
                table.resources.push(Resource {
                    id: id.clone(),
                    description: None,
                    site: 0,
                    address: Address::Internet,
                    ports: None,
                    allow: Vec::new(),
                    deny: Vec::new(),
                });
            }
            resolved.locations.resources.push(decl.node.name.loc);
            resolved.locations.addresses.push(
                decl.node
                    .address
                    .as_ref()
                    .map_or(decl.node.name.loc, |a| a.loc),
            );
        }
        self.check_duplicate_addresses(
            &table.resources,
            &resolved.locations.addresses,
            &invalid_resources,
        );
        let nesting = Nesting::new(&table.resources);

        let rules: Vec<&Node<ast::RuleDecl>> = statements
            .iter()
            .filter_map(|s| match s {
                Statement::Rule(r) => Some(r),
                _ => None,
            })
            .collect();
        let users = self.users(table, &rules);
        let user_index: HashMap<String, UserIdx> = users
            .iter()
            .zip(0..)
            .map(|(u, i)| (u.email.clone(), i))
            .collect();
        table.users = users;

        let mut resolved_rules: Vec<(Rule, Loc)> = Vec::new();
        // Per rule (by where it is written), the targets whose insides it covers.
        let mut reaching: HashMap<Loc, Vec<ResourceIdx>> = HashMap::new();
        let mut rule_names: HashMap<String, Loc> = HashMap::new();
        for rule in &rules {
            if let Some(name) = &rule.node.name
                && let Some(first) = rule_names.insert(name.node.clone(), name.loc)
            {
                let (path, line, _) = self.sources.position(first);
                self.diagnostics.push(
                    Diagnostic::new(
                        Code::DuplicateName,
                        name.loc,
                        format!("rule name `{}` is used twice", name.node),
                    )
                    .with_label("used again here")
                    .with_note(format!("first used at {path}:{line}")),
                );
            }
            if let Some((r, reaching_inside)) = self.rule(rule, &indexes, &user_index, table) {
                reaching.insert(rule.loc, reaching_inside);
                resolved_rules.push((r, rule.loc));
            }
        }
        disambiguate_derived_ids(&mut resolved_rules);
        resolved_rules.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        for (idx, (rule, loc)) in (0..).zip(resolved_rules) {
            // A rule is filed under every resource it covers, so a decision reads only the
            // requested resource's lists: a deny (or Cedar's `resource in`) also under every
            // resource inside its targets.
            let reaching_inside = reaching.get(&loc).map_or(&[][..], Vec::as_slice);
            for r in nesting.covered(&rule.resources, reaching_inside) {
                if let Some(resource) = table.resources.get_mut(r as usize) {
                    match rule.effect {
                        Effect::Allow => resource.allow.push(idx),
                        Effect::Deny => resource.deny.push(idx),
                    }
                }
            }
            table.rules.push(rule);
            resolved.locations.rules.push(loc);
        }

        for statement in &statements {
            match statement {
                Statement::Test(test) => {
                    let test = self.test(
                        test,
                        &indexes,
                        table,
                        &mut resolved.groups_named_outside_rules,
                    );
                    resolved.tests.push(test);
                }
                Statement::Assert(assertion) => {
                    if let Some(invariant) = self.invariant(assertion, &indexes, table, &nesting) {
                        resolved
                            .groups_named_outside_rules
                            .extend(&invariant.groups);
                        resolved.invariants.push(invariant);
                    }
                }
                _ => {}
            }
        }
        resolved
    }

    /// Records a declared name, or reports it as declared before (names are global to the
    /// tree, across kinds). Returns whether the declaration stands.
    fn declare(&mut self, name: &Node<String>, kind: Kind) -> bool {
        if kind == Kind::Group && name.node == EVERYONE {
            self.diagnostics.push(
                Diagnostic::new(
                    Code::DuplicateName,
                    name.loc,
                    "group `everyone` is built in",
                )
                .with_label("cannot be declared")
                .with_help(
                    "`everyone` already holds every user of the account; choose another name",
                ),
            );
            return false;
        }
        if let Some((first_kind, first_loc)) = self.names.get(&name.node) {
            let (path, line, _) = self.sources.position(*first_loc);
            self.diagnostics.push(
                Diagnostic::new(
                    Code::DuplicateName,
                    name.loc,
                    format!("`{}` is declared twice", name.node),
                )
                .with_label(format!("{} declared again here", kind.as_str()))
                .with_note(format!(
                    "first declared as a {} at {path}:{line}",
                    first_kind.as_str()
                ))
                .with_help("names are global to the tree; rename one of them"),
            );
            return false;
        }
        self.names.insert(name.node.clone(), (kind, name.loc));
        true
    }

    fn group(&mut self, decl: &Node<ast::GroupDecl>) -> Group {
        let mut members = BTreeSet::new();
        for member in &decl.node.members {
            if let Some(email) = self.email(member) {
                members.insert(email);
            }
        }
        let mut idp: Vec<IdpBinding> = decl
            .node
            .idp
            .iter()
            .map(|b| IdpBinding {
                provider: b.node.provider.node.clone(),
                group: b.node.group.clone(),
            })
            .collect();
        idp.sort();
        idp.dedup();
        Group {
            id: decl.node.name.node.clone(),
            description: decl.node.description.clone(),
            members: members.into_iter().collect(),
            idp,
        }
    }

    fn resource(
        &mut self,
        id: &str,
        decl: &Node<ast::ResourceDecl>,
        indexes: &Indexes,
    ) -> Option<Resource> {
        let node = &decl.node;
        let missing = |property: &str, example: &str| {
            Diagnostic::new(
                Code::Property,
                node.name.loc,
                format!("resource `{id}` has no `{property}`"),
            )
            .with_label(format!("`{property}` is required"))
            .with_help(format!("add `{example}` to the block"))
        };
        // A partial declaration has a syntax error already; what looks missing may be there.
        let address = match &node.address {
            None => {
                if !node.partial {
                    self.diagnostics
                        .push(missing("address", "address \"host.example.com\""));
                }
                None
            }
            Some(Node {
                node: ast::AddressText::Internet,
                ..
            }) => Some(Address::Internet),
            Some(Node {
                node: ast::AddressText::Quoted(text),
                loc,
            }) => match Address::parse_quoted(text) {
                Ok(address) => Some(address),
                Err(error) => {
                    self.diagnostics.push(address_diagnostic(&error, *loc));
                    None
                }
            },
        };
        let site = match &node.site {
            None => {
                if !node.partial {
                    self.diagnostics.push(missing("site", "site NAME"));
                }
                None
            }
            Some(site) => self.lookup(site, Kind::Site, &indexes.sites, "site"),
        };
        // Every port is checked (one diagnostic each) before any failure counts.
        let ports = match &node.ports {
            None => Some(None),
            Some(specs) => {
                let checked: Vec<Option<PortRange>> = specs.iter().map(|p| self.port(p)).collect();
                checked
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(|mut ranges| {
                        ranges.sort();
                        ranges.dedup();
                        Some(ranges)
                    })
            }
        };
        if node.partial {
            // Never a resource of a table: its unread line might have narrowed it.
            return None;
        }
        Some(Resource {
            id: id.to_owned(),
            description: node.description.clone(),
            site: site?,
            address: address?,
            ports: ports?,
            allow: Vec::new(),
            deny: Vec::new(),
        })
    }

    fn port(&mut self, port: &Node<ast::PortSpec>) -> Option<PortRange> {
        let spec = port.node;
        match PortRange::new(spec.protocol, spec.first, spec.last) {
            Ok(range) => Some(range),
            Err(error) => {
                self.diagnostics.push(
                    Diagnostic::new(Code::InvalidPort, port.loc, error.to_string())
                        .with_help("ports run from 1 to 65535; a range is written low-high, such as `tcp/8000-8100`"),
                );
                None
            }
        }
    }

    fn check_duplicate_addresses(
        &mut self,
        resources: &[Resource],
        locations: &[Loc],
        invalid: &BTreeSet<ResourceIdx>,
    ) {
        let mut seen: HashMap<&Address, usize> = HashMap::new();
        // Source order, so the second declaration is the one reported.
        let mut order: Vec<usize> = (0..resources.len()).collect();
        order.sort_by_key(|i| locations.get(*i).map(|l| (l.file, l.span.start)));
        for i in order {
            if invalid.contains(&(i as ResourceIdx)) {
                continue;
            }
            let Some(resource) = resources.get(i) else {
                continue;
            };
            if let Some(&first) = seen.get(&resource.address) {
                let (Some(first_resource), Some(loc), Some(first_loc)) =
                    (resources.get(first), locations.get(i), locations.get(first))
                else {
                    continue;
                };
                let (path, line, _) = self.sources.position(*first_loc);
                self.diagnostics.push(
                    Diagnostic::new(
                        Code::DuplicateAddress,
                        *loc,
                        format!("resources `{}` and `{}` have the same address `{}`", first_resource.id, resource.id, resource.address),
                    )
                    .with_note(format!("`{}` is declared at {path}:{line}", first_resource.id))
                    .with_help("an address belongs to one resource: merge the two, listing every port on one"),
                );
            } else {
                seen.insert(&resource.address, i);
            }
        }
    }

    /// Every user the table names, with static groups.
    fn users(&mut self, table: &Table, rules: &[&Node<ast::RuleDecl>]) -> Vec<User> {
        let mut users: BTreeMap<String, Vec<GroupIdx>> = BTreeMap::new();
        for (idx, group) in (0..).zip(&table.groups) {
            for member in &group.members {
                users.entry(member.clone()).or_default().push(idx);
            }
        }
        for rule in rules {
            for subject in &rule.node.subjects {
                if let ast::Subject::User(email) = &subject.node
                    && is_email(email)
                {
                    users.entry(email.to_ascii_lowercase()).or_default();
                }
            }
        }
        users
            .into_iter()
            .map(|(email, groups)| User { email, groups })
            .collect()
    }

    /// A rule, and the resources whose insides it covers too (see `Nesting::covered`).
    fn rule(
        &mut self,
        rule: &Node<ast::RuleDecl>,
        indexes: &Indexes,
        users: &HashMap<String, UserIdx>,
        table: &Table,
    ) -> Option<(Rule, Vec<ResourceIdx>)> {
        let node = &rule.node;
        let targets = node
            .targets
            .iter()
            .map(|t| (&t.node.target, t.loc, t.node.covers_inside));
        let scope = self.scope(&node.subjects, targets, indexes, table);
        let mut ok = scope.is_some();
        let mut conditions = Vec::new();
        for condition in &node.conditions {
            match self.condition(condition) {
                Some(c) => conditions.push(c),
                None => ok = false,
            }
        }
        let file = self
            .sources
            .get(rule.loc.file)
            .map_or("", |f| f.path.as_str());
        let (_, line, _) = self.sources.position(rule.loc);
        let id = match &node.name {
            Some(name) => name.node.clone(),
            None => derived_rule_id(file, &node.normalized_text),
        };
        let scope = scope?;
        let rule = Rule {
            id,
            effect: node.effect,
            groups: scope.groups,
            // Every user a rule names is in the table (see `users`).
            users: scope
                .users
                .iter()
                .filter_map(|email| users.get(email).copied())
                .collect(),
            resources: scope.resources,
            conditions,
            origin: format!("{file}:{line}"),
        };
        ok.then_some((rule, scope.reaching_inside))
    }

    /// Subjects and targets as rules and assertions write them, resolved; `None` when any name
    /// is bad (each one reported). Each target comes with where it is written and whether the
    /// rule covers the resources inside it too.
    fn scope<'t>(
        &mut self,
        subjects: &[Node<ast::Subject>],
        targets: impl IntoIterator<Item = (&'t ast::Target, Loc, bool)>,
        indexes: &Indexes,
        table: &Table,
    ) -> Option<Scope> {
        let mut ok = true;
        let mut groups = BTreeSet::new();
        let mut users = BTreeSet::new();
        for subject in subjects {
            match self.subject(subject, indexes) {
                Some(SubjectRef::Group(g)) => {
                    groups.insert(g);
                }
                Some(SubjectRef::User(email)) => {
                    users.insert(email);
                }
                None => ok = false,
            }
        }
        let mut resources = BTreeSet::new();
        let mut reaching_inside = BTreeSet::new();
        for (target, loc, covers_inside) in targets {
            match self.target(target, loc, indexes, table) {
                Some(found) if covers_inside => {
                    reaching_inside.extend(found.iter().copied());
                    resources.extend(found);
                }
                Some(found) => resources.extend(found),
                None => ok = false,
            }
        }
        ok.then(|| Scope {
            groups: groups.into_iter().collect(),
            users: users.into_iter().collect(),
            resources: resources.into_iter().collect(),
            reaching_inside: reaching_inside.into_iter().collect(),
        })
    }

    fn subject(&mut self, subject: &Node<ast::Subject>, indexes: &Indexes) -> Option<SubjectRef> {
        match &subject.node {
            ast::Subject::User(email) => self
                .email(&Node::new(email.clone(), subject.loc))
                .map(SubjectRef::User),
            ast::Subject::Group(name) => self
                .lookup(
                    &Node::new(name.clone(), subject.loc),
                    Kind::Group,
                    &indexes.groups,
                    "group",
                )
                .map(SubjectRef::Group),
        }
    }

    /// The resources a target names, written at `loc`.
    fn target(
        &mut self,
        target: &ast::Target,
        loc: Loc,
        indexes: &Indexes,
        table: &Table,
    ) -> Option<Vec<ResourceIdx>> {
        match target {
            ast::Target::Resource(name) => self
                .lookup(
                    &Node::new(name.clone(), loc),
                    Kind::Resource,
                    &indexes.resources,
                    "resource",
                )
                .map(|r| vec![r]),
            ast::Target::Site(name) => {
                let site = self.lookup(
                    &Node::new(name.clone(), loc),
                    Kind::Site,
                    &indexes.sites,
                    "site",
                )?;
                // Resources are filed under their site as they resolve; read the site's list.
                table.sites.get(site as usize).map(|s| s.resources.clone())
            }
        }
    }

    /// Finds a name of one kind, or reports it: declared as another kind, or unknown with the
    /// nearest name of the right kind.
    fn lookup(
        &mut self,
        name: &Node<String>,
        kind: Kind,
        index: &HashMap<String, u32>,
        what: &str,
    ) -> Option<u32> {
        if let Some(idx) = index.get(&name.node) {
            return Some(*idx);
        }
        let mut diagnostic = Diagnostic::new(
            Code::UnknownName,
            name.loc,
            format!("unknown {what} `{}`", name.node),
        );
        match self.names.get(&name.node) {
            Some((other, _)) => {
                diagnostic =
                    diagnostic.with_label(format!("this is a {}, not a {what}", other.as_str()));
                if *other == Kind::Site && kind == Kind::Resource {
                    diagnostic = diagnostic.with_help(format!(
                        "write `site {}` to reach every resource of the site",
                        name.node
                    ));
                }
            }
            None => {
                diagnostic = diagnostic.with_label(format!("no {what} has this name"));
                if let Some(near) = did_you_mean(&name.node, index.keys().map(String::as_str)) {
                    diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
                }
            }
        }
        self.diagnostics.push(diagnostic);
        None
    }

    fn email(&mut self, email: &Node<String>) -> Option<String> {
        if is_email(&email.node) {
            return Some(email.node.to_ascii_lowercase());
        }
        self.diagnostics.push(
            Diagnostic::new(
                Code::InvalidEmail,
                email.loc,
                format!("`{}` is not an email address", email.node),
            )
            .with_help("users are named by email, such as `alice@company.com`"),
        );
        None
    }

    fn condition(&mut self, condition: &Node<ast::Condition>) -> Option<Condition> {
        match &condition.node {
            ast::Condition::Time {
                days,
                windows,
                zone,
            } => {
                let days = self.days(days);
                let windows: Option<Vec<ClockWindow>> = windows
                    .iter()
                    .map(|w| self.window(w))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .collect();
                let zone = self.zone(zone);
                Some(Condition::Time(TimeCondition {
                    days: days?,
                    windows: windows?,
                    zone: zone?,
                }))
            }
            ast::Condition::Country { negated, codes } => {
                let codes: Vec<Option<String>> = codes.iter().map(|c| self.country(c)).collect();
                let mut codes: Vec<String> = codes.into_iter().collect::<Option<_>>()?;
                codes.sort();
                codes.dedup();
                Some(Condition::Country {
                    negated: *negated,
                    codes,
                })
            }
            ast::Condition::Source { negated, networks } => {
                let networks: Vec<Option<Network>> =
                    networks.iter().map(|n| self.network(n)).collect();
                let mut networks: Vec<Network> = networks.into_iter().collect::<Option<_>>()?;
                networks.sort();
                networks.dedup();
                Some(Condition::Source {
                    negated: *negated,
                    networks,
                })
            }
            ast::Condition::Provider(provider) => Some(Condition::Provider {
                provider: provider.node.clone(),
            }),
            ast::Condition::ClientVerified => Some(Condition::ClientVerified),
        }
    }

    fn days(&mut self, ranges: &[Node<ast::DayRange>]) -> Option<Vec<Day>> {
        let mut days = BTreeSet::new();
        let mut ok = true;
        for range in ranges {
            if range.node.first == "any" && range.node.last.is_none() {
                days.extend(DAYS);
                continue;
            }
            let first = Day::parse(&range.node.first);
            let last = range.node.last.as_deref().map(Day::parse);
            match (first, last) {
                (Some(first), None) => {
                    days.insert(first);
                }
                (Some(first), Some(Some(last))) => days.extend(first.through(last)),
                _ => {
                    let bad = match first {
                        None => range.node.first.as_str(),
                        Some(_) => range.node.last.as_deref().unwrap_or(""),
                    };
                    self.diagnostics.push(
                        Diagnostic::new(Code::InvalidDay, range.loc, format!("`{bad}` is not a day"))
                            .with_help("days are `mon` `tue` `wed` `thu` `fri` `sat` `sun`, ranges such as `mon-fri`, or `any`"),
                    );
                    ok = false;
                }
            }
        }
        ok.then(|| days.into_iter().collect())
    }

    fn window(&mut self, window: &Node<ast::Window>) -> Option<ClockWindow> {
        let start = parse_clock(&window.node.start).filter(|m| *m < 1440);
        let end = parse_clock(&window.node.end);
        let bad = |text: &str| {
            Diagnostic::new(
                Code::InvalidTime,
                window.loc,
                format!("`{text}` is not a time of day"),
            )
            .with_help("times are `HH:MM` from `00:00` to `23:59`; `24:00` may end a window")
        };
        match (start, end) {
            (Some(start), Some(end)) if start == end => {
                self.diagnostics.push(
                    Diagnostic::new(Code::InvalidTime, window.loc, format!("window `{}-{}` is empty", window.node.start, window.node.end))
                        .with_help("a window needs an end different from its start; `00:00-24:00` is the whole day"),
                );
                None
            }
            (Some(start), Some(end)) => Some(ClockWindow { start, end }),
            (None, _) => {
                self.diagnostics.push(bad(&window.node.start));
                None
            }
            (_, None) => {
                self.diagnostics.push(bad(&window.node.end));
                None
            }
        }
    }

    fn zone(&mut self, zone: &Node<String>) -> Option<Tz> {
        if let Ok(tz) = Tz::from_str(&zone.node) {
            return Some(tz);
        }
        let mut diagnostic = Diagnostic::new(
            Code::UnknownTimeZone,
            zone.loc,
            format!("unknown time zone `{}`", zone.node),
        )
        .with_label("not in the IANA time zone database");
        let names = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
        let exact_but_case = names.clone().find(|n| n.eq_ignore_ascii_case(&zone.node));
        if let Some(near) = exact_but_case.or_else(|| did_you_mean(&zone.node, names)) {
            diagnostic = diagnostic.with_help(format!("did you mean `{near}`?"));
        } else {
            diagnostic = diagnostic.with_help("use an IANA zone such as `Europe/Berlin` or `UTC`");
        }
        self.diagnostics.push(diagnostic);
        None
    }

    fn country(&mut self, code: &Node<String>) -> Option<String> {
        let upper = code.node.to_ascii_uppercase();
        if upper.len() == 2 && is_country_code(&upper) {
            return Some(upper);
        }
        let mut diagnostic = Diagnostic::new(
            Code::UnknownCountry,
            code.loc,
            format!("unknown country code `{}`", code.node),
        )
        .with_label("not an ISO 3166 alpha-2 code");
        diagnostic = match suggest_country_code(&upper) {
            Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
            None => {
                diagnostic.with_help("countries are two-letter ISO 3166 codes such as `DE` or `FR`")
            }
        };
        self.diagnostics.push(diagnostic);
        None
    }

    fn network(&mut self, text: &Node<String>) -> Option<Network> {
        match text.node.parse::<Network>() {
            Ok(network) => Some(network),
            Err(error) => {
                self.diagnostics
                    .push(address_diagnostic(&AddressError::Network(error), text.loc));
                None
            }
        }
    }

    fn test(
        &mut self,
        test: &Node<ast::TestDecl>,
        indexes: &Indexes,
        table: &Table,
        groups_named: &mut BTreeSet<GroupIdx>,
    ) -> PolicyTest {
        let mut given: HashMap<String, Vec<String>> = HashMap::new();
        let mut expectations = Vec::new();
        for step in &test.node.steps {
            match step {
                ast::TestStep::Given(g) => {
                    let Some(email) = self.email(&g.node.user) else {
                        continue;
                    };
                    for group in &g.node.groups {
                        let Some(idx) = self.lookup(group, Kind::Group, &indexes.groups, "group")
                        else {
                            continue;
                        };
                        groups_named.insert(idx);
                        let static_only = table
                            .groups
                            .get(idx as usize)
                            .filter(|decl| !decl.is_open());
                        if let Some(decl) = static_only
                            && !decl.members.contains(&email)
                        {
                            self.diagnostics.push(
                                Diagnostic::new(
                                    Code::GivenStaticGroup,
                                    group.loc,
                                    format!(
                                        "`{email}` cannot be given group `{}`: it has no `idp` line and does not list them",
                                        group.node
                                    ),
                                )
                                .with_label("only its `members` are in this group")
                                .with_note("`given` stands for what an identity provider says, and no provider fills a group without an `idp` line")
                                .with_help(format!(
                                    "add `{email}` to the `members` of `{}`, or bind it to a provider group with `idp PROVIDER \"GROUP\"`",
                                    group.node
                                )),
                            );
                            continue;
                        }
                        given
                            .entry(email.clone())
                            .or_default()
                            .push(group.node.clone());
                    }
                }
                ast::TestStep::Expect(e) => {
                    if let Some(expectation) = self.expectation(e, indexes, &given) {
                        expectations.push(expectation);
                    }
                }
            }
        }
        PolicyTest {
            loc: test.loc,
            name: test.node.name.node.clone(),
            expectations,
        }
    }

    fn expectation(
        &mut self,
        expect: &Node<ast::Expect>,
        indexes: &Indexes,
        given: &HashMap<String, Vec<String>>,
    ) -> Option<Expectation> {
        let node = &expect.node;
        let user = self.email(&node.user);
        let resource = self.lookup(
            &node.resource,
            Kind::Resource,
            &indexes.resources,
            "resource",
        );
        let port = match &node.port {
            Some(p) => self.port(p).map(Some),
            None => Some(None),
        };
        let mut context = Context::default();
        let mut ok = true;
        for word in &node.context {
            match &word.node {
                ast::ContextWord::At(text) => match DateTime::parse_from_rfc3339(text) {
                    Ok(at) => context.at = Some(at.with_timezone(&Utc)),
                    Err(_) => {
                        ok = false;
                        self.diagnostics.push(
                            Diagnostic::new(Code::InvalidTimestamp, word.loc, format!("`{text}` is not an RFC 3339 timestamp"))
                                .with_help("write a date, a time and an offset, such as `2026-11-26T10:00:00+01:00`"),
                        );
                    }
                },
                ast::ContextWord::From(text) => match self
                    .network(&Node::new(text.clone(), word.loc))
                {
                    Some(n) if n.is_host() => context.source = Some(n.addr()),
                    Some(_) => {
                        ok = false;
                        self.diagnostics.push(
                            Diagnostic::new(
                                Code::InvalidIp,
                                word.loc,
                                format!("`{text}` is a range; `from` takes one address"),
                            )
                            .with_help("write the client's public address, such as `203.0.113.7`"),
                        );
                    }
                    None => ok = false,
                },
                ast::ContextWord::Country(code) => {
                    match self.country(&Node::new(code.clone(), word.loc)) {
                        Some(code) => context.country = Some(code),
                        None => ok = false,
                    }
                }
                ast::ContextWord::Provider(p) => context.provider = Some(p.clone()),
                ast::ContextWord::Verified => context.verified = true,
            }
        }
        let (user, _, port) = (user?, resource?, port?);
        ok.then(|| Expectation {
            loc: expect.loc,
            effect: node.effect,
            request: Request {
                groups: given.get(&user).cloned().unwrap_or_default(),
                user,
                resource: node.resource.node.clone(),
                port,
                context,
            },
        })
    }

    fn invariant(
        &mut self,
        assertion: &Node<ast::AssertDecl>,
        indexes: &Indexes,
        table: &Table,
        nesting: &Nesting,
    ) -> Option<Invariant> {
        let node = &assertion.node;
        let targets = node.targets.iter().map(|t| (&t.node, t.loc, false));
        let scope = self.scope(&node.subjects, targets, indexes, table);
        let text = self
            .sources
            .get(assertion.loc.file)
            .and_then(|f| {
                f.text
                    .get(assertion.loc.span.start as usize..assertion.loc.span.end as usize)
            })
            .unwrap_or("")
            .split_whitespace()
            .skip(1) // `assert`
            .collect::<Vec<_>>()
            .join(" ");
        let scope = scope?;
        Some(Invariant {
            loc: assertion.loc,
            quantifier: node.quantifier,
            groups: scope.groups,
            users: scope.users,
            // Invariants are about addresses: every resource that serves some address of a
            // target decides who reaches it.
            resources: nesting.serving(&scope.resources),
            text,
        })
    }
}

/// How resources' addresses nest and overlap, by resource index.
struct Nesting {
    /// For each resource, the resources that lie inside it.
    inside: Vec<Vec<ResourceIdx>>,
    /// For each resource, the other resources that serve some of its addresses: those that
    /// overlap it and win (every resource inside it among them).
    served_by: Vec<Vec<ResourceIdx>>,
}

impl Nesting {
    fn new(resources: &[Resource]) -> Nesting {
        let addresses: Vec<&Address> = resources.iter().map(|r| &r.address).collect();
        let mut inside = vec![Vec::new(); resources.len()];
        let mut served_by = vec![Vec::new(); resources.len()];
        for (winner, loser) in crate::address::overlapping_pairs(&addresses) {
            let lies_inside = addresses
                .get(winner)
                .zip(addresses.get(loser))
                .is_some_and(|(w, l)| w.lies_inside(l));
            if lies_inside && let Some(list) = inside.get_mut(loser) {
                list.push(winner as ResourceIdx);
            }
            if let Some(list) = served_by.get_mut(loser) {
                list.push(winner as ResourceIdx);
            }
        }
        Nesting { inside, served_by }
    }

    /// The resources a rule covers, sorted: its targets, and every resource inside those of
    /// them it reaches inside.
    fn covered(
        &self,
        targets: &[ResourceIdx],
        reaching_inside: &[ResourceIdx],
    ) -> BTreeSet<ResourceIdx> {
        let mut covered: BTreeSet<ResourceIdx> = targets.iter().copied().collect();
        for target in reaching_inside {
            covered.extend(self.inside.get(*target as usize).into_iter().flatten());
        }
        covered
    }

    /// The resources that serve some address of the targets, sorted: the targets and every
    /// resource that wins over one of them where they overlap.
    fn serving(&self, targets: &[ResourceIdx]) -> Vec<ResourceIdx> {
        let mut serving: BTreeSet<ResourceIdx> = targets.iter().copied().collect();
        for target in targets {
            serving.extend(self.served_by.get(*target as usize).into_iter().flatten());
        }
        serving.into_iter().collect()
    }
}

/// Who and what a rule or an assertion is about: group indexes, lowercase emails, resource
/// indexes, each sorted.
struct Scope {
    groups: Vec<GroupIdx>,
    users: Vec<String>,
    resources: Vec<ResourceIdx>,
    /// Of `resources`, those whose insides the rule covers too.
    reaching_inside: Vec<ResourceIdx>,
}

enum SubjectRef {
    Group(GroupIdx),
    User(String),
}

fn address_diagnostic(error: &AddressError, loc: Loc) -> Diagnostic {
    let code = match error {
        AddressError::Network(NetworkError::Address(_)) => Code::InvalidIp,
        AddressError::Network(_) => Code::InvalidCidr,
        AddressError::Name(crate::address::NameError::Invalid { .. }) => Code::InvalidDnsName,
        AddressError::Name(crate::address::NameError::Wildcard { .. }) => Code::InvalidWildcard,
    };
    let diagnostic = Diagnostic::new(code, loc, error.to_string());
    match error {
        AddressError::Network(NetworkError::HostBits { network, .. }) => {
            diagnostic.with_help(format!("did you mean `{network}`?"))
        }
        AddressError::Network(NetworkError::Prefix { max, .. }) => {
            diagnostic.with_help(format!("the prefix length runs from 0 to {max}"))
        }
        AddressError::Network(NetworkError::Address(_)) => {
            diagnostic.with_help("write an IPv4 address such as `10.0.0.5` or an IPv6 address such as `fd00::5`")
        }
        AddressError::Name(crate::address::NameError::Wildcard { .. }) => diagnostic
            .with_help("`*.example.com` is one label, `**.example.com` any depth, `app?.example.com` one character"),
        AddressError::Name(_) => diagnostic.with_help("a DNS name looks like `gitlab.company.com`"),
    }
}

/// Whether text looks like an email address: one `@`, a local part, a dotted domain, no spaces.
fn is_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `path#hash` of the rule's normalized text: stable when unrelated lines move.
fn derived_rule_id(path: &str, normalized_text: &str) -> String {
    let digest = Sha256::digest(normalized_text.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{path}#{hex}")
}

/// Two rules with the same text in one file would get one derived id: number the later ones
/// (`-2`, `-3`) in file order. The duplicate-rule warning tells the user about them.
fn disambiguate_derived_ids(rules: &mut [(Rule, Loc)]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut order: Vec<usize> = (0..rules.len()).collect();
    order.sort_by_key(|i| rules.get(*i).map(|(_, loc)| (loc.file, loc.span.start)));
    for i in order {
        let Some((rule, _)) = rules.get_mut(i) else {
            continue;
        };
        let count = seen.entry(rule.id.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            rule.id = format!("{}-{count}", rule.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for good in ["alice@company.com", "Bob.Smith+x@sub.example.org"] {
            assert!(is_email(good), "{good}");
        }
        for bad in [
            "alice",
            "alice@",
            "@company.com",
            "a@b",
            "a b@c.com",
            "a@b@c.com",
            "a@.com",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }
}
