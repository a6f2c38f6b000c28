//! A grant opens what its resource serves, through a real portal with test agents: a wide
//! network's grant carries the networks of the narrower resources inside it, an `internet`
//! grant every public network of another resource, a name is granted only through the
//! resource that serves it (and the flow log says which name), a claimed static-only group
//! adds nothing, and a narrower resource declared later withdraws the wide grant in force.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use fz_portal::store::{Decision, FlowFilter};
use fz_proto::{DnsMapping, PortalToClient};
use support::portal::TestPortal;

const POLICY: &str = r#"
site hq
resource corp-net { address "10.0.0.0/8"; site hq }
resource prod-db { address "10.0.5.0/24"; site hq; ports tcp/5432 }
resource lab-net { address "10.9.0.0/16"; site hq }
resource vpn { address "203.0.113.0/24"; site hq }
resource egress { address internet; site hq }
resource all-corp { address "*.corp.example"; site hq }
resource vault { address "vault.corp.example"; site hq }
group engineering { members "alice@acme.example" }
group admins { members "ann@acme.example" }
allow engineering -> corp-net, egress, all-corp as eng
allow admins -> vault as admins-vault
deny engineering -> prod-db as no-prod
"#;

const ALICE: &str = "alice@acme.example";

fn name(name: &str) -> Option<DnsMapping> {
    Some(DnsMapping {
        name: name.to_owned(),
        mapped: vec!["100.96.0.1".parse().unwrap()],
    })
}

fn rejection(answer: &PortalToClient) -> &str {
    match answer {
        PortalToClient::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn grants_carry_the_carve_outs_of_narrower_resources() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;

    let corp = alice.grant("corp-net", None).await;
    assert_eq!(corp.grant.resource.except, ["10.0.5.0/24", "10.9.0.0/16"]);
    // `internet` keeps every other network with public addresses closed; private ones are
    // no part of it anyway.
    let egress = alice.grant("egress", None).await;
    assert_eq!(egress.grant.resource.except, ["203.0.113.0/24"]);
    let all_corp = alice.grant("all-corp", name("wiki.corp.example")).await;
    assert!(all_corp.grant.resource.except.is_empty());
    // The narrower resource itself is decided on its own, and here denied.
    assert_eq!(
        rejection(&alice.request("prod-db", None).await),
        "denied by the rules below: deny rule `no-prod` (access.fz:14)"
    );
}

#[tokio::test]
async fn a_name_is_granted_only_through_the_resource_that_serves_it() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;

    // `vault.corp.example` matches `*.corp.example`, but `vault` serves it.
    let answer = alice.request("all-corp", name("VAULT.corp.example.")).await;
    assert_eq!(
        rejection(&answer),
        "`VAULT.corp.example.` is served by resource `vault`, not `all-corp`: ask for `vault`"
    );
    assert_eq!(
        rejection(&alice.request("vault", name("vault.corp.example")).await),
        "no allow rule applies"
    );
    alice.grant("all-corp", name("wiki.corp.example")).await;

    // The flow log names each name asked for.
    let flows = portal
        .store()
        .flows(&FlowFilter {
            account: "acme".to_owned(),
            ..FlowFilter::default()
        })
        .await
        .unwrap();
    let logged: Vec<(&str, Option<&str>, Decision)> = flows
        .iter()
        .rev()
        .map(|f| (f.resource_id.as_str(), f.name.as_deref(), f.decision))
        .collect();
    assert_eq!(
        logged,
        [
            ("all-corp", Some("VAULT.corp.example."), Decision::Deny),
            ("vault", Some("vault.corp.example"), Decision::Deny),
            ("all-corp", Some("wiki.corp.example"), Decision::Allow),
        ]
    );
}

/// The identity provider fills only groups bound to it: a provider group named like a
/// static-only group puts nobody in it.
#[tokio::test]
async fn provider_groups_never_fill_a_static_only_group() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let zed = "zed@acme.example";
    for provider in ["okta", "email"] {
        portal
            .store()
            .set_memberships("acme", zed, provider, &["admins".to_owned()])
            .await
            .unwrap();
    }
    let mut client = portal.client("acme", zed, 3).await;
    assert_eq!(
        rejection(&client.request("vault", name("vault.corp.example")).await),
        "no allow rule applies"
    );
    let mut ann = portal.client("acme", "ann@acme.example", 4).await;
    ann.grant("vault", name("vault.corp.example")).await;
}

/// A narrower resource declared while a wide grant is in force takes its addresses out of the
/// grant: the grant is withdrawn, and asked again it carries the new carve-out.
#[tokio::test]
async fn a_narrower_resource_declared_later_withdraws_the_wide_grant() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let corp = alice.grant("corp-net", None).await;

    let narrower = POLICY.replace(
        "resource vpn",
        "resource printers { address \"10.7.0.0/24\"; site hq }\nresource vpn",
    );
    portal.write_policy("acme", &narrower);
    match alice.next().await {
        Some(PortalToClient::Revoked { grant_id, reason }) => {
            assert_eq!(grant_id, corp.grant.id);
            assert_eq!(
                reason,
                "the resource's address, ports, site or carve-outs changed"
            );
        }
        other => panic!("expected a withdrawal, got {other:?}"),
    }
    let again = alice.grant("corp-net", None).await;
    assert_eq!(
        again.grant.resource.except,
        ["10.0.5.0/24", "10.7.0.0/24", "10.9.0.0/16"]
    );
}
