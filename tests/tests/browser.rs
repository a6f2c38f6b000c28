//! Sign-in in a real browser: `fz-client sign-in` against a real `fz-portal serve`, and Debian's
//! Chromium, headless, opening the URL the client printed, typing the address and the code the
//! portal mailed, and following the portal's last redirect to the client's loopback listener.
//! Screenshots of each page are kept under `target/sign-in/` as the run's artifacts.
//!
//! Without Chromium the test skips loudly and leaves the marker `.ci/run` fails on (`.ci/run`
//! installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};

use fz_e2e::binaries::binary;
use fz_e2e::chromium::Chromium;
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
    let mut client = Command::new(binary("fz-client"))
        .arg("sign-in")
        .args(["--portal-url", &format!("ws://{}", portal.address)])
        .args(["--account", "acme", "--no-browser", "--timeout-secs", "60"])
        .arg("--token-file")
        .arg(&token_file)
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
