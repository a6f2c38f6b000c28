//! Several portal replicas on one PostgreSQL database (a real server the tests start,
//! `fz_host::testing::postgres`): each a `RunningPortal` with a data dir of its own and the
//! keys the first one made, as `docs/deploy.md` sets replicas up; and a replica that stops,
//! draining its agents.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fz_host::testing::agents::{PATIENCE, TestClient, TestGateway, key, send_text};
use fz_host::testing::browser::Browser;
use fz_proto::{ClientMessage, GatewayMessage, PortalToClient, PortalToGateway, encode};
use support::backends::config_line;
use support::mail::mailed_code;
use support::portal::TestPortal;

const POLICY: &str = r#"
site hq
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
resource db { address "10.0.5.0/24"; site hq; ports tcp/5432 }
resource builds { address "10.0.7.0/24"; site hq; ports tcp/443 }
group engineering { members "alice@acme.example" }
group dba { idp okta "DBA" }
allow engineering -> gitlab, builds as eng-git
allow dba -> db as dba-db
"#;

const ALICE: &str = "alice@acme.example";

/// Two replicas on one fresh database, the second given the first one's key files; `None`
/// (the test reported skipped) where there is no PostgreSQL.
async fn two_replicas(test: &str) -> Option<[TestPortal; 2]> {
    let database = support::backends::postgres(test)?;
    let line = config_line(&database);
    let first = TestPortal::start(POLICY, &line).await;
    let data = first.dir.path().join("data");
    let keys = format!(
        "signing_key_file = \"{}\"\ntoken_key_file = \"{}\"\n",
        data.join(fz_portal::keys::FILE).display(),
        data.join(fz_portal::keys::TOKEN_KEY_FILE).display()
    );
    let second = TestPortal::start(POLICY, &format!("{line}\n{keys}")).await;
    Some([first, second])
}

/// The grant ids of the next revocation a serving gateway is sent (`revoke` or
/// `revoke_many`), skipping other messages; `None` if none comes within the agents' patience.
async fn revocation(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<PortalToGateway>,
) -> Option<Vec<String>> {
    let next = async {
        loop {
            match seen.recv().await.expect("the gateway stays connected") {
                PortalToGateway::Revoke { grant_id } => break vec![grant_id],
                PortalToGateway::RevokeMany { grant_ids } => break grant_ids,
                _ => continue,
            }
        }
    };
    tokio::time::timeout(PATIENCE, next).await.ok()
}

/// Reads until the portal closes the connection; panics if something else than the close,
/// the relays' credentials or the like comes first for longer than the agents' patience.
async fn closed(client: &mut TestClient) {
    while let Some(message) = client.next().await {
        assert!(
            !matches!(message, PortalToClient::Granted { .. }),
            "a closed session got a grant: {message:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_has_one_live_session_across_replicas_the_newest() {
    let Some([first, second]) =
        two_replicas("replicas::a_device_has_one_live_session_across_replicas_the_newest").await
    else {
        return;
    };
    let (first, second) = (&first, &second);
    assert_eq!(first.pinned(), second.pinned(), "the replicas sign alike");
    let (_, secret) = first.client_token("acme", ALICE).await;
    let connect = |portal: &TestPortal| {
        TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1))
    };

    // The device connects to the first replica, then (another network, a restart) to the
    // second: the first closes the older session; the newer one is served.
    let mut older = connect(first).await.unwrap();
    let mut newer = connect(second).await.unwrap();
    closed(&mut older).await;
    let answer = newer.request("gitlab", None).await;
    assert!(
        matches!(answer, PortalToClient::Rejected { .. }),
        "the newer session answers (no gateway yet): {answer:?}"
    );

    // Back to the first: now the second closes its session.
    let mut newest = connect(first).await.unwrap();
    closed(&mut newer).await;
    let answer = newest.request("gitlab", None).await;
    assert!(
        matches!(answer, PortalToClient::Rejected { .. }),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_reconnects_to_another_replica_leaves_no_stale_connection_behind() {
    let Some([first, second]) = two_replicas(
        "replicas::a_gateway_that_reconnects_to_another_replica_leaves_no_stale_connection_behind",
    )
    .await
    else {
        return;
    };
    let (first, second) = (&first, &second);
    let (_, secret) = first.gateway_token("acme", "hq").await;
    let connect = |portal: &TestPortal| {
        TestGateway::connect(portal.address(), portal.pinned(), "acme", &secret, key(200))
    };
    let mut stale = connect(first).await.unwrap();
    // Its first connection went quiet (the way a dead path looks); it connects to the second
    // replica, and the first drops the connection it still held.
    let _serving = connect(second).await.unwrap().serve();
    while stale.next().await.is_some() {}
    let gateway = second
        .store()
        .gateway("acme", &stale.id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        gateway.connected,
        "the first replica marked it disconnected"
    );
    assert_eq!(first.running().broker.agents_connected(), (0, 0));
    assert_eq!(second.running().broker.agents_connected(), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_moves_to_another_replica_keeps_its_grants_and_their_withdrawals() {
    let Some([first, second]) = two_replicas(
        "replicas::a_gateway_that_moves_to_another_replica_keeps_its_grants_and_their_withdrawals",
    )
    .await
    else {
        return;
    };
    let (first, second) = (&first, &second);
    let (_, gateway_secret) = first.gateway_token("acme", "hq").await;
    let connect = |portal: &TestPortal| {
        TestGateway::connect(
            portal.address(),
            portal.pinned(),
            "acme",
            &gateway_secret,
            key(200),
        )
    };
    let _first_serving = connect(first).await.unwrap().serve();
    let (token_id, secret) = first.client_token("acme", ALICE).await;
    let mut client = TestClient::connect(first.address(), first.pinned(), "acme", &secret, key(1))
        .await
        .unwrap();
    let grant = client.grant("builds", None).await;

    // The gateway moves to the second replica (its first went away), which made no grant:
    // it is told it holds the one the first made, so it keeps it.
    let moved = connect(second).await.unwrap();
    assert_eq!(moved.held, std::slice::from_ref(&grant.grant.id));
    let mut seen = moved.serve();

    // The grant is the second replica's to withdraw now: revoking Alice's token (by an admin,
    // in the store) reaches the gateway through it.
    first
        .store()
        .revoke_token("acme", &token_id, chrono::Utc::now().timestamp())
        .await
        .unwrap();
    let revoked = revocation(&mut seen)
        .await
        .expect("the second replica withdraws the grant within the agents' patience");
    assert_eq!(revoked, [grant.grant.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_on_one_replica_that_drops_a_group_withdraws_grants_on_another() {
    let Some([first, second]) = two_replicas(
        "replicas::a_sign_in_on_one_replica_that_drops_a_group_withdraws_grants_on_another",
    )
    .await
    else {
        return;
    };
    let (first, second) = (&first, &second);
    let identity = ("https://okta.example", "alice-1");
    let sign_in = |groups: &'static [&'static str]| {
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        async move {
            first
                .store()
                .record_identity("acme", "okta", identity, ALICE, Some(&groups), 1)
                .await
                .unwrap();
        }
    };
    sign_in(&["DBA"]).await;
    // Alice's device and the gateway are on the second replica; she holds the database.
    let (_, gateway_secret) = second.gateway_token("acme", "hq").await;
    let gateway = TestGateway::connect(
        second.address(),
        second.pinned(),
        "acme",
        &gateway_secret,
        key(200),
    )
    .await
    .unwrap();
    let mut seen = gateway.serve();
    let (_, secret) = second.client_token("acme", ALICE).await;
    let mut client =
        TestClient::connect(second.address(), second.pinned(), "acme", &secret, key(1))
            .await
            .unwrap();
    let grant = client.grant("db", None).await;

    // She signs in again through the first replica, and Okta no longer lists DBA: the second
    // replica withdraws her grant from its gateway.
    sign_in(&[]).await;
    let revoked = revocation(&mut seen)
        .await
        .expect("the other replica withdraws the grant within the agents' patience");
    assert_eq!(revoked, [grant.grant.id]);
}

/// A browser on `portal` that carries `from`'s cookies: the same browser, sent to another
/// replica by a load balancer that is not sticky.
fn moved(from: &Browser, portal: &TestPortal) -> Browser {
    let mut browser = Browser::new(portal.address());
    browser.cookies = from.cookies.clone();
    browser
}

/// A browser that opened, on `portal`, the sign-in link of a client whose nonce is 32 bytes
/// of `seed`.
async fn signing_in(portal: &TestPortal, seed: u8) -> Browser {
    let link = serde_urlencoded::to_string([
        ("as", "client"),
        ("nonce", &URL_SAFE_NO_PAD.encode([seed; 32])),
        ("state", &URL_SAFE_NO_PAD.encode([seed.wrapping_add(1); 32])),
        ("callback", "http://127.0.0.1:49152/callback"),
    ])
    .unwrap();
    let mut browser = Browser::new(portal.address());
    let started = browser.get(&format!("/acme?{link}")).await;
    assert_eq!(started.status, 303, "{started:?}");
    browser
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_sent_to_an_address_are_limited_across_replicas() {
    let Some(replicas) =
        two_replicas("replicas::codes_sent_to_an_address_are_limited_across_replicas").await
    else {
        return;
    };
    // Three codes in five minutes, asked on alternate replicas; the fourth is refused on
    // either.
    for (n, replica) in [0, 1, 0, 1].into_iter().enumerate() {
        let mut browser = signing_in(&replicas[replica], 20 + n as u8).await;
        let methods = browser.get("/acme").await;
        let sent = browser
            .post(
                "/acme/sign-in/email",
                &[("csrf", &methods.csrf()), ("email", ALICE)],
            )
            .await;
        if n < 3 {
            assert_eq!(sent.status, 303, "code {n}: {sent:?}");
        } else {
            assert_eq!(sent.status, 429, "code {n}: {sent:?}");
            assert!(
                sent.body
                    .contains("Too many codes were sent to that address")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_started_on_one_replica_goes_on_and_ends_on_another() {
    let Some([first, second]) =
        two_replicas("replicas::a_sign_in_started_on_one_replica_goes_on_and_ends_on_another")
            .await
    else {
        return;
    };
    let nonce = URL_SAFE_NO_PAD.encode([7u8; 32]);
    // The client's link opens on the first replica; every later step lands on the other one
    // than the step before.
    let mut on_first = signing_in(&first, 7).await;
    let mut on_second = moved(&on_first, &second);
    let methods = on_second.get("/acme").await;
    assert_eq!(methods.status, 200, "{methods:?}");
    let sent = on_first
        .post(
            "/acme/sign-in/email",
            &[("csrf", &methods.csrf()), ("email", ALICE)],
        )
        .await;
    assert_eq!(sent.status, 303, "{sent:?}");
    let code_page = on_second.get("/acme/sign-in/email").await;
    assert_eq!(code_page.status, 200, "{code_page:?}");
    assert!(code_page.body.contains(ALICE), "{}", code_page.body);
    // The code was mailed by the replica that was asked for it.
    let code = mailed_code(&first.config.data_dir.join("mail"), ALICE).await;
    let form = [("csrf", code_page.csrf()), ("code", code.clone())];
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut replay = moved(&on_second, &first);
    let done = on_second.post("/acme/sign-in/email/code", &form).await;
    assert_eq!(done.status, 303, "{done:?}");
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(done.location().split_once('?').unwrap().1).unwrap();
    let fragment = &query.iter().find(|(k, _)| k == "fragment").unwrap().1;
    let now = first.now().timestamp();
    let token = first
        .store()
        .authenticate(&format!("{nonce}{fragment}"), now)
        .await
        .unwrap()
        .expect("the token the second replica made works on the first");
    assert_eq!(token.account, "acme");

    // The sign-in ended on every replica: the same form sent to the first is refused, and
    // makes no second token.
    let replayed = replay.post("/acme/sign-in/email/code", &form).await;
    assert_eq!(replayed.status, 400, "{replayed:?}");
    assert!(
        replayed.body.contains("This sign-in has ended"),
        "{}",
        replayed.body
    );
    assert_eq!(first.store().list_tokens("acme").await.unwrap().len(), 1);
}

/// The policy without `builds` for engineering: what withdraws a grant of it.
fn policy_without_builds() -> String {
    POLICY.replace("gitlab, builds as eng-git", "gitlab as eng-git")
}

/// An ICE candidate line on `port`.
fn candidate(port: u16) -> String {
    format!("candidate:1 1 udp 2130706431 198.51.100.7 {port} typ host")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_for_a_gateway_on_another_replica_goes_through_it_and_so_do_candidates_and_withdrawals()
 {
    let Some([first, second]) = two_replicas(
        "replicas::a_grant_for_a_gateway_on_another_replica_goes_through_it_and_so_do_candidates_and_withdrawals",
    )
    .await
    else {
        return;
    };
    let (first, second) = (&first, &second);
    // The site's only gateway is on the second replica; Alice's device on the first.
    let mut gateway = second.gateway("acme", "hq", 200).await;
    let mut alice = first.client("acme", ALICE, 1).await;
    let client_id = alice.ready.client_id.clone();
    let request = ClientMessage::RequestAccess {
        resource: "builds".into(),
        dns: None,
        avoid: vec![],
    };
    send_text(&mut alice.socket, encode(&request)).await;

    // The first replica decides; the grant reaches the gateway through the second, and the
    // gateway's candidates (sent while the grant is being made) and its acknowledgement come
    // back the same way.
    let offered = match gateway.next().await {
        Some(PortalToGateway::Grant { grant }) => grant,
        other => panic!("expected the grant through the second replica, got {other:?}"),
    };
    gateway
        .verify(&offered)
        .expect("the first replica signed it");
    assert_eq!(offered.grant.client.id, client_id);
    gateway
        .send(&GatewayMessage::Candidates {
            client_id: client_id.clone(),
            candidates: vec![candidate(5000)],
        })
        .await;
    gateway
        .send(&GatewayMessage::Ack {
            grant_id: offered.grant.id.clone(),
            resolved: None,
        })
        .await;
    let (mut granted, mut candidates) = (None, None);
    while granted.is_none() || candidates.is_none() {
        match alice.next().await {
            Some(PortalToClient::Granted { grant, .. }) => granted = Some(grant),
            Some(PortalToClient::Candidates {
                gateway_id,
                candidates: lines,
            }) => candidates = Some((gateway_id, lines)),
            other => panic!("expected the grant and the gateway's candidates, got {other:?}"),
        }
    }
    assert_eq!(granted.unwrap().grant.id, offered.grant.id);
    assert_eq!(
        candidates,
        Some((gateway.id.clone(), vec![candidate(5000)]))
    );
    let stored = first
        .store()
        .active_grants_of_gateway("acme", &gateway.id, chrono::Utc::now().timestamp())
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|g| &g.id).collect::<Vec<_>>(),
        [&offered.grant.id],
        "the acknowledged grant is stored"
    );

    // Asked again, the grant in force through the other replica's gateway is handed out
    // again: no second grant reaches the gateway (its next message is Alice's candidates).
    send_text(&mut alice.socket, encode(&request)).await;
    match alice.next().await {
        Some(PortalToClient::Granted { grant, .. }) => assert_eq!(grant.grant.id, offered.grant.id),
        other => panic!("expected the same grant again, got {other:?}"),
    }

    // Alice's candidates reach the gateway through the second replica.
    let mine = ClientMessage::Candidates {
        gateway_id: gateway.id.clone(),
        candidates: vec![candidate(4001)],
    };
    send_text(&mut alice.socket, encode(&mine)).await;
    assert_eq!(
        gateway.next().await,
        Some(PortalToGateway::Candidates {
            client_id: client_id.clone(),
            candidates: vec![candidate(4001)],
        })
    );

    // Only the first replica's policy stops allowing builds: it withdraws the grant, and the
    // gateway hears it through the second (whose own policy still allows it).
    first.write_policy("acme", &policy_without_builds());
    assert_eq!(
        gateway.next().await,
        Some(PortalToGateway::Revoke {
            grant_id: offered.grant.id.clone()
        })
    );
    match alice.next().await {
        Some(PortalToClient::Revoked { grant_id, .. }) => assert_eq!(grant_id, offered.grant.id),
        other => panic!("expected the revocation, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_lost_by_one_replica_is_reported_to_its_clients_on_another() {
    let Some([first, second]) = two_replicas(
        "replicas::a_gateway_lost_by_one_replica_is_reported_to_its_clients_on_another",
    )
    .await
    else {
        return;
    };
    // The gateway is on the second replica; Alice's device, with a grant of it, on the first.
    let mut gateway = second.gateway("acme", "hq", 200).await;
    let gateway_id = gateway.id.clone();
    let mut alice = first.client("acme", ALICE, 1).await;
    let acknowledged = async {
        match gateway.next().await {
            Some(PortalToGateway::Grant { grant }) => {
                let ack = GatewayMessage::Ack {
                    grant_id: grant.grant.id.clone(),
                    resolved: None,
                };
                gateway.send(&ack).await;
            }
            other => panic!("expected the grant through the second replica, got {other:?}"),
        }
    };
    let (grant, ()) = tokio::join!(alice.grant("builds", None), acknowledged);

    // The gateway's connection ends: the first replica tells Alice, and keeps her grant (its
    // tunnel may outlive the gateway's connection to the portal).
    drop(gateway);
    loop {
        match alice.next().await {
            Some(PortalToClient::GatewayDown { gateway_id: down }) => {
                assert_eq!(down, gateway_id);
                break;
            }
            Some(PortalToClient::Revoked { .. }) => panic!("the grant was withdrawn"),
            Some(_) => continue,
            None => panic!("the first replica closed Alice's session"),
        }
    }
    let stored = first.store().gateway("acme", &gateway_id).await.unwrap();
    assert!(!stored.unwrap().connected, "marked disconnected");
    let now = chrono::Utc::now().timestamp();
    let in_force = first
        .store()
        .active_grants_of_gateway("acme", &gateway_id, now)
        .await
        .unwrap();
    assert_eq!(
        in_force.iter().map(|g| &g.id).collect::<Vec<_>>(),
        [&grant.grant.id]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_reaches_a_client_that_moved_to_another_replica() {
    let Some([first, second]) =
        two_replicas("replicas::a_withdrawal_reaches_a_client_that_moved_to_another_replica").await
    else {
        return;
    };
    let (first, second) = (&first, &second);
    let mut seen = first.gateway("acme", "hq", 200).await.serve();
    let (_, secret) = first.client_token("acme", ALICE).await;
    let connect = |portal: &TestPortal| {
        TestClient::connect(portal.address(), portal.pinned(), "acme", &secret, key(1))
    };
    let mut older = connect(first).await.unwrap();
    let grant = older.grant("builds", None).await;

    // The device moves to the second replica; its grant stays with the first, which made it.
    let mut moved = connect(second).await.unwrap();
    closed(&mut older).await;
    first.write_policy("acme", &policy_without_builds());
    match moved.next().await {
        Some(PortalToClient::Revoked { grant_id, .. }) => assert_eq!(grant_id, grant.grant.id),
        other => panic!("expected the revocation through the second replica, got {other:?}"),
    }
    let revoked = revocation(&mut seen)
        .await
        .expect("the gateway hears of it too");
    assert_eq!(revoked, [grant.grant.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_stops_accepting_then_closes_its_agents_a_batch_at_a_time() {
    // Two agents over four seconds: two batches, two seconds apart.
    let mut portal = TestPortal::start(POLICY, "drain_period_ms = 4000").await;
    let (address, pinned) = (portal.address(), portal.pinned());
    let (_, alice) = portal.client_token("acme", ALICE).await;
    let (_, bob) = portal.client_token("acme", "bob@acme.example").await;
    let mut alices = TestClient::connect(address, pinned, "acme", &alice, key(1))
        .await
        .unwrap();
    let mut bobs = TestClient::connect(address, pinned, "acme", &bob, key(2))
        .await
        .unwrap();
    let running = portal.running.take().unwrap();
    let stopping = tokio::spawn(running.stop());

    // One of them is closed first; the other is still served meanwhile, though nobody new
    // gets in.
    let mut still_open = tokio::select! {
        () = closed(&mut alices) => bobs,
        () = closed(&mut bobs) => alices,
    };
    let answer = still_open.request("gitlab", None).await;
    assert!(
        matches!(answer, PortalToClient::Rejected { .. }),
        "the agent of the second batch is served until its turn: {answer:?}"
    );
    assert!(
        TestClient::connect(address, pinned, "acme", &alice, key(1))
            .await
            .is_err(),
        "a stopping replica accepts nobody"
    );
    closed(&mut still_open).await;
    stopping.await.unwrap().unwrap();
}
