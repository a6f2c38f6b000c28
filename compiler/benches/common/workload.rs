//! The generated workload shared by the `decide` bench and the `gen_tree` example: one policy
//! set, rendered both as an fz tree and as Cedar policies, with users, their groups and a pool
//! of requests. Every rendering comes from one list of [`Rule`]s, so they mean the same thing.
//!
//! The tree comes in two kinds ([`RulesIn`]): every rule an fz `allow`/`deny` line, or every
//! rule a Cedar policy in `rules/SITE.cedar` (declarations, tests and invariants stay fz,
//! since Cedar declares nothing). The Cedar policies are the same in both places: one per rule,
//! a rule naming two groups testing `principal in Group::"a" || principal in Group::"b"` in its
//! `when`.
//!
//! Shape for `n` rules: about n/10 resources, n/10 groups (10 to 1,000; a twentieth of them
//! contractor groups), n/1,000 sites (2 to 100), n/10 users (100 to 10,000) each in one to four
//! groups. Groups are synced from an identity provider, so the tree lists no members: the
//! requests carry each user's groups. Rules: one site-wide allow per site, 2% deny guardrails
//! (contractor groups unconditionally, everyone from embargoed countries), and allow rules on
//! one resource each, a third of them with conditions that both languages express. Every
//! group and resource is used and no rule repeats or is shadowed, so `fzc check` stays quiet.
//!
//! Everything is drawn from a fixed seed: the same `n` gives the same workload.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Requests in the pool the benches cycle through.
pub const POOL: usize = 256;

/// The one port every resource admits and every request asks for.
pub const PORT: &str = "tcp/443";

const EU: &[&str] = &["DE", "FR", "NL"];
const DACH: &[&str] = &["DE", "AT", "CH"];
const EMBARGOED: &[&str] = &["RU", "KP"];
const CORPORATE: &str = "10.0.0.0/8";
/// Countries requests come from: mostly inside the rules' lists, some outside, some embargoed.
const COUNTRIES: &[&str] = &["DE", "DE", "FR", "NL", "AT", "CH", "US", "GB", "RU"];
const PROVIDERS: &[&str] = &["okta", "okta", "google", "email"];

/// The language the rules of a generated tree are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RulesIn {
    Fz,
    Cedar,
}

impl RulesIn {
    /// The language's name, which is also its files' extension.
    pub fn name(self) -> &'static str {
        match self {
            RulesIn::Fz => "fz",
            RulesIn::Cedar => "cedar",
        }
    }
}

#[derive(Debug)]
pub struct Workload {
    pub sites: Vec<String>,
    /// Contractor groups first, then team groups: index order is name order.
    pub groups: Vec<String>,
    pub resources: Vec<Resource>,
    pub users: Vec<User>,
    pub rules: Vec<Rule>,
    pub requests: Vec<Probe>,
}

#[derive(Debug)]
pub struct Resource {
    pub id: String,
    pub site: usize,
    address: String,
    ports: Option<&'static str>,
}

#[derive(Debug)]
pub struct User {
    pub email: String,
    /// Group indexes, as the identity provider reports them.
    pub groups: Vec<usize>,
}

/// One request of the pool: who asks for what, and what the portal knows about the connection.
#[derive(Debug)]
pub struct Probe {
    pub user: usize,
    pub resource: usize,
    pub facts: Facts,
}

/// Every fact a condition may test. Always complete: Cedar errors on a missing attribute
/// where fz fails closed, so the two agree only on complete contexts.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    pub country: &'static str,
    pub source: Ipv4Addr,
    pub provider: &'static str,
    pub verified: bool,
}

#[derive(Clone, Debug)]
pub struct Rule {
    effect: Effect,
    /// Sorted, no repeats.
    subjects: Vec<Subject>,
    target: Target,
    conditions: Vec<Condition>,
    name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Everyone,
    Group(usize),
    User(usize),
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Resource(usize),
    Site(usize),
}

#[derive(Clone, Copy, Debug)]
enum Condition {
    CountryIn(&'static [&'static str]),
    CountryNotIn(&'static [&'static str]),
    SourceIn(&'static str),
    Provider(&'static str),
    ClientVerified,
}

/// How many of each thing a workload of `rules` rules has.
#[derive(Clone, Copy, Debug)]
struct Shape {
    rules: usize,
    resources: usize,
    groups: usize,
    contractor_groups: usize,
    sites: usize,
    users: usize,
    denies: usize,
}

impl Shape {
    fn new(rules: usize) -> Shape {
        let groups = (rules / 10).clamp(10, 1_000);
        let contractor_groups = (groups / 20).max(1);
        Shape {
            rules,
            resources: (rules / 10).max(10),
            groups,
            contractor_groups,
            sites: (rules / 1_000).clamp(2, 100),
            users: (rules / 10).clamp(100, 10_000),
            denies: (rules / 50).max(2 * contractor_groups),
        }
    }
}

impl Workload {
    pub fn generate(rules: usize) -> Workload {
        let shape = Shape::new(rules);
        assert!(
            shape.sites + shape.denies < rules,
            "{rules} rules is too few for the shape"
        );
        let mut rng = Rng(0x5eed_0000 ^ rules as u64);
        let sites = (0..shape.sites).map(|i| format!("site-{i:03}")).collect();
        let groups = (0..shape.groups)
            .map(|i| match i.checked_sub(shape.contractor_groups) {
                None => format!("contractors-{i:03}"),
                Some(team) => format!("team-{team:04}"),
            })
            .collect();
        let resources = (0..shape.resources)
            .map(|i| Resource::new(i, i % shape.sites))
            .collect();
        let users = (0..shape.users)
            .map(|i| User::draw(i, &shape, &mut rng))
            .collect();
        let mut workload = Workload {
            sites,
            groups,
            resources,
            users,
            rules: Vec::new(),
            requests: Vec::new(),
        };
        RuleDrawer::default().draw_all(&shape, &mut workload.rules, &mut rng);
        workload.requests = workload.draw_requests(&mut rng);
        workload
    }

    /// The policy tree, `(path, text)` per file, with its rules written in `rules_in`.
    pub fn tree(&self, rules_in: RulesIn) -> Vec<(String, String)> {
        let mut files = Vec::new();
        let mut sites = String::new();
        for site in &self.sites {
            writeln!(sites, "site {site} \"Generated site {site}\"").ok();
        }
        files.push(("sites.fz".to_owned(), sites));

        let mut groups = String::new();
        for group in &self.groups {
            writeln!(groups, "group {group} {{ idp okta \"{group}\" }}").ok();
        }
        files.push(("groups.fz".to_owned(), groups));

        let mut resources = vec![String::new(); self.sites.len()];
        for resource in &self.resources {
            if let Some(text) = resources.get_mut(resource.site) {
                resource.write_fz(text, &self.sites);
            }
        }
        let mut rules = vec![String::new(); self.sites.len()];
        match rules_in {
            RulesIn::Fz => {
                for rule in &self.rules {
                    if let Some(text) = rules.get_mut(self.site_of(rule.target)) {
                        writeln!(text, "{}", self.fz_rule(rule)).ok();
                    }
                }
            }
            RulesIn::Cedar => {
                for rule in &self.rules {
                    if let Some(text) = rules.get_mut(self.site_of(rule.target)) {
                        writeln!(text, "{}", self.cedar_rule(rule)).ok();
                    }
                }
            }
        }
        let rules_extension = rules_in.name();
        for (i, site) in self.sites.iter().enumerate() {
            for (dir, texts, extension) in [
                ("resources", &mut resources, "fz"),
                ("rules", &mut rules, rules_extension),
            ] {
                if let Some(text) = texts.get_mut(i) {
                    files.push((format!("{dir}/{site}.{extension}"), std::mem::take(text)));
                }
            }
        }
        files.push(("tests.fz".to_owned(), self.fz_tests()));
        files
    }

    /// The same rules as Cedar policies over `User`, `Group`, `Resource` and `Site`, one policy
    /// per rule: a rule naming several groups tests them with `||` in its `when`.
    pub fn cedar_policies(&self) -> String {
        let mut text = String::new();
        for rule in &self.rules {
            writeln!(text, "{}", self.cedar_rule(rule)).ok();
        }
        text
    }

    fn site_of(&self, target: Target) -> usize {
        match target {
            Target::Site(site) => site,
            Target::Resource(r) => self.resources.get(r).map_or(0, |r| r.site),
        }
    }

    fn group(&self, index: usize) -> &str {
        self.groups.get(index).map_or("", String::as_str)
    }

    fn email(&self, index: usize) -> &str {
        self.users.get(index).map_or("", |u| u.email.as_str())
    }

    fn resource_id(&self, index: usize) -> &str {
        self.resources.get(index).map_or("", |r| r.id.as_str())
    }

    fn site(&self, index: usize) -> &str {
        self.sites.get(index).map_or("", String::as_str)
    }

    fn fz_rule(&self, rule: &Rule) -> String {
        let effect = match rule.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny ",
        };
        let subjects: Vec<String> = rule
            .subjects
            .iter()
            .map(|s| match *s {
                Subject::Everyone => "everyone".to_owned(),
                Subject::Group(g) => self.group(g).to_owned(),
                Subject::User(u) => format!("user \"{}\"", self.email(u)),
            })
            .collect();
        let target = match rule.target {
            Target::Resource(r) => self.resource_id(r).to_owned(),
            Target::Site(s) => format!("site {}", self.site(s)),
        };
        let mut line = format!("{effect} {} -> {target}", subjects.join(", "));
        let conditions: Vec<String> = rule.conditions.iter().map(Condition::fz).collect();
        if !conditions.is_empty() {
            write!(line, " when {}", conditions.join(" and ")).ok();
        }
        if let Some(name) = &rule.name {
            write!(line, " as {name}").ok();
        }
        line
    }

    fn cedar_rule(&self, rule: &Rule) -> String {
        let effect = match rule.effect {
            Effect::Allow => "permit",
            Effect::Deny => "forbid",
        };
        let entity = |s: &Subject| match *s {
            Subject::Everyone => None,
            Subject::Group(g) => Some(format!("Group::\"{}\"", self.group(g))),
            Subject::User(u) => Some(format!("User::\"{}\"", self.email(u))),
        };
        let test = |s: &Subject| {
            let op = if matches!(s, Subject::User(_)) {
                "=="
            } else {
                "in"
            };
            entity(s).map(|e| format!("principal {op} {e}"))
        };
        let mut conditions = Vec::new();
        let principal = match rule.subjects.as_slice() {
            _ if rule.subjects.contains(&Subject::Everyone) => "principal".to_owned(),
            [one] => test(one).unwrap_or_else(|| "principal".to_owned()),
            many => {
                let any: Vec<String> = many.iter().filter_map(test).collect();
                conditions.push(format!("({})", any.join(" || ")));
                "principal".to_owned()
            }
        };
        let resource = match rule.target {
            Target::Resource(r) => format!("resource == Resource::\"{}\"", self.resource_id(r)),
            Target::Site(s) => format!("resource in Site::\"{}\"", self.site(s)),
        };
        conditions.extend(rule.conditions.iter().map(Condition::cedar));
        let mut policy = String::new();
        if let Some(name) = &rule.name {
            write!(policy, "@id(\"{name}\") ").ok();
        }
        write!(
            policy,
            "{effect}({principal}, action == Action::\"connect\", {resource})"
        )
        .ok();
        if !conditions.is_empty() {
            write!(policy, " when {{ {} }}", conditions.join(" && ")).ok();
        }
        policy.push(';');
        policy
    }

    /// A test block and invariants that hold by construction: contractors never reach what an
    /// unconditional guardrail keeps them from, and a team reaches what an unconditional
    /// allow names it for.
    fn fz_tests(&self) -> String {
        let guarded: Vec<(usize, usize)> = self
            .rules
            .iter()
            .filter(|r| r.effect == Effect::Deny && r.conditions.is_empty())
            .filter_map(|r| match (r.subjects.as_slice(), r.target) {
                ([Subject::Group(g)], Target::Resource(res)) => Some((*g, res)),
                _ => None,
            })
            .take(5)
            .collect();
        let open: Vec<(usize, usize)> = self
            .rules
            .iter()
            .filter(|r| r.effect == Effect::Allow && r.conditions.is_empty())
            .filter_map(|r| match (r.subjects.as_slice(), r.target) {
                ([Subject::Group(g)], Target::Resource(res)) => Some((*g, res)),
                _ => None,
            })
            .filter(|(g, _)| !self.is_contractor_group(*g))
            .take(5)
            .collect();
        let mut text = String::from("test \"generated guardrails and grants\" {\n");
        let cases = guarded
            .iter()
            .map(|c| ("deny", c))
            .chain(open.iter().map(|c| ("allow", c)));
        for (i, (effect, &(group, resource))) in cases.enumerate() {
            let probe = format!("probe-{i}@company.com");
            writeln!(text, "  given \"{probe}\" in {}", self.group(group)).ok();
            writeln!(
                text,
                "  expect {effect} \"{probe}\" -> {} {PORT} country DE verified",
                self.resource_id(resource)
            )
            .ok();
        }
        text.push_str("}\n");
        for &(group, resource) in &guarded {
            writeln!(
                text,
                "assert never {} -> {}",
                self.group(group),
                self.resource_id(resource)
            )
            .ok();
        }
        text
    }

    fn is_contractor_group(&self, group: usize) -> bool {
        self.group(group).starts_with("contractors-")
    }

    /// Half the requests name a resource an allow rule grants the user (they may still be
    /// denied by its conditions or a guardrail), the other half one no rule grants the user,
    /// where the tree has one.
    fn draw_requests(&self, rng: &mut Rng) -> Vec<Probe> {
        (0..POOL)
            .map(|i| {
                let user = rng.below(self.users.len());
                let granted = self.granted(user);
                let resource = if i.is_multiple_of(2) {
                    let granted: Vec<usize> = granted.iter().copied().collect();
                    rng.pick(&granted).copied()
                } else {
                    (0..10)
                        .map(|_| rng.below(self.resources.len()))
                        .find(|r| !granted.contains(r))
                };
                Probe {
                    user,
                    resource: resource.unwrap_or_else(|| rng.below(self.resources.len())),
                    facts: Facts::draw(rng),
                }
            })
            .collect()
    }

    /// The resources some allow rule names the user for, by group, by name or as everyone.
    fn granted(&self, user: usize) -> BTreeSet<usize> {
        let groups = self
            .users
            .get(user)
            .map_or(&[][..], |u| u.groups.as_slice());
        let names = |s: &Subject| match *s {
            Subject::Everyone => true,
            Subject::Group(g) => groups.contains(&g),
            Subject::User(u) => u == user,
        };
        let mut granted = BTreeSet::new();
        for rule in &self.rules {
            if rule.effect != Effect::Allow || !rule.subjects.iter().any(names) {
                continue;
            }
            match rule.target {
                Target::Resource(r) => {
                    granted.insert(r);
                }
                Target::Site(site) => granted.extend(
                    (0..self.resources.len())
                        .filter(|&r| self.resources.get(r).is_some_and(|r| r.site == site)),
                ),
            }
        }
        granted
    }
}

impl Resource {
    /// Mostly DNS names; every twentieth a /24, every twentieth a `**` wildcard. No two
    /// overlap, and every one admits [`PORT`].
    fn new(i: usize, site: usize) -> Resource {
        let (id, address, ports) = match i % 20 {
            0 => (
                format!("db-{i:05}"),
                format!("10.{}.{}.0/24", i / 256, i % 256),
                Some("tcp/443, tcp/5432"),
            ),
            1 => (
                format!("wiki-{i:05}"),
                format!("**.wiki-{i:05}.company.com"),
                None,
            ),
            _ => (
                format!("app-{i:05}"),
                format!("app-{i:05}.company.com"),
                Some("tcp/443, tcp/22"),
            ),
        };
        Resource {
            id,
            site,
            address,
            ports,
        }
    }

    fn write_fz(&self, text: &mut String, sites: &[String]) {
        let site = sites.get(self.site).map_or("", String::as_str);
        write!(
            text,
            "resource {} {{ address \"{}\"; site {site}",
            self.id, self.address
        )
        .ok();
        if let Some(ports) = self.ports {
            write!(text, "; ports {ports}").ok();
        }
        text.push_str(" }\n");
    }
}

impl User {
    /// One to four team groups, and for one user in ten a contractor group.
    fn draw(i: usize, shape: &Shape, rng: &mut Rng) -> User {
        let mut groups: Vec<usize> = (0..1 + rng.below(4))
            .map(|_| shape.contractor_groups + rng.below(shape.teams()))
            .collect();
        if rng.chance(10) {
            groups.push(rng.below(shape.contractor_groups));
        }
        groups.sort_unstable();
        groups.dedup();
        User {
            email: format!("user-{i:05}@company.com"),
            groups,
        }
    }
}

impl Facts {
    fn draw(rng: &mut Rng) -> Facts {
        let host = rng.below(1 << 16) as u32;
        let source = if rng.chance(50) {
            Ipv4Addr::from(0x0a00_0000 | host) // 10.0.0.0/8
        } else {
            Ipv4Addr::from(0xcb00_7100 | (host & 0xff)) // 203.0.113.0/24
        };
        Facts {
            country: rng.pick(COUNTRIES).copied().unwrap_or("DE"),
            source,
            provider: rng.pick(PROVIDERS).copied().unwrap_or("okta"),
            verified: rng.chance(60),
        }
    }
}

impl Condition {
    fn fz(&self) -> String {
        match self {
            Condition::CountryIn(codes) => format!("country in {}", codes.join(", ")),
            Condition::CountryNotIn(codes) => format!("country not in {}", codes.join(", ")),
            Condition::SourceIn(network) => format!("source in {network}"),
            Condition::Provider(provider) => format!("provider {provider}"),
            Condition::ClientVerified => "client verified".to_owned(),
        }
    }

    fn cedar(&self) -> String {
        let set = |codes: &[&str]| {
            let quoted: Vec<String> = codes.iter().map(|c| format!("\"{c}\"")).collect();
            format!("[{}]", quoted.join(", "))
        };
        match self {
            Condition::CountryIn(codes) => format!("{}.contains(context.country)", set(codes)),
            Condition::CountryNotIn(codes) => {
                format!("!{}.contains(context.country)", set(codes))
            }
            Condition::SourceIn(network) => {
                format!("context.source_ip.isInRange(ip(\"{network}\"))")
            }
            Condition::Provider(provider) => format!("context.provider == \"{provider}\""),
            Condition::ClientVerified => "context.client_verified".to_owned(),
        }
    }
}

/// Draws the rules: distinct, none shadowed by a guardrail, every group and resource used.
#[derive(Debug, Default)]
struct RuleDrawer {
    /// fz warns of repeated rules (same subjects, resources and conditions): keys drawn so far.
    seen: HashSet<String>,
    /// Resources an unconditional deny guards from each contractor group: an allow for just
    /// that group there would never apply.
    guarded: BTreeMap<usize, HashSet<usize>>,
}

impl RuleDrawer {
    fn draw_all(mut self, shape: &Shape, rules: &mut Vec<Rule>, rng: &mut Rng) {
        for site in 0..shape.sites {
            let team = shape.team(rng.below(shape.teams()));
            let rule = Rule::allow(vec![team], Target::Site(site), Vec::new());
            rules.push(self.distinct(rng, |_| rule.clone()));
        }
        for i in 0..shape.denies {
            let rule = self.distinct(rng, |rng| shape.guardrail(i, rng));
            if let ([Subject::Group(g)], Target::Resource(r), true) = (
                rule.subjects.as_slice(),
                rule.target,
                rule.conditions.is_empty(),
            ) {
                self.guarded.entry(*g).or_default().insert(r);
            }
            rules.push(rule);
        }
        for i in 0..shape.rules - rules.len() {
            let mut rule = self.distinct(rng, |rng| shape.grant(i, rng));
            if i.is_multiple_of(10) {
                rule.name = Some(format!("grant-{i:06}"));
            }
            rules.push(rule);
        }
    }

    /// Draws until the rule is new and no guardrail shadows it.
    fn distinct(&mut self, rng: &mut Rng, draw: impl Fn(&mut Rng) -> Rule) -> Rule {
        loop {
            let rule = draw(rng);
            if !self.shadowed(&rule) && self.seen.insert(rule.key()) {
                return rule;
            }
        }
    }

    fn shadowed(&self, rule: &Rule) -> bool {
        match (rule.effect, rule.subjects.as_slice(), rule.target) {
            (Effect::Allow, [Subject::Group(g)], Target::Resource(r)) => {
                self.guarded.get(g).is_some_and(|rs| rs.contains(&r))
            }
            _ => false,
        }
    }
}

impl Shape {
    fn teams(&self) -> usize {
        self.groups - self.contractor_groups
    }

    fn team(&self, team: usize) -> Subject {
        Subject::Group(self.contractor_groups + team)
    }

    /// The `i`th deny: the first ones name each contractor group once, unconditionally; then
    /// alternately a contractor group on a resource, and everyone from embargoed countries.
    fn guardrail(&self, i: usize, rng: &mut Rng) -> Rule {
        let resource = Target::Resource(rng.below(self.resources));
        if i < self.contractor_groups || i.is_multiple_of(2) {
            let group = if i < self.contractor_groups {
                i
            } else {
                rng.below(self.contractor_groups)
            };
            Rule::deny(vec![Subject::Group(group)], resource, Vec::new())
        } else {
            let conditions = vec![Condition::CountryIn(EMBARGOED)];
            Rule::deny(vec![Subject::Everyone], resource, conditions)
        }
    }

    /// The `i`th allow rule. The first ones name each team group and each resource once, so
    /// every declaration is used.
    fn grant(&self, i: usize, rng: &mut Rng) -> Rule {
        let resource = Target::Resource(if i < self.resources {
            i
        } else {
            rng.below(self.resources)
        });
        let roll = rng.below(100);
        let subjects = if i < self.teams() {
            vec![self.team(i)]
        } else if roll < 3 {
            // Contractors reach a resource only from a verified device.
            let group = Subject::Group(rng.below(self.contractor_groups));
            return Rule::allow(vec![group], resource, vec![Condition::ClientVerified]);
        } else if roll < 4 {
            vec![Subject::Everyone]
        } else if roll < 9 {
            vec![Subject::User(rng.below(self.users))]
        } else if roll < 29 {
            let mut two = vec![
                self.team(rng.below(self.teams())),
                self.team(rng.below(self.teams())),
            ];
            two.sort_unstable();
            two.dedup();
            two
        } else {
            vec![self.team(rng.below(self.teams()))]
        };
        Rule::allow(subjects, resource, conditions(rng))
    }
}

/// Two thirds of allow rules have no condition.
fn conditions(rng: &mut Rng) -> Vec<Condition> {
    match rng.below(100) {
        0..66 => Vec::new(),
        66..74 => vec![Condition::CountryIn(EU)],
        74..78 => vec![Condition::CountryIn(DACH)],
        78..84 => vec![Condition::ClientVerified],
        84..88 => vec![Condition::Provider("okta")],
        88..92 => vec![Condition::SourceIn(CORPORATE)],
        92..95 => vec![Condition::CountryNotIn(EMBARGOED)],
        _ => vec![Condition::CountryIn(EU), Condition::ClientVerified],
    }
}

impl Rule {
    fn allow(subjects: Vec<Subject>, target: Target, conditions: Vec<Condition>) -> Rule {
        Rule {
            effect: Effect::Allow,
            subjects,
            target,
            conditions,
            name: None,
        }
    }

    fn deny(subjects: Vec<Subject>, target: Target, conditions: Vec<Condition>) -> Rule {
        Rule {
            effect: Effect::Deny,
            ..Rule::allow(subjects, target, conditions)
        }
    }

    /// What makes two rules the same to fz's duplicate check (site targets never collide
    /// with a single resource: every site has several).
    fn key(&self) -> String {
        format!(
            "{:?} {:?} {:?} {:?}",
            self.effect, self.subjects, self.target, self.conditions
        )
    }
}

/// SplitMix64: small, fast, and the same on every machine.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the bias is negligible for the sizes used here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> Option<&'t T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len()))
        }
    }
}
