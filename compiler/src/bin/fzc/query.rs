//! `fzc query`: requests from flags or from a JSONL file, decisions out.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use fz_compiler::condition::Context;
use fz_compiler::table::PortRange;
use fz_compiler::{Decision, DecisionTable, Reason, Request};
use serde::{Deserialize, Serialize};

/// One line of `--requests FILE.jsonl`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLine {
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub resource: String,
    pub port: Option<String>,
    pub at: Option<String>,
    pub from: Option<String>,
    pub country: Option<String>,
    pub provider: Option<String>,
    #[serde(default)]
    pub verified: bool,
}

/// Request values as text, from flags or a JSONL line, validated into a [`Request`].
impl RequestLine {
    pub fn into_request(self, decisions: &DecisionTable) -> Result<Request, String> {
        if decisions.resource_index(&self.resource).is_none() {
            let ids = decisions.table().resources.iter().map(|r| r.id.as_str());
            let hint = fz_lang::did_you_mean(&self.resource, ids)
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            return Err(format!("unknown resource `{}`{hint}", self.resource));
        }
        let port = match &self.port {
            Some(text) => Some(
                text.parse::<PortRange>()
                    .map_err(|e| format!("bad port: {e}"))?,
            ),
            None => None,
        };
        let at = match &self.at {
            Some(text) => Some(
                DateTime::parse_from_rfc3339(text)
                    .map_err(|_| format!("`{text}` is not an RFC 3339 timestamp such as `2026-11-26T10:00:00+01:00`"))?
                    .with_timezone(&Utc),
            ),
            None => None,
        };
        let source = match &self.from {
            Some(text) => Some(
                text.parse::<IpAddr>()
                    .map_err(|_| format!("`{text}` is not an IP address"))?,
            ),
            None => None,
        };
        let country = match &self.country {
            Some(code) if code.len() == 2 && code.chars().all(|c| c.is_ascii_alphabetic()) => {
                Some(code.to_ascii_uppercase())
            }
            Some(code) => return Err(format!("`{code}` is not a two-letter country code")),
            None => None,
        };
        Ok(Request {
            user: self.user,
            groups: self.groups,
            resource: self.resource,
            port,
            context: Context {
                at,
                source,
                country,
                provider: self.provider,
                verified: self.verified,
            },
        })
    }
}

/// A decision in `--format json` and JSONL output.
#[derive(Debug, Serialize)]
pub struct DecisionJson {
    pub decision: &'static str,
    pub rules: Vec<String>,
    pub reason: &'static str,
    /// Groups the request claimed that counted for nothing: unknown names, and static-only
    /// groups that do not list the user.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored_groups: Vec<String>,
}

impl DecisionJson {
    pub fn new(request: &Request, decision: &Decision, decisions: &DecisionTable) -> Self {
        DecisionJson {
            ignored_groups: decisions
                .ignored_groups(request)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            decision: decision.effect.as_str(),
            rules: rule_ids(decision, decisions),
            reason: match decision.reason {
                Reason::Allowed => "allowed",
                Reason::DeniedByRule => "denied_by_rule",
                Reason::NoRule => "no_rule",
                Reason::PortNotAllowed => "port_not_allowed",
                Reason::UnknownResource => "unknown_resource",
            },
        }
    }
}

fn rule_ids(decision: &Decision, decisions: &DecisionTable) -> Vec<String> {
    decision
        .rules
        .iter()
        .filter_map(|r| decisions.table().rules.get(*r as usize))
        .map(|r| r.id.clone())
        .collect()
}

/// The decision for people: the verdict, why, and the rules.
pub fn human(request: &Request, decision: &Decision, decisions: &DecisionTable) -> String {
    let port = request.port.map(|p| format!(" {p}")).unwrap_or_default();
    let mut out = format!(
        "{}: {} -> {}{port}\n  {}\n",
        decision.effect,
        request.user,
        request.resource,
        decision.reason.describe()
    );
    for line in decisions.explain(request, decision) {
        out += &format!("  {line}\n");
    }
    out
}
