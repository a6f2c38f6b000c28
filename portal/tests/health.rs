//! `/healthz` says what an operator and a load balancer need: whether the database answers (503
//! when it does not, so agents go to another replica), and per account the policy it runs on
//! and whether its latest reload failed (the portal then serves on its last good table).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use serde_json::Value;
use support::portal::TestPortal;

const POLICY: &str = "site hq\nresource wiki { address \"wiki.acme.example\"; site hq }\n\
                      allow everyone -> wiki\n";

async fn health(portal: &TestPortal) -> (u16, Value) {
    let response = reqwest::get(format!("http://{}/healthz", portal.address()))
        .await
        .expect("`/healthz` answers");
    let status = response.status().as_u16();
    let body = response.text().await.expect("a body");
    (status, serde_json::from_str(&body).expect("JSON"))
}

#[tokio::test]
async fn healthz_reports_a_failed_reload_and_a_database_that_does_not_answer() {
    let portal = TestPortal::start(POLICY, "").await;
    let (status, body) = health(&portal).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["database"]["status"], "ok");
    assert_eq!(body["accounts"][0]["slug"], "acme");
    assert_eq!(body["accounts"][0]["policy"]["status"], "ok");
    let hash = body["accounts"][0]["bundle_hash"].clone();

    // A broken edit: the reload fails, the last good table stays, and health says so.
    std::fs::write(portal.policy_file("acme"), "allow everyone -> nowhere\n").unwrap();
    let engine = &portal.running().broker.account("acme").unwrap().policy;
    assert!(engine.reload().is_err());
    let (status, body) = health(&portal).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded");
    let acme = &body["accounts"][0];
    assert_eq!(acme["policy"]["status"], "reload_failed");
    // At least this one: the file watcher may have tried too.
    assert!(
        acme["policy"]["reloads_failed"].as_u64().unwrap() >= 1,
        "{acme}"
    );
    assert!(
        acme["policy"]["error"]
            .as_str()
            .unwrap()
            .contains("nowhere"),
        "{acme}"
    );
    assert_eq!(acme["bundle_hash"], hash);
    assert_eq!(body["accounts"][1]["policy"]["status"], "ok");

    // Fixed: healthy again.
    std::fs::write(portal.policy_file("acme"), POLICY).unwrap();
    engine.reload().unwrap();
    assert_eq!(health(&portal).await.1["status"], "ok");

    // The database gone (its connections closed): 503, and why.
    portal.store().close().await;
    let (status, body) = health(&portal).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["database"]["status"], "unavailable");
    assert!(
        body["database"]["error"]
            .as_str()
            .unwrap()
            .contains("closed"),
        "{body}"
    );
}

const AGENTS_POLICY: &str = "site hq\n\
    resource db { address \"10.0.5.0/24\"; site hq; ports tcp/5432 }\n\
    group engineering { members \"alice@acme.example\" }\n\
    allow engineering -> db\n";

async fn scrape(portal: &TestPortal) -> String {
    let address = portal
        .running()
        .metrics_address
        .expect("metrics are served");
    let response = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("`/metrics` answers");
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.unwrap()
}

/// The value of one sample of the exposition, by its name and labels as printed.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
        .parse()
        .unwrap()
}

/// `/metrics` (on its own listener) counts requests by outcome with their latency, times the
/// store's commits, and reads agents connected, grants in force, reload failures and the
/// database's answer time when scraped.
#[tokio::test]
async fn metrics_count_requests_agents_grants_and_reload_failures() {
    let portal = TestPortal::start(AGENTS_POLICY, "metrics_listen = \"127.0.0.1:0\"").await;
    let text = scrape(&portal).await;
    assert_eq!(
        sample(&text, "fz_portal_agents_connected{kind=\"client\"}"),
        0.0
    );
    assert_eq!(sample(&text, "fz_portal_grants_in_force"), 0.0);
    assert!(sample(&text, "fz_portal_database_ping_seconds") >= 0.0);
    let commits_before = sample(&text, "fz_portal_store_commit_seconds_count");
    // The metrics are not on the public port.
    let public = reqwest::get(format!("http://{}/metrics", portal.address()))
        .await
        .unwrap();
    assert_eq!(public.status().as_u16(), 404);

    let gateway = portal.gateway("acme", "hq", 200).await;
    let _serving = gateway.serve();
    let mut alice = portal.client("acme", "alice@acme.example", 1).await;
    let mut bob = portal.client("acme", "bob@acme.example", 2).await;
    alice.grant("db", None).await;
    assert!(matches!(
        bob.request("db", None).await,
        fz_proto::PortalToClient::Rejected { .. }
    ));
    std::fs::write(portal.policy_file("acme"), "allow nobody -> db\n").unwrap();
    let engine = &portal.running().broker.account("acme").unwrap().policy;
    assert!(engine.reload().is_err());

    let text = scrape(&portal).await;
    assert_eq!(
        sample(&text, "fz_portal_agents_connected{kind=\"client\"}"),
        2.0
    );
    assert_eq!(
        sample(&text, "fz_portal_agents_connected{kind=\"gateway\"}"),
        1.0
    );
    assert_eq!(sample(&text, "fz_portal_grants_in_force"), 1.0);
    assert_eq!(
        sample(&text, "fz_portal_requests_total{outcome=\"granted\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "fz_portal_requests_total{outcome=\"rejected\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "fz_portal_request_seconds_count{outcome=\"granted\"}"
        ),
        1.0
    );
    // The grant and its flow, and the denial's flow, were committed and timed.
    assert!(sample(&text, "fz_portal_store_commit_seconds_count") > commits_before);
    assert!(
        sample(
            &text,
            "fz_portal_policy_reload_failures_total{account=\"acme\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &text,
            "fz_portal_policy_reload_failures_total{account=\"globex\"}"
        ),
        0.0
    );
}
