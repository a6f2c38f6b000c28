//! The syntax tree of a policy file. Values are kept as written (text of addresses, times,
//! zones, codes); the compiler validates them, so that every bad value gets a diagnostic that
//! names it instead of a generic syntax error.

use crate::source::Node;

/// Everything one file declares, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFile {
    pub statements: Vec<Statement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    Site(Node<SiteDecl>),
    Resource(Node<ResourceDecl>),
    Group(Node<GroupDecl>),
    Rule(Node<RuleDecl>),
    Test(Node<TestDecl>),
    Assert(Node<AssertDecl>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteDecl {
    pub name: Node<String>,
    pub description: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDecl {
    pub name: Node<String>,
    pub address: Option<Node<AddressText>>,
    pub site: Option<Node<String>>,
    /// `None` when the resource has no `ports` line: all traffic to the address.
    pub ports: Option<Vec<Node<PortSpec>>>,
    pub description: Option<String>,
    /// Part of the declaration did not parse (a line of its block, or the block itself; each
    /// has its own syntax error). The name stays declared, so rules naming it resolve, but a
    /// property that looks missing may stand on the unreadable line, so the checker does not
    /// report one missing (it checks the properties that did read).
    pub partial: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressText {
    Internet,
    /// A DNS name or pattern, an IP or a CIDR, as written between the quotes.
    Quoted(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

/// `tcp/443`, `udp/8000-8100` or `icmp`. Numbers are kept unchecked (saturating at
/// `u32::MAX`) so the checker can say what is wrong with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub first: u32,
    pub last: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDecl {
    pub name: Node<String>,
    pub members: Vec<Node<String>>,
    pub idp: Vec<Node<IdpBinding>>,
    pub description: Option<String>,
}

/// `idp okta "Engineering"`: members are synced from provider `okta`'s group `Engineering`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdpBinding {
    pub provider: Node<String>,
    pub group: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

impl std::fmt::Display for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDecl {
    pub effect: Effect,
    pub subjects: Vec<Node<Subject>>,
    pub targets: Vec<Node<RuleTarget>>,
    pub conditions: Vec<Node<Condition>>,
    /// The `as NAME` of the rule.
    pub name: Option<Node<String>>,
    /// The rule's text on one line, with comments dropped and the spacing `fzc fmt` gives it:
    /// the input of the derived rule id, so the id survives formatting and unrelated edits.
    pub normalized_text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    Group(String),
    User(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Resource(String),
    Site(String),
}

/// A rule's target and how far the rule reaches there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleTarget {
    pub target: Target,
    /// Whether the rule also covers every resource that lies inside the target. An fz `deny`
    /// does (a guardrail cannot be carved around by declaring a narrower resource), an fz
    /// `allow` does not; in Cedar, `resource in` does and `resource ==` does not.
    pub covers_inside: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    Time {
        days: Vec<Node<DayRange>>,
        windows: Vec<Node<Window>>,
        zone: Node<String>,
    },
    Country {
        negated: bool,
        codes: Vec<Node<String>>,
    },
    Source {
        negated: bool,
        networks: Vec<Node<String>>,
    },
    Provider(Node<String>),
    ClientVerified,
}

/// `mon`, `mon-fri` or `any`, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DayRange {
    pub first: String,
    pub last: Option<String>,
}

/// `08:00-18:00`, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: String,
    pub end: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestDecl {
    pub name: Node<String>,
    pub steps: Vec<TestStep>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestStep {
    /// `given "EMAIL" in GROUP, GROUP`: membership an IdP would sync, for this test only.
    Given(Node<Given>),
    Expect(Node<Expect>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Given {
    pub user: Node<String>,
    pub groups: Vec<Node<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub effect: Effect,
    pub user: Node<String>,
    pub resource: Node<String>,
    pub port: Option<Node<PortSpec>>,
    pub context: Vec<Node<ContextWord>>,
}

/// Request context words of a test: `at`, `from`, `country`, `provider`, `verified`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContextWord {
    At(String),
    From(String),
    Country(String),
    Provider(String),
    Verified,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantifier {
    Never,
    Only,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssertDecl {
    pub quantifier: Quantifier,
    pub subjects: Vec<Node<Subject>>,
    pub targets: Vec<Node<Target>>,
}
