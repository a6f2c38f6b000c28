//! Diagnostics: what the front end and the checker say about a policy tree.
//!
//! A diagnostic is data (code, severity, message, location, label, help). Rendering it for
//! people or for JSON is the job of the command-line tool, never of the library.

use crate::source::Loc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// Every diagnostic the tool can give, each with a stable code that scripts and docs may rely
/// on. Codes are never reused for another meaning; new ones are appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    /// E001: the text does not follow the grammar.
    Syntax,
    /// E002: a property given twice, or a required one missing, in a block.
    Property,
    /// E003: the same name declared twice.
    DuplicateName,
    /// E004: a name that is not declared.
    UnknownName,
    /// E005: a DNS name that is not valid.
    InvalidDnsName,
    /// E006: a wildcard used where it cannot stand.
    InvalidWildcard,
    /// E007: an IP address that does not parse.
    InvalidIp,
    /// E008: a CIDR range that does not parse or has host bits set.
    InvalidCidr,
    /// E009: a port of 0, above 65535, or a reversed range.
    InvalidPort,
    /// E010: a time zone that is not in the IANA database.
    UnknownTimeZone,
    /// E011: a clock time that is not `HH:MM`, or an empty window.
    InvalidTime,
    /// E012: a day that is not `mon`..`sun` or `any`.
    InvalidDay,
    /// E013: a country code that is not ISO 3166 alpha-2.
    UnknownCountry,
    /// E014: two resources with one address.
    DuplicateAddress,
    /// E015: an email address that is not valid.
    InvalidEmail,
    /// E016: a test's timestamp that is not RFC 3339.
    InvalidTimestamp,
    /// E017: a construct that the Cedar front end cannot compile into a decision table.
    UnsupportedCedar,
    /// E018: a policy test expectation that does not hold.
    TestFailed,
    /// E019: an invariant that does not hold.
    InvariantFailed,
    /// E020: an fz rule that Cedar cannot express, found by `fzc export --cedar`.
    NotInCedar,
    /// E021: a tree without rules (or without policy files): it would compile to a table that
    /// denies every request.
    NoRules,
    /// E022: a test's `given` puts a user in a static-only group that does not list them.
    GivenStaticGroup,
    /// W001: two resources overlap; the most specific one serves the shared addresses.
    OverlappingResources,
    /// W002: a site no resource belongs to.
    UnusedSite,
    /// W003: a group no rule, test or invariant names.
    UnusedGroup,
    /// W004: a resource no rule reaches.
    UnusedResource,
    /// W005: an allow rule that an unconditional deny fully shadows.
    ShadowedRule,
    /// W006: a rule that says the same as another.
    DuplicateRule,
}

impl Code {
    /// Every code, in order.
    pub const ALL: [Code; 28] = [
        Code::Syntax,
        Code::Property,
        Code::DuplicateName,
        Code::UnknownName,
        Code::InvalidDnsName,
        Code::InvalidWildcard,
        Code::InvalidIp,
        Code::InvalidCidr,
        Code::InvalidPort,
        Code::UnknownTimeZone,
        Code::InvalidTime,
        Code::InvalidDay,
        Code::UnknownCountry,
        Code::DuplicateAddress,
        Code::InvalidEmail,
        Code::InvalidTimestamp,
        Code::UnsupportedCedar,
        Code::TestFailed,
        Code::InvariantFailed,
        Code::NotInCedar,
        Code::NoRules,
        Code::GivenStaticGroup,
        Code::OverlappingResources,
        Code::UnusedSite,
        Code::UnusedGroup,
        Code::UnusedResource,
        Code::ShadowedRule,
        Code::DuplicateRule,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "E001",
            Code::Property => "E002",
            Code::DuplicateName => "E003",
            Code::UnknownName => "E004",
            Code::InvalidDnsName => "E005",
            Code::InvalidWildcard => "E006",
            Code::InvalidIp => "E007",
            Code::InvalidCidr => "E008",
            Code::InvalidPort => "E009",
            Code::UnknownTimeZone => "E010",
            Code::InvalidTime => "E011",
            Code::InvalidDay => "E012",
            Code::UnknownCountry => "E013",
            Code::DuplicateAddress => "E014",
            Code::InvalidEmail => "E015",
            Code::InvalidTimestamp => "E016",
            Code::UnsupportedCedar => "E017",
            Code::TestFailed => "E018",
            Code::InvariantFailed => "E019",
            Code::NotInCedar => "E020",
            Code::NoRules => "E021",
            Code::GivenStaticGroup => "E022",
            Code::OverlappingResources => "W001",
            Code::UnusedSite => "W002",
            Code::UnusedGroup => "W003",
            Code::UnusedResource => "W004",
            Code::ShadowedRule => "W005",
            Code::DuplicateRule => "W006",
        }
    }

    pub fn severity(self) -> Severity {
        if self.as_str().starts_with('W') {
            Severity::Warning
        } else {
            Severity::Error
        }
    }
}

/// One finding about a policy tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    /// Lowercase, names user input in backticks.
    pub message: String,
    pub loc: Loc,
    /// A short note shown under the caret.
    pub label: Option<String>,
    /// What to do about it, e.g. ``did you mean `engineering`?``.
    pub help: Option<String>,
    /// Further lines, e.g. a counterexample.
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn new(code: Code, loc: Loc, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            severity: code.severity(),
            message: message.into(),
            loc,
            label: None,
            help: None,
            notes: Vec::new(),
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}
