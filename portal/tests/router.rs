//! The router without a socket: requests go straight to the service, through the same
//! middleware and handlers as on the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fz_portal::broker::{Account, Broker, BrokerParts, Timings, system_clock};
use fz_portal::config::Config;
use fz_portal::data_dir::Creation;
use fz_portal::http::{AppState, router};
use fz_portal::mail::Mailer;
use fz_portal::policy::PolicyEngine;
use fz_portal::sign_in::SignIn;
use fz_portal::store::{Store, TokenKind};
use fz_portal::writer::Writer;
use fz_proto::PortalSigningKey;
use tower::ServiceExt as _;

const NOW: i64 = 4_000_000_000;

/// A router over a real store in a temporary directory, with one account `acme`; returns a
/// client and a gateway token of it, and the store.
async fn app() -> (tempfile::TempDir, Router, String, String, String, Store) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.fz"),
        "site hq\nresource r { address \"r.example.com\"; site hq }\nallow everyone -> r\n",
    )
    .unwrap();
    let policy = Arc::new(PolicyEngine::open(dir.path()).unwrap());
    let hash = policy.current().bundle_hash.clone();
    let store = Store::open(&dir.path().join("data"), Creation::Allowed)
        .await
        .unwrap();
    store.ensure_account("acme").await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let client = store
        .create_token(
            "acme",
            TokenKind::Client {
                user: "alice@example.com".into(),
                provider: None,
            },
            "laptop",
            NOW,
            now,
        )
        .await
        .unwrap();
    let gateway = store
        .create_token(
            "acme",
            TokenKind::Gateway { site: "hq".into() },
            "gw",
            NOW,
            now,
        )
        .await
        .unwrap();
    let mut settings = Config::defaults().accounts.remove(0);
    settings.slug = "acme".into();
    let broker = Broker::start(BrokerParts {
        writer: Writer::start(store.clone()),
        store: store.clone(),
        key: PortalSigningKey::from_seed([7; 32]),
        accounts: vec![Account { settings, policy }],
        geo: None,
        timings: Timings {
            heartbeat_interval: std::time::Duration::from_secs(5),
            ack_timeout: std::time::Duration::from_secs(5),
        },
        clock: system_clock(),
        relays: fz_portal::relay::Relays::none(),
    })
    .await
    .unwrap();
    let app = router(Arc::new(AppState {
        broker,
        trusted_proxy: None,
        sign_in: Arc::new(SignIn::new(Mailer::Files(dir.path().join("mail")), false)),
    }));
    (dir, app, hash, client.secret, gateway.secret, store)
}

async fn call(app: &Router, path: &str, bearer: Option<&str>) -> (StatusCode, String) {
    let mut request = Request::get(path);
    if let Some(secret) = bearer {
        request = request.header("authorization", format!("Bearer {secret}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn healthz_names_each_accounts_bundle_and_unknown_paths_are_404() {
    let (_dir, app, hash, _, _, _) = app().await;
    let (status, body) = call(&app, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "status": "ok",
            "database": { "status": "ok" },
            "accounts": [{
                "slug": "acme",
                "bundle_hash": hash,
                "policy": { "status": "ok", "reloads_failed": 0 },
            }],
        })
    );
    assert_eq!(call(&app, "/admin", None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_agent_socket_wants_a_live_token_of_its_account_and_kind_before_anything() {
    let (_dir, app, _, client, gateway, _) = app().await;
    let unauthorised = (
        StatusCode::UNAUTHORIZED,
        r#"{"error":"a live token of this account is needed: `Authorization: Bearer <token>`"}"#
            .to_owned(),
    );
    let cases = [
        ("/api/acme/client", None, unauthorised.clone()),
        ("/api/acme/client", Some("fzt_forged"), unauthorised.clone()),
        (
            "/api/acme/client",
            Some("not even a token"),
            unauthorised.clone(),
        ),
        (
            "/api/globex/client",
            Some(client.as_str()),
            unauthorised.clone(),
        ),
        (
            "/api/acme/gateway",
            Some(client.as_str()),
            (
                StatusCode::FORBIDDEN,
                r#"{"error":"this is not a gateway token"}"#.to_owned(),
            ),
        ),
        (
            "/api/acme/client",
            Some(gateway.as_str()),
            (
                StatusCode::FORBIDDEN,
                r#"{"error":"this is not a client token"}"#.to_owned(),
            ),
        ),
        (
            "/api/acme/portal",
            Some(client.as_str()),
            (
                StatusCode::NOT_FOUND,
                r#"{"error":"agents are `client` or `gateway`"}"#.to_owned(),
            ),
        ),
    ];
    for (path, bearer, expected) in cases {
        assert_eq!(
            call(&app, path, bearer).await,
            expected,
            "{path} {bearer:?}"
        );
    }
    // A good token gets past the gate; a request that is no WebSocket upgrade stops there.
    let (status, _) = call(&app, "/api/acme/client", Some(&client)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_wrong_token_costs_one_check_whether_the_account_exists_or_not() {
    let (_dir, app, _, client, _, store) = app().await;
    let unauthorised = (
        StatusCode::UNAUTHORIZED,
        r#"{"error":"a live token of this account is needed: `Authorization: Bearer <token>`"}"#
            .to_owned(),
    );
    let wrong = format!("fzt_{}", "A".repeat(43));
    // The same answer after the same work (the secret hashed, looked up and compared once),
    // so neither the answer nor its timing says which accounts exist.
    let cases = [
        ("/api/acme/client", wrong.as_str()),
        ("/api/nope/client", wrong.as_str()),
        ("/api/nope/client", client.as_str()),
        ("/api/acme/gateway", "not even a token"),
        ("/api/nope/gateway", "not even a token"),
    ];
    for (path, bearer) in cases {
        let before = store.token_checks();
        assert_eq!(
            call(&app, path, Some(bearer)).await,
            unauthorised,
            "{path} {bearer}"
        );
        assert_eq!(store.token_checks(), before + 1, "{path} {bearer}");
    }
}
