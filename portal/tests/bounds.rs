//! No one client can take the service away from others (issue 14), through a real portal with
//! test agents on loopback: a request for what a grant in force covers gets that grant again;
//! a client's grants stop at the account's limit with a clear refusal; a mass withdrawal
//! reaches the gateway in a few messages and leaves its link up; a request flood is refused
//! past the client's rate and its denials are one flow row; nothing a client sends is stored
//! or echoed whole; and flows go when their retention ends.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::SinkExt as _;
use fz_host::testing::agents::{PATIENCE, RESOLVED, TestClient, key, send_text};
use fz_portal::store::{Decision, FlowFilter, FlowRecord, NewFlow};
use fz_proto::{
    ClientMessage, DnsMapping, GatewayMessage, PortalToClient, PortalToGateway, encode,
};
use support::portal::TestPortal;
use tokio_tungstenite::tungstenite::Message;

const POLICY: &str = r#"
site hq
site lab
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
resource wiki { address "**.wiki.acme.example"; site hq }
resource db { address "10.0.5.0/24"; site hq; ports tcp/5432 }
resource vault { address "10.9.0.0/16"; site hq }
resource jenkins { address "172.16.0.5"; site lab }
group engineering { members "alice@acme.example" }
allow engineering -> gitlab, wiki, db, jenkins as eng
allow engineering -> vault when client verified as eng-vault
"#;

const ALICE: &str = "alice@acme.example";
const BOB: &str = "bob@acme.example";

/// Limits high enough to stay out of the way of a test about something else.
const GENEROUS: &str = "requests_per_second = 100000\nrequest_burst = 100000";

fn gitlab_name() -> Option<DnsMapping> {
    name("gitlab.acme.example", 1)
}

/// `name` mapped to the `n`th address of the mapped range.
fn name(name: &str, n: u32) -> Option<DnsMapping> {
    Some(DnsMapping {
        name: name.to_owned(),
        mapped: vec![
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 96, 0, 0)) + n).into(),
        ],
    })
}

fn rejection(answer: &PortalToClient) -> &str {
    match answer {
        PortalToClient::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn flows_of(portal: &TestPortal, user: &str) -> Vec<FlowRecord> {
    portal
        .store()
        .flows(&FlowFilter {
            account: "acme".to_owned(),
            user: Some(user.to_owned()),
            ..FlowFilter::default()
        })
        .await
        .unwrap()
}

async fn next_seen(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<PortalToGateway>,
) -> PortalToGateway {
    tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("the gateway hears from the portal in time")
        .expect("the gateway still serves")
}

/// Sends every request, keeping at most 32 waiting (what the portal takes from one client),
/// and returns the answers, in the order they came.
async fn flood(client: &mut TestClient, requests: Vec<ClientMessage>) -> Vec<PortalToClient> {
    const IN_FLIGHT: usize = 32;
    let total = requests.len();
    let mut requests = requests.into_iter();
    // The first ones in one write, so that the portal reads them at once and decides them
    // side by side.
    for request in requests.by_ref().take(IN_FLIGHT) {
        client
            .socket
            .feed(Message::Text(encode(&request).into()))
            .await
            .unwrap();
    }
    client.socket.flush().await.unwrap();
    let mut answers = Vec::with_capacity(total);
    while answers.len() < total {
        match client.next().await {
            Some(answer @ (PortalToClient::Granted { .. } | PortalToClient::Rejected { .. })) => {
                answers.push(answer);
                if let Some(request) = requests.next() {
                    send_text(&mut client.socket, encode(&request)).await;
                }
            }
            Some(PortalToClient::Error { message }) => panic!("the portal refused: {message}"),
            Some(_) => {}
            None => panic!("the portal closed the connection"),
        }
    }
    answers
}

fn ask(resource: &str, dns: Option<DnsMapping>) -> ClientMessage {
    ClientMessage::RequestAccess {
        resource: resource.to_owned(),
        dns,
        avoid: Vec::new(),
    }
}

// Requests are decided on both cores at once, as in the portal: identical ones that are being
// decided together must still end with one grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_get_the_grant_in_force_again() {
    let portal = TestPortal::start_with_accounts(POLICY, "", GENEROUS).await;
    let gateway = portal.gateway("acme", "hq", 200).await;
    let first_gateway = gateway.id.clone();
    let mut seen = gateway.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;

    let answers = flood(&mut alice, vec![ask("gitlab", gitlab_name()); 300]).await;
    let mut ids = HashSet::new();
    for answer in &answers {
        match answer {
            PortalToClient::Granted { grant, resolved } => {
                alice.verify(grant).unwrap();
                assert_eq!(*resolved, Some(RESOLVED), "told what the name resolved to");
                ids.insert(grant.grant.id.clone());
            }
            other => panic!("expected a grant, got {other:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "300 identical requests, one grant");
    let gitlab = ids.into_iter().next().unwrap();
    assert_eq!(portal.running().broker.grants_in_force(), 1);
    // The gateway got it once: the next grant it hears of is another one.
    let db = alice.grant("db", None).await;
    match next_seen(&mut seen).await {
        PortalToGateway::Grant { grant } => assert_eq!(grant.grant.id, gitlab),
        other => panic!("expected gitlab's grant, got {other:?}"),
    }
    match next_seen(&mut seen).await {
        PortalToGateway::Grant { grant } => assert_eq!(grant.grant.id, db.grant.id),
        other => panic!("expected db's grant next, got {other:?}"),
    }
    // The flow log has one row for them, counting 300, naming the grant.
    let rows: Vec<FlowRecord> = flows_of(&portal, ALICE)
        .await
        .into_iter()
        .filter(|f| f.resource_id == "gitlab")
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].count, 300);
    assert_eq!(rows[0].grant_id.as_deref(), Some(gitlab.as_str()));
    assert!(rows[0].last_time >= rows[0].time);

    // The same device, connected again with the same token, key and context: the same grant.
    let (_, secret) = portal.client_token("acme", ALICE).await;
    let mut device =
        TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(2))
            .await
            .unwrap();
    let held = device.grant("db", None).await;
    drop(device);
    let mut again = TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(2))
        .await
        .unwrap();
    assert_eq!(again.grant("db", None).await.grant.id, held.grant.id);
    // Another device of the same user: a grant of its own.
    let mut other = portal.client("acme", ALICE, 3).await;
    assert_ne!(other.grant("gitlab", gitlab_name()).await.grant.id, gitlab);

    // A gateway the client could not reach: not handed out again, another one is made.
    let second = portal.gateway("acme", "hq", 201).await;
    let second_id = second.id.clone();
    second.serve();
    match alice
        .request_avoiding("gitlab", gitlab_name(), &[&first_gateway])
        .await
    {
        PortalToClient::Granted { grant, .. } => {
            assert_ne!(grant.grant.id, gitlab);
            assert_eq!(grant.grant.gateway.id, second_id);
        }
        other => panic!("expected a grant through the other gateway, got {other:?}"),
    }
}

#[tokio::test]
async fn a_grant_the_decision_would_not_give_now_is_not_handed_out_again() {
    let portal = TestPortal::start_with_accounts(POLICY, "", GENEROUS).await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    portal
        .store()
        .set_client_verified("acme", &alice.ready.client_id, true)
        .await
        .unwrap();
    let vault = alice.grant("vault", None).await;
    assert_eq!(alice.grant("vault", None).await, vault);
    // The mark is taken away. Whether or not the sweeper has withdrawn the grant yet, the
    // request is decided again in full and refused: the grant is not handed out.
    portal
        .store()
        .set_client_verified("acme", &alice.ready.client_id, false)
        .await
        .unwrap();
    match alice.request("vault", None).await {
        PortalToClient::Rejected { reason, .. } => {
            assert!(
                reason.contains("`client verified` did not hold"),
                "{reason}"
            );
        }
        other => panic!("the grant was handed out after its condition failed: {other:?}"),
    }
}

#[tokio::test]
async fn a_client_s_grants_stop_at_the_limit_with_a_clear_refusal() {
    let settings = format!("{GENEROUS}\nmax_grants_per_client = 5");
    let portal = TestPortal::start_with_accounts(POLICY, "", &settings).await;
    let gateway = portal.gateway("acme", "hq", 200).await;
    let gateway_id = gateway.id.clone();
    let mut seen = gateway.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let requests: Vec<ClientMessage> = (1..=8)
        .map(|n| ask("wiki", name(&format!("n{n}.wiki.acme.example"), n)))
        .collect();
    let answers = flood(&mut alice, requests).await;
    let granted = answers
        .iter()
        .filter(|a| matches!(a, PortalToClient::Granted { .. }))
        .count();
    assert_eq!(granted, 5);
    for answer in answers
        .iter()
        .filter(|a| matches!(a, PortalToClient::Rejected { .. }))
    {
        assert_eq!(
            rejection(answer),
            "this client holds 5 grants, the most the account allows at once \
             (`max_grants_per_client`); ask again when one ends"
        );
    }
    assert_eq!(portal.running().broker.grants_in_force(), 5);
    // What it holds it still gets; the refusals are in the flow log.
    let first = answers.iter().find_map(|a| match a {
        PortalToClient::Granted { grant, .. } => Some(grant.clone()),
        _ => None,
    });
    let held = first.unwrap();
    let dns = held.grant.resource.dns.clone();
    assert_eq!(alice.grant("wiki", dns).await, *held);
    let refused = flows_of(&portal, ALICE)
        .await
        .into_iter()
        .filter(|f| f.decision == Decision::Deny)
        .count();
    assert_eq!(refused, 3);
    // The gateway is up and serves everyone else.
    for _ in 0..5 {
        assert!(matches!(
            next_seen(&mut seen).await,
            PortalToGateway::Grant { .. }
        ));
    }
    let mut other = portal.client("acme", ALICE, 2).await;
    assert_eq!(other.grant("db", None).await.grant.gateway.id, gateway_id);
    assert!(matches!(
        next_seen(&mut seen).await,
        PortalToGateway::Grant { .. }
    ));
    let record = portal
        .store()
        .gateway("acme", &gateway_id)
        .await
        .unwrap()
        .unwrap();
    assert!(record.connected);
}

#[tokio::test]
async fn a_mass_withdrawal_reaches_the_gateway_in_a_few_messages_and_its_link_stays_up() {
    const GRANTS: u32 = 1_100;
    let settings = format!("{GENEROUS}\nmax_grants_per_client = 2000");
    let portal = TestPortal::start_with_accounts(POLICY, "", &settings).await;
    let gateway = portal.gateway("acme", "hq", 200).await;
    let gateway_id = gateway.id.clone();
    let mut seen = gateway.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let requests: Vec<ClientMessage> = (1..=GRANTS)
        .map(|n| ask("wiki", name(&format!("n{n}.wiki.acme.example"), n)))
        .collect();
    let mut granted = HashSet::new();
    for answer in flood(&mut alice, requests).await {
        match answer {
            PortalToClient::Granted { grant, .. } => granted.insert(grant.grant.id),
            other => panic!("expected a grant, got {other:?}"),
        };
    }
    assert_eq!(granted.len(), GRANTS as usize);
    for _ in 0..GRANTS {
        assert!(matches!(
            next_seen(&mut seen).await,
            PortalToGateway::Grant { .. }
        ));
    }

    // The wiki rule goes: every one of them is withdrawn at once.
    portal.write_policy(
        "acme",
        &POLICY.replace("gitlab, wiki, db, jenkins", "gitlab, db, jenkins"),
    );
    let mut revoked = HashSet::new();
    let mut messages = 0;
    while revoked.len() < granted.len() {
        match next_seen(&mut seen).await {
            PortalToGateway::RevokeMany { grant_ids } => {
                assert!(grant_ids.len() <= PortalToGateway::MAX_REVOKED);
                revoked.extend(grant_ids);
            }
            PortalToGateway::Revoke { grant_id } => {
                revoked.insert(grant_id);
            }
            other => panic!("expected revocations, got {other:?}"),
        }
        messages += 1;
    }
    assert_eq!(revoked, granted);
    assert!(
        messages <= 2,
        "{messages} messages for {GRANTS} revocations"
    );
    // The client hears of every one, and its connection stays too.
    let mut told = 0;
    while told < GRANTS {
        match alice.next().await {
            Some(PortalToClient::Revoked { .. }) => told += 1,
            other => panic!("expected a revocation, got {other:?}"),
        }
    }
    // The gateway's link is up: it takes the next grant, and the store has it connected.
    let db = alice.grant("db", None).await;
    assert_eq!(db.grant.gateway.id, gateway_id);
    match next_seen(&mut seen).await {
        PortalToGateway::Grant { grant } => assert_eq!(grant.grant.id, db.grant.id),
        other => panic!("expected db's grant, got {other:?}"),
    }
    let record = portal
        .store()
        .gateway("acme", &gateway_id)
        .await
        .unwrap()
        .unwrap();
    assert!(record.connected);
    assert_eq!(portal.running().broker.grants_in_force(), 1);
}

#[tokio::test]
async fn a_request_flood_is_refused_past_the_rate_and_its_denials_are_one_row() {
    let portal =
        TestPortal::start_with_accounts(POLICY, "", "requests_per_second = 1\nrequest_burst = 10")
            .await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut bob = portal.client("acme", BOB, 1).await;
    let answers = flood(&mut bob, vec![ask("gitlab", gitlab_name()); 300]).await;
    let (mut denied, mut limited) = (0i64, 0);
    for answer in &answers {
        let reason = rejection(answer);
        if reason == "no allow rule applies" {
            denied += 1;
        } else {
            assert!(
                reason.starts_with("too many requests, try again in "),
                "{reason}"
            );
            assert!(reason.ends_with(" s"), "{reason}");
            limited += 1;
        }
    }
    assert_eq!(denied + limited, 300);
    assert!(denied >= 10, "the burst gets through: {denied}");
    assert!(limited > 0, "the rest of the flood is refused");
    // Refusals past the rate never reach the store; the denials are one row with their count.
    let rows = flows_of(&portal, BOB).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].count, denied);
    assert_eq!(rows[0].reason, "no allow rule applies");
    assert_eq!(rows[0].name.as_deref(), Some("gitlab.acme.example"));
    // Another client is not held up by bob's flood.
    let mut alice = portal.client("acme", ALICE, 2).await;
    assert_eq!(alice.grant("gitlab", gitlab_name()).await.grant.rule, "eng");
}

#[tokio::test]
async fn what_a_client_sends_is_never_stored_or_echoed_whole() {
    let portal = TestPortal::start_with_accounts(POLICY, "", GENEROUS).await;
    portal.gateway("acme", "hq", 200).await.serve();
    let mut alice = portal.client("acme", ALICE, 1).await;
    let cap = |text: &str, chars: usize| {
        assert!(
            text.chars().count() <= chars + 1,
            "{} characters",
            text.chars().count()
        );
    };

    // A 200 KB resource id: refused as unknown, named in part in the answer and in the log.
    let huge_id = "z".repeat(200 * 1024);
    match alice.request(&huge_id, None).await {
        PortalToClient::Rejected { resource, reason } => {
            assert_eq!(reason, "no such resource");
            assert_eq!(resource, format!("{}…", "z".repeat(128)));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A known id comes back whole, as the client asked.
    match alice.request("vault", None).await {
        PortalToClient::Rejected { resource, .. } => assert_eq!(resource, "vault"),
        other => panic!("expected a rejection, got {other:?}"),
    }

    // A 200 KB name inside a wildcard resource's pattern: no DNS name is that long.
    let huge_name = format!("{}.wiki.acme.example", "a".repeat(200 * 1024));
    let answer = alice.request("wiki", name(&huge_name, 7)).await;
    let reason = rejection(&answer);
    assert!(
        reason.contains("is longer than a DNS name can be (253 characters)"),
        "{}",
        &reason[..80]
    );
    cap(reason, 1024);
    assert!(
        portal
            .store()
            .active_grants("acme", 0)
            .await
            .unwrap()
            .is_empty(),
        "nothing was granted"
    );
    for flow in flows_of(&portal, ALICE).await {
        cap(&flow.resource_id, 128);
        cap(flow.name.as_deref().unwrap_or(""), 253);
        cap(&flow.reason, 1024);
    }

    // A message that is not one, with a 200 KB `type`: the error says so, briefly.
    let bad = format!(r#"{{"v":1,"type":"{}"}}"#, "x".repeat(200 * 1024));
    send_text(&mut alice.socket, bad).await;
    match alice.next().await {
        Some(PortalToClient::Error { message }) => {
            assert!(
                message.starts_with("the message is malformed: unknown variant"),
                "{}",
                &message[..80]
            );
            cap(&message, 256);
        }
        other => panic!("expected an error, got {other:?}"),
    }

    // A gateway's refusal quoted in a rejection is cut too.
    let mut lab = portal.gateway("acme", "lab", 201).await;
    let request = tokio::spawn(async move {
        let answer = alice.request("jenkins", None).await;
        (alice, answer)
    });
    let Some(PortalToGateway::Grant { grant }) = lab.next().await else {
        panic!("expected jenkins's grant at the lab's gateway");
    };
    lab.send(&GatewayMessage::Refused {
        grant_id: grant.grant.id.clone(),
        reason: "r".repeat(200 * 1024),
    })
    .await;
    let (_, answer) = request.await.unwrap();
    cap(rejection(&answer), 1024);
    let logged = flows_of(&portal, ALICE).await;
    cap(&logged[0].reason, 1024);
    assert!(
        logged[0].reason.starts_with("gateway `"),
        "{}",
        &logged[0].reason[..40]
    );
}

#[tokio::test]
async fn flows_past_the_retention_are_pruned() {
    let portal = TestPortal::start(POLICY, "").await;
    portal.gateway("acme", "hq", 200).await.serve();
    let start = portal.now();
    let day = chrono::Duration::days(1);
    let flow = |at: chrono::DateTime<chrono::Utc>, reason: &str| NewFlow {
        account: "acme".to_owned(),
        time: at.timestamp(),
        user: BOB.to_owned(),
        client_id: "cli_x".to_owned(),
        resource_id: "gitlab".to_owned(),
        name: None,
        decision: Decision::Deny,
        rule_id: None,
        bundle_hash: "h".to_owned(),
        reason: reason.to_owned(),
        grant_id: None,
    };
    // More old flows than one pruning batch takes, and one that is not old enough.
    let old: Vec<NewFlow> = (0..2_500)
        .map(|i| flow(start, &format!("old {i}")))
        .collect();
    portal.store().record_flows(&old).await.unwrap();
    portal
        .store()
        .record_flow(&flow(start + day * 2, "recent"))
        .await
        .unwrap();
    let mut bob = portal.client("acme", BOB, 1).await;
    assert_eq!(
        rejection(&bob.request("gitlab", gitlab_name()).await),
        "no allow rule applies"
    );
    assert_eq!(flows_of(&portal, BOB).await.len(), 2_502);

    // 91 days on: the retention (90 days, the default) has passed for all but one. (Bob's
    // token has expired by then: he comes back with a new one.)
    portal.set_clock(start + day * 91);
    let mut bob = portal.client("acme", BOB, 2).await;
    assert_eq!(
        rejection(&bob.request("gitlab", gitlab_name()).await),
        "no allow rule applies"
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let left = loop {
        let left = flows_of(&portal, BOB).await;
        if left.len() <= 2 || tokio::time::Instant::now() > deadline {
            break left;
        }
        // A poll interval, not a synchronisation: the sweeper prunes on its own tick.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kept: Vec<&str> = left.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(kept, ["no allow rule applies", "recent"]);
    assert!(left[0].time >= (start + day * 91).timestamp());
}
