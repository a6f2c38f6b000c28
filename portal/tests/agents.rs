//! The portal with its agents over real WebSockets on loopback: test clients and gateways
//! built on the protocol crate ask, receive and verify grants, and watch them withdrawn.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use std::collections::HashSet;

use fz_host::testing::agents::{
    Origin, PATIENCE, RESOLVED, TestClient, TestGateway, key, next_text, open, send_text,
};
use fz_portal::store::Database;
use fz_portal::store::{Decision, FlowFilter};
use fz_proto::{
    ClientMessage, DnsMapping, GatewayMessage, PortalToClient, PortalToGateway,
    RESOURCE_PAGE_BYTES, decode, encode,
};
use support::backends::config_line;
use support::portal::{TestPortal, today_at};

const POLICY: &str = r#"
site hq
site lab
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443, tcp/22 }
resource wiki { address "**.wiki.acme.example"; site hq }
resource db { address "10.0.5.0/24"; site hq; ports tcp/5432 }
resource jenkins { address "172.16.0.5"; site lab }
resource vault { address "10.9.0.0/16"; site hq }
resource office { address "10.2.0.0/16"; site hq }
resource germany { address "10.3.0.0/16"; site hq }
group engineering { members "alice@acme.example"; idp okta "Engineering" }
allow engineering -> gitlab, db as eng-tools
allow engineering -> wiki as eng-wiki
allow engineering -> jenkins as eng-jenkins
allow engineering -> vault when client verified as eng-vault
allow engineering -> office when time any 09:00-17:00 UTC as eng-office
allow engineering -> germany when country in DE as eng-germany
"#;

const ALICE: &str = "alice@acme.example";
const BOB: &str = "bob@acme.example";

fn flows(account: &str) -> FlowFilter {
    FlowFilter {
        account: account.to_owned(),
        user: None,
        resource: None,
        decision: None,
        since: None,
        limit: None,
    }
}

/// What a client's DNS stub sends along when it asks for gitlab.
fn gitlab_name() -> Option<DnsMapping> {
    Some(DnsMapping {
        name: "gitlab.acme.example".to_owned(),
        mapped: vec![
            "100.96.0.1".parse().unwrap(),
            "fd00:2021:1111:8000::1".parse().unwrap(),
        ],
    })
}

fn rejection(answer: &PortalToClient) -> &str {
    match answer {
        PortalToClient::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The next message a serving gateway passed on that is not a grant being acknowledged.
async fn next_seen(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<PortalToGateway>,
) -> PortalToGateway {
    tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("the gateway hears from the portal in time")
        .expect("the gateway still serves")
}

async fn an_allowed_request_gets_a_grant_both_agents_verify_and_a_denied_one_a_reason(
    database: Database,
) {
    let portal = TestPortal::start(POLICY, &config_line(&database)).await;
    let gateway = portal.gateway("acme", "hq", 200).await;
    let gateway_id = gateway.id.clone();
    let mut seen = gateway.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let mut bob = portal.client("acme", BOB, 2).await;

    let visible: Vec<&str> = alice
        .ready
        .resources
        .iter()
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(
        visible,
        [
            "db", "germany", "gitlab", "jenkins", "office", "vault", "wiki"
        ]
    );
    // Every resource of the account, whatever the rules say of the user: bob asks, and the
    // portal refuses and records it.
    let bobs: Vec<&str> = bob.ready.resources.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(bobs, visible);
    assert_ne!(alice.ready.tunnel_ipv4, bob.ready.tunnel_ipv4);

    let signed = alice.grant("gitlab", gitlab_name()).await;
    let grant = &signed.grant;
    assert_eq!(grant.account, "acme");
    assert_eq!(grant.client.id, alice.ready.client_id);
    assert_eq!(grant.client.tunnel_ipv4, alice.ready.tunnel_ipv4);
    assert_eq!(grant.gateway.id, gateway_id);
    assert_eq!(
        grant.gateway.endpoints,
        ["203.0.113.1:51820".parse().unwrap()]
    );
    assert_eq!(grant.resource.address, "gitlab.acme.example");
    let filter: HashSet<&str> = grant
        .resource
        .filter
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(filter, HashSet::from(["tcp/443", "tcp/22"]));
    assert_eq!(grant.rule, "eng-tools");
    assert_eq!(
        grant.bundle_hash,
        portal
            .running()
            .broker
            .account("acme")
            .unwrap()
            .policy
            .current()
            .bundle_hash
    );
    // Expiry: the account's maximum lifetime (8 h), well inside the token's day.
    assert_eq!(grant.expires_at - grant.issued_at, 8 * 3600);
    // The gateway got the very same signed grant before the client did.
    match next_seen(&mut seen).await {
        PortalToGateway::Grant { grant } => assert_eq!(*grant, signed),
        other => panic!("expected the grant at the gateway, got {other:?}"),
    }
    // The same request again gets the grant in force again, with the gateway's answer about
    // the name.
    let again = match alice.request("gitlab", gitlab_name()).await {
        PortalToClient::Granted { grant, resolved } => {
            assert_eq!(resolved, Some(RESOLVED));
            grant
        }
        other => panic!("expected a grant, got {other:?}"),
    };
    assert_eq!(*again, signed);
    // Another name of the resource is another grant.
    let mut other_name = gitlab_name();
    if let Some(dns) = &mut other_name {
        dns.mapped.truncate(1);
    }
    let again = alice.grant("gitlab", other_name).await;
    assert_ne!(again.grant.id, signed.grant.id);
    // One preshared key per client–gateway pair while grants between them are in force, so
    // that both keep one WireGuard peer for the pair; another device gets its own.
    assert_eq!(again.grant.preshared_key, signed.grant.preshared_key);
    let db = match alice.request("db", None).await {
        PortalToClient::Granted { grant, resolved } => {
            assert_eq!(resolved, None, "an IP resource resolves nothing");
            grant
        }
        other => panic!("expected a grant, got {other:?}"),
    };
    assert_eq!(db.grant.preshared_key, signed.grant.preshared_key);
    let mut laptop = portal.client("acme", ALICE, 3).await;
    let other_device = laptop.grant("gitlab", gitlab_name()).await;
    assert_ne!(other_device.grant.preshared_key, signed.grant.preshared_key);

    let denied = bob.request("gitlab", gitlab_name()).await;
    assert_eq!(rejection(&denied), "no allow rule applies");
    let unknown = alice.request("payroll", None).await;
    assert_eq!(rejection(&unknown), "no such resource");

    let log = portal.store().flows(&flows("acme")).await.unwrap();
    let summary: Vec<(Decision, &str, &str, Option<&str>, i64)> = log
        .iter()
        .rev()
        .map(|f| {
            (
                f.decision,
                f.user.as_str(),
                f.resource_id.as_str(),
                f.rule_id.as_deref(),
                f.count,
            )
        })
        .collect();
    // The grant handed out again counts on the row that made it.
    assert_eq!(
        summary,
        [
            (Decision::Allow, ALICE, "gitlab", Some("eng-tools"), 2),
            (Decision::Allow, ALICE, "gitlab", Some("eng-tools"), 1),
            (Decision::Allow, ALICE, "db", Some("eng-tools"), 1),
            (Decision::Allow, ALICE, "gitlab", Some("eng-tools"), 1),
            (Decision::Deny, BOB, "gitlab", None, 1),
            (Decision::Deny, ALICE, "payroll", None, 1),
        ]
    );
    assert_eq!(log[5].grant_id.as_deref(), Some(signed.grant.id.as_str()));
    assert!(log.iter().all(|f| f.bundle_hash == grant.bundle_hash));
    assert_eq!(log[1].reason, "no allow rule applies");
    assert_eq!(log[1].client_id, bob.ready.client_id);
}

#[tokio::test]
async fn a_failed_condition_is_named_and_idp_groups_count() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let vault = alice.request("vault", None).await;
    let reason = rejection(&vault);
    assert!(reason.starts_with("no allow rule applies: "), "{reason}");
    assert!(
        reason.contains("allow rule `eng-vault`")
            && reason.contains("`client verified` did not hold"),
        "{reason}"
    );
    portal
        .store()
        .set_client_verified("acme", &alice.ready.client_id, true)
        .await
        .unwrap();
    let vault = alice.grant("vault", None).await;
    assert_eq!(vault.grant.rule, "eng-vault");
    // Taking the mark away withdraws what needed it.
    portal
        .store()
        .set_client_verified("acme", &alice.ready.client_id, false)
        .await
        .unwrap();
    match alice.next().await {
        Some(PortalToClient::Revoked { grant_id, reason }) => {
            assert_eq!(grant_id, vault.grant.id);
            assert!(reason.contains("no longer allows it"), "{reason}");
        }
        other => panic!("expected the vault grant withdrawn, got {other:?}"),
    }

    // Carol is in engineering only through okta's "Engineering" group.
    let carol = "carol@acme.example";
    let mut before = portal.client("acme", carol, 3).await;
    assert_eq!(
        rejection(&before.request("gitlab", gitlab_name()).await),
        "no allow rule applies"
    );
    portal
        .store()
        .set_memberships("acme", carol, "okta", &["Engineering".to_owned()])
        .await
        .unwrap();
    let mut after = portal.client("acme", carol, 4).await;
    assert_eq!(
        after.grant("gitlab", gitlab_name()).await.grant.rule,
        "eng-tools"
    );
}

#[tokio::test]
async fn dns_resources_take_a_name_inside_the_pattern_and_mapped_addresses() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let mapping = |name: &str, mapped: &[&str]| {
        Some(DnsMapping {
            name: name.to_owned(),
            mapped: mapped.iter().map(|ip| ip.parse().unwrap()).collect(),
        })
    };
    let good = mapping(
        "docs.wiki.acme.example",
        &["100.96.0.1", "fd00:2021:1111:8000::1"],
    );
    let signed = alice.grant("wiki", good.clone()).await;
    assert_eq!(signed.grant.resource.dns, good);
    assert_eq!(signed.grant.resource.address, "**.wiki.acme.example");

    let cases = [
        (
            mapping("evil.example", &["100.96.0.1"]),
            "is not a name of this resource",
        ),
        (
            mapping("docs.wiki.acme.example", &["172.16.0.5"]),
            "must be 1 to 8 distinct addresses",
        ),
        (None, "is a DNS resource: ask with the name"),
    ];
    for (dns, expected) in cases {
        let answer = alice.request("wiki", dns).await;
        assert!(rejection(&answer).contains(expected), "{answer:?}");
    }
    // A name of any length is quoted only in part.
    let long = format!("{}.example", "a".repeat(100_000));
    let answer = alice.request("wiki", mapping(&long, &["100.96.0.1"])).await;
    let reason = rejection(&answer);
    assert!(
        reason.chars().count() <= 1025 && reason.contains('…'),
        "{}",
        reason.len()
    );
    let answer = alice
        .request("db", mapping("db.acme.example", &["100.96.0.9"]))
        .await;
    assert!(
        rejection(&answer).contains("only DNS resources"),
        "{answer:?}"
    );
}

async fn a_policy_change_withdraws_grants_it_no_longer_allows_and_a_bad_one_changes_nothing(
    database: Database,
) {
    let portal = TestPortal::start(POLICY, &config_line(&database)).await;
    let mut seen = portal.gateway("acme", "hq", 200).await.serve();
    let mut lab = portal.gateway("acme", "lab", 201).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let gitlab = alice.grant("gitlab", gitlab_name()).await;
    let jenkins = alice.grant("jenkins", None).await;
    assert!(matches!(
        next_seen(&mut seen).await,
        PortalToGateway::Grant { .. }
    ));
    assert!(matches!(
        next_seen(&mut lab).await,
        PortalToGateway::Grant { .. }
    ));
    let engine = portal
        .running()
        .broker
        .account("acme")
        .unwrap()
        .policy
        .clone();
    let hash = engine.current().bundle_hash.clone();
    let mut status = engine.reload_status();

    // A tree that does not compile: the last good table stays, and so do the grants (the
    // same request gets the same grant).
    portal.write_policy("acme", &format!("{POLICY}\nallow nobody -> gitlab\n"));
    status.changed().await.unwrap();
    let failed = status.borrow().clone();
    assert!(failed.last_error.is_some(), "{failed:?}");
    assert_eq!(engine.current().bundle_hash, hash);
    assert_eq!(alice.grant("gitlab", gitlab_name()).await, gitlab);

    // A good tree without the jenkins rule: its grant is withdrawn at gateway and client;
    // gitlab's grants stay.
    portal.write_policy(
        "acme",
        &POLICY.replace("allow engineering -> jenkins as eng-jenkins\n", ""),
    );
    match next_seen(&mut lab).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, jenkins.grant.id),
        other => panic!("expected jenkins's revocation, got {other:?}"),
    }
    match alice.next().await {
        Some(PortalToClient::Revoked { grant_id, reason }) => {
            assert_eq!(grant_id, jenkins.grant.id);
            assert!(
                reason.contains("the policy no longer allows it"),
                "{reason}"
            );
        }
        other => panic!("expected jenkins's revocation, got {other:?}"),
    }
    assert_ne!(engine.current().bundle_hash, hash);
    let active: Vec<String> = portal
        .store()
        .active_grants("acme", portal.now().timestamp())
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert!(active.contains(&gitlab.grant.id));
    assert!(!active.contains(&jenkins.grant.id));
    assert_eq!(
        rejection(&alice.request("jenkins", None).await),
        "no allow rule applies"
    );
}

#[tokio::test]
async fn a_resource_that_changes_address_or_site_takes_its_grants_with_it() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    portal.gateway("acme", "lab", 201).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let db = alice.grant("db", None).await;
    let wiki = alice
        .grant(
            "wiki",
            Some(DnsMapping {
                name: "docs.wiki.acme.example".to_owned(),
                mapped: vec!["100.96.0.7".parse().unwrap()],
            }),
        )
        .await;
    let cases = [
        (
            POLICY.replace(
                r#"address "10.0.5.0/24"; site hq"#,
                r#"address "10.0.6.0/24"; site hq"#,
            ),
            &db,
        ),
        (
            POLICY.replace(
                r#"address "**.wiki.acme.example"; site hq"#,
                r#"address "**.wiki.acme.example"; site lab"#,
            ),
            &wiki,
        ),
    ];
    for (policy, grant) in cases {
        portal.write_policy("acme", &policy);
        match alice.next().await {
            Some(PortalToClient::Revoked { grant_id, reason }) => {
                assert_eq!(grant_id, grant.grant.id);
                assert_eq!(
                    reason,
                    "the resource's address, ports, site or carve-outs changed"
                );
            }
            other => panic!("expected a withdrawal, got {other:?}"),
        }
    }
}

async fn a_revoked_token_loses_its_grants_and_its_connection(database: Database) {
    let portal = TestPortal::start(POLICY, &config_line(&database)).await;
    let mut seen = portal.gateway("acme", "hq", 200).await.serve();
    let (token_id, secret) = portal.client_token("acme", ALICE).await;
    let mut alice = TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1))
        .await
        .unwrap();
    let mut other = portal.client("acme", ALICE, 2).await;
    let grant = alice.grant("gitlab", gitlab_name()).await;
    let kept = other.grant("gitlab", gitlab_name()).await;
    next_seen(&mut seen).await;
    next_seen(&mut seen).await;

    portal
        .store()
        .revoke_token("acme", &token_id, portal.now().timestamp())
        .await
        .unwrap();
    match next_seen(&mut seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, grant.grant.id),
        other => panic!("expected a revocation, got {other:?}"),
    }
    // The client hears of it or is simply cut off; either way the connection ends.
    loop {
        match alice.next().await {
            Some(PortalToClient::Revoked { grant_id, reason }) => {
                assert_eq!(grant_id, grant.grant.id);
                assert_eq!(reason, "the token was revoked");
            }
            None => break,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    let refused =
        TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1)).await;
    assert_eq!(refused.err().map(|e| e.0), Some(401));
    // The other device of the same user is untouched.
    assert_eq!(
        other.grant("gitlab", gitlab_name()).await.grant.rule,
        kept.grant.rule
    );
}

#[tokio::test]
async fn a_withdrawn_grants_preshared_key_is_not_left_in_the_store_files() {
    use base64::Engine as _;
    let mut portal = TestPortal::start(POLICY, "").await;
    let mut seen = portal.gateway("acme", "lab", 200).await.serve();
    let (token_id, secret) = portal.client_token("acme", ALICE).await;
    let mut alice = TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1))
        .await
        .unwrap();
    let grant = alice.grant("jenkins", None).await;
    next_seen(&mut seen).await;
    portal
        .store()
        .revoke_token("acme", &token_id, portal.now().timestamp())
        .await
        .unwrap();
    // The gateway hears of a withdrawal only once the store has deleted the grant.
    match next_seen(&mut seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, grant.grant.id),
        other => panic!("expected a revocation, got {other:?}"),
    }
    // Stopping checkpoints the store, as the running portal does every minute.
    portal.running.take().unwrap().stop().await.unwrap();
    let key = grant.grant.preshared_key.0;
    let encoded = base64::engine::general_purpose::STANDARD.encode(key);
    let data = portal.dir.path().join("data");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        // SQLite removes its log files after the store closed, on its own thread: one listed
        // may be gone by now, and a file that is gone holds no key.
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => panic!("{}: {error}", path.display()),
        };
        for needle in [&key[..], encoded.as_bytes()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds the withdrawn grant's preshared key",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn a_device_that_returns_with_another_key_loses_the_grants_of_the_old_one() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut seen = portal.gateway("acme", "hq", 200).await.serve();
    let (_, secret) = portal.client_token("acme", ALICE).await;
    let mut before =
        TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1))
            .await
            .unwrap();
    let old = before.grant("db", None).await;
    next_seen(&mut seen).await;
    let mut after = TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(9))
        .await
        .unwrap();
    assert_eq!(after.ready.client_id, before.ready.client_id);
    match next_seen(&mut seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, old.grant.id),
        other => panic!("expected the old key's grant withdrawn, got {other:?}"),
    }
    let new = after.grant("db", None).await;
    assert_eq!(new.grant.client.public_key, key(9));
}

#[tokio::test]
async fn the_verified_mark_belongs_to_the_device_key_not_to_the_token() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut seen = portal.gateway("acme", "hq", 200).await.serve();
    let (_, secret) = portal.client_token("acme", ALICE).await;
    let connect = |seed: u8| {
        TestClient::connect(
            portal.address(),
            portal.pinned(),
            "acme",
            &secret,
            key(seed),
        )
    };
    let mut device = connect(1).await.unwrap();
    portal
        .store()
        .set_client_verified("acme", &device.ready.client_id, true)
        .await
        .unwrap();
    let vault = device.grant("vault", None).await;
    assert_eq!(vault.grant.rule, "eng-vault");
    assert!(matches!(
        next_seen(&mut seen).await,
        PortalToGateway::Grant { .. }
    ));

    // The token copied to another machine, which registers its own key: the same client,
    // and the marked device's grant is withdrawn.
    let mut copy = connect(9).await.unwrap();
    assert_eq!(copy.ready.client_id, device.ready.client_id);
    match next_seen(&mut seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, vault.grant.id),
        other => panic!("expected the marked device's grant withdrawn, got {other:?}"),
    }
    // The copy is not verified: refused what needs the mark, granted what does not.
    let refused = copy.request("vault", None).await;
    let reason = rejection(&refused);
    assert!(
        reason.contains("`client verified` did not hold"),
        "{reason}"
    );
    assert_eq!(copy.grant("db", None).await.grant.rule, "eng-tools");
    let client = portal
        .store()
        .client("acme", &copy.ready.client_id)
        .await
        .unwrap()
        .unwrap();
    assert!(!client.verified);

    // The marked device comes back with its own key: verified again.
    let mut back = connect(1).await.unwrap();
    assert_eq!(back.grant("vault", None).await.grant.rule, "eng-vault");
}

#[tokio::test]
async fn a_grant_acknowledged_after_its_session_ended_is_withdrawn_at_once() {
    let portal = TestPortal::start(POLICY, "gateway_ack_timeout_ms = 30000").await;
    let mut gateway = portal.gateway("acme", "hq", 200).await;
    let (token_id, secret) = portal.client_token("acme", ALICE).await;
    let mut alice = TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1))
        .await
        .unwrap();
    send_text(
        &mut alice.socket,
        encode(&ClientMessage::RequestAccess {
            resource: "db".to_owned(),
            dns: None,
            avoid: vec![],
        }),
    )
    .await;
    let Some(PortalToGateway::Grant { grant }) = gateway.next().await else {
        panic!("expected the grant at the gateway");
    };
    // The token is revoked while the gateway holds the grant unacknowledged: the session ends.
    portal
        .store()
        .revoke_token("acme", &token_id, portal.now().timestamp())
        .await
        .unwrap();
    while next_text(&mut alice.socket).await.is_some() {}
    gateway
        .send(&GatewayMessage::Ack {
            grant_id: grant.grant.id.clone(),
            resolved: None,
        })
        .await;
    match gateway.next().await {
        Some(PortalToGateway::Revoke { grant_id }) => assert_eq!(grant_id, grant.grant.id),
        other => panic!("expected the late grant withdrawn, got {other:?}"),
    }
    let active = portal
        .store()
        .active_grants("acme", portal.now().timestamp())
        .await
        .unwrap();
    assert!(active.iter().all(|g| g.id != grant.grant.id));
}

#[tokio::test]
async fn a_grant_ends_with_its_time_window() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut gateway = portal.gateway("acme", "hq", 200).await;
    let mut alice = portal.client("acme", ALICE, 1).await;
    portal.set_clock(today_at(16, 59, 30));
    // The gateway's clock is the portal's, as in real life.
    gateway.clock_offset = portal.clock_offset();
    let mut seen = gateway.serve();
    let granted = match alice.request("office", None).await {
        PortalToClient::Granted { grant, .. } => grant,
        other => panic!("expected a grant inside the window, got {other:?}"),
    };
    assert_eq!(
        granted.grant.expires_at,
        today_at(17, 0, 0).timestamp() as u64
    );
    assert_eq!(
        granted.grant.issued_at,
        today_at(16, 59, 30).timestamp() as u64
    );
    next_seen(&mut seen).await;

    portal.set_clock(today_at(17, 0, 1));
    match next_seen(&mut seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, granted.grant.id),
        other => panic!("expected the revocation, got {other:?}"),
    }
    match alice.next().await {
        Some(PortalToClient::Revoked { grant_id, .. }) => assert_eq!(grant_id, granted.grant.id),
        other => panic!("expected the revocation, got {other:?}"),
    }
    assert!(rejection(&alice.request("office", None).await).contains("did not hold"));
}

#[tokio::test]
async fn a_client_keeps_its_gateway_and_a_silent_gateway_is_replaced() {
    let portal = TestPortal::start(POLICY, "gateway_ack_timeout_ms = 1000").await;
    // Stickiness: with three gateways, every request of one client goes to the first it got.
    let mut serving = Vec::new();
    for seed in 200..203 {
        serving.push(portal.gateway("acme", "hq", seed).await.serve());
    }
    let mut alice = portal.client("acme", ALICE, 1).await;
    let first = alice.grant("gitlab", gitlab_name()).await.grant.gateway.id;
    for _ in 0..8 {
        assert_eq!(alice.grant("db", None).await.grant.gateway.id, first);
    }
    drop(serving);

    // A site whose only gateway takes grants and never acknowledges: the request waits for
    // it, the portal gives up on it, and the grant goes to a gateway that connected since.
    let mut silent = portal.gateway("acme", "lab", 210).await;
    let mut second = portal.client("acme", ALICE, 2).await;
    let request = tokio::spawn(async move {
        let answer = second.request("jenkins", None).await;
        (second, answer)
    });
    let first_try = match silent.next().await {
        Some(PortalToGateway::Grant { grant }) => grant,
        other => panic!("expected a grant at the silent gateway, got {other:?}"),
    };
    let good = portal.gateway("acme", "lab", 211).await;
    let good_id = good.id.clone();
    let mut seen = good.serve();
    let (client, answer) = request.await.unwrap();
    let PortalToClient::Granted { grant, .. } = answer else {
        panic!("expected a grant through the second gateway, got {answer:?}");
    };
    assert_eq!(grant.grant.gateway.id, good_id);
    assert_ne!(grant.grant.id, first_try.grant.id);
    client.verify(&grant).unwrap();
    assert!(matches!(
        next_seen(&mut seen).await,
        PortalToGateway::Grant { .. }
    ));
    // The grant it sat on is revoked, so that it does not linger if the gateway installs it
    // after all.
    match silent.next().await {
        Some(PortalToGateway::Revoke { grant_id }) => assert_eq!(grant_id, first_try.grant.id),
        other => panic!("expected the unanswered grant revoked, got {other:?}"),
    }
    // The silence was the request's failure, not the gateway's: it has not missed its
    // heartbeats, so it stays in service (only those or a closed connection take it out).
    let gateways = portal.store().list_gateways("acme").await.unwrap();
    let health: Vec<(bool, bool)> = gateways
        .iter()
        .filter(|g| g.id == silent.id || g.id == good_id)
        .map(|g| (g.id == silent.id, g.connected))
        .collect();
    assert_eq!(health.len(), 2, "{health:?}");
    assert!(
        health.iter().all(|(_, connected)| *connected),
        "both stay in service: {health:?}"
    );
    // A late acknowledgement from the silent gateway changes nothing.
    silent
        .send(&GatewayMessage::Ack {
            grant_id: first_try.grant.id.clone(),
            resolved: None,
        })
        .await;
    let active = portal
        .store()
        .active_grants("acme", portal.now().timestamp())
        .await
        .unwrap();
    assert!(active.iter().all(|g| g.id != first_try.grant.id));
}

/// A gateway that heartbeats but leaves one grant unanswered (its name does not resolve, say)
/// fails that request, with a reason the client can read, and stays in service: the next
/// requests for its site go to it.
#[tokio::test]
async fn a_heartbeating_gateway_that_leaves_a_grant_unanswered_stays_in_service() {
    let portal = TestPortal::start(
        POLICY,
        "gateway_ack_timeout_ms = 1500\ngateway_heartbeat_interval_ms = 300",
    )
    .await;
    // hq's only gateway answers every grant but those for names under
    // `lame.wiki.acme.example`, which it never answers, heartbeating all along.
    let hq = portal.gateway("acme", "hq", 200).await;
    let hq_id = hq.id.clone();
    let mut hq_seen = hq.serve_answering(|grant, answer| {
        let lame = grant
            .grant
            .resource
            .dns
            .as_ref()
            .is_some_and(|d| d.name.ends_with(".lame.wiki.acme.example"));
        (!lame).then_some(answer)
    });
    let mut alice = portal.client("acme", ALICE, 1).await;
    let lame = Some(DnsMapping {
        name: "www.lame.wiki.acme.example".to_owned(),
        mapped: vec!["100.96.0.9".parse().unwrap()],
    });
    let answer = alice.request("wiki", lame).await;
    assert_eq!(
        rejection(&answer),
        format!(
            "gateway `{hq_id}` did not answer within 1500 ms: `www.lame.wiki.acme.example` could \
             not be resolved in time; ask again later"
        )
    );
    // One gateway was asked (another would wait on the same name), and the grant it left
    // unanswered is revoked.
    let PortalToGateway::Grant { grant } = next_seen(&mut hq_seen).await else {
        panic!("expected the grant at the gateway");
    };
    match next_seen(&mut hq_seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, grant.grant.id),
        other => panic!("expected the unanswered grant revoked, got {other:?}"),
    }
    // Still in service, well past three heartbeat intervals: another client's requests for
    // the site, a name and an address, go to it.
    let mut laptop = portal.client("acme", ALICE, 2).await;
    assert_eq!(
        laptop.grant("gitlab", gitlab_name()).await.grant.gateway.id,
        hq_id
    );
    assert_eq!(laptop.grant("db", None).await.grant.gateway.id, hq_id);
    let record = portal
        .store()
        .gateway("acme", &hq_id)
        .await
        .unwrap()
        .unwrap();
    assert!(record.connected, "the gateway is recorded in service");

    // An IP resource's grant left unanswered by a site's only gateway: the rejection names the
    // gateway and the time it had; the next request is served by the same gateway.
    let lab = portal.gateway("acme", "lab", 201).await;
    let lab_id = lab.id.clone();
    let mut first = true;
    let _lab_seen = lab.serve_answering(move |_, answer| {
        let silent = std::mem::take(&mut first);
        (!silent).then_some(answer)
    });
    let answer = alice.request("jenkins", None).await;
    assert_eq!(
        rejection(&answer),
        format!(
            "no gateway in site `lab` answered in time: `{lab_id}` did not acknowledge the grant \
             within 1500 ms"
        )
    );
    assert_eq!(alice.grant("jenkins", None).await.grant.gateway.id, lab_id);
    let log = portal.store().flows(&flows("acme")).await.unwrap();
    assert!(
        log.iter()
            .any(|f| f.resource_id == "wiki" && f.reason.contains("could not be resolved in time")),
        "the flow log has the reason"
    );
}

#[tokio::test]
async fn a_client_that_lost_its_gateway_gets_another_of_the_site() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut serving = Vec::new();
    let mut ids = Vec::new();
    for seed in 200..202 {
        let gateway = portal.gateway("acme", "hq", seed).await;
        ids.push(gateway.id.clone());
        serving.push(gateway.serve());
    }
    let mut alice = portal.client("acme", ALICE, 1).await;
    let first = alice.grant("db", None).await.grant.gateway.id;
    let other = ids.iter().find(|id| **id != first).unwrap().clone();
    match alice.request_avoiding("db", None, &[&first]).await {
        PortalToClient::Granted { grant, .. } => assert_eq!(grant.grant.gateway.id, other),
        answer => panic!("expected a grant through the other gateway, got {answer:?}"),
    }
    // The new gateway is the client's one for the site from now on.
    assert_eq!(alice.grant("db", None).await.grant.gateway.id, other);
    // With every gateway of the site avoided, the one the client left longer ago (named
    // first) may be back, restarted: it is tried again; the one left last stays avoided.
    match alice.request_avoiding("db", None, &[&first, &other]).await {
        PortalToClient::Granted { grant, .. } => assert_eq!(grant.grant.gateway.id, first),
        answer => panic!("expected a grant through the gateway left first, got {answer:?}"),
    }
    // A site whose one gateway the client left tries it again: the client may have lost
    // only its path to it (a relay that restarted), and a gateway really gone would not
    // acknowledge.
    let lab = portal.gateway("acme", "lab", 210).await;
    let lab_id = lab.id.clone();
    serving.push(lab.serve());
    match alice.request_avoiding("jenkins", None, &[&lab_id]).await {
        PortalToClient::Granted { grant, .. } => assert_eq!(grant.grant.gateway.id, lab_id),
        answer => panic!("expected a grant through the site's one gateway, got {answer:?}"),
    }
}

#[tokio::test]
async fn a_gateway_that_stops_heartbeating_or_closes_is_out_of_service_at_once() {
    let portal = TestPortal::start(POLICY, "gateway_heartbeat_interval_ms = 100").await;
    let mut quiet = portal.gateway("acme", "lab", 200).await;
    assert_eq!(quiet.heartbeat_interval.as_millis(), 100);
    // It says nothing: three intervals later the portal closes it.
    assert_eq!(quiet.next().await, None);
    let mut alice = portal.client("acme", ALICE, 1).await;
    assert_out_of_service(&portal, &mut alice, &quiet.id).await;

    // A gateway that closes its connection is out at once too: once the portal has
    // answered its close, nothing is sent its way.
    let mut closing = portal.gateway("acme", "lab", 201).await;
    closing.socket.close(None).await.unwrap();
    while next_text(&mut closing.socket).await.is_some() {}
    assert_out_of_service(&portal, &mut alice, &closing.id).await;
    // A gateway that heartbeats stays in service.
    let steady = portal.gateway("acme", "lab", 202).await;
    let steady_id = steady.id.clone();
    steady.serve();
    assert_eq!(
        alice.grant("jenkins", None).await.grant.gateway.id,
        steady_id
    );
}

/// The lab's only gateway is out: requests find no gateway, and admins see it unhealthy.
async fn assert_out_of_service(portal: &TestPortal, client: &mut TestClient, gateway: &str) {
    assert_eq!(
        rejection(&client.request("jenkins", None).await),
        "no healthy gateway in site `lab`"
    );
    let record = portal
        .store()
        .gateway("acme", gateway)
        .await
        .unwrap()
        .unwrap();
    assert!(!record.connected);
}

#[tokio::test]
async fn bad_messages_get_errors_and_the_connection_and_others_keep_working() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let oversized = format!(
        r#"{{"v":1,"type":"request_access","resource":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let cases = [
        ("{not json".to_owned(), "the message is malformed"),
        (
            r#"{"v":9,"type":"request_access","resource":"gitlab"}"#.to_owned(),
            "protocol version 9",
        ),
        (
            r#"{"v":1,"type":"grant_me_everything"}"#.to_owned(),
            "unknown variant",
        ),
        (oversized, "the limit is 262144"),
        (
            encode(&ClientMessage::Hello {
                public_key: key(1),
                endpoints: vec![],
            }),
            "`hello` was already said",
        ),
    ];
    for (text, expected) in cases {
        send_text(&mut alice.socket, text).await;
        match alice.next().await {
            Some(PortalToClient::Error { message }) => {
                assert!(message.contains(expected), "{message}")
            }
            other => panic!("expected an error for {expected}, got {other:?}"),
        }
    }
    assert_eq!(
        alice.grant("gitlab", gitlab_name()).await.grant.rule,
        "eng-tools"
    );

    // A huge resource id is denied like any unknown one, and the flow log keeps it short.
    let huge_id = "z".repeat(200 * 1024);
    assert_eq!(
        rejection(&alice.request(&huge_id, None).await),
        "no such resource"
    );
    let logged = portal.store().flows(&flows("acme")).await.unwrap();
    assert_eq!(logged[0].resource_id, format!("{}…", "z".repeat(128)));

    // Too many endpoints in a hello: refused, nothing registered.
    let (_, secret) = portal.client_token("acme", ALICE).await;
    let mut crowded = open(portal.address(), "acme", "client", &secret)
        .await
        .unwrap();
    let endpoints = (0..17u16)
        .map(|port| std::net::SocketAddr::from(([198, 51, 100, 7], 50000 + port)))
        .collect();
    send_text(
        &mut crowded,
        encode(&ClientMessage::Hello {
            public_key: key(7),
            endpoints,
        }),
    )
    .await;
    let text = next_text(&mut crowded).await.unwrap();
    assert!(text.contains("at most 16 endpoints, not 17"), "{text}");

    // A frame beyond the WebSocket limit ends that connection only.
    let mut reckless = portal.client("acme", ALICE, 2).await;
    let huge = "x".repeat(2 * 1024 * 1024);
    let _ = futures_util::SinkExt::send(
        &mut reckless.socket,
        tokio_tungstenite::tungstenite::Message::Text(huge.into()),
    )
    .await;
    while let Some(text) = next_text(&mut reckless.socket).await {
        assert!(!text.contains("granted"), "{text}");
    }
    assert_eq!(alice.grant("db", None).await.grant.rule, "eng-tools");

    // A gateway's bad messages get errors too, and a hello first is required.
    let (_, secret) = portal.gateway_token("acme", "hq").await;
    let mut socket = open(portal.address(), "acme", "gateway", &secret)
        .await
        .unwrap();
    send_text(&mut socket, encode(&GatewayMessage::Heartbeat)).await;
    let text = next_text(&mut socket).await.unwrap();
    assert!(text.contains("say `hello` first"), "{text}");
}

#[tokio::test]
async fn tokens_open_only_their_own_accounts_agent_socket() {
    let portal = TestPortal::start(POLICY, "").await;
    let (_, client) = portal.client_token("acme", ALICE).await;
    let (_, gateway) = portal.gateway_token("acme", "hq").await;
    let address = portal.address();
    // (account in the path, agent, token, the status of the refused upgrade)
    let cases = [
        ("acme", "client", "fzt_wrong", 401),
        ("acme", "client", "", 401),
        ("globex", "client", client.as_str(), 401),
        ("nobody", "client", client.as_str(), 401),
        ("acme", "gateway", client.as_str(), 403),
        ("acme", "client", gateway.as_str(), 403),
        ("acme", "admin", client.as_str(), 404),
    ];
    for (account, agent, token, status) in cases {
        let refused = open(address, account, agent, token)
            .await
            .err()
            .map(|e| e.0);
        assert_eq!(refused, Some(status), "{account} {agent} {token}");
    }
    assert!(open(address, "acme", "client", &client).await.is_ok());
}

async fn accounts_never_meet(database: Database) {
    let portal = TestPortal::start(POLICY, &config_line(&database)).await;
    let acme_gateway = portal.gateway("acme", "hq", 200).await;
    let mut acme_seen = acme_gateway.serve();
    // globex has the same policy text, but no gateway: its grants cannot use acme's.
    let mut globex_alice = portal.client("globex", ALICE, 2).await;
    assert_eq!(
        rejection(&globex_alice.request("gitlab", gitlab_name()).await),
        "no healthy gateway in site `hq`"
    );
    // The same WireGuard key may exist in two accounts: they are separate worlds.
    let mut acme_alice = portal.client("acme", ALICE, 2).await;
    let grant = acme_alice.grant("gitlab", gitlab_name()).await;
    match next_seen(&mut acme_seen).await {
        PortalToGateway::Grant { grant: seen } => assert_eq!(seen.grant.id, grant.grant.id),
        other => panic!("{other:?}"),
    }
    // globex's gateway acknowledging acme's grant id does nothing; its own grants work.
    let mut globex_gateway = portal.gateway("globex", "hq", 201).await;
    globex_gateway
        .send(&GatewayMessage::Ack {
            grant_id: grant.grant.id.clone(),
            resolved: None,
        })
        .await;
    let globex_seen = globex_gateway.serve();
    let globex_grant = globex_alice.grant("gitlab", gitlab_name()).await;
    assert_eq!(globex_grant.grant.account, "globex");
    drop(globex_seen);
    let acme_flows = portal.store().flows(&flows("acme")).await.unwrap();
    let globex_flows = portal.store().flows(&flows("globex")).await.unwrap();
    assert!(acme_flows.iter().all(|f| f.account == "acme"));
    assert!(globex_flows.iter().all(|f| f.account == "globex"));
    let acme_ids: HashSet<String> = acme_flows.iter().map(|f| f.client_id.clone()).collect();
    assert!(!acme_ids.contains(&globex_alice.ready.client_id));
    assert!(
        portal
            .store()
            .active_grants("globex", portal.now().timestamp())
            .await
            .unwrap()
            .iter()
            .all(|g| g.id != grant.grant.id)
    );
}

async fn a_restart_keeps_tokens_gateways_flows_and_grants_in_force(database: Database) {
    let mut portal = TestPortal::start(POLICY, &config_line(&database)).await;
    let (_, gateway_secret) = portal.gateway_token("acme", "lab").await;
    let (_, client_secret) = portal.client_token("acme", ALICE).await;
    let gateway = TestGateway::connect(
        portal.address(),
        portal.pinned(),
        "acme",
        &gateway_secret,
        key(200),
    )
    .await
    .unwrap();
    let gateway_id = gateway.id.clone();
    drop(gateway.serve());
    let mut alice = TestClient::connect(
        portal.address(),
        portal.pinned(),
        "acme",
        &client_secret,
        key(1),
    )
    .await
    .unwrap();
    let jenkins = alice.grant("jenkins", None).await;
    let client_id = alice.ready.client_id.clone();
    let flows_before = portal.store().flows(&flows("acme")).await.unwrap();
    drop(alice);

    portal.restart().await;
    assert_eq!(portal.running().broker.grants_in_force(), 1);
    assert_eq!(
        portal.store().flows(&flows("acme")).await.unwrap(),
        flows_before
    );
    let record = portal
        .store()
        .gateway("acme", &gateway_id)
        .await
        .unwrap()
        .unwrap();
    assert!(!record.connected, "no connection survives a restart");
    // The same tokens still work: the client is the same device, the gateway the same one.
    let gateway = TestGateway::connect(
        portal.address(),
        portal.pinned(),
        "acme",
        &gateway_secret,
        key(200),
    )
    .await
    .unwrap();
    assert_eq!(gateway.id, gateway_id);
    // `ready` lists what is in force, so a gateway drops whatever else it still holds.
    assert_eq!(gateway.held, std::slice::from_ref(&jenkins.grant.id));
    let mut seen = gateway.serve();
    // It gets the grant it holds again, so both sides agree on what is in force.
    match next_seen(&mut seen).await {
        PortalToGateway::Grant { grant } => assert_eq!(*grant, jenkins),
        other => panic!("expected the held grant again, got {other:?}"),
    }
    let mut alice = TestClient::connect(
        portal.address(),
        portal.pinned(),
        "acme",
        &client_secret,
        key(1),
    )
    .await
    .unwrap();
    assert_eq!(alice.ready.client_id, client_id);
    // The grant from before the restart is still decided: a policy change withdraws it.
    portal.write_policy(
        "acme",
        &POLICY.replace("allow engineering -> jenkins as eng-jenkins\n", ""),
    );
    match next_seen(&mut seen).await {
        PortalToGateway::Revoke { grant_id } => assert_eq!(grant_id, jenkins.grant.id),
        other => panic!("expected the old grant's revocation, got {other:?}"),
    }
    match alice.next().await {
        Some(PortalToClient::Revoked { grant_id, .. }) => assert_eq!(grant_id, jenkins.grant.id),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn grants_that_expired_while_the_portal_was_down_are_deleted_when_it_starts() {
    let mut portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "lab", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let grant = alice.grant("jenkins", None).await;
    drop(alice);
    // Every row there is, expired or not: "active at the epoch".
    let stored = |portal: &TestPortal| {
        let store = portal.store().clone();
        async move { store.active_grants("acme", 0).await.unwrap() }
    };
    assert_eq!(stored(&portal).await.len(), 1);
    portal.set_clock(
        chrono::DateTime::from_timestamp(grant.grant.expires_at as i64 + 60, 0).unwrap(),
    );
    portal.restart().await;
    assert_eq!(portal.running().broker.grants_in_force(), 0);
    assert!(stored(&portal).await.is_empty());
}

#[tokio::test]
async fn country_comes_from_the_database_and_a_trusted_proxy_header() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    std::fs::write(
        &db,
        support::mmdb::country_db(&[("127.0.0.0/8", "DE"), ("203.0.113.0/24", "US")]),
    )
    .unwrap();
    let extra = format!(
        "geoip_country_db = \"{}\"\ntrusted_proxy_header = \"x-forwarded-for\"\ntrusted_proxies = [\"127.0.0.2/32\"]",
        db.display()
    );
    let portal = TestPortal::start(POLICY, &extra).await;
    portal.gateway("acme", "hq", 200).await.serve();
    let connect = |bind: &str, forwarded: &str, seed: u8| {
        let origin = Origin {
            bind: Some(bind.parse().unwrap()),
            headers: vec![("x-forwarded-for", forwarded.to_owned())],
        };
        let portal = &portal;
        async move {
            let (_, secret) = portal.client_token("acme", ALICE).await;
            TestClient::connect_from(
                portal.address(),
                portal.pinned(),
                "acme",
                &secret,
                key(seed),
                &origin,
            )
            .await
            .unwrap()
        }
    };
    // From 127.0.0.1 (DE), not a trusted proxy: the header it sends is ignored.
    let mut direct = connect("127.0.0.1", "203.0.113.9", 1).await;
    assert_eq!(
        direct.grant("germany", None).await.grant.rule,
        "eng-germany"
    );
    // Through the trusted proxy at 127.0.0.2: the address it vouches for (the last) counts.
    let mut proxied_us = connect("127.0.0.2", "127.0.0.9, 203.0.113.9", 2).await;
    let answer = proxied_us.request("germany", None).await;
    assert!(
        rejection(&answer).contains("`country in DE` did not hold"),
        "{answer:?}"
    );
    let mut proxied_de = connect("127.0.0.2", "203.0.113.9, 127.0.0.9", 3).await;
    assert_eq!(
        proxied_de.grant("germany", None).await.grant.rule,
        "eng-germany"
    );
    // An address the database does not know has no country: the rule fails closed.
    let mut unknown = connect("127.0.0.2", "192.0.2.1", 4).await;
    assert!(rejection(&unknown.request("germany", None).await).contains("did not hold"));
}

#[tokio::test]
async fn each_agent_gets_relay_credentials_of_its_own_right_after_ready() {
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("relay-secret");
    std::fs::write(&secret_file, "north-relay-secret\n").unwrap();
    let portal = TestPortal::start(
        POLICY,
        &format!(
            "relay_credential_lifetime_secs = 3600\n\
             [[relays]]\naddress = \"203.0.113.5:3478\"\nsecret_file = {secret_file:?}\n"
        ),
    )
    .await;
    // The credentials are made when each agent is ready: between these two readings of the
    // portal's clock (in whole seconds, so a second may turn between them).
    let before = portal.now().timestamp() as u64;
    let mut gateway = portal.gateway("acme", "hq", 1).await;
    let mut client = portal.client("acme", ALICE, 2).await;
    let turn_password = |username: &str| {
        use base64::Engine as _;
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            b"north-relay-secret",
        );
        base64::engine::general_purpose::STANDARD
            .encode(ring::hmac::sign(&key, username.as_bytes()))
    };
    let mut usernames = Vec::new();
    let client_relays = match client.next().await {
        Some(PortalToClient::Relays { relays }) => relays,
        other => panic!("expected relays after ready, got {other:?}"),
    };
    let gateway_relays = match gateway.next().await {
        Some(PortalToGateway::Relays { relays }) => relays,
        other => panic!("expected relays after ready, got {other:?}"),
    };
    let after = portal.now().timestamp() as u64;
    for (relays, agent) in [
        (client_relays, client.ready.client_id.clone()),
        (gateway_relays, gateway.id.clone()),
    ] {
        let [relay] = relays.as_slice() else {
            panic!("one relay is configured: {relays:?}");
        };
        assert_eq!(relay.address, "203.0.113.5:3478".parse().unwrap());
        // Good for the configured hour from when it was made.
        assert!(
            (before + 3600..=after + 3600).contains(&relay.expires_at),
            "{relay:?} not within [{before}, {after}] + 3600"
        );
        assert_eq!(relay.username, format!("{}:{agent}", relay.expires_at));
        assert_eq!(relay.password, turn_password(&relay.username));
        usernames.push(relay.username.clone());
    }
    assert_ne!(usernames[0], usernames[1]);
}

#[tokio::test]
async fn candidates_pass_between_a_client_and_a_gateway_only_with_a_grant_between_them() {
    let portal = TestPortal::start(POLICY, "").await;
    let mut gateway = portal.gateway("acme", "hq", 1).await;
    let mut alice = portal.client("acme", ALICE, 2).await;
    let mut bob = portal.client("acme", BOB, 3).await;
    let line = |port: u16| format!("candidate:1 1 udp 2130706431 198.51.100.7 {port} typ host");
    let candidates = |gateway_id: &str, port: u16| {
        encode(&ClientMessage::Candidates {
            gateway_id: gateway_id.to_owned(),
            candidates: vec![line(port)],
        })
    };

    // Before any grant, neither side's candidates go anywhere.
    send_text(&mut alice.socket, candidates(&gateway.id, 4000)).await;
    match alice.next().await {
        Some(PortalToClient::Error { message }) => {
            assert!(message.starts_with("no grant through gateway"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    gateway
        .send(&GatewayMessage::Candidates {
            client_id: alice.ready.client_id.clone(),
            candidates: vec![line(5000)],
        })
        .await;
    match gateway.next().await {
        Some(PortalToGateway::Error { message }) => {
            assert!(message.starts_with("no grant for client"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }

    // While the grant is being made, the gateway's candidates reach the client (before the
    // grant itself), and after it the client's reach the gateway.
    send_text(
        &mut alice.socket,
        encode(&ClientMessage::RequestAccess {
            resource: "db".into(),
            dns: None,
            avoid: vec![],
        }),
    )
    .await;
    let grant = match gateway.next().await {
        Some(PortalToGateway::Grant { grant }) => grant,
        other => panic!("expected the grant, got {other:?}"),
    };
    gateway
        .send(&GatewayMessage::Candidates {
            client_id: alice.ready.client_id.clone(),
            candidates: vec![line(5000)],
        })
        .await;
    gateway
        .send(&GatewayMessage::Ack {
            grant_id: grant.grant.id.clone(),
            resolved: None,
        })
        .await;
    assert_eq!(
        alice.next().await,
        Some(PortalToClient::Candidates {
            gateway_id: gateway.id.clone(),
            candidates: vec![line(5000)],
        })
    );
    assert!(matches!(
        alice.next().await,
        Some(PortalToClient::Granted { .. })
    ));
    send_text(&mut alice.socket, candidates(&gateway.id, 4001)).await;
    assert_eq!(
        gateway.next().await,
        Some(PortalToGateway::Candidates {
            client_id: alice.ready.client_id.clone(),
            candidates: vec![line(4001)],
        })
    );

    // Bob holds no grant through it: his are refused, and too many at once are refused to
    // anyone.
    send_text(&mut bob.socket, candidates(&gateway.id, 4002)).await;
    assert!(matches!(
        bob.next().await,
        Some(PortalToClient::Error { .. })
    ));
    let flood = encode(&ClientMessage::Candidates {
        gateway_id: gateway.id.clone(),
        candidates: (0..17).map(line).collect(),
    });
    send_text(&mut alice.socket, flood).await;
    match alice.next().await {
        Some(PortalToClient::Error { message }) => {
            assert_eq!(message, "17 candidates in one message; at most 16");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // The gateway heard nothing of either.
    send_text(&mut alice.socket, candidates(&gateway.id, 4003)).await;
    assert_eq!(
        gateway.next().await,
        Some(PortalToGateway::Candidates {
            client_id: alice.ready.client_id.clone(),
            candidates: vec![line(4003)],
        })
    );
}

/// Asks for `resource` as `client`, and has `gateway` take the grant: the grant's id.
async fn granted_through(
    client: &mut TestClient,
    gateway: &mut TestGateway,
    resource: &str,
) -> String {
    let dns = (resource == "gitlab").then(gitlab_name).flatten();
    send_text(
        &mut client.socket,
        encode(&ClientMessage::RequestAccess {
            resource: resource.into(),
            dns,
            avoid: vec![],
        }),
    )
    .await;
    let grant = match gateway.next().await {
        Some(PortalToGateway::Grant { grant }) => grant,
        other => panic!("expected the grant of {resource}, got {other:?}"),
    };
    gateway
        .send(&GatewayMessage::Ack {
            grant_id: grant.grant.id.clone(),
            resolved: grant.grant.resource.dns.as_ref().map(|_| RESOLVED),
        })
        .await;
    loop {
        match client.next().await {
            Some(PortalToClient::Granted { .. }) => return grant.grant.id,
            Some(PortalToClient::Candidates { .. } | PortalToClient::Relays { .. }) => {}
            other => panic!("expected the grant of {resource}, got {other:?}"),
        }
    }
}

/// Waits until the portal handled every message `gateway` sent before: it answers a second
/// `hello` with an error, in order.
async fn handled(gateway: &mut TestGateway) {
    gateway
        .send(&GatewayMessage::Hello {
            public_key: key(9),
            endpoints: vec![],
        })
        .await;
    match gateway.next().await {
        Some(PortalToGateway::Error { message }) => assert!(message.contains("hello"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn the_flow_log_says_how_each_grants_connection_travels_as_its_gateway_says(
    database: Database,
) {
    use fz_proto::PathKind;
    let portal = TestPortal::start(POLICY, &config_line(&database)).await;
    let mut gateway = portal.gateway("acme", "hq", 1).await;
    let mut stranger = portal.gateway("globex", "hq", 2).await;
    let mut alice = portal.client("acme", ALICE, 3).await;
    let bob = portal.client("acme", BOB, 4).await;
    let path = |client_id: &str, path: PathKind, relay: Option<&str>| GatewayMessage::Path {
        client_id: client_id.to_owned(),
        path,
        relay: relay.map(|r| r.parse().unwrap()),
    };
    let paths = || async {
        let mut rows: Vec<(String, Option<String>, Option<String>)> = portal
            .store()
            .flows(&flows("acme"))
            .await
            .unwrap()
            .into_iter()
            .map(|f| (f.grant_id.unwrap_or_default(), f.path, f.relay))
            .collect();
        rows.sort();
        rows
    };

    let db = granted_through(&mut alice, &mut gateway, "db").await;
    assert_eq!(paths().await, [(db.clone(), None, None)], "not said yet");
    gateway
        .send(&path(
            &alice.ready.client_id,
            PathKind::Relayed,
            Some("198.51.100.9"),
        ))
        .await;
    handled(&mut gateway).await;
    let relayed = (Some("relayed".to_owned()), Some("198.51.100.9".to_owned()));
    assert_eq!(
        paths().await,
        [(db.clone(), relayed.0.clone(), relayed.1.clone())]
    );

    // A second grant of the pair travels the same way from its first row on.
    let gitlab = granted_through(&mut alice, &mut gateway, "gitlab").await;
    let mut expected = vec![
        (db.clone(), relayed.0.clone(), relayed.1.clone()),
        (gitlab.clone(), relayed.0.clone(), relayed.1.clone()),
    ];
    expected.sort();
    assert_eq!(paths().await, expected);

    // The pair moves to a direct path: both rows say so.
    gateway
        .send(&path(&alice.ready.client_id, PathKind::Direct, None))
        .await;
    handled(&mut gateway).await;
    let direct = |rows: Vec<(String, Option<String>, Option<String>)>| {
        rows.iter()
            .all(|(_, path, relay)| path.as_deref() == Some("direct") && relay.is_none())
    };
    assert!(direct(paths().await), "{:?}", paths().await);

    // Nobody else writes on them: not a gateway of another account naming alice, nor this
    // gateway naming a client it holds no grant of.
    stranger
        .send(&path(
            &alice.ready.client_id,
            PathKind::Relayed,
            Some("203.0.113.66"),
        ))
        .await;
    handled(&mut stranger).await;
    gateway
        .send(&path(
            &bob.ready.client_id,
            PathKind::Relayed,
            Some("203.0.113.66"),
        ))
        .await;
    handled(&mut gateway).await;
    let rows = paths().await;
    assert_eq!(rows.len(), 2);
    assert!(direct(rows), "{:?}", paths().await);
}

// The agents' protocol end to end on each store backend: grants, withdrawals, revocation,
// accounts, a restart, the flow log.
on_both_backends!("agents":
    an_allowed_request_gets_a_grant_both_agents_verify_and_a_denied_one_a_reason,
    a_policy_change_withdraws_grants_it_no_longer_allows_and_a_bad_one_changes_nothing,
    a_revoked_token_loses_its_grants_and_its_connection,
    accounts_never_meet,
    a_restart_keeps_tokens_gateways_flows_and_grants_in_force,
    the_flow_log_says_how_each_grants_connection_travels_as_its_gateway_says,
);

#[tokio::test]
async fn a_long_list_of_resources_comes_in_small_pages_and_whole() {
    let resources: String = (0..300)
        .map(|i| {
            format!(
                "resource r{i:03} {{ address \"10.{}.{}.0/24\"; site hq }}\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let policy = format!(
        "site hq\n{resources}group engineering {{ members \"{ALICE}\" }}\n\
         allow engineering -> r000 as eng\n"
    );
    let portal = TestPortal::start(&policy, "").await;
    let (_, secret) = portal.client_token("acme", ALICE).await;
    let mut socket = open(portal.address(), "acme", "client", &secret)
        .await
        .unwrap();
    let hello = ClientMessage::Hello {
        public_key: key(1),
        endpoints: vec![],
    };
    send_text(&mut socket, encode(&hello)).await;
    let (mut ids, mut frames) = (Vec::new(), Vec::new());
    loop {
        let text = next_text(&mut socket).await.unwrap();
        frames.push(text.len());
        let (page, more) = match decode::<PortalToClient>(text.as_bytes()).unwrap() {
            PortalToClient::Ready(ready) if frames.len() == 1 => (ready.resources, ready.more),
            PortalToClient::Resources { resources, more } if frames.len() > 1 => (resources, more),
            other => panic!("expected the next page of ready, got {other:?}"),
        };
        ids.extend(page.into_iter().map(|r| r.id));
        if !more {
            break;
        }
    }
    let expected: Vec<String> = (0..300).map(|i| format!("r{i:03}")).collect();
    assert_eq!(ids, expected, "every resource once, in order");
    // No frame much larger than a page: what each idle connection's send buffer keeps.
    assert!(frames.len() >= 6, "{frames:?}");
    assert!(
        frames
            .iter()
            .all(|&bytes| bytes < RESOURCE_PAGE_BYTES + 256),
        "{frames:?}"
    );
    // The test client, like the real one's link, puts the pages back together.
    let alice = portal.client("acme", ALICE, 2).await;
    assert_eq!(alice.ready.resources.len(), 300);
}
