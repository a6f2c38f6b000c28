//! The router without a socket: requests go straight to the service.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fz_portal::http::{AccountState, AppState, router};
use fz_portal::policy::PolicyEngine;
use tower::ServiceExt as _;

#[tokio::test]
async fn healthz_names_each_accounts_bundle_and_unknown_paths_are_404() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.fz"),
        "site hq\nresource r { address \"r.example.com\"; site hq }\nallow everyone -> r\n",
    )
    .unwrap();
    let policy = Arc::new(PolicyEngine::open(dir.path()).unwrap());
    let hash = policy.current().bundle_hash.clone();
    let app = router(Arc::new(AppState {
        accounts: vec![AccountState {
            slug: "acme".into(),
            policy,
        }],
    }));

    let response = app
        .clone()
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({ "status": "ok", "accounts": [{ "slug": "acme", "bundle_hash": hash }] })
    );

    let missing = app
        .oneshot(Request::get("/admin").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
