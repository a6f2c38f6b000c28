//! The portal's checks of an OpenID Connect provider's answer, against a provider that lies.
//!
//! The real provider of the end-to-end test (`tests/tests/browser.rs`, oidc-provider) only
//! ever sends good ID tokens. Here a provider of the test's own (discovery, an authorization
//! endpoint that answers at once, a token endpoint that checks PKCE, its keys) signs ES256 ID
//! tokens that are wrong one way each: another nonce, another audience, another issuer,
//! expired, signed with a key it does not publish, an address it does not call verified. Each
//! is refused with a clear page and leaves no token; the good one passes. UserInfo gives the
//! groups when the ID token has none, and is refused when it is about someone else. And the
//! sign-in's own state: a provider answer with another state, or one replayed, is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fz_host::testing::browser::{Browser, Page};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use sha2::{Digest as _, Sha256};
use support::portal::TestPortal;

const POLICY: &str = r#"
site hq
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
group sre { idp liar "SRE" }
allow sre -> gitlab as sre-git
"#;

const CLIENT_ID: &str = "fz-portal";
const CLIENT_SECRET: &str = "liar-secret";

/// How the provider's next ID token is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    None,
    Nonce,
    Audience,
    Issuer,
    Expired,
    Key,
    Unverified,
    /// Not a lie: the groups are only in UserInfo, not in the ID token.
    GroupsInUserInfo,
    /// UserInfo is about someone else than the ID token.
    UserInfoOfAnother,
    /// Not a lie: the provider rotated its keys, and publishes and signs with the new one.
    Rotated,
}

struct Liar {
    issuer: String,
    key: EcdsaKeyPair,
    /// A key it signs with but does not publish.
    other_key: EcdsaKeyPair,
    lie: Mutex<Lie>,
    /// What the last authorization request asked: its nonce and PKCE challenge.
    asked: Mutex<HashMap<String, String>>,
    /// Whether the code the last authorization handed out was exchanged already: a code
    /// works once, as at any provider.
    code_used: Mutex<bool>,
}

fn key_pair() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

impl Liar {
    /// The key it publishes now, and its id.
    fn published(&self) -> (&EcdsaKeyPair, &'static str) {
        if *self.lie.lock().unwrap() == Lie::Rotated {
            (&self.other_key, "k2")
        } else {
            (&self.key, "k1")
        }
    }

    fn jwt(&self, claims: &serde_json::Value, key: &EcdsaKeyPair, kid: &str) -> String {
        let header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT"}}"#));
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let signature = key.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

async fn discovery(State(liar): State<Arc<Liar>>) -> Response {
    let issuer = &liar.issuer;
    axum::Json(serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/auth"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

async fn jwks(State(liar): State<Arc<Liar>>) -> Response {
    let (key, kid) = liar.published();
    let point = key.public_key().as_ref();
    axum::Json(serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]}))
    .into_response()
}

/// Signs the person in at once and sends them back with a code.
async fn authorize(
    State(liar): State<Arc<Liar>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    assert_eq!(query["code_challenge_method"], "S256", "PKCE S256 always");
    assert_eq!(query["client_id"], CLIENT_ID);
    *liar.asked.lock().unwrap() = query.clone();
    *liar.code_used.lock().unwrap() = false;
    // The state is base64url: nothing in it needs escaping.
    let back = format!(
        "{}?code=the-code&state={}",
        query["redirect_uri"], query["state"]
    );
    Redirect::to(&back).into_response()
}

/// Exchanges the code, checking the client's secret and its PKCE verifier, for an ID token
/// as wrong as the test asks.
async fn token(
    State(liar): State<Arc<Liar>>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    // RFC 6749 §2.3.1 form-encodes each part first; these need none.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let asked = liar.asked.lock().unwrap().clone();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(form["code_verifier"].as_bytes()));
    let authorised = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&basic);
    let reused = std::mem::replace(&mut *liar.code_used.lock().unwrap(), true);
    if !authorised || reused || form["code"] != "the-code" || challenge != asked["code_challenge"] {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    let lie = *liar.lie.lock().unwrap();
    let now = chrono::Utc::now().timestamp();
    let (issued, expires) = if lie == Lie::Expired {
        (now - 900, now - 600)
    } else {
        (now, now + 300)
    };
    let claims = serde_json::json!({
        "iss": if lie == Lie::Issuer { "https://someone-else.example" } else { liar.issuer.as_str() },
        "sub": "person-1",
        "aud": if lie == Lie::Audience { "another-client" } else { CLIENT_ID },
        "iat": issued,
        "exp": expires,
        "nonce": if lie == Lie::Nonce { "not-the-nonce" } else { asked["nonce"].as_str() },
        "email": "alice@acme.example",
        "email_verified": lie != Lie::Unverified,
        "groups": ["SRE"],
    });
    let mut claims = claims;
    if matches!(lie, Lie::GroupsInUserInfo | Lie::UserInfoOfAnother) {
        claims.as_object_mut().unwrap().remove("groups");
    }
    // `Key` signs with a key it does not publish, under the published key's id.
    let (key, kid) = match lie {
        Lie::Key => (&liar.other_key, "k1"),
        _ => liar.published(),
    };
    axum::Json(serde_json::json!({
        "access_token": "an-access-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "id_token": liar.jwt(&claims, key, kid),
    }))
    .into_response()
}

/// UserInfo for the access token the token endpoint handed out.
async fn userinfo(State(liar): State<Arc<Liar>>, headers: axum::http::HeaderMap) -> Response {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
    if bearer != Some("Bearer an-access-token") {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    }
    let subject = if *liar.lie.lock().unwrap() == Lie::UserInfoOfAnother {
        "person-2"
    } else {
        "person-1"
    };
    axum::Json(serde_json::json!({ "sub": subject, "groups": ["SRE", "Ops"] })).into_response()
}

async fn start_liar() -> Arc<Liar> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let liar = Arc::new(Liar {
        issuer: format!("http://{address}"),
        key: key_pair(),
        other_key: key_pair(),
        lie: Mutex::new(Lie::None),
        asked: Mutex::default(),
        code_used: Mutex::default(),
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/auth", get(authorize))
        .route("/token", post(token))
        .route("/userinfo", get(userinfo))
        .with_state(liar.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    liar
}

async fn portal_for(liar: &Liar) -> (TestPortal, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("liar-secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let provider = format!(
        "[[accounts.oidc]]\nid = \"liar\"\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret_file = \"{}\"\ngroups_claim = \"groups\"\n",
        liar.issuer,
        secret.display()
    );
    (
        TestPortal::start_with_accounts(POLICY, "", &provider).await,
        secrets,
    )
}

/// A client's sign-in link (a fixed nonce and state).
fn link(seed: u8) -> String {
    let query = serde_urlencoded::to_string([
        ("as", "client"),
        ("nonce", &URL_SAFE_NO_PAD.encode([seed; 32])),
        ("state", &URL_SAFE_NO_PAD.encode([seed + 100; 32])),
        ("callback", "http://127.0.0.1:49152/callback"),
    ])
    .unwrap();
    format!("/acme?{query}")
}

/// Opens a sign-in and follows the provider's button to the provider and back; returns the
/// URL the provider sent the browser back to, and the portal's answer to it.
async fn through_the_provider(browser: &mut Browser, seed: u8) -> (String, Page) {
    assert_eq!(browser.get(&link(seed)).await.status, 303);
    let page = browser.get("/acme").await;
    let marker = "href=\"/acme/sign-in/oidc/liar?csrf=";
    let start = page.body.find(marker).expect("the provider's button") + "href=\"".len();
    let end = start + page.body[start..].find('"').unwrap();
    let to_provider = browser.get(&page.body[start..end]).await;
    assert_eq!(to_provider.status, 303, "{to_provider:?}");
    let back = browser.visit(to_provider.location()).await;
    assert_eq!(back.status, 303, "{back:?}");
    let callback = back.location().to_owned();
    let answer = browser.visit(&callback).await;
    (callback, answer)
}

#[tokio::test]
async fn every_lie_in_an_id_token_is_refused_and_leaves_no_token() {
    let liar = start_liar().await;
    let (portal, _secrets) = portal_for(&liar).await;
    let cases = [
        (Lie::Nonce, "ID token was refused"),
        (Lie::Audience, "ID token was refused"),
        (Lie::Issuer, "ID token was refused"),
        (Lie::Expired, "ID token was refused"),
        (Lie::Key, "ID token was refused"),
        (
            Lie::Unverified,
            "does not say that alice@acme.example is verified",
        ),
    ];
    for (seed, (lie, expected)) in (1u8..).zip(cases) {
        *liar.lie.lock().unwrap() = lie;
        let mut browser = Browser::new(portal.address());
        let (_, answer) = through_the_provider(&mut browser, seed).await;
        assert_eq!(answer.status, 502, "{lie:?}: {answer:?}");
        assert!(answer.body.contains(expected), "{lie:?}: {}", answer.body);
    }
    assert!(portal.store().list_tokens("acme").await.unwrap().is_empty());
    assert!(
        portal
            .store()
            .memberships("acme", "alice@acme.example")
            .await
            .unwrap()
            .is_empty(),
        "a refused sign-in brought groups"
    );

    // The truth passes: a token for the client's nonce, the groups recorded.
    *liar.lie.lock().unwrap() = Lie::None;
    let mut browser = Browser::new(portal.address());
    let (callback, answer) = through_the_provider(&mut browser, 50).await;
    assert_eq!(answer.status, 303, "{answer:?}");
    assert!(
        answer
            .location()
            .starts_with("http://127.0.0.1:49152/callback?account=acme&fragment=fz1.client."),
        "{}",
        answer.location()
    );
    let tokens = portal.store().list_tokens("acme").await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].subject.as_deref(), Some("person-1"));
    assert_eq!(tokens[0].issuer.as_deref(), Some(liar.issuer.as_str()));

    // The provider's answer, replayed, finds the sign-in over.
    let replayed = browser.visit(&callback).await;
    assert_eq!(replayed.status, 400, "{replayed:?}");
    assert_eq!(portal.store().list_tokens("acme").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_provider_answer_with_another_state_is_refused() {
    let liar = start_liar().await;
    let (portal, _secrets) = portal_for(&liar).await;
    let mut browser = Browser::new(portal.address());
    assert_eq!(browser.get(&link(1)).await.status, 303);
    let page = browser.get("/acme").await;
    let marker = "href=\"/acme/sign-in/oidc/liar?csrf=";
    let start = page.body.find(marker).unwrap() + "href=\"".len();
    let end = start + page.body[start..].find('"').unwrap();
    // Without the sign-in's CSRF token the button is refused.
    let forged = browser.get("/acme/sign-in/oidc/liar?csrf=forged").await;
    assert_eq!(forged.status, 403);
    let to_provider = browser.get(&page.body[start..end]).await;
    let back = browser.visit(to_provider.location()).await;
    let callback = back.location();
    let (before, _) = callback.split_once("state=").unwrap();
    let wrong = format!("{before}state={}", URL_SAFE_NO_PAD.encode([9u8; 16]));
    let refused = browser.visit(&wrong).await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(
        refused.body.contains("does not belong to this sign-in"),
        "{}",
        refused.body
    );
    // The attempt was used up by the wrong answer: the right one is refused now too.
    let late = browser.visit(callback).await;
    assert_eq!(late.status, 400);
    assert!(portal.store().list_tokens("acme").await.unwrap().is_empty());
}

#[tokio::test]
async fn groups_come_from_userinfo_when_the_id_token_has_none_and_only_for_its_subject() {
    let liar = start_liar().await;
    let (portal, _secrets) = portal_for(&liar).await;
    *liar.lie.lock().unwrap() = Lie::UserInfoOfAnother;
    let mut browser = Browser::new(portal.address());
    let (_, answer) = through_the_provider(&mut browser, 1).await;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(
        answer.body.contains("another person than the ID token"),
        "{}",
        answer.body
    );
    assert!(portal.store().list_tokens("acme").await.unwrap().is_empty());

    *liar.lie.lock().unwrap() = Lie::GroupsInUserInfo;
    let mut browser = Browser::new(portal.address());
    let (_, answer) = through_the_provider(&mut browser, 2).await;
    assert_eq!(answer.status, 303, "{answer:?}");
    let groups: Vec<String> = portal
        .store()
        .memberships("acme", "alice@acme.example")
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.group)
        .collect();
    assert_eq!(groups, ["Ops", "SRE"]);
}

#[tokio::test]
async fn keys_the_provider_rotated_are_fetched_again_and_the_code_exchanged_once() {
    let liar = start_liar().await;
    let (portal, _secrets) = portal_for(&liar).await;
    // A first sign-in: the portal caches the provider's metadata and its key.
    let mut browser = Browser::new(portal.address());
    let (_, answer) = through_the_provider(&mut browser, 1).await;
    assert_eq!(answer.status, 303, "{answer:?}");
    // The provider rotates its key: the next token is signed with a key the cache does not
    // know. The portal fetches the keys again and checks the same token; the code it already
    // exchanged is not exchanged again (the provider would refuse it).
    *liar.lie.lock().unwrap() = Lie::Rotated;
    let mut browser = Browser::new(portal.address());
    let (_, answer) = through_the_provider(&mut browser, 2).await;
    assert_eq!(answer.status, 303, "{answer:?}");
    assert_eq!(portal.store().list_tokens("acme").await.unwrap().len(), 2);
}
