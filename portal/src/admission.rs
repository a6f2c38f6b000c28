//! What a client session may be granted, decided from the policy alone: the decision table's
//! answer for the session's user, groups and context, then whether the request itself is
//! right (a DNS resource asked for with a name it serves and well-formed mapped addresses),
//! then what the grant opens (the resource's address and ports, less the networks of more
//! specific resources). No store, no gateway, no clock but the instant given.
//!
//! The broker asks [`admit`] for every connection request and again for every grant in force
//! when it decides grants again; `tests/consistency.rs` holds it to the decision table and the
//! gateway's packet filter on random trees.
//!
//! INVARIANT: [`Admission::Granted`] only for an allow decision of the table on the resource
//! the request names, and a grant opens only what that resource serves.

use chrono::{DateTime, Utc};
use fz_compiler::address::Address;
use fz_compiler::table::{Resource, ResourceIdx};
use fz_compiler::{Decision, DecisionTable, Reason, Request};
use fz_proto::{DnsMapping, GrantedResource};

use crate::broker::cut;
use crate::registry::ClientSession;

/// The longest DNS name the flow log and a rejection quote whole: a name can be no longer.
pub const MAX_LOGGED_NAME: usize = 253;

/// The portal's answer to a request, before any gateway is involved. Each carries the name the
/// request asked with, for the flow log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The table allows it: the grant opens `resource` (its `dns` the name asked for), served by
    /// the gateways of `site`.
    Granted {
        decision: Decision,
        resource: GrantedResource,
        site: String,
    },
    /// The table denies it; `reason` says why in words, `guardrail` names the deny rule when
    /// one made the decision.
    Denied {
        decision: Decision,
        reason: String,
        guardrail: Option<String>,
        dns: Option<DnsMapping>,
    },
    /// The request itself is wrong for the resource: a DNS resource without a name it serves,
    /// a name for a resource that takes none, mapped addresses out of their ranges.
    Refused {
        reason: String,
        dns: Option<DnsMapping>,
    },
}

/// Decides `session`'s request for `resource_id` at `at`, asked with `dns` (a DNS resource's
/// name and mapped addresses), the device `verified` or not.
pub fn admit(
    table: &DecisionTable,
    session: &ClientSession,
    resource_id: &str,
    dns: Option<DnsMapping>,
    verified: bool,
    at: DateTime<Utc>,
) -> Admission {
    let request = request_for(table, session, resource_id, verified, at);
    let decision = table.decide(&request);
    if decision.reason != Reason::Allowed {
        let mut reason = decision.reason.describe().to_owned();
        let lines = table.explain(&request, &decision);
        if !lines.is_empty() {
            reason = format!("{reason}: {}", lines.join("; "));
        }
        let guardrail = (decision.reason == Reason::DeniedByRule)
            .then(|| decision.rules.first())
            .flatten()
            .and_then(|r| table.table().rules.get(*r as usize))
            .map(|r| r.id.clone());
        return Admission::Denied {
            decision,
            reason,
            guardrail,
            dns,
        };
    }
    let found = table
        .resource_index(resource_id)
        .and_then(|index| Some((index, table.table().resources.get(index as usize)?)));
    let Some((index, resource)) = found else {
        let reason = Reason::UnknownResource.describe().to_owned();
        return Admission::Refused { reason, dns };
    };
    if let Err(reason) = check_dns(table, resource, dns.as_ref()) {
        return Admission::Refused { reason, dns };
    }
    let site = site_of(table, index).unwrap_or_default();
    Admission::Granted {
        decision,
        resource: granted_resource(table, index, dns),
        site,
    }
}

/// The request a session makes for a resource at `at`.
fn request_for(
    table: &DecisionTable,
    session: &ClientSession,
    resource: &str,
    verified: bool,
    at: DateTime<Utc>,
) -> Request {
    Request {
        user: session.user.clone(),
        groups: groups_of(table, &session.idp_groups),
        resource: resource.to_owned(),
        port: None,
        context: fz_compiler::condition::Context {
            at: Some(at),
            source: session.source,
            country: session.country.clone(),
            provider: session.provider.clone(),
            verified,
        },
    }
}

/// The table's groups that the identity providers' groups map to (`idp PROVIDER "GROUP"`).
fn groups_of(table: &DecisionTable, idp_groups: &[(String, String)]) -> Vec<String> {
    if idp_groups.is_empty() {
        return Vec::new();
    }
    table
        .table()
        .groups
        .iter()
        .filter(|g| {
            g.idp.iter().any(|binding| {
                idp_groups.iter().any(|(provider, group)| {
                    *provider == binding.provider && *group == binding.group
                })
            })
        })
        .map(|g| g.id.clone())
        .collect()
}

/// A DNS resource needs the name the client resolved and the mapped addresses it handed out;
/// any other resource takes neither. The name must be one the resource serves: inside its
/// pattern, and not the name of a more specific resource (a grant for `*.corp.example` never
/// opens `vault.corp.example` when `vault` is a resource of its own).
fn check_dns(
    table: &DecisionTable,
    resource: &Resource,
    dns: Option<&DnsMapping>,
) -> Result<(), String> {
    match (&resource.address, dns) {
        (Address::Name(pattern), Some(dns)) => {
            // Before anything reads it: a longer name is no DNS name, and it would go into the
            // grant (signed, stored, sent) whole.
            if dns.name.strip_suffix('.').unwrap_or(&dns.name).len() > DnsMapping::MAX_NAME {
                return Err(format!(
                    "`{}` is longer than a DNS name can be ({} characters)",
                    cut(&dns.name, MAX_LOGGED_NAME),
                    DnsMapping::MAX_NAME
                ));
            }
            let name = dns.name.to_ascii_lowercase();
            if !pattern.matches(name.strip_suffix('.').unwrap_or(&name)) {
                return Err(format!(
                    "`{}` is not a name of this resource (`{}`)",
                    cut(&dns.name, MAX_LOGGED_NAME),
                    pattern.as_str()
                ));
            }
            if let Some(serving) = table.resource_for_name(&name)
                && serving.id != resource.id
            {
                return Err(format!(
                    "`{}` is served by resource `{}`, not `{}`: ask for `{}`",
                    cut(&dns.name, MAX_LOGGED_NAME),
                    serving.id,
                    resource.id,
                    serving.id
                ));
            }
            if !dns.is_well_formed() {
                return Err(format!(
                    "the mapped addresses for `{}` must be 1 to {} distinct addresses in \
                     100.96.0.0/11 or fd00:2021:1111:8000::/107",
                    cut(&dns.name, MAX_LOGGED_NAME),
                    DnsMapping::MAX_MAPPED
                ));
            }
            Ok(())
        }
        (Address::Name(pattern), None) => Err(format!(
            "`{}` is a DNS resource: ask with the name you resolved and its mapped addresses",
            pattern.as_str()
        )),
        (_, Some(_)) => Err("only DNS resources take a name and mapped addresses".to_owned()),
        (_, None) => Ok(()),
    }
}

/// What a grant for resource `index` opens: its address, its port filter, the networks of more
/// specific resources it keeps closed, and for a DNS resource the one name asked for.
fn granted_resource(
    table: &DecisionTable,
    index: ResourceIdx,
    dns: Option<DnsMapping>,
) -> GrantedResource {
    let resource = table.table().resources.get(index as usize);
    GrantedResource {
        id: resource.map(|r| r.id.clone()).unwrap_or_default(),
        address: resource.map(|r| r.address.to_string()).unwrap_or_default(),
        filter: resource.and_then(|r| {
            r.ports
                .as_ref()
                .map(|ports| ports.iter().map(ToString::to_string).collect())
        }),
        except: table
            .carve_outs(index)
            .iter()
            .map(ToString::to_string)
            .collect(),
        dns,
    }
}

/// The id of the site whose gateways serve a resource.
pub(crate) fn site_of(table: &DecisionTable, resource: u32) -> Option<String> {
    let table = table.table();
    let site = table.resources.get(resource as usize)?.site;
    table.sites.get(site as usize).map(|s| s.id.clone())
}
