//! Sign-in in a real browser: `fz-client sign-in` against a real `fz-portal serve`, and Debian's
//! Chromium, headless, opening the URL the client printed and signing in as a person would:
//! with the code the portal mailed, or at a real OpenID Connect provider (oidc-provider, with
//! its login page), then following the portal's last redirect to the client's loopback
//! listener. Screenshots of each page are kept under `target/sign-in/` as the run's artifacts.
//!
//! Without Chromium, or without the provider's packages, a test skips loudly and leaves the
//! marker `.ci/run` fails on (`.ci/run` installs both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use fz_e2e::binaries::binary;
use fz_e2e::chromium::Chromium;
use fz_e2e::idp::{CLIENT_ID, CLIENT_SECRET, TestIdp};
use fz_e2e::local::LocalPortal;
use fz_host::testing::{marker, skip_needing, target_dir};

#[tokio::test]
async fn a_person_signs_in_by_email_code_in_chromium() {
    let test = "browser::a_person_signs_in_by_email_code_in_chromium";
    let mut chromium = match Chromium::start().await {
        Ok(chromium) => chromium,
        Err(why) => {
            skip_needing(test, "chromium", &why);
            return;
        }
    };
    let _ = std::fs::remove_file(marker(test));
    let shots = target_dir().join("sign-in");
    let portal = LocalPortal::start("");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let (mut client, mut stdout, url) = client_sign_in(&portal, &token_file);

    chromium.open(&url).await.unwrap();
    let page = chromium
        .wait_for_text("Email me a sign-in code")
        .await
        .unwrap();
    assert_eq!(
        page,
        format!("http://{}/acme", portal.address),
        "the link's query stays out of the address bar"
    );
    chromium
        .screenshot(&shots.join("1-sign-in.png"))
        .await
        .unwrap();
    chromium
        .type_into("#email", "alice@acme.example")
        .await
        .unwrap();
    chromium.click("button[type=submit]").await.unwrap();
    chromium.wait_for_text("Check your email").await.unwrap();
    chromium
        .screenshot(&shots.join("2-email-code.png"))
        .await
        .unwrap();

    let code = portal.mailed_code(1).await;
    chromium.type_into("#code", &code).await.unwrap();
    chromium.click("button[type=submit]").await.unwrap();
    let done = chromium.wait_for_text("You are signed in").await.unwrap();
    assert!(done.starts_with("http://127.0.0.1:"), "{done}");
    chromium
        .screenshot(&shots.join("3-signed-in.png"))
        .await
        .unwrap();

    let status = client.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(
        rest.contains("Signed in to acme as alice@acme.example"),
        "{rest}"
    );
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The portal lists the device's token as made at a sign-in, by email.
    let tokens = portal.admin(&["token", "list", "--account", "acme"]);
    assert!(
        tokens.contains("client of alice@acme.example via email"),
        "{tokens}"
    );
    for shot in ["1-sign-in.png", "2-email-code.png", "3-signed-in.png"] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot}");
    }
}

/// `fz-client sign-in` to account `acme` of `portal`, the token going to `token_file`: the
/// process, the rest of its output, and the sign-in URL it printed.
fn client_sign_in(
    portal: &LocalPortal,
    token_file: &Path,
) -> (Child, BufReader<ChildStdout>, String) {
    let mut client = Command::new(binary("fz-client"))
        .arg("sign-in")
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args(["--account", "acme", "--no-browser", "--timeout-secs", "60"])
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "no URL printed");
        let line = line.trim();
        if line.starts_with("http://") {
            break line.to_owned();
        }
    };
    (client, stdout, url)
}

/// A free loopback port: taken from the kernel, then handed over (the portal must know its
/// own address before it starts, to tell the provider where to send people back).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const IDP_POLICY: &str = r#"
site hq
resource gitlab { address "gitlab.acme.example"; site hq; ports tcp/443 }
resource payroll { address "payroll.acme.example"; site hq; ports tcp/443 }
group sre { idp okta "SRE" }
group finance { idp okta "Finance" }
allow sre -> gitlab as sre-git
allow finance -> payroll as finance-payroll
"#;

#[tokio::test]
async fn a_person_signs_in_at_an_openid_connect_provider_in_chromium_and_brings_their_groups() {
    let test = "browser::a_person_signs_in_at_an_openid_connect_provider_in_chromium_and_brings_their_groups";
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/acme/sign-in/oidc/okta/callback");
    let users = serde_json::json!({
        "alice": {"email": "Alice@acme.example", "email_verified": true, "groups": ["SRE", "Engineering"]},
        "mallory": {"email": "mallory@acme.example", "email_verified": false, "groups": ["Finance"]},
    });
    let idp = match TestIdp::start(&redirect, &users) {
        Ok(idp) => idp,
        Err(why) => {
            skip_needing(test, "oidc-provider", &why);
            return;
        }
    };
    let mut chromium = match Chromium::start().await {
        Ok(chromium) => chromium,
        Err(why) => {
            skip_needing(test, "chromium", &why);
            return;
        }
    };
    let _ = std::fs::remove_file(marker(test));
    let shots = target_dir().join("sign-in");
    let provider = format!(
        "[[accounts.oidc]]\nid = \"okta\"\nname = \"Acme SSO\"\nissuer = \"{}\"\n\
         client_id = \"{CLIENT_ID}\"\nclient_secret_file = \"okta-secret\"\n\
         scopes = [\"openid\", \"email\", \"groups\"]\ngroups_claim = \"groups\"\n",
        idp.issuer
    );
    let portal = LocalPortal::start_with(
        IDP_POLICY,
        &format!("127.0.0.1:{port}"),
        "",
        &provider,
        &[("okta-secret", CLIENT_SECRET)],
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");

    // Alice signs in at the provider.
    let (mut client, mut stdout, url) = client_sign_in(&portal, &token_file);
    chromium.open(&url).await.unwrap();
    chromium
        .wait_for_text("Sign in with Acme SSO")
        .await
        .unwrap();
    chromium
        .screenshot(&shots.join("4-sign-in-with-oidc.png"))
        .await
        .unwrap();
    chromium.click("#oidc-okta").await.unwrap();
    let at_idp = chromium.wait_for_text("Sign-in").await.unwrap();
    assert!(at_idp.starts_with(&idp.issuer), "{at_idp}");
    chromium
        .screenshot(&shots.join("5-provider-login.png"))
        .await
        .unwrap();
    chromium
        .type_into("input[name=login]", "alice")
        .await
        .unwrap();
    chromium
        .type_into("input[name=password]", "any")
        .await
        .unwrap();
    chromium.click("button[type=submit]").await.unwrap();
    let done = chromium.wait_for_text("You are signed in").await.unwrap();
    assert!(done.starts_with("http://127.0.0.1:"), "{done}");
    assert!(client.wait().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(
        rest.contains("Signed in to acme as alice@acme.example"),
        "{rest}"
    );

    // The token is Alice's, by the provider; her groups are the provider's word.
    let tokens = portal.admin(&["token", "list", "--account", "acme"]);
    assert!(
        tokens.contains("client of alice@acme.example via okta"),
        "{tokens}"
    );
    let alice = portal.admin(&["users", "--account", "acme", "--user", "alice@acme.example"]);
    assert!(alice.contains("group sre\tokta group \"SRE\""), "{alice}");
    assert!(
        alice.contains("okta group \"Engineering\": no group of the policy takes it in"),
        "{alice}"
    );
    assert!(!alice.contains("finance"), "{alice}");

    // The provider moves her from SRE to Finance: her next sign-in says so.
    idp.set_users(&serde_json::json!({
        "alice": {"email": "alice@acme.example", "email_verified": true, "groups": ["Finance"]},
    }));
    let (mut client, _stdout, url) = client_sign_in(&portal, &token_file);
    chromium.open(&url).await.unwrap();
    chromium
        .wait_for_text("Sign in with Acme SSO")
        .await
        .unwrap();
    chromium.click("#oidc-okta").await.unwrap();
    // The provider remembers her (its session cookie): no login page this time.
    chromium.wait_for_text("You are signed in").await.unwrap();
    assert!(client.wait().unwrap().success());
    let alice = portal.admin(&["users", "--account", "acme", "--user", "alice@acme.example"]);
    assert!(
        alice.contains("group finance\tokta group \"Finance\""),
        "{alice}"
    );
    assert!(!alice.contains("group sre"), "{alice}");

    // Someone whose address the provider has not verified proves nothing: no token.
    let mut fresh = Chromium::start().await.unwrap();
    let (mut client, _stdout, url) = client_sign_in(&portal, &dir.path().join("mallory"));
    idp.set_users(&users);
    fresh.open(&url).await.unwrap();
    fresh.wait_for_text("Sign in with Acme SSO").await.unwrap();
    fresh.click("#oidc-okta").await.unwrap();
    fresh.wait_for_text("Sign-in").await.unwrap();
    fresh
        .type_into("input[name=login]", "mallory")
        .await
        .unwrap();
    fresh
        .type_into("input[name=password]", "any")
        .await
        .unwrap();
    fresh.click("button[type=submit]").await.unwrap();
    fresh
        .wait_for_text("does not say that mallory@acme.example is verified")
        .await
        .unwrap();
    client.kill().unwrap();
    client.wait().unwrap();
    assert!(!dir.path().join("mallory").exists());
    let tokens = portal.admin(&["token", "list", "--account", "acme"]);
    assert!(!tokens.contains("mallory"), "{tokens}");
}
