//! The portal killed (SIGKILL) in the middle of a burst of grants and of sign-ins, on each
//! store backend: the real `fz-portal serve` as a child process, a gateway that acknowledges
//! every grant, clients asking for every resource at once, and users finishing email-code
//! sign-ins. After it starts again, every grant a client was told of is in the store with its
//! flow, every token a sign-in handed out authenticates, the gateway that reconnects is given
//! exactly the grants the store holds for it (it drops the rest), and SQLite's file is intact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fz_host::testing::browser::Browser;

use fz_host::testing::agents::{TestClient, TestGateway, key};
use fz_portal::data_dir::Creation;
use fz_portal::keys::KeyFiles;
use fz_portal::store::{Database, FlowFilter, Store, TokenKind};
use fz_proto::{PortalPublicKey, PortalToClient};
use support::backends::config_line;
use support::mail::mailed_code;

const RESOURCES: usize = 8;
const CLIENTS: usize = 8;
/// Sign-ins finished during the burst: each takes five requests, and the portal allows one
/// source address 30 at once.
const SIGN_INS: usize = 4;
const ACCOUNT: &str = "acme";

fn policy() -> String {
    let mut policy = String::from("site hq\n");
    for r in 0..RESOURCES {
        policy.push_str(&format!(
            "resource r{r} {{ address \"10.{r}.0.0/24\"; site hq }}\n"
        ));
    }
    let all: Vec<String> = (0..RESOURCES).map(|r| format!("r{r}")).collect();
    policy.push_str(&format!("allow everyone -> {}\n", all.join(", ")));
    policy
}

/// A running `fz-portal serve`, killed when dropped too, so that a failing assertion leaves
/// no portal behind.
struct Portal(Child);

impl Portal {
    /// SIGKILL, and waits for it to be gone.
    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fz-portal serve` in `home`; its address and key, from the line it prints.
fn serve(home: &Path) -> (Portal, SocketAddr, PortalPublicKey) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fz-portal"))
        .arg("--config")
        .arg(home.join("portal.toml"))
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // `fz-portal listening on http://ADDRESS (portal key KEY)`
    let address = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let key = line
        .split("portal key ")
        .nth(1)
        .unwrap()
        .trim_end_matches([')', '\n']);
    (
        Portal(child),
        address.parse().unwrap(),
        key.parse().unwrap(),
    )
}

/// A sign-in by email code brought up to its last step: the browser with its cookie, the code
/// page's form token, the mailed code, and the nonce that, before the fragment the portal
/// hands out, makes the token's secret.
struct SignIn {
    browser: Browser,
    csrf: String,
    code: String,
    nonce: String,
}

impl SignIn {
    /// Opens the client's sign-in link as `email` and asks for a code, as a browser does;
    /// then reads the code from the mail the portal wrote under `data/mail`.
    async fn start(address: SocketAddr, data: &Path, email: &str, seed: u8) -> SignIn {
        let nonce = URL_SAFE_NO_PAD.encode([seed; 32]);
        let query = serde_urlencoded::to_string([
            ("as", "client"),
            ("nonce", nonce.as_str()),
            (
                "state",
                &URL_SAFE_NO_PAD.encode([seed.wrapping_add(100); 32]),
            ),
            ("callback", "http://127.0.0.1:49152/callback"),
        ])
        .unwrap();
        let mut browser = Browser::new(address);
        let started = browser.get(&format!("/{ACCOUNT}?{query}")).await;
        assert_eq!(started.status, 303, "{started:?}");
        let page = browser.get(&format!("/{ACCOUNT}")).await;
        let sent = browser
            .post(
                &format!("/{ACCOUNT}/sign-in/email"),
                &[("csrf", &page.csrf()), ("email", email)],
            )
            .await;
        assert_eq!(sent.status, 303, "{sent:?}");
        let code_page = browser.get(&format!("/{ACCOUNT}/sign-in/email")).await;
        assert_eq!(code_page.status, 200, "{code_page:?}");
        SignIn {
            browser,
            csrf: code_page.csrf(),
            code: mailed_code(&data.join("mail"), email).await,
            nonce,
        }
    }

    /// Sends the code: the token's secret once the portal handed it out, `None` when the
    /// portal went away first.
    async fn finish(mut self) -> Option<String> {
        let done = self
            .browser
            .try_post(
                &format!("/{ACCOUNT}/sign-in/email/code"),
                &[("csrf", &self.csrf), ("code", &self.code)],
            )
            .await
            .ok()?;
        assert_eq!(done.status, 303, "{done:?}");
        let query = done.location().split_once('?').unwrap().1.to_owned();
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&query).unwrap();
        let fragment = &pairs.iter().find(|(k, _)| k == "fragment").unwrap().1;
        Some(format!("{}{fragment}", self.nonce))
    }
}

async fn a_portal_killed_mid_burst_loses_no_grant_it_gave(database: Database) {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    std::fs::create_dir(home.path().join("policies")).unwrap();
    std::fs::write(home.path().join("policies/access.fz"), policy()).unwrap();
    std::fs::write(
        home.path().join("portal.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{}\n\
             [[accounts]]\nslug = \"{ACCOUNT}\"\npolicy = \"policies\"\n",
            config_line(&database)
        ),
    )
    .unwrap();
    let store = Store::open_in(&data, &database, &KeyFiles::default(), Creation::Allowed)
        .await
        .unwrap();
    store.ensure_account(ACCOUNT).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let token = |kind| store.create_token(ACCOUNT, kind, "t", now + 86_400, now);
    let gateway_secret = token(TokenKind::Gateway {
        site: "hq".to_owned(),
    })
    .await
    .unwrap()
    .secret;
    let mut client_secrets = Vec::new();
    for c in 0..CLIENTS {
        let user = format!("user{c}@acme.example");
        let kind = TokenKind::Client {
            user,
            provider: None,
        };
        client_secrets.push(token(kind).await.unwrap().secret);
    }
    store.close().await;

    let (mut portal, address, pinned) = serve(home.path());
    let gateway = TestGateway::connect(address, pinned, ACCOUNT, &gateway_secret, key(200))
        .await
        .unwrap();
    let gateway_id = gateway.id.clone();
    let _acknowledging = gateway.serve();
    // Users sign in: half finish before the burst, the rest during it, where the kill may cut
    // them off. Every token handed out must be there after the restart.
    let mut sign_ins = Vec::new();
    for (s, seed) in (0..SIGN_INS).zip(100u8..) {
        let email = format!("user{s}@acme.example");
        sign_ins.push(SignIn::start(address, &data, &email, seed).await);
    }
    let late_sign_ins = sign_ins.split_off(SIGN_INS / 2);
    let mut signed_in = Vec::new();
    for sign_in in sign_ins {
        signed_in.push(sign_in.finish().await.expect("the portal is up"));
    }
    let (token_told, mut tokens_heard) = tokio::sync::mpsc::unbounded_channel();
    let mut finishing = Vec::new();
    for sign_in in late_sign_ins {
        let told = token_told.clone();
        finishing.push(tokio::spawn(async move {
            if let Some(secret) = sign_in.finish().await {
                let _ = told.send(secret);
            }
        }));
    }
    drop(token_told);
    let (told, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let mut burst = Vec::new();
    for (c, secret) in client_secrets.iter().enumerate() {
        let mut client = TestClient::connect(address, pinned, ACCOUNT, secret, key(c as u8))
            .await
            .unwrap();
        let told = told.clone();
        burst.push(tokio::spawn(async move {
            for r in 0..RESOURCES {
                match client.try_request(&format!("r{r}"), None, &[]).await {
                    Some(PortalToClient::Granted { grant, .. }) => {
                        let _ = told.send(grant.grant.id.clone());
                    }
                    Some(other) => panic!("r{r} was not granted: {other:?}"),
                    // The portal died.
                    None => return,
                }
            }
        }));
    }
    drop(told);
    // Killed once half the grants were given, with the rest in flight.
    let mut given = BTreeSet::new();
    while given.len() < CLIENTS * RESOURCES / 2 {
        given.insert(heard.recv().await.expect("the burst goes on"));
    }
    portal.kill();
    for task in burst.into_iter().chain(finishing) {
        task.await.unwrap();
    }
    while let Some(grant) = heard.recv().await {
        given.insert(grant);
    }
    while let Some(secret) = tokens_heard.recv().await {
        signed_in.push(secret);
    }
    assert!(
        given.len() < CLIENTS * RESOURCES,
        "the kill came after the burst"
    );

    let (mut portal, address, pinned) = serve(home.path());
    let store = Store::open_in(&data, &database, &KeyFiles::default(), Creation::Refused)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    let stored: BTreeSet<String> = store
        .active_grants(ACCOUNT, now)
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.gateway_id == gateway_id)
        .map(|g| g.id)
        .collect();
    let missing: Vec<_> = given.difference(&stored).collect();
    assert!(missing.is_empty(), "grants given but lost: {missing:?}");
    for secret in &signed_in {
        let token = store.authenticate(secret, now).await.unwrap();
        assert!(
            token.is_some_and(|t| t.signed_in),
            "a token handed out by a sign-in was lost"
        );
    }
    let flows = store
        .flows(&FlowFilter {
            account: ACCOUNT.to_owned(),
            ..FlowFilter::default()
        })
        .await
        .unwrap();
    let logged: BTreeSet<String> = flows.into_iter().filter_map(|f| f.grant_id).collect();
    let unlogged: Vec<_> = given.difference(&logged).collect();
    assert!(
        unlogged.is_empty(),
        "grants given without their flow: {unlogged:?}"
    );

    // The gateway comes back and is told exactly what the store holds for it: what it was
    // given before the crash and the store lost (none, above) it drops.
    let gateway = TestGateway::connect(address, pinned, ACCOUNT, &gateway_secret, key(200))
        .await
        .unwrap();
    let held: BTreeSet<String> = gateway.held.iter().cloned().collect();
    assert_eq!(held, stored);
    // And the portal serves on: a client of the burst gets a grant again.
    let mut client = TestClient::connect(address, pinned, ACCOUNT, &client_secrets[0], key(0))
        .await
        .unwrap();
    let _acknowledging = gateway.serve();
    let answer = client.request("r0", None).await;
    assert!(
        matches!(answer, PortalToClient::Granted { .. }),
        "{answer:?}"
    );

    if database == Database::Sqlite {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(data.join(fz_portal::store::DATABASE_FILE))
            .read_only(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(integrity, "ok");
        let broken: Vec<(String, i64, String, i64)> = sqlx::query_as("PRAGMA foreign_key_check")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(broken.is_empty(), "{broken:?}");
        pool.close().await;
    }
    store.close().await;
    portal.kill();
}

on_both_backends!("crash": a_portal_killed_mid_burst_loses_no_grant_it_gave);
