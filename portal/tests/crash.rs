//! The portal killed (SIGKILL) in the middle of a burst of grants, on each store backend: the
//! real `fz-portal serve` as a child process, a gateway that acknowledges every grant, and
//! clients asking for every resource at once. After it starts again, every grant a client was
//! told of is in the store with its flow, the gateway that reconnects is given exactly the
//! grants the store holds for it (it drops the rest), and SQLite's file is intact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up fails loudly

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use fz_host::testing::agents::{TestClient, TestGateway, key};
use fz_portal::data_dir::Creation;
use fz_portal::keys::KeyFiles;
use fz_portal::store::{Database, FlowFilter, Store, TokenKind};
use fz_proto::{PortalPublicKey, PortalToClient};
use support::backends::config_line;

const RESOURCES: usize = 8;
const CLIENTS: usize = 8;
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

/// Starts `fz-portal serve` in `home`; its address and key, from the line it prints.
fn serve(home: &Path) -> (Child, SocketAddr, PortalPublicKey) {
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
    (child, address.parse().unwrap(), key.parse().unwrap())
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
    portal.kill().unwrap();
    portal.wait().unwrap();
    for task in burst {
        task.await.unwrap();
    }
    while let Some(grant) = heard.recv().await {
        given.insert(grant);
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
    portal.kill().unwrap();
    portal.wait().unwrap();
}

on_both_backends!("crash": a_portal_killed_mid_burst_loses_no_grant_it_gave);
